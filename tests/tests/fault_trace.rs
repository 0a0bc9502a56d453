//! FaultTrace over a real socket: a tonic client against the daemon binary.

use std::time::Duration;

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::{
    observe_response::ResponseTypes, FaultFilter, IpaRange, ObserveRequest, Outcome, ServerStatusRequest,
};
use faultline_system_tests::{machine, run_machine, Daemon};
use tonic::Code;

fn faults(responses: &[faultline_proto::v1::ObserveResponse]) -> Vec<faultline_proto::v1::FaultEvent> {
    responses
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Fault(f)) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

async fn observe(
    client: &mut FaultTraceClient<tonic::transport::Channel>,
    req: ObserveRequest,
) -> Result<Vec<faultline_proto::v1::ObserveResponse>, tonic::Status> {
    let mut stream = client.observe(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await? {
        out.push(r);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_returns_every_fault_with_filters_and_refuses_bad_arguments() {
    let daemon = Daemon::start(&["--policy", "4k"]);
    let addr = daemon.grpc_addr();
    let mut client = FaultTraceClient::connect(addr.clone()).await.unwrap();

    // A follower started before the workload sees it live.
    let mut follower = FaultTraceClient::connect(addr).await.unwrap();
    let mut live = follower.observe(ObserveRequest { follow: true, ..Default::default() }).await.unwrap().into_inner();

    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "2", "--pattern", "random", "--ops", "3000", "--seed", "9"]);
    let summary = tokio::task::spawn_blocking(move || run_machine(cmd)).await.unwrap();
    let total = summary["faults"].as_u64().unwrap();
    let exits = summary["exits"].as_array().unwrap().len() as u64;

    // Everything in the buffer: one event per fault, with the raw ESR the core sent.
    let all = faults(&observe(&mut client, ObserveRequest::default()).await.unwrap());
    assert_eq!(all.len() as u64, total);
    assert!(all.iter().all(|e| e.esr >> 26 == 0x24 && e.vm_id == 1 && e.time.is_some()));
    let mapped = all.iter().filter(|e| e.outcome == Outcome::Mapped as i32).count() as u64;
    let mmio = all.iter().filter(|e| e.outcome == Outcome::MmioExit as i32).count() as u64;
    assert_eq!(mmio, exits);
    let mut outcomes = std::collections::BTreeMap::new();
    for e in &all {
        *outcomes.entry(e.outcome).or_insert(0) += 1;
    }
    assert_eq!(mapped + mmio, total, "every fault is mapped or exits in this workload: {outcomes:?}");
    let m = all.iter().find(|e| e.outcome == Outcome::Mapped as i32).unwrap();
    assert!(m.pa != 0 && m.hva != 0 && m.permissions & 1 == 1 && m.policy == "4k");
    let st = m.stages.unwrap();
    assert!(st.memslot_ns <= st.pin_ns && st.pin_ns <= st.command_sent_ns && st.command_sent_ns <= st.completed_ns);

    // The follower got the same events, live.
    let mut followed = 0u64;
    while followed < total {
        let r = tokio::time::timeout(Duration::from_secs(10), live.message())
            .await
            .unwrap_or_else(|_| panic!("no live event after {followed} of {total}"))
            .unwrap_or_else(|e| panic!("follow stream failed after {followed} of {total}: {e}"))
            .unwrap_or_else(|| panic!("follow stream ended after {followed} of {total}"));
        match r.response_types {
            Some(ResponseTypes::Fault(_)) => followed += 1,
            other => panic!("a follower that keeps up loses nothing: {other:?}"),
        }
    }

    // Last N and first N.
    let last = faults(&observe(&mut client, ObserveRequest { number: 5, ..Default::default() }).await.unwrap());
    assert_eq!(
        last.iter().map(|e| e.fault_id).collect::<Vec<_>>(),
        all[all.len() - 5..].iter().map(|e| e.fault_id).collect::<Vec<_>>()
    );
    let first =
        faults(&observe(&mut client, ObserveRequest { number: 3, first: true, ..Default::default() }).await.unwrap());
    assert_eq!(
        first.iter().map(|e| e.fault_id).collect::<Vec<_>>(),
        all[..3].iter().map(|e| e.fault_id).collect::<Vec<_>>()
    );

    // Allow vCPU 1 only; deny MMIO exits.
    let req = ObserveRequest {
        allowlist: vec![FaultFilter { vcpu: vec![1], ..Default::default() }],
        denylist: vec![FaultFilter { outcome: vec![Outcome::MmioExit as i32], ..Default::default() }],
        ..Default::default()
    };
    let got = faults(&observe(&mut client, req).await.unwrap());
    let want = all.iter().filter(|e| e.vcpu == 1 && e.outcome != Outcome::MmioExit as i32).count();
    assert_eq!(got.len(), want);
    assert!(got.iter().all(|e| e.vcpu == 1 && e.outcome == Outcome::Mapped as i32));
    // An IPA range.
    let range = IpaRange { start: 0x1000_0000, end: 0x1200_0000 };
    let req = ObserveRequest {
        allowlist: vec![FaultFilter { ipa_range: vec![range], ..Default::default() }],
        ..Default::default()
    };
    let got = faults(&observe(&mut client, req).await.unwrap());
    assert_eq!(got.len(), all.iter().filter(|e| (0x1000_0000..0x1200_0000).contains(&e.ipa)).count());
    assert!(!got.is_empty());
    // A field mask.
    let req = ObserveRequest {
        number: 1,
        field_mask: Some(prost_types::FieldMask { paths: vec!["fault_id".into(), "ipa".into()] }),
        ..Default::default()
    };
    let got = faults(&observe(&mut client, req).await.unwrap());
    assert!(got[0].fault_id != 0 && got[0].esr == 0 && got[0].policy.is_empty());

    // Bad arguments.
    let code = |r: Result<_, tonic::Status>| r.err().map(|s| s.code());
    let bad = ObserveRequest { first: true, follow: true, ..Default::default() };
    assert_eq!(code(observe(&mut client, bad).await), Some(Code::InvalidArgument));
    let ts = |s| Some(prost_types::Timestamp { seconds: s, nanos: 0 });
    let bad = ObserveRequest { since: ts(2_000_000_000), until: ts(1_000_000_000), ..Default::default() };
    assert_eq!(code(observe(&mut client, bad).await), Some(Code::InvalidArgument));
    let inverted = IpaRange { start: 0x2000, end: 0x1000 };
    let bad = ObserveRequest {
        allowlist: vec![FaultFilter { ipa_range: vec![inverted], ..Default::default() }],
        ..Default::default()
    };
    assert_eq!(code(observe(&mut client, bad).await), Some(Code::InvalidArgument));
    let bad = ObserveRequest {
        allowlist: vec![FaultFilter { outcome: vec![99], ..Default::default() }],
        ..Default::default()
    };
    assert_eq!(code(observe(&mut client, bad).await), Some(Code::InvalidArgument));
    let bad =
        ObserveRequest { allowlist: vec![FaultFilter { vm_id: vec![42], ..Default::default() }], ..Default::default() };
    assert_eq!(code(observe(&mut client, bad).await), Some(Code::NotFound));

    let stats = client.get_stats(faultline_proto::v1::GetStatsRequest {}).await.unwrap().into_inner();
    let by = |v: &[faultline_proto::v1::Count], k: &str| v.iter().find(|c| c.key == k).map_or(0, |c| c.count);
    assert_eq!(by(&stats.by_outcome, "mapped"), mapped);
    assert_eq!(by(&stats.by_outcome, "mmio-exit"), mmio);
    assert_eq!(stats.by_outcome.iter().map(|c| c.count).sum::<u64>(), total);
    assert_eq!(by(&stats.by_kind, "translation") + by(&stats.by_kind, "permission"), total);
    assert_eq!(by(&stats.by_mapping_size, "4k"), mapped);
    assert_eq!(stats.policy, "4k");
    let e2e = stats.latency.iter().find(|h| h.stage == "end_to_end").unwrap();
    assert_eq!(e2e.count + stats.histogram_samples_skipped, total);
    assert!(e2e.min_ns <= e2e.p50_ns && e2e.p50_ns <= e2e.p99_ns && e2e.p99_ns <= e2e.max_ns && e2e.min_ns > 0);
    let pin = stats.latency.iter().find(|h| h.stage == "pin").unwrap();
    // Only mapped faults reach the pin stage (a skipped sample may be any fault's).
    assert!(pin.count <= mapped && pin.count + stats.histogram_samples_skipped >= mapped, "{pin:?} {mapped}");

    let status = client.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.num_events, status.seen_events, status.lost_events), (total, total, 0));
    assert!(status.max_events >= total && status.uptime_ns > 0 && status.events_per_second > 0.0);

    // Shutdown ends the follow stream and the daemon exits.
    let stopped = tokio::task::spawn_blocking(move || daemon.terminate());
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match live.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    // Ending with an error (the connection closing) is ending too.
    assert!(end.is_ok(), "the follow stream did not end when the daemon stopped");
    assert!(stopped.await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rom_filled_before_attach_reports_its_data_there_and_ram_holes_report_allocated() {
    use sim_machine::layout::{Layout, ROM_GPA};
    // The machine fills its read-only slot before it attaches (the daemon
    // seeds its populated bits from that); its RAM is holes. A fault on
    // the ROM maps data that was there; a first fault on a RAM page
    // allocates it.
    let daemon = Daemon::start(&["--policy", "4k"]);
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "1", "--pattern", "random", "--ops", "3000", "--seed", "5"]);
    tokio::task::spawn_blocking(move || run_machine(cmd)).await.unwrap();
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let all = faults(&observe(&mut client, ObserveRequest::default()).await.unwrap());
    let rom = ROM_GPA..ROM_GPA + Layout::default().rom_size;
    let mut seen = std::collections::HashSet::new();
    let (rom_faults, ram_faults): (Vec<_>, Vec<_>) = all
        .iter()
        .filter(|e| e.outcome == Outcome::Mapped as i32 && seen.insert(e.ipa >> 12))
        .partition(|e| rom.contains(&e.ipa));
    assert!(rom_faults.len() > 20 && ram_faults.len() > 20, "{} ROM, {} RAM", rom_faults.len(), ram_faults.len());
    let wrong = |faults: &[&faultline_proto::v1::FaultEvent], populated: bool| {
        faults.iter().filter(|e| e.populated != populated).map(|e| format!("{:#x}", e.ipa)).collect::<Vec<_>>()
    };
    assert_eq!(wrong(&rom_faults, false), Vec::<String>::new(), "ROM pages reported allocated");
    assert_eq!(wrong(&ram_faults, true), Vec::<String>::new(), "RAM holes reported as data there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_lists_the_attached_vms_and_their_memslots() {
    use faultline_proto::v1::control_client::ControlClient;
    use faultline_proto::v1::{GetVmRequest, ListVmsRequest};
    use std::process::Stdio;
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let mut control = ControlClient::connect(daemon.grpc_addr()).await.unwrap();
    assert!(control.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty());
    let mut child = machine(&daemon)
        .args(["--vm-id", "5", "--vcpus", "2", "--pattern", "sequential", "--ops", "3000000", "--spin-polls", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vms = loop {
        let vms = control.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms;
        if !vms.is_empty() {
            break vms;
        }
        assert!(child.try_wait().unwrap().is_none(), "machine ended before it was listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(vms.len(), 1);
    let vm = &vms[0];
    assert_eq!((vm.vm_id, vm.vcpus), (5, 2));
    let slots: Vec<(u64, bool)> = vm.memslots.iter().map(|m| (m.gpa, m.read_only)).collect();
    assert_eq!(slots, [(0x1000_0000, true), (0x4000_0000, false)]);
    let one = control.get_vm(GetVmRequest { vm_id: 5 }).await.unwrap().into_inner();
    assert_eq!(one.vm_id, 5);
    let missing = control.get_vm(GetVmRequest { vm_id: 9 }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    child.kill().unwrap();
    child.wait().unwrap();
    // A machine that dies detaches its VM.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !control.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "VM still listed after its machine died");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Context switches, so far, of the daemon's gRPC threads (`api`).
fn api_thread_switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "api"))
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_wakes_its_api_threads_only_while_someone_follows_and_a_late_follower_is_served_live() {
    let daemon = Daemon::start(&["--policy", "4k"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = api_thread_switches(daemon.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let woken = api_thread_switches(daemon.pid()) - before;
    // A timer polling the event history for followers nobody has: about
    // 400 switches a second (each 5 ms tick and the wake it hands on).
    assert!(woken < 40, "an idle daemon's API threads switched {woken} times in a second");

    // The first follower after that idle second still sees faults live.
    let mut follower = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut live = follower.observe(ObserveRequest { follow: true, ..Default::default() }).await.unwrap().into_inner();
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "1", "--pattern", "sequential", "--ops", "200"]);
    let summary = tokio::task::spawn_blocking(move || run_machine(cmd)).await.unwrap();
    assert!(summary["faults"].as_u64().unwrap() > 0);
    let first = tokio::time::timeout(Duration::from_secs(30), live.message())
        .await
        .expect("no live event for a follower that came after an idle spell");
    assert!(matches!(first.unwrap().and_then(|r| r.response_types), Some(ResponseTypes::Fault(_))));
}
