//! Process lifetime: fork, vfork, daemon, exec.

use libc::{c_char, c_int, pid_t};

use crate::real;

passthrough! {
    fn fork() -> pid_t;
    // glibc's daemon() forks with its internal fork, which still runs our atfork handlers.
    fn daemon(nochdir: c_int, noclose: c_int) -> c_int;
}

unsafe extern "C" {
    static environ: *const *const c_char;
}

/// The environment a new image gets when connections were relayed: the program's `envp` with
/// `LIBSDP_RELAYED=<records>` (ops::offload::relayed) in place of any it had. Owns the
/// strings the pointer array points into.
struct RelayedEnv {
    _var: std::ffi::CString,
    ptrs: Vec<*const c_char>,
    /// The records the variable carries: (relay socket inode, shadow duplicate, its inode).
    records: Vec<(u64, c_int, u64)>,
}

impl RelayedEnv {
    fn new(envp: *const *const c_char, records: String) -> Option<RelayedEnv> {
        let parsed = ops::offload::relayed::parse(&records);
        let var =
            std::ffi::CString::new(format!("{}={records}", ops::offload::relayed::RELAYED_ENV))
                .ok()?;
        let prefix = format!("{}=", ops::offload::relayed::RELAYED_ENV);
        let mut ptrs = Vec::new();
        let mut p = envp;
        // SAFETY: envp is the NULL-terminated array of NUL-terminated strings exec takes (the
        // program's, or `environ`); NULL means an empty environment.
        unsafe {
            while !p.is_null() && !(*p).is_null() {
                if !std::ffi::CStr::from_ptr(*p)
                    .to_bytes()
                    .starts_with(prefix.as_bytes())
                {
                    ptrs.push(*p);
                }
                p = p.add(1);
            }
        }
        ptrs.push(var.as_ptr());
        ptrs.push(std::ptr::null());
        Some(RelayedEnv {
            _var: var,
            ptrs,
            records: parsed,
        })
    }

    /// After a spawn: the duplicates are the child's now (or nobody's).
    fn close_shadows(self) {
        for (_, fd, _) in self.records {
            ops::sys::close(fd);
        }
    }

    /// After a failed exec: the process goes on (Python's `subprocess` tries the next
    /// directory of PATH), and the next exec must name the shadows again: they answer here
    /// until then (`relayed::for_exec` passes them on).
    fn keep_shadows(self) {
        crate::guard::switch(|| {
            for (ino, fd, _) in self.records {
                ops::offload::relayed::register(ino, fd, true);
            }
        });
    }
}

/// Offloaded sockets that survive the exec are handed to a relay first (see
/// `ops::offload::exec`); the new image's environment then says which shadows answer for them.
fn before_exec(envp: *const *const c_char) -> Option<RelayedEnv> {
    ops::offload::lazy::flush();
    // No bell stays withdrawn for the new image or a relay (`ops::offload::quiet`); the count
    // is given back if the exec fails (`exec_with`).
    if crate::guard::switch(ops::offload::quiet::handoff_begin).is_none() {
        ops::offload::quiet::handoff_begin(); // inside the library already: counted all the same
    }
    let records = crate::guard::switch(ops::offload::exec::before_exec).flatten()?;
    RelayedEnv::new(envp, records)
}

/// Runs `exec` with the environment `before_exec` made (or the program's own), and cleans up
/// after a failed exec.
fn exec_with(
    env: Option<RelayedEnv>,
    envp: *const *const c_char,
    exec: impl FnOnce(*const *const c_char) -> c_int,
) -> c_int {
    let rc = match env {
        None => exec(envp),
        Some(e) => {
            let rc = exec(e.ptrs.as_ptr());
            let errno = ops::sys::errno();
            e.keep_shadows();
            ops::sys::set_errno(errno);
            rc
        }
    };
    ops::offload::quiet::handoff_end();
    rc
}

/// # Safety
/// As `execve(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let env = before_exec(envp);
    exec_with(env, envp, |e| unsafe { real::execve(path, argv, e) })
}

/// # Safety
/// As `execv(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: reading the C library's environment pointer.
    let envp = unsafe { environ };
    match before_exec(envp) {
        None => exec_with(None, envp, |_| unsafe { real::execv(path, argv) }),
        env => exec_with(env, envp, |e| unsafe { real::execve(path, argv, e) }),
    }
}

/// # Safety
/// As `execvp(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: reading the C library's environment pointer.
    let envp = unsafe { environ };
    match before_exec(envp) {
        None => exec_with(None, envp, |_| unsafe { real::execvp(file, argv) }),
        env => exec_with(env, envp, |e| unsafe { real::execvpe(file, argv, e) }),
    }
}

/// # Safety
/// As `execvpe(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let env = before_exec(envp);
    exec_with(env, envp, |e| unsafe { real::execvpe(file, argv, e) })
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
///
/// The child's environment then names the shadows that answer its name and option calls on
/// those sockets, as after an exec (`ops::offload::relayed`): returned for the spawn.
fn before_spawn(actions: *const libc::c_void, envp: *const *mut c_char) -> Option<RelayedEnv> {
    if !ops::offload::any_bound() && !ops::offload::relayed::maybe() {
        return None;
    }
    let sources = dup2_sources(actions);
    for &fd in &sources {
        if ops::offload::lookup(fd).is_some() {
            crate::guard::switch(|| ops::offload::exec::before_passing(fd));
        }
    }
    let (records, dups) =
        crate::guard::switch(|| ops::offload::relayed::for_spawn(&sources)).flatten()?;
    let env = RelayedEnv::new(envp.cast(), records);
    if env.is_none() {
        for fd in dups {
            ops::sys::close(fd);
        }
    }
    env
}

/// Runs a spawn with the environment `before_spawn` made; the shadow duplicates are the
/// child's alone afterwards (closed here whether or not it started).
fn spawn_with(
    env: Option<RelayedEnv>,
    envp: *const *mut c_char,
    spawn: impl FnOnce(*const *mut c_char) -> c_int,
) -> c_int {
    match env {
        None => spawn(envp),
        Some(e) => {
            let rc = spawn(e.ptrs.as_ptr().cast());
            e.close_shadows();
            rc
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
    let env = before_spawn(actions, envp);
    spawn_with(env, envp, |e| unsafe {
        real::posix_spawn(pid, path, actions, attr, argv, e)
    })
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
    let env = before_spawn(actions, envp);
    spawn_with(env, envp, |e| unsafe {
        real::posix_spawnp(pid, file, actions, attr, argv, e)
    })
}

/// A stream opened for reading on an offloaded socket reads it with the C library's internal
/// `read`, which no preload sees: it would get the app end's bell bytes, not the data. So the
/// connection goes to a relay first, as one passed to another process does
/// (`ops::offload::exec::before_passing`): the fd then names a socket that carries the data
/// itself, and stdio reads it. (Writing through stdio needs nothing: the library forwards what
/// reaches the app end.) Before, `fgets` on such a stream returned `\x01` bytes.
///
/// # Safety
/// As `fdopen(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdopen(fd: c_int, mode: *const c_char) -> *mut libc::c_void {
    if crate::hooks::data::offloaded(fd)
        && !mode.is_null()
        && crate::hooks::data::user_readable(mode.cast(), 1)
    {
        // SAFETY: fdopen's contract: `mode` is a NUL-terminated string.
        let m = unsafe { std::ffi::CStr::from_ptr(mode) }.to_bytes();
        if m.first() == Some(&b'r') || m.contains(&b'+') {
            crate::guard::switch(|| ops::offload::exec::before_passing(fd));
        } else {
            // Written through this library (`stdio`), and flushed before the library's
            // exit-time delivery (`ops::offload::setup::flush_at_exit`).
            let f = crate::hooks::stdio::open(fd, mode)
                .map(|f| f.cast::<libc::c_void>())
                .unwrap_or_else(|| unsafe { real::fdopen(fd, mode) });
            if !f.is_null() {
                crate::guard::switch(|| ops::offload::setup::note_stream(f as usize));
            }
            return f;
        }
    }
    unsafe { real::fdopen(fd, mode) }
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
            ops::offload::setup::end_of_image(true);
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
