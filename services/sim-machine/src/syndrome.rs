//! Abort syndromes as hardware reports them (Arm ARM D24.2.45 ESR_EL2,
//! D24.2.72 HPFAR_EL2), for the faults the software MMU finds.

use crate::mmu::{AccessKind, Stage2Fault};

/// The three registers the EL2 vector stub reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syndrome {
    /// ESR_EL2.
    pub esr: u64,
    /// FAR_EL2.
    pub far: u64,
    /// HPFAR_EL2.
    pub hpfar: u64,
}

/// A data access as the instruction describes it (what ISV reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAccess {
    /// Bytes: 1, 2, 4, 8.
    pub size: u8,
    /// Transfer register.
    pub register: u8,
    /// The instruction has a valid syndrome (a plain load/store; not a pair,
    /// writeback or atomic form).
    pub isv: bool,
}

/// Encodes the abort for `fault` on `access` at `va` (no guest stage 1, so
/// the IPA is the VA).
pub fn encode(fault: Stage2Fault, access: AccessKind, va: u64, data: DataAccess) -> Syndrome {
    let (fsc, level) = match fault {
        Stage2Fault::Translation { level } => (0b00_0100_u64, level),
        Stage2Fault::AccessFlag { level } => (0b00_1000, level),
        Stage2Fault::Permission { level } => (0b00_1100, level),
    };
    let fsc = fsc | level as u64;
    let il = 1 << 25;
    let esr = match access {
        AccessKind::Fetch => (0x20 << 26) | il | fsc,
        AccessKind::Read | AccessKind::Write => {
            let mut esr = (0x24 << 26) | il | fsc;
            if access == AccessKind::Write {
                esr |= 1 << 6; // WnR
            }
            if data.isv {
                let sas = data.size.trailing_zeros() as u64;
                esr |= 1 << 24 | sas << 22 | (data.register as u64 & 0x1f) << 16;
                if data.size == 8 {
                    esr |= 1 << 15; // SF
                }
            }
            esr
        }
    };
    // HPFAR_EL2 holds IPA[47:12] in FIPA (bits 43:4) for translation and
    // access flag faults; for a permission fault it is UNKNOWN, and this
    // machine writes garbage there so nothing can rely on it.
    let hpfar = match fault {
        Stage2Fault::Permission { .. } => 0xdead_beef_0000_0000,
        _ => (va >> 12) << 4,
    };
    Syndrome { esr, far: va, hpfar }
}

/// Encodes a stage-2 abort met while translating `va` for `access` with the
/// guest's stage 1 on. On the stage-1 walk (`s1ptw`), ESR has S1PTW set and
/// no instruction syndrome (ISV = 0), HPFAR names the table page and FAR the
/// access's VA; the class and WnR stay the access's own (as QEMU reports
/// them). `ipa` is the address stage 2 was asked for.
pub fn encode_stage2(
    fault: Stage2Fault,
    s1ptw: bool,
    ipa: u64,
    access: AccessKind,
    va: u64,
    data: DataAccess,
) -> Syndrome {
    let data = if s1ptw { DataAccess { isv: false, ..data } } else { data };
    let mut s = encode(fault, access, ipa, data);
    s.far = va;
    if s1ptw {
        s.esr |= 1 << 7;
        // On a walk HPFAR is valid for permission faults too.
        s.hpfar = (ipa >> 12) << 4;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyp_core::abort::{Abort, Access, FaultIpa, FaultStatus};
    use hyp_core::addr::Ipa;

    #[test]
    fn encodings_decode_to_the_fault_they_describe() {
        let d = DataAccess { size: 4, register: 3, isv: true };
        let s = encode(Stage2Fault::Translation { level: 2 }, AccessKind::Write, 0x4020_1234, d);
        let a = Abort::decode(s.esr, s.far, s.hpfar).unwrap();
        assert_eq!(a.status, FaultStatus::Translation { level: 2 });
        assert_eq!(a.access, Access::Write);
        assert_eq!(a.ipa, FaultIpa::Valid(Ipa::new(0x4020_1234)));
        let syn = a.syndrome.unwrap();
        assert_eq!((syn.size, syn.register, syn.sixty_four), (4, 3, false));
        // ESR by hand: EC 0x24, IL, ISV, SAS=0b10, SRT=3, WnR, DFSC 0b000110.
        assert_eq!(s.esr, (0x24 << 26) | (1 << 25) | (1 << 24) | (2 << 22) | (3 << 16) | (1 << 6) | 0b110);
        let s = encode(Stage2Fault::Permission { level: 3 }, AccessKind::Fetch, 0x4000_0000, d);
        let a = Abort::decode(s.esr, s.far, s.hpfar).unwrap();
        assert_eq!(
            (a.status, a.access, a.ipa),
            (FaultStatus::Permission { level: 3 }, Access::Execute, FaultIpa::NotReported)
        );
    }

    #[test]
    fn walk_aborts_carry_s1ptw_and_the_table_page() {
        let d = DataAccess { size: 8, register: 2, isv: true };
        // A store whose walk found the level-3 table page unmapped.
        let s =
            encode_stage2(Stage2Fault::Translation { level: 1 }, true, 0x8800_2000, AccessKind::Write, 0x8400_0008, d);
        let a = Abort::decode(s.esr, s.far, s.hpfar).unwrap();
        assert!(a.s1ptw && a.syndrome.is_none(), "S1PTW, no instruction syndrome");
        assert_eq!((a.access, a.stage2_access()), (Access::Write, Access::Read), "the walk reads");
        assert_eq!(a.reported_ipa().map(|i| i.raw() & !0xfff), Some(0x8800_2000));
        assert_eq!(s.far, 0x8400_0008);
        // The walker's AF write hit a read-only table page.
        let s =
            encode_stage2(Stage2Fault::Permission { level: 3 }, true, 0x8800_2000, AccessKind::Read, 0x8400_0008, d);
        let a = Abort::decode(s.esr, s.far, s.hpfar).unwrap();
        assert_eq!((a.status, a.stage2_access()), (FaultStatus::Permission { level: 3 }, Access::Write));
        assert_eq!(a.reported_ipa().map(|i| i.raw() & !0xfff), Some(0x8800_2000), "HPFAR valid on a walk");
        // A fetch's walk is an instruction abort with S1PTW.
        let s =
            encode_stage2(Stage2Fault::Translation { level: 1 }, true, 0x8800_0000, AccessKind::Fetch, 0x8000_0100, d);
        assert_eq!((s.esr >> 26, s.esr >> 7 & 1), (0x20, 1));
        // Not a walk: the access's own syndrome at its IPA.
        let s =
            encode_stage2(Stage2Fault::Translation { level: 2 }, false, 0x8400_0008, AccessKind::Write, 0x8400_0008, d);
        let a = Abort::decode(s.esr, s.far, s.hpfar).unwrap();
        assert!(!a.s1ptw && a.syndrome.is_some());
    }
}
