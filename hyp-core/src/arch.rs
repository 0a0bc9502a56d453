//! The few instructions the core needs at real EL2, in tiny functions gated
//! on `all(not(test), target_arch = "aarch64")` so everything around them
//! runs in host tests (the aarch64-paging pattern).

#[cfg(all(not(test), target_arch = "aarch64"))]
mod el2 {
    use core::arch::asm;

    use crate::addr::Ipa;
    use crate::stage2::TlbMaintenance;

    /// Stage-2 TLB maintenance by TLBI, for the VM whose VMID is loaded in
    /// VTTBR_EL2 (TLBI IPAS2E1IS and VMALLE1IS act on the current VMID).
    #[derive(Debug, Default)]
    pub struct El2Tlb;

    impl TlbMaintenance for El2Tlb {
        fn invalidate_ipa(&mut self, _vmid: u8, ipa: Ipa, _level: u8) {
            // SAFETY: DSB and TLBI have no memory-safety effect; the DSB makes
            // the descriptor store visible to walkers before the invalidation
            // (Arm ARM D8.16.1, break-before-make).
            unsafe {
                asm!("dsb ishst", "tlbi ipas2e1is, {0}", in(reg) ipa.raw() >> 12, options(nostack, preserves_flags));
            }
        }

        fn sync(&mut self, _vmid: u8) {
            // SAFETY: barriers and TLB invalidation only. Stage-1+2 combined
            // entries are dropped with VMALLE1IS after the IPA invalidations
            // complete (Arm ARM D8.16.5).
            unsafe {
                asm!("dsb ish", "tlbi vmalle1is", "dsb ish", "isb", options(nostack, preserves_flags));
            }
        }
    }

    /// Translates an EL1 virtual address with the guest's stage 1 (AT S1E1R),
    /// for permission faults where HPFAR_EL2 is not valid.
    pub fn translate_el1_va(va: u64) -> Option<Ipa> {
        let par: u64;
        // SAFETY: AT only writes PAR_EL1; the ISB makes the result visible.
        unsafe {
            asm!("at s1e1r, {va}", "isb", "mrs {par}, par_el1", va = in(reg) va, par = out(reg) par,
                 options(nostack, preserves_flags));
        }
        // PAR_EL1.F (bit 0) set means the walk failed; PA in bits [47:12].
        (par & 1 == 0).then(|| Ipa::new((par & 0x0000_ffff_ffff_f000) | (va & 0xfff)))
    }
}

#[cfg(all(not(test), target_arch = "aarch64"))]
pub use el2::{translate_el1_va, El2Tlb};
