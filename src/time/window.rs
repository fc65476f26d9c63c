//! Window ends: each event's retraction, released when its time comes.
//!
//! An event of a trait with a sliding window of length `w` enters at its
//! tick `t` and leaves at [`window_end`]`(t, w) = t + w`: a `-1` at the
//! window end cancels the `+1`. Differential dataflow accepts such an
//! update at once (its time may lie ahead of the message that carries it),
//! but every arrangement it reaches then holds it in its batcher, and the
//! batcher merges every held update again at each tick until its time
//! comes. A 30-minute window holds 30 minutes of retractions, merged and
//! compared on every tick.
//!
//! [`retract_at_window_end`] keeps the retractions here instead, in a heap
//! ordered by time, with one capability at the earliest, and releases each
//! when the input frontier reaches its time. The updates and their times
//! are exactly those of emitting the retraction up front; only when they
//! travel changes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use super::Time;

/// Passes `updates` (`(data, time, diff)`) through and, for each one whose
/// `window_end(data, time)` is `Some(end)` (after `time`), adds `(data,
/// end, -diff)`, emitted when the input frontier reaches `end` (at the
/// latest, when the input ends). `ends` are retractions to hold as they are (`(data, window end,
/// diff)`): those of contributions restored from a checkpoint, whose
/// entries are restored at another time than their own.
pub fn retract_at_window_end<'s, D, W>(
    updates: Stream<'s, Time, Vec<(D, Time, isize)>>,
    ends: Stream<'s, Time, Vec<(D, Time, isize)>>,
    window_end: W,
) -> Stream<'s, Time, Vec<(D, Time, isize)>>
where
    D: Clone + 'static,
    W: Fn(&D, Time) -> Option<Time> + 'static,
{
    updates.binary_frontier::<_, CapacityContainerBuilder<Vec<(D, Time, isize)>>, _, _, _, _>(
        ends,
        Pipeline,
        Pipeline,
        "Window ends",
        move |_initial, _info| {
            // A heap by window end: one entry per retraction, with no
            // allocation per distinct end (most ends hold one or two).
            let mut pending: BinaryHeap<Due<D>> = BinaryHeap::new();
            // A capability at the earliest pending window end.
            let mut held: Option<Capability<Time>> = None;
            move |(input, frontier), (ends, ends_frontier), output| {
                ends.for_each(|cap, data| {
                    for (d, end, r) in data.drain(..) {
                        if held.as_ref().is_none_or(|h| end < *h.time()) {
                            held = Some(cap.delayed(&end, 0));
                        }
                        pending.push(Due(Reverse(end), d, r));
                    }
                });
                input.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for (d, t, r) in data.drain(..) {
                        if let Some(end) = window_end(&d, t) {
                            if held.as_ref().is_none_or(|h| end < *h.time()) {
                                held = Some(cap.delayed(&end, 0));
                            }
                            pending.push(Due(Reverse(end), d.clone(), -r));
                        }
                        session.give((d, t, r));
                    }
                });
                // The earliest time the input may still carry (`None`: it
                // has ended): window ends up to it are due.
                let reached = frontier
                    .frontier()
                    .iter()
                    .chain(ends_frontier.frontier().iter())
                    .min()
                    .copied();
                if let Some(h) = held.as_mut() {
                    {
                        let mut session = output.session(h);
                        while let Some(Due(Reverse(time), _, _)) = pending.peek() {
                            if reached.is_some_and(|f| *time > f) {
                                break;
                            }
                            let Due(Reverse(time), d, r) = pending.pop().expect("peeked");
                            session.give((d, time, r));
                        }
                    }
                    match pending.peek() {
                        Some(Due(Reverse(next), _, _)) => h.downgrade(next),
                        None => held = None,
                    }
                }
            }
        },
    )
}

/// A retraction due at its window end, ordered by the end alone (the
/// order of retractions due at the same time does not matter).
struct Due<D>(Reverse<Time>, D, isize);

impl<D> PartialEq for Due<D> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<D> Eq for Due<D> {}

impl<D> PartialOrd for Due<D> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<D> Ord for Due<D> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use timely::dataflow::operators::capture::{Capture, Extract};
    use timely::dataflow::operators::{Input, Probe};

    use super::*;

    /// The retractions come out at their window ends, no earlier than the
    /// frontier reaches them, and every one comes out when the input ends.
    #[test]
    fn retractions_are_released_at_their_window_ends() {
        let (probe_times, captured) = timely::execute_directly(|worker| {
            let (mut input, probe, captured) = worker.dataflow::<Time, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<(&'static str, Time, isize)>>();
                let ends = timely::dataflow::operators::generic::operator::empty(scope);
                let out = retract_at_window_end(stream, ends, |d: &&str, t| match *d {
                    "a" => Some(t + 1_000),
                    "b" => Some(t + 300),
                    _ => None,
                });
                let (probe, out) = out.probe();
                (input, probe, out.capture())
            });
            let mut probe_times = Vec::new();
            input.send(("a", 100, 1));
            input.send(("b", 100, 1));
            input.send(("c", 100, 1));
            for t in [200, 400, 1_000, 1_200] {
                input.advance_to(t);
                worker.step_while(|| probe.less_than(input.time()));
                // The output frontier stays at the earliest pending end.
                probe_times.push((t, probe.with_frontier(|f| f.iter().min().copied())));
            }
            input.send(("a", 1_500, 2));
            drop(input);
            while worker.step() {}
            (probe_times, captured)
        });
        let mut updates: Vec<_> = captured
            .extract()
            .into_iter()
            .flat_map(|(_, v)| v)
            .collect();
        updates.sort_by_key(|(d, t, r)| (*t, *d, *r));
        assert_eq!(
            updates,
            vec![
                ("a", 100, 1),
                ("b", 100, 1),
                ("c", 100, 1),
                ("b", 400, -1),
                ("a", 1_100, -1),
                ("a", 1_500, 2),
                ("a", 2_500, -2),
            ]
        );
        assert_eq!(
            probe_times,
            vec![
                (200, Some(200)),
                (400, Some(400)),
                (1_000, Some(1_000)),
                (1_200, Some(1_200)),
            ]
        );
    }
}
