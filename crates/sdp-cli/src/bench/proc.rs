//! Child processes of the bench: the two legs' environments, CPU pinning, ports, and a
//! guard that kills what we started on every path out, errors included.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One side of the comparison: how a measured program is started.
#[derive(Debug, Clone)]
pub enum Leg {
    /// No preload at all.
    Base,
    /// `LD_PRELOAD=<so>`, and `LIBSDP_CONFIG_FILE=<conf>` if a policy file was given.
    Libsdp { so: PathBuf, conf: Option<PathBuf> },
}

impl fmt::Display for Leg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leg::Base => f.write_str("base"),
            Leg::Libsdp { .. } => f.write_str("libsdp"),
        }
    }
}

impl Leg {
    /// A command for `program` in this leg's environment, pinned to `cpu` if given.
    ///
    /// Both legs clear the variables the other leg sets, so that running `sdp bench`
    /// itself under a preload (or with a policy in the environment) cannot leak into the
    /// base leg or change the libsdp leg's policy.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, cpu: Option<usize>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_remove("LD_PRELOAD")
            .env_remove("LIBSDP_CONFIG_FILE");
        if let Leg::Libsdp { so, conf } = self {
            cmd.env("LD_PRELOAD", so);
            if let Some(conf) = conf {
                cmd.env("LIBSDP_CONFIG_FILE", conf);
            }
        }
        if let Some(cpu) = cpu {
            super::affinity::pin_child(&mut cmd, cpu);
        }
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// A started child that is killed and reaped when dropped, unless it already exited.
pub struct ChildGuard {
    child: Child,
    what: String,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
}

/// What a finished child printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ChildGuard {
    /// Starts `cmd` with stdout and stderr captured (drained by threads, so a chatty
    /// child never blocks on a full pipe).
    pub fn spawn(mut cmd: Command, what: &str) -> Result<ChildGuard, String> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let out = child.stdout.take().map(drain);
        let err = child.stderr.take().map(drain);
        Ok(ChildGuard {
            child,
            what: what.to_string(),
            out,
            err,
        })
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits at most `timeout` for the child to exit; kills it and fails past that.
    pub fn wait(mut self, timeout: Duration) -> Result<Finished, String> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let (_, err) = self.collect();
                    return Err(format!(
                        "{} did not finish within {:.0} s{}",
                        self.what,
                        timeout.as_secs_f64(),
                        tail(&err)
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("waiting for {}: {e}", self.what)),
            }
        };
        let (stdout, stderr) = self.collect();
        Ok(Finished {
            status,
            stdout,
            stderr,
        })
    }

    /// Like [`wait`](Self::wait), and fails unless the exit status is success.
    pub fn wait_ok(self, timeout: Duration) -> Result<Finished, String> {
        let what = self.what.clone();
        let f = self.wait(timeout)?;
        if !f.status.success() {
            return Err(format!(
                "{what} failed ({}){}",
                f.status,
                tail(&(f.stderr.clone() + &f.stdout))
            ));
        }
        Ok(f)
    }

    fn collect(&mut self) -> (String, String) {
        let join = |h: Option<JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        (join(self.out.take()), join(self.err.take()))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// The last lines of a child's output, for error messages.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let from = lines.len().saturating_sub(3);
    format!(": {}", lines[from..].join(" | "))
}

/// Waits until a TCP socket listens on `port` (IPv4 or IPv6), looking at
/// `/proc/net/tcp*` rather than connecting: a probe connection would count as a client
/// to servers such as `iperf3 -s -1`.
pub fn wait_listening(server: &mut ChildGuard, port: u16, timeout: Duration) -> Result<(), String> {
    let what = server.what.clone();
    wait_listening_while(port, timeout, &what, || server.running())
}

/// [`wait_listening`] for a child this module did not start, known by its pid.
pub fn wait_listening_pid(pid: u32, port: u16, timeout: Duration) -> Result<(), String> {
    let what = format!("process {pid}");
    wait_listening_while(port, timeout, &what, || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    })
}

fn wait_listening_while(
    port: u16,
    timeout: Duration,
    what: &str,
    mut running: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let needle = format!(":{port:04X} ");
    loop {
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(table) {
                // sl local_address rem_address st …; st 0A is LISTEN.
                let listening = text.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[3] == "0A" && format!("{} ", f[1]).ends_with(&needle)
                });
                if listening {
                    return Ok(());
                }
            }
        }
        if !running() {
            return Err(format!("{what} exited before listening on port {port}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("{what} did not listen on port {port} in time"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A port nobody listens on, different from every port this process handed out
/// before (servers of consecutive repetitions never meet a previous one's TIME_WAIT).
///
/// Chosen below the kernel's ephemeral range, where the client ends of earlier
/// connections (TIME_WAIT included) do not sit, and probed with a bind *without*
/// SO_REUSEADDR, as servers that do not set it (sockperf) will bind it.
pub fn free_port() -> Result<u16, String> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    let (lo, hi) = port_window();
    let mut x = seed();
    for _ in 0..1000 {
        // xorshift64: distinct random ports without a dependency.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = lo + (x % u64::from(hi - lo)) as u16;
        if given.contains(&port) {
            continue;
        }
        if bindable(port) {
            given.insert(port);
            return Ok(port);
        }
    }
    Err(format!("no free port found between {lo} and {hi}"))
}

/// 10000 up to the start of the ephemeral range when that leaves room; otherwise the
/// old 20000..50000.
fn port_window() -> (u16, u16) {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
    match start {
        Some(s) if s >= 15000 => (10000, s),
        _ => (20000, 50000),
    }
}

/// Can a plain socket (no SO_REUSEADDR) bind 127.0.0.1:`port`?
fn bindable(port: u16) -> bool {
    // SAFETY: a socket we create and close here; `sa` is a fully initialised
    // sockaddr_in on the stack, passed with its size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok();
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = port.to_be();
        sa.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        let ok = libc::bind(
            fd,
            (&raw const sa).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) == 0;
        libc::close(fd);
        ok
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)) | 1
}

/// `program` found in `$PATH`, if it is there.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// File descriptors a child may open: the hard RLIMIT_NOFILE (it raises its soft limit to it
/// with [`raise_nofile`]), less what a process holds anyway.
pub fn fd_room() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `rl`, which lives on this frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    rl.rlim_max.saturating_sub(256)
}

/// Raises the soft RLIMIT_NOFILE to the hard one.
pub fn raise_nofile() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit on this frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}
