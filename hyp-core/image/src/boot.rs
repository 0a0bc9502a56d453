//! Entry at EL2 and the EL2 exception vectors. Everything else is Rust.

use core::arch::global_asm;

// _start: stack, BSS, VBAR_EL2, then el2_main (which never returns).
global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    ldr x0, =__stack_top
    mov sp, x0
    ldr x1, =__bss_start
    ldr x2, =__bss_end
1:  cmp x1, x2
    b.hs 2f
    str xzr, [x1], #8
    b 1b
2:  adr x0, el2_vectors
    msr vbar_el2, x0
    isb
    bl el2_main
3:  wfe
    b 3b
"#
);

// The vector table: lower-EL AArch64 synchronous exceptions (the guest's
// aborts, HVCs and trapped SMCs) go to el2_lower_sync with a frame of the
// guest's x0..x30; everything else is unexpected and reported by number.
global_asm!(
    r#"
    .section .text.vectors, "ax"
    .balign 2048
el2_vectors:
    .irp n, 0, 1, 2, 3, 4, 5, 6, 7
    .balign 0x80
    mov x0, #\n
    b el2_unexpected_entry
    .endr
    .balign 0x80
    b el2_lower_sync_entry
    .irp n, 9, 10, 11, 12, 13, 14, 15
    .balign 0x80
    mov x0, #\n
    b el2_unexpected_entry
    .endr

el2_unexpected_entry:
    bl el2_unexpected
4:  wfe
    b 4b

el2_lower_sync_entry:
    sub sp, sp, #256
    stp x0, x1, [sp, #0]
    stp x2, x3, [sp, #16]
    stp x4, x5, [sp, #32]
    stp x6, x7, [sp, #48]
    stp x8, x9, [sp, #64]
    stp x10, x11, [sp, #80]
    stp x12, x13, [sp, #96]
    stp x14, x15, [sp, #112]
    stp x16, x17, [sp, #128]
    stp x18, x19, [sp, #144]
    stp x20, x21, [sp, #160]
    stp x22, x23, [sp, #176]
    stp x24, x25, [sp, #192]
    stp x26, x27, [sp, #208]
    stp x28, x29, [sp, #224]
    str x30, [sp, #240]
    mov x0, sp
    bl el2_lower_sync
    ldp x0, x1, [sp, #0]
    ldp x2, x3, [sp, #16]
    ldp x4, x5, [sp, #32]
    ldp x6, x7, [sp, #48]
    ldp x8, x9, [sp, #64]
    ldp x10, x11, [sp, #80]
    ldp x12, x13, [sp, #96]
    ldp x14, x15, [sp, #112]
    ldp x16, x17, [sp, #128]
    ldp x18, x19, [sp, #144]
    ldp x20, x21, [sp, #160]
    ldp x22, x23, [sp, #176]
    ldp x24, x25, [sp, #192]
    ldp x26, x27, [sp, #208]
    ldp x28, x29, [sp, #224]
    ldr x30, [sp, #240]
    add sp, sp, #256
    eret
"#
);

/// The guest's general registers as the lower-EL vector saved them.
#[repr(C)]
pub struct Frame {
    /// x0..x30, then padding to 16 bytes.
    pub x: [u64; 32],
}

/// Enters the guest at EL1h at `entry` with `x0` and interrupts masked;
/// never returns (the guest comes back only through the vectors).
pub fn enter_guest(entry: u64, x0: u64) -> ! {
    // SAFETY: ELR/SPSR/SCTLR_EL1 set up an EL1h entry with the MMU off; the
    // stage-2 registers were written by the caller. ERET leaves EL2 for good
    // on this path; SP_EL2 stays below the caller's frame, which the
    // exception vectors then reuse.
    unsafe {
        core::arch::asm!(
            "msr elr_el2, {entry}",
            "msr spsr_el2, {spsr}",
            "msr sctlr_el1, {sctlr}",
            "isb",
            "eret",
            in("x0") x0,
            entry = in(reg) entry,
            spsr = in(reg) 0x3c5u64,
            sctlr = in(reg) 0x30d0_0800u64,
            options(noreturn)
        )
    }
}
