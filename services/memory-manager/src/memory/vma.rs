//! VMAs: what backs each range of the daemon's address space.
//!
//! The tree lives behind a lock. A fault takes a [`Vma`] *snapshot*: a copy
//! made inside the lock's scope and returned by value, so nothing the
//! pipeline holds can dangle after the lock is dropped (KVM's old TOCTOU,
//! where a `vma` pointer was used after mmap_lock was released, cannot be
//! written: `tests/ui/vma_ref_outlives_lock.rs` shows the compiler refusing).

use std::collections::BTreeMap;
use std::sync::{RwLock, RwLockReadGuard};

use super::addr::Hva;

/// One mapping of the daemon's address space and what backs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: Hva,
    /// Bytes.
    pub len: u64,
    /// Index of the backing guest region.
    pub region: usize,
    /// Backing page size.
    pub page_size: u64,
    /// Writable by the guest.
    pub writable: bool,
    /// Device memory: non-cacheable, never executable.
    pub device: bool,
}

impl Vma {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start.raw() + self.len
    }

    /// True if `[hva, hva + len)` lies inside the VMA.
    pub fn contains_range(&self, hva: Hva, len: u64) -> bool {
        hva >= self.start && hva.raw().checked_add(len).is_some_and(|e| e <= self.end())
    }
}

/// The VMA tree; lookups are O(log n).
#[derive(Debug, Default)]
pub struct Vmas {
    tree: RwLock<BTreeMap<u64, Vma>>,
}

/// Read access to the tree; references into it live no longer than this guard.
pub struct VmaReadGuard<'a> {
    tree: RwLockReadGuard<'a, BTreeMap<u64, Vma>>,
}

impl VmaReadGuard<'_> {
    /// The VMA containing `hva`, borrowed from the locked tree.
    pub fn find(&self, hva: Hva) -> Option<&Vma> {
        let (_, vma) = self.tree.range(..=hva.raw()).next_back()?;
        (hva.raw() < vma.end()).then_some(vma)
    }
}

impl Vmas {
    /// Adds a VMA.
    pub fn insert(&self, vma: Vma) {
        self.tree.write().unwrap_or_else(|e| e.into_inner()).insert(vma.start.raw(), vma);
    }

    /// Locks the tree for reading.
    pub fn read(&self) -> VmaReadGuard<'_> {
        VmaReadGuard { tree: self.tree.read().unwrap_or_else(|e| e.into_inner()) }
    }

    /// A copy of the VMA containing `hva`, taken inside the lock's scope.
    pub fn snapshot(&self, hva: Hva) -> Option<Vma> {
        self.read().find(hva).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_the_containing_vma_only() {
        let v = Vmas::default();
        let vma =
            |start, len| Vma { start: Hva::new(start), len, region: 0, page_size: 4096, writable: true, device: false };
        v.insert(vma(0x1000_0000, 0x20_0000));
        v.insert(vma(0x3000_0000, 0x1000));
        assert_eq!(v.snapshot(Hva::new(0x1000_0000)).map(|v| v.start.raw()), Some(0x1000_0000));
        assert_eq!(v.snapshot(Hva::new(0x101f_ffff)).map(|v| v.start.raw()), Some(0x1000_0000));
        assert_eq!(v.snapshot(Hva::new(0x1020_0000)), None);
        assert_eq!(v.snapshot(Hva::new(0x0fff_ffff)), None);
        assert_eq!(v.snapshot(Hva::new(0x3000_0fff)).map(|v| v.start.raw()), Some(0x3000_0000));
    }
}
