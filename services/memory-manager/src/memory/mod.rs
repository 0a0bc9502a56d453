//! The guest memory model: addresses, memslots, VMAs, the regions the
//! daemon maps, pins, and a VM's two kinds of memory state, its fixed
//! [`layout`] and its rebuildable [`mapping`] state. No protocol, no async
//! runtime: everything above builds on this.

pub mod addr;
pub mod bitmap;
pub mod chunked;
pub mod claims;
pub mod handover;
pub mod layout;
pub mod mapping;
pub mod memslot;
pub mod pin;
pub mod pool;
pub mod pressure;
pub mod records;
pub mod region;
pub mod swap;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod vma;
