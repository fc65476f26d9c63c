//! A small shop page rendered on the server, personalized by a running
//! segflow: every page request asks segflow's `/v1/decide` for the
//! visitor's content blocks, and a client-side snippet
//! (`live-block.js`) updates the blocks from the visitor's segment diffs
//! without a reload.
//!
//! ```sh
//! export SEGFLOW_API_TOKEN=$(openssl rand -hex 16)
//! segflow run dataflows/ecommerce.toml --http 127.0.0.1:8080 &
//! cargo run --example shop -- --segflow http://127.0.0.1:8080 --listen 127.0.0.1:3000
//! ```
//!
//! The visitor is a cookie (`visitor`, made up on the first request) whose
//! value is the anonymous id the shop's tracking sends as `anonymous_id`:
//! the page asks for `anon:VALUE`. The API token stays on the server: the
//! browser talks to the shop only, which passes `/events` (the visitor's
//! diff stream) and `/blocks` (the visitor's decisions) on to segflow.
//! When segflow cannot be reached, the page still renders, with each
//! block's fallback.

use std::convert::Infallible;
use std::io::BufRead;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::Value;

/// The shop's settings.
#[derive(Clone)]
struct Shop {
    /// segflow's API, e.g. `http://127.0.0.1:8080`.
    segflow: String,
    token: String,
    /// The content slots the page shows.
    slots: Vec<String>,
    agent: ureq::Agent,
}

const SNIPPET: &str = include_str!("live-block.js");

fn usage() -> ! {
    eprintln!(
        "usage: SEGFLOW_API_TOKEN=TOKEN shop [--segflow http://127.0.0.1:8080] [--listen 127.0.0.1:3000] [--slots home_hero,checkout_offer]"
    );
    std::process::exit(2)
}

fn main() {
    let mut segflow = "http://127.0.0.1:8080".to_string();
    let mut listen = "127.0.0.1:3000".to_string();
    let mut slots = "home_hero,checkout_offer".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--segflow" => segflow = value.trim_end_matches('/').to_string(),
            "--listen" => listen = value,
            "--slots" => slots = value,
            _ => usage(),
        }
    }
    let Ok(token) = std::env::var("SEGFLOW_API_TOKEN") else {
        eprintln!("shop: set SEGFLOW_API_TOKEN to the token of segflow's API");
        std::process::exit(2)
    };
    let shop = Shop {
        segflow,
        token,
        slots: slots
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_millis(500)))
            .build()
            .into(),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/blocks", get(blocks))
        .route("/events", get(events))
        .route(
            "/live-block.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], SNIPPET) }),
        )
        .with_state(shop);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("shop: cannot listen on {listen}: {e}");
                std::process::exit(1)
            }
        };
        println!("shop on http://{}", listener.local_addr().expect("address"));
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("shop: {e}");
            std::process::exit(1)
        }
    });
}

/// The visitor's cookie value, and whether it was just made up.
fn visitor(headers: &HeaderMap) -> (String, bool) {
    let known = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix("visitor="))
        .find(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    match known {
        Some(v) => (v.to_string(), false),
        None => {
            let bytes: [u8; 8] = rand::random();
            (bytes.iter().map(|b| format!("{b:02x}")).collect(), true)
        }
    }
}

/// segflow's decisions for `slots` and the visitor, or `None` if segflow
/// did not answer.
async fn decide(shop: &Shop, slots: &str, visitor: &str) -> Option<Value> {
    let url = format!(
        "{}/v1/decide?slots={}&id=anon:{visitor}",
        shop.segflow,
        urlencode(slots)
    );
    let (agent, token) = (shop.agent.clone(), shop.token.clone());
    tokio::task::spawn_blocking(move || {
        let mut r = agent
            .get(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        serde_json::from_slice(&r.body_mut().read_to_vec().ok()?).ok()
    })
    .await
    .ok()
    .flatten()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One block's HTML: the headline (or text) and the link of its content;
/// hidden when there is nothing to show. When segflow cannot be asked,
/// the first block (`main`) shows a generic welcome, the others nothing.
fn block(slot: &str, decision: Option<&Value>, main: bool) -> String {
    let fallback = match main {
        true => {
            serde_json::json!({"headline": "Welcome to the shop", "cta": "Browse bestsellers", "link": "/bestsellers"})
        }
        false => Value::Null,
    };
    let (variant, content) = match decision {
        Some(d) => (d["variant"].as_str().unwrap_or("none"), &d["content"]),
        None => ("fallback", &fallback),
    };
    let text = match content {
        Value::String(s) => s.as_str(),
        c => c["headline"].as_str().or(c["text"].as_str()).unwrap_or(""),
    };
    let link = content["link"].as_str().unwrap_or("");
    let cta = content["cta"].as_str().unwrap_or(link);
    let hidden = if text.is_empty() && link.is_empty() {
        " hidden"
    } else {
        ""
    };
    format!(
        "<section class=\"block\" data-segflow-slot=\"{slot}\" data-variant=\"{variant}\"{hidden}><h2 data-field=\"headline\">{}</h2><a data-field=\"link\" href=\"{}\">{}</a></section>",
        escape(text),
        escape(link),
        escape(cta)
    )
}

async fn page(State(shop): State<Shop>, headers: HeaderMap) -> Response {
    let (visitor, new) = visitor(&headers);
    let decided = decide(&shop, &shop.slots.join(","), &visitor).await;
    let blocks: String = shop
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            block(
                s,
                decided.as_ref().map(|d| &d["decisions"][s.as_str()]),
                i == 0,
            )
        })
        .collect();
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>The shop</title>
<style>body{{font:16px system-ui,sans-serif;max-width:50rem;margin:2rem auto}}.block{{border:1px solid #ddd;border-radius:8px;padding:1rem;margin:1rem 0}}</style></head>
<body><h1>The shop</h1><p>visitor <code>anon:{visitor}</code></p>{blocks}<script src="/live-block.js"></script></body></html>"#
    );
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response();
    if new {
        if let Ok(v) = format!("visitor={visitor}; Path=/; SameSite=Lax; HttpOnly").parse() {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    r
}

#[derive(serde::Deserialize)]
struct Slots {
    slots: Option<String>,
}

async fn blocks(State(shop): State<Shop>, headers: HeaderMap, Query(q): Query<Slots>) -> Response {
    let (visitor, _) = visitor(&headers);
    let slots = q.slots.unwrap_or_else(|| shop.slots.join(","));
    match decide(&shop, &slots, &visitor).await {
        Some(d) => ([(header::CONTENT_TYPE, "application/json")], d.to_string()).into_response(),
        None => (StatusCode::BAD_GATEWAY, "segflow did not answer").into_response(),
    }
}

/// The visitor's diff stream, passed on line by line (server-sent events).
/// Each open page holds one of segflow's streams (it takes 256 at once): a
/// busy shop would rather hold one stream and fan it out to its pages.
/// When segflow does not answer, the page gets a 503 and its snippet
/// tries again later.
async fn events(State(shop): State<Shop>, headers: HeaderMap) -> Response {
    let (visitor, _) = visitor(&headers);
    let url = format!("{}/v1/diffs/stream?id=anon:{visitor}", shop.segflow);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let (opened_tx, opened) = tokio::sync::oneshot::channel::<bool>();
    let token = shop.token.clone();
    std::thread::spawn(move || {
        // The stream lives as long as the browser listens: no overall
        // timeout (segflow sends a comment line every 5 s, so a page that
        // went away is noticed within 5 s).
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let resp = match agent
            .get(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .call()
        {
            Ok(r) if r.status() == 200 => {
                let _ = opened_tx.send(true);
                r
            }
            _ => {
                let _ = opened_tx.send(false);
                return;
            }
        };
        for line in std::io::BufReader::new(resp.into_body().into_reader()).lines() {
            let Ok(mut line) = line else { return };
            line.push('\n');
            if tx.blocking_send(Bytes::from(line)).is_err() {
                return; // the browser went away
            }
        }
    });
    if !opened.await.unwrap_or(false) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "15")],
            "segflow's diff stream is not available",
        )
            .into_response();
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
