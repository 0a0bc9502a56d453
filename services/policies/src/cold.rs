//! `policy-cold`'s controller: how long memory must be idle before it is
//! reclaimed, steered by what reclaiming costs the guest.
//!
//! Two bounds, each checked every control interval:
//! - refaults: evicted pages brought back, in bytes per minute, at most a
//!   fraction of the working set (Google's far memory bounds promotions
//!   to 0.2% of the working set per minute);
//! - stall: the share of vCPU time spent waiting for evicted pages to
//!   come back (Meta's TMO steers offload by PSI, the share of time tasks
//!   stall on memory).
//!
//! Over either bound the idle threshold doubles (up to a maximum): less
//! is reclaimed. Under half of both it comes back a quarter of the way
//! towards the configured threshold each interval. Between the two it
//! holds, so the threshold does not oscillate around a bound.

use std::time::Duration;

/// The bounds and the threshold's range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColdBounds {
    /// The idle time reclaim starts from and comes back to.
    pub min_idle: Duration,
    /// The longest idle time backing off may reach.
    pub max_idle: Duration,
    /// Refaulted bytes per minute, as a fraction of the working set.
    pub refault_fraction_per_min: f64,
    /// Fault stall, as a fraction of vCPU time.
    pub stall_fraction: f64,
}

/// What one control interval measured of a VM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// How long the interval was.
    pub elapsed: Duration,
    /// Bytes brought back from the swap store in it.
    pub refault_bytes: u64,
    /// The working set at its end (bytes).
    pub working_set: u64,
    /// vCPU time spent waiting for refaults in it, over all vCPUs.
    pub stall: Duration,
    /// vCPUs.
    pub vcpus: u32,
}

/// Why the threshold moved (or did not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Over a bound: the threshold doubled.
    BackedOff,
    /// Well under both: the threshold came back towards the minimum.
    Recovered,
    /// Between half and all of a bound, or already at the minimum.
    Held,
}

/// One VM's idle threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColdController {
    bounds: ColdBounds,
    threshold: Duration,
}

impl ColdController {
    /// Starts at the minimum idle time.
    pub fn new(bounds: ColdBounds) -> Self {
        Self { bounds, threshold: bounds.min_idle }
    }

    /// The idle time memory must have now to be reclaimed.
    pub fn threshold(&self) -> Duration {
        self.threshold
    }

    /// Refaults and stall over the interval, each as a share of its bound
    /// (1.0: at the bound).
    pub fn pressure(&self, i: &Interval) -> (f64, f64) {
        let secs = i.elapsed.as_secs_f64().max(1e-3);
        // A working set under 1 MiB is taken as 1 MiB: a VM that touches
        // almost nothing may still refault a little.
        let allowed_per_min = self.bounds.refault_fraction_per_min * (i.working_set.max(1 << 20) as f64);
        let refaults = i.refault_bytes as f64 * 60.0 / secs / allowed_per_min.max(1.0);
        let stall_share = i.stall.as_secs_f64() / (secs * f64::from(i.vcpus.max(1)));
        (refaults, stall_share / self.bounds.stall_fraction.max(1e-9))
    }

    /// Moves the threshold for what `i` measured.
    pub fn update(&mut self, i: &Interval) -> Step {
        let (refaults, stall) = self.pressure(i);
        if refaults > 1.0 || stall > 1.0 {
            self.threshold = (self.threshold * 2).min(self.bounds.max_idle);
            return Step::BackedOff;
        }
        if refaults < 0.5 && stall < 0.5 && self.threshold > self.bounds.min_idle {
            let over = self.threshold - self.bounds.min_idle;
            self.threshold = self.bounds.min_idle + over * 3 / 4;
            if self.threshold - self.bounds.min_idle < Duration::from_millis(10) {
                self.threshold = self.bounds.min_idle;
            }
            return Step::Recovered;
        }
        Step::Held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: ColdBounds = ColdBounds {
        min_idle: Duration::from_secs(2),
        max_idle: Duration::from_secs(120),
        refault_fraction_per_min: 0.002,
        stall_fraction: 0.03,
    };

    fn interval(refault_bytes: u64, stall_ms: u64) -> Interval {
        Interval {
            elapsed: Duration::from_secs(1),
            refault_bytes,
            working_set: 1 << 30,
            stall: Duration::from_millis(stall_ms),
            vcpus: 2,
        }
    }

    #[test]
    fn refaults_or_stall_over_their_bound_back_off_up_to_the_maximum() {
        let mut c = ColdController::new(BOUNDS);
        // 0.2% of 1 GiB a minute is 35.8 KB/s: 40 KB in a second is over.
        assert!(c.pressure(&interval(40_000, 0)).0 > 1.0);
        assert_eq!(c.update(&interval(40_000, 0)), Step::BackedOff);
        assert_eq!(c.threshold(), Duration::from_secs(4));
        // 3% of 2 vCPUs over 1 s is 60 ms of stall.
        assert_eq!(c.update(&interval(0, 61)), Step::BackedOff);
        assert_eq!(c.threshold(), Duration::from_secs(8));
        for _ in 0..10 {
            c.update(&interval(1 << 20, 0));
        }
        assert_eq!(c.threshold(), BOUNDS.max_idle);
    }

    #[test]
    fn well_under_both_bounds_it_comes_back_and_between_it_holds() {
        let mut c = ColdController::new(BOUNDS);
        c.update(&interval(1 << 20, 0));
        c.update(&interval(1 << 20, 0));
        assert_eq!(c.threshold(), Duration::from_secs(8));
        // Between half and all of the refault bound: held.
        assert_eq!(c.update(&interval(25_000, 0)), Step::Held);
        assert_eq!(c.threshold(), Duration::from_secs(8));
        assert_eq!(c.update(&interval(0, 0)), Step::Recovered);
        assert_eq!(c.threshold(), Duration::from_millis(6_500));
        for _ in 0..40 {
            c.update(&interval(0, 0));
        }
        assert_eq!(c.threshold(), BOUNDS.min_idle);
        assert_eq!(c.update(&interval(0, 0)), Step::Held);
    }
}
