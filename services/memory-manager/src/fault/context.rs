//! The two things a fault is resolved from, kept apart: the architectural
//! fault (immutable, decoded once) and the VM it happened in.

use hyp_core::abort::Abort;
use hyp_core::addr::Ipa;
use hyp_core::ring::abi::{FaultRecord, NO_IPA};

use super::plan::InjectReason;
use crate::memory::layout::VmLayout;
use crate::memory::mapping::MappingState;
use crate::memory::pressure::HostMemory;

/// The VM a fault is resolved in: the parts of it the pipeline reads.
#[derive(Clone, Copy, Debug)]
pub struct VmView<'a> {
    /// What is fixed since attach.
    pub layout: &'a VmLayout,
    /// Pins, populated pages, installed mappings, the sequence.
    pub mapping: &'a MappingState,
    /// The host's memory pressure: fresh backing is admitted under it.
    pub host: &'a HostMemory,
}

/// A stage-2 abort as the core reported it, decoded once.
#[derive(Clone, Copy, Debug)]
pub struct ArchFault {
    /// The vCPU that faulted.
    pub vcpu: u32,
    /// The core's id for the fault.
    pub fault_id: u64,
    /// The decoded syndrome.
    pub abort: Abort,
    /// The faulting IPA.
    pub ipa: Ipa,
}

impl ArchFault {
    /// Decodes `rec`; an abort that does not decode, or whose IPA the core
    /// could not tell, is injected back into the guest.
    pub fn decode(rec: &FaultRecord) -> Result<Self, InjectReason> {
        let abort = Abort::decode(rec.esr, rec.far, rec.hpfar).map_err(|_| InjectReason::Undecodable)?;
        if rec.ipa == NO_IPA {
            return Err(InjectReason::NoIpa);
        }
        Ok(Self { vcpu: rec.vcpu, fault_id: rec.fault_id, abort, ipa: Ipa::new(rec.ipa) })
    }
}
