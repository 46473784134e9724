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
    // SAFETY: zeroed sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_getsockname,
            fd,
            &mut ss as *mut _,
            &mut len as *mut _,
        )
    };
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

/// Moves an internal fd above [`INTERNAL_FD_MIN`], close-on-exec; returns the new number (or
/// the old one if the fd limit does not allow it).
pub fn move_high(fd: i32) -> i32 {
    // SAFETY: F_DUPFD_CLOEXEC on our own fd.
    let hi = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, INTERNAL_FD_MIN) }
        as i32;
    if hi < 0 {
        return fd;
    }
    // SAFETY: closing our own original fd.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    hi
}

/// A close-on-exec duplicate of `fd` for the library's own use, numbered at least
/// [`INTERNAL_FD_MIN`] when the fd limit allows it, else the lowest free number (memcached
/// `-c 64` lowers RLIMIT_NOFILE to 64: a minimum of 400 would fail every SDP connection).
/// -1 with errno set on failure.
pub fn dup_internal(fd: i32) -> i32 {
    // SAFETY: F_DUPFD_CLOEXEC on an fd number with an integer argument.
    let hi = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, INTERNAL_FD_MIN) }
        as i32;
    if hi >= 0 || errno() != libc::EINVAL {
        return hi;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, 0) as i32 }
}

pub fn close(fd: i32) {
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
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct SockId {
        sport: u16,
        dport: u16,
        src: [u8; 16],
        dst: [u8; 16],
        ifindex: u32,
        cookie: [u32; 2],
    }
    #[repr(C)]
    struct Req {
        nlh: libc::nlmsghdr,
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: SockId,
    }
    #[repr(C)]
    struct Msg {
        family: u8,
        state: u8,
        timer: u8,
        retrans: u8,
        id: SockId,
        expires: u32,
        rqueue: u32,
        wqueue: u32,
        uid: u32,
        inode: u32,
    }
    const NETLINK_SOCK_DIAG: i32 = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    let (family, src, dst) = match (server, client) {
        (SocketAddr::V4(s), SocketAddr::V4(c)) => {
            let mut a = [0u8; 16];
            let mut b = [0u8; 16];
            a[..4].copy_from_slice(&s.ip().octets());
            b[..4].copy_from_slice(&c.ip().octets());
            (libc::AF_INET, a, b)
        }
        (SocketAddr::V6(s), SocketAddr::V6(c)) => {
            (libc::AF_INET6, s.ip().octets(), c.ip().octets())
        }
        _ => return None,
    };
    let req = Req {
        nlh: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Req>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        family: family as u8,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states: !0,
        id: SockId {
            // The server's socket: local = server, remote = client.
            sport: server.port().to_be(),
            dport: client.port().to_be(),
            src,
            dst,
            ifindex: 0,
            cookie: [!0, !0],
        },
    };
    // SAFETY: a netlink socket of our own, closed below; `req` and `buf` are plain memory of
    // the sizes passed; the answer is read as `Msg` only after checking its type and length.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_socket,
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        ) as i32;
        if fd < 0 {
            return None;
        }
        let sent = libc::syscall(
            libc::SYS_sendto,
            fd,
            &req as *const Req,
            std::mem::size_of::<Req>(),
            0,
            std::ptr::null::<libc::sockaddr>(),
            0,
        );
        let mut buf = [0u64; 128];
        let got = if sent == std::mem::size_of::<Req>() as i64 {
            libc::syscall(
                libc::SYS_recvfrom,
                fd,
                buf.as_mut_ptr(),
                std::mem::size_of_val(&buf),
                0,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        } else {
            -1
        };
        close(fd);
        let hdr = std::mem::size_of::<libc::nlmsghdr>();
        if got < (hdr + std::mem::size_of::<Msg>()) as i64 {
            return None; // an error message (no such socket) or nothing
        }
        let nlh = &*(buf.as_ptr() as *const libc::nlmsghdr);
        if nlh.nlmsg_type != SOCK_DIAG_BY_FAMILY {
            return None;
        }
        let msg = &*((buf.as_ptr() as *const u8).add(hdr) as *const Msg);
        Some(msg.inode != 0)
    }
}
