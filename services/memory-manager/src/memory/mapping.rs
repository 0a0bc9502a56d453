//! A VM's mapping state: what changes with every fault and every
//! invalidation. It is a cache of two truths the daemon does not own: the
//! core's stage-2 tables and page ownership, and the machine's memory.
//!
//! What the core's tables and ownership can rebuild (a restarted daemon
//! reads them back, issue 13):
//! - the installed mappings (IPA, size, output PA, permissions: the leaves);
//! - the pins (one per backing page of every installed leaf);
//! - the invalidation sequence (the core reports it in every fault record
//!   and result);
//! - the table pool's free pages (the pages the core does not own);
//! - resident accounting (the sum of the installed leaves).
//!
//! What the machine's memory can rebuild: the populated bits (a page that
//! holds data; SEEK_DATA or mincore over the region).
//!
//! What lives only here, and dies with the daemon:
//! - the dirty bitmaps (pages written since the last fetch; a write leaves
//!   a writable leaf, but a leaf made writable before the last fetch looks
//!   the same);
//! - the order mappings were installed in (FIFO/LIFO eviction);
//! - the recent invalidations, needed only to settle map results that were
//!   in flight when an invalidation ran (none survive a restart).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hyp_core::addr::{Ipa, Pa, Range, PAGE_SIZE};

use super::bitmap::{DirtyLog, PageBitmap};
use super::handover::{HandedDelta, HandedMapping, HandedRecords};
use super::layout::VmLayout;
use super::memslot::Memslot;
use super::pin::{PinError, PinGuard, Pins};
use super::pool::PagePool;
pub use super::records::Installed;
use super::records::{Record, RecordTable};
use super::region::FillError;

/// Dirty logs in the daemon's memory: one per memslot id, empty for the
/// memslots that do not log.
pub fn private_dirty_logs(layout: &VmLayout) -> Vec<DirtyLog> {
    let slots = layout.memslots.iter().map(|m| m.id).max().map_or(0, |n| n + 1);
    let mut logs: Vec<DirtyLog> = (0..slots).map(|_| DirtyLog::private(0)).collect();
    for m in layout.memslots.iter().filter(|m| m.dirty_log) {
        logs[m.id] = DirtyLog::private(m.pages());
    }
    logs
}

/// Invalidations remembered for late map results.
const INVALIDATION_LOG: usize = 256;

/// An installed mapping as eviction sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resident {
    /// First IPA.
    pub ipa: Ipa,
    /// Bytes.
    pub size: u64,
    /// Install order.
    pub order: u64,
}

impl Resident {
    /// A recorded mapping, as eviction sees it.
    fn of(m: Record) -> Self {
        Self { ipa: m.ipa, size: m.size.bytes(), order: m.order }
    }
}

/// An unmap or write-protect the core executed.
#[derive(Clone, Copy, Debug)]
struct Invalidation {
    start: u64,
    len: u64,
    seq_after: u64,
}

/// A VM's mapping records, held (locked) while handed-over records are
/// adopted: see [`MappingState::hold_records`]. Mappings the core reports
/// installed meanwhile are queued, and recorded when it is let go (dropped,
/// unwinding included).
pub struct HeldRecords<'a> {
    state: &'a MappingState,
    mappings: MutexGuard<'a, RecordTable>,
}

impl HeldRecords<'_> {
    /// Records `all`, each with its install order: in IPA order, no two at
    /// one IPA (checked handed-over records).
    pub fn adopt(&mut self, all: Vec<(Ipa, Installed)>) {
        for (ipa, installed) in all {
            // One not placed is logged by `put`; the rest go on.
            let _ = self.state.put(&mut self.mappings, ipa, installed);
        }
    }

    /// Lets the records go; the next mapping recorded gets `next_order` or
    /// later.
    pub fn release(self, next_order: u64) {
        self.state.installs.fetch_max(next_order, Ordering::Relaxed);
    }
}

impl Drop for HeldRecords<'_> {
    fn drop(&mut self) {
        let mut queued = self.state.queued.lock().unwrap_or_else(|e| e.into_inner());
        self.state.adopting.store(false, Ordering::Release);
        let queued = std::mem::take(&mut *queued);
        self.state.record_locked(&mut self.mappings, queued);
    }
}

/// An unmap sent to the core and not yet reconciled: see
/// [`MappingState::unmap_in_flight`]. Dropped once it is reconciled or
/// given up on.
#[must_use = "an unmap is in flight only while its guard lives"]
pub struct UnmapInFlight<'a> {
    state: &'a MappingState,
}

impl Drop for UnmapInFlight<'_> {
    fn drop(&mut self) {
        self.state.installed().end_unmap();
    }
}

/// What changes in a VM's records after a warm takeover's snapshot
/// ([`MappingState::journal`]), so the old daemon hands over each change,
/// the last one after the drain included, in O(changes) rather than
/// O(mappings). Dropping it stops the journal.
#[derive(Debug)]
#[must_use = "dropping the journal stops it"]
pub struct ChangeJournal<'s> {
    state: &'s MappingState,
}

impl ChangeJournal<'_> {
    /// IPAs changed since the snapshot or the last change: at least the
    /// mappings the next change puts or removes.
    pub fn touched(&self) -> usize {
        let _installed = self.state.installed();
        self.state.journal.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, BTreeMap::len)
    }

    /// What turns the records as of the snapshot or the last change into
    /// the records now (as [`HandedDelta::between`] the two would); the
    /// journal starts again from now.
    pub fn change(&mut self) -> HandedDelta {
        let installed = self.state.installed();
        let touched =
            self.state.journal.lock().unwrap_or_else(|e| e.into_inner()).replace(BTreeMap::new()).unwrap_or_default();
        let mut delta = HandedDelta {
            seq: self.state.sample_seq(),
            next_order: self.state.installs.load(Ordering::Relaxed),
            free: self.state.pool.lock().unwrap_or_else(|e| e.into_inner()).windows().to_vec(),
            ..HandedDelta::default()
        };
        // In IPA order, as the journal is.
        for (ipa, before) in touched {
            match (before, installed.get(ipa).map(|m| installed.handed(&m))) {
                (before, Some(now)) if before != Some(now) => delta.put.push(now),
                (Some(_), None) => delta.removed.push(Ipa::new(ipa)),
                _ => {}
            }
        }
        delta
    }
}

impl Drop for ChangeJournal<'_> {
    fn drop(&mut self) {
        let _installed = self.state.installed();
        self.state.journaling.store(false, Ordering::Relaxed);
        *self.state.journal.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The mapping state of one VM (see the module doc for which of it the
/// core could rebuild).
#[derive(Debug)]
pub struct MappingState {
    /// Pin counts per backing page.
    pins: Arc<Pins>,
    /// Pages that hold data, per guest region.
    populated: Vec<PageBitmap>,
    /// Each memslot's dirty log (by memslot id).
    dirty: Vec<DirtyLog>,
    /// Installed mappings by IPA.
    installed: Mutex<RecordTable>,
    /// Whether the records keep install orders, as last set
    /// ([`Self::keep_install_orders`]): read without their lock.
    keeps_orders: AtomicBool,
    /// Table pages not yet handed to the core.
    pool: Mutex<PagePool>,
    /// Latest invalidation sequence the core reported.
    core_seq: AtomicU64,
    /// Recent invalidations.
    invalidations: Mutex<VecDeque<Invalidation>>,
    /// Bytes of guest memory mapped (recorded mappings).
    resident: AtomicU64,
    /// Mappings recorded so far (the next one's order).
    installs: AtomicU64,
    /// Handed-over records are being adopted ([`HeldRecords`]): mappings
    /// the core reports installed go to `queued`, so a map result never
    /// waits for the adoption.
    adopting: AtomicBool,
    /// Mappings installed while records were adopted, to record after.
    queued: Mutex<Vec<(Ipa, Installed)>>,
    /// While a warm takeover hands the records over ([`ChangeJournal`]):
    /// each IPA whose record changed since the last snapshot or change,
    /// with what it recorded then. Changed only under `installed`'s lock.
    journal: Mutex<Option<BTreeMap<u64, Option<HandedMapping>>>>,
    /// `journal` is on (read under `installed`'s lock, so a record that
    /// changes without a journal entry is never missed).
    journaling: AtomicBool,
}

impl MappingState {
    /// The state of a VM with `layout` that has nothing mapped yet, with
    /// `pool` to hand to its core and dirty logs in the daemon's memory.
    pub fn new(layout: &VmLayout, pool: PagePool) -> Self {
        Self::with_dirty_logs(layout, pool, private_dirty_logs(layout))
    }

    /// [`MappingState::new`] with the given dirty logs, one per memslot id
    /// (those of logging memslots in the machine's memory, to outlive the
    /// daemon).
    pub fn with_dirty_logs(layout: &VmLayout, pool: PagePool, dirty: Vec<DirtyLog>) -> Self {
        let sizes: Vec<(u64, u64)> = layout.regions.iter().map(|r| (r.size, r.page_size)).collect();
        let pins = Pins::new(&sizes);
        Self {
            installed: Mutex::new(RecordTable::new(layout, pins.clone())),
            keeps_orders: AtomicBool::new(true),
            pins,
            populated: layout.regions.iter().map(|r| PageBitmap::new(r.size.div_ceil(PAGE_SIZE))).collect(),
            dirty,
            pool: Mutex::new(pool),
            core_seq: AtomicU64::new(0),
            invalidations: Mutex::new(VecDeque::new()),
            resident: AtomicU64::new(0),
            installs: AtomicU64::new(0),
            adopting: AtomicBool::new(false),
            queued: Mutex::new(Vec::new()),
            journal: Mutex::new(None),
            journaling: AtomicBool::new(false),
        }
    }

    /// Pin counts.
    pub fn pins(&self) -> &Arc<Pins> {
        &self.pins
    }

    /// Pins `[offset, offset + len)` of region `region`.
    pub fn pin(&self, region: usize, offset: u64, len: u64) -> Result<PinGuard, PinError> {
        self.pins.pin(region, offset, len)
    }

    /// True if every page of `[offset, offset + len)` of `region` holds data.
    pub fn is_populated(&self, region: usize, offset: u64, len: u64) -> bool {
        self.populated[region].all_set(offset / PAGE_SIZE, (offset + len).div_ceil(PAGE_SIZE))
    }

    /// Marks pages as holding data; true if any of them was not.
    pub fn mark_populated(&self, region: usize, offset: u64, len: u64) -> bool {
        self.populated[region].set_range(offset / PAGE_SIZE, len.div_ceil(PAGE_SIZE))
    }

    /// Marks pages as not holding data (they are being reclaimed): the next
    /// fault on them fills them again.
    pub fn clear_populated(&self, region: usize, offset: u64, len: u64) {
        self.populated[region].clear_range(offset / PAGE_SIZE, len.div_ceil(PAGE_SIZE))
    }

    /// Faults in every page of every non-device guest region of `layout`
    /// now, as a guest that had touched all its memory would have: each
    /// page is allocated and written (zeros where it had no contents), so
    /// it reads as data to anyone, not as a page only reserved (fallocate
    /// on shmem), whose zeroing the next access would pay.
    pub fn populate_all(&self, layout: &VmLayout) -> Result<(), FillError> {
        for (i, r) in layout.regions.iter().enumerate().filter(|(_, r)| !r.device) {
            r.fill(0, r.size)?;
            r.map.populate(0, r.size)?;
            self.mark_populated(i, 0, r.size);
        }
        Ok(())
    }

    /// Marks the pages of `layout`'s guest regions that hold data already
    /// (a ROM the machine filled, a restored snapshot) populated, so their
    /// first faults skip the fill's look for holes. Pages filled later are
    /// found by the fill as before. A region whose backing cannot tell its
    /// holes (hugetlbfs) is left unseeded: its fills allocate as before.
    pub fn seed_populated(&self, layout: &VmLayout) -> std::io::Result<()> {
        for (i, r) in layout.regions.iter().enumerate().filter(|(_, r)| !r.device) {
            let Some(ranges) = r.data_ranges()? else { continue };
            for (lo, hi) in ranges {
                // A page partly data (a file not a page multiple) is not
                // whole: only whole pages are marked.
                let (lo, hi) = (lo.next_multiple_of(PAGE_SIZE), hi / PAGE_SIZE * PAGE_SIZE);
                if lo < hi {
                    self.mark_populated(i, lo, hi - lo);
                }
            }
        }
        Ok(())
    }

    /// `slot`'s dirty log.
    pub fn dirty_log(&self, slot: &Memslot) -> &DirtyLog {
        &self.dirty[slot.id]
    }

    /// Marks the page of `slot` holding `ipa` dirty.
    pub fn mark_dirty(&self, slot: &Memslot, ipa: Ipa) {
        self.dirty[slot.id].mark(slot.page_of(ipa));
    }

    /// Puts `pool` in place of the table pool; returns the old one.
    pub fn replace_pool(&self, pool: PagePool) -> PagePool {
        std::mem::replace(&mut *self.pool.lock().unwrap_or_else(|e| e.into_inner()), pool)
    }

    /// Takes up to `pages` contiguous table pages to hand to the core.
    pub fn take_table_pages(&self, pages: u64) -> Option<(Pa, u64)> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).take(pages)
    }

    /// Bytes of guest memory mapped now.
    pub fn resident(&self) -> u64 {
        self.resident.load(Ordering::Acquire)
    }

    /// The invalidation sequence to stamp on a map command now.
    pub fn sample_seq(&self) -> u64 {
        self.core_seq.load(Ordering::Acquire)
    }

    /// Notes a sequence the core reported (fault records and results).
    pub fn note_seq(&self, seq: u64) {
        self.core_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// Keeps the install order of each mapping from now on, or stops (the
    /// orders kept go): FIFO and LIFO eviction need it, nothing else does
    /// ([`RecordTable::keep_orders`]). Kept from the start. A change waits
    /// for the records' lock only if it is free (not while an adoption
    /// holds them): the caller asks again at its next mapping.
    pub fn keep_install_orders(&self, keep: bool) {
        if self.keeps_orders.load(Ordering::Relaxed) == keep {
            return;
        }
        if let Ok(mut records) = self.installed.try_lock() {
            records.keep_orders(keep);
            self.keeps_orders.store(keep, Ordering::Relaxed);
        }
    }

    fn installed(&self) -> MutexGuard<'_, RecordTable> {
        self.installed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True if a recorded mapping smaller than `len` starts inside
    /// `[start, start + len)`: a block there would overlap its table (the
    /// core refuses that; KVM would tear the table down).
    pub fn has_smaller_mapping(&self, start: Ipa, len: u64) -> bool {
        self.installed().range(start.raw()..start.raw() + len).any(|m| m.size.bytes() < len)
    }

    /// True if a recorded mapping covers `ipa`.
    pub fn is_mapped(&self, ipa: Ipa) -> bool {
        self.installed().last_before(ipa.raw() + 1).is_some_and(|m| ipa.raw() < m.end())
    }

    /// Mappings recorded.
    pub fn mapping_count(&self) -> usize {
        self.installed().len()
    }

    /// Every recorded mapping, in IPA order.
    pub fn residents(&self) -> Vec<Resident> {
        self.installed().iter().map(Resident::of).collect()
    }

    /// The recorded mappings that start inside `range`, in IPA order.
    pub fn residents_in(&self, range: Range<Ipa>) -> Vec<Resident> {
        self.installed().range(range.start().raw()..range.end().raw()).map(Resident::of).collect()
    }

    /// Records a mapping the core installed. Returns false, releasing its
    /// pin, if an invalidation the core executed after installing it has
    /// already been reconciled (the result of the map arrived late): the
    /// mapping is gone from the tables. Also false, its pin kept and the
    /// error logged, for a mapping the memslots do not place at its PA with
    /// its pin, which neither a fault nor a checked rebuild makes.
    pub fn record_installed(&self, ipa: Ipa, installed: Installed) -> bool {
        self.record_all([(ipa, installed)]) == 1
    }

    /// Takes `all` (in IPA order, no two at one IPA: a core's leaves) as the
    /// mappings of a VM that has none recorded yet, in install order as
    /// listed; returns how many were recorded. With mappings already
    /// recorded, it records them as [`Self::record_all`] does.
    pub fn adopt(&self, all: Vec<(Ipa, Installed)>) -> usize {
        let mut mappings = self.installed();
        if !mappings.is_empty() {
            drop(mappings);
            return self.record_all(all);
        }
        let first = self.installs.fetch_add(all.len() as u64, Ordering::Relaxed);
        let mut recorded = 0;
        for (i, (ipa, m)) in all.into_iter().enumerate() {
            recorded += usize::from(self.put(&mut mappings, ipa, Installed { order: first + i as u64, ..m }).is_ok());
        }
        recorded
    }

    /// Holds the records of a VM that has none yet until handed-over ones
    /// are adopted ([`HeldRecords::release`]); whatever reads them meanwhile
    /// (a block-size decision, fault-around, eviction, the API) waits, while
    /// faults that need none of them are served, and the mappings their
    /// results report are queued ([`Self::record_all`]).
    pub fn hold_records(&self) -> HeldRecords<'_> {
        let mappings = self.installed();
        self.adopting.store(true, Ordering::Release);
        HeldRecords { state: self, mappings }
    }

    /// What a takeover hands to the next daemon: every recorded mapping,
    /// the pool's free pages and the sequence (the VM drained: no map
    /// result is in flight).
    pub fn handed_records(&self) -> HandedRecords {
        self.records_of(&self.installed())
    }

    /// [`Self::handed_records`] of `installed`, the records, locked.
    fn records_of(&self, installed: &RecordTable) -> HandedRecords {
        HandedRecords {
            seq: self.sample_seq(),
            next_order: self.installs.load(Ordering::Relaxed),
            mappings: installed.iter().map(|m| installed.handed(&m)).collect(),
            free: self.pool.lock().unwrap_or_else(|e| e.into_inner()).windows().to_vec(),
        }
    }

    /// A warm takeover's snapshot of the records ([`Self::handed_records`]),
    /// and the journal of what changes after it, taken at one instant.
    pub fn journal(&self) -> (HandedRecords, ChangeJournal<'_>) {
        let installed = self.installed();
        let snapshot = self.records_of(&installed);
        *self.journal.lock().unwrap_or_else(|e| e.into_inner()) = Some(BTreeMap::new());
        self.journaling.store(true, Ordering::Relaxed);
        (snapshot, ChangeJournal { state: self })
    }

    /// Notes in the journal, if on, that the record at `ipa` changes from
    /// `before` (`installed`'s lock held). The first note since the last
    /// mark keeps what the IPA recorded then.
    fn journal_change(&self, ipa: u64, before: impl FnOnce() -> Option<HandedMapping>) {
        if self.journaling.load(Ordering::Relaxed) {
            if let Some(journal) = self.journal.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                journal.entry(ipa).or_insert_with(before);
            }
        }
    }

    /// Records mappings the core installed, as [`Self::record_installed`]
    /// does one by one, under one lock; returns how many were recorded.
    /// While handed-over records are adopted they are queued instead, and
    /// all count: the invalidation check runs when the adoption ends.
    pub fn record_all(&self, all: impl IntoIterator<Item = (Ipa, Installed)>) -> usize {
        if self.adopting.load(Ordering::Acquire) {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            // Still adopting under the queue's lock: the adoption's end
            // records the queue after taking it.
            if self.adopting.load(Ordering::Acquire) {
                let before = queued.len();
                queued.extend(all);
                return queued.len() - before;
            }
        }
        let mut mappings = self.installed();
        self.record_locked(&mut mappings, all)
    }

    /// [`Self::record_all`] into `mappings`, the records, locked.
    fn record_locked(&self, mappings: &mut RecordTable, all: impl IntoIterator<Item = (Ipa, Installed)>) -> usize {
        let invalidations = self.invalidations.lock().unwrap_or_else(|e| e.into_inner());
        let mut recorded = 0;
        for (ipa, mut installed) in all {
            let end = ipa.raw() + installed.size.bytes();
            let removed = invalidations
                .iter()
                .any(|i| i.seq_after > installed.seq && ipa.raw() < i.start + i.len && i.start < end);
            if removed {
                continue;
            }
            installed.order = self.installs.fetch_add(1, Ordering::Relaxed);
            recorded += usize::from(self.put(mappings, ipa, installed).is_ok());
        }
        recorded
    }

    /// Puts a mapping in `mappings` (the records, locked), replacing one at
    /// the same IPA (returned), and keeps resident bytes in step. A mapping
    /// its memslot does not place at its PA with its pin (never made by a
    /// fault or a checked rebuild) is not recorded, and its pages stay
    /// pinned for good: the core maps them.
    fn put(&self, mappings: &mut RecordTable, ipa: Ipa, installed: Installed) -> Result<Option<Record>, Ipa> {
        // What the journal keeps, if on (it changes only under this lock).
        let journaling = self.journaling.load(Ordering::Relaxed);
        let before = journaling.then(|| mappings.get(ipa.raw()).map(|m| mappings.handed(&m))).flatten();
        let bytes = installed.size.bytes();
        match mappings.insert(ipa, installed) {
            Ok(old) => {
                self.journal_change(ipa.raw(), || before);
                self.resident.fetch_add(bytes, Ordering::AcqRel);
                if let Some((old, _)) = &old {
                    self.resident.fetch_sub(old.size.bytes(), Ordering::AcqRel);
                }
                Ok(old.map(|(old, _)| old))
            }
            Err(unplaced) => {
                tracing::error!(%ipa, bytes, pa = %unplaced.pa, "not recording a mapping its memslot does not place so; its pages stay pinned");
                std::mem::forget(unplaced.pin);
                Err(ipa)
            }
        }
    }

    /// Notes an unmap about to be sent to the core, until the guard goes:
    /// it is dropped once the unmap is reconciled ([`Self::forget_range`])
    /// or given up on. Meanwhile the mappings recorded keep their
    /// invalidation sequence ([`RecordTable::begin_unmap`]).
    pub fn unmap_in_flight(&self) -> UnmapInFlight<'_> {
        self.installed().begin_unmap();
        UnmapInFlight { state: self }
    }

    /// Reconciles an unmap the core executed over `[start, start + len)`,
    /// leaving its sequence at `seq_after`, sent under `_unmap`: mappings
    /// installed before it are forgotten and their pins released. Returns
    /// the pages released.
    pub fn forget_range(&self, _unmap: &UnmapInFlight<'_>, start: Ipa, len: u64, seq_after: u64) -> u64 {
        self.note_seq(seq_after);
        let mut mappings = self.installed();
        {
            let mut log = self.invalidations.lock().unwrap_or_else(|e| e.into_inner());
            if log.len() == INVALIDATION_LOG {
                log.pop_front();
            }
            log.push_back(Invalidation { start: start.raw(), len, seq_after });
        }
        let end = start.raw() + len;
        // Mappings never overlap: of those that start before `start`, only
        // the last can reach into the range. The rest start inside it.
        let first = mappings.last_before(start.raw()).map_or(start.raw(), |m| m.ipa.raw());
        let doomed: Vec<Record> =
            mappings.range(first..end).filter(|m| m.end() > start.raw() && m.installed_before(seq_after)).collect();
        let mut pages = 0;
        for m in doomed {
            self.journal_change(m.ipa.raw(), || Some(mappings.handed(&m)));
            if let Some((removed, released)) = mappings.remove(m.ipa.raw()) {
                self.resident.fetch_sub(removed.size.bytes(), Ordering::AcqRel);
                pages += released as u64;
            }
        }
        pages
    }

    /// Amends records adopted from a warm takeover's snapshot with its
    /// delta: the mappings at `removed` go (their pins released) and each
    /// of `put` goes in, replacing one at its IPA; the next mapping
    /// recorded gets `next_order` or later. Returns the IPA and bytes of
    /// each mapping that went (removed or replaced), or the IPA of the first
    /// change that does not fit: a removal of what is not recorded, or a
    /// mapping that would overlap another. What was done before an error
    /// stays: the caller lets every record go.
    pub fn amend(&self, removed: &[Ipa], put: Vec<(Ipa, Installed)>, next_order: u64) -> Result<Vec<(Ipa, u64)>, Ipa> {
        let mut mappings = self.installed();
        let mut gone = Vec::with_capacity(removed.len());
        for &ipa in removed {
            let (old, _) = mappings.remove(ipa.raw()).ok_or(ipa)?;
            self.resident.fetch_sub(old.size.bytes(), Ordering::AcqRel);
            gone.push((ipa, old.size.bytes()));
        }
        for (ipa, installed) in put {
            let (start, end) = (ipa.raw(), ipa.raw() + installed.size.bytes());
            let below = mappings.last_before(start).is_some_and(|m| m.end() > start);
            let above = mappings.range(start + 1..end).next().is_some();
            if below || above {
                return Err(ipa);
            }
            if let Some(old) = self.put(&mut mappings, ipa, installed)? {
                gone.push((ipa, old.size.bytes()));
            }
        }
        self.installs.fetch_max(next_order, Ordering::Relaxed);
        Ok(gone)
    }

    /// Drops every mapping record (the VM is going away); returns the pages
    /// whose pins were released.
    pub fn release_all(&self) -> u64 {
        let pages = self.installed().clear();
        self.resident.store(0, Ordering::Release);
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memslot::SlotFlags;
    use hyp_core::ownership::VmId;
    use hyp_core::stage2::MapSize;

    fn state(page_size: u64) -> (VmLayout, MappingState) {
        let logged = SlotFlags { read_only: false, dirty_log: true };
        let slots = [(0x4000_0000, 4 << 20, 0, SlotFlags::default()), (0x8000_0000, 4 << 20, 4 << 20, logged)];
        let layout =
            VmLayout::single_region(VmId::new(1).unwrap(), Pa::new(0x4000_0000), 8 << 20, page_size, &slots).unwrap();
        let mapping = MappingState::new(&layout, PagePool::default());
        (layout, mapping)
    }

    #[test]
    fn population_is_per_4k_on_huge_backing_pages() {
        let (_, m) = state(2 << 20);
        assert!(!m.is_populated(0, 0, 8 << 20));
        assert!(m.mark_populated(0, 4096 * 63, 4096 * 3));
        assert!(m.is_populated(0, 4096 * 63, 4096 * 3));
        assert!(!m.is_populated(0, 4096 * 62, 4096 * 2));
        assert!(!m.mark_populated(0, 4096 * 64, 4096));
        m.clear_populated(0, 4096 * 64, 4096);
        assert!(!m.is_populated(0, 4096 * 63, 4096 * 3));
    }

    #[test]
    fn pages_holding_data_at_attach_are_seeded_populated_and_holes_are_not() {
        use std::os::unix::fs::FileExt;
        let (layout, m) = state(4096);
        let file = layout.regions[0].memfd.as_file();
        file.write_all_at(&[1; 4096], 3 * 4096).unwrap();
        file.write_all_at(&[2; 3 * 4096], 100 * 4096).unwrap();
        m.seed_populated(&layout).unwrap();
        let populated: Vec<u64> = (0..2048).filter(|&p| m.is_populated(0, p * 4096, 4096)).collect();
        assert_eq!(populated, [3, 100, 101, 102]);
    }

    #[test]
    fn a_populated_guest_holds_data_in_every_page_and_keeps_what_it_had() {
        use std::os::unix::fs::FileExt;
        let (layout, m) = state(4096);
        let region = &layout.regions[0];
        region.memfd.as_file().write_all_at(&[9; 4096], 5 * 4096).unwrap();
        m.populate_all(&layout).unwrap();
        // Written, not only reserved: a reader of the backing (the machine,
        // a re-attach's seeding) sees data everywhere, and the bits agree.
        assert_eq!(region.data_ranges().unwrap(), Some(vec![(0, region.size)]));
        assert!(m.is_populated(0, 0, region.size));
        let mut page = [0u8; 4096];
        region.memfd.as_file().read_exact_at(&mut page, 5 * 4096).unwrap();
        assert_eq!(page, [9; 4096]);
        region.memfd.as_file().read_exact_at(&mut page, 6 * 4096).unwrap();
        assert_eq!(page, [0; 4096]);
    }

    #[test]
    fn each_memslot_has_its_own_dirty_log() {
        let (layout, m) = state(4096);
        let second = layout.memslots.by_id(1).unwrap();
        m.mark_dirty(second, Ipa::new(0x8000_3000));
        assert_eq!(m.dirty_log(second).peek()[0], 1 << 3);
        assert_eq!(m.dirty_log(layout.memslots.by_id(0).unwrap()).count(), 0);
    }

    #[test]
    fn an_invalidation_forgets_exactly_the_mappings_it_reaches() {
        let (_, m) = state(4096);
        let record = |ipa: u64, size: MapSize| {
            let pin = m.pin(0, ipa - 0x4000_0000, size.bytes()).unwrap().into_mapping();
            assert!(m.record_installed(Ipa::new(ipa), Installed::new(size, Pa::new(ipa), 0, pin)));
        };
        for page in [0, 1, 3] {
            record(0x4000_0000 + page * 4096, MapSize::Page4K);
        }
        record(0x4020_0000, MapSize::Block2M);
        let unmap = m.unmap_in_flight();
        // The page between two others.
        assert_eq!(m.forget_range(&unmap, Ipa::new(0x4000_1000), 4096, 1), 1);
        assert!(m.is_mapped(Ipa::new(0x4000_0000)) && m.is_mapped(Ipa::new(0x4000_3000)));
        // A range inside a block, which starts before it: the block goes.
        assert_eq!(m.forget_range(&unmap, Ipa::new(0x4030_0000), 4096, 2), 512);
        assert!(!m.is_mapped(Ipa::new(0x4020_0000)) && m.is_mapped(Ipa::new(0x4000_3000)));
        // Nothing there.
        assert_eq!(m.forget_range(&unmap, Ipa::new(0x4000_2000), 4096, 3), 0);
        assert_eq!((m.mapping_count(), m.resident()), (2, 8192));
    }

    #[test]
    fn a_mapping_installed_after_an_unmap_ran_and_recorded_before_it_is_reconciled_stays() {
        let (_, m) = state(4096);
        let record = |page: u64, seq: u64| {
            let ipa = 0x4000_0000 + page * 4096;
            let pin = m.pin(0, page * 4096, 4096).unwrap().into_mapping();
            assert!(m.record_installed(Ipa::new(ipa), Installed::new(MapSize::Page4K, Pa::new(ipa), seq, pin)));
        };
        // Pages 0 and 1 mapped at sequence 0, with no unmap in flight.
        record(0, 0);
        record(1, 0);
        // An unmap of pages 0-3 is sent; the core runs it (sequence 1) and
        // then installs page 1 again and page 2, whose results are recorded
        // before the unmap's is reconciled.
        let unmap = m.unmap_in_flight();
        record(1, 1);
        record(2, 1);
        assert_eq!(m.installed().sequences_kept(), 2);
        // The reconcile forgets page 0 only: 1 and 2 came after it.
        assert_eq!(m.forget_range(&unmap, Ipa::new(0x4000_0000), 4 * 4096, 1), 1);
        let mapped: Vec<u64> = m.residents().iter().map(|r| (r.ipa.raw() - 0x4000_0000) / 4096).collect();
        assert_eq!(mapped, [1, 2]);
        // With no unmap left in flight, no sequence is kept, and the next
        // unmap (sent after now, so run after every mapping recorded)
        // forgets them.
        drop(unmap);
        assert_eq!(m.installed().sequences_kept(), 0);
        let unmap = m.unmap_in_flight();
        assert_eq!(m.forget_range(&unmap, Ipa::new(0x4000_0000), 4 * 4096, 2), 2);
        assert_eq!((m.mapping_count(), m.pins().total()), (0, 0));
    }

    #[test]
    fn a_journal_hands_over_exactly_what_changed_since_the_last_mark() {
        let (_, m) = state(4096);
        let mut seq = 0;
        let record = |page: u64, seq: u64| {
            let pin = m.pin(0, page * 4096, 4096).unwrap().into_mapping();
            let ipa = 0x4000_0000 + page * 4096;
            m.record_installed(Ipa::new(ipa), Installed::new(MapSize::Page4K, Pa::new(ipa), seq, pin));
        };
        for page in 0..32 {
            record(page, seq);
        }
        let (mut last, mut journal) = m.journal();
        assert_eq!(last, m.handed_records());
        // Rounds of installs (new pages, and pages recorded again) and
        // unmaps (some of pages installed since the mark), each checked
        // against the whole records compared.
        let mut rng = crate::memory::test_rng::XorShift::new(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: u64| rng.below(n);
        for round in 0..20 {
            for _ in 0..next(40) {
                if next(3) == 0 {
                    seq += 1;
                    let unmap = m.unmap_in_flight();
                    m.forget_range(&unmap, Ipa::new(0x4000_0000 + next(64) * 4096), (1 + next(4)) * 4096, seq);
                } else {
                    record(next(64), seq);
                }
            }
            let touched = journal.touched();
            let change = journal.change();
            let now = m.handed_records();
            assert_eq!(change, HandedDelta::between(&last, &now), "round {round}");
            assert!(touched >= change.changes(), "round {round}: {touched} touched");
            last = now;
        }
        assert_eq!(journal.change().changes(), 0, "nothing changed since");
        drop(journal);
        record(63, seq);
        assert!(m.journal.lock().unwrap().is_none(), "stopped with its journal");
    }

    #[test]
    fn a_mapping_its_memslot_does_not_place_so_is_not_recorded_and_keeps_its_pin() {
        let (_, m) = state(4096);
        let pin = m.pin(0, 0, 4096).unwrap().into_mapping();
        // The page at 0x4000_0000 is at PA 0x4000_0000, not one page on.
        let wrong = Installed::new(MapSize::Page4K, Pa::new(0x4000_1000), 0, pin);
        assert!(!m.record_installed(Ipa::new(0x4000_0000), wrong));
        assert_eq!((m.mapping_count(), m.resident()), (0, 0));
        assert_eq!(m.pins().count(0, 0), 1, "the core may map it: its page stays pinned");
    }

    #[test]
    fn a_late_result_after_an_invalidation_is_not_recorded() {
        let (_, m) = state(4096);
        let pin = |off| m.pin(0, off, 4096).unwrap().into_mapping();
        assert!(
            m.record_installed(Ipa::new(0x4000_0000), Installed::new(MapSize::Page4K, Pa::new(0x4000_0000), 0, pin(0)))
        );
        assert_eq!((m.resident(), m.mapping_count()), (4096, 1));
        // Unmapped at sequence 1: the mapping and its pin go.
        assert_eq!(m.forget_range(&m.unmap_in_flight(), Ipa::new(0x4000_0000), 8192, 1), 1);
        assert_eq!((m.resident(), m.pins().total(), m.sample_seq()), (0, 0, 1));
        // A map installed at sequence 0 whose result arrives now is gone from the tables.
        let late = Installed::new(MapSize::Page4K, Pa::new(0x4000_1000), 0, pin(4096));
        assert!(!m.record_installed(Ipa::new(0x4000_1000), late));
        assert_eq!(m.pins().total(), 0);
        assert!(!m.is_mapped(Ipa::new(0x4000_1000)));
    }

    #[test]
    fn a_map_result_during_an_adoption_is_queued_not_waited_for() {
        let (_, m) = state(4096);
        let installed = |off: u64, seq| {
            Installed::new(
                MapSize::Page4K,
                Pa::new(0x4000_0000 + off),
                seq,
                m.pin(0, off, 4096).unwrap().into_mapping(),
            )
        };
        let mut held = m.hold_records();
        held.adopt(vec![(Ipa::new(0x4000_0000), Installed { order: 3, ..installed(0, 0) })]);
        // A service thread records a result while the adoption runs: it
        // does not wait (this thread holds the records), it is queued.
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (result, m) = (installed(0x5000, 0), &m);
            s.spawn(move || tx.send(m.record_installed(Ipa::new(0x4000_5000), result)).unwrap());
            let recorded = rx.recv_timeout(std::time::Duration::from_secs(10));
            // Let a blocked thread go: a regression fails, it does not hang.
            held.release(10);
            assert_eq!(recorded, Ok(true), "the result waited for the adoption");
        });
        assert_eq!((m.mapping_count(), m.resident()), (2, 8192));
        let orders: Vec<(u64, u64)> = m.residents().iter().map(|r| (r.ipa.raw(), r.order)).collect();
        assert_eq!(orders, [(0x4000_0000, 3), (0x4000_5000, 10)], "queued ones come after the handed ones");
        // An adoption that unwinds lets the records go and records the queue.
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = m.hold_records();
            assert!(m.record_installed(Ipa::new(0x4000_6000), installed(0x6000, 0)));
            panic!("adoption failed");
        }));
        assert!(unwound.is_err());
        assert!(m.is_mapped(Ipa::new(0x4000_6000)));
        assert!(m.record_installed(Ipa::new(0x4000_7000), installed(0x7000, 0)), "no adoption: recorded at once");
        assert_eq!(m.mapping_count(), 4);
    }

    #[test]
    fn adopted_records_are_recorded_in_order_or_merged_into_ones_already_there() {
        let (_, m) = state(4096);
        let installed = |off: u64, order| Installed {
            order,
            ..Installed::new(
                MapSize::Page4K,
                Pa::new(0x4000_0000 + off),
                0,
                m.pin(0, off, 4096).unwrap().into_mapping(),
            )
        };
        let mut held = m.hold_records();
        held.adopt(vec![(Ipa::new(0x4000_1000), installed(0x1000, 5)), (Ipa::new(0x4000_3000), installed(0x3000, 2))]);
        // Records there already: merged, one at the same IPA replaced.
        held.adopt(vec![(Ipa::new(0x4000_0000), installed(0, 7)), (Ipa::new(0x4000_3000), installed(0x3000, 8))]);
        held.release(9);
        let orders: Vec<(u64, u64)> = m.residents().iter().map(|r| (r.ipa.raw(), r.order)).collect();
        assert_eq!(orders, [(0x4000_0000, 7), (0x4000_1000, 5), (0x4000_3000, 8)]);
        assert_eq!((m.resident(), m.pins().total()), (3 * 4096, 3), "the replaced one's pin let go");
    }
}
