//! Two endpoints over a simulated RC link with a virtual clock: bulk transfers with random
//! sizes, ZCopy, delays, credit starvation, faults, closes and aborts in every state.

mod common;

use common::{Bulk, LinkConfig, Sim};
use sdp_proto::conn::Shutdown;
use sdp_proto::error::{ConnectionError, RecvError, SendError};
use sdp_proto::{Config, StateKind};
use std::time::Instant;

fn cfg() -> Config {
    Config::default()
}

fn small_cfg() -> Config {
    Config {
        recv_buffer_size: 4096 + 16,
        recv_buffers: 4,
        recv_window: 8192,
        send_buffer: 8192,
        ..Config::default()
    }
}

/// 1 GiB in release; debug builds move 64 MiB so `cargo test` stays quick.
const GIB: u64 = 1 << 30;
fn big() -> u64 {
    if cfg!(debug_assertions) {
        64 << 20
    } else {
        GIB
    }
}

#[test]
fn established_bulk_gigabyte_random_sizes_with_zcopy_and_jitter_arrives_intact() {
    let started = Instant::now();
    let mut sim = Sim::connected(
        cfg(),
        cfg(),
        LinkConfig {
            delay: 1_000,
            jitter: 3_000,
        },
        1,
    );
    let mut bulk = Bulk::new(0, big());
    bulk.max_write = 3 << 20;
    bulk.max_read = 1 << 20;
    bulk.zcopy_percent = 30;
    bulk.run(&mut sim);
    assert_eq!(bulk.read, big());
    let stats = sim.sides[0].conn.stats();
    assert!(stats.srcavails_sent > 0, "ZCopy was exercised");
    // Let the last RdmaRdCompl reach the writer.
    sim.run_until_idle(1_000_000);
    let stats = sim.sides[0].conn.stats();
    // Every stream byte went either inside a message (BCopy, SrcAvail inline) or by RDMA read
    // (ZCopy), and the reader counted the RDMA-read ones as the writer did.
    let rx = sim.sides[1].conn.stats();
    assert!(stats.zcopy_bytes_sent > 0, "{stats:?}");
    assert_eq!(stats.zcopy_bytes_sent, rx.zcopy_bytes_received);
    assert_eq!(stats.bytes_sent + stats.zcopy_bytes_sent, big());
    assert_eq!(rx.bytes_received, big());
    let elapsed = started.elapsed();
    eprintln!(
        "moved {} MiB in {:?} ({} messages, {} SrcAvail, virtual {} ms)",
        big() >> 20,
        elapsed,
        stats.messages_sent,
        stats.srcavails_sent,
        sim.now / 1_000_000
    );
    if !cfg!(debug_assertions) {
        assert!(elapsed.as_secs() < 60, "1 GiB took {elapsed:?}");
    }
}

/// Runs two opposite transfers side by side to their end; panics on a stall.
fn both_ways(sim: &mut Sim, ab: &mut Bulk, ba: &mut Bulk) {
    let mut rounds = 0;
    while !(ab.done() && ba.done()) {
        ab.act(sim);
        ba.act(sim);
        sim.step();
        rounds += 1;
        assert!(rounds < 5_000_000, "stalled");
    }
}

#[test]
fn established_bidirectional_small_buffers_both_streams_intact() {
    let mut sim = Sim::connected(
        small_cfg(),
        small_cfg(),
        LinkConfig {
            delay: 500,
            jitter: 2_000,
        },
        2,
    );
    let mut ab = Bulk::new(0, 3 << 20);
    let mut ba = Bulk::new(1, 3 << 20);
    ab.max_write = 10_000;
    ba.max_write = 7_000;
    ab.max_read = 3_000;
    ba.max_read = 9_000;
    both_ways(&mut sim, &mut ab, &mut ba);
}

/// A host that posts Data straight from the application's buffer (`send_through`) and leaves
/// payloads in its receive buffers until the application reads them
/// (`handle_message_deferred`, and now and then `undefer`), alongside the copying forms:
/// both streams arrive intact, and both one-copy paths carried bytes each way.
#[test]
fn established_one_copy_paths_carry_both_streams_intact() {
    let mut sim = Sim::connected(cfg(), cfg(), LinkConfig::default(), 3);
    let mut ab = Bulk::new(0, 8 << 20);
    let mut ba = Bulk::new(1, 8 << 20);
    ab.max_write = 200_000;
    ba.max_read = 5_000;
    both_ways(&mut sim, &mut ab, &mut ba);
    for side in 0..2 {
        let s = sim.sides[side].conn.stats();
        assert!(
            s.direct_bytes_sent > 0 && s.direct_bytes_received > 0,
            "side {side}: {} bytes sent and {} read by the one-copy paths",
            s.direct_bytes_sent,
            s.direct_bytes_received
        );
        assert!(s.direct_bytes_sent < s.bytes_sent && s.direct_bytes_received < s.bytes_received);
    }
}

#[test]
fn established_slow_reader_credit_starvation_recovers() {
    let mut sim = Sim::connected(small_cfg(), small_cfg(), LinkConfig::default(), 3);
    let data = vec![7u8; 100_000];
    let mut sent = 0;
    // Fill until the sender blocks: the reader reads nothing.
    for _ in 0..1000 {
        match sim.send(0, &data[sent..]) {
            Ok(n) => sent += n,
            Err(SendError::WouldBlock) => {}
            Err(e) => panic!("{e:?}"),
        }
        sim.pump();
        if !sim.step() {
            break;
        }
    }
    assert!(sent < data.len(), "sender must be blocked by the window");
    // Receiver holds no more than its window plus the two control buffers' worth.
    let held = sim.sides[1].conn.recv_available();
    assert!(held <= 8192 + 2 * 4096, "held {held}");
    assert!(!sim.sides[0].conn.readiness().writable);
    // Now read everything; the sender must resume until all arrives.
    let mut got = 0;
    let mut buf = vec![0u8; 5000];
    for _ in 0..100_000 {
        if let Ok(n) = sim.sides[1].recv(sim.ts(), &mut buf, false) {
            got += n;
        }
        if sent < data.len()
            && let Ok(n) = sim.send(0, &data[sent..])
        {
            sent += n;
        }
        sim.pump();
        sim.step();
        if got == data.len() {
            break;
        }
    }
    assert_eq!(got, data.len());
}

#[test]
fn established_peer_cannot_rdma_read_falls_back_to_bcopy() {
    let mut sim = Sim::connected(cfg(), cfg(), LinkConfig::default(), 4);
    sim.sides[1].rdma_read_fails = true;
    let mut bulk = Bulk::new(0, 8 << 20);
    bulk.max_write = 2 << 20;
    bulk.zcopy_percent = 100;
    bulk.run(&mut sim);
    assert!(
        sim.sides[0]
            .zcopy_finished
            .iter()
            .any(|(_, _, completed)| !completed)
    );
}

#[test]
fn established_zcopy_disabled_at_receiver_answers_sendsm_and_stream_survives() {
    let mut sim = Sim::connected(
        cfg(),
        Config {
            zcopy_recv: false,
            ..cfg()
        },
        LinkConfig::default(),
        5,
    );
    let mut bulk = Bulk::new(0, 6 << 20);
    bulk.max_write = 2 << 20;
    bulk.zcopy_percent = 100;
    bulk.run(&mut sim);
    assert!(!sim.sides[0].zcopy_finished.is_empty());
    assert!(
        sim.sides[0]
            .zcopy_finished
            .iter()
            .all(|(_, _, completed)| !completed)
    );
}

#[test]
fn established_reader_idle_srcavail_cancelled_after_timeout_then_bcopy() {
    let mut sim = Sim::connected(
        cfg(),
        Config {
            recv_window: 64 * 1024,
            ..cfg()
        },
        LinkConfig::default(),
        6,
    );
    let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    sim.send_zcopy(0, &data).unwrap();
    sim.pump();
    // The reader does not read for 2 virtual seconds: the window blocks RDMA reads, the
    // source cancels after 1 s, the sink answers RdmaRdCompl + SendSM.
    let deadline = sim.now + 2_000_000_000;
    while sim.now < deadline && sim.step() {}
    let fin = sim.sides[0].zcopy_finished.clone();
    assert_eq!(fin.len(), 1);
    let (_, sent, completed) = fin[0];
    assert!(!completed);
    // The host resends the remainder by BCopy; the reader now reads it all in order.
    let mut rest = &data[sent as usize..];
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while out.len() < data.len() {
        if !rest.is_empty()
            && let Ok(n) = sim.send(0, rest)
        {
            rest = &rest[n..];
        }
        if let Ok(n) = sim.sides[1].recv(sim.ts(), &mut buf, false) {
            out.extend_from_slice(&buf[..n]);
        }
        sim.pump();
        sim.step();
    }
    assert!(out == data);
}

#[test]
fn established_graceful_close_both_sides_reach_closed_without_error() {
    let mut sim = Sim::connected(cfg(), cfg(), LinkConfig::default(), 7);
    sim.send(0, b"last words").unwrap();
    sim.sides[0]
        .conn
        .shutdown(sim.ts(), Shutdown::Write)
        .unwrap();
    sim.pump();
    sim.run_until_idle(1000);
    assert_eq!(sim.sides[1].conn.state(), StateKind::CloseWait);
    let mut buf = [0u8; 64];
    assert_eq!(sim.sides[1].recv(sim.ts(), &mut buf, false), Ok(10));
    assert_eq!(sim.sides[1].recv(sim.ts(), &mut buf, false), Ok(0));
    // Half-close: the passive side can still send.
    sim.send(1, b"reply").unwrap();
    sim.sides[1].conn.close(sim.ts());
    sim.pump();
    sim.run_until_idle(1000);
    assert_eq!(sim.sides[0].recv(sim.ts(), &mut buf, false), Ok(5));
    assert_eq!(sim.sides[0].conn.state(), StateKind::Closed);
    assert_eq!(sim.sides[1].conn.state(), StateKind::Closed);
    assert_eq!(sim.sides[0].closed, Some(None));
    assert_eq!(sim.sides[1].closed, Some(None));
}

#[test]
fn established_simultaneous_close_both_reach_closed_without_error() {
    let mut sim = Sim::connected(
        cfg(),
        cfg(),
        LinkConfig {
            delay: 10_000,
            jitter: 0,
        },
        8,
    );
    sim.sides[0]
        .conn
        .shutdown(sim.ts(), Shutdown::Write)
        .unwrap();
    sim.sides[1]
        .conn
        .shutdown(sim.ts(), Shutdown::Write)
        .unwrap();
    sim.pump();
    sim.run_until_idle(1000);
    assert_eq!(sim.sides[0].closed, Some(None));
    assert_eq!(sim.sides[1].closed, Some(None));
}

#[test]
fn established_completion_error_flushes_and_peer_sees_reset() {
    let mut sim = Sim::connected(cfg(), cfg(), LinkConfig::default(), 9);
    let mut bulk = Bulk::new(0, 1 << 40);
    for _ in 0..50 {
        bulk.act(&mut sim);
        sim.step();
    }
    sim.fail_qp(0);
    sim.run_until_idle(1000);
    assert!(matches!(
        sim.sides[0].closed,
        Some(Some(ConnectionError::Transport(_)))
    ));
    assert_eq!(
        sim.sides[1].closed,
        Some(Some(ConnectionError::Reset {
            after_peer_disconn: false
        }))
    );
    let mut buf = [0u8; 16];
    // Bytes that had arrived are still readable, then the error.
    while let Ok(n) = sim.sides[1].recv(sim.ts(), &mut buf, false) {
        assert!(n > 0);
    }
    assert!(matches!(
        sim.sides[1].recv(sim.ts(), &mut buf, false),
        Err(RecvError::Closed(_))
    ));
    assert!(sim.sides[1].conn.readiness().error);
}

/// Abort at each point of the close sequence; both ends must end closed, no panic.
#[test]
fn every_state_abort_both_sides_end_closed() {
    type Setup = fn(&mut Sim);
    let setups: [(StateKind, Setup); 5] = [
        (StateKind::Established, |_| {}),
        (StateKind::FinWait1, |s| {
            s.sides[0].conn.shutdown(s.ts(), Shutdown::Write).unwrap();
        }),
        (StateKind::CloseWait, |s| {
            s.sides[1].conn.shutdown(s.ts(), Shutdown::Write).unwrap();
            s.pump();
            s.run_until_idle(100);
        }),
        (StateKind::LastAck, |s| {
            s.sides[1].conn.shutdown(s.ts(), Shutdown::Write).unwrap();
            s.pump();
            s.run_until_idle(100);
            s.sides[0].conn.shutdown(s.ts(), Shutdown::Write).unwrap();
        }),
        (StateKind::TimeWait, |s| {
            // Our DisConn first, then the peer's arrives: 0 goes to TIME_WAIT.
            s.sides[0].conn.shutdown(s.ts(), Shutdown::Write).unwrap();
            s.pump();
            s.run_until_idle(100);
            s.sides[1].conn.shutdown(s.ts(), Shutdown::Write).unwrap();
            s.pump();
            while s.sides[0].conn.state() != StateKind::TimeWait && s.step() {}
        }),
    ];
    for (want, setup) in setups {
        let mut sim = Sim::connected(
            cfg(),
            cfg(),
            LinkConfig {
                delay: 5_000,
                jitter: 0,
            },
            10,
        );
        setup(&mut sim);
        assert_eq!(sim.sides[0].conn.state(), want);
        sim.sides[0].conn.abort(sim.ts());
        sim.pump();
        sim.run_until_idle(1000);
        assert!(sim.sides[0].conn.is_closed(), "{want:?}");
        assert!(
            sim.sides[1].conn.is_closed(),
            "{want:?}: peer {:?}",
            sim.sides[1].conn.state()
        );
    }
}

#[test]
fn established_orphan_close_delivers_queued_bytes() {
    let mut sim = Sim::connected(small_cfg(), small_cfg(), LinkConfig::default(), 11);
    let data = vec![42u8; 8000];
    let n = sim.send(0, &data).unwrap();
    sim.sides[0].conn.close(sim.ts());
    let mut got = 0;
    let mut buf = vec![0u8; 1000];
    for _ in 0..10_000 {
        match sim.sides[1].recv(sim.ts(), &mut buf, false) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(_) => {}
        }
        sim.pump();
        sim.step();
    }
    assert_eq!(got, n);
}

#[test]
fn fin_wait_orphan_peer_silent_times_out_abortively() {
    let mut sim = Sim::connected(cfg(), cfg(), LinkConfig::default(), 12);
    sim.sides[0].conn.close(sim.ts());
    sim.pump();
    // The peer never closes; after 60 virtual seconds the orphan gives up.
    sim.run_until_idle(10_000);
    assert_eq!(
        sim.sides[0].closed,
        Some(Some(ConnectionError::TimedOut(
            sdp_proto::conn::Timer::FinWait
        )))
    );
    assert!(sim.sides[1].conn.is_closed());
}

#[test]
fn established_urgent_bytes_arrive_at_their_marks() {
    let mut sim = Sim::connected(cfg(), cfg(), LinkConfig::default(), 13);
    sim.send(0, b"hello").unwrap();
    sim.sides[0].conn.send_urgent(sim.ts(), b"!").unwrap();
    sim.send(0, b"world").unwrap();
    sim.pump();
    sim.run_until_idle(100);
    let c = &mut sim.sides[1].conn;
    assert!(c.readiness().urgent);
    let mut buf = [0u8; 64];
    assert_eq!(c.recv(sdp_proto::Timestamp::ZERO, &mut buf, false), Ok(5));
    assert!(c.at_mark());
    assert_eq!(c.recv_urgent(sdp_proto::Timestamp::ZERO, false), Ok(b'!'));
    assert_eq!(c.recv(sdp_proto::Timestamp::ZERO, &mut buf, false), Ok(5));
    assert_eq!(&buf[..5], b"world");
    assert!(sim.sides[1].urgent_events >= 1);
}

#[test]
fn established_keepalive_idle_emits_probe() {
    let c = Config {
        keepalive: Some(std::time::Duration::from_secs(10)),
        ..cfg()
    };
    let mut sim = Sim::connected(c.clone(), c, LinkConfig::default(), 14);
    let end = sim.now + 35_000_000_000;
    while sim.now < end && sim.step() {}
    assert!(sim.sides[0].keepalive_probes >= 2);
}

#[test]
fn established_resize_granted_after_old_buffers_drain() {
    let grow = Config {
        allow_recv_resize: true,
        max_recv_buffer_size: 65536 + 16,
        ..small_cfg()
    };
    let mut sim = Sim::connected(small_cfg(), grow, LinkConfig::default(), 15);
    assert_eq!(sim.sides[0].conn.send_goal(), 4096);
    sim.sides[0]
        .conn
        .request_peer_buffer_size(sim.ts(), 16384)
        .unwrap();
    let mut bulk = Bulk::new(0, 2 << 20);
    bulk.run(&mut sim);
    assert_eq!(sim.sides[0].conn.send_goal(), 16384 - 16);
    assert_eq!(sim.sides[1].conn.recv_buffer_size(), 16384 + 16);
}
