//! Readiness from the rings in `epoll_wait`: a level-triggered epoll set whose wait busy-polls
//! its connections' rings takes their messages without bells (ARCHITECTURE.md, the fd model,
//! 2).
//!
//! A connection whose bell request a poller withdrew ("quiet") gets no bell byte for a
//! message: its app end does not become readable in the kernel. Whoever could wait for it in
//! the kernel must therefore be covered:
//! - **Threads of this process.** Every hooked wait that may sleep in the kernel (`poll`,
//!   `select`, `epoll_wait` once its spin is over, a blocking receive or send) counts itself
//!   in [`SLEEPERS`] ([`Sleeping`]) and then asks again for every bell an epoll set's poller
//!   withdrew ([`rearm`]; a blocking receive's spin keeps its own: it takes what comes). A
//!   poller withdraws, then looks at [`SLEEPERS`] (both SeqCst): if someone sleeps, it asks
//!   again at once. One of the two always sees the other. A polling set's own look asks for
//!   what it could miss ([`before_look`]).
//! - **Other processes.** A connection a fork copied (`Inner::forked`) is never quieted, nor is
//!   a set that existed at a fork (the sets are forgotten, [`forget_sets`]); a round does not
//!   even progress one that another process serves (`is_current`). An exec or a
//!   fork in progress ([`HANDOFF`]) quiets nothing, and asks again for every withdrawn bell
//!   before it goes on (the exec relay and a fork child wait with their own raw calls).
//! - **Sets.** Only sets this process made (`epoll_create`) since its last fork are mirrored
//!   ([`SETS`]): the application's own registrations, as it made them. A set's mirror goes
//!   with the descriptor (`close`, `dup2` onto it, `close_range`), so a new set that gets the
//!   number starts empty, and with a second number for it (`dup`) or its passing in
//!   SCM_RIGHTS ([`set_shared`]). A connection is polled only for a level-triggered EPOLLIN
//!   registration (not one-shot, not exclusive) whose data no other registration of the set
//!   shares, so a kernel event with that data is the same descriptor's and the two merge.
//! - **The kernel's events first.** A round takes the kernel's events of the set first and adds
//!   the rings' in the room left; a ring event with no room asks for its bell again (the kernel
//!   reports it, in its own turn).

use crate::fdhash::{FdMap, FdSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::{Conn, Inner, Phase};

/// Threads of this process in a hooked wait that may sleep in the kernel.
static SLEEPERS: AtomicUsize = AtomicUsize::new(0);
/// An exec or a fork is handing connections to another process.
static HANDOFF: AtomicUsize = AtomicUsize::new(0);

/// Connections whose bell request a poller withdrew, with the epoll set that polls them (-1: a
/// blocking receive's spin). Its lock is never held while another is taken.
static QUIET: Mutex<Vec<(i32, Weak<Conn>)>> = Mutex::new(Vec::new());
static QUIET_ANY: AtomicBool = AtomicBool::new(false);
/// The rings' events cannot be written here (`process_vm_writev` refused: a seccomp filter):
/// no set is polled.
static OFF: AtomicBool = AtomicBool::new(false);

/// The application's registrations of the epoll sets this process made since its last fork.
/// Its lock is never held while another is taken.
static SETS: Mutex<Option<FdMap<i32, Mirror>>> = Mutex::new(None);
static ANY_SETS: AtomicBool = AtomicBool::new(false);

/// What a set's mirror says of the offloaded connections registered in it.
struct Look {
    /// Those a round polls, with their data.
    list: Vec<(u64, Weak<Conn>)>,
    /// The same, by address.
    polled: FdSet<usize>,
    /// Every one registered in the set for EPOLLIN, by address.
    registered: FdSet<usize>,
    /// The mirror's changes when it was made.
    changes: u64,
}

type Polled = Arc<Look>;

/// The locks a fork holds from `prepare` to `parent` or `child`.
pub type ForkGuards = (
    MutexGuard<'static, Vec<(i32, Weak<Conn>)>>,
    MutexGuard<'static, Option<FdMap<i32, Mirror>>>,
);

#[derive(Default)]
pub struct Mirror {
    /// fd → (events, data), as the application registered them.
    regs: FdMap<i32, (u32, u64)>,
    /// data → how many registrations carry it.
    uses: FdMap<u64, u32>,
    /// The connections a round polls, with their data; made again after any change.
    polled: Option<Polled>,
    /// Changes so far: a list made from an older state is not kept.
    changes: u64,
    /// An epoll set (not mirrored) was registered here: its connections' readiness is the
    /// kernel's, so a look at this set asks for every bell first.
    nests: bool,
}

impl Mirror {
    fn put(&mut self, fd: i32, reg: (u32, u64)) {
        if let Some(old) = self.regs.insert(fd, reg) {
            self.unuse(old.1);
        }
        *self.uses.entry(reg.1).or_default() += 1;
    }

    fn take(&mut self, fd: i32) -> bool {
        let Some(old) = self.regs.remove(&fd) else {
            return false;
        };
        self.unuse(old.1);
        true
    }

    fn unuse(&mut self, data: u64) {
        if let Some(n) = self.uses.get_mut(&data) {
            *n -= 1;
            if *n == 0 {
                self.uses.remove(&data);
            }
        }
    }

    fn shared(&self, data: u64) -> bool {
        self.uses.get(&data).is_some_and(|&n| n > 1)
    }
}

fn sets() -> MutexGuard<'static, Option<FdMap<i32, Mirror>>> {
    SETS.lock().unwrap_or_else(|p| p.into_inner())
}

fn quiet_list() -> MutexGuard<'static, Vec<(i32, Weak<Conn>)>> {
    QUIET.lock().unwrap_or_else(|p| p.into_inner())
}

/// A thread in a hooked wait that may sleep in the kernel: counted from [`Sleeping::start`]
/// to its drop. The caller asks for the withdrawn bells ([`rearm`]) right after the start.
pub struct Sleeping(());

impl Sleeping {
    pub fn start() -> Sleeping {
        SLEEPERS.fetch_add(1, Ordering::SeqCst);
        Sleeping(())
    }
}

impl Drop for Sleeping {
    fn drop(&mut self) {
        SLEEPERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A hooked wait that may sleep in the kernel begins: counted, and every withdrawn bell asked
/// for again (takes connections' locks: never call it with one held).
pub fn sleeping() -> Sleeping {
    let s = Sleeping::start();
    rearm(None);
    s
}

/// An exec, a spawn or a fork begins: nothing is quieted until [`handoff_end`], and every
/// withdrawn bell is asked for again now.
pub fn handoff_begin() {
    HANDOFF.fetch_add(1, Ordering::SeqCst);
    rearm_if(|_| true);
}

pub fn handoff_end() {
    let _ = HANDOFF.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(1));
}

/// The rings' events could not be written into the application's buffer for a reason other
/// than the buffer (EPERM, ENOSYS): polling stops for good, every withdrawn bell asked again.
pub fn turn_off() {
    OFF.store(true, Ordering::SeqCst);
    rearm(None);
}

/// Whether a poller may withdraw bell requests now (no handoff, and for an epoll set no
/// sleeper). Read after the withdrawal (SeqCst): see the module's documentation.
pub(crate) fn may_stay_quiet(epoll: bool) -> bool {
    fence(Ordering::SeqCst);
    HANDOFF.load(Ordering::SeqCst) == 0 && (!epoll || SLEEPERS.load(Ordering::SeqCst) == 0)
}

/// Lists a connection whose bell request `g` just withdrew (its lock held).
fn list(g: &mut Inner, epfd: i32) {
    if epfd >= 0 {
        g.quiet_set = true;
    }
    match g.quiet_entry {
        None => {
            g.quiet_entry = Some(epfd);
            quiet_list().push((epfd, g.self_ref.clone()));
            QUIET_ANY.store(true, Ordering::SeqCst);
        }
        Some(-1) if epfd >= 0 => {
            // A receive's entry, which sleepers leave alone: a set's, which they do not.
            g.quiet_entry = Some(epfd);
            let me = g.self_ref.as_ptr();
            let mut q = quiet_list();
            match q.iter_mut().find(|e| std::ptr::eq(e.1.as_ptr(), me)) {
                Some(e) => e.0 = epfd,
                None => q.push((epfd, g.self_ref.clone())),
            }
            QUIET_ANY.store(true, Ordering::SeqCst);
        }
        Some(_) => {}
    }
}

/// A blocking receive's spin withdrew `g`'s bell request (`Inner::quiet_while_polling`):
/// listed, so that an exec or a fork asks for it again. Returns false if it must be asked for
/// again now (a handoff is under way).
pub fn note_receive_quiet(g: &mut Inner) -> bool {
    list(g, -1);
    may_stay_quiet(false)
}

/// Asks again for the bells withdrawn by epoll sets' pollers, except those of `polling` (a set
/// whose wait polls its rings itself and asks again before it sleeps). A blocking receive's
/// spin keeps its own: what comes, it takes (another thread asleep on the app end meanwhile
/// misses nothing it would have read). One load when nothing is withdrawn. Takes
/// connections' locks: never call it with one held.
pub fn rearm(polling: Option<i32>) {
    rearm_if(|e| e.0 >= 0 && Some(e.0) != polling);
}

/// Asks again for the bells of the listed connections `go` picks (an entry: the set that
/// quieted it, -1 for a receive's spin; the connection).
fn rearm_if(go: impl Fn(&(i32, Weak<Conn>)) -> bool) {
    if !QUIET_ANY.load(Ordering::SeqCst) {
        return;
    }
    let taken: Vec<(i32, Weak<Conn>)> = {
        let mut q = quiet_list();
        // Connections closed since they were listed (a loop that never sleeps would keep them).
        q.retain(|e| e.1.strong_count() > 0);
        if !q.iter().any(&go) {
            QUIET_ANY.store(!q.is_empty(), Ordering::SeqCst);
            return;
        }
        let (go, keep): (Vec<_>, Vec<_>) = q.drain(..).partition(&go);
        *q = keep;
        QUIET_ANY.store(!q.is_empty(), Ordering::SeqCst);
        go
    };
    for (_, w) in taken {
        if let Some(c) = w.upgrade() {
            ask_again(&mut c.lock());
        }
    }
}

/// `g` leaves the list and asks for its bell (and rings for bytes there), if this process
/// serves it.
fn ask_again(g: &mut Inner) {
    g.quiet_entry = None;
    g.quiet_set = false;
    if matches!(g.phase, Phase::Offloaded(_)) && g.is_current() {
        g.sync();
    }
}

/// Before a look at the kernel's events of `epfd`, a set whose wait polls its rings: the bells
/// withdrawn by other sets' pollers are asked for again where this look could miss them (a
/// connection registered here that this set does not poll, any connection when this set
/// holds another mirrored set or is not mirrored itself). Two threads each polling a set of
/// its own then keep each other's connections quiet.
pub fn before_look(epfd: i32) {
    if !QUIET_ANY.load(Ordering::SeqCst) {
        return;
    }
    {
        // The common case, one set polling its own: its rounds quieted only what they poll
        // (a round that raced an `epoll_ctl` checks after itself, see `round`).
        let q = quiet_list();
        if q.iter().all(|e| e.0 == epfd || e.0 < 0) {
            return;
        }
    }
    look_again(epfd);
}

/// [`before_look`]'s full check.
fn look_again(epfd: i32) {
    let nested = {
        let s = sets();
        s.as_ref().and_then(|all| {
            let m = all.get(&epfd)?;
            Some(m.nests || m.regs.keys().any(|f| all.contains_key(f)))
        })
    };
    match nested {
        None => return rearm(None), // not mirrored: it polls nothing itself
        Some(true) => rearm(Some(epfd)),
        Some(false) => {}
    }
    let Some(look) = polled(epfd) else {
        return;
    };
    rearm_if(|e| {
        let at = e.1.as_ptr() as usize;
        e.0 >= 0 && look.registered.contains(&at) && !look.polled.contains(&at)
    });
}

/// `epoll_create` made `epfd` in this process: mirrored from now on.
pub fn set_created(epfd: i32) {
    let mut s = sets();
    s.get_or_insert_with(FdMap::default)
        .insert(epfd, Mirror::default());
    ANY_SETS.store(true, Ordering::SeqCst);
}

/// Whether any set is mirrored (one load, for `close`).
#[inline]
pub fn any_sets() -> bool {
    ANY_SETS.load(Ordering::Relaxed)
}

/// The application's `epoll_ctl` succeeded (as far as it can tell): a mirrored set's mirror
/// follows it. A connection still registered in the set for EPOLLIN but no longer polled
/// there (made edge-triggered, one-shot, or sharing its data now) asks for its bell
/// again: a look at the set that polls its own rings (`rearm(Some(set))`) would not ask for
/// it. One the set no longer holds needs nothing here: a wait elsewhere asks first.
pub fn ctl(epfd: i32, op: i32, fd: i32, ev: Option<libc::epoll_event>) {
    if !any_sets() {
        return;
    }
    // An fd that is neither a connection nor a socket the library knows may be an epoll set
    // (looked at before the lock: `lookup` takes the registry's).
    let may_nest = op != libc::EPOLL_CTL_DEL
        && !crate::fdtable::is_tracked(fd)
        && super::lookup(fd).is_none()
        && is_epoll_fd(fd);
    let mut unpolled = Vec::new();
    {
        let mut s = sets();
        let Some(m) = s.as_mut().and_then(|m| m.get_mut(&epfd)) else {
            return;
        };
        m.nests |= may_nest;
        m.changes += 1;
        let old = m.regs.get(&fd).map(|r| r.1);
        match (op, ev) {
            (libc::EPOLL_CTL_DEL, _) => {
                m.take(fd);
            }
            (libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD, Some(e)) => m.put(fd, (e.events, e.u64)),
            _ => return,
        }
        m.polled = None;
        // Without EPOLLIN the set never reports the bell's readiness (end of stream and
        // hang-up do not need the bell).
        let wants_in = |events: u32| events & libc::EPOLLIN as u32 != 0;
        if let Some(&(events, data)) = m.regs.get(&fd) {
            if wants_in(events) && (!polled_registration(events) || m.shared(data)) {
                unpolled.push(fd);
            }
            // The one registration that shared nothing until now (a rare look over the set).
            if old != Some(data)
                && m.uses.get(&data) == Some(&2)
                && let Some((&f, &(e, _))) = m.regs.iter().find(|(f, r)| **f != fd && r.1 == data)
                && wants_in(e)
            {
                unpolled.push(f);
            }
        }
    }
    for f in unpolled {
        loud(f);
    }
}

/// Whether `fd` names an epoll set (or may: /proc unreadable).
fn is_epoll_fd(fd: i32) -> bool {
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(p) => p.as_os_str() == "anon_inode:[eventpoll]",
        Err(_) => true,
    }
}

/// Whether a registration with these events may be polled at the rings (its data aside).
fn polled_registration(events: u32) -> bool {
    const ODD: u32 = (libc::EPOLLET | libc::EPOLLONESHOT | libc::EPOLLEXCLUSIVE) as u32;
    events & libc::EPOLLIN as u32 != 0 && events & ODD == 0
}

/// The connection `fd` names asks for its bell again if a poller had quieted it.
fn loud(fd: i32) {
    let Some(c) = super::lookup(fd) else { return };
    let mut g = c.lock();
    if g.quiet_set {
        g.quiet_set = false;
        if matches!(g.phase, Phase::Offloaded(_)) && g.is_current() {
            g.sync();
        }
    }
}

/// `fd` is closed (or replaced): a set it named is forgotten, with the bells its pollers
/// withdrew asked for again; the registrations it was in are forgotten.
pub fn fd_closed(fd: i32) {
    if !any_sets() {
        return;
    }
    let was_set = {
        let mut s = sets();
        let Some(m) = s.as_mut() else { return };
        let was_set = m.remove(&fd).is_some();
        for mirror in m.values_mut() {
            if mirror.take(fd) {
                mirror.polled = None;
                mirror.changes += 1;
            }
        }
        was_set
    };
    if was_set {
        super::forget_watched_set(fd);
        rearm(None);
    }
}

/// The set `fd` names may now be changed or waited on behind the mirror's back (a duplicate
/// of its descriptor, a raw `epoll_ctl`, one sent to another process): it is no longer
/// mirrored, and the bells its pollers withdrew are asked for again.
pub fn set_shared(fd: i32) {
    if !any_sets() {
        return;
    }
    let was_set = sets().as_mut().is_some_and(|m| m.remove(&fd).is_some());
    if was_set {
        rearm(None);
    }
}

/// Every set in `first..=last` closed (`close_range`).
pub fn range_closed(first: u32, last: u32) {
    if !any_sets() {
        return;
    }
    let fds: Vec<i32> = {
        let s = sets();
        let Some(m) = s.as_ref() else { return };
        let mut fds: Vec<i32> = m.keys().copied().collect();
        for mirror in m.values() {
            fds.extend(mirror.regs.keys().copied());
        }
        fds
    };
    for fd in fds {
        if (first..=last).contains(&(fd as u32)) {
            fd_closed(fd);
        }
    }
}

/// At a fork, in both processes: every set may be shared with the other process now.
pub fn forget_sets() {
    if let Some(m) = sets().as_mut() {
        m.clear();
    }
}

/// Fork `prepare`: after [`handoff_begin`] and with every connection's lock taken; the
/// guards are given back in `parent` and `child`.
pub fn lock_for_fork() -> ForkGuards {
    (quiet_list(), sets())
}

/// Fork `child`: one thread, asleep nowhere; the parent's pollers are not here.
pub fn after_fork_child() {
    SLEEPERS.store(0, Ordering::SeqCst);
    HANDOFF.store(0, Ordering::SeqCst);
    after_fork();
}

/// After a fork, in both processes: a poller that withdrew a bell just before it (its round
/// began before the handoff) may have left its connection out of the list when the fork
/// copied it; every connection still marked asks again (the one that serves it: the bell
/// request is shared).
pub fn after_fork() {
    // The list first: a receive of another thread that lists its connection after this still
    // has its entry.
    quiet_list().clear();
    QUIET_ANY.store(false, Ordering::SeqCst);
    for (_, c) in super::snapshot() {
        let mut g = c.lock();
        if g.quiet_set || g.quiet_entry.is_some() {
            ask_again(&mut g);
        }
    }
}

/// The connections a round of `epfd` polls, with their data (`None`: not mirrored).
fn polled(epfd: i32) -> Option<Polled> {
    // (fd, events, data, data shared with another registration)
    let (regs, changes): (Vec<(i32, u32, u64, bool)>, u64) = {
        let s = sets();
        let m = s.as_ref()?.get(&epfd)?;
        if let Some(p) = &m.polled {
            return Some(Arc::clone(p));
        }
        let regs = m
            .regs
            .iter()
            .map(|(&fd, &(e, d))| (fd, e, d, m.shared(d)))
            .collect();
        (regs, m.changes)
    };
    let mut look = Look {
        list: Vec::new(),
        polled: FdSet::default(),
        registered: FdSet::default(),
        changes,
    };
    for &(fd, events, data, shared) in &regs {
        if events & libc::EPOLLIN as u32 == 0 {
            continue; // the set never reports the bell's readiness for it
        }
        let Some(c) = super::lookup(fd) else { continue };
        let at = Arc::as_ptr(&c) as usize;
        look.registered.insert(at);
        if polled_registration(events) && !shared {
            look.list.push((data, Arc::downgrade(&c)));
            look.polled.insert(at);
        }
    }
    let look = Arc::new(look);
    let mut s = sets();
    // Kept only if the mirror did not change meanwhile (an `epoll_ctl` of another thread).
    if let Some(m) = s.as_mut().and_then(|m| m.get_mut(&epfd))
        && m.polled.is_none()
        && m.changes == changes
    {
        m.polled = Some(Arc::clone(&look));
    }
    Some(look)
}

/// The connections of a set a round polls ([`polls`]).
pub struct Polls(Polled);

/// What a round over `epfd`'s rings would poll now, if anything (for [`round`]).
pub fn polls(epfd: i32) -> Option<Polls> {
    if OFF.load(Ordering::Relaxed)
        || HANDOFF.load(Ordering::SeqCst) != 0
        || SLEEPERS.load(Ordering::SeqCst) != 0
        || !any_sets()
    {
        return None;
    }
    polled(epfd).filter(|p| !p.list.is_empty()).map(Polls)
}

/// What a round over a set's rings found: indices of the kernel's events to add EPOLLIN to,
/// and new events.
#[derive(Default)]
pub struct Round {
    pub merge: Vec<usize>,
    pub add: Vec<libc::epoll_event>,
}

/// One round over the rings of `epfd`'s polled connections (`polls`, taken before the kernel's
/// look), after the kernel's events of the set (their data in `kernel`): withdraws each one's
/// bell request and reports what its ring holds, in `room` new events at most. Returns false
/// when a sleeper or a handoff came since `polls` (the caller reports the kernel's events
/// only).
pub fn round(epfd: i32, polls: &Polls, kernel: &[u64], room: usize, out: &mut Round) -> bool {
    out.merge.clear();
    out.add.clear();
    if HANDOFF.load(Ordering::SeqCst) != 0 || SLEEPERS.load(Ordering::SeqCst) != 0 {
        return false;
    }
    let look = &polls.0;
    for (data, w) in look.list.iter() {
        let Some(c) = w.upgrade() else { continue };
        let mut g = c.lock();
        // A connection another process serves (a fork's, in a set made after the fork) is
        // left to it: its progress here consumed that process's messages and claimed the
        // connection, and the other process got EIO.
        let Phase::Offloaded(s) = &g.phase else {
            continue;
        };
        if !s.is_current() {
            continue;
        }
        if g.every_arrival || g.forked || !s.quiet_while_polling() {
            // Rings as it always did: make what came current on the app end.
            if let Phase::Offloaded(s) = &mut g.phase
                && s.has_work()
            {
                g.sync();
            }
            continue;
        }
        g.quiet_while_polling();
        list(&mut g, epfd);
        let ready = match &mut g.phase {
            Phase::Offloaded(s) => {
                // Only a ring with something new is worth a progress (a round visits every
                // connection of the set; most have nothing).
                if s.has_work() {
                    s.progress();
                }
                s.recv_ready()
            }
            _ => false,
        };
        if !ready {
            continue;
        }
        if let Some(i) = kernel.iter().position(|k| k == data) {
            out.merge.push(i);
        } else if out.add.len() < room {
            out.add.push(libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: *data,
            });
        } else {
            // No room: the kernel reports it, in its turn.
            g.sync_loud();
        }
    }
    if !may_stay_quiet(true) {
        rearm(None);
    } else if sets()
        .as_ref()
        .and_then(|m| m.get(&epfd))
        .is_none_or(|m| m.changes != look.changes)
    {
        // An `epoll_ctl` of another thread changed the set during the round: what it quieted
        // with the old list and the set no longer polls asks for its bell again.
        look_again(epfd);
    }
    true
}
