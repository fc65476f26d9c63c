//! Scalar values: CRM attributes, event fields and expression results.
//!
//! A [`Scalar`] is a small JSON-like value that is totally ordered (numbers
//! compare with `f64::total_cmp`), so it can live inside differential
//! collections, which need `Ord`.
//!
//! ## Input numbers
//!
//! Input JSON numbers arrive with their exact text (serde_json's
//! `arbitrary_precision`), and [`Scalar::from_number`] decides, without ever
//! silently turning one value into another:
//!
//! * an integer written with digits only (`42`, `-7`,
//!   `18446744073709551617`) becomes [`Scalar::Num`] when a 64-bit float
//!   holds it exactly (every integer up to 2^53 = 9007199254740992 in
//!   magnitude, and some larger ones); otherwise it is kept as
//!   [`Scalar::Str`] of its exact digits, so two different large integers
//!   never become the same value;
//! * a number with a fraction or an exponent (`19.99`, `1e3`) is the nearest
//!   64-bit float, as in every JSON reader (about 16 significant digits);
//! * a number beyond the 64-bit float range (`1e400`), or a non-zero number
//!   that would round to zero (`1e-400`), is an error: the record is
//!   dead-lettered with `field `…`: 1e+400 is out of range for a 64-bit
//!   float`.
//!
//! A number's text is serde_json's: the digits as written, with the
//! exponent spelled `e+N` or `e-N` (`1E400` reads as `1e+400`); messages and
//! arrays or objects kept as JSON text show that spelling.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A JSON scalar with a total order. Arrays and objects are kept as their
/// JSON text in [`Scalar::Str`] when they appear where a scalar is expected.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Scalar {
    /// JSON `null` or a missing value.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// Any JSON number.
    Num(f64),
    /// A string.
    Str(String),
}

/// A borrowed [`Scalar`]: what conditions read and compare, without
/// copying strings (a filter such as `event == "view_item"` is evaluated
/// for every event).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScalarRef<'a> {
    /// JSON `null` or a missing value.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Num(f64),
    /// A string.
    Str(&'a str),
}

impl ScalarRef<'_> {
    /// As [`Scalar::as_f64`].
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            ScalarRef::Num(n) => Some(*n),
            ScalarRef::Str(s) => s.trim().parse().ok(),
            ScalarRef::Bool(_) | ScalarRef::Null => None,
        }
    }

    /// As [`Scalar::truthy`].
    pub fn truthy(&self) -> bool {
        match self {
            ScalarRef::Null => false,
            ScalarRef::Bool(b) => *b,
            ScalarRef::Num(n) => *n != 0.0,
            ScalarRef::Str(s) => !s.is_empty(),
        }
    }

    /// An owned copy.
    pub fn to_scalar(self) -> Scalar {
        match self {
            ScalarRef::Null => Scalar::Null,
            ScalarRef::Bool(b) => Scalar::Bool(b),
            ScalarRef::Num(n) => Scalar::Num(n),
            ScalarRef::Str(s) => Scalar::Str(s.to_string()),
        }
    }
}

impl Scalar {
    /// This scalar, borrowed.
    pub fn borrowed(&self) -> ScalarRef<'_> {
        match self {
            Scalar::Null => ScalarRef::Null,
            Scalar::Bool(b) => ScalarRef::Bool(*b),
            Scalar::Num(n) => ScalarRef::Num(*n),
            Scalar::Str(s) => ScalarRef::Str(s),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Scalar::Null => 0,
            Scalar::Bool(_) => 1,
            Scalar::Num(_) => 2,
            Scalar::Str(_) => 3,
        }
    }

    /// Converts a JSON value; arrays and objects become their JSON text
    /// (numbers inside them keep their exact text). A number is read by
    /// [`Scalar::from_number`], whose error this returns.
    pub fn from_json(v: &serde_json::Value) -> Result<Scalar, String> {
        Ok(match v {
            serde_json::Value::Null => Scalar::Null,
            serde_json::Value::Bool(b) => Scalar::Bool(*b),
            serde_json::Value::Number(n) => Scalar::from_number(n)?,
            serde_json::Value::String(s) => Scalar::Str(s.clone()),
            other => Scalar::Str(other.to_string()),
        })
    }

    /// Converts a JSON number (see the [module documentation](self)):
    /// [`Scalar::Num`], or [`Scalar::Str`] of the exact digits of an integer
    /// that a 64-bit float cannot hold. The error (`"1e400 is out of range
    /// for a 64-bit float"`) is for a number outside the float range.
    pub fn from_number(n: &serde_json::Number) -> Result<Scalar, String> {
        Self::from_number_text(n.as_str())
    }

    /// [`Scalar::from_number`] of a JSON number literal's text (as
    /// `serde_json::Number::as_str` gives it; the grammar is not checked
    /// again).
    pub fn from_number_text(text: &str) -> Result<Scalar, String> {
        let f = float(text)?;
        if is_integer_literal(text) && !exact_integer(text, f) {
            return Ok(Scalar::Str(text.to_string()));
        }
        Ok(Scalar::Num(f))
    }

    /// The value as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Scalar::Null => serde_json::Value::Null,
            Scalar::Bool(b) => serde_json::Value::Bool(*b),
            Scalar::Num(n) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Scalar::Str(s) => serde_json::Value::String(s.clone()),
        }
    }

    /// Numeric view: numbers, and strings that parse as numbers.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Num(n) => Some(*n),
            Scalar::Str(s) => s.trim().parse().ok(),
            Scalar::Bool(_) | Scalar::Null => None,
        }
    }

    /// Truthiness used by boolean expressions: `true`, non-zero numbers and
    /// non-empty strings are true.
    pub fn truthy(&self) -> bool {
        match self {
            Scalar::Null => false,
            Scalar::Bool(b) => *b,
            Scalar::Num(n) => *n != 0.0,
            Scalar::Str(s) => !s.is_empty(),
        }
    }
}

impl PartialEq for Scalar {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scalar {}
impl PartialOrd for Scalar {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scalar {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Scalar::Bool(a), Scalar::Bool(b)) => a.cmp(b),
            (Scalar::Num(a), Scalar::Num(b)) => a.total_cmp(b),
            (Scalar::Str(a), Scalar::Str(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}
impl std::hash::Hash for Scalar {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.rank().hash(state);
        match self {
            Scalar::Null => {}
            Scalar::Bool(b) => b.hash(state),
            Scalar::Num(n) => n.to_bits().hash(state),
            Scalar::Str(s) => s.hash(state),
        }
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Null => write!(f, "null"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Num(n) => write!(f, "{n}"),
            Scalar::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// Whether `text` is an integer written with digits only (and an optional
/// leading `-`), as JSON writes integers.
pub(crate) fn is_integer_literal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Whether the float `f` parsed from the integer literal `text` is exactly
/// its value.
fn exact_integer(text: &str, f: f64) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    // Up to 15 digits is below 2^53: always exact.
    digits.len() <= 15 || format!("{:.0}", f.abs()) == digits
}

/// The nearest 64-bit float to a decimal numeral (JSON number text, or the
/// numeric strings of [`Decimal::parse`]); an error when it is out of the
/// float range: infinite, or rounded to zero although not zero.
pub(crate) fn float(text: &str) -> Result<f64, String> {
    let out_of_range = || format!("{text} is out of range for a 64-bit float");
    let f: f64 = text.parse().map_err(|_| out_of_range())?;
    if !f.is_finite() {
        return Err(out_of_range());
    }
    if f == 0.0 && Decimal::parse(text).is_some_and(|d| !d.is_zero()) {
        return Err(out_of_range());
    }
    Ok(f)
}

/// A decimal numeral read exactly: `[+-]digits[.digits][(e|E)[+-]digits]`
/// (at least one mantissa digit; JSON numbers are a subset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decimal<'a> {
    /// A leading `-`.
    pub negative: bool,
    /// Digits before the point.
    pub int: &'a str,
    /// Digits after the point.
    pub frac: &'a str,
    /// The exponent (saturated to ±`i64::MAX / 2`).
    pub exp: i64,
}

/// The exact integer value of a [`Decimal`], when it is one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Whole {
    /// An integer whose magnitude fits in a `u128`.
    Int {
        /// Whether it is below zero.
        negative: bool,
        /// Its magnitude.
        magnitude: u128,
    },
    /// An integer too large for a `u128`.
    TooBig,
    /// Not an integer.
    Fraction,
}

impl<'a> Decimal<'a> {
    /// Parses a numeral; `None` if `text` is not one (`"inf"`, `"1.2.3"`,
    /// `""`).
    pub(crate) fn parse(text: &'a str) -> Option<Decimal<'a>> {
        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.len() + frac.len() == 0 || !all_digits(int) || !all_digits(frac) {
            return None;
        }
        let exp = match exp {
            None => 0,
            Some(e) => {
                let (neg, digits) = match e.as_bytes().first() {
                    Some(b'-') => (true, &e[1..]),
                    Some(b'+') => (false, &e[1..]),
                    _ => (false, e),
                };
                if digits.is_empty() || !all_digits(digits) {
                    return None;
                }
                let limit = i64::MAX / 2;
                let value = digits
                    .bytes()
                    .try_fold(0i64, |acc, b| {
                        acc.checked_mul(10)?.checked_add(i64::from(b - b'0'))
                    })
                    .map_or(limit, |v| v.min(limit));
                if neg {
                    -value
                } else {
                    value
                }
            }
        };
        Some(Decimal {
            negative,
            int,
            frac,
            exp,
        })
    }

    /// Whether the value is zero.
    pub(crate) fn is_zero(&self) -> bool {
        self.int.bytes().chain(self.frac.bytes()).all(|b| b == b'0')
    }

    /// The exact integer value, if it is an integer.
    pub(crate) fn whole(&self) -> Whole {
        match self.scaled(0) {
            None => Whole::TooBig,
            Some((_, true)) => Whole::Fraction,
            Some((magnitude, false)) => Whole::Int {
                negative: self.negative && magnitude != 0,
                magnitude,
            },
        }
    }

    /// The magnitude times 10^`shift`, exactly: its integer part and
    /// whether a fraction remains; `None` if the integer part does not fit
    /// in a `u128`.
    pub(crate) fn scaled(&self, shift: i64) -> Option<(u128, bool)> {
        let digits: Vec<u8> = self
            .int
            .bytes()
            .chain(self.frac.bytes())
            .skip_while(|&b| b == b'0')
            .collect();
        if digits.is_empty() {
            return Some((0, false));
        }
        // value = digits × 10^exp
        let exp = self
            .exp
            .saturating_add(shift)
            .saturating_sub(self.frac.len() as i64);
        let int_len = digits.len() as i64 + exp;
        if int_len > 39 {
            return None;
        }
        let (int, fraction): (&[u8], &[u8]) = if exp >= 0 {
            (&digits, &[])
        } else if int_len <= 0 {
            (&[], &digits)
        } else {
            digits.split_at(int_len as usize)
        };
        let zeros = if exp > 0 { exp as u32 } else { 0 };
        let magnitude = int
            .iter()
            .try_fold(0u128, |acc, &b| {
                acc.checked_mul(10)?.checked_add(u128::from(b - b'0'))
            })?
            .checked_mul(10u128.checked_pow(zeros)?)?;
        Some((magnitude, fraction.iter().any(|&b| b != b'0')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(text: &str) -> serde_json::Number {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn numbers_become_scalars_without_changing_value() {
        let ok = |t: &str| Scalar::from_number(&num(t)).unwrap();
        assert_eq!(ok("19.99"), Scalar::Num(19.99));
        assert_eq!(ok("-7"), Scalar::Num(-7.0));
        assert_eq!(ok("1e3"), Scalar::Num(1000.0));
        assert_eq!(ok("9007199254740992"), Scalar::Num(9007199254740992.0));
        assert_eq!(ok("-9007199254740992"), Scalar::Num(-9007199254740992.0));
        // 2^64 is a float exactly; 2^64 + 1 and 2^53 + 1 are not.
        assert_eq!(
            ok("18446744073709551616"),
            Scalar::Num(18446744073709551616.0)
        );
        assert_eq!(
            ok("18446744073709551617"),
            Scalar::Str("18446744073709551617".into())
        );
        assert_eq!(
            ok("9007199254740993"),
            Scalar::Str("9007199254740993".into())
        );
        assert_eq!(
            ok("-9007199254740993"),
            Scalar::Str("-9007199254740993".into())
        );
        // Not an integer literal: the nearest float.
        assert_eq!(ok("9007199254740993.0"), Scalar::Num(9007199254740992.0));
        assert_eq!(ok("0"), Scalar::Num(0.0));
        assert_eq!(ok("0e999999"), Scalar::Num(0.0));
        assert_eq!(ok("1e-300"), Scalar::Num(1e-300));

        // serde_json keeps a number's digits but writes its exponent as
        // `e+N`/`e-N`: messages show that spelling.
        let err = |t: &str| Scalar::from_number(&num(t)).unwrap_err();
        assert_eq!(err("1e400"), "1e+400 is out of range for a 64-bit float");
        assert_eq!(err("-1E400"), "-1e+400 is out of range for a 64-bit float");
        assert_eq!(err("1e-400"), "1e-400 is out of range for a 64-bit float");
        assert_eq!(
            err("1e99999999999999999999"),
            "1e+99999999999999999999 is out of range for a 64-bit float"
        );
        let long = format!("1{}", "0".repeat(400));
        assert_eq!(
            err(&long),
            format!("{long} is out of range for a 64-bit float")
        );

        let v: serde_json::Value =
            serde_json::from_str(r#"[1e400, 18446744073709551617, 1.50]"#).unwrap();
        assert_eq!(
            Scalar::from_json(&v).unwrap(),
            Scalar::Str("[1e+400,18446744073709551617,1.50]".into())
        );
    }

    #[test]
    fn decimals_are_read_exactly() {
        let whole = |t: &str| Decimal::parse(t).unwrap().whole();
        let int = |negative, magnitude| Whole::Int {
            negative,
            magnitude,
        };
        assert_eq!(whole("3"), int(false, 3));
        assert_eq!(whole("+3"), int(false, 3));
        assert_eq!(whole("-0"), int(false, 0));
        assert_eq!(whole("-0.0e5"), int(false, 0));
        assert_eq!(whole("0.000"), int(false, 0));
        assert_eq!(whole("2.0"), int(false, 2));
        assert_eq!(whole("2.50e1"), int(false, 25));
        assert_eq!(whole("1e3"), int(false, 1000));
        assert_eq!(whole("-1200e-2"), int(true, 12));
        assert_eq!(whole(".5e1"), int(false, 5));
        assert_eq!(whole("5."), int(false, 5));
        assert_eq!(whole("007"), int(false, 7));
        assert_eq!(whole("1.5"), Whole::Fraction);
        assert_eq!(whole("1.0000000000000000001"), Whole::Fraction);
        assert_eq!(whole("1e-1"), Whole::Fraction);
        assert_eq!(whole("1e-99999999999999999999"), Whole::Fraction);
        assert_eq!(
            whole("340282366920938463463374607431768211455"),
            int(false, u128::MAX)
        );
        assert_eq!(
            whole("340282366920938463463374607431768211456"),
            Whole::TooBig
        );
        assert_eq!(whole("1e39"), Whole::TooBig);
        assert_eq!(whole("1e99999999999999999999"), Whole::TooBig);
        for bad in [
            "", "-", ".", "e5", "1e", "1e+", "inf", "NaN", "1.2.3", "1x", " 1", "--1",
        ] {
            assert_eq!(Decimal::parse(bad), None, "{bad:?}");
        }
        let scaled = |t: &str, shift| Decimal::parse(t).unwrap().scaled(shift);
        assert_eq!(
            scaled("999999999999.999", 3),
            Some((999_999_999_999_999, false))
        );
        assert_eq!(
            scaled("999999999999.9990", 3),
            Some((999_999_999_999_999, false))
        );
        assert_eq!(
            scaled("999999999999.9991", 3),
            Some((999_999_999_999_999, true))
        );
        assert_eq!(scaled("-1.5e-2", 3), Some((15, false)));
        assert_eq!(scaled("0.0001", 3), Some((0, true)));
        assert_eq!(scaled("1e12", 3), Some((1_000_000_000_000_000, false)));
        assert_eq!(scaled("1e-99999999999999999999", 3), Some((0, true)));
        assert_eq!(scaled("1e36", 3), None);
        assert!(Decimal::parse("0.0e7").unwrap().is_zero());
        assert!(!Decimal::parse("0.01").unwrap().is_zero());
    }

    #[test]
    fn integer_literals() {
        for yes in ["0", "-0", "42", "-18446744073709551617"] {
            assert!(is_integer_literal(yes), "{yes}");
        }
        for no in ["", "-", "1.0", "1e3", "+1", " 1", "1.5"] {
            assert!(!is_integer_literal(no), "{no}");
        }
    }
}
