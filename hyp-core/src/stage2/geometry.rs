//! Stage-2 geometry: IPA size, start level, concatenated root tables, and the
//! VTCR_EL2 / VTTBR_EL2 values that describe them to the hardware.
//!
//! With a 4 KiB granule a level covers 9 IPA bits and up to 16 root tables
//! may be concatenated (Arm ARM D8.2.7 "Concatenating translation tables at
//! the initial level of lookup"). Like KVM (`stage2_pgtable_levels(ipa) =
//! ARM64_HW_PGTABLE_LEVELS(ipa - 4)`), we use as few levels as concatenation
//! allows: a 40-bit IPA starts at level 1 with two concatenated tables, a
//! 48-bit IPA at level 0 with one.

use aarch64_cpu::registers::{VTCR_EL2, VTTBR_EL2};
use tock_registers::LocalRegisterCopy;

use crate::addr::{Ipa, Pa, PAGE_SHIFT, PAGE_SIZE};

/// Descriptors per 4 KiB table.
pub const ENTRIES_PER_TABLE: usize = 512;
/// The last (page) level.
pub const LEAF_LEVEL: u8 = 3;

/// Why a geometry cannot be built.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GeometryError {
    /// IPA size outside 32..=48 bits.
    UnsupportedIpaBits(u8),
    /// PA size not one of 32, 36, 40, 42, 44, 48 bits.
    UnsupportedPaBits(u8),
    /// The IPA space is larger than the PA space can describe.
    IpaLargerThanPa,
}

/// The shape of one VM's stage-2 tables.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Geometry {
    ipa_bits: u8,
    pa_bits: u8,
    start_level: u8,
    root_tables: u8,
}

impl Geometry {
    /// Geometry for an `ipa_bits` IPA space over a `pa_bits` physical space.
    pub const fn new(ipa_bits: u8, pa_bits: u8) -> Result<Self, GeometryError> {
        if ipa_bits < 32 || ipa_bits > 48 {
            return Err(GeometryError::UnsupportedIpaBits(ipa_bits));
        }
        if !matches!(pa_bits, 32 | 36 | 40 | 42 | 44 | 48) {
            return Err(GeometryError::UnsupportedPaBits(pa_bits));
        }
        if ipa_bits > pa_bits {
            return Err(GeometryError::IpaLargerThanPa);
        }
        // Levels needed when the root may absorb up to 4 extra bits by concatenation.
        let levels = (ipa_bits - 4 - 4) / 9;
        let start_level = 4 - levels;
        let root_bits = ipa_bits as u32 - Self::level_shift(start_level);
        let root_tables = if root_bits > 9 { 1 << (root_bits - 9) } else { 1 };
        Ok(Self { ipa_bits, pa_bits, start_level, root_tables })
    }

    /// KVM's default: 40-bit IPA, two concatenated level-1 roots.
    pub const fn kvm_default() -> Self {
        match Self::new(40, 40) {
            Ok(g) => g,
            Err(_) => unreachable!(),
        }
    }

    /// IPA size in bits.
    pub const fn ipa_bits(&self) -> u8 {
        self.ipa_bits
    }

    /// PA size in bits.
    pub const fn pa_bits(&self) -> u8 {
        self.pa_bits
    }

    /// Level of the root table(s).
    pub const fn start_level(&self) -> u8 {
        self.start_level
    }

    /// Number of concatenated root tables (1 to 16).
    pub const fn root_tables(&self) -> usize {
        self.root_tables as usize
    }

    /// Bytes of IPA space (`1 << ipa_bits`).
    pub const fn ipa_size(&self) -> u64 {
        1 << self.ipa_bits
    }

    /// True if `[ipa, ipa + len)` lies inside the IPA space.
    pub const fn ipa_range_fits(&self, ipa: Ipa, len: u64) -> bool {
        match ipa.raw().checked_add(len) {
            Some(end) => end <= self.ipa_size(),
            None => false,
        }
    }

    /// True if `[pa, pa + len)` lies inside the PA space.
    pub const fn pa_range_fits(&self, pa: Pa, len: u64) -> bool {
        match pa.raw().checked_add(len) {
            Some(end) => end <= 1 << self.pa_bits,
            None => false,
        }
    }

    /// IPA shift of an entry at `level`: 39, 30, 21, 12.
    pub const fn level_shift(level: u8) -> u32 {
        PAGE_SHIFT + 9 * (LEAF_LEVEL - level) as u32
    }

    /// Bytes mapped by one entry at `level`.
    pub const fn level_size(level: u8) -> u64 {
        1 << Self::level_shift(level)
    }

    /// Index of `ipa` in the table at `level`; at the start level it indexes
    /// across the concatenated roots (0 .. 512 * root_tables).
    pub const fn index(&self, ipa: Ipa, level: u8) -> usize {
        let idx = ipa.raw() >> Self::level_shift(level);
        if level == self.start_level {
            (idx & (ENTRIES_PER_TABLE as u64 * self.root_tables as u64 - 1)) as usize
        } else {
            (idx & (ENTRIES_PER_TABLE as u64 - 1)) as usize
        }
    }

    /// Bytes of the concatenated root: its required alignment too.
    pub const fn root_size(&self) -> u64 {
        self.root_tables as u64 * PAGE_SIZE
    }

    /// VTCR_EL2 for this geometry: 4 KiB granule, inner-shareable write-back
    /// walks, 8-bit VMID, RES1 bit 31, and access flags updated as `af`
    /// says.
    pub fn vtcr(&self, af: AccessFlagUpdate) -> u64 {
        let sl0 = match self.start_level {
            0 => VTCR_EL2::SL0::Granule4KBLevel0,
            1 => VTCR_EL2::SL0::Granule4KBLevel1,
            _ => VTCR_EL2::SL0::Granule4KBLevel2,
        };
        let ps = match self.pa_bits {
            32 => VTCR_EL2::PS::PA_32B_4GB,
            36 => VTCR_EL2::PS::PA_36B_64GB,
            40 => VTCR_EL2::PS::PA_40B_1TB,
            42 => VTCR_EL2::PS::PA_42B_4TB,
            44 => VTCR_EL2::PS::PA_44B_16TB,
            _ => VTCR_EL2::PS::PA_48B_256TB,
        };
        let mut reg = LocalRegisterCopy::<u64, VTCR_EL2::Register>::new(0);
        reg.write(
            VTCR_EL2::RES1.val(1)
                + VTCR_EL2::T0SZ.val(64 - self.ipa_bits as u64)
                + sl0
                + VTCR_EL2::IRGN0::NormalWBRAWA
                + VTCR_EL2::ORGN0::NormalWBRAWA
                + VTCR_EL2::SH0::Inner
                + VTCR_EL2::TG0::Granule4KB
                + ps
                + VTCR_EL2::VS::Bits8
                + match af {
                    AccessFlagUpdate::Fault => VTCR_EL2::HA::Disabled,
                    AccessFlagUpdate::Hardware => VTCR_EL2::HA::Enabled,
                },
        );
        reg.get()
    }

    /// VTTBR_EL2 for a root at `root` and an 8-bit `vmid`.
    pub fn vttbr(&self, root: Pa, vmid: u8) -> u64 {
        let mut reg = LocalRegisterCopy::<u64, VTTBR_EL2::Register>::new(0);
        reg.write(VTTBR_EL2::BADDR.val(root.raw() >> 1) + VTTBR_EL2::VMID.val(vmid as u64));
        reg.get()
    }
}

/// Who sets a stage-2 leaf's access flag when the guest touches a page
/// whose flag is clear (after AGE cleared it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AccessFlagUpdate {
    /// The access faults and the core sets the flag
    /// ([`crate::vm::Vm::handle_abort`], KVM's `handle_access_fault()`).
    #[default]
    Fault,
    /// The walker sets it, with no fault (FEAT_HAFDBS, `VTCR_EL2.HA`): for
    /// a machine that checked the CPU has it (ID_AA64MMFR1_EL1.HAFDBS != 0)
    /// and chose it. The core's read-then-store updates of a leaf (relax,
    /// write-protect, AGE) may then drop a flag the walker set between the
    /// two: the page reads idle though touched, the direction AGE already
    /// allows (KVM's exclusive stage-2 walks do the same).
    Hardware,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_default_is_two_concatenated_level1_roots() {
        let g = Geometry::kvm_default();
        assert_eq!((g.start_level(), g.root_tables()), (1, 2));
        // The value KVM programs for a 40-bit IPA on a 40-bit PA host:
        // T0SZ=24, SL0=1, IRGN0=ORGN0=WBWA, SH0=inner, TG0=4K, PS=0b010, RES1.
        assert_eq!(g.vtcr(AccessFlagUpdate::Fault), 0x8002_3558);
        // VTCR_EL2.HA is bit 21.
        assert_eq!(g.vtcr(AccessFlagUpdate::Hardware), 0x8002_3558 | 1 << 21);
        assert_eq!(g.index(Ipa::new((1 << 40) - 1), 1), 1023);
    }

    #[test]
    fn ipa48_starts_at_level0_with_one_root() {
        let g = Geometry::new(48, 48).unwrap();
        assert_eq!((g.start_level(), g.root_tables()), (0, 1));
        // T0SZ=16 (0x10), SL0=2 (0x80), PS=0b101 (0x50000).
        assert_eq!(g.vtcr(AccessFlagUpdate::Fault), 0x8005_3590);
    }

    #[test]
    fn other_ipa_sizes() {
        let g = Geometry::new(32, 40).unwrap();
        assert_eq!((g.start_level(), g.root_tables()), (2, 4));
        let g = Geometry::new(44, 44).unwrap();
        assert_eq!((g.start_level(), g.root_tables()), (0, 1));
        let g = Geometry::new(42, 44).unwrap();
        assert_eq!((g.start_level(), g.root_tables()), (1, 8));
        assert_eq!(Geometry::new(49, 48), Err(GeometryError::UnsupportedIpaBits(49)));
        assert_eq!(Geometry::new(40, 39), Err(GeometryError::UnsupportedPaBits(39)));
        assert_eq!(Geometry::new(44, 40), Err(GeometryError::IpaLargerThanPa));
    }

    #[test]
    fn vttbr_holds_root_and_vmid() {
        let g = Geometry::kvm_default();
        assert_eq!(g.vttbr(Pa::new(0x4008_2000), 5), (5 << 48) | 0x4008_2000);
    }

    #[test]
    fn level_sizes() {
        assert_eq!(Geometry::level_size(3), 4096);
        assert_eq!(Geometry::level_size(2), 2 << 20);
        assert_eq!(Geometry::level_size(1), 1 << 30);
        assert_eq!(Geometry::level_size(0), 1 << 39);
    }
}
