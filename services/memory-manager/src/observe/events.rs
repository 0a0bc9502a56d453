//! Fault events: one per fault, as the daemon handled it, for the history
//! ([`super::hub`]), the statistics ([`super::stats`]) and the API.

use std::time::SystemTime;

use hyp_core::abort::{Access, FaultStatus};
use hyp_core::reject::Reject;
use hyp_core::stage2::MapSize;

use crate::fault::trace::StageTimes;

/// What became of a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new mapping was installed.
    Mapped,
    /// Permissions were relaxed in place.
    Relaxed,
    /// Another vCPU had installed the same mapping.
    AlreadyPresent,
    /// The invalidation sequence went stale; the guest retries.
    RetriedStale,
    /// Emulated by the VMM.
    MmioExit,
    /// Exit without a syndrome.
    NoSyndromeExit,
    /// An abort was injected.
    InjectedAbort,
    /// The core refused the command.
    Rejected(Option<Reject>),
    /// Fresh backing was needed under host memory pressure, past the
    /// reserve: an abort was injected.
    RefusedHostPressure,
}

/// One fault, as the daemon handled it.
#[derive(Clone, Copy, Debug)]
pub struct FaultEvent {
    /// Position in the daemon's event sequence (set when recorded).
    pub seq: u64,
    /// Wall-clock time of arrival.
    pub time: SystemTime,
    /// Fault id.
    pub fault_id: u64,
    /// VM id.
    pub vm_id: u16,
    /// vCPU.
    pub vcpu: u32,
    /// Faulting IPA.
    pub ipa: u64,
    /// Raw ESR_EL2.
    pub esr: u64,
    /// Decoded status, when the syndrome decoded.
    pub status: Option<FaultStatus>,
    /// Decoded access.
    pub access: Option<Access>,
    /// Memslot index.
    pub memslot: Option<u32>,
    /// Daemon address backing the IPA.
    pub hva: u64,
    /// VMA page size.
    pub vma_page_size: u64,
    /// Mapping size chosen.
    pub mapping_size: Option<MapSize>,
    /// Permission bits granted (R = 1, W = 2, X = 4).
    pub permissions: u32,
    /// Output PA.
    pub pa: u64,
    /// Outcome.
    pub outcome: Outcome,
    /// Policy in force.
    pub policy: &'static str,
    /// ns since arrival at the end of each pipeline stage.
    pub stages: StageTimes,
    /// ns since arrival when the command was sent.
    pub sent_ns: u64,
    /// ns since arrival when the outcome was known.
    pub completed_ns: u64,
    /// The backing had a hole the daemon filled.
    pub populated: bool,
    /// Pages mapped with it by fault-around.
    pub fault_around: u32,
}
