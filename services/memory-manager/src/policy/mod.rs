//! Memory policies: the built-in ones, the rules a policy service sends
//! (checked once, matched per fault), and the host that keeps one policy
//! in force, swaps it atomically per fault and watches remote ones. Every
//! policy answers the questions the pipeline asks ([`crate::fault::choices`]).

pub mod builtin;
pub mod host;
pub mod remote;
pub mod rules;
pub mod stats;
