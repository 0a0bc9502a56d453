//! Architectural decode of stage-2 aborts taken to EL2.
//!
//! The vector stub reads ESR_EL2, FAR_EL2 and HPFAR_EL2 once; everything else
//! is the pure function [`Abort::decode`], so it runs in host tests exactly as
//! at EL2. Field positions are from the Arm ARM (DDI 0487), section D24.2.45
//! "ESR_EL2" (ISS encoding for an exception from a Data Abort / Instruction
//! Abort) and D24.2.72 "HPFAR_EL2".
//!
//! The result holds architectural facts only: what the CPU reported. What
//! the hypervisor makes of them (is this a write for KVM's purposes, is it
//! MMIO) is decided by the fault pipeline, not here.

use aarch64_cpu::registers::{ESR_EL2, HPFAR_EL2};
use tock_registers::LocalRegisterCopy;

use crate::addr::{Ipa, PAGE_SIZE};

/// Exception class: Instruction Abort from a lower Exception level.
pub const EC_IABT_LOW: u8 = 0x20;
/// Exception class: Data Abort from a lower Exception level.
pub const EC_DABT_LOW: u8 = 0x24;

// ISS bits shared by data and instruction aborts (Arm ARM D24.2.45).
const ISS_FSC_MASK: u64 = 0x3f;
const ISS_S1PTW: u64 = 1 << 7;
const ISS_EA: u64 = 1 << 9;
const ISS_FNV: u64 = 1 << 10;
const ISS_SET_SHIFT: u32 = 11;
// Data abort only.
const ISS_WNR: u64 = 1 << 6;
const ISS_CM: u64 = 1 << 8;
const ISS_VNCR: u64 = 1 << 13;
const ISS_AR: u64 = 1 << 14;
const ISS_SF: u64 = 1 << 15;
const ISS_SRT_SHIFT: u32 = 16;
const ISS_SSE: u64 = 1 << 21;
const ISS_SAS_SHIFT: u32 = 22;
const ISS_ISV: u64 = 1 << 24;
/// HPFAR_EL2.FIPA is bits [47:4] (IPA[55:12]); aarch64-cpu's field runs to
/// bit 51, over bits that are RES0 (Linux's HPFAR_EL2_FIPA is
/// GENMASK(47, 4)).
const FIPA_MASK: u64 = (1 << 44) - 1;

/// Which kind of abort the guest took.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AbortKind {
    /// Data Abort from a lower EL (EC 0x24).
    Data,
    /// Instruction Abort from a lower EL (EC 0x20).
    Instruction,
}

/// The access that faulted, as the syndrome reports it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// A data read (WnR = 0), including cache maintenance reported as reads.
    Read,
    /// A data write (WnR = 1).
    Write,
    /// An instruction fetch.
    Execute,
}

/// A translation level reported by a fault status code: -1 (FEAT_LPA2) to 3.
pub type Level = i8;

/// Fault status code (DFSC / IFSC), decoded. Every 6-bit value decodes;
/// encodings that are reserved for the abort kind become [`FaultStatus::Unknown`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultStatus {
    /// Address size fault at `level`.
    AddressSize {
        /// Translation level.
        level: Level,
    },
    /// Translation fault at `level`: no valid descriptor.
    Translation {
        /// Translation level.
        level: Level,
    },
    /// Access flag fault at `level`.
    AccessFlag {
        /// Translation level.
        level: Level,
    },
    /// Permission fault at `level`.
    Permission {
        /// Translation level.
        level: Level,
    },
    /// Synchronous External abort, not on a translation table walk.
    SyncExternal,
    /// Synchronous Tag Check Fault (FEAT_MTE2), data aborts only.
    TagCheck,
    /// Synchronous External abort on a translation table walk at `level`.
    SyncExternalOnWalk {
        /// Translation level.
        level: Level,
    },
    /// Synchronous parity or ECC error on a memory access, not on a walk.
    SyncParity,
    /// Synchronous parity or ECC error on a translation table walk at `level`.
    SyncParityOnWalk {
        /// Translation level.
        level: Level,
    },
    /// Alignment fault (data aborts only).
    Alignment,
    /// Granule Protection Fault on a translation table walk at `level`.
    GranuleProtectionOnWalk {
        /// Translation level.
        level: Level,
    },
    /// Granule Protection Fault, not on a translation table walk.
    GranuleProtection,
    /// TLB conflict abort.
    TlbConflict,
    /// Unsupported atomic hardware update fault (FEAT_HAFDBS).
    UnsupportedAtomicUpdate,
    /// IMPLEMENTATION DEFINED fault (Lockdown), 0x34.
    ImpDefLockdown,
    /// IMPLEMENTATION DEFINED fault (Unsupported Exclusive or Atomic access), 0x35.
    UnsupportedExclusiveOrAtomic,
    /// A code the Arm ARM reserves for this abort kind.
    Unknown(u8),
}

impl FaultStatus {
    /// Decodes a 6-bit DFSC (`data == true`) or IFSC.
    pub const fn decode(fsc: u8, data: bool) -> Self {
        let fsc = fsc & 0x3f;
        let level = (fsc & 0b11) as Level;
        match fsc {
            0x00..=0x03 => Self::AddressSize { level },
            0x04..=0x07 => Self::Translation { level },
            // 0x08 is "Access flag fault, level 0" with FEAT_LPA2.
            0x08..=0x0b => Self::AccessFlag { level },
            // 0x0c is "Permission fault, level 0" with FEAT_LPA2.
            0x0c..=0x0f => Self::Permission { level },
            0x10 => Self::SyncExternal,
            0x11 if data => Self::TagCheck,
            0x13 => Self::SyncExternalOnWalk { level: -1 },
            0x14..=0x17 => Self::SyncExternalOnWalk { level },
            0x18 => Self::SyncParity,
            0x1b => Self::SyncParityOnWalk { level: -1 },
            0x1c..=0x1f => Self::SyncParityOnWalk { level },
            0x21 if data => Self::Alignment,
            0x23 => Self::GranuleProtectionOnWalk { level: -1 },
            0x24..=0x27 => Self::GranuleProtectionOnWalk { level },
            0x28 => Self::GranuleProtection,
            0x29 => Self::AddressSize { level: -1 },
            0x2b => Self::Translation { level: -1 },
            0x30 => Self::TlbConflict,
            0x31 => Self::UnsupportedAtomicUpdate,
            0x34 => Self::ImpDefLockdown,
            0x35 if data => Self::UnsupportedExclusiveOrAtomic,
            other => Self::Unknown(other),
        }
    }

    /// A permission fault: the leaf is there, its permissions are not
    /// enough (the core relaxes it in place at its own size).
    pub const fn is_permission(self) -> bool {
        matches!(self, Self::Permission { .. })
    }

    /// The translation level the code names, if it names one.
    pub const fn level(self) -> Option<Level> {
        match self {
            Self::AddressSize { level }
            | Self::Translation { level }
            | Self::AccessFlag { level }
            | Self::Permission { level }
            | Self::SyncExternalOnWalk { level }
            | Self::SyncParityOnWalk { level }
            | Self::GranuleProtectionOnWalk { level } => Some(level),
            _ => None,
        }
    }

    /// True for the codes on which the CPU writes HPFAR_EL2 with the faulting
    /// IPA regardless of S1PTW: translation, access flag and address size
    /// faults (Arm ARM D24.2.72; KVM's `__fault_safe_to_translate`).
    pub const fn writes_hpfar(self) -> bool {
        matches!(self, Self::Translation { .. } | Self::AccessFlag { .. } | Self::AddressSize { .. })
    }
}

/// Access details present only when ESR_EL2.ISS.ISV is 1: enough for the
/// hypervisor to emulate the access as MMIO.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AccessSyndrome {
    /// Access size in bytes (1, 2, 4 or 8), from SAS.
    pub size: u8,
    /// Sign-extend the loaded value (SSE).
    pub sign_extend: bool,
    /// Transfer register number (SRT), 31 meaning XZR.
    pub register: u8,
    /// 64-bit register width (SF).
    pub sixty_four: bool,
    /// Acquire/release semantics (AR).
    pub acquire_release: bool,
}

/// Where the faulting IPA comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultIpa {
    /// HPFAR_EL2 is valid for this syndrome: `HPFAR.FIPA << 12 | FAR[11:0]`
    /// (the low bits only when FAR is valid).
    Valid(Ipa),
    /// HPFAR_EL2 is UNKNOWN for this syndrome (e.g. an ordinary permission
    /// fault): the core must translate FAR itself (AT S1E1R at EL2).
    NotReported,
}

/// One decoded stage-2 abort: immutable architectural facts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Abort {
    /// Data or instruction abort.
    pub kind: AbortKind,
    /// The faulting access.
    pub access: Access,
    /// The fault status code.
    pub status: FaultStatus,
    /// The faulting IPA, if HPFAR_EL2 reported it.
    pub ipa: FaultIpa,
    /// FAR_EL2 (the guest virtual address), `None` when FnV says it is not valid.
    pub far: Option<u64>,
    /// The fault happened on a stage-1 translation table walk (S1PTW).
    pub s1ptw: bool,
    /// External abort type (EA).
    pub external: bool,
    /// Cache maintenance or address translation instruction (CM), data aborts only.
    pub cache_maintenance: bool,
    /// Fault from a VNCR_EL2-relative access (VNCR), data aborts only.
    pub vncr: bool,
    /// Synchronous error type (SET), raw 2 bits.
    pub set: u8,
    /// ISV = 1: the access details needed to emulate it.
    pub syndrome: Option<AccessSyndrome>,
    /// Instruction length bit (IL): 32-bit instruction.
    pub il32: bool,
    /// The raw ESR_EL2 it was decoded from.
    pub esr: u64,
}

/// Why a syndrome is not a stage-2 abort this core handles.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DecodeError {
    /// ESR_EL2.EC is not a lower-EL data or instruction abort.
    NotLowerElAbort {
        /// The exception class found.
        ec: u8,
    },
}

impl Abort {
    /// Decodes the raw ESR_EL2, FAR_EL2 and HPFAR_EL2 of an exception taken to
    /// EL2. Never panics: unknown codes decode to explicit variants.
    pub fn decode(esr: u64, far: u64, hpfar: u64) -> Result<Self, DecodeError> {
        let reg = LocalRegisterCopy::<u64, ESR_EL2::Register>::new(esr);
        let ec = reg.read(ESR_EL2::EC) as u8;
        let iss = reg.read(ESR_EL2::ISS);
        let kind = match ec {
            EC_DABT_LOW => AbortKind::Data,
            EC_IABT_LOW => AbortKind::Instruction,
            ec => return Err(DecodeError::NotLowerElAbort { ec }),
        };
        let data = kind == AbortKind::Data;
        let bit = |mask: u64| iss & mask != 0;
        let status = FaultStatus::decode((iss & ISS_FSC_MASK) as u8, data);
        let s1ptw = bit(ISS_S1PTW);
        let far = if bit(ISS_FNV) { None } else { Some(far) };
        let ipa = if s1ptw || status.writes_hpfar() {
            let hpfar = LocalRegisterCopy::<u64, HPFAR_EL2::Register>::new(hpfar);
            let page = (hpfar.read(HPFAR_EL2::FIPA) & FIPA_MASK) << 12;
            let offset = far.map_or(0, |far| far & (PAGE_SIZE - 1));
            FaultIpa::Valid(Ipa::new(page | offset))
        } else {
            FaultIpa::NotReported
        };
        let access = match (data, bit(ISS_WNR)) {
            (false, _) => Access::Execute,
            (true, true) => Access::Write,
            (true, false) => Access::Read,
        };
        let syndrome = (data && bit(ISS_ISV)).then(|| AccessSyndrome {
            size: 1 << ((iss >> ISS_SAS_SHIFT) & 0b11),
            sign_extend: bit(ISS_SSE),
            register: ((iss >> ISS_SRT_SHIFT) & 0x1f) as u8,
            sixty_four: bit(ISS_SF),
            acquire_release: bit(ISS_AR),
        });
        Ok(Self {
            kind,
            access,
            status,
            ipa,
            far,
            s1ptw,
            external: bit(ISS_EA),
            cache_maintenance: data && bit(ISS_CM),
            vncr: data && bit(ISS_VNCR),
            set: ((iss >> ISS_SET_SHIFT) & 0b11) as u8,
            syndrome,
            il32: reg.is_set(ESR_EL2::IL),
            esr,
        })
    }

    /// The faulting IPA if HPFAR_EL2 reported it.
    pub fn reported_ipa(&self) -> Option<Ipa> {
        match self.ipa {
            FaultIpa::Valid(ipa) => Some(ipa),
            FaultIpa::NotReported => None,
        }
    }

    /// The access the stage-2 mapping must allow to resolve this abort. On a
    /// stage-1 table walk (S1PTW) that is the walker's access, not the
    /// instruction's: a read, or a write when the walk hit a permission
    /// fault (the walker updating the access or dirty flag), as KVM's
    /// `kvm_is_write_fault()` and `kvm_vcpu_trap_is_exec_fault()` decide.
    pub fn stage2_access(&self) -> Access {
        if self.s1ptw {
            return match self.status {
                FaultStatus::Permission { .. } => Access::Write,
                _ => Access::Read,
            };
        }
        self.access
    }
}

#[cfg(test)]
mod tests {
    //! Encodings written from the Arm ARM tables (D24.2.45), bit by bit, not
    //! produced by the decoder.
    use super::*;

    // EC in [31:26], IL at 25.
    const DABT: u64 = (0x24 << 26) | (1 << 25);
    const IABT: u64 = (0x20 << 26) | (1 << 25);

    #[test]
    fn the_ipa_comes_from_fipa_bits_47_to_4_only() {
        // IPA 0x0123_4567_8000 (56 bits' worth) with RES0 bits [51:48] set.
        let hpfar = (0x0123_4567_8000u64 >> 12) << 4 | 0xf << 48;
        let abort = Abort::decode(DABT | 0b000111, 0xabc, hpfar).unwrap();
        assert_eq!(abort.reported_ipa(), Some(Ipa::new(0x0123_4567_8abc)));
    }

    #[test]
    fn a_table_walk_needs_the_walkers_access_not_the_instructions() {
        let s1ptw = 1 << 7;
        let wnr = 1 << 6;
        let access = |esr: u64| Abort::decode(esr, 0x1000, 0x10).unwrap().stage2_access();
        // A store whose walk hit a translation fault: the walk reads.
        assert_eq!(access(DABT | s1ptw | wnr | 0b000111), Access::Read);
        // The walker setting AF hit a permission fault: a write.
        assert_eq!(access(DABT | s1ptw | 0b001111), Access::Write);
        // A fetch's walk reads the table; it does not execute it.
        assert_eq!(access(IABT | s1ptw | 0b000110), Access::Read);
        // Not a walk: the instruction's own access.
        assert_eq!(access(DABT | wnr | 0b000111), Access::Write);
        assert_eq!(access(IABT | 0b000111), Access::Execute);
        assert_eq!(access(DABT | 0b001111), Access::Read);
    }

    #[test]
    fn every_dfsc_code_in_the_arm_arm_table_decodes() {
        use FaultStatus::*;
        let table: &[(u8, FaultStatus)] = &[
            (0b000000, AddressSize { level: 0 }),
            (0b000001, AddressSize { level: 1 }),
            (0b000010, AddressSize { level: 2 }),
            (0b000011, AddressSize { level: 3 }),
            (0b101001, AddressSize { level: -1 }),
            (0b000100, Translation { level: 0 }),
            (0b000101, Translation { level: 1 }),
            (0b000110, Translation { level: 2 }),
            (0b000111, Translation { level: 3 }),
            (0b101011, Translation { level: -1 }),
            (0b001000, AccessFlag { level: 0 }),
            (0b001001, AccessFlag { level: 1 }),
            (0b001010, AccessFlag { level: 2 }),
            (0b001011, AccessFlag { level: 3 }),
            (0b001100, Permission { level: 0 }),
            (0b001101, Permission { level: 1 }),
            (0b001110, Permission { level: 2 }),
            (0b001111, Permission { level: 3 }),
            (0b010000, SyncExternal),
            (0b010001, TagCheck),
            (0b010011, SyncExternalOnWalk { level: -1 }),
            (0b010100, SyncExternalOnWalk { level: 0 }),
            (0b010101, SyncExternalOnWalk { level: 1 }),
            (0b010110, SyncExternalOnWalk { level: 2 }),
            (0b010111, SyncExternalOnWalk { level: 3 }),
            (0b011000, SyncParity),
            (0b011011, SyncParityOnWalk { level: -1 }),
            (0b011100, SyncParityOnWalk { level: 0 }),
            (0b011101, SyncParityOnWalk { level: 1 }),
            (0b011110, SyncParityOnWalk { level: 2 }),
            (0b011111, SyncParityOnWalk { level: 3 }),
            (0b100001, Alignment),
            (0b100011, GranuleProtectionOnWalk { level: -1 }),
            (0b100100, GranuleProtectionOnWalk { level: 0 }),
            (0b100111, GranuleProtectionOnWalk { level: 3 }),
            (0b101000, GranuleProtection),
            (0b110000, TlbConflict),
            (0b110001, UnsupportedAtomicUpdate),
            (0b110100, ImpDefLockdown),
            (0b110101, UnsupportedExclusiveOrAtomic),
        ];
        for &(fsc, want) in table {
            let a = Abort::decode(DABT | fsc as u64, 0, 0).unwrap();
            assert_eq!(a.status, want, "DFSC {fsc:#08b}");
        }
    }

    #[test]
    fn every_reserved_fsc_decodes_to_unknown_without_panicking() {
        for fsc in [0x12u8, 0x19, 0x1a, 0x20, 0x22, 0x2a, 0x2c, 0x2f, 0x32, 0x33, 0x36, 0x3f] {
            let a = Abort::decode(DABT | fsc as u64, 0, 0).unwrap();
            assert_eq!(a.status, FaultStatus::Unknown(fsc));
        }
        // Data-only codes are reserved in IFSC.
        for fsc in [0x11u8, 0x21, 0x35] {
            let a = Abort::decode(IABT | fsc as u64, 0, 0).unwrap();
            assert_eq!(a.status, FaultStatus::Unknown(fsc));
        }
        // Every 64-bit ESR value with either EC decodes or errors, never panics.
        for esr in (0..=u64::from(u16::MAX)).step_by(7) {
            for ec in [0x20u64, 0x24, 0x00, 0x16] {
                let _ = Abort::decode((ec << 26) | esr | (esr << 40), u64::MAX, u64::MAX);
            }
        }
    }

    #[test]
    fn write_translation_fault_level3_with_valid_syndrome() {
        // ISV=1, SAS=0b11 (dword), SSE=0, SRT=5, SF=1, AR=0, WnR=1, DFSC=0b000111.
        let esr = DABT | (1 << 24) | (0b11 << 22) | (5 << 16) | (1 << 15) | (1 << 6) | 0b000111;
        let hpfar = 0x0801_2340_u64; // FIPA (bits 47:4) = 0x80_1234 -> IPA page 0x8_0123_4000
        let a = Abort::decode(esr, 0xffff_0000_dead_b678, hpfar).unwrap();
        assert_eq!(a.kind, AbortKind::Data);
        assert_eq!(a.access, Access::Write);
        assert_eq!(a.status, FaultStatus::Translation { level: 3 });
        assert_eq!(a.ipa, FaultIpa::Valid(Ipa::new(0x8_0123_4678)));
        assert_eq!(a.far, Some(0xffff_0000_dead_b678));
        assert_eq!(
            a.syndrome,
            Some(AccessSyndrome { size: 8, sign_extend: false, register: 5, sixty_four: true, acquire_release: false })
        );
        assert!(!a.s1ptw && !a.external && !a.cache_maintenance);
        assert!(a.il32);
    }

    #[test]
    fn halfword_signed_acquire_load_syndrome() {
        // ISV=1, SAS=0b01, SSE=1, SRT=31, SF=0, AR=1, WnR=0, DFSC=translation L2.
        let esr = DABT | (1 << 24) | (0b01 << 22) | (1 << 21) | (31 << 16) | (1 << 14) | 0b000110;
        let a = Abort::decode(esr, 0x1000, 0x10).unwrap();
        assert_eq!(a.access, Access::Read);
        let s = a.syndrome.unwrap();
        assert_eq!((s.size, s.sign_extend, s.register, s.sixty_four, s.acquire_release), (2, true, 31, false, true));
    }

    #[test]
    fn no_syndrome_when_isv_clear() {
        // A load/store pair or writeback form: ISV=0 even though WnR is reported.
        let esr = DABT | (1 << 6) | 0b000111;
        let a = Abort::decode(esr, 0x4000, 0x40).unwrap();
        assert_eq!(a.syndrome, None);
        assert_eq!(a.access, Access::Write);
    }

    #[test]
    fn permission_fault_without_s1ptw_does_not_report_ipa() {
        // DFSC=0b001111 permission L3, WnR=1; HPFAR holds garbage the decoder must ignore.
        let esr = DABT | (1 << 6) | 0b001111;
        let a = Abort::decode(esr, 0x5000, 0xdead_bee0).unwrap();
        assert_eq!(a.status, FaultStatus::Permission { level: 3 });
        assert_eq!(a.ipa, FaultIpa::NotReported);
        assert_eq!(a.reported_ipa(), None);
    }

    #[test]
    fn permission_fault_on_stage1_walk_reports_ipa() {
        // S1PTW=1, WnR=1 (hardware AF update), permission L3.
        let esr = DABT | (1 << 7) | (1 << 6) | 0b001111;
        let a = Abort::decode(esr, 0xffff_8000_0000_0123, 0x0040_0000).unwrap();
        assert!(a.s1ptw);
        assert_eq!(a.ipa, FaultIpa::Valid(Ipa::new(0x4000_0123)));
    }

    #[test]
    fn far_not_valid_drops_page_offset() {
        // FnV=1, EA=1, SyncExternalOnWalk L1 with S1PTW.
        let esr = DABT | (1 << 10) | (1 << 9) | (1 << 7) | 0b010101;
        let a = Abort::decode(esr, 0xabc, 0x1230).unwrap();
        assert_eq!(a.far, None);
        assert!(a.external);
        assert_eq!(a.status, FaultStatus::SyncExternalOnWalk { level: 1 });
        assert_eq!(a.ipa, FaultIpa::Valid(Ipa::new(0x12_3000)));
    }

    #[test]
    fn hpfar_ns_bit_is_not_part_of_the_ipa() {
        let esr = DABT | 0b000101;
        let a = Abort::decode(esr, 0x10, (1 << 63) | 0x40).unwrap();
        assert_eq!(a.ipa, FaultIpa::Valid(Ipa::new(0x4010)));
    }

    #[test]
    fn instruction_abort_is_execute_and_ignores_data_fields() {
        // IFSC=0b000110 translation L2; bits that mean ISV/CM/WnR for data aborts set.
        let esr = IABT | (1 << 24) | (1 << 8) | (1 << 6) | 0b000110;
        let a = Abort::decode(esr, 0x20_0040, 0x2_000).unwrap();
        assert_eq!(a.kind, AbortKind::Instruction);
        assert_eq!(a.access, Access::Execute);
        assert_eq!(a.syndrome, None);
        assert!(!a.cache_maintenance);
        assert_eq!(a.ipa, FaultIpa::Valid(Ipa::new(0x20_0040)));
    }

    #[test]
    fn cache_maintenance_fault_is_flagged() {
        // DC CIVAC on an unmapped page: CM=1, WnR=1 (reported as a write), translation L3.
        let esr = DABT | (1 << 8) | (1 << 6) | 0b000111;
        let a = Abort::decode(esr, 0x7000, 0x70).unwrap();
        assert!(a.cache_maintenance);
    }

    #[test]
    fn other_exception_classes_are_errors() {
        // EC 0x16 = HVC64, EC 0x25 = data abort from the same EL.
        assert_eq!(Abort::decode(0x16 << 26, 0, 0), Err(DecodeError::NotLowerElAbort { ec: 0x16 }));
        assert_eq!(Abort::decode(0x25 << 26, 0, 0), Err(DecodeError::NotLowerElAbort { ec: 0x25 }));
    }
}
