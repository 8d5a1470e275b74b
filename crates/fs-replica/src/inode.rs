//! The inode table: FUSE inode numbers ↔ backing objects, lookup counts, and
//! the names each inode is known by (so the path of any inode can be computed
//! for the operation stream).
//!
//! Invariants:
//! - One table entry per backing identity `(st_dev, st_ino)`; hard links are
//!   one entry with several names.
//! - An entry stays while the kernel holds lookups on it OR while it is the
//!   parent of a name of another entry (`nchildren > 0`), so the path of every
//!   entry that has a name can always be computed. The root never leaves.
//! - `children` and the `names` of the entries describe the same set of
//!   (parent, name) → entry edges.
//!
//! The table is plain data (no I/O); the caller owns the locks.

use hapair_proto::RelPath;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// FUSE inode number of the root.
pub(crate) const ROOT: u64 = 1;

/// First number of the synthetic range, used when the backing inode number
/// cannot serve as the FUSE inode number (other device, collision, 0 or 1).
const SYNTH_BASE: u64 = 1 << 63;

pub(crate) struct Node {
    /// `O_PATH` fd on the backing object (the root: the backing dir fd).
    pub fd: Arc<OwnedFd>,
    pub dev: u64,
    pub bino: u64,
    /// `S_IFMT` bits.
    pub kind: u32,
    pub lookups: u64,
    /// The (parent, name) edges known for this inode.
    pub names: Vec<(u64, Vec<u8>)>,
    /// How many names of other entries have this entry as parent.
    pub nchildren: u64,
    /// The object is known to have no `security.capability` attribute. The
    /// kernel asks for it before every write; only a setxattr through the
    /// mount can add one (it clears this), so the answer can come from here.
    pub no_caps: bool,
}

pub(crate) struct InodeTable {
    nodes: HashMap<u64, Node>,
    by_id: HashMap<(u64, u64), u64>,
    children: HashMap<(u64, Vec<u8>), u64>,
    root_dev: u64,
    next_synth: u64,
}

impl InodeTable {
    pub fn new(root_fd: OwnedFd, root_st: &libc::stat) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                fd: Arc::new(root_fd),
                dev: root_st.st_dev,
                bino: root_st.st_ino,
                kind: root_st.st_mode & libc::S_IFMT,
                lookups: 1,
                names: Vec::new(),
                nchildren: 0,
                no_caps: false,
            },
        );
        let mut by_id = HashMap::new();
        by_id.insert((root_st.st_dev, root_st.st_ino), ROOT);
        InodeTable {
            nodes,
            by_id,
            children: HashMap::new(),
            root_dev: root_st.st_dev,
            next_synth: SYNTH_BASE,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The entry currently known under (parent, name), if any.
    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.children.get(&(parent, name.to_vec())).copied()
    }

    pub fn by_identity(&self, dev: u64, bino: u64) -> Option<u64> {
        self.by_id.get(&(dev, bino)).copied()
    }

    /// The FUSE inode number of a backing object: its own inode number when
    /// that is unambiguous (same device as the root), so `stat` and `readdir`
    /// show the backing numbers; a synthetic number otherwise.
    fn alloc_ino(&mut self, dev: u64, bino: u64) -> u64 {
        if dev == self.root_dev
            && bino > ROOT
            && bino < SYNTH_BASE
            && !self.nodes.contains_key(&bino)
        {
            return bino;
        }
        loop {
            let n = self.next_synth;
            self.next_synth = self.next_synth.wrapping_add(1).max(SYNTH_BASE);
            if !self.nodes.contains_key(&n) {
                return n;
            }
        }
    }

    /// Registers `name` in `parent` as a name of the object `fd`/`st`, adding
    /// `lookups` kernel references. Reuses the existing entry of the same
    /// identity (the new fd is then dropped). Returns the FUSE inode number.
    pub fn insert(
        &mut self,
        fd: OwnedFd,
        st: &libc::stat,
        parent: u64,
        name: &[u8],
        lookups: u64,
    ) -> u64 {
        let ino = match self.by_id.get(&(st.st_dev, st.st_ino)) {
            Some(&ino) => ino,
            None => {
                let ino = self.alloc_ino(st.st_dev, st.st_ino);
                self.nodes.insert(
                    ino,
                    Node {
                        fd: Arc::new(fd),
                        dev: st.st_dev,
                        bino: st.st_ino,
                        kind: st.st_mode & libc::S_IFMT,
                        lookups: 0,
                        names: Vec::new(),
                        nchildren: 0,
                        no_caps: false,
                    },
                );
                self.by_id.insert((st.st_dev, st.st_ino), ino);
                ino
            }
        };
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups += lookups;
        }
        self.add_name(ino, parent, name);
        ino
    }

    /// Adds the edge (parent, name) → ino. An edge of that name to another
    /// entry is stale (the caller knows better) and is removed first.
    pub fn add_name(&mut self, ino: u64, parent: u64, name: &[u8]) {
        let key = (parent, name.to_vec());
        match self.children.get(&key) {
            Some(&cur) if cur == ino => return,
            Some(_) => {
                self.remove_name(parent, name);
            }
            None => {}
        }
        if !self.nodes.contains_key(&ino) || !self.nodes.contains_key(&parent) {
            return;
        }
        self.children.insert(key, ino);
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.names.push((parent, name.to_vec()));
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.nchildren += 1;
        }
    }

    /// Removes the edge (parent, name). Returns the entry it named.
    pub fn remove_name(&mut self, parent: u64, name: &[u8]) -> Option<u64> {
        let ino = self.children.remove(&(parent, name.to_vec()))?;
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.names.retain(|(p, nm)| !(*p == parent && nm == name));
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.nchildren = p.nchildren.saturating_sub(1);
        }
        self.maybe_evict(parent);
        self.maybe_evict(ino);
        Some(ino)
    }

    /// Moves the edge (p1, n1) to (p2, n2) for the same entry.
    pub fn rename_name(&mut self, p1: u64, n1: &[u8], p2: u64, n2: &[u8]) {
        let Some(ino) = self.children.get(&(p1, n1.to_vec())).copied() else {
            return;
        };
        // Pin the entry while its only name moves.
        self.add_lookup(ino, 1);
        self.remove_name(p1, n1);
        self.add_name(ino, p2, n2);
        self.forget(ino, 1);
    }

    /// Swaps the entries named (p1, n1) and (p2, n2) (RENAME_EXCHANGE).
    pub fn exchange_names(&mut self, p1: u64, n1: &[u8], p2: u64, n2: &[u8]) {
        let a = self.child(p1, n1);
        let b = self.child(p2, n2);
        // Pin both while their names are detached.
        for x in [a, b].into_iter().flatten() {
            self.add_lookup(x, 1);
        }
        self.remove_name(p1, n1);
        self.remove_name(p2, n2);
        if let Some(a) = a {
            self.add_name(a, p2, n2);
        }
        if let Some(b) = b {
            self.add_name(b, p1, n1);
        }
        for x in [a, b].into_iter().flatten() {
            self.forget(x, 1);
        }
    }

    pub fn add_lookup(&mut self, ino: u64, n: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups += n;
        }
    }

    /// Drops `n` kernel references (never below zero, never the root).
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.maybe_evict(ino);
    }

    /// Removes entries nobody references any more, and then the parents they
    /// were pinning.
    fn maybe_evict(&mut self, ino: u64) {
        let mut work = vec![ino];
        while let Some(ino) = work.pop() {
            if ino == ROOT {
                continue;
            }
            let unused = match self.nodes.get(&ino) {
                Some(n) => n.lookups == 0 && n.nchildren == 0,
                None => false,
            };
            if !unused {
                continue;
            }
            let Some(node) = self.nodes.remove(&ino) else {
                continue;
            };
            if self.by_id.get(&(node.dev, node.bino)) == Some(&ino) {
                self.by_id.remove(&(node.dev, node.bino));
            }
            for (parent, name) in node.names {
                if self.children.get(&(parent, name.clone())) == Some(&ino) {
                    self.children.remove(&(parent, name));
                }
                if let Some(p) = self.nodes.get_mut(&parent) {
                    p.nchildren = p.nchildren.saturating_sub(1);
                    work.push(parent);
                }
            }
        }
    }

    /// The path of `ino` from the root through its known names, or `None`
    /// when it has none (an unlinked file that is still open).
    ///
    /// Errors are `ENAMETOOLONG` when the path exceeds the protocol's limit.
    pub fn path(&self, ino: u64) -> Result<Option<RelPath>, fuser::Errno> {
        let mut comps: Vec<Vec<u8>> = Vec::new();
        let mut cur = ino;
        // Bounded: a path cannot have more components than the protocol's
        // 64 KiB limit allows (each takes at least 2 bytes); this also guards
        // against a cycle that a bug could create.
        const MAX_DEPTH: usize = 64 * 1024 / 2 + 2;
        let max_depth = MAX_DEPTH;
        while cur != ROOT {
            if comps.len() > max_depth {
                return Err(fuser::Errno::ENAMETOOLONG);
            }
            let Some(node) = self.nodes.get(&cur) else {
                return Ok(None);
            };
            let Some((parent, name)) = node.names.iter().find(|(p, _)| self.nodes.contains_key(p))
            else {
                return Ok(None);
            };
            comps.push(name.clone());
            cur = *parent;
        }
        comps.reverse();
        RelPath::from_components(comps)
            .map(Some)
            .map_err(|_| fuser::Errno::ENAMETOOLONG)
    }

    /// Parent and name of one of `ino`'s names.
    pub fn any_name(&self, ino: u64) -> Option<(u64, Vec<u8>)> {
        let node = self.nodes.get(&ino)?;
        node.names
            .iter()
            .find(|(p, _)| self.nodes.contains_key(p))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn stat_of(fd: &OwnedFd) -> libc::stat {
        crate::sys::fstat(fd.as_fd()).unwrap()
    }

    fn open(p: &std::path::Path) -> OwnedFd {
        std::fs::File::open(p).unwrap().into()
    }

    #[test]
    fn names_paths_and_eviction() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"x").unwrap();
        let root = open(dir.path());
        let rst = stat_of(&root);
        let mut t = InodeTable::new(root, &rst);
        let dfd = open(&dir.path().join("d"));
        let dst = stat_of(&dfd);
        let d = t.insert(dfd, &dst, ROOT, b"d", 1);
        let ffd = open(&dir.path().join("d/f"));
        let fst = stat_of(&ffd);
        let f = t.insert(ffd, &fst, d, b"f", 1);
        assert_eq!(f, fst.st_ino);
        assert_eq!(t.path(f).unwrap().unwrap().to_bytes(), b"d/f".to_vec());
        // A second name of the same identity is the same entry.
        let ffd2 = open(&dir.path().join("d/f"));
        assert_eq!(t.insert(ffd2, &fst, ROOT, b"g", 1), f);
        // The directory is pinned by its child even after the kernel forgets it.
        t.forget(d, 1);
        assert!(t.get(d).is_some());
        t.remove_name(d, b"f");
        assert!(t.get(d).is_none(), "unpinned parent evicted");
        assert_eq!(t.path(f).unwrap().unwrap().to_bytes(), b"g".to_vec());
        t.remove_name(ROOT, b"g");
        assert_eq!(t.path(f).unwrap(), None);
        t.forget(f, 5);
        assert!(t.get(f).is_none());
        t.forget(ROOT, 10);
        assert!(t.get(ROOT).is_some());
        assert_eq!(t.len(), 1);
    }
}
