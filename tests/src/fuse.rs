//! `FuseMount`: unmounts a FUSE mount point when dropped (fusermount3 -u,
//! then a lazy `umount -l` if the mount is busy or its daemon is gone).

use crate::proc::Proc;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct FuseMount {
    path: PathBuf,
}

/// Decodes the octal escapes (`\040` etc.) of /proc/mounts fields.
fn unescape_mounts(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The filesystem type of the topmost mount exactly at `path`, if any.
pub fn mount_fstype(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let text = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let want = path.as_os_str().as_bytes();
    let mut found = None;
    for line in text.lines() {
        let mut f = line.split(' ');
        let (src, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
        if unescape_mounts(mnt) == want {
            // Later lines are mounted on top of earlier ones. A root mount
            // made with mount(2) directly has no subtype ("fuse"); hapair's
            // mounts are then recognised by their source, "hapair:<dir>".
            let fstype = if fstype == "fuse" && src.starts_with("hapair:") {
                "fuse.hapair"
            } else {
                fstype
            };
            found = Some(fstype.to_string());
        }
    }
    found
}

impl FuseMount {
    /// Guards `path` (made absolute). Does not mount anything.
    pub fn new(path: &Path) -> FuseMount {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        FuseMount { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a FUSE filesystem (any `fuse*` type) is mounted at the path.
    pub fn is_mounted(&self) -> bool {
        mount_fstype(&self.path).is_some_and(|t| t.starts_with("fuse"))
    }

    /// Waits until `fstype` is mounted at the path, failing early if the
    /// daemon `proc` exits first.
    pub fn wait_mounted(
        &self,
        fstype: &str,
        timeout: Duration,
        proc: &mut Proc,
    ) -> Result<(), String> {
        let end = Instant::now() + timeout;
        loop {
            if mount_fstype(&self.path).as_deref() == Some(fstype) {
                return Ok(());
            }
            if let Some(s) = proc.try_wait() {
                return Err(format!(
                    "{} exited ({}) before {} appeared as {fstype} in /proc/mounts; stderr tail:\n{}",
                    proc.name(),
                    crate::proc::describe(&s),
                    self.path.display(),
                    proc.stderr_tail(30)
                ));
            }
            if Instant::now() >= end {
                return Err(format!(
                    "{} not mounted as {fstype} after {timeout:?} (mounts there: {:?}); {} stderr tail:\n{}",
                    self.path.display(),
                    mount_fstype(&self.path),
                    proc.name(),
                    proc.stderr_tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until no FUSE mount remains at the path.
    pub fn wait_unmounted(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while self.is_mounted() {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Unmounts every FUSE layer at the path: fusermount3 -u, else umount -l.
    /// Returns whether the path is free of FUSE mounts afterwards.
    pub fn unmount(&self) -> bool {
        // Bounded: a path could in theory hold several stacked mounts.
        for _ in 0..4 {
            if !self.is_mounted() {
                return true;
            }
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.path)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        !self.is_mounted()
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.is_mounted() && !self.unmount() {
            eprintln!("FuseMount guard: could not unmount {}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(
            unescape_mounts("/tmp/a\\040b\\134c"),
            b"/tmp/a b\\c".to_vec()
        );
        assert_eq!(unescape_mounts("/x\\04"), b"/x\\04".to_vec());
    }

    #[test]
    fn root_is_mounted() {
        assert!(mount_fstype(Path::new("/")).is_some());
    }
}
