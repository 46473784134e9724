//! Property tests: wire round trips, arbitrary bytes never panic the parsers, and for
//! arbitrary interleavings of application calls and link events the bytes received equal
//! the bytes sent (urgent bytes included, at their marks), credits never let a message land
//! without a posted buffer or overrun one (the simulation asserts both on every delivery),
//! and readiness agrees with a model and with what the calls do.

mod common;

use common::{LinkConfig, Sim, pattern_fill};
use proptest::prelude::*;
use sdp_proto::conn::Shutdown;
use sdp_proto::error::{RecvError, SendError};
use sdp_proto::wire::*;
use sdp_proto::{Config, StateKind};

fn cases(release: u32, debug: u32) -> ProptestConfig {
    ProptestConfig {
        cases: if cfg!(debug_assertions) {
            debug
        } else {
            release
        },
        ..ProptestConfig::default()
    }
}

fn body_strategy() -> impl Strategy<Value = (u8, u32, u32, u64, Vec<u8>, u8)> {
    (
        any::<u8>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..64),
        0u8..6,
    )
}

fn make_body<'a>(kind: u8, a: u32, b: u32, c: u64, payload: &'a [u8], mode: u8) -> Body<'a> {
    let half = if mode >= 3 {
        ModeHalf::Send
    } else {
        ModeHalf::Receive
    };
    let tm = [
        TransferMode::Buffered,
        TransferMode::Combined,
        TransferMode::Pipelined,
    ][(mode % 3) as usize];
    match kind % 19 {
        0 => Body::DisConn,
        1 => Body::AbortConn,
        2 => Body::SendSm,
        3 => Body::RdmaWrCompl(RdmaComplRepr { len: a }),
        4 => Body::RdmaRdCompl(RdmaComplRepr { len: a }),
        5 => Body::ModeChange(ModeChangeRepr { half, mode: tm }),
        6 => Body::SrcAvailCancel,
        7 => Body::SinkAvailCancel,
        8 => Body::SinkCancelAck,
        9 => Body::ChRcvBuf(ChRcvBufRepr { size: a }),
        10 => Body::ChRcvBufAck(ChRcvBufRepr { size: b }),
        11 => Body::SuspComm(SuspCommRepr { service_id: c }),
        12 => Body::SuspCommAck,
        13 => Body::SinkAvail {
            header: SinkAvailRepr {
                len: a,
                rkey: b,
                vaddr: c,
                non_discards: a ^ b,
            },
            payload,
        },
        14 => Body::SrcAvail {
            header: SrcAvailRepr {
                len: a,
                rkey: b,
                vaddr: c,
            },
            payload,
        },
        15 | 16 => Body::Data(payload),
        _ => Body::Unknown {
            mid: 0x10 + (a % 0xE0) as u8,
            rest: payload,
        },
    }
}

proptest! {
    #![proptest_config(cases(5000, 1000))]

    #[test]
    fn wire_message_parse_emit_round_trips(
        (kind, a, b, c, payload, mode) in body_strategy(),
        flags in any::<u8>(), bufs in any::<u16>(), mseq in any::<u32>(), ack in any::<u32>(),
    ) {
        let body = make_body(kind, a, b, c, &payload, mode);
        let m = MessageRepr::new(Flags(flags), bufs, mseq, ack, body);
        let bytes = m.to_vec();
        prop_assert_eq!(bytes.len(), m.buffer_len());
        prop_assert_eq!(MessageRepr::parse(&bytes).unwrap(), m);
    }

    #[test]
    fn wire_arbitrary_bytes_never_panic_and_reparse_stably(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(m) = MessageRepr::parse(&bytes) {
            let again = m.to_vec();
            prop_assert_eq!(again.len(), bytes.len());
            prop_assert_eq!(MessageRepr::parse(&again).unwrap(), m);
        }
        let _ = HelloRepr::parse_bytes(&bytes);
        let _ = HelloAckRepr::parse_bytes(&bytes);
    }

    #[test]
    fn wire_hello_round_trips(
        bufs in any::<u16>(), ver in any::<u8>(), cap in 0u8..16, adv in any::<u8>(),
        des in any::<u32>(), local in any::<u32>(), port in any::<u16>(), v6 in any::<bool>(),
        s in any::<[u8; 16]>(), d in any::<[u8; 16]>(), ext in any::<u16>(),
    ) {
        let addrs = if v6 {
            IpAddrs::V6 { src: s.into(), dst: d.into() }
        } else {
            IpAddrs::V4 { src: [s[0], s[1], s[2], s[3]].into(), dst: [d[0], d[1], d[2], d[3]].into() }
        };
        let h = HelloRepr { bufs, version: Version(ver), cap, max_adverts: adv, des_rem_rcv_sz: des,
            local_rcv_sz: local, local_port: port, addrs, ext_max_adverts: ext };
        let bytes = h.to_bytes();
        prop_assert_eq!(HelloRepr::parse_bytes(&bytes).unwrap(), h);
        let ack = HelloAckRepr { bufs, version: Version(ver), ipv_cap: cap, max_adverts: adv, act_rcv_sz: des };
        prop_assert_eq!(HelloAckRepr::parse_bytes(&ack.to_bytes()).unwrap(), ack);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { side: usize, len: usize },
    WriteUrgent { side: usize, len: usize },
    Read { side: usize, len: usize },
    Peek { side: usize },
    Steps(u8),
    ZcopyWrite { side: usize, len: usize },
}

fn op_strategy(zcopy: bool) -> impl Strategy<Value = Op> {
    let z = if zcopy { 1 } else { 0 };
    prop_oneof![
        6 => (0usize..2, 1usize..20_000).prop_map(|(side, len)| Op::Write { side, len }),
        1 => (0usize..2, 1usize..50).prop_map(|(side, len)| Op::WriteUrgent { side, len }),
        6 => (0usize..2, 1usize..20_000).prop_map(|(side, len)| Op::Read { side, len }),
        1 => (0usize..2).prop_map(|side| Op::Peek { side }),
        6 => (1u8..20).prop_map(Op::Steps),
        z => (0usize..2, 2usize..200_000).prop_map(|(side, len)| Op::ZcopyWrite { side, len }),
    ]
}

/// One direction's bookkeeping: what the writer produced and what the reader got.
#[derive(Default, Clone)]
struct Stream {
    written: u64,
    received: Vec<u8>,
    app_read: u64,
    resend: Vec<u8>,
    zcopy: Option<(sdp_proto::conn::ZcopyId, u64, usize)>,
}

struct World {
    sim: Sim,
    streams: [Stream; 2], // streams[s]: bytes written by side s
    oob_inline: bool,
}

impl World {
    fn new(seed: u64, oob_inline: bool, delay: u64, jitter: u64) -> World {
        let cfg = Config {
            recv_buffer_size: 2048 + 16,
            recv_buffers: 5,
            recv_window: 6000,
            send_buffer: 9000,
            rdma_read_chunk: 7000,
            oob_inline,
            ..Config::default()
        };
        World {
            sim: Sim::connected(cfg.clone(), cfg, LinkConfig { delay, jitter }, seed),
            streams: Default::default(),
            oob_inline,
        }
    }

    fn write(&mut self, side: usize, len: usize, urgent: bool) {
        self.finish_zcopy(side);
        let st = &mut self.streams[side];
        if st.zcopy.is_some() {
            return;
        }
        let now = self.sim.ts();
        if !st.resend.is_empty() {
            if let Ok(n) = self.sim.send(side, &st.resend.clone()) {
                st.resend.drain(..n);
            }
            return;
        }
        let mut data = vec![0u8; len];
        pattern_fill(st.written + side as u64 * (1 << 40), &mut data);
        let r = if urgent {
            self.sim.sides[side].conn.send_urgent(now, &data)
        } else {
            self.sim.send(side, &data)
        };
        let conn = &mut self.sim.sides[side].conn;
        match r {
            Ok(n) => st.written += n as u64,
            Err(SendError::WouldBlock) => {
                assert!(!conn.readiness().writable, "WouldBlock while writable")
            }
            Err(e) => panic!(
                "send: {e:?}; errors {:?} {:?}",
                self.sim.sides[0].conn.error(),
                self.sim.sides[1].conn.error()
            ),
        }
    }

    fn zcopy(&mut self, side: usize, len: usize) {
        self.finish_zcopy(side);
        if self.streams[side].zcopy.is_some() || !self.streams[side].resend.is_empty() {
            return;
        }
        if !self.sim.sides[side].conn.zcopy_possible(len) {
            return;
        }
        let st = &mut self.streams[side];
        let mut data = vec![0u8; len];
        pattern_fill(st.written + side as u64 * (1 << 40), &mut data);
        let id = self.sim.send_zcopy(side, &data).unwrap();
        st.zcopy = Some((id, st.written, len));
        st.written += len as u64;
    }

    fn finish_zcopy(&mut self, side: usize) {
        let st = &mut self.streams[side];
        if let Some((id, off, len)) = st.zcopy
            && let Some(&(_, sent, completed)) = self.sim.sides[side]
                .zcopy_finished
                .iter()
                .find(|f| f.0 == id)
        {
            st.zcopy = None;
            if !completed {
                let mut rest = vec![0u8; len - sent as usize];
                pattern_fill(off + u64::from(sent) + side as u64 * (1 << 40), &mut rest);
                st.resend = rest;
            }
        }
    }

    /// Reads on `side` what the peer wrote; urgent bytes are taken at their marks so the
    /// received stream must equal the written one.
    fn read(&mut self, side: usize, len: usize, peek: bool) {
        let now = self.sim.ts();
        let conn = &mut self.sim.sides[side].conn;
        let st = &mut self.streams[1 - side];
        if !self.oob_inline
            && conn.at_mark()
            && let Ok(b) = conn.recv_urgent(now, false)
        {
            st.received.push(b);
            st.app_read += 1;
        }
        let readable = conn.readiness().readable;
        let mut buf = vec![0u8; len];
        match self.sim.sides[side].recv(now, &mut buf, peek) {
            Ok(n) => {
                assert!(readable, "recv returned data while not readable");
                if !peek {
                    st.received.extend_from_slice(&buf[..n]);
                    st.app_read += n as u64;
                }
            }
            Err(RecvError::WouldBlock) => assert!(!readable, "WouldBlock while readable"),
            Err(e) => panic!("recv: {e:?}"),
        }
    }

    /// Readiness against a model built from counters the test keeps itself.
    fn check_model(&self) {
        for side in 0..2 {
            let c = &self.sim.sides[side].conn;
            let r = c.readiness();
            let peer_closed = self.sim.sides[side].peer_half_closed;
            if self.oob_inline {
                let unread = c.stats().bytes_received - self.streams[1 - side].app_read;
                assert_eq!(
                    r.readable,
                    unread > 0 || peer_closed,
                    "readable model, side {side}"
                );
            }
            let st = &self.streams[side];
            let queued = c.send_queued();
            let blocked = st.zcopy.is_some();
            assert_eq!(
                r.writable,
                !blocked && queued < 9000,
                "writable model, side {side}"
            );
            assert!(!r.error && !r.hangup);
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { side, len } => self.write(side, len, false),
            Op::WriteUrgent { side, len } => self.write(side, len, true),
            Op::Read { side, len } => self.read(side, len, false),
            Op::Peek { side } => self.read(side, 100, true),
            Op::Steps(n) => {
                for _ in 0..n {
                    self.sim.step();
                }
            }
            Op::ZcopyWrite { side, len } => self.zcopy(side, len),
        }
        self.sim.pump();
    }

    /// Drains both directions and checks byte equality.
    fn finish(&mut self) {
        let mut idle = 0;
        for _ in 0..200_000 {
            for side in 0..2 {
                self.finish_zcopy(side);
                if !self.streams[side].resend.is_empty() {
                    self.write(side, 0, false);
                }
                self.read(side, 65536, false);
            }
            self.sim.pump();
            let done = (0..2).all(|s| {
                let st = &self.streams[s];
                st.zcopy.is_none() && st.resend.is_empty() && st.received.len() as u64 == st.written
            });
            if done {
                break;
            }
            if !self.sim.step() {
                idle += 1;
                if idle > 3 {
                    break;
                }
            }
        }
        for side in 0..2 {
            let st = &self.streams[side];
            assert_eq!(
                st.received.len() as u64,
                st.written,
                "side {side} stream length"
            );
            let mut want = vec![0u8; st.received.len()];
            pattern_fill(side as u64 * (1 << 40), &mut want);
            assert!(st.received == want, "side {side} stream bytes differ");
        }
    }
}

proptest! {
    #![proptest_config(cases(10000, 500))]

    #[test]
    fn bytes_in_equal_bytes_out_with_urgent_and_zcopy(
        seed in any::<u64>(),
        oob_inline in any::<bool>(),
        jitter in 0u64..5000,
        ops in proptest::collection::vec(op_strategy(true), 1..60),
    ) {
        let mut w = World::new(seed, oob_inline, 1000, jitter);
        for op in &ops {
            w.apply(op);
        }
        w.finish();
        for s in &w.sim.sides {
            prop_assert!(s.max_msg_len <= 2048 + 16);
        }
    }

    #[test]
    fn readiness_agrees_with_model_and_calls(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op_strategy(false), 1..60),
    ) {
        let mut w = World::new(seed, true, 1000, 0);
        for op in &ops {
            w.apply(op);
            w.check_model();
        }
        w.finish();
        // Then a half-close each way: EOF readable, hangup only when both are shut.
        let now = w.sim.ts();
        w.sim.sides[0].conn.shutdown(now, Shutdown::Write).unwrap();
        w.sim.pump();
        w.sim.run_until_idle(10_000);
        let r1 = w.sim.sides[1].conn.readiness();
        prop_assert!(r1.readable && r1.read_closed && !r1.hangup);
        prop_assert_eq!(w.sim.sides[1].conn.state(), StateKind::CloseWait);
        w.sim.sides[1].conn.shutdown(now, Shutdown::Write).unwrap();
        w.sim.pump();
        w.sim.run_until_idle(10_000);
        prop_assert!(w.sim.sides[0].conn.is_closed() && w.sim.sides[1].conn.is_closed());
        prop_assert!(w.sim.sides[0].conn.readiness().hangup);
    }
}

/// Regression: a ZCopy read finishing after the source's SrcAvailCancel must still be
/// answered (found by `bytes_in_equal_bytes_out_with_urgent_and_zcopy`).
#[test]
fn established_zcopy_cancel_crossing_window_full_answered() {
    let mut w = World::new(209082390693164653, false, 1000, 25);
    for op in [
        Op::Write { side: 0, len: 3953 },
        Op::Write { side: 0, len: 1 },
        Op::Steps(2),
        Op::ZcopyWrite { side: 1, len: 6001 },
        Op::Read { side: 1, len: 2050 },
        Op::Steps(6),
        Op::Steps(8),
    ] {
        w.apply(&op);
    }
    w.finish();
}

/// Regression: both sides write at once, with small windows.
#[test]
fn established_both_write_small_window_drains() {
    let mut w = World::new(0, false, 1000, 0);
    w.apply(&Op::Write { side: 1, len: 4097 });
    w.apply(&Op::Write { side: 0, len: 4097 });
    w.finish();
}

/// Regression: ZCopy one way while the other way fills the window.
#[test]
fn established_zcopy_against_full_reverse_window_completes() {
    let mut w = World::new(3347843194324219713, false, 1000, 285);
    for op in [
        Op::ZcopyWrite { side: 0, len: 8982 },
        Op::Write { side: 1, len: 3953 },
        Op::Write { side: 1, len: 3953 },
        Op::Steps(7),
        Op::Read { side: 0, len: 2049 },
        Op::Read { side: 1, len: 1 },
        Op::Steps(11),
    ] {
        w.apply(&op);
    }
    w.finish();
}

/// Regression: SrcAvails crossing on the wire, both windows filling.
#[test]
fn established_crossing_srcavails_both_complete() {
    let mut w = World::new(14123384944943623104, false, 1000, 316);
    for op in [
        Op::ZcopyWrite {
            side: 0,
            len: 19674,
        },
        Op::ZcopyWrite {
            side: 1,
            len: 25905,
        },
        Op::Steps(5),
        Op::Steps(3),
        Op::Read { side: 1, len: 1 },
        Op::Read { side: 0, len: 1 },
        Op::Steps(16),
        Op::Steps(8),
        Op::Read { side: 1, len: 4096 },
    ] {
        w.apply(&op);
    }
    w.finish();
}

/// Regression: large SrcAvails crossing, readers draining only at the end.
#[test]
fn established_large_crossing_srcavails_complete() {
    let mut w = World::new(3564958854424440689, false, 1000, 1492);
    w.apply(&Op::ZcopyWrite {
        side: 1,
        len: 107985,
    });
    w.apply(&Op::ZcopyWrite {
        side: 0,
        len: 107985,
    });
    w.finish();
}
