//! Process lifetime: fork, vfork, daemon, exec.

use libc::{c_char, c_int, pid_t};

use crate::real;

passthrough! {
    fn fork() -> pid_t;
    // glibc's daemon() forks with its internal fork, which still runs our atfork handlers.
    fn daemon(nochdir: c_int, noclose: c_int) -> c_int;
    fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
    fn execv(path: *const c_char, argv: *const *const c_char) -> c_int;
    fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int;
    fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
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
