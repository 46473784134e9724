//! Offloaded sockets across `exec` (DESIGN.md §7).
//!
//! A new program image starts with none of the library's memory: the SDP engine's state of an
//! inherited connection is gone. So before an `exec`, each offloaded fd that survives it (no
//! FD_CLOEXEC) is handed to a **relay**: a small process forked from this one that keeps the
//! SDP connection and copies bytes between it and a fresh socketpair, whose other end takes the
//! fd number in the new image. The program after exec reads and writes a stream socket as
//! before; SDP still carries the bytes to the peer; end of stream and errors pass through. The
//! relay is double-forked (no zombie for the new image to reap) and ends when both directions
//! are closed.
//!
//! What the new image does not get: getsockname/getpeername name an AF_UNIX socket, and TCP
//! options have no effect. Documented in docs/ARCHITECTURE.md.

use std::sync::Arc;

use super::{Conn, Phase};
use crate::sys;

fn fcntl(fd: i32, cmd: i32, arg: i64) -> i32 {
    // SAFETY: fcntl with an integer argument.
    unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, arg) as i32 }
}

/// Before `execve` and friends: moves every offloaded fd that survives exec onto a relay.
/// Returns the value of [`super::relayed::RELAYED_ENV`] for the new image (its relay sockets
/// and the shadows that answer for them), if any connection was relayed.
pub fn before_exec() -> Option<String> {
    super::setup::resolve_pending_before_fork();
    // Connections with at least one fd without FD_CLOEXEC, and those fds.
    let mut todo: Vec<(Arc<Conn>, Vec<i32>)> = Vec::new();
    for (fd, conn) in super::snapshot() {
        if fcntl(fd, libc::F_GETFD, 0) & libc::FD_CLOEXEC != 0 {
            continue;
        }
        match todo.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &conn)) {
            Some((_, fds)) => fds.push(fd),
            None => todo.push((conn, vec![fd])),
        }
    }
    for (conn, fds) in todo {
        if matches!(conn.lock().phase, Phase::Tcp) {
            continue;
        }
        if let Some((ino, shadow)) = relay(&conn, &fds) {
            super::relayed::register(ino, shadow, false);
        }
    }
    // The connections the exec closes (FD_CLOEXEC), and those closed before it and still
    // delivering from the progress thread, lose the library's memory with the old image: the
    // bytes their application sent and the peer's window did not take yet go now, bounded as
    // at exit. The kernel delivers a TCP socket's after an exec closed it.
    super::setup::end_of_image(false);
    // Every relay socket this exec keeps, relayed just now or before (earlier in this image,
    // or inherited with the environment), is named with its shadow for the new image.
    let entries = super::relayed::for_exec();
    (!entries.is_empty()).then(|| entries.join(","))
}

/// Before an offloaded fd is sent to another process (SCM_RIGHTS on a unix socket): the other
/// process's library knows nothing of the connection, and the engine's state lives in ours. So
/// the connection goes to a relay, as for an exec that keeps the fd, and every fd number of it
/// here names the relay's socket: both processes then hold one socket, as with TCP, and a close
/// of our copy no longer ends (or resets, with bytes unread) the connection the other process
/// now serves. Before, the receiver read nothing and our close reset the peer.
pub fn before_passing(fd: i32) {
    let Some(conn) = super::lookup(fd) else {
        return;
    };
    super::setup::resolve_pending(&conn);
    let fds = {
        let g = conn.lock();
        if !matches!(g.phase, Phase::Offloaded(_)) || !g.is_current() {
            return;
        }
        g.app_fds.clone()
    };
    crate::sdp_log!(
        crate::log::DECISION,
        "fd {fd} is sent to another process: its SDP connection goes to a relay"
    );
    if let Some((ino, shadow)) = relay(&conn, &fds) {
        super::relayed::register(ino, shadow, true);
    }
}

/// Hands the connection to a relay process; `fds` (this process's numbers for it) then name
/// our end of the relay's socketpair. Returns that end's inode and a close-on-exec duplicate
/// of the connection's shadow, which answers the name and option calls on those numbers from
/// now on (`relayed::register`).
fn relay(conn: &Arc<Conn>, fds: &[i32]) -> Option<(u64, i32)> {
    let mut sv = [0i32; 2];
    // SAFETY: sv has room for two fds.
    if unsafe {
        libc::syscall(
            libc::SYS_socketpair,
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    } != 0
    {
        return None;
    }
    let (a, b) = (sv[0], sv[1]);
    let nonblock = fcntl(fds[0], libc::F_GETFL, 0) & libc::O_NONBLOCK != 0;
    // SAFETY: fork through the C library so that our atfork handlers run (they pause the
    // progress thread and take the registry lock; we hold no lock here).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        sys::close(a);
        sys::close(b);
        return None;
    }
    if pid == 0 {
        // First child: fork the relay and leave, so that it is nobody's child to reap.
        // SAFETY: as above.
        let relay_pid = unsafe { libc::fork() };
        if relay_pid == 0 {
            run_relay(conn, fds, b, a);
        }
        // SAFETY: leaving the intermediate process without our _exit hook's flush: it never
        // used the connection and must not touch it.
        unsafe { libc::syscall(libc::SYS_exit_group, 0) };
    }
    let mut st = 0;
    // SAFETY: reaping the first child we just forked.
    unsafe {
        libc::syscall(
            libc::SYS_wait4,
            pid,
            &mut st as *mut i32,
            0,
            std::ptr::null_mut::<libc::rusage>(),
        )
    };
    // The program's fd numbers now name our end of the socketpair (keeping their flags).
    if nonblock {
        fcntl(
            a,
            libc::F_SETFL,
            (fcntl(a, libc::F_GETFL, 0) | libc::O_NONBLOCK) as i64,
        );
    }
    for &fd in fds {
        // Each fd number keeps its close-on-exec flag (those an exec hands over have none).
        let cloexec = fcntl(fd, libc::F_GETFD, 0) & libc::FD_CLOEXEC != 0;
        let _ = super::unbind_fd(fd);
        crate::fdtable::clear(fd);
        // SAFETY: atomically re-point fd.
        unsafe {
            libc::syscall(
                libc::SYS_dup3,
                a,
                fd,
                if cloexec { libc::O_CLOEXEC } else { 0 },
            )
        };
    }
    let ino = super::relayed::socket_ino(a);
    sys::close(a);
    sys::close(b);
    // This process lets go of its copy without touching the rings: the relay owns them now.
    let mut g = conn.lock();
    let shadow = match (ino, g.shadow) {
        (Some(_), s) if s >= 0 => sys::dup_internal(s),
        _ => -1,
    };
    g.release();
    drop(g);
    Some((ino?, shadow)).filter(|&(_, s)| s >= 0)
}

/// Whether the process serving the connection leaves it alone for a while (its owner
/// generation does not move for 50 ms) while the program shows no activity on `b`.
fn owner_is_idle(conn: &Arc<Conn>, b: i32) -> bool {
    let generation = |c: &Arc<Conn>| match &c.lock().phase {
        Phase::Offloaded(s) => Some(s.owner_generation()),
        _ => None,
    };
    let before = generation(conn);
    let mut p = libc::pollfd {
        fd: b,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::syscall(libc::SYS_poll, &mut p as *mut libc::pollfd, 1, 50) };
    p.revents == 0 && before.is_some() && generation(conn) == before
}

fn raw_io(nr: libc::c_long, fd: i32, buf: *mut u8, len: usize, flags: i32) -> isize {
    // SAFETY: buf is valid for len bytes (callers pass their own vectors); no address.
    unsafe {
        libc::syscall(
            nr,
            fd,
            buf,
            len,
            flags,
            std::ptr::null_mut::<u8>(),
            std::ptr::null_mut::<u8>(),
        ) as isize
    }
}

/// The relay process: copies the SDP connection (through the app end `fds[0]`) to and from
/// `b` until both directions ended, then exits.
fn run_relay(conn: &Arc<Conn>, fds: &[i32], b: i32, a: i32) -> ! {
    sys::close(a);
    let fd = fds[0];
    // Keep only what the relay needs: other fds (the program's pipes, files, sockets) must
    // not stay open because of us.
    let mut keep = vec![b, fd];
    {
        let g = conn.lock();
        keep.extend([g.app_int, g.own_bell, g.shadow, g.flush_timer]);
        if let Phase::Offloaded(s) = &g.phase {
            keep.extend(s.fds());
        }
    }
    super::retain_only(conn);
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let open: Vec<i32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        for f in open {
            if !keep.contains(&f) {
                sys::close(f);
            }
        }
    }
    let stale = matches!(&conn.lock().phase, Phase::Offloaded(s) if s.stale());
    if stale {
        // Another process serves the connection now (the relay of a program this process
        // started on it before): we cannot. The program reads end of stream and its writes
        // fail with EPIPE, rather than being taken and lost (a parent that keeps an accepted
        // socket and runs one program per request on it: the second one's answer vanished).
        // SAFETY: our own fd; leaving the relay process without touching the rings.
        unsafe {
            libc::syscall(libc::SYS_shutdown, b, libc::SHUT_RDWR);
            libc::syscall(libc::SYS_exit_group, 0);
        }
    }
    // The relay needs a progress thread of its own (the peer's end, a pending exchange).
    crate::progress::after_fork_lazy();
    // Claim the connection only when the program shows it uses it: SDP data arrived for it
    // (its app end is readable) or it wrote. A program that ignores the inherited socket and
    // exits leaves the connection to the process that exec'd it, untouched.
    loop {
        let mut pfd = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: b,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::syscall(libc::SYS_poll, pfd.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if pfd[1].revents & libc::POLLHUP != 0
            && pfd[1].revents & libc::POLLIN != 0
            && !sys::has_bytes(b)
        {
            // The program closed the socket without using it.
            sys::close(b);
            // SAFETY: leaving the relay process; its copies go with it, the rings untouched.
            unsafe { libc::syscall(libc::SYS_exit_group, 0) };
        }
        if pfd[1].revents != 0 {
            break; // the program wrote: it uses the connection
        }
        if pfd[0].revents != 0 && owner_is_idle(conn, b) {
            // Data waits and the process that served the connection leaves it there: the
            // program (which may read before it writes, as `head <&3` does) is its reader.
            break;
        }
    }
    let mut to_b: Vec<u8> = Vec::new();
    let mut to_conn: Vec<u8> = Vec::new();
    let (mut conn_eof, mut b_eof) = (false, false);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut moved = false;
        // SDP → the program.
        if to_b.is_empty() && !conn_eof {
            match super::data::recv(fd, &mut [&mut buf[..]], libc::MSG_DONTWAIT) {
                Some(Ok(n)) if n > 0 => {
                    to_b.extend_from_slice(&buf[..n as usize]);
                    moved = true;
                }
                Some(Err(libc::EAGAIN)) => {}
                _ => {
                    conn_eof = true;
                    moved = true;
                    // SAFETY: our own fd.
                    unsafe { libc::syscall(libc::SYS_shutdown, b, libc::SHUT_WR) };
                }
            }
        }
        if !to_b.is_empty() {
            let n = raw_io(
                libc::SYS_sendto,
                b,
                to_b.as_mut_ptr(),
                to_b.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            if n > 0 {
                to_b.drain(..n as usize);
                moved = true;
            } else if n < 0 && sys::errno() != libc::EAGAIN {
                break; // the program closed its end
            }
        }
        // The program → SDP.
        if to_conn.is_empty() && !b_eof {
            let n = raw_io(
                libc::SYS_recvfrom,
                b,
                buf.as_mut_ptr(),
                buf.len(),
                libc::MSG_DONTWAIT,
            );
            if n > 0 {
                to_conn.extend_from_slice(&buf[..n as usize]);
                moved = true;
            } else if n == 0 {
                b_eof = true;
                moved = true;
                // A half-close by the program (its end still open for reading) is passed on;
                // its close or exit is not: other holders of the connection may go on.
                let mut p = libc::pollfd {
                    fd: b,
                    events: 0,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, no waiting.
                unsafe { libc::syscall(libc::SYS_poll, &mut p as *mut libc::pollfd, 1, 0) };
                if p.revents & libc::POLLHUP == 0 {
                    let _ = super::data::shutdown(fd, libc::SHUT_WR);
                }
            }
        }
        if !to_conn.is_empty() {
            match super::data::send(fd, &[&to_conn[..]], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
                Some(Ok(n)) if n > 0 => {
                    to_conn.drain(..n as usize);
                    moved = true;
                }
                Some(Err(libc::EAGAIN)) | Some(Ok(_)) => {}
                _ => {
                    // The connection takes nothing more (reset, or another process claimed
                    // it): the program's next writes fail with EPIPE instead of vanishing.
                    to_conn.clear();
                    b_eof = true;
                    // SAFETY: our own fd.
                    unsafe { libc::syscall(libc::SYS_shutdown, b, libc::SHUT_RD) };
                }
            }
        }
        if conn_eof && b_eof && to_b.is_empty() && to_conn.is_empty() {
            break;
        }
        if !moved {
            let mut pfd = [
                libc::pollfd {
                    fd,
                    events: 0,
                    revents: 0,
                },
                libc::pollfd {
                    fd: b,
                    events: 0,
                    revents: 0,
                },
            ];
            if !conn_eof && to_b.is_empty() {
                pfd[0].events |= libc::POLLIN;
            }
            if !to_conn.is_empty() {
                pfd[0].events |= libc::POLLOUT;
            }
            if !b_eof && to_conn.is_empty() {
                pfd[1].events |= libc::POLLIN;
            }
            if !to_b.is_empty() {
                pfd[1].events |= libc::POLLOUT;
            }
            // SAFETY: two valid pollfds.
            unsafe { libc::syscall(libc::SYS_poll, pfd.as_mut_ptr(), 2, 1000) };
            if b_eof && pfd[1].revents & libc::POLLHUP != 0 && to_b.is_empty() && to_conn.is_empty()
            {
                break; // the program closed the socket entirely, and all it wrote went on
            }
        }
    }
    // What the program wrote before it went and the loop did not read yet (it also ends when
    // the program's end stops taking bytes: `head -c 10` answers and exits unread).
    loop {
        let n = raw_io(
            libc::SYS_recvfrom,
            b,
            buf.as_mut_ptr(),
            buf.len(),
            libc::MSG_DONTWAIT,
        );
        if n <= 0 {
            break;
        }
        to_conn.extend_from_slice(&buf[..n as usize]);
    }
    sys::close(b);
    // What the program wrote and the relay read but could not hand to the connection yet.
    let until = std::time::Instant::now() + super::setup::LINGER_LIMIT;
    while !to_conn.is_empty() && std::time::Instant::now() < until {
        match super::data::send(fd, &[&to_conn[..]], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Some(Ok(n)) if n > 0 => {
                to_conn.drain(..n as usize);
            }
            Some(Err(libc::EAGAIN)) | Some(Ok(_)) => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::syscall(libc::SYS_poll, &mut p as *mut libc::pollfd, 1, 1000) };
            }
            _ => break,
        }
    }
    // What the program wrote and the peer's window has not taken yet is delivered before the
    // relay goes, as the kernel delivers a closed TCP socket's bytes (bounded as a lingering
    // close is). Before, the relay left as soon as the program's end closed: a CGI-style
    // program that wrote 100 KB and exited lost the tail its peer had not read yet.
    {
        let mut g = conn.lock();
        if let Phase::Offloaded(s) = &mut g.phase {
            s.flush(super::setup::LINGER_LIMIT);
        }
    }
    super::setup::close(fd);
    // SAFETY: leaving the relay process.
    unsafe { libc::_exit(0) }
}
