//! Cumulative fault statistics: counters by kind, outcome and mapping size,
//! and HDR latency histograms per pipeline stage and end to end.
//!
//! Counters are atomics. Histograms sit behind one lock that recorders only
//! `try_lock` (an observer reading them makes a recorder skip that sample,
//! counted), so statistics never slow a fault.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, TryLockError};

use hdrhistogram::Histogram;

use hyp_core::abort::FaultStatus;
use hyp_core::stage2::MapSize;

use super::events::{FaultEvent, Outcome};
use crate::fault::trace::Stage;

/// Fault kinds counted.
pub const KINDS: [&str; 7] =
    ["unknown", "translation", "access-flag", "permission", "address-size", "external", "other"];
/// Outcomes counted.
pub const OUTCOMES: [&str; 9] = [
    "mapped",
    "relaxed",
    "already-present",
    "retried-stale",
    "mmio-exit",
    "no-syndrome-exit",
    "injected-abort",
    "rejected",
    "refused-host-pressure",
];
/// Mapping sizes counted.
pub const SIZES: [&str; 4] = ["none", "4k", "2m", "1g"];

/// Index of a fault kind in [`KINDS`] (also its `FaultKind` proto value).
pub fn kind_index(status: Option<FaultStatus>) -> usize {
    match status {
        None => 0,
        Some(FaultStatus::Translation { .. }) => 1,
        Some(FaultStatus::AccessFlag { .. }) => 2,
        Some(FaultStatus::Permission { .. }) => 3,
        Some(FaultStatus::AddressSize { .. }) => 4,
        Some(
            FaultStatus::SyncExternal
            | FaultStatus::SyncExternalOnWalk { .. }
            | FaultStatus::SyncParity
            | FaultStatus::SyncParityOnWalk { .. },
        ) => 5,
        Some(_) => 6,
    }
}

/// Index of an outcome in [`OUTCOMES`] (its `Outcome` proto value is one more).
pub fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Mapped => 0,
        Outcome::Relaxed => 1,
        Outcome::AlreadyPresent => 2,
        Outcome::RetriedStale => 3,
        Outcome::MmioExit => 4,
        Outcome::NoSyndromeExit => 5,
        Outcome::InjectedAbort => 6,
        Outcome::Rejected(_) => 7,
        Outcome::RefusedHostPressure => 8,
    }
}

/// Index of a mapping size in [`SIZES`] (also its `MappingSize` proto value).
pub fn size_index(s: Option<MapSize>) -> usize {
    match s {
        None => 0,
        Some(MapSize::Page4K) => 1,
        Some(MapSize::Block2M) => 2,
        Some(MapSize::Block1G) => 3,
    }
}

/// Histogram names: the pipeline's stages in order, then the command sent
/// and end to end.
pub const STAGES: [&str; 7] = [
    Stage::Memslot.name(),
    Stage::Vma.name(),
    Stage::Size.name(),
    Stage::Pin.name(),
    Stage::Permissions.name(),
    "command_sent",
    "end_to_end",
];

/// A histogram's summary, ns.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Stage name.
    pub stage: &'static str,
    /// Samples.
    pub count: u64,
    /// Minimum.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// Cumulative statistics of every recorded fault event.
pub struct FaultStats {
    by_kind: [AtomicU64; KINDS.len()],
    by_outcome: [AtomicU64; OUTCOMES.len()],
    by_size: [AtomicU64; SIZES.len()],
    histograms: Mutex<Vec<Histogram<u64>>>,
    skipped: AtomicU64,
}

impl Default for FaultStats {
    fn default() -> Self {
        let h = || Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
        Self {
            by_kind: Default::default(),
            by_outcome: Default::default(),
            by_size: Default::default(),
            histograms: Mutex::new((0..STAGES.len()).map(|_| h()).collect()),
            skipped: AtomicU64::new(0),
        }
    }
}

impl FaultStats {
    /// Adds one event; never blocks.
    pub fn record(&self, e: &FaultEvent) {
        self.by_kind[kind_index(e.status)].fetch_add(1, Ordering::Relaxed);
        self.by_outcome[outcome_index(e.outcome)].fetch_add(1, Ordering::Relaxed);
        self.by_size[size_index(e.mapping_size)].fetch_add(1, Ordering::Relaxed);
        let mut h = match self.histograms.try_lock() {
            Ok(h) => h,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        // Stages a fault did not reach read 0 and are not samples.
        let stages = e.stages.iter().map(|(_, ns)| ns);
        for (i, ns) in stages.chain([e.sent_ns, e.completed_ns]).enumerate() {
            if ns > 0 {
                h[i].saturating_record(ns);
            }
        }
    }

    /// `(name, count)` by kind, by outcome and by mapping size.
    pub fn counters(&self) -> [Vec<(&'static str, u64)>; 3] {
        let named = |names: &[&'static str], counts: &[AtomicU64]| {
            names.iter().zip(counts).map(|(&n, c)| (n, c.load(Ordering::Relaxed))).collect()
        };
        [named(&KINDS, &self.by_kind), named(&OUTCOMES, &self.by_outcome), named(&SIZES, &self.by_size)]
    }

    /// Samples skipped because an observer held the histograms.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// A copy of every stage's histogram, in [`STAGES`] order.
    pub fn histograms(&self) -> Vec<Histogram<u64>> {
        self.histograms.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Summaries of every stage's histogram.
    pub fn summaries(&self) -> Vec<Summary> {
        let h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        STAGES
            .iter()
            .zip(h.iter())
            .map(|(&stage, h)| Summary {
                stage,
                count: h.len(),
                min: if h.is_empty() { 0 } else { h.min() },
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
                mean: h.mean(),
            })
            .collect()
    }
}
