//! A software stage-2 MMU: walks the descriptor bytes in table memory the
//! way the hardware would, from VTCR_EL2 and VTTBR_EL2 alone (not with
//! hyp-core's walker, so a disagreement between the two is caught), with a
//! small per-vCPU TLB that the core's TLB maintenance invalidates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyp_core::addr::Ipa;
use hyp_core::stage2::TlbMaintenance;

use crate::phys::PhysMemory;

/// The kind of access being translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

/// A stage-2 fault as the walk found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage2Fault {
    /// No valid descriptor at `level`.
    Translation {
        /// Level.
        level: u8,
    },
    /// The leaf at `level` has AF clear.
    AccessFlag {
        /// Level.
        level: u8,
    },
    /// The leaf at `level` does not allow the access.
    Permission {
        /// Level.
        level: u8,
    },
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Output PA of the access.
    pub pa: u64,
    /// Level of the leaf.
    pub level: u8,
}

const OA_MASK: u64 = 0x0000_ffff_ffff_f000;
/// A leaf's access flag.
const AF: u64 = 1 << 10;
/// VTCR_EL2.HA: the walker sets access flags (FEAT_HAFDBS).
const VTCR_HA: u64 = 1 << 21;

/// How one walk ended without a leaf.
enum Walked {
    /// A stage-2 fault.
    Fault(Stage2Fault),
    /// The descriptor changed under the walker's access-flag update.
    Changed,
}

impl From<Stage2Fault> for Walked {
    fn from(f: Stage2Fault) -> Self {
        Self::Fault(f)
    }
}

/// The stage-2 registers the core programs.
#[derive(Clone, Copy, Debug)]
pub struct Stage2Regs {
    /// VTCR_EL2.
    pub vtcr: u64,
    /// VTTBR_EL2.
    pub vttbr: u64,
}

/// A valid, accessed leaf and what it allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Output PA of the walked address.
    pub pa: u64,
    /// Level of the leaf.
    pub level: u8,
    /// S2AP[0].
    pub read: bool,
    /// S2AP[1].
    pub write: bool,
    /// Not XN (and readable).
    pub exec: bool,
}

impl Leaf {
    /// True if the leaf allows `access`.
    pub fn allows(&self, access: AccessKind) -> bool {
        match access {
            AccessKind::Read => self.read,
            AccessKind::Write => self.write,
            AccessKind::Fetch => self.exec,
        }
    }
}

impl Stage2Regs {
    /// Walks `ipa` for `access` through the tables in `mem`.
    pub fn walk(&self, mem: &PhysMemory, ipa: u64, access: AccessKind) -> Result<Translation, Stage2Fault> {
        let leaf = self.walk_leaf(mem, ipa)?;
        if !leaf.allows(access) {
            return Err(Stage2Fault::Permission { level: leaf.level });
        }
        Ok(Translation { pa: leaf.pa, level: leaf.level })
    }

    /// Walks `ipa` to its leaf (translation and access-flag faults only).
    /// With `VTCR_EL2.HA` set (FEAT_HAFDBS), a leaf with the access flag
    /// clear gets it set by the walk, atomically as the hardware does,
    /// instead of an access-flag fault; a descriptor that changed under the
    /// update is walked again.
    pub fn walk_leaf(&self, mem: &PhysMemory, ipa: u64) -> Result<Leaf, Stage2Fault> {
        loop {
            match self.walk_once(mem, ipa) {
                Err(Walked::Changed) => continue,
                Err(Walked::Fault(f)) => return Err(f),
                Ok(leaf) => return Ok(leaf),
            }
        }
    }

    /// True if the walker sets access flags itself (`VTCR_EL2.HA`).
    pub fn hardware_access_flag(&self) -> bool {
        self.vtcr & VTCR_HA != 0
    }

    fn walk_once(&self, mem: &PhysMemory, ipa: u64) -> Result<Leaf, Walked> {
        let t0sz = (self.vtcr & 0x3f) as u32;
        let ipa_bits = 64 - t0sz;
        // VTCR_EL2.SL0 with a 4 KiB granule: 0 = level 2, 1 = level 1, 2 = level 0.
        let start: u8 = match (self.vtcr >> 6) & 3 {
            0 => 2,
            1 => 1,
            _ => 0,
        };
        if ipa >> ipa_bits != 0 {
            return Err(Stage2Fault::Translation { level: start }.into());
        }
        let mut table = self.vttbr & 0x0000_ffff_ffff_fffe;
        let mut level = start;
        loop {
            let shift = 12 + 9 * (3 - level as u32);
            let bits = if level == start { ipa_bits - shift } else { 9 };
            let index = (ipa >> shift) & ((1 << bits) - 1);
            let desc = mem.load(table + index * 8, 8).ok_or(Stage2Fault::Translation { level })?;
            if desc & 1 == 0 {
                return Err(Stage2Fault::Translation { level }.into());
            }
            let table_or_page = desc & 2 != 0;
            if level < 3 && table_or_page {
                table = desc & OA_MASK;
                level += 1;
                continue;
            }
            if (level == 3 && !table_or_page) || level == 0 {
                // Reserved encodings fault as translation faults.
                return Err(Stage2Fault::Translation { level }.into());
            }
            if desc & AF == 0 {
                if !self.hardware_access_flag() {
                    return Err(Stage2Fault::AccessFlag { level }.into());
                }
                let word = mem.word(table + index * 8).ok_or(Stage2Fault::Translation { level })?;
                if word.compare_exchange(desc, desc | AF, Ordering::AcqRel, Ordering::Acquire).is_err() {
                    return Err(Walked::Changed);
                }
            }
            let s2ap = (desc >> 6) & 3;
            let block_mask = (1u64 << shift) - 1;
            return Ok(Leaf {
                pa: (desc & OA_MASK & !block_mask) | (ipa & block_mask),
                level,
                read: s2ap & 1 != 0,
                write: s2ap & 2 != 0,
                exec: s2ap & 1 != 0 && desc & (1 << 54) == 0,
            });
        }
    }
}

/// The TLB generation: bumped by every invalidation the core issues; a TLB
/// entry is only used while its generation is current. Each vCPU says which
/// generation an access in flight translated with, and the core's sync
/// (its DSB after TLBI) waits until no access of an older generation is in
/// flight, as hardware does: a store that translated before a page was
/// write-protected or unmapped lands before the core goes on (before the
/// daemon copies the page out and punches it).
#[derive(Clone, Debug)]
pub struct TlbGeneration {
    current: Arc<AtomicU64>,
    /// Per vCPU: the generation of its access in flight, 0 when none.
    in_flight: Arc<[AtomicU64]>,
}

impl Default for TlbGeneration {
    fn default() -> Self {
        Self::new(0)
    }
}

impl TlbGeneration {
    /// Generations for `vcpus` vCPUs (the first is 1: 0 means idle).
    pub fn new(vcpus: u32) -> Self {
        Self { current: Arc::new(AtomicU64::new(1)), in_flight: (0..vcpus).map(|_| AtomicU64::new(0)).collect() }
    }

    /// The current generation.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// Marks an access of `vcpu` in flight and returns the generation it
    /// must translate with.
    fn begin(&self, vcpu: usize) -> u64 {
        loop {
            let g = self.current.load(Ordering::SeqCst);
            self.in_flight[vcpu].store(g, Ordering::SeqCst);
            // A sync that bumped the generation after our read either sees
            // our mark (and waits for us) or we see its bump (and retry).
            if self.current.load(Ordering::SeqCst) == g {
                return g;
            }
        }
    }

    /// Ends `vcpu`'s access.
    fn end(&self, vcpu: usize) {
        self.in_flight[vcpu].store(0, Ordering::Release);
    }
}

impl TlbMaintenance for TlbGeneration {
    fn invalidate_ipa(&mut self, _vmid: u8, _ipa: Ipa, _level: u8) {
        self.current.fetch_add(1, Ordering::SeqCst);
    }

    fn sync(&mut self, _vmid: u8) {
        let new = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        for slot in self.in_flight.iter() {
            while matches!(slot.load(Ordering::SeqCst), g if g != 0 && g < new) {
                std::thread::yield_now();
            }
        }
    }
}

const TLB_ENTRIES: usize = 64;

#[derive(Clone, Copy, Default)]
struct TlbEntry {
    valid: bool,
    page: u64,
    pa_page: u64,
    read: bool,
    write: bool,
    exec: bool,
    generation: u64,
}

/// A direct-mapped 64-entry TLB of 4 KiB translations.
pub struct Tlb {
    entries: [TlbEntry; TLB_ENTRIES],
    generation: TlbGeneration,
    /// The vCPU it belongs to (its in-flight slot).
    vcpu: usize,
    /// Hits.
    pub hits: u64,
    /// Misses (walks).
    pub misses: u64,
}

impl Tlb {
    /// An empty TLB of vCPU `vcpu`, following `generation`.
    pub fn new(generation: TlbGeneration, vcpu: u32) -> Self {
        Self { entries: [TlbEntry::default(); TLB_ENTRIES], generation, vcpu: vcpu as usize, hits: 0, misses: 0 }
    }

    /// Translates `ipa` for `access` and runs `access_pa` on the PA while
    /// the access is in flight (a sync of the core waits for it).
    pub fn access<R>(
        &mut self,
        regs: &Stage2Regs,
        mem: &PhysMemory,
        ipa: u64,
        access: AccessKind,
        access_pa: impl FnOnce(u64) -> R,
    ) -> Result<R, Stage2Fault> {
        let gen = self.generation.begin(self.vcpu);
        let done = self.translate(regs, mem, ipa, access, gen).map(access_pa);
        self.generation.end(self.vcpu);
        done
    }

    /// Translates through the TLB with generation `gen`, walking on a miss.
    fn translate(
        &mut self,
        regs: &Stage2Regs,
        mem: &PhysMemory,
        ipa: u64,
        access: AccessKind,
        gen: u64,
    ) -> Result<u64, Stage2Fault> {
        let page = ipa >> 12;
        let slot = (page as usize) % TLB_ENTRIES;
        let e = self.entries[slot];
        let allowed = match access {
            AccessKind::Read => e.read,
            AccessKind::Write => e.write,
            AccessKind::Fetch => e.exec,
        };
        if e.valid && e.page == page && e.generation == gen && allowed {
            self.hits += 1;
            return Ok((e.pa_page << 12) | (ipa & 0xfff));
        }
        self.misses += 1;
        let leaf = regs.walk_leaf(mem, ipa)?;
        self.entries[slot] = TlbEntry {
            valid: true,
            page,
            pa_page: leaf.pa >> 12,
            read: leaf.read,
            write: leaf.write,
            exec: leaf.exec,
            generation: gen,
        };
        if !leaf.allows(access) {
            return Err(Stage2Fault::Permission { level: leaf.level });
        }
        Ok(leaf.pa)
    }
}
