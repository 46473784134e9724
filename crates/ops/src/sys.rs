//! Raw system calls for the library's own use.
//!
//! Inside the preload, calling `libc::write` or `libc::getsockname` by name binds to our own
//! hooks. The switch therefore reaches the kernel through `syscall(2)` for its own work, which
//! no hook intercepts. Every function here is a thin, documented wrapper.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The calling thread's errno.
pub fn errno() -> i32 {
    // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(e: i32) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e }
}

/// Writes all of `buf` to `fd`, retrying on EINTR and short writes; errors are dropped (this is
/// used for logging, where there is nobody to report to).
pub fn write_all(fd: i32, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice for its length.
        let n = unsafe { libc::syscall(libc::SYS_write, fd, buf.as_ptr(), buf.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// This process's pid, cached and cleared in every fork child (see `ib_verbs::sys::getpid`).
pub fn getpid() -> i32 {
    ib_verbs::sys::getpid()
}

/// Opens a log file for appending, close-on-exec (the library's own fd must not leak into
/// programs the application execs).
pub fn open_append(path: &std::ffi::CStr) -> Option<i32> {
    // SAFETY: path is NUL-terminated.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
            0o644,
        )
    };
    (fd >= 0).then_some(fd as i32)
}

/// The local address of a socket, by raw `getsockname`.
pub fn sockname(fd: i32) -> Option<SocketAddr> {
    socket_addr(libc::SYS_getsockname, fd)
}

/// The peer's address of a connected socket, by raw `getpeername` (our own hooks stay out of
/// the way).
pub fn peername(fd: i32) -> Option<SocketAddr> {
    socket_addr(libc::SYS_getpeername, fd)
}

/// The source address the kernel picks for a connection to `dst` when the program did not
/// bind: the routing table's preferred source (`ip route get`), learned by connecting a UDP
/// socket (no packet is sent). A loopback destination other than 127.0.0.1 gets 127.0.0.1 by
/// the default `local 127.0.0.0/8` route, not itself. Remembered per destination for the life
/// of the process (up to [`SOURCES_KEPT`] of them): routes change rarely and a wrong guess
/// costs only the 4-tuple's looks, never the connection. `None` when the probe fails.
pub fn route_source(dst: std::net::IpAddr) -> Option<std::net::IpAddr> {
    use std::sync::Mutex;
    // Only ever `try_lock`ed: a fork while another thread holds it leaves the child's copy
    // locked for good, and the child must not wait for it (it probes instead).
    type Sources = Vec<(std::net::IpAddr, std::net::IpAddr)>;
    static KNOWN: Mutex<Sources> = Mutex::new(Vec::new());
    let known = |f: &mut dyn FnMut(&mut Sources)| match KNOWN.try_lock() {
        Ok(mut g) => f(&mut g),
        Err(std::sync::TryLockError::Poisoned(p)) => f(&mut p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => {}
    };
    let mut hit = None;
    known(&mut |k| hit = k.iter().find(|(d, _)| *d == dst).map(|&(_, s)| s));
    if hit.is_some() {
        return hit;
    }
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket takes only integer arguments.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_socket,
            family,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        )
    } as i32;
    // One of the library's descriptors until it drops (and closes).
    let fd = ib_verbs::sys::Fd::from_raw(raw)?;
    let (ss, len) = crate::offload::setup::sockaddr_of(&SocketAddr::new(dst, 9));
    // SAFETY: ss holds a sockaddr of `len` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_connect, fd.raw(), &ss as *const _, len) };
    let src = (rc == 0).then(|| sockname(fd.raw())).flatten()?.ip();
    known(&mut |k| {
        if k.len() >= SOURCES_KEPT {
            k.remove(0);
        }
        k.push((dst, src));
    });
    Some(src)
}

/// Destinations whose source address [`route_source`] remembers.
const SOURCES_KEPT: usize = 64;

/// `getsockname` or `getpeername` (`call`) of `fd`, as a std address.
fn socket_addr(call: libc::c_long, fd: i32) -> Option<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss and len are valid for writes of the sizes given.
    let rc = unsafe { libc::syscall(call, fd, &mut ss as *mut _, &mut len as *mut _) };
    if rc < 0 {
        return None;
    }
    // SAFETY: the kernel wrote `len` bytes of a sockaddr into ss.
    unsafe { sockaddr_to_std(&ss as *const _ as *const libc::sockaddr, len) }
}

/// Converts a C socket address to a std one; `None` for families other than IPv4/IPv6 or a
/// length too short for the family.
///
/// # Safety
/// `addr` must be null or valid for reads of `len` bytes.
pub unsafe fn sockaddr_to_std(
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: the caller guarantees `len` readable bytes; we read the family first and then only
    // a struct whose size we checked against `len`; read_unaligned because the application's
    // buffer need not be aligned.
    unsafe {
        let family = std::ptr::read_unaligned(addr as *const libc::sa_family_t) as i32;
        match family {
            libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
                let sin = std::ptr::read_unaligned(addr as *const libc::sockaddr_in);
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
                let sin6 = std::ptr::read_unaligned(addr as *const libc::sockaddr_in6);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// The lowest fd number the library uses for its own descriptors: applications expect the low
/// numbers to be theirs (`dup2(x, 3)`, shells' redirections, select's 1024 limit).
pub const INTERNAL_FD_MIN: i32 = 400;

/// Whether `n` more descriptors could be opened now (RLIMIT_NOFILE): opens that many (an
/// epoll set and copies of it) and closes them again.
pub fn descriptors_free(n: usize) -> bool {
    // SAFETY: plain system calls on descriptors made and closed here.
    unsafe {
        let first = libc::syscall(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC) as i32;
        if first < 0 {
            return false;
        }
        let mut held = vec![first];
        while held.len() < n {
            let fd = libc::syscall(libc::SYS_fcntl, first, libc::F_DUPFD_CLOEXEC, 0) as i32;
            if fd < 0 {
                break;
            }
            held.push(fd);
        }
        let enough = held.len() >= n;
        for fd in held {
            libc::syscall(libc::SYS_close, fd);
        }
        enough
    }
}

/// Moves an internal fd above [`INTERNAL_FD_MIN`], close-on-exec; returns the new number (or
/// the old one if the fd limit does not allow it).
/// The result is recorded as the library's ([`mark_internal`]).
pub fn move_high(fd: i32) -> i32 {
    // SAFETY: F_DUPFD_CLOEXEC on our own fd.
    let hi = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, INTERNAL_FD_MIN) }
        as i32;
    if hi < 0 {
        mark_internal(fd);
        return fd;
    }
    close(fd);
    mark_internal(hi);
    hi
}

pub use ib_verbs::sys::internal;

/// Records `fd` as the library's own: the program's `close`, `close_range` and `closefrom`
/// leave it open (`ib_verbs::sys::internal`). [`close`] forgets it again.
pub fn mark_internal(fd: i32) {
    ib_verbs::sys::internal::mark(fd);
}

/// A close-on-exec duplicate of `fd` for the library's own use, numbered at least
/// [`INTERNAL_FD_MIN`] when the fd limit allows it, else the lowest free number (memcached
/// `-c 64` lowers RLIMIT_NOFILE to 64: a minimum of 400 would fail every SDP connection).
/// -1 with errno set on failure.
pub fn dup_internal(fd: i32) -> i32 {
    // SAFETY: F_DUPFD_CLOEXEC on an fd number with an integer argument.
    let hi = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, INTERNAL_FD_MIN) }
        as i32;
    let got = if hi >= 0 || errno() != libc::EINVAL {
        hi
    } else {
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, 0) as i32 }
    };
    if got >= 0 {
        mark_internal(got);
    }
    got
}

/// Whether bytes wait to be read on `fd` (FIONREAD).
pub fn has_bytes(fd: i32) -> bool {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe {
        libc::syscall(
            libc::SYS_ioctl,
            fd,
            libc::FIONREAD,
            &mut n as *mut libc::c_int,
        )
    };
    n > 0
}

/// An int-valued socket option of `fd` (`getsockopt`), `None` when the call fails.
pub fn int_option(fd: i32, level: i32, name: i32) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of an int option.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_getsockopt,
            fd,
            level,
            name,
            &mut v as *mut libc::c_int,
            &mut len as *mut libc::socklen_t,
        )
    };
    (rc == 0).then_some(v)
}

/// Sets an int-valued socket option of `fd` (`setsockopt`); whether the call succeeded.
pub fn set_int_option(fd: i32, level: i32, name: i32, v: i32) -> bool {
    // SAFETY: `v` lives across the call; the kernel reads one int.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setsockopt,
            fd,
            level,
            name,
            &v as *const libc::c_int,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Closes a descriptor of the library's (and forgets it as one, [`mark_internal`]).
pub fn close(fd: i32) {
    ib_verbs::sys::internal::unmark(fd);
    // SAFETY: closing an fd the caller owns.
    unsafe { libc::syscall(libc::SYS_close, fd) };
}

/// Whether the server has accepted the TCP connection from `client` to `server` (both on this
/// host): `Some(false)` while it waits in the listener's accept queue, `Some(true)` once a
/// process accepted it, `None` if the kernel does not say (no such connection, no sock_diag).
///
/// LINUX: asks sock_diag for the one server-side socket of the 4-tuple; a connection not yet
/// accepted has no `struct socket`, which sock_diag reports as inode 0.
pub fn tcp_accepted(client: SocketAddr, server: SocketAddr) -> Option<bool> {
    ib_verbs::sys::tcp_socket(server, client).map(|s| s.inode != 0)
}

/// Seconds of the monotonic clock (coarse ages of shared-table entries).
pub fn now_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

/// A zero-filled anonymous mapping of `len` bytes shared with the fork children made after
/// it (the tables prefork workers inherit), never unmapped; `None` if the kernel refuses.
pub fn shared_zeroed(len: usize) -> Option<*mut u8> {
    // SAFETY: an anonymous shared mapping, no file; MAP_FAILED is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p.cast())
}
