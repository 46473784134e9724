//! Per-process socket statistics in shared memory, read by `sdp stat`.
//!
//! Each process that tracks a socket maps one file, `/dev/shm/libsdp.<pid>.stat`: a header and a
//! table of slots, one per live socket. Writers are the owning process only; `sdp stat` reads
//! with plain loads. Every field is an atomic 64-bit word, so a reader never sees a torn value
//! (a row may mix values from two instants, which statistics tolerate).
//!
//! ```text
//! header (64 words)  0 magic | 1 version | 2 pid | 3 nslots | 4..11 program[64 B]
//!                    16 epoll_wait calls that busy-polled   17 ... of them satisfied while spinning
//!                    18 blocking receives that busy-polled  19 ... of them satisfied while spinning
//!                    20 sends that waited for credits (all sockets, closed ones included)
//!                    32 + reason code: sockets decided, by fallback reason (32: offloaded)
//! slot   (24 words)  0 meta: used(8) transport(8) state(8) role(8) reason(16)
//!                    1 fd
//!                    2 local family|port   3,4 local address (IPv6 or v4-mapped)
//!                    5 remote family|port  6,7 remote address
//!                    8 bytes sent  9 bytes received  10 messages sent  11 messages received
//!                    12 send credits  13 posted receive buffers
//!                    14 sends that waited for credits  15 blocking receives satisfied while
//!                    spinning  16 ZCopy bytes sent  17 ZCopy bytes received  18..23 reserved
//! ```
//!
//! The per-reason totals count every socket once, under its latest reason (a pending client
//! that goes back to TCP moves from "offloaded" to its fallback reason); a TCP listener that
//! publishes a beacon is not a fallback and is not counted.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

pub const MAGIC: u64 = 0x7473_5f70_6473_626c; // "lbsdp_st"
pub const VERSION: u64 = 3;
pub const HEADER_WORDS: usize = 64;
pub const SLOT_WORDS: usize = 24;
pub const NSLOTS: usize = 16384;
/// Sockets on kernel TCP get a compact row (meta and fd: the kernel has the rest, which
/// `sdp stat` reads from procfs), after the full rows: a program that libsdp leaves on TCP
/// pays 16 bytes of statistics per socket, not a whole row.
pub const TCP_WORDS: usize = 2;
pub const NTCP: usize = 16384;
/// Header word holding the number of compact rows.
pub const HEADER_NTCP: usize = 12;
/// Header word: the process's start time (field 22 of `/proc/<pid>/stat`, clock ticks since
/// boot; 0 when unknown). A process killed with SIGKILL leaves its file behind, and another
/// process may get its pid later: `sdp stat` shows the file only while the start times agree.
pub const HEADER_START: usize = 13;

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The command (field 2) is in
/// parentheses and may hold spaces and parentheses: the fields are counted after the last `)`.
pub fn start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&c| c == b')')?;
    std::str::from_utf8(&stat[close + 1..])
        .ok()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}
pub const TCP_BASE: usize = HEADER_WORDS + NSLOTS * SLOT_WORDS;
pub const FILE_BYTES: usize = (TCP_BASE + NTCP * TCP_WORDS) * 8;

/// The directory and name pattern `sdp stat` scans.
pub const DIR: &str = "/dev/shm";
pub const PREFIX: &str = "libsdp.";
pub const SUFFIX: &str = ".stat";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Transport {
    Tcp = 1,
    Shm = 2,
    Rdma = 3,
}

impl Transport {
    pub fn from_u8(v: u8) -> Option<Transport> {
        match v {
            1 => Some(Transport::Tcp),
            2 => Some(Transport::Shm),
            3 => Some(Transport::Rdma),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Shm => "shm",
            Transport::Rdma => "rdma",
        }
    }
}

/// Word offsets inside a slot.
pub mod field {
    pub const META: usize = 0;
    pub const FD: usize = 1;
    pub const LOCAL: usize = 2;
    pub const REMOTE: usize = 5;
    pub const BYTES_TX: usize = 8;
    pub const BYTES_RX: usize = 9;
    pub const MSGS_TX: usize = 10;
    pub const MSGS_RX: usize = 11;
    pub const CREDITS_TX: usize = 12;
    pub const POSTED_RX: usize = 13;
    pub const CREDIT_STALLS: usize = 14;
    pub const SPIN_HITS: usize = 15;
    pub const ZCOPY_TX: usize = 16;
    pub const ZCOPY_RX: usize = 17;
}

/// Word offsets inside the header: process-wide counters.
pub mod header {
    pub const EPOLL_SPINS: usize = 16;
    pub const EPOLL_SPIN_HITS: usize = 17;
    pub const RECV_SPINS: usize = 18;
    pub const RECV_SPIN_HITS: usize = 19;
    pub const CREDIT_STALLS: usize = 20;
    /// `epoll_ctl` calls of the application not made in the kernel (`offload::lazy`).
    pub const EPOLL_CTL_SAVED: usize = 21;
    /// `shm` connections set up on the ring of an ended connection with the same peer process
    /// (`ib_verbs::shm::reuse`) instead of a new one.
    pub const RINGS_REUSED: usize = 22;
    /// Bell bytes this process wrote into its peers' app ends (`shm`): one per message that
    /// found its reader asleep or waiting in the kernel; none for what a busy-polling reader
    /// takes.
    pub const BELLS_RUNG: usize = 23;
    /// Stream bytes this process's `shm` connections copied once, not twice: sent from the
    /// application's buffer straight into the peer's ring, and read from our ring straight
    /// into the application's buffer.
    pub const DIRECT_TX: usize = 24;
    pub const DIRECT_RX: usize = 25;
    /// `REASONS + code`: sockets decided with that fallback reason (code 0: offloaded).
    pub const REASONS: usize = 32;
    pub const NREASONS: usize = 32;
}

/// A send found no room because the peer had given no credits for the bytes queued before it:
/// counted on the socket's row and for the process.
pub fn credit_stall(row: Option<&Row>) {
    if let Some(r) = row {
        r.add(field::CREDIT_STALLS, 1);
    }
    bump(header::CREDIT_STALLS, 1);
}

/// A blocking receive found data while busy-polling, before sleeping in the kernel.
pub fn spin_hit(row: Option<&Row>) {
    if let Some(r) = row {
        r.add(field::SPIN_HITS, 1);
    }
    bump(header::RECV_SPIN_HITS, 1);
}

/// Adds `n` to a process-wide counter of the header (nothing if there is no table).
#[inline]
pub fn bump(word: usize, n: u64) {
    if let Some(t) = table() {
        t[word].fetch_add(n, Ordering::Relaxed);
    }
}

/// The per-reason bucket a meta word counts in, if any (see the module doc).
fn reason_bucket(m: u64) -> Option<usize> {
    let (used, transport, _, _, reason) = unmeta(m);
    if !used {
        return None;
    }
    let code = if transport == Transport::Tcp as u8 {
        if reason == 0 {
            return None; // an SDP listener's kernel socket, not a fallback
        }
        reason as usize
    } else {
        0
    };
    (code < header::NREASONS).then_some(header::REASONS + code)
}

/// Packs the meta word.
pub fn meta(transport: Transport, state: u8, role: u8, reason: u16) -> u64 {
    1 | (transport as u64) << 8 | (state as u64) << 16 | (role as u64) << 24 | (reason as u64) << 32
}

/// Unpacks the meta word: (used, transport, state, role, reason).
pub fn unmeta(m: u64) -> (bool, u8, u8, u8, u16) {
    (
        m & 0xff != 0,
        (m >> 8) as u8,
        (m >> 16) as u8,
        (m >> 24) as u8,
        (m >> 32) as u16,
    )
}

/// Encodes a socket address in three words.
pub fn encode_addr(a: Option<SocketAddr>) -> [u64; 3] {
    match a {
        None => [0; 3],
        Some(a) => {
            let (fam, ip) = match a.ip() {
                IpAddr::V4(v4) => (4u64, v4.to_ipv6_mapped()),
                IpAddr::V6(v6) => (6u64, v6),
            };
            let o = ip.octets();
            let hi = u64::from_be_bytes(o[..8].try_into().expect("8 bytes"));
            let lo = u64::from_be_bytes(o[8..].try_into().expect("8 bytes"));
            [fam << 16 | a.port() as u64, hi, lo]
        }
    }
}

pub fn decode_addr(w: [u64; 3]) -> Option<SocketAddr> {
    let fam = w[0] >> 16;
    let port = w[0] as u16;
    let mut o = [0u8; 16];
    o[..8].copy_from_slice(&w[1].to_be_bytes());
    o[8..].copy_from_slice(&w[2].to_be_bytes());
    let v6 = Ipv6Addr::from(o);
    match fam {
        4 => v6
            .to_ipv4_mapped()
            .map(|v4| SocketAddr::new(IpAddr::V4(v4), port)),
        6 => Some(SocketAddr::new(IpAddr::V6(v6), port)),
        _ => None,
    }
}

/// Where the next free-row search starts (rows are claimed and freed in roughly FIFO order).
static HINT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static TCP_HINT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static TABLE: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
static OWNER: AtomicU64 = AtomicU64::new(0);

/// This process's table, created on first use. `None` if /dev/shm is unusable (statistics are
/// then simply not published; nothing else depends on them).
fn table() -> Option<&'static [AtomicU64]> {
    let pid = crate::sys::getpid() as u64;
    let mut p = TABLE.load(Ordering::Acquire);
    if p.is_null() || OWNER.load(Ordering::Acquire) != pid {
        p = create(pid)?;
    }
    // SAFETY: p maps FILE_BYTES bytes, aligned to a page, for the life of the process (never
    // unmapped); AtomicU64 has the layout of u64.
    Some(unsafe { std::slice::from_raw_parts(p, FILE_BYTES / 8) })
}

#[cold]
fn create(pid: u64) -> Option<*mut AtomicU64> {
    let fd = open_fresh(&format!("{DIR}/{PREFIX}{pid}{SUFFIX}\0"))?;
    // SAFETY: fd is ours; ftruncate and mmap of a regular file we just created.
    let p = unsafe {
        if libc::syscall(libc::SYS_ftruncate, fd, FILE_BYTES as libc::off_t) != 0 {
            libc::syscall(libc::SYS_close, fd);
            return None;
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            FILE_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        libc::syscall(libc::SYS_close, fd);
        p
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let words = p as *mut AtomicU64;
    // SAFETY: the mapping is FILE_BYTES long; the header is the first HEADER_WORDS words.
    let header = unsafe { std::slice::from_raw_parts(words, HEADER_WORDS) };
    header[1].store(VERSION, Ordering::Relaxed);
    header[2].store(pid, Ordering::Relaxed);
    header[3].store(NSLOTS as u64, Ordering::Relaxed);
    header[HEADER_NTCP].store(NTCP as u64, Ordering::Relaxed);
    if let Some(t) = ib_verbs::sys::read_small_file("/proc/self/stat", 4096)
        .ok()
        .and_then(|b| start_time(&b))
    {
        header[HEADER_START].store(t, Ordering::Relaxed);
    }
    let prog = crate::state::try_globals()
        .map(|g| g.program.clone())
        .unwrap_or_default();
    let mut name = [0u8; 64];
    let n = prog.len().min(63);
    name[..n].copy_from_slice(&prog.as_bytes()[..n]);
    for (i, chunk) in name.chunks(8).enumerate() {
        header[4 + i].store(
            u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
            Ordering::Relaxed,
        );
    }
    header[0].store(MAGIC, Ordering::Release);
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registering a plain function; it runs at normal process exit.
        unsafe { libc::atexit(remove_own_file) };
    });
    TABLE.store(words, Ordering::Release);
    OWNER.store(pid, Ordering::Release);
    Some(words)
}

/// Opens a new file at `path` (NUL-terminated), never the one a process that had our pid
/// before us left there (killed with SIGKILL, it never removed it): that one is unlinked
/// first and the new one made with `O_EXCL`, a new inode. `sdp stat` removes a file whose
/// header names another process only while the path still leads to the inode it read
/// (`stat::remove_if_same`); truncating the old inode in place, as before 2026-11-26, let
/// it unlink our new file in the instant between its read and its unlink, and this process's
/// counters were gone from `sdp stat` for the rest of its life.
fn open_fresh(path: &str) -> Option<i32> {
    debug_assert!(path.ends_with('\0'));
    for _ in 0..2 {
        // SAFETY: path is NUL-terminated; raw syscalls keep our own hooks out of the way.
        unsafe { libc::syscall(libc::SYS_unlinkat, libc::AT_FDCWD, path.as_ptr(), 0) };
        // SAFETY: as above.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o644,
            )
        } as i32;
        if fd >= 0 {
            return Some(fd);
        }
        if crate::sys::errno() != libc::EEXIST {
            return None;
        }
    }
    None
}

/// Removes this process's statistics file if it has one (at exit, `_exit` included).
pub fn remove_own() {
    remove_own_file();
}

extern "C" fn remove_own_file() {
    let owner = OWNER.load(Ordering::Acquire);
    if owner != 0 && owner == crate::sys::getpid() as u64 {
        remove_file(owner);
    }
}

/// Removes this process's statistics file (at exit, or in `sdp stat` for dead processes).
pub fn remove_file(pid: u64) {
    let path = format!("{DIR}/{PREFIX}{pid}{SUFFIX}\0");
    // SAFETY: NUL-terminated path.
    unsafe { libc::syscall(libc::SYS_unlinkat, libc::AT_FDCWD, path.as_ptr(), 0) };
}

/// One socket's row. Dropping it frees the row.
pub struct Row {
    words: &'static [AtomicU64],
}

impl Row {
    /// Claims a free row; `None` when the table is full or unavailable.
    pub fn claim(fd: i32, transport: Transport, role: u8) -> Option<Row> {
        let t = table()?;
        let m = meta(transport, 0, role, 0);
        let (hint, first, n, width) = if transport == Transport::Tcp {
            (&TCP_HINT, TCP_BASE, NTCP, TCP_WORDS)
        } else {
            (&HINT, HEADER_WORDS, NSLOTS, SLOT_WORDS)
        };
        let start = hint.load(Ordering::Relaxed);
        for k in 0..n {
            let i = (start + k) % n;
            let base = first + i * width;
            if t[base]
                .compare_exchange(0, m, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                let words = &t[base..base + width];
                for w in &words[1..] {
                    w.store(0, Ordering::Relaxed);
                }
                words[field::FD].store(fd as u64, Ordering::Relaxed);
                if let Some(b) = reason_bucket(m) {
                    t[b].fetch_add(1, Ordering::Relaxed);
                }
                hint.store(i + 1, Ordering::Relaxed);
                return Some(Row { words });
            }
        }
        None
    }

    /// Whether the row lives in this process's table (not a parent's, inherited by fork).
    pub fn is_ours(&self) -> bool {
        OWNER.load(Ordering::Acquire) == crate::sys::getpid() as u64 && {
            let t = TABLE.load(Ordering::Acquire) as usize;
            let p = self.words.as_ptr() as usize;
            p >= t && p < t + FILE_BYTES
        }
    }

    pub fn set_meta(&self, transport: Transport, state: u8, role: u8, reason: u16) {
        let new = meta(transport, state, role, reason);
        let old = self.words[field::META].swap(new, Ordering::AcqRel);
        let (was, now) = (reason_bucket(old), reason_bucket(new));
        if was != now
            && let Some(t) = table()
            && self.is_ours()
        {
            // The socket moves to its latest reason: it stays counted once.
            if let Some(b) = was {
                t[b].fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(b) = now {
                t[b].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn set_fd(&self, fd: i32) {
        self.words[field::FD].store(fd as u64, Ordering::Relaxed);
    }

    pub fn set_addrs(&self, local: Option<SocketAddr>, remote: Option<SocketAddr>) {
        if self.words.len() < SLOT_WORDS {
            return; // a compact (TCP) row: the kernel has the 4-tuple
        }
        for (off, a) in [(field::LOCAL, local), (field::REMOTE, remote)] {
            for (i, w) in encode_addr(a).into_iter().enumerate() {
                self.words[off + i].store(w, Ordering::Relaxed);
            }
        }
    }

    #[inline]
    pub fn add(&self, field: usize, n: u64) {
        if let Some(w) = self.words.get(field) {
            w.fetch_add(n, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn set(&self, field: usize, v: u64) {
        if let Some(w) = self.words.get(field) {
            w.store(v, Ordering::Relaxed);
        }
    }
}

impl Drop for Row {
    fn drop(&mut self) {
        self.words[field::META].store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_statistics_file_is_replaced_not_reused() {
        use std::os::unix::fs::MetadataExt;
        let path = format!("{DIR}/libsdp-test.{}.stale", std::process::id());
        std::fs::write(&path, b"left by a killed process").unwrap();
        let old = std::fs::File::open(&path).unwrap();
        let fd = open_fresh(&format!("{path}\0")).expect("a fresh file");
        // SAFETY: fd is ours.
        let new_ino = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(fd, &mut st), 0);
            libc::close(fd);
            st.st_ino
        };
        let at_path = std::fs::metadata(&path).unwrap().ino();
        assert_eq!(at_path, new_ino, "the path leads to the new file");
        assert_ne!(new_ino, old.metadata().unwrap().ino(), "a new inode");
        let mut kept = String::new();
        std::io::Read::read_to_string(&mut &old, &mut kept).unwrap();
        assert_eq!(
            kept, "left by a killed process",
            "the old inode was not truncated"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn start_time_is_field_22_even_after_an_odd_command_name() {
        let line = b"4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                     1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(start_time(line), Some(987654));
        let own = std::fs::read("/proc/self/stat").unwrap();
        assert!(start_time(&own).is_some_and(|t| t > 0));
        assert_eq!(start_time(b"garbage"), None);
        assert_eq!(start_time(b"1 (x) S 1"), None);
    }

    #[test]
    fn addr_round_trips_v4_and_v6() {
        for a in ["127.0.0.1:80", "[::1]:443", "[fe80::1]:1"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(decode_addr(encode_addr(Some(a))), Some(a));
        }
        assert_eq!(decode_addr(encode_addr(None)), None);
    }

    #[test]
    fn meta_round_trips() {
        let m = meta(Transport::Shm, 3, 2, 513);
        assert_eq!(unmeta(m), (true, Transport::Shm as u8, 3, 2, 513));
    }
}
