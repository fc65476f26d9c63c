//! The dataflow definition file: a TOML document describing the engine
//! settings, identity resolution, input sources, outputs, traits and
//! segments.
//!
//! [`parse_spec`] turns the text into a validated [`Spec`]; every error is a
//! [`SpecError`] pointing at the offending value with a 1-based line and
//! column.

pub mod content;
pub mod expr;
pub mod location;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use self::expr::{parse_expr, Expr};

/// An error in a dataflow definition file, with its position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.located())]
pub struct SpecError {
    /// The file name as given to the parser.
    pub file: String,
    /// 1-based line (0 when the file could not be read).
    pub line: usize,
    /// 1-based column in characters (0 when the file could not be read).
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl SpecError {
    /// `file:line:column: message`, or `file: message` when the error has no
    /// position (the file could not be read).
    fn located(&self) -> String {
        if self.line == 0 {
            format!("{}: {}", self.file, self.message)
        } else {
            format!(
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// The kind of an input stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKind {
    /// Web / app behavioural events (`"web"`).
    Web,
    /// CRM attribute records (`"crm"`).
    Crm,
    /// Purchase transactions (`"transactions"`).
    Transactions,
}

impl StreamKind {
    /// The name used in the definition file.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Web => "web",
            StreamKind::Crm => "crm",
            StreamKind::Transactions => "transactions",
        }
    }

    fn from_name(s: &str) -> Option<StreamKind> {
        match s {
            "web" => Some(StreamKind::Web),
            "crm" => Some(StreamKind::Crm),
            "transactions" => Some(StreamKind::Transactions),
            _ => None,
        }
    }
}

/// The record format of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// One JSON object per line (`"jsonl"`).
    Jsonl,
    /// Comma-separated values with a header line (`"csv"`, crm only).
    Csv,
    /// Messages of the Segment tracking spec, one message or batch per line
    /// (`"segment"`, web only; see [`crate::model::formats::segment`]).
    Segment,
    /// Google Analytics 4: a Measurement Protocol payload or a BigQuery
    /// export row per line (`"ga4"`, web only; see
    /// [`crate::model::formats::ga4`]).
    Ga4,
}

impl Format {
    /// The format named `name` (`"jsonl"`, `"csv"`, `"segment"`, `"ga4"`)
    /// for source `source` of `kind`; the error says which kinds take it.
    pub fn for_source(name: &str, kind: StreamKind, source: &str) -> Result<Format, String> {
        match name {
            "jsonl" => Ok(Format::Jsonl),
            "csv" if kind == StreamKind::Crm => Ok(Format::Csv),
            "segment" if kind == StreamKind::Web => Ok(Format::Segment),
            "ga4" if kind == StreamKind::Web => Ok(Format::Ga4),
            f @ ("csv" | "segment" | "ga4") => {
                let wants = if f == "csv" { "crm" } else { "web" };
                Err(format!(
                    "format \"{f}\" is only supported for {wants} sources; source `{source}` is {}",
                    kind.as_str()
                ))
            }
            other => Err(format!(
                "unknown format `{other}`; expected \"jsonl\", \"csv\" (crm), \"segment\" or \"ga4\" (web)"
            )),
        }
    }
}

pub use crate::time::{LatePolicy, TimeUnit};

/// How a trait aggregates matching events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Aggregate {
    /// Number of matching events (`"count"`).
    Count,
    /// Sum of a numeric field of matching events (`"sum"`).
    Sum,
    /// Mean of a numeric field (`"avg"`); null without events.
    Avg,
    /// Least value of a numeric field (`"min"`); null without events.
    Min,
    /// Greatest value of a numeric field (`"max"`); null without events.
    Max,
    /// Number of distinct values of a field (`"distinct"`).
    Distinct,
    /// The field's value on the earliest event (`"first"`).
    First,
    /// The field's value on the latest event (`"last"`).
    Last,
    /// The field's most frequent value (`"most_frequent"`); `NAME.count`
    /// is how often it occurs.
    MostFrequent,
    /// The share (0 to 1) of events, or of a summed field, for which the
    /// `part` condition holds (`"share"`); null without events.
    Share,
    /// Milliseconds from the earliest event to the evaluation time
    /// (`"since_first"`); null without events.
    SinceFirst,
    /// Milliseconds from the latest event to the evaluation time
    /// (`"since_last"`); null without events.
    SinceLast,
}

impl Aggregate {
    /// Every aggregate by its name in the file.
    pub const NAMES: [(&'static str, Aggregate); 12] = [
        ("count", Aggregate::Count),
        ("sum", Aggregate::Sum),
        ("avg", Aggregate::Avg),
        ("min", Aggregate::Min),
        ("max", Aggregate::Max),
        ("distinct", Aggregate::Distinct),
        ("first", Aggregate::First),
        ("last", Aggregate::Last),
        ("most_frequent", Aggregate::MostFrequent),
        ("share", Aggregate::Share),
        ("since_first", Aggregate::SinceFirst),
        ("since_last", Aggregate::SinceLast),
    ];

    /// The name used in the file.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("count", |(n, _)| n)
    }

    /// Whether the aggregate is kept as differences of one or two totals
    /// (count, sum, avg, share), rather than as the set of values in the
    /// window.
    pub fn is_abelian(self) -> bool {
        matches!(
            self,
            Aggregate::Count | Aggregate::Sum | Aggregate::Avg | Aggregate::Share
        )
    }

    /// Whether the aggregate is a recency (`since_first`, `since_last`).
    pub fn is_recency(self) -> bool {
        matches!(self, Aggregate::SinceFirst | Aggregate::SinceLast)
    }

    /// Whether `of` names the aggregated field: required for all but
    /// count, share (where it is an optional weight) and the recencies.
    fn needs_of(self) -> Option<bool> {
        match self {
            Aggregate::Count | Aggregate::SinceFirst | Aggregate::SinceLast => Some(false),
            Aggregate::Share => None,
            _ => Some(true),
        }
    }
}

/// Which events of a profile a trait aggregates, as of the evaluation
/// time `T` (event time; for a replay, the last event's tick).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Window {
    /// Every event at or before `T`.
    Lifetime,
    /// Events at ticks in `(T - length, T]`.
    Sliding(u64),
    /// Events in the calendar-aligned window of this length that holds
    /// `T`, in the engine's time zone: `[start, start + length)`, where
    /// windows start at local midnight (and every `length` after it, for a
    /// length that divides a day), or on Monday at local midnight for
    /// `7d`.
    Tumbling(u64),
    /// The profile's current session: the latest run of events of the
    /// trait's stream (all of them, not only those the filter keeps)
    /// whose successive ticks are less than `gap` apart, if its last event
    /// is less than `gap` before `T`; only events in `(T - max, T]`
    /// count.
    Session {
        /// Inactivity that ends a session (ms).
        gap: u64,
        /// How far back a session is followed (ms).
        max: u64,
    },
}

/// A sequence condition on a count: each counted event (`A`, the trait's
/// stream and filter) is counted only if one of the `steps` (`B`)
/// follows it, or none does, within `within_ms`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    /// `followed_by` (true) or `not_followed_by` (false).
    pub followed: bool,
    /// The events that count as `B`: any of these streams and filters.
    pub steps: Vec<(StreamKind, Option<Expr>)>,
    /// How long after `A` a `B` may come (ms): `B` at ticks in
    /// `(t, t + within]`.
    pub within_ms: u64,
}

/// The `[engine]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSpec {
    /// Processing tick in milliseconds (> 0).
    pub tick_ms: u64,
    /// How far behind the watermark an event may arrive, in milliseconds.
    pub allowed_lateness_ms: u64,
    /// Idle time after which the watermark advances with wall-clock time.
    pub idle_advance_ms: u64,
    /// How far ahead (ms) a record may be dated before it is `future`; see
    /// [`crate::time::TimeConfig::max_future_skew_ms`].
    pub max_future_skew_ms: Option<u64>,
    /// What to do with too-late events.
    pub late_policy: LatePolicy,
    /// Longest accepted input line in bytes (> 0).
    pub max_line_bytes: usize,
    /// Size (bytes, > 0) of the ranges a file of JSON lines is cut into
    /// to be read by all workers at once; lateness is judged within each
    /// range (see [`crate::io::sources`]).
    pub file_range_bytes: u64,
    /// Merge work (in records) an arrangement does each time it is
    /// scheduled while it has no new input; `None` (the default): none.
    pub idle_merge_effort: Option<u64>,
    /// Two-letter region used for phone normalisation.
    pub default_region: String,
    /// Number of worker threads, if set.
    pub workers: Option<usize>,
    /// The time zone of calendar-aligned windows and of the `hour` and
    /// `weekday` fields.
    pub time_zone: chrono_tz::Tz,
}

impl Default for EngineSpec {
    fn default() -> Self {
        EngineSpec {
            tick_ms: 1_000,
            allowed_lateness_ms: 0,
            idle_advance_ms: 1_000,
            max_future_skew_ms: None,
            late_policy: LatePolicy::DeadLetter,
            max_line_bytes: 1 << 20,
            file_range_bytes: DEFAULT_FILE_RANGE_BYTES,
            idle_merge_effort: None,
            default_region: "US".to_string(),
            workers: None,
            time_zone: chrono_tz::UTC,
        }
    }
}

impl EngineSpec {
    /// The time settings, for [`crate::time`].
    pub fn time_config(&self) -> crate::time::TimeConfig {
        crate::time::TimeConfig {
            tick_ms: self.tick_ms,
            allowed_lateness_ms: self.allowed_lateness_ms,
            idle_advance_ms: self.idle_advance_ms,
            max_future_skew_ms: self.max_future_skew_ms,
            late_policy: self.late_policy,
        }
    }
}

/// The least [`EngineSpec::file_range_bytes`]: 4 KiB (every range is
/// opened and looked at before the file is read).
pub const MIN_FILE_RANGE_BYTES: u64 = 4096;

/// The default [`EngineSpec::file_range_bytes`]: 16 MiB.
pub const DEFAULT_FILE_RANGE_BYTES: u64 = 16 << 20;

/// The default identifier priority list.
pub const DEFAULT_PRIORITY: [&str; 5] = ["crm_id", "user_id", "email", "phone", "anonymous_id"];

/// The `[identity]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentitySpec {
    /// Identifier names, highest priority first (extras appended).
    pub priority: Vec<String>,
    /// Additional identifier names, as written in the file.
    pub extra: Vec<String>,
}

impl Default for IdentitySpec {
    fn default() -> Self {
        IdentitySpec {
            priority: DEFAULT_PRIORITY.iter().map(|s| s.to_string()).collect(),
            extra: Vec::new(),
        }
    }
}

/// One `[sources.NAME]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSpec {
    /// The table key.
    pub name: String,
    /// What the source carries.
    pub kind: StreamKind,
    /// File path or `tcp://host:port`; may come from the command line instead.
    pub location: Option<String>,
    /// Record format.
    pub format: Format,
    /// Keep reading a file as it grows.
    pub follow: bool,
    /// For tcp sources: stop when the peer disconnects.
    pub until_disconnect: bool,
    /// The unit of numeric timestamps (`time_unit`, default by magnitude).
    pub time_unit: TimeUnit,
    /// For an `http://` input: the write key requests must carry (HTTP
    /// basic auth user name), if any.
    pub write_key: Option<String>,
}

/// The `[output]` table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputSpec {
    /// Where segment changes go: a path, `-`, `tcp://addr`, or an
    /// `http://`/`https://` URL (a webhook).
    pub segments: Option<String>,
    /// Where rejected records go.
    pub dead_letter: Option<String>,
    /// Directory for checkpoints.
    pub state_dir: Option<String>,
    /// How diffs are delivered to a webhook (`[output.webhook]`).
    pub webhook: WebhookSpec,
}

/// The `[output.webhook]` table: delivery of segment diffs to an
/// `http://`/`https://` segment output (see [`crate::io::sinks::webhook`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookSpec {
    /// The file that batches failing permanently are appended to (JSON
    /// lines); `failed`, default `webhook_failed.jsonl`.
    pub failed: String,
    /// The environment variable holding the HMAC-SHA256 signing secret;
    /// `secret_env`, default `SEGFLOW_WEBHOOK_SECRET`. Unset: requests are
    /// not signed.
    pub secret_env: String,
    /// Attempts per batch before it counts as failed (`max_attempts`,
    /// default 8, at least 1).
    pub max_attempts: u32,
    /// Diffs per request at most (`max_batch`, default 500).
    pub max_batch: usize,
    /// How long one attempt may take, milliseconds (`timeout`, default 10 s).
    pub timeout_ms: u64,
    /// The wait before the first retry, milliseconds; it doubles with each
    /// retry up to 30 s (`backoff`, default 500 ms).
    pub backoff_ms: u64,
}

impl Default for WebhookSpec {
    fn default() -> Self {
        WebhookSpec {
            failed: "webhook_failed.jsonl".to_string(),
            secret_env: "SEGFLOW_WEBHOOK_SECRET".to_string(),
            max_attempts: 8,
            max_batch: 500,
            timeout_ms: 10_000,
            backoff_ms: 500,
        }
    }
}

/// One `[traits.NAME]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct TraitSpec {
    /// The table key.
    pub name: String,
    /// The stream the trait is computed over (web or transactions).
    pub stream: StreamKind,
    /// Which events count.
    pub filter: Option<Expr>,
    /// How matching events are aggregated.
    pub aggregate: Aggregate,
    /// The aggregated field path (the weight of a `share`).
    pub of: Option<Vec<String>>,
    /// For `share`: the condition whose share is measured.
    pub part: Option<Expr>,
    /// Which events are aggregated.
    pub window: Window,
    /// For a count: an event counts only if followed (or not) by another.
    pub sequence: Option<Sequence>,
}

impl TraitSpec {
    /// Whether the trait is kept as totals (see [`Aggregate::is_abelian`]):
    /// not over a session window and not a sequence.
    pub fn is_abelian(&self) -> bool {
        self.aggregate.is_abelian()
            && !matches!(self.window, Window::Session { .. })
            && self.sequence.is_none()
    }
}

/// One `[segments.NAME]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentSpec {
    /// The table key.
    pub name: String,
    /// Membership condition over traits, `attributes.<name>` and other
    /// segments.
    pub when: Expr,
    /// Free text.
    pub description: Option<String>,
    /// Flapping control: once a profile enters, it stays at least this
    /// long (ms) even if the condition stops holding; its exit is then
    /// written when the dwell time has passed, if the condition is still
    /// false then.
    pub min_dwell_ms: Option<u64>,
}

/// A validated dataflow definition.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// The file name it was read from.
    pub file: String,
    /// Engine settings.
    pub engine: EngineSpec,
    /// Identity resolution settings.
    pub identity: IdentitySpec,
    /// Input sources, in file order.
    pub sources: Vec<SourceSpec>,
    /// Outputs.
    pub output: OutputSpec,
    /// Traits, in file order (the trait index is the position here).
    pub traits: Vec<TraitSpec>,
    /// Segments, in file order.
    pub segments: Vec<SegmentSpec>,
    /// Content slots (`[content.SLOT]`), in file order: what
    /// `/v1/decide` chooses from (see [`content`]).
    pub content: Vec<content::ContentSlot>,
}

impl Spec {
    /// What in a valid definition probably does not do what its author
    /// meant, one message per finding (`segflow check` prints them, `run`
    /// logs them): a duration shorter than the engine tick — a sliding or
    /// tumbling window, a session gap, a sequence's `within`, a segment's
    /// `min_dwell` — acts within one tick (event times are rounded down to
    /// ticks), so a window of it holds an event for less than a tick and a
    /// dwell time ends at the next tick.
    pub fn warnings(&self) -> Vec<String> {
        let tick = self.engine.tick_ms;
        let mut out = Vec::new();
        let mut short = |what: String, ms: u64| {
            if ms < tick {
                out.push(format!(
                    "{what} is {ms} ms, shorter than the engine tick ({tick} ms): it acts within one tick (event times are rounded down to ticks); make it at least the tick, or the tick shorter"
                ));
            }
        };
        for t in &self.traits {
            let name = &t.name;
            match t.window {
                Window::Sliding(ms) => short(format!("[traits.{name}] window"), ms),
                Window::Tumbling(ms) => short(format!("[traits.{name}] tumbling"), ms),
                Window::Session { gap, .. } => short(format!("[traits.{name}] session_gap"), gap),
                Window::Lifetime => {}
            }
            if let Some(seq) = &t.sequence {
                short(format!("[traits.{name}] within"), seq.within_ms);
            }
        }
        for sg in &self.segments {
            if let Some(ms) = sg.min_dwell_ms {
                short(format!("[segments.{}] min_dwell", sg.name), ms);
            }
        }
        out
    }

    /// Position of the trait called `name`.
    pub fn trait_index(&self, name: &str) -> Option<usize> {
        self.traits.iter().position(|t| t.name == name)
    }

    /// The source called `name`.
    pub fn source(&self, name: &str) -> Option<&SourceSpec> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// What the definition computes, as text: two definitions with the
    /// same text give the same results. Left out: the file name, comments
    /// and layout (conditions are rendered, not copied), source paths and
    /// outputs (the command line may replace them, and they may differ
    /// between the hosts of a cluster), `workers` and descriptions.
    pub fn semantics(&self) -> String {
        let mut engine = self.engine.clone();
        engine.workers = None;
        let mut t = format!("{engine:?}\n{:?}\n", self.identity);
        for s in &self.sources {
            t += &format!(
                "source {} {:?} {:?} follow={} until_disconnect={} {:?}\n",
                s.name, s.kind, s.format, s.follow, s.until_disconnect, s.time_unit
            );
        }
        let show = |e: &Option<Expr>| e.as_ref().map(|f| f.to_string()).unwrap_or_default();
        for tr in &self.traits {
            t += &format!(
                "trait {} {:?} filter={} {:?} of={:?} part={} window={:?}",
                tr.name,
                tr.stream,
                show(&tr.filter),
                tr.aggregate,
                tr.of,
                show(&tr.part),
                tr.window
            );
            if let Some(sq) = &tr.sequence {
                t += &format!(" followed={} within={}", sq.followed, sq.within_ms);
                for (stream, filter) in &sq.steps {
                    t += &format!(" step={stream:?}:{}", show(filter));
                }
            }
            t += "\n";
        }
        for sg in &self.segments {
            t += &format!(
                "segment {} when={} dwell={:?}\n",
                sg.name, sg.when, sg.min_dwell_ms
            );
        }
        t
    }
}

// ---------------------------------------------------------------------------
// Raw TOML shape
// ---------------------------------------------------------------------------

type Named<T> = BTreeMap<Spanned<String>, Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    engine: Option<RawEngine>,
    identity: Option<RawIdentity>,
    sources: Option<Named<RawSource>>,
    output: Option<RawOutput>,
    traits: Option<Named<RawTrait>>,
    segments: Option<Named<RawSegment>>,
    content: Option<Named<content::RawSlot>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    tick: Option<Spanned<DurationText>>,
    allowed_lateness: Option<Spanned<DurationText>>,
    idle_advance: Option<Spanned<DurationText>>,
    max_future_skew: Option<Spanned<DurationText>>,
    late_policy: Option<Spanned<String>>,
    max_line_bytes: Option<Spanned<i64>>,
    file_range_bytes: Option<Spanned<i64>>,
    idle_merge_effort: Option<Spanned<i64>>,
    default_region: Option<Spanned<String>>,
    workers: Option<Spanned<i64>>,
    time_zone: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    priority: Option<Vec<Spanned<String>>>,
    extra: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    kind: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    follow: Option<Spanned<bool>>,
    until: Option<Spanned<String>>,
    time_unit: Option<Spanned<String>>,
    write_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    segments: Option<String>,
    dead_letter: Option<String>,
    state_dir: Option<String>,
    webhook: Option<RawWebhook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    failed: Option<String>,
    secret_env: Option<String>,
    max_attempts: Option<Spanned<i64>>,
    max_batch: Option<Spanned<i64>>,
    timeout: Option<Spanned<DurationText>>,
    backoff: Option<Spanned<DurationText>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrait {
    stream: Option<Spanned<String>>,
    filter: Option<Spanned<String>>,
    aggregate: Option<Spanned<String>>,
    of: Option<Spanned<String>>,
    part: Option<Spanned<String>>,
    window: Option<Spanned<DurationText>>,
    tumbling: Option<Spanned<DurationText>>,
    session_gap: Option<Spanned<DurationText>>,
    session_max: Option<Spanned<DurationText>>,
    followed_by: Option<Spanned<Vec<RawStep>>>,
    not_followed_by: Option<Spanned<Vec<RawStep>>>,
    within: Option<Spanned<DurationText>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    stream: Option<Spanned<String>>,
    filter: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    when: Option<Spanned<String>>,
    description: Option<String>,
    min_dwell: Option<Spanned<DurationText>>,
}

// ---------------------------------------------------------------------------
// Positions
// ---------------------------------------------------------------------------

struct Cx<'a> {
    text: &'a str,
    file: &'a str,
}

impl Cx<'_> {
    /// An error at byte `offset` of the file.
    fn err(&self, offset: usize, message: impl Into<String>) -> SpecError {
        let (line, column) = line_col(self.text, offset);
        SpecError {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    /// File offset of byte `inner` of the decoded string whose TOML value
    /// starts at `value_start`.
    fn string_offset(&self, value_start: usize, inner: usize) -> usize {
        string_inner_offset(self.text, value_start, inner)
    }
}

/// 1-based line and character column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |p| p + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

/// Maps a byte offset in the decoded value of a TOML string (whose raw
/// token starts at `start`) to a byte offset in the file. Escapes of
/// single-line basic strings are accounted for; multi-line strings are
/// mapped from their content start.
fn string_inner_offset(text: &str, start: usize, inner: usize) -> usize {
    let raw = text.get(start..).unwrap_or("");
    let multiline = raw.starts_with("\'\'\'") || raw.starts_with("\"\"\"");
    // Basic strings decode escapes; literal strings ('...') do not.
    let basic = raw.starts_with('"');
    let mut pos = if multiline { start + 3 } else { start + 1 };
    if multiline {
        // A newline right after the opening delimiter is trimmed.
        let rest = text.get(pos..).unwrap_or("");
        if rest.starts_with("\r\n") {
            pos += 2;
        } else if rest.starts_with('\n') {
            pos += 1;
        }
    }
    // Walk the string, decoding escapes, until `inner` decoded bytes.
    let bytes = text.as_bytes();
    let mut decoded = 0;
    // A line-ending backslash, the newline and the whitespace that
    // follows decode to nothing: the length of one at `pos`, if any.
    let continuation = |pos: usize| -> Option<usize> {
        if !(basic && multiline && bytes.get(pos) == Some(&b'\\')) {
            return None;
        }
        let after = &text[pos + 1..];
        let blank = after.len() - after.trim_start_matches([' ', '\t']).len();
        let rest = &after[blank..];
        (rest.starts_with('\n') || rest.starts_with("\r\n")).then(|| {
            let tail = rest.trim_start_matches([' ', '\t', '\r', '\n']);
            1 + blank + (rest.len() - tail.len())
        })
    };
    loop {
        if let Some(skip) = continuation(pos) {
            pos += skip;
            continue;
        }
        if decoded >= inner || pos >= bytes.len() {
            break;
        }
        if basic && bytes[pos] == b'\\' && pos + 1 < bytes.len() {
            let hex = |n: usize| -> (usize, usize) {
                let digits = text.get(pos + 2..pos + 2 + n).unwrap_or("");
                let len = u32::from_str_radix(digits, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .map_or(1, char::len_utf8);
                (2 + n, len)
            };
            let (raw_len, dec_len) = match bytes[pos + 1] {
                b'u' => hex(4),
                b'U' => hex(8),
                b'x' => hex(2),
                _ => (2, 1),
            };
            pos += raw_len;
            decoded += dec_len;
        } else {
            let c_len = text[pos..].chars().next().map_or(1, char::len_utf8);
            pos += c_len;
            decoded += c_len;
        }
    }
    pos
}

// ---------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------

/// Parses a duration such as `"500ms"`, `"1s"`, `"30m"`, `"2h"` or `"7d"`
/// into milliseconds. The unit is required.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid duration `{s}`: expected a whole number followed by a unit \
             (ms, s, m, h or d), e.g. \"30m\""
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let factor: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration `{s}`: number too large"))?;
    n.checked_mul(factor)
        .ok_or_else(|| format!("invalid duration `{s}`: number too large"))
}

/// Reads and parses a definition file.
pub fn load_spec(path: &Path) -> Result<Spec, SpecError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SpecError {
        file: file.clone(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse_spec(&text, &file)
}

/// Parses and validates a definition file's text; `file` is used in errors.
pub fn parse_spec(text: &str, file: &str) -> Result<Spec, SpecError> {
    let cx = Cx { text, file };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        cx.err(offset, e.message().trim().to_string())
    })?;

    let engine = engine(&cx, raw.engine)?;
    let identity = identity(&cx, raw.identity)?;
    let sources = sources(&cx, raw.sources)?;
    let output = match raw.output {
        None => OutputSpec::default(),
        Some(o) => OutputSpec {
            segments: o.segments,
            dead_letter: o.dead_letter,
            state_dir: o.state_dir,
            webhook: webhook(&cx, o.webhook)?,
        },
    };
    let traits = traits(&cx, raw.traits, &identity)?;
    let segments = segments(&cx, raw.segments, &traits)?;
    let content = content::slots(&cx, raw.content, &traits, &segments)?;

    Ok(Spec {
        file: file.to_string(),
        engine,
        identity,
        sources,
        output,
        traits,
        segments,
        content,
    })
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

fn is_name(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && cs.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Entries of a named table in file order.
fn in_file_order<T>(m: Option<Named<T>>) -> Vec<(Spanned<String>, Spanned<T>)> {
    let mut v: Vec<_> = m.map(|m| m.into_iter().collect()).unwrap_or_default();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

/// A duration as written in the file (`"500ms"`, `"30m"`); anything but a
/// string is an error that shows the expected form.
struct DurationText(String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration string with a unit, such as \"500ms\", \"60s\" or \"30m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

fn duration(cx: &Cx<'_>, v: &Spanned<DurationText>) -> Result<u64, SpecError> {
    parse_duration_ms(&v.get_ref().0).map_err(|m| cx.err(v.span().start, m))
}

fn webhook(cx: &Cx<'_>, raw: Option<RawWebhook>) -> Result<WebhookSpec, SpecError> {
    let mut w = WebhookSpec::default();
    let Some(raw) = raw else { return Ok(w) };
    if let Some(f) = raw.failed {
        w.failed = f;
    }
    if let Some(s) = raw.secret_env {
        w.secret_env = s;
    }
    let positive = |v: &Spanned<i64>, what: &str, max: i64| {
        let n = *v.get_ref();
        if (1..=max).contains(&n) {
            Ok(n)
        } else {
            Err(cx.err(
                v.span().start,
                format!("`{what}` must be from 1 to {max}, found {n}"),
            ))
        }
    };
    if let Some(v) = &raw.max_attempts {
        w.max_attempts = positive(v, "max_attempts", 1000)? as u32;
    }
    if let Some(v) = &raw.max_batch {
        w.max_batch = positive(v, "max_batch", 100_000)? as usize;
    }
    if let Some(v) = &raw.timeout {
        w.timeout_ms = duration(cx, v)?;
        if w.timeout_ms == 0 {
            return Err(cx.err(v.span().start, "`timeout` must be greater than 0"));
        }
    }
    if let Some(v) = &raw.backoff {
        w.backoff_ms = duration(cx, v)?;
    }
    Ok(w)
}

fn engine(cx: &Cx<'_>, raw: Option<RawEngine>) -> Result<EngineSpec, SpecError> {
    let mut e = EngineSpec::default();
    let Some(raw) = raw else { return Ok(e) };
    if let Some(v) = &raw.tick {
        e.tick_ms = duration(cx, v)?;
        if e.tick_ms == 0 {
            return Err(cx.err(v.span().start, "`tick` must be greater than 0"));
        }
    }
    if let Some(v) = &raw.allowed_lateness {
        e.allowed_lateness_ms = duration(cx, v)?;
    }
    if let Some(v) = &raw.idle_advance {
        e.idle_advance_ms = duration(cx, v)?;
    }
    if let Some(v) = &raw.max_future_skew {
        e.max_future_skew_ms = Some(if v.get_ref().0 == "off" {
            u64::MAX
        } else {
            duration(cx, v).map_err(|mut e| {
                e.message.push_str(r#"; or "off" for no limit"#);
                e
            })?
        });
    }
    if let Some(v) = &raw.late_policy {
        e.late_policy = match v.get_ref().as_str() {
            "dead-letter" => LatePolicy::DeadLetter,
            "clamp" => LatePolicy::Clamp,
            other => {
                return Err(cx.err(
                    v.span().start,
                    format!("unknown late_policy `{other}`; expected \"dead-letter\" or \"clamp\""),
                ))
            }
        };
    }
    if let Some(v) = &raw.max_line_bytes {
        let n = *v.get_ref();
        if n <= 0 {
            return Err(cx.err(v.span().start, "`max_line_bytes` must be greater than 0"));
        }
        e.max_line_bytes = usize::try_from(n)
            .map_err(|_| cx.err(v.span().start, "`max_line_bytes` is too large"))?;
    }
    if let Some(v) = &raw.file_range_bytes {
        let n = *v.get_ref();
        if n < MIN_FILE_RANGE_BYTES as i64 {
            return Err(cx.err(
                v.span().start,
                format!("`file_range_bytes` must be at least {MIN_FILE_RANGE_BYTES}"),
            ));
        }
        e.file_range_bytes = n as u64;
    }
    if let Some(v) = &raw.idle_merge_effort {
        let n = *v.get_ref();
        e.idle_merge_effort = match u64::try_from(n) {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(_) => {
                return Err(cx.err(
                    v.span().start,
                    "`idle_merge_effort` must be 0 (off) or a positive number of records",
                ))
            }
        };
    }
    if let Some(v) = &raw.default_region {
        let r = v.get_ref();
        if r.len() != 2 || !r.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(cx.err(
                v.span().start,
                format!("`default_region` must be two uppercase ASCII letters (e.g. \"US\"), found `{r}`"),
            ));
        }
        e.default_region = r.clone();
    }
    if let Some(v) = &raw.workers {
        let n = *v.get_ref();
        if n < 1 {
            return Err(cx.err(v.span().start, "`workers` must be at least 1"));
        }
        e.workers =
            Some(usize::try_from(n).map_err(|_| cx.err(v.span().start, "`workers` is too large"))?);
    }
    if let Some(v) = &raw.time_zone {
        e.time_zone = v.get_ref().parse().map_err(|_| {
            let names: Vec<&str> = chrono_tz::TZ_VARIANTS.iter().map(|t| t.name()).collect();
            let near = nearest(v.get_ref(), names.iter().copied());
            cx.err(
                v.span().start,
                format!(
                    "unknown time zone `{}`: expected an IANA name such as \"UTC\" or \"Europe/Paris\"{}",
                    v.get_ref(),
                    near.map(|n| format!(" (did you mean \"{n}\"?)")).unwrap_or_default()
                ),
            )
        })?;
    }
    Ok(e)
}

fn identity(cx: &Cx<'_>, raw: Option<RawIdentity>) -> Result<IdentitySpec, SpecError> {
    let mut id = IdentitySpec::default();
    let Some(raw) = raw else { return Ok(id) };
    let check = |list: &[Spanned<String>], key: &str| -> Result<Vec<String>, SpecError> {
        let mut out: Vec<String> = Vec::new();
        for n in list {
            let s = n.get_ref();
            if !is_name(s) {
                return Err(cx.err(
                    n.span().start,
                    format!("invalid identifier name `{s}` in `{key}`: names must match [a-z_][a-z0-9_]*"),
                ));
            }
            if out.contains(s) {
                return Err(cx.err(
                    n.span().start,
                    format!("duplicate identifier `{s}` in `{key}`"),
                ));
            }
            out.push(s.clone());
        }
        Ok(out)
    };
    if let Some(p) = &raw.priority {
        id.priority = check(p, "priority")?;
    }
    if let Some(x) = &raw.extra {
        id.extra = check(x, "extra")?;
    }
    for x in &id.extra {
        if !id.priority.contains(x) {
            id.priority.push(x.clone());
        }
    }
    Ok(id)
}

fn sources(cx: &Cx<'_>, raw: Option<Named<RawSource>>) -> Result<Vec<SourceSpec>, SpecError> {
    let mut out = Vec::new();
    for (key, table) in in_file_order(raw) {
        let name = key.get_ref().clone();
        let kstart = key.span().start;
        let r = table.into_inner();
        let kind = match &r.kind {
            Some(k) => StreamKind::from_name(k.get_ref()).ok_or_else(|| {
                cx.err(
                    k.span().start,
                    format!(
                        "unknown source kind `{}`; expected \"web\", \"crm\" or \"transactions\"",
                        k.get_ref()
                    ),
                )
            })?,
            None => StreamKind::from_name(&name).ok_or_else(|| {
                cx.err(
                    kstart,
                    format!(
                        "source `{name}` needs `kind = \"web\"`, `\"crm\"` or `\"transactions\"`"
                    ),
                )
            })?,
        };
        let format = match &r.format {
            None => Format::Jsonl,
            Some(f) => Format::for_source(f.get_ref(), kind, &name)
                .map_err(|m| cx.err(f.span().start, m))?,
        };
        let location = r.path.as_ref().map(|p| p.get_ref().clone());
        if let Some(p) = &r.path {
            if let Some(problem) = p
                .get_ref()
                .strip_prefix("kafka://")
                .and_then(|rest| location::KafkaInput::parse(rest).problem)
            {
                return Err(cx.err(
                    p.span().start,
                    format!("source `{name}` reads a Kafka topic, and its path is not one segflow can read: {problem}"),
                ));
            }
            if p.get_ref().starts_with("kafka://") && format == Format::Csv {
                return Err(cx.err(
                    p.span().start,
                    format!(
                        "source `{name}` is CSV, and reads a Kafka topic: a record of a topic is not a CSV row with a header; send JSON lines (format = \"jsonl\") to the topic"
                    ),
                ));
            }
            if p.get_ref().starts_with("http://") && format != Format::Segment {
                return Err(cx.err(
                    p.span().start,
                    format!(
                        "source `{name}` reads an HTTP endpoint, which takes Segment messages: set `format = \"segment\"` (and `kind = \"web\"`)"
                    ),
                ));
            }
        }
        // Whether `follow` and `until` fit the input is checked when the
        // input is known (`--input` may replace `path`).
        let follow = r.follow.as_ref().is_some_and(|f| *f.get_ref());
        let until_disconnect = match &r.until {
            None => false,
            Some(u) => {
                if u.get_ref() != "disconnect" {
                    return Err(cx.err(
                        u.span().start,
                        format!(
                            "unknown `until` value `{}`; expected \"disconnect\" (tcp sources; a Kafka source ends with `?until=end` in its path)",
                            u.get_ref()
                        ),
                    ));
                }
                if follow {
                    return Err(cx.err(
                        u.span().start,
                        "`until` (tcp sources) cannot be combined with `follow` (file sources)",
                    ));
                }
                true
            }
        };
        let time_unit = match &r.time_unit {
            None => TimeUnit::Auto,
            Some(u) => TimeUnit::from_name(u.get_ref()).ok_or_else(|| {
                cx.err(
                    u.span().start,
                    format!(
                        "unknown time_unit `{}`; expected \"auto\", \"s\", \"ms\", \"us\" or \"ns\"",
                        u.get_ref()
                    ),
                )
            })?,
        };
        let write_key = match &r.write_key {
            None => None,
            Some(k) if k.get_ref().trim().is_empty() => return Err(cx.err(
                k.span().start,
                "`write_key` is empty: give the key clients send, or leave it out to accept any",
            )),
            Some(k) => Some(k.get_ref().clone()),
        };
        out.push(SourceSpec {
            name,
            kind,
            location,
            format,
            follow,
            until_disconnect,
            time_unit,
            write_key,
        });
    }
    Ok(out)
}

const WEB_FIELDS: [&str; 10] = [
    "event",
    "hour",
    "weekday",
    "item",
    "context",
    "properties",
    "anonymous_id",
    "user_id",
    "email",
    "phone",
];
const TX_FIELDS: [&str; 10] = [
    "amount",
    "hour",
    "weekday",
    "currency",
    "order_id",
    "item_count",
    "crm_id",
    "user_id",
    "email",
    "properties",
];

/// Checks a field path of a `stream` event; returns the error message.
fn check_field(stream: StreamKind, path: &[String], identity: &IdentitySpec) -> Result<(), String> {
    let first = path[0].as_str();
    let joined = path.join(".");
    let (fixed, nested): (&[&str], &[&str]) = match stream {
        StreamKind::Web => (&WEB_FIELDS, &["item", "context", "properties"]),
        _ => (&TX_FIELDS, &["properties"]),
    };
    let extra = stream == StreamKind::Web
        && identity.priority.iter().any(|p| p == first)
        && !DEFAULT_PRIORITY.contains(&first);
    if !fixed.contains(&first) && !extra {
        let mut allowed: Vec<String> = fixed
            .iter()
            .map(|f| {
                if nested.contains(f) {
                    format!("{f}.<field>")
                } else {
                    f.to_string()
                }
            })
            .collect();
        if stream == StreamKind::Web {
            allowed.extend(
                identity
                    .priority
                    .iter()
                    .filter(|p| !DEFAULT_PRIORITY.contains(&p.as_str()))
                    .cloned(),
            );
        }
        let hint = did_you_mean(
            first,
            allowed.iter().map(|a| a.trim_end_matches(".<field>")),
        );
        return Err(format!(
            "unknown {} field `{joined}`{hint}; expected one of: {}",
            stream.as_str(),
            allowed.join(", ")
        ));
    }
    if nested.contains(&first) {
        if path.len() != 2 {
            return Err(format!(
                "`{first}` needs a field, e.g. {first}.name (found `{joined}`)"
            ));
        }
    } else if path.len() != 1 {
        return Err(format!("`{first}` has no fields (found `{joined}`)"));
    }
    Ok(())
}

fn parse_in_file(cx: &Cx<'_>, v: &Spanned<String>) -> Result<Expr, SpecError> {
    parse_expr(v.get_ref()).map_err(|e| {
        cx.err(
            cx.string_offset(v.span().start, e.offset),
            format!("invalid expression: {}", e.message),
        )
    })
}

/// The known name nearest to `name` (by edit distance with transpositions,
/// at most a third of its length, at least 1), for "did you mean" hints.
pub fn nearest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    known
        .into_iter()
        .map(|k| {
            (
                strsim::levenshtein(&name.to_lowercase(), &k.to_lowercase()),
                k,
            )
        })
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, k)| k)
}

/// " (did you mean `x`?)" or nothing.
pub fn did_you_mean<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    nearest(name, known)
        .map(|n| format!(" (did you mean `{n}`?)"))
        .unwrap_or_default()
}

/// A stream name of a trait or a sequence step.
fn trait_stream(cx: &Cx<'_>, s: &Spanned<String>) -> Result<StreamKind, SpecError> {
    match StreamKind::from_name(s.get_ref()) {
        Some(StreamKind::Crm) => Err(cx.err(
            s.span().start,
            "traits are computed over web or transactions",
        )),
        Some(k) => Ok(k),
        None => Err(cx.err(
            s.span().start,
            format!(
                "unknown stream `{}`; expected \"web\" or \"transactions\"",
                s.get_ref()
            ),
        )),
    }
}

/// A filter (or `part`) over the events of `stream`, every path checked.
fn event_condition(
    cx: &Cx<'_>,
    f: &Spanned<String>,
    stream: StreamKind,
    identity: &IdentitySpec,
) -> Result<Expr, SpecError> {
    let e = parse_in_file(cx, f)?;
    for (p, span) in e.paths() {
        check_field(stream, p, identity)
            .map_err(|m| cx.err(cx.string_offset(f.span().start, span.start), m))?;
    }
    Ok(e)
}

/// A positive duration.
fn positive(cx: &Cx<'_>, v: &Spanned<DurationText>, key: &str) -> Result<u64, SpecError> {
    let ms = duration(cx, v)?;
    if ms == 0 {
        return Err(cx.err(v.span().start, format!("`{key}` must be greater than 0")));
    }
    Ok(ms)
}

fn traits(
    cx: &Cx<'_>,
    raw: Option<Named<RawTrait>>,
    identity: &IdentitySpec,
) -> Result<Vec<TraitSpec>, SpecError> {
    const DAY: u64 = 86_400_000;
    let mut out = Vec::new();
    for (key, table) in in_file_order(raw) {
        let name = key.get_ref().clone();
        let kstart = key.span().start;
        if !is_name(&name) {
            return Err(cx.err(
                kstart,
                format!("invalid trait name `{name}`: names must match [a-z_][a-z0-9_]*"),
            ));
        }
        let r = table.into_inner();
        let stream = match &r.stream {
            None => {
                return Err(cx.err(
                    kstart,
                    format!(
                        "trait `{name}` needs `stream = \"web\"` or `stream = \"transactions\"`"
                    ),
                ))
            }
            Some(s) => trait_stream(cx, s)?,
        };
        let filter = match &r.filter {
            None => None,
            Some(f) => Some(event_condition(cx, f, stream, identity)?),
        };
        let aggregate = match &r.aggregate {
            None => Aggregate::Count,
            Some(a) => match Aggregate::NAMES.iter().find(|(n, _)| n == a.get_ref()) {
                Some((_, agg)) => *agg,
                None => {
                    let names: Vec<&str> = Aggregate::NAMES.iter().map(|(n, _)| *n).collect();
                    return Err(cx.err(
                        a.span().start,
                        format!(
                            "unknown aggregate `{}`{}; expected one of: {}",
                            a.get_ref(),
                            did_you_mean(a.get_ref(), names.iter().copied()),
                            names.join(", ")
                        ),
                    ));
                }
            },
        };
        let agg_at = r.aggregate.as_ref().map_or(kstart, |a| a.span().start);
        let of = match (&r.of, aggregate.needs_of()) {
            (None, Some(true)) => {
                return Err(cx.err(
                    agg_at,
                    format!(
                        "trait `{name}` uses aggregate = \"{}\" and needs `of = \"<field>\"`",
                        aggregate.name()
                    ),
                ))
            }
            (Some(o), Some(false)) => {
                return Err(cx.err(
                    o.span().start,
                    format!(
                    "`of` is not used by aggregate = \"{}\" (it counts events or measures time)",
                    aggregate.name()
                ),
                ))
            }
            (None, _) => None,
            (Some(o), _) => {
                let parts: Vec<String> = o.get_ref().split('.').map(str::to_string).collect();
                let ok = parts.iter().all(|p| {
                    p.chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
                if !ok {
                    return Err(cx.err(
                        o.span().start,
                        format!(
                            "invalid field path `{}` in `of`: expected e.g. \"amount\" or \"item.price\"",
                            o.get_ref()
                        ),
                    ));
                }
                let parts = expr::fold_path(parts);
                check_field(stream, &parts, identity).map_err(|m| cx.err(o.span().start, m))?;
                Some(parts)
            }
        };
        let part = match (&r.part, aggregate) {
            (Some(p), Aggregate::Share) => Some(event_condition(cx, p, stream, identity)?),
            (None, Aggregate::Share) => {
                return Err(cx.err(
                    agg_at,
                    format!("trait `{name}` uses aggregate = \"share\" and needs `part = '<condition>'`, e.g. part = 'item.category == \"outdoor\"'"),
                ))
            }
            (Some(p), _) => {
                return Err(cx.err(
                    p.span().start,
                    "`part` is only allowed with aggregate = \"share\"",
                ))
            }
            (None, _) => None,
        };
        let windows = [
            r.window.as_ref().map(|w| ("window", w)),
            r.tumbling.as_ref().map(|w| ("tumbling", w)),
            r.session_gap.as_ref().map(|w| ("session_gap", w)),
        ];
        let given: Vec<(&str, &Spanned<DurationText>)> = windows.into_iter().flatten().collect();
        if given.len() > 1 {
            return Err(cx.err(
                given[1].1.span().start,
                format!(
                    "trait `{name}` sets both `{}` and `{}`; a trait has one window: `window` (sliding), `tumbling` or `session_gap`",
                    given[0].0, given[1].0
                ),
            ));
        }
        let window = match given.first() {
            None => Window::Lifetime,
            Some(("window", w)) => Window::Sliding(positive(cx, w, "window")?),
            Some(("tumbling", w)) => {
                let len = positive(cx, w, "tumbling")?;
                if DAY % len != 0 && len != 7 * DAY {
                    return Err(cx.err(
                        w.span().start,
                        "a tumbling window is calendar-aligned: its length must divide a day (e.g. \"15m\", \"1h\", \"1d\") or be \"7d\" (weeks from Monday)",
                    ));
                }
                Window::Tumbling(len)
            }
            Some((_, w)) => {
                let gap = positive(cx, w, "session_gap")?;
                let max = match &r.session_max {
                    Some(m) => positive(cx, m, "session_max")?,
                    None => DAY,
                };
                if max < gap {
                    return Err(cx.err(
                        r.session_max
                            .as_ref()
                            .map_or(w.span().start, |m| m.span().start),
                        "`session_max` must be at least `session_gap`",
                    ));
                }
                Window::Session { gap, max }
            }
        };
        if let (Some(m), false) = (&r.session_max, matches!(window, Window::Session { .. })) {
            return Err(cx.err(
                m.span().start,
                "`session_max` is only allowed with `session_gap`",
            ));
        }
        if matches!(aggregate, Aggregate::SinceFirst | Aggregate::SinceLast)
            && window != Window::Lifetime
        {
            return Err(cx.err(
                given[0].1.span().start,
                format!(
                    "aggregate = \"{}\" measures time over the whole history and takes no window",
                    aggregate.name()
                ),
            ));
        }
        if aggregate == Aggregate::Share && matches!(window, Window::Session { .. }) {
            return Err(cx.err(
                given[0].1.span().start,
                "aggregate = \"share\" takes a sliding or tumbling window, not a session",
            ));
        }
        let sequence = match (&r.followed_by, &r.not_followed_by) {
            (Some(a), Some(b)) => {
                return Err(cx.err(
                    a.span().start.max(b.span().start),
                    "a trait has either `followed_by` or `not_followed_by`, not both",
                ))
            }
            (None, None) => {
                if let Some(w) = &r.within {
                    return Err(cx.err(
                        w.span().start,
                        "`within` is only allowed with `followed_by` or `not_followed_by`",
                    ));
                }
                None
            }
            (Some(s), None) | (None, Some(s)) => {
                let followed = r.followed_by.is_some();
                let key_name = if followed {
                    "followed_by"
                } else {
                    "not_followed_by"
                };
                if aggregate != Aggregate::Count {
                    return Err(cx.err(
                        s.span().start,
                        format!("`{key_name}` counts events: it needs aggregate = \"count\""),
                    ));
                }
                if !matches!(window, Window::Sliding(_)) {
                    return Err(cx.err(
                        s.span().start,
                        format!("`{key_name}` needs a sliding `window`: how far back the first events are counted"),
                    ));
                }
                let Some(within) = &r.within else {
                    return Err(cx.err(
                        s.span().start,
                        format!("`{key_name}` needs `within = \"<duration>\"`: how long after an event the next one may come"),
                    ));
                };
                let within_ms = positive(cx, within, "within")?;
                if let (false, Window::Sliding(w)) = (followed, window) {
                    if within_ms >= w {
                        return Err(cx.err(
                            within.span().start,
                            format!("`within` must be shorter than `window` for `not_followed_by`: an event counts from `within` after it until `window` after it, so with within = {} and window = {} it never counts", within.get_ref().0, r.window.as_ref().map(|w| w.get_ref().0.clone()).unwrap_or_default()),
                        ));
                    }
                }
                if s.get_ref().is_empty() {
                    return Err(cx.err(
                        s.span().start,
                        format!("`{key_name}` needs at least one step, e.g. [{{ stream = \"transactions\" }}]"),
                    ));
                }
                let mut steps = Vec::new();
                for step in s.get_ref() {
                    let Some(st) = &step.stream else {
                        return Err(cx.err(
                            s.span().start,
                            format!("each step of `{key_name}` needs `stream = \"web\"` or `stream = \"transactions\"`"),
                        ));
                    };
                    let stream = trait_stream(cx, st)?;
                    let filter = match &step.filter {
                        None => None,
                        Some(f) => Some(event_condition(cx, f, stream, identity)?),
                    };
                    steps.push((stream, filter));
                }
                Some(Sequence {
                    followed,
                    steps,
                    within_ms,
                })
            }
        };
        out.push(TraitSpec {
            name,
            stream,
            filter,
            aggregate,
            of,
            part,
            window,
            sequence,
        });
    }
    Ok(out)
}

fn segments(
    cx: &Cx<'_>,
    raw: Option<Named<RawSegment>>,
    traits: &[TraitSpec],
) -> Result<Vec<SegmentSpec>, SpecError> {
    let entries = in_file_order(raw);
    if entries.is_empty() {
        return Err(cx.err(
            0,
            "no segments defined: add a [segments.NAME] table with `when = ...`",
        ));
    }
    let segment_names: Vec<String> = entries.iter().map(|(k, _)| k.get_ref().clone()).collect();
    let mut out = Vec::new();
    // For each segment, the segments its condition reads, with where
    // (the TOML string's start and the path's offset inside it).
    let mut reads: Vec<Vec<(usize, usize, usize)>> = Vec::new();
    for (key, table) in entries {
        let name = key.get_ref().clone();
        let kstart = key.span().start;
        if !is_name(&name) {
            return Err(cx.err(
                kstart,
                format!("invalid segment name `{name}`: names must match [a-z_][a-z0-9_]*"),
            ));
        }
        if traits.iter().any(|t| t.name == name) {
            return Err(cx.err(
                kstart,
                format!("segment `{name}` has the same name as a trait"),
            ));
        }
        let r = table.into_inner();
        let Some(w) = &r.when else {
            return Err(cx.err(
                kstart,
                format!("segment `{name}` needs `when = \"<condition>\"`"),
            ));
        };
        let when = parse_in_file(cx, w)?;
        let read = condition_reads(cx, w, &when, traits, &segment_names)?;
        check_recency_use(cx, w, &when, traits)?;
        let min_dwell_ms = match &r.min_dwell {
            None => None,
            Some(d) => Some(positive(cx, d, "min_dwell")?),
        };
        reads.push(read);
        out.push(SegmentSpec {
            name,
            when,
            description: r.description,
            min_dwell_ms,
        });
    }
    // Segments of segments must not read themselves, directly or not.
    fn visit(
        s: usize,
        reads: &[Vec<(usize, usize, usize)>],
        state: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<(Vec<usize>, (usize, usize))> {
        state[s] = 1;
        path.push(s);
        for &(t, start, inner) in &reads[s] {
            if state[t] == 1 {
                let from = path.iter().position(|&x| x == t).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(t);
                return Some((cycle, (start, inner)));
            }
            if state[t] == 0 {
                if let Some(c) = visit(t, reads, state, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        state[s] = 2;
        None
    }
    let mut state = vec![0u8; out.len()];
    for s in 0..out.len() {
        if state[s] == 0 {
            if let Some((cycle, (start, inner))) = visit(s, &reads, &mut state, &mut Vec::new()) {
                let names: Vec<&str> = cycle.iter().map(|&i| out[i].name.as_str()).collect();
                return Err(cx.err(
                    cx.string_offset(start, inner),
                    format!(
                        "segments read each other in a cycle: {}",
                        names.join(" -> ")
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Checks that every path of `when` (the condition in the file's string
/// `w`) names a trait (or a most frequent value's `.count`), one of
/// `segment_names` or `attributes.FIELD`, with a "did you mean" hint
/// otherwise; returns the segments it reads, each as (segment index, the
/// string's start, the path's offset inside it).
fn condition_reads(
    cx: &Cx<'_>,
    w: &Spanned<String>,
    when: &Expr,
    traits: &[TraitSpec],
    segment_names: &[String],
) -> Result<Vec<(usize, usize, usize)>, SpecError> {
    let declared = if traits.is_empty() {
        "(none)".to_string()
    } else {
        traits
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut read = Vec::new();
    for (p, span) in when.paths() {
        // Where the path is in the file, worked out only for an error
        // (it walks the string from its start).
        let at = || cx.string_offset(w.span().start, span.start);
        let t = traits.iter().find(|t| t.name == p[0]);
        if p[0] == "attributes" {
            if p.len() != 2 {
                return Err(cx.err(at(), "`attributes` needs one field, e.g. attributes.tier"));
            }
        } else if let Some(s) = segment_names.iter().position(|s| *s == p[0]) {
            if p.len() != 1 {
                return Err(cx.err(
                    at(),
                    format!("`{}` is a segment (true or false) and has no fields", p[0]),
                ));
            }
            read.push((s, w.span().start, span.start));
        } else if let Some(t) = t {
            let ok = match p.len() {
                1 => true,
                2 => t.aggregate == Aggregate::MostFrequent && p[1] == "count",
                _ => false,
            };
            if !ok {
                return Err(cx.err(
                    at(),
                    format!(
                        "`{}`: a trait has no fields{}",
                        p.join("."),
                        if t.aggregate == Aggregate::MostFrequent {
                            format!(" but `{}.count` (how often its value occurs)", t.name)
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
        } else {
            let known = traits
                .iter()
                .map(|t| t.name.as_str())
                .chain(segment_names.iter().map(String::as_str))
                .chain(["attributes"]);
            let segments_declared = segment_names.join(", ");
            return Err(cx.err(
                at(),
                format!(
                    "unknown trait or segment `{}`{}; declared traits: {declared}; segments: {segments_declared}",
                    p.join("."),
                    did_you_mean(&p[0], known)
                ),
            ));
        }
    }
    Ok(read)
}

/// A recency trait (`since_first`, `since_last`) changes with time alone,
/// so the engine must know when a condition on it can change: it may only
/// be compared, directly, with a constant (`since_last_order >= 60d`).
fn check_recency_use(
    cx: &Cx<'_>,
    w: &Spanned<String>,
    when: &Expr,
    traits: &[TraitSpec],
) -> Result<(), SpecError> {
    let is_recency = |e: &Expr| match e {
        Expr::Path(p, _) => traits.iter().any(|t| {
            t.name == p[0] && matches!(t.aggregate, Aggregate::SinceFirst | Aggregate::SinceLast)
        }),
        _ => false,
    };
    fn walk(
        e: &Expr,
        allowed: bool,
        is_recency: &dyn Fn(&Expr) -> bool,
    ) -> Option<crate::spec::expr::Span> {
        match e {
            Expr::Path(_, span) if !allowed && is_recency(e) => Some(*span),
            Expr::Path(..) | Expr::Lit(_) => None,
            Expr::Cmp(_, a, b) => {
                let direct = |x: &Expr, other: &Expr| is_recency(x) && other.is_constant();
                walk(a, direct(a, b), is_recency).or_else(|| walk(b, direct(b, a), is_recency))
            }
            Expr::Not(a) | Expr::Neg(a) | Expr::Call(_, a) | Expr::In(a, _) => {
                walk(a, false, is_recency)
            }
            Expr::And(es) | Expr::Or(es) => es.iter().find_map(|e| walk(e, false, is_recency)),
            Expr::Arith(_, a, b) => {
                walk(a, false, is_recency).or_else(|| walk(b, false, is_recency))
            }
        }
    }
    match walk(when, false, &is_recency) {
        None => Ok(()),
        Some(span) => Err(cx.err(
            cx.string_offset(w.span().start, span.start),
            "a recency trait (since_first, since_last) changes with time alone: compare it directly with a constant, e.g. `since_last_order >= 60d`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"# segflow definition
[engine]
tick = "500ms"
allowed_lateness = "5m"
idle_advance = "2s"
max_future_skew = "10m"
late_policy = "clamp"
max_line_bytes = 4096
idle_merge_effort = 500
default_region = "GB"
workers = 2

[identity]
priority = ["user_id", "crm_id", "email"]
extra = ["device_id", "email"]

[sources.web]
path = "data/web.jsonl"
follow = true
time_unit = "us"

[sources.crm_file]
kind = "crm"
path = "data/crm.csv"
format = "csv"

[sources.transactions]
path = "tcp://127.0.0.1:7001"
until = "disconnect"

[output]
segments = "-"
dead_letter = "out/dead.jsonl"
state_dir = "out/state"

[traits.premium_views_30m]
stream = "web"
filter = 'event == "view_item" and item.price >= 100 and device_id != null'
window = "30m"

[traits.spend]
stream = "transactions"
aggregate = "sum"
of = "amount"

[traits.a_views]
stream = "web"

[segments.high_intent]
when = "premium_views_30m >= 3 and attributes.tier == 'gold'"
description = "Engaged shoppers"

[segments.big_spender]
when = "spend > 1000 or a_views in [1, 2]"
"#;

    fn ok(text: &str) -> Spec {
        parse_spec(text, "flow.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> SpecError {
        match parse_spec(text, "flow.toml") {
            Ok(s) => panic!("parsed: {s:?}"),
            Err(e) => e,
        }
    }

    /// Asserts line, column and that the message contains `needle`.
    fn assert_err(text: &str, line: usize, column: usize, needle: &str) {
        let e = err(text);
        assert_eq!((e.line, e.column), (line, column), "{e}");
        assert!(
            e.message.contains(needle),
            "`{}` does not contain `{needle}`",
            e.message
        );
    }

    const SEG: &str = "[segments.s]\nwhen = \"attributes.x == 1\"\n";

    #[test]
    fn full_file() {
        let s = ok(FULL);
        assert_eq!(s.file, "flow.toml");
        assert_eq!(
            s.engine,
            EngineSpec {
                tick_ms: 500,
                allowed_lateness_ms: 300_000,
                idle_advance_ms: 2_000,
                max_future_skew_ms: Some(600_000),
                late_policy: LatePolicy::Clamp,
                max_line_bytes: 4096,
                file_range_bytes: DEFAULT_FILE_RANGE_BYTES,
                idle_merge_effort: Some(500),
                default_region: "GB".into(),
                workers: Some(2),
                time_zone: chrono_tz::UTC,
            }
        );
        assert_eq!(
            s.identity.priority,
            ["user_id", "crm_id", "email", "device_id"]
        );
        assert_eq!(s.identity.extra, ["device_id", "email"]);
        assert_eq!(
            s.sources,
            vec![
                SourceSpec {
                    name: "web".into(),
                    kind: StreamKind::Web,
                    location: Some("data/web.jsonl".into()),
                    format: Format::Jsonl,
                    follow: true,
                    until_disconnect: false,
                    time_unit: TimeUnit::Microseconds,
                    write_key: None,
                },
                SourceSpec {
                    name: "crm_file".into(),
                    kind: StreamKind::Crm,
                    location: Some("data/crm.csv".into()),
                    format: Format::Csv,
                    follow: false,
                    until_disconnect: false,
                    time_unit: TimeUnit::Auto,
                    write_key: None,
                },
                SourceSpec {
                    name: "transactions".into(),
                    kind: StreamKind::Transactions,
                    location: Some("tcp://127.0.0.1:7001".into()),
                    format: Format::Jsonl,
                    follow: false,
                    until_disconnect: true,
                    time_unit: TimeUnit::Auto,
                    write_key: None,
                },
            ]
        );
        assert_eq!(s.source("crm_file").map(|x| x.kind), Some(StreamKind::Crm));
        assert!(s.source("nope").is_none());
        assert_eq!(
            s.output,
            OutputSpec {
                segments: Some("-".into()),
                dead_letter: Some("out/dead.jsonl".into()),
                state_dir: Some("out/state".into()),
                webhook: WebhookSpec::default(),
            }
        );
        let names: Vec<_> = s.traits.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["premium_views_30m", "spend", "a_views"]);
        assert_eq!(s.trait_index("spend"), Some(1));
        assert_eq!(s.trait_index("a_views"), Some(2));
        assert_eq!(s.trait_index("zzz"), None);
        let t0 = &s.traits[0];
        assert_eq!(t0.stream, StreamKind::Web);
        assert_eq!(t0.aggregate, Aggregate::Count);
        assert_eq!(t0.window, Window::Sliding(1_800_000));
        assert_eq!(t0.of, None);
        let f = t0.filter.as_ref().expect("filter");
        let mut env = |p: &[String]| match p.join(".").as_str() {
            "event" => crate::model::ScalarRef::Str("view_item"),
            "item.price" => crate::model::ScalarRef::Num(150.0),
            "device_id" => crate::model::ScalarRef::Str("d1"),
            _ => crate::model::ScalarRef::Null,
        };
        assert!(f.eval_bool(&mut env));
        let t1 = &s.traits[1];
        assert_eq!(t1.stream, StreamKind::Transactions);
        assert_eq!(t1.aggregate, Aggregate::Sum);
        assert_eq!(t1.of, Some(vec!["amount".to_string()]));
        assert_eq!(t1.window, Window::Lifetime);
        assert_eq!(s.traits[2].filter, None);

        let segs: Vec<_> = s.segments.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(segs, ["high_intent", "big_spender"]);
        assert_eq!(
            s.segments[0].description.as_deref(),
            Some("Engaged shoppers")
        );
        assert_eq!(s.segments[1].description, None);
        let mut env = |p: &[String]| match p.join(".").as_str() {
            "premium_views_30m" => crate::model::ScalarRef::Num(3.0),
            "attributes.tier" => crate::model::ScalarRef::Str("gold"),
            _ => crate::model::ScalarRef::Null,
        };
        assert!(s.segments[0].when.eval_bool(&mut env));
        assert!(!s.segments[1].when.eval_bool(&mut env));
    }

    #[test]
    fn defaults() {
        let s = ok("[traits.v]\nstream = \"web\"\n[segments.s]\nwhen = \"v > 0\"\n");
        assert_eq!(s.engine, EngineSpec::default());
        assert_eq!(s.engine.tick_ms, 1000);
        assert_eq!(s.engine.allowed_lateness_ms, 0);
        assert_eq!(s.engine.idle_advance_ms, 1000);
        assert_eq!(s.engine.late_policy, LatePolicy::DeadLetter);
        assert_eq!(s.engine.max_line_bytes, 1_048_576);
        assert_eq!(s.engine.default_region, "US");
        assert_eq!(s.engine.workers, None);
        assert_eq!(
            s.identity.priority,
            ["crm_id", "user_id", "email", "phone", "anonymous_id"]
        );
        assert!(s.identity.extra.is_empty());
        assert!(s.sources.is_empty());
        assert_eq!(s.output, OutputSpec::default());
        assert_eq!(s.traits[0].aggregate, Aggregate::Count);
        assert_eq!(s.traits[0].window, Window::Lifetime);

        // Source defaults, and extra appended to the default list.
        let s = ok(&format!(
            "[identity]\nextra = [\"device_id\"]\n[sources.crm]\n[sources.web]\n{SEG}"
        ));
        assert_eq!(
            s.identity.priority.last().map(String::as_str),
            Some("device_id")
        );
        assert_eq!(s.identity.priority.len(), 6);
        assert_eq!(
            s.sources[0],
            SourceSpec {
                name: "crm".into(),
                kind: StreamKind::Crm,
                location: None,
                format: Format::Jsonl,
                follow: false,
                until_disconnect: false,
                time_unit: TimeUnit::Auto,
                write_key: None,
            }
        );
        assert_eq!(s.sources[1].name, "web");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("1s"), Ok(1_000));
        assert_eq!(parse_duration_ms("30m"), Ok(1_800_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("7d"), Ok(604_800_000));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "1 w",
            "1sec",
            "99999999999999999999d",
            "999999999999999d",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
        assert_err("[engine]\ntick = \"1x\"\n", 2, 8, "invalid duration `1x`");
        assert_err("[engine]\ntick = \"0s\"\n", 2, 8, "greater than 0");
        assert_eq!(
            ok(&format!("[engine]\nmax_future_skew = \"off\"\n{SEG}"))
                .engine
                .max_future_skew_ms,
            Some(u64::MAX)
        );
        assert_err(
            "[engine]\nmax_future_skew = 60\n",
            2,
            19,
            "invalid type: integer `60`, expected a duration string with a unit, such as \"500ms\", \"60s\" or \"30m\"",
        );
        assert_err(
            "[engine]\nmax_future_skew = \"soon\"\n",
            2,
            19,
            "invalid duration `soon`",
        );
        assert_err(
            &format!("[sources.web]\ntime_unit = \"µs\"\n{SEG}"),
            2,
            13,
            "unknown time_unit `µs`; expected \"auto\", \"s\", \"ms\", \"us\" or \"ns\"",
        );
        assert_err(
            &format!("[traits.t]\nstream = \"web\"\nwindow = \"0s\"\n{SEG}"),
            3,
            10,
            "`window` must be greater than 0",
        );
    }

    /// Positions inside multi-line strings: a line-ending backslash
    /// decodes to nothing, so the path after it is on the next line.
    #[test]
    fn positions_after_a_line_continuation() {
        let text = "[traits.views]\nstream = \"web\"\n[segments.s]\nwhen = \"\"\"views >= 1 and \\\n   bogus > 2\"\"\"\n";
        let e = err(text);
        assert_eq!((e.line, e.column), (5, 4), "{}", e.message);
        assert!(e.message.contains("`bogus`"), "{}", e.message);
        let crlf = "[traits.views]\r\nstream = \"web\"\r\n[segments.s]\r\nwhen = \'\'\'views >= 1 and\r\n bogus > 2\'\'\'\r\n";
        let e = err(crlf);
        assert_eq!((e.line, e.column), (5, 2), "{}", e.message);
    }

    #[test]
    fn unknown_trait_in_segment() {
        let text = "[traits.views]\nstream = \"web\"\n\n[traits.buys]\nstream = \"transactions\"\n[segments.hot]\nwhen = \"nope >= 3\"\n";
        let e = err(text);
        assert_eq!((e.line, e.column), (7, 9));
        assert_eq!(
            e.message,
            "unknown trait or segment `nope`; declared traits: views, buys; segments: hot"
        );
        assert_eq!(e.to_string(), format!("flow.toml:7:9: {}", e.message));

        assert_err(
            "[segments.hot]\nwhen = 'x > 1'\n",
            2,
            9,
            "unknown trait or segment `x`; declared traits: (none)",
        );
        // Position of a later path, with a multi-byte character before it.
        assert_err(
            "[traits.views]\nstream = \"web\"\n[segments.hot]\nwhen = \"views > 'é' or views.x > 1\"\n",
            4,
            24,
            "`views.x`: a trait has no fields",
        );
        // Escapes in a basic string shift the position correctly.
        assert_err(
            "[traits.views]\nstream = \"web\"\n[segments.hot]\nwhen = \"views == \\\"a\\\" or bad\"\n",
            4,
            27,
            "unknown trait or segment `bad`",
        );
        assert_err(
            "[segments.hot]\nwhen = '''\nattributes == 1'''\n",
            3,
            1,
            "`attributes` needs one field, e.g. attributes.tier",
        );
        assert_err(
            "[segments.hot]\nwhen = 'attributes'\n",
            2,
            9,
            "`attributes` needs one field",
        );
    }

    #[test]
    fn expression_syntax_error_position() {
        assert_err("[segments.hot]\nwhen = \"a = 1\"\n", 2, 11, "found `=`");
        assert_err("[segments.hot]\nwhen = \"(a > 1\"\n", 2, 15, "`)`");
        assert_err(
            "[traits.t]\nstream = \"web\"\nfilter = \"event >= \"\n",
            3,
            20,
            "invalid expression: expected an operand",
        );
    }

    #[test]
    fn trait_filter_fields() {
        let t = |filter: &str, stream: &str| {
            format!("[traits.t]\nstream = \"{stream}\"\nfilter = \"{filter}\"\n{SEG}")
        };
        ok(&t(
            "event == 'x' and item.price > 1 and context.ip != null and properties.a == 1",
            "web",
        ));
        ok(&t(
            "anonymous_id != null or user_id != null or email != null or phone != null",
            "web",
        ));
        ok(&t(
            "amount > 1 and currency == 'USD' and order_id != null and item_count > 0",
            "transactions",
        ));
        ok(&t(
            "crm_id != null and properties.x == 1 and user_id != null and email != null",
            "transactions",
        ));
        assert_err(&t("amount > 1", "web"), 3, 11, "unknown web field `amount`");
        assert_err(
            &t("event == 1 and item > 1", "web"),
            3,
            26,
            "`item` needs a field",
        );
        // `item.a.b` is the item field `a.b` (a flattened nested object).
        let spec = ok(&t("item.a.b > 1", "web"));
        assert_eq!(
            spec.traits[0].filter.as_ref().unwrap().paths()[0].0,
            ["item".to_string(), "a.b".to_string()]
        );
        assert_err(&t("event.x == 1", "web"), 3, 11, "`event` has no fields");
        assert_err(
            &t("event == 1", "transactions"),
            3,
            11,
            "unknown transactions field `event`",
        );
        assert_err(
            &t("device_id == 1", "web"),
            3,
            11,
            "unknown web field `device_id`",
        );
        ok(&format!(
            "[identity]\nextra = [\"device_id\"]\n{}",
            t("device_id == 1", "web")
        ));
        assert_err(
            &format!(
                "[identity]\nextra = [\"device_id\"]\n{}",
                t("device_id == 1", "transactions")
            ),
            5,
            11,
            "unknown transactions field",
        );
    }

    #[test]
    fn trait_errors() {
        assert_err(
            &format!("[traits.t]\nstream = \"crm\"\n{SEG}"),
            2,
            10,
            "traits are computed over web or transactions",
        );
        assert_err(
            &format!("[traits.t]\nfilter = \"event == 1\"\n{SEG}"),
            1,
            9,
            "needs `stream",
        );
        assert_err(
            &format!("[traits.t]\nstream = \"web\"\naggregate = \"sum\"\n{SEG}"),
            3,
            13,
            "needs `of",
        );
        assert_err(
            &format!("[traits.t]\nstream = \"web\"\nof = \"item.price\"\n{SEG}"),
            3,
            6,
            "`of` is not used by aggregate = \"count\"",
        );
        assert_err(
            &format!("[traits.t]\nstream = \"web\"\naggregate = \"most_frequnt\"\n{SEG}"),
            3,
            13,
            "unknown aggregate `most_frequnt` (did you mean `most_frequent`?)",
        );
        assert_err(
            &format!("[traits.t]\nstream = \"transactions\"\naggregate = \"sum\"\nof = \"amount.\"\n{SEG}"),
            4,
            6,
            "invalid field path",
        );
        let s = ok(&format!(
            "[traits.t]\nstream = \"web\"\naggregate = \"sum\"\nof = \"item.price\"\n{SEG}"
        ));
        assert_eq!(
            s.traits[0].of,
            Some(vec!["item".to_string(), "price".to_string()])
        );
        assert_err(
            &format!("[traits.Bad]\nstream = \"web\"\n{SEG}"),
            1,
            9,
            "invalid trait name `Bad`",
        );
    }

    #[test]
    fn segment_errors() {
        assert_err(
            "[traits.t]\nstream = \"web\"\n",
            1,
            1,
            "no segments defined: add a [segments.NAME] table with `when = ...`",
        );
        assert_err(
            "[traits.t]\nstream = \"web\"\n[segments.t]\nwhen = \"t > 1\"\n",
            3,
            11,
            "segment `t` has the same name as a trait",
        );
        assert_err(
            "[segments.\"a-b\"]\nwhen = \"attributes.x\"\n",
            1,
            11,
            "invalid segment name",
        );
        assert_err("[segments.s]\ndescription = \"x\"\n", 1, 11, "needs `when");
    }

    #[test]
    fn csv_only_for_crm() {
        let e = err(&format!("[sources.web]\nformat = \"csv\"\n{SEG}"));
        assert_eq!((e.line, e.column), (2, 10), "{e}");
        assert_eq!(
            e.message,
            "format \"csv\" is only supported for crm sources; source `web` is web"
        );
        ok(&format!("[sources.crm]\nformat = \"csv\"\n{SEG}"));
        assert_err(
            &format!("[sources.crm]\nformat = \"xml\"\n{SEG}"),
            2,
            10,
            "unknown format",
        );
    }

    #[test]
    fn source_errors() {
        assert_err(
            &format!("[sources.clicks]\npath = \"x\"\n{SEG}"),
            1,
            10,
            "needs `kind",
        );
        assert_err(
            &format!("[sources.x]\nkind = \"logs\"\n{SEG}"),
            2,
            8,
            "unknown source kind `logs`",
        );
        assert_err(
            &format!("[sources.web]\nfollow = true\nuntil = \"disconnect\"\n{SEG}"),
            3,
            9,
            "cannot be combined with `follow`",
        );
        assert_err(
            &format!("[sources.web]\nuntil = \"eof\"\n{SEG}"),
            2,
            9,
            "unknown `until` value",
        );
    }

    #[test]
    fn engine_and_identity_errors() {
        assert_err(
            &format!("[engine]\nmax_line_bytes = 0\n{SEG}"),
            2,
            18,
            "greater than 0",
        );
        assert_err(
            &format!("[engine]\ndefault_region = \"usa\"\n{SEG}"),
            2,
            18,
            "two uppercase",
        );
        assert_err(
            &format!("[engine]\ndefault_region = \"us\"\n{SEG}"),
            2,
            18,
            "two uppercase",
        );
        assert_err(
            &format!("[engine]\nlate_policy = \"drop\"\n{SEG}"),
            2,
            15,
            "unknown late_policy",
        );
        assert_err(
            &format!("[engine]\nworkers = 0\n{SEG}"),
            2,
            11,
            "at least 1",
        );
        assert_err(
            &format!("[identity]\nextra = [\"a\", \"Dev\"]\n{SEG}"),
            2,
            15,
            "invalid identifier name `Dev`",
        );
        assert_err(
            &format!("[identity]\npriority = [\"a\", \"b\", \"a\"]\n{SEG}"),
            2,
            23,
            "duplicate identifier `a`",
        );
    }

    #[test]
    fn unknown_keys_and_toml_errors() {
        let e = err(&format!("[engine]\ntick = \"1s\"\nticks = \"2s\"\n{SEG}"));
        assert_eq!((e.line, e.column), (3, 1), "{e}");
        assert!(e.message.contains("`ticks`"), "{}", e.message);
        assert!(
            e.message.contains("`tick`") && e.message.contains("`workers`"),
            "{}",
            e.message
        );

        let e = err(&format!(
            "{SEG}[traits.t]\nstream = \"web\"\nwindows = \"1m\"\n"
        ));
        assert_eq!((e.line, e.column), (5, 1), "{e}");
        assert!(
            e.message.contains("unknown field `windows`"),
            "{}",
            e.message
        );
        assert!(e.message.contains("`window`"), "{}", e.message);

        let e = err(&format!("[outputs]\nsegments = \"-\"\n{SEG}"));
        assert_eq!((e.line, e.column), (1, 2), "{e}");
        assert!(
            e.message.contains("`outputs`") && e.message.contains("`output`"),
            "{}",
            e.message
        );

        // Plain syntax errors and type errors.
        let e = err("[engine\n");
        assert_eq!(e.line, 1, "{e}");
        assert_err(
            &format!("[engine]\nworkers = \"two\"\n{SEG}"),
            2,
            11,
            "invalid type",
        );
    }

    #[test]
    fn durations_shorter_than_the_tick_are_warned_about() {
        let spec = parse_spec(
            r#"
[engine]
tick = "1s"
[sources.web]
[traits.blink]
stream = "web"
window = "500ms"
[traits.views_1h]
stream = "web"
window = "1h"
[segments.seen]
when = "blink >= 1"
min_dwell = "200ms"
[segments.stays]
when = "views_1h >= 1"
min_dwell = "5s"
"#,
            "w.toml",
        )
        .unwrap();
        let warnings = spec.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with(
                "[traits.blink] window is 500 ms, shorter than the engine tick (1000 ms)"
            ),
            "{warnings:?}"
        );
        assert!(
            warnings[1].starts_with("[segments.seen] min_dwell is 200 ms"),
            "{warnings:?}"
        );
        let shipped = load_spec(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dataflows/ecommerce.toml"
        )))
        .unwrap();
        assert_eq!(shipped.warnings(), Vec::<String>::new());
    }

    #[test]
    fn load_spec_errors_and_success() {
        let e = load_spec(Path::new("/definitely/not/here.toml")).unwrap_err();
        assert_eq!((e.line, e.column), (0, 0));
        assert!(e.message.starts_with("cannot read: "), "{}", e.message);
        assert_eq!(e.file, "/definitely/not/here.toml");
        assert!(
            e.to_string()
                .starts_with("/definitely/not/here.toml: cannot read: "),
            "no position without one: {e}"
        );

        let dir = std::env::temp_dir().join(format!("segflow-spec-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flow.toml");
        std::fs::write(&path, FULL).unwrap();
        let s = load_spec(&path).unwrap();
        assert_eq!(s.file, path.display().to_string());
        assert_eq!(s.traits.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é\néé x", 7), (2, 3));
        assert_eq!(line_col("ab", 99), (1, 3));
    }

    /// Two copies of a definition that differ only in file name, comments,
    /// layout, paths, outputs, `workers` and descriptions have the same
    /// semantics; a changed threshold does not.
    #[test]
    fn semantics_ignore_where_and_how_a_definition_is_written() {
        let a = parse_spec(
            r#"
[engine]
tick = "1s"
workers = 2
[sources.web]
path = "data/web.jsonl"
[output]
segments = "out/a.jsonl"
[traits.views]
stream = "web"
filter = 'event == "view_item"'
[segments.fan]
when = "views >= 3"
description = "likes it"
"#,
            "a.toml",
        )
        .unwrap();
        let b = parse_spec(
            r#"
# a copy, somewhere else
[engine]
tick   = "1s"
[sources.web]
path = "/srv/segflow/web.jsonl"
[traits.views]
stream = "web"
filter = 'event=="view_item"'   # same condition
[segments.fan]
when = "views>=3"
"#,
            "elsewhere/b.toml",
        )
        .unwrap();
        assert_eq!(a.semantics(), b.semantics());
        let changed = parse_spec(
            r#"
[sources.web]
[traits.views]
stream = "web"
filter = 'event == "view_item"'
[segments.fan]
when = "views >= 4"
"#,
            "a.toml",
        )
        .unwrap();
        assert_ne!(a.semantics(), changed.semantics());
    }
}
