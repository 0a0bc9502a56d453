//! The board layout: where everything lives in QEMU's RAM (PA) and in the
//! guest's IPA space, and the constants of the stage-1 probe guest. One
//! `no_std` crate that the EL2 image, its launcher (`qemu-machine`) and the
//! simulated machine all depend on, so none can drift. The launcher still
//! checks the image's READY line against it (a stale image binary).
#![no_std]

/// Start of QEMU virt RAM; file offset 0 of the shared RAM file.
pub const RAM_PA: u64 = 0x4000_0000;
/// RAM given to QEMU (`-m 256M`).
pub const RAM_BYTES: u64 = 256 << 20;
/// The page the launcher writes GO into once the VM is attached.
pub const MAILBOX_PA: u64 = 0x4020_0000;
/// The ring region (vCPU 0's pair and the control pair).
pub const RINGS_PA: u64 = 0x4021_0000;
/// Bytes reserved for the ring region.
pub const RINGS_BYTES: u64 = 64 << 10;
/// Records per ring.
pub const RING_ENTRIES: u32 = 64;
/// Stage-2 table memory: the root first, then the pool the daemon hands
/// back as memcache pages.
pub const TABLES_PA: u64 = 0x4040_0000;
/// Bytes of table memory.
pub const TABLES_BYTES: u64 = 4 << 20;
/// Bytes at the start of table memory kept for the root.
pub const ROOT_RESERVE: u64 = 64 << 10;
/// Backing of the read-only memslot.
pub const ROM_PA: u64 = 0x4080_0000;
/// Bytes of the read-only memslot.
pub const ROM_BYTES: u64 = 2 << 20;
/// Backing of the memslot mapped with 2 MiB blocks.
pub const BLOCKS_PA: u64 = 0x4200_0000;
/// Bytes of the block memslot.
pub const BLOCKS_BYTES: u64 = 32 << 20;
/// Backing of the memslot mapped page by page.
pub const PAGES_PA: u64 = 0x4400_0000;
/// Bytes of the page memslot.
pub const PAGES_BYTES: u64 = 8 << 20;
/// Backing of the memslot holding the guest's stage-1 page tables (the
/// stage-1 probe); the launcher writes the tables before boot.
pub const PT_PA: u64 = 0x4480_0000;
/// Bytes of the page-table memslot.
pub const PT_BYTES: u64 = 2 << 20;
/// End of the memory whose ownership the core tracks.
pub const TRACKED_END: u64 = PT_PA + PT_BYTES;

/// Guest IPA of the block memslot; the guest's code is its first bytes.
pub const BLOCKS_IPA: u64 = 0x8000_0000;
/// Guest IPA of the page memslot.
pub const PAGES_IPA: u64 = 0x8400_0000;
/// Guest IPA of the read-only memslot.
pub const ROM_IPA: u64 = 0x9000_0000;
/// A guest IPA outside every memslot.
pub const OUTSIDE_IPA: u64 = 0xa000_0000;
/// Guest IPA of the page-table memslot: the stage-1 root (TTBR0_EL1) is its
/// first page, then the level-2 and level-3 tables.
pub const PT_IPA: u64 = 0x8800_0000;
/// The word the stage-1 probe reads or writes (VA = IPA), in the page memslot.
pub const PROBE_IPA: u64 = PAGES_IPA + 8;
/// TCR_EL1 of the stage-1 probe: T0SZ 25 (39-bit VA), walks inner/outer
/// write-back inner shareable, 4 KiB granule, TTBR1 walks off (EPD1), IPS
/// 40 bits, hardware access-flag updates on (HA, bit 39).
pub const PROBE_TCR: u64 = 25 | 1 << 8 | 1 << 10 | 3 << 12 | 1 << 23 | 2 << 32 | 1 << 39;
/// The write probes store the probed address XOR this, and report what
/// they read back.
pub const PROBE_MAGIC: u64 = 0x5bd1_e995_5bd1_e995;
/// What the exec probe's code at the probed word puts in X3, which the
/// guest then reports.
pub const PROBE_EXEC_IMM: u16 = 0x5eed;
/// `RET`.
pub const PROBE_RET: u32 = 0xd65f_03c0;
/// The exec probe's code, which the machine writes at the probed word:
/// `MOVZ X3, #PROBE_EXEC_IMM` then `RET`.
pub const PROBE_EXEC_CODE: [u32; 2] = [0xd280_0003 | (PROBE_EXEC_IMM as u32) << 5, PROBE_RET];

// The image (linked at RAM_PA, at most 2 MiB) ends before the mailbox, and
// everything fits in RAM.
const _: () = assert!(MAILBOX_PA >= RAM_PA + (2 << 20) && TRACKED_END <= RAM_PA + RAM_BYTES);

/// Mailbox words (offsets in the mailbox page).
pub mod mailbox {
    /// The launcher writes [`GO`] here after the attach succeeded.
    pub const GO: u64 = 0;
    /// The value that starts the guest.
    pub const GO_VALUE: u32 = 0x474f_2121;
    /// Which guest runs: [`SCENARIO_CHECKSUM`] or [`SCENARIO_STAGE1_PROBE`].
    pub const SCENARIO: u64 = 4;
    /// The checksum guest (2 MiB blocks, pages, read-only slot, exits).
    pub const SCENARIO_CHECKSUM: u32 = 0;
    /// The stage-1 probe: MMU on with tables in their own memslot, one access.
    pub const SCENARIO_STAGE1_PROBE: u32 = 1;
    /// The probe's access: 0 read64, 1 write64, 2 CAS, 3 load pre-index,
    /// 4 store pre-index, 5 DC ZVA, 6 AT S1E1R, 7 instruction fetch, 8 an
    /// MMIO store then load.
    pub const PROBE_ACCESS: u64 = 8;
    /// The instruction-fetch probe's access code.
    pub const PROBE_ACCESS_EXEC: u32 = 7;
    /// Probe flags: [`PROBE_DATA_PUNCHED`].
    pub const PROBE_FLAGS: u64 = 12;
    /// The data memslot's backing is punched: its pages reach RAM only when
    /// the daemon fills them, so the image must not read them first.
    pub const PROBE_DATA_PUNCHED: u32 = 1;
    /// The launcher adds one here each time it re-attached the VM to a new
    /// daemon; a vCPU waiting in a fault then posts it again (the dead
    /// daemon may have taken it and never answered).
    pub const REPOST: u64 = 16;
    /// If nonzero, the image pauses before the guest's fault with this
    /// number (1 is the first), says PAUSED on the UART and serves only the
    /// control ring until [`RESUME`] holds [`RESUME_VALUE`].
    pub const PAUSE_AT_FAULT: u64 = 20;
    /// Where the launcher lets a paused image go on.
    pub const RESUME: u64 = 24;
    /// The value that ends a pause.
    pub const RESUME_VALUE: u32 = 0x474f_4f4e;
    /// The MMIO exit the vCPU waits on: a `hyp_core::mmio::MmioExit` (24
    /// bytes) the image writes before it bumps [`MMIO_SEQ`]; the launcher
    /// writes a read's value into its `data` word before it answers in
    /// [`MMIO_DONE`].
    pub const MMIO_EXIT: u64 = 32;
    /// The image's count of MMIO exits, the last one's number.
    pub const MMIO_SEQ: u64 = 56;
    /// The launcher's answer: the number of the exit it emulated.
    pub const MMIO_DONE: u64 = 60;
    /// The guest's IPA space in bits, 40 (the default, also for 0) or 48:
    /// written by the launcher before QEMU starts, read by the image at
    /// boot, before it builds the VM's stage 2.
    pub const IPA_BITS: u64 = 64;
    /// Nonzero: the image may let the MMU set stage-2 access flags itself
    /// (FEAT_HAFDBS, `VTCR_EL2.HA`) if the CPU has it. Written by the
    /// launcher before QEMU starts, read by the image at boot.
    pub const HW_ACCESS_FLAG: u64 = 68;
}

/// The stage-1 probe's MMIO page: outside every memslot, mapped by the
/// guest's stage 1 (a 2 MiB block) so that its accesses reach stage 2 and
/// exit to the machine. Its block is the level-2 table's last entry: a
/// table page copied back without its last bytes loses it.
pub const PROBE_MMIO_IPA: u64 = 0xbfe0_0000;
