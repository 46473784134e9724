//! A connection set up while a fork is being prepared (libsdp's own prepare handler finishes
//! pending exchanges) is inherited by the child with its ring: the ring must not be kept for
//! reuse. Its own test binary: the handler below must be registered before reuse's own.

use std::sync::Mutex;
use std::time::Duration;

use ib_verbs::WrId;
use ib_verbs::shm::{Active, Passive, ShmConn, ShmOptions, reuse};
use ib_verbs::sys;

static MADE: Mutex<Option<(ShmConn, ShmConn)>> = Mutex::new(None);

fn opts() -> ShmOptions {
    ShmOptions {
        recv_depth: 4,
        recv_buf_size: 256,
        send_depth: 16,
        timeout: Duration::from_secs(5),
    }
}

fn connect() -> (ShmConn, ShmConn) {
    let (sa, sp) = sys::socketpair_stream().expect("socketpair");
    let mut a = Active::unpaired(opts()).expect("active");
    for i in 0..4 {
        a.post_recv(i as WrId).expect("post");
    }
    let body = a.early_offer(b"hello").expect("offer");
    let (app, bell) = sys::socketpair_stream().expect("app pair");
    a.attach_pair(app, bell).expect("attach");
    let offer = Passive::offer_from_body(&body).expect("offer body");
    let (app, bell) = sys::socketpair_stream().expect("app pair");
    let mut p = offer
        .accept_from(opts(), app, bell, Some((sys::getpid(), sys::getuid())))
        .expect("accept");
    p.identify(&sp).expect("identify");
    p.send_answer(&sp, b"ack").expect("answer");
    let (c, _) = a.finish(&sa).expect("finish");
    (c, p.finish(&sp).expect("server finish"))
}

extern "C" fn set_up_during_prepare() {
    if let Ok(mut m) = MADE.try_lock() {
        *m = Some(connect());
    }
}

#[test]
fn a_connection_set_up_inside_a_forks_prepare_handlers_keeps_no_ring() {
    // Registered before reuse's handlers, so it runs after them in prepare (glibc runs prepare
    // handlers last registered first): the connection is made after the fork was counted.
    // SAFETY: registering a plain function that lives as long as the process.
    unsafe { libc::pthread_atfork(Some(set_up_during_prepare), None, None) };
    reuse::enable();
    // SAFETY: the child leaves at once.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: leaving the child without running anything of the parent's.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    let made = MADE
        .lock()
        .unwrap()
        .take()
        .expect("the handler made a connection");
    drop(made);
    assert_eq!(
        reuse::counts().0,
        0,
        "a ring the fork child inherited was kept for reuse"
    );
}
