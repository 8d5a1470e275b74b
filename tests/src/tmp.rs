//! `TestDir`: a directory /tmp/hapair-test-<name>-XXXX removed on drop
//! (kept if `HAPAIR_TEST_KEEP` is set, to look at after a failure).

use std::path::{Path, PathBuf};

pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let d = tempfile::Builder::new()
            .prefix(&format!("hapair-test-{name}-"))
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("creating a temp dir in /tmp: {e}"));
        let path = d.keep();
        // Canonical, because /proc/mounts shows canonical mount points.
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// Creates (and returns) a subdirectory.
    pub fn mkdir(&self, p: impl AsRef<Path>) -> PathBuf {
        let d = self.path.join(p);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        d
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("HAPAIR_TEST_KEEP").is_some() {
            eprintln!("TestDir: kept {} (HAPAIR_TEST_KEEP)", self.path.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("TestDir: removing {}: {e}", self.path.display());
        }
    }
}
