//! Stage-2 translation: VMSAv8-64 tables with a 4 KiB granule.

mod descriptor;
mod geometry;
mod memcache;
mod memory;
mod table;

pub use descriptor::{Descriptor, DescriptorKind, LeafAttrs, MemType, Perms};
pub use geometry::{AccessFlagUpdate, Geometry, GeometryError, ENTRIES_PER_TABLE, LEAF_LEVEL};
pub use memcache::{Memcache, MEMCACHE_CAPACITY};
pub use memory::{LinearMap, Table, TableMemory, TlbMaintenance};
pub use table::{MapOutcome, MapSize, Stage2, TableError, UnmapStats, Walk};

#[cfg(test)]
mod tests;
