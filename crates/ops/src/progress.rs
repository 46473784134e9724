//! The per-process progress thread (DESIGN.md §6).
//!
//! It exists only while the process has offloaded sockets or published beacons: started lazily
//! by the first [`register`], never in the constructor, and started again lazily in a fork
//! child (threads do not survive fork). It sleeps in `epoll_wait` on the fds tasks registered —
//! beacons, rendezvous endpoints, the peers' bell ends — and runs the task of each ready fd.
//!
//! INVARIANT: the thread holds the re-entrancy guard for its whole life, so every libc call it
//! makes reaches the C library directly, and it blocks every signal, so the application's
//! signals are delivered to the application's threads as without libsdp.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Work the progress thread does when an fd it watches is ready.
pub trait Task: Send + Sync {
    /// `events` are the epoll events that fired.
    fn on_event(&self, fd: i32, events: u32);
}

struct Entry {
    fd: i32,
    events: u32,
    task: Arc<dyn Task>,
}

struct Progress {
    /// The process that owns `epfd` and the thread (a fork child must build its own).
    pid: i32,
    epfd: i32,
    next_token: u64,
    entries: HashMap<u64, Entry>,
    /// Deadlines: (when, token, task); the task runs once with fd [`TIMER`].
    timers: Vec<(Instant, u64, Arc<dyn Task>)>,
}

/// The fd a timer's task is called with.
pub const TIMER: i32 = -1;

/// How long the thread sleeps at most: a timer fires at most this late.
const TICK: Duration = Duration::from_secs(1);

/// How often the thread sweeps the kept rings (`ib_verbs::shm::reuse::sweep`), at most.
const SWEEP: Duration = Duration::from_millis(250);

static STATE: Mutex<Option<Progress>> = Mutex::new(None);
/// Tasks running now, and whether a fork is being prepared (no task may start then).
static BUSY: AtomicU64 = AtomicU64::new(0);
static FORKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Before fork: waits until no task runs and keeps new ones from starting, so that the child
/// never inherits a connection lock held by the progress thread.
pub fn pause() {
    FORKING.store(true, Ordering::SeqCst);
    while BUSY.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

/// After fork, in parent and child.
pub fn resume() {
    FORKING.store(false, Ordering::SeqCst);
}

fn enter_task() {
    loop {
        while FORKING.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        BUSY.fetch_add(1, Ordering::SeqCst);
        if !FORKING.load(Ordering::SeqCst) {
            return;
        }
        BUSY.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<Progress>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The progress state's lock, held by the forking thread from fork `prepare` to `parent` /
/// `child`: a child must not inherit it held by a thread that does not exist there (its first
/// `register` or `unregister` would wait forever). Taken last in `prepare` (after the
/// connections' locks, as every other holder of both takes them).
pub struct ForkGuard {
    _g: std::sync::MutexGuard<'static, Option<Progress>>,
}

pub fn lock_for_fork() -> ForkGuard {
    ForkGuard { _g: lock() }
}

fn epoll_add(epfd: i32, fd: i32, events: u32, token: u64) -> bool {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: ev is a valid epoll_event; epfd and fd are fds of this process.
    unsafe {
        libc::syscall(
            libc::SYS_epoll_ctl,
            epfd,
            libc::EPOLL_CTL_ADD,
            fd,
            &mut ev as *mut _,
        ) == 0
    }
}

/// Makes sure this process has its own epoll set and thread; rebuilds both after a fork.
fn ensure(p: &mut Option<Progress>) -> Option<&mut Progress> {
    let pid = crate::sys::getpid();
    let stale = p.as_ref().is_some_and(|s| s.pid != pid);
    if p.is_none() || stale {
        // SAFETY: plain system call; CLOEXEC keeps the set out of exec'd programs.
        let epfd = unsafe { libc::syscall(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC) } as i32;
        if epfd < 0 {
            return None;
        }
        let epfd = crate::sys::move_high(epfd);
        let mut entries = HashMap::new();
        let mut next_token = 1;
        let mut timers = Vec::new();
        if let Some(old) = p.take() {
            timers = old.timers;
            // A fork child: the inherited epoll set is shared with the parent, so it is left
            // alone (closing our copy only); the child watches the same fds in a set of its own.
            crate::sys::close(old.epfd);
            for (token, e) in old.entries {
                if epoll_add(epfd, e.fd, e.events, token) {
                    entries.insert(token, e);
                }
            }
            next_token = old.next_token;
        }
        *p = Some(Progress {
            pid,
            epfd,
            next_token,
            entries,
            timers,
        });
        let spawned = std::thread::Builder::new()
            .name("libsdp-progress".into())
            .stack_size(256 * 1024)
            .spawn(move || run(epfd));
        if spawned.is_err() {
            // No thread, no set: the next call tries again (a set nobody waits on would take
            // registrations that never run).
            *p = None;
            crate::sys::close(epfd); // the set made above, which no thread uses
            return None;
        }
    }
    p.as_mut()
}

/// Whether this process has its progress thread (started now if need be). A connection must
/// not become SDP without it: its exchange, its peer's end and its timers all run there, and
/// with no descriptor left for the thread's epoll set (RLIMIT_NOFILE) a pending connection
/// waited for an answer nobody would read, for ever.
pub fn ready() -> bool {
    let mut g = lock();
    ensure(&mut g).is_some()
}

/// Watches `fd` for `events` (epoll flags) and runs `task` when they fire. Returns a token for
/// [`unregister`].
pub fn register(fd: i32, events: u32, task: Arc<dyn Task>) -> Option<u64> {
    let mut g = lock();
    let p = ensure(&mut g)?;
    let token = p.next_token;
    p.next_token += 1;
    if !epoll_add(p.epfd, fd, events, token) {
        return None;
    }
    p.entries.insert(token, Entry { fd, events, task });
    Some(token)
}

/// Runs `task` once (with fd [`TIMER`]) at `when`, or up to [`TICK`] later: the thread sleeps
/// at most that long, so a timer costs no system call. Returns a token for [`unregister`].
pub fn at(when: Instant, task: Arc<dyn Task>) -> Option<u64> {
    let mut g = lock();
    let p = ensure(&mut g)?;
    let token = p.next_token;
    p.next_token += 1;
    p.timers.push((when, token, task));
    Some(token)
}

/// Stops watching (or cancels a timer); the task is dropped once a running `on_event` returns.
pub fn unregister(token: u64) {
    let mut g = lock();
    if let Some(p) = g.as_mut()
        && let Some(i) = p.timers.iter().position(|t| t.1 == token)
    {
        p.timers.swap_remove(i);
        return;
    }
    if let Some(p) = g.as_mut()
        && let Some(e) = p.entries.remove(&token)
        && p.pid == crate::sys::getpid()
    {
        // SAFETY: removing an fd we added; an fd already closed just fails with EBADF.
        unsafe {
            libc::syscall(
                libc::SYS_epoll_ctl,
                p.epfd,
                libc::EPOLL_CTL_DEL,
                e.fd,
                std::ptr::null_mut::<libc::epoll_event>(),
            )
        };
    }
}

/// In the fork child handler: rebuilds the thread at once if the parent had one (a forked
/// worker blocked in accept must answer its beacon's probes). Never waits for the lock: a
/// lock held by a thread that did not survive the fork is left to the lazy path.
pub fn after_fork_child() {
    if let Ok(mut g) = STATE.try_lock()
        && g.is_some()
    {
        let _ = ensure(&mut g);
    }
}

/// In a fork child, rebuilds the thread if there was one in the parent.
pub fn after_fork_lazy() {
    let mut g = lock();
    if g.is_some() {
        let _ = ensure(&mut g);
    }
}

fn run(epfd: i32) {
    crate::guard::enter_forever();
    // SAFETY: a full signal set blocks every signal in this thread only.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut swept = Instant::now();
    loop {
        let timeout = {
            let g = lock();
            let now = Instant::now();
            g.as_ref()
                .and_then(|p| p.timers.iter().map(|t| t.0).min())
                .map_or(TICK, |w| w.saturating_duration_since(now).min(TICK))
        };
        // SAFETY: events is a valid buffer of 64 entries.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_wait,
                epfd,
                events.as_mut_ptr(),
                events.len() as i32,
                timeout.as_millis() as i32 + 1,
            )
        } as i32;
        if n < 0 {
            if crate::sys::errno() == libc::EINTR {
                continue;
            }
            return;
        }
        {
            let g = lock();
            match g.as_ref() {
                Some(p) if p.epfd == epfd && p.pid == crate::sys::getpid() => {}
                // The set was replaced (never in this process) or torn down: this thread ends.
                _ => return,
            }
        }
        let due: Vec<Arc<dyn Task>> = {
            let mut g = lock();
            let now = Instant::now();
            match g.as_mut() {
                Some(p) if p.timers.iter().any(|t| t.0 <= now) => {
                    let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut p.timers)
                        .into_iter()
                        .partition(|t| t.0 <= now);
                    p.timers = keep;
                    due.into_iter().map(|t| t.2).collect()
                }
                _ => Vec::new(),
            }
        };
        for task in due {
            enter_task();
            let _ =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task.on_event(TIMER, 0)));
            BUSY.fetch_sub(1, Ordering::SeqCst);
        }
        for ev in &events[..n.max(0) as usize] {
            let token = ev.u64;
            let fired = ev.events;
            let found = {
                let g = lock();
                g.as_ref()
                    .and_then(|p| p.entries.get(&token).map(|e| (e.fd, Arc::clone(&e.task))))
            };
            if let Some((fd, task)) = found {
                enter_task();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    task.on_event(fd, fired)
                }));
                BUSY.fetch_sub(1, Ordering::SeqCst);
            }
        }
        // Rings kept for reuse whose peer died or that went unused: a few times a second at
        // most (each costs a poll of the peer's pidfd).
        if swept.elapsed() >= SWEEP {
            swept = Instant::now();
            enter_task();
            ib_verbs::shm::reuse::sweep();
            BUSY.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
