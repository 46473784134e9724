//! The `sdp` binary as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SDP: &str = env!("CARGO_BIN_EXE_sdp");

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sdp-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs sdp with a clean libsdp environment, in `cwd`.
fn sdp(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(SDP);
    cmd.current_dir(cwd).args(args);
    for k in [
        "LIBSDP_CONFIG_FILE",
        "SIMPLE_LIBSDP",
        "ALWAYS_USE_SDP",
        "LIBSDP_ENABLE",
        "LD_PRELOAD",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const OK_CONF: &str =
    "use tcp client * 10.0.0.0/8:22\nuse sdp server memcach* *:11211\nuse both client * *:*\n";
const BAD_CONF: &str =
    "use sdpp client * *:*\nuse tcp server * 10.0.0.0/33:1\nuse both client * *:70000\n";

#[test]
fn explain_rule_decides_with_line() {
    let s = Scratch::new("explain-rule");
    s.file("ok.conf", OK_CONF);
    let o = sdp(
        &s.0,
        &[
            "explain",
            "--conf",
            "ok.conf",
            "memcached",
            "server",
            "0.0.0.0:11211",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end(),
        "memcached server 0.0.0.0:11211 -> sdp (rule at ok.conf:2: use sdp server memcach* *:11211)"
    );
}

#[test]
fn explain_first_match_wins_for_client() {
    let s = Scratch::new("explain-client");
    s.file("ok.conf", OK_CONF);
    let o = sdp(
        &s.0,
        &[
            "explain",
            "--conf",
            "ok.conf",
            "ssh",
            "connect",
            "10.9.9.9:22",
        ],
        &[],
    );
    assert!(
        stdout(&o).contains("-> tcp (rule at ok.conf:1: use tcp client * 10.0.0.0/8:22)"),
        "{}",
        stdout(&o)
    );
    let o = sdp(
        &s.0,
        &[
            "explain",
            "--conf",
            "ok.conf",
            "ssh",
            "client",
            "[2001:db8::1]:22",
        ],
        &[],
    );
    assert!(
        stdout(&o).contains("-> both (rule at ok.conf:3:"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn explain_ipv4_mapped_address_uses_ipv4_rule() {
    let s = Scratch::new("explain-mapped");
    s.file("ok.conf", OK_CONF);
    let o = sdp(
        &s.0,
        &[
            "explain",
            "--conf",
            "ok.conf",
            "ssh",
            "client",
            "[::ffff:10.1.2.3]:22",
        ],
        &[],
    );
    assert!(
        stdout(&o).contains("-> tcp (rule at ok.conf:1:"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn explain_no_match_default() {
    let s = Scratch::new("explain-nomatch");
    s.file("ok.conf", OK_CONF);
    let o = sdp(
        &s.0,
        &[
            "explain",
            "--conf",
            "ok.conf",
            "redis-server",
            "server",
            "0.0.0.0:6379",
        ],
        &[],
    );
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.starts_with(
            "redis-server server 0.0.0.0:6379 -> both (default: no server rule in ok.conf matches"
        ),
        "{out}"
    );
}

#[test]
fn explain_without_conf_uses_env_file() {
    let s = Scratch::new("explain-env");
    let conf = s.file("ok.conf", OK_CONF);
    let o = sdp(
        &s.0,
        &["explain", "/usr/bin/memcached", "listen", "127.0.0.1:11211"],
        &[("LIBSDP_CONFIG_FILE", conf.to_str().unwrap())],
    );
    let out = stdout(&o);
    assert!(
        out.starts_with("memcached server 127.0.0.1:11211 -> sdp (rule at "),
        "{out}"
    );
    assert!(out.contains("ok.conf:2:"), "{out}");
}

#[test]
fn explain_without_any_file_is_both() {
    let s = Scratch::new("explain-nofile");
    let missing = s.0.join("missing.conf");
    let o = sdp(
        &s.0,
        &["explain", "x", "client", "1.2.3.4:80"],
        &[("LIBSDP_CONFIG_FILE", missing.to_str().unwrap())],
    );
    assert!(o.status.success());
    assert!(
        stdout(&o).contains("-> both (default: no policy file"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn explain_simple_libsdp_forces_sdp() {
    let s = Scratch::new("explain-simple");
    let conf = s.file("ok.conf", OK_CONF);
    let o = sdp(
        &s.0,
        &["explain", "ssh", "client", "10.0.0.1:22"],
        &[
            ("LIBSDP_CONFIG_FILE", conf.to_str().unwrap()),
            ("SIMPLE_LIBSDP", "1"),
        ],
    );
    assert!(
        stdout(&o).contains("-> sdp (SIMPLE_LIBSDP"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn explain_broken_file_prints_errors_and_fails() {
    let s = Scratch::new("explain-bad");
    s.file("bad.conf", BAD_CONF);
    let o = sdp(
        &s.0,
        &["explain", "--conf", "bad.conf", "x", "server", "1.2.3.4:1"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bad.conf:1:5: expected sdp, tcp or both"),
        "{}",
        stderr(&o)
    );
    // Also when found through the environment, as the library would.
    let o = sdp(
        &s.0,
        &["explain", "x", "server", "1.2.3.4:1"],
        &[("LIBSDP_CONFIG_FILE", "bad.conf")],
    );
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn explain_rejects_bad_arguments() {
    let s = Scratch::new("explain-args");
    let o = sdp(&s.0, &["explain", "x", "sever", "1.2.3.4:1"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("server, listen, client or connect"));
    let o = sdp(&s.0, &["explain", "x", "server", "::1:80"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("[::1]:80"));
}

#[test]
fn check_ok_file() {
    let s = Scratch::new("check-ok");
    s.file("ok.conf", OK_CONF);
    let o = sdp(&s.0, &["check", "ok.conf"], &[]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o).trim_end(), "ok.conf: 3 rules OK");
}

#[test]
fn check_bad_file_lists_every_error_with_position() {
    let s = Scratch::new("check-bad");
    s.file("bad.conf", BAD_CONF);
    let o = sdp(&s.0, &["check", "bad.conf"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "bad.conf:1:5: expected sdp, tcp or both, found \"sdpp\"",
            "bad.conf:2:27: expected a prefix length in range for IPv4 (0-32), found \"33\"",
            "bad.conf:3:21: expected a port in range (0-65535), found \"70000\"",
        ],
        "{err}"
    );
}

#[test]
fn check_missing_file_fails() {
    let s = Scratch::new("check-missing");
    let o = sdp(&s.0, &["check", "nope.conf"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nope.conf"));
}

#[test]
fn check_shipped_example() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conf/libsdp.conf");
    let o = sdp(Path::new("/"), &["check", example.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn run_sets_absolute_ld_preload_and_conf() {
    let s = Scratch::new("run");
    s.file("libsdp.so", "");
    s.file("ok.conf", OK_CONF);
    let o = sdp(
        &s.0,
        &[
            "run",
            "--lib",
            "libsdp.so",
            "--conf",
            "ok.conf",
            "--",
            "sh",
            "-c",
            "echo \"$LD_PRELOAD|$LIBSDP_CONFIG_FILE\"",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let dir = std::path::absolute(&s.0).unwrap();
    assert_eq!(
        out.trim_end(),
        format!(
            "{}|{}",
            dir.join("libsdp.so").display(),
            dir.join("ok.conf").display()
        )
    );
}

#[test]
fn run_prepends_to_existing_ld_preload() {
    let s = Scratch::new("run-prepend");
    let lib = s.file("libsdp.so", "");
    let o = sdp(
        &s.0,
        &[
            "run",
            "--lib",
            lib.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo $LD_PRELOAD",
        ],
        &[("LD_PRELOAD", "/nonexistent/other.so")],
    );
    assert_eq!(
        stdout(&o).trim_end(),
        format!("{}:/nonexistent/other.so", lib.display())
    );
}

#[test]
fn run_keeps_exit_code_and_pid() {
    let s = Scratch::new("run-exit");
    let lib = s.file("libsdp.so", "");
    let o = sdp(
        &s.0,
        &[
            "run",
            "--lib",
            lib.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "exit 7",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(7));
    // exec, not spawn: the program runs as the process we started.
    let child = Command::new(SDP)
        .current_dir(&s.0)
        .args([
            "run",
            "--lib",
            lib.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo $$",
        ])
        .env_remove("LD_PRELOAD")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pid.to_string());
}

#[test]
fn run_missing_library_is_a_clear_error() {
    let s = Scratch::new("run-nolib");
    let o = sdp(&s.0, &["run", "--lib", "nope.so", "--", "true"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nope.so"), "{}", stderr(&o));
}

#[test]
fn run_missing_program_is_127() {
    let s = Scratch::new("run-noprog");
    let lib = s.file("libsdp.so", "");
    let o = sdp(
        &s.0,
        &[
            "run",
            "--lib",
            lib.to_str().unwrap(),
            "--",
            "/nonexistent/prog",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(127));
}

/// `sdp stat` shows a live connection of a preloaded process as SDP over shm, with its bytes.
#[test]
fn stat_lists_a_live_offloaded_connection() {
    use std::io::BufRead;
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_sdp"));
    let lib = exe.parent().unwrap().join("libsdp.so");
    assert!(
        lib.exists(),
        "{} is missing: build it first with cargo build --release --workspace",
        lib.display()
    );
    let script = "import socket,time\n\
        l=socket.socket(); l.bind(('127.0.0.1',0)); l.listen()\n\
        c=socket.create_connection(l.getsockname()); s,_=l.accept()\n\
        c.sendall(b'x'*1000); n=0\n\
        while n<1000: n+=len(s.recv(1000))\n\
        print('READY', flush=True); time.sleep(10)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .env("LD_PRELOAD", &lib)
        .env_remove("LIBSDP_CONFIG_FILE")
        .env_remove("SIMPLE_LIBSDP")
        .env_remove("LIBSDP_ENABLE")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let json = sdp(Path::new("/"), &["stat", "--json"], &[]);
    let table = sdp(Path::new("/"), &["stat"], &[]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(line.trim(), "READY");
    let pid = format!("\"pid\":{},", child.id());
    let rows: Vec<String> = stdout(&json)
        .lines()
        .filter(|l| l.contains(&pid))
        .map(str::to_owned)
        .collect();
    assert!(
        rows.iter()
            .any(|r| r.contains("\"transport\":\"shm\"") && r.contains("\"bytes_tx\":1000,")),
        "no shm row that sent 1000 bytes for pid {}: {rows:?}",
        child.id()
    );
    assert!(
        stdout(&table)
            .lines()
            .any(|l| l.contains(&child.id().to_string()) && l.contains(" shm ")),
        "{}",
        stdout(&table)
    );
}

#[test]
fn every_subcommand_has_help() {
    for cmd in ["run", "explain", "check", "stat", "bench"] {
        let o = sdp(Path::new("/"), &[cmd, "--help"], &[]);
        assert!(o.status.success(), "{cmd}");
        assert!(stdout(&o).contains("Usage: sdp"), "{cmd}: {}", stdout(&o));
        let o = sdp(Path::new("/"), &["help", cmd], &[]);
        assert!(o.status.success(), "help {cmd}");
    }
    let o = sdp(Path::new("/"), &["help"], &[]);
    assert!(stdout(&o).contains("explain"));
}
