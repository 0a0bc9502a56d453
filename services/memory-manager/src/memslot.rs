//! Memslots: GPA ranges and the HVA ranges that back them, with flags and a
//! dirty bitmap. Lookups are O(log n) in a sorted map.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use hyp_core::addr::{Ipa, PAGE_SIZE};

use crate::addr::Hva;

/// Memslot flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotFlags {
    /// Writes exit to the VMM.
    pub read_only: bool,
    /// Dirty logging.
    pub dirty_log: bool,
}

/// One memslot.
#[derive(Debug)]
pub struct Memslot {
    /// Index in the attach request.
    pub id: usize,
    /// First guest physical address.
    pub gpa: Ipa,
    /// Bytes.
    pub size: u64,
    /// Daemon address of the first byte.
    pub hva: Hva,
    /// Backing guest region.
    pub region: usize,
    /// Offset of the first byte in the region.
    pub region_offset: u64,
    /// Writes exit to the VMM.
    pub read_only: bool,
    /// Dirty logging: 4 KiB mappings, write faults set bits.
    pub dirty_log: bool,
    dirty: Vec<AtomicU64>,
}

impl Memslot {
    /// A memslot with an all-clear dirty bitmap.
    pub fn new(id: usize, gpa: Ipa, size: u64, hva: Hva, region: usize, region_offset: u64, flags: SlotFlags) -> Self {
        let pages = size.div_ceil(PAGE_SIZE);
        let dirty = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let SlotFlags { read_only, dirty_log } = flags;
        Self { id, gpa, size, hva, region, region_offset, read_only, dirty_log, dirty }
    }

    /// One past the last GPA.
    pub fn end(&self) -> u64 {
        self.gpa.raw() + self.size
    }

    /// True if `ipa` is in the slot.
    pub fn contains(&self, ipa: Ipa) -> bool {
        ipa >= self.gpa && ipa.raw() < self.end()
    }

    /// The daemon address backing `ipa` (which must be in the slot).
    pub fn hva_of(&self, ipa: Ipa) -> Hva {
        Hva::new(self.hva.raw() + (ipa.raw() - self.gpa.raw()))
    }

    /// Marks the page holding `ipa` dirty.
    pub fn mark_dirty(&self, ipa: Ipa) {
        let page = (ipa.raw() - self.gpa.raw()) / PAGE_SIZE;
        self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    /// True if the page holding `ipa` is marked dirty.
    pub fn is_dirty(&self, ipa: Ipa) -> bool {
        let page = (ipa.raw() - self.gpa.raw()) / PAGE_SIZE;
        self.dirty[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn dirty_count(&self) -> u64 {
        self.dirty.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }
}

/// The memslots of one VM, by GPA.
#[derive(Debug, Default)]
pub struct Memslots {
    by_gpa: BTreeMap<u64, Memslot>,
}

impl Memslots {
    /// Adds a slot; the caller has checked that slots do not overlap.
    pub fn insert(&mut self, slot: Memslot) {
        self.by_gpa.insert(slot.gpa.raw(), slot);
    }

    /// The slot containing `ipa`.
    pub fn lookup(&self, ipa: Ipa) -> Option<&Memslot> {
        let (_, slot) = self.by_gpa.range(..=ipa.raw()).next_back()?;
        slot.contains(ipa).then_some(slot)
    }

    /// All slots in GPA order.
    pub fn iter(&self) -> impl Iterator<Item = &Memslot> {
        self.by_gpa.values()
    }
}
