//! A connection set up while a fork is being prepared (libsdp's own prepare handler finishes
//! pending exchanges) is inherited by the child with its ring: the ring must not be kept for
//! reuse. Its own test binary: the handler below must be registered before reuse's own.

mod common;

use std::sync::Mutex;

use ib_verbs::shm::{ShmConn, reuse};
use ib_verbs::sys;

static MADE: Mutex<Option<(ShmConn, ShmConn)>> = Mutex::new(None);

extern "C" fn set_up_during_prepare() {
    if let Ok(mut m) = MADE.try_lock() {
        *m = Some(common::connect_as_libsdp(sys::getpid(), |b| b));
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
