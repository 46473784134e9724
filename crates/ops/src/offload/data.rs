//! Data calls on offloaded fds: what `read`, `send`, `recvmsg` and friends do when the fd
//! names an SDP connection.
//!
//! Blocking is the kernel's: when nothing can be done now and the fd is blocking, the call
//! blocks in a real system call on the app end (a peeking one-byte `recv` for readers, a
//! one-byte `send` into the stuffed direction for writers), so SO_RCVTIMEO/SO_SNDTIMEO,
//! signals, EINTR and SA_RESTART behave exactly as on any socket. When it returns, the call
//! tries again.

use std::sync::Arc;

use super::stream::Errno;
use super::{Conn, PENDING_SNDBUF, Phase, lookup};
use crate::sys::{errno, set_errno};

/// A call's result in C terms: `Ok(n)` or `Err(errno)`.
pub type CResult = Result<isize, Errno>;

/// Maps a result to the C convention (return -1 with errno set).
pub fn to_c(r: CResult) -> isize {
    match r {
        Ok(n) => n,
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

/// Whether `fd`'s file is non-blocking (O_NONBLOCK).
pub fn is_nonblocking(fd: i32) -> bool {
    // SAFETY: F_GETFL on an fd number; a closed fd just fails.
    let fl = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) } as i32;
    fl >= 0 && fl & libc::O_NONBLOCK != 0
}

/// The busy-poll budget of blocking receives: `LIBSDP_SPIN_US` (default 20 µs, 0 disables,
/// at most one second). A value that is not a number is reported once and the default used.
pub fn spin_budget() -> std::time::Duration {
    const DEFAULT: u64 = 20;
    const MAX: u64 = 1_000_000;
    static US: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let us = *US.get_or_init(|| {
        let Some(raw) = std::env::var_os("LIBSDP_SPIN_US") else {
            return DEFAULT;
        };
        let text = raw.to_string_lossy();
        match text.trim().parse::<u64>() {
            Ok(us) if us <= MAX => us,
            Ok(_) => {
                crate::sdp_log!(
                    crate::log::ERROR,
                    "LIBSDP_SPIN_US={text:?} is more than {MAX} microseconds; using {MAX}"
                );
                MAX
            }
            Err(_) => {
                crate::sdp_log!(
                    crate::log::ERROR,
                    "LIBSDP_SPIN_US={text:?} is not a number of microseconds; using {DEFAULT}"
                );
                DEFAULT
            }
        }
    });
    std::time::Duration::from_micros(us)
}

/// Spins (with yields) until the connection has something for a reader, for at most the
/// budget. `true`: try the receive again.
fn spin_for_data(conn: &Arc<Conn>) -> bool {
    let budget = spin_budget();
    if budget.is_zero() {
        return false;
    }
    let start = std::time::Instant::now();
    crate::stats::bump(crate::stats::header::RECV_SPINS, 1);
    // What this receive finds by polling needs no bell from the peer (a send and a drain, one
    // system call on each side, per message of a request-response exchange).
    // Listed, so that an exec or a fork under way asks again (`quiet`).
    {
        let mut g = conn.lock();
        if g.quiet_while_polling() && !super::quiet::note_receive_quiet(&mut g) {
            g.sync();
        }
    }
    loop {
        {
            let mut g = conn.lock();
            match &mut g.phase {
                Phase::Offloaded(s) => {
                    s.progress();
                    if s.recv_ready() {
                        crate::stats::spin_hit(g.row.as_ref());
                        return true;
                    }
                }
                Phase::Tcp => return true,
                Phase::Pending { .. } => return false,
            }
        }
        let spent = start.elapsed();
        if spent >= budget {
            // Ask for the bell again before sleeping, and look once more (the eventcount).
            let mut g = conn.lock();
            g.sync();
            return match &mut g.phase {
                Phase::Offloaded(s) => s.recv_ready(),
                Phase::Tcp => true,
                Phase::Pending { .. } => false,
            };
        }
        if spent < PURE_SPIN {
            std::hint::spin_loop();
        } else {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::syscall(libc::SYS_sched_yield) };
        }
    }
}

/// The first part of a receive's busy-poll, without yielding the CPU: an answer on another
/// CPU usually comes within it, and a yield (a system call) would delay seeing it.
const PURE_SPIN: std::time::Duration = std::time::Duration::from_micros(2);

/// Blocks in the kernel until the app end is readable (or a timeout, a signal).
fn wait_readable(fd: i32) -> Result<(), Errno> {
    // A fork child that blocks needs its own progress thread to learn of the peer's end.
    crate::progress::after_fork_lazy();
    let _sleeping = super::quiet::sleeping();
    let mut b = [0u8; 1];
    // SAFETY: one writable byte; a peeking recv consumes nothing.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            b.as_mut_ptr(),
            1usize,
            libc::MSG_PEEK,
            std::ptr::null_mut::<u8>(),
            std::ptr::null_mut::<u8>(),
        )
    };
    if n >= 0 { Ok(()) } else { Err(errno()) }
}

/// The calling thread's asynchronous signals held back while a blocking call runs and
/// waits, as TCP's calls are in the kernel: a signal that comes while the call runs in user
/// space between two waits must still end the wait that follows, as TCP checks for a pending
/// signal before every sleep. Before 2026-11-26 such a signal ran its handler and the call
/// slept on until the peer moved (CPython's `test_wsgiref` `test_interrupted_write` took 1.1 s
/// instead of 0.03 s: its handler ran only when the test signalled again a second later).
/// [`wait_app_end`] waits with a signalfd of the held signals beside the app end, and decides
/// what a signal that comes does as the kernel would (see [`SignalsHeld::let_in`]). Dropping
/// it restores the mask: what came meanwhile is delivered then, on the way out of the call.
/// A signal that comes after the call's first attempt and before the hold is still the
/// handler's alone (a few microseconds, once per call; holding from every blocking send's
/// start would cost it two system calls).
struct SignalsHeld {
    /// The mask before the hold.
    old: libc::sigset_t,
    /// The signals the hold blocks that `old` did not.
    ours: libc::sigset_t,
    /// A signalfd of `ours` (-1: not made yet, -2: could not be made).
    sigfd: std::cell::Cell<i32>,
}

/// What a signal that ends a wait does to the call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnSignal {
    /// Nothing moved yet: a handler installed with SA_RESTART restarts the call (it goes on
    /// waiting), one without it ends the call with EINTR.
    Restart,
    /// Bytes moved: any handler ends the call, which returns them.
    Return,
}

/// `rt_sigprocmask(how, set, old)` on the kernel's 8-byte sigset.
fn sigmask(how: i32, set: &libc::sigset_t, old: Option<&mut libc::sigset_t>) {
    // SAFETY: valid pointers to sigsets that outlive the call.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            how,
            set as *const libc::sigset_t,
            old.map_or(std::ptr::null_mut(), |o| o as *mut libc::sigset_t),
            8usize,
        )
    };
}

impl SignalsHeld {
    fn hold() -> SignalsHeld {
        // SAFETY: sigset_t is plain data; the set calls take valid pointers.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            // Synchronous signals (our own fault must not wait) and the C library's own two
            // (32 and 33: thread cancellation, and setuid in a threaded process, which waits
            // for every thread to take it) stay open.
            for sig in [
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGFPE,
                libc::SIGILL,
                libc::SIGTRAP,
                libc::SIGSYS,
                32,
                33,
            ] {
                libc::sigdelset(&mut all, sig);
            }
            let mut old: libc::sigset_t = std::mem::zeroed();
            sigmask(libc::SIG_BLOCK, &all, Some(&mut old));
            let mut ours: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut ours);
            for sig in 1..=64 {
                if libc::sigismember(&all, sig) == 1 && libc::sigismember(&old, sig) != 1 {
                    libc::sigaddset(&mut ours, sig);
                }
            }
            SignalsHeld {
                old,
                ours,
                sigfd: std::cell::Cell::new(-1),
            }
        }
    }

    /// The signalfd of the held signals, made at the first wait; `None` if it cannot be.
    fn signal_fd(&self) -> Option<i32> {
        if self.sigfd.get() == -1 {
            // SAFETY: a valid set; the kernel's 8-byte sigset.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_signalfd4,
                    -1,
                    &self.ours as *const libc::sigset_t,
                    8usize,
                    libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
                )
            } as i32;
            if fd >= 0 {
                crate::sys::mark_internal(fd);
            }
            self.sigfd.set(if fd >= 0 { fd } else { -2 });
        }
        let fd = self.sigfd.get();
        (fd >= 0).then_some(fd)
    }

    /// Lets the held signals that came in (their handlers run on the way back from this
    /// call) and holds them again. `true`: the call ends with EINTR, as the kernel's would:
    /// under [`OnSignal::Restart`], when one of them has a handler without SA_RESTART; under
    /// [`OnSignal::Return`], when one of them has a handler. An ignored signal, or one whose
    /// default action is to be ignored, does nothing (the kernel does not even wake the call);
    /// one that stops the process lets the call go on once continued; one that kills it does.
    fn let_in(&self, on: OnSignal) -> bool {
        // SAFETY: plain data and valid pointers throughout.
        unsafe {
            let mut pending: libc::sigset_t = std::mem::zeroed();
            libc::syscall(
                libc::SYS_rt_sigpending,
                &mut pending as *mut libc::sigset_t,
                8usize,
            );
            let mut ends = false;
            for sig in 1..=64 {
                if libc::sigismember(&pending, sig) != 1 || libc::sigismember(&self.ours, sig) != 1
                {
                    continue;
                }
                let mut sa: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut sa) != 0 {
                    continue;
                }
                if sa.sa_sigaction == libc::SIG_IGN || sa.sa_sigaction == libc::SIG_DFL {
                    continue;
                }
                if on == OnSignal::Return || sa.sa_flags & libc::SA_RESTART == 0 {
                    ends = true;
                }
            }
            sigmask(libc::SIG_SETMASK, &self.old, None);
            sigmask(libc::SIG_BLOCK, &self.ours, None);
            ends
        }
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        let fd = self.sigfd.get();
        if fd >= 0 {
            crate::sys::close(fd);
        }
        // Restores the mask saved by `hold`.
        sigmask(libc::SIG_SETMASK, &self.old, None);
    }
}

/// Blocking sends larger than this hold signals back from their start (see `send`).
const HOLD_FROM_START: usize = 64 << 10;

/// The socket's SO_RCVTIMEO or SO_SNDTIMEO in milliseconds (`None`: none set).
fn timeout_ms(fd: i32, opt: i32) -> Option<i64> {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: tv and len are valid for writes.
    unsafe {
        libc::syscall(
            libc::SYS_getsockopt,
            fd,
            libc::SOL_SOCKET,
            opt,
            &mut tv as *mut _,
            &mut len as *mut _,
        )
    };
    if tv.tv_sec == 0 && tv.tv_usec == 0 {
        None
    } else {
        Some((tv.tv_sec * 1000 + tv.tv_usec / 1000).max(1))
    }
}

/// Blocks until the app end polls `events` (POLLOUT: the peer drained our stuffing; POLLIN:
/// more bytes), honouring the socket's timeout `opt` (SO_SNDTIMEO, SO_RCVTIMEO: EAGAIN), with
/// the signals `held` back: one that comes ends the wait with EINTR or not as `on` says
/// ([`SignalsHeld::let_in`]). Without a signalfd (no descriptor left) the signals are let in
/// for the wait itself (`ppoll`'s mask) and any handler ends it.
///
/// Writers wait here rather than in a one-byte `send` (which would restart under SA_RESTART
/// as a real send does) because a byte written here could be taken for the application's own
/// data by the stray-write watch once another thread unstuffed the app end.
fn wait_app_end(
    fd: i32,
    events: i16,
    opt: i32,
    held: &SignalsHeld,
    on: OnSignal,
) -> Result<(), Errno> {
    crate::progress::after_fork_lazy();
    let _sleeping = super::quiet::sleeping();
    let deadline = timeout_ms(fd, opt)
        .map(|ms| std::time::Instant::now() + std::time::Duration::from_millis(ms as u64));
    let sigfd = held.signal_fd();
    loop {
        // A pending connection that goes back to TCP re-points `fd` from the app end to the
        // kernel socket under this wait, and the kernel's ppoll registers for wake-ups on its
        // first pass only: woken once by the library's end of stream on the old app end, it
        // looks at the socket, and when that cannot take bytes yet it sleeps there for ever,
        // registered nowhere (as the application's own `poll` would: the preload's readiness
        // hooks slice for that). So while this connection is pending the wait is made in
        // slices, and once it is not the call looks again.
        let sliced = super::any_pending() && is_pending(fd);
        let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let slice = if sliced {
            Some(left.map_or(PENDING_SLICE, |l| l.min(PENDING_SLICE)))
        } else {
            left
        };
        let ts = slice.map(|d| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let mut p = [
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: valid pollfds (a negative fd is ignored); the timespec and the mask live
        // across the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_ppoll,
                p.as_mut_ptr(),
                2,
                ts.as_ref()
                    .map_or(std::ptr::null(), |t| t as *const libc::timespec),
                if sigfd.is_some() {
                    std::ptr::null()
                } else {
                    &held.old as *const libc::sigset_t
                },
                8usize,
            )
        };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR && sigfd.is_some() {
                continue; // a signal the hold leaves open (the C library's own): no effect
            }
            return Err(e);
        }
        if n == 0 {
            // A slice ended, not the socket's timeout.
            if sliced && slice != left {
                if is_pending(fd) {
                    continue;
                }
                return Ok(()); // gone to TCP or offloaded: the caller looks again
            }
            return Err(libc::EAGAIN);
        }
        if p[0].revents != 0 {
            return Ok(());
        }
        if p[1].revents != 0 && held.let_in(on) {
            return Err(libc::EINTR);
        }
    }
}

/// The slice of a wait on the app end of a pending connection (see [`wait_app_end`]).
const PENDING_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

/// Whether `fd` names a connection that is still pending.
fn is_pending(fd: i32) -> bool {
    lookup(fd).is_some_and(|c| matches!(c.lock().phase, Phase::Pending { .. }))
}

fn raise_sigpipe() {
    // LINUX: a stream socket write on a broken connection raises SIGPIPE in the calling thread.
    // SAFETY: signalling our own thread.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::syscall(libc::SYS_getpid),
            libc::syscall(libc::SYS_gettid),
            libc::SIGPIPE,
        )
    };
}

fn total_len(bufs: &[&[u8]]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// Skips `n` bytes of a gather list.
fn advance<'a>(bufs: &[&'a [u8]], mut n: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        if n >= b.len() {
            n -= b.len();
        } else {
            out.push(&b[n..]);
            n = 0;
        }
    }
    out
}

/// The result of a receive or send that finds its connection closed by another thread while
/// it waited (lingering or released): the bytes it moved, or EBADF. The number may name
/// another file by now (a socket accepted since), which is not the call's to use or wait on.
/// Over TCP the call would go on waiting on the closed socket.
fn closed_under_call(moved: usize) -> CResult {
    if moved > 0 {
        Ok(moved as isize)
    } else {
        Err(libc::EBADF)
    }
}

/// `recv` family on an offloaded fd. `None`: the fd is not (or no longer) offloaded — the
/// caller passes the call to the kernel.
pub fn recv(fd: i32, bufs: &mut [&mut [u8]], flags: i32) -> Option<CResult> {
    let conn = lookup(fd)?;
    let want: usize = bufs.iter().map(|b| b.len()).sum();
    if flags & libc::MSG_OOB != 0 {
        return Some(recv_oob(&conn, bufs, flags));
    }
    if flags & libc::MSG_ERRQUEUE != 0 {
        // LINUX: reading a socket's error queue never waits: EAGAIN when it is empty. Nothing
        // of an offloaded connection passes through the kernel's TCP (no timestamps, no
        // zero-copy completions, no ICMP errors), so its queue is always empty. This waited
        // for data like a plain receive before, for ever if none came.
        return Some(Err(libc::EAGAIN));
    }
    let peek = flags & libc::MSG_PEEK != 0;
    let waitall = flags & libc::MSG_WAITALL != 0 && !peek;
    let dontwait = flags & libc::MSG_DONTWAIT != 0;
    let mut got = 0usize;
    let mut held: Option<SignalsHeld> = None;
    // The app end's wait ended with EINTR: the next look for bytes is the last.
    let mut interrupted = false;
    loop {
        {
            let mut g = conn.lock();
            if g.closed {
                return Some(closed_under_call(got));
            }
            let r = match &mut g.phase {
                // A MSG_WAITALL receive that took bytes before the connection left this
                // process (relayed): those bytes are its result; the kernel would read into
                // the same buffer again.
                Phase::Tcp if got > 0 => return Some(Ok(got as isize)),
                Phase::Tcp => return None,
                Phase::Pending { .. } => Err(libc::EAGAIN),
                // LINUX: a zero-length receive waits like any other (EAGAIN when non-blocking)
                // and returns 0 once something is there.
                Phase::Offloaded(s) if want == 0 => {
                    s.progress();
                    if s.recv_ready() {
                        Ok(0)
                    } else {
                        Err(libc::EAGAIN)
                    }
                }
                Phase::Offloaded(s) => {
                    s.progress();
                    let mut rest = skip_mut(bufs, got);
                    s.recv(&mut rest, peek)
                }
            };
            let shut_rd = g.shut_rd;
            g.sync();
            crate::sdp_log!(
                crate::log::TRACE,
                "recv fd {fd} want {want} flags {flags:#x}: {r:?}"
            );
            match r {
                Ok(0) if want > 0 => return Some(Ok(got as isize)),
                Ok(n) => {
                    got += n;
                    if !waitall || got >= want {
                        return Some(Ok(got as isize));
                    }
                }
                Err(libc::EAGAIN) if shut_rd => return Some(Ok(got as isize)),
                Err(libc::EAGAIN) => {}
                Err(e) => {
                    return Some(if got > 0 { Ok(got as isize) } else { Err(e) });
                }
            }
        }
        if dontwait || is_nonblocking(fd) || interrupted {
            return Some(if got > 0 {
                Ok(got as isize)
            } else if interrupted {
                Err(libc::EINTR)
            } else {
                Err(libc::EAGAIN)
            });
        }
        if got > 0 {
            // A MSG_WAITALL receive with part of its bytes: from here a signal ends it with
            // those bytes (see `SignalsHeld`), so it waits with the signals held back.
            if held.is_none() {
                // Bytes that came before the hold are not waited for.
                held = Some(SignalsHeld::hold());
                continue;
            }
            let h = held.as_ref().expect("held above");
            if let Err(e) = wait_app_end(fd, libc::POLLIN, libc::SO_RCVTIMEO, h, OnSignal::Return) {
                return Some(if e == libc::EINTR || e == libc::EAGAIN {
                    Ok(got as isize)
                } else {
                    Err(e)
                });
            }
            continue;
        }
        // Busy-poll a short while before sleeping: a reply usually comes within microseconds,
        // and waking from the kernel costs more than that. Yielding keeps a peer that shares
        // our CPU running.
        if spin_for_data(&conn) {
            continue;
        }
        if let Err(e) = wait_readable(fd) {
            if e == libc::EINTR && !interrupted {
                // LINUX: TCP takes the bytes that arrived with the signal (its receive looks
                // at the queue before it looks for a signal); the app end's wait does not.
                // One more look, without waiting: bytes there are the call's result.
                interrupted = true;
                continue;
            }
            return Some(Err(e));
        }
    }
}

/// The tail of a scatter list after `n` bytes.
fn skip_mut<'a>(bufs: &'a mut [&mut [u8]], mut n: usize) -> Vec<&'a mut [u8]> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs.iter_mut() {
        if n >= b.len() {
            n -= b.len();
        } else {
            out.push(&mut b[n..]);
            n = 0;
        }
    }
    out
}

fn recv_oob(conn: &Arc<Conn>, bufs: &mut [&mut [u8]], flags: i32) -> CResult {
    let mut g = conn.lock();
    let r = match &mut g.phase {
        Phase::Offloaded(s) => {
            // The urgent byte may wait in the ring, unseen: its out-of-band marker on the app
            // end (POLLPRI) can come before the progress that takes the message in. Without
            // this an application woken by POLLPRI got EINVAL (CPython's test_asyncore
            // `test_handle_expt`: the server sends one urgent byte right after its accept).
            s.progress();
            s.recv_oob(flags & libc::MSG_PEEK != 0)
        }
        _ => Err(libc::EINVAL),
    };
    if r.is_ok() && flags & libc::MSG_PEEK == 0 {
        // The out-of-band byte that made the app end poll POLLPRI is spent with it; what it
        // leaves behind on the app end is drained at the next sync.
        let mut spent = [0u8; 1];
        super::raw_recv(g.app_int, &mut spent, libc::MSG_OOB | libc::MSG_DONTWAIT);
        g.bytes_in = true;
    }
    g.sync();
    let b = r?;
    match bufs.iter_mut().find(|b| !b.is_empty()) {
        Some(first) => {
            first[0] = b;
            Ok(1)
        }
        None => Ok(0),
    }
}

/// `send` family on an offloaded fd.
pub fn send(fd: i32, bufs: &[&[u8]], flags: i32) -> Option<CResult> {
    let conn = lookup(fd)?;
    let total = total_len(bufs);
    let oob = flags & libc::MSG_OOB != 0;
    let dontwait = flags & libc::MSG_DONTWAIT != 0;
    let nosignal = flags & libc::MSG_NOSIGNAL != 0;
    let mut sent = 0usize;
    let mut stalled = false;
    // A big blocking send holds signals back from its start: its first attempt alone copies
    // for a long while (a megabyte into the ring), and a signal that came then would go
    // unnoticed by the wait that follows (see `SignalsHeld`).
    let mut held =
        (total > HOLD_FROM_START && !dontwait && !is_nonblocking(fd)).then(SignalsHeld::hold);
    loop {
        {
            let mut g = conn.lock();
            let rest = advance(bufs, sent);
            if g.closed {
                return Some(closed_under_call(sent));
            }
            if matches!(g.phase, Phase::Tcp) && sent > 0 {
                // The pending connection went back to TCP while this call waited, with `sent`
                // bytes of it already in the pending buffer (which went ahead on the socket):
                // the rest goes after them. Before 2026-11-27 this passed the whole call to
                // the kernel, and the peer got those bytes twice.
                drop(g);
                drop(held);
                return Some(Ok((sent + kernel_send(fd, &rest, flags)) as isize));
            }
            let r = match &mut g.phase {
                Phase::Tcp => return None,
                Phase::Pending { sendbuf, shut_wr } => {
                    if *shut_wr {
                        Err(libc::EPIPE)
                    } else {
                        let room = PENDING_SNDBUF.saturating_sub(sendbuf.len());
                        let mut n = 0;
                        for b in &rest {
                            let take = b.len().min(room - n);
                            sendbuf.extend_from_slice(&b[..take]);
                            n += take;
                            if n == room {
                                break;
                            }
                        }
                        // No room before the peer accepted: a stall for credits as well.
                        if n == 0 && rest.iter().any(|b| !b.is_empty()) {
                            Err(libc::EAGAIN)
                        } else {
                            Ok(n)
                        }
                    }
                }
                Phase::Offloaded(s) => {
                    s.progress();
                    s.send(&rest, oob)
                }
            };
            let wanted = total - sent;
            g.sync_after_send(match r {
                Ok(n) => n < wanted,
                Err(e) => e == libc::EAGAIN,
            });
            crate::sdp_log!(crate::log::TRACE, "send fd {fd} total {total}: {r:?}");
            match r {
                Ok(n) => {
                    sent += n;
                    if sent >= total {
                        return Some(Ok(sent as isize));
                    }
                    // The rest found no room: the call waits for credits (or returns short).
                    if !std::mem::replace(&mut stalled, true) {
                        crate::stats::credit_stall(g.row.as_ref())
                    }
                }
                Err(libc::EAGAIN) if !std::mem::replace(&mut stalled, true) => {
                    crate::stats::credit_stall(g.row.as_ref())
                }
                Err(libc::EAGAIN) => {}
                Err(e) => {
                    if sent > 0 {
                        return Some(Ok(sent as isize));
                    }
                    if e == libc::EPIPE && !nosignal {
                        raise_sigpipe();
                    }
                    return Some(Err(e));
                }
            }
        }
        if dontwait || is_nonblocking(fd) {
            return Some(if sent > 0 {
                Ok(sent as isize)
            } else {
                Err(libc::EAGAIN)
            });
        }
        if held.is_none() {
            // The send waits: from here a signal ends it (see `SignalsHeld`).
            // Room that came back before the hold is not waited for.
            held = Some(SignalsHeld::hold());
            continue;
        }
        let on = if sent > 0 {
            OnSignal::Return
        } else {
            OnSignal::Restart
        };
        let h = held.as_ref().expect("held above");
        if let Err(e) = wait_app_end(fd, libc::POLLOUT, libc::SO_SNDTIMEO, h, on) {
            return Some(if sent > 0 { Ok(sent as isize) } else { Err(e) });
        }
    }
}

/// The rest of a send that began before its connection went back to TCP, sent on the kernel
/// socket the fd names now, as the kernel sends (blocking or not, as the socket and `flags`
/// say). Bytes it took; an error is left for the next call to meet, as the kernel reports
/// one after a partial send.
fn kernel_send(fd: i32, bufs: &[&[u8]], flags: i32) -> usize {
    let iov: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: plain data; all zero is an empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    // SAFETY: the iovecs name the caller's live buffers; a raw call bypasses our hooks.
    // MSG_NOSIGNAL: the call reports the bytes it moved, and a kernel send that returns some
    // raises no SIGPIPE either.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendmsg,
            fd,
            &msg as *const libc::msghdr,
            flags | libc::MSG_NOSIGNAL,
        )
    };
    n.max(0) as usize
}

/// What `shutdown` does on an offloaded fd.
pub fn shutdown(fd: i32, how: i32) -> Option<CResult> {
    let conn = lookup(fd)?;
    let mut g = conn.lock();
    if !matches!(how, libc::SHUT_RD | libc::SHUT_WR | libc::SHUT_RDWR) {
        return Some(Err(libc::EINVAL));
    }
    let rd = how == libc::SHUT_RD || how == libc::SHUT_RDWR;
    let wr = how == libc::SHUT_WR || how == libc::SHUT_RDWR;
    match &mut g.phase {
        Phase::Tcp => return None,
        Phase::Pending { shut_wr, .. } => {
            if wr {
                *shut_wr = true;
            }
        }
        Phase::Offloaded(s) => {
            if wr {
                s.shutdown_write();
            }
        }
    }
    if rd {
        g.shut_rd = true;
    }
    // A pending connection's app end is half-closed when it is installed (`install_stream`).
    if wr && let Phase::Offloaded(s) = &g.phase {
        g.half_close_app_end(s.transport());
    }
    g.sync();
    Some(Ok(0))
}

/// The kernel socket behind an offloaded fd (for getsockname, getpeername, options).
pub fn shadow_of(fd: i32) -> Option<i32> {
    let conn = lookup(fd)?;
    let g = conn.lock();
    match g.phase {
        Phase::Tcp => None,
        _ => Some(g.shadow),
    }
}

/// `getsockopt(SOL_SOCKET, SO_ERROR)`: the pending error, cleared by reading it.
pub fn take_so_error(fd: i32) -> Option<i32> {
    let conn = lookup(fd)?;
    let mut g = conn.lock();
    if matches!(g.phase, Phase::Tcp) {
        return None;
    }
    let e = std::mem::take(&mut g.so_error);
    if e != 0 {
        return Some(e);
    }
    match &mut g.phase {
        Phase::Offloaded(s) => Some(s.take_error().unwrap_or(0)),
        _ => Some(0),
    }
}

/// ioctl FIONREAD / SIOCOUTQ / SIOCATMARK on an offloaded fd.
pub fn ioctl_query(fd: i32, request: u64) -> Option<Result<i32, Errno>> {
    let conn = lookup(fd)?;
    let mut g = conn.lock();
    let v = match &mut g.phase {
        Phase::Tcp => return None,
        Phase::Pending { sendbuf, .. } => match request {
            r if r == libc::FIONREAD => 0,
            r if r == libc::TIOCOUTQ => sendbuf.len() as i32,
            _ => 0,
        },
        Phase::Offloaded(s) => {
            s.progress();
            match request {
                r if r == libc::FIONREAD => s.recv_queued().min(i32::MAX as usize) as i32,
                r if r == libc::TIOCOUTQ => s.send_queued().min(i32::MAX as usize) as i32,
                _ => s.at_mark() as i32,
            }
        }
    };
    g.sync();
    Some(Ok(v))
}

/// SIOCATMARK's request number (Linux, all architectures libsdp builds for).
pub const SIOCATMARK: u64 = 0x8905;

/// `connect` again on an offloaded fd: it is connected (or, back on TCP, the kernel answers).
pub fn connect_again(fd: i32) -> Option<CResult> {
    let conn = lookup(fd)?;
    let mut g = conn.lock();
    if matches!(g.phase, Phase::Tcp) {
        return None;
    }
    if g.connect_in_progress {
        // LINUX: after EINPROGRESS, connect reports EALREADY while the handshake runs, then 0
        // once, then EISCONN.
        let mut p = libc::pollfd {
            fd: g.shadow,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        unsafe { libc::syscall(libc::SYS_poll, &mut p as *mut libc::pollfd, 1, 0) };
        if p.revents & libc::POLLOUT == 0 {
            return Some(Err(libc::EALREADY));
        }
        g.connect_in_progress = false;
        return Some(Ok(0));
    }
    Some(Err(libc::EISCONN))
}
