//! Shared test helpers: replicators and a mount guard that always unmounts.
#![allow(dead_code)]

pub mod replay;
pub mod workload;

use hapair_fs_replica::{mount_background, MountHandle, MountOptions, ReplicaFs, Replicator};
use hapair_proto::{Op, Seq};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Keeps every op in a Vec and counts the calls.
#[derive(Default)]
pub struct Recorder {
    pub ops: Mutex<Vec<(Seq, Op, Vec<u8>)>>,
    pub next: AtomicU64,
    pub after_calls: AtomicU64,
    pub durability_points: AtomicU64,
}

impl Recorder {
    pub fn ops(&self) -> Vec<Op> {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .map(|(_, o, _)| o.clone())
            .collect()
    }
    pub fn clear(&self) {
        self.ops.lock().unwrap().clear();
    }
}

impl Replicator for Recorder {
    fn record(&self, op: Op, payload: &[u8]) -> Seq {
        let seq = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        op.validate(payload.len()).expect("recorded op is valid");
        self.ops.lock().unwrap().push((seq, op, payload.to_vec()));
        seq
    }
    fn after_mutation(&self, seq: Seq) -> Result<(), i32> {
        assert!(seq <= self.next.load(Ordering::SeqCst));
        self.after_calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn durability_point(&self) -> Result<(), i32> {
        self.durability_points.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A mount that is unmounted when dropped, even when the test panics.
pub struct Mounted {
    pub handle: Option<MountHandle>,
    pub mnt: PathBuf,
}

impl Mounted {
    pub fn unmount(mut self) {
        if let Some(h) = self.handle.take() {
            h.unmount().expect("unmount");
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.unmount();
        }
    }
}

pub fn open_dir(p: &Path) -> OwnedFd {
    std::fs::File::open(p).expect("open backing dir").into()
}

pub fn mount(backing: &Path, mnt: &Path, repl: Arc<dyn Replicator>) -> Mounted {
    let fs = ReplicaFs::new(open_dir(backing), repl).expect("ReplicaFs::new");
    let handle = mount_background(fs, mnt, &MountOptions::default()).expect("mount");
    Mounted {
        handle: Some(handle),
        mnt: mnt.to_path_buf(),
    }
}

/// A child process holds, until its exec, a copy of every descriptor of
/// the test process, other tests' open files included; closing them sends
/// those files a FLUSH. Tests that check what a flush does hold
/// `no_spawns()`; every child is started under `spawning()`.
static SPAWN: std::sync::RwLock<()> = std::sync::RwLock::new(());

pub fn spawning() -> std::sync::RwLockReadGuard<'static, ()> {
    // Never taken twice by one thread: a waiting writer would block the
    // second read for good.
    SPAWN.read().unwrap_or_else(|e| e.into_inner())
}

pub fn no_spawns() -> std::sync::RwLockWriteGuard<'static, ()> {
    SPAWN.write().unwrap_or_else(|e| e.into_inner())
}

/// Runs `cmd` to its end (see `SPAWN`). Panics if it cannot be started.
pub fn output(cmd: &mut std::process::Command) -> std::process::Output {
    let _spawning = spawning();
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Starts `cmd` (see `SPAWN`: the copies are closed by its exec, which
/// `spawn` waits for). Panics if it cannot be started.
pub fn spawn(cmd: &mut std::process::Command) -> std::process::Child {
    let _spawning = spawning();
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Runs a shell command as uid/gid 65534 (nobody:nogroup).
pub fn as_nobody(script: &str) -> std::process::Output {
    let _spawning = spawning();
    std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("run setpriv")
}
