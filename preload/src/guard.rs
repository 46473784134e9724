//! The re-entrancy guard and panic containment around the switch.
//!
//! A hook's slow path (bookkeeping in `ops`) may itself call hooked functions: reading the
//! policy file calls `read` and `close`, logging to syslog opens a socket. Calls made while the
//! guard is held go straight to the C library.

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

/// Runs `f` with the guard held, keeping the caller's errno, containing panics.
///
/// Returns `None` when the guard was already held (the caller passes through) or `f` panicked
/// (the panic hook has logged it; the caller passes through, which for bookkeeping is the safe
/// direction: the kernel call still happens).
pub fn switch<R>(f: impl FnOnce() -> R) -> Option<R> {
    if inside() {
        return None;
    }
    let saved = ops::sys::errno();
    IN_SWITCH.with(|g| g.set(true));
    let r = catch_unwind(AssertUnwindSafe(f)).ok();
    IN_SWITCH.with(|g| g.set(false));
    ops::sys::set_errno(saved);
    r
}
