//! Thin, fallible wrappers over the system calls the filesystem needs.
//!
//! Every backing access goes through a descriptor: `*at()` calls relative to
//! a directory fd, `AT_EMPTY_PATH` on `O_PATH` fds, or `/proc/self/fd/N` when
//! the kernel offers no fd-based form (reopening an `O_PATH` fd, chmod,
//! xattrs). No function here joins path strings of the backing tree, so
//! backing paths longer than `PATH_MAX` never reach the kernel.

use fuser::Errno;
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub(crate) type R<T> = Result<T, Errno>;

/// The errno of the last failed libc call.
pub(crate) fn last_errno() -> Errno {
    Errno::from(std::io::Error::last_os_error())
}

fn cvt(ret: libc::c_int) -> R<libc::c_int> {
    if ret < 0 {
        Err(last_errno())
    } else {
        Ok(ret)
    }
}

fn cvt_ssize(ret: libc::ssize_t) -> R<usize> {
    if ret < 0 {
        Err(last_errno())
    } else {
        Ok(ret as usize)
    }
}

/// A name from the kernel as a C string. The kernel never sends NUL bytes in
/// names; if one ever shows up the request is invalid.
pub(crate) fn cname(name: &[u8]) -> R<CString> {
    CString::new(name).map_err(|_| Errno::EINVAL)
}

/// `/proc/self/fd/N`: the magic link that reaches the object behind `fd`
/// whatever its path length.
pub(crate) fn proc_fd_path(fd: RawFd) -> CString {
    // A formatted integer never contains NUL.
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// `/proc/self/fd/N/name`: `name` inside the directory `dir` (one component,
/// so the string stays short).
pub(crate) fn proc_fd_child_path(dir: RawFd, name: &[u8]) -> R<CString> {
    let mut p = format!("/proc/self/fd/{dir}/").into_bytes();
    p.extend_from_slice(name);
    CString::new(p).map_err(|_| Errno::EINVAL)
}

pub(crate) fn empty() -> &'static CStr {
    c""
}

/// Owns a raw fd returned by a successful libc call.
fn own(fd: libc::c_int) -> OwnedFd {
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: works on `O_PATH` fds.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> R<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid fd, valid empty C string, `st` is writable.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            empty().as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded and filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> R<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: as above.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// An `O_PATH` handle on `name` in `dir`, not following a final symlink.
pub(crate) fn open_path_at(dir: BorrowedFd<'_>, name: &CStr) -> R<OwnedFd> {
    // SAFETY: valid fd and C string.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    Ok(own(fd))
}

/// `openat(dir, name, flags, mode)`.
pub(crate) fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> R<OwnedFd> {
    // SAFETY: valid fd and C string.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    Ok(own(fd))
}

/// Opens the object behind an `O_PATH` fd for real I/O, through its
/// `/proc/self/fd` magic link.
pub(crate) fn reopen(fd: BorrowedFd<'_>, flags: i32) -> R<OwnedFd> {
    let p = proc_fd_path(fd.as_raw_fd());
    // SAFETY: valid C string.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(own(fd))
}

/// Opens a directory (given as an `O_PATH` fd) for reading its entries.
pub(crate) fn open_dir(fd: BorrowedFd<'_>) -> R<OwnedFd> {
    openat(fd, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> R<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the slice is valid for writes of its length.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match cvt_ssize(n) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e == Errno::EINTR => continue,
            // Report what was read; the error comes back on the next read.
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `buf` at `offset` unless an error stops it. Returns the
/// bytes written and the error that stopped it early, if any: the bytes that
/// made it to the file are part of the file's state and must be reported.
pub(crate) fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> (usize, Option<Errno>) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the slice is valid for reads of its length.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match cvt_ssize(n) {
            Ok(0) => return (done, Some(Errno::EIO)),
            Ok(n) => done += n,
            Err(e) if e == Errno::EINTR => continue,
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

pub(crate) fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> R<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })?;
    Ok(())
}

/// Starts writing back the dirty pages of `len` bytes at `off` to the disk,
/// without waiting for them and without flushing the disk's cache: a later
/// fsync waits for them and makes them durable. Advisory: it never changes
/// what a sync guarantees, and a write-back error is reported by the fsync
/// that follows (this call does not consume it).
pub(crate) fn start_writeback(fd: BorrowedFd<'_>, off: u64, len: u64) -> R<()> {
    let off = libc::off64_t::try_from(off).map_err(|_| Errno::EFBIG)?;
    let len = libc::off64_t::try_from(len).map_err(|_| Errno::EFBIG)?;
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::sync_file_range(fd.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) })?;
    Ok(())
}

pub(crate) fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> R<()> {
    let size = libc::off_t::try_from(size).map_err(|_| Errno::EFBIG)?;
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?;
    Ok(())
}

pub(crate) fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> R<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EFBIG)?;
    let len = libc::off_t::try_from(len).map_err(|_| Errno::EFBIG)?;
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) })?;
    Ok(())
}

pub(crate) fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> R<i64> {
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r)
    }
}

/// `fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`; `None`
/// leaves that id unchanged.
pub(crate) fn fchown(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> R<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            empty().as_ptr(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// chmod of the object behind `fd` (an `O_PATH` fd of a non-symlink).
pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> R<()> {
    let p = proc_fd_path(fd.as_raw_fd());
    // SAFETY: valid C string.
    cvt(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode as libc::mode_t, 0) })?;
    Ok(())
}

/// `utimensat(fd, "", times, AT_EMPTY_PATH)`: works on `O_PATH` fds,
/// including symlinks.
pub(crate) fn futimens(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> R<()> {
    // SAFETY: valid fd, C string and times array.
    let r = unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            empty().as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = last_errno();
    if e != Errno::EINVAL {
        return Err(e);
    }
    // Older kernels lack AT_EMPTY_PATH for utimensat: go through /proc.
    let p = proc_fd_path(fd.as_raw_fd());
    // SAFETY: valid C string and times array.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })?;
    Ok(())
}

pub(crate) fn readlink(fd: BorrowedFd<'_>) -> R<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the buffer is valid for writes of its length.
    let n = cvt_ssize(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            empty().as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> R<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

pub(crate) fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> R<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    })?;
    Ok(())
}

pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> R<()> {
    // SAFETY: valid fd and C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// Makes `name` in `dir` a new name of the object behind the `O_PATH` fd.
pub(crate) fn link_fd_at(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> R<()> {
    // SAFETY: valid fds and C strings. AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH,
    // which the daemon (root) has.
    cvt(unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            empty().as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })?;
    Ok(())
}

pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> R<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

pub(crate) fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: u32,
) -> R<()> {
    // SAFETY: valid fds and C strings.
    cvt(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    })?;
    Ok(())
}

pub(crate) fn fstatvfs(fd: BorrowedFd<'_>) -> R<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: valid fd, writable struct.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded.
    Ok(unsafe { st.assume_init() })
}

/// Where an xattr call goes: a path string (through /proc) and whether the
/// final component must be followed.
pub(crate) struct XattrTarget {
    pub path: CString,
    pub follow: bool,
}

pub(crate) fn getxattr(t: &XattrTarget, name: &CStr, buf: &mut [u8]) -> R<usize> {
    // SAFETY: valid C strings; a zero-length buffer asks for the size only.
    let (ptr, len) = if buf.is_empty() {
        (std::ptr::null_mut(), 0)
    } else {
        (buf.as_mut_ptr().cast(), buf.len())
    };
    cvt_ssize(unsafe {
        if t.follow {
            libc::getxattr(t.path.as_ptr(), name.as_ptr(), ptr, len)
        } else {
            libc::lgetxattr(t.path.as_ptr(), name.as_ptr(), ptr, len)
        }
    })
}

pub(crate) fn listxattr(t: &XattrTarget, buf: &mut [u8]) -> R<usize> {
    let (ptr, len) = if buf.is_empty() {
        (std::ptr::null_mut(), 0)
    } else {
        (buf.as_mut_ptr().cast(), buf.len())
    };
    // SAFETY: valid C string and buffer.
    cvt_ssize(unsafe {
        if t.follow {
            libc::listxattr(t.path.as_ptr(), ptr, len)
        } else {
            libc::llistxattr(t.path.as_ptr(), ptr, len)
        }
    })
}

pub(crate) fn setxattr(t: &XattrTarget, name: &CStr, value: &[u8], flags: i32) -> R<()> {
    // SAFETY: valid C strings and buffer.
    cvt(unsafe {
        if t.follow {
            libc::setxattr(
                t.path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        } else {
            libc::lsetxattr(
                t.path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        }
    })?;
    Ok(())
}

pub(crate) fn removexattr(t: &XattrTarget, name: &CStr) -> R<()> {
    // SAFETY: valid C strings.
    cvt(unsafe {
        if t.follow {
            libc::removexattr(t.path.as_ptr(), name.as_ptr())
        } else {
            libc::lremovexattr(t.path.as_ptr(), name.as_ptr())
        }
    })?;
    Ok(())
}

/// One entry returned by `getdents64`.
pub(crate) struct DirEntry {
    pub ino: u64,
    pub off: i64,
    pub dtype: u8,
    pub name: Vec<u8>,
}

/// Reads the next batch of entries of an open directory fd (empty at the end).
pub(crate) fn getdents(fd: BorrowedFd<'_>, buf: &mut [u8]) -> R<Vec<DirEntry>> {
    // SAFETY: the buffer is valid for writes of its length.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(last_errno());
    }
    let n = n as usize;
    let mut out = Vec::new();
    let mut pos = 0;
    // linux_dirent64: u64 d_ino, i64 d_off, u16 d_reclen, u8 d_type, name.
    while pos + 19 <= n {
        let rec = &buf[pos..n];
        let ino = u64::from_ne_bytes(rec[0..8].try_into().map_err(|_| Errno::EIO)?);
        let off = i64::from_ne_bytes(rec[8..16].try_into().map_err(|_| Errno::EIO)?);
        let reclen = u16::from_ne_bytes(rec[16..18].try_into().map_err(|_| Errno::EIO)?) as usize;
        if reclen < 19 || reclen > rec.len() {
            return Err(Errno::EIO);
        }
        let dtype = rec[18];
        let name_bytes = &rec[19..reclen];
        let name_len = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        out.push(DirEntry {
            ino,
            off,
            dtype,
            name: name_bytes[..name_len].to_vec(),
        });
        pos += reclen;
    }
    Ok(out)
}

/// Gives the calling thread its own umask: `unshare(CLONE_FS)` makes the
/// umask (and cwd) private to this thread instead of process-wide, so the
/// umask of the application a creation is made for can be set per request.
pub(crate) fn unshare_fs() -> R<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::unshare(libc::CLONE_FS) })?;
    Ok(())
}

/// Sets the (thread-private, see `unshare_fs`) umask.
pub(crate) fn set_umask(mask: u32) {
    // SAFETY: plain syscall; cannot fail.
    unsafe { libc::umask((mask & 0o777) as libc::mode_t) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn start_writeback_takes_a_written_range_and_refuses_a_pipe() {
        let dir = std::env::temp_dir().join(format!("hapair-wb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("f");
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(&[7u8; 8192]).expect("write");
        assert_eq!(start_writeback(f.as_fd(), 4096, 4096), Ok(()));
        assert_eq!(start_writeback(f.as_fd(), u64::MAX, 1), Err(Errno::EFBIG));
        // The data is still there and still syncs.
        assert_eq!(fsync(f.as_fd(), false), Ok(()));
        assert_eq!(std::fs::read(&path).expect("read back"), vec![7u8; 8192]);
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two descriptors it is given.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both were just opened and are owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        assert_eq!(start_writeback(w.as_fd(), 0, 1), Err(Errno::ESPIPE));
        drop((r, w));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
