//! Attaching machines: a request's description checked by pure functions
//! ([`validate`]), its peer against who may attach ([`access`]) and the
//! request against the daemon's limits ([`admission`]), its fds
//! checked and mapped into a VM ([`map`]), the VM registered ([`registry`])
//! and served for as long as its connection lives ([`connection`]).

pub mod access;
pub mod admission;
pub mod connection;
pub mod map;
pub mod registry;
pub mod state;
pub mod takeover;
pub mod validate;
