//! Same-host discovery and rendezvous (DESIGN.md §4) as abstract AF_UNIX names.
//!
//! Abstract names live in the network namespace, so a beacon is seen exactly by the
//! processes that can reach the TCP port it stands for.
//!
//! - **Beacon** `libsdp/b/<addr>:<port>` (`[v6]:port` for IPv6): published by the process that
//!   calls `listen`. A client [`probe`]s it: it checks that the kernel uid behind the beacon
//!   (SO_PEERCRED, recorded at `listen`) owns the kernel TCP listener of that port
//!   (`/proc/net/tcp{,6}`), otherwise the port is TCP-only for it; then it registers its
//!   [`Intent`] (the 4-tuple and a nonce) and reads one byte of answer.
//! - **Endpoint** `libsdp/c/<client addr:port>/<server addr:port>`: bound by the client before
//!   its TCP connect. At `accept` the server connects to it ([`connect_endpoint`]), checks the
//!   uid behind it is the uid that registered the intent, and sends the nonce; the client
//!   ([`Endpoint::accept`]) takes only a connection that presents the nonce. The nonce went to
//!   the authenticated beacon alone; whoever holds it is the beacon owner or a process it
//!   forked (a prefork worker, often under a less privileged uid than the master that
//!   listened). The bootstrap of `bootstrap.rs` then runs on that stream.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::sys::{self, Fd, PeerCred, SysError};

/// Bytes of a per-connection nonce.
pub const NONCE_LEN: usize = 16;

/// Most bytes a client may send after its intent (its bootstrap Offer, see
/// [`crate::shm::Active::early_offer`]); the beacon's owner keeps them with the intent.
pub const MAX_EXTRA: usize = 318;

fn fmt_addr(a: &SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) => format!("{}:{}", v.ip(), v.port()),
        SocketAddr::V6(v) => format!("[{}]:{}", v.ip(), v.port()),
    }
}

/// The abstract name (without the leading NUL) of the beacon for `server`.
pub fn beacon_name(server: &SocketAddr) -> Vec<u8> {
    format!("libsdp/b/{}", fmt_addr(server)).into_bytes()
}

/// The abstract name of the per-connection endpoint of a client's 4-tuple.
pub fn endpoint_name(client: &SocketAddr, server: &SocketAddr) -> Vec<u8> {
    format!("libsdp/c/{}/{}", fmt_addr(client), fmt_addr(server)).into_bytes()
}

/// Why a same-host SDP rendezvous cannot be used (the caller falls back to TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// Nobody publishes a beacon for the address.
    NoBeacon,
    /// No kernel TCP listener for the address: nothing to authenticate against.
    NoKernelListener,
    /// The beacon's uid does not own the kernel listener (a squatter).
    OwnerMismatch {
        beacon_uid: u32,
    },
    /// The beacon refused (its policy says TCP).
    Declined,
    /// Wrong or missing answer, or a nonce/uid mismatch at the endpoint.
    Protocol(&'static str),
    Timeout,
    Sys(SysError),
}

impl From<SysError> for ProbeError {
    fn from(e: SysError) -> Self {
        ProbeError::Sys(e)
    }
}

/// A client's registered intent: its 4-tuple and the nonce the server must present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intent {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub nonce: [u8; NONCE_LEN],
}

const INTENT_LEN: usize = 2 * 19 + NONCE_LEN;

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a {
        SocketAddr::V4(v) => {
            out.push(4);
            let mut ip = [0u8; 16];
            ip[..4].copy_from_slice(&v.ip().octets());
            out.extend_from_slice(&ip);
        }
        SocketAddr::V6(v) => {
            out.push(6);
            out.extend_from_slice(&v.ip().octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([b[17], b[18]]);
    let ip: IpAddr = match b[0] {
        4 => Ipv4Addr::new(b[1], b[2], b[3], b[4]).into(),
        6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[1..17]);
            Ipv6Addr::from(o).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

impl Intent {
    /// A new intent with a fresh random nonce.
    pub fn new(client: SocketAddr, server: SocketAddr) -> Result<Intent, SysError> {
        let mut nonce = [0u8; NONCE_LEN];
        sys::random_bytes(&mut nonce)?;
        Ok(Intent {
            client,
            server,
            nonce,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(INTENT_LEN);
        put_addr(&mut v, &self.client);
        put_addr(&mut v, &self.server);
        v.extend_from_slice(&self.nonce);
        v
    }

    pub fn decode(b: &[u8]) -> Option<Intent> {
        if b.len() != INTENT_LEN {
            return None;
        }
        let client = get_addr(&b[..19])?;
        let server = get_addr(&b[19..38])?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[38..]);
        Some(Intent {
            client,
            server,
            nonce,
        })
    }
}

fn read_exact_deadline(fd: &Fd, buf: &mut [u8], deadline: Instant) -> Result<(), ProbeError> {
    let mut got = 0;
    let mut fds = Vec::new();
    while got < buf.len() {
        match sys::recv_with_fds(fd, &mut buf[got..], &mut fds) {
            Ok(0) => return Err(ProbeError::Protocol("closed early")),
            Ok(n) => got += n,
            Err(e) if e.errno == libc::EAGAIN => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ProbeError::Timeout);
                }
                match sys::poll_one(
                    fd,
                    libc::POLLIN,
                    left.as_millis().clamp(1, i32::MAX as u128) as i32,
                ) {
                    Ok(_) => {}
                    Err(e) if e.errno == libc::EINTR => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
        if !fds.is_empty() {
            return Err(ProbeError::Protocol("unexpected descriptors"));
        }
    }
    Ok(())
}

fn write_all(fd: &Fd, b: &[u8]) -> Result<(), ProbeError> {
    let n = sys::send_with_fds(fd, b, &[])?;
    if n != b.len() {
        return Err(ProbeError::Protocol("short write"));
    }
    Ok(())
}

/// The uids owning kernel TCP listeners that accept connections to `addr`: a listener on that
/// exact address or on the wildcard of its family (or the IPv6 wildcard, which also takes IPv4
/// unless V6ONLY), read from `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn tcp_listener_uids(addr: &SocketAddr) -> Vec<u32> {
    // The kernel's own answer, listeners only (cheap at any number of connections); procfs
    // where sock_diag is not there.
    if let (Ok(v4), Ok(v6)) = (
        sys::tcp_listeners(libc::AF_INET, addr.port()),
        sys::tcp_listeners(libc::AF_INET6, addr.port()),
    ) {
        return v4
            .into_iter()
            .chain(v6)
            .filter(|&(ip, _)| listener_covers(ip, addr))
            .map(|(_, uid)| uid)
            .collect();
    }
    let mut uids = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        if let Ok(text) = sys::read_small_file(path, 16 << 20) {
            uids.extend(parse_proc_net_tcp(
                &String::from_utf8_lossy(&text),
                v6,
                addr,
            ));
        }
    }
    uids
}

/// Parses a `/proc/net/tcp{,6}` table; returns the uid of each LISTEN row matching `addr`.
pub fn parse_proc_net_tcp(text: &str, v6: bool, addr: &SocketAddr) -> Vec<u32> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 8 || cols[3] != "0A" {
            continue;
        }
        let Some((ip_hex, port_hex)) = cols[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port_hex, 16) else {
            continue;
        };
        if port != addr.port() {
            continue;
        }
        let Some(ip) = parse_hex_ip(ip_hex, v6) else {
            continue;
        };
        if listener_covers(ip, addr)
            && let Ok(uid) = cols[7].parse::<u32>()
        {
            out.push(uid);
        }
    }
    out
}

/// Whether a listener bound to `ip` (on the port of `addr`) takes connections to `addr`.
fn listener_covers(ip: IpAddr, addr: &SocketAddr) -> bool {
    match (ip, addr.ip()) {
        (IpAddr::V4(l), IpAddr::V4(a)) => l.is_unspecified() || l == a,
        (IpAddr::V6(l), IpAddr::V6(a)) => l.is_unspecified() || l == a,
        (IpAddr::V6(l), IpAddr::V4(a)) => l.is_unspecified() || l.to_ipv4_mapped() == Some(a),
        (IpAddr::V4(_), IpAddr::V6(a)) => a.to_ipv4_mapped().is_some_and(|m| ip == IpAddr::V4(m)),
    }
}

/// LINUX: procfs prints addresses as 32-bit words in host byte order.
fn parse_hex_ip(hex: &str, v6: bool) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(|w| w.to_ne_bytes());
    if !v6 {
        if hex.len() != 8 {
            return None;
        }
        let b = word(hex)?;
        Some(Ipv4Addr::from(b).into())
    } else {
        if hex.len() != 32 {
            return None;
        }
        let mut o = [0u8; 16];
        for i in 0..4 {
            o[i * 4..i * 4 + 4].copy_from_slice(&word(&hex[i * 8..i * 8 + 8])?);
        }
        Some(Ipv6Addr::from(o).into())
    }
}

/// A published beacon: a non-blocking abstract listener. Closing it unpublishes.
#[derive(Debug)]
pub struct Beacon {
    fd: Fd,
    addr: SocketAddr,
}

/// A client that reached our beacon.
#[derive(Debug)]
pub struct Visitor {
    stream: Fd,
    cred: PeerCred,
}

impl Beacon {
    /// Publishes the beacon for `addr`. EADDRINUSE: another process already publishes it.
    pub fn publish(addr: SocketAddr) -> Result<Beacon, SysError> {
        let fd = sys::listen_abstract(&beacon_name(&addr), 128)?;
        Ok(Beacon { fd, addr })
    }

    /// The listening fd, for the progress thread's poll set.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.fd.raw()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes one queued client, if any.
    pub fn accept(&self) -> Result<Option<Visitor>, SysError> {
        let Some(stream) = sys::accept(&self.fd)? else {
            return Ok(None);
        };
        let cred = sys::peer_cred(&stream)?;
        Ok(Some(Visitor { stream, cred }))
    }
}

impl Visitor {
    /// The client's credentials, from the kernel.
    pub fn cred(&self) -> PeerCred {
        self.cred
    }

    /// Reads the client's intent and the bytes that follow it (its Offer; empty for a bare
    /// probe) without answering yet: the owner records them (so that its `accept` finds them)
    /// before [`Visitor::reply`] lets the client go on to its TCP connect.
    pub fn read_intent(&self, timeout: Duration) -> Result<(Intent, Vec<u8>), ProbeError> {
        let deadline = Instant::now() + timeout;
        let mut b = [0u8; INTENT_LEN + 2];
        read_exact_deadline(&self.stream, &mut b, deadline)?;
        let intent =
            Intent::decode(&b[..INTENT_LEN]).ok_or(ProbeError::Protocol("malformed intent"))?;
        let n = u16::from_le_bytes([b[INTENT_LEN], b[INTENT_LEN + 1]]) as usize;
        if n > MAX_EXTRA {
            return Err(ProbeError::Protocol("intent extra too long"));
        }
        let mut extra = vec![0u8; n];
        read_exact_deadline(&self.stream, &mut extra, deadline)?;
        Ok((intent, extra))
    }

    /// Answers a read intent (`accept = false`: decline, stay TCP).
    pub fn reply(&self, accept: bool) -> Result<(), ProbeError> {
        write_all(&self.stream, &[if accept { b'Y' } else { b'N' }])
    }

    /// Reads the client's intent and answers it (`accept = false`: decline, stay TCP).
    pub fn answer(self, accept: bool, timeout: Duration) -> Result<Intent, ProbeError> {
        let (intent, _) = self.read_intent(timeout)?;
        self.reply(accept)?;
        Ok(intent)
    }
}

/// What a successful probe learnt about the beacon's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BeaconOwner {
    pub cred: PeerCred,
}

/// Client side of discovery: finds and authenticates the beacon for `intent.server`, then
/// registers `intent`.
pub fn probe(intent: &Intent, timeout: Duration) -> Result<BeaconOwner, ProbeError> {
    probe_with(intent, timeout, &tcp_listener_uids(&intent.server))
}

/// [`probe`] with the kernel listener owners given (tests; callers that already know them).
pub fn probe_with(
    intent: &Intent,
    timeout: Duration,
    listener_uids: &[u32],
) -> Result<BeaconOwner, ProbeError> {
    let link = BeaconLink::open(&intent.server, listener_uids)?;
    link.register(intent, &[])?;
    let (stream, owner) = (link.stream, link.owner);
    let mut a = [0u8; 1];
    read_exact_deadline(&stream, &mut a, Instant::now() + timeout)?;
    match a[0] {
        b'Y' => Ok(owner),
        b'N' => Err(ProbeError::Declined),
        _ => Err(ProbeError::Protocol("bad beacon answer")),
    }
}

/// A client's connection to an authenticated beacon, before it registers its intent.
#[derive(Debug)]
pub struct BeaconLink {
    stream: Fd,
    owner: BeaconOwner,
}

impl BeaconLink {
    /// Connects to the beacon of `server` and authenticates its owner against the kernel
    /// listener's uids. Nothing is sent yet: a caller learns that a beacon is there before it
    /// prepares what it registers.
    pub fn open(server: &SocketAddr, listener_uids: &[u32]) -> Result<BeaconLink, ProbeError> {
        let stream = match sys::connect_abstract(&beacon_name(server)) {
            Ok(s) => s,
            Err(e) if e.errno == libc::ECONNREFUSED || e.errno == libc::ENOENT => {
                return Err(ProbeError::NoBeacon);
            }
            Err(e) => return Err(e.into()),
        };
        let cred = sys::peer_cred(&stream)?;
        if listener_uids.is_empty() {
            return Err(ProbeError::NoKernelListener);
        }
        if !listener_uids.contains(&cred.uid) {
            return Err(ProbeError::OwnerMismatch {
                beacon_uid: cred.uid,
            });
        }
        Ok(BeaconLink {
            stream,
            owner: BeaconOwner { cred },
        })
    }

    /// The authenticated owner.
    pub fn owner(&self) -> BeaconOwner {
        self.owner
    }

    /// Sends `intent` and `extra` (at most [`MAX_EXTRA`] bytes: the client's Offer) in one
    /// write, without waiting for the answer: they are queued on the beacon connection before
    /// the caller's TCP connect, so an accepting owner that drains its beacon before looking
    /// the intent up always finds them. A decline is then not learnt here (the client's
    /// pending exchange times out into TCP).
    pub fn register(&self, intent: &Intent, extra: &[u8]) -> Result<(), ProbeError> {
        if extra.len() > MAX_EXTRA {
            return Err(ProbeError::Protocol("intent extra too long"));
        }
        let mut b = intent.encode();
        b.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        b.extend_from_slice(extra);
        write_all(&self.stream, &b)
    }
}

/// [`BeaconLink::open`] and [`BeaconLink::register`] with nothing after the intent.
pub fn register_intent(intent: &Intent, listener_uids: &[u32]) -> Result<BeaconOwner, ProbeError> {
    let link = BeaconLink::open(&intent.server, listener_uids)?;
    link.register(intent, &[])?;
    Ok(link.owner)
}

/// Whether the client of this 4-tuple bound its endpoint (it is an SDP client whose intent
/// may still be on its way to the beacon). A client binds before its TCP connect, so for a
/// connection already accepted the answer cannot change from "no" to "yes".
pub fn endpoint_exists(client: &SocketAddr, server: &SocketAddr) -> bool {
    sys::abstract_name_taken(&endpoint_name(client, server))
}

/// A client's per-connection endpoint.
#[derive(Debug)]
pub struct Endpoint {
    fd: Fd,
}

impl Endpoint {
    /// Binds the endpoint of `intent`'s 4-tuple (before the TCP connect).
    pub fn bind(intent: &Intent) -> Result<Endpoint, SysError> {
        Ok(Endpoint {
            fd: sys::listen_abstract(&endpoint_name(&intent.client, &intent.server), 4)?,
        })
    }

    /// The listening fd, for the progress thread's poll set.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.fd.raw()
    }

    /// Waits for the server: a connection presenting `intent.nonce`. Impostors (a wrong
    /// nonce, or none within half a second) are dropped and waiting goes on until `timeout`.
    ///
    /// The uid behind the connection is not checked: the nonce reached only the beacon, whose
    /// owner the probe authenticated, and the processes that own the listener with it. A
    /// prefork server's worker that accepts may run as another uid than the master that
    /// listened (nginx and apache masters run as root, their workers as `nobody`; the master
    /// may even have exited after daemonizing), and it holds the nonce through the intent
    /// table the master shared with it.
    pub fn accept(&self, intent: &Intent, timeout: Duration) -> Result<(Fd, PeerCred), ProbeError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(stream) = sys::accept(&self.fd)? {
                let cred = sys::peer_cred(&stream)?;
                let mut n = [0u8; NONCE_LEN];
                let per_try = deadline.min(Instant::now() + Duration::from_millis(500));
                if read_exact_deadline(&stream, &mut n, per_try).is_ok() {
                    if n == intent.nonce {
                        return Ok((stream, cred));
                    }
                    if n == DECLINE {
                        return Err(ProbeError::Declined);
                    }
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ProbeError::Timeout);
            }
            match sys::poll_one(
                &self.fd,
                libc::POLLIN,
                left.as_millis().clamp(1, i32::MAX as u128) as i32,
            ) {
                Ok(_) => {}
                Err(e) if e.errno == libc::EINTR => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What a server process sends to a client's endpoint, instead of the nonce, when it accepted
/// the connection but holds no intent for it: the kernel gave it to another process than the
/// one whose beacon took the intent (unrelated processes listening on one port with
/// SO_REUSEPORT). The client goes back to TCP at once instead of waiting its pending timeout
/// (2 s) for an exchange that nobody will make. Anyone on the host could send it; all it can
/// do is keep a connection on the kernel TCP it already has.
const DECLINE: [u8; NONCE_LEN] = *b"libsdp:no-intent";

/// Server side at `accept`, for a connection it holds no intent for: if an SDP client waits
/// at the connection's endpoint, tells it to keep TCP. `true`: an endpoint was told.
pub fn decline_endpoint(client: &SocketAddr, server: &SocketAddr) -> bool {
    match sys::connect_abstract(&endpoint_name(client, server)) {
        Ok(stream) => write_all(&stream, &DECLINE).is_ok(),
        Err(_) => false,
    }
}

/// Server side at `accept`: connects to the client's endpoint, checks that its owner is the
/// uid that registered `intent` at the beacon, and presents the nonce.
pub fn connect_endpoint(intent: &Intent, client_uid: u32) -> Result<(Fd, PeerCred), ProbeError> {
    let stream = match sys::connect_abstract(&endpoint_name(&intent.client, &intent.server)) {
        Ok(s) => s,
        Err(e) if e.errno == libc::ECONNREFUSED || e.errno == libc::ENOENT => {
            return Err(ProbeError::Protocol("no endpoint"));
        }
        Err(e) => return Err(e.into()),
    };
    let cred = sys::peer_cred(&stream)?;
    if cred.uid != client_uid {
        return Err(ProbeError::Protocol("endpoint owned by another uid"));
    }
    write_all(&stream, &intent.nonce)?;
    Ok((stream, cred))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_roundtrip_v4_v6_and_garbage_rejected() {
        let i = Intent {
            client: "10.1.2.3:40000".parse().unwrap(),
            server: "[fe80::1]:5001".parse().unwrap(),
            nonce: [7; NONCE_LEN],
        };
        assert_eq!(Intent::decode(&i.encode()), Some(i));
        let mut bad = i.encode();
        bad[0] = 9;
        assert_eq!(Intent::decode(&bad), None);
        assert_eq!(Intent::decode(&bad[..10]), None);
    }

    #[test]
    fn proc_net_tcp_listener_rows_matched() {
        let t4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1\n\
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: 0100007F:0050 0100007F:9999 01 00000000:00000000 00:00000000 00000000    33        0 3 1\n";
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(parse_proc_net_tcp(t4, false, &a), vec![1000]);
        let b: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(parse_proc_net_tcp(t4, false, &b), vec![0]);
        let t6 = "hdr\n   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 0 0 0 42 0 5\n";
        assert_eq!(parse_proc_net_tcp(t6, true, &b), vec![42]);
        assert_eq!(beacon_name(&b), b"libsdp/b/127.0.0.1:80".to_vec());
    }

    #[test]
    fn sock_diag_listeners_agree_with_procfs() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let v4 = sys::tcp_listeners(libc::AF_INET, addr.port()).expect("sock_diag");
        assert_eq!(v4, vec![(addr.ip(), sys::getuid())]);
        let mut procfs = Vec::new();
        for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
            let text = sys::read_small_file(path, 16 << 20).unwrap();
            procfs.extend(parse_proc_net_tcp(
                &String::from_utf8_lossy(&text),
                v6,
                &addr,
            ));
        }
        assert_eq!(tcp_listener_uids(&addr), procfs);
        drop(l);
        assert!(tcp_listener_uids(&addr).is_empty());
    }
}
