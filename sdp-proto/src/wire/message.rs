//! A whole SDP message: BSDH + extended header + payload, as one receive buffer holds it.
//!
//! ```text
//! +------------------+----------------------------+---------------------+
//! | BSDH (16 bytes)  | extended header (by MID)   | payload (by MID)    |
//! +------------------+----------------------------+---------------------+
//! |<---------------------------- BSDH.Len ------------------------------>|
//! ```
//!
//! | MID  | body                  | ext. header | payload        |
//! |------|-----------------------|-------------|----------------|
//! | 0x00 | Hello                 | 76          | —              |
//! | 0x01 | HelloAck              | 180         | —              |
//! | 0x02 | DisConn               | —           | —              |
//! | 0x03 | AbortConn             | —           | —              |
//! | 0x04 | SendSM                | —           | —              |
//! | 0x05 | RdmaWrCompl           | 4           | —              |
//! | 0x06 | RdmaRdCompl           | 4           | —              |
//! | 0x07 | ModeChange            | 4           | —              |
//! | 0x08 | SrcAvailCancel        | —           | —              |
//! | 0x09 | SinkAvailCancel       | —           | —              |
//! | 0x0A | SinkCancelAck         | —           | —              |
//! | 0x0B | ChRcvBuf              | 4           | —              |
//! | 0x0C | ChRcvBufAck           | 4           | —              |
//! | 0x0D | SuspComm              | 8           | —              |
//! | 0x0E | SuspCommAck           | —           | —              |
//! | 0xFD | SinkAvail             | 20          | optional       |
//! | 0xFE | SrcAvail              | 16          | optional       |
//! | 0xFF | Data                  | —           | ULP bytes      |
//! | else | Unknown (preserved)   | ?           | kept raw       |
//!
//! Messages without payload must be exactly as long as their headers: extra bytes are an
//! error (`bsdh.len`), so `parse(emit(x)) == x` holds for every value.

use super::bsdh::{BSDH_LEN, Bsdh, BsdhRepr, Flags, MessageId};
use super::ch_rcv_buf::{CH_RCV_BUF_LEN, ChRcvBuf, ChRcvBufRepr};
use super::hello::{HELLO_LEN, Hello, HelloRepr};
use super::hello_ack::{HELLO_ACK_LEN, HelloAck, HelloAckRepr};
use super::mode_change::{MODE_CHANGE_LEN, ModeChange, ModeChangeRepr};
use super::rdma_compl::{RDMA_COMPL_LEN, RdmaCompl, RdmaComplRepr};
use super::sinkavail::{SINKAVAIL_HEADER_LEN, SinkAvail, SinkAvailRepr};
use super::srcavail::{SRCAVAIL_HEADER_LEN, SrcAvail, SrcAvailRepr};
use super::susp_comm::{SUSP_COMM_LEN, SuspComm, SuspCommRepr};
use super::{Result, WireError, need};

/// What follows the BSDH, typed by message ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// Hello (normally in the CM REQ, never on the QP).
    Hello(HelloRepr),
    /// HelloAck (normally in the CM REP, never on the QP).
    HelloAck(HelloAckRepr),
    /// Graceful half-close.
    DisConn,
    /// Abortive close.
    AbortConn,
    /// The sink rejects/aborts a SrcAvail.
    SendSm,
    /// Bytes RDMA-written.
    RdmaWrCompl(RdmaComplRepr),
    /// Bytes RDMA-read.
    RdmaRdCompl(RdmaComplRepr),
    /// Mode change.
    ModeChange(ModeChangeRepr),
    /// The source withdraws its SrcAvail.
    SrcAvailCancel,
    /// The sink withdraws its SinkAvail.
    SinkAvailCancel,
    /// Answer to SinkAvailCancel.
    SinkCancelAck,
    /// Resize request.
    ChRcvBuf(ChRcvBufRepr),
    /// Resize answer.
    ChRcvBufAck(ChRcvBufRepr),
    /// Suspend communication.
    SuspComm(SuspCommRepr),
    /// Answer to SuspComm.
    SuspCommAck,
    /// Sink advertisement, with optional data for the other direction.
    SinkAvail {
        /// SnkAH.
        header: SinkAvailRepr,
        /// Payload.
        payload: &'a [u8],
    },
    /// Source advertisement, with the inline first bytes of the buffer.
    SrcAvail {
        /// SrcAH.
        header: SrcAvailRepr,
        /// Inline payload.
        payload: &'a [u8],
    },
    /// Stream bytes (empty = credit update).
    Data(&'a [u8]),
    /// An ID this crate does not know; everything after the BSDH, raw.
    Unknown {
        /// The MID byte.
        mid: u8,
        /// Bytes after the BSDH.
        rest: &'a [u8],
    },
}

impl Body<'_> {
    /// The message ID of this body.
    pub fn mid(&self) -> MessageId {
        match self {
            Body::Hello(_) => MessageId::Hello,
            Body::HelloAck(_) => MessageId::HelloAck,
            Body::DisConn => MessageId::DisConn,
            Body::AbortConn => MessageId::AbortConn,
            Body::SendSm => MessageId::SendSm,
            Body::RdmaWrCompl(_) => MessageId::RdmaWrCompl,
            Body::RdmaRdCompl(_) => MessageId::RdmaRdCompl,
            Body::ModeChange(_) => MessageId::ModeChange,
            Body::SrcAvailCancel => MessageId::SrcAvailCancel,
            Body::SinkAvailCancel => MessageId::SinkAvailCancel,
            Body::SinkCancelAck => MessageId::SinkCancelAck,
            Body::ChRcvBuf(_) => MessageId::ChRcvBuf,
            Body::ChRcvBufAck(_) => MessageId::ChRcvBufAck,
            Body::SuspComm(_) => MessageId::SuspComm,
            Body::SuspCommAck => MessageId::SuspCommAck,
            Body::SinkAvail { .. } => MessageId::SinkAvail,
            Body::SrcAvail { .. } => MessageId::SrcAvail,
            Body::Data(_) => MessageId::Data,
            Body::Unknown { mid, .. } => MessageId::from(*mid),
        }
    }

    /// Whole message length with this body.
    pub fn message_len(&self) -> usize {
        match self {
            Body::Hello(_) => HELLO_LEN,
            Body::HelloAck(_) => HELLO_ACK_LEN,
            Body::DisConn
            | Body::AbortConn
            | Body::SendSm
            | Body::SrcAvailCancel
            | Body::SinkAvailCancel
            | Body::SinkCancelAck
            | Body::SuspCommAck => BSDH_LEN,
            Body::RdmaWrCompl(_) | Body::RdmaRdCompl(_) => RDMA_COMPL_LEN,
            Body::ModeChange(_) => MODE_CHANGE_LEN,
            Body::ChRcvBuf(_) | Body::ChRcvBufAck(_) => CH_RCV_BUF_LEN,
            Body::SuspComm(_) => SUSP_COMM_LEN,
            Body::SinkAvail { payload, .. } => SINKAVAIL_HEADER_LEN + payload.len(),
            Body::SrcAvail { payload, .. } => SRCAVAIL_HEADER_LEN + payload.len(),
            Body::Data(p) => BSDH_LEN + p.len(),
            Body::Unknown { rest, .. } => BSDH_LEN + rest.len(),
        }
    }
}

/// One whole SDP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRepr<'a> {
    /// The BSDH as received or to be sent.
    pub bsdh: BsdhRepr,
    /// The rest.
    pub body: Body<'a>,
}

fn exact(bytes: &[u8], len: usize, field: &'static str) -> Result<()> {
    need(bytes.len(), len, field)?;
    if bytes.len() != len {
        return Err(WireError::Invalid {
            field: "bsdh.len",
            value: bytes.len() as u64,
        });
    }
    Ok(())
}

impl<'a> MessageRepr<'a> {
    /// A message with BSDH.MID and BSDH.Len derived from the body.
    pub fn new(flags: Flags, bufs: u16, mseq: u32, mseq_ack: u32, body: Body<'a>) -> Self {
        MessageRepr {
            bsdh: BsdhRepr {
                mid: body.mid(),
                flags,
                bufs,
                len: body.message_len() as u32,
                mseq,
                mseq_ack,
            },
            body,
        }
    }

    /// Parses one received message. BSDH.Len must equal `bytes.len()`.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let bsdh = BsdhRepr::parse(&Bsdh::new_checked(bytes)?)?;
        if bsdh.len as usize != bytes.len() {
            return Err(WireError::LengthMismatch {
                declared: bsdh.len,
                actual: bytes.len(),
            });
        }
        let body = match bsdh.mid {
            MessageId::Hello => Body::Hello(HelloRepr::parse(&Hello::new_checked(bytes)?)?),
            MessageId::HelloAck => {
                Body::HelloAck(HelloAckRepr::parse(&HelloAck::new_checked(bytes)?)?)
            }
            MessageId::DisConn => {
                exact(bytes, BSDH_LEN, "bsdh")?;
                Body::DisConn
            }
            MessageId::AbortConn => {
                exact(bytes, BSDH_LEN, "bsdh")?;
                Body::AbortConn
            }
            MessageId::SendSm => {
                exact(bytes, BSDH_LEN, "bsdh")?;
                Body::SendSm
            }
            MessageId::SrcAvailCancel => {
                exact(bytes, BSDH_LEN, "bsdh")?;
                Body::SrcAvailCancel
            }
            MessageId::SinkAvailCancel => {
                exact(bytes, BSDH_LEN, "bsdh")?;
                Body::SinkAvailCancel
            }
            MessageId::SinkCancelAck => {
                exact(bytes, BSDH_LEN, "bsdh")?;
                Body::SinkCancelAck
            }
            MessageId::SuspCommAck => {
                exact(bytes, BSDH_LEN, "bsdh")?;
                Body::SuspCommAck
            }
            MessageId::RdmaWrCompl => {
                exact(bytes, RDMA_COMPL_LEN, "rwch.len")?;
                Body::RdmaWrCompl(RdmaComplRepr::parse(&RdmaCompl::new_checked(bytes)?)?)
            }
            MessageId::RdmaRdCompl => {
                exact(bytes, RDMA_COMPL_LEN, "rrch.len")?;
                Body::RdmaRdCompl(RdmaComplRepr::parse(&RdmaCompl::new_checked(bytes)?)?)
            }
            MessageId::ModeChange => {
                exact(bytes, MODE_CHANGE_LEN, "mch.reserved")?;
                Body::ModeChange(ModeChangeRepr::parse(&ModeChange::new_checked(bytes)?)?)
            }
            MessageId::ChRcvBuf => {
                exact(bytes, CH_RCV_BUF_LEN, "crbh.size")?;
                Body::ChRcvBuf(ChRcvBufRepr::parse(&ChRcvBuf::new_checked(bytes)?)?)
            }
            MessageId::ChRcvBufAck => {
                exact(bytes, CH_RCV_BUF_LEN, "crbah.size")?;
                Body::ChRcvBufAck(ChRcvBufRepr::parse(&ChRcvBuf::new_checked(bytes)?)?)
            }
            MessageId::SuspComm => {
                exact(bytes, SUSP_COMM_LEN, "sch.service_id")?;
                Body::SuspComm(SuspCommRepr::parse(&SuspComm::new_checked(bytes)?)?)
            }
            MessageId::SinkAvail => {
                let v = SinkAvail::new_checked(bytes)?;
                Body::SinkAvail {
                    header: SinkAvailRepr::parse(&v)?,
                    payload: &bytes[SINKAVAIL_HEADER_LEN..],
                }
            }
            MessageId::SrcAvail => {
                let v = SrcAvail::new_checked(bytes)?;
                Body::SrcAvail {
                    header: SrcAvailRepr::parse(&v)?,
                    payload: &bytes[SRCAVAIL_HEADER_LEN..],
                }
            }
            MessageId::Data => Body::Data(&bytes[BSDH_LEN..]),
            MessageId::Unknown(mid) => Body::Unknown {
                mid,
                rest: &bytes[BSDH_LEN..],
            },
        };
        Ok(MessageRepr { bsdh, body })
    }

    /// Bytes needed to emit this message.
    pub fn buffer_len(&self) -> usize {
        self.body.message_len()
    }

    /// Writes the message into the start of `buf`; returns the length written.
    /// The BSDH is written exactly as `self.bsdh` holds it.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        need(buf.len(), len, "emit buffer")?;
        let out = &mut buf[..len];
        match &self.body {
            Body::Hello(h) => h.emit(&mut Hello::new_unchecked(&mut *out)),
            Body::HelloAck(h) => h.emit(&mut HelloAck::new_unchecked(&mut *out)),
            Body::DisConn
            | Body::AbortConn
            | Body::SendSm
            | Body::SrcAvailCancel
            | Body::SinkAvailCancel
            | Body::SinkCancelAck
            | Body::SuspCommAck => {}
            Body::RdmaWrCompl(r) | Body::RdmaRdCompl(r) => {
                r.emit(&mut RdmaCompl::new_unchecked(&mut *out))
            }
            Body::ModeChange(m) => m.emit(&mut ModeChange::new_unchecked(&mut *out)),
            Body::ChRcvBuf(c) | Body::ChRcvBufAck(c) => {
                c.emit(&mut ChRcvBuf::new_unchecked(&mut *out))
            }
            Body::SuspComm(s) => s.emit(&mut SuspComm::new_unchecked(&mut *out)),
            Body::SinkAvail { header, payload } => {
                let mut v = SinkAvail::new_unchecked(&mut *out);
                header.emit(&mut v);
                v.payload_mut().copy_from_slice(payload);
            }
            Body::SrcAvail { header, payload } => {
                let mut v = SrcAvail::new_unchecked(&mut *out);
                header.emit(&mut v);
                v.payload_mut().copy_from_slice(payload);
            }
            Body::Data(p) => out[BSDH_LEN..].copy_from_slice(p),
            Body::Unknown { rest, .. } => out[BSDH_LEN..].copy_from_slice(rest),
        }
        self.bsdh
            .emit(&mut Bsdh::new_unchecked(&mut out[..BSDH_LEN]));
        Ok(len)
    }

    /// Emits into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.buffer_len()];
        // The buffer is exactly buffer_len() long, so emit cannot fail.
        let _ = self.emit(&mut v);
        v
    }
}
