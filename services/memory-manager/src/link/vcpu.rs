//! One vCPU's ring service: takes its faults, runs the pipeline, sends the
//! commands and settles their results, a bounded batch per call (the
//! [`super::pool`] calls it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use faultline_attach::doorbell;
use hyp_core::addr::PAGE_SIZE;
use hyp_core::reject::Reject;
use hyp_core::ring::abi::{action, kind, CommandRecord, FaultRecord, Record, ResultRecord};
use hyp_core::ring::{Consumer, Producer, RingError, RingView};
use hyp_core::stage2::MapSize;
use hyp_core::vm::map_outcome;
use tracing::{debug, error, warn};

use super::evict;
use super::pool::{RingService, Served};
use super::vm::AttachedVm;
use super::winddown::Winddown;
use crate::fault::around::plan_around;
use crate::fault::blocking::block_in_place;
use crate::fault::clock;
use crate::fault::error::PipelineError;
use crate::fault::failpoint::{crash_point, panic_point};
use crate::fault::pipeline::handle_fault;
use crate::fault::plan::{AroundPlan, Decision, Exit, MapPlan};
use crate::fault::trace::Trace;
use crate::memory::mapping::Installed;
use crate::observe::events::{FaultEvent, Outcome};
use crate::observe::hub::EventHub;
use crate::policy::host::PolicyHost;

/// Pages handed to the core per memcache top-up.
const TOPUP_PAGES: u64 = 64;

/// How long a draining vCPU service waits for a result before it gives up.
const DRAIN_PATIENCE: Duration = Duration::from_secs(5);

/// A map command in flight and the event it will complete.
struct PendingMap {
    plan: MapPlan,
    fault_id: u64,
    event: FaultEvent,
    trace: Trace,
}

enum Pending {
    Map(Box<PendingMap>),
    Around(Box<AroundPlan>),
    Other,
}

/// Serves one vCPU's rings, a batch at a time ([`RingService::serve`]),
/// until its [`Winddown`] ends it or the peer breaks the protocol.
pub struct VcpuService<'r, 'v> {
    vm: &'v AttachedVm,
    end: &'v Winddown,
    /// When draining found a command still in flight, first.
    draining_since: Option<Instant>,
    policy: &'v PolicyHost,
    hub: &'v EventHub,
    vcpu: u32,
    faults: Consumer<'r>,
    commands: Producer<'r>,
    pending: HashMap<u64, Pending>,
    next_cmd: u64,
    /// The last fault id taken from the ring: a record at or below it is a
    /// fault posted again after a re-attach that is already being served.
    last_fault: u64,
}

impl RingService for VcpuService<'_, '_> {
    /// Serves at most `budget` records from the fault ring, as the winddown
    /// allows: once stopped, settles the results already on the ring and
    /// finishes; once draining, finishes at the first fault boundary
    /// (nothing in flight), or when the core does not answer within
    /// [`DRAIN_PATIENCE`].
    fn serve(&mut self, budget: u32) -> Result<Served, RingError> {
        self.serve_batch(budget)
    }

    /// The fault ring, whose doorbell rings when the core posts to it.
    fn doorbell(&self) -> RingView<'_> {
        self.faults.view()
    }

    /// The command ring, whose doorbell the pool rings after each batch.
    fn answers(&self) -> Option<RingView<'_>> {
        Some(self.commands.view())
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Stops the whole VM's service (its [`Winddown`]): a VM whose
    /// connection unwinds is let go.
    fn stop(&self) {
        self.end.stop();
    }
}

impl<'r, 'v> VcpuService<'r, 'v> {
    /// A service over `vcpu`'s fault ring (consumed) and command ring
    /// (produced), ended by `end`.
    pub fn new(
        vm: &'v AttachedVm,
        policy: &'v PolicyHost,
        hub: &'v EventHub,
        end: &'v Winddown,
        vcpu: u32,
        faults: Consumer<'r>,
        commands: Producer<'r>,
    ) -> Self {
        vm.rings[vcpu as usize].set_capacity(faults.view().capacity());
        Self {
            vm,
            end,
            draining_since: None,
            policy,
            hub,
            vcpu,
            faults,
            commands,
            pending: HashMap::new(),
            next_cmd: super::instance_tag() << 48 | u64::from(vcpu) << 32,
            last_fault: 0,
        }
    }

    /// The event for `rec` as far as `trace` knows it.
    fn event(&self, rec: &FaultRecord, trace: &Trace, outcome: Outcome) -> FaultEvent {
        FaultEvent {
            seq: 0,
            time: clock::wall_time(trace.start),
            fault_id: rec.fault_id,
            vm_id: self.vm.id().raw(),
            vcpu: self.vcpu,
            ipa: rec.ipa,
            esr: rec.esr,
            status: trace.abort.map(|a| a.status),
            access: trace.abort.map(|a| a.access),
            memslot: trace.memslot,
            hva: trace.hva,
            vma_page_size: trace.vma_page_size,
            mapping_size: None,
            permissions: 0,
            pa: 0,
            outcome,
            policy: trace.policy,
            stages: trace.stages,
            sent_ns: trace.elapsed_ns(),
            completed_ns: trace.elapsed_ns(),
            populated: trace.populated,
            fault_around: 0,
        }
    }

    fn serve_batch(&mut self, budget: u32) -> Result<Served, RingError> {
        let end = self.end;
        let stop = end.stopping();
        if end.stopped() {
            // The machine detached (or the daemon stops): settle the results
            // already on the ring, so their pins and events are accounted
            // for. Nobody waits for new faults any more.
            while let Some(record) = self.faults.pop()? {
                if record.kind() == kind::RESULT {
                    self.on_result(&ResultRecord::decode(&record), stop)?;
                }
            }
            return Ok(Served::Finished { in_flight: self.pending.len() });
        }
        let mut served = 0;
        let mut draining = false;
        while served < budget {
            // Looked at before each record: a drain that starts mid-batch
            // ends it at the next fault boundary, and a result that ends the
            // last command in flight is that boundary. A fault behind it
            // (the vCPU resumed by that very map) is the next daemon's:
            // served here, it would send another map and keep the service,
            // and the handover, going for as long as the vCPU keeps faulting.
            draining = end.draining().load(Ordering::Acquire);
            if draining && self.pending.is_empty() {
                return Ok(Served::Finished { in_flight: 0 });
            }
            let Some(record) = self.faults.pop()? else { break };
            served += 1;
            self.on_record(record, stop)?;
        }
        if served > 0 {
            return Ok(Served::Worked(served));
        }
        if draining {
            // A command in flight: its result is due from the core, which
            // answers without the daemon's help. A core that stopped
            // answering (its machine died) does not hold the handover: what
            // is still in flight is reported, and the next daemon rebuilds
            // from the core.
            if self.draining_since.get_or_insert_with(Instant::now).elapsed() > DRAIN_PATIENCE {
                warn!(vm = %self.vm.id(), vcpu = self.vcpu, in_flight = self.pending.len(), "no result within the drain's patience; handing over anyway");
                return Ok(Served::Finished { in_flight: self.pending.len() });
            }
        }
        Ok(Served::Idle)
    }

    fn on_record(&mut self, record: Record, stop: &AtomicBool) -> Result<(), RingError> {
        let occupancy = &self.vm.rings[self.vcpu as usize];
        occupancy.note_faults(self.faults.len()?);
        match record.kind() {
            kind::FAULT => {
                let rec = FaultRecord::decode(&record);
                if rec.fault_id <= self.last_fault {
                    debug!(vm = %self.vm.id(), vcpu = self.vcpu, fault = rec.fault_id, "fault posted again; already taken");
                    self.vm.counters.reposted.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                self.last_fault = rec.fault_id;
                self.on_fault(&rec, stop)
            }
            kind::RESULT => self.on_result(&ResultRecord::decode(&record), stop),
            other => {
                warn!(vm = %self.vm.id(), vcpu = self.vcpu, kind = other, "unknown record kind on fault ring");
                self.vm.counters.errors.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Handles one fault and sends its command.
    pub fn on_fault(&mut self, rec: &FaultRecord, stop: &AtomicBool) -> Result<(), RingError> {
        crash_point("fault-popped");
        panic_point("fault-popped");
        self.vm.counters.faults.fetch_add(1, Ordering::Relaxed);
        self.vm.mapping.note_seq(rec.inval_seq);
        let mut trace = Trace::start();
        // One load: the whole fault is decided by one policy, whatever swaps.
        let policy = self.policy.load();
        trace.policy = policy.policy.name();
        let decision = match handle_fault(self.vm.view(), &*policy.policy, rec, &mut trace) {
            Ok(d) => d,
            Err(PipelineError::HostPressure(refused)) => {
                // Said once per episode by the pressure watcher, not per fault.
                debug!(vm = %self.vm.id(), vcpu = self.vcpu, fault = rec.fault_id, cause = %refused, "injecting abort");
                self.vm.counters.injected.fetch_add(1, Ordering::Relaxed);
                self.hub.record(self.event(rec, &trace, Outcome::RefusedHostPressure));
                return self.complete(rec.fault_id, action::INJECT_ABORT, stop);
            }
            Err(e) => {
                error!(vm = %self.vm.id(), vcpu = self.vcpu, fault = rec.fault_id, cause = %e, "fault pipeline failed; injecting abort");
                self.vm.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.hub.record(self.event(rec, &trace, Outcome::InjectedAbort));
                return self.complete(rec.fault_id, action::INJECT_ABORT, stop);
            }
        };
        match decision {
            Decision::Map(plan) => {
                // Fault-around first: the core maps the neighbours before
                // the fault's own map resumes the vCPU. At most half the
                // command ring, so the batch never waits on the core.
                let room = (self.commands.view().capacity() / 2).saturating_sub(1);
                let around = match plan.fault_around().min(room) {
                    0 => Vec::new(),
                    n => plan_around(self.vm.view(), &plan, n),
                };
                let sent_around = around.len() as u32;
                for a in around {
                    self.send_prefault(a, stop)?;
                }
                self.send_map(plan, rec.fault_id, trace, stop, |s, plan| {
                    let mut event = s.event(rec, &trace, Outcome::Mapped);
                    (event.mapping_size, event.permissions, event.pa) =
                        (Some(plan.size), plan.perms.bits(), plan.pa.raw());
                    event.fault_around = sent_around;
                    event
                })
            }
            Decision::Exit(exit) => {
                let (counter, outcome) = match exit {
                    Exit::Mmio(_) | Exit::CacheMaintenance { .. } => (&self.vm.counters.mmio_exits, Outcome::MmioExit),
                    Exit::NoSyndrome { .. } | Exit::ExecOnDevice { .. } => {
                        (&self.vm.counters.no_syndrome_exits, Outcome::NoSyndromeExit)
                    }
                };
                counter.fetch_add(1, Ordering::Relaxed);
                debug!(vm = %self.vm.id(), vcpu = self.vcpu, ?exit, "exit to VMM");
                self.hub.record(self.event(rec, &trace, outcome));
                self.complete(rec.fault_id, action::EXIT_TO_VMM, stop)
            }
            Decision::Inject(reason) => {
                self.vm.counters.injected.fetch_add(1, Ordering::Relaxed);
                debug!(vm = %self.vm.id(), vcpu = self.vcpu, ?reason, "injecting abort");
                self.hub.record(self.event(rec, &trace, Outcome::InjectedAbort));
                self.complete(rec.fault_id, action::INJECT_ABORT, stop)
            }
        }
    }

    /// Sends the map command first, then builds its event (off the path the
    /// vCPU waits on) and remembers both until the result arrives.
    fn send_map(
        &mut self,
        plan: MapPlan,
        fault_id: u64,
        trace: Trace,
        stop: &AtomicBool,
        event: impl FnOnce(&Self, &MapPlan) -> FaultEvent,
    ) -> Result<(), RingError> {
        let cmd = plan.command(self.cmd_id(), fault_id);
        // A write into a logged memslot is dirty before the vCPU can resume
        // (KVM marks it before returning to the guest): the core resumes
        // the vCPU as soon as it installs the map, before this thread sees
        // the result. A map that is then refused leaves a spurious bit,
        // which only costs a copy; a missing bit would lose a write.
        if let Some(slot) = self.vm.layout.memslots.lookup(plan.fault_ipa).filter(|_| plan.marks_dirty) {
            self.vm.mapping.mark_dirty(slot, plan.fault_ipa);
        }
        let sent = self.send(&cmd, stop);
        crash_point("map-sent");
        let mut event = event(self, &plan);
        event.sent_ns = trace.elapsed_ns();
        self.pending.insert(cmd.cmd_id, Pending::Map(Box::new(PendingMap { plan, fault_id, event, trace })));
        sent
    }

    /// Reclaims (directly, before this vCPU's next fault is served) if an
    /// install took the VM over its budget; keeps install orders while the
    /// budget evicts by them.
    fn check_budget(&self, stop: &AtomicBool) {
        let policy = &self.policy.load().policy;
        let budget = policy.budget(self.vm.id().raw());
        self.vm.mapping.keep_install_orders(budget.is_some_and(|b| b.order.reads_install_order()));
        if let Some(budget) = budget {
            if self.vm.mapping.resident() > budget.max_resident {
                // Waits on the control ring and the disk: the pool serves
                // the other rings meanwhile.
                block_in_place(|| evict::enforce(self.vm, budget, stop));
            }
        }
    }

    fn send_prefault(&mut self, a: AroundPlan, stop: &AtomicBool) -> Result<(), RingError> {
        let cmd = a.command(self.cmd_id());
        self.pending.insert(cmd.cmd_id, Pending::Around(Box::new(a)));
        self.send(&cmd, stop)
    }

    fn complete(&mut self, fault_id: u64, act: u32, stop: &AtomicBool) -> Result<(), RingError> {
        let cmd =
            CommandRecord { kind: kind::COMPLETE, flags: act, cmd_id: self.cmd_id(), fault_id, ..Default::default() };
        self.pending.insert(cmd.cmd_id, Pending::Other);
        self.send(&cmd, stop)
    }

    fn topup(&mut self, stop: &AtomicBool) -> Result<bool, RingError> {
        let Some((first, pages)) = self.vm.mapping.take_table_pages(TOPUP_PAGES) else {
            return Ok(false);
        };
        self.vm.counters.topups.fetch_add(1, Ordering::Relaxed);
        let cmd = CommandRecord {
            kind: kind::TOPUP,
            cmd_id: self.cmd_id(),
            pa: first.raw(),
            size: pages * PAGE_SIZE,
            ..Default::default()
        };
        self.pending.insert(cmd.cmd_id, Pending::Other);
        self.send(&cmd, stop)?;
        Ok(true)
    }

    fn on_result(&mut self, res: &ResultRecord, stop: &AtomicBool) -> Result<(), RingError> {
        self.vm.mapping.note_seq(res.inval_seq);
        let Some(pending) = self.pending.remove(&res.cmd_id) else {
            if res.cmd_id >> 48 & 0x7fff != super::instance_tag() {
                // Sent by the daemon this one took the VM from: its
                // effect is in the rebuilt state already.
                debug!(vm = %self.vm.id(), vcpu = self.vcpu, cmd = res.cmd_id, "result of a predecessor's command");
            } else {
                warn!(vm = %self.vm.id(), vcpu = self.vcpu, cmd = res.cmd_id, "result for an unknown command");
            }
            return Ok(());
        };
        if let Pending::Around(a) = pending {
            // Installed: recorded like any mapping. Anything else (already
            // mapped, stale): the pin goes with the plan.
            if res.status == 0 && res.value == map_outcome::INSTALLED {
                self.vm.counters.prefaulted.fetch_add(1, Ordering::Relaxed);
                let AroundPlan { ipa, pa, pin, .. } = *a;
                let installed = Installed::new(MapSize::Page4K, pa, res.inval_seq, pin.into_mapping());
                self.vm.record_installed(ipa, installed);
                self.check_budget(stop);
            } else if res.status != 0 && Reject::from_code(res.status) != Some(Reject::StaleSequence) {
                warn!(vm = %self.vm.id(), vcpu = self.vcpu, reason = ?Reject::from_code(res.status), ipa = %a.ipa, "core refused a fault-around page");
            }
            return Ok(());
        }
        let Pending::Map(pending) = pending else {
            if res.status != 0 {
                warn!(vm = %self.vm.id(), vcpu = self.vcpu, kind = res.command_kind, reason = ?Reject::from_code(res.status), "core refused a command");
            }
            return Ok(());
        };
        let PendingMap { plan, fault_id, mut event, trace } = *pending;
        event.outcome = match (res.status, Reject::from_code(res.status)) {
            (0, _) => self.installed(plan, res),
            (_, Some(Reject::StaleSequence)) => {
                // The core completed the fault as a retry; the pin goes with `plan`.
                self.vm.counters.retried_stale.fetch_add(1, Ordering::Relaxed);
                Outcome::RetriedStale
            }
            (_, Some(Reject::MemcacheLow)) => {
                if self.topup(stop)? {
                    return self.send_map(plan, fault_id, trace, stop, |_, _| event);
                }
                error!(vm = %self.vm.id(), "table-page pool exhausted; injecting abort");
                self.complete(fault_id, action::INJECT_ABORT, stop)?;
                Outcome::InjectedAbort
            }
            (code, reason) => {
                warn!(vm = %self.vm.id(), vcpu = self.vcpu, code, ?reason, ipa = %plan.ipa, "core refused a map; retrying the fault");
                self.vm.counters.rejected.fetch_add(1, Ordering::Relaxed);
                self.complete(fault_id, action::RETRY, stop)?;
                Outcome::Rejected(reason)
            }
        };
        event.completed_ns = trace.elapsed_ns();
        let mapped = event.outcome == Outcome::Mapped;
        self.hub.record(event);
        if mapped {
            self.check_budget(stop);
        }
        Ok(())
    }

    fn installed(&mut self, plan: MapPlan, res: &ResultRecord) -> Outcome {
        match res.value {
            map_outcome::INSTALLED => {
                let installed = Installed::new(plan.size, plan.pa, res.inval_seq, plan.pin.into_mapping());
                if !self.vm.record_installed(plan.ipa, installed) {
                    debug!(vm = %self.vm.id(), ipa = %plan.ipa, "mapping already invalidated when its result arrived");
                }
                Outcome::Mapped
            }
            map_outcome::RELAXED => {
                self.vm.counters.relaxed.fetch_add(1, Ordering::Relaxed);
                Outcome::Relaxed
            }
            _ => {
                self.vm.counters.already_present.fetch_add(1, Ordering::Relaxed);
                Outcome::AlreadyPresent
            }
        }
    }

    fn cmd_id(&mut self) -> u64 {
        self.next_cmd += 1;
        self.next_cmd
    }

    /// Pushes `cmd` without ringing: the pool rings the command ring once
    /// it has let this service go ([`RingService::answers`]). A full ring is
    /// rung at once, so that a sleeping core makes room.
    fn send(&mut self, cmd: &CommandRecord, stop: &AtomicBool) -> Result<(), RingError> {
        loop {
            match self.commands.push(&cmd.encode()) {
                Err(RingError::Full) if !stop.load(Ordering::Acquire) => {
                    doorbell::ring(&self.commands.view());
                    std::thread::yield_now();
                }
                Ok(()) => {
                    self.vm.rings[self.vcpu as usize].note_commands(self.commands.len()?);
                    return Ok(());
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hyp_core::addr::Pa;
    use hyp_core::ownership::VmId;
    use hyp_core::ring::OwnedRing;

    use super::*;
    use crate::link::pool::testing;
    use crate::memory::layout::VmLayout;
    use crate::memory::memslot::SlotFlags;
    use crate::memory::pool::PagePool;
    use crate::policy::builtin::Pages4k;

    const GPA: u64 = 0x8000_0000;
    /// A stage-2 translation fault at level 3 on a read.
    const READ_L3: u64 = (0x24 << 26) | (1 << 25) | 0b00_0111;

    fn fault(fault_id: u64, ipa: u64) -> Record {
        let far = ipa;
        let hpfar = (ipa >> 12) << 4;
        FaultRecord {
            kind: kind::FAULT,
            vcpu: 0,
            fault_id,
            esr: READ_L3,
            far,
            hpfar,
            ipa,
            inval_seq: 0,
            timestamp_ns: 0,
        }
        .encode()
    }

    /// A VM with 1 MiB of RAM at [`GPA`] under the 4 KiB policy, its event
    /// hub and its winddown.
    fn one_vm() -> (AttachedVm, PolicyHost, EventHub, Winddown) {
        let slots = [(GPA, 1 << 20, 0, SlotFlags::default())];
        let layout = VmLayout::single_region(VmId::new(1).unwrap(), Pa::new(0x4000_0000), 1 << 20, 4096, &slots);
        let pool = PagePool::new(vec![(Pa::new(0x1000_0000), 64 * PAGE_SIZE)]);
        let vm = AttachedVm::new(layout.unwrap(), pool);
        let policy = PolicyHost::new(Box::new(Pages4k), Default::default(), None).unwrap();
        (vm, policy, EventHub::new(16), Winddown::default())
    }

    #[test]
    fn a_drain_ends_at_the_result_of_the_last_command_and_leaves_the_fault_behind_it() {
        let (vm, policy, hub, end) = one_vm();
        let (fault_ring, command_ring) = (OwnedRing::new(), OwnedRing::new());
        let (mut core_faults, mut core_commands) =
            (Producer::attach(fault_ring.view()).unwrap(), Consumer::attach(command_ring.view()).unwrap());
        let (faults, commands) =
            (Consumer::attach(fault_ring.view()).unwrap(), Producer::attach(command_ring.view()).unwrap());
        let mut service = VcpuService::new(&vm, &policy, &hub, &end, 0, faults, commands);
        core_faults.push(&fault(1, GPA)).unwrap();
        assert_eq!(service.serve(8).unwrap(), Served::Worked(1));
        assert!(service.in_flight() > 0, "its map (and any top-up) in flight");
        // The core answers every command, which resumes the vCPU; it
        // faults again at once; then the drain starts.
        while let Some(r) = core_commands.pop().unwrap() {
            let cmd = CommandRecord::decode(&r);
            let value = if cmd.kind == kind::MAP { map_outcome::INSTALLED } else { 0 };
            core_faults
                .push(&ResultRecord { kind: kind::RESULT, cmd_id: cmd.cmd_id, value, ..Default::default() }.encode())
                .unwrap();
        }
        core_faults.push(&fault(2, GPA + PAGE_SIZE)).unwrap();
        end.drain();
        assert_eq!(service.serve(8).unwrap(), Served::Finished { in_flight: 0 });
        assert_eq!(vm.counters.faults.load(Ordering::Relaxed), 1, "the second fault is the next daemon's");
        assert!(core_commands.pop().unwrap().is_none(), "no command sent for it");
        assert_eq!(vm.mapping.mapping_count(), 1, "the first fault's map recorded");
    }

    #[test]
    fn a_map_is_sent_without_waking_the_core_until_the_pool_rings_it() {
        let (vm, policy, hub, end) = one_vm();
        let (fault_ring, command_ring) = (OwnedRing::new(), OwnedRing::new());
        let mut core_faults = Producer::attach(fault_ring.view()).unwrap();
        let (faults, commands) =
            (Consumer::attach(fault_ring.view()).unwrap(), Producer::attach(command_ring.view()).unwrap());
        let mut service = VcpuService::new(&vm, &policy, &hub, &end, 0, faults, commands);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            // The core's vCPU, asleep on its command ring.
            let vcpu = s.spawn(|| {
                tx.send(testing::thread_id()).unwrap();
                let mut commands = Consumer::attach(command_ring.view()).unwrap();
                let never = AtomicBool::new(false);
                doorbell::sleep_pop(&mut commands, Duration::from_secs(30), &never).unwrap().map(|r| r.0[0])
            });
            testing::wait_asleep(rx.recv().unwrap());
            core_faults.push(&fault(1, GPA)).unwrap();
            assert_eq!(service.serve(8).unwrap(), Served::Worked(1));
            std::thread::sleep(Duration::from_millis(100));
            assert!(!vcpu.is_finished(), "the core was woken while its service was held");
            doorbell::ring(&service.answers().unwrap());
            let first = vcpu.join().unwrap();
            assert!(first.is_some(), "the command waited on the ring for the doorbell");
        });
    }
}
