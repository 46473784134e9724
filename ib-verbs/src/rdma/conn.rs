//! An RC queue pair as a [`Connection`].
//!
//! - Receives: one registered slab of `recv_depth` buffers of `recv_buf_size` bytes; the
//!   n-th `post_recv` posts buffer `n % recv_depth` (RC receive completions come in posting
//!   order, so this is always the oldest buffer whose completion was delivered).
//! - Sends: `IBV_WR_SEND` of the gathered bytes, `IBV_SEND_INLINE` (no copy into registered
//!   memory, no DMA read of it) when the message fits the QP's `max_inline_data`, otherwise
//!   copied into the send-queue entry's slot of a registered slab (`send_depth` slots of the
//!   peer's buffer size). Every send-queue entry is signaled, so send-queue completions retire
//!   slots in order.
//! - RDMA READ: `IBV_WR_RDMA_READ` of the peer's advertised (vaddr, rkey, len) into a
//!   `LocalWrite` registration of ours.
//! - Credits: verbs cannot see the peer's posted receives, so `post_send` never returns
//!   `NoCredit`: SDP's own credits (BSDH) are the flow control, as in kernel SDP. The QP is
//!   built with `rnr_retry = 7` (retry forever), so a miscount stalls instead of failing.
//! - Notification: with `RdmaOptions::shared_channel` (libsdp's connections) every CQ reports
//!   to the process's one completion channel ([`Device::channel_fd`], served by the progress
//!   thread with [`Device::take_cq_events`]) and the notify fd holds only the peer-ended
//!   signal (the rdma_cm id or the bootstrap socket). Without it (rdma-selftest) the
//!   connection has a channel of its own and the notify fd is an epoll set of both.
//!   `arm` = `req_notify_cq` then a re-poll (drain → arm → drain).
//!
//! Hot path: `post_send`, `post_recv`, `poll_cq` and `req_notify_cq` are called through the
//! context's provider table (`qp->context->ops.post_send`, ...), as verbs.h's inline functions
//! do: no call through libibverbs' exported wrappers.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;

use super::SetupError;
use super::bindings as b;
use super::buf::DmaBuf;
use super::device::{Device, Reg};
use crate::sys::{Fd, SysError};
use crate::transport::{
    Access, Completion, ConnAttrs, ConnError, Connection, LocalSge, MemKey, Opcode, PostError,
    RegError, RemoteSge, WcError, WrId,
};

/// Sizes asked for a connection (the peer's answer decides the send side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaOptions {
    /// Payload bytes of each of our receive buffers.
    pub recv_buf_size: u32,
    /// Receive buffers (the most credits we can give).
    pub recv_depth: u32,
    /// Send-queue entries (sends + reads not yet completed).
    pub send_depth: u32,
    /// Largest message sent inline, asked of the QP (the device may grant less).
    pub max_inline: u32,
    /// Let the peer RDMA READ our `RemoteRead` registrations.
    pub allow_peer_read: bool,
    /// Report completions on the device's shared channel (one per process) under
    /// [`RdmaConn::event_id`] instead of a channel of the connection's own.
    pub shared_channel: bool,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions {
            recv_buf_size: 64 * 1024,
            recv_depth: 16,
            send_depth: 32,
            max_inline: 128,
            allow_peer_read: true,
            shared_channel: false,
        }
    }
}

/// The CQ context of connections on the shared channel: unique per connection in a process.
static NEXT_EVENT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What the peer needs from us to connect its QP to ours (carried by the bootstrap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    /// `enum ibv_mtu` of our port.
    pub mtu: u8,
    pub recv_buf_size: u32,
    pub recv_depth: u32,
    /// Receives posted before the connection was established: the peer's first credits.
    pub initial_posts: u32,
    /// RDMA READs we serve at once (responder resources).
    pub responder_resources: u8,
    /// We allow the peer to RDMA READ our registrations.
    pub peer_may_read: bool,
}

const RECV_BIT: u64 = 1 << 63;
/// Largest inline message we ever ask for (the stack buffer of `post_send`).
const INLINE_MAX: usize = 512;
/// Work completions moved from the CQ per `poll_cq` call of the provider.
const POLL_BATCH: usize = 16;
/// Local ACK timeout: 4.096 µs × 2^18 ≈ 1 s (software RoCE under emulation is slow).
const ACK_TIMEOUT: u8 = 18;

/// An anonymous private mapping registered as one MR (page aligned, so `ibv_fork_init`'s
/// `MADV_DONTFORK` never covers unrelated heap memory). The mapping goes when the slab is
/// dropped, after [`Slab::release`] deregistered it.
struct Slab {
    /// Held for its `Drop` (the munmap).
    _map: DmaBuf,
    base: *mut u8,
    mr: *mut b::ibv_mr,
}

impl Slab {
    fn new(dev: &Device, len: usize, what: &'static str) -> Result<Slab, SetupError> {
        let mut buf = DmaBuf::new(len).ok_or_else(|| SetupError::Verbs {
            op: "mmap",
            errno: last_errno(),
        })?;
        let base = buf.as_mut_ptr();
        // SAFETY: the mapping is ours for the slab's life, valid for reads and writes.
        let mr = unsafe {
            (dev.verbs.ibv_reg_mr)(
                dev.pd,
                base.cast(),
                buf.len(),
                b::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE as i32,
            )
        };
        if mr.is_null() {
            return Err(SetupError::Verbs {
                op: what,
                errno: last_errno(),
            });
        }
        Ok(Slab {
            _map: buf,
            base,
            mr,
        })
    }

    fn lkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { (*self.mr).lkey }
    }

    fn release(&mut self, dev: &Device) {
        if self.mr.is_null() {
            return;
        }
        // SAFETY: the MR is ours; no work request uses it any more (the QP was destroyed
        // first).
        unsafe { (dev.verbs.ibv_dereg_mr)(self.mr) };
        self.mr = ptr::null_mut();
    }
}

/// The verbs objects of one connection, destroyed in dependency order.
struct Qp {
    dev: Arc<Device>,
    /// A channel of the connection's own (null on the shared channel).
    channel: *mut b::ibv_comp_channel,
    /// The CQ context on the shared channel (0: own channel).
    event_id: u64,
    cq: *mut b::ibv_cq,
    qp: *mut b::ibv_qp,
    recv: Slab,
    send: Slab,
}

impl Drop for Qp {
    fn drop(&mut self) {
        let v = self.dev.verbs;
        // SAFETY: objects created by `Qp::new`, destroyed once, QP before its CQ, CQ before its
        // channel (every CQ event was acknowledged in `ack_notify`), MRs after the QP.
        unsafe {
            if !self.qp.is_null() {
                (v.ibv_destroy_qp)(self.qp);
            }
            if !self.cq.is_null() {
                (v.ibv_destroy_cq)(self.cq);
            }
            if !self.channel.is_null() {
                (v.ibv_destroy_comp_channel)(self.channel);
            }
        }
        self.recv.release(&self.dev);
        self.send.release(&self.dev);
    }
}

/// A queue pair created and in INIT, with its receives being posted: the first half of a
/// connection. [`Pending::connect`] takes the peer's [`EndpointInfo`] and finishes.
pub struct Pending {
    conn: RdmaConn,
    psn: u32,
}

impl Pending {
    /// Creates the CQ, completion channel, QP and buffers on the process's device.
    pub fn new(opts: RdmaOptions) -> Result<Pending, SetupError> {
        let dev = Device::get().map_err(SetupError::Unavailable)?;
        Pending::on(dev, opts)
    }

    /// As [`Pending::new`] on a given device.
    pub fn on(dev: Arc<Device>, opts: RdmaOptions) -> Result<Pending, SetupError> {
        let lim = dev.limits();
        if opts.recv_buf_size == 0 || opts.recv_depth == 0 || opts.send_depth == 0 {
            return Err(SetupError::BadOptions("sizes must be non-zero"));
        }
        if opts.recv_depth > lim.max_qp_wr || opts.send_depth > lim.max_qp_wr {
            return Err(SetupError::BadOptions(
                "queue deeper than the device's max_qp_wr",
            ));
        }
        let v = dev.verbs;
        let recv = Slab::new(
            &dev,
            opts.recv_buf_size as usize * opts.recv_depth as usize,
            "ibv_reg_mr(recv)",
        )?;
        let send = match Slab::new(&dev, 4096, "ibv_reg_mr(send)") {
            Ok(s) => s,
            Err(e) => {
                let mut recv = recv;
                recv.release(&dev);
                return Err(e);
            }
        };
        let mut q = Qp {
            dev: dev.clone(),
            channel: ptr::null_mut(),
            event_id: 0,
            cq: ptr::null_mut(),
            qp: ptr::null_mut(),
            recv,
            send,
        };
        let (channel, own_fd) = if opts.shared_channel {
            let ch = dev.channel().map_err(|errno| SetupError::Verbs {
                op: "ibv_create_comp_channel",
                errno,
            })?;
            q.event_id = NEXT_EVENT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (ch.0, None)
        } else {
            // SAFETY: live context.
            q.channel = unsafe { (v.ibv_create_comp_channel)(dev.ctx) };
            if q.channel.is_null() {
                return Err(SetupError::Verbs {
                    op: "ibv_create_comp_channel",
                    errno: last_errno(),
                });
            }
            // SAFETY: the channel is live; its fd is ours to make non-blocking (ack_notify
            // must never block in ibv_get_cq_event).
            let chan_fd = unsafe { (*q.channel).fd };
            set_nonblock(chan_fd).map_err(SetupError::Sys)?;
            (q.channel, Some(chan_fd))
        };
        let cqe = (opts.recv_depth + opts.send_depth).min(lim.max_cqe) as i32;
        // SAFETY: live context and channel; the context pointer is an opaque integer to
        // libibverbs, handed back by ibv_get_cq_event.
        q.cq = unsafe { (v.ibv_create_cq)(dev.ctx, cqe, q.event_id as *mut c_void, channel, 0) };
        if q.cq.is_null() {
            return Err(SetupError::Verbs {
                op: "ibv_create_cq",
                errno: last_errno(),
            });
        }
        let mut inline = opts.max_inline.min(INLINE_MAX as u32);
        loop {
            // SAFETY: all-zero is a valid ibv_qp_init_attr (NULL pointers, zero sizes).
            let mut init: b::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
            init.send_cq = q.cq;
            init.recv_cq = q.cq;
            init.qp_type = b::ibv_qp_type::IBV_QPT_RC;
            init.sq_sig_all = 1;
            init.cap = b::ibv_qp_cap {
                max_send_wr: opts.send_depth,
                max_recv_wr: opts.recv_depth,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: inline,
            };
            // SAFETY: live PD, CQ; the attr is fully initialised; on success the library
            // writes the granted capabilities back into `init.cap`.
            q.qp = unsafe { (v.ibv_create_qp)(dev.pd, &mut init) };
            if !q.qp.is_null() {
                inline = init.cap.max_inline_data.min(INLINE_MAX as u32);
                break;
            }
            if inline == 0 {
                return Err(SetupError::Verbs {
                    op: "ibv_create_qp",
                    errno: last_errno(),
                });
            }
            inline = 0; // a device without inline support: retry without
        }
        let port = dev.port();
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: b::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = b::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port.port;
        // REMOTE_WRITE: the peer's keepalive probe is a zero-length RDMA WRITE, which an RC
        // responder without it NAKs (a fatal error for the prober). No registration of ours
        // grants remote write, so no byte of our memory can be written through it (as
        // rdma_cm's own QPs, which always carry it).
        a.qp_access_flags = b::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | if opts.allow_peer_read {
                b::ibv_access_flags::IBV_ACCESS_REMOTE_READ
            } else {
                0
            };
        use b::ibv_qp_attr_mask::*;
        modify_qp(
            &q,
            &mut a,
            IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS,
        )?;

        let epoll = epoll_create().map_err(SetupError::Sys)?;
        if let Some(fd) = own_fd {
            epoll_add(&epoll, fd).map_err(SetupError::Sys)?;
        }
        let psn = (crate::sys::random_u64().map_err(SetupError::Sys)? & 0xff_ffff) as u32;
        let depth = opts.recv_depth as usize;
        let conn = RdmaConn {
            q,
            epoll,
            watch: Watch::None,
            opts,
            inline,
            send_buf_size: 0,
            peer_recv_depth: 0,
            peer_initial_posts: 0,
            can_read_peer: false,
            peer_can_read: opts.allow_peer_read,
            rx_posted: 0,
            rx_delivered: 0,
            rx_wr: vec![0; depth],
            rx_held: vec![None; depth],
            sq_posted: 0,
            sq_completed: 0,
            sq_meta: vec![(0, Opcode::Send, 0); opts.send_depth as usize],
            cq: VecDeque::with_capacity(POLL_BATCH),
            regs: Vec::new(),
            peer_gone: false,
            dead: None,
            last_wc: None,
            events: 0,
        };
        Ok(Pending { conn, psn })
    }

    /// Posts one receive before the connection exists: an initial credit for the peer.
    pub fn post_recv(&mut self, wr_id: WrId) -> Result<(), PostError> {
        self.conn.post_recv(wr_id)
    }

    /// What the peer needs to connect to us.
    pub fn local_info(&self) -> EndpointInfo {
        let port = self.conn.q.dev.port();
        EndpointInfo {
            // SAFETY: a live QP.
            qpn: unsafe { (*self.conn.q.qp).qp_num },
            psn: self.psn,
            lid: port.lid,
            gid: port.gid,
            mtu: port.active_mtu as u8,
            recv_buf_size: self.conn.opts.recv_buf_size,
            recv_depth: self.conn.opts.recv_depth,
            initial_posts: self.conn.rx_posted as u32,
            responder_resources: self.conn.q.dev.limits().max_qp_rd_atom.clamp(1, 16) as u8,
            peer_may_read: self.conn.opts.allow_peer_read,
        }
    }

    /// Moves the QP to RTR and RTS towards `peer`. `watch` (e.g. the bootstrap socket) is kept:
    /// its end (readable/hang-up) means the peer closed the connection.
    pub fn connect(self, peer: &EndpointInfo, watch: Option<Fd>) -> Result<RdmaConn, SetupError> {
        let dev = self.conn.q.dev.clone();
        let port = dev.port();
        let lim = dev.limits();
        if !(1..=5).contains(&peer.mtu) || peer.qpn > 0xff_ffff || peer.psn > 0xff_ffff {
            return Err(SetupError::Peer("bad QP number, PSN or MTU"));
        }
        use b::ibv_qp_attr_mask::*;
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut rtr: b::ibv_qp_attr = unsafe { std::mem::zeroed() };
        rtr.qp_state = b::ibv_qp_state::IBV_QPS_RTR;
        rtr.path_mtu = (port.active_mtu).min(peer.mtu as u32);
        rtr.dest_qp_num = peer.qpn;
        rtr.rq_psn = peer.psn;
        rtr.max_dest_rd_atomic = lim.max_qp_rd_atom.clamp(1, 16) as u8;
        rtr.min_rnr_timer = 12; // 0.64 ms
        rtr.ah_attr.dlid = peer.lid;
        rtr.ah_attr.port_num = port.port;
        if peer.gid != [0; 16] {
            rtr.ah_attr.is_global = 1;
            rtr.ah_attr.grh.dgid.raw = peer.gid;
            rtr.ah_attr.grh.sgid_index = port.gid_index;
            rtr.ah_attr.grh.hop_limit = 64;
        }
        let rtr_mask = IBV_QP_STATE
            | IBV_QP_AV
            | IBV_QP_PATH_MTU
            | IBV_QP_DEST_QPN
            | IBV_QP_RQ_PSN
            | IBV_QP_MAX_DEST_RD_ATOMIC
            | IBV_QP_MIN_RNR_TIMER;
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut rts: b::ibv_qp_attr = unsafe { std::mem::zeroed() };
        rts.qp_state = b::ibv_qp_state::IBV_QPS_RTS;
        rts.timeout = ACK_TIMEOUT;
        rts.retry_cnt = 7;
        rts.rnr_retry = 7; // infinite: SDP credits are the flow control
        rts.sq_psn = self.psn;
        rts.max_rd_atomic = lim
            .max_qp_init_rd_atom
            .min(peer.responder_resources as u32)
            .clamp(1, 16) as u8;
        let rts_mask = IBV_QP_STATE
            | IBV_QP_TIMEOUT
            | IBV_QP_RETRY_CNT
            | IBV_QP_RNR_RETRY
            | IBV_QP_SQ_PSN
            | IBV_QP_MAX_QP_RD_ATOMIC;
        let watch = match watch {
            Some(fd) => Watch::Socket(fd),
            None => Watch::None,
        };
        self.finish(peer, (rtr, rtr_mask), (rts, rts_mask), watch)
    }

    /// Takes the peer's receive sizes from `peer`, moves the QP with the given RTR and RTS
    /// attributes, and builds the connection.
    pub(crate) fn finish(
        mut self,
        peer: &EndpointInfo,
        mut rtr: (b::ibv_qp_attr, u32),
        mut rts: (b::ibv_qp_attr, u32),
        watch: Watch,
    ) -> Result<RdmaConn, SetupError> {
        if peer.recv_buf_size == 0 || peer.recv_depth == 0 || peer.initial_posts > peer.recv_depth {
            return Err(SetupError::Peer("bad receive sizes"));
        }
        let dev = self.conn.q.dev.clone();
        modify_qp(&self.conn.q, &mut rtr.0, rtr.1)?;
        modify_qp(&self.conn.q, &mut rts.0, rts.1)?;
        let c = &mut self.conn;
        c.send_buf_size = peer.recv_buf_size;
        c.peer_recv_depth = peer.recv_depth;
        c.peer_initial_posts = peer.initial_posts;
        c.can_read_peer = peer.peer_may_read;
        let mut send = Slab::new(
            &dev,
            c.send_buf_size as usize * c.opts.send_depth as usize,
            "ibv_reg_mr(send)",
        )?;
        std::mem::swap(&mut c.q.send, &mut send);
        send.release(&dev);
        if let Some(fd) = watch.fd() {
            epoll_add(&c.epoll, fd).map_err(SetupError::Sys)?;
        }
        c.watch = watch;
        Ok(self.conn)
    }

    /// Our QP number.
    pub fn qp_num(&self) -> u32 {
        self.conn.qp_num()
    }

    /// The device the QP lives on.
    pub fn device(&self) -> &Arc<Device> {
        &self.conn.q.dev
    }
}

/// What tells a connection that its peer ended.
pub(crate) enum Watch {
    None,
    /// The bootstrap socket: readable (EOF) once the peer's process closed it.
    Socket(Fd),
    /// The rdma_cm id: a DISCONNECTED (or device removal) event on its channel.
    Cm(super::cm::CmId),
}

impl Watch {
    fn fd(&self) -> Option<RawFd> {
        match self {
            Watch::None => None,
            Watch::Socket(fd) => Some(fd.raw()),
            Watch::Cm(id) => Some(id.fd()),
        }
    }

    fn ended(&mut self) -> bool {
        match self {
            Watch::None => false,
            Watch::Socket(w) => {
                match crate::sys::poll_raw(w.raw(), libc::POLLIN | libc::POLLRDHUP, 0) {
                    Ok(ev) => ev != 0,
                    Err(_) => false,
                }
            }
            Watch::Cm(id) => id.disconnected(),
        }
    }
}

/// One established RC connection. Dropping it destroys the QP (the peer's next operation
/// fails, and the bootstrap socket's close tells it the connection ended).
pub struct RdmaConn {
    q: Qp,
    epoll: Fd,
    watch: Watch,
    opts: RdmaOptions,
    inline: u32,
    send_buf_size: u32,
    peer_recv_depth: u32,
    peer_initial_posts: u32,
    can_read_peer: bool,
    peer_can_read: bool,

    rx_posted: u64,
    rx_delivered: u64,
    rx_wr: Vec<WrId>,
    rx_held: Vec<Option<u32>>,

    sq_posted: u64,
    sq_completed: u64,
    sq_meta: Vec<(WrId, Opcode, u32)>,

    cq: VecDeque<Completion>,
    regs: Vec<Reg>,
    peer_gone: bool,
    dead: Option<ConnError>,
    last_wc: Option<(u32, u32)>,
    events: u32,
}

// SAFETY: the verbs objects may be used from any thread; the connection is used by one owner
// at a time (`&mut self` for every mutation).
unsafe impl Send for RdmaConn {}

impl std::fmt::Debug for RdmaConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaConn")
            .field("device", &self.q.dev.name())
            .field("qpn", &self.qp_num())
            .field("rx_posted", &self.rx_posted)
            .field("rx_delivered", &self.rx_delivered)
            .field("sq_posted", &self.sq_posted)
            .field("sq_completed", &self.sq_completed)
            .field("queued", &self.cq.len())
            .field("peer_gone", &self.peer_gone)
            .field("dead", &self.dead)
            .finish()
    }
}

impl RdmaConn {
    /// Installs the peer-ended signal after the fact (rdma_cm's passive side learns it last).
    pub(crate) fn with_watch(mut self, watch: Watch) -> Result<RdmaConn, SysError> {
        if let Some(fd) = watch.fd() {
            epoll_add(&self.epoll, fd)?;
        }
        self.watch = watch;
        Ok(self)
    }

    /// The connection's name in [`Device::take_cq_events`] (0 with a channel of its own).
    pub fn event_id(&self) -> u64 {
        self.q.event_id
    }

    /// Our QP number.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: a live QP.
        unsafe { (*self.q.qp).qp_num }
    }

    /// The device in use.
    pub fn device(&self) -> &Arc<Device> {
        &self.q.dev
    }

    /// Receives the peer posted before the connection existed (its first credits for us).
    pub fn peer_initial_posts(&self) -> u32 {
        self.peer_initial_posts
    }

    /// Largest message sent inline (granted by the device).
    pub fn max_inline(&self) -> u32 {
        self.inline
    }

    /// Why the connection died, if it did.
    pub fn error(&self) -> Option<ConnError> {
        self.dead
    }

    /// The (status, vendor_err) of the first failed work completion, for diagnostics.
    pub fn failed_wc(&self) -> Option<(u32, u32)> {
        self.last_wc
    }

    /// Posts the SDP keepalive probe (SDP-WIRE.md §5.4, LINUX `sdp_post_keepalive`): a
    /// signaled zero-length `IBV_WR_RDMA_WRITE` with no scatter entry and remote address and
    /// key 0 (a zero-byte RDMA op checks neither). The peer's application sees nothing; its
    /// adapter acknowledges. It completes as [`Opcode::Write`] (never a send: it uses no SDP
    /// credit); a peer that does not answer makes it fail with [`WcError::Unanswered`] after
    /// the QP's retries, and the connection is dead.
    pub fn post_keepalive(&mut self, wr_id: WrId) -> Result<(), PostError> {
        self.check_alive()?;
        if self.peer_gone {
            return Err(PostError::Dead(self.kill(ConnError::PeerClosed)));
        }
        let depth = self.opts.send_depth as u64;
        if self.sq_posted - self.sq_completed >= depth {
            return Err(PostError::QueueFull);
        }
        let slot = (self.sq_posted % depth) as usize;
        // SAFETY: all-zero is a valid ibv_send_wr (no SGE list, remote address and key 0).
        let mut wr: b::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = self.sq_posted;
        wr.num_sge = 0;
        wr.opcode = b::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
        wr.send_flags = b::ibv_send_flags::IBV_SEND_SIGNALED;
        wr.wr.rdma = b::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
            remote_addr: 0,
            rkey: 0,
        };
        self.post_send_wr(&mut wr)?;
        self.sq_meta[slot] = (wr_id, Opcode::Write, 0);
        self.sq_posted += 1;
        Ok(())
    }

    fn check_alive(&self) -> Result<(), ConnError> {
        match self.dead {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn kill(&mut self, e: ConnError) -> ConnError {
        *self.dead.get_or_insert(e)
    }

    fn post_send_wr(&mut self, wr: &mut b::ibv_send_wr) -> Result<(), PostError> {
        let qp = self.q.qp;
        let mut bad: *mut b::ibv_send_wr = ptr::null_mut();
        // SAFETY: the provider table of a live context; `wr` and its SGE outlive the call
        // (inline data is copied during the call, other SGEs point into registered memory that
        // lives as long as the QP or the caller's registration).
        let rc = unsafe {
            let post = (*(*qp).context).ops.post_send.expect("provider post_send");
            post(qp, wr, &mut bad)
        };
        match rc {
            0 => Ok(()),
            libc::ENOMEM => Err(PostError::QueueFull),
            e => Err(PostError::Dead(self.kill(ConnError::Sys(SysError {
                op: "ibv_post_send",
                errno: e,
            })))),
        }
    }

    /// Moves work completions from the CQ into our queue; returns how many.
    fn fill(&mut self) -> usize {
        let mut n_total = 0;
        loop {
            // SAFETY: ibv_wc is plain data; zeroed is a valid output buffer.
            let mut wcs: [b::ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
            let cq = self.q.cq;
            // SAFETY: provider table of a live context; the output array holds POLL_BATCH.
            let n = unsafe {
                let poll = (*(*cq).context).ops.poll_cq.expect("provider poll_cq");
                poll(cq, POLL_BATCH as i32, wcs.as_mut_ptr())
            };
            if n < 0 {
                self.kill(ConnError::Sys(SysError {
                    op: "ibv_poll_cq",
                    errno: libc::EIO,
                }));
                return n_total;
            }
            for wc in &wcs[..n as usize] {
                self.complete(wc);
            }
            n_total += n as usize;
            if (n as usize) < POLL_BATCH {
                return n_total;
            }
        }
    }

    fn complete(&mut self, wc: &b::ibv_wc) {
        use b::ibv_wc_status::*;
        let ok = wc.status == IBV_WC_SUCCESS;
        if !ok && self.last_wc.is_none() {
            self.last_wc = Some((wc.status, wc.vendor_err));
        }
        if wc.wr_id & RECV_BIT != 0 {
            let seq = wc.wr_id & !RECV_BIT;
            let slot = (seq % self.opts.recv_depth as u64) as usize;
            self.rx_delivered += 1;
            if ok {
                self.rx_held[slot] = Some(wc.byte_len);
                self.cq.push_back(Completion {
                    wr_id: self.rx_wr[slot],
                    opcode: Opcode::Recv,
                    status: Ok(()),
                    byte_len: wc.byte_len,
                    buf_index: slot as u32,
                });
            } else {
                self.rx_held[slot] = None;
                self.wc_failed(wc.status);
            }
            return;
        }
        let slot = (wc.wr_id % self.opts.send_depth as u64) as usize;
        self.sq_completed += 1;
        let (wr_id, opcode, len) = self.sq_meta[slot];
        if ok {
            self.cq.push_back(Completion {
                wr_id,
                opcode,
                status: Ok(()),
                byte_len: len,
                buf_index: slot as u32,
            });
            return;
        }
        let remote = matches!(
            wc.status,
            IBV_WC_REM_ACCESS_ERR | IBV_WC_REM_INV_REQ_ERR | IBV_WC_REM_OP_ERR
        );
        if opcode == Opcode::Write
            && matches!(wc.status, IBV_WC_RETRY_EXC_ERR | IBV_WC_RNR_RETRY_EXC_ERR)
        {
            // The keepalive probe went unanswered: reported as its own error completion, ahead
            // of the flushes, so that the consumer can tell a dead peer found by keepalive.
            self.cq.push_back(Completion {
                wr_id,
                opcode,
                status: Err(WcError::Unanswered),
                byte_len: 0,
                buf_index: slot as u32,
            });
        }
        if opcode == Opcode::Read && remote && self.dead.is_none() {
            // A remote access error moves the RC QP to the error state: fatal, and reported
            // as the read's error completion first (as the shm provider does).
            self.cq.push_back(Completion {
                wr_id,
                opcode,
                status: Err(WcError::RemoteAccess),
                byte_len: 0,
                buf_index: slot as u32,
            });
            self.kill(ConnError::ReadFailed(WcError::RemoteAccess));
            return;
        }
        self.wc_failed(wc.status);
    }

    fn wc_failed(&mut self, status: u32) {
        use b::ibv_wc_status::*;
        let e = match status {
            // Flushed after the QP went to error: the first error already named the cause.
            IBV_WC_WR_FLUSH_ERR if self.dead.is_some() => return,
            // The peer's QP is gone or unreachable, or it flushed us (its process ended).
            IBV_WC_WR_FLUSH_ERR | IBV_WC_RETRY_EXC_ERR | IBV_WC_RNR_RETRY_EXC_ERR => {
                ConnError::PeerClosed
            }
            IBV_WC_REM_ACCESS_ERR | IBV_WC_REM_INV_REQ_ERR => {
                ConnError::ReadFailed(WcError::RemoteAccess)
            }
            _ => ConnError::Sys(SysError {
                op: "work completion",
                errno: libc::EIO,
            }),
        };
        self.kill(e);
    }

    fn local_reg(&self, key: MemKey, addr: u64, len: u64) -> bool {
        self.regs.iter().any(|r| {
            r.key == key
                && r.access == Access::LocalWrite
                && r.addr <= addr
                && addr
                    .checked_add(len)
                    .is_some_and(|end| end <= r.addr + r.len)
        })
    }
}

impl Connection for RdmaConn {
    fn attrs(&self) -> ConnAttrs {
        ConnAttrs {
            recv_buf_size: self.opts.recv_buf_size,
            recv_depth: self.opts.recv_depth,
            send_buf_size: self.send_buf_size,
            peer_recv_depth: self.peer_recv_depth,
            send_depth: self.opts.send_depth,
            can_read_peer: self.can_read_peer,
            peer_can_read: self.peer_can_read,
            peer_pid: None,
            peer_uid: None,
        }
    }

    fn post_recv(&mut self, wr_id: WrId) -> Result<(), PostError> {
        self.check_alive()?;
        let depth = self.opts.recv_depth as u64;
        if self.rx_posted >= self.rx_delivered + depth {
            return Err(PostError::QueueFull);
        }
        let slot = (self.rx_posted % depth) as usize;
        let size = self.opts.recv_buf_size;
        let mut sge = b::ibv_sge {
            addr: self.q.recv.base as u64 + slot as u64 * size as u64,
            length: size,
            lkey: self.q.recv.lkey(),
        };
        let mut wr = b::ibv_recv_wr {
            wr_id: RECV_BIT | self.rx_posted,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let qp = self.q.qp;
        let mut bad: *mut b::ibv_recv_wr = ptr::null_mut();
        // SAFETY: provider table of a live context; the SGE names our registered slab.
        let rc = unsafe {
            let post = (*(*qp).context).ops.post_recv.expect("provider post_recv");
            post(qp, &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(PostError::Dead(self.kill(ConnError::Sys(SysError {
                op: "ibv_post_recv",
                errno: rc,
            }))));
        }
        self.rx_held[slot] = None;
        self.rx_wr[slot] = wr_id;
        self.rx_posted += 1;
        Ok(())
    }

    fn post_send(&mut self, wr_id: WrId, gather: &[&[u8]]) -> Result<(), PostError> {
        self.check_alive()?;
        if self.peer_gone {
            return Err(PostError::Dead(self.kill(ConnError::PeerClosed)));
        }
        let len: usize = gather.iter().map(|g| g.len()).sum();
        if len > self.send_buf_size as usize {
            return Err(PostError::TooLong {
                len,
                max: self.send_buf_size,
            });
        }
        let depth = self.opts.send_depth as u64;
        if self.sq_posted - self.sq_completed >= depth {
            return Err(PostError::QueueFull);
        }
        let slot = (self.sq_posted % depth) as usize;
        let mut inline_buf = [0u8; INLINE_MAX];
        let inline = len <= self.inline as usize && len > 0;
        let (base, lkey) = if inline {
            (inline_buf.as_mut_ptr(), 0)
        } else {
            // SAFETY: slot < send_depth, and the slab holds send_depth slots of send_buf_size.
            let p = unsafe { self.q.send.base.add(slot * self.send_buf_size as usize) };
            (p, self.q.send.lkey())
        };
        let mut off = 0;
        for g in gather {
            // SAFETY: `off + g.len() <= len`, which fits the inline buffer or the slot; the
            // slot is not in use by the device (its previous send completed: sq accounting).
            unsafe { ptr::copy_nonoverlapping(g.as_ptr(), base.add(off), g.len()) };
            off += g.len();
        }
        let mut sge = b::ibv_sge {
            addr: base as u64,
            length: len as u32,
            lkey,
        };
        // SAFETY: all-zero is a valid ibv_send_wr (NULL pointers, zero fields).
        let mut wr: b::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = self.sq_posted;
        wr.sg_list = &mut sge;
        wr.num_sge = if len == 0 { 0 } else { 1 };
        wr.opcode = b::ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = b::ibv_send_flags::IBV_SEND_SIGNALED
            | if inline {
                b::ibv_send_flags::IBV_SEND_INLINE
            } else {
                0
            };
        self.post_send_wr(&mut wr)?;
        self.sq_meta[slot] = (wr_id, Opcode::Send, len as u32);
        self.sq_posted += 1;
        Ok(())
    }

    fn recv_data(&self, c: &Completion, offset: usize, out: &mut [u8]) -> Result<usize, PostError> {
        if c.opcode != Opcode::Recv || c.status.is_err() {
            return Err(PostError::NotARecv);
        }
        let slot = c.buf_index as usize;
        match self.rx_held.get(slot) {
            Some(Some(len)) if *len == c.byte_len => {}
            _ => return Err(PostError::NotARecv),
        }
        let len = c.byte_len as usize;
        if offset >= len {
            return Ok(0);
        }
        let n = out.len().min(len - offset);
        let start = slot * self.opts.recv_buf_size as usize + offset;
        // SAFETY: the slot's message (len ≤ recv_buf_size, the device never writes more) is
        // complete and not reposted (rx_held), so no DMA writes it now.
        unsafe { ptr::copy_nonoverlapping(self.q.recv.base.add(start), out.as_mut_ptr(), n) };
        Ok(n)
    }

    unsafe fn register(
        &mut self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemKey, RegError> {
        // SAFETY: the caller's contract is the device's.
        let r = unsafe { self.q.dev.register(addr, len, access)? };
        self.regs.push(Reg {
            addr: addr as u64,
            len: len as u64,
            ..r
        });
        Ok(r.key)
    }

    fn deregister(&mut self, key: MemKey) -> Result<(), RegError> {
        let i = self
            .regs
            .iter()
            .position(|r| r.key == key)
            .ok_or(RegError::UnknownKey)?;
        let r = self.regs.swap_remove(i);
        self.q.dev.deregister(r.key, r.access);
        Ok(())
    }

    fn post_read(
        &mut self,
        wr_id: WrId,
        local: LocalSge,
        remote: RemoteSge,
    ) -> Result<(), PostError> {
        self.check_alive()?;
        if !self.can_read_peer {
            return Err(PostError::ZcopyUnavailable);
        }
        if local.len < remote.len || !self.local_reg(local.key, local.addr, remote.len as u64) {
            return Err(PostError::BadLocalKey);
        }
        let depth = self.opts.send_depth as u64;
        if self.sq_posted - self.sq_completed >= depth {
            return Err(PostError::QueueFull);
        }
        let slot = (self.sq_posted % depth) as usize;
        let mut sge = b::ibv_sge {
            addr: local.addr,
            length: remote.len,
            lkey: local.key.0,
        };
        // SAFETY: all-zero is a valid ibv_send_wr.
        let mut wr: b::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = self.sq_posted;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = b::ibv_wr_opcode::IBV_WR_RDMA_READ;
        wr.send_flags = b::ibv_send_flags::IBV_SEND_SIGNALED;
        wr.wr.rdma = b::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
            remote_addr: remote.addr,
            rkey: remote.key.0,
        };
        self.post_send_wr(&mut wr)?;
        self.sq_meta[slot] = (wr_id, Opcode::Read, remote.len);
        self.sq_posted += 1;
        Ok(())
    }

    fn poll_cq(&mut self, out: &mut [Completion]) -> Result<usize, ConnError> {
        if self.cq.len() < out.len() && self.dead.is_none() {
            self.fill();
        }
        let n = out.len().min(self.cq.len());
        for (o, c) in out.iter_mut().zip(self.cq.drain(..n)) {
            *o = c;
        }
        if n > 0 {
            return Ok(n);
        }
        if let Some(e) = self.dead {
            return Err(e);
        }
        if self.peer_gone {
            return Err(self.kill(ConnError::PeerClosed));
        }
        Ok(0)
    }

    fn has_work(&mut self) -> bool {
        if !self.cq.is_empty() || self.peer_gone || self.dead.is_some() {
            return true;
        }
        self.fill() > 0 || !self.cq.is_empty()
    }

    fn notify_fd(&self) -> RawFd {
        self.epoll.raw()
    }

    fn arm(&mut self) -> Result<bool, ConnError> {
        if !self.cq.is_empty() || self.peer_gone {
            return Ok(false);
        }
        self.check_alive()?;
        let cq = self.q.cq;
        // SAFETY: provider table of a live context.
        let rc = unsafe {
            let notify = (*(*cq).context)
                .ops
                .req_notify_cq
                .expect("provider req_notify_cq");
            notify(cq, 0)
        };
        if rc != 0 {
            return Err(self.kill(ConnError::Sys(SysError {
                op: "ibv_req_notify_cq",
                errno: rc,
            })));
        }
        // Drain again: a completion that arrived before the arm raised no event.
        self.fill();
        Ok(self.cq.is_empty() && self.dead.is_none())
    }

    fn ack_notify(&mut self) -> Result<(), ConnError> {
        let v = self.q.dev.verbs;
        // On the shared channel, events are the progress thread's (Device::take_cq_events).
        while !self.q.channel.is_null() {
            let mut cq: *mut b::ibv_cq = ptr::null_mut();
            let mut ctx: *mut c_void = ptr::null_mut();
            // SAFETY: live channel whose fd is non-blocking: returns -1 (EAGAIN) when empty.
            let rc = unsafe { (v.ibv_get_cq_event)(self.q.channel, &mut cq, &mut ctx) };
            if rc != 0 {
                break;
            }
            self.events = self.events.wrapping_add(1);
            // SAFETY: the event names our CQ (the only one on this channel); acknowledged at
            // once so that destroying the CQ never waits.
            unsafe { (v.ibv_ack_cq_events)(cq, 1) };
        }
        if !self.peer_gone && self.watch.ended() {
            self.peer_gone = true;
        }
        match self.dead {
            Some(e) if self.cq.is_empty() => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for RdmaConn {
    fn drop(&mut self) {
        for r in std::mem::take(&mut self.regs) {
            self.q.dev.deregister(r.key, r.access);
        }
    }
}

fn modify_qp(q: &Qp, a: &mut b::ibv_qp_attr, mask: u32) -> Result<(), SetupError> {
    // SAFETY: live QP; `a` is initialised for every field named by `mask`.
    let rc = unsafe { (q.dev.verbs.ibv_modify_qp)(q.qp, a, mask as i32) };
    if rc != 0 {
        return Err(SetupError::Verbs {
            op: "ibv_modify_qp",
            errno: rc,
        });
    }
    Ok(())
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn set_nonblock(fd: RawFd) -> Result<(), SysError> {
    // SAFETY: fcntl on an fd we own, integer arguments only.
    let fl = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(SysError {
            op: "fcntl(F_GETFL)",
            errno: last_errno(),
        });
    }
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fcntl,
            fd,
            libc::F_SETFL,
            fl | libc::O_NONBLOCK as i64,
        )
    };
    if rc < 0 {
        return Err(SysError {
            op: "fcntl(F_SETFL)",
            errno: last_errno(),
        });
    }
    Ok(())
}

fn epoll_create() -> Result<Fd, SysError> {
    // SAFETY: epoll_create1 takes an integer flag.
    let fd = unsafe { libc::syscall(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC) };
    Fd::from_raw(fd as RawFd).ok_or(SysError {
        op: "epoll_create1",
        errno: last_errno(),
    })
}

fn epoll_add(ep: &Fd, fd: RawFd) -> Result<(), SysError> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl reads one epoll_event from a valid pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_epoll_ctl,
            ep.raw(),
            libc::EPOLL_CTL_ADD,
            fd,
            &mut ev as *mut libc::epoll_event,
        )
    };
    if rc < 0 {
        return Err(SysError {
            op: "epoll_ctl",
            errno: last_errno(),
        });
    }
    Ok(())
}
