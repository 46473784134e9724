//! The shared mapping, and the only code that touches it.
//!
//! Every access is bounds-checked against the length *we* mapped (a private value), so no
//! value read from the mapping can move an access outside it. The memfd is sealed against
//! shrinking (checked before mapping), so no access can fault with SIGBUS.
//!
//! The peer writes this memory concurrently and may be hostile. It is only ever accessed
//! through raw pointers and atomics, never through Rust references to plain data: index
//! words are `AtomicU64`/`AtomicU32` (the ordering contract of the ring is in `ring.rs`), and
//! message bytes are copied into private memory before anything interprets them. A torn or
//! changing copy can only produce wrong bytes, every byte value is a valid `u8`, and the
//! consumer validates what it parses.

use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::sys::{Fd, SysError, SysResult};

/// A `MAP_SHARED` read-write mapping of a whole memfd.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all access goes through atomics or
// raw copies, which are sound from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only allows atomic operations and raw copies.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and read-write. The caller has checked that the file is
    /// exactly `len` bytes and sealed against shrinking.
    pub fn map(fd: &Fd, len: usize) -> SysResult<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel (null hint), overlapping nothing of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.raw(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(SysError {
                op: "mmap",
                errno: crate::sys::errno(),
            });
        }
        Ok(Mapping {
            ptr: p as *mut u8,
            len,
        })
    }

    /// `MADV_DONTFORK` (`true`) or `MADV_DOFORK`: whether a fork child inherits the mapping.
    pub fn dontfork(&self, on: bool) -> SysResult<()> {
        let advice = if on {
            libc::MADV_DONTFORK
        } else {
            libc::MADV_DOFORK
        };
        // SAFETY: advice on the whole range this value mapped; it changes no content.
        let rc = unsafe { libc::madvise(self.ptr as *mut libc::c_void, self.len, advice) };
        if rc != 0 {
            return Err(SysError {
                op: "madvise",
                errno: crate::sys::errno(),
            });
        }
        Ok(())
    }

    /// The mapped length.
    pub fn size(&self) -> usize {
        self.len
    }

    fn check(&self, off: usize, n: usize, align: usize) {
        // INVARIANT: offsets come from the private layout, never from shared memory; a
        // failure here is a bug of ours, not the peer's.
        assert!(
            off.checked_add(n).is_some_and(|end| end <= self.len) && off.is_multiple_of(align),
            "shared mapping access out of layout: {off}+{n} of {}",
            self.len
        );
    }

    /// The 64-bit atomic word at `off`.
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: `off..off+8` is inside the live mapping and 8-aligned (page-aligned base);
        // the memory is only ever accessed atomically at this offset by both processes, and the
        // reference does not outlive `self`, which keeps the mapping.
        unsafe { AtomicU64::from_ptr(self.ptr.add(off) as *mut u64) }
    }

    /// The 32-bit atomic word at `off`.
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4, 4);
        // SAFETY: as for `u64_at`, with 4 bytes and 4-alignment.
        unsafe { AtomicU32::from_ptr(self.ptr.add(off) as *mut u32) }
    }

    /// Copies `out.len()` bytes at `off` out of the mapping.
    pub fn read(&self, off: usize, out: &mut [u8]) {
        self.check(off, out.len(), 1);
        // SAFETY: the source range is inside the live mapping; the destination is our private
        // slice; they cannot overlap (the mapping is never handed out as a slice).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), out.len()) }
    }

    /// Copies `src` into the mapping at `off`.
    pub fn write(&self, off: usize, src: &[u8]) {
        self.check(off, src.len(), 1);
        // SAFETY: the destination range is inside the live mapping; the source is a private
        // slice that cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is the mapping this value created and no reference into it
        // outlives `self`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// A private, heap-allocated probe word whose address is sent to the peer: if the peer can
/// read its cookie with `process_vm_readv`, the kernel permits RDMA READ emulation toward us.
#[derive(Debug)]
pub struct Probe {
    cell: Box<[u64; 2]>,
}

impl Probe {
    pub fn new(cookie: u64) -> Probe {
        Probe {
            cell: Box::new([cookie, !cookie]),
        }
    }

    /// The address the peer reads.
    pub fn addr(&self) -> u64 {
        self.cell.as_ptr() as usize as u64
    }

    /// Whether we can read the peer's probe at `addr` holding `cookie`.
    pub fn peer_readable(pid: i32, addr: u64, cookie: u64) -> bool {
        let mut got = [0u64; 2];
        match crate::sys::process_vm_readv(pid, got.as_mut_ptr() as *mut u8, addr, 16) {
            Ok(16) => got == [cookie, !cookie],
            _ => false,
        }
    }
}

#[cfg(test)]
impl Mapping {
    /// Test support: a private anonymous mapping of `len` bytes, the one kind of mapping Miri
    /// can make (it cannot map a memfd), so that the accessors run under Miri.
    fn anonymous(len: usize) -> Mapping {
        // SAFETY: a fresh anonymous mapping chosen by the kernel, overlapping nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "anonymous mmap");
        Mapping {
            ptr: p as *mut u8,
            len,
        }
    }
}

/// The accessors on plain memory, so that Miri (scripts/sanitizers.sh) checks the unsafe code
/// of this module: bounds, alignment, and the race-freedom of the ring's copies when the
/// indices are published as conn.rs does.
#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::layout::{Layout, RingShape, SLOT_HEADER};
    use super::*;

    fn layout() -> Layout {
        let r = RingShape {
            depth: 2,
            buf_size: 64,
        };
        Layout::new(r, r).unwrap()
    }

    #[test]
    fn accessors_round_trip_at_layout_offsets() {
        let l = layout();
        let m = Mapping::anonymous(l.total);
        assert_eq!(m.size(), l.total);
        m.u64_at(Layout::rx_posted(1)).store(7, Ordering::Release);
        m.u32_at(Layout::want_bell(0)).store(1, Ordering::Release);
        m.write(l.slot(1, 1) + SLOT_HEADER, b"payload");
        let mut out = [0u8; 7];
        m.read(l.slot(1, 1) + SLOT_HEADER, &mut out);
        assert_eq!(&out, b"payload");
        assert_eq!(m.u64_at(Layout::rx_posted(1)).load(Ordering::Acquire), 7);
        assert_eq!(m.u32_at(Layout::want_bell(0)).load(Ordering::Acquire), 1);
        // The last byte of the mapping is reachable, one past it is not.
        m.write(l.total - 1, &[9]);
    }

    #[test]
    #[should_panic(expected = "out of layout")]
    fn copy_past_the_end_refused() {
        let m = Mapping::anonymous(4096);
        m.write(4090, &[0u8; 7]);
    }

    #[test]
    #[should_panic(expected = "out of layout")]
    fn misaligned_word_refused() {
        let m = Mapping::anonymous(4096);
        m.u64_at(12);
    }

    /// One direction of the ring through the real accessors: the sender's payload copy is
    /// published by the Release store of `tx_produced`, the receiver's reuse of a slot by the
    /// Release store of `rx_posted` (conn.rs). Miri reports a data race if either is missing.
    #[test]
    fn ring_copies_are_ordered_by_the_indices() {
        const MSGS: u64 = 6;
        let l = layout();
        let depth = l.rings[1].depth as u64;
        let m = Mapping::anonymous(l.total);
        m.u64_at(Layout::rx_posted(1))
            .store(depth, Ordering::Release);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..MSGS {
                    while m.u64_at(Layout::rx_posted(1)).load(Ordering::Acquire) == i {
                        std::thread::yield_now();
                    }
                    let slot = l.slot(1, (i % depth) as u32);
                    m.write(slot + SLOT_HEADER, &i.to_le_bytes());
                    m.write(slot, &8u32.to_le_bytes());
                    m.u64_at(Layout::tx_produced(0))
                        .store(i + 1, Ordering::Release);
                }
            });
            for i in 0..MSGS {
                while m.u64_at(Layout::tx_produced(0)).load(Ordering::Acquire) == i {
                    std::thread::yield_now();
                }
                let slot = l.slot(1, (i % depth) as u32);
                let mut hdr = [0u8; 4];
                m.read(slot, &mut hdr);
                assert_eq!(u32::from_le_bytes(hdr), 8);
                let mut body = [0u8; 8];
                m.read(slot + SLOT_HEADER, &mut body);
                assert_eq!(u64::from_le_bytes(body), i);
                m.u64_at(Layout::rx_posted(1))
                    .store(i + 1 + depth, Ordering::Release);
            }
        });
    }
}
