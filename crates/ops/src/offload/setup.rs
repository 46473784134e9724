//! Connection setup on one host (DESIGN.md §4): listen replication, discovery, rendezvous,
//! the transport exchange, the fd swap, and fallback.
//!
//! - `listen` on a socket whose policy allows SDP publishes a beacon for its address; the
//!   progress thread answers clients that probe it and records their intents.
//! - `connect` probes the beacon of the destination (a plain server has none: TCP, reason
//!   `no-beacon`), binds its per-connection endpoint, swaps the fd onto an app end with the
//!   connection pending, and makes the real TCP connect on the shadow. It never waits for the
//!   server application.
//! - `accept` takes the kernel's connection, finds the client's intent by its 4-tuple, runs
//!   the exchange (SDP Hello/HelloAck, shared memory and bells by SCM_RIGHTS) with the client's
//!   progress thread, swaps the fd and returns. No intent: a plain TCP client.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fallback::Reason;
use ib_verbs::shm::{Active, Beacon, BeaconLink, Endpoint, Intent, Passive, ShmOptions};
use ib_verbs::sys::Fd;

use super::data::CResult;
use super::sdp::{self, SdpShm};
use super::{Conn, Inner, Phase, bind_fd, new_pair};
use crate::fdtable::{self, Decision, Meta};
use crate::progress::{self, Task};
use crate::stats::{Row, Transport};
use crate::{log, sdp_log, sys};

/// How long a bootstrap step may wait for the other library (never for the application).
pub(super) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);

fn shm_options() -> ShmOptions {
    let c = sdp::config();
    ShmOptions {
        recv_depth: u32::from(c.recv_buffers).max(64),
        recv_buf_size: c.recv_buffer_size,
        timeout: EXCHANGE_TIMEOUT,
        ..ShmOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics rows of sockets that stay on TCP (offloaded ones own theirs in `Inner`).

/// Indexed by fd (descriptors are small and dense): a program that stays on TCP pays a slot
/// of 16 bytes per descriptor, not a hash table entry per socket.
static TCP_ROWS: Mutex<Vec<Option<Row>>> = Mutex::new(Vec::new());

/// Records a stream socket that is (or stays) on kernel TCP, with the reason.
pub fn record_tcp(fd: i32, role: u8, reason: Reason) {
    let Some(row) = Row::claim(fd, Transport::Tcp, role) else {
        return;
    };
    // The 4-tuple of a kernel socket is the kernel's: `sdp stat` reads it from procfs when it
    // shows the row, so a TCP connection pays no system call here (pass-through overhead).
    row.set_meta(Transport::Tcp, 1, role, reason.code());
    crate::log::note_tcp(fd, reason);
    let Ok(i) = usize::try_from(fd) else { return };
    let mut g = TCP_ROWS.lock().unwrap_or_else(|p| p.into_inner());
    if g.len() <= i {
        g.resize_with(i + 1, || None);
    }
    g[i] = Some(row);
}

pub fn forget_tcp(fd: i32) {
    let Ok(i) = usize::try_from(fd) else { return };
    let mut g = TCP_ROWS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(row) = g.get_mut(i).and_then(Option::take)
        && !row.is_ours()
    {
        // A row inherited across fork is the parent's to free.
        std::mem::forget(row);
    }
}

fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        _ => a,
    }
}

// ---------------------------------------------------------------------------------------------
// Listen replication.

struct BeaconTask {
    beacon: Beacon,
}

impl BeaconTask {
    /// Records the intents of every client queued on the beacon.
    fn drain(&self, read_timeout: Duration) {
        // INVARIANT: accepting a visitor and recording its intent happen under one lock, so an
        // `accept` that drains inline never misses an intent another thread has taken off the
        // beacon but not yet recorded.
        static DRAINING: Mutex<()> = Mutex::new(());
        let _g = DRAINING.lock().unwrap_or_else(|p| p.into_inner());
        while let Ok(Some(visitor)) = self.beacon.accept() {
            let cred = visitor.cred();
            if let Ok((intent, offer)) = visitor.read_intent(read_timeout) {
                // INVARIANT: the intent is recorded before the client hears "yes" (a client
                // that waits for it connects only after).
                let recorded = super::intents::insert(&intent, &offer, cred.uid, cred.pid);
                // A full table: decline (the client stays TCP) rather than strand it pending.
                let _ = visitor.reply(recorded);
            }
        }
    }
}

impl Task for BeaconTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        self.drain(Duration::from_millis(200));
    }
}

/// Every beacon this process serves, for `accept` to drain inline (see [`accept`]).
static BEACON_TASKS: Mutex<Vec<Weak<BeaconTask>>> = Mutex::new(Vec::new());

/// Drains our beacons in the calling thread: a client queues its intent on the beacon before
/// its TCP connect, so after this the intent of a connection we just accepted is recorded.
fn drain_beacons_inline() {
    let tasks: Vec<Arc<BeaconTask>> = {
        let mut g = BEACON_TASKS.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|w| w.strong_count() > 0);
        g.iter().filter_map(Weak::upgrade).collect()
    };
    for t in tasks {
        t.drain(Duration::from_millis(20));
    }
}

/// Whether this process (or the process it was forked from) published a beacon on `port`:
/// only then can an intent for a connection to that port reach our intent table.
fn serves_beacon_on(port: u16) -> bool {
    let g = BEACON_TASKS.lock().unwrap_or_else(|p| p.into_inner());
    g.iter()
        .filter_map(Weak::upgrade)
        .any(|t| t.beacon.addr().port() == port)
}

static BEACONS: Mutex<Option<HashMap<i32, u64>>> = Mutex::new(None);

/// After a successful `listen` whose server decision allows SDP: publish the beacon.
pub fn on_listen(fd: i32, decision: Decision) {
    if decision == Decision::Tcp {
        record_tcp(fd, 2, Reason::Policy);
        return;
    }
    let Some(addr) = sys::sockname(fd) else {
        return;
    };
    super::intents::init();
    match Beacon::publish(normalize(addr)) {
        Ok(beacon) => {
            let bfd = beacon.fd();
            let task = Arc::new(BeaconTask { beacon });
            BEACON_TASKS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Arc::downgrade(&task));
            if let Some(token) = progress::register(bfd, libc::EPOLLIN as u32, task) {
                let mut g = BEACONS.lock().unwrap_or_else(|p| p.into_inner());
                g.get_or_insert_with(HashMap::new).insert(fd, token);
            }
            sdp_log!(log::DECISION, "listen fd {fd} {addr}: beacon published");
        }
        // Another process (a forked sibling, an SO_REUSEPORT group member) publishes it.
        Err(e) => sdp_log!(
            log::DECISION,
            "listen fd {fd} {addr}: no beacon of ours: {e}"
        ),
    }
    super::rdma::on_listen(fd, normalize(addr));
    record_tcp(fd, 2, Reason::Offloaded);
}

/// A listening fd is closed: its beacon goes with it (inherited copies in other processes
/// keep theirs).
pub fn on_listener_close(fd: i32) {
    let token = {
        let mut g = BEACONS.lock().unwrap_or_else(|p| p.into_inner());
        g.as_mut().and_then(|m| m.remove(&fd))
    };
    if let Some(t) = token {
        progress::unregister(t);
    }
    super::rdma::on_listener_close(fd);
}

// ---------------------------------------------------------------------------------------------
// Discovery helpers.

/// Whether `ip` is an address of this host (the `shm` transport only reaches those).
fn is_local(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return is_local(IpAddr::V4(v4));
    }
    static CACHE: Mutex<Option<(Instant, Vec<IpAddr>)>> = Mutex::new(None);
    if let Some(g) = try_lock(&CACHE)
        && let Some((t, v)) = g.as_ref()
        && t.elapsed() < Duration::from_secs(2)
    {
        return v.contains(&ip);
    }
    let v = local_addrs();
    let local = v.contains(&ip);
    if let Some(mut g) = try_lock(&CACHE) {
        *g = Some((Instant::now(), v));
    }
    local
}

/// A cache's lock, never waited for. INVARIANT: a fork while another thread holds such a lock
/// leaves it locked forever in the child, whose connects must still work (uncached); and the
/// slow lookups a cache saves (getifaddrs, procfs) run outside the lock.
fn try_lock<T>(m: &Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

fn local_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifa: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below; we only read entries it filled.
    unsafe {
        if libc::getifaddrs(&mut ifa) != 0 {
            return out;
        }
        let mut p = ifa;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                let len = match (*a).sa_family as i32 {
                    libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
                    libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
                    _ => 0,
                };
                if len > 0
                    && let Some(sa) = sys::sockaddr_to_std(a, len as libc::socklen_t)
                {
                    out.push(sa.ip());
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifa);
    }
    out
}

/// Owners of the kernel listener for `addr`, cached for a second (procfs is not cheap).
fn listener_uids(addr: &SocketAddr) -> Vec<u32> {
    type Cache = HashMap<SocketAddr, (Instant, Vec<u32>)>;
    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
    if let Some(g) = try_lock(&CACHE)
        && let Some((t, v)) = g.as_ref().and_then(|m| m.get(addr))
        && t.elapsed() < Duration::from_secs(1)
        && !v.is_empty()
    {
        return v.clone();
    }
    let v = ib_verbs::shm::beacon::tcp_listener_uids(addr);
    if let Some(mut g) = try_lock(&CACHE) {
        g.get_or_insert_with(HashMap::new)
            .insert(*addr, (Instant::now(), v.clone()));
    }
    v
}

/// Beacon names that may stand for `dst`: its own, then the wildcards that cover it.
fn beacon_candidates(dst: SocketAddr) -> Vec<SocketAddr> {
    let p = dst.port();
    let mut v = vec![dst];
    match dst.ip() {
        IpAddr::V4(_) => {
            v.push(SocketAddr::new(
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                p,
            ));
            v.push(SocketAddr::new(
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                p,
            ));
        }
        IpAddr::V6(_) => v.push(SocketAddr::new(
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            p,
        )),
    }
    v
}

fn probe_reason(e: &ib_verbs::shm::ProbeError) -> Reason {
    use ib_verbs::shm::ProbeError as P;
    match e {
        P::NoBeacon => Reason::NoBeacon,
        P::NoKernelListener | P::OwnerMismatch { .. } => Reason::BeaconNotTrusted,
        P::Declined => Reason::PeerDeclined,
        P::Protocol(_) | P::Timeout | P::Sys(_) => Reason::SetupFailed,
    }
}

// ---------------------------------------------------------------------------------------------
// Client side.

/// What `connect` does with a stream socket whose client decision allows SDP.
pub enum ConnectPlan {
    /// Make the real connect on the fd (TCP), after recording `reason`.
    Tcp(Reason),
    /// The call is complete.
    Done(CResult),
}

pub(super) fn raw_connect(fd: i32, dst: &SocketAddr) -> Result<(), i32> {
    let (ss, len) = sockaddr_of(dst);
    // SAFETY: ss holds a sockaddr of `len` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_connect, fd, &ss as *const _, len) };
    if rc == 0 { Ok(()) } else { Err(sys::errno()) }
}

pub(super) fn raw_bind(fd: i32, a: &SocketAddr) -> Result<(), i32> {
    let (ss, len) = sockaddr_of(a);
    // SAFETY: as in raw_connect.
    let rc = unsafe { libc::syscall(libc::SYS_bind, fd, &ss as *const _, len) };
    if rc == 0 { Ok(()) } else { Err(sys::errno()) }
}

/// Binds socket `fd`, unbound at `local`, to `src` with a port of the kernel's choosing, in
/// the socket's own family (an IPv4 source on an AF_INET6 socket as `::ffff:a.b.c.d`), and
/// returns its local address: the connection's 4-tuple is known before its connect.
pub(super) fn bind_to_source(
    fd: i32,
    local: SocketAddr,
    src: IpAddr,
) -> Result<SocketAddr, Reason> {
    let want = match (src, local) {
        (IpAddr::V4(v4), SocketAddr::V6(_)) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), 0),
        _ => SocketAddr::new(src, 0),
    };
    raw_bind(fd, &want).map_err(|_| Reason::Exhausted)?;
    sys::sockname(fd).ok_or(Reason::NotOffloadable)
}

pub(crate) fn sockaddr_of(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A client's connect going offloaded: the fd is swapped onto the app end of (`app`, `bell`)
/// and the connection, **pending** until the transport's exchange finishes, is registered
/// with its statistics row and its stray-byte watch. Returns it and the shadow (the TCP
/// socket, to connect). On failure both ends are closed and the fd is untouched.
pub(super) fn pending_client(
    fd: i32,
    app: i32,
    bell: i32,
    client: SocketAddr,
    dst: SocketAddr,
    transport: Transport,
) -> Result<(Arc<Conn>, i32), Reason> {
    // The swap: from here the fd is the app end; the TCP socket is the shadow.
    let nonblock = fcntl(fd, libc::F_GETFL, 0) & libc::O_NONBLOCK != 0;
    let cloexec = fcntl(fd, libc::F_GETFD, 0) & libc::FD_CLOEXEC != 0;
    let Ok(shadow) = swap_in(fd, app, nonblock, cloexec) else {
        sys::close(app);
        sys::close(bell);
        return Err(Reason::Exhausted);
    };
    let conn = register(
        Phase::Pending {
            sendbuf: Vec::new(),
            shut_wr: false,
        },
        Swapped {
            fd,
            shadow,
            app,
            bell,
        },
        (client, dst),
        transport,
        1,
    );
    Ok((conn, shadow))
}

/// An fd swapped onto the app end of (`app`, `bell`), its kernel socket now `shadow`.
struct Swapped {
    fd: i32,
    shadow: i32,
    app: i32,
    bell: i32,
}

/// A connection whose fd was just swapped, in `phase`, made known: its statistics row (`role`
/// 1 client, 2 server; addresses (local, peer)), the registry, and the stray-byte watch.
fn register(
    phase: Phase,
    sw: Swapped,
    (local, peer): (SocketAddr, SocketAddr),
    transport: Transport,
    role: u8,
) -> Arc<Conn> {
    let row = Row::claim(sw.fd, transport, role);
    if let Some(r) = &row {
        r.set_addrs(Some(local), Some(peer));
    }
    let conn = Conn::new(Inner::new(
        phase,
        sw.shadow,
        sw.app,
        sw.bell,
        sw.fd,
        Some(local),
        Some(peer),
        row,
        role,
    ));
    bind_fd(sw.fd, &conn);
    let stray = watch_stray(&conn, sw.bell);
    conn.lock().stray = stray;
    conn
}

pub(super) fn fcntl(fd: i32, cmd: i32, arg: i64) -> i32 {
    // SAFETY: fcntl on an fd number with an integer argument.
    unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, arg) as i32 }
}

/// Moves the fd number `fd` from its current kernel object onto the app end `app`, keeping
/// the fd's close-on-exec flag and the file's O_NONBLOCK. Returns the shadow (the old object,
/// moved high).
pub(super) fn swap_in(fd: i32, app: i32, nonblock: bool, cloexec: bool) -> Result<i32, i32> {
    let shadow = sys::dup_internal(fd);
    if shadow < 0 {
        return Err(sys::errno());
    }
    let fl = fcntl(app, libc::F_GETFL, 0);
    fcntl(
        app,
        libc::F_SETFL,
        if nonblock {
            (fl | libc::O_NONBLOCK) as i64
        } else {
            (fl & !libc::O_NONBLOCK) as i64
        },
    );
    // Blocking calls block on the app end, so the timeouts set before `connect` (or inherited
    // from the listener by `accept`) go with it. Until 2026-11-27 they stayed on the shadow:
    // a receive or send waited for ever, and getsockopt said 0.
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        let mut tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        };
        let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        // SAFETY: valid pointers for one timeval, on our own fds.
        unsafe {
            if libc::syscall(
                libc::SYS_getsockopt,
                fd,
                libc::SOL_SOCKET,
                opt,
                &mut tv as *mut libc::timeval,
                &mut len as *mut libc::socklen_t,
            ) == 0
                && (tv.tv_sec != 0 || tv.tv_usec != 0)
            {
                libc::syscall(
                    libc::SYS_setsockopt,
                    app,
                    libc::SOL_SOCKET,
                    opt,
                    &tv as *const libc::timeval,
                    len,
                );
            }
        }
    }
    // SAFETY: dup3 replaces fd atomically: no instant exists where the number is free.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_dup3,
            app,
            fd,
            if cloexec { libc::O_CLOEXEC } else { 0 },
        )
    };
    if rc < 0 {
        let e = sys::errno();
        sys::close(shadow);
        return Err(e);
    }
    Ok(shadow)
}

fn dup_fd(fd: i32) -> Option<Fd> {
    Fd::from_raw(sys::dup_internal(fd))
}

/// `connect` of a tracked stream socket whose decision is `sdp` or `both`.
pub fn connect(fd: i32, dst: SocketAddr, decision: Decision) -> ConnectPlan {
    match try_connect(fd, normalize(dst), dst, decision) {
        Ok(r) => ConnectPlan::Done(r),
        Err(reason) => match fallback::on_connect_failure(mode(decision), reason) {
            fallback::Action::UseTcp(r) => ConnectPlan::Tcp(r),
            fallback::Action::Fail(e) => {
                ConnectPlan::Done(Err(log::connect_refused(fd, dst, reason, e)))
            }
        },
    }
}

fn mode(d: Decision) -> fallback::Mode {
    match d {
        Decision::Sdp => fallback::Mode::Sdp,
        Decision::Tcp => fallback::Mode::Tcp,
        Decision::Both => fallback::Mode::Both,
    }
}

/// `dst` is the destination as a std address (an IPv4-mapped IPv6 one made IPv4), `asked`
/// as the program gave it: the kernel's connect takes that one (an AF_INET6 socket refuses an
/// AF_INET address with EINVAL; Java connects every IPv4 peer through `::ffff:a.b.c.d`).
fn try_connect(
    fd: i32,
    dst: SocketAddr,
    asked: SocketAddr,
    _decision: Decision,
) -> Result<CResult, Reason> {
    if !progress::ready() {
        return Err(Reason::Exhausted);
    }
    if !is_local(dst.ip()) || super::rdma::local_wanted() {
        // Another host (or this one with LIBSDP_TRANSPORT=rdma): SDP over rdma when this
        // process has a device (never on a host without one: the gate does not even load
        // libibverbs there). This host without a device: shm.
        use super::rdma::Availability;
        match super::rdma::availability() {
            Availability::Yes => return super::rdma::try_connect(fd, dst, asked),
            Availability::NotNow => return Err(Reason::Exhausted),
            Availability::No if !is_local(dst.ip()) => return Err(Reason::NoDevice),
            Availability::No => {}
        }
    }
    // Learn the 4-tuple before the connect: bind to the source address the kernel would pick
    // (the route's; 127.0.0.1 for any 127.x destination) if the program did not bind. Binding
    // to the destination's own address instead made a client of 127.0.0.5 appear to its
    // server as 127.0.0.5, not 127.0.0.1: address-based access rules (pg_hba.conf, an
    // nginx `allow`) judged it as another host.
    let mut local = sys::sockname(fd).ok_or(Reason::NotOffloadable)?;
    if local.port() == 0 {
        let src = sys::route_source(dst.ip()).unwrap_or(dst.ip());
        local = bind_to_source(fd, local, src)?;
    }
    let client = if local.ip().is_unspecified() {
        SocketAddr::new(dst.ip(), local.port())
    } else {
        normalize(local)
    };
    let intent = Intent::new(client, dst).map_err(|_| Reason::Exhausted)?;

    // The Offer (no descriptor yet) is made first, so that it goes with the intent the instant
    // we reach a beacon: its owner's progress thread, woken by our connect, then finds both at
    // once (it neither waits for them nor holds the visitor's descriptor meanwhile). The
    // server answers as soon as it reaches our endpoint (one round trip fewer than an Offer on
    // the endpoint stream); our bell end follows with the Ready.
    let mut active = Active::unpaired(shm_options()).map_err(|_| Reason::Exhausted)?;
    // Kept rings are named only to the server they served (see `ib_verbs::shm::reuse`).
    active.set_reuse_scope({
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(normalize(dst))
    });
    let addrs = match (client.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sdp_proto::wire::IpAddrs::V4 { src: s, dst: d },
        (s, d) => sdp_proto::wire::IpAddrs::V6 {
            src: match s {
                IpAddr::V6(v) => v,
                IpAddr::V4(v) => v.to_ipv6_mapped(),
            },
            dst: match d {
                IpAddr::V6(v) => v,
                IpAddr::V4(v) => v.to_ipv6_mapped(),
            },
        },
    };
    let mut engine =
        sdp_proto::Connection::connect(sdp::config(), sdp::now(), addrs, client.port());
    let mut wr = 0u64;
    while let Some(p) = engine.poll_post_recv() {
        for _ in 0..p.count {
            wr += 1;
            let _ = active.post_recv(wr);
        }
    }
    let offer = active
        .early_offer(&engine.hello())
        .map_err(|_| Reason::SetupFailed)?;

    // Discovery: the first beacon that answers for the destination takes the intent.
    let uids = listener_uids(&dst);
    let mut last = Reason::NoBeacon;
    let mut registered = false;
    for cand in beacon_candidates(dst) {
        match BeaconLink::open(&cand, &uids) {
            Ok(link) => {
                let probe_intent = Intent {
                    server: cand,
                    ..intent
                };
                match link.register(&probe_intent, &offer) {
                    Ok(()) => registered = true,
                    Err(e) => last = probe_reason(&e),
                }
                break;
            }
            Err(ib_verbs::shm::ProbeError::NoBeacon) => {}
            Err(e) => {
                last = probe_reason(&e);
                break;
            }
        }
    }
    // An authenticated beacon took the intent (the nonce, not its uid, authenticates the
    // accepting process later: see `Endpoint::accept`).
    if !registered {
        return Err(last);
    }

    let endpoint = Endpoint::bind(&intent).map_err(|_| Reason::SetupFailed)?;
    let (app, bell) = new_pair().map_err(|_| Reason::Exhausted)?;
    let (Some(app_dup), Some(bell_dup)) = (dup_fd(app), dup_fd(bell)) else {
        sys::close(app);
        sys::close(bell);
        return Err(Reason::Exhausted);
    };
    if active.attach_pair(app_dup, bell_dup).is_err() {
        sys::close(app);
        sys::close(bell);
        return Err(Reason::Exhausted);
    }

    let (conn, shadow) = pending_client(fd, app, bell, client, dst, Transport::Shm)?;
    let efd = endpoint.fd();
    let task = Arc::new(EndpointTask {
        endpoint,
        intent,
        setup: Mutex::new(Some((active, engine))),
        conn: Arc::downgrade(&conn),
        token: Mutex::new(None),
    });
    let token = progress::register(efd, libc::EPOLLIN as u32, task.clone());
    *task.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
    conn.lock().endpoint = token;

    // The real TCP connect, on the shadow (same open file: same blocking mode and timeouts).
    let result = raw_connect(shadow, &asked);
    if matches!(result, Ok(()) | Err(libc::EINPROGRESS)) {
        // LINUX: an unconnected TCP socket polls HUP, so the watch starts only now.
        let pending_watch = watch_pending(&conn, shadow);
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
            // Fail exactly as TCP: put the kernel socket back under the fd number.
            if let Some(t) = token {
                progress::unregister(t);
            }
            log::connect_failed(fd, dst, e);
            swap_back(&conn);
            Ok(Err(e))
        }
    }
}

/// How long a client waits for the server's library to run the exchange before it concludes
/// that the accepting process does not speak SDP for this connection (a forked or exec'd
/// acceptor that never saw the intent) and goes back to TCP.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a client waits for a server application that has not accepted its connection
/// yet: below the 30 s after which the server's library forgets the intent.
const PENDING_ACCEPT_LIMIT: Duration = Duration::from_secs(24);

/// Watches a pending client connection: TCP bytes or a FIN from the server on the shadow (the
/// server treats the connection as plain TCP), or the timeout, send it back to TCP. The
/// timeout counts from the server application's `accept`: while the connection still waits
/// in the listener's accept queue (a busy server, a burst of connections), the timer is
/// re-armed, up to [`PENDING_ACCEPT_LIMIT`], as a kernel TCP connection would wait there.
struct PendingTask {
    conn: Weak<Conn>,
    started: Instant,
    /// 0: never seen in the accept queue; 1: seen there (the timer was re-armed); 2: seen
    /// accepted after that, and given one more `PENDING_TIMEOUT` for the exchange; 3: a
    /// remote server's rdma setup was redirected, and given one more `PENDING_TIMEOUT`.
    queued: std::sync::atomic::AtomicU8,
}

impl Task for PendingTask {
    fn on_event(&self, fd: i32, _events: u32) {
        let Some(conn) = self.conn.upgrade() else {
            return;
        };
        let mut g = conn.lock();
        if matches!(g.phase, Phase::Pending { .. }) {
            if fd == progress::TIMER
                && let (Some(local), Some(peer)) = (g.local, g.peer)
            {
                use std::sync::atomic::Ordering::Relaxed;
                // The server may have accepted just before this expiry: once it has been seen
                // in the queue, it gets a whole PENDING_TIMEOUT after its accept.
                let rearm = match sys::tcp_accepted(local, peer) {
                    Some(false) if self.started.elapsed() < PENDING_ACCEPT_LIMIT => {
                        self.queued.store(1, Relaxed);
                        true
                    }
                    Some(true) => self.queued.compare_exchange(1, 2, Relaxed, Relaxed).is_ok(),
                    // A server on another host, whose library redirected the setup to its
                    // worker (a slow host may need more than one PENDING_TIMEOUT for that).
                    None if g.setup_redirected => {
                        self.queued.compare_exchange(0, 3, Relaxed, Relaxed).is_ok()
                    }
                    _ => false,
                };
                if rearm {
                    let again = Arc::new(PendingTask {
                        conn: self.conn.clone(),
                        started: self.started,
                        queued: std::sync::atomic::AtomicU8::new(self.queued.load(Relaxed)),
                    });
                    if let Some(t) = progress::at(Instant::now() + PENDING_TIMEOUT, again) {
                        g.pending_watch.push(t);
                    }
                    return;
                }
            }
            let why = if fd == progress::TIMER {
                "no SDP exchange in time"
            } else {
                "the server spoke TCP"
            };
            sdp_log!(
                log::DECISION,
                "pending connection to {:?}: {why}; TCP",
                g.peer
            );
            swap_back_locked(&mut g);
        }
    }
}

pub(super) fn watch_pending(conn: &Arc<Conn>, shadow: i32) -> Vec<u64> {
    let mut tokens = Vec::new();
    let task: Arc<dyn Task> = Arc::new(PendingTask {
        conn: Arc::downgrade(conn),
        started: Instant::now(),
        queued: std::sync::atomic::AtomicU8::new(0),
    });
    if let Some(t) = progress::register(
        shadow,
        (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        Arc::clone(&task),
    ) {
        tokens.push(t);
    }
    if let Some(t) = progress::at(Instant::now() + PENDING_TIMEOUT, task) {
        tokens.push(t);
    }
    tokens
}

/// The client's half of the exchange, run by the progress thread when the server's library
/// connects to our endpoint.
struct EndpointTask {
    endpoint: Endpoint,
    intent: Intent,
    setup: Mutex<Option<(Active, sdp_proto::Connection)>>,
    conn: Weak<Conn>,
    token: Mutex<Option<u64>>,
}

impl Task for EndpointTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        let Some(conn) = self.conn.upgrade() else {
            self.done();
            return;
        };
        let stream = match self
            .endpoint
            .accept(&self.intent, Duration::from_millis(300))
        {
            Ok((s, _)) => s,
            Err(ib_verbs::shm::ProbeError::Declined) => {
                // The process that accepted our connection has no intent for it (another
                // process's beacon took it: SO_REUSEPORT listeners): TCP now.
                self.done();
                let mut g = conn.lock();
                if matches!(g.phase, Phase::Pending { .. }) {
                    g.endpoint = None;
                    sdp_log!(
                        log::DECISION,
                        "pending connection to {:?}: the accepting process has no intent for it; TCP",
                        g.peer
                    );
                    swap_back_because(&mut g, Reason::PeerDeclined);
                }
                return;
            }
            Err(_) => return, // an impostor or a spurious wake: keep waiting
        };
        let Some((active, mut engine)) =
            self.setup.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return;
        };
        self.done();
        // INVARIANT: the exchange runs under the connection's lock, so that a fork (which
        // resolves pending connections first) or a fallback never sees it half done; and only
        // a still-pending connection completes it (dropping the stream tells the server to
        // keep TCP).
        let mut g = conn.lock();
        if !matches!(g.phase, Phase::Pending { .. }) {
            return;
        }
        g.endpoint = None;
        let result = active
            .finish(&stream)
            .map_err(|e| e.to_string())
            .and_then(|(shm, ack)| {
                engine
                    .handle_hello_ack(sdp::now(), &ack)
                    .map_err(|e| format!("{e:?}"))?;
                Ok(shm)
            });
        match result {
            Ok(shm) => become_offloaded(&conn, &mut g, SdpShm::new(engine, shm)),
            Err(e) => {
                sdp_log!(
                    log::WARN,
                    "SDP exchange failed ({e}); connection continues over TCP"
                );
                swap_back_locked(&mut g);
            }
        }
    }
}

impl EndpointTask {
    fn done(&self) {
        if let Some(t) = self.token.lock().unwrap_or_else(|p| p.into_inner()).take() {
            progress::unregister(t);
        }
    }
}

/// Pending → offloaded: the bytes the application already sent go first.
fn become_offloaded(conn: &Arc<Conn>, g: &mut Inner, s: SdpShm) {
    let peer_bell = s_peer_bell(&s);
    if !install_stream(g, Box::new(s)) {
        return;
    }
    g.watch = watch_peer(conn, peer_bell);
    g.sync();
    // SO_OOBINLINE and buffer sizes set before connect are on the shadow.
    super::keepalive::apply_set_before(g);
    log::resolved(g, None);
}

/// Pending → offloaded, for every transport: the stream takes the connection, the bytes the
/// application sent while pending go first (what the engine does not take at once waits in
/// `side_buf` for the next sync), and a shutdown made while pending follows them. `false`
/// (the stream dropped): the connection was no longer pending.
pub(super) fn install_stream(
    g: &mut Inner,
    mut stream: Box<dyn super::stream::OffloadStream>,
) -> bool {
    let (buf, shut) = match std::mem::replace(&mut g.phase, Phase::Tcp) {
        Phase::Pending { sendbuf, shut_wr } => (sendbuf, shut_wr),
        other => {
            g.phase = other;
            return false;
        }
    };
    let mut off = 0;
    while off < buf.len() {
        match stream.send(&[&buf[off..]], false) {
            Ok(n) if n > 0 => off += n,
            _ => break,
        }
    }
    if off < buf.len() {
        g.side_buf.extend_from_slice(&buf[off..]);
    }
    g.clear_pending_watch();
    if shut {
        stream.shutdown_write();
        g.half_close_app_end(stream.transport());
    }
    if g.every_arrival {
        stream.set_every_arrival(true);
    }
    g.phase = Phase::Offloaded(stream);
    g.note_phase();
    true
}

fn s_peer_bell(s: &SdpShm) -> i32 {
    s.peer_bell()
}

/// The progress thread's watch on the peer's bell end: its hang-up is the peer's end.
struct PeerTask {
    conn: Weak<Conn>,
}

impl Task for PeerTask {
    fn on_event(&self, _fd: i32, events: u32) {
        // LINUX: the peer's half-close (shutdown of its app end's writing) shows as RDHUP on
        // its bell end; only HUP (every copy of its app end closed) is the peer's end.
        if events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 == 0 {
            return;
        }
        let Some(conn) = self.conn.upgrade() else {
            return;
        };
        let mut g = conn.lock();
        if let Some(t) = g.watch.take() {
            progress::unregister(t);
        }
        if !g.is_current() {
            return; // the process that serves the connection now sees it too
        }
        let mut reset = false;
        if let Phase::Offloaded(s) = &mut g.phase {
            s.peer_gone();
            reset = s.error() == Some(libc::ECONNRESET);
        }
        // The app end's readiness first: a poller woken by the HUP below must find OUT too.
        g.sync();
        if reset && g.app_int >= 0 {
            // LINUX: a reset TCP socket polls HUP (both directions are shut).
            // SAFETY: our own copy of the app end.
            unsafe { libc::syscall(libc::SYS_shutdown, g.app_int, libc::SHUT_WR) };
        }
    }
}

/// The progress thread's watch on our own bell end: bytes the application wrote on the app
/// end through a path no hook sees (the C library's own stdio `write`, as bash's `echo >&fd`
/// does) arrive there; they are the application's data, and go out over SDP.
struct StrayTask {
    conn: Weak<Conn>,
}

impl Task for StrayTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        let Some(conn) = self.conn.upgrade() else {
            return;
        };
        let mut g = conn.lock();
        if !g.is_current() {
            return; // another process (forked from ours) serves the connection now
        }
        g.take_stray_bytes();
        g.sync();
    }
}

/// Starts watching for stray writes (see [`StrayTask`]) and for room returning to a stuffed
/// writer (see [`SendTask`]); returns both registrations.
pub fn watch_stray(conn: &Arc<Conn>, own_bell: i32) -> Option<u64> {
    conn.lock().self_ref = Arc::downgrade(conn);
    progress::register(
        own_bell,
        (libc::EPOLLIN | libc::EPOLLET) as u32,
        Arc::new(StrayTask {
            conn: Arc::downgrade(conn),
        }),
    )
}

/// Ticks a connection whose bytes wait for credits (see `Inner::sync_flush_timer`).
struct FlushTask {
    conn: Weak<Conn>,
    timer: i32,
}

impl Task for FlushTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        let mut buf = [0u8; 8];
        // SAFETY: reading the timerfd's expiry count into 8 bytes.
        unsafe { libc::syscall(libc::SYS_read, self.timer, buf.as_mut_ptr(), 8usize) };
        sync_if_serving(&self.conn);
    }
}

/// Starts the watch that moves queued sends when room returns (see [`SendTask`]); made when a
/// writer first runs out of room, not for every connection.
pub(crate) fn watch_send(conn: Weak<Conn>, app_int: i32) -> Option<u64> {
    progress::register(
        app_int,
        (libc::EPOLLOUT | libc::EPOLLET) as u32,
        Arc::new(SendTask { conn }),
    )
}

/// Creates the (disarmed) timer that ticks a connection while bytes wait for credits (see
/// [`FlushTask`]); made when bytes first wait, not for every connection.
pub(crate) fn flush_timer(conn: Weak<Conn>) -> Option<(i32, Option<u64>)> {
    // SAFETY: a timerfd of our own, created disarmed.
    let tfd = unsafe {
        libc::syscall(
            libc::SYS_timerfd_create,
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    } as i32;
    if tfd < 0 {
        return None;
    }
    let tfd = sys::move_high(tfd);
    let w = progress::register(
        tfd,
        libc::EPOLLIN as u32,
        Arc::new(FlushTask { conn, timer: tfd }),
    );
    Some((tfd, w))
}

/// A progress-thread tick of an offloaded connection this process serves.
fn sync_if_serving(conn: &Weak<Conn>) {
    let Some(conn) = conn.upgrade() else {
        return;
    };
    let mut g = conn.lock();
    if matches!(g.phase, Phase::Offloaded(_)) && g.is_current() {
        g.sync();
    }
}

/// Bytes queued for sending move on when the peer gives credits, even if the application
/// makes no call: the peer's credit drains our stuffing, our app end turns writable, and this
/// task (edge-triggered on that) transmits, as the kernel would for TCP.
struct SendTask {
    conn: Weak<Conn>,
}

impl Task for SendTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        sync_if_serving(&self.conn);
    }
}

fn watch_peer(conn: &Arc<Conn>, peer_bell: i32) -> Option<u64> {
    // No event asked for: epoll always reports HUP and ERR, the only news here. Asking for
    // RDHUP, which the peer's half-close raises for good on a level-triggered watch, woke the
    // progress thread without pause until the connection closed: a core spent on every
    // connection whose peer half-closed (`tests/lifetime.rs`,
    // `a_half_closed_connection_costs_no_cpu_while_idle`).
    progress::register(
        peer_bell,
        0,
        Arc::new(PeerTask {
            conn: Arc::downgrade(conn),
        }),
    )
}

/// The bits of an epoll registration's events that are flags, not events (the kernel keeps
/// only these when an EPOLLONESHOT registration fires).
const ONESHOT_FLAGS: u32 =
    (libc::EPOLLONESHOT | libc::EPOLLET | libc::EPOLLEXCLUSIVE) as u32 | libc::EPOLLWAKEUP as u32;

/// Whether `fd`'s EPOLLONESHOT registration in the set `epfd` fired and waits to be re-armed.
/// LINUX: `/proc/self/fdinfo/<epfd>` lists each registration as `tfd: <fd> events: <hex>
/// data: <hex> pos:<n> ino:<hex> ...`, and a fired one-shot registration keeps only its
/// flag bits there. The inode tells our registration from one of an older file the number
/// named (kept open by a duplicate). Unreadable or not listed: armed, as before.
fn epoll_fired_oneshot(epfd: i32, fd: i32) -> bool {
    // SAFETY: a plain C struct, all zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for the kernel to write.
    if unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) } != 0 {
        return false;
    }
    let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{epfd}")) else {
        return false;
    };
    oneshot_fired_in(&info, fd, st.st_ino)
}

/// [`epoll_fired_oneshot`] on the text of an epoll set's fdinfo.
fn oneshot_fired_in(info: &str, fd: i32, ino: u64) -> bool {
    info.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some("tfd:")
            && w.next().and_then(|t| t.parse::<i32>().ok()) == Some(fd)
            && w.next() == Some("events:")
            && w.next()
                .and_then(|e| u32::from_str_radix(e, 16).ok())
                .is_some_and(|e| e & libc::EPOLLONESHOT as u32 != 0 && e & !ONESHOT_FLAGS == 0)
            && w.any(|f| {
                f.strip_prefix("ino:")
                    .and_then(|i| u64::from_str_radix(i, 16).ok())
                    == Some(ino)
            })
    })
}

/// Pending → TCP: every fd number of the connection names the shadow again; the bytes the
/// application sent meanwhile go out on TCP first.
pub fn swap_back(conn: &Arc<Conn>) {
    let mut g = conn.lock();
    swap_back_locked(&mut g);
}

/// [`swap_back`] with the lock held.
pub fn swap_back_locked(g: &mut Inner) {
    swap_back_because(g, Reason::SetupFailed);
}

/// [`swap_back_locked`], recording `reason` (the rdma setup: no listener there is `no-beacon`).
pub fn swap_back_because(g: &mut Inner, reason: Reason) {
    for &fd in &g.app_fds {
        super::lazy::flush_fd(fd);
    }
    if let Some(t) = g.endpoint.take() {
        progress::unregister(t);
    }
    g.clear_pending_watch();
    let (buf, shut_wr) = match std::mem::replace(&mut g.phase, Phase::Tcp) {
        Phase::Pending { sendbuf, shut_wr } => (sendbuf, shut_wr),
        other => {
            g.phase = other;
            return;
        }
    };
    let fds = g.app_fds.clone();
    // The bytes the application wrote while pending go first, and its half-closes after them,
    // while the fd numbers still name the app end: a call on them waits for this lock, so no
    // byte of the application's can overtake them on the socket. (Until 2026-11-27 they went
    // after the swap: a write woken by the moved epoll registration could go first, and a
    // shutdown made while pending was forgotten: the server never saw end of stream.)
    send_pending_bytes(g.shadow, &buf);
    for (shut, how) in [(shut_wr, libc::SHUT_WR), (g.shut_rd, libc::SHUT_RD)] {
        if shut {
            // SAFETY: our own socket.
            unsafe { libc::syscall(libc::SYS_shutdown, g.shadow, how) };
        }
    }
    let app_nonblock = g.app_int >= 0 && fcntl(g.app_int, libc::F_GETFL, 0) & libc::O_NONBLOCK != 0;
    let fl = fcntl(g.shadow, libc::F_GETFL, 0);
    fcntl(
        g.shadow,
        libc::F_SETFL,
        if app_nonblock {
            (fl | libc::O_NONBLOCK) as i64
        } else {
            (fl & !libc::O_NONBLOCK) as i64
        },
    );
    // LINUX: an epoll registration belongs to the open file, not the fd number: take the
    // application's registrations off the app end before the swap, and put them on the kernel
    // socket after it, with the same events and data. An EPOLLONESHOT registration that fired
    // and was not re-armed yet stays disarmed: re-armed, a second thread of a server that
    // hands each event to one worker would get the fd its first is still serving.
    // Each read right before its registration's DEL: the application's `epoll_ctl` takes no
    // lock of ours, and a MOD that re-arms the registration between the read and the DEL is
    // lost (it comes back disarmed). The window is these two calls.
    let mut disarmed = Vec::with_capacity(g.epoll.len());
    for &(epfd, efd, events, _, _) in &g.epoll {
        disarmed.push(events & libc::EPOLLONESHOT as u32 != 0 && epoll_fired_oneshot(epfd, efd));
        // SAFETY: removing a registration the application made.
        unsafe {
            libc::syscall(
                libc::SYS_epoll_ctl,
                epfd,
                libc::EPOLL_CTL_DEL,
                efd,
                std::ptr::null_mut::<libc::epoll_event>(),
            )
        };
    }
    for &fd in &fds {
        let cloexec = fcntl(fd, libc::F_GETFD, 0) & libc::FD_CLOEXEC != 0;
        // SAFETY: atomically re-point the app's fd number at the kernel socket.
        unsafe {
            libc::syscall(
                libc::SYS_dup3,
                g.shadow,
                fd,
                if cloexec { libc::O_CLOEXEC } else { 0 },
            )
        };
        fdtable::update(fd, |m| Meta(m.0 & !Meta::OFFLOADED));
    }
    // Only now, with every fd number re-pointed: a `poll` that stops waiting in slices when
    // no connection is pending must not start its long wait on an app end about to go.
    g.note_phase();
    for (&(epfd, efd, events, data, _), &disarmed) in g.epoll.iter().zip(&disarmed) {
        // Disarmed: only the flags. The kernel adds EPOLLERR and EPOLLHUP to every
        // registration, so a reset can still report once; a fired registration reports
        // nothing (what no call can ask for).
        let events = if disarmed {
            events & ONESHOT_FLAGS
        } else {
            events
        };
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: re-adding the application's registration on the swapped fd.
        unsafe {
            libc::syscall(
                libc::SYS_epoll_ctl,
                epfd,
                libc::EPOLL_CTL_ADD,
                efd,
                &mut ev as *mut libc::epoll_event,
            )
        };
    }
    // Wake any thread blocked on the old app end: it retries and finds TCP.
    g.signal_eof();
    if let Some(r) = &g.row {
        r.set_meta(Transport::Tcp, 1, g.role, reason.code());
    }
    log::resolved(g, Some(reason));
}

/// Sends on the kernel socket the bytes an application wrote while its connection was
/// pending, every one of them: the application was told they were sent.
///
/// The progress thread runs this under the connection's lock, so it must not wait on the
/// server: the send buffer is first given room for all of them (SO_SNDBUF, then set back to
/// what it was), and they are queued without waiting, whatever the socket's mode. Only where
/// the system's limit (`wmem_max`) leaves too little room does the rest wait for the server.
/// Until 2026-11-27 this sent in the application's mode: a non-blocking socket dropped
/// what its buffer could not take at once (36 KiB of 256 arrived with SO_SNDBUF 16 KiB), and
/// a blocking one held the progress thread until the server read.
///
/// LINUX: a connection reset by the server (its listener closed, its process killed) reports
/// ECONNRESET to the application's next call; sending the buffered bytes now would consume
/// that error, so a reset shadow keeps them (TCP discards them too).
fn send_pending_bytes(shadow: i32, buf: &[u8]) {
    let mut pfd = libc::pollfd {
        fd: shadow,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::syscall(libc::SYS_poll, &mut pfd as *mut libc::pollfd, 1, 0) };
    if buf.is_empty() || pfd.revents & libc::POLLERR != 0 {
        return;
    }
    let mut off = send_some(shadow, buf, libc::MSG_DONTWAIT);
    if off < buf.len() {
        // As the kernel reports it: twice what was set.
        let was = sys::int_option(shadow, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0);
        // Room for the rest beside what is queued (the kernel doubles what it is given, and
        // counts its own overhead in it).
        let room = (buf.len() - off).saturating_add(was.max(0) as usize);
        sys::set_int_option(
            shadow,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            room.min(i32::MAX as usize) as i32,
        );
        off += send_some(shadow, &buf[off..], libc::MSG_DONTWAIT);
        if off < buf.len() {
            sdp_log!(
                log::WARN,
                "fd {shadow}: {} of {} pending bytes wait for the server to read (send buffer limit)",
                buf.len() - off,
                buf.len()
            );
            let fl = fcntl(shadow, libc::F_GETFL, 0);
            fcntl(shadow, libc::F_SETFL, (fl & !libc::O_NONBLOCK) as i64);
            off += send_some(shadow, &buf[off..], 0);
            fcntl(shadow, libc::F_SETFL, fl as i64);
            if off < buf.len() {
                // A timeout the application set (SO_SNDTIMEO), or the connection broke.
                sdp_log!(
                    log::ERROR,
                    "fd {shadow}: {} pending bytes could not be sent",
                    buf.len() - off
                );
            }
        }
        sys::set_int_option(shadow, libc::SOL_SOCKET, libc::SO_SNDBUF, (was / 2).max(1));
    }
}

/// `send` of `buf` on `shadow` until done or an error; MSG_NOSIGNAL: a broken connection
/// surfaces at the application's next call. Bytes sent.
fn send_some(shadow: i32, buf: &[u8], flags: i32) -> usize {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: a valid slice.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                shadow,
                buf[off..].as_ptr(),
                buf.len() - off,
                libc::MSG_NOSIGNAL | flags,
                std::ptr::null::<u8>(),
                0,
            )
        };
        if n < 0 && sys::errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break;
        }
        off += n as usize;
    }
    off
}

/// How long the last close, or the exit, of a pending connection may wait for the kernel to
/// take the bytes its application wrote (only a server that stopped reading makes it wait).
const PENDING_HANDOVER_LIMIT: Duration = Duration::from_secs(1);

/// A connection closed, or whose process exits, while it is still pending: the bytes its
/// application wrote go to the kernel's TCP connection, which delivers them after the close
/// as it would have without libsdp. The server, whose exchange then finds no client, keeps
/// TCP and reads them there (a completed exchange would have made the connection offloaded:
/// both run under the connection's lock). Before, they were dropped with the library's buffer.
pub(super) fn hand_pending_to_kernel(g: &mut Inner) {
    let buf = match &mut g.phase {
        Phase::Pending { sendbuf, .. } => std::mem::take(sendbuf),
        _ => return,
    };
    if buf.is_empty() || g.shadow < 0 {
        return;
    }
    // The socket is ours alone now (its last fd is being closed, or the process exits): room
    // in its send buffer for all of it, and a bounded blocking send.
    let fl = fcntl(g.shadow, libc::F_GETFL, 0);
    fcntl(g.shadow, libc::F_SETFL, (fl & !libc::O_NONBLOCK) as i64);
    let room = buf.len().min(i32::MAX as usize) as i32;
    let tv = libc::timeval {
        tv_sec: PENDING_HANDOVER_LIMIT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    sys::set_int_option(g.shadow, libc::SOL_SOCKET, libc::SO_SNDBUF, room);
    // SAFETY: setsockopt on our own socket with a value that lives across the call.
    unsafe {
        libc::syscall(
            libc::SYS_setsockopt,
            g.shadow,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const libc::timeval,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    send_pending_bytes(g.shadow, &buf);
    sdp_log!(
        log::DECISION,
        "fd {}: closed while pending; {} bytes handed to kernel TCP",
        g.app_fds.first().copied().unwrap_or(-1),
        buf.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Server side.

/// What became of an accepted connection.
pub enum AcceptOutcome {
    /// Hand the fd out as it is (TCP, or already swapped to SDP).
    Keep,
    /// The policy refuses this (plain TCP) client: close it and accept the next.
    Refuse,
}

/// After the real `accept`: the SDP exchange if the client registered for one.
pub fn accept(listener: i32, fd: i32, flags: i32) -> AcceptOutcome {
    progress::after_fork_lazy();
    let decision = fdtable::get(listener).decision().unwrap_or(Decision::Tcp);
    sdp_log!(
        log::TRACE,
        "accept fd {fd} on listener {listener}: decision {}",
        decision.as_str()
    );
    if decision == Decision::Tcp {
        record_tcp(fd, 2, Reason::Policy);
        return AcceptOutcome::Keep;
    }
    let (Some(local), Some(peer)) = (sys::sockname(fd), sys::peername(fd)) else {
        return AcceptOutcome::Keep;
    };
    if !progress::ready() {
        // No progress thread (no descriptor left for it): TCP, as for any exhausted resource;
        // an SDP client goes back to TCP when we speak TCP, or after its pending timeout.
        record_tcp(fd, 2, Reason::Exhausted);
        return AcceptOutcome::Keep;
    }
    let (local, peer) = (normalize(local), normalize(peer));
    // A client on another host that sent an rdma_cm request for this connection (only when
    // this process listens with rdma_cm, i.e. has a device).
    if super::rdma::listening()
        && (!is_local(peer.ip()) || super::rdma::local_wanted())
        && let Some(r) = super::rdma::accept(fd, flags, local, peer)
    {
        if let Err(reason) = r {
            sdp_log!(
                log::WARN,
                "accept fd {fd} from {peer}: rdma setup failed ({reason}), TCP"
            );
            record_tcp(fd, 2, reason);
        }
        return AcceptOutcome::Keep;
    }
    let mut found = super::intents::take(peer, local.port(), normalize);
    if found.is_none() {
        drain_beacons_inline();
        found = super::intents::take(peer, local.port(), normalize);
    }
    if found.is_none()
        && serves_beacon_on(local.port())
        && ib_verbs::shm::beacon::endpoint_exists(&peer, &local)
    {
        // An SDP client whose intent another process of ours (a prefork sibling) took off the
        // shared beacon and is recording right now: wait for it, briefly. Without a beacon of
        // ours on this port (an unrelated SO_REUSEPORT listener published it) no intent can
        // come here: no wait.
        let deadline = Instant::now() + Duration::from_millis(50);
        while found.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
            drain_beacons_inline();
            found = super::intents::take(peer, local.port(), normalize);
        }
    }
    let Some(super::intents::Taken {
        mut intent,
        uid,
        pid,
        extra: offer,
    }) = found
    else {
        // An SDP client that registered with another process's beacon (unrelated processes
        // listening on this port with SO_REUSEPORT) waits at its endpoint for an exchange we
        // cannot make: tell it to keep TCP rather than leave it to its 2 s timeout.
        if is_local(peer.ip()) && ib_verbs::shm::beacon::decline_endpoint(&peer, &local) {
            sdp_log!(
                log::DECISION,
                "accept fd {fd} from {peer} on {local}: an SDP client whose intent we do not hold; told it to keep TCP"
            );
        }
        if !fallback::server_accepts_plain_client(mode(decision)) {
            return AcceptOutcome::Refuse;
        }
        sdp_log!(
            log::DECISION,
            "accept fd {fd} from {peer} on {local}: TCP (plain-client)"
        );
        record_tcp(fd, 2, Reason::PlainClient);
        return AcceptOutcome::Keep;
    };
    intent.server = local;
    match server_exchange(fd, &intent, (uid, pid), &offer, flags, local, peer) {
        Ok(()) => {
            sdp_log!(
                log::DECISION,
                "accept fd {fd} from {peer} on {local}: SDP over shm"
            );
            AcceptOutcome::Keep
        }
        Err(reason) => {
            sdp_log!(
                log::WARN,
                "accept fd {fd} from {peer}: SDP exchange failed ({reason}), TCP"
            );
            record_tcp(fd, 2, reason);
            AcceptOutcome::Keep
        }
    }
}

/// `offer`: the Offer's body that came with the intent (the early variant); empty: the
/// client sends its Offer on the endpoint stream.
fn server_exchange(
    fd: i32,
    intent: &Intent,
    (uid, pid): (u32, i32),
    offer: &[u8],
    flags: i32,
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<(), Reason> {
    let endpoint = || ib_verbs::shm::connect_endpoint(intent, uid).map_err(|e| probe_reason(&e));
    // The early variant (the Offer came with the intent): everything is prepared before we
    // reach the client's endpoint, so that the Answer follows the nonce at once and the
    // client's progress thread finds both when it wakes.
    let mut stream = None;
    let offer = if offer.is_empty() {
        let (s, _) = endpoint()?;
        let o = Passive::recv_offer(&s, EXCHANGE_TIMEOUT);
        stream = Some(s);
        o
    } else {
        Passive::offer_from_body(offer)
    }
    .map_err(|_| Reason::SetupFailed)?;
    let mut engine =
        match sdp_proto::Connection::accept(sdp::config(), sdp::now(), offer.private_data()) {
            Ok(e) => e,
            Err(_) => {
                // A reject sends the client back to TCP at once (not after its timeout).
                if let Ok(s) = stream.map(Ok).unwrap_or_else(|| endpoint().map(|(s, _)| s)) {
                    let _ = offer.reject(&s, &[]);
                }
                return Err(Reason::SetupFailed);
            }
        };
    let (app, bell) = new_pair().map_err(|_| Reason::Exhausted)?;
    let (Some(app_dup), Some(bell_dup)) = (dup_fd(app), dup_fd(bell)) else {
        sys::close(app);
        sys::close(bell);
        return Err(Reason::Exhausted);
    };
    // The early variant names the client process (the beacon's SO_PEERCRED): the ring of an
    // ended connection with it may serve again (`identify` checks that it is that process).
    let client = stream.is_none().then_some((pid, uid));
    let mut accepting = match offer.accept_from(shm_options(), app_dup, bell_dup, client) {
        Ok(a) => a,
        Err(_) => {
            sys::close(app);
            sys::close(bell);
            return Err(Reason::SetupFailed);
        }
    };
    let mut wr = 0u64;
    while let Some(p) = engine.poll_post_recv() {
        for _ in 0..p.count {
            wr += 1;
            let _ = accepting.post_recv(wr);
        }
    }
    let ack = engine.hello_ack();
    let stream = match stream {
        Some(s) => s,
        None => match endpoint().and_then(|(s, _)| {
            accepting
                .identify(&s)
                .map(|_| s)
                .map_err(|_| Reason::SetupFailed)
        }) {
            Ok(s) => s,
            Err(reason) => {
                sys::close(app);
                sys::close(bell);
                return Err(reason);
            }
        },
    };
    // The server waits for the client's Ready: a client that fails after the Answer (its mmap
    // fails when its address space is exhausted) goes back to TCP, and only the Ready tells
    // the server to do the same. Not waiting saves a round trip, but then such a client and
    // its server wait for each other forever (tests/faults.rs, address_space_nearly_exhausted).
    let shm = accepting
        .send_answer(&stream, &ack)
        .and_then(|_| accepting.finish(&stream))
        .map_err(|_| {
            sys::close(app);
            sys::close(bell);
            Reason::SetupFailed
        })?;
    let s = SdpShm::new(engine, shm);
    let peer_bell = s.peer_bell();
    let accepted = Accepted {
        fd,
        flags,
        app,
        bell,
        local,
        peer,
    };
    let conn = accepted.install(Box::new(s), Transport::Shm, |conn| {
        watch_peer(conn, peer_bell)
    })?;
    // SO_OOBINLINE and buffer sizes inherited from the listener are on the accepted shadow.
    super::keepalive::apply_set_before(&mut conn.lock());
    Ok(())
}

/// An accepted fd and the app socketpair it is to be swapped onto (`accept4`'s flags kept).
pub(super) struct Accepted {
    pub fd: i32,
    pub flags: i32,
    pub app: i32,
    pub bell: i32,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl Accepted {
    /// The server's connection once its exchange is done, for every transport: the fd swapped
    /// onto the app end, its statistics row, the stray-byte watch and `watch` (what tells of
    /// the peer's end), and the first sync. On failure both ends are closed and the fd is the
    /// kernel's socket still.
    pub(super) fn install(
        self,
        stream: Box<dyn super::stream::OffloadStream>,
        transport: Transport,
        watch: impl FnOnce(&Arc<Conn>) -> Option<u64>,
    ) -> Result<Arc<Conn>, Reason> {
        let Accepted {
            fd,
            flags,
            app,
            bell,
            local,
            peer,
        } = self;
        let shadow = swap_in(
            fd,
            app,
            flags & libc::SOCK_NONBLOCK != 0,
            flags & libc::SOCK_CLOEXEC != 0,
        )
        .map_err(|_| {
            sys::close(app);
            sys::close(bell);
            Reason::Exhausted
        })?;
        let conn = register(
            Phase::Offloaded(stream),
            Swapped {
                fd,
                shadow,
                app,
                bell,
            },
            (local, peer),
            transport,
            2,
        );
        let w = watch(&conn);
        {
            let mut g = conn.lock();
            g.watch = w;
            g.sync();
        }
        Ok(conn)
    }
}

// ---------------------------------------------------------------------------------------------
// Lifetime.

/// The application's epoll registrations made through `fd`, which is being closed or replaced
/// (`dup2` over it: before the kernel's, whose replacement the registrations would outlive).
pub fn forget_epoll_of(fd: i32) {
    if let Some(conn) = super::lookup(fd) {
        // LINUX: closing a socket's last fd removes its epoll registrations. Our private copies
        // keep the app end's file open, so remove the registrations made through this fd: those
        // this process made. One made by the process we were forked from lives in a set it
        // shares with us and watches a file it still holds; a fork child closing every inherited
        // descriptor before its exec (Python's `subprocess`) removed them from under its
        // parent, whose event loop then never heard of that connection again (its peer's close
        // went unseen: Node's `net` server, found by a probe).
        let me = crate::sys::getpid();
        let mut g = conn.lock();
        let before = g.epoll.len();
        g.epoll.retain(|&(epfd, efd, _, _, pid)| {
            if efd == fd && pid == me {
                // SAFETY: removing the application's registration of an fd it is closing.
                unsafe {
                    libc::syscall(
                        libc::SYS_epoll_ctl,
                        epfd,
                        libc::EPOLL_CTL_DEL,
                        efd,
                        std::ptr::null_mut::<libc::epoll_event>(),
                    )
                };
                false
            } else {
                efd != fd
            }
        });
        if g.epoll.len() != before {
            let et = g
                .epoll
                .iter()
                .any(|&(_, _, e, _, _)| e & libc::EPOLLET as u32 != 0);
            if et != g.every_arrival {
                g.every_arrival = et;
                if let Phase::Offloaded(s) = &mut g.phase {
                    s.set_every_arrival(et);
                }
            }
        }
    }
}

/// `close` of an offloaded fd: the connection ends when its last fd in this process goes
/// (other processes holding it after fork keep it alive, as the kernel does for TCP).
pub fn close(fd: i32) {
    forget_epoll_of(fd);
    let Some(conn) = super::unbind_fd(fd) else {
        return;
    };
    let mut g = conn.lock();
    g.closed = true;
    // A poller's round may have withdrawn the bell request (`quiet`): what comes after the
    // close (data a TCP peer would be reset for, the peer's end) must reach whoever
    // watches the connection now.
    if std::mem::take(&mut g.quiet_set) || (g.quiet_entry.is_some() && !g.armed) {
        g.sync();
    }
    adopt_vacant(&mut g);
    // After a fork another process may hold the connection (a forked server child, the parent
    // that keeps listening): then closing our copy must not touch the rings, whose next message
    // belongs to the holder. The peer learns of the last close from the kernel (its copy of
    // our bell end hangs up when every app end is closed), as a TCP peer learns of the FIN.
    let current = match &g.phase {
        Phase::Offloaded(s) => s.is_current(),
        _ => false,
    };
    if current && g.forked && g.stray_bytes_waiting() {
        // What a process forked from us wrote through stdio and left (it exited before we
        // let go: `adopt_vacant` found the connection still ours) goes out before our watch
        // of the bell end goes with the release. Only then: the sync's progress could take
        // what arrived for the process that serves the connection after us (the child of a
        // fork-per-connection server).
        g.take_stray_bytes();
        g.sync();
    }
    let resets = last_close_resets(&mut g);
    if !g.forked {
        hand_pending_to_kernel(&mut g);
    }
    if resets {
        g.release();
        return;
    }
    if current && let Phase::Offloaded(s) = &mut g.phase {
        // Bytes accepted by send are delivered after close, as TCP delivers them: a short
        // flush here, then the progress thread lingers with the rest (bounded), and close
        // returns at once as it does over TCP.
        s.flush(Duration::from_millis(20));
        if s.send_queued() > 0 && s.error().is_none() {
            drop(g);
            linger(conn);
            return;
        }
    }
    g.release();
}

/// The last close of a connection this process serves, or the end of its image: what the
/// application wrote behind the hooks' back (a stdio stream flushed by `fclose` or at exit)
/// goes into the stream first, as the kernel has it before the FIN; then, with SO_LINGER 0 or
/// bytes the application never read, the connection is reset (LINUX: RST; queued sends are
/// dropped and the peer reports ECONNRESET), and `true` says so. A connection shared since a
/// fork is left alone (`false`): another process may hold it, its close never resets, and a
/// sync here could take the ring from the process that uses it.
fn last_close_resets(g: &mut Inner) -> bool {
    if g.forked || !matches!(&g.phase, Phase::Offloaded(s) if s.is_current()) {
        return false;
    }
    g.take_stray_bytes();
    g.sync();
    let linger0 = linger_zero(g.shadow);
    let Phase::Offloaded(s) = &mut g.phase else {
        return false;
    };
    let resets = linger0 || s.unread();
    if resets {
        s.abort();
    }
    resets
}

/// The last close or the end of the image of a connection inherited across a fork, which
/// the process that served it left (`ShmConn::vacate`: it closed its last copy or exited)
/// while this process never used it: what this process wrote behind the hooks' back (a fork
/// child's `dup2(c, 1); printf(...); exit(0)`) goes out, by this process, which takes the
/// connection over for it. Until 2026-11-27 those bytes stayed in the bell end, the server's
/// answer lost: only the serving process reads stray bytes, and none served.
fn adopt_vacant(g: &mut Inner) {
    if !g.forked
        || !matches!(&g.phase, Phase::Offloaded(s) if s.vacant_for_me())
        || !g.stray_bytes_waiting()
    {
        return;
    }
    if let Phase::Offloaded(s) = &mut g.phase
        && s.claim_vacant()
    {
        g.take_stray_bytes();
        g.sync();
    }
}

/// Whether the application set SO_LINGER with a zero timeout (on the shadow, which keeps the
/// socket's options).
fn linger_zero(shadow: i32) -> bool {
    let mut lg = libc::linger {
        l_onoff: 0,
        l_linger: 0,
    };
    let mut len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    // SAFETY: `lg` and `len` are valid for the kernel to write.
    let r = unsafe {
        libc::syscall(
            libc::SYS_getsockopt,
            shadow,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &mut lg as *mut libc::linger,
            &mut len as *mut libc::socklen_t,
        )
    };
    r == 0 && lg.l_onoff != 0 && lg.l_linger == 0
}

/// How long a closed connection may keep delivering its queued bytes.
pub const LINGER_LIMIT: Duration = Duration::from_secs(60);

/// A closed connection delivering its queued bytes from the progress thread.
struct LingerTask {
    conn: Arc<Conn>,
    timer_fd: i32,
    since: Instant,
    token: Mutex<Option<u64>>,
}

impl Task for LingerTask {
    fn on_event(&self, _fd: i32, _events: u32) {
        let mut buf = [0u8; 8];
        // SAFETY: reading the timerfd's expiry count into an 8-byte buffer.
        unsafe { libc::syscall(libc::SYS_read, self.timer_fd, buf.as_mut_ptr(), 8usize) };
        let mut g = self.conn.lock();
        let done = match &mut g.phase {
            // A fork child inherited this task: the lingering belongs to the parent.
            Phase::Offloaded(s) if !s.is_current() => true,
            Phase::Offloaded(s) => {
                s.progress();
                s.send_queued() == 0 || s.error().is_some()
            }
            _ => true,
        };
        if done || self.since.elapsed() > LINGER_LIMIT {
            g.release();
            drop(g);
            if let Some(t) = self.token.lock().unwrap_or_else(|p| p.into_inner()).take() {
                progress::unregister(t);
            }
            sys::close(self.timer_fd);
            LINGERING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn linger(conn: Arc<Conn>) {
    // SAFETY: timerfd_create/settime on our own fd with valid arguments.
    let tfd = unsafe {
        libc::syscall(
            libc::SYS_timerfd_create,
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    } as i32;
    if tfd < 0 {
        conn.lock().release();
        return;
    }
    let tfd = sys::move_high(tfd);
    let tick = libc::timespec {
        tv_sec: 0,
        tv_nsec: 2_000_000,
    };
    let spec = libc::itimerspec {
        it_interval: tick,
        it_value: tick,
    };
    // SAFETY: spec is a valid itimerspec.
    unsafe {
        libc::syscall(
            libc::SYS_timerfd_settime,
            tfd,
            0,
            &spec as *const _,
            std::ptr::null_mut::<libc::itimerspec>(),
        )
    };
    LINGERING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let task = Arc::new(LingerTask {
        conn,
        timer_fd: tfd,
        since: Instant::now(),
        token: Mutex::new(None),
    });
    let token = progress::register(tfd, libc::EPOLLIN as u32, task.clone());
    *task.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
}

static LINGERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// At normal process exit (`atexit`): the C library flushes its stdio streams only after the
/// atexit handlers, so a stream opened on an offloaded socket (`fdopen(fd, "w")`, never
/// closed) is flushed first, into the app end (its bytes are stray bytes, taken by
/// [`end_of_image`]). Only those streams, and only one whose lock is free: `fflush(NULL)`
/// waits for every stream's lock, and a fork child whose parent had another thread inside
/// `printf` at the fork hung there (`tests/faults.rs`, `fork_while_...`, 1 run in 6 on a
/// loaded machine); the C library's own exit-time flush takes no lock.
pub extern "C" fn flush_at_exit() {
    unsafe extern "C" {
        fn ftrylockfile(f: *mut libc::FILE) -> libc::c_int;
        fn fflush_unlocked(f: *mut libc::FILE) -> libc::c_int;
        fn funlockfile(f: *mut libc::FILE);
    }
    unsafe extern "C" {
        static stdout: *mut libc::FILE;
        static stderr: *mut libc::FILE;
    }
    let mut streams: Vec<usize> = STREAMS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // The standard streams too when they write to a connection (`dup2(c, 1); printf(...);
    // exit(0)`: the C library flushes them after the atexit handlers, too late).
    // SAFETY: reading the C library's standard stream pointers.
    for f in unsafe { [stdout, stderr] } {
        // SAFETY: a standard stream, live until the C library's own cleanup after us.
        if !f.is_null() && super::lookup(unsafe { libc::fileno(f) }).is_some() {
            streams.push(f as usize);
        }
    }
    for f in streams {
        let f = f as *mut libc::FILE;
        // SAFETY: a stream `fdopen` returned and `fclose` did not end (`note_stream`).
        unsafe {
            if ftrylockfile(f) == 0 {
                fflush_unlocked(f);
                funlockfile(f);
            }
        }
    }
    end_of_image(true);
}

/// Streams opened for writing on offloaded sockets (`fdopen`), for [`flush_at_exit`].
static STREAMS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Whether [`STREAMS`] may hold anything (one load for every `fclose` of other streams).
static ANY_STREAMS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `fdopen` made `stream` on an offloaded socket, for writing.
pub fn note_stream(stream: usize) {
    STREAMS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(stream);
    ANY_STREAMS.store(true, std::sync::atomic::Ordering::Release);
}

/// `fclose` ends `stream` (whatever it was opened on: the list must never keep a freed one).
pub fn forget_stream(stream: usize) {
    if ANY_STREAMS.load(std::sync::atomic::Ordering::Acquire) {
        STREAMS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&s| s != stream);
    }
}

/// When the process ends (exit, `_exit`) or its image does (exec), the connections it still
/// holds end as their last close would (DESIGN §7): one with bytes the application never
/// read, or with SO_LINGER 0, resets the peer; the others deliver (bounded: the process
/// lingers up to 2 s) what their application sent, stdio writes the hooks never saw
/// included. Before 2026-11-27 the first gave the peer a clean end of stream, and the stray
/// bytes were lost.
///
/// `exit`: the process ends (not an exec, which may fail and leave it running): a connection
/// shared since a fork that it serves is left vacant for the other holders (`adopt_vacant`).
pub fn end_of_image(exit: bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    for (_, conn) in super::snapshot() {
        let mut g = conn.lock();
        adopt_vacant(&mut g);
        let current = matches!(&g.phase, Phase::Offloaded(s) if s.is_current());
        if current {
            if !last_close_resets(&mut g)
                && let Phase::Offloaded(s) = &mut g.phase
            {
                s.flush(deadline.saturating_duration_since(Instant::now()));
                if exit {
                    // The image ends without a close.
                    g.vacate_if_shared();
                }
            }
        } else if matches!(g.phase, Phase::Pending { .. }) && !g.forked {
            hand_pending_to_kernel(&mut g);
        }
    }
    // Connections already closed deliver from the progress thread: give it the time left.
    while LINGERING.load(std::sync::atomic::Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A duplicate of an offloaded fd names the same connection.
pub fn on_dup(old: i32, new: i32) {
    if let Some(conn) = super::lookup(new)
        && super::lookup(old).is_none_or(|c| !Arc::ptr_eq(&c, &conn))
    {
        // dup2 over an offloaded fd closed that fd's reference.
        close(new);
    }
    if let Some(conn) = super::lookup(old) {
        conn.lock().app_fds.push(new);
        bind_fd(new, &conn);
    }
}

/// Before a fork: a connection still waiting for the server's exchange is resolved first
/// (bounded wait; then it goes back to TCP), because only one process could complete it.
pub fn resolve_pending_before_fork() {
    for (_, conn) in super::snapshot() {
        {
            // Stray bytes (stdio writes) still in our bell end go out now, by this process:
            // after the fork either process could pick them up, and claim the connection.
            let mut g = conn.lock();
            if matches!(g.phase, Phase::Offloaded(_)) && g.is_current() {
                g.take_stray_bytes();
                g.sync();
            }
        }
        resolve_pending(&conn);
    }
}

/// Waits (up to 1 s) for a pending connection's exchange; then it goes back to TCP.
pub fn resolve_pending(conn: &Arc<Conn>) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if !matches!(conn.lock().phase, Phase::Pending { .. }) {
            break;
        }
        if Instant::now() >= deadline {
            swap_back(conn);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod oneshot_tests {
    use super::oneshot_fired_in;

    /// The lines of an epoll set's fdinfo as Linux 6.1 writes them.
    const INFO: &str = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n\
        tfd:        5 events: 40000001 data:                5  pos:0 ino:2a1 sdev:8\n\
        tfd:        7 events: 40000000 data:                7  pos:0 ino:2a2 sdev:8\n\
        tfd:       17 events:       19 data:               11  pos:0 ino:2a3 sdev:8\n";

    #[test]
    fn a_oneshot_registration_that_fired_shows_only_its_flags() {
        assert!(
            !oneshot_fired_in(INFO, 5, 0x2a1),
            "armed: EPOLLIN is still there"
        );
        assert!(oneshot_fired_in(INFO, 7, 0x2a2));
        assert!(
            !oneshot_fired_in(INFO, 7, 0x2a1),
            "another file the number named"
        );
        assert!(!oneshot_fired_in(INFO, 17, 0x2a3), "not one-shot");
        assert!(!oneshot_fired_in(INFO, 1, 0x2a1), "not listed");
    }
}
