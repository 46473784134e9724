//! An established `shm` connection: the two rings, the bells, RDMA READ emulation.
//!
//! ## The ring protocol (one direction; the other is the mirror image)
//!
//! The receiver R owns `rx_posted` (buffers ever posted), the sender S owns `tx_produced`
//! (messages ever written). Slots are used in order, slot `n % depth` for the n-th message.
//!
//! - R posts a buffer: slot `P % depth` must already be consumed (`P < consumed + depth`);
//!   `P += 1`, then `store(rx_posted, P, Release)`.
//! - S sends: `load(rx_posted, Acquire)` = credits `P - produced`; writes the payload and the
//!   slot header, then `store(tx_produced, produced + 1, Release)`. The Release/Acquire pair
//!   makes the payload visible before the count that announces it, and R's reposting of a
//!   slot visible only after R is done with its old content.
//! - R consumes: `load(tx_produced, Acquire)`, then copies the slot header into private memory
//!   and validates it.
//!
//! INVARIANT (checked on every load, against private copies): `consumed <= produced <= P`
//! on R's side, `last_seen_P <= P <= produced + depth` on S's side. A peer breaking either
//! ends the connection with a [`Violation`].
//!
//! ## Bells without lost wake-ups (an eventcount)
//!
//! A side that wants to sleep stores `want_bell = 1`, issues a SeqCst fence, re-checks the
//! ring, and only then sleeps in `poll` on its app end. A side that publishes (a message or a
//! posted buffer) issues a SeqCst fence after its Release store and then loads the peer's
//! `want_bell`; if set, it clears it with a swap and writes one byte into the peer's bell end.
//! The two fences order "flag then check" against "publish then check flag": at least one
//! side sees the other's store, so a sleeper is never missed, and a busy receiver costs its
//! sender no system call.
//!
//! ## RDMA READ
//!
//! `process_vm_readv` of the range, checked against the peer's key table (its own side
//! block): key loaded (Acquire), range inside the entry, the copy, a SeqCst fence, the key
//! loaded again: a key revoked before or during the copy fails the read. The pidfd taken at
//! bootstrap proves the pid still names the peer after the copy (no pid reuse).

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{Ordering, fence};

use super::layout::{KEYS, Layout, SLOT_HEADER};
use super::mem::Mapping;
use crate::sys::{self, Fd, PeerCred};
use crate::transport::{
    Access, Completion, ConnAttrs, ConnError, Connection, LocalSge, MemKey, Opcode, PostError,
    RegError, RemoteSge, Violation, WcError, WrId,
};

/// Local (`LocalWrite`) registrations per connection.
const LOCAL_KEYS: usize = 64;
/// Key bit 7: 1 = remote-readable (published) registration, 0 = local.
const KEY_REMOTE: u32 = 0x80;

#[derive(Clone, Copy, Debug)]
struct Reg {
    key: MemKey,
    addr: u64,
    len: u64,
}

/// Everything the bootstrap hands over to build a connection.
pub(crate) struct Parts {
    pub map: Mapping,
    pub memfd: Fd,
    pub side: usize,
    pub layout: Layout,
    pub app_end: Fd,
    pub peer_bell: Fd,
    pub cred: PeerCred,
    pub pidfd: Option<Fd>,
    pub can_read_peer: bool,
    pub peer_can_read: bool,
    pub send_depth: u32,
    pub initial_posts: Vec<WrId>,
    /// (device, inode) of the memfd, the key a client keeps its ring under.
    pub ino: (u64, u64),
    /// The ring's reuse token for this connection (`Layout::reuse_token`); `None` with a
    /// peer of an earlier build, which reuses nothing.
    pub token: Option<u64>,
    /// The client's grouping of its kept rings (`reuse::client_tokens`).
    pub scope: u64,
    /// [`super::reuse::start`], read before the ring was mapped.
    pub keep_from: Option<u64>,
    /// The ring came from [`super::reuse`] (statistics).
    pub reused: bool,
}

/// One established `shm` connection. Dropping it closes the peer's bell end: the peer sees
/// the end after it consumed what was sent.
pub struct ShmConn {
    /// Taken in `drop`: kept for the next connection with this peer, or unmapped.
    map: std::mem::ManuallyDrop<Mapping>,
    /// `None` only in `drop`, once taken.
    memfd: Option<Fd>,
    side: usize,
    layout: Layout,
    app_end: Fd,
    peer_bell: Fd,
    cred: PeerCred,
    pidfd: Option<Fd>,
    can_read_peer: bool,
    peer_can_read: bool,
    send_depth: u32,

    // Our receive ring (the peer writes it).
    rx_posted: u64,
    rx_consumed: u64,
    rx_wr: Vec<WrId>,
    /// Length of the message held in a slot whose completion was delivered and which was not
    /// reposted yet.
    rx_held: Vec<Option<u32>>,

    // The peer's receive ring (we write it).
    tx_produced: u64,
    peer_posted_seen: u64,
    peer_posted_reported: u64,
    /// The message number our last `arm` asked to be rung for (0: not armed).
    armed_target: u32,
    /// Bell bytes we wrote into the peer's app end.
    bells_rung: u64,

    cq: VecDeque<Completion>,
    local_regs: Vec<Option<Reg>>,
    remote_regs: Vec<Option<Reg>>,
    key_gen: u32,
    peer_gone: bool,
    dead: Option<ConnError>,
    ring_on_post_recv: bool,
    peer_bell_shut: bool,
    app_eof_is_peer_end: bool,
    gen_seen: u64,
    claimed_pid: i32,
    /// The process's fork count ([`super::reuse::forks`]) at our last claim.
    forks_seen: u64,
    ino: (u64, u64),
    token: Option<u64>,
    scope: u64,
    reused: bool,
    /// The fork count at setup, if the ring may be kept when the connection ends.
    keep_from: Option<u64>,
    /// The memfd or every descriptor was handed out (to a process taking the connection
    /// over): the ring is never kept.
    handed_out: std::sync::atomic::AtomicBool,
}

/// The bit of an owner generation that says its owner left the side ([`ShmConn::vacate`]).
const VACANT: u64 = 1 << 63;

impl std::fmt::Debug for ShmConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmConn")
            .field("side", &self.side)
            .field("layout", &self.layout)
            .field("peer", &self.cred)
            .field("rx_posted", &self.rx_posted)
            .field("rx_consumed", &self.rx_consumed)
            .field("tx_produced", &self.tx_produced)
            .field("dead", &self.dead)
            .finish()
    }
}

impl ShmConn {
    pub(crate) fn new(p: Parts) -> Result<ShmConn, PostError> {
        let depth = p.layout.rings[p.side].depth as usize;
        let mut c = ShmConn {
            map: std::mem::ManuallyDrop::new(p.map),
            memfd: Some(p.memfd),
            side: p.side,
            layout: p.layout,
            app_end: p.app_end,
            peer_bell: p.peer_bell,
            cred: p.cred,
            pidfd: p.pidfd,
            can_read_peer: p.can_read_peer,
            peer_can_read: p.peer_can_read,
            send_depth: p.send_depth,
            rx_posted: 0,
            rx_consumed: 0,
            rx_wr: vec![0; depth],
            rx_held: vec![None; depth],
            tx_produced: 0,
            peer_posted_seen: 0,
            peer_posted_reported: 0,
            armed_target: 0,
            bells_rung: 0,
            cq: VecDeque::with_capacity(p.send_depth as usize),
            local_regs: vec![None; LOCAL_KEYS],
            remote_regs: vec![None; KEYS],
            key_gen: 0,
            peer_gone: false,
            dead: None,
            ring_on_post_recv: true,
            peer_bell_shut: false,
            app_eof_is_peer_end: true,
            gen_seen: 0,
            claimed_pid: sys::getpid(),
            forks_seen: {
                super::reuse::count_forks();
                super::reuse::forks()
            },
            ino: p.ino,
            token: p.token,
            scope: p.scope,
            reused: p.reused,
            keep_from: p.keep_from,
            handed_out: std::sync::atomic::AtomicBool::new(false),
        };
        // Our own side block starts from our private state, whatever the creator wrote there.
        c.map
            .u64_at(Layout::tx_produced(c.side))
            .store(0, Ordering::Relaxed);
        c.map
            .u32_at(Layout::want_bell(c.side))
            .store(0, Ordering::Relaxed);
        c.map
            .u32_at(Layout::want_drain(c.side))
            .store(0, Ordering::Relaxed);
        for i in 0..KEYS {
            c.map
                .u64_at(Layout::key_entry(c.side, i))
                .store(0, Ordering::Relaxed);
        }
        // Publish the initial posts in one Release store: the peer may already have seen
        // this count (the creator wrote it), and it must never see it go backwards.
        if p.initial_posts.len() > depth {
            return Err(PostError::QueueFull);
        }
        for (slot, wr) in p.initial_posts.into_iter().enumerate() {
            c.rx_wr[slot] = wr;
            c.rx_posted += 1;
        }
        c.map
            .u64_at(Layout::rx_posted(c.side))
            .store(c.rx_posted, Ordering::Release);
        // The peer's initial credits are known from the bootstrap: not an event.
        c.peer_posted_reported = c
            .map
            .u64_at(Layout::rx_posted(c.peer()))
            .load(Ordering::Acquire);
        Ok(c)
    }

    fn peer(&self) -> usize {
        1 - self.side
    }

    /// The peer's credentials as the kernel reported them on the bootstrap socket.
    pub fn peer_cred(&self) -> PeerCred {
        self.cred
    }

    /// The app end: the notification fd. `ops` may `dup2` it onto the application's fd number;
    /// the peer's writes into the other end make it readable, and the peer's last close makes
    /// it report end of stream (POLLIN + read 0, and POLLHUP/POLLRDHUP).
    pub fn app_end(&self) -> RawFd {
        self.app_end.raw()
    }

    /// Bell bytes written into the peer's app end so far.
    pub fn bells_rung(&self) -> u64 {
        self.bells_rung
    }

    /// The peer's bell end we hold (writing into it makes the peer's app end readable).
    pub fn peer_bell(&self) -> RawFd {
        self.peer_bell.raw()
    }

    /// Every descriptor the connection holds (memfd, bells, pidfd), e.g. to keep exactly these
    /// in a process that takes the connection over.
    pub fn fds(&self) -> Vec<RawFd> {
        // `memfd` marks the ring handed out.
        let mut v = vec![self.memfd(), self.app_end.raw(), self.peer_bell.raw()];
        if let Some(p) = &self.pidfd {
            v.push(p.raw());
        }
        v
    }

    /// The memfd, e.g. to pass it on to a process that takes over the connection.
    pub fn memfd(&self) -> RawFd {
        self.handed_out
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.memfd.as_ref().map_or(-1, Fd::raw)
    }

    /// Whether the ring came from a connection with the same peer process that ended.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Sends we can post right now: the peer's posted buffers not yet used.
    pub fn credits(&mut self) -> Result<u32, ConnError> {
        self.check_alive()?;
        let p = self.load_peer_posted()?;
        Ok((p - self.tx_produced) as u32)
    }

    /// Why the connection died, if it did.
    pub fn error(&self) -> Option<ConnError> {
        self.dead
    }

    fn check_alive(&self) -> Result<(), ConnError> {
        match self.dead {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn kill(&mut self, e: ConnError) -> ConnError {
        *self.dead.get_or_insert(e)
    }

    fn peer_aborted(&self) -> bool {
        self.map
            .u32_at(Layout::aborted(self.peer()))
            .load(Ordering::Acquire)
            != 0
    }

    /// Abortive close: tells the peer that this side reset the connection (it reports
    /// [`ConnError::PeerAborted`] once it has taken what we sent before) and wakes it. The
    /// connection is unusable afterwards; drop it.
    pub fn abort(&mut self) {
        if self.dead.is_some() {
            return;
        }
        self.map
            .u32_at(Layout::aborted(self.side))
            .store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        // Both directions of the peer's bell: its app end polls IN and HUP at once, as a TCP
        // socket that received a reset does (less POLLERR, which an AF_UNIX socket cannot be
        // made to show from outside).
        self.peer_bell_shut = true;
        let _ = sys::shutdown_both(self.peer_bell.raw());
    }

    /// The peer's `rx_posted`, validated against our private counts.
    fn load_peer_posted(&mut self) -> Result<u64, ConnError> {
        let p = self
            .map
            .u64_at(Layout::rx_posted(self.peer()))
            .load(Ordering::Acquire);
        let depth = self.layout.rings[self.peer()].depth;
        if p < self.peer_posted_seen || p > self.tx_produced + depth as u64 {
            let v = Violation::PostedIndex {
                seen: p,
                sent: self.tx_produced,
                last: self.peer_posted_seen,
                depth,
            };
            return Err(self.kill(ConnError::Protocol(v)));
        }
        self.peer_posted_seen = p;
        Ok(p)
    }

    /// The peer's `tx_produced`, validated against our private counts.
    fn load_peer_produced(&mut self) -> Result<u64, ConnError> {
        let s = self
            .map
            .u64_at(Layout::tx_produced(self.peer()))
            .load(Ordering::Acquire);
        if s < self.rx_consumed || s > self.rx_posted {
            let v = Violation::ProducedIndex {
                seen: s,
                consumed: self.rx_consumed,
                posted: self.rx_posted,
            };
            return Err(self.kill(ConnError::Protocol(v)));
        }
        Ok(s)
    }

    /// Rings the peer's bell if it asked for it. Called after a SeqCst fence that follows our
    /// publishing store.
    /// Rings the peer's bell if it asked for it: for a message (`data`), only if the peer
    /// armed for a message number we have now published. A reader that took the message
    /// before we looked (busy-polling) and armed again for the next one must not get a bell
    /// byte for it: its app end would poll readable with nothing to read, and a program that
    /// trusts level-triggered readiness (wrk) takes the EAGAIN for an error. Credits
    /// (`data == false`) wake any armed peer.
    fn ring_peer(&mut self, data: bool) {
        if self.peer_bell_shut {
            return;
        }
        let flag = self.map.u32_at(Layout::want_bell(self.peer()));
        let always = self
            .map
            .u32_at(Layout::ring_always(self.peer()))
            .load(Ordering::Relaxed)
            != 0;
        let armed = flag.load(Ordering::Relaxed);
        // Message numbers compare modulo 2^32.
        let due = armed != 0 && (!data || (self.tx_produced as u32).wrapping_sub(armed) < 1 << 31);
        if (due
            && flag
                .compare_exchange(armed, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok())
            || always
        {
            match sys::send_byte(self.peer_bell.raw()) {
                Ok(_) => self.bells_rung += 1,
                // LINUX: EPIPE/ECONNRESET: every holder of the peer's app end closed it.
                Err(_) => self.peer_gone = true,
            }
        }
    }

    /// A SEND that does not ring the peer's bell: for messages that carry nothing a reader
    /// waits for (a pure credit update). A peer waiting for room is still woken.
    pub fn post_send_quiet(&mut self, wr_id: WrId, gather: &[&[u8]]) -> Result<(), PostError> {
        self.post_send_inner(wr_id, gather, false)
    }

    /// Whether posting a receive buffer rings the peer's bell (default: yes, so that a peer
    /// sleeping in [`Connection::wait`] for credits wakes). A host that drives the app end's
    /// readiness from data only turns it off and relies on the drain of `arm_drain`.
    pub fn set_ring_on_post_recv(&mut self, on: bool) {
        self.ring_on_post_recv = on;
    }

    /// Whether end of stream on our app end means the peer's end (default: yes, the peer is
    /// the only holder of our bell end). A host that keeps its own copy of the bell end, and
    /// lets the peer shut it to signal a half-close, detects the peer's end itself (the hang-up
    /// of the peer's bell end we hold) and turns this off.
    pub fn set_app_eof_is_peer_end(&mut self, on: bool) {
        self.app_eof_is_peer_end = on;
    }

    fn post_send_inner(
        &mut self,
        wr_id: WrId,
        gather: &[&[u8]],
        wake_reader: bool,
    ) -> Result<(), PostError> {
        self.check_alive()?;
        self.claim_for_mutation()?;
        if self.peer_gone {
            return Err(PostError::Dead(self.kill(ConnError::PeerClosed)));
        }
        if self.cq.len() >= self.send_depth as usize {
            return Err(PostError::QueueFull);
        }
        let ring = self.layout.rings[self.peer()];
        let len: usize = gather.iter().map(|g| g.len()).sum();
        if len > ring.buf_size as usize {
            return Err(PostError::TooLong {
                len,
                max: ring.buf_size,
            });
        }
        let posted = self.load_peer_posted()?;
        if posted == self.tx_produced {
            return Err(PostError::NoCredit);
        }
        let slot = (self.tx_produced % ring.depth as u64) as u32;
        let base = self.layout.slot(self.peer(), slot);
        let mut off = base + SLOT_HEADER;
        for g in gather {
            self.map.write(off, g);
            off += g.len();
        }
        let mut hdr = [0u8; SLOT_HEADER];
        hdr[..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.map.write(base, &hdr);
        self.tx_produced += 1;
        self.map
            .u64_at(Layout::tx_produced(self.side))
            .store(self.tx_produced, Ordering::Release);
        fence(Ordering::SeqCst);
        if wake_reader {
            self.ring_peer(true);
        }
        self.drain_peer();
        self.push_cq(Completion {
            wr_id,
            opcode: Opcode::Send,
            status: Ok(()),
            byte_len: len as u32,
            buf_index: slot,
        });
        Ok(())
    }

    /// Makes the peer's app end writable again if it asked for it: it filled its app end's
    /// send direction (into the bell end we hold) while it had no credits, and we just gave
    /// some. Called after the SeqCst fence that follows our publishing store.
    fn drain_peer(&mut self) {
        let flag = self.map.u32_at(Layout::want_drain(self.peer()));
        if flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::AcqRel) != 0 {
            // The bytes are our peer's stuffing, never data: discard them.
            let _ = sys::drain(self.peer_bell.raw());
        }
    }

    /// Claims this side of the connection for the calling process before it touches the rings.
    ///
    /// After a fork two processes hold the same side with private copies of its state (ring
    /// positions, and above us the SDP engine). Only one of them may go on: each use bumps a
    /// shared generation, and a process whose last-seen generation is not the current one has
    /// stale state and gets `Err` instead of corrupting the stream.
    ///
    /// A side its owner left ([`vacate`](Self::vacate)) at the generation of our copy is ours
    /// to claim as well.
    pub fn claim(&mut self) -> Result<(), ConnError> {
        let g = self.map.u64_at(Layout::owner_gen(self.side));
        let claimed = g
            .compare_exchange(
                self.gen_seen,
                self.gen_seen + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .or_else(|_| {
                g.compare_exchange(
                    self.gen_seen | VACANT,
                    self.gen_seen + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
            });
        match claimed {
            Ok(_) => {
                self.gen_seen += 1;
                self.claimed_pid = sys::getpid();
                self.forks_seen = super::reuse::forks();
                Ok(())
            }
            Err(_) => Err(ConnError::Protocol(Violation::Stolen)),
        }
    }

    /// The process serving this side lets go of it for good (its last copy closed) while
    /// another process forked from it may still hold the connection: marks the side vacant at
    /// the current generation, so that a holder whose copy is that generation (nobody used
    /// the connection since the fork) may claim it without a use of its own first (a fork
    /// child that only wrote through stdio, and exits: [`vacant_for_me`](Self::vacant_for_me)).
    pub fn vacate(&mut self) {
        if self.claimed_by_me() {
            let _ = self
                .map
                .u64_at(Layout::owner_gen(self.side))
                .compare_exchange(
                    self.gen_seen,
                    self.gen_seen | VACANT,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
        }
    }

    /// Whether the process that served this side left it ([`vacate`](Self::vacate)) at the
    /// generation of our copy: a [`claim`](Self::claim) would succeed, as it would have before
    /// the owner left.
    pub fn vacated_at_my_generation(&self) -> bool {
        self.map
            .u64_at(Layout::owner_gen(self.side))
            .load(Ordering::Acquire)
            == self.gen_seen | VACANT
    }

    /// [`vacated_at_my_generation`](Self::vacated_at_my_generation), and with the positions
    /// our copy holds: this process may take the side over without a call of its
    /// application's (a fork child's stdio bytes at its exit).
    pub fn vacant_for_me(&self) -> bool {
        self.vacated_at_my_generation() && self.positions_match()
    }

    /// Whether the side's published positions are still those of our copy: the generation
    /// moves only with a claim, and the process that served the side may have sent or posted
    /// since a fork without one (its progress in the background, a close's linger), which
    /// leaves a copy of the same generation stale.
    fn positions_match(&self) -> bool {
        let m = &self.map;
        m.u64_at(Layout::tx_produced(self.side))
            .load(Ordering::Acquire)
            == self.tx_produced
            && m.u64_at(Layout::rx_posted(self.side))
                .load(Ordering::Acquire)
                == self.rx_posted
    }

    /// [`claim`](Self::claim) before a change of the side's state (a post, a consumed
    /// message); a stale process's connection dies here with `Stolen`.
    fn claim_for_mutation(&mut self) -> Result<(), ConnError> {
        if self.claimed_pid == sys::getpid() && self.is_current() {
            // Our own previous claim still stands: one atomic load on the hot path.
            return Ok(());
        }
        self.claim().map_err(|e| self.kill(e))
    }

    /// A number that moves whenever the process serving this side changes its published
    /// state: a new owner, a posted buffer (it consumed a message), a sent message.
    pub fn owner_generation(&self) -> u64 {
        let m = &self.map;
        m.u64_at(Layout::owner_gen(self.side))
            .load(Ordering::Acquire)
            .wrapping_add(
                m.u64_at(Layout::rx_posted(self.side))
                    .load(Ordering::Acquire),
            )
            .wrapping_add(
                m.u64_at(Layout::tx_produced(self.side))
                    .load(Ordering::Acquire),
            )
    }

    /// [`claimed_by_me`](Self::claimed_by_me), and the claim was made since this process's
    /// last fork. The application's own use of the connection after a fork claims again
    /// (`ops` asks before each send and receive): the child holds a copy of the same state,
    /// and must find it stale (and fail with `Stolen`) instead of using the positions this
    /// process moves on. Without it a child that used the connection after its parent did
    /// claimed it successfully, and its sends went into slots the peer had read already
    /// (lost). The progress a process makes in the background does not claim again: a shell
    /// waiting for the program it started on the connection must leave it to that program.
    pub fn claimed_since_fork(&self) -> bool {
        self.forks_seen == super::reuse::forks() && self.claimed_by_me()
    }

    /// Whether the calling process made the last claim and nobody claimed since: it serves
    /// the connection now.
    pub fn claimed_by_me(&self) -> bool {
        self.claimed_pid == sys::getpid() && self.is_current()
    }

    /// Whether this process's copy of the side is the current one (no other process used the
    /// connection since we last did).
    pub fn is_current(&self) -> bool {
        self.map
            .u64_at(Layout::owner_gen(self.side))
            .load(Ordering::Acquire)
            == self.gen_seen
    }

    /// Asks the peer to ring our bell on every message (an application waiting
    /// edge-triggered must see each arrival as an edge).
    pub fn set_ring_always(&mut self, on: bool) {
        self.map
            .u32_at(Layout::ring_always(self.side))
            .store(on as u32, Ordering::Release);
    }

    /// Whether the peer rang our bell since our last `arm` (it clears the flag when it
    /// rings), i.e. whether bell bytes may be waiting on our app end.
    pub fn rang_since_arm(&self) -> bool {
        self.map
            .u32_at(Layout::want_bell(self.side))
            .load(Ordering::Acquire)
            == 0
    }

    /// Withdraws the request of the last `arm`. Returns `true` when the peer took it first:
    /// its bell byte is on our app end, or on its way (it sends right after taking it).
    pub fn disarm(&mut self) -> bool {
        let target = std::mem::take(&mut self.armed_target);
        if target == 0 {
            return false;
        }
        self.map
            .u32_at(Layout::want_bell(self.side))
            .compare_exchange(target, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    }

    /// Ends the stream of bell bytes to the peer: its app end reads end of stream (and polls
    /// POLLRDHUP) once it consumed the bell bytes already sent. For a host that half-closes
    /// (SDP DisConn): the peer's application sees the half-close without running any code.
    pub fn shutdown_peer_bell(&mut self) {
        if !self.peer_bell_shut {
            self.peer_bell_shut = true;
            let _ = sys::shutdown_write(self.peer_bell.raw());
        }
    }

    /// Asks the peer to drain our bell end (making our app end writable) when it next posts
    /// a receive buffer. Returns `false` when credits are already available (do not wait).
    pub fn arm_drain(&mut self) -> Result<bool, ConnError> {
        self.check_alive()?;
        self.map
            .u32_at(Layout::want_drain(self.side))
            .store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let p = self.load_peer_posted()?;
        Ok(p == self.tx_produced)
    }

    /// How many more receive buffers may be posted before the slot of receive completion `c`
    /// is reused (its content lost): a host that reads a payload after its completion
    /// ([`Connection::recv_data`]) reads it before then. 0 once the slot was reposted.
    pub fn posts_before_reuse(&self, c: &Completion) -> u64 {
        let depth = u64::from(self.layout.rings[self.side].depth);
        let slot = u64::from(c.buf_index);
        if c.opcode != Opcode::Recv
            || slot >= depth
            || self.rx_consumed == 0
            || self.rx_held[slot as usize] != Some(c.byte_len)
        {
            return 0;
        }
        // The last message consumed into that slot.
        let last = self.rx_consumed - 1;
        let index = last - (last % depth + depth - slot) % depth;
        (index + depth).saturating_sub(self.rx_posted)
    }

    fn push_cq(&mut self, c: Completion) {
        self.cq.push_back(c);
    }

    fn new_key(&mut self, remote: bool, index: usize) -> MemKey {
        self.key_gen = (self.key_gen + 1) & 0x00ff_ffff;
        if self.key_gen == 0 {
            self.key_gen = 1;
        }
        MemKey((self.key_gen << 8) | if remote { KEY_REMOTE } else { 0 } | index as u32)
    }

    /// Test support: writes `bytes` at offset `off` of the shared mapping (clamped to it), as
    /// a hostile peer would. Memory-safe: the mapping's bounds are checked privately.
    #[doc(hidden)]
    pub fn testing_scribble(&self, off: usize, bytes: &[u8]) {
        let len = self.map.size();
        if len == 0 {
            return;
        }
        let off = off % len;
        let n = bytes.len().min(len - off);
        self.map.write(off, &bytes[..n]);
    }

    /// Test support: the size of the shared mapping.
    #[doc(hidden)]
    pub fn testing_map_len(&self) -> usize {
        self.map.size()
    }

    fn read_remote(&mut self, local: LocalSge, remote: RemoteSge) -> Result<u32, WcError> {
        let index = (remote.key.0 & 0x7f) as usize;
        if remote.key.0 & KEY_REMOTE == 0 || index >= KEYS {
            return Err(WcError::RemoteKeyInvalid);
        }
        let entry = Layout::key_entry(self.peer(), index);
        let key_word = self.map.u64_at(entry);
        if key_word.load(Ordering::Acquire) != remote.key.0 as u64 {
            return Err(WcError::RemoteKeyInvalid);
        }
        let addr = self.map.u64_at(entry + 8).load(Ordering::Relaxed);
        let len = self.map.u64_at(entry + 16).load(Ordering::Relaxed);
        let end = remote
            .addr
            .checked_add(remote.len as u64)
            .ok_or(WcError::RemoteRangeInvalid)?;
        let reg_end = addr.checked_add(len).ok_or(WcError::RemoteRangeInvalid)?;
        if remote.addr < addr || end > reg_end {
            return Err(WcError::RemoteRangeInvalid);
        }
        let mut done = 0usize;
        let want = remote.len as usize;
        while done < want {
            let dst = (local.addr as usize + done) as *mut u8;
            match sys::process_vm_readv(self.cred.pid, dst, remote.addr + done as u64, want - done)
            {
                Ok(0) | Err(_) => return Err(WcError::RemoteAccess),
                Ok(n) => done += n,
            }
        }
        fence(Ordering::SeqCst);
        if key_word.load(Ordering::Acquire) != remote.key.0 as u64 {
            return Err(WcError::RemoteKeyInvalid);
        }
        if let Some(pidfd) = &self.pidfd
            && !sys::pidfd_alive(pidfd)
        {
            return Err(WcError::RemoteAccess);
        }
        Ok(remote.len)
    }
}

impl Connection for ShmConn {
    fn attrs(&self) -> ConnAttrs {
        ConnAttrs {
            recv_buf_size: self.layout.rings[self.side].buf_size,
            recv_depth: self.layout.rings[self.side].depth,
            send_buf_size: self.layout.rings[self.peer()].buf_size,
            peer_recv_depth: self.layout.rings[self.peer()].depth,
            send_depth: self.send_depth,
            can_read_peer: self.can_read_peer,
            peer_can_read: self.peer_can_read,
            peer_pid: Some(self.cred.pid),
            peer_uid: Some(self.cred.uid),
        }
    }

    fn post_recv(&mut self, wr_id: WrId) -> Result<(), PostError> {
        self.check_alive()?;
        self.claim_for_mutation()?;
        let depth = self.layout.rings[self.side].depth as u64;
        if self.rx_posted >= self.rx_consumed + depth {
            return Err(PostError::QueueFull);
        }
        let slot = (self.rx_posted % depth) as usize;
        self.rx_wr[slot] = wr_id;
        self.rx_held[slot] = None;
        self.rx_posted += 1;
        // The Release orders our reads of the slot's old content before the sender can
        // see it free.
        self.map
            .u64_at(Layout::rx_posted(self.side))
            .store(self.rx_posted, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.ring_on_post_recv {
            self.ring_peer(false);
        }
        self.drain_peer();
        Ok(())
    }

    fn post_send(&mut self, wr_id: WrId, gather: &[&[u8]]) -> Result<(), PostError> {
        self.post_send_inner(wr_id, gather, true)
    }

    fn recv_data(&self, c: &Completion, offset: usize, out: &mut [u8]) -> Result<usize, PostError> {
        let depth = self.layout.rings[self.side].depth;
        if c.opcode != Opcode::Recv || c.status.is_err() || c.buf_index >= depth {
            return Err(PostError::NotARecv);
        }
        let Some(len) = self.rx_held[c.buf_index as usize] else {
            return Err(PostError::NotARecv);
        };
        if len != c.byte_len {
            return Err(PostError::NotARecv);
        }
        let n = (len as usize).saturating_sub(offset).min(out.len());
        let base =
            self.layout.slot(self.side, c.buf_index) + SLOT_HEADER + offset.min(len as usize);
        self.map.read(base, &mut out[..n]);
        Ok(n)
    }

    unsafe fn register(
        &mut self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemKey, RegError> {
        let a = addr as usize as u64;
        if len == 0 || len > u32::MAX as usize || a.checked_add(len as u64).is_none() {
            return Err(RegError::BadRange);
        }
        match access {
            Access::LocalWrite => {
                let i = self
                    .local_regs
                    .iter()
                    .position(Option::is_none)
                    .ok_or(RegError::TooMany)?;
                let key = self.new_key(false, i);
                self.local_regs[i] = Some(Reg {
                    key,
                    addr: a,
                    len: len as u64,
                });
                Ok(key)
            }
            Access::RemoteRead => {
                let i = self
                    .remote_regs
                    .iter()
                    .position(Option::is_none)
                    .ok_or(RegError::TooMany)?;
                let key = self.new_key(true, i);
                self.remote_regs[i] = Some(Reg {
                    key,
                    addr: a,
                    len: len as u64,
                });
                let e = Layout::key_entry(self.side, i);
                self.map.u64_at(e + 8).store(a, Ordering::Relaxed);
                self.map.u64_at(e + 16).store(len as u64, Ordering::Relaxed);
                // Release: a reader that sees the key sees its range.
                self.map.u64_at(e).store(key.0 as u64, Ordering::Release);
                Ok(key)
            }
        }
    }

    fn deregister(&mut self, key: MemKey) -> Result<(), RegError> {
        let i = (key.0 & 0x7f) as usize;
        if key.0 & KEY_REMOTE != 0 {
            match self.remote_regs.get(i) {
                Some(Some(r)) if r.key == key => {}
                _ => return Err(RegError::UnknownKey),
            }
            self.remote_regs[i] = None;
            self.map
                .u64_at(Layout::key_entry(self.side, i))
                .store(0, Ordering::Release);
            // The fence pairs with the reader's fence before its re-check: after deregister
            // returns, a read that copied our later writes sees the key gone.
            fence(Ordering::SeqCst);
        } else {
            match self.local_regs.get(i) {
                Some(Some(r)) if r.key == key => {}
                _ => return Err(RegError::UnknownKey),
            }
            self.local_regs[i] = None;
        }
        Ok(())
    }

    fn post_read(
        &mut self,
        wr_id: WrId,
        local: LocalSge,
        remote: RemoteSge,
    ) -> Result<(), PostError> {
        self.check_alive()?;
        if !self.can_read_peer {
            return Err(PostError::ZcopyUnavailable);
        }
        if self.cq.len() >= self.send_depth as usize {
            return Err(PostError::QueueFull);
        }
        let i = (local.key.0 & 0x7f) as usize;
        let ok_local = local.key.0 & KEY_REMOTE == 0
            && matches!(self.local_regs.get(i), Some(Some(r)) if r.key == local.key
                && local.addr >= r.addr
                && local.addr.checked_add(local.len as u64).is_some_and(|e| e <= r.addr + r.len))
            && remote.len <= local.len;
        if !ok_local {
            return Err(PostError::BadLocalKey);
        }
        let status = self.read_remote(local, remote);
        let c = Completion {
            wr_id,
            opcode: Opcode::Read,
            status: status.map(|_| ()),
            byte_len: status.unwrap_or(0),
            buf_index: 0,
        };
        self.push_cq(c);
        if let Err(e) = status {
            // An RC queue pair goes to the error state on a remote access error; so do we.
            self.kill(ConnError::ReadFailed(e));
        }
        Ok(())
    }

    fn poll_cq(&mut self, out: &mut [Completion]) -> Result<usize, ConnError> {
        let mut n = 0;
        while n < out.len() {
            match self.cq.pop_front() {
                Some(c) => {
                    out[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        if let Some(e) = self.dead {
            return if n > 0 { Ok(n) } else { Err(e) };
        }
        if n < out.len() {
            let produced = self.load_peer_produced()?;
            if self.rx_consumed < produced {
                self.claim_for_mutation()?;
            }
            let ring = self.layout.rings[self.side];
            while n < out.len() && self.rx_consumed < produced {
                let slot = (self.rx_consumed % ring.depth as u64) as u32;
                let mut hdr = [0u8; SLOT_HEADER];
                self.map.read(self.layout.slot(self.side, slot), &mut hdr);
                let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
                if len > ring.buf_size {
                    return Err(self.kill(ConnError::Protocol(Violation::MessageLength {
                        len,
                        max: ring.buf_size,
                    })));
                }
                self.rx_held[slot as usize] = Some(len);
                self.rx_consumed += 1;
                out[n] = Completion {
                    wr_id: self.rx_wr[slot as usize],
                    opcode: Opcode::Recv,
                    status: Ok(()),
                    byte_len: len,
                    buf_index: slot,
                };
                n += 1;
            }
        }
        if n == 0 && self.peer_aborted() {
            return Err(self.kill(ConnError::PeerAborted));
        }
        if n == 0 && self.peer_gone {
            return Err(self.kill(ConnError::PeerClosed));
        }
        Ok(n)
    }

    fn has_work(&mut self) -> bool {
        if !self.cq.is_empty() || self.dead.is_some() || self.peer_gone || self.peer_aborted() {
            return true;
        }
        let produced = self
            .map
            .u64_at(Layout::tx_produced(self.peer()))
            .load(Ordering::Acquire);
        if produced != self.rx_consumed {
            return true;
        }
        // A change of the peer's posted count is one event (credits came back), reported once.
        let posted = self
            .map
            .u64_at(Layout::rx_posted(self.peer()))
            .load(Ordering::Acquire);
        if posted != self.peer_posted_reported {
            self.peer_posted_reported = posted;
            return true;
        }
        false
    }

    fn notify_fd(&self) -> RawFd {
        self.app_end.raw()
    }

    fn arm(&mut self) -> Result<bool, ConnError> {
        if self.dead.is_some() || self.peer_gone {
            return Ok(false);
        }
        // Ring for the next message we have not consumed (never 0, which means "not armed";
        // at the wrap, one number early: at worst one bell byte too many).
        let target = match (self.rx_consumed as u32).wrapping_add(1) {
            0 => u32::MAX,
            t => t,
        };
        self.armed_target = target;
        self.map
            .u32_at(Layout::want_bell(self.side))
            .store(target, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Ok(!self.has_work())
    }

    fn ack_notify(&mut self) -> Result<(), ConnError> {
        match sys::drain(self.app_end.raw()) {
            Ok(true) if self.app_eof_is_peer_end => self.peer_gone = true,
            Ok(true) => {}
            Ok(false) => {}
            Err(e) => return Err(self.kill(ConnError::Sys(e))),
        }
        Ok(())
    }
}

impl Drop for ShmConn {
    fn drop(&mut self) {
        // Revoke every published key before the mapping and the fds go.
        for i in 0..KEYS {
            self.map
                .u64_at(Layout::key_entry(self.side, i))
                .store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        // SAFETY: `map` is taken once, here, and never used again.
        let map = unsafe { std::mem::ManuallyDrop::take(&mut self.map) };
        // A peer that broke the ring's rules, or a failed call, leaves it to nobody.
        let keep = self.token.is_some()
            && matches!(
                self.dead,
                None | Some(ConnError::PeerClosed | ConnError::PeerAborted)
            )
            && !self.handed_out.load(Ordering::Relaxed)
            && super::reuse::may_keep(self.keep_from, self.claimed_pid);
        if keep {
            super::reuse::keep(super::reuse::Entry {
                map,
                layout: self.layout,
                side: self.side,
                // The server sends it again; a client's key is the inode.
                memfd: if self.side == 1 {
                    self.memfd.take()
                } else {
                    None
                },
                ino: self.ino,
                token: self.token.unwrap_or_default(),
                scope: self.scope,
                peer_pid: self.cred.pid,
                peer_uid: self.cred.uid,
                keep_from: self.keep_from,
                pidfd: self.pidfd.take(),
                since: std::time::Instant::now(),
            });
        }
    }
}
