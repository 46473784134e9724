//! Model check of the `shm` ring protocol and its bells (ib-verbs/src/shm/conn.rs), one
//! direction: a sender S (side 0) writes messages into the receiver R's (side 1) ring.
//!
//! This is a MODEL, not the real code: `ShmConn` needs a memfd mapping, socketpair bells and
//! `getpid`, none of which loom can run. Every shared access below mirrors one in conn.rs with
//! the SAME memory ordering; the function names are conn.rs's, so a change there must be
//! mirrored here (docs/SANITIZERS.md). What is shared in conn.rs (the side blocks and the
//! ring slots of the memfd) is shared here; what is private there is private here.
//!
//! Checked in every interleaving loom explores:
//! - payload visibility and slot reuse: slots are loom `UnsafeCell`s, so a message read before
//!   its Release/Acquire publication, or a slot rewritten before R is done with it, is
//!   reported as a causality violation;
//! - the index invariants conn.rs checks on every load (`load_peer_posted`,
//!   `load_peer_produced`);
//! - order and content of the delivered messages;
//! - no lost wake-up: a side sleeps (poll with no timeout) only on its bell; if the eventcount
//!   could miss a sleeper, loom finds the execution in which every thread sleeps (deadlock).
//!
//! Two hosts are modelled: `Connection::wait` with `ring_on_post_recv` on (ib-verbs' default:
//! the sender sleeps on its own bell), and libsdp's ops host (crates/ops/src/offload/sdp.rs:
//! `set_ring_on_post_recv(false)`, the sender arms `arm_drain` and sleeps until its app end
//! turns writable).
//! Mutants prove the model can fail: each drops one fence or ordering conn.rs relies on, and
//! `mutants_are_caught` checks that loom reports it.
#![cfg(loom)]
// `n % DEPTH` mirrors conn.rs's slot arithmetic; DEPTH is 1 in this model.
#![allow(clippy::modulo_one)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use loom::sync::{Arc, Notify};
use loom::thread;

/// Receive depth of R's ring: 1 slot, so every message after the first waits for a repost
/// (credits) and reuses the slot.
const DEPTH: u64 = 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Host {
    /// ib-verbs' `Connection::wait` on both sides, `ring_on_post_recv` on.
    VerbsWait,
    /// The ops host: R's repost does not ring; S waits for credits with `arm_drain`.
    Ops,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mutant {
    None,
    /// No SeqCst fence between publishing (`tx_produced` / `rx_posted`) and loading the
    /// peer's flag: a sleeper can be missed.
    NoFenceAfterPublish,
    /// No SeqCst fence in `arm` between setting `want_bell` and re-checking the ring.
    NoFenceInArm,
    /// `tx_produced` stored Relaxed: the payload is not published with the count.
    RelaxedProduced,
}

/// A side's app end (a socketpair end in conn.rs): `ring` is `sys::send_byte` into the peer's
/// bell end, `drain` is `ack_notify`'s `sys::drain`, `sleep` is a `poll` with no timeout.
struct Bell {
    bytes: AtomicUsize,
    wake: Notify,
}

impl Bell {
    fn new() -> Bell {
        Bell {
            bytes: AtomicUsize::new(0),
            wake: Notify::new(),
        }
    }

    fn ring(&self) {
        self.bytes.fetch_add(1, Ordering::Release);
        self.wake.notify();
    }

    fn drain(&self) {
        self.bytes.swap(0, Ordering::Acquire);
    }

    fn sleep(&self) {
        while self.bytes.load(Ordering::Acquire) == 0 {
            self.wake.wait();
        }
    }
}

/// The memfd's words this direction uses (layout.rs), and the bells.
struct Shared {
    /// `rx_posted(1)`: buffers R ever posted.
    rx_posted: AtomicU64,
    /// `tx_produced(0)`: messages S ever wrote into R's ring.
    tx_produced: AtomicU64,
    /// `want_bell(side)`.
    want_bell: [AtomicU32; 2],
    /// `want_drain(0)`: S stuffed its app end and waits for credits.
    want_drain_s: AtomicU32,
    /// R's ring slots (payload: the message number).
    slots: Vec<UnsafeCell<u64>>,
    /// `bell[side]`: readable data on side's app end.
    bell: [Bell; 2],
    /// S's app end turned writable (R drained the stuffing in S's bell end).
    writable_s: Bell,
    mutant: Mutant,
}

impl Shared {
    fn fence_after_publish(&self) {
        if self.mutant != Mutant::NoFenceAfterPublish {
            fence(Ordering::SeqCst);
        }
    }

    /// conn.rs `ring_peer`, toward `peer`.
    fn ring_peer(&self, peer: usize) {
        let flag = &self.want_bell[peer];
        if flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::AcqRel) != 0 {
            self.bell[peer].ring();
        }
    }

    /// conn.rs `arm`, for `side`, followed by its `has_work`.
    fn arm(&self, side: usize, has_work: impl FnOnce() -> bool) -> bool {
        self.want_bell[side].store(1, Ordering::SeqCst);
        if self.mutant != Mutant::NoFenceInArm {
            fence(Ordering::SeqCst);
        }
        !has_work()
    }
}

/// S's private state (the `ShmConn` fields of the sending direction).
struct Sender {
    sh: Arc<Shared>,
    tx_produced: u64,
    peer_posted_seen: u64,
    peer_posted_reported: u64,
}

impl Sender {
    /// conn.rs `load_peer_posted`, with its invariant check.
    fn load_peer_posted(&mut self) -> u64 {
        let p = self.sh.rx_posted.load(Ordering::Acquire);
        assert!(
            p >= self.peer_posted_seen && p <= self.tx_produced + DEPTH,
            "posted index violation: {p}"
        );
        self.peer_posted_seen = p;
        p
    }

    /// conn.rs `post_send_inner` (wake_reader = true); `false` = `PostError::NoCredit`.
    fn post_send(&mut self, msg: u64) -> bool {
        let posted = self.load_peer_posted();
        if posted == self.tx_produced {
            return false;
        }
        let slot = (self.tx_produced % DEPTH) as usize;
        // map.write of the payload and the slot header.
        self.sh.slots[slot].with_mut(|p| unsafe { *p = msg });
        self.tx_produced += 1;
        let order = if self.sh.mutant == Mutant::RelaxedProduced {
            Ordering::Relaxed
        } else {
            Ordering::Release
        };
        self.sh.tx_produced.store(self.tx_produced, order);
        self.sh.fence_after_publish();
        self.sh.ring_peer(1);
        // drain_peer(1): R never arms `want_drain` in this one-way model.
        true
    }

    /// conn.rs `has_work` on S: completions are polled by the host right after each send,
    /// R produces nothing toward S, so the only event is a change of R's posted count.
    fn has_work(&mut self) -> bool {
        let posted = self.sh.rx_posted.load(Ordering::Acquire);
        if posted != self.peer_posted_reported {
            self.peer_posted_reported = posted;
            return true;
        }
        false
    }

    /// transport.rs `Connection::wait` (spin 0, no timeout) on S.
    fn wait(&mut self) {
        if self.has_work() {
            return;
        }
        self.sh.bell[0].drain();
        let sh = self.sh.clone();
        if !sh.arm(0, || self.has_work()) || self.has_work() {
            return;
        }
        self.sh.bell[0].sleep();
        self.sh.bell[0].drain();
    }

    /// conn.rs `arm_drain` then, as the ops host does, a sleep until the app end is writable.
    fn wait_for_credits_ops(&mut self) {
        self.sh.want_drain_s.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let p = self.load_peer_posted();
        if p == self.tx_produced {
            self.sh.writable_s.sleep();
            self.sh.writable_s.drain();
        }
    }
}

/// R's private state (the `ShmConn` fields of the receiving direction).
struct Receiver {
    sh: Arc<Shared>,
    rx_posted: u64,
    rx_consumed: u64,
    ring_on_post_recv: bool,
}

impl Receiver {
    /// conn.rs `load_peer_produced`, with its invariant check.
    fn load_peer_produced(&mut self) -> u64 {
        let s = self.sh.tx_produced.load(Ordering::Acquire);
        assert!(
            s >= self.rx_consumed && s <= self.rx_posted,
            "produced index violation: {s}"
        );
        s
    }

    /// conn.rs `poll_cq` for one receive completion; the payload copy of `recv_data`.
    fn poll_one(&mut self) -> Option<u64> {
        let produced = self.load_peer_produced();
        if self.rx_consumed == produced {
            return None;
        }
        let slot = (self.rx_consumed % DEPTH) as usize;
        let msg = self.sh.slots[slot].with(|p| unsafe { *p });
        self.rx_consumed += 1;
        Some(msg)
    }

    /// conn.rs `post_recv`.
    fn post_recv(&mut self) {
        assert!(self.rx_posted < self.rx_consumed + DEPTH, "queue full");
        self.rx_posted += 1;
        self.sh.rx_posted.store(self.rx_posted, Ordering::Release);
        self.sh.fence_after_publish();
        if self.ring_on_post_recv {
            self.sh.ring_peer(0);
        }
        // drain_peer(0)
        let flag = &self.sh.want_drain_s;
        if flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::AcqRel) != 0 {
            self.sh.writable_s.ring();
        }
    }

    /// conn.rs `has_work` on R: S's posted count never changes (S receives nothing).
    fn has_work(&mut self) -> bool {
        self.sh.tx_produced.load(Ordering::Acquire) != self.rx_consumed
    }

    /// transport.rs `Connection::wait` (spin 0, no timeout) on R.
    fn wait(&mut self) {
        if self.has_work() {
            return;
        }
        self.sh.bell[1].drain();
        let sh = self.sh.clone();
        if !sh.arm(1, || self.has_work()) || self.has_work() {
            return;
        }
        self.sh.bell[1].sleep();
        self.sh.bell[1].drain();
    }
}

fn run(host: Host, mutant: Mutant, msgs: u64, preemptions: usize) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b.check(move || {
        let sh = Arc::new(Shared {
            // Bootstrap: R's initial posts are in the memfd before either side runs.
            rx_posted: AtomicU64::new(DEPTH),
            tx_produced: AtomicU64::new(0),
            want_bell: [AtomicU32::new(0), AtomicU32::new(0)],
            want_drain_s: AtomicU32::new(0),
            slots: (0..DEPTH).map(|_| UnsafeCell::new(u64::MAX)).collect(),
            bell: [Bell::new(), Bell::new()],
            writable_s: Bell::new(),
            mutant,
        });
        let mut s = Sender {
            sh: sh.clone(),
            tx_produced: 0,
            peer_posted_seen: 0,
            // ShmConn::new: the initial credits are known from the bootstrap.
            peer_posted_reported: DEPTH,
        };
        let sender = thread::spawn(move || {
            for i in 0..msgs {
                while !s.post_send(i) {
                    match host {
                        Host::VerbsWait => s.wait(),
                        Host::Ops => s.wait_for_credits_ops(),
                    }
                }
            }
        });
        let mut r = Receiver {
            sh,
            rx_posted: DEPTH,
            rx_consumed: 0,
            ring_on_post_recv: host == Host::VerbsWait,
        };
        for i in 0..msgs {
            loop {
                if let Some(m) = r.poll_one() {
                    assert_eq!(m, i, "message out of order or torn");
                    r.post_recv();
                    break;
                }
                r.wait();
            }
        }
        sender.join().unwrap();
    });
}

#[test]
fn verbs_wait_delivers_in_order_and_never_loses_a_wakeup() {
    // Two messages through one slot, up to 3 preemptions; three messages (the slot reused
    // twice, stale flags from the first wait), up to 2 preemptions.
    run(Host::VerbsWait, Mutant::None, 2, 3);
    run(Host::VerbsWait, Mutant::None, 3, 2);
}

#[test]
fn ops_host_delivers_in_order_and_never_loses_a_wakeup() {
    run(Host::Ops, Mutant::None, 2, 3);
    run(Host::Ops, Mutant::None, 3, 2);
}

/// Each mutant must be caught, with the expected complaint. They run in child processes:
/// loom aborts the whole process when it finds a deadlock.
#[test]
fn mutants_are_caught() {
    let exe = std::env::current_exe().unwrap();
    for (name, expect) in [
        ("mutant_verbs_no_fence_after_publish", "deadlock"),
        ("mutant_verbs_no_fence_in_arm", "deadlock"),
        ("mutant_ops_no_fence_after_publish", "deadlock"),
        ("mutant_ops_relaxed_produced", "Causality violation"),
    ] {
        let out = std::process::Command::new(&exe)
            .args([name, "--exact", "--ignored", "--test-threads=1"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success() && text.contains(expect),
            "{name}: the model did not catch the mutant (expected {expect:?}):\n{text}"
        );
    }
}

#[test]
#[ignore = "a mutant: run by mutants_are_caught"]
fn mutant_verbs_no_fence_after_publish() {
    run(Host::VerbsWait, Mutant::NoFenceAfterPublish, 2, 3);
}

#[test]
#[ignore = "a mutant: run by mutants_are_caught"]
fn mutant_verbs_no_fence_in_arm() {
    run(Host::VerbsWait, Mutant::NoFenceInArm, 2, 3);
}

#[test]
#[ignore = "a mutant: run by mutants_are_caught"]
fn mutant_ops_no_fence_after_publish() {
    run(Host::Ops, Mutant::NoFenceAfterPublish, 2, 3);
}

#[test]
#[ignore = "a mutant: run by mutants_are_caught"]
fn mutant_ops_relaxed_produced() {
    run(Host::Ops, Mutant::RelaxedProduced, 2, 3);
}
