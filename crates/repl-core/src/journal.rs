//! The degraded-mode journal: which paths and byte ranges changed while the
//! mirror was away, so that the resync that follows copies them even when
//! their size and mtime look unchanged.
//!
//! On disk, a journal is a sequence of records, each
//! `[len: u32 LE][crc32 of the body: u32 LE][body: postcard DirtyRecord]`.
//! The adapter appends records with plain `write` (durable against a crash
//! of the process) and fsyncs the file at the application's durability
//! points (durable against a crash of the machine). A crash can tear the last
//! record: [`decode_all`] stops at the first record that is short or fails
//! its checksum and reports how many bytes were good, so the adapter can
//! truncate the tail.

use hapair_proto::{Op, RelPath};
use serde::{Deserialize, Serialize};

/// Largest record body accepted when decoding (paths are bounded).
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

/// One fact about what changed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum DirtyRecord {
    /// Bytes `[offset, offset + len)` of the file at `path` changed.
    Range {
        path: RelPath,
        offset: u64,
        len: u64,
    },
    /// The entry at `path` changed in some other way (created, removed,
    /// renamed, attributes, xattrs, size): compare it, and everything below
    /// it if it is a directory.
    Path { path: RelPath },
    /// Nothing can be assumed: compare the whole tree (the mount started
    /// without its mirror, or the journal itself was lost).
    Full,
}

/// What an operation dirtied. `payload_len` is the length of a write's data.
pub fn records_for(op: &Op, payload_len: usize) -> Vec<DirtyRecord> {
    match op {
        Op::Write { path, offset, .. } => {
            vec![DirtyRecord::Range {
                path: path.clone(),
                offset: *offset,
                len: payload_len as u64,
            }]
        }
        Op::Fallocate {
            path, offset, len, ..
        } => {
            vec![DirtyRecord::Range {
                path: path.clone(),
                offset: *offset,
                len: *len,
            }]
        }
        Op::Barrier => Vec::new(),
        other => other
            .paths()
            .into_iter()
            .map(|p| DirtyRecord::Path { path: p.clone() })
            .collect(),
    }
}

/// Appends the encoding of `rec` to `out`.
pub fn encode(rec: &DirtyRecord, out: &mut Vec<u8>) {
    // Serialising a DirtyRecord into a Vec cannot fail (no maps, no
    // unsupported types); an error here would be a bug in this crate.
    let body = postcard::to_stdvec(rec).unwrap_or_default();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Result of decoding a journal file.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub records: Vec<DirtyRecord>,
    /// Bytes of the input that held whole, valid records.
    pub good_bytes: usize,
    /// True if bytes after `good_bytes` were ignored (a torn or corrupt tail).
    pub torn_tail: bool,
}

/// Decodes records until the end or the first damaged one.
pub fn decode_all(data: &[u8]) -> Decoded {
    let mut records = Vec::new();
    let mut pos = 0usize;
    while data.len() - pos >= 8 {
        let len =
            u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len > MAX_RECORD_BYTES || data.len() - pos - 8 < len {
            break;
        }
        let body = &data[pos + 8..pos + 8 + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        match postcard::from_bytes::<DirtyRecord>(body) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
        pos += 8 + len;
    }
    Decoded {
        records,
        good_bytes: pos,
        torn_tail: pos != data.len(),
    }
}

/// A summary of a journal for the resync: the paths whose content must be
/// compared byte for byte, and whether the whole tree must be.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    pub full: bool,
    /// Paths named by any record (sorted, deduplicated).
    pub paths: Vec<RelPath>,
}

impl DirtySet {
    pub fn from_records(records: &[DirtyRecord]) -> DirtySet {
        let mut full = false;
        let mut paths = Vec::new();
        for r in records {
            match r {
                DirtyRecord::Full => full = true,
                DirtyRecord::Range { path, .. } | DirtyRecord::Path { path } => {
                    paths.push(path.clone())
                }
            }
        }
        paths.sort();
        paths.dedup();
        DirtySet { full, paths }
    }

    pub fn is_empty(&self) -> bool {
        !self.full && self.paths.is_empty()
    }

    /// True if `p` or one of its ancestors is named (a renamed or created
    /// directory dirties what lies below it).
    pub fn covers(&self, p: &RelPath) -> bool {
        if self.full {
            return true;
        }
        let comps = p.components();
        (0..=comps.len()).any(|n| {
            RelPath::from_components(comps[..n].to_vec())
                .map(|prefix| self.paths.binary_search(&prefix).is_ok())
                .unwrap_or(false)
        })
    }
}
