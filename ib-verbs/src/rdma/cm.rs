//! Connection setup with rdma_cm (librdmacm, `dlopen`ed on first use): the RDMA_PS_TCP port
//! space, addressed by IP and port like TCP, with our parameters and the opaque hello bytes in
//! the REQ / REP private data.
//!
//! The QP is ours (created on the process's [`Device`], not by `rdma_create_qp`): rdma_cm
//! only resolves the route and runs the CM exchange, and `rdma_init_qp_attr` gives the RTR /
//! RTS attributes (path, PSNs, read depths) that we apply to our QP. So the active side sees
//! `CONNECT_RESPONSE` (not `ESTABLISHED`) and sends the RTU itself with `rdma_establish` after
//! moving its QP to RTS; the passive side waits for `ESTABLISHED` before using the QP. The id
//! stays with the connection: a `DISCONNECTED` event on its channel is the peer's end.
//!
//! Private data (little-endian), after which come the hello bytes:
//! ```text
//! 0 magic "SDPc" | 4 version u8 | 5 flags u8 (bit 0: peer may read me) | 6 hello_len u8 | 7 rsvd
//! 8 recv_buf_size u32 | 12 recv_depth u32 | 16 initial_posts u32          (20 bytes)
//! ```
//! A REQ carries at most 56 bytes of private data in RDMA_PS_TCP (so a hello of ≤ 36 bytes);
//! a REP at most 196 (hello ≤ 176).

use std::ffi::{CStr, c_int, c_void};
use std::net::SocketAddr;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bindings as b;
use super::conn::{EndpointInfo, Pending, RdmaConn, RdmaOptions, Watch};
use super::device::Device;
use super::dl::{self, Cm};
use super::{SetupError, Unavailable};
use crate::sys::SysError;

const MAGIC: &[u8; 4] = b"SDPc";
const VERSION: u8 = 1;
const HEADER: usize = 20;
/// Private data limits of RDMA_PS_TCP (IB CM REQ 92 / REP 196 bytes minus the 36-byte
/// rdma_cm header in a REQ).
pub const MAX_REQ_HELLO: usize = 56 - HEADER;
pub const MAX_REP_HELLO: usize = 196 - HEADER;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn cm() -> Result<&'static Cm, SetupError> {
    dl::cm().map_err(|e| SetupError::Unavailable(Unavailable::Library(e)))
}

fn check(op: &'static str, rc: c_int) -> Result<(), SetupError> {
    if rc != 0 {
        return Err(SetupError::Verbs { op, errno: errno() });
    }
    Ok(())
}

/// An event channel plus one id on it; destroyed together (id first).
pub(crate) struct CmId {
    cm: &'static Cm,
    ch: *mut b::rdma_event_channel,
    id: *mut b::rdma_cm_id,
    ended: bool,
    connected: bool,
}

// SAFETY: librdmacm objects may be used from any thread; one owner at a time.
unsafe impl Send for CmId {}

impl CmId {
    fn new_channel(cm: &'static Cm) -> Result<*mut b::rdma_event_channel, SetupError> {
        // SAFETY: no arguments; NULL on failure.
        let ch = unsafe { (cm.rdma_create_event_channel)() };
        if ch.is_null() {
            let e = errno();
            return Err(match e {
                libc::ENODEV | libc::ENOSYS | libc::ENOENT => SetupError::Unavailable(
                    Unavailable::NoDevice(format!("rdma_create_event_channel: errno {e}")),
                ),
                _ => SetupError::Verbs {
                    op: "rdma_create_event_channel",
                    errno: e,
                },
            });
        }
        // SAFETY: a live channel; its fd is ours to make non-blocking.
        set_nonblock(unsafe { (*ch).fd })?;
        Ok(ch)
    }

    fn create() -> Result<CmId, SetupError> {
        let cm = cm()?;
        let ch = CmId::new_channel(cm)?;
        let mut id = ptr::null_mut();
        // SAFETY: live channel, output pointer.
        let rc = unsafe {
            (cm.rdma_create_id)(
                ch,
                &mut id,
                ptr::null_mut(),
                b::rdma_port_space::RDMA_PS_TCP,
            )
        };
        if rc != 0 {
            let e = errno();
            // SAFETY: the channel has no id.
            unsafe { (cm.rdma_destroy_event_channel)(ch) };
            return Err(SetupError::Verbs {
                op: "rdma_create_id",
                errno: e,
            });
        }
        Ok(CmId {
            cm,
            ch,
            id,
            ended: false,
            connected: false,
        })
    }

    pub(crate) fn fd(&self) -> i32 {
        // SAFETY: a live channel.
        unsafe { (*self.ch).fd }
    }

    /// Waits for the next event on our channel; `f` sees it before it is acknowledged.
    fn next_event<T>(
        &self,
        deadline: Instant,
        f: impl FnOnce(&b::rdma_cm_event) -> T,
    ) -> Result<T, SetupError> {
        loop {
            let mut ev = ptr::null_mut();
            // SAFETY: live non-blocking channel, output pointer.
            if unsafe { (self.cm.rdma_get_cm_event)(self.ch, &mut ev) } == 0 {
                // SAFETY: a returned event is valid until acknowledged.
                let out = f(unsafe { &*ev });
                // SAFETY: acknowledged once.
                unsafe { (self.cm.rdma_ack_cm_event)(ev) };
                return Ok(out);
            }
            let e = errno();
            if e != libc::EAGAIN && e != libc::EINTR {
                return Err(SetupError::Verbs {
                    op: "rdma_get_cm_event",
                    errno: e,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SetupError::Timeout);
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            match crate::sys::poll_raw(self.fd(), libc::POLLIN, ms) {
                Ok(_) => {}
                Err(e) if e.errno == libc::EINTR => {}
                Err(e) => return Err(SetupError::Sys(e)),
            }
        }
    }

    /// Waits for an event of type `want`; any other is an error named after it.
    fn expect(&self, want: u32, deadline: Instant) -> Result<(), SetupError> {
        let got = self.next_event(deadline, |ev| (ev.event, ev.status))?;
        if got.0 != want {
            return Err(event_error(got.0, got.1));
        }
        Ok(())
    }

    /// Whether the peer disconnected (drains pending events without blocking; sticky).
    pub(crate) fn disconnected(&mut self) -> bool {
        while !self.ended {
            let mut ev = ptr::null_mut();
            // SAFETY: live non-blocking channel.
            if unsafe { (self.cm.rdma_get_cm_event)(self.ch, &mut ev) } != 0 {
                break;
            }
            // SAFETY: valid until acknowledged just below.
            let t = unsafe { (*ev).event };
            // SAFETY: acknowledged once.
            unsafe { (self.cm.rdma_ack_cm_event)(ev) };
            use b::rdma_cm_event_type::*;
            if matches!(
                t,
                RDMA_CM_EVENT_DISCONNECTED
                    | RDMA_CM_EVENT_DEVICE_REMOVAL
                    | RDMA_CM_EVENT_TIMEWAIT_EXIT
            ) {
                self.ended = true;
            }
        }
        self.ended
    }

    /// The device under this id (resolved address or incoming request), as our [`Device`].
    fn device(&self) -> Result<Arc<Device>, SetupError> {
        // SAFETY: a live id; `verbs` is set once the address is bound to a device.
        let verbs = unsafe { (*self.id).verbs };
        if verbs.is_null() {
            return Err(SetupError::Unavailable(Unavailable::NoDevice(
                "rdma_cm bound no device".into(),
            )));
        }
        let v = dl::verbs().map_err(|e| SetupError::Unavailable(Unavailable::Library(e)))?;
        // SAFETY: a live context's device and its NUL-terminated name.
        let name = unsafe { CStr::from_ptr((v.ibv_get_device_name)((*verbs).device)) }
            .to_string_lossy()
            .into_owned();
        Device::get_named(Some(&name)).map_err(SetupError::Unavailable)
    }

    /// The RTR and RTS attributes rdma_cm computed for this id's connection, with the read
    /// depth negotiated in the REQ/REP (`rd`: responder resources for RTR, initiator depth for
    /// RTS), which the kernel does not know for a QP it did not create (librdmacm sets them
    /// the same way for its own QPs).
    fn qp_attrs(&self, state: u32, rd: u8) -> Result<(b::ibv_qp_attr, u32), SetupError> {
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: b::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = state;
        let mut mask: c_int = 0;
        // SAFETY: live id, output buffers.
        check("rdma_init_qp_attr", unsafe {
            (self.cm.rdma_init_qp_attr)(self.id, &mut a, &mut mask)
        })?;
        let mut mask = mask as u32;
        if state == b::ibv_qp_state::IBV_QPS_RTR {
            a.max_dest_rd_atomic = rd.max(1);
            mask |= b::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC;
        }
        if state == b::ibv_qp_state::IBV_QPS_RTS {
            a.max_rd_atomic = rd.max(1);
            mask |= b::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
            // Software RoCE under emulation is slow: rdma_cm's default ACK timeout would
            // retransmit needlessly. RNR retry stays infinite (SDP credits are the flow control).
            a.timeout = a.timeout.max(18);
            a.rnr_retry = 7;
            mask |= b::ibv_qp_attr_mask::IBV_QP_TIMEOUT | b::ibv_qp_attr_mask::IBV_QP_RNR_RETRY;
        }
        Ok((a, mask))
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: our id and channel, destroyed once, id first (it has no QP attached).
        unsafe {
            if self.connected && !self.ended {
                (self.cm.rdma_disconnect)(self.id);
            }
            (self.cm.rdma_destroy_id)(self.id);
            (self.cm.rdma_destroy_event_channel)(self.ch);
        }
    }
}

fn event_error(t: u32, status: c_int) -> SetupError {
    use b::rdma_cm_event_type::*;
    match t {
        RDMA_CM_EVENT_REJECTED => SetupError::Peer("connection rejected"),
        RDMA_CM_EVENT_ADDR_ERROR
        | RDMA_CM_EVENT_ROUTE_ERROR
        | RDMA_CM_EVENT_UNREACHABLE
        | RDMA_CM_EVENT_CONNECT_ERROR => SetupError::Verbs {
            op: "rdma_cm",
            errno: status.unsigned_abs() as i32,
        },
        RDMA_CM_EVENT_DEVICE_REMOVAL => {
            SetupError::Unavailable(Unavailable::NoDevice("device removed".into()))
        }
        _ => SetupError::Peer("unexpected rdma_cm event"),
    }
}

fn set_nonblock(fd: i32) -> Result<(), SetupError> {
    // SAFETY: fcntl with integer arguments on an fd we own.
    let fl = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0
        || unsafe {
            libc::syscall(
                libc::SYS_fcntl,
                fd,
                libc::F_SETFL,
                fl | libc::O_NONBLOCK as i64,
            )
        } < 0
    {
        return Err(SetupError::Sys(SysError {
            op: "fcntl",
            errno: errno(),
        }));
    }
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            (ss, size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            (ss, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// Our private data.
fn encode(p: &Pending, hello: &[u8], max_hello: usize) -> Result<Vec<u8>, SetupError> {
    if hello.len() > max_hello {
        return Err(SetupError::BadOptions(
            "hello too long for rdma_cm private data",
        ));
    }
    let i = p.local_info();
    let mut v = Vec::with_capacity(HEADER + hello.len());
    v.extend_from_slice(MAGIC);
    v.push(VERSION);
    v.push(i.peer_may_read as u8);
    v.push(hello.len() as u8);
    v.push(0);
    v.extend_from_slice(&i.recv_buf_size.to_le_bytes());
    v.extend_from_slice(&i.recv_depth.to_le_bytes());
    v.extend_from_slice(&i.initial_posts.to_le_bytes());
    v.extend_from_slice(hello);
    Ok(v)
}

/// The peer's private data: its receive sizes (in an [`EndpointInfo`] whose QP fields are
/// unused: rdma_cm carries those) and its hello.
pub fn decode(d: &[u8]) -> Result<(EndpointInfo, Vec<u8>), SetupError> {
    if d.len() < HEADER || &d[0..4] != MAGIC {
        return Err(SetupError::Peer("not SDP rdma_cm private data"));
    }
    if d[4] != VERSION {
        return Err(SetupError::Peer("unsupported private data version"));
    }
    let hello_len = d[6] as usize;
    if HEADER + hello_len > d.len() {
        return Err(SetupError::Peer("hello longer than the private data"));
    }
    let u32_at = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().expect("4 bytes"));
    let info = EndpointInfo {
        qpn: 0,
        psn: 0,
        lid: 0,
        gid: [0; 16],
        mtu: 0,
        recv_buf_size: u32_at(8),
        recv_depth: u32_at(12),
        initial_posts: u32_at(16),
        responder_resources: 0,
        peer_may_read: d[5] & 1 != 0,
    };
    if info.recv_buf_size == 0 || info.recv_depth == 0 || info.initial_posts > info.recv_depth {
        return Err(SetupError::Peer("bad receive sizes"));
    }
    Ok((info, d[HEADER..HEADER + hello_len].to_vec()))
}

/// The private data of a REJECT that sends the client elsewhere: magic, version, port (LE).
const REDIRECT_MAGIC: [u8; 4] = *b"SDPr";

fn redirect_record(port: u16) -> [u8; 7] {
    let p = port.to_le_bytes();
    let m = REDIRECT_MAGIC;
    [m[0], m[1], m[2], m[3], VERSION, p[0], p[1]]
}

/// The capability record of a REJECT from a libsdp listener that refuses this request (it
/// expired, or was malformed): the peer runs libsdp there, this connection goes on over TCP.
/// A REJECT without it comes from the kernel's CM: no libsdp listener on that port.
const CAPABILITY_MAGIC: [u8; 4] = *b"SDPc";

fn capability_record() -> [u8; 5] {
    let m = CAPABILITY_MAGIC;
    [m[0], m[1], m[2], m[3], VERSION]
}

fn capability_of(d: &[u8]) -> bool {
    d.len() >= 5 && d[..4] == CAPABILITY_MAGIC && d[4] == VERSION
}

/// The port of a redirect record (a REJECT's private data may be padded with zeros).
fn redirect_of(d: &[u8]) -> Option<u16> {
    if d.len() < 7 || d[..4] != REDIRECT_MAGIC || d[4] != VERSION {
        return None;
    }
    Some(u16::from_le_bytes([d[5], d[6]])).filter(|&p| p != 0)
}

fn private(ev: &b::rdma_cm_event) -> Vec<u8> {
    // SAFETY: for connection events the `conn` member is the active one; its private data
    // (pointer, length) is valid until the event is acknowledged, and is copied out here.
    unsafe {
        let c = ev.param.conn;
        if c.private_data.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(c.private_data.cast::<u8>(), c.private_data_len as usize)
                .to_vec()
        }
    }
}

fn conn_param(dev: &Device, pd: &[u8], qpn: u32) -> b::rdma_conn_param {
    let lim = dev.limits();
    b::rdma_conn_param {
        private_data: pd.as_ptr().cast::<c_void>(),
        private_data_len: pd.len() as u8,
        responder_resources: lim.max_qp_rd_atom.clamp(1, 16) as u8,
        initiator_depth: lim.max_qp_init_rd_atom.clamp(1, 16) as u8,
        flow_control: 0,
        // MLNX's value (SDP-WIRE.md §2.1). Not 7: soft-RoCE treats a retry count of 7 as
        // "retry forever" (hardware does not), so a peer that vanished would never show as
        // retry exceeded there, and the keepalive probe (§5.4) could not find it.
        retry_count: 5,
        rnr_retry_count: 7,
        srq: 0,
        qp_num: qpn,
    }
}

/// Connects to `addr` (an IP of an RDMA device; rdma_cm does not work on `lo`). `posts`
/// receives are posted before the REQ (the peer's first credits); `hello` ≤ [`MAX_REQ_HELLO`].
pub fn connect(
    addr: SocketAddr,
    opts: RdmaOptions,
    posts: u32,
    hello: &[u8],
    timeout: Duration,
) -> Result<(RdmaConn, Vec<u8>), SetupError> {
    let deadline = Instant::now() + timeout;
    let mut c = Connecting::resolve(addr, timeout)?;
    c.request(opts, posts, hello)?;
    while !c.poll()? {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SetupError::Timeout);
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        match crate::sys::poll_raw(c.fd(), libc::POLLIN, ms) {
            Ok(_) => {}
            Err(e) if e.errno == libc::EINTR => {}
            Err(e) => return Err(SetupError::Sys(e)),
        }
    }
    c.finish()
}

/// An active setup in steps, for a caller that must not block while the peer decides (`ops`:
/// the REP comes only when the server application accepts): [`Connecting::resolve`] (address
/// and route, blocking up to its timeout), [`Connecting::request`] (QP, receives, REQ), then
/// [`Connecting::poll`] whenever [`Connecting::fd`] is readable until it says the REP arrived,
/// then [`Connecting::finish`] (RTR, RTS, RTU). Dropping it abandons the setup (the kernel
/// rejects or disconnects for us).
pub struct Connecting {
    id: CmId,
    p: Option<Pending>,
    dev: Option<Arc<Device>>,
    /// Our responder resources and initiator depth, as sent in the REQ.
    rd: (u8, u8),
    /// The REP's private data and responder resources.
    rep: Option<(Vec<u8>, u8)>,
}

impl Connecting {
    /// Resolves the address and route of `addr` (blocking, at most `timeout`).
    pub fn resolve(addr: SocketAddr, timeout: Duration) -> Result<Connecting, SetupError> {
        let deadline = Instant::now() + timeout;
        let id = CmId::create()?;
        let (mut dst, _) = sockaddr(addr);
        let ms = timeout.as_millis().clamp(1, 60_000) as c_int;
        // SAFETY: live id; the destination address outlives the call.
        check("rdma_resolve_addr", unsafe {
            (id.cm.rdma_resolve_addr)(
                id.id,
                ptr::null_mut(),
                (&mut dst as *mut libc::sockaddr_storage).cast(),
                ms,
            )
        })?;
        id.expect(b::rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED, deadline)?;
        // SAFETY: live id with a resolved address.
        check("rdma_resolve_route", unsafe {
            (id.cm.rdma_resolve_route)(id.id, ms)
        })?;
        id.expect(
            b::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
            deadline,
        )?;
        Ok(Connecting {
            id,
            p: None,
            dev: None,
            rd: (0, 0),
            rep: None,
        })
    }

    /// The local address rdma_cm chose for the route (the source IP on the device).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: a live id whose address is resolved; the union is read as bytes.
        unsafe { addr_at((&raw const (*self.id.id).route.addr.__bindgen_anon_1).cast()) }
    }

    /// Creates our QP, posts `posts` receives and sends the REQ with `hello`
    /// (≤ [`MAX_REQ_HELLO`]).
    pub fn request(
        &mut self,
        opts: RdmaOptions,
        posts: u32,
        hello: &[u8],
    ) -> Result<(), SetupError> {
        let dev = self.id.device()?;
        let mut p = Pending::on(dev.clone(), opts)?;
        for w in 0..posts as u64 {
            p.post_recv(w)
                .map_err(|_| SetupError::BadOptions("more initial posts than recv_depth"))?;
        }
        let pd = encode(&p, hello, MAX_REQ_HELLO)?;
        let mut param = conn_param(&dev, &pd, p.qp_num());
        // SAFETY: live id; `param` and the private data it points to outlive the call.
        check("rdma_connect", unsafe {
            (self.id.cm.rdma_connect)(self.id.id, &mut param)
        })?;
        self.rd = (param.responder_resources, param.initiator_depth);
        self.p = Some(p);
        self.dev = Some(dev);
        Ok(())
    }

    /// The event channel's descriptor (readable when the REP, a REJECT or an error came).
    pub fn fd(&self) -> i32 {
        self.id.fd()
    }

    /// Takes the next event without blocking: `Ok(true)` once the REP arrived (call
    /// [`Connecting::finish`]), `Ok(false)` when nothing came yet, an error for a REJECT
    /// (no listener there, or the peer refused), an unreachable peer or a CM timeout.
    pub fn poll(&mut self) -> Result<bool, SetupError> {
        if self.rep.is_some() {
            return Ok(true);
        }
        let r = self.id.next_event(Instant::now(), |ev| {
            // SAFETY: a connection event's `conn` member is the active one.
            let resp = unsafe { ev.param.conn.responder_resources };
            (ev.event, ev.status, private(ev), resp)
        });
        let (t, status, data, resp) = match r {
            Ok(x) => x,
            Err(SetupError::Timeout) => return Ok(false),
            Err(e) => return Err(e),
        };
        if t == b::rdma_cm_event_type::RDMA_CM_EVENT_REJECTED {
            if let Some(port) = redirect_of(&data) {
                return Err(SetupError::Redirect(port));
            }
            if capability_of(&data) {
                return Err(SetupError::Refused);
            }
        }
        if t != b::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_RESPONSE {
            return Err(event_error(t, status));
        }
        self.id.connected = true;
        self.rep = Some((data, resp));
        Ok(true)
    }

    /// After the REP: our QP to RTR and RTS, the RTU; the connection and the peer's hello.
    pub fn finish(mut self) -> Result<(RdmaConn, Vec<u8>), SetupError> {
        let (Some((data, peer_resp)), Some(p)) = (self.rep.take(), self.p.take()) else {
            return Err(SetupError::Peer("finish before the REP"));
        };
        let (peer, peer_hello) = decode(&data)?;
        let rtr = self.id.qp_attrs(b::ibv_qp_state::IBV_QPS_RTR, self.rd.0)?;
        let rts = self.id.qp_attrs(
            b::ibv_qp_state::IBV_QPS_RTS,
            self.rd.1.min(peer_resp.max(1)),
        )?;
        let cm = self.id.cm;
        let raw = self.id.id;
        let conn = p.finish(&peer, rtr, rts, Watch::Cm(self.id))?;
        // SAFETY: the id lives in the connection; RTU after our QP is in RTS.
        check("rdma_establish", unsafe { (cm.rdma_establish)(raw) })?;
        Ok((conn, peer_hello))
    }
}

/// A `sockaddr_in` / `sockaddr_in6` at `p` (as rdma_cm stores them), if it is one.
///
/// # Safety
/// `p` must point to at least a `sockaddr_storage`'s worth of readable bytes.
unsafe fn addr_at(p: *const u8) -> Option<SocketAddr> {
    // SAFETY: the caller guarantees the bytes are readable.
    let b = unsafe { std::slice::from_raw_parts(p, 28) };
    let family = u16::from_ne_bytes([b[0], b[1]]) as i32;
    let port = u16::from_be_bytes([b[2], b[3]]);
    match family {
        libc::AF_INET => Some(SocketAddr::new(
            std::net::Ipv4Addr::new(b[4], b[5], b[6], b[7]).into(),
            port,
        )),
        libc::AF_INET6 => {
            let o: [u8; 16] = b[8..24].try_into().expect("16 bytes");
            Some(SocketAddr::new(std::net::Ipv6Addr::from(o).into(), port))
        }
        _ => None,
    }
}

/// A listening rdma_cm id.
pub struct Listener {
    id: CmId,
}

/// An incoming connection request, to accept or reject.
pub struct Request {
    cm: &'static Cm,
    child: *mut b::rdma_cm_id,
    peer: EndpointInfo,
    hello: Vec<u8>,
    initiator_depth: u8,
    responder_resources: u8,
}

// SAFETY: as CmId.
unsafe impl Send for Request {}

impl Listener {
    /// Listens on `addr` (port 0: any free port, see [`Listener::port`]).
    pub fn bind(addr: SocketAddr, backlog: i32) -> Result<Listener, SetupError> {
        let id = CmId::create()?;
        let (mut sa, _) = sockaddr(addr);
        // SAFETY: live id; the address outlives the call.
        check("rdma_bind_addr", unsafe {
            (id.cm.rdma_bind_addr)(id.id, (&mut sa as *mut libc::sockaddr_storage).cast())
        })?;
        // SAFETY: a bound id.
        check("rdma_listen", unsafe {
            (id.cm.rdma_listen)(id.id, backlog)
        })?;
        Ok(Listener { id })
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        // SAFETY: a bound id; the port comes back in network order.
        u16::from_be(unsafe { (self.id.cm.rdma_get_src_port)(self.id.id) })
    }

    /// The event channel's descriptor (readable when a request may be waiting).
    pub fn fd(&self) -> i32 {
        self.id.fd()
    }

    /// The next connection request if one is waiting (never blocks). A malformed request is
    /// rejected and reported as an error; call again for the next.
    pub fn try_request(&self) -> Result<Option<Request>, SetupError> {
        match self.request(Duration::ZERO) {
            Ok(r) => Ok(Some(r)),
            Err(SetupError::Timeout) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits for the next connection request.
    pub fn request(&self, timeout: Duration) -> Result<Request, SetupError> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.id.next_event(deadline, |ev| {
                if ev.event != b::rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST {
                    return None;
                }
                // SAFETY: a CONNECT_REQUEST's `conn` member is the active one.
                let c = unsafe { ev.param.conn };
                Some((ev.id, private(ev), c.initiator_depth, c.responder_resources))
            })?;
            let Some((child, data, initiator_depth, responder_resources)) = r else {
                continue;
            };
            return match decode(&data) {
                Ok((peer, hello)) => Ok(Request {
                    cm: self.id.cm,
                    child,
                    peer,
                    hello,
                    initiator_depth,
                    responder_resources,
                }),
                Err(e) => {
                    let pd = capability_record();
                    // SAFETY: an unanswered request id: reject and destroy it; the private
                    // data outlives the call.
                    unsafe {
                        (self.id.cm.rdma_reject)(child, pd.as_ptr().cast(), pd.len() as u8);
                        (self.id.cm.rdma_destroy_id)(child);
                    }
                    Err(e)
                }
            };
        }
    }
}

impl Request {
    /// The peer's hello bytes.
    pub fn hello(&self) -> &[u8] {
        &self.hello
    }

    /// The address the request came from.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: a live request id; its route's destination is the requesting peer.
        unsafe { addr_at((&raw const (*self.child).route.addr.__bindgen_anon_2).cast()) }
    }

    /// Accepts: our QP, `posts` initial receives, `hello` (≤ [`MAX_REP_HELLO`]) in the REP;
    /// returns once the peer's RTU arrived (ESTABLISHED).
    pub fn accept(
        mut self,
        opts: RdmaOptions,
        posts: u32,
        hello: &[u8],
        timeout: Duration,
    ) -> Result<RdmaConn, SetupError> {
        let deadline = Instant::now() + timeout;
        let cm = self.cm;
        // The connection gets its own channel, so that its DISCONNECTED event is its own.
        let ch = CmId::new_channel(cm)?; // on failure, Drop rejects the request
        let child = std::mem::replace(&mut self.child, ptr::null_mut());
        // SAFETY: a live request id moved to a live channel.
        if unsafe { (cm.rdma_migrate_id)(child, ch) } != 0 {
            let e = errno();
            let pd = capability_record();
            // SAFETY: the channel is empty; the request id is still ours; the private data
            // outlives the call.
            unsafe {
                (cm.rdma_destroy_event_channel)(ch);
                (cm.rdma_reject)(child, pd.as_ptr().cast(), pd.len() as u8);
                (cm.rdma_destroy_id)(child);
            }
            return Err(SetupError::Verbs {
                op: "rdma_migrate_id",
                errno: e,
            });
        }
        let mut id = CmId {
            cm,
            ch,
            id: child,
            ended: false,
            connected: false,
        };
        // Any failure before our REP (resources this process cannot have: no locked memory
        // left for the registrations, no queue pair) refuses with the capability record, so
        // that the client records `setup-failed` (libsdp is here) instead of taking the REJECT
        // for a host without libsdp's and caching that.
        let refuse = |id: &CmId, e: SetupError| {
            let pd = capability_record();
            // SAFETY: a live, unanswered request id; the private data outlives the call.
            unsafe { (cm.rdma_reject)(id.id, pd.as_ptr().cast(), pd.len() as u8) };
            e
        };
        let dev = id.device().map_err(|e| refuse(&id, e))?;
        let mut p = Pending::on(dev.clone(), opts).map_err(|e| refuse(&id, e))?;
        for w in 0..posts as u64 {
            p.post_recv(w).map_err(|_| {
                refuse(
                    &id,
                    SetupError::BadOptions("more initial posts than recv_depth"),
                )
            })?;
        }
        let pd = encode(&p, hello, MAX_REP_HELLO).map_err(|e| refuse(&id, e))?;
        let mut param = conn_param(&dev, &pd, p.qp_num());
        param.responder_resources = param.responder_resources.min(self.initiator_depth.max(1));
        param.initiator_depth = param.initiator_depth.min(self.responder_resources.max(1));
        let rtr = id
            .qp_attrs(b::ibv_qp_state::IBV_QPS_RTR, param.responder_resources)
            .map_err(|e| refuse(&id, e))?;
        let rts = id
            .qp_attrs(b::ibv_qp_state::IBV_QPS_RTS, param.initiator_depth)
            .map_err(|e| refuse(&id, e))?;
        let raw = id.id;
        // Our QP must be able to receive before the REP leaves: RTR/RTS first, then accept.
        let pending_conn = p
            .finish(&self.peer, rtr, rts, Watch::None)
            .map_err(|e| refuse(&id, e))?;
        // SAFETY: live request id; `param` and its private data outlive the call.
        check("rdma_accept", unsafe { (cm.rdma_accept)(raw, &mut param) })?;
        id.connected = true;
        id.expect(b::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED, deadline)?;
        pending_conn
            .with_watch(Watch::Cm(id))
            .map_err(SetupError::Sys)
    }

    /// Refuses the request (the peer sees REJECTED).
    pub fn reject(self) {
        drop(self); // Drop rejects
    }

    /// Refuses the request with a redirect: the peer's [`Connecting::poll`] reports
    /// [`SetupError::Redirect`] with `port` (the rdma_cm port, on the same address, of the
    /// process that accepted the peer's TCP connection).
    pub fn redirect(mut self, port: u16) {
        let pd = redirect_record(port);
        // SAFETY: a live, unanswered request id, destroyed once; the private data outlives
        // the call.
        unsafe {
            (self.cm.rdma_reject)(self.child, pd.as_ptr().cast(), pd.len() as u8);
            (self.cm.rdma_destroy_id)(self.child);
        }
        self.child = ptr::null_mut();
    }
}

impl Drop for Request {
    /// A request neither accepted nor rejected is rejected (the peer sees REJECTED at once
    /// instead of waiting for its CM timeout).
    fn drop(&mut self) {
        if self.child.is_null() {
            return;
        }
        let pd = capability_record();
        // SAFETY: a live, unanswered request id (accept takes it out), destroyed once; the
        // private data outlives the call.
        unsafe {
            (self.cm.rdma_reject)(self.child, pd.as_ptr().cast(), pd.len() as u8);
            (self.cm.rdma_destroy_id)(self.child);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_records_round_trip_and_others_are_not_redirects() {
        let mut r = redirect_record(40123).to_vec();
        assert_eq!(redirect_of(&r), Some(40123));
        r.resize(148, 0); // as an IB CM REJ pads it
        assert_eq!(redirect_of(&r), Some(40123));
        assert_eq!(redirect_of(&redirect_record(0)), None);
        assert_eq!(redirect_of(&[]), None);
        assert_eq!(redirect_of(&r[..6]), None);
        let mut other = r.clone();
        other[4] = VERSION.wrapping_add(1);
        assert_eq!(redirect_of(&other), None);
        let mut c = capability_record().to_vec();
        assert!(capability_of(&c) && redirect_of(&c).is_none() && !capability_of(&r));
        c.resize(148, 0);
        assert!(capability_of(&c));
        assert!(!capability_of(&[0; 148]));
        other = r.clone();
        other[0] = b'X';
        assert_eq!(redirect_of(&other), None);
    }

    #[test]
    fn private_data_hostile_fields_are_refused() {
        let mut d = Vec::from(&MAGIC[..]);
        d.extend_from_slice(&[VERSION, 1, 3, 0]);
        d.extend_from_slice(&65536u32.to_le_bytes());
        d.extend_from_slice(&8u32.to_le_bytes());
        d.extend_from_slice(&8u32.to_le_bytes());
        d.extend_from_slice(b"abc");
        let (i, h) = decode(&d).unwrap();
        assert_eq!(
            (
                i.recv_buf_size,
                i.recv_depth,
                i.initial_posts,
                i.peer_may_read
            ),
            (65536, 8, 8, true)
        );
        assert_eq!(h, b"abc");
        let mut long = d.clone();
        long[6] = 4;
        assert!(decode(&long).is_err(), "hello past the end");
        let mut posts = d.clone();
        posts[16] = 9;
        assert!(decode(&posts).is_err(), "more posts than depth");
        assert!(decode(&d[..10]).is_err(), "short");
        let mut magic = d.clone();
        magic[0] = b'X';
        assert!(decode(&magic).is_err());
    }
}
