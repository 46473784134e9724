//! Connection bootstrap over a connected AF_UNIX stream: the `shm` analogue of rdma_cm's
//! REQ / REP / RTU, carrying the SDP Hello and HelloAck as opaque private data.
//!
//! ```text
//! active (SDP client role)                         passive (SDP server role)
//!   Active::new: app socketpair (app0, bell0)
//!   post_recv x n  (initial credits of the peer)
//!   send_offer ── Offer{ring shape, n, probe, Hello} + SCM_RIGHTS[bell0] ──▶ Passive::recv_offer
//!                                                   checks shape, probes our memory
//!                                                   offer.accept: sealed memfd, socketpair
//!                                                   (app1, bell1), maps, post_recv x m
//!   finish ◀── Answer{ring shape, m, size, probe, can_read_you, HelloAck}  ── send_answer
//!              + SCM_RIGHTS[memfd, bell1]                                     (or Reject)
//!   checks seals/size, maps, probes peer
//!   ── Ready{can_read_you} ──────────────────────────────────────────────────▶ finish
//! ```
//!
//! The early variant (what libsdp's connections use): the client sends the Offer's body with
//! its intent, through the beacon ([`Active::early_offer`], [`Passive::offer_from_body`]);
//! the server answers as soon as it has connected to the client's endpoint and presented the
//! nonce, and the client's bell end travels with the Ready. One round trip fewer.
//!
//! Each side sends its *own* bell end and closes its copy, so the peer is the only holder:
//! the kernel's reference count then reports the peer's last close or death on our app end.
//! Frames: `b"SDPs"`, kind u8, version u8, reserved u16, body length u32 (little-endian: the
//! two processes share one host), then the body. Every field read is validated; a received
//! descriptor of the wrong type or count refuses the connection.

use std::time::{Duration, Instant};

use super::conn::{Parts, ShmConn};
use super::layout::{Layout, MAGIC, RingShape};
use super::mem::{Mapping, Probe};
use crate::sys::{self, Fd, MemfdProblem, PeerCred, SysError};
use crate::transport::{PostError, WrId};

/// Largest private data (Hello is 92 bytes, HelloAck 196).
pub const MAX_PRIVATE: usize = 256;
const FRAME_MAGIC: &[u8; 4] = b"SDPs";
const VERSION: u8 = 1;
const HDR: usize = 12;
const MAX_BODY: usize = 1024;

/// The early Offer's body (five fixed fields, the private data's length and the private
/// data) fits what a beacon takes after an intent.
const _: () = assert!(
    4 + 4 + 4 + 8 + 8 + 2 + MAX_PRIVATE + 1 + 8 * super::reuse::OFFER_TOKENS
        <= super::beacon::MAX_EXTRA
);

const KIND_OFFER: u8 = 1;
const KIND_ANSWER: u8 = 2;
const KIND_READY: u8 = 3;
const KIND_REJECT: u8 = 4;

/// A bootstrap that did not produce a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum BootError {
    Sys(SysError),
    /// The other side closed the stream.
    Closed,
    /// No answer in time.
    Timeout,
    /// A frame that is not what the protocol allows here.
    Malformed(&'static str),
    /// The peer's ring parameters are out of range.
    BadParams(&'static str),
    /// The peer's memfd cannot be mapped safely.
    BadMemfd(MemfdProblem),
    /// The passive side refused, with its private data (an SDP reject reason).
    Rejected(Vec<u8>),
    /// Private data longer than [`MAX_PRIVATE`].
    PrivateTooLong,
    /// Posting an initial receive failed (more than the receive depth).
    Post(PostError),
}

impl From<SysError> for BootError {
    fn from(e: SysError) -> Self {
        BootError::Sys(e)
    }
}

impl std::fmt::Display for BootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shm bootstrap failed: {self:?}")
    }
}

impl std::error::Error for BootError {}

/// Local choices for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmOptions {
    /// Buffers in our receive ring (the most credits we can give).
    pub recv_depth: u32,
    /// Payload bytes of each receive buffer (SDP LocalRcvSz, BSDH included).
    pub recv_buf_size: u32,
    /// Uncompleted sends and reads at most.
    pub send_depth: u32,
    /// Deadline of each wait for the peer during the bootstrap.
    pub timeout: Duration,
}

impl Default for ShmOptions {
    fn default() -> Self {
        ShmOptions {
            recv_depth: 64,
            recv_buf_size: 32 * 1024 + 16,
            send_depth: 128,
            timeout: Duration::from_secs(5),
        }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: u8) -> Writer {
        let mut v = Vec::with_capacity(HDR + 64);
        v.extend_from_slice(FRAME_MAGIC);
        v.extend_from_slice(&[kind, VERSION, 0, 0, 0, 0, 0, 0]);
        Writer(v)
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
    fn finish(&mut self) -> &[u8] {
        let body = (self.0.len() - HDR) as u32;
        self.0[8..12].copy_from_slice(&body.to_le_bytes());
        &self.0
    }
}

/// A cursor over a received body; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BootError> {
        if self.0.len() < n {
            return Err(BootError::Malformed("body too short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, BootError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, BootError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, BootError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], BootError> {
        let b = self.take(2)?;
        let n = u16::from_le_bytes([b[0], b[1]]) as usize;
        if n > MAX_PRIVATE {
            return Err(BootError::Malformed("private data too long"));
        }
        self.take(n)
    }
    fn end(&self) -> Result<(), BootError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(BootError::Malformed("trailing bytes"))
        }
    }
}

/// Parses a frame header: kind and body length.
fn parse_header(h: &[u8; HDR]) -> Result<(u8, usize), BootError> {
    if &h[..4] != FRAME_MAGIC {
        return Err(BootError::Malformed("bad magic"));
    }
    if h[5] != VERSION {
        return Err(BootError::Malformed("unknown version"));
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if len > MAX_BODY {
        return Err(BootError::Malformed("body too long"));
    }
    Ok((h[4], len))
}

fn recv_exact(
    stream: &Fd,
    buf: &mut [u8],
    fds: &mut Vec<Fd>,
    deadline: Instant,
) -> Result<(), BootError> {
    let mut got = 0;
    while got < buf.len() {
        match sys::recv_with_fds(stream, &mut buf[got..], fds) {
            Ok(0) => return Err(BootError::Closed),
            Ok(n) => got += n,
            Err(e) if e.errno == libc::EAGAIN => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(BootError::Timeout);
                }
                match sys::poll_one(
                    stream,
                    libc::POLLIN,
                    left.as_millis().clamp(1, i32::MAX as u128) as i32,
                ) {
                    Ok(_) => {}
                    Err(e) if e.errno == libc::EINTR => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives one frame: its kind, body and exactly the descriptors it carried.
fn recv_frame(stream: &Fd, timeout: Duration) -> Result<(u8, Vec<u8>, Vec<Fd>), BootError> {
    let deadline = Instant::now() + timeout;
    let mut fds = Vec::new();
    let mut h = [0u8; HDR];
    recv_exact(stream, &mut h, &mut fds, deadline)?;
    let (kind, len) = parse_header(&h)?;
    let mut body = vec![0u8; len];
    recv_exact(stream, &mut body, &mut fds, deadline)?;
    Ok((kind, body, fds))
}

fn send_frame(stream: &Fd, frame: &[u8], fds: &[i32]) -> Result<(), BootError> {
    let n = sys::send_with_fds(stream, frame, fds)?;
    if n < frame.len() {
        // A short write of a frame smaller than any socket buffer: the peer is not reading.
        let rest = &frame[n..];
        let m = sys::send_with_fds(stream, rest, &[])?;
        if m < rest.len() {
            return Err(BootError::Malformed("short write"));
        }
    }
    Ok(())
}

fn check_private(p: &[u8]) -> Result<(), BootError> {
    if p.len() > MAX_PRIVATE {
        Err(BootError::PrivateTooLong)
    } else {
        Ok(())
    }
}

fn check_bell(fd: &Fd) -> Result<(), BootError> {
    if sys::is_socket(fd) {
        Ok(())
    } else {
        Err(BootError::Malformed("bell is not a socket"))
    }
}

/// The active side (SDP client role): creates its app socketpair and offers.
#[derive(Debug)]
pub struct Active {
    opts: ShmOptions,
    /// None until [`Active::attach_pair`] (an [`Active::unpaired`] side).
    app_end: Option<Fd>,
    bell_end: Option<Fd>,
    posts: Vec<WrId>,
    probe: Probe,
    cookie: u64,
    /// The Offer was made (sent, or handed out by [`Active::early_offer`]).
    offered: bool,
    /// The Offer went out through the beacon ([`Active::early_offer`]): the bell end goes
    /// with the Ready.
    early: bool,
    /// Which kept rings the Offer names (`reuse::client_tokens`).
    scope: u64,
}

impl Active {
    pub fn new(opts: ShmOptions) -> Result<Active, BootError> {
        let (app_end, bell_end) = sys::socketpair_stream()?;
        Active::with_pair(opts, app_end, bell_end)
    }

    /// Like [`Active::new`] with the caller's app socketpair: `app_end` becomes the
    /// notification fd, `bell_end` is sent to the peer (the caller may keep a duplicate of
    /// it, e.g. to make its app end readable itself).
    pub fn with_pair(opts: ShmOptions, app_end: Fd, bell_end: Fd) -> Result<Active, BootError> {
        let mut a = Active::unpaired(opts)?;
        a.attach_pair(app_end, bell_end)?;
        Ok(a)
    }

    /// An active side without its app socketpair yet: enough to make the early Offer
    /// ([`Active::early_offer`]) before any descriptor is spent on the connection;
    /// [`Active::attach_pair`] before [`Active::finish`].
    pub fn unpaired(opts: ShmOptions) -> Result<Active, BootError> {
        RingShape {
            depth: opts.recv_depth,
            buf_size: opts.recv_buf_size,
        }
        .validate()
        .map_err(BootError::BadParams)?;
        let cookie = sys::random_u64()?;
        Ok(Active {
            opts,
            app_end: None,
            bell_end: None,
            posts: Vec::new(),
            probe: Probe::new(cookie),
            cookie,
            offered: false,
            early: false,
            scope: 0,
        })
    }

    /// Groups the ring of this connection, once kept, with those of other connections in
    /// `scope` (libsdp: the server's address): the Offer names the kept rings of its scope
    /// only, so that no other server learns their tokens. Before the Offer is made.
    pub fn set_reuse_scope(&mut self, scope: u64) {
        self.scope = scope;
    }

    /// Gives an [`Active::unpaired`] side its app socketpair (see [`Active::with_pair`]).
    pub fn attach_pair(&mut self, app_end: Fd, bell_end: Fd) -> Result<(), BootError> {
        if self.app_end.is_some() || (self.offered && !self.early) {
            return Err(BootError::Malformed("app socketpair already given"));
        }
        self.app_end = Some(app_end);
        self.bell_end = Some(bell_end);
        Ok(())
    }

    /// Posts an initial receive buffer (counted in the Offer as the peer's initial credits).
    pub fn post_recv(&mut self, wr_id: WrId) -> Result<(), BootError> {
        if self.posts.len() >= self.opts.recv_depth as usize {
            return Err(BootError::Post(PostError::QueueFull));
        }
        self.posts.push(wr_id);
        Ok(())
    }

    fn offer_frame(&self, private: &[u8]) -> Result<Writer, BootError> {
        check_private(private)?;
        let mut w = Writer::new(KIND_OFFER);
        w.u32(self.opts.recv_depth)
            .u32(self.opts.recv_buf_size)
            .u32(self.posts.len() as u32)
            .u64(self.probe.addr())
            .u64(self.cookie)
            .bytes(private);
        // The rings this process kept (`reuse`): the server may give one of them back. None:
        // nothing after the private data, as from an earlier build (which refuses trailing
        // bytes; a ring of such a server is never kept, so no token ever goes to one).
        let tokens = super::reuse::client_tokens(self.scope);
        if !tokens.is_empty() {
            w.u8(tokens.len() as u8);
            for t in tokens {
                w.u64(t);
            }
        }
        Ok(w)
    }

    /// Sends the Offer with `private` (the SDP Hello) and our bell end, then closes our copy
    /// of the bell end.
    pub fn send_offer(&mut self, stream: &Fd, private: &[u8]) -> Result<(), BootError> {
        if self.offered {
            return Err(BootError::Malformed("offer already sent"));
        }
        if self.bell_end.is_none() {
            return Err(BootError::Malformed("no app socketpair"));
        }
        let mut w = self.offer_frame(private)?;
        self.offered = true;
        let bell = self.bell_end.take().expect("checked above");
        send_frame(stream, w.finish(), &[bell.raw()])
        // `bell` drops here: the peer now holds the only copy.
    }

    /// The Offer's body with `private` (the SDP Hello), for the client to send with its
    /// intent through the beacon (no descriptor: our bell end goes with the Ready, once the
    /// server proved the nonce). Call after the initial posts; then [`Active::finish`].
    pub fn early_offer(&mut self, private: &[u8]) -> Result<Vec<u8>, BootError> {
        if self.offered {
            return Err(BootError::Malformed("offer already sent"));
        }
        let mut w = self.offer_frame(private)?;
        self.offered = true;
        self.early = true;
        Ok(w.finish()[HDR..].to_vec())
    }

    /// Waits for the Answer, maps the memfd, probes, sends Ready. Returns the connection and
    /// the peer's private data (the SDP HelloAck).
    pub fn finish(mut self, stream: &Fd) -> Result<(ShmConn, Vec<u8>), BootError> {
        if !self.offered {
            return Err(BootError::Malformed("offer not sent"));
        }
        if self.app_end.is_none() || self.bell_end.is_some() != self.early {
            return Err(BootError::Malformed("no app socketpair"));
        }
        // Before the ring is mapped: a fork from here on keeps it from being kept.
        let keep_from = super::reuse::start();
        let (kind, body, mut fds) = recv_frame(stream, self.opts.timeout)?;
        let mut r = Reader(&body);
        if kind == KIND_REJECT {
            let p = r.bytes()?.to_vec();
            return Err(BootError::Rejected(p));
        }
        if kind != KIND_ANSWER {
            return Err(BootError::Malformed("expected Answer"));
        }
        let peer_shape = RingShape {
            depth: r.u32()?,
            buf_size: r.u32()?,
        };
        let peer_posted = r.u32()?;
        let total = r.u64()?;
        let probe_addr = r.u64()?;
        let probe_cookie = r.u64()?;
        let peer_can_read = r.u8()? == 1;
        let private = r.bytes()?.to_vec();
        // The ring's reuse token, when our Offer named kept rings (so that it names the ring
        // a kept mapping must hold); otherwise it is read from the ring's header below.
        let answered_token = if r.0.is_empty() { None } else { Some(r.u64()?) };
        r.end()?;
        if peer_posted > peer_shape.depth {
            return Err(BootError::BadParams("initial posts exceed depth"));
        }
        let own = RingShape {
            depth: self.opts.recv_depth,
            buf_size: self.opts.recv_buf_size,
        };
        let layout = Layout::new(own, peer_shape).map_err(BootError::BadParams)?;
        if total != layout.total as u64 {
            return Err(BootError::BadParams(
                "mapping size disagrees with the layout",
            ));
        }
        if fds.len() != 2 {
            return Err(BootError::Malformed("Answer must carry memfd and bell"));
        }
        let peer_bell = fds.pop().expect("two fds");
        let memfd = fds.pop().expect("two fds");
        check_bell(&peer_bell)?;
        let ino = sys::memfd_check(&memfd, layout.total).map_err(BootError::BadMemfd)?;
        // The ring of a connection with this server process that ended: still mapped here. Its
        // header must carry the token the Answer names (a kept mapping of another file that
        // had the same inode number, on kernels that recycle 32-bit ones, does not).
        let kept = answered_token
            .and_then(|t| super::reuse::take_client(ino, &layout).map(|m| (m, t)))
            .filter(|(m, t)| {
                m.u64_at(Layout::reuse_token())
                    .load(std::sync::atomic::Ordering::Acquire)
                    == *t
            })
            .map(|(m, _)| m);
        let reused = kept.is_some();
        let map = match kept {
            Some(m) => m,
            None => Mapping::map(&memfd, layout.total)?,
        };
        // 0 in the header: a server of an earlier build, which reuses nothing (nothing kept).
        let token = answered_token.or_else(|| {
            Some(
                map.u64_at(Layout::reuse_token())
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .filter(|&t| t != 0)
        });
        let cred = sys::peer_cred(stream)?;
        let pidfd = sys::peer_pidfd(stream, cred.pid).ok();
        let can_read_peer = Probe::peer_readable(cred.pid, probe_addr, probe_cookie);
        let mut w = Writer::new(KIND_READY);
        w.u8(can_read_peer as u8);
        // Early: our bell end goes now (and our copy is closed: the peer holds the only one).
        let bell = self.bell_end.take();
        let fds: Vec<i32> = bell.iter().map(Fd::raw).collect();
        send_frame(stream, w.finish(), &fds)?;
        drop(bell);
        let conn = ShmConn::new(Parts {
            map,
            memfd,
            side: 0,
            layout,
            app_end: self.app_end.take().expect("checked above"),
            peer_bell,
            cred,
            pidfd,
            can_read_peer,
            peer_can_read,
            send_depth: self.opts.send_depth,
            initial_posts: self.posts,
            ino,
            token,
            scope: self.scope,
            keep_from,
            reused,
        })
        .map_err(BootError::Post)?;
        Ok((conn, private))
    }
}

/// The passive side's entry point.
pub struct Passive;

impl Passive {
    /// Waits for an Offer on `stream` and checks it.
    pub fn recv_offer(stream: &Fd, timeout: Duration) -> Result<Offer, BootError> {
        let (kind, body, mut fds) = recv_frame(stream, timeout)?;
        if kind != KIND_OFFER {
            return Err(BootError::Malformed("expected Offer"));
        }
        if fds.len() != 1 {
            return Err(BootError::Malformed("Offer must carry one bell"));
        }
        let peer_bell = fds.pop().expect("one fd");
        check_bell(&peer_bell)?;
        let mut offer = Self::parse_offer(&body, Some(peer_bell))?;
        offer.identify(stream)?;
        Ok(offer)
    }

    /// The Offer of the early variant: its body came with the client's intent (see
    /// [`Active::early_offer`]). The server prepares the connection from it before it even
    /// reaches the client's endpoint, then names the peer with [`Accepting::identify`] on
    /// that stream before it answers. The client's bell end comes with its Ready.
    pub fn offer_from_body(body: &[u8]) -> Result<Offer, BootError> {
        Self::parse_offer(body, None)
    }

    fn parse_offer(body: &[u8], peer_bell: Option<Fd>) -> Result<Offer, BootError> {
        let mut r = Reader(body);
        let shape = RingShape {
            depth: r.u32()?,
            buf_size: r.u32()?,
        }
        .validate()
        .map_err(BootError::BadParams)?;
        let posted = r.u32()?;
        let probe_addr = r.u64()?;
        let probe_cookie = r.u64()?;
        let private = r.bytes()?.to_vec();
        // The tokens of the rings the client kept: none (nothing more) from a client that kept
        // none, or of an earlier build.
        let tokens = if r.0.is_empty() {
            None
        } else {
            let n = r.u8()? as usize;
            if n > super::reuse::OFFER_TOKENS {
                return Err(BootError::Malformed("too many ring tokens"));
            }
            Some((0..n).map(|_| r.u64()).collect::<Result<Vec<u64>, _>>()?)
        };
        r.end()?;
        if posted > shape.depth {
            return Err(BootError::BadParams("initial posts exceed depth"));
        }
        Ok(Offer {
            shape,
            posted,
            private,
            peer_bell,
            cred: None,
            pidfd: None,
            can_read_peer: false,
            probe_addr,
            probe_cookie,
            tokens,
        })
    }
}

/// A checked Offer: decide with [`Offer::accept`] or [`Offer::reject`].
#[derive(Debug)]
pub struct Offer {
    shape: RingShape,
    posted: u32,
    private: Vec<u8>,
    /// None in the early variant until the Ready brings it.
    peer_bell: Option<Fd>,
    /// The peer behind the stream, once identified (see [`Accepting::identify`]).
    cred: Option<PeerCred>,
    pidfd: Option<Fd>,
    can_read_peer: bool,
    probe_addr: u64,
    probe_cookie: u64,
    /// The reuse tokens of the rings the client kept; `None`: it named none (it may be of an
    /// earlier build, which takes no token in the Answer).
    tokens: Option<Vec<u64>>,
}

impl Offer {
    /// The active side's private data (the SDP Hello).
    pub fn private_data(&self) -> &[u8] {
        &self.private
    }

    /// The active side's credentials, from the kernel (None: an early Offer whose peer is
    /// not identified yet).
    pub fn peer_cred(&self) -> Option<PeerCred> {
        self.cred
    }

    /// Names the peer behind `stream` (the connection the bootstrap runs on): its
    /// credentials, a pidfd, and whether we may read its memory.
    fn identify(&mut self, stream: &Fd) -> Result<(), BootError> {
        let cred = sys::peer_cred(stream)?;
        self.pidfd = sys::peer_pidfd(stream, cred.pid).ok();
        self.can_read_peer = Probe::peer_readable(cred.pid, self.probe_addr, self.probe_cookie);
        self.cred = Some(cred);
        Ok(())
    }

    /// The active side's receive buffer size and depth.
    pub fn peer_ring(&self) -> (u32, u32) {
        (self.shape.buf_size, self.shape.depth)
    }

    /// Refuses the connection with `private` (an SDP reject reason).
    pub fn reject(self, stream: &Fd, private: &[u8]) -> Result<(), BootError> {
        check_private(private)?;
        let mut w = Writer::new(KIND_REJECT);
        w.bytes(private);
        send_frame(stream, w.finish(), &[])
    }

    /// Creates the shared memory and our app socketpair.
    pub fn accept(self, opts: ShmOptions) -> Result<Accepting, BootError> {
        let (app_end, bell_end) = sys::socketpair_stream()?;
        self.accept_with_pair(opts, app_end, bell_end)
    }

    /// Like [`Offer::accept`] with the caller's app socketpair (see [`Active::with_pair`]).
    pub fn accept_with_pair(
        self,
        opts: ShmOptions,
        app_end: Fd,
        bell_end: Fd,
    ) -> Result<Accepting, BootError> {
        self.accept_from(opts, app_end, bell_end, None)
    }

    /// [`Offer::accept_with_pair`] for a client known to be process `peer` (the pid and uid
    /// the beacon saw): the ring of an ended connection with that process is reused if its
    /// Offer names it (see `reuse`), and [`Accepting::identify`] then requires that very
    /// process behind the endpoint.
    pub fn accept_from(
        self,
        opts: ShmOptions,
        app_end: Fd,
        bell_end: Fd,
        peer: Option<(i32, u32)>,
    ) -> Result<Accepting, BootError> {
        // Before the ring is mapped: a fork from here on keeps it from being kept.
        let keep_from = super::reuse::start();
        let own = RingShape {
            depth: opts.recv_depth,
            buf_size: opts.recv_buf_size,
        };
        let layout = Layout::new(self.shape, own).map_err(BootError::BadParams)?;
        // Never 0: a client reads 0 in the header as a server of an earlier build.
        let token = sys::random_u64()? | 1;
        let kept = match (&self.tokens, peer) {
            (Some(tokens), Some(p)) => super::reuse::take_server(p, tokens, &layout, token),
            _ => None,
        };
        let reused_for = kept.as_ref().and(peer);
        let (map, memfd) = match kept {
            Some(k) => k,
            None => {
                let memfd = sys::memfd_sealed(b"libsdp-shm", layout.total)?;
                let map = Mapping::map(&memfd, layout.total)?;
                map.u64_at(Layout::reuse_token())
                    .store(token, std::sync::atomic::Ordering::Relaxed);
                (map, memfd)
            }
        };
        map.write(0, MAGIC);
        // The active side's initial posts are its credits to us from the first moment.
        map.u64_at(Layout::rx_posted(0))
            .store(self.posted as u64, std::sync::atomic::Ordering::Release);
        let cookie = sys::random_u64()?;
        Ok(Accepting {
            offer: self,
            opts,
            layout,
            map,
            memfd,
            app_end,
            bell_end: Some(bell_end),
            posts: Vec::new(),
            probe: Probe::new(cookie),
            cookie,
            reused_for,
            token,
            keep_from,
        })
    }
}

/// The passive side between accepting an Offer and the Ready.
#[derive(Debug)]
pub struct Accepting {
    offer: Offer,
    opts: ShmOptions,
    layout: Layout,
    map: Mapping,
    memfd: Fd,
    app_end: Fd,
    bell_end: Option<Fd>,
    posts: Vec<WrId>,
    probe: Probe,
    cookie: u64,
    /// The ring is a kept one, shared before with this process (pid, uid) only.
    reused_for: Option<(i32, u32)>,
    token: u64,
    keep_from: Option<u64>,
}

impl Accepting {
    /// The early variant: names the peer behind `stream`, the connection to the client's
    /// endpoint that presented the nonce, before [`Accepting::send_answer`].
    pub fn identify(&mut self, stream: &Fd) -> Result<(), BootError> {
        self.offer.identify(stream)?;
        // A kept ring goes back only to the process that shared it.
        if let Some(peer) = self.reused_for
            && self.offer.cred.map(|c| (c.pid, c.uid)) != Some(peer)
        {
            return Err(BootError::Malformed(
                "a kept ring offered to another process",
            ));
        }
        Ok(())
    }

    /// Posts an initial receive buffer (the peer's initial credits).
    pub fn post_recv(&mut self, wr_id: WrId) -> Result<(), BootError> {
        if self.posts.len() >= self.opts.recv_depth as usize {
            return Err(BootError::Post(PostError::QueueFull));
        }
        self.posts.push(wr_id);
        // Published now so the active side sees the credits as soon as it maps.
        self.map.u64_at(Layout::rx_posted(1)).store(
            self.posts.len() as u64,
            std::sync::atomic::Ordering::Release,
        );
        Ok(())
    }

    /// Sends the Answer with `private` (the SDP HelloAck), the memfd and our bell end.
    pub fn send_answer(&mut self, stream: &Fd, private: &[u8]) -> Result<(), BootError> {
        check_private(private)?;
        if self.offer.cred.is_none() {
            return Err(BootError::Malformed("peer not identified"));
        }
        let bell = self
            .bell_end
            .take()
            .ok_or(BootError::Malformed("answer already sent"))?;
        let mut w = Writer::new(KIND_ANSWER);
        w.u32(self.opts.recv_depth)
            .u32(self.opts.recv_buf_size)
            .u32(self.posts.len() as u32)
            .u64(self.layout.total as u64)
            .u64(self.probe.addr())
            .u64(self.cookie)
            .u8(self.offer.can_read_peer as u8)
            .bytes(private);
        if self.offer.tokens.is_some() {
            w.u64(self.token);
        }
        send_frame(stream, w.finish(), &[self.memfd.raw(), bell.raw()])
    }

    /// Waits for Ready and returns the connection.
    pub fn finish(self, stream: &Fd) -> Result<ShmConn, BootError> {
        if self.bell_end.is_some() {
            return Err(BootError::Malformed("answer not sent"));
        }
        let (kind, body, mut fds) = recv_frame(stream, self.opts.timeout)?;
        // The early variant's Ready carries the client's bell end, and only that one does.
        let bells = usize::from(self.offer.peer_bell.is_none());
        if kind != KIND_READY || fds.len() != bells {
            return Err(BootError::Malformed("expected Ready"));
        }
        let mut r = Reader(&body);
        let peer_can_read = r.u8()? == 1;
        r.end()?;
        let peer_bell = match (self.offer.peer_bell, fds.pop()) {
            (Some(b), None) | (None, Some(b)) => b,
            _ => return Err(BootError::Malformed("expected Ready")),
        };
        check_bell(&peer_bell)?;
        let _ = &self.probe; // kept alive until the peer probed it
        ShmConn::new(Parts {
            map: self.map,
            memfd: self.memfd,
            side: 1,
            layout: self.layout,
            app_end: self.app_end,
            peer_bell,
            cred: self
                .offer
                .cred
                .ok_or(BootError::Malformed("peer not identified"))?,
            pidfd: self.offer.pidfd,
            can_read_peer: self.offer.can_read_peer,
            peer_can_read,
            send_depth: self.opts.send_depth,
            initial_posts: self.posts,
            // A server keeps its rings by peer process, not by inode.
            ino: (0, 0),
            // Kept even for a client that named no ring (it may name this one next time; one
            // of an earlier build never does, and the ring goes after its idle time).
            token: Some(self.token),
            scope: 0,
            keep_from: self.keep_from,
            reused: self.reused_for.is_some(),
        })
        .map_err(BootError::Post)
    }
}

/// Both ends of a connection inside one process, over a fresh socketpair: for tests and
/// for a program connecting to itself.
pub fn pair(
    active: ShmOptions,
    passive: ShmOptions,
    posts: (u32, u32),
) -> Result<(ShmConn, ShmConn), BootError> {
    let (sa, sp) = sys::socketpair_stream()?;
    let mut a = Active::new(active)?;
    for i in 0..posts.0 {
        a.post_recv(i as WrId)?;
    }
    a.send_offer(&sa, b"hello")?;
    let offer = Passive::recv_offer(&sp, passive.timeout)?;
    let mut p = offer.accept(passive)?;
    for i in 0..posts.1 {
        p.post_recv(i as WrId)?;
    }
    p.send_answer(&sp, b"hello-ack")?;
    let (ca, _) = a.finish(&sa)?;
    let cp = p.finish(&sp)?;
    Ok((ca, cp))
}

/// [`pair`] in the early variant: the Offer's body goes outside the stream (as through a
/// beacon) and the active side's bell end with the Ready.
pub fn pair_early(
    active: ShmOptions,
    passive: ShmOptions,
    posts: (u32, u32),
) -> Result<(ShmConn, ShmConn), BootError> {
    let (sa, sp) = sys::socketpair_stream()?;
    // As libsdp does: the Offer is made before the app socketpair exists.
    let mut a = Active::unpaired(active)?;
    for i in 0..posts.0 {
        a.post_recv(i as WrId)?;
    }
    let body = a.early_offer(b"hello")?;
    let (app_end, bell_end) = sys::socketpair_stream()?;
    a.attach_pair(app_end, bell_end)?;
    let offer = Passive::offer_from_body(&body)?;
    assert_eq!(offer.private_data(), b"hello");
    let mut p = offer.accept(passive)?;
    for i in 0..posts.1 {
        p.post_recv(i as WrId)?;
    }
    if p.send_answer(&sp, b"hello-ack") != Err(BootError::Malformed("peer not identified")) {
        return Err(BootError::Malformed("answered an unidentified peer"));
    }
    p.identify(&sp)?;
    p.send_answer(&sp, b"hello-ack")?;
    let (ca, ack) = a.finish(&sa)?;
    assert_eq!(ack, b"hello-ack");
    let cp = p.finish(&sp)?;
    Ok((ca, cp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_variant_connects_and_carries_bytes_both_ways() {
        use crate::transport::{Connection, Opcode};
        let o = ShmOptions::default();
        let (mut a, mut p) = pair_early(o, o, (4, 4)).unwrap();
        fn one_way(tx: &mut ShmConn, rx: &mut ShmConn) {
            tx.post_send(9, &[b"ping"]).unwrap();
            for _ in 0..1000 {
                let mut c = [crate::transport::Completion {
                    wr_id: 0,
                    opcode: Opcode::Send,
                    status: Ok(()),
                    byte_len: 0,
                    buf_index: 0,
                }; 4];
                let n = rx.poll_cq(&mut c).unwrap();
                if let Some(c) = c[..n].iter().find(|c| c.opcode == Opcode::Recv) {
                    assert_eq!(c.byte_len, 4);
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            panic!("nothing received");
        }
        one_way(&mut a, &mut p);
        one_way(&mut p, &mut a);
    }

    #[test]
    fn early_offer_then_send_offer_refused() {
        let mut a = Active::new(ShmOptions::default()).unwrap();
        a.early_offer(b"x").unwrap();
        let (s, _p) = sys::socketpair_stream().unwrap();
        assert_eq!(
            a.send_offer(&s, b"x"),
            Err(BootError::Malformed("offer already sent"))
        );
    }

    #[test]
    fn frame_header_roundtrip_and_garbage_rejected() {
        let mut w = Writer::new(KIND_READY);
        w.u8(1);
        let f = w.finish().to_vec();
        let mut h = [0u8; HDR];
        h.copy_from_slice(&f[..HDR]);
        assert_eq!(parse_header(&h), Ok((KIND_READY, 1)));
        let mut bad = h;
        bad[0] = b'X';
        assert!(parse_header(&bad).is_err());
        let mut big = h;
        big[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse_header(&big),
            Err(BootError::Malformed("body too long"))
        );
    }

    #[test]
    fn reader_truncated_or_oversized_fields_rejected() {
        assert!(Reader(&[1, 2, 3]).u32().is_err());
        let mut long = vec![0xff, 0xff];
        long.extend_from_slice(&[0; 10]);
        assert_eq!(
            Reader(&long).bytes(),
            Err(BootError::Malformed("private data too long"))
        );
        let mut r = Reader(&[2, 0, 7, 8, 9]);
        assert_eq!(r.bytes().unwrap(), &[7, 8]);
        assert!(r.end().is_err());
    }
}
