//! Per-operation cost of the core's hot paths: stage-2 map, walk, relax,
//! unmap, and a ring push+pop. Run with `cargo bench -p hyp-core`.
//!
//! Each figure is the median over 15 rounds of the mean cost per operation
//! in a round (a round does thousands of operations, so timer overhead
//! vanishes); the spread is the min and max round.

use std::time::Instant;

use hyp_core::addr::{Ipa, Pa, Range};
use hyp_core::ring::{Consumer, OwnedRing, Producer, Record};
use hyp_core::stage2::{Geometry, LeafAttrs, MapSize, MemType, Memcache, Perms, Stage2, Walk};
use hyp_core::testing::{HostMemory, NoTlb};

const TABLES_PA: u64 = 0x1_0000_0000;
const POOL_PAGES: usize = 1100;
const RW: LeafAttrs = LeafAttrs { perms: Perms::RW, mem: MemType::Normal };
const R: LeafAttrs = LeafAttrs { perms: Perms::R, mem: MemType::Normal };

/// Hands out pool pages after the two root pages.
struct PageSource(u64);

impl PageSource {
    fn refill(&mut self, cache: &mut Memcache) {
        while cache.len() < 8 {
            cache.push(Pa::new(TABLES_PA + self.0 * 4096)).unwrap();
            self.0 += 1;
        }
    }
}

fn stats(mut per_op_ns: Vec<f64>) -> (f64, f64, f64) {
    per_op_ns.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (per_op_ns[per_op_ns.len() / 2], per_op_ns[0], per_op_ns[per_op_ns.len() - 1])
}

fn report(name: &str, samples: Vec<f64>) {
    let (median, min, max) = stats(samples);
    println!("{name:<44} {median:>9.1} ns/op   (min {min:.1}, max {max:.1})");
}

fn main() {
    const PAGES: u64 = 1 << 18; // 1 GiB of 4 KiB pages
    const BLOCKS: u64 = 512; // 1 GiB of 2 MiB blocks
    let base = 0x4000_0000u64;
    let g = Geometry::kvm_default();
    let (mut map4k, mut walk4k, mut relax4k, mut unmap4k, mut map2m, mut walk2m) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..15 {
        let pool = HostMemory::new(Pa::new(TABLES_PA), POOL_PAGES);
        let mut source = PageSource(2);
        let mut cache = Memcache::new();
        let mut s2 = Stage2::new(g, Pa::new(TABLES_PA), 1, pool.map()).unwrap();
        let mut tlb = NoTlb;

        let t = Instant::now();
        for i in 0..PAGES {
            if cache.len() < 2 {
                source.refill(&mut cache);
            }
            s2.map(
                Ipa::new(base + i * 4096),
                Pa::new(0x80_0000_0000 + i * 4096),
                MapSize::Page4K,
                R,
                &mut cache,
                &mut tlb,
            )
            .unwrap();
        }
        map4k.push(t.elapsed().as_nanos() as f64 / PAGES as f64);

        let t = Instant::now();
        let mut sum = 0u64;
        for i in 0..PAGES {
            if let Walk::Mapped { pa, .. } = s2.walk(Ipa::new(base + i * 4096 + 8)).unwrap() {
                sum = sum.wrapping_add(pa.raw());
            }
        }
        walk4k.push(t.elapsed().as_nanos() as f64 / PAGES as f64);
        assert_ne!(sum, 0);

        let t = Instant::now();
        for i in 0..PAGES {
            s2.relax(Ipa::new(base + i * 4096), Perms::W, &mut tlb).unwrap();
        }
        relax4k.push(t.elapsed().as_nanos() as f64 / PAGES as f64);

        let t = Instant::now();
        for i in 0..PAGES {
            let r = Range::<Ipa>::new(Ipa::new(base + i * 4096), 4096).unwrap();
            s2.unmap(r, &mut tlb, &mut |p| {
                let _ = cache.push(p);
            })
            .unwrap();
        }
        unmap4k.push(t.elapsed().as_nanos() as f64 / PAGES as f64);

        let block = 2u64 << 20;
        let t = Instant::now();
        for i in 0..BLOCKS {
            if cache.len() < 2 {
                source.refill(&mut cache);
            }
            s2.map(
                Ipa::new(base + i * block),
                Pa::new(0x80_0000_0000 + i * block),
                MapSize::Block2M,
                RW,
                &mut cache,
                &mut tlb,
            )
            .unwrap();
        }
        map2m.push(t.elapsed().as_nanos() as f64 / BLOCKS as f64);
        let t = Instant::now();
        for _ in 0..64 {
            for i in 0..BLOCKS {
                let w = s2.walk(Ipa::new(base + i * block + 0x1234)).unwrap();
                assert!(matches!(w, Walk::Mapped { level: 2, .. }));
            }
        }
        walk2m.push(t.elapsed().as_nanos() as f64 / (64 * BLOCKS) as f64);
    }
    println!("hyp-core stage-2 (40-bit IPA, 2 concatenated L1 roots, 4 KiB granule)");
    report("map 4 KiB page (tables allocated as needed)", map4k);
    report("walk 4 KiB page (level 3 leaf)", walk4k);
    report("relax 4 KiB page (R -> RW in place)", relax4k);
    report("unmap 4 KiB page (frees emptied tables)", unmap4k);
    report("map 2 MiB block", map2m);
    report("walk 2 MiB block (level 2 leaf)", walk2m);

    let mut ring_ns = vec![];
    for _ in 0..15 {
        let ring = OwnedRing::new();
        let mut p = Producer::attach(ring.view()).unwrap();
        let mut c = Consumer::attach(ring.view()).unwrap();
        let n = 1_000_000u64;
        let t = Instant::now();
        for i in 0..n {
            p.push(&Record([i; 8])).unwrap();
            let r = c.pop().unwrap().unwrap();
            assert_eq!(r.0[0], i);
        }
        ring_ns.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    report("ring push + pop, one thread (copy + checks)", ring_ns);
}
