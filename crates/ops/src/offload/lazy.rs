//! Fewer `epoll_ctl` system calls for event loops that re-register an offloaded connection
//! around every message (redis-benchmark's `ae`, hiredis: DEL, ADD(OUT), write, DEL,
//! ADD(IN), read, MOD(IN): five calls a request, a third of the client's CPU).
//!
//! For an offloaded fd (an app end, which only this library ever swaps):
//! - a MOD that changes nothing (same events and data, level-triggered, not one-shot) is not
//!   made: the kernel would do nothing either (an LT item that is ready stays on the ready
//!   list);
//! - a DEL is **deferred**: the registration stays in the kernel until the next epoll call of
//!   the process, and if that call is the ADD of the same fd to the same set (not
//!   EPOLLEXCLUSIVE, which MOD cannot set), it becomes one MOD. Any other epoll call, and a
//!   `close`/`dup2` of either fd, `fork`, `exec` or a swap of the fd, makes the DEL first.
//!
//! The kernel must never deliver an event of a deferred DEL to anyone who could act on it: a
//! DEL is deferred only while no thread waits on that set (`enter`/`leave` count the waiters,
//! and a waiter makes any deferred DEL before it sleeps). Both sides publish before they look
//! (SeqCst), so one of them always sees the other. What remains is readiness of the epoll fd
//! itself for a nested poller (a spurious wake-up: its next `epoll_wait` makes the DEL and
//! finds nothing).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Epoll fds below this have a waiter count; sets above it never defer.
const TRACKED_SETS: usize = 4096;

static WAITERS: [AtomicU32; TRACKED_SETS] = [const { AtomicU32::new(0) }; TRACKED_SETS];
static PENDING: AtomicBool = AtomicBool::new(false);
/// The deferred DEL: (epoll fd, fd).
static DEFERRED: Mutex<Option<(i32, i32)>> = Mutex::new(None);

fn sys_ctl(epfd: i32, op: i32, fd: i32, ev: Option<&mut libc::epoll_event>) -> i32 {
    let p = ev.map_or(std::ptr::null_mut(), |e| e as *mut libc::epoll_event);
    // SAFETY: the kernel reads at most one epoll_event from `p` (NULL for DEL).
    unsafe { libc::syscall(libc::SYS_epoll_ctl, epfd, op, fd, p) as i32 }
}

fn flush_locked(d: &mut Option<(i32, i32)>) {
    if let Some((epfd, fd)) = d.take() {
        let errno = crate::sys::errno();
        sys_ctl(epfd, libc::EPOLL_CTL_DEL, fd, None);
        crate::sys::set_errno(errno);
    }
    PENDING.store(false, Ordering::SeqCst);
}

/// Makes a deferred DEL now, if there is one.
pub fn flush() {
    if PENDING.load(Ordering::SeqCst) {
        flush_locked(&mut DEFERRED.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Makes a deferred DEL that names `fd` (as the watched fd or as the set) now.
pub fn flush_fd(fd: i32) {
    if PENDING.load(Ordering::SeqCst) {
        let mut d = DEFERRED.lock().unwrap_or_else(|p| p.into_inner());
        if d.is_some_and(|(e, f)| e == fd || f == fd) {
            flush_locked(&mut d);
        }
    }
}

/// A thread is about to wait on `epfd`.
#[inline]
pub fn enter(epfd: i32) {
    if let Some(w) = WAITERS.get(epfd as usize) {
        w.fetch_add(1, Ordering::SeqCst);
    }
    flush();
}

/// The thread's wait on `epfd` is over.
#[inline]
pub fn leave(epfd: i32) {
    if let Some(w) = WAITERS.get(epfd as usize) {
        w.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a deferred DEL exists (a cheap test for the hooks).
#[inline]
pub fn pending() -> bool {
    PENDING.load(Ordering::Relaxed)
}

/// `epoll_ctl` of the application, before the real call: `Some(rc)` when handled here (the
/// caller returns it), `None` to make the real call (any deferred DEL was made first).
/// `registered`: the set already watches this offloaded fd with these (events, data).
pub fn ctl(
    epfd: i32,
    op: i32,
    fd: i32,
    ev: Option<libc::epoll_event>,
    registered: Option<(u32, u64)>,
) -> Option<i32> {
    if PENDING.load(Ordering::SeqCst) {
        let mut d = DEFERRED.lock().unwrap_or_else(|p| p.into_inner());
        if op == libc::EPOLL_CTL_ADD
            && *d == Some((epfd, fd))
            && let Some(mut e) = ev
            && e.events & libc::EPOLLEXCLUSIVE as u32 == 0
        {
            d.take();
            PENDING.store(false, Ordering::SeqCst);
            drop(d);
            if sys_ctl(epfd, libc::EPOLL_CTL_MOD, fd, Some(&mut e)) == 0 {
                crate::stats::bump(crate::stats::header::EPOLL_CTL_SAVED, 1);
                return Some(0);
            }
            // The registration went meanwhile (the fd was replaced): a real ADD.
            return None;
        }
        flush_locked(&mut d);
    }
    let (events, data) = registered?;
    const SPECIAL: u32 = (libc::EPOLLET | libc::EPOLLONESHOT | libc::EPOLLEXCLUSIVE) as u32;
    match (op, ev) {
        (libc::EPOLL_CTL_MOD, Some(e))
            if e.events == events && e.u64 == data && events & SPECIAL == 0 =>
        {
            crate::stats::bump(crate::stats::header::EPOLL_CTL_SAVED, 1);
            Some(0)
        }
        (libc::EPOLL_CTL_DEL, _) => {
            let w = WAITERS.get(epfd as usize)?;
            let mut d = DEFERRED.lock().unwrap_or_else(|p| p.into_inner());
            flush_locked(&mut d);
            PENDING.store(true, Ordering::SeqCst);
            if w.load(Ordering::SeqCst) != 0 {
                PENDING.store(false, Ordering::SeqCst);
                return None;
            }
            *d = Some((epfd, fd));
            Some(0)
        }
        _ => None,
    }
}
