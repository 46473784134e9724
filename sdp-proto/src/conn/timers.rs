//! Timers as an enum indexing a table of deadlines (quinn style).

use crate::time::Timestamp;

/// The connection's timers (SDP-WIRE.md §4.3, §5.1, §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Our SrcAvail saw no RdmaRdCompl/SendSM in time: send SrcAvailCancel (LINUX 1 s).
    SrcAvailAdvert,
    /// Our SrcAvailCancel was not answered: reset (LINUX 60 s).
    SrcAvailCancel,
    /// Orphaned FIN_WAIT1 without the peer's DisConn: abortive disconnect (LINUX 60 s).
    FinWait,
    /// LAST_ACK without the CM disconnect: abortive disconnect (LINUX 60 s).
    LastAck,
    /// TIME_WAIT guard: the connection is closed when it fires (LINUX 150 s).
    TimeWait,
    /// SO_KEEPALIVE idle probe.
    Keepalive,
}

impl Timer {
    /// Number of timers.
    pub const COUNT: usize = 6;
    /// Every timer, in table order.
    pub const ALL: [Timer; Timer::COUNT] = [
        Timer::SrcAvailAdvert,
        Timer::SrcAvailCancel,
        Timer::FinWait,
        Timer::LastAck,
        Timer::TimeWait,
        Timer::Keepalive,
    ];

    fn index(self) -> usize {
        match self {
            Timer::SrcAvailAdvert => 0,
            Timer::SrcAvailCancel => 1,
            Timer::FinWait => 2,
            Timer::LastAck => 3,
            Timer::TimeWait => 4,
            Timer::Keepalive => 5,
        }
    }
}

/// Deadlines, one slot per [`Timer`].
#[derive(Debug, Clone, Default)]
pub(crate) struct TimerTable {
    deadlines: [Option<Timestamp>; Timer::COUNT],
}

impl TimerTable {
    pub(crate) fn set(&mut self, t: Timer, at: Timestamp) {
        self.deadlines[t.index()] = Some(at);
    }
    pub(crate) fn stop(&mut self, t: Timer) {
        self.deadlines[t.index()] = None;
    }
    pub(crate) fn get(&self, t: Timer) -> Option<Timestamp> {
        self.deadlines[t.index()]
    }
    pub(crate) fn stop_all(&mut self) {
        self.deadlines = [None; Timer::COUNT];
    }
    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Timestamp> {
        self.deadlines.iter().flatten().min().copied()
    }
    /// The first expired timer (table order), cleared.
    pub(crate) fn pop_expired(&mut self, now: Timestamp) -> Option<Timer> {
        for t in Timer::ALL {
            if let Some(d) = self.get(t)
                && d <= now
            {
                self.stop(t);
                return Some(t);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_next_is_earliest_and_pop_clears() {
        let mut t = TimerTable::default();
        assert_eq!(t.next(), None);
        t.set(Timer::FinWait, Timestamp::from_nanos(50));
        t.set(Timer::Keepalive, Timestamp::from_nanos(20));
        assert_eq!(t.next(), Some(Timestamp::from_nanos(20)));
        assert_eq!(t.pop_expired(Timestamp::from_nanos(10)), None);
        assert_eq!(
            t.pop_expired(Timestamp::from_nanos(60)),
            Some(Timer::FinWait)
        );
        assert_eq!(
            t.pop_expired(Timestamp::from_nanos(60)),
            Some(Timer::Keepalive)
        );
        assert_eq!(t.next(), None);
    }
}
