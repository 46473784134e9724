//! SDP over the `shm` transport: the [`OffloadStream`] that joins `sdp-proto`'s sans-IO engine
//! to an `ib-verbs` connection.
//!
//! The engine decides every message; this file only carries its outputs to the transport
//! (posted receives, SENDs) and the transport's completions back, in the order the engine's
//! documentation gives, with the process's monotonic clock as its time.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use ib_verbs::shm::ShmConn;
use ib_verbs::{Completion, ConnError, Connection, Opcode};
use sdp_proto::error::{RecvError, SendError, UrgentError};
use sdp_proto::{Config, Event, Timestamp};

use super::stream::{Counters, Errno, OffloadStream};
use crate::stats::Transport;

/// The one mapping from the engine's error kinds to errno.
pub fn errno_of(kind: ErrorKind) -> Errno {
    match kind {
        ErrorKind::ConnectionRefused => libc::ECONNREFUSED,
        ErrorKind::ConnectionReset => libc::ECONNRESET,
        ErrorKind::ConnectionAborted => libc::ECONNABORTED,
        ErrorKind::BrokenPipe => libc::EPIPE,
        ErrorKind::TimedOut => libc::ETIMEDOUT,
        ErrorKind::NotConnected => libc::ENOTCONN,
        ErrorKind::NetworkUnreachable => libc::ENETUNREACH,
        ErrorKind::WouldBlock => libc::EAGAIN,
        _ => libc::EIO,
    }
}

/// The receive calls of an SDP stream: the engine's bytes into `out` (MSG_PEEK with `peek`),
/// then the stream's errors as TCP reports them. A peer that went (`peer_gone`) is end of
/// stream, or one ECONNRESET first when it left our bytes unread or reset (`reset_pending`,
/// taken); `dead`: the connection cannot be used here. The caller drains the engine's outputs
/// after bytes were read (a credit update may be due).
pub(crate) fn engine_recv(
    engine: &mut sdp_proto::Connection,
    out: &mut [&mut [u8]],
    peek: bool,
    reset_pending: &mut bool,
    peer_gone: bool,
    dead: Option<Errno>,
) -> Result<usize, Errno> {
    engine_recv_with(
        engine,
        out,
        peek,
        reset_pending,
        peer_gone,
        dead,
        &mut |_, _| unreachable!("nothing deferred"),
    )
}

/// [`engine_recv`] for a host that defers payloads (`Connection::recv_with`).
fn engine_recv_with(
    engine: &mut sdp_proto::Connection,
    out: &mut [&mut [u8]],
    peek: bool,
    reset_pending: &mut bool,
    peer_gone: bool,
    dead: Option<Errno>,
    host: &mut dyn FnMut(usize, &mut [u8]),
) -> Result<usize, Errno> {
    let t = now();
    let mut n = 0;
    let mut first_err = None;
    for b in out.iter_mut() {
        if b.is_empty() {
            continue;
        }
        match engine.recv_with(t, b, peek, host) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if peek || k < b.len() {
                    break;
                }
            }
            Err(RecvError::WouldBlock) => {
                first_err = Some(libc::EAGAIN);
                break;
            }
            Err(RecvError::NotConnected) => {
                first_err = Some(libc::ENOTCONN);
                break;
            }
            Err(RecvError::Closed(_)) if std::mem::take(reset_pending) => {
                first_err = Some(libc::ECONNRESET);
                break;
            }
            Err(RecvError::Closed(e)) => {
                // LINUX: a TCP peer that exits closes its socket: its reader sees end of
                // stream.
                first_err = Some(if peer_gone { 0 } else { errno_of(e.io_kind()) });
                break;
            }
        }
    }
    if n > 0 {
        return Ok(n);
    }
    if let Some(e) = dead {
        return Err(e);
    }
    if matches!(first_err, None | Some(0)) && std::mem::take(reset_pending) {
        return Err(libc::ECONNRESET);
    }
    match first_err {
        None | Some(0) => Ok(0),
        Some(e) => Err(e),
    }
}

/// The engine's clock: the kernel's coarse monotonic clock, in nanoseconds.
///
/// Every timer of the engine counts seconds (SrcAvail, FIN_WAIT, TIME_WAIT), and the clock is
/// read on every data call: the coarse clock (a few milliseconds of resolution) is one load
/// from the vDSO page, where the precise one cost 3% of a busy redis server here.
pub fn now() -> Timestamp {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    Timestamp::from_nanos(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The engine configuration libsdp uses on the same host: BCopy (the shm ring is already a
/// copy into the peer's memory), a 64-buffer window of 32 KiB messages.
pub fn config() -> Config {
    Config {
        zcopy_recv: false,
        zcopy_send: false,
        ..Config::default()
    }
}

/// A payload left in our ring until the application reads it
/// (`Connection::handle_message_deferred`): `left` bytes from offset `at` of the message of
/// completion `c`.
#[derive(Clone, Copy, Debug)]
struct Held {
    c: Completion,
    at: usize,
    left: usize,
}

/// The deferred payloads, oldest first: the engine's `deferred()` first bytes of the stream.
#[derive(Default)]
struct HeldPayloads {
    list: std::collections::VecDeque<Held>,
    bytes: usize,
}

impl HeldPayloads {
    /// The payload of completion `c` stays in the ring: the last of the deferred bytes.
    fn push(&mut self, c: Completion, len: usize) {
        let at = sdp_proto::wire::BSDH_LEN;
        self.list.push_back(Held {
            c,
            at,
            left: len - at,
        });
        self.bytes += len - at;
    }

    /// Forgets what the engine no longer defers (read, or dropped by SHUT_RD or a reset):
    /// always the front.
    fn release_to(&mut self, deferred: usize) {
        let mut gone = self.bytes.saturating_sub(deferred);
        while gone > 0 {
            let Some(h) = self.list.front_mut() else {
                break;
            };
            if h.left <= gone {
                gone -= h.left;
                self.list.pop_front();
            } else {
                h.at += gone;
                h.left -= gone;
                gone = 0;
            }
        }
        self.bytes = deferred;
        if deferred == 0 {
            self.list.clear();
        }
    }

    /// Copies the held bytes from `offset` on into `dst`; `false` if the ring refused.
    fn read(&self, conn: &ShmConn, mut offset: usize, dst: &mut [u8]) -> bool {
        let mut done = 0;
        for h in &self.list {
            if done == dst.len() {
                break;
            }
            if offset >= h.left {
                offset -= h.left;
                continue;
            }
            let k = (h.left - offset).min(dst.len() - done);
            if conn.recv_data(&h.c, h.at + offset, &mut dst[done..done + k]) != Ok(k) {
                return false;
            }
            done += k;
            offset = 0;
        }
        done == dst.len()
    }
}

pub struct SdpShm {
    engine: sdp_proto::Connection,
    conn: ShmConn,
    /// Payloads still in our ring that the application reads from there (one copy, not
    /// two); they hold their ring slots until then.
    held: HeldPayloads,
    txbuf: Vec<u8>,
    rxbuf: Vec<u8>,
    cq: Vec<Completion>,
    next_wr: u64,
    /// The peer's process released the connection (its bell end hung up).
    peer_gone: bool,
    /// The peer reset the connection (its abort, or it went while our bytes waited for its
    /// window) and no call has reported it yet: one ECONNRESET to report.
    reset_pending: bool,
    /// The peer reset the connection.
    reset_seen: bool,
    /// The first write after the peer's close (see `AfterPeerClose`).
    after_close: super::stream::AfterPeerClose,
    /// The application shut our sending side down (`shutdown_write`): a later write gets
    /// EPIPE, whatever became of the peer.
    shut_write: bool,
    /// The connection cannot be used from this process (a fork child's use of its parent's
    /// connection): every call fails with this.
    dead: Option<Errno>,
    /// The peer announced urgent data (SIGURG to raise).
    urgent: bool,
}

impl SdpShm {
    /// Wraps an established transport connection and an engine that finished its handshake
    /// (active: HelloAck handled; passive: HelloAck sent).
    pub fn new(engine: sdp_proto::Connection, conn: ShmConn) -> SdpShm {
        if conn.reused() {
            crate::stats::bump(crate::stats::header::RINGS_REUSED, 1);
        }
        let attrs = conn.attrs();
        let mut conn = conn;
        conn.set_ring_on_post_recv(false);
        // We keep a copy of our bell end (self-ring) and the peer shuts it for a half-close:
        // the peer's end is learnt from its bell end's hang-up, by the progress thread.
        conn.set_app_eof_is_peer_end(false);
        let mut s = SdpShm {
            engine,
            held: HeldPayloads::default(),
            txbuf: vec![0; attrs.send_buf_size.max(64) as usize],
            rxbuf: vec![0; attrs.recv_buf_size.max(64) as usize],
            conn,
            cq: vec![
                Completion {
                    wr_id: 0,
                    opcode: Opcode::Send,
                    status: Ok(()),
                    byte_len: 0,
                    buf_index: 0
                };
                32
            ],
            next_wr: 1 << 32,
            peer_gone: false,
            reset_pending: false,
            reset_seen: false,
            after_close: Default::default(),
            shut_write: false,
            dead: None,
            urgent: false,
        };
        if s.engine.role() == sdp_proto::Role::Passive {
            // The bootstrap's Ready is the RTU.
            let _ = s.engine.handle_established(now());
        }
        s.drain_outputs();
        s
    }

    fn wr(&mut self) -> u64 {
        self.next_wr += 1;
        self.next_wr
    }

    fn transport_died(&mut self, e: ConnError) {
        let t = now();
        match e {
            ConnError::PeerClosed => {
                self.peer_gone = true;
                let _ = self.engine.handle_cm_disconnected(t);
            }
            ConnError::PeerAborted => {
                self.reset();
                let _ = self.engine.handle_cm_disconnected(t);
            }
            ConnError::Protocol(ib_verbs::Violation::Stolen) => {
                if self.dead.is_none() {
                    crate::sdp_log!(
                        crate::log::ERROR,
                        "an SDP connection was used by another process forked from this one: libsdp cannot share it between processes; it fails here with EIO"
                    );
                }
                self.dead.get_or_insert(libc::EIO);
            }
            _ => {
                // The transport repeats its verdict on every later call: said once.
                if !self.reset_seen {
                    crate::sdp_log!(crate::log::WARN, "shm transport failed: {e}");
                }
                self.reset();
                let _ = self
                    .engine
                    .handle_transport_error(t, sdp_proto::error::TransportFailure::Fatal);
            }
        }
    }

    /// The connection was reset: by the peer's abort, or by a failure of the transport (a
    /// peer that broke the shared-memory protocol) that ends it here as a reset would.
    /// LINUX: after an RST the next call reports ECONNRESET once, then the socket reads end of
    /// stream and writes EPIPE. The transport keeps reporting it: only the first is news.
    fn reset(&mut self) {
        if !self.reset_seen {
            self.reset_seen = true;
            self.reset_pending = true;
            self.peer_gone = true;
        }
    }

    fn poll_completions(&mut self) {
        loop {
            let n = match self.conn.poll_cq(&mut self.cq) {
                Ok(n) => n,
                Err(e) => {
                    self.transport_died(e);
                    return;
                }
            };
            if n == 0 {
                return;
            }
            let t = now();
            let mut sends = 0;
            for i in 0..n {
                let c = self.cq[i];
                match c.opcode {
                    Opcode::Recv if c.status.is_ok() => {
                        let len = (c.byte_len as usize).min(self.rxbuf.len());
                        let conn = &self.conn;
                        let mut failed = false;
                        // A Data payload stays in the ring for the application to read from
                        // there, or goes from the ring straight into the receive queue.
                        let r = self.engine.handle_message_deferred(
                            t,
                            len,
                            &mut self.rxbuf,
                            &mut |off, dst| {
                                if conn.recv_data(&c, off, dst) != Ok(dst.len()) {
                                    failed = true;
                                }
                            },
                        );
                        if let Ok(true) = r {
                            self.held.push(c, len);
                        }
                        if failed {
                            self.reset();
                        } else if let Err(sdp_proto::error::HandleError::Fatal(e)) = r {
                            crate::sdp_log!(crate::log::WARN, "SDP connection ended: {e}");
                        }
                    }
                    Opcode::Send => sends += 1,
                    _ => {}
                }
            }
            if sends > 0 {
                let _ = self.engine.handle_send_complete(t, sends);
            }
        }
    }

    /// Payloads the engine no longer defers leave `held`.
    fn release_held(&mut self) {
        self.held.release_to(self.engine.deferred());
    }

    /// The ring slot of the oldest held payload is about to be reposted (the application
    /// leaves its bytes unread while the peer keeps sending): every held payload moves into
    /// the receive queue first.
    fn unhold_before_post(&mut self) {
        self.release_held();
        let Some(front) = self.held.list.front() else {
            return;
        };
        if self.conn.posts_before_reuse(&front.c) > 0 {
            return;
        }
        let (held, conn) = (&self.held, &self.conn);
        let mut failed = false;
        self.engine.undefer(&mut |off, dst| {
            if !held.read(conn, off, dst) {
                failed = true;
            }
        });
        self.held = HeldPayloads::default();
        if failed {
            self.held_lost();
        }
    }

    /// Our own ring refused a slot we hold (it was reposted: a bug): what the connection
    /// would deliver next cannot be trusted, so it ends as a reset, its receive queue
    /// dropped (an `undefer` that failed queued zeros for the bytes it could not read).
    fn held_lost(&mut self) {
        crate::sdp_log!(
            crate::log::ERROR,
            "an SDP connection lost bytes it held in its ring; it is reset"
        );
        self.engine.abort(now());
        self.held = HeldPayloads::default();
        self.reset();
    }

    /// Carries the engine's outputs to the transport, in the documented order.
    fn drain_outputs(&mut self) {
        let t = now();
        while let Some(p) = self.engine.poll_post_recv() {
            for _ in 0..p.count {
                self.unhold_before_post();
                let wr = self.wr();
                if self.conn.post_recv(wr).is_err() {
                    break;
                }
            }
        }
        let max_len = self.txbuf.len();
        loop {
            self.next_wr += 1;
            let wr = self.next_wr;
            let conn = &mut self.conn;
            let mut posted = Ok(());
            // Data goes from the engine's send queue straight into the peer's ring.
            let Some(tx) =
                self.engine
                    .poll_transmit_gather(t, max_len, &mut self.txbuf, &mut |tx, pieces| {
                        posted = post(conn, wr, tx, pieces);
                    })
            else {
                break;
            };
            if posted.is_ok() && tx.mid == sdp_proto::wire::MessageId::DisConn {
                // The peer's application sees our half-close (RDHUP, then end of stream after
                // the data) without having to call into its library first.
                self.conn.shutdown_peer_bell();
                // Our app end's own writing is shut now, not at the application's `shutdown`
                // (`data::shutdown`): that also shuts the reading of our bell end, and once
                // the peer has shut its writing too (it sent its DisConn) our bell end polls
                // HUP, which the peer takes for our end. Shut before our DisConn went, it
                // told the peer we were gone while the bytes we had queued ahead of the
                // DisConn still waited for its credits: a client that half-closed, then
                // paused reading, got end of stream 367 KB short of its echo (a Node and a
                // Python epoll echo, found by a probe).
                let _ = ib_verbs::sys::shutdown_write(self.conn.app_end());
            }
            if let Err(e) = posted {
                self.post_failed(e);
                break;
            }
        }
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                // The shm transport has no connection manager: its teardown is immediate. An
                // abortive one (our abort, or an error we detected) is flagged to the peer,
                // which reports a reset as a TCP peer does after an RST.
                Event::Disconnect { abortive } => {
                    if abortive {
                        self.conn.abort();
                    }
                    let _ = self.engine.handle_cm_disconnected(t);
                }
                Event::UrgentPending => self.urgent = true,
                Event::RdmaRead(r) => {
                    let _ = self.engine.handle_rdma_read_complete(
                        t,
                        r.id,
                        Err(sdp_proto::conn::RdmaReadFailure::Unsupported),
                    );
                }
                _ => {}
            }
        }
        if let Some(deadline) = self.engine.poll_timeout()
            && deadline <= t
        {
            self.engine.handle_timeout(t);
        }
    }

    /// The engine's `send_through`: bytes go from the application's buffer straight into
    /// the peer's ring while nothing waits ahead of them. A failed post is handled as
    /// `drain_outputs` handles it.
    fn send_through(&mut self, t: Timestamp, b: &[u8]) -> Result<usize, SendError> {
        let max_len = self.txbuf.len();
        let mut failed = None;
        let conn = &mut self.conn;
        let next_wr = &mut self.next_wr;
        let r = self.engine.send_through(t, b, max_len, &mut |tx, pieces| {
            *next_wr += 1;
            match post(conn, *next_wr, tx, pieces) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        });
        if let Some(e) = failed {
            self.post_failed(e);
        }
        r
    }

    fn post_failed(&mut self, e: ib_verbs::PostError) {
        if self.dead.is_none() && !self.reset_seen {
            crate::sdp_log!(crate::log::WARN, "post_send failed: {e}");
        }
        if let ib_verbs::PostError::Dead(d) = e {
            self.transport_died(d);
        }
    }

    fn conn_errno(&self, e: &sdp_proto::ConnectionError) -> Errno {
        if self.peer_gone {
            // LINUX: a TCP peer that exits closes its socket: the reader sees end of stream
            // and a writer EPIPE, not a reset.
            return libc::EPIPE;
        }
        errno_of(e.io_kind())
    }
}

/// Posts one message. Only a message a reader waits for rings the peer's bell (readable
/// means data, end of stream or an error); a pure credit update wakes only a waiting writer.
fn post(
    conn: &mut ShmConn,
    wr: u64,
    tx: &sdp_proto::Transmit,
    pieces: &[&[u8]],
) -> Result<(), ib_verbs::PostError> {
    let quiet = tx.mid == sdp_proto::wire::MessageId::Data && tx.len <= sdp_proto::wire::BSDH_LEN;
    if quiet {
        conn.post_send_quiet(wr, pieces)
    } else {
        conn.post_send(wr, pieces)
    }
}

impl OffloadStream for SdpShm {
    fn transport(&self) -> Transport {
        Transport::Shm
    }

    fn progress(&mut self) {
        if self.stale() {
            return; // the application's next send or receive says so (EIO)
        }
        self.poll_completions();
        self.drain_outputs();
    }

    fn send(&mut self, data: &[&[u8]], oob: bool) -> Result<usize, Errno> {
        if let Some(e) = self.dead {
            return Err(e);
        }
        if std::mem::take(&mut self.reset_pending) {
            return Err(libc::ECONNRESET);
        }
        // Fail before the engine takes the bytes: taken, they were lost when the post found
        // the connection stolen, and the first send after a child's exec'd program had used
        // the connection reported success.
        self.own_it()?;
        let t = now();
        let mut n = 0;
        // One call takes at most the send buffer's room, as a TCP send does: bytes posted
        // straight into the ring never occupy the queue, so each buffer of a writev would
        // otherwise find the whole room again.
        let mut room = self.engine.send_room();
        for (i, b) in data.iter().enumerate() {
            let last = i + 1 == data.len();
            let piece = if n > 0 { &b[..b.len().min(room)] } else { b };
            if piece.is_empty() && !b.is_empty() {
                break;
            }
            let r = if oob && last {
                self.engine.send_urgent(t, piece)
            } else {
                self.send_through(t, piece)
            };
            match r {
                Ok(k) => {
                    n += k;
                    room = room.saturating_sub(k);
                    if k < b.len() {
                        break;
                    }
                }
                Err(SendError::WouldBlock) => break,
                Err(_) if n > 0 => break,
                Err(SendError::NotConnected) => return Err(libc::ENOTCONN),
                Err(SendError::Shutdown) => return Err(libc::EPIPE),
                Err(SendError::Closed(_))
                    if self.after_close.may_take_write(
                        self.peer_gone && !self.reset_seen && !self.shut_write,
                        self.engine.send_room(),
                    ) =>
                {
                    // LINUX: the first write to a peer that closed succeeds (see
                    // `AfterPeerClose`), for what the send buffer has room for.
                    let total = data.iter().map(|b| b.len()).sum();
                    return Ok(self.after_close.took_write(total, self.engine.send_room()));
                }
                Err(SendError::Closed(e)) => {
                    self.after_close.epipe_reported();
                    return Err(self.conn_errno(&e));
                }
            }
        }
        self.drain_outputs();
        if n == 0 && data.iter().any(|b| !b.is_empty()) {
            return Err(libc::EAGAIN);
        }
        if oob && n > 0 {
            // LINUX: the receiver of urgent data polls POLLPRI at once. AF_UNIX stream sockets
            // carry one out-of-band byte: we put it on the peer's app end (through its bell end)
            // and the peer's library takes it back when the urgent byte is read.
            crate::offload::raw_send(
                self.conn.peer_bell(),
                &[0],
                libc::MSG_OOB | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
        Ok(n)
    }

    fn recv(&mut self, out: &mut [&mut [u8]], peek: bool) -> Result<usize, Errno> {
        // A stale copy's engine may still hold bytes the current owner already delivered.
        self.own_it()?;
        self.release_held();
        let (held, conn) = (&self.held, &self.conn);
        let mut failed = false;
        // The held list is released only after the call, but each buffer of a readv takes
        // the deferred bytes that follow the previous buffer's.
        let mut taken = 0;
        let r = engine_recv_with(
            &mut self.engine,
            out,
            peek,
            &mut self.reset_pending,
            self.peer_gone,
            self.dead,
            &mut |off, dst| {
                if !held.read(conn, taken + off, dst) {
                    failed = true;
                }
                if !peek {
                    taken += dst.len();
                }
            },
        );
        self.release_held();
        if failed {
            self.held_lost();
            self.reset_pending = false; // reported here
            return Err(libc::ECONNRESET);
        }
        if matches!(r, Ok(n) if n > 0) {
            self.drain_outputs();
        }
        r
    }

    fn recv_oob(&mut self, peek: bool) -> Result<u8, Errno> {
        match self.engine.recv_urgent(now(), peek) {
            Ok(b) => Ok(b),
            Err(UrgentError::Invalid) => Err(libc::EINVAL),
            Err(UrgentError::WouldBlock) => Err(libc::EAGAIN),
            Err(UrgentError::Closed(e)) => Err(self.conn_errno(&e)),
        }
    }

    fn has_work(&mut self) -> bool {
        self.conn.has_work()
    }

    fn recv_ready(&self) -> bool {
        let r = self.engine.readiness();
        r.readable || r.error || self.dead.is_some() || self.peer_gone
    }

    fn read_closed(&self) -> bool {
        let r = self.engine.readiness();
        r.read_closed || r.error || self.dead.is_some() || self.peer_gone
    }

    fn send_ready(&self) -> bool {
        let r = self.engine.readiness();
        r.writable || r.error || self.dead.is_some() || self.peer_gone
    }

    fn recv_queued(&self) -> usize {
        self.engine.recv_available()
    }

    fn send_queued(&self) -> usize {
        self.engine.send_queued()
    }

    fn urgent_ready(&self) -> bool {
        self.engine.readiness().urgent
    }

    fn at_mark(&self) -> bool {
        self.engine.at_mark()
    }

    fn shutdown_write(&mut self) {
        if self.stale() {
            // Another process forked from this one serves the connection now (a CGI child's
            // program, through its relay): our copy is stale and must not touch the rings.
            // Its owner ends the stream; a server that shuts its copy down after the child
            // finished (Python's http.server does, per request) is not an error to log.
            return;
        }
        self.shut_write = true;
        let _ = self
            .engine
            .shutdown(now(), sdp_proto::conn::Shutdown::Write);
        self.drain_outputs();
    }

    fn abort(&mut self) {
        if self.stale() {
            return; // as for shutdown_write: the current owner's connection, not ours to end
        }
        self.engine.abort(now());
        self.drain_outputs();
    }

    fn set_oob_inline(&mut self, on: bool) {
        self.engine.set_oob_inline(on);
    }

    fn set_buffers(&mut self, sndbuf: Option<usize>, rcvbuf: Option<usize>) {
        self.engine.set_buffer_sizes(sndbuf, rcvbuf);
        self.drain_outputs(); // a bigger window reposts receive buffers now
    }

    fn unread(&mut self) -> bool {
        self.progress();
        self.engine.recv_available() > 0
    }

    fn peer_gone(&mut self) {
        if !self.peer_gone {
            // Whatever the peer sent before it went is still in our ring.
            self.poll_completions();
            // LINUX: a TCP peer that dies with bytes unread resets the connection (its kernel
            // answers with RST): the next call reports ECONNRESET once, then EPIPE/end of
            // stream. Bytes still queued here for lack of the peer's credits mean that its
            // window was full of bytes its application had not read.
            if self.engine.send_queued() > 0 {
                self.reset();
            }
            self.peer_gone = true;
            let _ = self.engine.handle_cm_disconnected(now());
        }
    }

    fn error(&self) -> Option<Errno> {
        if let Some(e) = self.dead {
            return Some(e);
        }
        if self.reset_pending {
            return Some(libc::ECONNRESET);
        }
        self.engine.error().map(|e| self.conn_errno(&e))
    }

    fn take_error(&mut self) -> Option<Errno> {
        if std::mem::take(&mut self.reset_pending) {
            return Some(libc::ECONNRESET);
        }
        if let Some(answer) = self
            .after_close
            .so_error(self.peer_gone && !self.reset_seen, self.dead.is_some())
        {
            return answer;
        }
        // LINUX: SO_ERROR reports a reset once; after any call reported it there is none.
        if self.reset_seen && self.dead.is_none() {
            return None;
        }
        self.error()
    }

    fn arm_recv(&mut self) -> bool {
        matches!(self.conn.arm(), Ok(true))
    }

    fn disarm_recv(&mut self) -> bool {
        self.conn.disarm()
    }

    fn quiet_while_polling(&self) -> bool {
        true
    }

    fn arm_send(&mut self) -> bool {
        matches!(self.conn.arm_drain(), Ok(true))
    }

    fn is_current(&self) -> bool {
        self.conn.claimed_by_me()
    }

    fn stale(&self) -> bool {
        SdpShm::stale(self)
    }

    fn vacate(&mut self) {
        self.conn.vacate();
    }

    fn vacant_for_me(&self) -> bool {
        self.conn.vacant_for_me()
    }

    fn claim_vacant(&mut self) -> bool {
        self.conn.vacant_for_me() && self.conn.claim().is_ok()
    }

    fn owner_generation(&self) -> u64 {
        self.conn.owner_generation()
    }

    fn set_every_arrival(&mut self, on: bool) {
        self.conn.set_ring_always(on);
    }

    fn take_urgent(&mut self) -> bool {
        std::mem::take(&mut self.urgent)
    }

    fn fds(&self) -> Vec<i32> {
        self.conn.fds()
    }

    fn flush(&mut self, budget: Duration) {
        self.flush_sends(budget);
    }

    fn counters(&self) -> Counters {
        let s = self.engine.stats();
        Counters {
            bytes_tx: s.bytes_sent + s.zcopy_bytes_sent,
            bytes_rx: s.bytes_received,
            msgs_tx: s.messages_sent,
            msgs_rx: s.messages_received,
            credits_tx: self.engine.tx_credits() as u64,
            posted_rx: self.engine.posted_recv_buffers() as u64,
            zcopy_tx: s.zcopy_bytes_sent,
            zcopy_rx: s.zcopy_bytes_received,
            bells_tx: self.conn.bells_rung(),
            direct_tx: s.direct_bytes_sent,
            direct_rx: s.direct_bytes_received,
        }
    }
}

impl SdpShm {
    /// Whether another process forked from this one has used the connection since we last
    /// did: our copy of its state is stale (`ShmConn::claim`).
    fn stale(&self) -> bool {
        !self.conn.claimed_by_me()
            && !self.conn.is_current()
            && !self.conn.vacated_at_my_generation()
    }

    /// Makes this process the connection's owner before the application's send or receive
    /// (again after a fork: `ShmConn::claimed_since_fork`); a stale copy fails with EIO
    /// (logged once) instead.
    fn own_it(&mut self) -> Result<(), Errno> {
        if let Some(e) = self.dead {
            return Err(e);
        }
        if !self.conn.claimed_since_fork()
            && let Err(e) = self.conn.claim()
        {
            self.transport_died(e);
            return Err(self.dead.unwrap_or(libc::EIO));
        }
        Ok(())
    }

    /// The peer's bell end we hold; its hang-up is the peer's end.
    pub fn peer_bell(&self) -> i32 {
        self.conn.peer_bell()
    }

    fn flush_sends(&mut self, budget: Duration) {
        if self.stale() {
            return;
        }
        let end = Instant::now() + budget;
        while self.engine.send_queued() > 0
            && self.dead.is_none()
            && !self.peer_gone
            && Instant::now() < end
        {
            self.progress();
            if self.engine.send_queued() == 0 {
                break;
            }
            let _ = self
                .conn
                .wait(Duration::from_micros(50), Some(Duration::from_millis(10)));
        }
        crate::sdp_log!(
            crate::log::TRACE,
            "flush at close: {} bytes left, state {:?}, dead {:?}, peer gone {}",
            self.engine.send_queued(),
            self.engine.state(),
            self.dead,
            self.peer_gone
        );
    }
}
