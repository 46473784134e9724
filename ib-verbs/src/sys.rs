//! The system calls the transport makes, and nothing else.
//!
//! Every call goes through `libc::syscall` (or a libc function the preload never interposes,
//! such as `mmap`): this crate is linked into `libsdp.so`, whose exported `close`, `read`,
//! `sendmsg`, ... would otherwise be re-entered for our own internal fds (STYLE.md: "never call an
//! interposed libc symbol by name"). Every fd created here is `O_CLOEXEC`; every fd received by
//! `SCM_RIGHTS` is received with `MSG_CMSG_CLOEXEC`.
//!
//! This is one of the two modules of the crate that hold `unsafe` code (the other is
//! `shm::mem`); each block says which contract holds.

use std::fmt;
use std::os::fd::RawFd;

/// A failed system call: which one and the errno it returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysError {
    /// The call that failed (`"sendmsg"`, `"process_vm_readv"`, ...).
    pub op: &'static str,
    /// The errno it set.
    pub errno: i32,
}

impl fmt::Display for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: errno {}", self.op, self.errno)
    }
}

impl std::error::Error for SysError {}

pub type SysResult<T> = Result<T, SysError>;

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(op: &'static str, rc: libc::c_long) -> SysResult<libc::c_long> {
    if rc < 0 {
        Err(SysError { op, errno: errno() })
    } else {
        Ok(rc)
    }
}

/// An owned file descriptor, closed with the raw `close` system call when dropped.
///
/// Not `std::os::fd::OwnedFd`: its `Drop` calls `libc::close`, which inside `libsdp.so` is our
/// own hook.
#[derive(Debug)]
pub struct Fd(RawFd);

/// Where descriptors the library keeps start (as in `ops`), above what programs use.
pub const INTERNAL_FD_MIN: RawFd = 400;

/// Which fd numbers the library holds: every [`Fd`] from its creation to its drop, and the
/// raw descriptors `ops` keeps (its `sys::mark_internal`). Programs never opened them, so the
/// preload's `close`, `close_range` and `closefrom` leave them open and answer as the kernel
/// would for a number that is not open: a loop that closes every descriptor it did not open
/// (a forked child before it execs, Python's `subprocess`) no longer takes a connection's bell
/// ends, shadow or ring from under it.
pub mod internal {
    use std::os::fd::RawFd;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Numbers at or above this are not recorded (`fs.nr_open` defaults to 1 Mi).
    pub const LIMIT: usize = 1 << 20;

    static BITS: [AtomicU64; LIMIT / 64] = [const { AtomicU64::new(0) }; LIMIT / 64];

    fn at(fd: RawFd) -> Option<(&'static AtomicU64, u64)> {
        let i = usize::try_from(fd).ok().filter(|&i| i < LIMIT)?;
        Some((&BITS[i / 64], 1u64 << (i % 64)))
    }

    pub fn mark(fd: RawFd) {
        if let Some((w, bit)) = at(fd) {
            w.fetch_or(bit, Ordering::AcqRel);
        }
    }

    pub fn unmark(fd: RawFd) {
        if let Some((w, bit)) = at(fd) {
            w.fetch_and(!bit, Ordering::AcqRel);
        }
    }

    /// Whether the library holds `fd` (one load).
    #[inline]
    pub fn contains(fd: RawFd) -> bool {
        at(fd).is_some_and(|(w, bit)| w.load(Ordering::Acquire) & bit != 0)
    }

    /// The library's numbers in `first..=last`, ascending.
    pub fn within(first: u32, last: u32) -> Vec<RawFd> {
        let mut out = Vec::new();
        let (first, last) = (first as usize, (last as usize).min(LIMIT - 1));
        if first > last {
            return out;
        }
        for (wi, word) in BITS.iter().enumerate().take(last / 64 + 1).skip(first / 64) {
            let mut w = word.load(Ordering::Acquire);
            while w != 0 {
                let i = wi * 64 + w.trailing_zeros() as usize;
                w &= w - 1;
                if (first..=last).contains(&i) {
                    out.push(i as RawFd);
                }
            }
        }
        out
    }
}

impl Fd {
    /// Takes ownership of a descriptor just made by a system call, and records it as the
    /// library's ([`internal`]).
    fn owned(fd: RawFd) -> Fd {
        internal::mark(fd);
        Fd(fd)
    }

    /// Takes ownership of `fd`.
    ///
    /// The caller must own `fd` (no one else closes it). Negative values are rejected.
    pub fn from_raw(fd: RawFd) -> Option<Fd> {
        (fd >= 0).then(|| Fd::owned(fd))
    }

    /// The raw number, still owned by `self`.
    pub fn raw(&self) -> RawFd {
        self.0
    }

    /// The same open file under a number at or above [`INTERNAL_FD_MIN`], close-on-exec:
    /// descriptors a connection keeps stay out of the range programs manage themselves
    /// (`dup2(x, 12)`, closing a range of fds). Keeps the number it has when none is free there
    /// (a low RLIMIT_NOFILE).
    pub fn high(self) -> Fd {
        if self.0 >= INTERNAL_FD_MIN {
            return self;
        }
        // SAFETY: F_DUPFD_CLOEXEC on our own fd.
        let hi = unsafe {
            libc::syscall(
                libc::SYS_fcntl,
                self.0,
                libc::F_DUPFD_CLOEXEC,
                INTERNAL_FD_MIN as libc::c_long,
            )
        } as RawFd;
        if hi < 0 {
            return self;
        }
        Fd::owned(hi) // `self` drops here and closes the low number.
    }

    /// Gives up ownership without closing.
    pub fn into_raw(self) -> RawFd {
        let fd = self.0;
        std::mem::forget(self);
        fd
    }

    /// A new `O_CLOEXEC` descriptor for the same open file, numbered at least `min`.
    pub fn dup_cloexec(&self, min: RawFd) -> SysResult<Fd> {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) takes an int argument and touches no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fcntl,
                self.0,
                libc::F_DUPFD_CLOEXEC,
                min as libc::c_long,
            )
        };
        Ok(Fd::owned(check("fcntl(F_DUPFD_CLOEXEC)", rc)? as RawFd))
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor (type invariant); close touches no memory of ours.
        // LINUX: close never needs a retry on EINTR (the descriptor is released regardless).
        internal::unmark(self.0);
        unsafe {
            libc::syscall(libc::SYS_close, self.0);
        }
    }
}

/// Credentials of a UNIX socket peer, as the kernel recorded them (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`.
pub fn socketpair_stream() -> SysResult<(Fd, Fd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints, as socketpair requires.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_socketpair,
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    check("socketpair", rc)?;
    Ok((Fd::owned(fds[0]), Fd::owned(fds[1])))
}

fn abstract_addr(name: &[u8]) -> SysResult<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all zero bytes is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // LINUX: an abstract name starts with a NUL byte and is exactly `len` bytes long.
    if name.len() + 1 > sun.sun_path.len() {
        return Err(SysError {
            op: "abstract name",
            errno: libc::ENAMETOOLONG,
        });
    }
    for (dst, src) in sun.sun_path[1..].iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    Ok((sun, len as libc::socklen_t))
}

fn unix_stream_socket(nonblock: bool) -> SysResult<Fd> {
    let flags =
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblock { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: socket takes only integer arguments.
    let rc = unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, flags, 0) };
    Ok(Fd::owned(check("socket", rc)? as RawFd))
}

/// A non-blocking listening AF_UNIX stream socket bound to the abstract `name`
/// (given without the leading NUL).
/// Whether an abstract name is bound by someone (a bind attempt that fails with EADDRINUSE;
/// a successful attempt's socket is closed at once, releasing the name).
pub fn abstract_name_taken(name: &[u8]) -> bool {
    let Ok(fd) = unix_stream_socket(true) else {
        return false;
    };
    let Ok((sun, len)) = abstract_addr(name) else {
        return false;
    };
    // SAFETY: `sun` is a valid sockaddr_un of `len` meaningful bytes, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bind,
            fd.raw(),
            &sun as *const libc::sockaddr_un,
            len as libc::c_long,
        )
    };
    rc != 0 && errno() == libc::EADDRINUSE
}

pub fn listen_abstract(name: &[u8], backlog: i32) -> SysResult<Fd> {
    let fd = unix_stream_socket(true)?;
    let (sun, len) = abstract_addr(name)?;
    // SAFETY: `sun` is a valid sockaddr_un of `len` meaningful bytes, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bind,
            fd.raw(),
            &sun as *const libc::sockaddr_un,
            len as libc::c_long,
        )
    };
    check("bind", rc)?;
    // SAFETY: listen takes only integer arguments.
    let rc = unsafe { libc::syscall(libc::SYS_listen, fd.raw(), backlog as libc::c_long) };
    check("listen", rc)?;
    // Kept for the listener's (beacon) or the pending connection's (endpoint) life: out of the
    // program's numbers, or its next socket gets another number than over TCP.
    Ok(fd.high())
}

/// A blocking AF_UNIX stream socket connected to the abstract `name`.
pub fn connect_abstract(name: &[u8]) -> SysResult<Fd> {
    let fd = unix_stream_socket(false)?;
    let (sun, len) = abstract_addr(name)?;
    loop {
        // SAFETY: `sun` is a valid sockaddr_un of `len` meaningful bytes, alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_connect,
                fd.raw(),
                &sun as *const libc::sockaddr_un,
                len as libc::c_long,
            )
        };
        match check("connect", rc) {
            Ok(_) => return Ok(fd),
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `accept4(SOCK_CLOEXEC)` on a non-blocking listener; `None` when no connection is queued.
/// The accepted socket is blocking (its I/O here always uses `MSG_DONTWAIT` and `poll`), and
/// moved above the program's numbers at once: the beacon's visitors are accepted on the
/// progress thread, and one held at the lowest free number while its intent was read took
/// the number of the program's next socket (an accept right after a connect got the number
/// after it, once in about twenty runs of `tests/semantics.rs`'s addresses case).
pub fn accept(listener: &Fd) -> SysResult<Option<Fd>> {
    loop {
        // SAFETY: null address and length pointers are allowed by accept4.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_accept4,
                listener.raw(),
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
                libc::SOCK_CLOEXEC,
            )
        };
        match check("accept4", rc) {
            Ok(fd) => return Ok(Some(Fd::owned(fd as RawFd).high())),
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) if e.errno == libc::EAGAIN => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// The kernel-recorded credentials of the peer of a connected AF_UNIX socket. For a client's
/// socket connected to a listener these are the listener's credentials at `listen` time.
pub fn peer_cred(fd: &Fd) -> SysResult<PeerCred> {
    // SAFETY: ucred is plain old data; all zero bytes is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are writable and `len` holds the size of `cred`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_getsockopt,
            fd.raw(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred,
            &mut len as *mut libc::socklen_t,
        )
    };
    check("getsockopt(SO_PEERCRED)", rc)?;
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// LINUX: SO_PEERPIDFD (6.5) on x86_64 and the generic socket option table.
const SO_PEERPIDFD: libc::c_int = 77;

/// A pidfd for the peer of a connected AF_UNIX socket: SO_PEERPIDFD where the kernel has it
/// (no pid-reuse race), else `pidfd_open(pid)`.
pub fn peer_pidfd(fd: &Fd, pid: i32) -> SysResult<Fd> {
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `pidfd` and `len` are writable and `len` holds the size of `pidfd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_getsockopt,
            fd.raw(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            &mut pidfd as *mut libc::c_int,
            &mut len as *mut libc::socklen_t,
        )
    };
    if rc == 0 && pidfd >= 0 {
        let low = pidfd < INTERNAL_FD_MIN;
        let got = Fd::owned(pidfd).high();
        if low && got.raw() >= INTERNAL_FD_MIN {
            return Ok(got); // F_DUPFD_CLOEXEC made it close-on-exec
        }
        // LINUX: the returned pidfd is not O_CLOEXEC on every kernel; make it so.
        // SAFETY: fcntl(F_SETFD) takes an int argument.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fcntl,
                got.raw(),
                libc::F_SETFD,
                libc::FD_CLOEXEC as libc::c_long,
            )
        };
        check("fcntl(F_SETFD)", rc)?;
        return Ok(got);
    }
    // SAFETY: pidfd_open takes integer arguments; its fds are always O_CLOEXEC.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    Ok(Fd::owned(check("pidfd_open", rc)? as RawFd).high())
}

/// Whether the process behind `pidfd` is still running (LINUX: a pidfd polls readable once
/// the process exited).
pub fn pidfd_alive(pidfd: &Fd) -> bool {
    poll_one(pidfd, libc::POLLIN, 0)
        .map(|r| r & libc::POLLIN == 0)
        .unwrap_or(false)
}

/// Sends `bytes` and, with them, `fds` as SCM_RIGHTS; never raises SIGPIPE. Blocks only as
/// long as the socket buffer is full.
pub fn send_with_fds(fd: &Fd, bytes: &[u8], fds: &[RawFd]) -> SysResult<usize> {
    const MAX_FDS: usize = 4;
    assert!(fds.len() <= MAX_FDS);
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain old data; all zero bytes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        debug_assert!(space <= std::mem::size_of_val(&cbuf));
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` writable, aligned bytes, so the first header
        // and its data (CMSG_LEN(payload) <= space) are inside `cbuf`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg) as *mut RawFd,
                fds.len(),
            );
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` and `cbuf`, both alive and sized as declared.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sendmsg,
                fd.raw(),
                &msg as *const libc::msghdr,
                libc::MSG_NOSIGNAL,
            )
        };
        match check("sendmsg", rc) {
            Ok(n) => return Ok(n as usize),
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives into `buf` without blocking; descriptors that arrive are appended to `fds`
/// (already `O_CLOEXEC`). `Ok(0)` is end of stream; EAGAIN is returned as an error.
/// More descriptors than fit (`MSG_CTRUNC`) is an error (`EBADMSG`); the ones that did arrive
/// are closed.
pub fn recv_with_fds(fd: &Fd, buf: &mut [u8], fds: &mut Vec<Fd>) -> SysResult<usize> {
    let mut cbuf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all zero bytes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `cbuf`, both alive, writable and sized
        // as declared.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_recvmsg,
                fd.raw(),
                &mut msg as *mut libc::msghdr,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        match check("recvmsg", rc) {
            Ok(n) => break n as usize,
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    };
    let mut got = Vec::new();
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR stay within
    // them, and each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data_len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                let count = data_len / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..count {
                    got.push(Fd::owned(std::ptr::read_unaligned(data.add(i))).high());
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(SysError {
            op: "recvmsg(SCM_RIGHTS)",
            errno: libc::EBADMSG,
        });
    }
    fds.extend(got);
    Ok(n)
}

/// `poll` on one descriptor; returns `revents` (0 on timeout). `timeout_ms < 0` waits forever.
/// EINTR is returned to the caller, who owns the deadline.
pub fn poll_one(fd: &Fd, events: i16, timeout_ms: i32) -> SysResult<i16> {
    poll_raw(fd.raw(), events, timeout_ms)
}

/// [`poll_one`] on a descriptor someone else owns.
pub fn poll_raw(fd: RawFd, events: i16, timeout_ms: i32) -> SysResult<i16> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ts;
    let tsp = if timeout_ms < 0 {
        std::ptr::null()
    } else {
        ts = libc::timespec {
            tv_sec: (timeout_ms / 1000) as libc::time_t,
            tv_nsec: ((timeout_ms % 1000) as libc::c_long) * 1_000_000,
        };
        &ts as *const libc::timespec
    };
    // SAFETY: `pfd` is one writable pollfd; `tsp` is null or points at a live timespec; a null
    // signal mask leaves the mask alone.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ppoll,
            &mut pfd as *mut libc::pollfd,
            1 as libc::c_long,
            tsp,
            std::ptr::null::<libc::sigset_t>(),
            0 as libc::c_long,
        )
    };
    check("ppoll", rc)?;
    Ok(pfd.revents)
}

/// Sends one byte without blocking and without SIGPIPE. `Ok(false)`: the socket buffer is
/// full (the receiver already has bytes to wake it, so this is not an error).
pub fn send_byte(fd: RawFd) -> SysResult<bool> {
    let b = [1u8];
    loop {
        // SAFETY: `b` is one readable byte; null address with zero length is allowed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                fd,
                b.as_ptr(),
                1 as libc::c_long,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::c_long,
            )
        };
        match check("send(bell)", rc) {
            Ok(_) => return Ok(true),
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) if e.errno == libc::EAGAIN => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// `shutdown(fd, SHUT_WR)`: the other end of the socket reads end of stream after the bytes
/// already queued (and polls POLLRDHUP).
pub fn shutdown_write(fd: RawFd) -> SysResult<()> {
    // SAFETY: shutdown takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_shutdown, fd, libc::SHUT_WR) };
    check("shutdown", rc).map(|_| ())
}

/// `shutdown(fd, SHUT_RDWR)`: the other end of a socketpair polls HUP at once.
pub fn shutdown_both(fd: RawFd) -> SysResult<()> {
    // SAFETY: shutdown takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_shutdown, fd, libc::SHUT_RDWR) };
    check("shutdown", rc).map(|_| ())
}

/// Reads and discards every byte queued on a socket without blocking. Returns `true` when
/// the stream reached its end (the other end was closed by its last holder).
pub fn drain(fd: RawFd) -> SysResult<bool> {
    // A page: a peer's stuffing (its app end's send direction filled while it had no
    // credits) is a few KiB, which 64 bytes at a time took dozens of calls to discard.
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: `buf` is writable for its length; null address pointers are allowed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                fd,
                buf.as_mut_ptr(),
                buf.len() as libc::c_long,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        };
        match check("recv(bell)", rc) {
            Ok(0) => return Ok(true),
            Ok(_) => continue,
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) if e.errno == libc::EAGAIN => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// A sealed memfd of `size` bytes: it can never shrink or grow, so a mapping of it can never
/// fault with SIGBUS, whatever the peer that also holds it does.
pub fn memfd_sealed(name: &[u8], size: usize) -> SysResult<Fd> {
    let mut cname = [0u8; 32];
    let n = name.len().min(cname.len() - 1);
    cname[..n].copy_from_slice(&name[..n]);
    // SAFETY: `cname` is NUL-terminated and alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_memfd_create,
            cname.as_ptr(),
            (libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) as libc::c_long,
        )
    };
    let fd = Fd::owned(check("memfd_create", rc)? as RawFd).high();
    // SAFETY: ftruncate takes integer arguments.
    let rc = unsafe { libc::syscall(libc::SYS_ftruncate, fd.raw(), size as libc::c_long) };
    check("ftruncate", rc)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) takes an int argument.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fcntl,
            fd.raw(),
            libc::F_ADD_SEALS,
            seals as libc::c_long,
        )
    };
    check("fcntl(F_ADD_SEALS)", rc)?;
    Ok(fd)
}

/// Why a received memfd was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemfdProblem {
    /// Not a regular file (a pipe, a socket, ...), or fstat/F_GET_SEALS failed.
    NotMemfd,
    /// It can still shrink: a mapping could fault with SIGBUS.
    NotSealed,
    /// Its size is not the size both sides computed.
    WrongSize { expected: usize, actual: u64 },
}

/// Checks that a memfd received from a peer is a regular file of exactly `size` bytes sealed
/// against shrinking; returns its (device, inode).
pub fn memfd_check(fd: &Fd, size: usize) -> Result<(u64, u64), MemfdProblem> {
    // SAFETY: fcntl(F_GET_SEALS) takes no pointer.
    let seals = unsafe { libc::syscall(libc::SYS_fcntl, fd.raw(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(MemfdProblem::NotMemfd);
    }
    if seals as libc::c_int & libc::F_SEAL_SHRINK == 0 {
        return Err(MemfdProblem::NotSealed);
    }
    // SAFETY: stat is plain old data; all zero bytes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable and sized for fstat.
    let rc = unsafe { libc::fstat(fd.raw(), &mut st) };
    if rc < 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(MemfdProblem::NotMemfd);
    }
    if st.st_size as u64 != size as u64 {
        return Err(MemfdProblem::WrongSize {
            expected: size,
            actual: st.st_size as u64,
        });
    }
    Ok((st.st_dev, st.st_ino))
}

/// Whether `fd` is a socket (a received bell end must be one).
pub fn is_socket(fd: &Fd) -> bool {
    // SAFETY: stat is plain old data; all zero bytes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable and sized for fstat.
    let rc = unsafe { libc::fstat(fd.raw(), &mut st) };
    rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// Reads up to `dst.len()` bytes at `remote_addr` in process `pid` into `dst`.
/// Returns the count actually read (short at the end of a mapping).
pub fn process_vm_readv(pid: i32, dst: *mut u8, remote_addr: u64, len: usize) -> SysResult<usize> {
    let local = libc::iovec {
        iov_base: dst as *mut libc::c_void,
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: remote_addr as usize as *mut libc::c_void,
        iov_len: len,
    };
    loop {
        // SAFETY: the caller guarantees `dst` is valid for `len` writable bytes (registered
        // local memory); the remote iovec is only interpreted by the kernel, in the other
        // process, with its permission checks.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_process_vm_readv,
                pid as libc::c_long,
                &local as *const libc::iovec,
                1 as libc::c_long,
                &remote as *const libc::iovec,
                1 as libc::c_long,
                0 as libc::c_long,
            )
        };
        match check("process_vm_readv", rc) {
            Ok(n) => return Ok(n as usize),
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) -> SysResult<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the tail of `buf` is writable for the length passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_getrandom,
                buf[done..].as_mut_ptr(),
                (buf.len() - done) as libc::c_long,
                0,
            )
        };
        match check("getrandom", rc) {
            Ok(n) => done += n as usize,
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A random u64 from the kernel.
pub fn random_u64() -> SysResult<u64> {
    let mut b = [0u8; 8];
    random_bytes(&mut b)?;
    Ok(u64::from_ne_bytes(b))
}

/// Reads a whole (small, procfs) file with raw system calls.
pub fn read_small_file(path: &str, limit: usize) -> SysResult<Vec<u8>> {
    let mut cpath = Vec::with_capacity(path.len() + 1);
    cpath.extend_from_slice(path.as_bytes());
    cpath.push(0);
    // SAFETY: `cpath` is NUL-terminated and alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            cpath.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
            0,
        )
    };
    let fd = Fd::owned(check("open", rc)? as RawFd);
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while out.len() < limit {
        // SAFETY: `chunk` is writable for its length.
        let rc =
            unsafe { libc::syscall(libc::SYS_read, fd.raw(), chunk.as_mut_ptr(), chunk.len()) };
        match check("read", rc) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n as usize]),
            Err(e) if e.errno == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The kernel TCP listeners on `port` of one address family (`AF_INET` or `AF_INET6`): each
/// one's local address and owner uid.
///
/// LINUX: a sock_diag dump asking for the LISTEN state only (and the port), so the kernel
/// walks its listening hash alone. `/proc/net/tcp` prints every socket, TIME_WAIT ones
/// included, and a host that sets up thousands of connections a second keeps tens of
/// thousands of those: reading it took milliseconds of CPU each time.
pub fn tcp_listeners(family: i32, port: u16) -> SysResult<Vec<(std::net::IpAddr, u32)>> {
    const TCP_LISTEN: u32 = 10;
    Ok(tcp_sockets(family, 1 << TCP_LISTEN, port)?
        .into_iter()
        .filter(|s| s.state == TCP_LISTEN as u8 && s.local.port() == port)
        .map(|s| (s.local.ip(), s.uid))
        .collect())
}

/// A TCP socket as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// The kernel's TCP state (1 ESTABLISHED … 10 LISTEN).
    pub state: u8,
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    pub uid: u32,
    pub inode: u32,
}

/// The TCP sockets of this network namespace in the states of `states` (a bit per state), of
/// one address family (`AF_INET` or `AF_INET6`); `port` non-zero: the kernel keeps only those
/// with that local port (a hint: callers still check).
///
/// LINUX: sock_diag formats nothing and skips the states not asked for; `/proc/net/tcp`
/// prints every socket, TIME_WAIT ones included.
pub fn tcp_sockets(family: i32, states: u32, port: u16) -> SysResult<Vec<TcpSocket>> {
    let mut id = DiagId::any();
    id.sport = port.to_be();
    sock_diag(family, states, id, true)
}

/// The one TCP socket whose local address is `local` and remote `remote` (a server's socket of
/// a connection: local = server), if the kernel has it. A connection still in its listener's
/// accept queue has no `struct socket` yet: its inode is 0.
pub fn tcp_socket(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<TcpSocket> {
    let bytes = |a: std::net::SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v.octets());
            b
        }
        std::net::IpAddr::V6(v) => v.octets(),
    };
    let family = match (local, remote) {
        (std::net::SocketAddr::V4(_), std::net::SocketAddr::V4(_)) => libc::AF_INET,
        (std::net::SocketAddr::V6(_), std::net::SocketAddr::V6(_)) => libc::AF_INET6,
        _ => return None,
    };
    let id = DiagId {
        sport: local.port().to_be(),
        dport: remote.port().to_be(),
        src: bytes(local),
        dst: bytes(remote),
        ifindex: 0,
        cookie: [!0, !0],
    };
    // LINUX: the lookup demultiplexes like a packet: with no such connection it answers with
    // the listener of the port.
    sock_diag(family, !0, id, false)
        .ok()?
        .into_iter()
        .find(|s| s.local == local && s.remote == remote)
}

/// `inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DiagId {
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

impl DiagId {
    fn any() -> DiagId {
        DiagId {
            sport: 0,
            dport: 0,
            src: [0; 16],
            dst: [0; 16],
            ifindex: 0,
            cookie: [!0, !0],
        }
    }
}

/// One sock_diag request for TCP sockets: a dump (`dump`) of the states in `states`, or the
/// exact lookup of `id`.
fn sock_diag(family: i32, states: u32, id: DiagId, dump: bool) -> SysResult<Vec<TcpSocket>> {
    #[repr(C)]
    struct Req {
        nlh: libc::nlmsghdr,
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: DiagId,
    }
    #[repr(C)]
    struct Msg {
        family: u8,
        state: u8,
        timer: u8,
        retrans: u8,
        id: DiagId,
        expires: u32,
        rqueue: u32,
        wqueue: u32,
        uid: u32,
        inode: u32,
    }
    const NETLINK_SOCK_DIAG: i32 = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    let req = Req {
        nlh: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Req>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: if dump {
                (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16
            } else {
                libc::NLM_F_REQUEST as u16
            },
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        family: family as u8,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states,
        id,
    };
    // SAFETY: a netlink socket of our own (closed by `Fd`); `req` is plain memory of the size
    // passed.
    let fd = Fd::owned(check("socket(sock_diag)", unsafe {
        libc::syscall(
            libc::SYS_socket,
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    })? as RawFd);
    // SAFETY: as above.
    let sent = check("sendto(sock_diag)", unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd.raw(),
            &req as *const Req,
            std::mem::size_of::<Req>(),
            0,
            std::ptr::null::<libc::sockaddr>(),
            0,
        )
    })?;
    if sent as usize != std::mem::size_of::<Req>() {
        return Err(SysError {
            op: "sendto(sock_diag)",
            errno: libc::EIO,
        });
    }
    let hdr = std::mem::size_of::<libc::nlmsghdr>();
    let mut out = Vec::new();
    let mut buf = vec![0u64; 4096];
    loop {
        // SAFETY: `buf` is writable for its byte length.
        let got = check("recvfrom(sock_diag)", unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                fd.raw(),
                buf.as_mut_ptr(),
                buf.len() * 8,
                0,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        })? as usize;
        if got == 0 {
            return Err(SysError {
                op: "recvfrom(sock_diag)",
                errno: libc::EIO,
            });
        }
        let bytes = buf.as_ptr() as *const u8;
        let mut off = 0;
        while off + hdr <= got {
            // SAFETY: `off + hdr <= got` bytes the kernel wrote; netlink messages are 4-byte
            // aligned within the 8-aligned buffer; unaligned reads for safety anyway.
            let nlh: libc::nlmsghdr =
                unsafe { std::ptr::read_unaligned(bytes.add(off) as *const libc::nlmsghdr) };
            let len = nlh.nlmsg_len as usize;
            if len < hdr || off + len > got {
                return Err(SysError {
                    op: "recvfrom(sock_diag)",
                    errno: libc::EIO,
                });
            }
            match nlh.nlmsg_type as i32 {
                libc::NLMSG_DONE => return Ok(out),
                libc::NLMSG_ERROR => {
                    // SAFETY: an error message carries at least the errno after the header.
                    let e = if len >= hdr + 4 {
                        unsafe { std::ptr::read_unaligned(bytes.add(off + hdr) as *const i32) }
                    } else {
                        -libc::EIO
                    };
                    return Err(SysError {
                        op: "sock_diag",
                        errno: if e < 0 { -e } else { libc::EIO },
                    });
                }
                t if t == SOCK_DIAG_BY_FAMILY as i32 && len >= hdr + std::mem::size_of::<Msg>() => {
                    // SAFETY: the message holds a whole `Msg` after its header (checked).
                    let m: Msg =
                        unsafe { std::ptr::read_unaligned(bytes.add(off + hdr) as *const Msg) };
                    let ip = |b: &[u8; 16]| -> std::net::IpAddr {
                        if i32::from(m.family) == libc::AF_INET {
                            let mut a = [0u8; 4];
                            a.copy_from_slice(&b[..4]);
                            std::net::Ipv4Addr::from(a).into()
                        } else {
                            std::net::Ipv6Addr::from(*b).into()
                        }
                    };
                    out.push(TcpSocket {
                        state: m.state,
                        local: std::net::SocketAddr::new(ip(&m.id.src), u16::from_be(m.id.sport)),
                        remote: std::net::SocketAddr::new(ip(&m.id.dst), u16::from_be(m.id.dport)),
                        uid: m.uid,
                        inode: m.inode,
                    });
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
        if !dump {
            // An exact lookup is answered by one message (or an error), without NLMSG_DONE.
            return Ok(out);
        }
    }
}

/// This process's id (LINUX: getpid is never interposed and cannot fail).
/// This process's pid, cached (it is read on hot paths); the cache is cleared in every fork
/// child by an atfork handler.
static PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Clears the pid cache; fork child handlers that run before ours call it first.
pub extern "C" fn forget_pid() {
    PID.store(0, std::sync::atomic::Ordering::Relaxed);
}

pub fn getpid() -> i32 {
    use std::sync::atomic::Ordering;
    static HANDLER: std::sync::Once = std::sync::Once::new();
    let p = PID.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    HANDLER.call_once(|| {
        // SAFETY: registering a plain function that lives as long as the process.
        unsafe { libc::pthread_atfork(None, None, Some(forget_pid)) };
    });
    // SAFETY: getpid has no preconditions.
    let p = unsafe { libc::syscall(libc::SYS_getpid) } as i32;
    PID.store(p, Ordering::Relaxed);
    p
}

/// This process's real uid.
pub fn getuid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn an_fd_is_recorded_as_internal_while_it_is_held() {
        let (a, b) = socketpair_stream().expect("socketpair");
        assert!(internal::contains(a.raw()) && internal::contains(b.raw()));
        let moved = a.high();
        assert!(internal::contains(moved.raw()));
        // (Absence after a drop is not asserted here: tests in other threads reuse numbers.)
    }

    #[test]
    fn internal_numbers_are_listed_by_range() {
        // Numbers far above what this test process opens.
        let base = 900_000;
        for fd in [base, base + 63, base + 64, base + 200] {
            internal::mark(fd);
        }
        let b = base as u32;
        assert_eq!(
            internal::within(b, b + 200),
            vec![base, base + 63, base + 64, base + 200]
        );
        assert_eq!(internal::within(b + 1, b + 64), vec![base + 63, base + 64]);
        assert!(internal::within(b + 65, b + 199).is_empty());
        assert!(internal::within(b + 5, b + 4).is_empty());
        internal::unmark(base + 63);
        assert!(!internal::contains(base + 63) && internal::contains(base + 64));
        for fd in [base, base + 64, base + 200] {
            internal::unmark(fd);
        }
        assert!(internal::within(b, u32::MAX).is_empty());
        assert!(!internal::contains(-1) && !internal::contains(i32::MAX));
    }

    #[test]
    fn sock_diag_sees_a_connection_queued_then_accepted() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = l.local_addr().expect("addr");
        let c = TcpStream::connect(server).expect("connect");
        let client = c.local_addr().expect("addr");
        // In the accept queue: the server's socket exists without a `struct socket`.
        let queued = tcp_socket(server, client).expect("the server's socket");
        assert_eq!(
            (queued.local, queued.remote, queued.inode),
            (server, client, 0)
        );
        let (_s, _) = l.accept().expect("accept");
        assert_ne!(tcp_socket(server, client).expect("accepted").inode, 0);
        // The client's side, and a dump that finds both and the listener.
        assert_eq!(tcp_socket(client, server).expect("client").remote, server);
        let all = tcp_sockets(libc::AF_INET, !0, 0).expect("dump");
        assert!(all.iter().any(|s| s.local == server && s.state == 10));
        assert!(all.iter().any(|s| s.local == client && s.remote == server));
        assert_eq!(tcp_socket(server, "127.0.0.1:1".parse().unwrap()), None);
    }
}
