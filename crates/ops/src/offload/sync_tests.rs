//! `Inner::sync` against a scripted stream: arming one direction can find completions that
//! change the other direction's readiness, and the app end must follow them (a lost wakeup
//! otherwise: the rdma guest's 256 MiB transfer hung about one run in five, its writer asleep
//! on a stuffed app end after its ZCopy offer had finished).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::stream::{Counters, Errno, OffloadStream};
use super::{Inner, Phase};

/// What a completion found by an `arm_*` call does when the next `progress` handles it.
#[derive(Clone, Copy, Debug)]
enum Found {
    /// A completion that changes nothing visible.
    Nothing,
    /// Room to send (credits, a finished ZCopy offer).
    Room,
    /// Bytes to read.
    Data,
}

/// A stream whose `arm_*` calls succeed unless a completion is scripted for them: then they
/// fail (as `RdmaConn::arm` does when its re-poll finds one) and the next `progress` applies it.
#[derive(Default)]
struct Scripted {
    room: bool,
    /// Room the test gives directly (the send queue moved on credits the peer returned).
    given: Arc<AtomicBool>,
    data: bool,
    /// Shared with the test, which scripts the next arms.
    script: Arc<Mutex<VecDeque<Found>>>,
    found: Vec<Found>,
}

impl Scripted {
    fn arm(&mut self) -> bool {
        let next = self.script.lock().unwrap().pop_front();
        match next {
            Some(f) => {
                self.found.push(f);
                false
            }
            None => true,
        }
    }
}

impl OffloadStream for Scripted {
    fn transport(&self) -> crate::stats::Transport {
        crate::stats::Transport::Rdma
    }
    fn progress(&mut self) {
        for f in self.found.drain(..) {
            match f {
                Found::Nothing => {}
                Found::Room => self.room = true,
                Found::Data => self.data = true,
            }
        }
    }
    fn send(&mut self, _: &[&[u8]], _: bool) -> Result<usize, Errno> {
        Err(libc::EAGAIN)
    }
    fn recv(&mut self, _: &mut [&mut [u8]], _: bool) -> Result<usize, Errno> {
        Err(libc::EAGAIN)
    }
    fn recv_oob(&mut self, _: bool) -> Result<u8, Errno> {
        Err(libc::EINVAL)
    }
    fn has_work(&mut self) -> bool {
        false
    }
    fn recv_ready(&self) -> bool {
        self.data
    }
    fn read_closed(&self) -> bool {
        false
    }
    fn send_ready(&self) -> bool {
        self.room || self.given.load(Ordering::Relaxed)
    }
    fn recv_queued(&self) -> usize {
        0
    }
    fn send_queued(&self) -> usize {
        0
    }
    fn urgent_ready(&self) -> bool {
        false
    }
    fn at_mark(&self) -> bool {
        false
    }
    fn shutdown_write(&mut self) {}
    fn abort(&mut self) {}
    fn unread(&mut self) -> bool {
        false
    }
    fn peer_gone(&mut self) {}
    fn error(&self) -> Option<Errno> {
        None
    }
    fn arm_recv(&mut self) -> bool {
        self.arm()
    }
    fn disarm_recv(&mut self) -> bool {
        false
    }
    fn arm_send(&mut self) -> bool {
        self.arm()
    }
    fn counters(&self) -> Counters {
        Counters::default()
    }
    fn is_current(&self) -> bool {
        true
    }
    fn set_every_arrival(&mut self, _: bool) {}
    fn owner_generation(&self) -> u64 {
        0
    }
    fn take_urgent(&mut self) -> bool {
        false
    }
    fn fds(&self) -> Vec<i32> {
        Vec::new()
    }
    fn flush(&mut self, _: std::time::Duration) {}
}

/// A connection on a fresh app end / bell end pair; returns it, the application's fd and
/// the stream's script.
fn connection() -> (Inner, i32, Arc<Mutex<VecDeque<Found>>>) {
    let (inner, app, script, _) = connection_given();
    (inner, app, script)
}

/// [`connection`], and the flag that gives the stream room directly.
fn connection_given() -> (Inner, i32, Arc<Mutex<VecDeque<Found>>>, Arc<AtomicBool>) {
    let s = Scripted::default();
    let script = s.script.clone();
    let given = s.given.clone();
    let mut sv = [-1; 2];
    // SAFETY: a valid two-int array for socketpair.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: dup of our own fd.
    let app_int = unsafe { libc::dup(sv[0]) };
    assert!(app_int >= 0);
    let inner = Inner::new(
        Phase::Offloaded(Box::new(s)),
        -1,
        app_int,
        sv[1],
        sv[0],
        None,
        None,
        None,
        1,
    );
    (inner, sv[0], script, given)
}

/// An epoll set watching `app` for EPOLLOUT, edge-triggered, as nginx watches its sockets.
fn edge_triggered_writer(app: i32) -> i32 {
    // SAFETY: plain epoll calls on fds of ours.
    let ep = unsafe { libc::epoll_create1(0) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLOUT | libc::EPOLLET) as u32,
        u64: 1,
    };
    // SAFETY: as above; `ev` is valid for reads.
    assert_eq!(
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, app, &mut ev) },
        0
    );
    ep
}

/// Whether the set reports an EPOLLOUT edge now (and takes it).
fn edge(ep: i32) -> bool {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: `ev` is valid for one event; no wait.
    let n = unsafe { libc::epoll_wait(ep, &mut ev, 1, 0) };
    n == 1 && ev.events & libc::EPOLLOUT as u32 != 0
}

fn polls(fd: i32, events: i16) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut p, 1, 0) };
    p.revents & events != 0
}

fn close(inner: &Inner, app: i32) {
    for fd in [inner.app_int, inner.own_bell, app] {
        // SAFETY: our own fds.
        unsafe { libc::close(fd) };
    }
}

#[test]
fn room_found_while_the_receive_side_arms_makes_the_app_end_writable() {
    let (mut inner, app, script) = connection();
    inner.sync();
    assert!(
        inner.stuffed && !polls(app, libc::POLLOUT),
        "no room: the app end is stuffed"
    );
    // The finished offer's completion is in the CQ when the receive side arms.
    script.lock().unwrap().extend([Found::Room]);
    inner.sync();
    assert!(
        !inner.stuffed && polls(app, libc::POLLOUT),
        "room came: the app end must be writable"
    );
    close(&inner, app);
}

#[test]
fn data_found_while_the_send_side_arms_makes_the_app_end_readable() {
    let (mut inner, app, script) = connection();
    inner.sync();
    assert!(!polls(app, libc::POLLIN), "nothing to read yet");
    // The receive side's arm finds a completion that changes nothing; the bytes' completion
    // is there when the send side arms.
    script.lock().unwrap().extend([Found::Nothing, Found::Data]);
    inner.sync();
    assert!(
        polls(app, libc::POLLIN),
        "bytes came: the app end must be readable"
    );
    close(&inner, app);
}

/// A writer that got EAGAIN and waits edge-triggered (nginx) must get an EPOLLOUT edge when
/// room comes, also when the room is found by this sync's receive-side arm: the app end is
/// stuffed and drained (a transition the kernel reports), never just left writable.
#[test]
fn room_found_while_the_receive_side_arms_is_an_edge_for_an_edge_triggered_writer() {
    let (mut inner, app, script) = connection();
    let ep = edge_triggered_writer(app);
    assert!(edge(ep), "the first edge: writable");
    assert!(
        !edge(ep),
        "edge-triggered: no second report without a change"
    );
    // The writer's send found no room (EAGAIN); its sync's receive-side arm finds the
    // completion that gives room.
    script.lock().unwrap().extend([Found::Room]);
    inner.sync();
    assert!(
        edge(ep),
        "room came: the edge-triggered writer must get an EPOLLOUT edge"
    );
    // SAFETY: our own fd.
    unsafe { libc::close(ep) };
    close(&inner, app);
}

/// The peer drains our stuffing when it posts receive buffers, which may be before our send
/// queue moved: the writer wakes on that edge, its send is refused (the queue is still full),
/// and the sync after the send finds room (the queue moved meanwhile). The app end was
/// writable all along since the peer's drain; unless it is stuffed and drained again, the
/// writer, edge-triggered, never hears of the room. nginx slept until its send timeout
/// (60 s) so, about once in a hundred downloads.
#[test]
fn a_writer_refused_after_the_peer_drained_its_stuffing_gets_an_edge() {
    let (mut inner, app, _, room) = connection_given();
    let ep = edge_triggered_writer(app);
    inner.sync();
    assert!(inner.stuffed && !edge(ep), "no room: stuffed, no edge");
    // The peer posted receive buffers and drained our stuffing; the writer takes the edge.
    super::drain(inner.own_bell);
    assert!(edge(ep), "the peer's drain: an edge");
    // Its send is refused; by the sync after it, the queue moved on and there is room.
    room.store(true, Ordering::Relaxed);
    inner.sync_after_send(true);
    assert!(
        edge(ep),
        "room after a refused send: the edge-triggered writer must get an EPOLLOUT edge"
    );
    assert!(!inner.stuffed && polls(app, libc::POLLOUT));
    // SAFETY: our own fd.
    unsafe { libc::close(ep) };
    close(&inner, app);
}
