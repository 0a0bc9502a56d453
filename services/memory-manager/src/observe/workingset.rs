//! The working-set monitor's model: DAMON's adaptive regions over a VM's
//! guest memory, fed by stage-2 access flags.
//!
//! Each sampling interval the monitor checks one page per region: was it
//! accessed since its flag was cleared at the previous sample? Each
//! aggregation interval it rolls the hits up into a frequency (hits out of
//! the samples taken) and an idle age (aggregations since the region was
//! last seen accessed), then merges neighbours whose frequencies are close
//! and splits regions at random points while there are fewer than half
//! the maximum, so regions follow the access pattern at a cost bounded by
//! the region count, not the guest size (DAMON's
//! `kdamond_merge_regions()` and `kdamond_split_regions()`).
//!
//! Reading and clearing the flags is the ring link's job
//! (`link::monitor`); this is the arithmetic, with no I/O.

use std::sync::Mutex;
use std::time::Duration;

use hyp_core::addr::{Ipa, Range, PAGE_SHIFT, PAGE_SIZE};
use serde::Deserialize;

/// `[working_set]` in the config file: whether the monitor runs on every
/// VM and how often it samples and aggregates. Changed at run time over
/// `PolicyControl.SetWorkingSetMonitor`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorSettings {
    /// Monitor every VM; off, only VMs whose policy names the working set
    /// (`coldest` eviction, cold reclaim) are monitored.
    pub enabled: bool,
    /// Between two checks of a region's sampled page (us).
    pub sample_us: u64,
    /// Between two aggregations (ms): a region's frequency is its hits out
    /// of the samples in one aggregation.
    pub aggregate_ms: u64,
    /// Fewest regions per VM (also: no merge makes a region larger than
    /// the monitored memory divided by this).
    pub min_regions: u32,
    /// Most regions per VM: the cost bound, two single-page AGE commands
    /// per region and sample.
    pub max_regions: u32,
    /// A region accessed within this long is in the working set (ms).
    pub working_set_window_ms: u64,
    /// Most CPU a VM's monitor may take per GiB it monitors, in basis
    /// points of one core (50: 0.5% of a core per GiB). Over it, the
    /// monitor stretches both intervals alike ([`super::pace::Pace`]);
    /// 0: the intervals as set, whatever they cost.
    pub cpu_budget_per_gib_bp: u32,
}

impl Default for MonitorSettings {
    /// DAMON's defaults: 5 ms sampling, 100 ms aggregation, 10 to 1000
    /// regions; at most 0.75% of a core per GiB monitored.
    fn default() -> Self {
        Self {
            enabled: false,
            sample_us: 5_000,
            aggregate_ms: 100,
            min_regions: 10,
            max_regions: 1_000,
            working_set_window_ms: 1_000,
            cpu_budget_per_gib_bp: 75,
        }
    }
}

/// Why monitor settings were refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// Sampling faster than 100 us, or not at all.
    #[error("sample_us must be at least 100 (got {0})")]
    SampleTooShort(u64),
    /// Fewer than two samples per aggregation.
    #[error("aggregate_ms ({aggregate_ms} ms) must hold at least two samples of {sample_us} us")]
    AggregateTooShort {
        /// The aggregation interval asked for.
        aggregate_ms: u64,
        /// The sampling interval asked for.
        sample_us: u64,
    },
    /// A bad region count.
    #[error("regions must satisfy 1 <= min_regions ({min}) <= max_regions ({max}) <= 100000")]
    Regions {
        /// min_regions.
        min: u32,
        /// max_regions.
        max: u32,
    },
}

impl MonitorSettings {
    /// The settings if they make sense.
    pub fn validated(self) -> Result<Self, SettingsError> {
        if self.sample_us < 100 {
            return Err(SettingsError::SampleTooShort(self.sample_us));
        }
        if self.aggregate_ms.saturating_mul(1000) < 2 * self.sample_us {
            return Err(SettingsError::AggregateTooShort {
                aggregate_ms: self.aggregate_ms,
                sample_us: self.sample_us,
            });
        }
        if self.min_regions == 0 || self.min_regions > self.max_regions || self.max_regions > 100_000 {
            return Err(SettingsError::Regions { min: self.min_regions, max: self.max_regions });
        }
        Ok(self)
    }

    /// The sampling interval.
    pub fn sample(&self) -> Duration {
        Duration::from_micros(self.sample_us)
    }

    /// The aggregation interval.
    pub fn aggregate(&self) -> Duration {
        Duration::from_millis(self.aggregate_ms)
    }

    /// Samples in one aggregation: the highest frequency a region can have.
    pub fn samples_per_aggregation(&self) -> u32 {
        (self.aggregate_ms * 1000 / self.sample_us).max(1) as u32
    }
}

/// The monitor settings in force, shared by the config, PolicyControl and
/// every VM's monitor (which reads them each round).
#[derive(Debug, Default)]
pub struct SharedSettings(Mutex<MonitorSettings>);

impl SharedSettings {
    /// Settings starting as `settings`.
    pub fn new(settings: MonitorSettings) -> Self {
        Self(Mutex::new(settings))
    }

    /// The settings now.
    pub fn get(&self) -> MonitorSettings {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces them.
    pub fn set(&self, settings: MonitorSettings) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = settings;
    }
}

/// One region as of an aggregation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionStat {
    /// The IPAs it covers.
    pub range: Range<Ipa>,
    /// Samples that found it accessed in the aggregation.
    pub frequency: u32,
    /// Aggregations since a sample last found it accessed (0: in this one).
    pub idle_aggregations: u32,
    /// How long those aggregations lasted: its idle age (0 if accessed in
    /// this one). Kept as time, since the intervals stretch and shrink.
    pub idle: Duration,
}

/// Idle-age buckets the metrics report, in seconds (the last is open).
pub const IDLE_BUCKETS_S: [u64; 5] = [1, 10, 60, 120, u64::MAX];

/// What one aggregation saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregation {
    /// Aggregations since the monitor started (1 for the first).
    pub index: u64,
    /// When it was taken (nanoseconds since the Unix epoch).
    pub time_ns: u64,
    /// The settings it was taken under.
    pub settings: MonitorSettings,
    /// Regions by IPA, each as aggregated (before this round's merge and
    /// split).
    pub regions: Vec<RegionStat>,
}

impl Aggregation {
    /// How long `r` has been idle.
    pub fn idle(&self, r: &RegionStat) -> Duration {
        r.idle
    }

    /// Bytes accessed within the working-set window.
    pub fn working_set_bytes(&self) -> u64 {
        let window = Duration::from_millis(self.settings.working_set_window_ms);
        self.regions.iter().filter(|r| self.idle(r) < window).map(|r| r.range.len()).sum()
    }

    /// Bytes idle for at least each [`IDLE_BUCKETS_S`] bound's predecessor
    /// and less than it: `[0]` idle under 1 s, ..., `[4]` idle 120 s or
    /// more.
    pub fn idle_bytes_by_bucket(&self) -> [u64; IDLE_BUCKETS_S.len()] {
        let mut out = [0; IDLE_BUCKETS_S.len()];
        for r in &self.regions {
            let idle = self.idle(r).as_secs();
            let bucket = IDLE_BUCKETS_S.iter().position(|&b| idle < b).unwrap_or(IDLE_BUCKETS_S.len() - 1);
            out[bucket] += r.range.len();
        }
        out
    }

    /// The regions that overlap `range`.
    fn overlapping(&self, range: Range<Ipa>) -> &[RegionStat] {
        let from = self.regions.partition_point(|r| r.range.end() <= range.start());
        let to = self.regions.partition_point(|r| r.range.start() < range.end());
        &self.regions[from..to.max(from)]
    }

    /// How long the least idle part of `range` has been idle; `None`
    /// unless the regions cover all of it.
    pub fn least_idle(&self, range: Range<Ipa>) -> Option<Duration> {
        let over = self.overlapping(range);
        let covered: u64 = over
            .iter()
            .map(|r| r.range.end().raw().min(range.end().raw()) - r.range.start().raw().max(range.start().raw()))
            .sum();
        let least = over.iter().map(|r| r.idle).min()?;
        (covered == range.len()).then_some(least)
    }

    /// The highest frequency over the regions that overlap `range`.
    pub fn most_frequent(&self, range: Range<Ipa>) -> Option<u32> {
        self.overlapping(range).iter().map(|r| r.frequency).max()
    }

    /// The region that holds `ipa`.
    pub fn region_of(&self, ipa: Ipa) -> Option<&RegionStat> {
        let i = self.regions.partition_point(|r| r.range.end().raw() <= ipa.raw());
        self.regions.get(i).filter(|r| r.range.contains(ipa))
    }
}

/// A region in pages.
#[derive(Clone, Copy, Debug)]
struct Region {
    /// First page frame.
    start: u64,
    /// One past the last.
    end: u64,
    /// The page whose flag was cleared at the last sample, to check next.
    armed: Option<u64>,
    hits: u32,
    frequency: u32,
    /// Aggregations idle.
    idle: u32,
    /// Their length.
    idle_for: Duration,
}

impl Region {
    fn new(start: u64, end: u64) -> Self {
        Self { start, end, armed: None, hits: 0, frequency: 0, idle: 0, idle_for: Duration::ZERO }
    }

    fn pages(&self) -> u64 {
        self.end - self.start
    }
}

/// The pages one sampling round reads and clears: first `checks`
/// (whether each was accessed since armed), then `arms` (cleared, to be
/// checked next round).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SampleRound {
    /// Pages to test; [`Monitor::record`] takes one answer per page, in
    /// order.
    pub checks: Vec<Ipa>,
    /// Pages to clear; their answers mean nothing.
    pub arms: Vec<Ipa>,
}

/// DAMON's adaptive regions over one VM's guest memory.
#[derive(Debug)]
pub struct Monitor {
    regions: Vec<Region>,
    /// Pages monitored in all.
    total_pages: u64,
    rng: u64,
    aggregations: u64,
    /// Regions after the last split: a split that did not grow the count
    /// splits three ways next time (DAMON does).
    last_split_count: usize,
    /// Regions with an armed page, in `regions` order, as of the last round.
    checked: Vec<usize>,
}

impl Monitor {
    /// A monitor over `targets` (page-aligned, ascending, disjoint), each
    /// split evenly so that there are at least `min_regions` in all.
    pub fn new(targets: &[Range<Ipa>], min_regions: u32, seed: u64) -> Self {
        let total_pages: u64 = targets.iter().map(|t| t.len() >> PAGE_SHIFT).sum();
        let mut regions = Vec::new();
        for t in targets {
            let (start, pages) = (t.start().pfn(), t.len() >> PAGE_SHIFT);
            if pages == 0 {
                continue;
            }
            // This target's share of min_regions, at least one.
            let pieces = (u64::from(min_regions) * pages).div_ceil(total_pages.max(1)).clamp(1, pages);
            for i in 0..pieces {
                regions.push(Region::new(start + pages * i / pieces, start + pages * (i + 1) / pieces));
            }
        }
        let last_split_count = regions.len();
        Self { regions, total_pages, rng: seed | 1, aggregations: 0, last_split_count, checked: Vec::new() }
    }

    /// Regions now.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// True if nothing is monitored.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    fn random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// This round's pages: each region's armed page is checked, and a
    /// fresh random page per region is armed for the next round (DAMON's
    /// `damon_va_prepare_access_checks()`: two single-page commands a
    /// region and sample). A region is thus seen through a new page every
    /// sample: one whose pages are partly in use is found accessed in the
    /// share of samples that land on them, not idle for a whole
    /// aggregation whenever its one page lands outside them.
    pub fn sample(&mut self) -> SampleRound {
        let mut round = SampleRound::default();
        self.checked.clear();
        for i in 0..self.regions.len() {
            if let Some(page) = self.regions[i].armed {
                round.checks.push(Ipa::new(page << PAGE_SHIFT));
                self.checked.push(i);
            }
            let r = self.regions[i];
            let page = r.start + self.random() % r.pages();
            self.regions[i].armed = Some(page);
            round.arms.push(Ipa::new(page << PAGE_SHIFT));
        }
        round
    }

    /// The answers to the last round's checks, in order: a hit for each
    /// page that was accessed.
    pub fn record(&mut self, accessed: &[bool]) {
        for (&i, &hit) in self.checked.iter().zip(accessed) {
            self.regions[i].hits += u32::from(hit);
        }
        self.checked.clear();
    }

    /// Forgets the hits since the last aggregation: the next one starts
    /// now (its settings changed). The armed pages are let go too: an
    /// access to one before now is not this aggregation's. The next sample
    /// arms fresh ones.
    pub fn restart_aggregation(&mut self) {
        self.regions.iter_mut().for_each(|r| (r.hits, r.armed) = (0, None));
    }

    /// Rolls the hits since the last aggregation up into each region's
    /// frequency and idle age, then merges and splits as `settings` (the
    /// intervals it was sampled at) say. Returns the aggregation, taken
    /// before the merge and split.
    pub fn aggregate(&mut self, settings: &MonitorSettings, time_ns: u64) -> Aggregation {
        self.aggregations += 1;
        for r in &mut self.regions {
            r.frequency = r.hits;
            r.hits = 0;
            (r.idle, r.idle_for) = if r.frequency > 0 {
                (0, Duration::ZERO)
            } else {
                (r.idle.saturating_add(1), r.idle_for + settings.aggregate())
            };
        }
        let regions = self
            .regions
            .iter()
            .map(|r| RegionStat {
                range: Range::<Ipa>::new(Ipa::new(r.start << PAGE_SHIFT), r.pages() * PAGE_SIZE)
                    .expect("a region is never empty"),
                frequency: r.frequency,
                idle_aggregations: r.idle,
                idle: r.idle_for,
            })
            .collect();
        self.merge(settings);
        self.split(settings);
        Aggregation { index: self.aggregations, time_ns, settings: *settings, regions }
    }

    /// Merges neighbours whose frequencies differ by at most a tenth of
    /// the highest possible and whose idle ages are alike, while the result
    /// stays under the size limit (DAMON's `damon_merge_regions_of()`,
    /// which does not look at ages): the frequency is weighted by size,
    /// the idle age is the smaller. Without the age test, memory a scan
    /// left long ago would merge with what it just left, and never age.
    fn merge(&mut self, settings: &MonitorSettings) {
        let threshold = (settings.samples_per_aggregation() / 10).max(1);
        let size_limit = (self.total_pages / u64::from(settings.min_regions.max(1))).max(1);
        let mut merged: Vec<Region> = Vec::with_capacity(self.regions.len());
        for r in self.regions.drain(..) {
            match merged.last_mut() {
                Some(prev)
                    if prev.end == r.start
                        && prev.frequency.abs_diff(r.frequency) <= threshold
                        && same_age(prev.idle, r.idle)
                        && prev.pages() + r.pages() <= size_limit =>
                {
                    let (a, b) = (prev.pages(), r.pages());
                    let weighed = u64::from(prev.frequency) * a + u64::from(r.frequency) * b;
                    prev.frequency = (weighed / (a + b)) as u32;
                    // Idle at least as long as its least idle part: what
                    // reclaim reads never overstates how cold a page is.
                    prev.idle = prev.idle.min(r.idle);
                    prev.idle_for = prev.idle_for.min(r.idle_for);
                    prev.end = r.end;
                    prev.armed = prev.armed.or(r.armed);
                }
                _ => merged.push(r),
            }
        }
        self.regions = merged;
    }

    /// Splits every region in two (three when the last split did not grow
    /// the count) at random points, while there are at most half the
    /// maximum (DAMON's `kdamond_split_regions()`).
    fn split(&mut self, settings: &MonitorSettings) {
        let max = settings.max_regions as usize;
        if self.regions.len() > max / 2 {
            return;
        }
        let pieces = if self.regions.len() == self.last_split_count && self.regions.len() < max / 3 { 3 } else { 2 };
        let mut out = Vec::with_capacity(self.regions.len() * pieces);
        for r in std::mem::take(&mut self.regions) {
            let mut rest = r;
            for _ in 1..pieces {
                if rest.pages() < 2 {
                    break;
                }
                // A cut leaving 10% to 90% of the region on its left.
                let ten_percent = (rest.pages() / 10).max(1);
                let span = (rest.pages() - 2 * ten_percent).max(1);
                let cut = rest.start + ten_percent + self.random() % span;
                let cut = cut.clamp(rest.start + 1, rest.end - 1);
                let mut head = Region { end: cut, ..rest };
                head.armed = rest.armed.filter(|&p| p < cut);
                rest = Region { start: cut, armed: rest.armed.filter(|&p| p >= cut), ..rest };
                out.push(head);
            }
            out.push(rest);
        }
        self.regions = out;
        self.last_split_count = self.regions.len();
    }
}

/// Idle ages close enough to merge regions: within a quarter of the
/// larger, plus one aggregation.
fn same_age(a: u32, b: u32) -> bool {
    a.abs_diff(b) <= a.max(b) / 4 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn settings() -> MonitorSettings {
        MonitorSettings { enabled: true, sample_us: 5_000, aggregate_ms: 100, ..Default::default() }
    }

    fn target(start: u64, len: u64) -> Range<Ipa> {
        Range::<Ipa>::new(Ipa::new(start), len).unwrap()
    }

    /// Runs `aggregations` aggregations of 20 samples in which a page is
    /// accessed iff `hot(page address)`.
    fn drive(m: &mut Monitor, s: &MonitorSettings, aggregations: u32, hot: impl Fn(u64) -> bool) -> Aggregation {
        let mut last = None;
        for a in 0..aggregations {
            for _ in 0..s.samples_per_aggregation() {
                let round = m.sample();
                let answers: Vec<bool> = round.checks.iter().map(|p| hot(p.raw())).collect();
                m.record(&answers);
            }
            last = Some(m.aggregate(s, u64::from(a)));
        }
        last.expect("at least one aggregation")
    }

    #[test]
    fn regions_start_even_cover_the_targets_and_stay_within_the_bounds() {
        let s = settings();
        let targets = [target(GIB, 64 << 20), target(4 * GIB, 192 << 20)];
        let mut m = Monitor::new(&targets, s.min_regions, 7);
        assert_eq!(m.len(), 3 + 8, "each target gets its share of 10, rounded up");
        let agg = drive(&mut m, &s, 30, |a| a % (8 << 20) < (1 << 20));
        let covered: u64 = agg.regions.iter().map(|r| r.range.len()).sum();
        assert_eq!(covered, 256 << 20, "the regions tile the targets exactly");
        for pair in agg.regions.windows(2) {
            assert!(pair[0].range.end() <= pair[1].range.start(), "sorted, disjoint: {pair:?}");
        }
        assert!(agg.regions.len() <= s.max_regions as usize && m.len() <= s.max_regions as usize);
        assert!(agg.regions.len() >= s.min_regions as usize, "{}", agg.regions.len());
    }

    #[test]
    fn a_hot_range_is_found_and_a_range_left_alone_ages() {
        let s = settings();
        let mut m = Monitor::new(&[target(GIB, 256 << 20)], s.min_regions, 3);
        // The first 16 MiB are touched all the time, the rest never.
        let hot = |a: u64| a < GIB + (16 << 20);
        let agg = drive(&mut m, &s, 40, hot);
        let hottest: Vec<&RegionStat> = agg.regions.iter().filter(|r| r.frequency > 0).collect();
        assert!(!hottest.is_empty());
        for r in &hottest {
            assert!(r.range.start().raw() < GIB + (16 << 20), "a region outside the hot range was hit: {r:?}");
        }
        let hot_bytes: u64 = hottest.iter().map(|r| r.range.len()).sum();
        assert!(hot_bytes >= 12 << 20, "most of the hot range is seen hot: {hot_bytes:#x}");
        let cold = agg.region_of(Ipa::new(GIB + (200 << 20))).unwrap();
        assert_eq!((cold.frequency, cold.idle_aggregations), (0, 40), "never accessed: idle since the start");
        assert_eq!(agg.idle(cold), Duration::from_secs(4));
        assert!(
            agg.working_set_bytes() >= 12 << 20 && agg.working_set_bytes() <= 24 << 20,
            "{}",
            agg.working_set_bytes()
        );
        // The hot range goes cold: its age grows from then on.
        let agg = drive(&mut m, &s, 15, |_| false);
        let was_hot = agg.region_of(Ipa::new(GIB)).unwrap();
        assert_eq!(was_hot.idle_aggregations, 15);
        assert_eq!(agg.working_set_bytes(), 0);
        let buckets = agg.idle_bytes_by_bucket();
        assert_eq!(buckets.iter().sum::<u64>(), 256 << 20);
        assert_eq!(buckets[1], 256 << 20, "everything idle 1.5 s or more, under 10 s: {buckets:?}");
    }

    #[test]
    fn a_region_partly_in_use_is_not_called_idle_for_whole_aggregations() {
        // One region (a maximum of one: no split) a tenth of which is in
        // use, as where a range in use meets idle memory. Seen through a
        // new page every sample, an aggregation misses it only when all
        // 20 samples land outside (0.9^20: 12% of them), and never many
        // in a row; through one page an aggregation, 90% of them would.
        let s = MonitorSettings { min_regions: 1, max_regions: 1, ..settings() };
        let mut m = Monitor::new(&[target(0, 4 << 20)], 1, 13);
        let in_use = |a: u64| a < (4 << 20) / 10;
        let (mut missed, mut longest) = (0, 0);
        for _ in 0..100 {
            let seen = drive(&mut m, &s, 1, in_use);
            assert_eq!(seen.regions.len(), 1);
            missed += u32::from(seen.regions[0].frequency == 0);
            longest = longest.max(seen.regions[0].idle_aggregations);
        }
        assert!(missed < 30, "{missed} aggregations of 100 saw the region idle");
        assert!(longest <= 4, "idle {longest} aggregations in a row");
    }

    #[test]
    fn a_restarted_aggregation_counts_no_access_from_before_it() {
        let s = MonitorSettings { min_regions: 4, max_regions: 4, ..settings() };
        let mut m = Monitor::new(&[target(0, 4 << 20)], 4, 3);
        // Armed, then (as far as the pages tell) accessed; then the
        // settings change.
        let armed = m.sample();
        assert!(armed.checks.is_empty() && armed.arms.len() == 4);
        m.restart_aggregation();
        // The next round checks none of the pages armed before: it arms
        // fresh ones, and an aggregation after it counts no hit.
        let round = m.sample();
        assert!(round.checks.is_empty(), "checked pages armed before the restart: {:?}", round.checks);
        assert_eq!(round.arms.len(), 4);
        // Every page checked was accessed.
        m.record(&vec![true; round.checks.len()]);
        let seen = m.aggregate(&s, 1);
        assert!(seen.regions.iter().all(|r| r.frequency == 0), "{:?}", seen.regions);
    }

    #[test]
    fn memory_a_scan_left_behind_ages_while_the_scan_goes_on() {
        let s = settings();
        let mut m = Monitor::new(&[target(0, 256 << 20)], s.min_regions, 5);
        // A scan front moves 8 MiB an aggregation and never comes back.
        let mut last = None;
        for a in 0..30u64 {
            let front = a * (8 << 20);
            for _ in 0..s.samples_per_aggregation() {
                let round = m.sample();
                let hits: Vec<bool> =
                    round.checks.iter().map(|p| (front..front + (8 << 20)).contains(&p.raw())).collect();
                m.record(&hits);
            }
            last = Some(m.aggregate(&s, a));
        }
        let seen = last.unwrap();
        // The first 32 MiB were passed 26 or more aggregations ago (a
        // region is seen left only once its sampled page is).
        let idle = seen.least_idle(Range::<Ipa>::new(Ipa::new(0), 32 << 20).unwrap()).unwrap();
        assert!(idle >= Duration::from_millis(100) * 20, "{idle:?}: {:?}", seen.regions);
        let front = seen.least_idle(Range::<Ipa>::new(Ipa::new(232 << 20), 8 << 20).unwrap()).unwrap();
        assert!(front <= Duration::from_millis(200), "where the scan is: {front:?}");
    }

    #[test]
    fn an_idle_age_is_the_time_its_aggregations_took_when_the_intervals_change() {
        let s = settings();
        let mut m = Monitor::new(&[target(0, 64 << 20)], s.min_regions, 9);
        drive(&mut m, &s, 2, |_| false);
        // Paced: the same samples, five times apart.
        let slow = MonitorSettings { sample_us: 25_000, aggregate_ms: 500, ..s };
        let seen = drive(&mut m, &slow, 3, |_| false);
        let r = seen.region_of(Ipa::new(0)).unwrap();
        assert_eq!(r.idle_aggregations, 5);
        assert_eq!(seen.idle(r), Duration::from_millis(2 * 100 + 3 * 500), "not 5 of the latest length");
        assert_eq!(
            seen.least_idle(Range::<Ipa>::new(Ipa::new(0), 64 << 20).unwrap()),
            Some(Duration::from_millis(1700))
        );
    }

    #[test]
    fn merges_stop_at_the_size_limit_and_splits_at_half_the_maximum() {
        let s = MonitorSettings { max_regions: 40, ..settings() };
        let mut m = Monitor::new(&[target(0, GIB)], s.min_regions, 11);
        // All idle: every neighbour merges, but no region passes 1/10 of it.
        drive(&mut m, &s, 20, |_| false);
        assert!(m.regions.iter().all(|r| r.pages() <= (GIB >> PAGE_SHIFT) / 10 + 1), "{:?}", m.regions);
        // Uneven access everywhere: the count grows to at most the maximum.
        drive(&mut m, &s, 20, |a| (a >> 21) % 3 == 0);
        assert!(m.len() <= 40, "{}", m.len());
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let s = MonitorSettings::default();
        assert_eq!(MonitorSettings { sample_us: 10, ..s }.validated(), Err(SettingsError::SampleTooShort(10)));
        assert!(matches!(
            MonitorSettings { aggregate_ms: 5, sample_us: 5_000, ..s }.validated(),
            Err(SettingsError::AggregateTooShort { .. })
        ));
        assert_eq!(
            MonitorSettings { min_regions: 20, max_regions: 10, ..s }.validated(),
            Err(SettingsError::Regions { min: 20, max: 10 })
        );
        assert_eq!(s.validated(), Ok(s));
        assert_eq!(s.samples_per_aggregation(), 20);
    }
}
