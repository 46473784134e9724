//! Entry points shared by the fuzz targets (`fuzz/`) and the corpus replay test, so both
//! exercise exactly the same code. Not part of the API.

use crate::conn::{Connection, Shutdown};
use crate::time::Timestamp;
use crate::wire::{
    Bsdh, BsdhRepr, ChRcvBuf, ChRcvBufRepr, HelloAckRepr, HelloRepr, IpAddrs, MessageRepr,
    ModeChange, ModeChangeRepr, RdmaCompl, RdmaComplRepr, SinkAvail, SinkAvailRepr, SrcAvail,
    SrcAvailRepr, SuspComm, SuspCommRepr, Version,
};
use crate::{Config, Event};
use core::net::Ipv4Addr;

/// Every parser over the same bytes.
pub fn parse_all(data: &[u8]) {
    parse_headers(data);
    parse_hello(data);
    parse_message(data);
}

/// Hello and HelloAck: what parses re-emits to an equal value; the handshake check.
pub fn parse_hello(data: &[u8]) {
    if let Ok(h) = HelloRepr::parse_bytes(data) {
        assert_eq!(HelloRepr::parse_bytes(&h.to_bytes()), Ok(h));
    }
    if let Ok(h) = HelloAckRepr::parse_bytes(data) {
        assert_eq!(HelloAckRepr::parse_bytes(&h.to_bytes()), Ok(h));
    }
    let _ = Connection::check_hello(data);
}

/// The BSDH and every extended-header view.
pub fn parse_headers(data: &[u8]) {
    if let Ok(v) = Bsdh::new_checked(data) {
        let _ = BsdhRepr::parse(&v);
    }
    if let Ok(v) = SrcAvail::new_checked(data) {
        let _ = (SrcAvailRepr::parse(&v), v.payload().len());
    }
    if let Ok(v) = SinkAvail::new_checked(data) {
        let _ = (SinkAvailRepr::parse(&v), v.payload().len());
    }
    if let Ok(v) = RdmaCompl::new_checked(data) {
        let _ = RdmaComplRepr::parse(&v);
    }
    if let Ok(v) = ChRcvBuf::new_checked(data) {
        let _ = ChRcvBufRepr::parse(&v);
    }
    if let Ok(v) = SuspComm::new_checked(data) {
        let _ = SuspCommRepr::parse(&v);
    }
    if let Ok(v) = ModeChange::new_checked(data) {
        let _ = ModeChangeRepr::parse(&v);
    }
}

/// A whole message: what parses re-emits with the same length and re-parses equal.
pub fn parse_message(data: &[u8]) {
    if let Ok(m) = MessageRepr::parse(data) {
        let bytes = m.to_vec();
        assert_eq!(bytes.len(), data.len());
        assert_eq!(MessageRepr::parse(&bytes), Ok(m));
    }
}

/// Drives an established connection with arbitrary input: the first byte of each record
/// picks an action, records with action < 128 are messages of the next `len` bytes.
pub fn drive_connection(data: &[u8]) {
    let now = Timestamp::ZERO;
    let cfg = Config {
        recv_buffer_size: 512,
        recv_buffers: 4,
        recv_window: 2048,
        send_buffer: 4096,
        ..Config::default()
    };
    let addrs = IpAddrs::V4 {
        src: Ipv4Addr::LOCALHOST,
        dst: Ipv4Addr::LOCALHOST,
    };
    let mut c = Connection::connect(cfg, now, addrs, 1);
    while c.poll_post_recv().is_some() {}
    let _ = c.hello();
    let ack = HelloAckRepr {
        bufs: 4,
        version: Version::V2_2,
        ipv_cap: 0,
        max_adverts: 1,
        act_rcv_sz: 512,
    };
    if c.handle_hello_ack(now, &ack.to_bytes()).is_err() {
        return;
    }
    let mut out = vec![0u8; 1024];
    let mut t = 0u64;
    let mut i = 0usize;
    let mut reads = Vec::new();
    while i < data.len() {
        let op = data[i];
        i += 1;
        t += 1_000_000;
        let now = Timestamp::from_nanos(t);
        match op {
            0..=127 => {
                let len = (op as usize).min(data.len() - i);
                let _ = c.handle_message(now, &data[i..i + len]);
                i += len;
            }
            128..=143 => {
                let _ = c.send(now, &data[i..data.len().min(i + (op as usize - 120))]);
            }
            144..=151 => {
                let _ = c.send_urgent(now, b"!");
            }
            152..=167 => {
                let mut b = [0u8; 64];
                let _ = c.recv(now, &mut b, op & 1 == 1);
                let _ = c.recv_urgent(now, false);
            }
            168..=175 => {
                let _ = c.send_zcopy(now, &[0u8; 3000], 1, 0);
            }
            176..=183 => {
                if let Some(id) = reads.pop() {
                    let r = if op & 1 == 0 {
                        Ok(&[7u8; 16][..])
                    } else {
                        Err(crate::conn::RdmaReadFailure::Unsupported)
                    };
                    let _ = c.handle_rdma_read_complete(now, id, r);
                }
            }
            184..=191 => {
                let _ = c.handle_send_complete(now, 1);
            }
            192..=199 => c.handle_timeout(Timestamp::from_nanos(t + 2_000_000_000)),
            200 => {
                let _ = c.shutdown(now, Shutdown::Write);
            }
            201 => {
                let _ = c.shutdown(now, Shutdown::Read);
            }
            202 => c.close(now),
            203 => c.abort(now),
            204 => {
                let _ = c.handle_cm_disconnected(now);
            }
            205 => {
                let _ = c.request_peer_buffer_size(now, 4096);
            }
            _ => {}
        }
        while c.poll_post_recv().is_some() {}
        while let Some(tx) = c.poll_transmit(now, &mut out) {
            assert!(
                MessageRepr::parse(&out[..tx.len]).is_ok(),
                "we emit only valid messages"
            );
        }
        while let Some(e) = c.poll_event() {
            if let Event::RdmaRead(r) = e {
                reads.push(r.id);
            }
        }
        let _ = (c.readiness(), c.poll_timeout());
    }
}
