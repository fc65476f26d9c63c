//! `GET /metrics`: the run in the Prometheus text exposition format.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `segflow_source_lines_total` | counter | `source` | lines read |
//! | `segflow_source_records_total` | counter | `source` | records admitted into the dataflow |
//! | `segflow_source_dead_letters_total` | counter | `source` | lines dead-lettered (late ones included) |
//! | `segflow_source_late_total` | counter | `source` | records older than the watermark |
//! | `segflow_source_clock_ms` | gauge | `source` | the source's clock: the largest tick it admitted, or an idle live source's watermark (ms since the epoch) |
//! | `segflow_source_clock_lag_seconds` | gauge | `source` | the wall clock minus that clock |
//! | `segflow_committed_time_ms` | gauge | | every time before it is committed (diffs written, state readable) |
//! | `segflow_commit_lag_seconds` | gauge | | the wall clock minus the committed time: how far the answers trail the wall clock in a live run |
//! | `segflow_commit_delay_seconds` | histogram | | for each committed time of a live run, the wall clock at its commit minus the end of its tick (times more than a day old, a replay's, are not observed) |
//! | `segflow_diffs_total` | counter | | segment diffs committed (entries and exits) |
//! | `segflow_profiles` | gauge | | profiles |
//! | `segflow_segment_members` | gauge | `segment` | members per segment |
//! | `segflow_api_request_duration_seconds` | histogram | `endpoint` | time to answer each API request (route pattern, e.g. `/v1/profiles/{identifier}`) |

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::io::sinks::SourceSummary;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SegmentLabel {
    segment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Buckets from 50 µs doubling 20 times (to about 26 s).
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// The run's metrics (see the module documentation).
pub struct Metrics {
    registry: Registry,
    lines: Family<SourceLabel, Counter>,
    records: Family<SourceLabel, Counter>,
    dead_letters: Family<SourceLabel, Counter>,
    late: Family<SourceLabel, Counter>,
    clock: Family<SourceLabel, Gauge>,
    clock_lag: Family<SourceLabel, FloatGauge>,
    committed: Gauge,
    commit_lag: FloatGauge,
    commit_delay: Histogram,
    diffs: Counter,
    profiles: Gauge,
    members: Family<SegmentLabel, Gauge>,
    api: Family<EndpointLabel, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Raises counter `c` to `total` (counters only go up; a snapshot of a
/// cumulative count moves them by the difference).
fn raise(c: &Counter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

impl Metrics {
    /// Empty metrics, registered.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            lines: Family::default(),
            records: Family::default(),
            dead_letters: Family::default(),
            late: Family::default(),
            clock: Family::default(),
            clock_lag: Family::default(),
            committed: Gauge::default(),
            commit_lag: FloatGauge::default(),
            commit_delay: latency_buckets(),
            diffs: Counter::default(),
            profiles: Gauge::default(),
            members: Family::default(),
            api: Family::new_with_constructor(latency_buckets as fn() -> Histogram),
        };
        let mut registry = Registry::default();
        registry.register("segflow_source_lines", "Lines read", m.lines.clone());
        registry.register(
            "segflow_source_records",
            "Records admitted into the dataflow",
            m.records.clone(),
        );
        registry.register(
            "segflow_source_dead_letters",
            "Lines dead-lettered (late ones included)",
            m.dead_letters.clone(),
        );
        registry.register(
            "segflow_source_late",
            "Records older than the watermark",
            m.late.clone(),
        );
        registry.register(
            "segflow_source_clock_ms",
            "The largest tick admitted, or an idle live source's watermark (ms since the epoch)",
            m.clock.clone(),
        );
        registry.register(
            "segflow_source_clock_lag_seconds",
            "Wall clock minus the source's clock",
            m.clock_lag.clone(),
        );
        registry.register(
            "segflow_committed_time_ms",
            "Every time before this is committed (ms since the epoch)",
            m.committed.clone(),
        );
        registry.register(
            "segflow_commit_lag_seconds",
            "Wall clock minus the committed time",
            m.commit_lag.clone(),
        );
        registry.register(
            "segflow_commit_delay_seconds",
            "Wall clock at a live time's commit minus the end of its tick",
            m.commit_delay.clone(),
        );
        registry.register("segflow_diffs", "Segment diffs committed", m.diffs.clone());
        registry.register("segflow_profiles", "Profiles", m.profiles.clone());
        registry.register(
            "segflow_segment_members",
            "Members per segment",
            m.members.clone(),
        );
        registry.register(
            "segflow_api_request_duration_seconds",
            "Time to answer an API request",
            m.api.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts `n` committed diffs.
    pub fn diffs(&self, n: u64) {
        self.diffs.inc_by(n);
    }

    /// Segment diffs committed so far.
    pub fn diffs_total(&self) -> u64 {
        self.diffs.get()
    }

    /// A live time committed `delay_s` seconds after its tick ended.
    pub fn commit_delay(&self, delay_s: f64) {
        self.commit_delay.observe(delay_s);
    }

    /// An API request to `endpoint` took `secs`.
    pub fn api_request(&self, endpoint: &str, secs: f64) {
        self.api
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.to_string(),
            })
            .observe(secs);
    }

    /// The text exposition of the metrics as of `now_ms`, after taking in
    /// the run's counters (`sources`, each with its clock), the committed
    /// time, profiles and segment sizes.
    pub fn render(
        &self,
        now_ms: u64,
        sources: &[(SourceSummary, Option<u64>)],
        committed: Option<u64>,
        profiles: i64,
        sizes: &[(String, usize)],
    ) -> String {
        for (s, clock) in sources {
            let l = SourceLabel {
                source: s.name.clone(),
            };
            raise(&self.lines.get_or_create(&l), s.lines);
            raise(&self.records.get_or_create(&l), s.records);
            raise(&self.dead_letters.get_or_create(&l), s.dead_letters);
            raise(&self.late.get_or_create(&l), s.late);
            if let Some(c) = clock {
                self.clock.get_or_create(&l).set(*c as i64);
                self.clock_lag
                    .get_or_create(&l)
                    .set((now_ms as f64 - *c as f64) / 1000.0);
            }
        }
        if let Some(c) = committed {
            self.committed.set(c as i64);
            self.commit_lag.set((now_ms as f64 - c as f64) / 1000.0);
        }
        self.profiles.set(profiles);
        for (segment, size) in sizes {
            self.members
                .get_or_create(&SegmentLabel {
                    segment: segment.clone(),
                })
                .set(*size as i64);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
