//! Lifetime across fork: `pthread_atfork` handlers.
//!
//! In this pass-through stage the switch holds no lock across calls and no thread, so the
//! handlers have nothing to quiesce; they exist so that a child's state (its pid in log lines,
//! later its progress thread) is rebuilt lazily and correctly.

use std::sync::Once;

static REGISTERED: Once = Once::new();

extern "C" fn prepare() {}
extern "C" fn parent() {}
extern "C" fn child() {}

pub fn register_handlers() {
    REGISTERED.call_once(|| {
        // SAFETY: the handlers are plain functions that live as long as the library (a preload
        // library is never unloaded).
        unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    });
}
