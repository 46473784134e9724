//! `libsdp.so`: the C ABI of libsdp.
//!
//! This crate only exports libc's socket and fd symbols, resolves the real functions
//! ([`real`]), guards against re-entrancy and panics ([`guard`]), and hands every call on a
//! socket it tracks to the Offload Protocol Switch (`ops`). Its only constructor reads one
//! environment variable (`READ_RELAYED`); all other state is built lazily on the first stream
//! socket, so programs that never open one pay nothing.
//!
//! `unsafe` here is the C ABI itself: every exported function takes raw pointers with the
//! contract of the libc function of the same name.

mod guard;
mod hooks;
mod real;

/// Load-time work, kept to reading one environment variable: an image exec'd with relayed
/// connections (`ops::offload::relayed`) makes their shadow duplicates close-on-exec at once,
/// so that a program that never asks for a socket's name does not leak them into the
/// programs it spawns. No thread is started, nothing else is read.
#[used]
#[unsafe(link_section = ".init_array")]
static READ_RELAYED: extern "C" fn() = {
    extern "C" fn read_relayed() {
        if std::env::var_os(ops::offload::relayed::RELAYED_ENV).is_some() {
            ops::offload::relayed::read_env();
        }
    }
    read_relayed
};
