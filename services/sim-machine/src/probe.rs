//! The stage-1 probe on the simulated machine: the EL2 image's probe guest
//! (hyp-core/image/src/guest.rs) as the sequence of translations it makes,
//! with the guest's stage 1 walked in software ([`crate::stage1`]) and every
//! stage-2 abort served by the daemon through hyp-core, exactly as the EL2
//! image serves them. Same memslots and IPAs as the image (the
//! `faultline-board` crate) and the same vocabulary (`faultline-probe`), so
//! the two machines' reports compare row by row.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faultline_attach::doorbell::{push_and_ring, wait_pop, WaitPolicy};
use faultline_attach::{send_message, AttachRequest, MemslotDesc, RegionDesc, RegionKind, Status, REGION_WRITABLE};
use hyp_core::addr::{Ipa, Pa};
use hyp_core::ownership::{Owner, PageOwnership, VmId};
use hyp_core::ring::{Consumer, Producer, RingKind, SharedRegion};
use hyp_core::stage2::{AccessFlagUpdate, Geometry, LinearMap};
use hyp_core::vm::{Completion, Taken, Vm};
use serde::Serialize;

use crate::mmu::{AccessKind, Stage2Regs, TlbGeneration};
use crate::phys::{PhysMemory, Window};
use crate::stage1::{Stage1Regs, WalkError, Walker};
use crate::syndrome::{encode_stage2, DataAccess};

use faultline_board::{BLOCKS_IPA, PAGES_IPA, PROBE_IPA, PROBE_MAGIC, PROBE_MMIO_IPA, PROBE_RET, PROBE_TCR, PT_IPA};
pub use faultline_probe::{
    data_contents, punch_to_contents, stage1_tables, Backing, Holes, IpaBits, MmioDevice, MmioDone, ProbeAccess,
    SlotSetup,
};
use hyp_core::abort::Abort;
use hyp_core::mmio::MmioExit;

use crate::layout::{RINGS_PA, RING_ENTRIES, TABLES_PA, TABLES_SIZE};
/// Backing of the three memslots, 2 MiB each: code (2 MiB pages), data, tables.
const CODE_PA: u64 = 0x5000_0000;
const DATA_PA: u64 = 0x5020_0000;
const PT_PA: u64 = 0x5040_0000;
const SLOT: u64 = 2 << 20;

/// One probe run.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// The daemon's attach socket.
    pub attach_socket: PathBuf,
    /// VM id.
    pub vm_id: u16,
    /// The access.
    pub access: ProbeAccess,
    /// The data memslot.
    pub data: SlotSetup,
    /// The page-table memslot.
    pub tables: SlotSetup,
    /// The probed page's leaf has AF clear (the walker sets it).
    pub af_clear: bool,
    /// Memslots whose backing is punched (filled from a contents file).
    pub holes: Holes,
    /// Page size of the data and page-table memslots' backing.
    pub backing: Backing,
    /// The guest's IPA space.
    pub ipa_bits: IpaBits,
    /// Stay attached after the guest stops until a line arrives on stdin
    /// (so the VM's state, its dirty logs among it, can be read).
    pub pause_before_detach: bool,
}

/// The run's outcome, in the shape of `faultline qemu`'s report.
#[derive(Debug, Default, Serialize)]
pub struct ProbeReport {
    /// The value the guest ends with; none if stopped.
    pub checksum: Option<u64>,
    /// Stage-2 faults served.
    pub faults: u64,
    /// MMIO exits the machine emulated, with their data.
    pub exits: Vec<MmioDone>,
    /// An exit without a valid syndrome `(IPA, write)`: the vCPU stops.
    pub no_syndrome_exit: Option<(u64, bool)>,
    /// The VA of an injected abort (the vCPU stops).
    pub injected: Option<u64>,
    /// The probed page's stage-1 leaf descriptor after the run: its access
    /// flag is the selftest's guest_check_pte_af.
    pub leaf: u64,
    /// The daemon's detach report.
    pub detach: [u64; 3],
}

/// Where an access the vCPU completed went.
#[derive(Clone, Copy)]
enum Target {
    /// Memory at this PA.
    Memory(u64),
    /// The machine's device, through an MMIO exit for this abort at this IPA.
    Mmio(Abort, u64),
}

/// Why the guest stopped before its result.
enum Stop {
    NoSyndrome(u64, bool),
    Injected(u64),
}

/// The vCPU's view: the core, its rings and the walker.
struct Vcpu<'a> {
    vm: Vm<LinearMap>,
    owners: PageOwnership<'static>,
    tlb: TlbGeneration,
    faults_out: Producer<'a>,
    commands: Consumer<'a>,
    phys: &'a PhysMemory,
    s2: Stage2Regs,
    s1: Stage1Regs,
    stop: AtomicBool,
    epoch: Instant,
    report: ProbeReport,
    device: MmioDevice,
}

impl Vcpu<'_> {
    fn walker(&self) -> Walker<'_> {
        Walker { s1: self.s1, s2: self.s2, mem: self.phys }
    }

    /// Sends one abort to the daemon through the core; returns how it ended.
    fn serve(&mut self, esr: u64, far: u64, hpfar: u64) -> anyhow::Result<Completion> {
        let s1 = Walker { s1: self.s1, s2: self.s2, mem: self.phys };
        let now = self.epoch.elapsed().as_nanos() as u64;
        let taken = self
            .vm
            .handle_abort(0, esr, far, hpfar, now, |va| s1.stage1(va, AccessKind::Read).ok().map(Ipa::new))
            .map_err(|e| anyhow::anyhow!("core refused the fault: {e:?}"))?;
        // An access-flag fault the core resolved: the access retries.
        let Taken::Fault(rec) = taken else { return Ok(Completion::Resume) };
        self.report.faults += 1;
        push_and_ring(&mut self.faults_out, &rec.encode()).map_err(|e| anyhow::anyhow!("fault ring: {e:?}"))?;
        let wait = WaitPolicy { spin_polls: 1000, sleep_slice: Duration::from_millis(50) };
        loop {
            let cmd = wait_pop(&mut self.commands, wait, &self.stop)
                .map_err(|e| anyhow::anyhow!("command ring: {e:?}"))?
                .context("stopped while waiting for the daemon")?;
            let executed = self.vm.execute(0, &cmd, &mut self.owners, &mut self.tlb);
            push_and_ring(&mut self.faults_out, &executed.result.encode())
                .map_err(|e| anyhow::anyhow!("fault ring: {e:?}"))?;
            if let Some(c) = executed.completion {
                return Ok(c);
            }
        }
    }

    /// Translates `va` for `access` (stage 1 and 2, or stage 1 only for
    /// AT), serving stage-2 aborts until it succeeds: the PA (for AT, the
    /// IPA), or the abort that exited to the machine's device.
    fn access(
        &mut self,
        va: u64,
        access: AccessKind,
        isv: bool,
        stage1_only: bool,
    ) -> anyhow::Result<Result<Target, Stop>> {
        let data = DataAccess { size: 8, register: 3, isv };
        // An access completes within a few faults (its walk's table pages,
        // its page, an access-flag update, a permission relaxed); more is a
        // daemon whose answers never let it through.
        const MOST_FAULTS: u32 = 8;
        for _ in 0..=MOST_FAULTS {
            let walked =
                if stage1_only { self.walker().stage1(va, access) } else { self.walker().translate(va, access) };
            let (fault, s1ptw, ipa) = match walked {
                Ok(out) => return Ok(Ok(Target::Memory(out))),
                Err(WalkError::Stage1(f)) => bail!("the guest's own stage 1 faulted: {f:?}"),
                Err(WalkError::Stage2 { fault, s1ptw, ipa }) => (fault, s1ptw, ipa),
            };
            let syn = encode_stage2(fault, s1ptw, ipa, access, va, data);
            match self.serve(syn.esr, syn.far, syn.hpfar)? {
                Completion::Resume => continue,
                Completion::InjectAbort => return Ok(Err(Stop::Injected(va))),
                Completion::ExitToVmm => {
                    let abort = Abort::decode(syn.esr, syn.far, syn.hpfar)
                        .map_err(|e| anyhow::anyhow!("the machine's own syndrome: {e:?}"))?;
                    if abort.syndrome.is_none() {
                        return Ok(Err(Stop::NoSyndrome(ipa, access == AccessKind::Write)));
                    }
                    return Ok(Ok(Target::Mmio(abort, ipa)));
                }
            }
        }
        bail!(
            "{access:?} at {va:#x} faulted {} times without completing: the daemon's answers never let it through",
            MOST_FAULTS + 1
        )
    }

    /// A load of the guest's 8-byte word at `target` into X3: memory, or
    /// the device's answer through an exit.
    fn load(&mut self, target: Target) -> anyhow::Result<u64> {
        match target {
            Target::Memory(pa) => self.phys.load(pa, 8).context("PA is not memory"),
            Target::Mmio(abort, ipa) => {
                let exit = MmioExit::new(&abort, Ipa::new(ipa), &[0; 31]).context("an exit without a syndrome")?;
                let data = self.device.access(exit.ipa, false, 0);
                self.report.exits.push((exit.ipa, false, exit.len, data));
                let syndrome = abort.syndrome.context("an exit without a syndrome")?;
                Ok(syndrome.load_result(data).map_or(0, |(_, value)| value))
            }
        }
    }

    /// A store of `value` (from X5, as the guest's STR) at `target`.
    fn store(&mut self, target: Target, value: u64) -> anyhow::Result<()> {
        match target {
            Target::Memory(pa) => self.phys.store(pa, 8, value).context("PA is not memory"),
            Target::Mmio(abort, ipa) => {
                // The guest's registers as the store left them: the value in
                // its transfer register (none for XZR).
                let mut x = [0; 31];
                if let Some(reg) = x.get_mut(usize::from(abort.syndrome.map_or(31, |s| s.register))) {
                    *reg = value;
                }
                let exit = MmioExit::new(&abort, Ipa::new(ipa), &x).context("an exit without a syndrome")?;
                let data = self.device.access(exit.ipa, true, exit.data);
                self.report.exits.push((exit.ipa, true, exit.len, data));
                Ok(())
            }
        }
    }

    /// The probe guest: fetch (MMU off), MMU on, fetch (walks the code's
    /// tables), then the access.
    fn run(&mut self, probe: ProbeAccess) -> anyhow::Result<Result<u64, Stop>> {
        macro_rules! step {
            ($e:expr) => {
                match $e? {
                    Ok(v) => v,
                    Err(stop) => return Ok(Err(stop)),
                }
            };
        }
        step!(self.access(BLOCKS_IPA, AccessKind::Fetch, false, false));
        self.s1 = Stage1Regs { mmu_on: true, ttbr0: PT_IPA, tcr: PROBE_TCR };
        step!(self.access(BLOCKS_IPA + 0x40, AccessKind::Fetch, false, false));
        let p = PROBE_IPA;
        // What the write probes store; each reports what memory then holds
        // (as the EL2 guest in hyp-core/image/src/guest.rs does).
        let written = p ^ PROBE_MAGIC;
        Ok(Ok(match probe {
            ProbeAccess::Read64 => {
                let at = step!(self.access(p, AccessKind::Read, true, false));
                self.load(at)?
            }
            // The word ^ the written-back base register (the probe address).
            ProbeAccess::LdPreidx => {
                let at = step!(self.access(p, AccessKind::Read, false, false));
                self.load(at)? ^ p
            }
            ProbeAccess::Write64 => {
                let at = step!(self.access(p, AccessKind::Write, true, false));
                self.store(at, written)?;
                let at = step!(self.access(p, AccessKind::Read, true, false));
                self.load(at)?
            }
            ProbeAccess::StPreidx => {
                let at = step!(self.access(p, AccessKind::Write, false, false));
                self.store(at, written)?;
                let at = step!(self.access(p, AccessKind::Read, true, false));
                self.load(at)? ^ p
            }
            // CAS expecting 0: the old value ^ the word read back after.
            ProbeAccess::Cas => {
                let at = step!(self.access(p, AccessKind::Read, false, false));
                let old = self.load(at)?;
                let at = step!(self.access(p, AccessKind::Write, false, false));
                if old == 0 {
                    self.store(at, written)?;
                }
                let at = step!(self.access(p, AccessKind::Read, true, false));
                old ^ self.load(at)?
            }
            // The OR of the block's eight words after zeroing it.
            ProbeAccess::DcZva => {
                let Target::Memory(pa) = step!(self.access(p & !63, AccessKind::Write, false, false)) else {
                    bail!("DC ZVA completed without memory");
                };
                for off in (0..64).step_by(8) {
                    self.store(Target::Memory(pa + off), 0)?;
                }
                let mut or = 0;
                for off in (0..64).step_by(8) {
                    let at = step!(self.access((p & !63) + off, AccessKind::Read, true, false));
                    or |= self.load(at)?;
                }
                or
            }
            ProbeAccess::At => {
                let Target::Memory(ipa) = step!(self.access(p, AccessKind::Read, false, true)) else {
                    bail!("AT completed without a translation");
                };
                // PAR_EL1 as QEMU's CPU reports it: attributes 0xff, NS,
                // inner shareable, the output page.
                0xff << 56 | (ipa & !0xfff) | 0xb80
            }
            // Runs the code at the probe word: what it leaves in X3.
            ProbeAccess::Exec => {
                let Target::Memory(pa) = step!(self.access(p, AccessKind::Fetch, false, false)) else {
                    bail!("a fetch that exited");
                };
                let word = |at: u64| self.phys.load(at, 4).context("PA is not memory").map(|w| w as u32);
                run_exec_probe([word(pa)?, word(pa + 4)?])?
            }
            // A store to the device, then a load of its answer.
            ProbeAccess::Mmio => {
                let at = step!(self.access(PROBE_MMIO_IPA, AccessKind::Write, true, false));
                self.store(at, written)?;
                let at = step!(self.access(PROBE_MMIO_IPA, AccessKind::Read, true, false));
                self.load(at)?
            }
        }))
    }
}

/// The exec probe's code, run as a CPU would: `MOVZ X3, #imm` (or
/// nothing) then `RET`; X3 is 0 before it. Anything else is code this
/// machine does not run (at EL2 it would be an undefined instruction).
fn run_exec_probe(code: [u32; 2]) -> anyhow::Result<u64> {
    const MOVZ_X3: (u32, u32) = (0xffe0_001f, 0xd280_0003);
    match code {
        [PROBE_RET, _] => Ok(0),
        [movz, PROBE_RET] if movz & MOVZ_X3.0 == MOVZ_X3.1 => Ok(u64::from(movz >> 5 & 0xffff)),
        other => anyhow::bail!("the exec probe's page holds {other:x?}, code this machine does not run"),
    }
}

/// Builds the machine, attaches, runs the probe, detaches.
pub fn run(config: &ProbeConfig) -> anyhow::Result<ProbeReport> {
    let mut phys = PhysMemory::default();
    let tables = phys.add(Window::create("tables", TABLES_PA, TABLES_SIZE, 4096)?);
    let ring_bytes = hyp_core::ring::RegionHeader::new(2, RING_ENTRIES).region_bytes().next_multiple_of(4096);
    let rings = phys.add(Window::create("rings", RINGS_PA, ring_bytes, 4096)?);
    let code = phys.add(Window::create("code", CODE_PA, SLOT, 2 << 20)?);
    // The data and table windows are plain memfds whatever the backing's
    // page size, as QEMU's RAM is for `faultline qemu`: the daemon maps a
    // 2 MiB-paged region with blocks (THP-like), filling what is a hole.
    let page = config.backing.page_size();
    let data = phys.add(Window::create("data", DATA_PA, SLOT, 4096)?);
    let pt = phys.add(Window::create("tables-s1", PT_PA, SLOT, 4096)?);
    for (ipa, desc) in stage1_tables(config.af_clear) {
        phys.window(pt).map.store(ipa - PT_IPA, 8, desc).expect("in range");
    }
    for (ipa, size, value) in data_contents(config.access, config.holes) {
        phys.window(data).map.store(ipa - PAGES_IPA, size, value).expect("in range");
    }
    let punch = |w, yes| if yes { punch_to_contents(&phys.window(w).memfd, 0, SLOT).map(Some) } else { Ok(None) };
    let contents = [(DATA_PA, punch(data, config.holes.data())?), (PT_PA, punch(pt, config.holes.tables())?)];
    let rings_w = phys.window(rings);
    // SAFETY: the window's mapping lives as long as `phys`, which outlives
    // every use of the region here; the daemon uses it only through the ABI.
    let shared = unsafe { SharedRegion::create(rings_w.map.base(), rings_w.size, 2, RING_ENTRIES) }
        .map_err(|e| anyhow::anyhow!("ring region: {e:?}"))?;
    let tables_w = phys.window(tables);
    // SAFETY: table memory is this machine's own mapping, alive as long as
    // `phys`, accessed only atomically (the core and the software walkers).
    let table_mem = unsafe { LinearMap::new(Pa::new(TABLES_PA), TABLES_SIZE, tables_w.map.base()) };
    let storage: &'static mut [u16] =
        Box::leak(vec![0u16; ((PT_PA + SLOT - TABLES_PA) / 4096) as usize].into_boxed_slice());
    let mut owners = PageOwnership::new(Pa::new(TABLES_PA), storage);
    let id = VmId::new(config.vm_id).context("vm id")?;
    for pa in [CODE_PA, DATA_PA, PT_PA] {
        owners.transfer(Pa::new(pa), SLOT, Owner::Host, Owner::Vm(id)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let geometry = match config.ipa_bits {
        IpaBits::Bits40 => Geometry::kvm_default(),
        IpaBits::Bits48 => Geometry::new(48, 48).map_err(|e| anyhow::anyhow!("{e:?}"))?,
    };
    let vm =
        Vm::new(id, geometry, Pa::new(TABLES_PA), 2, table_mem, &mut owners).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let s2 = Stage2Regs { vtcr: geometry.vtcr(AccessFlagUpdate::Fault), vttbr: vm.stage2().vttbr() };

    let conn = faultline_attach::connect(&config.attach_socket)
        .with_context(|| format!("connecting to the daemon at {}", config.attach_socket.display()))?;
    let guest = |fd_index, pa, page_size| RegionDesc {
        kind: RegionKind::Guest,
        flags: REGION_WRITABLE,
        pa_base: pa,
        size: SLOT,
        page_size,
        fd_index,
        fd_offset: 0,
    };
    let slot = |gpa, region, flags| MemslotDesc { gpa, size: SLOT, region, flags, region_offset: 0 };
    let mut request = AttachRequest {
        vm_id: config.vm_id,
        nr_vcpus: 1,
        ipa_bits: geometry.ipa_bits(),
        flags: 0,
        regions: vec![
            guest(0, CODE_PA, 2 << 20),
            guest(1, DATA_PA, page),
            guest(2, PT_PA, page),
            crate::machine::rings_region(ring_bytes, 3),
            crate::machine::table_pool_region(),
        ],
        memslots: vec![
            slot(BLOCKS_IPA, 0, 0),
            slot(PAGES_IPA, 1, config.data.flags()),
            slot(PT_IPA, 2, config.tables.flags()),
        ],
    };
    let mut fds = vec![phys.window(code).fd(), phys.window(data).fd(), phys.window(pt).fd(), phys.window(rings).fd()];
    for (pa_base, file) in contents.iter().filter_map(|(pa, f)| Some((*pa, f.as_ref()?))) {
        request.regions.push(RegionDesc::contents(pa_base, SLOT, fds.len() as u32));
        fds.push(file.as_fd());
    }
    send_message(conn.as_fd(), &request.encode(), &fds).context("sending the attach request")?;
    let reply = faultline_attach::session::read_reply(&conn).context("reading the attach reply")?;
    if reply.status != Status::Ok {
        bail!("daemon refused the attach: {:?}: {}", reply.status, reply.message);
    }
    let ring = |kind| shared.ring(0, kind).context("ring");
    let mut vcpu = Vcpu {
        vm,
        owners,
        tlb: TlbGeneration::default(),
        faults_out: Producer::attach(ring(RingKind::Fault)?).map_err(|e| anyhow::anyhow!("{e:?}"))?,
        commands: Consumer::attach(ring(RingKind::Command)?).map_err(|e| anyhow::anyhow!("{e:?}"))?,
        phys: &phys,
        s2,
        s1: Stage1Regs::default(),
        stop: AtomicBool::new(false),
        epoch: Instant::now(),
        report: ProbeReport::default(),
        device: MmioDevice::default(),
    };
    match vcpu.run(config.access)? {
        Ok(value) => vcpu.report.checksum = Some(value),
        Err(Stop::NoSyndrome(ipa, write)) => vcpu.report.no_syndrome_exit = Some((ipa, write)),
        Err(Stop::Injected(va)) => vcpu.report.injected = Some(va),
    }
    if config.pause_before_detach {
        eprintln!("sim-machine: paused before detach");
        let _ = std::io::stdin().read_line(&mut String::new());
    }
    let (leaf, _) = stage1_tables(config.af_clear)[3];
    let leaf = phys.window(pt).map.load(leaf - PT_IPA, 8).context("leaf")?;
    send_message(conn.as_fd(), &faultline_attach::encode_detach(), &[]).context("sending detach")?;
    let detach = faultline_attach::session::read_reply(&conn).context("reading the detach reply")?;
    let mut report = vcpu.report;
    report.leaf = leaf;
    report.detach = detach.values;
    Ok(report)
}
