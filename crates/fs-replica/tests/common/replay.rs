//! A small, independent test-only applier and tree scanner: replays the op
//! stream into a second directory (through *at() calls, so paths longer than
//! PATH_MAX work) and lists trees for comparison. It exists so that the op
//! stream is checked end to end inside this crate; the real applier lives in
//! hapair-mirror.

use hapair_proto::{Op, RelPath, TimeSet, Timestamp};
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cs(b: &[u8]) -> CString {
    CString::new(b).unwrap()
}

fn ok(r: libc::c_int, what: &str) -> Result<libc::c_int, String> {
    if r < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

fn own(fd: libc::c_int) -> OwnedFd {
    // SAFETY: fd freshly returned by the kernel.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn openat(dir: RawFd, name: &[u8], flags: i32, mode: u32) -> Result<OwnedFd, String> {
    let n = cs(name);
    // SAFETY: valid fd and C string.
    let fd = unsafe { libc::openat(dir, n.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    ok(fd, &format!("openat {}", String::from_utf8_lossy(name))).map(own)
}

/// Opens the parent directory of `p` by walking from `root`; returns it and
/// the last component.
fn parent_of(root: RawFd, p: &RelPath) -> Result<(OwnedFd, Vec<u8>), String> {
    let comps = p.components();
    let (last, dirs) = comps.split_last().ok_or("root has no parent")?;
    let mut cur = openat(root, b".", libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for c in dirs {
        cur = openat(
            cur.as_raw_fd(),
            c,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
    }
    Ok((cur, last.clone()))
}

fn tspec(t: Timestamp) -> libc::timespec {
    libc::timespec {
        tv_sec: t.sec,
        tv_nsec: t.nsec as i64,
    }
}

const OMIT: libc::timespec = libc::timespec {
    tv_sec: 0,
    tv_nsec: libc::UTIME_OMIT,
};

fn utimes_at(
    dir: RawFd,
    name: &[u8],
    at: libc::timespec,
    mt: libc::timespec,
) -> Result<(), String> {
    let n = cs(name);
    let times = [at, mt];
    // SAFETY: valid fd, C string and array.
    ok(
        unsafe { libc::utimensat(dir, n.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) },
        "utimensat",
    )?;
    Ok(())
}

fn set_dir_mtime(dir: RawFd, t: Option<Timestamp>) -> Result<(), String> {
    if let Some(t) = t {
        let times = [OMIT, tspec(t)];
        // SAFETY: valid fd and array.
        ok(
            unsafe { libc::utimensat(dir, c"".as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH) },
            "utimensat parent",
        )?;
    }
    Ok(())
}

fn chown_at(dir: RawFd, name: &[u8], uid: Option<u32>, gid: Option<u32>) -> Result<(), String> {
    let n = cs(name);
    // SAFETY: valid fd and C string.
    ok(
        unsafe {
            libc::fchownat(
                dir,
                n.as_ptr(),
                uid.unwrap_or(u32::MAX),
                gid.unwrap_or(u32::MAX),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        "fchownat",
    )?;
    Ok(())
}

fn chmod_at(dir: RawFd, name: &[u8], mode: u32) -> Result<(), String> {
    let n = cs(name);
    // SAFETY: valid fd and C string.
    ok(
        unsafe { libc::fchmodat(dir, n.as_ptr(), mode, 0) },
        "fchmodat",
    )?;
    Ok(())
}

fn proc_child(dir: RawFd, name: &[u8]) -> CString {
    let mut p = format!("/proc/self/fd/{dir}/").into_bytes();
    p.extend_from_slice(name);
    cs(&p)
}

/// Applies one op under `root`.
pub fn apply(root: RawFd, op: &Op, payload: &[u8]) -> Result<(), String> {
    match op {
        Op::Write {
            path,
            offset,
            mtime,
        } => {
            let (d, n) = parent_of(root, path)?;
            let f = openat(d.as_raw_fd(), &n, libc::O_WRONLY | libc::O_NOFOLLOW, 0)?;
            let mut done = 0;
            while done < payload.len() {
                // SAFETY: valid fd and slice.
                let w = unsafe {
                    libc::pwrite(
                        f.as_raw_fd(),
                        payload[done..].as_ptr().cast(),
                        payload.len() - done,
                        (*offset + done as u64) as i64,
                    )
                };
                if w <= 0 {
                    return Err(format!("pwrite: {}", std::io::Error::last_os_error()));
                }
                done += w as usize;
            }
            match mtime {
                TimeSet::At(t) => utimes_at(d.as_raw_fd(), &n, OMIT, tspec(*t)),
                TimeSet::Omit => Ok(()),
            }
        }
        Op::Create {
            path,
            mode,
            uid,
            gid,
            mtime,
            parent_mtime,
        }
        | Op::Mkdir {
            path,
            mode,
            uid,
            gid,
            mtime,
            parent_mtime,
        }
        | Op::Mknod {
            path,
            mode,
            uid,
            gid,
            mtime,
            parent_mtime,
            ..
        } => {
            let (d, n) = parent_of(root, path)?;
            let cn = cs(&n);
            match op {
                Op::Create { .. } => {
                    openat(
                        d.as_raw_fd(),
                        &n,
                        libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_NOFOLLOW,
                        0o600,
                    )?;
                }
                // SAFETY: valid fd and C string.
                Op::Mkdir { .. } => {
                    ok(
                        unsafe { libc::mkdirat(d.as_raw_fd(), cn.as_ptr(), 0o700) },
                        "mkdirat",
                    )?;
                }
                Op::Mknod { rdev, .. } => {
                    // SAFETY: valid fd and C string.
                    ok(
                        unsafe { libc::mknodat(d.as_raw_fd(), cn.as_ptr(), *mode, *rdev) },
                        "mknodat",
                    )?;
                }
                _ => unreachable!(),
            }
            chown_at(d.as_raw_fd(), &n, Some(*uid), Some(*gid))?;
            chmod_at(d.as_raw_fd(), &n, mode & 0o7777)?;
            utimes_at(d.as_raw_fd(), &n, OMIT, tspec(*mtime))?;
            set_dir_mtime(d.as_raw_fd(), *parent_mtime)
        }
        Op::Symlink {
            path,
            target,
            uid,
            gid,
            mtime,
            parent_mtime,
        } => {
            let (d, n) = parent_of(root, path)?;
            let (cn, ct) = (cs(&n), cs(target));
            // SAFETY: valid fd and C strings.
            ok(
                unsafe { libc::symlinkat(ct.as_ptr(), d.as_raw_fd(), cn.as_ptr()) },
                "symlinkat",
            )?;
            chown_at(d.as_raw_fd(), &n, Some(*uid), Some(*gid))?;
            utimes_at(d.as_raw_fd(), &n, OMIT, tspec(*mtime))?;
            set_dir_mtime(d.as_raw_fd(), *parent_mtime)
        }
        Op::Link {
            existing,
            new,
            parent_mtime,
        } => {
            let (d1, n1) = parent_of(root, existing)?;
            let (d2, n2) = parent_of(root, new)?;
            let (c1, c2) = (cs(&n1), cs(&n2));
            // SAFETY: valid fds and C strings.
            ok(
                unsafe {
                    libc::linkat(d1.as_raw_fd(), c1.as_ptr(), d2.as_raw_fd(), c2.as_ptr(), 0)
                },
                "linkat",
            )?;
            set_dir_mtime(d2.as_raw_fd(), *parent_mtime)
        }
        Op::Unlink { path, parent_mtime } | Op::Rmdir { path, parent_mtime } => {
            let (d, n) = parent_of(root, path)?;
            let cn = cs(&n);
            let flags = if matches!(op, Op::Rmdir { .. }) {
                libc::AT_REMOVEDIR
            } else {
                0
            };
            // SAFETY: valid fd and C string.
            ok(
                unsafe { libc::unlinkat(d.as_raw_fd(), cn.as_ptr(), flags) },
                "unlinkat",
            )?;
            set_dir_mtime(d.as_raw_fd(), *parent_mtime)
        }
        Op::Rename {
            from,
            to,
            flags,
            from_parent_mtime,
            to_parent_mtime,
        } => {
            let (d1, n1) = parent_of(root, from)?;
            let (d2, n2) = parent_of(root, to)?;
            let (c1, c2) = (cs(&n1), cs(&n2));
            // SAFETY: valid fds and C strings.
            ok(
                unsafe {
                    libc::renameat2(
                        d1.as_raw_fd(),
                        c1.as_ptr(),
                        d2.as_raw_fd(),
                        c2.as_ptr(),
                        *flags,
                    )
                },
                "renameat2",
            )?;
            set_dir_mtime(d1.as_raw_fd(), *from_parent_mtime)?;
            set_dir_mtime(d2.as_raw_fd(), *to_parent_mtime)
        }
        Op::SetAttr {
            path,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } => {
            let (d, n) = if path.is_root() {
                (openat(root, b".", libc::O_PATH, 0)?, b".".to_vec())
            } else {
                parent_of(root, path)?
            };
            if uid.is_some() || gid.is_some() {
                chown_at(d.as_raw_fd(), &n, *uid, *gid)?;
            }
            if let Some(m) = mode {
                chmod_at(d.as_raw_fd(), &n, *m)?;
            }
            if let Some(s) = size {
                let f = openat(d.as_raw_fd(), &n, libc::O_WRONLY | libc::O_NOFOLLOW, 0)?;
                // SAFETY: valid fd.
                ok(
                    unsafe { libc::ftruncate(f.as_raw_fd(), *s as i64) },
                    "ftruncate",
                )?;
            }
            let t = |x: &TimeSet| match x {
                TimeSet::Omit => OMIT,
                TimeSet::At(t) => tspec(*t),
            };
            if *atime != TimeSet::Omit || *mtime != TimeSet::Omit {
                utimes_at(d.as_raw_fd(), &n, t(atime), t(mtime))?;
            }
            Ok(())
        }
        Op::SetXattr {
            path, name, value, ..
        } => {
            let (d, n) = xattr_parent(root, path)?;
            let (p, cn) = (proc_child(d.as_raw_fd(), &n), cs(name));
            // SAFETY: valid C strings and buffer.
            ok(
                unsafe {
                    libc::lsetxattr(
                        p.as_ptr(),
                        cn.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        0,
                    )
                },
                "lsetxattr",
            )?;
            Ok(())
        }
        Op::RemoveXattr { path, name } => {
            let (d, n) = xattr_parent(root, path)?;
            let (p, cn) = (proc_child(d.as_raw_fd(), &n), cs(name));
            // SAFETY: valid C strings.
            ok(
                unsafe { libc::lremovexattr(p.as_ptr(), cn.as_ptr()) },
                "lremovexattr",
            )?;
            Ok(())
        }
        Op::Fallocate {
            path,
            mode,
            offset,
            len,
            mtime,
        } => {
            let (d, n) = parent_of(root, path)?;
            let f = openat(d.as_raw_fd(), &n, libc::O_WRONLY | libc::O_NOFOLLOW, 0)?;
            // SAFETY: valid fd.
            ok(
                unsafe { libc::fallocate(f.as_raw_fd(), *mode, *offset as i64, *len as i64) },
                "fallocate",
            )?;
            utimes_at(d.as_raw_fd(), &n, OMIT, tspec(*mtime))
        }
        Op::Barrier => Ok(()),
    }
}

fn xattr_parent(root: RawFd, path: &RelPath) -> Result<(OwnedFd, Vec<u8>), String> {
    if path.is_root() {
        Ok((openat(root, b".", libc::O_PATH, 0)?, b".".to_vec()))
    } else {
        parent_of(root, path)
    }
}

/// Everything compared about one entry (not atime/ctime, which cannot be
/// replicated; inode numbers are replaced by link groups).
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Entry {
    pub kind: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub rdev: u64,
    pub target: Vec<u8>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub content: u64,
    pub allocated_blocks: u64,
    /// First path (in sorted order) of the inode, for hard links.
    pub link_group: Option<Vec<u8>>,
}

fn xattrs_of(dir: RawFd, name: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let p = proc_child(dir, name);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for nm in buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let cn = cs(nm);
        let mut v = vec![0u8; 65536];
        // SAFETY: valid C strings and buffer.
        let l = unsafe { libc::lgetxattr(p.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if l >= 0 {
            v.truncate(l as usize);
            out.push((nm.to_vec(), v));
        }
    }
    out.sort();
    out
}

fn hash_file(fd: RawFd) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0i64;
    loop {
        // Skip holes so that huge sparse files are cheap to compare; holes
        // read as zeros, and a zero-run length is hashed with its position.
        // SAFETY: valid fd.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        off = data;
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off) };
        if n <= 0 {
            break;
        }
        let chunk = &buf[..n as usize];
        // Hash (offset, bytes) of non-zero chunks only, so allocation
        // differences (zeros written vs holes) do not count.
        if chunk.iter().any(|&b| b != 0) {
            h.write_i64(off);
            h.write(chunk);
        }
        off += n as i64;
    }
    h.finish()
}

/// Lists the tree under `root`: relative path → entry.
pub fn scan(root: RawFd) -> BTreeMap<Vec<u8>, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut stack: Vec<(OwnedFd, Vec<u8>)> = vec![(
        openat(root, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap(),
        Vec::new(),
    )];
    let mut nlinks: Vec<(Vec<u8>, (u64, u64))> = Vec::new();
    while let Some((dfd, prefix)) = stack.pop() {
        let mut names = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: valid fd and buffer.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    dfd.as_raw_fd(),
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            assert!(n >= 0);
            if n == 0 {
                break;
            }
            let mut pos = 0usize;
            while pos < n as usize {
                let reclen = u16::from_ne_bytes([buf[pos + 16], buf[pos + 17]]) as usize;
                let name = &buf[pos + 19..pos + reclen];
                let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                let name = name[..len].to_vec();
                if name != b"." && name != b".." {
                    names.push(name);
                }
                pos += reclen;
            }
        }
        for name in names {
            let cn = cs(&name);
            let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
            // SAFETY: valid fd, C string, struct.
            assert_eq!(
                unsafe {
                    libc::fstatat(
                        dfd.as_raw_fd(),
                        cn.as_ptr(),
                        st.as_mut_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                },
                0
            );
            // SAFETY: fstatat succeeded.
            let st = unsafe { st.assume_init() };
            let mut path = prefix.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            let kind = st.st_mode & libc::S_IFMT;
            let mut target = Vec::new();
            let mut content = 0;
            if kind == libc::S_IFLNK {
                let mut b = vec![0u8; 8192];
                // SAFETY: valid fd, C string, buffer.
                let l = unsafe {
                    libc::readlinkat(dfd.as_raw_fd(), cn.as_ptr(), b.as_mut_ptr().cast(), b.len())
                };
                b.truncate(l as usize);
                target = b;
            } else if kind == libc::S_IFREG {
                let f =
                    openat(dfd.as_raw_fd(), &name, libc::O_RDONLY | libc::O_NOFOLLOW, 0).unwrap();
                content = hash_file(f.as_raw_fd());
            }
            if kind != libc::S_IFDIR && st.st_nlink > 1 {
                nlinks.push((path.clone(), (st.st_dev, st.st_ino)));
            }
            out.insert(
                path.clone(),
                Entry {
                    kind,
                    mode: st.st_mode & 0o7777,
                    uid: st.st_uid,
                    gid: st.st_gid,
                    size: if kind == libc::S_IFDIR {
                        0
                    } else {
                        st.st_size as u64
                    },
                    mtime: (st.st_mtime, st.st_mtime_nsec),
                    rdev: st.st_rdev,
                    target,
                    xattrs: xattrs_of(dfd.as_raw_fd(), &name),
                    content,
                    allocated_blocks: 0,
                    link_group: None,
                },
            );
            if kind == libc::S_IFDIR {
                let sub = openat(
                    dfd.as_raw_fd(),
                    &name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )
                .unwrap();
                stack.push((sub, path));
            }
        }
    }
    nlinks.sort();
    for (path, id) in nlinks {
        let first = inodes.entry(id).or_insert_with(|| path.clone()).clone();
        if let Some(e) = out.get_mut(&path) {
            e.link_group = Some(first);
        }
    }
    out
}
