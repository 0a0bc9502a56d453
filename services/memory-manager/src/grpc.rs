//! The gRPC API: FaultTrace (Observe, ServerStatus, GetStats) and Control
//! (ListVms, GetVm, GetDirtyLog), with grpc.health.v1 and server reflection
//! (v1 and v1alpha), so `grpcurl` can list and call everything; served on
//! TCP and optionally on a Unix socket.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use faultline_proto::v1::control_server::{Control, ControlServer};
use faultline_proto::v1::fault_trace_server::{FaultTrace, FaultTraceServer};
use faultline_proto::v1::policy_control_server::PolicyControlServer;
use faultline_proto::v1::{
    self as pb, lost_events, observe_response, Count, FaultFilter, GetDirtyLogRequest, GetStatsRequest,
    GetStatsResponse, GetVmRequest, LatencyHistogram, ListVmsRequest, ListVmsResponse, LostEvents, ObserveRequest,
    ObserveResponse, ServerStatusRequest, ServerStatusResponse,
};
use hyp_core::abort::{Access, FaultStatus};
use hyp_core::stage2::MapSize;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::daemon::Daemon;
use crate::events::{FaultEvent, Outcome, Reader};
use crate::stats;

type EventStream = Pin<Box<dyn Stream<Item = Result<ObserveResponse, Status>> + Send>>;

/// The FaultTrace service.
pub struct FaultTraceService {
    daemon: Arc<Daemon>,
    shutdown: CancellationToken,
}

/// The wire form of a time.
pub(crate) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn system_time(t: &prost_types::Timestamp) -> Result<SystemTime, Status> {
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Status::invalid_argument("timestamps must be after 1970 with nanos in 0..1e9"));
    }
    Ok(UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32))
}

// The proto enums number their values as the statistics index them (one
// classification, in stats.rs); the test below pins the correspondence.
fn kind_of(status: Option<FaultStatus>) -> pb::FaultKind {
    pb::FaultKind::try_from(stats::kind_index(status) as i32).unwrap_or(pb::FaultKind::Other)
}

/// The wire form of an access.
pub(crate) fn access_of(a: Option<Access>) -> pb::Access {
    match a {
        None => pb::Access::Unspecified,
        Some(Access::Read) => pb::Access::Read,
        Some(Access::Write) => pb::Access::Write,
        Some(Access::Execute) => pb::Access::Execute,
    }
}

fn outcome_of(o: Outcome) -> pb::Outcome {
    pb::Outcome::try_from(stats::outcome_index(o) as i32 + 1).unwrap_or(pb::Outcome::Unspecified)
}

/// The wire form of a mapping size.
pub(crate) fn size_of_mapping(s: Option<MapSize>) -> pb::MappingSize {
    pb::MappingSize::try_from(stats::size_index(s) as i32).unwrap_or(pb::MappingSize::Unspecified)
}

/// The wire form of an event.
pub fn to_proto(e: &FaultEvent) -> pb::FaultEvent {
    pb::FaultEvent {
        time: Some(timestamp(e.time)),
        fault_id: e.fault_id,
        vm_id: e.vm_id as u32,
        vcpu: e.vcpu,
        ipa: e.ipa,
        esr: e.esr,
        kind: kind_of(e.status) as i32,
        level: e.status.and_then(|s| s.level()).map_or(0, i32::from),
        access: access_of(e.access) as i32,
        memslot: e.memslot,
        hva: e.hva,
        vma_page_size: e.vma_page_size,
        mapping_size: size_of_mapping(e.mapping_size) as i32,
        permissions: e.permissions,
        pa: e.pa,
        outcome: outcome_of(e.outcome) as i32,
        reject_reason: match e.outcome {
            Outcome::Rejected(r) => r.map_or("unknown", |r| r.name()).to_string(),
            _ => String::new(),
        },
        policy: e.policy.to_string(),
        stages: Some(pb::StageTimes {
            memslot_ns: e.stages[0],
            vma_ns: e.stages[1],
            size_ns: e.stages[2],
            pin_ns: e.stages[3],
            permissions_ns: e.stages[4],
            command_sent_ns: e.sent_ns,
            completed_ns: e.completed_ns,
        }),
        latency_ns: e.completed_ns,
        populated: e.populated,
        fault_around: e.fault_around,
    }
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
            && any(&f.access, access_of(e.access) as i32)
            && any(&f.outcome, outcome_of(e.outcome) as i32)
            && any(&f.mapping_size, size_of_mapping(e.mapping_size) as i32)
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

impl Query {
    fn parse(r: ObserveRequest, known_vm: impl Fn(u32) -> bool) -> Result<Self, Status> {
        if r.first && r.follow {
            return Err(Status::invalid_argument("`first` cannot be combined with `follow`"));
        }
        let since = r.since.as_ref().map(system_time).transpose()?;
        let until = r.until.as_ref().map(system_time).transpose()?;
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
        let mut ev = to_proto(e);
        if !self.mask.is_empty() {
            ev = masked(ev, &self.mask);
        }
        ObserveResponse { time: ev.time, response_types: Some(observe_response::ResponseTypes::Fault(ev)) }
    }
}

/// How often a follower that has caught up looks for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(5);

/// A follower: its own reader in the history, so it copies events only as
/// fast as its client takes them (the stream is polled only when the
/// connection has room) and is told of the ones it missed, one record per
/// gap.
struct Follow {
    daemon: Arc<Daemon>,
    reader: Reader,
    query: Arc<Query>,
    shutdown: CancellationToken,
}

impl Follow {
    /// The next responses; `None` once the daemon shuts down.
    async fn next_batch(&mut self) -> Option<Vec<ObserveResponse>> {
        loop {
            let chunk = self.daemon.events().read(&mut self.reader);
            let mut out = Vec::new();
            if chunk.lost > 0 {
                out.push(lost(lost_events::Source::RingBuffer, chunk.lost));
            }
            out.extend(chunk.events.iter().filter(|e| self.query.matches(e)).map(|e| self.query.response(e)));
            if !out.is_empty() {
                return Some(out);
            }
            if chunk.events.is_empty() {
                // Caught up.
                tokio::select! {
                    _ = self.shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(FOLLOW_POLL) => {}
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
        let hub = self.daemon.events();
        let exits = self.daemon.policies().subscribe_exits();
        // Followers go on from what the history snapshot ends with.
        let seen_before = hub.status().seen_events;
        let history = hub.history();
        let attached: Vec<u32> = self.daemon.vms().iter().map(|v| v.id.raw() as u32).collect();
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
                daemon: self.daemon.clone(),
                reader: hub.reader_at(follow_from),
                query: query.clone(),
                shutdown: self.shutdown.clone(),
            };
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
        Ok(Response::new(stream))
    }

    #[instrument(skip(self, _request))]
    async fn get_stats(&self, _request: Request<GetStatsRequest>) -> Result<Response<GetStatsResponse>, Status> {
        let stats = &self.daemon.events().stats;
        let count = |v: Vec<(&str, u64)>| v.into_iter().map(|(k, c)| Count { key: k.to_string(), count: c }).collect();
        let [by_kind, by_outcome, by_size] = stats.counters();
        let vms = self.daemon.vms();
        let by_vm = vms
            .iter()
            .map(|vm| Count {
                key: vm.id.to_string(),
                count: vm.stats.faults.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect();
        let latency = stats
            .summaries()
            .into_iter()
            .map(|s| LatencyHistogram {
                stage: s.stage.to_string(),
                count: s.count,
                min_ns: s.min,
                p50_ns: s.p50,
                p90_ns: s.p90,
                p99_ns: s.p99,
                p999_ns: s.p999,
                max_ns: s.max,
                mean_ns: s.mean,
            })
            .collect();
        Ok(Response::new(GetStatsResponse {
            by_vm,
            by_kind: count(by_kind),
            by_outcome: count(by_outcome),
            by_mapping_size: count(by_size),
            latency,
            histogram_samples_skipped: stats.skipped(),
            pinned_pages: vms.iter().map(|vm| vm.pins.total()).sum(),
            policy: self.daemon.policies().load().policy.name().to_string(),
            rings: ring_occupancy(&vms),
        }))
    }

    #[instrument(skip(self, _request))]
    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let s = self.daemon.events().status();
        Ok(Response::new(ServerStatusResponse {
            num_events: s.num_events,
            max_events: s.max_events,
            seen_events: s.seen_events,
            lost_events: s.lost_events,
            uptime_ns: s.uptime_ns,
            events_per_second: s.events_per_second,
            attached_vms: self.daemon.vms().len() as u32,
        }))
    }
}

/// Ring occupancy of every vCPU of `vms`, by VM and vCPU.
pub fn ring_occupancy(vms: &[Arc<crate::vm::VmMemory>]) -> Vec<pb::RingOccupancy> {
    let mut out: Vec<pb::RingOccupancy> = vms
        .iter()
        .flat_map(|vm| {
            vm.rings.iter().enumerate().map(|(vcpu, r)| {
                let r = r.read();
                pb::RingOccupancy {
                    vm_id: vm.id.raw() as u32,
                    vcpu: vcpu as u32,
                    capacity: r.capacity,
                    fault_ring: r.faults,
                    fault_ring_high_water: r.faults_high,
                    command_ring: r.commands,
                    command_ring_high_water: r.commands_high,
                }
            })
        })
        .collect();
    out.sort_by_key(|r| (r.vm_id, r.vcpu));
    out
}

/// Serves gRPC on `addr` (and on the Unix socket `unix`, if given) until
/// `shutdown` is cancelled (follow streams end then too, so the server stops
/// promptly); sends the bound TCP address to `bound` once listening.
pub async fn serve(
    daemon: Arc<Daemon>,
    addr: SocketAddr,
    unix: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let unix_listener = match &unix {
        Some(path) => {
            // A socket left by a daemon that did not exit cleanly.
            if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                std::fs::remove_file(path)?;
            }
            let l = tokio::net::UnixListener::bind(path)
                .map_err(|e| anyhow::anyhow!("binding the gRPC Unix socket {}: {e}", path.display()))?;
            info!(path = %path.display(), "gRPC listening on Unix socket");
            Some(l)
        }
        None => None,
    };
    info!(addr = %local, "gRPC listening");
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FaultTraceServer<FaultTraceService>>().await;
    health.set_serving::<ControlServer<ControlService>>().await;
    health.set_serving::<PolicyControlServer<crate::grpc_policy::PolicyControlService>>().await;
    let router = || -> anyhow::Result<tonic::transport::server::Router> {
        // Each version lists every service served, the other version included.
        // Only what is served: policy.proto also defines MemoryPolicy, which
        // policy services serve and the daemon calls.
        let reflection = || {
            [
                "faultline.v1.FaultTrace",
                "faultline.v1.Control",
                "faultline.v1.PolicyControl",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
            .into_iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, name| b.with_service_name(name))
            .register_encoded_file_descriptor_set(faultline_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = reflection()
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let control = ControlService { daemon: daemon.clone() };
        let service = FaultTraceService { daemon: daemon.clone(), shutdown: shutdown.clone() };
        Ok(tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(FaultTraceServer::new(service))
            .add_service(ControlServer::new(control))
            .add_service(PolicyControlServer::new(crate::grpc_policy::PolicyControlService::new(daemon.clone()))))
    };
    let stopped = |t: CancellationToken| async move { t.cancelled().await };
    let tcp = router()?.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped(shutdown.clone()));
    let _ = bound.send(local);
    match unix_listener {
        Some(l) => {
            let uds = router()?.serve_with_incoming_shutdown(UnixListenerStream::new(l), stopped(shutdown.clone()));
            let served = tokio::try_join!(tcp, uds).map(|_| ());
            if let Some(path) = &unix {
                let _ = std::fs::remove_file(path);
            }
            served?;
        }
        None => tcp.await?,
    }
    Ok(())
}

/// The Control service: what is attached.
pub struct ControlService {
    daemon: Arc<Daemon>,
}

fn vm_proto(vm: &crate::vm::VmMemory) -> pb::Vm {
    pb::Vm {
        vm_id: vm.id.raw() as u32,
        vcpus: vm.nr_vcpus,
        memslots: vm
            .memslots
            .iter()
            .map(|m| pb::Memslot {
                id: m.id as u32,
                gpa: m.gpa.raw(),
                size: m.size,
                read_only: m.read_only,
                dirty_log: m.dirty_log,
                dirty_pages: m.dirty_count(),
            })
            .collect(),
        pinned_pages: vm.pins.total(),
        mappings: vm.mappings.lock().unwrap_or_else(|e| e.into_inner()).len() as u64,
        faults: vm.stats.faults.load(std::sync::atomic::Ordering::Relaxed),
        resident_bytes: vm.resident(),
        evicted: vm.stats.evicted.load(std::sync::atomic::Ordering::Relaxed),
        evicted_bytes: vm.stats.evicted_bytes.load(std::sync::atomic::Ordering::Relaxed),
        fault_around_pages: vm.stats.prefaulted.load(std::sync::atomic::Ordering::Relaxed),
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    #[instrument(skip(self, _request))]
    async fn list_vms(&self, _request: Request<ListVmsRequest>) -> Result<Response<ListVmsResponse>, Status> {
        let mut vms: Vec<pb::Vm> = self.daemon.vms().iter().map(|v| vm_proto(v)).collect();
        vms.sort_by_key(|v| v.vm_id);
        Ok(Response::new(ListVmsResponse { vms }))
    }

    #[instrument(skip(self, request))]
    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let id = request.into_inner().vm_id;
        let vm = self.daemon.vms().into_iter().find(|v| v.id.raw() as u32 == id);
        vm.map(|v| Response::new(vm_proto(&v))).ok_or_else(|| Status::not_found(format!("vm {id} is not attached")))
    }

    #[instrument(skip(self, request))]
    async fn get_dirty_log(&self, request: Request<GetDirtyLogRequest>) -> Result<Response<pb::DirtyLog>, Status> {
        let GetDirtyLogRequest { vm_id, memslot, peek } = request.into_inner();
        let vm = self
            .daemon
            .vms()
            .into_iter()
            .find(|v| v.id.raw() as u32 == vm_id)
            .ok_or_else(|| Status::not_found(format!("vm {vm_id} is not attached")))?;
        let slot_of = |vm: &crate::vm::VmMemory| vm.memslots.iter().position(|m| m.id as u32 == memslot);
        let Some(index) = slot_of(&vm) else {
            return Err(Status::not_found(format!("vm {vm_id} has no memslot {memslot}")));
        };
        let (gpa, pages, dirty_log) = {
            let m = vm.memslots.iter().nth(index).expect("found above");
            (m.gpa.raw(), m.pages(), m.dirty_log)
        };
        if !dirty_log {
            return Err(Status::failed_precondition(format!("memslot {memslot} of vm {vm_id} has no dirty logging")));
        }
        // Write-protecting waits for the core: off the async workers.
        let (bitmap, write_protects) = tokio::task::spawn_blocking(move || {
            let slot = vm.memslots.iter().nth(index).expect("memslots never change after attach");
            if peek {
                Ok((slot.dirty_bitmap(), 0))
            } else {
                vm.fetch_and_clear_dirty_log(slot).map(|log| (log.bitmap, log.write_protects))
            }
        })
        .await
        .map_err(|e| Status::internal(format!("dirty log task failed: {e}")))?
        .map_err(|e| Status::unavailable(format!("re-arming dirty logging failed, bitmap kept: {e}")))?;
        Ok(Response::new(pb::DirtyLog {
            vm_id,
            memslot,
            gpa,
            pages,
            dirty_pages: bitmap.iter().map(|w| w.count_ones() as u64).sum(),
            bitmap: bitmap.iter().flat_map(|w| w.to_le_bytes()).collect(),
            write_protect_commands: write_protects,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statistics' names and the proto enum names describe the same values.
    #[test]
    fn proto_enums_follow_the_statistics_classification() {
        let short = |name: &str, prefix: &str| name.trim_start_matches(prefix).to_lowercase().replace('_', "-");
        for (i, name) in stats::KINDS.iter().enumerate().skip(1) {
            let proto = pb::FaultKind::try_from(i as i32).unwrap();
            assert_eq!(short(proto.as_str_name(), "FAULT_KIND_"), *name);
        }
        for (i, name) in stats::OUTCOMES.iter().enumerate() {
            let proto = pb::Outcome::try_from(i as i32 + 1).unwrap();
            assert_eq!(short(proto.as_str_name(), "OUTCOME_"), *name);
        }
        assert_eq!(size_of_mapping(Some(MapSize::Block2M)), pb::MappingSize::MappingSize2m);
        assert_eq!(size_of_mapping(None), pb::MappingSize::Unspecified);
        assert_eq!(kind_of(None), pb::FaultKind::Unspecified);
    }
}
