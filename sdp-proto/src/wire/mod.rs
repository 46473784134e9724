//! SDP wire formats (SDP-WIRE.md §§1–4), smoltcp style.
//!
//! Every message is a 16-byte BSDH ([`bsdh`]) followed by an extended header chosen by the
//! message ID and then an optional payload. Each module offers
//!
//! - a *view* over a byte buffer (`Bsdh<T: AsRef<[u8]>>`, `SrcAvail<T>`, …) whose
//!   constructor `new_checked` validates the length once, after which the field accessors
//!   cannot fail (offsets live in a private `field` module);
//! - a *value* type (`BsdhRepr`, `SrcAvailRepr`, …) with `parse`, `emit` and `buffer_len`.
//!
//! [`MessageRepr`] ties them together: it parses one whole message (one receive buffer) into
//! a BSDH plus a typed [`Body`], and emits one. Unknown message IDs are preserved as
//! [`Body::Unknown`], never rejected by the parser; the connection decides what to do.
//!
//! Every multi-byte field is big-endian. Malformed input returns a [`WireError`] naming the
//! field; no parser panics on any input (fuzzed, see `fuzz/`).

pub mod bsdh;
pub mod ch_rcv_buf;
pub mod hello;
pub mod hello_ack;
pub mod message;
pub mod mode_change;
pub mod rdma_compl;
pub mod sinkavail;
pub mod srcavail;
pub mod susp_comm;

use core::fmt;

pub use bsdh::{BSDH_LEN, Bsdh, BsdhRepr, Flags, MessageId};
pub use ch_rcv_buf::{ChRcvBuf, ChRcvBufRepr};
pub use hello::{HELLO_LEN, Hello, HelloRepr, IpAddrs, Version};
pub use hello_ack::{HELLO_ACK_LEN, HelloAck, HelloAckRepr};
pub use message::{Body, MessageRepr};
pub use mode_change::{ModeChange, ModeChangeRepr, ModeHalf, TransferMode};
pub use rdma_compl::{RdmaCompl, RdmaComplRepr};
pub use sinkavail::{SinkAvail, SinkAvailRepr};
pub use srcavail::{SrcAvail, SrcAvailRepr};
pub use susp_comm::{SuspComm, SuspCommRepr};

/// Why bytes could not be read as an SDP message. Each variant names the field at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The buffer ends before `field` does.
    Truncated {
        /// The field that does not fit, e.g. `"srcah.vaddr"`.
        field: &'static str,
        /// Bytes needed to hold the header up to and including that field.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// BSDH.Len differs from the number of bytes received (SDP-WIRE.md §7.12).
    LengthMismatch {
        /// The value of BSDH.Len.
        declared: u32,
        /// The length of the buffer.
        actual: usize,
    },
    /// A field holds a value the format does not allow.
    Invalid {
        /// The field, e.g. `"hh.ipv"`.
        field: &'static str,
        /// The offending value.
        value: u64,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { field, needed, got } => {
                write!(f, "truncated at {field}: need {needed} bytes, have {got}")
            }
            WireError::LengthMismatch { declared, actual } => {
                write!(
                    f,
                    "bsdh.len says {declared} bytes but the message has {actual}"
                )
            }
            WireError::Invalid { field, value } => write!(f, "invalid {field}: {value:#x}"),
        }
    }
}

impl std::error::Error for WireError {}

/// Result of a wire operation.
pub type Result<T> = core::result::Result<T, WireError>;

// Big-endian accessors. Callers index inside a length checked by `new_checked`.
#[inline]
pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
#[inline]
pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
#[inline]
pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}
#[inline]
pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
#[inline]
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
#[inline]
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Checks that `len` bytes hold a header ending at `needed`, naming `field` otherwise.
#[inline]
pub(crate) fn need(len: usize, needed: usize, field: &'static str) -> Result<()> {
    if len < needed {
        Err(WireError::Truncated {
            field,
            needed,
            got: len,
        })
    } else {
        Ok(())
    }
}

/// Parses hex with optional whitespace; test helper shared by the wire tests.
#[cfg(test)]
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|c| c.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|p| {
            let h = (p[0] as char).to_digit(16).unwrap();
            let l = (p[1] as char).to_digit(16).unwrap();
            (h * 16 + l) as u8
        })
        .collect()
}
