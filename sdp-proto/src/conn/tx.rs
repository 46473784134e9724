//! Building messages to send: control first, then our SrcAvail or Data, then DisConn, then
//! a pure credit update; every one gated by its credit class (SDP-WIRE.md §3.2).

use super::credits::MessageClass;
use super::state::State;
use super::{Connection, Control, Timer, Transmit};
use crate::error::SendError;
use crate::time::Timestamp;
use crate::wire::{
    BSDH_LEN, Body, Bsdh, BsdhRepr, ChRcvBufRepr, Flags, MessageId, MessageRepr, RdmaComplRepr,
    SrcAvailRepr,
};

impl Connection {
    /// Writes the next message to post into `buf` (a registered send buffer; at least
    /// [`send_buffer_len`](Self::send_buffer_len) bytes to carry full-size Data). `None`:
    /// nothing to send, or no credit, or `max_send_wr` sends in flight.
    pub fn poll_transmit(&mut self, now: Timestamp, buf: &mut [u8]) -> Option<Transmit> {
        if !self.state.can_transmit()
            || self.sends_in_flight >= self.config.max_send_wr
            || buf.len() < 36
        {
            return None;
        }
        if let Some(&c) = self.control.front()
            && self.credits.can_send(MessageClass::Control)
        {
            self.control.pop_front();
            let body = match c {
                Control::RdmaRdCompl(len) => Body::RdmaRdCompl(RdmaComplRepr { len }),
                Control::SendSm => Body::SendSm,
                Control::SrcAvailCancel => Body::SrcAvailCancel,
                Control::ChRcvBuf(size) => Body::ChRcvBuf(ChRcvBufRepr { size }),
                Control::ChRcvBufAck(size) => Body::ChRcvBufAck(ChRcvBufRepr { size }),
            };
            return Some(self.emit(now, buf, Flags::EMPTY, body));
        }
        if self.credits.can_send(MessageClass::Payload) {
            if let Some(t) = self.transmit_srcavail(now, buf) {
                return Some(t);
            }
            if self.src.is_none() && !self.send.is_empty() {
                return Some(self.transmit_data(buf));
            }
        }
        if self.disconn_due() && self.credits.can_send(MessageClass::Control) {
            // LINUX: DisConn only behind all data and with ≥ 2 credits (CA4-82, §7.11).
            let t = self.emit(now, buf, Flags::EMPTY, Body::DisConn);
            self.state = match self.state {
                State::FinWait1 { .. } => {
                    if self.orphan {
                        self.timers
                            .set(Timer::FinWait, now + self.config.fin_wait_timeout);
                    }
                    State::FinWait1 { disconn_sent: true }
                }
                _ => {
                    self.timers
                        .set(Timer::LastAck, now + self.config.last_ack_timeout);
                    State::LastAck { disconn_sent: true }
                }
            };
            return Some(t);
        }
        let blocked = !self.control.is_empty() || self.disconn_due();
        if (self.credits.update_needed() || self.credits.request_needed(blocked))
            && self.credits.can_send(MessageClass::Update)
        {
            self.stats.credit_updates_sent += 1;
            return Some(self.emit(now, buf, Flags::EMPTY, Body::Data(&[])));
        }
        None
    }

    /// Bytes a send buffer needs for the largest message this connection may send.
    pub fn send_buffer_len(&self) -> usize {
        self.send_goal as usize + BSDH_LEN
    }

    fn disconn_due(&self) -> bool {
        matches!(
            self.state,
            State::FinWait1 {
                disconn_sent: false
            } | State::LastAck {
                disconn_sent: false
            }
        ) && self.send.is_empty()
            && self.src.is_none()
    }

    fn emit(&mut self, _now: Timestamp, buf: &mut [u8], flags: Flags, body: Body<'_>) -> Transmit {
        let stamp = self.credits.on_send();
        let msg = MessageRepr::new(flags, stamp.bufs, stamp.mseq, stamp.mseq_ack, body);
        // Callers guarantee room: control bodies are ≤ 24 bytes and buf holds ≥ 36.
        let len = msg.emit(buf).unwrap_or(0);
        self.sent_one();
        Transmit {
            len,
            mid: msg.bsdh.mid,
            mseq: stamp.mseq,
            solicited: false,
        }
    }

    fn sent_one(&mut self) {
        self.sends_in_flight += 1;
        self.activity += 1;
        self.stats.messages_sent += 1;
    }

    fn transmit_srcavail(&mut self, now: Timestamp, buf: &mut [u8]) -> Option<Transmit> {
        let src = self.src.as_ref()?;
        if src.mseq.is_some() || buf.len() < 32 + src.inline.len() {
            return None;
        }
        let header = SrcAvailRepr {
            len: src.len,
            rkey: src.rkey,
            vaddr: src.vaddr,
        };
        let inline = src.inline.clone();
        let t = self.emit(
            now,
            buf,
            Flags::EMPTY,
            Body::SrcAvail {
                header,
                payload: &inline,
            },
        );
        self.stats.srcavails_sent += 1;
        self.stats.bytes_sent += inline.len() as u64;
        if let Some(src) = self.src.as_mut() {
            src.mseq = Some(t.mseq);
        }
        self.timers
            .set(Timer::SrcAvailAdvert, now + self.config.srcavail_timeout);
        Some(t)
    }

    /// As [`poll_transmit`](Self::poll_transmit), but a Data message is handed to `post` as
    /// pieces (its header, then the payload straight from the send queue) instead of being
    /// copied into a buffer first: a host whose post copies anyway (into a ring) saves a copy
    /// of every byte. Other messages are written into `scratch` and handed over whole. `post`
    /// runs exactly once per `Some`; `max_len` is the largest message the peer takes.
    pub fn poll_transmit_gather(
        &mut self,
        now: Timestamp,
        max_len: usize,
        scratch: &mut [u8],
        post: &mut dyn FnMut(&Transmit, &[&[u8]]),
    ) -> Option<Transmit> {
        if self.send.is_empty() || !self.data_may_go(max_len) {
            let t = self.poll_transmit(now, scratch)?;
            post(&t, &[&scratch[..t.len]]);
            return Some(t);
        }
        let mut hdr = [0u8; BSDH_LEN];
        let (t, n) = self.data_header(max_len, &mut hdr);
        let (a, b) = self.send.first(n);
        post(&t, &[&hdr, a, b]);
        self.send.consume(n);
        Some(t)
    }

    /// As [`send`](Self::send) followed by [`poll_transmit_gather`](Self::poll_transmit_gather),
    /// but while nothing is queued and a Data message may go now, `data` goes to `post` as
    /// Data messages straight from the caller's buffer: a host whose post copies into the
    /// peer's ring copies each byte once instead of twice (into the send queue, then out of
    /// it). What may not go now is queued as `send` queues it; a call takes at most what the
    /// send queue has room for, as `send`. Returns the bytes taken, sent or queued; the
    /// errors are `send`'s. `post` runs once per message sent and says whether the message
    /// went; after one that did not (the transport failed), the call takes nothing more.
    pub fn send_through(
        &mut self,
        now: Timestamp,
        data: &[u8],
        max_len: usize,
        post: &mut dyn FnMut(&Transmit, &[&[u8]]) -> bool,
    ) -> Result<usize, SendError> {
        self.send_checks()?;
        // A send takes what the send buffer (SO_SNDBUF) has room for, sent at once or not:
        // taking more let a program push a whole file into a slow reader's window in one call
        // (asyncio's sendfile test then finished before its reader closed).
        let full = data;
        let data = &full[..full.len().min(self.send.free())];
        let mut sent = 0;
        while sent < data.len() && self.send.is_empty() && self.data_may_go(max_len) {
            let n = (data.len() - sent).min(self.max_payload(max_len));
            let mut hdr = [0u8; BSDH_LEN];
            let t = self.frame_data(n, false, &mut hdr);
            let went = post(&t, &[&hdr, &data[sent..sent + n]]);
            self.send.skip(n);
            sent += n;
            if !went {
                // Lost with the transport, as a queued message whose post fails is.
                return Ok(sent);
            }
            self.stats.direct_bytes_sent += n as u64;
        }
        if sent == full.len() || (sent > 0 && sent == data.len()) {
            return Ok(sent);
        }
        // The rest of what the room allows; with no room at all, `send`'s WouldBlock.
        let rest = if data.is_empty() { full } else { &data[sent..] };
        match self.send_inner(now, rest, false) {
            Ok(k) => Ok(sent + k),
            Err(_) if sent > 0 => Ok(sent),
            Err(e) => Err(e),
        }
    }

    /// Whether the next message to go is a Data message from the send queue, credits and
    /// send slots allowing: nothing of higher rank waits (control, our SrcAvail).
    fn data_may_go(&self, max_len: usize) -> bool {
        self.state.can_transmit()
            && self.sends_in_flight < self.config.max_send_wr
            && max_len > BSDH_LEN
            && !(self.control.front().is_some() && self.credits.can_send(MessageClass::Control))
            && self.credits.can_send(MessageClass::Payload)
            && self.src.is_none()
    }

    /// Frames the next Data message's header into `hdr` (a payload of at most `max_len` minus
    /// the header) and accounts for it; the caller moves the payload's `n` bytes.
    fn data_header(&mut self, max_len: usize, hdr: &mut [u8]) -> (Transmit, usize) {
        let (n, urgent) = self.send.next_chunk(self.max_payload(max_len));
        (self.frame_data(n, urgent, hdr), n)
    }

    /// The most payload a Data message carries: the peer's buffer goal, within `max_len`
    /// (the largest message the peer takes) less the header.
    fn max_payload(&self, max_len: usize) -> usize {
        (self.send_goal as usize).min(max_len - BSDH_LEN)
    }

    /// Frames a Data message of `n` payload bytes into `hdr` and accounts for it.
    fn frame_data(&mut self, n: usize, urgent: bool, hdr: &mut [u8]) -> Transmit {
        let flags = if urgent {
            Flags::OOB_PRES.union(Flags::OOB_PEND)
        } else if self.send.urgent_pending() {
            // OPENIB-style early warning: urgent data is queued behind this message.
            Flags::OOB_PEND
        } else {
            Flags::EMPTY
        };
        let stamp = self.credits.on_send();
        let len = BSDH_LEN + n;
        BsdhRepr {
            mid: MessageId::Data,
            flags,
            bufs: stamp.bufs,
            len: len as u32,
            mseq: stamp.mseq,
            mseq_ack: stamp.mseq_ack,
        }
        .emit(&mut Bsdh::new_unchecked(&mut hdr[..BSDH_LEN]));
        self.sent_one();
        self.stats.bytes_sent += n as u64;
        Transmit {
            len,
            mid: MessageId::Data,
            mseq: stamp.mseq,
            solicited: urgent,
        }
    }

    fn transmit_data(&mut self, buf: &mut [u8]) -> Transmit {
        let (t, n) = self.data_header(buf.len(), buf);
        self.send.take_into(&mut buf[BSDH_LEN..t.len], n);
        t
    }
}
