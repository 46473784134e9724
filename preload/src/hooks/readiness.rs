//! Readiness calls. Under the fd model (DESIGN.md §3) every fd the application holds is a real
//! kernel fd whose readiness the kernel reports, so these pass through; they are interposed so
//! that busy-polling can be added for latency without changing the symbol surface.

use libc::{c_int, epoll_event, fd_set, nfds_t, pollfd, sigset_t, size_t, timespec, timeval};

/// A set this process makes is mirrored (`ops::offload::quiet`).
///
/// # Safety
/// As `epoll_create(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_create(size: c_int) -> c_int {
    set_made(unsafe { crate::real::epoll_create(size) })
}

/// # Safety
/// As `epoll_create1(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_create1(flags: c_int) -> c_int {
    set_made(unsafe { crate::real::epoll_create1(flags) })
}

fn set_made(epfd: c_int) -> c_int {
    if epfd >= 0 {
        let errno = ops::sys::errno();
        crate::guard::switch(|| ops::offload::quiet::set_created(epfd));
        ops::sys::set_errno(errno);
    }
    epfd
}

/// Before a look at the kernel's readiness that may sleep: counted while it lasts, and every
/// bell a poller withdrew asked for again (`ops::offload::quiet`): one load when none was.
fn kernel_wait() -> Option<ops::offload::quiet::Sleeping> {
    crate::guard::switch(ops::offload::quiet::sleeping)
}

// ---------------------------------------------------------------------------------------------
// poll and select: the kernel's, in slices while a connection of the process is pending.
//
// A pending connection that goes back to TCP has its fd number re-pointed from the app end to
// the kernel socket under any thread blocked in `poll` on it. The kernel's poll looks the
// number up again when it wakes (the library's end of stream on the old app end wakes it), but
// registers for wake-ups only on its first pass: it then sleeps on the TCP socket
// unregistered, and the answer arriving there does not wake it (`ops::offload::any_pending`).
// So while a connection is pending, and the set holds an offloaded fd, the wait is made in
// slices of `SLICE_MS`: each slice registers afresh on what the numbers name now.

const SLICE_MS: i64 = 10;

/// Whether a wait on these fds must be sliced: one of them is offloaded (a pending
/// connection is). Callers look at [`ops::offload::any_pending`] first.
fn must_slice(mut fds: impl Iterator<Item = c_int>) -> bool {
    fds.any(crate::hooks::data::offloaded)
}

/// `process_vm_readv` (`write` false) or `process_vm_writev` on ourselves: `bytes` between our
/// buffer `local` and the caller's `remote`, which the kernel checks. Bytes moved, or -1.
fn vm_io(write: bool, local: *mut libc::c_void, remote: *mut libc::c_void, bytes: usize) -> isize {
    let l = libc::iovec {
        iov_base: local,
        iov_len: bytes,
    };
    let r = libc::iovec {
        iov_base: remote,
        iov_len: bytes,
    };
    let nr = if write {
        libc::SYS_process_vm_writev
    } else {
        libc::SYS_process_vm_readv
    };
    // SAFETY: `l` names our own buffer of `bytes`; the kernel checks `r`. The pid is the
    // kernel's (a raw clone's child must use its own memory, not a cached pid's).
    unsafe {
        libc::syscall(
            nr,
            libc::syscall(libc::SYS_getpid),
            &l as *const libc::iovec,
            1 as libc::c_ulong,
            &r as *const libc::iovec,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
        ) as isize
    }
}

/// A copy of `n` values at `p` in the caller's memory, read by the kernel
/// (`process_vm_readv` on ourselves): an address the kernel would answer EFAULT for gives
/// `None` here instead of a fault in the library. Used only while a connection is pending.
fn copy_in<T: Copy>(p: *const T, n: usize) -> Option<Vec<T>> {
    let bytes = n.checked_mul(std::mem::size_of::<T>())?;
    if p.is_null() || n == 0 || bytes > 1 << 24 {
        return None;
    }
    let mut out: Vec<T> = Vec::with_capacity(n);
    let got = vm_io(
        false,
        out.as_mut_ptr().cast(),
        p as *mut libc::c_void,
        bytes,
    );
    if got != bytes as isize {
        return None;
    }
    // SAFETY: the kernel wrote all `bytes` (n values of a Copy type made of plain integers).
    unsafe { out.set_len(n) };
    Some(out)
}

fn pollfds_slice(fds: *const pollfd, nfds: nfds_t) -> bool {
    ops::offload::any_pending()
        && nfds as usize <= 1 << 20
        && copy_in(fds, nfds as usize).is_some_and(|v| must_slice(v.iter().map(|p| p.fd)))
}

fn now_ns() -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec * 1_000_000_000 + t.tv_nsec
}

/// Runs `wait(slice)` (a timeout in nanoseconds, `None`: forever) until it returns anything
/// but a timeout, `total` is spent, or no connection is pending any more (then the rest of the
/// wait is one call). `restore` puts back what a timed-out call overwrote (select's sets).
fn sliced(
    total: Option<i64>,
    mut wait: impl FnMut(Option<i64>) -> c_int,
    mut restore: impl FnMut(),
) -> c_int {
    let deadline = total.map(|t| now_ns() + t);
    loop {
        let left = deadline.map(|d| (d - now_ns()).max(0));
        if !ops::offload::any_pending() {
            return wait(left);
        }
        let slice = left.map_or(SLICE_MS * 1_000_000, |l| l.min(SLICE_MS * 1_000_000));
        let n = wait(Some(slice));
        if n != 0 || left.is_some_and(|l| l <= slice) {
            return n;
        }
        restore();
    }
}

fn ts_ns(ts: *const timespec) -> Option<Option<i64>> {
    if ts.is_null() {
        return Some(None);
    }
    let t = copy_in(ts, 1)?[0];
    if t.tv_sec < 0 || !(0..1_000_000_000).contains(&t.tv_nsec) {
        return None; // the kernel answers EINVAL
    }
    Some(Some(
        t.tv_sec
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec),
    ))
}

fn ns_ts(ns: i64) -> timespec {
    timespec {
        tv_sec: ns / 1_000_000_000,
        tv_nsec: ns % 1_000_000_000,
    }
}

fn ms_ceil(ns: i64) -> c_int {
    ((ns + 999_999) / 1_000_000).min(c_int::MAX as i64) as c_int
}

/// `poll` (or its fortified twin) `call(timeout_ms)`, in slices when it must be.
fn poll_common(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout: c_int,
    call: impl Fn(c_int) -> c_int,
) -> c_int {
    let _sleeping = kernel_wait();
    if timeout == 0 || !pollfds_slice(fds, nfds) {
        return call(timeout);
    }
    let total = (timeout > 0).then(|| timeout as i64 * 1_000_000);
    sliced(total, |t| call(t.map_or(-1, ms_ceil)), || {})
}

/// `ppoll` (or its fortified twin) `call(timeout)`, in slices when it must be.
fn ppoll_common(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout: *const timespec,
    call: impl Fn(*const timespec) -> c_int,
) -> c_int {
    let _sleeping = kernel_wait();
    let total = if ops::offload::any_pending() {
        ts_ns(timeout)
    } else {
        None
    };
    if total.is_none() || total == Some(Some(0)) || !pollfds_slice(fds, nfds) {
        return call(timeout);
    }
    sliced(
        total.flatten(),
        |t| {
            let ts = t.map(ns_ts);
            call(
                ts.as_ref()
                    .map_or(std::ptr::null(), |ts| ts as *const timespec),
            )
        },
        || {},
    )
}

/// # Safety
/// As `poll(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int {
    poll_common(fds, nfds, timeout, |t| unsafe {
        crate::real::poll(fds, nfds, t)
    })
}

/// # Safety
/// As `__poll_chk` (glibc's fortified `poll`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout: c_int,
    fdslen: size_t,
) -> c_int {
    poll_common(fds, nfds, timeout, |t| unsafe {
        crate::real::__poll_chk(fds, nfds, t, fdslen)
    })
}

/// # Safety
/// As `ppoll(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    ppoll_common(fds, nfds, timeout, |t| unsafe {
        crate::real::ppoll(fds, nfds, t, mask)
    })
}

/// # Safety
/// As `__ppoll_chk` (glibc's fortified `ppoll`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __ppoll_chk(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout: *const timespec,
    mask: *const sigset_t,
    fdslen: size_t,
) -> c_int {
    ppoll_common(fds, nfds, timeout, |t| unsafe {
        crate::real::__ppoll_chk(fds, nfds, t, mask, fdslen)
    })
}

/// The fds set in the first `nfds` bits of up to three sets (any of them NULL), and copies of
/// the sets to restore after a timed-out slice. `None`: a set the kernel cannot read, or
/// `nfds` out of range (the kernel answers).
fn fd_sets(nfds: c_int, sets: [*mut fd_set; 3]) -> Option<(Vec<c_int>, [Option<fd_set>; 3])> {
    if !(1..=libc::FD_SETSIZE as c_int).contains(&nfds) {
        return None;
    }
    let mut fds = Vec::new();
    let mut saved = [None, None, None];
    for (i, &set) in sets.iter().enumerate() {
        if set.is_null() {
            continue;
        }
        let bytes = (nfds as usize).div_ceil(8);
        // Only the bytes the kernel reads: a program may pass a short set for a small nfds.
        let got = copy_in(set as *const u8, bytes)?;
        // SAFETY: fd_set is plain integers; all zero is an empty set.
        let mut copy: fd_set = unsafe { std::mem::zeroed() };
        // SAFETY: `bytes` <= size_of::<fd_set>() (nfds <= FD_SETSIZE, checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                got.as_ptr(),
                (&mut copy as *mut fd_set).cast::<u8>(),
                bytes,
            )
        };
        for fd in 0..nfds {
            // SAFETY: `copy` is a valid fd_set and fd < FD_SETSIZE.
            if unsafe { libc::FD_ISSET(fd, &copy) } {
                fds.push(fd);
            }
        }
        saved[i] = Some(copy);
    }
    Some((fds, saved))
}

fn restore_sets(nfds: c_int, sets: [*mut fd_set; 3], saved: &[Option<fd_set>; 3]) {
    let bytes = (nfds as usize).div_ceil(8);
    for (set, copy) in sets.iter().zip(saved) {
        if let Some(copy) = copy {
            // SAFETY: the program's set, which the kernel just wrote the same `bytes` of.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (copy as *const fd_set).cast::<u8>(),
                    set.cast::<u8>(),
                    bytes,
                )
            };
        }
    }
}

/// # Safety
/// As `select(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    timeout: *mut timeval,
) -> c_int {
    let _sleeping = kernel_wait();
    let total = if !ops::offload::any_pending() {
        None
    } else if timeout.is_null() {
        Some(None)
    } else {
        copy_in(timeout as *const timeval, 1).and_then(|tv| {
            let tv = tv[0];
            (tv.tv_sec >= 0 && (0..1_000_000).contains(&tv.tv_usec)).then(|| {
                Some(
                    tv.tv_sec
                        .saturating_mul(1_000_000_000)
                        .saturating_add(tv.tv_usec * 1000),
                )
            })
        })
    };
    let sets = [r, w, e];
    let plan = match total {
        Some(t) if t != Some(0) => fd_sets(nfds, sets)
            .filter(|(fds, _)| must_slice(fds.iter().copied()))
            .map(|(_, saved)| (t, saved)),
        _ => None,
    };
    let Some((total, saved)) = plan else {
        return unsafe { crate::real::select(nfds, r, w, e, timeout) };
    };
    let deadline = total.map(|t| now_ns() + t);
    let n = sliced(
        total,
        |t| {
            let mut tv = t.map(|ns| timeval {
                tv_sec: ns / 1_000_000_000,
                tv_usec: (ns % 1_000_000_000) / 1000,
            });
            let p = tv
                .as_mut()
                .map_or(std::ptr::null_mut(), |tv| tv as *mut timeval);
            unsafe { crate::real::select(nfds, r, w, e, p) }
        },
        || restore_sets(nfds, sets, &saved),
    );
    // LINUX: select leaves the time not slept in the caller's timeval; a timeval it cannot
    // write is not an error there, so it is written by the kernel here too (ignored if not).
    if let Some(d) = deadline {
        let left = (d - now_ns()).max(0);
        let tv = timeval {
            tv_sec: left / 1_000_000_000,
            tv_usec: (left % 1_000_000_000) / 1000,
        };
        let mut tv = tv;
        vm_io(
            true,
            (&mut tv as *mut timeval).cast(),
            timeout.cast(),
            std::mem::size_of::<timeval>(),
        );
    }
    n
}

/// # Safety
/// As `pselect(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    timeout: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    let _sleeping = kernel_wait();
    let total = if ops::offload::any_pending() {
        ts_ns(timeout)
    } else {
        None
    };
    let sets = [r, w, e];
    let plan = match total {
        Some(t) if t != Some(0) => fd_sets(nfds, sets)
            .filter(|(fds, _)| must_slice(fds.iter().copied()))
            .map(|(_, saved)| (t, saved)),
        _ => None,
    };
    let Some((total, saved)) = plan else {
        return unsafe { crate::real::pselect(nfds, r, w, e, timeout, mask) };
    };
    sliced(
        total,
        |t| {
            let ts = t.map(ns_ts);
            let p = ts
                .as_ref()
                .map_or(std::ptr::null(), |ts| ts as *const timespec);
            unsafe { crate::real::pselect(nfds, r, w, e, p, mask) }
        },
        || restore_sets(nfds, sets, &saved),
    )
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
                if rc == 0 {
                    ops::offload::quiet::ctl(epfd, op, fd, ev);
                }
                Some(rc)
            });
            if let Some(Some(rc)) = done {
                return rc;
            }
        }
    }
    let rc = unsafe { crate::real::epoll_ctl(epfd, op, fd, event) };
    if rc == 0 && (offloaded || ops::offload::quiet::any_sets()) {
        let errno = ops::sys::errno();
        // SAFETY: the kernel accepted `event` for ADD/MOD, so it is readable.
        let ev = if event.is_null() || op == libc::EPOLL_CTL_DEL {
            None
        } else {
            Some(unsafe { std::ptr::read_unaligned(event) })
        };
        crate::guard::switch(|| {
            if offloaded {
                ops::offload::note_epoll(epfd, op, fd, ev);
            }
            ops::offload::quiet::ctl(epfd, op, fd, ev);
        });
        ops::sys::set_errno(errno);
    }
    rc
}

/// Busy-polls an epoll set that watches offloaded connections for a short budget before
/// sleeping (see `ops::offload::data` for the budget). `Some(n)`: the call's result; `None`:
/// wait in the kernel.
///
/// A set of up to 64 offloaded connections (`Spin::Rings`) is polled at their rings: a
/// message found there is reported without a bell (`ops::offload::quiet::round`), after the
/// kernel's events of the set. Bells other pollers withdrew are asked for again first: a
/// look at this set must see what its nested sets hold.
unsafe fn spin_epoll(
    epfd: c_int,
    events: *mut epoll_event,
    max: c_int,
    timeout: c_int,
) -> Option<c_int> {
    let spin = ops::offload::epoll_spin(epfd);
    let budget = ops::offload::data::spin_budget();
    // `LIBSDP_SPIN_US=0` turns polling off, the rings' included.
    let rings = spin == ops::offload::Spin::Rings && !budget.is_zero();
    if spin == ops::offload::Spin::No || max <= 0 {
        return None;
    }
    crate::guard::switch(|| {
        if rings {
            ops::offload::quiet::before_look(epfd)
        } else {
            ops::offload::quiet::rearm(None)
        }
    });
    if timeout == 0 {
        return rings.then(|| unsafe { epoll_round(epfd, events, max, Look::Rings) });
    }
    let start = std::time::Instant::now();
    if !budget.is_zero() {
        ops::stats::bump(ops::stats::header::EPOLL_SPINS, 1);
    }
    while start.elapsed() < budget {
        let look = if rings { Look::Spin } else { Look::Kernel };
        let n = unsafe { epoll_round(epfd, events, max, look) };
        if n > 0 {
            ops::stats::bump(ops::stats::header::EPOLL_SPIN_HITS, 1);
        }
        if n != 0 {
            return Some(n);
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::syscall(libc::SYS_sched_yield) };
    }
    None
}

thread_local! {
    /// A round's scratch: the data of the kernel's events, and what the rings added.
    static ROUND: std::cell::RefCell<(Vec<u64>, ops::offload::quiet::Round)> =
        std::cell::RefCell::new((Vec::new(), ops::offload::quiet::Round::default()));
}

/// What a look at an epoll set without sleeping does besides asking the kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Look {
    Kernel,
    /// Poll the rings of a mirrored set's connections (`ops::offload::quiet::round`).
    Rings,
    /// As `Rings`, or, for a set the rings are not polled for, make a few connections'
    /// readiness current first (`ops::offload::poll_epoll_set`): in a spin only, where the
    /// wait could not return before a bell anyway.
    Spin,
}

/// One look at an epoll set without sleeping: the kernel's events, then (`Look::Rings`) what the
/// rings of its polled connections hold, merged (EPOLLIN added to the kernel's event of the
/// same registration) or written after the kernel's in the room left. The rings' events are
/// written by the kernel (`process_vm_writev`), so a buffer it cannot write gives EFAULT as
/// `epoll_wait` does.
unsafe fn epoll_round(epfd: c_int, events: *mut epoll_event, max: c_int, look: Look) -> c_int {
    let polls = if look == Look::Kernel {
        None
    } else {
        crate::guard::switch(|| ops::offload::quiet::polls(epfd)).flatten()
    };
    if polls.is_none() && look == Look::Spin {
        crate::guard::switch(|| ops::offload::poll_epoll_set(epfd));
    }
    // SAFETY: the caller's arguments.
    let n = unsafe { crate::real::epoll_wait(epfd, events, max, 0) };
    let Some(polls) = polls.filter(|_| n >= 0) else {
        return n;
    };
    let found = ROUND.try_with(|r| {
        let Ok(mut r) = r.try_borrow_mut() else {
            return n; // a signal handler's epoll_wait inside ours: the kernel's events only
        };
        let (kernel, round) = &mut *r;
        kernel.clear();
        // SAFETY: the kernel wrote `n` events there.
        kernel.extend(
            (0..n as usize).map(|i| unsafe { std::ptr::read_unaligned(events.add(i)) }.u64),
        );
        let room = (max - n) as usize;
        if crate::guard::switch(|| ops::offload::quiet::round(epfd, &polls, kernel, room, round))
            != Some(true)
        {
            return n; // a sleeper or a handoff came meanwhile: the kernel's events only
        }
        for &i in &round.merge {
            // SAFETY: an event the kernel wrote.
            unsafe {
                let mut e = std::ptr::read_unaligned(events.add(i));
                e.events |= libc::EPOLLIN as u32;
                std::ptr::write_unaligned(events.add(i), e);
            }
        }
        if round.add.is_empty() {
            return n;
        }
        let add = &mut round.add;
        let bytes = add.len() * std::mem::size_of::<epoll_event>();
        // SAFETY: within the caller's `max` events (`room` bounds `add`).
        let dst = unsafe { events.add(n as usize) };
        if vm_io(true, add.as_mut_ptr().cast(), dst.cast(), bytes) != bytes as isize {
            if ops::sys::errno() != libc::EFAULT {
                // Not the buffer: the call itself is refused here (a seccomp filter). The
                // kernel reports those connections from now on.
                crate::guard::switch(ops::offload::quiet::turn_off);
                ops::sys::set_errno(0);
                return n;
            }
            if n == 0 {
                ops::sys::set_errno(libc::EFAULT);
                return -1;
            }
            return n;
        }
        n + add.len() as c_int
    });
    found.unwrap_or(n)
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
    let n = match unsafe { spin_epoll(epfd, events, max, timeout) } {
        Some(n) => n,
        None => {
            let _sleeping = kernel_wait();
            unsafe { crate::real::epoll_wait(epfd, events, max, timeout) }
        }
    };
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
    let n = {
        let _sleeping = kernel_wait();
        unsafe { crate::real::epoll_pwait2(epfd, events, max, timeout, mask) }
    };
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
    let mut spun = None;
    if mask.is_null() || crate::hooks::data::user_readable(mask.cast(), 8) {
        spun = unsafe { spin_epoll(epfd, events, max, timeout) };
    }
    let n = match spun {
        Some(n) => n,
        None => {
            let _sleeping = kernel_wait();
            unsafe { crate::real::epoll_pwait(epfd, events, max, timeout, mask) }
        }
    };
    let errno = ops::sys::errno();
    ops::offload::lazy::leave(epfd);
    ops::sys::set_errno(errno);
    n
}
