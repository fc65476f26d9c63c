//! Timestamp parsing lives in [`crate::time::parse`], the one owner of
//! time; the decoders of this module use it from here.

pub use crate::time::parse::{json_type, parse_time, parse_time_number, parse_time_str};
