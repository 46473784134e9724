//! sdp-proto: the Sockets Direct Protocol engine of libsdp, sans-IO.
//!
//! - [`wire`]: byte-exact views and value types for every SDP message (SDP-WIRE.md §§1–4).
//! - [`conn`]: the per-connection state machine: handshake, credits, BCopy, ZCopy read,
//!   urgent data, close and abort, timers, receive-buffer resizing. Driven by a host
//!   (`crates/ops`) through `handle_*` calls and drained through `poll_*` calls.
//! - [`time`]: the host-supplied clock type.
//! - [`error`]: one error enum per operation and [`error::ConnectionError`], why a
//!   connection died.
//!
//! The crate forbids unsafe code, performs no I/O, reads no clock and no random source and
//! starts no thread (a test greps the sources for it): every input, time included, comes from
//! the caller, so every behaviour is reproducible in a simulation.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conn;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod time;
pub mod wire;

pub use conn::{
    Config, Connection, Event, PostRecv, RdmaRead, Readiness, Role, StateKind, Transmit,
};
pub use error::ConnectionError;
pub use time::Timestamp;
