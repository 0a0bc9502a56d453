//! The daemon: the one place every layer is wired together. It builds the
//! shared state (the VM table, the event history, the policy host), starts
//! the attach server on its own thread and the API on the async runtime,
//! and stops them in order.

pub mod config;
pub mod notify;
pub mod oom;
pub mod priority;

use crate::memory::pressure::HostMemory;
use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::sources::{Lifecycle, Sources};
use crate::api::streams::StreamLimit;
use crate::attach::connection::{AttachServer, AttachSettings};
use crate::attach::registry::VmTable;
use crate::link::pool::ServicePool;
use crate::observe::hub::EventHub;
use crate::observe::workingset::SharedSettings;
use crate::policy::host::PolicyHost;
use config::Config;
use faultline_attach::doorbell::WaitPolicy;

/// The daemon's state and its parts.
pub struct Daemon {
    config: Config,
    sources: Sources,
    attach: AttachServer,
    running: RunningMarker,
}

impl Daemon {
    /// A daemon with `config`; starts the policy host's thread (call from a
    /// thread at the fault path's priority).
    pub fn new(config: Config) -> std::io::Result<Self> {
        config.working_set.validated().map_err(|e| std::io::Error::other(format!("[working_set]: {e}")))?;
        std::fs::create_dir_all(&config.state_dir)?;
        let running = RunningMarker::create(&config.state_dir)?;
        let state_file = Some(config.state_dir.join("policy"));
        let policies = Arc::new(PolicyHost::new(config.policy.build(), config.policy_timing(), state_file)?);
        // The policy a previous daemon had goes back in force, as it was
        // asked for (reconnecting or not).
        policies.resume();
        let wait = WaitPolicy { spin_polls: config.spin_polls, sleep_slice: std::time::Duration::from_millis(500) };
        let (threads, serving) = (config.service_threads(), config.serving_threads());
        let pool = Arc::new(ServicePool::start_weighted(threads, serving, wait, config.service_nice)?);
        let sources = Sources {
            lifecycle: Lifecycle {
                recovered_after_crash: running.predecessor_crashed && config.takeover_from.is_none(),
                took_over: config.takeover_from.is_some(),
            },
            vms: Arc::new(VmTable::default()),
            events: Arc::new(EventHub::new(config.event_buffer)),
            policies,
            pool,
            streams: Arc::new(StreamLimit::new(config.max_observe_streams)),
            host: Arc::new(HostMemory::new(config.host_memory.reserve_mib << 20)),
            monitor: Arc::new(SharedSettings::new(config.working_set)),
        };
        let settings = AttachSettings {
            prefault: config.prefault,
            swap_compression: config.swap_compression,
            limits: config.limits,
            access: config.attach_access.clone(),
            spin_polls: config.spin_polls,
            state_dir: config.state_dir.clone(),
            takeover_socket: Some(config.takeover_socket()),
        };
        let attach = AttachServer::new(
            sources.vms.clone(),
            sources.policies.clone(),
            sources.events.clone(),
            sources.pool.clone(),
            sources.host.clone(),
            sources.monitor.clone(),
            settings,
        );
        Ok(Self { config, sources, attach, running })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the API serves.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }
}

/// How long shutdown waits for gRPC clients to disconnect.
const GRPC_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs the daemon until `shutdown` completes, then stops serving, detaches
/// every VM, ends gRPC streams and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Anchored now, the fault clock's rate is estimated over the time
    // until the first fault, which then waits for nothing.
    crate::fault::clock::start();
    // Before anything listens: a daemon that cannot serve TLS as told
    // must not take VMs first.
    let grpc_tls = config.grpc_tls.as_ref().map(crate::api::access::GrpcTls::server_config).transpose()?;
    let daemon = Arc::new(Daemon::new(config)?);
    info!(
        policy = daemon.sources.policies.load().policy.name(),
        socket = %daemon.config().attach_socket.display(),
        service_threads = daemon.sources.pool.threads(),
        serving_threads = daemon.sources.pool.serving_limit(),
        service_nice = daemon.config().service_nice,
        "memory-manager starting"
    );
    if let Some(e) = daemon.sources.pool.weighting() {
        tracing::warn!(
            service_nice = daemon.config().service_nice,
            cause = %e,
            "service threads stay at the daemon's priority (raising it needs CAP_SYS_NICE): \
             vCPUs that outnumber the cores sleep rather than pass the CPU"
        );
    }
    if let Some(adj) = daemon.config().oom_score_adj {
        if let Err(e) = oom::set_oom_score_adj(adj) {
            tracing::warn!(oom_score_adj = adj, cause = %e, "cannot set the daemon's oom_score_adj (needs CAP_SYS_RESOURCE to lower it)");
        }
    }
    crate::memory::pressure::watch(daemon.sources.host.clone(), &daemon.config().host_memory)?;
    if let Some(dir) = daemon.config().attach_socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if daemon.sources.lifecycle.recovered_after_crash {
        info!("the previous daemon did not stop cleanly: VMs that come back are re-attached");
    }
    // The attach server and every thread it starts (connections, vCPU
    // service, control) run on a plain thread: they must not inherit the
    // API threads' lower priority.
    let attach = {
        let daemon = daemon.clone();
        let path = daemon.config().attach_socket.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("attach".into()).spawn(move || {
            let served = match &daemon.config().takeover_from {
                Some(from) => crate::attach::takeover::take_over(from)
                    .map_err(std::io::Error::other)
                    .and_then(|taken| daemon.attach.serve(&path, Some(taken))),
                None => daemon.attach.serve(&path, None),
            };
            let _ = done_tx.send(served);
        })?;
        done_rx
    };
    // The event history's slots are made off the fault path, once a
    // restart's re-attaches are done with the CPU.
    {
        let events = daemon.sources.events.clone();
        std::thread::Builder::new().name("history".into()).spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(1));
            events.prefill();
        })?;
    }
    let grpc_stop = CancellationToken::new();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let listeners = crate::api::server::Listeners {
        tcp: daemon.config().grpc_listen,
        tls: grpc_tls,
        unix: daemon.config().grpc_unix_socket(),
        unix_access: daemon.config().grpc_access.clone(),
    };
    let grpc = tokio::spawn(crate::api::server::serve(daemon.sources.clone(), listeners, grpc_stop.clone(), bound_tx));
    let (metrics_tx, metrics_rx) = tokio::sync::oneshot::channel();
    let metrics = tokio::spawn(crate::api::metrics::serve(
        daemon.sources.clone(),
        daemon.config().metrics_listen,
        grpc_stop.clone(),
        metrics_tx,
    ));
    tokio::pin!(attach, grpc, metrics);
    // Ready once both listeners are up: the gRPC server reports its bound
    // address, the attach socket exists once listening.
    let ready = async {
        if bound_rx.await.is_err() || metrics_rx.await.is_err() {
            // A server failed to bind: never ready (run() reports why).
            std::future::pending::<()>().await;
        }
        while !daemon.config().attach_socket.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if let Err(e) = notify::notify("READY=1") {
            tracing::warn!(cause = %e, "systemd readiness notification failed");
        }
        std::future::pending::<()>().await
    };
    tokio::pin!(ready);
    let (mut attach_done, mut grpc_done, mut metrics_done) = (None, None, None);
    tokio::select! {
        _ = &mut ready => unreachable!("readiness never completes"),
        _ = shutdown => info!("shutdown requested"),
        res = &mut attach => attach_done = Some(res.map_err(anyhow::Error::from).and_then(|r| r.map_err(anyhow::Error::from))),
        res = &mut grpc => grpc_done = Some(res.map_err(anyhow::Error::from).and_then(|r| r)),
        res = &mut metrics => metrics_done = Some(res.map_err(anyhow::Error::from).and_then(|r| r)),
    }
    let _ = notify::notify("STOPPING=1");
    daemon.attach.stop();
    grpc_stop.cancel();
    let attach_res = match attach_done {
        Some(r) => r,
        None => attach.await.map_err(anyhow::Error::from).and_then(|r| r.map_err(anyhow::Error::from)),
    };
    let grpc_res = match grpc_done {
        Some(r) => r,
        // Graceful shutdown waits for clients to close their connections; a
        // client that never does (or cannot, because it is blocked) must not
        // keep the daemon alive.
        None => match tokio::time::timeout(GRPC_DRAIN, &mut grpc).await {
            Ok(r) => r.map_err(anyhow::Error::from).and_then(|r| r),
            Err(_) => {
                tracing::warn!(after = ?GRPC_DRAIN, "gRPC clients still connected at shutdown; closing them");
                grpc.abort();
                Ok(())
            }
        },
    };
    let metrics_res = match metrics_done {
        Some(r) => r,
        // No long-lived requests: it stops at once, or is closed.
        None => match tokio::time::timeout(GRPC_DRAIN, &mut metrics).await {
            Ok(r) => r.map_err(anyhow::Error::from).and_then(|r| r),
            Err(_) => {
                metrics.abort();
                Ok(())
            }
        },
    };
    attach_res.and(grpc_res).and(metrics_res.map_err(|e| e.context("metrics endpoint")))?;
    daemon.running.remove();
    info!("memory-manager stopped");
    Ok(())
}

/// `state_dir/running`: there while a daemon runs, removed when it stops
/// cleanly; a daemon that finds one is the successor of one that died.
struct RunningMarker {
    path: std::path::PathBuf,
    predecessor_crashed: bool,
}

impl RunningMarker {
    fn create(state_dir: &std::path::Path) -> std::io::Result<Self> {
        let path = state_dir.join("running");
        let predecessor_crashed = path.exists();
        std::fs::write(&path, Self::mine())?;
        Ok(Self { path, predecessor_crashed })
    }

    fn mine() -> String {
        format!("{}\n", std::process::id())
    }

    /// Removes the marker if it is still this daemon's (a successor that
    /// took over wrote its own).
    fn remove(&self) {
        if std::fs::read_to_string(&self.path).is_ok_and(|m| m == Self::mine()) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(cause = %e, "removing the running marker failed");
            }
        }
    }
}
