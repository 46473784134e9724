//! A plain std networking program for the transport tests (it knows nothing of libsdp): one
//! client streams a known pattern to one server in writes of many sizes, the server checks
//! every byte and answers with its verdict.
//!
//! ```text
//! stream_check serve ADDR PORT [--fork] [--hold FILE]   accept one connection, check it, answer
//! stream_check send ADDR PORT BYTES [--hold FILE]
//! stream_check idle ADDR PORT --keepalive SECS
//! stream_check quiet ADDR PORT SECS [--keepalive SECS]
//! stream_check closing ADDR PORT SECS
//! stream_check write-after-close ADDR PORT
//! ```
//!
//! The client writes BYTES bytes in writes cycling through sizes from 1 byte to 1 MiB (small
//! ones travel inside SDP messages, those of 64 KiB and more are ZCopy candidates), half-closes,
//! and prints the server's verdict line (`ok BYTES` or `mismatch at OFFSET`). With `--hold`
//! it then writes that line to FILE and keeps the connection open until FILE is removed (a test
//! reads `sdp stat` meanwhile); a server given the same FILE keeps its end open until the
//! client wrote FILE and FILE was removed. Exit status 0 only for `ok` (the client: with the
//! byte count sent). With `--fork` the server listens, then a forked child accepts and serves
//! while the listening parent waits for it (a prefork server's shape).
//!
//! Keepalive: `idle` connects, sets SO_KEEPALIVE, TCP_KEEPIDLE=SECS, TCP_KEEPINTVL=1 and
//! TCP_KEEPCNT=2 (none of them for SECS 0), prints `connected`, blocks in one `read` and prints
//! how it ended: `ended: bytes N TEXT`, `ended: eof` or `ended: error ENAME` (exit 0; 3 when it
//! could not connect or set the options). `quiet` accepts one connection, prints `accepted`,
//! stays silent SECS seconds (the client idles past its keepalive time), then writes `hello`
//! and waits for the client to close; with `--keepalive` the same options are set on its
//! listener before `listen`, for the accepted socket to inherit.
//!
//! Writing to a closed peer: `closing ADDR PORT SECS` accepts one connection, reads `hello`,
//! closes it and lives SECS seconds more; `write-after-close ADDR PORT` sends `hello`, reads
//! the end of stream, and prints SO_ERROR and the results of two writes and a read (TCP: the
//! first write succeeds, the peer's RST makes SO_ERROR EPIPE once and the second write EPIPE).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

/// The pattern's period: a prime, so that no write size lines up with it.
const PERIOD: usize = 1_048_573;

/// Write sizes, in turn.
const SIZES: [usize; 10] = [
    1,
    100,
    4096,
    65536,
    1 << 20,
    3000,
    300_000,
    17,
    131_072,
    40_000,
];

fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..PERIOD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The pattern's bytes `at..at + out.len()`.
fn fill(pat: &[u8], at: u64, out: &mut [u8]) {
    let mut i = (at % PERIOD as u64) as usize;
    let mut done = 0;
    while done < out.len() {
        let k = (PERIOD - i).min(out.len() - done);
        out[done..done + k].copy_from_slice(&pat[i..i + k]);
        done += k;
        i = 0;
    }
}

fn serve(addr: &str, port: &str, fork: bool, hold: Option<&str>) -> i32 {
    let l = TcpListener::bind(format!("{addr}:{port}")).expect("bind");
    println!("listening");
    if fork {
        // SAFETY: the process has no other thread; the child only uses its own copies.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid > 0 {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                1
            };
        }
    }
    let (mut s, _) = l.accept().expect("accept");
    let pat = pattern();
    let mut buf = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut at: u64 = 0;
    let mut bad = None;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("read: {e}"),
        };
        if bad.is_none() {
            fill(&pat, at, &mut want[..n]);
            if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
                bad = Some(at + i as u64);
            }
        }
        at += n as u64;
    }
    let verdict = match bad {
        None => format!("ok {at}\n"),
        Some(o) => format!("mismatch at {o} of {at}\n"),
    };
    print!("{verdict}");
    s.write_all(verdict.as_bytes()).expect("answer");
    if let Some(f) = hold {
        let f = std::path::Path::new(f);
        while !f.exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
        while f.exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    i32::from(bad.is_some())
}

/// Connects, again while refused for a minute: the server may be on another host, not up yet.
fn connect_retrying(addr: &str, port: &str) -> std::io::Result<TcpStream> {
    let start = std::time::Instant::now();
    loop {
        match TcpStream::connect(format!("{addr}:{port}")) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && start.elapsed() < Duration::from_secs(60) =>
            {
                std::thread::sleep(Duration::from_millis(200))
            }
            r => return r,
        }
    }
}

fn send(addr: &str, port: &str, bytes: u64, hold: Option<&str>) -> i32 {
    let mut s = connect_retrying(addr, port).unwrap_or_else(|e| panic!("connect: {e}"));
    let pat = pattern();
    let mut chunk = vec![0u8; 1 << 20];
    let (mut at, mut writes, mut large) = (0u64, 0u64, 0u64);
    while at < bytes {
        let n = (SIZES[writes as usize % SIZES.len()] as u64).min(bytes - at) as usize;
        fill(&pat, at, &mut chunk[..n]);
        s.write_all(&chunk[..n]).expect("write");
        at += n as u64;
        writes += 1;
        large += u64::from(n >= 65536);
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    println!("sent {at} bytes in {writes} writes, {large} of them of 64 KiB or more");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("verdict");
    print!("server: {line}");
    if let Some(f) = hold {
        // Written whole, then renamed into place: whoever sees FILE reads the whole verdict.
        let tmp = format!("{f}.tmp");
        std::fs::write(&tmp, &line).expect("hold file");
        std::fs::rename(&tmp, f).expect("hold file");
        while std::path::Path::new(f).exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    i32::from(line.trim() != format!("ok {bytes}"))
}

/// The client with keepalive on: one blocking read, reported.
fn idle(addr: &str, port: &str, secs: i32) -> i32 {
    let mut s = match connect_retrying(addr, port) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect: {e}");
            return 3;
        }
    };
    use std::os::fd::AsRawFd;
    if secs > 0
        && let Err(e) = set_keepalive(s.as_raw_fd(), secs)
    {
        eprintln!("{e}");
        return 3;
    }
    println!("connected");
    let mut buf = [0u8; 256];
    let ended = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof".to_string(),
            Ok(n) => {
                break format!("bytes {n} {}", String::from_utf8_lossy(&buf[..n]).trim());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break format!("error {}", errno_name(e.raw_os_error().unwrap_or(0))),
        }
    };
    println!("ended: {ended}");
    0
}

/// SO_KEEPALIVE on, TCP_KEEPIDLE `secs`, TCP_KEEPINTVL 1, TCP_KEEPCNT 2.
fn set_keepalive(fd: i32, secs: i32) -> Result<(), String> {
    for (level, name, v) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 2),
    ] {
        // SAFETY: an int option of our own socket, from a valid pointer.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &v as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(format!(
                "setsockopt({level}, {name}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// An IPv4 listener with keepalive set before `listen` (std binds and listens in one call).
fn keepalive_listener(addr: &str, port: &str, secs: i32) -> TcpListener {
    use std::os::fd::FromRawFd;
    let ip: std::net::Ipv4Addr = addr.parse().expect("IPv4 ADDR");
    let port: u16 = port.parse().expect("PORT");
    // SAFETY: plain socket calls on a socket we own; `sa` is a valid sockaddr_in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        set_keepalive(fd, secs).expect("keepalive on the listener");
        let one: i32 = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, 16), 0, "listen");
        TcpListener::from_raw_fd(fd)
    }
}

fn errno_name(e: i32) -> String {
    match e {
        0 => "0".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::EPIPE => "EPIPE".into(),
        libc::EHOSTUNREACH => "EHOSTUNREACH".into(),
        libc::EIO => "EIO".into(),
        e => format!("errno{e}"),
    }
}

/// The server of `idle`: silent for `secs`, then one line.
fn quiet(addr: &str, port: &str, secs: u64, keepalive: Option<i32>) -> i32 {
    let l = match keepalive {
        Some(k) => keepalive_listener(addr, port, k),
        None => TcpListener::bind(format!("{addr}:{port}")).expect("bind"),
    };
    println!("listening");
    let (mut s, _) = l.accept().expect("accept");
    println!("accepted");
    std::thread::sleep(Duration::from_secs(secs));
    s.write_all(b"hello\n").expect("write");
    let mut buf = [0u8; 64];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    println!("done");
    0
}

/// `closing`: accepts one connection, reads `hello`, closes it (a FIN: nothing unread), and
/// stays alive for `secs` seconds, so that the client meets a closed peer, not an exited one.
fn closing(addr: &str, port: &str, secs: u64) -> i32 {
    let l = TcpListener::bind(format!("{addr}:{port}")).expect("bind");
    println!("listening");
    let (mut s, _) = l.accept().expect("accept");
    let mut b = [0u8; 5];
    s.read_exact(&mut b).expect("read hello");
    drop(s);
    println!("closed");
    std::thread::sleep(Duration::from_secs(secs));
    0
}

fn so_error(fd: i32) -> i32 {
    let mut e: i32 = 0;
    let mut l = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: e and l are ours and sized for SO_ERROR.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut e as *mut i32).cast(),
            &mut l,
        )
    };
    assert_eq!(r, 0, "getsockopt SO_ERROR");
    e
}

fn send3(fd: i32) -> String {
    // SAFETY: a 3-byte buffer of ours.
    let r = unsafe { libc::send(fd, b"req".as_ptr().cast(), 3, libc::MSG_NOSIGNAL) };
    if r < 0 {
        errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        r.to_string()
    }
}

/// `write-after-close`: what a client sees writing to a peer that closed (a `closing`
/// server): the first write succeeds, the peer's RST then makes SO_ERROR EPIPE once and the
/// next write EPIPE; reads see end of stream. Prints one line per step (exit 0).
fn write_after_close(addr: &str, port: &str) -> i32 {
    use std::os::fd::AsRawFd;
    let mut s = TcpStream::connect(format!("{addr}:{port}")).expect("connect");
    s.write_all(b"hello").expect("hello");
    let mut b = [0u8; 8];
    println!(
        "read after the peer's close: {}",
        s.read(&mut b).expect("read")
    );
    // Time for the peer's end to arrive (and for a test to read `sdp stat`).
    std::thread::sleep(Duration::from_millis(500));
    let fd = s.as_raw_fd();
    println!(
        "SO_ERROR after the peer's close: {}",
        errno_name(so_error(fd))
    );
    println!("first write: {}", send3(fd));
    std::thread::sleep(Duration::from_millis(500));
    let (e1, e2) = (so_error(fd), so_error(fd));
    println!(
        "SO_ERROR after it: {}, then {}",
        errno_name(e1),
        errno_name(e2)
    );
    println!("second write: {}", send3(fd));
    let r = match s.read(&mut b) {
        Ok(n) => n.to_string(),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
    };
    println!("read: {r}");
    0
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let v: Vec<&str> = a.iter().map(String::as_str).collect();
    let fork = v.contains(&"--fork");
    let v: Vec<&str> = v.into_iter().filter(|x| *x != "--fork").collect();
    let code = match v[1..] {
        ["serve", addr, port] => serve(addr, port, fork, None),
        ["serve", addr, port, "--hold", f] => serve(addr, port, fork, Some(f)),
        ["send", addr, port, n] => send(addr, port, n.parse().expect("BYTES"), None),
        ["send", addr, port, n, "--hold", f] => {
            send(addr, port, n.parse().expect("BYTES"), Some(f))
        }
        ["idle", addr, port, "--keepalive", secs] => idle(addr, port, secs.parse().expect("SECS")),
        ["quiet", addr, port, secs] => quiet(addr, port, secs.parse().expect("SECS"), None),
        ["quiet", addr, port, secs, "--keepalive", k] => quiet(
            addr,
            port,
            secs.parse().expect("SECS"),
            Some(k.parse().expect("SECS")),
        ),
        ["closing", addr, port, secs] => closing(addr, port, secs.parse().expect("SECS")),
        ["write-after-close", addr, port] => write_after_close(addr, port),
        _ => {
            eprintln!(
                "usage: stream_check serve ADDR PORT [--fork] [--hold FILE] | send ADDR PORT BYTES [--hold FILE] | idle ADDR PORT --keepalive SECS | quiet ADDR PORT SECS [--keepalive SECS] | closing ADDR PORT SECS | write-after-close ADDR PORT"
            );
            2
        }
    };
    std::process::exit(code);
}
