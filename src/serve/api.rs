//! The HTTP server: routes, the bearer token, request limits.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot, Semaphore};

use super::live::{AsOf, Live, LookupError};
use crate::io::sinks::SegmentDiff;
use crate::spec::content::ContentSlot;
use crate::store::explain::evaluate;
use crate::store::ProfileView;

/// Requests answered at once; more get `503` with `Retry-After: 1`.
pub const MAX_IN_FLIGHT: usize = 1024;

/// How often an `?id=` diff stream looks the identifier's profile up
/// between diffs (a first profile or a merge with no diff of its own is
/// announced within this).
const IDENTITY_POLL: Duration = Duration::from_millis(250);

/// Diff streams open at once; more get `503`.
pub const MAX_STREAMS: usize = 256;

/// The most members one page holds.
pub const MAX_PAGE: usize = 10_000;

/// How long one request may take before it is answered `503`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections open at once, at most; more are closed as they come. Fewer
/// when the process may open few files (see [`connection_limit`]).
pub const MAX_CONNECTIONS: usize = 2048;

/// File descriptors kept for the engine (RocksDB's tables and logs, inputs,
/// outputs, the cluster) whatever clients do.
pub const RESERVED_FILES: u64 = 512;

/// How many connections the API takes at once: the soft limit of open
/// files is first raised to the hard limit (as servers do), then half of
/// what is left above [`RESERVED_FILES`] may be connections (at least 16,
/// at most [`MAX_CONNECTIONS`]). Idle clients cannot then starve the
/// engine of file descriptors (a state write that cannot open a file
/// fails the run).
pub fn connection_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer for getrlimit/setrlimit.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 16;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    let spare = soft.saturating_sub(RESERVED_FILES) / 2;
    (spare.min(MAX_CONNECTIONS as u64) as usize).max(16)
}

/// How long a client may take to send a request's headers (on a new
/// connection, or a kept-alive one that is reused) before its connection
/// is closed: a client that trickles bytes does not hold a connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How the API is served.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// `HOST:PORT` to listen on (loopback unless said otherwise).
    pub addr: String,
    /// The bearer token every endpoint but `/healthz` needs.
    pub token: String,
}

/// Where the API token came from (see [`api_token`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenOrigin {
    /// The `SEGFLOW_API_TOKEN` environment variable.
    Environment,
    /// A file (`--http-token-file`).
    File,
    /// Generated for this run (print it once).
    Generated,
}

/// The API token: the first line of `file` if given (an empty or
/// unreadable file is an error), else `SEGFLOW_API_TOKEN` if set and not
/// empty, else 32 random hexadecimal digits (128 bits from the operating
/// system's generator).
pub fn api_token(file: Option<&Path>) -> Result<(String, TokenOrigin), String> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("--http-token-file {}: {e}", file.display()))?;
        let token = text.lines().next().unwrap_or_default().trim().to_string();
        if token.is_empty() {
            return Err(format!(
                "--http-token-file {}: the file is empty; write the token on its first line",
                file.display()
            ));
        }
        return Ok((token, TokenOrigin::File));
    }
    if let Ok(token) = std::env::var("SEGFLOW_API_TOKEN") {
        let token = token.trim().to_string();
        if !token.is_empty() {
            return Ok((token, TokenOrigin::Environment));
        }
    }
    let bytes: [u8; 16] = rand::random();
    let token = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok((token, TokenOrigin::Generated))
}

struct App {
    live: Arc<Live>,
    token: String,
    in_flight: Semaphore,
    streams: Arc<Semaphore>,
}

/// A running API server; dropping it stops it.
pub struct Server {
    addr: std::net::SocketAddr,
    live: Arc<Live>,
    /// The diff streams' permits: all free once every stream has closed.
    streams: Arc<Semaphore>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `config.addr` now (a port in use is an error here, before the
    /// run starts) and serves `live` on two threads of its own.
    pub fn start(config: &ServeConfig, live: Arc<Live>) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(&config.addr).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("--http {}: cannot listen: {e}", config.addr),
            )
        })?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let streams = Arc::new(Semaphore::new(MAX_STREAMS));
        let app = Arc::new(App {
            live: Arc::clone(&live),
            token: config.token.clone(),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            streams: Arc::clone(&streams),
        });
        let router = router(app);
        let (stop, stop_rx) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("segflow-api")
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("segflow-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("api: {e}");
                            return;
                        }
                    };
                    accept(listener, router, stop_rx).await;
                });
                // Open streams do not hold the process.
                runtime.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(Server {
            addr,
            live,
            streams,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address served (with the port chosen for `:0`).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    /// Ends the open diff streams with `event: end` (the reason given to
    /// [`Live::end_streams`] before, or that the engine stopped serving),
    /// waits up to a second for them to send it, then stops serving.
    fn drop(&mut self) {
        self.live.end_streams(crate::serve::StreamEnd {
            failed: false,
            reason: "the engine stopped serving".into(),
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while self.streams.available_permits() < MAX_STREAMS
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// Serves connections from `listener` until `stop`: at most
/// [`MAX_CONNECTIONS`] at once, each closed if a request's headers take
/// longer than [`HEADER_READ_TIMEOUT`].
async fn accept(listener: tokio::net::TcpListener, router: Router, stop: oneshot::Receiver<()>) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let most = connection_limit();
    tracing::info!("api: takes up to {most} connections at once");
    let connections = Arc::new(Semaphore::new(most));
    let mut warned: Option<std::time::Instant> = None;
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of descriptors, a connection reset before it was
                // taken: go on.
                Err(e) => {
                    tracing::debug!("api: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            // Said once a minute, not for every connection closed.
            if warned.is_none_or(|w| w.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(
                    "api: {most} connections open (the most it takes, from the open-file limit); closing new ones"
                );
                warned = Some(std::time::Instant::now());
            }
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("api: connection: {e}");
            }
            drop(permit);
        });
    }
}

fn router(app: Arc<App>) -> Router {
    let guarded = Router::new()
        .route("/v1/profiles/{identifier}", get(profile))
        .route("/v1/segments", get(segments))
        .route("/v1/segments/{name}/members", get(members))
        .route("/v1/segments/{name}/export", get(export))
        .route("/v1/decide", get(decide_many))
        .route("/v1/decide/{slot}", get(decide_one))
        .route("/v1/diffs/stream", get(stream))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&app), guard));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/", get(dashboard))
        .merge(guarded)
        .fallback(not_found)
        .with_state(app)
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; see GET /v1/profiles/{identifier} (URL-encoded: a / in it is %2F), /v1/segments, /v1/segments/{name}/members, /v1/segments/{name}/export, /v1/decide/{slot}?id=, /v1/decide?slots=a,b&id=, /v1/diffs/stream, /v1/status, /metrics, /healthz, and the dashboard at /",
    )
}

/// A JSON error answer: `{"error": message}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = (status, json_body(&json!({"error": message.into()}))).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn json_body(v: &Value) -> String {
    let mut s = v.to_string();
    s.push('\n');
    s
}

fn ok(v: Value) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json_body(&v),
    )
        .into_response()
}

/// Whether `a` and `b` are equal, in a time that depends only on their
/// lengths (the token is not guessed byte by byte from answer times).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of a request: `Authorization: Bearer T`, or for the diff
/// stream `?access_token=T`.
fn presented<'a>(headers: &'a HeaderMap, uri: &'a axum::http::Uri) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = v.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    if uri.path() == "/v1/diffs/stream" {
        let query = uri.query()?;
        return serde_urlencoded::from_str::<Vec<(String, String)>>(query)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v);
    }
    None
}

/// The bearer token, then a place among the requests in flight, then the
/// request with a time limit.
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    match presented(request.headers(), request.uri()) {
        Some(t) if same(t.as_bytes(), app.token.as_bytes()) => {}
        given => {
            let why = if given.is_some() {
                "the bearer token is wrong"
            } else {
                "this endpoint needs `Authorization: Bearer TOKEN` (the token segflow printed at start, SEGFLOW_API_TOKEN or --http-token-file)"
            };
            let mut r = error(StatusCode::UNAUTHORIZED, why);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"segflow\""),
            );
            return r;
        }
    }
    let Ok(_permit) = app.in_flight.try_acquire() else {
        return busy("too many requests in flight");
    };
    let endpoint = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let visitor = visitor_of(&endpoint, request.uri()).map(|id| pseudonym(&app.token, &id));
    let started = std::time::Instant::now();
    let answer = match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(r) => as_json_error(r).await,
        Err(_) => busy("the request took too long"),
    };
    // A stream's time is its opening.
    let secs = started.elapsed().as_secs_f64();
    app.live.metrics().api_request(&endpoint, secs);
    tracing::debug!(
        target: "segflow::api",
        endpoint,
        status = answer.status().as_u16(),
        micros = (secs * 1e6) as u64,
        visitor = visitor.as_deref().unwrap_or("-"),
        "request"
    );
    answer
}

/// A client error that axum's extractors answered in plain text (a query
/// string that does not parse, a path that is not UTF-8) in the API's
/// JSON shape, `{"error": ...}`; other answers as they are.
async fn as_json_error(r: Response) -> Response {
    let json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if !r.status().is_client_error() || json {
        return r;
    }
    let status = r.status();
    let text = match axum::body::to_bytes(r.into_body(), 64 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    };
    let text = match (status, text.is_empty()) {
        (StatusCode::METHOD_NOT_ALLOWED, true) => "the API answers GET only".to_string(),
        (_, true) => status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_string(),
        _ => text,
    };
    error(status, text)
}

/// The identifier a request is about: the path's for a profile, `id=`
/// for a decision or a stream.
fn visitor_of(endpoint: &str, uri: &axum::http::Uri) -> Option<String> {
    if endpoint == "/v1/profiles/{identifier}" {
        let last = uri.path().rsplit('/').next()?;
        return percent_decode(last);
    }
    serde_urlencoded::from_str::<Vec<(String, String)>>(uri.query()?)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "id" || k == "profile")
        .map(|(_, v)| v)
}

fn percent_decode(s: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("v={s}"))
        .ok()?
        .pop()
        .map(|(_, v)| v)
}

/// How the access log names an identifier: `id#` and 12 hexadecimal
/// digits of its HMAC-SHA256 keyed with the API token. The same visitor
/// has the same pseudonym in every line (and across restarts with the
/// same token), and the identifier cannot be read back without the token.
pub fn pseudonym(token: &str, identifier: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(token.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(identifier.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("id#{hex}")
}

/// The dashboard: one page with its script and styles inline (no
/// external asset); it asks for the token and reads `/v1/status` and the
/// diff stream.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // The page loads nothing from elsewhere, and nothing may frame it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
        ],
        DASHBOARD,
    )
        .into_response()
}

/// The run at a glance, for the dashboard: freshness, profiles, diffs,
/// segment sizes, and each source's counters and clock.
async fn status(State(app): State<Arc<App>>) -> Response {
    let as_of = app.live.segments_as_of();
    let (profiles, sources) = app.live.counters_with_clocks();
    let now = crate::time::wall_clock_ms() as i64;
    let sources: Vec<Value> = sources
        .into_iter()
        .map(|(s, clock)| {
            json!({
                "name": s.name, "lines": s.lines, "records": s.records,
                "dead_letters": s.dead_letters, "late": s.late,
                "clock": clock, "clock_lag_ms": clock.map(|c| now - c as i64),
            })
        })
        .collect();
    let segments: Vec<Value> = app
        .live
        .segment_sizes()
        .into_iter()
        .map(|(name, description, size)| json!({"name": name, "description": description, "size": size}))
        .collect();
    ok(json!({
        "as_of": as_of_json(&as_of),
        "profiles": profiles,
        "diffs": app.live.metrics().diffs_total(),
        "segments": segments,
        "sources": sources,
    }))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.live.render_metrics(),
    )
        .into_response()
}

fn busy(why: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, why);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn as_of_json(a: &AsOf) -> Value {
    serde_json::to_value(a).unwrap_or(Value::Null)
}

/// Why `identifier` is not one (see [`crate::model::IdentityRules::parse_query`]).
fn not_an_identifier(live: &Live, identifier: &str) -> String {
    let rules = live.rules();
    let kinds = rules.kinds().join(", ");
    let known = identifier
        .split_once(':')
        .filter(|(kind, _)| rules.is_kind(kind.trim()))
        .map(|(kind, value)| (kind.trim(), value.trim()));
    match known {
        Some((kind, "")) => format!("{identifier:?} has no value after `{kind}:`"),
        Some((kind, value)) => format!(
            "{value:?} is not a valid {kind} identifier (it does not normalize: an e-mail needs an @, a phone number must parse for the region)"
        ),
        None => format!(
            "{identifier:?} is not an identifier: use KIND:VALUE with a kind among {kinds} (e.g. email:ann@example.com), or a bare value"
        ),
    }
}

/// The profile of `identifier`, or the answer to give instead.
fn lookup(app: &App, identifier: &str) -> Result<Option<(ProfileView, AsOf)>, Response> {
    let ids = app.live.identifiers(identifier);
    if ids.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            not_an_identifier(&app.live, identifier),
        ));
    }
    app.live.profile(&ids).map_err(lookup_failure)
}

/// The answer for a state that cannot be read: 503 while the run opens
/// it (try again), without state, or with a cluster's part that is not
/// readable here (with the reason); 500 for a failed read.
fn lookup_failure(e: LookupError) -> Response {
    match e {
        LookupError::Starting => busy(&e.to_string()),
        LookupError::NoState
        | LookupError::Store(crate::store::StoreError::PartUnavailable { .. }) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        LookupError::Store(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A profile as the API shows it: a recency trait (`since_first`,
/// `since_last`) is the time in ms from its event to `as_of` (as
/// conditions read it), not the event's time the state keeps.
fn profile_json(spec: &crate::spec::Spec, view: &ProfileView, as_of: &AsOf) -> Value {
    let mut traits = view.traits.clone();
    for t in spec.traits.iter().filter(|t| t.aggregate.is_recency()) {
        if let (Some(at), Some(now)) = (traits.get(&t.name).and_then(Value::as_f64), as_of.time) {
            traits.insert(t.name.clone(), json!((now as f64 - at).max(0.0) as u64));
        }
    }
    let traits: serde_json::Map<String, Value> =
        traits.into_iter().map(|(k, v)| (k, tidy(v))).collect();
    json!({
        "profile": view.profile,
        "identifiers": view.identifiers,
        "attributes": view.attributes,
        "traits": traits,
        "segments": view.segments,
        "as_of": as_of_json(as_of),
    })
}

async fn profile(State(app): State<Arc<App>>, UrlPath(identifier): UrlPath<String>) -> Response {
    match lookup(&app, &identifier) {
        Ok(Some((view, as_of))) => ok(profile_json(&app.live.spec(), &view, &as_of)),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no profile has the identifier {identifier:?}"),
        ),
        Err(r) => r,
    }
}

async fn segments(State(app): State<Arc<App>>) -> Response {
    let list: Vec<Value> = app
        .live
        .segment_sizes()
        .into_iter()
        .map(|(name, description, size)| json!({"name": name, "description": description, "size": size}))
        .collect();
    ok(json!({"segments": list, "as_of": as_of_json(&app.live.segments_as_of())}))
}

#[derive(Deserialize)]
struct Page {
    cursor: Option<String>,
    limit: Option<String>,
}

async fn members(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    Query(page): Query<Page>,
) -> Response {
    let limit = match page.limit.as_deref().map(str::parse::<usize>) {
        None => 100,
        Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("`limit` must be a number from 1 to {MAX_PAGE}"),
            )
        }
    };
    let as_of = app.live.segments_as_of();
    match app.live.members(&name, page.cursor.as_deref(), limit) {
        Some((members, size)) => {
            let next = (members.len() == limit)
                .then(|| members.last().cloned())
                .flatten();
            ok(json!({
                "segment": name,
                "size": size,
                "members": members,
                "next_cursor": next,
                "as_of": as_of_json(&as_of),
            }))
        }
        None => unknown_segment(&app.live, &name),
    }
}

/// A 404 for a segment the definition does not declare, with the nearest
/// name and the declared ones.
fn unknown_segment(live: &Live, name: &str) -> Response {
    let spec = live.spec();
    let names: Vec<&str> = spec.segments.iter().map(|s| s.name.as_str()).collect();
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no segment `{name}`{}; the segments are: {}",
            crate::spec::did_you_mean(name, names.iter().copied()),
            names.join(", ")
        ),
    )
}

#[derive(Deserialize)]
struct ExportQuery {
    format: Option<String>,
    since: Option<String>,
}

/// A segment's members with their identifiers, or its entries and exits
/// after `since`, as CSV or JSON lines (see [`super::export`]); the
/// `X-Segflow-As-Of` header gives the time to ask the next changes from.
async fn export(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<ExportQuery>,
) -> Response {
    use super::export::{changes_since, members, write_rows, ChangesError, ExportFormat};
    let format = match ExportFormat::parse(q.format.as_deref().unwrap_or("csv")) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let since = match q.since.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "`since` must be a time in ms since the epoch (the X-Segflow-As-Of of an export before)",
            )
        }
    };
    let now = app.live.segments_as_of().time;
    if let (Some(t), Some(now)) = (since, now) {
        if t > now {
            return error(
                StatusCode::BAD_REQUEST,
                format!("`since` ({t}) is after the time the API is as of ({now}): give the X-Segflow-As-Of of an export before"),
            );
        }
    }
    let live = Arc::clone(&app.live);
    let segment = name.clone();
    let answer = tokio::task::spawn_blocking(move || match since {
        None => members(&live, &segment).map_err(lookup_failure),
        Some(t) => changes_since(&live, &segment, t).map_err(|e| match e {
            ChangesError::NotKept(after) => error(
                StatusCode::GONE,
                format!(
                    "the changes since {t} are no longer all kept (they are from {after} on): export the members, and ask the changes since its X-Segflow-As-Of from then on"
                ),
            ),
            ChangesError::State(e) => lookup_failure(e),
        }),
    })
    .await;
    let (rows, as_of) = match answer {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return unknown_segment(&app.live, &name),
        Ok(Err(answer)) => return answer,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let kinds = app.live.rules().kinds();
    let mut body = Vec::new();
    if let Err(e) = write_rows(&mut body, format, &kinds, &rows, since.is_some()) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let mut r = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, format.media_type()),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response();
    if let Some(t) = as_of
        .time
        .and_then(|t| HeaderValue::from_str(&t.to_string()).ok())
    {
        r.headers_mut().insert("x-segflow-as-of", t);
    }
    let disposition = format!(
        "attachment; filename=\"{name}-{}{}.{}\"",
        if since.is_some() { "changes-" } else { "" },
        as_of.time.unwrap_or(0),
        format.extension()
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

#[derive(Deserialize)]
struct DecideQuery {
    id: Option<String>,
    slots: Option<String>,
}

/// The variant of `slot` for the profile `view` (an empty profile for an
/// unknown visitor) and why: the first variant whose condition holds, with
/// the values it read, or the default with the variants that did not.
fn decide(
    spec: &crate::spec::Spec,
    slot: &ContentSlot,
    view: &ProfileView,
    now: Option<u64>,
) -> Value {
    let mut passed = Vec::new();
    for (rank, v) in slot.variants.iter().enumerate() {
        let (holds, read) = evaluate(spec, view, &v.when, now);
        let values: serde_json::Map<String, Value> =
            read.into_iter().map(|(k, v)| (k, tidy(v))).collect();
        if holds {
            return json!({
                "variant": v.name,
                "content": v.content,
                "why": {"rule": rank + 1, "when": v.when.to_string(), "values": values, "not_matched": passed},
            });
        }
        passed.push(json!({"variant": v.name, "when": v.when.to_string(), "values": values}));
    }
    json!({
        "variant": slot.default.name,
        "content": slot.default.content,
        "why": {"rule": "default", "not_matched": passed},
    })
}

/// A whole number as an integer (`3`, not `3.0`); other values as they
/// are.
fn tidy(v: Value) -> Value {
    match v.as_f64() {
        Some(f) if v.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => json!(f as i64),
        _ => v,
    }
}

/// The slots named, or a 404 naming the known ones.
fn slots<'s>(
    spec: &'s crate::spec::Spec,
    names: &[&str],
) -> Result<Vec<&'s ContentSlot>, Response> {
    let mut out = Vec::new();
    for name in names {
        match spec.content.iter().find(|s| s.name == *name) {
            Some(s) => out.push(s),
            None => {
                let known: Vec<&str> = spec.content.iter().map(|s| s.name.as_str()).collect();
                return Err(error(
                    StatusCode::NOT_FOUND,
                    if known.is_empty() {
                        format!("no content slot `{name}`: {} declares none (add a [content.{name}] table)", spec.file)
                    } else {
                        format!(
                            "no content slot `{name}`{}; the slots are: {}",
                            crate::spec::did_you_mean(name, known.iter().copied()),
                            known.join(", ")
                        )
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// The decisions for `names` for the visitor `id`.
fn decisions(app: &App, names: &[&str], id: Option<&str>) -> Result<(Value, Vec<Value>), Response> {
    let spec = app.live.spec();
    let slots = slots(&spec, names)?;
    let Some(id) = id.filter(|i| !i.trim().is_empty()) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "give the visitor's identifier: ?id=KIND:VALUE (e.g. anon:COOKIE or email:ann@example.com)",
        ));
    };
    let (view, as_of, known) = match lookup(app, id)? {
        Some((view, as_of)) => (view, as_of, true),
        // An unknown visitor gets what an empty profile gets.
        None => (ProfileView::default(), app.live.segments_as_of(), false),
    };
    let decided = slots
        .iter()
        .map(|slot| {
            let mut d = decide(&spec, slot, &view, as_of.time);
            d["slot"] = json!(slot.name);
            d
        })
        .collect();
    let head = json!({
        "profile": known.then_some(view.profile.clone()),
        "as_of": as_of_json(&as_of),
    });
    Ok((head, decided))
}

async fn decide_one(
    State(app): State<Arc<App>>,
    UrlPath(slot): UrlPath<String>,
    Query(q): Query<DecideQuery>,
) -> Response {
    match decisions(&app, &[slot.as_str()], q.id.as_deref()) {
        Ok((mut head, mut decided)) => {
            let d = decided.pop().unwrap_or(Value::Null);
            if let (Some(h), Value::Object(d)) = (head.as_object_mut(), d) {
                for (k, v) in d {
                    h.insert(k, v);
                }
            }
            ok(head)
        }
        Err(r) => r,
    }
}

async fn decide_many(State(app): State<Arc<App>>, Query(q): Query<DecideQuery>) -> Response {
    let Some(list) = q.slots.as_deref().filter(|s| !s.trim().is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "name the slots: /v1/decide?slots=hero,sidebar&id=IDENTIFIER (or /v1/decide/SLOT?id=)",
        );
    };
    let names: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    match decisions(&app, &names, q.id.as_deref()) {
        Ok((mut head, decided)) => {
            let by_slot: serde_json::Map<String, Value> = decided
                .into_iter()
                .map(|d| (d["slot"].as_str().unwrap_or_default().to_string(), d))
                .collect();
            head["decisions"] = Value::Object(by_slot);
            ok(head)
        }
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct StreamQuery {
    segment: Option<String>,
    profile: Option<String>,
    id: Option<String>,
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// What a subscriber wants to see.
struct Filter {
    segments: Option<Vec<String>>,
    profile: Option<String>,
    /// Identifiers whose current profile is followed.
    ids: Vec<crate::model::Ident>,
    /// Every profile the identifiers have belonged to since the stream
    /// opened: a merge moves them to another profile, and the old one's
    /// exits must still reach the subscriber (the sum of the diffs it got
    /// is then the membership of the profiles it followed).
    followed: std::collections::BTreeSet<String>,
    /// The identifiers' profile as last announced (`event: profile`).
    current: Option<String>,
    /// The diffs of this time and before are in an `event: profile`
    /// already (the stream subscribed before reading it).
    announced_through: Option<u64>,
}

impl Filter {
    /// Announces `profile` as the identifiers' profile with its committed
    /// segments (`event: profile`); the diffs up to their time are in it.
    fn announce(&mut self, live: &Live, profile: String) -> Event {
        let (now, through) = live.segments_of(&profile);
        let event = profile_event(&profile, &now, self.segments.as_ref(), through);
        self.announced_through = self.announced_through.max(through);
        self.followed.insert(profile.clone());
        self.current = Some(profile);
        event
    }
}

/// `event: end`: the stream's last event, `{"failed", "reason"}`: the
/// engine stops serving (the run failed, or was stopped).
fn end_event(why: &crate::serve::StreamEnd) -> Event {
    Event::default()
        .event("end")
        .data(serde_json::to_string(why).unwrap_or_default())
}

/// `event: profile`: the profile an identifier belongs to and its
/// segments (those of `in_segments`, the stream's filter) as of `time`
/// (ms, inclusive): sent when an `?id=` stream opens and whenever the
/// identifier first has a profile or a merge or split moves it to another,
/// before the diffs of that profile that follow it.
fn profile_event(
    profile: &str,
    segments: &[String],
    in_segments: Option<&Vec<String>>,
    time: Option<u64>,
) -> Event {
    let list: Vec<&String> = segments
        .iter()
        .filter(|s| in_segments.is_none_or(|f| f.contains(s)))
        .collect();
    Event::default()
        .event("profile")
        .data(json!({"time": time, "profile": profile, "segments": list}).to_string())
}

/// `event: profile` with `"profile": null` for an `?id=` stream whose
/// identifier no profile has when it opens (an identifier not seen yet is
/// followed all the same: its first profile is announced when it has
/// one), with a `note` saying so and how the query was read (a `KIND:`
/// prefix that is not a kind makes the whole a bare value).
fn no_profile_event(live: &Live, query: &str, ids: &[crate::model::Ident]) -> Event {
    let rules = live.rules();
    let read_as: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
    let mut note = format!(
        "no profile has the identifier {query:?} yet (read as {}); the stream follows it and announces its profile when it has one",
        read_as.join(", ")
    );
    if let Some((kind, _)) = query.split_once(':') {
        if !rules.is_kind(kind.trim()) {
            note.push_str(&format!(
                "; {:?} is not an identifier kind (kinds: {}), so the whole was read as a bare value",
                kind.trim(),
                rules.kinds().join(", ")
            ));
        }
    }
    Event::default().event("profile").data(
        json!({"time": live.segments_as_of().time, "profile": null, "segments": [], "note": note})
            .to_string(),
    )
}

async fn stream(State(app): State<Arc<App>>, Query(q): Query<StreamQuery>) -> Response {
    let Ok(permit) = Arc::clone(&app.streams).try_acquire_owned() else {
        return busy("too many diff streams open");
    };
    let segments = q.segment.as_deref().map(|s| {
        s.split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect::<Vec<_>>()
    });
    if segments.as_ref().is_some_and(Vec::is_empty) {
        return error(
            StatusCode::BAD_REQUEST,
            "?segment= names no segment: give one or more, comma-separated, or leave it out for all",
        );
    }
    if q.profile.as_deref().is_some_and(|p| p.trim().is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "?profile= names no profile: give a profile id (its canonical identifier, KIND:VALUE), or leave it out",
        );
    }
    if let Some(list) = &segments {
        let spec = app.live.spec();
        if let Some(unknown) = list
            .iter()
            .find(|n| !spec.segments.iter().any(|s| &s.name == *n))
        {
            return unknown_segment(&app.live, unknown);
        }
    }
    let ids = match q.id.as_deref() {
        Some(id) => {
            let ids = app.live.identifiers(id);
            if ids.is_empty() {
                return error(StatusCode::BAD_REQUEST, not_an_identifier(&app.live, id));
            }
            ids
        }
        None => Vec::new(),
    };
    // Subscribed before the first announcement is read: no diff falls
    // between the two (those it holds already are skipped).
    let rx = app.live.subscribe();
    // Following an identifier needs its profile now: a state that cannot
    // be read is said at once, not met with a silent stream.
    let known = if ids.is_empty() {
        None
    } else {
        match app.live.profile(&ids) {
            Ok(found) => found.map(|(view, _)| view.profile),
            Err(e) => return lookup_failure(e),
        }
    };
    // A profile id is a canonical identifier: written as data are.
    let profile = q.profile.map(|p| {
        app.live
            .identifiers(&p)
            .into_iter()
            .next()
            .map_or(p, |id| id.as_str().to_string())
    });
    let mut filter = Filter {
        segments,
        profile,
        ids,
        followed: Default::default(),
        current: None,
        announced_through: None,
    };
    let mut first: std::collections::VecDeque<Event> = match (known, q.id.as_deref()) {
        (Some(p), _) => [filter.announce(&app.live, p)].into(),
        // Said at once, not met with a silent stream: the identifier has
        // no profile (yet), and how it was read.
        (None, Some(query)) => [no_profile_event(&app.live, query, &filter.ids)].into(),
        (None, None) => Default::default(),
    };
    // Why the stream ends, once the engine stops serving: said in a last
    // event, after the diffs already committed.
    let mut end = app.live.streams_end();
    let mut closing = false;
    if let Some(why) = end.borrow_and_update().clone() {
        first.push_back(end_event(&why));
        closing = true;
    }
    let live = Arc::clone(&app.live);
    // How often a followed identifier's profile is looked at between
    // diffs: a first profile, or a merge that changes no membership, has
    // no diff of its own to carry its announcement.
    let mut poll = tokio::time::interval(IDENTITY_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = futures_util::stream::unfold(
        (rx, filter, live, permit, first, poll, end, closing),
        |(mut rx, mut filter, live, permit, mut queue, mut poll, mut end, mut closing)| async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    return Some((
                        Ok::<Event, Infallible>(e),
                        (rx, filter, live, permit, queue, poll, end, closing),
                    ));
                }
                if closing {
                    return None;
                }
                let received = tokio::select! {
                    // Diffs first: a time's diffs are sent before its state
                    // is written, so a profile the lookup finds has had
                    // its diffs queued already.
                    biased;
                    received = rx.recv() => received,
                    _ = end.changed() => {
                        // (The sender lives in `live`, which the stream
                        // holds: it is never dropped first.)
                        if let Some(why) = end.borrow_and_update().clone() {
                            queue.push_back(end_event(&why));
                        }
                        closing = true;
                        continue;
                    }
                    _ = poll.tick(), if !filter.ids.is_empty() => {
                        if let Ok(Some((view, _))) = live.profile(&filter.ids) {
                            if filter.current.as_ref() != Some(&view.profile) {
                                queue.push_back(filter.announce(&live, view.profile));
                            }
                        }
                        continue;
                    }
                };
                match received {
                    Ok(diffs)
                        if filter
                            .announced_through
                            .is_some_and(|a| diffs.first().is_some_and(|d| d.time <= a)) => {}
                    Ok(diffs) => {
                        // The profile of a followed identifier as of the
                        // diffs' time (a merge moves it): the diffs are
                        // sent as their time is committed, the state is
                        // written right after; wait for it (briefly).
                        let followed = if filter.ids.is_empty() {
                            None
                        } else {
                            let time = diffs.first().map_or(0, |d| d.time);
                            let waiting = tokio::time::Instant::now();
                            // Not past the engine's stop (the server waits
                            // a second for streams to end).
                            while !live.state_holds(time)
                                && waiting.elapsed() < Duration::from_secs(2)
                                && end.borrow().is_none()
                            {
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            match live.profile(&filter.ids) {
                                Ok(Some((view, _))) => {
                                    filter.followed.insert(view.profile.clone());
                                    Some(view)
                                }
                                _ => None,
                            }
                        };
                        let moved = followed
                            .as_ref()
                            .filter(|v| filter.current.as_ref() != Some(&v.profile))
                            .map(|v| v.profile.as_str());
                        let wanted = |d: &&SegmentDiff| {
                            filter
                                .segments
                                .as_ref()
                                .is_none_or(|s| s.contains(&d.segment))
                                && filter.profile.as_ref().is_none_or(|p| *p == d.profile)
                                && (filter.ids.is_empty() || filter.followed.contains(&d.profile))
                        };
                        let diff =
                            |d: &SegmentDiff| Event::default().event("diff").data(d.to_line());
                        // The profiles followed before (a merge's exits),
                        // then the identifier's new profile as it was
                        // before this time, then its diffs of this time.
                        let (before, after): (Vec<&SegmentDiff>, Vec<&SegmentDiff>) = diffs
                            .iter()
                            .filter(wanted)
                            .partition(|d| moved != Some(d.profile.as_str()));
                        queue.extend(before.into_iter().map(diff));
                        if let (Some(profile), Some(time)) = (moved, diffs.first().map(|d| d.time))
                        {
                            let was = live.segments_before(profile, time, &diffs);
                            queue.push_back(profile_event(
                                profile,
                                &was,
                                filter.segments.as_ref(),
                                time.checked_sub(1),
                            ));
                            filter.current = Some(profile.to_string());
                        }
                        queue.extend(after.into_iter().map(diff));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        queue.push_back(
                            Event::default()
                                .event("lagged")
                                .data(json!({"skipped_times": n}).to_string()),
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Sse::new(events)
        // A comment line every 5 s: proxies keep the stream open, and a
        // relay (examples/shop) notices a visitor gone within 5 s.
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response()
}
