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

unsafe extern "C" {
    fn sdp_execl();
    fn sdp_execle();
    fn sdp_execlp();
}

/// `execl`, `execle` and `execlp` take a variable argument list, which Rust cannot receive on
/// stable: each exported symbol jumps, with every register and the stack untouched, to its
/// body in `src/execl.c`, which builds the argument vector and calls our `execve`/`execvp`.
macro_rules! variadic_to_c {
    ($($name:ident => $body:ident),* $(,)?) => {$(
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        pub unsafe extern "C" fn $name() {
            #[cfg(target_arch = "x86_64")]
            core::arch::naked_asm!("jmp {f}", f = sym $body);
            #[cfg(target_arch = "aarch64")]
            core::arch::naked_asm!("b {f}", f = sym $body);
        }
    )*};
}

variadic_to_c! {
    execl => sdp_execl,
    execle => sdp_execle,
    execlp => sdp_execlp,
}

/// glibc's `posix_spawn_file_actions_t` and one of its actions (`struct __spawn_action`),
/// unchanged since glibc 2.2: the ABI of the C library this preload runs on, read only to find
/// the `adddup2` actions.
#[repr(C)]
struct FileActions {
    allocated: c_int,
    used: c_int,
    actions: *const SpawnAction,
    _pad: [c_int; 16],
}

#[repr(C)]
struct SpawnAction {
    tag: c_int,
    /// The union after `tag` is aligned for its `char *` members.
    _align: c_int,
    fd: c_int,
    _newfd: c_int,
    _rest: [c_int; 4],
}

const SPAWN_DO_DUP2: c_int = 1;
const _: () = assert!(std::mem::size_of::<SpawnAction>() == 32);
const _: () = assert!(std::mem::size_of::<FileActions>() == 80);

/// The source fds of the `adddup2` actions in `actions` (none if the list does not look like
/// glibc's: a program built against another layout just gets no relay).
fn dup2_sources(actions: *const libc::c_void) -> Vec<c_int> {
    let fa = actions.cast::<FileActions>();
    if fa.is_null()
        || !crate::hooks::data::user_readable(fa.cast(), std::mem::size_of::<FileActions>())
    {
        return Vec::new();
    }
    // SAFETY: readable, checked above; read without assuming alignment.
    let fa = unsafe { std::ptr::read_unaligned(fa) };
    if fa.used <= 0 || fa.used > fa.allocated || fa.used > 4096 || fa.actions.is_null() {
        return Vec::new();
    }
    let n = fa.used as usize;
    if !crate::hooks::data::user_readable(fa.actions.cast(), n * std::mem::size_of::<SpawnAction>())
    {
        return Vec::new();
    }
    (0..n)
        // SAFETY: `n` actions are readable (checked above).
        .map(|i| unsafe { std::ptr::read_unaligned(fa.actions.add(i)) })
        .filter(|a| a.tag == SPAWN_DO_DUP2)
        .map(|a| a.fd)
        .collect()
}

/// `posix_spawn` runs its child without our hooks (glibc's internal `dup2` and `execve`), so
/// an SDP socket the child is given with `posix_spawn_file_actions_adddup2` (an inetd-style
/// launcher, Python's `os.posix_spawn`) goes to a relay first, as one sent over a unix socket
/// does: parent and child then hold one socket. Before, the child read the raw app end and
/// nothing arrived. Sockets the child merely inherits (no close-on-exec) are left alone.
fn before_spawn(actions: *const libc::c_void) {
    if !ops::offload::any_bound() {
        return;
    }
    for fd in dup2_sources(actions) {
        if ops::offload::lookup(fd).is_some() {
            crate::guard::switch(|| ops::offload::exec::before_passing(fd));
        }
    }
}

/// # Safety
/// As `posix_spawn(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut pid_t,
    path: *const c_char,
    actions: *const libc::c_void,
    attr: *const libc::c_void,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    before_spawn(actions);
    unsafe { real::posix_spawn(pid, path, actions, attr, argv, envp) }
}

/// # Safety
/// As `posix_spawnp(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut pid_t,
    file: *const c_char,
    actions: *const libc::c_void,
    attr: *const libc::c_void,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    before_spawn(actions);
    unsafe { real::posix_spawnp(pid, file, actions, attr, argv, envp) }
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
