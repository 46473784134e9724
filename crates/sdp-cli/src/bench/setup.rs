//! `setup_rate`: TCP connections set up and torn down per second. A client connects,
//! sends one byte, reads the one-byte answer and closes, again and again, against a
//! server that accepts, reads one byte, answers it and closes.
//!
//! Both ends are this same executable, re-run as `sdp bench` with [`SETUP_ENV`] set
//! (in the style of [`super::fdloop`]): `server:<port>` accepts until it is killed;
//! `client:<port>:<connections per batch>:<milliseconds>` runs batches until the time
//! is spent (at least three, the first one discarded) and prints
//! `conns_per_sec=<median over batches>`. std's `TcpListener` and `TcpStream` call
//! libc's `socket`, `connect`, `accept4`, `read`, `write` and `close`, the symbols the
//! preload interposes, so the libsdp leg sets up SDP connections.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::proc::{ChildGuard, Leg, wait_listening};
use super::stats::median;
use super::workloads::Ctx;

/// Environment variable that turns `sdp bench` into one end of the setup loop.
pub const SETUP_ENV: &str = "__SDP_BENCH_SETUP";

/// The byte of the client's last, untimed connection, which the server keeps open until
/// the client closes it.
const HOLD: u8 = b'H';

/// One repetition: a fresh server on `port`, one client run; connections per second.
pub fn rate(ctx: &Ctx, leg: &Leg, port: u16) -> Result<Vec<f64>, String> {
    let (per_batch, millis) = if ctx.quick { (100, 250) } else { (200, 1000) };
    let mut srv = leg.command(&ctx.sdp_exe, ctx.server_cpu.or(ctx.cpu));
    srv.arg("bench").env(SETUP_ENV, format!("server:{port}"));
    let mut server = ChildGuard::spawn(srv, "sdp setup server")?;
    wait_listening(&mut server, port, Duration::from_secs(10))?;
    let mut cli = leg.command(&ctx.sdp_exe, ctx.cpu);
    cli.arg("bench")
        .env(SETUP_ENV, format!("client:{port}:{per_batch}:{millis}"));
    let out = ChildGuard::spawn(cli, "sdp setup client")?.wait_ok(Duration::from_secs(60))?;
    drop(server);
    if let Some(us) = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("slowest_conn_us="))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&us| us >= 100_000)
    {
        eprintln!(
            "sdp bench: setup_rate ({leg}): one connection took {} ms",
            us / 1000
        );
    }
    let v = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("conns_per_sec="))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "the setup client printed no conns_per_sec: {}",
                out.stdout.trim()
            )
        })?;
    Ok(vec![v])
}

/// Body of the child process; `spec` is the value of [`SETUP_ENV`].
pub fn child_main(spec: &str) -> Result<(), String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |s: &str| {
        s.parse::<u64>()
            .map_err(|e| format!("{SETUP_ENV}={spec}: {e}"))
    };
    match parts.as_slice() {
        ["server", port] => server(num(port)? as u16),
        ["client", port, per_batch, millis] => {
            client(num(port)? as u16, num(per_batch)?, num(millis)?)
        }
        _ => Err(format!(
            "{SETUP_ENV}: expected server:PORT or client:PORT:PER_BATCH:MILLIS, got {spec}"
        )),
    }
}

fn server(port: u16) -> Result<(), String> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
    let mut b = [0u8; 1];
    loop {
        // A failed connection is the client's problem (it reports it); keep serving.
        let Ok((mut s, _)) = l.accept() else {
            continue;
        };
        if let Ok(1) = s.read(&mut b)
            && s.write_all(&b).is_ok()
            && b[0] == HOLD
        {
            // The client's held connection: stay open until the client closes.
            while let Ok(1..) = s.read(&mut b) {}
        }
        // Otherwise the server closes first, as an HTTP/1.0 server does: the TIME_WAIT
        // stays on the server's port instead of tying up the machine's ephemeral ports.
    }
}

fn client(port: u16, per_batch: u64, millis: u64) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let budget = Duration::from_millis(millis);
    let started = Instant::now();
    let mut rates = Vec::new();
    let mut batch = 0usize;
    // The first batch warms up and is discarded; then batches until the budget is
    // spent, three at least.
    let mut slowest = Duration::ZERO;
    while batch < 4 || started.elapsed() < budget {
        let t = Instant::now();
        for i in 0..per_batch {
            let c = Instant::now();
            drop(one(addr, 0x5a).map_err(|e| format!("connection {i} of batch {batch}: {e}"))?);
            slowest = slowest.max(c.elapsed());
        }
        if batch > 0 {
            rates.push(per_batch as f64 / t.elapsed().as_secs_f64());
        }
        batch += 1;
    }
    // One more connection, untimed, held open long enough for the bench's look at the
    // statistics: the timed ones live for microseconds and may all slip between two.
    let held = one(addr, HOLD).map_err(|e| format!("held connection: {e}"))?;
    std::thread::sleep(Duration::from_millis(60));
    drop(held);
    println!("conns_per_sec={:.1}", median(&rates));
    println!("slowest_conn_us={}", slowest.as_micros());
    Ok(())
}

/// connect and one byte each way; dropping the stream closes it.
fn one(addr: SocketAddr, byte: u8) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(&[byte])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(s)
}
