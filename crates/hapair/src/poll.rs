//! When a thread polls instead of parking: the mirror's reader, for the
//! next operation (`Polling`), and the mount's network thread, for the
//! acknowledgement of a durability point (`AckPolling`); and the one thing
//! both read from the machine, the CPU time the host steals (`Steal`).

use std::time::{Duration, Instant};

/// How long the reader polls for the next operation before it parks (see
/// `Polling`).
const POLL_FOR: Duration = Duration::from_micros(500);
/// See `Polling`.
const POLL_MISSES: u32 = 2;

/// When the reader polls for the next operation instead of parking its
/// thread. Waking an idle thread costs a wake-up of an idle CPU, 25-50 µs
/// on a virtual machine, and an application that fsyncs often waits for the
/// mirror's reader once per durability point. So after acknowledging a
/// durability point, the reader polls for the next operation (yielding the
/// CPU to any other thread that wants it, then to the runtime's other
/// tasks, which are what move received packets into the stream) for up to
/// `POLL_FOR`. It stops after `POLL_MISSES` such polls in a row found
/// nothing, and starts again once an operation follows a durability point
/// within `POLL_FOR`: rare durability points cost at most `POLL_MISSES`
/// polls, and a bulk stream (few durability points) none.
///
/// It polls only while the host gives this machine its CPUs (`Steal`): on a
/// virtual machine whose host is busy, a polling CPU is taken from the
/// machine's other threads, and b fell by half (1,456 to 805 IOPS, 1,876 to
/// 953) in such stretches with polling that did not look.
pub(crate) struct Polling {
    /// The last thing done was acknowledging a durability point.
    after_commit: bool,
    /// Waits after a durability point in a row that lasted `POLL_FOR` or
    /// more.
    misses: u32,
    steal: Steal,
}

impl Polling {
    pub(crate) fn new() -> Polling {
        Polling {
            after_commit: false,
            misses: 0,
            steal: Steal::new(),
        }
    }

    /// How long to poll before parking, for the next wait.
    pub(crate) fn budget(&mut self, now: Instant) -> Duration {
        if self.after_commit && self.misses < POLL_MISSES && self.steal.calm(now) {
            POLL_FOR
        } else {
            Duration::ZERO
        }
    }

    /// The next operation came after `waited`.
    pub(crate) fn arrived(&mut self, waited: Duration) {
        if std::mem::take(&mut self.after_commit) {
            if waited < POLL_FOR {
                self.misses = 0;
            } else {
                self.misses = self.misses.saturating_add(1);
            }
        }
    }

    /// What the reader did before its next wait: acknowledged a durability
    /// point, or not.
    pub(crate) fn done(&mut self, committed: bool) {
        self.after_commit = committed;
    }
}

/// One turn of a polling loop on a runtime thread: the CPU goes first to
/// any other thread ready to run on it (on one machine: the other side's,
/// or the application), then to this runtime's other tasks, among them the
/// drivers that move received packets into the streams.
pub(crate) async fn poll_turn() {
    std::thread::yield_now();
    tokio::task::yield_now().await;
}

/// How long the mount's network thread polls for one acknowledgement.
const ACK_POLL_FOR: Duration = Duration::from_micros(500);
/// Polls in a row that outlast `ACK_POLL_FOR` before a pause.
const ACK_POLL_MISSES: u32 = 2;
/// Durability points without polling after `ACK_POLL_MISSES`.
const ACK_POLL_PAUSE: u32 = 64;

/// When the mount's network thread polls for the mirror's acknowledgement
/// of a durability point instead of parking (see
/// `ReplClient::ack_poller`): the acknowledgement is then read as soon as
/// it arrives, without the wake-up of an idle CPU on the path of every
/// fsync. A poll starts when a durability point begins to wait (after the
/// local sync) and lasts up to `ACK_POLL_FOR`. After `ACK_POLL_MISSES`
/// polls in a row that ended without the acknowledgement (a slow disk or
/// link on the mirror's side), the next `ACK_POLL_PAUSE` durability points
/// are not polled for; and none is while the host steals CPU time from this
/// machine (`Steal`).
pub(crate) struct AckPolling {
    misses: u32,
    paused: u32,
    steal: Steal,
}

impl AckPolling {
    pub(crate) fn new() -> AckPolling {
        AckPolling {
            misses: 0,
            paused: 0,
            steal: Steal::new(),
        }
    }

    /// How long to poll for the acknowledgement of the durability point
    /// that starts waiting now (zero: park).
    pub(crate) fn budget(&mut self, now: Instant) -> Duration {
        if self.paused > 0 {
            self.paused -= 1;
            return Duration::ZERO;
        }
        if self.steal.calm(now) {
            ACK_POLL_FOR
        } else {
            Duration::ZERO
        }
    }

    /// A poll that `budget` allowed ended, with the acknowledgement or
    /// without it.
    pub(crate) fn ended(&mut self, acked: bool) {
        if acked {
            self.misses = 0;
            return;
        }
        self.misses += 1;
        if self.misses >= ACK_POLL_MISSES {
            self.misses = 0;
            self.paused = ACK_POLL_PAUSE;
        }
    }
}

/// How often `Steal` reads the machine's CPU times.
const STEAL_EVERY: Duration = Duration::from_millis(250);
/// Most `STEAL_EVERY` periods without polling after stolen time was seen.
const STEAL_HOLD_MAX: u32 = 32;

/// Whether the host lets this machine run: the CPU time stolen from it (by
/// the hypervisor, for other guests) from `/proc/stat`, read at most once
/// per `STEAL_EVERY`. A period in which more than 2 % of the CPU time was
/// stolen is busy, and so are the `hold` periods after it; `hold` doubles
/// with each busy period (up to `STEAL_HOLD_MAX`, 8 s), since polling can
/// itself make the host take CPU time back, and halves with each calm
/// period after the hold. A machine whose `/proc/stat` cannot be read counts
/// as busy (no polling), a machine that is not virtual as calm.
struct Steal {
    checked: Option<Instant>,
    /// (total, steal) CPU time at the last check, in clock ticks.
    last: Option<(u64, u64)>,
    /// Periods still to pass without polling.
    hold: u32,
    /// The hold the next busy period gets.
    backoff: u32,
    calm: bool,
}

impl Steal {
    fn new() -> Steal {
        Steal {
            checked: None,
            last: None,
            hold: 0,
            backoff: 1,
            calm: false,
        }
    }

    fn calm(&mut self, now: Instant) -> bool {
        if self
            .checked
            .is_some_and(|t| now.saturating_duration_since(t) < STEAL_EVERY)
        {
            return self.calm;
        }
        self.checked = Some(now);
        let times = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| cpu_times(&s));
        self.observe(times);
        self.calm
    }

    /// A new reading of the machine's (total, steal) CPU times, if any.
    fn observe(&mut self, times: Option<(u64, u64)>) {
        let low = match (self.last, times) {
            (Some((t0, s0)), Some((t1, s1))) => {
                Some(steal_is_low(t1.saturating_sub(t0), s1.saturating_sub(s0)))
            }
            _ => None,
        };
        self.last = times;
        match low {
            None => self.calm = false,
            Some(false) => {
                self.hold = self.backoff;
                self.backoff = (self.backoff * 2).min(STEAL_HOLD_MAX);
                self.calm = false;
            }
            Some(true) if self.hold > 0 => {
                self.hold -= 1;
                self.calm = false;
            }
            Some(true) => {
                self.backoff = (self.backoff / 2).max(1);
                self.calm = true;
            }
        }
    }
}

/// At most 2 % of `total` CPU time was stolen (and some time passed).
fn steal_is_low(total: u64, steal: u64) -> bool {
    total > 0 && steal.saturating_mul(50) <= total
}

/// The machine's total and stolen CPU time, in clock ticks, from the
/// `cpu` line of `/proc/stat` (user nice system idle iowait irq softirq
/// steal ...; guest time is already counted in user and nice).
fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    Some((v.iter().sum(), v[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Steal` that has seen a calm period and is past any hold.
    fn calm_steal() -> Steal {
        let mut s = Steal::new();
        s.observe(Some((1000, 0)));
        s.observe(Some((1050, 0)));
        assert!(s.calm);
        s
    }

    /// A calm `Steal` that just read /proc/stat at `now`.
    fn calm_steal_at(now: Instant) -> Steal {
        let mut s = calm_steal();
        s.checked = Some(now);
        s
    }

    #[test]
    fn cpu_times_reads_the_cpu_line() {
        let stat = "cpu  1781335 102 593197 6365755 227959 0 54130 324213 0 0\n\
                    cpu0 898816 41 302684 3157746 132094 0 18745 161487 0 0\n\
                    intr 1 2 3\n";
        let total = 1781335 + 102 + 593197 + 6365755 + 227959 + 54130 + 324213;
        assert_eq!(cpu_times(stat), Some((total, 324213)));
        // Kernels before steal was counted, and garbage: no reading.
        assert_eq!(cpu_times("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(cpu_times("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(cpu_times("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(cpu_times(""), None);
        // The one on this machine can be read.
        let here = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        assert!(cpu_times(&here).is_some(), "{here}");
    }

    #[test]
    fn steal_is_low_up_to_two_percent() {
        assert!(steal_is_low(50, 0));
        assert!(steal_is_low(50, 1));
        assert!(!steal_is_low(50, 2));
        assert!(steal_is_low(100, 2));
        assert!(!steal_is_low(100, 3));
        assert!(!steal_is_low(0, 0), "no time passed: no evidence");
    }

    #[test]
    fn stolen_time_stops_polling_for_longer_each_time_and_calm_brings_it_back() {
        let mut s = Steal::new();
        assert!(!s.calm, "nothing measured yet");
        s.observe(Some((1000, 0)));
        assert!(!s.calm, "one reading is no period");
        s.observe(Some((1050, 0)));
        assert!(s.calm);
        // A busy period: 1 period of hold, then 2, then 4 (busy in a row).
        s.observe(Some((1100, 10)));
        assert!(!s.calm);
        assert_eq!(s.hold, 1);
        s.observe(Some((1150, 30)));
        assert_eq!((s.calm, s.hold), (false, 2));
        s.observe(Some((1200, 50)));
        assert_eq!((s.calm, s.hold), (false, 4));
        // Calm periods pay the hold off first, then polling resumes.
        let mut t = 1200;
        for left in (0..4).rev() {
            t += 50;
            s.observe(Some((t, 50)));
            assert_eq!((s.calm, s.hold), (false, left));
        }
        t += 50;
        s.observe(Some((t, 50)));
        assert!(s.calm);
        // The back-off is bounded.
        for _ in 0..20 {
            t += 50;
            s.observe(Some((t, t)));
        }
        assert_eq!(s.hold, STEAL_HOLD_MAX);
        // An unreadable /proc/stat: busy, and the next reading starts over.
        let mut s = calm_steal();
        s.observe(None);
        assert!(!s.calm);
        s.observe(Some((5000, 0)));
        assert!(!s.calm);
        s.observe(Some((5050, 0)));
        assert!(s.calm);
    }

    #[test]
    fn polls_only_after_a_durability_point_and_stops_after_misses() {
        let now = Instant::now();
        let mut p = Polling::new();
        p.steal = calm_steal_at(now);
        assert_eq!(p.budget(now), Duration::ZERO, "nothing committed yet");
        p.done(false);
        assert_eq!(p.budget(now), Duration::ZERO, "no durability point");
        p.done(true);
        assert_eq!(p.budget(now), POLL_FOR);
        // The next operation came soon: keep polling.
        p.arrived(Duration::from_micros(100));
        p.done(true);
        assert_eq!(p.budget(now), POLL_FOR);
        // Two long waits in a row: stop.
        p.arrived(POLL_FOR * 4);
        p.done(true);
        assert_eq!(p.budget(now), POLL_FOR);
        p.arrived(POLL_FOR * 4);
        p.done(true);
        assert_eq!(p.budget(now), Duration::ZERO);
        // A quick follow-up (seen while parked) brings polling back.
        p.arrived(Duration::from_micros(100));
        p.done(true);
        assert_eq!(p.budget(now), POLL_FOR);
        // A busy host: no polling even right after a durability point.
        p.steal.calm = false;
        assert_eq!(p.budget(now), Duration::ZERO);
    }

    #[test]
    fn ack_polls_pause_after_misses_and_not_on_a_busy_host() {
        let now = Instant::now();
        let mut p = AckPolling::new();
        p.steal = calm_steal_at(now);
        assert_eq!(p.budget(now), ACK_POLL_FOR);
        // Acknowledged within the poll: poll again, whatever came before.
        p.ended(false);
        p.ended(true);
        assert_eq!(p.budget(now), ACK_POLL_FOR);
        p.ended(false);
        assert_eq!(p.budget(now), ACK_POLL_FOR, "one miss is not a pause");
        // The second miss in a row: a pause of ACK_POLL_PAUSE durability
        // points, then polling again.
        p.ended(false);
        for _ in 0..ACK_POLL_PAUSE {
            assert_eq!(p.budget(now), Duration::ZERO);
        }
        assert_eq!(p.budget(now), ACK_POLL_FOR);
        // A busy host: no polling.
        p.steal.calm = false;
        assert_eq!(p.budget(now), Duration::ZERO);
    }
}
