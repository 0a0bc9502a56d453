//! systemd readiness notification (sd_notify): "READY=1" to the datagram
//! socket named by `$NOTIFY_SOCKET`, once the attach socket and the gRPC
//! API are listening, and "STOPPING=1" at shutdown. Without the variable
//! (not started by systemd) it does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` to systemd if the daemon runs under it; returns whether a
/// notification was sent.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket address.
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), path)?;
    }
    Ok(true)
}
