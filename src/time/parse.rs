//! Timestamps: every accepted shape, to epoch milliseconds or to a reason.
//!
//! * RFC 3339 strings **with** an offset (`"2026-03-01T12:00:00Z"`,
//!   `"2026-03-01T14:00:00.250+02:00"`). A string without an offset is
//!   rejected: guessing a time zone silently shifts every event.
//! * JSON numbers, and strings made only of ASCII digits, as epoch
//!   **seconds, milliseconds, microseconds or nanoseconds**. With
//!   [`TimeUnit::Auto`] (the default) the unit follows from the magnitude:
//!
//!   | magnitude of the number | read as | so it covers |
//!   |---|---|---|
//!   | below 10^11 | seconds (fractions allowed) | 1970 – 5138 |
//!   | 10^11 to below 10^14 | milliseconds | March 1973 – 5138 |
//!   | 10^14 to below 10^17 | microseconds (GA4's `event_timestamp`) | March 1973 – 5138 |
//!   | 10^17 and above | nanoseconds | March 1973 – |
//!
//!   so a time between 1973 and 2199 is read right in any of the four units.
//!   A source's `time_unit` fixes the unit instead (needed for millisecond
//!   times before March 1973, which would read as seconds).
//!
//! Numbers are converted exactly, from their decimal digits (no float in
//! between); digits below a millisecond are dropped (rounded down).
//!
//! Every time must lie in the **supported range** `1970-01-01T00:00:00Z` to
//! `2199-12-31T23:59:59.999Z` ([`MIN_MS`]..[`END_MS`]); anything else is an
//! error that says so, never silently moved into the range.

use chrono::{DateTime, NaiveDateTime};
use serde_json::{Number, Value};

// Numbers are read by the same exact decimal reader as every other number
// of the input.
use crate::model::scalar::Decimal;

/// The earliest supported time: 1970-01-01T00:00:00Z, in epoch milliseconds.
pub const MIN_MS: i64 = 0;
/// The end of the supported range (exclusive): 2200-01-01T00:00:00Z, in epoch
/// milliseconds.
pub const END_MS: i64 = 7_258_118_400_000;
/// The supported range, as error messages name it.
pub const SUPPORTED_RANGE: &str = "1970-01-01T00:00:00Z to 2199-12-31T23:59:59.999Z";

const ACCEPTED: &str =
    "expected RFC 3339 with offset, or epoch seconds, milliseconds, microseconds or nanoseconds";

/// The unit of numeric timestamps (`time_unit` of a source).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TimeUnit {
    /// By magnitude (see the [module documentation](self)); `"auto"`.
    #[default]
    Auto,
    /// Epoch seconds, fractions allowed; `"s"`.
    Seconds,
    /// Epoch milliseconds; `"ms"`.
    Milliseconds,
    /// Epoch microseconds; `"us"`.
    Microseconds,
    /// Epoch nanoseconds; `"ns"`.
    Nanoseconds,
}

impl TimeUnit {
    /// Parses a `time_unit` setting: `auto`, `s`, `ms`, `us` or `ns`.
    pub fn from_name(name: &str) -> Option<TimeUnit> {
        Some(match name {
            "auto" => TimeUnit::Auto,
            "s" => TimeUnit::Seconds,
            "ms" => TimeUnit::Milliseconds,
            "us" => TimeUnit::Microseconds,
            "ns" => TimeUnit::Nanoseconds,
            _ => return None,
        })
    }

    /// The unit's name in messages.
    pub fn describe(self) -> &'static str {
        match self {
            TimeUnit::Auto => "auto",
            TimeUnit::Seconds => "seconds",
            TimeUnit::Milliseconds => "milliseconds",
            TimeUnit::Microseconds => "microseconds",
            TimeUnit::Nanoseconds => "nanoseconds",
        }
    }

    /// Power of ten that turns a value in this unit into milliseconds.
    fn to_ms_exp10(self) -> i64 {
        match self {
            TimeUnit::Auto | TimeUnit::Milliseconds => 0,
            TimeUnit::Seconds => 3,
            TimeUnit::Microseconds => -3,
            TimeUnit::Nanoseconds => -6,
        }
    }

    /// The unit [`TimeUnit::Auto`] picks for a number whose integer part
    /// has magnitude `whole` (`None`: beyond 128 bits).
    fn by_magnitude(whole: Option<u128>) -> TimeUnit {
        match whole {
            Some(w) if w < 100_000_000_000 => TimeUnit::Seconds,
            Some(w) if w < 100_000_000_000_000 => TimeUnit::Milliseconds,
            Some(w) if w < 100_000_000_000_000_000 => TimeUnit::Microseconds,
            _ => TimeUnit::Nanoseconds,
        }
    }
}

/// Parses a timestamp into epoch milliseconds (UTC), numbers by magnitude.
///
/// See the [module documentation](self) for the accepted forms. The error
/// says what was found and what is accepted, e.g. `unparsable timestamp
/// "yesterday": expected RFC 3339 with offset, or epoch seconds, ...`.
pub fn parse_time(v: &Value) -> Result<i64, String> {
    parse_time_as(v, TimeUnit::Auto)
}

/// [`parse_time`] with numbers in `unit`.
pub fn parse_time_as(v: &Value, unit: TimeUnit) -> Result<i64, String> {
    match v {
        Value::Number(n) => parse_time_number_as(n, unit),
        Value::String(s) => parse_time_str_as(s, unit),
        other => Err(format!(
            "expected a timestamp (RFC 3339 string with offset, or an epoch number), found {}",
            json_type(other)
        )),
    }
}

/// [`parse_time_as`] of a JSON number.
pub fn parse_time_number_as(n: &Number, unit: TimeUnit) -> Result<i64, String> {
    parse_time_number_text_as(n.as_str(), unit)
}

/// [`parse_time_number_as`] of a JSON number literal's text (as
/// `serde_json::Number::as_str` gives it).
pub fn parse_time_number_text_as(text: &str, unit: TimeUnit) -> Result<i64, String> {
    if let Some(ms) = plain_u64(text).and_then(|whole| integer_epoch_to_ms(whole, unit)) {
        return Ok(ms);
    }
    epoch_to_ms(text, unit)
}

/// The value of a literal of ASCII digits that fits a `u64` (what
/// `Number::as_u64` accepts), else `None`.
fn plain_u64(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The common case of [`epoch_to_ms`] without text: a non-negative integer
/// whose milliseconds lie in the supported range. `None` sends every other
/// case (out of range, errors) to the exact decimal path, which gives the
/// same value or the error message.
fn integer_epoch_to_ms(whole: u64, unit: TimeUnit) -> Option<i64> {
    let unit = match unit {
        TimeUnit::Auto => TimeUnit::by_magnitude(Some(u128::from(whole))),
        u => u,
    };
    let ms = match unit.to_ms_exp10() {
        3 => whole.checked_mul(1000)?,
        0 => whole,
        -3 => whole / 1000,
        _ => whole / 1_000_000,
    };
    let ms = i64::try_from(ms).ok()?;
    (MIN_MS..END_MS).contains(&ms).then_some(ms)
}

/// [`parse_time_as`] of a JSON string.
pub fn parse_time_str_as(raw: &str, unit: TimeUnit) -> Result<i64, String> {
    let s = raw.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return epoch_to_ms(s, unit).map_err(|e| e.replacen(s, &format!("{s:?}"), 1));
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        let ms = dt.timestamp_millis();
        return if (MIN_MS..END_MS).contains(&ms) {
            Ok(ms)
        } else {
            Err(format!(
                "timestamp {raw:?} is outside the supported range {SUPPORTED_RANGE}"
            ))
        };
    }
    let naive = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .any(|f| NaiveDateTime::parse_from_str(s, f).is_ok());
    if naive {
        return Err(format!(
            "timestamp {raw:?} has no UTC offset: add one (e.g. \"Z\" or \"+02:00\"); {ACCEPTED}"
        ));
    }
    Err(format!("unparsable timestamp {raw:?}: {ACCEPTED}"))
}

/// An epoch number's text (a JSON number or a digit string) in milliseconds.
fn epoch_to_ms(text: &str, unit: TimeUnit) -> Result<i64, String> {
    let Some(d) = Decimal::parse(text) else {
        return Err(format!("unparsable timestamp {text}: {ACCEPTED}"));
    };
    let unit = match unit {
        TimeUnit::Auto => TimeUnit::by_magnitude(d.scaled(0).map(|(whole, _)| whole)),
        u => u,
    };
    // floor(value × 10^shift): the magnitude's integer part, one less for a
    // negative value with a fraction.
    let ms = d.scaled(unit.to_ms_exp10()).and_then(|(whole, fraction)| {
        let whole = i128::try_from(whole).ok()?;
        Some(if d.negative {
            -whole - i128::from(fraction)
        } else {
            whole
        })
    });
    match ms {
        Some(ms) if (i128::from(MIN_MS)..i128::from(END_MS)).contains(&ms) => Ok(ms as i64),
        _ => Err(format!(
            "timestamp {text} (read as epoch {}) is outside the supported range {SUPPORTED_RANGE}",
            unit.describe()
        )),
    }
}

/// The JSON type name of a value, as used in error messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOON: i64 = 1_772_366_400_000; // 2026-03-01T12:00:00Z

    fn num(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn rfc3339_utc_and_offsets() {
        assert_eq!(parse_time(&json!("2026-03-01T12:00:00Z")), Ok(NOON));
        assert_eq!(parse_time(&json!("2026-03-01T14:00:00+02:00")), Ok(NOON));
        assert_eq!(parse_time(&json!("2026-03-01T07:00:00-05:00")), Ok(NOON));
        assert_eq!(
            parse_time(&json!("2026-03-01T12:00:00.250Z")),
            Ok(NOON + 250)
        );
        assert_eq!(
            parse_time(&json!("2026-03-01T12:00:00.123456789Z")),
            Ok(NOON + 123)
        );
        assert_eq!(parse_time(&json!(" 2026-03-01T12:00:00Z ")), Ok(NOON));
    }

    #[test]
    fn epoch_numbers_by_magnitude() {
        assert_eq!(parse_time(&json!(1_772_366_400)), Ok(NOON));
        assert_eq!(parse_time(&num("1772366400.5")), Ok(NOON + 500));
        assert_eq!(parse_time(&num("1772366400.0015")), Ok(NOON + 1));
        assert_eq!(parse_time(&json!(NOON)), Ok(NOON));
        assert_eq!(parse_time(&num("1772366400000.0")), Ok(NOON));
        assert_eq!(parse_time(&num("1.7723664e9")), Ok(NOON));
        assert_eq!(parse_time(&json!(0)), Ok(0));
        // GA4's event_timestamp: microseconds, as a number or a digit string.
        assert_eq!(
            parse_time(&json!(1_772_366_405_000_000i64)),
            Ok(NOON + 5_000)
        );
        assert_eq!(parse_time(&json!("1772366405000000")), Ok(NOON + 5_000));
        assert_eq!(
            parse_time(&json!(1_772_366_405_123_999i64)),
            Ok(NOON + 5_123)
        );
        // Nanoseconds.
        assert_eq!(
            parse_time(&json!(1_772_366_405_000_000_000i64)),
            Ok(NOON + 5_000)
        );
        // Boundaries between the units.
        assert_eq!(
            parse_time(&json!(99_999_999_999i64)).unwrap_err(),
            "timestamp 99999999999 (read as epoch seconds) is outside the supported range 1970-01-01T00:00:00Z to 2199-12-31T23:59:59.999Z"
        );
        assert_eq!(parse_time(&json!(100_000_000_000i64)), Ok(100_000_000_000));
        assert_eq!(
            parse_time(&json!(7_258_118_399_999i64)),
            Ok(END_MS - 1),
            "the last supported millisecond"
        );
        assert!(parse_time(&json!(99_999_999_999_999i64))
            .unwrap_err()
            .contains("(read as epoch milliseconds) is outside the supported range"));
        assert_eq!(
            parse_time(&json!(100_000_000_000_000i64)),
            Ok(100_000_000_000)
        );
        assert_eq!(
            parse_time(&json!(100_000_000_000_000_000i64)),
            Ok(100_000_000_000)
        );
    }

    #[test]
    fn explicit_units() {
        // 1971 in milliseconds reads as the year 3554 in seconds: out of
        // range, unless the unit is given.
        assert_eq!(
            parse_time_as(&json!(50_000_000_000i64), TimeUnit::Milliseconds),
            Ok(50_000_000_000)
        );
        assert!(parse_time_as(&json!(50_000_000_000i64), TimeUnit::Auto).is_err());
        assert_eq!(
            parse_time_as(&json!(1_772_366_400), TimeUnit::Seconds),
            Ok(NOON)
        );
        assert_eq!(
            parse_time_as(&json!(NOON * 1000), TimeUnit::Microseconds),
            Ok(NOON)
        );
        assert_eq!(
            parse_time_as(&json!("1772366400000000000"), TimeUnit::Nanoseconds),
            Ok(NOON)
        );
        assert_eq!(
            parse_time_as(&json!(NOON), TimeUnit::Seconds).unwrap_err(),
            "timestamp 1772366400000 (read as epoch seconds) is outside the supported range 1970-01-01T00:00:00Z to 2199-12-31T23:59:59.999Z"
        );
        assert_eq!(TimeUnit::from_name("us"), Some(TimeUnit::Microseconds));
        assert_eq!(TimeUnit::from_name("µs"), None);
    }

    #[test]
    fn out_of_range_is_an_error_never_a_clamp() {
        for bad in [
            "-10",
            "-1.5",
            "7258118400",
            "1e300",
            "-1e300",
            "99999999999999999999999",
        ] {
            let e = parse_time(&num(bad)).unwrap_err();
            assert!(e.contains("outside the supported range"), "{bad}: {e}");
        }
        let e = parse_time(&json!("99999999999999999999999")).unwrap_err();
        assert!(
            e.starts_with(
                "timestamp \"99999999999999999999999\" (read as epoch nanoseconds) is outside"
            ),
            "{e}"
        );
        assert_eq!(
            parse_time(&json!("1969-12-31T23:59:59Z")).unwrap_err(),
            "timestamp \"1969-12-31T23:59:59Z\" is outside the supported range 1970-01-01T00:00:00Z to 2199-12-31T23:59:59.999Z"
        );
        assert!(parse_time(&json!("2200-01-01T00:00:00Z")).is_err());
        assert_eq!(
            parse_time(&json!("2199-12-31T23:59:59.999Z")),
            Ok(END_MS - 1)
        );
        // 2200-01-01 in seconds is out; the last supported second is in.
        assert!(parse_time(&json!(7_258_118_400i64)).is_err());
        assert_eq!(parse_time(&json!(7_258_118_399i64)), Ok(END_MS - 1_000));
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse_time(&json!("yesterday")).unwrap_err(),
            format!("unparsable timestamp \"yesterday\": {ACCEPTED}")
        );
        let e = parse_time(&json!("2026-03-01T12:00:00")).unwrap_err();
        assert!(e.contains("no UTC offset"), "{e}");
        let e = parse_time(&json!("2026-03-01 12:00:00.5")).unwrap_err();
        assert!(e.contains("no UTC offset"), "{e}");
        let e = parse_time(&json!(true)).unwrap_err();
        assert!(e.ends_with("found boolean"), "{e}");
        assert!(parse_time(&json!(null))
            .unwrap_err()
            .ends_with("found null"));
        assert!(parse_time(&json!(""))
            .unwrap_err()
            .starts_with("unparsable timestamp \"\""));
    }

    proptest::proptest! {
        /// The integer fast path gives exactly what the decimal path gives,
        /// for every unit, around every magnitude boundary and the range ends.
        #[test]
        fn integer_fast_path_matches_the_decimal_path(
            whole in proptest::prop_oneof![
                0u64..=u64::MAX,
                0u64..200_000_000_000_000_000,
                99_999_999_990u64..100_000_000_010,
                99_999_999_999_990u64..100_000_000_000_010,
                7_258_118_399_990u64..7_258_118_400_010,
            ],
            unit in proptest::sample::select(vec![
                TimeUnit::Auto, TimeUnit::Seconds, TimeUnit::Milliseconds,
                TimeUnit::Microseconds, TimeUnit::Nanoseconds,
            ]),
        ) {
            let exact = epoch_to_ms(&whole.to_string(), unit);
            match integer_epoch_to_ms(whole, unit) {
                Some(ms) => proptest::prop_assert_eq!(Ok(ms), exact.clone()),
                None => proptest::prop_assert!(exact.is_err(), "{whole} {unit:?}: {exact:?}"),
            }
            let n = serde_json::Number::from(whole);
            proptest::prop_assert_eq!(parse_time_number_as(&n, unit), exact);
        }
    }
}
