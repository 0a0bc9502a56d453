//! How full each vCPU's rings are, as its service thread last saw them,
//! and what the core counts on them.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// How full one vCPU's rings are, in records, as its service thread last
/// saw them, and the access-flag faults the core resolved on that vCPU, as
/// its fault ring last said (plain stores: statistics, not synchronisation
/// points).
#[derive(Debug, Default)]
pub struct RingOccupancy {
    capacity: AtomicU32,
    faults: AtomicU32,
    faults_high: AtomicU32,
    commands: AtomicU32,
    commands_high: AtomicU32,
    access_flag_faults: AtomicU64,
}

/// A [`RingOccupancy`] reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OccupancyReading {
    /// Slots per ring.
    pub capacity: u32,
    /// Fault records waiting behind the one just taken.
    pub faults: u32,
    /// Most fault records ever seen waiting.
    pub faults_high: u32,
    /// Commands not yet taken by the core after the last push.
    pub commands: u32,
    /// Most commands ever seen waiting.
    pub commands_high: u32,
    /// Access-flag faults the core resolved without a record (its count on
    /// the fault ring: the producer's word, shown and never acted on).
    pub access_flag_faults: u64,
}

impl RingOccupancy {
    fn note(now: &AtomicU32, high: &AtomicU32, n: u32) {
        now.store(n, Ordering::Relaxed);
        if n > high.load(Ordering::Relaxed) {
            high.fetch_max(n, Ordering::Relaxed);
        }
    }

    /// Sets the ring capacity.
    pub fn set_capacity(&self, slots: u32) {
        self.capacity.store(slots, Ordering::Relaxed);
    }

    /// Notes the fault ring's occupancy.
    pub fn note_faults(&self, n: u32) {
        Self::note(&self.faults, &self.faults_high, n);
    }

    /// Notes the command ring's occupancy.
    pub fn note_commands(&self, n: u32) {
        Self::note(&self.commands, &self.commands_high, n);
    }

    /// Notes the core's access-flag fault count, read from the fault ring.
    pub fn note_access_flag_faults(&self, n: u64) {
        self.access_flag_faults.store(n, Ordering::Relaxed);
    }

    /// The current reading.
    pub fn read(&self) -> OccupancyReading {
        let l = |a: &AtomicU32| a.load(Ordering::Relaxed);
        OccupancyReading {
            capacity: l(&self.capacity),
            faults: l(&self.faults),
            faults_high: l(&self.faults_high),
            commands: l(&self.commands),
            commands_high: l(&self.commands_high),
            access_flag_faults: self.access_flag_faults.load(Ordering::Relaxed),
        }
    }
}
