//! FaultTrace: Observe (last/first N, follow, since/until, allow and deny
//! filters, field masks, lost-event records), ServerStatus and GetStats,
//! following Cilium Hubble's Observer.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use faultline_proto::convert::{access, mapping_size, timestamp};
use faultline_proto::v1::fault_trace_server::FaultTrace;
use faultline_proto::v1::{
    self as pb, lost_events, observe_response, Count, FaultFilter, GetStatsRequest, GetStatsResponse, LostEvents,
    ObserveRequest, ObserveResponse, ServerStatusRequest, ServerStatusResponse,
};
use tokio::sync::{watch, Notify};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{self, kind_of, outcome_of, request_time};
use super::sources::Sources;
use crate::observe::events::FaultEvent;
use crate::observe::hub::{EventHub, Reader};

type EventStream = Pin<Box<dyn Stream<Item = Result<ObserveResponse, Status>> + Send>>;

/// The FaultTrace service.
pub struct FaultTraceService {
    sources: Sources,
    shutdown: CancellationToken,
    /// The events recorded, as last looked at: caught-up followers wait
    /// for it to change.
    grew: watch::Receiver<u64>,
    /// Told when a follower starts, so the history is looked at again.
    followed: Arc<Notify>,
}

impl FaultTraceService {
    /// The service over `sources`; follow streams end when `shutdown` is
    /// cancelled. Starts the task that tells followers the history grew
    /// (so it must be called within a tokio runtime).
    pub fn new(sources: Sources, shutdown: CancellationToken) -> Self {
        let followed = Arc::new(Notify::new());
        let grew = watch_history(sources.events.clone(), followed.clone(), shutdown.clone());
        Self { sources, shutdown, grew, followed }
    }
}

/// Looks at the history every [`FOLLOW_POLL`] while anyone follows it, and
/// tells the followers waiting on the returned receiver when it grew: one
/// timer for every follower, none of them woken while no event comes, and
/// no timer at all while nobody follows (it was 200 wake-ups a second on
/// an idle daemon). A follower that starts notifies `followed`.
fn watch_history(events: Arc<EventHub>, followed: Arc<Notify>, shutdown: CancellationToken) -> watch::Receiver<u64> {
    let (grew, rx) = watch::channel(events.seen());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FOLLOW_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The service keeps one receiver; each follower holds a clone.
            if grew.receiver_count() <= 1 {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = followed.notified() => tick.reset_immediately(),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let seen = events.seen();
            grew.send_if_modified(|last| std::mem::replace(last, seen) != seen);
        }
    });
    rx
}

/// A validated filter: the proto filter with its enums checked.
struct Filter(FaultFilter);

fn check_enum<T: TryFrom<i32>>(values: &[i32], field: &str) -> Result<(), Status> {
    for &v in values {
        if v == 0 || T::try_from(v).is_err() {
            return Err(Status::invalid_argument(format!("filter field {field}: unknown value {v}")));
        }
    }
    Ok(())
}

impl Filter {
    fn new(f: FaultFilter) -> Result<Self, Status> {
        check_enum::<pb::FaultKind>(&f.kind, "kind")?;
        check_enum::<pb::Access>(&f.access, "access")?;
        check_enum::<pb::Outcome>(&f.outcome, "outcome")?;
        check_enum::<pb::MappingSize>(&f.mapping_size, "mapping_size")?;
        for r in &f.ipa_range {
            if r.start >= r.end {
                return Err(Status::invalid_argument(format!(
                    "ipa_range {:#x}..{:#x} is empty or inverted",
                    r.start, r.end
                )));
            }
        }
        Ok(Self(f))
    }

    fn matches(&self, e: &FaultEvent) -> bool {
        let f = &self.0;
        let any = |values: &[i32], v: i32| values.is_empty() || values.contains(&v);
        let any_u32 = |values: &[u32], v: Option<u32>| values.is_empty() || v.is_some_and(|v| values.contains(&v));
        any_u32(&f.vm_id, Some(e.vm_id as u32))
            && any_u32(&f.vcpu, Some(e.vcpu))
            && any_u32(&f.memslot, e.memslot)
            && (f.ipa_range.is_empty() || f.ipa_range.iter().any(|r| (r.start..r.end).contains(&e.ipa)))
            && any(&f.kind, kind_of(e.status) as i32)
            && any(&f.access, access(e.access) as i32)
            && any(&f.outcome, outcome_of(e.outcome) as i32)
            && any(&f.mapping_size, mapping_size(e.mapping_size) as i32)
            && e.completed_ns >= f.min_latency_ns
    }
}

/// What an Observe call asks for, validated.
struct Query {
    number: u64,
    first: bool,
    follow: bool,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
    allow: Vec<Filter>,
    deny: Vec<Filter>,
    mask: Vec<String>,
}

const MASKABLE: &[&str] = &[
    "time",
    "fault_id",
    "vm_id",
    "vcpu",
    "ipa",
    "esr",
    "kind",
    "level",
    "access",
    "memslot",
    "hva",
    "vma_page_size",
    "mapping_size",
    "permissions",
    "pa",
    "outcome",
    "reject_reason",
    "policy",
    "stages",
    "latency_ns",
    "populated",
    "fault_around",
];

/// Validates `request` as Observe does and, if it is valid, runs its
/// filters and field mask over `event`: whether the event matches. For the
/// fuzz targets (feature `fuzzing`): the same code the service runs.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn check_observe(request: ObserveRequest, event: &FaultEvent) -> Result<bool, Status> {
    let query = Query::parse(request, |vm| vm <= u32::from(u8::MAX))?;
    let matched = query.matches(event);
    query.response(event);
    Ok(matched)
}

impl Query {
    fn parse(r: ObserveRequest, known_vm: impl Fn(u32) -> bool) -> Result<Self, Status> {
        if r.first && r.follow {
            return Err(Status::invalid_argument("`first` cannot be combined with `follow`"));
        }
        let since = r.since.as_ref().map(request_time).transpose()?;
        let until = r.until.as_ref().map(request_time).transpose()?;
        if let (Some(s), Some(u)) = (since, until) {
            if s > u {
                return Err(Status::invalid_argument("`since` is after `until`"));
            }
        }
        let allow = r.allowlist.into_iter().map(Filter::new).collect::<Result<Vec<_>, _>>()?;
        let deny = r.denylist.into_iter().map(Filter::new).collect::<Result<Vec<_>, _>>()?;
        for f in &allow {
            if let Some(vm) = f.0.vm_id.iter().find(|&&vm| !known_vm(vm)) {
                return Err(Status::not_found(format!("vm {vm} is not attached and has no events")));
            }
        }
        let mask = r.field_mask.map(|m| m.paths).unwrap_or_default();
        if let Some(bad) = mask.iter().find(|p| !MASKABLE.contains(&p.as_str())) {
            return Err(Status::invalid_argument(format!("field_mask: unknown field {bad:?}")));
        }
        Ok(Self { number: r.number, first: r.first, follow: r.follow, since, until, allow, deny, mask })
    }

    fn matches(&self, e: &FaultEvent) -> bool {
        self.since.is_none_or(|s| e.time >= s)
            && self.until.is_none_or(|u| e.time <= u)
            && (self.allow.is_empty() || self.allow.iter().any(|f| f.matches(e)))
            && !self.deny.iter().any(|f| f.matches(e))
    }

    fn response(&self, e: &FaultEvent) -> ObserveResponse {
        let mut ev = convert::event(e);
        if !self.mask.is_empty() {
            ev = masked(ev, &self.mask);
        }
        ObserveResponse { time: ev.time, response_types: Some(observe_response::ResponseTypes::Fault(ev)) }
    }
}

/// How often the history is looked at for followers that caught up.
const FOLLOW_POLL: Duration = Duration::from_millis(5);

/// A follower: its own reader in the history, so it copies events only as
/// fast as its client takes them (the stream is polled only when the
/// connection has room) and is told of the ones it missed, one record per
/// gap.
struct Follow {
    sources: Sources,
    reader: Reader,
    query: Arc<Query>,
    shutdown: CancellationToken,
    grew: watch::Receiver<u64>,
}

impl Follow {
    /// The next responses; `None` once the daemon shuts down.
    async fn next_batch(&mut self) -> Option<Vec<ObserveResponse>> {
        loop {
            let chunk = self.sources.events.read(&mut self.reader);
            let mut out = Vec::new();
            if chunk.lost > 0 {
                out.push(lost(lost_events::Source::RingBuffer, chunk.lost));
            }
            out.extend(chunk.events.iter().filter(|e| self.query.matches(e)).map(|e| self.query.response(e)));
            if !out.is_empty() {
                return Some(out);
            }
            if chunk.events.is_empty() {
                // Caught up: until the history grows (a change since the
                // last look wakes at once, so none is missed), or, waiting
                // for an event being written, shortly.
                tokio::select! {
                    _ = self.shutdown.cancelled() => return None,
                    changed = self.grew.changed(), if !self.reader.stalled() => if changed.is_err() { return None },
                    _ = tokio::time::sleep(FOLLOW_POLL), if self.reader.stalled() => {}
                }
            } else {
                // A batch that matched nothing: read on, fairly.
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Keeps only the fields named in `mask`.
fn masked(ev: pb::FaultEvent, mask: &[String]) -> pb::FaultEvent {
    let keep = |f: &str| mask.iter().any(|m| m == f);
    let mut out = pb::FaultEvent::default();
    macro_rules! copy {
        ($($f:ident),*) => { $(if keep(stringify!($f)) { out.$f = ev.$f.clone(); })* };
    }
    copy!(
        time,
        fault_id,
        vm_id,
        vcpu,
        ipa,
        esr,
        kind,
        level,
        access,
        memslot,
        hva,
        vma_page_size,
        mapping_size,
        permissions,
        pa,
        outcome,
        reject_reason,
        policy,
        stages,
        latency_ns,
        populated,
        fault_around
    );
    out
}

fn lost(source: lost_events::Source, n: u64) -> ObserveResponse {
    ObserveResponse {
        time: Some(timestamp(SystemTime::now())),
        response_types: Some(observe_response::ResponseTypes::LostEvents(LostEvents {
            source: source as i32,
            num_events_lost: n,
        })),
    }
}

#[tonic::async_trait]
impl FaultTrace for FaultTraceService {
    type ObserveStream = EventStream;

    #[instrument(skip(self, request), fields(peer = ?request.remote_addr()))]
    async fn observe(&self, request: Request<ObserveRequest>) -> Result<Response<EventStream>, Status> {
        // Held by the stream, so it closes with it.
        let open = self.sources.streams.open()?;
        let hub = &self.sources.events;
        let exits = self.sources.policies.subscribe_exits();
        // Followers go on from what the history snapshot ends with.
        let seen_before = hub.status().seen_events;
        let history = hub.history();
        let attached: Vec<u32> = self.sources.vms.list().iter().map(|v| v.id().raw() as u32).collect();
        let query = Query::parse(request.into_inner(), |vm| {
            attached.contains(&vm) || history.iter().any(|e| e.vm_id as u32 == vm)
        })?;
        let matching: Vec<&FaultEvent> = history.iter().filter(|e| query.matches(e)).collect();
        // number 0: everything in the buffer, or nothing of it when following.
        let n = match (query.number, query.follow) {
            (0, false) => matching.len(),
            (0, true) => 0,
            (n, _) => (n as usize).min(matching.len()),
        };
        let picked = if query.first { &matching[..n] } else { &matching[matching.len() - n..] };
        let follow_from = history.last().map_or(seen_before, |e| e.seq + 1);
        let mut backlog: Vec<Result<ObserveResponse, Status>> = Vec::with_capacity(picked.len() + 1);
        // A reader that asks from the start of the buffer (first N, all, or
        // since a time older than the oldest event kept) is told how many
        // events the buffer no longer has: overwritten before it, or lost
        // inside it by a writer that found its slot busy.
        let from_start = query.first
            || (query.number == 0 && !query.follow)
            || query.since.is_some_and(|s| history.first().is_none_or(|e| s < e.time));
        if from_start {
            // An empty history: every event seen before it was taken is gone.
            let missing = match (history.first(), history.last()) {
                (Some(a), Some(b)) => a.seq + (b.seq - a.seq + 1 - history.len() as u64),
                _ => seen_before,
            };
            if missing > 0 {
                backlog.push(Ok(lost(lost_events::Source::RingBuffer, missing)));
            }
        }
        backlog.extend(picked.iter().map(|e| Ok(query.response(e))));
        let query = Arc::new(query);
        let mut stream: EventStream = Box::pin(tokio_stream::iter(backlog));
        if query.follow {
            let follow = Follow {
                sources: self.sources.clone(),
                reader: hub.reader_at(follow_from),
                query: query.clone(),
                shutdown: self.shutdown.clone(),
                grew: self.grew.clone(),
            };
            // Counted (its receiver) before the watcher is told.
            self.followed.notify_one();
            let batches =
                futures_util::stream::unfold(follow, |mut f| async move { f.next_batch().await.map(|b| (b, f)) });
            let follow =
                futures_util::StreamExt::flat_map(batches, |b| futures_util::stream::iter(b.into_iter().map(Ok)));
            // Policy exits reach followers as they happen.
            let exits = tokio_stream::wrappers::BroadcastStream::new(exits).filter_map(|e| {
                let e = e.ok()?;
                Some(Ok(ObserveResponse {
                    time: e.time,
                    response_types: Some(observe_response::ResponseTypes::PolicyExit(e)),
                }))
            });
            let follow = futures_util::stream::select(follow, exits);
            let shutdown = self.shutdown.clone();
            let until_shutdown = async move { shutdown.cancelled().await };
            stream = Box::pin(futures_util::StreamExt::take_until(stream.chain(follow), until_shutdown));
        }
        let stream: EventStream = Box::pin(stream.map(move |r| {
            let _open = &open;
            r
        }));
        Ok(Response::new(stream))
    }

    #[instrument(skip(self, _request))]
    async fn get_stats(&self, _request: Request<GetStatsRequest>) -> Result<Response<GetStatsResponse>, Status> {
        let stats = &self.sources.events.stats;
        let count = |v: Vec<(&str, u64)>| v.into_iter().map(|(k, c)| Count { key: k.to_string(), count: c }).collect();
        let [by_kind, by_outcome, by_size] = stats.counters();
        let vms = self.sources.vms.list();
        let by_vm = vms
            .iter()
            .map(|vm| Count {
                key: vm.id().to_string(),
                count: vm.counters.faults.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect();
        Ok(Response::new(GetStatsResponse {
            by_vm,
            by_kind: count(by_kind),
            by_outcome: count(by_outcome),
            by_mapping_size: count(by_size),
            latency: stats.summaries().into_iter().map(convert::latency).collect(),
            histogram_samples_skipped: stats.skipped(),
            pinned_pages: vms.iter().map(|vm| vm.mapping.pins().total()).sum(),
            policy: self.sources.policies.load().policy.name().to_string(),
            rings: convert::ring_occupancy(&vms),
            pool: Some(convert::service_pool(&self.sources.pool)),
            access_flag_faults_at_core: vms.iter().map(|vm| vm.access_flag_faults()).fold(0, u64::wrapping_add),
        }))
    }

    #[instrument(skip(self, _request))]
    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let s = self.sources.events.status();
        Ok(Response::new(ServerStatusResponse {
            num_events: s.num_events,
            max_events: s.max_events,
            seen_events: s.seen_events,
            lost_events: s.lost_events,
            uptime_ns: s.uptime_ns,
            events_per_second: s.events_per_second,
            attached_vms: self.sources.vms.len() as u32,
            recovered_after_crash: self.sources.lifecycle.recovered_after_crash,
            took_over: self.sources.lifecycle.took_over,
            reattached_vms: self.sources.vms.reattached(),
        }))
    }
}
