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
use crate::memory::handover::{HandedDelta, HandedMapping, HandedRecords};
use crate::memory::layout::Backing;
use crate::memory::mapping::{HeldRecords, Installed};
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
    /// A handed-over mapping record the VM's layout cannot have produced.
    #[error("the handed-over record of a mapping at {ipa} is not one the VM's layout can have made: {why}")]
    BadRecord {
        /// The mapping's IPA.
        ipa: Ipa,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Handed-over free table pages outside the pool, or listed twice.
    #[error("the handed-over free table pages {pa}+{bytes:#x} are not the pool's, or listed twice")]
    BadFreePages {
        /// First PA.
        pa: Pa,
        /// Bytes.
        bytes: u64,
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
    let (size, backing) = placed(vm, slot, ipa, leaf.size, Pa::new(leaf.pa)).map_err(bad)?;
    let region = &vm.layout.regions[backing.region];
    let perms = Perms::from_bits(leaf.flags & !FLAG_DEVICE).filter(|p| p.read()).ok_or(bad("bad permissions"))?;
    let device = leaf.flags & FLAG_DEVICE != 0;
    if device != region.device || (device && perms.exec()) {
        return Err(bad("memory type differs from the region's"));
    }
    if perms.write() && (slot.read_only || !region.writable) {
        return Err(bad("writable in a read-only memslot or region"));
    }
    Ok((ipa, pinned(vm, size, backing, seq).map_err(bad)?))
}

/// Checks that a mapping of `size` bytes at `ipa` to `pa` is one `slot`'s
/// layout can have made: a leaf size, aligned, inside the memslot, at the
/// PA that backs it. Returns its size and where it lives.
fn placed(vm: &AttachedVm, slot: &Memslot, ipa: Ipa, size: u64, pa: Pa) -> Result<(MapSize, Backing), &'static str> {
    let map_size = MapSize::from_bytes(size).ok_or("not a leaf size")?;
    if !ipa.is_aligned(size) || ipa.raw() < slot.gpa.raw() || ipa.raw().checked_add(size).is_none_or(|e| e > slot.end())
    {
        return Err("not an aligned leaf inside its memslot");
    }
    let backing = vm.layout.backing(slot, ipa).ok_or("outside the memslot's region")?;
    if backing.pa != pa || backing.offset + size > vm.layout.regions[backing.region].size {
        return Err("maps a PA the memslot does not back");
    }
    Ok((map_size, backing))
}

/// Pins a mapping [`placed`] checked: the mapping to record.
fn pinned(vm: &AttachedVm, size: MapSize, backing: Backing, seq: u64) -> Result<Installed, &'static str> {
    let pin = vm.mapping.pin(backing.region, backing.offset, size.bytes()).map_err(|_| "cannot be pinned")?;
    Ok(Installed::new(size, backing.pa, seq, pin.into_mapping()))
}

/// A takeover's handed-over records, every one of which the VM's layout
/// explains ([`check_handed`]): only these are adopted.
#[derive(Debug)]
pub struct CheckedRecords {
    records: HandedRecords,
    /// The table pool's windows as attached, which every free list handed
    /// over must lie in.
    windows: Vec<(Pa, u64)>,
    started: Instant,
    done: Rebuilt,
}

/// Checks the records the daemon that drained `vm` handed over against its
/// layout, as leaves from the core are checked (they come from another
/// process), and takes their table-pool free pages and sequence. The first
/// that fails refuses them all, with nothing taken: the caller rebuilds
/// from the core instead. Asks the core nothing.
pub fn check_handed(vm: &AttachedVm, mut records: HandedRecords) -> Result<CheckedRecords, RebuildError> {
    let started = Instant::now();
    let mut done = Rebuilt::default();
    let mut next_min = 0;
    for m in &records.mappings {
        check_mapping(vm, m, &mut next_min, records.next_order)?;
        done.mappings += 1;
        done.bytes += m.size;
    }
    let windows = vm.mapping.replace_pool(PagePool::default()).windows().to_vec();
    match check_free(&windows, &records.free) {
        Ok(held) => done.pool_pages_held = held,
        Err(e) => {
            vm.mapping.replace_pool(PagePool::new(windows));
            return Err(e);
        }
    }
    // Taken in the old daemon's order (not a sorted copy's).
    vm.mapping.replace_pool(PagePool::new(std::mem::take(&mut records.free)));
    vm.mapping.note_seq(records.seq);
    Ok(CheckedRecords { records, windows, started, done })
}

/// Checks one handed-over mapping: after `next_min` (which it moves past
/// it), installed before `next_order`, and one the layout can have made.
fn check_mapping(vm: &AttachedVm, m: &HandedMapping, next_min: &mut u64, next_order: u64) -> Result<(), RebuildError> {
    let bad = |why| RebuildError::BadRecord { ipa: m.ipa, why };
    if m.ipa.raw() < *next_min {
        return Err(bad("out of IPA order or overlapping"));
    }
    if m.order >= next_order {
        return Err(bad("install order past the next one"));
    }
    let slot = vm.layout.memslots.lookup(m.ipa).ok_or(bad("in no memslot"))?;
    placed(vm, slot, m.ipa, m.size, m.pa).map_err(bad)?;
    *next_min = m.ipa.raw() + m.size;
    Ok(())
}

/// Checks that the free table-pool pages handed over lie in the pool's
/// `windows`, none twice; returns how many pages the core holds.
fn check_free(windows: &[(Pa, u64)], free: &[(Pa, u64)]) -> Result<u64, RebuildError> {
    let mut free = free.to_vec();
    free.sort_unstable_by_key(|&(pa, _)| pa.raw());
    let mut next_free = 0;
    for &(pa, bytes) in &free {
        let end =
            pa.raw().checked_add(bytes).filter(|_| bytes > 0 && pa.is_aligned(PAGE_SIZE) && bytes % PAGE_SIZE == 0);
        let inside =
            end.is_some_and(|end| windows.iter().any(|&(base, len)| base.raw() <= pa.raw() && end <= base.raw() + len));
        if !inside || pa.raw() < next_free {
            return Err(RebuildError::BadFreePages { pa, bytes });
        }
        next_free = end.expect("checked");
    }
    let pool_bytes: u64 = windows.iter().map(|&(_, len)| len).sum();
    Ok((pool_bytes - free.iter().map(|&(_, b)| b).sum::<u64>()) / PAGE_SIZE)
}

/// Pins a checked mapping: what to record, and where its pages are (to
/// mark them populated, [`populated`]).
fn adopted(vm: &AttachedVm, m: &HandedMapping, seq: u64) -> Option<((Ipa, Installed), Backing)> {
    // Checked: in a memslot, placed inside its region (pinning cannot fail).
    let placed = vm.layout.memslots.lookup(m.ipa).and_then(|slot| placed(vm, slot, m.ipa, m.size, m.pa).ok());
    let (size, backing) = placed?;
    let installed = pinned(vm, size, backing, seq).ok()?;
    Some(((m.ipa, Installed { order: m.order, ..installed }), backing))
}

/// Marks (or clears) the `bytes` at `backing` as holding data, unless they
/// are device memory.
fn populated(vm: &AttachedVm, backing: Backing, bytes: u64, holds_data: bool) {
    if vm.layout.regions[backing.region].device {
        return;
    }
    if holds_data {
        vm.mapping.mark_populated(backing.region, backing.offset, bytes);
    } else {
        vm.mapping.clear_populated(backing.region, backing.offset, bytes);
    }
}

impl CheckedRecords {
    /// Pins and records every mapping into `held`, `vm`'s records, held
    /// since before its vCPUs were served (whatever reads them waits
    /// until this returns).
    pub fn adopt(self, vm: &AttachedVm, mut held: HeldRecords<'_>) -> Rebuilt {
        let seq = self.records.seq;
        let adopt = |m| {
            let (mapping, backing) = adopted(vm, m, seq)?;
            populated(vm, backing, mapping.1.size.bytes(), true);
            Some(mapping)
        };
        held.adopt(self.records.mappings.iter().filter_map(adopt).collect());
        held.release(self.records.next_order);
        Rebuilt { elapsed: self.started.elapsed(), ..self.done }
    }

    /// Adopts a warm takeover's snapshot, before `vm` is served (the old
    /// daemon still serves it): its delta follows ([`WarmRecords::amend`]).
    pub fn adopt_snapshot(self, vm: &AttachedVm) -> WarmRecords {
        let windows = self.windows.clone();
        let done = self.adopt(vm, vm.mapping.hold_records());
        WarmRecords { windows, done }
    }
}

/// A warm takeover's snapshot of records, adopted while the old daemon
/// still served the VM; what changed since follows once it is drained.
#[derive(Debug)]
pub struct WarmRecords {
    windows: Vec<(Pa, u64)>,
    done: Rebuilt,
}

impl WarmRecords {
    /// Amends the adopted records with `delta` (what changed since the
    /// snapshot, or since the last change), each change checked as the
    /// records were (and a removal must name a mapping they have). On a
    /// refusal everything adopted is let go ([`WarmRecords::undo`]): the
    /// caller rebuilds from the core.
    pub fn amend(self, vm: &AttachedVm, delta: HandedDelta) -> Result<Self, RebuildError> {
        match self.try_amend(vm, delta) {
            Ok(held) => Ok(Self { done: Rebuilt { pool_pages_held: held, ..self.done }, ..self }),
            Err(e) => {
                self.undo(vm);
                Err(e)
            }
        }
    }

    /// What `vm` holds now, adopted and amended (`elapsed` left to the
    /// caller: the part the guests waited for).
    pub fn adopted(&self, vm: &AttachedVm) -> Rebuilt {
        let (mappings, bytes) = (vm.mapping.mapping_count() as u64, vm.mapping.resident());
        Rebuilt { mappings, bytes, elapsed: Duration::ZERO, ..self.done }
    }

    fn try_amend(&self, vm: &AttachedVm, delta: HandedDelta) -> Result<u64, RebuildError> {
        let mut next_min = 0;
        for m in &delta.put {
            check_mapping(vm, m, &mut next_min, delta.next_order)?;
        }
        let held = check_free(&self.windows, &delta.free)?;
        let (put, backings): (Vec<_>, Vec<_>) = delta
            .put
            .iter()
            .filter_map(|m| adopted(vm, m, delta.seq))
            .map(|(mapping, backing)| {
                let bytes = mapping.1.size.bytes();
                (mapping, (backing, bytes))
            })
            .unzip();
        let gone = vm.mapping.amend(&delta.removed, put, delta.next_order).map_err(|ipa| RebuildError::BadRecord {
            ipa,
            why: "a change the snapshot cannot take (removes what it lacks, or overlaps)",
        })?;
        // A mapping that went may have been reclaimed (its backing punched,
        // the page in the swap store): its next fault must fill it. Then
        // the ones put (which may overlap what went) are marked.
        for (ipa, bytes) in gone {
            if let Some(backing) = vm.layout.memslots.lookup(ipa).and_then(|slot| vm.layout.backing(slot, ipa)) {
                populated(vm, backing, bytes, false);
            }
        }
        for (backing, bytes) in backings {
            populated(vm, backing, bytes, true);
        }
        vm.mapping.replace_pool(PagePool::new(delta.free));
        vm.mapping.note_seq(delta.seq);
        Ok(held)
    }

    /// Lets go of everything adopted (pins, records, populated marks, the
    /// snapshot's pool) and puts the pool's windows back: the VM is then
    /// rebuilt from the core.
    pub fn undo(self, vm: &AttachedVm) {
        vm.mapping.release_all();
        for (i, r) in vm.layout.regions.iter().enumerate() {
            vm.mapping.clear_populated(i, 0, r.size);
        }
        vm.mapping.replace_pool(PagePool::new(self.windows));
    }
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
    use crate::memory::handover::HandedMapping;
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

    /// A VM of `bytes` (one memslot at GPA over its whole region) with a
    /// table pool of 16 pages at 0x1000_0000.
    fn handed_vm(bytes: u64) -> AttachedVm {
        let layout = VmLayout::single_region(
            VmId::new(1).unwrap(),
            Pa::new(RAM_PA),
            bytes,
            4096,
            &[(GPA, bytes, 0, SlotFlags::default())],
        )
        .unwrap();
        AttachedVm::new(layout, PagePool::new(vec![(Pa::new(0x1000_0000), 16 * PAGE_SIZE)]))
    }

    fn handed(ipa: u64, size: u64, order: u64) -> HandedMapping {
        HandedMapping { ipa: Ipa::new(ipa), size, pa: Pa::new(RAM_PA + (ipa - GPA)), order }
    }

    #[test]
    fn handed_records_are_adopted_with_their_order_pool_and_sequence() {
        let vm = handed_vm(4 << 20);
        let records = HandedRecords {
            seq: 9,
            next_order: 40,
            mappings: vec![handed(GPA, PAGE_SIZE, 31), handed(GPA + (2 << 20), 2 << 20, 7)],
            free: vec![(Pa::new(0x1000_4000), 12 * PAGE_SIZE)],
        };
        let r = check_handed(&vm, records.clone()).unwrap().adopt(&vm, vm.mapping.hold_records());
        assert_eq!((r.mappings, r.bytes, r.pool_pages_held, r.commands), (2, PAGE_SIZE + (2 << 20), 4, 0));
        let orders: Vec<(u64, u64)> = vm.mapping.residents().iter().map(|m| (m.ipa.raw(), m.order)).collect();
        assert_eq!(orders, [(GPA, 31), (GPA + (2 << 20), 7)]);
        assert_eq!(vm.mapping.pins().total(), 1 + 512);
        assert!(vm.mapping.is_populated(0, 2 << 20, 2 << 20) && !vm.mapping.is_populated(0, PAGE_SIZE, PAGE_SIZE));
        assert_eq!(vm.mapping.sample_seq(), 9);
        assert_eq!(vm.mapping.take_table_pages(64), Some((Pa::new(0x1000_4000), 12)));
        // What the next daemon would be handed is what was adopted.
        let again = vm.mapping.handed_records();
        assert_eq!((again.seq, again.next_order, again.mappings), (9, 40, records.mappings));
    }

    #[test]
    fn handed_records_the_layout_cannot_explain_are_refused_and_nothing_is_kept() {
        let ok = || HandedRecords { seq: 1, next_order: 5, mappings: vec![handed(GPA, PAGE_SIZE, 0)], free: vec![] };
        let with = |m: HandedMapping| HandedRecords { mappings: vec![handed(GPA + 0x8000, PAGE_SIZE, 1), m], ..ok() };
        let cases: Vec<(HandedRecords, &str)> = vec![
            (with(HandedMapping { pa: Pa::new(RAM_PA), ..handed(GPA + 0x9000, PAGE_SIZE, 2) }), "maps a PA"),
            (with(handed(GPA + 0x1000, PAGE_SIZE, 2)), "out of IPA order"),
            (with(handed(GPA + 0x8000, PAGE_SIZE, 2)), "out of IPA order"),
            (with(handed(GPA + 0x9000, 8192, 2)), "not a leaf size"),
            (with(handed(GPA + 0x9000, 2 << 20, 2)), "not an aligned leaf"),
            (with(handed(GPA + (4 << 20), PAGE_SIZE, 2)), "in no memslot"),
            (with(handed(GPA + 0x9000, PAGE_SIZE, 5)), "install order"),
            (HandedRecords { free: vec![(Pa::new(0x1000_f000), 2 * PAGE_SIZE)], ..ok() }, "free table pages"),
            (HandedRecords { free: vec![(Pa::new(0x2000_0000), PAGE_SIZE)], ..ok() }, "free table pages"),
            (HandedRecords { free: vec![(Pa::new(0x1000_0000), 0)], ..ok() }, "free table pages"),
            (HandedRecords { free: vec![(Pa::new(0x1000_0800), PAGE_SIZE)], ..ok() }, "free table pages"),
            (
                HandedRecords {
                    free: vec![(Pa::new(0x1000_0000), 2 * PAGE_SIZE), (Pa::new(0x1000_1000), PAGE_SIZE)],
                    ..ok()
                },
                "free table pages",
            ),
        ];
        for (records, why) in cases {
            let vm = handed_vm(4 << 20);
            let err = check_handed(&vm, records).expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
            assert_eq!((vm.mapping.mapping_count(), vm.mapping.pins().total()), (0, 0), "{why}: nothing kept");
            assert_eq!(vm.mapping.take_table_pages(64), Some((Pa::new(0x1000_0000), 16)), "{why}: the pool as it was");
        }
    }

    /// A warm snapshot of three mappings (two 4 KiB, one 2 MiB) adopted
    /// into a fresh 4 MiB VM.
    fn warm_vm() -> (AttachedVm, HandedRecords, WarmRecords) {
        let vm = handed_vm(4 << 20);
        let snapshot = HandedRecords {
            seq: 3,
            next_order: 3,
            mappings: vec![
                handed(GPA, PAGE_SIZE, 0),
                handed(GPA + PAGE_SIZE, PAGE_SIZE, 1),
                handed(GPA + (2 << 20), 2 << 20, 2),
            ],
            free: vec![(Pa::new(0x1000_0000), 16 * PAGE_SIZE)],
        };
        let warm = check_handed(&vm, snapshot.clone()).unwrap().adopt_snapshot(&vm);
        (vm, snapshot, warm)
    }

    #[test]
    fn a_warm_snapshot_amended_with_its_delta_is_what_the_old_daemon_held_at_the_drain() {
        let (vm, snapshot, warm) = warm_vm();
        assert_eq!(vm.mapping.pins().total(), 2 + 512);
        // Meanwhile the old daemon evicted the second page and the 2 MiB
        // block, installed a page in a hole, and gave the core a pool page.
        let drained = HandedRecords {
            seq: 8,
            next_order: 5,
            mappings: vec![handed(GPA, PAGE_SIZE, 0), handed(GPA + 0x5000, PAGE_SIZE, 4)],
            free: vec![(Pa::new(0x1000_1000), 15 * PAGE_SIZE)],
        };
        let delta = HandedDelta::between(&snapshot, &drained);
        let r = warm.amend(&vm, delta).unwrap().adopted(&vm);
        assert_eq!((r.mappings, r.bytes, r.pool_pages_held), (2, 2 * PAGE_SIZE, 1));
        // Exactly the old daemon's records, pins and all.
        let now = vm.mapping.handed_records();
        assert_eq!((now.seq, now.next_order, now.mappings), (8, 5, drained.mappings));
        assert_eq!(vm.mapping.pins().total(), 2);
        assert_eq!(vm.mapping.resident(), 2 * PAGE_SIZE);
        assert_eq!(vm.mapping.take_table_pages(64), Some((Pa::new(0x1000_1000), 15)));
        // What went may have been reclaimed: its next fault fills it.
        assert!(!vm.mapping.is_populated(0, PAGE_SIZE, PAGE_SIZE));
        assert!(!vm.mapping.is_populated(0, 2 << 20, PAGE_SIZE));
        assert!(vm.mapping.is_populated(0, 0, PAGE_SIZE) && vm.mapping.is_populated(0, 0x5000, PAGE_SIZE));
    }

    #[test]
    fn a_delta_the_snapshot_cannot_take_lets_everything_go_for_a_rebuild() {
        let put = |m: HandedMapping| HandedDelta { seq: 4, next_order: 9, put: vec![m], ..HandedDelta::default() };
        let cases: Vec<(HandedDelta, &str)> = vec![
            // Removes what the snapshot lacks.
            (
                HandedDelta { next_order: 9, removed: vec![Ipa::new(GPA + 0x9000)], ..HandedDelta::default() },
                "cannot take",
            ),
            // Overlaps the 2 MiB block from below, and from inside it.
            (put(handed(GPA, 2 << 20, 5)), "cannot take"),
            (put(handed(GPA + (2 << 20) + PAGE_SIZE, PAGE_SIZE, 5)), "cannot take"),
            // Checked as records are.
            (put(handed(GPA + (4 << 20), PAGE_SIZE, 5)), "in no memslot"),
            (put(handed(GPA + 0x9000, PAGE_SIZE, 9)), "install order"),
            (
                HandedDelta { next_order: 9, free: vec![(Pa::new(0x2000_0000), PAGE_SIZE)], ..HandedDelta::default() },
                "free table pages",
            ),
        ];
        for (delta, why) in cases {
            let (vm, _, warm) = warm_vm();
            let err = warm.amend(&vm, delta).map(|_| ()).expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
            assert_eq!((vm.mapping.mapping_count(), vm.mapping.pins().total()), (0, 0), "{why}: nothing kept");
            assert_eq!(vm.mapping.resident(), 0, "{why}");
            assert!(!vm.mapping.is_populated(0, 0, 4 << 20), "{why}");
            assert_eq!(
                vm.mapping.take_table_pages(64),
                Some((Pa::new(0x1000_0000), 16)),
                "{why}: the pool as attached"
            );
        }
    }
}
