//! The attach server and each machine connection's lifetime: accept,
//! receive the request, check and map it, register the VM, serve its rings
//! on their own threads until the machine detaches or hangs up, and tear
//! everything down. A bad request gets an error reply and a closed
//! connection; it never disturbs other VMs, each of which lives on its own
//! connection thread.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline_attach::doorbell::WaitPolicy;
use faultline_attach::{decode_header, recv_message, send_message, AttachRequest, MsgKind, Reply, Status};
use hyp_core::ring::{Consumer, Producer, RingKind, SharedRegion};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{error, info, info_span, warn};

use super::map::{map, Attached};
use super::registry::{Registration, VmTable};
use super::state::VmState;
use super::validate::{refuse, Refusal};
use crate::link::control::ControlLoop;
use crate::link::rebuild::rebuild;
use crate::link::vcpu::VcpuService;
use crate::observe::hub::EventHub;
use crate::policy::host::PolicyHost;

/// How long a ring thread of a polled machine sleeps between polls.
const POLLED_SLEEP_SLICE: Duration = Duration::from_micros(50);

/// How attached VMs are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachSettings {
    /// Populate all guest memory at attach.
    pub prefault: bool,
    /// Ring polls before a service thread sleeps on its doorbell.
    pub spin_polls: u32,
    /// Where VMs keep what outlives the daemon.
    pub state_dir: PathBuf,
}

/// The attach server: where VMs are registered and what serves their
/// faults (the policy in force, the event history).
pub struct AttachServer {
    vms: Arc<VmTable>,
    policies: Arc<PolicyHost>,
    events: Arc<EventHub>,
    settings: AttachSettings,
    stopping: AtomicBool,
}

impl AttachServer {
    /// A server registering VMs in `vms`, serving them with `policies` and
    /// recording their faults in `events`.
    pub fn new(vms: Arc<VmTable>, policies: Arc<PolicyHost>, events: Arc<EventHub>, settings: AttachSettings) -> Self {
        Self { vms, policies, events, settings, stopping: AtomicBool::new(false) }
    }

    /// Begins shutdown: the accept loop returns and every VM detaches.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The accept loop on `path`; returns once [`AttachServer::stop`] is
    /// called and every connection has ended.
    pub fn serve(&self, path: &Path) -> std::io::Result<()> {
        let listener = faultline_attach::listen(path)?;
        info!(socket = %path.display(), "attach socket listening");
        std::thread::scope(|s| {
            while !self.stopping() {
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(100u16)) {
                    Ok(0) | Err(nix::Error::EINTR) => continue,
                    Ok(_) => {}
                    Err(e) => return Err(std::io::Error::from(e)),
                }
                match faultline_attach::accept(listener.as_fd()) {
                    Ok(conn) => {
                        s.spawn(move || self.serve_connection(conn));
                    }
                    Err(e) => warn!(cause = %e, "accept failed"),
                }
            }
            Ok(())
        })?;
        let _ = std::fs::remove_file(path);
        Ok(())
    }

    /// Takes the request's VM id, opens the VM's state (checking a
    /// re-attach against the description on record), maps what the request
    /// describes and makes its swap stores agree with its memory.
    #[allow(clippy::type_complexity)]
    fn attach(
        &self,
        req: AttachRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<(AttachRequest, Attached, Registration<'_>, VmState), Refusal> {
        let registration = self
            .vms
            .reserve(req.vm_id)
            .ok_or_else(|| refuse(Status::AlreadyAttached, format!("vm{} is already attached", req.vm_id)))?;
        let reattach = req.flags & faultline_attach::ATTACH_REATTACH != 0;
        let state = VmState::open(&self.settings.state_dir, req.vm_id, reattach)
            .map_err(|e| refuse(Status::Internal, format!("the VM's state directory: {e}")))?;
        if reattach {
            state.check_description(&req).map_err(|e| refuse(Status::Mismatch, e.to_string()))?;
        }
        let attached = map(&req, fds, &state)?;
        if reattach {
            for (i, r) in attached.vm.layout.regions.iter().enumerate() {
                let recovered =
                    r.recover_store().map_err(|e| refuse(Status::Internal, format!("region {i}'s swap store: {e}")))?;
                if recovered != Default::default() {
                    info!(region = i, kept = recovered.kept, dropped = recovered.dropped, "swap store recovered");
                }
            }
        } else {
            state
                .save_description(&req)
                .map_err(|e| refuse(Status::Internal, format!("recording the VM's description: {e}")))?;
        }
        Ok((req, attached, registration, state))
    }

    /// Serves one machine connection from attach to detach.
    fn serve_connection(&self, conn: OwnedFd) {
        let reply = |status, message: String, values| {
            let r = Reply { status, message, values };
            if let Err(e) = send_message(conn.as_fd(), &r.encode(), &[]) {
                warn!(cause = %e, "sending reply failed");
            }
        };
        let attached = receive_attach(&conn).and_then(|(req, fds)| self.attach(req, fds));
        let (req, attached, registration, state) = match attached {
            Ok(a) => a,
            Err(refusal) => {
                warn!(status = ?refusal.status, reason = %refusal.message, "attach refused");
                reply(refusal.status, refusal.message, [0; 3]);
                return;
            }
        };
        let vm = attached.vm.clone();
        let span = info_span!("vm", id = %vm.id());
        let _enter = span.enter();
        if self.settings.prefault {
            if let Err(e) = vm.mapping.populate_all(&vm.layout) {
                reply(Status::Internal, format!("prefaulting guest memory failed: {e}"), [0; 3]);
                return;
            }
        }
        let inbox = vm.control.open();
        registration.attach(vm.clone());
        info!(vcpus = req.nr_vcpus, memslots = req.memslots.len(), regions = req.regions.len(), "VM attached");
        reply(Status::Ok, "attached".into(), [0; 3]);

        let stop = AtomicBool::new(false);
        let base = attached.rings.base();
        // SAFETY: `attached.rings` outlives the scope below, which holds every
        // ring reference; map() already opened it successfully.
        let region = unsafe { SharedRegion::open(base, attached.rings.len()) }.expect("validated at attach");
        let (policy, events) = (&*self.policies, &*self.events);
        // A polled machine never rings doorbells: sleep in short slices.
        let sleep_slice = if req.flags & faultline_attach::ATTACH_POLLED != 0 {
            POLLED_SLEEP_SLICE
        } else {
            Duration::from_millis(500)
        };
        let wait = WaitPolicy { spin_polls: self.settings.spin_polls, sleep_slice };
        let reattach = req.flags & faultline_attach::ATTACH_REATTACH != 0;
        let detach_requested = std::thread::scope(|s| {
            {
                let control = req.nr_vcpus as u32;
                let results = region.ring(control, RingKind::Fault).expect("validated: nr_vcpus + 1 pairs");
                let commands = region.ring(control, RingKind::Command).expect("validated: nr_vcpus + 1 pairs");
                let (vm, stop) = (&*vm, &stop);
                let named = std::thread::Builder::new().name(format!("vm{}-control", vm.id().raw()));
                let spawned = named.spawn_scoped(s, move || {
                    let (Ok(commands), Ok(results)) = (Producer::attach(commands), Consumer::attach(results)) else {
                        warn!("control ring indices inconsistent at attach; control commands unavailable");
                        return;
                    };
                    let looped = ControlLoop::new(inbox, commands, results)
                        .run(wait, stop, |res| vm.mapping.note_seq(res.inval_seq));
                    if let Err(e) = looped {
                        warn!(cause = ?e, "control ring quarantined; control commands unavailable");
                    }
                    vm.control.close();
                });
                if let Err(e) = spawned {
                    warn!(cause = %e, "cannot start the control thread; control commands unavailable");
                }
            }
            // A VM whose daemon died (or handed it over) is served only once
            // its mapping state is rebuilt from the core, over the control
            // ring started above.
            if reattach {
                match rebuild(&vm) {
                    Ok(r) => {
                        self.vms.note_reattached();
                        info!(
                            mappings = r.mappings,
                            bytes = r.bytes,
                            pool_pages_held = r.pool_pages_held,
                            commands = r.commands,
                            elapsed_us = r.elapsed.as_micros() as u64,
                            "re-attached: mapping state rebuilt from the core"
                        )
                    }
                    Err(e) => {
                        error!(cause = %e, "re-attach refused: the core's state does not match the VM");
                        reply(Status::Mismatch, format!("re-attach refused: {e}"), [0; 3]);
                        stop.store(true, Ordering::Release);
                        vm.control.close();
                        return false;
                    }
                }
            }
            for vcpu in 0..req.nr_vcpus as u32 {
                let faults = region.ring(vcpu, RingKind::Fault).expect("in range");
                let commands = region.ring(vcpu, RingKind::Command).expect("in range");
                let (vm, stop, policy) = (&*vm, &stop, policy);
                let named = std::thread::Builder::new().name(format!("vm{}-vcpu{vcpu}", vm.id().raw()));
                let spawned = named.spawn_scoped(s, move || {
                    let (Ok(faults), Ok(commands)) = (Consumer::attach(faults), Producer::attach(commands)) else {
                        warn!(vcpu, "ring indices inconsistent at attach; vCPU not served");
                        return;
                    };
                    if let Err(e) = VcpuService::new(vm, policy, events, vcpu, faults, commands).run(wait, stop) {
                        warn!(vcpu, cause = ?e, "ring quarantined; vCPU no longer served");
                    }
                });
                if let Err(e) = spawned {
                    warn!(vcpu, cause = %e, "cannot start the vCPU's service thread; vCPU not served");
                }
            }
            let detach = self.wait_for_detach(&conn);
            stop.store(true, Ordering::Release);
            vm.control.close();
            for vcpu in 0..=req.nr_vcpus as u32 {
                if let Some(view) = region.ring(vcpu, RingKind::Fault) {
                    faultline_attach::doorbell::wake(&view);
                }
            }
            detach
        });
        // Reclaimed pages go back into the machine's memory before it hears
        // the VM is detached.
        if let Err(e) = vm.layout.restore_reclaimed() {
            error!(cause = %e, "restoring reclaimed pages at detach failed; they stay in the VM's swap store");
        } else if let Err(e) = state.remove() {
            warn!(cause = %e, "removing the VM's state directory failed");
        }
        let released = vm.mapping.release_all();
        let remaining = vm.mapping.pins().total();
        let faults = vm.counters.faults.load(Ordering::Relaxed);
        drop(registration);
        info!(pages_released = released, pins_remaining = remaining, faults, "VM detached");
        if detach_requested {
            reply(Status::Ok, "detached".into(), [released, remaining, faults]);
        }
    }

    /// Waits until the machine detaches or hangs up, or the daemon stops.
    /// Returns true for an explicit detach (which gets a reply).
    fn wait_for_detach(&self, conn: &OwnedFd) -> bool {
        loop {
            if self.stopping() {
                return false;
            }
            let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(_) => return false,
            }
            match recv_message(conn.as_fd()) {
                Ok(Some(msg)) => match decode_header(&msg.bytes) {
                    Ok((MsgKind::Detach, _)) => return true,
                    other => warn!(fd = conn.as_raw_fd(), ?other, "unexpected message while attached; ignored"),
                },
                Ok(None) | Err(_) => return false,
            }
        }
    }
}

fn receive_attach(conn: &OwnedFd) -> Result<(AttachRequest, Vec<OwnedFd>), Refusal> {
    set_recv_timeout(conn, Duration::from_secs(5));
    let msg = recv_message(conn.as_fd())
        .map_err(|e| refuse(Status::Truncated, format!("receiving the attach request: {e}")))?
        .ok_or_else(|| refuse(Status::Truncated, "connection closed before an attach request"))?;
    if msg.truncated {
        return Err(refuse(Status::Truncated, "attach request or its fds were cut short"));
    }
    let (kind, payload) = decode_header(&msg.bytes)?;
    if kind != MsgKind::Attach {
        return Err(refuse(Status::Malformed, format!("expected an attach request, got {kind:?}")));
    }
    Ok((AttachRequest::decode(payload)?, msg.fds))
}

fn set_recv_timeout(conn: &OwnedFd, t: Duration) {
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as i64, t.subsec_micros() as i64);
    let _ = nix::sys::socket::setsockopt(conn, nix::sys::socket::sockopt::ReceiveTimeout, &tv);
}
