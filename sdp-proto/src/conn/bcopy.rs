//! Buffered copy (BCopy, SDP-WIRE.md §4.2): the send queue and the receive queue, with
//! urgent-data marks (§1.2, §5.3).
//!
//! Stream offsets are absolute `u64` byte counts since the connection opened, so a mark
//! survives any amount of queue movement.

use std::collections::VecDeque;

/// Bytes accepted from the application and not yet framed into messages.
#[derive(Debug, Clone)]
pub(crate) struct SendQueue {
    buf: VecDeque<u8>,
    capacity: usize,
    /// Stream offset of `buf[0]`.
    head: u64,
    /// Stream offsets of urgent bytes not yet framed, ascending. Each ends its own message.
    urgent: VecDeque<u64>,
}

impl SendQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        SendQueue {
            buf: VecDeque::new(),
            capacity,
            head: 0,
            urgent: VecDeque::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn free(&self) -> usize {
        self.capacity.saturating_sub(self.buf.len())
    }

    /// A new size (SO_SNDBUF); bytes already queued above it stay queued.
    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// Stream offset one past the last queued byte.
    pub(crate) fn end(&self) -> u64 {
        self.head + self.buf.len() as u64
    }

    /// Queues as much of `data` as fits; with `urgent`, the last byte queued is urgent
    /// (TCP MSG_OOB: the urgent pointer follows the last byte written).
    pub(crate) fn push(&mut self, data: &[u8], urgent: bool) -> usize {
        let n = data.len().min(self.free());
        self.buf.extend(&data[..n]);
        if urgent && n > 0 {
            self.urgent.push_back(self.end() - 1);
        }
        n
    }

    /// Bytes the next Data message may carry with at most `max` payload bytes, and whether
    /// its last byte is urgent (the message then ends exactly at the urgent byte).
    pub(crate) fn next_chunk(&self, max: usize) -> (usize, bool) {
        let mut n = self.buf.len().min(max);
        let mut urgent = false;
        if let Some(&u) = self.urgent.front() {
            let upto = (u - self.head + 1) as usize;
            if upto <= n {
                n = upto;
                urgent = true;
            }
        }
        (n, urgent)
    }

    /// Whether urgent bytes are queued (OOB_PEND on every message until they are sent).
    pub(crate) fn urgent_pending(&self) -> bool {
        !self.urgent.is_empty()
    }

    /// Moves the first `n` bytes into `dst`.
    pub(crate) fn take_into(&mut self, dst: &mut [u8], n: usize) {
        let (a, b) = self.first(n);
        dst[..a.len()].copy_from_slice(a);
        dst[a.len()..n].copy_from_slice(b);
        self.consume(n);
    }

    /// The first `n` queued bytes, in at most two pieces (the queue is a ring).
    pub(crate) fn first(&self, n: usize) -> (&[u8], &[u8]) {
        let (a, b) = self.buf.as_slices();
        let from_a = n.min(a.len());
        (&a[..from_a], &b[..n - from_a])
    }

    /// Accounts for `n` bytes sent without passing through the (empty) queue.
    pub(crate) fn skip(&mut self, n: usize) {
        debug_assert!(self.buf.is_empty());
        self.head += n as u64;
    }

    /// Drops the first `n` queued bytes (sent).
    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.head += n as u64;
        while let Some(&u) = self.urgent.front() {
            if u < self.head {
                self.urgent.pop_front();
            } else {
                break;
            }
        }
    }
}

/// The urgent mark of the receive stream: TCP has one urgent pointer, a newer one replaces
/// the older, whose byte then stays in the stream as ordinary data (as in Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UrgentMark {
    pub(crate) offset: u64,
    pub(crate) byte: u8,
    /// Read with MSG_OOB already.
    pub(crate) taken: bool,
}

/// Bytes received and not yet read by the application.
///
/// The first `deferred` of them may still be in the host's receive buffers (see
/// [`Connection::handle_message_deferred`](super::Connection::handle_message_deferred)): they
/// come before `buf`, carry no urgent byte, and a read copies them through the host.
#[derive(Debug, Clone)]
pub(crate) struct RecvQueue {
    buf: VecDeque<u8>,
    /// Bytes at the front of the stream that the host holds.
    deferred: usize,
    /// Stream offset of the first unread byte: the first deferred one, else `buf[0]`.
    head: u64,
    pub(crate) mark: Option<UrgentMark>,
    pub(crate) oob_inline: bool,
}

impl RecvQueue {
    pub(crate) fn new(oob_inline: bool) -> Self {
        RecvQueue {
            buf: VecDeque::new(),
            deferred: 0,
            head: 0,
            mark: None,
            oob_inline,
        }
    }

    /// Bytes held, an unread out-of-line urgent byte included (memory accounting).
    pub(crate) fn held(&self) -> usize {
        self.buf.len() + self.deferred
    }

    /// Bytes at the front of the stream that the host holds.
    pub(crate) fn deferred(&self) -> usize {
        self.deferred
    }

    /// Whether `n` bytes arriving now may stay with the host: nothing is queued after the
    /// deferred bytes and no urgent mark lies ahead.
    pub(crate) fn may_defer(&self) -> bool {
        self.buf.is_empty() && self.mark.is_none_or(|m| m.offset < self.head)
    }

    /// `n` bytes arrived that the host holds (see [`may_defer`](Self::may_defer)).
    pub(crate) fn defer(&mut self, n: usize) {
        debug_assert!(self.may_defer());
        self.deferred += n;
    }

    /// The host gives its deferred bytes up: `fill(offset, dst)` copies them, and they join
    /// the queue's front.
    pub(crate) fn undefer(&mut self, fill: &mut dyn FnMut(usize, &mut [u8])) {
        if self.deferred == 0 {
            return;
        }
        let mut front = vec![0u8; self.deferred];
        fill(0, &mut front);
        let mut buf = VecDeque::from(front);
        buf.append(&mut self.buf);
        self.buf = buf;
        self.deferred = 0;
    }

    fn end(&self) -> u64 {
        self.head + self.held() as u64
    }

    /// Whether the out-of-line urgent byte is still in the queue (skipped by reads).
    fn hole_in_queue(&self) -> bool {
        match self.mark {
            Some(m) => !self.oob_inline && m.offset >= self.head && m.offset < self.end(),
            None => false,
        }
    }

    /// Bytes a read may return (FIONREAD).
    pub(crate) fn readable(&self) -> usize {
        self.held() - usize::from(self.hole_in_queue())
    }

    /// Appends stream bytes; with `urgent_last`, the last byte is the new urgent byte.
    pub(crate) fn push(&mut self, data: &[u8], urgent_last: bool) {
        self.before_push(urgent_last);
        self.buf.extend(data);
        self.after_push(data.len(), urgent_last);
    }

    /// As [`push`](Self::push) for `n` bytes that `fill(offset, dst)` writes in place (from
    /// the host's receive buffer, without a staging copy).
    pub(crate) fn push_from(
        &mut self,
        n: usize,
        urgent_last: bool,
        fill: &mut dyn FnMut(usize, &mut [u8]),
    ) {
        self.before_push(urgent_last);
        let start = self.buf.len();
        self.buf.resize(start + n, 0);
        let (a, b) = self.buf.as_mut_slices();
        if start < a.len() {
            let first = &mut a[start..];
            let k = first.len();
            fill(0, first);
            if k < n {
                fill(k, &mut b[..n - k]);
            }
        } else {
            let at = start - a.len();
            fill(0, &mut b[at..at + n]);
        }
        self.after_push(n, urgent_last);
    }

    fn after_push(&mut self, n: usize, urgent_last: bool) {
        if urgent_last && n > 0 {
            let byte = self.buf[self.buf.len() - 1];
            self.mark = Some(UrgentMark {
                offset: self.end() - 1,
                byte,
                taken: false,
            });
        }
    }

    fn before_push(&mut self, urgent_last: bool) {
        if urgent_last
            && !self.oob_inline
            && let Some(old) = self.mark
            && old.taken
            && old.offset == self.head
            && self.deferred == 0
            && !self.buf.is_empty()
        {
            // LINUX (tcp_check_urg): a reader sitting at the old mark skips the old urgent
            // byte when a new one arrives, so a byte already read with MSG_OOB is not
            // delivered twice. Unlike Linux, an old byte not yet read with MSG_OOB stays in
            // the stream instead of being lost.
            self.buf.pop_front();
            self.head += 1;
        }
    }

    /// At the urgent mark (SIOCATMARK).
    pub(crate) fn at_mark(&self) -> bool {
        matches!(self.mark, Some(m) if m.offset == self.head)
    }

    /// TCP read semantics: a read stops before the urgent mark if it already copied bytes;
    /// starting at the mark, the urgent byte is skipped unless SO_OOBINLINE. Deferred bytes
    /// come first, copied by `host(offset, dst)` (offset into the deferred bytes).
    pub(crate) fn read(
        &mut self,
        dst: &mut [u8],
        peek: bool,
        host: &mut dyn FnMut(usize, &mut [u8]),
    ) -> usize {
        let mut copied = self.deferred.min(dst.len());
        if copied > 0 {
            host(0, &mut dst[..copied]);
        }
        // Stream offset of buf[0].
        let base = self.head + self.deferred as u64;
        if !peek {
            self.deferred -= copied;
            self.head += copied as u64;
        }
        let mut pos = 0usize;
        let mark = self.mark.map(|m| m.offset);
        while pos < self.buf.len() && copied < dst.len() {
            let off = base + pos as u64;
            let mut end = self.buf.len();
            if let Some(m) = mark {
                if m == off {
                    if copied > 0 {
                        break;
                    }
                    if !self.oob_inline {
                        pos += 1;
                        continue;
                    }
                } else if m > off {
                    end = end.min((m - base) as usize);
                }
            }
            let n = (end - pos).min(dst.len() - copied);
            // Two slice copies (the deque's halves), not a byte loop: this is the receive path.
            let (a, b) = self.buf.as_slices();
            let out = &mut dst[copied..copied + n];
            let from_a = a.len().saturating_sub(pos).min(n);
            if from_a > 0 {
                out[..from_a].copy_from_slice(&a[pos..pos + from_a]);
            }
            if from_a < n {
                let start = pos + from_a - a.len();
                out[from_a..].copy_from_slice(&b[start..start + (n - from_a)]);
            }
            pos += n;
            copied += n;
            if mark.is_some_and(|m| m > off && base + pos as u64 == m) {
                // Stop at the mark so the application can test SIOCATMARK.
                break;
            }
        }
        if !peek {
            self.buf.drain(..pos);
            self.head += pos as u64;
        }
        copied
    }

    /// MSG_OOB read.
    pub(crate) fn take_urgent(&mut self, peek: bool) -> Option<u8> {
        if self.oob_inline {
            return None;
        }
        let m = self.mark.as_mut()?;
        if m.taken {
            return None;
        }
        if !peek {
            m.taken = true;
        }
        Some(m.byte)
    }

    /// An urgent byte is waiting for MSG_OOB (POLLPRI).
    pub(crate) fn urgent_available(&self) -> bool {
        !self.oob_inline && matches!(self.mark, Some(m) if !m.taken && m.offset >= self.head)
    }

    /// Drops everything (SHUT_RD, abort).
    pub(crate) fn clear(&mut self) {
        let n = self.held();
        self.buf.clear();
        self.deferred = 0;
        self.head += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_host(_: usize, _: &mut [u8]) {
        unreachable!("nothing deferred")
    }

    #[test]
    fn send_queue_urgent_byte_ends_its_message() {
        let mut q = SendQueue::new(100);
        assert_eq!(q.push(b"abc", false), 3);
        assert_eq!(q.push(b"de", true), 2);
        q.push(b"fgh", false);
        assert!(q.urgent_pending());
        assert_eq!(q.next_chunk(100), (5, true));
        let mut out = [0u8; 5];
        q.take_into(&mut out, 5);
        assert_eq!(&out, b"abcde");
        assert!(!q.urgent_pending());
        assert_eq!(q.next_chunk(2), (2, false));
    }

    #[test]
    fn send_queue_full_accepts_partially() {
        let mut q = SendQueue::new(4);
        assert_eq!(q.push(b"abcdef", false), 4);
        assert_eq!(q.free(), 0);
        assert_eq!(q.push(b"x", false), 0);
    }

    #[test]
    fn recv_queue_read_stops_at_mark_and_skips_urgent_byte() {
        let mut q = RecvQueue::new(false);
        q.push(b"abc", true); // 'c' urgent
        q.push(b"de", false);
        assert_eq!(q.readable(), 4);
        let mut out = [0u8; 10];
        assert_eq!(q.read(&mut out, false, &mut no_host), 2);
        assert_eq!(&out[..2], b"ab");
        assert!(q.at_mark());
        assert_eq!(q.take_urgent(false), Some(b'c'));
        assert_eq!(q.take_urgent(false), None);
        assert_eq!(q.read(&mut out, false, &mut no_host), 2);
        assert_eq!(&out[..2], b"de");
    }

    #[test]
    fn recv_queue_inline_keeps_urgent_byte_in_stream() {
        let mut q = RecvQueue::new(true);
        q.push(b"abc", true);
        q.push(b"de", false);
        let mut out = [0u8; 10];
        assert_eq!(q.read(&mut out, false, &mut no_host), 2);
        assert!(q.at_mark());
        assert_eq!(q.take_urgent(false), None);
        assert_eq!(q.read(&mut out, false, &mut no_host), 3);
        assert_eq!(&out[..3], b"cde");
    }

    #[test]
    fn recv_queue_newer_mark_returns_older_byte_to_stream() {
        let mut q = RecvQueue::new(false);
        q.push(b"ab", true); // 'b' urgent
        q.push(b"cd", true); // 'd' replaces it
        let mut out = [0u8; 10];
        assert_eq!(q.read(&mut out, false, &mut no_host), 3);
        assert_eq!(&out[..3], b"abc");
        assert_eq!(q.take_urgent(false), Some(b'd'));
    }

    #[test]
    fn recv_queue_taken_urgent_byte_not_redelivered_when_mark_moves() {
        let mut q = RecvQueue::new(false);
        q.push(b"ab", true);
        let mut out = [0u8; 10];
        assert_eq!(q.read(&mut out, false, &mut no_host), 1);
        assert_eq!(q.take_urgent(false), Some(b'b'));
        q.push(b"c", true);
        assert_eq!(q.take_urgent(false), Some(b'c'));
        assert_eq!(q.read(&mut out, false, &mut no_host), 0);
        assert_eq!(q.readable(), 0);
    }

    #[test]
    fn recv_queue_peek_does_not_consume() {
        let mut q = RecvQueue::new(false);
        q.push(b"hello", false);
        let mut out = [0u8; 3];
        assert_eq!(q.read(&mut out, true, &mut no_host), 3);
        assert_eq!(q.readable(), 5);
        assert_eq!(q.read(&mut out, false, &mut no_host), 3);
        assert_eq!(q.readable(), 2);
    }
}
