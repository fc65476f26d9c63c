//! Fault injection for the crash tests (`tests/recovery.rs`).
//!
//! With `SEGFLOW_FAULT=POINT:N` in its environment, the process kills
//! itself with SIGKILL, as `kill -9` would (no destructor runs and no
//! buffered output is written), the `N`th time (1-based) it reaches
//! `POINT`. The points:
//!
//! - `state-write-before`, `state-write-after`: just before and just after
//!   a state batch (with its checkpoint) is written to RocksDB;
//! - `segments-half-line`: in the middle of a segment diff's line, after
//!   its first half has been written and flushed to the output;
//! - `dead-half-line`: the same for a dead letter.
//!
//! Without the variable (always, outside tests) every point is one relaxed
//! atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms a fault.
pub const FAULT_VAR: &str = "SEGFLOW_FAULT";

/// The armed fault: `(point, n)`.
fn armed() -> Option<&'static (String, u64)> {
    static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let value = std::env::var(FAULT_VAR).ok()?;
        let (point, n) = value.rsplit_once(':')?;
        Some((point.to_string(), n.parse().ok()?))
    })
    .as_ref()
}

/// Whether the armed fault is due at `point` now (counting this pass).
pub fn due(point: &str) -> bool {
    static PASSES: AtomicU64 = AtomicU64::new(0);
    match armed() {
        Some((armed, n)) if armed == point => PASSES.fetch_add(1, Ordering::Relaxed) + 1 == *n,
        _ => false,
    }
}

/// Kills the process with SIGKILL if the armed fault is due at `point`.
pub fn point(point: &str) {
    if due(point) {
        kill();
    }
}

/// Kills the process with SIGKILL, at once.
pub fn kill() -> ! {
    // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL to oneself is delivered before kill(2) returns.
    std::process::abort()
}
