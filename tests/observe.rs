//! Observability from real runs: the level-7 decision log (stderr, per-process files, syslog),
//! the counters of `sdp stat` (credit stalls, busy-poll hits, ZCopy/BCopy bytes), its totals by
//! fallback reason, and `--watch`.
//!
//! The workload is a preloaded python3 pair (a server and its fork child as the client): one
//! connection over SDP that moves 8 MiB while the server does not read (the client's sends
//! must wait for credits) and then ping-pongs (blocking receives and epoll_wait find their
//! data while busy-polling), and one connection a `use tcp` rule keeps on TCP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libsdp_suite::{free_port, libsdp_so, require_tool, sdp_tool};

const BULK: usize = 8 << 20;
const ROUNDS: usize = 200;

/// Server: listens on P1 and P2, forks the client, takes the bulk without reading for a while,
/// then answers pings; each prints its role and pid (one write each: they share the pipe) and
/// waits for stdin to close.
const PAIR: &str = r#"
import os, select, socket, sys, time
p1, p2, bulk, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
l1 = socket.socket(); l1.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l1.bind(('127.0.0.1', p1)); l1.listen(8)
l2 = socket.socket(); l2.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l2.bind(('127.0.0.1', p2)); l2.listen(8)
child = os.fork()
if child == 0:
    c = socket.create_connection(('127.0.0.1', p1))
    c.sendall(b'x' * bulk)
    ep = select.epoll(); ep.register(c.fileno(), select.EPOLLIN)
    for _ in range(rounds):
        c.sendall(b'p')
        assert ep.poll(10), 'no pong'
        assert c.recv(1) == b'q'
    t = socket.create_connection(('127.0.0.1', p2))
    t.sendall(b'tcp')
    os.write(1, b'CLIENT %d\n' % os.getpid())
    sys.stdin.read()
    os._exit(0)
s, _ = l1.accept()
time.sleep(1.0)
got = 0
while got < bulk:
    got += len(s.recv(min(1 << 20, bulk - got)))
for _ in range(rounds):
    assert s.recv(1) == b'p'
    s.sendall(b'q')
t, _ = l2.accept()
assert t.recv(3) == b'tcp'
os.write(1, b'SERVER %d\n' % os.getpid())
sys.stdin.read()
os.waitpid(child, 0)
"#;

struct Pair {
    child: Child,
    server: u32,
    client: u32,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = Command::new("kill")
            .args(["-9", &self.client.to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("observe-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tmp dir");
    d.join(name)
}

/// Starts the pair under `conf` and waits until both have done their part.
fn start_pair(conf: &Path, p1: u16, p2: u16) -> Pair {
    let py = require_tool("python3", "python3");
    let mut child = Command::new(py)
        .args([
            "-c",
            PAIR,
            &p1.to_string(),
            &p2.to_string(),
            &BULK.to_string(),
            &ROUNDS.to_string(),
        ])
        .env("LD_PRELOAD", libsdp_so())
        .env("LIBSDP_CONFIG_FILE", conf)
        // A generous budget: the test asserts hits, and the CPU is shared.
        .env("LIBSDP_SPIN_US", "200000")
        .env_remove("SIMPLE_LIBSDP")
        .env_remove("ALWAYS_USE_SDP")
        .env_remove("LIBSDP_ENABLE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let (mut server, mut client) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while server == 0 || client == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the python pair did not finish its transfer in 60 s"));
        let mut w = line.split_whitespace();
        match (w.next(), w.next().and_then(|p| p.parse().ok())) {
            (Some("SERVER"), Some(p)) => server = p,
            (Some("CLIENT"), Some(p)) => client = p,
            _ => panic!("unexpected output: {line}"),
        }
    }
    Pair {
        child,
        server,
        client,
    }
}

/// `sdp stat --json`: every line as (key → raw value) maps.
fn stat_json() -> Vec<std::collections::HashMap<String, String>> {
    let o = Command::new(sdp_tool())
        .args(["stat", "--json"])
        .env_remove("LD_PRELOAD")
        .output()
        .expect("sdp stat --json");
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let body = l.trim().trim_start_matches('{').trim_end_matches('}');
            body.split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once(':')?;
                    Some((
                        k.trim_matches('"').to_string(),
                        v.trim_matches('"').to_string(),
                    ))
                })
                .collect()
        })
        .collect()
}

fn num(m: &std::collections::HashMap<String, String>, k: &str) -> u64 {
    m.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {k} in {m:?}"))
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The decision line of `log` with every `want` field, or a failure showing the log.
fn decision<'a>(log: &'a str, want: &[&str]) -> &'a str {
    log.lines()
        .find(|l| {
            l.contains(": decision ") && want.iter().all(|w| l.split_whitespace().any(|f| f == *w))
        })
        .unwrap_or_else(|| panic!("no decision line with {want:?} in:\n{log}"))
}

#[test]
fn real_transfer_moves_counters_logs_decisions_and_counts_a_policy_fallback() {
    let (p1, p2) = (free_port(), free_port());
    let conf = tmp("pair.conf");
    let pattern = tmp("pair.%p.log");
    std::fs::write(
        &conf,
        format!(
            "log min-level 7 destination file {}\nuse tcp client * 127.0.0.1:{p2}\nuse both client * *:*\n",
            pattern.display()
        ),
    )
    .unwrap();
    let pair = start_pair(&conf, p1, p2);
    let rows = stat_json();

    // The SDP connection, seen from the client: it carried the bulk and the pings by BCopy
    // (the shm transport copies through its rings), and its sends waited for credits while
    // the server did not read.
    let conn = rows
        .iter()
        .find(|r| {
            r.get("pid") == Some(&pair.client.to_string())
                && r.get("remote")
                    .is_some_and(|a| a.ends_with(&format!(":{p1}")))
        })
        .unwrap_or_else(|| panic!("no row of the client's connection: {rows:?}"));
    assert_eq!(conn["transport"], "shm", "{conn:?}");
    assert!(num(conn, "bytes_tx") >= (BULK + ROUNDS) as u64, "{conn:?}");
    assert_eq!(num(conn, "bcopy_tx"), num(conn, "bytes_tx"), "{conn:?}");
    assert_eq!(num(conn, "zcopy_tx"), 0, "{conn:?}");
    assert!(num(conn, "credit_stalls") >= 1, "{conn:?}");

    // The server's side of it: blocking receives found pings while busy-polling.
    let srv = rows
        .iter()
        .find(|r| {
            r.get("pid") == Some(&pair.server.to_string())
                && r.get("transport").map(String::as_str) == Some("shm")
        })
        .unwrap_or_else(|| panic!("no shm row of the server: {rows:?}"));
    assert!(num(srv, "bytes_rx") >= (BULK + ROUNDS) as u64, "{srv:?}");
    assert!(num(srv, "spin_hits") >= 1, "{srv:?}");

    // Process counters and decisions by reason.
    let proc_of = |pid: u32| {
        rows.iter()
            .find(|r| r.get("process") == Some(&pid.to_string()))
            .unwrap_or_else(|| panic!("no process line for {pid}: {rows:?}"))
    };
    let (cp, sp) = (proc_of(pair.client), proc_of(pair.server));
    assert!(num(cp, "epoll_spin_hits") >= 1, "{cp:?}");
    assert!(
        num(cp, "epoll_spins") >= num(cp, "epoll_spin_hits"),
        "{cp:?}"
    );
    assert!(num(cp, "credit_stalls") >= 1, "{cp:?}");
    assert!(num(sp, "recv_spin_hits") >= 1, "{sp:?}");
    assert_eq!(num(cp, "offloaded"), 1, "{cp:?}");
    assert_eq!(num(cp, "policy"), 1, "the use tcp rule: {cp:?}");
    assert_eq!(num(sp, "offloaded"), 1, "{sp:?}");
    assert_eq!(num(sp, "plain-client"), 1, "{sp:?}");
    let policy_total = rows
        .iter()
        .find(|r| {
            r.get("totals").is_some() && r.get("reason").map(String::as_str) == Some("policy")
        })
        .unwrap_or_else(|| panic!("no policy totals line: {rows:?}"));
    assert!(num(policy_total, "total") >= 1, "{policy_total:?}");

    // The text summary shows the same.
    let text = Command::new(sdp_tool()).arg("stat").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("SOCKETS BY FALLBACK REASON"), "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("policy ")),
        "{text}"
    );

    // One log file per process (the client is a fork child), each with its decisions.
    let file = |pid: u32| PathBuf::from(pattern.to_string_lossy().replace("%p", &pid.to_string()));
    let (clog, slog) = (read_log(&file(pair.client)), read_log(&file(pair.server)));
    let c = conf.display();
    decision(
        &clog,
        &[
            "role=client",
            &format!("remote=127.0.0.1:{p1}"),
            &format!("rule={c}:3"),
            "mode=both",
            "transport=shm",
            "reason=-",
        ],
    );
    decision(
        &clog,
        &[
            "role=client",
            &format!("remote=127.0.0.1:{p2}"),
            &format!("rule={c}:2"),
            "mode=tcp",
            "transport=tcp",
            "reason=policy",
        ],
    );
    decision(
        &slog,
        &[
            "role=listen",
            &format!("local=127.0.0.1:{p1}"),
            "rule=no-match-default",
            "transport=shm",
        ],
    );
    decision(
        &slog,
        &[
            "role=server",
            &format!("local=127.0.0.1:{p1}"),
            "transport=shm",
            "reason=-",
        ],
    );
    decision(
        &slog,
        &[
            "role=server",
            &format!("local=127.0.0.1:{p2}"),
            "transport=tcp",
            "reason=plain-client",
        ],
    );
    assert!(
        !slog.contains(&format!("libsdp[{}]", pair.client)),
        "the child's lines went to the parent's file:\n{slog}"
    );
    drop(pair);
}

/// A short preloaded run that makes one TCP connection (nobody listens: no-beacon, refused).
fn short_run(conf: &Path) -> std::process::Output {
    let py = require_tool("python3", "python3");
    let port = free_port();
    Command::new(py)
        .args([
            "-c",
            &format!(
                "import socket\ntry: socket.create_connection(('127.0.0.1', {port}))\nexcept OSError as e: print('refused', e.errno)\n"
            ),
        ])
        .env("LD_PRELOAD", libsdp_so())
        .env("LIBSDP_CONFIG_FILE", conf)
        .env_remove("SIMPLE_LIBSDP")
        .env_remove("ALWAYS_USE_SDP")
        .output()
        .expect("python3")
}

#[test]
fn log_goes_to_stderr_at_level_7_and_not_at_level_8() {
    let conf = tmp("stderr7.conf");
    std::fs::write(&conf, "log min-level 7 destination stderr\n").unwrap();
    let o = short_run(&conf);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "refused 111\n");
    decision(
        &err,
        &[
            "role=client",
            "rule=no-rules-default",
            "transport=tcp",
            "reason=no-beacon",
        ],
    );
    std::fs::write(&conf, "log min-level 8 destination stderr\n").unwrap();
    let o = short_run(&conf);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "refused 111\n");
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("decision"),
        "{o:?}"
    );
}

#[test]
fn log_file_without_pid_pattern_collects_every_process_whole_lines() {
    let file = tmp("shared.log");
    let _ = std::fs::remove_file(&file);
    let conf = tmp("shared.conf");
    std::fs::write(
        &conf,
        format!("log min-level 7 destination file {}\n", file.display()),
    )
    .unwrap();
    for _ in 0..2 {
        let o = short_run(&conf);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "refused 111\n", "{o:?}");
        assert!(o.stderr.is_empty(), "the log went to the file: {o:?}");
    }
    let log = read_log(&file);
    let pids: std::collections::BTreeSet<&str> = log
        .lines()
        .map(|l| {
            assert!(
                l.starts_with("libsdp[") && l.contains(": decision "),
                "{log}"
            );
            l.split(']').next().unwrap()
        })
        .collect();
    assert_eq!(pids.len(), 2, "two processes appended to one file:\n{log}");
}

#[test]
fn log_file_that_cannot_be_opened_falls_back_to_stderr_and_says_so() {
    let conf = tmp("badfile.conf");
    std::fs::write(
        &conf,
        "log min-level 7 destination file /nonexistent-dir/libsdp.log\n",
    )
    .unwrap();
    let o = short_run(&conf);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "refused 111\n");
    assert!(
        err.contains("cannot open log file /nonexistent-dir/libsdp.log"),
        "{err}"
    );
    decision(&err, &["role=client", "reason=no-beacon"]);
}

#[test]
fn log_to_syslog_reaches_dev_log() {
    // A datagram socket plays syslogd: at /dev/log itself when there is none (the CI box), or
    // bound elsewhere and mounted over /dev/log in a private mount namespace otherwise.
    let sock = tmp("devlog.sock");
    let _ = std::fs::remove_file(&sock);
    let own_dev_log = !Path::new("/dev/log").exists();
    let at: &Path = if own_dev_log {
        Path::new("/dev/log")
    } else {
        &sock
    };
    let rx = std::os::unix::net::UnixDatagram::bind(at)
        .unwrap_or_else(|e| panic!("bind {}: {e} (the test needs root)", at.display()));
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conf = tmp("syslog.conf");
    std::fs::write(&conf, "log min-level 7 destination syslog\n").unwrap();
    let o = if own_dev_log {
        short_run(&conf)
    } else {
        let py = require_tool("python3", "python3");
        Command::new("unshare")
            .args(["-m", "sh", "-c", "mount --bind \"$0\" /dev/log && exec \"$@\""])
            .arg(&sock)
            .arg(py)
            .args(["-c", "import socket\ntry: socket.create_connection(('127.0.0.1', 1))\nexcept OSError as e: print('refused', e.errno)\n"])
            .env("LD_PRELOAD", libsdp_so())
            .env("LIBSDP_CONFIG_FILE", &conf)
            .output()
            .expect("unshare")
    };
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = rx.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = m.contains(": decision ");
        got.push(m);
        if done {
            break;
        }
    }
    if own_dev_log {
        let _ = std::fs::remove_file("/dev/log");
    }
    assert_eq!(String::from_utf8_lossy(&o.stdout), "refused 111\n", "{o:?}");
    let line = got
        .iter()
        .find(|m| m.contains(": decision "))
        .unwrap_or_else(|| panic!("no decision message on /dev/log: {got:?} {o:?}"));
    // <facility*8 + severity>: user.info is <14>.
    assert!(line.starts_with("<14>"), "{line}");
    assert!(
        line.contains("role=client") && line.contains("transport=tcp"),
        "{line}"
    );
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("decision"),
        "{o:?}"
    );
}

#[test]
fn stat_watch_repeats_the_listing_count_times() {
    let start = Instant::now();
    let o = Command::new(sdp_tool())
        .args(["stat", "--watch", "1", "--count", "2"])
        .output()
        .expect("sdp stat --watch");
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.matches("Every 1s: sdp stat").count(), 2, "{out}");
    assert!(start.elapsed() >= Duration::from_secs(1), "it did not wait");
    let o = Command::new(sdp_tool())
        .args(["stat", "--watch", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "--watch 0 must be refused: {o:?}");
    let o = Command::new(sdp_tool())
        .args(["stat", "--count", "2"])
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "--count without --watch must be refused"
    );
}

/// A process killed with SIGKILL leaves its statistics file behind; when another process gets
/// its pid, `sdp stat` must not show the dead process's sockets as that process's (before, it
/// did, for good: a file named after pid 1 from some earlier run showed a "python3" listener
/// on this machine for hours). The file records its process's start time, and a file whose
/// start time is not its pid's is dropped. The reuse of a pid is made here by renaming the file.
#[test]
fn stat_drops_the_rows_of_a_killed_process_whose_pid_was_reused() {
    let py = require_tool("python3", "python3");
    let mut victim = Command::new(py)
        .args([
            "-c",
            "import socket, time\nl = socket.socket()\nl.bind(('127.0.0.1', 0))\nl.listen(1)\nprint('up', flush=True)\ntime.sleep(60)\n",
        ])
        .env("LD_PRELOAD", libsdp_so())
        .env_remove("LIBSDP_CONFIG_FILE")
        .env_remove("SIMPLE_LIBSDP")
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(victim.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "up");
    let dead = victim.id();
    let file = |pid: u32| PathBuf::from(format!("/dev/shm/libsdp.{pid}.stat"));
    let mut bytes = std::fs::read(file(dead)).expect("the victim's statistics file");
    victim.kill().unwrap();
    victim.wait().unwrap();
    assert!(file(dead).exists(), "SIGKILL leaves the file behind");

    // Another process now has a pid the dead one's file names.
    let mut other = Command::new("sleep").arg("30").spawn().expect("sleep");
    let reused = other.id();
    bytes[16..24].copy_from_slice(&u64::from(reused).to_le_bytes());
    std::fs::write(file(reused), &bytes).unwrap();
    let _ = std::fs::remove_file(file(dead));
    let rows = stat_json();
    other.kill().unwrap();
    other.wait().unwrap();
    let shown: Vec<_> = rows
        .iter()
        .filter(|r| {
            r.get("pid")
                .or_else(|| r.get("process"))
                .map(String::as_str)
                == Some(&reused.to_string())
        })
        .collect();
    let left = file(reused).exists();
    let _ = std::fs::remove_file(file(reused));
    assert!(
        shown.is_empty(),
        "sdp stat shows the killed process's rows under pid {reused}: {shown:?}"
    );
    assert!(!left, "the stale file was not removed");
}
