//! The choices the pipeline leaves to a memory policy (mapping size,
//! fault-around, write on read, eager exec, a resident budget), never
//! correctness. The pipeline asks once per fault and clamps whatever the
//! answer is to what the memslot, VMA, logging and device rules allow. The
//! question is defined here, beside the pipeline that asks it; the
//! policies that answer it live in [`crate::policy`].

use hyp_core::abort::Access;
use hyp_core::stage2::MapSize;

/// What a policy is asked about one fault.
#[derive(Clone, Copy, Debug)]
pub struct FaultContext {
    /// The VM.
    pub vm_id: u16,
    /// The vCPU that faulted.
    pub vcpu: u32,
    /// The core's id for the fault.
    pub fault_id: u64,
    /// The faulting IPA.
    pub ipa: u64,
    /// The memslot id.
    pub memslot: usize,
    /// What stage 2 was asked for.
    pub access: Access,
    /// Largest size the correctness rules allow.
    pub allowed: MapSize,
    /// A write mapping is possible (writable VMA and memslot, not logged).
    pub may_write: bool,
    /// An executable mapping is possible (not device memory).
    pub may_exec: bool,
}

/// A policy's answer for one fault (before the pipeline clamps it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decisions {
    /// Largest mapping the policy wants.
    pub max_size: MapSize,
    /// 4 KiB pages after the faulting one to map with it.
    pub fault_around: u32,
    /// Map writable on a read fault where allowed (KVM does).
    pub writable_on_read: bool,
    /// Map executable on a data fault where allowed.
    pub eager_exec: bool,
}

impl Decisions {
    /// KVM's user_mem_abort() choices: the largest allowed size, writable on
    /// read, exec only on a fetch, no fault-around.
    pub fn kvm(ctx: &FaultContext) -> Self {
        Self { max_size: ctx.allowed, fault_around: 0, writable_on_read: true, eager_exec: false }
    }
}

/// Largest fault-around window (pages after the faulting one).
pub const MAX_FAULT_AROUND: u32 = 64;

/// A resident-memory cap for one VM and the order pages leave in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Bytes of guest memory mapped (and pinned) at most.
    pub max_resident: u64,
    /// Which mappings go first.
    pub order: EvictionOrder,
}

/// Which resident mappings are reclaimed first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionOrder {
    /// Oldest mapping first.
    Fifo,
    /// Newest mapping first.
    Lifo,
    /// Lowest IPA first.
    LowestIpa,
    /// Highest IPA first.
    HighestIpa,
    /// Longest idle first, by the working-set monitor; least often
    /// accessed among equals, then lowest IPA.
    Coldest,
}

impl EvictionOrder {
    /// True if it goes by the order mappings were installed in, which the
    /// records keep only while an order that reads it is in force.
    pub fn reads_install_order(self) -> bool {
        matches!(self, Self::Fifo | Self::Lifo)
    }
}

/// Proactive reclaim for one VM: mappings idle this long go, even under
/// budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColdReclaim {
    /// How long a region must have been idle.
    pub min_idle: std::time::Duration,
}

/// A memory policy.
pub trait Policy: Send + Sync {
    /// Name for logs and traces.
    fn name(&self) -> &'static str;
    /// The decisions for one fault.
    fn decide(&self, ctx: &FaultContext) -> Decisions;
    /// VM `vm_id`'s resident budget, if the policy sets one.
    fn budget(&self, _vm_id: u16) -> Option<Budget> {
        None
    }
    /// VM `vm_id`'s proactive reclaim, if the policy sets one.
    fn cold_reclaim(&self, _vm_id: u16) -> Option<ColdReclaim> {
        None
    }
    /// Whether the policy needs VM `vm_id`'s working set monitored.
    fn needs_working_set(&self, vm_id: u16) -> bool {
        self.cold_reclaim(vm_id).is_some() || self.budget(vm_id).is_some_and(|b| b.order == EvictionOrder::Coldest)
    }
}
