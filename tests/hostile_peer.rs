//! A hostile SDP peer (issue #8, hostile input): a preloaded client scribbles random bytes over
//! the shared memory of its own connection to a preloaded echo server while sending, and an
//! honest client keeps echoing through the same server meanwhile. The server must not crash
//! or hang, the honest connection must stay on SDP and intact, and once the attacks end the
//! server must hold no more descriptors or threads than before them.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use libsdp_suite::{Mode, Proc, command, free_port, require_tool, sdp_stat};

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/hostile_peer.py")
}

fn count(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn scribbling_peer_hurts_only_its_own_connection() {
    require_tool("python3", "python3");
    let port = free_port();
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let log = tmp.join(format!("hostile-peer-{port}.log"));
    let conf = tmp.join(format!("hostile-peer-{port}.conf"));
    let _ = std::fs::remove_file(&log);
    std::fs::write(
        &conf,
        format!("log min-level 8 destination file {}\n", log.display()),
    )
    .unwrap();
    let mut srv = command(Mode::Preload, "python3");
    srv.env("LIBSDP_CONFIG_FILE", &conf)
        .arg(script())
        .args(["server", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut server = srv.spawn().expect("start the echo server");
    let spid = server.id();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("READY"));
    let (fds0, threads0) = (count(spid, "fd"), count(spid, "task"));

    let mut honest = command(Mode::Preload, "python3");
    honest
        .arg(script())
        .args(["honest", &port.to_string(), "400"]);
    let honest = Proc::spawn(honest, "honest client");
    let hpid = honest.id();
    let mut attackers = Vec::new();
    for seed in 1..=3 {
        let mut a = command(Mode::Preload, "python3");
        a.arg(script())
            .args(["attacker", &port.to_string(), &seed.to_string()]);
        attackers.push(Proc::spawn(a, "attacker"));
    }
    // Statistics while the honest client runs: its connection is SDP and carries its bytes.
    let mut honest_bytes = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut honest = Some(honest);
    let mut out = None;
    while Instant::now() < deadline {
        for r in sdp_stat()
            .into_iter()
            .filter(|r| r.pid == hpid && r.is_connection())
        {
            assert_eq!(r.transport, "shm", "the honest connection left SDP: {r:?}");
            honest_bytes = honest_bytes.max(r.bytes_tx);
        }
        if !honest.as_mut().unwrap().running() {
            out = Some(honest.take().unwrap().wait(Duration::from_secs(5)));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = out.unwrap_or_else(|| honest.take().unwrap().stop());
    assert_eq!(out.code, 0, "honest client: {out:?}");
    assert!(out.stdout.contains("honest ok 400"), "{out:?}");
    assert!(
        honest_bytes > 0,
        "sdp stat never showed the honest client's bytes on shm"
    );
    for a in attackers {
        let o = a.wait(Duration::from_secs(60));
        assert!(
            o.stdout.contains("attacker maps 1"),
            "the attack found no ring: {o:?}"
        );
        assert!(o.stdout.contains("attacker done"), "{o:?}");
    }
    // The server lives on, and gives back what the attacked connections held.
    let deadline = Instant::now() + Duration::from_secs(20);
    while (count(spid, "fd"), count(spid, "task")) != (fds0, threads0) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        (count(spid, "fd"), count(spid, "task")),
        (fds0, threads0),
        "the server kept descriptors or threads of the attacked connections"
    );
    drop(server.stdin.take().map(|mut i| i.write_all(b"")));
    let status = server.wait().expect("server");
    assert!(status.success(), "the server died: {status:?}");
    // Each attacked connection failed as a reset TCP connection does: its first error once,
    // then end of stream, EPIPE, and no pending error (a transport failure is not sticky).
    let after: Vec<String> = lines
        .map_while(Result::ok)
        .filter(|l| l.starts_with("after "))
        .collect();
    assert!(
        !after.is_empty(),
        "no attacked connection failed in the server"
    );
    for l in &after {
        assert!(
            l.ends_with(": recv b'', send EPIPE, SO_ERROR 0"),
            "an attacked connection did not end as TCP's would: {l:?} (all: {after:?})"
        );
    }
    // The server's library saw the attacks for what they were, and said so once each.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let seen = text
        .lines()
        .filter(|l| l.contains("peer violated the shared-memory protocol"))
        .count();
    assert!(
        (1..=12).contains(&seen),
        "server log: {seen} violation lines for 3 attacks:\n{text}"
    );
}
