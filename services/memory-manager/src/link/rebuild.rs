//! Re-attach: a daemon that takes over a VM whose previous daemon died (or
//! handed it over) rebuilds its mapping state from the truth, the core's
//! tables and page ownership, asked over the control ring: LEAVES for the
//! installed leaves of every memslot, OWNED for the table-pool pages the
//! core already holds. Every leaf is checked against the VM's layout as
//! untrusted input; each one that passes is pinned and recorded as if its
//! MAP had just been confirmed, and its pages marked populated.

use std::time::{Duration, Instant};

use hyp_core::addr::{Ipa, Pa, PAGE_SIZE};
use hyp_core::ring::abi::{kind, LeafRecord, FLAG_DEVICE, MAX_OWNED_PAGES};
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
    for slot in vm.layout.memslots.iter() {
        let end = slot.end();
        let mut from = slot.gpa.raw();
        while from < end {
            let (leaves, result) = vm.control.leaves(Ipa::new(from), end - from)?;
            done.commands += 1;
            vm.mapping.note_seq(result.inval_seq);
            let mut next_min = from;
            for leaf in &leaves {
                let ipa = Ipa::new(leaf.ipa);
                if leaf.ipa < next_min {
                    return Err(RebuildError::BadLeaf { ipa, why: "out of IPA order or overlapping" });
                }
                let size = record(vm, slot, leaf, result.inval_seq)?;
                next_min = leaf.ipa + size;
                done.mappings += 1;
                done.bytes += size;
            }
            let next = result.detail;
            if next <= from || next > end || next < next_min.min(end) {
                return Err(RebuildError::NoProgress(Ipa::new(from)));
            }
            from = next;
        }
    }
    let windows = vm.mapping.replace_pool(PagePool::default()).windows().to_vec();
    let mut free = Vec::new();
    for (base, bytes) in windows {
        let pages = bytes / PAGE_SIZE;
        let mut page = 0;
        while page < pages {
            let n = (pages - page).min(MAX_OWNED_PAGES);
            let first = base.raw() + page * PAGE_SIZE;
            let held = vm.control.owned(Pa::new(first), n)?;
            done.commands += 1;
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
            page += n;
        }
    }
    // Taken from the end, as at attach: the windows in their order.
    free.reverse();
    vm.mapping.replace_pool(PagePool::new(free));
    done.elapsed = started.elapsed();
    Ok(done)
}

/// Checks one reported leaf against the layout, then pins and records it;
/// returns its size.
fn record(vm: &AttachedVm, slot: &Memslot, leaf: &LeafRecord, seq: u64) -> Result<u64, RebuildError> {
    let ipa = Ipa::new(leaf.ipa);
    let bad = |why| RebuildError::BadLeaf { ipa, why };
    if leaf.kind != kind::LEAF || leaf.reserved != [0; 3] {
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
    vm.mapping.record_installed(ipa, Installed::new(size, backing.pa, seq, pin.into_mapping()));
    if !device {
        vm.mapping.mark_populated(backing.region, backing.offset, leaf.size);
    }
    Ok(leaf.size)
}
