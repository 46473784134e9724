//! ModeChange (MID 0x07, MCH, 4 bytes) (SDP-WIRE.md §4.6).
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |                        BSDH (MID 0x07)                        |  0-15
//! +-+-----+-------+---------------+---------------+---------------+
//! |S| mode| rsvd  |              reserved (3 bytes)               | 16
//! +-+-----+-------+-----------------------------------------------+
//! S (bit 7): 1 = change your send half, 0 = your receive half.
//! mode (bits 6:4): 0 Buffered, 1 Combined, 2 Pipelined; other values are invalid.
//! ```

use super::{Result, WireError, need};

mod field {
    use core::ops::Range;
    pub const MODE: usize = 16;
    pub const RESERVED: Range<usize> = 17..20;
}

/// Whole message length of a ModeChange.
pub const MODE_CHANGE_LEN: usize = field::RESERVED.end;

/// Per-half-connection data transfer mode (§4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferMode {
    /// Data messages only.
    Buffered,
    /// Data plus at most one SrcAvail with inline data.
    Combined,
    /// Several SrcAvails, SinkAvails.
    Pipelined,
}

/// Which half of the *receiver's* connection the ModeChange addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModeHalf {
    /// Bit 7 clear.
    Receive,
    /// Bit 7 set.
    Send,
}

/// A view of a ModeChange message.
#[derive(Debug, Clone)]
pub struct ModeChange<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ModeChange<T> {
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        ModeChange { buffer }
    }
    /// Wraps after checking the length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        need(buffer.as_ref().len(), MODE_CHANGE_LEN, "mch.reserved")?;
        Ok(ModeChange { buffer })
    }
    /// Byte 0 of the MCH, raw.
    pub fn mode_byte(&self) -> u8 {
        self.buffer.as_ref()[field::MODE]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ModeChange<T> {
    /// Sets byte 0 and zeroes the reserved bytes.
    pub fn set_mode_byte(&mut self, v: u8) {
        let b = self.buffer.as_mut();
        b[field::MODE] = v;
        b[field::RESERVED].fill(0);
    }
}

/// The MCH value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModeChangeRepr {
    /// Half addressed.
    pub half: ModeHalf,
    /// New mode.
    pub mode: TransferMode,
}

impl ModeChangeRepr {
    /// Reads it; a mode value above 2 is invalid.
    pub fn parse<T: AsRef<[u8]>>(v: &ModeChange<T>) -> Result<Self> {
        need(v.buffer.as_ref().len(), MODE_CHANGE_LEN, "mch.reserved")?;
        let b = v.mode_byte();
        let half = if b & 0x80 != 0 {
            ModeHalf::Send
        } else {
            ModeHalf::Receive
        };
        let mode = match (b >> 4) & 0x7 {
            0 => TransferMode::Buffered,
            1 => TransferMode::Combined,
            2 => TransferMode::Pipelined,
            other => {
                return Err(WireError::Invalid {
                    field: "mch.mode",
                    value: other.into(),
                });
            }
        };
        Ok(ModeChangeRepr { half, mode })
    }
    /// Byte 0 as sent.
    pub fn mode_byte(&self) -> u8 {
        let s = match self.half {
            ModeHalf::Send => 0x80,
            ModeHalf::Receive => 0,
        };
        let m = match self.mode {
            TransferMode::Buffered => 0,
            TransferMode::Combined => 1,
            TransferMode::Pipelined => 2,
        };
        s | (m << 4)
    }
    /// BSDH + MCH: 20 bytes.
    pub const fn buffer_len(&self) -> usize {
        MODE_CHANGE_LEN
    }
    /// Writes it.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut ModeChange<T>) {
        v.set_mode_byte(self.mode_byte());
    }
}
