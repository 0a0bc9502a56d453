//! A policy service as the fault path uses it: its rules applied locally,
//! and a per-fault consult under a deadline where its rules ask for one.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline_proto::convert::{access, map_size, mapping_size};
use faultline_proto::v1 as pb;
use faultline_proto::v1::memory_policy_client::MemoryPolicyClient;
use tokio::sync::Notify;
use tonic::transport::Channel;

use super::rules::{clamps, Rules};
use super::stats::PolicyStats;
use crate::fault::blocking::block_in_place;
use crate::fault::choices::{Budget, ColdReclaim, Decisions, FaultContext, Policy, MAX_FAULT_AROUND};

/// Per-fault questions to a policy, under a deadline.
pub(super) struct Consulter {
    pub(super) client: MemoryPolicyClient<Channel>,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) deadline: Duration,
    pub(super) strikes: u32,
    pub(super) late_in_row: AtomicU32,
    pub(super) trip: Notify,
    pub(super) stats: Arc<PolicyStats>,
}

impl Consulter {
    /// The policy's answer, or `None` if it did not come in time (counted;
    /// `strikes` in a row trip the watchdog).
    pub(super) fn ask(&self, ctx: &FaultContext) -> Option<pb::ConsultResponse> {
        self.stats.consults.fetch_add(1, Ordering::Relaxed);
        let req = pb::ConsultRequest {
            vm_id: ctx.vm_id as u32,
            vcpu: ctx.vcpu,
            ipa: ctx.ipa,
            memslot: ctx.memslot as u32,
            access: access(Some(ctx.access)) as i32,
            allowed: mapping_size(Some(ctx.allowed)) as i32,
            fault_id: ctx.fault_id,
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut client = self.client.clone();
        let deadline = self.deadline;
        self.rt.spawn(async move {
            let answer = tokio::time::timeout(deadline, client.consult(req)).await;
            let _ = tx.send(answer.ok().and_then(Result::ok).map(tonic::Response::into_inner));
        });
        // The pool serves the other rings while this thread waits.
        match block_in_place(|| rx.recv_timeout(deadline + Duration::from_millis(1))).ok().flatten() {
            Some(answer) => {
                self.late_in_row.store(0, Ordering::Relaxed);
                Some(answer)
            }
            None => {
                self.stats.consults_late.fetch_add(1, Ordering::Relaxed);
                if self.late_in_row.fetch_add(1, Ordering::Relaxed) + 1 >= self.strikes {
                    self.late_in_row.store(0, Ordering::Relaxed);
                    self.trip.notify_one();
                }
                None
            }
        }
    }
}

/// A policy service's rules, applied locally, with consults where its
/// rules ask.
pub(super) struct RemotePolicy {
    pub(super) name: &'static str,
    pub(super) rules: Rules,
    pub(super) consult: Option<Arc<Consulter>>,
    pub(super) stats: Arc<PolicyStats>,
}

impl Policy for RemotePolicy {
    fn name(&self) -> &'static str {
        self.name
    }

    fn decide(&self, ctx: &FaultContext) -> Decisions {
        let matched = self.rules.decide(ctx);
        let mut d = matched.decisions;
        let mut clamped = matched.clamped;
        if let Some(answer) = self.consult.as_ref().filter(|_| matched.consult).and_then(|c| c.ask(ctx)) {
            // A size the daemon does not know is ignored, not guessed at.
            let size = map_size(answer.max_mapping_size).ok().flatten();
            if let Some(s) = size {
                d.max_size = s;
            }
            if let Some(n) = answer.fault_around_pages {
                clamped += (n > MAX_FAULT_AROUND) as u64;
                d.fault_around = n.min(MAX_FAULT_AROUND);
            }
            d.writable_on_read = answer.writable_on_read.unwrap_or(d.writable_on_read);
            d.eager_exec = answer.eager_exec.unwrap_or(d.eager_exec);
            clamped += clamps(size, answer.writable_on_read, answer.eager_exec, ctx);
        }
        if clamped > 0 {
            self.stats.clamped.fetch_add(clamped, Ordering::Relaxed);
        }
        d
    }

    fn budget(&self, vm_id: u16) -> Option<Budget> {
        self.rules.budget(vm_id)
    }

    fn cold_reclaim(&self, vm_id: u16) -> Option<ColdReclaim> {
        self.rules.cold_reclaim(vm_id)
    }
}

#[cfg(test)]
mod tests {
    use hyp_core::abort::Access;
    use hyp_core::stage2::MapSize;
    use tonic::transport::Endpoint;

    use super::*;
    use crate::fault::blocking::{set_blocker, testing::Logged};

    #[test]
    fn a_consult_waits_in_place_so_the_pool_serves_on() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        // Nothing listens there: the consult fails, late.
        let channel = {
            let _entered = rt.enter();
            Endpoint::from_static("http://127.0.0.1:9").connect_lazy()
        };
        let consulter = Consulter {
            client: MemoryPolicyClient::new(channel),
            rt: rt.handle().clone(),
            deadline: Duration::from_millis(5),
            strikes: 3,
            late_in_row: AtomicU32::new(0),
            trip: Notify::new(),
            stats: Arc::default(),
        };
        let log = Logged::default();
        set_blocker(Box::new(log.clone()));
        let ctx = FaultContext {
            vm_id: 1,
            vcpu: 0,
            fault_id: 1,
            ipa: 0x4000_0000,
            memslot: 0,
            access: Access::Read,
            allowed: MapSize::Block2M,
            may_write: true,
            may_exec: true,
        };
        assert!(consulter.ask(&ctx).is_none(), "nobody answered");
        assert_eq!(*log.0.lock().unwrap(), ["enter", "leave"], "the wait was said aloud");
        assert_eq!(consulter.stats.consults_late.load(Ordering::Relaxed), 1);
    }
}
