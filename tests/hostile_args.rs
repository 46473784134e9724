//! Hostile arguments and environment.
//!
//! - Bad fds, pointers, lengths, flags and families passed to every intercepted call give the
//!   kernel's answer (the same errno, or the same result) with libsdp as without, on plain
//!   sockets and on a connection libsdp carries over SDP (tests/c/hostile/hostile.c; the
//!   preloaded run must show that connection on `shm` in `sdp stat`).
//! - Garbage in every environment variable libsdp reads: the program still runs and moves its
//!   bytes, nothing crashes, and a clear message names the variable where one is due.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libsdp_suite::{Mode, command, compile_c, libsdp_so, require_tool, sdp_stat};

/// Runs the hostile program in `mode`; returns what it printed before READY and, preloaded,
/// the `sdp stat` rows of its process taken at READY.
fn hostile(mode: Mode) -> (String, Vec<libsdp_suite::StatRow>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/hostile/hostile.c");
    let exe = compile_c(&src, Path::new(env!("CARGO_TARGET_TMPDIR")));
    let mut cmd = command(mode, &exe);
    cmd.env_remove("LIBSDP_CONFIG_FILE")
        .env_remove("SIMPLE_LIBSDP")
        .env_remove("ALWAYS_USE_SDP")
        .env_remove("LIBSDP_ENABLE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start hostile");
    let pid = child.id();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l == "READY" => break,
            Ok(l) => {
                text.push_str(&l);
                text.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                let o = child.wait_with_output().unwrap();
                panic!(
                    "{mode:?}: hostile.c did not reach READY ({:?}); it printed:\n{text}\nstderr: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
    }
    let rows = if mode == Mode::Preload {
        sdp_stat().into_iter().filter(|r| r.pid == pid).collect()
    } else {
        Vec::new()
    };
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{mode:?}: {status:?}\n{text}");
    (text, rows)
}

#[test]
fn every_intercepted_call_answers_hostile_arguments_as_the_kernel_does() {
    let (base, _) = hostile(Mode::Base);
    let (pre, rows) = hostile(Mode::Preload);
    // The preloaded run's connection was carried by SDP over shm, and the hostile calls did
    // not push it back to TCP: both ends are on shm, with the bytes that moved.
    let shm: Vec<_> = rows
        .iter()
        .filter(|r| r.is_connection() && r.transport == "shm")
        .collect();
    assert!(
        shm.len() >= 2 && shm.iter().all(|r| r.bytes_tx + r.bytes_rx > 0),
        "the connection is not on shm with bytes: {rows:?}"
    );
    // Sanity: the cases ran, and the kernel's answers are the interesting ones.
    for want in [
        "conn:read-null -1 EFAULT",
        "conn:recv-null-nodata -1 EAGAIN",
        "conn:readv-1025 -1 EINVAL",
        "conn:recvmsg-iovlen-1025 -1 EMSGSIZE",
        "conn:sendto-addr-bad -1 EFAULT",
        "conn:connect-addr-bad -1 EFAULT",
        "conn:ioctl-fionread-bad -1 EFAULT",
        "conn:epoll_pwait-mask-bad -1 EFAULT",
        "negative:recv -1 EBADF",
        "devnull:recv -1 ENOTSOCK",
        "conn:still-works-read 8",
    ] {
        assert!(base.lines().any(|l| l == want), "{want:?} not in:\n{base}");
    }
    let diff: Vec<String> = base
        .lines()
        .zip(pre.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("kernel: {a}\nlibsdp: {b}"))
        .collect();
    assert!(
        diff.is_empty() && base.lines().count() == pre.lines().count(),
        "libsdp answered differently from the kernel:\n{}",
        diff.join("\n")
    );
}

/// A preloaded python3 pair moving 100 kB, with `vars` set; returns its output.
fn pair_with_env(vars: &[(&str, &std::ffi::OsStr)]) -> std::process::Output {
    let py = require_tool("python3", "python3");
    let mut cmd = Command::new(py);
    cmd.args([
        "-c",
        "import socket\n\
         l=socket.socket(); l.bind(('127.0.0.1',0)); l.listen()\n\
         c=socket.create_connection(l.getsockname()); s,_=l.accept()\n\
         c.sendall(b'x'*100000); n=0\n\
         while n<100000: n+=len(s.recv(65536))\n\
         print('ok', n)\n",
    ])
    .env("LD_PRELOAD", libsdp_so())
    .env_remove("LIBSDP_CONFIG_FILE")
    .env_remove("SIMPLE_LIBSDP")
    .env_remove("ALWAYS_USE_SDP")
    .env_remove("LIBSDP_ENABLE")
    .env_remove("LIBSDP_SPIN_US");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the pair hung with {vars:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn garbage_in_every_environment_variable_is_survived_and_reported() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hostile-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let binary = dir.join("binary.conf");
    std::fs::File::create(&binary)
        .unwrap()
        .write_all(&[0xff, 0x00, 0xfe, b'\n', b'u', b's', b'e', 0x80, b'\n'])
        .unwrap();
    let long = "x".repeat(100_000);
    let non_utf8 = OsStr::from_bytes(&[0xff, 0xfe, b'1']);
    // (variable, value, text stderr must contain, or "" for silence)
    let cases: Vec<(&str, &OsStr, &str)> = vec![
        ("LIBSDP_ENABLE", OsStr::new("yes please"), "LIBSDP_ENABLE"),
        (
            "LIBSDP_ENABLE",
            OsStr::new("99999999999999999999"),
            "LIBSDP_ENABLE",
        ),
        ("LIBSDP_ENABLE", non_utf8, "LIBSDP_ENABLE"),
        ("LIBSDP_ENABLE", OsStr::new(""), ""),
        (
            "LIBSDP_CONFIG_FILE",
            OsStr::new("/"),
            "every socket stays TCP",
        ),
        (
            "LIBSDP_CONFIG_FILE",
            binary.as_os_str(),
            "every socket stays TCP",
        ),
        (
            "LIBSDP_CONFIG_FILE",
            OsStr::new(&long),
            "every socket stays TCP",
        ),
        ("LIBSDP_CONFIG_FILE", non_utf8, ""),
        (
            "LIBSDP_CONFIG_FILE",
            OsStr::new("/nonexistent/libsdp.conf"),
            "",
        ),
        ("SIMPLE_LIBSDP", non_utf8, ""),
        ("SIMPLE_LIBSDP", OsStr::new(&long), ""),
        ("ALWAYS_USE_SDP", OsStr::new("\x01\x02"), ""),
        ("LIBSDP_SPIN_US", OsStr::new("abc"), "LIBSDP_SPIN_US"),
        ("LIBSDP_SPIN_US", OsStr::new("-5"), "LIBSDP_SPIN_US"),
        ("LIBSDP_SPIN_US", OsStr::new("1e9"), "LIBSDP_SPIN_US"),
        (
            "LIBSDP_SPIN_US",
            OsStr::new("99999999999999999999999"),
            "LIBSDP_SPIN_US",
        ),
        (
            "LIBSDP_SPIN_US",
            OsStr::new("18446744073709551615"),
            "LIBSDP_SPIN_US",
        ),
        ("LIBSDP_SPIN_US", OsStr::new(" 50 "), ""),
        // Records of relayed connections (ops::offload::relayed): only an fd that is the
        // very TCP socket named (by inode) is ever used.
        ("LIBSDP_RELAYED", OsStr::new("abc"), ""),
        ("LIBSDP_RELAYED", non_utf8, ""),
        ("LIBSDP_RELAYED", OsStr::new(&long), ""),
        ("LIBSDP_RELAYED", OsStr::new("1:0:1,2:1:2,3:2:3"), ""),
        ("LIBSDP_RELAYED", OsStr::new("0:3:0,0:4:0,0:5:0,0:6:0"), ""),
        (
            "LIBSDP_RELAYED",
            OsStr::new("1:-1:1,:::,1:99999999999:1"),
            "",
        ),
    ];
    let mut failures = Vec::new();
    for (var, value, want) in &cases {
        let o = pair_with_env(&[(var, value)]);
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        let shown = value.to_string_lossy();
        let shown = if shown.len() > 40 {
            &shown[..40]
        } else {
            &shown
        };
        let ok = o.status.success()
            && out == "ok 100000\n"
            && !err.contains("internal error")
            && !err.contains("panicked")
            && if want.is_empty() {
                err.is_empty()
            } else {
                err.contains(want)
            };
        if !ok {
            failures.push(format!(
                "{var}={shown:?}: {:?}\nstdout: {out}\nstderr: {err}",
                o.status
            ));
        }
    }
    // LD_PRELOAD with other, unreadable entries around libsdp: the loader complains about them
    // (its own message), libsdp still runs.
    let lp = format!("/nonexistent/libfoo.so:{}:  ::", libsdp_so().display());
    let o = pair_with_env(&[("LD_PRELOAD", OsStr::new(&lp))]);
    if !(o.status.success() && String::from_utf8_lossy(&o.stdout) == "ok 100000\n") {
        failures.push(format!("LD_PRELOAD={lp}: {o:?}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
