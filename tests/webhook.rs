//! The webhook output against a real HTTP receiver on loopback: one that
//! fails now and then (503, 429 with Retry-After, a dropped connection)
//! gets every diff exactly once and in the engine's order, each request
//! signed; one that always fails, and one that is not there, leave every
//! diff in the failed-batch file, and the run still ends.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use segflow::spec::load_spec;
use segflow::{Engine, Input, Output};
use serde_json::Value;
use sha2::Sha256;

/// What the receiver saw: every request's status, and the batches it took.
#[derive(Default)]
struct Seen {
    requests: u64,
    statuses: Vec<u16>,
    batches: Vec<Value>,
}

type Shared = Arc<(Mutex<Seen>, String, Behaviour)>;

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Fails now and then: 503 every third request, 429 (Retry-After: 1)
    /// on the fifth, and checks every signature.
    Flaky,
    /// Always 500.
    Broken,
    /// Always a 301 redirect elsewhere (a POST followed as a GET would
    /// lose its body).
    Redirect,
}

async fn receive(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let (seen, secret, behaviour) = &*shared;
    let mut seen = seen.lock().unwrap();
    seen.requests += 1;
    let n = seen.requests;
    let status = match behaviour {
        Behaviour::Broken => StatusCode::INTERNAL_SERVER_ERROR,
        Behaviour::Redirect => StatusCode::MOVED_PERMANENTLY,
        Behaviour::Flaky if n == 5 => StatusCode::TOO_MANY_REQUESTS,
        Behaviour::Flaky if n % 3 == 0 => StatusCode::SERVICE_UNAVAILABLE,
        Behaviour::Flaky => {
            // Check the signature: t=SECONDS,v1=HMAC-SHA256(secret, "t.body").
            let sig = headers
                .get("x-segflow-signature")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let (t, v1) = sig
                .split_once(",v1=")
                .map(|(t, v)| (t.trim_start_matches("t="), v))
                .unwrap_or(("", ""));
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(format!("{t}.").as_bytes());
            mac.update(&body);
            let expected: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if v1 != expected {
                StatusCode::UNAUTHORIZED
            } else {
                let batch: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(
                    headers.get("x-segflow-batch").unwrap().to_str().unwrap(),
                    batch["batch_id"].as_str().unwrap()
                );
                seen.batches.push(batch);
                StatusCode::OK
            }
        }
    };
    seen.statuses.push(status.as_u16());
    let mut r = (status, "").into_response();
    if status == StatusCode::MOVED_PERMANENTLY {
        r.headers_mut().insert(
            "location",
            axum::http::HeaderValue::from_static("http://127.0.0.1:1/elsewhere"),
        );
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    }
    r
}

/// Starts a receiver on a free loopback port: its URL and what it sees.
fn receiver(secret: &str, behaviour: Behaviour) -> (String, Shared) {
    let shared: Shared = Arc::new((Mutex::default(), secret.to_string(), behaviour));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/hooks/segflow", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hooks/segflow", post(receive))
        .with_state(Arc::clone(&shared));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (url, shared)
}

mod common;
use common::{generated, Generated as Data};

fn data() -> Data {
    generated(3_000, 5, None)
}

/// The shipped dataflow on `d` with `output`, `max_batch` diffs per
/// request, retries after 10 ms; returns the path of the failed file.
fn run(
    d: &Data,
    dir: &Path,
    output: Output,
    secret_env: &str,
    max_attempts: u32,
) -> segflow::RunSummary {
    let mut spec = load_spec(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dataflows/ecommerce.toml"
    )))
    .unwrap();
    spec.output = Default::default();
    spec.output.webhook.failed = dir.join("failed.jsonl").display().to_string();
    spec.output.webhook.secret_env = secret_env.to_string();
    spec.output.webhook.max_batch = 7;
    spec.output.webhook.backoff_ms = 10;
    spec.output.webhook.max_attempts = max_attempts;
    let mem = |v: &Vec<String>| Input::Memory(Arc::new(v.clone()));
    Engine::new(spec)
        .input("web", mem(&d.web))
        .unwrap()
        .input("crm", mem(&d.crm))
        .unwrap()
        .input("transactions", mem(&d.txn))
        .unwrap()
        .output(output)
        .dead_letter(dir.join("dead.jsonl"))
        .run(timely::Config::process(2))
        .unwrap()
}

/// The diffs of a plain run, in output order.
fn expected(d: &Data, dir: &Path) -> Vec<Value> {
    let diffs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&diffs);
    run(
        d,
        dir,
        Output::Callback(Arc::new(move |x| sink.lock().unwrap().push(x.to_line()))),
        "SEGFLOW_TEST_UNUSED",
        1,
    );
    let diffs: Vec<Value> = diffs
        .lock()
        .unwrap()
        .iter()
        .map(|l: &String| serde_json::from_str(l).unwrap())
        .collect();
    assert!(diffs.len() > 50, "{}", diffs.len());
    diffs
}

/// The diffs of batches, in order.
fn diffs_of(batches: &[Value]) -> Vec<Value> {
    batches
        .iter()
        .flat_map(|b| b["diffs"].as_array().unwrap().iter().cloned())
        .collect()
}

#[test]
fn a_flaky_receiver_gets_every_diff_once_in_order_and_signed() {
    let d = data();
    let dir = tempfile::tempdir().unwrap();
    let expected = expected(&d, dir.path());
    let secret = "whsec_test_5b1f";
    std::env::set_var("SEGFLOW_TEST_WEBHOOK_SECRET", secret);
    let (url, seen) = receiver(secret, Behaviour::Flaky);
    run(
        &d,
        dir.path(),
        Output::Webhook(url),
        "SEGFLOW_TEST_WEBHOOK_SECRET",
        8,
    );
    let seen = seen.0.lock().unwrap();
    assert_eq!(diffs_of(&seen.batches), expected);
    assert!(seen
        .batches
        .iter()
        .all(|b| b["diffs"].as_array().unwrap().len() <= 7));
    // It failed now and then, was never sent a bad signature, and every
    // failure was tried again.
    assert!(seen.statuses.contains(&503) && seen.statuses.contains(&429));
    assert!(!seen.statuses.contains(&401), "a signature did not check");
    let failed = std::fs::read_to_string(dir.path().join("failed.jsonl")).unwrap_or_default();
    assert_eq!(failed, "", "no batch failed for good");
    // The batch id is a hash of the diffs: distinct batches, distinct ids.
    let mut ids: Vec<&str> = seen
        .batches
        .iter()
        .map(|b| b["batch_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), seen.batches.len());
}

#[test]
fn batches_that_fail_for_good_are_in_the_failed_file_and_the_run_ends() {
    let d = data();
    let dir = tempfile::tempdir().unwrap();
    let expected = expected(&d, dir.path());
    // A receiver that always answers 500, tried twice per batch.
    let (url, seen) = receiver("unused", Behaviour::Broken);
    let summary = run(
        &d,
        dir.path(),
        Output::Webhook(url.clone()),
        "SEGFLOW_TEST_NO_SECRET",
        2,
    );
    let failed_lines = |path: &Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let failed = failed_lines(&dir.path().join("failed.jsonl"));
    assert_eq!(diffs_of(&failed), expected);
    assert!(failed
        .iter()
        .all(|f| f["attempts"] == 2 && f["status"] == 500 && f["url"] == url.as_str()));
    assert_eq!(seen.0.lock().unwrap().requests, 2 * failed.len() as u64);
    // The summary says how many batches failed, and where they are.
    assert_eq!(
        summary.webhook_failed,
        Some((
            failed.len() as u64,
            dir.path().join("failed.jsonl").display().to_string()
        ))
    );
    // Nothing listens: connection errors, tried three times, then failed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let dir2 = tempfile::tempdir().unwrap();
    run(
        &d,
        dir2.path(),
        Output::Webhook(closed),
        "SEGFLOW_TEST_NO_SECRET",
        3,
    );
    let failed = failed_lines(&dir2.path().join("failed.jsonl"));
    assert_eq!(diffs_of(&failed), expected);
    assert!(failed
        .iter()
        .all(|f| f["attempts"] == 3 && f["status"].is_null()));
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("connect"),
        "{}",
        failed[0]
    );
}

#[test]
fn a_url_that_is_not_a_webhook_is_refused_before_the_run_starts() {
    let d = data();
    let dir = tempfile::tempdir().unwrap();
    let refused = |location: &str| -> String {
        let mut spec = load_spec(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dataflows/ecommerce.toml"
        )))
        .unwrap();
        spec.output = Default::default();
        spec.output.webhook.failed = dir.path().join("failed.jsonl").display().to_string();
        let mem = |v: &Vec<String>| Input::Memory(Arc::new(v.clone()));
        Engine::new(spec)
            .input("web", mem(&d.web))
            .unwrap()
            .input("crm", mem(&d.crm))
            .unwrap()
            .input("transactions", mem(&d.txn))
            .unwrap()
            .output(Output::parse(location))
            .run(timely::Config::process(1))
            .err()
            .unwrap_or_else(|| panic!("{location} was taken"))
            .to_string()
    };
    assert!(refused("http://127.0.0.1:99999/hook").contains("not a valid webhook URL"));
    assert!(refused("http://").contains("not a valid webhook URL"));
    let ftp = dir.path().join("x").display().to_string();
    assert!(refused(&format!("ftp:/{ftp}")).contains("looks like a URL"));
    assert!(refused("http:/127.0.0.1/hook").contains("looks like a URL"));
    assert!(
        !Path::new("http:").exists(),
        "no directory made of a mistyped URL"
    );
}

/// A receiver that redirects: never followed (a POST redirected as a GET
/// would arrive without its diffs), every batch failed at once with the
/// redirect's target in the reason.
#[test]
fn a_redirect_is_a_final_failure_naming_its_target() {
    let d = data();
    let dir = tempfile::tempdir().unwrap();
    let expected = expected(&d, dir.path());
    let (url, seen) = receiver("unused", Behaviour::Redirect);
    run(
        &d,
        dir.path(),
        Output::Webhook(url),
        "SEGFLOW_TEST_NO_SECRET",
        5,
    );
    let failed: Vec<Value> = std::fs::read_to_string(dir.path().join("failed.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(diffs_of(&failed), expected);
    assert!(failed
        .iter()
        .all(|f| f["attempts"] == 1 && f["status"] == 301));
    let reason = failed[0]["error"].as_str().unwrap();
    assert!(
        reason.contains("redirect to http://127.0.0.1:1/elsewhere"),
        "{reason}"
    );
    assert_eq!(
        seen.0.lock().unwrap().requests,
        failed.len() as u64,
        "never retried"
    );
}
