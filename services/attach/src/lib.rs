//! faultline-attach: attach protocol v1 (docs/attach-protocol.md) and the
//! ring doorbell with its adaptive waiter, the host-side pieces the daemon
//! and the machines share.
//!
//! A machine attaches a VM by connecting to the daemon's Unix SOCK_SEQPACKET
//! socket and sending one [`AttachRequest`] whose memory regions travel as
//! file descriptors (SCM_RIGHTS), like vhost-user's memory table. The daemon
//! answers with a [`Reply`]; the connection then stays open for the life of
//! the attachment, and a [`Detach`](MsgKind::Detach) (or closing it) ends it.
//!
//! Both ends use this crate, so the wire format is defined once; the
//! machines also keep their VM's connection with its [`session`].

pub mod doorbell;
pub mod priority;
pub mod session;
pub mod shm;
mod socket;
pub mod wait;
mod wire;

pub use socket::{
    accept, bind_prepared, connect, listen, listen_prepared, peer_credentials, recv_message, send_message,
    set_recv_timeout, PeerCredentials, Received,
};
pub use wire::*;
