//! The hapair FUSE filesystem: a faithful passthrough over a backing
//! directory that reports every mutation, in execution order, to a
//! [`Replicator`].
//!
//! The application's data directory is opened (as a directory fd) before the
//! filesystem is mounted over the same path, so the application keeps its
//! path and every change it makes goes through this filesystem. See `fs.rs`
//! for the locking rules and for what is (not) recorded for unlinked files.

mod direct;
mod fs;
mod inode;
mod sys;

pub use fs::ReplicaFs;

use anyhow::Context;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What the filesystem tells the replication layer. Implemented by the QUIC
/// client.
pub trait Replicator: Send + Sync + 'static {
    /// Record a mutation that has just been executed locally. Called while
    /// the filesystem holds its ordering lock, so record() calls are in the
    /// exact order the local effects happened. May block (backpressure).
    /// Returns the op's sequence number.
    fn record(&self, op: hapair_proto::Op, payload: &[u8]) -> hapair_proto::Seq;
    /// [`Replicator::record`] with a payload the replicator may keep without
    /// copying it (bulk writes). The default copies.
    fn record_owned(&self, op: hapair_proto::Op, payload: bytes::Bytes) -> hapair_proto::Seq {
        self.record(op, &payload)
    }
    /// True if every mutating call waits for the mirror to apply it (strict
    /// mode). Then a large write is written locally and recorded in pieces,
    /// so that the first pieces travel to the mirror, and are applied there,
    /// while the next are being written here. The default: false.
    fn waits_for_each_call(&self) -> bool {
        false
    }
    /// Called after the ordering lock is released, once per mutating FUSE
    /// call that recorded something, with the last seq that call recorded: in
    /// strict mode waits until the mirror applied it. Err(errno) is returned
    /// to the caller.
    fn after_mutation(&self, seq: hapair_proto::Seq) -> Result<(), i32>;
    /// A durability point (fsync, fdatasync, fsyncdir, a write on an
    /// O_SYNC/O_DSYNC handle, and the kernel's msync-triggered fsync): called
    /// AFTER the local fsync succeeded; returns when the mirror has made
    /// everything recorded so far durable (mode-dependent).
    fn durability_point(&self) -> Result<(), i32>;
    /// A durability point around the local sync that it extends: `local` is
    /// the backing filesystem's own fsync/fdatasync. Returns only when both
    /// `local` and the durability point are done; `local`'s error comes
    /// first. The default runs `local`, then [`Replicator::durability_point`].
    /// An implementation may start the durability point before running
    /// `local` (everything recorded so far is already covered), so that both
    /// disks sync at the same time instead of one after the other.
    fn durability_point_around(
        &self,
        local: &mut dyn FnMut() -> Result<(), i32>,
    ) -> Result<(), i32> {
        local()?;
        self.durability_point()
    }
    /// Records a barrier right after the write just recorded, because the
    /// application is expected to ask for a durability point next (see
    /// `hapair_repl_core::early`). Called under the ordering lock, like
    /// `record`. True if one was recorded: then call
    /// [`Replicator::send_recorded`] once the ordering lock is released.
    /// The default records nothing.
    fn early_barrier(&self) -> bool {
        false
    }
    /// Sends what has been recorded now (after an early barrier), from the
    /// calling thread if it can. The default does nothing.
    fn send_recorded(&self) {}
    /// [`Replicator::after_mutation`] without blocking the calling thread:
    /// `done` receives the outcome once the call may return to the
    /// application, exactly once, from any thread (possibly this one, before
    /// this returns). The filesystem answers the kernel from `done`, so a
    /// FUSE worker never waits for the network. The default blocks.
    fn after_mutation_then(&self, seq: hapair_proto::Seq, done: Completion) {
        done(self.after_mutation(seq))
    }
    /// [`Replicator::durability_point_around`] without blocking the calling
    /// thread beyond `local` itself (which runs on it): `done` receives the
    /// outcome, as for [`Replicator::after_mutation_then`]. The default
    /// blocks.
    fn durability_point_around_then(
        &self,
        local: &mut dyn FnMut() -> Result<(), i32>,
        done: Completion,
    ) {
        done(self.durability_point_around(local))
    }
}

/// Receives the outcome (`Err(errno)` for the application) of a call that
/// waited for the mirror. Called exactly once, from any thread.
pub type Completion = Box<dyn FnOnce(Result<(), i32>) + Send + 'static>;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// FUSE worker threads (default 4).
    pub n_threads: usize,
    /// Source name shown in /proc/mounts (default "hapair").
    pub fsname: String,
    /// Kernel writeback cache (default false). With it, `write()` returns
    /// before the filesystem sees the data; not for the replicated modes yet.
    pub writeback_cache: bool,
    /// Allow device files to be opened through the mount (default false:
    /// `nodev`, device nodes can still be created and replicated).
    pub dev: bool,
    /// Honour set-user-id bits on execution (default false: `nosuid`, the
    /// bits are still stored and replicated).
    pub suid: bool,
    /// POSIX ACLs enforced by the kernel as on the backing filesystem, and
    /// default ACLs inherited by new entries (default true). Without it,
    /// ACL xattrs are stored and replicated but only the mode bits are
    /// checked.
    pub posix_acl: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            n_threads: 4,
            fsname: "hapair".to_string(),
            writeback_cache: false,
            dev: false,
            suid: false,
            posix_acl: true,
        }
    }
}

fn config(opts: &MountOptions) -> fuser::Config {
    use fuser::MountOption as M;
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        M::FSName(opts.fsname.clone()),
        M::Subtype("hapair".to_string()),
        M::DefaultPermissions,
        M::RW,
    ];
    if opts.dev {
        c.mount_options.push(M::Dev);
    }
    if opts.suid {
        c.mount_options.push(M::Suid);
    }
    // allow_other: the application runs as other users. No AutoUnmount: if
    // the daemon dies the application must get ENOTCONN, not write
    // unreplicated into the directory underneath.
    c.acl = fuser::SessionACL::All;
    c.n_threads = Some(opts.n_threads.max(1));
    c.clone_fd = opts.n_threads > 1;
    c
}

/// Mounts `fs` on `mountpoint` and serves until unmounted (fusermount3 -u,
/// umount, or the process ends).
pub fn mount_blocking(fs: ReplicaFs, mountpoint: &Path, opts: &MountOptions) -> anyhow::Result<()> {
    mount_blocking_then(fs, mountpoint, opts, || {})
}

/// [`mount_blocking`], calling `mounted` once the kernel holds the mount
/// (before it is served): from then on an unmount of `mountpoint` ends the
/// session. Not called if mounting fails.
pub fn mount_blocking_then(
    mut fs: ReplicaFs,
    mountpoint: &Path,
    opts: &MountOptions,
    mounted: impl FnOnce(),
) -> anyhow::Result<()> {
    fs.writeback_cache = opts.writeback_cache;
    fs.posix_acl = opts.posix_acl;
    let notifier = fs.notifier.clone();
    let session = fuser::Session::new(fs, mountpoint, &config(opts))
        .with_context(|| format!("mounting FUSE at {}", mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    mounted();
    // Once the session below answers (its stat waits for that).
    let mp = mountpoint.to_path_buf();
    let _ = std::thread::Builder::new()
        .name("hapair-readahead".to_string())
        .spawn(move || raise_readahead(&mp));
    session
        .run()
        .with_context(|| format!("serving the FUSE mount at {}", mountpoint.display()))
}

/// A mount served by background threads. Dropping it unmounts too.
pub struct MountHandle {
    unmounter: fuser::SessionUnmounter,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    mountpoint: PathBuf,
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the serving threads to end. If files are still
    /// open on the mount (EBUSY), the mount is detached lazily instead: it
    /// disappears from the namespace now, the open files keep working (and
    /// being replicated) until they are closed, and the serving threads end
    /// then, in the background.
    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> anyhow::Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // Taking the mount out of the session means fuser will never try to
        // unmount this mountpoint again later (by then something else may be
        // mounted there, e.g. our own successor).
        match self.unmounter.unmount() {
            Ok(()) => match thread.join() {
                Ok(Ok(())) => Ok(()),
                // Unmounting while requests are in flight can end a
                // worker's read with ECONNABORTED instead of ENODEV: the
                // end this unmount asked for.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!(
                    "FUSE session of {} ended with an error",
                    self.mountpoint.display()
                ))),
                Err(_) => anyhow::bail!(
                    "FUSE session thread of {} panicked",
                    self.mountpoint.display()
                ),
            },
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(
                    mountpoint = %self.mountpoint.display(),
                    "mount busy: detaching lazily; it is served until its last file is closed"
                );
                nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                    .with_context(|| format!("lazy unmount of {}", self.mountpoint.display()))?;
                // Reap the session when its last user is gone.
                std::thread::spawn(move || {
                    let _ = thread.join();
                });
                Ok(())
            }
            Err(e) => {
                // The session keeps serving whatever is still attached.
                std::thread::spawn(move || {
                    let _ = thread.join();
                });
                Err(anyhow::Error::new(e)
                    .context(format!("unmounting {}", self.mountpoint.display())))
            }
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed");
        }
    }
}

/// Mounts `fs` on `mountpoint` and serves it from background threads.
pub fn mount_background(
    mut fs: ReplicaFs,
    mountpoint: &Path,
    opts: &MountOptions,
) -> anyhow::Result<MountHandle> {
    fs.writeback_cache = opts.writeback_cache;
    fs.posix_acl = opts.posix_acl;
    let notifier = fs.notifier.clone();
    let mut session = fuser::Session::new(fs, mountpoint, &config(opts))
        .with_context(|| format!("mounting FUSE at {}", mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    let unmounter = session.unmount_callable();
    let thread = std::thread::Builder::new()
        .name("hapair-fuse".to_string())
        .spawn(move || session.run())
        .context("spawning the FUSE session thread")?;
    raise_readahead(mountpoint);
    Ok(MountHandle {
        unmounter,
        thread: Some(thread),
        mountpoint: mountpoint.to_path_buf(),
    })
}

/// The read-ahead the mount gets: the largest read request the kernel sends
/// (max_pages, 1 MiB). FUSE starts with 128 KiB, which the kernel turns into
/// 256 KiB reads, one at a time: a large read then comes from the disk
/// (directly, see `direct`) 256 KiB after 256 KiB, and a disk at queue depth
/// one is much slower for those than for 1 MiB reads.
const READ_AHEAD_KB: u64 = 1024;

/// Raises the read-ahead of the FUSE mount at `mountpoint` to
/// `READ_AHEAD_KB` (never lowers it). The kernel sets it when the session
/// answers INIT, so this runs after: the stat below waits for the session.
/// Best effort: sysfs may be read-only (a container), and a mount that is
/// not (or no longer) a FUSE mount is left alone, so that the read-ahead of
/// the disk underneath is never touched.
fn raise_readahead(mountpoint: &Path) {
    let r = (|| -> anyhow::Result<Option<(PathBuf, u64)>> {
        use std::os::unix::fs::MetadataExt;
        let st = std::fs::metadata(mountpoint)?;
        let sfs = nix::sys::statfs::statfs(mountpoint)?;
        let fuse = sfs.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC;
        let (major, minor) = (libc::major(st.dev()), libc::minor(st.dev()));
        if !fuse || major != 0 {
            return Ok(None);
        }
        let knob = PathBuf::from(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"));
        let now: u64 = std::fs::read_to_string(&knob)
            .with_context(|| format!("reading {}", knob.display()))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {}", knob.display()))?;
        if now < READ_AHEAD_KB {
            std::fs::write(&knob, READ_AHEAD_KB.to_string())
                .with_context(|| format!("writing {}", knob.display()))?;
        }
        Ok(Some((knob, now)))
    })();
    match r {
        Ok(Some((knob, was))) => tracing::debug!(
            knob = %knob.display(), was, "read-ahead of the mount: {} KiB", was.max(READ_AHEAD_KB)
        ),
        Ok(None) => tracing::warn!(
            mountpoint = %mountpoint.display(),
            "not a FUSE mount when its read-ahead was to be raised; left alone"
        ),
        Err(e) => tracing::info!(
            mountpoint = %mountpoint.display(),
            "cannot raise the read-ahead of the mount ({e:#}); large reads are slower"
        ),
    }
}

/// For restarts: if `dir` is a dead FUSE mount (ENOTCONN), lazily
/// unmount it. Returns whether it did.
pub fn clear_stale_mount(dir: &Path) -> anyhow::Result<bool> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", dir.display()))?;
    // statfs always asks the daemon (stat may be answered from the kernel's
    // attribute cache for a while after the daemon died).
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: valid C string, writable struct.
    let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if r == 0 {
        return Ok(false);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOTCONN) {
        return Ok(false);
    }
    nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("lazy unmount of the dead FUSE mount at {}", dir.display()))?;
    Ok(true)
}
