//! # segflow
//!
//! A real-time personalization engine: three streams in (web/app events,
//! CRM records, transactions), identity-resolved profiles, windowed traits
//! and segment memberships out, as entry/exit diffs within milliseconds of
//! the event, with durable, queryable state in RocksDB. It is built on
//! timely dataflow and differential dataflow, runs as a library or as the
//! `segflow` cluster binary, and gives byte-identical results for any number
//! of workers and processes.
//!
//! The flow goes one way, one module per stage:
//!
//! ```text
//! io::sources ─► model (decode, normalize) ─► dataflow::identity ─► dataflow::profiles
//!                                              │                      │
//!                                              └► dataflow::traits ─► dataflow::segments ─► io::sinks ─► store
//! ```
//!
//! - [`spec`]: the dataflow definition file (TOML) and its condition language;
//! - [`time`]: event time — ticks, timestamps, watermarks, lateness,
//!   idleness, completion (one owner, with a glossary);
//! - [`model`]: typed records, identifiers, normalization of email, phone, ids;
//! - [`io::sources`]: files, TCP, memory; watermarks and dead letters;
//! - [`dataflow`]: identity resolution, traits, profiles, segments;
//! - [`io::sinks`]: the commit stage writing complete timestamps in order;
//! - [`store`]: RocksDB column families and lookups;
//! - [`serve`]: the HTTP API of a running engine (profiles, segments,
//!   content decisions, the diff stream);
//! - [`generate`]: a seeded, realistic e-commerce data set;
//! - [`mod@bench`]: `segflow bench`, named jobs measured end to end.
//!
//! ## Embedding
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use segflow::{Engine, Input, Output, spec::parse_spec};
//!
//! let spec = parse_spec(r#"
//!     [sources.web]
//!     [traits.views]
//!     stream = "web"
//!     filter = 'event == "view_item"'
//!     [segments.viewer]
//!     when = "views >= 2"
//! "#, "inline.toml").unwrap();
//! let web = vec![
//!     r#"{"event":"view_item","ts":1,"anonymous_id":"a1"}"#.to_string(),
//!     r#"{"event":"view_item","ts":2,"anonymous_id":"a1"}"#.to_string(),
//! ];
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let sink = Arc::clone(&seen);
//! Engine::new(spec)
//!     .input("web", Input::Memory(Arc::new(web))).unwrap()
//!     .output(Output::Callback(Arc::new(move |d| sink.lock().unwrap().push(d.to_line()))))
//!     .run(timely::Config::thread())
//!     .unwrap();
//! assert_eq!(*seen.lock().unwrap(), vec![r#"{"time":2000,"segment":"viewer","profile":"anon:a1","diff":1}"#]);
//! ```

#![forbid(missing_docs)]

pub mod bench;
pub mod dataflow;
pub mod engine;
pub mod fault;
pub mod generate;
pub mod io;
pub mod model;
pub mod serve;
pub mod spec;
pub mod store;
pub mod time;

pub use engine::{Engine, EngineError, Output};
pub use io::sinks::{RunSummary, SegmentDiff};
pub use io::sources::Input;
