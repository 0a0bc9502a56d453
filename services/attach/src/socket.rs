//! SOCK_SEQPACKET Unix sockets with SCM_RIGHTS: one message, its fds,
//! boundaries kept by the kernel, truncation reported by MSG_TRUNC/MSG_CTRUNC.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;

use crate::wire::{MAX_MESSAGE_LEN, MAX_REGIONS};

/// A received message.
#[derive(Debug)]
pub struct Received {
    /// The message bytes.
    pub bytes: Vec<u8>,
    /// File descriptors that came with it, owned (closed on drop).
    pub fds: Vec<OwnedFd>,
    /// The kernel cut the message or its fds short.
    pub truncated: bool,
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

/// A listening socket bound at `path` (an existing file there is removed).
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    listen_prepared(path, |_| Ok(()))
}

/// A listening socket that appears at `path` only once `prepare` (say, a
/// chmod) has run on it; see [`bind_prepared`].
pub fn listen_prepared(path: &Path, prepare: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<OwnedFd> {
    bind_prepared(
        path,
        |staged| {
            let fd = seqpacket()?;
            socket::bind(fd.as_raw_fd(), &UnixAddr::new(staged)?)?;
            socket::listen(&fd, Backlog::new(64)?)?;
            Ok(fd)
        },
        prepare,
    )
}

/// A Unix socket that `bind` binds (and listens on), which appears at
/// `path` only once `prepare` (say, a chmod) has run on it: bound under a
/// temporary name in the same directory, prepared, then renamed into
/// place (replacing what was there). Whoever sees the path sees the socket
/// as it will stay: there is no moment at which it takes connections with
/// the mode it was bound with.
pub fn bind_prepared<S>(
    path: &Path,
    bind: impl FnOnce(&Path) -> io::Result<S>,
    prepare: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<S> {
    // Short, so a path that fits a socket address still fits with it, and
    // one of its own for each socket (threads place theirs at once).
    static PLACED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PLACED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staging = path.with_file_name(format!(".{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let placed = bind(&staging).and_then(|bound| {
        prepare(&staging)?;
        std::fs::rename(&staging, path)?;
        Ok(bound)
    });
    if placed.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    placed
}

/// Who is at the other end of a connected socket, as the kernel saw them
/// when they connected (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Their process.
    pub pid: i32,
    /// Their effective user id.
    pub uid: u32,
    /// Their effective group id.
    pub gid: u32,
}

/// The credentials of the peer of `sock`.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCredentials> {
    let c = socket::getsockopt(&sock, sockopt::PeerCredentials)?;
    Ok(PeerCredentials { pid: c.pid(), uid: c.uid(), gid: c.gid() })
}

/// Accepts one connection.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Connects to the daemon's attach socket at `path`.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// Bounds how long a receive on `sock` waits: a peer that accepted or
/// connected and then says nothing is given up on.
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
    socket::setsockopt(&sock, sockopt::ReceiveTimeout, &tv)?;
    Ok(())
}

/// Sends one message with `fds` attached.
pub fn send_message(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let sent =
        socket::sendmsg::<UnixAddr>(sock.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "message sent partially"));
    }
    Ok(())
}

/// Receives one message; `Ok(None)` when the peer closed the connection.
pub fn recv_message(sock: BorrowedFd<'_>) -> io::Result<Option<Received>> {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN + 1];
    // A region's fds, and a handed-over VM's connection.
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_REGIONS + 1]);
    let (len, flags, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<UnixAddr>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS installed these descriptors in this
                    // process for us; nothing else owns them.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let truncated = flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) || len > MAX_MESSAGE_LEN;
    buf.truncate(len.min(MAX_MESSAGE_LEN));
    Ok(Some(Received { bytes: buf, fds, truncated }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_prepared_socket_appears_at_its_path_only_as_prepared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attach.sock");
        std::fs::write(&path, b"stale").unwrap();
        let listener = listen_prepared(&path, |staged| {
            assert_ne!(staged, path.as_path());
            assert_eq!(std::fs::read(&path).unwrap(), b"stale", "the path changed before the socket was ready");
            std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o640))
        })
        .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        // It listens at the path, and nothing else is left in the directory.
        let _client = connect(&path).unwrap();
        accept(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["attach.sock"]);
    }

    #[test]
    fn a_socket_whose_preparation_fails_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attach.sock");
        let e = listen_prepared(&path, |_| Err(io::Error::other("no"))).unwrap_err();
        assert_eq!(e.to_string(), "no");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
