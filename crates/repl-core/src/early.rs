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
//! A barrier only ever makes the mirror durable sooner, so a wrong guess
//! costs one sync of the mirror's disk, never a guarantee. Guesses are made
//! only after the same count of writes preceded `STREAK` durability points
//! in a row, and at most one per durability point.

/// Durability points in a row with the same count of writes before them
/// before the next such count is guessed.
pub const STREAK: u32 = 3;
/// Writes before a durability point beyond which no guess is made (a bulk
/// writer syncing now and then: a barrier after the Nth write would save
/// nothing worth a wrong guess).
pub const MAX_WRITES: u32 = 16;

/// The predictor. One per mount; no clock, no I/O.
#[derive(Clone, Debug, Default)]
pub struct EarlyBarrier {
    /// Writes recorded since the last durability point.
    writes: u32,
    /// Writes before the last durability point.
    last: u32,
    /// Durability points in a row preceded by `last` writes.
    streak: u32,
    /// Guesses made, and durability points that found the guessed barrier
    /// still the last thing recorded (for status and tests).
    guessed: u64,
    hits: u64,
}

impl EarlyBarrier {
    pub fn new() -> Self {
        Self::default()
    }

    /// A write was recorded. True: record a barrier right after it.
    pub fn on_write(&mut self) -> bool {
        self.writes = self.writes.saturating_add(1);
        let guess = self.streak >= STREAK
            && self.last > 0
            && self.last <= MAX_WRITES
            && self.writes == self.last;
        if guess {
            self.guessed += 1;
        }
        guess
    }

    /// The application asked for a durability point. `reused`: it found an
    /// early barrier still the last thing recorded.
    pub fn on_durability_point(&mut self, reused: bool) {
        if reused {
            self.hits += 1;
        }
        if self.writes == self.last {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.last = self.writes;
            self.streak = 1;
        }
        self.writes = 0;
    }

    /// Early barriers recorded so far.
    pub fn guessed(&self) -> u64 {
        self.guessed
    }

    /// Durability points that reused an early barrier (several concurrent
    /// ones may share one, so this can exceed `guessed`).
    pub fn hits(&self) -> u64 {
        self.hits
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
                e.on_durability_point(guessed_at.is_some());
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
            e.on_durability_point(i == 3);
        }
        // The application now writes twice per point: the first write is
        // guessed (wrongly), the second is not, and the streak restarts.
        assert!(e.on_write(), "steady 1-write pattern guessed");
        assert!(!e.on_write(), "no second guess before the point");
        e.on_durability_point(false);
        for _ in 0..2 {
            assert!(!e.on_write());
            assert!(!e.on_write());
            e.on_durability_point(false);
        }
        // Three points of two writes each: the second write is guessed.
        assert!(!e.on_write());
        assert!(e.on_write());
        e.on_durability_point(true);
        assert_eq!((e.guessed(), e.hits()), (3, 2));
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
            guessed: 0,
            hits: 0,
        };
        assert!(!e.on_write());
        assert!(!e.on_write());
        e.on_durability_point(false);
        assert_eq!(e.last, u32::MAX);
        assert_eq!(e.streak, 1);
    }
}
