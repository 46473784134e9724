//! `loaded_p50_64`, `loaded_p99_64`: how much a 64-byte ping-pong's p50 and p99 grow when
//! the server it talks to is loaded, as a factor of the same ping-pong's unloaded figures
//! (issue #8: "latency percentiles stay within 2x of the unloaded figures").
//!
//! One repetition, in one leg, against one single-threaded epoll echo server:
//! 1. the unloaded ping-pong: one client, one connection, [`Plan::iters`] round trips of 64
//!    bytes (after a discarded warm-up), p50 and p99;
//! 2. a loader opens [`Plan::idle`] connections that stay idle (a byte each way first) and
//!    [`Plan::busy`] busy ones, on which it sends 64 bytes on every one at once and reads the
//!    echoes back, every [`Plan::tick_us`] microseconds;
//! 3. while the loader runs, the same ping-pong again on a fresh connection.
//!
//! The value of each metric is loaded ÷ unloaded within the leg: `libsdp=` is SDP's factor
//! (the target is at most 2), `base=` kernel TCP's under the same load, and the ratio column
//! compares the two. The absolute microseconds go to stderr. The server and the measured
//! client are pinned as in `sockperf`; the loader is not (it is the load).
//!
//! All three are this same executable, re-run as `sdp bench` with [`LOADED_ENV`] set:
//! `server:<port>`, `loader:<port>:<idle>:<busy>:<tick_us>` (prints `ready` once its
//! connections are open, runs until killed) and `pingpong:<port>:<iters>` (prints
//! `p50_us=` and `p99_us=`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::process::{Child, Stdio};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use super::proc::{ChildGuard, Leg, fd_room, raise_nofile, wait_listening};
use super::workloads::Ctx;

/// Environment variable that turns `sdp bench` into one of the processes of this workload.
pub const LOADED_ENV: &str = "__SDP_BENCH_LOADED";

/// Descriptors one connection may hold in one process (libsdp: 8, docs/MEMORY.md), with room.
const FDS_PER_CONN: u64 = 10;

const MSG: usize = 64;

/// The load and the measurement of one repetition.
struct Plan {
    idle: u64,
    busy: u64,
    tick_us: u64,
    iters: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        // Quick: about 1.5 s per repetition (a thousand connections set up one after the
        // other, two ping-pong runs of 10,000 round trips: 40 us each over kernel TCP
        // between two CPUs).
        let (idle, iters) = if quick {
            (1000, 10_000)
        } else {
            (1800, 50_000)
        };
        // The loader holds idle + busy connections: within its descriptor limit.
        let room = fd_room() / FDS_PER_CONN;
        Plan {
            idle: idle.min(room.saturating_sub(64)),
            busy: 16,
            tick_us: 1000,
            iters,
        }
    }
}

/// One repetition: `[loaded p50 / unloaded p50, loaded p99 / unloaded p99]`.
pub fn p50_p99(ctx: &Ctx, leg: &Leg, port: u16) -> Result<Vec<f64>, String> {
    let plan = Plan::new(ctx.quick);
    if plan.idle < 100 {
        return Err(format!(
            "RLIMIT_NOFILE allows only {} idle connections of {FDS_PER_CONN} descriptors each",
            plan.idle
        ));
    }
    let mut srv = leg.command(&ctx.sdp_exe, ctx.server_cpu.or(ctx.cpu));
    srv.arg("bench").env(LOADED_ENV, format!("server:{port}"));
    let mut server = ChildGuard::spawn(srv, "loaded echo server")?;
    wait_listening(&mut server, port, Duration::from_secs(10))?;
    let unloaded = ping_pong(ctx, leg, port, plan.iters)?;
    let loader = Loader::start(ctx, leg, port, &plan)?;
    let loaded = ping_pong(ctx, leg, port, plan.iters)?;
    // The server goes first: the connections' TIME_WAITs stay on its port, not on the
    // loader's ephemeral ones (which the next repetitions' connects would have to skip).
    drop(server);
    drop(loader);
    eprintln!(
        "sdp bench: loaded ({leg}): 64-byte ping-pong p50 {:.1} us, p99 {:.1} us unloaded; \
         p50 {:.1} us, p99 {:.1} us with {} idle and {} busy connections",
        unloaded[0], unloaded[1], loaded[0], loaded[1], plan.idle, plan.busy
    );
    Ok(vec![loaded[0] / unloaded[0], loaded[1] / unloaded[1]])
}

/// `[p50, p99]` in microseconds of one ping-pong client run.
fn ping_pong(ctx: &Ctx, leg: &Leg, port: u16, iters: u64) -> Result<[f64; 2], String> {
    let mut cli = leg.command(&ctx.sdp_exe, ctx.cpu);
    cli.arg("bench")
        .env(LOADED_ENV, format!("pingpong:{port}:{iters}"));
    let out = ChildGuard::spawn(cli, "ping-pong client")?.wait_ok(Duration::from_secs(120))?;
    let field = |key: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .ok_or_else(|| format!("the ping-pong client printed no {key}: {}", out.stdout))
    };
    Ok([field("p50_us=")?, field("p99_us=")?])
}

/// The loader child, killed when dropped.
struct Loader {
    child: Child,
}

impl Loader {
    fn start(ctx: &Ctx, leg: &Leg, port: u16, plan: &Plan) -> Result<Loader, String> {
        let mut cmd = leg.command(&ctx.sdp_exe, None);
        cmd.arg("bench")
            .env(
                LOADED_ENV,
                format!("loader:{port}:{}:{}:{}", plan.idle, plan.busy, plan.tick_us),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the loader: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let loader = Loader { child };
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l == "ready" => return Ok(loader),
                Ok(l) if l.starts_with("error") => return Err(format!("loader: {l}")),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err("the loader opened no connections within 60 s".into());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the loader exited before its connections were open".into());
                }
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Body of the child process; `spec` is the value of [`LOADED_ENV`].
pub fn child_main(spec: &str) -> Result<(), String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |s: &str| {
        s.parse::<u64>()
            .map_err(|e| format!("{LOADED_ENV}={spec}: {e}"))
    };
    raise_nofile();
    let result = match parts.as_slice() {
        ["server", port] => server(num(port)? as u16),
        ["loader", port, idle, busy, tick] => {
            loader(num(port)? as u16, num(idle)?, num(busy)?, num(tick)?)
        }
        ["pingpong", port, iters] => pingpong(num(port)? as u16, num(iters)?),
        _ => Err(format!(
            "{LOADED_ENV}: expected server:PORT, loader:PORT:IDLE:BUSY:TICK_US or \
             pingpong:PORT:ITERS, got {spec}"
        )),
    };
    if let Err(e) = &result {
        println!("error: {e}");
    }
    result
}

fn last_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A single-threaded epoll echo server: every readable connection gets what it sent back
/// (blocking sockets; 64-byte messages always fit the send buffer).
fn server(port: u16) -> Result<(), String> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
    let lfd = l.as_raw_fd();
    // SAFETY: plain epoll calls on descriptors this process owns; `ev` and `events` live on
    // this frame and are passed with their sizes. Accepted sockets are owned by TcpStreams
    // kept in `conns` (indexed by descriptor) and closed by dropping them.
    unsafe {
        // A backlog that holds the loader's burst of connects (std listens with 128).
        if libc::listen(lfd, 4096) != 0 {
            return Err(last_err("listen"));
        }
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        if ep < 0 {
            return Err(last_err("epoll_create1"));
        }
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: lfd as u64,
        };
        if libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, &mut ev) != 0 {
            return Err(last_err("epoll_ctl"));
        }
        let mut conns: Vec<Option<TcpStream>> = Vec::new();
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1);
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(last_err("epoll_wait"));
            }
            for e in &events[..n as usize] {
                let fd = e.u64 as i32;
                if fd == lfd {
                    let Ok((s, _)) = l.accept() else { continue };
                    let _ = s.set_nodelay(true);
                    let sfd = s.into_raw_fd();
                    let mut sev = libc::epoll_event {
                        events: libc::EPOLLIN as u32,
                        u64: sfd as u64,
                    };
                    libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, sfd, &mut sev);
                    let i = sfd as usize;
                    if conns.len() <= i {
                        conns.resize_with(i + 1, || None);
                    }
                    conns[i] = Some(TcpStream::from_raw_fd(sfd));
                    continue;
                }
                let Some(s) = conns.get_mut(fd as usize).and_then(|c| c.as_mut()) else {
                    continue;
                };
                match s.read(&mut buf) {
                    Ok(k) if k > 0 && s.write_all(&buf[..k]).is_ok() => {}
                    _ => {
                        libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
                        conns[fd as usize] = None;
                    }
                }
            }
        }
    }
}

/// Opens one connection and makes one round trip of `msg` on it.
fn open(addr: SocketAddr, msg: &[u8]) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    round_trip(&mut s, msg)?;
    Ok(s)
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    let mut back = vec![0u8; msg.len()];
    s.write_all(msg)
        .and_then(|()| s.read_exact(&mut back))
        .map_err(|e| format!("round trip: {e}"))?;
    if back != msg {
        return Err("the echo differs from what was sent".into());
    }
    Ok(())
}

fn loader(port: u16, idle: u64, busy: u64, tick_us: u64) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // One connection at a time, a byte there and back on each before the next (see
    // `idle_conn_mem`: a burst would measure how fast the server accepts).
    let mut idle_conns = Vec::with_capacity(idle as usize);
    for i in 0..idle {
        idle_conns.push(open(addr, b"i").map_err(|e| format!("idle connection {i}: {e}"))?);
    }
    let msg = [b'b'; MSG];
    let mut busy_conns = Vec::with_capacity(busy as usize);
    for i in 0..busy {
        busy_conns.push(open(addr, &msg).map_err(|e| format!("busy connection {i}: {e}"))?);
    }
    println!("ready");
    let tick = Duration::from_micros(tick_us);
    let mut next = Instant::now();
    let mut back = [0u8; MSG];
    // Until the server goes away at the end of the repetition (or we are killed).
    loop {
        // A burst: a message on every busy connection, then every echo.
        for s in &mut busy_conns {
            if s.write_all(&msg).is_err() {
                return Ok(());
            }
        }
        for s in &mut busy_conns {
            if s.read_exact(&mut back).is_err() {
                return Ok(());
            }
        }
        next += tick;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

fn pingpong(port: u16, iters: u64) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = open(addr, b"p")?;
    let msg = [b'p'; MSG];
    // A discarded warm-up: caches, the progress thread, the CPU's frequency.
    for _ in 0..iters / 10 {
        round_trip(&mut s, &msg)?;
    }
    let mut t = Vec::with_capacity(iters as usize);
    for _ in 0..iters {
        let start = Instant::now();
        round_trip(&mut s, &msg)?;
        t.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let (p50, p99) = percentiles(&mut t);
    println!("p50_us={p50:.3}");
    println!("p99_us={p99:.3}");
    Ok(())
}

/// p50 and p99 of `t` (sorted in place): the values at ranks n/2 and 99n/100.
fn percentiles(t: &mut [f64]) -> (f64, f64) {
    if t.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    t.sort_by(f64::total_cmp);
    let n = t.len();
    (t[n / 2], t[(n * 99 / 100).min(n - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_hundred() {
        let mut t: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentiles(&mut t), (51.0, 100.0));
        assert!(percentiles(&mut []).0.is_nan());
    }
}
