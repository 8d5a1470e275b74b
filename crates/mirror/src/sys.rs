//! Thin, checked wrappers over the `*at()` system calls the applier and the
//! scanner use. Every failure carries its errno and what was attempted.

use hapair_proto::{RelPath, TimeSet, Timestamp};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A failed system call.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {}", std::io::Error::from_raw_os_error(*errno))]
pub struct SysError {
    pub errno: i32,
    pub what: String,
}

impl SysError {
    pub fn new(errno: i32, what: &str) -> SysError {
        SysError {
            errno,
            what: what.to_string(),
        }
    }
    /// The error of the system call that just failed.
    pub(crate) fn last(what: &str) -> SysError {
        let e = std::io::Error::last_os_error();
        SysError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            what: what.to_string(),
        }
    }
}

pub fn cs(b: &[u8]) -> Result<CString, SysError> {
    CString::new(b).map_err(|_| SysError::new(libc::EINVAL, "NUL byte in a name"))
}

fn check(r: libc::c_int, what: &str) -> Result<libc::c_int, SysError> {
    if r < 0 {
        Err(SysError::last(what))
    } else {
        Ok(r)
    }
}

pub fn openat(dir: RawFd, name: &[u8], flags: i32, mode: u32) -> Result<OwnedFd, SysError> {
    let n = cs(name)?;
    // SAFETY: valid fd and NUL-terminated name.
    let fd = check(
        unsafe { libc::openat(dir, n.as_ptr(), flags | libc::O_CLOEXEC, mode) },
        "openat",
    )?;
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn fstat(fd: RawFd) -> Result<libc::stat, SysError> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid fd and stat buffer.
    check(unsafe { libc::fstat(fd, st.as_mut_ptr()) }, "fstat")?;
    // SAFETY: fstat succeeded and filled the buffer.
    Ok(unsafe { st.assume_init() })
}

/// Opens an `O_PATH` fd again, with real access `flags`, through its
/// /proc magic link: the same inode, so nothing can be swapped in between.
pub fn reopen(fd: RawFd, flags: i32) -> Result<OwnedFd, SysError> {
    let p = cs(format!("/proc/self/fd/{fd}").as_bytes())?;
    // SAFETY: valid C string.
    let r = check(
        unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) },
        "reopen",
    )?;
    // SAFETY: r was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Opens `name` in `dir` for data access, only if it is a regular file.
/// The name is first opened with `O_PATH | O_NOFOLLOW`, which never really
/// opens what it names: a FIFO would block the opener until a peer shows
/// up, and a device node would reach its driver (real hardware) for data
/// that belongs in a file. A symlink is ELOOP, a directory EISDIR, anything
/// else EINVAL.
pub fn open_regular(dir: RawFd, name: &[u8], flags: i32) -> Result<OwnedFd, SysError> {
    let p = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    match fstat(p.as_raw_fd())?.st_mode & libc::S_IFMT {
        libc::S_IFREG => reopen(p.as_raw_fd(), flags & !libc::O_NOFOLLOW),
        libc::S_IFLNK => Err(SysError::new(libc::ELOOP, "data access to a symlink")),
        libc::S_IFDIR => Err(SysError::new(libc::EISDIR, "data access to a directory")),
        _ => Err(SysError::new(
            libc::EINVAL,
            "data access to a FIFO, socket or device node",
        )),
    }
}

/// Opens the parent directory of `p` by walking from `root` without
/// following any symlink; returns it and the last component.
pub fn parent_of(root: RawFd, p: &RelPath) -> Result<(OwnedFd, Vec<u8>), SysError> {
    let comps = p.components();
    let (last, dirs) = comps
        .split_last()
        .ok_or_else(|| SysError::new(libc::EINVAL, "the root has no parent"))?;
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

/// Like `parent_of`, but the root itself is (root, ".").
pub fn parent_or_self(root: RawFd, p: &RelPath) -> Result<(OwnedFd, Vec<u8>), SysError> {
    if p.is_root() {
        Ok((
            openat(root, b".", libc::O_PATH | libc::O_DIRECTORY, 0)?,
            b".".to_vec(),
        ))
    } else {
        parent_of(root, p)
    }
}

/// Writes back the dirty pages of `fd` in `off..off + len` and waits for
/// them (sync_file_range: data only, no metadata, no cache flush).
pub fn write_back_range(fd: RawFd, off: u64, len: u64) -> Result<(), SysError> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscall on a descriptor.
    if unsafe { libc::sync_file_range(fd, off as i64, len as i64, flags) } < 0 {
        return Err(SysError::last("sync_file_range"));
    }
    Ok(())
}

/// A new descriptor (close-on-exec) of what `fd` is open on.
pub fn dup(fd: RawFd) -> Result<OwnedFd, SysError> {
    // SAFETY: plain fcntl on a descriptor; the result is owned by nobody
    // else.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if r < 0 {
        return Err(SysError::last("dup"));
    }
    // SAFETY: r is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Opens `p` itself below `root` with `flags` (walking without symlinks).
pub fn open_below(root: RawFd, p: &RelPath, flags: i32) -> Result<OwnedFd, SysError> {
    let (d, n) = parent_or_self(root, p)?;
    openat(d.as_raw_fd(), &n, flags, 0)
}

pub fn tspec(t: TimeSet) -> libc::timespec {
    match t {
        TimeSet::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        TimeSet::At(Timestamp { sec, nsec }) => libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec as i64,
        },
    }
}

pub fn utimes_at(dir: RawFd, name: &[u8], atime: TimeSet, mtime: TimeSet) -> Result<(), SysError> {
    let n = cs(name)?;
    let times = [tspec(atime), tspec(mtime)];
    // SAFETY: valid fd, C string and two timespecs.
    check(
        unsafe { libc::utimensat(dir, n.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) },
        "utimensat",
    )?;
    Ok(())
}

pub fn futimes(fd: RawFd, atime: TimeSet, mtime: TimeSet) -> Result<(), SysError> {
    let times = [tspec(atime), tspec(mtime)];
    // SAFETY: valid fd and two timespecs.
    check(unsafe { libc::futimens(fd, times.as_ptr()) }, "futimens")?;
    Ok(())
}

pub fn set_dir_mtime(dir: RawFd, t: Option<Timestamp>) -> Result<(), SysError> {
    if let Some(t) = t {
        let times = [tspec(TimeSet::Omit), tspec(TimeSet::At(t))];
        // SAFETY: valid fd, empty C string with AT_EMPTY_PATH, two timespecs.
        check(
            unsafe { libc::utimensat(dir, c"".as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH) },
            "utimensat parent",
        )?;
    }
    Ok(())
}

pub fn chown_at(
    dir: RawFd,
    name: &[u8],
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), SysError> {
    let n = cs(name)?;
    // SAFETY: valid fd and C string; u32::MAX (-1) leaves an id unchanged.
    check(
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

pub fn fchown(fd: RawFd, uid: Option<u32>, gid: Option<u32>) -> Result<(), SysError> {
    // SAFETY: valid fd.
    check(
        unsafe { libc::fchown(fd, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)) },
        "fchown",
    )?;
    Ok(())
}

pub fn fchmod(fd: RawFd, mode: u32) -> Result<(), SysError> {
    // SAFETY: valid fd.
    check(unsafe { libc::fchmod(fd, mode) }, "fchmod")?;
    Ok(())
}

/// chmod of a name that is known not to be a symlink: through an
/// `O_PATH | O_NOFOLLOW` fd and its /proc magic link, so a symlink swapped
/// in would be refused rather than followed.
pub fn chmod_at_nofollow(dir: RawFd, name: &[u8], mode: u32) -> Result<(), SysError> {
    if kind_at(dir, name)? == libc::S_IFLNK {
        return Err(SysError::new(libc::ELOOP, "chmod of a symlink"));
    }
    let f = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    let p = cs(format!("/proc/self/fd/{}", f.as_raw_fd()).as_bytes())?;
    // SAFETY: valid C string.
    check(unsafe { libc::chmod(p.as_ptr(), mode) }, "chmod")?;
    Ok(())
}

pub fn lstat_at(dir: RawFd, name: &[u8]) -> Result<libc::stat, SysError> {
    let n = cs(name)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid fd, C string and stat buffer.
    check(
        unsafe { libc::fstatat(dir, n.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) },
        "fstatat",
    )?;
    // SAFETY: fstatat succeeded and filled the buffer.
    Ok(unsafe { st.assume_init() })
}

pub fn kind_at(dir: RawFd, name: &[u8]) -> Result<u32, SysError> {
    Ok(lstat_at(dir, name)?.st_mode & libc::S_IFMT)
}

pub fn mkdirat(dir: RawFd, name: &[u8], mode: u32) -> Result<(), SysError> {
    let n = cs(name)?;
    // SAFETY: valid fd and C string.
    check(unsafe { libc::mkdirat(dir, n.as_ptr(), mode) }, "mkdirat")?;
    Ok(())
}

pub fn mknodat(dir: RawFd, name: &[u8], mode: u32, rdev: u64) -> Result<(), SysError> {
    let n = cs(name)?;
    // SAFETY: valid fd and C string.
    check(
        unsafe { libc::mknodat(dir, n.as_ptr(), mode, rdev) },
        "mknodat",
    )?;
    Ok(())
}

pub fn symlinkat(target: &[u8], dir: RawFd, name: &[u8]) -> Result<(), SysError> {
    let (t, n) = (cs(target)?, cs(name)?);
    // SAFETY: valid fd and C strings.
    check(
        unsafe { libc::symlinkat(t.as_ptr(), dir, n.as_ptr()) },
        "symlinkat",
    )?;
    Ok(())
}

pub fn linkat(d1: RawFd, n1: &[u8], d2: RawFd, n2: &[u8]) -> Result<(), SysError> {
    let (a, b) = (cs(n1)?, cs(n2)?);
    // SAFETY: valid fds and C strings; flags 0 never follows a symlink.
    check(
        unsafe { libc::linkat(d1, a.as_ptr(), d2, b.as_ptr(), 0) },
        "linkat",
    )?;
    Ok(())
}

pub fn unlinkat(dir: RawFd, name: &[u8], is_dir: bool) -> Result<(), SysError> {
    let n = cs(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid fd and C string.
    check(
        unsafe { libc::unlinkat(dir, n.as_ptr(), flags) },
        "unlinkat",
    )?;
    Ok(())
}

pub fn renameat2(d1: RawFd, n1: &[u8], d2: RawFd, n2: &[u8], flags: u32) -> Result<(), SysError> {
    let (a, b) = (cs(n1)?, cs(n2)?);
    // SAFETY: valid fds and C strings.
    check(
        unsafe { libc::renameat2(d1, a.as_ptr(), d2, b.as_ptr(), flags) },
        "renameat2",
    )?;
    Ok(())
}

pub fn pwrite_all(fd: RawFd, mut data: &[u8], mut off: u64) -> Result<(), SysError> {
    while !data.is_empty() {
        // SAFETY: valid fd and slice.
        let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), off as i64) };
        if n < 0 {
            return Err(SysError::last("pwrite"));
        }
        if n == 0 {
            return Err(SysError::new(libc::EIO, "pwrite wrote nothing"));
        }
        data = &data[n as usize..];
        off += n as u64;
    }
    Ok(())
}

/// Sets or clears O_DIRECT on an open file.
pub fn set_direct(fd: RawFd, on: bool) -> Result<(), SysError> {
    // SAFETY: plain fcntl calls on a valid fd.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) }, "fcntl F_GETFL")?;
    let new = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    if new != flags {
        // SAFETY: as above.
        check(
            unsafe { libc::fcntl(fd, libc::F_SETFL, new) },
            "fcntl F_SETFL",
        )?;
    }
    Ok(())
}

pub fn ftruncate(fd: RawFd, size: u64) -> Result<(), SysError> {
    // SAFETY: valid fd.
    check(unsafe { libc::ftruncate(fd, size as i64) }, "ftruncate")?;
    Ok(())
}

pub fn fallocate(fd: RawFd, mode: i32, off: u64, len: u64) -> Result<(), SysError> {
    // SAFETY: valid fd.
    check(
        unsafe { libc::fallocate(fd, mode, off as i64, len as i64) },
        "fallocate",
    )?;
    Ok(())
}

pub fn fsync(fd: RawFd) -> Result<(), SysError> {
    // SAFETY: valid fd.
    check(unsafe { libc::fsync(fd) }, "fsync")?;
    Ok(())
}

pub fn fdatasync(fd: RawFd) -> Result<(), SysError> {
    // SAFETY: valid fd.
    check(unsafe { libc::fdatasync(fd) }, "fdatasync")?;
    Ok(())
}

pub fn syncfs(fd: RawFd) -> Result<(), SysError> {
    // SAFETY: valid fd.
    check(unsafe { libc::syncfs(fd) }, "syncfs")?;
    Ok(())
}

fn proc_child(dir: RawFd, name: &[u8]) -> Result<CString, SysError> {
    let mut p = format!("/proc/self/fd/{dir}/").into_bytes();
    p.extend_from_slice(name);
    cs(&p)
}

pub fn lsetxattr(dir: RawFd, name: &[u8], key: &[u8], value: &[u8]) -> Result<(), SysError> {
    let (p, k) = (proc_child(dir, name)?, cs(key)?);
    // SAFETY: valid C strings and buffer.
    check(
        unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                k.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        },
        "lsetxattr",
    )?;
    Ok(())
}

pub fn lremovexattr(dir: RawFd, name: &[u8], key: &[u8]) -> Result<(), SysError> {
    let (p, k) = (proc_child(dir, name)?, cs(key)?);
    // SAFETY: valid C strings.
    check(
        unsafe { libc::lremovexattr(p.as_ptr(), k.as_ptr()) },
        "lremovexattr",
    )?;
    Ok(())
}

/// Extended attributes as (name, value) pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// All extended attributes of an entry, sorted by name.
pub fn list_xattrs(dir: RawFd, name: &[u8]) -> Result<Xattrs, SysError> {
    let p = proc_child(dir, name)?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = SysError::last("llistxattr");
        // Filesystems or entry types without xattr support have none.
        return if matches!(e.errno, libc::ENOTSUP) {
            Ok(Vec::new())
        } else {
            Err(e)
        };
    }
    let mut out = Vec::new();
    for key in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|k| !k.is_empty())
    {
        let k = cs(key)?;
        let mut v = vec![0u8; 64 * 1024];
        // SAFETY: valid C strings and buffer.
        let l = unsafe { libc::lgetxattr(p.as_ptr(), k.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if l < 0 {
            let e = SysError::last("lgetxattr");
            if e.errno == libc::ENODATA {
                continue; // removed between list and get
            }
            return Err(e);
        }
        v.truncate(l as usize);
        out.push((key.to_vec(), v));
    }
    out.sort();
    Ok(out)
}

pub fn readlinkat(dir: RawFd, name: &[u8]) -> Result<Vec<u8>, SysError> {
    let n = cs(name)?;
    let mut b = vec![0u8; 4096];
    // SAFETY: valid fd, C string and buffer.
    let l = unsafe { libc::readlinkat(dir, n.as_ptr(), b.as_mut_ptr().cast(), b.len()) };
    if l < 0 {
        return Err(SysError::last("readlinkat"));
    }
    b.truncate(l as usize);
    Ok(b)
}

/// Names in a directory (without `.` and `..`), via getdents64 on `dir`.
pub fn read_dir_names(dir: RawFd) -> Result<Vec<Vec<u8>>, SysError> {
    let mut names = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(SysError::last("getdents64"));
        }
        if n == 0 {
            return Ok(names);
        }
        let mut pos = 0usize;
        while pos + 19 <= n as usize {
            let reclen = u16::from_ne_bytes([buf[pos + 16], buf[pos + 17]]) as usize;
            if reclen < 19 || pos + reclen > n as usize {
                return Err(SysError::new(libc::EIO, "malformed directory entry"));
            }
            let raw = &buf[pos + 19..pos + reclen];
            let len = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            let name = &raw[..len];
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
            pos += reclen;
        }
    }
}

/// Block size of the content hash grid.
const HASH_BLOCK: u64 = 64 * 1024;

/// xxh3 of a file's content that does not depend on allocation: the file
/// is read in 64 KiB blocks on a fixed grid, blocks that are holes or all
/// zeros are skipped, and every other block is hashed with its index.
pub fn hash_content(fd: RawFd, size: u64) -> Result<u64, SysError> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&size.to_le_bytes());
    let mut buf = vec![0u8; HASH_BLOCK as usize];
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: valid fd.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // only a hole remains
        }
        let mut block = (data as u64 / HASH_BLOCK) * HASH_BLOCK;
        // SAFETY: valid fd.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        while block < end {
            let want = HASH_BLOCK.min(size - block) as usize;
            let mut got = 0usize;
            while got < want {
                // SAFETY: valid fd and buffer.
                let n = unsafe {
                    libc::pread(
                        fd,
                        buf[got..want].as_mut_ptr().cast(),
                        want - got,
                        (block + got as u64) as i64,
                    )
                };
                if n < 0 {
                    return Err(SysError::last("pread"));
                }
                if n == 0 {
                    break;
                }
                got += n as usize;
            }
            let chunk = &buf[..got];
            if chunk.iter().any(|b| *b != 0) {
                h.update(&(block / HASH_BLOCK).to_le_bytes());
                h.update(chunk);
            }
            block += HASH_BLOCK;
        }
        pos = block.max(end);
    }
    Ok(h.digest())
}
