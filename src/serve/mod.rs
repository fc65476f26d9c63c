//! Serving: the HTTP API of a running engine (`segflow run … --http
//! 127.0.0.1:8080`), answered from the state the run has committed while
//! events keep flowing.
//!
//! | request | answer |
//! |---|---|
//! | `GET /healthz` | `ok` (no token needed) |
//! | `GET /v1/profiles/{identifier}` | the profile of any of its identifiers: identifiers, attributes, traits, segments, `as_of`; 404 for an unknown identifier |
//! | `GET /v1/segments` | each segment's name, description and size |
//! | `GET /v1/segments/{name}/members?limit=N&cursor=C` | members in profile-id order, `limit` (default 100, at most 10 000) at a time, `next_cursor` for the next page |
//! | `GET /v1/decide/{slot}?id=IDENTIFIER` | the content variant chosen for the profile (see [`crate::spec::content`]) and why |
//! | `GET /v1/decide?slots=a,b&id=IDENTIFIER` | several slots in one call, for a page render |
//! | `GET /v1/segments/{name}/export?format=csv\|jsonl&since=T` | the members with their identifiers, or the entries and exits after `T` (see [`export`]) |
//! | `GET /metrics` | the run's metrics in the Prometheus text format (see [`metrics`]) |
//! | `GET /v1/diffs/stream?segment=a,b&profile=P&id=IDENTIFIER` | segment diffs as server-sent events (`event: diff`, one diff line as data), as they are committed, optionally only some segments, one profile, or the profile of an identifier (then `event: profile` announces its profile and segments, at the start and when a merge moves it) |
//!
//! Every endpoint but `/healthz` needs `Authorization: Bearer TOKEN` (the
//! stream also takes `?access_token=TOKEN`, RFC 6750 §2.3, because a
//! browser's `EventSource` cannot send headers); see [`ServeConfig`].
//!
//! ## Freshness
//!
//! Profiles are read from the run's RocksDB state, which the commit stage
//! writes once a time is complete (see [`crate::time::completion`]):
//! an event is in the answers a tick plus the allowed lateness after it
//! (plus the commit's few milliseconds). Every answer that reads the
//! state says how fresh it is, in `as_of`:
//!
//! * `time` (ms since the epoch): every event at or before it is in the
//!   answer, and no later record can change it (older records are late);
//! * `read_until` (ms): the end of the latest tick the sources have
//!   admitted;
//! * `complete`: whether `time` has reached `read_until`, i.e. the answer
//!   holds every event read so far (`false` while newer events wait for
//!   their time to complete, within the allowed lateness);
//! * `lag_ms`: the wall clock minus `time`.
//!
//! The segment sizes, members and the diff stream follow the committed
//! segment diffs (the run's output), which are final when written.

mod api;
pub mod export;
mod live;
pub mod metrics;

pub use api::{api_token, ServeConfig, Server, TokenOrigin};
pub use live::{AsOf, Live, LookupError, StreamEnd};
