//! Byte buffers for large payloads: a bounded pool of reusable buffers whose
//! data can start on a [`DIRECT_ALIGN`] boundary, as O_DIRECT requires of
//! the memory it writes from.
//!
//! Why: a replicated 1 MiB write used to be copied three times more than
//! needed on the mirror (zeroing a fresh frame buffer, moving the payload
//! to its front after the header, copying it into an aligned buffer for the
//! direct write), and on the primary once into an aligned buffer. A frame
//! read into a pooled buffer whose payload lands aligned is written from
//! where it was received. Reused memory is also warm: fresh memory costs
//! page faults.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// The alignment of direct I/O buffers, offsets and lengths.
pub const DIRECT_ALIGN: usize = 4096;

/// Writes at least this large, at an offset and of a length in whole
/// [`DIRECT_ALIGN`] blocks, go to the disk directly (O_DIRECT) instead of
/// through the page cache, on both nodes (see [`direct_eligible`]).
pub const DIRECT_MIN_BYTES: usize = 128 << 10;

/// Buffers smaller than this are not pooled (nor aligned: they are never
/// written directly): a pooled buffer may be far larger than what it
/// holds, and many small ones can be queued at once.
pub const POOLED_MIN_BYTES: usize = DIRECT_MIN_BYTES;

/// Buffers kept for reuse (each about the largest payload, 1 MiB).
const POOL_BUFFERS: usize = 16;

/// Larger buffers (a frame with a large header, such as a manifest chunk)
/// are freed rather than kept: the pool holds at most 16 × 2 MiB.
const POOL_MAX_BUFFER_BYTES: usize = 2 << 20;

/// A bounded pool of reusable buffers. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct BufPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufPool {
    /// A buffer of `len` bytes whose byte at index `aligned_at` (at most
    /// `len`) lies on a [`DIRECT_ALIGN`] boundary. Its content is
    /// unspecified (zeros, or bytes of an earlier use of the memory): the
    /// caller overwrites all of it before anyone reads it.
    pub fn take(&self, len: usize, aligned_at: usize) -> PooledBuf {
        assert!(aligned_at <= len, "aligned_at {aligned_at} beyond {len}");
        if len < POOLED_MIN_BYTES {
            return PooledBuf::from(vec![0; len]);
        }
        let mut v = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        if v.len() < len + DIRECT_ALIGN {
            v = vec![0; len + DIRECT_ALIGN];
        }
        let addr = v.as_ptr() as usize + aligned_at;
        let off = (DIRECT_ALIGN - addr % DIRECT_ALIGN) % DIRECT_ALIGN;
        PooledBuf {
            v,
            off,
            len,
            pool: Some(self.clone()),
        }
    }

    /// A buffer holding a copy of `data`, starting on a [`DIRECT_ALIGN`]
    /// boundary if it is at least [`POOLED_MIN_BYTES`] long.
    pub fn copy_of(&self, data: &[u8]) -> PooledBuf {
        let mut b = self.take(data.len(), 0);
        b.copy_from_slice(data);
        b
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Bytes in a buffer of a [`BufPool`] (back to the pool on drop), or in a
/// plain vector.
pub struct PooledBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
    pool: Option<BufPool>,
}

impl PooledBuf {
    /// The bytes from `start` on, in the same memory (nothing is copied).
    pub fn advance(mut self, start: usize) -> PooledBuf {
        assert!(start <= self.len, "advance {start} beyond {}", self.len);
        self.off += start;
        self.len -= start;
        self
    }

    /// True if the data starts on a [`DIRECT_ALIGN`] boundary.
    pub fn is_aligned(&self) -> bool {
        is_aligned(self)
    }
}

/// True if a write of `len` bytes at `offset` may go directly to the disk
/// (given memory aligned for it).
pub fn direct_eligible(len: usize, offset: u64) -> bool {
    len >= DIRECT_MIN_BYTES
        && len.is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
}

/// True if `data` starts on a [`DIRECT_ALIGN`] boundary.
pub fn is_aligned(data: &[u8]) -> bool {
    (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

impl From<Vec<u8>> for PooledBuf {
    fn from(v: Vec<u8>) -> Self {
        let len = v.len();
        PooledBuf {
            v,
            off: 0,
            len,
            pool: None,
        }
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledBuf({} bytes)", self.len)
    }
}

impl PartialEq for PooledBuf {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PooledBuf {}

/// A clone is a plain vector (not pooled).
impl Clone for PooledBuf {
    fn clone(&self) -> Self {
        PooledBuf::from(self.to_vec())
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            if self.v.len() > POOL_MAX_BUFFER_BYTES {
                return;
            }
            let mut p = pool.0.lock().unwrap_or_else(|p| p.into_inner());
            if p.len() < POOL_BUFFERS {
                p.push(std::mem::take(&mut self.v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_aligned_where_asked_hold_the_data_and_are_reused() {
        let pool = BufPool::default();
        let data: Vec<u8> = (0..POOLED_MIN_BYTES).map(|i| i as u8).collect();
        let b = pool.copy_of(&data);
        assert!(b.is_aligned());
        assert_eq!(&b[..], &data[..]);
        let first = b.as_ptr();
        drop(b);
        assert_eq!(pool.kept(), 1);
        // Aligned at 37: the 37 bytes before are a header, say.
        let mut again = pool.take(POOLED_MIN_BYTES, 37);
        assert_eq!(again.len(), POOLED_MIN_BYTES);
        again.fill(7);
        let rest = again.advance(37);
        assert!(rest.is_aligned());
        assert_eq!(rest.len(), POOLED_MIN_BYTES - 37);
        assert!(rest.iter().all(|&b| b == 7));
        let reused = rest.as_ptr() as usize - first as usize;
        assert!(reused <= DIRECT_ALIGN, "the buffer was reused");
    }

    #[test]
    fn small_buffers_are_plain_and_not_kept() {
        let pool = BufPool::default();
        let b = pool.copy_of(&[1, 2, 3]);
        assert_eq!(&b[..], &[1, 2, 3]);
        drop(b);
        assert_eq!(pool.kept(), 0);
        let v = PooledBuf::from(vec![4, 5]);
        assert_eq!(v.advance(1)[..], [5]);
    }

    #[test]
    fn only_large_block_aligned_writes_are_eligible() {
        assert!(direct_eligible(DIRECT_MIN_BYTES, 0));
        assert!(direct_eligible(1 << 20, 4096 * 7));
        assert!(!direct_eligible(DIRECT_MIN_BYTES - DIRECT_ALIGN, 0));
        assert!(!direct_eligible(DIRECT_MIN_BYTES + 1, 0));
        assert!(!direct_eligible(DIRECT_MIN_BYTES, 512));
    }

    #[test]
    fn the_pool_is_bounded() {
        let pool = BufPool::default();
        let bufs: Vec<_> = (0..POOL_BUFFERS + 5)
            .map(|_| pool.take(POOLED_MIN_BYTES, 0))
            .collect();
        drop(bufs);
        assert_eq!(pool.kept(), POOL_BUFFERS);
        // Nor does it keep very large buffers.
        let pool = BufPool::default();
        drop(pool.take(POOL_MAX_BUFFER_BYTES, 0));
        assert_eq!(pool.kept(), 0);
        drop(pool.take(POOL_MAX_BUFFER_BYTES - DIRECT_ALIGN, 0));
        assert_eq!(pool.kept(), 1);
    }
}
