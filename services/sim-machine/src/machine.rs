//! The machine: creates memory and rings, hosts hyp-core, attaches to the
//! daemon, runs the vCPUs, detaches and reports.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faultline_attach::doorbell::{push_and_ring, WaitPolicy};
use faultline_attach::wait::{vcpu_waits, DaemonPlace, VcpuWaits, WaitCounts, WaitSplit, Waiter};
use faultline_attach::{
    AttachRequest, DirtyLogLayout, MemslotDesc, RegionDesc, RegionKind, MEMSLOT_READ_ONLY, NO_FD, REGION_WRITABLE,
};
use hyp_core::addr::{Ipa, Pa};
use hyp_core::ownership::{Owner, PageOwnership, VmId};
use hyp_core::ring::{Consumer, Producer, Record, RingError, RingKind, SharedRegion};
use hyp_core::stage2::{AccessFlagUpdate, Geometry, LinearMap};
use hyp_core::vm::{Completion, Taken, Vm};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::layout::{
    rom_byte, Layout, RAM_PA, RINGS_PA, RING_ENTRIES, ROM_GPA, ROM_PA, ROOT_RESERVE, TABLES_PA, TABLES_SIZE,
};
use crate::mmu::{AccessKind, Stage2Regs, Tlb, TlbGeneration};
use crate::phys::{PhysMemory, Window};
use crate::syndrome::{self, DataAccess};
use crate::workload::{digest_words, value_for, OpKind, Workload};
use faultline_attach::session::{Session, Stalls};

/// How to run the machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// The daemon's attach socket.
    pub attach_socket: PathBuf,
    /// VM id (1..=255).
    pub vm_id: u16,
    /// Memory layout.
    pub layout: Layout,
    /// Ring polls before sleeping on the doorbell.
    pub spin_polls: u32,
    /// Report every fault's round-trip time, not just percentiles.
    pub keep_latencies: bool,
    /// Dirty logging on the RAM memslot.
    pub dirty_log: bool,
    /// How long to wait for a daemon that went away to come back.
    pub reattach_deadline: Duration,
    /// Repeat each phase until a line arrives on stdin (instead of running
    /// it once and, at a pause, waiting for the line), so a monitor sees a
    /// running workload for as long as it needs, however fast the host.
    pub loop_phases: bool,
    /// After the workload, stay attached until a line arrives on stdin
    /// (what the daemon holds of the VM can be read then); `run_ms` ends
    /// before the wait.
    pub hold_before_detach: bool,
    /// Once attached, wait for a line on stdin before running the
    /// workload (`run_ms` starts after the wait).
    pub hold_before_run: bool,
    /// Let the MMU set stage-2 access flags itself (FEAT_HAFDBS,
    /// `VTCR_EL2.HA`), as a machine whose CPU has it may tell its core:
    /// an aged page touched again takes no access-flag fault.
    pub hardware_access_flag: bool,
}

/// One exit to the VMM as the machine saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ExitRecord {
    /// vCPU.
    pub vcpu: u32,
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u8,
    /// A write.
    pub write: bool,
    /// The syndrome was valid (an MMIO exit rather than a no-syndrome exit).
    pub isv: bool,
}

/// What the daemon reported at detach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DetachReport {
    /// Pages whose mapping pins were released.
    pub pages_released: u64,
    /// Pins still held after teardown (must be 0).
    pub pins_remaining: u64,
    /// Faults the daemon served.
    pub faults_served: u64,
}

/// The run's results, printed as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// VM id.
    pub vm_id: u16,
    /// vCPUs.
    pub vcpus: u32,
    /// Accesses executed.
    pub accesses: u64,
    /// Stage-2 faults the core forwarded.
    pub faults: u64,
    /// Access-flag faults the core resolved itself (pages the daemon aged
    /// and the guest touched again), never forwarded.
    pub access_flag_faults: u64,
    /// Exits to the VMM.
    pub exits: Vec<ExitRecord>,
    /// Aborts injected into the guest.
    pub injected: u64,
    /// Digest of RAM at the end.
    pub ram_digest: u64,
    /// Digest of ROM at the end.
    pub rom_digest: u64,
    /// Fault round trip (core to daemon to core), median ns.
    pub fault_p50_ns: u64,
    /// Fault round trip, 99th percentile ns.
    pub fault_p99_ns: u64,
    /// Software TLB hits and misses.
    pub tlb_hits: u64,
    /// TLB misses (walks).
    pub tlb_misses: u64,
    /// Wall time of the workload, ms.
    pub run_ms: u64,
    /// Page faults this process took on the host during the workload: the
    /// simulator's own cost (its memory, and guest pages first touched
    /// after the daemon allocated them), not the guest's.
    pub host_page_faults: u64,
    /// RAM is hugetlb-backed.
    pub ram_hugetlb: bool,
    /// The MMU set access flags itself (`--hardware-access-flag`).
    pub hardware_access_flag: bool,
    /// The daemon's detach report.
    pub detach: Option<DetachReport>,
    /// Times the daemon went away until a daemon took the VM back.
    pub stalls: Stalls,
    /// How the vCPUs waited for the daemon's answers: spun, slept, cut
    /// a spin short because another thread wanted the CPU, or passed the
    /// CPU to the other vCPUs and found the answer on coming back.
    pub waits: WaitSplit,
    /// Times a waiting vCPU passes the CPU to the others before it sleeps
    /// (0 unless the vCPUs outnumber this process's CPUs and the daemon
    /// ran on none of them at the attach).
    pub wait_passes: u32,
    /// What the core's stage-2 tables held at detach: leaves, and the
    /// backing pages they cover (what the daemon's pins must count).
    pub core_leaves: u64,
    /// Backing pages under those leaves (4 KiB, or 2 MiB on huge pages).
    pub core_backing_pages: u64,
    /// Every RAM fault's round trip in ns, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latencies_ns: Option<Vec<u64>>,
    /// The longest any vCPU waited on one fault, per phase of a trace (ns):
    /// a phase run across a daemon's restart or takeover shows its stall as
    /// the guest saw it.
    pub phase_longest_fault_ns: Vec<u64>,
    /// That fault, per phase: when it was posted and where (to line it up
    /// with the daemon's events).
    pub phase_slowest_fault: Vec<Option<SlowestFault>>,
}

/// The fault a vCPU waited on longest.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct SlowestFault {
    /// Its round trip (ns).
    pub ns: u64,
    /// When it was taken, ns since the Unix epoch.
    pub posted_unix_ns: u64,
    /// When its record was on the fault ring, ns since the Unix epoch.
    pub pushed_unix_ns: u64,
    /// Its guest address.
    pub gpa: u64,
    /// The vCPU.
    pub vcpu: u32,
}

struct CoreState {
    vm: Vm<LinearMap>,
    owners: PageOwnership<'static>,
    tlb: TlbGeneration,
}

struct VcpuResult {
    accesses: u64,
    faults: u64,
    access_flag_faults: u64,
    injected: u64,
    exits: Vec<ExitRecord>,
    latencies: Vec<u64>,
    ram_latencies: Vec<u64>,
    tlb_hits: u64,
    tlb_misses: u64,
    slowest: Option<SlowestFault>,
}

/// The stage-2 geometry for a guest whose IPAs end at `ipa_end` and whose
/// memory's PAs end at `pa_end`: KVM's default 40-bit IPA space, or as few
/// bits more as the guest needs, with as few levels as concatenated roots
/// allow (as KVM sizes a VM's stage 2 to its IPA size): up to 43 bits
/// still start at level 1 (a 1 TiB guest above 1 GiB takes 41 bits, four
/// level-1 roots), and only beyond that at level 0.
fn geometry_for(ipa_end: u64, pa_end: u64) -> anyhow::Result<Geometry> {
    let bits = |end: u64| 64 - end.saturating_sub(1).leading_zeros();
    let ipa_bits = bits(ipa_end).max(40);
    anyhow::ensure!(ipa_bits <= 48, "the guest's IPAs end at {ipa_end:#x}, beyond a 48-bit IPA space");
    // PA sizes come in the steps ID_AA64MMFR0_EL1.PARange names.
    let pa_bits = [40, 42, 44, 48]
        .into_iter()
        .find(|&b| b >= ipa_bits.max(bits(pa_end)))
        .ok_or_else(|| anyhow::anyhow!("the guest's PAs end at {pa_end:#x}, beyond 48 bits"))?;
    Geometry::new(ipa_bits as u8, pa_bits as u8).map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Builds the machine, attaches, runs `workload`, detaches.
pub fn run(config: &MachineConfig, workload: &Workload) -> anyhow::Result<Summary> {
    let layout = config.layout;
    let n = layout.nr_vcpus;
    if workload.per_vcpu.len() != n as usize {
        bail!("workload has {} vCPUs, machine {}", workload.per_vcpu.len(), n);
    }
    // Physical memory.
    let mut phys = PhysMemory::default();
    let tables = phys.add(Window::create("tables", TABLES_PA, TABLES_SIZE, 4096)?);
    let region = hyp_core::ring::RegionHeader::new(n + 1, RING_ENTRIES);
    let rings_size = region.region_bytes().next_multiple_of(4096);
    let rings = phys.add(Window::create("rings", RINGS_PA, rings_size, 4096)?);
    let rom = phys.add(Window::create("rom", ROM_PA, layout.rom_size, 4096)?);
    let ram = phys.add(Window::create("ram", RAM_PA, layout.ram_size, layout.ram_page_size)?);
    for off in (0..layout.rom_size).step_by(8) {
        let word = u64::from_le_bytes(std::array::from_fn(|i| rom_byte(off + i as u64)));
        phys.window(rom).map.store(off, 8, word).expect("in range");
    }
    // The rings.
    let rings_w = phys.window(rings);
    // SAFETY: the window's mapping lives as long as `phys`, which outlives
    // every use of the region in this function; the daemon accesses it only
    // atomically through the same ABI.
    let shared = unsafe { SharedRegion::create(rings_w.map.base(), rings_w.size, n + 1, RING_ENTRIES) }
        .map_err(|e| anyhow::anyhow!("ring region: {e:?}"))?;
    // The core: table memory, page ownership, the VM.
    let tables_w = phys.window(tables);
    // SAFETY: table memory is this machine's own mapping, alive as long as
    // `phys` (longer than the core), and only accessed atomically (the core's
    // tables and this machine's software MMU).
    let table_mem = unsafe { LinearMap::new(Pa::new(TABLES_PA), TABLES_SIZE, tables_w.map.base()) };
    let tracked = (RAM_PA + layout.ram_size - TABLES_PA) / 4096;
    let storage: &'static mut [u16] = Box::leak(vec![0u16; tracked as usize].into_boxed_slice());
    let mut owners = PageOwnership::new(Pa::new(TABLES_PA), storage);
    let id = VmId::new(config.vm_id).context("vm id")?;
    owners
        .transfer(Pa::new(RAM_PA), layout.ram_size, Owner::Host, Owner::Vm(id))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    owners
        .transfer(Pa::new(ROM_PA), layout.rom_size, Owner::Host, Owner::Vm(id))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let geometry = geometry_for(layout.ram_gpa + layout.ram_size, RAM_PA + layout.ram_size)?;
    let vm = Vm::new(id, geometry, Pa::new(TABLES_PA), n + 1, table_mem, &mut owners)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let af = if config.hardware_access_flag { AccessFlagUpdate::Hardware } else { AccessFlagUpdate::Fault };
    let regs = Stage2Regs { vtcr: geometry.vtcr(af), vttbr: vm.stage2().vttbr() };
    let tlb_gen = TlbGeneration::new(n);
    let core = Mutex::new(CoreState { vm, owners, tlb: tlb_gen.clone() });

    // Attach.
    let request = AttachRequest {
        vm_id: config.vm_id,
        nr_vcpus: n as u16,
        ipa_bits: geometry.ipa_bits(),
        flags: 0,
        regions: vec![
            RegionDesc {
                kind: RegionKind::Guest,
                flags: REGION_WRITABLE,
                pa_base: RAM_PA,
                size: layout.ram_size,
                page_size: layout.ram_page_size,
                fd_index: 0,
                fd_offset: 0,
            },
            RegionDesc {
                kind: RegionKind::Guest,
                flags: 0,
                pa_base: ROM_PA,
                size: layout.rom_size,
                page_size: 4096,
                fd_index: 1,
                fd_offset: 0,
            },
            rings_region(rings_size, 2),
            table_pool_region(),
        ],
        memslots: vec![
            MemslotDesc {
                gpa: layout.ram_gpa,
                size: layout.ram_size,
                region: 0,
                flags: if config.dirty_log { faultline_attach::MEMSLOT_DIRTY_LOG } else { 0 },
                region_offset: 0,
            },
            MemslotDesc { gpa: ROM_GPA, size: layout.rom_size, region: 1, flags: MEMSLOT_READ_ONLY, region_offset: 0 },
        ],
    };
    // The dirty log lives in the machine's memory, so it outlives the daemon.
    let dirty_log = DirtyLogLayout::of(&request.memslots);
    let dirty_mem = match config.dirty_log {
        true => Some(Window::create("dirty-log", 0, dirty_log.bytes, 4096)?),
        false => None,
    };
    let mut request = request;
    let mut fds = vec![phys.window(ram).fd(), phys.window(rom).fd(), phys.window(rings).fd()];
    if let Some(w) = &dirty_mem {
        request.regions.push(RegionDesc::dirty_log(w.size, fds.len() as u32));
        fds.push(w.fd());
    }
    let session = Session::attach(&config.attach_socket, request, fds, config.reattach_deadline)?;
    info!(vm = config.vm_id, vcpus = n, "attached");
    for w in [phys.window(ram), phys.window(rom)] {
        // What the daemon populated at the attach, and what the machine
        // wrote before it, are the machine's memory from the start.
        match w.map_data() {
            Ok(bytes) => debug!(window = w.name, bytes, "mapped the pages that hold data"),
            Err(e) => {
                warn!(window = w.name, cause = %e, "mapping the pages that hold data failed; they fault on first access")
            }
        }
    }

    // Run.
    let stop = AtomicBool::new(false);
    // A vCPU is kicked when it must stop or post its outstanding fault
    // again (a new daemon took the VM).
    let kicks: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
    // As the daemon stood at the attach (one that takes the VM over later,
    // placed or weighted otherwise, does not change it).
    let place = DaemonPlace::of(session.daemon_pid());
    let VcpuWaits { spin_polls, passes } = vcpu_waits(config.spin_polls, n, place);
    if spin_polls < config.spin_polls {
        info!(vcpus = n, daemon = ?place, "the vCPUs outnumber the CPUs left to them: their waits do not spin");
    }
    if passes > 0 {
        info!(vcpus = n, daemon = ?place, "the daemon keeps its turns: a waiting vCPU lets the others run before it sleeps");
    }
    let wait = WaitPolicy { spin_polls, sleep_slice: Duration::from_millis(500) };
    let epoch = Instant::now();
    let waits = WaitCounts::default();
    let lines = config.loop_phases.then(stdin_lines);
    let env = VcpuEnv {
        core: &core,
        shared: &shared,
        phys: &phys,
        regs,
        tlb_gen: tlb_gen.clone(),
        wait,
        passes,
        waits: &waits,
        stop: &stop,
        kicks: &kicks,
        epoch,
        layout,
        lines: lines.as_deref(),
    };
    let gate = ControlGate::default();
    let results = std::thread::scope(|s| {
        let control = {
            let (core, shared, gate) = (&core, &shared, &gate);
            s.spawn(move || serve_control(core, shared, n, wait, gate))
        };
        let supervisor = {
            let (session, stop, kicks, shared) = (&session, &stop, &kicks, &shared);
            s.spawn(move || {
                // Settled once every command ring (vCPUs' and control) is
                // empty: the vCPUs waiting in a fault execute theirs.
                let supervised = session.supervise(stop, || shared.commands_drained(), || kick_all(kicks, shared, n));
                if supervised.is_err() {
                    stop_all(stop, kicks, shared, n);
                }
                supervised
            })
        };
        if config.hold_before_run && !stop.load(Ordering::Acquire) {
            // Attached (its daemon supervised), the vCPUs not yet started.
            hold(format_args!("holding before the run"));
        }
        let started = Instant::now();
        let host_faults_before = host_page_faults();
        let mut results = Vec::new();
        let mut phase_longest = Vec::new();
        for phase in 0..workload.phases() {
            let handles: Vec<_> = (0..n)
                .map(|v| {
                    let (env, ops) = (&env, workload.phase(phase, v as usize));
                    s.spawn(move || run_vcpu(v, phase, ops, env))
                })
                .collect();
            let joined: Vec<_> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("vCPU panicked"))))
                .collect();
            let slowest = joined.iter().flatten().filter_map(|r| r.slowest).max_by_key(|f| f.ns);
            phase_longest.push((slowest.map_or(0, |f| f.ns), slowest));
            results.extend(joined);
            if phase < workload.pauses.len() && !stop.load(Ordering::Acquire) && !config.loop_phases {
                // Attached and idle until told to go on (or stdin closes).
                hold(format_args!("paused after phase {phase}"));
            }
        }
        let run_ms = started.elapsed().as_millis() as u64;
        let host_faults = host_page_faults().saturating_sub(host_faults_before);
        if config.hold_before_detach && !stop.load(Ordering::Acquire) {
            hold(format_args!("holding before detach"));
        }
        stop_all(&stop, &kicks, &shared, n);
        let supervised = supervisor.join().unwrap_or(Ok(()));
        // The core's tables stop changing: the daemon's commands on the
        // control ring (a reclaim under way) wait, unexecuted, so its
        // records at the detach are what the tables hold.
        gate.halt(&shared, n);
        // The detach and the daemon's report, from a daemon that took the
        // VM back if its own went away: that one rebuilds its records over
        // the control ring, served again for it (the dead daemon's commands
        // still on the ring first).
        let detached = supervised
            .map_err(anyhow::Error::from)
            .and_then(|()| session.detach_with(|| gate.resume()).context("detaching"));
        gate.end(&shared, n);
        let _ = control.join();
        (results, detached, phase_longest, run_ms, host_faults)
    });
    let (results, detached, phase_longest, run_ms, host_page_faults) = results;
    let (phase_longest_fault_ns, phase_slowest_fault) = phase_longest.into_iter().unzip();
    let reply = detached?;
    // What the daemon's records must agree with: the core's tables, as
    // they were at the detach.
    let tables = CoreTables::walk(&core.lock().unwrap_or_else(|e| e.into_inner()), &layout)?;
    let mut summary = Summary {
        vm_id: config.vm_id,
        vcpus: n,
        accesses: 0,
        faults: 0,
        access_flag_faults: 0,
        exits: Vec::new(),
        injected: 0,
        ram_digest: 0,
        rom_digest: 0,
        fault_p50_ns: 0,
        fault_p99_ns: 0,
        tlb_hits: 0,
        tlb_misses: 0,
        run_ms,
        host_page_faults,
        ram_hugetlb: phys.window(ram).hugetlb,
        hardware_access_flag: regs.hardware_access_flag(),
        detach: None,
        stalls: Stalls::default(),
        waits: waits.read(),
        wait_passes: passes,
        core_leaves: tables.leaves,
        core_backing_pages: tables.backing_pages,
        latencies_ns: None,
        phase_longest_fault_ns,
        phase_slowest_fault,
    };
    let mut latencies = Vec::new();
    let mut ram_latencies = Vec::new();
    for r in results {
        let r = r?;
        summary.accesses += r.accesses;
        summary.faults += r.faults;
        summary.injected += r.injected;
        summary.exits.extend(r.exits);
        summary.tlb_hits += r.tlb_hits;
        summary.tlb_misses += r.tlb_misses;
        summary.access_flag_faults += r.access_flag_faults;
        latencies.extend(r.latencies);
        ram_latencies.extend(r.ram_latencies);
    }
    latencies.sort_unstable();
    if !latencies.is_empty() {
        summary.fault_p50_ns = latencies[latencies.len() / 2];
        summary.fault_p99_ns = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    }
    if config.keep_latencies {
        summary.latencies_ns = Some(ram_latencies);
    }
    summary.stalls = session.stalls();
    summary.detach = Some(DetachReport {
        pages_released: reply.values[0],
        pins_remaining: reply.values[1],
        faults_served: reply.values[2],
    });
    // Data segments only: a sparse guest is digested without reading (and
    // so allocating) its holes.
    let word_digest = |w: &Window| {
        digest_words(
            w.data_ranges()
                .into_iter()
                .flat_map(|(start, end)| (start..end).step_by(8))
                .map(|off| (off, w.map.load(off, 8).expect("in range"))),
        )
    };
    summary.ram_digest = word_digest(phys.window(ram));
    summary.rom_digest = word_digest(phys.window(rom));
    drop(core);
    Ok(summary)
}

/// The ring region's description: its window at [`RINGS_PA`], sent as fd
/// number `fd_index`.
pub(crate) fn rings_region(size: u64, fd_index: u32) -> RegionDesc {
    RegionDesc { kind: RegionKind::Rings, flags: 0, pa_base: RINGS_PA, size, page_size: 4096, fd_index, fd_offset: 0 }
}

/// The table pool: table memory after the root, handed back to the core as
/// memcache pages (no fd: the daemon never maps it).
pub(crate) fn table_pool_region() -> RegionDesc {
    RegionDesc {
        kind: RegionKind::TablePool,
        flags: 0,
        pa_base: TABLES_PA + ROOT_RESERVE,
        size: TABLES_SIZE - ROOT_RESERVE,
        page_size: 4096,
        fd_index: NO_FD,
        fd_offset: 0,
    }
}

/// What the core's stage-2 tables map: what the daemon's records must
/// agree with.
struct CoreTables {
    leaves: u64,
    /// Backing pages (of the RAM's page size in RAM, 4 KiB elsewhere).
    backing_pages: u64,
}

impl CoreTables {
    fn walk(core: &CoreState, layout: &Layout) -> anyhow::Result<Self> {
        let mut tables = Self { leaves: 0, backing_pages: 0 };
        let ram = RAM_PA..RAM_PA + layout.ram_size;
        let mut count = |_: Ipa, level: u8, d: hyp_core::stage2::Descriptor| {
            let bytes = hyp_core::stage2::MapSize::from_level(level).map_or(4096, |s| s.bytes());
            let page = if ram.contains(&d.output().raw()) { layout.ram_page_size } else { 4096 };
            tables.leaves += 1;
            tables.backing_pages += bytes.div_ceil(page);
        };
        core.vm.stage2().for_each_leaf(&mut count).map_err(|e| anyhow::anyhow!("walking the core's tables: {e:?}"))?;
        Ok(tables)
    }
}

/// Sets `stop` and wakes every thread sleeping on a command ring.
fn stop_all(stop: &AtomicBool, kicks: &[AtomicBool], shared: &SharedRegion<'_>, n: u32) {
    stop.store(true, Ordering::Release);
    kick_all(kicks, shared, n);
}

/// Kicks every vCPU out of its wait for a command (it posts its outstanding
/// fault again, or stops); wakes the control thread too.
fn kick_all(kicks: &[AtomicBool], shared: &SharedRegion<'_>, n: u32) {
    for k in kicks {
        k.store(true, Ordering::Release);
    }
    for ring in 0..=n {
        if let Some(view) = shared.ring(ring, RingKind::Command) {
            faultline_attach::doorbell::wake(&view);
        }
    }
}

/// When the control thread executes the control ring's commands: the
/// core's tables are walked, for the daemon's records to be checked
/// against, only while no daemon can change them.
#[derive(Default)]
struct ControlGate {
    /// Set: no command is taken off the ring (those on it wait).
    halt: AtomicBool,
    /// Set by the control thread once it has stopped taking commands
    /// (halted, or gone).
    parked: AtomicBool,
    /// Set: the control thread ends.
    end: AtomicBool,
}

impl ControlGate {
    /// Halts the control thread and waits until it executes nothing more.
    fn halt(&self, shared: &SharedRegion<'_>, n: u32) {
        self.halt.store(true, Ordering::Release);
        if let Some(view) = shared.ring(n, RingKind::Command) {
            faultline_attach::doorbell::wake(&view);
        }
        while !self.parked.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Lets a halted control thread take commands again.
    fn resume(&self) {
        self.parked.store(false, Ordering::Release);
        self.halt.store(false, Ordering::Release);
    }

    /// Ends the control thread (halting it first).
    fn end(&self, shared: &SharedRegion<'_>, n: u32) {
        self.end.store(true, Ordering::Release);
        self.halt(shared, n);
    }
}

/// Serves the control ring pair (commands not tied to a fault) as `gate`
/// allows.
fn serve_control(core: &Mutex<CoreState>, shared: &SharedRegion<'_>, n: u32, wait: WaitPolicy, gate: &ControlGate) {
    /// Marks the thread parked however it leaves.
    struct Parked<'g>(&'g AtomicBool);
    impl Drop for Parked<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let _parked = Parked(&gate.parked);
    let (Some(cmd_view), Some(res_view)) = (shared.ring(n, RingKind::Command), shared.ring(n, RingKind::Fault)) else {
        return;
    };
    let (Ok(mut commands), Ok(mut results)) = (Consumer::attach(cmd_view), Producer::attach(res_view)) else {
        return;
    };
    // Waiting adapts as the vCPUs' does: a monitor's commands every few ms
    // must not keep a thread spinning against the vCPUs.
    let counts = WaitCounts::default();
    let mut waiter = Waiter::new(wait, &counts);
    loop {
        // Halted, it finishes the command it took, then parks.
        while !gate.halt.load(Ordering::Acquire) {
            let Ok(Some(cmd)) = waiter.pop(&mut commands, &gate.halt) else { break };
            let executed = {
                let mut c = core.lock().unwrap_or_else(|e| e.into_inner());
                let CoreState { vm, owners, tlb } = &mut *c;
                vm.execute_control(n, &cmd, owners, tlb, &mut results)
            };
            let Ok(executed) = executed else { return };
            // A daemon that stopped reading results (gone) is not waited
            // for once halted: the thread ends, parked.
            if push(&mut results, &executed.result.encode(), &gate.halt).is_err() {
                return;
            }
        }
        gate.parked.store(true, Ordering::Release);
        while gate.halt.load(Ordering::Acquire) && !gate.end.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(200));
        }
        if gate.end.load(Ordering::Acquire) {
            return;
        }
    }
}

fn push_result(p: &mut Producer<'_>, r: &Record, ring: bool, stop: &AtomicBool) -> Result<(), RingError> {
    if ring {
        return push(p, r, stop);
    }
    loop {
        match p.push(r) {
            Err(RingError::Full) if !stop.load(Ordering::Acquire) => std::thread::yield_now(),
            other => return other,
        }
    }
}

fn push(p: &mut Producer<'_>, r: &Record, stop: &AtomicBool) -> Result<(), RingError> {
    loop {
        match push_and_ring(p, r) {
            Err(RingError::Full) if !stop.load(Ordering::Acquire) => std::thread::yield_now(),
            other => return other,
        }
    }
}

/// What every vCPU thread shares.
struct VcpuEnv<'a> {
    core: &'a Mutex<CoreState>,
    shared: &'a SharedRegion<'a>,
    phys: &'a PhysMemory,
    regs: Stage2Regs,
    tlb_gen: TlbGeneration,
    wait: WaitPolicy,
    /// Passes of the CPU to the other vCPUs before a wait sleeps.
    passes: u32,
    waits: &'a WaitCounts,
    stop: &'a AtomicBool,
    kicks: &'a [AtomicBool],
    epoch: Instant,
    layout: Layout,
    /// With `--loop-phases`: lines read from stdin (phase k repeats while
    /// fewer than k + 1 have arrived).
    lines: Option<&'a AtomicU64>,
}

/// Counts lines arriving on stdin, on a thread of its own (it may block
/// past the machine's end); at end of file the count jumps to the maximum.
fn stdin_lines() -> std::sync::Arc<AtomicU64> {
    let lines = std::sync::Arc::new(AtomicU64::new(0));
    let counted = lines.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            counted.fetch_add(1, Ordering::AcqRel);
            line.clear();
        }
        counted.store(u64::MAX, Ordering::Release);
    });
    lines
}

/// Page faults this process has taken on the host so far.
fn host_page_faults() -> u64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0, |u| (u.minor_page_faults() + u.major_page_faults()) as u64)
}

/// Says `what` on stderr (where a driver waits for it) and waits for a
/// line on stdin (or its end).
fn hold(what: std::fmt::Arguments<'_>) {
    eprintln!("sim-machine: {what}");
    let _ = std::io::stdin().read_line(&mut String::new());
}

fn run_vcpu(v: u32, phase: usize, ops: &[crate::workload::Op], env: &VcpuEnv<'_>) -> anyhow::Result<VcpuResult> {
    let VcpuEnv { core, shared, phys, regs, ref tlb_gen, wait, passes, waits, stop, kicks, epoch, layout, lines } =
        *env;
    let mut waiter = Waiter::new(wait, waits).passing(passes);
    let kick = &kicks[v as usize];
    let tlb_gen = tlb_gen.clone();
    let mut faults_out =
        Producer::attach(shared.ring(v, RingKind::Fault).context("ring")?).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut commands =
        Consumer::attach(shared.ring(v, RingKind::Command).context("ring")?).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut tlb = Tlb::new(tlb_gen, v);
    let mut r = VcpuResult {
        accesses: 0,
        faults: 0,
        access_flag_faults: 0,
        injected: 0,
        exits: Vec::new(),
        latencies: Vec::with_capacity(ops.len() / 4),
        ram_latencies: Vec::with_capacity(ops.len() / 4),
        tlb_hits: 0,
        tlb_misses: 0,
        slowest: None,
    };
    let register = (1 + v % 30) as u8;
    let now_ns = || epoch.elapsed().as_nanos() as u64;
    let passes = std::iter::from_fn(|| Some(ops)).enumerate().take_while(|(pass, _)| {
        *pass == 0 || lines.is_some_and(|l| l.load(Ordering::Acquire) <= phase as u64 && !stop.load(Ordering::Acquire))
    });
    for op in passes.flat_map(|(_, ops)| ops) {
        let access = match op.kind {
            OpKind::Read => AccessKind::Read,
            OpKind::Write => AccessKind::Write,
            OpKind::Fetch => AccessKind::Fetch,
        };
        loop {
            let done = tlb.access(&regs, phys, op.gpa, access, |pa| {
                match op.kind {
                    OpKind::Write => phys.store(pa, op.size, value_for(op.gpa, op.size)),
                    OpKind::Read | OpKind::Fetch => phys.load(pa, op.size).map(|_| ()),
                }
                .with_context(|| format!("vCPU {v}: PA {pa:#x} of GPA {:#x} is not memory", op.gpa))
            });
            match done {
                Ok(stored) => {
                    stored?;
                    r.accesses += 1;
                    break;
                }
                Err(fault) => {
                    let in_ram = layout.in_ram(op.gpa, op.size as u64);
                    let (t0, posted) = (Instant::now(), std::time::SystemTime::now());
                    let syn =
                        syndrome::encode(fault, access, op.gpa, DataAccess { size: op.size, register, isv: true });
                    let taken = {
                        let mut c = core.lock().unwrap_or_else(|e| e.into_inner());
                        c.vm.handle_abort(v, syn.esr, syn.far, syn.hpfar, now_ns(), |far| Some(Ipa::new(far)))
                    }
                    .map_err(|e| anyhow::anyhow!("vCPU {v}: core refused the fault: {e:?}"))?;
                    let rec = match taken {
                        // The core set the access flag: retry, no round trip.
                        Taken::Young => {
                            r.access_flag_faults += 1;
                            faults_out.count_access_flag_fault();
                            continue;
                        }
                        Taken::Fault(rec) => rec,
                    };
                    r.faults += 1;
                    push(&mut faults_out, &rec.encode(), stop)
                        .map_err(|e| anyhow::anyhow!("vCPU {v}: fault ring: {e:?}"))?;
                    let pushed = std::time::SystemTime::now();
                    let completion = loop {
                        let Some(cmd) = waiter
                            .pop(&mut commands, kick)
                            .map_err(|e| anyhow::anyhow!("vCPU {v}: command ring: {e:?}"))?
                        else {
                            if stop.load(Ordering::Acquire) {
                                bail!("vCPU {v}: stopped while waiting for the daemon");
                            }
                            // A new daemon took the VM: it may never have seen
                            // this fault (its predecessor took it and died).
                            kick.store(false, Ordering::Release);
                            let again = core.lock().unwrap_or_else(|e| e.into_inner()).vm.repost(v);
                            if let Some(rec) = again {
                                push(&mut faults_out, &rec.encode(), stop)
                                    .map_err(|e| anyhow::anyhow!("vCPU {v}: fault ring: {e:?}"))?;
                            }
                            continue;
                        };
                        let executed = {
                            let mut c = core.lock().unwrap_or_else(|e| e.into_inner());
                            let CoreState { vm, owners, tlb } = &mut *c;
                            vm.execute(v, &cmd, owners, tlb)
                        };
                        // A result that resumes the vCPU needs no doorbell: the
                        // daemon reads it with the next record, and nobody
                        // waits on it. One that leaves the vCPU waiting (a
                        // fault-around page, a top-up, a refusal) is rung.
                        let ring = executed.completion.is_none();
                        push_result(&mut faults_out, &executed.result.encode(), ring, stop)
                            .map_err(|e| anyhow::anyhow!("vCPU {v}: fault ring: {e:?}"))?;
                        if let Some(c) = executed.completion {
                            break c;
                        }
                    };
                    let elapsed = t0.elapsed().as_nanos() as u64;
                    if r.slowest.is_none_or(|f| f.ns < elapsed) {
                        let unix_ns = |t: std::time::SystemTime| {
                            t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
                        };
                        let (posted_unix_ns, pushed_unix_ns) = (unix_ns(posted), unix_ns(pushed));
                        r.slowest =
                            Some(SlowestFault { ns: elapsed, posted_unix_ns, pushed_unix_ns, gpa: op.gpa, vcpu: v });
                    }
                    r.latencies.push(elapsed);
                    if in_ram {
                        r.ram_latencies.push(elapsed);
                    }
                    match completion {
                        Completion::Resume => continue,
                        Completion::ExitToVmm => {
                            r.exits.push(ExitRecord {
                                vcpu: v,
                                gpa: op.gpa,
                                size: op.size,
                                write: op.kind == OpKind::Write,
                                isv: true,
                            });
                            break;
                        }
                        Completion::InjectAbort => {
                            r.injected += 1;
                            break;
                        }
                    }
                }
            }
        }
    }
    r.tlb_hits = tlb.hits;
    r.tlb_misses = tlb.misses;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_gets_the_fewest_ipa_bits_and_levels_it_fits_in() {
        const GIB: u64 = 1 << 30;
        let shape = |ipa_end, pa_end| {
            let g = geometry_for(ipa_end, pa_end).unwrap();
            (g.ipa_bits(), g.pa_bits(), g.start_level(), g.root_tables())
        };
        // Up to 1 TiB: KVM's default, two level-1 roots.
        assert_eq!(shape(RAM_PA + GIB, RAM_PA + GIB), (40, 40, 1, 2));
        assert_eq!(shape(1 << 40, 1 << 40), (40, 40, 1, 2));
        // 1 TiB of RAM above 1 GiB: one bit more, still three levels.
        assert_eq!(shape(RAM_PA + (1 << 40), RAM_PA + (1 << 40)), (41, 42, 1, 4));
        // Up to 8 TiB concatenation keeps level 1; past it, level 0.
        assert_eq!(shape(1 << 43, 1 << 43), (43, 44, 1, 16));
        assert_eq!(shape((1 << 43) + GIB, 1 << 40), (44, 44, 0, 1));
        // The PA size follows PARange's steps, however small the IPA space.
        assert_eq!(shape(RAM_PA + GIB, 1 << 41), (40, 42, 1, 2));
        assert!(geometry_for((1 << 48) + 1, 1 << 40).is_err());
    }
}
