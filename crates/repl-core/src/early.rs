//! Early barriers: making the mirror durable before the application asks.
//!
//! A transactional application writes, then fsyncs, then writes again: the
//! same number of writes before every durability point (one, for a log
//! appended record by record). Waiting for the fsync to send the barrier
//! puts the whole mirror side (the trip to the mirror, its sync, the trip
//! back) after the application's fsync call, in series with it. Once the
//! pattern is clear, the mount records a barrier right after the write that
//! completes it: the mirror syncs while the application's write returns
//! and its fsync arrives and syncs the local disk, and the fsync, finding
//! that barrier still the last thing recorded, reuses it (see
//! `last_barrier` in the adapter) and usually finds it already durable.
//!
//! Patterns are followed per file (`EarlyFiles`): concurrent writers, or a
//! database's log and data files, each keep their own count.
//!
//! A barrier only ever makes the mirror durable sooner, so a wrong guess
//! costs one sync of the mirror's disk, never a guarantee. Guesses are made
//! only after the same count of writes to a file preceded `STREAK` of its
//! durability points in a row, and at most one per durability point.

/// Durability points in a row with the same count of writes before them
/// before the next such count is guessed.
pub const STREAK: u32 = 3;
/// Writes before a durability point beyond which no guess is made (a bulk
/// writer syncing now and then: a barrier after the Nth write would save
/// nothing worth a wrong guess).
pub const MAX_WRITES: u32 = 16;

/// The predictor of one file (the application's pattern is per file: a
/// log and a data file each have their own); no clock, no I/O.
#[derive(Clone, Debug, Default)]
pub struct EarlyBarrier {
    /// Writes recorded since the last durability point.
    writes: u32,
    /// Writes before the last durability point.
    last: u32,
    /// Durability points in a row preceded by `last` writes.
    streak: u32,
}

impl EarlyBarrier {
    pub fn new() -> Self {
        Self::default()
    }

    /// A write was recorded. True: record a barrier right after it.
    pub fn on_write(&mut self) -> bool {
        self.writes = self.writes.saturating_add(1);
        self.streak >= STREAK
            && self.last > 0
            && self.last <= MAX_WRITES
            && self.writes == self.last
    }

    /// The application asked for a durability point of this file.
    pub fn on_durability_point(&mut self) {
        if self.writes == self.last {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.last = self.writes;
            self.streak = 1;
        }
        self.writes = 0;
    }
}

/// The predictors of the files written lately, by a key the caller picks
/// (an inode number). At most `FILES` of them: one more clears them all
/// (each pattern is learnt again in `STREAK` durability points), so that
/// the memory stays bounded whatever the application does.
#[derive(Debug, Default)]
pub struct EarlyFiles {
    files: std::collections::HashMap<u64, EarlyBarrier>,
}

/// Files whose patterns are followed at once.
pub const FILES: usize = 1024;

impl EarlyFiles {
    pub fn new() -> Self {
        Self::default()
    }

    fn file(&mut self, key: u64) -> &mut EarlyBarrier {
        if self.files.len() >= FILES && !self.files.contains_key(&key) {
            self.files.clear();
        }
        self.files.entry(key).or_default()
    }

    /// A write of `key` was recorded. True: record a barrier right after it.
    pub fn on_write(&mut self, key: u64) -> bool {
        self.file(key).on_write()
    }

    /// The application asked for a durability point of `key`.
    pub fn on_durability_point(&mut self, key: u64) {
        self.file(key).on_durability_point();
    }

    /// Files followed now.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `pattern` (writes before each durability point) and returns,
    /// per durability point, whether a write before it was guessed.
    fn run(pattern: &[u32]) -> Vec<bool> {
        let mut e = EarlyBarrier::new();
        pattern
            .iter()
            .map(|&n| {
                let mut guessed_at = None;
                for i in 1..=n {
                    if e.on_write() {
                        assert!(guessed_at.is_none(), "two guesses before one point");
                        guessed_at = Some(i);
                    }
                }
                // A guess is only ever made on the last write before the point.
                if let Some(i) = guessed_at {
                    assert_eq!(i, n, "guessed on write {i} of {n}");
                }
                e.on_durability_point();
                guessed_at.is_some()
            })
            .collect()
    }

    #[test]
    fn a_steady_writer_is_guessed_after_the_streak() {
        let got = run(&[1; 8]);
        assert_eq!(got, [false, false, false, true, true, true, true, true]);
        let got = run(&[3; 6]);
        assert_eq!(got, [false, false, false, true, true, true]);
    }

    #[test]
    fn a_change_of_pattern_costs_one_wrong_guess_then_a_new_streak() {
        let mut e = EarlyBarrier::new();
        for i in 0..4 {
            assert_eq!(e.on_write(), i == 3);
            e.on_durability_point();
        }
        // The application now writes twice per point: the first write is
        // guessed (wrongly), the second is not, and the streak restarts.
        assert!(e.on_write(), "steady 1-write pattern guessed");
        assert!(!e.on_write(), "no second guess before the point");
        e.on_durability_point();
        for _ in 0..2 {
            assert!(!e.on_write());
            assert!(!e.on_write());
            e.on_durability_point();
        }
        // Three points of two writes each: the second write is guessed.
        assert!(!e.on_write());
        assert!(e.on_write());
        e.on_durability_point();
    }

    #[test]
    fn irregular_writers_and_bulk_writers_are_never_guessed() {
        assert!(run(&[1, 2, 1, 3, 1, 2, 2, 1, 3, 1]).iter().all(|g| !g));
        assert!(run(&[MAX_WRITES + 1; 10]).iter().all(|g| !g));
        // Points with no write before them (an fsync of a directory after
        // each create, say) give nothing to guess.
        assert!(run(&[0; 10]).iter().all(|g| !g));
    }

    #[test]
    fn counters_saturate_instead_of_overflowing() {
        let mut e = EarlyBarrier {
            writes: u32::MAX - 1,
            last: 1,
            streak: u32::MAX,
        };
        assert!(!e.on_write());
        assert!(!e.on_write());
        e.on_durability_point();
        assert_eq!(e.last, u32::MAX);
        assert_eq!(e.streak, 1);
    }

    #[test]
    fn files_are_followed_apart_and_their_number_is_bounded() {
        // Four writers, each on its own file, interleaved: one write then
        // one fsync each. A single count over all of them would see 0 to 4
        // writes before each point and never guess; per file, each is
        // guessed after its own streak.
        let mut f = EarlyFiles::new();
        let mut guessed = [0u32; 4];
        for _ in 0..10 {
            for k in 0..4u64 {
                if f.on_write(k) {
                    guessed[k as usize] += 1;
                }
            }
            for k in [2u64, 0, 3, 1] {
                f.on_durability_point(k);
            }
        }
        assert_eq!(guessed, [7; 4], "rounds 4 to 10 of each file");
        // More files than followed: memory stays bounded, patterns are
        // learnt again.
        for k in 0..(FILES as u64 * 3) {
            f.on_write(k);
            f.on_durability_point(k);
            assert!(f.len() <= FILES);
        }
    }
}
