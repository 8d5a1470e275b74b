//! The open-file limit of the processes that serve FUSE mounts.
//!
//! A mount holds one descriptor (`O_PATH`) for every inode the kernel keeps
//! looked up (fs-replica's inode table), so the usual soft limit of 1,024
//! (systemd's default for services) would make creates, lookups and
//! listings fail with EMFILE once about a thousand files are in the
//! kernel's cache. `raise` lifts the soft limit to the hard one; the
//! application the daemon starts gets the original soft limit back
//! (`restore_for_children`), so that what it inherits does not change.

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use std::sync::OnceLock;
use tracing::{info, warn};

/// The soft limit this process started with, if `raise` changed it.
static ORIGINAL_SOFT: OnceLock<u64> = OnceLock::new();

/// Raises the soft open-file limit to the hard limit. Never fails: a limit
/// that cannot be raised is reported, and the mount works up to it.
pub fn raise() {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                let _ = ORIGINAL_SOFT.set(soft);
                info!(from = soft, to = hard, "open-file limit raised");
            }
            Err(e) => warn!(
                soft,
                hard,
                "cannot raise the open-file limit ({e}); the mount serves at most about {soft} cached files"
            ),
        },
        Ok(_) => {}
        Err(e) => warn!("cannot read the open-file limit: {e}"),
    }
}

/// Gives the processes `c` starts the soft limit this process started with.
pub fn restore_for_children(c: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let Some(&soft) = ORIGINAL_SOFT.get() else {
        return;
    };
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two system calls (getrlimit and setrlimit, both
    // async-signal-safe); it allocates nothing and takes no lock.
    unsafe {
        c.pre_exec(move || {
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
            setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard)?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulimit_n(restore: bool) -> u64 {
        let mut c = std::process::Command::new("/bin/sh");
        c.args(["-c", "ulimit -n"]);
        if restore {
            restore_for_children(&mut c);
        }
        let out = c.output().expect("running sh");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("ulimit -n prints a number")
    }

    #[test]
    fn raises_the_soft_limit_and_gives_children_the_original() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert!(hard > 512, "the hard open-file limit here is only {hard}");
        let low = 512;
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).expect("lowering the soft limit");
        raise();
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit"),
            (hard, hard)
        );
        assert_eq!(
            ulimit_n(false),
            hard,
            "a plain child inherits the raised limit"
        );
        assert_eq!(
            ulimit_n(true),
            low,
            "the application gets the original back"
        );
    }
}
