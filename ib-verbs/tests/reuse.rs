//! Rings kept for the next connection between the same two processes (`shm::reuse`): both
//! ends in this process, set up as libsdp does (the early variant, the client's pid named by
//! the beacon). Its own test binary: reuse is a process-wide switch.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{recv_one, send_blocking};
use ib_verbs::WrId;
use ib_verbs::shm::{Active, Passive, ShmConn, ShmOptions, reuse};
use ib_verbs::sys;

const T: Duration = Duration::from_secs(5);

/// The tests share the process's cache: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn opts() -> ShmOptions {
    ShmOptions {
        recv_depth: 4,
        recv_buf_size: 256,
        send_depth: 16,
        timeout: T,
    }
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

/// The early Offer's body as a client of an earlier build sends it: nothing after the private
/// data.
fn earlier_build(mut body: Vec<u8>) -> Vec<u8> {
    let at = 28 + 2 + u16::from_le_bytes([body[28], body[29]]) as usize;
    body.truncate(at);
    body
}

fn connect_with(client_pid: i32, body_of: impl Fn(Vec<u8>) -> Vec<u8>) -> (ShmConn, ShmConn) {
    let (sa, sp) = sys::socketpair_stream().expect("socketpair");
    let mut a = Active::unpaired(opts()).expect("active");
    for i in 0..4 {
        a.post_recv(i as WrId).expect("post");
    }
    let body = a.early_offer(b"hello").expect("offer");
    let (app, bell) = sys::socketpair_stream().expect("app pair");
    a.attach_pair(app, bell).expect("attach");
    let offer = Passive::offer_from_body(&body_of(body)).expect("offer body");
    let (app, bell) = sys::socketpair_stream().expect("app pair");
    let mut p = offer
        .accept_from(opts(), app, bell, Some((client_pid, sys::getuid())))
        .expect("accept");
    for i in 0..4 {
        p.post_recv(i as WrId).expect("post");
    }
    p.identify(&sp).expect("identify");
    p.send_answer(&sp, b"ack").expect("answer");
    let (c, _) = a.finish(&sa).expect("finish");
    let s = p.finish(&sp).expect("server finish");
    (c, s)
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

#[test]
fn a_client_of_an_earlier_build_gets_no_token_and_nothing_is_kept() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
    forget_kept();
    // Its Offer ends after the private data: the Answer must end there too (an earlier client
    // refuses trailing bytes), and neither side keeps a ring it could never get back.
    let (mut c, mut s) = connect_with(sys::getpid(), earlier_build);
    exchange(&mut c, &mut s, 4);
    drop((c, s));
    assert_eq!(
        reuse::counts().0,
        0,
        "a ring was kept for a client that cannot reuse it"
    );
}

#[test]
fn a_kept_ring_goes_to_no_other_process_than_the_one_it_served() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    reuse::enable();
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
