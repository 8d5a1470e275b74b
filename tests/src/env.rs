//! Where the binaries are, and what the machine must offer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

fn target_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        v.push(PathBuf::from(t));
    }
    v.push(workspace_root().join("target"));
    v
}

/// The `hapair` binary under test: `$HAPAIR_BIN`, else the workspace's
/// target/debug or target/release. Panics with the build command if absent,
/// because a missing binary must fail the test, not skip it.
pub fn hapair_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HAPAIR_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "HAPAIR_BIN={} does not exist: build it with `cargo build -p hapair`",
            p.display()
        );
        return p;
    }
    let mut tried = Vec::new();
    for t in target_dirs() {
        for profile in ["debug", "release"] {
            let p = t.join(profile).join("hapair");
            if p.is_file() {
                return p;
            }
            tried.push(p);
        }
    }
    panic!(
        "the hapair binary is missing (looked at {tried:?}): run `cargo build -p hapair` first, or set HAPAIR_BIN"
    );
}

/// Finds an external tool on PATH (plus ~/.cargo/bin, where `cargo install`
/// puts pjdfstest and fsx). Panics naming the installer if it is missing.
pub fn tool_path(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/root/.cargo/bin"));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` is not installed: run tests/scripts/install-deps.sh (as root)");
}

/// Fails the test (never skips it) unless we are root and /dev/fuse exists.
pub fn require_root_and_fuse() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (FUSE mounts as other users, network namespaces, chown)"
    );
    let fuse = Path::new("/dev/fuse");
    assert!(
        fuse.exists(),
        "/dev/fuse is missing: this test needs FUSE (modprobe fuse, or a machine that has it)"
    );
    assert!(
        Path::new("/usr/bin/fusermount3").exists() || Path::new("/bin/fusermount3").exists(),
        "fusermount3 is missing: run tests/scripts/install-deps.sh"
    );
}

/// Fails the test unless we are root (netns tests without FUSE).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root");
}

/// A UDP port that was free on `ip` a moment ago. The kernel picks it, so
/// parallel tests (and other test binaries) do not collide.
pub fn free_udp_port(ip: &str) -> u16 {
    let s = std::net::UdpSocket::bind((ip, 0))
        .unwrap_or_else(|e| panic!("binding a UDP socket on {ip}: {e}"));
    s.local_addr()
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("local_addr: {e}"))
}

/// A short unique tag for names (netns, interfaces, files) of this process.
pub fn unique_tag() -> String {
    static N: AtomicU16 = AtomicU16::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{}{}", std::process::id() % 100_000, n)
}

/// Test seeds: `$HAPAIR_TEST_SEED` if set (to replay), else from the clock.
/// Printed by the callers so a failure can be replayed.
pub fn seed() -> u64 {
    if let Some(s) = std::env::var("HAPAIR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(1);
    (now as u64) ^ (u64::from(std::process::id()) << 32)
}

/// splitmix64: a tiny deterministic generator for delays and data.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Serializes the heavy tests of one test binary (the machine has two
/// cores; timing-sensitive tests running side by side would measure each
/// other). A panicking holder does not poison it for the others.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
