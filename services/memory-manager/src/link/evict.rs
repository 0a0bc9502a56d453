//! Resident budgets: a VM whose mapped memory goes over the budget its
//! policy set is brought back under it by reclaiming mappings in the
//! policy's order, through the invalidation protocol, in an order that
//! survives the daemon dying at any point: clear the pages' populated bits,
//! write-protect them through the core, copy them to the region's swap
//! store and make it durable, unmap them through the core (which bumps its
//! invalidation sequence, so a map sampled before is refused as stale),
//! punch them out of the backing. The next access faults and the fill
//! brings them back from the store, intact.
//!
//! Reclaim is direct, as Linux's direct reclaim: the vCPU service thread
//! whose install took the VM over budget reclaims before it serves that
//! vCPU's next fault, so a VM passes its budget by at most one mapping (and
//! its fault-around pages) per vCPU. It brings the VM down to 7/8 of the
//! budget, so reclaim runs in batches rather than on every fault.
//!
//! Cold reclaim takes the same path for mappings the working-set monitor
//! saw idle long enough, from the VM's monitor thread (`link::monitor`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyp_core::addr::{Ipa, Range};
use hyp_core::ring::abi::{kind, CommandRecord, ResultRecord};
use tracing::{debug, warn};

use super::control::ControlError;
use super::vm::AttachedVm;
use crate::fault::choices::{Budget, EvictionOrder};
use crate::fault::failpoint::crash_point;
use crate::memory::mapping::Resident;
use crate::memory::region::{FillError, ReclaimSteps};
use crate::observe::workingset::Aggregation;

/// Mappings reclaimed together: one durable write of the store for them.
const BATCH: usize = 64;

/// Reclaims mappings in `budget`'s order until the VM is at or under 7/8
/// of it; returns the bytes reclaimed.
pub fn enforce(vm: &AttachedVm, budget: Budget, stop: &AtomicBool) -> u64 {
    let target = budget.max_resident - budget.max_resident / 8;
    // One reclaimer per VM; another vCPU's thread already brings it down.
    let Ok(_reclaiming) = vm.reclaiming.try_lock() else { return 0 };
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
        EvictionOrder::Coldest => coldest_first(&mut victims, vm.working_set.latest().as_deref()),
    }
    let (_, freed) = reclaim_until(vm, victims, |planned| resident - planned <= target, stop);
    debug!(vm = %vm.id(), freed, resident = vm.mapping.resident(), "resident budget enforced");
    freed
}

/// Reclaims every mapping whose memory the monitor saw idle for at least
/// `min_idle` in `seen` (proactive reclaim, under budget or not); returns
/// the mappings and bytes reclaimed.
///
/// The candidates are found region by region: only the mappings that start
/// in a region idle long enough are looked at (one that starts before it
/// is found from the region it starts in, or is not idle), so an
/// aggregation that finds nothing idle costs nothing per mapping. Regions
/// come in IPA order and so do their mappings: the victims are in IPA order.
pub fn reclaim_cold(vm: &AttachedVm, seen: &Aggregation, min_idle: Duration, stop: &AtomicBool) -> (u64, u64) {
    let Ok(_reclaiming) = vm.reclaiming.try_lock() else { return (0, 0) };
    let mut victims: Vec<Resident> = Vec::new();
    for region in seen.regions.iter().filter(|r| seen.idle(r) >= min_idle) {
        victims.extend(
            vm.mapping
                .residents_in(region.range)
                .into_iter()
                .filter(|v| range_of(v).and_then(|r| seen.least_idle(r)).is_some_and(|idle| idle >= min_idle)),
        );
    }
    let (mappings, bytes) = reclaim_until(vm, victims, |_| false, stop);
    vm.counters.cold_evicted.fetch_add(mappings, Ordering::Relaxed);
    if mappings > 0 {
        debug!(vm = %vm.id(), mappings, bytes, ?min_idle, "cold memory reclaimed");
    }
    (mappings, bytes)
}

fn range_of(v: &Resident) -> Option<Range<Ipa>> {
    Range::<Ipa>::new(v.ipa, v.size)
}

/// Orders `victims` longest idle first, then least often accessed, then
/// lowest IPA. Without an aggregation yet (or for memory the monitor does
/// not cover), nothing is known to be idle: those go last, lowest IPA
/// first.
fn coldest_first(victims: &mut [Resident], seen: Option<&Aggregation>) {
    victims.sort_by_cached_key(|v| {
        let (idle, frequency) = seen
            .zip(range_of(v))
            .and_then(|(a, r)| Some((a.least_idle(r)?, a.most_frequent(r)?)))
            .unwrap_or((Duration::ZERO, u32::MAX));
        (std::cmp::Reverse(idle), frequency, v.ipa)
    });
}

/// Reclaims `victims` in order, in batches, until `enough(bytes planned)`
/// or `stop`; returns the mappings and bytes reclaimed.
fn reclaim_until(
    vm: &AttachedVm,
    victims: Vec<Resident>,
    enough: impl Fn(u64) -> bool,
    stop: &AtomicBool,
) -> (u64, u64) {
    let (mut done, mut planned) = ((0, 0), 0);
    let mut batch = Vec::with_capacity(BATCH);
    for Resident { ipa, size, .. } in victims {
        if enough(planned) || stop.load(Ordering::Acquire) {
            break;
        }
        let Some(victim) = Victim::of(vm, ipa, size) else { continue };
        planned += size;
        batch.push(victim);
        if batch.len() == BATCH {
            match reclaim(vm, &batch) {
                Ok((n, bytes)) => done = (done.0 + n, done.1 + bytes),
                Err(e) => {
                    warn!(vm = %vm.id(), cause = %e, "reclaim failed; stopping this round");
                    return done;
                }
            }
            batch.clear();
        }
    }
    match reclaim(vm, &batch) {
        Ok((n, bytes)) => done = (done.0 + n, done.1 + bytes),
        Err(e) => warn!(vm = %vm.id(), cause = %e, "reclaim failed; stopping this round"),
    }
    done
}

/// Why a batch could not be reclaimed.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// Copying to the swap store, making it durable or punching failed.
    #[error(transparent)]
    Store(#[from] FillError),
    /// The core did not write-protect or unmap.
    #[error("the core: {0}")]
    Core(#[from] ControlError),
}

/// A mapping to reclaim, and where its pages live.
#[derive(Clone, Copy, Debug)]
struct Victim {
    ipa: Ipa,
    size: u64,
    region: usize,
    offset: u64,
}

impl Victim {
    /// The mapping at `ipa` of `size` bytes, if it is guest memory the
    /// daemon can reclaim (not device memory, still described).
    fn of(vm: &AttachedVm, ipa: Ipa, size: u64) -> Option<Self> {
        let slot = vm.layout.memslots.lookup(ipa)?;
        let backing = vm.layout.backing(slot, ipa)?;
        let region = vm.layout.regions.get(backing.region).filter(|r| !r.device)?;
        (backing.offset + size <= region.size).then_some(Self {
            ipa,
            size,
            region: backing.region,
            offset: backing.offset,
        })
    }
}

/// Victims next to each other in one region (IPAs and backing offsets
/// continuing one another), reclaimed as one range: one write-protect, one
/// unmap and one punch for all of them. Memory a scan left idle is
/// reclaimed in runs of a batch's length, not page by page.
#[derive(Clone, Debug)]
struct Run {
    ipa: Ipa,
    size: u64,
    region: usize,
    offset: u64,
    /// The mappings it is made of.
    mappings: Vec<Ipa>,
}

/// `victims` (one region's) in IPA order, joined into runs.
fn runs(mut victims: Vec<Victim>) -> Vec<Run> {
    victims.sort_unstable_by_key(|v| v.ipa);
    let mut out: Vec<Run> = Vec::new();
    for v in victims {
        match out.last_mut() {
            Some(r) if r.ipa.raw() + r.size == v.ipa.raw() && r.offset + r.size == v.offset => {
                r.size += v.size;
                r.mappings.push(v.ipa);
            }
            _ => out.push(Run { ipa: v.ipa, size: v.size, region: v.region, offset: v.offset, mappings: vec![v.ipa] }),
        }
    }
    out
}

/// Reclaims `victims`, region by region, in the store's crash-consistent
/// order ([`crate::memory::region::GuestRegion::reclaim`]); returns the
/// mappings and bytes reclaimed.
fn reclaim(vm: &AttachedVm, victims: &[Victim]) -> Result<(u64, u64), ReclaimError> {
    let (mut mappings, mut freed) = (0, 0);
    let mut regions: Vec<usize> = victims.iter().map(|v| v.region).collect();
    regions.sort_unstable();
    regions.dedup();
    for r in regions {
        let mine = runs(victims.iter().copied().filter(|v| v.region == r).collect());
        let ranges: Vec<(u64, u64)> = mine.iter().map(|run| (run.offset, run.size)).collect();
        let mut steps = CoreSteps { vm, runs: &mine, error: None };
        let reclaimed = vm.layout.regions[r].reclaim(&ranges, &mut steps)?;
        for (run, _) in mine.iter().zip(&reclaimed).filter(|(_, &done)| done) {
            let n = run.mappings.len() as u64;
            vm.counters.evicted.fetch_add(n, Ordering::Relaxed);
            vm.counters.evicted_bytes.fetch_add(run.size, Ordering::Relaxed);
            mappings += n;
            freed += run.size;
        }
        if let Some(e) = steps.error {
            return Err(e.into());
        }
    }
    Ok((mappings, freed))
}

/// The core's part of a reclaim, over the control ring, one command per run.
struct CoreSteps<'a> {
    vm: &'a AttachedVm,
    runs: &'a [Run],
    error: Option<ControlError>,
}

impl ReclaimSteps for CoreSteps<'_> {
    fn protect(&mut self, ranges: &[usize]) -> Vec<bool> {
        // A run with a mapping gone since they were picked is left alone
        // this time (its hole would be copied as a page).
        let live: Vec<usize> = ranges
            .iter()
            .copied()
            .filter(|&i| self.runs[i].mappings.iter().all(|&ipa| self.vm.mapping.is_mapped(ipa)))
            .collect();
        let cmds = live
            .iter()
            .map(|&i| {
                let run = &self.runs[i];
                // Bits first: a fault that finds them clear waits for the
                // reclaim's claim on the range; one that found them set
                // sampled its sequence before this write-protect, so its map
                // is refused as stale.
                self.vm.mapping.clear_populated(run.region, run.offset, run.size);
                CommandRecord { kind: kind::WRITE_PROTECT, ipa: run.ipa.raw(), size: run.size, ..Default::default() }
            })
            .collect();
        let done = self.run(&live, cmds, |vm, _, res| vm.mapping.note_seq(res.inval_seq));
        let mut protected = vec![false; ranges.len()];
        for (&i, ok) in live.iter().zip(done) {
            protected[ranges.iter().position(|&r| r == i).expect("a range of the batch")] = ok;
        }
        protected
    }

    fn stored(&mut self) {
        crash_point("store-written");
    }

    fn unmap(&mut self, ranges: &[usize]) -> Vec<bool> {
        let cmds = ranges
            .iter()
            .map(|&i| {
                let run = &self.runs[i];
                CommandRecord { kind: kind::UNMAP, ipa: run.ipa.raw(), size: run.size, ..Default::default() }
            })
            .collect();
        // Out from before the unmaps are sent until they are reconciled.
        let in_flight = self.vm.mapping.unmap_in_flight();
        let done = self.run(ranges, cmds, |vm, run, res| {
            vm.mapping.forget_range(&in_flight, run.ipa, run.size, res.inval_seq);
        });
        drop(in_flight);
        if done.iter().any(|&d| d) {
            crash_point("unmapped");
        }
        done
    }
}

impl CoreSteps<'_> {
    /// Sends `cmds` (one per run of `ranges`) as one batch; `settle` runs
    /// for each that succeeded. A run whose command failed keeps its pages
    /// populated (it stays mapped, read-only at worst).
    fn run(
        &mut self,
        ranges: &[usize],
        cmds: Vec<CommandRecord>,
        settle: impl Fn(&AttachedVm, &Run, &ResultRecord),
    ) -> Vec<bool> {
        let results = match self.vm.control.execute_all(cmds) {
            Ok(results) => results,
            Err(e) => ranges.iter().map(|_| Err(e.clone())).collect(),
        };
        ranges
            .iter()
            .zip(results)
            .map(|(&i, result)| {
                let run = &self.runs[i];
                match result {
                    Ok(res) => {
                        settle(self.vm, run, &res);
                        true
                    }
                    Err(e) => {
                        self.vm.mapping.mark_populated(run.region, run.offset, run.size);
                        self.error.get_or_insert(e);
                        false
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn victim(ipa: u64, size: u64, offset: u64) -> Victim {
        Victim { ipa: Ipa::new(ipa), size, region: 0, offset }
    }

    #[test]
    fn neighbours_in_ipa_and_backing_join_one_run_and_nothing_else_does() {
        let page = 4096;
        let joined = runs(vec![
            victim(0x4000_2000, page, 0x2000),
            victim(0x4000_0000, page, 0x0000),
            victim(0x4000_1000, page, 0x1000),
            // Next in IPA, not in the backing (another memslot's alias).
            victim(0x4000_3000, page, 0x9000),
            // A page and the block right after it, in both.
            victim(0x401f_f000, page, 0x1f_f000),
            victim(0x4020_0000, 2 << 20, 0x20_0000),
        ]);
        let shape: Vec<(u64, u64, u64, usize)> =
            joined.iter().map(|r| (r.ipa.raw(), r.size, r.offset, r.mappings.len())).collect();
        assert_eq!(
            shape,
            [
                (0x4000_0000, 3 * page, 0, 3),
                (0x4000_3000, page, 0x9000, 1),
                (0x401f_f000, page + (2 << 20), 0x1f_f000, 2)
            ]
        );
    }
}
