//! `sdp stat`: every stream socket of every running libsdp process, read from the
//! per-process statistics files the library keeps in shared memory (`ops::stats`).
//!
//! Files of processes that no longer exist are removed on the way.
//!
//! After the sockets comes a summary: how many sockets each process decided, by fallback
//! reason (since it started, and among the live ones), and the process-wide counters
//! (busy-poll hits, credit stalls). `--watch N` redraws the whole listing every N seconds.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use ops::stats::{self, Transport, field, header};

/// One socket as `sdp stat` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketRow {
    pub pid: u64,
    pub program: String,
    pub fd: i64,
    pub role: &'static str,
    pub transport: &'static str,
    pub reason: &'static str,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub bytes_tx: u64,
    pub bytes_rx: u64,
    pub msgs_tx: u64,
    pub msgs_rx: u64,
    pub credits_tx: u64,
    pub posted_rx: u64,
    /// Sends that found no room and waited for the peer's credits.
    pub credit_stalls: u64,
    /// Blocking receives satisfied while busy-polling.
    pub spin_hits: u64,
    /// Bytes moved by RDMA (ZCopy) each way; the rest of `bytes_*` went by BCopy.
    pub zcopy_tx: u64,
    pub zcopy_rx: u64,
}

/// One process's header: its counters and its sockets decided, by reason.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessRow {
    pub pid: u64,
    pub program: String,
    pub epoll_spins: u64,
    pub epoll_spin_hits: u64,
    pub recv_spins: u64,
    pub recv_spin_hits: u64,
    pub credit_stalls: u64,
    pub epoll_ctl_saved: u64,
    pub rings_reused: u64,
    pub bells_rung: u64,
    pub direct_tx: u64,
    pub direct_rx: u64,
    /// Sockets decided since the process started, indexed by reason code (0: offloaded).
    pub reasons: Vec<u64>,
}

/// What one statistics file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStats {
    pub process: ProcessRow,
    pub rows: Vec<SocketRow>,
}

/// The name a reason bucket has in the summary (the offloaded bucket is not a fallback).
pub fn bucket_name(code: usize) -> &'static str {
    match code {
        0 => "offloaded",
        c => fallback::Reason::from_code(c as u16).map_or("?", fallback::Reason::as_str),
    }
}

impl SocketRow {
    /// The summary bucket this live socket counts in (as the library counts it), if any.
    pub fn bucket(&self) -> Option<usize> {
        if self.transport != "tcp" {
            return Some(0);
        }
        fallback::Reason::ALL
            .iter()
            .find(|r| r.as_str() == self.reason && r.code() != 0)
            .map(|r| r.code() as usize)
    }
}

fn word(b: &[u8], i: usize) -> u64 {
    let o = i * 8;
    b.get(o..o + 8)
        .map_or(0, |s| u64::from_ne_bytes(s.try_into().expect("8 bytes")))
}

/// Parses one statistics file. `None`: not a libsdp statistics file (or another version's).
pub fn parse_file(b: &[u8]) -> Option<FileStats> {
    if b.len() < stats::HEADER_WORDS * 8
        || word(b, 0) != stats::MAGIC
        || word(b, 1) != stats::VERSION
    {
        return None;
    }
    let pid = word(b, 2);
    let nslots = (word(b, 3) as usize).min((b.len() / 8 - stats::HEADER_WORDS) / stats::SLOT_WORDS);
    let name: Vec<u8> = (0..8)
        .flat_map(|i| word(b, 4 + i).to_le_bytes())
        .take_while(|&c| c != 0)
        .collect();
    let program = String::from_utf8_lossy(&name).into_owned();
    let mut rows = Vec::new();
    for i in 0..nslots {
        let base = stats::HEADER_WORDS + i * stats::SLOT_WORDS;
        let w = |f: usize| word(b, base + f);
        let (used, transport, _state, role, reason) = stats::unmeta(w(field::META));
        if !used {
            continue;
        }
        let addr = |off: usize| stats::decode_addr([w(off), w(off + 1), w(off + 2)]);
        rows.push(SocketRow {
            pid,
            program: program.clone(),
            fd: w(field::FD) as i32 as i64,
            role: match role {
                1 => "client",
                2 => "server",
                _ => "-",
            },
            transport: Transport::from_u8(transport).map_or("?", Transport::as_str),
            reason: fallback::Reason::from_code(reason).map_or("?", fallback::Reason::as_str),
            local: addr(field::LOCAL),
            remote: addr(field::REMOTE),
            bytes_tx: w(field::BYTES_TX),
            bytes_rx: w(field::BYTES_RX),
            msgs_tx: w(field::MSGS_TX),
            msgs_rx: w(field::MSGS_RX),
            credits_tx: w(field::CREDITS_TX),
            posted_rx: w(field::POSTED_RX),
            credit_stalls: w(field::CREDIT_STALLS),
            spin_hits: w(field::SPIN_HITS),
            zcopy_tx: w(field::ZCOPY_TX),
            zcopy_rx: w(field::ZCOPY_RX),
        });
    }
    // Compact rows of sockets on kernel TCP: meta and fd (the 4-tuple comes from procfs).
    let ntcp = (word(b, stats::HEADER_NTCP) as usize)
        .min((b.len() / 8).saturating_sub(stats::TCP_BASE) / stats::TCP_WORDS);
    for i in 0..ntcp {
        let base = stats::TCP_BASE + i * stats::TCP_WORDS;
        let (used, transport, _state, role, reason) = stats::unmeta(word(b, base + field::META));
        if !used {
            continue;
        }
        rows.push(SocketRow {
            pid,
            program: program.clone(),
            fd: word(b, base + field::FD) as i32 as i64,
            role: match role {
                1 => "client",
                2 => "server",
                _ => "-",
            },
            transport: Transport::from_u8(transport).map_or("?", Transport::as_str),
            reason: fallback::Reason::from_code(reason).map_or("?", fallback::Reason::as_str),
            local: None,
            remote: None,
            bytes_tx: 0,
            bytes_rx: 0,
            msgs_tx: 0,
            msgs_rx: 0,
            credits_tx: 0,
            posted_rx: 0,
            credit_stalls: 0,
            spin_hits: 0,
            zcopy_tx: 0,
            zcopy_rx: 0,
        });
    }
    let h = |i: usize| word(b, i);
    let process = ProcessRow {
        pid,
        program,
        epoll_spins: h(header::EPOLL_SPINS),
        epoll_spin_hits: h(header::EPOLL_SPIN_HITS),
        recv_spins: h(header::RECV_SPINS),
        recv_spin_hits: h(header::RECV_SPIN_HITS),
        credit_stalls: h(header::CREDIT_STALLS),
        epoll_ctl_saved: h(header::EPOLL_CTL_SAVED),
        rings_reused: h(header::RINGS_REUSED),
        bells_rung: h(header::BELLS_RUNG),
        direct_tx: h(header::DIRECT_TX),
        direct_rx: h(header::DIRECT_RX),
        reasons: (0..fallback::Reason::ALL.len())
            .map(|c| h(header::REASONS + c))
            .collect(),
    };
    Some(FileStats { process, rows })
}

/// The kernel's 4-tuple of a process's TCP socket, for rows the library leaves without one
/// (sockets that stay on kernel TCP): fd → socket inode → /proc/<pid>/net/tcp{,6}.
/// What one `collect` learned of the kernel's TCP sockets: this namespace's by inode (one
/// sock_diag dump, TIME_WAIT left out), and the procfs tables of processes whose sockets the
/// dump did not have (another network namespace).
#[derive(Default)]
struct KernelTables {
    diag: Option<HashMap<u32, (SocketAddr, SocketAddr)>>,
    procfs: HashMap<(u64, bool), String>,
}

fn kernel_addrs(pid: u64, fd: i64, tables: &mut KernelTables) -> Option<(SocketAddr, SocketAddr)> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let link = link.to_string_lossy();
    let inode = link
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .to_string();
    let diag = tables.diag.get_or_insert_with(|| {
        // Every state but TIME_WAIT (6), which has no descriptor: a busy host keeps tens of
        // thousands of those, and procfs formats each one (tens of milliseconds a look).
        let states = ((1u32 << 13) - 2) & !(1 << 6);
        let canon = |a: SocketAddr| match a.ip() {
            std::net::IpAddr::V6(v) => v
                .to_ipv4_mapped()
                .map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
            _ => a,
        };
        [libc::AF_INET, libc::AF_INET6]
            .iter()
            .filter_map(|&f| ib_verbs::sys::tcp_sockets(f, states, 0).ok())
            .flatten()
            .map(|s| (s.inode, (canon(s.local), canon(s.remote))))
            .collect()
    });
    if let Some(a) = inode.parse::<u32>().ok().and_then(|i| diag.get(&i)) {
        return Some(*a);
    }
    let tables = &mut tables.procfs;
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        // One read of each table per process and listing, however many rows need it.
        let text = tables.entry((pid, v6)).or_insert_with(|| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default()
        });
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && cols[9] == inode {
                return Some((parse_proc_addr(cols[1], v6)?, parse_proc_addr(cols[2], v6)?));
            }
        }
    }
    None
}

/// LINUX: procfs prints an address as 32-bit words in host byte order, then `:port` in hex.
fn parse_proc_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(|w| w.to_ne_bytes());
    let ip: std::net::IpAddr = if v6 {
        if ip.len() != 32 {
            return None;
        }
        let mut o = [0u8; 16];
        for i in 0..4 {
            o[i * 4..i * 4 + 4].copy_from_slice(&word(&ip[i * 8..i * 8 + 8])?);
        }
        let v6 = std::net::Ipv6Addr::from(o);
        v6.to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
    } else {
        std::net::Ipv4Addr::from(word(ip)?).into()
    };
    Some(SocketAddr::new(ip, port))
}

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the statistics file at `path` if it is still the file `f` (the same inode): the
/// library replaces a stale file with a new inode (`ops::stats`), never rewrites it in place.
fn remove_if_same(path: &std::path::Path, f: &std::fs::File) {
    use std::os::unix::fs::MetadataExt;
    let (Ok(now), Ok(ours)) = (std::fs::symlink_metadata(path), f.metadata()) else {
        return;
    };
    if now.ino() == ours.ino() && now.dev() == ours.dev() {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether the statistics file `b` was written by the process that has `pid` now: the start
/// time in its header is that process's (a file without one is taken as it is).
fn same_process(pid: u64, b: &[u8]) -> bool {
    if b.len() < stats::HEADER_WORDS * 8 {
        return true;
    }
    let recorded = word(b, stats::HEADER_START);
    if recorded == 0 {
        return true;
    }
    std::fs::read(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stats::start_time(&s))
        .is_none_or(|now| now == recorded)
}

/// Every socket of every live libsdp process.
pub fn collect() -> Vec<SocketRow> {
    collect_all().0
}

/// Every socket and every process header of the live libsdp processes.
pub fn collect_all() -> (Vec<SocketRow>, Vec<ProcessRow>) {
    let mut out = Vec::new();
    let mut procs = Vec::new();
    let mut tables = KernelTables::default();
    let Ok(dir) = std::fs::read_dir(stats::DIR) else {
        return (out, procs);
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(stats::PREFIX)
            .and_then(|r| r.strip_suffix(stats::SUFFIX))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u64>() else {
            continue;
        };
        // One open file for the checks and the removal: a process that gets this pid now
        // makes a new file (a new inode) at the same path, and must not lose it.
        let Ok(mut f) = std::fs::File::open(e.path()) else {
            continue;
        };
        if !alive(pid) {
            remove_if_same(&e.path(), &f);
            continue;
        }
        let mut b = Vec::new();
        if std::io::Read::read_to_end(&mut f, &mut b).is_err() {
            continue;
        }
        if !same_process(pid, &b) {
            // Left by a process killed with SIGKILL whose pid another process has now.
            remove_if_same(&e.path(), &f);
            continue;
        }
        if let Some(FileStats { process, rows }) = parse_file(&b) {
            procs.push(process);
            for mut r in rows {
                if r.transport == "tcp"
                    && r.local.is_none()
                    && let Some((l, p)) = kernel_addrs(r.pid, r.fd, &mut tables)
                {
                    r.local = Some(l);
                    r.remote = (p.port() != 0).then_some(p);
                }
                out.push(r);
            }
        }
    }
    out.sort_by_key(|r| (r.pid, r.fd));
    procs.sort_by_key(|p| p.pid);
    (out, procs)
}

fn addr(a: &Option<SocketAddr>) -> String {
    a.map_or("-".to_string(), |a| a.to_string())
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// How `sdp stat` runs: once, or every `watch` seconds (`count` times, or until interrupted).
#[derive(Debug, Clone, Copy, Default)]
pub struct StatOpts {
    pub json: bool,
    pub watch: Option<u64>,
    pub count: Option<u64>,
}

pub fn stat(opts: StatOpts) -> ExitCode {
    // A closed pipe (`sdp stat | head`) ends the listing quietly.
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sdp stat: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: StatOpts) -> std::io::Result<()> {
    let Some(every) = opts.watch else {
        let mut out = std::io::stdout().lock();
        return print(&mut out, opts.json);
    };
    // LINUX: like watch(1), clear the terminal between listings; a pipe gets them one after
    // another, each headed by its time.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut n = 0u64;
    loop {
        {
            let mut out = std::io::stdout().lock();
            if tty && !opts.json {
                write!(out, "\x1b[H\x1b[2J")?;
            }
            if !opts.json {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                writeln!(out, "Every {every}s: sdp stat    (unix time {now})")?;
                writeln!(out)?;
            }
            print(&mut out, opts.json)?;
            out.flush()?;
        }
        n += 1;
        if opts.count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(every));
    }
}

/// Per reason bucket: (sockets decided since the processes started, live sockets now).
fn totals(rows: &[SocketRow], procs: &[ProcessRow]) -> Vec<(usize, u64, u64)> {
    (0..fallback::Reason::ALL.len())
        .map(|c| {
            let total = procs
                .iter()
                .map(|p| p.reasons.get(c).copied().unwrap_or(0))
                .sum();
            let live = rows.iter().filter(|r| r.bucket() == Some(c)).count() as u64;
            (c, total, live)
        })
        .filter(|&(_, total, live)| total > 0 || live > 0)
        .collect()
}

fn print(out: &mut impl Write, json: bool) -> std::io::Result<()> {
    let (rows, procs) = collect_all();
    if json {
        for r in &rows {
            writeln!(
                out,
                "{{\"pid\":{},\"program\":{},\"fd\":{},\"role\":\"{}\",\"transport\":\"{}\",\"fallback_reason\":\"{}\",\"local\":{},\"remote\":{},\"bytes_tx\":{},\"bytes_rx\":{},\"msgs_tx\":{},\"msgs_rx\":{},\"credits_tx\":{},\"posted_rx\":{},\"credit_stalls\":{},\"spin_hits\":{},\"zcopy_tx\":{},\"zcopy_rx\":{},\"bcopy_tx\":{},\"bcopy_rx\":{}}}",
                r.pid,
                json_str(&r.program),
                r.fd,
                r.role,
                r.transport,
                r.reason,
                json_str(&addr(&r.local)),
                json_str(&addr(&r.remote)),
                r.bytes_tx,
                r.bytes_rx,
                r.msgs_tx,
                r.msgs_rx,
                r.credits_tx,
                r.posted_rx,
                r.credit_stalls,
                r.spin_hits,
                r.zcopy_tx,
                r.zcopy_rx,
                r.bytes_tx.saturating_sub(r.zcopy_tx),
                r.bytes_rx.saturating_sub(r.zcopy_rx),
            )?;
        }
        // The summary: one object per process (its counters and decisions by reason), then
        // one per reason over all processes. None has a "pid" or "fd" key: readers of the
        // socket lines can tell them apart.
        for p in &procs {
            write!(
                out,
                "{{\"process\":{},\"program\":{},\"epoll_spins\":{},\"epoll_spin_hits\":{},\"recv_spins\":{},\"recv_spin_hits\":{},\"credit_stalls\":{},\"epoll_ctl_saved\":{},\"rings_reused\":{},\"bells_rung\":{},\"direct_tx\":{},\"direct_rx\":{}",
                p.pid,
                json_str(&p.program),
                p.epoll_spins,
                p.epoll_spin_hits,
                p.recv_spins,
                p.recv_spin_hits,
                p.credit_stalls,
                p.epoll_ctl_saved,
                p.rings_reused,
                p.bells_rung,
                p.direct_tx,
                p.direct_rx
            )?;
            for (c, n) in p.reasons.iter().enumerate() {
                write!(out, ",\"{}\":{n}", bucket_name(c))?;
            }
            writeln!(out, "}}")?;
        }
        for (c, total, live) in totals(&rows, &procs) {
            writeln!(
                out,
                "{{\"totals\":\"reason\",\"reason\":\"{}\",\"total\":{total},\"live\":{live}}}",
                bucket_name(c)
            )?;
        }
        return Ok(());
    }
    if rows.is_empty() && procs.is_empty() {
        writeln!(out, "no libsdp processes with stream sockets")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>7} {:<15} {:>5} {:<6} {:<5} {:<22} {:<22} {:>12} {:>12} {:>9} {:>9} {:>4} {:>4} {:>6} {:>6} {:>9} {:>9}  REASON",
        "PID",
        "PROGRAM",
        "FD",
        "ROLE",
        "VIA",
        "LOCAL",
        "REMOTE",
        "TX_BYTES",
        "RX_BYTES",
        "TX_MSGS",
        "RX_MSGS",
        "CRED",
        "POST",
        "STALLS",
        "SPINS",
        "ZC_TX",
        "ZC_RX"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:>7} {:<15} {:>5} {:<6} {:<5} {:<22} {:<22} {:>12} {:>12} {:>9} {:>9} {:>4} {:>4} {:>6} {:>6} {:>9} {:>9}  {}",
            r.pid,
            r.program,
            r.fd,
            r.role,
            r.transport,
            addr(&r.local),
            addr(&r.remote),
            r.bytes_tx,
            r.bytes_rx,
            r.msgs_tx,
            r.msgs_rx,
            r.credits_tx,
            r.posted_rx,
            r.credit_stalls,
            r.spin_hits,
            r.zcopy_tx,
            r.zcopy_rx,
            r.reason
        )?;
    }
    writeln!(out)?;
    writeln!(out, "SOCKETS BY FALLBACK REASON   TOTAL    LIVE")?;
    let t = totals(&rows, &procs);
    if t.is_empty() {
        writeln!(out, "  (none decided yet)")?;
    }
    for (c, total, live) in t {
        writeln!(out, "  {:<24} {total:>7} {live:>7}", bucket_name(c))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:>7} {:<15} {:>12} {:>12} {:>12} {:>12} {:>13} {:>15} {:>12} {:>12} {:>14} {:>14}",
        "PID",
        "PROGRAM",
        "EPOLL_SPINS",
        "EPOLL_HITS",
        "RECV_SPINS",
        "RECV_HITS",
        "CREDIT_STALLS",
        "EPOLL_CTL_SAVED",
        "RINGS_REUSED",
        "BELLS_RUNG",
        "DIRECT_TX",
        "DIRECT_RX"
    )?;
    for p in &procs {
        writeln!(
            out,
            "{:>7} {:<15} {:>12} {:>12} {:>12} {:>12} {:>13} {:>15} {:>12} {:>12} {:>14} {:>14}",
            p.pid,
            p.program,
            p.epoll_spins,
            p.epoll_spin_hits,
            p.recv_spins,
            p.recv_spin_hits,
            p.credit_stalls,
            p.epoll_ctl_saved,
            p.rings_reused,
            p.bells_rung,
            p.direct_tx,
            p.direct_rx
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_ours_is_ignored() {
        assert!(parse_file(&[0u8; 4096]).is_none());
        assert!(parse_file(b"short").is_none());
    }

    #[test]
    fn rows_round_trip_through_the_layout() {
        let mut b = vec![0u8; (stats::HEADER_WORDS + 2 * stats::SLOT_WORDS) * 8];
        let put = |b: &mut Vec<u8>, i: usize, v: u64| {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes())
        };
        put(&mut b, 0, stats::MAGIC);
        put(&mut b, 1, stats::VERSION);
        put(&mut b, 2, 42);
        put(&mut b, 3, 2);
        put(&mut b, 4, u64::from_le_bytes(*b"sockperf"));
        let base = stats::HEADER_WORDS + stats::SLOT_WORDS;
        put(&mut b, base, stats::meta(Transport::Shm, 1, 1, 0));
        put(&mut b, base + field::FD, 7);
        let a: SocketAddr = "127.0.0.1:11111".parse().unwrap();
        for (i, w) in stats::encode_addr(Some(a)).into_iter().enumerate() {
            put(&mut b, base + field::REMOTE + i, w);
        }
        put(&mut b, base + field::BYTES_TX, 640);
        let FileStats { process, rows } = parse_file(&b).unwrap();
        assert_eq!(
            (process.pid, process.program.as_str(), rows.len()),
            (42, "sockperf", 1)
        );
        assert_eq!(rows[0].transport, "shm");
        assert_eq!(rows[0].remote, Some(a));
        assert_eq!(rows[0].bytes_tx, 640);
        assert_eq!(rows[0].reason, "-");
    }
}
