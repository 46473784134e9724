//! A plain Rust std networking program for the real-process tests: a listener, a client
//! thread, 1 MiB echoed back in pieces, non-blocking mode (`ioctl(FIONBIO)`), a read
//! timeout (`SO_RCVTIMEO`), half-close. Prints only deterministic facts.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    // A panic in any thread ends the process: the test sees the failure instead of a
    // server waiting forever for a client thread that died.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 % 251) as u8).collect();
    let sent = payload.clone();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let peer_ok = s.peer_addr().expect("peer_addr") == addr;
        let mut w = s.try_clone().expect("try_clone");
        let writer = std::thread::spawn(move || {
            for chunk in sent.chunks(10_000) {
                w.write_all(chunk).expect("write");
            }
            w.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read_to_end");
        writer.join().expect("writer");
        (back, peer_ok)
    });
    let (mut conn, peer) = listener.accept().expect("accept");
    println!("peer is loopback: {}", peer.ip().is_loopback());
    let mut buf = vec![0u8; 65536];
    let mut total = 0usize;
    loop {
        let n = conn.read(&mut buf).expect("server read");
        if n == 0 {
            break;
        }
        total += n;
        conn.write_all(&buf[..n]).expect("server write");
    }
    println!("server echoed {total} bytes");
    drop(conn);
    // Non-blocking: nothing to read on an idle connection is WouldBlock.
    let _quiet_peer = TcpStream::connect(addr).expect("connect 2");
    let (mut idle, _) = listener.accept().expect("accept 2");
    idle.set_nonblocking(true).expect("set_nonblocking");
    let e = idle.read(&mut buf).expect_err("idle read");
    println!("non-blocking read: {:?}", e.kind());
    idle.set_nonblocking(false).expect("set_nonblocking off");
    idle.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("set_read_timeout");
    let e = idle.read(&mut buf).expect_err("timed read");
    println!(
        "timed read: {}",
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
    );
    let (back, peer_ok) = client.join().expect("client");
    println!("client peer_addr matches: {peer_ok}");
    println!("echo intact: {}", back == payload);
}
