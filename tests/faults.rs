//! Faults (issue 8, item 1): a peer killed with SIGKILL during connect, during a bulk
//! transfer and while the survivor is blocked in every blocking call; a listener closed with
//! connections not yet accepted; forks while other threads send and connect; exhausted
//! resources (RLIMIT_NOFILE, RLIMIT_MEMLOCK, address space); the policy file replaced under
//! running programs. See docs/FAULTS.md for the table of what was tried and seen.
//!
//! Each scenario of `tests/c/faults/faults.c` runs twice, over kernel TCP and over SDP (the
//! preload with the default policy): the survivor prints what every call returned, whether it
//! returned within 10 s of the kill, and its leak accounting (descriptors, threads and
//! shared-memory mappings against a baseline taken before the faulty connection existed).
//! The two runs must print the same; the few places where SDP cannot give what TCP gives are
//! listed in [`KNOWN`] with the reason, and are printed when they occur. At the program's
//! first `SYNC` `sdp stat` must show the survivor/victim pair on `shm` with bytes counted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use libsdp_suite::{
    Mode, Outcome, StatRow, Synced, assert_offloaded, command, compile_c, free_port,
    sdp_stat_of_group,
};

const T: Duration = Duration::from_secs(90);

fn program() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/faults/faults.c");
    compile_c(&src, Path::new(env!("CARGO_TARGET_TMPDIR")))
}

/// Where SDP over shm cannot give what kernel TCP gives, as (TCP line, SDP line), and why.
/// A difference not listed here fails the test; a listed one is printed when it occurs.
const KNOWN: &[(&str, &str, &str)] = &[
    // The victim died with our bytes unread (it never read; our buffers were full). libsdp
    // reports the reset as TCP does (ECONNRESET once, then EPIPE; POLLHUP; SO_ERROR), but an
    // app end (an AF_UNIX socket) cannot be made to poll POLLERR.
    (
        "for output when the peer was killed: OUT ERR HUP in time=1",
        "for output when the peer was killed: OUT HUP in time=1",
        "peer killed with our bytes unread: POLLHUP without POLLERR",
    ),
    // The reset changes two things in the app end (room for a writer, then both directions
    // shut); a poller the first change wakes may run before the second one (seen under load).
    (
        "for output when the peer was killed: OUT ERR HUP in time=1",
        "for output when the peer was killed: OUT in time=1",
        "peer killed with our bytes unread: a poller woke between OUT and HUP",
    ),
    // A client killed between connect and the server's accept: over TCP its 4 bytes are in
    // the kernel; over SDP they wait in the client's pending buffer (its memory) until the
    // exchange, and die with it (README: a process killed by a signal loses the bytes that
    // had not reached its peer yet).
    (
        "read: 4",
        "read: 0",
        "bytes written while pending die with a killed client",
    ),
];

/// Compares the TCP and SDP outputs line by line (allowing only [`KNOWN`] differences);
/// returns the differences seen.
fn compare(what: &str, tcp: &str, sdp: &str, sdp_err: &str) -> Vec<&'static str> {
    let t: Vec<&str> = tcp.lines().collect();
    let s: Vec<&str> = sdp.lines().collect();
    assert_eq!(
        t.len(),
        s.len(),
        "{what}: SDP (right) printed a different number of lines than TCP (left):\n--- TCP\n{tcp}--- SDP\n{sdp}--- SDP stderr\n{sdp_err}"
    );
    let mut seen = Vec::new();
    for (a, b) in t.iter().zip(&s) {
        if a == b {
            continue;
        }
        let known = KNOWN.iter().find(|(kt, ks, _)| {
            a.ends_with(kt)
                && b.ends_with(ks)
                && a.len() - kt.len() == b.len() - ks.len()
                && a[..a.len() - kt.len()] == b[..b.len() - ks.len()]
        });
        match known {
            Some((_, _, why)) => seen.push(*why),
            None => panic!(
                "{what}: SDP differs from kernel TCP:\n  TCP: {a}\n  SDP: {b}\n--- TCP\n{tcp}--- SDP\n{sdp}--- SDP stderr\n{sdp_err}"
            ),
        }
    }
    seen
}

/// Runs `faults <case>` over TCP and over SDP; asserts exit 0, the same observations (up to
/// [`KNOWN`]), no hang, no leak, and SDP between the pair at the first sync point. Returns
/// the SDP output and the rows read at the later sync points.
fn fault(case: &str) -> (String, Vec<Vec<StatRow>>) {
    let exe = program();
    let what = format!("faults {case}");
    let run = |mode: Mode, rows: &mut Vec<Vec<StatRow>>| {
        let mut c = command(mode, &exe);
        c.arg(case).env_remove("LIBSDP_CONFIG_FILE");
        Synced::spawn(c, &what, T).finish(|_, pgid| {
            if mode == Mode::Preload {
                rows.push(sdp_stat_of_group(pgid));
            }
        })
    };
    let mut none = Vec::new();
    let Outcome {
        code: tc,
        stdout: tout,
        stderr: terr,
    } = run(Mode::Base, &mut none);
    assert_eq!(tc, 0, "{what} over TCP: exit {tc}\n{tout}\n{terr}");
    let mut rows = Vec::new();
    let Outcome {
        code: sc,
        stdout: sout,
        stderr: serr,
    } = run(Mode::Preload, &mut rows);
    assert_eq!(sc, 0, "{what} over SDP: exit {sc}\n{sout}\n{serr}");
    let first = rows
        .first()
        .unwrap_or_else(|| panic!("{what}: never reached SYNC:\n{sout}"));
    assert_offloaded(&what, first, 2);
    for out in [&tout, &sout] {
        for l in out.lines().filter(|l| l.contains("in time=")) {
            assert!(
                l.contains("in time=1"),
                "{what}: a call hung past 10 s: {l}\n{out}"
            );
        }
    }
    if !case.starts_with("fork") {
        assert!(
            sout.lines()
                .any(|l| l == "leaks: fds +0 threads +0 maps +0"),
            "{what}: the survivor leaked over SDP:\n{sout}\n{serr}"
        );
    }
    for why in compare(&what, &tout, &sout, &serr) {
        eprintln!("{what}: known difference from TCP: {why}");
    }
    (sout, rows.split_off(1))
}

fn assert_line(out: &str, want: &str) {
    assert!(
        out.lines().any(|l| l == want),
        "missing line {want:?} in:\n{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// (c) blocked in a receive call when the peer is killed: EOF as over TCP.

#[test]
fn peer_killed_while_blocked_in_read() {
    let (out, _) = fault("read");
    assert_line(&out, "read blocked when the peer was killed: 0 in time=1");
}

#[test]
fn peer_killed_while_blocked_in_recv() {
    let (out, _) = fault("recv");
    assert_line(&out, "recv blocked when the peer was killed: 0 in time=1");
}

#[test]
fn peer_killed_while_blocked_in_recvmsg() {
    let (out, _) = fault("recvmsg");
    assert_line(
        &out,
        "recvmsg blocked when the peer was killed: 0 in time=1",
    );
}

#[test]
fn peer_killed_while_blocked_in_recvfrom() {
    let (out, _) = fault("recvfrom");
    assert_line(
        &out,
        "recvfrom blocked when the peer was killed: 0 in time=1",
    );
}

// (c) blocked in a send call on full buffers.

#[test]
fn peer_killed_while_blocked_in_write() {
    let (out, _) = fault("write");
    assert_line(&out, "write again: -1 EPIPE");
}

#[test]
fn peer_killed_while_blocked_in_send() {
    let (out, _) = fault("send");
    assert_line(&out, "send again: -1 EPIPE");
}

#[test]
fn peer_killed_while_blocked_in_sendmsg() {
    let (out, _) = fault("sendmsg");
    assert_line(&out, "sendmsg again: -1 EPIPE");
}

#[test]
fn peer_killed_while_blocked_in_writev() {
    let (out, _) = fault("writev");
    assert_line(&out, "writev again: -1 EPIPE");
}

// (c) blocked in a readiness wait.

#[test]
fn peer_killed_while_blocked_in_poll_for_input() {
    let (out, _) = fault("poll_in");
    assert_line(
        &out,
        "poll for input when the peer was killed: IN RDHUP in time=1",
    );
}

#[test]
fn peer_killed_while_blocked_in_select_for_input() {
    let (out, _) = fault("select_in");
    assert_line(
        &out,
        "select for input when the peer was killed: IN in time=1",
    );
}

#[test]
fn peer_killed_while_blocked_in_epoll_wait_for_input() {
    let (out, _) = fault("epoll_in");
    assert_line(
        &out,
        "epoll_wait for input when the peer was killed: IN RDHUP in time=1",
    );
}

#[test]
fn peer_killed_while_blocked_in_poll_for_output() {
    let (out, _) = fault("poll_out");
    assert_line(&out, "write: -1 EPIPE");
}

#[test]
fn peer_killed_while_blocked_in_select_for_output() {
    let (out, _) = fault("select_out");
    assert_line(
        &out,
        "select for output when the peer was killed: OUT in time=1",
    );
}

#[test]
fn peer_killed_while_blocked_in_epoll_wait_for_output() {
    let (out, _) = fault("epoll_out");
    assert_line(&out, "write: -1 EPIPE");
}

// (a, c) accept and connect.

#[test]
fn client_killed_right_after_connect_while_server_blocked_in_accept() {
    let (out, _) = fault("accept_client_killed");
    assert_line(&out, "accept of the dying client: ok");
    assert_line(&out, "read at the end: 0");
}

#[test]
fn client_killed_after_writing_before_accept() {
    let (out, _) = fault("accept_client_killed_after_write");
    assert_line(&out, "read at the end: 0");
}

#[test]
fn server_killed_while_the_client_is_pending() {
    let (out, _) = fault("connect_pending_server_killed");
    assert_line(
        &out,
        "read blocked when the server was killed: -1 ECONNRESET in time=1",
    );
}

#[test]
fn server_killed_while_a_connect_is_blocked_on_a_full_backlog() {
    let (out, _) = fault("connect_blocked_server_killed");
    assert_line(
        &out,
        "connect blocked when the server was killed: -1 ECONNREFUSED in time=1",
    );
    assert_line(&out, "queued connection reads: -1 ECONNRESET");
}

// (b) bulk transfers.

#[test]
fn peer_killed_during_a_bulk_send() {
    let (out, _) = fault("bulk_send_killed");
    assert_line(
        &out,
        "writer stopped: ECONNRESET or EPIPE in time=1 moved some=1",
    );
}

#[test]
fn peer_killed_during_a_bulk_receive() {
    let (out, _) = fault("bulk_recv_killed");
    assert_line(&out, "reader stopped: 0 in time=1 moved some=1");
}

// (d) a listener closed with connections not yet accepted.

#[test]
fn listener_closed_with_connections_not_yet_accepted() {
    let (out, _) = fault("listener_closed_with_pending");
    for i in 0..3 {
        assert_line(
            &out,
            &format!("client {i}: poll 1 IN ERR HUP read -1 ECONNRESET"),
        );
    }
}

// (e) forks at awkward moments.

#[test]
fn fork_while_other_threads_send_connect_and_the_progress_thread_serves() {
    let (out, _) = fault("fork_while_busy");
    assert_line(&out, "children that worked and exited cleanly: 20 of 20");
    assert_line(
        &out,
        "stream across the forks: 16777216 bytes intact, 0 corrupt",
    );
}

// (f) exhausted resources: the connections made under the limit are SDP, or TCP with a
// reason; never a crash, never an errno TCP would not give.

fn shm_or_reason(what: &str, rows: &[StatRow], at_least: usize) -> (usize, usize) {
    let c: Vec<&StatRow> = rows.iter().filter(|r| r.is_connection()).collect();
    assert!(
        c.len() >= at_least,
        "{what}: {} connections in sdp stat, want {at_least}:\n{}",
        c.len(),
        libsdp_suite::show_rows(rows)
    );
    for r in &c {
        assert!(
            r.transport == "shm" || !r.fallback_reason.is_empty() && r.fallback_reason != "-",
            "{what}: a TCP connection without a fallback reason:\n{}",
            libsdp_suite::show_rows(rows)
        );
    }
    let shm = c.iter().filter(|r| r.transport == "shm").count();
    eprintln!(
        "{what}: {shm} of {} connections on shm, the rest TCP with reasons: {:?}",
        c.len(),
        c.iter()
            .filter(|r| r.transport != "shm")
            .map(|r| r.fallback_reason.as_str())
            .collect::<Vec<_>>()
    );
    (shm, c.len())
}

#[test]
fn rlimit_nofile_low_connect_and_accept_still_work() {
    let (out, rows) = fault("nofile");
    assert_line(&out, "client, room for 1: socket ok connect 0 echo ok");
    assert_line(&out, "server, room for 1: accept ok echo ok");
    shm_or_reason("nofile", &rows[0], 5);
}

/// A program whose first stream socket comes with no descriptor to spare (RLIMIT_NOFILE):
/// the library cannot read its policy file then, and must try again at the next socket rather
/// than keep the whole process on TCP. `fault_peer nofile` makes a good exchange with room for
/// 0..24 descriptors (its first socket at room 0), against `fault_peer serve`: the steps as
/// over kernel TCP, every connection on shm or TCP with a reason, and some on shm (before the
/// fix: all TCP, reason `policy`).
#[test]
fn first_socket_without_a_spare_descriptor_leaves_sdp_on() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let exe = env!("CARGO_BIN_EXE_fault_peer");
    let mut steps = Vec::new();
    for mode in [Mode::Base, Mode::Preload] {
        let port = free_port().to_string();
        let spawn = |args: &[&str]| {
            let mut c = command(mode, exe);
            c.args(args)
                .env_remove("LIBSDP_CONFIG_FILE")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            let mut child = c.spawn().expect("fault_peer");
            let out = BufReader::new(child.stdout.take().expect("stdout")).lines();
            (child, out)
        };
        let (mut server, mut sout) = spawn(&["serve", "127.0.0.1", &port]);
        assert_eq!(
            sout.next().and_then(Result::ok).as_deref(),
            Some("listening")
        );
        let (mut client, cout) = spawn(&["nofile", "127.0.0.1", &port]);
        let lines: Vec<String> = cout
            .map_while(Result::ok)
            .take_while(|l| l != "held")
            .collect();
        let rows: Vec<StatRow> = libsdp_suite::sdp_stat()
            .into_iter()
            .filter(|r| r.pid == client.id())
            .collect();
        let _ = client.kill();
        let _ = client.wait();
        let _ = server.kill();
        let _ = server.wait();
        if mode == Mode::Preload {
            let all = libsdp_suite::show_rows(&rows);
            // A row per connection from room 5 up at least: with less room even the statistics
            // file may not open (that connection then has no row; it is TCP). Those that did
            // not fit SDP's descriptors are `exhausted`, without addresses.
            assert!(
                rows.len() >= 5
                    && rows.iter().any(|r| r.transport == "shm")
                    && rows.iter().all(|r| r.transport == "shm"
                        || !matches!(r.fallback_reason.as_str(), "" | "-" | "policy")),
                "want 5 to 24 connections, each on shm or TCP with a reason (not the policy), some on shm:\n{all}"
            );
            eprintln!("nofile from the first socket:\n{all}");
        }
        assert_eq!(lines.len(), 25, "{mode:?}: the client's steps: {lines:?}");
        steps.push(lines);
    }
    assert_eq!(
        steps[0], steps[1],
        "the client's steps differ under the preload (right) from kernel TCP (left)"
    );
}

#[test]
fn rlimit_memlock_zero() {
    let (out, rows) = fault("memlock_zero");
    assert_line(&out, "with RLIMIT_MEMLOCK 0: 20 of 20 connections echoed");
    let (shm, _) = shm_or_reason("memlock", &rows[0], 20);
    assert!(
        shm >= 20,
        "memfd rings need no locked memory: all 20 should be SDP"
    );
}

#[test]
fn address_space_nearly_exhausted() {
    let (out, rows) = fault("address_space");
    assert_line(
        &out,
        "with 256 KiB of address space left: 20 of 20 connections echoed, 0 failed",
    );
    shm_or_reason("address space", &rows[0], 20);
}

// ---------------------------------------------------------------------------------------------
// (g) the policy file replaced while programs run.

fn conf_client(conf: &Path, port: u16, rounds: u32) -> Synced {
    let mut c = command(Mode::Preload, program());
    c.args(["client", &port.to_string(), &rounds.to_string()])
        .env("LIBSDP_CONFIG_FILE", conf);
    Synced::spawn(c, "faults client", T)
}

/// Runs a client to its sync point and returns its connection row, then lets it finish.
fn client_row(conf: &Path, port: u16) -> (StatRow, String, String) {
    let mut row = None;
    let Outcome {
        code,
        stdout: out,
        stderr: err,
    } = conf_client(conf, port, 2).finish(|_, pgid| {
        row = sdp_stat_of_group(pgid)
            .into_iter()
            .find(|r| r.is_connection());
    });
    assert_eq!(code, 0, "client: {out}\n{err}");
    assert_line(&out, "round trips: 3 of 3");
    (row.expect("the client's connection in sdp stat"), out, err)
}

#[test]
fn policy_file_replaced_while_programs_run() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let port = free_port();
    let conf = dir.join(format!("faults-{}-{port}.conf", std::process::id()));
    let good = "use both server * *:*\nuse both client * *:*\n";
    std::fs::write(&conf, good).expect("write conf");

    // The echo server: fixed port, reads the policy file once at start.
    let mut server = command(Mode::Preload, "python3");
    server
        .arg("-c")
        .arg(
            "import socket,threading,sys\n\
             l=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             l.bind(('127.0.0.1', int(sys.argv[1]))); l.listen(64)\n\
             def serve(c):\n\
             \x20   while True:\n\
             \x20       b=c.recv(4096)\n\
             \x20       if not b: break\n\
             \x20       c.sendall(b)\n\
             while True:\n\
             \x20   c,_=l.accept(); threading.Thread(target=serve,args=(c,),daemon=True).start()\n",
        )
        .arg(port.to_string())
        .env("LIBSDP_CONFIG_FILE", &conf);
    let mut server = libsdp_suite::Proc::spawn(server, "python3 echo server");
    libsdp_suite::wait_listening(&mut server, port);

    // A long-running client on the good policy: SDP.
    let long = conf_client(&conf, port, 60);
    let mut long_row = None;
    let long = std::thread::spawn(move || {
        let Outcome {
            code,
            stdout: out,
            stderr: err,
        } = long.finish(|_, pgid| {
            long_row = sdp_stat_of_group(pgid)
                .into_iter()
                .find(|r| r.is_connection());
        });
        (code, out, err, long_row)
    });
    std::thread::sleep(Duration::from_millis(300));

    // Rewritten in place with a broken rule: a new program fails open to TCP with a clear
    // error naming the file and line; the running ones keep going.
    std::fs::write(&conf, "use both server * *:*\nuse sdp clinet * *:*\n").expect("rewrite");
    let (row, _, err) = client_row(&conf, port);
    assert_eq!(
        row.transport, "tcp",
        "a broken policy file must fail open to TCP: {row:?}"
    );
    assert!(
        err.contains(&format!("{}:2:", conf.display())),
        "the error must name file:line: {err}"
    );

    // Replaced (rename over it) by a valid `use tcp` file: a new program takes the new rule.
    let tmp = conf.with_extension("new");
    std::fs::write(&tmp, "use tcp client * *:*\nuse both server * *:*\n").expect("write new");
    std::fs::rename(&tmp, &conf).expect("rename over");
    let (row, _, _) = client_row(&conf, port);
    assert_eq!(row.transport, "tcp", "{row:?}");
    assert_eq!(row.fallback_reason, "policy", "{row:?}");

    // Back to the good file: new programs are SDP again, with the same server still running
    // on the rules it read at start.
    std::fs::write(&conf, good).expect("restore");
    let (row, _, _) = client_row(&conf, port);
    assert_eq!(row.transport, "shm", "{row:?}");

    let (code, out, err, long_row) = long.join().expect("long client");
    assert_eq!(code, 0, "long client: {out}\n{err}");
    assert_line(&out, "round trips: 61 of 61");
    let long_row = long_row.expect("the long client's row");
    assert_eq!(long_row.transport, "shm", "{long_row:?}");
    assert!(
        server.running(),
        "the server died when its policy file changed"
    );
    let _ = std::fs::remove_file(&conf);
}
