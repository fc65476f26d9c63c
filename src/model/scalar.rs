//! Scalar values: CRM attributes, event fields and expression results.
//!
//! A [`Scalar`] is a small JSON-like value that is totally ordered (numbers
//! compare with `f64::total_cmp`), so it can live inside differential
//! collections, which need `Ord`.

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

impl Scalar {
    fn rank(&self) -> u8 {
        match self {
            Scalar::Null => 0,
            Scalar::Bool(_) => 1,
            Scalar::Num(_) => 2,
            Scalar::Str(_) => 3,
        }
    }

    /// Converts a JSON value; arrays and objects become their JSON text.
    pub fn from_json(v: &serde_json::Value) -> Scalar {
        match v {
            serde_json::Value::Null => Scalar::Null,
            serde_json::Value::Bool(b) => Scalar::Bool(*b),
            serde_json::Value::Number(n) => Scalar::Num(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => Scalar::Str(s.clone()),
            other => Scalar::Str(other.to_string()),
        }
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
