//! A webhook segment output: diffs POSTed as JSON batches to an
//! `http://`/`https://` URL (`--output https://hooks.example.com/segflow`).
//!
//! The commit stage writes diff lines to it as to a file and flushes once
//! per round of committed times; a flush delivers what was written, in
//! order, in requests of at most `max_batch` diffs:
//!
//! ```text
//! POST /segflow
//! Content-Type: application/json
//! X-Segflow-Batch: 5f0c1e2a9b7d3c41
//! X-Segflow-Signature: t=1772366400,v1=3d5e…
//!
//! {"batch_id":"5f0c1e2a9b7d3c41","diffs":[{"time":1772366400000,"segment":"vip","profile":"user:u1","diff":1}]}
//! ```
//!
//! * **Order**: one request at a time, each batch after the one before it
//!   was answered, so every profile's diffs arrive in time order (a batch
//!   that failed for good is the exception: later ones still go).
//! * **Retries**: a connection error, a timeout, `408`, `429` or a `5xx` is
//!   tried again after `backoff`, doubling up to 30 s (a `Retry-After` in
//!   seconds is honoured up to 60 s), `max_attempts` times in all; any other
//!   status is final. Meanwhile the commit stage waits: the engine slows
//!   down rather than buffer without bound. After SIGTERM a failed attempt
//!   is not retried, so a stop never waits on a receiver that is down.
//! * **Failures**: a batch that fails for good is appended to the `failed`
//!   file, one JSON line `{"failed_at", "url", "attempts", "status",
//!   "error", "batch_id", "diffs"}`, with a warning in the log, and the run
//!   goes on. A failed file that cannot be written stops the run.
//! * **Signature**: with the secret in the environment variable
//!   `secret_env`, `X-Segflow-Signature: t=UNIX_SECONDS,v1=HEX`, where HEX
//!   is HMAC-SHA256 ([RFC 2104]) with the secret as key over
//!   `UNIX_SECONDS.BODY`, as Stripe signs its webhooks: a receiver
//!   recomputes it and rejects old timestamps.
//! * **Delivery**: at least once. `batch_id` is a hash of the batch's
//!   diffs, the same for the same diffs, and each diff carries its time: a
//!   receiver that keeps what it has seen drops what a restart sends again
//!   (the diffs after the last checkpoint).
//!
//! [RFC 2104]: https://www.rfc-editor.org/rfc/rfc2104

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::spec::WebhookSpec;

/// The longest wait between attempts that `backoff` doubles up to.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How one batch ended.
enum Outcome {
    Delivered,
    /// Failed for good: `(status if any, reason, attempts)`.
    Failed(Option<u16>, String, u32),
}

/// The webhook output (a [`Write`]: lines in, batches out at each flush).
pub struct Webhook {
    url: String,
    agent: ureq::Agent,
    secret: Option<Vec<u8>>,
    spec: WebhookSpec,
    failed: File,
    shutdown: Option<Arc<AtomicBool>>,
    /// Lines written since the last flush.
    pending: super::LineBuffer,
    /// Batches delivered so far.
    pub delivered: u64,
    /// Batches that failed for good so far (shared with the summary).
    pub failures: Arc<std::sync::atomic::AtomicU64>,
    /// A batch failed while the run was stopping: the receiver is not
    /// tried again before the run ends.
    given_up: bool,
}

impl Webhook {
    /// A webhook output to `url`; batches that fail for good go to
    /// `failed` (opened for appending). The secret is read from the
    /// environment variable `spec.secret_env` now.
    pub fn new(
        url: &str,
        spec: &WebhookSpec,
        failed: File,
        shutdown: Option<Arc<AtomicBool>>,
    ) -> Webhook {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A redirect of a POST is followed as a GET without the body
            // (301, 302, 303): never followed, it is a final failure that
            // names the URL to give instead.
            .max_redirects(0)
            .timeout_global(Some(Duration::from_millis(spec.timeout_ms)))
            .build()
            .into();
        let secret = std::env::var(&spec.secret_env)
            .ok()
            .filter(|s| !s.is_empty())
            .map(String::into_bytes);
        if secret.is_none() {
            tracing::warn!(
                "webhook {url}: {} is not set: requests are not signed",
                spec.secret_env
            );
        }
        Webhook {
            url: url.to_string(),
            agent,
            secret,
            spec: spec.clone(),
            failed,
            shutdown,
            pending: Default::default(),
            delivered: 0,
            failures: Arc::default(),
            given_up: false,
        }
    }

    fn stopping(&self) -> bool {
        self.shutdown
            .as_ref()
            .is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// One batch, tried until it is delivered or fails for good.
    fn deliver(&self, body: &str, batch_id: &str) -> Outcome {
        let mut wait = Duration::from_millis(self.spec.backoff_ms).min(MAX_BACKOFF);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (retry, status, reason, retry_after) = match self.attempt(body, batch_id) {
                Ok((status, _)) if (200..300).contains(&status) => return Outcome::Delivered,
                Ok((status, answer)) => {
                    let retry = matches!(status, 408 | 429 | 500..=599);
                    let after = answer.1;
                    (retry, Some(status), answer.0, after)
                }
                Err(e) => (true, None, e, None),
            };
            if !retry || attempt >= self.spec.max_attempts || self.stopping() {
                return Outcome::Failed(status, reason, attempt);
            }
            let pause = retry_after.map_or(wait, |a| a.min(MAX_RETRY_AFTER));
            tracing::debug!(attempt, ?status, %reason, "webhook {}: trying again in {pause:?}", self.url);
            // In slices, so that a stop request ends the wait.
            let until = std::time::Instant::now() + pause;
            while std::time::Instant::now() < until {
                if self.stopping() {
                    return Outcome::Failed(status, reason, attempt);
                }
                std::thread::sleep(Duration::from_millis(50).min(pause));
            }
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }

    /// One request: `(status, (a short reason, Retry-After))`, or the
    /// transport error.
    #[allow(clippy::type_complexity)]
    fn attempt(
        &self,
        body: &str,
        batch_id: &str,
    ) -> Result<(u16, (String, Option<Duration>)), String> {
        let mut req = self
            .agent
            .post(&self.url)
            .content_type("application/json")
            .header("X-Segflow-Batch", batch_id);
        if let Some(secret) = &self.secret {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            req = req.header(
                "X-Segflow-Signature",
                format!("t={t},v1={}", signature(secret, t, body)),
            );
        }
        match req.send(body) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                // The start of the answer's body (any length, any bytes).
                let mut head = Vec::new();
                let _ = std::io::Read::read_to_end(
                    &mut std::io::Read::take(resp.body_mut().as_reader(), 512),
                    &mut head,
                );
                let mut reason =
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&head).trim());
                if (300..400).contains(&status) {
                    let to = resp
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?");
                    reason = format!(
                        "HTTP {status}: a redirect to {to}, which is not followed (a POST redirected may lose its body): give that URL as the output"
                    );
                }
                Ok((status, (reason, retry_after)))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Appends a failed batch to the failed file.
    fn record_failure(
        &mut self,
        lines: &[&[u8]],
        batch_id: &str,
        (status, reason, attempts): (Option<u16>, String, u32),
    ) -> io::Result<()> {
        self.failures.fetch_add(1, Ordering::SeqCst);
        tracing::warn!(
            "webhook {}: batch {batch_id} of {} diffs failed after {attempts} attempt(s) ({reason}); written to {}",
            self.url,
            lines.len(),
            self.spec.failed
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut line = format!(
            "{{\"failed_at\":{now},\"url\":{},\"attempts\":{attempts},\"status\":{},\"error\":{},\"batch_id\":\"{batch_id}\",\"diffs\":[",
            serde_json::Value::from(self.url.as_str()),
            status.map_or("null".to_string(), |s| s.to_string()),
            serde_json::Value::from(reason)
        )
        .into_bytes();
        join_into(&mut line, lines);
        line.extend_from_slice(b"]}\n");
        self.failed.write_all(&line)?;
        self.failed.flush()
    }
}

/// HMAC-SHA256 of `T.BODY` with `secret`, in lower-case hex.
pub fn signature(secret: &[u8], t: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn join_into(out: &mut Vec<u8>, lines: &[&[u8]]) {
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(l);
    }
}

impl Write for Webhook {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.push(buf);
        Ok(buf.len())
    }

    /// Delivers every complete line written since the last flush.
    fn flush(&mut self) -> io::Result<()> {
        let pending = self.pending.take_complete();
        let lines: Vec<&[u8]> = super::lines_of(&pending).collect();
        for chunk in lines.chunks(self.spec.max_batch.max(1)) {
            let mut diffs = Vec::new();
            join_into(&mut diffs, chunk);
            let batch_id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&diffs));
            let body = format!(
                "{{\"batch_id\":\"{batch_id}\",\"diffs\":[{}]}}",
                String::from_utf8_lossy(&diffs)
            );
            let outcome = if self.given_up {
                Outcome::Failed(
                    None,
                    "not sent: the run was stopping and the receiver had failed".to_string(),
                    0,
                )
            } else {
                self.deliver(&body, &batch_id)
            };
            match outcome {
                Outcome::Delivered => self.delivered += 1,
                Outcome::Failed(status, reason, attempts) => {
                    self.given_up = self.stopping();
                    self.record_failure(chunk, &batch_id, (status, reason, attempts))?
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_time_dot_body() {
        // The HMAC is RFC 4231's (test case 2: key "Jefe").
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let rfc: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            rfc,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // The signature is that HMAC over "T.BODY".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        mac.update(b"1.{\"a\":1}");
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(signature(b"k", 1, "{\"a\":1}"), expected);
    }
}
