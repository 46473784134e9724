//! SO_KEEPALIVE for offloaded connections (SDP-WIRE.md §5.4, issue #7), and SO_OOBINLINE,
//! the other socket option the stream itself acts on (read back from the shadow the same way).
//!
//! Socket options of an offloaded fd are set on its shadow TCP socket (the preload's
//! `setsockopt` hook), so the shadow is where the application's keepalive settings live: after
//! SO_KEEPALIVE or a TCP_KEEP* option changes there, and when a connection becomes offloaded
//! (options set before `connect`, or inherited by an accepted socket from its listener), they
//! are read back and handed to the stream. TCP_KEEPINTVL and TCP_KEEPCNT have no SDP
//! counterpart: one probe is sent, and the RC transport's own retries decide (see
//! docs/RDMA.md, "Keepalive").

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{Inner, Phase, lookup};
use crate::sys::int_option;

/// LINUX: `TCP_KEEPIDLE` when never set (`net.ipv4.tcp_keepalive_time`'s default, 2 h).
const DEFAULT_IDLE: Duration = Duration::from_secs(7200);

/// Whether `(level, name)` is an option that decides keepalive.
pub fn is_keepalive_option(level: i32, name: i32) -> bool {
    (level == libc::SOL_SOCKET && name == libc::SO_KEEPALIVE)
        || (level == libc::IPPROTO_TCP
            && matches!(
                name,
                libc::TCP_KEEPIDLE | libc::TCP_KEEPINTVL | libc::TCP_KEEPCNT
            ))
}

/// The keepalive setting of TCP socket `fd`: `Some(TCP_KEEPIDLE)` when SO_KEEPALIVE is on.
pub fn of_socket(fd: i32) -> Option<Duration> {
    if fd < 0 || int_option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? == 0 {
        return None;
    }
    Some(
        int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)
            .filter(|&s| s > 0)
            .map_or(DEFAULT_IDLE, |s| Duration::from_secs(s as u64)),
    )
}

/// Hands the shadow's keepalive setting to the offloaded stream (with the lock held). Does
/// nothing for a connection that is not offloaded or is served by another process.
pub fn apply(g: &mut Inner) {
    if !g.is_current() {
        return;
    }
    let idle = of_socket(g.shadow);
    if let Phase::Offloaded(s) = &mut g.phase {
        s.set_keepalive(idle);
        g.sync();
    }
}

/// The application set `(level, name)` on offloaded fd `fd` (on its shadow, successfully).
pub fn option_set(fd: i32, level: i32, name: i32) {
    let oob_inline = level == libc::SOL_SOCKET && name == libc::SO_OOBINLINE;
    let buffer = buffer_bit(level, name);
    if !is_keepalive_option(level, name) && !oob_inline && buffer.is_none() {
        return;
    }
    // Also for a connect still in progress: the size applies when it is offloaded.
    note_buffer_size(fd, level, name);
    if let Some(conn) = lookup(fd) {
        let mut g = conn.lock();
        if oob_inline {
            apply_oob_inline(&mut g);
        } else if let Some(bit) = buffer {
            apply_buffers_now(&mut g, bit);
        } else {
            apply(&mut g);
        }
    }
}

/// The fd table's mark for a buffer-size option, `None` for other options.
fn buffer_bit(level: i32, name: i32) -> Option<u64> {
    use crate::fdtable::Meta;
    match (level, name) {
        (libc::SOL_SOCKET, libc::SO_SNDBUF | libc::SO_SNDBUFFORCE) => Some(Meta::SNDBUF_SET),
        (libc::SOL_SOCKET, libc::SO_RCVBUF | libc::SO_RCVBUFFORCE) => Some(Meta::RCVBUF_SET),
        _ => None,
    }
}

/// The program set `(level, name)` on socket `fd`: a buffer size is remembered in the fd
/// table, for when the socket becomes offloaded (or, for a listener, for the sockets it
/// accepts); other options are ignored.
pub fn note_buffer_size(fd: i32, level: i32, name: i32) {
    let Some(bit) = buffer_bit(level, name) else {
        return;
    };
    crate::fdtable::update(fd, |m| if m.tracked() { m.with(bit) } else { m });
}

/// A connection became offloaded (with the lock held): SO_OOBINLINE and the buffer sizes the
/// program set before (on the socket before `connect`, or on the listener it was accepted
/// from) go to the stream from the shadow.
pub fn apply_set_before(g: &mut Inner) {
    apply_oob_inline(g);
    apply_buffers(g);
}

/// The sizes the program gave its
/// socket's buffers (before `connect`, or on the listener it was accepted from), each one it
/// set, go to the stream from the shadow. LINUX: a socket whose size was set keeps it (no
/// autotuning), so the bytes in flight stay as few as the program asked: a sender learns of a
/// peer that closed mid-transfer before the transfer ends (CPython's
/// `test_asyncio.test_sendfile` `test_sendfile_close_peer_in_the_middle_of_receiving`). A size
/// not set stays the stream's own (the kernel would autotune it).
fn apply_buffers(g: &mut Inner) {
    use crate::fdtable::Meta;
    let bits = g.app_fds.first().map_or(0, |&fd| {
        crate::fdtable::get(fd).0 & (Meta::SNDBUF_SET | Meta::RCVBUF_SET)
    });
    if bits != 0 {
        apply_buffers_now(g, bits);
    }
}

fn apply_buffers_now(g: &mut Inner, bits: u64) {
    use crate::fdtable::Meta;
    if !g.is_current() {
        return;
    }
    let size = |bit, name| {
        if bits & bit == 0 {
            return None;
        }
        int_option(g.shadow, libc::SOL_SOCKET, name)
            .filter(|&v| v > 0)
            .map(|v| v as usize)
    };
    let snd = size(Meta::SNDBUF_SET, libc::SO_SNDBUF);
    let rcv = size(Meta::RCVBUF_SET, libc::SO_RCVBUF);
    if let Phase::Offloaded(s) = &mut g.phase {
        s.set_buffers(snd, rcv);
        g.sync();
    }
}

/// Whether this process ever turned SO_OOBINLINE on, on any socket: only then does a
/// connection that becomes offloaded read it back from its shadow (set before `connect`, or
/// inherited from the listener), which costs the others no system call.
static OOB_INLINE_USED: AtomicBool = AtomicBool::new(false);

/// The application sets SO_OOBINLINE on some socket (`setsockopt`'s hook, before the call).
pub fn note_option(level: i32, name: i32) {
    if level == libc::SOL_SOCKET && name == libc::SO_OOBINLINE {
        OOB_INLINE_USED.store(true, Ordering::Relaxed);
    }
}

/// Hands the shadow's SO_OOBINLINE to the offloaded stream (with the lock held), if the
/// process ever used the option. LINUX: an accepted socket inherits it from its listener.
fn apply_oob_inline(g: &mut Inner) {
    if !OOB_INLINE_USED.load(Ordering::Relaxed) || !g.is_current() {
        return;
    }
    let on = int_option(g.shadow, libc::SOL_SOCKET, libc::SO_OOBINLINE).is_some_and(|v| v != 0);
    if let Phase::Offloaded(s) = &mut g.phase {
        s.set_oob_inline(on);
        g.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_socket() -> i32 {
        // SAFETY: plain socket(2).
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
    }

    fn set(fd: i32, level: i32, name: i32, v: i32) {
        // SAFETY: an int option from a valid pointer.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &v as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
    }

    #[test]
    fn socket_keepalive_off_on_idle_read_back() {
        let fd = tcp_socket();
        assert!(fd >= 0);
        assert_eq!(of_socket(fd), None, "off by default");
        set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        let sysctl = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_time")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(DEFAULT_IDLE, Duration::from_secs);
        assert_eq!(
            of_socket(fd),
            Some(sysctl),
            "the kernel's default idle time"
        );
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5);
        assert_eq!(of_socket(fd), Some(Duration::from_secs(5)));
        set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0);
        assert_eq!(of_socket(fd), None);
        crate::sys::close(fd);
        assert_eq!(of_socket(-1), None);
    }

    #[test]
    fn keepalive_options_recognised_others_not() {
        assert!(is_keepalive_option(libc::SOL_SOCKET, libc::SO_KEEPALIVE));
        assert!(is_keepalive_option(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE));
        assert!(is_keepalive_option(libc::IPPROTO_TCP, libc::TCP_KEEPCNT));
        assert!(!is_keepalive_option(libc::SOL_SOCKET, libc::SO_RCVBUF));
        assert!(!is_keepalive_option(libc::IPPROTO_TCP, libc::TCP_NODELAY));
    }
}
