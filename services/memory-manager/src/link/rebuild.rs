//! Re-attach: a daemon that takes over a VM whose previous daemon died (or
//! handed it over) rebuilds its mapping state from the truth, the core's
//! tables and page ownership, asked over the control ring: LEAVES for the
//! installed leaves of every memslot, OWNED for the table-pool pages the
//! core already holds. Every leaf is checked against the VM's layout as
//! untrusted input; each one that passes is pinned and recorded as if its
//! MAP had just been confirmed, and its pages marked populated.

use std::time::{Duration, Instant};

use hyp_core::addr::{Ipa, Pa, PAGE_SIZE};
use hyp_core::ring::abi::{kind, CommandRecord, LeafRecord, FLAG_DEVICE, MAX_OWNED_PAGES};
use hyp_core::stage2::{MapSize, Perms};

use super::control::ControlError;
use super::vm::AttachedVm;
use crate::memory::mapping::Installed;
use crate::memory::memslot::Memslot;
use crate::memory::pool::PagePool;

/// What a rebuild found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Mappings recorded (and pinned).
    pub mappings: u64,
    /// Bytes they map.
    pub bytes: u64,
    /// Table-pool pages the core already held.
    pub pool_pages_held: u64,
    /// LEAVES and OWNED commands it took.
    pub commands: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Why a rebuild failed: the VM cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The core did not answer, or refused.
    #[error("asking the core: {0}")]
    Control(#[from] ControlError),
    /// The core reported a leaf the layout cannot have produced.
    #[error("the core reports a leaf at {ipa} that the VM's layout cannot have mapped: {why}")]
    BadLeaf {
        /// The leaf's IPA.
        ipa: Ipa,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The core's report did not move forward.
    #[error("the core's leaf report did not advance past {0}")]
    NoProgress(Ipa),
}

/// Rebuilds `vm`'s mapping state (which must be empty) from its core.
pub fn rebuild(vm: &AttachedVm) -> Result<Rebuilt, RebuildError> {
    let started = Instant::now();
    let mut done = Rebuilt::default();
    // Every leaf, in IPA order: recorded in one pass once all are in.
    let mut adopted = Vec::new();
    for slot in vm.layout.memslots.iter() {
        let end = slot.end();
        let mut from = slot.gpa.raw();
        while from < end {
            let (leaves, result) = vm.control.leaves(Ipa::new(from), end - from)?;
            done.commands += 1;
            vm.mapping.note_seq(result.inval_seq);
            let mut next_min = from;
            for run in &leaves {
                let ipa = Ipa::new(run.ipa);
                if run.ipa < next_min {
                    return Err(RebuildError::BadLeaf { ipa, why: "out of IPA order or overlapping" });
                }
                let span = run.count.checked_mul(run.size).filter(|_| run.count > 0);
                let end = span.and_then(|span| run.ipa.checked_add(span)).filter(|&e| e <= slot.end());
                let (Some(span), Some(_)) = (span, end) else {
                    return Err(RebuildError::BadLeaf { ipa, why: "not a run of leaves inside its memslot" });
                };
                for i in 0..run.count {
                    let leaf = LeafRecord { ipa: run.ipa + i * run.size, pa: run.pa + i * run.size, count: 1, ..*run };
                    adopted.push(checked(vm, slot, &leaf, result.inval_seq)?);
                }
                // Every leaf checked: the run lies in one region.
                if let Some(backing) = vm.layout.backing(slot, ipa) {
                    if !vm.layout.regions[backing.region].device {
                        vm.mapping.mark_populated(backing.region, backing.offset, span);
                    }
                }
                next_min = run.ipa + span;
                done.mappings += run.count;
                done.bytes += span;
            }
            let next = result.detail;
            if next <= from || next > end || next < next_min.min(end) {
                return Err(RebuildError::NoProgress(Ipa::new(from)));
            }
            from = next;
        }
    }
    vm.mapping.adopt(adopted);
    // Which table-pool pages the core holds: OWNED asks about 64 pages at a
    // time, all of them sent as one batch (several in flight).
    let windows = vm.mapping.replace_pool(PagePool::default()).windows().to_vec();
    let mut asks = Vec::new();
    for (base, bytes) in windows {
        let pages = bytes / PAGE_SIZE;
        for page in (0..pages).step_by(MAX_OWNED_PAGES as usize) {
            let n = (pages - page).min(MAX_OWNED_PAGES);
            asks.push((base.raw() + page * PAGE_SIZE, n));
        }
    }
    let cmds = asks
        .iter()
        .map(|&(pa, n)| CommandRecord { kind: kind::OWNED, pa, size: n * PAGE_SIZE, ..Default::default() })
        .collect();
    let answers = vm.control.execute_all(cmds)?;
    done.commands += asks.len() as u64;
    let mut free = Vec::new();
    for ((first, n), answer) in asks.into_iter().zip(answers) {
        let held = answer?.value;
        for i in 0..n {
            if held & (1 << i) != 0 {
                done.pool_pages_held += 1;
                continue;
            }
            let pa = first + i * PAGE_SIZE;
            match free.last_mut() {
                Some((start, len)) if Pa::raw(*start) + *len == pa => *len += PAGE_SIZE,
                _ => free.push((Pa::new(pa), PAGE_SIZE)),
            }
        }
    }
    // Taken from the end, as at attach: the windows in their order.
    free.reverse();
    vm.mapping.replace_pool(PagePool::new(free));
    done.elapsed = started.elapsed();
    Ok(done)
}

/// Checks one reported leaf against the layout and pins it: its IPA and
/// the mapping to record.
fn checked(vm: &AttachedVm, slot: &Memslot, leaf: &LeafRecord, seq: u64) -> Result<(Ipa, Installed), RebuildError> {
    let ipa = Ipa::new(leaf.ipa);
    let bad = |why| RebuildError::BadLeaf { ipa, why };
    if leaf.kind != kind::LEAF || leaf.reserved != [0; 2] {
        return Err(bad("not a well-formed leaf record"));
    }
    let size = MapSize::from_bytes(leaf.size).ok_or(bad("not a leaf size"))?;
    if !ipa.is_aligned(leaf.size) || leaf.ipa < slot.gpa.raw() || leaf.ipa + leaf.size > slot.end() {
        return Err(bad("not an aligned leaf inside its memslot"));
    }
    let backing = vm.layout.backing(slot, ipa).ok_or(bad("outside the memslot's region"))?;
    let region = &vm.layout.regions[backing.region];
    if backing.pa.raw() != leaf.pa || backing.offset + leaf.size > region.size {
        return Err(bad("maps a PA the memslot does not back"));
    }
    let perms = Perms::from_bits(leaf.flags & !FLAG_DEVICE).filter(|p| p.read()).ok_or(bad("bad permissions"))?;
    let device = leaf.flags & FLAG_DEVICE != 0;
    if device != region.device || (device && perms.exec()) {
        return Err(bad("memory type differs from the region's"));
    }
    if perms.write() && (slot.read_only || !region.writable) {
        return Err(bad("writable in a read-only memslot or region"));
    }
    let pin = vm.mapping.pin(backing.region, backing.offset, leaf.size).map_err(|_| bad("cannot be pinned"))?;
    Ok((ipa, Installed::new(size, backing.pa, seq, pin.into_mapping())))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use faultline_attach::doorbell::{push_and_ring, WaitPolicy};
    use hyp_core::ownership::VmId;
    use hyp_core::ring::abi::ResultRecord;
    use hyp_core::ring::{Consumer, OwnedRing, Producer};
    use hyp_core::stage2::Perms;

    use super::*;
    use crate::link::control::ControlLoop;
    use crate::memory::layout::VmLayout;
    use crate::memory::memslot::SlotFlags;

    const RAM_PA: u64 = 0x4000_0000;
    const GPA: u64 = 0x8000_0000;

    /// A run of `count` 4 KiB RW leaves from `gpa`, backed where the
    /// memslot says.
    fn run(gpa: u64, count: u64) -> LeafRecord {
        LeafRecord {
            kind: kind::LEAF,
            flags: Perms::RW.bits(),
            ipa: gpa,
            pa: RAM_PA + (gpa - GPA),
            size: PAGE_SIZE,
            count,
            ..Default::default()
        }
    }

    /// Rebuilds a 1 MiB VM (one memslot at GPA over its whole region) from
    /// a core that answers the first LEAVES with `leaves` and the range's
    /// end (or `next`), and every OWNED with nothing held.
    fn rebuild_from(leaves: Vec<LeafRecord>, next: Option<u64>) -> (Result<Rebuilt, RebuildError>, AttachedVm) {
        let layout = VmLayout::single_region(
            VmId::new(1).unwrap(),
            Pa::new(RAM_PA),
            1 << 20,
            4096,
            &[(GPA, 1 << 20, 0, SlotFlags::default())],
        )
        .unwrap();
        let vm = AttachedVm::new(layout, PagePool::default());
        let (cmd_ring, res_ring) = (OwnedRing::new(), OwnedRing::new());
        let inbox = vm.control.open();
        let stop = AtomicBool::new(false);
        let wait = WaitPolicy { spin_polls: 100, sleep_slice: Duration::from_millis(1) };
        let rebuilt = std::thread::scope(|s| {
            s.spawn(|| {
                let (p, c) = (Producer::attach(cmd_ring.view()).unwrap(), Consumer::attach(res_ring.view()).unwrap());
                ControlLoop::new(inbox, p, c).run(wait, &stop, |_| {})
            });
            // The core.
            s.spawn(|| {
                let mut cmds = Consumer::attach(cmd_ring.view()).unwrap();
                let mut results = Producer::attach(res_ring.view()).unwrap();
                let mut first = true;
                while !stop.load(Ordering::Acquire) {
                    let Some(r) = cmds.pop().unwrap() else {
                        std::thread::yield_now();
                        continue;
                    };
                    let cmd = CommandRecord::decode(&r);
                    let mut res = ResultRecord { kind: kind::RESULT, cmd_id: cmd.cmd_id, ..Default::default() };
                    if cmd.kind == kind::LEAVES {
                        let sent = if first { leaves.clone() } else { Vec::new() };
                        res.value = sent.len() as u64;
                        res.detail = if first { next.unwrap_or(cmd.ipa + cmd.size) } else { cmd.ipa + cmd.size };
                        for leaf in sent {
                            push_and_ring(&mut results, &LeafRecord { cmd_id: cmd.cmd_id, ..leaf }.encode()).unwrap();
                        }
                        first = false;
                    }
                    push_and_ring(&mut results, &res.encode()).unwrap();
                }
            });
            let rebuilt = rebuild(&vm);
            stop.store(true, Ordering::Release);
            vm.control.close();
            rebuilt
        });
        (rebuilt, vm)
    }

    #[test]
    fn runs_of_leaves_are_pinned_and_recorded_one_mapping_each() {
        let (rebuilt, vm) = rebuild_from(vec![run(GPA, 3), run(GPA + 0x10_000, 1)], None);
        let r = rebuilt.unwrap();
        assert_eq!((r.mappings, r.bytes), (4, 4 * PAGE_SIZE));
        assert_eq!(vm.mapping.mapping_count(), 4);
        assert_eq!(vm.mapping.pins().total(), 4);
        assert!(vm.mapping.is_mapped(Ipa::new(GPA + 0x2000)) && !vm.mapping.is_mapped(Ipa::new(GPA + 0x3000)));
        assert!(vm.mapping.is_populated(0, 0x2000, PAGE_SIZE));
    }

    #[test]
    fn leaves_the_layout_cannot_explain_are_refused_with_the_reason() {
        let cases: Vec<(Vec<LeafRecord>, &str)> = vec![
            (vec![LeafRecord { pa: RAM_PA + 0x5000, ..run(GPA, 1) }], "maps a PA the memslot does not back"),
            (vec![run(GPA, 0)], "not a run of leaves inside its memslot"),
            (vec![run(GPA + (1 << 20) - 0x1000, 2)], "not a run of leaves inside its memslot"),
            (vec![run(GPA, u64::MAX / 2)], "not a run of leaves inside its memslot"),
            (vec![run(GPA + 0x4000, 1), run(GPA, 1)], "out of IPA order or overlapping"),
            (vec![run(GPA, 2), run(GPA + 0x1000, 1)], "out of IPA order or overlapping"),
            (vec![LeafRecord { flags: Perms::W.bits(), ..run(GPA, 1) }], "bad permissions"),
            (vec![LeafRecord { reserved: [1, 0], ..run(GPA, 1) }], "not a well-formed leaf record"),
            (vec![LeafRecord { size: 8192, ..run(GPA, 1) }], "not a leaf size"),
        ];
        for (leaves, why) in cases {
            let (rebuilt, vm) = rebuild_from(leaves.clone(), None);
            match rebuilt {
                Err(RebuildError::BadLeaf { why: got, .. }) => assert_eq!(got, why, "{leaves:?}"),
                other => panic!("{leaves:?}: {other:?}"),
            }
            drop(vm);
        }
    }

    #[test]
    fn a_core_whose_report_does_not_advance_is_refused() {
        let (rebuilt, _vm) = rebuild_from(vec![run(GPA, 1)], Some(GPA));
        assert!(matches!(rebuilt, Err(RebuildError::NoProgress(ipa)) if ipa == Ipa::new(GPA)), "{rebuilt:?}");
    }
}
