//! The `rdma` provider: [`crate::Connection`] over libibverbs (an RC queue pair per
//! connection), for SDP between hosts. Design and measurements: docs/RDMA.md.
//!
//! - [`dl`]: libibverbs opened with `dlopen` on first need (never linked: `libsdp.so` has no
//!   `NEEDED` rdma library), `ibv_fork_init` called at once.
//! - [`bindings`]: types and constants generated from rdma-core's headers by
//!   `scripts/gen-rdma-bindings.sh` (committed; checked by `tests/rdma_layout.rs`).
//! - [`device`]: device/port/GID discovery, re-done on demand; the process's PD; the
//!   registration cache.
//! - [`conn`]: [`Pending`] (QP in INIT, initial receives) and [`RdmaConn`] (the connection).
//! - [`bootstrap`]: setup over a TCP socket (QPN/PSN/GID/sizes + hello bytes, then a ready
//!   byte each way).
//!
//! [`available`] / [`probe`]: "no RDMA here" (library missing, no device, no ACTIVE port,
//! ENOSYS/ENODEV) is a clean `false` — `ops` records fallback reason `no-device`.

#[allow(
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unnecessary_transmutes,
    clippy::all
)]
#[rustfmt::skip]
pub mod bindings;
pub mod bootstrap;
pub mod buf;
pub mod cm;
pub mod conn;
pub mod device;
pub mod dl;

pub use buf::DmaBuf;
pub use conn::{EndpointInfo, Pending, RdmaConn, RdmaOptions};
pub use device::{DEVICE_ENV, Device, DeviceLimits, PortInfo};

use crate::sys::SysError;

/// Why RDMA cannot be used in this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// libibverbs could not be loaded.
    Library(dl::LoadError),
    /// No device, no ACTIVE port, or the kernel has no RDMA support (ENOSYS/ENODEV).
    NoDevice(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Library(e) => write!(f, "no-device: {e}"),
            Unavailable::NoDevice(e) => write!(f, "no-device: {e}"),
        }
    }
}

/// Why a connection could not be set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetupError {
    Unavailable(Unavailable),
    /// A verb failed: which and its errno.
    Verbs {
        op: &'static str,
        errno: i32,
    },
    Sys(SysError),
    BadOptions(&'static str),
    /// The peer's bootstrap frame was malformed.
    Peer(&'static str),
    /// The bootstrap socket ended before the exchange finished.
    PeerClosed,
    Timeout,
    /// The listener's process sent us to the rdma_cm port of the process that accepted our
    /// TCP connection (a prefork server's worker), on the same address.
    Redirect(u16),
    /// A libsdp listener refused the request (its capability record in the REJECT): the peer
    /// runs libsdp, this connection goes on over TCP.
    Refused,
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::Unavailable(u) => write!(f, "{u}"),
            SetupError::Verbs { op, errno } => write!(f, "{op} failed: errno {errno}"),
            SetupError::Sys(e) => write!(f, "{e}"),
            SetupError::BadOptions(s) => write!(f, "bad options: {s}"),
            SetupError::Peer(s) => write!(f, "bad peer: {s}"),
            SetupError::PeerClosed => write!(f, "peer closed the bootstrap socket"),
            SetupError::Timeout => write!(f, "bootstrap timed out"),
            SetupError::Redirect(p) => write!(f, "redirected to rdma_cm port {p}"),
            SetupError::Refused => write!(f, "refused by the libsdp listener"),
        }
    }
}

impl std::error::Error for SetupError {}

/// Whether an RDMA device with an ACTIVE port can be used now (re-checked on every call:
/// devices may appear or go away).
pub fn available() -> bool {
    probe().is_ok()
}

/// The device that would be used, or why none can be.
pub fn probe() -> Result<std::sync::Arc<Device>, Unavailable> {
    Device::get()
}

/// Loads `library` instead of libibverbs (tests: a missing library must be a clean "no").
#[doc(hidden)]
pub fn probe_library(library: &str) -> Result<(), Unavailable> {
    dl::load_from(library)
        .map(|_| ())
        .map_err(Unavailable::Library)
}
