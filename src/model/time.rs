//! Timestamps.
//!
//! Inputs carry timestamps in several shapes; [`parse_time`] turns all of
//! them into epoch milliseconds (UTC):
//!
//! * RFC 3339 strings **with** an offset (`"2026-03-01T12:00:00Z"`,
//!   `"2026-03-01T14:00:00.250+02:00"`). A string without an offset is
//!   rejected: guessing a time zone silently shifts every event.
//! * JSON numbers: epoch **seconds** when `|n| < 100_000_000_000`
//!   (fractional seconds allowed), epoch **milliseconds** otherwise.
//! * Strings made only of ASCII digits, treated like the number they spell.
//!
//! The dataflow works in logical time measured in ticks; [`to_tick`] rounds a
//! millisecond timestamp down to its tick.

use chrono::{DateTime, NaiveDateTime};
use serde_json::{Number, Value};

/// Numbers whose magnitude is below this are epoch seconds; at or above it,
/// epoch milliseconds (1e11 s is the year 5138; 1e11 ms is March 1973).
pub const SECONDS_LIMIT: i64 = 100_000_000_000;

const ACCEPTED: &str = "expected RFC 3339 with offset, epoch seconds or epoch milliseconds";

/// Parses a timestamp into epoch milliseconds (UTC).
///
/// See the [module documentation](self) for the accepted forms. The error
/// message says what was found and what is accepted, e.g.
/// `unparsable timestamp "yesterday": expected RFC 3339 with offset, epoch
/// seconds or epoch milliseconds`.
pub fn parse_time(v: &Value) -> Result<i64, String> {
    match v {
        Value::Number(n) => parse_time_number(n),
        Value::String(s) => parse_time_str(s),
        other => Err(format!(
            "expected a timestamp (RFC 3339 string with offset, epoch seconds or epoch milliseconds), found {}",
            json_type(other)
        )),
    }
}

/// [`parse_time`] of a JSON number.
pub(crate) fn parse_time_number(n: &Number) -> Result<i64, String> {
    if let Some(i) = n.as_i64() {
        int_to_ms(i).ok_or_else(|| format!("timestamp {n} is out of range"))
    } else {
        let f = n.as_f64().unwrap_or(f64::NAN);
        float_to_ms(f).ok_or_else(|| format!("timestamp {n} is out of range"))
    }
}

/// [`parse_time`] of a JSON string.
pub(crate) fn parse_time_str(raw: &str) -> Result<i64, String> {
    let s = raw.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<i64>()
            .ok()
            .and_then(int_to_ms)
            .ok_or_else(|| format!("timestamp {s:?} is out of range"));
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Ok(dt.timestamp_millis());
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

fn int_to_ms(i: i64) -> Option<i64> {
    if i.unsigned_abs() < SECONDS_LIMIT as u64 {
        i.checked_mul(1000)
    } else {
        Some(i)
    }
}

fn float_to_ms(f: f64) -> Option<i64> {
    if !f.is_finite() {
        return None;
    }
    let ms = if f.abs() < SECONDS_LIMIT as f64 {
        f * 1000.0
    } else {
        f
    };
    let ms = ms.round();
    if ms >= i64::MIN as f64 && ms < i64::MAX as f64 {
        Some(ms as i64)
    } else {
        None
    }
}

/// Rounds `ms` down to a multiple of `tick_ms`. Negative timestamps clamp to
/// 0; a `tick_ms` of 0 means "no rounding".
pub fn to_tick(ms: i64, tick_ms: u64) -> u64 {
    if ms <= 0 {
        return 0;
    }
    let ms = ms as u64;
    if tick_ms == 0 {
        ms
    } else {
        ms - ms % tick_ms
    }
}

/// The JSON type name of a value, as used in error messages.
pub(crate) fn json_type(v: &Value) -> &'static str {
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
    fn epoch_numbers() {
        assert_eq!(parse_time(&json!(1_772_366_400)), Ok(NOON));
        assert_eq!(parse_time(&json!(1_772_366_400.5)), Ok(NOON + 500));
        assert_eq!(parse_time(&json!(NOON)), Ok(NOON));
        assert_eq!(parse_time(&json!(NOON as f64)), Ok(NOON));
        assert_eq!(parse_time(&json!(0)), Ok(0));
        assert_eq!(parse_time(&json!(-10)), Ok(-10_000));
        // boundary: 1e11 - 1 is seconds, 1e11 is milliseconds
        assert_eq!(
            parse_time(&json!(99_999_999_999i64)),
            Ok(99_999_999_999_000)
        );
        assert_eq!(parse_time(&json!(100_000_000_000i64)), Ok(100_000_000_000));
    }

    #[test]
    fn digit_strings() {
        assert_eq!(parse_time(&json!("1772366400")), Ok(NOON));
        assert_eq!(parse_time(&json!("1772366400000")), Ok(NOON));
        assert!(parse_time(&json!("99999999999999999999999"))
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse_time(&json!("yesterday")).unwrap_err(),
            "unparsable timestamp \"yesterday\": expected RFC 3339 with offset, epoch seconds or epoch milliseconds"
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
        assert!(parse_time(&json!(1e300))
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn ticks() {
        assert_eq!(to_tick(1_234, 1_000), 1_000);
        assert_eq!(to_tick(2_000, 1_000), 2_000);
        assert_eq!(to_tick(-5, 1_000), 0);
        assert_eq!(to_tick(999, 1_000), 0);
        assert_eq!(to_tick(NOON + 59_999, 60_000), NOON as u64);
        assert_eq!(to_tick(17, 0), 17);
    }
}
