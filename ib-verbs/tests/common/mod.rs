//! Shared helpers of the real-process tests: spawn `shm-peer`, accept its bootstrap.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ib_verbs::shm::{Passive, ShmConn, ShmOptions};
use ib_verbs::sys::{self, Fd};
use ib_verbs::{Completion, ConnError, Connection, Opcode, PostError};

pub const NOBODY: u32 = 65534;

pub fn unique_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "libsdp-test/{}/{}/{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn opts() -> ShmOptions {
    ShmOptions {
        recv_depth: 8,
        recv_buf_size: 4096,
        send_depth: 64,
        timeout: Duration::from_secs(10),
    }
}

pub fn empty() -> Completion {
    Completion {
        wr_id: 0,
        opcode: Opcode::Send,
        status: Ok(()),
        byte_len: 0,
        buf_index: 0,
    }
}

pub struct Peer {
    pub child: Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `shm-peer mode name args` (as `uid` if given) and waits for its "ready" line.
pub fn spawn(mode: &str, name: &str, args: &[&str], uid: Option<u32>) -> Peer {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shm-peer"));
    cmd.arg(mode)
        .arg(name)
        .args(args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    if let Some(u) = uid {
        cmd.uid(u).gid(u);
    }
    let child = cmd.spawn().expect("spawn shm-peer");
    Peer { child }
}

pub fn wait_ready(p: &mut Peer) {
    let out = p.child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("read ready");
    assert_eq!(line.trim(), "ready", "peer did not get ready");
}

/// Listens on a fresh name, spawns the peer in `mode`, runs the passive bootstrap.
pub fn connect_peer(mode: &str, args: &[&str], uid: Option<u32>) -> (ShmConn, Peer) {
    let name = unique_name(mode);
    let l = sys::listen_abstract(name.as_bytes(), 4).expect("listen");
    let mut peer = spawn(mode, &name, args, uid);
    let stream = accept_within(&l, Duration::from_secs(10));
    let offer = Passive::recv_offer(&stream, Duration::from_secs(10)).expect("offer");
    assert_eq!(offer.private_data(), b"peer-hello");
    let mut acc = offer.accept(opts()).expect("accept");
    for i in 0..opts().recv_depth {
        acc.post_recv(100 + i as u64).expect("post");
    }
    acc.send_answer(&stream, b"ack").expect("answer");
    let conn = acc.finish(&stream).expect("finish");
    wait_ready(&mut peer);
    (conn, peer)
}

pub fn accept_within(l: &Fd, t: Duration) -> Fd {
    let deadline = Instant::now() + t;
    loop {
        if let Some(s) = sys::accept(l).expect("accept") {
            return s;
        }
        assert!(Instant::now() < deadline, "peer never connected");
        let _ = sys::poll_one(l, libc::POLLIN, 100);
    }
}

/// Waits (bounded) for one receive; returns its bytes and reposts.
pub fn recv_one(c: &mut ShmConn, t: Duration) -> Result<Vec<u8>, ConnError> {
    let deadline = Instant::now() + t;
    let mut comps = [empty(); 1];
    loop {
        if c.poll_cq(&mut comps)? == 1 {
            let comp = comps[0];
            if comp.opcode != Opcode::Recv {
                continue;
            }
            let mut v = vec![0u8; comp.byte_len as usize];
            c.recv_data(&comp, 0, &mut v).expect("recv_data");
            c.post_recv(comp.wr_id).map_err(|e| match e {
                PostError::Dead(e) => e,
                other => panic!("repost: {other:?}"),
            })?;
            return Ok(v);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no message in time (hang?)");
        c.wait(Duration::from_micros(20), Some(left))?;
    }
}

pub fn send_blocking(c: &mut ShmConn, msg: &[u8], t: Duration) -> Result<(), ConnError> {
    let deadline = Instant::now() + t;
    let mut comps = [empty(); 16];
    loop {
        match c.post_send(1, &[msg]) {
            Ok(()) => return Ok(()),
            Err(PostError::NoCredit) | Err(PostError::QueueFull) => {
                let _ = c.poll_cq(&mut comps)?;
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "no credit in time (hang?)");
                if c.credits()? == 0 {
                    c.wait(Duration::from_micros(20), Some(left))?;
                }
            }
            Err(PostError::Dead(e)) => return Err(e),
            Err(e) => panic!("send: {e:?}"),
        }
    }
}

/// Open descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Small rings for the in-process reuse tests.
pub fn reuse_opts() -> ShmOptions {
    ShmOptions {
        recv_depth: 4,
        recv_buf_size: 256,
        send_depth: 16,
        timeout: Duration::from_secs(5),
    }
}

/// One in-process connection set up as libsdp's client and server do (the early variant, the
/// server naming the client process `client_pid` as the beacon would), the Offer's body
/// passed through `body_of` on its way.
pub fn connect_as_libsdp(
    client_pid: i32,
    body_of: impl Fn(Vec<u8>) -> Vec<u8>,
) -> (ShmConn, ShmConn) {
    let (sa, sp) = sys::socketpair_stream().expect("socketpair");
    let mut a = ib_verbs::shm::Active::unpaired(reuse_opts()).expect("active");
    for i in 0..4 {
        a.post_recv(i as ib_verbs::WrId).expect("post");
    }
    let body = a.early_offer(b"hello").expect("offer");
    let (app, bell) = sys::socketpair_stream().expect("app pair");
    a.attach_pair(app, bell).expect("attach");
    let offer = Passive::offer_from_body(&body_of(body)).expect("offer body");
    let (app, bell) = sys::socketpair_stream().expect("app pair");
    let mut p = offer
        .accept_from(reuse_opts(), app, bell, Some((client_pid, sys::getuid())))
        .expect("accept");
    for i in 0..4 {
        p.post_recv(i as ib_verbs::WrId).expect("post");
    }
    p.identify(&sp).expect("identify");
    p.send_answer(&sp, b"ack").expect("answer");
    let (c, _) = a.finish(&sa).expect("finish");
    let s = p.finish(&sp).expect("server finish");
    (c, s)
}
