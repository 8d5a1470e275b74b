//! Mounts the passthrough with a replicator that only validates and counts
//! the ops (for running external suites such as pjdfstest against the mount).
//!
//! Usage: passthrough BACKING_DIR MOUNTPOINT [REPLICA_DIR]
//! (unmount with `umount MOUNTPOINT`). With REPLICA_DIR, every op is also
//! applied there by the test-only applier, and failures are printed.

use hapair_fs_replica::{mount_blocking, MountOptions, ReplicaFs, Replicator};
use hapair_proto::{Op, Seq};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[path = "../tests/common/replay.rs"]
#[allow(dead_code)]
mod replay;

#[derive(Default)]
struct Counting {
    seq: AtomicU64,
    invalid: AtomicU64,
    replica: Option<OwnedFd>,
    replay_errors: AtomicU64,
}

impl Replicator for Counting {
    fn record(&self, op: Op, payload: &[u8]) -> Seq {
        if let Err(e) = op.validate(payload.len()) {
            self.invalid.fetch_add(1, Ordering::SeqCst);
            eprintln!("INVALID op {op:?}: {e}");
        }
        if let Some(r) = &self.replica {
            if let Err(e) = replay::apply(r.as_raw_fd(), &op, payload) {
                self.replay_errors.fetch_add(1, Ordering::SeqCst);
                eprintln!("REPLAY FAILED {op:?}: {e}");
            }
        }
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn after_mutation(&self, _seq: Seq) -> Result<(), i32> {
        Ok(())
    }
    fn durability_point(&self) -> Result<(), i32> {
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 3 || args.len() == 4,
        "usage: passthrough BACKING_DIR MOUNTPOINT [REPLICA_DIR]"
    );
    let backing: OwnedFd = std::fs::File::open(&args[1])?.into();
    let replica = match args.get(3) {
        Some(p) => Some(OwnedFd::from(std::fs::File::open(p)?)),
        None => None,
    };
    let repl = Arc::new(Counting {
        replica,
        ..Default::default()
    });
    let fs = ReplicaFs::new(backing, repl.clone())?;
    mount_blocking(fs, std::path::Path::new(&args[2]), &MountOptions::default())?;
    eprintln!(
        "unmounted: {} ops recorded, {} invalid, {} failed to replay",
        repl.seq.load(Ordering::SeqCst),
        repl.invalid.load(Ordering::SeqCst),
        repl.replay_errors.load(Ordering::SeqCst)
    );
    Ok(())
}
