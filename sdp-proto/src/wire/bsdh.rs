//! BSDH, the Base Sockets Direct Header (SDP-WIRE.md §1).
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//! +---------------+---------------+-------------------------------+
//! |      MID      |     Flags     |             Bufs              |  0
//! +---------------+---------------+-------------------------------+
//! |                              Len                              |  4
//! +---------------------------------------------------------------+
//! |                             MSeq                              |  8
//! +---------------------------------------------------------------+
//! |                            MSeqAck                            | 12
//! +---------------------------------------------------------------+
//! Flags: bit 0 OOB_PRES, bit 1 OOB_PEND, bit 2 REQ_PIPE, bits 3-7 reserved.
//! ```
//!
//! Bufs is an absolute count of receive buffers the sender has posted, not an increment
//! (§1, §3.1). Len is the whole message: BSDH + extended header + payload.

use super::{Result, get_u16, get_u32, need, put_u16, put_u32};
use core::fmt;

mod field {
    use core::ops::Range;
    pub const MID: usize = 0;
    pub const FLAGS: usize = 1;
    pub const BUFS: Range<usize> = 2..4;
    pub const LEN: Range<usize> = 4..8;
    pub const MSEQ: Range<usize> = 8..12;
    pub const MSEQ_ACK: Range<usize> = 12..16;
}

/// Length of the BSDH in bytes.
pub const BSDH_LEN: usize = field::MSEQ_ACK.end;

/// SDP message ID (SDP-WIRE.md table 1.1). Unknown values are kept, not rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageId {
    /// 0x00, carried in the CM REQ, never on the QP.
    Hello,
    /// 0x01, carried in the CM REP, never on the QP.
    HelloAck,
    /// 0x02, graceful half-close (TCP FIN).
    DisConn,
    /// 0x03, abortive close after a DisConn.
    AbortConn,
    /// 0x04, the sink rejects or aborts a SrcAvail.
    SendSm,
    /// 0x05, bytes RDMA-written into a SinkAvail.
    RdmaWrCompl,
    /// 0x06, bytes RDMA-read from a SrcAvail.
    RdmaRdCompl,
    /// 0x07, change a half-connection's mode.
    ModeChange,
    /// 0x08, the source withdraws its SrcAvail.
    SrcAvailCancel,
    /// 0x09, the sink withdraws its SinkAvail.
    SinkAvailCancel,
    /// 0x0A, answer to SinkAvailCancel.
    SinkCancelAck,
    /// 0x0B, ask the peer to resize its receive buffers.
    ChRcvBuf,
    /// 0x0C, answer to ChRcvBuf with the actual size.
    ChRcvBufAck,
    /// 0x0D, suspend communication (move to a new ServiceID).
    SuspComm,
    /// 0x0E, answer to SuspComm.
    SuspCommAck,
    /// 0xFD, a sink buffer advertisement.
    SinkAvail,
    /// 0xFE, a source buffer advertisement.
    SrcAvail,
    /// 0xFF, stream bytes; empty = pure credit update.
    Data,
    /// Any other value, preserved.
    Unknown(u8),
}

impl From<u8> for MessageId {
    fn from(v: u8) -> Self {
        match v {
            0x00 => MessageId::Hello,
            0x01 => MessageId::HelloAck,
            0x02 => MessageId::DisConn,
            0x03 => MessageId::AbortConn,
            0x04 => MessageId::SendSm,
            0x05 => MessageId::RdmaWrCompl,
            0x06 => MessageId::RdmaRdCompl,
            0x07 => MessageId::ModeChange,
            0x08 => MessageId::SrcAvailCancel,
            0x09 => MessageId::SinkAvailCancel,
            0x0A => MessageId::SinkCancelAck,
            0x0B => MessageId::ChRcvBuf,
            0x0C => MessageId::ChRcvBufAck,
            0x0D => MessageId::SuspComm,
            0x0E => MessageId::SuspCommAck,
            0xFD => MessageId::SinkAvail,
            0xFE => MessageId::SrcAvail,
            0xFF => MessageId::Data,
            other => MessageId::Unknown(other),
        }
    }
}

impl From<MessageId> for u8 {
    fn from(m: MessageId) -> u8 {
        match m {
            MessageId::Hello => 0x00,
            MessageId::HelloAck => 0x01,
            MessageId::DisConn => 0x02,
            MessageId::AbortConn => 0x03,
            MessageId::SendSm => 0x04,
            MessageId::RdmaWrCompl => 0x05,
            MessageId::RdmaRdCompl => 0x06,
            MessageId::ModeChange => 0x07,
            MessageId::SrcAvailCancel => 0x08,
            MessageId::SinkAvailCancel => 0x09,
            MessageId::SinkCancelAck => 0x0A,
            MessageId::ChRcvBuf => 0x0B,
            MessageId::ChRcvBufAck => 0x0C,
            MessageId::SuspComm => 0x0D,
            MessageId::SuspCommAck => 0x0E,
            MessageId::SinkAvail => 0xFD,
            MessageId::SrcAvail => 0xFE,
            MessageId::Data => 0xFF,
            MessageId::Unknown(v) => v,
        }
    }
}

impl MessageId {
    /// Builds the ID from its wire value, normalising `Unknown` of a known value.
    pub fn normalized(self) -> Self {
        MessageId::from(u8::from(self))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageId::Unknown(v) => write!(f, "Unknown({v:#04x})"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// BSDH flags byte (§1.2). Reserved bits are preserved as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u8);

impl Flags {
    /// The last payload byte of this Data message is the urgent byte.
    pub const OOB_PRES: Flags = Flags(1 << 0);
    /// The sender's application has sent urgent data (maybe not in this message).
    pub const OOB_PEND: Flags = Flags(1 << 1);
    /// The sink asks the source to go to Pipelined mode (RdmaRdCompl only).
    pub const REQ_PIPE: Flags = Flags(1 << 2);
    /// No flag.
    pub const EMPTY: Flags = Flags(0);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Both sets of bits.
    pub fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
}

/// A read/write view of a BSDH at the start of a buffer.
#[derive(Debug, Clone)]
pub struct Bsdh<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Bsdh<T> {
    /// Wraps a buffer without checking its length; accessors may panic if it is short.
    pub fn new_unchecked(buffer: T) -> Self {
        Bsdh { buffer }
    }

    /// Wraps a buffer after checking that it holds a whole BSDH.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = Self::new_unchecked(buffer);
        b.check_len()?;
        Ok(b)
    }

    /// Checks the buffer holds the 16 bytes of a BSDH.
    pub fn check_len(&self) -> Result<()> {
        need(self.buffer.as_ref().len(), BSDH_LEN, "bsdh.mseq_ack")
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// MID.
    pub fn mid(&self) -> MessageId {
        MessageId::from(self.buffer.as_ref()[field::MID])
    }
    /// Flags.
    pub fn flags(&self) -> Flags {
        Flags(self.buffer.as_ref()[field::FLAGS])
    }
    /// Bufs: receive buffers the sender has posted.
    pub fn bufs(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::BUFS.start)
    }
    /// Len: the whole message length.
    pub fn len(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::LEN.start)
    }
    /// Whether Len is zero (never valid; for clippy's len/is_empty pairing).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// MSeq.
    pub fn mseq(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::MSEQ.start)
    }
    /// MSeqAck.
    pub fn mseq_ack(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::MSEQ_ACK.start)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Bsdh<T> {
    /// Sets MID.
    pub fn set_mid(&mut self, v: MessageId) {
        self.buffer.as_mut()[field::MID] = v.into();
    }
    /// Sets Flags.
    pub fn set_flags(&mut self, v: Flags) {
        self.buffer.as_mut()[field::FLAGS] = v.0;
    }
    /// Sets Bufs.
    pub fn set_bufs(&mut self, v: u16) {
        put_u16(self.buffer.as_mut(), field::BUFS.start, v);
    }
    /// Sets Len.
    pub fn set_len(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::LEN.start, v);
    }
    /// Sets MSeq.
    pub fn set_mseq(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::MSEQ.start, v);
    }
    /// Sets MSeqAck.
    pub fn set_mseq_ack(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::MSEQ_ACK.start, v);
    }
}

/// The value of a BSDH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BsdhRepr {
    /// Message ID.
    pub mid: MessageId,
    /// Flags.
    pub flags: Flags,
    /// Receive buffers the sender has posted (absolute).
    pub bufs: u16,
    /// Whole message length.
    pub len: u32,
    /// Sender's sequence number of this message.
    pub mseq: u32,
    /// Last MSeq the sender received.
    pub mseq_ack: u32,
}

impl BsdhRepr {
    /// Reads a checked view.
    pub fn parse<T: AsRef<[u8]>>(b: &Bsdh<T>) -> Result<BsdhRepr> {
        b.check_len()?;
        Ok(BsdhRepr {
            mid: b.mid(),
            flags: b.flags(),
            bufs: b.bufs(),
            len: b.len(),
            mseq: b.mseq(),
            mseq_ack: b.mseq_ack(),
        })
    }

    /// Bytes needed to emit: always 16.
    pub const fn buffer_len(&self) -> usize {
        BSDH_LEN
    }

    /// Writes the header into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, b: &mut Bsdh<T>) {
        b.set_mid(self.mid);
        b.set_flags(self.flags);
        b.set_bufs(self.bufs);
        b.set_len(self.len);
        b.set_mseq(self.mseq);
        b.set_mseq_ack(self.mseq_ack);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{WireError, hex};

    // A Data message header: 1000 bytes total, OOB_PRES|OOB_PEND, 9 buffers, MSeq 7, ack 5.
    const DATA: &str = "ff 03 0009 000003e8 00000007 00000005";

    #[test]
    fn bsdh_vector_parses() {
        let bytes = hex(DATA);
        let v = Bsdh::new_checked(&bytes[..]).unwrap();
        let r = BsdhRepr::parse(&v).unwrap();
        assert_eq!(r.mid, MessageId::Data);
        assert!(r.flags.contains(Flags::OOB_PRES));
        assert!(r.flags.contains(Flags::OOB_PEND));
        assert!(!r.flags.contains(Flags::REQ_PIPE));
        assert_eq!((r.bufs, r.len, r.mseq, r.mseq_ack), (9, 1000, 7, 5));
    }

    #[test]
    fn bsdh_vector_emits_byte_exact() {
        let r = BsdhRepr {
            mid: MessageId::Data,
            flags: Flags::OOB_PRES.union(Flags::OOB_PEND),
            bufs: 9,
            len: 1000,
            mseq: 7,
            mseq_ack: 5,
        };
        let mut out = [0u8; BSDH_LEN];
        r.emit(&mut Bsdh::new_unchecked(&mut out[..]));
        assert_eq!(out.to_vec(), hex(DATA));
    }

    #[test]
    fn bsdh_short_buffer_names_field() {
        let e = Bsdh::new_checked(&[0u8; 15][..]).unwrap_err();
        assert_eq!(
            e,
            WireError::Truncated {
                field: "bsdh.mseq_ack",
                needed: 16,
                got: 15
            }
        );
    }

    #[test]
    fn message_id_every_value_round_trips() {
        for v in 0..=255u8 {
            assert_eq!(u8::from(MessageId::from(v)), v);
        }
        assert_eq!(MessageId::from(0x0F), MessageId::Unknown(0x0F));
        assert_eq!(MessageId::from(0xFD), MessageId::SinkAvail);
    }

    #[test]
    fn flags_wire_bits_match_table() {
        assert_eq!(Flags::OOB_PRES.0, 0x01);
        assert_eq!(Flags::OOB_PEND.0, 0x02);
        assert_eq!(Flags::REQ_PIPE.0, 0x04);
    }
}
