//! Durable small files: the supervisor's persisted state (and the
//! witness's). Written as a whole to a temporary file, fsynced, renamed over
//! the old one, and the directory fsynced, so a crash leaves either the old
//! or the new content, never a mix.

use anyhow::Context;
use hapair_supervisor::PersistedState;
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn write_durably(path: &Path, body: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(body)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync of {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of {}", dir.display()))?;
    Ok(())
}

pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("supervisor.json")
}

/// The persisted supervisor state; the default for a node that never ran.
pub fn load_state(state_dir: &Path) -> anyhow::Result<PersistedState> {
    let p = state_path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => {
            let s: PersistedState = serde_json::from_slice(&b).with_context(|| {
                format!(
                    "{} is not a supervisor state file: inspect it (it records which data generation this node holds); \
                     remove it only to make this node start as one that never ran (it will wait for its peer or `hapair prim`)",
                    p.display()
                )
            })?;
            s.validate().map_err(|e| {
                anyhow::anyhow!("{}: inconsistent supervisor state: {e}", p.display())
            })?;
            Ok(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PersistedState::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

pub fn save_state(state_dir: &Path, s: &PersistedState) -> anyhow::Result<()> {
    let body = serde_json::to_vec_pretty(s).context("encoding the supervisor state")?;
    write_durably(&state_path(state_dir), &body)
}
