//! `sim-machine`: run a workload on a simulated arm64 machine served by the
//! memory-manager daemon; prints a JSON summary on stdout.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sim_machine::layout::Layout;
use sim_machine::machine::{self, MachineConfig};
use sim_machine::workload::{self, Pattern};

/// Simulated arm64 machine hosting hyp-core.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The daemon's attach socket.
    #[arg(long, default_value = "/run/faultline/attach.sock")]
    attach_socket: PathBuf,
    /// VM id (1..=255).
    #[arg(long, default_value_t = 1)]
    vm_id: u16,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// RAM in MiB (a multiple of 2).
    #[arg(long, default_value_t = 224)]
    ram_mib: u64,
    /// RAM backing page size in KiB: 4 or 2048.
    #[arg(long, default_value_t = 2048)]
    ram_page_kib: u64,
    /// RAM's guest physical address.
    #[arg(long, default_value_t = 0x4000_0000, value_parser = parse_u64)]
    ram_gpa: u64,
    /// Read-only memslot size in MiB.
    #[arg(long, default_value_t = 32)]
    rom_mib: u64,
    /// Built-in workload pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Sequential)]
    pattern: Pattern,
    /// Accesses per vCPU, generated before the guest runs (16 bytes each,
    /// 8 GiB at most in all).
    #[arg(long, default_value_t = 100_000)]
    ops: usize,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Replay this trace file instead of a pattern.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Longest spin on a command ring before sleeping on its doorbell, in
    /// polls (0: never spin; the window adapts below it). vCPUs that
    /// outnumber this process's CPUs never spin.
    #[arg(long, default_value_t = 20_000)]
    spin_polls: u32,
    /// Repeat each phase (the whole workload, or a trace's accesses
    /// between PAUSE lines) until a line arrives on stdin, then go on to
    /// the next: the workload runs for as long as whoever watches it
    /// needs. Memory ends the same as after one pass.
    #[arg(long)]
    loop_phases: bool,
    /// After the workload, stay attached until a line arrives on stdin
    /// (`run_ms` in the summary ends before the wait).
    #[arg(long)]
    hold_before_detach: bool,
    /// Once attached, wait for a line on stdin before running the
    /// workload (`run_ms` starts after the wait): machines started one
    /// after another run their workloads together.
    #[arg(long, conflicts_with = "loop_phases")]
    hold_before_run: bool,
    /// Let the MMU set stage-2 access flags itself (FEAT_HAFDBS,
    /// VTCR_EL2.HA): pages the daemon aged take no access-flag faults.
    #[arg(long)]
    hardware_access_flag: bool,
    /// Include every fault's round-trip time in the summary.
    #[arg(long)]
    latencies: bool,
    /// Dirty logging on the RAM memslot (4 KiB mappings, writes logged).
    #[arg(long)]
    dirty_log: bool,
    /// Seconds to wait for a daemon that went away (killed, restarted,
    /// upgraded) to take the VM back; faults wait meanwhile.
    #[arg(long, default_value_t = 60.0)]
    reattach_deadline_s: f64,
    /// Run the stage-1 probe instead of a workload: the EL2 image's probe
    /// guest (MMU on, tables in their own memslot, one access), walked in
    /// software; prints a report shaped like `faultline qemu`'s.
    #[arg(long, value_enum)]
    stage1_probe: Option<sim_machine::probe::ProbeAccess>,
    /// Stage-1 probe: the data memslot.
    #[arg(long, value_enum, default_value_t = sim_machine::probe::SlotSetup::Plain, requires = "stage1_probe")]
    data: sim_machine::probe::SlotSetup,
    /// Stage-1 probe: the page-table memslot.
    #[arg(long, value_enum, default_value_t = sim_machine::probe::SlotSetup::Plain, requires = "stage1_probe")]
    tables: sim_machine::probe::SlotSetup,
    /// Stage-1 probe: the probed page's leaf has its access flag clear.
    #[arg(long, requires = "stage1_probe")]
    af_clear: bool,
    /// Stage-1 probe: punch these memslots' backing before the guest runs
    /// (the daemon fills each page from the machine's copy on fault).
    #[arg(long, value_enum, default_value_t = sim_machine::probe::Holes::None, requires = "stage1_probe")]
    holes: sim_machine::probe::Holes,
    /// Stage-1 probe: page size of the data and page-table memslots' backing.
    #[arg(long, value_enum, default_value_t = sim_machine::probe::Backing::Pages4k, requires = "stage1_probe")]
    backing: sim_machine::probe::Backing,
    /// Stage-1 probe: the guest's IPA space, in bits.
    #[arg(long, value_enum, default_value_t = sim_machine::probe::IpaBits::Bits40, requires = "stage1_probe")]
    ipa_bits: sim_machine::probe::IpaBits,
    /// Stage-1 probe: stay attached after the guest stops until a line
    /// arrives on stdin.
    #[arg(long, requires = "stage1_probe")]
    pause_before_detach: bool,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    faultline_exit_status::exit_status(env!("CARGO_BIN_NAME"), run())
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(access) = args.stage1_probe {
        let config = sim_machine::probe::ProbeConfig {
            attach_socket: args.attach_socket,
            vm_id: args.vm_id,
            access,
            data: args.data,
            tables: args.tables,
            af_clear: args.af_clear,
            holes: args.holes,
            backing: args.backing,
            ipa_bits: args.ipa_bits,
            pause_before_detach: args.pause_before_detach,
        };
        let report = sim_machine::probe::run(&config)?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let layout = Layout {
        nr_vcpus: args.vcpus,
        ram_size: args.ram_mib << 20,
        ram_page_size: args.ram_page_kib << 10,
        ram_gpa: args.ram_gpa,
        rom_size: args.rom_mib << 20,
    };
    let workload = match &args.trace {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            workload::parse_trace(&text, args.vcpus)?
        }
        None => {
            workload::check_size(args.ops as u64, args.vcpus.into())?;
            workload::generate(args.pattern, &layout, args.ops, args.seed)
        }
    };
    let config = MachineConfig {
        attach_socket: args.attach_socket,
        vm_id: args.vm_id,
        layout,
        spin_polls: args.spin_polls,
        keep_latencies: args.latencies,
        dirty_log: args.dirty_log,
        reattach_deadline: std::time::Duration::from_secs_f64(args.reattach_deadline_s),
        loop_phases: args.loop_phases,
        hold_before_detach: args.hold_before_detach,
        hold_before_run: args.hold_before_run,
        hardware_access_flag: args.hardware_access_flag,
    };
    let summary = machine::run(&config, &workload)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
