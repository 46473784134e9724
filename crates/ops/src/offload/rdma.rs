//! SDP between hosts over the `rdma` transport (`ib_verbs::rdma`): issue #7 item 3.
//!
//! Everything here is gated: it runs only when [`enabled`] (an RDMA device with an ACTIVE port
//! in this process, checked at most every 2 s) and the destination is not on this host. A host
//! without RDMA never loads libibverbs from here and behaves exactly as before.
//!
//! - `listen`: besides the shm beacon, an rdma_cm listener on the same IP and port
//!   (RDMA_PS_TCP); the progress thread takes its connection requests into a table.
//! - `connect`: rdma_cm address and route resolution (short timeout), the TCP socket bound to
//!   the source address rdma_cm chose, a REQ whose private data carries the client's TCP port
//!   and a compact SDP Hello (the full Hello does not fit the 36 bytes of a REQ); then the fd is
//!   swapped onto an app end, **pending** as for shm, and the real TCP connect is made on the
//!   shadow. The REP (the server application accepted) completes the connection on the
//!   progress thread; a REJECT (no libsdp listener there), an error or the pending timeout
//!   sends it back to TCP.
//! - `accept`: the request whose peer IP and client TCP port match the accepted TCP
//!   connection is accepted with the HelloAck in the REP, and the fd is swapped onto an app end.
//!   No request: TCP, as for a plain client.
//! - Readiness: the peer cannot ring our bell, so the progress thread watches the connection's
//!   notify fd (completion channel + rdma_cm channel) and `sync`s, which self-rings the app end.
//! - Fork: the QP belongs to the process that made it. A process forked from the owner that
//!   uses the connection gets EIO (one log line), and never destroys the owner's verbs objects.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use fallback::Reason;
use ib_verbs::rdma::cm::{Connecting, Listener, Request};
use ib_verbs::rdma::{DmaBuf, RdmaConn, RdmaOptions};
use ib_verbs::{Access, Completion, ConnError, Connection, LocalSge, MemKey, Opcode, RemoteSge};
use sdp_proto::conn::{RdmaRead, RdmaReadFailure, ZcopyId};
use sdp_proto::error::{SendError, TransportFailure, UrgentError};
use sdp_proto::wire::{HelloAckRepr, HelloRepr, IpAddrs, Version};
use sdp_proto::{Config, Event};

use super::data::CResult;
use super::handoff;
use super::sdp::{self, engine_recv, errno_of, now};
use super::setup;
use super::stream::{Counters, Errno, OffloadStream};
use super::{Conn, Inner, Phase, new_pair};
use crate::progress::{self, Task};
use crate::stats::Transport;
use crate::{log, sdp_log, sys};

/// How long address and route resolution may block `connect`.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection request no `accept` took within this is rejected.
const REQUEST_TTL: Duration = Duration::from_secs(10);
/// A send call of at least this many bytes goes by ZCopy: copied once into the connection's
/// registered staging buffer, offered by a SrcAvail, RDMA-read by the peer (LINUX
/// `sdp_zcopy_thresh`: 64 KiB). Smaller ones travel inside messages (BCopy).
pub const ZCOPY_THRESHOLD: usize = 64 * 1024;
/// The staging buffer: the most one SrcAvail offers.
const ZCOPY_STAGE: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// The gate.

/// Whether this process can use RDMA now (see [`availability`]).
pub fn enabled() -> bool {
    availability() == Availability::Yes
}

/// What [`availability`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Yes,
    /// No device (or no libibverbs, or no active port).
    No,
    /// Not with the descriptors this process has left: asking now would give a wrong "no".
    NotNow,
}

/// Descriptors the discovery must find free before it asks: libibverbs reads its provider
/// files, sysfs and the device nodes once per process (its first device list), and one read
/// refused for want of a descriptor leaves the provider unloaded, so the device missing, for
/// the rest of the process.
const DISCOVERY_FDS: usize = 16;

/// Whether this process can use RDMA now. Cheap on a host without RDMA: no
/// `/sys/class/infiniband` entry means no device, without loading libibverbs. The answer is
/// kept 2 s (devices may appear or go away); [`Availability::NotNow`] (RLIMIT_NOFILE nearly
/// reached) is not kept: the next connection asks again.
pub fn availability() -> Availability {
    static CACHE: Mutex<Option<(Instant, bool)>> = Mutex::new(None);
    let mut g = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((t, v)) = *g
        && t.elapsed() < Duration::from_secs(2)
    {
        return if v {
            Availability::Yes
        } else {
            Availability::No
        };
    }
    let any_dev = match std::fs::read_dir("/sys/class/infiniband") {
        Ok(mut d) => d.next().is_some(),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
            return Availability::NotNow;
        }
        Err(_) => false,
    };
    if any_dev && !sys::descriptors_free(DISCOVERY_FDS) {
        return Availability::NotNow;
    }
    let v = any_dev && ib_verbs::rdma::available();
    *g = Some((Instant::now(), v));
    if v {
        Availability::Yes
    } else {
        Availability::No
    }
}

/// `LIBSDP_TRANSPORT=rdma`: connections to this host's own addresses also go over rdma
/// (when this process has a device), not shm. For measuring and testing the rdma transport
/// on one host (two processes on one soft-RoCE device); both ends need it, and the address
/// must be one rdma_cm resolves to the device (not loopback). Unset or `shm`: shm.
pub fn local_wanted() -> bool {
    static WANT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANT.get_or_init(|| {
        let Some(raw) = std::env::var_os("LIBSDP_TRANSPORT") else {
            return false;
        };
        match raw.to_string_lossy().trim() {
            "rdma" => true,
            "shm" | "" => false,
            other => {
                sdp_log!(
                    log::ERROR,
                    "LIBSDP_TRANSPORT={other:?} is neither rdma nor shm; using shm on this host"
                );
                false
            }
        }
    })
}

fn options() -> RdmaOptions {
    let c = sdp::config();
    RdmaOptions {
        recv_buf_size: c.recv_buffer_size,
        recv_depth: u32::from(c.recv_buffers).max(64),
        // Sends in flight are bounded by the peer's credits (≤ its receive depth).
        send_depth: 128,
        // ZCopy: the peer RDMA-reads what our SrcAvails offer.
        allow_peer_read: true,
        shared_channel: true,
        ..RdmaOptions::default()
    }
}

/// The engine configuration over rdma: the same-host one with ZCopy on both ways (the
/// transport can read the peer's memory; a peer that cannot answers SendSM and gets BCopy).
pub fn engine_config() -> Config {
    Config {
        zcopy_recv: true,
        zcopy_send: true,
        ..sdp::config()
    }
}

// ---------------------------------------------------------------------------------------------
// The compact Hello carried in a REQ.

/// Bytes of the REQ hello: client TCP port u16 | Bufs u16 | version u8 | cap u8 |
/// max_adverts u8 | des_rem_rcv_sz u32 | local_rcv_sz u32 | SDP local port u16 (LE).
/// The addresses of the full Hello are the connection's own, known to both sides.
pub const COMPACT_LEN: usize = 17;

/// The engine's Hello in compact form, with the client's TCP port.
pub fn compact(hello: &[u8], tcp_port: u16) -> Option<[u8; COMPACT_LEN]> {
    let h = HelloRepr::parse_bytes(hello).ok()?;
    let mut o = [0u8; COMPACT_LEN];
    o[0..2].copy_from_slice(&tcp_port.to_le_bytes());
    o[2..4].copy_from_slice(&h.bufs.to_le_bytes());
    o[4] = h.version.0;
    o[5] = h.cap;
    o[6] = h.max_adverts;
    o[7..11].copy_from_slice(&h.des_rem_rcv_sz.to_le_bytes());
    o[11..15].copy_from_slice(&h.local_rcv_sz.to_le_bytes());
    o[15..17].copy_from_slice(&h.local_port.to_le_bytes());
    Some(o)
}

/// The client's TCP port and the full Hello rebuilt with the connection's addresses; `None`
/// for a malformed record (the engine validates the fields).
pub fn expand(
    c: &[u8],
    src: IpAddr,
    dst: IpAddr,
) -> Option<(u16, [u8; sdp_proto::wire::HELLO_LEN])> {
    if c.len() != COMPACT_LEN {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([c[o], c[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().expect("4 bytes"));
    let h = HelloRepr {
        bufs: u16_at(2),
        version: Version(c[4]),
        cap: c[5],
        max_adverts: c[6],
        des_rem_rcv_sz: u32_at(7),
        local_rcv_sz: u32_at(11),
        local_port: u16_at(15),
        addrs: ip_addrs(src, dst),
        ext_max_adverts: 0,
    };
    Some((u16_at(0), h.to_bytes()))
}

/// Bytes of the REP hello: Bufs u16 | version u8 | ipv_cap u8 | max_adverts u8 |
/// act_rcv_sz u32 (LE). A HelloAck is 196 bytes, the whole REP; ours carries a header too.
pub const COMPACT_ACK_LEN: usize = 9;

/// The engine's HelloAck in compact form.
pub fn compact_ack(ack: &[u8]) -> Option<[u8; COMPACT_ACK_LEN]> {
    let h = HelloAckRepr::parse_bytes(ack).ok()?;
    let mut o = [0u8; COMPACT_ACK_LEN];
    o[0..2].copy_from_slice(&h.bufs.to_le_bytes());
    o[2] = h.version.0;
    o[3] = h.ipv_cap;
    o[4] = h.max_adverts;
    o[5..9].copy_from_slice(&h.act_rcv_sz.to_le_bytes());
    Some(o)
}

/// The full HelloAck from its compact form (the engine validates the fields).
pub fn expand_ack(c: &[u8]) -> Option<[u8; sdp_proto::wire::HELLO_ACK_LEN]> {
    if c.len() != COMPACT_ACK_LEN {
        return None;
    }
    Some(
        HelloAckRepr {
            bufs: u16::from_le_bytes([c[0], c[1]]),
            version: Version(c[2]),
            ipv_cap: c[3],
            max_adverts: c[4],
            act_rcv_sz: u32::from_le_bytes(c[5..9].try_into().expect("4 bytes")),
        }
        .to_bytes(),
    )
}

fn ip_addrs(src: IpAddr, dst: IpAddr) -> IpAddrs {
    let v6 = |a: IpAddr| match a {
        IpAddr::V6(v) => v,
        IpAddr::V4(v) => v.to_ipv6_mapped(),
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => IpAddrs::V4 { src: s, dst: d },
        (s, d) => IpAddrs::V6 {
            src: v6(s),
            dst: v6(d),
        },
    }
}

fn canon(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v) => v.to_ipv4_mapped().map_or(IpAddr::V6(v), IpAddr::V4),
        v => v,
    }
}

// ---------------------------------------------------------------------------------------------
// Server side: listeners and their requests.

struct Waiting {
    /// The process whose listener took the request: only it may answer (a fork child's copy
    /// of the table is never answered nor dropped there, see [`prune`]).
    pid: i32,
    at: Instant,
    peer_ip: IpAddr,
    tcp_port: u16,
    /// The rdma_cm listener's port (the TCP listener's).
    port: u16,
    req: Request,
}

static REQUESTS: Mutex<Vec<Waiting>> = Mutex::new(Vec::new());

impl Waiting {
    fn key(&self) -> handoff::Key {
        handoff::Key {
            ip: self.peer_ip,
            client_port: self.tcp_port,
            listen_port: self.port,
        }
    }
}

/// Drops expired requests (rejecting them, and withdrawing their handoff records) and forgets,
/// without touching them, those another process took (copies inherited across fork: their
/// rdma_cm ids are the listener's process's).
fn prune(g: &mut Vec<Waiting>, also: impl Fn(&Waiting) -> bool) {
    let me = ib_verbs::sys::getpid();
    let mut i = 0;
    while i < g.len() {
        let w = &g[i];
        if w.pid != me {
            std::mem::forget(g.swap_remove(i));
        } else if w.at.elapsed() >= REQUEST_TTL || also(w) {
            let w = g.swap_remove(i);
            handoff::release(w.key());
        } else {
            i += 1;
        }
    }
}

struct ListenTask {
    /// The process that made the listener: only it takes requests (a forked acceptor sees
    /// plain TCP, and its rdma client falls back after the pending timeout).
    owner: i32,
    /// The lock also serializes drains (the progress thread and `accept` inline).
    listener: Mutex<Listener>,
    port: u16,
    /// The progress registration (a fork child drops it: see `on_event`).
    token: Mutex<Option<u64>>,
}

/// In a fork child, the progress thread watches the fds inherited from the parent, whose
/// events are the parent's to take: a task of the parent's stops being watched there.
fn leave_to_owner(owner: i32, token: &Mutex<Option<u64>>) -> bool {
    if ib_verbs::sys::getpid() == owner {
        return false;
    }
    if let Some(t) = token.lock().unwrap_or_else(|p| p.into_inner()).take() {
        progress::unregister(t);
    }
    true
}

impl ListenTask {
    fn drain(&self) {
        let listener = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let req = match listener.try_request() {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    sdp_log!(log::WARN, "rdma_cm request refused: {e}");
                    continue;
                }
            };
            let (Some(peer), Some(tcp_port)) = (
                req.peer_addr(),
                (req.hello().len() == COMPACT_LEN)
                    .then(|| u16::from_le_bytes([req.hello()[0], req.hello()[1]])),
            ) else {
                continue; // dropped: rejected
            };
            let mut g = REQUESTS.lock().unwrap_or_else(|p| p.into_inner());
            let ip = canon(peer.ip());
            // An older request for the same client socket is stale (its client gave up).
            prune(&mut g, |w| w.peer_ip == ip && w.tcp_port == tcp_port);
            let w = Waiting {
                pid: self.owner,
                at: Instant::now(),
                peer_ip: ip,
                tcp_port,
                port: self.port,
                req,
            };
            // A forked worker may be the one that accepts the TCP connection.
            handoff::hold(w.key());
            g.push(w);
        }
    }
}

impl Task for ListenTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        // The listener's requests are its process's to take.
        if !leave_to_owner(self.owner, &self.token) {
            self.drain();
        }
    }
}

/// The listener's process: a worker asked for redirects (`handoff`).
struct RedirectTask {
    owner: i32,
    token: Mutex<Option<u64>>,
}

impl Task for RedirectTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        if leave_to_owner(self.owner, &self.token) {
            return;
        }
        for (k, port) in handoff::take_redirects() {
            let w = {
                let mut g = REQUESTS.lock().unwrap_or_else(|p| p.into_inner());
                prune(&mut g, |_| false);
                g.iter()
                    .position(|w| w.key() == k)
                    .map(|i| g.swap_remove(i))
            };
            match w {
                Some(w) => {
                    sdp_log!(
                        log::DECISION,
                        "rdma_cm request from {}:{} for port {}: accepted by another process, redirected to rdma_cm port {port}",
                        k.ip,
                        k.client_port,
                        k.listen_port
                    );
                    w.req.redirect(port);
                }
                None => sdp_log!(
                    log::DECISION,
                    "redirect of {}:{} to port {port}: the request is gone (expired)",
                    k.ip,
                    k.client_port
                ),
            }
        }
    }
}

/// Makes sure this process serves redirect asks of its workers (once per process).
fn serve_redirects() {
    static SERVED_BY: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
    let me = ib_verbs::sys::getpid();
    if SERVED_BY.swap(me, Ordering::AcqRel) == me {
        return;
    }
    if let Some(efd) = handoff::init() {
        let task = Arc::new(RedirectTask {
            owner: me,
            token: Mutex::new(None),
        });
        let token = progress::register(efd, libc::EPOLLIN as u32, task.clone());
        *task.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
    }
}

/// A worker's own rdma_cm listener on `ip` (any port), made at its first redirected client:
/// the port the listener's process redirects that worker's clients to.
fn redirect_listener(ip: IpAddr) -> Option<u16> {
    type Ports = Vec<(i32, IpAddr, u16)>;
    static PORTS: Mutex<Ports> = Mutex::new(Vec::new());
    let me = ib_verbs::sys::getpid();
    let mut g = PORTS.lock().unwrap_or_else(|p| p.into_inner());
    g.retain(|(pid, _, _)| *pid == me);
    if let Some((_, _, p)) = g.iter().find(|(_, i, _)| *i == ip) {
        return Some(*p);
    }
    let listener = match Listener::bind(SocketAddr::new(ip, 0), 128) {
        Ok(l) => l,
        Err(e) => {
            sdp_log!(log::WARN, "no rdma_cm listener of this worker on {ip}: {e}");
            return None;
        }
    };
    let port = listener.port();
    let lfd = listener.fd();
    let task = Arc::new(ListenTask {
        listener: Mutex::new(listener),
        owner: me,
        port,
        token: Mutex::new(None),
    });
    let token = progress::register(lfd, libc::EPOLLIN as u32, task.clone())?;
    *task.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
    LISTENERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(-i32::from(port) - 1, (token, task));
    g.push((me, ip, port));
    sdp_log!(
        log::DECISION,
        "rdma_cm listener of this worker on {ip} port {port} (clients redirected here)"
    );
    Some(port)
}

/// Per listening fd: the progress registration and the task.
type Listeners = HashMap<i32, (u64, Arc<ListenTask>)>;

static LISTENERS: Mutex<Option<Listeners>> = Mutex::new(None);
static ANY_LISTENER: AtomicBool = AtomicBool::new(false);

/// Whether this process made an rdma_cm listener (one load: `accept` asks first).
#[inline]
pub fn listening() -> bool {
    ANY_LISTENER.load(Ordering::Acquire)
}

/// `listen` with a server decision other than `tcp` on a host with RDMA: the rdma_cm listener.
pub fn on_listen(fd: i32, addr: SocketAddr) {
    if !enabled() {
        return;
    }
    let listener = match Listener::bind(addr, 128) {
        Ok(l) => l,
        Err(e) => {
            sdp_log!(
                log::DECISION,
                "listen fd {fd} {addr}: no rdma_cm listener: {e}"
            );
            return;
        }
    };
    serve_redirects();
    let lfd = listener.fd();
    let task = Arc::new(ListenTask {
        listener: Mutex::new(listener),
        owner: ib_verbs::sys::getpid(),
        port: addr.port(),
        token: Mutex::new(None),
    });
    if let Some(token) = progress::register(lfd, libc::EPOLLIN as u32, task.clone()) {
        *task.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
        LISTENERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(fd, (token, task));
        ANY_LISTENER.store(true, Ordering::Release);
        sdp_log!(log::DECISION, "listen fd {fd} {addr}: rdma_cm listener");
    }
}

/// The listening fd is closed: its rdma_cm listener goes with it.
pub fn on_listener_close(fd: i32) {
    if !ANY_LISTENER.load(Ordering::Acquire) {
        return;
    }
    let t = LISTENERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
        .and_then(|m| m.remove(&fd));
    if let Some((token, _)) = t {
        progress::unregister(token);
    }
}

fn take_request(peer: SocketAddr, port: u16) -> Option<Waiting> {
    let mut g = REQUESTS.lock().unwrap_or_else(|p| p.into_inner());
    prune(&mut g, |_| false);
    let ip = canon(peer.ip());
    let i = g
        .iter()
        .rposition(|w| w.peer_ip == ip && w.tcp_port == peer.port() && w.port == port)?;
    let w = g.swap_remove(i);
    if !handoff::release(w.key()) {
        // A worker claimed it meanwhile: the redirect is on its way; this process must not
        // also answer. (A TCP connection is accepted once, so this is a client reusing its
        // port within the request's lifetime.)
        g.push(w);
        return None;
    }
    Some(w)
}

fn drain_listeners_inline() {
    let tasks: Vec<Arc<ListenTask>> = LISTENERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|m| {
            m.values()
                .filter(|(_, t)| t.owner == ib_verbs::sys::getpid())
                .map(|(_, t)| Arc::clone(t))
                .collect()
        })
        .unwrap_or_default();
    for t in tasks {
        t.drain();
    }
}

/// `accept` of a connection from another host: `None` when no rdma_cm request matches it
/// (the caller goes on as before), else the outcome of the rdma setup.
pub fn accept(
    fd: i32,
    flags: i32,
    local: SocketAddr,
    peer: SocketAddr,
) -> Option<Result<(), Reason>> {
    if !ANY_LISTENER.load(Ordering::Acquire) {
        return None;
    }
    // The client sends its REQ before its TCP SYN, but the two travel apart: look again
    // briefly before concluding that this is a plain client.
    let key = handoff::Key {
        ip: canon(peer.ip()),
        client_port: peer.port(),
        listen_port: local.port(),
    };
    let deadline = Instant::now() + Duration::from_millis(50);
    let w = loop {
        drain_listeners_inline();
        if let Some(w) = take_request(peer, local.port()) {
            break w;
        }
        if handoff::held(key) {
            // The listening process holds the request: this process (a worker) accepted the
            // TCP connection. Have the client redirected to a listener of ours.
            return worker_accept(fd, flags, local, peer, key);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    Some(server_setup(fd, flags, local, peer, w.req))
}

/// `accept` in a process other than the listener's, of a client whose request the listener's
/// process holds: the redirect, then the client's REQ to our own listener (within the setup
/// exchange's time; otherwise TCP, as the client's own timeout also gives).
fn worker_accept(
    fd: i32,
    flags: i32,
    local: SocketAddr,
    peer: SocketAddr,
    key: handoff::Key,
) -> Option<Result<(), Reason>> {
    let port = redirect_listener(local.ip())?;
    if !handoff::claim(key, port) {
        return None;
    }
    let deadline = Instant::now() + setup::EXCHANGE_TIMEOUT;
    loop {
        drain_listeners_inline();
        if let Some(w) = take_request(peer, port) {
            return Some(server_setup(fd, flags, local, peer, w.req));
        }
        if Instant::now() >= deadline {
            sdp_log!(
                log::DECISION,
                "accept fd {fd} from {peer}: the redirected rdma_cm request did not come; TCP"
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn server_setup(
    fd: i32,
    flags: i32,
    local: SocketAddr,
    peer: SocketAddr,
    req: Request,
) -> Result<(), Reason> {
    let (_, hello) = expand(req.hello(), peer.ip(), local.ip()).ok_or(Reason::SetupFailed)?;
    let mut engine = sdp_proto::Connection::accept(engine_config(), now(), &hello)
        .map_err(|_| Reason::SetupFailed)?;
    let mut posts = 0u32;
    while let Some(p) = engine.poll_post_recv() {
        posts += p.count;
    }
    let ack = compact_ack(&engine.hello_ack()).ok_or(Reason::SetupFailed)?;
    let rc = req
        .accept(options(), posts, &ack, setup::EXCHANGE_TIMEOUT)
        .map_err(|e| {
            sdp_log!(log::WARN, "rdma_cm accept from {peer} failed: {e}");
            Reason::SetupFailed
        })?;
    let (app, bell) = new_pair().map_err(|_| Reason::Exhausted)?;
    let s = SdpRdma::new(engine, rc);
    let notify = Notify::of(&s);
    let accepted = setup::Accepted {
        fd,
        flags,
        app,
        bell,
        local,
        peer,
    };
    let conn = accepted.install(Box::new(s), Transport::Rdma, |conn| {
        watch_notify(conn, notify)
    })?;
    // SO_KEEPALIVE, SO_OOBINLINE and buffer sizes inherited from the listener are on the
    // accepted shadow.
    {
        let mut g = conn.lock();
        super::keepalive::apply(&mut g);
        super::keepalive::apply_set_before(&mut g);
    }
    sdp_log!(
        log::DECISION,
        "accept fd {fd} from {peer} on {local}: SDP over rdma"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client side.

/// `connect` to an address of another host: the rdma_cm REQ, then the pending phase as for
/// shm. An error is the fallback reason.
/// Destinations whose last REQ the kernel's CM rejected (no libsdp listener there), and when:
/// for [`PLAIN_TTL`] their connections go straight to TCP (DESIGN §4's negative answer, cached
/// per address and port). A libsdp listener that refuses a request says so (a capability
/// record in the REJECT): that is not cached.
static PLAIN: Mutex<Vec<(SocketAddr, Instant)>> = Mutex::new(Vec::new());
const PLAIN_TTL: Duration = Duration::from_secs(1);

fn known_plain(dst: SocketAddr) -> bool {
    // Never waited for: a fork child may inherit it locked (then it asks again).
    let Ok(mut g) = PLAIN.try_lock() else {
        return false;
    };
    g.retain(|(_, t)| t.elapsed() < PLAIN_TTL);
    g.iter().any(|(d, _)| *d == dst)
}

fn note_plain(dst: SocketAddr) {
    if let Ok(mut g) = PLAIN.try_lock() {
        g.retain(|(d, t)| t.elapsed() < PLAIN_TTL && *d != dst);
        if g.len() < 4096 {
            g.push((dst, Instant::now()));
        }
    }
}

/// `asked` is `dst` as the program gave it, for the kernel's connect (see `setup::connect`).
pub fn try_connect(fd: i32, dst: SocketAddr, asked: SocketAddr) -> Result<CResult, Reason> {
    if known_plain(dst) {
        return Err(Reason::NoBeacon);
    }
    let mut cm = Connecting::resolve(dst, RESOLVE_TIMEOUT).map_err(|e| {
        sdp_log!(log::DECISION, "connect to {dst}: no rdma route: {e}");
        Reason::NoDevice
    })?;
    let src = cm.local_addr().ok_or(Reason::NoDevice)?;
    // The TCP socket leaves from the address rdma_cm chose, so that the server can match the
    // request with the accepted connection by (address, port).
    let mut local = sys::sockname(fd).ok_or(Reason::NotOffloadable)?;
    if local.port() == 0 {
        local = setup::bind_to_source(fd, local, src.ip())?;
    }
    let client = if local.ip().is_unspecified() {
        SocketAddr::new(src.ip(), local.port())
    } else {
        SocketAddr::new(canon(local.ip()), local.port())
    };
    let mut engine = sdp_proto::Connection::connect(
        engine_config(),
        now(),
        ip_addrs(client.ip(), dst.ip()),
        client.port(),
    );
    let mut posts = 0u32;
    while let Some(p) = engine.poll_post_recv() {
        posts += p.count;
    }
    let hello = engine.hello();
    let compact = compact(&hello, client.port()).ok_or(Reason::SetupFailed)?;
    cm.request(options(), posts, &compact).map_err(|e| {
        sdp_log!(log::WARN, "connect to {dst}: rdma_cm REQ failed: {e}");
        Reason::SetupFailed
    })?;
    let (app, bell) = new_pair().map_err(|_| Reason::Exhausted)?;
    let (conn, shadow) = setup::pending_client(fd, app, bell, client, dst, Transport::Rdma)?;
    let cfd = cm.fd();
    let task = Arc::new(ConnectTask {
        setup: Mutex::new(Some((cm, engine))),
        conn: Arc::downgrade(&conn),
        token: Mutex::new(None),
        dst,
        posts,
        hello: compact,
        redirected: AtomicBool::new(false),
    });
    let token = progress::register(cfd, libc::EPOLLIN as u32, task.clone());
    *task.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
    conn.lock().endpoint = token;

    let result = setup::raw_connect(shadow, &asked);
    if matches!(result, Ok(()) | Err(libc::EINPROGRESS)) {
        let pending_watch = setup::watch_pending(&conn, shadow);
        let mut g = conn.lock();
        if matches!(g.phase, Phase::Pending { .. }) {
            g.pending_watch = pending_watch;
        } else {
            for t in pending_watch {
                progress::unregister(t);
            }
        }
    }
    match result {
        Ok(()) => Ok(Ok(0)),
        Err(libc::EINPROGRESS) => {
            conn.lock().connect_in_progress = true;
            Ok(Err(libc::EINPROGRESS))
        }
        Err(e) => {
            task.done();
            log::connect_failed(fd, dst, e);
            setup::swap_back(&conn);
            Ok(Err(e))
        }
    }
}

/// The client's rdma_cm channel: the REP (the server accepted), or a REJECT / error.
struct ConnectTask {
    setup: Mutex<Option<(Connecting, sdp_proto::Connection)>>,
    conn: Weak<Conn>,
    token: Mutex<Option<u64>>,
    /// What a redirected REQ repeats: the destination, the initial receives and the hello.
    dst: SocketAddr,
    posts: u32,
    hello: [u8; COMPACT_LEN],
    /// A redirect was followed already (one is all a listener's process may send).
    redirected: AtomicBool,
}

impl ConnectTask {
    fn done(&self) {
        if let Some(t) = self.token.lock().unwrap_or_else(|p| p.into_inner()).take() {
            progress::unregister(t);
        }
    }
}

impl Task for ConnectTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        let Some(conn) = self.conn.upgrade() else {
            self.done();
            return;
        };
        let mut slot = self.setup.lock().unwrap_or_else(|p| p.into_inner());
        let Some((cm, _)) = slot.as_mut() else {
            return;
        };
        let polled = cm.poll();
        if let Ok(false) = polled {
            return;
        }
        if let Err(ib_verbs::rdma::SetupError::Redirect(port)) = polled
            && !self.redirected.swap(true, Ordering::AcqRel)
        {
            // The process that accepted our TCP connection listens on `port`: the REQ again,
            // there, and wait on the new id.
            let to = SocketAddr::new(self.dst.ip(), port);
            let again = Connecting::resolve(to, RESOLVE_TIMEOUT).and_then(|mut c| {
                c.request(options(), self.posts, &self.hello)?;
                Ok(c)
            });
            match again {
                Ok(c) => {
                    sdp_log!(log::DECISION, "connect to {}: redirected to {to}", self.dst);
                    let fd = c.fd();
                    if let Some((old, _)) = slot.as_mut() {
                        *old = c;
                    }
                    drop(slot);
                    self.done();
                    // `self` is owned by the progress registry: register a twin holding the
                    // setup (this one is unregistered).
                    let setup = self.setup.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let twin = Arc::new(ConnectTask {
                        setup: Mutex::new(setup),
                        conn: self.conn.clone(),
                        token: Mutex::new(None),
                        dst: self.dst,
                        posts: self.posts,
                        hello: self.hello,
                        redirected: AtomicBool::new(true),
                    });
                    let token = progress::register(fd, libc::EPOLLIN as u32, twin.clone());
                    *twin.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
                    let mut g = conn.lock();
                    g.endpoint = token;
                    g.setup_redirected = true;
                    return;
                }
                Err(e) => {
                    sdp_log!(
                        log::DECISION,
                        "connect to {}: redirect to {to} failed: {e}",
                        self.dst
                    );
                }
            }
        }
        let Some((cm, mut engine)) = slot.take() else {
            return;
        };
        drop(slot);
        self.done();
        // INVARIANT: as for shm, only a still-pending connection completes the setup, under
        // its lock (a fork or a fallback never sees it half done).
        let mut g = conn.lock();
        if !matches!(g.phase, Phase::Pending { .. }) {
            return; // dropping `cm` abandons the setup
        }
        g.endpoint = None;
        let result = polled
            .and_then(|_| cm.finish())
            .map_err(|e| {
                let reason = match e {
                    // A libsdp listener there refused this request.
                    ib_verbs::rdma::SetupError::Refused => Reason::SetupFailed,
                    // The kernel's CM: nobody listens with rdma_cm on that port.
                    ib_verbs::rdma::SetupError::Peer("connection rejected") => {
                        note_plain(self.dst);
                        Reason::NoBeacon
                    }
                    _ => Reason::NoBeacon,
                };
                (e.to_string(), reason)
            })
            .and_then(|(rc, ack)| {
                let ack = expand_ack(&ack)
                    .ok_or_else(|| ("malformed HelloAck".to_string(), Reason::SetupFailed))?;
                engine
                    .handle_hello_ack(now(), &ack)
                    .map_err(|e| (format!("{e:?}"), Reason::SetupFailed))?;
                Ok(rc)
            });
        match result {
            Ok(rc) => become_offloaded(&conn, &mut g, SdpRdma::new(engine, rc)),
            Err((e, reason)) => {
                sdp_log!(
                    log::DECISION,
                    "rdma setup to {:?} ended ({e}); connection continues over TCP",
                    g.peer
                );
                setup::swap_back_because(&mut g, reason);
            }
        }
    }
}

/// Pending → offloaded over rdma: the bytes the application already sent go first.
fn become_offloaded(conn: &Arc<Conn>, g: &mut Inner, s: SdpRdma) {
    let notify = Notify::of(&s);
    if !setup::install_stream(g, Box::new(s)) {
        return;
    }
    g.watch = watch_notify(conn, notify);
    g.sync();
    // SO_KEEPALIVE, SO_OOBINLINE and buffer sizes set before connect are on the shadow.
    super::keepalive::apply(g);
    super::keepalive::apply_set_before(g);
    log::resolved(g, None);
}

// ---------------------------------------------------------------------------------------------
// Readiness: the progress thread services the notify fd.

struct NotifyTask {
    conn: Weak<Conn>,
    flag: Arc<AtomicBool>,
}

impl Task for NotifyTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        notified(&self.conn, &self.flag);
    }
}

/// The connection needs attention (a completion, or its rdma_cm id has an event): progress it
/// and bring its app end up to date.
fn notified(conn: &Weak<Conn>, flag: &AtomicBool) {
    let Some(conn) = conn.upgrade() else {
        return;
    };
    let mut g = conn.lock();
    flag.store(true, Ordering::Release);
    let (before, was_reset) = match &g.phase {
        Phase::Offloaded(s) if s.is_current() => {
            (s.counters().msgs_rx, s.error() == Some(libc::ECONNRESET))
        }
        _ => return,
    };
    g.sync();
    let (after, dead, reset) = match &g.phase {
        Phase::Offloaded(s) => (
            s.counters().msgs_rx,
            s.error().is_some(),
            s.error() == Some(libc::ECONNRESET),
        ),
        _ => return,
    };
    if reset && !was_reset && g.app_int >= 0 {
        // LINUX: a reset TCP socket polls HUP (both directions are shut), as over shm.
        // SAFETY: our own copy of the app end.
        unsafe { libc::syscall(libc::SYS_shutdown, g.app_int, libc::SHUT_WR) };
    }
    if after > before && g.every_arrival && g.bytes_in {
        // LINUX: edge-triggered epoll reports every arrival: one more byte, one more edge.
        super::raw_send(g.own_bell, &[1], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    }
    if dead && let Some(t) = g.watch.take() {
        // A dead QP's rdma_cm id may stay readable: stop watching it.
        progress::unregister(t);
    }
}

/// What the progress thread needs to serve a connection: its notify fd (the rdma_cm id), the
/// flag `SdpRdma::poll_completions` acknowledges, and its name on the process's completion
/// channel.
struct Notify {
    fd: i32,
    flag: Arc<AtomicBool>,
    event_id: u64,
    device: Arc<ib_verbs::rdma::Device>,
    /// Where the stream's engine timer finds its connection.
    home: Arc<OnceLock<Weak<Conn>>>,
}

impl Notify {
    fn of(s: &SdpRdma) -> Notify {
        Notify {
            home: Arc::clone(&s.timer.home),
            fd: s.conn.notify_fd(),
            flag: Arc::clone(&s.notified),
            event_id: s.conn.event_id(),
            device: Arc::clone(s.conn.device()),
        }
    }
}

/// Registers the connection with the progress thread: its rdma_cm events on its notify fd, its
/// completions through the process's channel (before the first `arm`, so none is missed).
fn watch_notify(conn: &Arc<Conn>, n: Notify) -> Option<u64> {
    let _ = n.home.set(Arc::downgrade(conn));
    channel::serve(&n.device);
    channel::add(n.event_id, Arc::downgrade(conn), Arc::clone(&n.flag));
    progress::register(
        n.fd,
        libc::EPOLLIN as u32,
        Arc::new(NotifyTask {
            conn: Arc::downgrade(conn),
            flag: n.flag,
        }),
    )
}

/// The process's completion channel (DESIGN §5): every CQ of our connections reports to one
/// channel per device, which one progress task serves; an event names its connection by
/// `RdmaConn::event_id`.
mod channel {
    use super::*;
    use ib_verbs::rdma::Device;

    type Waiters = HashMap<u64, (Weak<Conn>, Arc<AtomicBool>)>;
    static WAITERS: Mutex<Option<Waiters>> = Mutex::new(None);
    /// Devices whose channel has a progress task (in this process).
    static SERVED: Mutex<Vec<(i32, Weak<Device>)>> = Mutex::new(Vec::new());

    struct ChannelTask {
        dev: Weak<Device>,
        owner: i32,
        token: Mutex<Option<u64>>,
    }

    impl Task for ChannelTask {
        fn on_event(&self, _fd: i32, _events: u32) {
            let dev = self.dev.upgrade();
            let Some(dev) = dev.filter(|_| ib_verbs::sys::getpid() == self.owner) else {
                // The device is gone, or this is a fork child: the channel (shared with the
                // parent) is the owner's to drain.
                if let Some(t) = self.token.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    progress::unregister(t);
                }
                return;
            };
            let mut ids = Vec::new();
            dev.take_cq_events(|id| ids.push(id));
            for id in ids {
                let w = WAITERS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .and_then(|m| m.get(&id).cloned());
                if let Some((conn, flag)) = w {
                    notified(&conn, &flag);
                }
            }
        }
    }

    /// Makes sure the progress thread serves `dev`'s channel in this process.
    pub(super) fn serve(dev: &Arc<Device>) {
        let pid = ib_verbs::sys::getpid();
        let mut served = SERVED.lock().unwrap_or_else(|p| p.into_inner());
        served.retain(|(p, d)| *p == pid && d.strong_count() > 0);
        if served
            .iter()
            .any(|(_, d)| d.upgrade().is_some_and(|d| Arc::ptr_eq(&d, dev)))
        {
            return;
        }
        let Some(fd) = dev.channel_fd() else {
            return;
        };
        let task = Arc::new(ChannelTask {
            dev: Arc::downgrade(dev),
            owner: pid,
            token: Mutex::new(None),
        });
        let token = progress::register(fd, libc::EPOLLIN as u32, task.clone());
        *task.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
        served.push((pid, Arc::downgrade(dev)));
    }

    pub(super) fn add(id: u64, conn: Weak<Conn>, flag: Arc<AtomicBool>) {
        let mut g = WAITERS.lock().unwrap_or_else(|p| p.into_inner());
        let m = g.get_or_insert_with(HashMap::new);
        m.retain(|_, (c, _)| c.strong_count() > 0);
        m.insert(id, (conn, flag));
    }

    pub(super) fn remove(id: u64) {
        if let Some(m) = WAITERS.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            m.remove(&id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stream.

/// SDP over an RC queue pair: `sdp-proto`'s engine joined to an [`RdmaConn`]. The same glue
/// as `SdpShm` minus what only shared memory has (bells the peer rings, ring ownership).
pub struct SdpRdma {
    engine: sdp_proto::Connection,
    /// Not dropped in a process other than its owner (see [`Drop`]).
    conn: ManuallyDrop<RdmaConn>,
    owner: i32,
    /// The progress thread saw the notify fd readable: acknowledge it at the next progress.
    notified: Arc<AtomicBool>,
    txbuf: Vec<u8>,
    rxbuf: Vec<u8>,
    cq: Vec<Completion>,
    next_wr: u64,
    peer_gone: bool,
    /// The peer went while our bytes waited for it (its application had not read what it was
    /// sent) and no call has reported it yet: one ECONNRESET to report, as after TCP's RST.
    reset_pending: bool,
    /// The connection was reset (then `reset_pending` was set): once reported, SO_ERROR has
    /// nothing more to say.
    reset_seen: bool,
    /// The first write after the peer's close (see `AfterPeerClose`).
    after_close: super::stream::AfterPeerClose,
    /// We shut our sending side down: every write gets EPIPE, whatever the peer did.
    shut_write: bool,
    dead: Option<Errno>,
    urgent: bool,
    every_arrival: bool,
    /// Lengths of the SENDs posted and not completed, oldest first (completions come in
    /// posting order), and their sum: bytes that die with the QP if it is destroyed now.
    inflight: std::collections::VecDeque<u32>,
    inflight_bytes: usize,
    /// ZCopy sink (SDP-WIRE.md §8): the destination of our RDMA READs of the peer's
    /// SrcAvails, mapped and registered at the first one.
    sink: Option<(DmaBuf, MemKey)>,
    /// The RDMA READ in flight: (work request, the engine's id, bytes).
    reading: Option<(u64, u64, u32)>,
    /// ZCopy source: a large send is copied here and offered by one SrcAvail.
    stage: Option<DmaBuf>,
    /// The SrcAvail outstanding: its id, its key (revoked when it finishes) and its bytes. No
    /// other byte may be queued meanwhile (a refused or cancelled offer is resent first).
    offered: Option<(ZcopyId, MemKey, usize)>,
    /// Bytes of `stage` a refused or cancelled SrcAvail left, to send by BCopy before any other.
    resend: std::ops::Range<usize>,
    /// Wakes the connection at the engine's next deadline (keepalive, SrcAvail, close).
    timer: EngineTimer,
}

/// The engine's timers must fire while nothing else moves the connection (an idle
/// connection with SO_KEEPALIVE): one progress-thread one-shot at the engine's next deadline,
/// at most one pending per connection.
#[derive(Default)]
struct EngineTimer {
    /// The connection, once the progress thread serves it (`watch_notify`).
    home: Arc<OnceLock<Weak<Conn>>>,
    /// The pending one-shot: the engine deadline it serves, when it runs, its token.
    pending: Option<(sdp_proto::Timestamp, Instant, u64)>,
}

struct EngineTimerTask {
    conn: Weak<Conn>,
}

impl Task for EngineTimerTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        let Some(conn) = self.conn.upgrade() else {
            return;
        };
        let mut g = conn.lock();
        if matches!(g.phase, Phase::Offloaded(_)) && g.is_current() {
            // Progress runs the expired timers and sets the next one-shot.
            g.sync();
        }
    }
}

impl SdpRdma {
    pub fn new(engine: sdp_proto::Connection, conn: RdmaConn) -> SdpRdma {
        let attrs = conn.attrs();
        let mut s = SdpRdma {
            engine,
            txbuf: vec![0; attrs.send_buf_size.max(64) as usize],
            rxbuf: vec![0; attrs.recv_buf_size.max(64) as usize],
            conn: ManuallyDrop::new(conn),
            owner: ib_verbs::sys::getpid(),
            notified: Arc::new(AtomicBool::new(false)),
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
            every_arrival: false,
            inflight: std::collections::VecDeque::new(),
            inflight_bytes: 0,
            sink: None,
            reading: None,
            stage: None,
            offered: None,
            resend: 0..0,
            timer: EngineTimer::default(),
        };
        if s.engine.role() == sdp_proto::Role::Passive {
            // rdma_cm's ESTABLISHED came before the connection was handed over.
            let _ = s.engine.handle_established(now());
        }
        s.drain_outputs();
        s
    }

    fn mine(&self) -> bool {
        ib_verbs::sys::getpid() == self.owner
    }

    /// A process forked from the owner touched the connection: EIO, never the owner's QP.
    fn check_owner(&mut self) -> bool {
        if self.mine() {
            return true;
        }
        if self.dead.is_none() {
            sdp_log!(
                log::ERROR,
                "an SDP connection over rdma was used by a process forked from its owner: its queue pair belongs to the owner; it fails here with EIO"
            );
            self.dead = Some(libc::EIO);
        }
        false
    }

    fn wr(&mut self) -> u64 {
        self.next_wr += 1;
        self.next_wr
    }

    fn transport_died(&mut self, e: ConnError) {
        if self.dead.is_some() && self.engine.error().is_some() {
            // Already dead of a named cause (an unanswered keepalive): the QP's end follows.
            return;
        }
        let t = now();
        match e {
            ConnError::PeerClosed | ConnError::PeerAborted => {
                self.mark_peer_gone();
                let _ = self.engine.handle_cm_disconnected(t);
            }
            _ => {
                // The queue pair failed (the peer's host tore it down with its process, an
                // RDMA READ of its memory refused): the connection is reset. LINUX: a reset
                // is reported once (ECONNRESET to the next call, SO_ERROR), then reads see
                // end of stream and writes EPIPE; a sticky error here made every later read
                // fail with ECONNRESET too.
                sdp_log!(log::WARN, "rdma transport failed: {e}");
                if !self.peer_gone {
                    self.reset_pending = true;
                    self.reset_seen = true;
                    self.peer_gone = true;
                }
                let _ = self
                    .engine
                    .handle_transport_error(t, sdp_proto::error::TransportFailure::Fatal);
            }
        }
    }

    /// The peer's end (rdma_cm DISCONNECTED: its close, or its death). LINUX: a TCP peer that
    /// goes with bytes unread resets the connection (its kernel answers with RST): the next
    /// call reports ECONNRESET once, then EPIPE / end of stream. Bytes still queued here for
    /// lack of its credits, or offered by a SrcAvail it never read, mean that its application
    /// had not read what it was sent (the rule `SdpShm::peer_gone` applies over shm).
    fn mark_peer_gone(&mut self) {
        if !self.peer_gone {
            if self.engine.send_queued() > 0 || self.offered.is_some() || !self.resend.is_empty() {
                self.reset_pending = true;
                self.reset_seen = true;
            }
            self.peer_gone = true;
        }
    }

    fn poll_completions(&mut self) {
        if self.notified.swap(false, Ordering::AcqRel)
            && let Err(e) = self.conn.ack_notify()
        {
            self.transport_died(e);
        }
        loop {
            let n = match self.conn.poll_cq(&mut self.cq) {
                Ok(n) => n,
                Err(e) => {
                    if !self.peer_gone || !matches!(e, ConnError::PeerClosed) {
                        self.transport_died(e);
                    }
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
                        match self.conn.recv_data(&c, 0, &mut self.rxbuf[..len]) {
                            Ok(got) => {
                                if let Err(sdp_proto::error::HandleError::Fatal(e)) =
                                    self.engine.handle_message(t, &self.rxbuf[..got])
                                {
                                    sdp_log!(log::WARN, "SDP connection ended: {e}");
                                }
                            }
                            Err(_) => self.dead = Some(libc::ECONNRESET),
                        }
                    }
                    Opcode::Send => {
                        sends += 1;
                        if let Some(l) = self.inflight.pop_front() {
                            self.inflight_bytes -= l as usize;
                        }
                    }
                    Opcode::Read => self.read_done(c),
                    Opcode::Write if c.status.is_err() => self.keepalive_failed(),
                    _ => {}
                }
            }
            if sends > 0 {
                let _ = self.engine.handle_send_complete(t, sends);
            }
        }
    }

    fn drain_outputs(&mut self) {
        // An event may queue more work (a read done, a refused offer resent): again until quiet.
        while self.drain_once() {}
    }

    /// Posts what the engine has for the transport and acts on its events; whether any event
    /// came.
    fn drain_once(&mut self) -> bool {
        let t = now();
        let mut events = false;
        while let Some(p) = self.engine.poll_post_recv() {
            for _ in 0..p.count {
                let wr = self.wr();
                if self.conn.post_recv(wr).is_err() {
                    break;
                }
            }
        }
        while let Some(tx) = self.engine.poll_transmit(t, &mut self.txbuf) {
            let wr = self.wr();
            let posted = self.conn.post_send(wr, &[&self.txbuf[..tx.len]]);
            if posted.is_ok() {
                self.inflight.push_back(tx.len as u32);
                self.inflight_bytes += tx.len;
            }
            if let Err(e) = posted {
                sdp_log!(log::WARN, "post_send failed: {e}");
                if let ib_verbs::PostError::Dead(d) = e {
                    self.transport_died(d);
                }
                break;
            }
        }
        while let Some(ev) = self.engine.poll_event() {
            events = true;
            match ev {
                // rdma_cm's DREQ goes when the connection is dropped (the last close); the
                // engine's teardown needs no more from the transport here.
                Event::Disconnect { .. } => {
                    let _ = self.engine.handle_cm_disconnected(t);
                }
                Event::UrgentPending => self.urgent = true,
                Event::RdmaRead(r) => self.start_read(r),
                Event::ZcopySendFinished {
                    id,
                    sent,
                    completed,
                } => self.offer_finished(id, sent, completed),
                Event::KeepaliveProbe => self.probe(),
                _ => {}
            }
        }
        if let Some(deadline) = self.engine.poll_timeout()
            && deadline <= t
        {
            self.engine.handle_timeout(t);
            events = true;
        }
        if !self.resend.is_empty() {
            self.push_resend();
        }
        events
    }

    // -- ZCopy (SDP-WIRE.md §8) ----------------------------------------------------------------

    /// The peer offered bytes (SrcAvail): RDMA-read them into the sink. Anything that keeps
    /// us from reading is reported as `Unsupported`: the engine answers SendSM and the peer
    /// sends them by BCopy.
    fn start_read(&mut self, r: RdmaRead) {
        let t = now();
        if self.sink.is_none() {
            let chunk = engine_config().rdma_read_chunk as usize;
            self.sink = DmaBuf::new(chunk).and_then(|mut b| {
                // SAFETY: the sink is mapped until the connection is dropped, after the
                // connection that holds its key; only a RDMA READ writes it while registered,
                // and we read it only after that read completed.
                let key = unsafe {
                    self.conn
                        .register(b.as_mut_ptr(), b.len(), Access::LocalWrite)
                };
                key.ok().map(|k| (b, k))
            });
        }
        let wr = self.wr();
        let posted = match &self.sink {
            Some((buf, key)) if r.len as usize <= buf.len() => {
                let local = LocalSge {
                    addr: buf.addr(),
                    len: buf.len() as u32,
                    key: *key,
                };
                let remote = RemoteSge {
                    addr: r.remote_addr,
                    len: r.len,
                    key: MemKey(r.rkey),
                };
                self.conn.post_read(wr, local, remote).map(|()| wr)
            }
            _ => Err(ib_verbs::PostError::ZcopyUnavailable),
        };
        match posted {
            Ok(wr) => self.reading = Some((wr, r.id, r.len)),
            Err(e) => {
                sdp_log!(
                    log::DECISION,
                    "RDMA READ of a SrcAvail not posted ({e}): SendSM"
                );
                let failure = match e {
                    ib_verbs::PostError::Dead(d) => {
                        self.transport_died(d);
                        RdmaReadFailure::Fatal
                    }
                    _ => RdmaReadFailure::Unsupported,
                };
                let _ = self.engine.handle_rdma_read_complete(t, r.id, Err(failure));
            }
        }
    }

    /// A RDMA READ completed: its bytes go to the engine (which sends RdmaRdCompl).
    fn read_done(&mut self, c: Completion) {
        let Some((wr, id, len)) = self.reading else {
            return;
        };
        if wr != c.wr_id {
            return;
        }
        self.reading = None;
        let t = now();
        let result = match (&self.sink, c.status) {
            (Some((buf, _)), Ok(())) => Ok(&buf.as_slice()[..len as usize]),
            _ => Err(RdmaReadFailure::Fatal),
        };
        if let Err(sdp_proto::error::HandleError::Fatal(e)) =
            self.engine.handle_rdma_read_complete(t, id, result)
        {
            sdp_log!(log::WARN, "SDP connection ended at a RDMA READ: {e}");
        }
    }

    /// Offers a send of at least [`ZCOPY_THRESHOLD`] bytes by SrcAvail; the bytes taken, or
    /// `None` to send by BCopy (too small, the engine is busy, no memory or registration).
    fn try_offer(&mut self, data: &[&[u8]]) -> Option<usize> {
        let total: usize = data.iter().map(|b| b.len()).sum();
        if total < ZCOPY_THRESHOLD || self.offered.is_some() || !self.resend.is_empty() {
            return None;
        }
        let len = total.min(ZCOPY_STAGE);
        if !self.engine.zcopy_possible(len) {
            return None;
        }
        if self.stage.is_none() {
            self.stage = DmaBuf::new(ZCOPY_STAGE);
        }
        let stage = self.stage.as_mut()?;
        let out = stage.as_mut_slice();
        let mut at = 0;
        for b in data {
            let k = b.len().min(len - at);
            out[at..at + k].copy_from_slice(&b[..k]);
            at += k;
            if at == len {
                break;
            }
        }
        // SAFETY: the staging buffer is mapped until the connection is dropped, after the
        // connection holding its keys, and is not written while an offer names it (`offered`);
        // the peer may read these bytes: they are the stream's own.
        let key = unsafe {
            self.conn
                .register(stage.as_mut_ptr(), len, Access::RemoteRead)
                .ok()?
        };
        match self
            .engine
            .send_zcopy(now(), &stage.as_slice()[..len], key.0, stage.addr())
        {
            Ok(id) => {
                sdp_log!(log::TRACE, "zcopy offer {id:?} {len} B");
                self.offered = Some((id, key, len));
                Some(len)
            }
            Err(_) => {
                let _ = self.conn.deregister(key);
                None
            }
        }
    }

    /// Our SrcAvail is over: revoke its key; what the peer did not take goes by BCopy first.
    fn offer_finished(&mut self, id: ZcopyId, sent: u32, completed: bool) {
        sdp_log!(
            log::TRACE,
            "zcopy offer {id:?} finished: sent {sent} completed {completed}"
        );
        let Some((want, key, len)) = self.offered else {
            return;
        };
        if want != id {
            return;
        }
        self.offered = None;
        let _ = self.conn.deregister(key);
        if !completed {
            self.resend = (sent as usize).min(len)..len;
            self.push_resend();
        }
    }

    /// Queues what is left of a refused offer; whether nothing is left.
    fn push_resend(&mut self) -> bool {
        let t = now();
        while !self.resend.is_empty() {
            let Some(stage) = &self.stage else {
                self.resend = 0..0;
                break;
            };
            match self.engine.send(t, &stage.as_slice()[self.resend.clone()]) {
                Ok(k) => self.resend.start += k,
                Err(_) => break,
            }
        }
        self.resend.is_empty()
    }

    // -- Keepalive (SDP-WIRE.md §5.4) -------------------------------------------------------------

    /// Idle for the keepalive time: a zero-length RDMA WRITE the peer's adapter acknowledges
    /// (its application sees nothing).
    fn probe(&mut self) {
        let wr = self.wr();
        match self.conn.post_keepalive(wr) {
            Ok(()) => {}
            Err(ib_verbs::PostError::Dead(d)) => self.transport_died(d),
            // A full send queue is work in flight: not idle; the next period probes.
            Err(e) => sdp_log!(log::DECISION, "keepalive probe not posted: {e}"),
        }
    }

    /// The probe went unanswered (RC retry exceeded): the peer is gone. LINUX: TCP gives
    /// ETIMEDOUT when its keepalive probes go unanswered.
    fn keepalive_failed(&mut self) {
        sdp_log!(
            log::WARN,
            "SDP keepalive probe unanswered: the peer is unreachable; connection timed out"
        );
        self.dead.get_or_insert(libc::ETIMEDOUT);
        let _ = self
            .engine
            .handle_transport_error(now(), TransportFailure::Keepalive);
    }

    /// Makes sure the progress thread runs the connection at the engine's next deadline.
    fn schedule_timer(&mut self) {
        let deadline = self.engine.poll_timeout();
        if let Some((at, when, token)) = self.timer.pending {
            let fired = when <= Instant::now();
            if !fired && deadline.is_some_and(|d| at <= d) {
                return; // one as early is pending: it reschedules when it runs
            }
            progress::unregister(token);
            self.timer.pending = None;
        }
        let (Some(d), Some(home)) = (deadline, self.timer.home.get()) else {
            return;
        };
        // The engine's clock is the coarse monotonic one: a few ms late rather than early
        // (a one-shot that finds nothing expired would only be set again).
        let when = Instant::now() + d.saturating_since(now()) + Duration::from_millis(5);
        let task = Arc::new(EngineTimerTask { conn: home.clone() });
        self.timer.pending = progress::at(when, task).map(|token| (d, when, token));
    }

    fn conn_errno(&self, e: &sdp_proto::ConnectionError) -> Errno {
        if self.peer_gone {
            return libc::EPIPE;
        }
        errno_of(e.io_kind())
    }
}

impl Drop for SdpRdma {
    fn drop(&mut self) {
        if self.mine() {
            if let Some((_, _, token)) = self.timer.pending.take() {
                progress::unregister(token);
            }
            channel::remove(self.conn.event_id());
            // SAFETY: dropped once, here, in the process that created the verbs objects.
            unsafe { ManuallyDrop::drop(&mut self.conn) };
        }
        // Elsewhere (a fork child) the QP, CQ and rdma_cm id are the owner's: leak our copy.
    }
}

impl OffloadStream for SdpRdma {
    fn transport(&self) -> Transport {
        Transport::Rdma
    }

    fn progress(&mut self) {
        if !self.check_owner() {
            return;
        }
        self.poll_completions();
        self.drain_outputs();
        if self.every_arrival {
            // Every arrival must reach the progress thread (see `NotifyTask`).
            while matches!(self.conn.arm(), Ok(false)) {
                self.poll_completions();
                self.drain_outputs();
            }
        }
        self.schedule_timer();
    }

    fn send(&mut self, data: &[&[u8]], oob: bool) -> Result<usize, Errno> {
        if !self.check_owner() {
            return Err(libc::EIO);
        }
        if let Some(e) = self.dead {
            return Err(e);
        }
        if std::mem::take(&mut self.reset_pending) {
            return Err(libc::ECONNRESET);
        }
        if data.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        if self.offered.is_some() || !self.push_resend() {
            // Our SrcAvail is outstanding or its remainder waits: nothing may go before it.
            self.drain_outputs();
            // The connection's error, sticky (not SO_ERROR's report-once `take_error`): a
            // writer blocked behind our offer must not wait for a peer that reset.
            let err = if std::mem::take(&mut self.reset_pending) {
                Some(libc::ECONNRESET)
            } else {
                self.error()
            };
            if let Some(e) = err {
                if e == libc::ECONNRESET && self.dead.is_none() {
                    // Reported once, as a reset is; the writes after it get EPIPE.
                    self.peer_gone = true;
                }
                return Err(e);
            }
            if self.offered.is_some() || !self.resend.is_empty() {
                return Err(libc::EAGAIN);
            }
        }
        if !oob && let Some(n) = self.try_offer(data) {
            self.drain_outputs();
            return Ok(n);
        }
        let t = now();
        let mut n = 0;
        for (i, b) in data.iter().enumerate() {
            let last = i + 1 == data.len();
            let r = if oob && last {
                self.engine.send_urgent(t, b)
            } else {
                self.engine.send(t, b)
            };
            match r {
                Ok(k) => {
                    n += k;
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
                        self.peer_gone
                            && !self.reset_seen
                            && !self.shut_write
                            && self.dead.is_none(),
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
                    let errno = self.conn_errno(&e);
                    if errno == libc::ECONNRESET && self.dead.is_none() {
                        // Reported once, as a reset is; the writes after it get EPIPE.
                        self.peer_gone = true;
                    }
                    return Err(errno);
                }
            }
        }
        self.drain_outputs();
        if n == 0 && data.iter().any(|b| !b.is_empty()) {
            return Err(libc::EAGAIN);
        }
        Ok(n)
    }

    fn recv(&mut self, out: &mut [&mut [u8]], peek: bool) -> Result<usize, Errno> {
        if !self.check_owner() {
            return Err(libc::EIO);
        }
        let r = engine_recv(
            &mut self.engine,
            out,
            peek,
            &mut self.reset_pending,
            self.peer_gone,
            self.dead,
        );
        if matches!(r, Ok(n) if n > 0) {
            self.drain_outputs();
        }
        if r == Err(libc::ECONNRESET) && self.dead.is_none() {
            // LINUX: a reset is reported once; the reads after it see end of stream (the
            // engine's error, an RDMA READ of the peer's offer refused when its host tore the
            // peer down, would otherwise answer every read with ECONNRESET).
            self.peer_gone = true;
        }
        r
    }

    fn recv_oob(&mut self, peek: bool) -> Result<u8, Errno> {
        if !self.check_owner() {
            return Err(libc::EIO);
        }
        match self.engine.recv_urgent(now(), peek) {
            Ok(b) => Ok(b),
            Err(UrgentError::Invalid) => Err(libc::EINVAL),
            Err(UrgentError::WouldBlock) => Err(libc::EAGAIN),
            Err(UrgentError::Closed(e)) => Err(self.conn_errno(&e)),
        }
    }

    fn has_work(&mut self) -> bool {
        self.mine() && (self.notified.load(Ordering::Acquire) || self.conn.has_work())
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
        (r.writable && self.offered.is_none() && self.resend.is_empty())
            || r.error
            || self.dead.is_some()
            || self.peer_gone
    }

    fn recv_queued(&self) -> usize {
        self.engine.recv_available()
    }

    fn send_queued(&self) -> usize {
        // Posted SENDs count until their completion (the peer's adapter acknowledged them):
        // a close that drops the QP before that loses them, so close lingers while they fly.
        if self.dead.is_some() || self.peer_gone {
            return self.engine.send_queued();
        }
        let offer = self.offered.map_or(0, |(_, _, len)| len) + self.resend.len();
        self.engine.send_queued() + self.inflight_bytes + offer
    }

    fn urgent_ready(&self) -> bool {
        self.engine.readiness().urgent
    }

    fn at_mark(&self) -> bool {
        self.engine.at_mark()
    }

    fn shutdown_write(&mut self) {
        if !self.check_owner() {
            return;
        }
        self.shut_write = true;
        let _ = self
            .engine
            .shutdown(now(), sdp_proto::conn::Shutdown::Write);
        self.drain_outputs();
    }

    fn abort(&mut self) {
        if !self.check_owner() {
            return;
        }
        self.engine.abort(now());
        self.drain_outputs();
    }

    fn unread(&mut self) -> bool {
        self.progress();
        self.engine.recv_available() > 0
    }

    fn peer_gone(&mut self) {
        if !self.peer_gone {
            self.poll_completions();
            self.mark_peer_gone();
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
        !self.mine() || matches!(self.conn.arm(), Ok(true))
    }

    fn disarm_recv(&mut self) -> bool {
        // Only we ring our bell (`Inner::self_ring`, recorded in `Inner::bytes_in`): no peer
        // byte can be on its way.
        false
    }

    fn arm_send(&mut self) -> bool {
        // Credits come in messages: the same completion event wakes the progress thread.
        !self.mine() || matches!(self.conn.arm(), Ok(true))
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
            // Completion events ring here, not bell bytes.
            bells_tx: 0,
            direct_tx: 0,
            direct_rx: 0,
        }
    }

    fn is_current(&self) -> bool {
        self.mine()
    }

    fn set_every_arrival(&mut self, on: bool) {
        self.every_arrival = on;
    }

    fn owner_generation(&self) -> u64 {
        self.owner as u64
    }

    fn take_urgent(&mut self) -> bool {
        std::mem::take(&mut self.urgent)
    }

    fn fds(&self) -> Vec<i32> {
        vec![self.conn.notify_fd()]
    }

    fn set_oob_inline(&mut self, on: bool) {
        self.engine.set_oob_inline(on);
    }

    fn set_buffers(&mut self, sndbuf: Option<usize>, rcvbuf: Option<usize>) {
        self.engine.set_buffer_sizes(sndbuf, rcvbuf);
        self.drain_outputs(); // a bigger window reposts receive buffers now
    }

    fn set_keepalive(&mut self, idle: Option<Duration>) {
        if self.check_owner() {
            self.engine.set_keepalive(now(), idle);
        }
    }

    fn flush(&mut self, budget: Duration) {
        let end = Instant::now() + budget;
        while self.mine()
            && self.send_queued() > 0
            && self.dead.is_none()
            && !self.peer_gone
            && Instant::now() < end
        {
            self.progress();
            if self.send_queued() == 0 {
                break;
            }
            let _ = self
                .conn
                .wait(Duration::from_micros(50), Some(Duration::from_millis(10)));
            self.notified.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_hello_round_trips_and_fits_a_req() {
        const { assert!(COMPACT_LEN <= ib_verbs::rdma::cm::MAX_REQ_HELLO) };
        let src: IpAddr = "192.168.77.1".parse().unwrap();
        let dst: IpAddr = "192.168.77.2".parse().unwrap();
        let mut e = sdp_proto::Connection::connect(sdp::config(), now(), ip_addrs(src, dst), 40000);
        while e.poll_post_recv().is_some() {}
        let hello = e.hello();
        let c = compact(&hello, 40001).expect("engine hello parses");
        let (port, full) = expand(&c, src, dst).expect("expands");
        assert_eq!(port, 40001);
        assert_eq!(
            full[..],
            hello[..],
            "the server sees the client's Hello exactly"
        );
        assert!(sdp_proto::Connection::accept(sdp::config(), now(), &full).is_ok());
        assert!(expand(&c[..COMPACT_LEN - 1], src, dst).is_none(), "short");
        let mut bad = c;
        bad[6] = 0; // max_adverts 0: the engine refuses it
        let (_, h) = expand(&bad, src, dst).unwrap();
        assert!(sdp_proto::Connection::accept(sdp::config(), now(), &h).is_err());
    }

    #[test]
    fn compact_hello_ack_round_trips_and_fits_a_rep() {
        const { assert!(COMPACT_ACK_LEN <= ib_verbs::rdma::cm::MAX_REP_HELLO) };
        let src: IpAddr = "192.168.77.1".parse().unwrap();
        let dst: IpAddr = "192.168.77.2".parse().unwrap();
        let mut a = sdp_proto::Connection::connect(sdp::config(), now(), ip_addrs(src, dst), 1);
        while a.poll_post_recv().is_some() {}
        let mut p = sdp_proto::Connection::accept(sdp::config(), now(), &a.hello()).unwrap();
        while p.poll_post_recv().is_some() {}
        let ack = p.hello_ack();
        let c = compact_ack(&ack).expect("engine HelloAck parses");
        let full = expand_ack(&c).expect("expands");
        assert_eq!(
            full[..],
            ack[..],
            "the client sees the server's HelloAck exactly"
        );
        assert!(a.handle_hello_ack(now(), &full).is_ok());
        assert!(expand_ack(&c[1..]).is_none(), "short");
    }

    #[test]
    fn the_gate_is_closed_without_a_device() {
        // This host has no RDMA device: nothing here may run (CI and the development host).
        if std::fs::read_dir("/sys/class/infiniband").map_or(true, |mut d| d.next().is_none()) {
            assert!(!enabled());
        }
    }
}
