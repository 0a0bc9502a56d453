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

    /// Pages in the slot (bits in its bitmap).
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(PAGE_SIZE)
    }

    /// The dirty bitmap as 64-bit words (bit i of word w: page 64 w + i).
    pub fn dirty_bitmap(&self) -> Vec<u64> {
        self.dirty.iter().map(|w| w.load(Ordering::Relaxed)).collect()
    }

    /// The dirty bitmap, clearing it word by word atomically: a bit set
    /// concurrently lands either in the returned copy or in the bitmap.
    pub fn take_dirty_bitmap(&self) -> Vec<u64> {
        self.dirty.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()
    }

    /// Sets again the bits of a bitmap taken by [`Memslot::take_dirty_bitmap`].
    pub fn restore_dirty_bitmap(&self, bitmap: &[u64]) {
        for (w, &bits) in self.dirty.iter().zip(bitmap) {
            w.fetch_or(bits, Ordering::AcqRel);
        }
    }
}

/// Runs of set bits in `bitmap` as `(first page, pages)`, in page order.
pub fn dirty_runs(bitmap: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = w as u64 * 64 + bits.trailing_zeros() as u64;
            bits &= bits - 1;
            match runs.last_mut() {
                Some((first, n)) if *first + *n == page => *n += 1,
                _ => runs.push((page, 1)),
            }
        }
    }
    runs
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cross_word_boundaries_and_take_clears() {
        let slot = Memslot::new(
            0,
            Ipa::new(0x4000_0000),
            200 * PAGE_SIZE,
            Hva::new(0x1000_0000),
            0,
            0,
            SlotFlags { read_only: false, dirty_log: true },
        );
        for page in [0u64, 1, 2, 62, 63, 64, 65, 130, 199] {
            slot.mark_dirty(Ipa::new(0x4000_0000 + page * PAGE_SIZE));
        }
        assert_eq!(slot.pages(), 200);
        assert_eq!(slot.dirty_count(), 9);
        let bitmap = slot.take_dirty_bitmap();
        assert_eq!(dirty_runs(&bitmap), vec![(0, 3), (62, 4), (130, 1), (199, 1)]);
        assert_eq!(slot.dirty_count(), 0);
        assert!(slot.dirty_bitmap().iter().all(|&w| w == 0));
        assert!(dirty_runs(&[0, 0]).is_empty());
        assert_eq!(dirty_runs(&[u64::MAX, u64::MAX]), vec![(0, 128)]);
    }
}
