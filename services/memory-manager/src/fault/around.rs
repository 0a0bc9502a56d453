//! Fault-around: pages next to a fault's, mapped before the guest touches
//! them, with a read fault's permissions.

use hyp_core::abort::Access;
use hyp_core::addr::{Ipa, PAGE_SIZE};
use hyp_core::stage2::MapSize;

use super::context::VmView;
use super::failpoint::NoFailures;
use super::plan::{AroundPlan, MapPlan};
use super::stages::{perms_for, pin, vma_snapshot};

/// The next `pages` 4 KiB pages after `plan`'s mapping that are in the
/// same memslot and not mapped yet, pinned and filled, to map before the
/// guest touches them. Stops at the memslot's end, at device memory, or at
/// the first page that cannot be pinned.
pub fn plan_around(vm: VmView<'_>, plan: &MapPlan, pages: u32) -> Vec<AroundPlan> {
    let Some(slot) = vm.layout.memslots.lookup(plan.fault_ipa) else { return Vec::new() };
    let mut out = Vec::with_capacity(pages as usize);
    for k in 1..=pages as u64 {
        let ipa = Ipa::new(plan.ipa.raw() + k * PAGE_SIZE);
        if vm.layout.memslots.lookup(ipa).is_none_or(|s| s.id != slot.id) {
            break;
        }
        if vm.mapping.is_mapped(ipa) {
            continue;
        }
        let Ok(vma) = vma_snapshot(&vm.layout.vmas, slot.hva_of(ipa)) else { break };
        if vma.device {
            break;
        }
        let seq = vm.mapping.sample_seq();
        let Ok(pinned) = pin(vm, slot, &vma, ipa, MapSize::Page4K, &NoFailures) else { break };
        let perms = perms_for(Access::Read, slot, &vma, &plan.decisions);
        out.push(AroundPlan { ipa: pinned.ipa, pa: pinned.pa, perms, seq, pin: pinned.guard });
    }
    out
}
