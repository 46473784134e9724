//! Node.js over SDP. Node's `net` runs on libuv: an epoll loop over non-blocking sockets, and
//! every descriptor closed with a raw `syscall(SYS_close)` rather than `close`. The script
//! (`tests/js/net_echo.js`) runs both ends of several connections in one process, one after
//! another: echoes of 1 byte to 5.5 MiB with half-closes from both sides and a paused reader,
//! a client that destroys its socket, and a last echo held at SYNC while the test reads
//! `sdp stat`. It must print the same over kernel TCP and under the preload, and the preloaded
//! run's connections must be on `shm` with bytes counted.
//!
//! Until 2026-11-26 the library never saw libuv's closes: the second connection of a process
//! read an end of stream its peer never sent (the numbers still named the first connection),
//! a destroyed client's server never heard of it, and a process that ran a child
//! (`execSync`) with such stale numbers aborted in libuv's signal handling.

use std::path::Path;
use std::time::Duration;

use libsdp_suite::{Mode, Synced, assert_offloaded, command, require_tool, sdp_stat_of_group};

const T: Duration = Duration::from_secs(90);

#[test]
fn node_net_echoes_and_closes_over_sdp_as_over_tcp() {
    let node = require_tool("node", "nodejs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/net_echo.js");
    let run = |mode: Mode| {
        let mut rows = None;
        let mut c = command(mode, &node);
        c.arg(&script);
        let out = Synced::spawn(c, "node net_echo.js", T).finish(|_, pgid| {
            if mode == Mode::Preload {
                rows = Some(sdp_stat_of_group(pgid));
            }
        });
        (out, rows)
    };
    let (tcp, _) = run(Mode::Base);
    let (sdp, rows) = run(Mode::Preload);
    assert_eq!(tcp.code, 0, "over TCP: {tcp:?}");
    assert_eq!(
        (tcp.code, &tcp.stdout),
        (sdp.code, &sdp.stdout),
        "node under the preload (right) differs from kernel TCP (left); stderr:\n{}",
        sdp.stderr
    );
    for total in [1, 100000, 5544698, 70000, 3000000] {
        let want = format!(
            "echo of {total}: same bytes true, then \"BYE\"; client all echoed, server end, \
             server close, client end"
        );
        assert!(
            tcp.stdout.lines().any(|l| l == want),
            "missing {want:?} in:\n{}",
            tcp.stdout
        );
    }
    assert!(tcp.stdout.contains("destroyed client: server closes"));
    let rows = rows.expect("the preloaded run reached SYNC");
    assert_offloaded("node net_echo.js", &rows, 2);
}
