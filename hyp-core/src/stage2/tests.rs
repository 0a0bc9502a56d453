//! Stage-2 table tests: hand-checked cases and a proptest against a plain model.

extern crate std;

use std::collections::BTreeMap;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::addr::{Ipa, Pa, Range};
use crate::testing::{HostMemory, RecordingTlb};

const TABLE_PA: u64 = 0x1_0000_0000;
const POOL: usize = 96;
const RW: LeafAttrs = LeafAttrs { perms: Perms::RW, mem: MemType::Normal };
const R: LeafAttrs = LeafAttrs { perms: Perms::R, mem: MemType::Normal };

fn setup(geometry: Geometry) -> (HostMemory, Memcache) {
    let mem = HostMemory::new(Pa::new(TABLE_PA), POOL);
    let cache = mem.memcache_from(geometry.root_tables(), POOL - geometry.root_tables());
    (mem, cache)
}

fn range(start: u64, len: u64) -> Range<Ipa> {
    Range::<Ipa>::new(Ipa::new(start), len).unwrap()
}

#[test]
fn map_page_then_walk_reports_level3_leaf() {
    let g = Geometry::kvm_default();
    let (mem, mut cache) = setup(g);
    let mut s2 = Stage2::new(g, Pa::new(TABLE_PA), 1, &mem).unwrap();
    let mut tlb = RecordingTlb::default();
    assert_eq!(s2.walk(Ipa::new(0x4000_1000)).unwrap(), Walk::Unmapped { level: 1 });
    let before = cache.len();
    let out = s2.map(Ipa::new(0x4000_1000), Pa::new(0x8000_5000), MapSize::Page4K, RW, &mut cache, &mut tlb);
    assert_eq!(out, Ok(MapOutcome::Installed));
    // Level 2 and level 3 tables were taken from the memcache.
    assert_eq!(before - cache.len(), 2);
    match s2.walk(Ipa::new(0x4000_1abc)).unwrap() {
        Walk::Mapped { level, descriptor, pa } => {
            assert_eq!(level, 3);
            assert_eq!(pa, Pa::new(0x8000_5abc));
            assert_eq!(descriptor.attrs(), RW);
        }
        other => panic!("{other:?}"),
    }
    // The neighbouring page is a translation fault at level 3.
    assert_eq!(s2.walk(Ipa::new(0x4000_2000)).unwrap(), Walk::Unmapped { level: 3 });
    // The second concatenated root serves IPAs >= 512 GiB.
    assert_eq!(s2.walk(Ipa::new(0x80_4000_0000)).unwrap(), Walk::Unmapped { level: 1 });
}

#[test]
fn root_descriptor_bytes_are_where_the_mmu_reads_them() {
    // Check the raw table bytes, not our own walker: IPA 0x80_4000_0000 on a
    // 40-bit geometry indexes entry 513 of the concatenated level-1 root,
    // i.e. entry 1 of the second root page.
    let g = Geometry::kvm_default();
    let (mem, mut cache) = setup(g);
    let mut s2 = Stage2::new(g, Pa::new(TABLE_PA), 1, &mem).unwrap();
    let mut tlb = RecordingTlb::default();
    s2.map(Ipa::new(0x80_4000_0000), Pa::new(0xC000_0000), MapSize::Block1G, RW, &mut cache, &mut tlb).unwrap();
    let page = TableMemory::table(mem.map(), Pa::new(TABLE_PA + 0x1000)).unwrap();
    let raw = page[1].load(core::sync::atomic::Ordering::Relaxed);
    // Block descriptor: bits[1:0]=01, MemAttr 1111, S2AP 11, SH 11, AF, XN.
    assert_eq!(raw, 0x0040_0000_c000_07fd);
    assert_eq!(s2.table_pages().unwrap(), 0);
}

#[test]
fn map_checks_worst_case_memcache_need_before_touching_tables() {
    let g = Geometry::new(48, 48).unwrap();
    let mem = HostMemory::new(Pa::new(TABLE_PA), 8);
    let mut cache = mem.memcache_from(1, 2); // worst case for a page at level 0 root is 3
    let mut s2 = Stage2::new(g, Pa::new(TABLE_PA), 1, &mem).unwrap();
    let mut tlb = RecordingTlb::default();
    let err = s2.map(Ipa::new(0x1000), Pa::new(0x2000), MapSize::Page4K, RW, &mut cache, &mut tlb);
    assert_eq!(err, Err(TableError::MemcacheLow { need: 3, have: 2 }));
    assert_eq!(cache.len(), 2);
    assert_eq!(s2.table_pages().unwrap(), 0);
    assert_eq!(s2.walk(Ipa::new(0x1000)).unwrap(), Walk::Unmapped { level: 0 });
}

#[test]
fn misaligned_and_out_of_range_maps_are_refused() {
    let g = Geometry::kvm_default();
    let (mem, mut cache) = setup(g);
    let mut s2 = Stage2::new(g, Pa::new(TABLE_PA), 1, &mem).unwrap();
    let mut tlb = RecordingTlb::default();
    let m = |s2: &mut Stage2<_>, cache: &mut Memcache, ipa, pa, size| {
        s2.map(Ipa::new(ipa), Pa::new(pa), size, RW, cache, &mut RecordingTlb::default())
    };
    assert_eq!(m(&mut s2, &mut cache, 0x20_1000, 0x40_0000, MapSize::Block2M), Err(TableError::Misaligned));
    assert_eq!(m(&mut s2, &mut cache, 0x20_0000, 0x40_1000, MapSize::Block2M), Err(TableError::Misaligned));
    assert_eq!(m(&mut s2, &mut cache, 1 << 40, 0, MapSize::Page4K), Err(TableError::IpaOutOfRange));
    assert_eq!(m(&mut s2, &mut cache, 0, 1 << 40, MapSize::Page4K), Err(TableError::PaOutOfRange));
    assert_eq!(s2.table_pages().unwrap(), 0);
    let _ = &mut tlb;
}

#[test]
fn map_over_a_different_mapping_is_refused_and_same_mapping_is_idempotent() {
    let g = Geometry::kvm_default();
    let (mem, mut cache) = setup(g);
    let mut s2 = Stage2::new(g, Pa::new(TABLE_PA), 1, &mem).unwrap();
    let mut tlb = RecordingTlb::default();
    s2.map(Ipa::new(0x20_0000), Pa::new(0x60_0000), MapSize::Block2M, R, &mut cache, &mut tlb).unwrap();
    // Same output and attributes: nothing to do.
    assert_eq!(
        s2.map(Ipa::new(0x20_0000), Pa::new(0x60_0000), MapSize::Block2M, R, &mut cache, &mut tlb),
        Ok(MapOutcome::AlreadyPresent)
    );
    // Different output: refused.
    assert_eq!(
        s2.map(Ipa::new(0x20_0000), Pa::new(0x80_0000), MapSize::Block2M, R, &mut cache, &mut tlb),
        Err(TableError::Overlap { level: 2 })
    );
    // A page inside the block: refused at the block's level.
    assert_eq!(
        s2.map(Ipa::new(0x20_1000), Pa::new(0x60_1000), MapSize::Page4K, R, &mut cache, &mut tlb),
        Err(TableError::Overlap { level: 2 })
    );
    // Same output with new attributes: break-before-make.
    tlb.invalidated.clear();
    let syncs = tlb.syncs;
    assert_eq!(
        s2.map(Ipa::new(0x20_0000), Pa::new(0x60_0000), MapSize::Block2M, RW, &mut cache, &mut tlb),
        Ok(MapOutcome::Replaced)
    );
    assert_eq!(tlb.invalidated, [(1, Ipa::new(0x20_0000), 2)]);
    assert_eq!(tlb.syncs, syncs + 1);
    // A block over a table of pages: refused.
    s2.map(Ipa::new(0x40_0000), Pa::new(0x1000), MapSize::Page4K, R, &mut cache, &mut tlb).unwrap();
    assert_eq!(
        s2.map(Ipa::new(0x40_0000), Pa::new(0xa0_0000), MapSize::Block2M, R, &mut cache, &mut tlb),
        Err(TableError::Overlap { level: 2 })
    );
}

#[test]
fn unmap_returns_emptied_tables_and_invalidates_each_leaf() {
    let g = Geometry::kvm_default();
    let (mem, mut cache) = setup(g);
    let mut s2 = Stage2::new(g, Pa::new(TABLE_PA), 3, &mem).unwrap();
    let mut tlb = RecordingTlb::default();
    let full = cache.len();
    for i in 0..4u64 {
        s2.map(
            Ipa::new(0x4000_0000 + i * 0x1000),
            Pa::new(0x9000_0000 + i * 0x1000),
            MapSize::Page4K,
            RW,
            &mut cache,
            &mut tlb,
        )
        .unwrap();
    }
    assert_eq!(full - cache.len(), 2);
    tlb = RecordingTlb::default();
    // Unmap two pages: the level-3 table keeps two leaves.
    let mut freed = Vec::new();
    let st = s2.unmap(range(0x4000_0000, 0x2000), &mut tlb, &mut |p| freed.push(p)).unwrap();
    assert_eq!((st.leaves, st.tables_freed), (2, 0));
    assert_eq!(tlb.invalidated, [(3, Ipa::new(0x4000_0000), 3), (3, Ipa::new(0x4000_1000), 3)]);
    assert_eq!(tlb.syncs, 1);
    // Unmap the rest: both tables are emptied and handed back.
    let st = s2.unmap(range(0x4000_0000, 0x4000_0000), &mut tlb, &mut |p| freed.push(p)).unwrap();
    assert_eq!((st.leaves, st.tables_freed), (2, 2));
    assert_eq!(freed.len(), 2);
    assert_eq!(s2.table_pages().unwrap(), 0);
    assert_eq!(s2.walk(Ipa::new(0x4000_2000)).unwrap(), Walk::Unmapped { level: 1 });
}

#[test]
fn unmap_cutting_through_a_block_is_refused_and_changes_nothing() {
    let g = Geometry::kvm_default();
    let (mem, mut cache) = setup(g);
    let mut s2 = Stage2::new(g, Pa::new(TABLE_PA), 1, &mem).unwrap();
    let mut tlb = RecordingTlb::default();
    s2.map(Ipa::new(0x20_0000), Pa::new(0x60_0000), MapSize::Block2M, RW, &mut cache, &mut tlb).unwrap();
    s2.map(Ipa::new(0x1000), Pa::new(0x1000), MapSize::Page4K, RW, &mut cache, &mut tlb).unwrap();
    let err = s2.unmap(range(0x1000, 0x20_0000), &mut tlb, &mut |_| panic!("nothing may be freed"));
    assert_eq!(err, Err(TableError::PartialBlock { block: Ipa::new(0x20_0000) }));
    assert!(matches!(s2.walk(Ipa::new(0x1000)).unwrap(), Walk::Mapped { level: 3, .. }));
    assert!(matches!(s2.walk(Ipa::new(0x20_0000)).unwrap(), Walk::Mapped { level: 2, .. }));
}

#[test]
fn relax_adds_permissions_in_place_and_write_protect_removes_write() {
    let g = Geometry::kvm_default();
    let (mem, mut cache) = setup(g);
    let mut s2 = Stage2::new(g, Pa::new(TABLE_PA), 1, &mem).unwrap();
    let mut tlb = RecordingTlb::default();
    s2.map(Ipa::new(0x20_0000), Pa::new(0x60_0000), MapSize::Block2M, R, &mut cache, &mut tlb).unwrap();
    assert_eq!(s2.relax(Ipa::new(0x20_5000), Perms::W, &mut tlb), Ok(2));
    let perms = |s2: &Stage2<_>| match s2.walk(Ipa::new(0x20_0000)).unwrap() {
        Walk::Mapped { descriptor, .. } => descriptor.perms(),
        w => panic!("{w:?}"),
    };
    assert_eq!(perms(&s2), Perms::RW);
    // Write-protect a range covering only one page of the block: the whole block loses write.
    assert_eq!(s2.write_protect(range(0x20_1000, 0x1000), &mut tlb), Ok(1));
    assert_eq!(perms(&s2), Perms::R);
    assert_eq!(s2.relax(Ipa::new(0x60_0000), Perms::W, &mut tlb), Err(TableError::NotMapped));
}

#[test]
fn corrupt_table_pointer_is_an_error_not_a_panic() {
    let g = Geometry::kvm_default();
    let (mem, _cache) = setup(g);
    let s2 = Stage2::new(g, Pa::new(TABLE_PA), 1, &mem).unwrap();
    // A table descriptor pointing outside table memory.
    let root = TableMemory::table(mem.map(), Pa::new(TABLE_PA)).unwrap();
    root[0].store(Descriptor::table(Pa::new(0xdead_0000)).raw(), core::sync::atomic::Ordering::Relaxed);
    assert_eq!(s2.walk(Ipa::new(0x1000)), Err(TableError::Corrupt));
    assert_eq!(Stage2::new(g, Pa::new(TABLE_PA + 0x1000), 1, &mem).err(), Some(TableError::BadRoot));
}

// ---- Model-based property test ----

#[derive(Clone, Debug)]
enum Op {
    Map { slot: u64, pa_slot: u64, size: MapSize, perms: Perms },
    Unmap { slot: u64, pages: u64 },
    Relax { page: u64, perms: Perms },
    WriteProtect { page: u64, pages: u64 },
}

/// The IPA space exercised: 2 GiB from 1 GiB, so 1 GiB blocks fit at 1 GiB.
const BASE: u64 = 0x4000_0000;
const SPAN: u64 = 0x8000_0000;

fn size_strategy() -> impl Strategy<Value = MapSize> {
    prop_oneof![6 => Just(MapSize::Page4K), 3 => Just(MapSize::Block2M), 1 => Just(MapSize::Block1G)]
}

fn perms_strategy() -> impl Strategy<Value = Perms> {
    (0u32..8).prop_map(|b| Perms::from_bits(b).unwrap())
}

fn op_strategy() -> impl Strategy<Value = Op> {
    // Slots cluster in the first 8 MiB and near 1 GiB boundaries so operations collide.
    let slot = prop_oneof![0u64..2048, (0u64..2).prop_map(|g| g * 0x40000)];
    prop_oneof![
        5 => (slot.clone(), 0u64..4096, size_strategy(), perms_strategy())
            .prop_map(|(slot, pa_slot, size, perms)| Op::Map { slot, pa_slot, size, perms }),
        2 => (slot.clone(), 1u64..1200).prop_map(|(slot, pages)| Op::Unmap { slot, pages }),
        2 => (0u64..2048, perms_strategy()).prop_map(|(page, perms)| Op::Relax { page, perms }),
        1 => (0u64..2048, 1u64..600).prop_map(|(page, pages)| Op::WriteProtect { page, pages }),
    ]
}

/// Leaves by first IPA: (size, PA, perms).
type Model = BTreeMap<u64, (MapSize, u64, Perms)>;

fn overlapping(model: &Model, start: u64, len: u64) -> Vec<u64> {
    model
        .iter()
        .filter(|(&ipa, &(size, _, _))| ipa < start + len && start < ipa + size.bytes())
        .map(|(&ipa, _)| ipa)
        .collect()
}

fn apply_model(model: &mut Model, op: &Op) -> bool {
    match *op {
        Op::Map { slot, pa_slot, size, perms } => {
            let ipa = (BASE + slot * 0x1000) & !(size.bytes() - 1);
            let pa = (pa_slot * 0x1000 * 512) & !(size.bytes() - 1);
            let hits = overlapping(model, ipa, size.bytes());
            if hits.is_empty() {
                model.insert(ipa, (size, pa, perms));
                return true;
            }
            if hits == [ipa] && model[&ipa].0 == size && model[&ipa].1 == pa {
                model.insert(ipa, (size, pa, perms));
                return true;
            }
            false
        }
        Op::Unmap { slot, pages } => {
            let start = BASE + slot * 0x1000;
            let len = pages * 0x1000;
            let hits = overlapping(model, start, len);
            if hits.iter().any(|&ipa| ipa < start || ipa + model[&ipa].0.bytes() > start + len) {
                return false;
            }
            for ipa in hits {
                model.remove(&ipa);
            }
            true
        }
        Op::Relax { page, perms } => {
            let ipa = BASE + page * 0x1000;
            match overlapping(model, ipa, 1).first() {
                Some(&leaf) => {
                    let e = model.get_mut(&leaf).unwrap();
                    e.2 = e.2.union(perms);
                    true
                }
                None => false,
            }
        }
        Op::WriteProtect { page, pages } => {
            for ipa in overlapping(model, BASE + page * 0x1000, pages * 0x1000) {
                let e = model.get_mut(&ipa).unwrap();
                e.2 = e.2.without(Perms::W);
            }
            true
        }
    }
}

fn apply_tables(s2: &mut Stage2<&HostMemory>, cache: &mut Memcache, op: &Op) -> bool {
    let mut tlb = RecordingTlb::default();
    match *op {
        Op::Map { slot, pa_slot, size, perms } => {
            let ipa = (BASE + slot * 0x1000) & !(size.bytes() - 1);
            let pa = (pa_slot * 0x1000 * 512) & !(size.bytes() - 1);
            let attrs = LeafAttrs { perms, mem: MemType::Normal };
            s2.map(Ipa::new(ipa), Pa::new(pa), size, attrs, cache, &mut tlb).is_ok()
        }
        Op::Unmap { slot, pages } => {
            let r = range(BASE + slot * 0x1000, pages * 0x1000);
            s2.unmap(r, &mut tlb, &mut |p| cache.push(p).unwrap()).is_ok()
        }
        Op::Relax { page, perms } => s2.relax(Ipa::new(BASE + page * 0x1000), perms, &mut tlb).is_ok(),
        Op::WriteProtect { page, pages } => {
            s2.write_protect(range(BASE + page * 0x1000, pages * 0x1000), &mut tlb).is_ok()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_agree_with_a_plain_model(
        ops in proptest::collection::vec(op_strategy(), 1..60),
        probes in proptest::collection::vec(0u64..(SPAN / 0x1000), 16),
    ) {
        let g = Geometry::kvm_default();
        let pool = 256;
        let mem = HostMemory::new(Pa::new(TABLE_PA), pool);
        let mut cache = mem.memcache_from(2, pool - 2);
        let mut s2 = Stage2::new(g, Pa::new(TABLE_PA), 7, &mem).unwrap();
        let mut model = Model::new();
        for op in &ops {
            let want = apply_model(&mut model, op);
            let got = apply_tables(&mut s2, &mut cache, op);
            prop_assert_eq!(got, want, "op {:?}", op);
        }
        // Every leaf of the model, at its first, middle and last page, and random probes.
        let mut points: Vec<u64> = probes.iter().map(|p| BASE + p * 0x1000 + 0x123).collect();
        for (&ipa, &(size, _, _)) in &model {
            points.extend([ipa, ipa + size.bytes() / 2, ipa + size.bytes() - 0x1000]);
        }
        for ipa in points {
            let walk = s2.walk(Ipa::new(ipa)).unwrap();
            let hit = overlapping(&model, ipa, 1);
            match (walk, hit.first()) {
                (Walk::Unmapped { .. }, None) => {}
                (Walk::Mapped { level, descriptor, pa }, Some(leaf)) => {
                    let (size, out, perms) = model[leaf];
                    prop_assert_eq!(level, size.level());
                    prop_assert_eq!(pa.raw(), out + (ipa - leaf));
                    prop_assert_eq!(descriptor.perms(), perms);
                }
                (w, m) => prop_assert!(false, "ipa {:#x}: tables {:?}, model {:?}", ipa, w, m),
            }
        }
        // The tables hold exactly the model's leaves.
        let mut leaves = Vec::new();
        s2.for_each_leaf(&mut |ipa, level, _| leaves.push((ipa.raw(), level))).unwrap();
        let want: Vec<(u64, u8)> = model.iter().map(|(&ipa, &(s, _, _))| (ipa, s.level())).collect();
        prop_assert_eq!(leaves, want);
        // Exactly the tables the leaves need are linked (no empty table is
        // left behind): a level-2 table per 1 GiB holding a page or 2 MiB
        // leaf, a level-3 table per 2 MiB holding a page.
        let l2: std::collections::BTreeSet<u64> =
            model.iter().filter(|(_, (s, _, _))| s.level() >= 2).map(|(&ipa, _)| ipa >> 30).collect();
        let l3: std::collections::BTreeSet<u64> =
            model.iter().filter(|(_, (s, _, _))| s.level() == 3).map(|(&ipa, _)| ipa >> 21).collect();
        prop_assert_eq!(s2.table_pages().unwrap() as usize, l2.len() + l3.len());
        // No table page is leaked: pages in use plus pages cached is the pool.
        prop_assert_eq!(s2.table_pages().unwrap() as usize + cache.len(), pool - 2);
    }
}
