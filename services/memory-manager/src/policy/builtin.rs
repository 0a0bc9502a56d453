//! The built-in policies: KVM's choices, and 4 KiB pages only.

use std::collections::HashSet;
use std::sync::Mutex;

use hyp_core::stage2::MapSize;
use serde::Deserialize;

use crate::fault::choices::{Decisions, FaultContext, Policy};

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
