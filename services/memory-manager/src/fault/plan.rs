//! What the pipeline decides for a fault: map (a plan holding its pin),
//! exit to the VMM, or inject an abort into the guest.

use hyp_core::abort::FaultStatus;
use hyp_core::addr::{Ipa, Pa, PAGE_SIZE};
use hyp_core::ring::abi::{kind, CommandRecord, FLAG_DEVICE};
use hyp_core::stage2::{MapSize, Perms};

use super::choices::{Decisions, MAX_FAULT_AROUND};
use crate::memory::pin::PinGuard;

/// An access the VMM must emulate (valid syndrome).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// Faulting IPA.
    pub ipa: Ipa,
    /// Bytes.
    pub size: u8,
    /// Transfer register (31 = XZR).
    pub register: u8,
    /// A write.
    pub write: bool,
}

/// Why the fault leaves the core for the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Emulate this access.
    Mmio(MmioAccess),
    /// An access outside memory (or a write to a read-only slot) without a
    /// valid syndrome: KVM_RUN fails with ENOSYS in KVM.
    NoSyndrome {
        /// Faulting IPA.
        ipa: Ipa,
        /// A write.
        write: bool,
    },
    /// Cache maintenance on MMIO: the VMM skips the instruction.
    CacheMaintenance {
        /// Faulting IPA.
        ipa: Ipa,
    },
    /// An instruction fetch from device memory: never mapped executable, so
    /// mapping would only fault again; KVM_RUN fails with ENOEXEC in KVM.
    ExecOnDevice {
        /// Faulting IPA.
        ipa: Ipa,
    },
}

/// Why an abort is injected into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectReason {
    /// The syndrome is not a stage-2 abort.
    Undecodable,
    /// The core could not tell the IPA.
    NoIpa,
    /// A synchronous external abort or parity error.
    External,
    /// An instruction fetch outside memory.
    FetchOutsideMemory,
    /// A stage-1 table walk outside memory or into a read-only slot.
    WalkOutsideMemory,
    /// A fault status this pipeline does not resolve.
    Unsupported(FaultStatus),
}

/// A map command to send, holding its pin.
#[derive(Debug)]
pub struct MapPlan {
    /// The faulting IPA.
    pub fault_ipa: Ipa,
    /// First IPA mapped (aligned to `size`).
    pub ipa: Ipa,
    /// First PA mapped.
    pub pa: Pa,
    /// Mapping size.
    pub size: MapSize,
    /// Permissions.
    pub perms: Perms,
    /// Device memory.
    pub device: bool,
    /// Invalidation sequence sampled before pinning.
    pub seq: u64,
    /// The pages' pin.
    pub pin: PinGuard,
    /// A write in a dirty-logged memslot: set the page's bit as the map is sent.
    pub marks_dirty: bool,
    /// The fault is a permission fault (the core relaxes in place).
    pub permission_fault: bool,
    /// What the policy decided for the fault (fault-around plans from it).
    pub decisions: Decisions,
}

impl MapPlan {
    /// The MAP command for the plan, answering fault `fault_id`.
    pub fn command(&self, cmd_id: u64, fault_id: u64) -> CommandRecord {
        CommandRecord {
            kind: kind::MAP,
            flags: self.perms.bits() | if self.device { FLAG_DEVICE } else { 0 },
            cmd_id,
            fault_id,
            ipa: self.ipa.raw(),
            pa: self.pa.raw(),
            size: self.size.bytes(),
            inval_seq: self.seq,
            reserved: 0,
        }
    }

    /// Pages after this mapping the policy wants mapped with it: only
    /// around a new 4 KiB mapping of memory, at most [`MAX_FAULT_AROUND`].
    pub fn fault_around(&self) -> u32 {
        if self.size == MapSize::Page4K && !self.permission_fault && !self.device {
            self.decisions.fault_around.min(MAX_FAULT_AROUND)
        } else {
            0
        }
    }
}

/// A page mapped ahead of the guest next to a fault's (fault-around).
#[derive(Debug)]
pub struct AroundPlan {
    /// The page's IPA.
    pub ipa: Ipa,
    /// Its PA.
    pub pa: Pa,
    /// Permissions (a read fault's).
    pub perms: Perms,
    /// Invalidation sequence sampled before pinning.
    pub seq: u64,
    /// The page's pin.
    pub pin: PinGuard,
}

impl AroundPlan {
    /// The PREFAULT command for the page.
    pub fn command(&self, cmd_id: u64) -> CommandRecord {
        CommandRecord {
            kind: kind::PREFAULT,
            flags: self.perms.bits(),
            cmd_id,
            fault_id: 0,
            ipa: self.ipa.raw(),
            pa: self.pa.raw(),
            size: PAGE_SIZE,
            inval_seq: self.seq,
            reserved: 0,
        }
    }
}

/// What to do with a fault.
#[derive(Debug)]
pub enum Decision {
    /// Map (or relax).
    Map(MapPlan),
    /// Exit to the VMM.
    Exit(Exit),
    /// Inject an abort into the guest.
    Inject(InjectReason),
}
