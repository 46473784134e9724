//! `idle_conn_mem`: bytes of memory one idle connection costs, both ends together.
//!
//! Two processes (this same executable re-run as `sdp bench` with [`IDLE_ENV`] set, in the
//! style of [`super::setup`]): `server:<port>:<n>` accepts `n` connections and echoes one
//! byte on each; `client:<port>:<n>` waits for `go` on stdin, then opens `n` connections one
//! after the other, each sending one byte and reading its echo. Both then hold their
//! connections until `exit`.
//! Before `go` and after both reported, the parent takes a [`Snapshot`]; the figure is the
//! growth divided by `n`.
//!
//! What is counted (docs/MEMORY.md has the formula this is checked against):
//! - **Pss** of both processes (`/proc/PID/smaps_rollup`): private pages in full, shared
//!   pages divided among the processes mapping them, so a shared-memory ring mapped by both
//!   ends counts once in the sum. Heap, stacks and the rings are all in it.
//! - **page tables** of both processes (`VmPTE` in `/proc/PID/status`): every ring mapping
//!   needs its own page-table pages in each process.
//! - **kernel slab** (`Slab` in `/proc/meminfo`): socket, inode, file, dentry, epoll and
//!   mapping objects. This counter is machine-wide, so other activity on the machine adds
//!   noise to it (the median over repetitions damps it); socket buffers of idle sockets are
//!   empty and not counted separately.
//!
//! The base leg runs the same two programs without the preload: kernel TCP's own cost per
//! connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use super::proc::{Leg, fd_room, raise_nofile, wait_listening_pid};
use super::workloads::Ctx;

/// Environment variable that turns `sdp bench` into one end of the idle-connection pair.
pub const IDLE_ENV: &str = "__SDP_BENCH_IDLE";

/// Descriptors one connection may hold in one process (libsdp holds eight today: see
/// docs/MEMORY.md), with room to spare; the connection count is lowered to fit the limit.
const FDS_PER_CONN: u64 = 10;

/// One repetition: bytes per idle connection.
pub fn per_connection(ctx: &Ctx, leg: &Leg, port: u16) -> Result<Vec<f64>, String> {
    // The slab part is machine-wide: more connections make others' noise a smaller share.
    let wanted: u64 = if ctx.quick { 2000 } else { 4000 };
    let n = wanted.min(fd_room() / FDS_PER_CONN);
    if n < 100 {
        return Err(format!(
            "RLIMIT_NOFILE allows only {n} connections of {FDS_PER_CONN} descriptors each"
        ));
    }
    let mut server = LineChild::spawn(ctx, leg, &format!("server:{port}:{n}"), "idle server")?;
    wait_listening_pid(server.child.id(), port, Duration::from_secs(10))?;
    let mut client = LineChild::spawn(ctx, leg, &format!("client:{port}:{n}"), "idle client")?;
    client.expect("ready", Duration::from_secs(10))?;
    let pids = [server.child.id(), client.child.id()];
    let before = Snapshot::take(&pids)?;
    client.send("go")?;
    let timeout = Duration::from_secs(60);
    client.expect("done", timeout)?;
    server.expect("served", timeout)?;
    // Let the progress threads finish what the last messages started.
    std::thread::sleep(Duration::from_millis(200));
    let after = Snapshot::take(&pids)?;
    if let Leg::Libsdp { .. } = leg {
        // Counted here as well as by the driver's watch, which looks at intervals (resting as
        // long as a look takes) and might look only before and after: the connections stay
        // open for this look and two looks' time more, a whole cycle of the watch.
        let look = std::time::Instant::now();
        let on_shm = crate::stat::collect()
            .iter()
            .filter(|r| {
                pids.contains(&(r.pid as u32))
                    && r.transport == "shm"
                    && r.remote.is_some()
                    && [r.local, r.remote]
                        .iter()
                        .flatten()
                        .any(|a| a.port() == port)
            })
            .count() as u64;
        if on_shm != 2 * n {
            eprintln!(
                "sdp bench: idle_conn_mem ({leg}): {on_shm} of {} connection ends on shm",
                2 * n
            );
        }
        std::thread::sleep((2 * look.elapsed()).min(Duration::from_secs(3)));
    }
    let _ = client.send("exit");
    let _ = server.send("exit");
    // SDP_BENCH_IDLE_PARTS=1: the three parts of the figure, per connection, on stderr.
    if std::env::var_os("SDP_BENCH_IDLE_PARTS").is_some() {
        eprintln!(
            "sdp bench: idle_conn_mem ({leg}) per connection: pss {:.0} page tables {:.0} slab {:.0}",
            (after.pss as f64 - before.pss as f64) / n as f64,
            (after.page_tables as f64 - before.page_tables as f64) / n as f64,
            (after.slab as f64 - before.slab as f64) / n as f64
        );
    }
    Ok(vec![after.bytes_since(&before) / n as f64])
}

/// Memory of the two processes and the kernel at one instant, in bytes.
struct Snapshot {
    pss: u64,
    page_tables: u64,
    slab: u64,
}

impl Snapshot {
    fn take(pids: &[u32]) -> Result<Snapshot, String> {
        let mut s = Snapshot {
            pss: 0,
            page_tables: 0,
            slab: kib_field("/proc/meminfo", "Slab:")?,
        };
        for pid in pids {
            s.pss += kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")?;
            s.page_tables += kib_field(&format!("/proc/{pid}/status"), "VmPTE:")?;
        }
        Ok(s)
    }

    fn bytes_since(&self, before: &Snapshot) -> f64 {
        let d = |a: u64, b: u64| a as f64 - b as f64;
        d(self.pss, before.pss)
            + d(self.page_tables, before.page_tables)
            + d(self.slab, before.slab)
    }
}

/// The `<key> <n> kB` line of a procfs file, in bytes.
fn kib_field(path: &str, key: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("{path}: no {key} line"))
}

/// A child driven line by line: commands on its stdin, replies read from its stdout by a
/// thread. Killed when dropped.
struct LineChild {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    what: &'static str,
}

impl LineChild {
    fn spawn(ctx: &Ctx, leg: &Leg, spec: &str, what: &'static str) -> Result<LineChild, String> {
        // Not pinned: memory does not depend on where the processes run, and connection
        // setup is three times slower with the two ends (and their progress threads) held
        // on two CPUs that other work shares.
        let mut cmd = leg.command(&ctx.sdp_exe, None);
        cmd.arg("bench")
            .env(IDLE_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let stdin = child.stdin.take();
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(LineChild {
            child,
            stdin,
            lines,
            what,
        })
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("{}: {e}", self.what))
    }

    /// Waits for a line starting with `word`; an `error:` line or the end of output fails.
    fn expect(&mut self, word: &str, timeout: Duration) -> Result<String, String> {
        loop {
            match self.lines.recv_timeout(timeout) {
                Ok(l) if l.starts_with(word) => return Ok(l),
                Ok(l) if l.starts_with("error") => return Err(format!("{}: {l}", self.what)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("{}: no `{word}` within {timeout:?}", self.what));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("{} exited before `{word}`", self.what));
                }
            }
        }
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // A child told to exit does so at once; give it a moment, then kill.
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Body of the child process; `spec` is the value of [`IDLE_ENV`].
pub fn child_main(spec: &str) -> Result<(), String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |s: &str| {
        s.parse::<u64>()
            .map_err(|e| format!("{IDLE_ENV}={spec}: {e}"))
    };
    let (role, port, n) = match parts.as_slice() {
        [role @ ("server" | "client"), port, n] => (*role, num(port)? as u16, num(n)?),
        _ => {
            return Err(format!(
                "{IDLE_ENV}: expected server:PORT:N or client:PORT:N, got {spec}"
            ));
        }
    };
    raise_nofile();
    let result = if role == "server" {
        server(port, n)
    } else {
        client(port, n)
    };
    if let Err(e) = &result {
        println!("error: {e}");
    }
    result
}

/// Reads stdin until `exit` or its end.
fn wait_for_exit() {
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|k| k > 0) {
        if line.trim() == "exit" {
            return;
        }
        line.clear();
    }
}

fn server(port: u16, n: u64) -> Result<(), String> {
    let l = listener(port, 4096)?;
    let mut conns = Vec::with_capacity(n as usize);
    let mut b = [0u8; 1];
    for i in 0..n {
        let (mut s, _) = l.accept().map_err(|e| format!("accept {i}: {e}"))?;
        s.read_exact(&mut b)
            .and_then(|()| s.write_all(&b))
            .map_err(|e| format!("echo on connection {i}: {e}"))?;
        conns.push(s);
    }
    println!("served {n}");
    wait_for_exit();
    Ok(())
}

/// A listener on 127.0.0.1:`port` with room for `backlog` queued connections: std's
/// `TcpListener::bind` queues 128, and a client connecting faster than the server accepts
/// would see its SYNs dropped and retried a second later.
fn listener(port: u16, backlog: i32) -> Result<TcpListener, String> {
    use std::os::fd::FromRawFd;
    let err = |what: &str| {
        format!(
            "{what} 127.0.0.1:{port}: {}",
            std::io::Error::last_os_error()
        )
    };
    // SAFETY: plain socket calls on a descriptor we create and own; `sa` is a fully
    // initialised sockaddr_in on the stack, passed with its size. On success the descriptor
    // is handed to the TcpListener, which closes it; on failure we close it here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(err("socket for"));
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = port.to_be();
        sa.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            let e = err("bind");
            libc::close(fd);
            return Err(e);
        }
        if libc::listen(fd, backlog) != 0 {
            let e = err("listen on");
            libc::close(fd);
            return Err(e);
        }
        Ok(TcpListener::from_raw_fd(fd))
    }
}

fn client(port: u16, n: u64) -> Result<(), String> {
    println!("ready");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("stdin: {e}"))?;
    if line.trim() != "go" {
        return Ok(());
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut conns = Vec::with_capacity(n as usize);
    let mut b = [0u8; 1];
    // One connection at a time, each with its byte there and back before the next: the
    // server's accept queue never holds more than one (libsdp waits for a connection's SDP
    // setup a bounded time, and a burst would measure how fast the server accepts), and
    // every connection has carried data before the snapshot.
    for i in 0..n {
        let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {i}: {e}"))?;
        s.write_all(b"i")
            .and_then(|()| s.read_exact(&mut b))
            .map_err(|e| format!("echo on connection {i}: {e}"))?;
        if b[0] != b'i' {
            return Err(format!("connection {i} echoed {:?}", b[0]));
        }
        conns.push(s);
    }
    println!("done {n}");
    wait_for_exit();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procfs_kib_fields_are_read_in_bytes() {
        let p = std::env::temp_dir().join(format!("sdp-idle-{}", std::process::id()));
        std::fs::write(&p, "Rss:    2200 kB\nPss:     770 kB\nPss_Anon:  1 kB\n").unwrap();
        let path = p.to_str().unwrap();
        assert_eq!(kib_field(path, "Pss:"), Ok(770 * 1024));
        assert!(kib_field(path, "VmPTE:").unwrap_err().contains("no VmPTE:"));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn growth_counts_every_part_and_may_shrink() {
        let a = Snapshot {
            pss: 1000,
            page_tables: 100,
            slab: 5000,
        };
        let b = Snapshot {
            pss: 3000,
            page_tables: 300,
            slab: 4900,
        };
        assert_eq!(b.bytes_since(&a), 2000.0 + 200.0 - 100.0);
    }
}
