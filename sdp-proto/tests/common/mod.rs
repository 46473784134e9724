//! A two-endpoint simulation of SDP over a simulated RC link, with a virtual clock.
//!
//! Everything is deterministic from a seed: delays, message sizes, faults. The link keeps
//! RC's guarantees (in order, no loss while the QP lives) and may delay; a fault kills one
//! QP, flushes both directions, and the CM tells the other side.
#![allow(dead_code)]

use sdp_proto::conn::{RdmaReadFailure, ZcopyId};
use sdp_proto::error::{ConnectionError, TransportFailure};
use sdp_proto::wire::IpAddrs;
use sdp_proto::{Config, Connection, Event, Timestamp};
use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

/// Small fast deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// The byte at every stream offset, so sender and receiver agree without storing the stream.
pub fn pattern_fill(offset: u64, out: &mut [u8]) {
    fn word(k: u64) -> [u8; 8] {
        let mut z = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }
    let mut i = 0usize;
    while i < out.len() {
        let off = offset + i as u64;
        let w = word(off / 8);
        let start = (off % 8) as usize;
        let n = (8 - start).min(out.len() - i);
        out[i..i + n].copy_from_slice(&w[start..start + n]);
        i += n;
    }
}

#[derive(Debug)]
enum Sched {
    Deliver(Vec<u8>),
    SendDone,
    ReadDone {
        id: u64,
        data: Result<Vec<u8>, RdmaReadFailure>,
    },
    CmDisconnected,
}

/// One endpoint: its connection plus what the host did for it.
#[derive(Debug)]
pub struct Side {
    /// Messages delivered to this side (in turn through `handle_message`,
    /// `handle_message_from` and `handle_message_deferred`).
    delivered: u64,
    /// Payloads the connection left with this host (`handle_message_deferred`), oldest first,
    /// and their total: the connection's `deferred()` last bytes of them are unread.
    held: VecDeque<Vec<u8>>,
    held_bytes: usize,
    pub conn: Connection,
    /// Buffers posted (sizes, FIFO like an RQ).
    pub posted: VecDeque<u32>,
    /// Registered memory for our SrcAvails: rkey → bytes.
    pub registered: HashMap<u32, Vec<u8>>,
    zcopy_keys: HashMap<u64, u32>,
    /// ZcopySendFinished events seen.
    pub zcopy_finished: Vec<(ZcopyId, u32, bool)>,
    pub closed: Option<Option<ConnectionError>>,
    pub connected: bool,
    pub peer_half_closed: bool,
    pub urgent_events: u32,
    pub keepalive_probes: u32,
    pub rdma_read_fails: bool,
    pub messages_sent: u64,
    pub max_msg_len: usize,
}

impl Side {
    fn new(conn: Connection) -> Self {
        Side {
            delivered: 0,
            held: VecDeque::new(),
            held_bytes: 0,
            conn,
            posted: VecDeque::new(),
            registered: HashMap::new(),
            zcopy_keys: HashMap::new(),
            zcopy_finished: Vec::new(),
            closed: None,
            connected: false,
            peer_half_closed: false,
            urgent_events: 0,
            keepalive_probes: 0,
            rdma_read_fails: false,
            messages_sent: 0,
            max_msg_len: 0,
        }
    }
}

impl Side {
    /// Forgets the held bytes the connection no longer defers: always the oldest.
    fn release_held(&mut self) {
        let deferred = self.conn.deferred();
        let mut gone = self.held_bytes - deferred;
        while gone > 0 {
            let front = self
                .held
                .front_mut()
                .expect("held bytes cover the deferred ones");
            if front.len() <= gone {
                gone -= front.len();
                self.held.pop_front();
            } else {
                front.drain(..gone);
                gone = 0;
            }
        }
        self.held_bytes = deferred;
    }

    /// The host's copy of its held bytes from `offset` into `dst`.
    fn read_held(held: &VecDeque<Vec<u8>>, mut offset: usize, dst: &mut [u8]) {
        let mut done = 0;
        for h in held {
            if offset >= h.len() {
                offset -= h.len();
                continue;
            }
            let k = (h.len() - offset).min(dst.len() - done);
            dst[done..done + k].copy_from_slice(&h[offset..offset + k]);
            done += k;
            offset = 0;
            if done == dst.len() {
                break;
            }
        }
        assert_eq!(
            done,
            dst.len(),
            "a read of deferred bytes the host does not hold"
        );
    }

    /// The application's receive: through the host for deferred bytes.
    pub fn recv(
        &mut self,
        now: Timestamp,
        buf: &mut [u8],
        peek: bool,
    ) -> Result<usize, sdp_proto::error::RecvError> {
        self.release_held();
        let held = &self.held;
        let r = self.conn.recv_with(now, buf, peek, &mut |off, dst| {
            Side::read_held(held, off, dst)
        });
        self.release_held();
        r
    }

    /// The host takes its buffers back: the connection queues the held bytes itself.
    pub fn undefer(&mut self) {
        self.release_held();
        let held = &self.held;
        self.conn
            .undefer(&mut |off, dst| Side::read_held(held, off, dst));
        self.held.clear();
        self.held_bytes = 0;
        assert_eq!(self.conn.deferred(), 0);
    }
}

/// Link behaviour.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Fixed one-way delay, ns.
    pub delay: u64,
    /// Extra random delay up to this, ns (order is still kept, as on RC).
    pub jitter: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            delay: 2_000,
            jitter: 0,
        }
    }
}

pub struct Sim {
    /// Messages built so far (every other one through `poll_transmit_gather`).
    transmits: u64,
    pub now: u64,
    pub sides: [Side; 2],
    /// Per destination side: FIFO of (time, item); times never decrease.
    queues: [VecDeque<(u64, Sched)>; 2],
    pub link: LinkConfig,
    pub rng: Rng,
    buf: Vec<u8>,
    next_rkey: u32,
    pub steps: u64,
}

pub fn addrs() -> IpAddrs {
    IpAddrs::V4 {
        src: Ipv4Addr::new(10, 0, 0, 1),
        dst: Ipv4Addr::new(10, 0, 0, 2),
    }
}

impl Sim {
    /// Two connected endpoints: 0 is active, 1 passive.
    pub fn connected(ca: Config, cb: Config, link: LinkConfig, seed: u64) -> Sim {
        let mut sim = Sim::handshake_only(ca, cb, link, seed);
        sim.pump();
        assert!(sim.sides[0].connected && sim.sides[1].connected);
        sim
    }

    /// Handshake done on both sides, nothing pumped yet.
    pub fn handshake_only(ca: Config, cb: Config, link: LinkConfig, seed: u64) -> Sim {
        let now = Timestamp::ZERO;
        let mut a = Connection::connect(ca, now, addrs(), 40000);
        let mut a_posted = VecDeque::new();
        while let Some(p) = a.poll_post_recv() {
            a_posted.extend(std::iter::repeat_n(p.size, p.count as usize));
        }
        let hello = a.hello();
        let mut b = Connection::accept(cb, now, &hello).expect("hello accepted");
        let mut b_posted = VecDeque::new();
        while let Some(p) = b.poll_post_recv() {
            b_posted.extend(std::iter::repeat_n(p.size, p.count as usize));
        }
        let ack = b.hello_ack();
        a.handle_hello_ack(now, &ack).expect("hello ack accepted");
        b.handle_established(now).unwrap();
        let mut sa = Side::new(a);
        sa.posted = a_posted;
        let mut sb = Side::new(b);
        sb.posted = b_posted;
        Sim {
            transmits: 0,
            now: 0,
            sides: [sa, sb],
            queues: [VecDeque::new(), VecDeque::new()],
            link,
            rng: Rng::new(seed),
            buf: vec![0u8; 1 << 20],
            next_rkey: 0x1000,
            steps: 0,
        }
    }

    pub fn ts(&self) -> Timestamp {
        Timestamp::from_nanos(self.now)
    }

    fn schedule(&mut self, to: usize, item: Sched) {
        let d = self.link.delay
            + if self.link.jitter > 0 {
                self.rng.range(0, self.link.jitter)
            } else {
                0
            };
        let at = self.queues[to]
            .back()
            .map_or(0, |(t, _)| *t)
            .max(self.now + d);
        self.queues[to].push_back((at, item));
    }

    /// Drains every output of both sides until quiet.
    pub fn pump(&mut self) {
        loop {
            let mut progress = false;
            for s in 0..2 {
                progress |= self.pump_side(s);
            }
            if !progress {
                break;
            }
        }
    }

    fn pump_side(&mut self, s: usize) -> bool {
        let now = self.ts();
        let mut progress = false;
        while let Some(p) = self.sides[s].conn.poll_post_recv() {
            let side = &mut self.sides[s];
            side.posted
                .extend(std::iter::repeat_n(p.size, p.count as usize));
            progress = true;
        }
        loop {
            let mut buf = std::mem::take(&mut self.buf);
            // Every other message goes through the gather form, which must frame exactly what
            // the copying form does.
            self.transmits += 1;
            let mut gathered = Vec::new();
            let t = if self.transmits.is_multiple_of(2) {
                let max = buf.len();
                self.sides[s]
                    .conn
                    .poll_transmit_gather(now, max, &mut buf, &mut |t, pieces| {
                        gathered = pieces.concat();
                        assert_eq!(gathered.len(), t.len, "pieces add up to the message");
                    })
            } else {
                self.sides[s]
                    .conn
                    .poll_transmit(now, &mut buf)
                    .inspect(|t| {
                        gathered = buf[..t.len].to_vec();
                    })
            };
            match t {
                Some(t) => {
                    let bytes = gathered;
                    assert_eq!(bytes.len(), t.len);
                    self.buf = buf;
                    let side = &mut self.sides[s];
                    side.messages_sent += 1;
                    side.max_msg_len = side.max_msg_len.max(t.len);
                    self.schedule(1 - s, Sched::Deliver(bytes));
                    self.schedule(s, Sched::SendDone);
                    progress = true;
                }
                None => {
                    self.buf = buf;
                    break;
                }
            }
        }
        while let Some(e) = self.sides[s].conn.poll_event() {
            progress = true;
            match e {
                Event::Connected => self.sides[s].connected = true,
                Event::RdmaRead(r) => {
                    let data = if self.sides[s].rdma_read_fails {
                        Err(RdmaReadFailure::Unsupported)
                    } else {
                        let mem = self.sides[1 - s]
                            .registered
                            .get(&r.rkey)
                            .expect("read of a registered key");
                        let at = r.remote_addr as usize;
                        Ok(mem[at..at + r.len as usize].to_vec())
                    };
                    self.schedule(s, Sched::ReadDone { id: r.id, data });
                }
                Event::ZcopySendFinished {
                    id,
                    sent,
                    completed,
                } => {
                    if let Some(k) = self.sides[s].zcopy_keys.remove(&id.0) {
                        self.sides[s].registered.remove(&k);
                    }
                    self.sides[s].zcopy_finished.push((id, sent, completed));
                }
                Event::UrgentPending => self.sides[s].urgent_events += 1,
                Event::KeepaliveProbe => self.sides[s].keepalive_probes += 1,
                Event::Disconnect { abortive } => {
                    // The CM DREQ reaches the peer; a graceful one also ends ours (DREP).
                    self.schedule(1 - s, Sched::CmDisconnected);
                    if !abortive {
                        self.schedule(s, Sched::CmDisconnected);
                    }
                }
                Event::PeerHalfClosed => self.sides[s].peer_half_closed = true,
                Event::Closed { error } => self.sides[s].closed = Some(error),
            }
        }
        progress
    }

    /// The application's send on side `s`: in turn `send`, and `send_through`, whose
    /// messages go on the link as `pump` sends them.
    pub fn send(&mut self, s: usize, data: &[u8]) -> Result<usize, sdp_proto::error::SendError> {
        let now = self.ts();
        self.transmits += 1;
        if self.transmits.is_multiple_of(2) {
            return self.sides[s].conn.send(now, data);
        }
        let max = self.buf.len();
        let mut sent = Vec::new();
        let r = self.sides[s]
            .conn
            .send_through(now, data, max, &mut |t, pieces| {
                let bytes = pieces.concat();
                assert_eq!(bytes.len(), t.len, "pieces add up to the message");
                sent.push(bytes);
                true
            });
        for bytes in sent {
            let side = &mut self.sides[s];
            side.messages_sent += 1;
            side.max_msg_len = side.max_msg_len.max(bytes.len());
            self.schedule(1 - s, Sched::Deliver(bytes));
            self.schedule(s, Sched::SendDone);
        }
        r
    }

    /// Registers `data` for side `s` and offers it by ZCopy.
    pub fn send_zcopy(
        &mut self,
        s: usize,
        data: &[u8],
    ) -> Result<ZcopyId, sdp_proto::error::ZcopyError> {
        let now = self.ts();
        let rkey = self.next_rkey;
        let r = self.sides[s].conn.send_zcopy(now, data, rkey, 0)?;
        self.next_rkey += 1;
        self.sides[s].registered.insert(rkey, data.to_vec());
        self.sides[s].zcopy_keys.insert(r.0, rkey);
        Ok(r)
    }

    /// Next time anything is due, scheduled items or timers.
    pub fn next_due(&self) -> Option<u64> {
        let q = self
            .queues
            .iter()
            .filter_map(|q| q.front().map(|(t, _)| *t))
            .min();
        let t = self
            .sides
            .iter()
            .filter_map(|s| s.conn.poll_timeout().map(|t| t.as_nanos()))
            .min();
        match (q, t) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether link items are pending (not counting timers).
    pub fn link_busy(&self) -> bool {
        self.queues.iter().any(|q| !q.is_empty())
    }

    /// Advances to the next due item and handles everything due then. False if nothing is due.
    pub fn step(&mut self) -> bool {
        let Some(t) = self.next_due() else {
            return false;
        };
        self.now = self.now.max(t);
        self.steps += 1;
        let now = self.ts();
        for s in 0..2 {
            while self.queues[s].front().is_some_and(|(t, _)| *t <= self.now) {
                let (_, item) = self.queues[s].pop_front().unwrap();
                let side = &mut self.sides[s];
                match item {
                    Sched::Deliver(bytes) => {
                        let size = side
                            .posted
                            .pop_front()
                            .expect("RNR: message with no posted buffer");
                        assert!(
                            bytes.len() <= size as usize,
                            "message {} overruns buffer {size}",
                            bytes.len()
                        );
                        // Deliveries take the slice form, the in-place form and the
                        // deferring form in turn; all must act alike.
                        side.delivered += 1;
                        let mut scratch = vec![0u8; bytes.len()];
                        let mut read = |off: usize, dst: &mut [u8]| {
                            dst.copy_from_slice(&bytes[off..off + dst.len()])
                        };
                        let r = match side.delivered % 3 {
                            0 => side.conn.handle_message(now, &bytes),
                            1 => side.conn.handle_message_from(
                                now,
                                bytes.len(),
                                &mut scratch,
                                &mut read,
                            ),
                            _ => {
                                side.release_held();
                                let r = side.conn.handle_message_deferred(
                                    now,
                                    bytes.len(),
                                    &mut scratch,
                                    &mut read,
                                );
                                if let Ok(true) = r {
                                    let payload = bytes[sdp_proto::wire::BSDH_LEN..].to_vec();
                                    side.held_bytes += payload.len();
                                    side.held.push_back(payload);
                                }
                                // Now and then the host wants its buffers back.
                                if side.conn.deferred() > 0 && self.rng.chance(5) {
                                    side.undefer();
                                }
                                r.map(|_| ())
                            }
                        };
                        if std::env::var_os("SDP_SIM_TRACE").is_some() {
                            let m = sdp_proto::wire::MessageRepr::parse(&bytes).map(|m| {
                                (
                                    m.bsdh.mseq,
                                    m.bsdh.mseq_ack,
                                    m.bsdh.bufs,
                                    m.body.mid(),
                                    bytes.len(),
                                )
                            });
                            eprintln!("t={} -> {s}: {m:?} {r:?}", self.now);
                        }
                    }
                    Sched::SendDone => {
                        let _ = side.conn.handle_send_complete(now, 1);
                    }
                    Sched::ReadDone { id, data } => {
                        let r = match &data {
                            Ok(v) => Ok(&v[..]),
                            Err(e) => Err(*e),
                        };
                        let r = side.conn.handle_rdma_read_complete(now, id, r);
                        if std::env::var_os("SDP_SIM_TRACE").is_some() {
                            eprintln!("t={} read done at {s}: {r:?}", self.now);
                        }
                    }
                    Sched::CmDisconnected => {
                        let _ = side.conn.handle_cm_disconnected(now);
                    }
                }
            }
            if self.sides[s].conn.poll_timeout().is_some_and(|d| d <= now) {
                self.sides[s].conn.handle_timeout(now);
            }
        }
        self.pump();
        true
    }

    /// Kills side `s`'s QP: a completion error there, everything in flight lost, and the CM
    /// tells the peer.
    pub fn fail_qp(&mut self, s: usize) {
        let now = self.ts();
        for q in &mut self.queues {
            q.retain(|(_, i)| matches!(i, Sched::CmDisconnected));
        }
        let _ = self.sides[s]
            .conn
            .handle_transport_error(now, TransportFailure::SendCompletion);
        self.pump();
    }

    /// Runs until nothing is due or `limit` steps passed.
    pub fn run_until_idle(&mut self, limit: u64) {
        let mut n = 0;
        while n < limit && self.step() {
            n += 1;
        }
    }
}

/// Bulk transfer driver: side `from` writes `total` pattern bytes in random sizes (some by
/// ZCopy, some urgent), side `to` reads in random sizes and checks every byte.
pub struct Bulk {
    pub from: usize,
    pub to: usize,
    pub total: u64,
    pub written: u64,
    pub read: u64,
    pub max_write: u64,
    pub max_read: u64,
    pub zcopy_percent: u64,
    /// A refused ZCopy remainder to send before anything else: (stream offset, bytes).
    resend: Option<(u64, Vec<u8>)>,
    pending_zcopy: Option<(ZcopyId, u64, usize)>,
    /// The next write decided but not yet done: (size, by ZCopy).
    next: Option<(usize, bool)>,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    cbuf: Vec<u8>,
}

impl Bulk {
    pub fn new(from: usize, total: u64) -> Bulk {
        Bulk {
            from,
            to: 1 - from,
            total,
            written: 0,
            read: 0,
            max_write: 100_000,
            max_read: 100_000,
            zcopy_percent: 0,
            resend: None,
            pending_zcopy: None,
            next: None,
            wbuf: vec![0; 3 << 20],
            rbuf: vec![0; 1 << 20],
            cbuf: vec![0; 1 << 20],
        }
    }

    pub fn done(&self) -> bool {
        self.read == self.total
    }

    /// One round of application activity on both sides.
    pub fn act(&mut self, sim: &mut Sim) {
        let now = sim.ts();
        let from = self.from;
        // Resolve a finished ZCopy.
        if let Some((id, off, len)) = self.pending_zcopy
            && let Some(&(_, sent, completed)) = sim.sides[from]
                .zcopy_finished
                .iter()
                .find(|(i, _, _)| *i == id)
        {
            self.pending_zcopy = None;
            if !completed {
                let rest = &mut self.wbuf[..len - sent as usize];
                pattern_fill(off + u64::from(sent), rest);
                self.resend = Some((off + u64::from(sent), rest.to_vec()));
            }
        }
        if self.pending_zcopy.is_none() {
            if let Some((off, bytes)) = self.resend.take() {
                match sim.send(from, &bytes) {
                    Ok(n) if n < bytes.len() => {
                        self.resend = Some((off + n as u64, bytes[n..].to_vec()))
                    }
                    Ok(_) => {}
                    Err(_) => self.resend = Some((off, bytes)),
                }
            }
            while self.resend.is_none() && self.pending_zcopy.is_none() && self.written < self.total
            {
                let (want, zc) = *self.next.get_or_insert_with(|| {
                    let want = sim
                        .rng
                        .range(1, self.max_write)
                        .min(self.total - self.written) as usize;
                    let zc = self.zcopy_percent > 0
                        && want > 64 * 1024
                        && sim.rng.chance(self.zcopy_percent);
                    (if zc { want.min(2_000_000) } else { want }, zc)
                });
                if zc && !sim.sides[from].conn.zcopy_possible(want) {
                    // Wait for the queue to drain (or give up if ZCopy cannot happen at all).
                    if sim.sides[from].conn.send_queued() == 0
                        && sim.sides[from].conn.send_room() > 0
                    {
                        self.next = Some((want, false));
                        continue;
                    }
                    break;
                }
                self.next = None;
                let chunk = &mut self.wbuf[..want];
                pattern_fill(self.written, chunk);
                if zc {
                    let id = sim
                        .send_zcopy(from, chunk)
                        .expect("zcopy_possible said yes");
                    self.pending_zcopy = Some((id, self.written, want));
                    self.written += want as u64;
                    break;
                }
                match sim.send(from, chunk) {
                    Ok(n) => self.written += n as u64,
                    Err(_) => {
                        self.next = Some((want, false));
                        break;
                    }
                }
            }
        }
        // Reader.
        loop {
            let want = sim.rng.range(1, self.max_read) as usize;
            match sim.sides[self.to].recv(now, &mut self.rbuf[..want], false) {
                Ok(0) => break,
                Ok(n) => {
                    pattern_fill(self.read, &mut self.cbuf[..n]);
                    assert!(
                        self.rbuf[..n] == self.cbuf[..n],
                        "stream mismatch at offset {}",
                        self.read
                    );
                    self.read += n as u64;
                }
                Err(_) => break,
            }
        }
        sim.pump();
    }

    /// Runs the transfer to completion; panics on a stall.
    pub fn run(&mut self, sim: &mut Sim) {
        let mut idle_rounds = 0;
        while !self.done() {
            let before = (self.written, self.read);
            self.act(sim);
            if !sim.step() && before == (self.written, self.read) {
                idle_rounds += 1;
                assert!(
                    idle_rounds < 3,
                    "stalled: written {} read {} of {}; a credits {} posted {}; b credits {} posted {}",
                    self.written,
                    self.read,
                    self.total,
                    sim.sides[0].conn.tx_credits(),
                    sim.sides[0].conn.posted_recv_buffers(),
                    sim.sides[1].conn.tx_credits(),
                    sim.sides[1].conn.posted_recv_buffers()
                );
            } else {
                idle_rounds = 0;
            }
        }
    }
}
