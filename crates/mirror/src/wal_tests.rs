//! The applier's write-ahead log (`wal`). What it must guarantee: a write
//! acknowledged through the log is in its file after the next open even if
//! the file's own pages never reached the disk; nothing is replayed over an
//! operation that came after it; a damaged or hostile log is refused or cut
//! short, never followed outside the directory.
//!
//! A lost page cache cannot be produced here, so the tests stand in for it:
//! after the applier is dropped without any clean-up (as a crash would
//! leave it), they overwrite or cut the ranges the log covers, then open the
//! directory again.

use super::*;
use crate::cache_tests::{create, p};
use crate::tests::{setattr, with_mtime, with_size};
use hapair_proto::Timestamp;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// The mtime the logged writes carry (the files are created with
/// `cache_tests::T`).
const T2: Timestamp = Timestamp {
    sec: 1_700_000_555,
    nsec: 123_456_789,
};

fn write(path: &str, offset: u64) -> Op {
    Op::Write {
        path: p(path),
        offset,
        mtime: TimeSet::At(T2),
    }
}

/// A mirror directory and its log, in one temp dir.
struct Lab {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    log: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("m");
        std::fs::create_dir(&root).expect("mkdir");
        let log = log_path_for(&root).expect("log path");
        Lab {
            _tmp: tmp,
            root,
            log,
        }
    }

    /// The applier, logging every group commit of small writes (even over
    /// one file).
    fn open(&self) -> anyhow::Result<Applier> {
        Applier::open_with_log_sized(&self.root, &self.log, MIN_LOG_SIZE).map(Applier::always_log)
    }

    fn applier(&self) -> Applier {
        self.open().unwrap_or_else(|e| panic!("open: {e:#}"))
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.root.join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }

    /// Stands in for pages that never reached the disk: `rel` is cut to
    /// `keep` bytes and its first `keep` bytes are overwritten with `junk`.
    fn lose(&self, rel: &str, keep: u64, junk: u8) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.root.join(rel))
            .expect("open for losing");
        f.set_len(keep).expect("truncate");
        f.write_all_at(&vec![junk; keep as usize], 0).expect("junk");
        f.set_modified(std::time::UNIX_EPOCH).expect("mtime");
    }

    fn mtime(&self, rel: &str) -> (i64, u32) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(self.root.join(rel)).expect("stat");
        (m.mtime(), m.mtime_nsec() as u32)
    }
}

fn apply(a: &mut Applier, op: Op, payload: &[u8]) {
    let d = format!("{op:?}");
    a.apply(&op, payload).unwrap_or_else(|e| panic!("{d}: {e}"));
}

fn barrier(a: &mut Applier) {
    a.make_durable().unwrap_or_else(|e| panic!("barrier: {e}"));
}

fn epoch(a: &Applier) -> u64 {
    a.wal.as_ref().expect("a log").epoch()
}

#[test]
fn logged_writes_come_back_after_their_pages_are_lost() {
    let lab = Lab::new();
    let mut a = lab.applier();
    apply(&mut a, create("f"), &[]);
    apply(&mut a, create("g"), &[]);
    barrier(&mut a);
    assert!(a.logged.is_empty(), "a create is never logged");
    // One group over two files: overlapping writes (the later wins) and
    // one that extends f.
    let mut want_f = vec![b'a'; 4096];
    apply(&mut a, write("f", 0), &want_f.clone());
    apply(&mut a, write("f", 4000), &[b'b'; 100]);
    want_f[4000..4096].fill(b'b');
    want_f.extend_from_slice(&[b'b'; 4]);
    want_f.resize(10_000, 0);
    want_f.extend_from_slice(&[b'c'; 3000]);
    apply(&mut a, write("f", 10_000), &[b'c'; 3000]);
    apply(&mut a, write("g", 7), b"seven");
    barrier(&mut a);
    assert_eq!(a.logged.len(), 2, "both files are covered by the log");
    assert_eq!(lab.read("f"), want_f);
    let before = epoch(&a);
    a.crash();

    lab.lose("f", 0, 0);
    lab.lose("g", 3, b'x');
    let a = lab.applier();
    assert_eq!(lab.read("f"), want_f, "f rebuilt from the log");
    assert_eq!(lab.read("g"), b"xxx\0\0\0\0seven");
    assert_eq!(lab.mtime("f"), (T2.sec, T2.nsec), "mtime replayed too");
    assert_eq!(epoch(&a), before + 1, "the replay ended the epoch");
    a.crash();

    // After the replay's checkpoint the records are spent: they are not
    // applied again over what came later.
    lab.lose("g", 12, b'y');
    drop(lab.applier());
    assert_eq!(lab.read("g"), b"yyyyyyyyyyyy");
}

#[test]
fn nothing_is_replayed_over_an_operation_that_came_after() {
    let lab = Lab::new();
    let mut a = lab.applier();
    for f in ["t", "u", "r"] {
        apply(&mut a, create(f), &[]);
    }
    barrier(&mut a);
    for f in ["t", "u", "r"] {
        apply(&mut a, write(f, 0), &[b'o'; 8192]);
    }
    barrier(&mut a);
    assert_eq!(a.logged.len(), 3);
    let e = epoch(&a);
    // A truncate: the log's epoch ends before it is applied.
    apply(&mut a, with_size(setattr(p("t")), 0), &[]);
    assert_eq!(epoch(&a), e + 1, "checkpoint before the truncate");
    assert!(a.logged.is_empty());
    // An unlink and a new file of the same name, a rename and a new file
    // in its place; small writes to them, in a group that is not logged
    // (it holds other operations).
    apply(
        &mut a,
        Op::Unlink {
            path: p("u"),
            parent_mtime: None,
        },
        &[],
    );
    apply(&mut a, create("u"), &[]);
    apply(&mut a, write("u", 0), b"new u");
    apply(
        &mut a,
        Op::Rename {
            from: p("r"),
            to: p("r2"),
            flags: 0,
            from_parent_mtime: None,
            to_parent_mtime: None,
        },
        &[],
    );
    apply(&mut a, create("r"), &[]);
    barrier(&mut a);
    assert!(!a.wal.as_ref().expect("log").holds_records());
    a.crash();

    drop(lab.applier());
    assert_eq!(lab.read("t"), b"", "the truncate stands");
    assert_eq!(lab.read("u"), b"new u", "the new u is not overwritten");
    assert_eq!(lab.read("r"), b"", "the new r is not overwritten");
    assert_eq!(lab.read("r2"), vec![b'o'; 8192]);
}

#[test]
fn an_mtime_report_is_logged_like_a_write_and_replayed_in_order() {
    const T3: Timestamp = Timestamp {
        sec: 1_700_000_777,
        nsec: 42,
    };
    let set_mtime = |f: &str, t: Timestamp| with_mtime(setattr(p(f)), t);
    let lab = Lab::new();
    let mut a = lab.applier();
    apply(&mut a, create("f"), &[]);
    std::fs::create_dir(lab.root.join("d")).expect("mkdir");
    barrier(&mut a);
    apply(&mut a, write("f", 0), b"logged");
    barrier(&mut a);
    let e = epoch(&a);
    // The mount's report of f's exact mtime after a second write: no
    // checkpoint, one more record, after the writes'.
    apply(&mut a, write("f", 6), b" and more");
    apply(&mut a, set_mtime("f", T3), &[]);
    barrier(&mut a);
    assert_eq!(
        epoch(&a),
        e,
        "no checkpoint for the mtime of a written file"
    );
    a.crash();

    lab.lose("f", 0, 0);
    let records = logged_writes(&lab.root).expect("records");
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(records[2].2, 0, "the report, after the writes");
    drop(lab.applier());
    assert_eq!(lab.read("f"), b"logged and more");
    // Replayed in order: the report's mtime wins over the writes'.
    assert_eq!(lab.mtime("f"), (T3.sec, T3.nsec));

    // The same on a directory, which the applier has not open: the
    // epoch ends first, as for any other change.
    let mut a = lab.applier();
    let e = epoch(&a);
    apply(&mut a, set_mtime("d", T3), &[]);
    barrier(&mut a);
    apply(&mut a, write("f", 0), b"L");
    barrier(&mut a);
    apply(&mut a, set_mtime("d", T2), &[]);
    assert_eq!(epoch(&a), e + 1, "a directory's mtime ends the epoch");
}

#[test]
fn replay_stops_at_a_damaged_record() {
    let lab = Lab::new();
    let mut a = lab.applier();
    apply(&mut a, create("f"), &[]);
    barrier(&mut a);
    apply(&mut a, write("f", 0), &[b'a'; 100]);
    barrier(&mut a);
    apply(&mut a, write("f", 200), &[b'b'; 100]);
    barrier(&mut a);
    apply(&mut a, write("f", 400), &[b'c'; 100]);
    barrier(&mut a);
    let start = wal::records_start(MIN_LOG_SIZE, epoch(&a));
    a.crash();
    // One flipped bit in the second record's data.
    let second = start + (wal::RECORD_HEADER + 1 + 100) as u64;
    let log = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lab.log)
        .expect("log");
    let at = second + wal::RECORD_HEADER as u64 + 1 + 50;
    let mut b = [0u8; 1];
    log.read_exact_at(&mut b, at).expect("read");
    assert_eq!(b[0], b'b', "the test found the second record");
    log.write_all_at(&[b[0] ^ 1], at).expect("flip");
    drop(log);

    lab.lose("f", 500, 0);
    drop(lab.applier());
    let f = lab.read("f");
    assert_eq!(&f[..100], &[b'a'; 100], "the record before is replayed");
    assert!(
        f[200..500].iter().all(|&c| c == 0),
        "nothing from the damaged record on is replayed"
    );
}

#[test]
fn a_log_left_by_a_removed_directory_is_not_replayed() {
    let lab = Lab::new();
    let mut a = lab.applier();
    apply(&mut a, create("f"), &[]);
    barrier(&mut a);
    apply(&mut a, write("f", 0), b"old directory");
    barrier(&mut a);
    a.crash();
    std::fs::remove_dir_all(&lab.root).expect("rm");
    std::fs::create_dir(&lab.root).expect("mkdir");
    std::fs::write(lab.root.join("f"), b"fresh").expect("write");
    let a = lab.applier();
    assert_eq!(lab.read("f"), b"fresh");
    assert!(!a.wal.as_ref().expect("log").holds_records());
}

/// Writes `records` (epoch 1, as a new log has) where that epoch's
/// records start.
fn plant(log: &Path, records: &[(&[u8], u64, &[u8])]) {
    let mut out = Vec::new();
    for (path, off, data) in records {
        wal::encode(&mut out, 1, path, *off, TimeSet::Omit, data);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(log)
        .expect("log");
    f.write_all_at(&out, wal::records_start(MIN_LOG_SIZE, 1))
        .expect("plant");
}

#[test]
fn hostile_records_are_refused_and_change_nothing() {
    let lab = Lab::new();
    drop(lab.applier());
    let outside = lab.root.parent().expect("parent").join("outside");
    std::fs::write(&outside, b"must stay").expect("write");
    std::fs::write(lab.root.join("f"), b"inside").expect("write");
    for bad in [
        &b"../outside"[..],
        b"/etc/passwd",
        b"a//b",
        b"f\0x",
        b"",
        b".",
    ] {
        plant(&lab.log, &[(b"f", 0, b"XX"), (bad, 0, b"evil")]);
        let e = match lab.open() {
            Ok(_) => panic!("{bad:?}: a record with this path was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains("invalid path") || e.contains("malformed"),
            "{bad:?}: unclear error {e}"
        );
        assert!(
            e.contains(&lab.log.display().to_string()),
            "names the log: {e}"
        );
        assert_eq!(std::fs::read(&outside).expect("read"), b"must stay");
        assert_eq!(
            lab.read("f"),
            b"inside",
            "the valid record before was not applied"
        );
    }
    // A symlink planted in the directory is never followed: its record is
    // skipped like one for a file that is gone.
    std::os::unix::fs::symlink(&outside, lab.root.join("link")).expect("symlink");
    plant(&lab.log, &[(b"link", 0, b"evil")]);
    drop(lab.applier());
    assert_eq!(std::fs::read(&outside).expect("read"), b"must stay");
    assert!(std::fs::symlink_metadata(lab.root.join("link"))
        .expect("lstat")
        .file_type()
        .is_symlink());
}

#[test]
fn a_damaged_log_is_a_clear_error() {
    let lab = Lab::new();
    drop(lab.applier());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&lab.log)
        .expect("log");
    f.write_all_at(&[0u8; 1024], 0).expect("wipe headers");
    let e = format!("{:#}", lab.open().err().expect("refused"));
    assert!(e.contains("no valid header") && e.contains("remove"), "{e}");
    f.set_len(1000).expect("cut");
    let e = format!("{:#}", lab.open().err().expect("refused"));
    assert!(e.contains("1000 bytes"), "{e}");
}

#[test]
fn a_full_half_rotates_and_loses_nothing() {
    let lab = Lab::new();
    let mut a = lab.applier();
    apply(&mut a, create("f"), &[]);
    barrier(&mut a);
    // 64 KiB − 1 at odd offsets: page-cache writes, one record per group;
    // about 64 of them fill a half of the smallest log.
    let data: Vec<u8> = (0..(64 << 10) - 1).map(|i| (i % 251) as u8).collect();
    let mut want = Vec::new();
    for i in 0..150u64 {
        let off = i * 70_001 + 1;
        let mut d = data.clone();
        d[0] = i as u8;
        apply(&mut a, write("f", off), &d);
        barrier(&mut a);
        want.resize(off as usize, 0);
        want.extend_from_slice(&d);
    }
    assert!(epoch(&a) >= 3, "the log rotated twice: {}", epoch(&a));
    assert!(a.wal.as_ref().expect("log").holds_records());
    a.crash();
    // What the live records cover comes back; what the retired halves
    // covered was synced by the helper. Here that "disk" is the page cache,
    // so only the last write is tested for loss: cut the file back to
    // before it.
    let last_off = 149 * 70_001 + 1;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(lab.root.join("f"))
        .expect("open");
    f.set_len(last_off).expect("cut");
    drop(f);
    drop(lab.applier());
    assert_eq!(lab.read("f"), want);
}

#[test]
fn a_crash_while_a_half_is_retired_replays_both_halves_in_order() {
    let lab = Lab::new();
    let mut a = lab.applier();
    a.wal.as_mut().expect("log").hold_retiring = true;
    apply(&mut a, create("f"), &[]);
    barrier(&mut a);
    // 100 groups of one 60,000-byte write at overlapping offsets (a later
    // one wins where they meet): one rotation, whose retirement never ran.
    let mut want = Vec::new();
    for i in 0..100u64 {
        let off = (i % 10) * 6_000 + (i / 10) * 1_000;
        let data = vec![(i % 250) as u8 + 1; 60_000];
        apply(&mut a, write("f", off), &data);
        barrier(&mut a);
        let end = off as usize + data.len();
        if want.len() < end {
            want.resize(end, 0);
        }
        want[off as usize..end].copy_from_slice(&data);
    }
    assert_eq!(epoch(&a), 2, "one rotation");
    a.crash();
    lab.lose("f", 0, 0);
    drop(lab.applier());
    assert_eq!(lab.read("f"), want, "both halves replayed, in order");
}

#[test]
fn a_log_of_the_first_format_is_replayed_then_rewritten() {
    let lab = Lab::new();
    drop(lab.applier());
    std::fs::write(lab.root.join("f"), b"inside").expect("write");
    // As the first format left it: a header for epoch 5 in slot 1, and
    // that epoch's records from the start of the body.
    let root = crate::mirror_root(&lab.root).expect("root");
    let ident = wal::identity(root.as_raw_fd()).expect("identity");
    let mut page = vec![0u8; wal::BODY as usize];
    let slot = wal::SLOT as usize;
    page[slot..slot + 36].copy_from_slice(&wal::header_with(wal::HEADER_MAGIC_V1, 5, ident));
    let mut rec = Vec::new();
    wal::encode(&mut rec, 5, b"f", 0, TimeSet::Omit, b"XX");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&lab.log)
        .expect("log");
    f.write_all_at(&page, 0).expect("header");
    f.write_all_at(&rec, wal::BODY).expect("record");
    drop(f);

    let a = lab.applier();
    assert_eq!(lab.read("f"), b"XXside", "the record was replayed");
    assert!(epoch(&a) > 5);
    drop(a);
    let head = std::fs::read(&lab.log).expect("read log");
    let magics = [&head[0..8], &head[slot..slot + 8]];
    assert!(
        magics.contains(&&wal::HEADER_MAGIC[..]),
        "a header of this format was written"
    );
    // Spent: not replayed again over a later change.
    std::fs::write(lab.root.join("f"), b"later").expect("write");
    drop(lab.applier());
    assert_eq!(lab.read("f"), b"later");
}

#[test]
fn recover_replays_beside_the_directory_and_makes_no_log_where_none_was() {
    let lab = Lab::new();
    let mut a = lab.applier();
    apply(&mut a, create("f"), &[]);
    barrier(&mut a);
    apply(&mut a, write("f", 0), b"acknowledged");
    barrier(&mut a);
    a.crash();
    lab.lose("f", 0, 0);
    assert_eq!(recover(&lab.root).expect("recover"), 1);
    assert_eq!(lab.read("f"), b"acknowledged");
    assert_eq!(recover(&lab.root).expect("recover again"), 0);

    let other = lab.root.parent().expect("parent").join("other");
    std::fs::create_dir(&other).expect("mkdir");
    assert_eq!(recover(&other).expect("recover"), 0);
    assert!(!log_path_for(&other).expect("path").exists());
}

#[test]
fn one_holder_at_a_time() {
    let lab = Lab::new();
    let a = lab.applier();
    let e = format!("{:#}", lab.open().err().expect("second holder refused"));
    assert!(e.contains("in use"), "{e}");
    let e = format!("{:#}", recover(&lab.root).expect_err("recover refused"));
    assert!(e.contains("in use"), "{e}");
    a.crash();
    drop(lab.applier());
}

#[test]
fn the_log_path_is_beside_the_directory() {
    let lab = Lab::new();
    let parent = lab
        .root
        .parent()
        .expect("parent")
        .canonicalize()
        .expect("canon");
    assert_eq!(lab.log, parent.join(".m.hapair-log"));
    // The same directory named another way has the same log.
    let other = lab.root.join(".").join("..").join("m");
    assert_eq!(log_path_for(&other).expect("path"), lab.log);
    assert!(log_path_for(Path::new("/")).is_err());
}

#[test]
fn groups_over_several_files_turn_the_log_on_and_calm_turns_it_off() {
    let lab = Lab::new();
    let mut a = Applier::open_with_log_sized(&lab.root, &lab.log, MIN_LOG_SIZE)
        .unwrap_or_else(|e| panic!("open: {e:#}"));
    apply(&mut a, create("f"), &[]);
    apply(&mut a, create("g"), &[]);
    barrier(&mut a);
    for i in 0..3 {
        apply(&mut a, write("f", i * 10), b"one file");
        barrier(&mut a);
    }
    assert!(
        !a.wal.as_ref().expect("log").holds_records(),
        "one-file groups are synced, not logged"
    );
    apply(&mut a, write("f", 0), b"two");
    apply(&mut a, write("g", 0), b"files");
    barrier(&mut a);
    assert_eq!(a.logged.len(), 2, "a group over two files is logged");
    let e = epoch(&a);
    for i in 1..CALM_GROUPS {
        apply(&mut a, write("f", 0), b"calm");
        barrier(&mut a);
        assert!(a.log_on, "still on after {i} one-file groups");
    }
    apply(&mut a, write("f", 0), b"calm");
    barrier(&mut a);
    assert!(!a.log_on, "off after {CALM_GROUPS} one-file groups");
    assert!(!a.wal.as_ref().expect("log").holds_records());
    assert_eq!(epoch(&a), e + 1, "with a checkpoint");
    a.crash();
}
