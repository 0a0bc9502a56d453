//! Page pins: a count per backing page (4 KiB, or the 2 MiB / 1 GiB page of
//! a huge-page region, the way a THP or hugetlb page has one reference count
//! in KVM's get_user_pages), taken by an RAII guard.
//!
//! A fault pins the pages it is about to map before anything else can fail;
//! every early return drops the [`PinGuard`] and releases them (KVM's leaked
//! page references on error paths cannot happen). Only when the core reports
//! the mapping installed does the guard become a [`MappingPin`], held until
//! the mapping is removed.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use hyp_core::addr::PAGE_SIZE;

use super::chunked::Chunked;

/// Counts per chunk: 4 KiB of counts, made at the first pin in them.
const CHUNK_COUNTS: usize = 2048;

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
    /// region costs its chunk table until pages are pinned, not 512 MiB).
    /// 16 bits: a page is pinned once per mapping of it and per fault
    /// about to map it, a handful of times, not 65,535.
    counts: Chunked<AtomicU16, CHUNK_COUNTS>,
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
    /// A page's count would pass 65,535: nothing of the range is pinned.
    #[error("page {page} of region {region} is pinned {} times already", u16::MAX)]
    Saturated {
        /// Region index.
        region: usize,
        /// Backing page.
        page: usize,
    },
}

impl Pins {
    /// Pin tables for regions of the given `(bytes, backing page size)`.
    pub fn new(regions: &[(u64, u64)]) -> Arc<Self> {
        let regions = regions
            .iter()
            .map(|&(size, page_size)| {
                let shift = page_size.max(PAGE_SIZE).trailing_zeros();
                RegionPins { shift, counts: Chunked::new(size.div_ceil(1 << shift) as usize) }
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

    /// Pins the pages of `[offset, offset + len)` of `region`: all of
    /// them, or none if one is pinned as often as a count can say.
    pub fn pin(self: &Arc<Self>, region: usize, offset: u64, len: u64) -> Result<PinGuard, PinError> {
        let span = self.span(region, offset, len)?;
        let counts = &self.regions[region].counts;
        for (taken, i) in (span.first..span.first + span.pages).enumerate() {
            let count = counts.get_or_make(i);
            if count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_add(1)).is_err() {
                self.release(region, span.first, taken);
                return Err(PinError::Saturated { region, page: i });
            }
        }
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
        r.counts.get((offset >> r.shift) as usize).map_or(0, |c| c.load(Ordering::Acquire).into())
    }

    /// Sum of all pin counts (backing pages x pins).
    pub fn total(&self) -> u64 {
        self.regions.iter().flat_map(|r| r.counts.made()).map(|c| c.load(Ordering::Acquire) as u64).sum()
    }

    fn release(&self, region: usize, first: usize, pages: usize) {
        let counts = &self.regions[region].counts;
        for i in first..first + pages {
            // Made by the pin this releases.
            counts.get_or_make(i).fetch_sub(1, Ordering::AcqRel);
        }
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
    fn a_page_pinned_as_often_as_a_count_says_refuses_the_whole_range() {
        let pins = Pins::new(&[(4 << 20, 4096)]);
        // Page 3 at the most a count holds.
        let held: Vec<PinGuard> = (0..u16::MAX).map(|_| pins.pin(0, 3 * 4096, 4096).unwrap()).collect();
        assert_eq!(pins.count(0, 3 * 4096), u32::from(u16::MAX));
        let err = pins.pin(0, 0, 8 * 4096).unwrap_err();
        assert_eq!(err, PinError::Saturated { region: 0, page: 3 });
        // Pages 0-2, taken before page 3 refused, were given back.
        assert_eq!((pins.count(0, 0), pins.count(0, 2 * 4096), pins.count(0, 4 * 4096)), (0, 0, 0));
        assert_eq!(pins.total(), u64::from(u16::MAX));
        drop(held);
        assert_eq!(pins.total(), 0);
        assert_eq!(pins.pin(0, 0, 8 * 4096).unwrap().pages(), 8);
    }
}
