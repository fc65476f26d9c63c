//! The watermark of one source, and the admission of its records.
//!
//! One [`SourceClock`] per source, owned by the worker that reads the
//! source, sees every record's event time in input order. That makes
//! "late" and "future" properties of the input, not of the cluster's shape:
//! `-w 1`, `-w 4` and `-n 2` admit the same records of a replay.
//!
//! # The rule
//!
//! With tick `k`, allowed lateness `L`, idle advance `I` and the floor to a
//! tick written `⌊x⌋`:
//!
//! * **Replay** (a file read to its end; its clock is its data):
//!   `watermark = ⌊⌊latest event time⌋ − L⌋`, where the latest event time
//!   is the largest of the records admitted so far.
//! * **Live** (a followed file or a TCP listener; it runs on the wall
//!   clock): each admitted record counts towards the latest event time with
//!   at most the wall clock at its arrival, so
//!   `watermark = ⌊⌊min(latest event time, wall clock)⌋ − L⌋` never passes
//!   `⌊wall clock − L⌋`. A live source that has read nothing for `I` is
//!   *idle*: its watermark follows the wall clock, `⌊wall clock − L⌋`, so
//!   windows expire while nothing arrives. A pause of any length loses
//!   nothing that is on time: a record stamped at its sending time `s` and
//!   read within `L` of it is never below the watermark.
//!
//! The watermark never moves back. A record whose tick is below the
//! watermark is **late**. A record dated more than `max_future_skew` ahead
//! (of the wall clock when live, of the latest event time for a replay) is
//! **future**: dead-lettered, and it moves nothing.
//!
//! # Worked example (live, `k` = 100 ms, `L` = 0, `I` = 200 ms)
//!
//! | wall clock | what happens | watermark |
//! |---|---|---|
//! | 10 000 | start | 0 |
//! | 10 200 | idle for 200 ms: follow the wall clock | 10 200 |
//! | 10 250 | a record stamped 10 249 arrives: tick 10 200, on time | 10 200 |
//! | 10 300 | a record stamped 10 300 arrives: tick 10 300 | 10 300 |
//! | 10 300 … 11 300 | the client pauses one second; after 200 ms idle the watermark follows the wall clock | 10 500, 10 600, …, 11 300 |
//! | 11 310 | a record stamped 11 305 arrives: tick 11 300 ≥ 11 300, on time | 11 300 |
//! | 11 320 | a record stamped 90 000 (a device clock 78 s ahead; `max_future_skew` 1 min) | future, dead-lettered; 11 300 |
//! | 11 330 | a record stamped 11 150 (sent 180 ms ago) | late (tick 11 100 < 11 300) |
//!
//! Before this rule, an idle source's clock was advanced by the whole idle
//! time again at every check, so it ran ahead of the wall clock and a
//! client that paused lost every later event.

use super::{Time, TimeConfig, DEFAULT_LIVE_MAX_FUTURE_SKEW_MS};

/// What happens to one record, by its event time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// On time: the record enters the dataflow at this tick.
    OnTime(Time),
    /// Late, and `late_policy = "clamp"`: it enters at the watermark.
    Clamped(Time),
    /// Late, and `late_policy = "dead-letter"`.
    Late {
        /// The record's event time (ms).
        event_ms: i64,
        /// The watermark it is below (ms).
        watermark: Time,
    },
    /// Dated beyond `max_future_skew`.
    Future {
        /// The record's event time (ms).
        event_ms: i64,
        /// The skew allowed (ms).
        skew_ms: u64,
        /// What the skew is measured from: the wall clock (live) or the
        /// latest event time (replay), in ms.
        reference_ms: u64,
        /// Whether the reference is the wall clock.
        live: bool,
    },
}

impl Admission {
    /// The tick the record enters at, if it is admitted.
    pub fn time(&self) -> Option<Time> {
        match self {
            Admission::OnTime(t) | Admission::Clamped(t) => Some(*t),
            _ => None,
        }
    }

    /// Whether the record was late (dead-lettered or clamped).
    pub fn is_late(&self) -> bool {
        matches!(self, Admission::Late { .. } | Admission::Clamped(_))
    }

    /// The dead-letter reason of a record that is not admitted, e.g.
    /// `late: event time 1000 ms is before the watermark 2000 ms`.
    pub fn reason(&self) -> Option<String> {
        match self {
            Admission::OnTime(_) | Admission::Clamped(_) => None,
            Admission::Late {
                event_ms,
                watermark,
            } => Some(format!(
                "late: event time {event_ms} ms is before the watermark {watermark} ms"
            )),
            Admission::Future {
                event_ms,
                skew_ms,
                reference_ms,
                live,
            } => Some(format!(
                "future: event time {event_ms} ms is more than max_future_skew = {skew_ms} ms ahead of {} {reference_ms} ms",
                if *live {
                    "the wall clock"
                } else {
                    "the source's latest event time"
                }
            )),
        }
    }
}

/// What a replayed source's clock has seen, to start a clock again where
/// another stopped ([`SourceClock::state`], [`SourceClock::restored`]): a
/// reader resumed from a checkpoint at a line of its input judges every
/// later line as the first reader did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockState {
    /// Latest event time admitted (ms).
    pub latest_ms: Option<u64>,
    /// Largest tick admitted.
    pub max_tick: Option<Time>,
    /// The watermark (ms).
    pub watermark: Time,
}

/// The event-time clock of one source: its watermark, and the admission of
/// its records (see the [module documentation](self) for the rule).
#[derive(Clone, Debug)]
pub struct SourceClock {
    config: TimeConfig,
    live: bool,
    /// Latest event time admitted (ms); for a live source, each record
    /// counts with at most the wall clock at its arrival.
    latest_ms: Option<u64>,
    /// Largest tick admitted.
    max_tick: Option<Time>,
    watermark: Time,
    /// Wall clock (ms) when the source last read anything (live only).
    last_activity_ms: u64,
    /// A live source that waits for its first line (a socket of a
    /// restored run, whose clients send again what the checkpoint does not
    /// hold): it does not idle before this wall clock (ms) unless it has
    /// read a line.
    quiet_until_ms: Option<u64>,
}

impl SourceClock {
    /// The clock of a source that starts at wall clock `now_ms`.
    pub fn new(config: TimeConfig, live: bool, now_ms: u64) -> SourceClock {
        SourceClock {
            config,
            live,
            latest_ms: None,
            max_tick: None,
            watermark: 0,
            last_activity_ms: now_ms,
            quiet_until_ms: None,
        }
    }

    /// Makes a live source wait for its first line before its watermark
    /// follows the wall clock: it does not idle before `until_ms` (wall
    /// clock) unless it reads a line first, after which `idle_advance`
    /// applies as always. A restored run gives its sockets the allowed
    /// lateness from its start, so that lines sent again after a restart,
    /// oldest first, are on time.
    pub fn wait_for_first_line(&mut self, until_ms: u64) {
        self.quiet_until_ms = Some(until_ms);
    }

    /// A clock that continues from `state` (see [`ClockState`]): a
    /// replay's, or a live source's (a followed file), which counts from
    /// wall clock `now_ms` as when it was last read.
    pub fn restored(config: TimeConfig, state: ClockState, live: bool, now_ms: u64) -> SourceClock {
        SourceClock {
            latest_ms: state.latest_ms,
            max_tick: state.max_tick,
            watermark: state.watermark,
            ..SourceClock::new(config, live, now_ms)
        }
    }

    /// What this clock has seen (for a replay, all that decides how it
    /// judges the lines that follow).
    pub fn state(&self) -> ClockState {
        ClockState {
            latest_ms: self.latest_ms,
            max_tick: self.max_tick,
            watermark: self.watermark,
        }
    }

    /// The watermark (ms, a multiple of the tick): every time below it is
    /// complete as far as this source is concerned.
    pub fn watermark(&self) -> Time {
        self.watermark
    }

    /// The source's contribution to the end of the data
    /// ([`super::Completion`]): the largest tick admitted, or the watermark
    /// if an idle live source has moved past it. `None` before anything.
    pub fn clock(&self) -> Option<Time> {
        let idle = (self.watermark > 0).then_some(self.watermark);
        self.max_tick.max(idle)
    }

    /// The largest tick of a record admitted so far (`None` before any).
    pub fn admitted(&self) -> Option<Time> {
        self.max_tick
    }

    /// Notes that the source read something at `now_ms` (any line, even one
    /// that is dead-lettered): it is not idle.
    pub fn activity(&mut self, now_ms: u64) {
        self.last_activity_ms = self.last_activity_ms.max(now_ms);
        self.quiet_until_ms = None;
    }

    fn max_future_skew(&self) -> Option<u64> {
        match (self.config.max_future_skew_ms, self.live) {
            (Some(s), _) => Some(s),
            (None, true) => Some(DEFAULT_LIVE_MAX_FUTURE_SKEW_MS),
            (None, false) => None,
        }
    }

    /// Decides about a record with event time `event_ms`, read at wall clock
    /// `now_ms`, and moves the watermark. Records must be offered in input
    /// order.
    pub fn admit(&mut self, event_ms: i64, now_ms: u64) -> Admission {
        if self.live {
            self.activity(now_ms);
        }
        let ms = u64::try_from(event_ms).unwrap_or(0);
        if let Some(skew_ms) = self.max_future_skew() {
            let reference = if self.live {
                Some(now_ms)
            } else {
                self.latest_ms
            };
            if let Some(reference_ms) = reference {
                if ms > reference_ms.saturating_add(skew_ms) {
                    return Admission::Future {
                        event_ms,
                        skew_ms,
                        reference_ms,
                        live: self.live,
                    };
                }
            }
        }
        let tick = self.config.floor(ms);
        if tick < self.watermark {
            return match self.config.late_policy {
                super::LatePolicy::DeadLetter => Admission::Late {
                    event_ms,
                    watermark: self.watermark,
                },
                super::LatePolicy::Clamp => Admission::Clamped(self.watermark),
            };
        }
        let counted = if self.live { ms.min(now_ms) } else { ms };
        self.latest_ms = Some(self.latest_ms.map_or(counted, |l| l.max(counted)));
        self.max_tick = Some(self.max_tick.map_or(tick, |m| m.max(tick)));
        let latest_tick = self.config.floor(self.latest_ms.unwrap_or(0));
        let data = self
            .config
            .floor(latest_tick.saturating_sub(self.config.allowed_lateness_ms));
        self.watermark = self.watermark.max(data);
        Admission::OnTime(tick)
    }

    /// Called when the source has nothing to read at wall clock `now_ms`:
    /// a live source idle for `idle_advance` moves its watermark up to
    /// `⌊now − allowed lateness⌋`. Returns whether the watermark moved.
    pub fn idle(&mut self, now_ms: u64) -> bool {
        if self.quiet_until_ms.is_some_and(|until| now_ms < until) {
            return false;
        }
        if !self.live
            || now_ms
                < self
                    .last_activity_ms
                    .saturating_add(self.config.idle_advance_ms)
        {
            return false;
        }
        let bound = self
            .config
            .floor(now_ms.saturating_sub(self.config.allowed_lateness_ms));
        if bound > self.watermark {
            self.watermark = bound;
            true
        } else {
            false
        }
    }

    /// Whether a source whose input has ended may finish at wall clock
    /// `now_ms` (finishing completes every time it holds back). A replay
    /// may at once. A live source waits until the wall clock has passed its
    /// largest admitted tick, so that nothing is written before the wall
    /// clock reaches its time: a record dated ahead (within
    /// `max_future_skew`) waits for its time. Returns the milliseconds
    /// still to wait, or `None` to finish now.
    pub fn wait_before_finishing(&self, now_ms: u64) -> Option<u64> {
        let end = self.max_tick?.saturating_add(self.config.tick_ms.max(1));
        (self.live && now_ms < end).then(|| end - now_ms)
    }

    /// How long (ms) from `now_ms` until an idle live source's watermark
    /// would next move; `None` for a replay.
    pub fn next_idle_move_in(&self, now_ms: u64) -> Option<u64> {
        if !self.live {
            return None;
        }
        let idle_at = self
            .last_activity_ms
            .saturating_add(self.config.idle_advance_ms)
            .max(self.quiet_until_ms.unwrap_or(0));
        let next_tick = self
            .watermark
            .saturating_add(self.config.tick_ms.max(1))
            .saturating_add(self.config.allowed_lateness_ms);
        Some(idle_at.max(next_tick).saturating_sub(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::LatePolicy;

    fn config(tick: u64, lateness: u64, idle: u64) -> TimeConfig {
        TimeConfig {
            tick_ms: tick,
            allowed_lateness_ms: lateness,
            idle_advance_ms: idle,
            max_future_skew_ms: None,
            late_policy: LatePolicy::DeadLetter,
        }
    }

    #[test]
    fn replay_watermark_follows_the_data() {
        let mut c = SourceClock::new(config(1_000, 5_000, 1_000), false, 0);
        assert_eq!(c.clock(), None);
        assert_eq!(c.admit(100_500, 7), Admission::OnTime(100_000));
        assert_eq!(c.watermark(), 95_000);
        assert_eq!(c.admit(96_000, 7), Admission::OnTime(96_000));
        assert_eq!(
            c.admit(94_999, 7),
            Admission::Late {
                event_ms: 94_999,
                watermark: 95_000
            }
        );
        // The wall clock means nothing to a replay.
        assert!(!c.idle(u64::MAX / 2));
        assert_eq!(c.watermark(), 95_000);
        assert_eq!(c.clock(), Some(100_000));
        assert_eq!(c.next_idle_move_in(0), None);
    }

    /// The lateness is counted from the tick of the latest event, as it
    /// always was for replays: with a 1 s tick and 500 ms lateness, a
    /// record of the previous tick is still on time after 1.7 s.
    #[test]
    fn replay_lateness_counts_from_the_latest_tick() {
        let mut c = SourceClock::new(config(1_000, 500, 1_000), false, 0);
        assert_eq!(c.admit(1_700, 0), Admission::OnTime(1_000));
        assert_eq!(c.watermark(), 0);
        assert_eq!(c.admit(200, 0), Admission::OnTime(0));
        assert_eq!(c.admit(2_100, 0), Admission::OnTime(2_000));
        assert_eq!(c.watermark(), 1_000);
        assert!(c.admit(999, 0).reason().unwrap().starts_with("late:"));
    }

    #[test]
    fn clamp_moves_late_records_to_the_watermark() {
        let mut cfg = config(1_000, 0, 1_000);
        cfg.late_policy = LatePolicy::Clamp;
        let mut c = SourceClock::new(cfg, false, 0);
        c.admit(10_000, 0);
        let a = c.admit(3_000, 0);
        assert_eq!(a, Admission::Clamped(10_000));
        assert!(a.is_late());
        assert_eq!(a.reason(), None);
    }

    /// The scenario: a record every 300 ms stamped with the wall
    /// clock, a one-second pause, five more 50 ms apart: none is late, and
    /// the watermark never passes the wall clock.
    #[test]
    fn a_source_that_waits_for_its_first_line_does_not_idle_before_it() {
        // Tick 100 ms, lateness 2 s, idle after 200 ms; a restart at `start`
        // whose clients send again lines from 3 s before it.
        let start = 1_795_990_827_000u64;
        let fresh = || SourceClock::new(config(100, 2_000, 200), true, start);
        let mut waiting = fresh();
        waiting.wait_for_first_line(start + 2_000);
        let mut plain = fresh();
        let now = start + 600;
        assert!(plain.idle(now), "a plain live source idles after 200 ms");
        assert!(!waiting.idle(now), "a waiting one does not");
        assert_eq!(waiting.next_idle_move_in(now), Some(1_400));
        let old = start - 3_000;
        assert!(matches!(
            plain.admit(old as i64, now),
            Admission::Late { .. }
        ));
        assert_eq!(
            waiting.admit(old as i64, now),
            Admission::OnTime(old / 100 * 100)
        );
        // Once it has read a line, idle_advance applies as always.
        assert!(waiting.idle(now + 300), "idle 300 ms after its line");
        // And without any line, it idles once the wait is over.
        let mut quiet = fresh();
        quiet.wait_for_first_line(start + 2_000);
        assert!(!quiet.idle(start + 1_999));
        assert!(quiet.idle(start + 2_000));
    }

    #[test]
    fn live_pauses_lose_nothing_and_the_watermark_stays_behind_the_wall_clock() {
        let start = 1_795_990_827_000u64;
        let mut c = SourceClock::new(config(100, 0, 200), true, start);
        let mut now = start;
        let mut sends = Vec::new();
        for i in 0..5 {
            sends.push(start + 50 + i * 300);
        }
        let last = *sends.last().unwrap();
        for i in 0..5 {
            sends.push(last + 1_000 + i * 50);
        }
        for send in sends {
            // Idle checks every 10 ms until the next record.
            while now + 10 < send {
                now += 10;
                c.idle(now);
                assert!(
                    c.watermark() <= now,
                    "watermark {} passes the wall clock {now}",
                    c.watermark()
                );
            }
            now = send;
            let a = c.admit(send as i64, now);
            assert_eq!(a, Admission::OnTime(send / 100 * 100), "record at {send}");
        }
        // Idle for long: the watermark follows the wall clock, not beyond.
        for _ in 0..500 {
            now += 10;
            c.idle(now);
            assert!(c.watermark() <= now);
        }
        assert_eq!(c.watermark(), now / 100 * 100);
    }

    #[test]
    fn idle_waits_for_idle_advance_and_does_not_run_away() {
        let mut c = SourceClock::new(config(100, 1_000, 500), true, 10_000);
        assert!(!c.idle(10_499));
        assert!(c.idle(10_500));
        assert_eq!(c.watermark(), 9_500);
        assert_eq!(c.clock(), Some(9_500));
        // Repeated checks at the same wall clock move nothing.
        assert!(!c.idle(10_500));
        assert!(!c.idle(10_550));
        assert_eq!(c.watermark(), 9_500);
        assert_eq!(c.next_idle_move_in(10_550), Some(50));
        // A record resets idleness; idle_advance later it moves again.
        assert_eq!(c.admit(10_560, 10_560), Admission::OnTime(10_500));
        assert_eq!(c.watermark(), 9_500);
        assert!(!c.idle(11_000));
        assert!(c.idle(11_060));
        assert_eq!(c.watermark(), 10_000);
    }

    #[test]
    fn a_first_record_long_after_start_is_on_time() {
        let mut c = SourceClock::new(config(100, 0, 200), true, 50_000);
        for now in (50_000..60_000).step_by(10) {
            c.idle(now);
        }
        assert_eq!(c.watermark(), 59_900);
        assert_eq!(c.admit(60_001, 60_002), Admission::OnTime(60_000));
    }

    #[test]
    fn a_live_source_finishes_once_the_wall_clock_passes_its_last_tick() {
        let mut c = SourceClock::new(config(100, 0, 200), true, 1_000_000);
        assert_eq!(c.wait_before_finishing(1_000_000), None, "nothing admitted");
        c.admit(1_030_050, 1_000_000); // 30 s ahead, within the skew
        assert_eq!(c.wait_before_finishing(1_000_000), Some(30_100));
        assert_eq!(c.wait_before_finishing(1_030_099), Some(1));
        assert_eq!(c.wait_before_finishing(1_030_100), None);
        let mut r = SourceClock::new(config(100, 0, 200), false, 0);
        r.admit(5_000_000, 0);
        assert_eq!(
            r.wait_before_finishing(0),
            None,
            "a replay finishes at once"
        );
    }

    #[test]
    fn future_records_do_not_move_the_watermark() {
        // Live: relative to the wall clock, one minute by default.
        let mut c = SourceClock::new(config(100, 0, 200), true, 1_000_000);
        let a = c.admit(1_060_001, 1_000_000);
        assert_eq!(
            a.reason().unwrap(),
            "future: event time 1060001 ms is more than max_future_skew = 60000 ms ahead of the wall clock 1000000 ms"
        );
        assert_eq!(c.watermark(), 0);
        // Within the skew: admitted at its own tick, but the watermark moves
        // only up to the wall clock.
        assert_eq!(c.admit(1_030_000, 1_000_000), Admission::OnTime(1_030_000));
        assert_eq!(c.watermark(), 1_000_000);
        assert_eq!(c.admit(1_000_050, 1_000_060), Admission::OnTime(1_000_000));

        // Replay: relative to the latest event time, only when configured.
        let mut cfg = config(1_000, 0, 0);
        let mut r = SourceClock::new(cfg, false, 0);
        r.admit(10_000, 0);
        assert!(r.admit(i64::MAX / 4, 0).time().is_some());
        cfg.max_future_skew_ms = Some(3_600_000);
        let mut r = SourceClock::new(cfg, false, 0);
        assert_eq!(r.admit(10_000, 0), Admission::OnTime(10_000));
        assert_eq!(
            r.admit(3_610_001, 0).reason().unwrap(),
            "future: event time 3610001 ms is more than max_future_skew = 3600000 ms ahead of the source's latest event time 10000 ms"
        );
        assert_eq!(r.watermark(), 10_000);
        assert_eq!(r.admit(3_610_000, 0), Admission::OnTime(3_610_000));
    }
}
