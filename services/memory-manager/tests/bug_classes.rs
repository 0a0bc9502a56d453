//! The bug classes of KVM's user_mem_abort() history, each shown impossible:
//! pins leaked on early error returns, and a map racing an invalidation that
//! leaves the guest mapped to memory that was taken away. (The VMA used after
//! its lock was dropped is `tests/compile_fail.rs`.)

use std::sync::{Barrier, Mutex};

use hyp_core::addr::{Ipa, Pa};
use hyp_core::ownership::VmId;
use hyp_core::reject::Reject;
use hyp_core::ring::abi::{kind, CommandRecord, FaultRecord};
use hyp_core::stage2::Walk;
use hyp_core::testing::HostCore;
use hyp_core::vm::{map_outcome, Completion};
use memory_manager::fault::error::PipelineError;
use memory_manager::fault::failpoint::{FailAt, Failpoint};
use memory_manager::fault::pipeline::{handle_fault, handle_fault_with};
use memory_manager::fault::plan::Decision;
use memory_manager::fault::trace::Trace;
use memory_manager::link::vm::AttachedVm;
use memory_manager::memory::layout::VmLayout;
use memory_manager::memory::mapping::Installed;
use memory_manager::memory::memslot::SlotFlags;
use memory_manager::memory::pool::PagePool;
use memory_manager::policy::builtin::KvmDefault;

const RAM_PA: u64 = 0x4000_0000;
const RAM_GPA: u64 = 0x4000_0000;
const RAM: u64 = 4 << 20;
// Write translation fault at level 3 with a valid syndrome (EC 0x24, IL, ISV,
// SAS=dword, SF, WnR, DFSC 0b000111).
const ESR_WRITE_L3: u64 = (0x24 << 26) | (1 << 25) | (1 << 24) | (3 << 22) | (1 << 15) | (1 << 6) | 0b111;

fn hpfar(ipa: u64) -> u64 {
    (ipa >> 12) << 4
}

/// A VM with 4 MiB of RAM in one memfd region and one memslot.
fn vm_memory(page_size: u64) -> AttachedVm {
    let slot = (RAM_GPA, RAM, 0, SlotFlags::default());
    let layout = VmLayout::single_region(VmId::new(1).unwrap(), Pa::new(RAM_PA), RAM, page_size, &[slot]).unwrap();
    AttachedVm::new(layout, PagePool::default())
}

fn fault_record(ipa: u64, fault_id: u64, seq: u64) -> FaultRecord {
    FaultRecord {
        kind: kind::FAULT,
        vcpu: 0,
        fault_id,
        esr: ESR_WRITE_L3,
        far: ipa,
        hpfar: hpfar(ipa),
        ipa,
        inval_seq: seq,
        timestamp_ns: 0,
    }
}

#[test]
fn an_error_after_pinning_at_any_later_stage_leaves_no_page_pinned() {
    for page_size in [4096, 2 << 20] {
        let vm = vm_memory(page_size);
        let rec = fault_record(RAM_GPA + 0x3000, 1, 0);
        for stage in [Failpoint::Populate, Failpoint::Permissions, Failpoint::Command] {
            let r = handle_fault_with(vm.view(), &KvmDefault, &rec, &mut Trace::start(), &FailAt(stage));
            assert!(matches!(r, Err(PipelineError::Injected(s)) if s == stage), "{r:?}");
            assert_eq!(vm.mapping.pins().total(), 0, "pin leaked after an error at {stage:?}");
        }
        // Without an injected error the plan holds the pin, and dropping an
        // unanswered plan releases it.
        let Decision::Map(plan) = handle_fault(vm.view(), &KvmDefault, &rec, &mut Trace::start()).unwrap() else {
            panic!("expected a map");
        };
        // One count per backing page: 1 for a 4 KiB page or a 2 MiB huge page.
        assert_eq!(vm.mapping.pins().total(), plan.size.bytes() / page_size);
        assert_eq!(plan.size.bytes(), page_size);
        drop(plan);
        assert_eq!(vm.mapping.pins().total(), 0);
    }
}

const TABLES_PA: u64 = 0x2000_0000;
const TABLE_PAGES: usize = 64;

/// hyp-core in this process, over heap table memory, with the RAM donated.
fn core() -> HostCore {
    HostCore::new(VmId::new(1).unwrap(), 2, Pa::new(TABLES_PA), TABLE_PAGES, Pa::new(RAM_PA), RAM)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Order {
    /// The daemon samples, the unmap runs, then the map arrives: stale.
    UnmapBetweenSampleAndMap,
    /// The map is installed, then unmapped.
    UnmapAfterMap,
    /// The unmap runs before the fault is sampled: the new map stands.
    UnmapBeforeSample,
    /// No ordering: whatever the scheduler does.
    Free,
}

struct Outcome {
    sampled_seq: u64,
    stale: bool,
    completion: Option<Completion>,
    unmap_seq_after: u64,
}

fn race(core: &Mutex<HostCore>, vm: &AttachedVm, order: Order, ipa: u64, fault_id_hint: u64) -> Outcome {
    let _ = fault_id_hint;
    let sampled = Barrier::new(2);
    let unmapped = Barrier::new(2);
    let mapped = Barrier::new(2);
    let sync = |b: &Barrier, needed: bool| {
        if needed {
            b.wait();
        }
    };
    std::thread::scope(|s| {
        let mapper = s.spawn(|| {
            sync(&unmapped, order == Order::UnmapBeforeSample);
            let rec = {
                let mut c = core.lock().unwrap();
                c.vm.take_fault(0, ESR_WRITE_L3, ipa, hpfar(ipa), 0, |_| None).unwrap()
            };
            vm.mapping.note_seq(rec.inval_seq);
            let Decision::Map(plan) = handle_fault(vm.view(), &KvmDefault, &rec, &mut Trace::start()).unwrap() else {
                panic!("map expected")
            };
            let sampled_seq = plan.seq;
            sync(&sampled, order == Order::UnmapBetweenSampleAndMap);
            sync(&unmapped, order == Order::UnmapBetweenSampleAndMap);
            let cmd = plan.command(1, rec.fault_id);
            let ex = core.lock().unwrap().execute(0, &cmd);
            sync(&mapped, order == Order::UnmapAfterMap);
            let stale = ex.rejected() == Some(Reject::StaleSequence);
            if ex.result.status == 0 {
                assert_eq!(ex.result.value, map_outcome::INSTALLED);
                let installed = Installed::new(plan.size, plan.pa, ex.result.inval_seq, plan.pin.into_mapping());
                vm.record_installed(plan.ipa, installed);
            } else {
                assert!(stale, "unexpected rejection {:?}", ex.rejected());
            }
            (sampled_seq, stale, ex.completion)
        });
        let unmapper = s.spawn(|| {
            sync(&sampled, order == Order::UnmapBetweenSampleAndMap);
            sync(&mapped, order == Order::UnmapAfterMap);
            let cmd = CommandRecord { kind: kind::UNMAP, ipa: ipa & !0xfff, size: 4096, ..Default::default() };
            let in_flight = vm.mapping.unmap_in_flight();
            let ex = core.lock().unwrap().execute(1, &cmd);
            assert_eq!(ex.result.status, 0);
            // The memory is now taken away: the daemon forgets the mapping and
            // its pin (the reclaim would punch the hole here).
            vm.mapping.forget_range(&in_flight, Ipa::new(ipa & !0xfff), 4096, ex.result.inval_seq);
            drop(in_flight);
            sync(&unmapped, matches!(order, Order::UnmapBetweenSampleAndMap | Order::UnmapBeforeSample));
            ex.result.inval_seq
        });
        let (sampled_seq, stale, completion) = mapper.join().unwrap();
        let unmap_seq_after = unmapper.join().unwrap();
        Outcome { sampled_seq, stale, completion, unmap_seq_after }
    })
}

#[test]
fn a_map_racing_an_unmap_never_leaves_the_guest_mapped_to_memory_taken_away() {
    let vm = vm_memory(4096);
    let core = Mutex::new(core());
    let orders = [Order::UnmapBetweenSampleAndMap, Order::UnmapAfterMap, Order::UnmapBeforeSample, Order::Free];
    let mut stale_seen = 0;
    for i in 0..800u64 {
        let order = orders[(i % 4) as usize];
        let ipa = RAM_GPA + (i % 1024) * 4096;
        let o = race(&core, &vm, order, ipa, i);
        let mapped = matches!(core.lock().unwrap().vm.stage2().walk(Ipa::new(ipa)).unwrap(), Walk::Mapped { .. });
        // The invariant: a mapping survives only if it was sampled after the
        // memory was taken away.
        if mapped {
            assert!(o.sampled_seq >= o.unmap_seq_after, "iteration {i} ({order:?}): stale mapping survived");
        }
        // The daemon's books agree with the tables: a pin exists exactly for a live mapping.
        assert_eq!(vm.mapping.pins().count(0, ipa - RAM_GPA), mapped as u32, "iteration {i} ({order:?})");
        match order {
            Order::UnmapBetweenSampleAndMap => {
                assert!(o.stale && !mapped, "iteration {i}");
                // The core completed the fault as a retry: the guest faults again.
                assert_eq!(o.completion, Some(Completion::Resume));
            }
            Order::UnmapAfterMap => assert!(!o.stale && !mapped, "iteration {i}"),
            Order::UnmapBeforeSample => assert!(!o.stale && mapped, "iteration {i}"),
            Order::Free => {}
        }
        stale_seen += o.stale as u32;
        // Clean up for the next use of this page.
        if mapped {
            let cmd = CommandRecord { kind: kind::UNMAP, ipa, size: 4096, ..Default::default() };
            let in_flight = vm.mapping.unmap_in_flight();
            let seq = core.lock().unwrap().execute(1, &cmd).result.inval_seq;
            vm.mapping.forget_range(&in_flight, Ipa::new(ipa), 4096, seq);
        }
    }
    assert!(stale_seen >= 200, "the stale path ran {stale_seen} times");
    assert_eq!(vm.mapping.pins().total(), 0);
}
