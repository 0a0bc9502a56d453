//! `memory-manager`: parse flags, set up logging, run the daemon until
//! SIGTERM or SIGINT.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use memory_manager::daemon::config::LogFormat;
use memory_manager::policy::builtin::PolicyKind;
use memory_manager::Config;
use tokio::signal::unix::{signal, SignalKind};

/// Faultline memory-manager daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Attach socket path (overrides the file).
    #[arg(long)]
    attach_socket: Option<PathBuf>,
    /// State directory: the swap store, attached VMs, the policy in force
    /// (overrides the file).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Takeover socket this daemon offers its successor (overrides the file).
    #[arg(long)]
    takeover_socket: Option<PathBuf>,
    /// Take every VM over from the running daemon at this takeover socket
    /// (an upgrade: the machines keep their connections).
    #[arg(long, value_name = "TAKEOVER_SOCKET")]
    takeover: Option<PathBuf>,
    /// gRPC listen address, e.g. 127.0.0.1:50151 (overrides the file).
    #[arg(long)]
    grpc_listen: Option<std::net::SocketAddr>,
    /// The gRPC Unix socket, which serves every call (default: grpc.sock
    /// next to the attach socket; overrides the file).
    #[arg(long)]
    grpc_unix_socket: Option<PathBuf>,
    /// Prometheus /metrics listen address, e.g. 127.0.0.1:50152 (overrides the file).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Built-in policy (overrides the file).
    #[arg(long)]
    policy: Option<PolicyKind>,
    /// Longest spin on a fault ring before sleeping on its doorbell, in
    /// polls (0: never spin; the window adapts below it; overrides the file).
    #[arg(long)]
    spin_polls: Option<u32>,
    /// The service threads' nice value, -20 to 19 (default -10: they keep
    /// their turns against vCPU threads that pass the CPU; needs
    /// CAP_SYS_NICE; overrides the file).
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    service_nice: Option<i32>,
    /// Threads serving the fault rings of every VM (default: one per core
    /// the daemon may run on; overrides the file).
    #[arg(long)]
    service_threads: Option<usize>,
    /// Most service threads that serve at once for load, the rest standing
    /// by for services that block (default: all of them when the daemon is
    /// held to fewer CPUs than are online, else one fewer; overrides the file).
    #[arg(long)]
    serving_threads: Option<usize>,
    /// Log format (overrides the file).
    #[arg(long)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. "debug" (overrides the file and RUST_LOG).
    #[arg(long)]
    log_filter: Option<String>,
    /// Fault events kept for "last N" queries (overrides the file).
    #[arg(long)]
    event_buffer: Option<usize>,
    /// Observe streams served at once; more get RESOURCE_EXHAUSTED
    /// (overrides the file).
    #[arg(long)]
    max_observe_streams: Option<usize>,
    /// Scheduling of the gRPC/metrics threads: normal, low (nice 19) or idle
    /// (SCHED_IDLE) (overrides the file).
    #[arg(long)]
    api_priority: Option<memory_manager::daemon::priority::ApiPriority>,
    /// Policy services: deadline for connecting, Describe, the first rules
    /// and each heartbeat, ms (overrides the file).
    #[arg(long)]
    policy_deadline_ms: Option<u64>,
    /// Policy services: heartbeat interval, ms (overrides the file).
    #[arg(long)]
    policy_heartbeat_ms: Option<u64>,
    /// Populate all guest memory at attach: every page allocated and written
    /// (zeros) before the first fault (overrides the file).
    #[arg(long)]
    prefault: bool,
    /// How new swap stores keep reclaimed pages: none or lz4 (overrides the
    /// file).
    #[arg(long)]
    swap_compression: Option<memory_manager::memory::swap::SwapCompression>,
    /// The daemon's oom_score_adj, -1000 to 1000 (overrides the file).
    #[arg(long, allow_negative_numbers = true)]
    oom_score_adj: Option<i32>,
}

fn main() -> std::process::ExitCode {
    faultline_exit_status::exit_status(env!("CARGO_BIN_NAME"), run())
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path).context("loading configuration")?,
        None => Config::default(),
    };
    if let Some(v) = args.attach_socket {
        config.attach_socket = v;
    }
    if let Some(v) = args.state_dir {
        config.state_dir = v;
    }
    if let Some(v) = args.takeover_socket {
        config.takeover_socket = Some(v);
    }
    config.takeover_from = args.takeover;
    if let Some(v) = args.grpc_listen {
        config.grpc_listen = v;
    }
    if let Some(v) = args.grpc_unix_socket {
        config.grpc_unix_socket = Some(v);
    }
    if let Some(v) = args.metrics_listen {
        config.metrics_listen = v;
    }
    if let Some(v) = args.max_observe_streams {
        config.max_observe_streams = v;
    }
    if let Some(v) = args.event_buffer {
        config.event_buffer = v;
    }
    if let Some(v) = args.api_priority {
        config.api_priority = v;
    }
    if let Some(v) = args.policy_deadline_ms {
        config.policy_deadline_ms = v;
    }
    if let Some(v) = args.policy_heartbeat_ms {
        config.policy_heartbeat_ms = v;
    }
    if let Some(v) = args.policy {
        config.policy = v;
    }
    if let Some(v) = args.spin_polls {
        config.spin_polls = v;
    }
    if let Some(v) = args.service_nice {
        config.service_nice = v;
    }
    if let Some(v) = args.service_threads {
        config.service_threads = v;
    }
    if let Some(v) = args.serving_threads {
        config.serving_threads = v;
    }
    if args.prefault {
        config.prefault = true;
    }
    if let Some(v) = args.swap_compression {
        config.swap_compression = v;
    }
    if let Some(v) = args.oom_score_adj {
        config.oom_score_adj = Some(v);
    }
    if let Some(v) = args.log_format {
        config.log_format = v;
    }
    let filter =
        args.log_filter.or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| config.log_filter.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }
    // The fault path's threads start from main (normal priority); the
    // runtime's threads serve the API and are scheduled below them.
    let api_priority = config.api_priority;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api")
        .on_thread_start(move || {
            if let Err(e) = memory_manager::daemon::priority::apply_to_current_thread(api_priority) {
                tracing::warn!(cause = %e, ?api_priority, "cannot lower the API threads' priority");
            }
        })
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        memory_manager::run(config, shutdown).await
    })
}
