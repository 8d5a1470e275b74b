//! Real FUSE mounts with a recording replicator: what is recorded, in which
//! order, with which attributes.

mod common;

use common::*;
use hapair_proto::{Op, RelPath, TimeSet};
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn rp(s: &str) -> RelPath {
    RelPath::parse(s.as_bytes()).unwrap()
}

fn setup() -> (tempfile::TempDir, Arc<Recorder>, Mounted) {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("backing")).unwrap();
    fs::create_dir(dir.path().join("mnt")).unwrap();
    let rec = Arc::new(Recorder::default());
    let m = mount(
        &dir.path().join("backing"),
        &dir.path().join("mnt"),
        rec.clone(),
    );
    (dir, rec, m)
}

#[test]
fn create_write_rename_unlink_are_recorded_in_order() {
    let (_dir, rec, m) = setup();
    let mnt = m.mnt.clone();
    fs::create_dir(mnt.join("d")).unwrap();
    fs::write(mnt.join("d/f"), b"hello").unwrap();
    fs::rename(mnt.join("d/f"), mnt.join("g")).unwrap();
    fs::remove_file(mnt.join("g")).unwrap();
    fs::remove_dir(mnt.join("d")).unwrap();
    let ops = rec.ops();
    let names: Vec<_> = ops.iter().map(|o| o.name()).collect();
    assert_eq!(
        names,
        ["mkdir", "create", "write", "rename", "unlink", "rmdir"],
        "{ops:#?}"
    );
    match &ops[1] {
        Op::Create { path, uid, gid, .. } => {
            assert_eq!(*path, rp("d/f"));
            assert_eq!((*uid, *gid), (0, 0));
        }
        o => panic!("{o:?}"),
    }
    match &ops[2] {
        Op::Write { path, offset, .. } => assert_eq!((path, *offset), (&rp("d/f"), 0)),
        o => panic!("{o:?}"),
    }
    let payload = rec.ops.lock().unwrap()[2].2.clone();
    assert_eq!(payload, b"hello");
    match &ops[3] {
        Op::Rename { from, to, .. } => assert_eq!((from, to), (&rp("d/f"), &rp("g"))),
        o => panic!("{o:?}"),
    }
    assert!(rec.after_calls.load(Ordering::SeqCst) >= 6);
    m.unmount();
}

#[test]
fn append_records_real_offsets() {
    let (_dir, rec, m) = setup();
    let p = m.mnt.join("log");
    fs::write(&p, b"0123").unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"abc").unwrap();
    f.write_all(b"de").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"0123abcde");
    let offs: Vec<u64> = rec
        .ops()
        .iter()
        .filter_map(|o| match o {
            Op::Write { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect();
    assert_eq!(offs, [0, 4, 7]);
    m.unmount();
}

#[test]
fn unlinked_open_file_writes_are_not_recorded() {
    let (_dir, rec, m) = setup();
    let p = m.mnt.join("tmp");
    let mut f = fs::File::create(&p).unwrap();
    f.write_all(b"a").unwrap();
    fs::remove_file(&p).unwrap();
    rec.clear();
    f.write_all(b"more data").unwrap();
    f.set_len(3).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    drop(f);
    assert!(rec.ops().is_empty(), "{:?}", rec.ops());
    m.unmount();
}

#[test]
fn hard_link_lost_names_are_found_again() {
    let (dir, rec, m) = setup();
    // A second name made behind the mount's back before it knows the file:
    // the kernel never looks it up.
    fs::create_dir(dir.path().join("backing/sub")).unwrap();
    fs::write(dir.path().join("backing/a"), b"x").unwrap();
    fs::hard_link(
        dir.path().join("backing/a"),
        dir.path().join("backing/sub/b"),
    )
    .unwrap();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(m.mnt.join("a"))
        .unwrap();
    fs::remove_file(m.mnt.join("a")).unwrap();
    rec.clear();
    f.write_all(b"y").unwrap();
    drop(f);
    match &rec.ops()[..] {
        [Op::Write { path, .. }] => assert_eq!(*path, rp("sub/b")),
        o => panic!("{o:?}"),
    }
    m.unmount();
}

#[test]
fn hard_links_are_one_inode() {
    let (_dir, rec, m) = setup();
    let a = m.mnt.join("a");
    let b = m.mnt.join("b");
    fs::write(&a, b"x").unwrap();
    fs::hard_link(&a, &b).unwrap();
    let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
    assert_eq!(ma.ino(), mb.ino());
    assert_eq!(ma.nlink(), 2);
    fs::set_permissions(&b, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(&a).unwrap().mode() & 0o777, 0o600);
    fs::remove_file(&b).unwrap();
    assert_eq!(fs::metadata(&a).unwrap().nlink(), 1);
    assert!(rec.ops().iter().any(
        |o| matches!(o, Op::Link { existing, new, .. } if *existing == rp("a") && *new == rp("b"))
    ));
    m.unmount();
}

#[test]
fn setattr_carries_resulting_times_and_split_chown() {
    // Counts exact ops: no child process may flush a copy of its files.
    let _no_spawns = no_spawns();
    let (_dir, rec, m) = setup();
    let p = m.mnt.join("f");
    fs::write(&p, b"0123456789").unwrap();
    rec.clear();
    // truncate: the resulting mtime is sent explicitly.
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4)
        .unwrap();
    let st = fs::metadata(&p).unwrap();
    match rec.ops().last() {
        Some(Op::SetAttr {
            size: Some(4),
            mtime: TimeSet::At(t),
            ..
        }) => {
            assert_eq!((t.sec, t.nsec as i64), (st.mtime(), st.mtime_nsec()));
        }
        o => panic!("{o:?}"),
    }
    rec.clear();
    // chown + setuid: ownership op first, then the mode.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    let ops = rec.ops();
    assert!(
        matches!(
            ops[0],
            Op::SetAttr {
                mode: Some(0o4755),
                ..
            }
        ),
        "{ops:?}"
    );
    assert!(
        matches!(
            ops[1],
            Op::SetAttr {
                uid: Some(65534),
                gid: Some(65534),
                mode: None,
                ..
            }
        ),
        "{ops:?}"
    );
    // The kernel/backing clear setuid on chown; the mode op says so.
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o755);
    assert!(
        ops.iter().any(|o| matches!(
            o,
            Op::SetAttr {
                mode: Some(0o755),
                ..
            }
        )),
        "{ops:?}"
    );
    m.unmount();
}

#[test]
fn sync_writes_and_fsync_are_durability_points() {
    // Counts exact ops: no child process may flush a copy of its files.
    let _no_spawns = no_spawns();
    let (_dir, rec, m) = setup();
    let p = m.mnt.join("s");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(&p)
        .unwrap();
    let before = rec.durability_points.load(Ordering::SeqCst);
    f.write_all(b"durable").unwrap();
    let after_write = rec.durability_points.load(Ordering::SeqCst);
    assert!(after_write > before, "O_SYNC write is a durability point");
    // The kernel's own FSYNC after the O_SYNC write finds nothing new.
    assert_eq!(after_write - before, 1);
    drop(f);
    let mut f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all(b"1").unwrap();
    f.sync_all().unwrap();
    f.write_all(b"2").unwrap();
    f.sync_data().unwrap();
    assert_eq!(
        rec.durability_points.load(Ordering::SeqCst),
        after_write + 2
    );
    // Nothing new recorded: no new durability point needed.
    f.sync_all().unwrap();
    assert_eq!(
        rec.durability_points.load(Ordering::SeqCst),
        after_write + 2
    );
    fs::write(m.mnt.join("other"), b"x").unwrap();
    let d = fs::File::open(&m.mnt).unwrap();
    d.sync_all().unwrap();
    drop(d);
    assert_eq!(
        rec.durability_points.load(Ordering::SeqCst),
        after_write + 3
    );
    m.unmount();
}

#[test]
fn mount_over_the_backing_directory_itself() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("old"), b"before").unwrap();
    let rec = Arc::new(Recorder::default());
    let m = mount(&data, &data, rec.clone());
    assert_eq!(fs::read(data.join("old")).unwrap(), b"before");
    fs::write(data.join("new"), b"through fuse").unwrap();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(mounts.contains(data.to_str().unwrap()));
    m.unmount();
    assert_eq!(fs::read(data.join("new")).unwrap(), b"through fuse");
    assert!(rec.ops().iter().any(|o| matches!(o, Op::Create { .. })));
}

#[test]
fn files_are_owned_by_the_caller_and_permissions_hold() {
    let (_dir, rec, m) = setup();
    let d = m.mnt.join("shared");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(m.mnt.join("secret"), b"s").unwrap();
    fs::set_permissions(m.mnt.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let script = format!(
        "umask 022; echo hi > {d}/mine && mkdir {d}/sub && ln -s target {d}/ln && cat {s}",
        d = d.display(),
        s = m.mnt.join("secret").display()
    );
    let out = as_nobody(&script);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "reading a 0600 root file must fail");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    for (name, mode) in [("mine", 0o644), ("sub", 0o755)] {
        let md = fs::metadata(d.join(name)).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534), "{name}");
        assert_eq!(md.mode() & 0o7777, mode, "{name}");
    }
    let md = fs::symlink_metadata(d.join("ln")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    assert!(rec.ops().iter().any(|o| matches!(
        o,
        Op::Create {
            uid: 65534,
            gid: 65534,
            mode: 0o644,
            ..
        }
    )));
    // A setgid directory gives its group, and its setgid bit to subdirectories.
    fs::set_permissions(&d, fs::Permissions::from_mode(0o2777)).unwrap();
    std::os::unix::fs::chown(&d, None, Some(4242)).unwrap();
    let out = as_nobody(&format!("mkdir {0}/sg && touch {0}/sgf", d.display()));
    assert!(out.status.success(), "{out:?}");
    let md = fs::metadata(d.join("sg")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 4242));
    assert_eq!(md.mode() & 0o2000, 0o2000);
    assert_eq!(fs::metadata(d.join("sgf")).unwrap().gid(), 4242);
    // A write by a non-owner clears set-user-id, on the mirror too.
    let suid = m.mnt.join("suid");
    fs::write(&suid, b"s").unwrap();
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4777)).unwrap();
    rec.clear();
    let out = as_nobody(&format!("echo more >> {}", suid.display()));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::metadata(&suid).unwrap().mode() & 0o7777, 0o777);
    let ops = rec.ops();
    assert!(
        ops.iter().any(|o| matches!(
            o,
            Op::SetAttr {
                mode: Some(0o777),
                ..
            }
        )),
        "{ops:?}"
    );
    m.unmount();
}

#[test]
fn sparse_write_beyond_4gib_stays_sparse() {
    let (dir, rec, m) = setup();
    let p = m.mnt.join("huge");
    let f = fs::File::create(&p).unwrap();
    let off = 5u64 << 30;
    std::os::unix::fs::FileExt::write_all_at(&f, b"end", off).unwrap();
    drop(f);
    let md = fs::metadata(dir.path().join("backing/huge")).unwrap();
    assert_eq!(md.len(), off + 3);
    assert!(md.blocks() < 1024, "backing file stays sparse");
    assert!(rec
        .ops()
        .iter()
        .any(|o| matches!(o, Op::Write { offset, .. } if *offset == off)));
    m.unmount();
}

/// Kills a daemon serving a mount (so the mount is dead) and checks that
/// `clear_stale_mount` detaches it.
#[test]
fn dead_mount_is_cleared() {
    struct Child(std::process::Child, std::path::PathBuf);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = nix::mount::umount2(&self.1, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (b, mnt) = (dir.path().join("b"), dir.path().join("m"));
    fs::create_dir(&b).unwrap();
    fs::create_dir(&mnt).unwrap();
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/passthrough");
    assert!(example.exists(), "example built by cargo test: {example:?}");
    let mut child = Child(
        spawn(std::process::Command::new(&example).arg(&b).arg(&mnt)),
        mnt.clone(),
    );
    let mounted = |p: &std::path::Path| {
        fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(&format!(" {} ", p.display()))
    };
    for _ in 0..100 {
        if mounted(&mnt) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(mounted(&mnt));
    fs::write(mnt.join("f"), b"x").unwrap();
    assert!(
        !hapair_fs_replica::clear_stale_mount(&mnt).unwrap(),
        "live mount left alone"
    );
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let e = fs::metadata(&mnt).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    assert!(hapair_fs_replica::clear_stale_mount(&mnt).unwrap());
    assert!(!mounted(&mnt));
    assert_eq!(fs::read(b.join("f")).unwrap(), b"x");
}

#[test]
fn posix_acls_are_enforced_and_inherited() {
    let (dir, rec, m) = setup();
    let f = m.mnt.join("private");
    fs::write(&f, b"for nobody").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    let read = || as_nobody(&format!("cat {}", f.display()));
    assert!(!read().status.success());
    let out = output(
        std::process::Command::new("setfacl")
            .args(["-m", "u:65534:r"])
            .arg(&f),
    );
    assert!(out.status.success(), "{out:?}");
    let out = read();
    assert!(out.status.success(), "ACL grants read: {out:?}");
    assert_eq!(out.stdout, b"for nobody");
    assert!(rec.ops().iter().any(|o| matches!(
        o,
        Op::SetXattr { name, .. } if name == b"system.posix_acl_access"
    )));
    // A default ACL is inherited by new entries, and beats the umask.
    let d = m.mnt.join("dacl");
    fs::create_dir(&d).unwrap();
    let out = output(
        std::process::Command::new("setfacl")
            .args(["-d", "-m", "u:65534:rwx"])
            .arg(&d),
    );
    assert!(out.status.success(), "{out:?}");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 077; echo x > {0}/inh; mkdir {0}/sub",
            d.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let backing = dir.path().join("backing/dacl/inh");
    let acl = output(
        std::process::Command::new("getfacl")
            .arg("-cn")
            .arg(&backing),
    );
    let acl = String::from_utf8_lossy(&acl.stdout);
    assert!(acl.contains("user:65534:rwx\t#effective:rw-"), "{acl}");
    // Without a default ACL the application's umask applies.
    let out = as_nobody(&format!(
        "umask 027; echo x > {}/shared-um",
        m.mnt.display()
    ));
    assert!(!out.status.success(), "root dir not writable by nobody");
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let out = as_nobody(&format!("umask 027; echo x > {}/um", m.mnt.display()));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::metadata(m.mnt.join("um")).unwrap().mode() & 0o777,
        0o640
    );
    m.unmount();
}

/// The backing file's mtime, as the mirror should end up with it.
fn backing_mtime(dir: &tempfile::TempDir, name: &str) -> hapair_proto::Timestamp {
    let md = fs::metadata(dir.path().join("backing").join(name)).unwrap();
    hapair_proto::Timestamp {
        sec: md.mtime(),
        nsec: md.mtime_nsec() as u32,
    }
}

/// The mtimes recorded for `path`: `Some(t)` for an exact one (a write's or
/// a setattr's), `None` for a write that left it out.
fn mtimes_recorded(
    ops: &[Op],
    path: &RelPath,
) -> Vec<(&'static str, Option<hapair_proto::Timestamp>)> {
    ops.iter()
        .filter_map(|o| match o {
            Op::Write { path: p, mtime, .. } if p == path => Some((
                "write",
                match mtime {
                    TimeSet::At(t) => Some(*t),
                    TimeSet::Omit => None,
                },
            )),
            Op::SetAttr {
                path: p,
                mtime: TimeSet::At(t),
                mode: None,
                uid: None,
                gid: None,
                size: None,
                atime: TimeSet::Omit,
            } if p == path => Some(("setattr", Some(*t))),
            _ => None,
        })
        .collect()
}

#[test]
fn a_write_soon_after_another_leaves_the_mtime_to_a_later_setattr() {
    // No child process may close a copy of the file meanwhile (a flush).
    let _no_spawns = no_spawns();
    let (dir, rec, m) = setup();
    let mut f = fs::File::create(m.mnt.join("f")).unwrap();
    rec.clear();
    f.write_all(b"first").unwrap();
    f.write_all(b"second").unwrap();
    f.write_all(b"third").unwrap();
    let ops = rec.ops();
    let got = mtimes_recorded(&ops, &rp("f"));
    // The first write of the file carries its exact mtime; the next ones,
    // within the interval, none (no stat of the backing file after them).
    assert_eq!(got.len(), 3, "{ops:#?}");
    assert!(got[0].1.is_some(), "{got:?}");
    assert_eq!(
        (got[1], got[2]),
        (("write", None), ("write", None)),
        "{got:?}"
    );

    // Reading the attributes sends the exact mtime, once.
    let seen = fs::metadata(m.mnt.join("f")).unwrap();
    let want = backing_mtime(&dir, "f");
    assert_eq!(
        (seen.mtime(), seen.mtime_nsec() as u32),
        (want.sec, want.nsec)
    );
    let ops = rec.ops();
    let got = mtimes_recorded(&ops, &rp("f"));
    assert_eq!(got.last(), Some(&("setattr", Some(want))), "{ops:#?}");
    let n = got.len();
    fs::metadata(m.mnt.join("f")).unwrap();
    drop(f);
    assert_eq!(
        mtimes_recorded(&rec.ops(), &rp("f")).len(),
        n,
        "sent again with nothing new"
    );
}

/// A mount with file "f" written twice within the interval (the second
/// write left its mtime unsent; the recorder holds only that write), and
/// no child process started meanwhile (a child holds "f" open until its
/// exec, which moves the release of "f").
/// Fields drop in this order: the file, the mount, then its directories.
struct WrittenTwice {
    /// `None` once closed.
    f: Option<fs::File>,
    _m: Mounted,
    rec: Arc<Recorder>,
    dir: tempfile::TempDir,
    _no_spawns: std::sync::RwLockWriteGuard<'static, ()>,
}

fn written_twice() -> WrittenTwice {
    let no_spawns = no_spawns();
    let (dir, rec, m) = setup();
    let mut f = fs::File::create(m.mnt.join("f")).unwrap();
    f.write_all(b"first").unwrap();
    rec.clear();
    f.write_all(b"second").unwrap();
    assert_eq!(mtimes_recorded(&rec.ops(), &rp("f")), [("write", None)]);
    WrittenTwice {
        _no_spawns: no_spawns,
        dir,
        rec,
        _m: m,
        f: Some(f),
    }
}

impl WrittenTwice {
    /// The pending mtime was sent, exactly once, and is the backing's.
    fn assert_sent(&self) {
        let want = backing_mtime(&self.dir, "f");
        let ops = self.rec.ops();
        assert_eq!(
            mtimes_recorded(&ops, &rp("f")),
            [("write", None), ("setattr", Some(want))],
            "{ops:#?}"
        );
    }

    /// Waits (up to 5 s) for the pending mtime to be recorded: the kernel
    /// sends the release of a closed file after close(2) has returned.
    fn wait_sent(&self) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while mtimes_recorded(&self.rec.ops(), &rp("f")).len() < 2
            && std::time::Instant::now() < end
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.assert_sent();
    }
}

#[test]
fn the_last_close_of_a_written_file_sends_its_pending_mtime() {
    let mut w = written_twice();
    drop(w.f.take());
    w.wait_sent();
}

/// close(2) sends no FLUSH (FOPEN_NOFLUSH; a flush would send the pending
/// mtime): closing one of two descriptors sends nothing, closing the last
/// one sends the mtime with the release.
#[test]
fn closing_one_of_two_descriptors_sends_no_flush() {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let mut w = written_twice();
    let f = w.f.take().unwrap();
    let second = f.try_clone().unwrap().into_raw_fd();
    drop(f);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        mtimes_recorded(&w.rec.ops(), &rp("f")),
        [("write", None)],
        "closing one of two descriptors sent the mtime: the kernel sent a FLUSH"
    );
    // SAFETY: `second` is a descriptor this test owns and closes once.
    drop(unsafe { fs::File::from_raw_fd(second) });
    w.wait_sent();
}

#[test]
fn a_sync_sends_the_pending_mtime_once_the_interval_has_passed() {
    let mut w = written_twice();
    let f = w.f.as_mut().unwrap();
    // Within the interval: the sync does not send it (that would put a
    // stat between every write and the next).
    f.sync_all().unwrap();
    assert_eq!(mtimes_recorded(&w.rec.ops(), &rp("f")), [("write", None)]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    f.sync_all().unwrap();
    w.assert_sent();
    let f = w.f.as_mut().unwrap();
    // And the next write, after the interval, carries it again.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    f.write_all(b"third").unwrap();
    let got = mtimes_recorded(&w.rec.ops(), &rp("f"));
    assert!(matches!(got.last(), Some(("write", Some(_)))), "{got:?}");
}

/// The mode recorded last for `path` by a setattr that carried one.
fn last_recorded_mode(ops: &[Op], path: &RelPath) -> Option<u32> {
    ops.iter().rev().find_map(|o| match o {
        Op::SetAttr {
            path: p,
            mode: Some(m),
            ..
        } if p == path => Some(*m),
        _ => None,
    })
}

#[test]
fn a_truncate_without_cap_fsetid_clears_set_id_bits_as_the_kernel_does() {
    let (_dir, rec, m) = setup();
    let run = |cmd: &[&str]| {
        let out = output(std::process::Command::new(cmd[0]).args(&cmd[1..]));
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    };
    // (mode before, who truncates, mode after): set-user-id always goes,
    // set-group-id only from a group-executable file; a caller with
    // CAP_FSETID (root) keeps both; root without it loses them.
    let cases: [(&str, u32, &str, u32); 5] = [
        ("u", 0o4777, "nobody", 0o777),
        ("g", 0o2777, "nobody", 0o777),
        ("gx", 0o2766, "nobody", 0o2766),
        ("root", 0o6777, "root", 0o6777),
        ("nocap", 0o6777, "root-without-fsetid", 0o777),
    ];
    for (name, before, who, after) in cases {
        let p = m.mnt.join(name);
        fs::write(&p, b"some bytes").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(before)).unwrap();
        rec.clear();
        let target = p.to_str().unwrap();
        match who {
            "nobody" => {
                let out = as_nobody(&format!("truncate -s 1 {target}"));
                assert!(out.status.success(), "{out:?}");
            }
            "root" => run(&["truncate", "-s", "1", target]),
            _ => run(&[
                "setpriv",
                "--inh-caps=-fsetid",
                "--bounding-set=-fsetid",
                "truncate",
                "-s",
                "1",
                target,
            ]),
        }
        let md = fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 1, "{name}");
        assert_eq!(
            md.mode() & 0o7777,
            after,
            "{name}: {who} truncating {before:o}"
        );
        let ops = rec.ops();
        if after != before {
            assert_eq!(
                last_recorded_mode(&ops, &rp(name)),
                Some(after),
                "{name}: {ops:#?}"
            );
        } else {
            assert_eq!(
                last_recorded_mode(&ops, &rp(name)),
                None,
                "{name}: {ops:#?}"
            );
        }
    }
    // An O_TRUNC open by an unprivileged caller is a truncate too.
    let p = m.mnt.join("otrunc");
    fs::write(&p, b"x").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4777)).unwrap();
    let out = as_nobody(&format!(": > {}", p.display()));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o777);
    m.unmount();
}

#[test]
fn set_id_bits_cleared_behind_a_write_or_fallocate_show_at_once() {
    let (dir, rec, m) = setup();
    let p = m.mnt.join("f");
    fs::write(&p, b"data").unwrap();
    // `stat -c %a` asks for the mode only: the kernel answers it from its
    // cache unless told the cache is stale.
    let mode_seen = || {
        let out = output(
            std::process::Command::new("stat")
                .args(["-c", "%a"])
                .arg(&p),
        );
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let backing_mode = || fs::metadata(dir.path().join("backing/f")).unwrap().mode() & 0o7777;
    for (what, script) in [
        ("write", format!("echo more >> {}", p.display())),
        ("fallocate", format!("fallocate -l 65536 {}", p.display())),
    ] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o4777)).unwrap();
        assert_eq!(mode_seen(), "4777");
        rec.clear();
        let out = as_nobody(&script);
        assert!(out.status.success(), "{what}: {out:?}");
        assert_eq!(backing_mode(), 0o777, "{what}");
        assert_eq!(
            mode_seen(),
            "777",
            "{what}: the mount still shows the old mode"
        );
        assert_eq!(
            last_recorded_mode(&rec.ops(), &rp("f")),
            Some(0o777),
            "{what}"
        );
    }
    // By root (CAP_FSETID) the bits stay, as on ext4.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4777)).unwrap();
    let out = output(
        std::process::Command::new("fallocate")
            .args(["-l", "131072"])
            .arg(&p),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode_seen(), "4777");
    m.unmount();
}
