//! The machine's connection to its daemon, which outlives the daemon: when
//! the daemon goes away the guest keeps running (a faulting vCPU waits on
//! its ring) and the machine re-attaches to the socket with backoff, with
//! the `REATTACH` flag and the same description and fds, until a
//! configurable deadline. Each stall (from losing the daemon to its
//! successor accepting the VM) is counted. Both machines (`sim-machine`,
//! `qemu-machine`) keep their VM's connection with a [`Session`].
//!
//! Before it re-attaches, the machine lets its core execute every command
//! the dead daemon left on the rings (the caller's `settled` says when): a
//! command executed after the successor rebuilt its records would change
//! the tables behind its back.
//!
//! A detach whose daemon goes away before it answers re-attaches to
//! detach ([`Session::detach_with`]): the successor rebuilds its records
//! over the control ring, so a machine that stopped serving that ring at
//! the end of its workload serves it again first.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    connect, decode_header, recv_message, send_message, set_recv_timeout, AttachRequest, MsgKind, Reply, Status,
    WireError,
};

/// First wait between connection attempts; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(1);
/// Longest wait between connection attempts.
const BACKOFF_MAX: Duration = Duration::from_millis(10);
/// How long a daemon has to answer an attach or a detach.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the machine waits for its core to execute the commands a dead
/// daemon left, before it re-attaches anyway.
const SETTLE_PATIENCE: Duration = Duration::from_secs(1);

/// The stalls of one run: times the daemon was gone until a successor
/// accepted the VM again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Stalls {
    /// Stalls.
    pub count: u64,
    /// The longest, ms.
    pub longest_ms: f64,
    /// All of them, ms.
    pub total_ms: f64,
}

impl Stalls {
    fn add(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        self.count += 1;
        self.longest_ms = self.longest_ms.max(ms);
        self.total_ms += ms;
    }
}

// By hand rather than `#[from]`, which would make the wire error the
// source as well as part of the message, and print it twice in a chain.
impl From<WireError> for SessionError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

/// How the connection ended, or never began.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The socket or the exchange on it failed.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        cause: std::io::Error,
    },
    /// The daemon sent something that is not a reply.
    #[error("the daemon's answer: {0}")]
    Wire(WireError),
    /// The daemon closed the connection without answering.
    #[error("the daemon closed the connection")]
    Closed,
    /// The daemon refused the attach.
    #[error("the daemon refused the attach: {status:?}: {message}")]
    AttachRefused {
        /// Its status.
        status: Status,
        /// Its reason.
        message: String,
    },
    /// No daemon accepted the VM again before the deadline.
    #[error(
        "the daemon went away and did not come back within {0:?} (is memory-manager running? --reattach-deadline-s)"
    )]
    DaemonGone(Duration),
    /// A daemon refused the re-attach.
    #[error("the daemon refused the re-attach: {status:?}: {message}")]
    Refused {
        /// Its status.
        status: Status,
        /// Its reason.
        message: String,
    },
}

/// An attached VM's connection.
pub struct Session<'f> {
    socket: PathBuf,
    request: AttachRequest,
    fds: Vec<BorrowedFd<'f>>,
    deadline: Duration,
    conn: Mutex<Option<Arc<OwnedFd>>>,
    stalls: Mutex<Stalls>,
}

impl<'f> Session<'f> {
    /// Attaches `request` (with `fds`) at `socket`; a daemon that goes away
    /// later is waited for at most `deadline`.
    pub fn attach(
        socket: &Path,
        request: AttachRequest,
        fds: Vec<BorrowedFd<'f>>,
        deadline: Duration,
    ) -> Result<Self, SessionError> {
        let s = Self {
            socket: socket.to_path_buf(),
            request,
            fds,
            deadline,
            conn: Mutex::new(None),
            stalls: Mutex::new(Stalls::default()),
        };
        let conn = s.connect().map_err(|cause| SessionError::Io { what: "connecting to the daemon", cause })?;
        let reply = s.exchange(&conn, &s.request)?;
        if reply.status != Status::Ok {
            return Err(SessionError::AttachRefused { status: reply.status, message: reply.message });
        }
        *s.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(conn));
        Ok(s)
    }

    /// The process id of the daemon serving the VM now (SO_PEERCRED of
    /// the connection); `None` while there is none, or where the kernel
    /// cannot say (a daemon in another pid namespace).
    pub fn daemon_pid(&self) -> Option<i32> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        crate::peer_credentials(conn.as_fd()).ok().map(|c| c.pid).filter(|&pid| pid > 0)
    }

    /// The stalls so far.
    pub fn stalls(&self) -> Stalls {
        *self.stalls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection to the socket; a daemon that accepts and then
    /// never answers is given up on after [`REPLY_TIMEOUT`].
    fn connect(&self) -> std::io::Result<OwnedFd> {
        let conn = connect(&self.socket)?;
        set_recv_timeout(conn.as_fd(), REPLY_TIMEOUT)?;
        Ok(conn)
    }

    /// Sends `request` on `conn` and reads the reply.
    fn exchange(&self, conn: &OwnedFd, request: &AttachRequest) -> Result<Reply, SessionError> {
        send_message(conn.as_fd(), &request.encode(), &self.fds)
            .map_err(|cause| SessionError::Io { what: "sending the attach request", cause })?;
        read_reply(conn)
    }

    /// Waits (at most [`SETTLE_PATIENCE`]) until `settled`: the core has
    /// executed what the dead daemon left on the rings.
    fn settle(settled: &dyn Fn() -> bool) {
        let started = Instant::now();
        while !settled() {
            if started.elapsed() >= SETTLE_PATIENCE {
                warn!("commands of the dead daemon are still on the rings; re-attaching anyway");
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Connects and re-attaches until a daemon accepts the VM or `deadline`
    /// passes (counted from `lost`); records the stall.
    fn reattach(
        &self,
        lost: Instant,
        stop: Option<&AtomicBool>,
        settled: &dyn Fn() -> bool,
    ) -> Result<(), SessionError> {
        Self::settle(settled);
        let request = AttachRequest { flags: self.request.flags | crate::ATTACH_REATTACH, ..self.request.clone() };
        let mut backoff = BACKOFF_FIRST;
        loop {
            if stop.is_some_and(|s| s.load(Ordering::Acquire)) {
                return Ok(());
            }
            if let Ok(conn) = self.connect() {
                match self.exchange(&conn, &request) {
                    Ok(reply) if reply.status == Status::Ok => {
                        let stalled = lost.elapsed();
                        self.stalls.lock().unwrap_or_else(|e| e.into_inner()).add(stalled);
                        info!(stalled_ms = stalled.as_secs_f64() * 1e3, "re-attached to the daemon");
                        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(conn));
                        return Ok(());
                    }
                    // The daemon still tears the old connection down: again.
                    Ok(reply) if reply.status == Status::AlreadyAttached => {}
                    Ok(reply) => return Err(SessionError::Refused { status: reply.status, message: reply.message }),
                    // The daemon went away again mid-exchange: try again.
                    Err(e) => info!(cause = %e, "the daemon went away before answering; trying again"),
                }
            }
            if lost.elapsed() >= self.deadline {
                return Err(SessionError::DaemonGone(self.deadline));
            }
            std::thread::sleep(backoff.min(self.deadline.saturating_sub(lost.elapsed())));
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Watches the connection until `stop`; re-attaches whenever it drops
    /// (once `settled` holds, see the module doc) and calls `reattached`
    /// after each success. Returns an error when the VM cannot be served
    /// any more.
    pub fn supervise(
        &self,
        stop: &AtomicBool,
        settled: impl Fn() -> bool,
        reattached: impl Fn(),
    ) -> Result<(), SessionError> {
        while !stop.load(Ordering::Acquire) {
            match self.watch(stop) {
                Watch::Stopped => return Ok(()),
                Watch::Refused(status, message) => return Err(SessionError::Refused { status, message }),
                Watch::Lost(at) => {
                    warn!("the daemon went away; the guest runs on, faults wait");
                    self.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
                    self.reattach(at, Some(stop), &settled)?;
                    if !stop.load(Ordering::Acquire) {
                        reattached();
                    }
                }
            }
        }
        Ok(())
    }

    /// Polls the connection until it drops, the daemon says something, or `stop`.
    fn watch(&self, stop: &AtomicBool) -> Watch {
        let Some(owned) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Watch::Lost(Instant::now());
        };
        let conn = owned.as_fd();
        while !stop.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(conn, PollFlags::POLLIN)];
            let Ok(ready) = poll(&mut fds, PollTimeout::from(50u16)) else { continue };
            if ready == 0 {
                continue;
            }
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if revents.contains(PollFlags::POLLIN) {
                match recv_message(conn) {
                    Ok(Some(msg)) => {
                        if let Ok((MsgKind::Reply, payload)) = decode_header(&msg.bytes) {
                            if let Ok(reply) = Reply::decode(payload) {
                                if reply.status != Status::Ok {
                                    return Watch::Refused(reply.status, reply.message);
                                }
                            }
                        }
                        continue;
                    }
                    Ok(None) | Err(_) => return Watch::Lost(Instant::now()),
                }
            }
            if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                return Watch::Lost(Instant::now());
            }
        }
        Watch::Stopped
    }

    /// Detaches: re-attaching first if the daemon is gone, and again if it
    /// goes away before it answers (the machine's vCPUs are stopped: there
    /// is nothing left to settle). Returns the daemon's detach report.
    pub fn detach(&self) -> Result<Reply, SessionError> {
        self.detach_with(|| {})
    }

    /// [`Session::detach`], calling `before_reattach` before each re-attach
    /// it needs (a machine that stopped serving its control ring serves it
    /// again: the new daemon rebuilds its records over it).
    pub fn detach_with(&self, before_reattach: impl Fn()) -> Result<Reply, SessionError> {
        loop {
            let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
            let lost = match conn {
                Some(conn) => {
                    let sent = send_message(conn.as_fd(), &crate::encode_detach(), &[]);
                    let sent = sent.map_err(|cause| SessionError::Io { what: "sending detach", cause });
                    match sent.and_then(|()| read_reply(&conn)) {
                        Ok(reply) if reply.status == Status::Ok => return Ok(reply),
                        // Not a report: a daemon that took the VM back and
                        // then refused it (its records did not fit the core).
                        Ok(reply) => {
                            return Err(SessionError::Refused { status: reply.status, message: reply.message })
                        }
                        Err(e) => {
                            warn!(cause = %e, "the daemon went away during detach");
                            Instant::now()
                        }
                    }
                }
                None => Instant::now(),
            };
            before_reattach();
            self.reattach(lost, None, &|| true)?;
        }
    }
}

/// How watching a connection ended.
enum Watch {
    Stopped,
    Lost(Instant),
    Refused(Status, String),
}

/// Reads one reply from the daemon.
pub fn read_reply(conn: &OwnedFd) -> Result<Reply, SessionError> {
    let msg = recv_message(conn.as_fd())
        .map_err(|cause| SessionError::Io { what: "reading the daemon's reply", cause })?
        .ok_or(SessionError::Closed)?;
    let (kind, payload) = decode_header(&msg.bytes)?;
    if kind != MsgKind::Reply {
        return Err(WireError::Malformed(format!("expected a reply, got {kind:?}")).into());
    }
    Ok(Reply::decode(payload)?)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::{accept, listen};

    fn request() -> AttachRequest {
        AttachRequest { vm_id: 2, nr_vcpus: 1, ipa_bits: 40, flags: 0, regions: Vec::new(), memslots: Vec::new() }
    }

    /// A daemon's side: the next connection's request, answered `ok`.
    fn answer(listener: &OwnedFd) -> (OwnedFd, AttachRequest) {
        let conn = accept(listener.as_fd()).unwrap();
        let msg = recv_message(conn.as_fd()).unwrap().unwrap();
        let (kind, payload) = decode_header(&msg.bytes).unwrap();
        assert_eq!(kind, MsgKind::Attach);
        let req = AttachRequest::decode(payload).unwrap();
        let ok = Reply { status: Status::Ok, message: "attached".into(), values: [0; 3] };
        send_message(conn.as_fd(), &ok.encode(), &[]).unwrap();
        (conn, req)
    }

    #[test]
    fn a_lost_daemon_is_re_attached_only_once_the_rings_settled() {
        let dir = std::env::temp_dir().join(format!("faultline-session-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("attach.sock");
        let listener = listen(&path).unwrap();
        let stop = AtomicBool::new(false);
        // Settled on the third look: the re-attach must come after it.
        let looks = AtomicU32::new(0);
        let settled = || looks.fetch_add(1, Ordering::AcqRel) + 1 >= 3;
        std::thread::scope(|s| {
            let daemon = s.spawn(|| {
                let (first, req) = answer(&listener);
                assert_eq!(req.flags & crate::ATTACH_REATTACH, 0, "the first attach is fresh");
                drop(first); // the daemon dies
                let (second, req) = answer(&listener);
                assert_ne!(req.flags & crate::ATTACH_REATTACH, 0, "the second is a re-attach");
                let looked = looks.load(Ordering::Acquire);
                stop.store(true, Ordering::Release);
                (second, looked)
            });
            let session = Session::attach(&path, request(), Vec::new(), Duration::from_secs(30)).unwrap();
            session.supervise(&stop, settled, || {}).unwrap();
            let (_conn, looked) = daemon.join().unwrap();
            assert!(looked >= 3, "re-attached after {looked} looks at the rings");
            assert_eq!(session.stalls().count, 1);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_detach_answered_by_a_refusal_is_an_error_not_a_report() {
        let dir = std::env::temp_dir().join(format!("faultline-session-detach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("attach.sock");
        let listener = listen(&path).unwrap();
        std::thread::scope(|s| {
            let daemon = s.spawn(|| {
                let (first, _) = answer(&listener);
                // Asked to detach, the daemon dies without a report.
                let detach = recv_message(first.as_fd()).unwrap().unwrap();
                assert_eq!(decode_header(&detach.bytes).unwrap().0, MsgKind::Detach);
                drop(first);
                // Its successor takes the VM back, then refuses it: that
                // reply (values all 0) is what the detach reads next.
                let (second, req) = answer(&listener);
                assert_ne!(req.flags & crate::ATTACH_REATTACH, 0);
                let refused = Reply { status: Status::Mismatch, message: "records do not fit".into(), values: [0; 3] };
                send_message(second.as_fd(), &refused.encode(), &[]).unwrap();
                second
            });
            let session = Session::attach(&path, request(), Vec::new(), Duration::from_secs(30)).unwrap();
            let detached = session.detach();
            assert!(matches!(detached, Err(SessionError::Refused { status: Status::Mismatch, .. })), "{detached:?}");
            drop(daemon.join().unwrap());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
