//! Credits, MSeq and MSeqAck (SDP-WIRE.md §3).
//!
//! Transmit side: `credits = Bufs − ((next_MSeq − 1) − MSeqAck)`, recomputed from every
//! received BSDH (Bufs is absolute, so each BSDH *replaces* the estimate, §3.1). A message
//! with payload needs ≥ 3 credits, other control messages ≥ 2, and the last credit may only
//! carry a pure credit update (CA4-82, §3.2).
//!
//! Receive side: `posted` counts buffers the host has posted and no message has consumed;
//! `peer_view` is what the peer believes it may still send: the Bufs we last advertised
//! minus the messages received since.
//!
//! Credit update rule (§3.3, adapted). MLNX sends an empty Data when `1.5·c < posted` for
//! `c > 2`, or `c < posted` for small `c`. Taken literally, two idle peers with three or
//! fewer posted buffers answer each other's update forever, since every update consumes the
//! buffer it advertises. Here the small-`c` case is a floor instead: the peer is kept at ≥ 3
//! credits (data possible) when 4 or more buffers are posted, ≥ 2 (control possible) with 3,
//! ≥ 1 with 2. INVARIANT: after a received pure update is reposted (`c = posted − 1`),
//! none of these conditions holds, so an update never answers an update; yet whenever the
//! peer is below the floor, an update goes out, so the peer is never starved by us.
//!
//! Last credit and deadlock. If both peers spent their last credit at once (crossing
//! messages, both windows full at two posted buffers) neither could ever send again: RC
//! gives no way out (an RNR against Linux is fatal, §7.14). The two roles therefore differ:
//! - the **active** side may spend its last credit on a pure update, or on a control message
//!   that advertises buffers the peer has not heard of (CA4-82 as OPENIB reads it), and it
//!   keeps the passive peer at ≥ 2 credits even with a full window (floor 2), so the passive
//!   side can always send control messages (SrcAvailCancel, RdmaRdCompl, DisConn);
//! - the **passive** side spends its last credit only on a pure update, and only when the
//!   active side is at zero (`c = 0`): then every active message has arrived, the update
//!   acknowledges them all, and the active side gets ≥ 2 credits back.
//!
//! So the two are never at zero together. The active side with a control message waiting
//! and one credit left sends a *request* (a pure update), which the passive side sees as
//! `c = 0` and answers. The asymmetric floors also stop two idle peers from answering each
//! other's updates: the passive side's floor is stable at two posted buffers.

use crate::error::ProtocolViolation;
use crate::wire::BsdhRepr;

/// Credits a message with payload (Data, SrcAvail) needs.
pub const DATA_CREDITS: u32 = 3;
/// Credits a control message (DisConn, RdmaRdCompl, SendSM, ...) needs.
pub const CONTROL_CREDITS: u32 = 2;
/// Credits a pure credit update needs.
pub const UPDATE_CREDITS: u32 = 1;

/// What a message needs from the credit pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageClass {
    /// Data with payload, SrcAvail.
    Payload,
    /// Any other message but a pure update.
    Control,
    /// Empty Data.
    Update,
}

impl MessageClass {
    pub(crate) fn needs(self) -> u32 {
        match self {
            MessageClass::Payload => DATA_CREDITS,
            MessageClass::Control => CONTROL_CREDITS,
            MessageClass::Update => UPDATE_CREDITS,
        }
    }
}

/// Flow-control bookkeeping for both directions.
#[derive(Debug, Clone)]
pub(crate) struct Credits {
    /// MSeq of our next message; the first QP message is 1 (§2.1).
    next_mseq: u32,
    /// Bufs of the last BSDH (or Hello/HelloAck) from the peer.
    peer_bufs: u32,
    /// MSeqAck of the last BSDH from the peer.
    peer_mseq_ack: u32,
    /// MSeq of the last message received; 0 = none yet.
    last_rx_mseq: u32,
    /// Receive buffers posted and not consumed.
    posted: u32,
    /// Bufs we last advertised.
    advertised: u32,
    /// Messages received since we last advertised.
    rx_since_adv: u32,
    /// Active side (sent the Hello): the asymmetry that rules out a credit deadlock.
    active: bool,
}

/// The BSDH fields of a message about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) mseq: u32,
    pub(crate) mseq_ack: u32,
    pub(crate) bufs: u16,
}

impl Credits {
    pub(crate) fn new(active: bool) -> Self {
        Credits {
            active,
            next_mseq: 1,
            peer_bufs: 0,
            peer_mseq_ack: 0,
            last_rx_mseq: 0,
            posted: 0,
            advertised: 0,
            rx_since_adv: 0,
        }
    }

    /// Takes the peer's initial credits from its Hello/HelloAck (MSeq 0, MSeqAck 0).
    pub(crate) fn set_initial_peer_bufs(&mut self, bufs: u16) {
        self.peer_bufs = bufs.into();
    }

    /// Records what our Hello/HelloAck advertised.
    pub(crate) fn set_initial_advertised(&mut self) {
        self.advertised = self.posted;
        self.rx_since_adv = 0;
    }

    /// Messages we sent that the peer had not received when it sent its last BSDH.
    pub(crate) fn in_flight(&self) -> u32 {
        self.next_mseq
            .wrapping_sub(1)
            .wrapping_sub(self.peer_mseq_ack)
    }

    /// Current transmit credits (never negative: a peer that shrank below its in-flight count
    /// simply leaves us at zero).
    pub(crate) fn tx_credits(&self) -> u32 {
        self.peer_bufs.saturating_sub(self.in_flight())
    }

    /// Whether a message of this class may be sent now (module docs, "last credit").
    pub(crate) fn can_send(&self, class: MessageClass) -> bool {
        let credits = self.tx_credits();
        if credits > UPDATE_CREDITS {
            return credits >= class.needs();
        }
        if credits == 0 {
            return false;
        }
        match class {
            MessageClass::Payload => false,
            // CA4-82: the last credit only for a message that adds credits and carries no
            // ULP payload (OPENIB `sdp_send_ctrl_buff_test`, SDP-WIRE.md §7.11).
            MessageClass::Control => self.active && self.posted > self.peer_view(),
            MessageClass::Update => self.active || self.peer_view() == 0,
        }
    }

    /// Validates and applies a received BSDH; consumes one posted buffer.
    pub(crate) fn on_receive(&mut self, b: &BsdhRepr) -> Result<(), ProtocolViolation> {
        if self.posted == 0 {
            return Err(ProtocolViolation::NoReceiveBuffer);
        }
        let expected = self.last_rx_mseq.wrapping_add(1);
        if b.mseq != expected {
            return Err(ProtocolViolation::BadSequence {
                expected,
                got: b.mseq,
            });
        }
        // MSeqAck moves forward by at most the messages in flight (RC delivers in order).
        let newly_acked = b.mseq_ack.wrapping_sub(self.peer_mseq_ack);
        if newly_acked > self.in_flight() {
            return Err(ProtocolViolation::BadAck {
                mseq_ack: b.mseq_ack,
            });
        }
        self.posted -= 1;
        self.last_rx_mseq = b.mseq;
        self.peer_mseq_ack = b.mseq_ack;
        self.peer_bufs = b.bufs.into();
        self.rx_since_adv = self.rx_since_adv.saturating_add(1);
        Ok(())
    }

    /// Numbers and stamps the next message; the caller has checked `can_send`.
    pub(crate) fn on_send(&mut self) -> Stamp {
        let mseq = self.next_mseq;
        self.next_mseq = self.next_mseq.wrapping_add(1);
        let bufs = self.posted.min(u16::MAX.into()) as u16;
        self.advertised = bufs.into();
        self.rx_since_adv = 0;
        Stamp {
            mseq,
            mseq_ack: self.last_rx_mseq,
            bufs,
        }
    }

    /// The host posted `n` more receive buffers.
    pub(crate) fn on_posted(&mut self, n: u32) {
        self.posted = self.posted.saturating_add(n);
    }

    pub(crate) fn posted(&self) -> u32 {
        self.posted
    }

    /// Whether `mseq_ack` covers our message `mseq` (wrapping compare, §3.1).
    pub(crate) fn acks(mseq_ack: u32, mseq: u32) -> bool {
        (mseq_ack.wrapping_sub(mseq) as i32) >= 0
    }

    /// Credits the peer believes it has toward us.
    pub(crate) fn peer_view(&self) -> u32 {
        self.advertised.saturating_sub(self.rx_since_adv)
    }

    /// Whether a pure credit update should be sent (module docs).
    pub(crate) fn update_needed(&self) -> bool {
        let c = self.peer_view();
        let posted = self.posted;
        if posted <= c {
            return false;
        }
        let floor = match posted {
            0..=2 if self.active => CONTROL_CREDITS,
            0..=2 => UPDATE_CREDITS,
            3 => CONTROL_CREDITS,
            _ => DATA_CREDITS,
        };
        c < floor || (c > 2 && c + c / 2 < posted)
    }

    /// Whether the active side should spend its last credit on a pure update to ask for
    /// more: a control message waits and the passive peer's floor (1 with a full window)
    /// would leave us at one credit. The peer then sees `c = 0`, which it answers.
    pub(crate) fn request_needed(&self, control_waiting: bool) -> bool {
        self.active && control_waiting && self.tx_credits() == UPDATE_CREDITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Flags, MessageId};

    fn bsdh(bufs: u16, mseq: u32, mseq_ack: u32) -> BsdhRepr {
        BsdhRepr {
            mid: MessageId::Data,
            flags: Flags::EMPTY,
            bufs,
            len: 16,
            mseq,
            mseq_ack,
        }
    }

    #[test]
    fn credits_formula_matches_spec() {
        let mut c = Credits::new(true);
        c.set_initial_peer_bufs(10);
        c.on_posted(4);
        assert_eq!(c.tx_credits(), 10);
        for _ in 0..4 {
            c.on_send();
        }
        assert_eq!(c.tx_credits(), 6);
        // Peer saw 3 of our 4 messages, reposted, has 9 posted: 9 − (4 − 3) = 8.
        c.on_receive(&bsdh(9, 1, 3)).unwrap();
        assert_eq!(c.tx_credits(), 8);
    }

    #[test]
    fn credits_thresholds_follow_ca4_82() {
        let mut c = Credits::new(true);
        c.set_initial_peer_bufs(3);
        assert!(c.can_send(MessageClass::Payload));
        c.on_send();
        assert!(!c.can_send(MessageClass::Payload));
        assert!(c.can_send(MessageClass::Control));
        c.on_send();
        assert!(!c.can_send(MessageClass::Control));
        assert!(c.can_send(MessageClass::Update));
        // Unless the control message advertises new buffers.
        c.on_posted(1);
        assert!(c.can_send(MessageClass::Control));
    }

    #[test]
    fn credits_bad_sequence_or_ack_rejected() {
        let mut c = Credits::new(true);
        c.on_posted(4);
        assert_eq!(
            c.on_receive(&bsdh(1, 2, 0)),
            Err(ProtocolViolation::BadSequence {
                expected: 1,
                got: 2
            })
        );
        assert_eq!(
            c.on_receive(&bsdh(1, 1, 1)),
            Err(ProtocolViolation::BadAck { mseq_ack: 1 })
        );
        let mut d = Credits::new(true);
        assert_eq!(
            d.on_receive(&bsdh(1, 1, 0)),
            Err(ProtocolViolation::NoReceiveBuffer)
        );
    }

    #[test]
    fn credits_update_exchange_terminates() {
        for active in [true, false] {
            for posted in 2..40u32 {
                let mut c = Credits::new(active);
                c.on_posted(posted);
                c.on_send(); // advertise `posted`
                c.on_receive(&bsdh(8, 1, 1)).unwrap(); // a pure update consumed one buffer
                c.on_posted(1); // and the host reposted it
                // Only the active side with a full window answers; the passive side's floor
                // is 1 there, so the exchange stops after one answer.
                let answers = active && posted == 2;
                assert_eq!(
                    c.update_needed(),
                    answers,
                    "active {active} posted {posted}"
                );
            }
        }
    }

    #[test]
    fn credits_passive_last_credit_only_when_peer_at_zero() {
        let mut c = Credits::new(false);
        c.set_initial_peer_bufs(2);
        c.on_posted(2);
        c.on_send();
        assert_eq!(c.tx_credits(), 1);
        assert!(!c.can_send(MessageClass::Update), "peer not at zero");
        c.on_receive(&bsdh(2, 1, 0)).unwrap();
        c.on_receive(&bsdh(2, 2, 0)).unwrap();
        c.on_posted(2);
        assert_eq!(c.peer_view(), 0);
        assert!(c.can_send(MessageClass::Update));
        assert!(!c.can_send(MessageClass::Control));
    }

    #[test]
    fn credits_request_from_last_credit_is_answered_with_full_window() {
        let mut c = Credits::new(false);
        c.on_posted(2);
        c.on_send(); // advertise 2
        c.on_receive(&bsdh(8, 1, 1)).unwrap(); // peer's ordinary update: c = 1
        c.on_posted(1);
        assert!(!c.update_needed());
        c.on_receive(&bsdh(2, 2, 1)).unwrap(); // peer's request from its last credit: c = 0
        c.on_posted(1);
        assert!(c.update_needed());
    }

    #[test]
    fn credits_update_sent_when_peer_starves() {
        let mut c = Credits::new(true);
        c.on_posted(8);
        c.on_send();
        for i in 1..=6 {
            c.on_receive(&bsdh(8, i, 1)).unwrap();
        }
        c.on_posted(6);
        assert_eq!(c.peer_view(), 2);
        assert!(c.update_needed());
    }
}
