//! The re-entrancy guard and panic containment around the switch.
//!
//! A hook's slow path may itself call hooked functions: reading the policy file calls `read`
//! and `close`, logging to syslog opens a socket, the transport makes AF_UNIX sockets. Calls
//! made while the guard is held go straight to the C library. The progress thread holds the
//! guard for its whole life.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    // INVARIANT: const-initialised with no destructor, so touching it never allocates, never
    // registers a TLS destructor and is safe in a signal handler.
    static IN_SWITCH: Cell<bool> = const { Cell::new(false) };
}

/// True while this thread is inside the switch.
#[inline(always)]
pub fn inside() -> bool {
    IN_SWITCH.try_with(Cell::get).unwrap_or(true)
}

/// Marks this thread as the switch's own for the rest of its life (the progress thread).
pub fn enter_forever() {
    IN_SWITCH.with(|g| g.set(true));
}

/// Runs `f` with the guard held, keeping the caller's errno, containing panics.
///
/// Returns `None` when the guard was already held (the caller passes through) or `f` panicked
/// (the panic hook has logged it).
pub fn switch<R>(f: impl FnOnce() -> R) -> Option<R> {
    if inside() {
        return None;
    }
    let saved = crate::sys::errno();
    IN_SWITCH.with(|g| g.set(true));
    let r = catch_unwind(AssertUnwindSafe(f)).ok();
    IN_SWITCH.with(|g| g.set(false));
    crate::sys::set_errno(saved);
    r
}

/// Like [`switch`], for calls whose result carries its own errno: the errno `f` leaves is
/// kept, and a panic becomes `on_panic` with EIO.
pub fn switch_call<R>(on_panic: R, f: impl FnOnce() -> R) -> Option<R> {
    if inside() {
        return None;
    }
    IN_SWITCH.with(|g| g.set(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_SWITCH.with(|g| g.set(false));
    Some(r.unwrap_or_else(|_| {
        crate::sys::set_errno(libc::EIO);
        on_panic
    }))
}
