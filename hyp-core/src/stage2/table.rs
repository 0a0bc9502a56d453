//! Stage-2 translation tables: map, unmap, relax, write-protect, walk.
//!
//! The tables are hyp-core's own rather than `aarch64-paging`'s because that
//! crate has no concatenated stage-2 roots and no VMID-scoped invalidation.
//!
//! Invariants kept here:
//! - table pages come only from the [`Memcache`]; a map checks the worst-case
//!   need before touching anything, and every failure happens before the
//!   first write, so a map never fails half way;
//! - a table whose last valid entry is removed is unlinked and handed back;
//! - replacing a valid leaf with a different one is break-before-make
//!   (Arm ARM D8.16.1): write invalid, invalidate the TLB, then write;
//! - each operation ends with one TLB `sync` before it returns.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{Ipa, Pa, Range, PAGE_SIZE};

use super::descriptor::{Descriptor, DescriptorKind, LeafAttrs, Perms};
use super::geometry::{Geometry, ENTRIES_PER_TABLE};
use super::memcache::Memcache;
use super::memory::{TableMemory, TlbMaintenance};

/// The mapping sizes of a 4 KiB granule.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
pub enum MapSize {
    /// A level-3 page.
    Page4K,
    /// A level-2 block.
    Block2M,
    /// A level-1 block.
    Block1G,
}

impl MapSize {
    /// Every size, smallest first.
    pub const ALL: [Self; 3] = [Self::Page4K, Self::Block2M, Self::Block1G];

    /// Bytes mapped.
    pub const fn bytes(self) -> u64 {
        Geometry::level_size(self.level())
    }

    /// Level of the leaf.
    pub const fn level(self) -> u8 {
        match self {
            Self::Page4K => 3,
            Self::Block2M => 2,
            Self::Block1G => 1,
        }
    }

    /// The size whose byte count is `bytes`.
    pub const fn from_bytes(bytes: u64) -> Option<Self> {
        match bytes {
            0x1000 => Some(Self::Page4K),
            0x20_0000 => Some(Self::Block2M),
            0x4000_0000 => Some(Self::Block1G),
            _ => None,
        }
    }

    /// The size of a leaf at `level`.
    pub const fn from_level(level: u8) -> Option<Self> {
        match level {
            3 => Some(Self::Page4K),
            2 => Some(Self::Block2M),
            1 => Some(Self::Block1G),
            _ => None,
        }
    }
}

/// Why a table operation was refused. Nothing was changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TableError {
    /// IPA or PA not aligned to the mapping size (or a range not 4 KiB aligned).
    Misaligned,
    /// The IPA range lies outside the IPA space.
    IpaOutOfRange,
    /// The PA range lies outside the PA space.
    PaOutOfRange,
    /// The size cannot be a leaf below this geometry's root level.
    SizeUnsupported,
    /// The memcache holds fewer pages than the worst case needs.
    MemcacheLow {
        /// Worst-case pages needed.
        need: usize,
        /// Pages held.
        have: usize,
    },
    /// A different mapping, or a table of smaller mappings, is in the way.
    Overlap {
        /// The level at which it was found.
        level: u8,
    },
    /// The range cuts through a block; the whole block must be named.
    PartialBlock {
        /// First IPA of the block.
        block: Ipa,
    },
    /// No leaf maps the IPA.
    NotMapped,
    /// The root pages are misaligned or outside table memory.
    BadRoot,
    /// A table descriptor points outside table memory, or a reserved
    /// encoding was found: the tables were corrupted.
    Corrupt,
}

/// What a map did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MapOutcome {
    /// A new leaf was written.
    Installed,
    /// The same leaf was already there; nothing changed.
    AlreadyPresent,
    /// A leaf with the same output and different attributes was replaced
    /// (break-before-make).
    Replaced,
}

/// The result of walking one IPA.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Walk {
    /// A leaf maps the IPA.
    Mapped {
        /// Level of the leaf.
        level: u8,
        /// The leaf descriptor.
        descriptor: Descriptor,
        /// The PA the IPA translates to (leaf output plus offset).
        pa: Pa,
    },
    /// The walk stopped at an invalid entry at `level`: a translation fault
    /// at that level.
    Unmapped {
        /// Level of the invalid entry.
        level: u8,
    },
}

/// Counts of what an unmap did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct UnmapStats {
    /// Leaves removed.
    pub leaves: u64,
    /// Bytes of IPA space unmapped.
    pub bytes: u64,
    /// Table pages unlinked and handed back.
    pub tables_freed: u64,
}

/// One VM's stage-2 translation tables.
pub struct Stage2<M: TableMemory> {
    geometry: Geometry,
    root: Pa,
    vmid: u8,
    mem: M,
}

impl<M: TableMemory> core::fmt::Debug for Stage2<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Stage2")
            .field("geometry", &self.geometry)
            .field("root", &self.root)
            .field("vmid", &self.vmid)
            .finish()
    }
}

impl<M: TableMemory> Stage2<M> {
    /// Empty tables rooted at `root` (`geometry.root_tables()` pages,
    /// aligned to their total size), which are zeroed here.
    pub fn new(geometry: Geometry, root: Pa, vmid: u8, mem: M) -> Result<Self, TableError> {
        if !root.is_aligned(geometry.root_size()) {
            return Err(TableError::BadRoot);
        }
        let s2 = Self { geometry, root, vmid, mem };
        for i in 0..geometry.root_tables() as u64 {
            let page = root.checked_add(i * PAGE_SIZE).ok_or(TableError::BadRoot)?;
            let table = s2.mem.table(page).ok_or(TableError::BadRoot)?;
            zero(table);
        }
        Ok(s2)
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// PA of the root table(s): what VTTBR_EL2.BADDR holds.
    pub fn root(&self) -> Pa {
        self.root
    }

    /// The VMID used for TLB maintenance.
    pub fn vmid(&self) -> u8 {
        self.vmid
    }

    /// VTTBR_EL2 for these tables.
    pub fn vttbr(&self) -> u64 {
        self.geometry.vttbr(self.root, self.vmid)
    }

    /// The table memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Worst-case table pages a map of `size` can need: one per level
    /// between the root and the leaf.
    pub fn worst_case_pages(&self, size: MapSize) -> usize {
        size.level().saturating_sub(self.geometry.start_level()) as usize
    }

    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` with `attrs`.
    ///
    /// Fails, changing nothing, if anything else maps part of the range.
    pub fn map(
        &mut self,
        ipa: Ipa,
        pa: Pa,
        size: MapSize,
        attrs: LeafAttrs,
        cache: &mut Memcache,
        tlb: &mut impl TlbMaintenance,
    ) -> Result<MapOutcome, TableError> {
        let bytes = size.bytes();
        let target = size.level();
        if !ipa.is_aligned(bytes) || !pa.is_aligned(bytes) {
            return Err(TableError::Misaligned);
        }
        if !self.geometry.ipa_range_fits(ipa, bytes) {
            return Err(TableError::IpaOutOfRange);
        }
        if !self.geometry.pa_range_fits(pa, bytes) {
            return Err(TableError::PaOutOfRange);
        }
        if target < self.geometry.start_level() {
            return Err(TableError::SizeUnsupported);
        }
        let need = self.worst_case_pages(size);
        if cache.len() < need {
            return Err(TableError::MemcacheLow { need, have: cache.len() });
        }
        // Descend. Every error below happens before the first write: once a
        // table is allocated, all deeper entries are fresh and invalid.
        let mut table = self.root;
        let mut level = self.geometry.start_level();
        while level < target {
            let entry = self.entry(table, level, ipa)?;
            table = match Descriptor::from_raw(entry.load(Ordering::Acquire)).kind(level) {
                DescriptorKind::Table(next) => next,
                DescriptorKind::Invalid => self.link_new_table(entry, cache)?,
                DescriptorKind::Leaf(_) => return Err(TableError::Overlap { level }),
                DescriptorKind::Reserved => return Err(TableError::Corrupt),
            };
            level += 1;
        }
        let entry = self.entry(table, target, ipa)?;
        let new = Descriptor::leaf(target, pa, attrs);
        let old = Descriptor::from_raw(entry.load(Ordering::Acquire));
        match old.kind(target) {
            DescriptorKind::Invalid => {
                entry.store(new.raw(), Ordering::Release);
                Ok(MapOutcome::Installed)
            }
            DescriptorKind::Leaf(out) if out == pa => {
                if old == new {
                    return Ok(MapOutcome::AlreadyPresent);
                }
                // Break-before-make: invalid, invalidate + sync, then the new leaf.
                entry.store(Descriptor::INVALID.raw(), Ordering::Release);
                tlb.invalidate_ipa(self.vmid, ipa, target);
                tlb.sync(self.vmid);
                entry.store(new.raw(), Ordering::Release);
                Ok(MapOutcome::Replaced)
            }
            DescriptorKind::Leaf(_) | DescriptorKind::Table(_) => Err(TableError::Overlap { level: target }),
            DescriptorKind::Reserved => Err(TableError::Corrupt),
        }
    }

    /// Adds `perms` to the leaf that maps `ipa`, in place. Returns the leaf level.
    pub fn relax(&mut self, ipa: Ipa, perms: Perms, tlb: &mut impl TlbMaintenance) -> Result<u8, TableError> {
        let (entry, level) = self.leaf_entry(ipa)?.ok_or(TableError::NotMapped)?;
        let old = Descriptor::from_raw(entry.load(Ordering::Acquire));
        let new = old.with_perms(old.perms().union(perms));
        if new != old {
            // A permission-only change needs no break-before-make; the
            // invalidation drops a stale, more restrictive TLB entry.
            entry.store(new.raw(), Ordering::Release);
            tlb.invalidate_ipa(self.vmid, ipa.align_down(Geometry::level_size(level)), level);
            tlb.sync(self.vmid);
        }
        Ok(level)
    }

    /// Clears the access flag of every leaf intersecting `range` (whole
    /// blocks, even where the range covers only part of one), calling
    /// `young(leaf_ipa, level)` for each that had it set; returns how many
    /// that was. KVM's `kvm_pgtable_stage2_test_clear_young()`: an
    /// access-flag change needs no break-before-make, and like KVM this
    /// invalidates nothing. A TLB entry cached while the flag was set may
    /// let a later access through without a fault, so a page can read as
    /// idle though touched, never as touched though idle.
    pub fn test_clear_young(&mut self, range: Range<Ipa>, young: &mut impl FnMut(Ipa, u8)) -> Result<u64, TableError> {
        self.check_range(range)?;
        let mut cleared = 0;
        self.visit_leaves(range, &mut |entry, ipa, level| {
            let old = Descriptor::from_raw(entry.load(Ordering::Acquire));
            if old.access_flag() {
                entry.store(old.with_access_flag(false).raw(), Ordering::Release);
                young(ipa, level);
                cleared += 1;
            }
        })?;
        Ok(cleared)
    }

    /// Sets the access flag of the leaf that maps `ipa` (KVM's
    /// `kvm_pgtable_stage2_mkyoung()`, for an access-flag fault). Returns
    /// the leaf's level, or `None` if the flag was already set. No TLB
    /// maintenance: an entry with the flag clear is never cached.
    pub fn mark_young(&mut self, ipa: Ipa) -> Result<Option<u8>, TableError> {
        let (entry, level) = self.leaf_entry(ipa)?.ok_or(TableError::NotMapped)?;
        let old = Descriptor::from_raw(entry.load(Ordering::Acquire));
        if old.access_flag() {
            return Ok(None);
        }
        entry.store(old.with_access_flag(true).raw(), Ordering::Release);
        Ok(Some(level))
    }

    /// Removes write permission from every leaf that intersects `range`
    /// (whole blocks, even where the range covers only part of one).
    /// Returns the number of leaves changed.
    pub fn write_protect(&mut self, range: Range<Ipa>, tlb: &mut impl TlbMaintenance) -> Result<u64, TableError> {
        self.check_range(range)?;
        let mut changed = 0;
        let vmid = self.vmid;
        self.visit_leaves(range, &mut |entry, ipa, level| {
            let old = Descriptor::from_raw(entry.load(Ordering::Acquire));
            if old.perms().write() {
                entry.store(old.with_perms(old.perms().without(Perms::W)).raw(), Ordering::Release);
                tlb.invalidate_ipa(vmid, ipa, level);
                changed += 1;
            }
        })?;
        tlb.sync(self.vmid);
        Ok(changed)
    }

    /// Unmaps every leaf inside `range`, handing each emptied table page to
    /// `free` (after the TLB no longer references it).
    ///
    /// Refused, changing nothing, if the range cuts through a block.
    pub fn unmap(
        &mut self,
        range: Range<Ipa>,
        tlb: &mut impl TlbMaintenance,
        free: &mut impl FnMut(Pa),
    ) -> Result<UnmapStats, TableError> {
        self.check_range(range)?;
        // Check pass: no leaf may straddle the range boundary.
        let mut straddle = None;
        self.visit_leaves(range, &mut |_, ipa, level| {
            let size = Geometry::level_size(level);
            let inside = ipa >= range.start() && ipa.raw() + size <= range.end().raw();
            if !inside && straddle.is_none() {
                straddle = Some(ipa);
            }
        })?;
        if let Some(block) = straddle {
            return Err(TableError::PartialBlock { block });
        }
        let mut stats = UnmapStats::default();
        let start_level = self.geometry.start_level();
        let root_entries = ENTRIES_PER_TABLE * self.geometry.root_tables();
        self.unmap_in(self.root, start_level, root_entries, Ipa::new(0), range, tlb, free, &mut stats)?;
        tlb.sync(self.vmid);
        Ok(stats)
    }

    /// Walks `ipa` the way the MMU would.
    pub fn walk(&self, ipa: Ipa) -> Result<Walk, TableError> {
        if !self.geometry.ipa_range_fits(ipa, 1) {
            return Err(TableError::IpaOutOfRange);
        }
        let mut table = self.root;
        let mut level = self.geometry.start_level();
        loop {
            let d = Descriptor::from_raw(self.entry(table, level, ipa)?.load(Ordering::Acquire));
            match d.kind(level) {
                DescriptorKind::Invalid => return Ok(Walk::Unmapped { level }),
                DescriptorKind::Table(next) => table = next,
                DescriptorKind::Leaf(out) => {
                    let offset = ipa.raw() & (Geometry::level_size(level) - 1);
                    return Ok(Walk::Mapped { level, descriptor: d, pa: Pa::new(out.raw() | offset) });
                }
                DescriptorKind::Reserved => return Err(TableError::Corrupt),
            }
            level += 1;
        }
    }

    /// Calls `f(ipa, level, descriptor)` for every valid leaf, in IPA order.
    pub fn for_each_leaf(&self, f: &mut impl FnMut(Ipa, u8, Descriptor)) -> Result<(), TableError> {
        let all = Range::<Ipa>::new(Ipa::new(0), self.geometry.ipa_size()).ok_or(TableError::IpaOutOfRange)?;
        self.visit_leaves(all, &mut |entry, ipa, level| {
            f(ipa, level, Descriptor::from_raw(entry.load(Ordering::Acquire)))
        })
    }

    /// Calls `f(ipa, level, descriptor)` for each leaf overlapping `range`,
    /// in IPA order, until `f` returns false.
    pub fn leaves_in(
        &self,
        range: Range<Ipa>,
        f: &mut impl FnMut(Ipa, u8, Descriptor) -> bool,
    ) -> Result<(), TableError> {
        self.check_range(range)?;
        let root_entries = ENTRIES_PER_TABLE * self.geometry.root_tables();
        self.leaves_under(self.root, self.geometry.start_level(), root_entries, Ipa::new(0), range, f).map(|_| ())
    }

    /// [`Stage2::leaves_in`] below `table`; false once `f` said stop.
    fn leaves_under(
        &self,
        table: Pa,
        level: u8,
        entries: usize,
        base: Ipa,
        range: Range<Ipa>,
        f: &mut impl FnMut(Ipa, u8, Descriptor) -> bool,
    ) -> Result<bool, TableError> {
        for (index, ipa) in indices_in(level, entries, base, range) {
            let d = Descriptor::from_raw(self.entry_at(table, index)?.load(Ordering::Acquire));
            let go_on = match d.kind(level) {
                DescriptorKind::Invalid => true,
                DescriptorKind::Table(next) => self.leaves_under(next, level + 1, ENTRIES_PER_TABLE, ipa, range, f)?,
                DescriptorKind::Leaf(_) => f(ipa, level, d),
                DescriptorKind::Reserved => return Err(TableError::Corrupt),
            };
            if !go_on {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Number of table pages in use below the root.
    pub fn table_pages(&self) -> Result<u64, TableError> {
        let mut n = 0;
        let root_entries = ENTRIES_PER_TABLE * self.geometry.root_tables();
        self.count_tables(self.root, self.geometry.start_level(), root_entries, &mut n)?;
        Ok(n)
    }

    fn count_tables(&self, table: Pa, level: u8, entries: usize, n: &mut u64) -> Result<(), TableError> {
        for index in 0..entries {
            let d = Descriptor::from_raw(self.entry_at(table, index)?.load(Ordering::Acquire));
            if let DescriptorKind::Table(next) = d.kind(level) {
                *n += 1;
                self.count_tables(next, level + 1, ENTRIES_PER_TABLE, n)?;
            }
        }
        Ok(())
    }

    fn check_range(&self, range: Range<Ipa>) -> Result<(), TableError> {
        if !range.start().is_aligned(PAGE_SIZE) || range.len() % PAGE_SIZE != 0 {
            return Err(TableError::Misaligned);
        }
        if !self.geometry.ipa_range_fits(range.start(), range.len()) {
            return Err(TableError::IpaOutOfRange);
        }
        Ok(())
    }

    /// Takes a page from the memcache, zeroes it and links it at `entry`.
    fn link_new_table(&self, entry: &AtomicU64, cache: &mut Memcache) -> Result<Pa, TableError> {
        // The caller checked the worst case; an empty memcache here is a bug
        // in that check, reported rather than panicking.
        let page = cache.pop().ok_or(TableError::MemcacheLow { need: 1, have: 0 })?;
        let Some(table) = self.mem.table(page) else {
            let _ = cache.push(page);
            return Err(TableError::Corrupt);
        };
        zero(table);
        // Release: the zeroed entries are visible before the table is.
        entry.store(Descriptor::table(page).raw(), Ordering::Release);
        Ok(page)
    }

    /// The entry for `ipa` in the table at `level`.
    fn entry(&self, table: Pa, level: u8, ipa: Ipa) -> Result<&AtomicU64, TableError> {
        self.entry_at(table, self.geometry.index(ipa, level))
    }

    /// Entry `index` of the table at `table` (indices past 511 reach into the
    /// following concatenated root pages).
    fn entry_at(&self, table: Pa, index: usize) -> Result<&AtomicU64, TableError> {
        let page = table.checked_add((index / ENTRIES_PER_TABLE) as u64 * PAGE_SIZE).ok_or(TableError::Corrupt)?;
        let t = self.mem.table(page).ok_or(TableError::Corrupt)?;
        Ok(&t[index % ENTRIES_PER_TABLE])
    }

    /// The leaf entry mapping `ipa` and its level, if any.
    fn leaf_entry(&self, ipa: Ipa) -> Result<Option<(&AtomicU64, u8)>, TableError> {
        if !self.geometry.ipa_range_fits(ipa, 1) {
            return Err(TableError::IpaOutOfRange);
        }
        let mut table = self.root;
        let mut level = self.geometry.start_level();
        loop {
            let entry = self.entry(table, level, ipa)?;
            match Descriptor::from_raw(entry.load(Ordering::Acquire)).kind(level) {
                DescriptorKind::Invalid => return Ok(None),
                DescriptorKind::Table(next) => table = next,
                DescriptorKind::Leaf(_) => return Ok(Some((entry, level))),
                DescriptorKind::Reserved => return Err(TableError::Corrupt),
            }
            level += 1;
        }
    }

    /// Calls `f(entry, leaf_ipa, level)` for every valid leaf intersecting `range`.
    fn visit_leaves(&self, range: Range<Ipa>, f: &mut impl FnMut(&AtomicU64, Ipa, u8)) -> Result<(), TableError> {
        let root_entries = ENTRIES_PER_TABLE * self.geometry.root_tables();
        self.visit_in(self.root, self.geometry.start_level(), root_entries, Ipa::new(0), range, f)
    }

    fn visit_in(
        &self,
        table: Pa,
        level: u8,
        entries: usize,
        base: Ipa,
        range: Range<Ipa>,
        f: &mut impl FnMut(&AtomicU64, Ipa, u8),
    ) -> Result<(), TableError> {
        for (index, ipa) in indices_in(level, entries, base, range) {
            let entry = self.entry_at(table, index)?;
            match Descriptor::from_raw(entry.load(Ordering::Acquire)).kind(level) {
                DescriptorKind::Invalid => {}
                DescriptorKind::Table(next) => self.visit_in(next, level + 1, ENTRIES_PER_TABLE, ipa, range, f)?,
                DescriptorKind::Leaf(_) => f(entry, ipa, level),
                DescriptorKind::Reserved => return Err(TableError::Corrupt),
            }
        }
        Ok(())
    }

    /// Unmaps leaves of `range` under `table`; returns true if the table is
    /// empty afterwards.
    #[allow(clippy::too_many_arguments)]
    fn unmap_in(
        &self,
        table: Pa,
        level: u8,
        entries: usize,
        base: Ipa,
        range: Range<Ipa>,
        tlb: &mut impl TlbMaintenance,
        free: &mut impl FnMut(Pa),
        stats: &mut UnmapStats,
    ) -> Result<bool, TableError> {
        let mut span = None;
        let mut kept_child = false;
        for (index, ipa) in indices_in(level, entries, base, range) {
            span = Some((span.map_or(index, |(first, _)| first), index + 1));
            let entry = self.entry_at(table, index)?;
            match Descriptor::from_raw(entry.load(Ordering::Acquire)).kind(level) {
                DescriptorKind::Invalid => {}
                DescriptorKind::Leaf(_) => {
                    entry.store(Descriptor::INVALID.raw(), Ordering::Release);
                    tlb.invalidate_ipa(self.vmid, ipa, level);
                    stats.leaves += 1;
                    stats.bytes += Geometry::level_size(level);
                }
                DescriptorKind::Table(next) => {
                    if self.unmap_in(next, level + 1, ENTRIES_PER_TABLE, ipa, range, tlb, free, stats)? {
                        entry.store(Descriptor::INVALID.raw(), Ordering::Release);
                        tlb.invalidate_ipa(self.vmid, ipa, level);
                        // The walk caches may hold the table until this completes.
                        tlb.sync(self.vmid);
                        free(next);
                        stats.tables_freed += 1;
                    } else {
                        kept_child = true;
                    }
                }
                DescriptorKind::Reserved => return Err(TableError::Corrupt),
            }
        }
        if level == self.geometry.start_level() || kept_child {
            return Ok(false);
        }
        let (first, last) = span.unwrap_or((0, 0));
        let t = self.mem.table(table).ok_or(TableError::Corrupt)?;
        Ok(no_valid_entry_outside(t, first, last))
    }
}

/// True if no entry of `t` outside `[first, last)` is valid. Scans outward
/// from the range, so the common cases (unmapping the first or last of a run
/// of neighbours) stop at the first neighbour.
fn no_valid_entry_outside(t: &[AtomicU64; ENTRIES_PER_TABLE], first: usize, last: usize) -> bool {
    let valid = |i: usize| Descriptor::from_raw(t[i].load(Ordering::Acquire)).is_valid();
    let (mut lo, mut hi) = (first, last);
    while lo > 0 || hi < ENTRIES_PER_TABLE {
        if hi < ENTRIES_PER_TABLE {
            if valid(hi) {
                return false;
            }
            hi += 1;
        }
        if lo > 0 {
            lo -= 1;
            if valid(lo) {
                return false;
            }
        }
    }
    true
}

/// The `(index, first ipa)` of each entry of a table at `level` (covering IPA
/// from `base`, with `entries` entries) that intersects `range`.
fn indices_in(level: u8, entries: usize, base: Ipa, range: Range<Ipa>) -> impl Iterator<Item = (usize, Ipa)> {
    let shift = Geometry::level_shift(level);
    let span = (entries as u64) << shift;
    let lo = range.start().raw().max(base.raw());
    let hi = range.end().raw().min(base.raw().saturating_add(span));
    let (first, last) = if lo < hi {
        (((lo - base.raw()) >> shift) as usize, ((hi - 1 - base.raw()) >> shift) as usize + 1)
    } else {
        (0, 0)
    };
    (first..last).map(move |i| (i, Ipa::new(base.raw() + ((i as u64) << shift))))
}

fn zero(table: &[AtomicU64; ENTRIES_PER_TABLE]) {
    for e in table {
        e.store(0, Ordering::Relaxed);
    }
}
