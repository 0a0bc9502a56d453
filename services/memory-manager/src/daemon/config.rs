//! Daemon configuration: a TOML file, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The gRPC API's default port (on 127.0.0.1).
pub const DEFAULT_GRPC_PORT: u16 = 50_151;
/// The Prometheus endpoint's default port (on 127.0.0.1).
pub const DEFAULT_METRICS_PORT: u16 = 50_152;

use serde::Deserialize;

use super::priority::ApiPriority;
use crate::api::access::{GrpcAccess, GrpcTls};
use crate::attach::access::AttachAccess;
use crate::attach::admission::Limits;
use crate::memory::pressure::HostMemoryConfig;
use crate::memory::swap::SwapCompression;
use crate::observe::workingset::MonitorSettings;
use crate::policy::builtin::PolicyKind;
use crate::policy::host::PolicyTiming;

/// Log output format.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the daemon can be told.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Path of the attach socket (Unix SOCK_SEQPACKET).
    pub attach_socket: PathBuf,
    /// What must outlive the daemon: evicted pages (the swap store), each
    /// attached VM's description, the policy in force.
    pub state_dir: PathBuf,
    /// Where a new daemon binary asks this one to hand over every attached
    /// VM (`memory-manager --takeover PATH`); by default `takeover.sock`
    /// next to the attach socket.
    pub takeover_socket: Option<PathBuf>,
    /// Take every VM over from the daemon whose takeover socket this is,
    /// instead of binding the attach socket (an upgrade without a restart).
    #[serde(skip)]
    pub takeover_from: Option<PathBuf>,
    /// Address the gRPC API listens on. Plain TCP serves the read-only
    /// calls; with `[grpc_tls]`, every call to clients with a certificate.
    pub grpc_listen: SocketAddr,
    /// The gRPC Unix socket, which serves every call, those that change the
    /// daemon included; by default `grpc.sock` next to the attach socket.
    pub grpc_unix_socket: Option<PathBuf>,
    /// The gRPC Unix socket's file mode and group (`[grpc_access]`).
    pub grpc_access: GrpcAccess,
    /// Mutual TLS on the gRPC TCP listener (`[grpc_tls]`); none: plain TCP.
    pub grpc_tls: Option<GrpcTls>,
    /// Address of the Prometheus `/metrics` HTTP endpoint.
    pub metrics_listen: SocketAddr,
    /// The built-in policy in force.
    pub policy: PolicyKind,
    /// Longest spin of a service thread on its fault ring before it sleeps
    /// on the doorbell, in polls (0: sleep at once). The window adapts
    /// below it ([`faultline_attach::wait::Waiter`]).
    pub spin_polls: u32,
    /// Threads serving the fault rings of every VM (0: one per core the
    /// daemon may run on, from its CPU affinity and cgroup quota).
    pub service_threads: usize,
    /// Most of them that serve at once for load, the rest standing by for
    /// services that block (0: all of them when the daemon's cores are set
    /// apart, one fewer when it may run on every CPU, beside the vCPUs).
    pub serving_threads: usize,
    /// The service threads' nice value: below 0 they claim more of the
    /// CPU than a vCPU thread, and the machines' vCPUs that outnumber the
    /// cores pass the CPU instead of sleeping (at
    /// [`faultline_attach::priority::PASSING_MARGIN`] steps below the vCPU
    /// threads' nice; the default is that margin below 0). Needs
    /// CAP_SYS_NICE; without it they run at the daemon's own.
    pub service_nice: i32,
    /// Log format.
    pub log_format: LogFormat,
    /// tracing-subscriber filter, e.g. "info" or "memory_manager=debug".
    pub log_filter: String,
    /// Fault events kept for "last N" queries; also how far a follower may
    /// fall behind before it loses some.
    pub event_buffer: usize,
    /// Scheduling of the API threads (gRPC, metrics) against the fault path.
    pub api_priority: ApiPriority,
    /// Policy services: how long a policy has to connect, describe itself,
    /// send its first rules and answer each heartbeat (ms).
    pub policy_deadline_ms: u64,
    /// Policy services: how often a policy in force gets a heartbeat (ms).
    /// A policy that stops answering is dropped within
    /// `policy_heartbeat_ms + policy_deadline_ms`.
    pub policy_heartbeat_ms: u64,
    /// Policy services: how long a fault waits for a Consult answer (us).
    pub policy_consult_deadline_us: u64,
    /// Policy services: late consults in a row that drop the policy.
    pub policy_late_strikes: u32,
    /// Policy services: reconnect to a dropped policy when it is healthy
    /// again (a UsePolicy call may say otherwise).
    pub policy_reconnect: bool,
    /// Populate every guest page at attach (like QEMU's -mem-prealloc), so
    /// no fault pays for fresh backing.
    pub prefault: bool,
    /// How a VM's new swap store keeps reclaimed pages: `none` (a page per
    /// page) or `lz4` (compressed and packed, so a budget saves memory even
    /// with the state directory on tmpfs). A store a VM already has keeps
    /// its layout.
    pub swap_compression: SwapCompression,
    /// Admission limits (`[limits]`): a fresh attach that would pass one
    /// is refused with a status that names it.
    pub limits: Limits,
    /// Who may attach (`[attach_access]`): the attach socket's mode and
    /// group, and the uids and gids allowed.
    pub attach_access: AttachAccess,
    /// Host memory pressure (`[host_memory]`): the PSI file, the pressure
    /// at which fresh backing is limited, and the reserve still handed out.
    pub host_memory: HostMemoryConfig,
    /// The daemon's own `oom_score_adj` (-1000 to 1000), set at start: by
    /// default -900, so that under host memory pressure the OOM killer
    /// takes guests' processes before the daemon that serves all of them
    /// (its death stalls every guest until it is back). None leaves it as
    /// inherited.
    pub oom_score_adj: Option<i32>,
    /// Observe streams served at once (follow streams stay open); more get
    /// RESOURCE_EXHAUSTED. Each holds at most what its connection's flow
    /// control lets the daemon send ahead.
    pub max_observe_streams: usize,
    /// The working-set monitor (`[working_set]`): whether every VM is
    /// monitored, its sampling and aggregation intervals and region
    /// bounds. PolicyControl.SetWorkingSetMonitor changes it at run time.
    pub working_set: MonitorSettings,
}

impl Config {
    /// Service threads to start: as configured, or one per core the
    /// daemon may use (`available_parallelism` honours the affinity mask
    /// and the cgroup's CPU quota).
    pub fn service_threads(&self) -> usize {
        match self.service_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Service threads that serve at once for load: as configured, or all
    /// of them when the daemon is held to fewer CPUs than are online (its
    /// cores set apart from the vCPUs'), and one fewer (at least one)
    /// when it may run on every CPU: a pool thread on each core takes
    /// every core from the vCPUs its answers wake. Measured on 2 cores
    /// (docs/performance.md): at 64 vCPUs a p99 of 0.6-0.8 ms with one
    /// serving against 0.7-1.7 with two, at the same throughput.
    pub fn serving_threads(&self) -> usize {
        let threads = self.service_threads();
        match self.serving_threads {
            0 if faultline_attach::wait::held_to_fewer_cpus() => threads,
            0 => threads.saturating_sub(1).max(1),
            n => n.min(threads),
        }
    }

    /// The gRPC Unix socket.
    pub fn grpc_unix_socket(&self) -> PathBuf {
        self.grpc_unix_socket.clone().unwrap_or_else(|| self.attach_socket.with_file_name("grpc.sock"))
    }

    /// Where this daemon listens for a successor that takes over.
    pub fn takeover_socket(&self) -> PathBuf {
        self.takeover_socket.clone().unwrap_or_else(|| self.attach_socket.with_file_name("takeover.sock"))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            attach_socket: PathBuf::from("/run/faultline/attach.sock"),
            state_dir: PathBuf::from("/var/lib/faultline"),
            takeover_socket: None,
            takeover_from: None,
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_GRPC_PORT)),
            grpc_unix_socket: None,
            grpc_access: GrpcAccess::default(),
            grpc_tls: None,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT)),
            policy: PolicyKind::Default,
            spin_polls: 20_000,
            service_nice: faultline_attach::priority::PASSING_NICE,
            service_threads: 0,
            serving_threads: 0,
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            prefault: false,
            swap_compression: SwapCompression::None,
            limits: Limits::default(),
            attach_access: AttachAccess::default(),
            host_memory: HostMemoryConfig::default(),
            oom_score_adj: Some(-900),
            max_observe_streams: 256,
            working_set: MonitorSettings::default(),
            api_priority: ApiPriority::Low,
            event_buffer: 65_536,
            policy_deadline_ms: 100,
            policy_heartbeat_ms: 100,
            policy_consult_deadline_us: 2_000,
            policy_late_strikes: 3,
            policy_reconnect: false,
        }
    }
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The file is not valid configuration.
    #[error("invalid configuration in {path}: {cause}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        cause: toml::de::Error,
    },
}

impl Config {
    /// The policy watchdog's settings.
    pub fn policy_timing(&self) -> PolicyTiming {
        use std::time::Duration;
        PolicyTiming {
            deadline: Duration::from_millis(self.policy_deadline_ms),
            heartbeat: Duration::from_millis(self.policy_heartbeat_ms.max(1)),
            consult_deadline: Duration::from_micros(self.policy_consult_deadline_us),
            late_strikes: self.policy_late_strikes,
            reconnect: self.policy_reconnect,
        }
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.into(), cause })?;
        Self::from_toml(&text).map_err(|cause| ConfigError::Parse { path: path.into(), cause })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_in_deploy_parses() {
        let c = Config::from_toml(include_str!("../../../../deploy/memory-manager.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn serving_threads_leave_a_core_to_the_vcpus_unless_the_daemon_has_cores_apart() {
        let c = |service, serving| Config { service_threads: service, serving_threads: serving, ..Config::default() };
        let apart = faultline_attach::wait::held_to_fewer_cpus();
        assert_eq!(c(4, 0).serving_threads(), if apart { 4 } else { 3 });
        assert_eq!(c(1, 0).serving_threads(), 1, "at least one serves");
        assert_eq!(c(4, 2).serving_threads(), 2);
        assert_eq!(c(2, 5).serving_threads(), 2, "no more than there are");
        let toml = Config::from_toml("serving_threads = 1\nservice_threads = 3\n").unwrap();
        assert_eq!((toml.service_threads(), toml.serving_threads()), (3, 1));
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c = Config::from_toml(
            "attach_socket = \"/tmp/a.sock\"\npolicy = \"4k\"\nspin_polls = 0\nservice_threads = 3\n",
        )
        .unwrap();
        assert_eq!(c.attach_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.policy, PolicyKind::Pages4k);
        assert_eq!(c.spin_polls, 0);
        assert_eq!(c.service_threads(), 3);
        assert!(Config::default().service_threads() >= 1);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(Config::from_toml("atach_socket = \"/x\"").is_err());
        assert!(Config::from_toml("policy = \"largest\"").is_err());
    }
}
