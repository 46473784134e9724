//! Zero-copy read (ZCopy, SDP-WIRE.md §4.3): our SrcAvail as data source, and the peer's
//! SrcAvail as data sink.
//!
//! Source: `send_zcopy` queues a SrcAvail for a buffer the host registered (RKey, VAddr)
//! with its first bytes inline. The host keeps the buffer until
//! [`Event::ZcopySendFinished`](super::Event::ZcopySendFinished): either the peer read it all
//! (inline + Σ RdmaRdCompl = Len), or it answered SendSM and the host sends the rest,
//! `data[sent..]`, as ordinary bytes before anything else. Only one SrcAvail is ever
//! outstanding (Combined mode, §4.1, §7.6), and no Data is sent while it is.
//!
//! Sink: the inline bytes join the stream at once; the remainder is fetched by RDMA reads
//! the engine asks the host for ([`RdmaRead`](super::RdmaRead)), at most one at a time and
//! only while the receive window has room, each reported by RdmaRdCompl as it completes
//! (incremental, like MLNX). SrcAvailCancel is answered by RdmaRdCompl for unreported bytes
//! (after a read in flight finishes) and SendSM.

/// Identifies one `send_zcopy` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZcopyId(pub u64);

/// Our outstanding SrcAvail.
#[derive(Debug, Clone)]
pub(crate) struct ZcopySource {
    pub(crate) id: ZcopyId,
    /// MSeq of the SrcAvail once sent.
    pub(crate) mseq: Option<u32>,
    pub(crate) len: u32,
    pub(crate) rkey: u32,
    pub(crate) vaddr: u64,
    pub(crate) inline: Vec<u8>,
    /// Σ RdmaRdCompl.Len.
    pub(crate) reported: u32,
    /// SrcAvailCancel queued or sent.
    pub(crate) cancelled: bool,
}

impl ZcopySource {
    /// Bytes the peer has taken: inline + reported RDMA.
    pub(crate) fn sent(&self) -> u32 {
        self.inline.len() as u32 + self.reported
    }
    /// Bytes still to be read by the peer.
    pub(crate) fn remaining(&self) -> u32 {
        self.len - self.sent()
    }
}

/// The peer's outstanding SrcAvail.
#[derive(Debug, Clone)]
pub(crate) struct ZcopySink {
    pub(crate) rkey: u32,
    pub(crate) vaddr: u64,
    pub(crate) len: u32,
    /// Offset (from VAddr) of the next byte to read: inline bytes + bytes read or in flight.
    pub(crate) next: u32,
    /// RDMA read in flight: (request id, length).
    pub(crate) in_flight: Option<(u64, u32)>,
    /// Bytes read and not yet reported by RdmaRdCompl.
    pub(crate) unreported: u32,
    /// The source sent SrcAvailCancel.
    pub(crate) cancelled: bool,
}

impl ZcopySink {
    pub(crate) fn remaining(&self) -> u32 {
        self.len - self.next
    }
}
