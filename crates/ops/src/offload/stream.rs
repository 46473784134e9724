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
    /// Bell bytes written into the peer's app end (0 for transports that ring otherwise).
    pub bells_tx: u64,
    /// Of the bytes each way, those copied once: from the application's buffer straight into
    /// the peer's ring, and from our ring straight into the application's buffer (`shm`).
    pub direct_tx: u64,
    pub direct_rx: u64,
}

/// A stream's state after the peer closed (a FIN, not a reset), as TCP's: the first write
/// there is taken (and dropped: the peer's kernel answers it with RST), SO_ERROR then reads
/// EPIPE once, and the writes after it get EPIPE. An HTTP client reusing a keep-alive
/// connection its server closed relies on it: its write goes through, its read sees end of
/// stream and it retries on a new connection (failing the write killed a client that does not
/// ignore SIGPIPE, one write early).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AfterPeerClose {
    /// `None`: no write after the close yet; `Some(true)`: one was taken and SO_ERROR has
    /// still to report its RST; `Some(false)`: reported.
    wrote: Option<bool>,
}

impl AfterPeerClose {
    /// Whether a write that found the connection closed is taken: the first one, when the
    /// peer closed (`fin`: its end seen, no reset, not our own shutdown, the stream not dead)
    /// and the send buffer has `room`.
    pub fn may_take_write(&self, fin: bool, room: usize) -> bool {
        fin && room > 0 && self.wrote.is_none()
    }

    /// A write of `total` bytes was taken (after [`Self::may_take_write`]): the count it
    /// returns, what the send buffer has `room` for, as TCP's (a sendfile of the rest of a
    /// file got 256 KiB through once: asyncio's
    /// `test_sendfile_close_peer_in_the_middle_of_receiving` saw no reset).
    pub fn took_write(&mut self, total: usize, room: usize) -> usize {
        self.wrote = Some(true);
        total.min(room)
    }

    /// A write got EPIPE: that reports the RST, SO_ERROR has nothing more to say.
    pub fn epipe_reported(&mut self) {
        if self.wrote == Some(true) {
            self.wrote = Some(false);
        }
    }

    /// SO_ERROR's answer when the peer's close decides it (`fin` as for
    /// [`Self::may_take_write`], without our shutdown's part): `Some(Some(EPIPE))` once after
    /// a taken write, `Some(None)` after a FIN (it sets no error), `None`: the stream decides.
    pub fn so_error(&mut self, fin: bool, dead: bool) -> Option<Option<Errno>> {
        if self.wrote == Some(true) {
            // LINUX: the RST that answered that write, in CLOSE_WAIT: EPIPE, reported once.
            self.wrote = Some(false);
            return Some(Some(libc::EPIPE));
        }
        if !dead && (self.wrote.is_some() || fin) {
            // LINUX: a peer's FIN (its close, its exit) sets no error: SO_ERROR reads 0.
            return Some(None);
        }
        None
    }
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

    /// Whether a receive that polls for data itself may withdraw the request of `arm_recv`
    /// while it polls ([`disarm_recv`](Self::disarm_recv) stops the peer's bell), so that
    /// what it takes costs neither side a bell byte.
    fn quiet_while_polling(&self) -> bool {
        false
    }

    /// Asks the peer to make our app end writable (drain our stuffing) when it gives room.
    /// Returns `false` when room came meanwhile.
    fn arm_send(&mut self) -> bool;

    fn counters(&self) -> Counters;

    /// Whether this process holds the current state of the connection (after a fork only one
    /// process may go on using it; see `ShmConn::claim`).
    fn is_current(&self) -> bool;

    /// Whether another process (forked from this one, or from the one we were forked from)
    /// has used the connection since this copy of its state was made: this process can never
    /// serve it again. A fork child that nobody has used it since is not stale.
    fn stale(&self) -> bool {
        false
    }

    /// This process served the connection and lets go of it while another process forked
    /// from it may hold it (`ShmConn::vacate`).
    fn vacate(&mut self) {}

    /// Whether the process that served the connection let go of it, leaving the state this
    /// process holds (a fork child that never used it): it may be claimed here.
    fn vacant_for_me(&self) -> bool {
        false
    }

    /// Claims a connection [`vacant_for_me`](Self::vacant_for_me); false if another process
    /// took it first.
    fn claim_vacant(&mut self) -> bool {
        false
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_fin_one_write_passes_then_so_error_says_epipe_once() {
        let mut a = AfterPeerClose::default();
        assert_eq!(a.so_error(true, false), Some(None), "a FIN sets no error");
        assert!(
            !a.may_take_write(false, 4096),
            "not after a reset or our own shutdown"
        );
        assert!(!a.may_take_write(true, 0), "not with a full send buffer");
        assert!(a.may_take_write(true, 4096));
        assert_eq!(
            a.took_write(1 << 20, 4096),
            4096,
            "what the buffer has room for"
        );
        assert!(!a.may_take_write(true, 4096), "the first write only");
        assert_eq!(a.so_error(true, false), Some(Some(libc::EPIPE)));
        assert_eq!(a.so_error(true, false), Some(None), "reported once");
        let mut b = AfterPeerClose::default();
        assert_eq!(b.took_write(10, 4096), 10);
        b.epipe_reported();
        assert_eq!(
            b.so_error(true, false),
            Some(None),
            "the second write reported it"
        );
        assert_eq!(AfterPeerClose::default().so_error(false, false), None);
        assert_eq!(
            AfterPeerClose::default().so_error(true, true),
            None,
            "dead decides"
        );
    }
}
