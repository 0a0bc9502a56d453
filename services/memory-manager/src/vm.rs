//! One attached VM as the daemon sees it: memslots, VMAs, regions, pins,
//! installed mappings, the table-page pool and counters.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hyp_core::addr::{Ipa, Pa, PAGE_SIZE};
use hyp_core::ownership::VmId;
use hyp_core::stage2::MapSize;

use crate::control::{ControlClient, ControlError};
use crate::memslot::{dirty_runs, Memslot, Memslots, SlotFlags};
use crate::pin::{MappingPin, Pins};
use crate::region::{FillError, GuestRegion, RegionSpec};
use crate::vma::Vmas;

/// Invalidations remembered for late map results.
const INVALIDATION_LOG: usize = 256;

/// A mapping the core confirmed, with the pin that keeps its pages.
#[derive(Debug)]
pub struct Installed {
    /// Mapping size.
    pub size: MapSize,
    /// Output PA.
    pub pa: Pa,
    /// The core's invalidation sequence when it was installed.
    pub seq: u64,
    /// The pages' pin.
    pub pin: MappingPin,
    /// Install order within the VM, set by [`VmMemory::record_installed`]
    /// (FIFO/LIFO eviction).
    pub order: u64,
}

impl Installed {
    /// A mapping the core reports installed, to record.
    pub fn new(size: MapSize, pa: Pa, seq: u64, pin: MappingPin) -> Self {
        Self { size, pa, seq, pin, order: 0 }
    }
}

/// Counters of one VM.
#[derive(Debug, Default)]
pub struct Stats {
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
    /// Pipeline errors.
    pub errors: AtomicU64,
}

/// How full one vCPU's rings are, in records, as its service thread last
/// saw them (plain stores: a statistic, not a synchronisation point).
#[derive(Debug, Default)]
pub struct RingOccupancy {
    capacity: AtomicU32,
    faults: AtomicU32,
    faults_high: AtomicU32,
    commands: AtomicU32,
    commands_high: AtomicU32,
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

    /// The current reading.
    pub fn read(&self) -> OccupancyReading {
        let l = |a: &AtomicU32| a.load(Ordering::Relaxed);
        OccupancyReading {
            capacity: l(&self.capacity),
            faults: l(&self.faults),
            faults_high: l(&self.faults_high),
            commands: l(&self.commands),
            commands_high: l(&self.commands_high),
        }
    }
}

/// What a fetch-and-clear of a dirty log returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyLog {
    /// The bitmap (64-bit words) as it was when cleared.
    pub bitmap: Vec<u64>,
    /// WRITE_PROTECT commands the core executed.
    pub write_protects: u64,
}

/// Dirty runs beyond which one write-protect covers the whole dirty span.
const MAX_WRITE_PROTECT_RUNS: usize = 64;

/// Table pages the daemon may hand to the core (the machine's table pool).
#[derive(Debug, Default)]
pub struct PagePool {
    free: Vec<(Pa, u64)>,
}

impl PagePool {
    /// A pool over PA windows `(base, bytes)`.
    pub fn new(windows: Vec<(Pa, u64)>) -> Self {
        Self { free: windows }
    }

    /// Takes up to `pages` contiguous pages: `(first, count)`.
    pub fn take(&mut self, pages: u64) -> Option<(Pa, u64)> {
        let (base, bytes) = self.free.last_mut()?;
        let n = pages.min(*bytes / PAGE_SIZE);
        let first = *base;
        *base = Pa::new(base.raw() + n * PAGE_SIZE);
        *bytes -= n * PAGE_SIZE;
        if *bytes == 0 {
            self.free.pop();
        }
        Some((first, n))
    }
}

/// The daemon's view of one VM.
#[derive(Debug)]
pub struct VmMemory {
    /// VM id.
    pub id: VmId,
    /// vCPUs.
    pub nr_vcpus: u32,
    /// Memslots.
    pub memslots: Memslots,
    /// VMAs over the guest regions.
    pub vmas: Vmas,
    /// Guest regions (index = `Vma::region` = `Memslot::region`).
    pub regions: Vec<GuestRegion>,
    /// Page pins.
    pub pins: Arc<Pins>,
    /// Installed mappings by IPA.
    pub mappings: Mutex<BTreeMap<u64, Installed>>,
    /// Table-page pool.
    pub pool: Mutex<PagePool>,
    /// Latest invalidation sequence the core reported.
    core_seq: AtomicU64,
    /// Recent invalidations: (first IPA, bytes, core sequence after it).
    invalidations: Mutex<VecDeque<(u64, u64, u64)>>,
    /// Counters.
    pub stats: Stats,
    /// Ring occupancy per vCPU.
    pub rings: Vec<RingOccupancy>,
    /// Commands the daemon starts itself, over the control ring pair.
    pub control: ControlClient,
    /// Bytes of guest memory mapped (recorded mappings).
    resident: AtomicU64,
    /// Mappings recorded so far (the next one's order).
    installs: AtomicU64,
}

impl VmMemory {
    /// Assembles a VM; the pieces were validated at attach.
    pub fn new(
        id: VmId,
        nr_vcpus: u32,
        memslots: Memslots,
        vmas: Vmas,
        regions: Vec<GuestRegion>,
        pool: PagePool,
    ) -> Self {
        let sizes: Vec<(u64, u64)> = regions.iter().map(|r| (r.size, r.page_size)).collect();
        Self {
            id,
            nr_vcpus,
            memslots,
            vmas,
            regions,
            pins: Pins::new(&sizes),
            mappings: Mutex::new(BTreeMap::new()),
            pool: Mutex::new(pool),
            core_seq: AtomicU64::new(0),
            invalidations: Mutex::new(VecDeque::new()),
            stats: Stats::default(),
            rings: (0..nr_vcpus).map(|_| RingOccupancy::default()).collect(),
            control: ControlClient::default(),
            resident: AtomicU64::new(0),
            installs: AtomicU64::new(0),
        }
    }

    /// Bytes of guest memory mapped now.
    pub fn resident(&self) -> u64 {
        self.resident.load(Ordering::Acquire)
    }

    /// A VM whose memory is one writable memfd region of `size` bytes at PA
    /// `pa_base`, with memslots `(GPA, bytes, offset in the region, flags)`
    /// over it: the smallest real VM, for tests and benchmarks.
    pub fn single_region(
        id: VmId,
        pa_base: Pa,
        size: u64,
        page_size: u64,
        slots: &[(u64, u64, u64, SlotFlags)],
    ) -> std::io::Result<Self> {
        let memfd = memfd::MemfdOptions::default().create("guest-ram").map_err(std::io::Error::other)?;
        memfd.as_file().set_len(size)?;
        let spec = RegionSpec { index: 0, pa_base, size, page_size, fd_offset: 0, writable: true, device: false };
        let region = GuestRegion::map(memfd, spec).map_err(std::io::Error::other)?;
        let vmas = Vmas::default();
        vmas.insert(region.vma(0));
        let mut memslots = Memslots::default();
        for (i, &(gpa, len, offset, flags)) in slots.iter().enumerate() {
            let hva =
                region.base().checked_add(offset).ok_or_else(|| std::io::Error::other("memslot offset overflows"))?;
            memslots.insert(Memslot::new(i, Ipa::new(gpa), len, hva, 0, offset, flags));
        }
        Ok(Self::new(id, 1, memslots, vmas, vec![region], PagePool::default()))
    }

    /// Faults in every page of every non-device guest region now.
    pub fn prefault(&self) -> Result<(), FillError> {
        for (i, r) in self.regions.iter().enumerate().filter(|(_, r)| !r.device) {
            r.fill(0, r.size)?;
            self.pins.mark_populated(i, 0, r.size);
        }
        Ok(())
    }

    /// The invalidation sequence to stamp on a map command now.
    pub fn sample_seq(&self) -> u64 {
        self.core_seq.load(Ordering::Acquire)
    }

    /// Notes a sequence the core reported (fault records and results).
    pub fn note_seq(&self, seq: u64) {
        self.core_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// True if a recorded mapping smaller than `len` starts inside
    /// `[start, start + len)`: a block there would overlap its table (the
    /// core refuses that; KVM would tear the table down).
    pub fn has_smaller_mapping(&self, start: Ipa, len: u64) -> bool {
        let mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        mappings.range(start.raw()..start.raw() + len).any(|(_, m)| m.size.bytes() < len)
    }

    /// True if a recorded mapping covers `ipa`.
    pub fn is_mapped(&self, ipa: Ipa) -> bool {
        let mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        mappings.range(..=ipa.raw()).next_back().is_some_and(|(&start, m)| ipa.raw() < start + m.size.bytes())
    }

    /// Records a mapping the core installed. Returns false, releasing its
    /// pin, if an invalidation the core executed after installing it has
    /// already been reconciled (the result of the map arrived late): the
    /// mapping is gone from the tables.
    pub fn record_installed(&self, ipa: Ipa, installed: Installed) -> bool {
        let counter = match installed.size {
            MapSize::Page4K => &self.stats.mapped_4k,
            MapSize::Block2M => &self.stats.mapped_2m,
            MapSize::Block1G => &self.stats.mapped_1g,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        let end = ipa.raw() + installed.size.bytes();
        let removed = self
            .invalidations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|&(start, len, seq)| seq > installed.seq && ipa.raw() < start + len && start < end);
        if removed {
            return false;
        }
        let mut installed = installed;
        installed.order = self.installs.fetch_add(1, Ordering::Relaxed);
        self.resident.fetch_add(installed.size.bytes(), Ordering::AcqRel);
        if let Some(old) = mappings.insert(ipa.raw(), installed) {
            self.resident.fetch_sub(old.size.bytes(), Ordering::AcqRel);
        }
        true
    }

    /// Reconciles an unmap or write-protect the core executed over
    /// `[start, start + len)`, leaving its sequence at `seq_after`: mappings
    /// installed before it are forgotten and their pins released. Returns the
    /// pages released.
    pub fn forget_range(&self, start: Ipa, len: u64, seq_after: u64) -> u64 {
        self.note_seq(seq_after);
        let mut mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut log = self.invalidations.lock().unwrap_or_else(|e| e.into_inner());
            if log.len() == INVALIDATION_LOG {
                log.pop_front();
            }
            log.push_back((start.raw(), len, seq_after));
        }
        let end = start.raw() + len;
        let doomed: Vec<u64> = mappings
            .range(..end)
            .filter(|(&ipa, m)| ipa + m.size.bytes() > start.raw() && m.seq < seq_after)
            .map(|(&ipa, _)| ipa)
            .collect();
        let removed: Vec<Installed> = doomed.iter().filter_map(|ipa| mappings.remove(ipa)).collect();
        self.resident.fetch_sub(removed.iter().map(|m| m.size.bytes()).sum(), Ordering::AcqRel);
        removed.iter().map(|m| m.pin.pages() as u64).sum()
    }

    /// Fetch-and-clear of `slot`'s dirty log, in KVM_GET_DIRTY_LOG's order:
    /// the bits are cleared first, then the pages they name are
    /// write-protected through the core, so a write after the clear either
    /// is in the returned bitmap's page (copied by the caller afterwards) or
    /// faults and is logged again. If the core refuses or does not answer,
    /// the bits go back into the bitmap and nothing is lost.
    pub fn fetch_and_clear_dirty_log(&self, slot: &Memslot) -> Result<DirtyLog, ControlError> {
        let bitmap = slot.take_dirty_bitmap();
        let mut runs = dirty_runs(&bitmap);
        if runs.len() > MAX_WRITE_PROTECT_RUNS {
            let (first, _) = runs[0];
            let (last, n) = runs[runs.len() - 1];
            runs = vec![(first, last + n - first)];
        }
        let mut write_protects = 0;
        for (page, pages) in runs {
            let ipa = Ipa::new(slot.gpa.raw() + page * PAGE_SIZE);
            match self.control.write_protect(ipa, pages * PAGE_SIZE) {
                Ok(res) => {
                    self.note_seq(res.inval_seq);
                    write_protects += 1;
                }
                Err(e) => {
                    slot.restore_dirty_bitmap(&bitmap);
                    return Err(e);
                }
            }
        }
        Ok(DirtyLog { bitmap, write_protects })
    }

    /// Puts every reclaimed page back into guest memory (the VM is
    /// detaching: the machine gets its memory whole).
    pub fn restore_reclaimed(&self) -> Result<(), FillError> {
        for r in &self.regions {
            r.restore_all()?;
        }
        Ok(())
    }

    /// Drops every mapping record (the VM is going away); returns the pages
    /// whose pins were released.
    pub fn release_all(&self) -> u64 {
        let mut m = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        let pages = m.values().map(|i| i.pin.pages() as u64).sum();
        m.clear();
        self.resident.store(0, Ordering::Release);
        pages
    }
}
