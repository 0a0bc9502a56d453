//! Reaching the daemon's gRPC API: an [`Address`] (`unix:PATH`,
//! `http://HOST:PORT`, or `https://HOST:PORT` with mutual TLS) and
//! [`connect`], which every client (the CLI, the QEMU launcher, the tests)
//! shares.
//!
//! The daemon serves every call on its Unix socket, and on TCP only the
//! read-only ones unless TCP has mTLS; see docs/operations.md.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// The daemon's gRPC Unix socket where a packaged daemon puts it (next to
/// its attach socket, `/run/faultline/attach.sock`).
pub const DEFAULT_UNIX_SOCKET: &str = "/run/faultline/grpc.sock";

/// The daemon's default TCP address.
pub const DEFAULT_TCP: &str = "http://127.0.0.1:50151";

/// Where the daemon's gRPC API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// Its Unix socket: every call, mutating ones included.
    Unix(PathBuf),
    /// TCP: `http://` (read-only calls) or `https://` (mutual TLS).
    Tcp(Uri),
}

/// An address that is none of `unix:PATH`, `http://..`, `https://..`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a daemon address: unix:PATH, http://HOST:PORT or https://HOST:PORT")]
pub struct BadAddress(String);

impl FromStr for Address {
    type Err = BadAddress;

    fn from_str(s: &str) -> Result<Self, BadAddress> {
        let bad = || BadAddress(s.to_string());
        if let Some(path) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            return match path.is_empty() {
                true => Err(bad()),
                false => Ok(Self::Unix(PathBuf::from(path))),
            };
        }
        let uri: Uri = s.parse().map_err(|_| bad())?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(_)) => Ok(Self::Tcp(uri)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(uri) => write!(f, "{}", uri.to_string().trim_end_matches('/')),
        }
    }
}

impl Address {
    /// The address a client uses when told none: the Unix socket at
    /// [`DEFAULT_UNIX_SOCKET`] if it exists, else [`DEFAULT_TCP`].
    pub fn default_for_host() -> Self {
        match Path::new(DEFAULT_UNIX_SOCKET).exists() {
            true => Self::Unix(PathBuf::from(DEFAULT_UNIX_SOCKET)),
            false => DEFAULT_TCP.parse().expect("the default TCP address parses"),
        }
    }

    /// Whether this address is TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tcp(uri) if uri.scheme_str() == Some("https"))
    }
}

/// A client's TLS settings for an `https://` address: the CA that signed
/// the daemon's certificate and, for mutual TLS, this client's own.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// PEM of the CA that signed the daemon's certificate.
    pub ca: Option<PathBuf>,
    /// PEM of this client's certificate (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM of this client's private key.
    pub key: Option<PathBuf>,
}

/// Why the daemon could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A TLS file could not be read.
    #[error("cannot read {what} {path}: {cause}")]
    ReadTls {
        /// Which file (CA, certificate, key).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// TLS settings for an address that is not `https://`, or a
    /// certificate without its key.
    #[error("{0}")]
    TlsSettings(&'static str),
    /// The connection failed.
    #[error("cannot reach the daemon at {address}: {cause} (is memory-manager running? --server)")]
    Unreachable {
        /// Where it was looked for.
        address: Address,
        /// What failed, with its causes.
        cause: String,
    },
}

/// The causes of `e`, innermost last, joined with ": ".
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        source = s.source();
    }
    text
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|cause| ConnectError::ReadTls { what, path: path.to_path_buf(), cause })
}

impl ClientTls {
    /// Whether any TLS setting is given.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    fn config(&self) -> Result<ClientTlsConfig, ConnectError> {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(Certificate::from_pem(read("CA certificate", ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(read("certificate", cert)?, read("key", key)?));
            }
            (None, None) => {}
            _ => {
                return Err(ConnectError::TlsSettings("a client certificate needs its key, and a key its certificate"))
            }
        }
        Ok(config)
    }
}

/// Connects to the daemon at `address`; `tls` applies to `https://` only.
pub async fn connect(address: &Address, tls: &ClientTls) -> Result<Channel, ConnectError> {
    let unreachable =
        |e: tonic::transport::Error| ConnectError::Unreachable { address: address.clone(), cause: causes(&e) };
    match address {
        Address::Unix(path) => {
            if tls.is_set() {
                return Err(ConnectError::TlsSettings("TLS settings are for https:// addresses, not a Unix socket"));
            }
            let path = path.clone();
            // The URI is not used: every connection goes to the socket.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(unreachable)
        }
        Address::Tcp(uri) => {
            let mut endpoint = Endpoint::from(uri.clone());
            match (address.is_tls(), tls.is_set()) {
                (true, _) => endpoint = endpoint.tls_config(tls.config()?).map_err(unreachable)?,
                (false, true) => {
                    return Err(ConnectError::TlsSettings("TLS settings need an https:// address"));
                }
                (false, false) => {}
            }
            endpoint.connect().await.map_err(unreachable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        for text in ["unix:/run/faultline/grpc.sock", "http://127.0.0.1:50151", "https://daemon.example:443"] {
            let address: Address = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
        }
        assert_eq!("unix:///tmp/g.sock".parse::<Address>().unwrap(), Address::Unix("/tmp/g.sock".into()));
        assert!("https://h:1".parse::<Address>().unwrap().is_tls());
        assert!(!"http://h:1".parse::<Address>().unwrap().is_tls());
        for bad in ["unix:", "127.0.0.1:50151", "ftp://h:1", "", "http://"] {
            let e = bad.parse::<Address>().unwrap_err();
            assert!(e.to_string().contains("unix:PATH"), "{bad:?}: {e}");
        }
    }

    #[tokio::test]
    async fn an_absent_socket_is_reported_with_what_to_do() {
        let address = Address::Unix("/nonexistent/grpc.sock".into());
        let e = connect(&address, &ClientTls::default()).await.unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("cannot reach the daemon at unix:/nonexistent/grpc.sock: "), "{text}");
        assert!(text.contains("No such file") && text.ends_with("(is memory-manager running? --server)"), "{text}");
        let tls = ClientTls { cert: Some("c.pem".into()), ..ClientTls::default() };
        let e = connect(&"https://h:1".parse().unwrap(), &tls).await.unwrap_err();
        assert!(matches!(e, ConnectError::TlsSettings(_)), "{e}");
    }
}
