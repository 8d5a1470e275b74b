//! End-to-end replication: the real `hapair mirror` and `hapair mount` on
//! loopback, a workload on the mount, a clean stop, then the independent
//! tree comparator between DIR and MIRROR. Needs root, /dev/fuse and the
//! hapair binary (`cargo build -p hapair`).

use hapair_tests::proc::Stopped;
use hapair_tests::treediff::DiffOptions;
use hapair_tests::{env, mount_fstype, workload, Harness, MountOpts};
use std::io::Write;
use std::time::{Duration, Instant};

fn replicate_mixed(mode: &str) {
    let _s = env::serial();
    let mut h = Harness::new(&format!("basic-{mode}"));
    h.start_mirror();
    h.mount(&MountOpts::mode(mode));
    let st = h
        .wait_status(Duration::from_secs(10), |v| v["state"] == "replicating")
        .unwrap_or_else(|e| panic!("mount not replicating: {e}"));
    assert_eq!(st["mode"], mode, "status.json mode: {st}");
    workload::mixed(&h.dir);
    h.stop_mount(Duration::from_secs(60));
    h.assert_trees_equal(None, &DiffOptions::default());
}

#[test]
fn replicate_basic_sync() {
    replicate_mixed("sync");
}

#[test]
fn replicate_basic_strict() {
    replicate_mixed("strict");
}

#[test]
fn replicate_basic_async() {
    replicate_mixed("async");
}

/// status.json says `serving` only while the kernel holds the FUSE mount. A
/// script that waits for it and writes into DIR at once writes through the
/// mount, and the write reaches the mirror; after SIGTERM it says false.
#[test]
fn the_status_says_serving_only_while_the_mount_is_held() {
    let _s = env::serial();
    let mut h = Harness::new("serving");
    h.start_mirror();
    let opts = MountOpts::default();
    h.spawn_mount(&opts);
    let end = Instant::now() + Duration::from_secs(30);
    let (mut unserved, mut unreadable) = (0u32, 0u32);
    loop {
        match h.status() {
            Ok(v) if v["serving"] == true => {
                assert_eq!(
                    mount_fstype(&h.dir).as_deref(),
                    Some("fuse.hapair"),
                    "status says serving but {} is not the FUSE mount: {v}",
                    h.dir.display()
                );
                break;
            }
            Ok(v) => {
                assert_eq!(v["serving"], false, "status.json serving field: {v}");
                unserved += 1;
            }
            Err(_) => unreadable += 1, // not written yet
        }
        assert!(
            Instant::now() < end,
            "status never said serving ({unserved} reads said not, {unreadable} unreadable); \
             mount stderr:\n{}",
            h.mount
                .as_mut()
                .map(|m| m.stderr_tail(30))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // At once, with no look at the mount table: this goes through the mount.
    std::fs::create_dir(h.dir.join("first")).expect("mkdir first");
    let mut f = std::fs::File::create(h.dir.join("first/f")).expect("create first/f");
    f.write_all(b"written as soon as the status said serving\n")
        .expect("write first/f");
    f.sync_all().expect("fsync first/f");
    drop(f);
    h.wait_mounted(&opts);
    h.wait_status(Duration::from_secs(30), |v| v["state"] == "replicating")
        .unwrap_or_else(|e| panic!("mount not replicating: {e}"));
    h.stop_mount(Duration::from_secs(60));
    let st = h.status().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st["serving"], false, "status after the unmount: {st}");
    assert!(
        h.mirror_dir.join("first/f").is_file(),
        "the mirror lacks first/f, written as soon as the status said serving"
    );
    h.assert_trees_equal(None, &DiffOptions::default());
}

/// Paths longer than PATH_MAX through the mount (40 levels of 150-byte
/// names, about 6,000 bytes).
#[test]
fn replicate_long_paths() {
    let _s = env::serial();
    let mut h = Harness::new("longpath");
    h.start_mirror();
    h.mount(&MountOpts::default());
    workload::deep_tree(&h.dir, 40, 150);
    h.stop_mount(Duration::from_secs(60));
    h.assert_trees_equal(None, &DiffOptions::default());
}

/// A second mount over the same DIR and MIRROR after a clean stop: the
/// restart's sync and later changes keep the copies equal.
#[test]
fn replicate_after_restart() {
    let _s = env::serial();
    let mut h = Harness::new("restart");
    h.start_mirror();
    h.mount(&MountOpts::default());
    workload::small_tree(&h.dir, 1, 20);
    h.stop_mount(Duration::from_secs(60));
    h.assert_trees_equal(None, &DiffOptions::default());
    h.mount(&MountOpts::default());
    workload::small_tree(&h.dir.join("d1"), 2, 10);
    std::fs::remove_file(h.dir.join("d2/f2")).expect("unlink d2/f2 on the mount");
    h.stop_mount(Duration::from_secs(60));
    h.assert_trees_equal(None, &DiffOptions::default());
}

/// DIR and MIRROR start with different content (changed files, extra files
/// on both sides, a file where the other side has a directory, a deep
/// tree): once the mount is up, and after a clean stop, they are equal.
#[test]
fn initial_sync() {
    let _s = env::serial();
    let mut h = Harness::new("initsync");
    workload::mixed(&h.dir);
    workload::small_tree(&h.dir, 1, 30);
    workload::deep_tree(&h.dir, 35, 150);
    workload::small_tree(&h.mirror_dir, 2, 40);
    std::fs::write(h.mirror_dir.join("a"), b"a file where DIR has a directory").expect("write");
    std::fs::create_dir_all(h.mirror_dir.join("only-on-mirror/sub")).expect("mkdir");
    std::fs::write(h.mirror_dir.join("only-on-mirror/sub/f"), b"stale").expect("write");
    std::fs::create_dir(h.dir.join("x/was-file-on-mirror")).expect("mkdir");
    std::fs::write(h.mirror_dir.join("x"), b"x is a directory in DIR").expect("write");
    h.start_mirror();
    h.mount(&MountOpts::default());
    h.stop_mount(Duration::from_secs(60));
    h.assert_trees_equal(None, &DiffOptions::default());
}

/// With --backing SRC, the mount serves SRC's content at DIR; once it is
/// up (before any write), MIRROR equals SRC, compared while mounted.
#[test]
fn initial_sync_backing() {
    let _s = env::serial();
    let mut h = Harness::new("initsync-backing");
    let src = h.tmp().mkdir("src");
    workload::mixed(&src);
    workload::small_tree(&h.mirror_dir, 3, 15);
    h.start_mirror();
    h.mount(&MountOpts {
        backing: Some(src.clone()),
        ..Default::default()
    });
    h.wait_status(Duration::from_secs(30), |v| v["state"] == "replicating")
        .unwrap_or_else(|e| panic!("mount not replicating: {e}"));
    h.assert_trees_equal(Some(&src), &DiffOptions::default());
    // The mount shows SRC's content.
    assert_eq!(
        std::fs::read(h.dir.join("a/f6")).expect("read through the mount"),
        b"rewritten"
    );
    std::fs::write(h.dir.join("new-after-sync"), b"n").expect("write through the mount");
    h.stop_mount(Duration::from_secs(60));
    h.assert_trees_equal(Some(&src), &DiffOptions::default());
}

/// A running mount rejoins its mirror: the link is cut (the mount goes on
/// alone and journals), changes are made while degraded, the link comes
/// back, and without a restart the mount catches the mirror up and
/// replicates again. A writer keeps writing across the rejoin (its calls
/// pause while the mirror is caught up).
#[test]
fn rejoins_the_mirror_after_a_link_cut() {
    let _s = env::serial();
    let mut h = Harness::new("rejoin");
    h.start_mirror_in_netns();
    h.mount(&MountOpts {
        timeout_ms: Some(1000),
        extra: vec!["--reconnect-ms".into(), "300".into()],
        ..MountOpts::mode("sync")
    });
    h.wait_status(Duration::from_secs(10), |v| v["state"] == "replicating")
        .unwrap_or_else(|e| panic!("mount not replicating: {e}"));
    workload::small_tree(&h.dir, 1, 10);
    let veth = h.veth.as_ref().unwrap_or_else(|| panic!("no veth"));
    veth.set_up(false);
    // A durability point makes the cut visible within the timeout.
    workload::small_tree(&h.dir.join("d1"), 2, 5);
    let f = std::fs::File::open(&h.dir).expect("open dir");
    f.sync_all().expect("fsync of the mount's root while cut");
    drop(f);
    h.wait_status(Duration::from_secs(10), |v| v["state"] == "degraded")
        .unwrap_or_else(|e| panic!("not degraded after the cut: {e}"));
    workload::small_tree(&h.dir.join("d2"), 3, 5);
    std::fs::remove_file(h.dir.join("d1/f1")).expect("unlink while degraded");
    h.wait_status(Duration::from_secs(5), |v| {
        v["journal_records"].as_u64().unwrap_or(0) > 0
    })
    .unwrap_or_else(|e| panic!("degraded changes are not journaled: {e}"));
    // A writer runs across the rejoin: its changes either land in the
    // journal before the catch-up or are replicated after it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (dir, stop) = (h.dir.join("live"), stop.clone());
        std::thread::spawn(move || {
            std::fs::create_dir_all(&dir).expect("mkdir live");
            let mut n = 0u32;
            while n < 5000 && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let p = dir.join(format!("f{}", n % 50));
                std::fs::write(&p, format!("record {n}\n").repeat(1 + (n % 7) as usize))
                    .expect("write while rejoining");
                n += 1;
            }
            n
        })
    };
    h.veth
        .as_ref()
        .unwrap_or_else(|| panic!("no veth"))
        .set_up(true);
    let st = h
        .wait_status(Duration::from_secs(30), |v| v["state"] == "replicating")
        .unwrap_or_else(|e| panic!("the mount did not rejoin its mirror: {e}"));
    assert_eq!(
        st["journal_records"], 0,
        "journal cleared after the rejoin: {st}"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let n = writer.join().unwrap_or_else(|_| panic!("writer panicked"));
    eprintln!("writer made {n} writes across the rejoin");
    // Replication goes on after the rejoin, and the copies are equal.
    workload::small_tree(&h.dir.join("d3"), 4, 5);
    h.stop_mount(Duration::from_secs(60));
    h.assert_trees_equal(None, &DiffOptions::default());
}

/// In async mode nothing waits for the mirror while the mount serves, but
/// an unmount is where writes stop: the mount must bring the mirror up to
/// date before it exits (bounded by the timeout), or the mirror's tree
/// would not catch up to the mount's. The mirror is stopped (SIGSTOP)
/// while the last writes are made and the mount is told to stop; it is
/// resumed a moment later, and after the mount exited the trees must be
/// equal.
#[test]
fn async_unmount_waits_for_the_mirror_to_catch_up() {
    let _s = env::serial();
    let mut h = Harness::new("async-drain");
    h.start_mirror();
    h.mount(&MountOpts::mode("async"));
    workload::small_tree(&h.dir, 3, 8);
    let stopped = Stopped::new(h.mirror());
    std::fs::write(
        h.dir.join("last-write"),
        b"written while the mirror was stopped",
    )
    .expect("write on the mount");
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(stopped);
    });
    h.stop_mount(Duration::from_secs(60));
    let _ = resume.join();
    h.assert_trees_equal(None, &DiffOptions::default());
}

/// A SIGTERM during the start (here: while the mount waits for a mirror
/// that does not answer, right after its first status) is a clean stop
/// once the mount serves: exit 0, unmounted, the directory intact. The
/// signal used to be caught only once a task had polled its listener, so a
/// SIGTERM before that killed the mount with the default action.
#[test]
fn sigterm_during_the_start_is_a_clean_stop() {
    let _s = env::serial();
    let mut h = Harness::new("early-term");
    h.start_mirror();
    // A mirror that does not answer: the start waits for its timeout.
    h.mirror().signal(libc::SIGSTOP);
    workload::small_tree(&h.dir, 3, 30);
    let before = h.tmp().path().join("before");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&h.dir)
        .arg(&before)
        .status()
        .expect("cp");
    assert!(cp.success());
    h.spawn_mount(&MountOpts {
        timeout_ms: Some(2_000),
        ..MountOpts::default()
    });
    let st = h
        .wait_status(Duration::from_secs(10), |_| true)
        .unwrap_or_else(|e| panic!("the mount wrote no status: {e}"));
    assert_ne!(
        st["state"], "replicating",
        "the start was not under way: {st}"
    );
    h.stop_mount(Duration::from_secs(60));
    h.mirror().signal(libc::SIGCONT);
    let diffs = hapair_tests::treediff::tree_diff(&before, &h.dir);
    assert!(diffs.is_empty(), "the directory changed: {diffs:#?}");
}
