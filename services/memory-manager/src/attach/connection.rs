//! The attach server and each machine connection's lifetime: accept,
//! receive the request, check and map it, register the VM, serve its rings
//! on their own threads until the machine detaches or hangs up, and tear
//! everything down; or, when a new daemon takes over, stop serving and hand
//! the connection over untouched ([`super::takeover`]); or, when the daemon
//! stops, leave the VM as it is for the next daemon. A bad request gets
//! an error reply and a closed connection; it never disturbs other VMs,
//! each of which lives on its own connection thread.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultline_attach::doorbell::WaitPolicy;
use faultline_attach::{
    decode_header, recv_message, send_message, set_recv_timeout, AttachRequest, MsgKind, Reply, Status,
};
use hyp_core::ring::{Consumer, Producer, RingKind};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{error, info, info_span, warn};

use super::access::{may_take_over, restrict_takeover_socket, AttachAccess};
use super::admission::{Claim, Limits, OverLimit};
use super::map::{map, Attached};
use super::registry::{Registration, ReserveError, VmTable};
use super::state::VmState;
use super::takeover::{
    asks_for_takeover, Change, Handed, HandedVm, HandoverSink, PendingState, Takeover, TakeoverError,
};
use super::validate::{refuse, Refusal};
use crate::fault::failpoint::{crash_point, panic_point};
use crate::link::background::run_in_background;
use crate::link::control::ControlLoop;
use crate::link::pool::ServicePool;
use crate::link::rebuild::{check_handed, rebuild, RebuildError, Rebuilt, WarmRecords};
use crate::link::vcpu::VcpuService;
use crate::link::vm::AttachedVm;
use crate::link::winddown::Winddown;
use crate::memory::handover::{HandedDelta, HandedRecords};
use crate::memory::mapping::ChangeJournal;
use crate::memory::pressure::HostMemory;
use crate::memory::swap::SwapCompression;
use crate::observe::hub::EventHub;
use crate::observe::workingset::SharedSettings;
use crate::policy::host::PolicyHost;

/// How long a ring thread of a polled machine sleeps between polls.
const POLLED_SLEEP_SLICE: Duration = Duration::from_micros(50);
/// How often a handover looks whether the vCPU services drained.
const DRAIN_POLL: Duration = Duration::from_micros(50);
/// How often an attached VM's connection thread looks at what ends the
/// connection besides the machine's own messages (a stop, a takeover, a
/// failed service) and reads the core's access-flag counts for the API.
/// Nothing a guest waits on: at 20 ms it was two thirds of an idle 64-vCPU
/// VM's daemon CPU (about 80 us a wake-up on a 2-core VM).
const DETACH_POLL: Duration = Duration::from_millis(100);

/// How attached VMs are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachSettings {
    /// Populate all guest memory at attach.
    pub prefault: bool,
    /// Ring polls before a service thread sleeps on its doorbell.
    pub spin_polls: u32,
    /// Where VMs keep what outlives the daemon.
    pub state_dir: PathBuf,
    /// How new swap stores keep reclaimed pages.
    pub swap_compression: SwapCompression,
    /// What the daemon takes on before it refuses a new VM.
    pub limits: Limits,
    /// Who may attach.
    pub access: AttachAccess,
    /// Where a new daemon asks this one to hand everything over (none: no
    /// takeover).
    pub takeover_socket: Option<PathBuf>,
}

/// How a VM came to be served.
enum Arrival {
    /// Its machine attached (or re-attached) on its own.
    Attached,
    /// The previous daemon handed it over; its state follows.
    HandedOver(PendingState),
}

/// How a served VM's connection ended.
enum Ending {
    /// The machine asked to detach (it gets a reply).
    Detached,
    /// The machine hung up.
    Gone,
    /// The daemon stops: the VM is left as it is, for the next daemon
    /// (the machine re-attaches to it).
    Left,
    /// A new daemon takes the VM over.
    HandOver(Arc<HandoverSink>),
    /// One of its vCPU services panicked: the VM is let go as after a
    /// crash (its state stays), and its machine re-attaches and is served
    /// afresh, rebuilt from the core.
    Failed,
}

/// The attach server: where VMs are registered and what serves their
/// faults (the policy in force, the event history, the service pool).
pub struct AttachServer {
    vms: Arc<VmTable>,
    policies: Arc<PolicyHost>,
    events: Arc<EventHub>,
    /// The threads that serve the vCPUs' rings.
    pool: Arc<ServicePool>,
    settings: AttachSettings,
    /// The host's memory pressure, which every VM's fresh backing is
    /// admitted under.
    host: Arc<HostMemory>,
    /// The working-set monitor's settings, which every VM's monitor reads.
    monitor: Arc<SharedSettings>,
    stopping: AtomicBool,
    /// Set when a new daemon takes over: every connection hands its VM to it.
    handover: Mutex<Option<Arc<HandoverSink>>>,
}

impl AttachServer {
    /// A server registering VMs in `vms` (on `host`), serving them with
    /// `policies`, recording their faults in `events` and monitoring their
    /// working sets as `monitor` says.
    pub fn new(
        vms: Arc<VmTable>,
        policies: Arc<PolicyHost>,
        events: Arc<EventHub>,
        pool: Arc<ServicePool>,
        host: Arc<HostMemory>,
        monitor: Arc<SharedSettings>,
        settings: AttachSettings,
    ) -> Self {
        let (stopping, handover) = (AtomicBool::new(false), Mutex::new(None));
        Self { vms, policies, events, pool, settings, host, monitor, stopping, handover }
    }

    /// Begins shutdown: the accept loop returns and every VM is left as it
    /// is for the next daemon (its machine re-attaches).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn handing_over(&self) -> Option<Arc<HandoverSink>> {
        self.handover.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The accept loop on `path` (or on the socket `taken` hands over, with
    /// its VMs served first); returns once [`AttachServer::stop`] is called
    /// and every connection has ended, or once everything was handed over
    /// to a new daemon (the socket stays for it).
    pub fn serve(&self, path: &Path, taken: Option<Takeover>) -> std::io::Result<()> {
        // The takeover socket first, and each socket in place only with
        // its mode set: once the attach socket is there, everything is.
        let takeover = self.settings.takeover_socket.as_deref().and_then(|p| {
            match faultline_attach::listen_prepared(p, restrict_takeover_socket) {
                Ok(listener) => Some(listener),
                Err(e) => {
                    warn!(socket = %p.display(), cause = %e, "cannot listen for a successor: upgrades by takeover are off");
                    None
                }
            }
        });
        let (listener, handed) = match taken {
            Some(Takeover { listener, vms }) => {
                self.settings.access.apply(path)?;
                (listener, Some(vms))
            }
            None => (faultline_attach::listen_prepared(path, |p| self.settings.access.apply(p))?, None),
        };
        info!(socket = %path.display(), "attach socket listening");
        let handed_over = std::thread::scope(|s| {
            let listener = listener;
            if let Some(handed) = handed {
                // Each VM is served as soon as it arrives; its state follows.
                s.spawn(move || {
                    let received = handed.receive(|HandedVm { conn, request, fds, state }| {
                        s.spawn(move || contained(|| self.serve_vm(conn, request, fds, Arrival::HandedOver(state))));
                    });
                    if let Err(e) = received {
                        // The VMs not handed yet re-attach on their own.
                        warn!(cause = %e, "the takeover broke off");
                    }
                });
            }
            while !self.stopping() {
                let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                if let Some(t) = &takeover {
                    fds.push(PollFd::new(t.as_fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, PollTimeout::from(100u16)) {
                    Ok(0) | Err(nix::Error::EINTR) => continue,
                    Ok(_) if self.stopping() => break,
                    Ok(_) => {}
                    Err(e) => return Err(std::io::Error::from(e)),
                }
                let asked = fds.get(1).and_then(|f| f.revents()).is_some_and(|r| r.contains(PollFlags::POLLIN));
                if let (true, Some(t)) = (asked, &takeover) {
                    if let Some(sink) = self.hand_over(t.as_fd(), listener.as_fd()) {
                        return Ok(Some(sink));
                    }
                    continue;
                }
                match faultline_attach::accept(listener.as_fd()) {
                    Ok(conn) => {
                        s.spawn(move || contained(|| self.serve_connection(conn)));
                    }
                    Err(e) => warn!(cause = %e, "accept failed"),
                }
            }
            // Stopping: no new connection from here on (a machine that
            // re-attaches waits for the next daemon), while the VMs are left.
            drop(listener);
            let _ = std::fs::remove_file(path);
            if let Some(p) = &self.settings.takeover_socket {
                let _ = std::fs::remove_file(p);
            }
            Ok(None)
        })?;
        if let Some(sink) = handed_over {
            // Every connection thread has handed its VM over; the sockets'
            // paths are the new daemon's now.
            sink.done(self.vms.handed_over());
        }
        Ok(())
    }

    /// A new daemon on the takeover socket: if it asks, hands it the attach
    /// socket and tells every connection to hand its VM over.
    fn hand_over(&self, takeover: BorrowedFd<'_>, listener: BorrowedFd<'_>) -> Option<Arc<HandoverSink>> {
        let conn = faultline_attach::accept(takeover).ok()?;
        match faultline_attach::peer_credentials(conn.as_fd()) {
            Ok(peer) if may_take_over(peer) => {}
            peer => {
                warn!(?peer, "a process of another user asked to take the VMs over; refused");
                return None;
            }
        }
        let Some(flags) = asks_for_takeover(&conn) else {
            warn!("a connection on the takeover socket did not ask for a takeover");
            return None;
        };
        let sink = Arc::new(HandoverSink::new(conn, flags));
        if let Err(e) = sink.listener(listener) {
            warn!(cause = %e, "handing over the attach socket failed; serving on");
            return None;
        }
        info!(vms = self.vms.len(), "a new daemon takes over: handing every VM over");
        *self.handover.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink.clone());
        Some(sink)
    }

    /// Takes the request's VM id, opens the VM's state (checking a
    /// re-attach against the description on record) and maps what the
    /// request describes.
    #[allow(clippy::type_complexity)]
    fn attach(
        &self,
        req: AttachRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<(AttachRequest, Attached, Registration<'_>, VmState), Refusal> {
        let reattach = req.flags & faultline_attach::ATTACH_REATTACH != 0;
        // A VM that comes back runs already: no limit refuses it.
        let limits = (!reattach).then_some(&self.settings.limits);
        let over = |e: OverLimit| refuse(Status::OverLimit, format!("vm{}: {e}", req.vm_id));
        if let Some(limits) = limits {
            limits.check_request(&req).map_err(over)?;
        }
        let registration = self.vms.reserve(req.vm_id, Claim::of(&req), limits).map_err(|e| match e {
            ReserveError::Taken => refuse(Status::AlreadyAttached, format!("vm{} is already attached", req.vm_id)),
            ReserveError::OverLimit(e) => over(e),
        })?;
        let state = VmState::open(&self.settings.state_dir, req.vm_id, reattach)
            .map_err(|e| refuse(Status::Internal, format!("the VM's state directory: {e}")))?;
        if reattach {
            state.check_description(&req).map_err(|e| refuse(Status::Mismatch, e.to_string()))?;
        }
        let attached = map(&req, fds, &state, self.settings.swap_compression, self.host.clone())?;
        if !reattach {
            state
                .save_description(&req)
                .map_err(|e| refuse(Status::Internal, format!("recording the VM's description: {e}")))?;
        }
        Ok((req, attached, registration, state))
    }

    /// Serves one machine connection from attach to detach.
    fn serve_connection(&self, conn: OwnedFd) {
        if self.stopping() {
            // No reply: a re-attaching machine tries the next daemon.
            return;
        }
        match self.admit_peer(&conn).and_then(|()| receive_attach(&conn)) {
            Ok((req, fds)) => self.serve_vm(conn, req, fds, Arrival::Attached),
            Err(refusal) => {
                warn!(status = ?refusal.status, reason = %refusal.message, "attach refused");
                reply_on(&conn, refusal.status, refusal.message, [0; 3]);
            }
        }
    }

    /// Checks that the process at the other end of `conn` may attach. If it
    /// may not (or cannot be told), its request is taken off the socket (closing over unread
    /// data would reset the connection, and the reply with it) and dropped
    /// undecoded, its fds closed.
    fn admit_peer(&self, conn: &OwnedFd) -> Result<(), Refusal> {
        let admitted = faultline_attach::peer_credentials(conn.as_fd())
            .map_err(|e| refuse(Status::Internal, format!("reading the peer's credentials: {e}")))
            .and_then(|peer| self.settings.access.admits(peer).map_err(|e| refuse(Status::Forbidden, e.to_string())));
        if admitted.is_err() {
            let _ = set_recv_timeout(conn.as_fd(), Duration::from_secs(1));
            let _ = recv_message(conn.as_fd());
        }
        admitted
    }

    /// Serves VM `req` on `conn` until it detaches, hangs up or is handed
    /// over. A VM handed over by a previous daemon is taken back as a
    /// re-attach, and the machine is not told (it never reconnected).
    fn serve_vm(&self, conn: OwnedFd, req: AttachRequest, fds: Vec<OwnedFd>, arrival: Arrival) {
        let (handed_over, pending) = match arrival {
            Arrival::Attached => (false, None),
            Arrival::HandedOver(pending) => (true, Some(pending)),
        };
        let reply = |status, message: String, values| reply_on(&conn, status, message, values);
        let flags = if handed_over { req.flags | faultline_attach::ATTACH_REATTACH } else { req.flags };
        let request = AttachRequest { flags, ..req };
        // Copies of the fds, for a new daemon that takes the VM over.
        let kept: std::io::Result<Vec<OwnedFd>> = fds.iter().map(|f| f.try_clone()).collect();
        let attached = kept
            .map_err(|e| refuse(Status::Internal, format!("keeping the VM's fds: {e}")))
            .and_then(|kept| self.attach(request, fds).map(|a| (a, kept)));
        let ((req, attached, registration, state), kept) = match attached {
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
        // A handed VM is this daemon's once the old one drained it (its
        // records come then, or, warm, a snapshot before and a delta then);
        // mapped meanwhile.
        let handed = match pending.map(|p| receive_state(&vm, p)).transpose() {
            Ok(handed) => handed,
            Err(e) => {
                warn!(cause = %e, "letting the VM go: its machine re-attaches");
                return;
            }
        };
        let reattach = req.flags & faultline_attach::ATTACH_REATTACH != 0;
        if reattach {
            if let Err(e) = recover_stores(&vm) {
                error!(cause = %e, "re-attach refused");
                reply(Status::Internal, e, [0; 3]);
                return;
            }
        }
        if self.settings.prefault {
            if let Err(e) = vm.mapping.populate_all(&vm.layout) {
                reply(Status::Internal, format!("prefaulting guest memory failed: {e}"), [0; 3]);
                return;
            }
        } else if !reattach {
            // Before the first fault, so not on a stall a re-attach or a
            // takeover holds the guest in (their leaves say what is
            // populated; the rest is found by the fill, as it is unseeded).
            if let Err(e) = vm.mapping.seed_populated(&vm.layout) {
                reply(Status::Internal, format!("reading which guest pages hold data failed: {e}"), [0; 3]);
                return;
            }
        }
        let inbox = vm.control.open();
        if !reattach {
            registration.attach(vm.clone());
        }
        info!(
            vcpus = req.nr_vcpus,
            memslots = req.memslots.len(),
            regions = req.regions.len(),
            handed_over,
            "VM attached"
        );
        if !handed_over {
            reply(Status::Ok, "attached".into(), [0; 3]);
        }

        let end = Winddown::default();
        // The geometry validated at attach (the machine may have rewritten
        // the header in shared memory since): nr_vcpus + 1 ring pairs.
        let region = attached.rings.region();
        let (policy, events) = (&*self.policies, &*self.events);
        // A polled machine never rings doorbells: sleep in short slices.
        let sleep_slice = if req.flags & faultline_attach::ATTACH_POLLED != 0 {
            POLLED_SLEEP_SLICE
        } else {
            Duration::from_millis(500)
        };
        let wait = WaitPolicy { spin_polls: self.settings.spin_polls, sleep_slice };
        // As first attached, for a new daemon that takes the VM over.
        let original = AttachRequest { flags: req.flags & !faultline_attach::ATTACH_REATTACH, ..req.clone() };
        let mut handed_early = false;
        // Warm: the journal of what changed since the new daemon last
        // adopted the records (a snapshot or a change) before the drain.
        let mut journal = None;
        // Commands still in flight when the drain ended (a core that did not
        // answer within the drain's patience).
        let mut in_flight_at_handover = 0;
        let ending = std::thread::scope(|s| {
            // Stops the VM's threads when this closure is left (returning,
            // or unwinding), before the scope waits for its control thread,
            // which runs until told to stop (a panic must not hang the VM).
            let _winddown =
                WindsDown { end: &end, vm: &vm, control: region.ring(req.nr_vcpus as u32, RingKind::Fault) };
            {
                let control = req.nr_vcpus as u32;
                // The control pair is the last of the nr_vcpus + 1 checked at attach.
                let results = region.ring(control, RingKind::Fault);
                let commands = region.ring(control, RingKind::Command);
                let (vm, stop, end) = (&*vm, end.stopping(), &end);
                let named = std::thread::Builder::new().name(format!("vm{}-control", vm.id().raw()));
                let spawned = named.spawn_scoped(s, move || {
                    let attached = commands.zip(results).map(|(c, r)| (Producer::attach(c), Consumer::attach(r)));
                    let Some((Ok(commands), Ok(results))) = attached else {
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
                let (settings, policies) = (&*self.monitor, &*self.policies);
                let named = std::thread::Builder::new().name(format!("vm{}-monitor", vm.id().raw()));
                if let Err(e) = named.spawn_scoped(s, move || crate::link::monitor::run(vm, settings, policies, end)) {
                    warn!(cause = %e, "cannot start the working-set monitor thread; the VM is not monitored");
                }
            }
            // A VM whose daemon died is served only once its mapping state
            // is rebuilt from the core, over the control ring started above.
            // One handed over comes with the old daemon's records: once
            // checked, its vCPUs are served while they are adopted (what
            // reads them waits).
            let (records, warm) = match handed {
                Some(HandedState::Drained(records)) => (records, None),
                Some(HandedState::Warm(adopted)) => (None, Some(adopted)),
                None => (None, None),
            };
            let checked = records.and_then(|r| {
                check_handed(&vm, r)
                    .inspect_err(
                        |e| warn!(cause = %e, "the handed-over records do not fit the VM; rebuilding from the core"),
                    )
                    .ok()
            });
            let warm = warm.and_then(|adopted| {
                adopted.inspect_err(|e| warn!(cause = %e, "the warm handover failed; rebuilding from the core")).ok()
            });
            let mut adopting = None;
            match (checked, warm) {
                (_, Some(r)) => {
                    registration.attach(vm.clone());
                    self.vms.note_reattached();
                    info!(
                        mappings = r.mappings,
                        bytes = r.bytes,
                        amend_us = r.elapsed.as_micros() as u64,
                        "taken over: the old daemon's records adopted (warm: the snapshot before the drain, the delta after)"
                    );
                }
                (Some(checked), None) => adopting = Some((checked, vm.mapping.hold_records())),
                (None, None) if reattach => match rebuild(&vm) {
                    Ok(r) => {
                        // Listed (and reachable through the API) once rebuilt.
                        registration.attach(vm.clone());
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
                    // A core that does not answer is not one that mismatches.
                    Err(e @ RebuildError::Control(_)) => {
                        error!(cause = %e, "re-attach failed: the core did not answer the rebuild's questions");
                        reply(Status::Internal, format!("re-attach failed: {e}"), [0; 3]);
                        return Ending::Gone;
                    }
                    Err(e) => {
                        error!(cause = %e, "re-attach refused: the core's state does not match the VM");
                        reply(Status::Mismatch, format!("re-attach refused: {e}"), [0; 3]);
                        return Ending::Gone;
                    }
                },
                (None, None) => {}
            }
            let mut services = Vec::with_capacity(req.nr_vcpus as usize);
            for vcpu in 0..req.nr_vcpus as u32 {
                let rings = region.ring(vcpu, RingKind::Fault).zip(region.ring(vcpu, RingKind::Command));
                match rings.map(|(faults, commands)| (Consumer::attach(faults), Producer::attach(commands))) {
                    Some((Ok(faults), Ok(commands))) => {
                        services.push(VcpuService::new(&vm, policy, events, &end, vcpu, faults, commands))
                    }
                    _ => warn!(vcpu, "ring indices inconsistent at attach; vCPU not served"),
                }
            }
            let wake_vcpus = || {
                for vcpu in 0..req.nr_vcpus as u32 {
                    if let Some(view) = region.ring(vcpu, RingKind::Fault) {
                        faultline_attach::doorbell::wake(&view);
                    }
                }
            };
            // The pool serves the vCPUs until the connection ends.
            let (ending, _) = self.pool.serve(services, sleep_slice, |served| {
                if let Some((checked, held)) = adopting {
                    let r = checked.adopt(&vm, held);
                    registration.attach(vm.clone());
                    self.vms.note_reattached();
                    let elapsed_us = r.elapsed.as_micros() as u64;
                    info!(
                        mappings = r.mappings,
                        bytes = r.bytes,
                        elapsed_us,
                        "taken over: the old daemon's records adopted"
                    );
                }
                // Between polls, the core's access-flag counts for the API.
                let read_core_counts = || {
                    for (vcpu, occupancy) in vm.rings.iter().enumerate() {
                        if let Some(view) = region.ring(vcpu as u32, RingKind::Fault) {
                            occupancy.note_access_flag_faults(view.access_flag_faults());
                        }
                    }
                };
                let ending = self.wait_for_detach(&conn, || served.panicked(), read_core_counts);
                // The last count, for the detach's log line.
                read_core_counts();
                if let Ending::HandOver(sink) = &ending {
                    // A new daemon that takes VMs staged maps this one
                    // while it drains; its state follows.
                    if sink.staged() {
                        handed_early = sink
                            .vm(&conn, &original, &kept)
                            .inspect_err(
                                |e| error!(cause = %e, "handing the VM over failed; the machine will re-attach"),
                            )
                            .is_ok();
                    }
                    // Warm: the new daemon adopts a snapshot of the records
                    // while this one still serves the VM.
                    if handed_early && sink.warm() {
                        journal = hand_snapshot(sink, &vm, original.vm_id);
                    }
                    // Each vCPU's service ends once its fault in flight is
                    // answered; the control ring stays served meanwhile (a
                    // reclaim under way finishes).
                    let draining = std::time::Instant::now();
                    info!("draining the VM's vCPU services for the handover");
                    end.drain();
                    while !served.finished() {
                        // Results due need not ring: wake the pool to read them.
                        wake_vcpus();
                        std::thread::sleep(DRAIN_POLL);
                    }
                    let drained_us = draining.elapsed().as_micros() as u64;
                    in_flight_at_handover = served.in_flight();
                    info!(drained_us, in_flight = in_flight_at_handover, "vCPU services drained for the handover");
                }
                end.stop();
                ending
            });
            ending
        });
        if let Ending::HandOver(sink) = ending {
            // The service threads are done: the new daemon takes it from
            // here, state directory, swap stores and all, with the records.
            let handed = if sink.staged() {
                // The records are exact only with nothing in flight: a map
                // the core installs after the drain would be in no one's
                // records. Otherwise the new daemon rebuilds from the core.
                let exact = in_flight_at_handover == 0;
                if !exact {
                    warn!(
                        in_flight = in_flight_at_handover,
                        "commands in flight: the new daemon rebuilds from the core"
                    );
                }
                handed_early.then(|| match &mut journal {
                    // Warm: what changed since the snapshot or the last change.
                    Some(journal) => sink.delta(original.vm_id, exact.then(|| journal.change()).as_ref()),
                    None => sink.state(original.vm_id, exact.then(|| vm.mapping.handed_records()).as_ref()),
                })
            } else {
                Some(sink.vm(&conn, &original, &kept))
            };
            match handed {
                Some(Ok(())) => info!("VM handed over to the new daemon"),
                Some(Err(e)) => error!(cause = %e, "handing the VM over failed; the machine will re-attach"),
                None => {}
            }
            self.vms.note_handed_over();
            drop(registration);
            return;
        }
        if let Ending::Failed = ending {
            error!("a vCPU service panicked: the VM is let go; its machine re-attaches and is served afresh");
            return;
        }
        if let Ending::Left = ending {
            // Like a crash, without the crash: the state directory, the swap
            // stores and the core's tables stay for the next daemon.
            info!("daemon stopping: VM left for the next daemon to take back");
            return;
        }
        // Reclaimed pages go back into the machine's memory before it hears
        // the VM is detached; meanwhile it is no longer listed (what the API
        // reports of an attached VM, its backing under a budget included,
        // no longer holds).
        registration.unlist();
        if let Err(e) = vm.layout.restore_reclaimed() {
            error!(cause = %e, "restoring reclaimed pages at detach failed; they stay in the VM's swap store");
        } else if let Err(e) = state.remove() {
            warn!(cause = %e, "removing the VM's state directory failed");
        }
        let released = vm.mapping.release_all();
        let remaining = vm.mapping.pins().total();
        let faults = vm.counters.faults.load(Ordering::Relaxed);
        drop(registration);
        let access_flag_faults = vm.access_flag_faults();
        info!(pages_released = released, pins_remaining = remaining, faults, access_flag_faults, "VM detached");
        if matches!(ending, Ending::Detached) {
            reply(Status::Ok, "detached".into(), [released, remaining, faults]);
        }
    }

    /// Waits until the machine detaches or hangs up, the daemon stops, a
    /// new daemon takes over, or one of the VM's services `failed`;
    /// `between_polls` runs every [`DETACH_POLL`] meanwhile.
    fn wait_for_detach(&self, conn: &OwnedFd, failed: impl Fn() -> bool, between_polls: impl Fn()) -> Ending {
        loop {
            panic_point("vm-waiting");
            between_polls();
            if failed() {
                return Ending::Failed;
            }
            if let Some(sink) = self.handing_over() {
                return Ending::HandOver(sink);
            }
            if self.stopping() {
                return Ending::Left;
            }
            let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(DETACH_POLL.as_millis() as u16)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(_) => return Ending::Gone,
            }
            match recv_message(conn.as_fd()) {
                Ok(Some(msg)) => match decode_header(&msg.bytes) {
                    Ok((MsgKind::Detach, _)) => {
                        crash_point("detach-asked");
                        return Ending::Detached;
                    }
                    other => warn!(fd = conn.as_raw_fd(), ?other, "unexpected message while attached; ignored"),
                },
                Ok(None) | Err(_) => return Ending::Gone,
            }
        }
    }
}

/// Stops a VM's service and control threads (see [`Winddown`]) when
/// dropped, and wakes its control thread to see it.
struct WindsDown<'a> {
    end: &'a Winddown,
    vm: &'a AttachedVm,
    control: Option<hyp_core::ring::RingView<'a>>,
}

impl Drop for WindsDown<'_> {
    fn drop(&mut self) {
        self.end.stop();
        self.vm.control.close();
        if let Some(view) = &self.control {
            faultline_attach::doorbell::wake(view);
        }
    }
}

/// Runs a connection's thread, its panic contained: logged, and the VM (its
/// registration, connection and descriptors dropped on the way out) let go,
/// so its machine re-attaches; no other VM is touched.
fn contained(serve: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(serve)).is_err() {
        error!("a connection's thread panicked: its VM is let go (its machine re-attaches)");
    }
}

/// Changes handed over while a VM is still served, at most, before its drain.
const CHANGE_ROUNDS: u32 = 3;
/// A change this small is left for after the drain (a few microseconds a
/// mapping to adopt then).
const SMALL_CHANGE: usize = 32;

/// Warm takeover, old daemon side: hands a snapshot of `vm`'s records over
/// while still serving it, and waits until the new daemon adopted it. The
/// faults served meanwhile change the records: while the change is not
/// small, it is handed over too, and adopted, still serving (pre-copy, as
/// live migration does with memory), so the change left for after the
/// drain, which the guests wait for, is a few mappings. Returns the journal
/// of what changed since what was last handed (None: the snapshot could
/// not be sent).
fn hand_snapshot<'v>(sink: &HandoverSink, vm: &'v AttachedVm, vm_id: u16) -> Option<ChangeJournal<'v>> {
    let (snapshot, mut journal) = vm.mapping.journal();
    let (started, mappings) = (std::time::Instant::now(), snapshot.mappings.len());
    info!(mappings, "handing a snapshot of the records over; serving on meanwhile");
    let mut adopted =
        sink.snapshot(vm_id, &snapshot).inspect_err(|e| error!(cause = %e, "handing the snapshot over failed")).ok()?;
    drop(snapshot);
    let mut rounds = 0;
    let mut changes = Vec::new();
    // A small change stays in the journal, for after the drain.
    while adopted && rounds < CHANGE_ROUNDS && journal.touched() > SMALL_CHANGE {
        let change = journal.change();
        changes.push(change.changes());
        adopted = match sink.changed(vm_id, &change) {
            Ok(adopted) => adopted,
            Err(e) => {
                error!(cause = %e, "handing a change over failed");
                false
            }
        };
        rounds += 1;
    }
    let waited_us = started.elapsed().as_micros() as u64;
    if adopted {
        info!(mappings, waited_us, ?changes, "the new daemon adopted the records' snapshot");
    } else {
        warn!(mappings, waited_us, ?changes, "the new daemon did not adopt the snapshot in time");
    }
    Some(journal)
}

/// What a handed VM comes with, once it is this daemon's.
enum HandedState {
    /// Records to check and adopt while its vCPUs are served (None:
    /// rebuild from the core).
    Drained(Option<HandedRecords>),
    /// A warm takeover's records, adopted (the snapshot) and amended (the
    /// delta), or why the VM must be rebuilt from the core instead.
    Warm(Result<Rebuilt, String>),
}

/// Waits for a handed VM's state. Warm, the snapshot is checked and
/// adopted while the old daemon still serves the VM; then the old daemon is
/// told to drain, and the delta amends what was adopted.
fn receive_state(vm: &AttachedVm, pending: PendingState) -> Result<HandedState, TakeoverError> {
    let (snapshot, delta) = match pending.wait()? {
        Handed::Drained(records) => return Ok(HandedState::Drained(records)),
        Handed::Warm(snapshot, delta) => (snapshot, delta),
    };
    // Adopted beside the old daemon still serving the VM, on the same
    // cores: in the background, so the faults it serves meanwhile come
    // first. Waiting for what comes next is not: the last change, which the
    // guests wait for, is taken at once.
    let background = || format!("vm{}-adopt", vm.id().raw());
    let mut adopted = run_in_background(background(), || match snapshot.map(|s| check_handed(vm, s)) {
        Some(Ok(checked)) => Ok(checked.adopt_snapshot(vm)),
        Some(Err(e)) => Err(format!("the snapshot does not fit the VM: {e}")),
        None => Err("the snapshot could not be read".to_string()),
    });
    // Each change while the VM is still served, adopted in turn, then the
    // last, after its drain. Not this daemon's VM if the exchange breaks:
    // what was adopted goes with it.
    let mut pending = delta;
    let last = loop {
        match pending.ready()? {
            Change::Served(change, next) => {
                adopted = run_in_background(background(), || amend(vm, adopted, change, "a change could not be read"));
                pending = next;
            }
            Change::Drained(last) => break last,
        }
    };
    if let Some(d) = &last {
        info!(put = d.put.len(), removed = d.removed.len(), "the old daemon's last change arrived");
    }
    let started = std::time::Instant::now();
    let why = "the old daemon sent no change (commands were in flight at the drain's end)";
    let adopted = amend(vm, adopted, last, why);
    Ok(HandedState::Warm(adopted.map(|warm| Rebuilt { elapsed: started.elapsed(), ..warm.adopted(vm) })))
}

/// Amends what a warm takeover adopted so far with `change` (None: it could
/// not be read, `why`, and all is let go for a rebuild from the core).
fn amend(
    vm: &AttachedVm,
    adopted: Result<WarmRecords, String>,
    change: Option<HandedDelta>,
    why: &str,
) -> Result<WarmRecords, String> {
    match (adopted, change) {
        (Ok(warm), Some(change)) => warm.amend(vm, change).map_err(|e| format!("a change does not fit: {e}")),
        (Ok(warm), None) => {
            warm.undo(vm);
            Err(why.to_string())
        }
        (Err(e), _) => Err(e),
    }
}

/// Makes a re-attached VM's swap stores agree with its memory (a reclaim
/// cut short by a crash left a page in both, or only in the store).
fn recover_stores(vm: &AttachedVm) -> Result<(), String> {
    for (i, r) in vm.layout.regions.iter().enumerate() {
        let recovered = r.recover_store().map_err(|e| format!("region {i}'s swap store: {e}"))?;
        if recovered != Default::default() {
            info!(region = i, kept = recovered.kept, dropped = recovered.dropped, "swap store recovered");
        }
    }
    Ok(())
}

/// Sends a reply on a machine's connection.
fn reply_on(conn: &OwnedFd, status: Status, message: String, values: [u64; 3]) {
    let r = Reply { status, message, values };
    if let Err(e) = send_message(conn.as_fd(), &r.encode(), &[]) {
        warn!(cause = %e, "sending reply failed");
    }
}

fn receive_attach(conn: &OwnedFd) -> Result<(AttachRequest, Vec<OwnedFd>), Refusal> {
    let _ = set_recv_timeout(conn.as_fd(), Duration::from_secs(5));
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
