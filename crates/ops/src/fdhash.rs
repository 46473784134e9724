//! The hasher of the library's maps keyed by descriptor numbers, epoll data and addresses.
//!
//! std's default (SipHash, keyed per process) guards a map against keys an attacker picks; the
//! keys here are the process's own descriptor numbers and pointers, and the maps sit on every
//! data call of an offloaded socket (`offload::lookup`) and every `epoll_ctl` of an event
//! loop. redis-benchmark spent 9% of its time in SipHash under the preload (2026-11-27).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// One multiply per word (the golden-ratio constant), the well-mixed high half rotated down
/// so that the table's bucket index (low bits) and its tag (top 7 bits) both depend on every
/// bit of the key: pointers, whose low bits are all zero, spread as well as small integers.
#[derive(Default, Clone, Copy)]
pub struct FdHasher(u64);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for FdHasher {
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(K);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_i32(&mut self, n: i32) {
        self.write_u64(u64::from(n as u32));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

pub type FdHash = BuildHasherDefault<FdHasher>;
pub type FdMap<K, V> = HashMap<K, V, FdHash>;
pub type FdSet<K> = HashSet<K, FdHash>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Keys of the shapes the maps hold land in distinct buckets of a small table: small
    /// descriptor numbers, and 64-byte aligned addresses.
    #[test]
    fn fds_and_aligned_addresses_spread_over_the_buckets() {
        let h = FdHash::default();
        for keys in [
            (0..64i32).map(|k| h.hash_one(k)).collect::<Vec<_>>(),
            (0..64usize)
                .map(|k| h.hash_one(0x7f00_1234_0000usize + k * 64))
                .collect(),
        ] {
            let buckets: std::collections::HashSet<u64> = keys.iter().map(|x| x & 127).collect();
            assert!(
                buckets.len() >= 40,
                "{} of 64 keys in distinct buckets",
                buckets.len()
            );
            let tags: std::collections::HashSet<u64> = keys.iter().map(|x| x >> 57).collect();
            assert!(tags.len() >= 30, "{} distinct tags", tags.len());
        }
    }
}
