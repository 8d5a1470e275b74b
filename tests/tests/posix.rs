//! POSIX coverage through a real replicated mount: each test drives the
//! real `hapair mount` over DIR with the real `hapair mirror`, exercises one
//! group of the semantics a database or file-based application relies on,
//! checks the results on the mount itself, and then compares DIR with the
//! mirror's tree (`tree_diff`: content, type, mode, owner, size, mtime,
//! symlink targets, hard-link structure, xattrs) after a clean stop.
//!
//! The durability tests stop the mirror process (SIGSTOP) to show that a
//! durability point really waits for it: while it is stopped the call must
//! not return (it cannot have been acknowledged), and once it returns the
//! mirror holds what it covered. Nothing here asserts a duration.

use hapair_tests::proc::Stopped;
use hapair_tests::treediff::DiffOptions;
use hapair_tests::{env, workload, Harness, MountOpts};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: impl FnOnce() -> String) -> T {
    r.unwrap_or_else(|e| panic!("{}: {e}", what()))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| panic!("NUL in {}", p.display()))
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(salt) ^ ((i >> 9) as u8))
        .collect()
}

fn write_file(p: &Path, data: &[u8]) {
    ctx(fs::write(p, data), || format!("writing {}", p.display()));
}

fn read_file(p: &Path) -> Vec<u8> {
    ctx(fs::read(p), || format!("reading {}", p.display()))
}

fn lstat(p: &Path) -> fs::Metadata {
    ctx(fs::symlink_metadata(p), || format!("lstat {}", p.display()))
}

fn renameat2(a: &Path, b: &Path, flags: u32) -> std::io::Result<()> {
    let (ca, cb) = (cpath(a), cpath(b));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(last_err())
    }
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) {
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    assert_eq!(r, 0, "fallocate mode {mode:#x} {off}+{len}: {}", last_err());
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap_or_default());
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(last_err())
    }
}

fn getxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap_or_default());
    let mut v = vec![0u8; 65536];
    // SAFETY: valid C strings and buffer.
    let n = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    (n >= 0).then(|| {
        v.truncate(n as usize);
        v
    })
}

fn utimens(p: &Path, atime: libc::timespec, mtime: libc::timespec) {
    let cp = cpath(p);
    let ts = [atime, mtime];
    // SAFETY: valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cp.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}: {}", p.display(), last_err());
}

fn tspec(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// Runs `sh -c script` as uid/gid 65534 (nobody) without supplementary
/// groups; returns (success, stderr).
fn as_nobody(script: &str) -> (bool, String) {
    let o = ctx(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/bin/sh",
                "-c",
            ])
            .arg(script)
            .output(),
        || format!("running {script:?} as nobody (setpriv, util-linux)"),
    );
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn mounted(name: &str, opts: &MountOpts) -> Harness {
    let mut h = Harness::new(name);
    h.start_mirror();
    h.mount(opts);
    h.wait_status(Duration::from_secs(30), |v| v["state"] == "replicating")
        .unwrap_or_else(|e| panic!("mount not replicating: {e}"));
    h
}

/// Clean stop, then DIR and MIRROR must be identical.
fn finish(h: &mut Harness) {
    h.stop_mount(Duration::from_secs(120));
    h.assert_trees_equal(None, &DiffOptions::default());
}

// ---------------------------------------------------------------------------

/// rename(2) over existing files and directories, and renameat2 with
/// RENAME_NOREPLACE and RENAME_EXCHANGE (files, a file with a directory,
/// across directories), including the refused cases, which must change
/// nothing on either side.
#[test]
fn renames_over_existing_noreplace_and_exchange() {
    let _s = env::serial();
    let mut h = mounted("posix-rename", &MountOpts::default());
    let d = h.dir.clone();
    for p in ["a", "b", "a/sub", "b/empty", "b/full"] {
        ctx(fs::create_dir(d.join(p)), || format!("mkdir {p}"));
    }
    write_file(&d.join("a/f1"), b"one");
    write_file(&d.join("a/f2"), b"two");
    write_file(&d.join("b/f3"), b"three");
    write_file(&d.join("a/sub/x"), b"x");
    write_file(&d.join("b/full/y"), b"y");

    // Over an existing file, across directories.
    ctx(fs::rename(d.join("a/f1"), d.join("b/f3")), || {
        "rename over".into()
    });
    assert_eq!(read_file(&d.join("b/f3")), b"one");
    assert!(!d.join("a/f1").exists());
    // A directory over an empty one; over a non-empty one is refused.
    ctx(fs::rename(d.join("a/sub"), d.join("b/empty")), || {
        "rename dir over empty dir".into()
    });
    assert_eq!(read_file(&d.join("b/empty/x")), b"x");
    let e = fs::rename(d.join("b/empty"), d.join("b/full")).expect_err("over a non-empty dir");
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)),
        "{e}"
    );
    // RENAME_NOREPLACE.
    let e = renameat2(&d.join("a/f2"), &d.join("b/f3"), libc::RENAME_NOREPLACE)
        .expect_err("NOREPLACE onto an existing name");
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
    assert_eq!(read_file(&d.join("a/f2")), b"two");
    assert_eq!(read_file(&d.join("b/f3")), b"one");
    ctx(
        renameat2(&d.join("a/f2"), &d.join("b/new"), libc::RENAME_NOREPLACE),
        || "NOREPLACE onto a new name".into(),
    );
    // RENAME_EXCHANGE: two files across directories, then a file and a
    // directory; with a missing name it is refused.
    write_file(&d.join("a/e1"), b"e1");
    write_file(&d.join("b/e2"), b"e2");
    ctx(
        renameat2(&d.join("a/e1"), &d.join("b/e2"), libc::RENAME_EXCHANGE),
        || "exchange files".into(),
    );
    assert_eq!(read_file(&d.join("a/e1")), b"e2");
    assert_eq!(read_file(&d.join("b/e2")), b"e1");
    ctx(
        renameat2(&d.join("a/e1"), &d.join("b/full"), libc::RENAME_EXCHANGE),
        || "exchange a file and a directory".into(),
    );
    assert!(d.join("a/e1").is_dir() && d.join("a/e1/y").is_file());
    assert_eq!(read_file(&d.join("b/full")), b"e2");
    let e = renameat2(&d.join("a/e1"), &d.join("b/missing"), libc::RENAME_EXCHANGE)
        .expect_err("exchange with a missing name");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    // Renaming a name onto another name of the same inode does nothing.
    ctx(fs::hard_link(d.join("b/new"), d.join("b/new-link")), || {
        "link".into()
    });
    ctx(fs::rename(d.join("b/new"), d.join("b/new-link")), || {
        "rename onto another name of the same inode".into()
    });
    assert!(d.join("b/new").exists() && d.join("b/new-link").exists());
    // A symlink over a file; a directory renamed into its own subtree is
    // refused.
    ctx(std::os::unix::fs::symlink("e1/y", d.join("a/s")), || {
        "symlink".into()
    });
    write_file(&d.join("a/sf"), b"replaced by a symlink");
    ctx(fs::rename(d.join("a/s"), d.join("a/sf")), || {
        "symlink over a file".into()
    });
    assert!(lstat(&d.join("a/sf")).file_type().is_symlink());
    let e = fs::rename(d.join("a"), d.join("a/e1/inside")).expect_err("into its own subtree");
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    finish(&mut h);
    assert_eq!(read_file(&h.mirror_dir.join("b/full")), b"e2");
    assert_eq!(lstat(&h.mirror_dir.join("b/new")).nlink(), 2);
}

/// Unlinking files that are still open (writes, truncates and chmods
/// through the open descriptor affect no name), renaming over an open
/// file, writing through an open file whose other hard link remains, and
/// truncate through a path and a descriptor.
#[test]
fn unlink_of_open_files_and_truncate() {
    let _s = env::serial();
    let mut h = mounted("posix-unlink-open", &MountOpts::default());
    let d = h.dir.clone();
    // Unlinked while open.
    let mut f = workload::open_rw(&d.join("open1"));
    ctx(f.write_all(b"before unlink"), || "write".into());
    ctx(fs::remove_file(d.join("open1")), || "unlink open1".into());
    ctx(f.write_all(b" and after"), || "write after unlink".into());
    ctx(f.set_len(5), || "ftruncate after unlink".into());
    ctx(f.set_permissions(fs::Permissions::from_mode(0o600)), || {
        "fchmod after unlink".into()
    });
    ctx(f.sync_all(), || "fsync after unlink".into());
    let mut back = String::new();
    ctx(f.seek(SeekFrom::Start(0)), || "seek".into());
    ctx(f.read_to_string(&mut back), || "read after unlink".into());
    assert_eq!(back, "befor");
    assert_eq!(ctx(f.metadata(), || "fstat".into()).nlink(), 0);
    drop(f);
    // Renamed over while open: the old file's later writes belong to no name.
    write_file(&d.join("victim"), b"victim");
    let g = workload::open_rw(&d.join("victim"));
    write_file(&d.join("replacement"), b"replacement");
    ctx(fs::rename(d.join("replacement"), d.join("victim")), || {
        "rename over an open file".into()
    });
    ctx(g.write_all_at(b"ghost", 0), || {
        "write to the replaced file".into()
    });
    ctx(g.sync_all(), || "fsync".into());
    drop(g);
    assert_eq!(read_file(&d.join("victim")), b"replacement");
    // One of two hard links unlinked while open: writes reach the other.
    write_file(&d.join("h1"), b"hhhhhhhh");
    ctx(fs::hard_link(d.join("h1"), d.join("h2")), || "link".into());
    let k = workload::open_rw(&d.join("h1"));
    ctx(fs::remove_file(d.join("h1")), || "unlink h1".into());
    ctx(k.write_all_at(b"via-open", 0), || {
        "write via open h1".into()
    });
    ctx(k.set_len(20), || "grow via open h1".into());
    ctx(k.sync_all(), || "fsync".into());
    drop(k);
    // An open directory removed: reading it shows nothing.
    ctx(fs::create_dir(d.join("dgone")), || "mkdir".into());
    let dfd = ctx(File::open(d.join("dgone")), || "open dir".into());
    ctx(fs::remove_dir(d.join("dgone")), || "rmdir open dir".into());
    drop(dfd);
    // truncate(2) by path: shrink inside a page, grow past a page; O_TRUNC.
    write_file(&d.join("t"), &pattern(10_000, 1));
    ctx(
        OpenOptions::new()
            .write(true)
            .open(d.join("t"))
            .and_then(|f| f.set_len(4097)),
        || "truncate down".into(),
    );
    let ct = cpath(&d.join("t"));
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::truncate(ct.as_ptr(), 1 << 20) },
        0,
        "{}",
        last_err()
    );
    let data = read_file(&d.join("t"));
    assert_eq!(data.len(), 1 << 20);
    assert_eq!(&data[..4097], &pattern(10_000, 1)[..4097]);
    assert!(data[4097..].iter().all(|b| *b == 0));
    write_file(&d.join("t2"), b"long content that O_TRUNC removes");
    ctx(
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(d.join("t2"))
            .and_then(|mut f| f.write_all(b"new")),
        || "O_TRUNC".into(),
    );
    finish(&mut h);
    let m = &h.mirror_dir;
    assert!(
        !m.join("open1").exists(),
        "the unlinked file exists on the mirror"
    );
    assert_eq!(read_file(&m.join("victim")), b"replacement");
    let h2 = read_file(&m.join("h2"));
    assert_eq!(&h2[..8], b"via-open");
    assert_eq!(h2.len(), 20);
    assert!(!m.join("dgone").exists());
}

/// fallocate (preallocation, beyond EOF, punched holes, zeroed ranges),
/// holes from sparse writes and from truncate, and a 6 GiB file with data
/// across the 4 GiB line: content identical, and sparse files stay sparse
/// on the mirror (allocation within a few blocks of the mount's).
#[test]
fn holes_fallocate_and_files_over_4_gib() {
    let _s = env::serial();
    let mut h = mounted("posix-sparse", &MountOpts::default());
    let d = h.dir.clone();
    let big = d.join("big");
    {
        let f = workload::open_rw(&big);
        ctx(f.write_all_at(b"head", 0), || "write head".into());
        ctx(f.write_all_at(&pattern(8192, 4), (4 << 30) - 4096), || {
            "write across 4 GiB".into()
        });
        ctx(f.write_all_at(b"five", 5 << 30), || "write at 5 GiB".into());
        ctx(f.set_len(6 << 30), || "truncate to 6 GiB".into());
        ctx(f.sync_all(), || "fsync big".into());
        let mut back = vec![0u8; 8192];
        ctx(f.read_exact_at(&mut back, (4 << 30) - 4096), || {
            "read across 4 GiB".into()
        });
        assert_eq!(back, pattern(8192, 4));
    }
    {
        let g = ctx(File::create(d.join("falloc")), || "create falloc".into());
        ctx(g.write_all_at(&[1u8; 1 << 20], 0), || "write".into());
        fallocate(
            &g,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            128 << 10,
            128 << 10,
        );
        fallocate(&g, libc::FALLOC_FL_ZERO_RANGE, 512 << 10, 64 << 10);
        fallocate(&g, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20);
        fallocate(&g, 0, 3 << 20, 1 << 20);
        assert_eq!(ctx(g.metadata(), || "fstat".into()).len(), 4 << 20);
        ctx(g.sync_all(), || "fsync falloc".into());
    }
    {
        let mut s = ctx(File::create(d.join("sparse-write")), || "create".into());
        ctx(s.write_all(b"start"), || "write".into());
        ctx(s.seek(SeekFrom::Start(100 << 20)), || "seek".into());
        ctx(s.write_all(b"far"), || "write far".into());
        let t = ctx(File::create(d.join("truncated-up")), || "create".into());
        ctx(t.write_all_at(b"x", 0), || "write".into());
        ctx(t.set_len(64 << 20), || "truncate up".into());
    }
    finish(&mut h);
    for (name, size) in [
        ("big", 6u64 << 30),
        ("falloc", 4 << 20),
        ("sparse-write", (100 << 20) + 3),
        ("truncated-up", 64 << 20),
    ] {
        let (a, b) = (lstat(&d.join(name)), lstat(&h.mirror_dir.join(name)));
        assert_eq!((a.len(), b.len()), (size, size), "{name}: sizes");
        let (ab, bb) = (a.blocks() as i64, b.blocks() as i64);
        eprintln!("{name}: {size} bytes, {ab} sectors allocated on the mount, {bb} on the mirror");
        assert!(
            (ab - bb).abs() <= 64,
            "{name}: {ab} sectors allocated on the mount, {bb} on the mirror (sparse-ness or preallocation lost)"
        );
    }
    let big_blocks = lstat(&h.mirror_dir.join("big")).blocks();
    assert!(
        big_blocks * 512 < 1 << 20,
        "the 6 GiB sparse file takes {big_blocks} sectors on the mirror"
    );
}

/// Aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096)
            .unwrap_or_else(|e| panic!("layout: {e}"));
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        Aligned { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes and owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// O_APPEND from two descriptors, O_DIRECT (read back directly and through
/// the page cache), O_SYNC and O_DSYNC writes, and writes through a shared
/// mmap flushed by munmap and close.
#[test]
fn append_direct_sync_flags_and_mmap() {
    let _s = env::serial();
    let mut h = mounted("posix-flags", &MountOpts::default());
    let d = h.dir.clone();
    // O_APPEND, interleaved between two descriptors.
    {
        let open = || {
            ctx(
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(d.join("appended")),
                || "open O_APPEND".into(),
            )
        };
        let (mut a1, mut a2) = (open(), open());
        let mut want = Vec::new();
        for i in 0..200 {
            let line = format!("line {i} {}\n", "x".repeat(i % 37));
            let f = if i % 2 == 0 { &mut a1 } else { &mut a2 };
            ctx(f.write_all(line.as_bytes()), || "append".into());
            want.extend_from_slice(line.as_bytes());
        }
        assert_eq!(read_file(&d.join("appended")), want);
    }
    // O_DIRECT with aligned buffers, with a hole between the writes.
    {
        let f = ctx(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .custom_flags(libc::O_DIRECT)
                .open(d.join("direct")),
            || "open O_DIRECT".into(),
        );
        let mut buf = Aligned::new(64 << 10);
        buf.as_mut().copy_from_slice(&pattern(64 << 10, 8));
        for off in [0u64, 64 << 10, 1 << 20] {
            ctx(f.write_all_at(buf.as_mut(), off), || {
                format!("O_DIRECT write at {off}")
            });
        }
        let mut back = Aligned::new(64 << 10);
        ctx(f.read_exact_at(back.as_mut(), 1 << 20), || {
            "O_DIRECT read".into()
        });
        assert_eq!(back.as_mut(), &pattern(64 << 10, 8)[..]);
        ctx(f.sync_all(), || "fsync O_DIRECT".into());
        let cached = read_file(&d.join("direct"));
        assert_eq!(cached.len(), (1 << 20) + (64 << 10));
        assert_eq!(&cached[64 << 10..128 << 10], &pattern(64 << 10, 8)[..]);
        assert!(cached[128 << 10..1 << 20].iter().all(|b| *b == 0));
    }
    // O_SYNC and O_DSYNC.
    for (name, flag) in [("osync", libc::O_SYNC), ("odsync", libc::O_DSYNC)] {
        let mut f = ctx(
            OpenOptions::new()
                .write(true)
                .create(true)
                .custom_flags(flag)
                .open(d.join(name)),
            || format!("open {name}"),
        );
        for i in 0..20u8 {
            ctx(f.write_all(&pattern(3000, i)), || format!("write {name}"));
        }
    }
    // A shared mapping, flushed by munmap and close (no msync).
    {
        let f = workload::open_rw(&d.join("mapped"));
        ctx(f.set_len(3 * 4096 + 100), || "size the mapping".into());
        let len = 3 * 4096 + 100;
        // SAFETY: mapping a file we own with a valid length.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", last_err());
        // SAFETY: p is a valid writable mapping of len bytes.
        let m = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
        m.copy_from_slice(&pattern(len, 21));
        // SAFETY: unmapping what was mapped above.
        assert_eq!(unsafe { libc::munmap(p, len) }, 0, "munmap: {}", last_err());
        drop(f);
        assert_eq!(read_file(&d.join("mapped")), pattern(len, 21));
    }
    finish(&mut h);
    let m = &h.mirror_dir;
    assert_eq!(read_file(&m.join("mapped")), pattern(3 * 4096 + 100, 21));
    assert_eq!(read_file(&m.join("osync")).len(), 20 * 3000);
}

/// Runs `call` on a thread while the mirror is stopped: it must still be
/// blocked when we look (it cannot have been acknowledged), and once the
/// mirror runs again it must return, after which `on_mirror` must hold.
fn waits_for_the_mirror(
    h: &mut Harness,
    what: &str,
    call: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    on_mirror: impl Fn() -> Result<(), String>,
) {
    let stopped = Stopped::new(h.mirror());
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let r = call();
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_millis(700)) {
        Err(mpsc::RecvTimeoutError::Timeout) => {}
        Ok(r) => panic!("{what} returned ({r:?}) while the mirror was stopped"),
        Err(e) => panic!("{what}: the calling thread vanished: {e}"),
    }
    drop(stopped);
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{what} did not return after the mirror resumed: {e}"));
    ctx(r, || format!("{what} failed"));
    let _ = t.join();
    if let Err(e) = on_mirror() {
        panic!("{what} returned, but the mirror does not hold what it covered: {e}");
    }
    eprintln!("{what}: waited for the stopped mirror, and the mirror holds it");
}

fn mirror_has(path: PathBuf, want: Vec<u8>, at: u64) -> impl Fn() -> Result<(), String> {
    move || {
        let data = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let end = at as usize + want.len();
        if data.len() >= end && data[at as usize..end] == want[..] {
            Ok(())
        } else {
            Err(format!(
                "{} has {} bytes, not the {} written at {at}",
                path.display(),
                data.len(),
                want.len()
            ))
        }
    }
}

/// In sync mode fsync, fdatasync, O_SYNC and O_DSYNC writes, msync(MS_SYNC)
/// of a shared mapping and fsync of a directory return only when what they
/// cover is on the mirror.
#[test]
fn sync_mode_durability_points_wait_for_the_mirror() {
    let _s = env::serial();
    let mut h = mounted(
        "posix-durability",
        &MountOpts {
            timeout_ms: Some(60_000),
            ..MountOpts::mode("sync")
        },
    );
    let d = h.dir.clone();
    ctx(fs::create_dir(d.join("dir")), || "mkdir".into());
    // Everything so far is durable on the mirror before each stop.
    let settle = |p: &Path| {
        ctx(File::open(p).and_then(|f| f.sync_all()), || {
            format!("fsync {}", p.display())
        })
    };

    let f = workload::open_rw(&d.join("fsync"));
    settle(&d.join("fsync"));
    let data = pattern(50_000, 1);
    let (ff, dd) = (ctx(f.try_clone(), || "dup".into()), data.clone());
    let on_mirror = mirror_has(h.mirror_dir.join("fsync"), data, 0);
    waits_for_the_mirror(
        &mut h,
        "write + fsync",
        move || {
            ff.write_all_at(&dd, 0)?;
            ff.sync_all()
        },
        on_mirror,
    );
    let data = pattern(7_000, 2);
    let (ff, dd) = (ctx(f.try_clone(), || "dup".into()), data.clone());
    let on_mirror = mirror_has(h.mirror_dir.join("fsync"), data, 100_000);
    waits_for_the_mirror(
        &mut h,
        "write + fdatasync",
        move || {
            ff.write_all_at(&dd, 100_000)?;
            ff.sync_data()
        },
        on_mirror,
    );
    drop(f);

    for (name, flag) in [("osync", libc::O_SYNC), ("odsync", libc::O_DSYNC)] {
        let g = ctx(
            OpenOptions::new()
                .write(true)
                .create(true)
                .custom_flags(flag)
                .open(d.join(name)),
            || format!("open {name}"),
        );
        settle(&d.join(name));
        let data = pattern(12_345, 3);
        let dd = data.clone();
        let on_mirror = mirror_has(h.mirror_dir.join(name), data, 4096);
        waits_for_the_mirror(
            &mut h,
            &format!("one write on an {name} descriptor"),
            move || g.write_all_at(&dd, 4096),
            on_mirror,
        );
    }

    // msync(MS_SYNC) of a shared mapping.
    let mf = workload::open_rw(&d.join("mapped"));
    let len = 4 * 4096;
    ctx(mf.set_len(len as u64), || "size".into());
    settle(&d.join("mapped"));
    // SAFETY: mapping a file we own with a valid length.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mf.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", last_err());
    let addr = p as usize;
    let data = pattern(len, 5);
    let dd = data.clone();
    let on_mirror = mirror_has(h.mirror_dir.join("mapped"), data, 0);
    waits_for_the_mirror(
        &mut h,
        "stores to a shared mapping + msync(MS_SYNC)",
        move || {
            // SAFETY: addr is a live writable mapping of len bytes (unmapped
            // below, after this thread returned).
            let m = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
            m.copy_from_slice(&dd);
            // SAFETY: same mapping.
            if unsafe { libc::msync(addr as *mut libc::c_void, len, libc::MS_SYNC) } == 0 {
                Ok(())
            } else {
                Err(last_err())
            }
        },
        on_mirror,
    );
    // SAFETY: unmapping what was mapped above; no other user remains.
    assert_eq!(unsafe { libc::munmap(p, len) }, 0);
    drop(mf);

    // fsync of a directory covers the names created and renamed in it.
    let (dir, m) = (d.join("dir"), h.mirror_dir.join("dir"));
    let dir2 = dir.clone();
    waits_for_the_mirror(
        &mut h,
        "create + rename + fsync of the directory",
        move || {
            File::create(dir2.join("tmp-name"))?;
            fs::rename(dir2.join("tmp-name"), dir2.join("final-name"))?;
            File::open(&dir2)?.sync_all()
        },
        move || {
            if m.join("final-name").is_file() && !m.join("tmp-name").exists() {
                Ok(())
            } else {
                Err("final-name missing or tmp-name still there".into())
            }
        },
    );
    finish(&mut h);
}

/// In strict mode every mutating call returns only after the mirror
/// applied it.
#[test]
fn strict_mode_every_mutation_waits_for_the_mirror() {
    let _s = env::serial();
    let mut h = mounted(
        "posix-strict",
        &MountOpts {
            timeout_ms: Some(60_000),
            ..MountOpts::mode("strict")
        },
    );
    let d = h.dir.clone();
    let f = workload::open_rw(&d.join("f"));
    let data = pattern(9_000, 7);
    let dd = data.clone();
    let fc = ctx(f.try_clone(), || "dup".into());
    let on_mirror = mirror_has(h.mirror_dir.join("f"), data, 0);
    waits_for_the_mirror(
        &mut h,
        "a plain write in strict mode",
        move || fc.write_all_at(&dd, 0),
        on_mirror,
    );
    let (p, m) = (d.join("f"), h.mirror_dir.join("f"));
    waits_for_the_mirror(
        &mut h,
        "chmod in strict mode",
        move || fs::set_permissions(&p, fs::Permissions::from_mode(0o640)),
        move || {
            let mode = fs::metadata(&m).map_err(|e| e.to_string())?.mode() & 0o7777;
            (mode == 0o640)
                .then_some(())
                .ok_or(format!("mode {mode:o}"))
        },
    );
    let (dd, m) = (d.clone(), h.mirror_dir.clone());
    waits_for_the_mirror(
        &mut h,
        "mkdir + rename in strict mode",
        move || {
            fs::create_dir(dd.join("newdir"))?;
            fs::rename(dd.join("f"), dd.join("newdir/f"))
        },
        move || {
            m.join("newdir/f")
                .is_file()
                .then_some(())
                .ok_or("newdir/f missing".into())
        },
    );
    drop(f);
    finish(&mut h);
}

/// chmod (set-id and sticky bits), chown of owner and group separately,
/// utimensat with explicit nanoseconds, UTIME_NOW and UTIME_OMIT (on files
/// and on a symlink itself), futimens; xattrs with XATTR_CREATE and
/// XATTR_REPLACE (and their refusals), on files, directories and a symlink;
/// POSIX ACLs, including default ACLs inherited by new files and
/// directories.
#[test]
fn modes_owners_times_xattrs_and_acls() {
    let _s = env::serial();
    let mut h = mounted("posix-attrs", &MountOpts::default());
    let d = h.dir.clone();
    ctx(fs::create_dir(d.join("dir")), || "mkdir".into());
    for (name, mode) in [("suid", 0o4755), ("sgid", 0o2750), ("none", 0o000)] {
        write_file(&d.join(name), name.as_bytes());
        ctx(
            fs::set_permissions(d.join(name), fs::Permissions::from_mode(mode)),
            || format!("chmod {name}"),
        );
        assert_eq!(lstat(&d.join(name)).mode() & 0o7777, mode);
    }
    ctx(
        fs::set_permissions(d.join("dir"), fs::Permissions::from_mode(0o1777)),
        || "chmod sticky".into(),
    );
    write_file(&d.join("owned"), b"o");
    ctx(
        std::os::unix::fs::chown(d.join("owned"), Some(1234), None),
        || "chown owner".into(),
    );
    ctx(
        std::os::unix::fs::chown(d.join("owned"), None, Some(5678)),
        || "chown group".into(),
    );
    ctx(std::os::unix::fs::symlink("owned", d.join("link")), || {
        "symlink".into()
    });
    workload::lchown(&d.join("link"), 4321, 8765);
    // Times.
    utimens(&d.join("owned"), tspec(1_000, 1), tspec(2_000, 999_999_999));
    utimens(
        &d.join("suid"),
        tspec(0, libc::UTIME_NOW),
        tspec(0, libc::UTIME_OMIT),
    );
    utimens(&d.join("link"), tspec(5, 5), tspec(6, 6));
    {
        let f = ctx(OpenOptions::new().write(true).open(d.join("sgid")), || {
            "open".into()
        });
        let ts = [tspec(0, libc::UTIME_OMIT), tspec(1_234_567_890, 123)];
        // SAFETY: valid fd and two timespecs.
        assert_eq!(unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) }, 0);
    }
    let o = lstat(&d.join("owned"));
    assert_eq!(
        (o.uid(), o.gid(), o.mtime(), o.mtime_nsec()),
        (1234, 5678, 2_000, 999_999_999)
    );
    // Xattrs.
    let f = d.join("owned");
    ctx(setxattr(&f, "user.a", b"1", libc::XATTR_CREATE), || {
        "XATTR_CREATE".into()
    });
    let e = setxattr(&f, "user.a", b"2", libc::XATTR_CREATE).expect_err("create twice");
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
    let e = setxattr(&f, "user.missing", b"2", libc::XATTR_REPLACE).expect_err("replace missing");
    assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "{e}");
    ctx(
        setxattr(&f, "user.a", b"replaced", libc::XATTR_REPLACE),
        || "XATTR_REPLACE".into(),
    );
    ctx(setxattr(&f, "user.big", &pattern(3000, 9), 0), || {
        "big xattr".into()
    });
    ctx(setxattr(&f, "user.gone", b"x", 0), || "xattr".into());
    workload::remove_xattr(&f, "user.gone");
    ctx(setxattr(&d.join("dir"), "user.on-dir", b"d", 0), || {
        "xattr on dir".into()
    });
    ctx(
        setxattr(&d.join("link"), "trusted.on-link", b"l", 0),
        || "trusted xattr on a symlink".into(),
    );
    assert_eq!(getxattr(&f, "user.a").as_deref(), Some(&b"replaced"[..]));
    // ACLs: an access ACL (it changes the group bits to the mask), and a
    // default ACL inherited by what is created below it afterwards.
    let setfacl = |args: &[&str], p: &Path| {
        let o = ctx(Command::new("setfacl").args(args).arg(p).output(), || {
            "running setfacl (install acl)".into()
        });
        assert!(
            o.status.success(),
            "setfacl {args:?} {}: {}",
            p.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    write_file(&d.join("acl-file"), b"a");
    setfacl(&["-m", "u:nobody:rwx,g:nogroup:r"], &d.join("acl-file"));
    ctx(fs::create_dir(d.join("acl-dir")), || "mkdir".into());
    setfacl(&["-d", "-m", "u:nobody:rx,g::r,o::-"], &d.join("acl-dir"));
    write_file(&d.join("acl-dir/inherits"), b"i");
    ctx(fs::create_dir(d.join("acl-dir/subdir")), || "mkdir".into());
    for p in ["acl-dir/inherits", "acl-dir/subdir"] {
        assert!(
            getxattr(&d.join(p), "system.posix_acl_access").is_some(),
            "{p} did not inherit the default ACL on the mount"
        );
    }
    assert!(getxattr(&d.join("acl-dir/subdir"), "system.posix_acl_default").is_some());
    finish(&mut h);
    let m = &h.mirror_dir;
    for (p, name) in [
        ("acl-dir/inherits", "system.posix_acl_access"),
        ("acl-dir/subdir", "system.posix_acl_access"),
        ("acl-dir/subdir", "system.posix_acl_default"),
        ("acl-file", "system.posix_acl_access"),
        ("link", "trusted.on-link"),
    ] {
        assert_eq!(
            getxattr(&m.join(p), name),
            getxattr(&d.join(p), name),
            "{p}: {name} differs on the mirror"
        );
    }
}

/// flock and fcntl (open file description) locks work on the mount and are
/// local (nothing is replicated for them); statfs reports the backing
/// filesystem.
#[test]
fn locks_are_local_and_statfs_is_the_backings() {
    let _s = env::serial();
    let mut h = mounted("posix-locks", &MountOpts::default());
    let d = h.dir.clone();
    let p = d.join("locked");
    write_file(&p, b"lock me");
    let a = ctx(File::open(&p), || "open".into());
    // SAFETY: valid fd.
    assert_eq!(
        unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX) },
        0,
        "{}",
        last_err()
    );
    // Another process cannot take it.
    let o = ctx(
        Command::new("flock")
            .args(["-n", "-x"])
            .arg(&p)
            .arg("true")
            .output(),
        || "running flock(1)".into(),
    );
    assert!(
        !o.status.success(),
        "flock -n took a lock held by another open file description"
    );
    // Nor can another open file description in this process.
    let b = ctx(File::open(&p), || "open".into());
    // SAFETY: valid fd.
    let r = unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, -1, "a second flock succeeded");
    assert_eq!(last_err().raw_os_error(), Some(libc::EWOULDBLOCK));
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_UN) }, 0);
    // SAFETY: valid fd.
    assert_eq!(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    // fcntl OFD locks: byte ranges, conflicts between descriptions.
    let ofd = |f: &File, kind: i32, start: i64, len: i64| -> i32 {
        // SAFETY: flock is plain data; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        // SAFETY: valid fd and flock struct.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == 0 {
            0
        } else {
            last_err().raw_os_error().unwrap_or(-1)
        }
    };
    let w1 = ctx(OpenOptions::new().read(true).write(true).open(&p), || {
        "open".into()
    });
    let w2 = ctx(OpenOptions::new().read(true).write(true).open(&p), || {
        "open".into()
    });
    assert_eq!(ofd(&w1, libc::F_WRLCK, 0, 100), 0);
    assert_eq!(ofd(&w2, libc::F_WRLCK, 50, 10), libc::EAGAIN);
    assert_eq!(ofd(&w2, libc::F_WRLCK, 100, 10), 0, "a disjoint range");
    assert_eq!(ofd(&w1, libc::F_UNLCK, 0, 100), 0);
    assert_eq!(ofd(&w2, libc::F_WRLCK, 50, 10), 0);
    drop((a, b, w1, w2));
    // statfs: the backing filesystem's geometry (DIR's backing is on the
    // same filesystem as the harness's temp dir).
    let sv = |p: &Path| {
        let cp = cpath(p);
        // SAFETY: statvfs is plain data; all-zero is a valid value.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and struct.
        assert_eq!(
            unsafe { libc::statvfs(cp.as_ptr(), &mut s) },
            0,
            "{}",
            last_err()
        );
        s
    };
    let (m, b) = (sv(&d), sv(h.tmp().path()));
    assert_eq!(
        (m.f_bsize, m.f_frsize, m.f_blocks, m.f_files, m.f_namemax),
        (b.f_bsize, b.f_frsize, b.f_blocks, b.f_files, b.f_namemax),
        "statfs of the mount differs from its backing filesystem's"
    );
    assert!(m.f_bavail > 0 && m.f_ffree > 0);
    finish(&mut h);
}

/// A directory of 10,000 entries read back completely (also with seeks back
/// to offsets readdir returned), names that are not UTF-8 (files,
/// directories, symlinks with such targets, hard links, renames, xattrs),
/// and mutations deep below PATH_MAX made through relative (*at) calls.
#[test]
fn large_directories_non_utf8_names_and_deep_relative_paths() {
    let _s = env::serial();
    let mut h = mounted("posix-names", &MountOpts::default());
    let d = h.dir.clone();
    let big = d.join("big-dir");
    ctx(fs::create_dir(&big), || "mkdir".into());
    const N: usize = 10_000;
    for i in 0..N {
        let p = big.join(format!("entry-{i:05}-{}", "n".repeat(i % 50)));
        ctx(File::create(&p), || format!("create {}", p.display()));
    }
    let mut names: Vec<OsString> = ctx(fs::read_dir(&big), || "readdir".into())
        .map(|e| ctx(e, || "readdir entry".into()).file_name())
        .collect();
    assert_eq!(names.len(), N, "readdir returned {} entries", names.len());
    names.sort();
    names.dedup();
    assert_eq!(names.len(), N, "readdir returned duplicates");
    // telldir/seekdir: restart from a cookie in the middle.
    {
        let cp = cpath(&big);
        // SAFETY: valid C string; the DIR* is closed below.
        let dirp = unsafe { libc::opendir(cp.as_ptr()) };
        assert!(!dirp.is_null(), "opendir: {}", last_err());
        let mut seen = 0usize;
        let mut cookie = 0i64;
        let mut after: Vec<Vec<u8>> = Vec::new();
        loop {
            // SAFETY: valid DIR*.
            let e = unsafe { libc::readdir(dirp) };
            if e.is_null() {
                break;
            }
            seen += 1;
            if seen == N / 2 {
                // SAFETY: valid DIR*.
                cookie = unsafe { libc::telldir(dirp) };
            } else if seen > N / 2 {
                // SAFETY: e points to a dirent with a NUL-terminated name.
                after.push(
                    unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) }
                        .to_bytes()
                        .to_vec(),
                );
            }
        }
        // SAFETY: valid DIR* and a cookie telldir returned.
        unsafe { libc::seekdir(dirp, cookie) };
        let mut again = Vec::new();
        loop {
            // SAFETY: valid DIR*.
            let e = unsafe { libc::readdir(dirp) };
            if e.is_null() {
                break;
            }
            // SAFETY: as above.
            again.push(
                unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) }
                    .to_bytes()
                    .to_vec(),
            );
        }
        // SAFETY: closing the DIR* opened above.
        unsafe { libc::closedir(dirp) };
        assert_eq!(
            again, after,
            "seekdir to a telldir cookie did not resume there"
        );
    }
    // Remove every third entry.
    for i in (0..N).step_by(3) {
        let p = big.join(format!("entry-{i:05}-{}", "n".repeat(i % 50)));
        ctx(fs::remove_file(&p), || format!("unlink {}", p.display()));
    }
    assert_eq!(
        ctx(fs::read_dir(&big), || "readdir".into()).count(),
        N - N.div_ceil(3)
    );

    // Names that are not UTF-8.
    let raw = |b: &[u8]| d.join(OsStr::from_bytes(b));
    ctx(fs::create_dir(raw(b"dir-\xff\xfe")), || {
        "mkdir non-UTF-8".into()
    });
    write_file(&raw(b"dir-\xff\xfe/caf\xe9"), b"latin-1 name");
    write_file(&raw(b"\x80\x81\x82"), b"bare continuation bytes");
    ctx(
        std::os::unix::fs::symlink(OsStr::from_bytes(b"target-\xc3\x28"), raw(b"link-\xc0")),
        || "symlink non-UTF-8".into(),
    );
    ctx(
        fs::hard_link(raw(b"\x80\x81\x82"), raw(b"hard-\xfa")),
        || "link non-UTF-8".into(),
    );
    ctx(
        fs::rename(raw(b"dir-\xff\xfe/caf\xe9"), raw(b"moved-\xe9")),
        || "rename non-UTF-8".into(),
    );
    ctx(
        setxattr(&raw(b"moved-\xe9"), "user.bin", b"\xff\x00\xfe", 0),
        || "xattr".into(),
    );
    let listed: Vec<Vec<u8>> = ctx(fs::read_dir(&d), || "readdir".into())
        .map(|e| ctx(e, || "entry".into()).file_name().into_vec())
        .collect();
    for want in [
        &b"moved-\xe9"[..],
        b"\x80\x81\x82",
        b"hard-\xfa",
        b"link-\xc0",
    ] {
        assert!(listed.iter().any(|n| n == want), "{want:?} not listed");
    }

    // Deep below PATH_MAX: every kind of mutation through *at() calls.
    deep_mutations(&d);
    finish(&mut h);
    assert_eq!(
        ctx(fs::read_dir(h.mirror_dir.join("big-dir")), || {
            "readdir mirror".into()
        })
        .count(),
        N - N.div_ceil(3)
    );
}

fn openat(dir: RawFd, name: &str, flags: i32, mode: u32) -> OwnedFd {
    let c = CString::new(name).unwrap_or_default();
    // SAFETY: valid dirfd and C string.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    assert!(fd >= 0, "openat {name}: {}", last_err());
    // SAFETY: fresh fd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn ok(r: libc::c_int, what: &str) {
    assert_eq!(r, 0, "{what}: {}", last_err());
}

/// 30 levels of 200-byte names (6 KB of path), then create, write, chmod,
/// fchown, xattr, rename, link, symlink, mkdir, unlink and rmdir at the
/// bottom, all relative to directory descriptors.
fn deep_mutations(root: &Path) {
    let mut fd = OwnedFd::from(ctx(File::open(root), || "open root".into()));
    for level in 0..30 {
        let name = format!("{level:03}{}", "p".repeat(197));
        let c = CString::new(name.clone()).unwrap_or_default();
        // SAFETY: valid dirfd and C string.
        ok(
            unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755) },
            "mkdirat",
        );
        fd = openat(fd.as_raw_fd(), &name, libc::O_RDONLY | libc::O_DIRECTORY, 0);
    }
    let dfd = fd.as_raw_fd();
    let f = openat(
        dfd,
        "deep",
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
        0o644,
    );
    let data = pattern(20_000, 11);
    // SAFETY: valid fd and buffer.
    let n = unsafe { libc::pwrite(f.as_raw_fd(), data.as_ptr().cast(), data.len(), 10) };
    assert_eq!(n, data.len() as isize, "pwrite deep: {}", last_err());
    // SAFETY: valid fds, C strings and buffers below.
    unsafe {
        ok(libc::fchmod(f.as_raw_fd(), 0o640), "fchmod deep");
        ok(libc::fchown(f.as_raw_fd(), 1111, 2222), "fchown deep");
        let (k, v) = (c"user.deep", b"deep value");
        ok(
            libc::fsetxattr(f.as_raw_fd(), k.as_ptr(), v.as_ptr().cast(), v.len(), 0),
            "fsetxattr deep",
        );
        ok(libc::ftruncate(f.as_raw_fd(), 15_000), "ftruncate deep");
        ok(libc::fsync(f.as_raw_fd()), "fsync deep");
        ok(
            libc::renameat(dfd, c"deep".as_ptr(), dfd, c"deep-renamed".as_ptr()),
            "renameat",
        );
        ok(
            libc::linkat(dfd, c"deep-renamed".as_ptr(), dfd, c"deep-link".as_ptr(), 0),
            "linkat",
        );
        ok(
            libc::symlinkat(c"deep-renamed".as_ptr(), dfd, c"deep-sym".as_ptr()),
            "symlinkat",
        );
        ok(libc::mkdirat(dfd, c"deep-dir".as_ptr(), 0o700), "mkdirat");
        let t = openat(dfd, "deep-temp", libc::O_WRONLY | libc::O_CREAT, 0o600);
        drop(t);
        ok(libc::unlinkat(dfd, c"deep-temp".as_ptr(), 0), "unlinkat");
        ok(libc::mkdirat(dfd, c"deep-gone".as_ptr(), 0o700), "mkdirat");
        ok(
            libc::unlinkat(dfd, c"deep-gone".as_ptr(), libc::AT_REMOVEDIR),
            "rmdir at",
        );
        let ts = [tspec(1_500_000_000, 5), tspec(1_500_000_000, 5)];
        ok(
            libc::utimensat(
                dfd,
                c"deep-sym".as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            ),
            "utimensat deep symlink",
        );
    }
    drop(fd);
}

/// The application runs as its own user: with allow_other and
/// default_permissions another user sees the mount, creates files it then
/// owns (on the mirror too), and is refused what the modes forbid. Hard
/// links are one inode: the same inode number, link count, mode and owner
/// through every name, before and after changes made through one name.
#[test]
fn other_users_permissions_and_hard_links_as_one_inode() {
    let _s = env::serial();
    let mut h = Harness::new("posix-perms");
    for p in [h.tmp().path().to_path_buf(), h.dir.clone()] {
        ctx(
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)),
            || format!("chmod {}", p.display()),
        );
    }
    h.start_mirror();
    h.mount(&MountOpts::default());
    let d = h.dir.clone();
    let opts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let line = opts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(d.to_str().unwrap_or("")))
        .unwrap_or_else(|| panic!("{} not in /proc/self/mounts", d.display()));
    assert!(
        line.contains("allow_other") && line.contains("default_permissions"),
        "mount options lack allow_other/default_permissions: {line}"
    );
    ctx(fs::create_dir(d.join("shared")), || "mkdir".into());
    ctx(
        fs::set_permissions(d.join("shared"), fs::Permissions::from_mode(0o777)),
        || "chmod".into(),
    );
    write_file(&d.join("roots"), b"root's file");
    ctx(
        fs::set_permissions(d.join("roots"), fs::Permissions::from_mode(0o644)),
        || "chmod".into(),
    );
    let q = |p: &Path| {
        p.to_str()
            .unwrap_or_else(|| panic!("non-UTF-8 temp path"))
            .to_string()
    };
    let (ok1, err1) = as_nobody(&format!(
        "echo hello > '{0}/mine' && mkdir '{0}/mydir' && ln '{0}/mine' '{0}/mine2' && cat '{1}' >/dev/null",
        q(&d.join("shared")),
        q(&d.join("roots"))
    ));
    assert!(ok1, "nobody could not work in a 0777 directory: {err1}");
    let m = lstat(&d.join("shared/mine"));
    assert_eq!((m.uid(), m.gid()), (65534, 65534), "owner of nobody's file");
    for (what, script) in [
        (
            "write root's 0644 file",
            format!("echo x >> '{}'", q(&d.join("roots"))),
        ),
        (
            "create in root's 0755 directory",
            format!("touch '{}'", q(&d.join("nope"))),
        ),
        (
            "chmod root's file",
            format!("chmod 666 '{}'", q(&d.join("roots"))),
        ),
        (
            "unlink in a directory it cannot write",
            format!("rm -f '{}'", q(&d.join("roots"))),
        ),
    ] {
        let (ok2, err2) = as_nobody(&script);
        assert!(!ok2, "nobody could {what}");
        assert!(
            err2.contains("ermission denied") || err2.contains("not permitted"),
            "nobody: {what}: {err2}"
        );
    }
    assert_eq!(read_file(&d.join("roots")), b"root's file");
    assert!(!d.join("nope").exists());

    // Hard links: one inode through every name.
    write_file(&d.join("l1"), b"linked");
    ctx(fs::create_dir(d.join("ld")), || "mkdir".into());
    ctx(fs::hard_link(d.join("l1"), d.join("ld/l2")), || {
        "link".into()
    });
    ctx(fs::hard_link(d.join("ld/l2"), d.join("l3")), || {
        "link".into()
    });
    ctx(
        fs::set_permissions(d.join("ld/l2"), fs::Permissions::from_mode(0o4710)),
        || "chmod via l2".into(),
    );
    ctx(
        std::os::unix::fs::chown(d.join("l3"), Some(4242), Some(2424)),
        || "chown via l3".into(),
    );
    ctx(
        OpenOptions::new()
            .append(true)
            .open(d.join("l1"))
            .and_then(|mut f| f.write_all(b" and appended")),
        || "append via l1".into(),
    );
    let same = |names: &[&str], nlink: u64| {
        let ms: Vec<fs::Metadata> = names.iter().map(|n| lstat(&d.join(n))).collect();
        for (n, m) in names.iter().zip(&ms) {
            assert_eq!(
                (m.ino(), m.nlink(), m.mode(), m.uid(), m.gid(), m.len()),
                (
                    ms[0].ino(),
                    nlink,
                    ms[0].mode(),
                    ms[0].uid(),
                    ms[0].gid(),
                    ms[0].len()
                ),
                "{n} disagrees with {}",
                names[0]
            );
        }
        // The chown after the chmod cleared set-user-id, as the kernel does.
        assert_eq!(ms[0].mode() & 0o7777, 0o710);
        assert_eq!((ms[0].uid(), ms[0].gid()), (4242, 2424));
    };
    same(&["l1", "ld/l2", "l3"], 3);
    ctx(fs::remove_file(d.join("l1")), || "unlink l1".into());
    same(&["ld/l2", "l3"], 2);
    assert_eq!(read_file(&d.join("l3")), b"linked and appended");
    finish(&mut h);
    let mm = &h.mirror_dir;
    let (a, b) = (lstat(&mm.join("ld/l2")), lstat(&mm.join("l3")));
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "hard links on the mirror"
    );
    let mine = lstat(&mm.join("shared/mine"));
    assert_eq!((mine.uid(), mine.gid(), mine.nlink()), (65534, 65534, 2));
}

/// Writes `level` to /proc/sys/vm/drop_caches (1: page cache, 2: clean
/// dentries and inodes, 3: both).
fn drop_caches(level: &str) {
    ctx(fs::write("/proc/sys/vm/drop_caches", level), || {
        format!("writing {level} to /proc/sys/vm/drop_caches")
    });
}

/// Drops the kernel's clean dentries and inodes: every FUSE inode no longer
/// in use is then forgotten (the mount gets FORGET for its lookups).
fn drop_dentries_and_inodes() {
    drop_caches("2");
}

/// Listings carry the entries' attributes (readdirplus): a stat after a
/// listing must see what the last change made, hard links share their
/// number, and every lookup a listing gave the kernel comes back when the
/// kernel drops its caches (the mount's descriptors return to where they
/// were).
#[test]
fn listings_give_fresh_attributes_and_their_lookups_are_returned() {
    let _s = env::serial();
    let mut h = mounted("posix-listing", &MountOpts::default());
    let dir = h.dir.join("listed");
    ctx(fs::create_dir(&dir), || "mkdir".into());
    // Several pages of entries per listing, names of every length.
    const N: usize = 3_000;
    let name = |i: usize| format!("f{i:04}-{}", "x".repeat(i % 40));
    for i in 0..N {
        write_file(&dir.join(name(i)), &pattern(i % 700, i as u8));
    }
    ctx(fs::hard_link(dir.join(name(1)), dir.join("hard")), || {
        "link".into()
    });
    ctx(std::os::unix::fs::symlink(name(2), dir.join("sym")), || {
        "symlink".into()
    });
    let pid = h.mount.as_ref().expect("the mount runs").pid();
    let fds = || {
        ctx(fs::read_dir(format!("/proc/{pid}/fd")), || {
            format!("listing the mount's descriptors (pid {pid})")
        })
        .count()
    };
    // The forgets arrive asynchronously: drop the caches until the count
    // stops moving (bounded).
    let settled = || {
        let mut last = usize::MAX;
        for _ in 0..50 {
            drop_dentries_and_inodes();
            std::thread::sleep(Duration::from_millis(200));
            let n = fds();
            if n == last {
                break;
            }
            last = n;
        }
        last
    };
    let base = settled();
    for round in 0..3usize {
        if round > 0 {
            for i in (0..N).step_by(3) {
                let mut f = ctx(
                    OpenOptions::new().append(true).open(dir.join(name(i))),
                    || format!("open {}", name(i)),
                );
                ctx(f.write_all(&[b'+'; 10]), || "append".into());
            }
        }
        let mut seen = 0;
        for e in ctx(fs::read_dir(&dir), || "readdir".into()) {
            use std::os::unix::fs::DirEntryExt;
            let e = ctx(e, || "readdir entry".into());
            let md = lstat(&e.path());
            assert_eq!(md.ino(), e.ino(), "{:?}: listed and stat numbers", e.path());
            let n = e.file_name();
            match n.to_str() {
                Some("hard") => {
                    assert_eq!(md.ino(), lstat(&dir.join(name(1))).ino());
                    assert_eq!(md.nlink(), 2);
                }
                Some("sym") => assert!(md.file_type().is_symlink()),
                _ => {
                    let i: usize = n.to_string_lossy()[1..5].parse().expect("a number");
                    let appends = if i.is_multiple_of(3) { round } else { 0 };
                    assert_eq!(
                        md.len(),
                        (i % 700 + 10 * appends) as u64,
                        "{n:?} after {round} rounds of appends"
                    );
                    assert_eq!(md.nlink(), if i == 1 { 2 } else { 1 });
                }
            }
            seen += 1;
        }
        assert_eq!(seen, N + 2, "entries listed in round {round}");
    }
    let listed = fds();
    assert!(
        listed >= N,
        "the kernel holds lookups on the {N} listed entries: {base} descriptors before, {listed} after"
    );
    let after = settled();
    eprintln!(
        "mount descriptors: {base} before the listings, {listed} after, {after} once forgotten"
    );
    assert!(
        after <= base,
        "the kernel forgot the listed entries, but the mount still holds {after} descriptors \
         ({base} before the listings): lookups were counted that the kernel never took"
    );
    finish(&mut h);
}

/// The read-ahead of a sysfs backing device `dev`, if it has one.
fn bdi_read_ahead_kb(dev: u64) -> Option<u64> {
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    fs::read_to_string(knob).ok()?.trim().parse().ok()
}

/// The mount raises its read-ahead to 1 MiB (large reads then reach the
/// disk 1 MiB at a time instead of 256 KiB), and leaves the read-ahead of
/// the disk underneath as it was.
#[test]
fn the_mount_reads_ahead_1_mib_and_leaves_the_disk_alone() {
    let _s = env::serial();
    let h0 = Harness::new("posix-readahead-probe");
    let under = lstat(&h0.mirror_dir).dev();
    let under_before = bdi_read_ahead_kb(under);
    drop(h0);
    let mut h = mounted("posix-readahead", &MountOpts::default());
    let dev = lstat(&h.dir).dev();
    assert_eq!(libc::major(dev), 0, "a FUSE mount has an anonymous device");
    // The mount raises it from a thread of its own once the session has
    // answered INIT, which can be just after the mount shows in the mount
    // table: wait for it (bounded), then require it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bdi_read_ahead_kb(dev) != Some(1024) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        bdi_read_ahead_kb(dev),
        Some(1024),
        "read-ahead of the mount (device 0:{}), 10 s after it was mounted",
        libc::minor(dev)
    );
    assert_eq!(
        bdi_read_ahead_kb(under),
        under_before,
        "read-ahead of the disk under the test directories"
    );
    // And large reads return what was written.
    let data = pattern(8 << 20, 7);
    write_file(&h.dir.join("big"), &data);
    drop_caches("3");
    assert!(read_file(&h.dir.join("big")) == data, "the data read back");
    finish(&mut h);
}

/// A mount started under a low soft open-file limit (systemd's default for
/// services is 1,024) raises it to the hard limit: it holds a descriptor for
/// every file the kernel keeps looked up, so it would fail with EMFILE after
/// a few hundred files here.
#[test]
fn a_low_open_file_limit_is_raised_by_the_mount() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let _s = env::serial();
    let (soft, hard) = ctx(getrlimit(Resource::RLIMIT_NOFILE), || "getrlimit".into());
    const N: usize = 2_000;
    assert!(
        hard > 2 * N as u64,
        "the hard open-file limit here ({hard}) is too low for this test"
    );
    let mut h = Harness::new("posix-nofile");
    h.start_mirror();
    // Only the mount inherits the low limit (tests of this binary run one
    // at a time).
    ctx(setrlimit(Resource::RLIMIT_NOFILE, 256, hard), || {
        "lowering the soft limit".into()
    });
    h.spawn_mount(&MountOpts::default());
    ctx(setrlimit(Resource::RLIMIT_NOFILE, soft, hard), || {
        "restoring the soft limit".into()
    });
    // Before the mount is served, a mkdir would go to the directory
    // underneath and never reach the mirror.
    h.wait_mounted(&MountOpts::default());
    h.wait_status(Duration::from_secs(30), |v| v["state"] == "replicating")
        .unwrap_or_else(|e| panic!("mount not replicating: {e}"));
    let pid = h.mount.as_ref().expect("the mount runs").pid();
    let limits = ctx(fs::read_to_string(format!("/proc/{pid}/limits")), || {
        "reading the mount's limits".into()
    });
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, [hard.to_string(), hard.to_string()], "{line}");
    let d = h.dir.join("many");
    ctx(fs::create_dir(&d), || "mkdir".into());
    for i in 0..N {
        write_file(&d.join(format!("f{i}")), b"x");
    }
    let listed = ctx(fs::read_dir(&d), || "readdir".into()).count();
    assert_eq!(listed, N);
    for i in 0..N {
        assert_eq!(lstat(&d.join(format!("f{i}"))).len(), 1);
    }
    finish(&mut h);
}
