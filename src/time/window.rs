//! Window ends: when each event leaves its window.
//!
//! An event of a trait with a sliding window of length `w` enters at its
//! tick `t` and leaves at [`crate::time::window_end`]`(t, w) = t + w`; a
//! tumbling window's events leave at the next calendar boundary, a
//! session's at its longest span. The stage that holds the events
//! ([`crate::dataflow::route`]) takes each out of its window when the
//! time reaches its end, in time order, from a [`WindowEnds`] queue: the
//! updates and their times are exactly those of a retraction emitted up
//! front at the window end, as differential dataflow would hold it, but
//! nothing waits in an arrangement's batcher (which merges every held
//! update again at each tick until its time comes).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::Time;

/// Keys waiting for their window ends, earliest end first: a key is
/// pushed once per end it waits for and taken when the time reaches it.
pub struct WindowEnds<K> {
    heap: BinaryHeap<Reverse<(Time, K)>>,
}

impl<K: Ord> Default for WindowEnds<K> {
    fn default() -> Self {
        WindowEnds {
            heap: BinaryHeap::new(),
        }
    }
}

impl<K: Ord> WindowEnds<K> {
    /// `key` waits for `end` (ms).
    pub fn push(&mut self, end: Time, key: K) {
        self.heap.push(Reverse((end, key)));
    }

    /// The earliest end waited for.
    pub fn next(&self) -> Option<Time> {
        self.heap.peek().map(|Reverse((end, _))| *end)
    }

    /// Takes a key whose end is at or before `time`, earliest first.
    pub fn pop_due(&mut self, time: Time) -> Option<(Time, K)> {
        match self.heap.peek() {
            Some(Reverse((end, _))) if *end <= time => self.heap.pop().map(|Reverse(d)| d),
            _ => None,
        }
    }

    /// How many ends are waited for.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no end is waited for.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys come out at their ends, earliest first, and not before.
    #[test]
    fn keys_come_out_when_their_end_is_reached() {
        let mut ends = WindowEnds::default();
        ends.push(1_100, "a");
        ends.push(400, "b");
        ends.push(2_500, "a");
        assert_eq!(ends.next(), Some(400));
        assert_eq!(ends.pop_due(399), None);
        assert_eq!(ends.pop_due(400), Some((400, "b")));
        assert_eq!(ends.pop_due(1_000), None);
        assert_eq!(ends.pop_due(3_000), Some((1_100, "a")));
        assert_eq!(ends.pop_due(3_000), Some((2_500, "a")));
        assert!(ends.is_empty());
    }
}
