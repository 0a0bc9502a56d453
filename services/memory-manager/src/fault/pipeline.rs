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
//! Each stage ([`super::stages`]) takes what it needs and returns what the
//! next needs; no stage sees a bag of every variable.

use hyp_core::ring::abi::FaultRecord;

use super::choices::Policy;
use super::context::{ArchFault, VmView};
use super::error::PipelineError;
use super::failpoint::{Failpoint, Failpoints, NoFailures};
use super::plan::{Decision, MapPlan};
use super::stages::{
    allowed_size, backing_exit, lookup_memslot, map_size, permissions, pin, policy_question, step_down, unresolvable,
    vma_snapshot,
};
use super::trace::{Stage, Trace};

/// Runs the pipeline for one fault record, filling `trace` as the stages run.
pub fn handle_fault(
    vm: VmView<'_>,
    policy: &dyn Policy,
    rec: &FaultRecord,
    trace: &mut Trace,
) -> Result<Decision, PipelineError> {
    handle_fault_with(vm, policy, rec, trace, &NoFailures)
}

/// [`handle_fault`] with failures injected where `fail` says (tests).
pub fn handle_fault_with(
    vm: VmView<'_>,
    policy: &dyn Policy,
    rec: &FaultRecord,
    trace: &mut Trace,
    fail: &impl Failpoints,
) -> Result<Decision, PipelineError> {
    let fault = match ArchFault::decode(rec) {
        Ok(fault) => fault,
        Err(reason) => return Ok(Decision::Inject(reason)),
    };
    let (abort, ipa) = (&fault.abort, fault.ipa);
    trace.abort = Some(fault.abort);
    if let Some(reason) = unresolvable(abort) {
        return Ok(Decision::Inject(reason));
    }
    // 1. memslot
    let slot = match lookup_memslot(&vm.layout.memslots, abort, ipa) {
        Ok(slot) => slot,
        Err(decision) => return Ok(decision),
    };
    trace.memslot = Some(slot.id as u32);
    trace.mark(Stage::Memslot);
    // 2. VMA snapshot, by value
    let hva = slot.hva_of(ipa);
    let vma = vma_snapshot(&vm.layout.vmas, hva)?;
    (trace.hva, trace.vma_page_size) = (hva.raw(), vma.page_size);
    trace.mark(Stage::Vma);
    if let Some(exit) = backing_exit(abort, ipa, &vma) {
        return Ok(Decision::Exit(exit));
    }
    // 3. mapping size: what correctness allows, then what the policy wants
    // (asked once per fault, for every decision it owns).
    let allowed = step_down(abort, ipa, allowed_size(abort, slot, &vma, hva), vm.mapping);
    let decisions = policy.decide(&policy_question(vm.layout, &fault, slot, &vma, allowed));
    let size = map_size(abort, allowed, &decisions);
    trace.mark(Stage::Size);
    // 4. invalidation sequence, sampled before pinning
    let seq = vm.mapping.sample_seq();
    // 5. pin
    let pinned = pin(vm, slot, &vma, ipa, size, fail)?;
    trace.populated = pinned.filled_hole;
    trace.mark(Stage::Pin);
    // 6. permissions
    fail.check(Failpoint::Permissions)?;
    let perms = permissions(abort, slot, &vma, &decisions);
    trace.mark(Stage::Permissions);
    // 7. the plan
    fail.check(Failpoint::Command)?;
    Ok(Decision::Map(MapPlan {
        fault_ipa: ipa,
        ipa: pinned.ipa,
        pa: pinned.pa,
        size,
        perms,
        device: vma.device,
        seq,
        pin: pinned.guard,
        marks_dirty: slot.dirty_log && perms.write(),
        permission_fault: abort.status.is_permission(),
        decisions,
    }))
}
