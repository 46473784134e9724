//! Lifetime across fork and exec over SDP: cases a review once found broken (a forked child
//! taking a connection over, an exec'd program stealing a socket it ignores, children hanging
//! in `_exit`, leaked descriptors). Each runs under the preload with the default policy and
//! must show its connection on shm in `sdp stat` while it runs.

use std::path::Path;
use std::process::Command;

use libsdp_suite::{libsdp_so, sdp_tool};

fn run_case(case: &str) -> String {
    let stdout = run_case_anywhere(case);
    assert!(
        stdout.contains("shm: True"),
        "{case}: the connection was not on shm:\n{stdout}"
    );
    stdout
}

/// As [`run_case`], for a case about a connection that must end up on TCP.
fn run_case_anywhere(case: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/lifetime.py");
    let out = Command::new("timeout")
        .arg("60")
        .arg("python3")
        .arg(&script)
        .arg(sdp_tool())
        .arg(case)
        .env("LD_PRELOAD", libsdp_so())
        .env_remove("LIBSDP_CONFIG_FILE")
        .env_remove("SIMPLE_LIBSDP")
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{case}: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Asserts that `out` holds every one of `lines`.
fn assert_lines(out: &str, lines: &[&str]) {
    for line in lines {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

#[test]
fn idle_fork_child_does_not_take_the_connection() {
    let out = run_case("idle-fork-child");
    assert!(
        out.contains("received all: True pattern intact: True"),
        "{out}"
    );
}

#[test]
fn execd_program_ignoring_an_inherited_socket_leaves_it_to_the_parent() {
    let out = run_case("exec-unrelated");
    assert!(out.contains("ping-pongs ok: 200"), "{out}");
}

#[test]
fn forking_while_another_thread_uses_a_connection_never_hangs_a_child() {
    let out = run_case("fork-while-busy");
    assert!(out.contains("hung children: 0"), "{out}");
}

#[test]
fn closed_connections_leave_no_descriptors() {
    let out = run_case("no-fd-leak");
    assert!(out.contains("fds grew by: 0"), "{out}");
}

/// A fork child that only waits in an epoll set (its own, made after the fork) watching the
/// connection leaves the connection to the parent reading from it: its spin's look at the
/// set's rings used to progress the connection, consuming the parent's messages and claiming
/// it, and the parent's next receive failed with EIO.
#[test]
fn fork_child_waiting_in_an_epoll_set_leaves_the_connection_to_the_parent() {
    let out = run_case("fork-child-waits-in-epoll");
    assert!(out.contains("reader error: none"), "{out}");
    assert!(
        out.contains("received all: True pattern intact: True"),
        "{out}"
    );
}

/// A parent that goes on using a connection after a fork keeps it, and its child's later send
/// fails with EIO, as documented: the child's send used to succeed on the ring positions it
/// copied at the fork, and its bytes were lost without an error.
#[test]
fn a_child_sending_after_its_parent_used_the_connection_gets_eio() {
    let out = run_case("parent-uses-then-child");
    assert!(out.contains("parent's bytes: b'parent'"), "{out}");
    assert!(out.contains("child's send: EIO"), "{out}");
    assert!(out.contains("parent's bytes after: b'again'"), "{out}");
}

/// An EPOLLONESHOT registration that fired while its connection was pending stays disarmed
/// when the connection goes back to TCP and the registration moves to the kernel socket: the
/// move used to re-arm it (a second worker of a one-shot server would get the fd the first
/// still serves).
#[test]
fn a_fired_oneshot_registration_stays_disarmed_across_the_fallback_to_tcp() {
    let out = run_case_anywhere("oneshot-across-fallback");
    assert_lines(
        &out,
        &[
            "first event: True",
            "back on tcp: True",
            "events while disarmed: []",
            "re-armed: True b'hi\\n'",
        ],
    );
}

/// A fork child that writes through stdio on an inherited connection it never used
/// otherwise, and exits, delivers its bytes: when its parent closed its copy right after the
/// fork (the bytes used to stay in the bell end, with nobody serving the connection to read
/// them: `setup::adopt_vacant`), also from a `printf` to a socket made its stdout, which the
/// C library flushes after the library's exit handler, and when the parent kept it and goes on
/// using it.
#[test]
fn a_fork_childs_stdio_bytes_arrive_whether_its_parent_closed_or_kept_the_connection() {
    let out = run_case("stdio-child");
    assert_lines(
        &out,
        &[
            "parent closed: got b'hello from the child\\n' then end of stream: True",
            "parent closed, printf: got b'hello from the child\\n' then end of stream: True",
            "parent kept: got b'hello from the child\\n' then the parent's: b'parent'",
        ],
    );
}

/// A receive blocked on a connection that another thread closes, whose fd number a pipe
/// takes next, fails with EBADF when the peer's bytes come: it used to go on with the number
/// and read the pipe's bytes. A send blocked on a peer that does not read, whose socket another
/// thread closes, ends with EBADF when the peer reads, and the peer gets every byte written
/// before the close (the close lingers with them), then end of stream.
#[test]
fn a_receive_blocked_on_a_socket_another_thread_closes_never_reads_the_next_file() {
    let out = run_case("closed-under-a-blocked-receive");
    assert_lines(
        &out,
        &[
            "the pipe took the number: True",
            "blocked receive: ['EBADF'] still blocked: False",
            "the pipe kept its bytes: b'pipe bytes'",
            "blocked send: ['EBADF'] the peer got what was written: True",
        ],
    );
}

/// Eight megabytes written through a stdio stream on an SDP socket arrive whole, to a reader
/// that keeps up and to one that falls behind (`hooks::stdio`): its bytes used to share the
/// bell end with the library's stuffing, and hundreds of kilobytes were lost.
#[test]
fn a_large_write_through_a_stdio_stream_arrives_whole() {
    let out = run_case("stdio-stream-big");
    assert_lines(
        &out,
        &[
            "fast reader: got 8388608 of 8388608 intact: True fileno names the socket: [True]",
            "slow reader: got 8388608 of 8388608 intact: True fileno names the socket: [True]",
        ],
    );
}

/// Short connections between the same two processes run on the ring of the connection before
/// (`ib_verbs::shm::reuse`): both processes count the rings they took back, and every reply
/// is whole although the server left bytes unread in the ring of every third, and when four
/// client threads make their connections at once.
#[test]
fn short_connections_between_two_processes_reuse_their_rings() {
    let out = run_case("short-connections-reuse-rings");
    assert!(out.contains("replies whole: 100 of 100"), "{out}");
    assert!(
        out.contains("concurrent replies whole: 100 of 100"),
        "{out}"
    );
    let reused = |who: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{who} rings reused: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {who} count:\n{out}"))
    };
    // Not every one: a server whose close still lingers, or a client whose close came after
    // the next Answer, makes a new ring.
    assert!(reused("client") >= 50, "{out}");
    assert!(reused("server") >= 50, "{out}");
}

#[test]
fn a_half_closed_connection_costs_no_cpu_while_idle() {
    let out = run_case("idle-after-half-close");
    assert!(
        out.contains("server got: b'request' then end of stream"),
        "{out}"
    );
    assert!(out.contains("peer got: b'reply'"), "{out}");
    assert!(out.contains("idle cpu: server low peer low"), "{out}");
}

#[test]
fn reuseport_listeners_in_two_processes_keep_every_connection_going() {
    let out = run_case("reuseport");
    assert!(out.contains("served by both: True"), "{out}");
    // Those the beacon's owner accepted are SDP; the others TCP with the reason given when
    // the other process told the client so (a client left to its pending timeout would say
    // setup-failed, two seconds late).
    assert!(
        out.contains("client connections: 24 ways: [('shm', '-'), ('tcp', 'peer-declined')]"),
        "{out}"
    );
}

#[test]
fn a_connection_passed_to_another_process_is_served_there() {
    let out = run_case("pass-fd");
    assert!(out.contains("client got: b'worker: first'"), "{out}");
    assert!(out.contains("client got: b'worker: second'"), "{out}");
    assert!(out.contains("then: b''"), "{out}");
}

#[test]
fn a_python_subprocess_gets_the_socket_as_its_stdin_and_stdout() {
    let out = run_case("subprocess-stdio");
    assert_lines(
        &out,
        &[
            "subprocess rc: 0 client got: b'one\\n'",
            "posix_spawn status: 0 client got: b'two\\n'",
            "pass_fds rc: 0 client got: b'three'",
            "then: [b'', b'', b'']",
        ],
    );
}

#[test]
fn a_parent_using_a_connection_after_its_childs_program_did_fails_instead_of_losing_bytes() {
    let out = run_case("parent-after-child-exec");
    assert!(out.contains("client got: b'q\\n'"), "{out}");
    assert!(
        out.contains("parent send: Input/output error"),
        "the stale parent's send must fail with EIO:\n{out}"
    );
}

/// A connection is relayed once: a second program the parent starts on it reads end of
/// stream and gets EPIPE for its answer. Until 2026-11-26 its `sendall` succeeded and the
/// answer was dropped by a relay that could not serve the connection.
#[test]
fn a_second_program_on_a_relayed_connection_gets_an_error_not_silent_loss() {
    let out = run_case("second-program-on-a-relayed-connection");
    assert_lines(
        &out,
        &[
            "program 0: b'request0' sent | client got b'answer'",
            "program 1: b'' BrokenPipeError | client got TimeoutError",
        ],
    );
}

#[test]
fn a_program_execd_on_an_inherited_listener_neither_stalls_nor_stays_off_sdp() {
    let out = run_case("inherited-listener");
    assert_lines(
        &out,
        &[
            "the listener's maker keeps it: True slowest under 0.5 s: True over shm after the first: [False, False]",
            "the listener's maker keeps it: False slowest under 0.5 s: True over shm after the first: [True, True]",
        ],
    );
}

/// A pending connection goes back to TCP (the server is a program without the preload on an
/// inherited listener) after its client wrote: a blocking client blocked on the full pending
/// buffer wakes, a non-blocking one with a small send buffer loses nothing, a shutdown made
/// while pending reaches the server; every byte arrives once. And a client that replaces the
/// fd of such a connection (dup2) ends it.
#[test]
fn writes_and_shutdowns_made_while_pending_reach_a_tcp_server_once() {
    let out = run_case_anywhere("fallback-while-writing");
    assert_lines(
        &out,
        &[
            "tcp: True",
            "blocked writer: the server got every byte once: True",
            "non-blocking writer: the server got every byte once: True",
            "shutdown while pending: the server got every byte once: True",
            "fd replaced after the fallback: the server read end of stream: True",
        ],
    );
}

#[test]
fn a_relayed_connection_still_names_its_tcp_addresses() {
    let out = run_case("relayed-names");
    assert_lines(
        &out,
        &[
            "exec'd program sees the TCP names: True",
            "spawned program sees the TCP names: True",
            "the sender's socket still names the TCP connection: True",
        ],
    );
}

#[test]
fn a_cgi_style_parent_shuts_down_after_its_childs_program_answered_without_an_error() {
    let out = run_case("cgi");
    assert!(
        out.contains("every response whole: True library log lines: 0"),
        "{out}"
    );
}

#[test]
fn passed_connections_leave_no_descriptor_behind_once_closed() {
    let out = run_case("passed-then-closed-leaves-nothing");
    assert!(
        out.contains("descriptors back to where they were: True"),
        "{out}"
    );
}

#[test]
fn a_program_that_answers_and_exits_with_input_unread_still_delivers_its_answer() {
    let out = run_case("answer-then-exit-unread");
    assert!(
        out.contains("writer failed: True reader got: b'zzzzzzzzzz'"),
        "{out}"
    );
}
