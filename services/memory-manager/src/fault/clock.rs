//! A cheap clock for per-fault timestamps: the CPU's time-stamp counter
//! where the kernel keeps time with it too (about 10 ns a reading here,
//! against 25 ns for `Instant::now()`; a fault takes six readings),
//! `Instant` elsewhere.
//!
//! Nothing is calibrated up front. The crate used before (quanta)
//! calibrated the counter at its first reading by spinning until its
//! estimate settled, up to 200 ms on a busy host, and that first reading
//! was a new daemon's first fault: the guest waited for it (the 70-200 ms
//! takeover stalls). Here the anchor ([`start`]) pairs one counter reading
//! with one `Instant`, and a conversion uses the rate since the anchor
//! ([`Rate`]), estimated again each time the counter has run twice as long
//! since the last estimate (at most a second apart): one `Instant` read,
//! and the estimate's error halves each time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// The longest the counter runs between two estimates of its rate, in
/// nanoseconds.
const MAX_REFINE_NS: f64 = 1e9;

/// Two `Instant` readings further apart than this around a counter reading
/// do not pair with it (the thread was preempted between them).
const PAIR_SLACK: Duration = Duration::from_micros(2);

/// What the clock reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The time-stamp counter (x86_64, the kernel's clocksource `tsc`).
    Tsc,
    /// Nanoseconds since the anchor, from `Instant`.
    Instant,
}

impl Source {
    /// The time-stamp counter if the kernel keeps time with it (so it is
    /// invariant and in step across CPUs), else `Instant`.
    fn detect() -> Self {
        const CURRENT: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
        let tsc = cfg!(target_arch = "x86_64") && std::fs::read_to_string(CURRENT).is_ok_and(|s| s.trim() == "tsc");
        if tsc {
            Source::Tsc
        } else {
            Source::Instant
        }
    }
}

struct Anchor {
    source: Source,
    ticks: u64,
    at: Instant,
    wall: SystemTime,
    rate: Rate,
}

impl Anchor {
    fn read(&self) -> u64 {
        match self.source {
            Source::Tsc => tsc(),
            Source::Instant => self.at.elapsed().as_nanos() as u64,
        }
    }
}

/// A time-stamp counter reading and the `Instant` it was taken at, read
/// between two `Instant`s close enough to pair (a few tries, then the
/// closest).
fn paired_tsc() -> (u64, Instant) {
    let mut best: Option<(Duration, u64, Instant)> = None;
    for _ in 0..4 {
        let before = Instant::now();
        let ticks = tsc();
        let after = Instant::now();
        let spread = after - before;
        let mid = before + spread / 2;
        if best.is_none_or(|(s, ..)| spread < s) {
            best = Some((spread, ticks, mid));
        }
        if spread <= PAIR_SLACK {
            break;
        }
    }
    let (_, ticks, at) = best.expect("at least one try");
    (ticks, at)
}

#[cfg(target_arch = "x86_64")]
fn tsc() -> u64 {
    // SAFETY: RDTSC reads a counter every x86_64 CPU has; it touches no
    // memory. It is used only where the kernel keeps time with it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
fn tsc() -> u64 {
    unreachable!("the time-stamp counter is only read on x86_64")
}

/// The counter's rate, in nanoseconds per tick, as estimated from the
/// counter and `Instant` since the anchor: a new estimate each time the
/// counter has run twice as long since the anchor as at the last one (at
/// most [`MAX_REFINE_NS`] apart). Lock-free: a conversion that races an
/// estimate uses the previous one.
#[derive(Debug)]
struct Rate {
    /// Nanoseconds per tick (`f64` bits); 0 before the first estimate.
    ns_per_tick: AtomicU64,
    /// Ticks since the anchor after which the next estimate is due.
    next: AtomicU64,
}

impl Rate {
    /// Before any estimate: the first conversion makes one.
    fn new() -> Self {
        Self { ns_per_tick: AtomicU64::new(0), next: AtomicU64::new(0) }
    }

    /// The rate to convert at `ticks` since the anchor; `estimate` returns
    /// (ticks, nanoseconds) since the anchor, read together, when a new
    /// estimate is due.
    fn at(&self, ticks: u64, estimate: impl FnOnce() -> (u64, f64)) -> f64 {
        let known = f64::from_bits(self.ns_per_tick.load(Ordering::Relaxed));
        let next = self.next.load(Ordering::Relaxed);
        if known > 0.0 && ticks < next {
            return known;
        }
        // One thread estimates; the others use what is known meanwhile.
        let claimed = self.next.compare_exchange(next, u64::MAX, Ordering::AcqRel, Ordering::Relaxed).is_ok();
        if !claimed && known > 0.0 {
            return known;
        }
        let (since, ns) = estimate();
        if since == 0 || ns <= 0.0 {
            // Too soon after the anchor to tell: the next conversion tries
            // again, and this one uses what is known (or 1 ns a tick).
            if claimed {
                self.next.store(next, Ordering::Release);
            }
            return if known > 0.0 { known } else { 1.0 };
        }
        let rate = ns / since as f64;
        if claimed {
            self.ns_per_tick.store(rate.to_bits(), Ordering::Relaxed);
            let longest = (MAX_REFINE_NS / rate) as u64;
            self.next.store(since.saturating_add(since.clamp(1, longest.max(1))), Ordering::Release);
        }
        rate
    }
}

fn anchor() -> &'static Anchor {
    static ANCHOR: OnceLock<Anchor> = OnceLock::new();
    ANCHOR.get_or_init(|| {
        let source = Source::detect();
        let (ticks, at) = match source {
            Source::Tsc => paired_tsc(),
            Source::Instant => (0, Instant::now()),
        };
        // Taken with the anchor's reading, which wall times count from.
        Anchor { source, ticks, at, wall: SystemTime::now(), rate: Rate::new() }
    })
}

/// Anchors the clock, so that readings taken later convert at a rate
/// estimated over the time since (the daemon calls it as it starts).
pub fn start() {
    anchor();
}

/// A raw reading, comparable only with other readings of this clock.
pub fn raw() -> u64 {
    anchor().read()
}

/// Nanoseconds between two raw readings (0 if `end` is before `start`).
pub fn nanos_between(start: u64, end: u64) -> u64 {
    let a = anchor();
    let ticks = end.saturating_sub(start);
    match a.source {
        Source::Instant => ticks,
        Source::Tsc => {
            let rate = a.rate.at(end.wrapping_sub(a.ticks), || {
                let (now, at) = paired_tsc();
                (now.wrapping_sub(a.ticks), (at - a.at).as_nanos() as f64)
            });
            (ticks as f64 * rate) as u64
        }
    }
}

/// The wall-clock time of a raw reading.
pub fn wall_time(reading: u64) -> SystemTime {
    let a = anchor();
    a.wall + Duration::from_nanos(nanos_between(a.ticks, reading))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_advance_and_map_to_wall_time() {
        let a = raw();
        std::thread::sleep(Duration::from_millis(20));
        let b = raw();
        let ns = nanos_between(a, b);
        assert!((15_000_000..2_000_000_000).contains(&ns), "{ns}");
        let drift = SystemTime::now().duration_since(wall_time(b)).unwrap_or_default();
        assert!(drift < Duration::from_secs(1), "{drift:?}");
        assert_eq!(nanos_between(b, a), 0, "a reading before the start is no time after it");
    }

    #[test]
    fn the_rate_is_estimated_again_each_time_the_counter_has_run_twice_as_long() {
        let rate = Rate::new();
        let estimates = &std::cell::Cell::new(0);
        // A counter of 2.5 ticks per ns, read by the estimate exactly.
        let exact = |ticks: u64| {
            move || {
                estimates.set(estimates.get() + 1);
                (ticks, ticks as f64 / 2.5)
            }
        };
        // Right at the anchor nothing can be told: nothing is kept.
        assert_eq!(rate.at(10, || (10, 0.0)), 1.0);
        assert_eq!(rate.ns_per_tick.load(Ordering::Relaxed), 0, "no rate kept from no time");
        assert_eq!(rate.at(1_000, exact(1_000)), 0.4, "the first conversion estimates");
        assert_eq!(rate.at(1_999, exact(1_999)), 0.4);
        assert_eq!(estimates.get(), 1, "not again before twice as long");
        rate.at(2_000, exact(2_000));
        assert_eq!(estimates.get(), 2, "again at twice as long");
        // A counter that turns out slower: the next estimate is used.
        let slower = rate.at(4_000, || (4_000, 4_000.0));
        assert_eq!(slower, 1.0);
        assert_eq!(rate.at(4_001, exact(4_001)), 1.0, "kept until the next is due");
        // Never further apart than a second of counting.
        let far = rate.at(10_000_000_000, || (10_000_000_000, 10_000_000_000.0));
        assert_eq!(far, 1.0);
        assert_eq!(rate.next.load(Ordering::Relaxed), 11_000_000_000);
    }
}
