//! Concurrent waits for the mirror: several writers, each with its own file,
//! make durability points (sync mode: fsync) or mutating calls (strict mode)
//! at the same time. Their requests are then answered from the mirror's
//! acknowledgements rather than by blocked FUSE workers, concurrent
//! durability points share barriers, and the mirror syncs several barriers
//! at once (group commit). None of that may let a call return before the
//! mirror covers *its own* data: after a kill -9 of the mount at a random
//! moment, every record that any writer acknowledged must be on the mirror,
//! intact, as a prefix of that writer's records.
//!
//! Seeds are printed; set HAPAIR_TEST_SEED to replay one.

use hapair_tests::env::{self, Rng};
use hapair_tests::records::{check_records, read_ack_log};
use hapair_tests::{Harness, MountOpts, Proc};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const RECWRITER: &str = env!("CARGO_BIN_EXE_recwriter");
const WRITERS: u64 = 4;

fn spawn_writer(h: &Harness, i: u64, ack_mode: &str, seed: u64, ack_log: &Path) -> Proc {
    let mut c = Command::new(RECWRITER);
    c.arg("write")
        .arg("--file")
        .arg(h.dir.join(format!("records-{i}")))
        .arg("--ack-log")
        .arg(ack_log)
        .args(["--mode", ack_mode, "--duration-ms", "30000"])
        .args(["--seed", &seed.to_string()])
        .args(["--min-size", "1", "--max-size", "20000"]);
    Proc::spawn(&format!("recwriter-{i}"), &mut c, &h.logs)
}

fn wait_first_ack(ack_log: &Path, w: &mut Proc) {
    let end = Instant::now() + Duration::from_secs(20);
    while read_ack_log(ack_log).unwrap_or_else(|e| panic!("{e}")) == 0 {
        if let Some(s) = w.try_wait() {
            panic!(
                "recwriter exited ({s:?}) before its first ack; stderr:\n{}",
                w.stderr_tail(10)
            );
        }
        assert!(Instant::now() < end, "no ack within 20 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn concurrent_trials(mode: &str, ack_mode: &str, trials: u64) {
    let _s = env::serial();
    let base = env::seed();
    eprintln!("concurrent {mode}/{ack_mode}: base seed {base} (HAPAIR_TEST_SEED={base} to replay)");
    let mut rng = Rng(base);
    for t in 0..trials {
        let mut h = Harness::new(&format!("group-{mode}-{t}"));
        h.start_mirror();
        h.mount(&MountOpts::mode(mode));
        let seeds: Vec<u64> = (0..WRITERS)
            .map(|i| base.wrapping_add(t * WRITERS + i))
            .collect();
        let logs: Vec<_> = (0..WRITERS)
            .map(|i| h.tmp().join(format!("acks-{i}")))
            .collect();
        let mut ws: Vec<Proc> = (0..WRITERS)
            .map(|i| spawn_writer(&h, i, ack_mode, seeds[i as usize], &logs[i as usize]))
            .collect();
        for (w, log) in ws.iter_mut().zip(&logs) {
            wait_first_ack(log, w);
        }
        let delay = rng.range(0, 1500);
        std::thread::sleep(Duration::from_millis(delay));
        h.kill_mount();
        for w in &mut ws {
            w.wait_or_kill(Duration::from_secs(30));
        }
        let mut total = 0;
        for i in 0..WRITERS as usize {
            let acked = read_ack_log(&logs[i]).unwrap_or_else(|e| panic!("{e}"));
            total += acked;
            let f = h.mirror_dir.join(format!("records-{i}"));
            let files = if f.exists() { vec![f] } else { Vec::new() };
            match check_records(&files, seeds[i], acked) {
                Ok(r) => eprintln!(
                    "trial {t} writer {i} (seed {}): acked {acked}, mirror holds 1..={}",
                    seeds[i], r.present
                ),
                Err(errs) => panic!(
                    "trial {t} writer {i} (seed {}, {mode}/{ack_mode}): killed after {delay} ms \
                     with {acked} acked; the mirror's records are wrong:\n{}",
                    seeds[i],
                    errs.join("\n")
                ),
            }
        }
        eprintln!("trial {t}: killed after {delay} ms; {total} records acknowledged in all");
    }
}

/// Four writers fsync concurrently (sync mode).
#[test]
fn crash_sync_concurrent_fsyncs() {
    concurrent_trials("sync", "fsync", 3);
}

/// Four writers write concurrently in strict mode, where every write waits
/// for the mirror to apply it.
#[test]
fn crash_strict_concurrent_writes() {
    concurrent_trials("strict", "write", 2);
}
