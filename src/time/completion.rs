//! Completion: which times the commit stage may write.
//!
//! A time `t` is **complete** once the input frontier of the commit stage
//! (the least watermark over all sources, carried through the dataflow by
//! timely's progress tracking) has passed it: no worker can still produce
//! an update at or before `t`.
//!
//! A complete time is **committed** (its diffs and state written) only if
//! it is not later than the **end of the data**: the largest source clock
//! ([`super::SourceClock::clock`]), i.e. the latest tick admitted or the
//! wall-clock watermark of an idle live source. Window ends after the last
//! event of a finite replay are therefore not part of its result: the final
//! state is "as of" the last event, not at infinity. A live source's clock
//! follows the wall clock, so its window ends are committed as they pass.
//!
//! A replayed source (a file, not followed) **cut** short by a graceful
//! shutdown (SIGTERM) reports its watermark: every record it would still have admitted is at or after it.
//! Only earlier times are committed, so an interrupted run writes a prefix of
//! what the uninterrupted run writes, never window ends that only look due
//! because the other sources were read further. A live source of a run
//! with state is cut at the start of the tick in progress (clients may
//! still be sending lines of it; the next run reads them). Without state a
//! live source has no rest to read: everything it read is committed.

use super::Time;

/// What a source reports that the commit rule reads, for the stages that
/// keep their own copy of it ([`Completion::note`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ClockReport {
    /// A source clock (ms): see [`Completion::observe`].
    Clock(Time),
    /// A cut watermark (ms): see [`Completion::observe_cut`].
    Cut(Time),
}

/// The commit rule (see the [module documentation](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    end_of_data: Option<Time>,
    /// The least watermark of a source cut short by a graceful shutdown.
    cut: Option<Time>,
}

impl Completion {
    /// The rule of a run that restored a checkpoint at cut `restored_before`
    /// (0: none): the checkpoint's state is as of `restored_before - 1`, so
    /// the data ends there at the earliest, even if the run is stopped
    /// before any source reports a clock (its restored state is then still
    /// committed, and counted in its summary).
    pub fn restored(restored_before: Time) -> Completion {
        let mut c = Completion::default();
        if restored_before > 0 {
            c.observe(restored_before - 1);
        }
        c
    }

    /// Notes a source clock.
    pub fn observe(&mut self, clock: Time) {
        self.end_of_data = Some(self.end_of_data.map_or(clock, |e| e.max(clock)));
    }

    /// Notes a source that a graceful shutdown ended at `watermark`
    /// before its input ended: the records it did not read are at or after
    /// that time, so no time from it on is committed. (Otherwise the other
    /// sources, read further, would carry the end of the data past it, and
    /// windows would close on data that was merely not read.)
    pub fn observe_cut(&mut self, watermark: Time) {
        self.cut = Some(self.cut.map_or(watermark, |c| c.min(watermark)));
    }

    /// The largest source clock seen.
    pub fn end_of_data(&self) -> Option<Time> {
        self.end_of_data
    }

    /// The least watermark of a source cut short by a graceful shutdown,
    /// if any.
    pub fn cut(&self) -> Option<Time> {
        self.cut
    }

    /// Whether `time` is complete given the commit stage's input frontier
    /// (`None`: every input has ended).
    pub fn is_complete(time: Time, frontier: Option<Time>) -> bool {
        frontier.is_none_or(|f| time < f)
    }

    /// Whether `time` may be committed now.
    pub fn committable(&self, time: Time, frontier: Option<Time>) -> bool {
        Self::is_complete(time, frontier)
            && self.end_of_data.is_some_and(|e| time <= e)
            && self.cut.is_none_or(|c| time < c)
    }

    /// Whether `time` will never be committed once every input has ended:
    /// it is after the end of the data (or no source clock was seen), or
    /// at or after a cut. The stages before the commit stage stop working
    /// on such times when their inputs end (the window ends and wake-ups a
    /// finite replay leaves in the future are no part of its result).
    pub fn never_committed(&self, time: Time) -> bool {
        self.end_of_data.is_none_or(|e| time > e) || self.cut.is_some_and(|c| time >= c)
    }

    /// Notes a source's report ([`ClockReport`]).
    pub fn note(&mut self, report: ClockReport) {
        match report {
            ClockReport::Clock(tick) => self.observe(tick),
            ClockReport::Cut(watermark) => self.observe_cut(watermark),
        }
    }

    /// The least time that may not be committed yet: every time before it
    /// is [`committable`](Self::committable) (and every later one is not).
    /// `Time::MAX` once every input has ended: the times after the end of
    /// the data will never be committed.
    pub fn horizon(&self, frontier: Option<Time>) -> Time {
        match (frontier, self.end_of_data) {
            (None, _) => Time::MAX,
            (Some(_), None) => 0,
            (Some(f), Some(e)) => f
                .min(e.saturating_add(1))
                .min(self.cut.unwrap_or(Time::MAX)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_complete_times_up_to_the_end_of_data() {
        let mut c = Completion::default();
        assert!(!c.committable(0, None), "nothing seen: nothing to commit");
        c.observe(5_000);
        c.observe(3_000);
        assert_eq!(c.end_of_data(), Some(5_000));
        assert!(c.committable(4_000, Some(5_000)));
        assert!(!c.committable(5_000, Some(5_000)), "not complete");
        assert!(c.committable(5_000, None));
        assert!(!c.committable(6_000, None), "after the last event");
        assert!(Completion::is_complete(6_000, None));
    }

    #[test]
    fn the_horizon_is_the_first_time_not_committable() {
        let mut c = Completion::default();
        assert_eq!(c.horizon(Some(5_000)), 0, "nothing seen");
        c.observe(3_000);
        assert_eq!(c.horizon(Some(5_000)), 3_001, "the end of the data");
        assert_eq!(c.horizon(Some(2_000)), 2_000, "the frontier");
        for t in [0, 1_999, 2_000, 3_000] {
            assert_eq!(c.committable(t, Some(2_000)), t < c.horizon(Some(2_000)));
            assert_eq!(c.committable(t, Some(5_000)), t < c.horizon(Some(5_000)));
        }
        assert_eq!(c.horizon(None), Time::MAX, "ended");
    }

    #[test]
    fn a_cut_source_stops_commits_at_its_watermark() {
        let mut c = Completion::default();
        c.observe(9_000);
        c.observe_cut(4_000);
        c.observe_cut(6_000);
        assert!(c.committable(3_999, None));
        assert!(!c.committable(4_000, None), "the least cut counts");
        assert!(!c.committable(8_000, None), "though data reached 9 s");
        assert_eq!(c.horizon(Some(7_000)), 4_000);
        for t in [0, 3_999, 4_000, 6_500] {
            assert_eq!(c.committable(t, Some(7_000)), t < c.horizon(Some(7_000)));
        }
    }
}
