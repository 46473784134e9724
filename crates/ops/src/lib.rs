//! The Offload Protocol Switch.
//!
//! `preload` turns every intercepted C call into a call here; the switch decides whether the
//! fd is one of its own (a stream socket it tracks) and what the policy says for it. The
//! dependency direction is `preload → ops → {sdp-proto, ib-verbs, fallback, conf}`.
//!
//! Map:
//! - [`fdtable`]: the lock-free fd-indexed table (the hooks' fast path).
//! - [`socket`]: socket lifecycle bookkeeping and policy decisions.
//! - [`state`]: lazy process-wide state (activation, policy, program name).
//! - [`log`]: libsdp's own log (levels 1–9, stderr/syslog/file).
//! - [`fork`]: atfork handlers.
//! - [`stats`]: per-socket statistics in shared memory (`sdp stat`).
//! - [`sys`]: raw system calls for the library's own use (never the hooked names).

pub mod fdhash;
pub mod fdtable;
pub mod fork;
pub mod guard;
pub mod log;
pub mod offload;
pub mod progress;
pub mod socket;
pub mod state;
pub mod stats;
pub mod sys;
