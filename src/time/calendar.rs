//! Calendar time in the engine's time zone: where tumbling windows start
//! and end, and the `hour` and `weekday` of an event.
//!
//! Times are event times in milliseconds since the Unix epoch (UTC); the
//! zone ([`chrono_tz::Tz`], an IANA name such as `"Europe/Paris"`) only
//! decides where the local calendar's boundaries fall. Across a daylight
//! saving change a local day is 23 or 25 hours long, and a window
//! boundary at a local time the change skips falls at the first instant
//! after it.

use chrono::{Datelike, Duration, NaiveDateTime, TimeZone, Timelike};
use chrono_tz::Tz;

use super::Time;

const DAY: u64 = 86_400_000;

/// The local date and time of `ms`.
fn local(ms: Time, tz: Tz) -> chrono::DateTime<Tz> {
    let utc =
        chrono::DateTime::from_timestamp_millis(ms.min(i64::MAX as u64) as i64).unwrap_or_default();
    utc.with_timezone(&tz)
}

/// The first instant at or after the local wall-clock time `naive` that
/// lies after `after` (a skipped local time moves to the first instant
/// after the gap; of a repeated one, the earliest after `after`).
fn instant_after(naive: NaiveDateTime, tz: Tz, after: Time) -> Time {
    let ms = |d: chrono::DateTime<Tz>| d.timestamp_millis().max(0) as u64;
    let mut n = naive;
    // A gap is at most a few hours; step a minute at a time across it.
    for _ in 0..(48 * 60) {
        match tz.from_local_datetime(&n) {
            chrono::LocalResult::Single(d) if ms(d) > after => return ms(d),
            chrono::LocalResult::Ambiguous(a, b) => {
                if ms(a) > after {
                    return ms(a);
                }
                if ms(b) > after {
                    return ms(b);
                }
            }
            _ => {}
        }
        n += Duration::minutes(1);
    }
    after + 1
}

/// The end (exclusive) of the tumbling window of `length` ms that holds
/// `tick`, in `tz`: windows start at local midnight and every `length`
/// after it when `length` divides a day (the last one of a day ends at
/// the next local midnight), and on Mondays at local midnight when
/// `length` is 7 days. Always after `tick`.
pub fn tumbling_end(tick: Time, length: u64, tz: Tz) -> Time {
    let here = local(tick, tz);
    let date = here.date_naive();
    let midnight = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    let boundary = if length == 7 * DAY {
        let monday = date - Duration::days(i64::from(here.weekday().num_days_from_monday()));
        monday.and_hms_opt(0, 0, 0).expect("midnight exists") + Duration::days(7)
    } else {
        let of_day = u64::from(here.num_seconds_from_midnight()) * 1000
            + u64::from(here.timestamp_subsec_millis());
        let next = (of_day / length + 1) * length;
        if next >= DAY {
            midnight + Duration::days(1)
        } else {
            midnight + Duration::milliseconds(next as i64)
        }
    };
    instant_after(boundary, tz, tick)
}

/// The local hour (0–23) of `ms` in `tz`.
pub fn hour(ms: Time, tz: Tz) -> u32 {
    local(ms, tz).hour()
}

/// The local day of the week of `ms` in `tz`, ISO 8601: 1 is Monday, 7
/// is Sunday.
pub fn weekday(ms: Time, tz: Tz) -> u32 {
    local(ms, tz).weekday().number_from_monday()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Time {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn utc_days_hours_and_weeks() {
        let tz = chrono_tz::UTC;
        // 2026-03-05 is a Thursday.
        let t = at("2026-03-05T13:45:10Z");
        assert_eq!(tumbling_end(t, DAY, tz), at("2026-03-06T00:00:00Z"));
        assert_eq!(tumbling_end(t, 3_600_000, tz), at("2026-03-05T14:00:00Z"));
        assert_eq!(tumbling_end(t, 15 * 60_000, tz), at("2026-03-05T14:00:00Z"));
        assert_eq!(tumbling_end(t, 7 * DAY, tz), at("2026-03-09T00:00:00Z"));
        // Exactly at a boundary: the window that starts there.
        let midnight = at("2026-03-06T00:00:00Z");
        assert_eq!(tumbling_end(midnight, DAY, tz), at("2026-03-07T00:00:00Z"));
        assert_eq!(tumbling_end(midnight - 1, DAY, tz), midnight);
        assert_eq!(hour(t, tz), 13);
        assert_eq!(weekday(t, tz), 4);
        assert_eq!(weekday(at("2026-03-08T23:59:59Z"), tz), 7);
    }

    #[test]
    fn local_days_follow_the_zone_and_its_daylight_saving() {
        let paris: Tz = "Europe/Paris".parse().unwrap();
        // 23:30 UTC on 2026-01-10 is 00:30 local on the 11th.
        let t = at("2026-01-10T23:30:00Z");
        assert_eq!(hour(t, paris), 0);
        assert_eq!(tumbling_end(t, DAY, paris), at("2026-01-11T23:00:00Z"));
        // 2026-03-29: clocks go from 02:00 to 03:00; the local day is 23 h.
        let day = at("2026-03-29T10:00:00Z");
        assert_eq!(tumbling_end(day, DAY, paris), at("2026-03-29T22:00:00Z"));
        // The hourly window at 01:30 local ends at 03:00 local (02:00 is skipped).
        let before_gap = at("2026-03-29T00:30:00Z");
        assert_eq!(
            tumbling_end(before_gap, 3_600_000, paris),
            at("2026-03-29T01:00:00Z")
        );
        // 2026-10-25: 03:00 goes back to 02:00; 02:30 happens twice, and
        // the local hour from 02:00 to 03:00 lasts two hours.
        let second = at("2026-10-25T01:30:00Z"); // the second 02:30 local
        assert_eq!(
            tumbling_end(second, 3_600_000, paris),
            at("2026-10-25T02:00:00Z")
        );
        let first = at("2026-10-25T00:30:00Z"); // the first 02:30 local
        assert_eq!(
            tumbling_end(first, 3_600_000, paris),
            at("2026-10-25T02:00:00Z")
        );
    }
}
