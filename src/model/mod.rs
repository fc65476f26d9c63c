//! The segflow data model.
//!
//! Everything that enters the dataflow is decoded here, once, into a typed
//! [`Record`]:
//!
//! * [`scalar`] — [`Scalar`], a totally ordered JSON-like value used for
//!   attributes, event fields and expression results;
//! * timestamps are parsed by [`crate::time::parse`] (event time has one
//!   owner, [`crate::time`]);
//! * [`normalize`] — canonical forms of e-mail addresses, phone numbers
//!   (E.164) and opaque ids;
//! * [`ident`] — [`Ident`], a ranked, normalized identifier, and
//!   [`IdentityRules`], which decide which input fields are identifiers and
//!   how they rank;
//! * [`limits`] — the range of values the engine holds exactly;
//! * `json` — the allocation-free reader of a JSON line that the JSON
//!   decoder tries first;
//! * [`record`] — web events, CRM records and transactions, with their JSON
//!   and CSV decoders;
//! * [`formats`] — the event formats of tracking SDKs (Segment, GA4),
//!   mapped to those records.

pub mod formats;
pub mod ident;
mod json;
pub mod limits;
pub mod normalize;
pub mod record;
pub mod scalar;

pub use ident::*;
pub use normalize::*;
pub use record::*;
pub use scalar::{Scalar, ScalarRef};
