//! Helpers shared by the integration tests: clusters, ports, generated
//! data. (Each test crate uses some of them.)
#![allow(dead_code)]

use std::path::Path;

/// A generated data set, as lines.
pub struct Generated {
    /// Web events (malformed lines included).
    pub web: Vec<String>,
    /// CRM records.
    pub crm: Vec<String>,
    /// Transactions.
    pub txn: Vec<String>,
}

/// `events` web events of `seed` (with their CRM records and
/// transactions), spread over `days` if given.
pub fn generated(events: u64, seed: u64, days: Option<u64>) -> Generated {
    let (mut w, mut c, mut t) = (Vec::new(), Vec::new(), Vec::new());
    segflow::generate::generate_to(
        &segflow::generate::GenConfig {
            events,
            seed,
            span_days: days,
            ..Default::default()
        },
        &mut w,
        &mut c,
        &mut t,
    )
    .unwrap();
    let lines = |b: Vec<u8>| -> Vec<String> {
        String::from_utf8(b)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    };
    Generated {
        web: lines(w),
        crm: lines(c),
        txn: lines(t),
    }
}

/// The arguments that make a run process `p` of a two-process cluster
/// whose hosts are in `hostfile`.
pub fn cluster_args(p: usize, hostfile: &Path) -> Vec<String> {
    [
        "-n",
        "2",
        "-p",
        &p.to_string(),
        "-h",
        hostfile.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
