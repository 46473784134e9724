//! Process-wide state, built lazily on the first stream socket (never in the constructor: a
//! process that only runs `ls` pays nothing).

use std::sync::OnceLock;

use crate::log;
use crate::sdp_log;

/// Everything the switch decides with, fixed for the life of the process image.
pub struct Globals {
    /// False when `LIBSDP_ENABLE=0`, or when loaded from /etc/ld.so.preload without
    /// `LIBSDP_ENABLE=1`: then no socket is tracked and every call passes through.
    pub active: bool,
    pub policy: conf::Policy,
    /// The program's short name, matched against the rules' program globs.
    pub program: String,
}

static GLOBALS: OnceLock<Globals> = OnceLock::new();
/// What the calls get while the policy cannot be read for want of a resource (see [`init`]).
static PASS_THROUGH: OnceLock<Globals> = OnceLock::new();
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The process state, initialising it on first use.
pub fn globals() -> &'static Globals {
    if let Some(g) = GLOBALS.get() {
        return g;
    }
    let _once = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(g) = GLOBALS.get() {
        return g;
    }
    match init() {
        Some(g) => GLOBALS.get_or_init(|| g),
        // Not now: this call passes through, and the next stream socket tries again.
        None => PASS_THROUGH.get_or_init(|| Globals {
            active: false,
            policy: conf::Policy::tcp_only(),
            program: program_name(),
        }),
    }
}

/// The state if it was already built; never initialises.
pub fn try_globals() -> Option<&'static Globals> {
    GLOBALS.get()
}

fn program_name() -> String {
    unsafe extern "C" {
        // glibc's short program name (argv[0]'s basename), set before any constructor runs.
        static program_invocation_short_name: *const libc::c_char;
    }
    // SAFETY: glibc initialises this pointer to a NUL-terminated string before user code runs
    // and never frees it.
    let p = unsafe { program_invocation_short_name };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated, as above.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

fn env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// Builds the state. `None`: the policy file could not be read for want of a resource (no
/// descriptor left, no memory): a program whose first stream socket comes at such a moment
/// must not stay TCP for the rest of its life (it did: the error made the policy TCP-only
/// for good), so nothing is fixed yet and the next socket tries again.
fn init() -> Option<Globals> {
    std::panic::set_hook(Box::new(|info| {
        sdp_log!(log::ERROR, "internal error, call failed with EIO: {info}");
    }));
    let loaded_by = conf::loaded_by(env("LD_PRELOAD").as_deref());
    if let Some(v) = env("LIBSDP_ENABLE")
        && !matches!(v.trim(), "" | "0" | "1")
    {
        sdp_log!(
            log::ERROR,
            "LIBSDP_ENABLE={v:?} is neither 0 nor 1; ignored (libsdp is {})",
            if loaded_by == conf::LoadedBy::LdPreload {
                "on"
            } else {
                "off"
            }
        );
    }
    let act = conf::activation(env, loaded_by);
    let program = program_name();
    if !act.active {
        return Some(Globals {
            active: false,
            policy: conf::Policy::tcp_only(),
            program,
        });
    }
    let transient = std::cell::Cell::new(None);
    let resolved = conf::Policy::resolve(&act, |p| {
        let r = std::fs::read_to_string(p);
        if let Err(e) = &r
            && let Some(
                errno @ (libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EINTR | libc::EAGAIN),
            ) = e.raw_os_error()
        {
            transient.set(Some(errno));
        }
        r
    });
    if let Some(errno) = transient.get() {
        sdp_log!(
            log::WARN,
            "cannot read the policy file now ({}); this socket stays TCP, the next one tries again",
            crate::log::errno_name(errno)
        );
        return None;
    }
    if let Some(e) = &resolved.error {
        // Fail open: a broken policy must never break the program; one error, then TCP.
        sdp_log!(
            log::ERROR,
            "{}; every socket stays TCP",
            one_line(&e.to_string())
        );
    }
    let policy = resolved.policy;
    log::configure(policy.log());
    // Read (and report a bad) LIBSDP_SPIN_US now, not at the first blocking receive.
    crate::offload::data::spin_budget();
    crate::fork::register_handlers();
    // Rings kept for reuse (swept by the progress thread, which every process with an SDP
    // connection has). Here, not later: registering atfork handlers while holding a lock a
    // forking thread's handlers wait for deadlocks on C libraries before 2.35.
    ib_verbs::shm::reuse::enable();
    // SAFETY: registering a plain function for normal process exit.
    unsafe { libc::atexit(crate::offload::setup::flush_at_exit) };
    Some(Globals {
        active: true,
        policy,
        program,
    })
}

/// The first line of a multi-line error, with a count of the rest.
fn one_line(text: &str) -> String {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines
        .next()
        .unwrap_or("cannot read the policy file")
        .to_string();
    match lines.count() {
        0 => first,
        n => format!(
            "{first} (and {n} more error{})",
            if n == 1 { "" } else { "s" }
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_counts_the_rest() {
        assert_eq!(
            super::one_line("a:1:1: x\na:2:1: y\na:3:3: z\n"),
            "a:1:1: x (and 2 more errors)"
        );
        assert_eq!(super::one_line("a:1:1: x"), "a:1:1: x");
    }
}
