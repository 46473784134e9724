//! Raw `shm` transport versus an AF_UNIX socketpair doing the same work, between two
//! processes (fork). Run: `cargo bench -p ib-verbs --bench shm_vs_unix`.
//!
//! - 64-byte one-way latency (half a ping-pong round trip), shm spinning and blocking;
//! - 64-byte message rate, one way;
//! - 64 KiB bandwidth: socketpair write/read, shm buffered copy (SEND + copy out), shm
//!   emulated RDMA READ (SrcAvail message, key per transfer, READ, RdCompl message).

use std::time::{Duration, Instant};

use ib_verbs::shm::{Active, Passive, ShmConn, ShmOptions};
use ib_verbs::sys::{self, Fd};
use ib_verbs::{Access, Completion, Connection, LocalSge, MemKey, Opcode, PostError, RemoteSge};

const BIG: usize = 64 * 1024;

fn opts() -> ShmOptions {
    ShmOptions {
        recv_depth: 16,
        recv_buf_size: (BIG + 64) as u32,
        send_depth: 64,
        timeout: Duration::from_secs(10),
    }
}

fn empty() -> Completion {
    Completion {
        wr_id: 0,
        opcode: Opcode::Send,
        status: Ok(()),
        byte_len: 0,
        buf_index: 0,
    }
}

/// Forks; the child runs `child` on its end of a socketpair and exits.
fn fork_with(child: impl FnOnce(Fd)) -> (Fd, i32) {
    let (a, b) = sys::socketpair_stream().unwrap();
    // SAFETY: the bench is single-threaded here; the child only runs this function and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(a);
        child(b);
        // SAFETY: leave without running the parent's destructors twice.
        unsafe { libc::_exit(0) };
    }
    drop(b);
    (a, pid)
}

/// Like `fork_with`, but over a connect()ed abstract socket: SO_PEERCRED of a socketpair
/// created before fork names the parent, and the shm bootstrap trusts SO_PEERCRED.
fn fork_connected(child: impl FnOnce(Fd)) -> (Fd, i32) {
    let name = format!("libsdp-bench/{}", std::process::id());
    let l = sys::listen_abstract(name.as_bytes(), 1).unwrap();
    // SAFETY: as in `fork_with`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(l);
        let s = sys::connect_abstract(name.as_bytes()).unwrap();
        child(s);
        // SAFETY: as in `fork_with`.
        unsafe { libc::_exit(0) };
    }
    loop {
        if let Some(s) = sys::accept(&l).unwrap() {
            return (s, pid);
        }
        let _ = sys::poll_one(&l, libc::POLLIN, 1000);
    }
}

fn reap(pid: i32) {
    let mut st = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
}

fn shm_active(s: &Fd) -> ShmConn {
    let mut a = Active::new(opts()).unwrap();
    for i in 0..opts().recv_depth {
        a.post_recv(i as u64).unwrap();
    }
    a.send_offer(s, b"").unwrap();
    a.finish(s).unwrap().0
}

fn shm_passive(s: &Fd) -> ShmConn {
    let offer = Passive::recv_offer(s, Duration::from_secs(10)).unwrap();
    let mut p = offer.accept(opts()).unwrap();
    for i in 0..opts().recv_depth {
        p.post_recv(i as u64).unwrap();
    }
    p.send_answer(s, b"").unwrap();
    p.finish(s).unwrap()
}

/// Receive completions polled while looking for something else are kept here.
static mut STASH: Vec<Completion> = Vec::new();

fn stash() -> &'static mut Vec<Completion> {
    // SAFETY: the bench is single-threaded in each process.
    unsafe { &mut *std::ptr::addr_of_mut!(STASH) }
}

fn poll_keep_recvs(c: &mut ShmConn) -> usize {
    let mut comps = [empty(); 64];
    let n = c.poll_cq(&mut comps).unwrap();
    stash().extend(comps[..n].iter().filter(|c| c.opcode == Opcode::Recv));
    n
}

/// Receives one message into `out`, reposts; returns its length.
fn recv(c: &mut ShmConn, out: &mut [u8], spin: Duration) -> usize {
    loop {
        if !stash().is_empty() {
            let comp = stash().remove(0);
            let got = c.recv_data(&comp, 0, out).unwrap();
            c.post_recv(comp.wr_id).unwrap();
            return got;
        }
        if poll_keep_recvs(c) == 0 {
            c.wait(spin, None).unwrap();
        }
    }
}

fn send(c: &mut ShmConn, msg: &[u8], spin: Duration) {
    loop {
        match c.post_send(0, &[msg]) {
            Ok(()) => return,
            Err(PostError::QueueFull) => {
                poll_keep_recvs(c);
            }
            Err(PostError::NoCredit) => {
                c.wait(spin, None).unwrap();
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

fn drain_sends(c: &mut ShmConn) {
    while poll_keep_recvs(c) == 64 {}
}

fn raw_write(fd: &Fd, b: &[u8]) {
    let mut done = 0;
    while done < b.len() {
        // SAFETY: `b` is readable for its length.
        let n = unsafe {
            libc::write(
                fd.raw(),
                b[done..].as_ptr() as *const libc::c_void,
                b.len() - done,
            )
        };
        assert!(n > 0);
        done += n as usize;
    }
}

fn raw_read(fd: &Fd, b: &mut [u8]) {
    let mut done = 0;
    while done < b.len() {
        // SAFETY: `b` is writable for its length.
        let n = unsafe {
            libc::read(
                fd.raw(),
                b[done..].as_mut_ptr() as *mut libc::c_void,
                b.len() - done,
            )
        };
        assert!(n > 0);
        done += n as usize;
    }
}

fn unix_latency(iters: usize) -> f64 {
    let (s, pid) = fork_with(|s| {
        let mut b = [0u8; 64];
        for _ in 0..iters {
            raw_read(&s, &mut b);
            raw_write(&s, &b);
        }
    });
    let mut b = [7u8; 64];
    let t = Instant::now();
    for _ in 0..iters {
        raw_write(&s, &b);
        raw_read(&s, &mut b);
    }
    let ns = t.elapsed().as_nanos() as f64 / iters as f64 / 2.0;
    reap(pid);
    ns
}

fn shm_latency(iters: usize, spin: Duration) -> f64 {
    let (s, pid) = fork_connected(move |s| {
        let mut c = shm_active(&s);
        let mut b = [0u8; 64];
        for _ in 0..iters {
            recv(&mut c, &mut b, spin);
            send(&mut c, &b, spin);
            drain_sends(&mut c);
        }
    });
    let mut c = shm_passive(&s);
    let mut b = [7u8; 64];
    let t = Instant::now();
    for _ in 0..iters {
        send(&mut c, &b, spin);
        recv(&mut c, &mut b, spin);
    }
    let ns = t.elapsed().as_nanos() as f64 / iters as f64 / 2.0;
    drop(c);
    reap(pid);
    ns
}

fn unix_rate(msgs: usize) -> f64 {
    let (s, pid) = fork_with(|s| {
        let b = [1u8; 64];
        for _ in 0..msgs {
            raw_write(&s, &b);
        }
    });
    let mut b = [0u8; 64];
    let t = Instant::now();
    for _ in 0..msgs {
        raw_read(&s, &mut b);
    }
    let rate = msgs as f64 / t.elapsed().as_secs_f64();
    reap(pid);
    rate
}

fn shm_rate(msgs: usize, spin: Duration) -> f64 {
    let (s, pid) = fork_connected(move |s| {
        let mut c = shm_active(&s);
        let b = [1u8; 64];
        for i in 0..msgs {
            send(&mut c, &b, spin);
            if i.is_multiple_of(32) {
                drain_sends(&mut c);
            }
        }
        let mut end = [0u8; 8];
        recv(&mut c, &mut end, spin);
    });
    let mut c = shm_passive(&s);
    let mut b = [0u8; 64];
    let t = Instant::now();
    for _ in 0..msgs {
        recv(&mut c, &mut b, spin);
    }
    let rate = msgs as f64 / t.elapsed().as_secs_f64();
    send(&mut c, b"end", spin);
    reap(pid);
    rate
}

fn unix_bw(n: usize) -> f64 {
    let (s, pid) = fork_with(|s| {
        let b = vec![1u8; BIG];
        for _ in 0..n {
            raw_write(&s, &b);
        }
    });
    let mut b = vec![0u8; BIG];
    let t = Instant::now();
    for _ in 0..n {
        raw_read(&s, &mut b);
    }
    let gbs = (n * BIG) as f64 / t.elapsed().as_secs_f64() / 1e9;
    reap(pid);
    gbs
}

fn shm_copy_bw(n: usize, spin: Duration) -> f64 {
    let (s, pid) = fork_connected(move |s| {
        let mut c = shm_active(&s);
        let b = vec![1u8; BIG];
        for i in 0..n {
            send(&mut c, &b, spin);
            if i.is_multiple_of(16) {
                drain_sends(&mut c);
            }
        }
        let mut end = [0u8; 8];
        recv(&mut c, &mut end, spin);
    });
    let mut c = shm_passive(&s);
    let mut b = vec![0u8; BIG];
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(recv(&mut c, &mut b, spin), BIG);
    }
    let gbs = (n * BIG) as f64 / t.elapsed().as_secs_f64() / 1e9;
    send(&mut c, b"end", spin);
    reap(pid);
    gbs
}

/// Source: SrcAvail{idx, addr, key} per buffer, a new key per transfer, revoked on RdCompl.
fn shm_read_bw(n: usize, spin: Duration) -> f64 {
    const BUFS: usize = 8;
    let (s, pid) = fork_connected(move |s| {
        let mut c = shm_active(&s);
        let mut bufs: Vec<Vec<u8>> = (0..BUFS).map(|i| vec![i as u8; BIG]).collect();
        let mut keys: Vec<Option<MemKey>> = vec![None; BUFS];
        let mut sent = 0;
        let mut done = 0;
        let mut advertise = |c: &mut ShmConn, i: usize, keys: &mut Vec<Option<MemKey>>| {
            // SAFETY: the buffers live until the child exits and are not written meanwhile.
            let k = unsafe { c.register(bufs[i].as_mut_ptr(), BIG, Access::RemoteRead) }.unwrap();
            keys[i] = Some(k);
            let mut m = [0u8; 16];
            m[0..4].copy_from_slice(&(i as u32).to_le_bytes());
            m[4..8].copy_from_slice(&k.0.to_le_bytes());
            m[8..16].copy_from_slice(&(bufs[i].as_ptr() as u64).to_le_bytes());
            send(c, &m, spin);
        };
        for i in 0..BUFS.min(n) {
            advertise(&mut c, i, &mut keys);
            sent += 1;
        }
        let mut m = [0u8; 16];
        while done < n {
            recv(&mut c, &mut m, spin);
            let i = u32::from_le_bytes(m[0..4].try_into().unwrap()) as usize;
            c.deregister(keys[i].take().unwrap()).unwrap();
            done += 1;
            drain_sends(&mut c);
            if sent < n {
                advertise(&mut c, i, &mut keys);
                sent += 1;
            }
        }
    });
    let mut c = shm_passive(&s);
    assert!(c.attrs().can_read_peer);
    let mut dst = vec![0u8; BIG];
    // SAFETY: `dst` outlives the registration and is only written by reads.
    let lkey = unsafe { c.register(dst.as_mut_ptr(), BIG, Access::LocalWrite) }.unwrap();
    let local = LocalSge {
        addr: dst.as_ptr() as u64,
        len: BIG as u32,
        key: lkey,
    };
    let mut m = [0u8; 16];
    let mut comps = [empty(); 64];
    let t = Instant::now();
    for _ in 0..n {
        recv(&mut c, &mut m, spin);
        let key = MemKey(u32::from_le_bytes(m[4..8].try_into().unwrap()));
        let addr = u64::from_le_bytes(m[8..16].try_into().unwrap());
        c.post_read(
            1,
            local,
            RemoteSge {
                addr,
                len: BIG as u32,
                key,
            },
        )
        .unwrap();
        let got = c.poll_cq(&mut comps).unwrap();
        assert!(comps[..got].iter().all(|c| c.status.is_ok()));
        stash().extend(comps[..got].iter().filter(|c| c.opcode == Opcode::Recv));
        send(&mut c, &m[0..4], spin);
    }
    let gbs = (n * BIG) as f64 / t.elapsed().as_secs_f64() / 1e9;
    reap(pid);
    gbs
}

fn main() {
    let spin = Duration::from_micros(200);
    let lat_n = 50_000;
    let u = unix_latency(lat_n);
    let s_spin = shm_latency(lat_n, spin);
    let s_block = shm_latency(lat_n / 5, Duration::ZERO);
    println!("64 B one-way latency  unix socketpair    {u:>9.0} ns");
    println!(
        "64 B one-way latency  shm spin 200us     {s_spin:>9.0} ns   ratio unix/shm = {:.1}x",
        u / s_spin
    );
    println!(
        "64 B one-way latency  shm blocking       {s_block:>9.0} ns   ratio unix/shm = {:.1}x",
        u / s_block
    );
    let rate_n = 1_000_000;
    let ur = unix_rate(rate_n);
    let sr = shm_rate(rate_n, spin);
    println!(
        "64 B message rate     unix socketpair    {:>9.2} M msg/s",
        ur / 1e6
    );
    println!(
        "64 B message rate     shm spin           {:>9.2} M msg/s   ratio shm/unix = {:.1}x",
        sr / 1e6,
        sr / ur
    );
    // Bandwidth is noisy on a shared 2-CPU machine: median of 5 interleaved runs.
    let bw_n = 10_000;
    let (mut ubs, mut scs, mut srs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        ubs.push(unix_bw(bw_n));
        scs.push(shm_copy_bw(bw_n, spin));
        srs.push(shm_read_bw(bw_n, spin));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (ub, sc, sread) = (median(&mut ubs), median(&mut scs), median(&mut srs));
    println!("64 KiB bandwidth      unix socketpair    {ub:>9.2} GB/s");
    println!(
        "64 KiB bandwidth      shm copy (BCopy)   {sc:>9.2} GB/s   ratio shm/unix = {:.1}x",
        sc / ub
    );
    println!(
        "64 KiB bandwidth      shm RDMA READ      {sread:>9.2} GB/s   ratio shm/unix = {:.1}x",
        sread / ub
    );
}
