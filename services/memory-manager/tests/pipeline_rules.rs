//! The pipeline's decisions, stage by stage, against KVM's rules: mapping
//! size (VMA page size, GPA/HVA congruence, memslot bounds, dirty logging,
//! permission-fault granule), permissions, and what leaves for the VMM.

use hyp_core::addr::{Ipa, Pa};
use hyp_core::ownership::VmId;
use hyp_core::ring::abi::{kind, FaultRecord, NO_IPA};
use hyp_core::stage2::{MapSize, Perms};
use memory_manager::fault::choices::Policy;
use memory_manager::fault::pipeline::handle_fault;
use memory_manager::fault::plan::{Decision, Exit, InjectReason, MapPlan, MmioAccess};
use memory_manager::fault::trace::Trace;
use memory_manager::link::vm::AttachedVm;
use memory_manager::memory::layout::VmLayout;
use memory_manager::memory::memslot::SlotFlags;
use memory_manager::memory::pool::PagePool;
use memory_manager::policy::builtin::{KvmDefault, Pages4k};

const RAM_PA: u64 = 0x4000_0000;
const RAM: u64 = 16 << 20;

/// One 16 MiB region backed by 2 MiB pages; memslots as given `(gpa, size,
/// region offset, flags)`.
fn vm(page_size: u64, slots: &[(u64, u64, u64, SlotFlags)]) -> AttachedVm {
    let layout = VmLayout::single_region(VmId::new(1).unwrap(), Pa::new(RAM_PA), RAM, page_size, slots).unwrap();
    AttachedVm::new(layout, PagePool::default())
}

// Hand-encoded syndromes (Arm ARM D24.2.45): EC, IL, ISV, SAS, SRT, WnR, xFSC.
const READ_L3: u64 = (0x24 << 26) | (1 << 25) | (1 << 24) | (2 << 22) | (4 << 16) | 0b00_0111;
const WRITE_L3: u64 = READ_L3 | (1 << 6);
const WRITE_NO_ISV_L3: u64 = (0x24 << 26) | (1 << 25) | (1 << 6) | 0b00_0111;
const WRITE_PERM_L3: u64 = (0x24 << 26) | (1 << 25) | (1 << 24) | (2 << 22) | (1 << 6) | 0b00_1111;
const WRITE_PERM_L2: u64 = (0x24 << 26) | (1 << 25) | (1 << 24) | (2 << 22) | (1 << 6) | 0b00_1110;
const FETCH_L3: u64 = (0x20 << 26) | (1 << 25) | 0b00_0111;
const S1PTW_READ_L3: u64 = (0x24 << 26) | (1 << 25) | (1 << 7) | 0b00_0111;
const S1PTW_PERM_L3: u64 = (0x24 << 26) | (1 << 25) | (1 << 7) | 0b00_1111;
const CM_L3: u64 = (0x24 << 26) | (1 << 25) | (1 << 8) | (1 << 6) | 0b00_0111;
const SEA: u64 = (0x24 << 26) | (1 << 25) | 0b01_0000;

fn fault(esr: u64, ipa: u64) -> FaultRecord {
    FaultRecord {
        kind: kind::FAULT,
        vcpu: 0,
        fault_id: 1,
        esr,
        far: ipa,
        hpfar: (ipa >> 12) << 4,
        ipa,
        inval_seq: 0,
        timestamp_ns: 0,
    }
}

fn decide(vm: &AttachedVm, policy: &dyn Policy, esr: u64, ipa: u64) -> Decision {
    handle_fault(vm.view(), policy, &fault(esr, ipa), &mut Trace::start()).unwrap()
}

fn plan(d: Decision) -> MapPlan {
    match d {
        Decision::Map(p) => p,
        other => panic!("expected a map, got {other:?}"),
    }
}

const PLAIN: SlotFlags = SlotFlags { read_only: false, dirty_log: false };

#[test]
fn aligned_slot_in_a_2mib_region_maps_blocks_and_writable_on_read() {
    let vm = vm(2 << 20, &[(0x8000_0000, RAM, 0, PLAIN)]);
    let p = plan(decide(&vm, &KvmDefault, READ_L3, 0x8040_1234));
    assert_eq!((p.size, p.ipa, p.pa), (MapSize::Block2M, Ipa::new(0x8040_0000), Pa::new(RAM_PA + (4 << 20))));
    assert_eq!(p.perms, Perms::RW, "KVM maps writable on a read fault when not logging");
    // The 4 KiB policy clamps the size, never the permissions.
    let p = plan(decide(&vm, &Pages4k, READ_L3, 0x8040_1234));
    assert_eq!((p.size, p.perms), (MapSize::Page4K, Perms::RW));
}

#[test]
fn gpa_not_congruent_with_hva_forces_4k() {
    // GPA 0x8000_1000 backed from region offset 0: GPA and HVA differ mod 2 MiB.
    let vm = vm(2 << 20, &[(0x8000_1000, 8 << 20, 0, PLAIN)]);
    let p = plan(decide(&vm, &KvmDefault, READ_L3, 0x8040_0000));
    assert_eq!(p.size, MapSize::Page4K);
}

#[test]
fn a_block_must_lie_inside_the_memslot() {
    // Slot of 3 MiB: the first 2 MiB block fits, the second block would run past the end.
    let vm = vm(2 << 20, &[(0x8000_0000, 3 << 20, 0, PLAIN)]);
    assert_eq!(plan(decide(&vm, &KvmDefault, READ_L3, 0x8000_0000)).size, MapSize::Block2M);
    assert_eq!(plan(decide(&vm, &KvmDefault, READ_L3, 0x8020_0000)).size, MapSize::Page4K);
}

#[test]
fn a_4k_region_never_maps_blocks() {
    let vm = vm(4096, &[(0x8000_0000, RAM, 0, PLAIN)]);
    assert_eq!(plan(decide(&vm, &KvmDefault, READ_L3, 0x8000_0000)).size, MapSize::Page4K);
}

#[test]
fn dirty_logging_maps_4k_read_only_on_read_and_marks_writes() {
    let logged = SlotFlags { read_only: false, dirty_log: true };
    let vm = vm(2 << 20, &[(0x8000_0000, RAM, 0, logged)]);
    let p = plan(decide(&vm, &KvmDefault, READ_L3, 0x8000_3000));
    assert_eq!((p.size, p.perms, p.marks_dirty), (MapSize::Page4K, Perms::R, false));
    let p = plan(decide(&vm, &KvmDefault, WRITE_L3, 0x8000_3000));
    assert_eq!((p.size, p.perms, p.marks_dirty), (MapSize::Page4K, Perms::RW, true));
    // A write permission fault on the read-only page is relaxed at its granule.
    let p = plan(decide(&vm, &KvmDefault, WRITE_PERM_L3, 0x8000_3000));
    assert!(p.permission_fault);
    assert_eq!((p.size, p.perms, p.marks_dirty), (MapSize::Page4K, Perms::RW, true));
    let slot = vm.layout.memslots.lookup(Ipa::new(0x8000_3000)).unwrap();
    let dirty = vm.mapping.dirty_log(slot);
    assert!(!dirty.is_set(slot.page_of(Ipa::new(0x8000_3000))));
    vm.mapping.mark_dirty(slot, p.fault_ipa);
    assert!(dirty.is_set(slot.page_of(Ipa::new(0x8000_3000))) && dirty.count() == 1);
    // A guest page table in the logged slot: the walk's translation fault
    // maps it read-only and clean; the walker's AF update (a permission
    // fault on the walk) is a write that dirties the page-table page.
    let p = plan(decide(&vm, &KvmDefault, S1PTW_READ_L3, 0x8000_5000));
    assert_eq!((p.perms, p.marks_dirty), (Perms::R, false));
    let p = plan(decide(&vm, &KvmDefault, S1PTW_PERM_L3, 0x8000_5000));
    assert_eq!((p.perms, p.marks_dirty, p.permission_fault), (Perms::RW, true, true));
}

#[test]
fn a_permission_fault_maps_at_the_faulting_granule() {
    let vm = vm(2 << 20, &[(0x8000_0000, RAM, 0, PLAIN)]);
    let p = plan(decide(&vm, &KvmDefault, WRITE_PERM_L2, 0x8020_5000));
    assert_eq!((p.size, p.ipa), (MapSize::Block2M, Ipa::new(0x8020_0000)));
}

#[test]
fn exec_only_on_fetch() {
    let vm = vm(4096, &[(0x8000_0000, RAM, 0, PLAIN)]);
    assert_eq!(plan(decide(&vm, &KvmDefault, FETCH_L3, 0x8000_0000)).perms, Perms::RWX);
    assert!(!plan(decide(&vm, &KvmDefault, READ_L3, 0x8000_0000)).perms.exec());
}

/// Device memory is never executable: a fetch from it exits (KVM: KVM_RUN
/// fails with ENOEXEC) instead of being mapped without X and faulting again.
#[test]
fn a_fetch_from_device_memory_exits_instead_of_mapping() {
    use memory_manager::memory::memslot::{Memslot, Memslots};
    use memory_manager::memory::region::{GuestRegion, RegionSpec};
    use memory_manager::memory::vma::Vmas;
    let memfd = memfd::MemfdOptions::default().create("device").unwrap();
    memfd.as_file().set_len(1 << 20).unwrap();
    let spec = RegionSpec {
        index: 0,
        pa_base: Pa::new(0x0900_0000),
        size: 1 << 20,
        page_size: 4096,
        fd_offset: 0,
        writable: true,
        device: true,
    };
    let region = GuestRegion::map(memfd, spec).unwrap();
    let vmas = Vmas::default();
    vmas.insert(region.vma(0));
    let mut memslots = Memslots::default();
    memslots.insert(Memslot::new(0, Ipa::new(0x0900_0000), 1 << 20, region.base(), 0, 0, PLAIN));
    let layout = VmLayout::new(VmId::new(1).unwrap(), 1, memslots, vmas, vec![region]);
    let vm = AttachedVm::new(layout, PagePool::default());
    assert!(matches!(
        decide(&vm, &KvmDefault, FETCH_L3, 0x0900_0000),
        Decision::Exit(Exit::ExecOnDevice { ipa }) if ipa == Ipa::new(0x0900_0000)
    ));
    // Data accesses to it are mapped, device and never executable.
    let p = plan(decide(&vm, &KvmDefault, READ_L3, 0x0900_0000));
    assert!(p.device && !p.perms.exec());
    assert_eq!(vm.mapping.pins().total(), 1, "the fetch pinned nothing; the read pinned its page");
}

#[test]
fn writes_to_read_only_slots_and_holes_exit_to_the_vmm() {
    let ro = SlotFlags { read_only: true, dirty_log: false };
    let vm = vm(4096, &[(0x8000_0000, 4 << 20, 0, ro)]);
    // Read of a read-only slot maps read-only.
    assert_eq!(plan(decide(&vm, &KvmDefault, READ_L3, 0x8000_0000)).perms, Perms::R);
    // Write with a syndrome: an MMIO exit with address, size and register.
    match decide(&vm, &KvmDefault, WRITE_L3, 0x8000_0010) {
        Decision::Exit(Exit::Mmio(MmioAccess { ipa, size, register, write })) => {
            assert_eq!((ipa, size, register, write), (Ipa::new(0x8000_0010), 4, 4, true));
        }
        other => panic!("{other:?}"),
    }
    // Without a syndrome: the distinct no-syndrome exit.
    assert!(matches!(
        decide(&vm, &KvmDefault, WRITE_NO_ISV_L3, 0x8000_0010),
        Decision::Exit(Exit::NoSyndrome { write: true, .. })
    ));
    // Outside every memslot: same rules.
    assert!(matches!(
        decide(&vm, &KvmDefault, READ_L3, 0x1000),
        Decision::Exit(Exit::Mmio(MmioAccess { write: false, .. }))
    ));
    // Cache maintenance on MMIO: skipped by the VMM.
    assert!(matches!(decide(&vm, &KvmDefault, CM_L3, 0x1000), Decision::Exit(Exit::CacheMaintenance { .. })));
    // A fetch or a stage-1 walk outside memory: injected back into the guest.
    assert!(matches!(decide(&vm, &KvmDefault, FETCH_L3, 0x1000), Decision::Inject(InjectReason::FetchOutsideMemory)));
    assert!(matches!(
        decide(&vm, &KvmDefault, S1PTW_READ_L3, 0x1000),
        Decision::Inject(InjectReason::WalkOutsideMemory)
    ));
    // A stage-1 walk into a read-only slot (page tables baked into it): a
    // translation fault on the walk is a read and maps read-only; the
    // permission fault of the walker's AF update is a write: injected, as
    // KVM's kvm_is_write_fault() since Linux 6.2.
    assert_eq!(plan(decide(&vm, &KvmDefault, S1PTW_READ_L3, 0x8000_0000)).perms, Perms::R);
    assert!(matches!(
        decide(&vm, &KvmDefault, S1PTW_PERM_L3, 0x8000_0000),
        Decision::Inject(InjectReason::WalkOutsideMemory)
    ));
}

#[test]
fn unresolvable_faults_are_injected_not_mapped() {
    let vm = vm(4096, &[(0x8000_0000, RAM, 0, PLAIN)]);
    assert!(matches!(decide(&vm, &KvmDefault, SEA, 0x8000_0000), Decision::Inject(InjectReason::External)));
    let mut rec = fault(READ_L3, 0x8000_0000);
    rec.ipa = NO_IPA;
    assert!(matches!(
        handle_fault(vm.view(), &KvmDefault, &rec, &mut Trace::start()).unwrap(),
        Decision::Inject(InjectReason::NoIpa)
    ));
    rec.esr = 0x16 << 26; // an HVC, not an abort
    rec.ipa = 0x8000_0000;
    assert!(matches!(
        handle_fault(vm.view(), &KvmDefault, &rec, &mut Trace::start()).unwrap(),
        Decision::Inject(InjectReason::Undecodable)
    ));
    assert_eq!(vm.mapping.pins().total(), 0);
}
