//! The SDP connection state machine, sans-IO (quinn style).
//!
//! [`Connection`] is one SDP connection: it owns the send and receive byte queues, the
//! credit bookkeeping, the ZCopy advertisements and the timers. It never performs I/O and
//! never reads a clock; its host (`crates/ops`, joining it to an `ib-verbs` transport) feeds
//! it inputs and drains its outputs.
//!
//! Module map: [`state`] (states and transitions), [`credits`] (MSeq/MSeqAck/credits and
//! the credit-update rule), [`bcopy`] (byte queues, urgent marks), [`zcopy`] (SrcAvail both
//! ways), [`timers`] (the timer table), [`event`] (output types), [`config`]; the message
//! handlers are in `rx.rs`, message building in `tx.rs`.

mod bcopy;
pub mod config;
pub(crate) mod credits;
pub mod event;
mod rx;
pub mod state;
pub mod timers;
mod tx;
pub mod zcopy;

use std::collections::VecDeque;

pub use config::Config;
pub use event::{Event, PostRecv, RdmaRead, Readiness, Transmit};
pub use state::{Role, StateKind};
pub use timers::Timer;
pub use zcopy::ZcopyId;

use crate::error::{
    ConnectFailure, ConnectionError, HandleError, HandshakeError, RecvError, SendError, StateError,
    TransportFailure, UrgentError, ZcopyError,
};
use crate::time::Timestamp;
use crate::wire::{HELLO_ACK_LEN, HELLO_LEN, HelloAckRepr, HelloRepr, IpAddrs, Version};
use bcopy::{RecvQueue, SendQueue};
use credits::Credits;
use state::State;
use timers::TimerTable;
use zcopy::{ZcopySink, ZcopySource};

/// Which directions `shutdown` closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// SHUT_RD: discard and refuse further bytes.
    Read,
    /// SHUT_WR: DisConn after the queued bytes.
    Write,
    /// SHUT_RDWR.
    Both,
}

/// Why an RDMA read the engine asked for did not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RdmaReadFailure {
    /// The transport cannot read the peer's memory (no RDMA, no permission): the engine
    /// answers SendSM, the peer resends as BCopy, and ZCopy receive stays off.
    Unsupported,
    /// The read completed in error and the QP is dead.
    Fatal,
}

/// Counters for `sdp stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Messages posted.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Stream bytes sent by BCopy (Data payload) and SrcAvail inline.
    pub bytes_sent: u64,
    /// Stream bytes received (Data, inline, RDMA read).
    pub bytes_received: u64,
    /// Pure credit updates sent.
    pub credit_updates_sent: u64,
    /// SrcAvails sent.
    pub srcavails_sent: u64,
    /// RDMA reads requested.
    pub rdma_reads: u64,
    /// Stream bytes of our SrcAvails the peer reported read by RDMA (ZCopy; not in
    /// `bytes_sent`, which counts the bytes that travelled inside messages).
    pub zcopy_bytes_sent: u64,
    /// Stream bytes we received by RDMA read of the peer's SrcAvails (ZCopy; also counted in
    /// `bytes_received`).
    pub zcopy_bytes_received: u64,
    /// Of `bytes_sent`, those framed straight from the application's buffer
    /// (`send_through`), never in the send queue.
    pub direct_bytes_sent: u64,
    /// Of `bytes_received`, those the application read straight from the host's receive
    /// buffers (`handle_message_deferred`), never in the receive queue.
    pub direct_bytes_received: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    RdmaRdCompl(u32),
    SendSm,
    SrcAvailCancel,
    ChRcvBuf(u32),
    ChRcvBufAck(u32),
}

/// The peer asked us to grow our buffers; we acknowledge once the older, smaller buffers
/// are all consumed (SDP-WIRE.md §7.9).
#[derive(Debug, Clone, Copy)]
struct PendingResize {
    old_left: u32,
    old_size: u32,
    ack: u32,
}

/// One SDP connection.
///
/// # Call order
///
/// Setup, active side (connect):
/// 1. [`Connection::connect`], then [`poll_post_recv`](Self::poll_post_recv): post those
///    receive buffers on the QP.
/// 2. [`hello`](Self::hello): the 92 bytes for the CM REQ private data.
/// 3. On the CM REP: [`handle_hello_ack`](Self::handle_hello_ack) with its private data;
///    on success send the RTU. On a CM reject or timeout:
///    [`handle_connect_failed`](Self::handle_connect_failed).
///
/// Setup, passive side (accept):
/// 1. [`Connection::accept`] with the REQ private data, then `poll_post_recv` and post.
/// 2. [`hello_ack`](Self::hello_ack): the 196 bytes for the CM REP private data.
/// 3. On RTU: [`handle_established`](Self::handle_established) (a first received message
///    also establishes, as in Linux).
///
/// Then, in any order, whenever something happens:
/// - a receive completion: [`handle_message`](Self::handle_message) with exactly the bytes
///   received (one SDP message per buffer);
/// - send completions: [`handle_send_complete`](Self::handle_send_complete);
/// - an RDMA read asked for by [`Event::RdmaRead`] completed:
///   [`handle_rdma_read_complete`](Self::handle_rdma_read_complete);
/// - a completion error: [`handle_transport_error`](Self::handle_transport_error);
/// - the CM reports a disconnect (DREQ received, or DREP/time-wait exit after our DREQ):
///   [`handle_cm_disconnected`](Self::handle_cm_disconnected);
/// - the deadline of [`poll_timeout`](Self::poll_timeout) passed:
///   [`handle_timeout`](Self::handle_timeout);
/// - application calls: [`send`](Self::send), [`send_urgent`](Self::send_urgent),
///   [`send_zcopy`](Self::send_zcopy), [`recv`](Self::recv),
///   [`recv_urgent`](Self::recv_urgent), [`shutdown`](Self::shutdown),
///   [`close`](Self::close), [`abort`](Self::abort).
///
/// After every such call, drain in this order:
/// 1. [`poll_post_recv`](Self::poll_post_recv) until `None`: post the buffers (they must be
///    on the QP before any message that advertises them leaves);
/// 2. [`poll_transmit`](Self::poll_transmit) until `None`: post each as an RC SEND;
/// 3. [`poll_event`](Self::poll_event) until `None`: act on each;
/// 4. [`readiness`](Self::readiness) for the application fd, and
///    [`poll_timeout`](Self::poll_timeout) for the next wake-up.
#[derive(Debug, Clone)]
pub struct Connection {
    config: Config,
    role: Role,
    state: State,
    credits: Credits,
    send: SendQueue,
    recv: RecvQueue,
    control: VecDeque<Control>,
    src: Option<ZcopySource>,
    sink: Option<ZcopySink>,
    timers: TimerTable,
    events: VecDeque<Event>,
    /// Largest payload per message toward the peer (its buffer size − 16).
    send_goal: u32,
    peer_max_adverts: u8,
    /// Size of the buffers to post from now on.
    recv_buf_size: u32,
    resize: Option<PendingResize>,
    /// We sent ChRcvBuf and wait for the ack.
    resize_requested: bool,
    sends_in_flight: u32,
    shut_rd: bool,
    /// The application closed its fd: finish in the background.
    orphan: bool,
    /// False once the transport proved unable to RDMA-read.
    zcopy_recv_ok: bool,
    /// The peer announced urgent data not yet received.
    peer_urgent_pending: bool,
    next_id: u64,
    /// Messages moved either way, for keepalive idleness.
    activity: u64,
    keepalive_seen: u64,
    local_hello: Option<HelloRepr>,
    stats: Stats,
}

impl Connection {
    fn new(config: Config, role: Role, state: State) -> Self {
        let config = config.sanitized();
        Connection {
            role,
            state,
            credits: Credits::new(role == Role::Active),
            send: SendQueue::new(config.send_buffer),
            recv: RecvQueue::new(config.oob_inline),
            control: VecDeque::new(),
            src: None,
            sink: None,
            timers: TimerTable::default(),
            events: VecDeque::new(),
            send_goal: 0,
            peer_max_adverts: 0,
            recv_buf_size: config.recv_buffer_size,
            resize: None,
            resize_requested: false,
            sends_in_flight: 0,
            shut_rd: false,
            orphan: false,
            zcopy_recv_ok: config.zcopy_recv,
            peer_urgent_pending: false,
            next_id: 1,
            activity: 0,
            keepalive_seen: 0,
            local_hello: None,
            stats: Stats::default(),
            config,
        }
    }

    /// Active open. `addrs` and `local_port` go into the Hello (§2.2).
    pub fn connect(config: Config, _now: Timestamp, addrs: IpAddrs, local_port: u16) -> Self {
        let mut c = Connection::new(config, Role::Active, State::HelloSent);
        let size = c.config.recv_buffer_size;
        c.local_hello = Some(HelloRepr {
            bufs: 0,
            version: Version::V2_2,
            cap: 0,
            max_adverts: c.config.max_adverts,
            des_rem_rcv_sz: size,
            local_rcv_sz: size,
            local_port,
            addrs,
            ext_max_adverts: 0,
        });
        c
    }

    /// The Hello for the CM REQ. Call after posting what `poll_post_recv` asked for: Bufs is
    /// the number of buffers posted now (§2.1).
    pub fn hello(&mut self) -> [u8; HELLO_LEN] {
        let mut h = self.local_hello.unwrap_or(HelloRepr {
            bufs: 0,
            version: Version::V2_2,
            cap: 0,
            max_adverts: self.config.max_adverts,
            des_rem_rcv_sz: self.config.recv_buffer_size,
            local_rcv_sz: self.config.recv_buffer_size,
            local_port: 0,
            addrs: IpAddrs::V4 {
                src: core::net::Ipv4Addr::UNSPECIFIED,
                dst: core::net::Ipv4Addr::UNSPECIFIED,
            },
            ext_max_adverts: 0,
        });
        h.bufs = self.credits.posted().min(u16::MAX.into()) as u16;
        self.credits.set_initial_advertised();
        h.to_bytes()
    }

    /// Checks a Hello or HelloAck's common fields.
    fn check_peer(version: Version, max_adverts: u8, rcv_sz: u32) -> Result<(), HandshakeError> {
        if version.major() != 2 {
            return Err(HandshakeError::Version(version.0));
        }
        if max_adverts == 0 {
            return Err(HandshakeError::MaxAdvertsZero);
        }
        if rcv_sz < 17 {
            return Err(HandshakeError::BufferTooSmall(rcv_sz));
        }
        Ok(())
    }

    /// Validates a Hello without building a connection (a listener's pre-check).
    pub fn check_hello(hello: &[u8]) -> Result<HelloRepr, HandshakeError> {
        let h = HelloRepr::parse_bytes(hello).map_err(HandshakeError::Malformed)?;
        Self::check_peer(h.version, h.max_adverts, h.local_rcv_sz)?;
        Ok(h)
    }

    /// Passive open from the Hello in a CM REQ. LINUX: the passive side takes the Hello's
    /// Bufs as its credits and LocalRcvSz − 16 as its send size (§2.3).
    pub fn accept(config: Config, now: Timestamp, hello: &[u8]) -> Result<Self, HandshakeError> {
        let h = Self::check_hello(hello)?;
        let mut c = Connection::new(config, Role::Passive, State::HelloAckSent);
        c.credits.set_initial_peer_bufs(h.bufs);
        c.send_goal = h.local_rcv_sz - 16;
        c.peer_max_adverts = h.max_adverts;
        let _ = now;
        Ok(c)
    }

    /// The HelloAck for the CM REP. Call after posting what `poll_post_recv` asked for.
    pub fn hello_ack(&mut self) -> [u8; HELLO_ACK_LEN] {
        let r = HelloAckRepr {
            bufs: self.credits.posted().min(u16::MAX.into()) as u16,
            version: Version::V2_2,
            ipv_cap: 0,
            max_adverts: self.config.max_adverts,
            act_rcv_sz: self.config.recv_buffer_size,
        };
        self.credits.set_initial_advertised();
        r.to_bytes()
    }

    /// The HelloAck from the CM REP arrived (active side).
    pub fn handle_hello_ack(&mut self, now: Timestamp, bytes: &[u8]) -> Result<(), HandleError> {
        if !matches!(self.state, State::HelloSent) {
            return Err(self.invalid_state());
        }
        let checked = HelloAckRepr::parse_bytes(bytes)
            .map_err(HandshakeError::Malformed)
            .and_then(|h| Self::check_peer(h.version, h.max_adverts, h.act_rcv_sz).map(|_| h));
        match checked {
            Ok(h) => {
                self.credits.set_initial_peer_bufs(h.bufs);
                self.send_goal = h.act_rcv_sz - 16;
                self.peer_max_adverts = h.max_adverts;
                self.establish(now);
                Ok(())
            }
            Err(e) => Err(self.die(ConnectionError::Handshake(e), true)),
        }
    }

    /// The CM REJECTed, or address/route resolution failed, or the REQ timed out.
    pub fn handle_connect_failed(
        &mut self,
        _now: Timestamp,
        why: ConnectFailure,
    ) -> Result<(), HandleError> {
        if !matches!(self.state, State::HelloSent) {
            return Err(self.invalid_state());
        }
        Err(self.die(ConnectionError::ConnectFailed(why), false))
    }

    /// RTU received (passive side).
    pub fn handle_established(&mut self, now: Timestamp) -> Result<(), HandleError> {
        match self.state {
            State::HelloAckSent => {
                self.establish(now);
                Ok(())
            }
            State::Closed { .. } => Err(HandleError::Closed),
            // A first message may have established it already.
            _ => Ok(()),
        }
    }

    fn establish(&mut self, now: Timestamp) {
        self.state = State::Established;
        self.events.push_back(Event::Connected);
        if let Some(k) = self.config.keepalive {
            self.timers.set(Timer::Keepalive, now + k);
        }
    }

    fn invalid_state(&self) -> HandleError {
        match self.state {
            State::Closed { .. } => HandleError::Closed,
            ref s => HandleError::InvalidState(s.kind()),
        }
    }

    /// Ends the connection. `disconnect`: we detected it, so the host must tear the CM
    /// connection down (abortive DREQ).
    fn die(&mut self, error: ConnectionError, disconnect: bool) -> HandleError {
        if let State::Closed { .. } = self.state {
            return HandleError::Closed;
        }
        self.state = State::Closed { error: Some(error) };
        self.timers.stop_all();
        self.control.clear();
        self.src = None;
        self.sink = None;
        if matches!(error, ConnectionError::LocallyAborted) {
            self.recv.clear();
        }
        if disconnect {
            self.events.push_back(Event::Disconnect { abortive: true });
        }
        self.events.push_back(Event::Closed { error: Some(error) });
        HandleError::Fatal(error)
    }

    /// Orderly end after the DisConn exchange and the CM teardown.
    fn finish(&mut self) {
        self.state = State::Closed { error: None };
        self.timers.stop_all();
        self.events.push_back(Event::Closed { error: None });
    }

    /// `n` posted sends completed successfully.
    pub fn handle_send_complete(&mut self, _now: Timestamp, n: u32) -> Result<(), HandleError> {
        self.sends_in_flight = self.sends_in_flight.saturating_sub(n);
        if let State::Closed { .. } = self.state {
            Err(HandleError::Closed)
        } else {
            Ok(())
        }
    }

    /// A completion error, or any fatal transport condition. Outstanding work is flushed by
    /// the transport; the connection is reset.
    pub fn handle_transport_error(
        &mut self,
        _now: Timestamp,
        why: TransportFailure,
    ) -> Result<(), HandleError> {
        self.sends_in_flight = 0;
        Err(self.die(ConnectionError::Transport(why), true))
    }

    /// The CM connection went away: the peer's DREQ, or the end of our own DREQ exchange.
    pub fn handle_cm_disconnected(&mut self, _now: Timestamp) -> Result<(), HandleError> {
        match self.state {
            State::TimeWait | State::LastAck { disconn_sent: true } => {
                self.finish();
                Ok(())
            }
            State::Closed { .. } => Err(HandleError::Closed),
            State::HelloSent => Err(self.die(
                ConnectionError::ConnectFailed(ConnectFailure::Refused),
                false,
            )),
            State::CloseWait
            | State::LastAck {
                disconn_sent: false,
            } => Err(self.die(
                ConnectionError::Reset {
                    after_peer_disconn: true,
                },
                false,
            )),
            State::HelloAckSent | State::Established | State::FinWait1 { .. } => Err(self.die(
                ConnectionError::Reset {
                    after_peer_disconn: false,
                },
                false,
            )),
        }
    }

    /// Fires every timer whose deadline is ≤ `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some(t) = self.timers.pop_expired(now) {
            match t {
                Timer::SrcAvailAdvert => {
                    // LINUX: no RdmaRdCompl within 1 s → SrcAvailCancel (§4.3, §7.8).
                    if let Some(src) = self.src.as_mut()
                        && src.mseq.is_some()
                        && !src.cancelled
                    {
                        src.cancelled = true;
                        self.control.push_back(Control::SrcAvailCancel);
                        self.timers.set(
                            Timer::SrcAvailCancel,
                            now + self.config.srcavail_cancel_timeout,
                        );
                    }
                }
                Timer::SrcAvailCancel | Timer::FinWait | Timer::LastAck => {
                    self.die(ConnectionError::TimedOut(t), true);
                }
                Timer::TimeWait => {
                    if let State::TimeWait = self.state {
                        self.finish();
                    }
                }
                Timer::Keepalive => {
                    if self.state.can_transmit() {
                        if self.activity == self.keepalive_seen {
                            self.events.push_back(Event::KeepaliveProbe);
                        }
                        self.keepalive_seen = self.activity;
                        if let Some(k) = self.config.keepalive {
                            self.timers.set(Timer::Keepalive, now + k);
                        }
                    }
                }
            }
        }
    }

    /// SO_KEEPALIVE changed at run time: `Some(idle)` (TCP_KEEPIDLE) arms the keepalive timer
    /// `idle` from now, `None` stops it (SDP-WIRE.md §5.4). Idleness is measured from this
    /// call: a probe goes only if no message moved either way during a whole period. Before
    /// the connection is established it only records the setting (establishing arms it);
    /// once it can no longer transmit, nothing is armed.
    pub fn set_keepalive(&mut self, now: Timestamp, idle: Option<core::time::Duration>) {
        self.config.keepalive = idle;
        self.keepalive_seen = self.activity;
        match idle {
            Some(k) if self.state.can_transmit() => self.timers.set(Timer::Keepalive, now + k),
            _ => self.timers.stop(Timer::Keepalive),
        }
    }

    /// SO_SNDBUF and/or SO_RCVBUF changed: [`set_send_buffer`](Self::set_send_buffer) and
    /// [`set_recv_window`](Self::set_recv_window) for the ones given.
    pub fn set_buffer_sizes(&mut self, sndbuf: Option<usize>, rcvbuf: Option<usize>) {
        if let Some(b) = sndbuf {
            self.set_send_buffer(b);
        }
        if let Some(b) = rcvbuf {
            self.set_recv_window(b);
        }
    }

    /// SO_SNDBUF changed: `send` takes bytes while fewer than `bytes` wait to be sent.
    pub fn set_send_buffer(&mut self, bytes: usize) {
        self.config.send_buffer = bytes.max(1);
        self.send.set_capacity(self.config.send_buffer);
    }

    /// SO_RCVBUF changed: receive buffers are reposted while unread bytes plus posted capacity
    /// stay within `bytes` (never fewer than two buffers: see `window_room_for`).
    pub fn set_recv_window(&mut self, bytes: usize) {
        self.config.recv_window = bytes;
    }

    /// SO_OOBINLINE changed: urgent bytes that arrive from now on stay in the stream (`true`)
    /// or wait apart for a MSG_OOB receive (`false`).
    pub fn set_oob_inline(&mut self, on: bool) {
        self.recv.oob_inline = on;
    }

    /// The SO_KEEPALIVE idle time in force (`None`: off).
    pub fn keepalive(&self) -> Option<core::time::Duration> {
        self.config.keepalive
    }

    /// The next deadline to call `handle_timeout` at.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.next()
    }

    /// The next event for the host.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Receive buffers to post now (see [`PostRecv`]). Keeps 2 posted at all times for
    /// control messages, and more only while the receive window has room (LINUX
    /// `sdp_post_recvs_needed`).
    pub fn poll_post_recv(&mut self) -> Option<PostRecv> {
        if matches!(self.state, State::TimeWait | State::Closed { .. }) {
            return None;
        }
        let max = u32::from(self.config.recv_buffers);
        let payload = (self.recv_buf_size - 16) as usize;
        let room = self.window_room_for(payload);
        let allowed = (2 + (room / payload) as u32).min(max);
        let posted = self.credits.posted();
        if allowed <= posted {
            return None;
        }
        let count = allowed - posted;
        self.credits.on_posted(count);
        Some(PostRecv {
            count,
            size: self.recv_buf_size,
        })
    }

    fn window_room(&self) -> usize {
        self.window_room_for((self.recv_buf_size - 16) as usize)
    }

    /// Room in the receive window. INVARIANT: the window is at least two buffers, so an
    /// empty receive queue always allows 4 posted buffers and the peer can send data
    /// (credits.rs), also after a ChRcvBuf grew the buffers.
    fn window_room_for(&self, payload: usize) -> usize {
        let in_flight = self
            .sink
            .as_ref()
            .and_then(|s| s.in_flight)
            .map_or(0, |(_, l)| l as usize);
        let window = self.config.recv_window.max(2 * payload);
        window.saturating_sub(self.recv.held() + in_flight)
    }

    /// An RDMA read asked for by [`Event::RdmaRead`] finished; `Ok` holds exactly the bytes.
    pub fn handle_rdma_read_complete(
        &mut self,
        now: Timestamp,
        id: u64,
        result: Result<&[u8], RdmaReadFailure>,
    ) -> Result<(), HandleError> {
        let _ = now;
        if let State::Closed { .. } = self.state {
            return Err(HandleError::Closed);
        }
        let Some(sink) = self.sink.as_mut() else {
            return Err(self.invalid_state());
        };
        let Some((want_id, want_len)) = sink.in_flight else {
            return Err(self.invalid_state());
        };
        if want_id != id {
            return Err(self.invalid_state());
        }
        sink.in_flight = None;
        match result {
            Ok(bytes) if bytes.len() == want_len as usize => {
                sink.unreported += want_len;
                if !self.shut_rd {
                    self.recv.push(bytes, false);
                }
                self.stats.bytes_received += want_len as u64;
                self.stats.zcopy_bytes_received += want_len as u64;
                let sink = self.sink.as_mut().expect("sink checked above");
                let (cancelled, done, unreported) =
                    (sink.cancelled, sink.remaining() == 0, sink.unreported);
                sink.unreported = 0;
                self.push_control(Control::RdmaRdCompl(unreported));
                if cancelled {
                    self.push_control(Control::SendSm);
                    self.sink = None;
                } else if done {
                    self.sink = None;
                } else {
                    self.issue_read();
                }
                Ok(())
            }
            Ok(_) | Err(RdmaReadFailure::Unsupported) => {
                // Fall back to BCopy for good (§4.3: SendSM after an RDMA failure).
                self.zcopy_recv_ok = false;
                let unreported = sink.unreported;
                if unreported > 0 {
                    self.push_control(Control::RdmaRdCompl(unreported));
                }
                self.push_control(Control::SendSm);
                self.sink = None;
                Ok(())
            }
            Err(RdmaReadFailure::Fatal) => {
                Err(self.die(ConnectionError::Transport(TransportFailure::RdmaRead), true))
            }
        }
    }

    pub(crate) fn push_control(&mut self, c: Control) {
        if let (Control::RdmaRdCompl(n), Some(Control::RdmaRdCompl(m))) =
            (c, self.control.back_mut())
        {
            *m += n;
            return;
        }
        self.control.push_back(c);
    }

    /// Asks the host for the next RDMA read of the peer's SrcAvail, window permitting.
    pub(crate) fn issue_read(&mut self) {
        let room = self.window_room();
        let chunk = self.config.rdma_read_chunk;
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        if sink.cancelled || sink.in_flight.is_some() || sink.remaining() == 0 || room == 0 {
            return;
        }
        let len = sink
            .remaining()
            .min(chunk)
            .min(room.min(u32::MAX as usize) as u32);
        let id = self.next_id;
        self.next_id += 1;
        sink.in_flight = Some((id, len));
        let remote_addr = sink.vaddr.wrapping_add(u64::from(sink.next));
        sink.next += len;
        self.stats.rdma_reads += 1;
        self.events.push_back(Event::RdmaRead(RdmaRead {
            id,
            rkey: sink.rkey,
            remote_addr,
            len,
        }));
    }

    fn app_error(&self) -> Option<ConnectionError> {
        self.state.error()
    }

    /// Queues bytes for BCopy (write/send). Returns how many were accepted.
    pub fn send(&mut self, now: Timestamp, data: &[u8]) -> Result<usize, SendError> {
        self.send_inner(now, data, false)
    }

    /// send(MSG_OOB): the last byte accepted is urgent (§5.3).
    pub fn send_urgent(&mut self, now: Timestamp, data: &[u8]) -> Result<usize, SendError> {
        self.send_inner(now, data, true)
    }

    fn send_inner(
        &mut self,
        _now: Timestamp,
        data: &[u8],
        urgent: bool,
    ) -> Result<usize, SendError> {
        self.send_checks()?;
        if data.is_empty() {
            return Ok(0);
        }
        // INVARIANT: no Data while our SrcAvail is outstanding (Combined mode, §4.1); the host
        // resends a refused remainder first, so later bytes wait.
        if self.src.is_some() {
            return Err(SendError::WouldBlock);
        }
        match self.send.push(data, urgent) {
            0 => Err(SendError::WouldBlock),
            n => Ok(n),
        }
    }

    /// What refuses any send: an error to report, not connected, or our sending shut.
    pub(crate) fn send_checks(&self) -> Result<(), SendError> {
        if let Some(e) = self.app_error() {
            return Err(SendError::Closed(e));
        }
        if !self.state.connected() {
            return Err(SendError::NotConnected);
        }
        if !self.state.send_open() {
            return Err(SendError::Shutdown);
        }
        Ok(())
    }

    /// Whether `send_zcopy` would take a buffer of `len` bytes now.
    pub fn zcopy_possible(&self, len: usize) -> bool {
        self.zcopy_check(len).is_ok()
    }

    fn zcopy_check(&self, len: usize) -> Result<(), ZcopyError> {
        if let Some(e) = self.app_error() {
            return Err(ZcopyError::Closed(e));
        }
        if !self.state.connected() {
            return Err(ZcopyError::NotConnected);
        }
        if !self.state.send_open() {
            return Err(ZcopyError::Shutdown);
        }
        if !self.config.zcopy_send || self.send_goal < 17 {
            return Err(ZcopyError::Disabled);
        }
        if len < 2 || len > self.config.zcopy_max as usize {
            return Err(ZcopyError::BadLength);
        }
        // LINUX: never two SrcAvail, never one while a peer SrcAvail is pending (§4.3).
        if !self.send.is_empty() || self.src.is_some() || self.sink.is_some() {
            return Err(ZcopyError::Busy);
        }
        Ok(())
    }

    /// Offers `data`, registered by the host under `rkey` at `vaddr`, for the peer to RDMA-read
    /// (SrcAvail with the first bytes inline). See [`Event::ZcopySendFinished`].
    pub fn send_zcopy(
        &mut self,
        _now: Timestamp,
        data: &[u8],
        rkey: u32,
        vaddr: u64,
    ) -> Result<ZcopyId, ZcopyError> {
        self.zcopy_check(data.len())?;
        let inline = (self.config.zcopy_inline as usize)
            .min(self.send_goal as usize - 16)
            .min(data.len() - 1);
        let id = ZcopyId(self.next_id);
        self.next_id += 1;
        self.src = Some(ZcopySource {
            id,
            mseq: None,
            len: data.len() as u32,
            rkey,
            vaddr,
            inline: data[..inline].to_vec(),
            reported: 0,
            cancelled: false,
        });
        Ok(id)
    }

    pub(crate) fn finish_src(&mut self, completed: bool) {
        if let Some(src) = self.src.take() {
            self.timers.stop(Timer::SrcAvailAdvert);
            self.timers.stop(Timer::SrcAvailCancel);
            self.events.push_back(Event::ZcopySendFinished {
                id: src.id,
                sent: src.sent(),
                completed,
            });
        }
    }

    /// Reads stream bytes (recv). `Ok(0)` is end of stream. With `peek` (MSG_PEEK) nothing
    /// is consumed. MSG_WAITALL is the caller's loop over this call.
    pub fn recv(&mut self, now: Timestamp, buf: &mut [u8], peek: bool) -> Result<usize, RecvError> {
        // INVARIANT: only `handle_message_deferred` leaves bytes with the host, and a host
        // that calls it reads through `recv_with`.
        self.recv_with(now, buf, peek, &mut |_, _| {
            unreachable!("deferred bytes read without their host")
        })
    }

    /// As [`recv`](Self::recv), for a host that keeps payloads in its receive buffers
    /// ([`handle_message_deferred`](Self::handle_message_deferred)): `host(offset, dst)`
    /// copies the deferred bytes at `offset` (0 is the first unread one when the call
    /// starts) into `dst`. A call asks the host at most once, for the first deferred bytes
    /// (offset 0), and without `peek` takes exactly those: [`deferred`](Self::deferred)
    /// drops by as many, and the host releases them from its front (after the call, or
    /// before its next one: a host that reads several buffers before releasing counts what
    /// the earlier calls took).
    pub fn recv_with(
        &mut self,
        _now: Timestamp,
        buf: &mut [u8],
        peek: bool,
        host: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<usize, RecvError> {
        if !self.state.connected() {
            return Err(RecvError::NotConnected);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let deferred = self.recv.deferred();
        let n = self.recv.read(buf, peek, host);
        self.stats.direct_bytes_received += (deferred - self.recv.deferred()) as u64;
        if n > 0 {
            if !peek {
                self.issue_read();
            }
            return Ok(n);
        }
        if let Some(e) = self.app_error() {
            return Err(RecvError::Closed(e));
        }
        if self.read_closed() {
            Ok(0)
        } else {
            Err(RecvError::WouldBlock)
        }
    }

    /// recv(MSG_OOB).
    pub fn recv_urgent(&mut self, _now: Timestamp, peek: bool) -> Result<u8, UrgentError> {
        if let Some(b) = self.recv.take_urgent(peek) {
            return Ok(b);
        }
        if let Some(e) = self.app_error() {
            return Err(UrgentError::Closed(e));
        }
        if self.peer_urgent_pending && !self.recv.oob_inline {
            return Err(UrgentError::WouldBlock);
        }
        Err(UrgentError::Invalid)
    }

    /// SIOCATMARK.
    pub fn at_mark(&self) -> bool {
        self.recv.at_mark()
    }

    /// FIONREAD: bytes `recv` can return now.
    pub fn recv_available(&self) -> usize {
        self.recv.readable()
    }

    /// Free room in the send buffer (SIOCOUTQ's complement).
    pub fn send_room(&self) -> usize {
        if self.src.is_some() {
            0
        } else {
            self.send.free()
        }
    }

    /// Unread bytes at the front of the stream that are still in the host's receive buffers
    /// ([`handle_message_deferred`](Self::handle_message_deferred)). Whatever drops this
    /// count (a read, SHUT_RD, a reset) releases as many bytes from the host's front.
    pub fn deferred(&self) -> usize {
        self.recv.deferred()
    }

    /// The host gives up its deferred bytes (it needs its buffers back): `read(offset, dst)`
    /// copies them, and the receive queue keeps them from now on.
    pub fn undefer(&mut self, read: &mut dyn FnMut(usize, &mut [u8])) {
        self.recv.undefer(read);
    }

    /// Bytes queued and not yet framed (SIOCOUTQ).
    pub fn send_queued(&self) -> usize {
        self.send.len()
    }

    fn read_closed(&self) -> bool {
        self.shut_rd
            || matches!(
                self.state,
                State::CloseWait | State::LastAck { .. } | State::TimeWait | State::Closed { .. }
            )
    }

    fn write_closed(&self) -> bool {
        !self.state.send_open() && self.state.connected()
    }

    /// shutdown(2).
    pub fn shutdown(&mut self, _now: Timestamp, how: Shutdown) -> Result<(), StateError> {
        if let State::Closed { .. } = self.state {
            return Err(StateError::Closed);
        }
        if !self.state.connected() {
            return Err(StateError::NotConnected);
        }
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            self.shut_rd = true;
            self.recv.clear();
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            self.state = match self.state {
                State::Established => State::FinWait1 {
                    disconn_sent: false,
                },
                State::CloseWait => State::LastAck {
                    disconn_sent: false,
                },
                ref s => s.clone(),
            };
        }
        Ok(())
    }

    /// close(2) of the last reference. With unread bytes this aborts (LINUX, like TCP's RST);
    /// otherwise queued bytes and DisConn still go out and the connection finishes in the
    /// background (orphan), bounded by the FIN-wait timer.
    pub fn close(&mut self, now: Timestamp) {
        match self.state {
            State::Closed { .. } => {}
            State::HelloSent | State::HelloAckSent => {
                self.die(ConnectionError::LocallyAborted, true);
            }
            _ if self.recv.readable() > 0 => self.abort(now),
            _ => {
                self.orphan = true;
                let _ = self.shutdown(now, Shutdown::Both);
                if let State::FinWait1 { disconn_sent: true } = self.state {
                    self.timers
                        .set(Timer::FinWait, now + self.config.fin_wait_timeout);
                }
            }
        }
    }

    /// Abortive close (SO_LINGER 0). LINUX: a CM DREQ with no SDP message (§5.2).
    pub fn abort(&mut self, _now: Timestamp) {
        self.send = SendQueue::new(self.config.send_buffer);
        self.die(ConnectionError::LocallyAborted, true);
    }

    /// Asks the peer to grow its receive buffers to `payload` bytes (ChRcvBuf, §3.5).
    pub fn request_peer_buffer_size(
        &mut self,
        _now: Timestamp,
        payload: u32,
    ) -> Result<(), StateError> {
        if let State::Closed { .. } = self.state {
            return Err(StateError::Closed);
        }
        if !self.state.connected() {
            return Err(StateError::NotConnected);
        }
        self.resize_requested = true;
        self.push_control(Control::ChRcvBuf(payload));
        Ok(())
    }

    /// Poll readiness for the application fd.
    pub fn readiness(&self) -> Readiness {
        let error = self.app_error().is_some();
        let connected = self.state.connected();
        let read_closed = connected && self.read_closed();
        let write_closed = self.write_closed();
        Readiness {
            readable: connected && (self.recv.readable() > 0 || read_closed),
            writable: connected && (error || write_closed || self.send_room() > 0),
            read_closed,
            hangup: matches!(self.state, State::Closed { .. }) || (read_closed && write_closed),
            error,
            urgent: self.recv.urgent_available(),
        }
    }

    /// The state.
    pub fn state(&self) -> StateKind {
        self.state.kind()
    }

    /// Active or passive.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Why the connection died, if it did.
    pub fn error(&self) -> Option<ConnectionError> {
        self.app_error()
    }

    /// Closed for good: the host may free it once its events are drained.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// Current transmit credits.
    pub fn tx_credits(&self) -> u32 {
        self.credits.tx_credits()
    }

    /// Receive buffers posted and not consumed.
    pub fn posted_recv_buffers(&self) -> u32 {
        self.credits.posted()
    }

    /// Largest payload per message toward the peer.
    pub fn send_goal(&self) -> u32 {
        self.send_goal
    }

    /// Size of the buffers to post (changes after a granted ChRcvBuf).
    pub fn recv_buffer_size(&self) -> u32 {
        self.recv_buf_size
    }

    /// Sends posted and not completed.
    pub fn sends_in_flight(&self) -> u32 {
        self.sends_in_flight
    }

    /// The peer's MaxAdverts.
    pub fn peer_max_adverts(&self) -> u8 {
        self.peer_max_adverts
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether everything accepted from the application has been posted and completed
    /// (linger on exit).
    pub fn is_flushed(&self) -> bool {
        self.send.is_empty()
            && self.src.is_none()
            && self.control.is_empty()
            && self.sends_in_flight == 0
    }
}
