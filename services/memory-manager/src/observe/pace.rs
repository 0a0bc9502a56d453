//! The working-set monitor's pace: how far a VM's monitor stretches its
//! sampling and aggregation intervals to stay within its CPU budget per
//! GiB monitored (`cpu_budget_per_gib_bp`).
//!
//! A sample costs about the same whatever the VM's size (a wake, a batch
//! of AGE commands, their answers), so at a fixed interval a small VM's
//! monitor costs more per GiB than a large one's. DAMON bounds its cost by
//! the region count and, since Linux 6.15, tunes both intervals together
//! to catch enough accesses; this tunes them together to a CPU budget.
//! Both stretch by one factor, so an aggregation keeps its number of
//! samples (a frequency means the same) and only the time resolution of
//! ages coarsens. They never shrink below the settings.

use std::time::Duration;

use super::workingset::MonitorSettings;

/// The longest sampling interval a stretch makes (DAMON's auto-tuning
/// stops at 10 s too).
pub const MAX_SAMPLE: Duration = Duration::from_secs(10);

/// The share of the budget the pace aims at, leaving room for the noise
/// of one aggregation's measurement.
const AIM: f64 = 0.8;

/// A stretch is lowered only when it would fall below this share of
/// what it is: one noisy aggregation does not swing the intervals.
const SHRINK_BELOW: f64 = 0.7;

const GIB: f64 = (1u64 << 30) as f64;

/// How far a monitor stretches the intervals it is set to (1: not at all).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pace {
    stretch: f64,
}

impl Default for Pace {
    fn default() -> Self {
        Self { stretch: 1.0 }
    }
}

impl Pace {
    /// The factor the intervals are stretched by, at least 1.
    pub fn stretch(&self) -> f64 {
        self.stretch
    }

    /// `settings` with both intervals stretched, keeping the samples per
    /// aggregation.
    pub fn apply(&self, settings: &MonitorSettings) -> MonitorSettings {
        if self.stretch <= 1.0 || settings.cpu_budget_per_gib_bp == 0 {
            return *settings;
        }
        let samples = u64::from(settings.samples_per_aggregation());
        let sample_us = (settings.sample_us as f64 * self.stretch).round() as u64;
        MonitorSettings { sample_us, aggregate_ms: (sample_us * samples).div_ceil(1000), ..*settings }
    }

    /// Takes one aggregation's cost, `cpu` of the monitor over `wall`, for
    /// `monitored` bytes, and paces the next ones to cost at most the
    /// budget in `settings` (a share of it, for the noise). The cost of a
    /// sample is taken as fixed, so the cost falls as the stretch grows.
    pub fn observe(&mut self, settings: &MonitorSettings, cpu: Duration, wall: Duration, monitored: u64) {
        let budget = f64::from(settings.cpu_budget_per_gib_bp) / 10_000.0 * monitored as f64 / GIB;
        if settings.cpu_budget_per_gib_bp == 0 || budget <= 0.0 || wall.is_zero() {
            self.stretch = 1.0;
            return;
        }
        let most = (MAX_SAMPLE.as_secs_f64() / Duration::from_micros(settings.sample_us).as_secs_f64()).max(1.0);
        // The cost at stretch 1, and the stretch that brings it to the aim.
        let unstretched = cpu.as_secs_f64() / wall.as_secs_f64() * self.stretch;
        let wanted = (unstretched / (budget * AIM)).clamp(1.0, most);
        if wanted > self.stretch || wanted < self.stretch * SHRINK_BELOW {
            self.stretch = wanted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn settings(bp: u32) -> MonitorSettings {
        MonitorSettings { sample_us: 5_000, aggregate_ms: 100, cpu_budget_per_gib_bp: bp, ..Default::default() }
    }

    /// The monitor's CPU share over an aggregation at `pace`, each sample
    /// costing `per_sample`.
    fn cost(pace: &Pace, s: &MonitorSettings, per_sample: Duration) -> (Duration, Duration) {
        let at = pace.apply(s);
        (per_sample * at.samples_per_aggregation(), at.aggregate())
    }

    #[test]
    fn a_small_vm_over_its_budget_is_sampled_less_often_until_within_it() {
        // 64 MiB at 10 us a sample every 5 ms: 0.2% of a core, 3.2% per GiB.
        let s = settings(50);
        let mut pace = Pace::default();
        let (cpu, wall) = cost(&pace, &s, Duration::from_micros(10));
        pace.observe(&s, cpu, wall, 64 * MIB);
        let at = pace.apply(&s);
        assert!(at.sample_us > 5_000 && at.aggregate_ms > 100, "{at:?}");
        assert_eq!(at.samples_per_aggregation(), s.samples_per_aggregation(), "a frequency keeps its meaning");
        let (cpu, wall) = cost(&pace, &s, Duration::from_micros(10));
        let per_gib = cpu.as_secs_f64() / wall.as_secs_f64() / (64.0 / 1024.0);
        assert!(per_gib <= 0.005, "within 0.5% of a core per GiB: {per_gib}");
        assert!(per_gib >= 0.005 * AIM * 0.9, "but not stretched further than it needs: {per_gib}");
        // Settled: the same cost again leaves it where it is.
        let before = pace;
        pace.observe(&s, cpu, wall, 64 * MIB);
        assert_eq!(pace, before);
    }

    #[test]
    fn within_the_budget_or_without_one_the_intervals_are_as_set() {
        let mut pace = Pace::default();
        // 4 GiB at 10 us a sample: 0.05% per GiB.
        let s = settings(50);
        let (cpu, wall) = cost(&pace, &s, Duration::from_micros(10));
        pace.observe(&s, cpu, wall, 4096 * MIB);
        assert_eq!(pace.apply(&s), s);
        // No budget: a tiny VM at a costly interval keeps it.
        let s = settings(0);
        let (cpu, wall) = cost(&pace, &s, Duration::from_micros(500));
        pace.observe(&s, cpu, wall, MIB);
        assert_eq!(pace.apply(&s), s);
    }

    #[test]
    fn a_stretch_shrinks_back_when_samples_get_cheaper_and_stops_at_the_longest_interval() {
        let s = settings(50);
        let mut pace = Pace::default();
        let (cpu, wall) = cost(&pace, &s, Duration::from_micros(40));
        pace.observe(&s, cpu, wall, 64 * MIB);
        let stretched = pace.stretch();
        assert!(stretched > 10.0, "{stretched}");
        // A tenth of the cost: most of the stretch goes.
        let (cpu, wall) = cost(&pace, &s, Duration::from_micros(4));
        pace.observe(&s, cpu, wall, 64 * MIB);
        assert!(pace.stretch() < stretched / 5.0, "{} after {stretched}", pace.stretch());
        // Slightly cheaper than the aim: no swing.
        let settled = pace.stretch();
        let (cpu, wall) = cost(&pace, &s, Duration::from_micros(3));
        pace.observe(&s, cpu, wall, 64 * MIB);
        assert_eq!(pace.stretch(), settled);
        // A hopeless cost: never past the longest interval.
        let (cpu, wall) = cost(&pace, &s, Duration::from_millis(4));
        pace.observe(&s, cpu, wall, MIB);
        assert_eq!(Duration::from_micros(pace.apply(&s).sample_us), MAX_SAMPLE);
    }
}
