//! Fault throughput with eight slow FaultTrace observers connected against
//! none, in one run: rounds alternate between the two so drift on the host
//! affects both alike. Each configuration runs twice: unpinned, and with the
//! daemon and the observers on CPU 0 and the machine's vCPU alone on CPU 1
//! (as vCPU threads are isolated in production), because on a 2-core host both cores are
//! owned by spinning threads and any other work preempts one of them.
//!
//! A slow observer follows every event and takes 5 ms per message, so the
//! daemon's history overwrites what it has not read and it is sent
//! lost-event records: the fault path must not wait for it. The run right
//! after the observers connect is reported apart: it also pays for filling
//! each observer's HTTP/2 window (~15k events encoded per observer, once).
//! `OBSERVERS_BENCH_API_PRIORITY` sets the daemon's `--api-priority`.
//!
//! A third configuration is abuse: 1000 follow streams (`OBSERVERS_BENCH_IDLE`),
//! each on its own connection, that never read, and 100 malformed
//! requests; reported with the daemon's resident memory after it.
//!
//! `cargo bench -p faultline-system-tests --bench observers`

use std::process::Command;
use std::time::Duration;

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::ObserveRequest;
use faultline_system_tests::{binary, fault_latencies, Daemon};
use memory_manager::daemon::priority::{apply_to_current_thread, ApiPriority};

/// Rounds per configuration (`OBSERVERS_BENCH_ROUNDS` overrides).
const ROUNDS: usize = 8;
const OBSERVERS: usize = 8;
/// Follow streams that never read, in the abuse configuration.
const IDLE: usize = 1000;
/// Sequential, 1 KiB apart: 40k distinct 4 KiB pages per run.
const OPS: usize = 160_000;

/// One machine run's per-fault latencies, ns.
fn run_machine(daemon: &Daemon, pinned: bool) -> Vec<u64> {
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(binary("sim-machine"));
        c
    } else {
        Command::new(binary("sim-machine"))
    };
    cmd.arg("--attach-socket").arg(&daemon.socket);
    cmd.args(["--pattern", "sequential", "--ops", &OPS.to_string(), "--ram-page-kib", "4"]);
    fault_latencies(cmd)
}

/// Faults per second of fault time in one run.
fn throughput(ns: &[u64]) -> f64 {
    ns.len() as f64 * 1e9 / ns.iter().sum::<u64>() as f64
}

/// Anonymous resident memory of `pid`, KiB: the daemon's own, without the
/// guest memory it maps (shared with the machine).
fn rss_kib(pid: u32) -> u64 {
    faultline_system_tests::proc_status_kib(pid, "RssAnon")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Default)]
struct Series {
    runs: Vec<f64>,
    all: Vec<u64>,
}

impl Series {
    fn add(&mut self, ns: Vec<u64>) {
        self.runs.push(throughput(&ns));
        self.all.extend(ns);
    }

    fn row(&mut self, name: &str) -> f64 {
        self.all.sort_unstable();
        let n = self.all.len();
        let slow = self.all.iter().filter(|&&x| x > 50_000).count();
        let per_sec = median(self.runs.clone());
        println!(
            "| {name} | {:.2} | {:.2} | {:.0} | {n} | {slow} |",
            self.all[n / 2] as f64 / 1e3,
            self.all[n * 99 / 100] as f64 / 1e3,
            per_sec
        );
        per_sec
    }
}

fn main() {
    let _ = binary("memory-manager");
    // The observers' own threads: normal priority, or as the daemon's API
    // threads with OBSERVERS_BENCH_CLIENT_PRIORITY=low|idle (an observer
    // run under `nice` on the same host).
    let client = match std::env::var("OBSERVERS_BENCH_CLIENT_PRIORITY").as_deref() {
        Ok("low") => ApiPriority::Low,
        Ok("idle") => ApiPriority::Idle,
        _ => ApiPriority::Normal,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(move || apply_to_current_thread(client).expect("client priority"))
        .enable_all()
        .build()
        .unwrap();
    println!("| configuration | median us | p99 us | faults/s (median run) | faults | faults > 50 us |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let configs: &[bool] =
        if std::env::var_os("OBSERVERS_BENCH_PINNED_ONLY").is_some() { &[true] } else { &[false, true] };
    for &pinned in configs {
        let priority = std::env::var("OBSERVERS_BENCH_API_PRIORITY").unwrap_or_else(|_| "low".into());
        let idle_streams = std::env::var("OBSERVERS_BENCH_IDLE").ok().and_then(|n| n.parse().ok()).unwrap_or(IDLE);
        let max_streams = (idle_streams + OBSERVERS + 8).to_string();
        let daemon = Daemon::start(&[
            "--max-observe-streams",
            &max_streams,
            "--policy",
            "4k",
            "--prefault",
            "--api-priority",
            &priority,
            "--log-filter",
            "warn,memory_manager::api=info",
        ]);
        if pinned {
            // The daemon and the observers (this process) share CPU 0; the
            // machine's vCPU has CPU 1 to itself.
            for pid in [daemon.pid(), std::process::id()] {
                let ok = Command::new("taskset").args(["-a", "-p", "-c", "0", &pid.to_string()]).output();
                assert!(ok.is_ok_and(|o| o.status.success()), "taskset failed");
            }
        }
        let addr = daemon.grpc_addr();
        // Warm up: the first attach maps and prefaults the guest memory file.
        run_machine(&daemon, pinned);
        let (mut none, mut fill, mut eight) = (Series::default(), Series::default(), Series::default());
        let (mut idle, mut idle_rss_kib, mut rss_before_kib) = (Series::default(), 0u64, 0u64);
        let rounds = std::env::var("OBSERVERS_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS);
        for _ in 0..rounds {
            none.add(run_machine(&daemon, pinned));
            let observers: Vec<_> = (0..OBSERVERS)
                .map(|_| {
                    let addr = addr.clone();
                    runtime.spawn(async move {
                        let mut client = FaultTraceClient::connect(addr).await.unwrap();
                        let req = ObserveRequest { follow: true, ..Default::default() };
                        let mut stream = client.observe(req).await.unwrap().into_inner();
                        while let Ok(Some(_)) = stream.message().await {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    })
                })
                .collect();
            // Let every observer connect before the guest starts. The first
            // run after connecting also fills each observer's HTTP/2 window
            // (a slow client still advertises megabytes); the second is the
            // steady state of observers that stay connected.
            std::thread::sleep(Duration::from_millis(300));
            fill.add(run_machine(&daemon, pinned));
            eight.add(run_machine(&daemon, pinned));
            for o in observers {
                o.abort();
            }
            std::thread::sleep(Duration::from_millis(100));
            // Abuse: streams that never read, and requests that are refused.
            // Memory in the first round (later rounds start with what the
            // allocator kept of earlier streams).
            let first_round = rss_before_kib == 0;
            if first_round {
                rss_before_kib = rss_kib(daemon.pid());
            }
            let opening = std::time::Instant::now();
            let held = runtime.block_on(async {
                let mut held = Vec::new();
                for _ in 0..idle_streams {
                    let mut client = FaultTraceClient::connect(addr.clone()).await.unwrap();
                    let req = ObserveRequest { follow: true, ..Default::default() };
                    let stream = client.observe(req).await.unwrap().into_inner();
                    held.push((client, stream));
                }
                let mut client = FaultTraceClient::connect(addr.clone()).await.unwrap();
                for _ in 0..100 {
                    let bad = ObserveRequest { first: true, follow: true, ..Default::default() };
                    assert_eq!(client.observe(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
                }
                held
            });
            if first_round {
                // Each on its own connection: TCP and HTTP/2 setup, then the
                // response headers (40 ms each with Nagle on the server).
                eprintln!("{idle_streams} streams opened in {:.2} s", opening.elapsed().as_secs_f64());
            }
            run_machine(&daemon, pinned);
            idle.add(run_machine(&daemon, pinned));
            if first_round {
                idle_rss_kib = rss_kib(daemon.pid());
            }
            drop(held);
            std::thread::sleep(Duration::from_millis(300));
        }
        let tag = if pinned { "pinned" } else { "unpinned" };
        let a = none.row(&format!("{tag}, no observers"));
        let f = fill.row(&format!("{tag}, {OBSERVERS} slow observers, first run after they connect"));
        let b = eight.row(&format!("{tag}, {OBSERVERS} slow observers (5 ms/event), connected"));
        println!(
            "| {tag}: throughput with observers connected {:.1}% of without ({:.1}% in the run that fills their windows) | | | | | |",
            100.0 * b / a,
            100.0 * f / a
        );
        let c = idle.row(&format!("{tag}, {idle_streams} follow streams that never read, after their first run"));
        println!(
            "| {tag}: throughput with {idle_streams} idle streams {:.1}% of without; daemon anonymous RSS {} MiB with them, {} MiB before (first round) | | | | | |",
            100.0 * c / a,
            idle_rss_kib / 1024,
            rss_before_kib / 1024
        );
    }
}
