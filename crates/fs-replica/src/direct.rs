//! Large writes go to the backing disk directly (O_DIRECT), from a buffer
//! that is then handed, without another copy, to the replicator; large
//! reads come from it directly too (into a per-thread aligned buffer, see
//! `Filesystem::read`).
//!
//! Why: on the virtual machines this runs on, filling fresh page-cache pages
//! costs about 2 CPU seconds per GiB while a direct write costs about 0.15
//! (measured with dd), and a replicated write would otherwise fill pages
//! twice on this node (the kernel's FUSE cache, then the backing file's).
//! The data the application wrote stays in the FUSE page cache while its
//! file is open; what reads it later from the backing reads it from disk.
//!
//! Only requests of at least `hapair_proto::buf::DIRECT_MIN_BYTES`, at an offset and of a
//! length in whole [`DIRECT_ALIGN`] blocks, take this path; a filesystem
//! that refuses direct I/O turns it off for the mount.

pub(crate) use hapair_proto::buf::{direct_eligible as eligible, BufPool, PooledBuf, DIRECT_ALIGN};
