//! The API: gRPC services (FaultTrace, Control, PolicyControl, WorkingSet, health,
//! reflection), their proto conversions in one place ([`convert`]), and
//! Prometheus metrics. It reads the daemon's state only through the
//! [`sources::Sources`] the daemon hands it.

pub mod access;
pub mod control;
pub mod convert;
pub mod fault_trace;
pub mod metrics;
pub mod policy_control;
pub mod server;
pub mod sources;
pub mod streams;
pub mod working_set;
