//! The guest: a small EL1 program, stage-1 MMU off, copied to the start of
//! the block memslot and entered there. It writes and reads across a memslot
//! mapped with 2 MiB blocks and one mapped page by page, reads a read-only
//! memslot and writes it (an MMIO exit carrying the running sum), reads
//! outside every memslot (an exit whose value the machine supplies), reads
//! the 32 pages again after flushing its TLB (aged pages fault on their
//! access flag, resolved at EL2), sums what it read, reports the sum with
//! `HVC #1` and powers off with PSCI SYSTEM_OFF (`HVC #0`).
//!
//! Every value written is `address ^ 0x5bd1_e995_5bd1_e995`, so the host
//! computes the expected sum from the addresses alone (`faultline qemu`).

use core::arch::global_asm;

use crate::layout::{
    BLOCKS_IPA, OUTSIDE_IPA, PAGES_IPA, PROBE_IPA, PROBE_MAGIC, PROBE_MMIO_IPA, PROBE_TCR, PT_IPA, ROM_IPA,
};

/// MAIR_EL1: attribute 0 Normal write-back.
const MAIR: u64 = 0xff;

/// Every word the guest writes is its address XOR this.
const MAGIC: u64 = 0x5bd1_e995_5bd1_e995;

global_asm!(
    r#"
    .macro movl64 reg, imm
    movz \reg, #((\imm) & 0xffff)
    movk \reg, #(((\imm) >> 16) & 0xffff), lsl #16
    movk \reg, #(((\imm) >> 32) & 0xffff), lsl #32
    movk \reg, #(((\imm) >> 48) & 0xffff), lsl #48
    .endm

    .arch_extension lse
    .section .guest, "ax"
    .global guest_entry
guest_entry:
    mov x20, #0
    movl64 x21, {magic}
    // Blocks 1..=8 of the block memslot (block 0 holds this code): two
    // words each, 1.875 MiB apart.
    movl64 x1, {block1}
    mov x2, #8
1:  eor x3, x1, x21
    str x3, [x1]
    add x4, x1, #0x1e0, lsl #12
    eor x5, x4, x21
    str x5, [x4]
    ldr x6, [x1]
    add x20, x20, x6
    ldr x7, [x4]
    add x20, x20, x7
    add x1, x1, #0x200, lsl #12
    subs x2, x2, #1
    b.ne 1b
    // 32 pages of the page memslot.
    movl64 x1, {pages}
    mov x2, #32
2:  eor x3, x1, x21
    str x3, [x1]
    ldr x6, [x1]
    add x20, x20, x6
    add x1, x1, #1, lsl #12
    subs x2, x2, #1
    b.ne 2b
    // The read-only memslot: a read is mapped, a write exits.
    movl64 x1, {rom}
    ldr x6, [x1]
    add x20, x20, x6
    str x20, [x1]
    // Outside every memslot: the read exits and reads what the machine's
    // device answers (a function of the value the ROM write stored).
    movl64 x1, {outside}
    ldr x6, [x1]
    add x20, x20, x6
    // Flush this VM's TLB entries (as an OS does), then read the 32 pages
    // again: a page whose access flag the daemon cleared meanwhile (AGE)
    // takes an access-flag fault, which the core resolves itself.
    tlbi vmalle1
    dsb ish
    isb
    movl64 x1, {pages}
    mov x2, #32
4:  ldr x6, [x1]
    add x20, x20, x6
    add x1, x1, #1, lsl #12
    subs x2, x2, #1
    b.ne 4b
    // Report, then power off.
    mov x0, x20
    hvc #1
    movl64 x0, 0x84000008
    hvc #0
3:  b 3b

    // The stage-1 probe. Turns the MMU on with the tables the launcher
    // wrote in the page-table memslot, makes one access to the probe word,
    // reports a value computed from memory (and registers the access wrote
    // back) and powers off. Every walk of a table page not yet mapped at
    // stage 2 is a stage-2 abort with S1PTW set; an access-flag update is a
    // write by the walker.
    .global guest_s1_entry
guest_s1_entry:
    movl64 x1, {mair}
    msr mair_el1, x1
    movl64 x1, {tcr}
    msr tcr_el1, x1
    movl64 x1, {ttbr}
    msr ttbr0_el1, x1
    isb
    mrs x1, sctlr_el1
    movl64 x2, 0x1005
    orr x1, x1, x2
    msr sctlr_el1, x1
    isb
    movl64 x2, {probe}
    // x5: what the write probes store, the probed address ^ PROBE_MAGIC.
    movl64 x5, {probe_magic}
    eor x5, x5, x2
    mov x3, #0
    // x0: 0 read64, 1 write64, 2 CAS, 3 load pre-index, 4 store pre-index,
    // 5 DC ZVA, 6 AT S1E1R, 7 instruction fetch, 8 MMIO store and load.
    // Result in x3.
    cmp x0, #1
    b.eq 11f
    cmp x0, #2
    b.eq 12f
    cmp x0, #3
    b.eq 13f
    cmp x0, #4
    b.eq 14f
    cmp x0, #5
    b.eq 15f
    cmp x0, #6
    b.eq 16f
    cmp x0, #7
    b.eq 17f
    cmp x0, #8
    b.eq 18f
    // read64: the word.
    ldr x3, [x2]
    b 5f
    // write64: store, then read back.
11: str x5, [x2]
    ldr x3, [x2]
    b 5f
    // CAS expecting 0: the old value returned ^ the word read back after.
12: mov x4, #0
    cas x4, x5, [x2]
    ldr x7, [x2]
    eor x3, x4, x7
    b 5f
    // Load pre-index: the word ^ the written-back base (the probe address).
13: sub x6, x2, #8
    ldr x3, [x6, #8]!
    eor x3, x3, x6
    b 5f
    // Store pre-index: the word read back ^ the written-back base.
14: sub x6, x2, #8
    str x5, [x6, #8]!
    ldr x3, [x2]
    eor x3, x3, x6
    b 5f
    // DC ZVA: the OR of the block's eight words after it (none was zero).
15: bic x6, x2, #63
    dc zva, x6
    ldp x7, x8, [x6]
    orr x3, x7, x8
    ldp x7, x8, [x6, #16]
    orr x3, x3, x7
    orr x3, x3, x8
    ldp x7, x8, [x6, #32]
    orr x3, x3, x7
    orr x3, x3, x8
    ldp x7, x8, [x6, #48]
    orr x3, x3, x7
    orr x3, x3, x8
    b 5f
16: at s1e1r, x2
    isb
    mrs x3, par_el1
    b 5f
    // Fetch: run the code at the probe word; it sets x3.
17: blr x2
    b 5f
    // MMIO: store x5 to the device, then load what it answers.
18: movl64 x6, {mmio}
    str x5, [x6]
    ldr x3, [x6]
5:  mov x0, x3
    hvc #1
    movl64 x0, 0x84000008
    hvc #0
6:  b 6b
"#,
    mair = const MAIR,
    tcr = const PROBE_TCR,
    ttbr = const PT_IPA,
    probe = const PROBE_IPA,
    mmio = const PROBE_MMIO_IPA,
    magic = const MAGIC,
    probe_magic = const PROBE_MAGIC,
    block1 = const BLOCKS_IPA + (2 << 20) + 0x10000,
    pages = const PAGES_IPA + 8,
    rom = const ROM_IPA + 0x40,
    outside = const OUTSIDE_IPA,
);

extern "C" {
    static __guest_start: u8;
    static __guest_end: u8;
    static guest_s1_entry: u8;
}

/// Offset of the stage-1 probe's entry in [`program`].
pub fn stage1_probe_offset() -> u64 {
    // Addresses of linker symbols only; nothing is read.
    (core::ptr::addr_of!(guest_s1_entry) as usize - core::ptr::addr_of!(__guest_start) as usize) as u64
}

/// The guest program's bytes in the image.
pub fn program() -> &'static [u8] {
    // SAFETY: the linker script brackets the .guest section with these two
    // symbols; the bytes are part of the loaded image and never written.
    unsafe {
        let start = core::ptr::addr_of!(__guest_start);
        let len = core::ptr::addr_of!(__guest_end) as usize - start as usize;
        core::slice::from_raw_parts(start, len)
    }
}
