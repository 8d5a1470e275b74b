//! The benchmark still works: `bench/run.sh --selftest` measures native,
//! hapair (a mount and its mirror in a network namespace) and the
//! replication floor (workload b only) with tiny sizes, prints its report
//! and removes everything it created. Not a timed test: no figure is
//! checked, only that every workload produced one.

use hapair_tests::proc::run_bounded;
use hapair_tests::{env, TestDir};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The transport floor's example, built beside the hapair binary by
/// `cargo build --workspace --all-targets`.
fn quic_floor_bin() -> std::path::PathBuf {
    let bin = env::hapair_bin();
    let p = bin
        .parent()
        .unwrap_or(Path::new("."))
        .join("examples/quic_floor");
    assert!(
        p.exists(),
        "{} is missing: build with --all-targets",
        p.display()
    );
    p
}

#[test]
fn bench_selftest_runs_and_cleans_up() {
    let _s = env::serial();
    let logs = TestDir::new("bench-selftest");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut c = Command::new("timeout");
    // TERM first, so that the bench's cleanup runs even if it hangs.
    c.args(["-k", "20", "150", "bash"])
        .arg(root.join("bench/run.sh"))
        .arg("--selftest")
        .env("HAPAIR_BIN", env::hapair_bin())
        .env("QUIC_FLOOR_BIN", quic_floor_bin())
        .env("BENCH_WORKDIR", logs.path());
    let (s, p) = run_bounded("bench", &mut c, logs.path(), Duration::from_secs(200));
    let out = p.stdout();
    assert!(
        s.success(),
        "bench/run.sh --selftest failed ({s:?}):\n{}\n{}",
        p.stdout_tail(30),
        p.stderr_tail(30)
    );
    assert!(
        out.contains("SELFTEST RUN") && out.contains("| hapair sync |"),
        "no report:\n{out}"
    );
    assert!(
        out.contains("selftest: every workload produced results"),
        "{out}"
    );
    let steal = out
        .lines()
        .find(|l| l.contains("CPU time the host took from this machine while each target ran"));
    assert!(
        steal.is_some_and(|l| l.contains("native ext4 ") && l.contains("hapair sync ")),
        "no steal line for every target in the report:\n{out}"
    );
    // Its work directory (under BENCH_WORKDIR) is gone, and nothing it
    // mounted is left.
    let left: Vec<_> = std::fs::read_dir(logs.path())
        .expect("list the test dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("hapair-bench."))
        .collect();
    assert!(left.is_empty(), "the bench left {left:?}");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    assert!(
        !mounts.contains(&logs.path().display().to_string()),
        "the bench left a mount:\n{mounts}"
    );
}
