//! memory-manager: the host half of Faultline.
//!
//! The daemon is built in layers, each a folder, each using only the ones
//! below it ([`LAYERS`], checked by `tests/layers.rs`):
//!
//! - [`memory`]: the guest memory model (addresses, memslots, VMAs, the
//!   regions the daemon maps, pins) and a VM's fixed layout and rebuildable
//!   mapping state;
//! - [`fault`]: the fault pipeline, KVM's `user_mem_abort()` cut into
//!   stages, and the questions it leaves to a memory policy;
//! - [`observe`]: fault events, their history, statistics and counters;
//! - [`policy`]: the built-in policies, policy services' rules, the host
//!   that keeps one policy in force;
//! - [`link`]: serving a VM's rings (a thread per vCPU, the control ring,
//!   reclaim, dirty logs);
//! - [`attach`]: checking, mapping, registering and serving an attaching
//!   machine;
//! - [`api`]: the gRPC services and Prometheus metrics;
//! - [`daemon`]: configuration and [`run`], the one place the layers are
//!   wired together.
//!
//! `docs/architecture.md` draws the layers and one fault's path.

pub mod api;
pub mod attach;
pub mod daemon;
pub mod fault;
pub mod link;
pub mod memory;
pub mod observe;
pub mod policy;

pub use daemon::config::Config;
pub use daemon::run;

/// The layers, lowest first: a module may use its own layer and the ones
/// before it, never one after it.
pub const LAYERS: [&str; 8] = ["memory", "fault", "observe", "policy", "link", "attach", "api", "daemon"];
