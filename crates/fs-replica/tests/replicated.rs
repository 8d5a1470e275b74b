//! In-process replication: every recorded op is applied, in order, to a
//! second directory; after the workload the two trees must be equal.

mod common;

use common::*;
use hapair_fs_replica::Replicator;
use hapair_proto::{Op, Seq};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Applies each op to the replica as it is recorded (under the filesystem's
/// ordering lock, so in execution order).
struct LocalReplica {
    root: OwnedFd,
    seq: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Answers `waits_for_each_call` (strict mode).
    strict: bool,
    /// The offset and length of every write recorded.
    writes: Mutex<Vec<(u64, usize)>>,
}

impl LocalReplica {
    fn new(root: OwnedFd, strict: bool) -> Arc<LocalReplica> {
        Arc::new(LocalReplica {
            root,
            seq: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            strict,
            writes: Mutex::new(Vec::new()),
        })
    }
}

impl Replicator for LocalReplica {
    fn record(&self, op: Op, payload: &[u8]) -> Seq {
        op.validate(payload.len()).expect("valid op");
        if let Op::Write { offset, .. } = &op {
            self.writes.lock().unwrap().push((*offset, payload.len()));
        }
        if let Err(e) = replay::apply(self.root.as_raw_fd(), &op, payload) {
            self.errors.lock().unwrap().push(format!("{op:?}: {e}"));
        }
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn waits_for_each_call(&self) -> bool {
        self.strict
    }
    fn after_mutation(&self, _seq: Seq) -> Result<(), i32> {
        Ok(())
    }
    fn durability_point(&self) -> Result<(), i32> {
        Ok(())
    }
}

#[test]
fn workload_replicates_to_an_identical_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (b, r, mnt) = (
        dir.path().join("backing"),
        dir.path().join("replica"),
        dir.path().join("mnt"),
    );
    for p in [&b, &r, &mnt] {
        std::fs::create_dir(p).unwrap();
    }
    let repl = LocalReplica::new(open_dir(&r), false);
    let m = mount(&b, &mnt, repl.clone());
    workload::run(&m.mnt);
    // Concurrent writers and renamers: the stream order must still replay.
    std::thread::scope(|s| {
        for t in 0..4 {
            let mnt = m.mnt.clone();
            s.spawn(move || {
                let d = mnt.join(format!("conc{t}"));
                std::fs::create_dir(&d).unwrap();
                for i in 0..200 {
                    let p = d.join(format!("f{}", i % 7));
                    std::fs::write(&p, format!("{t}-{i}")).unwrap();
                    if i % 3 == 0 {
                        std::fs::rename(&p, d.join(format!("f{}", (i + 1) % 7))).unwrap();
                    }
                    if i % 50 == 0 {
                        std::fs::rename(&d, mnt.join(format!("conc{t}-tmp"))).unwrap();
                        std::fs::rename(mnt.join(format!("conc{t}-tmp")), &d).unwrap();
                    }
                }
            });
        }
    });
    m.unmount();
    let errors = repl.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "replay errors: {errors:#?}");
    let (tb, tr) = (
        replay::scan(open_dir(&b).as_raw_fd()),
        replay::scan(open_dir(&r).as_raw_fd()),
    );
    assert!(tb.len() > 3000);
    let mut diffs = Vec::new();
    for (p, e) in &tb {
        match tr.get(p) {
            None => diffs.push(format!(
                "missing on replica: {}",
                String::from_utf8_lossy(p)
            )),
            Some(x) if x != e => diffs.push(format!(
                "{}:\n  backing {e:?}\n  replica {x:?}",
                String::from_utf8_lossy(p)
            )),
            _ => {}
        }
    }
    for p in tr.keys().filter(|p| !tb.contains_key(*p)) {
        diffs.push(format!("extra on replica: {}", String::from_utf8_lossy(p)));
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    // The root's own attributes too (its mtime comes from parent_mtime).
    let (sb, sr) = (
        std::fs::metadata(&b).unwrap(),
        std::fs::metadata(&r).unwrap(),
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!((sb.mtime(), sb.mtime_nsec()), (sr.mtime(), sr.mtime_nsec()));
}

/// In strict mode a large write is written and recorded in 256 KiB pieces,
/// in order, so the mirror applies the first while the next are written;
/// otherwise (an O_SYNC handle too) in one op. The replica ends identical
/// either way.
#[test]
fn large_writes_that_wait_are_recorded_in_pieces() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const K: u64 = 1024;
    let data: Vec<u8> = (0..(1 << 20) + 8 * 1024)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let pieces = vec![
        (0, 256 << 10),
        (256 * K, 256 << 10),
        (512 * K, 256 << 10),
        (768 * K, 256 << 10),
    ];
    for (strict, o_sync, want_big) in [
        (false, false, vec![(0, 1 << 20)]),
        (true, false, pieces),
        (false, true, vec![(0, 1 << 20)]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (b, r, mnt) = (
            dir.path().join("backing"),
            dir.path().join("replica"),
            dir.path().join("mnt"),
        );
        for p in [&b, &r, &mnt] {
            std::fs::create_dir(p).unwrap();
        }
        let repl = LocalReplica::new(open_dir(&r), strict);
        let m = mount(&b, &mnt, repl.clone());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(if o_sync { libc::O_SYNC } else { 0 })
            .open(m.mnt.join("big"))
            .unwrap();
        f.write_all(&data).unwrap();
        drop(f);
        m.unmount();
        let case = format!("strict {strict}, O_SYNC {o_sync}");
        assert!(repl.errors.lock().unwrap().is_empty(), "{case}");
        let mut want = want_big;
        // The last 8 KiB is too small to go directly: one op.
        want.push((1 << 20, 8 << 10));
        assert_eq!(*repl.writes.lock().unwrap(), want, "{case}");
        assert_eq!(std::fs::read(b.join("big")).unwrap(), data, "{case}");
        assert_eq!(std::fs::read(r.join("big")).unwrap(), data, "{case}");
    }
}
