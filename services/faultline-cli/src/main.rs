//! `faultline`: observe faults and inspect the memory-manager daemon over
//! its gRPC API.

mod demo;
mod observe;
mod out;
mod top;
mod workingset;

use out::{out, outln};

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use faultline::{dirty_ranges, jsonpb, DirtyLogFormat, ReportFormat};
use faultline_proto::client::{Address, ClientTls};
use faultline_proto::v1::control_client::ControlClient;
use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::{
    GetAccessLogRequest, GetDirtyLogRequest, GetStatsRequest, GetVmRequest, ListVmsRequest, ServerStatusRequest,
};

/// Observe stage-2 faults served by the Faultline memory-manager.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The daemon's gRPC address: unix:PATH, http://HOST:PORT (read-only
    /// calls) or https://HOST:PORT (mutual TLS). Default: the Unix socket
    /// /run/faultline/grpc.sock if it exists, else http://127.0.0.1:50151.
    #[arg(long, global = true, env = "FAULTLINE_SERVER")]
    server: Option<Address>,
    /// https://: PEM of the CA that signed the daemon's certificate.
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// https://: PEM of this client's certificate (mutual TLS).
    #[arg(long, global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// https://: PEM of this client's private key.
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// On an error, each cause on a line of its own.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream fault events (Hubble-style).
    Observe(Box<observe::ObserveArgs>),
    /// Start the daemon and a simulated machine, stream its faults, summarize.
    Demo {
        /// vCPUs (default: 2, or 1 on a machine of 2 cores or fewer, so
        /// that the vCPUs and the daemon's service thread each have a core
        /// and the latencies shown are a fault's, not a crowded host's).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Accesses per vCPU.
        #[arg(long, default_value_t = 200_000)]
        ops: u64,
        /// Workload pattern (sequential, random, strided, read-then-write, zipf, fetch).
        #[arg(long, default_value = "zipf")]
        pattern: String,
        /// Fault lines printed per second at most.
        #[arg(long, default_value_t = 40)]
        lines_per_second: u32,
    },
    /// Boot hyp-core at EL2 under qemu-system-aarch64 and serve its guest
    /// from the running daemon; prints a JSON report. Runs `qemu-machine`
    /// (next to this binary) with these arguments: `faultline qemu --help`
    /// lists them.
    #[command(disable_help_flag = true)]
    Qemu {
        /// Arguments for qemu-machine.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Buffer and rate.
    Status {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = ReportFormat::Text)]
        output: ReportFormat,
    },
    /// Counters and latency histograms (daemon-wide: the API keeps no
    /// per-VM histograms), ring occupancy and the service threads.
    Stats {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = ReportFormat::Text)]
        output: ReportFormat,
    },
    /// Attached VMs.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = ReportFormat::Text, global = true)]
        output: ReportFormat,
    },
    /// Memory policy services: list, use, status, default.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = ReportFormat::Text, global = true)]
        output: ReportFormat,
    },
    /// Fetch a memslot's dirty log and clear it (pages written since the
    /// last fetch), re-arming logging; --peek only reads it.
    DirtyLog {
        /// VM id.
        vm: u32,
        /// Memslot id (see `faultline vm show`).
        memslot: u32,
        /// Read without clearing or write-protecting.
        #[arg(long)]
        peek: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = DirtyLogFormat::Text)]
        output: DirtyLogFormat,
    },
    /// Fetch the pages of a memslot the guest accessed since the last
    /// fetch (or since they were mapped), clearing the stage-2 access flags.
    AccessLog {
        /// VM id.
        vm: u32,
        /// Memslot id (see `faultline vm show`).
        memslot: u32,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = DirtyLogFormat::Text)]
        output: DirtyLogFormat,
    },
    /// What the working-set monitor sees of a VM: its regions, how often
    /// each was found accessed and how long each has been idle.
    Workingset(workingset::WorkingSetArgs),
    /// Draw access frequency over IPA and time as a heatmap (PNG, or SVG),
    /// from a live VM or from a recorded `workingset --follow -o json`.
    Heatmap(workingset::HeatmapArgs),
    /// The working-set monitor's settings; with flags, change them.
    Monitor(workingset::MonitorArgs),
    /// A live terminal view of every VM: fault rate by outcome, p50/p99,
    /// rings, resident and working-set bytes, the policy; `v` toggles a
    /// per-vCPU breakdown, `q` quits.
    Top(top::TopArgs),
    /// Print the shell completion script for SHELL (bash, zsh, fish, ...):
    /// `source <(faultline completions bash)`; deploy/install-cli.sh
    /// installs them.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command to DIR.
    Man {
        /// Write faultline.1, faultline-observe.1, ... here instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// The built-in policy and every policy service used since start.
    List,
    /// Swap in the policy service at ENDPOINT (http://host:port) now.
    Use {
        /// The policy's address.
        endpoint: String,
        /// After a fallback, take the policy back once it answers again.
        #[arg(long)]
        reconnect: bool,
        /// Never take it back after a fallback (overrides the daemon's setting).
        #[arg(long, conflicts_with = "reconnect")]
        no_reconnect: bool,
    },
    /// The policy in force, its rules, the counters and why policies left.
    Status,
    /// Back to the built-in policy.
    Default,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// List attached VMs.
    List,
    /// Show one VM.
    Show {
        /// VM id.
        id: u32,
    },
}

/// A dirty or access log as `dirty-log` and `access-log` print it.
struct PageLog<'a> {
    /// The text output's first line.
    title: String,
    vm_id: u32,
    memslot: u32,
    /// The memslot's first GPA.
    gpa: u64,
    /// Pages in the memslot.
    pages: u64,
    /// The JSON output's counts, after the memslot's fields.
    counts: &'a [(&'static str, u64)],
    /// The JSON key of the page ranges.
    ranges_key: &'static str,
    /// The bitmap as the daemon sent it.
    bitmap: &'a [u8],
}

impl PageLog<'_> {
    /// Prints the log as `output` says (`jsonpb`: the message itself).
    fn print(self, output: DirtyLogFormat, jsonpb: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
        let ranges = dirty_ranges(self.gpa, self.bitmap);
        match output {
            DirtyLogFormat::Jsonpb => outln!("{}", jsonpb()?),
            DirtyLogFormat::Json => {
                let mut json = serde_json::json!({
                    "vm_id": self.vm_id,
                    "memslot": self.memslot,
                    "gpa": format!("{:#x}", self.gpa),
                    "pages": self.pages,
                });
                for &(key, count) in self.counts {
                    json[key] = count.into();
                }
                let hex: Vec<[String; 2]> =
                    ranges.iter().map(|(s, e)| [format!("{s:#x}"), format!("{e:#x}")]).collect();
                json[self.ranges_key] = serde_json::json!(hex);
                outln!("{json}");
            }
            DirtyLogFormat::Text => {
                outln!("{}", self.title);
                for (s, e) in ranges {
                    outln!("  {s:#x}-{e:#x} ({} pages)", (e - s) / 4096);
                }
            }
        }
        Ok(())
    }
}

/// A call the daemon refused or failed, as one line: the status code and
/// the daemon's reason.
pub(crate) fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let verbose = cli.verbose;
    match run(cli, &matches).await {
        Ok(code) => code,
        // A closed stdout (`| head`): the reader has what it wanted.
        Err(e) if out::closed(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with its causes, whatever RUST_BACKTRACE says: the
            // error is for the operator, not a report of a bug. -v: each
            // cause on a line of its own.
            match verbose {
                false => eprintln!("{}", faultline_exit_status::one_line("faultline", &e)),
                true => {
                    eprintln!("faultline: {e}");
                    e.chain().skip(1).for_each(|c| eprintln!("  caused by: {c}"));
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<std::process::ExitCode> {
    let server = cli.server.clone().unwrap_or_else(Address::default_for_host);
    let tls = ClientTls { ca: cli.tls_ca.clone(), cert: cli.tls_cert.clone(), key: cli.tls_key.clone() };
    let channel = || faultline_proto::client::connect(&server, &tls);
    match cli.command {
        Command::Demo { vcpus, ops, pattern, lines_per_second } => {
            let vcpus = vcpus.unwrap_or_else(demo::default_vcpus);
            demo::run(demo::DemoArgs { vcpus, ops, pattern, max_lines_per_second: lines_per_second }).await?;
        }
        Command::Observe(args) => {
            let negated = observe::negations(matches.subcommand_matches("observe").expect("the observe subcommand"))?;
            if observe::run(*args, &negated, channel().await?).await? == observe::Ended::Interrupted {
                return Ok(std::process::ExitCode::from(130));
            }
        }
        Command::Qemu { args } => {
            let mut machine = std::process::Command::new(faultline::sibling("qemu-machine")?);
            // The daemon's gRPC address, unless the arguments name one.
            if !args.iter().any(|a| a == "--grpc" || a.starts_with("--grpc=")) {
                machine.arg("--grpc").arg(server.to_string());
            }
            let status = machine.args(&args).status().context("running qemu-machine")?;
            if !status.success() {
                std::process::exit(status.code().unwrap_or(1));
            }
        }
        Command::Status { output } => {
            let mut client = FaultTraceClient::new(channel().await?);
            let s = client.server_status(ServerStatusRequest {}).await.map_err(refused)?.into_inner();
            if output == ReportFormat::Json {
                outln!("{}", jsonpb("faultline.v1.ServerStatusResponse", &s)?);
                return Ok(std::process::ExitCode::SUCCESS);
            }
            outln!("events in buffer: {} / {}", s.num_events, s.max_events);
            outln!("events seen:      {}", s.seen_events);
            outln!("events lost:      {}", s.lost_events);
            outln!("uptime:           {:.1}s", s.uptime_ns as f64 / 1e9);
            outln!("rate (1 min):     {:.1} events/s", s.events_per_second);
            outln!("attached VMs:     {}", s.attached_vms);
            let started = match (s.took_over, s.recovered_after_crash) {
                (true, _) => "took over from a running daemon",
                (false, true) => "after a crash (its predecessor's state found)",
                (false, false) => "fresh",
            };
            outln!("started:          {started}; VMs taken back: {}", s.reattached_vms);
        }
        Command::Stats { output } => {
            let mut client = FaultTraceClient::new(channel().await?);
            let s = client.get_stats(GetStatsRequest {}).await.map_err(refused)?.into_inner();
            if output == ReportFormat::Json {
                outln!("{}", jsonpb("faultline.v1.GetStatsResponse", &s)?);
                return Ok(std::process::ExitCode::SUCCESS);
            }
            outln!("policy: {}   pinned pages: {}", s.policy, s.pinned_pages);
            if let Some(p) = &s.pool {
                outln!(
                    "service threads: {}, at most {} serving at once   waits: spun {} slept {} (spins given up for other threads: {})",
                    p.threads,
                    p.serving_limit,
                    p.waits_spun,
                    p.waits_slept,
                    p.spins_yielded
                );
            }
            for r in &s.rings {
                outln!(
                    "rings vm{}/vcpu{}: faults {} (max {}) commands {} (max {}) of {}",
                    r.vm_id,
                    r.vcpu,
                    r.fault_ring,
                    r.fault_ring_high_water,
                    r.command_ring,
                    r.command_ring_high_water,
                    r.capacity
                );
            }
            for (title, counts, empty) in [
                ("by outcome", &s.by_outcome, "no faults yet"),
                ("by kind", &s.by_kind, "no faults yet"),
                ("by size", &s.by_mapping_size, "no faults yet"),
                ("by vm", &s.by_vm, "no VM attached"),
            ] {
                let nonzero: Vec<String> =
                    counts.iter().filter(|c| c.count > 0).map(|c| format!("{}={}", c.key, c.count)).collect();
                outln!("{title}: {}", if nonzero.is_empty() { empty.to_string() } else { nonzero.join(" ") });
            }
            if s.access_flag_faults_at_core > 0 {
                outln!("access-flag faults resolved at the cores (no record): {}", s.access_flag_faults_at_core);
            }
            outln!(
                "{:<13} {:>9} {:>10} {:>10} {:>10} {:>10}",
                "stage",
                "count",
                "p50 us",
                "p99 us",
                "p99.9 us",
                "max us"
            );
            for h in &s.latency {
                let us = |ns: u64| ns as f64 / 1000.0;
                outln!(
                    "{:<13} {:>9} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                    h.stage,
                    h.count,
                    us(h.p50_ns),
                    us(h.p99_ns),
                    us(h.p999_ns),
                    us(h.max_ns)
                );
            }
        }
        Command::DirtyLog { vm, memslot, peek, output } => {
            let mut client = ControlClient::new(channel().await?);
            let log = client
                .get_dirty_log(GetDirtyLogRequest { vm_id: vm, memslot, peek })
                .await
                .map_err(refused)?
                .into_inner();
            let cleared = if peek { " (peek: not cleared)" } else { ", cleared and write-protected" };
            PageLog {
                title: format!("vm{vm} memslot {memslot}: {} of {} pages dirty{cleared}", log.dirty_pages, log.pages),
                vm_id: log.vm_id,
                memslot: log.memslot,
                gpa: log.gpa,
                pages: log.pages,
                counts: &[("dirty_pages", log.dirty_pages), ("write_protect_commands", log.write_protect_commands)],
                ranges_key: "dirty",
                bitmap: &log.bitmap,
            }
            .print(output, || jsonpb("faultline.v1.DirtyLog", &log))?;
        }
        Command::Workingset(args) => workingset::show(args, channel().await?).await?,
        Command::Heatmap(args) => workingset::heatmap(args, async { anyhow::Ok(channel().await?) }).await?,
        Command::Monitor(args) => workingset::monitor(args, channel().await?).await?,
        Command::Top(args) => top::run(args, async { anyhow::Ok(channel().await?) }).await?,
        Command::AccessLog { vm, memslot, output } => {
            let mut client = ControlClient::new(channel().await?);
            let log =
                client.get_access_log(GetAccessLogRequest { vm_id: vm, memslot }).await.map_err(refused)?.into_inner();
            PageLog {
                title: format!(
                    "vm{vm} memslot {memslot}: {} of {} pages accessed since the last fetch (flags cleared)",
                    log.accessed_pages, log.pages
                ),
                vm_id: log.vm_id,
                memslot: log.memslot,
                gpa: log.gpa,
                pages: log.pages,
                counts: &[("accessed_pages", log.accessed_pages)],
                ranges_key: "accessed",
                bitmap: &log.bitmap,
            }
            .print(output, || jsonpb("faultline.v1.AccessLog", &log))?;
        }
        Command::Completions { shell } => {
            // Generated whole first: a closed stdout is then one error.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "faultline", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
        }
        Command::Man { out_dir } => match out_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                clap_mangen::generate_to(Cli::command(), &dir)
                    .with_context(|| format!("writing to {}", dir.display()))?;
            }
            None => {
                let mut page = Vec::new();
                clap_mangen::Man::new(Cli::command()).render(&mut page)?;
                std::io::Write::write_all(&mut std::io::stdout(), &page)?;
            }
        },
        Command::Policy { command, output } => {
            use faultline_proto::v1::policy_control_client::PolicyControlClient;
            use faultline_proto::v1::{
                GetPolicyStatusRequest, ListPoliciesRequest, UseDefaultRequest, UsePolicyRequest,
            };
            let mut client = PolicyControlClient::new(channel().await?);
            let status = match command {
                PolicyCommand::List => {
                    let list = client.list_policies(ListPoliciesRequest {}).await.map_err(refused)?.into_inner();
                    if output == ReportFormat::Json {
                        outln!("{}", jsonpb("faultline.v1.ListPoliciesResponse", &list)?);
                        return Ok(std::process::ExitCode::SUCCESS);
                    }
                    for p in list.policies {
                        let mark = if p.active { "*" } else { " " };
                        let at = if p.endpoint.is_empty() { "built-in".to_string() } else { p.endpoint };
                        outln!("{mark} {} {} ({at})", p.name, p.version);
                    }
                    return Ok(std::process::ExitCode::SUCCESS);
                }
                PolicyCommand::Use { endpoint, reconnect, no_reconnect } => {
                    let reconnect = (reconnect || no_reconnect).then_some(reconnect);
                    let req = UsePolicyRequest { endpoint, reconnect };
                    client.use_policy(req).await.map_err(refused)?.into_inner()
                }
                PolicyCommand::Status => {
                    client.get_policy_status(GetPolicyStatusRequest {}).await.map_err(refused)?.into_inner()
                }
                PolicyCommand::Default => client.use_default(UseDefaultRequest {}).await.map_err(refused)?.into_inner(),
            };
            match output {
                ReportFormat::Json => outln!("{}", jsonpb("faultline.v1.PolicyStatus", &status)?),
                ReportFormat::Text => out!("{}", faultline::policy_status(&status)),
            }
        }
        Command::Vm { command, output } => {
            let mut client = ControlClient::new(channel().await?);
            let vms = match command {
                VmCommand::List => {
                    let list = client.list_vms(ListVmsRequest {}).await.map_err(refused)?.into_inner();
                    if output == ReportFormat::Json {
                        outln!("{}", jsonpb("faultline.v1.ListVmsResponse", &list)?);
                        return Ok(std::process::ExitCode::SUCCESS);
                    }
                    list.vms
                }
                VmCommand::Show { id } => {
                    let vm = client.get_vm(GetVmRequest { vm_id: id }).await.map_err(refused)?.into_inner();
                    if output == ReportFormat::Json {
                        outln!("{}", jsonpb("faultline.v1.Vm", &vm)?);
                        return Ok(std::process::ExitCode::SUCCESS);
                    }
                    vec![vm]
                }
            };
            for vm in vms {
                outln!(
                    "vm{}: {} vCPUs, {} faults, {} mappings, {} pinned pages, {} KiB resident, {} evicted, {} fault-around pages",
                    vm.vm_id,
                    vm.vcpus,
                    vm.faults,
                    vm.mappings,
                    vm.pinned_pages,
                    vm.resident_bytes >> 10,
                    vm.evicted,
                    vm.fault_around_pages
                );
                let packed = match vm.swap_store_held_bytes {
                    held if held != vm.swap_store_bytes && vm.swap_store_bytes > 0 => {
                        format!(
                            ", holding {} KiB of guest pages, {:.1}x",
                            held >> 10,
                            held as f64 / vm.swap_store_bytes as f64
                        )
                    }
                    _ => String::new(),
                };
                outln!(
                    "  host memory: {} KiB backing, {} KiB in the swap store ({}{packed})",
                    vm.backing_bytes >> 10,
                    vm.swap_store_bytes >> 10,
                    if vm.swap_store_in_memory { "in memory" } else { "on disk" }
                );
                if vm.access_flag_faults > 0 {
                    outln!("  access-flag faults resolved at the core (no record): {}", vm.access_flag_faults);
                }
                for m in vm.memslots {
                    let flags = [(m.read_only, "read-only"), (m.dirty_log, "dirty-log")]
                        .iter()
                        .filter(|(on, _)| *on)
                        .map(|(_, n)| *n)
                        .collect::<Vec<_>>()
                        .join(",");
                    let flags = if flags.is_empty() { String::new() } else { format!(" {flags}") };
                    outln!(
                        "  memslot {}: gpa {:#x} size {:#x}{flags}, {} dirty pages",
                        m.id,
                        m.gpa,
                        m.size,
                        m.dirty_pages
                    );
                }
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
