//! RdmaRdCompl (MID 0x06, RRCH) and RdmaWrCompl (MID 0x05, RWCH) (SDP-WIRE.md §1.1, §4.3–4.4).
//!
//! Both extended headers are one big-endian u32: the bytes moved by RDMA.
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |                   BSDH (MID 0x06 or 0x05)                     |  0-15
//! +---------------------------------------------------------------+
//! |       Len: bytes RDMA-read (inline bytes excluded) / written  | 16
//! +---------------------------------------------------------------+
//! ```
//!
//! An RdmaRdCompl answers the SrcAvail whose MSeq is ≤ its BSDH.MSeqAck (§3.1).

use super::{Result, get_u32, need, put_u32};

mod field {
    use core::ops::Range;
    pub const LEN: Range<usize> = 16..20;
}

/// Whole message length of an RdmaRdCompl/RdmaWrCompl.
pub const RDMA_COMPL_LEN: usize = field::LEN.end;

/// A view of an RdmaRdCompl or RdmaWrCompl message.
#[derive(Debug, Clone)]
pub struct RdmaCompl<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> RdmaCompl<T> {
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        RdmaCompl { buffer }
    }
    /// Wraps after checking the length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need(buffer.as_ref().len(), RDMA_COMPL_LEN, "rrch.len")?;
        Ok(RdmaCompl { buffer })
    }
    /// Bytes moved.
    pub fn len(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::LEN.start)
    }
    /// Whether no byte was moved.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> RdmaCompl<T> {
    /// Sets the byte count.
    pub fn set_len(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::LEN.start, v);
    }
}

/// The RRCH/RWCH value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RdmaComplRepr {
    /// Bytes moved by RDMA.
    pub len: u32,
}

impl RdmaComplRepr {
    /// Reads it.
    pub fn parse<T: AsRef<[u8]>>(v: &RdmaCompl<T>) -> Result<Self> {
        need(v.buffer.as_ref().len(), RDMA_COMPL_LEN, "rrch.len")?;
        Ok(RdmaComplRepr { len: v.len() })
    }
    /// BSDH + RRCH: 20 bytes.
    pub const fn buffer_len(&self) -> usize {
        RDMA_COMPL_LEN
    }
    /// Writes it.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut RdmaCompl<T>) {
        v.set_len(self.len);
    }
}
