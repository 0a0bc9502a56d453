//! hyp-core: the EL2 half of Faultline.
//!
//! A `no_std`, allocation-free core that runs in three places from one
//! source: host unit tests, the simulated machine, and real EL2. It decodes
//! stage-2 aborts ([`abort`]), owns the stage-2 tables ([`stage2`]), speaks
//! the shared-memory ring ABI to the memory-manager daemon ([`ring`]), tracks
//! which VM owns each physical page ([`ownership`]) and validates and
//! installs the daemon's commands ([`vm`]). It trusts nothing the daemon
//! writes.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod abort;
pub mod addr;
pub mod arch;
pub mod mmio;
pub mod ownership;
pub mod reject;
pub mod ring;
pub mod stage2;
mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vm;
