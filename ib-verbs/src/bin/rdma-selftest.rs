//! rdma-selftest: two processes connected by the `rdma` provider over a real device (soft-RoCE
//! `rxe0` in the test guest). Ping-pong SENDs, then 256 MiB of pattern data by SENDs (BCopy)
//! and 256 MiB by RDMA READ of advertised buffers (ZCopy), every byte verified, then a READ of
//! a revoked key that must fail; finally a second client is SIGKILLed after its sends completed:
//! its messages must all arrive, then the connection must end (PeerClosed), not hang.
//!
//! usage: rdma-selftest [--addr IP] [--bytes N] [--pings N] [--bootstrap cm|tcp]
//!   --bootstrap cm (default): rdma_cm REQ/REP in the RDMA_PS_TCP port space;
//!   --bootstrap tcp: QPN/PSN/GID exchanged over a TCP socket.
//!   --port P: listen on port P (default: any free port);
//!   --serve-only: do not start the client process (two hosts: run
//!   `rdma-selftest --addr A --port P --serve-only` on one and
//!   `rdma-selftest --client A:P` on the other, with the same --bytes/--pings/--bootstrap).
//!   --client IP:PORT: be the client (the second process); with `--die 1`, the dying client.
//! Output: progress lines, then exactly `rdma-selftest ok bcopy_bytes=N zcopy_bytes=M`.
//! Exit: 0 ok, 77 "no-device" (no usable RDMA device), 1 failure (message on stderr).

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::IntoRawFd;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use ib_verbs::rdma::{self, Pending, RdmaConn, RdmaOptions, bootstrap, cm};
use ib_verbs::sys::Fd;
use ib_verbs::{
    Access, Completion, Connection, LocalSge, MemKey, Opcode, PostError, RemoteSge, WaitOutcome,
};

const MSG_BUF: u32 = 1 << 20;
const DEPTH: u32 = 8;
const HDR: usize = 16;
const ZC_CHUNK: usize = 4 << 20;
const ZC_BUFS: usize = 2;
/// No progress for this long = failure (a round trip under emulation is 1–8 ms).
const STALL: Duration = Duration::from_secs(120);
/// Connection setup limit.
const SETUP: Duration = Duration::from_secs(60);

const PING: u32 = 1;
const PONG: u32 = 2;
const DATA: u32 = 3;
const CREDIT: u32 = 4;
const SRC_AVAIL: u32 = 5;
const RD_COMPL: u32 = 6;

type R<T> = Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let mut addr = "192.168.77.1".to_string();
    let mut bytes: u64 = 256 << 20;
    let mut pings: u32 = 200;
    let mut client: Option<String> = None;
    let mut use_cm = true;
    let mut port: u16 = 0;
    let mut spawn = true;
    let mut die = false;
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).cloned();
        match (args[i].as_str(), v) {
            ("--addr", Some(v)) => addr = v,
            ("--bytes", Some(v)) => bytes = v.parse().unwrap_or(0) / 8 * 8,
            ("--pings", Some(v)) => pings = v.parse().unwrap_or(0),
            ("--client", Some(v)) => client = Some(v),
            ("--port", Some(v)) if v.parse::<u16>().is_ok() => port = v.parse().unwrap_or(0),
            ("--die", Some(_)) => die = true,
            ("--serve-only", _) => {
                spawn = false;
                i += 1;
                continue;
            }
            ("--bootstrap", Some(v)) if v == "cm" || v == "tcp" => use_cm = v == "cm",
            (a, _) => {
                eprintln!(
                    "rdma-selftest: bad argument {a}\nusage: rdma-selftest [--addr IP] [--port P] [--bytes N] [--pings N] [--bootstrap cm|tcp] [--serve-only | --client IP:PORT]"
                );
                return ExitCode::from(2);
            }
        }
        i += 2;
    }
    let dev = match rdma::probe() {
        Ok(d) => d,
        Err(e) => {
            println!("rdma-selftest: {e}");
            eprintln!("no-device");
            return ExitCode::from(77);
        }
    };
    let res = match client {
        Some(server) if die => run_dying_client(&server, use_cm),
        Some(server) => run_client(&server, bytes, pings, use_cm),
        None => {
            println!(
                "rdma-selftest: device {} port {} gid_index {} mtu_enum {} limits {:?}",
                dev.name(),
                dev.port().port,
                dev.port().gid_index,
                dev.port().active_mtu,
                dev.limits()
            );
            drop(dev);
            run_server(&addr, port, spawn, bytes, pings, use_cm)
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let role = if std::env::args().any(|a| a == "--client") {
                "client"
            } else {
                "server"
            };
            eprintln!("rdma-selftest FAILED ({role}): {e}");
            ExitCode::from(1)
        }
    }
}

fn opts() -> RdmaOptions {
    RdmaOptions {
        recv_buf_size: MSG_BUF,
        recv_depth: DEPTH,
        send_depth: 16,
        max_inline: 128,
        allow_peer_read: true,
        // One connection per process, waited on with `Connection::wait`: a channel of its own.
        shared_channel: false,
    }
}

fn ep(c: RdmaConn) -> Ep {
    let credits = c.peer_initial_posts();
    Ep {
        c,
        peer_credits: credits,
        to_return: 0,
        inbox: VecDeque::new(),
        reads: VecDeque::new(),
        sends_done: 0,
        last_progress: Instant::now(),
    }
}

fn setup(stream: TcpStream, hello: &[u8]) -> R<(Ep, Vec<u8>)> {
    stream.set_nodelay(true).ok();
    let mut p = Pending::new(opts()).map_err(|e| format!("create QP: {e}"))?;
    for w in 0..DEPTH as u64 {
        p.post_recv(w).map_err(|e| format!("post_recv: {e}"))?;
    }
    let fd = Fd::from_raw(stream.into_raw_fd()).ok_or("bad fd")?;
    let (c, peer_hello) =
        bootstrap::exchange(p, fd, hello, SETUP).map_err(|e| format!("bootstrap: {e}"))?;
    Ok((ep(c), peer_hello))
}

/// The parent: listens, starts the client process, serves it.
fn run_server(addr: &str, port: u16, spawn: bool, bytes: u64, pings: u32, use_cm: bool) -> R<()> {
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|e| format!("bad --addr {addr}: {e}"))?;
    let (tcp, cm, port) = if use_cm {
        let l = cm::Listener::bind(SocketAddr::new(ip, port), 4).map_err(|e| {
            format!("rdma_cm listen on {addr}: {e} (rdma_cm needs the device's address, not lo)")
        })?;
        let port = l.port();
        (None, Some(l), port)
    } else {
        let l = TcpListener::bind((ip, port)).map_err(|e| format!("bind {addr}: {e}"))?;
        let port = l.local_addr().map_err(|e| e.to_string())?.port();
        (Some(l), None, port)
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mode = if use_cm { "cm" } else { "tcp" };
    println!("rdma-selftest: listening on {addr} port {port} ({mode})");
    let mut child = if spawn {
        let c = Command::new(exe)
            .args([
                "--client",
                &format!("{addr}:{port}"),
                "--bytes",
                &bytes.to_string(),
            ])
            .args(["--pings", &pings.to_string(), "--bootstrap", mode])
            .spawn()
            .map_err(|e| format!("spawn client: {e}"))?;
        Some(c)
    } else {
        None
    };
    let res = (|| {
        let (mut ep, hello) = accept_one(&tcp, &cm)?;
        println!("rdma-selftest: bootstrap {mode}");
        if hello != b"rdma-selftest client" {
            return Err(format!("unexpected hello {hello:?}"));
        }
        println!(
            "rdma-selftest: connected qpn {} max_inline {} attrs {:?}",
            ep.c.qp_num(),
            ep.c.max_inline(),
            ep.c.attrs()
        );
        serve(&mut ep, bytes, pings)
    })();
    let Some(mut child) = child.take() else {
        res?;
        println!("rdma-selftest ok bcopy_bytes={bytes} zcopy_bytes={bytes}");
        return Ok(());
    };
    if res.is_err() {
        let _ = child.kill(); // it would otherwise wait for its own stall limit
    }
    let st = child.wait().map_err(|e| e.to_string())?;
    res?;
    if !st.success() {
        return Err(format!("client process failed: {st}"));
    }
    peer_killed(&tcp, &cm, addr, port, mode)?;
    println!("rdma-selftest ok bcopy_bytes={bytes} zcopy_bytes={bytes}");
    Ok(())
}

fn accept_one(tcp: &Option<TcpListener>, cm: &Option<cm::Listener>) -> R<(Ep, Vec<u8>)> {
    match (tcp, cm) {
        (Some(l), _) => {
            let (s, _) = l.accept().map_err(|e| e.to_string())?;
            setup(s, b"rdma-selftest server")
        }
        (_, Some(l)) => {
            let req = l
                .request(SETUP)
                .map_err(|e| format!("rdma_cm request: {e}"))?;
            let hello = req.hello().to_vec();
            let c = req
                .accept(opts(), DEPTH, b"rdma-selftest server", SETUP)
                .map_err(|e| format!("rdma_cm accept: {e}"))?;
            Ok((ep(c), hello))
        }
        _ => unreachable!("one listener"),
    }
}

/// Messages the dying client sends (fewer than its initial credits).
const DIE_AFTER: u64 = 7;
const DIE_MSG: usize = 4096;

/// A client that sends `DIE_AFTER` messages, sees them completed, and is SIGKILLed: every
/// message must arrive, then the connection must end (PeerClosed), not hang.
fn peer_killed(
    tcp: &Option<TcpListener>,
    cm: &Option<cm::Listener>,
    addr: &str,
    port: u16,
    mode: &str,
) -> R<()> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "--client",
            &format!("{addr}:{port}"),
            "--bootstrap",
            mode,
            "--die",
            "1",
        ])
        .spawn()
        .map_err(|e| format!("spawn dying client: {e}"))?;
    let res = (|| {
        let (mut ep, _) = accept_one(tcp, cm)?;
        for i in 0..DIE_AFTER {
            let m = ep.recv()?;
            expect(&m, DATA)?;
            if m.seq != i || m.body.len() != DIE_MSG {
                return Err(format!(
                    "dying client: message {} of {} bytes, expected {i}",
                    m.seq,
                    m.body.len()
                ));
            }
            check_pattern(3, i * DIE_MSG as u64, &m.body)?;
        }
        match ep.recv() {
            Err(e) if e.starts_with("connection: peer closed") => Ok(()),
            Err(e) => Err(format!("after the peer was killed: {e}")),
            Ok(m) => Err(format!(
                "after the peer was killed: message kind {}",
                m.kind
            )),
        }
    })();
    if res.is_err() {
        let _ = child.kill();
    }
    let st = child.wait().map_err(|e| e.to_string())?;
    res?;
    use std::os::unix::process::ExitStatusExt;
    if st.signal() != Some(libc::SIGKILL) {
        return Err(format!("dying client ended with {st}, not SIGKILL"));
    }
    println!(
        "rdma-selftest: peer SIGKILLed after {DIE_AFTER} messages: all delivered, then PeerClosed"
    );
    Ok(())
}

/// The dying client: connect, send, see the sends completed, SIGKILL itself.
fn run_dying_client(server: &str, use_cm: bool) -> R<()> {
    let (mut ep, _) = connect(server, use_cm)?;
    let mut buf = vec![0u8; DIE_MSG];
    for i in 0..DIE_AFTER {
        fill_pattern(3, i * DIE_MSG as u64, &mut buf);
        ep.send(DATA, i, &buf)?;
    }
    while ep.sends_done < DIE_AFTER {
        ep.pump()?;
    }
    // SAFETY: kill(2) of our own pid with integer arguments.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    Err("still alive after SIGKILL".into())
}

fn connect(server: &str, use_cm: bool) -> R<(Ep, Vec<u8>)> {
    if use_cm {
        let sa: SocketAddr = server
            .parse()
            .map_err(|e| format!("bad address {server}: {e}"))?;
        let (c, hello) = cm::connect(sa, opts(), DEPTH, b"rdma-selftest client", SETUP)
            .map_err(|e| format!("rdma_cm connect {server}: {e}"))?;
        Ok((ep(c), hello))
    } else {
        let s = TcpStream::connect(server).map_err(|e| format!("connect {server}: {e}"))?;
        setup(s, b"rdma-selftest client")
    }
}

fn serve(ep: &mut Ep, bytes: u64, pings: u32) -> R<()> {
    // 1. ping-pong: echo.
    for _ in 0..pings {
        let m = ep.recv()?;
        expect(&m, PING)?;
        ep.send(PONG, m.seq, &m.body)?;
    }
    // 2. BCopy sink.
    let t = Instant::now();
    let mut off = 0u64;
    while off < bytes {
        let m = ep.recv()?;
        expect(&m, DATA)?;
        if m.seq != off {
            return Err(format!(
                "bcopy: message at offset {} while expecting {off}",
                m.seq
            ));
        }
        check_pattern(1, off, &m.body)?;
        off += m.body.len() as u64;
        ep.send(CREDIT, off, &[])?; // returns the credit at once
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "rdma-selftest: bcopy {off} bytes verified in {secs:.2} s ({:.1} MB/s)",
        off as f64 / secs / 1e6
    );
    // 3. ZCopy sink: RDMA READ each advertised chunk into a registered buffer, verify, RdCompl.
    ep.c.device().set_retain_local(4);
    let mut sink = vec![0u64; ZC_CHUNK / 8];
    let t = Instant::now();
    let mut off = 0u64;
    let mut reads = 0u32;
    while off < bytes {
        let m = ep.recv()?;
        expect(&m, SRC_AVAIL)?;
        let (addr, len, key) = parse_src_avail(&m.body)?;
        if m.seq != off || len as usize > ZC_CHUNK {
            return Err(format!(
                "zcopy: SrcAvail offset {} len {len} while expecting {off}",
                m.seq
            ));
        }
        let ptr = sink.as_mut_ptr().cast::<u8>();
        // SAFETY: the sink buffer lives until deregistered below and is not touched meanwhile.
        let lkey = unsafe { ep.c.register(ptr, ZC_CHUNK, Access::LocalWrite) }
            .map_err(|e| format!("register sink: {e:?}"))?;
        let c = ep.read(
            LocalSge {
                addr: ptr as u64,
                len,
                key: lkey,
            },
            RemoteSge {
                addr,
                len,
                key: MemKey(key),
            },
        )?;
        if c.status.is_err() || c.byte_len != len {
            return Err(format!("zcopy: read completion {c:?}"));
        }
        ep.c.deregister(lkey)
            .map_err(|e| format!("deregister: {e:?}"))?;
        // SAFETY: u64s viewed as bytes, within the buffer.
        let got = unsafe { std::slice::from_raw_parts(ptr.cast_const(), len as usize) };
        check_pattern(2, off, got)?;
        off += len as u64;
        reads += 1;
        ep.send(RD_COMPL, m.seq, &[])?;
    }
    let secs = t.elapsed().as_secs_f64();
    let (hits, misses, _) = ep.c.device().reg_stats();
    println!(
        "rdma-selftest: zcopy {off} bytes in {reads} RDMA READs verified in {secs:.2} s ({:.1} MB/s); sink registrations: {hits} cache hits, {misses} misses",
        off as f64 / secs / 1e6
    );
    // 4. A READ of a revoked key must fail (and end the connection).
    let m = ep.recv()?;
    expect(&m, SRC_AVAIL)?;
    let (addr, len, key) = parse_src_avail(&m.body)?;
    let ptr = sink.as_mut_ptr().cast::<u8>();
    // SAFETY: as above.
    let lkey = unsafe { ep.c.register(ptr, ZC_CHUNK, Access::LocalWrite) }
        .map_err(|e| format!("register sink: {e:?}"))?;
    match ep.read(
        LocalSge {
            addr: ptr as u64,
            len,
            key: lkey,
        },
        RemoteSge {
            addr,
            len,
            key: MemKey(key),
        },
    ) {
        Ok(c) if c.status.is_err() => println!(
            "rdma-selftest: read of a revoked key refused: {:?}, connection: {:?}",
            c.status,
            ep.c.error()
        ),
        Err(e) if e.contains("RDMA READ failed") => {
            println!("rdma-selftest: read of a revoked key refused: {e}")
        }
        other => return Err(format!("read of a revoked key was not refused: {other:?}")),
    }
    Ok(())
}

fn run_client(server: &str, bytes: u64, pings: u32, use_cm: bool) -> R<()> {
    let (mut ep, hello) = connect(server, use_cm)?;
    if hello != b"rdma-selftest server" {
        return Err(format!("unexpected hello {hello:?}"));
    }
    // 1. ping-pong.
    let t = Instant::now();
    for i in 0..pings as u64 {
        let body = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .to_le_bytes()
            .repeat(6);
        ep.send(PING, i, &body)?;
        let m = ep.recv()?;
        expect(&m, PONG)?;
        if m.seq != i || m.body != body {
            return Err(format!("ping {i}: bad pong"));
        }
    }
    if pings > 0 {
        let rtt = t.elapsed().as_secs_f64() * 1e6 / pings as f64;
        println!(
            "rdma-selftest: {pings} ping-pongs of {} bytes, mean round trip {rtt:.1} us",
            HDR + 48
        );
    }
    // 2. BCopy source.
    let payload = MSG_BUF as usize - HDR;
    let mut buf = vec![0u8; payload];
    let mut off = 0u64;
    while off < bytes {
        let n = payload.min((bytes - off) as usize);
        fill_pattern(1, off, &mut buf[..n]);
        ep.send(DATA, off, &buf[..n])?;
        off += n as u64;
    }
    // 3. ZCopy source: ZC_BUFS registered buffers advertised in turn.
    let mut src: Vec<Vec<u64>> = (0..ZC_BUFS).map(|_| vec![0u64; ZC_CHUNK / 8]).collect();
    let mut keys = Vec::new();
    for b in src.iter_mut() {
        let p = b.as_mut_ptr().cast::<u8>();
        // SAFETY: the buffer lives until deregistered below; the peer may read it.
        let k = unsafe { ep.c.register(p, ZC_CHUNK, Access::RemoteRead) }
            .map_err(|e| format!("register source: {e:?}"))?;
        keys.push(k);
    }
    let mut off = 0u64;
    let mut acked = 0u64;
    let mut inflight: VecDeque<u64> = VecDeque::new();
    let mut next_buf = 0usize;
    while acked < bytes {
        if off < bytes && inflight.len() < ZC_BUFS {
            let n = ZC_CHUNK.min((bytes - off) as usize);
            let b = &mut src[next_buf];
            // SAFETY: u64s viewed as bytes; the peer reads this buffer only after SrcAvail.
            let bytes_view =
                unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast::<u8>(), n) };
            fill_pattern(2, off, bytes_view);
            ep.send(
                SRC_AVAIL,
                off,
                &src_avail(b.as_ptr() as u64, n as u32, keys[next_buf].0),
            )?;
            inflight.push_back(off);
            off += n as u64;
            next_buf = (next_buf + 1) % ZC_BUFS;
            continue;
        }
        let m = ep.recv()?;
        expect(&m, RD_COMPL)?;
        if inflight.pop_front() != Some(m.seq) {
            return Err(format!("RdCompl for {} out of order", m.seq));
        }
        acked = (m.seq + ZC_CHUNK as u64).min(bytes);
    }
    // 4. Revoke a key, then advertise it: the peer's READ must fail.
    ep.c.deregister(keys[0])
        .map_err(|e| format!("deregister: {e:?}"))?;
    ep.send(
        SRC_AVAIL,
        u64::MAX,
        &src_avail(src[0].as_ptr() as u64, 4096, keys[0].0),
    )?;
    // Wait for the server to go (its close ends our connection).
    match ep.recv() {
        Ok(m) => Err(format!(
            "unexpected message kind {} after the revoked SrcAvail",
            m.kind
        )),
        // The connection ended (the server's QP failed the READ and the server left).
        Err(e) if e.starts_with("connection:") || e.starts_with("wait:") => {
            ep.c.deregister(keys[1])
                .map_err(|e| format!("deregister: {e:?}"))
        }
        Err(e) => Err(e),
    }
}

/// The guest's drop and retransmission counters, for a stall report.
fn counters() -> String {
    let mut out = String::new();
    if let Ok(s) = std::fs::read_to_string("/proc/net/softnet_stat") {
        out += &format!("softnet_stat (processed dropped squeezed ...):\n{s}");
    }
    if let Ok(dir) = std::fs::read_dir("/sys/class/infiniband/rxe0/ports/1/hw_counters") {
        let mut v: Vec<String> = dir
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                let val = std::fs::read_to_string(e.path()).ok()?;
                Some(format!("{n}={}", val.trim()))
            })
            .collect();
        v.sort();
        out += &format!("rxe0 counters: {}", v.join(" "));
    }
    out
}

struct Msg {
    kind: u32,
    seq: u64,
    body: Vec<u8>,
}

fn expect(m: &Msg, kind: u32) -> R<()> {
    if m.kind != kind {
        return Err(format!("expected message kind {kind}, got {}", m.kind));
    }
    Ok(())
}

fn src_avail(addr: u64, len: u32, key: u32) -> Vec<u8> {
    let mut v = addr.to_le_bytes().to_vec();
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&key.to_le_bytes());
    v
}

fn parse_src_avail(b: &[u8]) -> R<(u64, u32, u32)> {
    if b.len() != 16 {
        return Err("bad SrcAvail".into());
    }
    Ok((
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        u32::from_le_bytes(b[12..16].try_into().unwrap()),
    ))
}

fn word(stream: u64, off: u64) -> u64 {
    // splitmix64 of the absolute offset: any misplaced, lost or repeated byte shows.
    let mut z = off.wrapping_add(stream.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill_pattern(stream: u64, off: u64, buf: &mut [u8]) {
    for (i, c) in buf.chunks_mut(8).enumerate() {
        let w = word(stream, off + 8 * i as u64).to_le_bytes();
        c.copy_from_slice(&w[..c.len()]);
    }
}

fn check_pattern(stream: u64, off: u64, buf: &[u8]) -> R<()> {
    for (i, c) in buf.chunks(8).enumerate() {
        let w = word(stream, off + 8 * i as u64).to_le_bytes();
        if c != &w[..c.len()] {
            return Err(format!(
                "corruption at stream {stream} offset {}",
                off + 8 * i as u64
            ));
        }
    }
    Ok(())
}

/// A connection with the test's credit protocol: every message's header returns the receive
/// buffers reposted since the last message (as SDP's BSDH does); the last credit is used only
/// by a message that returns credits, so the two sides never both wait for credits.
struct Ep {
    c: RdmaConn,
    peer_credits: u32,
    to_return: u32,
    inbox: VecDeque<Msg>,
    reads: VecDeque<Completion>,
    sends_done: u64,
    last_progress: Instant,
}

impl Ep {
    fn send(&mut self, kind: u32, seq: u64, body: &[u8]) -> R<()> {
        loop {
            if self.peer_credits >= 2 || (self.peer_credits == 1 && self.to_return > 0) {
                let mut h = [0u8; HDR];
                h[0..4].copy_from_slice(&kind.to_le_bytes());
                h[4..8].copy_from_slice(&self.to_return.to_le_bytes());
                h[8..16].copy_from_slice(&seq.to_le_bytes());
                match self.c.post_send(seq, &[&h, body]) {
                    Ok(()) => {
                        self.peer_credits -= 1;
                        self.to_return = 0;
                        return Ok(());
                    }
                    Err(PostError::QueueFull) => {}
                    Err(e) => return Err(format!("post_send: {e} (wc {:?})", self.c.failed_wc())),
                }
            }
            self.pump()?;
        }
    }

    fn recv(&mut self) -> R<Msg> {
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return Ok(m);
            }
            self.pump()?;
        }
    }

    fn read(&mut self, local: LocalSge, remote: RemoteSge) -> R<Completion> {
        loop {
            match self.c.post_read(7, local, remote) {
                Ok(()) => break,
                Err(PostError::QueueFull) => self.pump()?,
                Err(e) => return Err(format!("post_read: {e}")),
            }
        }
        loop {
            if let Some(c) = self.reads.pop_front() {
                return Ok(c);
            }
            self.pump()?;
        }
    }

    /// Handles available completions, or sleeps until some come.
    fn pump(&mut self) -> R<()> {
        let mut cs = [Completion {
            wr_id: 0,
            opcode: Opcode::Send,
            status: Ok(()),
            byte_len: 0,
            buf_index: 0,
        }; 16];
        let n = match self.c.poll_cq(&mut cs) {
            Ok(n) => n,
            Err(e) => return Err(format!("connection: {e} (wc {:?})", self.c.failed_wc())),
        };
        if n == 0 {
            match self
                .c
                .wait(Duration::from_micros(50), Some(Duration::from_secs(1)))
            {
                Ok(WaitOutcome::TimedOut) if self.last_progress.elapsed() > STALL => {
                    return Err(format!(
                        "no progress for {} s: {:?} peer_credits {} to_return {} inbox {}\n{}",
                        STALL.as_secs(),
                        self.c,
                        self.peer_credits,
                        self.to_return,
                        self.inbox.len(),
                        counters()
                    ));
                }
                Ok(_) => return Ok(()),
                Err(e) => return Err(format!("wait: {e} (wc {:?})", self.c.failed_wc())),
            }
        }
        self.last_progress = Instant::now();
        for c in &cs[..n] {
            match c.opcode {
                Opcode::Recv => {
                    let mut data = vec![0u8; c.byte_len as usize];
                    let got = self
                        .c
                        .recv_data(c, 0, &mut data)
                        .map_err(|e| format!("recv_data: {e}"))?;
                    if got < HDR {
                        return Err(format!("short message of {got} bytes"));
                    }
                    self.c
                        .post_recv(c.wr_id)
                        .map_err(|e| format!("post_recv: {e}"))?;
                    self.to_return += 1;
                    let kind = u32::from_le_bytes(data[0..4].try_into().unwrap());
                    self.peer_credits += u32::from_le_bytes(data[4..8].try_into().unwrap());
                    let seq = u64::from_le_bytes(data[8..16].try_into().unwrap());
                    if kind != CREDIT {
                        data.drain(..HDR);
                        self.inbox.push_back(Msg {
                            kind,
                            seq,
                            body: data,
                        });
                    }
                }
                Opcode::Read => self.reads.push_back(*c),
                Opcode::Send => self.sends_done += 1,
                // The selftest posts no keepalive probe.
                Opcode::Write => {}
            }
        }
        Ok(())
    }
}
