//! memory-manager: the host half of Faultline.
//!
//! Machines attach VMs over a Unix socket ([`attach`]); each VM's memory is
//! described by memslots ([`memslot`]) over regions the daemon maps itself
//! ([`region`], [`vma`]). Faults arrive on hyp-core rings and go through the
//! staged [`pipeline`], pinning pages ([`pin`]) and asking the [`policy`];
//! [`service`] runs one thread per vCPU ring. [`run`] is the daemon.
//!
//! The pipeline mirrors KVM's `user_mem_abort()` stage by stage; each stage
//! takes what it needs and returns what the next needs.

pub mod addr;
pub mod attach;
pub mod clock;
pub mod config;
pub mod control;
pub mod events;
pub mod evict;
pub mod grpc;
pub mod grpc_policy;
pub mod memslot;
pub mod metrics;
pub mod notify;
pub mod pin;
pub mod pipeline;
pub mod policy;
pub mod policy_host;
pub mod priority;
pub mod region;
pub mod rules;
pub mod service;
pub mod stats;
pub mod vm;
pub mod vma;

mod daemon;

pub use config::Config;
pub use daemon::{run, Daemon};
