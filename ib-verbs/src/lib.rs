//! ib-verbs: the offload transport of libsdp, with verbs semantics.
//!
//! - [`transport`]: the interface SDP needs from a reliable connection ([`Connection`]:
//!   posted receives, SEND into the peer's posted buffer, registration and keys, RDMA READ,
//!   completions, a pollable notification fd). `sdp-proto` never sees this crate; `ops` joins
//!   them.
//! - [`shm`]: same-host soft RC over shared memory (rings in a sealed memfd, bells on the app
//!   socketpair, `process_vm_readv` for RDMA READ, beacons as abstract AF_UNIX names).
//! - [`rdma`]: the libibverbs provider (RC queue pairs; libibverbs/librdmacm by `dlopen`;
//!   setup by rdma_cm or a TCP exchange), see docs/RDMA.md.
//!
//! `unsafe` lives in [`sys`] (system calls), `shm::mem` (the shared mapping) and the `rdma`
//! provider's FFI (`rdma::{dl, device, conn, cm, bootstrap}`) only.

pub mod rdma;
pub mod shm;
pub mod sys;
pub mod transport;

pub use transport::{
    Access, Completion, ConnAttrs, ConnError, Connection, LocalSge, MemKey, Opcode, PostError,
    RegError, RemoteSge, Violation, WaitOutcome, WcError, WrId,
};
