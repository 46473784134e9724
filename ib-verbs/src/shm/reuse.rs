//! Rings kept after their connection ended, for the next connection between the same two
//! processes.
//!
//! A fresh ring costs both sides a memfd, a mapping, its first page faults and, at the end, the
//! unmapping and the eviction of its pages: a third of what a short connection costs the client
//! beyond TCP. So a connection whose ring was used by this process alone (no fork since it was
//! set up) keeps its mapping here when it ends, after marking its side released in the ring's
//! header (`Layout::released`).
//!
//! - **Server** (side 1, the creator): an entry keeps the mapping, the memfd, the peer's
//!   pidfd and the ring's reuse token (`Layout::reuse_token`, a random number written at each
//!   use). A new connection takes the entry only if all of these hold: its Offer names the
//!   token (the client still holds the mapping: nobody who never mapped the ring knows it, not
//!   even a new program the client's process exec'd); the beacon's SO_PEERCRED gave the same
//!   pid (a real one: 0 is a peer in another pid namespace) and uid, and
//!   [`crate::shm::Accepting::identify`] finds them again at the endpoint; the pidfd still
//!   polls quiet (the pid names the same process); the layout is the same; and the client
//!   released its side. The header and both side blocks are zeroed, a new token written, and
//!   the same memfd goes in the Answer.
//! - **Client** (side 0): an entry keeps the mapping, keyed by the memfd's inode, the token,
//!   and the scope its caller gave the connection (libsdp: the server's address). An Offer
//!   names the tokens of the rings kept in its scope only, so no other server learns them. An
//!   Answer whose memfd is a kept one (same device and inode) and whose token is the kept
//!   ring's takes the mapping instead of mapping the memfd again.
//!
//! An Offer names tokens only when the client kept rings in its scope; then the Answer names
//! the ring's token too. Otherwise both end after their private data, as those of an earlier
//! build, which refuses trailing bytes: its rings carry no token (0 at `Layout::reuse_token`),
//! so a client keeps none of them and never names a token to it.
//!
//! A ring is reused only between the two processes that used it, so no other process sees
//! what it held. Kept mappings are `MADV_DONTFORK`: a fork child never inherits them (it could
//! read a later connection of its parent's), and it forgets the entries it copied without
//! unmapping what it does not have (an atfork child handler closes its copies of the kept
//! descriptors at once; the prepare handler holds the cache's lock across the fork, so the
//! child's copy is never locked). A connection whose setup or end overlapped a fork (the fork
//! count, bumped in every atfork handler, read before its ring was mapped and checked again
//! once its mapping is `MADV_DONTFORK`) keeps nothing. Entries go when their
//! peer dies, after [`IDLE`] unused, or the oldest first past [`CAP`]; [`sweep`] does the
//! first two.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::layout::{KEYS, Layout};
use super::mem::Mapping;
use crate::sys::{self, Fd};

/// Most kept rings a client names in an Offer (the newest).
pub const OFFER_TOKENS: usize = 3;
/// Most rings kept per process (each is an address range of a few MiB and the pages the
/// connections touched).
pub const CAP: usize = 8;
/// A ring unused this long is unmapped.
pub const IDLE: Duration = Duration::from_secs(1);

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Forks this process made (counted by an atfork handler): a connection set up before a fork
/// may be used by the child too, so its ring is never reused.
static FORKS: AtomicU64 = AtomicU64::new(0);
static KEPT: Mutex<Kept> = Mutex::new(Kept {
    pid: 0,
    entries: Vec::new(),
});
/// Rings taken from the cache, ever (both roles).
static REUSED: AtomicU64 = AtomicU64::new(0);

struct Kept {
    /// The process the entries belong to (a fork child finds its parent's pid here).
    pid: i32,
    entries: Vec<Entry>,
}

/// One kept ring.
pub(crate) struct Entry {
    pub map: Mapping,
    pub layout: Layout,
    /// Our side (0 client, 1 server).
    pub side: usize,
    /// The memfd (server entries: it goes in the next Answer).
    pub memfd: Option<Fd>,
    /// (device, inode) of the memfd (client entries are looked up by it).
    pub ino: (u64, u64),
    /// The ring's reuse token of the connection that ended (our private copy).
    pub token: u64,
    /// The client's grouping of its rings (see [`client_tokens`]); 0 for a server.
    pub scope: u64,
    pub peer_pid: i32,
    pub peer_uid: u32,
    /// [`start`] of the connection that ended.
    pub keep_from: Option<u64>,
    pub pidfd: Option<Fd>,
    pub since: Instant,
}

thread_local! {
    /// The cache's lock, held by the forking thread from `fork_prepare` to `fork_parent` /
    /// `fork_child`.
    static HELD: std::cell::RefCell<Option<std::sync::MutexGuard<'static, Kept>>> =
        const { std::cell::RefCell::new(None) };
}

extern "C" fn fork_prepare() {
    FORKS.fetch_add(1, Ordering::SeqCst);
    // Taken, so that the child's copy of the lock is free and its entries can be forgotten.
    // Work under the lock never blocks, but a signal handler that forks on the thread that
    // holds it (or a handler that jumped out of it) would wait for ever: a bounded wait, then
    // the fork goes on without it (the child then has no cache, and keeps its copies of the
    // kept descriptors until it execs).
    for _ in 0..1000 {
        match KEPT.try_lock() {
            Ok(g) => {
                HELD.with(|h| *h.borrow_mut() = Some(g));
                return;
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                HELD.with(|h| *h.borrow_mut() = Some(p.into_inner()));
                return;
            }
            Err(std::sync::TryLockError::WouldBlock) => std::thread::yield_now(),
        }
    }
}

extern "C" fn fork_parent() {
    FORKS.fetch_add(1, Ordering::SeqCst);
    HELD.with(|h| h.borrow_mut().take());
}

extern "C" fn fork_child() {
    FORKS.fetch_add(1, Ordering::SeqCst);
    // The pid cache first (its own handler may run after this one).
    sys::forget_pid();
    // The parent's entries: forgotten, our copies of their descriptors closed, now.
    if let Some(mut k) = HELD.with(|h| h.borrow_mut().take()) {
        forget_parents(&mut k);
    }
}

/// In a fork child: the parent's entries are forgotten (their mappings are `MADV_DONTFORK`,
/// not here: unmapping the range could hit a mapping made since) and our copies of their
/// descriptors closed.
fn forget_parents(k: &mut Kept) {
    for e in std::mem::take(&mut k.entries) {
        std::mem::forget(e.map);
    }
    k.pid = sys::getpid();
}

/// Turns reuse on for this process (libsdp does at start; off by default, because a process
/// that never calls [`sweep`] would keep dead rings until its cap pushed them out).
pub fn enable() {
    count_forks();
    ENABLED.store(true, Ordering::SeqCst);
}

/// Registers the fork handlers that count forks (once per process; every ring calls it, since
/// a claim depends on the count too: [`forks`]).
pub(crate) fn count_forks() {
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        // SAFETY: registering a plain function that lives as long as the process.
        // In every handler: a connection whose setup read the count before the fork's prepare
        // handlers ran, or while they ran (its exchange finished by them), reads another count
        // when it ends.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    });
}

/// Forks this process made (or, in a child, its parent's count at the fork, plus one).
pub(crate) fn forks() -> u64 {
    FORKS.load(Ordering::SeqCst)
}

/// Whether a connection being set up may later keep its ring; with the fork count it started
/// at, for [`may_keep`]. Read before its ring is mapped (or taken): a fork after that changes
/// the count.
pub(crate) fn start() -> Option<u64> {
    ENABLED
        .load(Ordering::Relaxed)
        .then(|| FORKS.load(Ordering::SeqCst))
}

/// Whether a connection that started at `started` ([`start`]) in process `pid` may keep its
/// ring now: same process, no fork since.
pub(crate) fn may_keep(started: Option<u64>, pid: i32) -> bool {
    started.is_some_and(|f| f == FORKS.load(Ordering::SeqCst)) && pid == sys::getpid()
}

/// The entries of this process; a fork child's copy of its parent's are forgotten first.
fn with_kept<R>(f: impl FnOnce(&mut Vec<Entry>) -> R) -> Option<R> {
    // Never waits: another thread in the cache (or a fork being made) just skips it.
    let mut k = KEPT.try_lock().ok()?;
    if k.pid != sys::getpid() {
        // A fork that ran no atfork handlers (a raw clone): as `fork_child`.
        forget_parents(&mut k);
    }
    Some(f(&mut k.entries))
}

/// Keeps an ended connection's ring. Its side is marked released (Release: every access of
/// ours comes before) and the mapping is kept out of fork children.
pub(crate) fn keep(e: Entry) {
    // A peer in another pid namespace (pid 0 names nothing here), or a server side without
    // the client's pidfd (it could never tell the client is still the same process).
    if e.peer_pid <= 0 || (e.side == 1 && e.pidfd.is_none()) {
        return;
    }
    e.map
        .u32_at(Layout::released(e.side))
        .store(1, Ordering::Release);
    if e.map.dontfork(true).is_err() {
        return; // dropped: unmapped
    }
    let evicted = with_kept(move |v| {
        // A fork since the connection started, up to the DONTFORK just made: the child may
        // hold the mapping. (A fork from here on waits for this lock.)
        if !may_keep(e.keep_from, sys::getpid()) {
            return vec![e];
        }
        let old = (v.len() >= CAP).then(|| v.remove(0));
        v.push(e);
        old.into_iter().collect()
    });
    drop(evicted); // outside the lock
}

/// Client: the tokens of the rings it kept in `scope` (newest first), for its Offer.
pub(crate) fn client_tokens(scope: u64) -> Vec<u64> {
    if !ENABLED.load(Ordering::Relaxed) {
        return Vec::new();
    }
    with_kept(|v| {
        v.iter()
            .rev()
            .filter(|e| e.side == 0 && e.scope == scope)
            .map(|e| e.token)
            .take(OFFER_TOKENS)
            .collect()
    })
    .unwrap_or_default()
}

/// Server: a kept ring for a new connection from process `peer` (pid, uid), whose Offer named
/// `tokens`, with `layout`; reset for it, with `new_token` written.
pub(crate) fn take_server(
    peer: (i32, u32),
    tokens: &[u64],
    layout: &Layout,
    new_token: u64,
) -> Option<(Mapping, Fd)> {
    if peer.0 <= 0 || tokens.is_empty() {
        return None;
    }
    let Entry { map, memfd, .. } = take(|e| {
        e.side == 1
            && e.peer_pid == peer.0
            && e.peer_uid == peer.1
            && tokens.contains(&e.token)
            && e.layout == *layout
            && e.memfd.is_some()
            && e.map.u32_at(Layout::released(0)).load(Ordering::Acquire) == 1
            && peer_alive(e)
    })?;
    reset(&map, new_token);
    Some((map, memfd.expect("checked above")))
}

/// Client: the kept mapping of the memfd `ino`, if it has `layout`.
pub(crate) fn take_client(ino: (u64, u64), layout: &Layout) -> Option<Mapping> {
    take(|e| e.side == 0 && e.ino == ino && e.layout == *layout).map(|e| e.map)
}

/// The first kept entry `wanted` picks, taken out of the cache and inherited by fork children
/// again, as a live connection's mapping must be.
fn take(wanted: impl Fn(&Entry) -> bool) -> Option<Entry> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let e = with_kept(|v| {
        let i = v.iter().position(&wanted)?;
        Some(v.remove(i))
    })??;
    e.map.dontfork(false).ok()?;
    REUSED.fetch_add(1, Ordering::Relaxed);
    Some(e)
}

/// Whether the pid the entry names is still the process it shared the ring with (a dead one's
/// pid may name another process now): its pidfd is not readable yet.
fn peer_alive(e: &Entry) -> bool {
    e.pidfd.as_ref().is_some_and(sys::pidfd_alive)
}

/// Zeroes what a connection leaves in the header and both side blocks (the creator's reset; a
/// fresh memfd is all zero) and names the new use with `token`. Slot contents need none: only
/// announced slots are ever read, and only the two processes that wrote them can.
fn reset(map: &Mapping, token: u64) {
    map.u64_at(Layout::reuse_token())
        .store(token, Ordering::Relaxed);
    for side in 0..2 {
        map.u64_at(Layout::owner_gen(side))
            .store(0, Ordering::Relaxed);
        map.u32_at(Layout::ring_always(side))
            .store(0, Ordering::Relaxed);
        map.u32_at(Layout::aborted(side))
            .store(0, Ordering::Relaxed);
        map.u32_at(Layout::released(side))
            .store(0, Ordering::Relaxed);
        map.u64_at(Layout::rx_posted(side))
            .store(0, Ordering::Relaxed);
        map.u64_at(Layout::tx_produced(side))
            .store(0, Ordering::Relaxed);
        map.u32_at(Layout::want_bell(side))
            .store(0, Ordering::Relaxed);
        map.u32_at(Layout::want_drain(side))
            .store(0, Ordering::Relaxed);
        for i in 0..KEYS {
            map.u64_at(Layout::key_entry(side, i))
                .store(0, Ordering::Relaxed);
        }
    }
    // The client reads all this after the Answer reaches it: the sendmsg and recvmsg order
    // it, as they order a fresh memfd's first stores.
}

/// Unmaps the rings whose peer died or that were not used for [`IDLE`]; how many are kept
/// after. The progress thread calls it a few times a second.
pub fn sweep() -> usize {
    let gone = with_kept(|v| {
        let now = Instant::now();
        let (keep, gone): (Vec<Entry>, Vec<Entry>) = std::mem::take(v).into_iter().partition(|e| {
            now.duration_since(e.since) < IDLE && (e.pidfd.is_none() || peer_alive(e))
        });
        *v = keep;
        (gone, v.len())
    });
    match gone {
        Some((gone, n)) => {
            drop(gone);
            n
        }
        None => 0,
    }
}

/// How many rings this process kept (and how many it took back), for statistics and tests.
pub fn counts() -> (usize, u64) {
    (
        with_kept(|v| v.len()).unwrap_or(0),
        REUSED.load(Ordering::Relaxed),
    )
}
