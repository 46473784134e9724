//! HelloAck (HAH), the 196-byte message carried in the CM REP private data (SDP-WIRE.md §2.3).
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |                 BSDH (MID 0x01, Len 196, MSeq 0, MSeqAck 0)   |  0-15
//! +---------------+---------------+---------------+---------------+
//! | MajV  | MinV  | IPV/Cap (0)   |   reserved    |  MaxAdverts   | 16
//! +---------------+---------------+---------------+---------------+
//! |                ActRcvSz (incl. the 16-byte BSDH)              | 20
//! +---------------------------------------------------------------+
//! |                     reserved, zero (172 bytes)                | 24-195
//! +---------------------------------------------------------------+
//! ```
//!
//! Byte 17 is MLNX's `ipv_cap` and OPENIB's reserved; both write 0 (§7.2). It is kept raw.

use super::bsdh::{BSDH_LEN, Bsdh, BsdhRepr, Flags, MessageId};
use super::hello::Version;
use super::{Result, WireError, get_u32, need, put_u32};

mod field {
    use core::ops::Range;
    pub const VERSION: usize = 16;
    pub const IPV_CAP: usize = 17;
    pub const MAX_ADVERTS: usize = 19;
    pub const ACT_RCV_SZ: Range<usize> = 20..24;
    pub const END: usize = 196;
}

/// Length of a HelloAck message: the whole CM REP private data.
pub const HELLO_ACK_LEN: usize = field::END;

/// A view of a HelloAck message.
#[derive(Debug, Clone)]
pub struct HelloAck<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> HelloAck<T> {
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        HelloAck { buffer }
    }
    /// Wraps after checking that all 196 bytes are present.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let h = Self::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }
    /// Checks the length.
    pub fn check_len(&self) -> Result<()> {
        need(self.buffer.as_ref().len(), HELLO_ACK_LEN, "hah.reserved")
    }
    /// The BSDH.
    pub fn bsdh(&self) -> Bsdh<&[u8]> {
        Bsdh::new_unchecked(&self.buffer.as_ref()[..BSDH_LEN])
    }
    /// MajV/MinV.
    pub fn version(&self) -> Version {
        Version(self.buffer.as_ref()[field::VERSION])
    }
    /// Byte 17 raw (IPV/Cap in MLNX, reserved elsewhere).
    pub fn ipv_cap(&self) -> u8 {
        self.buffer.as_ref()[field::IPV_CAP]
    }
    /// MaxAdverts.
    pub fn max_adverts(&self) -> u8 {
        self.buffer.as_ref()[field::MAX_ADVERTS]
    }
    /// ActRcvSz (including the BSDH).
    pub fn act_rcv_sz(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::ACT_RCV_SZ.start)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> HelloAck<T> {
    /// Sets MajV/MinV.
    pub fn set_version(&mut self, v: Version) {
        self.buffer.as_mut()[field::VERSION] = v.0;
    }
    /// Sets byte 17.
    pub fn set_ipv_cap(&mut self, v: u8) {
        self.buffer.as_mut()[field::IPV_CAP] = v;
    }
    /// Sets MaxAdverts.
    pub fn set_max_adverts(&mut self, v: u8) {
        self.buffer.as_mut()[field::MAX_ADVERTS] = v;
    }
    /// Sets ActRcvSz.
    pub fn set_act_rcv_sz(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), field::ACT_RCV_SZ.start, v);
    }
}

/// The value of a HelloAck message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HelloAckRepr {
    /// BSDH.Bufs: receives the passive side has posted = the active side's credits.
    pub bufs: u16,
    /// Protocol version.
    pub version: Version,
    /// Byte 17, written 0 by everyone.
    pub ipv_cap: u8,
    /// Outstanding ZCopy advertisements the sender accepts.
    pub max_adverts: u8,
    /// The passive side's actual receive buffer size including the BSDH.
    pub act_rcv_sz: u32,
}

impl HelloAckRepr {
    /// Parses a checked view. MID must be HelloAck and Len 196.
    pub fn parse<T: AsRef<[u8]>>(h: &HelloAck<T>) -> Result<HelloAckRepr> {
        h.check_len()?;
        let bsdh = BsdhRepr::parse(&h.bsdh())?;
        if bsdh.mid != MessageId::HelloAck {
            return Err(WireError::Invalid {
                field: "bsdh.mid",
                value: u8::from(bsdh.mid).into(),
            });
        }
        if bsdh.len as usize != HELLO_ACK_LEN {
            return Err(WireError::Invalid {
                field: "bsdh.len",
                value: bsdh.len.into(),
            });
        }
        Ok(HelloAckRepr {
            bufs: bsdh.bufs,
            version: h.version(),
            ipv_cap: h.ipv_cap(),
            max_adverts: h.max_adverts(),
            act_rcv_sz: h.act_rcv_sz(),
        })
    }

    /// Parses raw bytes.
    pub fn parse_bytes(bytes: &[u8]) -> Result<HelloAckRepr> {
        Self::parse(&HelloAck::new_checked(bytes)?)
    }

    /// Bytes needed: 196.
    pub const fn buffer_len(&self) -> usize {
        HELLO_ACK_LEN
    }

    /// Writes the whole message (BSDH included, reserved bytes zeroed).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, h: &mut HelloAck<T>) {
        let bytes = &mut h.buffer.as_mut()[..HELLO_ACK_LEN];
        bytes.fill(0);
        BsdhRepr {
            mid: MessageId::HelloAck,
            flags: Flags::EMPTY,
            bufs: self.bufs,
            len: HELLO_ACK_LEN as u32,
            mseq: 0,
            mseq_ack: 0,
        }
        .emit(&mut Bsdh::new_unchecked(&mut bytes[..BSDH_LEN]));
        h.set_version(self.version);
        h.set_ipv_cap(self.ipv_cap);
        h.set_max_adverts(self.max_adverts);
        h.set_act_rcv_sz(self.act_rcv_sz);
    }

    /// Emits into a fresh array.
    pub fn to_bytes(&self) -> [u8; HELLO_ACK_LEN] {
        let mut out = [0u8; HELLO_ACK_LEN];
        self.emit(&mut HelloAck::new_unchecked(&mut out[..]));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::hex;

    fn vector() -> Vec<u8> {
        // MLNX-like HelloAck: 16 buffers, 2.2, MaxAdverts 1, ActRcvSz 32784, 172 zero bytes.
        let mut v = hex("01 00 0010 000000c4 00000000 00000000  22 00 00 01  00008010");
        v.resize(HELLO_ACK_LEN, 0);
        v
    }

    #[test]
    fn hello_ack_vector_parses() {
        let r = HelloAckRepr::parse_bytes(&vector()).unwrap();
        assert_eq!(
            r,
            HelloAckRepr {
                bufs: 16,
                version: Version::V2_2,
                ipv_cap: 0,
                max_adverts: 1,
                act_rcv_sz: 32784
            }
        );
    }

    #[test]
    fn hello_ack_vector_round_trips_byte_exact() {
        let v = vector();
        assert_eq!(
            HelloAckRepr::parse_bytes(&v).unwrap().to_bytes().to_vec(),
            v
        );
    }

    #[test]
    fn hello_ack_short_or_wrong_mid_rejected() {
        let v = vector();
        assert!(matches!(
            HelloAckRepr::parse_bytes(&v[..195]),
            Err(WireError::Truncated {
                field: "hah.reserved",
                ..
            })
        ));
        let mut w = v.clone();
        w[0] = 0;
        assert!(matches!(
            HelloAckRepr::parse_bytes(&w),
            Err(WireError::Invalid {
                field: "bsdh.mid",
                ..
            })
        ));
    }
}
