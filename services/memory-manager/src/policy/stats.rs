//! The policy host's counters: consults, late consults, clamps, fallbacks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters since start.
#[derive(Debug, Default)]
pub struct PolicyStats {
    /// Consult calls made.
    pub consults: AtomicU64,
    /// Consults not answered in time (the fault used the rules).
    pub consults_late: AtomicU64,
    /// Policy decisions correctness overrode.
    pub clamped: AtomicU64,
    /// Drops to the default, by `faultline_proto::v1::PolicyExitKind` (index = value).
    pub fallbacks: [AtomicU64; 6],
}

impl PolicyStats {
    /// All fallbacks.
    pub fn fallbacks_total(&self) -> u64 {
        self.fallbacks.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}
