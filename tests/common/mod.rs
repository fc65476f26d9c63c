//! Helpers shared by the integration tests that start clusters.

use std::path::Path;

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
