//! The seam between the switch and an offload protocol running over a transport.
//!
//! `ops` drives readiness, blocking, fd numbers and lifetime; an [`OffloadStream`] moves bytes.
//! A second offload protocol, or SDP over another transport, is one more implementation of
//! this trait (DESIGN.md §1).

/// Errors are errno values, decided by the implementation's one mapping table.
pub type Errno = i32;

/// Counters for `sdp stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes_tx: u64,
    pub bytes_rx: u64,
    pub msgs_tx: u64,
    pub msgs_rx: u64,
    /// Messages we may send now (the peer's posted buffers we have not used).
    pub credits_tx: u64,
    /// Receive buffers we have posted.
    pub posted_rx: u64,
    /// Of the bytes each way, those moved by RDMA (ZCopy) rather than inside messages (BCopy).
    pub zcopy_tx: u64,
    pub zcopy_rx: u64,
}

/// One offloaded byte stream. Every method is non-blocking; the caller holds the
/// connection's lock.
pub trait OffloadStream: Send {
    /// The transport's name for statistics.
    fn transport(&self) -> crate::stats::Transport;

    /// Moves whatever is ready: received messages into the receive queue, credits, queued
    /// sends onto the wire. An error is the connection's death (also reported by `error`).
    fn progress(&mut self);

    /// Queues bytes for sending; returns how many were taken (0 with no room is `EAGAIN` to
    /// the caller). `oob`: the last byte is urgent (MSG_OOB).
    fn send(&mut self, data: &[&[u8]], oob: bool) -> Result<usize, Errno>;

    /// Copies received bytes out. `Ok(0)` with a non-empty buffer is end of stream;
    /// `Err(EAGAIN)` means nothing yet.
    fn recv(&mut self, out: &mut [&mut [u8]], peek: bool) -> Result<usize, Errno>;

    /// Reads the urgent byte (MSG_OOB).
    fn recv_oob(&mut self, peek: bool) -> Result<u8, Errno>;

    /// Whether the transport has something new (a message, credits): a cheap check without
    /// system calls, for busy-polling.
    fn has_work(&mut self) -> bool;

    /// Something for a reader: bytes, end of stream, or an error.
    fn recv_ready(&self) -> bool;

    /// No more bytes will arrive (the peer's DisConn, its end, or an error): POLLRDHUP.
    fn read_closed(&self) -> bool;

    /// Room for a writer, or an error a writer must see.
    fn send_ready(&self) -> bool;

    /// Bytes queued for the application (FIONREAD).
    fn recv_queued(&self) -> usize;

    /// Bytes accepted but not yet acknowledged by the peer (SIOCOUTQ).
    fn send_queued(&self) -> usize;

    /// An urgent byte waits to be read with MSG_OOB (POLLPRI).
    fn urgent_ready(&self) -> bool;

    /// The next byte to read is the urgent mark (SIOCATMARK).
    fn at_mark(&self) -> bool;

    /// Graceful half-close: after the queued bytes the peer reads end of stream.
    fn shutdown_write(&mut self);

    /// Abortive close: the peer sees ECONNRESET.
    fn abort(&mut self);

    /// Bytes arrived that the application has not read (a close then resets, as TCP's does).
    fn unread(&mut self) -> bool;

    /// The peer's process closed its last reference or died.
    fn peer_gone(&mut self);

    /// The error a socket call must report now (ECONNRESET, EPIPE, ...), if any.
    fn error(&self) -> Option<Errno>;

    /// [`error`](Self::error) for `SO_ERROR`, which clears a one-shot error (a reset).
    fn take_error(&mut self) -> Option<Errno> {
        self.error()
    }

    /// Asks the peer to make our app end readable at its next message. Returns `false` when
    /// something arrived meanwhile (do not sleep: progress again).
    fn arm_recv(&mut self) -> bool;

    /// Withdraws the request of the last `arm_recv`. `true`: the peer took it first, and its
    /// bell byte is on our app end or on its way.
    fn disarm_recv(&mut self) -> bool;

    /// Asks the peer to make our app end writable (drain our stuffing) when it gives room.
    /// Returns `false` when room came meanwhile.
    fn arm_send(&mut self) -> bool;

    fn counters(&self) -> Counters;

    /// Whether this process holds the current state of the connection (after a fork only one
    /// process may go on using it; see `ShmConn::claim`).
    fn is_current(&self) -> bool;

    /// Asks for a readiness event on every arrival (the application polls edge-triggered).
    fn set_every_arrival(&mut self, on: bool);

    /// A number that moves whenever the process serving the connection changes its state.
    fn owner_generation(&self) -> u64;

    /// Whether urgent data was announced since the last call (raise SIGURG for the owner).
    fn take_urgent(&mut self) -> bool;

    /// The descriptors the transport holds (to keep them in a relay process).
    fn fds(&self) -> Vec<i32>;

    /// Delivers queued sends, waiting at most `budget` (a closing socket's linger).
    fn flush(&mut self, budget: std::time::Duration);

    /// SO_KEEPALIVE changed (read back from the shadow TCP socket): `Some(idle)` is on with
    /// TCP_KEEPIDLE, `None` off. Only a transport that can probe its peer acts on it (`rdma`,
    /// SDP-WIRE.md §5.4); on the same host (`shm`) the peer's end is seen without probing.
    fn set_keepalive(&mut self, _idle: Option<std::time::Duration>) {}

    /// SO_OOBINLINE changed (read back from the shadow TCP socket).
    fn set_oob_inline(&mut self, _on: bool) {}

    /// SO_SNDBUF and/or SO_RCVBUF as the program set them (read back from the shadow TCP
    /// socket, the kernel's doubled figures): the bytes a send may queue, the receive window.
    fn set_buffers(&mut self, _sndbuf: Option<usize>, _rcvbuf: Option<usize>) {}
}
