//! Why the pipeline failed: the daemon's fault, not the guest's (the guest
//! gets an injected abort).

use super::failpoint::Failpoint;
use crate::memory::addr::Hva;
use crate::memory::pin::PinError;
use crate::memory::pressure::Refused;
use crate::memory::region::FillError;

/// Why the pipeline failed (the daemon's fault, not the guest's).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// No VMA backs a memslot's address.
    #[error("no VMA backs {0:?}")]
    NoVma(Hva),
    /// The mapping range falls outside the VMA's region.
    #[error("mapping outside region {0}")]
    OutsideRegion(usize),
    /// Pinning failed.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// Faulting in fresh backing failed.
    #[error("populating backing pages failed: {0}")]
    Populate(#[from] FillError),
    /// Fresh backing was needed and the host's memory pressure refused it.
    #[error(transparent)]
    HostPressure(#[from] Refused),
    /// A test asked for a failure here.
    #[error("injected failure at {0:?}")]
    Injected(Failpoint),
}

impl From<Failpoint> for PipelineError {
    fn from(point: Failpoint) -> Self {
        Self::Injected(point)
    }
}
