//! The applier keeps written files open between operations (`FdCache`).
//! These tests check that a cached descriptor never outlives the name it
//! was opened by: after an unlink, a rename (of the file or of a directory
//! above it), a replacement or an exchange, writes must land in whatever
//! the path names now, exactly as if every operation opened the path anew.

use super::*;
use hapair_proto::buf::{DIRECT_ALIGN, DIRECT_MIN_BYTES};
use hapair_proto::Timestamp;
use std::collections::HashMap;

pub(crate) const T: Timestamp = Timestamp {
    sec: 1_700_000_000,
    nsec: 0,
};

pub(crate) fn p(s: &str) -> RelPath {
    RelPath::parse(s.as_bytes()).expect("valid test path")
}

pub(crate) fn create(path: &str) -> Op {
    Op::Create {
        path: p(path),
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: T,
        parent_mtime: None,
    }
}

fn write(path: &str, offset: u64) -> Op {
    Op::Write {
        path: p(path),
        offset,
        mtime: TimeSet::At(T),
    }
}

fn rename(from: &str, to: &str, flags: u32) -> Op {
    Op::Rename {
        from: p(from),
        to: p(to),
        flags,
        from_parent_mtime: None,
        to_parent_mtime: None,
    }
}

fn mkdir(path: &str) -> Op {
    Op::Mkdir {
        path: p(path),
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: T,
        parent_mtime: None,
    }
}

fn read(root: &Path, path: &str) -> Vec<u8> {
    std::fs::read(root.join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[test]
fn write_after_unlink_and_recreate_goes_to_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Applier::open(dir.path()).unwrap();
    a.apply(&create("f"), &[]).unwrap();
    a.apply(&write("f", 0), b"old").unwrap();
    // Keep the old inode reachable to see where later writes go.
    a.apply(
        &Op::Link {
            existing: p("f"),
            new: p("keep"),
            parent_mtime: None,
        },
        &[],
    )
    .unwrap();
    a.apply(
        &Op::Unlink {
            path: p("f"),
            parent_mtime: None,
        },
        &[],
    )
    .unwrap();
    a.apply(&create("f"), &[]).unwrap();
    a.apply(&write("f", 0), b"new").unwrap();
    a.apply(&Op::Barrier, &[]).unwrap();
    assert_eq!(read(dir.path(), "f"), b"new");
    assert_eq!(read(dir.path(), "keep"), b"old");
}

#[test]
fn write_after_renaming_the_directory_above_follows_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Applier::open(dir.path()).unwrap();
    a.apply(&mkdir("d"), &[]).unwrap();
    a.apply(&create("d/f"), &[]).unwrap();
    a.apply(&write("d/f", 0), b"one").unwrap();
    a.apply(&rename("d", "e", 0), &[]).unwrap();
    a.apply(&mkdir("d"), &[]).unwrap();
    a.apply(&create("d/f"), &[]).unwrap();
    a.apply(&write("d/f", 0), b"two").unwrap();
    a.apply(&write("e/f", 3), b"+").unwrap();
    a.apply(&Op::Barrier, &[]).unwrap();
    assert_eq!(read(dir.path(), "d/f"), b"two");
    assert_eq!(read(dir.path(), "e/f"), b"one+");
}

#[test]
fn write_after_rename_over_and_exchange_follows_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Applier::open(dir.path()).unwrap();
    for f in ["x", "y"] {
        a.apply(&create(f), &[]).unwrap();
        a.apply(&write(f, 0), f.as_bytes()).unwrap();
    }
    // y now names x's inode; the cached y (old inode) must not be used.
    a.apply(&rename("x", "y", 0), &[]).unwrap();
    a.apply(&write("y", 1), b"1").unwrap();
    a.apply(&create("x"), &[]).unwrap();
    a.apply(&write("x", 0), b"X").unwrap();
    a.apply(&rename("x", "y", hapair_proto::RENAME_EXCHANGE), &[])
        .unwrap();
    a.apply(&write("x", 2), b"2").unwrap();
    a.apply(&write("y", 1), b"Y").unwrap();
    a.apply(&Op::Barrier, &[]).unwrap();
    assert_eq!(read(dir.path(), "x"), b"x12");
    assert_eq!(read(dir.path(), "y"), b"XY");
}

/// A seeded random sequence of creates, writes, links, unlinks and renames
/// over a few names, applied by the applier and to an in-memory model of
/// names and inodes; after every barrier, the mirror's files must hold what
/// the model says. More files than the cache holds, so eviction runs too.
#[test]
fn random_operations_match_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Applier::open(dir.path()).unwrap();
    a.apply(&mkdir("d"), &[]).unwrap();
    let names: Vec<String> = (0..FD_CACHE_ENTRIES + 16)
        .map(|i| {
            if i % 2 == 0 {
                format!("n{i}")
            } else {
                format!("d/n{i}")
            }
        })
        .collect();
    // name -> inode, inode -> content
    let mut name_ino: HashMap<String, u64> = HashMap::new();
    let mut content: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut next_ino = 0u64;
    let mut rng = 0x5eed_u64;
    let mut next = |n: usize| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((rng >> 33) as usize) % n
    };
    for step in 0..4000 {
        let name = names[next(names.len())].clone();
        let exists = name_ino.contains_key(&name);
        match next(6) {
            0 | 1 if exists => {
                let ino = name_ino[&name];
                let c = content.get_mut(&ino).unwrap();
                let off = next(c.len() + 4);
                let data = format!("<{step}>").into_bytes();
                if c.len() < off + data.len() {
                    c.resize(off + data.len(), 0);
                }
                c[off..off + data.len()].copy_from_slice(&data);
                a.apply(&write(&name, off as u64), &data).unwrap();
            }
            0..=2 => {
                // Create (truncates an existing file, as O_TRUNC does).
                let ino = *name_ino.entry(name.clone()).or_insert_with(|| {
                    next_ino += 1;
                    next_ino
                });
                content.insert(ino, Vec::new());
                a.apply(&create(&name), &[]).unwrap();
            }
            3 if exists => {
                name_ino.remove(&name);
                a.apply(
                    &Op::Unlink {
                        path: p(&name),
                        parent_mtime: None,
                    },
                    &[],
                )
                .unwrap();
            }
            4 if exists => {
                let to = names[next(names.len())].clone();
                if to != name {
                    let ino = name_ino.remove(&name).unwrap();
                    name_ino.insert(to.clone(), ino);
                    a.apply(&rename(&name, &to, 0), &[]).unwrap();
                }
            }
            5 if exists => {
                let new = names[next(names.len())].clone();
                if !name_ino.contains_key(&new) {
                    let ino = name_ino[&name];
                    name_ino.insert(new.clone(), ino);
                    a.apply(
                        &Op::Link {
                            existing: p(&name),
                            new: p(&new),
                            parent_mtime: None,
                        },
                        &[],
                    )
                    .unwrap();
                }
            }
            _ => {}
        }
        if step % 97 == 0 || step == 3999 {
            a.apply(&Op::Barrier, &[]).unwrap();
            for n in &names {
                let on_disk = std::fs::read(dir.path().join(n)).ok();
                let want = name_ino.get(n).map(|i| content[i].clone());
                assert_eq!(on_disk, want, "step {step}: content of {n}");
            }
        }
    }
}

/// Large block-aligned writes go to the disk directly (O_DIRECT), others
/// through the page cache, on the same file and in any order: the file
/// must hold exactly what was written, last write winning. Also in a
/// directory on /dev/shm (tmpfs), which may refuse direct writes.
#[test]
fn direct_and_buffered_writes_mix_on_one_file() {
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir_in("/dev/shm").unwrap(),
    ];
    for dir in &dirs {
        let mut a = Applier::open(dir.path()).unwrap();
        a.apply(&create("f"), &[]).unwrap();
        let mut want = Vec::new();
        let mut put = |a: &mut Applier, off: usize, data: &[u8]| {
            if want.len() < off + data.len() {
                want.resize(off + data.len(), 0);
            }
            want[off..off + data.len()].copy_from_slice(data);
            a.apply(&write("f", off as u64), data).unwrap();
        };
        let big = |b: u8| vec![b; DIRECT_MIN_BYTES * 2];
        // Payloads from the network are aligned in memory (written from
        // where they are); others are copied first.
        let pool = hapair_proto::BufPool::default();
        let aligned = pool.copy_of(&big(7));
        assert!(aligned.is_aligned());
        put(&mut a, 0, &big(1));
        put(&mut a, 100, b"small");
        put(&mut a, DIRECT_ALIGN * 10, &big(2));
        put(&mut a, DIRECT_ALIGN * 300 + 7, &big(3)); // unaligned offset
        put(&mut a, DIRECT_ALIGN * 5, &vec![4; DIRECT_MIN_BYTES + 1]); // unaligned length
        put(&mut a, DIRECT_ALIGN * 600, &big(5)); // extends the file
        put(&mut a, DIRECT_ALIGN * 40, &aligned);
        let shifted = vec![8; DIRECT_MIN_BYTES * 2 + 1];
        assert!(!hapair_proto::buf::is_aligned(&shifted[1..]));
        put(&mut a, DIRECT_ALIGN * 41, &shifted[1..]); // unaligned memory
        a.apply(&Op::Barrier, &[]).unwrap();
        put(&mut a, 0, &big(6));
        a.apply(&Op::Barrier, &[]).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("f")).unwrap(),
            want,
            "in {}",
            dir.path().display()
        );
    }
}
