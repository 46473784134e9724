//! The transport interface: what SDP needs from a reliable connection, with verbs semantics.
//!
//! A [`Connection`] is one reliable connection (an RC queue pair in the `rdma` provider, a pair
//! of shared-memory rings in `shm`). Its operations are the verbs SDP uses and nothing more:
//!
//! | verbs | here |
//! |---|---|
//! | `ibv_post_recv` of a private buffer of the negotiated size | [`Connection::post_recv`] |
//! | `ibv_post_send(IBV_WR_SEND)` into the peer's next posted buffer | [`Connection::post_send`] |
//! | `ibv_reg_mr` / `ibv_dereg_mr` | [`Connection::register`] / [`Connection::deregister`] |
//! | `ibv_post_send(IBV_WR_RDMA_READ)` of (vaddr, rkey, len) | [`Connection::post_read`] |
//! | `ibv_poll_cq` | [`Connection::poll_cq`] |
//! | completion channel fd, `ibv_req_notify_cq`, `ibv_get_cq_event` | [`Connection::notify_fd`], [`Connection::arm`], [`Connection::ack_notify`] |
//! | rdma_cm REQ/REP/RTU private data | the provider's bootstrap, carrying opaque Hello / HelloAck bytes |
//!
//! Call order for a consumer (`ops`):
//! 1. bootstrap through the provider (for `shm`: [`crate::shm::Active`] / [`crate::shm::Passive`]);
//!    receives posted during the bootstrap are the peer's initial credits;
//! 2. `post_send` only while the peer has a posted buffer (SDP credits); `post_recv` to give a
//!    credit back after the data of a receive completion was copied out with `recv_data`;
//! 3. `poll_cq` until empty, then sleep with the drain → arm → drain → sleep pattern
//!    ([`Connection::wait`] does it, with an optional spin budget first);
//! 4. a [`ConnError`] from any call means the connection is dead; it stays dead.
//!
//! Completion ordering: within one connection, completions of one kind come in posting order.
//! A RDMA READ error completion is fatal for the connection, as a remote access error moves an
//! RC queue pair to the error state.

use std::fmt;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::sys::SysError;

/// The caller's tag for a work request, returned in its completion.
pub type WrId = u64;

/// A memory key, per registration, revoked by [`Connection::deregister`] (the lkey/rkey of
/// verbs). Keys are never reused within a connection until a 24-bit generation wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemKey(pub u32);

/// What a registration permits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The region is the local destination of this side's RDMA READs.
    LocalWrite,
    /// The peer may RDMA READ the region (an SDP SrcAvail advertises it).
    RemoteRead,
}

/// A registered local range (the scatter entry of a RDMA READ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalSge {
    pub addr: u64,
    pub len: u32,
    pub key: MemKey,
}

/// A range of the peer's memory as it advertised it: (vaddr, len, rkey), as in an SDP SrcAvail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteSge {
    pub addr: u64,
    pub len: u32,
    pub key: MemKey,
}

/// The kind of work a completion finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Send,
    Recv,
    Read,
    /// A zero-length RDMA WRITE: the SDP keepalive probe (SDP-WIRE.md §5.4). It moves no
    /// byte and the peer's application sees nothing; only its completion matters.
    Write,
}

/// Why a work request completed in error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcError {
    /// RDMA READ: the key does not name a live registration of the peer (never registered,
    /// or revoked before or during the read).
    RemoteKeyInvalid,
    /// RDMA READ: the range is not inside the registration the key names.
    RemoteRangeInvalid,
    /// RDMA READ: the kernel refused or faulted the copy (the peer's memory was unmapped, or
    /// the peer exited during the read).
    RemoteAccess,
    /// The peer's adapter never acknowledged the work request (RC retry exceeded): the peer
    /// is unreachable or gone. Reported for a keepalive probe (`Opcode::Write`).
    Unanswered,
}

/// A work completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: WrId,
    pub opcode: Opcode,
    pub status: Result<(), WcError>,
    /// Receive: bytes of the message. Read: bytes read. Send: bytes sent.
    pub byte_len: u32,
    /// Receive: which posted buffer holds the message (opaque; pass the completion to
    /// [`Connection::recv_data`]).
    pub buf_index: u32,
}

/// Negotiated facts about a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnAttrs {
    /// Payload size of each of our receive buffers (the largest message the peer may send).
    pub recv_buf_size: u32,
    /// How many receive buffers we can have posted at once.
    pub recv_depth: u32,
    /// Payload size of each of the peer's receive buffers (the largest message we may send).
    pub send_buf_size: u32,
    /// How many buffers the peer can have posted at once.
    pub peer_recv_depth: u32,
    /// Send/read work requests whose completions were not yet polled, at most.
    pub send_depth: u32,
    /// We may RDMA READ the peer's registered memory (SDP may act as ZCopy sink).
    pub can_read_peer: bool,
    /// The peer may RDMA READ our registered memory (SDP may send SrcAvail).
    pub peer_can_read: bool,
    /// Process id of the peer (same-host providers), as the kernel reported it.
    pub peer_pid: Option<i32>,
    /// User id of the peer (same-host providers), as the kernel reported it.
    pub peer_uid: Option<u32>,
}

/// A work request refused at posting time; the connection is still usable unless the
/// variant is `Dead`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostError {
    /// No posted buffer at the peer: SDP sent without a credit.
    NoCredit,
    /// Too many uncompleted work requests (poll the completion queue), or every receive
    /// buffer is already posted.
    QueueFull,
    /// The message is larger than the peer's receive buffers.
    TooLong { len: usize, max: u32 },
    /// RDMA READ is not possible on this connection: stay in buffered copy.
    ZcopyUnavailable,
    /// The local scatter entry is not inside a live `LocalWrite` registration.
    BadLocalKey,
    /// The completion is not a successful receive, or its buffer was reposted.
    NotARecv,
    /// The connection is dead.
    Dead(ConnError),
}

impl From<ConnError> for PostError {
    fn from(e: ConnError) -> Self {
        PostError::Dead(e)
    }
}

/// A registration refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegError {
    /// Every key slot of this access kind is in use.
    TooMany,
    /// Empty range, or one that wraps the address space or exceeds u32 length.
    BadRange,
    /// The key does not name a live registration.
    UnknownKey,
}

/// Why a connection died. Once returned, every later call returns the same value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnError {
    /// The peer closed the connection or its process ended (the last holder of our bell end
    /// closed it).
    PeerClosed,
    /// The peer reset the connection (an abortive close: SO_LINGER 0, or a close with bytes it
    /// had not read), after everything it sent before was taken.
    PeerAborted,
    /// The peer's shared state violated an invariant; the connection was ended.
    Protocol(Violation),
    /// A RDMA READ failed (also reported as an error completion).
    ReadFailed(WcError),
    /// A system call failed.
    Sys(SysError),
}

/// What a hostile or broken peer did wrong, named for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The peer's count of messages written into our ring went backwards or past the
    /// buffers we posted.
    ProducedIndex {
        seen: u64,
        consumed: u64,
        posted: u64,
    },
    /// The peer's count of posted buffers went backwards or past the ring size.
    PostedIndex {
        seen: u64,
        sent: u64,
        last: u64,
        depth: u32,
    },
    /// A message header claims more bytes than a receive buffer holds.
    MessageLength { len: u32, max: u32 },
    /// The peer's key table holds an entry that does not fit the key format.
    KeyTable,
    /// Another process (forked from ours) used this side of the connection since we did: our
    /// private state is stale (see `ShmConn::claim`). Not the peer's fault, but as final.
    Stolen,
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::PeerClosed => write!(f, "peer closed the connection"),
            ConnError::PeerAborted => write!(f, "peer reset the connection"),
            ConnError::Protocol(v) => write!(f, "peer violated the shared-memory protocol: {v:?}"),
            ConnError::ReadFailed(e) => write!(f, "RDMA READ failed: {e:?}"),
            ConnError::Sys(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConnError {}

impl fmt::Display for PostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostError::Dead(e) => write!(f, "{e}"),
            other => write!(f, "{other:?}"),
        }
    }
}

impl std::error::Error for PostError {}

/// Result of [`Connection::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Completions (or credits) may be available: call `poll_cq` / post again.
    Ready,
    /// The timeout passed with nothing to do.
    TimedOut,
    /// A signal interrupted the sleep (EINTR), as a blocking socket call would report.
    Interrupted,
}

/// One reliable connection with verbs semantics. See the module documentation for the
/// call order.
pub trait Connection {
    /// The negotiated parameters.
    fn attrs(&self) -> ConnAttrs;

    /// Posts one receive buffer of `attrs().recv_buf_size` bytes: one credit for the peer.
    /// The buffer reused is the oldest one whose completion was delivered, so the data of a
    /// receive completion must be copied out before the next `post_recv`.
    fn post_recv(&mut self, wr_id: WrId) -> Result<(), PostError>;

    /// Sends the concatenation of `gather` as one message into the peer's next posted buffer.
    fn post_send(&mut self, wr_id: WrId, gather: &[&[u8]]) -> Result<(), PostError>;

    /// Copies bytes `offset..` of a receive completion's message into `out`; returns the count.
    fn recv_data(
        &self,
        completion: &Completion,
        offset: usize,
        out: &mut [u8],
    ) -> Result<usize, PostError>;

    /// Registers `len` bytes at `addr` and returns its key.
    ///
    /// # Safety
    /// For `LocalWrite`, `addr..addr+len` must be valid for writes and not otherwise read or
    /// written until the registration is deregistered (a RDMA READ writes it); for
    /// `RemoteRead`, it must be valid for reads and its content may be disclosed to the peer,
    /// until deregistered.
    unsafe fn register(
        &mut self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemKey, RegError>;

    /// Revokes a key: from now on a RDMA READ naming it fails.
    fn deregister(&mut self, key: MemKey) -> Result<(), RegError>;

    /// RDMA READ of `remote.len` bytes of the peer's `remote` range into `local`.
    fn post_read(
        &mut self,
        wr_id: WrId,
        local: LocalSge,
        remote: RemoteSge,
    ) -> Result<(), PostError>;

    /// Moves up to `out.len()` completions into `out`; returns the count. After the peer left,
    /// messages it sent before are still delivered, then `Err(PeerClosed)`.
    fn poll_cq(&mut self, out: &mut [Completion]) -> Result<usize, ConnError>;

    /// Whether `poll_cq` would return something now (a cheap check, no system call).
    fn has_work(&mut self) -> bool;

    /// The descriptor that becomes readable when the connection needs attention after
    /// [`arm`](Connection::arm). It also reports the peer's end (hang-up).
    fn notify_fd(&self) -> RawFd;

    /// Asks to be notified on `notify_fd` at the next event. Returns `false` when an event
    /// is already pending (do not sleep: poll again).
    fn arm(&mut self) -> Result<bool, ConnError>;

    /// Clears the readiness of `notify_fd` (reads the bell bytes); detects the peer's end.
    fn ack_notify(&mut self) -> Result<(), ConnError>;

    /// Blocks until `has_work`, the timeout (`None` = forever) or a signal. Spins up to
    /// `spin` first (busy polling, for latency), then drain → arm → drain → sleep.
    fn wait(
        &mut self,
        spin: Duration,
        timeout: Option<Duration>,
    ) -> Result<WaitOutcome, ConnError> {
        let start = Instant::now();
        if self.has_work() {
            return Ok(WaitOutcome::Ready);
        }
        if !spin.is_zero() {
            let mut n = 0u32;
            loop {
                if self.has_work() {
                    return Ok(WaitOutcome::Ready);
                }
                std::hint::spin_loop();
                n = n.wrapping_add(1);
                if n.is_multiple_of(64) && start.elapsed() >= spin {
                    break;
                }
            }
        }
        loop {
            self.ack_notify()?;
            if !self.arm()? || self.has_work() {
                return Ok(WaitOutcome::Ready);
            }
            let timeout_ms = match timeout {
                None => -1,
                Some(t) => {
                    let left = t.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Ok(WaitOutcome::TimedOut);
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            match crate::sys::poll_raw(self.notify_fd(), libc::POLLIN, timeout_ms) {
                Ok(0) => continue, // re-check the deadline at the top
                Ok(_) => {
                    self.ack_notify()?;
                    return Ok(WaitOutcome::Ready);
                }
                Err(e) if e.errno == libc::EINTR => return Ok(WaitOutcome::Interrupted),
                Err(e) => return Err(ConnError::Sys(e)),
            }
        }
    }
}
