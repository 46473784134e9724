//! Lifetime across fork: `pthread_atfork` handlers.
//!
//! A fork copies one thread. So that the child never inherits a lock held by a thread that does
//! not exist there, `prepare` waits for the progress thread to finish the task it is running
//! (and keeps it from starting another) and takes the connections' locks, the registry's and
//! the progress state's; `parent` and `child` release them. The child rebuilds its progress thread lazily.

use std::cell::RefCell;
use std::sync::Once;

static REGISTERED: Once = Once::new();

type RegistryGuard = std::sync::RwLockWriteGuard<
    'static,
    Option<crate::fdhash::FdMap<i32, std::sync::Arc<crate::offload::Conn>>>,
>;

thread_local! {
    // The handlers of one fork run on the forking thread, in order prepare → parent|child.
    static HELD: RefCell<Option<RegistryGuard>> = const { RefCell::new(None) };
    static HELD_PROGRESS: RefCell<Option<crate::progress::ForkGuard>> = const { RefCell::new(None) };
    static HELD_QUIET: RefCell<Option<crate::offload::quiet::ForkGuards>> = const { RefCell::new(None) };
}

extern "C" fn prepare() {
    // The child shares the epoll sets: no DEL may stay deferred across the fork.
    crate::offload::lazy::flush();
    crate::offload::setup::resolve_pending_before_fork();
    // No bell stays withdrawn across the fork: the child, and the parent's copies from now
    // on, wait with their own calls (`offload::quiet`).
    crate::offload::quiet::handoff_begin();
    crate::progress::pause();
    crate::offload::lock_all_for_fork();
    let g = crate::offload::fork_prepare();
    HELD.with(|h| *h.borrow_mut() = Some(g));
    let q = crate::offload::quiet::lock_for_fork();
    HELD_QUIET.with(|h| *h.borrow_mut() = Some(q));
    let p = crate::progress::lock_for_fork();
    HELD_PROGRESS.with(|h| *h.borrow_mut() = Some(p));
}

extern "C" fn parent() {
    HELD_PROGRESS.with(|h| h.borrow_mut().take());
    HELD_QUIET.with(|h| h.borrow_mut().take());
    HELD.with(|h| h.borrow_mut().take());
    crate::offload::unlock_all_after_fork();
    // The child shares every set that exists now.
    crate::offload::quiet::forget_sets();
    crate::progress::resume();
    crate::offload::quiet::after_fork();
    crate::offload::quiet::handoff_end();
}

extern "C" fn child() {
    // Before anything asks for our pid: the cache still holds the parent's.
    ib_verbs::sys::forget_pid();
    HELD_PROGRESS.with(|h| h.borrow_mut().take());
    HELD_QUIET.with(|h| h.borrow_mut().take());
    HELD.with(|h| h.borrow_mut().take());
    crate::offload::unlock_all_after_fork();
    crate::offload::quiet::forget_sets();
    leave_pending_to_parent();
    crate::progress::resume();
    crate::progress::after_fork_child();
    crate::offload::quiet::after_fork_child();
}

/// A connection still pending at the fork (another thread connected after `prepare` resolved
/// the pending ones) is the parent's to complete: the child's progress thread must not answer
/// its exchange. If it did, the child's copy would take the SDP connection while the
/// parent's copy went back to TCP after its timeout, and the parent would wait forever for
/// replies that went over SDP to the child. Runs before the child's progress thread
/// re-registers the parent's watches; the child's copy falls back to TCP on its own timer.
///
/// The bytes the parent wrote while pending, and a shutdown it made then, are the parent's
/// to deliver too: the child's copy forgets them, or its own fallback would send them on the
/// TCP socket both share a second time (and shut it under the parent).
fn leave_pending_to_parent() {
    for (_, conn) in crate::offload::snapshot() {
        let mut g = conn.lock();
        if let crate::offload::Phase::Pending { sendbuf, shut_wr } = &mut g.phase {
            sendbuf.clear();
            *shut_wr = false;
            if let Some(t) = g.endpoint.take() {
                crate::progress::unregister(t);
            }
        }
    }
}

pub fn register_handlers() {
    REGISTERED.call_once(|| {
        // SAFETY: the handlers are plain functions that live as long as the library (a preload
        // library is never unloaded).
        unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    });
}
