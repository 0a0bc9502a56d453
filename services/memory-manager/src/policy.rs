//! Memory policy: the decisions a policy owns (mapping size, fault-around,
//! write on read, eager exec), never correctness. The pipeline asks once per
//! fault and clamps whatever the answer is to what the memslot, VMA,
//! logging and device rules allow.

use std::collections::HashSet;
use std::sync::Mutex;

use hyp_core::abort::Access;
use hyp_core::stage2::MapSize;
use serde::Deserialize;

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
}

/// A `'static` copy of `name`, made once per distinct name: fault events
/// carry the policy's name without allocating, and policies are few.
pub fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let names = names.get_or_insert_with(HashSet::new);
    if let Some(n) = names.get(name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// The built-in policies.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyKind {
    /// KVM's choices: largest allowed size, writable on read, exec on fetch.
    #[serde(rename = "default")]
    #[value(name = "default")]
    Default,
    /// 4 KiB mappings only, otherwise as default.
    #[serde(rename = "4k")]
    #[value(name = "4k")]
    Pages4k,
}

impl PolicyKind {
    /// The policy object.
    pub fn build(self) -> Box<dyn Policy> {
        match self {
            Self::Default => Box::new(KvmDefault),
            Self::Pages4k => Box::new(Pages4k),
        }
    }
}

/// KVM's user_mem_abort() choices.
#[derive(Debug, Default)]
pub struct KvmDefault;

impl Policy for KvmDefault {
    fn name(&self) -> &'static str {
        "default"
    }
    fn decide(&self, ctx: &FaultContext) -> Decisions {
        Decisions::kvm(ctx)
    }
}

/// 4 KiB mappings only.
#[derive(Debug, Default)]
pub struct Pages4k;

impl Policy for Pages4k {
    fn name(&self) -> &'static str {
        "4k"
    }
    fn decide(&self, ctx: &FaultContext) -> Decisions {
        Decisions { max_size: MapSize::Page4K, ..Decisions::kvm(ctx) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_names_are_shared() {
        let a = intern(&String::from("sequential-4k"));
        let b = intern("sequential-4k");
        assert!(std::ptr::eq(a, b));
        assert_eq!(a, "sequential-4k");
    }
}
