//! The kernel TCP stack's side of libsdp: when a connection falls back to TCP, why, and which
//! socket options the shadow kernel socket must carry.
//!
//! Pure logic, no I/O: `ops` asks these questions and acts on the answers. Reason codes are
//! stable numbers (they are stored in `sdp stat`'s shared memory, read by another binary).

#![forbid(unsafe_code)]

use std::fmt;

/// Why a stream socket is (or stays) on kernel TCP. `Offloaded` means it is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Reason {
    /// The connection is carried by an offload protocol.
    Offloaded = 0,
    /// Not decided yet (a socket that neither listened nor connected).
    Undecided = 1,
    /// The policy said `tcp` for this program, role and address.
    Policy = 2,
    /// libsdp is dormant in this process (LIBSDP_ENABLE=0, or /etc/ld.so.preload without opt-in).
    Disabled = 3,
    /// The policy file is broken; every socket stays TCP (fail open).
    BrokenPolicy = 4,
    /// Client: the server publishes no beacon (a plain TCP server, or one whose policy is tcp).
    NoBeacon = 5,
    /// Client: the beacon's owner is not the owner of the kernel listener.
    BeaconNotTrusted = 6,
    /// Server: the client left no rendezvous endpoint (a plain TCP client).
    PlainClient = 7,
    /// Server: the endpoint's owner is not the owner of the client's TCP socket.
    EndpointNotTrusted = 8,
    /// The peer declined SDP for this connection (its policy).
    PeerDeclined = 9,
    /// The transport exchange failed (malformed Hello, peer died during setup).
    SetupFailed = 10,
    /// No transport can reach the peer (no RDMA device, no route, not on this host).
    NoDevice = 11,
    /// A resource ran out (memory, fds, rings).
    Exhausted = 12,
    /// The address is not one SDP serves (a unix socket, a non-IP family).
    NotOffloadable = 13,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::Offloaded,
        Reason::Undecided,
        Reason::Policy,
        Reason::Disabled,
        Reason::BrokenPolicy,
        Reason::NoBeacon,
        Reason::BeaconNotTrusted,
        Reason::PlainClient,
        Reason::EndpointNotTrusted,
        Reason::PeerDeclined,
        Reason::SetupFailed,
        Reason::NoDevice,
        Reason::Exhausted,
        Reason::NotOffloadable,
    ];

    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn from_code(code: u16) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.code() == code)
    }

    /// The name shown in logs and `sdp stat`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Offloaded => "-",
            Reason::Undecided => "undecided",
            Reason::Policy => "policy",
            Reason::Disabled => "disabled",
            Reason::BrokenPolicy => "broken-policy",
            Reason::NoBeacon => "no-beacon",
            Reason::BeaconNotTrusted => "beacon-not-trusted",
            Reason::PlainClient => "plain-client",
            Reason::EndpointNotTrusted => "endpoint-not-trusted",
            Reason::PeerDeclined => "peer-declined",
            Reason::SetupFailed => "setup-failed",
            Reason::NoDevice => "no-device",
            Reason::Exhausted => "exhausted",
            Reason::NotOffloadable => "not-offloadable",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy mode for one socket, as `conf` decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sdp,
    Tcp,
    Both,
}

/// What to do when the offload path cannot serve a connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Connect over kernel TCP on the same fd, recording the reason.
    UseTcp(Reason),
    /// Fail the connect with this errno (the one TCP would give for an unreachable peer).
    Fail(i32),
}

/// LINUX: ECONNREFUSED, what connect(2) reports when nobody listens.
pub const ECONNREFUSED: i32 = 111;
/// LINUX: ENOBUFS, what a socket call reports when the kernel is out of buffers.
pub const ENOBUFS: i32 = 105;

/// The fallback rule of DESIGN.md §4: with `both` every connect-time failure of the offload
/// path retries over TCP; with `sdp` the connect fails as TCP would fail.
pub fn on_connect_failure(mode: Mode, reason: Reason) -> Action {
    match mode {
        Mode::Tcp => Action::UseTcp(Reason::Policy),
        Mode::Both => Action::UseTcp(reason),
        Mode::Sdp => Action::Fail(match reason {
            Reason::Exhausted => ENOBUFS,
            _ => ECONNREFUSED,
        }),
    }
}

/// Whether a server whose policy is `mode` serves a client that came without SDP.
pub fn server_accepts_plain_client(mode: Mode) -> bool {
    mode != Mode::Sdp
}

/// Socket options that describe the connection rather than the kernel object: set on the shadow
/// TCP socket as well as remembered by the offload, so that a fallback (or `getsockopt` on the
/// shadow) sees what the application set. (level, name) pairs, Linux numbering.
pub const MIRRORED_OPTIONS: &[(i32, i32)] = &[
    (SOL_SOCKET, SO_KEEPALIVE),
    (SOL_SOCKET, SO_LINGER),
    (SOL_SOCKET, SO_RCVBUF),
    (SOL_SOCKET, SO_SNDBUF),
    (SOL_SOCKET, SO_REUSEADDR),
    (SOL_SOCKET, SO_REUSEPORT),
    (SOL_SOCKET, SO_RCVTIMEO),
    (SOL_SOCKET, SO_SNDTIMEO),
    (IPPROTO_TCP, TCP_NODELAY),
];

const SOL_SOCKET: i32 = 1;
const IPPROTO_TCP: i32 = 6;
const SO_REUSEADDR: i32 = 2;
const SO_SNDBUF: i32 = 7;
const SO_RCVBUF: i32 = 8;
const SO_KEEPALIVE: i32 = 9;
const SO_LINGER: i32 = 13;
const SO_REUSEPORT: i32 = 15;
const SO_RCVTIMEO: i32 = 20;
const SO_SNDTIMEO: i32 = 21;
const TCP_NODELAY: i32 = 1;

/// Whether `setsockopt(level, name)` must also reach the shadow kernel socket.
pub fn is_mirrored(level: i32, name: i32) -> bool {
    MIRRORED_OPTIONS.contains(&(level, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r.code()), Some(r));
        }
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
        assert_eq!(Reason::from_code(999), None);
    }

    #[test]
    fn both_falls_back_with_the_reason() {
        assert_eq!(
            on_connect_failure(Mode::Both, Reason::NoBeacon),
            Action::UseTcp(Reason::NoBeacon)
        );
    }

    #[test]
    fn sdp_fails_like_tcp_would() {
        assert_eq!(
            on_connect_failure(Mode::Sdp, Reason::NoBeacon),
            Action::Fail(ECONNREFUSED)
        );
        assert_eq!(
            on_connect_failure(Mode::Sdp, Reason::Exhausted),
            Action::Fail(ENOBUFS)
        );
    }

    #[test]
    fn tcp_policy_is_reported_as_policy() {
        assert_eq!(
            on_connect_failure(Mode::Tcp, Reason::NoBeacon),
            Action::UseTcp(Reason::Policy)
        );
    }

    #[test]
    fn sdp_server_refuses_plain_clients() {
        assert!(!server_accepts_plain_client(Mode::Sdp));
        assert!(server_accepts_plain_client(Mode::Both));
        assert!(server_accepts_plain_client(Mode::Tcp));
    }

    #[test]
    fn nodelay_and_keepalive_are_mirrored_but_not_others() {
        assert!(is_mirrored(IPPROTO_TCP, TCP_NODELAY));
        assert!(is_mirrored(SOL_SOCKET, SO_KEEPALIVE));
        assert!(!is_mirrored(SOL_SOCKET, 3 /* SO_TYPE */));
    }
}
