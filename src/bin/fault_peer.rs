//! A plain std networking program for the fault tests over rdma (tests/rdma_guest.rs,
//! `one_guest_faults_*`; it knows nothing of libsdp): a server that serves connections one
//! after another and survives their faults, and a client that plays the victim the harness
//! kills with SIGKILL.
//!
//! ```text
//! fault_peer serve ADDR PORT [--gate]  serve connections one at a time, forever
//! fault_peer client ADDR PORT SCENARIO
//! fault_peer listen ADDR PORT [--close-on-go]
//!                                       listen and never accept (a victim); with
//!                                       --close-on-go, close the listener after a line
//!                                       on stdin (prints `closed`) and live on
//! fault_peer pending ADDR PORT          connect to it, write 3 bytes, blocked in read
//! fault_peer vserve ADDR PORT SCENARIO [--gate]
//!                                       the victim as the server: accept one connection
//!                                       and play the client's part of SCENARIO
//! fault_peer survive ADDR PORT          the survivor as the client: connect and play the
//!                                       server's part, print `end ...`, wait for stdin
//! fault_peer nofile ADDR PORT           good exchanges with room for 0..24 descriptors
//!                                       (RLIMIT_NOFILE), one line each, then `held` and
//!                                       the connections stay open until stdin closes
//! ```
//!
//! With `--gate` the server reads a line from stdin before each `accept` (the harness kills a
//! client between its connect and the accept: scenario `C`, whose client connects, prints
//! `ready` and sends nothing; the server then prints `end -: accept ok, read WHAT`).
//! `pending`, the survivor of a listener killed before it accepted, prints `connected`, then
//! `end pending: read WHAT, read WHAT, write WHAT`, and exits when stdin closes.
//!
//! The client connects, sends the scenario letter, reads the server's `k` and then acts:
//!
//! | letter | client (the victim) | server (the survivor) |
//! |---|---|---|
//! | `g` | a good exchange: `ping`, reads `pong`, half-closes, reads to the end, exits 0 | answers, reads to the end |
//! | `S` | writes 1000 B and 100 KiB writes forever (bulk sender) | reads until end or error |
//! | `W` | reads forever (bulk receiver) | writes 1000 B and 100 KiB writes until error |
//! | `B` | never reads | writes until error (blocked on full buffers) |
//! | `O` | never reads | fills the buffers (non-blocking, until no room for 1 s), prints `filled`, blocked in `poll(POLLOUT)`, polls again 200 ms later, then `SO_ERROR` and a write |
//! | `R` | idles | blocked in `read` |
//! | `P` | idles | blocked in `poll(POLLIN\|POLLRDHUP)`, then reads |
//! | `E` | idles | blocked in `epoll_wait(EPOLLIN\|EPOLLRDHUP)`, then reads |
//!
//! The client prints `connected` once its `connect` returned (the harness lets a gated server
//! accept only then) and `ready` once the connection is in the state the harness kills it in
//! (bulk: after 1 MiB moved). After each connection the server prints one line
//! `end SCENARIO: WHAT` naming what its calls returned (never a count that depends on
//! timing), e.g. `end S: read eof, read eof` or `end W: write ECONNRESET, write EPIPE`, then
//! closes the connection.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

const BULK: [usize; 2] = [1000, 100 * 1024];
/// The most a survivor waits in `poll`/`epoll_wait` (the harness's bound is shorter).
const WAIT_MS: i32 = 120_000;

/// What an I/O call gave, as a word: `eof`, `data`, `ok` or the errno's name.
fn what(r: &std::io::Result<usize>) -> String {
    match r {
        Ok(0) => "eof".into(),
        Ok(_) => "data".into(),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
    }
}

fn errno_name(e: i32) -> String {
    match e {
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::EPIPE => "EPIPE".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::ECONNABORTED => "ECONNABORTED".into(),
        libc::ENOTCONN => "ENOTCONN".into(),
        libc::EIO => "EIO".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::EINTR => "EINTR".into(),
        other => format!("errno {other}"),
    }
}

fn events(ev: u32) -> String {
    let names = [
        (libc::POLLIN as u32, "IN"),
        (libc::POLLPRI as u32, "PRI"),
        (libc::POLLOUT as u32, "OUT"),
        (libc::POLLERR as u32, "ERR"),
        (libc::POLLHUP as u32, "HUP"),
        (libc::POLLRDHUP as u32, "RDHUP"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| ev & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join("|")
    }
}

/// Reads until something other than data (or EINTR): its word.
fn read_to_end_or_error(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let r = s.read(&mut buf);
        match &r {
            Ok(n) if *n > 0 => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => return what(&r),
        }
    }
}

/// Writes bulk until a write fails: its word.
fn write_until_error(s: &mut TcpStream) -> String {
    let buf = vec![0x5au8; BULK[1]];
    let mut i = 0;
    loop {
        let r = s.write(&buf[..BULK[i % 2]]);
        i += 1;
        match &r {
            Ok(n) if *n > 0 => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => return what(&r),
        }
    }
}

fn one_read(s: &mut TcpStream) -> String {
    let mut b = [0u8; 64 * 1024];
    what(&s.read(&mut b))
}

fn serve_one(s: &mut TcpStream) -> String {
    let mut cmd = [0u8; 1];
    match s.read(&mut cmd) {
        Ok(1) => {}
        r => return format!("-: accept ok, read {}", what(&r)),
    }
    if s.write_all(b"k").is_err() {
        return format!("{}: ack failed", cmd[0] as char);
    }
    let fd = s.as_raw_fd();
    let end = match cmd[0] {
        b'g' => {
            let mut ping = [0u8; 4];
            match s.read_exact(&mut ping).and_then(|()| s.write_all(b"pong")) {
                Ok(()) => format!("exchanged, read {}", read_to_end_or_error(s)),
                Err(e) => format!("exchange failed: {e}"),
            }
        }
        b'S' => {
            let first = read_to_end_or_error(s);
            format!("read {first}, read {}", one_read(s))
        }
        b'W' | b'B' => {
            let first = write_until_error(s);
            let again = what(&s.write(b"x"));
            format!("write {first}, write {again}")
        }
        b'O' => {
            s.set_nonblocking(true).expect("non-blocking");
            let buf = vec![0x5au8; BULK[1]];
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // Full: EAGAIN, and no room for a second. (Over rdma a large write is one
            // SrcAvail, and the next one waits for the peer to read it: EAGAIN, then room
            // again as soon as the peer's adapter took it, as from a small send buffer.)
            let full = loop {
                let r = loop {
                    match s.write(&buf) {
                        Ok(n) if n > 0 => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        r => break what(&r),
                    }
                };
                // SAFETY: one valid pollfd for the duration of the call.
                if r != "EAGAIN" || unsafe { libc::poll(&mut p, 1, 1000) } == 0 {
                    break r;
                }
            };
            // The harness kills the victim once it read this.
            println!("filled");
            let _ = std::io::stdout().flush();
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, WAIT_MS) };
            let first = events(p.revents as u32);
            // What it polls a moment later (a poller may wake between two changes).
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: as above.
            unsafe { libc::poll(&mut p, 1, 0) };
            let soerr = match s.take_error() {
                Ok(None) => "none".to_string(),
                Ok(Some(e)) => errno_name(e.raw_os_error().unwrap_or(0)),
                Err(e) => format!("getsockopt failed: {e}"),
            };
            format!(
                "filled to {full}, poll {n} {first} then {}, SO_ERROR {soerr}, write {}",
                events(p.revents as u32),
                what(&s.write(b"x"))
            )
        }
        b'R' => format!("read {}, read {}", one_read(s), one_read(s)),
        b'P' => {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, WAIT_MS) };
            format!(
                "poll {n} {}, read {}",
                events(p.revents as u32),
                one_read(s)
            )
        }
        b'E' => {
            // SAFETY: plain epoll calls on descriptors this function owns or borrows.
            let (n, ev) = unsafe {
                let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
                assert!(ep >= 0, "epoll_create1");
                let mut e = libc::epoll_event {
                    events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                    u64: 7,
                };
                assert_eq!(libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut e), 0);
                let mut out = libc::epoll_event { events: 0, u64: 0 };
                let n = libc::epoll_wait(ep, &mut out, 1, WAIT_MS);
                libc::close(ep);
                (n, out.events)
            };
            format!("epoll_wait {n} {}, read {}", events(ev), one_read(s))
        }
        other => format!("unknown scenario {:?}", other as char),
    };
    format!("{}: {end}", cmd[0] as char)
}

fn serve(addr: &str, port: &str, gate: bool) -> i32 {
    let l = TcpListener::bind(format!("{addr}:{port}")).expect("bind");
    println!("listening");
    loop {
        if gate {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).unwrap_or(0) == 0 {
                return 0;
            }
        }
        let (mut s, _) = match l.accept() {
            Ok(c) => c,
            Err(e) => {
                println!("accept failed: {e}");
                continue;
            }
        };
        let line = serve_one(&mut s);
        drop(s);
        println!("end {line}");
    }
}

fn client(addr: &str, port: &str, scenario: &str) -> i32 {
    let s = TcpStream::connect(format!("{addr}:{port}")).expect("connect");
    println!("connected");
    let _ = std::io::stdout().flush();
    victim(s, scenario)
}

/// The victim of the roles swapped: accepts one connection (after a line on stdin when
/// `gate`) and plays the client's part of `scenario` on it.
fn victim_server(addr: &str, port: &str, scenario: &str, gate: bool) -> i32 {
    let l = TcpListener::bind(format!("{addr}:{port}")).expect("bind");
    println!("listening");
    let _ = std::io::stdout().flush();
    if gate {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    let (s, _) = l.accept().expect("accept");
    victim(s, scenario)
}

/// The survivor of the roles swapped: connects and plays the server's part; prints its end
/// and lives until stdin closes (the harness counts what it holds afterwards).
fn survivor_client(addr: &str, port: &str) -> i32 {
    let mut s = TcpStream::connect(format!("{addr}:{port}")).expect("connect");
    println!("connected");
    let _ = std::io::stdout().flush();
    let line = serve_one(&mut s);
    drop(s);
    println!("end {line}");
    let _ = std::io::stdout().flush();
    let mut rest = String::new();
    let _ = std::io::stdin().read_to_string(&mut rest);
    0
}

/// The lowest descriptor number free now (the next one a call would get).
fn lowest_free_fd() -> i32 {
    // SAFETY: dup of stdin and close of the copy: no memory involved.
    unsafe {
        let t = libc::dup(0);
        assert!(t >= 0, "dup");
        libc::close(t);
        t
    }
}

/// The `g` exchange of a client on a fresh connection made while the process has room for
/// `room` more descriptors only: one line naming what each step gave.
fn good_with_room(addr: &str, port: &str, room: i32) -> (String, Option<TcpStream>) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        let r = libc::rlimit {
            rlim_cur: (lowest_free_fd() + room) as libc::rlim_t,
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
    let r = TcpStream::connect(format!("{addr}:{port}"));
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &old), 0) };
    let mut s = match r {
        Ok(s) => s,
        Err(e) => {
            return (format!("room for {room}: connect {}", what(&Err(e))), None);
        }
    };
    let mut k = [0u8; 1];
    let mut pong = [0u8; 4];
    let ok = s.write_all(b"g").is_ok()
        && s.read_exact(&mut k).is_ok()
        && s.write_all(b"ping").is_ok()
        && s.read_exact(&mut pong).is_ok()
        && &pong == b"pong"
        // The server serves one connection at a time: half-close, and read its end, so that
        // it goes on to the next one while this one stays open here.
        && s.shutdown(Shutdown::Write).is_ok()
        && s.read(&mut k).is_ok_and(|n| n == 0);
    (
        format!(
            "room for {room}: connect ok, exchange {}",
            if ok { "ok" } else { "failed" }
        ),
        Some(s),
    )
}

/// Good exchanges with room for 0..=[`NOFILE_ROOMS`] descriptors, the connections kept open
/// (half-open: the server reads to the end) until stdin closes, so that the harness can read
/// `sdp stat`.
fn nofile(addr: &str, port: &str) -> i32 {
    const NOFILE_ROOMS: i32 = 24;
    let mut keep = Vec::new();
    for room in 0..=NOFILE_ROOMS {
        let (line, s) = good_with_room(addr, port, room);
        println!("{line}");
        keep.extend(s);
    }
    println!("held");
    let _ = std::io::stdout().flush();
    let mut rest = String::new();
    let _ = std::io::stdin().read_to_string(&mut rest);
    0
}

/// The victim's part of `scenario` on a connected stream (see the table above).
fn victim(mut s: TcpStream, scenario: &str) -> i32 {
    if scenario == "C" {
        // Killed before the server accepts: nothing written (it would die with a pending SDP
        // connection's buffer, docs/FAULTS.md).
        println!("ready");
        let _ = std::io::stdout().flush();
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    s.write_all(scenario.as_bytes()).expect("scenario");
    let mut k = [0u8; 1];
    s.read_exact(&mut k).expect("the server's k");
    let ready = || {
        println!("ready");
        let _ = std::io::stdout().flush();
    };
    match scenario {
        "g" => {
            let mut pong = [0u8; 4];
            s.write_all(b"ping").expect("ping");
            s.read_exact(&mut pong).expect("pong");
            s.shutdown(Shutdown::Write).expect("shutdown");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).expect("read to the end");
            println!("good: {}", String::from_utf8_lossy(&pong));
            0
        }
        "S" => {
            let buf = vec![0xa5u8; BULK[1]];
            let (mut sent, mut told, mut i) = (0usize, false, 0);
            loop {
                s.write_all(&buf[..BULK[i % 2]]).expect("write");
                sent += BULK[i % 2];
                i += 1;
                if !told && sent >= 1 << 20 {
                    ready();
                    told = true;
                }
            }
        }
        "W" => {
            let mut buf = vec![0u8; 64 * 1024];
            let (mut got, mut told) = (0usize, false);
            loop {
                let n = s.read(&mut buf).expect("read");
                assert!(n > 0, "the server ended the stream");
                got += n;
                if !told && got >= 1 << 20 {
                    ready();
                    told = true;
                }
            }
        }
        "B" | "O" | "R" | "P" | "E" => {
            ready();
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        other => {
            eprintln!("unknown scenario {other:?}");
            2
        }
    }
}

fn listen_only(addr: &str, port: &str, close_on_go: bool) -> i32 {
    let l = TcpListener::bind(format!("{addr}:{port}")).expect("bind");
    println!("listening");
    let _ = std::io::stdout().flush();
    if close_on_go {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        drop(l);
        println!("closed");
        let _ = std::io::stdout().flush();
    } else {
        std::mem::forget(l);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn pending(addr: &str, port: &str) -> i32 {
    let mut s = TcpStream::connect(format!("{addr}:{port}")).expect("connect");
    s.write_all(b"abc").expect("write 3 bytes");
    println!("connected");
    let _ = std::io::stdout().flush();
    let first = one_read(&mut s);
    let again = one_read(&mut s);
    println!(
        "end pending: read {first}, read {again}, write {}",
        what(&s.write(b"x"))
    );
    drop(s);
    let _ = std::io::stdout().flush();
    let mut rest = String::new();
    let _ = std::io::stdin().read_to_string(&mut rest);
    0
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let code = match a.iter().map(String::as_str).collect::<Vec<_>>()[1..] {
        ["serve", addr, port] => serve(addr, port, false),
        ["serve", addr, port, "--gate"] => serve(addr, port, true),
        ["listen", addr, port] => listen_only(addr, port, false),
        ["listen", addr, port, "--close-on-go"] => listen_only(addr, port, true),
        ["pending", addr, port] => pending(addr, port),
        ["client", addr, port, scenario] => client(addr, port, scenario),
        ["vserve", addr, port, scenario] => victim_server(addr, port, scenario, false),
        ["vserve", addr, port, scenario, "--gate"] => victim_server(addr, port, scenario, true),
        ["survive", addr, port] => survivor_client(addr, port),
        ["nofile", addr, port] => nofile(addr, port),
        _ => {
            eprintln!(
                "usage: fault_peer serve ADDR PORT [--gate] | client ADDR PORT g|S|W|B|O|R|P|E|C | listen ADDR PORT [--close-on-go] | pending ADDR PORT | vserve ADDR PORT SCENARIO [--gate] | survive ADDR PORT | nofile ADDR PORT"
            );
            2
        }
    };
    std::process::exit(code);
}
