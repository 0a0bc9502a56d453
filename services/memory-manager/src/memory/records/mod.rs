//! A VM's installed-mapping records, kept compact: a guest with every
//! 4 KiB page of 1 TiB mapped has 268 million of them, and KVM keeps
//! nothing per mapping beyond its stage-2 leaf.
//!
//! A record keeps only what nothing else tells: where the mapping starts
//! and its size, and while FIFO or LIFO eviction reads it, its install
//! order ([`RecordTable::keep_orders`]). Its output PA and the backing
//! pages its pin holds follow from its IPA through the VM's memslots, the
//! way a fault and a rebuild place a mapping: the table checks that each
//! mapping it takes is placed so, keeps its pin as counts taken (no
//! guard), and makes a guard of them again when the record goes, so the
//! pin is released exactly once.
//!
//! Records are grouped by the 2 MiB block of IPA they start in, each block
//! a vector sorted by IPA ([`block`]): 2 bytes a 4 KiB mapping in a full
//! block, 6 with its order, where a B-tree of whole records (PA and pin
//! guard included) took about 150. The install order is a 64-bit count
//! kept in 32 bits, as an offset from a base for the table
//! ([`OrderBase`]).
//!
//! The core's invalidation sequence at install is kept only while it can
//! matter: an unmap the core ran before it installed a mapping may be
//! reconciled after the mapping is recorded, and must not forget it.
//! Unmaps are bracketed ([`RecordTable::begin_unmap`]); a mapping recorded
//! while none is in flight, or kept past the last one that was, was
//! installed before any unmap sent from then on runs, and its sequence is
//! not kept.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use hyp_core::addr::{Ipa, Pa, PAGE_SIZE};
use hyp_core::stage2::MapSize;

use super::handover::HandedMapping;
use super::layout::{Backing, VmLayout};
use super::memslot::Memslots;
use super::pin::{MappingPin, PinSpan, Pins};

mod block;

use block::{Block, Place};

/// log2 of the IPA span of one block of records (2 MiB).
const BLOCK_SHIFT: u32 = 21;
/// log2 of the page a record's place in its block counts in.
const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();

/// A mapping the core confirmed, with the pin that keeps its pages: what
/// the table takes.
#[derive(Debug)]
pub struct Installed {
    /// Mapping size.
    pub size: MapSize,
    /// Output PA.
    pub pa: Pa,
    /// The core's invalidation sequence when it was installed.
    pub seq: u64,
    /// The pages' pin.
    pub pin: MappingPin,
    /// Install order within the VM, set when it is recorded (FIFO/LIFO
    /// eviction).
    pub order: u64,
}

impl Installed {
    /// A mapping the core reports installed, to record.
    pub fn new(size: MapSize, pa: Pa, seq: u64, pin: MappingPin) -> Self {
        Self { size, pa, seq, pin, order: 0 }
    }
}

/// A recorded mapping, as the table reads it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// First IPA.
    pub ipa: Ipa,
    /// Mapping size.
    pub size: MapSize,
    /// The core's invalidation sequence when it was installed, kept while
    /// an unmap sent before it was recorded is still to be reconciled;
    /// `None` once none is (every unmap still to come runs after it).
    pub seq: Option<u64>,
    /// Install order (0 while orders are not kept).
    pub order: u64,
}

impl Record {
    /// One past the last byte of IPA it maps.
    pub fn end(&self) -> u64 {
        self.ipa.raw() + self.size.bytes()
    }

    /// True if the core installed it before the invalidation that left
    /// the sequence at `seq_after` (which is still to be reconciled).
    pub fn installed_before(&self, seq_after: u64) -> bool {
        self.seq.is_none_or(|seq| seq < seq_after)
    }
}

// Pages in a block: a place's page holds them.
const _: () = assert!(1 << (BLOCK_SHIFT - PAGE_SHIFT) <= Place::PAGES);

/// How far below a value the base is put: values that come that much out
/// of order still fit, and a base moved up leaves room for that many more.
const HEADROOM: u64 = 1 << 31;

/// The base a table's kept orders count from.
///
/// The base starts [`HEADROOM`] below the first order. An order more than
/// 32 bits above the base moves it up to [`HEADROOM`] below that order,
/// and a record whose order is then below the base reads as the base. An
/// order below the base reads as the base too. Either way an order reads
/// newer than it is, never older, and only when it is 2^31 or more below
/// the newest recorded: orders that far apart only tie in FIFO/LIFO
/// eviction.
#[derive(Clone, Copy, Debug, Default)]
struct OrderBase(u64);

impl OrderBase {
    /// `order` counted from the base, in 32 bits: one below it as the base,
    /// one too far above it as the highest.
    fn offset(self, order: u64) -> u32 {
        order.saturating_sub(self.0).min(u64::from(u32::MAX)) as u32
    }

    /// The order an offset stands for.
    fn order(self, offset: u32) -> u64 {
        self.0 + u64::from(offset)
    }
}

/// A VM's installed mappings by IPA.
#[derive(Debug)]
pub struct RecordTable {
    /// Records by block index (IPA >> 21), none empty.
    blocks: BTreeMap<u64, Block>,
    len: usize,
    /// Whether install orders are kept ([`Self::keep_orders`]).
    keep_orders: bool,
    /// What every kept order counts from.
    base: OrderBase,
    /// Unmaps sent and not yet reconciled ([`Self::begin_unmap`]).
    unmaps_in_flight: usize,
    /// The invalidation sequence of each mapping recorded while an unmap
    /// was in flight, by IPA; empty when none is.
    young: BTreeMap<u64, u64>,
    /// The VM's memslots.
    memslots: Memslots,
    /// Each guest region's PA and bytes.
    regions: Vec<(Pa, u64)>,
    pins: Arc<Pins>,
}

impl RecordTable {
    /// No records, for a VM with `layout` whose pins are `pins`.
    pub fn new(layout: &VmLayout, pins: Arc<Pins>) -> Self {
        let regions = layout.regions.iter().map(|r| (r.pa_base, r.size)).collect();
        Self {
            blocks: BTreeMap::new(),
            len: 0,
            keep_orders: true,
            base: OrderBase::default(),
            unmaps_in_flight: 0,
            young: BTreeMap::new(),
            memslots: layout.memslots.clone(),
            regions,
            pins,
        }
    }

    /// Records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region, offset and PA of `ipa`, as its memslot places it
    /// ([`VmLayout::backing`]).
    fn placed(&self, ipa: u64) -> Option<Backing> {
        let ipa = Ipa::new(ipa);
        let slot = self.memslots.lookup(ipa)?;
        let &(region_pa, region_size) = self.regions.get(slot.region)?;
        Backing::of(slot, ipa, region_pa, region_size)
    }

    /// The pin a mapping of `size` at `ipa` holds, as placed.
    fn span(&self, ipa: u64, size: MapSize) -> Option<(Backing, PinSpan)> {
        let placed = self.placed(ipa)?;
        Some((placed, self.pins.span(placed.region, placed.offset, size.bytes()).ok()?))
    }

    /// Records `m` at `ipa`, replacing the record there (returned, its pin
    /// released, with the pages it held). A mapping its memslot does not
    /// place at its PA with that pin, or that is not aligned to its size, is
    /// given back unrecorded.
    pub fn insert(&mut self, ipa: Ipa, m: Installed) -> Result<Option<(Record, usize)>, Installed> {
        let placed = ipa.is_aligned(m.size.bytes()).then(|| self.span(ipa.raw(), m.size)).flatten();
        if !placed.is_some_and(|(at, span)| at.pa == m.pa && span == m.pin.span()) {
            return Err(m);
        }
        let Installed { size, seq, order, pin, .. } = m;
        // Held by the table from here: taken back when the record goes.
        let _ = pin.into_span();
        // No sequence is kept while no unmap is in flight (none is then).
        let old_seq = if self.unmaps_in_flight > 0 { self.young.insert(ipa.raw(), seq) } else { None };
        let (block, page) = Self::place_in_block(ipa.raw());
        let place = Place::new(page, size);
        let order = self.keep_orders.then(|| self.offset(order));
        // Past the last record (a rebuild's leaves, in IPA order): appended.
        if let Some(mut last) = self.blocks.last_entry().filter(|l| *l.key() == block) {
            let at_end = last.get().len();
            if last.get().last().is_some_and(|p| p.page() < page) {
                last.get_mut().insert(at_end, place, order);
                self.len += 1;
                return Ok(None);
            }
        }
        let records = self.blocks.entry(block).or_insert_with(Block::new);
        match records.find(page) {
            Ok(i) => {
                let old = records.replace(i, place, order);
                Ok(Some(self.release(block, old, old_seq)))
            }
            Err(i) => {
                records.insert(i, place, order);
                self.len += 1;
                Ok(None)
            }
        }
    }

    /// Removes the record at `ipa`: it and the pages its pin held (now
    /// released).
    pub fn remove(&mut self, ipa: u64) -> Option<(Record, usize)> {
        if ipa % PAGE_SIZE != 0 {
            return None;
        }
        let (block, page) = Self::place_in_block(ipa);
        let records = self.blocks.get_mut(&block)?;
        let i = records.find(page).ok()?;
        let record = records.remove(i);
        if records.is_empty() {
            self.blocks.remove(&block);
        }
        self.len -= 1;
        let seq = self.young.remove(&ipa);
        Some(self.release(block, record, seq))
    }

    /// The record at `ipa`.
    pub fn get(&self, ipa: u64) -> Option<Record> {
        let (block, page) = Self::place_in_block(ipa);
        let records = self.blocks.get(&block).filter(|_| ipa % PAGE_SIZE == 0)?;
        let i = records.find(page).ok()?;
        Some(self.record(block, records.get(i)))
    }

    /// The records that start inside `range`, in IPA order.
    pub fn range(&self, range: Range<u64>) -> impl Iterator<Item = Record> + '_ {
        let Range { start, end } = range;
        let blocks = if start < end { (start >> BLOCK_SHIFT)..((end - 1) >> BLOCK_SHIFT) + 1 } else { 0..0 };
        self.blocks.range(blocks).flat_map(move |(&block, records)| {
            let lo = records.partition_point(|p| ipa_of(block, p) < start);
            let hi = records.partition_point(|p| ipa_of(block, p) < end);
            (lo..hi).map(move |i| self.record(block, records.get(i)))
        })
    }

    /// Every record, in IPA order.
    pub fn iter(&self) -> impl Iterator<Item = Record> + '_ {
        self.blocks
            .iter()
            .flat_map(move |(&block, records)| (0..records.len()).map(move |i| self.record(block, records.get(i))))
    }

    /// The last record that starts below `ipa`.
    pub fn last_before(&self, ipa: u64) -> Option<Record> {
        let last = ipa.checked_sub(1)?;
        // Blocks hold at least one record: only the first looked at can hold
        // none below `ipa`.
        self.blocks.range(..=last >> BLOCK_SHIFT).rev().find_map(|(&block, records)| {
            let n = records.partition_point(|p| ipa_of(block, p) <= last);
            n.checked_sub(1).map(|i| self.record(block, records.get(i)))
        })
    }

    /// `record` as handed over in a takeover.
    pub fn handed(&self, record: &Record) -> HandedMapping {
        // Recorded only where placed (memslots do not change).
        let pa = self.placed(record.ipa.raw()).map_or(Pa::new(0), |p| p.pa);
        HandedMapping { ipa: record.ipa, size: record.size.bytes(), pa, order: record.order }
    }

    /// Removes every record; returns the pages their pins held.
    pub fn clear(&mut self) -> u64 {
        let blocks = std::mem::take(&mut self.blocks);
        self.len = 0;
        self.young.clear();
        blocks
            .into_iter()
            .flat_map(|(block, records)| records.into_records().map(move |r| (block, r)))
            .fold(0, |pages, (b, r)| pages + self.release(b, r, None).1 as u64)
    }

    /// Notes an unmap sent to the core, to be reconciled (or given up on)
    /// before [`Self::end_unmap`]: until then, mappings recorded keep their
    /// invalidation sequence. The core may install one after the unmap ran
    /// and its result be recorded before the unmap is reconciled; the
    /// sequence tells the reconcile to keep it.
    pub fn begin_unmap(&mut self) {
        self.unmaps_in_flight += 1;
    }

    /// Notes an unmap of [`Self::begin_unmap`] reconciled or given up on.
    /// With none left in flight, every unmap still to come is sent after
    /// now and runs after every mapping recorded: their sequences go.
    pub fn end_unmap(&mut self) {
        self.unmaps_in_flight = self.unmaps_in_flight.checked_sub(1).expect("an unmap was begun");
        if self.unmaps_in_flight == 0 {
            self.young.clear();
        }
    }

    /// Sequences kept ([`Self::begin_unmap`]).
    #[cfg(test)]
    pub fn sequences_kept(&self) -> usize {
        self.young.len()
    }

    /// Keeps install orders from now on, or stops keeping them (those kept
    /// go): only FIFO and LIFO eviction read them, and they are the larger
    /// part of a record. Orders kept again start with every record there
    /// as the oldest (tied, so in IPA order); a record's order reads as 0
    /// while none is kept.
    pub fn keep_orders(&mut self, keep: bool) {
        if keep == self.keep_orders {
            return;
        }
        self.keep_orders = keep;
        self.blocks.values_mut().for_each(|b| b.keep_orders(keep));
    }

    /// Whether install orders are kept.
    #[cfg(test)]
    pub fn keeps_orders(&self) -> bool {
        self.keep_orders
    }

    /// `order` as a block keeps it ([`OrderBase`]): the first order of an
    /// empty table sets the base; one too far above it moves the base (and
    /// every kept offset) up first.
    fn offset(&mut self, order: u64) -> u32 {
        let base = self.base;
        if self.len == 0 {
            self.base = OrderBase(order.saturating_sub(HEADROOM));
        } else if order.saturating_sub(base.0) > u64::from(u32::MAX) {
            let to = OrderBase(order - HEADROOM);
            for order in self.blocks.values_mut().flat_map(|b| b.orders_mut().iter_mut()) {
                *order = to.offset(base.order(*order));
            }
            self.base = to;
        }
        self.base.offset(order)
    }

    /// The block and page in it of `ipa`.
    fn place_in_block(ipa: u64) -> (u64, u16) {
        (ipa >> BLOCK_SHIFT, ((ipa >> PAGE_SHIFT) & ((1 << (BLOCK_SHIFT - PAGE_SHIFT)) - 1)) as u16)
    }

    /// The record at `place` in `block`, with its order if kept and its
    /// sequence if kept.
    fn record(&self, block: u64, (place, order): (Place, Option<u32>)) -> Record {
        let ipa = ipa_of(block, place);
        let seq = if self.young.is_empty() { None } else { self.young.get(&ipa).copied() };
        let order = order.map_or(0, |o| self.base.order(o));
        Record { ipa: Ipa::new(ipa), size: place.size(), seq, order }
    }

    /// The record at `place` in `block`, gone from the table with the
    /// sequence `seq` if kept, its pin released.
    fn release(&self, block: u64, record: (Place, Option<u32>), seq: Option<u64>) -> (Record, usize) {
        let record = Record { seq, ..self.record(block, record) };
        // Recorded only where placed, with this span's pin taken.
        let pages = self.span(record.ipa.raw(), record.size).map_or(0, |(_, span)| {
            // Dropped here: released.
            self.pins.take_back(span).pages()
        });
        (record, pages)
    }
}

impl Drop for RecordTable {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The first IPA of a record at `place` in `block`.
fn ipa_of(block: u64, place: Place) -> u64 {
    (block << BLOCK_SHIFT) | (u64::from(place.page()) << PAGE_SHIFT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memslot::SlotFlags;
    use hyp_core::ownership::VmId;

    const RAM: u64 = 0x4000_0000;
    const HIGH: u64 = 0x1_0000_0000;

    /// 64 MiB of region at PA 0x4000_0000: RAM at its IPA, and its second
    /// half again at 4 GiB (another memslot, another offset).
    fn table() -> (VmLayout, RecordTable, Arc<Pins>) {
        let slots = [(RAM, 64 << 20, 0, SlotFlags::default()), (HIGH, 32 << 20, 32 << 20, SlotFlags::default())];
        let layout = VmLayout::single_region(VmId::new(1).unwrap(), Pa::new(RAM), 64 << 20, 4096, &slots).unwrap();
        let pins = Pins::new(&[(64 << 20, 4096)]);
        let table = RecordTable::new(&layout, pins.clone());
        (layout, table, pins)
    }

    /// A mapping as a fault makes it: placed by its memslot, pinned.
    fn installed(layout: &VmLayout, pins: &Arc<Pins>, ipa: u64, size: MapSize, seq: u64, order: u64) -> Installed {
        let slot = layout.memslots.lookup(Ipa::new(ipa)).unwrap();
        let b = layout.backing(slot, Ipa::new(ipa)).unwrap();
        let pin = pins.pin(b.region, b.offset, size.bytes()).unwrap().into_mapping();
        Installed { order, ..Installed::new(size, b.pa, seq, pin) }
    }

    #[test]
    fn records_read_back_as_a_sorted_map_would_hold_them() {
        read_back_as_a_sorted_map(true);
    }

    #[test]
    fn records_without_orders_read_back_as_a_sorted_map_would_hold_them() {
        read_back_as_a_sorted_map(false);
    }

    /// Random inserts and removes, with orders kept or not, against a
    /// B-tree of whole records.
    fn read_back_as_a_sorted_map(keep_orders: bool) {
        let (layout, mut table, pins) = table();
        table.keep_orders(keep_orders);
        let order = |step: u64| if keep_orders { step + 1000 } else { 0 };
        // Size, sequence kept, order.
        let mut model: BTreeMap<u64, (MapSize, Option<u64>, u64)> = BTreeMap::new();
        let mut in_flight = 0;
        let mut rng = crate::memory::test_rng::XorShift::new(0x2545_f491_4f6c_dd1d);
        let mut next = |n: u64| rng.below(n);
        for step in 0..4000u64 {
            let base = if next(4) == 0 { HIGH } else { RAM };
            let span = if base == HIGH { 32 << 20 } else { 64 << 20 };
            let size = if next(8) == 0 { MapSize::Block2M } else { MapSize::Page4K };
            let ipa = base + next(span / size.bytes()) * size.bytes();
            // Unmaps begin and end now and then, up to three at once: the
            // sequences recorded meanwhile are kept until the last ends.
            match next(64) {
                0 if in_flight < 3 => {
                    table.begin_unmap();
                    in_flight += 1;
                }
                1 if in_flight > 0 => {
                    table.end_unmap();
                    in_flight -= 1;
                    if in_flight == 0 {
                        model.values_mut().for_each(|(_, seq, _)| *seq = None);
                    }
                }
                _ => {}
            }
            if next(3) == 0 {
                let removed = table.remove(ipa).map(|(r, pages)| (r.size, r.seq, r.order, pages));
                let expected = model.remove(&ipa).map(|(s, q, o)| (s, q, o, (s.bytes() / 4096) as usize));
                assert_eq!(removed, expected, "step {step}: remove {ipa:#x}");
            } else {
                let m = installed(&layout, &pins, ipa, size, step, step + 1000);
                let old = table.insert(Ipa::new(ipa), m).expect("placed").map(|(r, _)| (r.size, r.seq, r.order));
                let kept = (in_flight > 0).then_some(step);
                assert_eq!(old, model.insert(ipa, (size, kept, order(step))), "step {step}: insert {ipa:#x}");
            }
            assert_eq!(table.len(), model.len());
            assert_eq!(table.sequences_kept(), model.values().filter(|(_, seq, _)| seq.is_some()).count());
            // Bounds on and off page boundaries (records start on them).
            let (lo, hi) = (RAM + next(128 << 20), RAM + next(HIGH));
            let (lo, hi) = if next(2) == 0 { (lo & !0xfff, hi & !0xfff) } else { (lo, hi) };
            let got: Vec<u64> = table.range(lo..hi).map(|r| r.ipa.raw()).collect();
            let want: Vec<u64> = model.range(lo..hi.max(lo)).map(|(&ipa, _)| ipa).collect();
            assert_eq!(got, want, "step {step}: range {lo:#x}..{hi:#x}");
            // Below a bound, and at or below it (is a page mapped).
            for below in [hi, hi + 1] {
                let before = table.last_before(below).map(|r| r.ipa.raw());
                let want = model.range(..below).next_back().map(|(&ipa, _)| ipa);
                assert_eq!(before, want, "step {step}: before {below:#x}");
            }
        }
        type Read = (u64, MapSize, Option<u64>, u64);
        let all: Vec<Read> = table.iter().map(|r| (r.ipa.raw(), r.size, r.seq, r.order)).collect();
        let want: Vec<Read> = model.iter().map(|(&ipa, &(s, q, o))| (ipa, s, q, o)).collect();
        assert_eq!(all, want);
        // Each record holds its own pin: the pages of what is recorded.
        let pages: u64 = model.values().map(|(s, _, _)| s.bytes() / 4096).sum();
        assert_eq!(pins.total(), pages);
        assert_eq!(table.clear(), pages);
        assert_eq!((pins.total(), table.len(), table.iter().count()), (0, 0, 0));
    }

    #[test]
    fn orders_read_back_exactly_within_2_31_of_the_newest_and_never_older() {
        let (layout, mut table, pins) = table();
        let counts = |t: &RecordTable| t.iter().map(|r| r.order).collect::<Vec<_>>();
        let put = |t: &mut RecordTable, page: u64, value: u64| {
            let ipa = RAM + page * 4096;
            t.insert(Ipa::new(ipa), installed(&layout, &pins, ipa, MapSize::Page4K, 0, value)).unwrap();
        };
        // A first value far from zero, one below it (recorded out of
        // order), one 2^31 above it: all exact.
        let first = 1 << 40;
        put(&mut table, 0, first);
        put(&mut table, 1, first - 1000);
        put(&mut table, 2, first + HEADROOM - 1);
        assert_eq!(counts(&table), [first, first - 1000, first + HEADROOM - 1]);
        // Eight billion on: the newest is exact, and the three older ones,
        // now more than 2^31 below it, read as the oldest value kept:
        // newer than they are, never older.
        let later = first + (1 << 33);
        put(&mut table, 3, later);
        let oldest = later - HEADROOM;
        assert_eq!(counts(&table), [oldest, oldest, oldest, later]);
        // So does a value that comes in that far below.
        put(&mut table, 4, first);
        assert_eq!(counts(&table)[4], oldest);
        // Emptied, the table counts from its next record again.
        table.clear();
        put(&mut table, 0, 7);
        assert_eq!(counts(&table), [7]);
    }

    #[test]
    fn a_record_knows_its_pa_from_its_memslot() {
        let (layout, mut table, pins) = table();
        let ipa = HIGH + (2 << 20);
        table.insert(Ipa::new(ipa), installed(&layout, &pins, ipa, MapSize::Block2M, 7, 3)).unwrap();
        let r = table.get(ipa).unwrap();
        let handed = table.handed(&r);
        assert_eq!((handed.pa, handed.size, handed.order), (Pa::new(RAM + (34 << 20)), 2 << 20, 3));
        assert_eq!(table.get(ipa + 4096), None);
    }

    #[test]
    fn a_mapping_its_memslot_does_not_place_so_is_given_back() {
        let (layout, mut table, pins) = table();
        // The PA of another page.
        let mut wrong_pa = installed(&layout, &pins, RAM, MapSize::Page4K, 0, 0);
        wrong_pa.pa = Pa::new(RAM + 4096);
        // The pin of another page.
        let other = pins.pin(0, 8192, 4096).unwrap().into_mapping();
        let wrong_pin = Installed::new(MapSize::Page4K, Pa::new(RAM + 4096), 0, other);
        // Not aligned to its size, or outside every memslot.
        let misaligned = installed(&layout, &pins, RAM + 4096, MapSize::Page4K, 0, 0);
        let misaligned = Installed { size: MapSize::Block2M, ..misaligned };
        for (ipa, m) in [(RAM, wrong_pa), (RAM + 4096, wrong_pin), (RAM + 4096, misaligned)] {
            let back = table.insert(Ipa::new(ipa), m).expect_err("not placed so");
            drop(back);
        }
        assert_eq!((table.len(), pins.total()), (0, 0), "nothing kept, every pin released with what was given back");
    }

    #[test]
    fn a_full_block_of_4k_mappings_costs_6_bytes_each_and_2_without_orders() {
        let (layout, mut table, pins) = table();
        for page in 0..512 {
            let ipa = RAM + page * 4096;
            table.insert(Ipa::new(ipa), installed(&layout, &pins, ipa, MapSize::Page4K, 0, page)).unwrap();
        }
        let full = |t: &RecordTable| t.blocks[&(RAM >> BLOCK_SHIFT)].bytes();
        assert_eq!((table.blocks[&(RAM >> BLOCK_SHIFT)].len(), full(&table)), (512, 512 * 6));
        // A block mapping's block holds one record.
        let block = RAM + (2 << 20);
        table.insert(Ipa::new(block), installed(&layout, &pins, block, MapSize::Block2M, 0, 0)).unwrap();
        assert_eq!(table.blocks[&(block >> BLOCK_SHIFT)].bytes(), 6);
        // Orders no longer kept: their room goes.
        table.keep_orders(false);
        assert_eq!(full(&table), 512 * 2);
        // Emptied, a block gives its memory back.
        for page in 0..500 {
            table.remove(RAM + page * 4096).unwrap();
        }
        assert!(full(&table) <= 48 * 2, "room for 48 records at most");
        drop(table);
        assert_eq!(pins.total(), 0, "a dropped table releases its pins");
    }

    #[test]
    fn orders_not_kept_read_as_0_and_kept_again_start_tied_as_the_oldest() {
        let (layout, mut table, pins) = table();
        let put = |t: &mut RecordTable, page: u64, order: u64| {
            let ipa = RAM + page * 4096;
            t.insert(Ipa::new(ipa), installed(&layout, &pins, ipa, MapSize::Page4K, 0, order)).unwrap();
        };
        let orders = |t: &RecordTable| t.iter().map(|r| r.order).collect::<Vec<_>>();
        put(&mut table, 0, 100);
        put(&mut table, 1, 101);
        table.keep_orders(false);
        assert!(!table.keeps_orders());
        put(&mut table, 2, 102);
        assert_eq!(orders(&table), [0, 0, 0]);
        // Kept again: those there tie below every order recorded from now.
        table.keep_orders(true);
        put(&mut table, 3, 103);
        put(&mut table, 1, 104);
        let o = orders(&table);
        assert!(o[0] == o[2] && o[0] < 103, "{o:?}");
        assert_eq!((o[1], o[3]), (104, 103));
        assert_eq!(table.len(), 4);
    }
}
