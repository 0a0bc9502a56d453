//! The working-set monitor (issue 17): DAMON-style regions sampled from
//! stage-2 access flags through the core, served over gRPC, shown by the
//! CLI, and used by cold reclaim. Real daemon, real machines (looping
//! their workload until told to stop, so nothing depends on how fast the
//! host runs them), real gRPC clients and CLI.

use std::io::Write;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use faultline_proto::v1::working_set_client::WorkingSetClient;
use faultline_proto::v1::{GetWorkingSetRequest, WorkingSetAggregation};
use faultline_system_tests::{binary, machine, Daemon};

const RAM: u64 = 0x4000_0000;
const MIB: u64 = 1 << 20;

/// Runs the CLI against `daemon`'s Unix socket; its stdout, or a panic
/// with its stderr.
fn cli(daemon: &Daemon, args: &[&str]) -> String {
    let out = std::process::Command::new(binary("faultline"))
        .args(["--server", &daemon.grpc_unix_addr()])
        .args(args)
        .output()
        .expect("running faultline");
    assert!(out.status.success(), "faultline {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Waits (polling the API) for VM `vm`'s aggregation that `ready`
/// accepts; panics after `patience` with the last one seen.
async fn wait_for(
    daemon: &Daemon,
    vm: u32,
    patience: Duration,
    ready: impl Fn(&WorkingSetAggregation) -> bool,
) -> WorkingSetAggregation {
    let mut client = WorkingSetClient::new(daemon.unix_channel().await);
    let deadline = Instant::now() + patience;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(seen) = client.get_working_set(GetWorkingSetRequest { vm_id: vm }).await {
            let seen = seen.into_inner();
            if ready(&seen) {
                return seen;
            }
            last = Some(seen);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no aggregation of vm {vm} as wanted within {patience:?}; the last: {last:#?}");
}

/// A `sim-machine` whose phases repeat until a line on its stdin.
fn looping_machine(daemon: &Daemon, args: &[&str]) -> (Child, std::process::ChildStdin) {
    let mut child = machine(daemon)
        .args(args)
        .arg("--loop-phases")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting sim-machine");
    let stdin = child.stdin.take().expect("stdin");
    (child, stdin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hottest_regions_of_a_zipf_workload_hold_its_hot_set() {
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy", "4k"]);
    // Not monitored until asked: the API says why.
    let text = cli(&daemon, &["monitor"]);
    assert!(text.starts_with("monitoring:  VMs whose policy names the working set\n"), "{text}");
    let text = cli(&daemon, &["monitor", "--enable", "--sample-us", "1000", "--aggregate-ms", "40"]);
    assert!(text.contains("monitoring:  every VM\nsampling:    every 1000 us; aggregating every 40 ms"), "{text}");
    // Zipf(1.0) over the 64 MiB of RAM: page r (from the start of RAM) is
    // accessed with probability 1 / (r H), so the first 16 pages take a
    // third of all accesses, and the last 56 MiB a fifth between them.
    let args = ["--vm-id", "7", "--vcpus", "1", "--ram-mib", "64", "--ram-page-kib", "4", "--spin-polls", "0"];
    let (child, mut stdin) = looping_machine(&daemon, &[&args[..], &["--pattern", "zipf", "--ops", "200000"]].concat());
    // Thirty aggregations of the workload running (its first pass maps
    // most pages; the monitor follows it from attach).
    let seen = wait_for(&daemon, 7, Duration::from_secs(120), |a| a.index >= 30).await;
    writeln!(stdin).unwrap();
    let hot_end = RAM + 16 * 4096;
    let hot: Vec<_> = seen.regions.iter().filter(|r| r.end > RAM && r.start < hot_end).collect();
    let coldest_part: Vec<_> = seen.regions.iter().filter(|r| r.start >= RAM + 8 * MIB).collect();
    let f_hot = hot.iter().map(|r| r.frequency).min().unwrap();
    let f_cold = coldest_part.iter().map(|r| r.frequency).max().unwrap();
    assert!(f_hot > f_cold, "the hot set is seen more often ({f_hot}) than anything past 8 MiB ({f_cold}): {seen:#?}");
    let hotter = seen.regions.iter().filter(|r| r.frequency > f_hot).count();
    assert!(
        hotter * 4 < seen.regions.len(),
        "the hot set is in the hottest quarter of the regions ({hotter} of {} are hotter): {seen:#?}",
        seen.regions.len()
    );
    // Regions tile the RAM memslot; the ROM slot is monitored too.
    let ram: u64 = seen.regions.iter().filter(|r| r.start >= RAM).map(|r| r.end - r.start).sum();
    assert_eq!(ram, 64 * MIB);
    assert!(seen.regions.len() >= 10 && seen.regions.len() <= 1000, "{}", seen.regions.len());
    assert!(seen.working_set_bytes > 0 && seen.working_set_bytes < seen.monitored_bytes, "{seen:#?}");
    assert!(seen.monitor_cpu_ns > 0);

    // The CLI's table: a summary line, a header, a row per region.
    let table = cli(&daemon, &["workingset", "7"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("vm7: ") && lines[0].contains(" regions over "), "{table}");
    assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), ["START", "END", "SIZE", "FREQ", "IDLE"], "{table}");
    assert!(lines.len() >= 12, "{table}");
    assert!(lines[2..].iter().all(|l| l.starts_with("0x")), "{table}");
    // And the metrics.
    let metrics =
        faultline_system_tests::metric_samples(&faultline_system_tests::scrape_metrics(&daemon.metrics_addr()));
    assert!(metrics.get("faultline_vm_working_set_bytes{vm=\"7\"}").is_some_and(|&b| b > 0.0), "{metrics:?}");
    let idle: f64 =
        metrics.iter().filter(|(k, _)| k.starts_with("faultline_vm_idle_bytes{vm=\"7\"")).map(|(_, v)| v).sum();
    assert!(idle > 0.0, "{metrics:?}");

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["access_flag_faults"].as_u64().unwrap() > 0, "the monitor's clears were taken at the core");
}
