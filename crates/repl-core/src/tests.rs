use super::journal::{self, DirtyRecord, DirtySet};
use super::plan::{plan, SyncAction};
use super::*;
use hapair_proto::{EntryKind, ManifestEntry, Op, RelPath, TimeSet, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};

fn cfg(mode: Mode) -> CoreConfig {
    CoreConfig {
        mode,
        max_inflight_bytes: 1000,
        max_inflight_ops: 4,
        max_lag_ms: 100,
        timeout_ms: 5000,
    }
}

#[test]
fn sequencing_and_acks() {
    let mut c = ReplCore::new(cfg(Mode::Sync));
    assert_eq!(c.push(10, 0), 1);
    assert_eq!(c.push(10, 0), 2);
    assert_eq!(c.inflight_ops(), 2);
    assert_eq!(c.on_ack(1, 0), Ok(1));
    assert_eq!(c.inflight_ops(), 1);
    assert_eq!(c.inflight_bytes(), 10);
    assert!(c.on_ack(3, 0).is_err(), "ack beyond sent");
    assert!(c.on_ack(0, 0).is_err(), "ack backwards");
    assert!(c.on_ack(2, 3).is_err(), "durable beyond applied");
    assert_eq!(c.on_ack(2, 2), Ok(2));
    assert_eq!(c.inflight_ops(), 0);
    assert!(c.satisfied(WaitFor::Durable(2)));
    assert!(!c.satisfied(WaitFor::Durable(3)));
}

#[test]
fn waits_by_mode() {
    let sync = ReplCore::new(cfg(Mode::Sync));
    assert_eq!(sync.wait_after_mutation(5), WaitFor::Nothing);
    assert_eq!(sync.wait_for_durability(5), WaitFor::Durable(5));
    let strict = ReplCore::new(cfg(Mode::Strict));
    assert_eq!(strict.wait_after_mutation(5), WaitFor::Applied(5));
    assert_eq!(strict.wait_for_durability(5), WaitFor::Durable(5));
    let asyn = ReplCore::new(cfg(Mode::Async));
    assert_eq!(asyn.wait_after_mutation(5), WaitFor::Nothing);
    assert_eq!(asyn.wait_for_durability(5), WaitFor::Nothing);
}

#[test]
fn backpressure_by_ops_bytes_and_lag() {
    let mut c = ReplCore::new(cfg(Mode::Sync));
    // An empty window always admits, even an op larger than the byte limit.
    assert_eq!(c.admit(5000, 0), Admit::Yes);
    c.push(600, 0);
    assert_eq!(c.admit(400, 0), Admit::Yes);
    assert_eq!(c.admit(401, 0), Admit::Wait, "byte limit");
    for _ in 0..3 {
        c.push(1, 0);
    }
    assert_eq!(c.admit(1, 0), Admit::Wait, "op limit");
    c.on_ack(2, 0).unwrap();
    assert_eq!(
        c.admit(1, 100),
        Admit::Yes,
        "lag exactly at the bound is allowed"
    );
    assert_eq!(c.admit(1, 101), Admit::Wait, "lag bound");
}

#[test]
fn timeout_degrades_at_the_edge_and_releases_waiters() {
    let mut c = ReplCore::new(cfg(Mode::Strict));
    let s = c.push(1, 1000);
    assert!(!c.satisfied(c.wait_after_mutation(s)));
    assert_eq!(c.next_deadline_ms(1000), Some(5001));
    assert!(!c.tick(6000), "exactly the timeout: still waiting");
    assert!(c.tick(6001));
    assert_eq!(c.state(), LinkState::Degraded);
    assert!(c.degraded_reason().unwrap().contains("seq 1"));
    assert!(c.satisfied(WaitFor::Applied(s)));
    assert_eq!(
        c.admit(u64::MAX / 2, 6001),
        Admit::Yes,
        "degraded never blocks"
    );
    assert_eq!(c.push(1, 6002), 2);
    assert_eq!(
        c.inflight_ops(),
        0,
        "degraded ops are journaled, not in flight"
    );
    assert!(!c.tick(99999));
}

#[test]
fn journal_roundtrip_and_torn_tail() {
    let p = RelPath::parse(b"d/f").unwrap();
    let recs = vec![
        DirtyRecord::Range {
            path: p.clone(),
            offset: 10,
            len: 20,
        },
        DirtyRecord::Path {
            path: RelPath::parse(b"d").unwrap(),
        },
        DirtyRecord::Full,
    ];
    let mut buf = Vec::new();
    for r in &recs {
        journal::encode(r, &mut buf);
    }
    let whole = journal::decode_all(&buf);
    assert_eq!(whole.records, recs);
    assert!(!whole.torn_tail);
    // Every truncation yields a prefix of the records, never garbage.
    for cut in 0..buf.len() {
        let d = journal::decode_all(&buf[..cut]);
        assert!(recs.starts_with(&d.records));
        assert!(d.good_bytes <= cut);
    }
    // A flipped bit stops decoding at the damaged record.
    let mut bad = buf.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let d = journal::decode_all(&bad);
    assert_eq!(d.records, recs[..2]);
    assert!(d.torn_tail);
}

#[test]
fn journal_records_for_ops_and_dirty_cover() {
    let t = Timestamp { sec: 0, nsec: 0 };
    let f = RelPath::parse(b"a/b").unwrap();
    let r = journal::records_for(
        &Op::Write {
            path: f.clone(),
            offset: 4096,
            mtime: TimeSet::At(t),
        },
        100,
    );
    assert_eq!(
        r,
        vec![DirtyRecord::Range {
            path: f.clone(),
            offset: 4096,
            len: 100
        }]
    );
    let ren = Op::Rename {
        from: RelPath::parse(b"x").unwrap(),
        to: RelPath::parse(b"y").unwrap(),
        flags: 0,
        from_parent_mtime: None,
        to_parent_mtime: None,
    };
    let set = DirtySet::from_records(&journal::records_for(&ren, 0));
    assert!(
        set.covers(&RelPath::parse(b"y/deep/file").unwrap()),
        "a renamed dir dirties its subtree"
    );
    assert!(!set.covers(&RelPath::parse(b"z").unwrap()));
    assert!(journal::records_for(&Op::Barrier, 0).is_empty());
}

// ---- Planner: a model of a tree, random trees, apply the plan, compare. ----

#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    kind: EntryKind,
    mode: u32,
    uid: u32,
    size: u64,
    mtime: i64,
    content: u64,
    target: Vec<u8>,
    inode: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

type Tree = BTreeMap<RelPath, Node>;

fn entries(t: &Tree) -> Vec<ManifestEntry> {
    let mut nlink: BTreeMap<u64, u32> = BTreeMap::new();
    for n in t.values() {
        if n.kind == EntryKind::File {
            *nlink.entry(n.inode).or_default() += 1;
        }
    }
    // BTreeMap order of RelPath (component-wise) puts parents before children.
    t.iter()
        .map(|(p, n)| ManifestEntry {
            path: p.clone(),
            kind: n.kind,
            mode: n.mode,
            uid: n.uid,
            gid: 0,
            size: n.size,
            mtime: Timestamp {
                sec: n.mtime,
                nsec: 0,
            },
            rdev: 0,
            target: n.target.clone(),
            link_group: (n.kind == EntryKind::File && nlink[&n.inode] > 1).then_some(n.inode),
            xattrs: n.xattrs.clone(),
            content_hash: Some(n.content),
        })
        .collect()
}

fn parent_is_dir(t: &Tree, p: &RelPath) -> bool {
    let (parent, _) = p.split_last().unwrap();
    t.get(&parent)
        .map(|n| n.kind == EntryKind::Dir)
        .unwrap_or(false)
}

/// Applies a plan to a model of the mirror, checking each action is valid
/// when it comes (as the real applier would require).
fn apply(mirror: &mut Tree, actions: &[SyncAction], local: &Tree, next_inode: &mut u64) {
    for a in actions {
        match a {
            SyncAction::Remove { path, kind } => {
                let n = mirror.get(path).expect("removing an entry that exists");
                assert_eq!(n.kind, *kind);
                if *kind == EntryKind::Dir {
                    assert!(
                        !mirror.keys().any(|k| k != path && k.starts_with(path)),
                        "rmdir of non-empty {path}"
                    );
                }
                mirror.remove(path);
            }
            SyncAction::MakeDir(e)
            | SyncAction::CopyFile(e)
            | SyncAction::MakeSymlink(e)
            | SyncAction::MakeNode(e) => {
                assert!(
                    !mirror.contains_key(&e.path),
                    "create over existing {}",
                    e.path
                );
                assert!(
                    parent_is_dir(mirror, &e.path),
                    "parent of {} missing",
                    e.path
                );
                let mut n = local[&e.path].clone();
                *next_inode += 1;
                n.inode = *next_inode;
                n.xattrs = vec![];
                if e.kind == EntryKind::Dir {
                    n.mtime = -1; // set by SetDirTime later
                }
                mirror.insert(e.path.clone(), n);
            }
            SyncAction::Link { existing, new } => {
                assert!(parent_is_dir(mirror, new));
                assert!(!mirror.contains_key(new));
                let n = mirror.get(existing).expect("link source exists").clone();
                mirror.insert(new.clone(), n);
            }
            SyncAction::SetAttrs(e) => {
                let inode = mirror[&e.path].inode;
                for n in mirror.values_mut().filter(|n| n.inode == inode) {
                    n.mode = e.mode;
                    n.uid = e.uid;
                    if e.kind != EntryKind::Dir {
                        n.mtime = e.mtime.sec;
                    }
                }
            }
            SyncAction::SetXattrs { path, set, remove } => {
                let inode = mirror[path].inode;
                for n in mirror.values_mut().filter(|n| n.inode == inode) {
                    n.xattrs
                        .retain(|(k, _)| !remove.contains(k) && !set.iter().any(|(s, _)| s == k));
                    n.xattrs.extend(set.iter().cloned());
                    n.xattrs.sort();
                }
            }
            SyncAction::SetDirTime { path, mtime } => {
                mirror.get_mut(path).expect("dir exists").mtime = mtime.sec;
            }
        }
    }
}

fn random_tree(rng: &mut StdRng, inode_base: u64) -> Tree {
    let mut t = Tree::new();
    let root = Node {
        kind: EntryKind::Dir,
        mode: 0o755,
        uid: 0,
        size: 0,
        mtime: 5,
        content: 0,
        target: vec![],
        inode: inode_base,
        xattrs: vec![],
    };
    t.insert(RelPath::root(), root);
    let names = [b"a".as_slice(), b"b", b"c", b"d"];
    let mut inode = inode_base;
    for _ in 0..rng.random_range(0..25) {
        let dirs: Vec<RelPath> = t
            .iter()
            .filter(|(_, n)| n.kind == EntryKind::Dir)
            .map(|(p, _)| p.clone())
            .collect();
        let parent = &dirs[rng.random_range(0..dirs.len())];
        if parent.components().len() >= 3 {
            continue;
        }
        let path = parent
            .join(names[rng.random_range(0..names.len())])
            .unwrap();
        if t.contains_key(&path) {
            continue;
        }
        inode += 1;
        let kind = match rng.random_range(0..10) {
            0..=3 => EntryKind::Dir,
            4..=7 => EntryKind::File,
            8 => EntryKind::Symlink,
            _ => EntryKind::Fifo,
        };
        let files: Vec<Node> = t
            .values()
            .filter(|n| n.kind == EntryKind::File)
            .cloned()
            .collect();
        let node = if kind == EntryKind::File && !files.is_empty() && rng.random_bool(0.2) {
            files[rng.random_range(0..files.len())].clone() // a hard link
        } else {
            Node {
                kind,
                mode: [0o644, 0o600, 0o755][rng.random_range(0..3)],
                uid: rng.random_range(0..2),
                size: rng.random_range(0..3),
                mtime: rng.random_range(0..3),
                content: rng.random_range(0..3),
                target: if kind == EntryKind::Symlink {
                    vec![b'x' + rng.random_range(0..2u8)]
                } else {
                    vec![]
                },
                inode,
                xattrs: if rng.random_bool(0.3) {
                    vec![(b"user.k".to_vec(), vec![rng.random_range(0..2u8)])]
                } else {
                    vec![]
                },
            }
        };
        let mut node = node;
        if node.kind != EntryKind::File {
            // Only regular files have a size and content worth comparing;
            // a symlink's mode is always 0777 on Linux.
            node.size = 0;
            node.content = 0;
        }
        if node.kind == EntryKind::Symlink {
            node.mode = 0o777;
        }
        t.insert(path, node);
    }
    t
}

/// Two trees are the same if every path has the same node, up to inode
/// numbers, and the same names share inodes.
fn assert_same(local: &Tree, mirror: &Tree, seed: u64) {
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        mirror.keys().collect::<Vec<_>>(),
        "seed {seed}: paths"
    );
    let groups = |t: &Tree| -> BTreeSet<BTreeSet<RelPath>> {
        let mut m: BTreeMap<u64, BTreeSet<RelPath>> = BTreeMap::new();
        for (p, n) in t {
            m.entry(n.inode).or_default().insert(p.clone());
        }
        m.into_values().collect()
    };
    assert_eq!(
        groups(local),
        groups(mirror),
        "seed {seed}: hard-link structure"
    );
    for (p, l) in local {
        let m = &mirror[p];
        let strip = |n: &Node| Node {
            inode: 0,
            ..n.clone()
        };
        assert_eq!(strip(l), strip(m), "seed {seed}: {p}");
    }
}

#[test]
fn planner_makes_random_trees_equal() {
    for seed in 0..3000u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let local = random_tree(&mut rng, 1000);
        let mut mirror = if rng.random_bool(0.3) {
            local.clone() // mostly equal trees, then perturbed
        } else {
            random_tree(&mut rng, 5000)
        };
        if rng.random_bool(0.5) {
            let pick = rng.random_range(0..mirror.len().max(1));
            if let Some((p, n)) = mirror.iter_mut().nth(pick) {
                if !p.is_root() && n.kind == EntryKind::File {
                    n.content += 1;
                }
            }
        }
        let plan_actions = plan(&entries(&local), &entries(&mirror), &DirtySet::default());
        let mut next_inode = 1_000_000;
        apply(&mut mirror, &plan_actions, &local, &mut next_inode);
        assert_same(&local, &mirror, seed);
        // A second plan over equal trees does nothing.
        let again = plan(&entries(&local), &entries(&mirror), &DirtySet::default());
        assert!(
            again.is_empty(),
            "seed {seed}: second plan not empty: {again:?}"
        );
    }
}

#[test]
fn planner_copies_dirty_files_without_hashes() {
    let mut local = random_tree(&mut StdRng::seed_from_u64(7), 1);
    let f = RelPath::parse(b"f").unwrap();
    local.insert(
        f.clone(),
        Node {
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            size: 1,
            mtime: 1,
            content: 1,
            target: vec![],
            inode: 99,
            xattrs: vec![],
        },
    );
    let mut l = entries(&local);
    let mut r = l.clone();
    for e in l.iter_mut().chain(r.iter_mut()) {
        e.content_hash = None;
    }
    assert!(
        plan(&l, &r, &DirtySet::default()).is_empty(),
        "same metadata, not dirty: nothing to do"
    );
    let dirty = DirtySet::from_records(&[DirtyRecord::Range {
        path: f.clone(),
        offset: 0,
        len: 1,
    }]);
    let p = plan(&l, &r, &dirty);
    assert!(
        p.iter()
            .any(|a| matches!(a, SyncAction::CopyFile(e) if e.path == f)),
        "{p:?}"
    );
}

#[test]
fn without_permission_a_degraded_pipeline_holds_its_callers() {
    let mut c = ReplCore::new(cfg(Mode::Strict));
    c.set_alone_allowed(false);
    let s = c.push(1, 0);
    assert!(c.tick(5001), "the mirror stopped answering");
    assert_eq!(c.state(), LinkState::Degraded);
    assert!(
        !c.satisfied(WaitFor::Applied(s)),
        "held: the call must not return without the mirror or a permission"
    );
    assert!(!c.satisfied(WaitFor::Durable(s)));
    assert!(c.satisfied(WaitFor::Nothing));
    assert_eq!(c.admit(1, 5002), Admit::Yes, "held changes are journaled");
    c.set_alone_allowed(true);
    assert!(
        c.satisfied(WaitFor::Applied(s)),
        "the permission releases them"
    );
}

#[test]
fn a_resync_covers_earlier_waits_only_when_it_ends() {
    for allowed in [false, true] {
        let mut c = ReplCore::new(cfg(Mode::Strict));
        c.set_alone_allowed(allowed);
        let before = c.push(1, 0);
        c.degrade("link cut".into());
        let journaled = c.push(1, 10);
        assert_eq!(c.inflight_ops(), 0);
        c.begin_resync();
        assert_eq!(c.state(), LinkState::Resyncing);
        assert_eq!(c.resync_floor(), journaled);
        // The resync's own operations are in flight and acknowledged as usual.
        let op = c.push(10, 20);
        let barrier = c.push(0, 20);
        assert_eq!(op, journaled + 1);
        assert_eq!(c.inflight_ops(), 2);
        // The new session acknowledges from its base: durable starts there.
        c.on_ack(op, journaled).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.satisfied(WaitFor::Applied(op)));
        // An early ack of the first resync op must not release the callers
        // that recorded before the session: only the permission does.
        for s in [before, journaled] {
            assert_eq!(c.satisfied(WaitFor::Applied(s)), allowed, "seq {s}");
            assert_eq!(c.satisfied(WaitFor::Durable(s)), allowed, "seq {s}");
        }
        assert!(!c.satisfied(WaitFor::Durable(barrier)));
        c.on_ack(barrier, barrier).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.satisfied(WaitFor::Durable(barrier)));
        c.end_resync();
        assert_eq!(c.state(), LinkState::Replicating);
        assert_eq!(c.resync_floor(), 0);
        for s in [before, journaled, op, barrier] {
            assert!(c.satisfied(WaitFor::Durable(s)), "seq {s} after the resync");
        }
        // Replication goes on in sequence.
        assert_eq!(c.push(1, 30), barrier + 1);
        assert_eq!(c.inflight_ops(), 1);
    }
}

#[test]
fn a_resync_that_loses_the_mirror_degrades_and_can_start_again() {
    let mut c = ReplCore::new(cfg(Mode::Sync));
    c.degrade("gone".into());
    c.push(1, 0);
    c.begin_resync();
    let s = c.push(5, 10);
    assert!(c.tick(5011), "the resync's ops time out like any other");
    assert_eq!(c.state(), LinkState::Degraded);
    assert_eq!(c.resync_floor(), 0);
    assert_eq!(c.inflight_ops(), 0);
    assert!(c.satisfied(WaitFor::Durable(s)), "allowed alone by default");
    c.begin_resync();
    assert_eq!(c.resync_floor(), s);
}

#[test]
#[should_panic(expected = "final barrier")]
fn a_resync_cannot_end_before_its_barrier_is_durable() {
    let mut c = ReplCore::new(cfg(Mode::Sync));
    c.degrade("gone".into());
    c.begin_resync();
    c.push(1, 0);
    c.end_resync();
}
