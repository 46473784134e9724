//! Hello (HH), the 92-byte message carried in the CM REQ private data (SDP-WIRE.md §2.2).
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |                   BSDH (MID 0x00, Len 92, MSeq 0, MSeqAck 0)  |  0-15
//! +---------------+---------------+---------------+---------------+
//! | MajV  | MinV  |  IPV  |  Cap  |   reserved    |  MaxAdverts   | 16
//! +---------------+---------------+---------------+---------------+
//! |                          DesRemRcvSz                          | 20
//! +---------------------------------------------------------------+
//! |                          LocalRcvSz (incl. the 16-byte BSDH)  | 24
//! +-------------------------------+-------------------------------+
//! |           LocalPort           |           reserved            | 28
//! +-------------------------------+-------------------------------+
//! |          SrcIP (16 bytes; IPv4 = 12 zero bytes + address)     | 32-47
//! |          DstIP (16 bytes; IPv4 = 12 zero bytes + address)     | 48-63
//! +-------------------------------+-------------------------------+
//! |           reserved            |      Extended MaxAdverts      | 64
//! +-------------------------------+-------------------------------+
//! |                       reserved, zero (24 bytes)               | 68-91
//! +---------------------------------------------------------------+
//! ```
//!
//! The parser checks structure only (MID, Len, IPV nibble). Policy such as "major version
//! must be 2" or "MaxAdverts > 0" is the handshake's ([`crate::conn`]), which names the field.

use super::bsdh::{BSDH_LEN, Bsdh, BsdhRepr, Flags, MessageId};
use super::{Result, WireError, get_u16, get_u32, need, put_u16, put_u32};
use core::net::{Ipv4Addr, Ipv6Addr};

mod field {
    use core::ops::Range;
    pub const VERSION: usize = 16;
    pub const IPV_CAP: usize = 17;
    pub const MAX_ADVERTS: usize = 19;
    pub const DES_REM_RCV_SZ: Range<usize> = 20..24;
    pub const LOCAL_RCV_SZ: Range<usize> = 24..28;
    pub const LOCAL_PORT: Range<usize> = 28..30;
    pub const SRC_IP: Range<usize> = 32..48;
    pub const DST_IP: Range<usize> = 48..64;
    pub const EXT_MAX_ADVERTS: Range<usize> = 66..68;
    pub const END: usize = 92;
}

/// Length of a Hello message: the whole CM REQ private data.
pub const HELLO_LEN: usize = field::END;

/// SDP protocol version byte: major in bits 7:4, minor in bits 3:0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version(pub u8);

impl Version {
    /// 2.2, what MLNX and FreeBSD send (§2.2).
    pub const V2_2: Version = Version(0x22);
    /// Major version (RDMA-CM rejects anything but 2).
    pub fn major(self) -> u8 {
        self.0 >> 4
    }
    /// Minor version.
    pub fn minor(self) -> u8 {
        self.0 & 0x0F
    }
}

/// Source and destination addresses of the active side, one IP version for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpAddrs {
    /// IPV nibble 4: each address in the last four bytes of its 16-byte field.
    V4 {
        /// Active side's address.
        src: Ipv4Addr,
        /// Address the active side connects to.
        dst: Ipv4Addr,
    },
    /// IPV nibble 6: raw network order (RDMA-CM, §7.4).
    V6 {
        /// Active side's address.
        src: Ipv6Addr,
        /// Address the active side connects to.
        dst: Ipv6Addr,
    },
}

/// A view of a Hello message.
#[derive(Debug, Clone)]
pub struct Hello<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Hello<T> {
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        Hello { buffer }
    }
    /// Wraps after checking that all 92 bytes are present.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let h = Self::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }
    /// Checks the length.
    pub fn check_len(&self) -> Result<()> {
        need(self.buffer.as_ref().len(), HELLO_LEN, "hh.reserved")
    }
    /// The BSDH.
    pub fn bsdh(&self) -> Bsdh<&[u8]> {
        Bsdh::new_unchecked(&self.buffer.as_ref()[..BSDH_LEN])
    }
    /// MajV/MinV.
    pub fn version(&self) -> Version {
        Version(self.buffer.as_ref()[field::VERSION])
    }
    /// IP version nibble (4 or 6 when valid).
    pub fn ip_version(&self) -> u8 {
        self.buffer.as_ref()[field::IPV_CAP] >> 4
    }
    /// Capability bits (low nibble of byte 17).
    pub fn cap(&self) -> u8 {
        self.buffer.as_ref()[field::IPV_CAP] & 0x0F
    }
    /// MaxAdverts.
    pub fn max_adverts(&self) -> u8 {
        self.buffer.as_ref()[field::MAX_ADVERTS]
    }
    /// DesRemRcvSz.
    pub fn des_rem_rcv_sz(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::DES_REM_RCV_SZ.start)
    }
    /// LocalRcvSz (including the BSDH).
    pub fn local_rcv_sz(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::LOCAL_RCV_SZ.start)
    }
    /// LocalPort: the active side's source port.
    pub fn local_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LOCAL_PORT.start)
    }
    /// SrcIP, raw 16 bytes.
    pub fn src_ip(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC_IP]);
        a
    }
    /// DstIP, raw 16 bytes.
    pub fn dst_ip(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST_IP]);
        a
    }
    /// Extended MaxAdverts.
    pub fn ext_max_adverts(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::EXT_MAX_ADVERTS.start)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Hello<T> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    /// Zeroes the reserved bytes, sets version, IPV/Cap, MaxAdverts.
    pub fn set_version(&mut self, v: Version) {
        self.bytes_mut()[field::VERSION] = v.0;
    }
    /// Sets IPV nibble and Cap bits.
    pub fn set_ipv_cap(&mut self, ipv: u8, cap: u8) {
        self.bytes_mut()[field::IPV_CAP] = (ipv << 4) | (cap & 0x0F);
    }
    /// Sets MaxAdverts.
    pub fn set_max_adverts(&mut self, v: u8) {
        self.bytes_mut()[field::MAX_ADVERTS] = v;
    }
    /// Sets DesRemRcvSz.
    pub fn set_des_rem_rcv_sz(&mut self, v: u32) {
        put_u32(self.bytes_mut(), field::DES_REM_RCV_SZ.start, v);
    }
    /// Sets LocalRcvSz.
    pub fn set_local_rcv_sz(&mut self, v: u32) {
        put_u32(self.bytes_mut(), field::LOCAL_RCV_SZ.start, v);
    }
    /// Sets LocalPort.
    pub fn set_local_port(&mut self, v: u16) {
        put_u16(self.bytes_mut(), field::LOCAL_PORT.start, v);
    }
    /// Sets SrcIP.
    pub fn set_src_ip(&mut self, v: [u8; 16]) {
        self.bytes_mut()[field::SRC_IP].copy_from_slice(&v);
    }
    /// Sets DstIP.
    pub fn set_dst_ip(&mut self, v: [u8; 16]) {
        self.bytes_mut()[field::DST_IP].copy_from_slice(&v);
    }
    /// Sets Extended MaxAdverts.
    pub fn set_ext_max_adverts(&mut self, v: u16) {
        put_u16(self.bytes_mut(), field::EXT_MAX_ADVERTS.start, v);
    }
}

fn v4_field(a: Ipv4Addr) -> [u8; 16] {
    let mut f = [0u8; 16];
    f[12..].copy_from_slice(&a.octets());
    f
}

fn v4_of(f: [u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(f[12], f[13], f[14], f[15])
}

/// The value of a Hello message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HelloRepr {
    /// BSDH.Bufs: receives the active side has already posted = the passive side's credits.
    pub bufs: u16,
    /// Protocol version.
    pub version: Version,
    /// Capability bits (0 in every open implementation).
    pub cap: u8,
    /// Outstanding ZCopy advertisements the sender accepts, > 0.
    pub max_adverts: u8,
    /// Desired remote receive size (ignored on receipt by every implementation, §7.16).
    pub des_rem_rcv_sz: u32,
    /// The sender's receive buffer size including the BSDH.
    pub local_rcv_sz: u32,
    /// The active side's source port.
    pub local_port: u16,
    /// Addresses.
    pub addrs: IpAddrs,
    /// Extended MaxAdverts (meaningful only with the Cap bit).
    pub ext_max_adverts: u16,
}

impl HelloRepr {
    /// Parses a checked view. MID must be Hello and Len 92.
    pub fn parse<T: AsRef<[u8]>>(h: &Hello<T>) -> Result<HelloRepr> {
        h.check_len()?;
        let bsdh = BsdhRepr::parse(&h.bsdh())?;
        if bsdh.mid != MessageId::Hello {
            return Err(WireError::Invalid {
                field: "bsdh.mid",
                value: u8::from(bsdh.mid).into(),
            });
        }
        if bsdh.len as usize != HELLO_LEN {
            return Err(WireError::Invalid {
                field: "bsdh.len",
                value: bsdh.len.into(),
            });
        }
        let addrs = match h.ip_version() {
            4 => IpAddrs::V4 {
                src: v4_of(h.src_ip()),
                dst: v4_of(h.dst_ip()),
            },
            6 => IpAddrs::V6 {
                src: Ipv6Addr::from(h.src_ip()),
                dst: Ipv6Addr::from(h.dst_ip()),
            },
            other => {
                return Err(WireError::Invalid {
                    field: "hh.ipv",
                    value: other.into(),
                });
            }
        };
        Ok(HelloRepr {
            bufs: bsdh.bufs,
            version: h.version(),
            cap: h.cap(),
            max_adverts: h.max_adverts(),
            des_rem_rcv_sz: h.des_rem_rcv_sz(),
            local_rcv_sz: h.local_rcv_sz(),
            local_port: h.local_port(),
            addrs,
            ext_max_adverts: h.ext_max_adverts(),
        })
    }

    /// Parses raw bytes.
    pub fn parse_bytes(bytes: &[u8]) -> Result<HelloRepr> {
        Self::parse(&Hello::new_checked(bytes)?)
    }

    /// Bytes needed: 92.
    pub const fn buffer_len(&self) -> usize {
        HELLO_LEN
    }

    /// Writes the whole message (BSDH included, reserved bytes zeroed).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, h: &mut Hello<T>) {
        let bytes = &mut h.bytes_mut()[..HELLO_LEN];
        bytes.fill(0);
        BsdhRepr {
            mid: MessageId::Hello,
            flags: Flags::EMPTY,
            bufs: self.bufs,
            len: HELLO_LEN as u32,
            mseq: 0,
            mseq_ack: 0,
        }
        .emit(&mut Bsdh::new_unchecked(&mut bytes[..BSDH_LEN]));
        h.set_version(self.version);
        let (ipv, src, dst) = match self.addrs {
            IpAddrs::V4 { src, dst } => (4, v4_field(src), v4_field(dst)),
            IpAddrs::V6 { src, dst } => (6, src.octets(), dst.octets()),
        };
        h.set_ipv_cap(ipv, self.cap);
        h.set_max_adverts(self.max_adverts);
        h.set_des_rem_rcv_sz(self.des_rem_rcv_sz);
        h.set_local_rcv_sz(self.local_rcv_sz);
        h.set_local_port(self.local_port);
        h.set_src_ip(src);
        h.set_dst_ip(dst);
        h.set_ext_max_adverts(self.ext_max_adverts);
    }

    /// Emits into a fresh array.
    pub fn to_bytes(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        self.emit(&mut Hello::new_unchecked(&mut out[..]));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::hex;

    // MLNX-like Hello: 9 buffers, 2.2, IPv4, MaxAdverts 1, 32784-byte buffers,
    // 10.0.0.1:40000 -> 10.0.0.2.
    const HH_V4: &str = "
        00 00 0009 0000005c 00000000 00000000
        22 40 00 01  00008010  00008010  9c40 0000
        00000000 00000000 00000000 0a000001
        00000000 00000000 00000000 0a000002
        0000 0000
        00000000 00000000 00000000 00000000 00000000 00000000";

    fn v4() -> HelloRepr {
        HelloRepr {
            bufs: 9,
            version: Version::V2_2,
            cap: 0,
            max_adverts: 1,
            des_rem_rcv_sz: 32784,
            local_rcv_sz: 32784,
            local_port: 40000,
            addrs: IpAddrs::V4 {
                src: Ipv4Addr::new(10, 0, 0, 1),
                dst: Ipv4Addr::new(10, 0, 0, 2),
            },
            ext_max_adverts: 0,
        }
    }

    #[test]
    fn hello_v4_vector_parses() {
        let b = hex(HH_V4);
        assert_eq!(b.len(), HELLO_LEN);
        assert_eq!(HelloRepr::parse_bytes(&b).unwrap(), v4());
    }

    #[test]
    fn hello_v4_vector_round_trips_byte_exact() {
        let b = hex(HH_V4);
        let r = HelloRepr::parse_bytes(&b).unwrap();
        assert_eq!(r.to_bytes().to_vec(), b);
    }

    #[test]
    fn hello_v6_vector_round_trips() {
        let src: Ipv6Addr = "fe80::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let r = HelloRepr {
            addrs: IpAddrs::V6 { src, dst },
            cap: 0x2,
            ext_max_adverts: 300,
            ..v4()
        };
        let b = r.to_bytes();
        assert_eq!(b[17], 0x62);
        assert_eq!(&b[32..48], &src.octets());
        assert_eq!(&b[48..64], &dst.octets());
        assert_eq!(&b[66..68], &[0x01, 0x2c]);
        assert_eq!(HelloRepr::parse_bytes(&b).unwrap(), r);
    }

    #[test]
    fn hello_bad_ipv_names_field() {
        let mut b = hex(HH_V4);
        b[17] = 0x50;
        assert_eq!(
            HelloRepr::parse_bytes(&b).unwrap_err(),
            WireError::Invalid {
                field: "hh.ipv",
                value: 5
            }
        );
    }

    #[test]
    fn hello_wrong_mid_or_len_rejected() {
        let mut b = hex(HH_V4);
        b[0] = 0x01;
        assert!(matches!(
            HelloRepr::parse_bytes(&b),
            Err(WireError::Invalid {
                field: "bsdh.mid",
                ..
            })
        ));
        let mut b = hex(HH_V4);
        b[7] = 0x5b;
        assert!(matches!(
            HelloRepr::parse_bytes(&b),
            Err(WireError::Invalid {
                field: "bsdh.len",
                ..
            })
        ));
        assert!(matches!(
            HelloRepr::parse_bytes(&hex(HH_V4)[..91]),
            Err(WireError::Truncated {
                needed: 92,
                got: 91,
                ..
            })
        ));
    }
}
