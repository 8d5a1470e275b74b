//! The secondary's side of replication: the [`Applier`], which applies
//! operations into the mirror directory, and [`scan_tree`], which lists a
//! tree for synchronisation (used by both sides).
//!
//! Confinement (SPEC guarantee 5): the applier never builds a string path.
//! It walks a [`RelPath`] component by component from its root fd, opening
//! every directory with `O_NOFOLLOW | O_DIRECTORY`, so a symlink anywhere on
//! the way is refused (ELOOP/ENOTDIR). On the final component, data is only
//! ever read or written after an `O_PATH | O_NOFOLLOW` open showed a regular
//! file (a symlink, FIFO or device node is refused without being opened:
//! a FIFO would block the applier, a device would reach hardware),
//! ownership and times are set with `AT_SYMLINK_NOFOLLOW`, and a mode change
//! on a symlink is refused. `..`, `/`, NUL and empty names cannot be
//! expressed in a `RelPath` at all (see the tests, which hand-craft them).

mod local_log;
mod syncpool;
mod sys;
mod wal;

use hapair_proto::buf::{self, BufPool};
use hapair_proto::{EntryKind, ManifestEntry, Op, RelPath, TimeSet, MAX_MANIFEST_ENTRIES};
pub use local_log::LocalLog;
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
pub use sys::SysError;
pub use wal::{log_path_for, LOG_SIZE, MAX_RECORD_DATA, MIN_LOG_SIZE};

/// Beyond this many dirty files or directories, a barrier uses syncfs(2)
/// instead of one fsync per entry (bounded memory, bounded work).
const MAX_DIRTY_ENTRIES: usize = 4096;

/// Most files or directories a barrier has open at once for syncing.
const SYNC_CHUNK: usize = 64;

/// One-file group commits in a row after which the log is turned off.
const CALM_GROUPS: u32 = 256;

/// Regular files kept open between operations (see [`FdCache`]).
const FD_CACHE_ENTRIES: usize = 64;

/// Recently written regular files, open for writing, by path: a run of
/// writes to one file, and the barrier's fsync of it, then cost no path
/// walk, open or close per operation. Only the applier changes the mirror
/// tree, so a cached descriptor names what its path names until an
/// operation of this applier moves or removes that path: unlink, rmdir and
/// rename drop every entry at or below the paths they touch. (A create or
/// link over a cached path would find the name taken; a create of an
/// existing regular file truncates the same inode.) Entries were opened by
/// the confined walk, so the cache keeps the confinement guarantee.
struct FdCache {
    files: std::collections::HashMap<RelPath, CachedFile>,
    tick: u64,
}

struct CachedFile {
    fd: OwnedFd,
    /// O_DIRECT is set on `fd` now.
    direct: bool,
    used: u64,
}

impl FdCache {
    fn new() -> Self {
        FdCache {
            files: std::collections::HashMap::new(),
            tick: 0,
        }
    }

    fn get(&mut self, p: &RelPath) -> Option<RawFd> {
        self.entry(p).map(|f| f.fd.as_raw_fd())
    }

    fn entry(&mut self, p: &RelPath) -> Option<&mut CachedFile> {
        self.tick += 1;
        let tick = self.tick;
        let f = self.files.get_mut(p)?;
        f.used = tick;
        Some(f)
    }

    fn insert(&mut self, p: RelPath, fd: OwnedFd) -> RawFd {
        if self.files.len() >= FD_CACHE_ENTRIES && !self.files.contains_key(&p) {
            // Evict the least recently used; a linear scan of a few dozen.
            if let Some(old) = self
                .files
                .iter()
                .min_by_key(|(_, f)| f.used)
                .map(|(k, _)| k.clone())
            {
                self.files.remove(&old);
            }
        }
        self.tick += 1;
        let raw = fd.as_raw_fd();
        self.files.insert(
            p,
            CachedFile {
                fd,
                direct: false,
                used: self.tick,
            },
        );
        raw
    }

    fn contains(&self, p: &RelPath) -> bool {
        self.files.contains_key(p)
    }

    /// Forgets `p` and everything below it.
    fn forget_below(&mut self, p: &RelPath) {
        if !self.files.is_empty() {
            self.files.retain(|k, _| !k.starts_with(p));
        }
    }
}

/// An operation could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct ApplyError {
    pub op: &'static str,
    pub path: String,
    #[source]
    pub source: SysError,
}

impl ApplyError {
    /// The errno of the failed system call (EIO when there was none).
    pub fn errno(&self) -> i32 {
        self.source.errno
    }
}

/// Opens a directory (must exist and be one).
fn mirror_root(root: &Path) -> anyhow::Result<OwnedFd> {
    let f = std::fs::File::open(root)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", root.display()))?;
    let m = f
        .metadata()
        .map_err(|e| anyhow::anyhow!("stat {}: {e}", root.display()))?;
    if !m.is_dir() {
        anyhow::bail!("{} is not a directory", root.display());
    }
    Ok(f.into())
}

/// Applies operations into one mirror directory.
pub struct Applier {
    root: OwnedFd,
    /// Files written since the last barrier.
    dirty_files: BTreeSet<RelPath>,
    /// Directories whose entries changed since the last barrier.
    dirty_dirs: BTreeSet<RelPath>,
    /// Set when the dirty sets overflowed: the barrier syncs the filesystem.
    overflow: bool,
    files: FdCache,
    /// Aligned copies for direct writes of unaligned payloads.
    bounce: BufPool,
    /// Cleared when the mirror's filesystem refused a direct write: then
    /// every write goes through the page cache.
    direct_ok: bool,
    /// Barriers over several files sync them in parallel.
    syncs: syncpool::SyncPool,
    /// The write-ahead log, if this applier keeps one (see `wal`).
    wal: Option<wal::Wal>,
    /// Files with records in the log's current epoch: a checkpoint syncs
    /// them.
    logged: BTreeSet<RelPath>,
    /// Nothing but small page-cache writes since the last barrier: the next
    /// barrier may commit them to the log.
    group_loggable: bool,
    /// Group commits go to the log (see `barrier`).
    log_on: bool,
    /// Group commits in a row, while `log_on`, that covered one file.
    calm: u32,
    /// A group commit over at least this many files turns the log on (2;
    /// tests set 1).
    log_min_files: usize,
}

impl Applier {
    /// Opens the mirror root (must exist and be a directory).
    pub fn open(root: &Path) -> anyhow::Result<Applier> {
        Ok(Applier {
            root: mirror_root(root)?,
            dirty_files: BTreeSet::new(),
            dirty_dirs: BTreeSet::new(),
            overflow: false,
            files: FdCache::new(),
            bounce: BufPool::default(),
            direct_ok: true,
            syncs: syncpool::SyncPool::default(),
            wal: None,
            logged: BTreeSet::new(),
            group_loggable: true,
            log_on: false,
            calm: 0,
            log_min_files: 2,
        })
    }

    /// Opens the mirror root with a write-ahead log at `log` (made if
    /// missing): what a previous applier logged and may not have written to
    /// the files is replayed first, and made durable in them.
    pub fn open_with_log(root: &Path, log: &Path) -> anyhow::Result<Applier> {
        Applier::open_with_log_sized(root, log, LOG_SIZE)
    }

    /// As `open_with_log`, making a missing log `size` bytes long (a
    /// multiple of 4096, at least `MIN_LOG_SIZE`).
    pub fn open_with_log_sized(root: &Path, log: &Path, size: u64) -> anyhow::Result<Applier> {
        let mut a = Applier::open(root)?;
        a.attach_log(log, Some(size))?;
        Ok(a)
    }

    /// Opens the log at `log` (None if it does not exist and was not to be
    /// made), replays it and keeps it. Returns how many records it
    /// replayed.
    fn attach_log(&mut self, log: &Path, create: Option<u64>) -> anyhow::Result<Option<u64>> {
        let Some(mut wal) = wal::Wal::open(log, self.root(), create)? else {
            return Ok(None);
        };
        let mut replayed = BTreeSet::new();
        let mut gone = 0u64;
        let n = wal.replay(&mut |r| {
            if self.replay_record(&r)? {
                if replayed.len() < MAX_DIRTY_ENTRIES {
                    replayed.insert(r.path);
                } else {
                    self.overflow = true;
                }
            } else {
                gone += 1;
            }
            Ok(())
        })?;
        if gone > 0 {
            tracing::warn!(
                log = %log.display(),
                records = gone,
                "records of the mirror log name files that no longer exist; skipped"
            );
        }
        if n > 0 {
            let list: Vec<RelPath> = replayed.into_iter().collect();
            let overflow = std::mem::take(&mut self.overflow);
            let whole_fs = self.sync_list(&list)? || overflow;
            if whole_fs {
                sys::syncfs(self.root())?;
            }
            wal.new_epoch()
                .map_err(|e| anyhow::anyhow!("{}: {e}", log.display()))?;
            tracing::info!(log = %log.display(), records = n, "replayed the write-ahead log");
        }
        self.wal = Some(wal);
        Ok(Some(n))
    }

    /// Writes one logged record into its file again. False if the file is
    /// no longer there.
    fn replay_record(&mut self, r: &wal::Record<'_>) -> Result<bool, SysError> {
        let fd = match self.file_fd(&r.path) {
            Ok(fd) => fd,
            Err(e) if matches!(e.errno, libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        sys::pwrite_all(fd, r.data, r.offset)?;
        if let TimeSet::At(t) = r.mtime {
            sys::futimes(fd, TimeSet::Omit, TimeSet::At(t))?;
        }
        Ok(true)
    }

    /// Decides whether `op` goes into the log's group. Anything but a small
    /// page-cache write or an mtime change of a written file (see
    /// `mtime_only`) that fits first ends the log's epoch (checkpoint):
    /// replaying a logged write after, say, a truncate or a rename that
    /// reached the disk would build a file the primary never had.
    fn prepare_for(&mut self, op: &Op, payload: &[u8]) -> Result<bool, SysError> {
        let mtime_of_written = mtime_only(op).is_some_and(|p| self.files.contains(p));
        let Some(wal) = &self.wal else {
            return Ok(false);
        };
        match op {
            Op::Barrier => return Ok(false),
            Op::SetAttr { path, .. }
                if mtime_of_written
                    && self.group_loggable
                    && self.logged.len() < MAX_DIRTY_ENTRIES
                    && wal.fits(path, 0) =>
            {
                return Ok(true);
            }
            Op::Write { path, offset, .. } => {
                let page_cache = !(self.direct_ok && buf::direct_eligible(payload.len(), *offset));
                if self.group_loggable
                    && page_cache
                    && self.logged.len() < MAX_DIRTY_ENTRIES
                    && wal.fits(path, payload.len())
                {
                    return Ok(true);
                }
            }
            _ => {}
        }
        self.checkpoint()?;
        self.group_loggable = false;
        if let Some(w) = &mut self.wal {
            w.discard_group();
        }
        Ok(false)
    }

    /// Makes the files the log's epoch covers durable, then starts a new
    /// epoch.
    fn checkpoint(&mut self) -> Result<(), SysError> {
        if !self.wal.as_ref().is_some_and(|w| w.holds_records()) {
            return Ok(());
        }
        let list: Vec<RelPath> = self.logged.iter().cloned().collect();
        if self.sync_list(&list)? {
            sys::syncfs(self.root())?;
        }
        if let Some(w) = &mut self.wal {
            w.new_epoch()?;
        }
        self.logged.clear();
        Ok(())
    }

    fn mark_file(&mut self, p: &RelPath) {
        if self.dirty_files.len() >= MAX_DIRTY_ENTRIES {
            self.overflow = true;
        } else {
            self.dirty_files.insert(p.clone());
        }
    }

    fn mark_parent(&mut self, p: &RelPath) {
        let parent = p.split_last().map(|(d, _)| d).unwrap_or_default();
        if self.dirty_dirs.len() >= MAX_DIRTY_ENTRIES {
            self.overflow = true;
        } else {
            self.dirty_dirs.insert(parent);
        }
    }

    /// Applies one operation. `payload` is the data of a write.
    pub fn apply(&mut self, op: &Op, payload: &[u8]) -> Result<(), ApplyError> {
        let path_str = op
            .paths()
            .first()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let err = |source: SysError| ApplyError {
            op: op.name(),
            path: path_str.clone(),
            source,
        };
        self.apply_inner(op, payload).map_err(err)
    }

    /// Makes everything applied so far durable.
    pub fn make_durable(&mut self) -> Result<(), ApplyError> {
        self.apply(&Op::Barrier, &[])
    }

    fn root(&self) -> RawFd {
        self.root.as_raw_fd()
    }

    /// Writes `data` at `off` into the regular file at `path`: directly to
    /// the disk (O_DIRECT) when it is large and block-aligned (see
    /// `buf::direct_eligible`), else through the page cache. Returns the
    /// descriptor used. The mirror never reads large writes back, and on
    /// this machine kind filling fresh page-cache pages costs about 2 CPU
    /// seconds per GiB, a direct write about 0.15 (measured with dd). The
    /// barrier's fsync still makes them durable (device cache flush,
    /// metadata).
    fn write_at(&mut self, path: &RelPath, data: &[u8], off: u64) -> Result<RawFd, SysError> {
        let fd = self.file_fd(path)?;
        let direct = self.direct_ok && buf::direct_eligible(data.len(), off);
        let Some(entry) = self.files.entry(path) else {
            return Err(SysError::new(libc::EIO, "file vanished from the cache"));
        };
        if entry.direct != direct && sys::set_direct(fd, direct).is_ok() {
            entry.direct = direct;
        }
        if direct && entry.direct {
            // A payload read by `FrameReader` is aligned already.
            let copy;
            let from = if buf::is_aligned(data) {
                data
            } else {
                copy = self.bounce.copy_of(data);
                &copy[..]
            };
            match sys::pwrite_all(fd, from, off) {
                Ok(()) => return Ok(fd),
                Err(e) if e.errno == libc::EINVAL => {
                    // The filesystem does not take direct writes after all:
                    // write this one (again, whole) through the page cache.
                    self.direct_ok = false;
                    if sys::set_direct(fd, false).is_ok() {
                        entry.direct = false;
                    }
                }
                Err(e) => return Err(e),
            }
        } else if entry.direct {
            // Could not switch back: the page cache path needs it off.
            return Err(SysError::new(libc::EIO, "cannot clear O_DIRECT"));
        }
        sys::pwrite_all(fd, data, off)?;
        Ok(fd)
    }

    /// A descriptor open for writing on the regular file at `path` (from the
    /// cache, or opened by the confined walk and cached). Valid until the
    /// next call that may change the cache.
    fn file_fd(&mut self, path: &RelPath) -> Result<RawFd, SysError> {
        if let Some(fd) = self.files.get(path) {
            return Ok(fd);
        }
        let (d, n) = sys::parent_of(self.root(), path)?;
        // Never a FIFO, socket or device node (see `sys::open_regular`).
        let f = sys::open_regular(d.as_raw_fd(), &n, libc::O_WRONLY)?;
        Ok(self.files.insert(path.clone(), f))
    }

    fn apply_inner(&mut self, op: &Op, payload: &[u8]) -> Result<(), SysError> {
        let root = self.root();
        let log_it = self.prepare_for(op, payload)?;
        match op {
            Op::Write {
                path,
                offset,
                mtime,
            } => {
                let f = self.write_at(path, payload, *offset)?;
                if let TimeSet::At(t) = mtime {
                    sys::futimes(f, TimeSet::Omit, TimeSet::At(*t))?;
                }
                self.mark_file(path);
                if log_it {
                    if let Some(w) = &mut self.wal {
                        w.push(path, *offset, *mtime, payload);
                    }
                }
            }
            Op::Create {
                path,
                mode,
                uid,
                gid,
                mtime,
                parent_mtime,
            } => {
                let (d, n) = sys::parent_of(root, path)?;
                // O_EXCL never follows a symlink and never opens what is
                // there; an existing name is truncated only if it is a
                // regular file.
                let f = match sys::openat(
                    d.as_raw_fd(),
                    &n,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                    0o600,
                ) {
                    Ok(f) => f,
                    Err(e) if e.errno == libc::EEXIST => {
                        let f = sys::open_regular(d.as_raw_fd(), &n, libc::O_WRONLY)?;
                        sys::ftruncate(f.as_raw_fd(), 0)?;
                        f
                    }
                    Err(e) => return Err(e),
                };
                sys::fchown(f.as_raw_fd(), Some(*uid), Some(*gid))?;
                sys::fchmod(f.as_raw_fd(), mode & 0o7777)?;
                sys::futimes(f.as_raw_fd(), TimeSet::Omit, TimeSet::At(*mtime))?;
                sys::set_dir_mtime(d.as_raw_fd(), *parent_mtime)?;
                // A new file is usually written next.
                self.files.insert(path.clone(), f);
                self.mark_file(path);
                self.mark_parent(path);
            }
            Op::Mkdir {
                path,
                mode,
                uid,
                gid,
                mtime,
                parent_mtime,
            } => {
                let (d, n) = sys::parent_of(root, path)?;
                match sys::mkdirat(d.as_raw_fd(), &n, 0o700) {
                    Ok(()) => {}
                    Err(e)
                        if e.errno == libc::EEXIST
                            && sys::kind_at(d.as_raw_fd(), &n)? == libc::S_IFDIR => {}
                    Err(e) => return Err(e),
                }
                let dir = sys::openat(
                    d.as_raw_fd(),
                    &n,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
                sys::fchown(dir.as_raw_fd(), Some(*uid), Some(*gid))?;
                sys::fchmod(dir.as_raw_fd(), mode & 0o7777)?;
                sys::futimes(dir.as_raw_fd(), TimeSet::Omit, TimeSet::At(*mtime))?;
                sys::set_dir_mtime(d.as_raw_fd(), *parent_mtime)?;
                self.mark_parent(path);
            }
            Op::Mknod {
                path,
                mode,
                rdev,
                uid,
                gid,
                mtime,
                parent_mtime,
            } => {
                let (d, n) = sys::parent_of(root, path)?;
                let kind = mode & libc::S_IFMT;
                let allowed = [
                    libc::S_IFIFO,
                    libc::S_IFSOCK,
                    libc::S_IFCHR,
                    libc::S_IFBLK,
                    libc::S_IFREG,
                ];
                if !allowed.contains(&kind) {
                    return Err(SysError::new(
                        libc::EINVAL,
                        "mknod of a type that is not a special file",
                    ));
                }
                sys::mknodat(d.as_raw_fd(), &n, (mode & 0o777) | kind, *rdev)?;
                sys::chown_at(d.as_raw_fd(), &n, Some(*uid), Some(*gid))?;
                sys::chmod_at_nofollow(d.as_raw_fd(), &n, mode & 0o7777)?;
                sys::utimes_at(d.as_raw_fd(), &n, TimeSet::Omit, TimeSet::At(*mtime))?;
                sys::set_dir_mtime(d.as_raw_fd(), *parent_mtime)?;
                self.mark_parent(path);
            }
            Op::Symlink {
                path,
                target,
                uid,
                gid,
                mtime,
                parent_mtime,
            } => {
                let (d, n) = sys::parent_of(root, path)?;
                sys::symlinkat(target, d.as_raw_fd(), &n)?;
                sys::chown_at(d.as_raw_fd(), &n, Some(*uid), Some(*gid))?;
                sys::utimes_at(d.as_raw_fd(), &n, TimeSet::Omit, TimeSet::At(*mtime))?;
                sys::set_dir_mtime(d.as_raw_fd(), *parent_mtime)?;
                self.mark_parent(path);
            }
            Op::Link {
                existing,
                new,
                parent_mtime,
            } => {
                let (d1, n1) = sys::parent_of(root, existing)?;
                let (d2, n2) = sys::parent_of(root, new)?;
                sys::linkat(d1.as_raw_fd(), &n1, d2.as_raw_fd(), &n2)?;
                sys::set_dir_mtime(d2.as_raw_fd(), *parent_mtime)?;
                self.mark_parent(new);
            }
            Op::Unlink { path, parent_mtime } | Op::Rmdir { path, parent_mtime } => {
                let (d, n) = sys::parent_of(root, path)?;
                self.files.forget_below(path);
                sys::unlinkat(d.as_raw_fd(), &n, matches!(op, Op::Rmdir { .. }))?;
                sys::set_dir_mtime(d.as_raw_fd(), *parent_mtime)?;
                self.dirty_files.remove(path);
                self.mark_parent(path);
            }
            Op::Rename {
                from,
                to,
                flags,
                from_parent_mtime,
                to_parent_mtime,
            } => {
                let (d1, n1) = sys::parent_of(root, from)?;
                let (d2, n2) = sys::parent_of(root, to)?;
                self.files.forget_below(from);
                self.files.forget_below(to);
                sys::renameat2(d1.as_raw_fd(), &n1, d2.as_raw_fd(), &n2, *flags)?;
                sys::set_dir_mtime(d1.as_raw_fd(), *from_parent_mtime)?;
                sys::set_dir_mtime(d2.as_raw_fd(), *to_parent_mtime)?;
                // Dirty files below a renamed name now live elsewhere:
                // forget the paths and sync the whole filesystem at the
                // next barrier if any were pending.
                let moved = self
                    .dirty_files
                    .iter()
                    .any(|p| p.starts_with(from) || p.starts_with(to));
                if moved {
                    self.overflow = true;
                }
                self.mark_parent(from);
                self.mark_parent(to);
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
                let (d, n) = sys::parent_or_self(root, path)?;
                let kind = sys::kind_at(d.as_raw_fd(), &n)?;
                // Order matters: chown clears set-id bits, so the mode comes
                // after it; times come last (truncate changes mtime).
                if uid.is_some() || gid.is_some() {
                    sys::chown_at(d.as_raw_fd(), &n, *uid, *gid)?;
                }
                if let Some(m) = mode {
                    if kind == libc::S_IFLNK {
                        return Err(SysError::new(libc::ELOOP, "mode change on a symlink"));
                    }
                    sys::chmod_at_nofollow(d.as_raw_fd(), &n, *m)?;
                }
                if let Some(s) = size {
                    let f = sys::open_regular(d.as_raw_fd(), &n, libc::O_WRONLY)?;
                    sys::ftruncate(f.as_raw_fd(), *s)?;
                    self.mark_file(path);
                }
                if *atime != TimeSet::Omit || *mtime != TimeSet::Omit {
                    sys::utimes_at(d.as_raw_fd(), &n, *atime, *mtime)?;
                }
                if log_it {
                    // A change of the file's own inode (see `mtime_only`),
                    // made durable by the log like a write.
                    self.mark_file(path);
                    if let Some(w) = &mut self.wal {
                        w.push(path, 0, *mtime, &[]);
                    }
                } else {
                    self.mark_parent(path);
                }
            }
            Op::SetXattr {
                path, name, value, ..
            } => {
                let (d, n) = sys::parent_or_self(root, path)?;
                sys::lsetxattr(d.as_raw_fd(), &n, name, value)?;
                self.mark_file(path);
            }
            Op::RemoveXattr { path, name } => {
                let (d, n) = sys::parent_or_self(root, path)?;
                sys::lremovexattr(d.as_raw_fd(), &n, name)?;
                self.mark_file(path);
            }
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
                mtime,
            } => {
                let f = self.file_fd(path)?;
                sys::fallocate(f, *mode, *offset, *len)?;
                sys::futimes(f, TimeSet::Omit, TimeSet::At(*mtime))?;
                self.mark_file(path);
            }
            Op::Barrier => self.barrier()?,
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), SysError> {
        let loggable = std::mem::replace(&mut self.group_loggable, true);
        if let Some(w) = &mut self.wal {
            // Only logged writes since the last barrier: the dirty files
            // are exactly those of the group's records. The log pays when a
            // group covers several files (one log sync instead of several
            // fsyncs); for one file, an fsync of it costs less than an
            // append and a sync of the log (measured here, 4 KiB write +
            // fsync, 1 job: 0.94 × with every group logged). So groups over
            // several files turn the log on, and `CALM_GROUPS` one-file
            // groups in a row turn it off (after a checkpoint).
            if loggable && w.has_group() && self.dirty_dirs.is_empty() && !self.overflow {
                if self.dirty_files.len() >= self.log_min_files {
                    if !self.log_on {
                        tracing::info!(
                            files = self.dirty_files.len(),
                            "group commits over several files: syncing them through the write-ahead log"
                        );
                    }
                    self.log_on = true;
                    self.calm = 0;
                } else if self.log_on {
                    self.calm += 1;
                }
                if self.log_on {
                    if !w.room(0) {
                        // This half is full: its files are synced by the
                        // log's helper while the group goes to the other.
                        let fds = self.logged_fds()?;
                        if let Some(w) = &mut self.wal {
                            w.rotate(fds)?;
                        }
                        self.logged.clear();
                    }
                    let Some(w) = &mut self.wal else {
                        return Ok(());
                    };
                    w.commit()?;
                    let files = std::mem::take(&mut self.dirty_files);
                    self.logged.extend(files);
                    if self.calm >= CALM_GROUPS {
                        self.checkpoint()?;
                        self.log_on = false;
                        tracing::info!(
                            "{CALM_GROUPS} one-file group commits in a row: the write-ahead log is off"
                        );
                        self.calm = 0;
                    }
                    return Ok(());
                }
            }
            w.discard_group();
        }
        let mut need_syncfs = self.overflow;
        if !need_syncfs {
            let files: Vec<RelPath> = std::mem::take(&mut self.dirty_files).into_iter().collect();
            let dirs: Vec<RelPath> = std::mem::take(&mut self.dirty_dirs).into_iter().collect();
            // Files first, then the directories that name them.
            need_syncfs = self.sync_list(&files)? || self.sync_list(&dirs)?;
        }
        if need_syncfs {
            sys::syncfs(self.root())?;
        }
        self.dirty_files.clear();
        self.dirty_dirs.clear();
        self.overflow = false;
        Ok(())
    }

    /// Descriptors of the files with records in the log's current epoch,
    /// for its helper to sync (see `wal::Wal::rotate`). Within an epoch a
    /// file is only written, never renamed or removed, so its name still
    /// leads to it.
    fn logged_fds(&mut self) -> Result<Vec<OwnedFd>, SysError> {
        let list: Vec<RelPath> = self.logged.iter().cloned().collect();
        let mut fds = Vec::with_capacity(list.len());
        for p in &list {
            let fd = match self.files.get(p) {
                Some(fd) => sys::dup(fd)?,
                None => {
                    let opened = sys::parent_of(self.root(), p)
                        .and_then(|(d, n)| sys::open_regular(d.as_raw_fd(), &n, libc::O_RDONLY));
                    match opened {
                        Ok(f) => f,
                        Err(e) if matches!(e.errno, libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
                            continue
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            fds.push(fd);
        }
        Ok(fds)
    }

    /// fsyncs the files or directories named in `list`: a few at a time, in
    /// parallel (see `syncpool`), and never more open at once than a chunk.
    /// Returns true if some of them can only be made durable with the whole
    /// filesystem (symlinks, special files).
    fn sync_list(&mut self, list: &[RelPath]) -> Result<bool, SysError> {
        let root = self.root();
        let mut need_syncfs = false;
        for chunk in list.chunks(SYNC_CHUNK) {
            let mut opened = Vec::new();
            let mut fds = Vec::with_capacity(chunk.len());
            for p in chunk {
                // A file still open in the cache was opened as a regular
                // file (see `file_fd`).
                if let Some(fd) = self.files.get(p) {
                    fds.push(fd);
                    continue;
                }
                // Any other name is opened with O_PATH first: a FIFO or
                // device node (an xattr changed on it) is never opened for
                // real. A name removed or renamed since it was changed is no
                // longer reachable; its changes went with it.
                let f = match sys::open_below(root, p, libc::O_PATH | libc::O_NOFOLLOW) {
                    Ok(f) => f,
                    Err(e) if matches!(e.errno, libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
                        continue
                    }
                    Err(e) => return Err(e),
                };
                match sys::fstat(f.as_raw_fd())?.st_mode & libc::S_IFMT {
                    libc::S_IFREG | libc::S_IFDIR => {
                        let rf = sys::reopen(f.as_raw_fd(), libc::O_RDONLY)?;
                        fds.push(rf.as_raw_fd());
                        opened.push(rf);
                    }
                    // Symlinks and special files cannot be fsynced by fd:
                    // their inode changes are made durable with the
                    // filesystem.
                    _ => need_syncfs = true,
                }
            }
            self.syncs.fsync_all(&fds)?;
        }
        Ok(need_syncfs)
    }
}

/// The writes that the write-ahead log of the mirror directory `dir` holds
/// for replay (its current epoch), as path, offset and length, without
/// applying them: for diagnostics and tests.
pub fn logged_writes(dir: &Path) -> anyhow::Result<Vec<(RelPath, u64, usize)>> {
    let log = wal::log_path_for(dir)?;
    let root = mirror_root(dir)?;
    let Some(mut w) = wal::Wal::open(&log, root.as_raw_fd(), None)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    w.replay(&mut |r| {
        out.push((r.path, r.offset, r.data.len()));
        Ok(())
    })?;
    Ok(out)
}

/// Replays the write-ahead log of the mirror directory `dir`, if it has
/// one, into its files and makes them durable: to be called before
/// anything else uses a directory that may have been a mirror (a mount
/// after promotion). Returns how many records were replayed.
pub fn recover(dir: &Path) -> anyhow::Result<u64> {
    let log = wal::log_path_for(dir)?;
    let mut a = Applier::open(dir)?;
    Ok(a.attach_log(&log, None)?.unwrap_or(0))
}

impl Drop for Applier {
    /// A clean end (the session is over) leaves no records in the log: the
    /// directory may be used without hapair next. A crash skips this; the
    /// next opener replays.
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint() {
            tracing::error!("final checkpoint of the mirror log: {e}");
        }
    }
}

#[cfg(test)]
impl Applier {
    /// Ends like a crash would: no final checkpoint.
    fn crash(mut self) {
        self.wal = None;
    }

    /// Logs every group commit of small writes, even over one file.
    fn always_log(mut self) -> Self {
        self.log_min_files = 1;
        self
    }
}

/// The path of a setattr that only sets the mtime. The mount
/// sends one after writes to a file, about once a second while it is
/// written (the writes themselves carry no exact mtime in between). For a
/// regular file (one the applier has open: see `FdCache`) it goes into the
/// log as a record of no data with that mtime, which replay applies in its
/// place, in order with the writes: ending the log's epoch for it instead
/// made every such setattr sync every logged file (measured here, 4 jobs of
/// 4 KiB write + fsync: fsyncs of the application waited up to 54 ms).
fn mtime_only(op: &Op) -> Option<&RelPath> {
    match op {
        Op::SetAttr {
            path,
            mode: None,
            uid: None,
            gid: None,
            size: None,
            atime: TimeSet::Omit,
            mtime: TimeSet::At(_),
        } => Some(path),
        _ => None,
    }
}

fn kind_of(mode: u32) -> Option<EntryKind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        libc::S_IFIFO => EntryKind::Fifo,
        libc::S_IFSOCK => EntryKind::Socket,
        libc::S_IFCHR => EntryKind::CharDev,
        libc::S_IFBLK => EntryKind::BlockDev,
        _ => return None,
    })
}

fn entry_for(
    dir: RawFd,
    name: &[u8],
    path: RelPath,
    hash: bool,
) -> anyhow::Result<(ManifestEntry, libc::stat)> {
    let st = sys::lstat_at(dir, name).map_err(|e| anyhow::anyhow!("stat {path}: {e}"))?;
    let kind = kind_of(st.st_mode).ok_or_else(|| anyhow::anyhow!("{path}: unknown file type"))?;
    let target = if kind == EntryKind::Symlink {
        sys::readlinkat(dir, name).map_err(|e| anyhow::anyhow!("readlink {path}: {e}"))?
    } else {
        Vec::new()
    };
    let content_hash = if hash && kind == EntryKind::File {
        let f = sys::open_regular(dir, name, libc::O_RDONLY)
            .map_err(|e| anyhow::anyhow!("open {path}: {e}"))?;
        Some(
            sys::hash_content(f.as_raw_fd(), st.st_size as u64)
                .map_err(|e| anyhow::anyhow!("read {path}: {e}"))?,
        )
    } else {
        None
    };
    let xattrs =
        sys::list_xattrs(dir, name).map_err(|e| anyhow::anyhow!("xattrs of {path}: {e}"))?;
    let e = ManifestEntry {
        path,
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: if kind == EntryKind::File {
            st.st_size as u64
        } else {
            0
        },
        mtime: hapair_proto::Timestamp {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec as u32,
        },
        rdev: if matches!(kind, EntryKind::CharDev | EntryKind::BlockDev) {
            st.st_rdev
        } else {
            0
        },
        target,
        link_group: (kind == EntryKind::File && st.st_nlink > 1).then_some(st.st_ino),
        xattrs,
        content_hash,
    };
    Ok((e, st))
}

/// Lists the whole tree under `dir_fd`, the root itself first (empty
/// path), parents before children, names sorted within a directory. Calls
/// `sink` with chunks of at most `MAX_MANIFEST_ENTRIES` entries. Never
/// follows a symlink; works past PATH_MAX (only `*at()` calls).
pub fn scan_tree(
    dir_fd: BorrowedFd<'_>,
    hash_content: bool,
    sink: &mut dyn FnMut(Vec<ManifestEntry>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let root = sys::openat(
        dir_fd.as_raw_fd(),
        b".",
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| anyhow::anyhow!("opening the tree root: {e}"))?;
    let mut chunk = Vec::new();
    let (root_entry, _) = entry_for(root.as_raw_fd(), b".", RelPath::root(), false)?;
    chunk.push(root_entry);
    // Depth-first with an explicit stack of open directories: memory is
    // bounded by depth × directory size, not by the tree.
    let mut stack: Vec<(OwnedFd, RelPath)> = vec![(root, RelPath::root())];
    while let Some((dfd, prefix)) = stack.pop() {
        let mut names = sys::read_dir_names(dfd.as_raw_fd())
            .map_err(|e| anyhow::anyhow!("listing {prefix}: {e}"))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = prefix
                .join(&name)
                .map_err(|e| anyhow::anyhow!("name in {prefix}: {e}"))?;
            let (e, _) = entry_for(dfd.as_raw_fd(), &name, path.clone(), hash_content)?;
            if e.kind == EntryKind::Dir {
                let sub = sys::openat(
                    dfd.as_raw_fd(),
                    &name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )
                .map_err(|e| anyhow::anyhow!("opening {path}: {e}"))?;
                subdirs.push((sub, path));
            }
            chunk.push(e);
            if chunk.len() >= MAX_MANIFEST_ENTRIES {
                sink(std::mem::take(&mut chunk))?;
            }
        }
        // Reverse so that the stack pops them in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    if !chunk.is_empty() {
        sink(chunk)?;
    }
    Ok(())
}

/// The whole manifest as one vector (small trees, tests, the mount's side).
pub fn scan_tree_vec(
    dir_fd: BorrowedFd<'_>,
    hash_content: bool,
) -> anyhow::Result<Vec<ManifestEntry>> {
    let mut all = Vec::new();
    scan_tree(dir_fd, hash_content, &mut |c| {
        all.extend(c);
        Ok(())
    })?;
    Ok(all)
}

#[cfg(test)]
mod cache_tests;
#[cfg(test)]
mod local_log_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wal_tests;
