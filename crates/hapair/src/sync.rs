//! Full synchronisation before the mount serves: compare the mount's tree
//! with the mirror's and send what differs, as ordinary operations on the
//! replication stream (so the mirror's applier, with all its confinement
//! checks, is the only thing that writes there).

use crate::client::ReplClient;
use anyhow::{bail, Context};
use hapair_proto::{EntryKind, ManifestEntry, Op, RelPath, TimeSet, MAX_WRITE_PAYLOAD};
use hapair_repl_core::journal::DirtySet;
use hapair_repl_core::plan::{self, SyncAction};
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Opens `path` below `root` for reading, one component at a time, never
/// following a symlink (the path came from our own scan, but the tree may
/// have changed since).
pub fn open_below(root: BorrowedFd<'_>, path: &RelPath) -> anyhow::Result<OwnedFd> {
    let comps = path.components();
    // SAFETY: dup of a valid fd; the result is owned.
    let mut cur = unsafe {
        let fd = libc::fcntl(root.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("dup root fd");
        }
        OwnedFd::from_raw_fd(fd)
    };
    for (i, c) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let name = CString::new(c.clone()).context("NUL in path")?;
        let flags = libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | if last {
                libc::O_RDONLY
            } else {
                libc::O_PATH | libc::O_DIRECTORY
            };
        // SAFETY: valid dir fd and NUL-terminated name.
        let fd = unsafe { libc::openat(cur.as_raw_fd(), name.as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("opening {path}"));
        }
        // SAFETY: fd was just returned by openat.
        cur = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    Ok(cur)
}

fn lseek(fd: &OwnedFd, off: i64, whence: i32) -> Option<i64> {
    // SAFETY: plain syscall on an owned fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    (r >= 0).then_some(r)
}

/// Sends the content of a regular file as writes, skipping holes.
fn copy_content(
    client: &ReplClient,
    root: BorrowedFd<'_>,
    e: &ManifestEntry,
) -> anyhow::Result<()> {
    let fd = open_below(root, &e.path)?;
    let mut buf = vec![0u8; MAX_WRITE_PAYLOAD];
    let size = e.size as i64;
    let mut pos = 0i64;
    while pos < size {
        // Find the next data region; a filesystem without SEEK_DATA support
        // reports everything as data.
        let data = match lseek(&fd, pos, libc::SEEK_DATA) {
            Some(d) => d,
            None => break, // ENXIO: only a hole remains
        };
        let hole = lseek(&fd, data, libc::SEEK_HOLE).unwrap_or(size).min(size);
        let mut off = data;
        while off < hole {
            let want = ((hole - off) as usize).min(buf.len());
            // SAFETY: buf is valid for `want` bytes.
            let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), want, off) };
            if n < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("reading {}", e.path));
            }
            if n == 0 {
                bail!("{} shrank while being copied", e.path);
            }
            client.record_op(
                Op::Write {
                    path: e.path.clone(),
                    offset: off as u64,
                    mtime: TimeSet::At(e.mtime),
                },
                &buf[..n as usize],
            );
            off += n as i64;
        }
        pos = hole;
    }
    Ok(())
}

fn type_bits(kind: EntryKind) -> u32 {
    match kind {
        EntryKind::File => libc::S_IFREG,
        EntryKind::Dir => libc::S_IFDIR,
        EntryKind::Symlink => libc::S_IFLNK,
        EntryKind::Fifo => libc::S_IFIFO,
        EntryKind::Socket => libc::S_IFSOCK,
        EntryKind::CharDev => libc::S_IFCHR,
        EntryKind::BlockDev => libc::S_IFBLK,
    }
}

fn full_attrs(e: &ManifestEntry, with_mtime: bool) -> Op {
    Op::SetAttr {
        path: e.path.clone(),
        // A symlink's mode cannot be changed (and is always 0777).
        mode: (e.kind != EntryKind::Symlink).then_some(e.mode),
        uid: Some(e.uid),
        gid: Some(e.gid),
        size: None,
        atime: TimeSet::Omit,
        mtime: if with_mtime {
            TimeSet::At(e.mtime)
        } else {
            TimeSet::Omit
        },
    }
}

/// Executes a plan: every action becomes one or more operations.
pub fn execute(
    client: &ReplClient,
    root: BorrowedFd<'_>,
    actions: &[SyncAction],
) -> anyhow::Result<()> {
    for a in actions {
        match a {
            SyncAction::Remove { path, kind } => {
                let op = if *kind == EntryKind::Dir {
                    Op::Rmdir {
                        path: path.clone(),
                        parent_mtime: None,
                    }
                } else {
                    Op::Unlink {
                        path: path.clone(),
                        parent_mtime: None,
                    }
                };
                client.record_op(op, &[]);
            }
            SyncAction::MakeDir(e) => {
                client.record_op(
                    Op::Mkdir {
                        path: e.path.clone(),
                        mode: e.mode,
                        uid: e.uid,
                        gid: e.gid,
                        mtime: e.mtime,
                        parent_mtime: None,
                    },
                    &[],
                );
            }
            SyncAction::CopyFile(e) => {
                client.record_op(
                    Op::Create {
                        path: e.path.clone(),
                        mode: e.mode,
                        uid: e.uid,
                        gid: e.gid,
                        mtime: e.mtime,
                        parent_mtime: None,
                    },
                    &[],
                );
                copy_content(client, root, e)?;
                let mut attrs = full_attrs(e, true);
                if let Op::SetAttr { size, .. } = &mut attrs {
                    *size = Some(e.size); // trailing holes
                }
                client.record_op(attrs, &[]);
            }
            SyncAction::Link { existing, new } => {
                client.record_op(
                    Op::Link {
                        existing: existing.clone(),
                        new: new.clone(),
                        parent_mtime: None,
                    },
                    &[],
                );
            }
            SyncAction::MakeSymlink(e) => {
                client.record_op(
                    Op::Symlink {
                        path: e.path.clone(),
                        target: e.target.clone(),
                        uid: e.uid,
                        gid: e.gid,
                        mtime: e.mtime,
                        parent_mtime: None,
                    },
                    &[],
                );
            }
            SyncAction::MakeNode(e) => {
                client.record_op(
                    Op::Mknod {
                        path: e.path.clone(),
                        mode: type_bits(e.kind) | e.mode,
                        rdev: e.rdev,
                        uid: e.uid,
                        gid: e.gid,
                        mtime: e.mtime,
                        parent_mtime: None,
                    },
                    &[],
                );
            }
            SyncAction::SetAttrs(e) => {
                client.record_op(full_attrs(e, e.kind != EntryKind::Dir), &[]);
            }
            SyncAction::SetXattrs { path, set, remove } => {
                for name in remove {
                    client.record_op(
                        Op::RemoveXattr {
                            path: path.clone(),
                            name: name.clone(),
                        },
                        &[],
                    );
                }
                for (name, value) in set {
                    client.record_op(
                        Op::SetXattr {
                            path: path.clone(),
                            name: name.clone(),
                            value: value.clone(),
                            flags: 0,
                        },
                        &[],
                    );
                }
            }
            SyncAction::SetDirTime { path, mtime } => {
                client.record_op(
                    Op::SetAttr {
                        path: path.clone(),
                        mode: None,
                        uid: None,
                        gid: None,
                        size: None,
                        atime: TimeSet::Omit,
                        mtime: TimeSet::At(*mtime),
                    },
                    &[],
                );
            }
        }
        if client.is_degraded() {
            bail!("mirror lost during synchronisation");
        }
    }
    Ok(())
}

/// Plans and executes a full synchronisation; returns the plan's stats.
pub fn synchronise(
    client: &ReplClient,
    root: BorrowedFd<'_>,
    local: &[ManifestEntry],
    remote: &[ManifestEntry],
    dirty: &DirtySet,
) -> anyhow::Result<plan::PlanStats> {
    let actions = plan::plan(local, remote, dirty);
    let stats = plan::stats(&actions);
    execute(client, root, &actions)?;
    Ok(stats)
}
