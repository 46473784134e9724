//! Socket lifecycle: the calls that create, name, connect, duplicate and close sockets. These
//! keep the switch's fd table in step with the kernel.

use libc::{c_int, c_ulong, sockaddr, socklen_t};

use crate::guard::{switch, switch_call};
use crate::real;
use ops::fdtable::is_tracked;
use ops::socket as sw;
use ops::sys::internal;

/// # Safety
/// As `socket(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    let (kernel_domain, asked) = sw::map_family(domain, ty);
    let fd = unsafe { real::socket(kernel_domain, ty, protocol) };
    if fd >= 0 && sw::is_offloadable(kernel_domain, ty) {
        switch(|| sw::on_socket(fd, kernel_domain, ty, asked));
    } else if fd >= 0 && is_tracked(fd) {
        // A stale entry (the fd was closed behind our back, e.g. by close_range in libc).
        switch(|| sw::on_close(fd));
    }
    fd
}

/// # Safety
/// As `socketpair(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn socketpair(
    domain: c_int,
    ty: c_int,
    protocol: c_int,
    sv: *mut c_int,
) -> c_int {
    let rc = unsafe { real::socketpair(domain, ty, protocol, sv) };
    if rc == 0 {
        // SAFETY: on success the kernel wrote two fds into sv.
        let (a, b) = unsafe { (*sv, *sv.add(1)) };
        for fd in [a, b] {
            if is_tracked(fd) {
                switch(|| sw::on_close(fd));
            }
        }
    }
    rc
}

/// # Safety
/// As `bind(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    unsafe { real::bind(fd, addr, len) }
}

/// # Safety
/// As `listen(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let plan = if is_tracked(fd) {
        switch(|| sw::listen_plan(fd))
    } else {
        None
    };
    let rc = unsafe { real::listen(fd, backlog) };
    match plan {
        Some(sw::ListenPlan::Ready) if rc != 0 => {
            switch(|| sw::listen_failed(fd));
        }
        Some(sw::ListenPlan::After) if rc == 0 => {
            switch(|| sw::listen(fd));
        }
        _ => {}
    }
    rc
}

/// `accept4` with the switch: the SDP exchange for clients that came through the rendezvous,
/// and `use sdp server` refusing plain TCP clients (closed, and the next one accepted).
unsafe fn accept_common(
    listener: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    loop {
        let fd = unsafe { real::accept4(listener, addr, len, flags) };
        if fd < 0 {
            return fd;
        }
        if !(is_tracked(listener) || is_tracked(fd))
            && switch(|| sw::adopt_inherited_listener(listener)) != Some(true)
        {
            return fd;
        }
        match switch(|| sw::accept(listener, fd, flags)) {
            Some(false) => {
                unsafe { real::close(fd) };
            }
            _ => return fd,
        }
    }
}

/// # Safety
/// As `accept(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    unsafe { accept_common(fd, addr, len, 0) }
}

/// # Safety
/// As `accept4(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    unsafe { accept_common(fd, addr, len, flags) }
}

/// # Safety
/// As `connect(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // LINUX: the address is copied in first: a length beyond sockaddr_storage is EINVAL, an
    // address the kernel cannot read EFAULT, whatever the socket's state. The kernel says so.
    let sane = (len as usize) <= std::mem::size_of::<libc::sockaddr_storage>()
        && crate::hooks::data::user_readable(addr.cast(), len as usize);
    if is_tracked(fd) && sane {
        // SAFETY: the application passes `len` readable bytes at `addr`, as connect requires.
        let to = unsafe { ops::sys::sockaddr_to_std(addr, len) };
        if let Some(Some(rc)) = switch_call(Some(-1), || sw::connect(fd, to)) {
            return rc as c_int;
        }
    }
    unsafe { real::connect(fd, addr, len) }
}

/// # Safety
/// As `close(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if internal::contains(fd) {
        // One of the library's own descriptors, which the program never opened (a loop over
        // every number): closed, it would break a connection; for the program the number is
        // not open.
        ops::sys::set_errno(libc::EBADF);
        return -1;
    }
    forget(fd);
    unsafe { real::close(fd) }
}

/// `fd` is about to be closed (`close`, `fclose`): the library lets go of what it names.
fn forget(fd: c_int) {
    if ops::offload::lazy::pending() {
        ops::offload::lazy::flush_fd(fd);
    }
    set_gone(fd);
    if is_tracked(fd) {
        switch(|| sw::close(fd));
    }
}

/// A stdio stream on a socket (`fdopen`) closes its fd with the C library's internal `close`,
/// which no preload sees: the library would keep the connection (the peer never read end of
/// stream) and the fd number marked as offloaded, so the program's next file of that number
/// had its reads and writes taken for the old connection. The stream is flushed first (its
/// bytes reach the app end, and the library's close sends them), then closed as `close`
/// closes. Until 2026-11-27 `fclose` of an `fdopen(fd, "w")` stream did that.
///
/// # Safety
/// As `fclose(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fclose(stream: *mut libc::c_void) -> c_int {
    ops::offload::setup::forget_stream(stream as usize);
    if !stream.is_null() && ops::offload::any_bound() {
        // SAFETY: fclose's contract: a valid stream.
        let fd = unsafe { libc::fileno(stream.cast()) };
        if fd >= 0 && !internal::contains(fd) && is_tracked(fd) {
            // SAFETY: as above.
            unsafe { libc::fflush(stream.cast()) };
            forget(fd);
        }
    }
    unsafe { real::fclose(stream) }
}

/// `fd` is closed or replaced: an epoll set it named, and its registrations, are forgotten by
/// the library (`ops::offload::quiet`). One load when no set is mirrored.
fn set_gone(fd: c_int) {
    if ops::offload::quiet::any_sets() {
        switch(|| ops::offload::quiet::fd_closed(fd));
    }
}

/// `syscall(SYS_close, fd)` of an SDP socket is a `close`. libuv (Node.js) closes every
/// descriptor that way (a raw system call, to stay clear of thread cancellation), and before
/// 2026-11-26 no SDP connection of a Node program was ever closed: its peer waited for an end
/// that never came, and its numbers, reused by the program's next sockets, still named the
/// old connections (the next connection's echo ended early). Any other call goes to the C
/// library's `syscall` unchanged, the library's own raw calls included (they run inside the
/// switch's guard, or name descriptors the program does not know).
///
/// The arguments are read as seven integers whatever the caller passed: on x86_64 and
/// AArch64 a variadic call puts them where these fixed parameters are read from.
///
/// # Safety
/// As `syscall(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn syscall(
    n: libc::c_long,
    a1: libc::c_long,
    a2: libc::c_long,
    a3: libc::c_long,
    a4: libc::c_long,
    a5: libc::c_long,
    a6: libc::c_long,
) -> libc::c_long {
    if n == libc::SYS_close && !ops::guard::inside() {
        let fd = a1 as c_int;
        if fd >= 0 && !internal::contains(fd) && is_tracked(fd) {
            // SAFETY: as close(2), which this call is.
            return unsafe { close(fd) } as libc::c_long;
        }
        if fd >= 0 {
            set_gone(fd);
        }
    }
    // SAFETY: the caller's arguments, passed on as they came.
    unsafe { real::syscall(n, a1, a2, a3, a4, a5, a6) }
}

fn sys_close_range(first: u32, last: u32, flags: u32) -> c_int {
    // SAFETY: close_range takes integer arguments only.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_ulong,
            last as libc::c_ulong,
            flags as libc::c_ulong,
        ) as c_int
    }
}

/// `close_range` and `closefrom` close the program's descriptors in the range and none of the
/// library's (see `close`): the range is closed in the pieces between the library's numbers.
/// The program's SDP sockets in it are closed as by `close`. Python's `subprocess` closes
/// every descriptor above the ones it passes in the child before `exec`; before, that took
/// the bell ends of a socket passed as the child's stdin and stdout, and the child read
/// nothing.
fn close_range_keeping_ours(first: u32, last: u32, flags: u32) -> c_int {
    if first > last || flags & !(libc::CLOSE_RANGE_UNSHARE | libc::CLOSE_RANGE_CLOEXEC) != 0 {
        ops::sys::set_errno(libc::EINVAL);
        return -1;
    }
    if flags & libc::CLOSE_RANGE_CLOEXEC != 0 {
        // Only marks descriptors close-on-exec: the library's are already.
        return sys_close_range(first, last, flags);
    }
    if ops::offload::lazy::pending() {
        ops::offload::lazy::flush();
    }
    for fd in ops::fdtable::tracked_in(first, last) {
        if !internal::contains(fd) {
            switch(|| sw::close(fd));
        }
    }
    if ops::offload::quiet::any_sets() {
        switch(|| ops::offload::quiet::range_closed(first, last));
    }
    let mut from = first;
    for ours in internal::within(first, last) {
        let ours = ours as u32;
        if ours > from {
            let rc = sys_close_range(from, ours - 1, flags);
            if rc != 0 {
                return rc;
            }
        }
        from = ours + 1;
    }
    if from > last {
        return 0; // the range ended on one of ours
    }
    sys_close_range(from, last, flags)
}

/// # Safety
/// As `close_range(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(
    first: libc::c_uint,
    last: libc::c_uint,
    flags: c_int,
) -> c_int {
    close_range_keeping_ours(first, last, flags as u32)
}

/// # Safety
/// As `closefrom(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closefrom(lowfd: c_int) {
    // glibc: a negative start closes from 0.
    let low = lowfd.max(0);
    if close_range_keeping_ours(low as u32, u32::MAX, 0) == 0 {
        return;
    }
    // glibc: without close_range (an older kernel, a seccomp filter), every open number from
    // /proc/self/fd; the library's own stay.
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let open: Vec<c_int> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= low)
        .collect();
    for fd in open {
        if !internal::contains(fd) {
            unsafe { close(fd) };
        }
    }
}

fn after_dup(old: c_int, new: c_int) -> c_int {
    if new >= 0 && new != old && ops::offload::quiet::any_sets() {
        // A second number for an epoll set: changes through it would pass the library's
        // mirror of the set (`ops::offload::quiet`).
        switch(|| ops::offload::quiet::set_shared(old));
    }
    if new >= 0 && new != old && internal::contains(new) {
        // The program put a file of its own on a number the library held (the kernel closed
        // ours): the number is the program's now, for `close` and `close_range` too.
        internal::unmark(new);
    }
    if new >= 0 && (is_tracked(old) || is_tracked(new)) {
        switch(|| sw::dup(old, new));
    }
    new
}

/// # Safety
/// As `dup(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    after_dup(fd, unsafe { real::dup(fd) })
}

/// `dup2`/`dup3` of `old` over `new` is about to replace what `new` names.
fn replacing(old: c_int, new: c_int) {
    if ops::offload::lazy::pending() {
        ops::offload::lazy::flush_fd(new);
    }
    if old != new {
        set_gone(new);
        if is_tracked(new) {
            switch(|| sw::before_replace(old, new));
        }
    }
}

/// # Safety
/// As `dup2(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    replacing(old, new);
    after_dup(old, unsafe { real::dup2(old, new) })
}

/// # Safety
/// As `dup3(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    replacing(old, new);
    after_dup(old, unsafe { real::dup3(old, new, flags) })
}

fn after_fcntl(fd: c_int, cmd: c_int, rc: c_int) -> c_int {
    if matches!(cmd, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC) {
        return after_dup(fd, rc);
    }
    rc
}

/// `fcntl` is variadic in C; its third argument is always one machine word (an int or a
/// pointer), which a fixed `unsigned long` parameter receives correctly on x86_64 and AArch64.
///
/// # Safety
/// As `fcntl(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    after_fcntl(fd, cmd, unsafe { real::fcntl(fd, cmd, arg) })
}

/// The name programs built with `_FILE_OFFSET_BITS=64` import (Python among them).
///
/// # Safety
/// As `fcntl(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    after_fcntl(fd, cmd, unsafe { real::fcntl64(fd, cmd, arg) })
}
