//! In-process tests of the `shm` provider: both ends in this process (`shm::pair`).

mod common;

use std::time::{Duration, Instant};

use common::{empty, recv_one, send_blocking};
use ib_verbs::shm::{self, Active, BootError, ShmConn, ShmOptions};
use ib_verbs::sys;
use ib_verbs::{
    Access, ConnError, Connection, LocalSge, MemKey, Opcode, PostError, RemoteSge, Violation,
    WaitOutcome, WcError,
};

fn small() -> ShmOptions {
    ShmOptions {
        recv_depth: 4,
        recv_buf_size: 256,
        send_depth: 16,
        timeout: Duration::from_secs(5),
    }
}

fn pair() -> (ShmConn, ShmConn) {
    shm::pair(small(), small(), (4, 4)).expect("pair")
}

const T: Duration = Duration::from_secs(5);

#[test]
fn established_send_recv_both_directions_bytes_match() {
    let (mut a, mut b) = pair();
    let attrs = a.attrs();
    assert_eq!((attrs.recv_depth, attrs.send_buf_size), (4, 256));
    assert_eq!(attrs.peer_pid, Some(std::process::id() as i32));
    assert!(
        attrs.can_read_peer && attrs.peer_can_read,
        "same process: RDMA READ allowed"
    );
    a.post_send(9, &[b"head|", b"payload"]).unwrap();
    let mut c = [empty(); 4];
    assert_eq!(a.poll_cq(&mut c).unwrap(), 1);
    assert_eq!(
        (c[0].opcode, c[0].wr_id, c[0].byte_len),
        (Opcode::Send, 9, 12)
    );
    assert_eq!(recv_one(&mut b, T).unwrap(), b"head|payload");
    send_blocking(&mut b, b"back", T).unwrap();
    assert_eq!(recv_one(&mut a, T).unwrap(), b"back");
}

#[test]
fn ring_many_messages_wrap_around_in_order() {
    let (mut a, mut b) = pair();
    for i in 0u32..1000 {
        let msg = vec![(i % 251) as u8; (i % 200) as usize + 1];
        send_blocking(&mut a, &msg, T).unwrap();
        assert_eq!(recv_one(&mut b, T).unwrap(), msg, "message {i}");
    }
}

#[test]
fn credits_exhausted_no_credit_then_recovered_by_repost() {
    let (mut a, mut b) = pair();
    assert_eq!(a.credits().unwrap(), 4);
    for i in 0..4 {
        a.post_send(i, &[b"x"]).unwrap();
    }
    assert_eq!(a.credits().unwrap(), 0);
    assert_eq!(a.post_send(5, &[b"y"]), Err(PostError::NoCredit));
    let mut c = [empty(); 8];
    assert_eq!(b.poll_cq(&mut c).unwrap(), 4);
    // Receive buffers are all in use: posting a fifth is refused until one is consumed...
    assert_eq!(
        c.iter().take(4).map(|c| c.wr_id).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    b.post_recv(50).unwrap();
    assert_eq!(a.credits().unwrap(), 1);
    a.post_send(6, &[b"z"]).unwrap();
    assert_eq!(a.post_send(7, &[b"w"]), Err(PostError::NoCredit));
    assert_eq!(b.poll_cq(&mut c).unwrap(), 1);
    assert_eq!(c[0].wr_id, 50);
}

#[test]
fn post_recv_beyond_depth_queue_full() {
    let (_a, mut b) = pair();
    assert_eq!(b.post_recv(1), Err(PostError::QueueFull));
}

#[test]
fn send_larger_than_peer_buffer_too_long() {
    let (mut a, _b) = pair();
    let big = vec![0u8; 257];
    assert_eq!(
        a.post_send(1, &[&big]),
        Err(PostError::TooLong { len: 257, max: 256 })
    );
}

#[test]
fn recv_data_after_repost_refused() {
    let (mut a, mut b) = pair();
    a.post_send(1, &[b"abc"]).unwrap();
    let mut c = [empty(); 1];
    assert_eq!(b.poll_cq(&mut c).unwrap(), 1);
    let mut out = [0u8; 2];
    assert_eq!(b.recv_data(&c[0], 1, &mut out), Ok(2));
    assert_eq!(&out, b"bc");
    b.post_recv(c[0].wr_id).unwrap();
    assert_eq!(b.recv_data(&c[0], 0, &mut out), Err(PostError::NotARecv));
}

/// A host that reads a payload after its completion learns how many posts it may make
/// before the payload's slot is reused: slots are reposted in order, the depth counts from
/// that message's position, and a reposted slot has none left.
#[test]
fn posts_before_reuse_counts_down_to_the_slots_repost() {
    let (mut a, mut b) = pair(); // depth 4, all 4 posted
    let mut c = [empty(); 4];
    for (i, m) in [&b"first"[..], b"second", b"third"].iter().enumerate() {
        a.post_send(i as u64, &[m]).unwrap();
    }
    assert_eq!(b.poll_cq(&mut c).unwrap(), 3);
    let (first, second, third) = (c[0], c[1], c[2]);
    // The next post takes the first message's slot, the one after it the second's.
    assert_eq!(b.posts_before_reuse(&first), 0);
    assert_eq!(b.posts_before_reuse(&second), 1);
    assert_eq!(b.posts_before_reuse(&third), 2);
    b.post_recv(10).unwrap();
    assert_eq!(b.posts_before_reuse(&first), 0);
    assert_eq!(b.posts_before_reuse(&second), 0);
    assert_eq!(b.posts_before_reuse(&third), 1);
    let mut out = [0u8; 6];
    assert_eq!(b.recv_data(&second, 0, &mut out), Ok(6));
    assert_eq!(&out, b"second");
    assert_eq!(b.recv_data(&first, 0, &mut out), Err(PostError::NotARecv));
    b.post_recv(11).unwrap();
    assert_eq!(b.recv_data(&second, 0, &mut out), Err(PostError::NotARecv));
    assert_eq!(b.posts_before_reuse(&third), 0);
    // A later message wraps around into a reposted slot.
    a.post_send(4, &[b"fourth"]).unwrap();
    assert_eq!(b.poll_cq(&mut c).unwrap(), 1);
    assert_eq!(b.posts_before_reuse(&c[0]), 1);
    assert_eq!(b.posts_before_reuse(&first), 0);
}

#[test]
fn rdma_read_registered_range_copied() {
    let (mut a, mut b) = pair();
    let mut src: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let mut dst = vec![0u8; 100_000];
    // SAFETY: both buffers outlive the registrations and are not touched meanwhile.
    let rkey = unsafe { a.register(src.as_mut_ptr(), src.len(), Access::RemoteRead) }.unwrap();
    // SAFETY: as above.
    let lkey = unsafe { b.register(dst.as_mut_ptr(), dst.len(), Access::LocalWrite) }.unwrap();
    let local = LocalSge {
        addr: dst.as_ptr() as u64 + 10,
        len: 50_000,
        key: lkey,
    };
    let remote = RemoteSge {
        addr: src.as_ptr() as u64 + 1000,
        len: 50_000,
        key: rkey,
    };
    b.post_read(77, local, remote).unwrap();
    let mut c = [empty(); 1];
    assert_eq!(b.poll_cq(&mut c).unwrap(), 1);
    assert_eq!(
        (c[0].opcode, c[0].wr_id, c[0].status, c[0].byte_len),
        (Opcode::Read, 77, Ok(()), 50_000)
    );
    b.deregister(lkey).unwrap();
    a.deregister(rkey).unwrap();
    assert_eq!(&dst[10..50_010], &src[1000..51_000]);
}

fn read_outcome(
    mutate: impl FnOnce(&mut ShmConn, MemKey, u64) -> RemoteSge,
) -> (Result<(), WcError>, ConnError) {
    let (mut a, mut b) = pair();
    let mut src = vec![1u8; 4096];
    let mut dst = vec![0u8; 8192];
    // SAFETY: both buffers outlive the connection's use of them.
    let rkey = unsafe { a.register(src.as_mut_ptr(), src.len(), Access::RemoteRead) }.unwrap();
    // SAFETY: as above.
    let lkey = unsafe { b.register(dst.as_mut_ptr(), dst.len(), Access::LocalWrite) }.unwrap();
    let remote = mutate(&mut a, rkey, src.as_ptr() as u64);
    let local = LocalSge {
        addr: dst.as_ptr() as u64,
        len: 8192,
        key: lkey,
    };
    b.post_read(1, local, remote).unwrap();
    let mut c = [empty(); 1];
    assert_eq!(b.poll_cq(&mut c).unwrap(), 1);
    let err = b.poll_cq(&mut c).unwrap_err();
    assert!(
        b.post_send(1, &[b"x"]).is_err(),
        "a failed read ends the connection"
    );
    (c[0].status, err)
}

#[test]
fn rdma_read_revoked_key_fails() {
    let (st, err) = read_outcome(|a, k, addr| {
        a.deregister(k).unwrap();
        RemoteSge {
            addr,
            len: 4096,
            key: k,
        }
    });
    assert_eq!(st, Err(WcError::RemoteKeyInvalid));
    assert_eq!(err, ConnError::ReadFailed(WcError::RemoteKeyInvalid));
}

#[test]
fn rdma_read_wrong_key_fails() {
    let (st, _) = read_outcome(|_, k, addr| RemoteSge {
        addr,
        len: 4096,
        key: MemKey(k.0 ^ 0x100),
    });
    assert_eq!(st, Err(WcError::RemoteKeyInvalid));
    let (st, _) = read_outcome(|_, _, addr| RemoteSge {
        addr,
        len: 16,
        key: MemKey(0x7f),
    });
    assert_eq!(st, Err(WcError::RemoteKeyInvalid));
}

#[test]
fn rdma_read_outside_registration_fails() {
    let (st, _) = read_outcome(|_, k, addr| RemoteSge {
        addr: addr + 1,
        len: 4096,
        key: k,
    });
    assert_eq!(st, Err(WcError::RemoteRangeInvalid));
    let (st, _) = read_outcome(|_, k, _| RemoteSge {
        addr: u64::MAX - 2,
        len: 4096,
        key: k,
    });
    assert_eq!(st, Err(WcError::RemoteRangeInvalid));
}

#[test]
fn rdma_read_unregistered_local_refused_connection_lives() {
    let (mut a, mut b) = pair();
    let mut src = vec![1u8; 64];
    // SAFETY: `src` outlives its use.
    let rkey = unsafe { a.register(src.as_mut_ptr(), 64, Access::RemoteRead) }.unwrap();
    let local = LocalSge {
        addr: 0x1000,
        len: 64,
        key: MemKey(0x100),
    };
    let r = b.post_read(
        1,
        local,
        RemoteSge {
            addr: src.as_ptr() as u64,
            len: 64,
            key: rkey,
        },
    );
    assert_eq!(r, Err(PostError::BadLocalKey));
    send_blocking(&mut b, b"still fine", T).unwrap();
    assert_eq!(recv_one(&mut a, T).unwrap(), b"still fine");
}

#[test]
fn hostile_produced_index_ends_connection() {
    let (a, mut b) = pair();
    // a scribbles its tx_produced (offset 64 + 64) far past what b posted.
    a.testing_scribble(128, &1_000_000u64.to_le_bytes());
    let mut c = [empty(); 4];
    match b.poll_cq(&mut c) {
        Err(ConnError::Protocol(Violation::ProducedIndex {
            seen: 1_000_000, ..
        })) => {}
        other => panic!("expected a violation, got {other:?}"),
    }
    assert!(matches!(
        b.post_send(1, &[b"x"]),
        Err(PostError::Dead(ConnError::Protocol(_)))
    ));
}

#[test]
fn hostile_posted_index_ends_connection() {
    let (mut a, b) = pair();
    // b (side 1) claims u64::MAX posted buffers: its rx_posted is at 64 + SIDE_BLOCK.
    let side1 = 64 + ib_verbs::shm::layout::SIDE_BLOCK;
    b.testing_scribble(side1, &u64::MAX.to_le_bytes());
    assert!(matches!(
        a.post_send(1, &[b"x"]),
        Err(PostError::Dead(ConnError::Protocol(
            Violation::PostedIndex { .. }
        )))
    ));
}

#[test]
fn hostile_message_length_ends_connection() {
    let (mut a, mut b) = pair();
    a.post_send(1, &[b"ok"]).unwrap();
    // Slot 0 of side 1's ring: after side 0's ring (4 slots of 320 bytes) at 4096.
    b.testing_scribble(4096 + 4 * 320, &u32::MAX.to_le_bytes());
    let mut c = [empty(); 4];
    let r = b.poll_cq(&mut c);
    assert_eq!(
        r,
        Err(ConnError::Protocol(Violation::MessageLength {
            len: u32::MAX,
            max: 256
        }))
    );
}

/// A tiny xorshift generator: the fuzz needs no dependency.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

#[test]
fn fuzz_hostile_peer_scribbles_thousands_of_times_no_panic() {
    let mut next = rng(0x5eed);
    let mut violations = 0;
    let mut iterations = 0;
    let mut dst = vec![0u8; 4096];
    while iterations < 5000 {
        let (mut hostile, mut victim) = pair();
        // SAFETY: `dst` outlives every connection of the loop and is only written by reads.
        let lkey =
            unsafe { victim.register(dst.as_mut_ptr(), dst.len(), Access::LocalWrite) }.unwrap();
        let mut c = [empty(); 8];
        for _ in 0..50 {
            iterations += 1;
            let r = next();
            let len = hostile.testing_map_len();
            let off = if r & 3 != 0 {
                (r >> 8) as usize % 4096
            } else {
                (r >> 8) as usize % len
            };
            let bytes = next().to_le_bytes();
            hostile.testing_scribble(off, &bytes[..1 + (r >> 40) as usize % 8]);
            let _ = hostile.post_send(1, &[b"noise"]);
            let _ = hostile.poll_cq(&mut c);
            let _ = victim.has_work();
            let _ = victim.arm();
            match next() % 20 {
                0 => {
                    let remote = RemoteSge {
                        addr: next(),
                        len: (next() % 4096) as u32,
                        key: MemKey(next() as u32),
                    };
                    let local = LocalSge {
                        addr: dst.as_ptr() as u64,
                        len: 4096,
                        key: lkey,
                    };
                    let _ = victim.post_read(3, local, remote);
                }
                1..=5 => {
                    let _ = victim.post_send(2, &[&[7u8; 100]]);
                }
                _ => {
                    if let Ok(n) = victim.poll_cq(&mut c) {
                        for comp in &c[..n] {
                            if comp.opcode == Opcode::Recv {
                                let mut out = [0u8; 300];
                                victim.recv_data(comp, 0, &mut out).unwrap();
                                let _ = victim.post_recv(comp.wr_id);
                            }
                        }
                    }
                }
            }
            if let Some(e) = victim.error() {
                // Dead is dead: every later call reports it, after the queued completions.
                let mut polls = 0;
                while victim.poll_cq(&mut c).is_ok() {
                    polls += 1;
                    assert!(polls < 100, "dead connection keeps completing");
                }
                assert!(victim.post_send(9, &[b"x"]).is_err());
                if matches!(e, ConnError::Protocol(_)) {
                    violations += 1;
                }
                break;
            }
        }
        let _ = victim.deregister(lkey);
    }
    assert!(
        violations >= 5,
        "the fuzz should trip validation often, got {violations}"
    );
}

#[test]
fn bell_wakes_sleeping_receiver() {
    let (mut a, mut b) = pair();
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        let r = b
            .wait(Duration::ZERO, Some(Duration::from_secs(5)))
            .unwrap();
        let mut c = [empty(); 1];
        (r, start.elapsed(), b.poll_cq(&mut c).unwrap(), c[0].opcode)
    });
    std::thread::sleep(Duration::from_millis(100));
    a.post_send(1, &[b"wake"]).unwrap();
    let (r, took, n, op) = t.join().unwrap();
    assert_eq!((r, n, op), (WaitOutcome::Ready, 1, Opcode::Recv));
    assert!(
        took >= Duration::from_millis(90) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[test]
fn bell_rung_only_when_receiver_armed() {
    let (mut a, mut b) = pair();
    a.post_send(1, &[b"one"]).unwrap();
    assert_eq!(
        sys::poll_raw(b.notify_fd(), libc::POLLIN, 0).unwrap(),
        0,
        "busy receiver: no bell"
    );
    let mut c = [empty(); 4];
    assert_eq!(b.poll_cq(&mut c).unwrap(), 1);
    b.ack_notify().unwrap();
    assert!(b.arm().unwrap(), "nothing pending: armed");
    assert_eq!(sys::poll_raw(b.notify_fd(), libc::POLLIN, 0).unwrap(), 0);
    a.post_send(2, &[b"two"]).unwrap();
    assert_eq!(
        sys::poll_raw(b.notify_fd(), libc::POLLIN, 0).unwrap() & libc::POLLIN,
        libc::POLLIN
    );
    assert!(!b.arm().unwrap(), "pending message: do not sleep");
}

#[test]
fn disarm_tells_whether_the_peer_took_the_request() {
    let (mut a, mut b) = pair();
    assert!(b.arm().unwrap());
    assert!(!b.disarm(), "nothing sent: the request was still ours");
    assert!(b.arm().unwrap());
    a.post_send(1, &[b"one"]).unwrap();
    assert!(b.disarm(), "the sender took the request and rang");
    assert_eq!(
        sys::poll_raw(b.notify_fd(), libc::POLLIN, 0).unwrap() & libc::POLLIN,
        libc::POLLIN
    );
    let mut c = [empty(); 4];
    assert_eq!(b.poll_cq(&mut c).unwrap(), 1);
    b.ack_notify().unwrap();
    // Withdrawn: the next message does not ring.
    assert!(b.arm().unwrap());
    assert!(!b.disarm());
    a.post_send(2, &[b"two"]).unwrap();
    assert_eq!(sys::poll_raw(b.notify_fd(), libc::POLLIN, 0).unwrap(), 0);
}

#[test]
fn sender_blocked_on_credits_woken_by_repost() {
    let (mut a, mut b) = pair();
    for i in 0..4 {
        a.post_send(i, &[b"fill"]).unwrap();
    }
    let t = std::thread::spawn(move || {
        let r = send_blocking(&mut a, b"after", T);
        (r, a)
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(recv_one(&mut b, T).unwrap());
    }
    let (r, _a) = t.join().unwrap();
    r.unwrap();
    assert_eq!(got.last().unwrap(), b"after");
}

#[test]
fn peer_dropped_messages_delivered_then_peer_closed() {
    let (mut a, mut b) = pair();
    a.post_send(1, &[b"last words"]).unwrap();
    drop(a);
    assert_eq!(recv_one(&mut b, T).unwrap(), b"last words");
    let r = b.wait(Duration::ZERO, Some(T)).unwrap();
    assert_eq!(r, WaitOutcome::Ready);
    let mut c = [empty(); 1];
    assert_eq!(b.poll_cq(&mut c), Err(ConnError::PeerClosed));
    assert!(matches!(
        b.post_send(1, &[b"x"]),
        Err(PostError::Dead(ConnError::PeerClosed))
    ));
}

#[test]
fn wait_times_out_when_idle() {
    let (_a, mut b) = pair();
    let mut c = [empty(); 8];
    while b.poll_cq(&mut c).unwrap() > 0 {}
    let _ = b.has_work(); // consume the initial credit event
    let start = Instant::now();
    assert_eq!(
        b.wait(Duration::from_micros(100), Some(Duration::from_millis(50)))
            .unwrap(),
        WaitOutcome::TimedOut
    );
    assert!(start.elapsed() >= Duration::from_millis(50));
}

/// Writes a raw bootstrap frame (the format of `bootstrap.rs`).
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = b"SDPs".to_vec();
    v.extend_from_slice(&[kind, 1, 0, 0]);
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn answer_with_memfd(memfd: &sys::Fd, size: u64) -> Result<(), BootError> {
    let (sa, sp) = sys::socketpair_stream().unwrap();
    let mut a = Active::new(small()).unwrap();
    a.send_offer(&sa, b"hi").unwrap();
    let mut body = Vec::new();
    body.extend_from_slice(&4u32.to_le_bytes());
    body.extend_from_slice(&256u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&size.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.push(0); // can_read_you
    body.extend_from_slice(&0u16.to_le_bytes()); // no private data, and no reuse token after
    let (bell, _keep) = sys::socketpair_stream().unwrap();
    sys::send_with_fds(&sp, &frame(2, &body), &[memfd.raw(), bell.raw()]).unwrap();
    a.finish(&sa).map(|_| ())
}

#[test]
fn bootstrap_unsealed_or_fake_memfd_refused() {
    // Same layout as `small()` on both sides: 4096 + 2 * 4 * 320 rounded up to a page.
    let size = 8192u64;
    // SAFETY: the name is NUL-terminated; the result is checked.
    let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    let unsealed = sys::Fd::from_raw(raw).unwrap();
    // SAFETY: plain syscall on our own fd.
    assert_eq!(unsafe { libc::ftruncate(unsealed.raw(), size as i64) }, 0);
    assert_eq!(
        answer_with_memfd(&unsealed, size),
        Err(BootError::BadMemfd(sys::MemfdProblem::NotSealed))
    );
    let (not_a_file, _other) = sys::socketpair_stream().unwrap();
    assert_eq!(
        answer_with_memfd(&not_a_file, size),
        Err(BootError::BadMemfd(sys::MemfdProblem::NotMemfd))
    );
    let small_sealed = sys::memfd_sealed(b"t", 4096).unwrap();
    assert!(matches!(
        answer_with_memfd(&small_sealed, size),
        Err(BootError::BadMemfd(_))
    ));
    assert!(matches!(
        answer_with_memfd(&small_sealed, 4096),
        Err(BootError::BadParams(_))
    ));
}

#[test]
fn bootstrap_garbage_frames_refused() {
    let (sa, sp) = sys::socketpair_stream().unwrap();
    sys::send_with_fds(&sa, &frame(1, &[1, 2, 3]), &[]).unwrap();
    assert!(matches!(
        shm::Passive::recv_offer(&sp, T),
        Err(BootError::Malformed(_))
    ));
    let (sa, sp) = sys::socketpair_stream().unwrap();
    sys::send_with_fds(&sa, b"GET / HTTP/1.1\r\n", &[]).unwrap();
    assert_eq!(
        shm::Passive::recv_offer(&sp, T).unwrap_err(),
        BootError::Malformed("bad magic")
    );
    let (_sa, sp) = sys::socketpair_stream().unwrap();
    assert_eq!(
        shm::Passive::recv_offer(&sp, Duration::from_millis(50)).unwrap_err(),
        BootError::Timeout
    );
}

#[test]
fn bootstrap_reject_carries_private_data() {
    let (sa, sp) = sys::socketpair_stream().unwrap();
    let mut a = Active::new(small()).unwrap();
    a.send_offer(&sa, b"hello").unwrap();
    let offer = shm::Passive::recv_offer(&sp, T).unwrap();
    assert_eq!(offer.peer_cred().unwrap().pid, std::process::id() as i32);
    offer.reject(&sp, b"policy: tcp").unwrap();
    assert_eq!(
        a.finish(&sa).unwrap_err(),
        BootError::Rejected(b"policy: tcp".to_vec())
    );
}

#[test]
fn abort_reaches_the_peer_after_what_was_sent_before() {
    let (mut a, mut b) = pair();
    send_blocking(&mut a, b"before the reset", T).unwrap();
    a.abort();
    drop(a);
    // What was sent before the reset is still delivered; then the reset, not an orderly end.
    assert_eq!(recv_one(&mut b, T).unwrap(), b"before the reset");
    assert_eq!(recv_one(&mut b, T).unwrap_err(), ConnError::PeerAborted);
}
