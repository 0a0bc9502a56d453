//! The pipeline's stages, each a function that takes what it needs and
//! returns what the next needs (KVM's `user_mem_abort()` and its helpers).

use hyp_core::abort::{Abort, AbortKind, Access, FaultStatus};
use hyp_core::addr::{Ipa, Pa};
use hyp_core::stage2::{MapSize, Perms};

use super::choices::{Decisions, FaultContext};
use super::context::{ArchFault, VmView};
use super::error::PipelineError;
use super::failpoint::{Failpoint, Failpoints};
use super::plan::{Decision, Exit, InjectReason, MmioAccess};
use crate::memory::addr::Hva;
use crate::memory::layout::VmLayout;
use crate::memory::mapping::MappingState;
use crate::memory::memslot::{Memslot, Memslots};
use crate::memory::pin::PinGuard;
use crate::memory::vma::{Vma, Vmas};

/// KVM's `kvm_is_write_fault()`: on a stage-1 walk only a permission fault
/// is a write, fetches never are, data aborts per WnR.
pub fn is_write(abort: &Abort) -> bool {
    // As KVM's kvm_is_write_fault(): on a stage-1 walk only a permission
    // fault is a write (the walker setting AF/DB). A translation fault on a
    // walk is a read, so page tables in a read-only memslot work: mapped
    // read-only first, the flag update faults again.
    abort.stage2_access() == Access::Write
}

/// Fault statuses that no mapping can resolve.
pub fn unresolvable(abort: &Abort) -> Option<InjectReason> {
    match abort.status {
        FaultStatus::Translation { .. } | FaultStatus::AccessFlag { .. } | FaultStatus::Permission { .. } => None,
        FaultStatus::SyncExternal
        | FaultStatus::SyncExternalOnWalk { .. }
        | FaultStatus::SyncParity
        | FaultStatus::SyncParityOnWalk { .. } => Some(InjectReason::External),
        other => Some(InjectReason::Unsupported(other)),
    }
}

/// Stage 1: the memslot, or what to do when there is none to map from:
/// outside every memslot, or a write to a read-only one (KVM's
/// `kvm_handle_guest_abort()`).
pub fn lookup_memslot<'s>(slots: &'s Memslots, abort: &Abort, ipa: Ipa) -> Result<&'s Memslot, Decision> {
    match slots.lookup(ipa) {
        Some(slot) if !(is_write(abort) && slot.read_only) => Ok(slot),
        _ if abort.kind == AbortKind::Instruction => Err(Decision::Inject(InjectReason::FetchOutsideMemory)),
        _ if abort.s1ptw => Err(Decision::Inject(InjectReason::WalkOutsideMemory)),
        _ => Err(Decision::Exit(vmm_exit(abort, ipa))),
    }
}

/// The exit for an access no memory can serve: the access to emulate when
/// the syndrome describes it, a cache maintenance to skip, or an exit
/// without a syndrome (KVM_RUN's ENOSYS).
pub fn vmm_exit(abort: &Abort, ipa: Ipa) -> Exit {
    let write = is_write(abort);
    if abort.cache_maintenance {
        return Exit::CacheMaintenance { ipa };
    }
    match abort.syndrome {
        Some(s) => Exit::Mmio(MmioAccess { ipa, size: s.size, register: s.register, write }),
        None => Exit::NoSyndrome { ipa, write },
    }
}

/// Stage 2: a copy of the VMA backing `hva`, taken inside the lock's scope.
pub fn vma_snapshot(vmas: &Vmas, hva: Hva) -> Result<Vma, PipelineError> {
    vmas.snapshot(hva).ok_or(PipelineError::NoVma(hva))
}

/// The exit a fault takes because of what backs it: a fetch from device
/// memory (never mapped executable, so mapping would only fault again;
/// KVM_RUN fails with ENOEXEC), or a write to a mapping the guest may not
/// write (KVM hands it to the VMM).
pub fn backing_exit(abort: &Abort, ipa: Ipa, vma: &Vma) -> Option<Exit> {
    if vma.device && abort.stage2_access() == Access::Execute {
        return Some(Exit::ExecOnDevice { ipa });
    }
    (is_write(abort) && !vma.writable).then(|| vmm_exit(abort, ipa))
}

/// KVM's `fault_supports_stage2_huge_mapping()`: GPA and HVA congruent
/// modulo the block, and the whole block inside the memslot and the VMA.
pub fn supports_block(slot: &Memslot, vma: &Vma, hva: Hva, size: MapSize) -> bool {
    let b = size.bytes();
    if slot.gpa.raw() % b != slot.hva.raw() % b {
        return false;
    }
    let start = slot.hva.raw().next_multiple_of(b);
    let end = (slot.hva.raw() + slot.size) & !(b - 1);
    let block = hva.raw() & !(b - 1);
    hva.raw() >= start && hva.raw() < end && vma.contains_range(Hva::new(block), b)
}

/// Stage 3a: the largest mapping size correctness allows (a permission
/// fault: the faulting leaf's).
pub fn allowed_size(abort: &Abort, slot: &Memslot, vma: &Vma, hva: Hva) -> MapSize {
    if let FaultStatus::Permission { level } = abort.status {
        // Relax at the granule of the leaf that faulted.
        return u8::try_from(level).ok().and_then(MapSize::from_level).unwrap_or(MapSize::Page4K);
    }
    let mut allowed = MapSize::Page4K;
    if !slot.dirty_log {
        for size in [MapSize::Block1G, MapSize::Block2M] {
            if size.bytes() <= vma.page_size && supports_block(slot, vma, hva, size) {
                allowed = size;
                break;
            }
        }
    }
    allowed
}

/// What the policy is asked about `fault`, mapped at most `allowed`.
pub fn policy_question(
    layout: &VmLayout,
    fault: &ArchFault,
    slot: &Memslot,
    vma: &Vma,
    allowed: MapSize,
) -> FaultContext {
    FaultContext {
        vm_id: layout.id.raw(),
        vcpu: fault.vcpu,
        fault_id: fault.fault_id,
        ipa: fault.ipa.raw(),
        memslot: slot.id,
        access: fault.abort.stage2_access(),
        allowed,
        may_write: vma.writable && !slot.read_only && !slot.dirty_log,
        may_exec: !vma.device,
    }
}

/// Stage 3b: `allowed` stepped down where a block would cover pages an
/// earlier policy mapped smaller (the core refuses a block over a table;
/// map at the size already there instead). A permission fault relaxes the
/// leaf that is there and never steps down.
pub fn step_down(abort: &Abort, ipa: Ipa, mut allowed: MapSize, mapping: &MappingState) -> MapSize {
    if abort.status.is_permission() {
        return allowed;
    }
    while allowed != MapSize::Page4K && mapping.has_smaller_mapping(ipa.align_down(allowed.bytes()), allowed.bytes()) {
        allowed = if allowed == MapSize::Block1G { MapSize::Block2M } else { MapSize::Page4K };
    }
    allowed
}

/// Stage 3c: the size to map: the policy's choice within what is allowed;
/// a permission fault relaxes the leaf that faulted, at its own size.
pub fn map_size(abort: &Abort, allowed: MapSize, decisions: &Decisions) -> MapSize {
    if abort.status.is_permission() {
        allowed
    } else {
        allowed.min(decisions.max_size)
    }
}

/// Pages pinned for a mapping, and where it goes.
#[derive(Debug)]
pub struct Pinned {
    /// The pin: every later failure drops it.
    pub guard: PinGuard,
    /// First IPA mapped (aligned to the size).
    pub ipa: Ipa,
    /// First PA mapped.
    pub pa: Pa,
    /// The backing had a hole the pin filled.
    pub filled_hole: bool,
}

/// Stage 5: pin the pages a mapping of `size` around `ipa` covers,
/// faulting fresh backing in (if the host's memory pressure admits it).
pub fn pin(
    vm: VmView<'_>,
    slot: &Memslot,
    vma: &Vma,
    ipa: Ipa,
    size: MapSize,
    fail: &impl Failpoints,
) -> Result<Pinned, PipelineError> {
    let map_ipa = ipa.align_down(size.bytes());
    let hva = slot.hva_of(map_ipa);
    let outside = || PipelineError::OutsideRegion(vma.region);
    let region = vm.layout.regions.get(vma.region).ok_or_else(outside)?;
    let offset = hva.checked_offset_from(region.base()).ok_or_else(outside)?;
    let pa = region.pa_at(offset).ok_or_else(outside)?;
    let guard = vm.mapping.pin(vma.region, offset, size.bytes())?;
    fail.check(Failpoint::Populate)?;
    let mut filled_hole = false;
    if !region.device && !vm.mapping.is_populated(vma.region, offset, size.bytes()) {
        // Counted at the mapping's size: at most what the fill allocates.
        vm.host.admit(size.bytes())?;
        filled_hole = region.fill(offset, size.bytes())?;
        vm.mapping.mark_populated(vma.region, offset, size.bytes());
    }
    Ok(Pinned { guard, ipa: map_ipa, pa, filled_hole })
}

/// Stage 6: permissions. Read always; write if the VMA is writable, the
/// slot is not read-only and (a write fault, or not logging and the policy
/// maps writable on read); exec on a fetch or if the policy says so, never
/// on device memory.
pub fn permissions(abort: &Abort, slot: &Memslot, vma: &Vma, decisions: &Decisions) -> Perms {
    // A fetch's table walk reads the tables: no X for it (KVM's
    // kvm_vcpu_trap_is_exec_fault()).
    perms_for(abort.stage2_access(), slot, vma, decisions)
}

/// [`permissions`] for an access to stage 2 (a fault-around page's: a read).
pub fn perms_for(access: Access, slot: &Memslot, vma: &Vma, decisions: &Decisions) -> Perms {
    let mut perms = Perms::R;
    let write = access == Access::Write;
    if vma.writable && !slot.read_only && (write || (!slot.dirty_log && decisions.writable_on_read)) {
        perms = perms.union(Perms::W);
    }
    if !vma.device && (access == Access::Execute || decisions.eager_exec) {
        perms = perms.union(Perms::X);
    }
    perms
}
