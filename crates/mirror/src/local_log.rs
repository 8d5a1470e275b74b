//! The write-ahead log on the mount's side: the same file and format as the
//! mirror's (`wal`), beside the same directory. A directory is mounted or
//! mirrored, never both at once, so one log serves whichever role the node
//! has; whoever opens the directory next replays it.
//!
//! The mount logs a small write to a file (up to 64 KiB, through the page
//! cache, to a file with a name) right after making it, under the mount's
//! ordering lock, so the log's order is the order of execution. An fsync of
//! that file is then one fdatasync of the log, shared by every fsync that
//! arrives meanwhile (group commit), instead of an fsync of the file. The
//! files are synced at checkpoints: before any other change to the tree
//! (the mount calls `before_change` under its ordering lock) and when the
//! log is dropped; and, off the writers' path, by the log's helper thread
//! when a half of the log fills (`Wal::rotate`).
//!
//! The log pays only when fsyncs come concurrently: with one fsync at a
//! time, an append to the log and its fdatasync cost more than the file's
//! own fsync (measured here with 4 KiB write + fsync, 1 job: 0.90 ×), with
//! four writers, one log sync serves several of them (4 jobs: 1.11 ×). So
//! a file "joins" the log at an ordinary fsync made while another fsync is
//! in flight; after `CALM_FSYNCS` fsyncs in a row with none other in
//! flight, the log is checkpointed and every file leaves it.
//!
//! Only writes made after a file joined are logged, so everything written
//! to it before is covered by the fsync it joined at. A write that cannot be logged (a large direct write, say) marks the
//! file, and its next fsync is an ordinary one again. A checkpoint or any
//! change other than a write makes every file leave the log: their next
//! fsync is ordinary (it also makes metadata durable: a chmod, an xattr).
//!
//! What a replayed file does not get back exactly is its mtime: a logged
//! write carries none, so after a crash the file's mtime is the replay's.
//!
//! When the log fails (a write or a sync of it), nothing more is logged,
//! and the records it holds must not be replayed over what is written
//! after: the log is checkpointed at once. If that fails too, the log is
//! *stuck*: its records stay live (a failed fsync may have dropped the
//! files' pages, so only a replay at the next start restores what they
//! hold; a retried fsync could succeed over lost data, so none is tried),
//! and until this process ends, the files they cover refuse writes and
//! fsyncs, and the tree refuses changes, with EIO. What the application
//! was told is durable is then exactly what the next start's replay
//! brings back.

use crate::syncpool::SyncPool;
use crate::sys::{self, SysError};
use crate::wal::{self, Wal};
use hapair_proto::{RelPath, TimeSet};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Most files in the log at once (each keeps a descriptor for checkpoints).
const MAX_FILES: usize = 1024;
/// After this many fsyncs in a row with no other fsync in flight, the log
/// is checkpointed and every file leaves it.
pub(crate) const CALM_FSYNCS: u32 = 256;

struct Joined {
    /// What the log must hold for this file's writes: the end of its last
    /// record (0: none since it joined).
    lsn: u64,
    /// A write since the last fsync was not logged.
    unlogged: bool,
    /// For the checkpoint's fsync.
    fd: OwnedFd,
}

struct State {
    wal: Wal,
    files: HashMap<u64, Joined>,
    /// Bytes of records appended since the log was opened (never reset).
    appended: u64,
    /// A write to or a sync of the log failed: nothing is logged any more,
    /// every fsync is an ordinary one.
    broken: bool,
    scratch: Vec<u8>,
    syncs: SyncPool,
    /// fsyncs in a row that found no other in flight.
    calm: u32,
    /// Files joined since the last calm checkpoint (for the log's messages).
    on: bool,
    /// Tests: makes the log's writes and syncs fail (see `fail`).
    #[cfg(test)]
    fault: Fault,
}

/// Failures a test makes the log meet (none outside tests).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Fault {
    None,
    /// The log's fdatasync fails; its header and the files sync.
    Sync,
    /// Every write and sync of the log fails; the files sync.
    All,
}

/// What the log's users read without its state's lock.
#[derive(Default)]
struct Marks {
    /// `appended` up to which the log is durable.
    durable: AtomicU64,
    /// A checkpoint failed: the log's records stay live until the next
    /// start replays them; `files` keeps the files they cover (see the
    /// module's doc). Set under the state's lock, never cleared.
    stuck: AtomicBool,
}

impl Marks {
    fn stuck(&self) -> bool {
        self.stuck.load(Ordering::Acquire)
    }
}

/// What an fsync of a file has to do.
enum SyncPlan {
    /// Sync the log through this point (`sync_through`).
    Log(u64),
    /// An ordinary fsync of the file, then `synced(ino, ok)`.
    File,
    /// The log is stuck with records of this file: EIO.
    Refuse,
}

pub struct LocalLog {
    state: Mutex<State>,
    /// Serialises the log's fdatasyncs: the fsyncs that wait meanwhile find
    /// their records covered by the one before (group commit).
    commit: Mutex<()>,
    /// How far the log is durable, and whether it is stuck.
    marks: Marks,
    /// The log file, for fdatasync without the state's lock.
    sync_fd: OwnedFd,
    /// fdatasyncs of the log so far.
    log_syncs: AtomicU64,
    /// fsyncs in flight.
    in_flight: AtomicUsize,
    /// An fsync counts as concurrent when at least this many others are in
    /// flight (1; tests set 0).
    contended_at: AtomicUsize,
}

/// Counts an fsync in flight while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd, SysError> {
    sys::dup(fd.as_raw_fd())
}

impl LocalLog {
    /// Replays the log of `dir` if it has one (see `crate::recover`), then
    /// opens it (making it if missing) for this mount. Returns the log and
    /// how many records were replayed.
    pub fn open(dir: &Path) -> anyhow::Result<(LocalLog, u64)> {
        Self::open_sized(dir, wal::LOG_SIZE)
    }

    /// As `open`, making a missing log `size` bytes long.
    pub fn open_sized(dir: &Path, size: u64) -> anyhow::Result<(LocalLog, u64)> {
        let replayed = crate::recover(dir)?;
        let path = wal::log_path_for(dir)?;
        let root = crate::mirror_root(dir)?;
        let Some(mut w) = Wal::open(&path, root.as_raw_fd(), Some(size))? else {
            anyhow::bail!("{}: the log vanished while it was opened", path.display());
        };
        // Replayed and ended above, by the same process, under the same
        // lock: nothing may be left.
        let left = w.replay(&mut |_| Ok(()))?;
        anyhow::ensure!(
            left == 0,
            "{}: {left} records left after the replay",
            path.display()
        );
        let sync_fd = dup(w.fd()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok((
            LocalLog {
                state: Mutex::new(State {
                    wal: w,
                    files: HashMap::new(),
                    appended: 0,
                    broken: false,
                    scratch: Vec::new(),
                    syncs: SyncPool::default(),
                    calm: 0,
                    on: false,
                    #[cfg(test)]
                    fault: Fault::None,
                }),
                commit: Mutex::new(()),
                marks: Marks::default(),
                sync_fd,
                log_syncs: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
                contended_at: AtomicUsize::new(1),
            },
            replayed,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a small write through the page cache to a file with a name
    /// (called under the mount's ordering lock): logs it if the file has
    /// joined the log, and says whether it did. The write itself is done;
    /// an error here only makes the next fsyncs ordinary ones.
    pub fn wrote(&self, ino: u64, path: &RelPath, offset: u64, data: &[u8]) -> bool {
        let mut st = self.lock();
        if !st.files.contains_key(&ino) {
            return false; // not joined: its next fsync is an ordinary one
        }
        if st.broken || data.len() > wal::MAX_RECORD_DATA {
            self.unlogged_locked(&mut st, ino);
            return false;
        }
        let len = wal::RECORD_HEADER + path.to_bytes().len() + data.len();
        if !st.wal.room(len) {
            // This half is full: the log's helper syncs the files its
            // records cover while records go to the other half.
            if let Err(e) = rotate_locked(&mut st, &self.marks) {
                // The error may be the helper's fsync of the files: no
                // checkpoint may retry it (see the module's doc).
                self.unlogged_locked(&mut st, ino);
                stick_locked(&mut st, &self.marks, &format!("rotating the log: {e}"));
                return false;
            }
        }
        let epoch = st.wal.epoch();
        let mut rec = std::mem::take(&mut st.scratch);
        rec.clear();
        wal::encode(
            &mut rec,
            epoch,
            &path.to_bytes(),
            offset,
            TimeSet::Omit,
            data,
        );
        let r = injected(&st, Fault::All).and_then(|()| st.wal.append(&rec));
        let len = rec.len() as u64;
        st.scratch = rec;
        match r {
            Ok(()) => {
                st.appended += len;
                let end = st.appended;
                if let Some(f) = st.files.get_mut(&ino) {
                    f.lsn = end;
                }
                true
            }
            Err(e) => {
                tracing::error!("writing to the mount's log failed: {e}; no more logging");
                self.unlogged_locked(&mut st, ino);
                self.break_locked(&mut st);
                false
            }
        }
    }

    /// Before a write to `ino` that will be logged (under the mount's
    /// ordering lock, before it is made): refused with EIO if the log is
    /// stuck with records of that file (see the module's doc). A write
    /// that passes just before the log sticks is made but never reported
    /// durable: its file's fsyncs are refused from then on.
    pub fn before_logged_write(&self, ino: u64) -> Result<(), SysError> {
        if !self.marks.stuck() {
            return Ok(()); // no lock on the writers' path while all is well
        }
        refuse_if_stuck(&self.lock(), &self.marks, ino)
    }

    /// The log failed: nothing more is logged, and it is checkpointed now,
    /// so that none of its records is replayed over a later write. If that
    /// fails, the log is stuck. True: the checkpoint made every logged
    /// file durable.
    fn break_locked(&self, st: &mut State) -> bool {
        st.broken = true;
        if self.marks.stuck() {
            return false;
        }
        match checkpoint_locked(st, &self.marks) {
            Ok(()) => {
                tracing::warn!(
                    "the mount's log was checkpointed after its failure: fsyncs are ordinary from now on"
                );
                true
            }
            Err(_) => false,
        }
    }

    /// After a write to `ino` that was not logged (large, direct, or to a
    /// file without a name), under the ordering lock, before the write is
    /// made: if the log holds records of that file, they are synced first
    /// (a replay must never put them back over this write).
    pub fn before_unlogged_write(&self, ino: u64) -> Result<(), SysError> {
        let mut st = self.lock();
        refuse_if_stuck(&st, &self.marks, ino)?;
        let has_records = st.files.get(&ino).is_some_and(|f| f.lsn > 0);
        if has_records {
            checkpoint_locked(&mut st, &self.marks)?;
        }
        self.unlogged_locked(&mut st, ino);
        Ok(())
    }

    fn unlogged_locked(&self, st: &mut State, ino: u64) {
        if let Some(f) = st.files.get_mut(&ino) {
            f.unlogged = true;
        }
    }

    /// Before any change to the tree other than a write (under the ordering
    /// lock, before it is made): syncs the logged files, ends the epoch,
    /// and every file leaves the log.
    pub fn before_change(&self) -> Result<(), SysError> {
        let mut st = self.lock();
        if self.marks.stuck() {
            // Any change may move or replace a file the records name.
            return Err(SysError::new(
                libc::EIO,
                "the write-ahead log failed and holds records until the next start: no change to the tree",
            ));
        }
        if st.files.is_empty() && !st.wal.holds_records() {
            return Ok(());
        }
        checkpoint_locked(&mut st, &self.marks)
    }

    /// An fsync of the file `ino`, open as `fd`: one sync of the log if it
    /// holds the file's writes, else `ordinary` (the file's own fsync,
    /// returning an errno on failure). Returns whether only the log was
    /// synced.
    pub fn fsync(
        &self,
        ino: u64,
        fd: BorrowedFd<'_>,
        ordinary: &mut dyn FnMut() -> Result<(), i32>,
    ) -> Result<bool, i32> {
        let others = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _counted = InFlight(&self.in_flight);
        let contended = others >= self.contended_at.load(Ordering::Relaxed);
        match self.plan_sync(ino, fd, contended) {
            SyncPlan::Log(lsn) => self.sync_through(lsn).map(|()| true).map_err(|e| {
                tracing::error!("syncing the write-ahead log: {e}");
                e.errno
            }),
            SyncPlan::Refuse => Err(libc::EIO),
            SyncPlan::File => {
                let r = ordinary();
                if r.is_err() {
                    let mut st = self.lock();
                    self.unlogged_locked(&mut st, ino);
                }
                r.map(|()| false)
            }
        }
    }

    fn plan_sync(&self, ino: u64, fd: BorrowedFd<'_>, contended: bool) -> SyncPlan {
        let mut st = self.lock();
        if refuse_if_stuck(&st, &self.marks, ino).is_err() {
            return SyncPlan::Refuse;
        }
        if st.broken {
            return SyncPlan::File;
        }
        if contended {
            st.calm = 0;
        } else {
            st.calm = st.calm.saturating_add(1);
            if st.calm >= CALM_FSYNCS && !st.files.is_empty() {
                // One writer at a time again: the log costs more than it
                // saves. Every file leaves it (their fsyncs are ordinary).
                if checkpoint_locked(&mut st, &self.marks).is_err() {
                    return match refuse_if_stuck(&st, &self.marks, ino) {
                        Err(_) => SyncPlan::Refuse,
                        Ok(()) => SyncPlan::File,
                    };
                }
                if st.on {
                    tracing::info!(
                        "{CALM_FSYNCS} fsyncs in a row with no other in flight: the write-ahead log is off"
                    );
                    st.on = false;
                }
                return SyncPlan::File;
            }
        }
        match st.files.get_mut(&ino) {
            Some(f) if !f.unlogged => SyncPlan::Log(f.lsn),
            Some(f) => {
                // Cleared before the fsync: a write that comes in meanwhile
                // sets it again, or is logged.
                f.unlogged = false;
                SyncPlan::File
            }
            None => {
                // Joins now, before its fsync: writes from here on are
                // logged; those before are covered by the fsync.
                if contended && st.files.len() < MAX_FILES {
                    if !st.on {
                        tracing::info!(
                            "concurrent fsyncs: syncing files through the write-ahead log"
                        );
                        st.on = true;
                    }
                    if let Ok(fd) = dup(fd) {
                        st.files.insert(
                            ino,
                            Joined {
                                lsn: 0,
                                unlogged: false,
                                fd,
                            },
                        );
                    }
                }
                SyncPlan::File
            }
        }
    }

    /// Makes the log durable through `lsn` (one fdatasync, or none if a
    /// concurrent one covered it).
    pub fn sync_through(&self, lsn: u64) -> Result<(), SysError> {
        if self.marks.durable.load(Ordering::Acquire) >= lsn {
            return Ok(());
        }
        let _c = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        if self.marks.durable.load(Ordering::Acquire) >= lsn {
            return Ok(());
        }
        // Everything appended by now is in the file (appends finish under
        // the state's lock before `appended` moves).
        let end = self.lock().appended;
        let r = self
            .injected_sync()
            .and_then(|()| sys::fdatasync(self.sync_fd.as_raw_fd()));
        match r {
            Ok(()) => {
                self.marks.durable.fetch_max(end, Ordering::AcqRel);
                self.log_syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // After a failed sync the kernel may drop the dirty pages:
                // the log cannot be trusted from here on.
                tracing::error!("syncing the mount's log failed: {e}; no more logging");
                let mut st = self.lock();
                if self.break_locked(&mut st) {
                    // The files themselves are durable now.
                    return Ok(());
                }
                Err(e)
            }
        }
    }

    /// Files in the log now (for status and tests).
    pub fn joined(&self) -> usize {
        self.lock().files.len()
    }

    /// fdatasyncs of the log so far (for status and tests).
    pub fn log_syncs(&self) -> u64 {
        self.log_syncs.load(Ordering::Relaxed)
    }

    /// Counts every fsync as concurrent (`true`) or as concurrent only
    /// when another is in flight (`false`, the default).
    #[cfg(test)]
    pub(crate) fn always_contended(&self, on: bool) {
        self.contended_at
            .store(if on { 0 } else { 1 }, Ordering::Relaxed);
    }

    /// The log's current epoch.
    #[cfg(test)]
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().wal.epoch()
    }

    /// Rotations leave their retirement undone until it is needed (as a
    /// crash during it would).
    #[cfg(test)]
    pub(crate) fn hold_retiring(&self) {
        self.lock().wal.hold_retiring = true;
    }

    /// Tests: the failure made for the log's sync (see `Fault`).
    #[cfg(test)]
    fn injected_sync(&self) -> Result<(), SysError> {
        injected(&self.lock(), Fault::Sync)
    }

    #[cfg(not(test))]
    fn injected_sync(&self) -> Result<(), SysError> {
        Ok(())
    }

    /// Makes the log's writes and syncs fail from now on.
    #[cfg(test)]
    pub(crate) fn fail(&self, fault: Fault) {
        self.lock().fault = fault;
    }

    /// True once a checkpoint failed (see the module's doc).
    #[cfg(test)]
    pub(crate) fn stuck(&self) -> bool {
        self.marks.stuck()
    }

    /// Ends like a crash would: no final checkpoint.
    #[cfg(test)]
    pub(crate) fn crash(self) {
        self.lock().broken = true;
    }
}

/// Goes on in the other half of the log (see `Wal::rotate`); the files
/// stay in the log.
fn rotate_locked(st: &mut State, marks: &Marks) -> Result<(), SysError> {
    let mut fds = Vec::new();
    for f in st.files.values().filter(|f| f.lsn > 0) {
        fds.push(sys::dup(f.fd.as_raw_fd())?);
    }
    st.wal.rotate(fds)?;
    // The rotation synced the log.
    marks.durable.fetch_max(st.appended, Ordering::AcqRel);
    Ok(())
}

fn checkpoint_locked(st: &mut State, marks: &Marks) -> Result<(), SysError> {
    let fds: Vec<_> = st
        .files
        .values()
        .filter(|f| f.lsn > 0)
        .map(|f| f.fd.as_raw_fd())
        .collect();
    let r = st.syncs.fsync_all(&fds).and_then(|()| {
        injected(st, Fault::All)?;
        if st.wal.holds_records() {
            st.wal.new_epoch()
        } else {
            Ok(())
        }
    });
    if let Err(e) = &r {
        stick_locked(st, marks, &format!("checkpoint: {e}"));
        return r;
    }
    // Every file leaves the log: its next fsync is ordinary.
    st.files.clear();
    marks.durable.fetch_max(st.appended, Ordering::AcqRel);
    Ok(())
}

/// A checkpoint failed, or may not be tried: the records stay live, and
/// are never retired by this process (a second fsync could succeed over
/// pages the first one lost); the files they cover stay, refusing writes
/// and fsyncs.
fn stick_locked(st: &mut State, marks: &Marks, why: &str) {
    let files = st.files.values().filter(|f| f.lsn > 0).count();
    tracing::error!(
        "the mount's write-ahead log is stuck ({why}): until hapair restarts, {files} file(s) \
         refuse writes and fsyncs and the tree refuses changes (EIO); the next start replays the log"
    );
    st.broken = true;
    marks.stuck.store(true, Ordering::Release);
    st.files.retain(|_, f| f.lsn > 0);
}

/// Tests: EIO if the failure made for the log (see `Fault`) covers `at`
/// (`Sync`: the log's sync; `All`: its writes and header too).
#[cfg(test)]
fn injected(st: &State, at: Fault) -> Result<(), SysError> {
    let fails = match st.fault {
        Fault::None => false,
        Fault::Sync => at == Fault::Sync,
        Fault::All => true,
    };
    if fails {
        return Err(SysError::new(libc::EIO, "test: the log fails"));
    }
    Ok(())
}

#[cfg(not(test))]
fn injected(_: &State, _: Fault) -> Result<(), SysError> {
    Ok(())
}

/// EIO if the log is stuck with records of `ino`.
fn refuse_if_stuck(st: &State, marks: &Marks, ino: u64) -> Result<(), SysError> {
    if marks.stuck() && st.files.contains_key(&ino) {
        return Err(SysError::new(
            libc::EIO,
            "the write-ahead log failed and holds records of this file until the next start",
        ));
    }
    Ok(())
}

impl Drop for LocalLog {
    /// A clean end leaves no records: the directory may be used without
    /// hapair next.
    fn drop(&mut self) {
        let mut st = self.lock();
        if st.broken || !st.wal.holds_records() {
            return;
        }
        if let Err(e) = checkpoint_locked(&mut st, &self.marks) {
            tracing::error!("final checkpoint of the mount's log failed: {e}");
        }
    }
}
