//! Crash tests: `recwriter` writes numbered, checksummed records on the
//! mount and logs each acknowledgement (outside the mount) once its
//! durability point returned; the mount process is killed with SIGKILL at a
//! random moment; every acknowledged record must then be on the mirror,
//! intact, and the records there must be a prefix (a state the writer went
//! through). Also: a network cut with a short timeout makes the mount go on
//! alone (degraded) with a journal; and link-cut trials: the mirror's link
//! is cut at a random moment, every record acknowledged before the cut is
//! on the mirror, the journal survives a kill -9 of the degraded mount, and
//! a restarted mount brings the mirror to exactly its tree.
//!
//! Seeds are printed; set HAPAIR_TEST_SEED to replay one.

use hapair_repl_core::journal::{self, DirtyRecord};
use hapair_tests::env::{self, Rng};
use hapair_tests::proc::Stopped;
use hapair_tests::records::{self, check_records, read_ack_log};
use hapair_tests::treediff::DiffOptions;
use hapair_tests::{Harness, MountOpts, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const RECWRITER: &str = env!("CARGO_BIN_EXE_recwriter");

#[derive(Clone, Copy)]
enum Layout {
    /// One file.
    Single,
    /// Four slot files, each renamed every 5 records.
    Multi,
}

fn spawn_writer(
    h: &Harness,
    layout: Layout,
    ack_mode: &str,
    seed: u64,
    ack_log: &Path,
    duration_ms: u64,
    name: &str,
) -> Proc {
    let mut c = Command::new(RECWRITER);
    c.arg("write");
    match layout {
        Layout::Single => {
            c.arg("--file").arg(h.dir.join("records"));
        }
        Layout::Multi => {
            c.arg("--dir")
                .arg(h.dir.join("recs"))
                .args(["--files", "4", "--rotate-every", "5"]);
        }
    }
    c.arg("--ack-log").arg(ack_log).args(["--mode", ack_mode]);
    c.args([
        "--duration-ms",
        &duration_ms.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    c.args(["--min-size", "1", "--max-size", "20000"]);
    Proc::spawn(name, &mut c, &h.logs)
}

fn mirror_files(h: &Harness, layout: Layout) -> Vec<PathBuf> {
    match layout {
        Layout::Single => {
            let p = h.mirror_dir.join("records");
            if p.exists() {
                vec![p]
            } else {
                Vec::new()
            }
        }
        Layout::Multi => records::multi_files(&h.mirror_dir.join("recs")).unwrap_or_default(),
    }
}

/// Waits until the ack log holds at least `n` acks; fails if the writer
/// stops first.
fn wait_acks(ack_log: &Path, n: u64, timeout: Duration, writer: &mut Proc) -> u64 {
    let end = Instant::now() + timeout;
    loop {
        let a = read_ack_log(ack_log).unwrap_or_else(|e| panic!("{e}"));
        if a >= n {
            return a;
        }
        if let Some(s) = writer.try_wait() {
            panic!(
                "recwriter exited ({s:?}) after {a} acks, before {n}; stderr:\n{}",
                writer.stderr_tail(10)
            );
        }
        assert!(
            Instant::now() < end,
            "only {a} acks after {timeout:?} (want {n})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `trials` rounds of: mount, write, SIGKILL the mount after a random
/// delay, check the mirror. `must_hold_acks`: false for async mode, where
/// only the prefix property is checked.
fn crash_trials(mode: &str, ack_mode: &str, layout: Layout, trials: u64, must_hold_acks: bool) {
    let _s = env::serial();
    let base = env::seed();
    eprintln!("crash {mode}/{ack_mode}: base seed {base} (HAPAIR_TEST_SEED={base} to replay)");
    let mut rng = Rng(base);
    for t in 0..trials {
        let seed = base.wrapping_add(t);
        let mut h = Harness::new(&format!("crash-{mode}-{t}"));
        h.start_mirror();
        h.mount(&MountOpts::mode(mode));
        let ack_log = h.tmp().join("acks");
        let mut w = spawn_writer(&h, layout, ack_mode, seed, &ack_log, 30_000, "recwriter");
        wait_acks(&ack_log, 1, Duration::from_secs(20), &mut w);
        // Kill at a random moment: early (a few records) to late.
        let delay = rng.range(0, 1500);
        std::thread::sleep(Duration::from_millis(delay));
        let before = read_ack_log(&ack_log).unwrap_or_else(|e| panic!("{e}"));
        h.kill_mount();
        let ws = w.wait_or_kill(Duration::from_secs(30));
        let acked = read_ack_log(&ack_log).unwrap_or_else(|e| panic!("{e}"));
        // The mirror may still be applying what it received before the
        // kill (async mode lags by design): freeze it, so that the listing
        // and the reads see one state of its tree, not a tree renamed
        // under the reader (readdir can miss an entry renamed during it).
        let frozen = Stopped::new(h.mirror());
        let files = mirror_files(&h, layout);
        let want = if must_hold_acks { acked } else { 0 };
        let checked = check_records(&files, seed, want);
        drop(frozen);
        match checked {
            Ok(r) => eprintln!(
                "trial {t} (seed {seed}): killed after {delay} ms; acked {acked} ({before} before the kill); mirror holds 1..={} in {} files ({} torn); writer {ws:?}",
                r.present, r.files, r.torn_files
            ),
            Err(errs) => panic!(
                "trial {t} (seed {seed}, {mode}/{ack_mode}): killed after {delay} ms with {acked} acked; the mirror's records are wrong:\n{}",
                errs.join("\n")
            ),
        }
        assert!(acked >= 1, "trial {t}: nothing was acknowledged");
    }
}

#[test]
fn crash_sync_fsync_single_file() {
    crash_trials("sync", "fsync", Layout::Single, 5, true);
}

#[test]
fn crash_sync_fsync_multi_file_with_renames() {
    crash_trials("sync", "fsync", Layout::Multi, 5, true);
}

#[test]
fn crash_strict_write_ack() {
    crash_trials("strict", "write", Layout::Single, 5, true);
}

#[test]
fn crash_strict_write_ack_multi_file() {
    crash_trials("strict", "write", Layout::Multi, 3, true);
}

/// async mode promises no acknowledged data, but the mirror must still be
/// a state the primary went through (records 1..=M, at most one torn).
#[test]
fn crash_async_prefix() {
    crash_trials("async", "fsync", Layout::Multi, 3, false);
}

/// The mirror in a network namespace behind a veth pair; the link is cut
/// while the writer runs. With --timeout-ms 1000 the writer goes on (the
/// mount is degraded), status.json says so, and the journal records what
/// the mirror missed.
#[test]
fn link_cut_goes_degraded() {
    let _s = env::serial();
    let mut h = Harness::new("linkcut");
    h.start_mirror_in_netns();
    h.mount(&MountOpts {
        timeout_ms: Some(1000),
        ..MountOpts::mode("sync")
    });
    h.wait_status(Duration::from_secs(10), |v| v["state"] == "replicating")
        .unwrap_or_else(|e| panic!("mount not replicating before the cut: {e}"));
    let ack_log = h.tmp().join("acks");
    let mut w = spawn_writer(
        &h,
        Layout::Single,
        "fsync",
        42,
        &ack_log,
        40_000,
        "recwriter",
    );
    wait_acks(&ack_log, 20, Duration::from_secs(20), &mut w);
    h.veth
        .as_ref()
        .unwrap_or_else(|| panic!("no veth"))
        .set_up(false);
    let at_cut = read_ack_log(&ack_log).unwrap_or_else(|e| panic!("{e}"));
    let cut = Instant::now();
    // The writer must go on: 20 more fsyncs acknowledged within 15 s.
    let after = wait_acks(&ack_log, at_cut + 20, Duration::from_secs(15), &mut w);
    eprintln!(
        "acked {at_cut} at the cut, {after} after {:?}",
        cut.elapsed()
    );
    let st = h
        .wait_status(Duration::from_secs(5), |v| v["state"] == "degraded")
        .unwrap_or_else(|e| panic!("status.json does not say degraded after the cut: {e}"));
    eprintln!("status after the cut: {st}");
    let journal = h.state_dir.join("journal");
    let len = std::fs::metadata(&journal)
        .map(|m| m.len())
        .unwrap_or_else(|e| panic!("journal {}: {e}", journal.display()));
    assert!(
        len > 0,
        "journal {} is empty while degraded",
        journal.display()
    );
    w.kill9();
    // A clean stop while degraded keeps the journal.
    h.stop_mount(Duration::from_secs(30));
    let len = std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
    assert!(
        len > 0,
        "journal {} gone or empty after a clean stop while degraded",
        journal.display()
    );
}

/// The records of the mount's degraded-mode journal (empty if it is absent).
fn journal_records(h: &Harness) -> Vec<DirtyRecord> {
    let p = h.state_dir.join("journal");
    match std::fs::read(&p) {
        Ok(b) => journal::decode_all(&b).records,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", p.display()),
    }
}

fn veth(h: &Harness) -> &hapair_tests::Veth {
    h.veth.as_ref().unwrap_or_else(|| panic!("no veth"))
}

/// `trials` rounds of: the mirror in a network namespace behind a veth
/// pair, the record writer on the mount, the link cut at a random moment.
/// Every record acknowledged before the cut (fsync returned, or in strict
/// mode write returned) must be on the mirror, intact; the blocked call
/// waits at most the (default) timeout, then the mount goes on alone and
/// journals. Then, still degraded, the mount is killed with SIGKILL: the
/// journal must survive it. The link comes back, a new mount resyncs from
/// the journal before serving, and the mirror's tree ends up exactly the
/// mount's, with every record ever acknowledged.
fn link_cut_trials(mode: &str, ack_mode: &str, trials: u64) {
    let _s = env::serial();
    let base = env::seed();
    eprintln!("link cut {mode}/{ack_mode}: base seed {base} (HAPAIR_TEST_SEED={base} to replay)");
    let mut rng = Rng(base ^ 0x11_c0_7c);
    for t in 0..trials {
        let seed = base.wrapping_add(t);
        let layout = if t % 2 == 0 {
            Layout::Single
        } else {
            Layout::Multi
        };
        let mut h = Harness::new(&format!("linkcut-{mode}-{t}"));
        h.start_mirror_in_netns();
        h.mount(&MountOpts::mode(mode));
        h.wait_status(Duration::from_secs(10), |v| v["state"] == "replicating")
            .unwrap_or_else(|e| panic!("trial {t}: not replicating before the cut: {e}"));
        let ack_log = h.tmp().join("acks");
        let mut w = spawn_writer(&h, layout, ack_mode, seed, &ack_log, 120_000, "recwriter");
        wait_acks(&ack_log, 1, Duration::from_secs(20), &mut w);
        let delay = rng.range(0, 1500);
        std::thread::sleep(Duration::from_millis(delay));
        // Read before cutting: these acks all came back before the cut.
        let at_cut = read_ack_log(&ack_log).unwrap_or_else(|e| panic!("{e}"));
        veth(&h).set_up(false);
        let cut = Instant::now();
        // The call blocked at the cut waits for the timeout, then the mount
        // goes on alone: status says degraded, and the writer makes
        // progress again (its records go to the journal).
        let st = h
            .wait_status(Duration::from_secs(30), |v| v["state"] == "degraded")
            .unwrap_or_else(|e| panic!("trial {t}: not degraded after the cut: {e}"));
        let resumed = wait_acks(&ack_log, at_cut + 10, Duration::from_secs(30), &mut w);
        eprintln!(
            "trial {t} (seed {seed}): cut after {delay} ms with {at_cut} acked; degraded ({}) and {resumed} acked {:?} after the cut",
            st["degraded_reason"],
            cut.elapsed()
        );
        // The mirror holds every record acknowledged before the cut.
        let files = mirror_files(&h, layout);
        match check_records(&files, seed, at_cut) {
            Ok(r) => eprintln!(
                "trial {t}: mirror holds 1..={} ({} files, {} torn) after the cut",
                r.present, r.files, r.torn_files
            ),
            Err(errs) => panic!(
                "trial {t} (seed {seed}, {mode}/{ack_mode}): cut with {at_cut} acked; the mirror's records are wrong:\n{}",
                errs.join("\n")
            ),
        }
        // Still degraded: kill -9 the mount. The journal survives it and
        // names the record files the mirror missed.
        h.kill_mount();
        w.wait_or_kill(Duration::from_secs(30));
        let acked = read_ack_log(&ack_log).unwrap_or_else(|e| panic!("{e}"));
        let recs = journal_records(&h);
        let ranges = recs
            .iter()
            .filter(|r| match r {
                DirtyRecord::Range { path, .. } => {
                    let b = path.to_bytes();
                    b == b"records" || b.starts_with(b"recs/")
                }
                _ => false,
            })
            .count();
        assert!(
            ranges > 0,
            "trial {t}: after kill -9 the journal has no record-file ranges ({} records: {:?})",
            recs.len(),
            recs.iter().take(5).collect::<Vec<_>>()
        );
        // The link comes back; a new mount resynchronises before it serves.
        veth(&h).set_up(true);
        h.mount(&MountOpts::mode(mode));
        h.wait_status(Duration::from_secs(30), |v| v["state"] == "replicating")
            .unwrap_or_else(|e| panic!("trial {t}: not replicating after the restart: {e}"));
        assert!(
            journal_records(&h).is_empty(),
            "trial {t}: the journal was not consumed by the resync"
        );
        h.stop_mount(Duration::from_secs(60));
        h.assert_trees_equal(None, &DiffOptions::default());
        let files = mirror_files(&h, layout);
        let r = check_records(&files, seed, acked).unwrap_or_else(|errs| {
            panic!(
                "trial {t}: after the resync the mirror lacks acknowledged records ({acked} acked):\n{}",
                errs.join("\n")
            )
        });
        eprintln!(
            "trial {t}: journal had {} records ({ranges} record-file ranges); after the resync the mirror equals the mount and holds 1..={} ({acked} acked)",
            recs.len(),
            r.present
        );
    }
}

#[test]
fn link_cut_sync_fsync_trials() {
    link_cut_trials("sync", "fsync", 4);
}

#[test]
fn link_cut_strict_write_trials() {
    link_cut_trials("strict", "write", 2);
}

/// Which copy loses its page cache in `replays_after_losing_pages`.
#[derive(Clone, Copy, Debug)]
enum Side {
    /// The mirror's; its node is then promoted.
    Mirror,
    /// The primary's; its mount is then started again.
    Mount,
}

/// Both nodes fail at once (SIGKILL to the mount, then to the mirror), and
/// one copy's machine loses what its page cache held: the tests cannot cut
/// a machine's power, so that copy's record files are cut where their
/// writes in the write-ahead log begin, standing in for pages that never
/// reached the disk. Three writers append small records to their own files
/// with an fsync after each, at the same time: the log is used while fsyncs
/// are concurrent, and then every record acknowledged after a file's
/// first logged write was made durable on that copy by the log only. Then
/// `hapair mount` starts over that copy (the mirror's node promoted, or the
/// primary restarted), its peer down: it replays the log before it serves,
/// and every acknowledged record is there.
fn replays_after_losing_pages(side: Side) {
    const WRITERS: u64 = 3;
    let _s = env::serial();
    let seed = env::seed();
    eprintln!("{side:?} log: seed {seed} (HAPAIR_TEST_SEED={seed} to replay)");
    let mut h = Harness::new(&format!("wal-{side:?}"));
    h.start_mirror();
    h.mount(&MountOpts::mode("sync"));
    h.wait_status(Duration::from_secs(10), |v| v["state"] == "replicating")
        .unwrap_or_else(|e| panic!("not replicating: {e}"));
    let mut writers = Vec::new();
    for k in 0..WRITERS {
        let ack_log = h.tmp().join(format!("acks-{k}"));
        let mut c = Command::new(RECWRITER);
        c.arg("write")
            .arg("--file")
            .arg(h.dir.join(format!("records-{k}")))
            .arg("--ack-log")
            .arg(&ack_log)
            .args(["--mode", "fsync", "--duration-ms", "30000"])
            .args(["--seed", &(seed + k).to_string()])
            .args(["--min-size", "1", "--max-size", "8000"]);
        let w = Proc::spawn(&format!("recwriter-{k}"), &mut c, &h.logs);
        writers.push((w, ack_log));
    }
    for (w, ack_log) in &mut writers {
        wait_acks(ack_log, 300, Duration::from_secs(30), w);
    }
    h.kill_mount();
    let mut acked = Vec::new();
    for (w, ack_log) in &mut writers {
        w.wait_or_kill(Duration::from_secs(30));
        acked.push(read_ack_log(ack_log).unwrap_or_else(|e| panic!("{e}")));
    }
    h.mirror().kill9();
    let dir = match side {
        Side::Mirror => h.mirror_dir.clone(),
        Side::Mount => h.dir.clone(),
    };
    let log = hapair_mirror::log_path_for(&dir).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(log.exists(), "no write-ahead log at {}", log.display());
    let logged = hapair_mirror::logged_writes(&dir)
        .unwrap_or_else(|e| panic!("reading the write-ahead log: {e:#}"));
    // Each writer only appends to its file: what the log covers is that
    // file from its lowest logged offset on. Cut it there, as if none of
    // those pages had reached the disk.
    let mut cuts = Vec::new();
    for k in 0..WRITERS {
        let name = format!("records-{k}");
        let from = logged
            .iter()
            .filter(|(p, _, _)| p.to_bytes() == name.as_bytes())
            .map(|(_, off, _)| *off)
            .min();
        let Some(from) = from else { continue };
        let rec = dir.join(&name);
        let had = std::fs::metadata(&rec)
            .unwrap_or_else(|e| panic!("{}: {e}", rec.display()))
            .len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&rec)
            .and_then(|f| f.set_len(from))
            .unwrap_or_else(|e| panic!("cutting {}: {e}", rec.display()));
        cuts.push(format!("{name} {had} -> {from} bytes"));
    }
    assert!(
        !cuts.is_empty(),
        "three concurrent writers and nothing in the log ({} records)",
        logged.len()
    );
    if let Side::Mirror = side {
        // Promotion: the mirror's copy becomes the mounted directory.
        h.dir = dir;
        h.state_dir = h.tmp().join("state-promoted");
    }
    h.mount(&MountOpts {
        timeout_ms: Some(1000),
        ..MountOpts::mode("sync")
    });
    let stderr = h.mount.as_ref().map(|m| m.stderr()).unwrap_or_default();
    for k in 0..WRITERS {
        let files = vec![h.dir.join(format!("records-{k}"))];
        let want = acked[k as usize];
        match check_records(&files, seed + k, want) {
            Ok(r) => eprintln!("{side:?}: writer {k}: {want} acked; after the replay 1..={} are there", r.present),
            Err(errs) => panic!(
                "{side:?}, seed {seed}: writer {k}: {want} acked; after the replay the records are wrong:\n{}\nmount stderr:\n{stderr}",
                errs.join("\n")
            ),
        }
    }
    eprintln!(
        "{side:?}: the log held {} writes; cut: {}",
        logged.len(),
        cuts.join(", ")
    );
    assert!(
        stderr.contains("replayed the write-ahead log"),
        "the mount did not say it replayed the log:\n{stderr}"
    );
    h.stop_mount(Duration::from_secs(30));
}

#[test]
fn a_promoted_mirror_replays_its_log_after_losing_its_page_cache() {
    replays_after_losing_pages(Side::Mirror);
}

#[test]
fn a_restarted_primary_replays_its_log_after_losing_its_page_cache() {
    replays_after_losing_pages(Side::Mount);
}
