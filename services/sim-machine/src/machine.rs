//! The machine: creates memory and rings, hosts hyp-core, attaches to the
//! daemon, runs the vCPUs, detaches and reports.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faultline_attach::doorbell::{push_and_ring, wait_pop, WaitPolicy};
use faultline_attach::{
    decode_header, recv_message, send_message, AttachRequest, MemslotDesc, MsgKind, RegionDesc, RegionKind, Reply,
    Status, MEMSLOT_READ_ONLY, NO_FD, REGION_WRITABLE,
};
use hyp_core::addr::{Ipa, Pa};
use hyp_core::ownership::{Owner, PageOwnership, VmId};
use hyp_core::ring::{Consumer, Producer, Record, RingError, RingKind, SharedRegion};
use hyp_core::stage2::{Geometry, LinearMap};
use hyp_core::vm::{Completion, Vm};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::Serialize;
use tracing::{info, warn};

use crate::layout::{
    rom_byte, Layout, RAM_PA, RINGS_PA, RING_ENTRIES, ROM_GPA, ROM_PA, ROOT_RESERVE, TABLES_PA, TABLES_SIZE,
};
use crate::mmu::{AccessKind, Stage2Regs, Tlb, TlbGeneration};
use crate::phys::{PhysMemory, Window};
use crate::syndrome::{self, DataAccess};
use crate::workload::{digest, value_for, OpKind, Workload};

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
    /// RAM is hugetlb-backed.
    pub ram_hugetlb: bool,
    /// The daemon's detach report.
    pub detach: Option<DetachReport>,
    /// Every RAM fault's round trip in ns, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latencies_ns: Option<Vec<u64>>,
}

struct CoreState {
    vm: Vm<LinearMap>,
    owners: PageOwnership<'static>,
    tlb: TlbGeneration,
}

struct VcpuResult {
    accesses: u64,
    faults: u64,
    injected: u64,
    exits: Vec<ExitRecord>,
    latencies: Vec<u64>,
    ram_latencies: Vec<u64>,
    tlb_hits: u64,
    tlb_misses: u64,
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
    let geometry = Geometry::kvm_default();
    let vm = Vm::new(id, geometry, Pa::new(TABLES_PA), n + 1, table_mem, &mut owners)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let regs = Stage2Regs { vtcr: geometry.vtcr(), vttbr: vm.stage2().vttbr() };
    let tlb_gen = TlbGeneration::default();
    let core = Mutex::new(CoreState { vm, owners, tlb: tlb_gen.clone() });

    // Attach.
    let conn = faultline_attach::connect(&config.attach_socket)
        .with_context(|| format!("connecting to the daemon at {}", config.attach_socket.display()))?;
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
    let fds = [phys.window(ram).fd(), phys.window(rom).fd(), phys.window(rings).fd()];
    send_message(conn.as_fd(), &request.encode(), &fds).context("sending the attach request")?;
    let reply = read_reply(&conn).context("reading the attach reply")?;
    if reply.status != Status::Ok {
        bail!("daemon refused the attach: {:?}: {}", reply.status, reply.message);
    }
    info!(vm = config.vm_id, vcpus = n, "attached");

    // Run.
    let stop = AtomicBool::new(false);
    let daemon_gone = AtomicBool::new(false);
    let wait = WaitPolicy { spin_polls: config.spin_polls, sleep_slice: Duration::from_millis(500) };
    let epoch = Instant::now();
    let started = Instant::now();
    let env = VcpuEnv {
        core: &core,
        shared: &shared,
        phys: &phys,
        regs,
        tlb_gen: tlb_gen.clone(),
        wait,
        stop: &stop,
        epoch,
        layout,
    };
    let results: Vec<anyhow::Result<VcpuResult>> = std::thread::scope(|s| {
        let control = {
            let (core, shared, stop) = (&core, &shared, &stop);
            s.spawn(move || serve_control(core, shared, n, wait, stop))
        };
        let watchdog = {
            let (conn, stop, gone, shared) = (&conn, &stop, &daemon_gone, &shared);
            s.spawn(move || watch_connection(conn, stop, gone, shared, n))
        };
        let mut results = Vec::new();
        for phase in 0..workload.phases() {
            let handles: Vec<_> = (0..n)
                .map(|v| {
                    let (env, ops) = (&env, workload.phase(phase, v as usize));
                    s.spawn(move || run_vcpu(v, ops, env))
                })
                .collect();
            results.extend(
                handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("vCPU panicked")))),
            );
            if phase < workload.pauses.len() && !stop.load(Ordering::Acquire) {
                // Attached and idle until told to go on (or stdin closes).
                eprintln!("sim-machine: paused after phase {phase}");
                let _ = std::io::stdin().read_line(&mut String::new());
            }
        }
        stop_all(&stop, &shared, n);
        let _ = control.join();
        let _ = watchdog.join();
        results
    });
    let run_ms = started.elapsed().as_millis() as u64;
    if daemon_gone.load(Ordering::Acquire) {
        bail!("the daemon closed the connection while the guest ran");
    }
    let mut summary = Summary {
        vm_id: config.vm_id,
        vcpus: n,
        accesses: 0,
        faults: 0,
        exits: Vec::new(),
        injected: 0,
        ram_digest: 0,
        rom_digest: 0,
        fault_p50_ns: 0,
        fault_p99_ns: 0,
        tlb_hits: 0,
        tlb_misses: 0,
        run_ms,
        ram_hugetlb: phys.window(ram).hugetlb,
        detach: None,
        latencies_ns: None,
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
    // Detach and collect the daemon's report.
    send_message(conn.as_fd(), &faultline_attach::encode_detach(), &[]).context("sending detach")?;
    let reply = read_reply(&conn).context("reading the detach reply")?;
    summary.detach = Some(DetachReport {
        pages_released: reply.values[0],
        pins_remaining: reply.values[1],
        faults_served: reply.values[2],
    });
    let word_digest = |w: &Window| digest((0..w.size).step_by(8).map(|off| w.map.load(off, 8).expect("in range")));
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

pub(crate) fn read_reply(conn: &OwnedFd) -> anyhow::Result<Reply> {
    let msg = recv_message(conn.as_fd())?.context("the daemon closed the connection")?;
    let (kind, payload) = decode_header(&msg.bytes)?;
    if kind != MsgKind::Reply {
        bail!("expected a reply, got {kind:?}");
    }
    Ok(Reply::decode(payload)?)
}

/// Sets `stop` and wakes every thread sleeping on a command ring.
fn stop_all(stop: &AtomicBool, shared: &SharedRegion<'_>, n: u32) {
    stop.store(true, Ordering::Release);
    for ring in 0..=n {
        if let Some(view) = shared.ring(ring, RingKind::Command) {
            faultline_attach::doorbell::wake(&view);
        }
    }
}

/// Sets `stop` and `gone` if the daemon hangs up while the guest runs.
fn watch_connection(conn: &OwnedFd, stop: &AtomicBool, gone: &AtomicBool, shared: &SharedRegion<'_>, n: u32) {
    while !stop.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        if let Ok(ready) = poll(&mut fds, PollTimeout::from(50u16)) {
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            let mut byte = [0u8; 1];
            let peek = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
            let closed = revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)
                || (revents.contains(PollFlags::POLLIN)
                    && matches!(nix::sys::socket::recv(conn.as_raw_fd(), &mut byte, peek), Ok(0)));
            if ready > 0 && closed {
                warn!("daemon hung up");
                gone.store(true, Ordering::Release);
                stop_all(stop, shared, n);
                return;
            }
        }
    }
}

/// Serves the control ring pair (commands not tied to a fault).
fn serve_control(core: &Mutex<CoreState>, shared: &SharedRegion<'_>, n: u32, wait: WaitPolicy, stop: &AtomicBool) {
    let (Some(cmd_view), Some(res_view)) = (shared.ring(n, RingKind::Command), shared.ring(n, RingKind::Fault)) else {
        return;
    };
    let (Ok(mut commands), Ok(mut results)) = (Consumer::attach(cmd_view), Producer::attach(res_view)) else {
        return;
    };
    while let Ok(Some(cmd)) = wait_pop(&mut commands, wait, stop) {
        let executed = {
            let mut c = core.lock().unwrap_or_else(|e| e.into_inner());
            let CoreState { vm, owners, tlb } = &mut *c;
            vm.execute(n, &cmd, owners, tlb)
        };
        if push(&mut results, &executed.result.encode(), stop).is_err() {
            return;
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
    stop: &'a AtomicBool,
    epoch: Instant,
    layout: Layout,
}

fn run_vcpu(v: u32, ops: &[crate::workload::Op], env: &VcpuEnv<'_>) -> anyhow::Result<VcpuResult> {
    let VcpuEnv { core, shared, phys, regs, ref tlb_gen, wait, stop, epoch, layout } = *env;
    let tlb_gen = tlb_gen.clone();
    let mut faults_out =
        Producer::attach(shared.ring(v, RingKind::Fault).context("ring")?).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut commands =
        Consumer::attach(shared.ring(v, RingKind::Command).context("ring")?).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut tlb = Tlb::new(tlb_gen);
    let mut r = VcpuResult {
        accesses: 0,
        faults: 0,
        injected: 0,
        exits: Vec::new(),
        latencies: Vec::with_capacity(ops.len() / 4),
        ram_latencies: Vec::with_capacity(ops.len() / 4),
        tlb_hits: 0,
        tlb_misses: 0,
    };
    let register = (1 + v % 30) as u8;
    let now_ns = || epoch.elapsed().as_nanos() as u64;
    for op in ops {
        let access = match op.kind {
            OpKind::Read => AccessKind::Read,
            OpKind::Write => AccessKind::Write,
            OpKind::Fetch => AccessKind::Fetch,
        };
        loop {
            match tlb.translate(&regs, phys, op.gpa, access) {
                Ok(pa) => {
                    match op.kind {
                        OpKind::Write => phys.store(pa, op.size, value_for(op.gpa, op.size)),
                        OpKind::Read | OpKind::Fetch => phys.load(pa, op.size).map(|_| ()),
                    }
                    .with_context(|| format!("vCPU {v}: PA {pa:#x} of GPA {:#x} is not memory", op.gpa))?;
                    r.accesses += 1;
                    break;
                }
                Err(fault) => {
                    let in_ram = layout.in_ram(op.gpa, op.size as u64);
                    let t0 = Instant::now();
                    let syn =
                        syndrome::encode(fault, access, op.gpa, DataAccess { size: op.size, register, isv: true });
                    let rec = {
                        let mut c = core.lock().unwrap_or_else(|e| e.into_inner());
                        c.vm.take_fault(v, syn.esr, syn.far, syn.hpfar, now_ns(), |far| Some(Ipa::new(far)))
                    }
                    .map_err(|e| anyhow::anyhow!("vCPU {v}: core refused the fault: {e:?}"))?;
                    r.faults += 1;
                    push(&mut faults_out, &rec.encode(), stop)
                        .map_err(|e| anyhow::anyhow!("vCPU {v}: fault ring: {e:?}"))?;
                    let completion = loop {
                        let Some(cmd) = wait_pop(&mut commands, wait, stop)
                            .map_err(|e| anyhow::anyhow!("vCPU {v}: command ring: {e:?}"))?
                        else {
                            bail!("vCPU {v}: stopped while waiting for the daemon");
                        };
                        let executed = {
                            let mut c = core.lock().unwrap_or_else(|e| e.into_inner());
                            let CoreState { vm, owners, tlb } = &mut *c;
                            vm.execute(v, &cmd, owners, tlb)
                        };
                        push(&mut faults_out, &executed.result.encode(), stop)
                            .map_err(|e| anyhow::anyhow!("vCPU {v}: fault ring: {e:?}"))?;
                        if let Some(c) = executed.completion {
                            break c;
                        }
                    };
                    let elapsed = t0.elapsed().as_nanos() as u64;
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
