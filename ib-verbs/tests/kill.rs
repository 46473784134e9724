//! A peer killed with SIGKILL at random points: the survivor sees a typed error, never a hang,
//! and leaks no descriptor. One test in this binary, so the fd count is not disturbed by
//! parallel tests.

mod common;

use std::time::{Duration, Instant};

use common::{connect_peer, fd_count, recv_one, send_blocking};
use ib_verbs::ConnError;

#[test]
fn peer_sigkilled_at_random_points_survivor_sees_peer_closed_no_leak() {
    let before = fd_count();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..12u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mode = if round.is_multiple_of(2) {
            "flood"
        } else {
            "echo"
        };
        let (mut c, mut peer) = connect_peer(mode, &[], None);
        let kill_after = (x % 300) as usize;
        let start = Instant::now();
        let mut i = 0;
        let err = loop {
            if i == kill_after {
                peer.child.kill().unwrap();
                peer.child.wait().unwrap();
            }
            i += 1;
            let r = if mode == "flood" {
                recv_one(&mut c, Duration::from_secs(10)).map(|_| ())
            } else {
                send_blocking(&mut c, &[round as u8; 64], Duration::from_secs(10))
                    .and_then(|()| recv_one(&mut c, Duration::from_secs(10)).map(|_| ()))
            };
            if let Err(e) = r {
                break e;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "survivor hangs");
        };
        assert_eq!(
            err,
            ConnError::PeerClosed,
            "round {round} ({mode}, killed after {kill_after})"
        );
        drop(c);
    }
    assert_eq!(fd_count(), before, "descriptors leaked");
}
