//! libsdp's own log: levels 1 (everything) to 9 (errors only), as in the original libsdp's
//! `log min-level`; destinations stderr, syslog or a file.
//!
//! | level | what |
//! |---|---|
//! | 9 [`ERROR`] | errors (always shown: 9 is the highest `min-level`) |
//! | 8 [`WARN`] | warnings (an SDP exchange failed, a transport died) |
//! | 7 [`SUMMARY`] | one decision line per connection, listener and accepted socket |
//! | 4 [`DECISION`] | the steps of a decision (rule matched, beacon published, rendezvous) |
//! | 1 [`TRACE`] | every data call on an offloaded socket |
//!
//! A message is shown when its level is at least the configured `min-level`.
//!
//! `destination file NAME` appends to NAME (relative to the working directory the process had
//! when it made its first socket). `%p` in NAME is replaced by the process id, and a fork child
//! opens its own file on its first message: one file per process. Without `%p` every process
//! of a program appends to the same file, each line whole and tagged `libsdp[pid]`.
//!
//! Messages are formatted into a stack buffer and written with one raw `write`, so logging
//! neither allocates on the data path nor re-enters the hooks.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use fallback::Reason;

/// Level of an error message: always shown, since 9 is the highest `min-level`.
pub const ERROR: u8 = 9;
/// Level of a warning.
pub const WARN: u8 = 8;
/// Level of the one-line decision summary of each connection (the original libsdp's
/// "connect/listen summary"; the "decision log at level 7").
pub const SUMMARY: u8 = 7;
/// Level of the steps of a decision: the rule that matched, beacons, rendezvous outcomes.
pub const DECISION: u8 = 4;
/// Level of detailed tracing.
pub const TRACE: u8 = 1;

static MIN_LEVEL: AtomicU8 = AtomicU8::new(ERROR);
/// -1: stderr; -2: syslog; otherwise an fd opened CLOEXEC for a log file.
static DEST: AtomicI32 = AtomicI32::new(DEST_STDERR);
const DEST_STDERR: i32 = -1;
const DEST_SYSLOG: i32 = -2;

/// A per-process file name (`%p`) and the pid whose file `DEST` is.
static FILE_PATTERN: Mutex<Option<String>> = Mutex::new(None);
static FILE_PID: AtomicI32 = AtomicI32::new(0);

/// Configures the log from the policy file's `log` line (or the defaults: errors to stderr).
pub fn configure(spec: Option<&conf::LogSpec>) {
    let Some(spec) = spec else { return };
    MIN_LEVEL.store(spec.min_level.clamp(1, 9), Ordering::Relaxed);
    let dest = match &spec.dest {
        conf::LogDest::Stderr => DEST_STDERR,
        conf::LogDest::Syslog => DEST_SYSLOG,
        conf::LogDest::File(name) => {
            if name.contains("%p") {
                *FILE_PATTERN.lock().unwrap_or_else(|p| p.into_inner()) = Some(name.clone());
            }
            open_file(name)
        }
    };
    DEST.store(dest, Ordering::Relaxed);
}

/// Opens the log file for this process, moved above the application's fd numbers. A file
/// that cannot be opened leaves the log on stderr, saying so once.
fn open_file(pattern: &str) -> i32 {
    let pid = crate::sys::getpid();
    let name = pattern.replace("%p", &pid.to_string());
    FILE_PID.store(pid, Ordering::Relaxed);
    match std::ffi::CString::new(name.as_str())
        .ok()
        .and_then(|c| crate::sys::open_append(&c))
    {
        Some(fd) => crate::sys::move_high(fd),
        None => {
            let msg = format!(
                "libsdp[{pid}]: cannot open log file {name}: {}; logging to stderr\n",
                std::io::Error::from_raw_os_error(crate::sys::errno())
            );
            crate::sys::write_all(2, msg.as_bytes());
            DEST_STDERR
        }
    }
}

/// A fork child of a process logging to a `%p` file: its own file, opened on first use.
#[cold]
fn reopen_for_child(old: i32) -> i32 {
    let pattern = FILE_PATTERN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(pattern) = pattern else { return old };
    let fd = open_file(&pattern);
    if old >= 0 {
        crate::sys::close(old);
    }
    DEST.store(fd, Ordering::Relaxed);
    fd
}

pub fn enabled(level: u8) -> bool {
    level >= MIN_LEVEL.load(Ordering::Relaxed)
}

/// Bytes of an overlong message kept from its start, and from its end.
const HEAD: usize = 320;
const TAIL: usize = 160;

/// A fixed-capacity message buffer. An overlong message keeps its start and its end (where a
/// long path would push out the part that says what happened) with " ... " between them.
struct Line {
    buf: [u8; HEAD + 5 + TAIL + 1],
    len: usize,
    /// The last TAIL bytes written past HEAD, as a ring; `cut` counts every byte past HEAD.
    tail: [u8; TAIL],
    cut: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; HEAD + 5 + TAIL + 1],
            len: 0,
            tail: [0; TAIL],
            cut: 0,
        }
    }

    /// Joins the kept end to the start; the message is then in `buf[..len]`.
    fn finish(&mut self) {
        if self.cut == 0 {
            return;
        }
        let n = self.cut.min(TAIL);
        if self.cut > TAIL {
            self.buf[self.len..self.len + 5].copy_from_slice(b" ... ");
            self.len += 5;
        }
        let start = self.cut - n;
        for i in 0..n {
            self.buf[self.len] = self.tail[(start + i) % TAIL];
            self.len += 1;
        }
    }
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for &b in s.as_bytes() {
            if self.len < HEAD {
                self.buf[self.len] = b;
                self.len += 1;
            } else {
                self.tail[self.cut % TAIL] = b;
                self.cut += 1;
            }
        }
        Ok(())
    }
}

/// Emits one message if `level` passes the configured minimum.
pub fn emit(level: u8, args: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let mut line = Line::new();
    let _ = write!(line, "libsdp[{}]: {}", crate::sys::getpid(), args);
    line.finish();
    line.buf[line.len] = b'\n';
    line.len += 1;
    match DEST.load(Ordering::Relaxed) {
        DEST_SYSLOG => {
            line.buf[line.len - 1] = 0;
            let prio = match level {
                ERROR.. => libc::LOG_ERR,
                WARN => libc::LOG_WARNING,
                SUMMARY => libc::LOG_INFO,
                _ => libc::LOG_DEBUG,
            };
            // SAFETY: the buffer is NUL-terminated and "%s" consumes exactly one string.
            unsafe { libc::syslog(prio, c"%s".as_ptr(), line.buf.as_ptr()) };
        }
        DEST_STDERR => crate::sys::write_all(2, &line.buf[..line.len]),
        mut fd => {
            if FILE_PID.load(Ordering::Relaxed) != crate::sys::getpid() {
                fd = reopen_for_child(fd);
            }
            crate::sys::write_all(if fd < 0 { 2 } else { fd }, &line.buf[..line.len])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(text: &str) -> String {
        let mut l = Line::new();
        let _ = write!(l, "{text}");
        l.finish();
        String::from_utf8(l.buf[..l.len].to_vec()).unwrap()
    }

    #[test]
    fn short_message_is_whole_and_long_one_keeps_both_ends() {
        assert_eq!(render("short"), "short");
        let exact = "y".repeat(HEAD + TAIL);
        assert_eq!(render(&exact), exact);
        let long = format!("{}: every socket stays TCP", "x".repeat(100_000));
        let r = render(&long);
        assert!(r.starts_with(&"x".repeat(HEAD)), "{r}");
        assert!(r.ends_with("x: every socket stays TCP"), "{r}");
        assert!(r.contains(" ... "));
        assert_eq!(r.len(), HEAD + 5 + TAIL);
    }
}

/// `sdp_log!(level, "format", args…)`.
#[macro_export]
macro_rules! sdp_log {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::emit($level, format_args!($($arg)*));
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The decision summary (level 7): one line per connection, listener and accepted socket.
//
//   decision fd=5 role=client local=127.0.0.1:40000 remote=127.0.0.1:5000 rule=/etc/libsdp.conf:3
//            mode=both transport=shm reason=- program=redis-benchmark
//
// A client's line is written when its transport is settled: at connect for TCP, when the
// server's library completes the exchange (or the connection goes back to TCP) for SDP. Nothing
// here runs unless the level is enabled.

/// What the policy said for a socket, kept from `connect`/`listen` until its line is written.
struct Noted {
    rule: String,
    mode: &'static str,
}

static NOTED: Mutex<Option<HashMap<i32, Noted>>> = Mutex::new(None);

thread_local! {
    /// The last TCP fallback this thread recorded: (fd, reason code).
    static LAST_TCP: Cell<(i32, u16)> = const { Cell::new((-1, 0)) };
}

/// The `rule=` field: `file:line` of the rule that decided, or why the default applied.
pub fn rule_field(source: &str, rule_line: Option<u32>, why: &str) -> String {
    match rule_line {
        Some(line) => format!("{source}:{line}"),
        None => why.to_string(),
    }
}

/// Remembers the policy's decision for `fd` (before the call that acts on it).
pub fn note_decision(fd: i32, rule: String, mode: &'static str) {
    let mut g = NOTED.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(HashMap::new)
        .insert(fd, Noted { rule, mode });
}

fn take_noted(fd: i32) -> Option<Noted> {
    let mut g = NOTED.lock().unwrap_or_else(|p| p.into_inner());
    g.as_mut()?.remove(&fd)
}

fn peek_noted(fd: i32) -> Option<(String, &'static str)> {
    let g = NOTED.lock().unwrap_or_else(|p| p.into_inner());
    g.as_ref()?.get(&fd).map(|n| (n.rule.clone(), n.mode))
}

/// A socket stays on (or goes back to) TCP for `reason` (called where the row is recorded).
#[inline]
pub fn note_tcp(fd: i32, reason: Reason) {
    if enabled(SUMMARY) {
        LAST_TCP.with(|c| c.set((fd, reason.code())));
    }
}

fn last_tcp(fd: i32) -> Reason {
    let (f, code) = LAST_TCP.with(Cell::get);
    if f == fd {
        Reason::from_code(code).unwrap_or(Reason::Undecided)
    } else {
        Reason::Undecided
    }
}

pub(crate) fn errno_name(e: i32) -> &'static str {
    match e {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENOBUFS => "ENOBUFS",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EINTR => "EINTR",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        _ => "",
    }
}

struct Addr(Option<SocketAddr>);

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn line(
    fd: i32,
    role: &str,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    noted: Option<(String, &'static str)>,
    transport: &str,
    reason: Reason,
    errno: Option<i32>,
) {
    let (rule, mode) = noted.unwrap_or_else(|| ("-".to_string(), "-"));
    let program = crate::state::try_globals().map_or("", |g| g.program.as_str());
    match errno {
        Some(e) => emit(
            SUMMARY,
            format_args!(
                "decision fd={fd} role={role} local={} remote={} rule={rule} mode={mode} transport={transport} reason={reason} errno={e}{}{} program={program}",
                Addr(local),
                Addr(remote),
                if errno_name(e).is_empty() { "" } else { "/" },
                errno_name(e),
            ),
        ),
        None => emit(
            SUMMARY,
            format_args!(
                "decision fd={fd} role={role} local={} remote={} rule={rule} mode={mode} transport={transport} reason={reason} program={program}",
                Addr(local),
                Addr(remote),
            ),
        ),
    }
}

/// A client's connect settled on TCP at once (policy, or the offload path cannot serve it).
pub fn connect_tcp(fd: i32, remote: SocketAddr, reason: Reason) {
    if !enabled(SUMMARY) {
        return;
    }
    let noted = take_noted(fd).map(|n| (n.rule, n.mode));
    // LINUX: the kernel picks the local address during connect, which has not run yet.
    let local = crate::sys::sockname(fd).filter(|a| a.port() != 0);
    line(
        fd,
        "client",
        local,
        Some(remote),
        noted,
        "tcp",
        reason,
        None,
    );
}

/// A client's connect fails without trying TCP (`sdp` policy, no SDP path); returns `errno`.
pub fn connect_refused(fd: i32, remote: SocketAddr, reason: Reason, errno: i32) -> i32 {
    if enabled(SUMMARY) {
        let noted = take_noted(fd).map(|n| (n.rule, n.mode));
        line(
            fd,
            "client",
            None,
            Some(remote),
            noted,
            "none",
            reason,
            Some(errno),
        );
    }
    errno
}

/// The kernel TCP connect of a client that was going to SDP failed (nobody listens, ...).
pub fn connect_failed(fd: i32, remote: SocketAddr, errno: i32) {
    if enabled(SUMMARY) {
        let noted = take_noted(fd).map(|n| (n.rule, n.mode));
        line(
            fd,
            "client",
            None,
            Some(remote),
            noted,
            "none",
            Reason::Offloaded,
            Some(errno),
        );
    }
}

/// A pending client connection settled: over SDP (`fallback` `None`) or back on TCP.
pub fn resolved(g: &crate::offload::Inner, fallback: Option<Reason>) {
    if !enabled(SUMMARY) {
        return;
    }
    let Some(&fd) = g.app_fds.first() else { return };
    let Some(noted) = take_noted(fd) else { return };
    let transport = match (&g.phase, fallback) {
        (crate::offload::Phase::Offloaded(s), None) => s.transport().as_str(),
        _ => "tcp",
    };
    let role = if g.role == 2 { "server" } else { "client" };
    line(
        fd,
        role,
        g.local,
        g.peer,
        Some((noted.rule, noted.mode)),
        transport,
        fallback.unwrap_or(Reason::Offloaded),
        None,
    );
}

/// A listening socket: what its clients will get.
pub fn listened(fd: i32, sdp_allowed: bool) {
    if !enabled(SUMMARY) {
        return;
    }
    let (transport, reason) = if sdp_allowed {
        ("shm", Reason::Offloaded)
    } else {
        ("tcp", Reason::Policy)
    };
    line(
        fd,
        "listen",
        crate::sys::sockname(fd),
        None,
        peek_noted(fd),
        transport,
        reason,
        None,
    );
}

/// A connection accepted on `listener`; `refused`: the policy turned the client away.
pub fn accepted(listener: i32, fd: i32, refused: bool) {
    if !enabled(SUMMARY) {
        return;
    }
    let noted = peek_noted(listener);
    if let Some(conn) = crate::offload::lookup(fd) {
        let g = conn.lock();
        if let crate::offload::Phase::Offloaded(s) = &g.phase {
            let t = s.transport().as_str();
            line(
                fd,
                "server",
                g.local,
                g.peer,
                noted,
                t,
                Reason::Offloaded,
                None,
            );
            return;
        }
    }
    let (local, remote) = (crate::sys::sockname(fd), crate::sys::peername(fd));
    if refused {
        // The hook closes it and accepts the next connection, as the policy `sdp` asks.
        line(
            fd,
            "server",
            local,
            remote,
            noted,
            "refused",
            Reason::PlainClient,
            None,
        );
    } else {
        line(
            fd,
            "server",
            local,
            remote,
            noted,
            "tcp",
            last_tcp(fd),
            None,
        );
    }
}
