//! Memory policy: the decisions a policy owns (mapping size, write on read,
//! eager exec), never correctness. The pipeline clamps whatever a policy
//! says to what the memslot, VMA, logging and device rules allow.

use hyp_core::stage2::MapSize;
use serde::Deserialize;

/// What a policy is asked about one fault.
#[derive(Clone, Copy, Debug)]
pub struct FaultContext {
    /// The faulting IPA.
    pub ipa: u64,
    /// The memslot id.
    pub memslot: usize,
    /// Largest size the correctness rules allow.
    pub allowed: MapSize,
    /// The access is a write.
    pub write: bool,
}

/// A memory policy.
pub trait Policy: Send + Sync {
    /// Name for logs and traces.
    fn name(&self) -> &'static str;
    /// Largest mapping size the policy wants (clamped to `ctx.allowed`).
    fn max_mapping_size(&self, ctx: &FaultContext) -> MapSize;
    /// Map writable on a read fault where allowed (KVM does).
    fn writable_on_read(&self, ctx: &FaultContext) -> bool;
    /// Map executable even on data faults where allowed.
    fn eager_exec(&self, ctx: &FaultContext) -> bool;
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
    fn max_mapping_size(&self, ctx: &FaultContext) -> MapSize {
        ctx.allowed
    }
    fn writable_on_read(&self, _: &FaultContext) -> bool {
        true
    }
    fn eager_exec(&self, _: &FaultContext) -> bool {
        false
    }
}

/// 4 KiB mappings only.
#[derive(Debug, Default)]
pub struct Pages4k;

impl Policy for Pages4k {
    fn name(&self) -> &'static str {
        "4k"
    }
    fn max_mapping_size(&self, _: &FaultContext) -> MapSize {
        MapSize::Page4K
    }
    fn writable_on_read(&self, _: &FaultContext) -> bool {
        true
    }
    fn eager_exec(&self, _: &FaultContext) -> bool {
        false
    }
}
