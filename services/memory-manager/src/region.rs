//! Guest regions: the machine's memory as the daemon maps it, each a
//! shared mapping aligned to its page size (so HVA and PA agree modulo the
//! block sizes it can back).

use faultline_attach::shm::MappedRegion;
use hyp_core::addr::Pa;

use crate::addr::Hva;

/// A PA window that belongs to the VM (guest memory) as the daemon knows it.
#[derive(Debug)]
pub struct GuestRegion {
    /// Index in the attach request.
    pub index: usize,
    /// First PA of the window.
    pub pa_base: Pa,
    /// Bytes.
    pub size: u64,
    /// Backing page size (4 KiB, 2 MiB, 1 GiB).
    pub page_size: u64,
    /// The guest may write it.
    pub writable: bool,
    /// Device memory.
    pub device: bool,
    /// The daemon's mapping.
    pub map: MappedRegion,
}

impl GuestRegion {
    /// The daemon address of the region's first byte.
    pub fn base(&self) -> Hva {
        Hva::new(self.map.base().as_ptr() as u64)
    }

    /// The PA of byte `offset` of the region.
    pub fn pa_at(&self, offset: u64) -> Option<Pa> {
        (offset < self.size).then(|| Pa::new(self.pa_base.raw() + offset))
    }
}
