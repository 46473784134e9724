//! Readiness calls. Under the fd model (DESIGN.md §3) every fd the application holds is a real
//! kernel fd whose readiness the kernel reports, so these pass through; they are interposed so
//! that busy-polling can be added for latency without changing the symbol surface.

use libc::{c_int, epoll_event, fd_set, nfds_t, pollfd, sigset_t, size_t, timespec, timeval};

passthrough! {
    fn select(nfds: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, timeout: *mut timeval) -> c_int;
    fn pselect(nfds: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, timeout: *const timespec, mask: *const sigset_t) -> c_int;
    fn poll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int;
    fn ppoll(fds: *mut pollfd, nfds: nfds_t, timeout: *const timespec, mask: *const sigset_t) -> c_int;
    fn __poll_chk(fds: *mut pollfd, nfds: nfds_t, timeout: c_int, fdslen: size_t) -> c_int;
    fn __ppoll_chk(fds: *mut pollfd, nfds: nfds_t, timeout: *const timespec, mask: *const sigset_t, fdslen: size_t) -> c_int;
    fn epoll_create(size: c_int) -> c_int;
    fn epoll_create1(flags: c_int) -> c_int;
}

/// Registrations of offloaded fds are remembered, so that an fd swapped back to its kernel TCP
/// socket is registered again with the same events and data (DESIGN.md §3).
///
/// # Safety
/// As `epoll_ctl(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: *mut epoll_event,
) -> c_int {
    const BOTH: u64 = ops::fdtable::Meta::TRACKED | ops::fdtable::Meta::OFFLOADED;
    let offloaded = ops::fdtable::raw(fd) & BOTH == BOTH;
    if offloaded || ops::offload::lazy::pending() {
        // Fewer system calls for event loops that re-register a connection around every
        // message (`ops::offload::lazy`); only with an event we may read.
        let size = std::mem::size_of::<epoll_event>();
        if event.is_null() || crate::hooks::data::user_readable(event.cast(), size) {
            // SAFETY: NULL or readable, checked above.
            let ev = (!event.is_null()).then(|| unsafe { std::ptr::read_unaligned(event) });
            let done = crate::guard::switch(|| {
                let registered = if offloaded {
                    ops::offload::epoll_registration(epfd, fd)
                } else {
                    None
                };
                let rc = ops::offload::lazy::ctl(epfd, op, fd, ev, registered)?;
                ops::offload::note_epoll(epfd, op, fd, ev);
                Some(rc)
            });
            if let Some(Some(rc)) = done {
                return rc;
            }
        }
    }
    let rc = unsafe { crate::real::epoll_ctl(epfd, op, fd, event) };
    if rc == 0 && offloaded {
        // SAFETY: the kernel accepted `event` for ADD/MOD, so it is readable.
        let ev = if event.is_null() {
            None
        } else {
            Some(unsafe { std::ptr::read_unaligned(event) })
        };
        crate::guard::switch(|| ops::offload::note_epoll(epfd, op, fd, ev));
    }
    rc
}

/// Busy-polls an epoll set that watches offloaded connections for a short budget before
/// sleeping (see `ops::offload::data` for the budget). Returns the events found, or 0.
unsafe fn spin_epoll(epfd: c_int, events: *mut epoll_event, max: c_int, timeout: c_int) -> c_int {
    let spin = ops::offload::epoll_spin(epfd);
    if timeout == 0 || spin == ops::offload::Spin::No {
        return 0;
    }
    let budget = ops::offload::data::spin_budget();
    let start = std::time::Instant::now();
    if !budget.is_zero() {
        ops::stats::bump(ops::stats::header::EPOLL_SPINS, 1);
    }
    while start.elapsed() < budget {
        if spin == ops::offload::Spin::Rings {
            crate::guard::switch(|| ops::offload::poll_epoll_set(epfd));
        }
        let n = unsafe { crate::real::epoll_wait(epfd, events, max, 0) };
        if n > 0 {
            ops::stats::bump(ops::stats::header::EPOLL_SPIN_HITS, 1);
        }
        if n != 0 {
            return n;
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::syscall(libc::SYS_sched_yield) };
    }
    0
}

/// # Safety
/// As `epoll_wait(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    ops::offload::lazy::enter(epfd);
    let mut n = unsafe { spin_epoll(epfd, events, max, timeout) };
    if n == 0 {
        n = unsafe { crate::real::epoll_wait(epfd, events, max, timeout) };
    }
    let errno = ops::sys::errno();
    ops::offload::lazy::leave(epfd);
    ops::sys::set_errno(errno);
    n
}

/// # Safety
/// As `epoll_pwait2(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    ops::offload::lazy::enter(epfd);
    let n = unsafe { crate::real::epoll_pwait2(epfd, events, max, timeout, mask) };
    let errno = ops::sys::errno();
    ops::offload::lazy::leave(epfd);
    ops::sys::set_errno(errno);
    n
}

/// # Safety
/// As `epoll_pwait(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const sigset_t,
) -> c_int {
    // LINUX: the signal mask (the kernel's 8-byte sigset) is read before any event is looked
    // at: one the kernel cannot read fails with EFAULT even when events are ready.
    ops::offload::lazy::enter(epfd);
    let mut n = 0;
    if mask.is_null() || crate::hooks::data::user_readable(mask.cast(), 8) {
        n = unsafe { spin_epoll(epfd, events, max, timeout) };
    }
    if n == 0 {
        n = unsafe { crate::real::epoll_pwait(epfd, events, max, timeout, mask) };
    }
    let errno = ops::sys::errno();
    ops::offload::lazy::leave(epfd);
    ops::sys::set_errno(errno);
    n
}
