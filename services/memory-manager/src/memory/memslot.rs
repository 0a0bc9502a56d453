//! Memslots: GPA ranges and the daemon addresses that back them, with
//! their flags, fixed at attach. Lookups are O(log n) in a sorted map.
//! (A memslot's dirty bitmap changes with every write fault: it is mapping
//! state, in [`super::mapping`].)

use std::collections::BTreeMap;

use hyp_core::addr::{Ipa, PAGE_SIZE};

use super::addr::Hva;

/// Memslot flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotFlags {
    /// Writes exit to the VMM.
    pub read_only: bool,
    /// Dirty logging.
    pub dirty_log: bool,
}

/// One memslot.
#[derive(Clone, Debug)]
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
}

impl Memslot {
    /// A memslot.
    pub fn new(id: usize, gpa: Ipa, size: u64, hva: Hva, region: usize, region_offset: u64, flags: SlotFlags) -> Self {
        let SlotFlags { read_only, dirty_log } = flags;
        Self { id, gpa, size, hva, region, region_offset, read_only, dirty_log }
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

    /// The slot's page number of `ipa` (which must be in the slot).
    pub fn page_of(&self, ipa: Ipa) -> u64 {
        (ipa.raw() - self.gpa.raw()) / PAGE_SIZE
    }

    /// Pages in the slot (bits in its dirty bitmap).
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(PAGE_SIZE)
    }
}

/// The memslots of one VM, by GPA.
#[derive(Clone, Debug, Default)]
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

    /// The slot with attach index `id`.
    pub fn by_id(&self, id: usize) -> Option<&Memslot> {
        self.by_gpa.values().find(|m| m.id == id)
    }

    /// All slots in GPA order.
    pub fn iter(&self) -> impl Iterator<Item = &Memslot> {
        self.by_gpa.values()
    }
}
