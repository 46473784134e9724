//! The `rdma` provider: **not built yet** (issue #7).
//!
//! It will implement [`crate::Connection`] with libibverbs and librdmacm opened by `dlopen`
//! on first need (never linked, see PRELOAD.md): an RC QP per connection; `post_recv` posts
//! one of a pool of registered buffers of the negotiated size; `post_send` is
//! `IBV_WR_SEND`; `register` is `ibv_reg_mr` (lkey/rkey folded into one [`crate::MemKey`]);
//! `post_read` is `IBV_WR_RDMA_READ`; `notify_fd` is the completion channel's fd, `arm` is
//! `ibv_req_notify_cq` followed by a re-poll, `ack_notify` is `ibv_get_cq_event` +
//! `ibv_ack_cq_events`. The bootstrap carries the same Hello / HelloAck private data in the
//! rdma_cm REQ / REP.
//!
//! Until then, [`available`] says no and `ops` records fallback reason `no-device`.

/// Whether RDMA devices can be used in this process. Always `false` until issue #7.
pub fn available() -> bool {
    false
}
