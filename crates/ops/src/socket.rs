//! Socket lifecycle bookkeeping: which fds are stream sockets, and what the policy decides for
//! each of them.
//!
//! In the pass-through stage every call still goes to the kernel unchanged; the switch only
//! records and logs the decision so that `sdp explain` and the logs agree with what a later
//! offload would do.

use std::net::SocketAddr;

use crate::fdtable::{self, Decision, Meta};
use crate::log;
use crate::sdp_log;
use crate::state::globals;

/// `AF_INET_OFFLOAD` (see include/libsdp.h): an IPv4 stream socket the program wants offloaded,
/// with TCP fallback as the policy allows. Same number as the original libsdp's AF_INET_SDP.
pub const AF_INET_OFFLOAD: i32 = 27;
/// `AF_INET_DIRECT`: an IPv4 stream socket that must be offloaded (no TCP fallback).
pub const AF_INET_DIRECT: i32 = 28;

/// What `socket()` hands the kernel for a requested family, and the flags to remember.
pub fn map_family(domain: i32, ty: i32) -> (i32, u64) {
    let stream = ty & 0xf == libc::SOCK_STREAM;
    match domain {
        AF_INET_OFFLOAD if stream => (libc::AF_INET, Meta::ASKED_OFFLOAD),
        AF_INET_DIRECT if stream => (libc::AF_INET, Meta::ASKED_OFFLOAD | Meta::ASKED_DIRECT),
        _ => (domain, 0),
    }
}

/// Whether `socket(domain, ty, ..)` creates a socket the switch tracks.
pub fn is_offloadable(domain: i32, ty: i32) -> bool {
    ty & 0xf == libc::SOCK_STREAM && (domain == libc::AF_INET || domain == libc::AF_INET6)
}

/// After a successful `socket()`.
pub fn on_socket(fd: i32, domain: i32, ty: i32, asked: u64) {
    if !is_offloadable(domain, ty) {
        fdtable::clear(fd);
        return;
    }
    if !globals().active {
        return;
    }
    let mut m = Meta(Meta::TRACKED | asked);
    if domain == libc::AF_INET6 {
        m = m.with(Meta::INET6);
    }
    fdtable::set(fd, m);
}

/// After a successful `accept()` on `listener`.
pub fn on_accept(listener: i32, fd: i32) {
    let lm = fdtable::get(listener);
    if lm.tracked() {
        // LINUX: an accepted socket inherits its listener's buffer sizes.
        let keep = lm.0
            & (Meta::INET6
                | Meta::ASKED_OFFLOAD
                | Meta::ASKED_DIRECT
                | Meta::SNDBUF_SET
                | Meta::RCVBUF_SET);
        let m = Meta(Meta::TRACKED | Meta::ACCEPTED | keep);
        fdtable::set(fd, m.with_decision(lm.decision().unwrap_or(Decision::Tcp)));
    } else {
        fdtable::clear(fd);
    }
}

fn decide(fd: i32, role: conf::Role, addr: &SocketAddr) -> Decision {
    let g = globals();
    let m = fdtable::get(fd);
    let verdict = g.policy.decide(&g.program, role, addr);
    let mut d = Decision::from(verdict.mode);
    // An explicit AF_INET_OFFLOAD/DIRECT request overrides a `tcp` rule only as far as the
    // program asked: DIRECT means SDP only, OFFLOAD means SDP with fallback.
    if m.has(Meta::ASKED_DIRECT) {
        d = Decision::Sdp;
    } else if m.has(Meta::ASKED_OFFLOAD) && d == Decision::Tcp {
        d = Decision::Both;
    }
    if log::enabled(log::SUMMARY) {
        let rule = log::rule_field(
            g.policy.source_name(),
            verdict.rule.map(|r| r.line),
            verdict.why,
        );
        log::note_decision(fd, rule, d.as_str());
    }
    let role_name = match role {
        conf::Role::Server => "listen",
        conf::Role::Client => "connect",
    };
    match verdict.rule {
        Some(rule) => sdp_log!(
            log::DECISION,
            "{} fd {fd} {role_name} {addr}: {} (rule at line {}: {})",
            g.program,
            d.as_str(),
            rule.line,
            rule.text.trim()
        ),
        None => sdp_log!(
            log::DECISION,
            "{} fd {fd} {role_name} {addr}: {} ({})",
            g.program,
            d.as_str(),
            verdict.why
        ),
    }
    d
}

/// Before `connect()` on a tracked socket: records the client decision.
pub fn on_connect(fd: i32, addr: Option<SocketAddr>) -> Decision {
    let Some(addr) = addr else {
        return Decision::Tcp;
    };
    let d = decide(fd, conf::Role::Client, &addr);
    fdtable::update(fd, |m| m.with_decision(d).with(Meta::CONNECTED));
    d
}

/// After a successful `listen()` on a tracked socket: records the server decision.
pub fn on_listen(fd: i32) -> Decision {
    let Some(addr) = crate::sys::sockname(fd) else {
        return Decision::Tcp;
    };
    let d = decide(fd, conf::Role::Server, &addr);
    fdtable::update(fd, |m| m.with_decision(d).with(Meta::LISTENING));
    d
}

/// Before the real `close()`: the fd number stops naming our socket.
///
/// LINUX: close releases the fd number even when it fails with EINTR or EIO, so the entry is
/// dropped unconditionally.
pub fn on_close(fd: i32) {
    fdtable::clear(fd);
}

/// After a successful `dup`/`dup2`/`dup3`/`F_DUPFD`.
pub fn on_dup(old: i32, new: i32) {
    fdtable::copy(old, new);
}

/// `connect` on a tracked socket: the policy decision, then SDP or TCP. `None`: make the real
/// connect (TCP); `Some(rc)`: the call is complete with this C result.
pub fn connect(fd: i32, addr: Option<SocketAddr>) -> Option<isize> {
    if fdtable::get(fd).has(Meta::OFFLOADED) {
        // LINUX: connect on a connected stream socket fails with EISCONN (programs such as
        // hiredis call it again to learn that a non-blocking connect finished).
        return crate::offload::data::connect_again(fd).map(crate::offload::data::to_c);
    }
    let d = on_connect(fd, addr);
    let addr = addr?;
    let reason = match d {
        Decision::Tcp => fallback::Reason::Policy,
        _ => match crate::offload::setup::connect(fd, addr, d) {
            crate::offload::setup::ConnectPlan::Done(r) => {
                return Some(crate::offload::data::to_c(r));
            }
            crate::offload::setup::ConnectPlan::Tcp(reason) => reason,
        },
    };
    log::connect_tcp(fd, addr, reason);
    crate::offload::setup::record_tcp(fd, 1, reason);
    None
}

/// What the `listen` hook does around the kernel's call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenPlan {
    /// The socket listens already (a new backlog): nothing to set up.
    Again,
    /// The decision is made and, if SDP is allowed, the beacon and the rdma_cm listener are
    /// up: the kernel's call follows, and [`listen_failed`] if it fails.
    Ready,
    /// Not bound to a port yet (the kernel picks one): [`listen`] after a successful call.
    After,
}

/// Before the kernel's `listen` of a tracked socket. A socket bound to a port gets its beacon
/// and rdma_cm listener first: a client may connect the moment the kernel listens (it polled
/// for the port), and must find them then, not a kernel CM's REJECT that sends it to TCP.
pub fn listen_plan(fd: i32) -> ListenPlan {
    if fdtable::get(fd).has(Meta::LISTENING) {
        return ListenPlan::Again;
    }
    if crate::sys::sockname(fd).is_none_or(|a| a.port() == 0) {
        return ListenPlan::After;
    }
    listen(fd);
    ListenPlan::Ready
}

/// The kernel refused the `listen` that [`listen_plan`] prepared: nothing of it stays.
pub fn listen_failed(fd: i32) {
    crate::offload::setup::forget_tcp(fd);
    crate::offload::setup::on_listener_close(fd);
    fdtable::update(fd, |m| m.without(Meta::LISTENING));
}

/// A listening socket: the decision, then the beacon if SDP is allowed.
pub fn listen(fd: i32) {
    let d = on_listen(fd);
    crate::offload::setup::on_listen(fd, d);
    log::listened(fd, d != Decision::Tcp);
}

fn sockopt_int(fd: i32, opt: i32) -> Option<i32> {
    crate::sys::int_option(fd, libc::SOL_SOCKET, opt)
}

/// `accept` on a listening TCP socket the library has not seen made: one this program
/// inherited across `exec` (a supervisor that execs its workers, systemd-style socket
/// activation, a binary upgrade). It is adopted as if this program had listened on it: the
/// policy's decision, and the beacon when no other process publishes one for its address.
/// Before, such a listener's connections from SDP clients stalled 2 s each (the client waited
/// for an exchange at its pending timeout) while the process that published the beacon lived.
/// `true`: adopted (tracked from now on).
pub fn adopt_inherited_listener(fd: i32) -> bool {
    if !globals().active {
        return false;
    }
    let Some(domain) = sockopt_int(fd, libc::SO_DOMAIN) else {
        return false;
    };
    if !is_offloadable(domain, libc::SOCK_STREAM)
        || sockopt_int(fd, libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        || sockopt_int(fd, libc::SO_PROTOCOL) != Some(libc::IPPROTO_TCP)
        || sockopt_int(fd, libc::SO_ACCEPTCONN) != Some(1)
    {
        return false;
    }
    // Two threads accepting on the listener at once adopt it once (one beacon, one row).
    static ADOPTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ADOPTING.lock().unwrap_or_else(|p| p.into_inner());
    if fdtable::get(fd).tracked() {
        return true;
    }
    on_socket(fd, domain, libc::SOCK_STREAM, 0);
    if !fdtable::get(fd).tracked() {
        return false;
    }
    crate::sdp_log!(
        log::DECISION,
        "fd {fd}: a listening socket this program inherited; adopted"
    );
    listen(fd);
    true
}

/// After a successful `accept`: bookkeeping and, when the client came through the
/// rendezvous, the SDP exchange. `false`: the policy refuses this client (close it).
pub fn accept(listener: i32, fd: i32, flags: i32) -> bool {
    on_accept(listener, fd);
    if !fdtable::get(fd).tracked() {
        return true;
    }
    let refused = matches!(
        crate::offload::setup::accept(listener, fd, flags),
        crate::offload::setup::AcceptOutcome::Refuse
    );
    log::accepted(listener, fd, refused);
    !refused
}

/// Before the real `close` of a tracked fd.
pub fn close(fd: i32) {
    let m = fdtable::get(fd);
    // A connection that went back to TCP (`setup::swap_back`) is no longer OFFLOADED but
    // still holds its private app end, bell end and shadow until its last close.
    if m.has(Meta::OFFLOADED) || crate::offload::lookup(fd).is_some() {
        crate::offload::setup::close(fd);
    } else {
        crate::offload::setup::forget_tcp(fd);
        if m.has(Meta::LISTENING) {
            crate::offload::setup::on_listener_close(fd);
        }
    }
    on_close(fd);
}

/// Before `dup2`/`dup3` of `old` over `new`: a connection `new` names loses the epoll
/// registrations made through `new` now, as the kernel drops them with the file it replaces
/// (after the replacement they could no longer be removed by number: the library's copy of
/// the app end kept them, reporting the old connection).
pub fn before_replace(old: i32, new: i32) {
    if let Some(conn) = crate::offload::lookup(new)
        && crate::offload::lookup(old).is_none_or(|c| !std::sync::Arc::ptr_eq(&c, &conn))
    {
        crate::offload::setup::forget_epoll_of(new);
    }
}

/// After a successful dup of a tracked fd (or onto one).
pub fn dup(old: i32, new: i32) {
    // A connection that went back to TCP (`setup::swap_back`) is no longer OFFLOADED but
    // still holds its private sockets until its last fd goes, as for `close`: a dup2 over
    // its fd is that fd's close (before 2026-11-27 the library's copy of the socket stayed,
    // and the peer never got a FIN).
    let new_was_offloaded =
        fdtable::get(new).has(Meta::OFFLOADED) || crate::offload::lookup(new).is_some();
    let old_offloaded = fdtable::get(old).has(Meta::OFFLOADED);
    if new_was_offloaded || old_offloaded {
        crate::offload::setup::on_dup(old, new);
    }
    on_dup(old, new);
}
