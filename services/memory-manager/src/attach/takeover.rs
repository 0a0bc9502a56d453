//! Takeover: a running daemon hands its attach socket and every attached VM
//! (the machine's connection, its description and its fds) to a new daemon
//! binary, which takes each VM back as a re-attach (rebuilt from the core)
//! over the same connection. Machines never reconnect; a faulting vCPU sees
//! a stall. Envoy's hot restart passes listening sockets the same way, over
//! a Unix socket between the two processes.
//!
//! The exchange, on the old daemon's takeover socket (`attach-protocol.md`):
//! TAKEOVER (new to old); HANDOVER_LISTENER with the attach socket's fd;
//! one HANDOVER_VM per VM (the attach request's payload; fds: the
//! connection, then the request's fds); HANDOVER_DONE with the count.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use faultline_attach::{
    decode_header, encode_message, recv_message, send_message, set_recv_timeout, AttachRequest, MsgKind,
};
use tracing::{info, warn};

/// How long the new daemon waits for each message of the handover.
const HANDOVER_PATIENCE: Duration = Duration::from_secs(30);

/// What the old daemon handed over.
#[derive(Debug)]
pub struct Handover {
    /// The attach socket's listening fd.
    pub listener: OwnedFd,
    /// The VMs, each to be taken back.
    pub vms: Vec<HandedVm>,
}

/// One VM handed over.
#[derive(Debug)]
pub struct HandedVm {
    /// The machine's connection.
    pub conn: OwnedFd,
    /// The description it attached with.
    pub request: AttachRequest,
    /// The request's fds.
    pub fds: Vec<OwnedFd>,
}

/// Why a takeover failed (nothing was handed over, or the old daemon died
/// mid-way: its VMs re-attach on their own).
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The old daemon's takeover socket did not answer.
    #[error("the running daemon's takeover socket {0}: {1}")]
    Connect(String, std::io::Error),
    /// The exchange broke off or carried something else.
    #[error("the takeover broke off: {0}")]
    Protocol(String),
}

/// New daemon side: asks the daemon at `path` for everything and receives it.
pub fn take_over(path: &Path) -> Result<Handover, TakeoverError> {
    let conn = faultline_attach::connect(path).map_err(|e| TakeoverError::Connect(path.display().to_string(), e))?;
    // The old daemon drains first (a reclaim under way finishes, a result
    // is waited for at most a second): a daemon that says nothing for this
    // long is not handing over.
    let _ = set_recv_timeout(conn.as_fd(), HANDOVER_PATIENCE);
    let broke = |what: String| TakeoverError::Protocol(what);
    send_message(conn.as_fd(), &encode_message(MsgKind::Takeover, &[]), &[]).map_err(|e| broke(e.to_string()))?;
    let mut listener = None;
    let mut vms = Vec::new();
    loop {
        let msg = recv_message(conn.as_fd())
            .map_err(|e| broke(e.to_string()))?
            .ok_or_else(|| broke("the running daemon hung up".into()))?;
        let (kind, payload) = decode_header(&msg.bytes).map_err(|e| broke(e.to_string()))?;
        let mut fds = msg.fds.into_iter();
        match kind {
            MsgKind::HandoverListener => {
                listener = Some(fds.next().ok_or_else(|| broke("no listener fd".into()))?);
            }
            MsgKind::HandoverVm => {
                let request = AttachRequest::decode(payload).map_err(|e| broke(e.to_string()))?;
                let conn = fds.next().ok_or_else(|| broke("a VM without its connection".into()))?;
                vms.push(HandedVm { conn, request, fds: fds.collect() });
            }
            MsgKind::HandoverDone => break,
            other => return Err(broke(format!("unexpected {other:?}"))),
        }
    }
    let listener = listener.ok_or_else(|| broke("no listener handed over".into()))?;
    info!(vms = vms.len(), "took over from the running daemon");
    Ok(Handover { listener, vms })
}

/// Old daemon side: where connection threads send their VM.
#[derive(Debug)]
pub struct HandoverSink {
    conn: Mutex<OwnedFd>,
}

impl HandoverSink {
    /// A sink over the new daemon's takeover connection.
    pub fn new(conn: OwnedFd) -> Self {
        Self { conn: Mutex::new(conn) }
    }

    fn send(&self, kind: MsgKind, payload: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        send_message(conn.as_fd(), &encode_message(kind, payload), fds)
    }

    /// Hands over the attach socket.
    pub fn listener(&self, listener: BorrowedFd<'_>) -> std::io::Result<()> {
        self.send(MsgKind::HandoverListener, &[], &[listener])
    }

    /// Hands over one VM.
    pub fn vm(&self, conn: &OwnedFd, request: &AttachRequest, fds: &[OwnedFd]) -> std::io::Result<()> {
        let payload = &request.encode()[faultline_attach::HEADER_LEN..];
        let all: Vec<BorrowedFd<'_>> = std::iter::once(conn.as_fd()).chain(fds.iter().map(|f| f.as_fd())).collect();
        self.send(MsgKind::HandoverVm, payload, &all)
    }

    /// Ends the handover.
    pub fn done(&self, vms: u32) {
        if let Err(e) = self.send(MsgKind::HandoverDone, &vms.to_le_bytes(), &[]) {
            warn!(cause = %e, "ending the handover failed");
        }
    }
}

/// Whether `conn` (a takeover socket connection) asks for a takeover.
pub fn asks_for_takeover(conn: &OwnedFd) -> bool {
    let _ = set_recv_timeout(conn.as_fd(), Duration::from_secs(5));
    matches!(
        recv_message(conn.as_fd()).ok().flatten().and_then(|m| decode_header(&m.bytes).ok().map(|(k, _)| k)),
        Some(MsgKind::Takeover)
    )
}
