//! An HTTP collection endpoint compatible with the [Segment HTTP tracking
//! API], so that an analytics SDK or server library can point its host at
//! segflow (`--input web=http://127.0.0.1:8088`).
//!
//! | request | body |
//! |---|---|
//! | `POST /v1/track`, `/v1/page`, `/v1/screen`, `/v1/identify`, `/v1/alias`, `/v1/group` | one message; its `type` is the path's (a different `type` is a 400) |
//! | `POST /v1/batch` (also `/v1/import`) | `{"batch": [messages], "context": …, "sentAt": …}` |
//!
//! Each request's body becomes one line of the source (messages are decoded
//! as [`crate::model::formats::segment`] says; a message that does not map
//! is a dead letter, as from a file, and the request still succeeds, as in
//! Segment's API). Answers:
//!
//! * `200 {"success":true}` once the engine has taken the request's
//!   messages in: read, decoded and admitted or dead-lettered (not yet
//!   committed: a crash may lose what was answered since the last
//!   checkpoint, and clients send again from the event time the restarted
//!   engine logs, as for a TCP source);
//! * `400 {"success":false,"error":REASON}` for a body that is not JSON, not
//!   an object, a `type` that contradicts the path, or a `batch` that is not
//!   an array;
//! * `401` without the source's write key (`write_key`: HTTP basic auth
//!   with the key as user name, as Segment's libraries send it, or
//!   `writeKey` in the body);
//! * `413` for a body over `max_line_bytes`;
//! * `429` with `Retry-After: 1` while the engine is behind (its queue of
//!   [`QUEUE`] requests is full): back-pressure, nothing was taken;
//! * `503` when the engine stops before it took the request.
//!
//! [Segment HTTP tracking API]: https://segment.com/docs/connections/sources/catalog/libraries/server/http-api/

use std::io;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use serde_json::Value;
use timely::scheduling::SyncActivator;
use tokio::sync::{mpsc, oneshot};

use super::lines::{LineSource, Next};

/// How many requests may wait for the engine before new ones get a 429.
pub const QUEUE: usize = 1024;

/// The message types of the typed endpoints.
const TYPED: [&str; 6] = ["track", "page", "screen", "identify", "alias", "group"];

/// A request waiting for the engine.
struct Request {
    line: Vec<u8>,
    peer: String,
    taken: oneshot::Sender<()>,
}

struct Shared {
    tx: mpsc::Sender<Request>,
    limit: usize,
    write_key: Option<String>,
    wake: Box<dyn Fn() + Send + Sync>,
}

/// Requests received by an HTTP collection endpoint, one line each.
pub struct HttpLines {
    rx: mpsc::Receiver<Request>,
    /// Answers owed for the requests handed out: sent at the next call,
    /// when the reader has handled them.
    owed: Vec<oneshot::Sender<()>>,
    requests: u64,
    bytes: u64,
    _server: std::thread::JoinHandle<()>,
    _stop: oneshot::Sender<()>,
}

impl HttpLines {
    /// Binds `addr` now (so a port in use fails at start) and serves the
    /// endpoint in the background. `waker` is activated when a request
    /// arrives. Bodies over `limit` bytes are refused (413).
    pub fn listen(
        addr: &str,
        write_key: Option<String>,
        limit: usize,
        waker: Option<SyncActivator>,
    ) -> io::Result<Self> {
        Self::listen_queued(addr, write_key, limit, waker, QUEUE)
    }

    /// [`HttpLines::listen`] with room for `queue` waiting requests.
    fn listen_queued(
        addr: &str,
        write_key: Option<String>,
        limit: usize,
        waker: Option<SyncActivator>,
        queue: usize,
    ) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel(queue);
        let (stop, stop_rx) = oneshot::channel::<()>();
        let shared = Arc::new(Shared {
            tx,
            limit,
            write_key,
            wake: Box::new(move || {
                if let Some(w) = &waker {
                    // An error means the worker is gone; the run is ending.
                    let _ = w.activate();
                }
            }),
        });
        let app = Router::new()
            .route("/v1/{kind}", post(receive))
            .layer(DefaultBodyLimit::max(limit))
            .with_state(shared);
        let server = super::tcp::spawn_on_runtime(format!("segflow-http-{addr}"), async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("http source: {e}");
                    return;
                }
            };
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!("http source: {e}");
            }
        })?;
        Ok(HttpLines {
            rx,
            owed: Vec::new(),
            requests: 0,
            bytes: 0,
            _server: server,
            _stop: stop,
        })
    }
}

fn answer(status: StatusCode, error: Option<String>) -> Response {
    let body = match error {
        None => serde_json::json!({"success": true}),
        Some(e) => serde_json::json!({"success": false, "error": e}),
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The write key of a request: HTTP basic auth's user name, else the
/// body's `writeKey`.
fn write_key_of(headers: &HeaderMap, body: &serde_json::Map<String, Value>) -> Option<String> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest)
        })
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .map(|user_pass| match user_pass.split_once(':') {
            Some((user, _)) => user.to_string(),
            None => user_pass,
        });
    basic.or_else(|| {
        body.get("writeKey")
            .and_then(Value::as_str)
            .map(String::from)
    })
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    Path(kind): Path<String>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        // Over the size limit (413), or a body that could not be read.
        Err(rejection) => {
            let reason = match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => format!(
                    "the body is larger than {} bytes, the source's max_line_bytes",
                    shared.limit
                ),
                _ => rejection.body_text(),
            };
            return answer(rejection.status(), Some(reason));
        }
    };
    let batch = matches!(kind.as_str(), "batch" | "import");
    if !batch && !TYPED.contains(&kind.as_str()) {
        return answer(
            StatusCode::NOT_FOUND,
            Some(format!(
                "unknown endpoint /v1/{kind}; expected /v1/track, /v1/page, /v1/screen, /v1/identify, /v1/alias, /v1/group, /v1/batch or /v1/import"
            )),
        );
    }
    let mut message = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(o)) => o,
        Ok(v) => {
            return answer(
                StatusCode::BAD_REQUEST,
                Some(format!(
                    "expected a JSON object, found {}",
                    crate::time::parse::json_type(&v)
                )),
            )
        }
        Err(e) => {
            // serde_json's message ends with its own position.
            let text = e.to_string();
            let msg = text
                .rfind(" at line ")
                .map_or(text.as_str(), |i| &text[..i]);
            return answer(
                StatusCode::BAD_REQUEST,
                Some(format!(
                    "invalid JSON at line {} column {}: {msg}",
                    e.line(),
                    e.column()
                )),
            );
        }
    };
    if let Some(key) = &shared.write_key {
        if write_key_of(&headers, &message).as_deref() != Some(key.as_str()) {
            let mut r = answer(
                StatusCode::UNAUTHORIZED,
                Some(
                    "missing or wrong write key: send it as the user name of HTTP basic auth"
                        .into(),
                ),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"segflow\""),
            );
            return r;
        }
    }
    message.remove("writeKey");
    // As Segment's API does: the time the request arrived, which a message
    // without a time of its own (`timestamp`, `originalTimestamp`,
    // `sentAt`) is at (for a batch, on the envelope its members fall back
    // to).
    if message.get("receivedAt").is_none_or(Value::is_null) {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        message.insert("receivedAt".into(), Value::String(now));
    }
    if batch {
        if !matches!(message.get("batch"), Some(Value::Array(_))) {
            return answer(
                StatusCode::BAD_REQUEST,
                Some("field `batch`: expected an array of messages".into()),
            );
        }
    } else {
        match message.get("type") {
            None => {
                message.insert("type".into(), Value::String(kind.clone()));
            }
            Some(Value::String(t)) if t.eq_ignore_ascii_case(&kind) => {}
            Some(other) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    Some(format!(
                        "field `type`: {other} does not match the endpoint /v1/{kind}"
                    )),
                )
            }
        }
    }
    let line = Value::Object(message).to_string().into_bytes();
    let (taken, answered) = oneshot::channel();
    let request = Request {
        line,
        peer: peer.to_string(),
        taken,
    };
    match shared.tx.try_send(request) {
        Ok(()) => (shared.wake)(),
        Err(mpsc::error::TrySendError::Full(_)) => {
            (shared.wake)();
            let mut r = answer(
                StatusCode::TOO_MANY_REQUESTS,
                Some("the engine is behind: send again in a moment".into()),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return r;
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                Some("the engine is stopping".into()),
            )
        }
    }
    match answered.await {
        Ok(()) => answer(StatusCode::OK, None),
        Err(_) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            Some("the engine stopped before it took the request in".into()),
        ),
    }
}

impl LineSource for HttpLines {
    fn next_line(&mut self) -> io::Result<Next> {
        // The reader handles each line before it asks for the next one.
        for taken in self.owed.drain(..) {
            let _ = taken.send(());
        }
        match self.rx.try_recv() {
            Ok(r) => {
                self.requests += 1;
                let offset = self.bytes;
                self.bytes += r.line.len() as u64 + 1;
                self.owed.push(r.taken);
                Ok(Next::Line {
                    bytes: r.line,
                    line: self.requests,
                    offset,
                    peer: Some(r.peer),
                })
            }
            Err(mpsc::error::TryRecvError::Empty) => Ok(Next::Pending),
            Err(mpsc::error::TryRecvError::Disconnected) => Ok(Next::End),
        }
    }
    fn position(&self) -> u64 {
        self.requests
    }
    fn is_live(&self) -> bool {
        true
    }
    fn wakes_on_input(&self) -> bool {
        true
    }
}

impl Drop for HttpLines {
    fn drop(&mut self) {
        // What was handed out was handled, unless the reader is unwinding
        // from a panic (then it is answered 503, as the rest is when the
        // queue closes).
        if std::thread::panicking() {
            return;
        }
        for taken in self.owed.drain(..) {
            let _ = taken.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    /// `(status, body)` of a POST of `body` to `path`, with basic auth as
    /// `key` if given.
    fn post(addr: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
        let mut req = agent()
            .post(format!("http://{addr}{path}"))
            .content_type("application/json");
        if let Some(k) = key {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{k}:"));
            req = req.header("Authorization", format!("Basic {auth}"));
        }
        let mut resp = req.send(body).unwrap();
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap())
    }

    fn free_addr() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    /// The next line, waiting up to 10 s for one.
    fn next(lines: &mut HttpLines) -> Next {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match lines.next_line().unwrap() {
                Next::Pending if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => return other,
            }
        }
    }

    #[test]
    fn a_request_is_answered_once_the_engine_took_it() {
        let addr = free_addr();
        let mut lines = HttpLines::listen(&addr, Some("wk".into()), 4096, None).unwrap();
        let a = addr.clone();
        let client = std::thread::spawn(move || {
            post(
                &a,
                "/v1/track",
                Some("wk"),
                r#"{"event":"Product Viewed","userId":"u1","timestamp":"2026-03-01T12:00:00Z"}"#,
            )
        });
        let Next::Line {
            bytes, line, peer, ..
        } = next(&mut lines)
        else {
            panic!("no line")
        };
        // Taken but not yet handled: no answer yet.
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !client.is_finished(),
            "answered before the engine handled it"
        );
        let msg: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(msg["type"], "track", "the endpoint's type is added");
        assert!(
            msg["receivedAt"].as_str().unwrap().ends_with('Z'),
            "and the time it arrived"
        );
        assert_eq!(msg["event"], "Product Viewed");
        assert_eq!(line, 1);
        assert!(peer.unwrap().starts_with("127.0.0.1:"));
        // Asking for the next line means this one was handled.
        assert_eq!(lines.next_line().unwrap(), Next::Pending);
        assert_eq!(client.join().unwrap(), (200, r#"{"success":true}"#.into()));
    }

    #[test]
    fn bad_requests_get_their_status_and_reason() {
        let addr = free_addr();
        let mut lines = HttpLines::listen(&addr, Some("wk".into()), 256, None).unwrap();
        let ok = r#"{"userId":"u1","timestamp":1}"#;
        let (s, body) = post(&addr, "/v1/page", None, ok);
        assert_eq!(s, 401, "{body}");
        assert_eq!(post(&addr, "/v1/page", Some("other"), ok).0, 401);
        let (s, body) = post(&addr, "/v1/page", Some("wk"), "{\"userId\":");
        assert_eq!(s, 400);
        assert!(body.contains("invalid JSON at line 1 column"), "{body}");
        let (s, body) = post(&addr, "/v1/page", Some("wk"), "[1]");
        assert_eq!(
            (s, body.contains("expected a JSON object, found array")),
            (400, true),
            "{body}"
        );
        let (s, body) = post(&addr, "/v1/page", Some("wk"), r#"{"type":"track"}"#);
        assert_eq!(s, 400);
        assert!(
            body.contains("does not match the endpoint /v1/page"),
            "{body}"
        );
        let (s, body) = post(&addr, "/v1/batch", Some("wk"), r#"{"batch":{}}"#);
        assert_eq!(
            (s, body.contains("expected an array")),
            (400, true),
            "{body}"
        );
        assert_eq!(post(&addr, "/v1/click", Some("wk"), ok).0, 404);
        let big = format!(
            r#"{{"userId":"u1","timestamp":1,"properties":{{"x":"{}"}}}}"#,
            "a".repeat(300)
        );
        let (s, body) = post(&addr, "/v1/page", Some("wk"), &big);
        assert_eq!(s, 413);
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["success"], false);
        assert_eq!(
            answer["error"],
            "the body is larger than 256 bytes, the source's max_line_bytes"
        );
        // The write key may be in the body instead; it is not passed on.
        let a = addr.clone();
        let client = std::thread::spawn(move || {
            post(
                &a,
                "/v1/batch",
                None,
                r#"{"writeKey":"wk","batch":[{"type":"page","userId":"u1","timestamp":1}]}"#,
            )
        });
        let Next::Line { bytes, .. } = next(&mut lines) else {
            panic!()
        };
        let msg: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(msg.get("writeKey").is_none(), "{msg}");
        assert_eq!(msg["batch"][0]["type"], "page");
        assert_eq!(lines.next_line().unwrap(), Next::Pending);
        assert_eq!(client.join().unwrap().0, 200);
    }

    #[test]
    fn a_full_queue_is_a_429_and_a_stopped_engine_a_503() {
        let addr = free_addr();
        let lines = HttpLines::listen_queued(&addr, None, 4096, None, 1).unwrap();
        let body = r#"{"userId":"u1","timestamp":1}"#;
        let a = addr.clone();
        // Takes the one place in the queue and waits there.
        let waiting = std::thread::spawn(move || post(&a, "/v1/page", None, body));
        std::thread::sleep(Duration::from_millis(300));
        let (s, b) = post(&addr, "/v1/page", None, body);
        assert_eq!(s, 429, "{b}");
        // The engine stops: the waiting request learns it was not taken.
        drop(lines);
        let (s, b) = waiting.join().unwrap();
        assert_eq!(s, 503, "{b}");
    }

    #[test]
    fn a_port_in_use_is_an_error_at_start() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = HttpLines::listen(&addr, None, 4096, None)
            .err()
            .expect("bound twice");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
