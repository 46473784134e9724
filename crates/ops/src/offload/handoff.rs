//! The rendezvous of an rdma client with the process that accepts its TCP connection
//! (DESIGN §4), when that is not the process that listens: a prefork server's worker.
//!
//! The client's REQ reaches the rdma_cm listener, which belongs to the process that called
//! `listen`; the worker that accepts the TCP connection cannot answer a request id of another
//! process. So the listener's process records each request it holds in a table of shared
//! memory created at `listen` (before the workers are forked, inherited by them). A worker
//! that accepts a connection with no request of its own claims the matching record and writes
//! the rdma_cm port of a listener of its own on the same address; the listener's process,
//! woken by an eventfd in the same table, rejects the request with a redirect to that port
//! (`Request::redirect`), and the client's progress thread sends its REQ there
//! (`SetupError::Redirect`). Everything else is as for a request the listener's process
//! accepts itself.
//!
//! ```text
//! slot (48 bytes): state u32 | listen port u32 | client port u32 | redirect port u32 |
//!                  stamp u64 (seconds) | client address 16 bytes (IPv4 mapped)
//! state: 0 free, 1 being written or read, 2 held by the listener's process, 3 redirected
//! ```
//! Every transition is a compare-and-swap, so the listener's process (expiring or taking a
//! request) and a worker (claiming it) never both win a slot.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const SLOTS: usize = 1024;
/// Records older than this are stale (the listener's process expires requests after 10 s).
const TTL_SECS: u64 = 30;

const FREE: u32 = 0;
const BUSY: u32 = 1;
const HELD: u32 = 2;
const REDIRECTED: u32 = 3;

#[repr(C)]
struct Slot {
    state: AtomicU32,
    listen_port: AtomicU32,
    client_port: AtomicU32,
    redirect: AtomicU32,
    stamp: AtomicU64,
    ip: [AtomicU64; 2],
}

struct Table {
    slots: &'static [Slot],
    /// Rung by a worker after a redirect; watched by the listener's process.
    efd: i32,
}

static TABLE: OnceLock<Option<Table>> = OnceLock::new();

/// One connection: the client's address and TCP port, and the port it connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub ip: IpAddr,
    pub client_port: u16,
    pub listen_port: u16,
}

use crate::sys::now_secs;

fn ip_words(ip: IpAddr) -> [u64; 2] {
    let v6 = match ip {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    };
    let o = v6.octets();
    [
        u64::from_le_bytes(o[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(o[8..].try_into().expect("8 bytes")),
    ]
}

fn ip_of(w: [u64; 2]) -> IpAddr {
    let mut o = [0u8; 16];
    o[..8].copy_from_slice(&w[0].to_le_bytes());
    o[8..].copy_from_slice(&w[1].to_le_bytes());
    let v6 = Ipv6Addr::from(o);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// Creates the table and its eventfd (call at `listen`, before a prefork server forks);
/// returns the eventfd for the listener's process to watch.
pub fn init() -> Option<i32> {
    TABLE
        .get_or_init(|| {
            let len = SLOTS * std::mem::size_of::<Slot>();
            // Zero-filled memory is a table of free slots.
            let p = crate::sys::shared_zeroed(len)?;
            // SAFETY: plain system call; non-blocking so that draining never blocks, and
            // inherited across fork (the workers ring it) but not exec.
            let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if efd < 0 {
                // SAFETY: the mapping made above, referenced by no one.
                unsafe { libc::munmap(p.cast(), len) };
                return None;
            }
            let efd = crate::sys::move_high(efd);
            // SAFETY: `len` bytes, page aligned, never unmapped; Slot is all atomics.
            let slots = unsafe { std::slice::from_raw_parts(p as *const Slot, SLOTS) };
            Some(Table { slots, efd })
        })
        .as_ref()
        .map(|t| t.efd)
}

fn table() -> Option<&'static Table> {
    TABLE.get().and_then(|t| t.as_ref())
}

fn start(k: &Key) -> usize {
    (usize::from(k.client_port) ^ (usize::from(k.listen_port) << 16)).wrapping_mul(2654435761)
        % SLOTS
}

fn matches(s: &Slot, k: &Key) -> bool {
    s.client_port.load(Ordering::Relaxed) == u32::from(k.client_port)
        && s.listen_port.load(Ordering::Relaxed) == u32::from(k.listen_port)
        && [
            s.ip[0].load(Ordering::Relaxed),
            s.ip[1].load(Ordering::Relaxed),
        ] == ip_words(k.ip)
}

/// The listener's process holds a request for `k` (a worker may claim it).
pub fn hold(k: Key) -> bool {
    let Some(t) = table() else { return false };
    let now = now_secs();
    let i0 = start(&k);
    for n in 0..SLOTS {
        let s = &t.slots[(i0 + n) % SLOTS];
        let st = s.state.load(Ordering::Acquire);
        let stale = st != FREE
            && st != BUSY
            && now.saturating_sub(s.stamp.load(Ordering::Relaxed)) > TTL_SECS;
        if !(st == FREE || stale)
            || s.state
                .compare_exchange(st, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            continue;
        }
        let w = ip_words(k.ip);
        s.ip[0].store(w[0], Ordering::Relaxed);
        s.ip[1].store(w[1], Ordering::Relaxed);
        s.client_port
            .store(u32::from(k.client_port), Ordering::Relaxed);
        s.listen_port
            .store(u32::from(k.listen_port), Ordering::Relaxed);
        s.redirect.store(0, Ordering::Relaxed);
        s.stamp.store(now, Ordering::Relaxed);
        s.state.store(HELD, Ordering::Release);
        return true;
    }
    false
}

/// Finds `k`'s slot in `state` and moves it to BUSY; the caller finishes the transition.
fn grab(t: &Table, k: &Key, state: u32) -> Option<&'static Slot> {
    let i0 = start(k);
    (0..SLOTS).map(|n| &t.slots[(i0 + n) % SLOTS]).find(|s| {
        s.state.load(Ordering::Acquire) == state
            && matches(s, k)
            && s.state
                .compare_exchange(state, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    })
}

/// The listener's process no longer holds `k`'s request (it accepted or expired it). `false`
/// if a worker claimed it first (the redirect is then the listener's to send).
pub fn release(k: Key) -> bool {
    let Some(t) = table() else { return true };
    match grab(t, &k, HELD) {
        Some(s) => {
            s.state.store(FREE, Ordering::Release);
            true
        }
        None => false,
    }
}

/// A worker accepted `k`'s TCP connection: if the listener's process holds its request, asks
/// for a redirect to `port` (rings the listener's process) and returns true.
pub fn claim(k: Key, port: u16) -> bool {
    let Some(t) = table() else { return false };
    let Some(s) = grab(t, &k, HELD) else {
        return false;
    };
    s.redirect.store(u32::from(port), Ordering::Relaxed);
    s.stamp.store(now_secs(), Ordering::Relaxed);
    s.state.store(REDIRECTED, Ordering::Release);
    let one: u64 = 1;
    // SAFETY: writing 8 bytes to the table's eventfd.
    unsafe { libc::write(t.efd, (&one as *const u64).cast(), 8) };
    true
}

/// Whether the listener's process holds a request for `k` (a worker's cheap first look).
pub fn held(k: Key) -> bool {
    table().is_some_and(|t| {
        let i0 = start(&k);
        (0..SLOTS)
            .map(|n| &t.slots[(i0 + n) % SLOTS])
            .any(|s| s.state.load(Ordering::Acquire) == HELD && matches(s, &k))
    })
}

/// The listener's process: drains the eventfd and takes every redirect asked for.
pub fn take_redirects() -> Vec<(Key, u16)> {
    let Some(t) = table() else {
        return Vec::new();
    };
    let mut n: u64 = 0;
    // SAFETY: reading 8 bytes from our non-blocking eventfd.
    unsafe { libc::read(t.efd, (&mut n as *mut u64).cast(), 8) };
    let mut out = Vec::new();
    for s in t.slots {
        if s.state.load(Ordering::Acquire) != REDIRECTED
            || s.state
                .compare_exchange(REDIRECTED, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            continue;
        }
        let k = Key {
            ip: ip_of([
                s.ip[0].load(Ordering::Relaxed),
                s.ip[1].load(Ordering::Relaxed),
            ]),
            client_port: s.client_port.load(Ordering::Relaxed) as u16,
            listen_port: s.listen_port.load(Ordering::Relaxed) as u16,
        };
        let port = s.redirect.load(Ordering::Relaxed) as u16;
        s.state.store(FREE, Ordering::Release);
        out.push((k, port));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> Key {
        Key {
            ip: "192.168.77.1".parse().unwrap(),
            client_port: port,
            listen_port: 7000,
        }
    }

    #[test]
    fn a_held_request_is_claimed_once_and_redirected_once() {
        assert!(init().is_some());
        let k = key(40001);
        assert!(!held(k));
        assert!(hold(k));
        assert!(held(k));
        assert!(claim(k, 50001));
        assert!(!claim(k, 50002), "claimed twice");
        assert!(!release(k), "the listener released a claimed request");
        let r = take_redirects();
        assert!(r.contains(&(k, 50001)), "{r:?}");
        assert!(!take_redirects().contains(&(k, 50001)));
        assert!(!held(k));
    }

    #[test]
    fn a_released_request_cannot_be_claimed_and_keys_differ_by_every_field() {
        assert!(init().is_some());
        let k = key(40002);
        assert!(hold(k));
        let mut other = k;
        other.listen_port = 7001;
        assert!(!held(other));
        other = k;
        other.ip = "192.168.77.2".parse().unwrap();
        assert!(!claim(other, 1));
        assert!(release(k));
        assert!(!claim(k, 50003));
    }

    #[test]
    fn ipv6_addresses_round_trip() {
        for ip in ["::1", "fe80::1", "10.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_of(ip_words(ip)), ip);
        }
    }
}
