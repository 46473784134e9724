//! Real server programs over SDP (issue 6, item 2): memcached with memcached's own clients,
//! nginx (a master and two workers that drop to `nobody`) with curl and wrk, python asyncio
//! streams, postgres (a backend forked per connection) with pgbench and psql, OpenSSH sshd
//! (privilege separation: fork and re-exec) with ssh, iperf3 with 8 streams and reversed,
//! sockperf throughput and under-load.
//!
//! Each test runs its scenario twice — over kernel TCP (nothing preloaded) and over SDP
//! (servers and clients under `LD_PRELOAD=libsdp.so`, default policy) — and compares what
//! the programs produced: contents, checksums, counts, never timings. In the SDP run it
//! asserts that SDP carried the traffic, two ways:
//!
//! - statistics: `sdp stat` is sampled while the programs run; every connection seen on the
//!   test's port is on `shm`, and the server program and the long-running clients counted
//!   bytes (at least part of the payload where one is known);
//! - the library's decision log (`log min-level 4`, one file for every process of the run):
//!   each connection the server accepted on the port says "SDP over shm" and nothing fell
//!   back to TCP. This also covers clients too short-lived for the sampling to see.
//!
//! A missing program fails the test with the apt package to install (CI installs the
//! packages of `tests/APT-PACKAGES`). Scratch files live under the system temp directory so
//! that processes running as `nobody` (nginx workers, postgres) reach them.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libsdp_suite::{
    Mode, Outcome, Proc, StatRow, command, free_port, libsdp_so, require_tool, run, sdp_stat,
    wait_listening,
};

const T: Duration = Duration::from_secs(60);

/// The uid and gid of `nobody` / `nogroup` on Debian.
const NOBODY: u32 = 65534;

// ---------------------------------------------------------------------------------------------
// Harness.

/// A scratch directory under the system temp directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!(
            "libsdp-servers-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("scratch dir");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod scratch");
        Scratch(d)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn sub(&self, name: &str) -> PathBuf {
        let d = self.0.join(name);
        fs::create_dir_all(&d).expect("scratch subdir");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod subdir");
        d
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One run of a scenario: its mode, its own port and the SDP run's log.
struct Ctx {
    mode: Mode,
    port: u16,
    dir: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    /// Rows read while a client was frozen (see [`Ctx::freeze_and_sample`]).
    frozen: Mutex<Vec<StatRow>>,
}

impl Ctx {
    fn new(mode: Mode, scratch: &Scratch) -> Ctx {
        let tag = match mode {
            Mode::Base => "tcp",
            Mode::Preload => "sdp",
        };
        let dir = scratch.sub(tag);
        let log = dir.join("libsdp.log");
        let conf = dir.join("libsdp.conf");
        // Every process of the run appends to the log, whatever its uid.
        fs::write(&log, "").expect("log file");
        fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).expect("chmod log");
        fs::write(
            &conf,
            format!("log min-level 4 destination file {}\n", log.display()),
        )
        .expect("conf file");
        Ctx {
            mode,
            port: free_port(),
            dir,
            conf,
            log,
            frozen: Mutex::new(Vec::new()),
        }
    }

    /// In the SDP run: stops `client`'s process group (SIGSTOP), reads `sdp stat` for the
    /// port, and lets it go on. While it is stopped its connections stay open, whatever time
    /// `sdp stat` takes on a busy host. Only once the client's connections are set up (see
    /// [`Ctx::after_accepts`]): a client frozen while the server accepts cannot answer the SDP
    /// exchange (its progress thread is stopped too), and after 2 s the server keeps the
    /// connection on TCP. Returns
    /// whether the client's connections counted at least `min_bytes` (sent plus received).
    fn freeze_and_sample(&self, client: &Proc, min_bytes: u64) -> bool {
        if self.mode != Mode::Preload {
            return true;
        }
        let pgid = client.id();
        // SAFETY: kill(2) on the process group the harness created for this client.
        unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGSTOP) };
        let rows: Vec<StatRow> = sdp_stat()
            .into_iter()
            .filter(|r| r.local == self.addr() || r.remote == self.addr())
            .collect();
        let moved: u64 = rows
            .iter()
            .filter(|r| r.is_connection() && libsdp_suite::process_group(r.pid) == Some(pgid))
            .map(|r| r.bytes_tx + r.bytes_rx)
            .sum();
        // SAFETY: as above.
        unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGCONT) };
        self.frozen.lock().unwrap().extend(rows);
        moved >= min_bytes.max(1)
    }

    /// How many connections the server has accepted so far: its library logs one decision
    /// for each once the exchange is over (the run's one server is the only acceptor).
    fn accepted(&self) -> usize {
        fs::read_to_string(&self.log).map_or(0, |t| {
            t.lines().filter(|l| l.contains(": accept fd ")).count()
        })
    }

    /// A condition for [`run_client`]: `n` more connections accepted than now.
    fn after_accepts(&self, n: usize) -> impl Fn() -> bool + '_ {
        let base = self.accepted();
        move || self.accepted() >= base + n
    }

    /// `program` in this run's mode (and, preloaded, with this run's log).
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = command(self.mode, program);
        if self.mode == Mode::Preload {
            c.env("LIBSDP_CONFIG_FILE", &self.conf);
        }
        c
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Connections seen, by (pid, fd, local, remote).
type Seen = HashMap<(u32, i32, String, String), StatRow>;

/// Adds a sample of a row: the largest counters seen, and a transport other than shm if
/// ever seen.
fn merge(seen: &mut Seen, r: StatRow) {
    let key = (r.pid, r.fd, r.local.clone(), r.remote.clone());
    match seen.get_mut(&key) {
        None => {
            seen.insert(key, r);
        }
        Some(old) => {
            old.bytes_tx = old.bytes_tx.max(r.bytes_tx);
            old.bytes_rx = old.bytes_rx.max(r.bytes_rx);
            old.msgs_tx = old.msgs_tx.max(r.msgs_tx);
            old.msgs_rx = old.msgs_rx.max(r.msgs_rx);
            if r.transport != "shm" {
                old.transport = r.transport;
                old.fallback_reason = r.fallback_reason;
            }
        }
    }
}

/// Samples `sdp stat` in a thread while a scenario runs and keeps, per connection on `port`,
/// the largest counters seen (and a transport other than shm, if ever seen).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Seen>>,
}

impl Sampler {
    fn start(port: u16) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let me = format!("127.0.0.1:{port}");
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::new();
            loop {
                let last = flag.load(Ordering::Acquire);
                for r in sdp_stat() {
                    if r.local == me || r.remote == me {
                        merge(&mut seen, r);
                    }
                }
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(15));
            }
            seen
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().expect("sampler thread").join() {
            Ok(rows) => rows,
            Err(e) => std::panic::resume_unwind(e),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Runs the client `cmd` to completion. In the SDP run, whenever `open` says its connection
/// is open, freezes it and reads the statistics (see [`Ctx::freeze_and_sample`]), until they
/// show `min_bytes` moved or it ends.
fn run_client(
    ctx: &Ctx,
    cmd: Command,
    what: &str,
    min_bytes: u64,
    open: impl Fn() -> bool,
) -> Outcome {
    run_client_holding(ctx, cmd, what, min_bytes, open, || {})
}

/// [`run_client`] for a client the test itself holds open (a reader that stops draining it):
/// `release` lets it go once sampling is over, before waiting for it to end.
fn run_client_holding(
    ctx: &Ctx,
    cmd: Command,
    what: &str,
    min_bytes: u64,
    open: impl Fn() -> bool,
    release: impl FnOnce(),
) -> Outcome {
    let mut client = Proc::spawn(cmd, what);
    let deadline = Instant::now() + T;
    while ctx.mode == Mode::Preload && client.running() && Instant::now() < deadline {
        if open() && ctx.freeze_and_sample(&client, min_bytes) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    release();
    client.wait(T)
}

/// A named pipe a client writes a download into, drained into a file by a thread. With
/// `hold`, the thread stops after `hold` bytes until released: the client then blocks in
/// its write with the connection open, however fast the transfer would otherwise end.
struct HeldPipe {
    path: PathBuf,
    read: Arc<std::sync::atomic::AtomicU64>,
    go: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HeldPipe {
    fn new(path: PathBuf, out: PathBuf, hold: Option<u64>) -> HeldPipe {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo");
        let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let go = Arc::new(AtomicBool::new(hold.is_none()));
        let (r, g, p) = (read.clone(), go.clone(), path.clone());
        let thread = std::thread::spawn(move || {
            use std::io::Read;
            let mut src = fs::File::open(&p).expect("open the pipe");
            let mut dst = fs::File::create(&out).expect("create the download");
            let mut buf = vec![0u8; 64 * 1024];
            let limit = hold.unwrap_or(u64::MAX);
            loop {
                let done = r.load(Ordering::Acquire);
                if done >= limit && !g.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                let want = if g.load(Ordering::Acquire) {
                    buf.len()
                } else {
                    buf.len().min((limit - done) as usize)
                };
                let n = src.read(&mut buf[..want]).expect("read the pipe");
                if n == 0 {
                    break;
                }
                dst.write_all(&buf[..n]).expect("write the download");
                r.fetch_add(n as u64, Ordering::Release);
            }
        });
        HeldPipe {
            path,
            read,
            go,
            thread: Some(thread),
        }
    }

    fn bytes(&self) -> u64 {
        self.read.load(Ordering::Acquire)
    }

    fn release(&self) {
        self.go.store(true, Ordering::Release);
    }

    /// Waits for the drain to end. A client that never opened the pipe (it failed first)
    /// leaves the thread in its open: opening the write side once lets it see the end.
    fn finish(mut self) {
        self.release();
        let _ = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path);
        if let Some(t) = self.thread.take()
            && let Err(e) = t.join()
        {
            std::panic::resume_unwind(e);
        }
    }
}

impl Drop for HeldPipe {
    fn drop(&mut self) {
        self.go.store(true, Ordering::Release);
    }
}

/// What the SDP run left as evidence.
struct Evidence {
    rows: Vec<StatRow>,
    log: String,
    port: u16,
}

/// Runs `scenario` over TCP, then over SDP while sampling `sdp stat`; asserts both runs
/// produced the same and returns that and the SDP run's evidence.
fn tcp_then_sdp<R: PartialEq + std::fmt::Debug>(
    what: &str,
    scratch: &Scratch,
    scenario: impl Fn(&Ctx) -> R,
) -> (R, Evidence) {
    let tcp = scenario(&Ctx::new(Mode::Base, scratch));
    let ctx = Ctx::new(Mode::Preload, scratch);
    let sampler = Sampler::start(ctx.port);
    let sdp = scenario(&ctx);
    let mut seen = sampler.finish();
    for r in std::mem::take(&mut *ctx.frozen.lock().unwrap()) {
        merge(&mut seen, r);
    }
    let mut rows: Vec<StatRow> = seen.into_values().collect();
    rows.sort_by_key(|r| (r.pid, r.fd));
    let log = fs::read_to_string(&ctx.log).unwrap_or_default();
    assert_eq!(
        tcp, sdp,
        "{what}: SDP (right) gave other results than kernel TCP (left)"
    );
    (
        tcp,
        Evidence {
            rows,
            log,
            port: ctx.port,
        },
    )
}

impl Evidence {
    /// SDP carried the run: every sampled connection on the port is on shm; the `server`
    /// program's connections and each client program's counted at least the given bytes
    /// (sent plus received); the log shows at least `accepts` connections accepted over SDP
    /// on the port and no fallback to TCP.
    fn assert_sdp(
        &self,
        what: &str,
        server: (&str, u64),
        clients: &[(&str, u64)],
        accepts: usize,
        closed_before_accept: usize,
    ) {
        let conns: Vec<&StatRow> = self.rows.iter().filter(|r| r.is_connection()).collect();
        let all = libsdp_suite::show_rows(&self.rows);
        assert!(
            !conns.is_empty(),
            "{what}: sdp stat never showed a connection on port {}",
            self.port
        );
        assert!(
            conns.iter().all(|r| r.transport == "shm"),
            "{what}: a connection is not on SDP (shm):\n{all}"
        );
        let bytes = |prog: &str, role: &str| -> u64 {
            conns
                .iter()
                .filter(|r| r.program == prog && r.role == role)
                .map(|r| r.bytes_tx + r.bytes_rx)
                .sum()
        };
        for (prog, role, min) in std::iter::once((server.0, "server", server.1))
            .chain(clients.iter().map(|c| (c.0, "client", c.1)))
        {
            let got = bytes(prog, role);
            assert!(
                got >= min.max(1),
                "{what}: {prog} ({role}) moved {got} bytes over SDP, want at least {}:\n{all}",
                min.max(1)
            );
        }
        let on_port = format!("on 127.0.0.1:{}", self.port);
        let accepted = self
            .log
            .lines()
            .filter(|l| l.contains("SDP over shm") && l.contains(&on_port))
            .count();
        // A connection its client closed before the server accepted it has no endpoint
        // left to exchange with: the server keeps it on TCP (where it reads the FIN). The log
        // says "SDP exchange failed", or (rarely) "TCP (plain-client)".
        let gone = |l: &&str| {
            l.contains(": accept fd ")
                && (l.contains("SDP exchange failed") || l.contains("TCP (plain-client)"))
        };
        let gone_count = self.log.lines().filter(gone).count();
        assert!(
            gone_count <= closed_before_accept,
            "{what}: {gone_count} accepted connections failed their SDP exchange, want at most {closed_before_accept}:\n{}",
            self.log
        );
        let fallbacks: Vec<&str> = self
            .log
            .lines()
            .filter(|l| !gone(l))
            // Every fallback decision says where the connection went: "TCP".
            .filter(|l| l.contains("TCP"))
            .collect();
        assert!(
            fallbacks.is_empty(),
            "{what}: the library fell back to TCP:\n{}",
            fallbacks.join("\n")
        );
        assert!(
            accepted >= accepts,
            "{what}: {accepted} connections accepted over SDP on port {}, want at least {accepts}; log:\n{}",
            self.port,
            self.log
        );
    }
}

/// A deterministic text payload of `size` bytes (text, so outputs compare as strings).
fn text_payload(size: usize, seed: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    let mut i = 0u32;
    while out.len() < size {
        out.extend_from_slice(
            format!(
                "{seed:04} line {i:08} {:016x}\n",
                u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed)
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(size);
    out
}

/// A deterministic binary payload of `size` bytes.
fn binary_payload(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `sha256sum` of a file: the hex digest.
fn sha256(path: &Path) -> String {
    let mut c = command(Mode::Base, "sha256sum");
    c.arg(path);
    let o = run(c, "sha256sum", T);
    assert_eq!(o.code, 0, "{o:?}");
    o.stdout.split_whitespace().next().unwrap_or("").to_string()
}

fn code_and(o: &Outcome) -> (i32, String) {
    (o.code, o.stdout.clone())
}

// ---------------------------------------------------------------------------------------------
// memcached with memcached's own clients.

/// The values of `memcstat` named in `keys`, in that order.
fn memcstat_values(out: &str, keys: &[&str]) -> Vec<String> {
    keys.iter()
        .map(|k| {
            out.lines()
                .filter_map(|l| l.trim().split_once(':'))
                .find(|(name, _)| name.trim() == *k)
                .map(|(_, v)| format!("{k}={}", v.trim()))
                .unwrap_or_else(|| format!("{k} missing"))
        })
        .collect()
}

#[test]
fn memcached_serves_its_own_clients_over_sdp() {
    require_tool("memcached", "memcached");
    for tool in ["memccp", "memccat", "memcslap", "memcstat"] {
        require_tool(tool, "libmemcached-tools");
    }
    let scratch = Scratch::new("memcached");
    let values = [("tiny", 10usize), ("mid", 100_000), ("big", 1_500_000)];
    let mut want_cat = Vec::new();
    for (i, (name, size)) in values.iter().enumerate() {
        let v = text_payload(*size, i as u32);
        fs::write(scratch.path().join(name), &v).unwrap();
        // memccat prints each value followed by a newline.
        want_cat.extend_from_slice(&v);
        want_cat.push(b'\n');
    }
    let (got, ev) = tcp_then_sdp("memcached", &scratch, |ctx| {
        let p = ctx.port.to_string();
        let servers = format!("--servers={}", ctx.addr());
        let mut srv = ctx.cmd("memcached");
        srv.args([
            "-p",
            &p,
            "-l",
            "127.0.0.1",
            "-U",
            "0",
            "-t",
            "2",
            "-m",
            "64",
        ])
        .args(["-I", "2m", "-c", "64"]);
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            srv.args(["-u", "nobody"]);
        }
        let mut server = Proc::spawn(srv, "memcached");
        wait_listening(&mut server, ctx.port);
        let tool = |name: &str, args: &[&str]| {
            let mut c = ctx.cmd(name);
            c.arg(&servers).args(args).current_dir(scratch.path());
            run(c, name, T)
        };
        let cp = tool("memccp", &["tiny", "mid", "big"]);
        let cat = tool("memccat", &["tiny", "mid", "big"]);
        // The load runs for a second or two; frozen once its loader and 4 threads are
        // connected.
        let slap = {
            let mut c = ctx.cmd("memcslap");
            c.arg(&servers)
                .args(["--concurrency=4", "--execute-number=3000", "--test=get"]);
            run_client(ctx, c, "memcslap", 1, ctx.after_accepts(5))
        };
        // Which phases ran with how many keys, not how long they took.
        let phases: Vec<String> = slap
            .stdout
            .lines()
            .filter_map(|l| l.split_once(':').map(|(a, _)| a.trim().to_string()))
            .filter(|a| a.starts_with("Time to"))
            .map(|a| a.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let stat = tool("memcstat", &[]);
        let counts = memcstat_values(
            &stat.stdout,
            &[
                "cmd_get",
                "cmd_set",
                "get_hits",
                "get_misses",
                "curr_items",
                "total_items",
            ],
        );
        let server = server.stop();
        (
            (cp.code, cp.stderr),
            (cat.code, cat.stdout.as_bytes() == want_cat.as_slice()),
            (slap.code, phases),
            (stat.code, counts),
            server.stdout,
        )
    });
    assert_eq!(got.0, (0, String::new()), "memccp");
    assert_eq!(got.1, (0, true), "memccat must print the values stored");
    assert_eq!(got.2.0, 0, "memcslap: {:?}", got.2);
    assert!(
        got.2
            .1
            .iter()
            .any(|l| l.contains("get 12000 keys by 4 threads")),
        "memcslap phases: {:?}",
        got.2.1
    );
    assert_eq!(got.3.0, 0);
    assert!(
        got.3.1.contains(&"get_misses=0".to_string()),
        "{:?}",
        got.3.1
    );
    // memccp, memccat, memcslap (a loader and 4 threads), memcstat.
    ev.assert_sdp("memcached", ("memcached", 1), &[("memcslap", 1)], 7, 0);
}

// ---------------------------------------------------------------------------------------------
// nginx with curl and wrk.

fn nginx_conf(prefix: &Path, root: &Path, port: u16) -> String {
    let p = prefix.display();
    format!(
        "worker_processes 2;\n\
         daemon off;\n\
         master_process on;\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log notice;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
           access_log off;\n\
           keepalive_requests 1000000;\n\
           client_body_temp_path {p}/body;\n\
           proxy_temp_path {p}/proxy;\n\
           fastcgi_temp_path {p}/fastcgi;\n\
           uwsgi_temp_path {p}/uwsgi;\n\
           scgi_temp_path {p}/scgi;\n\
           server {{ listen 127.0.0.1:{port}; root {}; }}\n\
         }}\n",
        root.display()
    )
}

/// nginx (master and 2 workers) serving `root` on the run's port. Keep-alive connections are
/// not recycled (nginx closes one after 1000 requests by default): wrk's connections are
/// then all set up when the harness freezes it.
fn start_nginx(ctx: &Ctx, root: &Path) -> Proc {
    let prefix = ctx.dir.join("nginx");
    fs::create_dir_all(&prefix).unwrap();
    let conf = prefix.join("nginx.conf");
    fs::write(&conf, nginx_conf(&prefix, root, ctx.port)).unwrap();
    let mut srv = ctx.cmd("nginx");
    srv.arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(prefix.join("error.log"));
    let mut server = Proc::spawn(srv, "nginx");
    wait_listening(&mut server, ctx.port);
    server
}

#[test]
fn nginx_serves_curl_over_sdp() {
    require_tool("nginx", "nginx");
    require_tool("curl", "curl");
    let scratch = Scratch::new("nginx-curl");
    let root = scratch.sub("html");
    let files = [
        ("small.txt", text_payload(700, 1)),
        ("mid.bin", binary_payload(150_000, 2)),
        ("big.bin", binary_payload(3_000_000, 3)),
    ];
    for (name, data) in &files {
        fs::write(root.join(name), data).unwrap();
    }
    let want: Vec<String> = files.iter().map(|(n, _)| sha256(&root.join(n))).collect();
    let (got, ev) = tcp_then_sdp("nginx + curl", &scratch, |ctx| {
        let server = start_nginx(ctx, &root);
        let url = |n: &str| format!("http://{}/{n}", ctx.addr());
        // One connection (keep-alive) for all files. The big one goes through a pipe the
        // test stops draining after 1 MB in the SDP run: curl then blocks with the
        // connection open until its statistics are read, however fast the transfer.
        let big = HeldPipe::new(
            ctx.dir.join("big.fifo"),
            ctx.dir.join("big.bin"),
            (ctx.mode == Mode::Preload).then_some(1_000_000),
        );
        let mut curl = ctx.cmd("curl");
        curl.args(["-sS", "-w", "%{http_code} %{size_download}\n"]);
        for (name, _) in &files {
            let out = if *name == "big.bin" {
                big.path.clone()
            } else {
                ctx.dir.join(name)
            };
            curl.arg("-o").arg(out).arg(url(name));
        }
        curl.arg("-o").arg("/dev/null").arg(url("missing"));
        // curl's row must show most of a megabyte (it has read 1 MB off the connection).
        let c = run_client_holding(
            ctx,
            curl,
            "curl",
            500_000,
            || big.bytes() >= 1_000_000,
            || big.release(),
        );
        big.finish();
        let sums: Vec<String> = files
            .iter()
            .map(|(n, _)| sha256(&ctx.dir.join(n)))
            .collect();
        let server = server.stop();
        (code_and(&c), sums, server.code)
    });
    assert_eq!(
        got.0,
        (0, "200 700\n200 150000\n200 3000000\n404 153\n".to_string())
    );
    assert_eq!(got.1, want, "downloaded files differ from the served ones");
    ev.assert_sdp(
        "nginx + curl",
        ("nginx", 500_000),
        &[("curl", 500_000)],
        1,
        0,
    );
}

#[test]
fn nginx_serves_wrk_over_sdp() {
    require_tool("nginx", "nginx");
    require_tool("wrk", "wrk");
    let scratch = Scratch::new("nginx-wrk");
    let root = scratch.sub("html");
    fs::write(root.join("small.txt"), text_payload(700, 1)).unwrap();
    let (got, ev) = tcp_then_sdp("nginx + wrk", &scratch, |ctx| {
        let server = start_nginx(ctx, &root);
        let mut wrk = ctx.cmd("wrk");
        // A generous timeout: a request in flight while wrk is frozen is no error.
        wrk.args(["-t", "2", "-c", "8", "-d", "2s", "--timeout", "30s"])
            .arg(format!("http://{}/small.txt", ctx.addr()));
        // Its probe connection (see below) and its 8.
        let w = run_client(ctx, wrk, "wrk", 1, ctx.after_accepts(9));
        let requests: u64 = w
            .stdout
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let server = server.stop();
        (
            w.code,
            requests > 100,
            // "Socket errors: connect 0, read 1, ...": wrk counts a read that fails, EAGAIN
            // included, after epoll said readable.
            w.stdout
                .lines()
                .find(|l| l.contains("Socket errors"))
                .map(str::to_owned),
            w.stdout.contains("Non-2xx"),
            server.code,
        )
    });
    assert_eq!((got.0, got.1, got.3), (0, true, false), "wrk: {got:?}");
    // wrk's 8 connections. Before them wrk probes the address with a connection it closes
    // at once: nginx accepts it after the client is gone, its exchange finds no endpoint,
    // and it is served as the TCP connection it is (the client's close is its FIN).
    ev.assert_sdp("nginx + wrk", ("nginx", 1), &[("wrk", 1)], 8, 1);
}

// ---------------------------------------------------------------------------------------------
// python asyncio streams.

#[test]
fn python_asyncio_streams_echo_over_sdp() {
    require_tool("python3", "python3");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/servers/asyncio_echo.py");
    let scratch = Scratch::new("asyncio");
    const CONNS: usize = 4;
    const BYTES: usize = 1_500_000;
    let (got, ev) = tcp_then_sdp("asyncio", &scratch, |ctx| {
        let p = ctx.port.to_string();
        let mut srv = ctx.cmd("python3");
        srv.arg(&script).args(["serve", &p]);
        let mut server = Proc::spawn(srv, "asyncio server");
        wait_listening(&mut server, ctx.port);
        let mut cli = ctx.cmd("python3");
        cli.arg(&script)
            .args(["client", &p, &CONNS.to_string(), &BYTES.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cli.spawn().expect("start asyncio client");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut printed = String::new();
        let mut at_sync = Vec::new();
        loop {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            printed.push_str(&line);
            if line.trim() == "SYNC" {
                // Every connection is open here: both ends must show on shm with bytes.
                if ctx.mode == Mode::Preload {
                    at_sync = sdp_stat()
                        .into_iter()
                        .filter(|r| r.local == ctx.addr() || r.remote == ctx.addr())
                        .collect();
                    ctx.frozen.lock().unwrap().extend(at_sync.iter().cloned());
                }
                let mut stdin = child.stdin.take().expect("stdin");
                stdin.write_all(b"\n").unwrap();
            }
        }
        let deadline = Instant::now() + T;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "asyncio client hangs:\n{printed}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let server = server.stop();
        if ctx.mode == Mode::Preload {
            let conns: Vec<&StatRow> = at_sync.iter().filter(|r| r.is_connection()).collect();
            assert_eq!(
                conns
                    .iter()
                    .filter(|r| r.transport == "shm" && r.bytes_rx >= BYTES as u64)
                    .count(),
                2 * CONNS,
                "at SYNC each connection's two ends must be on shm with the echo counted:\n{}",
                libsdp_suite::show_rows(&at_sync)
            );
        }
        (status.code(), printed, server.code)
    });
    assert_eq!(got.0, Some(0), "{}", got.1);
    assert_eq!(got.1.matches("echo True").count(), CONNS, "{}", got.1);
    assert!(
        got.1
            .ends_with("closed 4 connections, 0 bytes after end of stream\n"),
        "{}",
        got.1
    );
    ev.assert_sdp(
        "asyncio",
        ("python3", (CONNS * BYTES) as u64),
        &[("python3", (CONNS * BYTES) as u64)],
        CONNS,
        0,
    );
}

// ---------------------------------------------------------------------------------------------
// postgres with pgbench and psql.

/// The directory of the postgres server programs (`initdb`, `postgres`).
fn postgres_bin() -> PathBuf {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = fs::read_dir(base)
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("postgres").is_file() && b.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "no postgres server in {}/*/bin: apt-get install -y postgresql",
            base.display()
        )
    })
}

/// A copy of libsdp.so that every uid can read (the build tree may sit under a private home).
fn world_readable_libsdp(scratch: &Scratch) -> PathBuf {
    let p = scratch.path().join("libsdp.so");
    fs::copy(libsdp_so(), &p).expect("copy libsdp.so");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn postgres_serves_pgbench_and_psql_over_sdp() {
    require_tool("pgbench", "postgresql");
    require_tool("psql", "postgresql");
    let bin = postgres_bin();
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let scratch = Scratch::new("postgres");
    let lib = world_readable_libsdp(&scratch);
    let data = scratch.path().join("data");
    let sock = scratch.sub("sock");
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o777)).unwrap();
    // postgres refuses to run as root: run the server as nobody.
    let as_server = |c: &mut Command| {
        if root {
            c.uid(NOBODY).gid(NOBODY);
        }
    };
    let mut init = command(Mode::Base, bin.join("initdb"));
    init.arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "--auth=trust",
        "--no-sync",
        "-E",
        "UTF8",
        "--locale=C",
    ]);
    if root {
        std::os::unix::fs::chown(scratch.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    as_server(&mut init);
    let o = run(init, "initdb", Duration::from_secs(120));
    assert_eq!(o.code, 0, "initdb: {o:?}");
    let (got, ev) = tcp_then_sdp("postgres", &scratch, |ctx| {
        let mut srv = ctx.cmd(bin.join("postgres"));
        if ctx.mode == Mode::Preload {
            srv.env("LD_PRELOAD", &lib);
        }
        srv.arg("-D")
            .arg(&data)
            .args(["-p", &ctx.port.to_string(), "-k"])
            .arg(&sock)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"]);
        as_server(&mut srv);
        let mut server = Proc::spawn(srv, "postgres");
        wait_listening(&mut server, ctx.port);
        let p = ctx.port.to_string();
        let pg_cmd = |prog: &str, args: &[&str]| {
            let mut c = ctx.cmd(prog);
            c.args(["-h", "127.0.0.1", "-p", &p, "-U", "postgres"])
                .args(args)
                .env("PGCONNECT_TIMEOUT", "30");
            c
        };
        let client = |prog: &str, args: &[&str]| run(pg_cmd(prog, args), prog, T);
        let init = client("pgbench", &["-i", "-s", "1", "-q", "postgres"]);
        let psql = |sql: &str| {
            let o = client(
                "psql",
                &[
                    "-X",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    sql,
                    "postgres",
                ],
            );
            (o.code, o.stdout)
        };
        // The generated table, row by row (about 2 MB through one connection).
        let rows = psql(
            "SELECT aid, bid, abalance, filler FROM pgbench_accounts ORDER BY aid LIMIT 20000",
        );
        // Frozen once its 4 connections are up (each served by its own backend).
        let bench = run_client(
            ctx,
            pg_cmd("pgbench", &["-c", "4", "-t", "400", "-n", "postgres"]),
            "pgbench",
            1,
            ctx.after_accepts(4),
        );
        let processed: Vec<String> = bench
            .stdout
            .lines()
            .filter(|l| {
                l.starts_with("number of transactions actually processed")
                    || l.starts_with("number of failed transactions")
                    || l.starts_with("number of clients")
            })
            .map(str::to_owned)
            .collect();
        // The run's effects that do not depend on its random choices.
        let after = psql(
            "SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_history), \
             (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history), \
             (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT sum(delta) FROM pgbench_history)",
        );
        let server = server.stop();
        (
            init.code,
            (rows.0, rows.1.len(), rows.1),
            (bench.code, processed),
            after,
            server.code,
        )
    });
    assert_eq!(got.0, 0, "pgbench -i");
    assert_eq!(got.1.0, 0);
    assert_eq!(got.1.2.lines().count(), 20_000);
    assert_eq!(got.2.0, 0, "pgbench: {:?}", got.2);
    assert!(
        got.2.1.iter().any(|l| l.ends_with("1600/1600")),
        "pgbench: {:?}",
        got.2.1
    );
    assert_eq!(got.3, (0, "100000|1600|t|t\n".to_string()));
    // pgbench -i, psql, pgbench's 4 clients, psql.
    ev.assert_sdp("postgres", ("postgres", 1), &[("pgbench", 1)], 7, 0);
}

// ---------------------------------------------------------------------------------------------
// OpenSSH sshd with ssh.

#[test]
fn sshd_serves_ssh_over_sdp() {
    require_tool("ssh", "openssh-client");
    require_tool("ssh-keygen", "openssh-client");
    require_tool("sha256sum", "coreutils");
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(
        sshd.is_file(),
        "`sshd` is not installed: apt-get install -y openssh-server"
    );
    // SAFETY: getuid has no preconditions.
    assert_eq!(
        unsafe { libc::getuid() },
        0,
        "sshd with privilege separation needs root"
    );
    // sshd's privilege separation directory (the package's service unit makes it).
    fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
    fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).unwrap();
    let scratch = Scratch::new("sshd");
    let dir = scratch.path();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    for key in ["host_key", "user_key"] {
        let mut k = command(Mode::Base, "ssh-keygen");
        k.args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(key));
        let o = run(k, "ssh-keygen", T);
        assert_eq!(o.code, 0, "{o:?}");
    }
    fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
    let config = dir.join("sshd_config");
    fs::write(
        &config,
        format!(
            "HostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPidFile none\n\
             ListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nLogLevel ERROR\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let payload = dir.join("payload");
    fs::write(&payload, binary_payload(5_000_000, 7)).unwrap();
    let want = sha256(&payload);
    let text = dir.join("payload.txt");
    let want_text = text_payload(3_000_000, 8);
    fs::write(&text, &want_text).unwrap();
    let (got, ev) = tcp_then_sdp("sshd", &scratch, |ctx| {
        let mut srv = ctx.cmd(sshd);
        srv.args(["-D", "-e", "-f"])
            .arg(&config)
            .args(["-p", &ctx.port.to_string()]);
        let mut server = Proc::spawn(srv, "sshd");
        wait_listening(&mut server, ctx.port);
        let ssh = |remote: &str, stdin: Option<&Path>| {
            let mut c = ctx.cmd("ssh");
            c.args(["-p", &ctx.port.to_string(), "-i"])
                .arg(dir.join("user_key"))
                .args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                ])
                .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-T"])
                .args(["root@127.0.0.1", remote]);
            if let Some(f) = stdin {
                c.stdin(fs::File::open(f).unwrap());
            }
            run(c, "ssh", T)
        };
        // Client to server: the payload through the channel, summed on the far side.
        let up = ssh("sha256sum", Some(&payload));
        // Server to client: a text payload back, compared here.
        let down = ssh(&format!("cat {}", text.display()), None);
        let down = (
            down.code,
            down.stdout.len(),
            down.stdout.as_bytes() == want_text,
        );
        let server = server.stop();
        (code_and(&up), down, server.code)
    });
    assert_eq!(
        got.0,
        (0, format!("{want}  -\n")),
        "ssh ... sha256sum < payload"
    );
    assert_eq!(got.1, (0, want_text.len(), true), "ssh ... cat payload.txt");
    // ssh is not frozen (its sessions are short); the sampling sees the server's end carry
    // the payload, and an SDP connection is SDP at both ends: the clients need only show it.
    ev.assert_sdp("sshd", ("sshd", 1_000_000), &[("ssh", 1)], 2, 0);
}

// ---------------------------------------------------------------------------------------------
// iperf3 with 8 parallel streams and reversed; sockperf throughput and under load.

/// Facts of an iperf3 JSON report that do not depend on the rates.
fn iperf3_facts(json: &str, dir: &Path) -> String {
    let f = dir.join("iperf3.json");
    fs::write(&f, json).unwrap();
    let mut c = command(Mode::Base, "python3");
    c.arg("-c")
        .arg(
            "import json,sys; d=json.load(open(sys.argv[1])); e=d['end']; s=d['start']['test_start']; \
             print('error' in d, s['num_streams'], s['reverse'], len(e['streams']), \
             e['sum_received']['bytes'] > 0, e['sum_sent']['bytes'] > 0)",
        )
        .arg(&f);
    let o = run(c, "python3 json check", T);
    assert_eq!(o.code, 0, "{o:?}\n{json}");
    o.stdout
}

fn iperf3_case(what: &str, extra: &[&str], want: &str) {
    require_tool("iperf3", "iperf3");
    require_tool("python3", "python3");
    let scratch = Scratch::new("iperf3");
    let (got, ev) = tcp_then_sdp(what, &scratch, |ctx| {
        let p = ctx.port.to_string();
        let mut srv = ctx.cmd("iperf3");
        srv.args(["-s", "-1", "-p", &p]);
        let mut server = Proc::spawn(srv, "iperf3 -s");
        wait_listening(&mut server, ctx.port);
        let mut cli = ctx.cmd("iperf3");
        cli.args(["-c", "127.0.0.1", "-p", &p, "-t", "2", "-J"])
            .args(extra);
        // Frozen once the control connection and every stream are connected.
        let streams = if extra.contains(&"-P") { 8 } else { 1 };
        let client = run_client(
            ctx,
            cli,
            "iperf3 -c",
            100_000,
            ctx.after_accepts(streams + 1),
        );
        let server = server.wait(T);
        (
            client.code,
            iperf3_facts(&client.stdout, &ctx.dir),
            server.code,
        )
    });
    assert_eq!(got, (0, want.to_string(), 0), "{what}");
    // The control connection and the data streams.
    let streams = if extra.contains(&"-P") { 8 } else { 1 };
    ev.assert_sdp(
        what,
        ("iperf3", 100_000),
        &[("iperf3", 100_000)],
        1 + streams,
        0,
    );
}

#[test]
fn iperf3_eight_parallel_streams_over_sdp() {
    iperf3_case("iperf3 -P 8", &["-P", "8"], "False 8 0 8 True True\n");
}

#[test]
fn iperf3_reverse_over_sdp() {
    iperf3_case("iperf3 -R", &["-R"], "False 1 1 1 True True\n");
}

/// The statistic names sockperf printed (`---> <name> = ...`, `Summary: <name> is ...`),
/// not their values.
fn sockperf_keys(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            if let Some((_, r)) = l.split_once("--->") {
                r.split('=').next().map(|k| k.trim().to_string())
            } else if let Some((_, r)) = l.split_once("Summary:") {
                r.split(" is ").next().map(|k| k.trim().to_string())
            } else {
                None
            }
        })
        .collect()
}

fn sockperf_case(what: &str, mode_args: &[&str], must_have: &str) {
    require_tool("sockperf", "sockperf");
    let scratch = Scratch::new("sockperf");
    let (keys, ev) = tcp_then_sdp(what, &scratch, |ctx| {
        let p = ctx.port.to_string();
        let mut srv = ctx.cmd("sockperf");
        srv.args(["sr", "--tcp", "-i", "127.0.0.1", "-p", &p]);
        let mut server = Proc::spawn(srv, "sockperf sr");
        wait_listening(&mut server, ctx.port);
        let mut cli = ctx.cmd("sockperf");
        cli.args(mode_args)
            .args(["--tcp", "-i", "127.0.0.1", "-p", &p, "-t", "3"]);
        // Not frozen (that would empty sockperf's measured window): the background sampling
        // sees a run of 3 s.
        let client = run(cli, what, T);
        let server = server.stop();
        (client.code, sockperf_keys(&client.stdout), server.code)
    });
    assert_eq!(keys.0, 0, "{what}");
    assert!(
        keys.1.iter().any(|k| k == must_have),
        "{what}: no {must_have:?} in {:?}",
        keys.1
    );
    ev.assert_sdp(what, ("sockperf", 10_000), &[("sockperf", 10_000)], 1, 0);
}

#[test]
fn sockperf_throughput_over_sdp() {
    sockperf_case("sockperf tp", &["tp", "-m", "1400"], "Message Rate");
}

#[test]
fn sockperf_under_load_over_sdp() {
    sockperf_case(
        "sockperf ul",
        &["ul", "-m", "64", "--mps", "20000"],
        "percentile 50.000",
    );
}
