//! A daemon that dies, is restarted or is replaced under running guests:
//! the guests see a stall and lose nothing.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use faultline_proto::v1::control_client::ControlClient;
use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::policy_control_client::PolicyControlClient;
use faultline_proto::v1::{GetDirtyLogRequest, GetVmRequest, ServerStatusRequest, UsePolicyRequest};
use faultline_system_tests::{machine, metric_samples, scrape_metrics, Daemon, PolicyProcess, TracedMachine};
use nix::sys::signal::Signal;
use sim_machine::layout::Layout;
use sim_machine::workload::{generate, replay_flat, OpKind, Pattern};

/// A small deterministic generator (xorshift) for kill moments.
struct Moments(u64);

impl Moments {
    fn next(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo)
    }
}

/// Waits until the daemon in place serves VM `vm` (a restarted one takes
/// it back) and returns its gRPC address.
async fn serving(daemon: &Daemon, vm: u32) -> String {
    let started = Instant::now();
    loop {
        let addr = daemon.grpc_addr();
        if let Ok(mut c) = ControlClient::connect(addr.clone()).await {
            if c.get_vm(GetVmRequest { vm_id: vm }).await.is_ok() {
                return addr;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "vm {vm} never came back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Fetches (and clears) the dirty log of `vm`'s RAM memslot; the pages.
async fn fetch_dirty(daemon: &Daemon, vm: u32) -> BTreeSet<u64> {
    serving(daemon, vm).await;
    let mut c = ControlClient::new(daemon.unix_channel().await);
    let log = c.get_dirty_log(GetDirtyLogRequest { vm_id: vm, memslot: 0, peek: false }).await.unwrap().into_inner();
    faultline_proto::dirty_pages(log.gpa, &log.bitmap).collect()
}

/// Kills the daemon `kills` times, each once the daemon in place has served
/// a random number of faults: moments in the workload, whatever the
/// machine's speed.
async fn kill_during(daemon: &mut Daemon, kills: usize, moments: &mut Moments) {
    for kill in 0..kills {
        let after = moments.next(50, 600);
        let started = Instant::now();
        while daemon.seen_events().await < after {
            assert!(started.elapsed() < Duration::from_secs(60), "kill {kill}: the daemon served no faults");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::task::block_in_place(|| daemon.kill_and_restart(Signal::SIGKILL));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_daemons_are_replaced_under_a_running_guest_and_nothing_is_lost() {
    // 20 SIGKILLs, each followed at once by a restart, during one 4-vCPU
    // random workload with dirty logging on RAM and a resident budget that
    // evicts (32 MiB of 224 MiB, from a policy service the restarted
    // daemons take back). The workload runs in two phases; between them the
    // dirty log is fetched, and after the second it is fetched again: it
    // must hold every page the second phase wrote.
    const KILLS_PER_PHASE: usize = 10;
    let mut daemon = Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "2000"]);
    let policy = PolicyProcess::start("policy-sequential", &["--window", "0", "--budget", "4:32:fifo"]);
    let mut pc = PolicyControlClient::new(daemon.unix_channel().await);
    let req = UsePolicyRequest { endpoint: policy.endpoint.clone(), reconnect: None };
    assert_eq!(pc.use_policy(req).await.unwrap().into_inner().budgets, 1);
    let layout = Layout { nr_vcpus: 4, ..Layout::default() };
    let (ops, seed) = (30_000, 21);
    let mut workload = generate(Pattern::Random, &layout, ops, seed);
    workload.pauses = vec![vec![ops / 2; 4], vec![ops; 4]];
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("kills.trace");
    std::fs::write(&trace, workload.to_trace()).unwrap();
    let args = ["--vm-id", "4", "--vcpus", "4", "--dirty-log", "--spin-polls", "0", "--reattach-deadline-s", "30"];
    let mut m = TracedMachine::spawn(&daemon, &args, &trace);
    let mut moments = Moments(0x5eed);

    kill_during(&mut daemon, KILLS_PER_PHASE, &mut moments).await;
    tokio::task::block_in_place(|| m.wait_paused(0));
    fetch_dirty(&daemon, 4).await;
    m.resume();
    kill_during(&mut daemon, KILLS_PER_PHASE, &mut moments).await;
    tokio::task::block_in_place(|| m.wait_paused(1));
    // Every page the second phase wrote is in the log, across the kills.
    let fetched = fetch_dirty(&daemon, 4).await;
    let written: BTreeSet<u64> = (0..4)
        .flat_map(|v| workload.phase(1, v))
        .filter(|op| op.kind == OpKind::Write && layout.in_ram(op.gpa, op.size as u64))
        .map(|op| op.gpa & !0xfff)
        .collect();
    let missing: Vec<&u64> = written.difference(&fetched).collect();
    assert!(
        missing.is_empty(),
        "{} pages written in phase 2 are not in the log: {:x?}",
        missing.len(),
        &missing[..missing.len().min(8)]
    );
    // The last daemon took the policy back and evicted under its budget.
    let mut vms = ControlClient::connect(daemon.grpc_addr()).await.unwrap();
    let vm = vms.get_vm(GetVmRequest { vm_id: 4 }).await.unwrap().into_inner();
    assert_eq!(active_policy(&daemon).await, "sequential-4k", "the policy came back with the daemon");
    assert!(vm.resident_bytes <= (32 << 20) + (4 << 12), "over budget: {}", vm.resident_bytes);
    // The re-attached store still holds evicted pages, and /metrics says
    // what GetVm says while the guest is paused.
    assert!(vm.swap_store_held_bytes > 0, "{vm:?}");
    let metrics = tokio::task::block_in_place(|| metric_samples(&scrape_metrics(&daemon.metrics_addr())));
    for (family, want) in [
        ("faultline_vm_resident_bytes", vm.resident_bytes),
        ("faultline_vm_backing_bytes", vm.backing_bytes),
        ("faultline_vm_swap_store_bytes", vm.swap_store_bytes),
        ("faultline_vm_swap_held_bytes", vm.swap_store_held_bytes),
    ] {
        assert_eq!(metrics.get(&format!("{family}{{vm=\"4\"}}")).copied(), Some(want as f64), "{family}");
    }
    // The last daemon knows it replaced one that died, and took the VM back.
    let mut trace_client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let st = trace_client.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
    assert!(st.recovered_after_crash && !st.took_over, "{st:?}");
    assert_eq!(st.reattached_vms, 1, "{st:?}");
    m.resume();

    let out = tokio::task::block_in_place(|| m.child.wait_with_output()).unwrap();
    assert!(out.status.success(), "machine failed");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Nothing lost: memory equals the replay (evicted pages came back from
    // the store, on faults and at detach), every fault was served.
    let flat = replay_flat(&layout, &workload);
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "guest RAM intact");
    assert_eq!(summary["rom_digest"].as_u64().unwrap(), flat.rom_digest(), "guest ROM intact");
    assert_eq!(summary["stalls"]["count"].as_u64(), Some(2 * KILLS_PER_PHASE as u64), "one stall per kill");
    assert_eq!(summary["injected"].as_u64(), Some(0), "no fault failed");
    // After the last re-attach, the daemon's pins are exactly what the
    // core's tables map.
    assert_eq!(summary["detach"]["pages_released"], summary["core_backing_pages"], "daemon records == core tables");
    assert!(summary["core_leaves"].as_u64().unwrap() > 1000);
    assert_eq!(summary["detach"]["pins_remaining"].as_u64(), Some(0));
    println!("stalls: {}", summary["stalls"]);
}

/// The policy in force on `daemon`, as PolicyControl reports it.
async fn active_policy(daemon: &Daemon) -> String {
    let mut pc = PolicyControlClient::new(daemon.unix_channel().await);
    pc.get_policy_status(faultline_proto::v1::GetPolicyStatusRequest {}).await.unwrap().into_inner().active
}

/// A machine paused halfway through its workload, attached.
struct PausedMachine {
    child: std::process::Child,
    /// A line lets it go on.
    stdin: std::process::ChildStdin,
    /// The rest of its stderr, once it ends.
    stderr: std::sync::mpsc::Receiver<String>,
    _trace: tempfile::TempDir,
}

impl PausedMachine {
    /// A 2-vCPU random workload of `ops` accesses per vCPU (seed `seed`,
    /// pausing halfway) attached as VM `vm` with `extra` arguments, once
    /// it paused.
    fn start(daemon: &Daemon, vm: u16, ops: usize, seed: u64, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("paused.trace");
        std::fs::write(&trace, Self::workload(ops, seed).to_trace()).unwrap();
        let vm = vm.to_string();
        let args: Vec<&str> =
            ["--vm-id", &vm, "--vcpus", "2", "--spin-polls", "0"].into_iter().chain(extra.iter().copied()).collect();
        let mut machine = TracedMachine::spawn(daemon, &args, &trace);
        machine.wait_paused(0);
        let TracedMachine { child, stdin, lines } = machine;
        let (tx, stderr) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
        });
        Self { child, stdin, stderr, _trace: dir }
    }

    /// Its workload.
    fn workload(ops: usize, seed: u64) -> sim_machine::workload::Workload {
        let mut workload = generate(Pattern::Random, &Layout { nr_vcpus: 2, ..Layout::default() }, ops, seed);
        workload.pauses = vec![vec![ops / 2; 2]];
        workload
    }

    /// Lets it go on and waits for the end: its output and stderr. A
    /// machine still running after two minutes (a VM the daemon left
    /// half-served waits for its fault forever) is killed: its output then
    /// says it failed.
    fn finish(mut self) -> (std::process::Output, String) {
        writeln!(self.stdin).unwrap();
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let out = self.child.wait_with_output().unwrap();
        (out, self.stderr.recv().unwrap_or_default())
    }
}

#[test]
fn a_machine_whose_daemon_never_returns_exits_with_a_clear_error_after_its_deadline() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    // Paused halfway, attached; the daemon dies; the machine goes on and
    // its next fault waits for a daemon that never comes.
    let paused = PausedMachine::start(&daemon, 1, 4_000, 1, &["--reattach-deadline-s", "1"]);
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.pid() as i32), Signal::SIGKILL).unwrap();
    let (out, stderr) = paused.finish();
    let waited = killed.elapsed();
    assert!(!out.status.success(), "the machine cannot finish without a daemon");
    assert!(stderr.contains("did not come back within 1s"), "unclear error: {stderr}");
    assert!(waited >= Duration::from_secs(1), "it waited its deadline, {waited:?}");
}

/// A daemon aborted at crash point `point` (its `nth` time) under a 4-vCPU
/// random workload, with `budget` evicting if given, restarted at once: the
/// machine finishes with its memory intact after exactly one stall.
async fn crash_at(point: &str, nth: u32, vm: u16, budget: Option<&str>) {
    crash_with_store_at(point, nth, vm, budget, "none").await
}

/// [`crash_at`], with swap stores laid out as `compression` says.
async fn crash_with_store_at(point: &str, nth: u32, vm: u16, budget: Option<&str>, compression: &str) {
    let spec = std::ffi::OsString::from(format!("{point}:{nth}"));
    let mut daemon = Daemon::start_with_env(
        &["--spin-polls", "0", "--policy-deadline-ms", "2000", "--swap-compression", compression],
        &[(faultline_system_tests::CRASH_AT_ENV, spec.as_os_str())],
    );
    let _policy = match budget {
        Some(b) => {
            let policy = PolicyProcess::start("policy-sequential", &["--window", "0", "--budget", b]);
            let mut pc = PolicyControlClient::new(daemon.unix_channel().await);
            let req = UsePolicyRequest { endpoint: policy.endpoint.clone(), reconnect: None };
            assert_eq!(pc.use_policy(req).await.unwrap().into_inner().budgets, 1);
            Some(policy)
        }
        None => None,
    };
    let layout = Layout { nr_vcpus: 4, ..Layout::default() };
    let (ops, seed) = (12_000, u64::from(vm));
    let child = machine(&daemon)
        .args(["--vm-id", &vm.to_string(), "--vcpus", "4", "--pattern", "random", "--ops", &ops.to_string()])
        .args(["--seed", &seed.to_string(), "--spin-polls", "0", "--reattach-deadline-s", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::task::block_in_place(|| daemon.restart_after_exit(faultline_system_tests::CRASH_AT_ENV));
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert!(out.status.success(), "machine failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(daemon.log().contains(&format!("aborting at {point}")), "the crash point was not reached");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flat = replay_flat(&layout, &generate(Pattern::Random, &layout, ops, seed));
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "guest RAM intact after {point}");
    assert_eq!(summary["stalls"]["count"].as_u64(), Some(1));
    assert_eq!(summary["injected"].as_u64(), Some(0));
    assert_eq!(summary["detach"]["pages_released"], summary["core_backing_pages"], "daemon records == core tables");
    assert_eq!(summary["detach"]["pins_remaining"].as_u64(), Some(0));
}

/// The daemon panics once, at panic point `point` (`name:N`), in
/// whichever of two VMs reaches it. That VM is let go as after a crash
/// (the daemon logs `let_go`): its machine re-attaches to the same daemon
/// and is served afresh. The other VM never notices. Both finish with
/// their memory intact; the daemon keeps running. Both machines start
/// paused halfway; with `while_paused`, they go on only once the panic
/// happened (a point that is reached while the VMs idle), otherwise at once
/// (a point reached by serving faults).
fn panic_in_one_vm(point: &str, let_go: &str, while_paused: bool) {
    let spec = std::ffi::OsString::from(point);
    let env = [(faultline_system_tests::PANIC_AT_ENV, spec.as_os_str())];
    let daemon = Daemon::start_with_env(&["--spin-polls", "0", "--policy", "4k"], &env);
    let layout = Layout { nr_vcpus: 2, ..Layout::default() };
    let ops = 6_000;
    let machines = [21u16, 22]
        .map(|vm| (vm, PausedMachine::start(&daemon, vm, ops, u64::from(vm), &["--reattach-deadline-s", "30"])));
    let name = point.split(':').next().unwrap();
    let panicked = format!("panicking at {name}");
    if while_paused {
        let started = Instant::now();
        while !daemon.log().contains(&panicked) {
            assert!(started.elapsed() < Duration::from_secs(60), "the panic point was not reached: {}", daemon.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mut stalls = Vec::new();
    for (vm, paused) in machines {
        let (out, stderr) = paused.finish();
        assert!(out.status.success(), "vm{vm} failed: {stderr}\n{}", daemon.log());
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let flat = replay_flat(&layout, &PausedMachine::workload(ops, u64::from(vm)));
        assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "vm{vm}'s RAM intact");
        assert_eq!(summary["injected"].as_u64(), Some(0), "vm{vm}: no fault failed");
        assert_eq!(summary["detach"]["pins_remaining"].as_u64(), Some(0), "vm{vm}");
        assert_eq!(
            summary["detach"]["pages_released"],
            summary["core_backing_pages"],
            "vm{vm}: records == core: {stderr}\n{}",
            daemon.log()
        );
        stalls.push(summary["stalls"]["count"].as_u64().unwrap());
    }
    let log = daemon.log();
    assert!(log.contains(&panicked), "the panic point was not reached: {log}");
    stalls.sort_unstable();
    assert_eq!(stalls, [0, 1], "exactly one VM was let go and came back: {log}");
    assert!(log.contains(let_go), "{log}");
    assert!(log.contains("re-attached: mapping state rebuilt from the core"), "{log}");
    // Still serving: both VMs detached from the daemon that panicked.
    assert_eq!(daemon.terminate().code(), Some(0), "the daemon survived the panic");
}

#[test]
fn a_panic_in_one_vms_service_lets_that_vm_go_and_touches_no_other() {
    // The 400th fault popped, by either VM's service in the pool.
    panic_in_one_vm("fault-popped:400", "a vCPU service panicked: the VM is let go", false);
}

#[test]
fn a_panic_in_one_vms_connection_thread_lets_that_vm_go_and_touches_no_other() {
    // The VMs' connection threads check on them every 20 ms, paused or not.
    panic_in_one_vm("vm-waiting:10", "a connection's thread panicked: its VM is let go", true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_a_fault_is_popped_and_before_its_map_is_sent() {
    crash_at("fault-popped", 300, 11, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_a_map_is_sent_and_before_its_result_is_read() {
    crash_at("map-sent", 300, 12, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_when_the_machine_asks_to_detach() {
    // The machine re-attaches to detach; the successor rebuilds its records
    // over the control ring, which the machine serves until it is detached.
    crash_at("detach-asked", 1, 17, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_the_store_write_and_the_unmap() {
    crash_at("store-written", 3, 13, Some("13:8:fifo")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_the_unmap_and_the_punch() {
    crash_at("unmapped", 3, 14, Some("14:8:fifo")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_the_packed_store_write_and_the_unmap() {
    crash_with_store_at("store-written", 3, 15, Some("15:8:fifo"), "lz4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_the_unmap_and_the_punch_with_a_packed_store() {
    crash_with_store_at("unmapped", 3, 16, Some("16:8:fifo"), "lz4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_a_dirty_log_fetch_loses_no_dirty_page() {
    let spec = std::ffi::OsString::from("dirty-fetch:1");
    let mut daemon =
        Daemon::start_with_env(&["--spin-polls", "0"], &[(faultline_system_tests::CRASH_AT_ENV, spec.as_os_str())]);
    let layout = Layout { nr_vcpus: 2, ..Layout::default() };
    let (ops, seed) = (6_000, 15);
    let mut workload = generate(Pattern::Random, &layout, ops, seed);
    workload.pauses = vec![vec![ops; 2]];
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("fetch.trace");
    std::fs::write(&trace, workload.to_trace()).unwrap();
    let mut m =
        TracedMachine::spawn(&daemon, &["--vm-id", "15", "--vcpus", "2", "--dirty-log", "--spin-polls", "0"], &trace);
    tokio::task::block_in_place(|| m.wait_paused(0));
    // The fetch dies with its daemon: the caller gets an error.
    serving(&daemon, 15).await;
    let mut c = ControlClient::new(daemon.unix_channel().await);
    let failed = c.get_dirty_log(GetDirtyLogRequest { vm_id: 15, memslot: 0, peek: false }).await;
    assert!(failed.is_err(), "the fetch should have died with the daemon");
    tokio::task::block_in_place(|| daemon.restart_after_exit(faultline_system_tests::CRASH_AT_ENV));
    // The next fetch, from the successor, reports every page written.
    let fetched = fetch_dirty(&daemon, 15).await;
    let written: BTreeSet<u64> = (0..2)
        .flat_map(|v| workload.phase(0, v))
        .filter(|op| op.kind == OpKind::Write && layout.in_ram(op.gpa, op.size as u64))
        .map(|op| op.gpa & !0xfff)
        .collect();
    assert!(written.is_subset(&fetched), "{} written pages missing", written.difference(&fetched).count());
    m.resume();
    let out = tokio::task::block_in_place(|| m.child.wait_with_output()).unwrap();
    assert!(out.status.success(), "machine failed");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), replay_flat(&layout, &workload).ram_digest());
    assert_eq!(summary["stalls"]["count"].as_u64(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_is_handed_to_a_new_daemon_three_times_without_reconnecting() {
    // One 4-vCPU random workload with dirty logging and a resident budget
    // that evicts (from a policy service each new daemon takes back),
    // handed over three times, each at a random moment (a number of faults
    // served by the daemon in place). The evicted pages go to lz4-packed
    // stores, which each new daemon reads only once the VM is its own.
    let mut daemon = Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "2000", "--swap-compression", "lz4"]);
    let policy = PolicyProcess::start("policy-sequential", &["--window", "0", "--budget", "16:32:fifo"]);
    let mut pc = PolicyControlClient::new(daemon.unix_channel().await);
    let req = UsePolicyRequest { endpoint: policy.endpoint.clone(), reconnect: None };
    assert_eq!(pc.use_policy(req).await.unwrap().into_inner().budgets, 1);
    let layout = Layout { nr_vcpus: 4, ..Layout::default() };
    let (ops, seed) = (20_000, 16);
    let child = machine(&daemon)
        .args(["--vm-id", "16", "--vcpus", "4", "--pattern", "random", "--ops", &ops.to_string()])
        .args(["--seed", &seed.to_string(), "--dirty-log", "--spin-polls", "0", "--reattach-deadline-s", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut moments = Moments(0x7a4e);
    for takeover in 0..3 {
        let after = moments.next(100, 1500);
        let started = Instant::now();
        while daemon.seen_events().await < after {
            assert!(started.elapsed() < Duration::from_secs(60), "takeover {takeover}: no faults served");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::task::block_in_place(|| daemon.take_over());
        let mut c = FaultTraceClient::connect(serving(&daemon, 16).await).await.unwrap();
        let st = c.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
        assert!(st.took_over && !st.recovered_after_crash, "takeover {takeover}: {st:?}");
        assert_eq!(st.reattached_vms, 1, "takeover {takeover}: {st:?}");
    }
    // What an operator sees.
    let out = std::process::Command::new(faultline_system_tests::binary("faultline"))
        .args(["--server", &daemon.grpc_addr(), "status"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("started:          took over from a running daemon; VMs taken back: 1"), "{status}");
    assert_eq!(active_policy(&daemon).await, "sequential-4k", "the policy came with the VM");
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "machine failed: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flat = replay_flat(&layout, &generate(Pattern::Random, &layout, ops, seed));
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "guest RAM intact");
    assert_eq!(summary["rom_digest"].as_u64().unwrap(), flat.rom_digest(), "guest ROM intact");
    // The machine never lost its connection.
    assert_eq!(summary["stalls"]["count"].as_u64(), Some(0), "a machine reconnected: {stderr}");
    assert_eq!(summary["injected"].as_u64(), Some(0), "no fault failed");
    assert_eq!(summary["detach"]["pages_released"], summary["core_backing_pages"], "daemon records == core tables");
    assert_eq!(summary["detach"]["pins_remaining"].as_u64(), Some(0));
    let log = daemon.log();
    assert_eq!(log.matches("VM handed over to the new daemon").count(), 3, "{log}");
    // Each was handed over at a fault boundary (every command's result
    // read by the daemon that sent it), and the new daemon took the old
    // one's records rather than asking the core; unless the drain's
    // patience ran out with commands in flight (a loaded host), and then
    // the new daemon rebuilt from the core.
    let drains: Vec<&str> = log.lines().filter(|l| l.contains("drained for the handover")).collect();
    assert_eq!(drains.len(), 3, "{log}");
    let exact = drains.iter().filter(|l| l.contains("in_flight=0")).count();
    // Warm: each new daemon adopted a snapshot of the records while the old
    // one still served the guest, and only what changed after it.
    assert_eq!(log.matches("the new daemon adopted the records' snapshot").count(), 3, "{log}");
    assert_eq!(log.matches("taken over: the old daemon's records adopted (warm").count(), exact, "{log}");
    assert_eq!(log.matches("rebuilt from the core").count(), 3 - exact, "{log}");
    println!("{exact} of 3 handovers with the old daemon's records");
}

#[test]
fn a_daemon_stopped_with_sigterm_leaves_its_guests_to_the_next_one() {
    // `systemctl restart`: SIGTERM, then a new daemon, with the guest
    // attached and paused halfway. It goes on, re-attaches, and loses
    // nothing.
    let mut daemon = Daemon::start(&["--spin-polls", "0"]);
    let layout = Layout { nr_vcpus: 2, ..Layout::default() };
    let (ops, seed) = (8_000, 17);
    let paused = PausedMachine::start(&daemon, 17, ops, seed, &["--reattach-deadline-s", "30"]);
    daemon.kill_and_restart(Signal::SIGTERM);
    let (out, stderr) = paused.finish();
    assert!(out.status.success(), "machine failed: {stderr}");
    let log = daemon.log();
    assert!(log.contains("VM left for the next daemon"), "{log}");
    assert!(log.contains("memory-manager stopped"), "the first daemon stopped cleanly: {log}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flat = replay_flat(&layout, &PausedMachine::workload(ops, seed));
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "guest RAM intact");
    assert_eq!(summary["stalls"]["count"].as_u64(), Some(1));
    assert_eq!(summary["detach"]["pages_released"], summary["core_backing_pages"], "daemon records == core tables");
}
