//! Test-suite helpers shared by `tests/` and `benches/`.
//!
//! The real-process tests run an unmodified program twice, once as it is ([`Mode::Base`])
//! and once with `LD_PRELOAD=libsdp.so` ([`Mode::Preload`]), and compare what the two runs
//! printed and how they exited. Everything here is about doing that reliably: finding the
//! library, giving every test its own ports, never leaving a server behind, failing with
//! the apt package to install when a tool is missing, and never hanging.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// How a program is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Without libsdp.
    Base,
    /// With `LD_PRELOAD=<absolute libsdp.so>` and the default policy.
    Preload,
}

impl Mode {
    pub const BOTH: [Mode; 2] = [Mode::Base, Mode::Preload];
}

/// The libsdp.so under test: `$LIBSDP_SO` if set, else the newest of
/// `<target>/release/libsdp.so` and `<target>/debug/libsdp.so`, the target directory
/// being the one this test executable was built into (`<target>/<profile>/deps/<test>`).
pub fn libsdp_so() -> PathBuf {
    if let Some(p) = std::env::var_os("LIBSDP_SO") {
        let p = PathBuf::from(p);
        return p
            .canonicalize()
            .unwrap_or_else(|e| panic!("LIBSDP_SO={}: {e}", p.display()));
    }
    let exe = std::env::current_exe().expect("current_exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test executable is not under <target>/<profile>/deps");
    let newest = ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("libsdp.so"))
        .filter_map(|p| {
            let t = p.metadata().and_then(|m| m.modified()).ok()?;
            Some((t, p))
        })
        .max_by_key(|(t, _)| *t);
    match newest {
        Some((_, p)) => p.canonicalize().expect("canonicalize libsdp.so"),
        None => panic!(
            "no libsdp.so in {}/{{release,debug}}: build it first: cargo build --release --workspace",
            target.display()
        ),
    }
}

/// `program` from `$PATH`; a missing tool fails the test with the package to install
/// (CI installs everything in `tests/APT-PACKAGES`; a skipped test would hide a gap).
pub fn require_tool(program: &str, apt_package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("`{program}` is not installed: apt-get install -y {apt_package}"))
}

/// A command for `program` in `mode`. Either way the variables of the other mode are
/// removed, so a test run from a preloaded shell still has a clean base leg.
pub fn command(mode: Mode, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("LD_PRELOAD");
    if mode == Mode::Preload {
        cmd.env("LD_PRELOAD", preload_value());
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// The `LD_PRELOAD` value of [`Mode::Preload`]: libsdp.so, after `$LIBSDP_PRELOAD_FIRST`
/// when that is set (scripts/sanitizers.sh puts the AddressSanitizer runtime first there,
/// which an instrumented libsdp.so needs ahead of it).
pub fn preload_value() -> std::ffi::OsString {
    let mut v = std::ffi::OsString::new();
    if let Some(first) = std::env::var_os("LIBSDP_PRELOAD_FIRST").filter(|f| !f.is_empty()) {
        v.push(first);
        v.push(" ");
    }
    v.push(libsdp_so());
    v
}

/// How a finished program ended and what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit code, or `128 + signal` when killed by a signal (as a shell reports it).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A started process, in its own process group, killed with its whole group (forked
/// workers included) when dropped.
pub struct Proc {
    child: Child,
    what: String,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr captured.
    pub fn spawn(mut cmd: Command, what: &str) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let out = child.stdout.take().map(drain);
        let err = child.stderr.take().map(drain);
        Proc {
            child,
            what: what.to_string(),
            out,
            err,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the exit, at most `timeout` (then panics; the group is killed on drop).
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        self.finish(timeout)
    }

    fn finish(&mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() >= deadline {
                self.kill_group();
                let (out, err) = self.collect();
                panic!(
                    "{} did not finish within {timeout:?}\nstdout: {out}\nstderr: {err}",
                    self.what
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let (stdout, stderr) = self.collect();
        Outcome {
            code: status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            stdout,
            stderr,
        }
    }

    /// Stops the process (SIGTERM to the group, SIGKILL after a grace period) and
    /// returns what it printed.
    pub fn stop(mut self) -> Outcome {
        signal_group(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.wait(Duration::from_secs(5))
    }

    fn kill_group(&mut self) {
        signal_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn collect(&mut self) -> (String, String) {
        // Forked workers may still hold the pipes open; don't wait for them forever.
        signal_group(self.child.id(), libc::SIGKILL);
        let join = |h: Option<JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        (join(self.out.take()), join(self.err.take()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group();
    }
}

fn signal_group(pgid: u32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; the group is the one
    // `Proc::spawn` created for this child (pgid == its pid), so only what we started
    // is hit. No memory is passed.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), sig);
    }
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// A started process in its own group whose stdout is read line by line, so that a test can
/// act at its `SYNC` lines or at lines it expects (and release it with a line on stdin).
/// Killed with its group when dropped. Every wait ends after `timeout` (or the wait's own
/// bound) with a panic that shows what it printed.
pub struct Synced {
    child: Child,
    what: String,
    lines: std::sync::mpsc::Receiver<String>,
    /// What it printed so far, a line each.
    pub stdout: String,
    /// Its stderr so far (read as it comes, for messages while it runs).
    err_so_far: std::sync::Arc<Mutex<String>>,
    /// The stderr reader, done at the end of output.
    err: Option<JoinHandle<()>>,
    timeout: Duration,
}

impl Synced {
    pub fn spawn(mut cmd: Command, what: &str, timeout: Duration) -> Synced {
        use std::io::BufRead;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err_so_far = std::sync::Arc::new(Mutex::new(String::new()));
        let keep = std::sync::Arc::clone(&err_so_far);
        let err = std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut b) {
                keep.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&String::from_utf8_lossy(&b[..n]));
            }
        });
        Synced {
            child,
            what: what.to_string(),
            lines,
            stdout: String::new(),
            err_so_far,
            err: Some(err),
            timeout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.err_so_far
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The next line that starts with `prefix`, within `within` (panics on a hang, showing
    /// stdout and stderr, or at the end of output).
    pub fn expect_prefix(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let what = format!("line {prefix:?}");
        loop {
            match self.next_line_or(deadline, &what, within) {
                Some(line) if line.starts_with(prefix) => return line,
                Some(_) => {}
                None => panic!(
                    "{}: no line {prefix:?} before the end of output; stdout:\n{}stderr:\n{}",
                    self.what,
                    self.stdout,
                    self.stderr()
                ),
            }
        }
    }

    /// SIGKILL to its group, and the child reaped.
    pub fn kill(&mut self) {
        kill_group(self.pid());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The next line, kept in `stdout`; `None` at the end of output. Panics at `deadline`.
    fn next_line(&mut self, deadline: Instant, waiting_for: &str) -> Option<String> {
        self.next_line_or(deadline, waiting_for, self.timeout)
    }

    /// [`Synced::next_line`], whose panic names `bound` as the time it waited.
    fn next_line_or(
        &mut self,
        deadline: Instant,
        waiting_for: &str,
        bound: Duration,
    ) -> Option<String> {
        use std::sync::mpsc::RecvTimeoutError;
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.stdout.push_str(&line);
                self.stdout.push('\n');
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!(
                "{} hung: no {waiting_for} within {bound:?}; printed so far:\n{}stderr:\n{}",
                self.what,
                self.stdout,
                self.stderr()
            ),
        }
    }

    /// Reads lines until the next `SYNC` (true) or the end of stdout (false).
    pub fn until_sync(&mut self, deadline: Instant) -> bool {
        while let Some(line) = self.next_line(deadline, "SYNC or exit") {
            if line == "SYNC" {
                return true;
            }
        }
        false
    }

    /// Reads lines until `want` (panics at the end of output or after the timeout).
    pub fn expect_line(&mut self, want: &str) {
        let deadline = Instant::now() + self.timeout;
        let what = format!("line {want:?}");
        loop {
            match self.next_line(deadline, &what) {
                Some(line) if line == want => return,
                Some(_) => {}
                None => panic!(
                    "{}: no line {want:?} before the end of output; printed:\n{}",
                    self.what, self.stdout
                ),
            }
        }
    }

    /// A byte on its stdin: what a process waiting at `SYNC` reads to go on.
    pub fn release(&mut self) {
        use std::io::Write;
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(b"\n");
            let _ = stdin.flush();
        }
    }

    /// Runs to the end; `at_sync(n, pgid)` at the n-th `SYNC` (from 0), before releasing it.
    pub fn finish(mut self, mut at_sync: impl FnMut(usize, u32)) -> Outcome {
        let deadline = Instant::now() + self.timeout;
        let mut n = 0;
        while self.until_sync(deadline) {
            at_sync(n, self.pid());
            n += 1;
            self.release();
        }
        drop(self.child.stdin.take());
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "{} hung: did not exit within {:?}; printed:\n{}",
                self.what,
                self.timeout,
                self.stdout
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        kill_group(self.pid());
        if let Some(h) = self.err.take() {
            let _ = h.join();
        }
        let stderr = self.stderr();
        Outcome {
            code: status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            stdout: std::mem::take(&mut self.stdout),
            stderr,
        }
    }
}

impl Drop for Synced {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILL to a process group a harness created (pgid == its first child's pid).
pub fn kill_group(pgid: u32) {
    // SAFETY: kill(2) on a process group of ours; a stale group is ESRCH, harmless.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
    }
}

/// SDP carried the bytes: at least `conns` connection rows, every one on `shm`, at least
/// `conns` of them with bytes counted.
pub fn assert_offloaded(what: &str, rows: &[StatRow], conns: usize) {
    let c: Vec<&StatRow> = rows.iter().filter(|r| r.is_connection()).collect();
    let all = show_rows(rows);
    assert!(
        c.len() >= conns,
        "{what}: sdp stat shows {} connections, want at least {conns}:\n{all}",
        c.len()
    );
    assert!(
        c.iter().all(|r| r.transport == "shm"),
        "{what}: a connection is not on SDP (shm):\n{all}"
    );
    let moved = c.iter().filter(|r| r.bytes_tx + r.bytes_rx > 0).count();
    assert!(
        moved >= conns,
        "{what}: only {moved} SDP connections counted bytes, want {conns}:\n{all}"
    );
}

/// Runs `cmd` to completion (at most `timeout`) and returns its outcome.
pub fn run(cmd: Command, what: &str, timeout: Duration) -> Outcome {
    Proc::spawn(cmd, what).wait(timeout)
}

/// A TCP port on 127.0.0.1 that nobody uses now and that no other test of this process
/// was given: tests run in parallel threads, and each wants its own.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<(HashSet<u16>, u64)>> = Mutex::new(None);
    let mut g = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let (given, x) = g.get_or_insert_with(|| {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        (
            HashSet::new(),
            t ^ (u64::from(std::process::id()) << 20) | 1,
        )
    });
    for _ in 0..10_000 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        // Below the kernel's ephemeral range (32768-60999 by default), so that no client's
        // connect can have taken the port between this check and the server's bind.
        let port = 20_000 + (*x % 12_000) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free TCP port between 20000 and 32000");
}

/// Waits until something listens on TCP `port`, looking at `/proc/net/tcp*` (a probe
/// connection would be a client to the server under test). Panics if `server` exits
/// first or after 15 s.
pub fn wait_listening(server: &mut Proc, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let needle = format!(":{port:04X}");
    loop {
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|t| {
            std::fs::read_to_string(t).is_ok_and(|text| {
                text.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[3] == "0A" && f[1].ends_with(&needle)
                })
            })
        });
        if listening {
            return;
        }
        if !server.running() {
            let o = server.finish(Duration::from_secs(5));
            panic!(
                "{} exited before listening on {port}: code {}\nstdout: {}\nstderr: {}",
                server.what, o.code, o.stdout, o.stderr
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen on port {port} within 15 s",
            server.what
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Compiles the C program `src` with `cc` into `out_dir` (once per process and source)
/// and returns the executable.
pub fn compile_c(src: &Path, out_dir: &Path) -> PathBuf {
    static BUILT: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, exe)) = built.iter().find(|(s, _)| s == src) {
        return exe.clone();
    }
    require_tool("cc", "gcc");
    std::fs::create_dir_all(out_dir).expect("create out dir");
    let stem = src.file_stem().expect("source file name").to_string_lossy();
    let exe = out_dir.join(format!("{stem}-{}", std::process::id()));
    let o = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-D_GNU_SOURCE", "-o"])
        .arg(&exe)
        .arg(src)
        .output()
        .expect("run cc");
    assert!(
        o.status.success(),
        "cc {} failed:\n{}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    built.push((src.to_path_buf(), exe.clone()));
    exe
}

/// Runs `scenario` in both modes and asserts the two outcomes are equal; returns the
/// base outcome for further checks. `scenario` must return only what is deterministic
/// for the program (no ports, pids, timings).
pub fn same_in_both_modes<T: PartialEq + std::fmt::Debug>(
    what: &str,
    scenario: impl Fn(Mode) -> T,
) -> T {
    let base = scenario(Mode::Base);
    let pre = scenario(Mode::Preload);
    assert_eq!(
        base, pre,
        "{what}: the program behaved differently under LD_PRELOAD=libsdp.so (left: without, right: with)"
    );
    base
}

/// The `sdp` tool next to the libsdp.so under test.
pub fn sdp_tool() -> PathBuf {
    libsdp_so().with_file_name("sdp")
}

/// One socket row of `sdp stat --json`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatRow {
    pub pid: u32,
    pub program: String,
    pub fd: i32,
    pub role: String,
    pub transport: String,
    pub fallback_reason: String,
    pub local: String,
    pub remote: String,
    pub bytes_tx: u64,
    pub bytes_rx: u64,
    pub msgs_tx: u64,
    pub msgs_rx: u64,
    /// Of the bytes each way, those moved by RDMA READ (ZCopy); the rest travelled inside
    /// messages (BCopy).
    pub zcopy_tx: u64,
    pub zcopy_rx: u64,
}

impl StatRow {
    /// A connection (not a listener): it has a peer.
    pub fn is_connection(&self) -> bool {
        self.remote != "-" && !self.remote.is_empty()
    }

    /// Parses one line of `sdp stat --json` (a flat object of strings and numbers).
    pub fn parse(line: &str) -> Option<StatRow> {
        let body = line.trim().strip_prefix('{')?.strip_suffix('}')?;
        let mut row = StatRow::default();
        let mut rest = body;
        while !rest.is_empty() {
            let (key, after) = json_string(rest)?;
            let after = after.trim_start().strip_prefix(':')?.trim_start();
            let (value, after) = if after.starts_with('"') {
                json_string(after)?
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            };
            match key.as_str() {
                "pid" => row.pid = value.parse().ok()?,
                "program" => row.program = value,
                "fd" => row.fd = value.parse().ok()?,
                "role" => row.role = value,
                "transport" => row.transport = value,
                "fallback_reason" => row.fallback_reason = value,
                "local" => row.local = value,
                "remote" => row.remote = value,
                "bytes_tx" => row.bytes_tx = value.parse().ok()?,
                "bytes_rx" => row.bytes_rx = value.parse().ok()?,
                "msgs_tx" => row.msgs_tx = value.parse().ok()?,
                "msgs_rx" => row.msgs_rx = value.parse().ok()?,
                "zcopy_tx" => row.zcopy_tx = value.parse().ok()?,
                "zcopy_rx" => row.zcopy_rx = value.parse().ok()?,
                _ => {}
            }
            rest = after.trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
        }
        Some(row)
    }
}

/// A JSON string at the start of `s` (after optional space): its value and the rest.
fn json_string(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => {
                let (_, e) = chars.next()?;
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'u' => {
                        let hex: String =
                            (0..4).filter_map(|_| chars.next().map(|x| x.1)).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    other => out.push(other),
                }
            }
            c => out.push(c),
        }
    }
    None
}

/// `rows`, one line each, for failure messages.
pub fn show_rows(rows: &[StatRow]) -> String {
    rows.iter()
        .map(|r| {
            format!(
                "  pid {} {} fd {} {} {} reason {} {} -> {} tx {} rx {}\n",
                r.pid,
                r.program,
                r.fd,
                r.role,
                r.transport,
                r.fallback_reason,
                r.local,
                r.remote,
                r.bytes_tx,
                r.bytes_rx
            )
        })
        .collect()
}

/// Every row `sdp stat --json` reports now.
pub fn sdp_stat() -> Vec<StatRow> {
    let o = Command::new(sdp_tool())
        .args(["stat", "--json"])
        .env_remove("LD_PRELOAD")
        .output()
        .expect("run sdp stat --json");
    assert!(
        o.status.success(),
        "sdp stat --json failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        // Socket lines only: the summary objects that follow have no "fd".
        .filter(|l| l.contains("\"fd\":"))
        .map(|l| StatRow::parse(l).unwrap_or_else(|| panic!("unparsable sdp stat line: {l}")))
        .collect()
}

/// The sum of a per-process counter of `sdp stat --json` (`"epoll_ctl_saved"`, ...) over the
/// live processes of process group `pgid`.
pub fn process_counter_of_group(pgid: u32, key: &str) -> u64 {
    let o = Command::new(sdp_tool())
        .args(["stat", "--json"])
        .env_remove("LD_PRELOAD")
        .output()
        .expect("run sdp stat --json");
    let field = |l: &str, k: &str| -> Option<u64> {
        let at = l.find(&format!("\"{k}\":"))? + k.len() + 3;
        let end = l[at..].find([',', '}']).map_or(l.len(), |e| at + e);
        l[at..end].trim().parse().ok()
    };
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with("{\"process\":"))
        .filter(|l| field(l, "process").and_then(|p| process_group(p as u32)) == Some(pgid))
        .filter_map(|l| field(l, key))
        .sum()
}

/// The process group of `pid` (from /proc), if it is alive.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(2)?.parse().ok()
}

/// The rows of each process group of `pgids` once `done` holds for every one of them (one
/// `sdp stat` per poll, so that both ends of a connection are seen while it lives), or the
/// last seen at `within`.
pub fn groups_when(
    pgids: &[u32],
    within: Duration,
    done: impl Fn(&[StatRow]) -> bool,
) -> Vec<Vec<StatRow>> {
    let deadline = Instant::now() + within;
    loop {
        let all = sdp_stat();
        let per: Vec<Vec<StatRow>> = pgids
            .iter()
            .map(|g| {
                all.iter()
                    .filter(|r| process_group(r.pid) == Some(*g))
                    .cloned()
                    .collect()
            })
            .collect();
        if per.iter().all(|rows| done(rows)) || Instant::now() >= deadline {
            return per;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The connection rows (those with a peer) of `rows`.
pub fn connections(rows: &[StatRow]) -> Vec<&StatRow> {
    rows.iter().filter(|r| r.is_connection()).collect()
}

/// The rows of `sdp stat` that belong to processes of the process group `pgid` (a
/// [`Proc`] and everything it forked).
pub fn sdp_stat_of_group(pgid: u32) -> Vec<StatRow> {
    sdp_stat()
        .into_iter()
        .filter(|r| process_group(r.pid) == Some(pgid))
        .collect()
}
