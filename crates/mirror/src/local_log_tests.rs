//! The mount's side of the write-ahead log (`LocalLog`), driven as the
//! mount drives it: writes made to a real file and reported, fsyncs
//! planned and synced. A lost page cache is stood in for as in
//! `wal_tests`: the log is dropped without its final checkpoint, the file
//! is cut, and the directory is opened again.

use super::*;
use crate::cache_tests::p;
use crate::local_log::{Fault, CALM_FSYNCS as CALM};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

struct Dir {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("data");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::write(root.join("f"), b"").expect("create");
        Dir { _tmp: tmp, root }
    }

    /// The log, with every fsync counted as concurrent (so files join at
    /// their first fsync).
    fn open(&self) -> (LocalLog, u64) {
        let (log, n) = LocalLog::open_sized(&self.root, MIN_LOG_SIZE)
            .unwrap_or_else(|e| panic!("open: {e:#}"));
        log.always_contended(true);
        (log, n)
    }

    fn file(&self) -> (std::fs::File, u64) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.root.join("f"))
            .expect("open f");
        let ino = f.metadata().expect("stat").ino();
        (f, ino)
    }

    fn content(&self) -> Vec<u8> {
        std::fs::read(self.root.join("f")).expect("read f")
    }

    fn cut(&self, len: u64) {
        self.file().0.set_len(len).expect("cut");
    }
}

/// A write as the mount makes it: to the file, then reported to the log.
fn write(log: &LocalLog, f: &std::fs::File, ino: u64, off: u64, data: &[u8]) -> bool {
    f.write_all_at(data, off).expect("write");
    log.wrote(ino, &p("f"), off, data)
}

/// An fsync as the mount makes it; returns true if only the log was synced.
fn fsync(log: &LocalLog, f: &std::fs::File, ino: u64) -> bool {
    try_fsync(log, f, ino).unwrap_or_else(|e| panic!("fsync: errno {e}"))
}

fn try_fsync(log: &LocalLog, f: &std::fs::File, ino: u64) -> Result<bool, i32> {
    log.fsync(ino, f.as_fd(), &mut || {
        f.sync_all()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    })
}

fn errno<T>(r: Result<T, SysError>) -> Option<i32> {
    r.err().map(|e| e.errno)
}

#[test]
fn a_file_joins_at_an_fsync_and_later_fsyncs_sync_only_the_log() {
    let d = Dir::new();
    let (log, replayed) = d.open();
    assert_eq!(replayed, 0);
    let (f, ino) = d.file();
    assert!(
        !write(&log, &f, ino, 0, b"before"),
        "not joined yet: not logged"
    );
    assert!(!fsync(&log, &f, ino), "the first fsync is an ordinary one");
    assert_eq!(log.joined(), 1);
    assert!(write(&log, &f, ino, 6, b" after"));
    assert!(fsync(&log, &f, ino), "then the log covers the file");
    let syncs = log.log_syncs();
    assert!(fsync(&log, &f, ino));
    assert_eq!(log.log_syncs(), syncs, "nothing new: no second log sync");
    log.crash();

    // The pages of the logged write never reached the disk.
    d.cut(6);
    let (log, replayed) = d.open();
    assert_eq!(replayed, 1);
    assert_eq!(d.content(), b"before after");
    drop(log);
}

#[test]
fn an_unlogged_write_syncs_older_records_first_and_makes_the_next_fsync_ordinary() {
    let d = Dir::new();
    let (log, _) = d.open();
    let (f, ino) = d.file();
    fsync(&log, &f, ino);
    assert!(write(&log, &f, ino, 0, b"logged"));
    log.before_unlogged_write(ino).expect("checkpoint");
    assert_eq!(log.joined(), 0, "a checkpoint: every file left the log");
    // The unlogged write overwrites the logged range; a replay must not
    // put the older bytes back.
    f.write_all_at(b"LATEST", 0).expect("write");
    assert!(!fsync(&log, &f, ino));
    log.crash();
    let (_log, replayed) = d.open();
    assert_eq!(replayed, 0);
    assert_eq!(d.content(), b"LATEST");
}

#[test]
fn a_change_other_than_a_write_ends_the_epoch_first() {
    let d = Dir::new();
    let (log, _) = d.open();
    let (f, ino) = d.file();
    fsync(&log, &f, ino);
    assert!(write(&log, &f, ino, 0, &[b'x'; 5000]));
    assert!(fsync(&log, &f, ino));
    log.before_change().expect("checkpoint");
    // The change: a truncate that reaches the disk.
    d.cut(0);
    f.sync_all().expect("fsync");
    assert!(!fsync(&log, &f, ino), "after a change, an ordinary fsync");
    log.crash();
    let (_log, replayed) = d.open();
    assert_eq!(replayed, 0);
    assert_eq!(d.content(), b"", "the truncate stands");
}

#[test]
fn a_clean_end_leaves_nothing_to_replay() {
    let d = Dir::new();
    let (log, _) = d.open();
    let (f, ino) = d.file();
    fsync(&log, &f, ino);
    assert!(write(&log, &f, ino, 0, b"kept"));
    assert!(fsync(&log, &f, ino));
    drop(log);
    // Written over behind hapair's back after a clean stop: never undone.
    f.write_all_at(b"KEPT", 0).expect("write");
    let (_log, replayed) = d.open();
    assert_eq!(replayed, 0);
    assert_eq!(d.content(), b"KEPT");
}

/// `count` writes of 60,000 bytes at offsets that overlap (a later one
/// wins where they meet), logged; returns the file's content they make.
/// About 69 of them fill a half of the smallest log.
fn overlapping_writes(log: &LocalLog, f: &std::fs::File, ino: u64, count: u64) -> Vec<u8> {
    let mut want = Vec::new();
    for i in 0..count {
        let off = (i % 10) * 6_000 + (i / 10) * 1_000;
        let data = vec![(i % 250) as u8 + 1; 60_000];
        assert!(write(log, f, ino, off, &data), "write {i} was logged");
        let end = off as usize + data.len();
        if want.len() < end {
            want.resize(end, 0);
        }
        want[off as usize..end].copy_from_slice(&data);
    }
    want
}

#[test]
fn a_full_half_rotates_and_the_file_stays_in_the_log() {
    let d = Dir::new();
    let (log, _) = d.open();
    let (f, ino) = d.file();
    fsync(&log, &f, ino);
    let want = overlapping_writes(&log, &f, ino, 200);
    assert!(log.epoch() >= 3, "two rotations: epoch {}", log.epoch());
    assert_eq!(log.joined(), 1, "the file stayed in the log");
    assert!(fsync(&log, &f, ino), "its fsync is still a sync of the log");
    log.crash();
    // What the retired halves covered was synced by the helper; in this
    // test that "disk" is the page cache, so only the live records are
    // tested for loss: the file's pages from the last write's start on.
    d.cut(((199 % 10) * 6_000 + (199 / 10) * 1_000) as u64);
    let (_log, replayed) = d.open();
    assert!(replayed > 0);
    assert_eq!(d.content(), want);
}

#[test]
fn a_crash_while_a_half_is_retired_replays_both_halves_in_order() {
    let d = Dir::new();
    let (log, _) = d.open();
    log.hold_retiring();
    let (f, ino) = d.file();
    fsync(&log, &f, ino);
    // One rotation, whose retirement never ran: every write since the file
    // joined is in the two live epochs, the later ones over the earlier.
    let want = overlapping_writes(&log, &f, ino, 100);
    assert_eq!(log.epoch(), 2, "one rotation");
    assert!(fsync(&log, &f, ino));
    log.crash();
    d.cut(0);
    let (_log, replayed) = d.open();
    assert_eq!(replayed, 100);
    assert_eq!(d.content(), want);
}

#[test]
fn the_log_is_held_by_one_mount_at_a_time() {
    let d = Dir::new();
    let (log, _) = d.open();
    let e = LocalLog::open_sized(&d.root, MIN_LOG_SIZE)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(e.contains("in use"), "{e}");
    let e = Applier::open_with_log(&d.root, &log_path_for(&d.root).expect("path"))
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(e.contains("in use"), "a mirror cannot take it either: {e}");
    drop(log);
    d.open();
}

#[test]
fn only_concurrent_fsyncs_bring_files_into_the_log() {
    let d = Dir::new();
    let (log, _) = d.open();
    log.always_contended(false);
    let (f, ino) = d.file();
    for i in 0..3u64 {
        assert!(!write(&log, &f, ino, i * 10, b"alone"));
        assert!(!fsync(&log, &f, ino), "one writer: ordinary fsyncs");
    }
    assert_eq!(log.joined(), 0);
    log.always_contended(true);
    assert!(!fsync(&log, &f, ino), "joins at a concurrent fsync");
    assert_eq!(log.joined(), 1);
    log.always_contended(false);
    for i in 1..CALM {
        assert!(write(&log, &f, ino, 0, b"logged"));
        assert!(fsync(&log, &f, ino), "fsync {i} of a joined file");
    }
    assert!(write(&log, &f, ino, 0, b"logged"));
    assert!(
        !fsync(&log, &f, ino),
        "after {CALM} calm fsyncs the log is checkpointed"
    );
    assert_eq!(log.joined(), 0);
    log.crash();
    let (_log, replayed) = d.open();
    assert_eq!(replayed, 0, "the checkpoint ended the epoch");
}

// A failing log (no device-mapper in this kernel to make a real disk fail:
// the log's own writes and syncs are made to fail, the files' are real).

#[test]
fn a_failed_log_that_cannot_be_checkpointed_refuses_what_a_replay_would_undo() {
    let d = Dir::new();
    let (log, _) = d.open();
    let (f, ino) = d.file();
    std::fs::write(d.root.join("g"), b"").expect("create g");
    let g = std::fs::OpenOptions::new()
        .write(true)
        .open(d.root.join("g"))
        .expect("open g");
    let g_ino = g.metadata().expect("stat").ino();
    fsync(&log, &f, ino);
    assert!(write(&log, &f, ino, 0, b"first"));
    assert!(fsync(&log, &f, ino), "\"first\" is durable in the log");
    log.fail(Fault::All);
    log.before_logged_write(ino)
        .expect("the log has not failed yet");
    assert!(
        !write(&log, &f, ino, 0, b"SECND"),
        "the record could not be written"
    );
    assert!(log.stuck(), "nor could the log be checkpointed");
    // A replay will put "first" back over "SECND": nothing may say that
    // "SECND", or anything after it, is durable.
    assert_eq!(try_fsync(&log, &f, ino), Err(libc::EIO));
    assert_eq!(errno(log.before_logged_write(ino)), Some(libc::EIO));
    assert_eq!(errno(log.before_unlogged_write(ino)), Some(libc::EIO));
    assert_eq!(errno(log.before_change()), Some(libc::EIO));
    // A file the log holds nothing of goes on as without a log.
    log.before_logged_write(g_ino).expect("g has no records");
    g.write_all_at(b"other", 0).expect("write g");
    assert!(!log.wrote(g_ino, &p("g"), 0, b"other"));
    assert_eq!(try_fsync(&log, &g, g_ino), Ok(false));
    log.crash();

    // The next start: the log is healthy again, and the replay brings back
    // what the application was told was durable.
    let (_log, replayed) = d.open();
    assert_eq!(replayed, 1);
    assert_eq!(d.content(), b"first");
    assert_eq!(std::fs::read(d.root.join("g")).expect("read g"), b"other");
}

#[test]
fn a_log_whose_sync_fails_is_checkpointed_and_later_writes_stand() {
    let d = Dir::new();
    let (log, _) = d.open();
    let (f, ino) = d.file();
    fsync(&log, &f, ino);
    assert!(write(&log, &f, ino, 0, b"first"));
    assert!(fsync(&log, &f, ino));
    log.fail(Fault::Sync);
    assert!(write(&log, &f, ino, 0, b"SECND"));
    // The log's sync fails; the checkpoint that follows makes the file
    // itself durable and retires the records.
    assert!(try_fsync(&log, &f, ino).is_ok());
    assert!(!log.stuck());
    assert_eq!(log.joined(), 0, "every file left the log");
    assert!(
        !write(&log, &f, ino, 0, b"THIRD"),
        "nothing is logged any more"
    );
    assert_eq!(try_fsync(&log, &f, ino), Ok(false), "an ordinary fsync");
    log.crash();
    let (_log, replayed) = d.open();
    assert_eq!(replayed, 0, "no record may be put back over THIRD");
    assert_eq!(d.content(), b"THIRD");
}
