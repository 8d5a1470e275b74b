//! Bad input gets a clear error and changes nothing: a mount with another
//! cluster's certificates is refused, garbage datagrams do not crash the
//! mirror, and command-line errors exit 2 naming the flag.

use hapair_tests::proc::describe;
use hapair_tests::treediff::{tree_diff_with, DiffOptions};
use hapair_tests::{env, mount_fstype, workload, Harness, MountOpts};
use std::process::Command;
use std::time::Duration;

fn cp_a(src: &std::path::Path, dst: &std::path::Path) {
    let o = Command::new("cp")
        .args(["-a", "-T"])
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

#[test]
fn foreign_ca_is_refused() {
    let _s = env::serial();
    let mut h = Harness::new("foreign-ca");
    let other = h.tmp().join("tls-other");
    h.tls_init(&other, &["n1", "n2"]);
    workload::small_tree(&h.dir, 1, 10);
    workload::small_tree(&h.mirror_dir, 2, 10);
    let mirror_before = h.tmp().join("mirror-before");
    let dir_before = h.tmp().join("dir-before");
    cp_a(&h.mirror_dir, &mirror_before);
    cp_a(&h.dir, &dir_before);
    h.start_mirror();
    let p = h.spawn_mount(&MountOpts {
        tls: Some(other),
        ..Default::default()
    });
    let s = p.wait_timeout(Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "a mount with a foreign CA's certificate still runs after 60 s (it must exit non-zero); stderr tail:\n{}",
            p.stderr_tail(20)
        )
    });
    let err = p.stderr_tail(20);
    assert!(
        s.code().is_some_and(|c| c != 0),
        "the mount with a foreign CA exited with {} (want non-zero):\n{err}",
        describe(&s)
    );
    eprintln!(
        "mount with a foreign CA: {}; stderr tail:\n{err}",
        describe(&s)
    );
    assert_ne!(
        mount_fstype(&h.dir).as_deref(),
        Some("fuse.hapair"),
        "the refused mount left DIR mounted"
    );
    drop(h.mount.take());
    drop(h.fuse.take());
    let d = tree_diff_with(&mirror_before, &h.mirror_dir, &DiffOptions::default());
    assert!(
        d.diffs.is_empty(),
        "the mirror changed after a refused mount:\n{}",
        d.diffs.join("\n")
    );
    let d = tree_diff_with(&dir_before, &h.dir, &DiffOptions::default());
    assert!(
        d.diffs.is_empty(),
        "DIR changed after a refused mount:\n{}",
        d.diffs.join("\n")
    );
    assert!(
        h.mirror().is_running(),
        "the mirror died after refusing a foreign peer:\n{}",
        h.mirror().stderr_tail(20)
    );
    assert!(
        h.mirror().stderr().to_lowercase().contains("cert") || err.to_lowercase().contains("cert"),
        "neither side's log mentions the certificate problem"
    );
}

/// Random datagrams and QUIC-looking garbage (long-header Initials with
/// random contents, unknown versions) to the mirror's port: it keeps
/// running and then serves a legitimate mount.
#[test]
fn garbage_datagrams_do_not_crash_the_mirror() {
    let _s = env::serial();
    let mut h = Harness::new("garbage");
    h.start_mirror();
    let peer = h.peer.unwrap_or_else(|| panic!("no peer"));
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut rng = env::Rng(env::seed());
    for i in 0..3000u32 {
        let len = match i % 4 {
            0 => rng.range(1, 40) as usize,
            _ => rng.range(1200, 1452) as usize,
        };
        let mut b: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        match i % 4 {
            // A long-header Initial of QUIC v1 with random protected contents.
            1 => {
                b[0] = 0xC0 | (b[0] & 0x0F);
                b[1..5].copy_from_slice(&1u32.to_be_bytes());
                b[5] = 8;
                b[14] = 8;
            }
            // An unknown version (triggers version negotiation).
            2 => {
                b[0] |= 0x80;
                b[1..5].copy_from_slice(&0x1a2a_3a4au32.to_be_bytes());
            }
            // A short header with a random connection ID.
            3 => b[0] = 0x40 | (b[0] & 0x3F),
            _ => {}
        }
        let _ = sock.send_to(&b, peer);
        if i % 200 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        h.mirror().is_running(),
        "the mirror died on garbage datagrams:\n{}",
        h.mirror().stderr_tail(30)
    );
    // It still serves a real mount.
    h.mount(&MountOpts::default());
    workload::small_tree(&h.dir, 4, 12);
    h.stop_mount(Duration::from_secs(60));
    h.assert_trees_equal(None, &DiffOptions::default());
}

/// Runs hapair with `args`; asserts exit 2 and that stderr names `needle`.
fn usage_error(args: &[&str], needle: &str) {
    let bin = env::hapair_bin();
    let o = Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(2),
        "hapair {args:?}: want exit 2, got {}; stderr:\n{err}",
        describe(&o.status)
    );
    assert!(
        err.contains(needle),
        "hapair {args:?}: stderr does not name {needle:?}:\n{err}"
    );
}

#[test]
fn flag_errors_exit_2_naming_the_flag() {
    let t = hapair_tests::TestDir::new("flags");
    let dir = t.mkdir("dir");
    let tls = t.join("tls");
    let d = dir.to_str().expect("utf-8 temp path");
    let tl = tls.to_str().expect("utf-8 temp path");
    let o = Command::new(env::hapair_bin())
        .args(["tls", "init", tl, "--nodes", "n1,n2"])
        .output()
        .expect("tls init");
    assert!(
        o.status.success(),
        "tls init: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    usage_error(&["mount", "--tls", tl, "--node", "n1", d], "--peer");
    usage_error(
        &[
            "mount",
            "--peer",
            "not-an-address",
            "--tls",
            tl,
            "--node",
            "n1",
            d,
        ],
        "--peer",
    );
    usage_error(
        &[
            "mount",
            "--peer",
            "127.0.0.1:9",
            "--tls",
            tl,
            "--node",
            "n1",
            "--mode",
            "bogus",
            d,
        ],
        "--mode",
    );
    usage_error(
        &[
            "mount",
            "--peer",
            "127.0.0.1:9",
            "--tls",
            tl,
            "--node",
            "n1",
            "--timeout-ms",
            "5",
            d,
        ],
        "--timeout-ms",
    );
    usage_error(
        &[
            "mount",
            "--peer",
            "127.0.0.1:9",
            "--tls",
            "/nonexistent/tls",
            "--node",
            "n1",
            d,
        ],
        "--tls",
    );
    usage_error(
        &[
            "mount",
            "--peer",
            "127.0.0.1:9",
            "--tls",
            tl,
            "--node",
            "n9",
            d,
        ],
        "n9",
    );
    usage_error(
        &[
            "mount",
            "--peer",
            "127.0.0.1:9",
            "--tls",
            tl,
            "--node",
            "n1",
            "/nonexistent/dir",
        ],
        "/nonexistent/dir",
    );
    usage_error(
        &["mirror", "--listen", "127.0.0.1:0", "--node", "n2", d],
        "--tls",
    );
    usage_error(
        &[
            "mirror", "--listen", "nowhere", "--tls", tl, "--node", "n2", d,
        ],
        "--listen",
    );
    usage_error(
        &[
            "mirror",
            "--listen",
            "127.0.0.1:0",
            "--tls",
            "/nonexistent/tls",
            "--node",
            "n2",
            d,
        ],
        "--tls",
    );
    usage_error(&["tls", "init", tl], "--nodes");
    usage_error(&["no-such-command"], "no-such-command");
    // Nothing was mounted by any of these.
    assert_eq!(
        mount_fstype(&dir),
        None,
        "a failed command left a mount at {d}"
    );
}
