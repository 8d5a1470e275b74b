//! A workload that touches every kind of mutation the filesystem handles.
//! It checks what the application sees along the way; the caller compares
//! the resulting backing tree with a replica afterwards.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(r: libc::c_int, what: &str) {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
}

pub fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (a, b) = (c(from), c(to));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn utimens(p: &Path, times: [libc::timespec; 2], nofollow: bool) {
    let cp = c(p);
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: valid C string and array.
    check(
        unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), times.as_ptr(), flags) },
        "utimensat",
    );
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

fn special(n: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: 0,
        tv_nsec: n,
    }
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let (cp, cn) = (c(p), CString::new(name).unwrap());
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
        Err(std::io::Error::last_os_error())
    }
}

fn fallocate(f: &fs::File, mode: i32, off: i64, len: i64) {
    // SAFETY: valid fd.
    check(
        unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) },
        "fallocate",
    );
}

/// An access ACL: owner rwx, user 65534 r-x, group r--, mask r-x, other ---.
fn acl_bytes() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 7u16, u32::MAX),
        (0x02, 5, 65534),
        (0x04, 4, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Builds a directory chain whose path exceeds PATH_MAX by walking with
/// relative *at() steps, and writes a file at the bottom. Returns the number
/// of bytes of the file's path relative to `base`.
pub fn deep_path(base: &Path) -> usize {
    let name = CString::new("d".repeat(200)).unwrap();
    let mut dir: OwnedFd = fs::File::open(base).unwrap().into();
    let mut total = 0;
    for _ in 0..25 {
        // SAFETY: valid fd and C string.
        check(
            unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) },
            "mkdirat deep",
        );
        // SAFETY: as above.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        check(fd, "openat deep");
        // SAFETY: fd just returned by openat.
        dir = unsafe { OwnedFd::from_raw_fd(fd) };
        total += 201;
    }
    let fname = CString::new("bottom").unwrap();
    // SAFETY: valid fd and C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            fname.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o640,
        )
    };
    check(fd, "create deep file");
    // SAFETY: fd just returned by openat.
    let mut f = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(b"deep content").unwrap();
    // Rename at the bottom too.
    let to = CString::new("bottom2").unwrap();
    // SAFETY: valid fd and C strings.
    check(
        unsafe {
            libc::renameat(
                dir.as_raw_fd(),
                fname.as_ptr(),
                dir.as_raw_fd(),
                to.as_ptr(),
            )
        },
        "renameat deep",
    );
    f.write_all(b" and more").unwrap();
    assert!(total + 7 > libc::PATH_MAX as usize);
    total + 7
}

/// Runs the workload in `m` (the mount). Everything is checked as the
/// application would see it.
pub fn run(m: &Path) {
    // Directories, files, writes at offsets.
    fs::create_dir_all(m.join("d1/d2")).unwrap();
    fs::write(m.join("d1/a"), b"alpha").unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.join("d1/a"))
        .unwrap();
    f.write_all_at(b"XY", 2).unwrap();
    f.write_all_at(b"tail", 100).unwrap();
    drop(f);
    assert_eq!(fs::metadata(m.join("d1/a")).unwrap().len(), 104);

    // Symlinks and hard links.
    std::os::unix::fs::symlink("d1/a", m.join("sym")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", m.join("dangling")).unwrap();
    fs::hard_link(m.join("d1/a"), m.join("d1/d2/hard")).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(m.join("d1/d2/hard"))
        .unwrap()
        .write_all(b"+via-hard")
        .unwrap();
    assert_eq!(
        fs::metadata(m.join("d1/a")).unwrap().ino(),
        fs::metadata(m.join("d1/d2/hard")).unwrap().ino()
    );
    assert_eq!(fs::metadata(m.join("d1/a")).unwrap().nlink(), 2);

    // Renames: plain, across directories, over an existing file, exchange,
    // noreplace.
    fs::write(m.join("r1"), b"r1").unwrap();
    fs::write(m.join("r2"), b"r2").unwrap();
    fs::rename(m.join("r1"), m.join("d1/r1moved")).unwrap();
    fs::rename(m.join("d1/r1moved"), m.join("r2")).unwrap();
    assert_eq!(fs::read(m.join("r2")).unwrap(), b"r1");
    fs::write(m.join("x1"), b"x1").unwrap();
    fs::create_dir(m.join("x2")).unwrap();
    fs::write(m.join("x2/inside"), b"in").unwrap();
    renameat2(&m.join("x1"), &m.join("x2"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.join("x2")).unwrap(), b"x1");
    assert_eq!(fs::read(m.join("x1/inside")).unwrap(), b"in");
    let e = renameat2(&m.join("r2"), &m.join("x2"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    // Rename a directory while a file inside is open, then keep writing.
    fs::create_dir(m.join("movedir")).unwrap();
    let mut inner = fs::File::create(m.join("movedir/f")).unwrap();
    inner.write_all(b"before ").unwrap();
    fs::rename(m.join("movedir"), m.join("d1/d2/moved")).unwrap();
    inner.write_all(b"after").unwrap();
    drop(inner);
    assert_eq!(fs::read(m.join("d1/d2/moved/f")).unwrap(), b"before after");
    // Rename over an existing directory (empty).
    fs::create_dir(m.join("emptydir")).unwrap();
    fs::create_dir(m.join("srcdir")).unwrap();
    fs::write(m.join("srcdir/s"), b"s").unwrap();
    fs::rename(m.join("srcdir"), m.join("emptydir")).unwrap();
    // Rename of two names of one inode is a no-op.
    fs::rename(m.join("d1/d2/hard"), m.join("d1/a")).unwrap();
    assert!(m.join("d1/d2/hard").exists());

    // Unlink an open file and keep writing; unlink one name of a hard link.
    let mut gone = fs::File::create(m.join("gone")).unwrap();
    gone.write_all(b"x").unwrap();
    fs::remove_file(m.join("gone")).unwrap();
    gone.write_all(&[7u8; 10000]).unwrap();
    gone.set_len(5).unwrap();
    drop(gone);
    fs::write(m.join("two"), b"two names").unwrap();
    fs::hard_link(m.join("two"), m.join("d1/two-b")).unwrap();
    let mut t = fs::OpenOptions::new()
        .write(true)
        .open(m.join("two"))
        .unwrap();
    fs::remove_file(m.join("two")).unwrap();
    t.write_all(b"TWO").unwrap();
    drop(t);
    assert_eq!(fs::read(m.join("d1/two-b")).unwrap(), b"TWO names");

    // Truncate (shrink, extend, by path and by handle).
    fs::write(m.join("trunc"), vec![b'z'; 5000]).unwrap();
    let tf = fs::OpenOptions::new()
        .write(true)
        .open(m.join("trunc"))
        .unwrap();
    tf.set_len(100).unwrap();
    tf.set_len(70000).unwrap();
    drop(tf);
    let cp = c(&m.join("trunc"));
    // SAFETY: valid C string.
    check(unsafe { libc::truncate(cp.as_ptr(), 3000) }, "truncate");

    // fallocate: extend, keep size, punch hole, zero range; holes stay holes.
    let fa = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(m.join("falloc"))
        .unwrap();
    fa.write_all_at(&[1u8; 65536], 0).unwrap();
    fallocate(&fa, 0, 65536, 65536);
    fallocate(&fa, libc::FALLOC_FL_KEEP_SIZE, 131072, 65536);
    fallocate(
        &fa,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        4096,
        8192,
    );
    fallocate(&fa, libc::FALLOC_FL_ZERO_RANGE, 32768, 4096);
    // SAFETY: valid fd.
    let hole = unsafe { libc::lseek(fa.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!(hole, 4096, "SEEK_HOLE passes through");
    // SAFETY: valid fd.
    let data = unsafe { libc::lseek(fa.as_raw_fd(), 4096, libc::SEEK_DATA) };
    assert_eq!(data, 12288, "SEEK_DATA passes through");
    drop(fa);

    // O_APPEND from two handles.
    let mut a1 = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(m.join("log"))
        .unwrap();
    let mut a2 = fs::OpenOptions::new()
        .append(true)
        .open(m.join("log"))
        .unwrap();
    for i in 0..20 {
        a1.write_all(format!("a{i};").as_bytes()).unwrap();
        a2.write_all(format!("b{i};").as_bytes()).unwrap();
    }
    drop((a1, a2));
    assert_eq!(
        fs::metadata(m.join("log")).unwrap().len(),
        2 * (10 * 3 + 10 * 4)
    );

    // O_DIRECT handle (served with direct_io).
    let mut od = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.join("direct"))
        .unwrap();
    od.write_all(&[3u8; 8192]).unwrap();
    drop(od);

    // Attributes: chmod, chown, setuid kept by creation, utimens.
    fs::write(m.join("attrs"), b"attrs").unwrap();
    fs::set_permissions(m.join("attrs"), fs::Permissions::from_mode(0o4751)).unwrap();
    std::os::unix::fs::chown(m.join("attrs"), Some(65534), Some(100)).unwrap();
    std::os::unix::fs::lchown(m.join("sym"), Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(m.join("d1/d2"), Some(1000), Some(1000)).unwrap();
    fs::set_permissions(m.join("d1/d2"), fs::Permissions::from_mode(0o3775)).unwrap();
    utimens(
        &m.join("attrs"),
        [ts(1_000_000, 5), ts(2_000_000, 123_456_789)],
        false,
    );
    utimens(
        &m.join("trunc"),
        [special(libc::UTIME_OMIT), special(libc::UTIME_NOW)],
        false,
    );
    utimens(
        &m.join("r2"),
        [special(libc::UTIME_NOW), special(libc::UTIME_OMIT)],
        false,
    );
    utimens(&m.join("sym"), [ts(3, 0), ts(-86400, 500)], true);
    utimens(&m.join("x1"), [ts(4, 0), ts(1_700_000_000, 42)], false);

    // Extended attributes, including an ACL and on a directory.
    setxattr(&m.join("attrs"), "user.k", b"v1", 0).unwrap();
    setxattr(&m.join("attrs"), "user.k", b"v2", libc::XATTR_REPLACE).unwrap();
    assert_eq!(
        setxattr(&m.join("attrs"), "user.k", b"v3", libc::XATTR_CREATE)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EEXIST)
    );
    setxattr(&m.join("attrs"), "user.gone", b"x", 0).unwrap();
    let (cp, cn) = (c(&m.join("attrs")), CString::new("user.gone").unwrap());
    // SAFETY: valid C strings.
    check(
        unsafe { libc::removexattr(cp.as_ptr(), cn.as_ptr()) },
        "removexattr",
    );
    setxattr(&m.join("d1"), "user.dir", &[0u8, 1, 2, 255], 0).unwrap();
    setxattr(&m.join("d1/a"), "user.big", &vec![b'q'; 4000], 0).unwrap();
    fs::write(m.join("acl"), b"acl").unwrap();
    setxattr(&m.join("acl"), "system.posix_acl_access", &acl_bytes(), 0).unwrap();
    assert_eq!(fs::metadata(m.join("acl")).unwrap().mode() & 0o777, 0o750);
    let mut buf = vec![0u8; 64];
    let (cp, cn) = (c(&m.join("attrs")), CString::new("user.k").unwrap());
    // SAFETY: valid C strings and buffer.
    let n = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(&buf[..n as usize], b"v2");

    // Names that are not UTF-8.
    let latin1 = m.join(OsStr::from_bytes(b"caf\xe9"));
    fs::write(&latin1, b"latin-1 name").unwrap();
    fs::create_dir(m.join(OsStr::from_bytes(b"\xff\xfe dir"))).unwrap();
    fs::rename(&latin1, m.join(OsStr::from_bytes(b"\xff\xfe dir/\x01\x7f"))).unwrap();

    // Special files.
    let fifo = c(&m.join("fifo"));
    // SAFETY: valid C string.
    check(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, "mkfifo");
    let sock = std::os::unix::net::UnixListener::bind(m.join("sock")).unwrap();
    drop(sock);

    // A path longer than PATH_MAX.
    fs::create_dir(m.join("deep")).unwrap();
    deep_path(&m.join("deep"));

    // A large directory, read back completely.
    fs::create_dir(m.join("big")).unwrap();
    for i in 0..5000 {
        fs::File::create(m.join(format!("big/entry-{i:05}"))).unwrap();
    }
    let mut names: Vec<_> = fs::read_dir(m.join("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 5000);
    for i in (0..5000).step_by(3) {
        fs::remove_file(m.join(format!("big/entry-{i:05}"))).unwrap();
    }
    assert_eq!(fs::read_dir(m.join("big")).unwrap().count(), 3333);

    // mmap write + msync.
    let mm = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(m.join("mmap"))
        .unwrap();
    mm.set_len(8192).unwrap();
    // SAFETY: a fresh shared mapping of an 8 KiB file, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mm.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::write_bytes(p.cast::<u8>().add(100), b'M', 5000);
        check(libc::msync(p, 8192, libc::MS_SYNC), "msync");
        libc::munmap(p, 8192);
    }
    drop(mm);
    let mut content = Vec::new();
    fs::File::open(m.join("mmap"))
        .unwrap()
        .read_to_end(&mut content)
        .unwrap();
    assert_eq!(content[100..5100], [b'M'; 5000]);

    // A sparse file larger than 4 GiB.
    let huge = fs::File::create(m.join("huge")).unwrap();
    huge.write_all_at(b"start", 0).unwrap();
    huge.write_all_at(b"at five GiB", 5 << 30).unwrap();
    assert!(huge.metadata().unwrap().blocks() < 1024);
    drop(huge);

    // rmdir, and a file overwritten in place from the start.
    fs::create_dir(m.join("d1/todel")).unwrap();
    fs::remove_dir(m.join("d1/todel")).unwrap();
    let mut over = fs::OpenOptions::new()
        .write(true)
        .open(m.join("d1/a"))
        .unwrap();
    over.seek(SeekFrom::Start(0)).unwrap();
    over.write_all(b"OVER").unwrap();
    over.sync_all().unwrap();
}
