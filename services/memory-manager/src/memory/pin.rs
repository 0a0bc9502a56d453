//! Page pins: a count per backing page (4 KiB, or the 2 MiB / 1 GiB page of
//! a huge-page region, the way a THP or hugetlb page has one reference count
//! in KVM's get_user_pages), taken by an RAII guard.
//!
//! A fault pins the pages it is about to map before anything else can fail;
//! every early return drops the [`PinGuard`] and releases them (KVM's leaked
//! page references on error paths cannot happen). Only when the core reports
//! the mapping installed does the guard become a [`MappingPin`], held until
//! the mapping is removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use hyp_core::addr::PAGE_SIZE;

use super::chunked::Chunked;

/// Counts per chunk: 2 KiB of counts (8 MiB of 4 KiB pages), made at the
/// first pin in them.
const CHUNK_COUNTS: usize = 2048;

/// The most a page's count holds; pins past it wait in the overflow.
const TOP: u8 = u8::MAX;

/// Pin counts of every guest region of a VM.
#[derive(Debug)]
pub struct Pins {
    regions: Vec<RegionPins>,
}

#[derive(Debug)]
struct RegionPins {
    /// log2 of the backing page size.
    shift: u32,
    /// One count per backing page, made a chunk at a time (a 1 TiB
    /// region costs its chunk table until pages are pinned, not 256 MiB).
    /// 8 bits: a page is pinned once per mapping of it and per fault
    /// about to map it, a handful of times; past [`TOP`] the rest are
    /// counted in `overflow`.
    counts: Chunked<AtomicU8, CHUNK_COUNTS>,
    /// Pins past [`TOP`] by page, for pages whose count is at it. A count
    /// leaves [`TOP`] only under this lock, and only with none of its
    /// page's pins here.
    overflow: Mutex<HashMap<usize, u32>>,
}

impl RegionPins {
    fn overflow(&self) -> std::sync::MutexGuard<'_, HashMap<usize, u32>> {
        self.overflow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins page `i` once more.
    fn pin_page(&self, i: usize) {
        let count = self.counts.get_or_make(i);
        loop {
            if count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| (c < TOP).then(|| c + 1)).is_ok() {
                return;
            }
            let mut overflow = self.overflow();
            // At the top under the lock: it stays there while it is held.
            if count.load(Ordering::Acquire) == TOP {
                *overflow.entry(i).or_default() += 1;
                return;
            }
        }
    }

    /// Lets go of one pin of page `i` (which it holds).
    fn unpin_page(&self, i: usize) {
        // Made by the pin this lets go of.
        let count = self.counts.get_or_make(i);
        loop {
            let below_top = |c: u8| (c < TOP).then(|| c.checked_sub(1).expect("a pinned page has a count"));
            if count.fetch_update(Ordering::AcqRel, Ordering::Acquire, below_top).is_ok() {
                return;
            }
            let mut overflow = self.overflow();
            if count.load(Ordering::Acquire) == TOP {
                match overflow.get_mut(&i) {
                    Some(1) => drop(overflow.remove(&i)),
                    Some(n) => *n -= 1,
                    None => count.store(TOP - 1, Ordering::Release),
                }
                return;
            }
        }
    }

    /// Page `i`'s pins.
    fn count(&self, i: usize) -> u32 {
        match self.counts.get(i).map_or(0, |c| c.load(Ordering::Acquire)) {
            TOP => u32::from(TOP) + self.overflow().get(&i).copied().unwrap_or(0),
            c => c.into(),
        }
    }
}

/// Why pages could not be pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// The range is outside the region.
    #[error("range {offset:#x}+{len:#x} is outside region {region}")]
    OutOfRange {
        /// Region index.
        region: usize,
        /// Offset in the region.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

impl Pins {
    /// Pin tables for regions of the given `(bytes, backing page size)`.
    pub fn new(regions: &[(u64, u64)]) -> Arc<Self> {
        let regions = regions
            .iter()
            .map(|&(size, page_size)| {
                let shift = page_size.max(PAGE_SIZE).trailing_zeros();
                let counts = Chunked::new(size.div_ceil(1 << shift) as usize);
                RegionPins { shift, counts, overflow: Mutex::default() }
            })
            .collect();
        Arc::new(Self { regions })
    }

    /// The backing pages a pin of `[offset, offset + len)` of `region`
    /// holds.
    pub fn span(&self, region: usize, offset: u64, len: u64) -> Result<PinSpan, PinError> {
        let err = PinError::OutOfRange { region, offset, len };
        let r = self.regions.get(region).ok_or(err)?;
        let limit = r.counts.len() as u64 * (1u64 << r.shift);
        let end = offset.checked_add(len).filter(|&e| len > 0 && offset % PAGE_SIZE == 0 && e <= limit);
        let end = end.ok_or(err)?;
        let first = (offset >> r.shift) as usize;
        let pages = (((end - 1) >> r.shift) + 1) as usize - first;
        Ok(PinSpan { region, first, pages })
    }

    /// Pins the pages of `[offset, offset + len)` of `region`.
    pub fn pin(self: &Arc<Self>, region: usize, offset: u64, len: u64) -> Result<PinGuard, PinError> {
        let span = self.span(region, offset, len)?;
        let r = &self.regions[region];
        (span.first..span.first + span.pages).for_each(|i| r.pin_page(i));
        Ok(PinGuard { pins: self.clone(), region, first: span.first, pages: span.pages })
    }

    /// The pin [`MappingPin::into_span`] let go of, as a guard again. Only
    /// the owner of that span may take it back (the memory module's record
    /// table): taken twice, it would release counts another pin holds.
    pub(super) fn take_back(self: &Arc<Self>, span: PinSpan) -> MappingPin {
        MappingPin(PinGuard { pins: self.clone(), region: span.region, first: span.first, pages: span.pages })
    }

    /// Pin count of the backing page holding `offset`.
    pub fn count(&self, region: usize, offset: u64) -> u32 {
        let r = &self.regions[region];
        r.count((offset >> r.shift) as usize)
    }

    /// Sum of all pin counts (backing pages x pins).
    pub fn total(&self) -> u64 {
        let counted = |r: &RegionPins| {
            let counts: u64 = r.counts.made().map(|c| u64::from(c.load(Ordering::Acquire))).sum();
            counts + r.overflow().values().map(|&n| u64::from(n)).sum::<u64>()
        };
        self.regions.iter().map(counted).sum()
    }

    fn release(&self, region: usize, first: usize, pages: usize) {
        let r = &self.regions[region];
        (first..first + pages).for_each(|i| r.unpin_page(i));
    }
}

/// The backing pages one pin holds: what the record table keeps of an
/// installed mapping's pin instead of its guard (it follows from the
/// mapping's IPA, so the table keeps nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinSpan {
    /// Region index.
    pub region: usize,
    /// First backing page.
    pub first: usize,
    /// Backing pages.
    pub pages: usize,
}

/// Pages pinned for a fault in progress; released on drop.
#[derive(Debug)]
#[must_use = "dropping a PinGuard releases the pin"]
pub struct PinGuard {
    pins: Arc<Pins>,
    region: usize,
    first: usize,
    pages: usize,
}

impl PinGuard {
    /// Pages held.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The core installed the mapping: the pin now lives as long as it.
    pub fn into_mapping(self) -> MappingPin {
        MappingPin(self)
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.pins.release(self.region, self.first, self.pages);
    }
}

/// The pin of an installed mapping; released when the mapping is removed.
#[derive(Debug)]
pub struct MappingPin(PinGuard);

impl MappingPin {
    /// Pages held.
    pub fn pages(&self) -> usize {
        self.0.pages
    }

    /// The pages held, without the guard: they stay pinned until
    /// [`Pins::take_back`] makes a guard of the span again.
    pub(super) fn into_span(self) -> PinSpan {
        let span = self.span();
        let mut guard = self.0;
        // Dropped holding no page: nothing released.
        guard.pages = 0;
        span
    }

    /// The pages held.
    pub fn span(&self) -> PinSpan {
        PinSpan { region: self.0.region, first: self.0.first, pages: self.0.pages }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_region_costs_counts_only_where_pages_are_pinned() {
        // 1 TiB of 4 KiB pages: 256 Mi counts, none made.
        let pins = Pins::new(&[(1 << 40, 4096)]);
        assert_eq!(pins.regions[0].counts.chunks_made(), 0);
        assert_eq!((pins.count(0, 1 << 39), pins.total()), (0, 0));
        let far = pins.pin(0, (1 << 40) - 4096, 4096).unwrap();
        let near = pins.pin(0, 0, 8192).unwrap();
        assert_eq!(pins.regions[0].counts.chunks_made(), 2);
        assert_eq!((pins.count(0, (1 << 40) - 4096), pins.total()), (1, 3));
        drop((far, near));
        assert_eq!(pins.total(), 0);
    }

    #[test]
    fn huge_backing_pages_have_one_count() {
        let pins = Pins::new(&[(8 << 20, 2 << 20)]);
        let g = pins.pin(0, 2 << 20, 2 << 20).unwrap();
        assert_eq!((g.pages(), pins.total()), (1, 1));
        let small = pins.pin(0, (2 << 20) + 4096, 4096).unwrap();
        assert_eq!(pins.count(0, 3 << 20), 2);
        drop((g, small));
        assert_eq!(pins.total(), 0);
    }

    #[test]
    fn guard_releases_on_drop_and_mapping_pin_keeps_pages() {
        let pins = Pins::new(&[(4 << 20, 4096)]);
        {
            let g = pins.pin(0, 2 << 20, 2 << 20).unwrap();
            assert_eq!(g.pages(), 512);
            assert_eq!(pins.total(), 512);
        }
        assert_eq!(pins.total(), 0);
        let m = pins.pin(0, 0, 4096).unwrap().into_mapping();
        let _again = pins.pin(0, 0, 4096).unwrap();
        assert_eq!(pins.count(0, 0), 2);
        drop(m);
        assert_eq!(pins.count(0, 0), 1);
        assert!(pins.pin(0, 4 << 20, 4096).is_err());
        assert!(pins.pin(1, 0, 4096).is_err());
    }

    #[test]
    fn a_page_pinned_past_what_its_count_holds_keeps_counting_and_lets_go_exactly() {
        let pins = Pins::new(&[(4 << 20, 4096)]);
        // Page 3 pinned 300 times: 255 in its count, 45 past it.
        let held: Vec<PinGuard> = (0..300).map(|_| pins.pin(0, 3 * 4096, 4096).unwrap()).collect();
        let range = pins.pin(0, 0, 8 * 4096).unwrap();
        assert_eq!((pins.count(0, 3 * 4096), pins.count(0, 2 * 4096), pins.total()), (301, 1, 308));
        assert_eq!(pins.regions[0].overflow().get(&3), Some(&46));
        drop(range);
        drop(held);
        assert_eq!((pins.count(0, 3 * 4096), pins.total()), (0, 0));
        assert!(pins.regions[0].overflow().is_empty(), "nothing left past the top");
    }

    #[test]
    fn pins_racing_across_the_top_of_a_count_lose_none() {
        let pins = Pins::new(&[(1 << 20, 4096)]);
        // 250 held: four threads pinning and letting go 4 at a time cross
        // the top (255) over and over.
        let held: Vec<PinGuard> = (0..250).map(|_| pins.pin(0, 0, 4096).unwrap()).collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        let some: Vec<PinGuard> = (0..4).map(|_| pins.pin(0, 0, 4096).unwrap()).collect();
                        assert!(pins.count(0, 0) >= 254);
                        drop(some);
                    }
                });
            }
        });
        assert_eq!(pins.count(0, 0), 250);
        assert!(pins.regions[0].overflow().is_empty());
        drop(held);
        assert_eq!(pins.total(), 0);
    }
}
