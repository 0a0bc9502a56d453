//! Who may attach: the attach socket's file mode and group (who can
//! connect at all, as containerd's `grpc.uid/gid`), and the connecting
//! process's credentials (SO_PEERCRED) checked against allowed uids and
//! gids. The takeover socket, which hands every VM's memory to whoever
//! asks, is the daemon's own user's (and root's) alone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use faultline_attach::PeerCredentials;
use serde::Deserialize;

/// `[attach_access]` in the config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AttachAccess {
    /// The attach socket's file mode (connecting needs write permission).
    pub socket_mode: u32,
    /// The attach socket's group (a gid); none: the daemon's.
    pub socket_gid: Option<u32>,
    /// Users whose processes may attach; with `allowed_gids`, both empty:
    /// anyone who can connect.
    pub allowed_uids: Vec<u32>,
    /// Groups whose processes may attach.
    pub allowed_gids: Vec<u32>,
}

impl Default for AttachAccess {
    fn default() -> Self {
        Self { socket_mode: 0o660, socket_gid: None, allowed_uids: Vec::new(), allowed_gids: Vec::new() }
    }
}

/// A peer the access rules keep out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("uid {uid} gid {gid} (pid {pid}) may not attach: not in attach_access.allowed_uids or allowed_gids")]
pub struct Denied {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's gid.
    pub gid: u32,
    /// The peer's pid.
    pub pid: i32,
}

impl AttachAccess {
    /// Whether `peer` may attach.
    pub fn admits(&self, peer: PeerCredentials) -> Result<(), Denied> {
        let open = self.allowed_uids.is_empty() && self.allowed_gids.is_empty();
        if open || self.allowed_uids.contains(&peer.uid) || self.allowed_gids.contains(&peer.gid) {
            Ok(())
        } else {
            Err(Denied { uid: peer.uid, gid: peer.gid, pid: peer.pid })
        }
    }

    /// Gives the attach socket at `path` its mode and group.
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        set_socket_access(path, self.socket_mode, self.socket_gid)
    }
}

/// Gives the socket at `path` file mode `mode` (permission bits only) and,
/// if given, group `gid`: who can connect to it (the attach socket's and
/// the gRPC socket's).
pub fn set_socket_access(path: &Path, mode: u32, gid: Option<u32>) -> std::io::Result<()> {
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))
}

/// Whether `peer` may take this daemon's VMs over: its own user, or root.
pub fn may_take_over(peer: PeerCredentials) -> bool {
    // SAFETY: geteuid takes nothing, cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    peer.uid == me || peer.uid == 0
}

/// Makes the takeover socket at `path` its owner's alone.
pub fn restrict_takeover_socket(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> PeerCredentials {
        PeerCredentials { pid: 42, uid, gid }
    }

    #[test]
    fn peers_are_admitted_by_uid_or_gid_and_anyone_when_nothing_is_listed() {
        let open = AttachAccess::default();
        assert_eq!(open.admits(peer(65534, 65534)), Ok(()));
        let listed = AttachAccess { allowed_uids: vec![0, 107], allowed_gids: vec![36], ..AttachAccess::default() };
        assert_eq!(listed.admits(peer(107, 1)), Ok(()));
        assert_eq!(listed.admits(peer(1000, 36)), Ok(()));
        let e = listed.admits(peer(65534, 65534)).unwrap_err();
        assert!(e.to_string().contains("uid 65534 gid 65534 (pid 42) may not attach"), "{e}");
    }

    #[test]
    fn the_socket_gets_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attach.sock");
        let _listener = faultline_attach::listen(&path).unwrap();
        AttachAccess { socket_mode: 0o666, ..AttachAccess::default() }.apply(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o666);
        restrict_takeover_socket(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
