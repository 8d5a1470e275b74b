//! Unit tests of the applier on real directories: every operation kind
//! applied correctly, then confinement. A hostile (or simply diverged) peer
//! can plant symlinks inside the mirror directory that point outside it, or
//! to `/`, and then name paths through them; it can also hand-craft wire
//! bytes with `..`, absolute, NUL or empty components, which `RelPath`
//! cannot represent. Every such attempt must be refused with an error and
//! must leave everything outside the mirror directory byte-for-byte as it
//! was: each world keeps a sentinel tree next to the mirror and compares a
//! full snapshot of its surroundings (types, modes, owners, sizes, times,
//! link counts, content, symlink targets, xattrs) before and after.
//!
//! Every operation runs on a helper thread with a deadline, so an applier
//! that blocks (opening a FIFO, for example) fails the test instead of
//! hanging the suite.

use super::*;
use hapair_proto::{
    decode_to_mirror, encode_frame, ProtoError, Timestamp, ToMirror, RENAME_EXCHANGE,
    RENAME_NOREPLACE,
};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

/// How long one operation may take before the test calls it a hang.
const OP_DEADLINE: Duration = Duration::from_secs(10);

fn rp(s: &str) -> RelPath {
    RelPath::parse(s.as_bytes()).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn comps(v: &[&[u8]]) -> RelPath {
    RelPath::from_components(v.iter().map(|c| c.to_vec()).collect())
        .unwrap_or_else(|e| panic!("{v:?}: {e}"))
}

fn t(sec: i64) -> Timestamp {
    Timestamp { sec, nsec: 0 }
}

fn tn(sec: i64, nsec: u32) -> Timestamp {
    Timestamp { sec, nsec }
}

fn create(p: RelPath) -> Op {
    Op::Create {
        path: p,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: t(1_000),
        parent_mtime: None,
    }
}

fn mkdir(p: RelPath) -> Op {
    Op::Mkdir {
        path: p,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: t(1_000),
        parent_mtime: None,
    }
}

fn write(p: RelPath, offset: u64) -> Op {
    Op::Write {
        path: p,
        offset,
        mtime: TimeSet::At(t(2_000)),
    }
}

fn symlink_op(p: RelPath, target: &[u8]) -> Op {
    Op::Symlink {
        path: p,
        target: target.to_vec(),
        uid: 0,
        gid: 0,
        mtime: t(1_000),
        parent_mtime: None,
    }
}

fn mknod(p: RelPath, mode: u32, rdev: u64) -> Op {
    Op::Mknod {
        path: p,
        mode,
        rdev,
        uid: 0,
        gid: 0,
        mtime: t(1_000),
        parent_mtime: None,
    }
}

pub(crate) fn setattr(p: RelPath) -> Op {
    Op::SetAttr {
        path: p,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        atime: TimeSet::Omit,
        mtime: TimeSet::Omit,
    }
}

fn with_mode(op: Op, m: u32) -> Op {
    match op {
        Op::SetAttr {
            path,
            uid,
            gid,
            size,
            atime,
            mtime,
            ..
        } => Op::SetAttr {
            path,
            mode: Some(m),
            uid,
            gid,
            size,
            atime,
            mtime,
        },
        other => other,
    }
}

pub(crate) fn with_size(op: Op, s: u64) -> Op {
    match op {
        Op::SetAttr {
            path,
            mode,
            uid,
            gid,
            atime,
            mtime,
            ..
        } => Op::SetAttr {
            path,
            mode,
            uid,
            gid,
            size: Some(s),
            atime,
            mtime,
        },
        other => other,
    }
}

fn with_owner(op: Op, u: u32, g: u32) -> Op {
    match op {
        Op::SetAttr {
            path,
            mode,
            size,
            atime,
            mtime,
            ..
        } => Op::SetAttr {
            path,
            mode,
            uid: Some(u),
            gid: Some(g),
            size,
            atime,
            mtime,
        },
        other => other,
    }
}

pub(crate) fn with_mtime(op: Op, m: Timestamp) -> Op {
    match op {
        Op::SetAttr {
            path,
            mode,
            uid,
            gid,
            size,
            atime,
            ..
        } => Op::SetAttr {
            path,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime: TimeSet::At(m),
        },
        other => other,
    }
}

fn rename(from: RelPath, to: RelPath, flags: u32) -> Op {
    Op::Rename {
        from,
        to,
        flags,
        from_parent_mtime: None,
        to_parent_mtime: None,
    }
}

fn link(existing: RelPath, new: RelPath) -> Op {
    Op::Link {
        existing,
        new,
        parent_mtime: None,
    }
}

fn setxattr(p: RelPath, name: &str, value: &[u8]) -> Op {
    Op::SetXattr {
        path: p,
        name: name.as_bytes().to_vec(),
        value: value.to_vec(),
        flags: 0,
    }
}

fn removexattr(p: RelPath, name: &str) -> Op {
    Op::RemoveXattr {
        path: p,
        name: name.as_bytes().to_vec(),
    }
}

fn fallocate(p: RelPath, mode: i32, offset: u64, len: u64) -> Op {
    Op::Fallocate {
        path: p,
        mode,
        offset,
        len,
        mtime: t(3_000),
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| panic!("NUL in {}", p.display()))
}

/// All xattrs of `p` (not following a symlink), sorted.
fn xattrs_of(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cp = cpath(p);
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::llistxattr(cp.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|x| !x.is_empty())
    {
        let cn = CString::new(name).unwrap_or_default();
        let mut v = vec![0u8; 64 * 1024];
        // SAFETY: valid C strings and buffer.
        let l =
            unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(l >= 0, "lgetxattr {}", p.display());
        v.truncate(l as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

fn set_xattr_local(p: &Path, name: &str, value: &[u8]) {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap_or_default());
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "lsetxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// Everything observable about the tree at `root` except the entry named
/// `skip` directly below it: one line per entry, keyed by relative path.
fn snapshot(root: &Path, skip: &str) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let ft = m.file_type();
        let content = if ft.is_file() {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            format!("{:?}", data)
        } else if ft.is_symlink() {
            format!("-> {:?}", std::fs::read_link(&p).ok())
        } else {
            String::new()
        };
        out.insert(
            rel.clone(),
            format!(
                "mode {:o} uid {} gid {} size {} nlink {} ino {} mtime {}.{} ctime {}.{} {content} xattrs {:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                if ft.is_dir() { 0 } else { m.size() },
                m.nlink(),
                m.ino(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                xattrs_of(&p)
            ),
        );
        if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) {
                let e = e.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                if rel.as_os_str().is_empty() && e.file_name() == skip {
                    continue;
                }
                stack.push(rel.join(e.file_name()));
            }
        }
    }
    out
}

/// A temp dir holding the mirror directory and, next to it, a sentinel
/// tree that no operation may touch.
struct World {
    tmp: tempfile::TempDir,
    /// The applier's write-ahead log lives here (outside `tmp`, whose
    /// snapshot must not change).
    _logdir: tempfile::TempDir,
    mirror: PathBuf,
    outside: PathBuf,
    applier: Option<Applier>,
    before: BTreeMap<PathBuf, String>,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mirror = tmp.path().join("mirror");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&mirror).unwrap_or_else(|e| panic!("mkdir mirror: {e}"));
        std::fs::create_dir_all(outside.join("dir")).unwrap_or_else(|e| panic!("mkdir: {e}"));
        std::fs::write(outside.join("secret"), b"top secret, must stay as it is")
            .unwrap_or_else(|e| panic!("write: {e}"));
        std::fs::write(outside.join("dir/inner"), b"inner sentinel")
            .unwrap_or_else(|e| panic!("write: {e}"));
        set_xattr_local(&outside.join("secret"), "user.keep", b"kept");
        std::fs::set_permissions(
            outside.join("secret"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap_or_else(|e| panic!("chmod: {e}"));
        // Every case runs with the write-ahead log on, as the mirror
        // server's sessions do (the cache tests cover the applier without).
        let logdir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let applier =
            Applier::open_with_log_sized(&mirror, &logdir.path().join("log"), crate::MIN_LOG_SIZE)
                .map(Applier::always_log)
                .unwrap_or_else(|e| panic!("Applier::open_with_log: {e:#}"));
        let before = snapshot(tmp.path(), "mirror");
        World {
            tmp,
            _logdir: logdir,
            mirror,
            outside,
            applier: Some(applier),
            before,
        }
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.mirror.join(rel)
    }

    /// Applies `op` on a helper thread; an operation that blocks past the
    /// deadline fails the test (after unblocking any FIFO in the mirror so
    /// that the thread can end).
    fn apply(&mut self, op: Op, payload: &[u8]) -> Result<(), ApplyError> {
        let mut applier = self.applier.take().unwrap_or_else(|| {
            panic!("the applier was lost by an earlier hang");
        });
        let payload = payload.to_vec();
        let desc = format!("{op:?}");
        let (tx, rx) = mpsc::channel();
        let h = std::thread::spawn(move || {
            let r = applier.apply(&op, &payload);
            let _ = tx.send(());
            (applier, r)
        });
        if rx.recv_timeout(OP_DEADLINE).is_err() {
            self.unblock_fifos();
            let _ = h.join();
            panic!("applying {desc} blocked for more than {OP_DEADLINE:?}");
        }
        let (applier, r) = h
            .join()
            .unwrap_or_else(|_| panic!("applying {desc} panicked"));
        self.applier = Some(applier);
        r
    }

    fn ok(&mut self, op: Op) {
        let d = format!("{op:?}");
        if let Err(e) = self.apply(op, &[]) {
            panic!("{d}: {e}");
        }
    }

    fn ok_with(&mut self, op: Op, payload: &[u8]) {
        let d = format!("{op:?}");
        if let Err(e) = self.apply(op, payload) {
            panic!("{d}: {e}");
        }
    }

    /// The operation must fail; returns its errno.
    fn refused(&mut self, op: Op, payload: &[u8]) -> i32 {
        let d = format!("{op:?}");
        match self.apply(op, payload) {
            Ok(()) => panic!("{d} was applied; it must be refused"),
            Err(e) => {
                assert_ne!(e.errno(), 0, "{d}: error without errno: {e}");
                // The error names the operation and says what failed.
                let msg = e.to_string();
                assert!(
                    msg.contains(e.op),
                    "{d}: error {msg:?} does not name the op"
                );
                e.errno()
            }
        }
    }

    fn unblock_fifos(&self) {
        let mut stack = vec![self.mirror.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    stack.push(e.path());
                } else if std::os::unix::fs::FileTypeExt::is_fifo(&ft) {
                    let cp = cpath(&e.path());
                    // Opening read-write never blocks and satisfies both a
                    // blocked reader and a blocked writer.
                    // SAFETY: valid C string.
                    let fd = unsafe { libc::open(cp.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK) };
                    if fd >= 0 {
                        std::thread::sleep(Duration::from_millis(200));
                        // SAFETY: fd was just opened here.
                        unsafe { libc::close(fd) };
                    }
                }
            }
        }
    }

    /// Nothing outside the mirror directory changed.
    fn assert_outside_unchanged(&self) {
        let now = snapshot(self.tmp.path(), "mirror");
        let mut diffs = Vec::new();
        for (k, v) in &self.before {
            match now.get(k) {
                None => diffs.push(format!("{} disappeared", k.display())),
                Some(n) if n != v => {
                    diffs.push(format!("{} changed:\n  was {v}\n  now {n}", k.display()))
                }
                _ => {}
            }
        }
        for k in now.keys().filter(|k| !self.before.contains_key(*k)) {
            diffs.push(format!("{} appeared outside the mirror", k.display()));
        }
        assert!(
            diffs.is_empty(),
            "the world outside the mirror directory changed:\n{}",
            diffs.join("\n")
        );
    }

    /// The absolute path of `outside` as path components (for a symlink
    /// to `/`).
    fn outside_components(&self) -> Vec<Vec<u8>> {
        self.outside
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(n) => Some(n.as_bytes().to_vec()),
                _ => None,
            })
            .collect()
    }
}

fn lstat(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn mtime(m: &std::fs::Metadata) -> Timestamp {
    tn(m.mtime(), m.mtime_nsec() as u32)
}

// ---------------------------------------------------------------------------
// Every operation kind, applied correctly.
// ---------------------------------------------------------------------------

#[test]
fn create_write_and_attributes() {
    let mut w = World::new();
    w.ok(Op::Mkdir {
        path: rp("d"),
        mode: 0o750,
        uid: 1234,
        gid: 4321,
        mtime: tn(1_100, 5),
        parent_mtime: Some(tn(1_000, 7)),
    });
    let d = lstat(&w.m("d"));
    assert!(d.is_dir());
    assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o750, 1234, 4321));
    assert_eq!(mtime(&d), tn(1_100, 5));
    assert_eq!(mtime(&lstat(&w.mirror)), tn(1_000, 7), "root mtime");

    // Mkdir of an existing directory is accepted and sets its attributes
    // (a resync may re-send it).
    w.ok(Op::Mkdir {
        path: rp("d"),
        mode: 0o700,
        uid: 1,
        gid: 2,
        mtime: t(1_200),
        parent_mtime: None,
    });
    let d = lstat(&w.m("d"));
    assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o700, 1, 2));

    // Create keeps set-id bits even though it changes the owner.
    w.ok(Op::Create {
        path: rp("d/f"),
        mode: 0o4750,
        uid: 65534,
        gid: 65534,
        mtime: t(1_300),
        parent_mtime: Some(t(1_301)),
    });
    let f = lstat(&w.m("d/f"));
    assert!(f.is_file());
    assert_eq!(
        (f.mode() & 0o7777, f.uid(), f.gid(), f.len()),
        (0o4750, 65534, 65534, 0)
    );
    assert_eq!(mtime(&lstat(&w.m("d"))), t(1_301), "parent mtime");

    // Writes at offsets (a gap stays a hole), mtime from the op.
    w.ok_with(write(rp("d/f"), 0), b"hello");
    w.ok_with(
        Op::Write {
            path: rp("d/f"),
            offset: 1 << 20,
            mtime: TimeSet::At(tn(1_400, 999_999_999)),
        },
        b"world",
    );
    let data = std::fs::read(w.m("d/f")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(data.len(), (1 << 20) + 5);
    assert_eq!(&data[..5], b"hello");
    assert!(data[5..1 << 20].iter().all(|b| *b == 0));
    assert_eq!(&data[1 << 20..], b"world");
    let f = lstat(&w.m("d/f"));
    assert_eq!(mtime(&f), tn(1_400, 999_999_999));
    assert!(
        f.blocks() * 512 < 256 * 1024,
        "the gap was allocated ({} blocks)",
        f.blocks()
    );

    // Create over an existing regular file truncates it.
    w.ok(create(rp("d/f")));
    assert_eq!(lstat(&w.m("d/f")).len(), 0);

    // SetAttr: size (shrink and grow), mode, owner, times, in one op and
    // separately; chown before chmod so set-id bits survive.
    w.ok_with(write(rp("d/f"), 0), &[7u8; 10_000]);
    w.ok(with_size(setattr(rp("d/f")), 100));
    assert_eq!(lstat(&w.m("d/f")).len(), 100);
    w.ok(with_size(setattr(rp("d/f")), 50_000));
    let data = std::fs::read(w.m("d/f")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(data.len(), 50_000);
    assert!(data[..100].iter().all(|b| *b == 7) && data[100..].iter().all(|b| *b == 0));
    w.ok(with_mode(
        with_owner(setattr(rp("d/f")), 1000, 1001),
        0o6755,
    ));
    let f = lstat(&w.m("d/f"));
    assert_eq!((f.mode() & 0o7777, f.uid(), f.gid()), (0o6755, 1000, 1001));
    w.ok(Op::SetAttr {
        path: rp("d/f"),
        mode: None,
        uid: None,
        gid: None,
        size: None,
        atime: TimeSet::At(tn(5, 6)),
        mtime: TimeSet::At(tn(7, 8)),
    });
    let f = lstat(&w.m("d/f"));
    assert_eq!(
        (f.atime(), f.atime_nsec(), f.mtime(), f.mtime_nsec()),
        (5, 6, 7, 8)
    );
    // The root itself accepts attribute changes.
    w.ok(with_mode(
        with_mtime(setattr(RelPath::root()), t(4_242)),
        0o711,
    ));
    let r = lstat(&w.mirror);
    assert_eq!((r.mode() & 0o7777, mtime(&r)), (0o711, t(4_242)));
    w.assert_outside_unchanged();
}

#[test]
fn links_nodes_xattrs_fallocate() {
    let mut w = World::new();
    w.ok(create(rp("f")));
    w.ok_with(write(rp("f"), 0), &[1u8; 256 * 1024]);

    // Symlink: raw target stored, owner and mtime of the link itself.
    w.ok(Op::Symlink {
        path: rp("s"),
        target: b"../../nowhere/\xff".to_vec(),
        uid: 321,
        gid: 654,
        mtime: tn(99, 1),
        parent_mtime: None,
    });
    let s = lstat(&w.m("s"));
    assert!(s.file_type().is_symlink());
    assert_eq!((s.uid(), s.gid(), mtime(&s)), (321, 654, tn(99, 1)));
    assert_eq!(
        std::fs::read_link(w.m("s"))
            .unwrap_or_else(|e| panic!("{e}"))
            .as_os_str()
            .as_bytes(),
        b"../../nowhere/\xff"
    );
    // A symlink's mode cannot be changed; its owner and times can.
    w.refused(with_mode(setattr(rp("s")), 0o600), &[]);
    w.ok(with_mtime(with_owner(setattr(rp("s")), 5, 6), t(77)));
    let s = lstat(&w.m("s"));
    assert_eq!((s.uid(), s.gid(), s.mtime()), (5, 6, 77));

    // Hard link: one inode, two names.
    w.ok(Op::Link {
        existing: rp("f"),
        new: rp("h"),
        parent_mtime: Some(t(55)),
    });
    let (f, h) = (lstat(&w.m("f")), lstat(&w.m("h")));
    assert_eq!((f.ino(), f.nlink()), (h.ino(), 2));
    assert_eq!(mtime(&lstat(&w.mirror)), t(55));

    // Special files.
    w.ok(mknod(rp("p"), libc::S_IFIFO | 0o640, 0));
    let p = lstat(&w.m("p"));
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&p.file_type()));
    assert_eq!(p.mode() & 0o7777, 0o640);
    w.ok(mknod(
        rp("null"),
        libc::S_IFCHR | 0o600,
        libc::makedev(1, 3),
    ));
    let c = lstat(&w.m("null"));
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &c.file_type()
    ));
    assert_eq!(c.rdev(), libc::makedev(1, 3));
    w.ok(mknod(rp("regular-by-mknod"), libc::S_IFREG | 0o600, 0));
    assert!(lstat(&w.m("regular-by-mknod")).is_file());
    // mknod never makes a directory or a symlink.
    w.refused(mknod(rp("dir-by-mknod"), libc::S_IFDIR | 0o700, 0), &[]);
    w.refused(mknod(rp("lnk-by-mknod"), libc::S_IFLNK | 0o700, 0), &[]);
    assert!(std::fs::symlink_metadata(w.m("dir-by-mknod")).is_err());

    // Xattrs on a file, a directory, the root and (trusted.*) a symlink.
    w.ok(mkdir(rp("d")));
    w.ok(setxattr(rp("f"), "user.a", b"1"));
    w.ok(setxattr(rp("f"), "user.a", b"replaced"));
    w.ok(setxattr(rp("f"), "user.b", &[0u8; 3000]));
    w.ok(setxattr(rp("f"), "user.empty", b""));
    w.ok(removexattr(rp("f"), "user.b"));
    w.ok(setxattr(rp("d"), "user.dir", b"dv"));
    w.ok(setxattr(RelPath::root(), "user.root", b"rv"));
    w.ok(setxattr(rp("s"), "trusted.onlink", b"lv"));
    assert_eq!(
        xattrs_of(&w.m("f")),
        vec![
            (b"user.a".to_vec(), b"replaced".to_vec()),
            (b"user.empty".to_vec(), Vec::new())
        ]
    );
    assert_eq!(
        xattrs_of(&w.m("d")),
        vec![(b"user.dir".to_vec(), b"dv".to_vec())]
    );
    assert!(xattrs_of(&w.mirror).contains(&(b"user.root".to_vec(), b"rv".to_vec())));
    assert_eq!(
        xattrs_of(&w.m("s")),
        vec![(b"trusted.onlink".to_vec(), b"lv".to_vec())]
    );
    assert_eq!(
        w.refused(removexattr(rp("f"), "user.never"), &[]),
        libc::ENODATA
    );

    // Fallocate: punch a hole (size kept), preallocate beyond the size.
    let before = lstat(&w.m("f")).blocks();
    w.ok(fallocate(
        rp("f"),
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        64 * 1024,
        64 * 1024,
    ));
    let f = lstat(&w.m("f"));
    assert_eq!(f.len(), 256 * 1024);
    assert!(f.blocks() < before, "the punched hole was not deallocated");
    assert_eq!(mtime(&f), t(3_000));
    let data = std::fs::read(w.m("f")).unwrap_or_else(|e| panic!("{e}"));
    assert!(data[64 * 1024..128 * 1024].iter().all(|b| *b == 0));
    assert!(data[..64 * 1024].iter().all(|b| *b == 1));
    assert!(data[128 * 1024..].iter().all(|b| *b == 1));
    w.ok(fallocate(rp("f"), 0, 0, 1 << 20));
    assert_eq!(lstat(&w.m("f")).len(), 1 << 20);
    w.ok(fallocate(
        rp("f"),
        libc::FALLOC_FL_KEEP_SIZE,
        1 << 20,
        1 << 20,
    ));
    let f = lstat(&w.m("f"));
    assert_eq!(f.len(), 1 << 20);
    assert!(
        f.blocks() * 512 >= 2 << 20,
        "preallocation beyond EOF missing"
    );
    w.assert_outside_unchanged();
}

#[test]
fn renames_unlinks_and_barriers() {
    let mut w = World::new();
    for p in ["a", "b", "dir"] {
        w.ok(mkdir(rp(p)));
    }
    for (p, data) in [("a/x", &b"x"[..]), ("a/y", b"y"), ("b/z", b"z")] {
        w.ok(create(rp(p)));
        w.ok_with(write(rp(p), 0), data);
    }
    w.ok(create(rp("dir/inside")));

    // Plain, across directories, with parent times.
    w.ok(Op::Rename {
        from: rp("a/x"),
        to: rp("b/x2"),
        flags: 0,
        from_parent_mtime: Some(t(10)),
        to_parent_mtime: Some(t(20)),
    });
    assert!(!w.m("a/x").exists());
    assert_eq!(std::fs::read(w.m("b/x2")).unwrap_or_default(), b"x");
    assert_eq!(lstat(&w.m("a")).mtime(), 10);
    assert_eq!(lstat(&w.m("b")).mtime(), 20);
    // Over an existing file.
    w.ok(rename(rp("a/y"), rp("b/z"), 0));
    assert_eq!(std::fs::read(w.m("b/z")).unwrap_or_default(), b"y");
    // RENAME_NOREPLACE onto an existing name: refused, both stay.
    assert_eq!(
        w.refused(rename(rp("b/x2"), rp("b/z"), RENAME_NOREPLACE), &[]),
        libc::EEXIST
    );
    assert_eq!(std::fs::read(w.m("b/x2")).unwrap_or_default(), b"x");
    assert_eq!(std::fs::read(w.m("b/z")).unwrap_or_default(), b"y");
    w.ok(rename(rp("b/x2"), rp("b/fresh"), RENAME_NOREPLACE));
    assert!(w.m("b/fresh").is_file());
    // RENAME_EXCHANGE of a file and a directory.
    w.ok(rename(rp("b/fresh"), rp("dir"), RENAME_EXCHANGE));
    assert!(w.m("dir").is_file());
    assert!(w.m("b/fresh/inside").is_file());
    // A directory rename.
    w.ok(rename(rp("b"), rp("a/b-moved"), 0));
    assert!(w.m("a/b-moved/fresh/inside").is_file());

    // Unlink of one of two hard links; rmdir of an empty directory only.
    w.ok(link(rp("a/b-moved/z"), rp("zz")));
    w.ok(Op::Unlink {
        path: rp("a/b-moved/z"),
        parent_mtime: Some(t(30)),
    });
    assert_eq!(lstat(&w.m("zz")).nlink(), 1);
    assert_eq!(lstat(&w.m("a/b-moved")).mtime(), 30);
    assert_eq!(
        w.refused(
            Op::Rmdir {
                path: rp("a"),
                parent_mtime: None
            },
            &[]
        ),
        libc::ENOTEMPTY
    );
    w.ok(Op::Unlink {
        path: rp("a/b-moved/fresh/inside"),
        parent_mtime: None,
    });
    w.ok(Op::Rmdir {
        path: rp("a/b-moved/fresh"),
        parent_mtime: None,
    });
    assert!(!w.m("a/b-moved/fresh").exists());
    // Rmdir of a file and unlink of a directory are refused.
    w.refused(
        Op::Rmdir {
            path: rp("zz"),
            parent_mtime: None,
        },
        &[],
    );
    w.refused(
        Op::Unlink {
            path: rp("a"),
            parent_mtime: None,
        },
        &[],
    );

    // Barriers: the dirty sets are emptied; dirty entries removed or
    // renamed since they were written are not an error.
    w.ok(create(rp("gone")));
    w.ok_with(write(rp("gone"), 0), b"g");
    w.ok(Op::Unlink {
        path: rp("gone"),
        parent_mtime: None,
    });
    w.ok_with(write(rp("zz"), 0), b"moved");
    w.ok(rename(rp("zz"), rp("a/zz"), 0));
    w.ok(Op::Barrier);
    {
        let a = w.applier.as_ref().unwrap_or_else(|| panic!("no applier"));
        assert!(a.dirty_files.is_empty() && a.dirty_dirs.is_empty() && !a.overflow);
    }
    w.assert_outside_unchanged();
}

/// More dirty entries than the applier tracks: it falls back to syncfs and
/// forgets the sets (bounded memory).
#[test]
fn dirty_set_overflow_is_bounded() {
    let mut w = World::new();
    w.ok(mkdir(rp("many")));
    for i in 0..(MAX_DIRTY_ENTRIES + 10) {
        let p = rp(&format!("many/{i}"));
        w.ok(create(p.clone()));
        w.ok_with(write(p, 0), b"d");
    }
    {
        let a = w.applier.as_ref().unwrap_or_else(|| panic!("no applier"));
        assert!(a.overflow, "the dirty set did not overflow");
        assert!(a.dirty_files.len() <= MAX_DIRTY_ENTRIES);
    }
    w.ok(Op::Barrier);
    let a = w.applier.as_ref().unwrap_or_else(|| panic!("no applier"));
    assert!(a.dirty_files.is_empty() && !a.overflow);
}

/// A path longer than PATH_MAX (30 levels of 200-byte names), walked
/// component by component.
#[test]
fn paths_longer_than_path_max() {
    let mut w = World::new();
    let mut comps_v: Vec<Vec<u8>> = Vec::new();
    for level in 0..30 {
        comps_v.push(format!("{level:03}{}", "n".repeat(197)).into_bytes());
        w.ok(mkdir(
            RelPath::from_components(comps_v.clone()).unwrap_or_else(|e| panic!("{e}")),
        ));
    }
    let mut file = comps_v.clone();
    file.push(b"deep-file".to_vec());
    let fp = RelPath::from_components(file).unwrap_or_else(|e| panic!("{e}"));
    assert!(fp.to_bytes().len() > libc::PATH_MAX as usize);
    w.ok(create(fp.clone()));
    w.ok_with(write(fp.clone(), 3), b"deep");
    w.ok(setxattr(fp.clone(), "user.deep", b"1"));
    w.ok(with_mode(setattr(fp.clone()), 0o600));
    w.ok(Op::Barrier);
    // Read it back with *at() calls.
    let mut cur = sys::openat(
        w.applier.as_ref().map(|a| a.root()).unwrap_or(-1),
        b".",
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for c in &comps_v {
        cur = sys::openat(cur.as_raw_fd(), c, libc::O_PATH | libc::O_DIRECTORY, 0)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let st = sys::lstat_at(cur.as_raw_fd(), b"deep-file").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((st.st_size, st.st_mode & 0o7777), (7, 0o600));
    w.ok(rename(fp, comps(&[b"shallow"]), 0));
    assert_eq!(
        std::fs::read(w.m("shallow")).unwrap_or_default(),
        b"\0\0\0deep"
    );
}

// ---------------------------------------------------------------------------
// Crafted wire bytes: what RelPath cannot represent never becomes an Op.
// ---------------------------------------------------------------------------

/// A 16-byte component that marks where a path sits in the encoded header.
const MARKER: &[u8] = b"@@HOSTILE-PATH@@";

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The postcard bytes of a `Vec<Vec<u8>>` (which is how a `RelPath`
/// travels), built by hand so that no validation runs.
fn raw_path(components: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    varint(components.len(), &mut v);
    for c in components {
        varint(c.len(), &mut v);
        v.extend_from_slice(c);
    }
    v
}

/// The frame body (after the length prefix) of `msg`, where the one-
/// component path `MARKER` is replaced by the raw encoding of `components`.
fn spliced_body(msg: &ToMirror, payload: &[u8], components: &[Vec<u8>]) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_frame(msg, payload, &mut frame).unwrap_or_else(|e| panic!("{e}"));
    let hlen = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) as usize;
    let header = &frame[8..8 + hlen];
    let needle = raw_path(&[MARKER.to_vec()]);
    let at = header
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("marker not found in the encoded header"));
    let mut h = header[..at].to_vec();
    h.extend_from_slice(&raw_path(components));
    h.extend_from_slice(&header[at + needle.len()..]);
    let mut body = (h.len() as u32).to_be_bytes().to_vec();
    body.extend_from_slice(&h);
    body.extend_from_slice(payload);
    body
}

#[test]
fn crafted_paths_are_refused_by_the_decoder() {
    let marker = comps(&[MARKER]);
    let other = rp("ok/name");
    let templates: Vec<(ToMirror, Vec<u8>)> = vec![
        (
            ToMirror::Op {
                seq: 1,
                op: create(marker.clone()),
            },
            vec![],
        ),
        (
            ToMirror::Op {
                seq: 2,
                op: write(marker.clone(), 0),
            },
            b"payload".to_vec(),
        ),
        (
            ToMirror::Op {
                seq: 3,
                op: rename(other.clone(), marker.clone(), 0),
            },
            vec![],
        ),
        (
            ToMirror::Op {
                seq: 4,
                op: link(marker.clone(), other.clone()),
            },
            vec![],
        ),
        (
            ToMirror::Op {
                seq: 5,
                op: with_mode(setattr(marker.clone()), 0o777),
            },
            vec![],
        ),
        (
            ToMirror::Op {
                seq: 6,
                op: setxattr(marker.clone(), "user.x", b"v"),
            },
            vec![],
        ),
    ];
    let hostile: Vec<Vec<Vec<u8>>> = vec![
        vec![b"..".to_vec()],
        vec![b"..".to_vec(), b"x".to_vec()],
        vec![b"a".to_vec(), b"..".to_vec(), b"..".to_vec(), b"x".to_vec()],
        vec![b".".to_vec()],
        vec![b"a".to_vec(), b".".to_vec(), b"x".to_vec()],
        vec![Vec::new()],
        // "/etc/passwd" split on '/': an absolute path has an empty first
        // component.
        vec![Vec::new(), b"etc".to_vec(), b"passwd".to_vec()],
        vec![b"a".to_vec(), Vec::new()],
        vec![b"/etc/passwd".to_vec()],
        vec![b"../../x".to_vec()],
        vec![b"x\0y".to_vec()],
        vec![b"\0".to_vec()],
        vec![vec![b'n'; 256]],
        // Every component fine, the whole too long (> 64 KiB).
        vec![vec![b'n'; 255]; 300],
    ];
    for (msg, payload) in &templates {
        // The splice is right: a valid replacement decodes to the same
        // message with that path.
        let good = vec![b"fine".to_vec(), b"name".to_vec()];
        let frame = decode_to_mirror(spliced_body(msg, payload, &good))
            .unwrap_or_else(|e| panic!("valid splice refused: {e}"));
        let want = format!("{:?}", msg)
            .replace(&format!("{:?}", marker), &format!("{:?}", rp("fine/name")));
        assert_eq!(format!("{:?}", frame.header), want);
        assert_eq!(&frame.payload[..], &payload[..]);
        for h in &hostile {
            let r = decode_to_mirror(spliced_body(msg, payload, h));
            match r {
                Err(ProtoError::Decode(_)) => {}
                Err(other) => panic!("{h:?} in {msg:?}: refused, but as {other:?}"),
                Ok(f) => panic!("{h:?} in {msg:?} decoded to {:?}", f.header),
            }
            assert!(
                RelPath::from_components(h.clone()).is_err(),
                "{h:?} accepted by RelPath::from_components"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Symlink tricks: planted links to the outside, to `/`, as intermediate
// components, and renames that move links into a directory's place.
// ---------------------------------------------------------------------------

/// Ops that would read, write, create, remove, rename, link, chmod, chown,
/// truncate or set xattrs at `target`, a path whose walk crosses a symlink
/// before its last component.
fn through_ops(target: &RelPath, local: &RelPath) -> Vec<(Op, Vec<u8>)> {
    let under = |name: &[u8]| {
        let mut c = target.components().to_vec();
        c.pop();
        c.push(name.to_vec());
        RelPath::from_components(c).unwrap_or_else(|e| panic!("{e}"))
    };
    vec![
        (write(target.clone(), 0), b"PWNED".to_vec()),
        (create(target.clone()), vec![]),
        (create(under(b"planted")), vec![]),
        (mkdir(under(b"planted-dir")), vec![]),
        (
            mknod(under(b"planted-fifo"), libc::S_IFIFO | 0o600, 0),
            vec![],
        ),
        (symlink_op(under(b"planted-link"), b"/etc"), vec![]),
        (link(target.clone(), rp("stolen-hardlink")), vec![]),
        (link(local.clone(), under(b"planted-hardlink")), vec![]),
        (
            Op::Unlink {
                path: target.clone(),
                parent_mtime: None,
            },
            vec![],
        ),
        (
            Op::Rmdir {
                path: under(b"dir"),
                parent_mtime: None,
            },
            vec![],
        ),
        (rename(target.clone(), rp("stolen-by-rename"), 0), vec![]),
        (
            rename(local.clone(), under(b"planted-by-rename"), 0),
            vec![],
        ),
        (
            rename(local.clone(), target.clone(), RENAME_EXCHANGE),
            vec![],
        ),
        (with_mode(setattr(target.clone()), 0o777), vec![]),
        (with_owner(setattr(target.clone()), 4242, 4242), vec![]),
        (with_size(setattr(target.clone()), 0), vec![]),
        (with_mtime(setattr(target.clone()), t(1)), vec![]),
        (setxattr(target.clone(), "user.pwned", b"1"), vec![]),
        (setxattr(target.clone(), "trusted.pwned", b"1"), vec![]),
        (removexattr(target.clone(), "user.keep"), vec![]),
        (
            fallocate(
                target.clone(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                4096,
            ),
            vec![],
        ),
        (fallocate(target.clone(), 0, 0, 1 << 20), vec![]),
        (
            Op::Write {
                path: target.clone(),
                offset: 1 << 30,
                mtime: TimeSet::At(t(1)),
            },
            b"far".to_vec(),
        ),
    ]
}

#[test]
fn symlink_as_intermediate_component_is_never_crossed() {
    let mut w = World::new();
    let outside = w.outside.clone();
    let outside_b = outside.as_os_str().as_bytes().to_vec();
    // Links planted by ops (as a hostile peer would) and directly in the
    // mirror directory (as a diverged mirror may hold them).
    w.ok(symlink_op(rp("out"), &outside_b));
    w.ok(symlink_op(rp("up"), b"../outside"));
    w.ok(symlink_op(rp("root"), b"/"));
    w.ok(mkdir(rp("sub")));
    symlink(&outside, w.m("sub/deeper")).unwrap_or_else(|e| panic!("{e}"));
    symlink("../../outside/dir", w.m("sub/reldir")).unwrap_or_else(|e| panic!("{e}"));
    w.ok(create(rp("local")));
    w.ok_with(write(rp("local"), 0), b"local data");

    let mut via_root = vec![b"root".to_vec()];
    via_root.extend(w.outside_components());
    via_root.push(b"secret".to_vec());
    let targets = vec![
        rp("out/secret"),
        rp("up/secret"),
        rp("out/dir/inner"),
        rp("sub/deeper/secret"),
        rp("sub/reldir/inner"),
        RelPath::from_components(via_root).unwrap_or_else(|e| panic!("{e}")),
    ];
    let mut refused = 0;
    for target in &targets {
        for (op, payload) in through_ops(target, &rp("local")) {
            let errno = w.refused(op.clone(), &payload);
            assert!(
                matches!(errno, libc::ENOTDIR | libc::ELOOP),
                "{op:?}: refused with errno {errno}, expected ENOTDIR or ELOOP (a symlink on the way)"
            );
            refused += 1;
        }
        w.assert_outside_unchanged();
    }
    eprintln!("{refused} operations through intermediate symlinks refused");
    // The local file was neither moved nor exchanged.
    assert_eq!(
        std::fs::read(w.m("local")).unwrap_or_default(),
        b"local data"
    );
    // The legitimate state around them still works.
    w.ok(Op::Barrier);
    w.assert_outside_unchanged();
}

#[test]
fn symlink_as_last_component_is_never_followed() {
    let mut w = World::new();
    let secret = w.outside.join("secret");
    let dir = w.outside.join("dir");
    w.ok(symlink_op(rp("fs"), secret.as_os_str().as_bytes()));
    w.ok(symlink_op(rp("fsrel"), b"../outside/secret"));
    w.ok(symlink_op(rp("fdir"), dir.as_os_str().as_bytes()));
    w.ok(symlink_op(rp("froot"), b"/"));
    for name in ["fs", "fsrel"] {
        let p = rp(name);
        // Data access through the link: refused.
        for (op, payload) in [
            (write(p.clone(), 0), b"PWNED".to_vec()),
            (
                Op::Write {
                    path: p.clone(),
                    offset: 1 << 33,
                    mtime: TimeSet::At(t(1)),
                },
                b"far".to_vec(),
            ),
            (create(p.clone()), vec![]),
            (with_size(setattr(p.clone()), 0), vec![]),
            (with_mode(setattr(p.clone()), 0o777), vec![]),
            (fallocate(p.clone(), 0, 0, 1 << 20), vec![]),
            (
                fallocate(
                    p.clone(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    4096,
                ),
                vec![],
            ),
            (mkdir(p.clone()), vec![]),
            (mknod(p.clone(), libc::S_IFIFO | 0o600, 0), vec![]),
            (symlink_op(p.clone(), b"x"), vec![]),
            (setxattr(p.clone(), "user.pwned", b"1"), vec![]),
            (removexattr(p.clone(), "user.keep"), vec![]),
        ] {
            w.refused(op, &payload);
            w.assert_outside_unchanged();
        }
        // Changes that apply to the link itself are allowed, and stay on it.
        w.ok(with_mtime(with_owner(setattr(p.clone()), 4242, 4343), t(5)));
        let l = lstat(&w.m(name));
        assert!(l.file_type().is_symlink());
        assert_eq!((l.uid(), l.gid(), l.mtime()), (4242, 4343, 5));
        w.ok(setxattr(p.clone(), "trusted.onlink", b"1"));
        w.assert_outside_unchanged();
    }
    // A hard link to a symlink is a second name of the link, not of its
    // target; data access through it is refused as well.
    w.ok(link(rp("fs"), rp("fs-hard")));
    assert!(lstat(&w.m("fs-hard")).file_type().is_symlink());
    w.refused(write(rp("fs-hard"), 0), b"PWNED");
    // Directory links: rmdir, mode, mkdir over, creation below refused.
    for name in ["fdir", "froot"] {
        let p = rp(name);
        w.refused(
            Op::Rmdir {
                path: p.clone(),
                parent_mtime: None,
            },
            &[],
        );
        w.refused(with_mode(setattr(p.clone()), 0o777), &[]);
        w.refused(mkdir(p.clone()), &[]);
        w.refused(setxattr(p.clone(), "user.pwned", b"1"), &[]);
        w.assert_outside_unchanged();
    }
    // Unlink and rename act on the link, never on its target.
    w.ok(rename(rp("fs"), rp("fs-renamed"), 0));
    w.ok(Op::Unlink {
        path: rp("fs-renamed"),
        parent_mtime: None,
    });
    w.ok(Op::Unlink {
        path: rp("fdir"),
        parent_mtime: None,
    });
    w.ok(Op::Barrier);
    assert!(w.outside.join("secret").is_file() && w.outside.join("dir/inner").is_file());
    w.assert_outside_unchanged();
}

#[test]
fn renames_that_put_a_symlink_in_a_directorys_place() {
    let mut w = World::new();
    let outside_b = w.outside.as_os_str().as_bytes().to_vec();
    w.ok(symlink_op(rp("evil"), &outside_b));
    w.ok(mkdir(rp("d")));
    w.ok(create(rp("d/x")));
    w.ok_with(write(rp("d/x"), 0), b"dirty before the swap");
    w.ok(mkdir(rp("empty")));

    // A directory onto a symlink, a symlink onto a directory: refused.
    assert_eq!(
        w.refused(rename(rp("d"), rp("evil"), 0), &[]),
        libc::ENOTDIR
    );
    assert_eq!(
        w.refused(rename(rp("evil"), rp("empty"), 0), &[]),
        libc::EISDIR
    );
    w.assert_outside_unchanged();
    // Exchanging them is a legal rename: now "d" is the symlink, and every
    // path below "d" must be refused, including the dirty file's.
    w.ok(rename(rp("d"), rp("evil"), RENAME_EXCHANGE));
    assert!(lstat(&w.m("d")).file_type().is_symlink());
    assert!(w.m("evil/x").is_file());
    for (op, payload) in through_ops(&rp("d/secret"), &rp("evil/x")) {
        w.refused(op, &payload);
    }
    w.refused(write(rp("d/x"), 0), b"PWNED");
    // The barrier must not follow "d" to fsync the moved file.
    w.ok(Op::Barrier);
    w.assert_outside_unchanged();
    // A symlink renamed over a regular file replaces it; the name then
    // refuses data access.
    w.ok(rename(rp("d"), rp("evil/x"), 0));
    w.refused(write(rp("evil/x"), 0), b"PWNED");
    w.refused(create(rp("evil/x/y")), &[]);
    w.ok(Op::Barrier);
    w.assert_outside_unchanged();
}

/// FIFOs and device nodes are never opened for data: a write, a create, a
/// truncate or a fallocate naming one is refused at once (opening a FIFO
/// would block the applier forever; opening a device would reach real
/// hardware), and a barrier after an xattr change on one does not open it.
#[test]
fn special_files_are_never_opened_for_data() {
    let mut w = World::new();
    w.ok(mknod(rp("fifo"), libc::S_IFIFO | 0o666, 0));
    w.ok(mknod(
        rp("null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    ));
    for name in ["fifo", "null"] {
        let p = rp(name);
        for (op, payload) in [
            (write(p.clone(), 0), b"data".to_vec()),
            (create(p.clone()), vec![]),
            (with_size(setattr(p.clone()), 0), vec![]),
            (fallocate(p.clone(), 0, 0, 4096), vec![]),
        ] {
            let errno = w.refused(op.clone(), &payload);
            assert_eq!(errno, libc::EINVAL, "{op:?}: errno {errno}");
        }
        // Attribute and xattr changes on the node itself are fine.
        w.ok(with_mtime(with_mode(setattr(p.clone()), 0o600), t(9)));
        w.ok(setxattr(p.clone(), "trusted.node", b"1"));
        w.ok(Op::Barrier);
        let m = lstat(&w.m(name));
        assert_eq!((m.mode() & 0o7777, m.mtime()), (0o600, 9));
    }
    // A directory is not a file either.
    w.ok(mkdir(rp("dir")));
    assert_eq!(w.refused(write(rp("dir"), 0), b"x"), libc::EISDIR);
    assert_eq!(w.refused(create(rp("dir")), &[]), libc::EISDIR);
    w.assert_outside_unchanged();
}

#[test]
fn a_write_without_mtime_leaves_the_mirrors_own_and_setattr_sets_it() {
    let mut w = World::new();
    w.ok(create(rp("f")));
    // With an mtime: exactly that one.
    w.ok_with(write(rp("f"), 0), b"one");
    assert_eq!(lstat(&w.m("f")).mtime(), 2_000);
    // Without: the write's own (now), not the one before.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_else(|e| panic!("clock: {e}"));
    w.ok_with(
        Op::Write {
            path: rp("f"),
            offset: 3,
            mtime: TimeSet::Omit,
        },
        b"two",
    );
    let md = lstat(&w.m("f"));
    assert!(
        md.mtime() >= before,
        "mtime {} before the write",
        md.mtime()
    );
    assert_eq!(std::fs::read(w.m("f")).unwrap_or_default(), b"onetwo");
    // The exact one follows as a setattr.
    w.ok(Op::SetAttr {
        path: rp("f"),
        mode: None,
        uid: None,
        gid: None,
        size: None,
        atime: TimeSet::Omit,
        mtime: TimeSet::At(tn(3_000, 42)),
    });
    let md = lstat(&w.m("f"));
    assert_eq!((md.mtime(), md.mtime_nsec()), (3_000, 42));
}
