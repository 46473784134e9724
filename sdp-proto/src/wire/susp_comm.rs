//! SuspComm (MID 0x0D, SCH): suspend communication and move to a new ServiceID
//! (SDP-WIRE.md §1.1).
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |                        BSDH (MID 0x0D)                        |  0-15
//! +---------------------------------------------------------------+
//! |                    new ServiceID (64 bits)                    | 16
//! |                                                               |
//! +---------------------------------------------------------------+
//! ```

use super::{Result, get_u64, need, put_u64};

mod field {
    use core::ops::Range;
    pub const SERVICE_ID: Range<usize> = 16..24;
}

/// Whole message length of a SuspComm.
pub const SUSP_COMM_LEN: usize = field::SERVICE_ID.end;

/// A view of a SuspComm message.
#[derive(Debug, Clone)]
pub struct SuspComm<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SuspComm<T> {
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        SuspComm { buffer }
    }
    /// Wraps after checking the length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need(buffer.as_ref().len(), SUSP_COMM_LEN, "sch.service_id")?;
        Ok(SuspComm { buffer })
    }
    /// The new ServiceID.
    pub fn service_id(&self) -> u64 {
        get_u64(self.buffer.as_ref(), field::SERVICE_ID.start)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SuspComm<T> {
    /// Sets the ServiceID.
    pub fn set_service_id(&mut self, v: u64) {
        put_u64(self.buffer.as_mut(), field::SERVICE_ID.start, v);
    }
}

/// The SCH value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SuspCommRepr {
    /// ServiceID to resume on.
    pub service_id: u64,
}

impl SuspCommRepr {
    /// Reads it.
    pub fn parse<T: AsRef<[u8]>>(v: &SuspComm<T>) -> Result<Self> {
        need(v.buffer.as_ref().len(), SUSP_COMM_LEN, "sch.service_id")?;
        Ok(SuspCommRepr {
            service_id: v.service_id(),
        })
    }
    /// BSDH + SCH: 24 bytes.
    pub const fn buffer_len(&self) -> usize {
        SUSP_COMM_LEN
    }
    /// Writes it.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut SuspComm<T>) {
        v.set_service_id(self.service_id);
    }
}
