//! Scale: 10,000 concurrent idle SDP connections between two preloaded processes.
//!
//! A client (`tests/c/scale/idle_pair.c`) opens the connections to an epoll echo server,
//! both under the preload with the default policy, never more than a few ahead of the
//! server's accepts: libsdp waits for a connection's SDP exchange a bounded time only, and
//! this test is about many connections, not about how fast a server accepts a burst (that
//! is `connections_a_server_accepts_late_stay_on_sdp`'s subject). The test then checks, in this order:
//! every connection is on shm in `sdp stat` in both processes; one byte each way on every
//! connection arrives intact and shows in the statistics of every row; the memory the
//! connections cost (both processes' Pss and page tables, and the kernel's slab) stays
//! within the bound of docs/MEMORY.md, computed from the configured ring and buffer sizes
//! and the objects counted in the live processes; after the client closes everything, both
//! processes are back to the descriptors, mappings and threads they had before (the
//! progress threads excepted, which stay for the process's life).
//!
//! Each connection holds 8 descriptors in each process (docs/MEMORY.md), so 10,000 need
//! a hard RLIMIT_NOFILE above 80,000. The test raises its own hard limit when it may
//! (root with CAP_SYS_RESOURCE); where the hard limit is lower and cannot be raised, it
//! spreads the 10,000 connections over as few client/server pairs as fit, checks every
//! pair the same way, and says so on stderr with the limit that forced it.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use ib_verbs::shm::layout::{self, Layout, RingShape};
use libsdp_suite::{compile_c, free_port, libsdp_so, sdp_stat};

/// Connections the test asks for.
const TARGET: u64 = 10_000;
/// Descriptors one SDP connection holds in one process today (docs/MEMORY.md, "Per
/// connection, per process").
const FDS_PER_CONN: u64 = 8;
/// Descriptors a process needs besides its connections.
const FD_RESERVE: u64 = 512;
const PAGE: u64 = 4096;

// Kernel objects, upper bounds per object (docs/MEMORY.md, "The bound for an idle
// connection"): what one descriptor adds (its `struct file` and its epoll watch), one
// socket (the protocol sock, its inode and dentry), one other inode (memfd), one mapping
// (its VMA and chains).
const KERNEL_PER_FD: u64 = 512;
const KERNEL_PER_SOCKET: u64 = 4096;
const KERNEL_PER_INODE: u64 = 2048;
const KERNEL_PER_MAPPING: u64 = 512;
/// The page cache's index of a memfd: at most one radix-tree node (576 bytes) per page.
const KERNEL_PER_SHM_PAGE: u64 = 640;
/// Heap bookkeeping of one connection in one process besides its two message buffers and
/// its ring vectors (docs/MEMORY.md, "The bound for an idle connection").
const HEAP_BOOKKEEPING: u64 = 16 * 1024;
/// One statistics row per connection and process.
const STAT_ROW: u64 = 128;
/// What a process may keep after its last connection closed, once for its life: the
/// progress thread's descriptors and mappings, the statistics file.
const ONE_TIME_FDS: u64 = 2;
const ONE_TIME_MAPS: u64 = 16;

/// A process of the pair, driven by lines.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    what: &'static str,
}

impl Peer {
    fn spawn(exe: &Path, role: &'static str, port: u16, n: u64, extra: &[&str]) -> Peer {
        let mut cmd = Command::new(exe);
        cmd.args([role, &port.to_string(), &n.to_string()])
            .args(extra)
            .env("LD_PRELOAD", libsdp_so())
            .env_remove("LIBSDP_CONFIG_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {role}: {e}"));
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("stdout pipe");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer {
            child,
            stdin,
            lines,
            what: role,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").expect("write a command to the client");
        stdin.flush().expect("flush a command to the client");
    }

    /// The next line, which must start with `word` (an `error:` line fails with the reason).
    fn expect(&mut self, word: &str, timeout: Duration) -> String {
        let line = self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!(
                "the {} printed no `{word}` within {timeout:?} ({e})",
                self.what
            )
        });
        assert!(
            line.starts_with(word),
            "the {} said `{line}`, expected `{word}`",
            self.what
        );
        line
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test created for the child.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Raises this process's hard RLIMIT_NOFILE toward `want` if it may (the children inherit
/// it) and returns the hard limit in force.
fn raise_hard_nofile(want: u64) -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit on this frame.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        if rl.rlim_max < want {
            let raised = libc::rlimit {
                rlim_cur: rl.rlim_cur,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                rl.rlim_max = want;
            }
        }
    }
    rl.rlim_max
}

/// Memory of the pair and the kernel at one instant, in bytes. The slab is read first:
/// listing `/proc/PID/fd` afterwards allocates proc inodes that must not count.
#[derive(Debug, Clone, Copy)]
struct Mem {
    slab: u64,
    pss: u64,
    page_tables: u64,
}

fn kib_field(path: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{path}: no {key} line"))
        * 1024
}

impl Mem {
    fn take(pids: &[u32]) -> Mem {
        let slab = kib_field("/proc/meminfo", "Slab:");
        let mut m = Mem {
            slab,
            pss: 0,
            page_tables: 0,
        };
        for pid in pids {
            m.pss += kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:");
            m.page_tables += kib_field(&format!("/proc/{pid}/status"), "VmPTE:");
        }
        m
    }
}

/// Descriptors, mappings and threads of one process, and what its descriptors name.
#[derive(Debug, Default)]
struct Objects {
    fds: u64,
    maps: u64,
    shm_maps: Vec<u64>,
    threads: u64,
    /// Inodes of sockets, and of everything else that is not a pipe, tty or file of ours.
    sockets: HashSet<u64>,
    inodes: HashSet<u64>,
}

fn objects(pid: u32) -> Objects {
    let mut o = Objects::default();
    let dir = format!("/proc/{pid}/fd");
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let e = e.expect("fd entry");
        o.fds += 1;
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        if let Some(ino) = target
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|i| i.parse().ok())
        {
            o.sockets.insert(ino);
        } else if target.contains("memfd:")
            && let Ok(md) = std::fs::metadata(e.path())
        {
            o.inodes.insert(md.ino());
        }
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    for l in maps.lines() {
        o.maps += 1;
        if l.contains("/memfd:libsdp-shm") {
            let range = l.split_whitespace().next().expect("range");
            let (a, b) = range.split_once('-').expect("range");
            let len = u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap();
            o.shm_maps.push(len);
        }
    }
    o.threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .count() as u64;
    o
}

/// The bound of docs/MEMORY.md for one idle connection, both processes together.
struct Bound {
    shm: u64,
    page_tables: u64,
    heap: u64,
    stat_rows: u64,
    kernel: u64,
}

impl Bound {
    fn total(&self) -> u64 {
        self.shm + self.page_tables + self.heap + self.stat_rows + self.kernel
    }
}

#[test]
fn ten_thousand_idle_sdp_connections_work_and_stay_within_the_memory_bound() {
    let started = Instant::now();
    let hard = raise_hard_nofile(TARGET * FDS_PER_CONN + FD_RESERVE);
    let fit = hard.saturating_sub(FD_RESERVE) / FDS_PER_CONN;
    assert!(
        fit >= 1000,
        "RLIMIT_NOFILE hard limit {hard} leaves room for only {fit} connections per process"
    );
    // One pair when the limit allows; otherwise the 10,000 spread over as few pairs as fit.
    let pairs = TARGET.div_ceil(fit);
    let n = TARGET.div_ceil(pairs);
    let total_conns = n * pairs;
    if pairs > 1 {
        eprintln!(
            "scale: the RLIMIT_NOFILE hard limit is {hard} and cannot be raised here (no \
             CAP_SYS_RESOURCE): at {FDS_PER_CONN} descriptors per connection a process holds \
             {fit} at most, so the {TARGET} connections run as {pairs} client/server pairs of \
             {n}. Run as root (or with `ulimit -Hn 100000`) for one pair of {TARGET}."
        );
    }

    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/scale/idle_pair.c");
    let exe = compile_c(&src, &Path::new(env!("CARGO_TARGET_TMPDIR")).join("scale"));
    // procs[2k] is pair k's server, procs[2k + 1] its client.
    let mut procs = Vec::new();
    for _ in 0..pairs {
        let port = free_port();
        let mut server = Peer::spawn(&exe, "server", port, n, &[]);
        wait_listening(port, &mut server);
        procs.push(server);
        procs.push(Peer::spawn(&exe, "client", port, n, &[]));
    }
    let pids: Vec<u32> = procs.iter().map(Peer::pid).collect();
    let all_objects = || pids.iter().map(|&p| objects(p)).collect::<Vec<_>>();
    std::thread::sleep(Duration::from_millis(200));
    let mem0 = Mem::take(&pids);
    let before = all_objects();

    // Open them all, one pair after the other (the pairs' processes would only compete for
    // the same CPUs), each client keeping at most a few connections waiting in its server's
    // accept queue (see AHEAD in idle_pair.c).
    let t = Instant::now();
    for pair in procs.chunks_mut(2) {
        pair[1].send("connect");
        pair[1].expect("connected", Duration::from_secs(120));
        pair[0].expect("accepted", Duration::from_secs(30));
    }
    let setup = t.elapsed();

    // One byte each way on every connection.
    for c in procs.iter_mut().skip(1).step_by(2) {
        c.send("ping");
    }
    for c in procs.iter_mut().skip(1).step_by(2) {
        c.expect("pinged", Duration::from_secs(60));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mem1 = Mem::take(&pids);
    let during = all_objects();

    // Every connection over shm, in both processes, with its byte each way counted there.
    let rows = sdp_stat();
    let ours: Vec<_> = rows
        .iter()
        .filter(|r| pids.contains(&r.pid) && r.is_connection())
        .collect();
    let not_shm: Vec<String> = ours
        .iter()
        .filter(|r| r.transport != "shm")
        .map(|r| {
            format!(
                "{} pid {} fd {} {} -> {}: {} ({})",
                r.role, r.pid, r.fd, r.local, r.remote, r.transport, r.fallback_reason
            )
        })
        .collect();
    assert!(
        not_shm.is_empty(),
        "{} of {} connection ends are not on shm (setup took {:.1} s):\n{}",
        not_shm.len(),
        2 * total_conns,
        setup.as_secs_f64(),
        not_shm.join("\n")
    );
    for p in &procs {
        let conns: Vec<_> = ours.iter().filter(|r| r.pid == p.pid()).collect();
        assert_eq!(
            conns.len() as u64,
            n,
            "{} {}: connections in sdp stat",
            p.what,
            p.pid()
        );
        let carried = conns
            .iter()
            .filter(|r| r.bytes_tx == 1 && r.bytes_rx == 1)
            .count() as u64;
        assert_eq!(
            carried,
            n,
            "{} {}: rows with one byte sent and one received",
            p.what,
            p.pid()
        );
    }
    let msgs_max = rows
        .iter()
        .filter(|r| pids.contains(&r.pid) && r.is_connection())
        .map(|r| r.msgs_tx)
        .max()
        .unwrap_or(0);

    // Descriptors and mappings per connection.
    for (i, p) in procs.iter().enumerate() {
        // The client's first connect also opens its progress thread's descriptors.
        let fds = (during[i].fds - before[i].fds) / n;
        assert_eq!(
            fds, FDS_PER_CONN,
            "{}: descriptors per connection (docs/MEMORY.md counts {FDS_PER_CONN})",
            p.what
        );
        assert_eq!(
            during[i].shm_maps.len() as u64,
            n,
            "{}: one ring mapping per connection",
            p.what
        );
    }

    // The bound, from the configured sizes. The ring's buffer size is the engine's
    // configuration; its depth is read back from the size of the live mappings.
    let cfg = ops::offload::sdp::config();
    let buf_size = cfg.recv_buffer_size;
    let total = during[1].shm_maps[0];
    assert!(
        during
            .iter()
            .all(|o| o.shm_maps.iter().all(|&l| l == total)),
        "every ring mapping has the same size"
    );
    let stride = RingShape { depth: 1, buf_size }.stride() as u64;
    let depth = ((total - layout::RINGS as u64) / 2 / stride) as u32;
    let shape = RingShape { depth, buf_size };
    let lay = Layout::new(shape, shape).expect("the configured ring shape is valid");
    assert_eq!(
        lay.total as u64, total,
        "the mapping is the layout of two rings of {depth} x {buf_size}"
    );
    // Shared memory: the control page, and the pages the messages written into each ring
    // touched: a message of `len` bytes in a slot touches at most ceil((8 + len) / 4096) + 1
    // pages; control messages are at most 36 bytes and data messages carry 16 + payload.
    let msg_len = 36 + 1;
    let pages_per_msg = (layout::SLOT_HEADER as u64 + msg_len).div_ceil(PAGE) + 1;
    let ring_pages = msgs_max.min(u64::from(depth)) * pages_per_msg;
    let shm_pages = layout::RINGS as u64 / PAGE + 2 * ring_pages;
    // Page tables: one 4 KiB page of entries per 2 MiB region of a mapping that holds a
    // touched page, in each process, plus its share of the 1 GiB directories.
    let regions = shm_pages.min(total.div_ceil(2 << 20) + 1);
    let page_tables = 2 * (regions * PAGE + (total * PAGE).div_ceil(1 << 30));
    // Heap: the engine's two message buffers, the ring's two per-slot vectors, bookkeeping.
    let heap = 2 * (2 * u64::from(buf_size) + 16 * u64::from(depth) + HEAP_BOOKKEEPING);
    // Kernel: per descriptor, per distinct socket, per memfd inode, per mapping, per shared
    // page.
    let per_conn = |f: &dyn Fn(&Objects) -> u64| -> u64 {
        (0..procs.len())
            .map(|i| f(&during[i]).saturating_sub(f(&before[i])))
            .sum::<u64>()
            .div_ceil(total_conns)
    };
    let distinct = |objs: &[Objects], f: &dyn Fn(&Objects) -> &HashSet<u64>| {
        objs.iter()
            .flat_map(|o| f(o).iter().copied())
            .collect::<HashSet<u64>>()
            .len() as u64
    };
    let sockets =
        (distinct(&during, &|o| &o.sockets) - distinct(&before, &|o| &o.sockets)) / total_conns;
    let memfds = distinct(&during, &|o| &o.inodes) / total_conns;
    let kernel = per_conn(&|o| o.fds) * KERNEL_PER_FD
        + sockets * KERNEL_PER_SOCKET
        + memfds * KERNEL_PER_INODE
        + per_conn(&|o| o.maps) * KERNEL_PER_MAPPING
        + shm_pages * KERNEL_PER_SHM_PAGE;
    let bound = Bound {
        shm: shm_pages * PAGE,
        page_tables,
        heap,
        stat_rows: 2 * STAT_ROW,
        kernel,
    };
    let per = |a: u64, b: u64| (a as f64 - b as f64) / total_conns as f64;
    let pss = per(mem1.pss, mem0.pss);
    let pt = per(mem1.page_tables, mem0.page_tables);
    let slab = per(mem1.slab, mem0.slab);
    let measured = pss + pt + slab;
    eprintln!(
        "scale: {total_conns} connections ({pairs} pair(s) of {n}) set up in {:.2} s \
         ({:.0}/s); per connection, both processes: {measured:.0} bytes = Pss {pss:.0} + \
         page tables {pt:.0} + kernel slab {slab:.0}; bound {} = shm {} + page tables {} + \
         heap {} + stat rows {} + kernel {} ({sockets} sockets, {memfds} memfd, {} fds, {} \
         mappings; ring {depth} x {buf_size}, mapping {total} bytes, at most {msgs_max} \
         messages each way)",
        setup.as_secs_f64(),
        total_conns as f64 / setup.as_secs_f64(),
        bound.total(),
        bound.shm,
        bound.page_tables,
        bound.heap,
        bound.stat_rows,
        bound.kernel,
        per_conn(&|o| o.fds),
        per_conn(&|o| o.maps),
    );
    // The user-space part alone is exact (no machine-wide counter in it).
    let user_bound = bound.shm + bound.page_tables + bound.heap + bound.stat_rows;
    assert!(
        pss + pt <= user_bound as f64,
        "an idle connection's Pss and page tables are {:.0} bytes, over their bound in \
         docs/MEMORY.md ({user_bound})",
        pss + pt
    );
    assert!(
        measured <= bound.total() as f64,
        "an idle connection costs {measured:.0} bytes, over the bound of docs/MEMORY.md ({})",
        bound.total()
    );

    // Close everything: the servers see every end of stream, and every process goes back
    // to what it held before.
    for c in procs.iter_mut().skip(1).step_by(2) {
        c.send("close");
    }
    for p in procs.iter_mut() {
        let word = if p.what == "client" {
            "closed"
        } else {
            "drained"
        };
        p.expect(word, Duration::from_secs(60));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        std::thread::sleep(Duration::from_millis(200));
        let after = all_objects();
        let clean = (0..procs.len()).all(|i| {
            after[i].fds <= before[i].fds + ONE_TIME_FDS
                && after[i].shm_maps.is_empty()
                && after[i].maps < before[i].maps + ONE_TIME_MAPS
        });
        if clean || Instant::now() > deadline {
            break after;
        }
    };
    for (i, p) in procs.iter().enumerate() {
        let (b, a, role) = (&before[i], &after[i], p.what);
        // The client's first connect starts its progress thread (its epoll descriptor, its
        // stack, its malloc arena) and maps its statistics file: once per process, never
        // per connection. The server had all of it from its listen on.
        assert!(
            a.fds <= b.fds + ONE_TIME_FDS,
            "{role}: {} descriptors left after closing, {} before connecting",
            a.fds,
            b.fds
        );
        assert!(
            a.shm_maps.is_empty() && a.maps < b.maps + ONE_TIME_MAPS,
            "{role}: {} mappings ({} rings) left after closing, {} before connecting",
            a.maps,
            a.shm_maps.len(),
            b.maps
        );
        assert!(
            a.threads <= b.threads + 1 && a.threads <= during[i].threads,
            "{role}: {} threads after closing, {} before, {} while connected",
            a.threads,
            b.threads,
            during[i].threads
        );
    }
    let left = sdp_stat()
        .into_iter()
        .filter(|r| pids.contains(&r.pid) && r.is_connection())
        .count();
    assert_eq!(left, 0, "connection rows left in sdp stat after closing");
    for c in procs.iter_mut().skip(1).step_by(2) {
        c.send("exit");
    }
    eprintln!("scale: done in {:.1} s", started.elapsed().as_secs_f64());
}

/// A server slower than its clients: it accepts nothing for 3 s after they connected (longer
/// than libsdp's 2 s wait for the SDP exchange, which counts from the accept). Over kernel TCP the connections wait in the
/// accept queue meanwhile; over SDP they must as well, and stay SDP.
#[test]
fn connections_a_server_accepts_late_stay_on_sdp() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/scale/idle_pair.c");
    let exe = compile_c(&src, &Path::new(env!("CARGO_TARGET_TMPDIR")).join("scale"));
    let (port, n) = (free_port(), 20);
    let mut server = Peer::spawn(&exe, "server", port, n, &["3000"]);
    server.expect("listening", Duration::from_secs(15));
    let mut client = Peer::spawn(&exe, "client", port, n, &[]);
    let t = Instant::now();
    client.send("connect");
    client.expect("connected", Duration::from_secs(30));
    let connected = t.elapsed();
    server.expect("accepted", Duration::from_secs(30));
    assert!(
        t.elapsed() > Duration::from_millis(2500),
        "the server accepted {:?} after the connects, not later than libsdp's 2 s timer \
         (the connects took {connected:?})",
        t.elapsed()
    );
    client.send("ping");
    client.expect("pinged", Duration::from_secs(30));
    let pids = [server.pid(), client.pid()];
    let ends: Vec<String> = sdp_stat()
        .into_iter()
        .filter(|r| pids.contains(&r.pid) && r.is_connection())
        .map(|r| {
            format!(
                "{} {} {}/{} bytes",
                r.role, r.transport, r.bytes_tx, r.bytes_rx
            )
        })
        .collect();
    let good = ends.iter().filter(|e| e.ends_with("shm 1/1 bytes")).count();
    assert_eq!(
        good,
        2 * n as usize,
        "connection ends on shm with their byte each way: {ends:?}"
    );
    client.send("close");
    client.expect("closed", Duration::from_secs(30));
    server.expect("drained", Duration::from_secs(30));
    client.send("exit");
}

/// Waits until something listens on `port` (from /proc/net/tcp, not a probe connection).
fn wait_listening(port: u16, server: &mut Peer) {
    let needle = format!(":{port:04X}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let listening = std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[3] == "0A" && f[1].ends_with(&needle)
            })
        });
        if listening {
            return;
        }
        assert!(
            matches!(server.child.try_wait(), Ok(None)),
            "the server exited before listening"
        );
        assert!(
            Instant::now() < deadline,
            "the server did not listen in 15 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
