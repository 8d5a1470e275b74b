//! Paths relative to the replicated root.
//!
//! A [`RelPath`] is a list of components, each a non-empty byte string that
//! contains neither `/` nor NUL and is not `.` or `..`. The checks run in the
//! constructor and again when a path is deserialised from the wire, so a
//! `RelPath` that exists cannot name anything outside the replicated root by
//! itself (symlinks along the way are the applier's concern: it must open
//! every component with `O_NOFOLLOW`).

use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

/// Longest path accepted on the wire, in bytes of all components. Far above
/// PATH_MAX on purpose: the mount serves paths longer than PATH_MAX through
/// relative lookups, and the mirror walks them component by component.
pub const MAX_PATH_BYTES: usize = 64 * 1024;

/// Longest component (NAME_MAX on Linux).
pub const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum PathError {
    #[error("empty path component")]
    Empty,
    #[error("path component '.' or '..'")]
    Dot,
    #[error("path component contains '/' or NUL")]
    BadByte,
    #[error("path component longer than 255 bytes")]
    NameTooLong,
    #[error("path longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
}

/// A validated path below the replicated root. The empty path is the root.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[serde(try_from = "Vec<Vec<u8>>", into = "Vec<Vec<u8>>")]
pub struct RelPath(Vec<Vec<u8>>);

pub fn validate_name(name: &[u8]) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::Empty);
    }
    if name == b"." || name == b".." {
        return Err(PathError::Dot);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(PathError::NameTooLong);
    }
    if name.iter().any(|b| *b == b'/' || *b == 0) {
        return Err(PathError::BadByte);
    }
    Ok(())
}

impl RelPath {
    /// The replicated root.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Builds a path from components, validating each.
    pub fn from_components(components: Vec<Vec<u8>>) -> Result<Self, PathError> {
        let mut total = 0usize;
        for c in &components {
            validate_name(c)?;
            total += c.len() + 1;
        }
        if total > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        Ok(RelPath(components))
    }

    /// Parses `a/b/c` (no leading `/`, no `.` or `..`, no empty component).
    pub fn parse(s: &[u8]) -> Result<Self, PathError> {
        if s.is_empty() {
            return Ok(RelPath::root());
        }
        Self::from_components(s.split(|b| *b == b'/').map(|c| c.to_vec()).collect())
    }

    /// This path with one more component.
    pub fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        validate_name(name)?;
        let mut v = self.0.clone();
        v.push(name.to_vec());
        let total: usize = v.iter().map(|c| c.len() + 1).sum();
        if total > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        Ok(RelPath(v))
    }

    pub fn components(&self) -> &[Vec<u8>] {
        &self.0
    }

    /// The parent directory and the last component; None for the root.
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        let (last, rest) = self.0.split_last()?;
        Some((RelPath(rest.to_vec()), last.as_slice()))
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0.len() >= other.0.len() && self.0[..other.0.len()] == other.0[..]
    }

    /// `a/b/c` as bytes (empty for the root).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.join(&b'/')
    }

    pub fn to_os_string(&self) -> std::ffi::OsString {
        OsStr::from_bytes(&self.to_bytes()).to_os_string()
    }
}

impl TryFrom<Vec<Vec<u8>>> for RelPath {
    type Error = PathError;
    fn try_from(v: Vec<Vec<u8>>) -> Result<Self, PathError> {
        RelPath::from_components(v)
    }
}

impl From<RelPath> for Vec<Vec<u8>> {
    fn from(p: RelPath) -> Self {
        p.0
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.to_bytes()))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str(".")
        } else {
            f.write_str(&String::from_utf8_lossy(&self.to_bytes()))
        }
    }
}
