//! The shared-memory ring ABI between the core and the daemon.
//!
//! Per vCPU, a fault ring (core to daemon: fault and result records) and a
//! command ring (daemon to core). See `docs/ring-abi.md`.

pub mod abi;
#[cfg(not(loom))]
mod region;
mod spsc;

pub use abi::{CommandRecord, FaultRecord, HeaderError, Record, RegionHeader, ResultRecord, RingKind};
#[cfg(not(loom))]
pub use region::SharedRegion;
pub use spsc::{Consumer, OwnedRing, Producer, RingError, RingView, Slot, Violation, OWNED_RING_ENTRIES};
