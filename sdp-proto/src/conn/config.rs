//! Per-connection configuration.

use core::time::Duration;

/// Tunables of one connection. `Config::default()` matches Linux MLNX SDP where SDP-WIRE.md
/// gives a figure; everything else is explained at the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Size of each posted receive buffer, BSDH included (Hello LocalRcvSz / HelloAck
    /// ActRcvSz). LINUX: 32784 = 8 pages + 16 (§3.4).
    pub recv_buffer_size: u32,
    /// Most receive buffers posted at once; at least 4 so credit updates settle (§3.3).
    /// LINUX never posts more than 64.
    pub recv_buffers: u16,
    /// Receive window in bytes (SO_RCVBUF): buffers are reposted only while unread bytes plus
    /// posted capacity stay within it, except for the two buffers always kept for control
    /// messages (MLNX `sdp_post_recvs_needed`).
    pub recv_window: usize,
    /// Send buffer in bytes (SO_SNDBUF): `send` accepts bytes while it has room.
    pub send_buffer: usize,
    /// Most sends posted and not yet completed (LINUX `SDP_TX_SIZE` 64).
    pub max_send_wr: u32,
    /// MaxAdverts sent in Hello/HelloAck (LINUX sends 1).
    pub max_adverts: u8,
    /// Serve peer SrcAvails by RDMA read. If false (or the transport cannot read) every
    /// SrcAvail is answered with SendSM and the peer falls back to BCopy (§8.7).
    pub zcopy_recv: bool,
    /// Allow `send_zcopy`.
    pub zcopy_send: bool,
    /// Largest RDMA read requested at once.
    pub rdma_read_chunk: u32,
    /// Most inline bytes in our SrcAvail (LINUX: up to the end of the first page).
    pub zcopy_inline: u32,
    /// Largest SrcAvail (LINUX `SDP_MAX_RDMA_READ_LEN` 2,088,960).
    pub zcopy_max: u32,
    /// Without RdmaRdCompl progress this long, our SrcAvail is cancelled (LINUX 1 s).
    pub srcavail_timeout: Duration,
    /// After SrcAvailCancel, wait this long for RdmaRdCompl/SendSM, then reset (LINUX 60 s).
    pub srcavail_cancel_timeout: Duration,
    /// After a close() (orphan) sent DisConn, wait this long for the peer's (LINUX 60 s).
    pub fin_wait_timeout: Duration,
    /// In LAST_ACK, wait this long for the CM disconnect (LINUX 60 s).
    pub last_ack_timeout: Duration,
    /// In TIME_WAIT, wait this long for the CM to finish (LINUX CMA guard 150 s).
    pub time_wait_timeout: Duration,
    /// SO_KEEPALIVE idle time; `None` = off (LINUX default 120 min when on).
    pub keepalive: Option<Duration>,
    /// SO_OOBINLINE: urgent bytes stay in the stream.
    pub oob_inline: bool,
    /// Grow receive buffers when the peer asks with ChRcvBuf, up to `max_recv_buffer_size`.
    /// If false every ChRcvBuf is answered with the current size (as OPENIB does).
    pub allow_recv_resize: bool,
    /// Upper bound for `allow_recv_resize`.
    pub max_recv_buffer_size: u32,
}

/// LINUX: 8 × 4 KiB fragments + the BSDH.
pub const DEFAULT_RECV_BUFFER_SIZE: u32 = 32 * 1024 + 16;

impl Default for Config {
    fn default() -> Self {
        Config {
            recv_buffer_size: DEFAULT_RECV_BUFFER_SIZE,
            recv_buffers: 16,
            recv_window: 16 * 32 * 1024,
            send_buffer: 512 * 1024,
            max_send_wr: 64,
            max_adverts: 1,
            zcopy_recv: true,
            zcopy_send: true,
            rdma_read_chunk: 256 * 1024,
            zcopy_inline: 4096,
            zcopy_max: 4096 * 510,
            srcavail_timeout: Duration::from_secs(1),
            srcavail_cancel_timeout: Duration::from_secs(60),
            fin_wait_timeout: Duration::from_secs(60),
            last_ack_timeout: Duration::from_secs(60),
            time_wait_timeout: Duration::from_secs(150),
            keepalive: None,
            oob_inline: false,
            allow_recv_resize: false,
            max_recv_buffer_size: 64 * 1024 + 16,
        }
    }
}

impl Config {
    /// Makes the configuration safe: clamps values that would stall credits or overflow.
    pub(crate) fn sanitized(mut self) -> Self {
        // A buffer must hold a BSDH, a SrcAH and one inline byte.
        self.recv_buffer_size = self.recv_buffer_size.max(64);
        // INVARIANT: ≥ 4 posted buffers keep the credit-update rule from ping-ponging and
        // still let the peer send data (credits.rs).
        self.recv_buffers = self.recv_buffers.clamp(4, 4096);
        let payload = (self.recv_buffer_size as usize) - 16;
        self.recv_window = self.recv_window.max(2 * payload);
        self.send_buffer = self.send_buffer.max(1);
        self.max_send_wr = self.max_send_wr.max(1);
        self.max_adverts = self.max_adverts.max(1);
        self.rdma_read_chunk = self.rdma_read_chunk.max(1);
        self.zcopy_inline = self.zcopy_inline.max(1);
        self.max_recv_buffer_size = self.max_recv_buffer_size.max(self.recv_buffer_size);
        self
    }
}
