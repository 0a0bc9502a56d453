//! The fault pipeline: one stage-2 fault in, a decision out (map with a
//! pinned plan, exit to the VMM, or inject an abort), stage by stage as
//! KVM's `user_mem_abort()` runs. It reads the guest memory model and asks
//! a memory policy the questions it leaves open ([`choices`]); it knows
//! nothing of rings, processes or protocols.

pub mod around;
pub mod blocking;
pub mod choices;
pub mod clock;
pub mod context;
pub mod error;
pub mod failpoint;
pub mod pipeline;
pub mod plan;
pub mod stages;
pub mod trace;
