//! Bad input gets a clear error and changes nothing: a mount with another
//! cluster's certificates is refused, garbage datagrams do not crash the
//! mirror, hostile operations from a client with a valid certificate are
//! refused, logged and never applied, and command-line errors exit 2 naming
//! the flag.

use hapair_proto::{Op, RelPath, TimeSet, Timestamp, ToMirror};
use hapair_tests::hostile::{self, HostileClient};
use hapair_tests::proc::describe;
use hapair_tests::treediff::{tree_diff_with, DiffOptions};
use hapair_tests::{env, mount_fstype, workload, Harness, MountOpts};
use std::os::unix::ffi::OsStrExt;
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

fn names_in(dir: &std::path::Path) -> std::collections::BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .file_name()
        })
        .collect()
}

fn c(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn rel(s: &str) -> RelPath {
    RelPath::parse(s.as_bytes()).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn ts() -> Timestamp {
    Timestamp {
        sec: 1_600_000_000,
        nsec: 0,
    }
}

fn create_op(path: RelPath) -> Op {
    Op::Create {
        path,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: ts(),
        parent_mtime: None,
    }
}

fn symlink_to(path: RelPath, target: &[u8]) -> Op {
    Op::Symlink {
        path,
        target: target.to_vec(),
        uid: 0,
        gid: 0,
        mtime: ts(),
        parent_mtime: None,
    }
}

fn chmod_op(path: RelPath, mode: u32) -> Op {
    Op::SetAttr {
        path,
        mode: Some(mode),
        uid: None,
        gid: None,
        size: None,
        atime: TimeSet::Omit,
        mtime: TimeSet::Omit,
    }
}

/// A client holding a *valid* cluster certificate (node n1's) connects to
/// the real mirror, does the real handshake, and sends operations that name
/// `../x`, absolute paths, NUL or empty components (hand-encoded: a
/// `RelPath` cannot hold them), then operations with valid paths that go
/// through a symlink it planted to the outside or to `/`, and an
/// out-of-order sequence number. Each is refused and logged, ends its
/// session, and is never applied (nor is anything sent after it); nothing
/// outside MIRROR changes; the mirror keeps running and then serves a
/// legitimate mount to an identical tree.
#[test]
fn hostile_operations_are_refused_logged_and_never_applied() {
    let _s = env::serial();
    let mut h = Harness::new("hostile-ops");
    // A sentinel tree next to MIRROR, and a pristine copy to compare with.
    let outside = h.tmp().mkdir("outside");
    std::fs::create_dir(outside.join("dir")).expect("mkdir");
    std::fs::write(outside.join("secret"), b"top secret").expect("write");
    std::fs::write(outside.join("dir/inner"), b"inner").expect("write");
    workload::set_xattr(&outside.join("secret"), "user.keep", b"kept");
    let outside_before = h.tmp().join("outside-before");
    cp_a(&outside, &outside_before);
    let tag = env::unique_tag();
    let abs1 = format!("/tmp/hapair-hostile-abs1-{tag}");
    let abs2 = format!("/tmp/hapair-hostile-abs2-{tag}");
    let abs3 = format!("hapair-hostile-abs3-{tag}");
    h.start_mirror();
    let mut tmp_names = names_in(h.tmp().path());
    // The one entry the mirror itself adds next to MIRROR: its write-ahead
    // log, made by the first session.
    tmp_names.insert(".mirror.hapair-log".into());
    let peer = h.peer.unwrap_or_else(|| panic!("no peer"));
    let tls = h.tls.clone();
    let m = hostile::marker_path();
    let secret_via_dotdot = vec![c(".."), c("outside"), c("secret")];

    // (what, template with the marker path, payload, raw components).
    type Case<'a> = (&'a str, Op, Vec<u8>, Vec<Vec<u8>>);
    let malformed: Vec<Case> = vec![
        (
            "create ../escaped",
            create_op(m.clone()),
            vec![],
            vec![c(".."), c("escaped")],
        ),
        (
            "write ../outside/secret",
            Op::Write {
                path: m.clone(),
                offset: 0,
                mtime: TimeSet::At(ts()),
            },
            b"PWNED".to_vec(),
            secret_via_dotdot.clone(),
        ),
        (
            "create an absolute path",
            create_op(m.clone()),
            vec![],
            abs1.split('/').map(c).collect(),
        ),
        (
            "create an absolute path in one component",
            create_op(m.clone()),
            vec![],
            vec![c(&abs2)],
        ),
        (
            "rename ../outside/secret into the mirror",
            Op::Rename {
                from: m.clone(),
                to: rel("stolen-by-rename"),
                flags: 0,
                from_parent_mtime: None,
                to_parent_mtime: None,
            },
            vec![],
            secret_via_dotdot.clone(),
        ),
        (
            "hard-link ../outside/secret into the mirror",
            Op::Link {
                existing: m.clone(),
                new: rel("stolen-by-link"),
                parent_mtime: None,
            },
            vec![],
            secret_via_dotdot.clone(),
        ),
        (
            "chmod ../outside/secret",
            chmod_op(m.clone(), 0o777),
            vec![],
            secret_via_dotdot.clone(),
        ),
        (
            "setxattr on ../outside/secret",
            Op::SetXattr {
                path: m.clone(),
                name: c("user.pwned"),
                value: c("1"),
                flags: 0,
            },
            vec![],
            secret_via_dotdot.clone(),
        ),
        (
            "symlink with a NUL in its name",
            symlink_to(m.clone(), b"/etc"),
            vec![],
            vec![c("evil\0name")],
        ),
        (
            "mkdir with an empty component",
            Op::Mkdir {
                path: m.clone(),
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: ts(),
                parent_mtime: None,
            },
            vec![],
            vec![c("a"), Vec::new()],
        ),
        ("create .", create_op(m.clone()), vec![], vec![c(".")]),
    ];
    let mut expected_on_mirror = std::collections::BTreeSet::new();
    for (i, (what, template, payload, comps)) in malformed.iter().enumerate() {
        let mut cl = HostileClient::connect(peer, &tls, "n1")
            .unwrap_or_else(|e| panic!("{what}: a valid client cannot connect: {e}"));
        // One legitimate op before and one after the hostile one, all in one
        // write: the one before is applied, nothing from the hostile one on.
        let before = format!("before-{i}");
        let mut bytes = hostile::frame(
            &ToMirror::Op {
                seq: 1,
                op: create_op(rel(&before)),
            },
            &[],
        );
        bytes.extend(hostile::spliced_frame(
            &ToMirror::Op {
                seq: 2,
                op: template.clone(),
            },
            payload,
            comps,
        ));
        bytes.extend(hostile::frame(
            &ToMirror::Op {
                seq: 3,
                op: create_op(rel(&format!("after-{i}"))),
            },
            &[],
        ));
        cl.send_raw(&bytes)
            .unwrap_or_else(|e| panic!("{what}: sending: {e}"));
        let end = cl.read_until_end(Duration::from_secs(20));
        eprintln!("{what}: session ended ({}), {:?}", end.end, end.messages);
        assert!(
            !end.end.starts_with("timeout"),
            "{what}: the mirror did not end the session: {end:?}"
        );
        // The op before was applied and acknowledged (the mirror delivers
        // its last ack before it closes), nothing after it.
        assert!(
            end.applied() == 1 && end.failed().is_none(),
            "{what}: want the op before acknowledged and nothing else: {end:?}"
        );
        expected_on_mirror.insert(std::ffi::OsString::from(before));
        assert!(
            h.mirror().is_running(),
            "{what}: the mirror died:\n{}",
            h.mirror().stderr_tail(30)
        );
    }

    // Valid paths through planted symlinks: the applier refuses them.
    let outside_b = outside.as_os_str().as_bytes().to_vec();
    let mut cl = HostileClient::connect(peer, &tls, "n1").unwrap_or_else(|e| panic!("{e}"));
    cl.send_op(1, symlink_to(rel("evil"), &outside_b), &[])
        .and_then(|_| cl.send_op(2, symlink_to(rel("rootlink"), b"/"), &[]))
        .unwrap_or_else(|e| panic!("planting symlinks: {e}"));
    let end = cl.wait_applied(2, Duration::from_secs(20));
    assert_eq!(end.end, "applied", "planting symlinks: {end:?}");
    drop(cl);
    expected_on_mirror.insert("evil".into());
    expected_on_mirror.insert("rootlink".into());
    let mut via_root = vec![c("rootlink")];
    via_root.extend(outside.components().filter_map(|p| match p {
        std::path::Component::Normal(n) => Some(n.as_bytes().to_vec()),
        _ => None,
    }));
    via_root.push(c("secret"));
    let via_root = RelPath::from_components(via_root).unwrap_or_else(|e| panic!("{e}"));
    let through: Vec<(&str, Op, Vec<u8>)> = vec![
        (
            "write evil/secret",
            Op::Write {
                path: rel("evil/secret"),
                offset: 0,
                mtime: TimeSet::At(ts()),
            },
            b"PWNED".to_vec(),
        ),
        (
            "write rootlink/<outside>/secret",
            Op::Write {
                path: via_root.clone(),
                offset: 0,
                mtime: TimeSet::At(ts()),
            },
            b"PWNED".to_vec(),
        ),
        (
            "create evil/planted",
            create_op(rel("evil/planted")),
            vec![],
        ),
        (
            "create rootlink/tmp/<new>",
            create_op(rel(&format!("rootlink/tmp/{abs3}"))),
            vec![],
        ),
        (
            "hard-link evil/secret into the mirror",
            Op::Link {
                existing: rel("evil/secret"),
                new: rel("stolen-hard"),
                parent_mtime: None,
            },
            vec![],
        ),
        (
            "rename evil/secret into the mirror",
            Op::Rename {
                from: rel("evil/secret"),
                to: rel("stolen-renamed"),
                flags: 0,
                from_parent_mtime: None,
                to_parent_mtime: None,
            },
            vec![],
        ),
        (
            "chmod evil/secret",
            chmod_op(rel("evil/secret"), 0o777),
            vec![],
        ),
        (
            "chmod rootlink/<outside>/secret",
            chmod_op(via_root.clone(), 0o777),
            vec![],
        ),
        (
            "setxattr evil/secret",
            Op::SetXattr {
                path: rel("evil/secret"),
                name: c("user.pwned"),
                value: c("1"),
                flags: 0,
            },
            vec![],
        ),
        (
            "truncate evil/secret",
            Op::SetAttr {
                path: rel("evil/secret"),
                mode: None,
                uid: None,
                gid: None,
                size: Some(0),
                atime: TimeSet::Omit,
                mtime: TimeSet::Omit,
            },
            vec![],
        ),
        (
            "unlink evil/secret",
            Op::Unlink {
                path: rel("evil/secret"),
                parent_mtime: None,
            },
            vec![],
        ),
        (
            "write through the symlink itself",
            Op::Write {
                path: rel("evil"),
                offset: 0,
                mtime: TimeSet::At(ts()),
            },
            b"PWNED".to_vec(),
        ),
    ];
    for (i, (what, op, payload)) in through.iter().enumerate() {
        let mut cl = HostileClient::connect(peer, &tls, "n1")
            .unwrap_or_else(|e| panic!("{what}: a valid client cannot connect: {e}"));
        cl.send_op(1, op.clone(), payload)
            .and_then(|_| cl.send_op(2, create_op(rel(&format!("after-through-{i}"))), &[]))
            .unwrap_or_else(|e| panic!("{what}: sending: {e}"));
        let end = cl.read_until_end(Duration::from_secs(20));
        eprintln!("{what}: session ended ({}), {:?}", end.end, end.messages);
        let (seq, errno, reason) = end
            .failed()
            .unwrap_or_else(|| panic!("{what}: no Failed message from the mirror: {end:?}"));
        assert_eq!(seq, 1, "{what}: {end:?}");
        assert!(
            [libc::ENOTDIR, libc::ELOOP].contains(&errno),
            "{what}: refused with errno {errno} ({reason}), want ENOTDIR or ELOOP"
        );
        assert_eq!(end.applied(), 0, "{what}: {end:?}");
        assert!(
            h.mirror().is_running(),
            "{what}: the mirror died:\n{}",
            h.mirror().stderr_tail(30)
        );
    }

    // A sequence number out of order is refused too.
    let mut cl = HostileClient::connect(peer, &tls, "n1").unwrap_or_else(|e| panic!("{e}"));
    cl.send_op(5, create_op(rel("out-of-order")), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let end = cl.read_until_end(Duration::from_secs(20));
    assert!(
        end.applied() == 0 && !end.end.starts_with("timeout"),
        "out-of-order op: {end:?}"
    );
    drop(cl);

    // Nothing outside MIRROR changed, nothing appeared next to it or at the
    // absolute paths, and MIRROR holds only what the legitimate ops made.
    let d = tree_diff_with(&outside_before, &outside, &DiffOptions::default());
    assert!(
        d.diffs.is_empty(),
        "the sentinel next to MIRROR changed:\n{}",
        d.diffs.join("\n")
    );
    assert_eq!(
        names_in(h.tmp().path()),
        tmp_names,
        "entries appeared or vanished next to MIRROR"
    );
    for p in [&abs1, &abs2, &format!("/tmp/{abs3}")] {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{p} was created by a hostile operation"
        );
    }
    assert_eq!(
        names_in(&h.mirror_dir),
        expected_on_mirror,
        "MIRROR holds something a refused operation (or one after it) made"
    );
    let log = h.mirror().stderr();
    let malformed_logged = log.matches("refused a malformed message").count();
    let failed_logged = log.matches("cannot apply").count();
    eprintln!(
        "mirror log: {malformed_logged} malformed messages refused, {failed_logged} operations it could not apply"
    );
    assert!(
        malformed_logged >= malformed.len(),
        "the mirror logged {malformed_logged} refusals of malformed messages, want {}:\n{}",
        malformed.len(),
        h.mirror().stderr_tail(40)
    );
    assert!(
        failed_logged >= through.len(),
        "the mirror logged {failed_logged} refused operations, want {}",
        through.len()
    );
    assert!(
        log.contains("refused an out-of-order operation"),
        "the out-of-order operation was not logged"
    );

    // And it still serves a legitimate mount, to an identical tree.
    workload::small_tree(&h.dir, 6, 12);
    h.mount(&MountOpts::default());
    workload::small_tree(&h.dir.join("d0"), 7, 6);
    h.stop_mount(Duration::from_secs(60));
    h.assert_trees_equal(None, &DiffOptions::default());
    let d = tree_diff_with(&outside_before, &outside, &DiffOptions::default());
    assert!(
        d.diffs.is_empty(),
        "the sentinel changed during the legitimate mount's sync:\n{}",
        d.diffs.join("\n")
    );
}

/// Cluster commands: a wrong configuration names file, line and field
/// (exit 2) and starts nothing; an admin command without a running daemon
/// says so (exit 1); a good configuration is summarised.
#[test]
fn cluster_config_errors_name_file_line_and_field() {
    let t = hapair_tests::TestDir::new("cfg");
    let good = "[cluster]\nname = \"demo\"\n\n[[node]]\nname = \"n1\"\naddress = \"10.77.0.1\"\n\n[[node]]\nname = \"n2\"\naddress = \"10.77.0.2\"\n\n[replication]\ndirs = [\"/srv/app/data\"]\n";
    let p = t.join("good.toml");
    std::fs::write(&p, good).expect("write config");
    let ps = p.to_string_lossy().into_owned();
    let o = Command::new(env::hapair_bin())
        .args(["check-config", "-c", &ps])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no witness (split brain possible"));
    let bad = good.replace("10.77.0.2", "10.77.0.two");
    let b = t.join("bad.toml");
    std::fs::write(&b, &bad).expect("write config");
    let bs = b.to_string_lossy().into_owned();
    usage_error(
        &["check-config", "-c", &bs],
        &format!("{bs}:10: field `node[1].address`"),
    );
    // The daemon refuses to start with it, before touching anything.
    let state = t.join("state-never-created");
    let bad_state = bad.replace(
        "name = \"demo\"",
        &format!("name = \"demo\"\nstate_dir = \"{}\"", state.display()),
    );
    std::fs::write(&b, bad_state).expect("write config");
    usage_error(&["daemon", "-c", &bs, "--node", "n1"], "not an IP address");
    assert!(
        !state.exists(),
        "a refused configuration created {}",
        state.display()
    );
    usage_error(&["status", "-c", &ps, "--node", "n3"], "--node n3");
    // No daemon: exit 1 and a message that says so.
    let o = Command::new(env::hapair_bin())
        .args(["status", "-c", &ps, "--node", "n1"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("daemon of this node is not running"));
}
