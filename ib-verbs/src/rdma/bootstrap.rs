//! Out-of-band connection setup over a connected stream socket (TCP).
//!
//! Each side sends one [`EndpointInfo`] frame plus opaque hello bytes (SDP's Hello /
//! HelloAck, as rdma_cm's REQ/REP private data would carry them), reads the peer's, moves its
//! QP to RTR/RTS, then sends one `R` byte and waits for the peer's: neither side sends on the
//! QP before the other's QP can receive. The socket is then kept as the connection's
//! "peer ended" signal (its EOF).
//!
//! ```text
//! 0  magic "SDPRDMA1"        8  version u16 | flags u16 (bit 0: peer may read me)
//! 12 qpn u32                 16 psn u32
//! 20 lid u16 | mtu u8 | responder_resources u8
//! 24 gid [16]
//! 40 recv_buf_size u32       44 recv_depth u32
//! 48 initial_posts u32       52 hello_len u16 | reserved u16
//! 56 reserved [8]            64 hello bytes (hello_len ≤ 256)
//! ```
//! All integers little-endian. Everything read is validated before use.

use std::time::{Duration, Instant};

use super::SetupError;
use super::conn::{EndpointInfo, Pending, RdmaConn};
use crate::sys::{Fd, SysError};

pub const MAGIC: &[u8; 8] = b"SDPRDMA1";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 64;
pub const MAX_HELLO: usize = 256;
const READY: u8 = b'R';

/// Encodes our frame.
pub fn encode(info: &EndpointInfo, hello: &[u8]) -> Result<Vec<u8>, SetupError> {
    if hello.len() > MAX_HELLO {
        return Err(SetupError::BadOptions("hello longer than 256 bytes"));
    }
    let mut f = vec![0u8; HEADER_LEN];
    f[0..8].copy_from_slice(MAGIC);
    f[8..10].copy_from_slice(&VERSION.to_le_bytes());
    f[10..12].copy_from_slice(&(info.peer_may_read as u16).to_le_bytes());
    f[12..16].copy_from_slice(&info.qpn.to_le_bytes());
    f[16..20].copy_from_slice(&info.psn.to_le_bytes());
    f[20..22].copy_from_slice(&info.lid.to_le_bytes());
    f[22] = info.mtu;
    f[23] = info.responder_resources;
    f[24..40].copy_from_slice(&info.gid);
    f[40..44].copy_from_slice(&info.recv_buf_size.to_le_bytes());
    f[44..48].copy_from_slice(&info.recv_depth.to_le_bytes());
    f[48..52].copy_from_slice(&info.initial_posts.to_le_bytes());
    f[52..54].copy_from_slice(&(hello.len() as u16).to_le_bytes());
    f.extend_from_slice(hello);
    Ok(f)
}

/// Decodes the fixed header; returns the info and the hello length that follows.
pub fn decode(h: &[u8; HEADER_LEN]) -> Result<(EndpointInfo, usize), SetupError> {
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if &h[0..8] != MAGIC {
        return Err(SetupError::Peer("not an SDP RDMA bootstrap frame"));
    }
    if u16_at(8) != VERSION {
        return Err(SetupError::Peer("unsupported bootstrap version"));
    }
    let hello_len = u16_at(52) as usize;
    if hello_len > MAX_HELLO {
        return Err(SetupError::Peer("hello longer than 256 bytes"));
    }
    let mut gid = [0u8; 16];
    gid.copy_from_slice(&h[24..40]);
    let info = EndpointInfo {
        qpn: u32_at(12),
        psn: u32_at(16),
        lid: u16_at(20),
        mtu: h[22],
        responder_resources: h[23],
        gid,
        recv_buf_size: u32_at(40),
        recv_depth: u32_at(44),
        initial_posts: u32_at(48),
        peer_may_read: u16_at(10) & 1 != 0,
    };
    if info.qpn == 0 || info.qpn > 0xff_ffff || info.psn > 0xff_ffff || !(1..=5).contains(&info.mtu)
    {
        return Err(SetupError::Peer("bad QP number, PSN or MTU"));
    }
    if info.recv_buf_size == 0 || info.recv_depth == 0 || info.initial_posts > info.recv_depth {
        return Err(SetupError::Peer("bad receive sizes"));
    }
    Ok((info, hello_len))
}

/// Runs the exchange on `sock` (a connected stream socket, given up to the connection as its
/// end-of-peer signal). Returns the connection and the peer's hello bytes.
pub fn exchange(
    pending: Pending,
    sock: Fd,
    hello: &[u8],
    timeout: Duration,
) -> Result<(RdmaConn, Vec<u8>), SetupError> {
    let deadline = Instant::now() + timeout;
    let frame = encode(&pending.local_info(), hello)?;
    write_all(&sock, &frame, deadline)?;
    let mut h = [0u8; HEADER_LEN];
    read_exact(&sock, &mut h, deadline)?;
    let (peer, hello_len) = decode(&h)?;
    let mut peer_hello = vec![0u8; hello_len];
    read_exact(&sock, &mut peer_hello, deadline)?;
    // The ready byte is written on the socket the connection is about to keep, so do the I/O
    // on a duplicate-free borrow before handing it over.
    let raw = sock.raw();
    let conn = pending.connect(&peer, Some(sock))?;
    write_all_raw(raw, &[READY], deadline)?;
    let mut r = [0u8; 1];
    read_exact_raw(raw, &mut r, deadline)?;
    if r[0] != READY {
        return Err(SetupError::Peer("bad ready byte"));
    }
    Ok((conn, peer_hello))
}

fn write_all(fd: &Fd, buf: &[u8], deadline: Instant) -> Result<(), SetupError> {
    write_all_raw(fd.raw(), buf, deadline)
}

fn read_exact(fd: &Fd, buf: &mut [u8], deadline: Instant) -> Result<(), SetupError> {
    read_exact_raw(fd.raw(), buf, deadline)
}

fn wait(fd: i32, events: i16, deadline: Instant) -> Result<(), SetupError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SetupError::Timeout);
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        match crate::sys::poll_raw(fd, events, ms) {
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) => return Err(SetupError::Sys(e)),
        }
    }
}

fn write_all_raw(fd: i32, mut buf: &[u8], deadline: Instant) -> Result<(), SetupError> {
    while !buf.is_empty() {
        wait(fd, libc::POLLOUT, deadline)?;
        // SAFETY: sendto on our socket from a valid buffer; MSG_NOSIGNAL: no SIGPIPE.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                fd,
                buf.as_ptr(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                0,
                0,
            )
        };
        if n < 0 {
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno == libc::EAGAIN || errno == libc::EINTR {
                continue;
            }
            return Err(SetupError::Sys(SysError {
                op: "sendto",
                errno,
            }));
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn read_exact_raw(fd: i32, mut buf: &mut [u8], deadline: Instant) -> Result<(), SetupError> {
    while !buf.is_empty() {
        wait(fd, libc::POLLIN, deadline)?;
        // SAFETY: recvfrom on our socket into a valid buffer.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                fd,
                buf.as_mut_ptr(),
                buf.len(),
                libc::MSG_DONTWAIT,
                0,
                0,
            )
        };
        if n < 0 {
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno == libc::EAGAIN || errno == libc::EINTR {
                continue;
            }
            return Err(SetupError::Sys(SysError {
                op: "recvfrom",
                errno,
            }));
        }
        if n == 0 {
            return Err(SetupError::PeerClosed);
        }
        buf = &mut std::mem::take(&mut buf)[n as usize..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> EndpointInfo {
        EndpointInfo {
            qpn: 0x11,
            psn: 0xabcdef,
            lid: 0,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 77, 1],
            mtu: 3,
            recv_buf_size: 65536,
            recv_depth: 16,
            initial_posts: 16,
            responder_resources: 16,
            peer_may_read: true,
        }
    }

    #[test]
    fn frame_roundtrip_keeps_every_field() {
        let f = encode(&info(), b"hello").unwrap();
        assert_eq!(f.len(), HEADER_LEN + 5);
        let (i, n) = decode(f[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!((i, n), (info(), 5));
        assert_eq!(&f[HEADER_LEN..], b"hello");
    }

    #[test]
    fn frame_hostile_fields_are_refused() {
        let good = encode(&info(), b"").unwrap();
        let bad = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut f = good.clone();
            edit(&mut f);
            decode(f[..HEADER_LEN].try_into().unwrap()).is_err()
        };
        assert!(bad(&|f| f[0] = b'X'), "magic");
        assert!(bad(&|f| f[8] = 9), "version");
        assert!(
            bad(&|f| f[12..16].copy_from_slice(&0x0100_0000u32.to_le_bytes())),
            "qpn > 24 bits"
        );
        assert!(bad(&|f| f[22] = 0), "mtu");
        assert!(
            bad(&|f| f[44..48].copy_from_slice(&0u32.to_le_bytes())),
            "zero depth"
        );
        assert!(
            bad(&|f| f[48..52].copy_from_slice(&17u32.to_le_bytes())),
            "more posts than depth"
        );
        assert!(
            bad(&|f| f[52..54].copy_from_slice(&257u16.to_le_bytes())),
            "hello too long"
        );
        assert!(encode(&info(), &[0; 257]).is_err());
    }
}
