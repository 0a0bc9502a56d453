//! Observability beyond Observe: lost-event accounting with tiny buffers,
//! the Prometheus endpoint against GetStats, gRPC on a Unix socket, ring
//! occupancy, and the Control dirty log (fetch-and-clear re-arms logging).
//! Every test starts the real daemon and machine binaries.

use std::process::Stdio;
use std::time::Duration;

use faultline_proto::v1::control_client::ControlClient;
use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::{
    lost_events, observe_response::ResponseTypes, GetDirtyLogRequest, GetStatsRequest, ListVmsRequest, ObserveRequest,
    ServerStatusRequest,
};
use faultline_system_tests::{machine, metric_samples, run_machine, scrape_metrics, Daemon, TracedMachine};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn observe_all(
    client: &mut FaultTraceClient<tonic::transport::Channel>,
    req: ObserveRequest,
) -> Vec<ResponseTypes> {
    let mut stream = client.observe(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        out.extend(r.response_types);
    }
    out
}

fn lost_of(items: &[ResponseTypes], source: lost_events::Source) -> (u64, usize) {
    let records: Vec<u64> = items
        .iter()
        .filter_map(|r| match r {
            ResponseTypes::LostEvents(l) if l.source == source as i32 => Some(l.num_events_lost),
            _ => None,
        })
        .collect();
    (records.iter().sum(), records.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_buffers_lose_events_and_say_how_many() {
    let daemon = Daemon::start(&["--policy", "4k", "--event-buffer", "64"]);
    let addr = daemon.grpc_addr();
    let mut client = FaultTraceClient::connect(addr.clone()).await.unwrap();
    // A follower that does not read while the workload runs: once the
    // HTTP/2 window is full, the 64-event history overwrites what it has not
    // read yet.
    let mut slow = FaultTraceClient::connect(addr).await.unwrap();
    let mut live = slow.observe(ObserveRequest { follow: true, ..Default::default() }).await.unwrap().into_inner();

    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "2", "--pattern", "random", "--ops", "20000", "--seed", "3"]);
    let summary = tokio::task::spawn_blocking(move || run_machine(cmd)).await.unwrap();
    let total = summary["faults"].as_u64().unwrap();
    // The machine's vCPUs report how they waited for the daemon: each fault
    // is a wait (its answer cannot be on the ring the instant it is posted).
    let waits = |how: &str| summary["waits"][how].as_u64().unwrap_or_else(|| panic!("waits.{how}: {summary}"));
    assert!(waits("spun") + waits("slept") >= 1, "{}", summary["waits"]);
    assert!(total > 1000, "the workload must overflow the buffers: {total} faults");

    // The follower now reads: every fault is either delivered or counted lost.
    let (mut delivered, mut lost, mut records) = (0u64, 0u64, 0usize);
    while delivered + lost < total {
        let r = tokio::time::timeout(Duration::from_secs(10), live.message())
            .await
            .expect("follow stream stalled")
            .unwrap()
            .unwrap();
        match r.response_types.unwrap() {
            ResponseTypes::Fault(_) => delivered += 1,
            ResponseTypes::LostEvents(l) => {
                assert_eq!(l.source, lost_events::Source::RingBuffer as i32);
                lost += l.num_events_lost;
                records += 1;
            }
            ResponseTypes::PolicyExit(x) => panic!("no policy was in use: {x:?}"),
        }
    }
    assert_eq!(delivered + lost, total);
    assert!(lost > 0, "a reader that never read must have lost events");
    assert!(records * 10 < lost as usize, "lost records are per gap, not per event: {records} for {lost}");

    // The history keeps the last 64: a reader asking from the start is told
    // how many are gone before the first event it gets. While the follower's
    // stream was being filled, its copy of a slot could hold off the writer
    // of the event a whole history later, which then dropped it (counted in
    // `lost_events`): a gap inside the last 64 is counted in the same record.
    let status = client.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.num_events, status.max_events, status.seen_events), (64, 64, total));
    let dropped = status.lost_events;
    assert!(dropped * 100 < total, "writers dropped {dropped} of {total} events");
    let first = observe_all(&mut client, ObserveRequest { number: 10, first: true, ..Default::default() }).await;
    assert!(matches!(first[0], ResponseTypes::LostEvents(_)), "first N starts with a lost record");
    let (gone, gaps) = lost_of(&first, lost_events::Source::RingBuffer);
    let overwritten = total - 64;
    assert!((overwritten..=overwritten + dropped).contains(&gone), "{gone} lost: {overwritten} + {dropped} dropped");
    assert_eq!(gaps, 1, "one record for all that is gone");
    assert_eq!(first.iter().filter(|r| matches!(r, ResponseTypes::Fault(_))).count(), 10);
    // Last N does not reach back, so it has nothing to report.
    let last = observe_all(&mut client, ObserveRequest { number: 10, ..Default::default() }).await;
    assert_eq!(lost_of(&last, lost_events::Source::RingBuffer), (0, 0));
    assert_eq!(last.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_get_stats() {
    let daemon = Daemon::start(&[]);
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "2", "--pattern", "zipf", "--ops", "5000", "--ram-page-kib", "4"]);
    let summary = tokio::task::spawn_blocking(move || run_machine(cmd)).await.unwrap();
    let total = summary["faults"].as_u64().unwrap();

    let text = tokio::task::spawn_blocking({
        let addr = daemon.metrics_addr();
        move || scrape_metrics(&addr)
    })
    .await
    .unwrap();
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
    let m = metric_samples(&text);
    let stats = client.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
    let mut checked = 0;
    for (family, label, counts) in [
        ("faultline_faults_total", "outcome", &stats.by_outcome),
        ("faultline_faults_by_kind_total", "kind", &stats.by_kind),
        ("faultline_faults_by_mapping_size_total", "size", &stats.by_mapping_size),
    ] {
        for c in counts {
            let key = format!("{family}{{{label}=\"{}\"}}", c.key);
            assert_eq!(m.get(&key).copied(), Some(c.count as f64), "{key}");
            checked += 1;
        }
        let sum: f64 = m.iter().filter(|(k, _)| k.starts_with(&format!("{family}{{"))).map(|(_, v)| v).sum();
        assert_eq!(sum, total as f64, "{family} sums to every fault");
    }
    assert!(checked >= 19);
    let e2e = stats.latency.iter().find(|h| h.stage == "end_to_end").unwrap();
    assert_eq!(m["faultline_fault_latency_seconds_count{stage=\"end_to_end\"}"], e2e.count as f64);
    assert_eq!(m["faultline_fault_latency_seconds_bucket{le=\"+Inf\",stage=\"end_to_end\"}"], e2e.count as f64);
    let mean_s = m["faultline_fault_latency_seconds_sum{stage=\"end_to_end\"}"] / e2e.count as f64;
    assert!((mean_s * 1e9 - e2e.mean_ns).abs() < 1.0, "mean {mean_s} s vs {} ns", e2e.mean_ns);
    // Buckets are cumulative and end at the count.
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("faultline_fault_latency_seconds_bucket{") && k.ends_with("stage=\"end_to_end\"}")
        })
        .map(|(k, &v)| {
            let le = k.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, v)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() == 15 && buckets.windows(2).all(|w| w[0].1 <= w[1].1));
    let status = client.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(m["faultline_events_seen_total"], status.seen_events as f64);
    assert_eq!(m["faultline_events_lost_total"], status.lost_events as f64);
    assert_eq!(m["faultline_pinned_pages"], stats.pinned_pages as f64);
    assert_eq!(m["faultline_attached_vms"], 0.0, "the machine detached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_is_served_on_a_unix_socket_too_and_reports_ring_occupancy() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grpc.sock");
    let daemon = Daemon::start(&[
        "--grpc-unix-socket",
        path.to_str().unwrap(),
        "--spin-polls",
        "0",
        "--service-threads",
        "3",
        "--serving-threads",
        "2",
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "no gRPC Unix socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let address = faultline_proto::client::Address::Unix(path.clone());
    let channel = faultline_proto::client::connect(&address, &Default::default()).await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let serving = health.check(HealthCheckRequest { service: "faultline.v1.FaultTrace".into() }).await.unwrap();
    assert_eq!(serving.into_inner().status(), ServingStatus::Serving, "over the Unix socket");
    // [grpc_access]'s default mode (set before the daemon serves on it):
    // the daemon's user and group.
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    let mut control = ControlClient::new(channel.clone());
    let mut child = machine(&daemon)
        .args(["--vm-id", "7", "--vcpus", "2", "--pattern", "random", "--ops", "4000000", "--spin-polls", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut trace = FaultTraceClient::new(channel);
    let (occupancy, pool) = loop {
        let vms = control.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms;
        let stats = trace.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
        if !vms.is_empty() && stats.by_vm.iter().any(|c| c.count > 100) {
            break (stats.rings, stats.pool);
        }
        assert!(child.try_wait().unwrap().is_none(), "machine ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The wait split, in /metrics too, while the VM is attached.
    let text = tokio::task::spawn_blocking({
        let addr = daemon.metrics_addr();
        move || scrape_metrics(&addr)
    })
    .await
    .unwrap();
    let m = metric_samples(&text);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(occupancy.iter().map(|r| (r.vm_id, r.vcpu)).collect::<Vec<_>>(), [(7, 0), (7, 1)]);
    for r in &occupancy {
        // One fault outstanding per vCPU: nothing queues behind it, and
        // each command is taken before the next is pushed or soon after.
        assert!(r.capacity >= 64 && r.fault_ring <= r.fault_ring_high_water, "{r:?}");
        assert!(r.command_ring_high_water >= 1 && r.command_ring_high_water < r.capacity, "{r:?}");
    }
    // --spin-polls 0: every wait for work sleeps on the doorbells.
    let pool = pool.expect("the service pool is reported");
    assert!(pool.waits_slept >= 1, "{pool:?}");
    assert_eq!((pool.threads, pool.serving_limit), (3, 2), "as configured: {pool:?}");
    assert_eq!((pool.waits_spun, pool.spins_yielded), (0, 0), "{pool:?}");
    assert_eq!(m["faultline_service_threads"], f64::from(pool.threads));
    assert_eq!(m["faultline_serving_threads"], f64::from(pool.serving_limit));
    assert!(m["faultline_fault_waits_total{how=\"slept\"}"] >= pool.waits_slept as f64);
    assert_eq!(m["faultline_fault_waits_total{how=\"spun\"}"], 0.0);
    drop(daemon);
    assert!(!path.exists(), "the daemon removes its gRPC socket at exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_and_reflection_lists_the_services() {
    use tonic_reflection::pb::{v1, v1alpha};
    let daemon = Daemon::start(&[]);
    let channel = tonic::transport::Endpoint::from_shared(daemon.grpc_addr()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in
        ["", "faultline.v1.FaultTrace", "faultline.v1.Control", "faultline.v1.PolicyControl", "faultline.v1.WorkingSet"]
    {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "nope.v1.Nothing".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let want = [
        "faultline.v1.Control",
        "faultline.v1.FaultTrace",
        "faultline.v1.PolicyControl",
        "faultline.v1.WorkingSet",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let mut v1 = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut replies = v1.server_reflection_info(tokio_stream_once(req)).await.unwrap().into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1 reflection did not list services");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, want);
    // v1alpha (what older grpcurl speaks) too, and a file for a symbol.
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "faultline.v1.FaultTrace".into(),
        )),
    };
    let mut replies = alpha.server_reflection_info(tokio_stream_once(req)).await.unwrap().into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1alpha reflection did not return a file");
    };
    let methods: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| <prost_types::FileDescriptorProto as prost::Message>::decode(bytes.as_slice()).unwrap())
        .flat_map(|f| f.service)
        .filter(|s| s.name() == "FaultTrace")
        .flat_map(|s| s.method.into_iter().map(|m| m.name().to_string()))
        .collect();
    assert_eq!(methods, ["Observe", "ServerStatus", "GetStats"]);
}

/// A request stream of one message.
fn tokio_stream_once<T: Send + 'static>(item: T) -> impl tonic::IntoStreamingRequest<Message = T> {
    tokio_stream::once(item)
}

/// Page numbers (from the memslot's first) a bitmap names.
fn pages(bitmap: &[u8]) -> Vec<u64> {
    faultline_proto::dirty_pages(0, bitmap).map(|ipa| ipa / 4096).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_log_fetch_and_clear_rearms_logging() {
    const RAM: u64 = 0x4000_0000;
    let daemon = Daemon::start(&[]);
    // Clearing a log changes the daemon: the Unix socket serves it, plain
    // TCP only peeks.
    let mut control = ControlClient::new(daemon.unix_channel().await);
    let mut tcp_control = ControlClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut trace = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    // Phase 0 writes pages 0..10 and reads 20..25; phase 1 writes 5..15 and
    // reads 0..5; phase 2 writes page 40 and rewrites 5.
    let mut text = String::new();
    let w = |t: &mut String, p: u64| t.push_str(&format!("0 W {:#x} 8\n", RAM + p * 4096 + 8));
    let r = |t: &mut String, p: u64| t.push_str(&format!("0 R {:#x} 8\n", RAM + p * 4096));
    (0..10).for_each(|p| w(&mut text, p));
    (20..25).for_each(|p| r(&mut text, p));
    text.push_str("PAUSE\n");
    (5..15).for_each(|p| w(&mut text, p));
    (0..5).for_each(|p| r(&mut text, p));
    text.push_str("PAUSE\n");
    w(&mut text, 40);
    w(&mut text, 5);
    let dir = tempfile::tempdir().unwrap();
    let trace_file = dir.path().join("dirty.trace");
    std::fs::write(&trace_file, text).unwrap();
    let mut m = TracedMachine::spawn(&daemon, &["--vm-id", "3", "--dirty-log", "--spin-polls", "0"], &trace_file);
    let req = |memslot, peek| GetDirtyLogRequest { vm_id: 3, memslot, peek };
    // Memslot 0 is RAM (the machine lists it first), 1 the read-only ROM.
    let ram_slot = 0;

    tokio::task::block_in_place(|| m.wait_paused(0));
    let peeked = control.get_dirty_log(req(ram_slot, true)).await.unwrap().into_inner();
    assert_eq!((peeked.gpa, peeked.pages, peeked.write_protect_commands), (RAM, 224 * 256, 0));
    assert_eq!(pages(&peeked.bitmap), (0..10).collect::<Vec<_>>());
    let peeked_over_tcp = tcp_control.get_dirty_log(req(ram_slot, true)).await.unwrap().into_inner();
    assert_eq!(peeked_over_tcp, peeked);
    let denied = tcp_control.get_dirty_log(req(ram_slot, false)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(&format!("unix:{}", daemon.grpc_socket().display())), "{}", denied.message());
    let fetched = control.get_dirty_log(req(ram_slot, false)).await.unwrap().into_inner();
    assert_eq!(pages(&fetched.bitmap), (0..10).collect::<Vec<_>>());
    assert_eq!((fetched.dirty_pages, fetched.write_protect_commands), (10, 1), "one run, one WRITE_PROTECT");
    let cleared = control.get_dirty_log(req(ram_slot, true)).await.unwrap().into_inner();
    assert_eq!(cleared.dirty_pages, 0);

    m.resume();
    tokio::task::block_in_place(|| m.wait_paused(1));
    // Pages 5..10 were writable before the fetch; only re-protection makes
    // their second writes visible.
    let fetched = control.get_dirty_log(req(ram_slot, false)).await.unwrap().into_inner();
    assert_eq!(pages(&fetched.bitmap), (5..15).collect::<Vec<_>>());
    let relaxed = trace.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
    let relaxed = relaxed.by_outcome.iter().find(|c| c.key == "relaxed").map_or(0, |c| c.count);
    assert_eq!(relaxed, 5, "re-protected pages 5..10 fault on write and are relaxed, not remapped");

    // Bad requests.
    let code = |r: Result<tonic::Response<_>, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(code(control.get_dirty_log(req(1, false)).await), Some(Code::FailedPrecondition));
    assert_eq!(code(control.get_dirty_log(req(9, false)).await), Some(Code::NotFound));
    let other_vm = GetDirtyLogRequest { vm_id: 4, memslot: 0, peek: false };
    assert_eq!(code(control.get_dirty_log(other_vm).await), Some(Code::NotFound));

    m.resume();
    let out = tokio::task::spawn_blocking(move || m.child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Faults: 10 + 5 first touches, then 5 new pages + 5 re-protected +
    // 0 reads of mapped pages, then page 40 and page 5 again.
    assert_eq!(summary["faults"].as_u64(), Some(15 + 10 + 2));
    assert_eq!(summary["detach"]["pins_remaining"].as_u64(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_streams_past_the_maximum_are_refused_and_idle_ones_stall_nothing() {
    let daemon = Daemon::start(&["--max-observe-streams", "4", "--policy", "4k"]);
    let follow = || ObserveRequest { follow: true, ..Default::default() };
    // Four follow streams, each on its own connection, that never read.
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut c = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
        let stream = c.observe(follow()).await.unwrap().into_inner();
        idle.push((c, stream));
    }
    let mut extra = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let refused = extra.observe(follow()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_observe_streams"), "{}", refused.message());
    // Faults flow past the streams that do not read.
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "2", "--pattern", "zipf", "--ops", "5000", "--ram-page-kib", "4"]);
    let summary = tokio::task::spawn_blocking(move || run_machine(cmd)).await.unwrap();
    assert!(summary["faults"].as_u64().unwrap() > 0);
    let m = metric_samples(
        &tokio::task::spawn_blocking({
            let addr = daemon.metrics_addr();
            move || scrape_metrics(&addr)
        })
        .await
        .unwrap(),
    );
    assert_eq!(m.get("faultline_observe_streams").copied(), Some(4.0));
    assert_eq!(m.get("faultline_observe_streams_refused_total").copied(), Some(1.0));
    // A stream closed makes room for another.
    drop(idle.pop());
    let started = std::time::Instant::now();
    loop {
        match extra.observe(follow()).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("a closed stream's place was not given back: {e:?}"),
        }
    }
}
