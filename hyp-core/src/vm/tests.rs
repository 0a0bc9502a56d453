//! Engine tests: each validation rule meets a hostile command, which is
//! rejected with its reason while the tables stay exactly as they were.

extern crate std;

use std::vec;
use std::vec::Vec;

use super::*;
use crate::ring::{OwnedRing, OWNED_RING_ENTRIES};
use crate::testing::{CoreSnapshot, HostMemory, RecordingTlb};

const OWN_BASE: u64 = 0x4000_0000;
const VM1_MEM: u64 = 0x4000_0000; // 16 MiB donated to vm1
const VM2_MEM: u64 = 0x4200_0000; // 2 MiB donated to vm2
const HOST_MEM: u64 = 0x4400_0000; // never donated
const TABLES: u64 = 0x5000_0000; // table memory: 64 pages
const TABLE_PAGES: usize = 64;

// ESR for a write translation fault at level 3 with a valid syndrome, and
// HPFAR for IPA 0x8000_1000 (FIPA = IPA >> 12 << 4).
const ESR_WRITE_L3: u64 = (0x24 << 26) | (1 << 25) | (1 << 24) | (3 << 22) | (1 << 6) | 0b000111;
const ESR_READ_L2: u64 = (0x24 << 26) | (1 << 25) | 0b000110;
const ESR_EXEC_L3: u64 = (0x20 << 26) | (1 << 25) | 0b000111;
const ESR_WRITE_PERM_L3: u64 = (0x24 << 26) | (1 << 25) | (1 << 6) | 0b001111;
fn hpfar(ipa: u64) -> u64 {
    (ipa >> 12) << 4
}

struct World {
    mem: HostMemory,
    owners: Vec<u16>,
}

fn world() -> World {
    World {
        mem: HostMemory::new(Pa::new(TABLES), TABLE_PAGES),
        owners: vec![0; ((TABLES - OWN_BASE) / 4096) as usize + TABLE_PAGES],
    }
}

fn vm1() -> VmId {
    VmId::new(1).unwrap()
}

/// Builds vm1 (4 vCPUs, 40-bit IPA) with its memory donated and 16 memcache pages.
fn setup<'m>(w: &'m mut World, geometry: Geometry) -> (Vm<&'m HostMemory>, PageOwnership<'m>) {
    let mut owners = PageOwnership::new(Pa::new(OWN_BASE), &mut w.owners);
    owners.transfer(Pa::new(VM1_MEM), 16 << 20, Owner::Host, Owner::Vm(vm1())).unwrap();
    owners.transfer(Pa::new(VM2_MEM), 2 << 20, Owner::Host, Owner::Vm(VmId::new(2).unwrap())).unwrap();
    let mut vm = Vm::new(vm1(), geometry, Pa::new(TABLES), 4, &w.mem, &mut owners).unwrap();
    let first = TABLES + geometry.root_size();
    let topup = CommandRecord { kind: kind::TOPUP, pa: first, size: 16 * 4096, ..Default::default() };
    let ex = vm.execute(0, &topup.encode(), &mut owners, &mut RecordingTlb::default());
    assert_eq!(ex.result.status, 0, "{ex:?}");
    (vm, owners)
}

fn map_cmd(fault_id: u64, ipa: u64, pa: u64, size: u64, perms: Perms) -> CommandRecord {
    CommandRecord {
        kind: kind::MAP,
        flags: perms.bits(),
        cmd_id: 77,
        fault_id,
        ipa,
        pa,
        size,
        inval_seq: 0,
        reserved: 0,
    }
}

fn snapshot(vm: &Vm<&HostMemory>, owners: &PageOwnership<'_>) -> CoreSnapshot {
    CoreSnapshot::of(vm, owners)
}

#[test]
fn write_fault_mapped_and_completed() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    let f = vm.take_fault(0, ESR_WRITE_L3, 0xffff_0000_1234_5678, hpfar(0x8000_1000), 42, |_| None).unwrap();
    assert_eq!((f.kind, f.vcpu, f.ipa, f.timestamp_ns, f.inval_seq), (kind::FAULT, 0, 0x8000_1678, 42, 0));
    assert_eq!(
        vm.take_fault(0, ESR_WRITE_L3, 0, 0, 0, |_| None),
        Err(FaultError::AlreadyOutstanding { fault_id: f.fault_id })
    );
    let ex = vm.execute(
        0,
        &map_cmd(f.fault_id, 0x8000_1000, VM1_MEM + 0x5000, 4096, Perms::RW).encode(),
        &mut owners,
        &mut tlb,
    );
    assert_eq!(ex.result.status, 0, "{ex:?}");
    assert_eq!((ex.result.cmd_id, ex.result.value, ex.result.detail), (77, map_outcome::INSTALLED, 3));
    assert_eq!(ex.completion, Some(Completion::Resume));
    assert_eq!(vm.outstanding(0), None);
    match vm.stage2().walk(Ipa::new(0x8000_1678)).unwrap() {
        Walk::Mapped { pa, level: 3, descriptor } => {
            assert_eq!(pa, Pa::new(VM1_MEM + 0x5678));
            assert_eq!(descriptor.perms(), Perms::RW);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn permission_fault_at_same_granule_relaxes_in_place() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    let f = vm.take_fault(1, ESR_READ_L2, 0x20_0000, hpfar(0x20_0000), 0, |_| None).unwrap();
    let ex = vm.execute(1, &map_cmd(f.fault_id, 0x20_0000, VM1_MEM, 2 << 20, Perms::R).encode(), &mut owners, &mut tlb);
    assert_eq!(ex.result.status, 0);
    let tables = vm.stage2().table_pages().unwrap();
    // Permission fault: HPFAR not valid, the core resolves FAR itself.
    let f = vm.take_fault(1, ESR_WRITE_PERM_L3, 0x20_3000, 0xdead_0000, 0, |far| Some(Ipa::new(far))).unwrap();
    assert_eq!(f.ipa, 0x20_3000);
    let ex =
        vm.execute(1, &map_cmd(f.fault_id, 0x20_0000, VM1_MEM, 2 << 20, Perms::RW).encode(), &mut owners, &mut tlb);
    assert_eq!((ex.result.status, ex.result.value, ex.result.detail), (0, map_outcome::RELAXED, 2));
    assert_eq!(vm.stage2().table_pages().unwrap(), tables);
    assert!(
        matches!(vm.stage2().walk(Ipa::new(0x20_3000)).unwrap(), Walk::Mapped { level: 2, descriptor, .. } if descriptor.perms() == Perms::RW)
    );
}

/// One hostile command per validation rule.
#[test]
fn hostile_commands_are_rejected_with_their_reason_and_tables_unchanged() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    // Some state to protect: a mapped 2 MiB block at IPA 0 and an outstanding write fault.
    let f0 = vm.take_fault(2, ESR_READ_L2, 0x1000, hpfar(0x1000), 0, |_| None).unwrap();
    assert_eq!(
        vm.execute(2, &map_cmd(f0.fault_id, 0, VM1_MEM + (2 << 20), 2 << 20, Perms::R).encode(), &mut owners, &mut tlb)
            .result
            .status,
        0
    );
    let f = vm.take_fault(0, ESR_WRITE_L3, 0x8000_1000, hpfar(0x8000_1000), 0, |_| None).unwrap();
    let good = map_cmd(f.fault_id, 0x8000_1000, VM1_MEM + 0x5000, 4096, Perms::RW);
    let other_vm_page = VM2_MEM;

    let cases: Vec<(&str, u32, CommandRecord, Reject)> = vec![
        ("unknown kind", 0, CommandRecord { kind: 0x99, ..good }, Reject::Malformed),
        ("reserved word set", 0, CommandRecord { reserved: 1, ..good }, Reject::Malformed),
        ("unknown flag bits", 0, CommandRecord { flags: good.flags | 1 << 9, ..good }, Reject::Malformed),
        ("vcpu out of range", 9, good, Reject::Malformed),
        ("fault id never issued", 0, CommandRecord { fault_id: 999, ..good }, Reject::UnknownFault),
        ("fault outstanding on another vcpu", 1, good, Reject::UnknownFault),
        ("size not a page or block", 0, CommandRecord { size: 0x3000, ..good }, Reject::BadSize),
        (
            "pa misaligned for 2 MiB",
            0,
            CommandRecord { ipa: 0x8000_0000, pa: VM1_MEM + 0x1000, size: 2 << 20, ..good },
            Reject::Misaligned,
        ),
        ("ipa beyond 40 bits", 0, CommandRecord { ipa: 1 << 40, ..good }, Reject::IpaOutOfRange),
        ("pa beyond 40 bits", 0, CommandRecord { pa: 1 << 40, ..good }, Reject::PaOutOfRange),
        ("fault ipa outside mapped range", 0, CommandRecord { ipa: 0x8000_2000, ..good }, Reject::FaultOutsideRange),
        ("no read permission", 0, CommandRecord { flags: Perms::W.bits(), ..good }, Reject::BadPermissions),
        ("write fault mapped read-only", 0, CommandRecord { flags: Perms::R.bits(), ..good }, Reject::BadPermissions),
        (
            "executable device memory",
            0,
            CommandRecord { flags: Perms::RWX.bits() | FLAG_DEVICE, ..good },
            Reject::BadPermissions,
        ),
        ("page of another vm", 0, CommandRecord { pa: other_vm_page, ..good }, Reject::NotOwned),
        ("page of the host", 0, CommandRecord { pa: HOST_MEM, ..good }, Reject::NotOwned),
        ("table page of the core", 0, CommandRecord { pa: TABLES, ..good }, Reject::NotOwned),
        ("untracked memory", 0, CommandRecord { pa: 0x10_0000, ..good }, Reject::NotOwned),
        ("fault already answered", 2, map_cmd(f0.fault_id, 0, VM1_MEM, 2 << 20, Perms::R), Reject::UnknownFault),
        (
            "unmap with a pa",
            0,
            CommandRecord { kind: kind::UNMAP, ipa: 0, size: 4096, pa: 1, ..Default::default() },
            Reject::Malformed,
        ),
        (
            "unmap empty range",
            0,
            CommandRecord { kind: kind::UNMAP, ipa: 0, size: 0, ..Default::default() },
            Reject::BadRange,
        ),
        (
            "unmap unaligned range",
            0,
            CommandRecord { kind: kind::UNMAP, ipa: 0x800, size: 4096, ..Default::default() },
            Reject::BadRange,
        ),
        (
            "unmap cutting a block",
            0,
            CommandRecord { kind: kind::UNMAP, ipa: 0x1000, size: 4096, ..Default::default() },
            Reject::PartialBlock,
        ),
        (
            "unmap beyond ipa space",
            0,
            CommandRecord { kind: kind::UNMAP, ipa: 1 << 40, size: 4096, ..Default::default() },
            Reject::IpaOutOfRange,
        ),
        (
            "write-protect wrapping range",
            0,
            CommandRecord { kind: kind::WRITE_PROTECT, ipa: !0xfff, size: 0x2000, ..Default::default() },
            Reject::BadRange,
        ),
        (
            "complete unknown action",
            0,
            CommandRecord { kind: kind::COMPLETE, fault_id: f.fault_id, flags: 7, ..Default::default() },
            Reject::BadAction,
        ),
        (
            "complete unknown fault",
            0,
            CommandRecord { kind: kind::COMPLETE, fault_id: 12345, ..Default::default() },
            Reject::UnknownFault,
        ),
        (
            "topup of guest pages",
            0,
            CommandRecord { kind: kind::TOPUP, pa: VM1_MEM, size: 4096, ..Default::default() },
            Reject::NotTableMemory,
        ),
        (
            "topup of core-owned pages",
            0,
            CommandRecord { kind: kind::TOPUP, pa: TABLES, size: 4096, ..Default::default() },
            Reject::NotOwned,
        ),
        (
            "topup larger than the memcache",
            0,
            CommandRecord { kind: kind::TOPUP, pa: TABLES, size: 4096 * 4096, ..Default::default() },
            Reject::MemcacheFull,
        ),
        (
            "topup unaligned",
            0,
            CommandRecord { kind: kind::TOPUP, pa: TABLES + 8, size: 4096, ..Default::default() },
            Reject::BadRange,
        ),
    ];
    for (name, vcpu, cmd, want) in cases {
        let before = snapshot(&vm, &owners);
        let ex = vm.execute(vcpu, &cmd.encode(), &mut owners, &mut tlb);
        assert_eq!(ex.rejected(), Some(want), "{name}: {ex:?}");
        assert_eq!(ex.completion, None, "{name}");
        assert_eq!(snapshot(&vm, &owners), before, "{name}: state changed");
    }
    // The good command still works afterwards: nothing was consumed.
    assert_eq!(vm.execute(0, &good.encode(), &mut owners, &mut tlb).result.status, 0);
}

#[test]
fn overlapping_map_is_rejected_and_memcache_low_is_reported() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    let f = vm.take_fault(0, ESR_READ_L2, 0, hpfar(0), 0, |_| None).unwrap();
    vm.execute(0, &map_cmd(f.fault_id, 0, VM1_MEM, 4096, Perms::R).encode(), &mut owners, &mut tlb);
    // A second fault on the same page answered with a different PA.
    let f = vm.take_fault(0, ESR_READ_L2, 0, hpfar(0), 0, |_| None).unwrap();
    let before = snapshot(&vm, &owners);
    let ex = vm.execute(0, &map_cmd(f.fault_id, 0, VM1_MEM + 0x1000, 4096, Perms::R).encode(), &mut owners, &mut tlb);
    assert_eq!(ex.rejected(), Some(Reject::Overlap));
    assert_eq!(snapshot(&vm, &owners), before);

    // An empty memcache: a map needing tables is refused up front.
    let mut w2 = world();
    let mut owners2 = PageOwnership::new(Pa::new(OWN_BASE), &mut w2.owners);
    owners2.transfer(Pa::new(VM1_MEM), 16 << 20, Owner::Host, Owner::Vm(vm1())).unwrap();
    let mut bare = Vm::new(vm1(), Geometry::kvm_default(), Pa::new(TABLES), 1, &w2.mem, &mut owners2).unwrap();
    let f = bare.take_fault(0, ESR_READ_L2, 0, hpfar(0), 0, |_| None).unwrap();
    let ex = bare.execute(0, &map_cmd(f.fault_id, 0, VM1_MEM, 4096, Perms::R).encode(), &mut owners2, &mut tlb);
    assert_eq!((ex.rejected(), ex.result.detail), (Some(Reject::MemcacheLow), 2));
    assert_eq!(bare.stage2().table_pages().unwrap(), 0);
}

#[test]
fn one_gib_block_below_a_level2_root_is_unsupported() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::new(32, 40).unwrap());
    let f = vm.take_fault(0, ESR_READ_L2, 0, hpfar(0), 0, |_| None).unwrap();
    let ex = vm.execute(
        0,
        &map_cmd(f.fault_id, 0, 0, 1 << 30, Perms::R).encode(),
        &mut owners,
        &mut RecordingTlb::default(),
    );
    assert_eq!(ex.rejected(), Some(Reject::SizeUnsupported));
}

#[test]
fn vm_ids_beyond_the_8_bit_vmid_are_refused() {
    let mut w = world();
    let mut owners = PageOwnership::new(Pa::new(OWN_BASE), &mut w.owners);
    let id = VmId::new(256).unwrap();
    let r = Vm::new(id, Geometry::kvm_default(), Pa::new(TABLES), 1, &w.mem, &mut owners);
    assert_eq!(r.err(), Some(VmError::VmidOutOfRange(id)));
    assert_eq!(owners.count(Owner::Hyp), 0);
}

#[test]
fn no_page_is_mapped_into_two_vms() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    let f = vm.take_fault(0, ESR_READ_L2, 0, hpfar(0), 0, |_| None).unwrap();
    assert_eq!(
        vm.execute(0, &map_cmd(f.fault_id, 0, VM1_MEM, 4096, Perms::R).encode(), &mut owners, &mut tlb).result.status,
        0
    );
    // vm2 gets its own tables in a second table window and asks for vm1's page.
    let mem2 = HostMemory::new(Pa::new(TABLES + (TABLE_PAGES as u64) * 4096), 8);
    let vm2_id = VmId::new(2).unwrap();
    let mut storage = vec![0u16; 8];
    let mut own2 = PageOwnership::new(Pa::new(TABLES + (TABLE_PAGES as u64) * 4096), &mut storage);
    let mut vm2 =
        Vm::new(vm2_id, Geometry::kvm_default(), Pa::new(TABLES + (TABLE_PAGES as u64) * 4096), 1, &mem2, &mut own2)
            .unwrap();
    let f2 = vm2.take_fault(0, ESR_READ_L2, 0, hpfar(0), 0, |_| None).unwrap();
    // Ownership is global: vm2's map is checked against the same ownership as vm1's.
    let ex = vm2.execute(0, &map_cmd(f2.fault_id, 0, VM1_MEM, 4096, Perms::R).encode(), &mut owners, &mut tlb);
    assert_eq!((ex.rejected(), ex.result.detail), (Some(Reject::NotOwned), VM1_MEM));
}

#[test]
fn map_with_sequence_sampled_before_an_unmap_is_refused_and_the_fault_retried() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    // The daemon samples sequence 0 for a fault on vCPU 0 ...
    let f = vm.take_fault(0, ESR_WRITE_L3, 0x8000_1000, hpfar(0x8000_1000), 0, |_| None).unwrap();
    let sampled = f.inval_seq;
    // ... meanwhile reclaim unmaps the range on vCPU 1's command ring.
    let unmap = CommandRecord { kind: kind::UNMAP, ipa: 0x8000_0000, size: 2 << 20, ..Default::default() };
    let ex = vm.execute(1, &unmap.encode(), &mut owners, &mut tlb);
    assert_eq!((ex.result.status, ex.result.inval_seq), (0, 1));
    // The late map is refused, the fault completed as a retry, nothing mapped.
    let late = CommandRecord { inval_seq: sampled, ..map_cmd(f.fault_id, 0x8000_1000, VM1_MEM, 4096, Perms::RW) };
    let ex = vm.execute(0, &late.encode(), &mut owners, &mut tlb);
    assert_eq!(
        (ex.rejected(), ex.completion, ex.result.detail),
        (Some(Reject::StaleSequence), Some(Completion::Resume), 1)
    );
    assert_eq!(vm.outstanding(0), None);
    assert_eq!(vm.stage2().walk(Ipa::new(0x8000_1000)).unwrap(), Walk::Unmapped { level: 1 });
    // The refault carries the new sequence and maps.
    let f = vm.take_fault(0, ESR_WRITE_L3, 0x8000_1000, hpfar(0x8000_1000), 0, |_| None).unwrap();
    assert_eq!(f.inval_seq, 1);
    let ok = CommandRecord { inval_seq: 1, ..map_cmd(f.fault_id, 0x8000_1000, VM1_MEM, 4096, Perms::RW) };
    assert_eq!(vm.execute(0, &ok.encode(), &mut owners, &mut tlb).result.status, 0);
}

#[test]
fn unmap_returns_tables_to_memcache_and_bumps_the_sequence() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    let full = vm.memcache_len();
    let f = vm.take_fault(0, ESR_EXEC_L3, 0x1000, hpfar(0x1000), 0, |_| None).unwrap();
    let ex = vm.execute(0, &map_cmd(f.fault_id, 0x1000, VM1_MEM, 4096, Perms::RX).encode(), &mut owners, &mut tlb);
    assert_eq!(ex.result.status, 0);
    assert_eq!(vm.memcache_len(), full - 2);
    let wp = CommandRecord { kind: kind::WRITE_PROTECT, ipa: 0, size: 1 << 30, ..Default::default() };
    assert_eq!(vm.execute(0, &wp.encode(), &mut owners, &mut tlb).result.inval_seq, 1);
    let unmap = CommandRecord { kind: kind::UNMAP, ipa: 0, size: 1 << 30, ..Default::default() };
    let ex = vm.execute(0, &unmap.encode(), &mut owners, &mut tlb);
    assert_eq!((ex.result.status, ex.result.value, ex.result.detail, ex.result.inval_seq), (0, 1, 2, 2));
    assert_eq!(vm.memcache_len(), full);
}

#[test]
fn complete_actions_finish_the_fault() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    for (act, want) in [
        (action::RETRY, Completion::Resume),
        (action::INJECT_ABORT, Completion::InjectAbort),
        (action::EXIT_TO_VMM, Completion::ExitToVmm),
    ] {
        let f = vm.take_fault(3, ESR_WRITE_L3, 0x9000_0000, hpfar(0x9000_0000), 0, |_| None).unwrap();
        let c = CommandRecord { kind: kind::COMPLETE, fault_id: f.fault_id, flags: act, ..Default::default() };
        let ex = vm.execute(3, &c.encode(), &mut owners, &mut tlb);
        assert_eq!((ex.result.status, ex.completion), (0, Some(want)));
        assert_eq!(vm.outstanding(3), None);
    }
}

#[test]
fn serve_answers_every_command_on_the_ring_including_garbage() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    let to_core = OwnedRing::new();
    let to_daemon = OwnedRing::new();
    let mut daemon_out = Producer::attach(to_core.view()).unwrap();
    let mut daemon_in = Consumer::attach(to_daemon.view()).unwrap();
    let mut core_in = Consumer::attach(to_core.view()).unwrap();
    let mut core_out = Producer::attach(to_daemon.view()).unwrap();

    let f = vm.take_fault(0, ESR_READ_L2, 0x3000, hpfar(0x3000), 0, |_| None).unwrap();
    core_out.push(&f.encode()).unwrap();
    let got = FaultRecord::decode(&daemon_in.pop().unwrap().unwrap());
    assert_eq!(got, f);
    // A garbage record (a torn write), then the real answer.
    daemon_out.push(&Record([0xffff_ffff_dead_beef, 1, 2, 3, 4, 5, 6, 7])).unwrap();
    daemon_out.push(&map_cmd(got.fault_id, 0x3000, VM1_MEM, 4096, Perms::R).encode()).unwrap();
    let completion = vm.serve(0, &mut core_in, &mut core_out, &mut owners, &mut tlb).unwrap();
    assert_eq!(completion, Some(Completion::Resume));
    let r1 = ResultRecord::decode(&daemon_in.pop().unwrap().unwrap());
    let r2 = ResultRecord::decode(&daemon_in.pop().unwrap().unwrap());
    assert_eq!((r1.status, r1.cmd_id), (Reject::Malformed.code(), 1));
    assert_eq!((r2.status, r2.cmd_id, r2.command_kind), (0, 77, kind::MAP));
    // A full result ring: the core leaves commands queued instead of dropping answers.
    for _ in 0..OWNED_RING_ENTRIES {
        core_out.push(&Record::default()).unwrap();
    }
    daemon_out.push(&CommandRecord { kind: kind::COMPLETE, fault_id: 5, ..Default::default() }.encode()).unwrap();
    assert_eq!(vm.serve(0, &mut core_in, &mut core_out, &mut owners, &mut tlb), Ok(None));
    assert_eq!(core_in.len(), Ok(1));
}

fn prefault_cmd(ipa: u64, pa: u64, perms: Perms) -> CommandRecord {
    CommandRecord { kind: kind::PREFAULT, fault_id: 0, ..map_cmd(0, ipa, pa, 4096, perms) }
}

#[test]
fn prefault_maps_next_to_a_fault_without_answering_it() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    let f = vm.take_fault(0, ESR_WRITE_L3, 0x8000_1000, hpfar(0x8000_1000), 0, |_| None).unwrap();
    let ex = vm.execute(0, &prefault_cmd(0x8000_2000, VM1_MEM + 0x2000, Perms::RW).encode(), &mut owners, &mut tlb);
    assert_eq!((ex.result.status, ex.result.value, ex.completion), (0, map_outcome::INSTALLED, None));
    assert_eq!(vm.outstanding(0).map(|o| o.fault_id), Some(f.fault_id), "the fault still waits for its own map");
    assert!(matches!(vm.stage2().walk(Ipa::new(0x8000_2000)).unwrap(), Walk::Mapped { level: 3, .. }));
    // Something already there is left alone, whatever the command asks.
    let before = snapshot(&vm, &owners);
    let again = prefault_cmd(0x8000_2000, VM1_MEM + 0x7000, Perms::R);
    let ex = vm.execute(0, &again.encode(), &mut owners, &mut tlb);
    assert_eq!((ex.result.status, ex.result.value), (0, map_outcome::ALREADY_PRESENT));
    assert_eq!(snapshot(&vm, &owners), before);
}

#[test]
fn hostile_prefaults_are_refused_and_a_stale_one_leaves_the_fault_waiting() {
    let mut w = world();
    let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    let f = vm.take_fault(0, ESR_WRITE_L3, 0x8000_1000, hpfar(0x8000_1000), 0, |_| None).unwrap();
    let before = snapshot(&vm, &owners);
    let cases = [
        (CommandRecord { fault_id: f.fault_id, ..prefault_cmd(0x8000_2000, VM1_MEM, Perms::R) }, Reject::Malformed),
        (prefault_cmd(0x8000_2000, HOST_MEM, Perms::R), Reject::NotOwned),
        (prefault_cmd(0x8000_2000, VM2_MEM, Perms::R), Reject::NotOwned),
        (prefault_cmd(0x8000_2000, VM1_MEM, Perms::W), Reject::BadPermissions),
        (
            CommandRecord { flags: Perms::RX.bits() | FLAG_DEVICE, ..prefault_cmd(0x8000_2000, VM1_MEM, Perms::R) },
            Reject::BadPermissions,
        ),
        (prefault_cmd(0x8000_2100, VM1_MEM, Perms::R), Reject::Misaligned),
        (CommandRecord { size: 8192, ..prefault_cmd(0x8000_2000, VM1_MEM, Perms::R) }, Reject::BadSize),
        (CommandRecord { inval_seq: 5, ..prefault_cmd(0x8000_2000, VM1_MEM, Perms::R) }, Reject::StaleSequence),
    ];
    for (cmd, want) in cases {
        let ex = vm.execute(0, &cmd.encode(), &mut owners, &mut tlb);
        assert_eq!((ex.rejected(), ex.completion), (Some(want), None), "{cmd:?}");
    }
    assert_eq!(snapshot(&vm, &owners), before, "nothing changed, the fault still outstanding");
}

/// What a daemon that re-attaches after its predecessor died relies on.
mod reattach {
    use super::*;
    use crate::ring::abi::{LeafRecord, MAX_OWNED_PAGES};
    use crate::ring::{Consumer, Producer};

    fn leaves_cmd(ipa: u64, size: u64) -> CommandRecord {
        CommandRecord { kind: kind::LEAVES, cmd_id: 9, ipa, size, ..Default::default() }
    }

    #[test]
    fn an_unanswered_fault_can_be_posted_again_until_it_is_answered() {
        let mut w = world();
        let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
        assert_eq!(vm.repost(0), None);
        let f = vm.take_fault(0, ESR_WRITE_L3, 0x8000_1000, hpfar(0x8000_1000), 5, |_| None).unwrap();
        assert_eq!(vm.repost(0), Some(f), "the same record, fault id included");
        assert_eq!(vm.repost(1), None);
        let map = map_cmd(f.fault_id, 0x8000_1000, VM1_MEM, 4096, Perms::RW);
        assert_eq!(vm.execute(0, &map.encode(), &mut owners, &mut RecordingTlb::default()).result.status, 0);
        assert_eq!(vm.repost(0), None, "answered: nothing to post again");
    }

    #[test]
    fn replayed_commands_are_idempotent_or_refused_with_a_reason() {
        let mut w = world();
        let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
        let mut tlb = RecordingTlb::default();
        // A MAP equal to the installed leaf answers its fault as already present.
        let f = vm.take_fault(0, ESR_WRITE_L3, 0x8000_1000, hpfar(0x8000_1000), 0, |_| None).unwrap();
        let map = |id| map_cmd(id, 0x8000_1000, VM1_MEM, 4096, Perms::RW).encode();
        assert_eq!(vm.execute(0, &map(f.fault_id), &mut owners, &mut tlb).result.value, map_outcome::INSTALLED);
        let f = vm.take_fault(1, ESR_WRITE_L3, 0x8000_1000, hpfar(0x8000_1000), 0, |_| None).unwrap();
        let ex = vm.execute(1, &map(f.fault_id), &mut owners, &mut tlb);
        assert_eq!((ex.result.status, ex.result.value), (0, map_outcome::ALREADY_PRESENT));
        assert_eq!(ex.completion, Some(Completion::Resume));
        // A relax already done is done again, changing nothing.
        let before = snapshot(&vm, &owners);
        let f = vm.take_fault(2, ESR_WRITE_PERM_L3, 0x8000_1000, 0, 0, |far| Some(Ipa::new(far))).unwrap();
        let ex = vm.execute(2, &map(f.fault_id), &mut owners, &mut tlb);
        assert_eq!((ex.result.status, ex.result.value), (0, map_outcome::RELAXED));
        assert_eq!(snapshot(&vm, &owners), before);
        // A top-up of pages the core already owns is refused with the first
        // such page, and nothing moves.
        let first = TABLES + Geometry::kvm_default().root_size();
        let topup = CommandRecord { kind: kind::TOPUP, pa: first + 4096, size: 2 * 4096, ..Default::default() };
        let ex = vm.execute(0, &topup.encode(), &mut owners, &mut tlb);
        assert_eq!((ex.rejected(), ex.result.detail), (Some(Reject::NotOwned), first + 4096));
        assert_eq!(snapshot(&vm, &owners), before);
    }

    #[test]
    fn owned_reports_the_hypervisors_pages_of_a_range() {
        let mut w = world();
        let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
        let root = Geometry::kvm_default().root_size();
        let owned = |vm: &mut Vm<&HostMemory>, owners: &mut PageOwnership<'_>, pa: u64, pages: u64| {
            let cmd = CommandRecord { kind: kind::OWNED, pa, size: pages * 4096, ..Default::default() };
            vm.execute(0, &cmd.encode(), owners, &mut RecordingTlb::default()).result
        };
        // The root pages and the 16 topped-up pages are the hypervisor's.
        let r = owned(&mut vm, &mut owners, TABLES, MAX_OWNED_PAGES);
        let hyp = root / 4096 + 16;
        assert_eq!((r.status, r.value, r.detail), (0, (1u64 << hyp) - 1, MAX_OWNED_PAGES));
        assert_eq!(owned(&mut vm, &mut owners, VM1_MEM, 8).value, 0, "guest pages are not");
        let too_many = owned(&mut vm, &mut owners, TABLES, MAX_OWNED_PAGES + 1);
        assert_eq!(Reject::from_code(too_many.status), Some(Reject::BadRange));
        let cmd = CommandRecord { kind: kind::OWNED, pa: TABLES, size: 4096, ipa: 1, ..Default::default() };
        let ex = vm.execute(0, &cmd.encode(), &mut owners, &mut RecordingTlb::default());
        assert_eq!(ex.rejected(), Some(Reject::Malformed));
    }

    #[test]
    fn leaves_are_reported_in_ipa_order_a_ring_at_a_time_on_the_control_ring_only() {
        let mut w = world();
        let (mut vm, mut owners) = setup(&mut w, Geometry::kvm_default());
        let mut tlb = RecordingTlb::default();
        // Three 4 KiB pages and a 2 MiB block, mapped through faults on vCPU 0.
        let maps = [
            (0x8000_3000, VM1_MEM + 0x3000, 4096, Perms::R),
            (0x8000_1000, VM1_MEM + 0x1000, 4096, Perms::RW),
            (0x8020_0000, VM1_MEM + (2 << 20), 2 << 20, Perms::RWX),
            (0x8000_2000, VM1_MEM + 0x2000, 4096, Perms::RW),
        ];
        for (ipa, pa, size, perms) in maps {
            let esr = if perms.write() { ESR_WRITE_L3 } else { ESR_READ_L2 };
            let f = vm.take_fault(0, esr, ipa, hpfar(ipa), 0, |_| None).unwrap();
            let ex = vm.execute(0, &map_cmd(f.fault_id, ipa, pa, size, perms).encode(), &mut owners, &mut tlb);
            assert_eq!(ex.result.status, 0, "{ex:?}");
        }
        // The last ring pair is the control ring (vCPU 3 of 4 here).
        let ring = OwnedRing::new();
        let mut results = Producer::attach(ring.view()).unwrap();
        let mut reader = Consumer::attach(ring.view()).unwrap();
        // Room for two leaves and the result: the first two, then the rest.
        for _ in 0..OWNED_RING_ENTRIES - 3 {
            results.push(&Record([0; 8])).unwrap();
        }
        for _ in 0..OWNED_RING_ENTRIES - 3 {
            reader.pop().unwrap();
        }
        let mut got = Vec::new();
        let (start, end) = (0x8000_0000u64, 0x8040_0000u64);
        let mut from = start;
        let mut rounds = 0;
        while from < end {
            let filler = if rounds == 0 { OWNED_RING_ENTRIES - 3 } else { 0 };
            for _ in 0..filler {
                results.push(&Record([0; 8])).unwrap();
            }
            let cmd = leaves_cmd(from, end - from);
            let ex = vm.execute_control(3, &cmd.encode(), &mut owners, &mut tlb, &mut results).unwrap();
            assert_eq!(ex.result.status, 0, "{ex:?}");
            for _ in 0..filler {
                reader.pop().unwrap();
            }
            let mut n = 0;
            while let Some(r) = reader.pop().unwrap() {
                let leaf = LeafRecord::decode(&r);
                assert_eq!((leaf.kind, leaf.cmd_id), (kind::LEAF, 9));
                got.push((leaf.ipa, leaf.pa, leaf.size, leaf.flags, leaf.count));
                n += 1;
            }
            assert_eq!(ex.result.value, n);
            if rounds == 0 {
                assert_eq!(n, 2, "only two fit");
            }
            from = ex.result.detail;
            rounds += 1;
        }
        assert_eq!(rounds, 2);
        // The two RW pages in a row are one run; the read-only page after
        // them and the block are runs of their own.
        let run = |(ipa, pa, size, perms): (u64, u64, u64, Perms), count| (ipa, pa, size, perms.bits(), count);
        assert_eq!(got, [run(maps[1], 2), run(maps[0], 1), run(maps[2], 1)]);
        // On a vCPU's ring, LEAVES is not a command.
        let ex = vm.execute(0, &leaves_cmd(start, 4096).encode(), &mut owners, &mut tlb);
        assert_eq!(ex.rejected(), Some(Reject::Malformed));
        // A malformed range is refused and reports nothing.
        let bad = CommandRecord { pa: 1, ..leaves_cmd(start, 4096) };
        let ex = vm.execute_control(3, &bad.encode(), &mut owners, &mut tlb, &mut results).unwrap();
        assert_eq!(ex.rejected(), Some(Reject::Malformed));
        assert_eq!(reader.pop().unwrap(), None);
    }
}

/// vm1 with a 4 KiB page at 0x8000_1000 and a 2 MiB block at 0x20_0000,
/// both mapped through faults, access flags set.
fn mapped_page_and_block<'m>(w: &'m mut World) -> (Vm<&'m HostMemory>, PageOwnership<'m>) {
    let (mut vm, mut owners) = setup(w, Geometry::kvm_default());
    let mut tlb = RecordingTlb::default();
    for (ipa, pa, size, esr) in
        [(0x8000_1000, VM1_MEM + 0x5000, 4096, ESR_WRITE_L3), (0x20_0000, VM1_MEM, 2 << 20, ESR_READ_L2)]
    {
        let f = vm.take_fault(0, esr, ipa, hpfar(ipa), 0, |_| None).unwrap();
        let ex = vm.execute(0, &map_cmd(f.fault_id, ipa, pa, size, Perms::RW).encode(), &mut owners, &mut tlb);
        assert_eq!(ex.result.status, 0, "{ex:?}");
    }
    (vm, owners)
}

fn age_cmd(ipa: u64, size: u64) -> CommandRecord {
    CommandRecord { kind: kind::AGE, cmd_id: 9, ipa, size, ..Default::default() }
}

fn young(vm: &Vm<&HostMemory>, ipa: u64) -> bool {
    match vm.stage2().walk(Ipa::new(ipa)).unwrap() {
        Walk::Mapped { descriptor, .. } => descriptor.access_flag(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn age_clears_the_access_flag_and_reports_the_pages_that_had_it() {
    let mut w = world();
    let (mut vm, mut owners) = mapped_page_and_block(&mut w);
    let mut tlb = RecordingTlb::default();
    // 64 pages from 0x8000_0000: only page 1 is mapped, and young.
    let ex = vm.execute(0, &age_cmd(0x8000_0000, 64 * 4096).encode(), &mut owners, &mut tlb);
    assert_eq!((ex.result.status, ex.result.value, ex.result.detail), (0, 1 << 1, 1), "{ex:?}");
    assert!(!young(&vm, 0x8000_1000));
    // Aged again: nothing was touched since.
    let ex = vm.execute(0, &age_cmd(0x8000_0000, 64 * 4096).encode(), &mut owners, &mut tlb);
    assert_eq!((ex.result.status, ex.result.value, ex.result.detail), (0, 0, 0));
    // A range over the block's last 8 pages and 8 pages past it: the young
    // block sets every page of it the range covers, and is cleared whole.
    let ex = vm.execute(0, &age_cmd(0x40_0000 - 8 * 4096, 16 * 4096).encode(), &mut owners, &mut tlb);
    assert_eq!((ex.result.status, ex.result.value, ex.result.detail), (0, 0xff, 1));
    assert!(!young(&vm, 0x20_0000));
    // Clearing the flag changes no permission, output or sequence, and
    // invalidates nothing (as KVM's test_clear_young).
    assert_eq!((tlb.invalidated.len(), tlb.syncs), (0, 0), "{:?}", tlb.invalidated);
    match vm.stage2().walk(Ipa::new(0x8000_1000)).unwrap() {
        Walk::Mapped { pa, descriptor, .. } => {
            assert_eq!((pa, descriptor.perms()), (Pa::new(VM1_MEM + 0x5000), Perms::RW))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_access_flag_fault_on_a_mapped_leaf_is_resolved_at_the_core() {
    let mut w = world();
    let (mut vm, mut owners) = mapped_page_and_block(&mut w);
    let mut tlb = RecordingTlb::default();
    vm.execute(0, &age_cmd(0x8000_1000, 4096).encode(), &mut owners, &mut tlb);
    // A read of the aged page: an access-flag fault at level 3 (DFSC 0b001011).
    const ESR_READ_AF_L3: u64 = (0x24 << 26) | (1 << 25) | 0b001011;
    let fault_ids = vm.take_fault(3, ESR_READ_L2, 0x9000_0000, hpfar(0x9000_0000), 0, |_| None).unwrap().fault_id;
    assert_eq!(vm.handle_abort(1, ESR_READ_AF_L3, 0x8000_1010, hpfar(0x8000_1000), 5, |_| None), Ok(Taken::Young));
    assert!(young(&vm, 0x8000_1000));
    assert_eq!((vm.access_flag_faults(), vm.outstanding(1)), (1, None), "no fault for the daemon");
    // Made young by another vCPU meanwhile: resolved as well.
    assert_eq!(vm.handle_abort(2, ESR_READ_AF_L3, 0x8000_1010, hpfar(0x8000_1000), 5, |_| None), Ok(Taken::Young));
    // On nothing mapped (an unmap raced it): the daemon's.
    match vm.handle_abort(1, ESR_READ_AF_L3, 0x8000_7000, hpfar(0x8000_7000), 6, |_| None) {
        Ok(Taken::Fault(f)) => assert_eq!((f.ipa, f.fault_id), (0x8000_7000, fault_ids + 1)),
        other => panic!("{other:?}"),
    }
    // Any other fault is the daemon's, as take_fault records it.
    match vm.handle_abort(2, ESR_WRITE_L3, 0x8000_2000, hpfar(0x8000_2000), 7, |_| None) {
        Ok(Taken::Fault(f)) => assert_eq!(vm.outstanding(2).map(|o| o.fault_id), Some(f.fault_id)),
        other => panic!("{other:?}"),
    }
    // A vCPU with a fault outstanding takes no other; a bad vCPU is refused.
    assert!(matches!(
        vm.handle_abort(1, ESR_READ_AF_L3, 0, hpfar(0x8000_1000), 0, |_| None),
        Err(FaultError::AlreadyOutstanding { .. })
    ));
    assert_eq!(vm.handle_abort(9, ESR_READ_AF_L3, 0, 0, 0, |_| None), Err(FaultError::BadVcpu(9)));
}

#[test]
fn hostile_age_commands_are_refused_and_change_nothing() {
    let mut w = world();
    let (mut vm, mut owners) = mapped_page_and_block(&mut w);
    let mut tlb = RecordingTlb::default();
    let before = snapshot(&vm, &owners);
    let young_before = (young(&vm, 0x8000_1000), young(&vm, 0x20_0000));
    let bad = [
        (CommandRecord { flags: 1, ..age_cmd(0x8000_1000, 4096) }, Reject::Malformed),
        (CommandRecord { fault_id: 3, ..age_cmd(0x8000_1000, 4096) }, Reject::Malformed),
        (CommandRecord { pa: 0x1000, ..age_cmd(0x8000_1000, 4096) }, Reject::Malformed),
        (CommandRecord { inval_seq: 1, ..age_cmd(0x8000_1000, 4096) }, Reject::Malformed),
        (CommandRecord { reserved: 1, ..age_cmd(0x8000_1000, 4096) }, Reject::Malformed),
        (age_cmd(0x8000_1000, 0), Reject::BadRange),
        (age_cmd(0x8000_1000, 65 * 4096), Reject::BadRange),
        (age_cmd(0x8000_1800, 4096), Reject::BadRange),
        (age_cmd(0x8000_1000, 100), Reject::BadRange),
        (age_cmd(!0xfff, 2 * 4096), Reject::BadRange),
        (age_cmd(1 << 40, 4096), Reject::IpaOutOfRange),
    ];
    for (cmd, reason) in bad {
        let ex = vm.execute(0, &cmd.encode(), &mut owners, &mut tlb);
        assert_eq!(ex.result.status, reason.code(), "{cmd:?}: {ex:?}");
        assert_eq!(ex.completion, None);
    }
    assert_eq!(snapshot(&vm, &owners), before);
    assert_eq!((young(&vm, 0x8000_1000), young(&vm, 0x20_0000)), young_before, "no flag cleared");
}
