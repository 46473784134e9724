//! Errors: one enum per operation, and [`ConnectionError`], why a connection died.
//!
//! `sdp-proto` does not know errno (it has no libc); [`ConnectionError::io_kind`] is the one
//! exhaustive mapping to `std::io::ErrorKind`, and `ops` maps that to errno in one place.

use crate::conn::{StateKind, Timer};
use crate::wire::{MessageId, WireError};
use core::fmt;
use std::io::ErrorKind;

/// Why a connection died. Kept by the connection and returned by every later call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionError {
    /// The connection attempt failed before a HelloAck (CM reject, unreachable, timeout).
    ConnectFailed(ConnectFailure),
    /// The peer's Hello or HelloAck was unacceptable.
    Handshake(HandshakeError),
    /// The peer disconnected (CM DREQ) before the graceful DisConn exchange was complete.
    /// LINUX: ECONNRESET, or EPIPE when the peer's DisConn had already arrived (MLNX).
    Reset {
        /// The peer's DisConn had been received.
        after_peer_disconn: bool,
    },
    /// The peer sent AbortConn.
    PeerAborted,
    /// The local application aborted (SO_LINGER 0, close with unread data, `abort`).
    LocallyAborted,
    /// A timer of SDP-WIRE.md §4.3/§5 expired.
    TimedOut(Timer),
    /// The transport reported a completion error (the QP is in error; flushes follow).
    Transport(TransportFailure),
    /// The peer broke the protocol; the connection is ended, never the process.
    ProtocolViolation(ProtocolViolation),
}

impl ConnectionError {
    /// The I/O error kind an application call should see.
    pub fn io_kind(&self) -> ErrorKind {
        match self {
            ConnectionError::ConnectFailed(ConnectFailure::Refused) => ErrorKind::ConnectionRefused,
            ConnectionError::ConnectFailed(ConnectFailure::Unreachable) => {
                ErrorKind::NetworkUnreachable
            }
            ConnectionError::ConnectFailed(ConnectFailure::TimedOut) => ErrorKind::TimedOut,
            ConnectionError::Handshake(_) => ErrorKind::ConnectionRefused,
            ConnectionError::Reset {
                after_peer_disconn: false,
            } => ErrorKind::ConnectionReset,
            ConnectionError::Reset {
                after_peer_disconn: true,
            } => ErrorKind::BrokenPipe,
            ConnectionError::PeerAborted => ErrorKind::ConnectionReset,
            ConnectionError::LocallyAborted => ErrorKind::ConnectionAborted,
            ConnectionError::TimedOut(_) => ErrorKind::TimedOut,
            // LINUX: a TCP connection whose keepalive probes go unanswered fails with
            // ETIMEDOUT; an unanswered SDP probe (RC retry exceeded) is the same condition.
            ConnectionError::Transport(TransportFailure::Keepalive) => ErrorKind::TimedOut,
            ConnectionError::Transport(_) => ErrorKind::ConnectionReset,
            ConnectionError::ProtocolViolation(_) => ErrorKind::ConnectionReset,
        }
    }
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionError::ConnectFailed(c) => write!(f, "connect failed: {c:?}"),
            ConnectionError::Handshake(h) => write!(f, "handshake rejected: {h}"),
            ConnectionError::Reset { .. } => write!(f, "connection reset by peer"),
            ConnectionError::PeerAborted => write!(f, "peer sent AbortConn"),
            ConnectionError::LocallyAborted => write!(f, "connection aborted locally"),
            ConnectionError::TimedOut(t) => write!(f, "timer {t:?} expired"),
            ConnectionError::Transport(t) => write!(f, "transport failure: {t:?}"),
            ConnectionError::ProtocolViolation(p) => write!(f, "protocol violation: {p}"),
        }
    }
}

impl std::error::Error for ConnectionError {}

/// How a connection attempt failed, as the connection manager reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// CM REJECT (ECONNREFUSED).
    Refused,
    /// Address or route error (ENETUNREACH).
    Unreachable,
    /// No answer (ETIMEDOUT).
    TimedOut,
}

/// A transport completion failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportFailure {
    /// A send completed in error (retry exceeded, remote access error, ...).
    SendCompletion,
    /// A receive completed in error.
    RecvCompletion,
    /// An RDMA read completed in error and the QP is no longer usable.
    RdmaRead,
    /// Keepalive probe failed: the peer is gone.
    Keepalive,
    /// Any other fatal transport event (QP error, device removal).
    Fatal,
}

/// A peer's breach of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolViolation {
    /// The message could not be parsed.
    Malformed(WireError),
    /// MSeq is not last + 1 (§2.1, §7.13).
    BadSequence {
        /// Expected MSeq.
        expected: u32,
        /// Received MSeq.
        got: u32,
    },
    /// MSeqAck acknowledges a message never sent or goes backwards.
    BadAck {
        /// Received MSeqAck.
        mseq_ack: u32,
    },
    /// A message arrived while no receive buffer was posted (credit overrun).
    NoReceiveBuffer,
    /// A message longer than the posted receive buffer.
    TooLong {
        /// Message length.
        len: usize,
        /// Receive buffer size.
        max: u32,
    },
    /// A message that is not legal in this state or role.
    Unexpected {
        /// The message.
        mid: MessageId,
        /// The state it arrived in.
        state: StateKind,
    },
    /// Stream data after the peer's DisConn.
    DataAfterDisConn,
    /// Data, DisConn or a second SrcAvail while the peer's SrcAvail is outstanding (§4.1).
    SrcAvailOutstanding,
    /// SrcAvail whose inline part exceeds its Len.
    SrcAvailInlineTooLong {
        /// SrcAH.Len.
        len: u32,
        /// Inline bytes.
        inline: usize,
    },
    /// RdmaRdCompl reports more bytes than the SrcAvail left to read.
    RdmaRdComplTooLong {
        /// Reported bytes.
        reported: u32,
        /// Bytes still to read.
        remaining: u32,
    },
    /// OOB_PRES on a message with no payload byte to mark.
    UrgentWithoutPayload,
    /// A message this implementation does not support (SinkAvail, SuspComm, unknown IDs).
    Unsupported(MessageId),
}

impl fmt::Display for ProtocolViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Why a Hello or HelloAck was refused. Fields are named as in SDP-WIRE.md §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not parseable.
    Malformed(WireError),
    /// Major version is not 2 (RDMA-CM rejects it too).
    Version(u8),
    /// MaxAdverts is 0 (MLNX, OPENIB, SOL reject it).
    MaxAdvertsZero,
    /// The peer's receive buffer size cannot hold a BSDH and one byte.
    BufferTooSmall(u32),
    /// A HelloAck arrived in a state that does not expect one.
    NotExpected(StateKind),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Malformed(w) => write!(f, "{w}"),
            HandshakeError::Version(v) => write!(f, "hh.version {v:#04x}: major must be 2"),
            HandshakeError::MaxAdvertsZero => write!(f, "hh.max_adverts is 0"),
            HandshakeError::BufferTooSmall(s) => write!(f, "receive size {s} too small"),
            HandshakeError::NotExpected(s) => write!(f, "HelloAck not expected in {s:?}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Error of an input handed to the connection (`handle_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleError {
    /// The connection is closed; the input was ignored (late completions after an error).
    Closed,
    /// The input is not legal in this state (host bug), e.g. a message before the handshake.
    InvalidState(StateKind),
    /// The input killed the connection.
    Fatal(ConnectionError),
}

/// Error of `send`/`send_urgent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No room in the send buffer now (EAGAIN); wait for writable.
    WouldBlock,
    /// The handshake has not completed (ENOTCONN).
    NotConnected,
    /// The write side was shut down (EPIPE).
    Shutdown,
    /// The connection died.
    Closed(ConnectionError),
}

/// Error of `recv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// Nothing to read now (EAGAIN).
    WouldBlock,
    /// The handshake has not completed (ENOTCONN).
    NotConnected,
    /// The connection died.
    Closed(ConnectionError),
}

/// Error of `recv_urgent` (MSG_OOB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrgentError {
    /// No urgent byte to read: none sent, already read, or SO_OOBINLINE (EINVAL).
    Invalid,
    /// The peer announced urgent data (OOB_PEND) that has not arrived yet (EAGAIN).
    WouldBlock,
    /// The connection died.
    Closed(ConnectionError),
}

/// Error of `send_zcopy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZcopyError {
    /// Use BCopy now: queued bytes, an outstanding SrcAvail, a crossing peer SrcAvail.
    Busy,
    /// The buffer is too short for a SrcAvail with inline data, or longer than `zcopy_max`.
    BadLength,
    /// ZCopy send is disabled by configuration or the peer's buffers are too small.
    Disabled,
    /// The handshake has not completed.
    NotConnected,
    /// The write side was shut down.
    Shutdown,
    /// The connection died.
    Closed(ConnectionError),
}

/// Error of `shutdown`, `close`, `request_recv_resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// Not legal before the handshake completed (ENOTCONN).
    NotConnected,
    /// The connection is already closed.
    Closed,
}
