//! Swap stores, in one run: what a page costs to put away and bring back,
//! and what it takes while it is away, for the page-slot layout and the
//! lz4-packed one (`swap_compression`), on a disk (the state directory on
//! ext4 here, fdatasync included) and on tmpfs.
//!
//! Pages of four kinds, 32 MiB of each:
//! - zeros;
//! - sparse: a zero page with 8 words written (what sim-machine's random
//!   workloads leave);
//! - code: the memory-manager binary's bytes (a stand-in for a guest's
//!   text and data);
//! - noise: xorshift bytes (encrypted or compressed guest data).
//!
//! Puts go in batches of 1 page (direct reclaim of one 4 KiB mapping, one
//! sync each) and of 64; pages come back one at a time in a shuffled order
//! (faults). `cargo bench -p faultline-system-tests --bench swap_store`

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

use faultline_attach::shm::MappedRegion;
use memory_manager::memory::swap::{SwapCompression, SwapStore};

const PAGE: u64 = 4096;
/// Pages per region.
const PAGES: u64 = 8192;
/// Pages put in batches of one (each synced: slow on a disk).
const SINGLES: u64 = 512;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A mapped memfd of `PAGES` pages of `kind`.
fn region(kind: &str) -> MappedRegion {
    let memfd = memfd::MemfdOptions::default().create("guest").unwrap();
    memfd.as_file().set_len(PAGES * PAGE).unwrap();
    let map = MappedRegion::map(memfd.as_file().as_fd(), 0, PAGES * PAGE, PAGE).unwrap();
    let code = std::fs::read(faultline_system_tests::binary("memory-manager")).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = vec![0u8; PAGE as usize];
    for p in 0..PAGES {
        page.fill(0);
        match kind {
            "zeros" => {}
            "sparse" => {
                for _ in 0..8 {
                    let at = (xorshift(&mut x) % (PAGE / 8)) as usize * 8;
                    page[at..at + 8].copy_from_slice(&xorshift(&mut x).to_le_bytes());
                }
            }
            "code" => {
                let at = (p * PAGE) as usize % (code.len() - PAGE as usize);
                page.copy_from_slice(&code[at..at + PAGE as usize]);
            }
            _ => page.iter_mut().for_each(|b| *b = xorshift(&mut x) as u8),
        }
        map.write_from(p * PAGE, &page).unwrap();
    }
    map
}

/// One row: puts (batches of one, then of 64), the store's size, takes.
fn row(map: &MappedRegion, kind: &str, base: &Path, compression: SwapCompression) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let mut store = SwapStore::in_dir(dir.path(), 0, PAGES * PAGE, compression).unwrap();
    let started = Instant::now();
    for p in 0..SINGLES {
        store.put(map, p * PAGE, PAGE).unwrap();
        store.sync().unwrap();
    }
    let single_us = started.elapsed().as_secs_f64() * 1e6 / SINGLES as f64;
    let started = Instant::now();
    for batch in (SINGLES..PAGES).step_by(64) {
        for p in batch..(batch + 64).min(PAGES) {
            store.put(map, p * PAGE, PAGE).unwrap();
        }
        store.sync().unwrap();
    }
    let batched_us = started.elapsed().as_secs_f64() * 1e6 / (PAGES - SINGLES) as f64;
    let usage = store.usage().unwrap();
    assert_eq!(usage.held, PAGES * PAGE, "every page held");
    let mut order: Vec<u64> = (0..PAGES).collect();
    let mut x = 7u64;
    for i in (1..order.len()).rev() {
        order.swap(i, (xorshift(&mut x) % (i as u64 + 1)) as usize);
    }
    let started = Instant::now();
    for &p in &order {
        assert!(store.take(map, p * PAGE, (p + 1) * PAGE).unwrap());
    }
    let take_us = started.elapsed().as_secs_f64() * 1e6 / PAGES as f64;
    let left = store.usage().unwrap();
    println!(
        "| {kind} | {} | {:?} | {single_us:.1} | {batched_us:.1} | {take_us:.1} | {} | {:.2} | {} |",
        if usage.in_memory { "tmpfs" } else { "disk" },
        compression,
        usage.stored >> 10,
        usage.held as f64 / usage.stored.max(1) as f64,
        left.stored >> 10,
    );
}

fn main() {
    println!("{PAGES} pages of 4 KiB per row ({} MiB)", (PAGES * PAGE) >> 20);
    println!(
        "| pages | store on | layout | put, 1 per sync (us/page) | put, 64 per sync (us/page) | take (us/page) | stored (KiB) | held/stored | stored after all came back (KiB) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let disk = std::env::temp_dir();
    let bases: Vec<&Path> = [disk.as_path(), Path::new("/dev/shm")].into_iter().filter(|p| p.is_dir()).collect();
    for kind in ["zeros", "sparse", "code", "noise"] {
        let map = region(kind);
        for base in &bases {
            for compression in [SwapCompression::None, SwapCompression::Lz4] {
                row(&map, kind, base, compression);
            }
        }
    }
}
