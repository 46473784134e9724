//! ChRcvBuf (MID 0x0B, CRBH) and ChRcvBufAck (MID 0x0C, CRBAH) (SDP-WIRE.md §3.5).
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |                    BSDH (MID 0x0B or 0x0C)                    |  0-15
//! +---------------------------------------------------------------+
//! |      Size: desired (ChRcvBuf) or actual (ChRcvBufAck)         | 16
//! +---------------------------------------------------------------+
//! ```
//!
//! LINUX: MLNX's ack carries the payload size without the BSDH, while Hello sizes include
//! it (§7.9); the connection keeps a 16-byte margin.

use super::{Result, get_u32, need, put_u32};

mod field {
    use core::ops::Range;
    pub const SIZE: Range<usize> = 16..20;
}

/// Whole message length of a ChRcvBuf/ChRcvBufAck.
pub const CH_RCV_BUF_LEN: usize = field::SIZE.end;

/// A view of a ChRcvBuf or ChRcvBufAck message.
#[derive(Debug, Clone)]
pub struct ChRcvBuf<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ChRcvBuf<T> {
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        ChRcvBuf { buffer }
    }
    /// Wraps after checking the length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need(buffer.as_ref().len(), CH_RCV_BUF_LEN, "crbh.size")?;
        Ok(ChRcvBuf { buffer })
    }
    /// The size.
    pub fn size(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::SIZE.start)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ChRcvBuf<T> {
    /// Sets the size.
    pub fn set_size(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::SIZE.start, v);
    }
}

/// The CRBH/CRBAH value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChRcvBufRepr {
    /// Buffer size in bytes.
    pub size: u32,
}

impl ChRcvBufRepr {
    /// Reads it.
    pub fn parse<T: AsRef<[u8]>>(v: &ChRcvBuf<T>) -> Result<Self> {
        need(v.buffer.as_ref().len(), CH_RCV_BUF_LEN, "crbh.size")?;
        Ok(ChRcvBufRepr { size: v.size() })
    }
    /// BSDH + CRBH: 20 bytes.
    pub const fn buffer_len(&self) -> usize {
        CH_RCV_BUF_LEN
    }
    /// Writes it.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut ChRcvBuf<T>) {
        v.set_size(self.size);
    }
}
