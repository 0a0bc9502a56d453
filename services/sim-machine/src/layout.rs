//! The machine's physical and guest-physical layout.

/// Table memory (the core's own: roots and the pool handed out as memcache pages).
pub const TABLES_PA: u64 = 0x2000_0000;
/// Bytes of table memory.
pub const TABLES_SIZE: u64 = 16 << 20;
/// Bytes at the start of table memory kept for the stage-2 root.
pub const ROOT_RESERVE: u64 = 64 << 10;
/// The ring region's PA window (never mapped into the guest).
pub const RINGS_PA: u64 = 0x2100_0000;
/// The read-only memslot's backing ("ROM"), PA.
pub const ROM_PA: u64 = 0x3000_0000;
/// The read-only memslot's GPA.
pub const ROM_GPA: u64 = 0x1000_0000;
/// RAM's PA.
pub const RAM_PA: u64 = 0x4000_0000;
/// An address outside every memslot (a device the VMM emulates).
pub const MMIO_GPA: u64 = 0x0900_0000;
/// Records per ring.
pub const RING_ENTRIES: u32 = 64;

/// Sizes and placement that vary per run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// vCPUs.
    pub nr_vcpus: u32,
    /// RAM bytes (a multiple of 2 MiB).
    pub ram_size: u64,
    /// RAM's backing page size (4 KiB or 2 MiB).
    pub ram_page_size: u64,
    /// RAM's GPA (aligned to 2 MiB for block mappings, or not).
    pub ram_gpa: u64,
    /// ROM bytes.
    pub rom_size: u64,
}

impl Default for Layout {
    fn default() -> Self {
        Self { nr_vcpus: 1, ram_size: 224 << 20, ram_page_size: 2 << 20, ram_gpa: 0x4000_0000, rom_size: 32 << 20 }
    }
}

impl Layout {
    /// True if `gpa .. gpa + len` is RAM.
    pub fn in_ram(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.ram_gpa && gpa + len <= self.ram_gpa + self.ram_size
    }

    /// True if `gpa .. gpa + len` is ROM.
    pub fn in_rom(&self, gpa: u64, len: u64) -> bool {
        gpa >= ROM_GPA && gpa + len <= ROM_GPA + self.rom_size
    }
}

/// The ROM's initial content: a byte pattern of the offset, so reads of it
/// are checkable.
pub fn rom_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}
