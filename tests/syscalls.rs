//! System-call semantics real programs rely on, checked with small C programs compiled
//! at test time: non-blocking connect with epoll, a socket above fd 1024 through
//! poll/ppoll/epoll, and signals interrupting blocking calls (EINTR, SA_RESTART,
//! SO_RCVTIMEO). Each program prints what it observed; both runs must print the same.

use std::path::Path;
use std::time::Duration;

use libsdp_suite::{command, compile_c, run, same_in_both_modes};

fn run_c(name: &str) -> libsdp_suite::Outcome {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(name);
    let exe = compile_c(&src, Path::new(env!("CARGO_TARGET_TMPDIR")));
    let out = same_in_both_modes(name, |mode| {
        run(command(mode, &exe), name, Duration::from_secs(30))
    });
    assert_eq!(out.code, 0, "{name}: {out:?}");
    out
}

#[test]
fn nonblocking_connect_with_epoll_reports_progress_data_and_refusal() {
    let out = run_c("epoll_connect.c");
    for want in [
        "SO_ERROR: 0",
        "server got: ping",
        "client: IN RDHUP",
        "client got: pong",
        "client then: 0",
        "SO_ERROR: ECONNREFUSED",
    ] {
        assert!(
            out.stdout.contains(want),
            "missing {want:?} in\n{}",
            out.stdout
        );
    }
}

#[test]
fn socket_at_fd_1500_works_with_poll_ppoll_and_epoll() {
    let out = run_c("poll_high_fd.c");
    assert_eq!(
        out.stdout,
        "F_GETFD: 0\npoll idle: 1 OUT\npoll after write: 1 IN\nppoll: 1 IN\n\
         epoll: 1 fd=1500 IN\nread: data\npeer got: back\npeer after close: 0\n\
         fcntl after close: -1 EBADF\n"
    );
}

#[test]
fn blocking_calls_get_eintr_without_sa_restart_and_restart_with_it() {
    let out = run_c("signals.c");
    assert_eq!(
        out.stdout,
        "accept: -1 EINTR hits=1\nrecv: -1 EINTR hits=1\nread: -1 EINTR hits=1\n\
         recv SA_RESTART: 4 late hits=1\nrecv SO_RCVTIMEO: -1 EAGAIN\nrecv after peer close: 0\n"
    );
}
