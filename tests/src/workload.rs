//! Deterministic workloads run on a mount: every kind of mutation the
//! replication layer must carry.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: impl FnOnce() -> String) -> T {
    r.unwrap_or_else(|e| panic!("{}: {e}", what()))
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) ^ ((i >> 8) as u8))
        .collect()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes())
        .unwrap_or_else(|_| panic!("path with NUL: {}", p.display()))
}

/// Sets an xattr (not following symlinks).
pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap_or_default());
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert!(
        r == 0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn remove_xattr(p: &Path, name: &str) {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap_or_default());
    // SAFETY: valid strings.
    let r = unsafe { libc::lremovexattr(cp.as_ptr(), cn.as_ptr()) };
    assert!(
        r == 0,
        "removexattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// Sets mtime (and atime) of `p` without following symlinks.
pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let cp = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cp.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert!(
        r == 0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    ctx(std::os::unix::fs::lchown(p, Some(uid), Some(gid)), || {
        format!("lchown {}", p.display())
    });
}

fn chmod(p: &Path, mode: u32) {
    ctx(
        fs::set_permissions(p, fs::Permissions::from_mode(mode)),
        || format!("chmod {:o} {}", mode, p.display()),
    );
}

fn write_file(p: &Path, data: &[u8]) {
    ctx(fs::write(p, data), || format!("writing {}", p.display()));
}

fn fallocate(f: &File, mode: i32, off: i64, len: i64, what: &str) {
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
    assert!(
        r == 0,
        "fallocate ({what}): {}",
        std::io::Error::last_os_error()
    );
}

/// The mixed workload: files of several sizes, directories, symlinks,
/// hard links, renames (plain, across directories, over an existing file,
/// of a directory), truncates, holes (sparse writes, punched holes,
/// preallocation), xattrs (set, replace, remove; on files and directories),
/// a POSIX ACL, chmod (incl. setuid and sticky bits), chown, explicit
/// mtimes, a fifo, unlink and rmdir, unusual names.
pub fn mixed(root: &Path) {
    let d = |p: &str| root.join(p);
    for p in [
        "a",
        "a/b",
        "a/b/c",
        "x",
        "gone",
        "gone/sub",
        "ren_src",
        "ren_src/in",
    ] {
        ctx(fs::create_dir(d(p)), || format!("mkdir {p}"));
    }
    // Files of sizes around page and chunk boundaries.
    for (i, n) in [0usize, 1, 4095, 4096, 4097, 65_536, 1_048_579]
        .iter()
        .enumerate()
    {
        write_file(&d(&format!("a/f{i}")), &pattern(*n, i as u8));
    }
    // Overwrite in the middle, then append.
    {
        let mut f = ctx(OpenOptions::new().write(true).open(d("a/f5")), || {
            "open a/f5".into()
        });
        ctx(f.seek(SeekFrom::Start(1000)), || "seek".into());
        ctx(f.write_all(&pattern(5000, 77)), || "overwrite a/f5".into());
        ctx(f.seek(SeekFrom::End(0)), || "seek end".into());
        ctx(f.write_all(b"tail"), || "append a/f5".into());
        ctx(f.sync_all(), || "fsync a/f5".into());
    }
    // O_TRUNC rewrite.
    write_file(&d("a/f6"), b"rewritten");
    // Truncate: shrink and grow (the growth is a hole).
    {
        let f = ctx(OpenOptions::new().write(true).open(d("a/f4")), || {
            "open a/f4".into()
        });
        ctx(f.set_len(100), || "truncate a/f4 down".into());
        ctx(f.set_len(300_000), || "truncate a/f4 up".into());
    }
    // Sparse file: data at 0 and at 10 MiB.
    {
        let mut f = ctx(File::create(d("x/sparse")), || "create x/sparse".into());
        ctx(f.write_all(b"start"), || "write".into());
        ctx(f.seek(SeekFrom::Start(10 << 20)), || "seek".into());
        ctx(f.write_all(b"far end"), || "write far".into());
    }
    // Punched hole and preallocation.
    {
        write_file(&d("x/punched"), &pattern(256 * 1024, 5));
        let f = ctx(OpenOptions::new().write(true).open(d("x/punched")), || {
            "open x/punched".into()
        });
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            64 * 1024,
            64 * 1024,
            "punch hole",
        );
        let g = ctx(File::create(d("x/prealloc")), || "create x/prealloc".into());
        fallocate(&g, 0, 0, 1 << 20, "preallocate");
        fallocate(
            &g,
            libc::FALLOC_FL_KEEP_SIZE,
            1 << 20,
            1 << 20,
            "preallocate beyond size",
        );
    }
    // Symlinks: relative, absolute dangling, to a directory, then retarget.
    ctx(symlink("../a/f1", d("x/rel")), || "symlink x/rel".into());
    ctx(
        symlink("/nonexistent/target/of/a/dangling/link", d("x/dangling")),
        || "symlink x/dangling".into(),
    );
    ctx(symlink("a/b", d("dirlink")), || "symlink dirlink".into());
    ctx(symlink("first", d("x/retarget")), || {
        "symlink x/retarget".into()
    });
    ctx(fs::remove_file(d("x/retarget")), || {
        "unlink x/retarget".into()
    });
    ctx(symlink("second-target", d("x/retarget")), || {
        "symlink x/retarget again".into()
    });
    // Hard links: three names, one removed, one renamed.
    write_file(&d("a/linked"), &pattern(10_000, 9));
    ctx(fs::hard_link(d("a/linked"), d("x/link2")), || {
        "link x/link2".into()
    });
    ctx(fs::hard_link(d("a/linked"), d("a/b/link3")), || {
        "link a/b/link3".into()
    });
    ctx(fs::hard_link(d("a/linked"), d("a/b/link4")), || {
        "link a/b/link4".into()
    });
    ctx(fs::remove_file(d("a/b/link4")), || {
        "unlink a/b/link4".into()
    });
    ctx(fs::rename(d("a/b/link3"), d("a/b/c/link3-renamed")), || {
        "rename link3".into()
    });
    // Writing through one name changes all of them.
    {
        let mut f = ctx(OpenOptions::new().append(true).open(d("x/link2")), || {
            "open x/link2".into()
        });
        ctx(f.write_all(b"via link2"), || "append via link".into());
    }
    // Renames.
    write_file(&d("a/r1"), b"r1");
    ctx(fs::rename(d("a/r1"), d("a/r1-renamed")), || {
        "rename in dir".into()
    });
    write_file(&d("a/r2"), b"r2");
    ctx(fs::rename(d("a/r2"), d("x/r2-moved")), || {
        "rename across dirs".into()
    });
    write_file(&d("x/victim"), b"old content to be replaced");
    write_file(&d("a/replacer"), b"new content");
    ctx(fs::rename(d("a/replacer"), d("x/victim")), || {
        "rename over existing".into()
    });
    write_file(&d("ren_src/in/file"), b"in a renamed dir");
    ctx(fs::rename(d("ren_src"), d("x/ren_dst")), || {
        "rename directory".into()
    });
    // Xattrs on a file and a directory; replace and remove.
    set_xattr(&d("a/f1"), "user.small", b"v1");
    set_xattr(&d("a/f1"), "user.small", b"v2-replaced");
    set_xattr(&d("a/f1"), "user.big", &pattern(3000, 3));
    set_xattr(&d("a/f1"), "user.gone", b"removed below");
    remove_xattr(&d("a/f1"), "user.gone");
    set_xattr(&d("a/b"), "user.dirattr", b"on a directory");
    set_xattr(&d("a/f2"), "user.empty", b"");
    // A POSIX ACL (system.posix_acl_access / _default).
    for args in [vec!["-m", "u:nobody:r"], vec!["-d", "-m", "u:nobody:rx"]] {
        let target = if args[0] == "-d" {
            d("a/b/c")
        } else {
            d("a/f3")
        };
        let o = ctx(
            Command::new("setfacl").args(&args).arg(&target).output(),
            || "running setfacl (install acl)".into(),
        );
        assert!(
            o.status.success(),
            "setfacl {args:?} {}: {}",
            target.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Modes and owners.
    chmod(&d("a/f0"), 0o600);
    chmod(&d("a/f2"), 0o4755);
    chmod(&d("x"), 0o1777);
    chmod(&d("a/b/c"), 0o750);
    lchown(&d("a/f0"), 65534, 65534);
    lchown(&d("a/b"), 1234, 4321);
    lchown(&d("x/rel"), 1000, 1000);
    // A fifo.
    {
        let cp = cpath(&d("x/fifo"));
        // SAFETY: valid path.
        let r = unsafe { libc::mkfifo(cp.as_ptr(), 0o640) };
        assert!(r == 0, "mkfifo x/fifo: {}", std::io::Error::last_os_error());
    }
    // Unusual names.
    write_file(&d("a/with space and ünïcode"), b"u");
    write_file(&d(&format!("a/{}", "n".repeat(255))), b"long name");
    write_file(&d("a/-dash"), b"dash");
    // Deletions.
    write_file(&d("gone/sub/f"), b"deleted");
    ctx(fs::remove_file(d("gone/sub/f")), || "unlink".into());
    ctx(fs::remove_dir(d("gone/sub")), || "rmdir gone/sub".into());
    ctx(fs::remove_dir(d("gone")), || "rmdir gone".into());
    // Explicit times last (later changes in a directory would move them).
    set_mtime(&d("a/f1"), 1_000_000_000, 123_456_789);
    set_mtime(&d("x/dangling"), 1_200_000_000, 1);
    set_mtime(&d("a/b/c"), 1_300_000_000, 999_999_999);
}

/// Creates a chain of `depth` directories with names of `name_len` bytes
/// under `root` (so the full path can exceed PATH_MAX), with a file at each
/// tenth level (with a fixed mtime), using *at() calls on directory
/// descriptors.
pub fn deep_tree(root: &Path, depth: usize, name_len: usize) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let cp = cpath(root);
    // SAFETY: valid path; the fd is owned below.
    let fd = unsafe {
        libc::open(
            cp.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    assert!(
        fd >= 0,
        "open {}: {}",
        root.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh fd.
    let mut cur = unsafe { OwnedFd::from_raw_fd(fd) };
    for level in 0..depth {
        let name = CString::new(format!(
            "{level:03}{}",
            "d".repeat(name_len.saturating_sub(3))
        ))
        .unwrap_or_default();
        // SAFETY: valid dirfd and name.
        let r = unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) };
        assert!(
            r == 0,
            "mkdirat at level {level}: {}",
            std::io::Error::last_os_error()
        );
        if level % 10 == 9 {
            let fname = CString::new(format!("file-at-{level}")).unwrap_or_default();
            // SAFETY: valid dirfd and name.
            let f = unsafe {
                libc::openat(
                    cur.as_raw_fd(),
                    fname.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    0o644,
                )
            };
            assert!(
                f >= 0,
                "openat file at level {level}: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fresh fd.
            let f = unsafe { OwnedFd::from_raw_fd(f) };
            let data = pattern(1000 + level, level as u8);
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::write(f.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            assert_eq!(n, data.len() as isize, "write at level {level}");
            // A fixed mtime, so that two trees built alike compare equal.
            let ts = [libc::timespec {
                tv_sec: 1_500_000_000 + level as i64,
                tv_nsec: 0,
            }; 2];
            // SAFETY: valid fd and two timespecs.
            let r = unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) };
            assert_eq!(r, 0, "futimens at level {level}");
        }
        // SAFETY: valid dirfd and name.
        let nfd = unsafe {
            libc::openat(
                cur.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        assert!(
            nfd >= 0,
            "openat dir at level {level}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fresh fd.
        cur = unsafe { OwnedFd::from_raw_fd(nfd) };
    }
}

/// Writes a small, varied tree (for pre-population and after-sync checks):
/// `n` files in a few directories, a symlink, a hard link, an xattr.
pub fn small_tree(root: &Path, salt: u8, n: usize) {
    for i in 0..n {
        let dir = root.join(format!("d{}", i % 3));
        ctx(fs::create_dir_all(&dir), || {
            format!("mkdir {}", dir.display())
        });
        write_file(
            &dir.join(format!("f{i}")),
            &pattern(100 + i * 997, salt.wrapping_add(i as u8)),
        );
    }
    let _ = symlink(format!("d0/f0-{salt}"), root.join(format!("link-{salt}")));
    let f0 = root.join("d0/f0");
    if f0.exists() {
        let _ = fs::hard_link(&f0, root.join(format!("hard-{salt}")));
        set_xattr(&f0, "user.salt", &[salt]);
    }
}

/// Opens a file O_RDWR|O_CREAT for tests that need a raw handle.
pub fn open_rw(p: &Path) -> File {
    ctx(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(p),
        || format!("open {}", p.display()),
    )
}
