//! What the connection hands back to its host.

use super::zcopy::ZcopyId;
use crate::error::ConnectionError;
use crate::wire::MessageId;

/// Something the host must act on or may report. Drained with `poll_event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The handshake completed (connect returns, accept hands the socket out).
    Connected,
    /// Perform this RDMA read and report it with `handle_rdma_read_complete`.
    RdmaRead(RdmaRead),
    /// A `send_zcopy` buffer is no longer needed. If `completed` is false the peer refused
    /// or the transfer was cancelled: the host must `send` the buffer from byte `sent` on,
    /// before any other byte, to keep the stream intact.
    ZcopySendFinished {
        /// The `send_zcopy` call.
        id: ZcopyId,
        /// Bytes of the buffer the peer took (inline + RDMA-read).
        sent: u32,
        /// All of it.
        completed: bool,
    },
    /// The peer signalled urgent data (OOB_PEND): raise SIGURG for the socket's owner.
    UrgentPending,
    /// Idle with SO_KEEPALIVE: post a zero-length RDMA write (LINUX `sdp_post_keepalive`);
    /// a failure comes back as `handle_transport_error`.
    KeepaliveProbe,
    /// Disconnect the CM connection now (DREQ). Graceful after the DisConn exchange when this
    /// side sent its DisConn first; abortive otherwise (the QP's pending work is flushed).
    Disconnect {
        /// False only for the graceful DREQ of TIME_WAIT.
        abortive: bool,
    },
    /// The peer half-closed (its DisConn is in order behind all data already queued).
    PeerHalfClosed,
    /// The connection is over; release the QP, buffers and registrations.
    Closed {
        /// `None` for an orderly close.
        error: Option<ConnectionError>,
    },
}

/// An RDMA read the host must perform: `len` bytes at `remote_addr` under `rkey` of the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaRead {
    /// Echo it in `handle_rdma_read_complete`.
    pub id: u64,
    /// The peer's RKey.
    pub rkey: u32,
    /// The peer's address of the first byte.
    pub remote_addr: u64,
    /// Bytes.
    pub len: u32,
}

/// Receive buffers to post now, each of `size` bytes. They count as posted from the moment
/// `poll_post_recv` returns, so post them before the next transmit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostRecv {
    /// How many.
    pub count: u32,
    /// Bytes each (BSDH included).
    pub size: u32,
}

/// A message written by `poll_transmit` into the host's buffer, to post as one RC SEND.
/// Every transmit consumes exactly one of the peer's posted receive buffers; the engine has
/// already checked and charged the credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Bytes written at the start of the buffer (= BSDH.Len).
    pub len: usize,
    /// Message ID.
    pub mid: MessageId,
    /// MSeq of the message.
    pub mseq: u32,
    /// Post with the IB solicited bit (urgent data, LINUX `sdp_tx.c`).
    pub solicited: bool,
}

/// Poll readiness, as the host must show it on the application's fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// POLLIN: `recv` will not block (bytes, EOF or error).
    pub readable: bool,
    /// POLLOUT: `send` will not block (room, or an error/EPIPE to report).
    pub writable: bool,
    /// POLLRDHUP: no more bytes will arrive.
    pub read_closed: bool,
    /// POLLHUP: both directions are shut or the connection is closed.
    pub hangup: bool,
    /// POLLERR: the connection died with an error.
    pub error: bool,
    /// POLLPRI: an urgent byte waits for MSG_OOB.
    pub urgent: bool,
}
