//! The fault pipeline: KVM's `user_mem_abort()` cut into stages.
//!
//! ```text
//! abort (decoded once, immutable, by reference)
//!   -> memslot lookup (or MMIO exit / injected abort)
//!   -> VMA snapshot (by value, taken inside the lock's scope)
//!   -> mapping size (VMA page size, memslot congruence, logging, policy)
//!   -> invalidation sequence sampled
//!   -> pin (RAII: every later failure releases it)
//!   -> permissions
//!   -> map plan (the pin becomes a mapping only when the core confirms)
//! ```
//!
//! Each stage takes what it needs and returns what the next needs; no stage
//! sees a bag of every variable.

use hyp_core::abort::{Abort, AbortKind, Access, FaultStatus};
use hyp_core::addr::{Ipa, Pa, PAGE_SIZE};
use hyp_core::ring::abi::{FaultRecord, NO_IPA};
use hyp_core::stage2::{MapSize, Perms};

use crate::addr::Hva;
use crate::memslot::{Memslot, Memslots};
use crate::pin::{PinError, PinGuard};
use crate::policy::{Decisions, FaultContext, Policy};
use crate::region::FillError;
use crate::vm::VmMemory;
use crate::vma::{Vma, Vmas};

/// An access the VMM must emulate (valid syndrome).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// Faulting IPA.
    pub ipa: Ipa,
    /// Bytes.
    pub size: u8,
    /// Transfer register (31 = XZR).
    pub register: u8,
    /// A write.
    pub write: bool,
}

/// Why the fault leaves the core for the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Emulate this access.
    Mmio(MmioAccess),
    /// An access outside memory (or a write to a read-only slot) without a
    /// valid syndrome: KVM_RUN fails with ENOSYS in KVM.
    NoSyndrome {
        /// Faulting IPA.
        ipa: Ipa,
        /// A write.
        write: bool,
    },
    /// Cache maintenance on MMIO: the VMM skips the instruction.
    CacheMaintenance {
        /// Faulting IPA.
        ipa: Ipa,
    },
    /// An instruction fetch from device memory: never mapped executable, so
    /// mapping would only fault again; KVM_RUN fails with ENOEXEC in KVM.
    ExecOnDevice {
        /// Faulting IPA.
        ipa: Ipa,
    },
}

/// Why an abort is injected into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectReason {
    /// The syndrome is not a stage-2 abort.
    Undecodable,
    /// The core could not tell the IPA.
    NoIpa,
    /// A synchronous external abort or parity error.
    External,
    /// An instruction fetch outside memory.
    FetchOutsideMemory,
    /// A stage-1 table walk outside memory or into a read-only slot.
    WalkOutsideMemory,
    /// A fault status this pipeline does not resolve.
    Unsupported(FaultStatus),
}

/// A map command to send, holding its pin.
#[derive(Debug)]
pub struct MapPlan {
    /// The faulting IPA.
    pub fault_ipa: Ipa,
    /// First IPA mapped (aligned to `size`).
    pub ipa: Ipa,
    /// First PA mapped.
    pub pa: Pa,
    /// Mapping size.
    pub size: MapSize,
    /// Permissions.
    pub perms: Perms,
    /// Device memory.
    pub device: bool,
    /// Invalidation sequence sampled before pinning.
    pub seq: u64,
    /// The pages' pin.
    pub pin: PinGuard,
    /// A write in a dirty-logged memslot: set the page's bit as the map is sent.
    pub marks_dirty: bool,
    /// The fault is a permission fault (the core relaxes in place).
    pub permission_fault: bool,
    /// Pages after this mapping the policy wants mapped with it (a 4 KiB
    /// mapping of a translation fault only; 0 otherwise).
    pub fault_around: u32,
    /// Permissions for those pages: a read fault's.
    pub around_perms: Perms,
}

/// A page mapped ahead of the guest next to a fault's (fault-around).
#[derive(Debug)]
pub struct AroundPlan {
    /// The page's IPA.
    pub ipa: Ipa,
    /// Its PA.
    pub pa: Pa,
    /// Permissions (a read fault's).
    pub perms: Perms,
    /// Invalidation sequence sampled before pinning.
    pub seq: u64,
    /// The page's pin.
    pub pin: PinGuard,
}

/// What to do with a fault.
#[derive(Debug)]
pub enum Decision {
    /// Map (or relax).
    Map(MapPlan),
    /// Exit to the VMM.
    Exit(Exit),
    /// Inject an abort into the guest.
    Inject(InjectReason),
}

/// A stage after pinning, where tests inject failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Right after the pin is taken (populating the pages).
    Populate,
    /// Computing permissions.
    Permissions,
    /// Building the command.
    Command,
}

/// Failure injection: `Injection::NONE` in production.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injection(pub Option<Stage>);

impl Injection {
    /// No injected failure.
    pub const NONE: Self = Self(None);

    fn check(self, stage: Stage) -> Result<(), PipelineError> {
        if self.0 == Some(stage) {
            return Err(PipelineError::Injected(stage));
        }
        Ok(())
    }
}

/// Why the pipeline failed (the daemon's fault, not the guest's).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// No VMA backs a memslot's address.
    #[error("no VMA backs {0:?}")]
    NoVma(Hva),
    /// The mapping range falls outside the VMA's region.
    #[error("mapping outside region {0}")]
    OutsideRegion(usize),
    /// Pinning failed.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// Faulting in fresh backing failed.
    #[error("populating backing pages failed: {0}")]
    Populate(#[from] FillError),
    /// A test asked for a failure here.
    #[error("injected failure at {0:?}")]
    Injected(Stage),
}

/// KVM's `kvm_is_write_fault()`: on a stage-1 walk only a permission fault
/// is a write, fetches never are, data aborts per WnR.
pub fn is_write(abort: &Abort) -> bool {
    // As KVM's kvm_is_write_fault(): on a stage-1 walk only a permission
    // fault is a write (the walker setting AF/DB). A translation fault on a
    // walk is a read, so page tables in a read-only memslot work: mapped
    // read-only first, the flag update faults again.
    abort.stage2_access() == Access::Write
}

/// Runs the pipeline for one fault record.
pub fn handle_fault(
    vm: &VmMemory,
    policy: &dyn Policy,
    rec: &FaultRecord,
    inject: Injection,
) -> Result<Decision, PipelineError> {
    handle_fault_traced(vm, policy, rec, inject, &mut Trace::start())
}

/// What the pipeline learned about a fault, for its trace event.
#[derive(Clone, Copy, Debug)]
pub struct Trace {
    /// Raw clock reading at the fault's arrival.
    pub start: u64,
    /// The decoded abort, when it decoded.
    pub abort: Option<Abort>,
    /// Memslot index, when the IPA is in one.
    pub memslot: Option<u32>,
    /// Daemon address backing the IPA.
    pub hva: u64,
    /// Backing page size of the VMA.
    pub vma_page_size: u64,
    /// Nanoseconds since `start` at the end of memslot lookup, VMA snapshot,
    /// mapping size, pin and permissions.
    pub stages: [u64; 5],
    /// The backing had a hole the pin stage filled (KVM: the page was
    /// faulted in; page_fault_test counts these as userfaultfd faults).
    pub populated: bool,
    /// The policy in force for the fault (set by the caller).
    pub policy: &'static str,
}

impl Trace {
    /// A trace starting now (the fault's arrival).
    pub fn start() -> Self {
        Self {
            start: crate::clock::raw(),
            abort: None,
            memslot: None,
            hva: 0,
            vma_page_size: 0,
            stages: [0; 5],
            populated: false,
            policy: "",
        }
    }

    /// Nanoseconds since the start.
    pub fn elapsed_ns(&self) -> u64 {
        crate::clock::nanos_between(self.start, crate::clock::raw())
    }

    fn mark(&mut self, stage: usize) {
        self.stages[stage] = self.elapsed_ns();
    }
}

/// [`handle_fault`], filling `trace` as the stages run.
pub fn handle_fault_traced(
    vm: &VmMemory,
    policy: &dyn Policy,
    rec: &FaultRecord,
    inject: Injection,
    trace: &mut Trace,
) -> Result<Decision, PipelineError> {
    let Ok(abort) = Abort::decode(rec.esr, rec.far, rec.hpfar) else {
        return Ok(Decision::Inject(InjectReason::Undecodable));
    };
    if rec.ipa == NO_IPA {
        return Ok(Decision::Inject(InjectReason::NoIpa));
    }
    let ipa = Ipa::new(rec.ipa);
    trace.abort = Some(abort);
    if let Some(reason) = unresolvable(&abort) {
        return Ok(Decision::Inject(reason));
    }
    // 1. memslot
    let slot = match lookup_memslot(&vm.memslots, &abort, ipa) {
        Ok(slot) => slot,
        Err(decision) => return Ok(decision),
    };
    trace.memslot = Some(slot.id as u32);
    trace.mark(0);
    // 2. VMA snapshot, by value
    let hva = slot.hva_of(ipa);
    let vma = vma_snapshot(&vm.vmas, hva)?;
    (trace.hva, trace.vma_page_size) = (hva.raw(), vma.page_size);
    trace.mark(1);
    if vma.device && abort.stage2_access() == Access::Execute {
        return Ok(Decision::Exit(Exit::ExecOnDevice { ipa }));
    }
    let write = is_write(&abort);
    if write && !vma.writable {
        // KVM: a write fault on a non-writable mapping goes to the VMM.
        return Ok(Decision::Exit(outside_memory_exit(&abort, ipa).unwrap_or(Exit::NoSyndrome { ipa, write })));
    }
    // 3. mapping size: what correctness allows, then what the policy wants
    // (asked once per fault, for every decision it owns).
    let mut allowed = allowed_size(&abort, slot, &vma, hva);
    // A block over pages mapped smaller (an earlier policy's choice) is
    // refused by the core: map at the size already there instead.
    let permission_fault = matches!(abort.status, FaultStatus::Permission { .. });
    while !permission_fault
        && allowed != MapSize::Page4K
        && vm.has_smaller_mapping(ipa.align_down(allowed.bytes()), allowed.bytes())
    {
        allowed = if allowed == MapSize::Block1G { MapSize::Block2M } else { MapSize::Page4K };
    }
    let ctx = FaultContext {
        vm_id: vm.id.raw(),
        vcpu: rec.vcpu,
        fault_id: rec.fault_id,
        ipa: ipa.raw(),
        memslot: slot.id,
        access: abort.stage2_access(),
        allowed,
        may_write: vma.writable && !slot.read_only && !slot.dirty_log,
        may_exec: !vma.device,
    };
    let decisions = policy.decide(&ctx);
    // A permission fault relaxes the leaf that faulted, at its own size.
    let size = if permission_fault { allowed } else { allowed.min(decisions.max_size) };
    trace.mark(2);
    // 4. invalidation sequence, sampled before pinning
    let seq = vm.sample_seq();
    // 5. pin
    let (pin, map_ipa, pa, populated) = pin_pages(vm, slot, &vma, ipa, size, inject)?;
    trace.populated = populated;
    trace.mark(3);
    // 6. permissions
    inject.check(Stage::Permissions)?;
    let perms = permissions(&abort, slot, &vma, &decisions);
    trace.mark(4);
    // 7. the plan
    inject.check(Stage::Command)?;
    Ok(Decision::Map(MapPlan {
        fault_ipa: ipa,
        ipa: map_ipa,
        pa,
        size,
        perms,
        device: vma.device,
        seq,
        pin,
        marks_dirty: slot.dirty_log && perms.write(),
        permission_fault,
        fault_around: if size == MapSize::Page4K && !permission_fault && !vma.device {
            decisions.fault_around.min(crate::policy::MAX_FAULT_AROUND)
        } else {
            0
        },
        around_perms: perms_for(Access::Read, slot, &vma, &decisions),
    }))
}

/// Fault statuses that no mapping can resolve.
fn unresolvable(abort: &Abort) -> Option<InjectReason> {
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
        _ => {
            if abort.kind == AbortKind::Instruction {
                return Err(Decision::Inject(InjectReason::FetchOutsideMemory));
            }
            if abort.s1ptw {
                return Err(Decision::Inject(InjectReason::WalkOutsideMemory));
            }
            let write = is_write(abort);
            Err(Decision::Exit(outside_memory_exit(abort, ipa).unwrap_or(Exit::NoSyndrome { ipa, write })))
        }
    }
}

fn outside_memory_exit(abort: &Abort, ipa: Ipa) -> Option<Exit> {
    if abort.cache_maintenance {
        return Some(Exit::CacheMaintenance { ipa });
    }
    abort.syndrome.map(|s| Exit::Mmio(MmioAccess { ipa, size: s.size, register: s.register, write: is_write(abort) }))
}

/// Stage 2: a copy of the VMA backing `hva`, taken inside the lock's scope.
pub fn vma_snapshot(vmas: &Vmas, hva: Hva) -> Result<Vma, PipelineError> {
    vmas.snapshot(hva).ok_or(PipelineError::NoVma(hva))
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

/// Stage 3: the largest mapping size correctness allows (a permission
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

/// Stage 5: pin the pages the mapping will cover, faulting fresh backing in;
/// says whether the backing had a hole.
fn pin_pages(
    vm: &VmMemory,
    slot: &Memslot,
    vma: &Vma,
    ipa: Ipa,
    size: MapSize,
    inject: Injection,
) -> Result<(PinGuard, Ipa, Pa, bool), PipelineError> {
    let map_ipa = ipa.align_down(size.bytes());
    let hva = slot.hva_of(map_ipa);
    let region = vm.regions.get(vma.region).ok_or(PipelineError::OutsideRegion(vma.region))?;
    let offset = hva.checked_offset_from(region.base()).ok_or(PipelineError::OutsideRegion(vma.region))?;
    let pa = region.pa_at(offset).ok_or(PipelineError::OutsideRegion(vma.region))?;
    let pin = vm.pins.pin(vma.region, offset, size.bytes())?;
    inject.check(Stage::Populate)?;
    let mut hole = false;
    if !region.device && !vm.pins.is_populated(vma.region, offset, size.bytes()) {
        hole = region.fill(offset, size.bytes())?;
        vm.pins.mark_populated(vma.region, offset, size.bytes());
    }
    Ok((pin, map_ipa, pa, hole))
}

/// Fault-around: the next `pages` 4 KiB pages after `plan`'s mapping that
/// are in the same memslot and not mapped yet, pinned and filled, to map
/// before the guest touches them. Stops at the memslot's end, at device
/// memory, or at the first page that cannot be pinned.
pub fn plan_around(vm: &VmMemory, plan: &MapPlan, pages: u32) -> Vec<AroundPlan> {
    let Some(slot) = vm.memslots.lookup(plan.fault_ipa) else { return Vec::new() };
    let mut out = Vec::with_capacity(pages as usize);
    for k in 1..=pages as u64 {
        let ipa = Ipa::new(plan.ipa.raw() + k * PAGE_SIZE);
        if vm.memslots.lookup(ipa).is_none_or(|s| s.id != slot.id) {
            break;
        }
        if vm.is_mapped(ipa) {
            continue;
        }
        let Ok(vma) = vma_snapshot(&vm.vmas, slot.hva_of(ipa)) else { break };
        if vma.device {
            break;
        }
        let seq = vm.sample_seq();
        let Ok((pin, ipa, pa, _)) = pin_pages(vm, slot, &vma, ipa, MapSize::Page4K, Injection::NONE) else { break };
        out.push(AroundPlan { ipa, pa, perms: plan.around_perms, seq, pin });
    }
    out
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
fn perms_for(access: Access, slot: &Memslot, vma: &Vma, decisions: &Decisions) -> Perms {
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
