//! Page-aligned anonymous memory for RDMA: the ZCopy buffers of an SDP connection (the
//! sender's staging buffer a SrcAvail offers, the receiver's RDMA READ destination).
//!
//! Never on the malloc heap: `ibv_fork_init` marks registered pages MADV_DONTFORK, so a fork
//! child has no such pages, and freeing a heap chunk there would touch its header on a page
//! that is not mapped. A mapping of our own is unmapped with `munmap`, which a child may call
//! on a range it does not have.

use std::ptr;

/// An anonymous private mapping of at least `len` bytes (a whole number of pages).
pub struct DmaBuf {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by the value alone (no aliasing pointer is handed out beyond
// borrows of `self`), so moving it to another thread moves the only access to it.
unsafe impl Send for DmaBuf {}

impl DmaBuf {
    /// Maps `len` bytes (rounded up to pages); `None` if the kernel refuses (address space or
    /// memory exhausted).
    pub fn new(len: usize) -> Option<DmaBuf> {
        let len = len.max(1).next_multiple_of(4096);
        // SAFETY: an anonymous private mapping, no file; MAP_FAILED is checked.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        Some(DmaBuf {
            base: base.cast(),
            len,
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (a mapping has at least one page); for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte (for registration and work requests).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.base
    }

    /// The address the device sees (the process's virtual address).
    pub fn addr(&self) -> u64 {
        self.base as u64
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable for the value's life.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes mapped writable for the value's life; `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: our mapping, referenced by no one any more (a registration of it must be
        // gone: callers drop the connection holding its keys first).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_whole_pages_zeroed_and_writable() {
        let mut b = DmaBuf::new(5000).expect("mmap");
        assert_eq!(b.len(), 8192);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[8191] = 7;
        assert_eq!(b.as_slice()[8191], 7);
        assert_eq!(b.addr() % 4096, 0);
    }
}
