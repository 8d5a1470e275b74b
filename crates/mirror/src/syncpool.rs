//! fsync of several files at once, for barriers that cover several files
//! (group commit of concurrent writers). On this machine kind an fsync of a
//! file is three synchronous I/Os (data, inode, cache flush); one after the
//! other, a barrier over four files took four times as long as over one.
//! With a few helper threads the I/Os overlap and the block layer merges the
//! cache flushes.

use crate::sys::{self, SysError};
use std::os::fd::RawFd;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// Helper threads (the calling thread syncs one file too).
const HELPERS: usize = 3;

struct Job {
    fd: RawFd,
    done: mpsc::Sender<Result<(), SysError>>,
}

/// Helper threads started on first use, stopped when dropped.
#[derive(Default)]
pub(crate) struct SyncPool {
    jobs: Option<mpsc::Sender<Job>>,
    helpers: Vec<JoinHandle<()>>,
}

impl SyncPool {
    /// The job queue, starting the helpers on first use; None if no helper
    /// thread could be started (then everything is synced inline).
    fn jobs(&mut self) -> Option<mpsc::Sender<Job>> {
        if self.jobs.is_none() && self.helpers.is_empty() {
            let (tx, rx) = mpsc::channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..HELPERS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("mirror-sync-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(job) = job else { return };
                        let _ = job.done.send(sys::fsync(job.fd));
                    });
                match spawned {
                    Ok(h) => self.helpers.push(h),
                    Err(_) => break,
                }
            }
            if !self.helpers.is_empty() {
                self.jobs = Some(tx);
            }
        }
        self.jobs.clone()
    }

    /// fsyncs every descriptor, several at a time. The descriptors must stay
    /// open until this returns (it waits for every fsync, even after an
    /// error). Returns the first error.
    pub(crate) fn fsync_all(&mut self, fds: &[RawFd]) -> Result<(), SysError> {
        let Some((last, rest)) = fds.split_last() else {
            return Ok(());
        };
        let jobs = if rest.is_empty() { None } else { self.jobs() };
        let (done_tx, done_rx) = mpsc::channel();
        let mut handed = 0;
        let mut first_err = None;
        for &fd in rest {
            let job = Job {
                fd,
                done: done_tx.clone(),
            };
            match &jobs {
                Some(j) if j.send(job).is_ok() => handed += 1,
                _ => {
                    if let Err(e) = sys::fsync(fd) {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        if let Err(e) = sys::fsync(*last) {
            first_err.get_or_insert(e);
        }
        for _ in 0..handed {
            match done_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(SysError::new(libc::EIO, "fsync helper gone"));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for SyncPool {
    fn drop(&mut self) {
        self.jobs = None;
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn syncs_every_descriptor_and_reports_the_first_error() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<std::fs::File> = (0..10)
            .map(|i| std::fs::File::create(dir.path().join(format!("f{i}"))).unwrap())
            .collect();
        let mut fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let mut pool = SyncPool::default();
        pool.fsync_all(&fds).unwrap();
        pool.fsync_all(&fds[..1]).unwrap();
        pool.fsync_all(&[]).unwrap();
        // A descriptor that is not open: EBADF, whichever thread syncs it,
        // and the others are still synced (and waited for).
        fds.insert(3, -1);
        let e = pool.fsync_all(&fds).unwrap_err();
        assert_eq!(e.errno, libc::EBADF);
        fds.push(-1);
        assert_eq!(pool.fsync_all(&fds).unwrap_err().errno, libc::EBADF);
        assert_eq!(pool.helpers.len(), HELPERS);
    }
}
