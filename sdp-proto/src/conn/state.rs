//! Connection states (SDP-WIRE.md §5.5, MLNX's TCP-like states), rustls style: each variant
//! carries only the data of its phase, and [`StateKind`] names them for errors and callers.
//!
//! ```text
//!  active:  HelloSent --HelloAck--> Established        passive: HelloAckSent --RTU/1st msg--> Established
//!
//!  Established --shutdown(WR)/close--> FinWait1 --DisConn sent--> FinWait1{sent}
//!  Established --DisConn rx--> CloseWait --shutdown(WR)/close--> LastAck --DisConn sent--> LastAck{sent}
//!  FinWait1{sent} --DisConn rx--> TimeWait (we were first: host issues the CM DREQ)
//!  FinWait1{not sent} --DisConn rx--> LastAck (the peer was first)
//!  LastAck{sent} --CM disconnected--> Closed        TimeWait --CM disconnected/guard--> Closed
//!  any --abort/AbortConn/error/CM DREQ early--> Closed{error}
//! ```

use crate::error::ConnectionError;

/// Which side of the CM exchange this connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sent the Hello (connect).
    Active,
    /// Answered with the HelloAck (accept).
    Passive,
}

/// The state names, for errors, statistics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateKind {
    /// Active side, Hello sent (SYN_SENT).
    HelloSent,
    /// Passive side, HelloAck sent, waiting for RTU (SYN_RECV).
    HelloAckSent,
    /// Both directions open.
    Established,
    /// Our DisConn queued or sent, the peer's not received.
    FinWait1,
    /// The peer's DisConn received, ours not queued.
    CloseWait,
    /// The peer's DisConn received first, ours queued or sent.
    LastAck,
    /// Both DisConns exchanged, ours first; the CM teardown runs.
    TimeWait,
    /// Over.
    Closed,
}

#[derive(Debug, Clone)]
pub(crate) enum State {
    HelloSent,
    HelloAckSent,
    Established,
    FinWait1 { disconn_sent: bool },
    CloseWait,
    LastAck { disconn_sent: bool },
    TimeWait,
    Closed { error: Option<ConnectionError> },
}

impl State {
    pub(crate) fn kind(&self) -> StateKind {
        match self {
            State::HelloSent => StateKind::HelloSent,
            State::HelloAckSent => StateKind::HelloAckSent,
            State::Established => StateKind::Established,
            State::FinWait1 { .. } => StateKind::FinWait1,
            State::CloseWait => StateKind::CloseWait,
            State::LastAck { .. } => StateKind::LastAck,
            State::TimeWait => StateKind::TimeWait,
            State::Closed { .. } => StateKind::Closed,
        }
    }

    /// Messages may be posted on the QP.
    pub(crate) fn can_transmit(&self) -> bool {
        matches!(
            self,
            State::Established | State::FinWait1 { .. } | State::CloseWait | State::LastAck { .. }
        )
    }

    /// The application may still queue bytes.
    pub(crate) fn send_open(&self) -> bool {
        matches!(self, State::Established | State::CloseWait)
    }

    /// The peer may still send stream bytes.
    pub(crate) fn peer_send_open(&self) -> bool {
        matches!(
            self,
            State::HelloAckSent | State::Established | State::FinWait1 { .. }
        )
    }

    /// The handshake is over.
    pub(crate) fn connected(&self) -> bool {
        !matches!(self, State::HelloSent | State::HelloAckSent)
    }

    pub(crate) fn error(&self) -> Option<ConnectionError> {
        match self {
            State::Closed { error } => *error,
            _ => None,
        }
    }
}
