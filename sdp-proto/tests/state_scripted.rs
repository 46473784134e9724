//! Scripted state tests: one connection, a hand-played peer. Named
//! `<state>_<stimulus>_<outcome>`.

mod common;

use sdp_proto::conn::{RdmaReadFailure, Shutdown, Timer};
use sdp_proto::error::*;
use sdp_proto::wire::*;
use sdp_proto::{Config, Connection, Event, StateKind, Timestamp};
use std::result::Result;

const PEER_SIZE: u32 = 4096 + 16;

struct One {
    c: Connection,
    now: Timestamp,
    /// MSeq of the peer's next message.
    peer_mseq: u32,
    /// Last of our MSeqs the peer has received.
    peer_ack: u32,
    peer_bufs: u16,
    buf: Vec<u8>,
}

fn hello_ack(bufs: u16, version: u8, max_adverts: u8) -> [u8; HELLO_ACK_LEN] {
    HelloAckRepr {
        bufs,
        version: Version(version),
        ipv_cap: 0,
        max_adverts,
        act_rcv_sz: PEER_SIZE,
    }
    .to_bytes()
}

impl One {
    fn active(cfg: Config) -> One {
        let mut c = Connection::connect(cfg, Timestamp::ZERO, common::addrs(), 1234);
        while c.poll_post_recv().is_some() {}
        let _ = c.hello();
        One {
            c,
            now: Timestamp::ZERO,
            peer_mseq: 1,
            peer_ack: 0,
            peer_bufs: 8,
            buf: vec![0; 1 << 16],
        }
    }

    fn established() -> One {
        Self::established_with(Config::default())
    }

    fn established_with(cfg: Config) -> One {
        let mut o = One::active(cfg);
        o.c.handle_hello_ack(o.now, &hello_ack(8, 0x22, 1)).unwrap();
        assert_eq!(o.events(), vec![Event::Connected]);
        o
    }

    fn peer(&mut self, flags: Flags, body: Body<'_>) -> Result<(), HandleError> {
        let m = MessageRepr::new(flags, self.peer_bufs, self.peer_mseq, self.peer_ack, body);
        self.peer_mseq += 1;
        let r = self.c.handle_message(self.now, &m.to_vec());
        while self.c.poll_post_recv().is_some() {}
        r
    }

    fn data(&mut self, bytes: &[u8]) -> Result<(), HandleError> {
        self.peer(Flags::EMPTY, Body::Data(bytes))
    }

    /// Everything the connection sends now, parsed; the peer receives each one.
    fn sent(&mut self) -> Vec<(BsdhRepr, Vec<u8>)> {
        let mut out = Vec::new();
        while self.c.poll_post_recv().is_some() {}
        while let Some(t) = self.c.poll_transmit(self.now, &mut self.buf) {
            let bytes = self.buf[..t.len].to_vec();
            let m = MessageRepr::parse(&bytes).unwrap();
            self.peer_ack = m.bsdh.mseq;
            out.push((m.bsdh, bytes));
            self.c.handle_send_complete(self.now, 1).unwrap();
        }
        out
    }

    fn sent_mids(&mut self) -> Vec<MessageId> {
        self.sent().into_iter().map(|(b, _)| b.mid).collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.c.poll_event()).collect()
    }

    fn violation(&self) -> Option<ProtocolViolation> {
        match self.c.error() {
            Some(ConnectionError::ProtocolViolation(v)) => Some(v),
            _ => None,
        }
    }

    fn advance(&mut self, secs: f64) {
        self.now = self.now + std::time::Duration::from_secs_f64(secs);
        self.c.handle_timeout(self.now);
    }
}

fn srcavail(len: u32, inline: &[u8]) -> Body<'_> {
    Body::SrcAvail {
        header: SrcAvailRepr {
            len,
            rkey: 77,
            vaddr: 0x1000,
        },
        payload: inline,
    }
}

#[test]
fn hello_sent_valid_hello_ack_established_with_peer_credits() {
    let o = One::established();
    assert_eq!(o.c.state(), StateKind::Established);
    assert_eq!(o.c.tx_credits(), 8);
    assert_eq!(o.c.send_goal(), 4096);
}

#[test]
fn hello_sent_hello_ack_major_version_1_rejected() {
    let mut o = One::active(Config::default());
    let r = o.c.handle_hello_ack(o.now, &hello_ack(8, 0x11, 1));
    assert_eq!(
        r,
        Err(HandleError::Fatal(ConnectionError::Handshake(
            HandshakeError::Version(0x11)
        )))
    );
    assert_eq!(o.c.state(), StateKind::Closed);
}

#[test]
fn hello_sent_hello_ack_max_adverts_zero_rejected() {
    let mut o = One::active(Config::default());
    assert!(o.c.handle_hello_ack(o.now, &hello_ack(8, 0x22, 0)).is_err());
    assert_eq!(
        o.c.error(),
        Some(ConnectionError::Handshake(HandshakeError::MaxAdvertsZero))
    );
}

#[test]
fn hello_sent_cm_reject_connect_refused() {
    let mut o = One::active(Config::default());
    let _ = o.c.handle_connect_failed(o.now, ConnectFailure::Refused);
    assert_eq!(
        o.c.error().unwrap().io_kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    assert_eq!(
        o.c.send(o.now, b"x"),
        Err(SendError::Closed(ConnectionError::ConnectFailed(
            ConnectFailure::Refused
        )))
    );
}

#[test]
fn hello_sent_send_not_connected() {
    let mut o = One::active(Config::default());
    assert_eq!(o.c.send(o.now, b"x"), Err(SendError::NotConnected));
    assert!(!o.c.readiness().writable);
}

#[test]
fn hello_sent_message_before_hello_ack_invalid_state() {
    let mut o = One::active(Config::default());
    assert_eq!(
        o.data(b"x"),
        Err(HandleError::InvalidState(StateKind::HelloSent))
    );
}

#[test]
fn listen_hello_with_bad_ip_version_refused() {
    let mut h = Connection::connect(Config::default(), Timestamp::ZERO, common::addrs(), 1).hello();
    h[17] = 0x50;
    assert!(matches!(
        Connection::accept(Config::default(), Timestamp::ZERO, &h),
        Err(HandshakeError::Malformed(WireError::Invalid {
            field: "hh.ipv",
            ..
        }))
    ));
}

#[test]
fn hello_ack_sent_first_message_establishes() {
    let mut a = Connection::connect(Config::default(), Timestamp::ZERO, common::addrs(), 1);
    while a.poll_post_recv().is_some() {}
    let h = a.hello();
    let mut b = Connection::accept(Config::default(), Timestamp::ZERO, &h).unwrap();
    while b.poll_post_recv().is_some() {}
    let ack = b.hello_ack();
    a.handle_hello_ack(Timestamp::ZERO, &ack).unwrap();
    assert_eq!(b.state(), StateKind::HelloAckSent);
    a.send(Timestamp::ZERO, b"early").unwrap();
    let mut buf = vec![0u8; 40000];
    let t = a.poll_transmit(Timestamp::ZERO, &mut buf).unwrap();
    b.handle_message(Timestamp::ZERO, &buf[..t.len]).unwrap();
    assert_eq!(b.state(), StateKind::Established);
    assert_eq!(b.poll_event(), Some(Event::Connected));
    assert_eq!(b.recv_available(), 5);
}

#[test]
fn established_data_received_readable_bytes_match() {
    let mut o = One::established();
    o.data(b"abc").unwrap();
    o.data(b"def").unwrap();
    assert!(o.c.readiness().readable);
    let mut b = [0u8; 10];
    assert_eq!(o.c.recv(o.now, &mut b, false), Ok(6));
    assert_eq!(&b[..6], b"abcdef");
    assert_eq!(o.c.recv(o.now, &mut b, false), Err(RecvError::WouldBlock));
    assert!(!o.c.readiness().readable);
}

#[test]
fn established_peek_does_not_consume() {
    let mut o = One::established();
    o.data(b"abc").unwrap();
    let mut b = [0u8; 2];
    assert_eq!(o.c.recv(o.now, &mut b, true), Ok(2));
    assert_eq!(o.c.recv_available(), 3);
}

#[test]
fn established_wrong_mseq_protocol_violation() {
    let mut o = One::established();
    o.peer_mseq = 5;
    assert!(matches!(o.data(b"x"), Err(HandleError::Fatal(_))));
    assert_eq!(
        o.violation(),
        Some(ProtocolViolation::BadSequence {
            expected: 1,
            got: 5
        })
    );
    assert!(o.events().contains(&Event::Disconnect { abortive: true }));
}

#[test]
fn established_ack_of_unsent_message_protocol_violation() {
    let mut o = One::established();
    o.peer_ack = 3;
    let _ = o.data(b"x");
    assert_eq!(
        o.violation(),
        Some(ProtocolViolation::BadAck { mseq_ack: 3 })
    );
}

#[test]
fn established_message_beyond_posted_buffers_no_receive_buffer() {
    let mut o = One::established_with(Config {
        recv_buffers: 4,
        recv_window: 0,
        ..Config::default()
    });
    let posted = o.c.posted_recv_buffers();
    for _ in 0..posted {
        let m = MessageRepr::new(Flags::EMPTY, 8, o.peer_mseq, 0, Body::Data(b""));
        o.peer_mseq += 1;
        o.c.handle_message(o.now, &m.to_vec()).unwrap();
    }
    let m = MessageRepr::new(Flags::EMPTY, 8, o.peer_mseq, 0, Body::Data(b""));
    let _ = o.c.handle_message(o.now, &m.to_vec());
    assert_eq!(o.violation(), Some(ProtocolViolation::NoReceiveBuffer));
}

#[test]
fn established_message_larger_than_buffer_too_long() {
    let mut o = One::established_with(Config {
        recv_buffer_size: 1024 + 16,
        ..Config::default()
    });
    let _ = o.data(&[0u8; 1025]);
    assert_eq!(
        o.violation(),
        Some(ProtocolViolation::TooLong {
            len: 1025 + 16,
            max: 1040
        })
    );
}

#[test]
fn established_sinkavail_received_reset_like_linux() {
    let mut o = One::established();
    let hdr = SinkAvailRepr {
        len: 100,
        rkey: 1,
        vaddr: 0,
        non_discards: 0,
    };
    let _ = o.peer(
        Flags::EMPTY,
        Body::SinkAvail {
            header: hdr,
            payload: b"",
        },
    );
    assert_eq!(
        o.violation(),
        Some(ProtocolViolation::Unsupported(MessageId::SinkAvail))
    );
}

#[test]
fn established_unknown_mid_received_unsupported() {
    let mut o = One::established();
    let _ = o.peer(
        Flags::EMPTY,
        Body::Unknown {
            mid: 0x42,
            rest: b"",
        },
    );
    assert_eq!(
        o.violation(),
        Some(ProtocolViolation::Unsupported(MessageId::Unknown(0x42)))
    );
}

#[test]
fn established_malformed_message_names_field() {
    let mut o = One::established();
    let _ =
        o.c.handle_message(o.now, &[0xff, 0, 0, 8, 0, 0, 0, 99, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert_eq!(
        o.violation(),
        Some(ProtocolViolation::Malformed(WireError::LengthMismatch {
            declared: 99,
            actual: 16
        }))
    );
}

#[test]
fn established_abortconn_received_reset_and_error_readiness() {
    let mut o = One::established();
    let _ = o.peer(Flags::EMPTY, Body::AbortConn);
    assert_eq!(o.c.error(), Some(ConnectionError::PeerAborted));
    let r = o.c.readiness();
    assert!(r.error && r.hangup && r.readable && r.writable);
}

#[test]
fn established_two_credits_data_waits_until_credit_update() {
    let mut o = One::established();
    o.peer_bufs = 2;
    o.data(b"").unwrap(); // credits now 2: data needs 3
    assert_eq!(o.c.tx_credits(), 2);
    o.c.send(o.now, b"payload").unwrap();
    assert!(
        o.sent()
            .iter()
            .all(|(b, bytes)| b.mid != MessageId::Data || bytes.len() == 16)
    );
    assert_eq!(o.c.send_queued(), 7);
    o.peer_bufs = 8;
    o.data(b"").unwrap();
    let sent = o.sent();
    assert!(
        sent.iter()
            .any(|(b, bytes)| b.mid == MessageId::Data && bytes.len() == 16 + 7)
    );
}

#[test]
fn established_one_credit_no_payload_goes_out() {
    let mut o = One::established();
    o.peer_bufs = 1;
    o.data(b"x").unwrap();
    o.c.send(o.now, b"held").unwrap();
    o.c.shutdown(o.now, Shutdown::Write).unwrap();
    // Data needs 3 and waits, DisConn waits behind it; the last credit may only carry a
    // pure update (CA4-82).
    for (b, bytes) in o.sent() {
        assert_eq!(b.mid, MessageId::Data);
        assert_eq!(bytes.len(), 16);
    }
    assert_eq!(o.c.send_queued(), 4);
    assert!(o.c.tx_credits() <= 1);
}

#[test]
fn established_urgent_send_sets_oob_flags_and_solicited() {
    let mut o = One::established();
    o.c.send(o.now, b"ab").unwrap();
    o.c.send_urgent(o.now, b"!").unwrap();
    o.c.send(o.now, b"cd").unwrap();
    let sent = o.sent();
    let first = &sent[0];
    assert_eq!(first.1.len(), 16 + 3);
    assert!(first.0.flags.contains(Flags::OOB_PRES) && first.0.flags.contains(Flags::OOB_PEND));
    assert!(!sent[1].0.flags.contains(Flags::OOB_PRES));
}

#[test]
fn established_urgent_pend_received_sigurg_then_oob_would_block_until_byte() {
    let mut o = One::established();
    o.peer(Flags::OOB_PEND, Body::Data(b"ab")).unwrap();
    assert!(o.events().contains(&Event::UrgentPending));
    assert_eq!(o.c.recv_urgent(o.now, false), Err(UrgentError::WouldBlock));
    o.peer(Flags::OOB_PRES.union(Flags::OOB_PEND), Body::Data(b"c!"))
        .unwrap();
    assert!(o.c.readiness().urgent);
    assert_eq!(o.c.recv_urgent(o.now, false), Ok(b'!'));
    assert_eq!(o.c.recv_urgent(o.now, false), Err(UrgentError::Invalid));
}

#[test]
fn established_oob_pres_on_empty_message_violation() {
    let mut o = One::established();
    let _ = o.peer(Flags::OOB_PRES, Body::Data(b""));
    assert_eq!(o.violation(), Some(ProtocolViolation::UrgentWithoutPayload));
}

#[test]
fn established_disconn_received_close_wait_eof_after_data() {
    let mut o = One::established();
    o.data(b"tail").unwrap();
    o.peer(Flags::EMPTY, Body::DisConn).unwrap();
    assert_eq!(o.c.state(), StateKind::CloseWait);
    assert!(o.events().contains(&Event::PeerHalfClosed));
    let r = o.c.readiness();
    assert!(r.readable && r.read_closed && !r.hangup);
    let mut b = [0u8; 10];
    assert_eq!(o.c.recv(o.now, &mut b, false), Ok(4));
    assert_eq!(o.c.recv(o.now, &mut b, false), Ok(0));
    // Half-close: we can still send.
    assert_eq!(o.c.send(o.now, b"x"), Ok(1));
}

#[test]
fn close_wait_data_received_violation() {
    let mut o = One::established();
    o.peer(Flags::EMPTY, Body::DisConn).unwrap();
    let _ = o.data(b"late");
    assert_eq!(o.violation(), Some(ProtocolViolation::DataAfterDisConn));
}

#[test]
fn close_wait_cm_disconnect_broken_pipe() {
    let mut o = One::established();
    o.peer(Flags::EMPTY, Body::DisConn).unwrap();
    let _ = o.c.handle_cm_disconnected(o.now);
    assert_eq!(
        o.c.error().unwrap().io_kind(),
        std::io::ErrorKind::BrokenPipe
    );
}

#[test]
fn established_shutdown_write_disconn_after_queued_data() {
    let mut o = One::established();
    o.c.send(o.now, b"abc").unwrap();
    o.c.shutdown(o.now, Shutdown::Write).unwrap();
    assert_eq!(o.c.send(o.now, b"x"), Err(SendError::Shutdown));
    assert_eq!(o.sent_mids(), vec![MessageId::Data, MessageId::DisConn]);
    assert_eq!(o.c.state(), StateKind::FinWait1);
    assert!(
        o.c.readiness().writable,
        "EPOLLOUT after SHUT_WR, like Linux"
    );
}

#[test]
fn fin_wait1_disconn_received_time_wait_graceful_disconnect() {
    let mut o = One::established();
    o.c.shutdown(o.now, Shutdown::Write).unwrap();
    o.sent();
    o.peer(Flags::EMPTY, Body::DisConn).unwrap();
    assert_eq!(o.c.state(), StateKind::TimeWait);
    assert!(o.events().contains(&Event::Disconnect { abortive: false }));
    o.c.handle_cm_disconnected(o.now).unwrap();
    assert_eq!(o.c.state(), StateKind::Closed);
    assert_eq!(o.c.error(), None);
}

#[test]
fn time_wait_guard_expires_closed() {
    let mut o = One::established();
    o.c.shutdown(o.now, Shutdown::Write).unwrap();
    o.sent();
    o.peer(Flags::EMPTY, Body::DisConn).unwrap();
    o.advance(151.0);
    assert_eq!(o.c.state(), StateKind::Closed);
    assert_eq!(o.c.error(), None);
}

#[test]
fn fin_wait1_disconn_crossing_unsent_goes_last_ack() {
    let mut o = One::established_with(Config::default());
    o.peer_bufs = 0;
    o.data(b"").unwrap(); // no credit: our DisConn cannot leave yet
    o.c.shutdown(o.now, Shutdown::Write).unwrap();
    o.sent();
    o.peer_bufs = 8;
    o.peer(Flags::EMPTY, Body::DisConn).unwrap();
    assert_eq!(o.c.state(), StateKind::LastAck);
    assert!(o.sent_mids().contains(&MessageId::DisConn));
    o.c.handle_cm_disconnected(o.now).unwrap();
    assert_eq!(o.c.state(), StateKind::Closed);
}

#[test]
fn last_ack_no_cm_disconnect_times_out() {
    let mut o = One::established();
    o.peer(Flags::EMPTY, Body::DisConn).unwrap();
    o.c.shutdown(o.now, Shutdown::Write).unwrap();
    o.sent();
    assert_eq!(o.c.state(), StateKind::LastAck);
    o.advance(61.0);
    assert_eq!(o.c.error(), Some(ConnectionError::TimedOut(Timer::LastAck)));
}

#[test]
fn established_close_with_unread_data_aborts() {
    let mut o = One::established();
    o.data(b"unread").unwrap();
    o.c.close(o.now);
    assert_eq!(o.c.error(), Some(ConnectionError::LocallyAborted));
    assert!(o.events().contains(&Event::Disconnect { abortive: true }));
}

#[test]
fn established_send_buffer_full_would_block_not_writable() {
    let mut o = One::established_with(Config {
        send_buffer: 10,
        ..Config::default()
    });
    o.peer_bufs = 0;
    o.data(b"").unwrap(); // no credits: nothing drains
    assert_eq!(o.c.send(o.now, &[1u8; 25]), Ok(10));
    assert_eq!(o.c.send(o.now, b"x"), Err(SendError::WouldBlock));
    assert!(!o.c.readiness().writable);
}

#[test]
fn established_srcavail_received_rdma_read_then_rdma_rd_compl() {
    let mut o = One::established();
    o.peer(Flags::EMPTY, srcavail(10, b"ab")).unwrap();
    assert_eq!(o.c.recv_available(), 2);
    let ev = o.events();
    let Some(Event::RdmaRead(r)) = ev.first().copied() else {
        panic!("{ev:?}")
    };
    assert_eq!((r.rkey, r.remote_addr, r.len), (77, 0x1002, 8));
    o.c.handle_rdma_read_complete(o.now, r.id, Ok(b"cdefghij"))
        .unwrap();
    let sent = o.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        MessageRepr::parse(&sent[0].1).unwrap().body,
        Body::RdmaRdCompl(RdmaComplRepr { len: 8 })
    );
    assert!(sent[0].0.mseq_ack >= 1, "MSeqAck covers the SrcAvail");
    let mut b = [0u8; 20];
    assert_eq!(o.c.recv(o.now, &mut b, false), Ok(10));
    assert_eq!(&b[..10], b"abcdefghij");
}

#[test]
fn established_srcavail_cancel_received_answers_rdma_rd_compl_and_sendsm() {
    let mut o = One::established_with(Config {
        rdma_read_chunk: 4,
        ..Config::default()
    });
    o.peer(Flags::EMPTY, srcavail(20, b"a")).unwrap();
    let Some(Event::RdmaRead(r)) = o.events().first().copied() else {
        panic!()
    };
    o.peer(Flags::EMPTY, Body::SrcAvailCancel).unwrap();
    assert!(o.sent().is_empty(), "waits for the read in flight");
    o.c.handle_rdma_read_complete(o.now, r.id, Ok(b"bcde"))
        .unwrap();
    let bodies: Vec<_> = o.sent().into_iter().map(|(_, b)| b).collect();
    assert_eq!(
        MessageRepr::parse(&bodies[0]).unwrap().body,
        Body::RdmaRdCompl(RdmaComplRepr { len: 4 })
    );
    assert_eq!(MessageRepr::parse(&bodies[1]).unwrap().body, Body::SendSm);
    // The source now sends the rest as Data: accepted.
    o.data(b"fghij").unwrap();
    assert_eq!(o.c.recv_available(), 10);
}

#[test]
fn established_second_srcavail_while_pending_violation() {
    let mut o = One::established();
    o.peer(Flags::EMPTY, srcavail(10, b"a")).unwrap();
    let _ = o.peer(Flags::EMPTY, srcavail(10, b"b"));
    assert_eq!(o.violation(), Some(ProtocolViolation::SrcAvailOutstanding));
}

#[test]
fn established_srcavail_inline_longer_than_len_violation() {
    let mut o = One::established();
    let _ = o.peer(Flags::EMPTY, srcavail(1, b"abc"));
    assert_eq!(
        o.violation(),
        Some(ProtocolViolation::SrcAvailInlineTooLong { len: 1, inline: 3 })
    );
}

#[test]
fn established_rdma_read_unsupported_sendsm_and_zcopy_off() {
    let mut o = One::established();
    o.peer(Flags::EMPTY, srcavail(10, b"a")).unwrap();
    let Some(Event::RdmaRead(r)) = o.events().first().copied() else {
        panic!()
    };
    o.c.handle_rdma_read_complete(o.now, r.id, Err(RdmaReadFailure::Unsupported))
        .unwrap();
    assert_eq!(o.sent_mids(), vec![MessageId::SendSm]);
    o.data(b"bcdefghij").unwrap();
    o.peer(Flags::EMPTY, srcavail(10, b"k")).unwrap();
    assert_eq!(
        o.sent_mids(),
        vec![MessageId::SendSm],
        "refused at once from now on"
    );
}

#[test]
fn established_send_zcopy_srcavail_then_rdma_rd_compl_completes() {
    let mut o = One::established();
    let data = vec![9u8; 10_000];
    let id = o.c.send_zcopy(o.now, &data, 5, 0).unwrap();
    assert_eq!(
        o.c.send(o.now, b"x"),
        Err(SendError::WouldBlock),
        "no Data behind a SrcAvail"
    );
    let sent = o.sent();
    let m = MessageRepr::parse(&sent[0].1).unwrap();
    let Body::SrcAvail { header, payload } = m.body else {
        panic!()
    };
    assert_eq!((header.len, header.rkey), (10_000, 5));
    assert!(!payload.is_empty() && payload.len() < 10_000);
    let rest = 10_000 - payload.len() as u32;
    o.peer(Flags::EMPTY, Body::RdmaRdCompl(RdmaComplRepr { len: rest }))
        .unwrap();
    assert!(o.events().contains(&Event::ZcopySendFinished {
        id,
        sent: 10_000,
        completed: true
    }));
    assert_eq!(o.c.send(o.now, b"x"), Ok(1));
}

#[test]
fn established_send_zcopy_sendsm_received_finished_incomplete() {
    let mut o = One::established();
    let id = o.c.send_zcopy(o.now, &[1u8; 5000], 5, 0).unwrap();
    let sent = o.sent();
    let inline = sent[0].1.len() - 32;
    o.peer(Flags::EMPTY, Body::SendSm).unwrap();
    assert!(o.events().contains(&Event::ZcopySendFinished {
        id,
        sent: inline as u32,
        completed: false
    }));
}

#[test]
fn established_rdma_rd_compl_too_long_violation() {
    let mut o = One::established();
    o.c.send_zcopy(o.now, &[1u8; 5000], 5, 0).unwrap();
    o.sent();
    let _ = o.peer(Flags::EMPTY, Body::RdmaRdCompl(RdmaComplRepr { len: 5000 }));
    assert!(matches!(
        o.violation(),
        Some(ProtocolViolation::RdmaRdComplTooLong { .. })
    ));
}

#[test]
fn established_rdma_rd_compl_without_srcavail_violation() {
    let mut o = One::established();
    let _ = o.peer(Flags::EMPTY, Body::RdmaRdCompl(RdmaComplRepr { len: 1 }));
    assert!(matches!(
        o.violation(),
        Some(ProtocolViolation::Unexpected {
            mid: MessageId::RdmaRdCompl,
            ..
        })
    ));
}

#[test]
fn established_srcavail_unanswered_cancel_then_reset_after_60s() {
    let mut o = One::established();
    o.c.send_zcopy(o.now, &[1u8; 5000], 5, 0).unwrap();
    o.sent();
    o.advance(1.5);
    assert_eq!(o.sent_mids(), vec![MessageId::SrcAvailCancel]);
    o.advance(61.0);
    assert_eq!(
        o.c.error(),
        Some(ConnectionError::TimedOut(Timer::SrcAvailCancel))
    );
}

#[test]
fn established_send_zcopy_with_queued_bytes_busy() {
    let mut o = One::established();
    o.c.send(o.now, b"queued").unwrap();
    assert_eq!(
        o.c.send_zcopy(o.now, &[0u8; 100], 1, 0),
        Err(ZcopyError::Busy)
    );
}

#[test]
fn established_ch_rcv_buf_received_acked_with_current_size() {
    let mut o = One::established();
    o.peer(Flags::EMPTY, Body::ChRcvBuf(ChRcvBufRepr { size: 65536 }))
        .unwrap();
    let sent = o.sent();
    assert_eq!(
        MessageRepr::parse(&sent[0].1).unwrap().body,
        Body::ChRcvBufAck(ChRcvBufRepr { size: 32768 })
    );
}

#[test]
fn established_ch_rcv_buf_ack_larger_adopted_with_margin() {
    let mut o = One::established();
    o.peer(
        Flags::EMPTY,
        Body::ChRcvBufAck(ChRcvBufRepr { size: 16384 }),
    )
    .unwrap();
    assert_eq!(o.c.send_goal(), 16384 - 16);
}

#[test]
fn established_mode_change_received_ignored() {
    let mut o = One::established();
    let mc = ModeChangeRepr {
        half: ModeHalf::Send,
        mode: TransferMode::Pipelined,
    };
    o.peer(Flags::EMPTY, Body::ModeChange(mc)).unwrap();
    assert_eq!(o.c.state(), StateKind::Established);
}

#[test]
fn established_suspcomm_received_unsupported() {
    let mut o = One::established();
    let _ = o.peer(
        Flags::EMPTY,
        Body::SuspComm(SuspCommRepr {
            service_id: 0x10001,
        }),
    );
    assert_eq!(
        o.violation(),
        Some(ProtocolViolation::Unsupported(MessageId::SuspComm))
    );
}

#[test]
fn established_transport_error_reset_and_later_inputs_ignored() {
    let mut o = One::established();
    let _ =
        o.c.handle_transport_error(o.now, TransportFailure::SendCompletion);
    assert_eq!(
        o.c.error().unwrap().io_kind(),
        std::io::ErrorKind::ConnectionReset
    );
    assert_eq!(o.data(b"x"), Err(HandleError::Closed));
    assert_eq!(o.c.handle_send_complete(o.now, 1), Err(HandleError::Closed));
    assert!(o.c.poll_post_recv().is_none());
}

#[test]
fn established_peer_starved_credit_update_sent() {
    let mut o = One::established();
    for _ in 0..14 {
        o.data(b"x").unwrap();
    }
    let mut b = [0u8; 64];
    o.c.recv(o.now, &mut b, false).unwrap();
    let sent = o.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1.len(), 16, "an empty Data is a pure credit update");
    assert!(sent[0].0.bufs >= 14);
}

// -- SO_KEEPALIVE set at run time (SDP-WIRE.md §5.4) ------------------------------------------

fn probes(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| **e == Event::KeepaliveProbe)
        .count()
}

#[test]
fn established_set_keepalive_idle_probes_each_idle_period() {
    let mut o = One::established();
    assert_eq!(o.c.poll_timeout(), None, "keepalive is off by default");
    o.c.set_keepalive(o.now, Some(std::time::Duration::from_secs(2)));
    assert_eq!(o.c.keepalive(), Some(std::time::Duration::from_secs(2)));
    assert_eq!(
        o.c.poll_timeout(),
        Some(o.now + std::time::Duration::from_secs(2))
    );
    o.advance(1.0);
    assert_eq!(probes(&o.events()), 0, "not idle for a whole period yet");
    o.advance(1.0);
    assert_eq!(probes(&o.events()), 1, "idle for the idle time: one probe");
    assert!(o.sent().is_empty(), "a probe is no SDP message");
    o.advance(2.0);
    assert_eq!(probes(&o.events()), 1, "still idle: probes again");
    assert_eq!(o.c.state(), StateKind::Established);
}

#[test]
fn established_keepalive_traffic_in_period_no_probe() {
    let mut o = One::established();
    o.c.set_keepalive(o.now, Some(std::time::Duration::from_secs(2)));
    o.advance(1.0);
    o.data(b"x").unwrap();
    o.advance(1.0);
    assert_eq!(probes(&o.events()), 0, "a message moved: not idle");
    o.advance(2.0);
    assert_eq!(probes(&o.events()), 1);
}

#[test]
fn established_set_keepalive_none_stops_timer() {
    let mut o = One::established();
    o.c.set_keepalive(o.now, Some(std::time::Duration::from_secs(2)));
    o.c.set_keepalive(o.now, None);
    assert_eq!(o.c.poll_timeout(), None);
    o.advance(10.0);
    assert_eq!(probes(&o.events()), 0);
}

#[test]
fn hello_sent_set_keepalive_armed_at_establish() {
    let mut o = One::active(Config::default());
    o.c.set_keepalive(o.now, Some(std::time::Duration::from_secs(3)));
    assert_eq!(
        o.c.poll_timeout(),
        None,
        "nothing to probe before the HelloAck"
    );
    o.now = o.now + std::time::Duration::from_secs(1);
    o.c.handle_hello_ack(o.now, &hello_ack(8, 0x22, 1)).unwrap();
    assert_eq!(
        o.c.poll_timeout(),
        Some(o.now + std::time::Duration::from_secs(3))
    );
}

#[test]
fn established_keepalive_probe_failed_times_out() {
    let mut o = One::established();
    o.c.set_keepalive(o.now, Some(std::time::Duration::from_secs(1)));
    o.advance(1.0);
    assert_eq!(probes(&o.events()), 1);
    let r =
        o.c.handle_transport_error(o.now, TransportFailure::Keepalive);
    let e = ConnectionError::Transport(TransportFailure::Keepalive);
    assert_eq!(r, Err(HandleError::Fatal(e)));
    assert_eq!(
        e.io_kind(),
        std::io::ErrorKind::TimedOut,
        "ETIMEDOUT, as TCP"
    );
    assert_eq!(o.c.state(), StateKind::Closed);
    assert_eq!(o.c.poll_timeout(), None);
    o.c.set_keepalive(o.now, Some(std::time::Duration::from_secs(1)));
    assert_eq!(o.c.poll_timeout(), None, "a closed connection arms nothing");
}
