//! libsdp's own log: levels 1 (everything) to 9 (errors only), as in the original libsdp's
//! `log min-level`; destinations stderr, syslog or a file.
//!
//! Messages are formatted into a stack buffer and written with one raw `write`, so logging
//! neither allocates on the data path nor re-enters the hooks.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

/// Level of an error message: always shown, since 9 is the highest `min-level`.
pub const ERROR: u8 = 9;
/// Level of a warning.
pub const WARN: u8 = 7;
/// Level of per-socket policy decisions (issue: "debug logging at log level ≤ 4").
pub const DECISION: u8 = 4;
/// Level of detailed tracing.
pub const TRACE: u8 = 1;

static MIN_LEVEL: AtomicU8 = AtomicU8::new(ERROR);
/// -1: stderr; -2: syslog; otherwise an fd opened CLOEXEC for a log file.
static DEST: AtomicI32 = AtomicI32::new(DEST_STDERR);
const DEST_STDERR: i32 = -1;
const DEST_SYSLOG: i32 = -2;

/// Configures the log from the policy file's `log` line (or the defaults: errors to stderr).
pub fn configure(spec: Option<&conf::LogSpec>) {
    let Some(spec) = spec else { return };
    MIN_LEVEL.store(spec.min_level.clamp(1, 9), Ordering::Relaxed);
    let dest = match &spec.dest {
        conf::LogDest::Stderr => DEST_STDERR,
        conf::LogDest::Syslog => DEST_SYSLOG,
        conf::LogDest::File(name) => std::ffi::CString::new(name.as_str())
            .ok()
            .and_then(|c| crate::sys::open_append(&c))
            .unwrap_or(DEST_STDERR),
    };
    DEST.store(dest, Ordering::Relaxed);
}

pub fn enabled(level: u8) -> bool {
    level >= MIN_LEVEL.load(Ordering::Relaxed)
}

/// A fixed-capacity message buffer; text beyond its end is cut.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Emits one message if `level` passes the configured minimum.
pub fn emit(level: u8, args: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    let _ = write!(line, "libsdp[{}]: {}", crate::sys::getpid(), args);
    if line.len == line.buf.len() {
        line.len -= 1;
    }
    line.buf[line.len] = b'\n';
    line.len += 1;
    match DEST.load(Ordering::Relaxed) {
        DEST_SYSLOG => {
            line.buf[line.len - 1] = 0;
            let prio = if level >= ERROR {
                libc::LOG_ERR
            } else {
                libc::LOG_DEBUG
            };
            // SAFETY: the buffer is NUL-terminated and "%s" consumes exactly one string.
            unsafe { libc::syslog(prio, c"%s".as_ptr(), line.buf.as_ptr()) };
        }
        DEST_STDERR => crate::sys::write_all(2, &line.buf[..line.len]),
        fd => crate::sys::write_all(fd, &line.buf[..line.len]),
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
