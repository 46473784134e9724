//! The `shm` provider: a same-host soft RC connection over shared memory (DESIGN.md §5).
//!
//! - `layout`: where everything lives in the memfd (diagram there).
//! - `mem`: the mapping and the only code touching it (`unsafe`, bounds-checked).
//! - `conn`: the established connection: ring protocol, bells, RDMA READ emulation.
//! - `bootstrap`: Offer / Answer / Ready over an AF_UNIX stream with SCM_RIGHTS.
//! - `beacon`: discovery and rendezvous names, owner authentication, nonces.

pub mod beacon;
pub mod bootstrap;
pub mod conn;
pub mod layout;
mod mem;
pub mod reuse;

pub use beacon::{
    Beacon, BeaconLink, BeaconOwner, Endpoint, Intent, ProbeError, Visitor, connect_endpoint, probe,
};
pub use bootstrap::{Accepting, Active, BootError, MAX_PRIVATE, Offer, Passive, ShmOptions, pair};
pub use conn::ShmConn;
