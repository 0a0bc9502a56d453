//! Who may change the daemon over gRPC. Mutating calls (`PolicyControl`'s
//! UsePolicy and UseDefault, `Control.GetDirtyLog` that clears,
//! `Control.GetAccessLog`) are served
//! only where the transport vouches for the caller:
//! - the Unix socket, whose file mode and group decide who can connect
//!   (containerd's `grpc.uid/gid`);
//! - TCP with mutual TLS, whose clients hold a certificate the configured
//!   CA signed.
//!
//! Plain TCP serves observation only; a mutating call there gets
//! `PERMISSION_DENIED` naming where to make it instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::Status;

/// `[grpc_access]` in the config file: the gRPC Unix socket's file mode and
/// group.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcAccess {
    /// The socket's file mode (connecting needs write permission).
    pub socket_mode: u32,
    /// The socket's group (a gid); none: the daemon's.
    pub socket_gid: Option<u32>,
}

impl Default for GrpcAccess {
    fn default() -> Self {
        Self { socket_mode: 0o660, socket_gid: None }
    }
}

impl GrpcAccess {
    /// Gives the socket at `path` its mode and group.
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        crate::attach::access::set_socket_access(path, self.socket_mode, self.socket_gid)
    }
}

/// `[grpc_tls]` in the config file: mutual TLS on the TCP listener. With
/// it, TCP serves only clients whose certificate `client_ca` signed, and
/// serves them every call.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrpcTls {
    /// PEM: the daemon's certificate (chain).
    pub cert: PathBuf,
    /// PEM: the daemon's private key.
    pub key: PathBuf,
    /// PEM: the CA whose client certificates are accepted.
    pub client_ca: PathBuf,
}

/// Why `[grpc_tls]` could not be used.
#[derive(Debug, thiserror::Error)]
#[error("grpc_tls: cannot read {path}: {cause}")]
pub struct TlsFileError {
    /// The file.
    pub path: PathBuf,
    /// The I/O error.
    pub cause: std::io::Error,
}

impl GrpcTls {
    /// The server's TLS configuration: its identity, and client
    /// certificates required and checked against `client_ca`.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsFileError> {
        let read = |path: &PathBuf| std::fs::read(path).map_err(|cause| TlsFileError { path: path.clone(), cause });
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
            .client_ca_root(Certificate::from_pem(read(&self.client_ca)?)))
    }
}

/// How a listener's callers reached it, which decides whether they may
/// mutate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The Unix socket.
    UnixSocket,
    /// TCP with a client certificate the configured CA signed.
    MutualTls,
    /// Plain TCP: anyone who can reach the port; `unix_socket` is where
    /// mutating calls are served instead.
    PlainTcp {
        /// The daemon's gRPC Unix socket.
        unix_socket: Arc<Path>,
    },
}

impl Transport {
    /// Plain TCP, with mutations sent to `unix_socket`.
    pub fn plain_tcp(unix_socket: &Path) -> Self {
        Self::PlainTcp { unix_socket: Arc::from(unix_socket) }
    }

    /// `Ok` if `call` (one that changes the daemon) may be served here;
    /// otherwise `PERMISSION_DENIED` saying where it is served.
    pub fn permit_mutation(&self, call: &str) -> Result<(), Status> {
        match self {
            Self::UnixSocket | Self::MutualTls => Ok(()),
            Self::PlainTcp { unix_socket } => Err(Status::permission_denied(format!(
                "{call} changes the daemon and plain TCP serves observation only: call it on the Unix socket \
                 unix:{} or over TCP with mutual TLS ([grpc_tls])",
                unix_socket.display()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn only_plain_tcp_is_refused_mutations_and_the_refusal_says_where_to_go() {
        assert!(Transport::UnixSocket.permit_mutation("UsePolicy").is_ok());
        assert!(Transport::MutualTls.permit_mutation("UsePolicy").is_ok());
        let denied = Transport::plain_tcp(Path::new("/run/faultline/grpc.sock")).permit_mutation("UsePolicy");
        let status = denied.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().starts_with("UsePolicy changes the daemon"), "{}", status.message());
        assert!(status.message().contains("unix:/run/faultline/grpc.sock"), "{}", status.message());
    }

    #[test]
    fn the_socket_gets_its_mode_and_tls_files_are_named_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grpc.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        GrpcAccess { socket_mode: 0o600, socket_gid: None }.apply(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let tls = GrpcTls { cert: dir.path().join("absent.pem"), key: path.clone(), client_ca: path.clone() };
        let e = tls.server_config().unwrap_err();
        assert!(e.to_string().contains("absent.pem"), "{e}");
    }
}
