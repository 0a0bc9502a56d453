//! Memory policy services (issue 7), all real processes: the daemon, the
//! three policies in services/policies, the simulated machine, and gRPC
//! clients over TCP. The policies shape the same workload differently; a
//! swap mid-workload loses nothing; a policy that dies, stops, answers late
//! or sends malformed rules is dropped for the built-in one within the
//! watchdog's bound while the workload completes intact.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::observe_response::ResponseTypes;
use faultline_proto::v1::policy_control_client::PolicyControlClient;
use faultline_proto::v1::{
    FaultEvent, FaultFilter, GetPolicyStatusRequest, MappingSize, ObserveRequest, Outcome, PolicyExitKind,
    PolicyStatus, ServerStatusRequest, UseDefaultRequest, UsePolicyRequest,
};
use faultline_system_tests::{machine, Daemon, PolicyProcess, TracedMachine};
use nix::sys::signal::Signal;
use sim_machine::layout::Layout;
use sim_machine::workload::{generate, replay_flat, Pattern};
use tonic::transport::Channel;

const RAM_MIB: u64 = 64;
const RAM: std::ops::Range<u64> = 0x4000_0000..0x4000_0000 + (RAM_MIB << 20);

fn layout() -> Layout {
    Layout { nr_vcpus: 1, ram_size: RAM_MIB << 20, ..Layout::default() }
}

/// A machine running `pattern` as VM `vm`, started now.
fn start_machine(daemon: &Daemon, vm: u16, pattern: &str, ops: usize, seed: u64) -> Child {
    machine(daemon)
        .args(["--vm-id", &vm.to_string(), "--vcpus", "1", "--ram-mib", &RAM_MIB.to_string()])
        .args(["--pattern", pattern, "--ops", &ops.to_string(), "--seed", &seed.to_string()])
        .args(["--spin-polls", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting sim-machine")
}

/// Waits for the machine; checks it succeeded and its RAM is what a flat
/// replay of the same workload leaves. Returns its summary.
fn finish(child: Child, pattern: Pattern, ops: usize, seed: u64) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "machine failed: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flat = replay_flat(&layout(), &generate(pattern, &layout(), ops, seed));
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "guest data intact");
    assert_eq!(summary["detach"]["pins_remaining"], 0);
    summary
}

async fn control(daemon: &Daemon) -> PolicyControlClient<Channel> {
    PolicyControlClient::new(daemon.unix_channel().await)
}

async fn use_policy(daemon: &Daemon, endpoint: &str, reconnect: Option<bool>) -> PolicyStatus {
    let req = UsePolicyRequest { endpoint: endpoint.into(), reconnect };
    control(daemon).await.use_policy(req).await.unwrap_or_else(|s| panic!("UsePolicy {endpoint}: {s:?}")).into_inner()
}

async fn status(daemon: &Daemon) -> PolicyStatus {
    control(daemon).await.get_policy_status(GetPolicyStatusRequest {}).await.unwrap().into_inner()
}

/// Every buffered event of VM `vm`.
async fn events(daemon: &Daemon, vm: u32) -> Vec<FaultEvent> {
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let allow = FaultFilter { vm_id: vec![vm], ..Default::default() };
    let req = ObserveRequest { allowlist: vec![allow], ..Default::default() };
    let mut stream = client.observe(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        if let Some(ResponseTypes::Fault(e)) = r.response_types {
            out.push(e);
        }
    }
    out
}

/// Mapped RAM faults by mapping size: (4 KiB, 2 MiB).
fn ram_mappings(events: &[FaultEvent]) -> (usize, usize) {
    let ram = events.iter().filter(|e| e.outcome == Outcome::Mapped as i32 && RAM.contains(&e.ipa));
    let (mut small, mut large) = (0, 0);
    for e in ram {
        match MappingSize::try_from(e.mapping_size) {
            Ok(MappingSize::MappingSize4k) => small += 1,
            Ok(MappingSize::MappingSize2m) => large += 1,
            other => panic!("unexpected RAM mapping size {other:?}"),
        }
    }
    (small, large)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_policies_shape_the_same_workload_in_their_own_direction() {
    // Timing is not the subject here: deadlines generous enough for a
    // loaded 2-core machine running other tests.
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "2000"]);
    let (ops, seed) = (40_000, 5);
    let flat = replay_flat(&layout(), &generate(Pattern::Sequential, &layout(), ops, seed));
    let (pages, blocks) = (flat.ram_pages.len(), flat.ram_blocks.len());
    assert!(pages > 1000, "the workload touches {pages} pages");

    let run = |vm: u16| {
        let child = start_machine(&daemon, vm, "sequential", ops, seed);
        finish(child, Pattern::Sequential, ops, seed)
    };
    let baseline = PolicyProcess::start("policy-sequential", &["--window", "0"]);
    use_policy(&daemon, &baseline.endpoint, None).await;
    run(1);
    let largest = PolicyProcess::start("policy-largest", &[]);
    use_policy(&daemon, &largest.endpoint, None).await;
    run(2);
    let sequential = PolicyProcess::start("policy-sequential", &[]);
    use_policy(&daemon, &sequential.endpoint, None).await;
    run(3);
    let adaptive = PolicyProcess::start("policy-adaptive", &["--daemon", &daemon.grpc_addr(), "--sample", "32"]);
    use_policy(&daemon, &adaptive.endpoint, None).await;
    // The adaptive policy learns from FaultTrace, which it reads at the
    // API's pace: one run to learn VM 4's stream (it publishes 8, 16, 32,
    // then 64: generation 5), then the measured run.
    run(4);
    wait_for_generation(&daemon, 5).await;
    let learned = events(&daemon, 4).await.len();
    run(4);

    let (base, large, seq) = (events(&daemon, 1).await, events(&daemon, 2).await, events(&daemon, 3).await);
    let adapt = events(&daemon, 4).await.split_off(learned);
    // 4 KiB, no fault-around: one fault per page touched.
    assert_eq!(ram_mappings(&base), (pages, 0));
    // Largest: 2 MiB blocks only, one fault per block.
    assert_eq!(ram_mappings(&large), (0, blocks));
    assert!(large.iter().all(|e| e.policy == "largest"));
    // Sequential 4 KiB with a 15-page window: 4 KiB only, a sixteenth of
    // the faults (a window stops at pages already mapped, so a little more).
    let (seq_4k, seq_2m) = ram_mappings(&seq);
    assert_eq!(seq_2m, 0);
    assert!(seq_4k * 16 >= pages && seq_4k * 8 <= pages, "{seq_4k} faults for {pages} pages");
    assert!(seq.iter().filter(|e| RAM.contains(&e.ipa)).all(|e| e.fault_around <= 15));
    assert!(seq.iter().any(|e| e.fault_around == 15));
    // Adaptive: 4 KiB only; the stream widens its window past the fixed
    // policy's, so fewer faults than it.
    let (adapt_4k, adapt_2m) = ram_mappings(&adapt);
    assert_eq!(adapt_2m, 0);
    let widest = adapt.iter().map(|e| e.fault_around).max().unwrap();
    assert!(widest > 15, "adaptive window reached {widest}");
    assert!(adapt_4k < seq_4k, "adaptive {adapt_4k} faults, sequential {seq_4k}");
    // The direction, all together.
    assert!(blocks < adapt_4k && adapt_4k < seq_4k && seq_4k < pages);

    // The same VM turning random: the adaptive policy closes its window
    // (generation 6), and a random run then maps nothing around.
    let (ops_r, seed_r) = (30_000, 6);
    let child = start_machine(&daemon, 4, "random", ops_r, seed_r);
    finish(child, Pattern::Random, ops_r, seed_r);
    wait_for_generation(&daemon, 6).await;
    let before = events(&daemon, 4).await.len();
    let child = start_machine(&daemon, 4, "random", ops_r, seed_r);
    finish(child, Pattern::Random, ops_r, seed_r);
    let random_run = events(&daemon, 4).await.split_off(before);
    assert!(random_run.len() > 1000);
    assert!(random_run.iter().all(|e| e.fault_around == 0), "random faults still map around");
    // The largest policy asked for 1 GiB where the 2 MiB-backed memslot
    // allows 2 MiB: clamped, and counted.
    assert!(status(&daemon).await.clamped >= blocks as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_in_the_middle_of_a_workload_loses_and_fails_nothing() {
    // 4 KiB everywhere (the built-in 4k policy among them), so faults keep
    // coming for the whole run: 224 MiB touched at random, in phases. The
    // test drives the swaps: at each pause it swaps (sequential, adaptive,
    // default, ...) while the machine waits, resumes it, waits until the
    // new policy has decided a fault, then swaps again while the phase's
    // faults are in flight. The count of swaps does not depend on speed.
    const PHASES: usize = 12;
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy", "4k", "--policy-deadline-ms", "2000"]);
    let policies = [
        PolicyProcess::start("policy-sequential", &["--window", "7"]),
        PolicyProcess::start("policy-adaptive", &["--daemon", &daemon.grpc_addr()]),
    ];
    let big = Layout { nr_vcpus: 1, ..Layout::default() };
    let (ops, seed) = (300_000, 9);
    let mut workload = generate(Pattern::Random, &big, ops, seed);
    workload.pauses = (1..PHASES).map(|k| vec![ops * k / PHASES]).collect();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("phases.trace");
    std::fs::write(&trace, workload.to_trace()).unwrap();
    let mut m = TracedMachine::spawn(&daemon, &["--vm-id", "9", "--vcpus", "1", "--spin-polls", "0"], &trace);
    let mut trace_client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let seen = || {
        let mut c = trace_client.clone();
        async move { c.server_status(ServerStatusRequest {}).await.unwrap().into_inner().seen_events }
    };
    let mut swaps = 0;
    let swap = |to: usize| {
        let daemon = &daemon;
        let endpoint = policies.get(to).map(|p| p.endpoint.clone());
        async move {
            match endpoint {
                None => drop(control(daemon).await.use_default(UseDefaultRequest {}).await.unwrap()),
                Some(e) => drop(use_policy(daemon, &e, None).await),
            }
        }
    };
    for k in 0..PHASES - 1 {
        tokio::task::block_in_place(|| m.wait_paused(k));
        swap(k % 3).await;
        let before = seen().await;
        m.resume();
        // The policy just swapped in decides the phase's first faults...
        let started = Instant::now();
        while seen().await == before {
            assert!(started.elapsed() < Duration::from_secs(60), "phase {} made no fault", k + 1);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // ... and is swapped out while the rest are in flight.
        swap((k + 2) % 3).await;
        swaps += 2;
    }
    drop(m.stdin);
    let out = m.child.wait_with_output().unwrap();
    assert!(out.status.success(), "machine failed");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flat = replay_flat(&big, &workload);
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "guest data intact");
    assert_eq!(swaps, 2 * (PHASES - 1));
    let events = events(&daemon, 9).await;
    assert_eq!(events.len() as u64, summary["faults"].as_u64().unwrap(), "every fault has its event");
    let failed = [Outcome::InjectedAbort, Outcome::Rejected];
    assert!(events.iter().all(|e| !failed.iter().any(|o| e.outcome == *o as i32)), "no fault failed");
    let mut names: Vec<&str> = events.iter().map(|e| e.policy.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names, ["4k", "adaptive", "sequential-4k"], "faults were decided by each policy");
    let st = trace_client.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.lost_events, 0);
    let s = status(&daemon).await;
    assert_eq!(s.fallbacks, 0, "swaps are not fallbacks: {:?}", s.exits);
    assert!(s.exits.iter().all(|x| x.kind == PolicyExitKind::Replaced as i32));
    println!("{swaps} swaps during {} faults", events.len());
}

/// Waits until the policy in force has published rule set `generation`.
async fn wait_for_generation(daemon: &Daemon, generation: u64) {
    let started = Instant::now();
    loop {
        let s = status(daemon).await;
        if s.rules_generation >= generation {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "still at rule set {}: {s:?}", s.rules_generation);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the status shows a new exit; returns it and how long after
/// `since` it was recorded.
async fn next_exit(daemon: &Daemon, seen: usize, since: Instant) -> (faultline_proto::v1::PolicyExit, Duration) {
    loop {
        let s = status(daemon).await;
        if s.exits.len() > seen {
            return (s.exits[0].clone(), since.elapsed());
        }
        assert!(since.elapsed() < Duration::from_secs(10), "no fallback: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_policies_fall_back_to_the_default_within_the_bound() {
    // Heartbeat 100 ms, deadline 300 ms (so a healthy policy on a loaded
    // machine is not dropped first): a dead or stopped policy is gone
    // within 400 ms, plus scheduling on a loaded machine.
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "300"]);
    let bound = Duration::from_millis(400) + Duration::from_millis(600);
    let mut follow = FaultTraceClient::connect(daemon.grpc_addr())
        .await
        .unwrap()
        .observe(ObserveRequest { follow: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let (ops, seed) = (300_000, 11);

    type Break = fn(&PolicyProcess);
    let cases: [(&str, &[&str], Break, PolicyExitKind); 4] = [
        ("killed", &[], |p| p.signal(Signal::SIGKILL), PolicyExitKind::Disconnected),
        ("stopped", &[], |p| p.signal(Signal::SIGSTOP), PolicyExitKind::Hung),
        ("late", &["--consult", "--consult-delay-ms", "50"], |_| {}, PolicyExitKind::Late),
        ("malformed", &["--malformed-after-ms", "300"], |_| {}, PolicyExitKind::MalformedRules),
    ];
    for (exits_seen, (vm, (what, args, breaks, kind))) in (20u16..).zip(cases).enumerate() {
        let policy = PolicyProcess::start("policy-sequential", args);
        use_policy(&daemon, &policy.endpoint, Some(false)).await;
        let child = start_machine(&daemon, vm, "random", ops, seed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let broken = Instant::now();
        breaks(&policy);
        let (exit, after) = next_exit(&daemon, exits_seen, broken).await;
        assert_eq!(exit.kind, kind as i32, "{what}: {exit:?}");
        assert_eq!((exit.policy.as_str(), exit.successor.as_str()), ("sequential-4k", "default"), "{what}");
        assert!(!exit.reason.is_empty());
        match kind {
            // The late and malformed policies fail on their own schedule.
            PolicyExitKind::Late | PolicyExitKind::MalformedRules => {}
            _ => assert!(after < bound, "{what}: fallback after {after:?}"),
        }
        if kind == PolicyExitKind::MalformedRules {
            assert!(exit.reason.contains("fault-around of 1000 pages"), "{}", exit.reason);
        }
        println!("{what}: fallback {after:?} after the failure");
        assert_eq!(status(&daemon).await.active, "default", "{what}");
        // The workload is served by the default and finishes intact.
        finish(child, Pattern::Random, ops, seed);
        // Followers got the exit as an event.
        let exit_event = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let r = follow.message().await.unwrap().unwrap();
                if let Some(ResponseTypes::PolicyExit(x)) = r.response_types {
                    return x;
                }
            }
        })
        .await
        .expect("no PolicyExit event on the follow stream");
        assert_eq!(exit_event.kind, kind as i32);
    }
    let s = status(&daemon).await;
    assert_eq!(s.fallbacks, 4);
    assert!(s.consults_late >= 3);
    // The metric counts each kind.
    let metrics = scrape(&daemon).await;
    for reason in ["disconnected", "hung", "late", "malformed_rules"] {
        let line = format!("faultline_policy_fallbacks_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
}

async fn scrape(daemon: &Daemon) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(daemon.metrics_addr()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policies_are_refused_and_a_healthy_one_comes_back_only_if_told() {
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "300"]);
    let mut c = control(&daemon).await;
    // Malformed first rules: refused with the reason; the default stays.
    let bad = PolicyProcess::start("policy-sequential", &["--malformed-after-ms", "0"]);
    let err = c.use_policy(UsePolicyRequest { endpoint: bad.endpoint.clone(), reconnect: None }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("fault-around of 1000 pages"), "{}", err.message());
    // Nobody listening; not a URI.
    let err = c.use_policy(UsePolicyRequest { endpoint: "http://127.0.0.1:1".into(), reconnect: None }).await;
    assert_eq!(err.unwrap_err().code(), tonic::Code::Unavailable);
    let err = c.use_policy(UsePolicyRequest { endpoint: "not a uri".into(), reconnect: None }).await;
    assert_eq!(err.unwrap_err().code(), tonic::Code::InvalidArgument);
    let err = c.use_policy(UsePolicyRequest { endpoint: String::new(), reconnect: None }).await;
    assert_eq!(err.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(status(&daemon).await.active, "default");

    // Told to reconnect: stopped, dropped, continued, back in force.
    let p = PolicyProcess::start("policy-largest", &[]);
    assert!(use_policy(&daemon, &p.endpoint, Some(true)).await.reconnect);
    p.signal(Signal::SIGSTOP);
    let (exit, _) = next_exit(&daemon, 0, Instant::now()).await;
    assert_eq!(exit.kind, PolicyExitKind::Hung as i32);
    let s = status(&daemon).await;
    assert_eq!((s.active.as_str(), s.reconnecting_endpoint.as_str()), ("default", p.endpoint.as_str()));
    p.signal(Signal::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&daemon).await.active != "largest" {
        assert!(Instant::now() < deadline, "the policy never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not told to: it stays out.
    let q = PolicyProcess::start("policy-sequential", &[]);
    assert!(!use_policy(&daemon, &q.endpoint, Some(false)).await.reconnect);
    q.signal(Signal::SIGSTOP);
    next_exit(&daemon, 2, Instant::now()).await;
    q.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = status(&daemon).await;
    assert_eq!((s.active.as_str(), s.reconnecting_endpoint.as_str()), ("default", ""));
    // The largest policy was replaced (by q), not dropped again.
    assert_eq!(s.exits[1].kind, PolicyExitKind::Replaced as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resident_budget_below_the_working_set_holds_and_the_data_survives() {
    budget_below_the_working_set("none").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_swap_store_holds_the_evicted_pages_in_less_memory() {
    let store = budget_below_the_working_set("lz4").await;
    // The workload's pages are mostly zeros with a few words written: they
    // pack to a fraction of a page.
    assert!(store.bytes * 4 < store.held, "{} bytes hold {} bytes of pages", store.bytes, store.held);
}

/// The swap store at its fullest: its files' bytes, and the guest bytes
/// they held then.
struct StorePeak {
    bytes: u64,
    held: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_budget_evicts_the_mappings_installed_first() {
    // A 2 MiB budget (512 pages, the least a budget may be) and 640 pages
    // read from the highest IPA down, so the first installed are not the
    // lowest: FIFO evicts the 130 read first (at the 513th install down to
    // 448, at the 578th again), the highest 130. Then the lowest 32 are
    // read again (still mapped: no fault) and the highest 32 (evicted: each
    // faults back in).
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "2000"]);
    let policy = PolicyProcess::start("policy-sequential", &["--window", "0", "--budget", "40:2:fifo"]);
    assert_eq!(use_policy(&daemon, &policy.endpoint, None).await.budgets, 1);
    let page = |p: u64| RAM.start + p * 4096;
    let mut trace: Vec<String> = (0..640).rev().map(|p| format!("0 R {:#x} 8", page(p))).collect();
    trace.push("PAUSE".into());
    trace.extend((0..32).chain(608..640).map(|p| format!("0 R {:#x} 8", page(p))));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("descending.trace");
    std::fs::write(&path, trace.join("\n") + "\n").unwrap();
    let args = ["--vm-id", "40", "--vcpus", "1", "--ram-mib", "64", "--ram-page-kib", "4", "--spin-polls", "0"];
    let mut m = TracedMachine::spawn(&daemon, &args, &path);
    m.wait_paused(0);
    m.resume();
    drop(m.stdin);
    let out = m.child.wait_with_output().unwrap();
    assert!(out.status.success(), "machine failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut mapped = std::collections::HashMap::<u64, u32>::new();
    for e in events(&daemon, 40).await.iter().filter(|e| e.outcome == Outcome::Mapped as i32 && RAM.contains(&e.ipa)) {
        *mapped.entry((e.ipa - RAM.start) >> 12).or_default() += 1;
    }
    let times = |pages: std::ops::Range<u64>| pages.map(|p| mapped.get(&p).copied().unwrap_or(0)).collect::<Vec<_>>();
    assert_eq!(times(608..640), vec![2; 32], "the first installed were evicted and faulted back");
    assert_eq!(times(0..32), vec![1; 32], "the last installed stayed mapped");
}

/// An 8 MiB budget over a 64 MiB random workload, with the daemon's swap
/// store laid out as `compression` says: resident bytes and host memory
/// stay within the budget, and the guest's memory survives.
async fn budget_below_the_working_set(compression: &str) -> StorePeak {
    use faultline_proto::v1::control_client::ControlClient;
    use faultline_proto::v1::GetVmRequest;
    let daemon =
        Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "2000", "--swap-compression", compression]);
    // 4 KiB pages, an 8 MiB budget, oldest mapping first; the workload
    // touches 64 MiB at random.
    let budget = 8u64 << 20;
    let policy = PolicyProcess::start("policy-sequential", &["--window", "0", "--budget", "30:8:fifo"]);
    let s = use_policy(&daemon, &policy.endpoint, None).await;
    assert_eq!(s.budgets, 1);
    let (ops, seed) = (30_000, 12);
    let flat = replay_flat(&layout(), &generate(Pattern::Random, &layout(), ops, seed));
    assert!(flat.ram_pages.len() as u64 * 4096 > 4 * budget, "the working set is well over the budget");
    let child = start_machine(&daemon, 30, "random", ops, seed);
    let mut vms = ControlClient::connect(daemon.grpc_addr()).await.unwrap();
    let (mut peak, mut samples, mut evicted) = (0u64, 0, 0u64);
    let (mut peak_backing, mut store) = (0u64, StorePeak { bytes: 0, held: 0 });
    let started = Instant::now();
    loop {
        match vms.get_vm(GetVmRequest { vm_id: 30 }).await {
            Ok(vm) => {
                let vm = vm.into_inner();
                (peak, evicted) = (peak.max(vm.resident_bytes), vm.evicted);
                peak_backing = peak_backing.max(vm.backing_bytes);
                if vm.swap_store_held_bytes > store.held {
                    store = StorePeak { bytes: vm.swap_store_bytes, held: vm.swap_store_held_bytes };
                }
                samples += 1;
            }
            Err(s) if s.code() == tonic::Code::NotFound && samples > 0 => break,
            Err(_) => {}
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the workload did not finish");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Reclaim is direct: the install that passes the budget is reclaimed
    // before the vCPU's next fault is served, so one 4 KiB mapping over at
    // most (one vCPU, no fault-around).
    println!(
        "peak resident {} KiB of {} KiB budget over {samples} samples; {evicted} mappings evicted",
        peak >> 10,
        budget >> 10
    );
    assert!(peak <= budget + 4096, "peak resident {peak} over budget {budget}");
    assert!(evicted > 0);
    // Host memory, not mappings: the guest's backing files (RAM and the
    // machine's prefilled ROM) hold at most the budget's worth of RAM
    // pages; the rest wait in the swap store on disk.
    let (rom, working_set) = (layout().rom_size, flat.ram_pages.len() as u64 * 4096);
    println!(
        "host memory ({compression}): backing peak {} KiB = ROM {} KiB + RAM {} KiB for a {} KiB working set; swap store peak {} KiB holding {} KiB",
        peak_backing >> 10,
        rom >> 10,
        peak_backing.saturating_sub(rom) >> 10,
        working_set >> 10,
        store.bytes >> 10,
        store.held >> 10,
    );
    assert!(peak_backing <= rom + budget + (1 << 20), "backing {peak_backing} over ROM + budget");
    assert!(store.held > 0 && store.bytes > 0, "evicted pages are in the store");
    // Evicted pages came back on access and at detach: the digest covers
    // all of RAM.
    finish(child, Pattern::Random, ops, seed);
    // Pages mapped, evicted, then faulted back from the swap store.
    let mut mapped = std::collections::HashSet::new();
    let mut back = 0;
    for e in events(&daemon, 30).await.iter().filter(|e| e.outcome == Outcome::Mapped as i32 && RAM.contains(&e.ipa)) {
        back += (!mapped.insert(e.ipa >> 12) && e.populated) as usize;
    }
    assert!(back > 0, "no evicted page was faulted back");
    println!("{back} faults brought evicted pages back");
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resident_budget_under_four_vcpus_keeps_every_page() {
    // Four vCPUs go over the budget at once: their service threads must not
    // reclaim the same pages twice (the second copy of a punched page is a
    // hole, and overwrote the good copy in the store: pages came back as
    // zeros, and the digest changed from run to run).
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "2000"]);
    let policy = PolicyProcess::start("policy-sequential", &["--window", "0", "--budget", "31:8:fifo"]);
    assert_eq!(use_policy(&daemon, &policy.endpoint, None).await.budgets, 1);
    let four = Layout { nr_vcpus: 4, ..layout() };
    let (ops, seed) = (8_000, 31);
    let child = machine(&daemon)
        .args(["--vm-id", "31", "--vcpus", "4", "--ram-mib", &RAM_MIB.to_string()])
        .args(["--pattern", "random", "--ops", &ops.to_string(), "--seed", &seed.to_string(), "--spin-polls", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert!(out.status.success(), "machine failed: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flat = replay_flat(&four, &generate(Pattern::Random, &four, ops, seed));
    assert!(flat.ram_pages.len() as u64 * 4096 > 4 * (8 << 20), "the working set is well over the budget");
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "every evicted page came back");
    // Pages mapped, evicted, then faulted back from the store.
    let mut mapped = std::collections::HashSet::new();
    let back = events(&daemon, 31)
        .await
        .iter()
        .filter(|e| e.outcome == Outcome::Mapped as i32 && RAM.contains(&e.ipa))
        .filter(|e| !mapped.insert(e.ipa >> 12) && e.populated)
        .count();
    assert!(back > 1000, "only {back} evicted pages came back");
}

#[test]
fn the_cli_lists_uses_shows_and_drops_policies() {
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "2000"]);
    let policy = PolicyProcess::start("policy-sequential", &["--window", "3"]);
    let cli_at = |server: &str, args: &[&str]| {
        let out = std::process::Command::new(faultline_system_tests::binary("faultline"))
            .args(["--server", server])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Over plain TCP: listed, not changed; the error says where to go.
    let tcp = daemon.grpc_addr();
    let (ok, out) = cli_at(&tcp, &["policy", "use", &policy.endpoint]);
    let socket = daemon.grpc_unix_addr();
    assert!(!ok && out.contains("PermissionDenied: UsePolicy changes the daemon"), "{out}");
    assert!(out.contains(&socket) && out.lines().count() == 1, "{out}");
    let (ok, out) = cli_at(&tcp, &["policy", "list"]);
    assert!(ok && out.contains("* default"), "{out}");
    // On the Unix socket, everything.
    let cli = |args: &[&str]| cli_at(&socket, args);
    let (ok, out) = cli(&["policy", "use", &policy.endpoint]);
    assert!(ok, "{out}");
    assert!(out.contains("policy: sequential-4k") && out.contains("decides: mapping-size, fault-around"), "{out}");
    let (ok, out) = cli(&["policy", "list"]);
    assert!(ok && out.contains("* sequential-4k") && out.contains("  default"), "{out}");
    let (ok, out) = cli(&["policy", "status"]);
    assert!(ok && out.contains("rules: generation 1, 1 rules, 0 budgets"), "{out}");
    let (ok, out) = cli(&["policy", "default"]);
    assert!(ok && out.contains("policy: default"), "{out}");
    assert!(out.contains("left: replaced: UseDefault; default in force"), "{out}");
    // A bad endpoint: a clear error, non-zero exit.
    let (ok, out) = cli(&["policy", "use", "http://127.0.0.1:1"]);
    assert!(!ok && out.contains("Unavailable: ") && out.contains("unavailable"), "{out}");
}
