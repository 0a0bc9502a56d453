//! Observation: what the fault path records for others to read, without
//! ever waiting for them: fault events and their history, cumulative
//! statistics, per-VM counters, ring occupancy.

pub mod counters;
pub mod events;
pub mod hub;
pub mod pace;
pub mod rings;
pub mod stats;
pub mod workingset;
