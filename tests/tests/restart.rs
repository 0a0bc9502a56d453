//! A daemon that dies, is restarted or is replaced under running guests:
//! the guests see a stall and lose nothing.

use std::process::Stdio;
use std::time::{Duration, Instant};

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::ServerStatusRequest;
use faultline_system_tests::{machine, Daemon};
use nix::sys::signal::Signal;
use sim_machine::layout::Layout;
use sim_machine::workload::{digest_bytes, generate, replay_flat, Pattern};

/// Faults this daemon instance has recorded.
async fn seen(daemon: &Daemon) -> u64 {
    let mut c = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    c.server_status(ServerStatusRequest {}).await.unwrap().into_inner().seen_events
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_daemons_are_replaced_under_a_running_guest_and_nothing_is_lost() {
    const KILLS: usize = 20;
    let mut daemon = Daemon::start(&["--policy", "4k", "--spin-polls", "0"]);
    let layout = Layout { nr_vcpus: 4, ..Layout::default() };
    let (ops, seed) = (200_000, 21);
    let child = machine(&daemon)
        .args(["--vm-id", "4", "--vcpus", "4", "--pattern", "random", "--ops", &ops.to_string()])
        .args(["--seed", &seed.to_string(), "--spin-polls", "0", "--reattach-deadline-s", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Each kill lands once the daemon in place has served a random number
    // of faults: a moment in the workload, whatever the machine's speed.
    let mut moments = Moments(0x5eed);
    for kill in 0..KILLS {
        let after = moments.next(50, 600);
        let started = Instant::now();
        while seen(&daemon).await < after {
            assert!(started.elapsed() < Duration::from_secs(60), "kill {kill}: the daemon served no faults");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::task::block_in_place(|| daemon.kill_and_restart(Signal::SIGKILL));
    }
    // The last daemon knows it replaced one that died, and took the VM back.
    let mut trace = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let started = Instant::now();
    let status = loop {
        let s = trace.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
        if s.reattached_vms == 1 || started.elapsed() > Duration::from_secs(30) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(status.recovered_after_crash && !status.took_over, "{status:?}");
    assert_eq!(status.reattached_vms, 1, "{status:?}");
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "machine failed: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flat = replay_flat(&layout, &generate(Pattern::Random, &layout, ops, seed));
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), digest_bytes(&flat.ram), "guest RAM intact");
    assert_eq!(summary["rom_digest"].as_u64().unwrap(), digest_bytes(&flat.rom), "guest ROM intact");
    assert_eq!(summary["stalls"]["count"].as_u64(), Some(KILLS as u64), "one stall per kill");
    assert_eq!(summary["injected"].as_u64(), Some(0), "no fault failed");
    // After the last re-attach, the daemon's pins are exactly what the
    // core's tables map.
    assert_eq!(summary["detach"]["pages_released"], summary["core_backing_pages"], "daemon records == core tables");
    assert!(summary["core_leaves"].as_u64().unwrap() > 1000);
    assert_eq!(summary["detach"]["pins_remaining"].as_u64(), Some(0));
    println!("stalls: {}", summary["stalls"]);
}

#[test]
fn a_machine_whose_daemon_never_returns_exits_with_a_clear_error_after_its_deadline() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let child = machine(&daemon)
        .args(["--vcpus", "2", "--pattern", "random", "--ops", "5000000", "--spin-polls", "0"])
        .args(["--reattach-deadline-s", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains("VM attached") {
        assert!(Instant::now() < deadline, "machine never attached");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.pid() as i32), Signal::SIGKILL).unwrap();
    let out = child.wait_with_output().unwrap();
    let waited = killed.elapsed();
    assert!(!out.status.success(), "the machine cannot finish without a daemon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not come back within 1s"), "unclear error: {stderr}");
    assert!(waited >= Duration::from_secs(1), "it waited its deadline, {waited:?}");
}
