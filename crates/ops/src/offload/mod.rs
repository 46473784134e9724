//! Offloaded connections: the fd model of DESIGN.md §3.
//!
//! An offloaded connection's fd number names the **app end** of an AF_UNIX socketpair; the
//! other end is the **bell end**. The library keeps a private copy of each (`app_int`,
//! `own_bell`) and gives a duplicate of the bell end to the peer process. Readiness of the app
//! end is kept equal to the connection's:
//!
//! - readable ⟺ bytes in the app end's receive queue ⟸ data or end of stream for the reader.
//!   The peer writes a byte into our bell end when we asked for it (an eventcount in shared
//!   memory); we write one ourselves (`self_ring`) when data is already there; we drain the
//!   bytes when the receive queue is empty again.
//! - writable ⟺ the app end's send direction is not full. When the offload has no room we fill
//!   it (`stuff`); the peer drains it when it gives room (or we do, when we see the room).
//! - the peer's end: the progress thread watches the peer's bell end we hold; its hang-up is
//!   the peer's last close or death, and becomes end of stream here (`shutdown` of our bell).
//!
//! So select, poll, epoll (every mode), blocking calls, timeouts and EINTR are the kernel's own.

pub mod data;
pub mod exec;
pub mod handoff;
pub mod intents;
pub mod keepalive;
pub mod lazy;
pub mod quiet;
pub mod rdma;
pub mod relayed;
pub mod sdp;
pub mod setup;
pub mod stream;
#[cfg(test)]
mod sync_tests;

use crate::fdhash::FdMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::fdtable::{self, Meta};
use crate::stats::{self, Row};
use stream::{Errno, OffloadStream};

/// Where a connection is in its life.
pub enum Phase {
    /// Client side: the TCP connection exists (or is being made), the server has not yet
    /// completed the SDP exchange. Bytes the application sends wait here.
    Pending { sendbuf: Vec<u8>, shut_wr: bool },
    /// Carried by an offload protocol.
    Offloaded(Box<dyn OffloadStream>),
    /// The connection went back to kernel TCP (only from `Pending`); the app fds name the
    /// shadow again.
    Tcp,
}

/// Bound of the pending send buffer, like a socket's send buffer: beyond it, EAGAIN or block.
pub const PENDING_SNDBUF: usize = 256 * 1024;

pub struct Inner {
    pub phase: Phase,
    /// The kernel TCP socket: real 4-tuple, port reservation, fallback path.
    pub shadow: i32,
    /// Our private copy of the app end (draining bell bytes, stuffing).
    pub app_int: i32,
    /// Our private copy of the bell end (self-ring, unstuffing, end of stream).
    pub own_bell: i32,
    /// The application's fd numbers naming this connection in this process.
    pub app_fds: Vec<i32>,
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub row: Option<Row>,
    /// We believe the app end holds bell bytes (it is readable).
    pub bytes_in: bool,
    /// We filled the app end's send direction (it is not writable).
    pub stuffed: bool,
    /// We asked the peer for a bell since the last drain.
    pub armed: bool,
    /// The peer took our request for a bell while we found its message by polling: its byte
    /// is on its way (no need to ring ourselves; drain it when the data is consumed).
    pub owed: bool,
    /// Our bell end was shut for writing: the app end reads end of stream after the bytes.
    pub eof_signalled: bool,
    pub shut_rd: bool,
    /// SO_ERROR to report once.
    pub so_error: Errno,
    /// Progress-thread registration watching the peer's bell end.
    pub watch: Option<u64>,
    /// Progress-thread registration of the pending client's rendezvous endpoint.
    pub endpoint: Option<u64>,
    /// Progress-thread registration watching our bell end for stray writes.
    pub stray: Option<u64>,
    /// A non-blocking connect returned EINPROGRESS and connect was not called again since.
    pub connect_in_progress: bool,
    /// The server's library redirected this pending connection's rdma setup to the process
    /// that accepted it (a prefork worker): the setup is alive but needs two more round trips,
    /// so its pending deadline is extended once (`setup::PendingTask`).
    pub setup_redirected: bool,
    /// The application waits edge-triggered: every arrival rings (see `note_epoll`).
    pub every_arrival: bool,
    /// Listed among the connections whose bell request a poller withdrew (`quiet`): the
    /// epoll set of its entry, -1 for a blocking receive's spin.
    pub quiet_entry: Option<i32>,
    /// Quieted by an epoll set's round: until someone asks again (`quiet::rearm`), `sync` does
    /// not ask for the bell, nor ring for bytes left: the set's next round reports them.
    pub quiet_set: bool,
    /// The stream's counts last added to the process's `BELLS_RUNG`, `DIRECT_TX` and
    /// `DIRECT_RX`.
    pub published: [u64; 3],
    /// This connection, for the watches `sync` starts on demand.
    pub self_ref: std::sync::Weak<Conn>,
    /// Progress-thread registration moving queued sends when room returns.
    pub send_watch: Option<u64>,
    /// A timerfd ticking the connection while bytes wait for credits, and its registration.
    pub flush_timer: i32,
    pub flush_armed: bool,
    pub flush_watch: Option<u64>,
    /// Stray bytes (see `setup::StrayTask`) not yet taken by the offload.
    pub side_buf: Vec<u8>,
    /// The application's epoll registrations of this connection's fds: (epfd, fd, events,
    /// data, the pid of the process that made it).
    pub epoll: Vec<(i32, i32, u32, u64, i32)>,
    /// Pending client: the timeout and the registration watching for a TCP server.
    pub pending_watch: Vec<u64>,
    /// Role for statistics: 1 client, 2 server.
    pub role: u8,
    /// The process forked while it held the connection: another process may hold it too.
    pub forked: bool,
    /// The application closed the connection's last fd in this process (`setup::close`): a
    /// call blocked on it since must not act on whatever the number names next.
    pub closed: bool,
    /// This connection counts in [`PENDING_NOW`] (see [`Inner::note_phase`]).
    pending_counted: bool,
}

/// Connections of this process in the pending phase. While there are any, `poll` and
/// `select` wait in slices ([`any_pending`]): a pending connection that goes back to TCP has
/// its fd number re-pointed (`dup3`) under a thread that may be blocked in `poll` on it. The
/// kernel's poll looks the number up again when it wakes (our end-of-stream on the old app end
/// wakes it), but registers for wake-ups only on its first pass: it then sleeps on the TCP
/// socket unregistered, and the server's answer does not wake it. A client that wrote its
/// request while pending and then polled for the answer (Python's `recv` with a timeout) hung
/// until its timeout, each time the server's process declined the connection.
static PENDING_NOW: AtomicUsize = AtomicUsize::new(0);

/// Whether a connection of this process is pending (one relaxed load).
#[inline]
pub fn any_pending() -> bool {
    PENDING_NOW.load(Ordering::Acquire) != 0
}

impl Inner {
    /// Keeps [`PENDING_NOW`] in step with `phase`: called after every change of it.
    pub fn note_phase(&mut self) {
        let pending = matches!(self.phase, Phase::Pending { .. });
        if pending != self.pending_counted {
            if pending {
                PENDING_NOW.fetch_add(1, Ordering::AcqRel);
            } else {
                PENDING_NOW.fetch_sub(1, Ordering::AcqRel);
            }
            self.pending_counted = pending;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.pending_counted {
            PENDING_NOW.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Inner {
    /// A connection's state right after its fd was swapped onto the app end `app`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        phase: Phase,
        shadow: i32,
        app: i32,
        bell: i32,
        fd: i32,
        local: Option<SocketAddr>,
        peer: Option<SocketAddr>,
        row: Option<Row>,
        role: u8,
    ) -> Inner {
        let mut inner = Inner {
            phase,
            shadow,
            app_int: app,
            own_bell: bell,
            app_fds: vec![fd],
            local,
            peer,
            row,
            bytes_in: false,
            stuffed: false,
            armed: false,
            owed: false,
            eof_signalled: false,
            shut_rd: false,
            so_error: 0,
            watch: None,
            stray: None,
            connect_in_progress: false,
            setup_redirected: false,
            every_arrival: false,
            quiet_entry: None,
            quiet_set: false,
            published: [0; 3],
            send_watch: None,
            flush_timer: -1,
            flush_armed: false,
            flush_watch: None,
            side_buf: Vec::new(),
            self_ref: std::sync::Weak::new(),
            pending_watch: Vec::new(),
            forked: false,
            closed: false,
            epoll: Vec::new(),
            endpoint: None,
            role,
            pending_counted: false,
        };
        inner.note_phase();
        inner
    }
}

pub struct Conn {
    inner: Mutex<Inner>,
}

/// Every connection made in this process (and inherited), for the fork `prepare` handler: a
/// connection out of the registry may still be locked by a thread (a close that unbound its
/// fd and flushes, a lingering one, a call that was blocked on it), and a fork child that
/// inherited its lock held by a thread it does not have waited for it for ever (its progress
/// thread stuck, its own connections with it: `tests/faults.rs`,
/// `fork_while_other_threads_send_connect_and_the_progress_thread_serves`, a child hung in
/// about one run in six). Pruned of dead entries as it grows.
static LIVE: Mutex<Vec<std::sync::Weak<Conn>>> = Mutex::new(Vec::new());

/// Connections ever listed in [`LIVE`].
static ADDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn live() -> MutexGuard<'static, Vec<std::sync::Weak<Conn>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conn {
    /// A new connection, listed in [`LIVE`].
    pub fn new(inner: Inner) -> Arc<Conn> {
        let c = Arc::new(Conn {
            inner: Mutex::new(inner),
        });
        let mut l = live();
        if l.len() >= 64 && l.len().is_power_of_two() {
            l.retain(|w| w.strong_count() > 0);
        }
        l.push(Arc::downgrade(&c));
        ADDED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        c
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The connection locks the fork `prepare` handler holds, with the connections they borrow.
struct HeldForFork {
    /// INVARIANT: dropped before `conns` (field order), whose `Arc`s keep the mutexes alive.
    _guards: Vec<MutexGuard<'static, Inner>>,
    /// [`LIVE`]'s lock.
    _live: MutexGuard<'static, Vec<std::sync::Weak<Conn>>>,
    _conns: Vec<Arc<Conn>>,
}

thread_local! {
    // The handlers of one fork run on the forking thread: prepare, then parent or child.
    static HELD_FOR_FORK: std::cell::RefCell<Option<HeldForFork>> =
        const { std::cell::RefCell::new(None) };
}

/// Fork `prepare`: takes every connection's lock (in address order, so two forking threads
/// cannot deadlock), so that the child never inherits a lock another thread held: those of
/// the registry and every other live one ([`LIVE`]).
pub fn lock_all_for_fork() {
    let mut conns: Vec<Arc<Conn>> = Vec::new();
    let mut held: std::collections::HashSet<usize> = std::collections::HashSet::new();
    let mut guards: Vec<MutexGuard<'static, Inner>> = Vec::new();
    // The connections' locks first, then LIVE, held across the fork (a child must not inherit
    // it held by a thread making a connection): a thread that holds a connection's lock may
    // be making another meanwhile, and must get LIVE. Connections made while we locked are
    // locked in a further round; after a few rounds LIVE is held whatever came.
    let mut round = 0;
    let live = loop {
        let added = ADDED.load(std::sync::atomic::Ordering::SeqCst);
        let mut batch: Vec<Arc<Conn>> = snapshot().into_iter().map(|(_, c)| c).collect();
        batch.extend(live().iter().filter_map(std::sync::Weak::upgrade));
        batch.sort_by_key(|c| Arc::as_ptr(c) as usize);
        batch.dedup_by_key(|c| Arc::as_ptr(c) as usize);
        batch.retain(|c| held.insert(Arc::as_ptr(c) as usize));
        for c in &batch {
            let mut g = c.lock();
            // Parent and child both hold the connection now: a close can no longer tell
            // whether it is the last one (see `setup::close`).
            g.forked = true;
            // SAFETY: the guard borrows a mutex inside an `Arc` that `HeldForFork::conns`
            // keeps alive until after the guard is dropped (field order), on this same thread.
            let g: MutexGuard<'static, Inner> = unsafe { std::mem::transmute(g) };
            guards.push(g);
        }
        conns.extend(batch);
        let l = live();
        round += 1;
        if ADDED.load(std::sync::atomic::Ordering::SeqCst) == added || round >= 4 {
            break l;
        }
    };
    HELD_FOR_FORK.with(|h| {
        *h.borrow_mut() = Some(HeldForFork {
            _guards: guards,
            _live: live,
            _conns: conns,
        })
    });
}

/// Fork `parent`/`child`: releases what `lock_all_for_fork` took.
pub fn unlock_all_after_fork() {
    HELD_FOR_FORK.with(|h| drop(h.borrow_mut().take()));
}

static REGISTRY: RwLock<Option<FdMap<i32, Arc<Conn>>>> = RwLock::new(None);

/// The connection an application fd names, if it is offloaded.
pub fn lookup(fd: i32) -> Option<Arc<Conn>> {
    let g = REGISTRY.read().unwrap_or_else(|p| p.into_inner());
    g.as_ref()?.get(&fd).cloned()
}

/// Whether any fd of this process names an offloaded (or pending) connection now.
pub fn any_bound() -> bool {
    let g = REGISTRY.read().unwrap_or_else(|p| p.into_inner());
    g.as_ref().is_some_and(|m| !m.is_empty())
}

/// Records that `fd` names `conn`.
pub fn bind_fd(fd: i32, conn: &Arc<Conn>) {
    let mut g = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(FdMap::default)
        .insert(fd, Arc::clone(conn));
    fdtable::update(fd, |m| m.with(Meta::OFFLOADED));
}

/// Forgets `fd`; returns the connection if this was its last fd in this process.
pub fn unbind_fd(fd: i32) -> Option<Arc<Conn>> {
    let conn = {
        let mut g = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
        g.as_mut()?.remove(&fd)?
    };
    let mut inner = conn.lock();
    inner.app_fds.retain(|&f| f != fd);
    let last = inner.app_fds.is_empty();
    drop(inner);
    last.then_some(conn)
}

/// The (events, data) with which epoll set `epfd` watches offloaded `fd`, as the application
/// registered it.
pub fn epoll_registration(epfd: i32, fd: i32) -> Option<(u32, u64)> {
    let conn = lookup(fd)?;
    let g = conn.lock();
    g.epoll
        .iter()
        .find(|r| r.0 == epfd && r.1 == fd)
        .map(|r| (r.2, r.3))
}

/// Remembers an application's `epoll_ctl` on an offloaded fd.
pub fn note_epoll(epfd: i32, op: i32, fd: i32, ev: Option<libc::epoll_event>) {
    let Some(conn) = lookup(fd) else { return };
    let mut g = conn.lock();
    if op == libc::EPOLL_CTL_MOD
        && let Some(ev) = ev
        && let Some(r) = g.epoll.iter_mut().find(|r| r.0 == epfd && r.1 == fd)
        && (r.2 ^ ev.events) & libc::EPOLLET as u32 == 0
    {
        // The common case of event loops that toggle EPOLLOUT around every write: the set
        // already watches this connection and the edge-triggered mode stays as it was.
        r.2 = ev.events;
        r.3 = ev.u64;
        return;
    }
    g.epoll.retain(|&(e, f, _, _, _)| !(e == epfd && f == fd));
    if op != libc::EPOLL_CTL_DEL
        && let Some(ev) = ev
    {
        g.epoll
            .push((epfd, fd, ev.events, ev.u64, crate::sys::getpid()));
        // LINUX: edge-triggered epoll reports every new arrival on a TCP socket, even with
        // unread bytes: then every message must ring our bell.
        let et = g
            .epoll
            .iter()
            .any(|&(_, _, e, _, _)| e & libc::EPOLLET as u32 != 0);
        g.every_arrival = et;
        if let Phase::Offloaded(s) = &mut g.phase {
            s.set_every_arrival(et);
        }
        drop(g);
        let mine = |c: &std::sync::Weak<Conn>| std::ptr::eq(c.as_ptr(), Arc::as_ptr(&conn));
        let known = WATCHED
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|m| m.get(&epfd))
            .is_some_and(|l| l.iter().any(mine));
        if known {
            return;
        }
        let mut w = WATCHED.write().unwrap_or_else(|p| p.into_inner());
        let list = w
            .get_or_insert_with(FdMap::default)
            .entry(epfd)
            .or_default();
        list.retain(|c| c.strong_count() > 0);
        if !list.iter().any(mine) {
            list.push(Arc::downgrade(&conn));
        }
        ANY_WATCHED.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The epoll set `epfd` was closed: its number may name another set next.
pub fn forget_watched_set(epfd: i32) {
    if let Some(m) = WATCHED.write().unwrap_or_else(|p| p.into_inner()).as_mut() {
        m.remove(&epfd);
    }
}

/// Offloaded connections registered in each epoll set, for busy-polling in `epoll_wait`.
static WATCHED: RwLock<Option<FdMap<i32, Vec<std::sync::Weak<Conn>>>>> = RwLock::new(None);
static ANY_WATCHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How `epoll_wait` on a set busy-polls before sleeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spin {
    /// No offloaded connection in the set: straight to the kernel.
    No,
    /// A few: poll their rings, then the set without sleeping.
    Rings,
    /// Many (a busy server): only the set without sleeping. Polling every ring costs more than
    /// it saves, but a bell that lands while we spin is caught without a sleep and a wake-up
    /// (which is what a loaded server's latency was made of).
    Kernel,
}

/// How `epoll_wait` on `epfd` should busy-poll (see [`Spin`]).
#[inline]
pub fn epoll_spin(epfd: i32) -> Spin {
    if !ANY_WATCHED.load(std::sync::atomic::Ordering::Acquire) {
        return Spin::No;
    }
    let g = WATCHED.read().unwrap_or_else(|p| p.into_inner());
    match g.as_ref().and_then(|m| m.get(&epfd)).map_or(0, Vec::len) {
        0 => Spin::No,
        n if n <= SPIN_MAX_CONNS => Spin::Rings,
        _ => Spin::Kernel,
    }
}

/// The most offloaded connections an epoll set may watch for `epoll_wait` to poll their rings:
/// a round over 64 that reports what it finds itself (`quiet::round`) costs a few
/// microseconds, less than the bells it saves when messages come on several of them
/// (redis-benchmark's 50 clients).
const SPIN_MAX_CONNS: usize = 64;

/// The most a round that only makes readiness current ([`poll_epoll_set`]) polls: it still
/// needs a bell per message, so a larger round costs more than it saves.
const SYNC_MAX_CONNS: usize = 4;

/// One busy-poll round over the offloaded connections of `epfd` (a few; more: nothing): moves
/// what arrived and makes their app ends' readiness current (so the next non-blocking
/// `epoll_wait` sees it). For a set whose rings are not polled by `quiet::round`.
pub fn poll_epoll_set(epfd: i32) {
    let conns: Vec<Arc<Conn>> = {
        let g = WATCHED.read().unwrap_or_else(|p| p.into_inner());
        match g.as_ref().and_then(|m| m.get(&epfd)) {
            Some(l) if l.len() <= SYNC_MAX_CONNS => {
                l.iter().filter_map(std::sync::Weak::upgrade).collect()
            }
            _ => return,
        }
    };
    for c in conns {
        let mut g = c.lock();
        let work = match &mut g.phase {
            Phase::Offloaded(s) => s.has_work(),
            _ => false,
        };
        if work && g.is_current() {
            g.sync();
        }
    }
}

/// Every (fd, connection) of this process.
pub fn snapshot() -> Vec<(i32, Arc<Conn>)> {
    let g = REGISTRY.read().unwrap_or_else(|p| p.into_inner());
    g.as_ref().map_or_else(Vec::new, |m| {
        m.iter().map(|(k, v)| (*k, Arc::clone(v))).collect()
    })
}

/// In a relay process: forgets every connection but `keep` (their fds are closed there;
/// their rings belong to other processes).
pub fn retain_only(keep: &Arc<Conn>) {
    let mut g = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = g.as_mut() {
        let others: Vec<i32> = m
            .iter()
            .filter(|(_, c)| !Arc::ptr_eq(c, keep))
            .map(|(k, _)| *k)
            .collect();
        for fd in others {
            if let Some(c) = m.remove(&fd) {
                // Never touch the rings or fds of a connection this process does not serve.
                std::mem::forget(c);
            }
            fdtable::clear(fd);
        }
    }
}

/// Takes the registry's lock around fork so the child never inherits it held.
pub fn fork_prepare() -> std::sync::RwLockWriteGuard<'static, Option<FdMap<i32, Arc<Conn>>>> {
    REGISTRY.write().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn raw_send(fd: i32, buf: &[u8], flags: i32) -> isize {
    // SAFETY: buf is valid for reads of its length; raw syscall bypasses our hooks.
    unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            buf.as_ptr(),
            buf.len(),
            flags,
            std::ptr::null::<u8>(),
            0,
        ) as isize
    }
}

pub(crate) fn raw_recv(fd: i32, buf: &mut [u8], flags: i32) -> isize {
    // SAFETY: buf is valid for writes of its length.
    unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf.as_mut_ptr(),
            buf.len(),
            flags,
            std::ptr::null_mut::<u8>(),
            std::ptr::null_mut::<u8>(),
        ) as isize
    }
}

/// LINUX: urgent data on a TCP socket sends SIGURG to the owner set with F_SETOWN (a process,
/// or a process group when negative). The owner lives in the open file, which the app's fd
/// shares with our copy of the app end.
fn raise_sigurg(app_int: i32) {
    // SAFETY: F_GETOWN on our own fd; kill with the owner the application chose.
    unsafe {
        let owner = libc::syscall(libc::SYS_fcntl, app_int, libc::F_GETOWN) as i32;
        if owner != 0 {
            libc::syscall(libc::SYS_kill, owner, libc::SIGURG);
        }
    }
}

/// Reads and discards everything queued on `fd` without blocking.
/// Reads and discards everything queued on `fd`; returns how many bytes.
fn drain(fd: i32) -> usize {
    let mut scratch = [0u8; 4096];
    let mut total = 0;
    loop {
        let n = raw_recv(fd, &mut scratch, libc::MSG_DONTWAIT);
        if n <= 0 {
            if n < 0 && crate::sys::errno() == libc::EINTR {
                continue;
            }
            return total;
        }
        total += n as usize;
        if (n as usize) < scratch.len() {
            // A short read of a stream socket took everything that was queued.
            return total;
        }
    }
}

/// Gives an app end or bell end the smallest send buffer (the kernel clamps 1 to its minimum),
/// so that stuffing it is cheap. LINUX: setting SO_SNDBUF also calls the socket's write-space
/// callback, which for AF_UNIX wakes the waiters of a writable socket (an edge-triggered epoll
/// set gets its EPOLLOUT edge): set again to the same size, it is that wake-up alone, without
/// touching the queue (`Inner::sync_after_send`). The application's SO_SNDBUF goes to the
/// shadow, never here.
fn smallest_send_buffer(fd: i32) {
    crate::sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 1);
}

/// Waits (briefly: the peer sends it right after deciding to) for a bell byte on `fd` and
/// drains it. Returns the bytes drained; 0 if none came (the peer died meanwhile).
fn wait_and_drain(fd: i32) -> usize {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::syscall(libc::SYS_poll, &mut p as *mut libc::pollfd, 1, 100) };
    if n > 0 { drain(fd) } else { 0 }
}

impl Inner {
    /// Makes the app end's readiness agree with the connection's. Call after every operation,
    /// with the lock held.
    pub fn sync(&mut self) {
        if !self.side_buf.is_empty()
            && let Phase::Offloaded(s) = &mut self.phase
            && let Ok(n) = s.send(&[&self.side_buf[..]], false)
        {
            self.side_buf.drain(..n);
        }
        let (want_in, want_out, rdhup) = match &mut self.phase {
            Phase::Offloaded(s) => {
                s.progress();
                if s.take_urgent() {
                    raise_sigurg(self.app_int);
                }
                (
                    s.recv_ready() || self.shut_rd,
                    s.send_ready(),
                    s.read_closed() || self.shut_rd,
                )
            }
            Phase::Pending { sendbuf, .. } => (false, sendbuf.len() < PENDING_SNDBUF, self.shut_rd),
            Phase::Tcp => return,
        };
        // Arming can find completions and progress the connection, which may change the other
        // direction's readiness, computed before: `sync_out` looks at the room again after it
        // armed (a ZCopy offer finished while the receive side armed), and the receive side
        // is looked at again below when the send side's arm progressed.
        if rdhup {
            // LINUX: a TCP socket whose peer half-closed polls IN|RDHUP and reads 0 after the
            // data; shutting our bell end for writing gives the app end exactly that.
            self.signal_eof();
        } else {
            self.sync_in(want_in);
        }
        if self.sync_out(want_out)
            && !rdhup
            && let Phase::Offloaded(s) = &self.phase
        {
            if s.read_closed() {
                self.signal_eof();
            } else if s.recv_ready() && !self.bytes_in && !self.owed {
                self.sync_in(true);
            }
        }
        self.sync_flush_timer();
        self.publish_stats();
    }

    /// Bytes waiting for credits must move on even when the application makes no call (TCP's
    /// kernel sends them): while any are queued, the progress thread ticks the connection.
    fn sync_flush_timer(&mut self) {
        let queued = match &self.phase {
            Phase::Offloaded(s) => s.send_queued() > 0 || !self.side_buf.is_empty(),
            _ => false,
        };
        if queued
            && self.flush_timer < 0
            && self.flush_watch.is_none()
            && let Some((tfd, w)) = setup::flush_timer(self.self_ref.clone())
        {
            self.flush_timer = tfd;
            self.flush_watch = w;
        }
        if queued != self.flush_armed && self.flush_timer >= 0 {
            let tick = if queued { 1_000_000 } else { 0 };
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: tick,
                },
                it_value: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: tick,
                },
            };
            // SAFETY: our own timerfd and a valid itimerspec.
            unsafe {
                libc::syscall(
                    libc::SYS_timerfd_settime,
                    self.flush_timer,
                    0,
                    &spec as *const _,
                    std::ptr::null_mut::<libc::itimerspec>(),
                )
            };
            self.flush_armed = queued;
        }
    }

    fn sync_in(&mut self, mut want_in: bool) {
        if !want_in {
            // Clear: withdraw our request for a bell, drain, ask again, then look again (the
            // eventcount). Bytes may be there from our own ring or from the peer's since we
            // last armed. A peer that took the request (it rings once, for a message we may
            // have consumed already by polling) sends its byte right after: wait for it, or it
            // would make the app end readable with nothing to read.
            let rang = match &mut self.phase {
                Phase::Offloaded(s) => self.armed && s.disarm_recv(),
                _ => false,
            } || std::mem::take(&mut self.owed);
            if (self.every_arrival && self.armed) || self.bytes_in || rang {
                let want = usize::from(self.bytes_in) + usize::from(rang);
                if drain(self.app_int) < want && rang && !self.every_arrival {
                    wait_and_drain(self.app_int);
                }
                self.bytes_in = false;
            }
            if self.stays_quiet() {
                return;
            }
            self.armed = true;
            if let Phase::Offloaded(s) = &mut self.phase
                && !s.arm_recv()
            {
                s.progress();
                want_in = s.recv_ready();
            }
        }
        if want_in && !self.bytes_in && !self.owed {
            if self.stays_quiet() {
                return;
            }
            // Data we found by polling, with our request for a bell still out: if the peer
            // took it, its byte makes the app end readable (one system call less than ringing
            // ourselves too, on every request-response message).
            if self.armed
                && !self.every_arrival
                && let Phase::Offloaded(s) = &mut self.phase
            {
                // Withdrawn, or taken by the peer.
                self.armed = false;
                if s.disarm_recv() {
                    self.owed = true;
                    return;
                }
            }
            self.self_ring();
        }
    }

    /// Whether an epoll set's poller answers for this connection's readiness now (`quiet`).
    fn stays_quiet(&self) -> bool {
        self.quiet_set && !self.every_arrival && !self.forked && quiet::may_stay_quiet(true)
    }

    /// `sync`, asking for the bell (and ringing for bytes there) even if a poller quieted the
    /// connection: the kernel reports it next.
    pub fn sync_loud(&mut self) {
        let q = std::mem::replace(&mut self.quiet_set, false);
        self.sync();
        self.quiet_set = q;
    }

    /// A blocking receive is about to poll the ring itself: the peer need not ring our bell
    /// for the message it will take. Withdraws our request for a bell; the next `sync` makes
    /// it again (the receive's, or the one before the receive sleeps). Another thread waiting
    /// on the app end meanwhile misses nothing: what arrives is taken by this receive, and
    /// bytes it leaves behind make the app end readable at its `sync`.
    /// Returns whether it withdrew one.
    pub fn quiet_while_polling(&mut self) -> bool {
        if !self.armed || self.every_arrival {
            return false;
        }
        if let Phase::Offloaded(s) = &mut self.phase
            && s.quiet_while_polling()
        {
            self.armed = false;
            if s.disarm_recv() {
                // Taken first: its byte is on its way; drained once the data is consumed.
                self.owed = true;
            }
            return true;
        }
        false
    }

    fn self_ring(&mut self) {
        if raw_send(self.own_bell, &[1], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) >= 0 {
            self.bytes_in = true;
        } else if crate::sys::errno() == libc::EAGAIN {
            // The app end is full of bell bytes: it is readable.
            self.bytes_in = true;
        }
    }

    /// The app end's writability; whether arming progressed the connection.
    fn sync_out(&mut self, mut want_out: bool) -> bool {
        let mut progressed = false;
        // No room: stuff even when we believe we did already. The peer drains our stuffing when
        // it gives room; if this sync's progress used that room up before we looked, the app
        // end is writable with no room left, and a writer that gets EAGAIN now (nginx, edge-
        // triggered) would wait for an edge that never comes. On an app end still full this
        // costs one failing send.
        if !want_out {
            if self.send_watch.is_none() && self.app_int >= 0 {
                self.send_watch = setup::watch_send(self.self_ref.clone(), self.app_int);
            }
            self.stuff();
            if let Phase::Offloaded(s) = &mut self.phase {
                if !s.arm_send() {
                    s.progress();
                    progressed = true;
                }
                // Armed now: room that came before (this sync's receive-side arm progressed
                // the connection) is seen here, room that comes later wakes us. Stuffed first
                // either way, so that a writer that got EAGAIN (edge-triggered: nginx) gets
                // its EPOLLOUT edge when we drain.
                want_out = s.send_ready();
            }
        }
        if want_out && self.stuffed {
            drain(self.own_bell);
            self.stuffed = false;
        }
        progressed
    }

    /// `sync` after a send the stream refused bytes of (EAGAIN, or a short count): the
    /// writer now waits for room, an edge-triggered one (nginx) for an EPOLLOUT edge. If this
    /// sync leaves the app end writable, the writer is told so by a write-space wake-up of
    /// the app end (`smallest_send_buffer`, the size it has). The app end may have been writable all along: the peer
    /// drains our stuffing when it posts receive buffers, which can come before our send
    /// queue moved; the writer woke on that edge, its send was refused (the queue was still
    /// full), and this sync found room (the queue moved meanwhile). Nothing changed on the
    /// app end then, and nginx slept until its send timeout, about one download in a hundred
    /// (`a_writer_refused_after_the_peer_drained_its_stuffing_gets_an_edge`). A stuffing
    /// drained at once would wake it too, but draining the bell end also discards what stdio
    /// wrote there and the stray-write watch has not taken yet.
    pub fn sync_after_send(&mut self, refused: bool) {
        self.sync();
        if refused && !self.stuffed && matches!(self.phase, Phase::Offloaded(_)) {
            smallest_send_buffer(self.app_int);
        }
    }

    /// Fills the app end's send direction so that it polls not-writable.
    fn stuff(&mut self) {
        let fill = [0u8; 4096];
        loop {
            let n = raw_send(self.app_int, &fill, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
            if n < 0 {
                if crate::sys::errno() == libc::EINTR {
                    continue;
                }
                break;
            }
        }
        self.stuffed = true;
    }

    /// Whether this process serves the connection now (see `OffloadStream::is_current`); a
    /// pending or TCP connection is always ours.
    pub fn is_current(&self) -> bool {
        match &self.phase {
            Phase::Offloaded(s) => s.is_current(),
            _ => true,
        }
    }

    /// This process lets go of a connection it served (its last close, its exit): a process
    /// forked from it may hold the connection still, and may take it over now without a use
    /// of its own first (`setup::adopt_vacant`). Not while our stuffing fills the bell end:
    /// it would take that for the application's bytes.
    pub fn vacate_if_shared(&mut self) {
        if self.forked
            && !self.stuffed
            && let Phase::Offloaded(s) = &mut self.phase
        {
            s.vacate();
        }
    }

    /// Whether bytes the application wrote behind our back wait in our bell end (and none of
    /// our stuffing, which nothing would tell apart from them).
    pub fn stray_bytes_waiting(&self) -> bool {
        !self.stuffed && self.own_bell >= 0 && crate::sys::has_bytes(self.own_bell)
    }

    /// Reads bytes the application wrote on the app end behind our back (never our own
    /// stuffing: only while not stuffed) and queues them as data.
    pub fn take_stray_bytes(&mut self) {
        if self.stuffed || self.own_bell < 0 || !self.is_current() {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            let n = raw_recv(self.own_bell, &mut buf, libc::MSG_DONTWAIT);
            if n <= 0 {
                break;
            }
            let bytes = &buf[..n as usize];
            match &mut self.phase {
                Phase::Pending { sendbuf, .. } => sendbuf.extend_from_slice(bytes),
                Phase::Offloaded(_) => self.side_buf.extend_from_slice(bytes),
                Phase::Tcp => return,
            }
        }
    }

    /// The application half-closed a stream over `transport`. LINUX: a TCP socket shut both
    /// ways (ours and the peer's) polls HUP; shutting the app end's own writing gives it that
    /// once the peer's half-close arrives too. Over shm that waits for our DisConn to go
    /// (`SdpShm::drain_outputs`), after the bytes queued ahead of it: shut earlier, our bell
    /// end polled HUP once the peer half-closed too, and the peer took it for our end.
    pub fn half_close_app_end(&self, transport: crate::stats::Transport) {
        if transport != crate::stats::Transport::Shm && self.app_int >= 0 {
            let _ = ib_verbs::sys::shutdown_write(self.app_int);
        }
    }

    /// The peer's end: the reader gets end of stream after the bytes already received, the
    /// writer gets its error.
    pub fn signal_eof(&mut self) {
        if !self.eof_signalled {
            // LINUX: shutdown acts on the socket, not the fd: the app end reads end of stream
            // (and polls POLLIN|POLLRDHUP) once the bell bytes are consumed.
            // SAFETY: our own fd.
            unsafe { libc::syscall(libc::SYS_shutdown, self.own_bell, libc::SHUT_WR) };
            self.eof_signalled = true;
        }
    }

    pub fn publish_stats(&mut self) {
        if let Some(row) = &self.row
            && !row.is_ours()
        {
            // Inherited across fork: the row lives in the parent's table. Leave it to the
            // parent and publish in ours.
            if let Some(old) = self.row.take() {
                std::mem::forget(old);
            }
            let fd = self.app_fds.first().copied().unwrap_or(-1);
            let t = match &self.phase {
                Phase::Offloaded(s) => s.transport(),
                _ => stats::Transport::Shm,
            };
            self.row = Row::claim(fd, t, self.role);
            if let Some(r) = &self.row {
                r.set_addrs(self.local, self.peer);
            }
        }
        let (Some(row), Phase::Offloaded(s)) = (&self.row, &self.phase) else {
            return;
        };
        let c = s.counters();
        let now = [c.bells_tx, c.direct_tx, c.direct_rx];
        let words = [
            stats::header::BELLS_RUNG,
            stats::header::DIRECT_TX,
            stats::header::DIRECT_RX,
        ];
        for ((word, n), seen) in words.iter().zip(now).zip(self.published.iter_mut()) {
            if n > *seen {
                stats::bump(*word, n - *seen);
                *seen = n;
            }
        }
        row.set(stats::field::BYTES_TX, c.bytes_tx);
        row.set(stats::field::BYTES_RX, c.bytes_rx);
        row.set(stats::field::MSGS_TX, c.msgs_tx);
        row.set(stats::field::MSGS_RX, c.msgs_rx);
        row.set(stats::field::CREDITS_TX, c.credits_tx);
        row.set(stats::field::POSTED_RX, c.posted_rx);
        row.set(stats::field::ZCOPY_TX, c.zcopy_tx);
        row.set(stats::field::ZCOPY_RX, c.zcopy_rx);
    }

    /// Stops the pending-phase watches (the exchange finished or the connection went TCP).
    pub fn clear_pending_watch(&mut self) {
        for t in self.pending_watch.drain(..) {
            crate::progress::unregister(t);
        }
    }

    /// Releases the connection's private resources (last close in this process).
    pub fn release(&mut self) {
        self.clear_pending_watch();
        for t in [
            self.watch.take(),
            self.endpoint.take(),
            self.stray.take(),
            self.send_watch.take(),
            self.flush_watch.take(),
        ]
        .into_iter()
        .flatten()
        {
            crate::progress::unregister(t);
        }
        if self.flush_timer >= 0 {
            crate::sys::close(self.flush_timer);
            self.flush_timer = -1;
        }
        self.vacate_if_shared();
        self.phase = Phase::Tcp;
        self.note_phase();
        for fd in [self.app_int, self.own_bell, self.shadow] {
            if fd >= 0 {
                crate::sys::close(fd);
            }
        }
        self.app_int = -1;
        self.own_bell = -1;
        self.shadow = -1;
        if let Some(row) = self.row.take()
            && !row.is_ours()
        {
            // A row inherited across fork is the parent's to free.
            std::mem::forget(row);
        }
    }
}

/// A fresh app/bell socketpair, both ends moved high and close-on-exec, the app end's send
/// buffer made small so that stuffing it is cheap.
pub fn new_pair() -> Result<(i32, i32), Errno> {
    let mut sv = [0i32; 2];
    // SAFETY: sv has room for two fds.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_socketpair,
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(crate::sys::errno());
    }
    let app = crate::sys::move_high(sv[0]);
    let bell = crate::sys::move_high(sv[1]);
    for fd in [app, bell] {
        smallest_send_buffer(fd);
    }
    Ok((app, bell))
}
