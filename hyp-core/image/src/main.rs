//! hyp-core at real EL2 on QEMU's virt machine.
//!
//! Boots at EL2, builds the guest's stage 2 with hyp-core in its own table
//! memory, creates the rings in RAM shared with the host, says READY on the
//! UART and waits for the launcher to attach the VM to the memory-manager
//! daemon and write GO. Then it enters the guest at EL1. Every stage-2 abort
//! goes through the same hyp-core calls the simulated machine makes
//! (`Vm::take_fault`, the fault ring, `Vm::execute` for each command until
//! the fault completes). An MMIO exit goes to the launcher, the VMM here,
//! through the mailbox: the image writes the `MmioExit` (a store's value
//! in it), says EXIT on the UART and waits, serving the control ring, until
//! the launcher answered (a load's value in the record's data word); then
//! it completes the load into the guest's register and skips the
//! instruction. The guest reports its
//! checksum with HVC #1 and powers off with PSCI SYSTEM_OFF.
//!
//! The daemon may die and be replaced while the guest runs: a vCPU waiting
//! in a fault keeps serving the control ring (the successor rebuilds its
//! records through it) and posts its fault again when the launcher says it
//! re-attached (the mailbox's REPOST word). The launcher can pause the
//! guest before a given fault, to replace the daemon at a known point.

#![no_std]
#![no_main]

mod boot;
mod guest;
mod uart;

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::panic::PanicInfo;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The board layout, shared with the launcher and the simulated machine.
use faultline_board as layout;
use hyp_core::abort::{Abort, FaultIpa};
use hyp_core::addr::{Ipa, Pa};
use hyp_core::arch::{translate_el1_va, El2Tlb};
use hyp_core::mmio::MmioExit;
use hyp_core::ownership::{Owner, PageOwnership, VmId};
use hyp_core::ring::{Consumer, Producer, RingKind, SharedRegion};
use hyp_core::stage2::{AccessFlagUpdate, Geometry, LinearMap};
use hyp_core::vm::{Completion, Taken, Vm};

use boot::Frame;
use layout::*;

const VM_ID: u16 = 1;
/// vCPU 0 and the control pair.
const RING_PAIRS: u32 = 2;
const CONTROL: u32 = 1;
const TRACKED_PAGES: usize = ((TRACKED_END - TABLES_PA) / 4096) as usize;

/// Everything the exception handler needs, built once before the guest runs.
struct State {
    vm: Vm<LinearMap>,
    owners: PageOwnership<'static>,
    tlb: El2Tlb,
    faults_out: Producer<'static>,
    commands: Consumer<'static>,
    control_in: Consumer<'static>,
    control_out: Producer<'static>,
    faults: u64,
    exits: u64,
}

/// A cell written once at boot and then used only by the (non-nesting)
/// EL2 exception handler on this one PE.
struct Once<T>(UnsafeCell<MaybeUninit<T>>);

// SAFETY: one PE, and the handler runs with exceptions masked, so the value
// is never accessed by two contexts at once.
unsafe impl<T> Sync for Once<T> {}

static STATE: Once<State> = Once(UnsafeCell::new(MaybeUninit::uninit()));
static mut OWNERSHIP: [u16; TRACKED_PAGES] = [0; TRACKED_PAGES];

fn ptr(pa: u64) -> NonNull<u8> {
    NonNull::new(pa as *mut u8).expect("non-zero PA")
}

fn counter() -> u64 {
    let (cnt, frq): (u64, u64);
    // SAFETY: reads of the generic timer's count and frequency registers.
    unsafe { core::arch::asm!("mrs {0}, cntpct_el0", "mrs {1}, cntfrq_el0", out(reg) cnt, out(reg) frq) };
    cnt.saturating_mul(1_000_000_000 / frq.max(1))
}

fn sysreg_write_stage2(vtcr: u64, vttbr: u64) {
    // HCR_EL2: VM (stage 2 on), SWIO, TSC (trap guest SMC), RW (EL1 is AArch64).
    let hcr: u64 = 1 | 1 << 1 | 1 << 19 | 1 << 31;
    // SAFETY: stage-2 and hypervisor configuration for the guest about to
    // run; EL2's own translation is off and unaffected. TLBI VMALLS12E1
    // drops anything cached for the VMID before first use.
    unsafe {
        core::arch::asm!(
            "msr vtcr_el2, {vtcr}",
            "msr vttbr_el2, {vttbr}",
            "msr hcr_el2, {hcr}",
            "isb",
            "tlbi vmalls12e1",
            "dsb sy",
            "isb",
            vtcr = in(reg) vtcr, vttbr = in(reg) vttbr, hcr = in(reg) hcr,
        )
    };
}

/// Boots: builds the core and the rings, says READY, waits for GO, enters
/// the guest.
#[no_mangle]
extern "C" fn el2_main() -> ! {
    println!("FAULTLINE-EL2 BOOT at EL2");
    // SAFETY: the table window is RAM this image never uses otherwise,
    // identity-mapped (EL2's MMU is off), 4 KiB aligned; the core and the
    // daemon (through commands) are its only users.
    let tables = unsafe { LinearMap::new(Pa::new(TABLES_PA), TABLES_BYTES, ptr(TABLES_PA)) };
    // SAFETY: OWNERSHIP is borrowed once, here, for the life of the image.
    let storage: &'static mut [u16] = unsafe { &mut *core::ptr::addr_of_mut!(OWNERSHIP) };
    let mut owners = PageOwnership::new(Pa::new(TABLES_PA), storage);
    let id = VmId::new(VM_ID).expect("VM id");
    for (pa, len) in [(ROM_PA, ROM_BYTES), (BLOCKS_PA, BLOCKS_BYTES), (PAGES_PA, PAGES_BYTES), (PT_PA, PT_BYTES)] {
        owners.transfer(Pa::new(pa), len, Owner::Host, Owner::Vm(id)).expect("guest memory is the host's");
    }
    let geometry = match read_mailbox(mailbox::IPA_BITS) {
        48 => Geometry::new(48, 48).expect("a 48-bit geometry"),
        _ => Geometry::kvm_default(),
    };
    let vm = Vm::new(id, geometry, Pa::new(TABLES_PA), RING_PAIRS, tables, &mut owners).expect("VM");
    // SAFETY: the ring window is RAM shared with the daemon through QEMU's
    // memory file, used only through the ring ABI's atomics from now on.
    let shared =
        unsafe { SharedRegion::create(ptr(RINGS_PA), RINGS_BYTES, RING_PAIRS, RING_ENTRIES) }.expect("ring region");
    let ring = |pair, kind| shared.ring(pair, kind).expect("ring in range");
    let state = State {
        faults_out: Producer::attach(ring(0, RingKind::Fault)).expect("fault ring"),
        commands: Consumer::attach(ring(0, RingKind::Command)).expect("command ring"),
        control_in: Consumer::attach(ring(CONTROL, RingKind::Command)).expect("control ring"),
        control_out: Producer::attach(ring(CONTROL, RingKind::Fault)).expect("control ring"),
        vm,
        owners,
        tlb: El2Tlb,
        faults: 0,
        exits: 0,
    };
    // Hardware access-flag updates when the launcher allows them and the
    // CPU has them (ID_AA64MMFR1_EL1.HAFDBS, bits [3:0], nonzero).
    let af = if read_mailbox(mailbox::HW_ACCESS_FLAG) != 0 && id_aa64mmfr1() & 0xf != 0 {
        AccessFlagUpdate::Hardware
    } else {
        AccessFlagUpdate::Fault
    };
    let (vtcr, vttbr) = (geometry.vtcr(af), state.vm.stage2().vttbr());
    // SAFETY: first and only initialisation, before the guest can trap.
    unsafe { (*STATE.0.get()).write(state) };

    println!(
        "FAULTLINE-EL2 READY rings={:#x}+{:#x} tables={:#x}+{:#x} root={:#x} mailbox={:#x} vttbr={:#x} ipa_bits={} hw_af={}",
        RINGS_PA,
        RINGS_BYTES,
        TABLES_PA,
        TABLES_BYTES,
        ROOT_RESERVE,
        MAILBOX_PA,
        vttbr,
        geometry.ipa_bits(),
        (af == AccessFlagUpdate::Hardware) as u8
    );
    while read_mailbox(mailbox::GO) != mailbox::GO_VALUE {
        core::hint::spin_loop();
    }
    let (entry, x0) = match read_mailbox(mailbox::SCENARIO) {
        mailbox::SCENARIO_CHECKSUM => (BLOCKS_IPA, 0),
        mailbox::SCENARIO_STAGE1_PROBE => {
            let access = read_mailbox(mailbox::PROBE_ACCESS);
            // The exec probe branches to the probed word: it must hold the
            // code the machine writes there, or the guest would run garbage.
            // Only then is it read, and not when the slot is punched:
            // reading a hole in the shared RAM file would allocate the page
            // the daemon is to find as a hole (and fill from the launcher's
            // copy, which holds the code).
            let punched = read_mailbox(mailbox::PROBE_FLAGS) & mailbox::PROBE_DATA_PUNCHED != 0;
            if access == mailbox::PROBE_ACCESS_EXEC && !punched {
                let code = (PAGES_PA + (PROBE_IPA - PAGES_IPA)) as *const [u32; 2];
                // SAFETY: the two probed words are in the page memslot's
                // backing, RAM this image reads with the MMU off (aligned
                // to 8); the guest has not run yet.
                let words = unsafe { code.read_volatile() };
                if words != PROBE_EXEC_CODE {
                    println!("FAULTLINE-EL2 ERROR exec probe: the probed words are {:x?}, not the probe's code", words);
                    power_off()
                }
            }
            (BLOCKS_IPA + guest::stage1_probe_offset(), access as u64)
        }
        other => {
            println!("FAULTLINE-EL2 ERROR unknown scenario {}", other);
            power_off()
        }
    };
    let program = guest::program();
    // SAFETY: the block memslot's backing is the VM's and not yet mapped;
    // the guest's first instruction fetch faults it in through the daemon.
    unsafe { core::ptr::copy_nonoverlapping(program.as_ptr(), BLOCKS_PA as *mut u8, program.len()) };
    sysreg_write_stage2(vtcr, vttbr);
    println!("FAULTLINE-EL2 GUEST-ENTER ipa={:#x} bytes={}", entry, program.len());
    boot::enter_guest(entry, x0)
}

/// ID_AA64MMFR1_EL1: the CPU's memory-model features.
fn id_aa64mmfr1() -> u64 {
    let v: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe { core::arch::asm!("mrs {0}, id_aa64mmfr1_el1", out(reg) v) };
    v
}

/// A word of the mailbox page, which the launcher writes through the shared
/// memory file.
fn read_mailbox(offset: u64) -> u32 {
    // SAFETY: the mailbox page is RAM shared with the launcher, inside the
    // image's identity-mapped RAM; its words are only accessed atomically.
    unsafe { AtomicU32::from_ptr((MAILBOX_PA + offset) as *mut u32) }.load(Ordering::Acquire)
}

fn write_mailbox(offset: u64, value: u32) {
    // SAFETY: as `read_mailbox`.
    unsafe { AtomicU32::from_ptr((MAILBOX_PA + offset) as *mut u32) }.store(value, Ordering::Release)
}

/// A 64-bit word of the mailbox page (8-byte aligned `offset`).
fn mailbox_u64(offset: u64) -> &'static AtomicU64 {
    // SAFETY: as `read_mailbox`; the offsets used are 8-byte aligned.
    unsafe { AtomicU64::from_ptr((MAILBOX_PA + offset) as *mut u64) }
}

/// Hands `exit` to the launcher and waits for its answer, serving the
/// control ring meanwhile; returns the record's data word as the launcher
/// left it (a load's value), read once.
fn exit_to_launcher(s: &mut State, exit: &MmioExit) -> u64 {
    let seq = read_mailbox(mailbox::MMIO_SEQ).wrapping_add(1);
    for (i, word) in exit.encode().iter().enumerate() {
        mailbox_u64(mailbox::MMIO_EXIT + 8 * i as u64).store(*word, Ordering::Relaxed);
    }
    write_mailbox(mailbox::MMIO_SEQ, seq);
    println!(
        "FAULTLINE-EL2 EXIT ipa={:#x} write={} size={} data={:#x} seq={}",
        exit.ipa, exit.is_write, exit.len, exit.data, seq
    );
    while read_mailbox(mailbox::MMIO_DONE) != seq {
        serve_control(s);
        core::hint::spin_loop();
    }
    mailbox_u64(mailbox::MMIO_EXIT + 8).load(Ordering::Acquire)
}

fn state() -> &'static mut State {
    // SAFETY: written in el2_main before the guest first ran; only this
    // handler uses it afterwards, never nested (see `Once`).
    unsafe { (*STATE.0.get()).assume_init_mut() }
}

fn esr_far_hpfar_elr() -> (u64, u64, u64, u64) {
    let (esr, far, hpfar, elr): (u64, u64, u64, u64);
    // SAFETY: reads of the syndrome registers of the exception being handled.
    unsafe {
        core::arch::asm!(
            "mrs {0}, esr_el2", "mrs {1}, far_el2", "mrs {2}, hpfar_el2", "mrs {3}, elr_el2",
            out(reg) esr, out(reg) far, out(reg) hpfar, out(reg) elr,
        )
    };
    (esr, far, hpfar, elr)
}

fn skip_instruction(elr: u64) {
    // SAFETY: the guest resumes after the instruction EL2 completed.
    unsafe { core::arch::asm!("msr elr_el2, {0}", in(reg) elr + 4) };
}

fn power_off() -> ! {
    // SAFETY: PSCI SYSTEM_OFF through QEMU's SMC conduit; does not return.
    unsafe { core::arch::asm!("smc #0", in("x0") 0x8400_0008u64, options(noreturn)) }
}

/// Serves one stage-2 abort through the daemon; returns how it completed.
fn serve_fault(s: &mut State, esr: u64, far: u64, hpfar: u64) -> Completion {
    let rec = match s.vm.handle_abort(0, esr, far, hpfar, counter(), translate_el1_va) {
        // An access-flag fault the core resolved: the guest retries.
        Ok(Taken::Young) => {
            s.faults_out.count_access_flag_fault();
            return Completion::Resume;
        }
        Ok(Taken::Fault(r)) => r,
        Err(e) => {
            println!("FAULTLINE-EL2 ERROR core refused the fault: {:?}", e);
            power_off()
        }
    };
    s.faults += 1;
    let mut reposts = read_mailbox(mailbox::REPOST);
    push(&mut s.faults_out, &rec.encode());
    loop {
        // Control commands (write-protect for dirty logging, a new daemon's
        // LEAVES) are served while a vCPU waits: this PE has nothing else
        // to run.
        serve_control(s);
        // Re-attached to a new daemon: it may never have seen this fault.
        let now = read_mailbox(mailbox::REPOST);
        if now != reposts {
            reposts = now;
            if let Some(again) = s.vm.repost(0) {
                push(&mut s.faults_out, &again.encode());
            }
        }
        match s.commands.pop() {
            Ok(Some(cmd)) => {
                let executed = s.vm.execute(0, &cmd, &mut s.owners, &mut s.tlb);
                push(&mut s.faults_out, &executed.result.encode());
                if let Some(c) = executed.completion {
                    return c;
                }
            }
            Ok(None) => core::hint::spin_loop(),
            Err(e) => {
                println!("FAULTLINE-EL2 ERROR command ring: {:?}", e);
                power_off()
            }
        }
    }
}

/// Executes one control command, if one is waiting.
fn serve_control(s: &mut State) {
    let Ok(Some(cmd)) = s.control_in.pop() else { return };
    match s.vm.execute_control(CONTROL, &cmd, &mut s.owners, &mut s.tlb, &mut s.control_out) {
        Ok(executed) => push(&mut s.control_out, &executed.result.encode()),
        Err(e) => {
            println!("FAULTLINE-EL2 ERROR control ring: {:?}", e);
            power_off()
        }
    }
}

/// Before the guest's fault number `s.faults + 1`: if the launcher asked,
/// pause there, serving the control ring, until it says RESUME.
fn pause_if_asked(s: &mut State) {
    if read_mailbox(mailbox::PAUSE_AT_FAULT) as u64 != s.faults + 1 {
        return;
    }
    println!("FAULTLINE-EL2 PAUSED fault={}", s.faults + 1);
    while read_mailbox(mailbox::RESUME) != mailbox::RESUME_VALUE {
        serve_control(s);
        core::hint::spin_loop();
    }
    println!("FAULTLINE-EL2 RESUMED");
}

fn push(p: &mut Producer<'_>, r: &hyp_core::ring::Record) {
    loop {
        match p.push(r) {
            Ok(()) => return,
            Err(hyp_core::ring::RingError::Full) => core::hint::spin_loop(),
            Err(e) => {
                println!("FAULTLINE-EL2 ERROR ring: {:?}", e);
                power_off()
            }
        }
    }
}

/// Lower-EL synchronous exceptions: stage-2 aborts, HVCs, trapped SMCs.
#[no_mangle]
extern "C" fn el2_lower_sync(frame: &mut Frame) {
    let (esr, far, hpfar, elr) = esr_far_hpfar_elr();
    let s = state();
    match esr >> 26 {
        // Instruction / data abort from a lower EL.
        0x20 | 0x24 => {
            pause_if_asked(s);
            match serve_fault(s, esr, far, hpfar) {
                Completion::Resume => {}
                Completion::ExitToVmm => {
                    s.exits += 1;
                    let abort = Abort::decode(esr, far, hpfar);
                    let ipa = match abort.map(|a| a.ipa) {
                        Ok(FaultIpa::Valid(ipa)) => ipa.raw(),
                        _ => translate_el1_va(far).map_or(far, |ipa| ipa.raw()),
                    };
                    let regs: &[u64; 31] = frame.x[..31].try_into().expect("x0..x30");
                    let Some((abort, exit)) =
                        abort.ok().and_then(|a| Some((a, MmioExit::new(&a, Ipa::new(ipa), regs)?)))
                    else {
                        // Nothing to emulate with: KVM_RUN fails (ENOSYS) here,
                        // and so does this vCPU.
                        println!(
                            "FAULTLINE-EL2 NOSYNDROME ipa={:#x} write={} faults={} exits={}",
                            ipa,
                            esr >> 6 & 1,
                            s.faults,
                            s.exits
                        );
                        power_off()
                    };
                    let data = exit_to_launcher(s, &exit);
                    if exit.is_write == 0 {
                        if let Some((reg, value)) = abort.syndrome.and_then(|syn| syn.load_result(data)) {
                            frame.x[reg] = value;
                        }
                    }
                    skip_instruction(elr);
                }
                Completion::InjectAbort => {
                    // This guest has no exception vectors: the injection is the
                    // outcome, reported, and the run ends.
                    println!(
                        "FAULTLINE-EL2 INJECT far={:#x} esr={:#x} faults={} exits={}",
                        far, esr, s.faults, s.exits
                    );
                    power_off()
                }
            }
        }
        // HVC: #1 reports the checksum, #0 with x0 = SYSTEM_OFF powers off.
        0x16 => match esr & 0xffff {
            1 => println!("FAULTLINE-EL2 RESULT checksum={:#x} faults={} exits={}", frame.x[0], s.faults, s.exits),
            0 if frame.x[0] == 0x8400_0008 => {
                // Leaves of the page memslot with the access flag set, by
                // whoever set it (the MMU, or the core on a fault).
                let pages = PAGES_IPA..PAGES_IPA + PAGES_BYTES;
                let mut young_leaves = 0u64;
                let _ = s.vm.stage2().for_each_leaf(&mut |ipa, _, d| {
                    young_leaves += (pages.contains(&ipa.raw()) && d.access_flag()) as u64;
                });
                println!(
                    "FAULTLINE-EL2 POWEROFF faults={} exits={} young={} young_leaves={}",
                    s.faults,
                    s.exits,
                    s.vm.access_flag_faults(),
                    young_leaves
                );
                power_off()
            }
            other => println!("FAULTLINE-EL2 WARN unknown HVC #{} x0={:#x}", other, frame.x[0]),
        },
        ec => {
            println!(
                "FAULTLINE-EL2 ERROR unexpected exception EC={:#x} ESR={:#x} ELR={:#x} FAR={:#x}",
                ec, esr, elr, far
            );
            power_off()
        }
    }
}

/// Any exception the image does not handle.
#[no_mangle]
extern "C" fn el2_unexpected(vector: u64) -> ! {
    let (esr, far, _, elr) = esr_far_hpfar_elr();
    println!("FAULTLINE-EL2 ERROR unexpected vector {} ESR={:#x} ELR={:#x} FAR={:#x}", vector, esr, elr, far);
    power_off()
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("FAULTLINE-EL2 PANIC {}", info);
    power_off()
}
