//! Event-to-diff latency on a live TCP source: `cargo bench --bench
//! latency`. The measurement is [`segflow::bench::latency`]; see there.
//!
//! Arguments (after `--`): the rates (default `1000 10000`), `--secs N`
//! (default 10) for the measured duration of each run, `--repeat N`
//! (default 3) runs per rate, `--workers N` (default 2), and
//! `--new-profiles` to make every event a new visitor. Prints one JSON line
//! per run and one with the median of each figure over the runs.

use segflow::bench::latency;

// The allocator of the `segflow` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut rates = Vec::new();
    let mut secs = 10;
    let mut workers = 2;
    let mut bench = false;
    let mut new_profiles = false;
    let mut repeat = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|s| s.parse().ok()).expect("--secs N"),
            "--workers" => {
                workers = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--workers N")
            }
            "--repeat" => {
                repeat = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|&n: &usize| n > 0)
                    .expect("--repeat N (N >= 1)")
            }
            "--bench" => bench = true,
            "--new-profiles" => new_profiles = true,
            // Anything else that is not a rate is one of cargo's own flags.
            other => rates.extend(other.parse::<u64>().ok()),
        }
    }
    if !bench {
        // `cargo test --all-targets` runs this without `--bench`: a short
        // smoke run (debug build, a loaded machine: with two seconds of
        // allowed lateness) that fails if any event is lost or late.
        let stats = latency::run(1_000, 1, workers, new_profiles, "2s");
        println!("{}", stats.json("smoke"));
        assert_eq!(
            (stats.missing, stats.late),
            (0, 0),
            "{}",
            stats.json("smoke")
        );
        return;
    }
    if rates.is_empty() {
        rates = vec![1_000, 10_000];
    }
    for rate in rates {
        let runs: Vec<latency::Stats> = (0..repeat)
            .map(|_| {
                let stats = latency::run(rate, secs, workers, new_profiles, "0s");
                println!("{}", stats.json("run"));
                stats
            })
            .collect();
        println!("{}", latency::median(&runs).json("median"));
    }
}
