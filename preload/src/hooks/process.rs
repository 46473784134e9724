//! Process lifetime: fork, vfork, daemon, exec.

use libc::{c_char, c_int, pid_t};

use crate::real;

passthrough! {
    fn fork() -> pid_t;
    // glibc's daemon() forks with its internal fork, which still runs our atfork handlers.
    fn daemon(nochdir: c_int, noclose: c_int) -> c_int;
}

/// Offloaded sockets that survive the exec are handed to a relay first (see
/// `ops::offload::exec`).
fn before_exec() {
    ops::offload::lazy::flush();
    crate::guard::switch(ops::offload::exec::before_exec);
}

/// # Safety
/// As `execve(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    before_exec();
    unsafe { real::execve(path, argv, envp) }
}

/// # Safety
/// As `execv(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    before_exec();
    unsafe { real::execv(path, argv) }
}

/// # Safety
/// As `execvp(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    before_exec();
    unsafe { real::execvp(file, argv) }
}

/// # Safety
/// As `execvpe(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    before_exec();
    unsafe { real::execvpe(file, argv, envp) }
}

/// `vfork` is implemented with the real `fork`: a vfork child shares the parent's memory and
/// stack, and any bookkeeping the library did in it would corrupt the parent. A copy is always
/// correct; only the speed of vfork is lost.
///
/// # Safety
/// As `fork`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfork() -> pid_t {
    unsafe { real::fork() }
}

/// `_exit` skips atexit handlers, but an exiting process must still deliver the bytes its SDP
/// connections accepted (DESIGN.md §7): flush (bounded), then leave.
///
/// # Safety
/// As `_exit(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _exit(status: c_int) -> ! {
    if ops::state::try_globals().is_some_and(|g| g.active) {
        crate::guard::switch(|| {
            ops::offload::setup::flush_at_exit();
            ops::stats::remove_own();
        });
    }
    // SAFETY: ends the process.
    unsafe { libc::syscall(libc::SYS_exit_group, status) };
    unreachable!()
}

/// As `_exit`.
///
/// # Safety
/// As `_Exit(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _Exit(status: c_int) -> ! {
    unsafe { _exit(status) }
}
