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
    pub fn walk_leaf(&self, mem: &PhysMemory, ipa: u64) -> Result<Leaf, Stage2Fault> {
        let t0sz = (self.vtcr & 0x3f) as u32;
        let ipa_bits = 64 - t0sz;
        // VTCR_EL2.SL0 with a 4 KiB granule: 0 = level 2, 1 = level 1, 2 = level 0.
        let start: u8 = match (self.vtcr >> 6) & 3 {
            0 => 2,
            1 => 1,
            _ => 0,
        };
        if ipa >> ipa_bits != 0 {
            return Err(Stage2Fault::Translation { level: start });
        }
        let mut table = self.vttbr & 0x0000_ffff_ffff_fffe;
        let mut level = start;
        loop {
            let shift = 12 + 9 * (3 - level as u32);
            let bits = if level == start { ipa_bits - shift } else { 9 };
            let index = (ipa >> shift) & ((1 << bits) - 1);
            let desc = mem.load(table + index * 8, 8).ok_or(Stage2Fault::Translation { level })?;
            if desc & 1 == 0 {
                return Err(Stage2Fault::Translation { level });
            }
            let table_or_page = desc & 2 != 0;
            if level < 3 && table_or_page {
                table = desc & OA_MASK;
                level += 1;
                continue;
            }
            if (level == 3 && !table_or_page) || level == 0 {
                // Reserved encodings fault as translation faults.
                return Err(Stage2Fault::Translation { level });
            }
            if desc & (1 << 10) == 0 {
                return Err(Stage2Fault::AccessFlag { level });
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
/// entry is only used while its generation is current.
#[derive(Clone, Debug, Default)]
pub struct TlbGeneration(Arc<AtomicU64>);

impl TlbGeneration {
    /// The current generation.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl TlbMaintenance for TlbGeneration {
    fn invalidate_ipa(&mut self, _vmid: u8, _ipa: Ipa, _level: u8) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    fn sync(&mut self, _vmid: u8) {
        self.0.fetch_add(1, Ordering::AcqRel);
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
    /// Hits.
    pub hits: u64,
    /// Misses (walks).
    pub misses: u64,
}

impl Tlb {
    /// An empty TLB following `generation`.
    pub fn new(generation: TlbGeneration) -> Self {
        Self { entries: [TlbEntry::default(); TLB_ENTRIES], generation, hits: 0, misses: 0 }
    }

    /// Translates through the TLB, walking on a miss.
    pub fn translate(
        &mut self,
        regs: &Stage2Regs,
        mem: &PhysMemory,
        ipa: u64,
        access: AccessKind,
    ) -> Result<u64, Stage2Fault> {
        let page = ipa >> 12;
        let gen = self.generation.current();
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
