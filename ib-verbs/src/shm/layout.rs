//! Where everything lives in the connection's memfd.
//!
//! The layout is a pure function of the four negotiated numbers (each side's receive depth
//! and buffer size), computed privately by both sides: no offset is ever read from the shared
//! memory itself.
//!
//! ```text
//! offset 0      +---------------------------------------------------------------+
//!               | header: magic "libsdp-shm-v1" (informational only)             |
//!   +16 / +24   | owner_gen u64 for side 0 / side 1 (see ShmConn::claim)          |
//!   +32 / +36   | ring_always u32, +40 / +44 aborted u32, +48 / +52 released u32 |
//!   +56         | reuse_token u64: the creator's random name of this use of the ring |
//! 64            +---- side 0 (active) block, written by side 0 --------------------+
//!   +0          | rx_posted   u64  buffers side 0 ever posted in its receive ring  |
//!   +64         | tx_produced u64  messages side 0 ever wrote into side 1's ring    |
//!   +128        | want_bell   u32  side 0 may sleep: 0, or the number of the message |
//!               |                  to ring its bell for (the peer clears it)       |
//!   +192        | want_drain  u32  side 0 is out of room: drain its bell end when  |
//!               |                  giving it credits (peer clears)                 |
//!   +256        | key table: KEYS x { key u64, addr u64, len u64, pad u64 }        |
//! 64+SIDE       +---- side 1 (passive) block, same shape ------------------------+
//! RINGS (4096)  +---- ring 0: side 0's receive buffers (side 1 writes) -----------+
//!               | slot 0: len u32 | reserved u32 | payload (buf_size)   ... pad to 64 |
//!               | slot 1 ...                                                      |
//!               +---- ring 1: side 1's receive buffers (side 0 writes) -----------+
//!               | ...                                                            |
//! total         +--------------------------------------- (rounded to 4096) -------+
//! ```
//!
//! Every counter lives on its own 64-byte line so the two writers never share one.

/// Cache line; every independently written word gets its own.
pub const LINE: usize = 64;
/// Registration slots per side for `RemoteRead` keys.
pub const KEYS: usize = 32;
/// Bytes of a key table entry.
pub const KEY_ENTRY: usize = 32;
/// Bytes before the payload in a slot.
pub const SLOT_HEADER: usize = 8;
/// Header size (magic).
pub const HEADER: usize = 64;
/// Bytes of one side's control block.
pub const SIDE_BLOCK: usize = 256 + KEYS * KEY_ENTRY;
/// Start of the rings: page aligned.
pub const RINGS: usize = 4096;
/// Informational magic at offset 0.
pub const MAGIC: &[u8; 16] = b"libsdp-shm-v1\0\0\0";

/// Smallest receive buffer (one BSDH plus some bytes).
pub const MIN_BUF: u32 = 64;
/// Largest receive buffer: 1 MiB.
pub const MAX_BUF: u32 = 1 << 20;
/// Largest receive depth.
pub const MAX_DEPTH: u32 = 4096;
/// Largest mapping: 256 MiB.
pub const MAX_TOTAL: usize = 256 << 20;

/// One ring's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingShape {
    pub depth: u32,
    pub buf_size: u32,
}

impl RingShape {
    /// Checks the numbers against the limits; a peer's numbers are checked here before use.
    pub fn validate(self) -> Result<RingShape, &'static str> {
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return Err("receive depth out of range");
        }
        if self.buf_size < MIN_BUF || self.buf_size > MAX_BUF {
            return Err("receive buffer size out of range");
        }
        Ok(self)
    }

    /// Bytes between the starts of two slots.
    pub fn stride(self) -> usize {
        (SLOT_HEADER + self.buf_size as usize).div_ceil(LINE) * LINE
    }

    fn bytes(self) -> usize {
        self.stride() * self.depth as usize
    }
}

/// The whole mapping's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `rings[s]` holds side `s`'s receive buffers.
    pub rings: [RingShape; 2],
    pub total: usize,
}

impl Layout {
    pub fn new(ring0: RingShape, ring1: RingShape) -> Result<Layout, &'static str> {
        let ring0 = ring0.validate()?;
        let ring1 = ring1.validate()?;
        let total = (RINGS + ring0.bytes() + ring1.bytes()).div_ceil(4096) * 4096;
        if total > MAX_TOTAL {
            return Err("shared mapping too large");
        }
        Ok(Layout {
            rings: [ring0, ring1],
            total,
        })
    }

    fn side(side: usize) -> usize {
        HEADER + side * SIDE_BLOCK
    }

    /// Side `side`'s owner generation: bumped by the process that acts for that side, so that
    /// a process whose private copy of the side's state went stale (another process, forked
    /// from the same one, used the connection since) can tell (see `ShmConn::claim`). Its top
    /// bit says that the last owner left the side (`ShmConn::vacate`).
    pub fn owner_gen(side: usize) -> usize {
        16 + side * 8
    }

    /// Side `side`'s "ring my bell on every message" flag (u32): set by a side whose
    /// application waits edge-triggered, so that each arrival is an edge, as with TCP.
    pub fn ring_always(side: usize) -> usize {
        32 + side * 4
    }

    /// Side `side`'s "I reset the connection" flag (u32): set by a side that aborts (SO_LINGER
    /// 0, close with unread bytes) before it lets go, so that the other side reports a reset
    /// (ECONNRESET) rather than an orderly end once it has taken what was sent before.
    pub fn aborted(side: usize) -> usize {
        40 + side * 4
    }

    /// Side `side`'s "released" flag (u32): set by a side whose connection ended and that kept
    /// the ring for the next connection with the same peer process (`reuse`), after its last
    /// access; the creator reuses the ring only once the other side set it.
    pub fn released(side: usize) -> usize {
        48 + side * 4
    }

    /// The ring's reuse token (u64): a random number the creator writes at each use of the
    /// ring. A client that kept the ring names it in its next Offer, which proves the server
    /// that the client still holds the mapping (`reuse`): nobody else can read it.
    pub fn reuse_token() -> usize {
        56
    }

    /// Side `side`'s count of posted receive buffers.
    pub fn rx_posted(side: usize) -> usize {
        Self::side(side)
    }

    /// Side `side`'s count of messages written into the other side's ring.
    pub fn tx_produced(side: usize) -> usize {
        Self::side(side) + LINE
    }

    /// Side `side`'s "ring my bell" flag.
    pub fn want_bell(side: usize) -> usize {
        Self::side(side) + 2 * LINE
    }

    /// Side `side`'s "drain my bell end when you post buffers" flag: the side stuffed its app
    /// end's send direction (so it polls not-writable) and waits for credits.
    pub fn want_drain(side: usize) -> usize {
        Self::side(side) + 3 * LINE
    }

    /// Entry `i` of side `side`'s key table: key, addr, len at +0, +8, +16.
    pub fn key_entry(side: usize, i: usize) -> usize {
        debug_assert!(i < KEYS);
        Self::side(side) + 256 + i * KEY_ENTRY
    }

    /// Start of slot `slot` of side `side`'s receive ring.
    pub fn slot(&self, side: usize, slot: u32) -> usize {
        let base = if side == 0 {
            RINGS
        } else {
            RINGS + self.rings[0].bytes()
        };
        base + slot as usize * self.rings[side].stride()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_valid_shapes_fit_and_never_overlap() {
        let l = Layout::new(
            RingShape {
                depth: 8,
                buf_size: 100,
            },
            RingShape {
                depth: 3,
                buf_size: 4096,
            },
        )
        .unwrap();
        assert_eq!(l.rings[0].stride(), 128);
        assert_eq!(l.total % 4096, 0);
        assert!(Layout::key_entry(1, KEYS - 1) + KEY_ENTRY <= RINGS);
        assert!(Layout::key_entry(0, KEYS - 1) + KEY_ENTRY <= Layout::rx_posted(1));
        assert_eq!(l.slot(1, 0), l.slot(0, 7) + 128);
        assert!(l.slot(1, 2) + l.rings[1].stride() <= l.total);
    }

    #[test]
    fn layout_hostile_shapes_rejected() {
        let ok = RingShape {
            depth: 4,
            buf_size: 4096,
        };
        assert!(
            Layout::new(
                RingShape {
                    depth: 0,
                    buf_size: 4096
                },
                ok
            )
            .is_err()
        );
        assert!(
            Layout::new(
                RingShape {
                    depth: u32::MAX,
                    buf_size: 4096
                },
                ok
            )
            .is_err()
        );
        assert!(
            Layout::new(
                ok,
                RingShape {
                    depth: 4,
                    buf_size: 1
                }
            )
            .is_err()
        );
        assert!(
            Layout::new(
                ok,
                RingShape {
                    depth: 4096,
                    buf_size: MAX_BUF
                }
            )
            .is_err()
        );
    }
}
