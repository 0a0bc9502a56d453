//! Resident budgets: a VM whose mapped memory goes over the budget its
//! policy set is brought back under it by reclaiming mappings in the
//! policy's order, through the invalidation protocol: clear the pages'
//! populated bits, unmap through the core (which bumps its invalidation
//! sequence, so a map sampled before is refused as stale), copy the pages
//! to the region's swap store, punch them out of the backing. The next
//! access faults and the fill brings them back from the store, intact.
//!
//! Reclaim is direct, as Linux's direct reclaim: the vCPU service thread
//! whose install took the VM over budget reclaims before it serves that
//! vCPU's next fault, so a VM passes its budget by at most one mapping (and
//! its fault-around pages) per vCPU. It brings the VM down to 7/8 of the
//! budget, so reclaim runs in batches rather than on every fault.

use std::sync::atomic::{AtomicBool, Ordering};

use hyp_core::addr::Ipa;
use hyp_core::ring::abi::{kind, CommandRecord};
use tracing::{debug, warn};

use super::control::ControlError;
use super::vm::AttachedVm;
use crate::fault::choices::{Budget, EvictionOrder};
use crate::memory::mapping::Resident;
use crate::memory::region::FillError;

/// Reclaims mappings in `budget`'s order until the VM is at or under 7/8
/// of it; returns the bytes reclaimed.
pub fn enforce(vm: &AttachedVm, budget: Budget, stop: &AtomicBool) -> u64 {
    let target = budget.max_resident - budget.max_resident / 8;
    let resident = vm.mapping.resident();
    if resident <= budget.max_resident {
        return 0;
    }
    let mut victims = vm.mapping.residents();
    match budget.order {
        EvictionOrder::Fifo => victims.sort_unstable_by_key(|v| v.order),
        EvictionOrder::Lifo => victims.sort_unstable_by_key(|v| std::cmp::Reverse(v.order)),
        EvictionOrder::LowestIpa => {}
        EvictionOrder::HighestIpa => victims.reverse(),
    }
    let mut freed = 0;
    for Resident { ipa, size, .. } in victims {
        if resident - freed <= target || stop.load(Ordering::Acquire) {
            break;
        }
        match reclaim(vm, ipa, size) {
            Ok(true) => freed += size,
            Ok(false) => {}
            Err(e) => {
                warn!(vm = %vm.id(), %ipa, cause = %e, "reclaim failed; stopping this round");
                break;
            }
        }
    }
    debug!(vm = %vm.id(), freed, resident = vm.mapping.resident(), "resident budget enforced");
    freed
}

/// Why one mapping could not be reclaimed.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// Copying to the swap store or punching failed.
    #[error(transparent)]
    Store(#[from] FillError),
    /// The core did not unmap it.
    #[error("unmap: {0}")]
    Unmap(#[from] ControlError),
}

/// Reclaims the mapping at `ipa` of `size` bytes; false if it is not
/// guest memory the daemon can reclaim (device memory, or gone).
fn reclaim(vm: &AttachedVm, ipa: Ipa, size: u64) -> Result<bool, ReclaimError> {
    let layout = &vm.layout;
    let Some(slot) = layout.memslots.lookup(ipa) else { return Ok(false) };
    let Some(vma) = layout.vmas.snapshot(slot.hva_of(ipa)) else { return Ok(false) };
    let Some(region) = layout.regions.get(vma.region).filter(|r| !r.device) else { return Ok(false) };
    let Some(offset) = slot.hva_of(ipa).checked_offset_from(region.base()) else { return Ok(false) };
    let mut unmap_error = None;
    let reclaimed = region.reclaim(offset, size, || {
        // Bits first: a fault that finds them clear waits on the fill lock
        // held here; one that found them set sampled its sequence before
        // this unmap, so its map is refused as stale.
        vm.mapping.clear_populated(vma.region, offset, size);
        let unmap = CommandRecord { kind: kind::UNMAP, ipa: ipa.raw(), size, ..Default::default() };
        match vm.control.execute(unmap) {
            Ok(res) => {
                vm.mapping.forget_range(ipa, size, res.inval_seq);
                true
            }
            Err(e) => {
                vm.mapping.mark_populated(vma.region, offset, size);
                unmap_error = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = unmap_error {
        return Err(e.into());
    }
    if reclaimed {
        vm.counters.evicted.fetch_add(1, Ordering::Relaxed);
        vm.counters.evicted_bytes.fetch_add(size, Ordering::Relaxed);
    }
    Ok(reclaimed)
}
