//! The mount's state directory: status, degraded-mode journal, clean marker.
//!
//! ```text
//! STATE_DIR/status.json   what the mount is doing (rewritten atomically)
//! STATE_DIR/journal       degraded-mode journal (see hapair_repl_core::journal)
//! STATE_DIR/clean         present only after a clean shutdown with the mirror in sync
//! ```
//! The state directory must not lie inside the replicated directory.

use anyhow::Context;
use hapair_repl_core::journal::{self, DirtyRecord, DirtySet};
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The mount's status as written to status.json (documented in the README).
#[derive(Serialize, Clone, Debug, Default)]
pub struct Status {
    /// "syncing", "replicating", "resyncing" or "degraded".
    pub state: String,
    pub mode: String,
    pub dir: String,
    pub peer: String,
    pub pid: u32,
    pub last_seq: u64,
    pub applied_seq: u64,
    pub durable_seq: u64,
    pub inflight_bytes: u64,
    pub degraded_reason: Option<String>,
    pub journal_records: u64,
    /// The mount may acknowledge writes without its mirror (always for a
    /// standalone mount; under the supervisor, while it serves alone).
    pub alone_allowed: bool,
    /// The kernel holds the FUSE mount: what is written into `dir` from now
    /// on goes through the mount (false while it starts and once unmounted).
    pub serving: bool,
    /// Barriers recorded right after a write, before the application asked
    /// for a durability point (see `hapair_repl_core::early`), and the
    /// durability points that found one still covering everything.
    pub early_barriers: u64,
    pub early_barriers_reused: u64,
    /// Polls for the mirror's acknowledgement of a durability point (see
    /// `crate::poll::AckPolling`), and those that ended with it.
    pub ack_polls: u64,
    pub ack_polls_answered: u64,
}

#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(dir: &Path) -> anyhow::Result<StateDir> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The default state directory of a mount of `dir`.
    pub fn default_for(dir: &Path) -> PathBuf {
        let mut name = String::new();
        for c in dir.to_string_lossy().chars() {
            name.push(if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            });
        }
        PathBuf::from("/var/lib/hapair/mounts").join(name.trim_start_matches('_'))
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    fn clean_path(&self) -> PathBuf {
        self.dir.join("clean")
    }

    pub fn open_journal_append(&self) -> anyhow::Result<File> {
        let p = self.journal_path();
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&p)
            .with_context(|| format!("opening journal {}", p.display()))
    }

    /// Reads the journal, truncating a torn tail left by a crash.
    pub fn read_journal(&self) -> anyhow::Result<Vec<DirtyRecord>> {
        let p = self.journal_path();
        let mut data = Vec::new();
        match File::open(&p) {
            Ok(mut f) => {
                f.read_to_end(&mut data)
                    .with_context(|| format!("reading journal {}", p.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("opening journal {}", p.display())),
        }
        let d = journal::decode_all(&data);
        if d.torn_tail {
            tracing::warn!(
                "journal {} has a damaged tail after {} records; a full compare will be made",
                p.display(),
                d.records.len()
            );
            let mut recs = d.records;
            recs.push(DirtyRecord::Full);
            return Ok(recs);
        }
        Ok(d.records)
    }

    pub fn dirty_set(&self) -> anyhow::Result<DirtySet> {
        Ok(DirtySet::from_records(&self.read_journal()?))
    }

    /// Appends records and makes them durable.
    pub fn append_journal(&self, recs: &[DirtyRecord]) -> anyhow::Result<()> {
        let mut f = self.open_journal_append()?;
        let mut buf = Vec::new();
        for r in recs {
            journal::encode(r, &mut buf);
        }
        f.write_all(&buf).context("appending to journal")?;
        f.sync_data().context("syncing journal")?;
        Ok(())
    }

    /// Forgets the journal once the mirror holds everything durably.
    pub fn clear_journal(&self) -> anyhow::Result<()> {
        match fs::remove_file(self.journal_path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("removing journal"),
        }
    }

    /// True if the last run ended cleanly; removes the marker (this run has
    /// not ended yet).
    pub fn take_clean_marker(&self) -> anyhow::Result<bool> {
        match fs::remove_file(self.clean_path()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).context("removing clean marker"),
        }
    }

    pub fn set_clean_marker(&self) -> anyhow::Result<()> {
        let f = File::create(self.clean_path()).context("writing clean marker")?;
        f.sync_all().context("syncing clean marker")?;
        Ok(())
    }

    pub fn write_status(&self, s: &Status) -> anyhow::Result<()> {
        let tmp = self.dir.join("status.json.tmp");
        let body = serde_json::to_vec_pretty(s).context("encoding status")?;
        fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, self.dir.join("status.json")).context("publishing status.json")?;
        Ok(())
    }
}
