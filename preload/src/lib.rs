//! `libsdp.so`: the C ABI of libsdp.
//!
//! This crate only exports libc's socket and fd symbols, resolves the real functions
//! ([`real`]), guards against re-entrancy and panics ([`guard`]), and hands every call on a
//! socket it tracks to the Offload Protocol Switch (`ops`). It has no constructor: all state is
//! built lazily on the first stream socket, so programs that never open one pay nothing.
//!
//! `unsafe` here is the C ABI itself: every exported function takes raw pointers with the
//! contract of the libc function of the same name.

mod guard;
mod hooks;
mod real;
