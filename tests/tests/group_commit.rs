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
//! Also early barriers: an application that fsyncs after every write gets
//! the barrier recorded with the write, before it asks; each fsync must
//! still return only once the mirror holds everything written before it,
//! also when the application changes its pattern under the guess.
//!
//! Seeds are printed; set HAPAIR_TEST_SEED to replay one.

use hapair_tests::env::{self, Rng};
use hapair_tests::records::{check_records, read_ack_log};
use hapair_tests::{Harness, MountOpts, Proc};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
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

/// A 4 KiB block saying which write of the test it is.
fn block(n: u64) -> Vec<u8> {
    let mut b = n.to_le_bytes().repeat(512);
    b[0] = 0xeb;
    b
}

/// The application's writes and fsyncs: `writes` blocks, then an fsync,
/// `rounds` times. After each fsync, the mirror must already hold every
/// block written so far (it applied them before acknowledging the barrier
/// that the fsync waited for). Returns the next block number.
fn write_fsync_rounds(h: &Harness, f: &std::fs::File, first: u64, rounds: u64, writes: u64) -> u64 {
    let mut n = first;
    for r in 0..rounds {
        for _ in 0..writes {
            f.write_all_at(&block(n), n * 4096).unwrap();
            n += 1;
        }
        f.sync_all().unwrap();
        let m = std::fs::read(h.mirror_dir.join("log")).unwrap_or_default();
        for k in n - writes..n {
            let at = (k * 4096) as usize;
            assert!(
                m.get(at..at + 4096) == Some(&block(k)[..]),
                "round {r} of {writes} write(s) per fsync: block {k} is not on the mirror \
                 when the fsync after it returned"
            );
        }
    }
    n
}

/// A sync mount replicating to a mirror, and a new file `log` in it, open
/// for reading and writing.
fn sync_mount_with_log(name: &str) -> (Harness, std::fs::File) {
    let mut h = Harness::new(name);
    h.start_mirror();
    h.mount(&MountOpts::mode("sync"));
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(h.dir.join("log"))
        .unwrap();
    (h, f)
}

fn status_u64(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("status.json has no number {field}: {v}"))
}

/// Waits (up to 5 s) until status.json's counter `field` reaches `at_least`,
/// then prints and returns (early barriers, reused).
fn wait_early(h: &Harness, what: &str, field: &str, at_least: u64) -> (u64, u64) {
    let s = h
        .wait_status(Duration::from_secs(5), |v| status_u64(v, field) >= at_least)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = (
        status_u64(&s, "early_barriers"),
        status_u64(&s, "early_barriers_reused"),
    );
    eprintln!("{what}: {} early barriers in all, {} reused", got.0, got.1);
    got
}

/// Early barriers: after a few rounds of one write then one fsync, each
/// write is followed by a barrier recorded at once, and each fsync reuses
/// it (status.json counts both). Then the application writes twice per
/// fsync: the guess made after the first write no longer covers the second,
/// and the fsync must not take it (it records its own barrier); later the
/// new pattern is guessed in turn. Then irregular counts, then two files
/// written and synced interleaved. At every fsync the mirror holds every
/// block written before it.
#[test]
fn early_barriers_are_reused_only_when_they_cover_the_fsync() {
    let _s = env::serial();
    let (mut h, f) = sync_mount_with_log("early-barriers");
    let n = write_fsync_rounds(&h, &f, 0, 100, 1);
    let (guessed, reused) = wait_early(
        &h,
        "one write per fsync, 100 rounds",
        "early_barriers_reused",
        90,
    );
    assert!(
        guessed >= reused && guessed <= 100,
        "{guessed} early barriers, {reused} reused"
    );

    // Two writes per fsync: the first round's guess (after its first write)
    // is wrong; the rounds after it are guessed again once the new count
    // held for a few durability points.
    let n = write_fsync_rounds(&h, &f, n, 60, 2);
    wait_early(
        &h,
        "then two writes per fsync, 60 rounds",
        "early_barriers_reused",
        reused + 50,
    );
    // Irregular writers are not guessed at all, and still covered.
    let mut n = n;
    for writes in [1u64, 3, 2, 5, 1, 4, 2, 3, 1, 2] {
        n = write_fsync_rounds(&h, &f, n, 1, writes);
    }
    // Two writers, each on its own file, interleaved (write A, write B,
    // fsync B, fsync A): each file's pattern is followed apart, so both
    // writes get their barrier, and each fsync still finds the mirror
    // holding its file's block.
    let g = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(h.dir.join("log2"))
        .unwrap();
    let before = status_u64(&h.status().unwrap(), "early_barriers");
    for k in 0..40u64 {
        let b = 1_000_000 + k;
        f.write_all_at(&block(n), n * 4096).unwrap();
        g.write_all_at(&block(b), k * 4096).unwrap();
        g.sync_all().unwrap();
        f.sync_all().unwrap();
        let m = std::fs::read(h.mirror_dir.join("log")).unwrap_or_default();
        let m2 = std::fs::read(h.mirror_dir.join("log2")).unwrap_or_default();
        let at = (n * 4096) as usize;
        let at2 = (k * 4096) as usize;
        assert!(
            m.get(at..at + 4096) == Some(&block(n)[..]),
            "two files, round {k}: log"
        );
        assert!(
            m2.get(at2..at2 + 4096) == Some(&block(b)[..]),
            "two files, round {k}: log2"
        );
        n += 1;
    }
    wait_early(
        &h,
        "then two files, 40 rounds",
        "early_barriers",
        before + 60,
    );
    drop((f, g));
    h.stop_mount(Duration::from_secs(30));
    h.assert_trees_equal(None, &Default::default());
}

/// CPU time the host stole from this machine so far, in clock ticks (the
/// `steal` column of /proc/stat's `cpu` line).
fn stolen_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .expect("cpu line");
    cpu.split_ascii_whitespace()
        .nth(8)
        .and_then(|v| v.parse().ok())
        .expect("steal column")
}

/// While an fsync waits for the mirror, the mount's network thread polls
/// for the acknowledgement (status.json counts the polls and those the
/// acknowledgement ended): at most once per durability point that waits,
/// and, on a host that stole no CPU time meanwhile, at least once (its
/// reading of /proc/stat needs two samples 250 ms apart, hence the pause).
/// Every fsync still finds its block on the mirror.
#[test]
fn fsyncs_poll_for_the_acknowledgement_at_most_once_each() {
    let _s = env::serial();
    let (h, f) = sync_mount_with_log("ack-polls");
    let stolen = stolen_ticks();
    let n = write_fsync_rounds(&h, &f, 0, 10, 1);
    std::thread::sleep(Duration::from_millis(300));
    write_fsync_rounds(&h, &f, n, 100, 1);
    let stolen = stolen_ticks() - stolen;
    let s = h
        .wait_status(Duration::from_secs(5), |v| {
            status_u64(v, "last_seq") >= 110 && v["durable_seq"] == v["last_seq"]
        })
        .expect("status.json");
    let (polls, answered) = (
        status_u64(&s, "ack_polls"),
        status_u64(&s, "ack_polls_answered"),
    );
    eprintln!(
        "110 fsyncs: {polls} polls for the acknowledgement, {answered} answered; \
         {stolen} ticks stolen meanwhile"
    );
    assert!(
        answered <= polls && polls <= 110,
        "{polls} polls, {answered} answered, for 110 durability points"
    );
    if stolen == 0 {
        assert!(polls > 0, "a calm host, and no poll: {s}");
    }
}
