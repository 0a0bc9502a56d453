//! Host-test fixtures: table memory in an aligned heap buffer, a TLB that
//! records what it was asked.

extern crate std;

use std::boxed::Box;
use std::vec::Vec;

use core::ptr::NonNull;

use crate::addr::{Ipa, Pa, PAGE_SIZE};

use super::{LinearMap, Memcache, TlbMaintenance};

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// `pages` pages of heap memory posing as physical memory at `pa_start`.
pub(crate) struct HostMemory {
    _pages: Box<[Page]>,
    map: LinearMap,
}

impl HostMemory {
    pub(crate) fn new(pa_start: Pa, pages: usize) -> Self {
        let mut buf: Box<[Page]> = (0..pages).map(|_| Page([0; 4096])).collect();
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `buf` is pages * 4 KiB, 4 KiB aligned, lives as long as the
        // map (both are fields of `Self`, and the box never moves its heap
        // allocation), and is only accessed through the map's atomics.
        let map = unsafe { LinearMap::new(pa_start, pages as u64 * PAGE_SIZE, base) };
        Self { _pages: buf, map }
    }

    pub(crate) fn map(&self) -> &LinearMap {
        &self.map
    }

    /// A memcache holding every page from `first` on.
    pub(crate) fn memcache_from(&self, first: usize, count: usize) -> Memcache {
        let mut m = Memcache::new();
        for i in first..first + count {
            m.push(Pa::new(self.map.pa_start().raw() + i as u64 * PAGE_SIZE)).unwrap();
        }
        m
    }
}

// SAFETY: delegates to the LinearMap, whose memory `self` owns.
unsafe impl super::TableMemory for HostMemory {
    fn table(&self, pa: Pa) -> Option<&super::Table> {
        super::TableMemory::table(&self.map, pa)
    }
}

/// A TLB that records invalidations and syncs.
#[derive(Default, Debug)]
pub(crate) struct RecordingTlb {
    pub(crate) invalidated: Vec<(u8, Ipa, u8)>,
    pub(crate) syncs: usize,
}

impl TlbMaintenance for RecordingTlb {
    fn invalidate_ipa(&mut self, vmid: u8, ipa: Ipa, level: u8) {
        self.invalidated.push((vmid, ipa, level));
    }
    fn sync(&mut self, _vmid: u8) {
        self.syncs += 1;
    }
}
