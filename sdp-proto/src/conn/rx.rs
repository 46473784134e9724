//! Received messages: validation, credits, dispatch by message ID.

use super::credits::Credits;
use super::state::State;
use super::zcopy::ZcopySink;
use super::{Connection, Control, Event, PendingResize, Timer};
use crate::error::{ConnectionError, HandleError, ProtocolViolation};
use crate::time::Timestamp;
use crate::wire::{BSDH_LEN, Body, Bsdh, BsdhRepr, Flags, MessageId, MessageRepr};

/// A received payload: bytes at hand, or `n` bytes the host copies from offset `at` of its
/// receive buffer (`handle_message_from`).
enum Payload<'a> {
    Bytes(&'a [u8]),
    From(usize, usize, &'a mut dyn FnMut(usize, &mut [u8])),
    /// `n` bytes the host may keep in its receive buffer (`handle_message_deferred`);
    /// `read` copies them if the queue cannot leave them there.
    Deferrable(usize, usize, &'a mut dyn FnMut(usize, &mut [u8])),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::From(n, ..) | Payload::Deferrable(n, ..) => *n,
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Connection {
    /// One message from a receive completion: exactly the bytes the buffer received.
    /// A peer that breaks the protocol ends this connection (`HandleError::Fatal`).
    pub fn handle_message(&mut self, now: Timestamp, bytes: &[u8]) -> Result<(), HandleError> {
        match self.state {
            State::Closed { .. } => return Err(HandleError::Closed),
            State::HelloSent => return Err(HandleError::InvalidState(self.state.kind())),
            // LINUX: a receive completion before the RTU establishes the child (§2.1).
            State::HelloAckSent => self.establish(now),
            _ => {}
        }
        match self.receive(now, bytes) {
            Ok(()) => Ok(()),
            Err(v) => Err(self.die(ConnectionError::ProtocolViolation(v), true)),
        }
    }

    fn rx_limit(&self) -> u32 {
        match self.resize {
            Some(r) if r.old_left > 0 => r.old_size,
            _ => self.recv_buf_size,
        }
    }

    /// As [`handle_message`](Self::handle_message) for a message of `len` bytes that `read`
    /// copies out of the host's receive buffer (`read(offset, dst)` fills `dst` with the bytes
    /// at `offset`). A Data message's payload goes straight into the receive queue, without a
    /// copy into a staging buffer first; its header is read once, into private memory, before
    /// it is parsed (a buffer the peer can still write is hostile input). Other messages are
    /// read whole into `scratch` (at least `len` bytes) and handled as by `handle_message`.
    pub fn handle_message_from(
        &mut self,
        now: Timestamp,
        len: usize,
        scratch: &mut [u8],
        read: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<(), HandleError> {
        self.handle_message_inner(now, len, scratch, read, false)
            .map(|_| ())
    }

    /// As [`handle_message_from`](Self::handle_message_from), but a Data message's payload
    /// may stay in the host's receive buffer until the application reads it: `Ok(true)` says
    /// it stayed, the `len - BSDH_LEN` bytes at offset `BSDH_LEN` are now the last of the
    /// host's deferred bytes (see [`recv_with`](Self::recv_with)), and the host must not
    /// reuse that buffer before they are released. A host that reads this way saves a copy
    /// of every byte the application reads while nothing else waits ahead of them (no
    /// queued bytes, no urgent mark).
    pub fn handle_message_deferred(
        &mut self,
        now: Timestamp,
        len: usize,
        scratch: &mut [u8],
        read: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<bool, HandleError> {
        self.handle_message_inner(now, len, scratch, read, true)
    }

    fn handle_message_inner(
        &mut self,
        now: Timestamp,
        len: usize,
        scratch: &mut [u8],
        read: &mut dyn FnMut(usize, &mut [u8]),
        may_defer: bool,
    ) -> Result<bool, HandleError> {
        let mut hdr = [0u8; BSDH_LEN];
        let data = len > BSDH_LEN && len <= self.rx_limit() as usize && {
            read(0, &mut hdr);
            matches!(
                Bsdh::new_checked(&hdr[..]).and_then(|b| BsdhRepr::parse(&b)),
                Ok(b) if b.mid == MessageId::Data && b.len as usize == len
            )
        };
        if !data {
            let n = len.min(scratch.len());
            read(0, &mut scratch[..n]);
            return self.handle_message(now, &scratch[..n]).map(|()| false);
        }
        let Ok(bsdh) = Bsdh::new_checked(&hdr[..]).and_then(|b| BsdhRepr::parse(&b)) else {
            unreachable!("parsed above")
        };
        match self.state {
            State::Closed { .. } => return Err(HandleError::Closed),
            State::HelloSent => return Err(HandleError::InvalidState(self.state.kind())),
            State::HelloAckSent => self.establish(now),
            _ => {}
        }
        let payload = if may_defer {
            Payload::Deferrable(len - BSDH_LEN, BSDH_LEN, read)
        } else {
            Payload::From(len - BSDH_LEN, BSDH_LEN, read)
        };
        let r = self
            .receive_header(&bsdh, len)
            .and_then(|()| self.on_data(&bsdh, payload));
        match r {
            Ok(deferred) => Ok(deferred),
            Err(v) => Err(self.die(ConnectionError::ProtocolViolation(v), true)),
        }
    }

    /// What every received message does before its body: the size limit, credits, counters.
    fn receive_header(&mut self, bsdh: &BsdhRepr, len: usize) -> Result<(), ProtocolViolation> {
        let limit = self.rx_limit();
        if len > limit as usize {
            return Err(ProtocolViolation::TooLong { len, max: limit });
        }
        self.credits.on_receive(bsdh)?;
        self.activity += 1;
        self.stats.messages_received += 1;
        if let Some(r) = self.resize.as_mut() {
            r.old_left = r.old_left.saturating_sub(1);
            if r.old_left == 0 {
                let ack = r.ack;
                self.resize = None;
                self.push_control(Control::ChRcvBufAck(ack));
            }
        }
        Ok(())
    }

    fn receive(&mut self, now: Timestamp, bytes: &[u8]) -> Result<(), ProtocolViolation> {
        let msg = MessageRepr::parse(bytes).map_err(ProtocolViolation::Malformed)?;
        self.receive_header(&msg.bsdh, bytes.len())?;
        self.receive_body(now, msg)
    }

    fn receive_body(
        &mut self,
        now: Timestamp,
        msg: MessageRepr<'_>,
    ) -> Result<(), ProtocolViolation> {
        let bsdh = msg.bsdh;
        match msg.body {
            Body::Data(payload) => self.on_data(&bsdh, Payload::Bytes(payload)).map(|_| ()),
            Body::DisConn => self.on_disconn(now),
            Body::AbortConn => {
                // LINUX: reset whatever the state (MLNX); OPENIB is stricter (§5.2).
                self.die(ConnectionError::PeerAborted, true);
                Ok(())
            }
            Body::SendSm => {
                if let Some(src) = &self.src
                    && let Some(m) = src.mseq
                    && Credits::acks(bsdh.mseq_ack, m)
                {
                    self.finish_src(false);
                }
                // A SendSM older than our SrcAvail, or after completion, is stale (§3.1).
                Ok(())
            }
            Body::RdmaRdCompl(r) => self.on_rdma_rd_compl(&bsdh, r.len, now),
            Body::SrcAvail { header, payload } => {
                if !self.state.peer_send_open() {
                    return Err(ProtocolViolation::DataAfterDisConn);
                }
                if self.sink.is_some() {
                    return Err(ProtocolViolation::SrcAvailOutstanding);
                }
                if payload.len() > header.len as usize {
                    return Err(ProtocolViolation::SrcAvailInlineTooLong {
                        len: header.len,
                        inline: payload.len(),
                    });
                }
                self.deliver(payload, false);
                let inline = payload.len() as u32;
                if header.len == inline {
                    self.push_control(Control::RdmaRdCompl(0));
                } else if !self.zcopy_recv_ok || self.shut_rd {
                    // Refuse: the source sends the rest as Data (§4.3, §8.7).
                    self.push_control(Control::SendSm);
                } else {
                    // INVARIANT: our RdmaRdCompl/SendSM carry MSeqAck = last received ≥ this
                    // SrcAvail's MSeq, which is how the source matches them (§3.1).
                    self.sink = Some(ZcopySink {
                        rkey: header.rkey,
                        vaddr: header.vaddr,
                        len: header.len,
                        next: inline,
                        in_flight: None,
                        unreported: 0,
                        cancelled: false,
                    });
                    self.issue_read();
                }
                Ok(())
            }
            Body::SrcAvailCancel => {
                if let Some(sink) = self.sink.as_mut() {
                    sink.cancelled = true;
                    if sink.in_flight.is_none() {
                        let unreported = sink.unreported;
                        self.sink = None;
                        if unreported > 0 {
                            self.push_control(Control::RdmaRdCompl(unreported));
                        }
                        self.push_control(Control::SendSm);
                    }
                }
                // Otherwise the advertisement completed as the cancel crossed it: nothing to do.
                Ok(())
            }
            Body::ChRcvBuf(c) => {
                self.on_ch_rcv_buf(c.size);
                Ok(())
            }
            Body::ChRcvBufAck(c) => {
                // LINUX: adopt a larger size as the payload goal, keeping a 16-byte margin
                // since MLNX's ack omits the BSDH (§7.9).
                self.resize_requested = false;
                let goal = c.size.saturating_sub(16);
                if goal > self.send_goal {
                    self.send_goal = goal;
                }
                Ok(())
            }
            // LINUX: MLNX warns and ignores ModeChange; this engine stays in Combined mode.
            Body::ModeChange(_) => Ok(()),
            // LINUX: MLNX resets on SinkAvail (§4.4); we never enter Pipelined receive mode.
            Body::SinkAvail { .. } => Err(ProtocolViolation::Unsupported(MessageId::SinkAvail)),
            Body::SuspComm(_) => Err(ProtocolViolation::Unsupported(MessageId::SuspComm)),
            Body::SuspCommAck => Err(ProtocolViolation::Unsupported(MessageId::SuspCommAck)),
            Body::Unknown { mid, .. } => Err(ProtocolViolation::Unsupported(MessageId::from(mid))),
            // We never send SinkAvail, so none of its answers may come; Hello/HelloAck never
            // travel on the QP.
            Body::RdmaWrCompl(_)
            | Body::SinkAvailCancel
            | Body::SinkCancelAck
            | Body::Hello(_)
            | Body::HelloAck(_) => Err(ProtocolViolation::Unexpected {
                mid: msg.bsdh.mid,
                state: self.state.kind(),
            }),
        }
    }

    fn deliver(&mut self, payload: &[u8], urgent_last: bool) {
        self.deliver_from(Payload::Bytes(payload), urgent_last);
    }

    /// Queues a payload; `true`: it stayed with the host (deferred).
    fn deliver_from(&mut self, payload: Payload<'_>, urgent_last: bool) -> bool {
        self.stats.bytes_received += payload.len() as u64;
        if self.shut_rd {
            return false;
        }
        match payload {
            Payload::Bytes(b) => self.recv.push(b, urgent_last),
            Payload::Deferrable(n, ..) if !urgent_last && self.recv.may_defer() => {
                self.recv.defer(n);
                return true;
            }
            Payload::From(n, at, read) | Payload::Deferrable(n, at, read) => {
                self.recv
                    .push_from(n, urgent_last, &mut |off, dst| read(at + off, dst))
            }
        }
        false
    }

    /// A Data message's payload; `Ok(true)`: it stayed with the host (deferred).
    fn on_data(
        &mut self,
        bsdh: &BsdhRepr,
        payload: Payload<'_>,
    ) -> Result<bool, ProtocolViolation> {
        let pres = bsdh.flags.contains(Flags::OOB_PRES);
        let pend = bsdh.flags.contains(Flags::OOB_PEND);
        if payload.is_empty() {
            // A pure credit update: applied above, dropped here, in any state (§3.3).
            if pres {
                return Err(ProtocolViolation::UrgentWithoutPayload);
            }
            return Ok(false);
        }
        if !self.state.peer_send_open() {
            return Err(ProtocolViolation::DataAfterDisConn);
        }
        if self.sink.is_some() {
            return Err(ProtocolViolation::SrcAvailOutstanding);
        }
        if (pres || pend) && !self.peer_urgent_pending {
            // LINUX: SIGURG on receipt (§1.2).
            self.events.push_back(Event::UrgentPending);
        }
        self.peer_urgent_pending = pend && !pres;
        Ok(self.deliver_from(payload, pres))
    }

    fn on_disconn(&mut self, now: Timestamp) -> Result<(), ProtocolViolation> {
        if !self.state.peer_send_open() {
            return Err(ProtocolViolation::Unexpected {
                mid: MessageId::DisConn,
                state: self.state.kind(),
            });
        }
        if self.sink.is_some() {
            return Err(ProtocolViolation::SrcAvailOutstanding);
        }
        self.events.push_back(Event::PeerHalfClosed);
        self.state = match self.state {
            State::FinWait1 { disconn_sent: true } => {
                // We sent ours first: we start the CM teardown (§5.1).
                self.timers.stop(Timer::FinWait);
                self.timers
                    .set(Timer::TimeWait, now + self.config.time_wait_timeout);
                self.events.push_back(Event::Disconnect { abortive: false });
                State::TimeWait
            }
            State::FinWait1 {
                disconn_sent: false,
            } => State::LastAck {
                disconn_sent: false,
            },
            _ => State::CloseWait,
        };
        Ok(())
    }

    fn on_rdma_rd_compl(
        &mut self,
        bsdh: &BsdhRepr,
        len: u32,
        now: Timestamp,
    ) -> Result<(), ProtocolViolation> {
        let Some(src) = self.src.as_mut() else {
            return Err(ProtocolViolation::Unexpected {
                mid: MessageId::RdmaRdCompl,
                state: self.state.kind(),
            });
        };
        let Some(m) = src.mseq else {
            return Err(ProtocolViolation::Unexpected {
                mid: MessageId::RdmaRdCompl,
                state: self.state.kind(),
            });
        };
        if !Credits::acks(bsdh.mseq_ack, m) {
            // LINUX: ignored when older than the pending SrcAvail (§3.1).
            return Ok(());
        }
        if len > src.remaining() {
            return Err(ProtocolViolation::RdmaRdComplTooLong {
                reported: len,
                remaining: src.remaining(),
            });
        }
        src.reported += len;
        self.stats.zcopy_bytes_sent += u64::from(len);
        if src.remaining() == 0 {
            self.finish_src(true);
        } else if !src.cancelled {
            // Progress: the 1 s budget starts again.
            self.timers
                .set(Timer::SrcAvailAdvert, now + self.config.srcavail_timeout);
        }
        Ok(())
    }

    fn on_ch_rcv_buf(&mut self, requested: u32) {
        let current = self.recv_buf_size - 16;
        let wanted = requested.saturating_add(16);
        if !self.config.allow_recv_resize
            || requested <= current
            || wanted > self.config.max_recv_buffer_size
        {
            // OPENIB answers every ChRcvBuf with its unchanged size.
            self.push_control(Control::ChRcvBufAck(current));
            return;
        }
        // Post new buffers of the new size from now on; acknowledge only when every buffer
        // posted before the request has been consumed (§7.9 safe course).
        let old_left = self.credits.posted();
        let old_size = self.rx_limit();
        self.recv_buf_size = wanted;
        if old_left == 0 {
            self.push_control(Control::ChRcvBufAck(requested));
        } else {
            self.resize = Some(PendingResize {
                old_left,
                old_size,
                ack: requested,
            });
        }
    }
}
