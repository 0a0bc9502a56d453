//! The working-set monitor (issue 17): DAMON-style regions sampled from
//! stage-2 access flags through the core, served over gRPC, shown by the
//! CLI, and used by cold reclaim. Real daemon, real machines (looping
//! their workload until told to stop, so nothing depends on how fast the
//! host runs them), real gRPC clients and CLI.

use std::io::Write;
use std::process::{Child, ChildStdin, Output, Stdio};
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

/// An RGB PNG's width and pixels.
fn decode_png(path: &std::path::Path) -> (usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut px = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut px).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    (info.width as usize, px)
}

/// Waits (polling GetVm) until VM `vm` is as `ready` wants; panics with
/// `not` and the last answer after 120 s.
async fn vm_when(
    daemon: &Daemon,
    vm: u32,
    not: &str,
    ready: impl Fn(&faultline_proto::v1::Vm) -> bool,
) -> faultline_proto::v1::Vm {
    use faultline_proto::v1::control_client::ControlClient;
    let mut control = ControlClient::new(daemon.unix_channel().await);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = control.get_vm(faultline_proto::v1::GetVmRequest { vm_id: vm }).await.unwrap().into_inner();
        if ready(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{not}: {v:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `sim-machine` whose phases repeat until a line on its stdin; killed
/// if dropped before it finishes (a failed test leaves no guest looping).
struct LoopingMachine {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl LoopingMachine {
    fn start(daemon: &Daemon, args: &[&str]) -> Self {
        let mut child = machine(daemon)
            .args(args)
            .arg("--loop-phases")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting sim-machine");
        let stdin = child.stdin.take();
        Self { child: Some(child), stdin }
    }

    /// Ends the phase it repeats.
    fn next_phase(&mut self) {
        writeln!(self.stdin.as_mut().expect("running")).expect("telling the machine");
    }

    /// Ends the last phase and waits for it to detach and exit.
    fn finish(mut self) -> Output {
        self.next_phase();
        self.child.take().expect("running").wait_with_output().expect("waiting for the machine")
    }
}

impl Drop for LoopingMachine {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hottest_regions_of_a_zipf_workload_hold_its_hot_set() {
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy", "4k"]);
    // Not monitored until asked: the API says why.
    let text = cli(&daemon, &["monitor"]);
    assert!(text.starts_with("monitoring:  VMs whose policy names the working set\n"), "{text}");
    assert!(text.contains("\ncpu budget:  0.75% of a core per GiB monitored"), "{text}");
    // DAMON's intervals, as set (no CPU budget to stretch them).
    let text = cli(
        &daemon,
        &["monitor", "--enable", "--sample-us", "5000", "--aggregate-ms", "100", "--cpu-budget-per-gib-bp", "0"],
    );
    assert!(text.contains("monitoring:  every VM\nsampling:    every 5000 us; aggregating every 100 ms"), "{text}");
    assert!(text.contains("\ncpu budget:  none"), "{text}");
    // Zipf(1.0) over the 64 MiB of RAM: page r (from the start of RAM) is
    // accessed with probability 1 / (r H), so the first 16 pages take a
    // third of all accesses, and the last 56 MiB a fifth between them.
    let args = ["--vm-id", "7", "--vcpus", "1", "--ram-mib", "64", "--ram-page-kib", "4", "--spin-polls", "0"];
    let guest = LoopingMachine::start(&daemon, &[&args[..], &["--pattern", "zipf", "--ops", "200000"]].concat());
    // Thirty aggregations of the workload running (its first pass maps
    // most pages; the monitor follows it from attach).
    let seen = wait_for(&daemon, 7, Duration::from_secs(120), |a| a.index >= 30).await;
    let hot_end = RAM + 16 * 4096;
    let hot: Vec<_> = seen.regions.iter().filter(|r| r.end > RAM && r.start < hot_end).collect();
    // The far half takes 1/15 of the accesses between its 8192 pages: a
    // page there is hit at least 500 times less often than a hot one. At
    // 5 ms a sample that holds whether the guest makes a hundred accesses
    // a sample or ten thousand (the far half's pages are then hit in about
    // a tenth of the samples, the hot set's in all).
    let coldest_part: Vec<_> = seen.regions.iter().filter(|r| r.start >= RAM + 32 * MIB).collect();
    let f_hot = hot.iter().map(|r| r.frequency).min().unwrap();
    let f_cold = coldest_part.iter().map(|r| r.frequency).max().unwrap();
    assert!(f_hot > f_cold, "the hot set is seen more often ({f_hot}) than anything past 32 MiB ({f_cold}): {seen:#?}");
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
    // The heatmap, drawn live: the hot set is the bright band at the
    // start of RAM, the far end of RAM dark.
    let dir = tempfile::tempdir().unwrap();
    let png_path = dir.path().join("heat.png");
    let said =
        cli(&daemon, &["heatmap", "7", "--aggregations", "8", "--rows", "64", "--out", png_path.to_str().unwrap()]);
    assert!(said.contains("8 aggregations") && said.contains("IPA 0x40000000-0x44000000 in 64 rows"), "{said}");
    let (w, px) = decode_png(&png_path);
    // Row 0 of 64 holds the first MiB of RAM: at the bottom of the plot,
    // whose place and size the CLI says ("plot WxH at (84, 12)").
    let size = said.split("plot ").nth(1).and_then(|r| r.split(' ').next()).unwrap();
    let (plot_w, plot_h) =
        size.split_once('x').map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap())).unwrap();
    assert!(said.ends_with("at (84, 12)\n") && plot_h == 64 * 3, "{said}");
    let luma = |y: usize| {
        let row = &px[(y * w + 84) * 3..(y * w + 84 + plot_w) * 3];
        row.chunks(3).map(|p| 0.2126 * p[0] as f64 + 0.7152 * p[1] as f64 + 0.0722 * p[2] as f64).sum::<f64>()
            / plot_w as f64
    };
    let (bottom, top) = (12 + 63 * 3, 12);
    let (hot_row, cold_row) = (luma(bottom), luma(top));
    assert!(hot_row > cold_row + 60.0, "the first MiB of RAM is brighter ({hot_row:.0}) than the last ({cold_row:.0})");
    // And the metrics.
    let metrics =
        faultline_system_tests::metric_samples(&faultline_system_tests::scrape_metrics(&daemon.metrics_addr()));
    assert!(metrics.get("faultline_vm_working_set_bytes{vm=\"7\"}").is_some_and(|&b| b > 0.0), "{metrics:?}");
    let idle: f64 =
        metrics.iter().filter(|(k, _)| k.starts_with("faultline_vm_idle_bytes{vm=\"7\"")).map(|(_, v)| v).sum();
    assert!(idle > 0.0, "{metrics:?}");

    let out = guest.finish();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["access_flag_faults"].as_u64().unwrap() > 0, "the monitor's clears were taken at the core");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_cold_reclaims_a_range_left_idle_and_it_comes_back_intact() {
    use faultline_proto::v1::control_client::ControlClient;
    use faultline_proto::v1::GetVmRequest;
    use sim_machine::layout::Layout;
    use sim_machine::workload::{parse_trace, replay_flat};

    let daemon = Daemon::start(&["--spin-polls", "0", "--policy", "4k"]);
    // Fast, but not enabled: the VM is monitored because its policy names
    // the working set.
    cli(&daemon, &["monitor", "--sample-us", "1000", "--aggregate-ms", "20", "--cpu-budget-per-gib-bp", "0"]);
    // Phase 0 writes A (4 MiB at the start of RAM) and B (1 MiB at 32
    // MiB); phase 1 touches only B; phase 2 reads A back. Each repeats
    // until a line on the machine's stdin.
    let (a, b) = (RAM, RAM + 32 * MIB);
    let mut trace = String::new();
    for p in 0..1024 {
        trace += &format!("0 W {:#x} 8\n", a + p * 4096 + (p % 512) * 8);
    }
    let touch_b = |kind: &str| (0..256).map(|p| format!("0 {kind} {:#x} 8\n", b + p * 4096 + 64)).collect::<String>();
    trace += &touch_b("W");
    trace += "PAUSE\n";
    trace += &touch_b("R");
    trace += "PAUSE\n";
    for p in 0..1024 {
        trace += &format!("0 R {:#x} 8\n", a + p * 4096);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cold.trace");
    std::fs::write(&path, &trace).unwrap();
    let args = ["--vm-id", "8", "--vcpus", "1", "--ram-mib", "64", "--ram-page-kib", "4", "--spin-polls", "0"];
    let mut guest = LoopingMachine::start(&daemon, &[&args[..], &["--trace", path.to_str().unwrap()]].concat());
    let vm = || async { ControlClient::new(daemon.unix_channel().await).get_vm(GetVmRequest { vm_id: 8 }).await };
    while vm().await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ws = WorkingSetClient::new(daemon.unix_channel().await);
    let unmonitored = ws.get_working_set(GetWorkingSetRequest { vm_id: 8 }).await.unwrap_err();
    assert_eq!(unmonitored.code(), tonic::Code::FailedPrecondition, "{unmonitored:?}");

    let policy = faultline_system_tests::PolicyProcess::start(
        "policy-cold",
        &["--daemon", &daemon.grpc_unix_addr(), "--vm", "8", "--idle-ms", "400", "--interval-ms", "100"],
    );
    let used = cli(&daemon, &["policy", "use", &policy.endpoint]);
    assert!(used.contains("cold"), "{used}");
    // Phase 1: A is left alone. Its age grows past the threshold and the
    // policy's rule reclaims it; B stays.
    guest.next_phase();
    let aged = wait_for(&daemon, 8, Duration::from_secs(120), |s| {
        s.regions.iter().filter(|r| r.start < a + 4 * MIB && r.end > a).all(|r| r.idle_ms >= 400)
    })
    .await;
    let later = wait_for(&daemon, 8, Duration::from_secs(120), |s| s.index > aged.index + 5).await;
    let idle_at_a = |s: &WorkingSetAggregation| s.regions.iter().find(|r| r.start <= a && a < r.end).unwrap().idle_ms;
    assert!(idle_at_a(&later) > idle_at_a(&aged), "A's age grows: {} then {}", idle_at_a(&aged), idle_at_a(&later));
    let evicted =
        vm_when(&daemon, 8, "A was not reclaimed", |v| v.evicted >= 1024 && v.resident_bytes <= 2 * MIB).await;
    assert!(evicted.swap_store_held_bytes >= 4 * MIB, "A's pages are in the swap store: {evicted:#?}");
    // B, in use, stays resident, all but a few pages at most: a region at
    // B's edge can straddle idle memory, and one whose samples all land in
    // the idle part is called idle (DAMON's own imprecision at region
    // edges). Since each sample looks at a new page, six runs (three under
    // two busy loops) reclaimed none of B; when a region was watched
    // through one page an aggregation, CI runs saw 2 and 40 of B's 256
    // pages reclaimed (and refault at once).
    assert!(evicted.resident_bytes >= 7 * MIB / 8, "B, in use, stays resident: {evicted:#?}");
    let metrics =
        faultline_system_tests::metric_samples(&faultline_system_tests::scrape_metrics(&daemon.metrics_addr()));
    assert!(metrics.get("faultline_vm_cold_evicted_total{vm=\"8\"}").is_some_and(|&n| n >= 1024.0), "{metrics:?}");

    // Phase 2 reads A back: every page refaults from the swap store.
    guest.next_phase();
    let back = vm_when(&daemon, 8, "A did not come back", |v| v.refaults >= 1024).await;
    assert!(back.refault_bytes >= 4 * MIB, "{back:#?}");
    let out = guest.finish();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layout = Layout { nr_vcpus: 1, ram_size: 64 * MIB, ram_page_size: 4096, ..Layout::default() };
    let flat = replay_flat(&layout, &parse_trace(&trace, 1).unwrap());
    assert_eq!(
        summary["ram_digest"].as_u64().unwrap(),
        flat.ram_digest(),
        "guest RAM intact after reclaim and refault"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_vm_over_the_monitors_cpu_budget_is_sampled_less_often_and_as_set_without_one() {
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy", "4k"]);
    // 1 ms samples of a 16 MiB VM under 0.75% of a core per GiB: 117 ns of
    // CPU a sample, less than any wake costs. The monitor stretches both
    // intervals alike.
    cli(&daemon, &["monitor", "--enable", "--sample-us", "1000", "--aggregate-ms", "20"]);
    let args = ["--vm-id", "6", "--vcpus", "1", "--ram-mib", "16", "--ram-page-kib", "4", "--spin-polls", "0"];
    let guest = LoopingMachine::start(&daemon, &[&args[..], &["--pattern", "zipf", "--ops", "20000"]].concat());
    let paced = wait_for(&daemon, 6, Duration::from_secs(120), |a| a.sample_us > 1000).await;
    assert_eq!(paced.samples_per_aggregation, 20, "both intervals stretch: {paced:#?}");
    assert!(paced.aggregate_ms * 1000 >= 20 * paced.sample_us, "{paced:#?}");
    let table = cli(&daemon, &["workingset", "6"]);
    assert!(table.contains("(20 samples in ") && !table.contains("(20 samples in 20 ms)"), "{table}");
    // Without a budget the next aggregations are at the intervals set.
    let text = cli(&daemon, &["monitor", "--cpu-budget-per-gib-bp", "0"]);
    assert!(text.contains("\ncpu budget:  none"), "{text}");
    let unpaced =
        wait_for(&daemon, 6, Duration::from_secs(120), |a| a.index > paced.index && a.sample_us == 1000).await;
    assert_eq!(unpaced.aggregate_ms, 20, "{unpaced:#?}");
    let out = guest.finish();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
