//! SrcAvail (MID 0xFE): a source buffer advertisement for a ZCopy read (SDP-WIRE.md §4.3).
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |                        BSDH (MID 0xFE)                        |  0-15
//! +---------------------------------------------------------------+
//! |        Len: bytes in the source buffer, inline part included  | 16
//! +---------------------------------------------------------------+
//! |                              RKey                             | 20
//! +---------------------------------------------------------------+
//! |                       VAddr (64 bits)                         | 24
//! |                                                               |
//! +---------------------------------------------------------------+
//! |   inline payload: the first bytes of that same buffer ...     | 32
//! ```

use super::{Result, get_u32, get_u64, need, put_u32, put_u64};

mod field {
    use core::ops::Range;
    pub const LEN: Range<usize> = 16..20;
    pub const RKEY: Range<usize> = 20..24;
    pub const VADDR: Range<usize> = 24..32;
    pub const PAYLOAD: usize = 32;
}

/// BSDH + SrcAH, the bytes before the inline payload.
pub const SRCAVAIL_HEADER_LEN: usize = field::PAYLOAD;

/// A view of a whole SrcAvail message.
#[derive(Debug, Clone)]
pub struct SrcAvail<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SrcAvail<T> {
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        SrcAvail { buffer }
    }
    /// Wraps after checking the BSDH and SrcAH fit.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need(buffer.as_ref().len(), SRCAVAIL_HEADER_LEN, "srcah.vaddr")?;
        Ok(SrcAvail { buffer })
    }
    /// Len: bytes in the advertised buffer, inline bytes included.
    pub fn len(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::LEN.start)
    }
    /// Whether Len is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// RKey of the source buffer.
    pub fn rkey(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::RKEY.start)
    }
    /// RDMA address of the buffer's first byte.
    pub fn vaddr(&self) -> u64 {
        get_u64(self.buffer.as_ref(), field::VADDR.start)
    }
    /// Inline payload.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SrcAvail<T> {
    /// Sets Len.
    pub fn set_len(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::LEN.start, v);
    }
    /// Sets RKey.
    pub fn set_rkey(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::RKEY.start, v);
    }
    /// Sets VAddr.
    pub fn set_vaddr(&mut self, v: u64) {
        put_u64(self.buffer.as_mut(), field::VADDR.start, v);
    }
    /// Inline payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// The SrcAH value (the inline payload travels beside it in [`super::Body::SrcAvail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SrcAvailRepr {
    /// Bytes in the advertised buffer, inline bytes included.
    pub len: u32,
    /// RKey.
    pub rkey: u32,
    /// VAddr.
    pub vaddr: u64,
}

impl SrcAvailRepr {
    /// Reads the SrcAH.
    pub fn parse<T: AsRef<[u8]>>(v: &SrcAvail<T>) -> Result<Self> {
        need(v.buffer.as_ref().len(), SRCAVAIL_HEADER_LEN, "srcah.vaddr")?;
        Ok(SrcAvailRepr {
            len: v.len(),
            rkey: v.rkey(),
            vaddr: v.vaddr(),
        })
    }
    /// BSDH + SrcAH: 32 bytes.
    pub const fn buffer_len(&self) -> usize {
        SRCAVAIL_HEADER_LEN
    }
    /// Writes the SrcAH (not the BSDH, not the payload).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut SrcAvail<T>) {
        v.set_len(self.len);
        v.set_rkey(self.rkey);
        v.set_vaddr(self.vaddr);
    }
}
