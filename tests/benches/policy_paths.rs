//! Per-fault cost of a policy service's two paths against the built-in
//! policy, in one run: the same 4 KiB decisions made by the built-in `4k`
//! policy, by a policy service's rules (applied in the daemon, no call per
//! fault), and by the same service answering Consult for every fault
//! (one gRPC call per fault, under the 2 ms deadline). Rounds alternate the
//! three on one daemon, swapping the policy between runs.
//!
//! Reported per configuration (median over rounds): the fault's round trip
//! as the vCPU sees it (median, p99) and the daemon's decision stage
//! (mapping size: where the policy is asked; median, p99).
//!
//! `cargo bench -p faultline-system-tests --bench policy_paths`

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::observe_response::ResponseTypes;
use faultline_proto::v1::policy_control_client::PolicyControlClient;
use faultline_proto::v1::{ObserveRequest, Outcome, UseDefaultRequest, UsePolicyRequest};
use faultline_system_tests::{fault_latencies, machine, Daemon, PolicyProcess};

/// Rounds per configuration (`POLICY_BENCH_ROUNDS` overrides).
const ROUNDS: usize = 5;
/// Sequential, 1 KiB apart: 10k distinct 4 KiB pages per run.
const OPS: usize = 40_000;

/// The vCPU-side round trip of each fault, ns.
fn run_machine(daemon: &Daemon) -> Vec<u64> {
    let mut cmd = machine(daemon);
    cmd.args(["--pattern", "sequential", "--ops", &OPS.to_string(), "--ram-page-kib", "4"]);
    fault_latencies(cmd)
}

/// The decision stage of the last `n` mapped faults, ns, and who decided.
async fn decision_ns(daemon: &Daemon, n: usize) -> (Vec<u64>, String) {
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let req = ObserveRequest { number: n as u64, ..Default::default() };
    let mut stream = client.observe(req).await.unwrap().into_inner();
    let (mut out, mut policy) = (Vec::new(), String::new());
    while let Some(r) = stream.message().await.unwrap() {
        if let Some(ResponseTypes::Fault(e)) = r.response_types {
            if e.outcome == Outcome::Mapped as i32 {
                let s = e.stages.unwrap_or_default();
                out.push(s.size_ns.saturating_sub(s.vma_ns));
                policy = e.policy;
            }
        }
    }
    (out, policy)
}

fn percentile(v: &[u64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize] as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rounds = std::env::var("POLICY_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(ROUNDS);
    let daemon = Daemon::start(&["--policy", "4k"]);
    let rules = PolicyProcess::start("policy-sequential", &["--window", "0"]);
    let consult = PolicyProcess::start("policy-sequential", &["--window", "0", "--consult"]);
    let mut control = PolicyControlClient::new(daemon.unix_channel().await);
    let names = ["built-in 4k", "rules", "consult"];
    // [config] -> per round: (rt p50, rt p99, decision p50, decision p99)
    let mut results: Vec<Vec<[f64; 4]>> = vec![Vec::new(); 3];
    for round in 0..rounds {
        for (i, name) in names.iter().enumerate() {
            match i {
                0 => drop(control.use_default(UseDefaultRequest {}).await.unwrap()),
                _ => {
                    let endpoint = if i == 1 { &rules.endpoint } else { &consult.endpoint };
                    let req = UsePolicyRequest { endpoint: endpoint.clone(), reconnect: Some(false) };
                    control.use_policy(req).await.unwrap();
                }
            }
            let rt = run_machine(&daemon);
            let (decided, policy) = decision_ns(&daemon, rt.len()).await;
            let want = if i == 0 { "4k" } else { "sequential-4k" };
            assert_eq!(policy, want, "{name}: decided by {policy} (a fallback?)");
            let r =
                [percentile(&rt, 0.5), percentile(&rt, 0.99), percentile(&decided, 0.5), percentile(&decided, 0.99)];
            eprintln!(
                "round {round} {name:>12}: {} faults, round trip p50 {:.1} us p99 {:.1} us, decision p50 {:.2} us p99 {:.2} us",
                rt.len(),
                r[0] / 1e3,
                r[1] / 1e3,
                r[2] / 1e3,
                r[3] / 1e3
            );
            results[i].push(r);
        }
    }
    println!("policy path      round trip p50   p99      decision p50   p99   (median of {rounds} rounds, us)");
    for (i, name) in names.iter().enumerate() {
        let m = |k: usize| median(results[i].iter().map(|r| r[k]).collect()) / 1e3;
        println!("{name:<16} {:>10.1} {:>8.1} {:>14.2} {:>8.2}", m(0), m(1), m(2), m(3));
    }
    let status = control.get_policy_status(faultline_proto::v1::GetPolicyStatusRequest {}).await.unwrap();
    let s = status.into_inner();
    println!("consults {} (late {}), fallbacks {}", s.consults, s.consults_late, s.fallbacks);
}
