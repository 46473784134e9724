//! Rings kept for the next connection between the same two processes (`shm::reuse`): both
//! ends in this process, set up as libsdp does (the early variant, the client's pid named by
//! the beacon). Its own test binary: reuse is a process-wide switch.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{recv_one, send_blocking};
use ib_verbs::shm::{Active, Passive, ShmConn, ShmOptions, reuse};
use ib_verbs::sys;

const T: Duration = Duration::from_secs(5);

/// The tests share the process's cache: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn opts() -> ShmOptions {
    common::reuse_opts()
}

/// One connection, set up as libsdp's client and server do, the server naming `client_pid`.
fn connect(client_pid: i32) -> (ShmConn, ShmConn) {
    connect_with(client_pid, |b| b)
}

/// The early Offer's body without the tokens of the rings the client kept (as a process that
/// never mapped them sends it): depth, size, posts, probe, cookie, the private data (u16
/// length), then the token count.
fn without_tokens(mut body: Vec<u8>) -> Vec<u8> {
    let at = 28 + 2 + u16::from_le_bytes([body[28], body[29]]) as usize;
    body.truncate(at);
    body.push(0);
    body
}

fn connect_with(client_pid: i32, body_of: impl Fn(Vec<u8>) -> Vec<u8>) -> (ShmConn, ShmConn) {
    common::connect_as_libsdp(client_pid, body_of)
}

fn exchange(c: &mut ShmConn, s: &mut ShmConn, tag: u8) {
    for i in 0..10u8 {
        let m = [tag, i, b'c'];
        send_blocking(c, &m, T).expect("client send");
        assert_eq!(recv_one(s, T).expect("server recv"), m);
        let m = [tag, i, b's'];
        send_blocking(s, &m, T).expect("server send");
        assert_eq!(recv_one(c, T).expect("client recv"), m);
    }
}

fn shm_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("libsdp-shm"))
        .count()
}

/// What earlier tests kept goes (after its idle time).
fn forget_kept() {
    std::thread::sleep(reuse::IDLE + Duration::from_millis(50));
    reuse::sweep();
    assert_eq!(reuse::counts().0, 0);
}

#[test]
fn a_second_connection_with_the_same_process_takes_the_first_ones_ring() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
    forget_kept();
    let me = sys::getpid();
    let (mut c, mut s) = connect(me);
    assert!(!c.reused() && !s.reused(), "the first ring is a new one");
    exchange(&mut c, &mut s, 1);
    // Bytes left in the ring must not reach the next connection.
    send_blocking(&mut c, b"left over", T).expect("send");
    drop(s);
    drop(c);
    let (_, before) = reuse::counts();
    let (mut c, mut s) = connect(me);
    assert!(c.reused() && s.reused(), "the kept ring served again");
    assert_eq!(reuse::counts().1, before + 2, "one take by each side");
    exchange(&mut c, &mut s, 2);
    drop(s);
    drop(c);
}

#[test]
fn a_ring_the_client_still_holds_is_not_taken() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
    // The only ring kept is then the first connection's (a ring an earlier test left, both
    // sides released, may serve again: rightly).
    forget_kept();
    let me = sys::getpid();
    let (mut c1, s1) = connect(me);
    drop(s1); // the server side is kept, the client side still uses the ring
    let (mut c2, mut s2) = connect(me);
    assert!(
        !s2.reused(),
        "a ring its client has not released served again"
    );
    exchange(&mut c2, &mut s2, 3);
    // The first client still reads its peer's end, not the second connection's traffic.
    assert!(recv_one(&mut c1, Duration::from_millis(50)).is_err());
    drop((c1, c2, s2));
}

#[test]
fn a_client_that_does_not_name_the_kept_ring_gets_a_new_one() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
    let me = sys::getpid();
    let (c, s) = connect(me);
    drop((c, s));
    // Same pid and uid, but the Offer names no kept ring (a new program the process exec'd
    // has none): it must not receive the old ring, whose slots still hold the old bytes.
    let (c, s) = connect_with(me, without_tokens);
    assert!(
        !c.reused() && !s.reused(),
        "a kept ring went to a client that did not name it"
    );
    drop((c, s));
}

/// The body of the next bootstrap frame on `s` (header: magic, kind, version, reserved,
/// length).
fn next_frame_body(s: &sys::Fd) -> Vec<u8> {
    let mut hdr = [0u8; 12];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < hdr.len() {
        got += sys::recv_with_fds(s, &mut hdr[got..], &mut fds).expect("frame header");
    }
    let len = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        got += sys::recv_with_fds(s, &mut body[got..], &mut fds).expect("frame body");
    }
    body
}

/// An Answer's body: depth, size, posts, total, probe, cookie, can_read (37 bytes), the
/// private data (u16 length), then the reuse token if the Offer named kept rings.
fn answer_len(private: &[u8], token: bool) -> usize {
    37 + 2 + private.len() + if token { 8 } else { 0 }
}

#[test]
fn an_offer_that_names_no_ring_gets_an_answer_an_earlier_build_can_read() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
    forget_kept();
    let me = sys::getpid();
    // Nothing kept: the Offer ends after its private data, as an earlier build's does (and as
    // an earlier server requires), and so must the Answer (an earlier client refuses more).
    for (kept_before, want_token) in [(false, false), (true, true)] {
        if kept_before {
            let (c, s) = connect(me);
            drop((c, s));
        }
        let (sa, sp) = sys::socketpair_stream().expect("socketpair");
        let mut a = Active::unpaired(opts()).expect("active");
        let body = a.early_offer(b"hello").expect("offer");
        let private_end = 28 + 2 + 5;
        assert_eq!(
            body.len() > private_end,
            kept_before,
            "the Offer names kept rings exactly when there are some"
        );
        let offer = Passive::offer_from_body(&body).expect("offer body");
        let (app, bell) = sys::socketpair_stream().expect("app pair");
        let mut p = offer
            .accept_from(opts(), app, bell, Some((me, sys::getuid())))
            .expect("accept");
        p.identify(&sp).expect("identify");
        p.send_answer(&sp, b"ack").expect("answer");
        assert_eq!(
            next_frame_body(&sa).len(),
            answer_len(b"ack", want_token),
            "Answer to an Offer {} kept rings",
            if kept_before { "naming" } else { "without" }
        );
    }
}

#[test]
fn a_server_of_an_earlier_build_leaves_its_client_nothing_to_keep() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
    forget_kept();
    // An earlier server: a memfd it never wrote a token into, an Answer without one.
    let (sa, sp) = sys::socketpair_stream().expect("socketpair");
    let mut a = Active::new(opts()).expect("active");
    a.send_offer(&sa, b"hi").expect("offer");
    let total: usize = 4096 + 2 * 4 * 320; // the layout of opts() on both sides, in pages
    let total = total.div_ceil(4096) * 4096;
    let memfd = sys::memfd_sealed(b"earlier", total).expect("memfd");
    let mut body = Vec::new();
    body.extend_from_slice(&4u32.to_le_bytes());
    body.extend_from_slice(&256u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&(total as u64).to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.push(0);
    body.extend_from_slice(&0u16.to_le_bytes());
    let mut frame = b"SDPs".to_vec();
    frame.extend_from_slice(&[2, 1, 0, 0]);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    let (bell, _keep) = sys::socketpair_stream().expect("bell");
    sys::send_with_fds(&sp, &frame, &[memfd.raw(), bell.raw()]).expect("answer");
    let (c, _) = a
        .finish(&sa)
        .expect("the client takes an earlier server's Answer");
    drop(c);
    assert_eq!(reuse::counts().0, 0, "a ring of an earlier server was kept");
}

#[test]
fn a_kept_ring_goes_to_no_other_process_than_the_one_it_served() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
    forget_kept();
    let me = sys::getpid();
    let (c, s) = connect(me);
    drop((c, s));
    // The beacon named us, but behind the endpoint is another process (a fork child that
    // connected to it): the kept ring, taken for us, must not go to it.
    let name = format!("libsdp-test-reuse-{me}").into_bytes();
    let l = sys::listen_abstract(&name, 4).expect("listen");
    // SAFETY: the child connects, waits for its parent to close the stream, and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let s = sys::connect_abstract(&name).expect("connect");
        let mut b = [0u8; 1];
        // SAFETY: reading into a local; the parent's close ends it.
        unsafe {
            libc::read(s.raw(), b.as_mut_ptr() as *mut libc::c_void, 1);
            libc::_exit(0);
        }
    }
    let stream = loop {
        if let Some(s) = sys::accept(&l).expect("accept") {
            break s;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut a = Active::unpaired(opts()).expect("active");
    let body = a.early_offer(b"hello").expect("offer");
    let offer = Passive::offer_from_body(&body).expect("offer body");
    let (app, bell) = sys::socketpair_stream().expect("app pair");
    let mut p = offer
        .accept_from(opts(), app, bell, Some((me, sys::getuid())))
        .expect("accept");
    assert!(
        p.identify(&stream).is_err(),
        "a kept ring was about to go to another process"
    );
    drop((p, stream));
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
}

#[test]
fn kept_rings_are_not_inherited_by_a_fork_child_and_go_after_their_idle_time() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
    let me = sys::getpid();
    let (c, s) = connect(me);
    drop((c, s));
    let kept = reuse::counts().0;
    assert!(kept >= 2, "both sides kept the ring: {kept}");
    let mapped = shm_maps();
    assert!(mapped >= 2, "the kept mappings are there: {mapped}");
    let (r, w) = sys::socketpair_stream().expect("pipe");
    // SAFETY: the child only reads /proc, writes one byte and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let n = shm_maps() as u8;
        // SAFETY: writing one byte from a local.
        unsafe {
            libc::write(w.raw(), &n as *const u8 as *const libc::c_void, 1);
            libc::_exit(0);
        }
    }
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a local.
    assert_eq!(
        unsafe { libc::read(r.raw(), b.as_mut_ptr() as *mut libc::c_void, 1) },
        1
    );
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    assert_eq!(b[0], 0, "a fork child inherited kept rings");
    // Unused for their idle time, they go.
    std::thread::sleep(reuse::IDLE + Duration::from_millis(100));
    reuse::sweep();
    assert_eq!(reuse::counts().0, 0);
    assert_eq!(shm_maps(), 0, "swept rings are unmapped");
}

#[test]
fn a_connection_set_up_before_a_fork_keeps_no_ring() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
    forget_kept();
    let me = sys::getpid();
    let (c, s) = connect(me);
    // SAFETY: the child exits at once.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: leaving the child without running anything of the parent's.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    drop((c, s));
    assert_eq!(
        reuse::counts().0,
        0,
        "a ring a fork child may share was kept"
    );
}
