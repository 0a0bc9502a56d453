//! How the core reaches table memory: a PA-to-table translation behind a
//! small trait, so the same table code runs at EL2 (identity map) and in a
//! host process (offset into a mapped region).
//!
//! Tables are accessed as `AtomicU64` because a walker (the MMU, or the
//! simulator's software MMU on another thread) reads them concurrently.
//! This is the only module of the stage-2 code with `unsafe`.

use core::ptr::NonNull;
use core::sync::atomic::AtomicU64;

use crate::addr::{Ipa, Pa, PAGE_SIZE};

use super::geometry::ENTRIES_PER_TABLE;

/// One 4 KiB translation table as the core sees it.
pub type Table = [AtomicU64; ENTRIES_PER_TABLE];

/// Translates a table page's PA into a reference the core can use.
///
/// # Safety
///
/// For every `pa` where [`TableMemory::table`] returns `Some`, the reference
/// must point to 4 KiB of memory, 4 KiB aligned, that stays mapped and is not
/// accessed non-atomically by anyone while `self` lives.
pub unsafe trait TableMemory {
    /// The table at `pa`, or `None` if `pa` is outside the memory this
    /// translation covers (or not 4 KiB aligned).
    fn table(&self, pa: Pa) -> Option<&Table>;
}

// SAFETY: a shared reference to a valid TableMemory upholds the same contract.
unsafe impl<T: TableMemory + ?Sized> TableMemory for &T {
    fn table(&self, pa: Pa) -> Option<&Table> {
        (**self).table(pa)
    }
}

/// A window of physical memory mapped contiguously at `base` in this address
/// space: PA `pa` is at `base + (pa - pa_start)`. With `base == pa_start`
/// this is EL2's identity map.
#[derive(Debug)]
pub struct LinearMap {
    pa_start: Pa,
    len: u64,
    base: NonNull<u8>,
}

// SAFETY: LinearMap is a description of memory that `new`'s caller promised is
// valid for the lifetime of the map and only accessed atomically; sharing the
// description between threads adds no access that the atomics don't allow.
unsafe impl Send for LinearMap {}
// SAFETY: as above; all accesses through it are atomic.
unsafe impl Sync for LinearMap {}

impl LinearMap {
    /// Describes `len` bytes of physical memory at `pa_start`, mapped at `base`.
    ///
    /// # Safety
    ///
    /// `base .. base + len` must be mapped, readable and writable for the
    /// lifetime of the returned value, 4 KiB aligned, and accessed by others
    /// only atomically (a hardware or software MMU walk counts as atomic).
    pub unsafe fn new(pa_start: Pa, len: u64, base: NonNull<u8>) -> Self {
        Self { pa_start, len, base }
    }

    /// The PA window this map covers.
    pub fn pa_start(&self) -> Pa {
        self.pa_start
    }

    /// Length of the window in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// SAFETY: `table` only returns references inside the window whose validity
// `LinearMap::new`'s caller guaranteed, 4 KiB aligned.
unsafe impl TableMemory for LinearMap {
    fn table(&self, pa: Pa) -> Option<&Table> {
        let offset = pa.checked_offset_from(self.pa_start)?;
        if !pa.is_aligned(PAGE_SIZE) || offset.checked_add(PAGE_SIZE)? > self.len {
            return None;
        }
        // SAFETY: offset + 4096 <= len, so the pointer stays inside the window
        // that `new`'s caller promised is mapped.
        let ptr = unsafe { self.base.as_ptr().add(offset as usize) };
        // SAFETY: the 4 KiB table at `ptr` lies inside the window, which is
        // mapped, 4 KiB aligned (as is `pa`) and only accessed atomically for
        // the lifetime of `self`; AtomicU64 has the size and alignment of u64.
        Some(unsafe { &*ptr.cast::<Table>() })
    }
}

/// Stage-2 TLB maintenance, behind a trait so host tests can count it and
/// the simulator can clear its software TLB.
///
/// At EL2 `invalidate_ipa` is `DSB ISHST; TLBI IPAS2E1IS` and `sync` is
/// `DSB ISH; TLBI VMALLE1IS; DSB ISH; ISB` (Arm ARM D8.16 "Translation
/// Lookaside Buffers", break-before-make in D8.16.1).
pub trait TlbMaintenance {
    /// Invalidates cached stage-2 translations of `ipa` (entry at `level`)
    /// for `vmid`. The invalidation may complete only at the next `sync`.
    fn invalidate_ipa(&mut self, vmid: u8, ipa: Ipa, level: u8);
    /// Waits for all earlier invalidations to complete, including combined
    /// stage-1+2 entries of the VMID.
    fn sync(&mut self, vmid: u8);
}
