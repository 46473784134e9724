//! The kernel TCP socket behind a relayed connection, for the calls that name it.
//!
//! A connection handed to a relay (an `exec` that keeps the socket, an fd sent over a unix
//! socket or given to a `posix_spawn` child: `offload::exec`) reaches its program as an
//! AF_UNIX socket end. Its bytes are the connection's, but `getsockname`, `getpeername` and the
//! TCP options would be the unix socket's: a server exec'd per connection (inetd style, sshd's
//! re-exec) saw an AF_UNIX peer with no address, and its access control and logs had nothing
//! to go on. So the process that hands the connection over keeps a duplicate of the shadow
//! (the kernel TCP socket with the real 4-tuple, which never carries data) and records which
//! relay socket it stands for, by the socket's inode:
//! - in this process (fd passing, `posix_spawn`): [`register`];
//! - across `exec`: the duplicate survives the exec (no close-on-exec) and
//!   [`RELAYED_ENV`] names it, `<relay inode>:<shadow fd>:<shadow inode>` entries separated by
//!   commas, in the new image's environment. The new image's library reads it when it is
//!   loaded, keeps each entry whose fd still names that very TCP socket, and makes it
//!   close-on-exec and one of the library's own descriptors; a later `exec` names them again
//!   for the relay sockets it keeps ([`for_exec`]: inetd → tcpd → server). The variable stays
//!   in the environment (changing it under a running program is not safe); in a descendant
//!   whose fd numbers no longer match, the inodes do not, and nothing is kept.
//!
//! The preload's name and option hooks then ask [`shadow_for`]: an fd whose socket's inode
//! is recorded is answered from the shadow (one `fstat`, only in a process that has such
//! records). Timeouts and SO_ERROR stay the relay socket's: blocking happens there.
//! A forged variable can only label sockets the process already holds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable that carries the records across `exec`.
pub const RELAYED_ENV: &str = "LIBSDP_RELAYED";

/// inode of a relay socket end → our duplicate of the connection's shadow.
static MAP: Mutex<Option<HashMap<u64, i32>>> = Mutex::new(None);
/// Whether MAP may hold anything (a cheap gate for the hooks).
static ANY: AtomicBool = AtomicBool::new(false);
/// Whether the environment was read.
static ENV_READ: AtomicBool = AtomicBool::new(false);

fn lock() -> std::sync::MutexGuard<'static, Option<HashMap<u64, i32>>> {
    MAP.lock().unwrap_or_else(|p| p.into_inner())
}

/// The inode of the socket `fd` names (`None`: not open, or not a socket).
pub fn socket_ino(fd: i32) -> Option<u64> {
    // SAFETY: a zeroed stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one struct stat.
    let rc = unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) };
    (rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some(st.st_ino)
}

fn sockopt(fd: i32, opt: i32) -> Option<i32> {
    crate::sys::int_option(fd, libc::SOL_SOCKET, opt)
}

fn is_tcp_socket(fd: i32) -> bool {
    matches!(
        sockopt(fd, libc::SO_DOMAIN),
        Some(libc::AF_INET | libc::AF_INET6)
    ) && sockopt(fd, libc::SO_PROTOCOL) == Some(libc::IPPROTO_TCP)
}

/// In this process: the relay socket of inode `ino` stands for the connection whose shadow
/// `shadow` duplicates (the library's own descriptor from now on, close-on-exec).
///
/// The duplicate goes when the connection does: the progress thread watches it for the
/// peer's end (the peer closes its shadow when its side of the connection is closed), as
/// nothing here sees the program close the relay socket (`fclose` closes through the C
/// library's internal `close`). `watch`: false where no thread may be started (the
/// constructor); such records stay until exit, one per inherited connection.
pub fn register(ino: u64, shadow: i32, watch: bool) {
    crate::sys::mark_internal(shadow);
    // SAFETY: fcntl with an int argument on our own descriptor.
    unsafe { libc::syscall(libc::SYS_fcntl, shadow, libc::F_SETFD, libc::FD_CLOEXEC) };
    let old = lock().get_or_insert_with(HashMap::new).insert(ino, shadow);
    if let Some(old) = old.filter(|&o| o != shadow) {
        crate::sys::close(old);
    }
    ANY.store(true, Ordering::Release);
    if watch {
        let task = std::sync::Arc::new(Gone { ino, shadow });
        let ev = (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32;
        if let Some(t) = crate::progress::register(shadow, ev, task) {
            TOKENS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((shadow, t));
        }
    }
}

/// Progress registrations of the duplicates: (fd, token).
static TOKENS: Mutex<Vec<(i32, u64)>> = Mutex::new(Vec::new());

/// The peer ended the connection: the duplicate answers for nothing any more.
struct Gone {
    ino: u64,
    shadow: i32,
}

impl crate::progress::Task for Gone {
    fn on_event(&self, _fd: i32, _events: u32) {
        let mut g = lock();
        if g.as_ref().and_then(|m| m.get(&self.ino)) != Some(&self.shadow) {
            return;
        }
        if let Some(m) = g.as_mut() {
            m.remove(&self.ino);
        }
        drop(g);
        let token = {
            let mut t = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
            t.iter()
                .position(|&(fd, _)| fd == self.shadow)
                .map(|i| t.swap_remove(i).1)
        };
        if let Some(t) = token {
            crate::progress::unregister(t);
        }
        crate::sys::close(self.shadow);
    }
}

/// Records for an `exec` about to happen, of the connections relayed earlier (in this image,
/// or inherited with the environment) whose relay socket the exec keeps (an fd without
/// close-on-exec names it): fresh duplicates of their shadows that survive the exec. Read
/// from `/proc/self/fd`, only in a process that has records.
pub fn for_exec() -> Vec<String> {
    read_env();
    if !ANY.load(Ordering::Acquire) {
        return Vec::new();
    }
    let map: Vec<(u64, i32)> = match lock().as_ref() {
        Some(m) => m.iter().map(|(&i, &s)| (i, s)).collect(),
        None => return Vec::new(),
    };
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut kept: Vec<u64> = Vec::new();
    for fd in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        // SAFETY: fcntl(F_GETFD) on a number.
        let fl = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFD) };
        if fl < 0 || fl as i32 & libc::FD_CLOEXEC != 0 {
            continue;
        }
        if let Some(ino) = socket_ino(fd)
            && map.iter().any(|&(i, _)| i == ino)
            && !kept.contains(&ino)
        {
            kept.push(ino);
        }
    }
    map.into_iter()
        .filter(|(i, _)| kept.contains(i))
        .filter_map(|(ino, shadow)| exec_record(ino, shadow).map(|(e, _)| e))
        .collect()
}

/// One record for a new image: a duplicate of `shadow` that survives `exec`, and its entry
/// of [`RELAYED_ENV`] for the relay socket of inode `ino`. `None` (nothing left open) when
/// either cannot be made.
fn exec_record(ino: u64, shadow: i32) -> Option<(String, i32)> {
    let dup = dup_for_exec(shadow);
    if dup < 0 {
        return None;
    }
    let e = entry(ino, dup);
    if e.is_none() {
        crate::sys::close(dup);
    }
    Some((e?, dup))
}

/// Whether [`shadow_for`] may answer anything in this process (one load, for the hooks'
/// fast path: false once the environment was read and nothing is recorded).
#[inline]
pub fn maybe() -> bool {
    !ENV_READ.load(Ordering::Relaxed) || ANY.load(Ordering::Relaxed)
}

/// [`RELAYED_ENV`] for a child that gets `fds` (recorded relay sockets) without an exec hook
/// of ours (`posix_spawn`): each entry names a fresh duplicate of the shadow that survives the
/// child's exec; the caller closes them after the spawn (the second value).
pub fn for_spawn(fds: &[i32]) -> Option<(String, Vec<i32>)> {
    let mut entries = Vec::new();
    let mut dups = Vec::new();
    for &fd in fds {
        let Some(shadow) = shadow_for(fd) else {
            continue;
        };
        let Some(ino) = socket_ino(fd) else { continue };
        if let Some((e, dup)) = exec_record(ino, shadow) {
            entries.push(e);
            dups.push(dup);
        }
    }
    (!entries.is_empty()).then(|| (entries.join(","), dups))
}

/// The shadow that answers for `fd`, if `fd` names a recorded relay socket.
pub fn shadow_for(fd: i32) -> Option<i32> {
    if !ENV_READ.load(Ordering::Acquire) {
        read_env();
    }
    if !ANY.load(Ordering::Acquire) {
        return None;
    }
    let ino = socket_ino(fd)?;
    lock().as_ref()?.get(&ino).copied()
}

/// Parses [`RELAYED_ENV`] once, keeping the entries whose fd is the TCP socket recorded
/// (and making those close-on-exec: an `exec` passes them on again through [`for_exec`]).
/// Called by the preload's constructor, so that a program that never asks does not leak the
/// duplicates into what it spawns; it starts no thread.
pub fn read_env() {
    static ONCE: Mutex<()> = Mutex::new(());
    let _g = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if ENV_READ.load(Ordering::Acquire) {
        return;
    }
    if let Some(s) = std::env::var_os(RELAYED_ENV) {
        for (ino, fd, shadow_ino) in parse(&s.to_string_lossy()) {
            if socket_ino(fd) == Some(shadow_ino) && is_tcp_socket(fd) {
                register(ino, fd, false);
            }
        }
    }
    ENV_READ.store(true, Ordering::Release);
}

/// `<relay inode>:<fd>:<shadow inode>` entries separated by commas; malformed ones are
/// skipped.
pub fn parse(s: &str) -> Vec<(u64, i32, u64)> {
    s.split(',')
        .filter_map(|e| {
            let mut it = e.split(':');
            let ino = it.next()?.trim().parse().ok()?;
            let fd: i32 = it.next()?.trim().parse().ok()?;
            let shadow_ino = it.next()?.trim().parse().ok()?;
            (fd >= 0 && it.next().is_none()).then_some((ino, fd, shadow_ino))
        })
        .collect()
}

/// One entry of [`RELAYED_ENV`]: the relay socket's inode, the shadow duplicate's number
/// (which the exec keeps) and the shadow's inode.
fn entry(ino: u64, fd: i32) -> Option<String> {
    Some(format!("{ino}:{fd}:{}", socket_ino(fd)?))
}

/// A duplicate of `shadow` that survives `exec` (no close-on-exec), numbered high; -1 on
/// failure.
fn dup_for_exec(shadow: i32) -> i32 {
    // SAFETY: F_DUPFD with an int argument.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_fcntl,
            shadow,
            libc::F_DUPFD,
            crate::sys::INTERNAL_FD_MIN,
        )
    } as i32;
    if fd >= 0 {
        crate::sys::mark_internal(fd);
    }
    fd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_garbage_is_skipped() {
        assert_eq!(parse("12:400:5,99:401:6"), vec![(12, 400, 5), (99, 401, 6)]);
        assert!(parse("").is_empty());
        assert_eq!(
            parse("x:1:2,5:-1:2,5:y:2,6:2:3,::,7,1:2,1:2:3:4"),
            vec![(6, 2, 3)]
        );
    }
}
