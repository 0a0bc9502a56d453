//! The guest's own stage-1 translation (4 KiB granule, TTBR0_EL1 only),
//! composed with the stage-2 walk as the hardware composes them: every
//! stage-1 table descriptor is read through stage 2, so an unmapped table
//! page is a stage-2 abort with S1PTW set; with TCR_EL1.HA the walker sets a
//! leaf's access flag itself, which is a stage-2 *write* to the table page.
//! Faults the guest's own tables cause are reported as stage-1 faults (the
//! guest's business, never the daemon's).

use crate::mmu::{AccessKind, Stage2Fault, Stage2Regs};
use crate::phys::PhysMemory;

const OA_MASK: u64 = 0x0000_ffff_ffff_f000;
const AF: u64 = 1 << 10;
/// AP[2]: read-only at EL1.
const AP_RO: u64 = 1 << 7;
/// PXN: not executable at EL1.
const PXN: u64 = 1 << 53;
/// TCR_EL1.HA: hardware access-flag updates.
pub const TCR_HA: u64 = 1 << 39;

/// The guest's stage-1 registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stage1Regs {
    /// SCTLR_EL1.M.
    pub mmu_on: bool,
    /// TTBR0_EL1 (an IPA).
    pub ttbr0: u64,
    /// TCR_EL1 (T0SZ and HA are used).
    pub tcr: u64,
}

/// A fault the guest's own tables cause (taken by the guest, at EL1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage1Fault {
    /// No valid descriptor at `level`.
    Translation {
        /// Level.
        level: u8,
    },
    /// AF clear and no hardware update.
    AccessFlag {
        /// Level.
        level: u8,
    },
    /// The leaf forbids the access.
    Permission {
        /// Level.
        level: u8,
    },
}

/// Why a translation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// A stage-2 abort (the daemon's business).
    Stage2 {
        /// The stage-2 fault.
        fault: Stage2Fault,
        /// On the stage-1 walk (a table read, or the walker's AF write).
        s1ptw: bool,
        /// The IPA stage 2 was asked for (a descriptor's, or the access's).
        ipa: u64,
    },
    /// A stage-1 fault (the guest's).
    Stage1(Stage1Fault),
}

/// What a walk needs besides the registers.
pub struct Walker<'a> {
    /// Stage 1.
    pub s1: Stage1Regs,
    /// Stage 2.
    pub s2: Stage2Regs,
    /// Physical memory.
    pub mem: &'a PhysMemory,
}

impl Walker<'_> {
    fn stage2(&self, ipa: u64, access: AccessKind, s1ptw: bool) -> Result<u64, WalkError> {
        self.s2.walk(self.mem, ipa, access).map(|t| t.pa).map_err(|fault| WalkError::Stage2 { fault, s1ptw, ipa })
    }

    /// The IPA of `va` for `access` (stage 1 only: what AT S1E1R computes).
    pub fn stage1(&self, va: u64, access: AccessKind) -> Result<u64, WalkError> {
        if !self.s1.mmu_on {
            return Ok(va);
        }
        let t0sz = (self.s1.tcr & 0x3f) as u32;
        let va_bits = 64 - t0sz;
        if va >> va_bits != 0 {
            return Err(WalkError::Stage1(Stage1Fault::Translation { level: 0 }));
        }
        // 9 bits per level over 12 bits of page offset.
        let levels = (va_bits - 12).div_ceil(9);
        let mut level = (4 - levels) as u8;
        let mut table = self.s1.ttbr0 & OA_MASK;
        loop {
            let shift = 12 + 9 * (3 - level as u32);
            let bits = (va_bits - shift).min(9);
            let desc_ipa = table + ((va >> shift) & ((1 << bits) - 1)) * 8;
            // The walker reads the descriptor through stage 2.
            let desc_pa = self.stage2(desc_ipa, AccessKind::Read, true)?;
            let desc = self.mem.load(desc_pa, 8).ok_or(WalkError::Stage1(Stage1Fault::Translation { level }))?;
            if desc & 1 == 0 {
                return Err(WalkError::Stage1(Stage1Fault::Translation { level }));
            }
            let table_or_page = desc & 2 != 0;
            if level < 3 && table_or_page {
                table = desc & OA_MASK;
                level += 1;
                continue;
            }
            if level == 3 && !table_or_page {
                return Err(WalkError::Stage1(Stage1Fault::Translation { level }));
            }
            if desc & AF == 0 {
                if self.s1.tcr & TCR_HA == 0 {
                    return Err(WalkError::Stage1(Stage1Fault::AccessFlag { level }));
                }
                // The walker writes AF through stage 2: a write on the walk.
                let pa = self.stage2(desc_ipa, AccessKind::Write, true)?;
                self.mem.store(pa, 8, desc | AF).ok_or(WalkError::Stage1(Stage1Fault::Translation { level }))?;
            }
            let forbidden = match access {
                AccessKind::Write => desc & AP_RO != 0,
                AccessKind::Fetch => desc & PXN != 0,
                AccessKind::Read => false,
            };
            if forbidden {
                return Err(WalkError::Stage1(Stage1Fault::Permission { level }));
            }
            let block = (1u64 << shift) - 1;
            return Ok((desc & OA_MASK & !block) | (va & block));
        }
    }

    /// The PA of `va` for `access`: stage 1, then stage 2.
    pub fn translate(&self, va: u64, access: AccessKind) -> Result<u64, WalkError> {
        let ipa = self.stage1(va, access)?;
        self.stage2(ipa, access, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phys::Window;
    use hyp_core::stage2::{AccessFlagUpdate, Geometry};

    const TABLES_PA: u64 = 0x2000_0000;
    const RAM_PA: u64 = 0x4000_0000;
    /// Stage-1 tables (IPA = PA here: stage 2 maps them identity).
    const PT: u64 = 0x4010_0000;
    const DATA: u64 = 0x4020_0000;
    const TCR: u64 = 25 | TCR_HA;

    /// RAM and a stage-2 table window with a hand-built identity map of
    /// selected 4 KiB pages (independent of hyp-core's walker).
    struct Machine {
        mem: PhysMemory,
        next_table: std::cell::Cell<u64>,
    }

    impl Machine {
        fn new() -> Self {
            let mut mem = PhysMemory::default();
            mem.add(Window::create("tables", TABLES_PA, 1 << 20, 4096).unwrap());
            mem.add(Window::create("ram", RAM_PA, 4 << 20, 4096).unwrap());
            // Two concatenated level-1 root pages (40-bit IPA), then tables.
            Self { mem, next_table: std::cell::Cell::new(TABLES_PA + 0x2000) }
        }

        fn s2(&self) -> Stage2Regs {
            Stage2Regs { vtcr: Geometry::kvm_default().vtcr(AccessFlagUpdate::Fault), vttbr: TABLES_PA }
        }

        fn table_at(&self, slot: u64) -> u64 {
            let desc = self.mem.load(slot, 8).unwrap();
            if desc & 1 != 0 {
                return desc & OA_MASK;
            }
            let t = self.next_table.get();
            self.next_table.set(t + 0x1000);
            self.mem.store(slot, 8, t | 3).unwrap();
            t
        }

        /// Maps the 4 KiB page at `ipa` to itself at stage 2.
        fn map(&self, ipa: u64, write: bool) {
            let l2 = self.table_at(TABLES_PA + (ipa >> 30) * 8);
            let l3 = self.table_at(l2 + ((ipa >> 21) & 511) * 8);
            let s2ap = if write { 3 } else { 1 };
            self.mem.store(l3 + ((ipa >> 12) & 511) * 8, 8, ipa | AF | s2ap << 6 | 0xf << 2 | 3).unwrap();
        }

        /// Guest tables at PT: identity for DATA's page, AF as given.
        fn guest_tables(&self, af: bool) {
            let (l1, l2, l3) = (PT, PT + 0x1000, PT + 0x2000);
            self.mem.store(l1 + ((DATA >> 30) & 511) * 8, 8, l2 | 3).unwrap();
            self.mem.store(l2 + ((DATA >> 21) & 511) * 8, 8, l3 | 3).unwrap();
            let leaf = DATA | 3 << 8 | if af { AF } else { 0 } | 3;
            self.mem.store(l3 + ((DATA >> 12) & 511) * 8, 8, leaf).unwrap();
        }

        fn walker(&self, s1: Stage1Regs) -> Walker<'_> {
            Walker { s1, s2: self.s2(), mem: &self.mem }
        }
    }

    fn on(tcr: u64) -> Stage1Regs {
        Stage1Regs { mmu_on: true, ttbr0: PT, tcr }
    }

    #[test]
    fn table_pages_fault_at_stage_2_on_the_walk_then_the_data_page_does() {
        let m = Machine::new();
        m.guest_tables(true);
        let w = m.walker(on(TCR));
        let walk = |ipa| WalkError::Stage2 { fault: Stage2Fault::Translation { level: 1 }, s1ptw: true, ipa };
        // Nothing mapped at stage 2: the root table's descriptor read faults.
        assert_eq!(w.translate(DATA + 8, AccessKind::Read), Err(walk(PT + ((DATA >> 30) & 511) * 8)));
        for (i, page) in [PT, PT + 0x1000, PT + 0x2000].into_iter().enumerate() {
            m.map(page, false);
            match w.translate(DATA + 8, AccessKind::Read) {
                Err(WalkError::Stage2 { s1ptw: true, ipa, .. }) => assert_eq!(ipa & !0xfff, page + 0x1000, "table {i}"),
                Err(WalkError::Stage2 { s1ptw: false, ipa, .. }) => assert_eq!((i, ipa), (2, DATA + 8)),
                other => panic!("{other:?}"),
            }
        }
        m.map(DATA, true);
        assert_eq!(w.translate(DATA + 8, AccessKind::Write), Ok(DATA + 8));
        // AT S1E1R: stage 1 only.
        assert_eq!(w.stage1(DATA + 8, AccessKind::Read), Ok(DATA + 8));
        // MMU off: the VA is the IPA.
        let off = m.walker(Stage1Regs::default());
        assert_eq!(off.translate(DATA + 8, AccessKind::Read), Ok(DATA + 8));
    }

    #[test]
    fn the_walker_sets_the_access_flag_through_stage_2() {
        let m = Machine::new();
        m.guest_tables(false);
        for page in [PT, PT + 0x1000, PT + 0x2000] {
            m.map(page, false);
        }
        m.map(DATA, true);
        let leaf_ipa = PT + 0x2000 + ((DATA >> 12) & 511) * 8;
        // The table page is read-only at stage 2: the AF write faults there.
        let w = m.walker(on(TCR));
        assert_eq!(
            w.translate(DATA, AccessKind::Read),
            Err(WalkError::Stage2 { fault: Stage2Fault::Permission { level: 3 }, s1ptw: true, ipa: leaf_ipa })
        );
        assert_eq!(m.mem.load(leaf_ipa, 8).unwrap() & AF, 0, "nothing written");
        // Writable: the walker sets AF and the access goes on.
        m.map(PT + 0x2000, true);
        assert_eq!(w.translate(DATA, AccessKind::Read), Ok(DATA));
        assert_ne!(m.mem.load(leaf_ipa, 8).unwrap() & AF, 0, "AF set by the walker");
        // Without TCR.HA an AF-clear leaf is the guest's access-flag fault.
        m.guest_tables(false);
        let no_ha = m.walker(on(25));
        assert_eq!(
            no_ha.translate(DATA, AccessKind::Read),
            Err(WalkError::Stage1(Stage1Fault::AccessFlag { level: 3 }))
        );
    }
}
