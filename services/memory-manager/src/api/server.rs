//! The gRPC server: FaultTrace, Control and PolicyControl, with
//! grpc.health.v1 and server reflection (v1 and v1alpha), so `grpcurl` can
//! list and call everything; served on a Unix socket and on TCP. Calls that
//! change the daemon are served on TCP only with mutual TLS ([`access`]).

use std::net::SocketAddr;
use std::time::Duration;

use faultline_proto::v1::control_server::ControlServer;
use faultline_proto::v1::fault_trace_server::FaultTraceServer;
use faultline_proto::v1::policy_control_server::PolicyControlServer;
use faultline_proto::v1::working_set_server::WorkingSetServer;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::access::{GrpcAccess, Transport};
use super::control::ControlService;
use super::fault_trace::FaultTraceService;
use super::policy_control::PolicyControlService;
use super::sources::Sources;
use super::working_set::WorkingSetService;

/// Where and how gRPC is served.
pub struct Listeners {
    /// The TCP address.
    pub tcp: SocketAddr,
    /// Mutual TLS on TCP, if configured
    /// ([`GrpcTls::server_config`](super::access::GrpcTls::server_config)).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// The Unix socket.
    pub unix: std::path::PathBuf,
    /// The Unix socket's mode and group.
    pub unix_access: GrpcAccess,
}

/// Serves gRPC on `listeners` until `shutdown` is cancelled (follow streams
/// end then too, so the server stops promptly); sends the bound TCP address
/// to `bound` once listening.
pub async fn serve(
    sources: Sources,
    listeners: Listeners,
    shutdown: CancellationToken,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> anyhow::Result<()> {
    let tls = listeners.tls;
    let listener = bind(listeners.tcp, "gRPC", sources.lifecycle.took_over).await?;
    let local = listener.local_addr()?;
    let path = &listeners.unix;
    // A socket left by a daemon that did not exit cleanly is replaced, and
    // so is a predecessor's when taking over (new clients reach the new
    // daemon); anything else there is not.
    if std::fs::symlink_metadata(path).is_ok_and(|m| !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        anyhow::bail!("the gRPC Unix socket's path {} holds something else", path.display());
    }
    // In place only with its mode and group set ([grpc_access]).
    let unix_listener = faultline_attach::bind_prepared(
        path,
        |staged| {
            let listener = std::os::unix::net::UnixListener::bind(staged)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        },
        |staged| listeners.unix_access.apply(staged),
    )
    .and_then(tokio::net::UnixListener::from_std)
    .map_err(|e| anyhow::anyhow!("binding the gRPC Unix socket {} ([grpc_access]): {e}", path.display()))?;
    let ours = socket_identity(path)?;
    info!(path = %path.display(), "gRPC listening on Unix socket");
    let tcp_transport = match tls {
        Some(_) => Transport::MutualTls,
        None => Transport::plain_tcp(path),
    };
    info!(addr = %local, mutual_tls = tls.is_some(), "gRPC listening");
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FaultTraceServer<FaultTraceService>>().await;
    health.set_serving::<ControlServer<ControlService>>().await;
    health.set_serving::<PolicyControlServer<PolicyControlService>>().await;
    health.set_serving::<WorkingSetServer<WorkingSetService>>().await;
    let router = |transport: Transport,
                  tls: Option<tonic::transport::ServerTlsConfig>|
     -> anyhow::Result<tonic::transport::server::Router> {
        // Each version lists every service served, the other version included.
        // Only what is served: policy.proto also defines MemoryPolicy, which
        // policy services serve and the daemon calls.
        let reflection = || {
            [
                "faultline.v1.FaultTrace",
                "faultline.v1.Control",
                "faultline.v1.PolicyControl",
                "faultline.v1.WorkingSet",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
            .into_iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, name| b.with_service_name(name))
            .register_encoded_file_descriptor_set(faultline_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = reflection()
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let control = ControlService::new(sources.vms.clone(), transport.clone());
        let service = FaultTraceService::new(sources.clone(), shutdown.clone());
        let working_set = WorkingSetService::new(sources.vms.clone(), shutdown.clone());
        let policy = PolicyControlService::new(sources.policies.clone(), sources.monitor.clone(), transport);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        Ok(builder
            .add_service(health_service.clone())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(FaultTraceServer::new(service))
            .add_service(ControlServer::new(control))
            .add_service(PolicyControlServer::new(policy))
            .add_service(WorkingSetServer::new(working_set)))
    };
    let stopped = |t: CancellationToken| async move { t.cancelled().await };
    let tcp =
        router(tcp_transport, tls)?.serve_with_incoming_shutdown(tcp_incoming(listener), stopped(shutdown.clone()));
    let uds = router(Transport::UnixSocket, None)?
        .serve_with_incoming_shutdown(UnixListenerStream::new(unix_listener), stopped(shutdown.clone()));
    let _ = bound.send(local);
    let served = tokio::try_join!(tcp, uds).map(|_| ());
    // Only if it is still ours: a daemon that took over may have bound
    // its own socket at the same path by now.
    if socket_identity(path).ok() == Some(ours) {
        let _ = std::fs::remove_file(path);
    }
    served?;
    Ok(())
}

/// Connections accepted on `listener`, with Nagle off: HTTP/2 writes its
/// frames in small segments, and with Nagle each waits for the client's
/// delayed ACK (40 ms per call or connection setup). tonic sets this only
/// for listeners it binds itself.
fn tcp_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The device and inode of the socket file at `path`.
fn socket_identity(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))
}

/// How long a daemon that takes over waits for its predecessor to let go
/// of a port: it binds its ports while the old daemon still serves them.
const BIND_PATIENCE: Duration = Duration::from_secs(10);

/// Binds `addr` (the `what` listen address); a daemon that takes over
/// (`patient`) waits up to [`BIND_PATIENCE`] for its predecessor to let go.
pub async fn bind(addr: SocketAddr, what: &str, patient: bool) -> anyhow::Result<tokio::net::TcpListener> {
    let started = tokio::time::Instant::now();
    let mut said = false;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && patient && started.elapsed() < BIND_PATIENCE => {
                if !said {
                    tracing::info!(%addr, "{what} address still the old daemon's; waiting for it to let go");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
                "{what} address {addr} is in use (another memory-manager? `--takeover` replaces a running one)"
            ),
            Err(e) => return Err(anyhow::Error::from(e).context(format!("{what} address {addr}"))),
        }
    }
}
