//! Fault round trip, in one run: Faultline across two processes (4 KiB and
//! 2 MiB, populated and fresh backing, spinning and sleeping doorbells), the
//! same pipeline in one process (the lower bound), the kernel's own first
//! touch of a memfd page, and userfaultfd serving the same pages (memfd,
//! MISSING mode, UFFDIO_COPY, handler spinning and blocking).
//!
//! `cargo bench -p faultline-system-tests --bench fault_roundtrip`

use std::os::fd::AsFd;
use std::process::Command;
use std::time::Instant;

use faultline_attach::shm::MappedRegion;
use faultline_system_tests::uffd::{self, Page};
use faultline_system_tests::{binary, Daemon};
use hyp_core::addr::Pa;
use hyp_core::ownership::VmId;
use hyp_core::ring::abi::FaultRecord;
use hyp_core::testing::HostCore;
use memfd::MemfdOptions;
use memory_manager::fault::pipeline::handle_fault;
use memory_manager::fault::plan::Decision;
use memory_manager::fault::trace::Trace;
use memory_manager::link::vm::AttachedVm;
use memory_manager::memory::layout::VmLayout;
use memory_manager::memory::mapping::Installed;
use memory_manager::memory::memslot::SlotFlags;
use memory_manager::memory::pool::PagePool;
use memory_manager::policy::builtin::Pages4k;

struct Stats {
    p50: f64,
    p99: f64,
    per_sec: f64,
    n: usize,
}

fn stats(mut ns: Vec<u64>) -> Stats {
    ns.sort_unstable();
    let n = ns.len();
    let mean = ns.iter().sum::<u64>() as f64 / n as f64;
    Stats { p50: ns[n / 2] as f64 / 1000.0, p99: ns[(n * 99 / 100).min(n - 1)] as f64 / 1000.0, per_sec: 1e9 / mean, n }
}

fn row(name: &str, s: &Stats) {
    println!("| {name} | {:.2} | {:.2} | {:.0} | {} |", s.p50, s.p99, s.per_sec, s.n);
}

// ---- Across two processes: the real daemon and machine binaries ----

fn cross_process(policy: &str, ram_page_kib: u64, prefault: bool, spin: u32, ops: usize, runs: usize) -> Stats {
    let spin_s = spin.to_string();
    let mut args = vec!["--policy", policy, "--spin-polls", &spin_s, "--log-filter", "warn"];
    if prefault {
        args.push("--prefault");
    }
    let daemon = Daemon::start(&args);
    let mut all = Vec::new();
    for _ in 0..runs {
        let out = Command::new(binary("sim-machine"))
            .arg("--attach-socket")
            .arg(&daemon.socket)
            .args(["--pattern", "sequential", "--ops", &ops.to_string(), "--ram-page-kib", &ram_page_kib.to_string()])
            .args(["--spin-polls", &spin_s, "--latencies"])
            .output()
            .expect("sim-machine");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        all.extend(v["latencies_ns"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()));
    }
    stats(all)
}

// ---- The same pipeline and core in one thread ----

fn in_process(prefault: bool, pages: u64) -> Stats {
    const RAM_PA: u64 = 0x4000_0000;
    const TABLES_PA: u64 = 0x2000_0000;
    let ram = pages * 4096;
    let id = VmId::new(1).unwrap();
    let slot = (RAM_PA, ram, 0, SlotFlags::default());
    let layout = VmLayout::single_region(id, Pa::new(RAM_PA), ram, 4096, &[slot]).unwrap();
    let vmm = AttachedVm::new(layout, PagePool::default());
    if prefault {
        vmm.mapping.populate_all(&vmm.layout).unwrap();
    }
    let table_pages = 2 + 2 + (pages as usize).div_ceil(512) + 8;
    let mut core = HostCore::new(id, 1, Pa::new(TABLES_PA), table_pages, Pa::new(RAM_PA), ram);
    let esr = (0x24u64 << 26) | (1 << 25) | (1 << 24) | (3 << 22) | (1 << 15) | (1 << 6) | 0b111;
    let mut lat = Vec::with_capacity(pages as usize);
    for p in 0..pages {
        let ipa = RAM_PA + p * 4096;
        let t = Instant::now();
        let rec: FaultRecord = core.vm.take_fault(0, esr, ipa, (ipa >> 12) << 4, 0, |_| None).unwrap();
        let Decision::Map(plan) = handle_fault(vmm.view(), &Pages4k, &rec, &mut Trace::start()).unwrap() else {
            panic!()
        };
        let cmd = plan.command(p, rec.fault_id);
        let ex = core.execute(0, &cmd);
        assert_eq!(ex.result.status, 0);
        vmm.record_installed(
            plan.ipa,
            Installed::new(plan.size, plan.pa, ex.result.inval_seq, plan.pin.into_mapping()),
        );
        lat.push(t.elapsed().as_nanos() as u64);
    }
    stats(lat)
}

// ---- The kernel's own first touch of a memfd page ----

fn first_touch(pages: u64) -> Stats {
    let memfd = MemfdOptions::default().create("touch").unwrap();
    memfd.as_file().set_len(pages * 4096).unwrap();
    let map = MappedRegion::map(memfd.as_file().as_fd(), 0, pages * 4096, 4096).unwrap();
    let mut lat = Vec::with_capacity(pages as usize);
    for p in 0..pages {
        let t = Instant::now();
        map.store(p * 4096, 8, p).unwrap();
        lat.push(t.elapsed().as_nanos() as u64);
    }
    stats(lat)
}

// ---- userfaultfd: memfd, MISSING mode, UFFDIO_COPY ----

fn userfaultfd(pages: u64, spinning: bool) -> Stats {
    // Non-blocking fd: the handler spins on read(); blocking: sleeps in it.
    let arena = uffd::Arena::new(pages, spinning);
    let src = Box::new(Page([7; 4096]));
    let mut lat = Vec::with_capacity(pages as usize);
    std::thread::scope(|s| {
        let (arena, src) = (&arena, &src);
        s.spawn(move || arena.serve(src));
        for p in 0..pages {
            let t = Instant::now();
            arena.map.store(p * 4096 + 8, 8, p).unwrap();
            lat.push(t.elapsed().as_nanos() as u64);
        }
        arena.end();
    });
    stats(lat)
}

fn main() {
    // Build the release binaries before timing anything.
    let _ = binary("memory-manager");
    println!("| path | median us | p99 us | faults/s | faults |");
    println!("| --- | --- | --- | --- | --- |");
    // 160k sequential ops 1 KiB apart: 40k distinct 4 KiB pages per run.
    row("Faultline 4 KiB, populated, spinning (2 processes)", &cross_process("4k", 4, true, 20_000, 160_000, 3));
    row("Faultline 4 KiB, populated, sleeping doorbell", &cross_process("4k", 4, true, 0, 160_000, 1));
    row("Faultline 4 KiB, fresh backing, spinning", &cross_process("4k", 4, false, 20_000, 160_000, 3));
    row("Faultline 4 KiB, fresh backing, sleeping doorbell", &cross_process("4k", 4, false, 0, 160_000, 1));
    row("Faultline 2 MiB, populated, spinning", &cross_process("default", 2048, true, 20_000, 230_000, 5));
    row("Faultline 2 MiB, populated, sleeping doorbell", &cross_process("default", 2048, true, 0, 230_000, 5));
    row("Faultline 2 MiB, fresh backing, spinning", &cross_process("default", 2048, false, 20_000, 230_000, 3));
    row("pipeline + core in one thread, populated (lower bound)", &in_process(true, 40_000));
    row("pipeline + core in one thread, fresh backing", &in_process(false, 40_000));
    row("kernel first touch of a memfd page", &first_touch(40_000));
    row("userfaultfd MISSING + UFFDIO_COPY, handler spinning", &userfaultfd(40_000, true));
    row("userfaultfd MISSING + UFFDIO_COPY, handler blocking", &userfaultfd(20_000, false));
}
