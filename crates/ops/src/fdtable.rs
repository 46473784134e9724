//! The fd-indexed table of sockets libsdp tracks.
//!
//! INVARIANT: the lookup path used by every hook for every fd is two atomic loads, takes no
//! lock and never allocates, so it is safe inside signal handlers and costs nothing measurable
//! for files, pipes and foreign sockets. Only `socket`/`accept`/`dup` of a tracked socket
//! allocate (a chunk of slots, once, never freed: the table is bounded by the fd limit).
//!
//! Under `--cfg loom` (crates/models/tests/loom_fdtable.rs compiles this very file) the atomics
//! are loom's, the table is tiny and the top level is a per-execution lazy static; nothing
//! else changes.

#[cfg(loom)]
use loom::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

#[cfg(not(loom))]
const CHUNK_BITS: usize = 10;
#[cfg(not(loom))]
const TOP_SLOTS: usize = 4096;
// A model explores every interleaving: two slots per chunk and two chunks (fds 0..4) are
// enough to race two creators of one chunk and to use two chunks.
#[cfg(loom)]
const CHUNK_BITS: usize = 1;
#[cfg(loom)]
const TOP_SLOTS: usize = 2;
const CHUNK_SLOTS: usize = 1 << CHUNK_BITS;

/// Highest fd number (exclusive) the table can track: 4 Mi, above any RLIMIT_NOFILE Linux
/// allows by default (`fs.nr_open` is 1 Mi).
pub const MAX_FDS: usize = CHUNK_SLOTS * TOP_SLOTS;

struct Chunk {
    slots: [AtomicU64; CHUNK_SLOTS],
}

#[cfg(not(loom))]
static TOP: [AtomicPtr<Chunk>; TOP_SLOTS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; TOP_SLOTS];
#[cfg(loom)]
loom::lazy_static! {
    static ref TOP: [AtomicPtr<Chunk>; TOP_SLOTS] =
        std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut()));
}

impl Chunk {
    #[cfg(not(loom))]
    fn new() -> Box<Chunk> {
        Box::new(Chunk {
            slots: [const { AtomicU64::new(0) }; CHUNK_SLOTS],
        })
    }

    #[cfg(loom)]
    fn new() -> Box<Chunk> {
        Box::new(Chunk {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }
}

/// What libsdp knows about one fd, packed in one word so that readers never see half an update.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Meta(pub u64);

impl Meta {
    pub const TRACKED: u64 = 1;
    pub const INET6: u64 = 1 << 1;
    /// Created as `AF_INET_OFFLOAD`: the program asked for offload explicitly.
    pub const ASKED_OFFLOAD: u64 = 1 << 2;
    /// Created as `AF_INET_DIRECT`: the program asked for offload without TCP fallback.
    pub const ASKED_DIRECT: u64 = 1 << 3;
    pub const LISTENING: u64 = 1 << 4;
    pub const ACCEPTED: u64 = 1 << 5;
    pub const CONNECTED: u64 = 1 << 6;
    /// The fd names the app end of an offloaded connection (see `offload`).
    pub const OFFLOADED: u64 = 1 << 7;
    const DECISION_SHIFT: u32 = 8;
    /// The program set SO_SNDBUF on this socket (or on the listener it was accepted from): the
    /// offloaded stream takes its send buffer's size from the shadow.
    pub const SNDBUF_SET: u64 = 1 << 10;
    /// The same for SO_RCVBUF and the receive window.
    pub const RCVBUF_SET: u64 = 1 << 11;

    pub fn tracked(self) -> bool {
        self.0 & Self::TRACKED != 0
    }

    pub fn has(self, flag: u64) -> bool {
        self.0 & flag != 0
    }

    pub fn with(self, flag: u64) -> Meta {
        Meta(self.0 | flag)
    }

    pub fn without(self, flag: u64) -> Meta {
        Meta(self.0 & !flag)
    }

    /// The policy decision recorded for this socket (0 = none yet, see [`Decision`]).
    pub fn decision(self) -> Option<Decision> {
        Decision::from_bits((self.0 >> Self::DECISION_SHIFT) & 0x3)
    }

    pub fn with_decision(self, d: Decision) -> Meta {
        Meta((self.0 & !(0x3 << Self::DECISION_SHIFT)) | ((d as u64) << Self::DECISION_SHIFT))
    }
}

/// A policy decision as stored in the table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Decision {
    Sdp = 1,
    Tcp = 2,
    Both = 3,
}

impl Decision {
    fn from_bits(b: u64) -> Option<Decision> {
        match b {
            1 => Some(Decision::Sdp),
            2 => Some(Decision::Tcp),
            3 => Some(Decision::Both),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Sdp => "sdp",
            Decision::Tcp => "tcp",
            Decision::Both => "both",
        }
    }
}

impl From<conf::Mode> for Decision {
    fn from(m: conf::Mode) -> Self {
        match m {
            conf::Mode::Sdp => Decision::Sdp,
            conf::Mode::Tcp => Decision::Tcp,
            conf::Mode::Both => Decision::Both,
        }
    }
}

fn slot(fd: i32) -> Option<&'static AtomicU64> {
    let fd = usize::try_from(fd).ok()?;
    if fd >= MAX_FDS {
        return None;
    }
    let chunk = TOP[fd >> CHUNK_BITS].load(Ordering::Acquire);
    if chunk.is_null() {
        return None;
    }
    // SAFETY: a published chunk is never freed or moved (see the module invariant), and it was
    // fully initialised before the Release store that published it.
    let chunk = unsafe { &*chunk };
    Some(&chunk.slots[fd & (CHUNK_SLOTS - 1)])
}

fn slot_or_create(fd: i32) -> Option<&'static AtomicU64> {
    let idx = usize::try_from(fd).ok()?;
    if idx >= MAX_FDS {
        return None;
    }
    let top = &TOP[idx >> CHUNK_BITS];
    if top.load(Ordering::Acquire).is_null() {
        let fresh = Box::into_raw(Chunk::new());
        if top
            .compare_exchange(
                std::ptr::null_mut(),
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            // SAFETY: `fresh` came from Box::into_raw above and was never published.
            drop(unsafe { Box::from_raw(fresh) });
        }
    }
    slot(fd)
}

/// The hook fast path for data calls: the fd's meta word, 0 when untracked. One bounds check
/// and two loads.
#[inline(always)]
pub fn raw(fd: i32) -> u64 {
    let idx = fd as u32 as usize;
    if idx >= MAX_FDS {
        return 0;
    }
    let chunk = TOP[idx >> CHUNK_BITS].load(Ordering::Acquire);
    if chunk.is_null() {
        return 0;
    }
    // SAFETY: as in `slot`: published chunks are never freed and were initialised before
    // the Release store that published them.
    unsafe { (*chunk).slots[idx & (CHUNK_SLOTS - 1)].load(Ordering::Acquire) }
}

/// The hook fast path: is this fd one of ours?
#[inline(always)]
pub fn is_tracked(fd: i32) -> bool {
    match slot(fd) {
        Some(s) => s.load(Ordering::Acquire) & Meta::TRACKED != 0,
        None => false,
    }
}

pub fn get(fd: i32) -> Meta {
    slot(fd).map_or(Meta(0), |s| Meta(s.load(Ordering::Acquire)))
}

pub fn set(fd: i32, meta: Meta) {
    if meta.0 == 0 {
        clear(fd);
    } else if let Some(s) = slot_or_create(fd) {
        s.store(meta.0, Ordering::Release);
    }
}

/// Adds flags to an existing entry; a no-op for untracked fds.
pub fn update(fd: i32, f: impl Fn(Meta) -> Meta) {
    if let Some(s) = slot(fd) {
        let _ = s.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
            if m & Meta::TRACKED == 0 {
                None
            } else {
                Some(f(Meta(m)).0)
            }
        });
    }
}

pub fn clear(fd: i32) {
    if let Some(s) = slot(fd) {
        s.store(0, Ordering::Release);
    }
}

/// The tracked fds in `first..=last`, ascending (for `close_range`: only the chunks of the
/// table that exist are looked at).
pub fn tracked_in(first: u32, last: u32) -> Vec<i32> {
    let mut out = Vec::new();
    let last = (last as usize).min(MAX_FDS - 1);
    let mut fd = first as usize;
    while fd <= last {
        let chunk = TOP[fd >> CHUNK_BITS].load(Ordering::Acquire);
        if chunk.is_null() {
            fd = ((fd >> CHUNK_BITS) + 1) << CHUNK_BITS;
            continue;
        }
        if raw(fd as i32) & Meta::TRACKED != 0 {
            out.push(fd as i32);
        }
        fd += 1;
    }
    out
}

/// `dup`-family bookkeeping: `new` now names the same kernel object as `old`.
pub fn copy(old: i32, new: i32) {
    let m = get(old);
    if m.tracked() {
        // A duplicate shares the open file description: same socket, same decisions.
        set(new, m);
    } else {
        clear(new);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn untracked_fd_is_not_tracked() {
        assert!(!is_tracked(100_000));
        assert!(!is_tracked(-1));
        assert!(!is_tracked(i32::MAX));
    }

    #[test]
    fn set_then_clear_round_trips() {
        set(70_001, Meta(Meta::TRACKED | Meta::INET6));
        assert!(is_tracked(70_001));
        assert!(get(70_001).has(Meta::INET6));
        clear(70_001);
        assert!(!is_tracked(70_001));
    }

    #[test]
    fn decision_is_packed_without_touching_flags() {
        let m = Meta(Meta::TRACKED | Meta::LISTENING).with_decision(Decision::Both);
        assert_eq!(m.decision(), Some(Decision::Both));
        assert!(m.has(Meta::LISTENING));
        assert_eq!(
            m.with_decision(Decision::Tcp).decision(),
            Some(Decision::Tcp)
        );
    }

    #[test]
    fn copy_of_untracked_clears_target() {
        set(70_010, Meta(Meta::TRACKED));
        copy(70_011, 70_010);
        assert!(!is_tracked(70_010));
    }

    #[test]
    fn update_ignores_untracked() {
        update(70_020, |m| m.with(Meta::CONNECTED));
        assert!(!is_tracked(70_020));
    }

    /// Races the hooks' concurrent uses of one chunk (run under Miri by
    /// scripts/sanitizers.sh, whose data-race detector and weak-memory emulation check the
    /// publication of a fresh chunk; crates/models checks the same code with loom).
    #[test]
    fn threads_racing_on_a_fresh_chunk_lose_nothing() {
        const BASE: i32 = 80 * CHUNK_SLOTS as i32;
        for round in 0..4 {
            let fd = BASE + round * 4;
            set(fd + 2, Meta(Meta::TRACKED));
            std::thread::scope(|s| {
                s.spawn(|| set(fd, Meta(Meta::TRACKED | Meta::INET6)));
                s.spawn(|| set(fd + 1, Meta(Meta::TRACKED | Meta::LISTENING)));
                s.spawn(|| update(fd + 2, |m| m.with(Meta::CONNECTED)));
                s.spawn(|| clear(fd + 2));
                let r = raw(fd);
                assert!(
                    r == 0 || r == Meta::TRACKED | Meta::INET6,
                    "torn entry {r:#x}"
                );
            });
            assert_eq!(get(fd), Meta(Meta::TRACKED | Meta::INET6));
            assert_eq!(get(fd + 1), Meta(Meta::TRACKED | Meta::LISTENING));
            // The update either ran before the close or saw it: never a resurrected fd.
            assert!(
                !is_tracked(fd + 2),
                "closed fd came back: {:?}",
                get(fd + 2)
            );
        }
    }
}
