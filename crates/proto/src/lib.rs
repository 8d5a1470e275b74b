//! The hapair replication wire protocol.
//!
//! This crate performs no I/O. It defines what crosses the wire between a
//! mount (the primary side, "client") and a mirror (the secondary side,
//! "server"), how it is framed, and how every field is validated on the way
//! in. Anything that fails validation is an error for the caller to log and
//! drop; nothing here panics on input.
//!
//! # Framing
//! One QUIC bidirectional stream carries frames in both directions:
//!
//! ```text
//! +----------------+-----------------+----------------------+-------------------+
//! | total_len: u32 | header_len: u32 | header (postcard)    | payload (raw)     |
//! +----------------+-----------------+----------------------+-------------------+
//! ```
//! Both lengths are big-endian. `total_len` counts everything after itself.
//! Control messages are postcard-encoded; bulk file data (the bytes of a
//! write) travels as the raw payload so that it is never copied through serde.
//! A frame longer than [`MAX_FRAME_BYTES`] or a header longer than
//! [`MAX_HEADER_BYTES`] is refused before anything is allocated.

use serde::{Deserialize, Serialize};
use std::fmt;

pub use buf::{BufPool, PooledBuf};

pub mod buf;
mod path;
pub use path::{PathError, RelPath};

/// Version of the protocol spoken by this build. Both sides send it in the
/// handshake; a mismatch ends the connection with a clear error.
pub const PROTOCOL_VERSION: u32 = 3;

/// Longest directory key a hello may carry.
pub const MAX_DIR_KEY_BYTES: usize = 4096;

/// ALPN identifier used on the QUIC connection (replication traffic).
pub const ALPN_REPLICATION: &[u8] = b"hapair-repl/1";

/// Largest payload a single write operation may carry (1 MiB, the kernel's
/// FUSE `max_write` ceiling).
pub const MAX_WRITE_PAYLOAD: usize = 1 << 20;

/// Largest encoded header. Paths are bounded by [`path::MAX_PATH_BYTES`];
/// xattr values by [`MAX_XATTR_VALUE`]; manifest chunks by
/// [`MAX_MANIFEST_ENTRIES`]; this leaves room for all of them.
pub const MAX_HEADER_BYTES: usize = 4 << 20;

/// Largest frame on the wire (header + payload + the 4-byte header length).
pub const MAX_FRAME_BYTES: usize = MAX_HEADER_BYTES + MAX_WRITE_PAYLOAD + 4;

/// Largest extended attribute value (Linux's own limit is 64 KiB).
pub const MAX_XATTR_VALUE: usize = 64 * 1024;

/// Largest extended attribute name (Linux: 255 bytes).
pub const MAX_XATTR_NAME: usize = 255;

/// Most entries in one manifest chunk.
pub const MAX_MANIFEST_ENTRIES: usize = 1024;

/// Sequence number of an operation. The mount numbers operations from 1 in
/// the order it executed them; the mirror applies them in that order.
pub type Seq = u64;

/// A point in time, as stored in an inode (seconds and nanoseconds since the
/// Unix epoch).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

impl Timestamp {
    pub fn validate(&self) -> Result<(), ProtoError> {
        if self.nsec >= 1_000_000_000 {
            return Err(ProtoError::Invalid("timestamp nanoseconds out of range"));
        }
        Ok(())
    }
}

/// Which timestamp to set in a `SetAttr`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    /// Leave the timestamp as it is.
    Omit,
    /// Set it to this value.
    At(Timestamp),
}

/// Rename flags, as in renameat2(2).
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

/// A mutation of the replicated tree, as executed on the mount.
///
/// Every path is relative to the replicated root. The attributes carried
/// (owner, mode, times) are the *result* the mount observed after it executed
/// the call, so that the mirror reproduces the same state rather than
/// re-deriving it. `parent_mtime` fields carry the parent directory's mtime
/// after the call (None when the mount did not read it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write the frame's payload at `offset`. `mtime`: the file's mtime
    /// after the write, or `Omit` when the mount did not read it (the
    /// mirror's write then leaves its own time, and a later `SetAttr`
    /// carries the exact one; see the mount's mtime rule in fs-replica).
    Write {
        path: RelPath,
        offset: u64,
        mtime: TimeSet,
    },
    /// Create an empty regular file (fails on the mirror if the name exists
    /// as a non-regular file; an existing regular file is truncated to 0).
    Create {
        path: RelPath,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: Timestamp,
        parent_mtime: Option<Timestamp>,
    },
    /// Create a special file (FIFO, socket, device).
    Mknod {
        path: RelPath,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        mtime: Timestamp,
        parent_mtime: Option<Timestamp>,
    },
    Mkdir {
        path: RelPath,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: Timestamp,
        parent_mtime: Option<Timestamp>,
    },
    Symlink {
        path: RelPath,
        /// Raw bytes of the link target. Stored as is, never followed by the
        /// mirror.
        target: Vec<u8>,
        uid: u32,
        gid: u32,
        mtime: Timestamp,
        parent_mtime: Option<Timestamp>,
    },
    /// Make `new` another name of the inode named `existing`.
    Link {
        existing: RelPath,
        new: RelPath,
        parent_mtime: Option<Timestamp>,
    },
    Unlink {
        path: RelPath,
        parent_mtime: Option<Timestamp>,
    },
    Rmdir {
        path: RelPath,
        parent_mtime: Option<Timestamp>,
    },
    Rename {
        from: RelPath,
        to: RelPath,
        /// `RENAME_NOREPLACE` and/or `RENAME_EXCHANGE`.
        flags: u32,
        from_parent_mtime: Option<Timestamp>,
        to_parent_mtime: Option<Timestamp>,
    },
    /// Change attributes. `None`/`Omit` fields are left unchanged.
    SetAttr {
        path: RelPath,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: TimeSet,
        mtime: TimeSet,
    },
    SetXattr {
        path: RelPath,
        name: Vec<u8>,
        value: Vec<u8>,
        /// XATTR_CREATE / XATTR_REPLACE as in setxattr(2); the mirror applies
        /// with 0 (the mount already checked the condition).
        flags: u32,
    },
    RemoveXattr {
        path: RelPath,
        name: Vec<u8>,
    },
    /// fallocate(2) with its mode bits (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE...).
    Fallocate {
        path: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
        mtime: Timestamp,
    },
    /// A durability point: the mirror makes everything applied so far durable
    /// (fsync of what it dirtied, then the directories it changed) before it
    /// acknowledges this sequence number as durable.
    Barrier,
}

impl Op {
    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Create { .. } => "create",
            Op::Mknod { .. } => "mknod",
            Op::Mkdir { .. } => "mkdir",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::SetAttr { .. } => "setattr",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::Fallocate { .. } => "fallocate",
            Op::Barrier => "barrier",
        }
    }

    /// The paths this operation changes (for the degraded-mode journal).
    pub fn paths(&self) -> Vec<&RelPath> {
        match self {
            Op::Write { path, .. }
            | Op::Create { path, .. }
            | Op::Mknod { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Unlink { path, .. }
            | Op::Rmdir { path, .. }
            | Op::SetAttr { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::Fallocate { path, .. } => vec![path],
            Op::Link { existing, new, .. } => vec![existing, new],
            Op::Rename { from, to, .. } => vec![from, to],
            Op::Barrier => vec![],
        }
    }

    /// Validates every field that the decoder could not: paths that must not
    /// be the root, timestamps, name and value sizes, flag bits.
    /// `payload_len` is the length of the raw bytes that came with the frame.
    pub fn validate(&self, payload_len: usize) -> Result<(), ProtoError> {
        let not_root = |p: &RelPath| {
            if p.is_root() {
                Err(ProtoError::Invalid(
                    "operation names the replicated root itself",
                ))
            } else {
                Ok(())
            }
        };
        let ts = |t: &Option<Timestamp>| t.map(|t| t.validate()).unwrap_or(Ok(()));
        if !matches!(self, Op::Write { .. }) && payload_len != 0 {
            return Err(ProtoError::Invalid(
                "payload on an operation that takes none",
            ));
        }
        match self {
            Op::Write { offset, mtime, .. } => {
                if let TimeSet::At(t) = mtime {
                    t.validate()?;
                }
                if payload_len > MAX_WRITE_PAYLOAD {
                    return Err(ProtoError::Invalid("write payload too large"));
                }
                offset
                    .checked_add(payload_len as u64)
                    .filter(|end| *end <= i64::MAX as u64)
                    .ok_or(ProtoError::Invalid("write range overflows"))?;
            }
            Op::Create {
                path,
                mtime,
                parent_mtime,
                ..
            }
            | Op::Mknod {
                path,
                mtime,
                parent_mtime,
                ..
            }
            | Op::Mkdir {
                path,
                mtime,
                parent_mtime,
                ..
            } => {
                not_root(path)?;
                mtime.validate()?;
                ts(parent_mtime)?;
            }
            Op::Symlink {
                path,
                target,
                mtime,
                parent_mtime,
                ..
            } => {
                not_root(path)?;
                mtime.validate()?;
                ts(parent_mtime)?;
                if target.is_empty() || target.len() > 4095 || target.contains(&0) {
                    return Err(ProtoError::Invalid(
                        "symlink target empty, too long or has NUL",
                    ));
                }
            }
            Op::Link {
                existing,
                new,
                parent_mtime,
            } => {
                not_root(existing)?;
                not_root(new)?;
                ts(parent_mtime)?;
            }
            Op::Unlink { path, parent_mtime } | Op::Rmdir { path, parent_mtime } => {
                not_root(path)?;
                ts(parent_mtime)?;
            }
            Op::Rename {
                from,
                to,
                flags,
                from_parent_mtime,
                to_parent_mtime,
            } => {
                not_root(from)?;
                not_root(to)?;
                ts(from_parent_mtime)?;
                ts(to_parent_mtime)?;
                if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
                    || *flags == (RENAME_NOREPLACE | RENAME_EXCHANGE)
                {
                    return Err(ProtoError::Invalid("bad rename flags"));
                }
            }
            Op::SetAttr {
                mode,
                size,
                atime,
                mtime,
                ..
            } => {
                if let Some(m) = mode {
                    if m & !0o7777 != 0 {
                        return Err(ProtoError::Invalid("setattr mode has file-type bits"));
                    }
                }
                if let Some(s) = size {
                    if *s > i64::MAX as u64 {
                        return Err(ProtoError::Invalid("setattr size out of range"));
                    }
                }
                for t in [atime, mtime] {
                    if let TimeSet::At(t) = t {
                        t.validate()?;
                    }
                }
            }
            Op::SetXattr {
                name, value, flags, ..
            } => {
                validate_xattr_name(name)?;
                if value.len() > MAX_XATTR_VALUE {
                    return Err(ProtoError::Invalid("xattr value too large"));
                }
                if *flags & !3 != 0 {
                    return Err(ProtoError::Invalid("bad setxattr flags"));
                }
            }
            Op::RemoveXattr { name, .. } => validate_xattr_name(name)?,
            Op::Fallocate {
                path,
                offset,
                len,
                mtime,
                ..
            } => {
                not_root(path)?;
                mtime.validate()?;
                offset
                    .checked_add(*len)
                    .filter(|end| *end <= i64::MAX as u64)
                    .ok_or(ProtoError::Invalid("fallocate range overflows"))?;
            }
            Op::Barrier => {}
        }
        Ok(())
    }
}

fn validate_xattr_name(name: &[u8]) -> Result<(), ProtoError> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains(&0) {
        return Err(ProtoError::Invalid("xattr name empty, too long or has NUL"));
    }
    Ok(())
}

/// Replication mode (SPEC guarantee 1).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Durability points wait for the mirror's disk; writes in between are
    /// streamed behind (bounded lag).
    #[default]
    Sync,
    /// Every mutating call waits until the mirror applied it.
    Strict,
    /// Nothing waits for the mirror; the lag is still bounded.
    Async,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Strict => "strict",
            Mode::Async => "async",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Mode::Sync),
            "strict" => Ok(Mode::Strict),
            "async" => Ok(Mode::Async),
            other => Err(format!(
                "unknown mode '{other}': expected sync, strict or async"
            )),
        }
    }
}

/// Kind of an entry in a manifest.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// One entry of a tree listing, used by the initial (full) synchronisation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    pub path: RelPath,
    pub kind: EntryKind,
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Timestamp,
    pub rdev: u64,
    /// Symlink target, empty otherwise.
    pub target: Vec<u8>,
    /// For regular files with nlink > 1: an identifier shared by all names of
    /// the same inode within this manifest (the sender's inode number).
    pub link_group: Option<u64>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// xxh3-64 of the file's content, when it was asked for.
    pub content_hash: Option<u64>,
}

/// Messages from the mount to the mirror.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ToMirror {
    /// First message on a connection.
    Hello {
        version: u32,
        /// The mount's node name (checked against its certificate's name).
        node: String,
        mode: Mode,
        /// Which replicated directory this session is for: the key the
        /// mirror serves it under (the directory as written in the cluster
        /// configuration; empty for a standalone `hapair mirror`).
        dir: String,
        /// The seq of the first operation of this session (a mount that
        /// reconnects goes on with its own numbering). The mirror's
        /// acknowledgements start at `next_seq - 1`.
        next_seq: Seq,
    },
    /// Ask for a listing of the mirror's tree. `hash_content` asks for
    /// content hashes of regular files (expensive: reads every file).
    ManifestRequest { hash_content: bool },
    /// A mutation. Sequence numbers are strictly increasing by one.
    Op { seq: Seq, op: Op },
}

/// Messages from the mirror to the mount.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum FromMirror {
    HelloOk {
        version: u32,
        node: String,
    },
    /// The handshake is refused (version, unknown node, busy...).
    Refused {
        reason: String,
    },
    /// A part of the manifest; `last` marks the final chunk.
    Manifest {
        entries: Vec<ManifestEntry>,
        last: bool,
    },
    /// Everything up to `applied` is applied; everything up to `durable` is
    /// on the mirror's disk. Both are monotonic.
    Ack {
        applied: Seq,
        durable: Seq,
    },
    /// The mirror could not apply `seq` (its tree diverged from the mount's,
    /// or its disk failed). It applies nothing after it; the mount must
    /// resynchronise.
    Failed {
        seq: Seq,
        errno: i32,
        reason: String,
    },
}

/// Errors of decoding and validation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    #[error("frame header of {0} bytes exceeds the limit or the frame")]
    BadHeaderLength(usize),
    #[error("undecodable header: {0}")]
    Decode(String),
    #[error("invalid message: {0}")]
    Invalid(&'static str),
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
}

/// A decoded frame: a header and its raw payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<H> {
    pub header: H,
    pub payload: PooledBuf,
}

/// Encodes a frame into `out` (appending). Fails only if the header cannot
/// be serialised or the frame would exceed the limits.
pub fn encode_frame<H: Serialize>(
    header: &H,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    encode_frame_head(header, payload.len(), out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// Encodes the beginning of a frame into `out` (appending): the lengths and
/// the header of a frame whose `payload_len` payload bytes the caller sends
/// right after, from its own buffer (so that bulk data need not be copied
/// into the frame). Fails as [`encode_frame`] does.
pub fn encode_frame_head<H: Serialize>(
    header: &H,
    payload_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    let header_bytes =
        postcard::to_extend(header, Vec::new()).map_err(|e| ProtoError::Decode(e.to_string()))?;
    if header_bytes.len() > MAX_HEADER_BYTES {
        out.truncate(start);
        return Err(ProtoError::BadHeaderLength(header_bytes.len()));
    }
    let total = 4 + header_bytes.len() + payload_len;
    if total > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(ProtoError::FrameTooLarge(total));
    }
    out.extend_from_slice(&header_bytes);
    out[start..start + 4].copy_from_slice(&(total as u32).to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&(header_bytes.len() as u32).to_be_bytes());
    Ok(())
}

/// Reads the 4-byte length prefix. Returns the number of bytes that follow,
/// refusing lengths over the limit before anything is allocated.
pub fn frame_body_len(prefix: [u8; 4]) -> Result<usize, ProtoError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > MAX_FRAME_BYTES {
        return Err(ProtoError::FrameTooLarge(n));
    }
    if n < 4 {
        return Err(ProtoError::BadHeaderLength(n));
    }
    Ok(n)
}

/// Decodes the body of a frame (everything after the 4-byte length prefix).
pub fn decode_body<H: for<'de> Deserialize<'de>>(
    body: impl Into<PooledBuf>,
) -> Result<Frame<H>, ProtoError> {
    let body = body.into();
    if body.len() < 4 {
        return Err(ProtoError::BadHeaderLength(body.len()));
    }
    let hlen = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
    if hlen > MAX_HEADER_BYTES || hlen > body.len() - 4 {
        return Err(ProtoError::BadHeaderLength(hlen));
    }
    let (header, rest) = postcard::take_from_bytes::<H>(&body[4..4 + hlen])
        .map_err(|e| ProtoError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtoError::Decode("trailing bytes after header".into()));
    }
    // The payload is what follows the header, in the same memory.
    Ok(Frame {
        header,
        payload: body.advance(4 + hlen),
    })
}

/// Decodes and validates a message arriving at the mirror.
pub fn decode_to_mirror(body: impl Into<PooledBuf>) -> Result<Frame<ToMirror>, ProtoError> {
    let frame: Frame<ToMirror> = decode_body(body)?;
    match &frame.header {
        ToMirror::Op { op, .. } => op.validate(frame.payload.len())?,
        _ if !frame.payload.is_empty() => {
            return Err(ProtoError::Invalid("payload on a control message"))
        }
        ToMirror::Hello { node, .. } if node.is_empty() || node.len() > 64 => {
            return Err(ProtoError::Invalid("bad node name in hello"))
        }
        ToMirror::Hello { dir, .. } if dir.len() > MAX_DIR_KEY_BYTES => {
            return Err(ProtoError::Invalid("directory key too long in hello"))
        }
        ToMirror::Hello { next_seq, .. } if *next_seq == 0 || *next_seq == Seq::MAX => {
            return Err(ProtoError::Invalid("bad first seq in hello"))
        }
        _ => {}
    }
    Ok(frame)
}

/// Decodes a message arriving at the mount.
pub fn decode_from_mirror(body: impl Into<PooledBuf>) -> Result<Frame<FromMirror>, ProtoError> {
    let frame: Frame<FromMirror> = decode_body(body)?;
    if !frame.payload.is_empty() {
        return Err(ProtoError::Invalid("payload on a mirror message"));
    }
    if let FromMirror::Manifest { entries, .. } = &frame.header {
        if entries.len() > MAX_MANIFEST_ENTRIES {
            return Err(ProtoError::Invalid("manifest chunk too large"));
        }
    }
    Ok(frame)
}

#[cfg(test)]
mod tests;
