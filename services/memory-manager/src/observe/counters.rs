//! What one VM counts: fault records and what became of them, fault-around
//! and reclaim. Plain atomics, bumped by the ring link, read by the API.

use std::sync::atomic::{AtomicU64, Ordering};

use hyp_core::stage2::MapSize;

/// Counters of one VM.
#[derive(Debug, Default)]
pub struct VmCounters {
    /// Fault records received.
    pub faults: AtomicU64,
    /// New 4 KiB mappings installed.
    pub mapped_4k: AtomicU64,
    /// New 2 MiB mappings installed.
    pub mapped_2m: AtomicU64,
    /// New 1 GiB mappings installed.
    pub mapped_1g: AtomicU64,
    /// Maps that found the same mapping present (another vCPU won).
    pub already_present: AtomicU64,
    /// Permission relaxations.
    pub relaxed: AtomicU64,
    /// MMIO exits with a syndrome.
    pub mmio_exits: AtomicU64,
    /// Exits without a syndrome.
    pub no_syndrome_exits: AtomicU64,
    /// Aborts injected into the guest.
    pub injected: AtomicU64,
    /// Maps refused as stale and retried.
    pub retried_stale: AtomicU64,
    /// Maps refused by the core for other reasons.
    pub rejected: AtomicU64,
    /// Memcache top-ups sent.
    pub topups: AtomicU64,
    /// Pages mapped by fault-around (PREFAULT commands installed).
    pub prefaulted: AtomicU64,
    /// Mappings reclaimed to keep the VM within its resident budget.
    pub evicted: AtomicU64,
    /// Bytes copied to the swap store by those reclaims.
    pub evicted_bytes: AtomicU64,
    /// Mappings reclaimed by cold reclaim (idle, under budget or not).
    pub cold_evicted: AtomicU64,
    /// CPU time the VM's working-set monitor took sampling and
    /// aggregating (ns; cold reclaim on its thread not included).
    pub monitor_cpu_ns: AtomicU64,
    /// Pipeline errors.
    pub errors: AtomicU64,
    /// Fault records dropped as posted again (after a re-attach) while
    /// already taken.
    pub reposted: AtomicU64,
}

impl VmCounters {
    /// Counts a new mapping of `size`.
    pub fn mapped(&self, size: MapSize) {
        let counter = match size {
            MapSize::Page4K => &self.mapped_4k,
            MapSize::Block2M => &self.mapped_2m,
            MapSize::Block1G => &self.mapped_1g,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
