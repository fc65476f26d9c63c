//! The dataflow stages, each a free function from collections to collections.
//!
//! Records flow one way:
//!
//! ```text
//! records ─► identity::resolve ─► (identifier, profile)
//!    │                                   │
//!    ├─► profiles::crm_current ─► profiles::attributes (per profile)
//!    └─► traits::contributions ─► route::route ─► segments::evaluate
//! ```
//!
//! All collections are timed by event time rounded to the engine tick
//! ([`Time`], milliseconds since the epoch). Because the time is totally
//! ordered, trait totals and segment memberships are kept per profile as
//! keyed state applied in time order ([`segments::evaluate`]) rather than
//! by `count_total` and `reduce`.

use differential_dataflow::VecCollection;

pub mod build;
pub mod identity;
pub mod profiles;
pub mod reload;
pub mod retain;
pub mod route;
pub mod segments;
pub mod traits;

pub use crate::time::Time;

/// A differential collection at event time.
pub type Coll<'s, D, R = isize> = VecCollection<'s, Time, D, R>;
