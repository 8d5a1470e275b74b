//! The full-synchronisation planner: given the mount's tree listing, the
//! mirror's, and what the journal says changed, decide the actions that make
//! the mirror's tree equal to the mount's.
//!
//! Order of the plan (the executor sends it in this order):
//! 1. removals on the mirror, deepest paths first (so directories are empty
//!    when their turn comes);
//! 2. creations and updates in the mount's pre-order (parents first);
//! 3. directory timestamps in post-order (children's changes bump a
//!    directory's mtime, so they must be set last).

use crate::journal::DirtySet;
use hapair_proto::{EntryKind, ManifestEntry, RelPath, Timestamp};
use std::collections::{BTreeSet, HashMap, HashSet};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncAction {
    /// Remove the mirror's entry (unlink, or rmdir for a directory).
    Remove {
        path: RelPath,
        kind: EntryKind,
    },
    /// Create a directory with the entry's mode and owner.
    MakeDir(ManifestEntry),
    /// Create the file (empty), copy its whole content from the mount, then
    /// set size, owner, mode and mtime.
    CopyFile(ManifestEntry),
    /// Another name for a file copied earlier in the plan.
    Link {
        existing: RelPath,
        new: RelPath,
    },
    MakeSymlink(ManifestEntry),
    /// FIFO, socket or device node.
    MakeNode(ManifestEntry),
    /// Owner and mode (and, for non-directories, mtime) differ.
    SetAttrs(ManifestEntry),
    /// Make the mirror's extended attributes equal to these.
    SetXattrs {
        path: RelPath,
        set: Vec<(Vec<u8>, Vec<u8>)>,
        remove: Vec<Vec<u8>>,
    },
    /// A directory's final mtime.
    SetDirTime {
        path: RelPath,
        mtime: Timestamp,
    },
}

/// Statistics of a plan, for logs and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub removed: u64,
    pub copied_files: u64,
    pub copied_bytes: u64,
    pub created_other: u64,
    pub attr_updates: u64,
}

pub fn stats(plan: &[SyncAction]) -> PlanStats {
    let mut s = PlanStats::default();
    for a in plan {
        match a {
            SyncAction::Remove { .. } => s.removed += 1,
            SyncAction::CopyFile(e) => {
                s.copied_files += 1;
                s.copied_bytes += e.size;
            }
            SyncAction::MakeDir(_)
            | SyncAction::Link { .. }
            | SyncAction::MakeSymlink(_)
            | SyncAction::MakeNode(_) => s.created_other += 1,
            SyncAction::SetAttrs(_)
            | SyncAction::SetXattrs { .. }
            | SyncAction::SetDirTime { .. } => s.attr_updates += 1,
        }
    }
    s
}

fn same_owner_mode(a: &ManifestEntry, b: &ManifestEntry) -> bool {
    a.mode == b.mode && a.uid == b.uid && a.gid == b.gid
}

/// Names of each hard-link group in a listing.
fn link_groups(entries: &[ManifestEntry]) -> HashMap<u64, BTreeSet<RelPath>> {
    let mut g: HashMap<u64, BTreeSet<RelPath>> = HashMap::new();
    for e in entries {
        if let (EntryKind::File, Some(id)) = (e.kind, e.link_group) {
            g.entry(id).or_default().insert(e.path.clone());
        }
    }
    g
}

fn names_of(e: &ManifestEntry, groups: &HashMap<u64, BTreeSet<RelPath>>) -> BTreeSet<RelPath> {
    match e.link_group.and_then(|id| groups.get(&id)) {
        Some(names) if e.kind == EntryKind::File => names.clone(),
        _ => BTreeSet::from([e.path.clone()]),
    }
}

/// Computes the plan. `local` and `remote` must each hold every entry of
/// their tree, the root (empty path) included, parents before children.
pub fn plan(
    local: &[ManifestEntry],
    remote: &[ManifestEntry],
    dirty: &DirtySet,
) -> Vec<SyncAction> {
    let remote_by_path: HashMap<&RelPath, &ManifestEntry> =
        remote.iter().map(|e| (&e.path, e)).collect();
    let local_by_path: HashMap<&RelPath, &ManifestEntry> =
        local.iter().map(|e| (&e.path, e)).collect();
    let local_groups = link_groups(local);
    let remote_groups = link_groups(remote);

    // Decide, for each local path, whether the mirror's entry can stay.
    // `recreate` holds local paths whose mirror entry (if any) must go.
    let mut recreate: HashSet<RelPath> = HashSet::new();
    for l in local {
        if l.path.is_root() {
            continue;
        }
        let Some(r) = remote_by_path.get(&l.path) else {
            recreate.insert(l.path.clone());
            continue;
        };
        let keep = l.kind == r.kind
            && match l.kind {
                EntryKind::Dir => true,
                EntryKind::Symlink => l.target == r.target,
                EntryKind::CharDev | EntryKind::BlockDev => l.rdev == r.rdev,
                EntryKind::Fifo | EntryKind::Socket => true,
                EntryKind::File => {
                    l.size == r.size
                        && l.mtime == r.mtime
                        && match (l.content_hash, r.content_hash) {
                            (Some(a), Some(b)) => a == b,
                            _ => !dirty.covers(&l.path),
                        }
                        && names_of(l, &local_groups) == names_of(r, &remote_groups)
                }
            };
        if !keep {
            recreate.insert(l.path.clone());
        }
    }
    // A hard-link group is recreated whole if any of its names is.
    for names in local_groups.values() {
        if names.iter().any(|n| recreate.contains(n)) {
            recreate.extend(names.iter().cloned());
        }
    }

    let mut actions = Vec::new();

    // 1. Removals, deepest first.
    let mut removals: Vec<&ManifestEntry> = remote
        .iter()
        .filter(|r| !r.path.is_root())
        .filter(|r| !local_by_path.contains_key(&r.path) || recreate.contains(&r.path))
        .collect();
    removals.sort_by(|a, b| {
        b.path
            .components()
            .len()
            .cmp(&a.path.components().len())
            .then(a.path.cmp(&b.path))
    });
    // A removed directory's children that exist locally (kind changed from
    // dir to dir is impossible; dir to file means the local side has no
    // children) are all in the list already, deeper, so they go first.
    let mut touched_dirs: HashSet<RelPath> = HashSet::new();
    for r in removals {
        if let Some((parent, _)) = r.path.split_last() {
            touched_dirs.insert(parent);
        }
        actions.push(SyncAction::Remove {
            path: r.path.clone(),
            kind: r.kind,
        });
    }

    // 2. Creations and updates, parents first.
    let mut materialised_groups: HashMap<u64, RelPath> = HashMap::new();
    for l in local {
        let remote_entry = remote_by_path
            .get(&l.path)
            .filter(|_| !recreate.contains(&l.path));
        match remote_entry {
            None if !l.path.is_root() => {
                if let Some((parent, _)) = l.path.split_last() {
                    touched_dirs.insert(parent);
                }
                match l.kind {
                    EntryKind::Dir => actions.push(SyncAction::MakeDir(l.clone())),
                    EntryKind::File => {
                        if let Some(first) = l.link_group.and_then(|g| materialised_groups.get(&g))
                        {
                            actions.push(SyncAction::Link {
                                existing: first.clone(),
                                new: l.path.clone(),
                            });
                            continue;
                        }
                        if let Some(g) = l.link_group {
                            materialised_groups.insert(g, l.path.clone());
                        }
                        actions.push(SyncAction::CopyFile(l.clone()));
                    }
                    EntryKind::Symlink => actions.push(SyncAction::MakeSymlink(l.clone())),
                    _ => actions.push(SyncAction::MakeNode(l.clone())),
                }
                if !l.xattrs.is_empty() {
                    actions.push(SyncAction::SetXattrs {
                        path: l.path.clone(),
                        set: l.xattrs.clone(),
                        remove: vec![],
                    });
                }
            }
            None => {}
            Some(r) => {
                let attrs_differ =
                    !same_owner_mode(l, r) || (l.kind != EntryKind::Dir && l.mtime != r.mtime);
                // Hard links share attributes: update them through one name only.
                let first_of_group = match l.link_group {
                    Some(g) => {
                        let first = !materialised_groups.contains_key(&g);
                        materialised_groups
                            .entry(g)
                            .or_insert_with(|| l.path.clone());
                        first
                    }
                    None => true,
                };
                if attrs_differ && first_of_group {
                    actions.push(SyncAction::SetAttrs(l.clone()));
                }
                if l.xattrs != r.xattrs && first_of_group {
                    let remove = r
                        .xattrs
                        .iter()
                        .filter(|(n, _)| !l.xattrs.iter().any(|(ln, _)| ln == n))
                        .map(|(n, _)| n.clone())
                        .collect();
                    let set = l
                        .xattrs
                        .iter()
                        .filter(|x| !r.xattrs.contains(x))
                        .cloned()
                        .collect();
                    actions.push(SyncAction::SetXattrs {
                        path: l.path.clone(),
                        set,
                        remove,
                    });
                }
            }
        }
    }

    // 3. Directory times, children before parents.
    for l in local.iter().rev() {
        if l.kind != EntryKind::Dir {
            continue;
        }
        let remote_mtime = remote_by_path
            .get(&l.path)
            .filter(|_| !recreate.contains(&l.path))
            .map(|r| r.mtime);
        if remote_mtime != Some(l.mtime)
            || touched_dirs.contains(&l.path)
            || recreate.contains(&l.path)
        {
            actions.push(SyncAction::SetDirTime {
                path: l.path.clone(),
                mtime: l.mtime,
            });
        }
    }
    actions
}
