//! Event time: the one owner of ticks, watermarks, lateness, idleness and
//! completion.
//!
//! Every rule about time that the engine applies lives in this module; the
//! sources, the dataflow stages and the commit stage only call it.
//!
//! # Glossary
//!
//! * **Event time** — when something happened, as the record says (`ts`, or
//!   `updated_at` for CRM records), in milliseconds since the Unix epoch
//!   (UTC). Parsed by [`parse`]; never the time a record was read.
//! * **Wall clock** — the machine's current time ([`wall_clock_ms`]). It is
//!   used only by *live* sources, to bound and to advance their watermark.
//! * **Tick** — the granularity of the dataflow's logical time
//!   (`[engine] tick`). A record's logical [`Time`] is its event time rounded
//!   down to a multiple of the tick ([`TimeConfig::floor`]); all records of
//!   one tick are processed, consolidated and written together.
//! * **Replay** — a source whose clock is its data: a file read to its end.
//!   A large file is read in ranges (`[engine] file_range_bytes`), each with
//!   its own clock (see `io::sources`).
//!   **Live** — a source that runs on the wall clock: a followed file or a
//!   TCP listener.
//! * **Watermark** — per source, the time below which the source promises
//!   no more records: every later record with a smaller tick is *late*. Each
//!   source holds its timely capability at its watermark, so the dataflow's
//!   input frontier is the least watermark of all sources. The rule is in
//!   [`watermark`]; in short, the watermark is the tick of the largest event
//!   time seen minus the allowed lateness, rounded down to a tick, and for a live
//!   source it never passes `wall clock − allowed lateness`.
//! * **Allowed lateness** — how far behind the latest event time a record
//!   may arrive and still be on time (`[engine] allowed_lateness`).
//! * **Late** — a record whose tick is below its source's watermark when it
//!   is read. It is counted and dead-lettered (`late_policy =
//!   "dead-letter"`), or moved up to the watermark (`late_policy =
//!   "clamp"`).
//! * **Future** — a record dated further ahead than `max_future_skew`: of
//!   the wall clock for a live source, of the source's own latest event time
//!   for a replay. It is dead-lettered and does not move the watermark, so
//!   one device with a wrong clock cannot make every honest record late.
//! * **Idleness** — a live source that has read nothing for `idle_advance`
//!   is idle; its watermark then follows the wall clock (minus the allowed
//!   lateness), so windows expire and exits are emitted while nothing
//!   arrives.
//! * **Completion** — a time is *complete* when the input frontier has
//!   passed it: no worker can produce more updates at or before it. The
//!   commit stage writes a time once it is complete and no later than the
//!   end of the data seen ([`Completion`]): a finite replay's result is "as
//!   of" its last event, not at infinity.
//! * **Window end** — an event of a trait with a window of length `w` enters
//!   at its tick `t` and leaves at [`window_end`]`(t, w) = t + w`; the
//!   retraction is released when its time comes ([`window`]).
//!
//! The terms follow the Dataflow model (Akidau et al., *The Dataflow Model*,
//! VLDB 2015) and Apache Flink's documentation (watermarks, allowed
//! lateness, idleness).

pub mod calendar;
pub mod completion;
pub mod parse;
pub mod watermark;
pub mod window;

pub use completion::{ClockReport, Completion};
pub use parse::{parse_time, TimeUnit};
pub use watermark::{Admission, SourceClock};

/// Logical time of every collection: event time in milliseconds since the
/// Unix epoch (UTC), rounded down to a multiple of the tick.
pub type Time = u64;

/// What to do with records older than the watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LatePolicy {
    /// Write them to the dead-letter output (`"dead-letter"`).
    DeadLetter,
    /// Process them at the watermark instead of their own tick (`"clamp"`).
    Clamp,
}

/// The `max_future_skew` a live source uses when none is configured:
/// one minute ahead of the wall clock.
pub const DEFAULT_LIVE_MAX_FUTURE_SKEW_MS: u64 = 60_000;

/// The time settings of a run (`[engine]` in the dataflow file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeConfig {
    /// Tick in milliseconds (> 0).
    pub tick_ms: u64,
    /// Allowed lateness in milliseconds.
    pub allowed_lateness_ms: u64,
    /// How long a live source reads nothing before its watermark follows
    /// the wall clock, in milliseconds.
    pub idle_advance_ms: u64,
    /// Records dated further ahead than this (milliseconds) are `future`.
    /// `None`: [`DEFAULT_LIVE_MAX_FUTURE_SKEW_MS`] for live sources, no
    /// limit for replays; `Some(u64::MAX)` (`"off"`): no limit.
    pub max_future_skew_ms: Option<u64>,
    /// What happens to late records.
    pub late_policy: LatePolicy,
}

impl Default for TimeConfig {
    fn default() -> Self {
        TimeConfig {
            tick_ms: 1_000,
            allowed_lateness_ms: 0,
            idle_advance_ms: 1_000,
            max_future_skew_ms: None,
            late_policy: LatePolicy::DeadLetter,
        }
    }
}

impl TimeConfig {
    /// The tick containing `ms` milliseconds (unsigned).
    pub fn floor(&self, ms: u64) -> Time {
        floor_to_tick(ms, self.tick_ms)
    }

    /// How long (ms of wall clock) a socket of a restored run waits for
    /// its first line before its watermark follows the wall clock (see
    /// [`SourceClock::wait_for_first_line`]): the allowed lateness, and
    /// at least `idle_advance`.
    pub fn restored_socket_wait_ms(&self) -> u64 {
        self.allowed_lateness_ms.max(self.idle_advance_ms)
    }
}

/// `ms` rounded down to a multiple of `tick_ms` (a tick of 0 means 1 ms).
pub fn floor_to_tick(ms: u64, tick_ms: u64) -> Time {
    let tick = tick_ms.max(1);
    ms - ms % tick
}

/// `ms` rounded up to a multiple of `tick_ms` (a tick of 0 means 1 ms),
/// saturating.
pub fn ceil_to_tick(ms: u64, tick_ms: u64) -> Time {
    let tick = tick_ms.max(1);
    ms.div_ceil(tick).saturating_mul(tick)
}

/// When an event at tick `tick` leaves a window of `window_ms`
/// milliseconds: `tick + window_ms` (saturating; parsed event times end in
/// the year 2200, far from overflow).
pub fn window_end(tick: Time, window_ms: u64) -> Time {
    tick.saturating_add(window_ms)
}

/// The wall clock in milliseconds since the Unix epoch (0 if the system
/// clock is before 1970).
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_down() {
        let c = TimeConfig::default();
        assert_eq!(c.floor(1_234), 1_000);
        assert_eq!(c.floor(2_000), 2_000);
        assert_eq!(c.floor(999), 0);
        assert_eq!(floor_to_tick(1_772_366_459_999, 60_000), 1_772_366_400_000);
        assert_eq!(floor_to_tick(17, 0), 17);
        assert_eq!(window_end(1_000, 30 * 60_000), 1_801_000);
        assert_eq!(window_end(u64::MAX - 1, 5), u64::MAX);
    }
}
