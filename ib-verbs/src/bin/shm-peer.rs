//! Test peer for the real-process tests of `ib-verbs` (not installed, not used by libsdp).
//!
//! `shm-peer <mode> <abstract-name> [args]`: connects to the abstract AF_UNIX `name`, runs the
//! active side of the `shm` bootstrap, then acts out `mode`:
//! - `echo`: sends every message back until the peer closes;
//! - `flood`: sends numbered messages as fast as credits allow, forever;
//! - `source`: registers a 64 KiB pattern for RDMA READ, sends (addr, len, key), waits for
//!   "done", revokes the key, sends "revoked", then echoes until closed;
//! - `read`: expects (addr, len, key) from the peer, tries a RDMA READ, reports the outcome;
//! - `scribble <seed>`: writes random bytes into the shared mapping until the peer closes;
//! - `beacon <addr>`: publishes a beacon for `addr` (no bootstrap), answers visitors;
//! - `impostor`: connects to endpoint `name` and presents a wrong nonce.
//!
//! It prints `ready` on stdout once set up and exits 0 when the peer closes.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use ib_verbs::shm::{self, Active, ShmConn, ShmOptions};
use ib_verbs::sys;
use ib_verbs::{
    Access, Completion, ConnError, Connection, LocalSge, MemKey, Opcode, PostError, RemoteSge,
};

fn ready() {
    let mut o = std::io::stdout();
    let _ = o.write_all(b"ready\n");
    let _ = o.flush();
}

fn connect(name: &str, opts: ShmOptions) -> ShmConn {
    let stream = sys::connect_abstract(name.as_bytes()).expect("connect to test");
    let mut a = Active::new(opts).expect("active");
    for i in 0..opts.recv_depth {
        a.post_recv(i as u64).expect("post");
    }
    a.send_offer(&stream, b"peer-hello").expect("offer");
    let (conn, _ack) = a.finish(&stream).expect("finish");
    conn
}

/// Waits for one receive; returns its bytes (reposting the buffer), or the connection error.
fn recv_one(c: &mut ShmConn) -> Result<Vec<u8>, ConnError> {
    let mut comps = [Completion {
        wr_id: 0,
        opcode: Opcode::Send,
        status: Ok(()),
        byte_len: 0,
        buf_index: 0,
    }; 8];
    loop {
        let n = c.poll_cq(&mut comps[..1])?;
        if n == 1 {
            let comp = comps[0];
            if comp.opcode == Opcode::Recv {
                let mut v = vec![0u8; comp.byte_len as usize];
                c.recv_data(&comp, 0, &mut v).expect("recv_data");
                c.post_recv(comp.wr_id).map_err(|e| match e {
                    PostError::Dead(e) => e,
                    _ => ConnError::PeerClosed,
                })?;
                return Ok(v);
            }
            continue;
        }
        c.wait(Duration::from_micros(20), None)?;
    }
}

fn send_blocking(c: &mut ShmConn, msg: &[u8]) -> Result<(), ConnError> {
    let mut comps = [Completion {
        wr_id: 0,
        opcode: Opcode::Send,
        status: Ok(()),
        byte_len: 0,
        buf_index: 0,
    }; 16];
    loop {
        match c.post_send(1, &[msg]) {
            Ok(()) => return Ok(()),
            Err(PostError::NoCredit) | Err(PostError::QueueFull) => {
                // Only send completions can be pending here; drop them.
                let _ = c.poll_cq(&mut comps)?;
                if c.credits()? == 0 {
                    c.wait(Duration::from_micros(20), None)?;
                }
            }
            Err(PostError::Dead(e)) => return Err(e),
            Err(e) => panic!("send: {e:?}"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args[1].as_str();
    let name = args[2].as_str();
    let opts = ShmOptions {
        recv_depth: 8,
        recv_buf_size: 4096,
        send_depth: 64,
        timeout: Duration::from_secs(10),
    };
    match mode {
        "echo" => {
            let mut c = connect(name, opts);
            ready();
            while let Ok(m) = recv_one(&mut c) {
                if send_blocking(&mut c, &m).is_err() {
                    break;
                }
            }
        }
        "flood" => {
            let mut c = connect(name, opts);
            ready();
            let mut i = 0u64;
            while send_blocking(&mut c, &i.to_le_bytes()).is_ok() {
                i += 1;
            }
        }
        "source" => {
            let mut c = connect(name, opts);
            let mut buf: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
            // SAFETY: `buf` lives until the end of main and is only read by the peer.
            let key = unsafe { c.register(buf.as_mut_ptr(), buf.len(), Access::RemoteRead) }
                .expect("register");
            let mut m = Vec::new();
            m.extend_from_slice(&(buf.as_ptr() as u64).to_le_bytes());
            m.extend_from_slice(&(buf.len() as u32).to_le_bytes());
            m.extend_from_slice(&key.0.to_le_bytes());
            ready();
            send_blocking(&mut c, &m).expect("send srcavail");
            let done = recv_one(&mut c).expect("done");
            assert_eq!(done, b"done");
            c.deregister(key).expect("deregister");
            send_blocking(&mut c, b"revoked").expect("send revoked");
            while let Ok(m) = recv_one(&mut c) {
                if send_blocking(&mut c, &m).is_err() {
                    break;
                }
            }
            drop(buf);
        }
        "read" => {
            let mut c = connect(name, opts);
            ready();
            let m = recv_one(&mut c).expect("srcavail");
            let addr = u64::from_le_bytes(m[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(m[8..12].try_into().unwrap());
            let key = MemKey(u32::from_le_bytes(m[12..16].try_into().unwrap()));
            let mut dst = vec![0u8; len as usize];
            // SAFETY: `dst` outlives the registration and is not touched during the read.
            let lkey = unsafe { c.register(dst.as_mut_ptr(), dst.len(), Access::LocalWrite) }
                .expect("reg");
            let local = LocalSge {
                addr: dst.as_ptr() as u64,
                len,
                key: lkey,
            };
            let report = match c.post_read(7, local, RemoteSge { addr, len, key }) {
                Ok(()) => {
                    let mut comps = [Completion {
                        wr_id: 0,
                        opcode: Opcode::Send,
                        status: Ok(()),
                        byte_len: 0,
                        buf_index: 0,
                    }; 1];
                    match c.poll_cq(&mut comps) {
                        Ok(1) if comps[0].status.is_ok() => {
                            format!("read-ok {}", dst.iter().map(|&b| b as u64).sum::<u64>())
                        }
                        other => format!("read-failed {other:?} {:?}", comps[0].status),
                    }
                }
                Err(e) => format!("read-refused {e:?}"),
            };
            let attrs = c.attrs();
            let report = format!(
                "{report} can_read_peer={} peer_can_read={}",
                attrs.can_read_peer, attrs.peer_can_read
            );
            let _ = send_blocking(&mut c, report.as_bytes());
            let _ = recv_one(&mut c);
        }
        "scribble" => {
            let seed: u64 = args[3].parse().unwrap();
            let c = connect(name, opts);
            ready();
            let mut x = seed | 1;
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let len = c.testing_map_len();
            loop {
                let r = next();
                let off = match r & 3 {
                    // Our own counters and bell flag (the words the peer trusts least).
                    0 => 64 + (r >> 8) as usize % 192,
                    1 => (r >> 8) as usize % 4096,
                    _ => (r >> 8) as usize % len,
                };
                let v = next().to_le_bytes();
                c.testing_scribble(off & !7, &v[..(1 + (r >> 40) as usize % 8)]);
                if sys::poll_raw(c.notify_fd(), libc::POLLIN, 0).unwrap_or(0)
                    & (libc::POLLHUP | libc::POLLIN)
                    != 0
                    && sys::drain(c.notify_fd()).unwrap_or(true)
                {
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        "beacon" => {
            let addr: SocketAddr = args[3].parse().unwrap();
            let b = shm::Beacon::publish(addr).expect("publish");
            ready();
            loop {
                if let Ok(Some(v)) = b.accept() {
                    let _ = v.answer(true, Duration::from_secs(1));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        "impostor" => {
            let s = sys::connect_abstract(name.as_bytes()).expect("connect endpoint");
            sys::send_with_fds(&s, &[0x5a; 16], &[]).expect("send nonce");
            ready();
            std::thread::sleep(Duration::from_secs(2));
        }
        _ => panic!("unknown mode {mode}"),
    }
}
