//! SinkAvail (MID 0xFD): a sink buffer advertisement for a ZCopy write (SDP-WIRE.md §4.4).
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |                        BSDH (MID 0xFD)                        |  0-15
//! +---------------------------------------------------------------+
//! |                   Len: bytes in the sink buffer               | 16
//! +---------------------------------------------------------------+
//! |                              RKey                             | 20
//! +---------------------------------------------------------------+
//! |                       VAddr (64 bits)                         | 24
//! |                                                               |
//! +---------------------------------------------------------------+
//! |       NonDiscards: data-bearing messages the sink received    | 32
//! +---------------------------------------------------------------+
//! |     optional payload for the *other* direction ...            | 36
//! ```
//!
//! MLNX resets the connection on a SinkAvail (§4.4, §7.5); this crate never sends one and
//! treats one received as a protocol violation, but parses it faithfully.

use super::{Result, get_u32, get_u64, need, put_u32, put_u64};

mod field {
    use core::ops::Range;
    pub const LEN: Range<usize> = 16..20;
    pub const RKEY: Range<usize> = 20..24;
    pub const VADDR: Range<usize> = 24..32;
    pub const NON_DISCARDS: Range<usize> = 32..36;
    pub const PAYLOAD: usize = 36;
}

/// BSDH + SnkAH, the bytes before the payload.
pub const SINKAVAIL_HEADER_LEN: usize = field::PAYLOAD;

/// A view of a whole SinkAvail message.
#[derive(Debug, Clone)]
pub struct SinkAvail<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SinkAvail<T> {
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        SinkAvail { buffer }
    }
    /// Wraps after checking the BSDH and SnkAH fit.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need(
            buffer.as_ref().len(),
            SINKAVAIL_HEADER_LEN,
            "snkah.non_discards",
        )?;
        Ok(SinkAvail { buffer })
    }
    /// Len.
    pub fn len(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::LEN.start)
    }
    /// Whether Len is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// RKey.
    pub fn rkey(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::RKEY.start)
    }
    /// VAddr.
    pub fn vaddr(&self) -> u64 {
        get_u64(self.buffer.as_ref(), field::VADDR.start)
    }
    /// NonDiscards.
    pub fn non_discards(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::NON_DISCARDS.start)
    }
    /// Payload for the other direction.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SinkAvail<T> {
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
    /// Sets NonDiscards.
    pub fn set_non_discards(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::NON_DISCARDS.start, v);
    }
    /// Payload, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// The SnkAH value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SinkAvailRepr {
    /// Bytes in the sink buffer.
    pub len: u32,
    /// RKey.
    pub rkey: u32,
    /// VAddr.
    pub vaddr: u64,
    /// Data-bearing messages the sink had received.
    pub non_discards: u32,
}

impl SinkAvailRepr {
    /// Reads the SnkAH.
    pub fn parse<T: AsRef<[u8]>>(v: &SinkAvail<T>) -> Result<Self> {
        need(
            v.buffer.as_ref().len(),
            SINKAVAIL_HEADER_LEN,
            "snkah.non_discards",
        )?;
        Ok(SinkAvailRepr {
            len: v.len(),
            rkey: v.rkey(),
            vaddr: v.vaddr(),
            non_discards: v.non_discards(),
        })
    }
    /// BSDH + SnkAH: 36 bytes.
    pub const fn buffer_len(&self) -> usize {
        SINKAVAIL_HEADER_LEN
    }
    /// Writes the SnkAH.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut SinkAvail<T>) {
        v.set_len(self.len);
        v.set_rkey(self.rkey);
        v.set_vaddr(self.vaddr);
        v.set_non_discards(self.non_discards);
    }
}
