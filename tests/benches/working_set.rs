//! Reclaim by the working set, in one run: the same zipf-scan workload
//! (a zipf working set in the first quarter of guest memory, beside one
//! pass of writes through the rest) under
//! - no reclaim (the baseline),
//! - no reclaim, the working-set monitor on (what monitoring costs),
//! - a resident budget of half the guest, FIFO eviction,
//! - the same budget, coldest-first eviction (the working-set monitor),
//! - `policy-cold` and no budget (memory idle 1 s reclaimed, backing off
//!   on refaults and stall at its default bounds).
//!
//! Each row: a fresh daemon, and the machine held attached after its
//! workload, so what the daemon holds can be read. Reported (median over
//! rounds): refaults, the workload's run time, host memory the guest
//! takes (its memfd's allocated blocks, plus the swap store's where it is
//! in memory; here it is on the disk the state directory is on) and what
//! that frees against the baseline, the monitor thread's CPU per GiB
//! it samples, the daemon's CPU time over the workload (all its threads:
//! on a host whose cores the vCPUs fill, what reclaim costs shows up in
//! the run time), and the machine's TLB misses.
//!
//! The run cost is each row's run time against a baseline's run *beside
//! it* (the median of those ratios, and their range), and the CPU cost
//! the same for the CPU time of every process the row runs (daemon,
//! policy service, machine). On a host of two CPUs or more, each row
//! runs at the same time as a baseline of its own, each held to half the
//! CPUs (all of a row's processes: its daemon and policy service share
//! the vCPUs' CPUs, so what they cost lands on the guest), the halves
//! swapped every other run and both workloads started together: this
//! shared VM's speed drifts by tens of percent within seconds, and a
//! drift both sides see cancels out of the ratio (two identical 1-vCPU
//! workloads run one after the other differed by -15..+53% over six
//! pairs, run side by side by -9..+4%). On one CPU, or with
//! `WS_BENCH_SIDE_BY_SIDE=0`, rows run one after the other within a
//! round, in reverse order every other round, against the round's one
//! baseline.
//!
//! `cargo bench -p faultline-system-tests --bench working_set`
//! (`WS_BENCH_ROUNDS`, `WS_BENCH_OPS` override the rounds and accesses
//! per vCPU; `WS_BENCH_SHAPES=64x1,256x2` the guests, MiB x vCPUs;
//! `WS_BENCH_ROWS=baseline,cold` the rows, the baseline always among
//! them.)

use faultline_proto::v1::control_client::ControlClient;
use faultline_proto::v1::policy_control_client::PolicyControlClient;
use faultline_proto::v1::working_set_client::WorkingSetClient;
use faultline_proto::v1::{GetVmRequest, GetWorkingSetMonitorRequest, GetWorkingSetRequest, UsePolicyRequest};
use faultline_system_tests::{binary, machine, on_cpus, Daemon, HeldMachine, PolicyProcess};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

const VM: u32 = 9;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    Baseline,
    Monitored,
    Fifo,
    Coldest,
    Cold,
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct Measured {
    refaults: f64,
    run_ms: f64,
    host_bytes: f64,
    evicted: f64,
    monitor_cpu_ns: f64,
    monitored_bytes: f64,
    /// The daemon's CPU time (all its threads) over the workload.
    daemon_cpu_ms: f64,
    /// CPU time of everything the row runs, over the workload: the
    /// daemon's, the policy service's, and the machine's (from its start:
    /// its attach is the same in every row).
    all_cpu_ms: f64,
    /// The machine's TLB misses (walks).
    tlb_misses: f64,
}

/// CPU time process `pid` has used (user and system, all threads), in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the daemon's stat");
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat") + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e3 / hz
}

/// Two runs whose workloads start together.
#[derive(Default)]
struct StartTogether {
    ready: Mutex<u32>,
    both: Condvar,
}

impl StartTogether {
    /// Waits for the other run to be ready too; panics if it never is (it
    /// failed: a panic there poisons the lock, or it hangs).
    fn wait(&self) {
        let mut ready = self.ready.lock().expect("the run beside failed");
        *ready += 1;
        self.both.notify_all();
        let (_ready, waited) = self
            .both
            .wait_timeout_while(ready, Duration::from_secs(120), |ready| *ready < 2)
            .expect("the run beside failed");
        assert!(!waited.timed_out(), "the run beside never got ready to start its workload");
    }
}

/// Runs `row` once; with `start`, its workload starts when the row beside
/// it is ready to start its own.
async fn run(row: Row, vcpus: u32, ram_mib: u64, ops: u64, start: Option<&StartTogether>) -> Measured {
    let daemon = Daemon::start(&["--policy", "4k"]);
    let budget = format!("{VM}:{}", ram_mib / 2);
    let policy = match row {
        Row::Baseline => None,
        Row::Monitored => {
            let mut control = PolicyControlClient::new(daemon.unix_channel().await);
            let mut settings =
                control.get_working_set_monitor(GetWorkingSetMonitorRequest {}).await.unwrap().into_inner();
            settings.enabled = true;
            control.set_working_set_monitor(settings).await.unwrap();
            None
        }
        Row::Fifo => {
            Some(PolicyProcess::start("policy-sequential", &["--window", "0", "--budget", &format!("{budget}:fifo")]))
        }
        Row::Coldest => Some(PolicyProcess::start(
            "policy-sequential",
            &["--window", "0", "--budget", &format!("{budget}:coldest")],
        )),
        Row::Cold => Some(PolicyProcess::start(
            "policy-cold",
            &[
                "--daemon",
                &daemon.grpc_unix_addr(),
                "--vm",
                &VM.to_string(),
                "--idle-ms",
                "1000",
                "--interval-ms",
                "500",
            ],
        )),
    };
    if let Some(p) = &policy {
        let mut control = PolicyControlClient::new(daemon.unix_channel().await);
        control.use_policy(UsePolicyRequest { endpoint: p.endpoint.clone(), reconnect: Some(false) }).await.unwrap();
    }
    let policy_cpu = || policy.as_ref().map_or(0.0, |p| cpu_ms(p.pid().as_raw() as u32));
    if let Some(start) = start {
        start.wait();
    }
    let (cpu_before, policy_cpu_before) = (cpu_ms(daemon.pid()), policy_cpu());
    let held =
        HeldMachine::start({
            let mut m = machine(&daemon);
            m.args(["--vm-id", &VM.to_string(), "--vcpus", &vcpus.to_string(), "--ram-mib", &ram_mib.to_string()])
                .args(["--ram-page-kib", "4", "--pattern", "zipf-scan", "--ops", &ops.to_string()]);
            m
        });
    let vm = ControlClient::new(daemon.unix_channel().await)
        .get_vm(GetVmRequest { vm_id: VM })
        .await
        .unwrap_or_else(|e| panic!("{row:?}: {e}; the machine said {}", held.said))
        .into_inner();
    // The workload is over: the machine holds the VM.
    let daemon_cpu_ms = cpu_ms(daemon.pid()) - cpu_before;
    let all_cpu_ms = daemon_cpu_ms + (policy_cpu() - policy_cpu_before) + cpu_ms(held.pid());
    let seen = WorkingSetClient::new(daemon.unix_channel().await)
        .get_working_set(GetWorkingSetRequest { vm_id: VM })
        .await
        .ok()
        .map(|r| r.into_inner());
    let out = held.release();
    assert!(out.status.success(), "{row:?}: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Measured {
        refaults: vm.refaults as f64,
        run_ms: summary["run_ms"].as_u64().unwrap() as f64,
        // The swap store takes host memory only where it is in memory.
        host_bytes: (vm.backing_bytes + if vm.swap_store_in_memory { vm.swap_store_bytes } else { 0 }) as f64,
        evicted: vm.evicted as f64,
        monitor_cpu_ns: seen.as_ref().map_or(0.0, |s| s.monitor_cpu_ns as f64),
        monitored_bytes: seen.as_ref().map_or(0.0, |s| s.monitored_bytes as f64),
        daemon_cpu_ms,
        all_cpu_ms,
        tlb_misses: summary["tlb_misses"].as_u64().unwrap() as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The rows `WS_BENCH_ROWS` names (all of them when unset), the baseline
/// first whether named or not: every run cost is against it.
fn rows_to_run() -> Vec<Row> {
    let all = [Row::Baseline, Row::Monitored, Row::Fifo, Row::Coldest, Row::Cold];
    let Ok(list) = std::env::var("WS_BENCH_ROWS") else { return all.to_vec() };
    let named: Vec<Row> = list
        .split(',')
        .map(|name| {
            *all.iter()
                .find(|r| format!("{r:?}").eq_ignore_ascii_case(name.trim()))
                .unwrap_or_else(|| panic!("WS_BENCH_ROWS: no row {name:?}; rows: {all:?}"))
        })
        .collect();
    all.into_iter().filter(|r| *r == Row::Baseline || named.contains(r)).collect()
}

/// Runs `row` and a baseline at the same time, each on half of `cores`
/// CPUs (`row` on the upper half if `swap`); what each measured.
fn side_by_side(row: Row, vcpus: u32, ram_mib: u64, ops: u64, cores: usize, swap: bool) -> (Measured, Measured) {
    let (lower, upper) = (0..cores / 2, cores / 2..cores);
    let (row_cpus, base_cpus) = if swap { (upper, lower) } else { (lower, upper) };
    let start = StartTogether::default();
    let on = |cpus: std::ops::Range<usize>, row: Row| {
        let start = &start;
        move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            on_cpus(cpus, || rt.block_on(run(row, vcpus, ram_mib, ops, Some(start))))
        }
    };
    std::thread::scope(|s| {
        let base = s.spawn(on(base_cpus, Row::Baseline));
        let row = s.spawn(on(row_cpus, row));
        (row.join().expect("the row"), base.join().expect("the baseline"))
    })
}

/// Each run's `what` (run time, CPU time) of `row` against its
/// baseline's, in percent, smallest first.
fn run_costs(row: &[Measured], baseline: &[Measured], what: fn(&Measured) -> f64) -> Vec<f64> {
    let mut costs: Vec<f64> = row.iter().zip(baseline).map(|(r, b)| (what(r) / what(b) - 1.0) * 100.0).collect();
    costs.sort_by(f64::total_cmp);
    costs
}

/// `costs` (smallest first) as the table shows them: median (smallest .. largest).
fn spread(costs: &[f64]) -> String {
    let (lo, hi) = (costs.first().copied().unwrap_or(0.0), costs.last().copied().unwrap_or(0.0));
    format!("{:+.1}% ({lo:+.1} .. {hi:+.1})", median(costs.to_vec()))
}

fn main() {
    // Build the binaries before timing anything (and on every CPU).
    let _ = binary("memory-manager");
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (rounds, ops) = (env("WS_BENCH_ROUNDS", 3) as usize, env("WS_BENCH_OPS", 10_000_000));
    let rows = rows_to_run();
    let shapes: Vec<(u64, u32)> = match std::env::var("WS_BENCH_SHAPES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let (mib, vcpus) = s.split_once('x').expect("WS_BENCH_SHAPES: MIBxVCPUS,...");
                (mib.parse().expect("MiB"), vcpus.parse().expect("vCPUs"))
            })
            .collect(),
        Err(_) => vec![(64, 1), (64, 2), (256, 2)],
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let beside = cores >= 2 && std::env::var("WS_BENCH_SIDE_BY_SIDE").map_or(true, |v| v != "0");
    println!("zipf-scan, {ops} accesses per vCPU, 4 KiB pages; median of {rounds} rounds; budget: half the guest");
    if beside {
        println!(
            "each row beside a baseline of its own, each held to {} of the {cores} CPUs (swapped every other run)",
            cores / 2
        );
        println!("run cost: against the baseline beside it, median (smallest .. largest)");
    } else {
        println!("run cost: against the baseline of the same round, median (smallest .. largest)");
    }
    println!(
        "{:<8} {:>5} {:<9} {:>9} {:>9} {:>8} {:>25} {:>25} {:>10} {:>8} {:>14} {:>11} {:>10}",
        "guest",
        "vcpus",
        "row",
        "refaults",
        "evicted",
        "run ms",
        "run cost",
        "CPU cost (all processes)",
        "host MiB",
        "freed",
        "monitor CPU",
        "daemon CPU",
        "TLB misses"
    );
    let sequential = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    for (ram_mib, vcpus) in shapes {
        // Each row's runs, and the baselines its costs are against.
        let mut measured: Vec<Vec<Measured>> = vec![Vec::new(); rows.len()];
        let mut against: Vec<Vec<Measured>> = vec![Vec::new(); rows.len()];
        for round in 0..rounds {
            // Rows alternate within a round, and every other round runs
            // them backwards, so drift on the host spreads over all of
            // them rather than over the last ones.
            let mut order: Vec<usize> = (0..rows.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            if beside {
                for (k, i) in order.into_iter().filter(|&i| i > 0).enumerate() {
                    let (m, base) = side_by_side(rows[i], vcpus, ram_mib, ops, cores, (round + k) % 2 == 1);
                    measured[i].push(m);
                    against[i].push(base);
                    measured[0].push(base);
                    against[0].push(base);
                }
            } else {
                let mut this_round = vec![Measured::default(); rows.len()];
                for i in order {
                    this_round[i] = sequential.block_on(run(rows[i], vcpus, ram_mib, ops, None));
                }
                for (i, m) in this_round.into_iter().enumerate() {
                    measured[i].push(m);
                }
                let base = measured[0][round];
                against.iter_mut().for_each(|a| a.push(base));
            }
        }
        let med = |i: usize, f: fn(&Measured) -> f64| median(measured[i].iter().map(f).collect());
        let base_host = med(0, |m| m.host_bytes);
        for (i, row) in rows.iter().enumerate() {
            let host = med(i, |m| m.host_bytes);
            let freed = (base_host - host) / (ram_mib * MIB) as f64;
            let cpu =
                med(i, |m| m.monitor_cpu_ns / 1e6 / m.run_ms / (m.monitored_bytes / (1u64 << 30) as f64).max(1e-9));
            let cpu = if med(i, |m| m.monitored_bytes) > 0.0 { format!("{:.2}%/GiB", cpu * 100.0) } else { "-".into() };
            println!(
                "{:<8} {:>5} {:<9} {:>9.0} {:>9.0} {:>8.0} {:>25} {:>25} {:>10.1} {:>7.0}% {:>14} {:>8.0} ms {:>9.2}M",
                format!("{ram_mib} MiB"),
                vcpus,
                format!("{row:?}").to_lowercase(),
                med(i, |m| m.refaults),
                med(i, |m| m.evicted),
                med(i, |m| m.run_ms),
                spread(&run_costs(&measured[i], &against[i], |m| m.run_ms)),
                spread(&run_costs(&measured[i], &against[i], |m| m.all_cpu_ms)),
                host / MIB as f64,
                freed * 100.0,
                cpu,
                med(i, |m| m.daemon_cpu_ms),
                med(i, |m| m.tlb_misses) / 1e6
            );
        }
        // Every run's cost, for the spread the medians hide.
        for (i, row) in rows.iter().enumerate().skip(1) {
            let costs = run_costs(&measured[i], &against[i], |m| m.run_ms);
            let listed: Vec<String> = costs.iter().map(|c| format!("{c:+.1}")).collect();
            println!(
                "  {:<9} run cost of each run, %: {} ({} of {} at or under +3%)",
                format!("{row:?}").to_lowercase(),
                listed.join(" "),
                costs.iter().filter(|&&c| c <= 3.0).count(),
                costs.len()
            );
        }
    }
}
