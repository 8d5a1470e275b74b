//! An independent tree comparator (it shares no code with hapair's own
//! scanner, so a bug there cannot hide itself here).
//!
//! Both trees are walked side by side with `openat`/`fstatat` on directory
//! descriptors (so paths longer than PATH_MAX work) and never follow
//! symlinks. Compared: file type, permission bits, uid, gid, size (not for
//! directories, whose size is filesystem-specific), mtime to the
//! nanosecond, device numbers, symlink targets, link counts and hard-link
//! structure (which names share an inode), every extended attribute
//! (including `system.posix_acl_*`), and content. Content is read wherever
//! either side has data (SEEK_DATA/SEEK_HOLE; a hole reads as zeros by
//! definition), so multi-GiB sparse files compare in milliseconds; without a
//! complete data map everything is read. Allocation (sparse-ness)
//! differences are reported as information only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct DiffOptions {
    /// Skip the mtime of the two roots themselves.
    pub ignore_root_mtime: bool,
    /// Skip mtimes of all directories.
    pub ignore_dir_mtime: bool,
    /// Compare allocated blocks and data/hole maps (reported in `info`).
    pub sparse_info: bool,
    /// Names directly under the roots to leave out (e.g. "lost+found").
    pub exclude_top: Vec<String>,
    /// Stop after this many differences (the last line says so).
    pub max_diffs: usize,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            ignore_root_mtime: false,
            ignore_dir_mtime: false,
            sparse_info: true,
            exclude_top: Vec::new(),
            max_diffs: 200,
        }
    }
}

#[derive(Debug, Default)]
pub struct DiffReport {
    /// Real differences; empty means the trees are identical.
    pub diffs: Vec<String>,
    /// Allocation differences and other facts that are not failures.
    pub info: Vec<String>,
    /// How many entries were compared (both sides present).
    pub entries: u64,
}

/// Compares two trees with default options; returns the differences.
pub fn tree_diff(a: &Path, b: &Path) -> Vec<String> {
    tree_diff_with(a, b, &DiffOptions::default()).diffs
}

/// Compares two trees; see the module documentation.
pub fn tree_diff_with(a: &Path, b: &Path, opts: &DiffOptions) -> DiffReport {
    raise_fd_limit();
    let mut w = Walker {
        opts,
        report: DiffReport::default(),
        links_a: LinkMap::default(),
        links_b: LinkMap::default(),
        truncated: false,
    };
    let fa = match open_path(a) {
        Ok(f) => f,
        Err(e) => {
            w.report
                .diffs
                .push(format!("cannot open {}: {e}", a.display()));
            return w.report;
        }
    };
    let fb = match open_path(b) {
        Ok(f) => f,
        Err(e) => {
            w.report
                .diffs
                .push(format!("cannot open {}: {e}", b.display()));
            return w.report;
        }
    };
    let sa = fstat(fa.as_raw_fd());
    let sb = fstat(fb.as_raw_fd());
    match (sa, sb) {
        (Ok(sa), Ok(sb)) => {
            w.compare_meta(b"", &sa, &sb, fa.as_raw_fd(), fb.as_raw_fd(), None, true);
            if is_dir(&sa) && is_dir(&sb) {
                w.compare_dirs(b"", fa.as_raw_fd(), fb.as_raw_fd(), true);
            }
        }
        (ea, eb) => w.report.diffs.push(format!(
            "cannot stat roots: {:?} / {:?}",
            ea.err(),
            eb.err()
        )),
    }
    w.compare_links();
    if w.truncated {
        w.report
            .diffs
            .push(format!("... stopped after {} differences", opts.max_diffs));
    }
    w.report
}

/// Shows a relative path for messages ("." for the root); very long paths
/// are shortened in the middle so that a message stays readable.
fn show(rel: &[u8]) -> String {
    if rel.is_empty() {
        return ".".to_string();
    }
    let s = String::from_utf8_lossy(rel);
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 300 {
        return s.into_owned();
    }
    let head: String = chars[..60].iter().collect();
    let tail: String = chars[chars.len() - 200..].iter().collect();
    format!("{head}...({} bytes)...{tail}", rel.len())
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = rel.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn cstr(b: &[u8]) -> CString {
    // Names from readdir never contain NUL; a path argument could.
    CString::new(b).unwrap_or_else(|_| CString::new("\u{1}invalid-nul").unwrap_or_default())
}

fn open_path(p: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = cstr(p.as_os_str().as_bytes());
    // SAFETY: valid C string; the returned fd is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat(dir: RawFd, name: &[u8], flags: i32) -> std::io::Result<OwnedFd> {
    let c = cstr(name);
    // SAFETY: valid dirfd and C string; the returned fd is owned below.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> std::io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd valid, st valid for writes. Empty path + AT_EMPTY_PATH
    // stats the descriptor itself (works for O_PATH descriptors).
    let r = unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(st)
}

fn fstatat(dir: RawFd, name: &[u8]) -> std::io::Result<libc::stat> {
    let c = cstr(name);
    // SAFETY: as above.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid dirfd, C string and out-parameter.
    let r = unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if r < 0 {
        return Err(errno());
    }
    Ok(st)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "char device",
        libc::S_IFBLK => "block device",
        _ => "unknown",
    }
}

/// The names in a directory (without . and ..), sorted.
fn list_dir(dir: RawFd) -> std::io::Result<Vec<Vec<u8>>> {
    // A separate descriptor for fdopendir, which takes ownership of it.
    let d = openat(dir, b".", libc::O_RDONLY | libc::O_DIRECTORY)?;
    let raw = d.as_raw_fd();
    // SAFETY: raw is a valid directory fd; on success DIR owns it.
    let dp = unsafe { libc::fdopendir(raw) };
    if dp.is_null() {
        return Err(errno());
    }
    std::mem::forget(d);
    let mut names = Vec::new();
    loop {
        // SAFETY: dp is a valid DIR stream. errno is reset to tell the end
        // of the stream from an error.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir64(dp) };
        if ent.is_null() {
            let e = errno();
            // SAFETY: dp valid, closed once.
            unsafe { libc::closedir(dp) };
            if e.raw_os_error().unwrap_or(0) != 0 {
                return Err(e);
            }
            break;
        }
        // SAFETY: d_name is a NUL-terminated array inside the entry.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }
            .to_bytes()
            .to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// All xattrs of the object `fd` refers to (an O_PATH descriptor), read via
/// /proc/self/fd so that it works for symlinks and special files too: the
/// magic link resolves to the object itself, never to a symlink's target.
fn xattrs(fd: RawFd) -> std::io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let p = CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 4096];
    let len = loop {
        // SAFETY: valid path and buffer of the given length.
        let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = errno();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(out),
            _ => return Err(e),
        }
    };
    for name in buf[..len].split(|&c| c == 0).filter(|n| !n.is_empty()) {
        let cname = cstr(name);
        let mut val = vec![0u8; 256];
        let v = loop {
            // SAFETY: valid strings and buffer.
            let n = unsafe {
                libc::getxattr(
                    p.as_ptr(),
                    cname.as_ptr(),
                    val.as_mut_ptr().cast(),
                    val.len(),
                )
            };
            if n >= 0 {
                val.truncate(n as usize);
                break Some(val);
            }
            let e = errno();
            match e.raw_os_error() {
                Some(libc::ERANGE) if val.len() < (1 << 21) => val.resize(val.len() * 8, 0),
                // Removed between list and get: not there.
                Some(libc::ENODATA) => break None,
                _ => return Err(e),
            }
        };
        if let Some(v) = v {
            out.insert(name.to_vec(), v);
        }
    }
    Ok(out)
}

fn readlinkat(dir: RawFd, name: &[u8]) -> std::io::Result<Vec<u8>> {
    let c = cstr(name);
    let mut buf = vec![0u8; 4097];
    // SAFETY: valid dirfd, string, buffer.
    let n = unsafe { libc::readlinkat(dir, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(errno());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn read_full(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: valid fd and buffer range.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 {
            let e = errno();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    Ok(got)
}

fn pread_full(fd: RawFd, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: valid fd and buffer range.
        let n = unsafe {
            libc::pread(
                fd,
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
                (off + got as u64) as i64,
            )
        };
        if n < 0 {
            let e = errno();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    Ok(got)
}

/// All data segments of a file of `size` bytes, or None if the map could
/// not be completed (no SEEK_DATA support, or more than `limit` segments).
fn full_data_map(fd: RawFd, size: i64, limit: usize) -> Option<Vec<(u64, u64)>> {
    let mut v = Vec::new();
    let mut off = 0i64;
    while off < size {
        if v.len() >= limit {
            return None;
        }
        // SAFETY: valid fd.
        let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if d < 0 {
            // ENXIO: no data at or after `off`, the rest is a hole.
            return (errno().raw_os_error() == Some(libc::ENXIO)).then_some(v);
        }
        // SAFETY: valid fd.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 || h <= d {
            return None;
        }
        let h = h.min(size);
        if d < h {
            v.push((d as u64, h as u64));
        }
        off = h;
    }
    Some(v)
}

/// The byte ranges to read to compare two files of equal size: the union
/// of both data maps. None (read everything) when the sizes differ or a map
/// is incomplete.
fn data_union(fa: RawFd, fb: RawFd, a: &libc::stat, b: &libc::stat) -> Option<Vec<(u64, u64)>> {
    if a.st_size != b.st_size {
        return None;
    }
    let mut all = full_data_map(fa, a.st_size, 10_000)?;
    all.extend(full_data_map(fb, b.st_size, 10_000)?);
    all.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in all {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    Some(merged)
}

/// The data segments of a file (SEEK_DATA/SEEK_HOLE), at most 1000.
fn data_map(fd: RawFd, size: i64) -> Vec<(i64, i64)> {
    let mut v = Vec::new();
    let mut off = 0i64;
    while off < size && v.len() < 1000 {
        // SAFETY: valid fd.
        let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: valid fd.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            break;
        }
        v.push((d, h));
        off = h;
    }
    v
}

#[derive(Default)]
struct LinkMap {
    /// (dev, ino) of multiply linked non-directories -> their names.
    by_inode: HashMap<(u64, u64), BTreeSet<Vec<u8>>>,
    /// name -> (dev, ino), for those names.
    by_name: BTreeMap<Vec<u8>, (u64, u64)>,
}

impl LinkMap {
    fn add(&mut self, rel: &[u8], st: &libc::stat) {
        if st.st_nlink > 1 && !is_dir(st) {
            let k = (st.st_dev, st.st_ino);
            self.by_inode.entry(k).or_default().insert(rel.to_vec());
            self.by_name.insert(rel.to_vec(), k);
        }
    }
    fn group(&self, rel: &[u8]) -> BTreeSet<Vec<u8>> {
        match self.by_name.get(rel) {
            Some(k) => self.by_inode.get(k).cloned().unwrap_or_default(),
            None => BTreeSet::from([rel.to_vec()]),
        }
    }
}

struct Walker<'a> {
    opts: &'a DiffOptions,
    report: DiffReport,
    links_a: LinkMap,
    links_b: LinkMap,
    truncated: bool,
}

impl Walker<'_> {
    fn diff(&mut self, s: String) {
        if self.report.diffs.len() >= self.opts.max_diffs {
            self.truncated = true;
        } else {
            self.report.diffs.push(s);
        }
    }

    fn compare_dirs(&mut self, rel: &[u8], da: RawFd, db: RawFd, top: bool) {
        let (na, nb) = match (list_dir(da), list_dir(db)) {
            (Ok(a), Ok(b)) => (a, b),
            (ra, rb) => {
                self.diff(format!(
                    "{}: cannot list: A {:?} / B {:?}",
                    show(rel),
                    ra.err(),
                    rb.err()
                ));
                return;
            }
        };
        let all: BTreeSet<&Vec<u8>> = na.iter().chain(nb.iter()).collect();
        let (sa, sb): (BTreeSet<&Vec<u8>>, BTreeSet<&Vec<u8>>) =
            (na.iter().collect(), nb.iter().collect());
        for name in all {
            if top
                && self
                    .opts
                    .exclude_top
                    .iter()
                    .any(|x| x.as_bytes() == name.as_slice())
            {
                continue;
            }
            let path = join(rel, name);
            let ina = sa.contains(name);
            let inb = sb.contains(name);
            let sta = if ina {
                fstatat(da, name)
            } else {
                Err(std::io::Error::from_raw_os_error(libc::ENOENT))
            };
            let stb = if inb {
                fstatat(db, name)
            } else {
                Err(std::io::Error::from_raw_os_error(libc::ENOENT))
            };
            let (sta, stb) = match (sta, stb) {
                (Ok(a), Ok(b)) => (a, b),
                (Ok(a), Err(_)) => {
                    self.links_a.add(&path, &a);
                    self.diff(format!(
                        "{}: only in A ({})",
                        show(&path),
                        type_name(a.st_mode)
                    ));
                    continue;
                }
                (Err(_), Ok(b)) => {
                    self.links_b.add(&path, &b);
                    self.diff(format!(
                        "{}: only in B ({})",
                        show(&path),
                        type_name(b.st_mode)
                    ));
                    continue;
                }
                (Err(ea), Err(eb)) => {
                    self.diff(format!("{}: cannot stat: A {ea} / B {eb}", show(&path)));
                    continue;
                }
            };
            self.report.entries += 1;
            self.links_a.add(&path, &sta);
            self.links_b.add(&path, &stb);
            self.compare_meta(&path, &sta, &stb, da, db, Some(name), false);
            if is_dir(&sta) && is_dir(&stb) {
                match (
                    openat(da, name, libc::O_RDONLY | libc::O_DIRECTORY),
                    openat(db, name, libc::O_RDONLY | libc::O_DIRECTORY),
                ) {
                    (Ok(ca), Ok(cb)) => {
                        self.compare_dirs(&path, ca.as_raw_fd(), cb.as_raw_fd(), false)
                    }
                    (ra, rb) => self.diff(format!(
                        "{}: cannot open dir: A {:?} / B {:?}",
                        show(&path),
                        ra.err(),
                        rb.err()
                    )),
                }
            }
        }
    }

    /// Compares one entry. `name` is None for the roots (then `da`/`db`
    /// are the roots' own descriptors).
    #[allow(clippy::too_many_arguments)]
    fn compare_meta(
        &mut self,
        rel: &[u8],
        a: &libc::stat,
        b: &libc::stat,
        da: RawFd,
        db: RawFd,
        name: Option<&[u8]>,
        root: bool,
    ) {
        let p = show(rel);
        let (ta, tb) = (a.st_mode & libc::S_IFMT, b.st_mode & libc::S_IFMT);
        if ta != tb {
            self.diff(format!(
                "{p}: type {} vs {}",
                type_name(a.st_mode),
                type_name(b.st_mode)
            ));
            return;
        }
        if a.st_mode & 0o7777 != b.st_mode & 0o7777 && ta != libc::S_IFLNK {
            self.diff(format!(
                "{p}: mode {:04o} vs {:04o}",
                a.st_mode & 0o7777,
                b.st_mode & 0o7777
            ));
        }
        if a.st_uid != b.st_uid || a.st_gid != b.st_gid {
            self.diff(format!(
                "{p}: owner {}:{} vs {}:{}",
                a.st_uid, a.st_gid, b.st_uid, b.st_gid
            ));
        }
        if ta != libc::S_IFDIR && a.st_size != b.st_size {
            self.diff(format!("{p}: size {} vs {}", a.st_size, b.st_size));
        }
        if ta != libc::S_IFDIR && a.st_nlink != b.st_nlink {
            self.diff(format!("{p}: link count {} vs {}", a.st_nlink, b.st_nlink));
        }
        let skip_mtime = (root && self.opts.ignore_root_mtime)
            || (ta == libc::S_IFDIR && self.opts.ignore_dir_mtime);
        if !skip_mtime && (a.st_mtime != b.st_mtime || a.st_mtime_nsec != b.st_mtime_nsec) {
            self.diff(format!(
                "{p}: mtime {}.{:09} vs {}.{:09}",
                a.st_mtime, a.st_mtime_nsec, b.st_mtime, b.st_mtime_nsec
            ));
        }
        if (ta == libc::S_IFCHR || ta == libc::S_IFBLK) && a.st_rdev != b.st_rdev {
            self.diff(format!("{p}: device {:#x} vs {:#x}", a.st_rdev, b.st_rdev));
        }
        // O_PATH handles to the two objects, for xattrs and content.
        let (ha, hb) = match name {
            Some(n) => match (openat(da, n, libc::O_PATH), openat(db, n, libc::O_PATH)) {
                (Ok(x), Ok(y)) => (x, y),
                (rx, ry) => {
                    self.diff(format!(
                        "{p}: cannot open: A {:?} / B {:?}",
                        rx.err(),
                        ry.err()
                    ));
                    return;
                }
            },
            None => match (dup(da), dup(db)) {
                (Ok(x), Ok(y)) => (x, y),
                _ => return,
            },
        };
        if ta == libc::S_IFLNK {
            if let Some(n) = name {
                match (readlinkat(da, n), readlinkat(db, n)) {
                    (Ok(x), Ok(y)) if x == y => {}
                    (Ok(x), Ok(y)) => self.diff(format!(
                        "{p}: symlink target {:?} vs {:?}",
                        String::from_utf8_lossy(&x),
                        String::from_utf8_lossy(&y)
                    )),
                    (rx, ry) => self.diff(format!(
                        "{p}: readlink: A {:?} / B {:?}",
                        rx.err(),
                        ry.err()
                    )),
                }
            }
        }
        match (xattrs(ha.as_raw_fd()), xattrs(hb.as_raw_fd())) {
            (Ok(xa), Ok(xb)) => {
                if xa != xb {
                    let keys: BTreeSet<&Vec<u8>> = xa.keys().chain(xb.keys()).collect();
                    for k in keys {
                        let (va, vb) = (xa.get(k), xb.get(k));
                        if va != vb {
                            let ks = String::from_utf8_lossy(k);
                            let d = match (va, vb) {
                                (Some(_), None) => format!("{p}: xattr {ks} only in A"),
                                (None, Some(_)) => format!("{p}: xattr {ks} only in B"),
                                (Some(x), Some(y)) => format!(
                                    "{p}: xattr {ks} differs ({} vs {} bytes)",
                                    x.len(),
                                    y.len()
                                ),
                                (None, None) => continue,
                            };
                            self.diff(d);
                        }
                    }
                }
            }
            (rx, ry) => self.diff(format!(
                "{p}: listxattr: A {:?} / B {:?}",
                rx.err(),
                ry.err()
            )),
        }
        if ta == libc::S_IFREG {
            if let Some(n) = name {
                self.compare_content(&p, da, db, n, a, b);
            }
        }
    }

    fn compare_content(
        &mut self,
        p: &str,
        da: RawFd,
        db: RawFd,
        name: &[u8],
        a: &libc::stat,
        b: &libc::stat,
    ) {
        let (fa, fb) = match (
            openat(da, name, libc::O_RDONLY | libc::O_NOCTTY),
            openat(db, name, libc::O_RDONLY | libc::O_NOCTTY),
        ) {
            (Ok(x), Ok(y)) => (x, y),
            (rx, ry) => {
                self.diff(format!(
                    "{p}: cannot open for reading: A {:?} / B {:?}",
                    rx.err(),
                    ry.err()
                ));
                return;
            }
        };
        const CHUNK: usize = 1 << 20;
        let mut ba = vec![0u8; CHUNK];
        let mut bb = vec![0u8; CHUNK];
        // Sparse files (files over 4 GiB in the tests are mostly holes):
        // read only where either side has data; elsewhere both read as
        // zeros by definition of a hole.
        if let Some(ranges) = data_union(fa.as_raw_fd(), fb.as_raw_fd(), a, b) {
            for (start, end) in ranges {
                let mut off = start;
                while off < end {
                    let want = ((end - off) as usize).min(CHUNK);
                    let (ra, rb) = (
                        pread_full(fa.as_raw_fd(), &mut ba[..want], off),
                        pread_full(fb.as_raw_fd(), &mut bb[..want], off),
                    );
                    let (na, nb) = match (ra, rb) {
                        (Ok(x), Ok(y)) => (x, y),
                        (rx, ry) => {
                            self.diff(format!(
                                "{p}: read error at {off}: A {:?} / B {:?}",
                                rx.err(),
                                ry.err()
                            ));
                            return;
                        }
                    };
                    let n = na.min(nb);
                    if ba[..n] != bb[..n] {
                        let i = ba[..n]
                            .iter()
                            .zip(&bb[..n])
                            .position(|(x, y)| x != y)
                            .unwrap_or(0);
                        self.diff(format!("{p}: content differs at byte {}", off + i as u64));
                        return;
                    }
                    if na != want || nb != want {
                        self.diff(format!(
                            "{p}: short read at {off} (A {na}, B {nb} of {want} bytes)"
                        ));
                        return;
                    }
                    off += want as u64;
                }
            }
            self.sparse_info(p, fa.as_raw_fd(), fb.as_raw_fd(), a, b);
            return;
        }
        let mut off: u64 = 0;
        loop {
            let (na, nb) = match (
                read_full(fa.as_raw_fd(), &mut ba),
                read_full(fb.as_raw_fd(), &mut bb),
            ) {
                (Ok(x), Ok(y)) => (x, y),
                (rx, ry) => {
                    self.diff(format!(
                        "{p}: read error at {off}: A {:?} / B {:?}",
                        rx.err(),
                        ry.err()
                    ));
                    return;
                }
            };
            let n = na.min(nb);
            if ba[..n] != bb[..n] {
                let i = ba[..n]
                    .iter()
                    .zip(&bb[..n])
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                self.diff(format!("{p}: content differs at byte {}", off + i as u64));
                return;
            }
            if na != nb {
                self.diff(format!(
                    "{p}: content length differs after byte {}",
                    off + n as u64
                ));
                return;
            }
            if na == 0 {
                break;
            }
            off += na as u64;
        }
        self.sparse_info(p, fa.as_raw_fd(), fb.as_raw_fd(), a, b);
    }

    fn sparse_info(&mut self, p: &str, fa: RawFd, fb: RawFd, a: &libc::stat, b: &libc::stat) {
        if self.opts.sparse_info {
            if a.st_blocks != b.st_blocks {
                self.report.info.push(format!(
                    "{p}: allocated blocks {} vs {}",
                    a.st_blocks, b.st_blocks
                ));
            }
            let (ma, mb) = (data_map(fa, a.st_size), data_map(fb, b.st_size));
            if ma != mb {
                self.report
                    .info
                    .push(format!("{p}: data segments {ma:?} vs {mb:?}"));
            }
        }
    }

    /// Which names share an inode must be the same on both sides.
    fn compare_links(&mut self) {
        let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
        let names: BTreeSet<Vec<u8>> = self
            .links_a
            .by_name
            .keys()
            .chain(self.links_b.by_name.keys())
            .cloned()
            .collect();
        for n in names {
            if seen.contains(&n) {
                continue;
            }
            let ga = self.links_a.group(&n);
            let gb = self.links_b.group(&n);
            seen.extend(ga.iter().cloned());
            seen.extend(gb.iter().cloned());
            if ga != gb {
                let f = |g: &BTreeSet<Vec<u8>>| {
                    g.iter().map(|x| show(x)).collect::<Vec<_>>().join(", ")
                };
                self.diff(format!(
                    "hard links of {}: A {{{}}} vs B {{{}}}",
                    show(&n),
                    f(&ga),
                    f(&gb)
                ));
            }
        }
    }
}

fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: fd is valid; the duplicate is owned below.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(errno());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}

/// Deep trees keep one descriptor per level and side open: raise the soft
/// limit to the hard one.
fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit with valid out-parameters.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}
