//! Tests of the independent tree comparator itself (no hapair binary
//! needed): identical copies compare equal, and each kind of difference is
//! reported. Needs root (chown, setfacl).

use hapair_tests::treediff::{tree_diff, tree_diff_with, DiffOptions};
use hapair_tests::workload;
use hapair_tests::TestDir;
use std::path::Path;
use std::process::Command;

fn cp_a(src: &Path, dst: &Path) {
    // cp -a keeps modes, owners, times, xattrs (incl. ACLs) and hard links;
    // --sparse=always keeps holes.
    let o = Command::new("cp")
        .args(["-a", "--sparse=always", "-T"])
        .arg(src)
        .arg(dst)
        .output()
        .expect("running cp");
    assert!(
        o.status.success(),
        "cp -a: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn setup(name: &str) -> (TestDir, std::path::PathBuf, std::path::PathBuf) {
    hapair_tests::env::require_root();
    let t = TestDir::new(name);
    let a = t.mkdir("a");
    workload::mixed(&a);
    let b = t.join("b");
    cp_a(&a, &b);
    (t, a, b)
}

fn assert_reports(a: &Path, b: &Path, needle: &str) {
    let d = tree_diff(a, b);
    assert!(
        d.iter().any(|l| l.contains(needle)),
        "expected a difference containing {needle:?}, got {d:#?}"
    );
}

#[test]
fn identical_copies_compare_equal() {
    let (_t, a, b) = setup("td-equal");
    let r = tree_diff_with(&a, &b, &DiffOptions::default());
    assert!(r.diffs.is_empty(), "{:#?}", r.diffs);
    assert!(r.entries > 30, "walked only {} entries", r.entries);
}

#[test]
fn detects_each_kind_of_difference() {
    let (_t, a, b) = setup("td-kinds");
    // Content, at a precise offset.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.join("a/f6"))
            .unwrap();
        let mtime = std::fs::metadata(a.join("a/f6"))
            .unwrap()
            .modified()
            .unwrap();
        f.write_at(b"X", 3).unwrap();
        f.set_modified(mtime).unwrap();
    }
    assert_reports(&a, &b, "a/f6: content differs at byte 3");
    cp_fresh(&a, &b);

    std::fs::set_permissions(
        b.join("a/f1"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    assert_reports(&a, &b, "a/f1: mode");
    cp_fresh(&a, &b);

    std::os::unix::fs::lchown(b.join("a/f1"), Some(7), None).unwrap();
    assert_reports(&a, &b, "a/f1: owner");
    cp_fresh(&a, &b);

    workload::set_mtime(&b.join("a/f1"), 1_000_000_000, 123_456_788);
    assert_reports(&a, &b, "a/f1: mtime");
    cp_fresh(&a, &b);

    workload::set_xattr(&b.join("a/f1"), "user.small", b"other");
    assert_reports(&a, &b, "xattr user.small differs");
    cp_fresh(&a, &b);

    let o = Command::new("setfacl")
        .args(["-m", "u:nobody:rw"])
        .arg(b.join("a/f3"))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_reports(&a, &b, "system.posix_acl_access");
    cp_fresh(&a, &b);

    std::fs::remove_file(b.join("x/rel")).unwrap();
    std::os::unix::fs::symlink("../a/f2", b.join("x/rel")).unwrap();
    assert_reports(&a, &b, "x/rel: symlink target");
    cp_fresh(&a, &b);

    // Same content, but a separate inode instead of a hard link.
    std::fs::remove_file(b.join("x/link2")).unwrap();
    std::fs::copy(a.join("x/link2"), b.join("x/link2")).unwrap();
    assert_reports(&a, &b, "hard links of");
    cp_fresh(&a, &b);

    std::fs::write(b.join("a/extra"), b"").unwrap();
    assert_reports(&a, &b, "a/extra: only in B");
    cp_fresh(&a, &b);

    std::fs::remove_file(b.join("x/fifo")).unwrap();
    std::fs::write(b.join("x/fifo"), b"").unwrap();
    assert_reports(&a, &b, "x/fifo: type fifo vs file");
}

/// Replaces b by a fresh copy of a.
fn cp_fresh(a: &Path, b: &Path) {
    std::fs::remove_dir_all(b).unwrap();
    cp_a(a, b);
    let d = tree_diff(a, b);
    assert!(d.is_empty(), "fresh copy differs: {d:#?}");
}

#[test]
fn root_mtime_option() {
    hapair_tests::env::require_root();
    let t = TestDir::new("td-root");
    let a = t.mkdir("a");
    let b = t.mkdir("b");
    workload::set_mtime(&a, 1_000_000_000, 0);
    workload::set_mtime(&b, 1_000_000_001, 0);
    assert_eq!(tree_diff(&a, &b).len(), 1);
    let opts = DiffOptions {
        ignore_root_mtime: true,
        ..Default::default()
    };
    assert!(tree_diff_with(&a, &b, &opts).diffs.is_empty());
}

#[test]
fn works_past_path_max_and_reports_sparse_as_info() {
    hapair_tests::env::require_root();
    let t = TestDir::new("td-deep");
    let a = t.mkdir("a");
    // 40 levels of 150-byte names: about 6,000 bytes of path (cp -a
    // cannot copy that, so both sides are built alike).
    workload::deep_tree(&a, 40, 150);
    let b = t.mkdir("b");
    workload::deep_tree(&b, 40, 150);
    let opts = DiffOptions {
        ignore_dir_mtime: true,
        ..Default::default()
    };
    let r = tree_diff_with(&a, &b, &opts);
    assert!(r.diffs.is_empty(), "{:#?}", r.diffs);
    assert!(r.entries >= 44, "walked {} entries", r.entries);

    // A difference at the bottom is found and named.
    let c = t.mkdir("c");
    workload::deep_tree(&c, 41, 150);
    let r = tree_diff_with(&a, &c, &opts);
    assert_eq!(r.diffs.len(), 1, "{:#?}", r.diffs);
    assert!(
        r.diffs[0].contains("/040ddd") && r.diffs[0].ends_with("only in B (directory)"),
        "{:#?}",
        r.diffs
    );

    // Same bytes, one sparse and one dense: equal, with an info line.
    let s = t.mkdir("s");
    let s2 = t.mkdir("s2");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(s.join("f")).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"x").unwrap();
        let mut data = vec![0u8; (1 << 20) + 1];
        data[1 << 20] = b'x';
        std::fs::write(s2.join("f"), &data).unwrap();
        let m = std::fs::metadata(s.join("f")).unwrap().modified().unwrap();
        std::fs::File::options()
            .write(true)
            .open(s2.join("f"))
            .unwrap()
            .set_modified(m)
            .unwrap();
        workload::set_mtime(&s, 5, 0);
        workload::set_mtime(&s2, 5, 0);
    }
    let r = tree_diff_with(&s, &s2, &DiffOptions::default());
    assert!(r.diffs.is_empty(), "{:#?}", r.diffs);
    assert!(
        r.info.iter().any(|i| i.contains("allocated blocks")),
        "{:#?}",
        r.info
    );
}

/// Files of 6 GiB that are mostly holes are compared by their data
/// segments, and still every difference is found: a changed byte inside a
/// data region beyond 4 GiB, data on one side where the other has a hole,
/// and a non-zero byte where the other side has an explicit zero block.
#[test]
fn sparse_files_beyond_4_gib_are_compared_exactly() {
    use std::os::unix::fs::FileExt;
    let t = TestDir::new("td-sparse");
    let size: u64 = 6 << 30;
    let make = |dir: &Path, edits: &[(u64, &[u8])]| {
        let f = std::fs::File::create(dir.join("big")).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"across the 4 GiB line", (4 << 30) - 10)
            .unwrap();
        f.write_all_at(b"tail", size - 4).unwrap();
        for (off, data) in edits {
            f.write_all_at(data, *off).unwrap();
        }
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000))
            .unwrap();
        workload::set_mtime(dir, 5, 0);
    };
    let a = t.mkdir("a");
    make(&a, &[]);
    let same = t.mkdir("same");
    make(&same, &[]);
    let started = std::time::Instant::now();
    let r = tree_diff_with(&a, &same, &DiffOptions::default());
    assert!(r.diffs.is_empty(), "{:#?}", r.diffs);
    eprintln!("two 6 GiB sparse files compared in {:?}", started.elapsed());

    type Edits<'a> = Vec<(u64, &'a [u8])>;
    let cases: Vec<(&str, Edits)> = vec![
        ("in a data region past 4 GiB", vec![((4 << 30) + 3, b"X")]),
        ("where A has a hole", vec![(5 << 30, b"data")]),
        ("in the last bytes", vec![(size - 1, b"T")]),
    ];
    for (what, edits) in cases {
        let b = t.mkdir(format!("b-{}", what.replace(' ', "-")));
        make(&b, &edits);
        let r = tree_diff_with(&a, &b, &DiffOptions::default());
        let want = format!("content differs at byte {}", edits[0].0);
        assert!(
            r.diffs.iter().any(|d| d.contains(&want)),
            "{what}: want {want:?}, got {:#?}",
            r.diffs
        );
    }
    // Zeros written as data on one side equal a hole on the other, but a
    // non-zero byte in such a block does not.
    let z = t.mkdir("zeros");
    make(&z, &[(3 << 30, &[0u8; 65536])]);
    assert!(tree_diff_with(&a, &z, &DiffOptions::default())
        .diffs
        .is_empty());
    let nz = t.mkdir("nonzero");
    make(&nz, &[(3 << 30, &[0u8; 65536]), ((3 << 30) + 65535, b"!")]);
    let r = tree_diff_with(&a, &nz, &DiffOptions::default());
    assert!(
        r.diffs
            .iter()
            .any(|d| d.contains(&format!("content differs at byte {}", (3u64 << 30) + 65535))),
        "{:#?}",
        r.diffs
    );
}
