//! Client intents recorded by a beacon, in memory that forked listeners share (DESIGN §4).
//!
//! A prefork server listens (and publishes its beacon) in one process and accepts in its forked
//! workers; whichever process's progress thread answers a probe must leave the intent where the
//! accepting worker finds it. So the table lives in an anonymous shared mapping created at the
//! first `listen`, before the workers are forked, and inherited by them.
//!
//! ```text
//! slot (80 bytes): state u32 | uid u32 | stamp u64 (seconds) | intent 54 bytes in 7 words |
//!                  pid i32 | pad u32
//! state: 0 free, 1 being written or taken, 2 ready
//! extra of slot i (320 bytes, after all the slots): length u16 + up to 318 bytes (the
//!                  client's Offer) in 40 words, owned with slot i
//! ```
//! The extras are apart from the slots so that a lookup, which walks slots, stays on 80-byte
//! strides (a plain TCP client's lookup walks them all).
//! Writers claim a free slot with a compare-and-swap 0→1 and publish with a Release store of 2;
//! a taker claims a ready slot 2→1, copies it and frees it: a slot is never read half-written.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use ib_verbs::shm::Intent;

const SLOTS: usize = 4096;
const WORDS: usize = 7;
/// Words of the bytes that came after the intent (length and bytes).
const EXTRA_WORDS: usize = (2 + ib_verbs::shm::beacon::MAX_EXTRA).div_ceil(8);
/// Intents older than this are stale (the client gave up, or went TCP after its timeout).
const TTL_SECS: u64 = 30;

#[repr(C)]
struct Slot {
    state: AtomicU32,
    uid: AtomicU32,
    stamp: AtomicU64,
    words: [AtomicU64; WORDS],
    /// The client's pid, as the beacon's SO_PEERCRED gave it.
    pid: AtomicI32,
    _pad: AtomicU32,
}

type Extra = [AtomicU64; EXTRA_WORDS];

struct Table {
    slots: &'static [Slot],
    extras: &'static [Extra],
}

static TABLE: OnceLock<Option<Table>> = OnceLock::new();

use crate::sys::now_secs;

/// Creates the shared table (call at `listen`, before a prefork server forks its workers).
pub fn init() {
    TABLE.get_or_init(|| {
        let len = SLOTS * (std::mem::size_of::<Slot>() + std::mem::size_of::<Extra>());
        // Zero-filled memory is a valid table of free slots.
        let p = crate::sys::shared_zeroed(len)?;
        // SAFETY: the mapping is `len` bytes, page aligned, never unmapped; Slot and Extra are
        // all atomics (8-aligned: the extras start at SLOTS * 72 bytes).
        let (slots, extras) = unsafe {
            (
                std::slice::from_raw_parts(p as *const Slot, SLOTS),
                std::slice::from_raw_parts(
                    (p as *const u8).add(SLOTS * std::mem::size_of::<Slot>()) as *const Extra,
                    SLOTS,
                ),
            )
        };
        Some(Table { slots, extras })
    });
}

fn table() -> Option<&'static Table> {
    TABLE.get().and_then(|t| t.as_ref())
}

fn pack(intent: &Intent) -> [u64; WORDS] {
    let b = intent.encode();
    let mut w = [0u64; WORDS];
    for (i, chunk) in b.chunks(8).enumerate().take(WORDS) {
        let mut a = [0u8; 8];
        a[..chunk.len()].copy_from_slice(chunk);
        w[i] = u64::from_le_bytes(a);
    }
    w
}

fn unpack(w: &[u64; WORDS]) -> Option<Intent> {
    let mut b: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    b.truncate(intent_len());
    Intent::decode(&b)
}

fn pack_extra(extra: &[u8]) -> [u64; EXTRA_WORDS] {
    let mut b = [0u8; EXTRA_WORDS * 8];
    let n = extra.len().min(ib_verbs::shm::beacon::MAX_EXTRA);
    b[..2].copy_from_slice(&(n as u16).to_le_bytes());
    b[2..2 + n].copy_from_slice(&extra[..n]);
    let mut w = [0u64; EXTRA_WORDS];
    for (i, chunk) in b.chunks(8).enumerate() {
        w[i] = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    w
}

fn unpack_extra(w: &[u64; EXTRA_WORDS]) -> Vec<u8> {
    let b: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    let n = (u16::from_le_bytes([b[0], b[1]]) as usize).min(ib_verbs::shm::beacon::MAX_EXTRA);
    b[2..2 + n].to_vec()
}

fn intent_len() -> usize {
    let any: SocketAddr = "0.0.0.0:0".parse().expect("literal");
    Intent {
        client: any,
        server: any,
        nonce: [0; 16],
    }
    .encode()
    .len()
}

/// Records an intent (its client's uid and pid from the beacon's SO_PEERCRED) and the bytes
/// that came after it (the client's Offer; at most `MAX_EXTRA`, more are refused).
pub fn insert(intent: &Intent, extra: &[u8], uid: u32, pid: i32) -> bool {
    let Some(t) = table() else { return false };
    if extra.len() > ib_verbs::shm::beacon::MAX_EXTRA {
        return false;
    }
    let now = now_secs();
    let words = pack(intent);
    let extra = pack_extra(extra);
    let start = (intent.client.port() as usize).wrapping_mul(2654435761) % SLOTS;
    for k in 0..SLOTS {
        let i = (start + k) % SLOTS;
        let s = &t.slots[i];
        let st = s.state.load(Ordering::Acquire);
        // A free slot, or a stale ready one, may be (re)used.
        let reusable =
            st == 0 || (st == 2 && now.saturating_sub(s.stamp.load(Ordering::Relaxed)) > TTL_SECS);
        if !reusable
            || s.state
                .compare_exchange(st, 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            continue;
        }
        for (d, v) in s.words.iter().zip(words) {
            d.store(v, Ordering::Relaxed);
        }
        for (d, v) in t.extras[i].iter().zip(extra) {
            d.store(v, Ordering::Relaxed);
        }
        s.uid.store(uid, Ordering::Relaxed);
        s.pid.store(pid, Ordering::Relaxed);
        s.stamp.store(now, Ordering::Relaxed);
        s.state.store(2, Ordering::Release);
        return true;
    }
    false
}

/// A recorded intent, taken.
pub struct Taken {
    pub intent: Intent,
    /// The client's uid and pid, from the beacon's SO_PEERCRED.
    pub uid: u32,
    pub pid: i32,
    /// The bytes that came after the intent (the client's Offer).
    pub extra: Vec<u8>,
}

/// Takes the intent of the connection from `client` to our `port`, if one was recorded.
pub fn take(
    client: SocketAddr,
    port: u16,
    normalize: impl Fn(SocketAddr) -> SocketAddr,
) -> Option<Taken> {
    let t = table()?;
    let now = now_secs();
    let start = (client.port() as usize).wrapping_mul(2654435761) % SLOTS;
    for k in 0..SLOTS {
        let i = (start + k) % SLOTS;
        let s = &t.slots[i];
        if s.state.load(Ordering::Acquire) != 2 {
            continue;
        }
        let mut w = [0u64; WORDS];
        for (d, v) in w.iter_mut().zip(&s.words) {
            *d = v.load(Ordering::Relaxed);
        }
        let Some(intent) = unpack(&w) else { continue };
        if normalize(intent.client) != client || intent.server.port() != port {
            continue;
        }
        if s.state
            .compare_exchange(2, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue; // another worker took it
        }
        let uid = s.uid.load(Ordering::Relaxed);
        let pid = s.pid.load(Ordering::Relaxed);
        let fresh = now.saturating_sub(s.stamp.load(Ordering::Relaxed)) <= TTL_SECS;
        // Re-read under our claim: the words we matched are the ones we return.
        for (d, v) in w.iter_mut().zip(&s.words) {
            *d = v.load(Ordering::Relaxed);
        }
        let mut x = [0u64; EXTRA_WORDS];
        for (d, v) in x.iter_mut().zip(&t.extras[i]) {
            *d = v.load(Ordering::Relaxed);
        }
        s.state.store(0, Ordering::Release);
        let intent = unpack(&w)?;
        return fresh.then(|| Taken {
            intent,
            uid,
            pid,
            extra: unpack_extra(&x),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_intent_fits_its_slot_and_round_trips() {
        assert!(intent_len() <= WORDS * 8);
        // A lookup walks slots: they stay small, the Offers live apart.
        assert_eq!(std::mem::size_of::<Slot>(), 80);
        let i = Intent {
            client: "[2001:db8::1]:40000".parse().unwrap(),
            server: "127.0.0.1:80".parse().unwrap(),
            nonce: [7; 16],
        };
        assert_eq!(unpack(&pack(&i)), Some(i));
    }

    #[test]
    fn inserted_intent_is_taken_once() {
        init();
        let i = Intent {
            client: "127.0.0.1:40001".parse().unwrap(),
            server: "127.0.0.1:8080".parse().unwrap(),
            nonce: [9; 16],
        };
        let offer = vec![5u8; ib_verbs::shm::beacon::MAX_EXTRA];
        let got = |t: Option<Taken>| t.map(|t| (t.intent, t.uid, t.pid, t.extra));
        assert!(insert(&i, &offer, 1000, 4321));
        assert_eq!(got(take(i.client, 8081, |a| a)), None);
        assert_eq!(
            got(take(i.client, 8080, |a| a)),
            Some((i, 1000, 4321, offer))
        );
        assert_eq!(got(take(i.client, 8080, |a| a)), None);
        assert!(!insert(
            &i,
            &[0; ib_verbs::shm::beacon::MAX_EXTRA + 1],
            1000,
            4321
        ));
        assert!(insert(&i, &[], 1000, 7));
        assert_eq!(
            got(take(i.client, 8080, |a| a)),
            Some((i, 1000, 7, Vec::new()))
        );
    }
}
