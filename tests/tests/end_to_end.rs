//! The fault path across two real processes: the daemon binary and the
//! machine binary. Guest memory and fault counts are checked against a flat
//! replay of the same workload.

use faultline_attach::priority::{service_threads_weighted, set_thread_nice, this_thread_id, PASSING_NICE};
use faultline_system_tests::{machine, on_cpus, run_machine, Daemon, HeldMachine};
use serde_json::Value;
use sim_machine::layout::{Layout, ROM_GPA};
use sim_machine::workload::{generate, replay_flat, FlatReplay, Pattern, Workload};

/// 224 MiB of RAM (2 MiB-paged) + a 32 MiB read-only slot = 256 MiB.
fn layout(vcpus: u32) -> Layout {
    Layout { nr_vcpus: vcpus, ..Layout::default() }
}

fn check(summary: &Value, flat: &FlatReplay, ram_blocks: bool) {
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "RAM differs from the flat replay");
    assert_eq!(summary["rom_digest"].as_u64().unwrap(), flat.rom_digest(), "ROM changed");
    assert_eq!(summary["injected"].as_u64().unwrap(), 0);
    assert_eq!(summary["faults"].as_u64().unwrap(), flat.expected_faults(ram_blocks), "fault count");
    // Every exit, with its address and size, in each vCPU's program order.
    let mut got: Vec<(u32, u64, u8, bool)> = summary["exits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["vcpu"].as_u64().unwrap() as u32,
                e["gpa"].as_u64().unwrap(),
                e["size"].as_u64().unwrap() as u8,
                e["write"].as_bool().unwrap(),
            )
        })
        .collect();
    got.sort_by_key(|e| e.0);
    let mut want = flat.exits.clone();
    want.sort_by_key(|e| e.0);
    assert_eq!(got, want, "exits");
    // A workload that reads the read-only slot writes it too (zipf-scan
    // touches RAM only).
    assert!(
        flat.rom_pages_read.is_empty()
            || want
                .iter()
                .any(|&(_, gpa, size, write)| write && size == 4 && (ROM_GPA..ROM_GPA + (32 << 20)).contains(&gpa))
    );
    let detach = &summary["detach"];
    assert_eq!(detach["pins_remaining"].as_u64().unwrap(), 0, "pins left after teardown");
    assert!(detach["pages_released"].as_u64().unwrap() > 0);
    assert_eq!(detach["faults_served"].as_u64().unwrap(), summary["faults"].as_u64().unwrap());
}

fn run(daemon: &Daemon, layout: &Layout, pattern: Pattern, ops: usize) -> (Value, Workload) {
    let workload = generate(pattern, layout, ops, 42);
    let mut cmd = machine(daemon);
    cmd.args(["--vcpus", &layout.nr_vcpus.to_string(), "--ops", &ops.to_string(), "--seed", "42"]);
    cmd.args([
        "--pattern",
        match pattern {
            Pattern::Random => "random",
            Pattern::Zipf => "zipf",
            Pattern::ZipfScan => "zipf-scan",
            Pattern::ReadThenWrite => "read-then-write",
            Pattern::Sequential => "sequential",
            Pattern::Strided => "strided",
            Pattern::Fetch => "fetch",
        },
    ]);
    (run_machine(cmd), workload)
}

#[test]
fn one_vcpu_4k_policy_faults_once_per_page_and_memory_matches_replay() {
    let daemon = Daemon::start(&["--policy", "4k"]);
    let l = layout(1);
    let (summary, workload) = run(&daemon, &l, Pattern::Random, 12_000);
    let flat = replay_flat(&l, &workload);
    assert!(flat.ram_pages.len() > 5000, "the workload touches many pages");
    check(&summary, &flat, false);
}

#[test]
fn four_vcpus_default_policy_faults_once_per_2mib_block() {
    let daemon = Daemon::start(&["--policy", "default"]);
    let l = layout(4);
    let (summary, workload) = run(&daemon, &l, Pattern::Zipf, 8_000);
    let flat = replay_flat(&l, &workload);
    assert!(flat.ram_blocks.len() >= 4);
    check(&summary, &flat, true);
    // The same run under the 4 KiB policy takes one fault per page instead.
    let daemon4k = Daemon::start(&["--policy", "4k"]);
    let (summary, _) = run(&daemon4k, &l, Pattern::Zipf, 8_000);
    check(&summary, &flat, false);
}

#[test]
fn every_pattern_and_a_trace_replay_match_the_flat_replay() {
    let daemon = Daemon::start(&[]);
    let l = layout(2);
    for p in [Pattern::Sequential, Pattern::Strided, Pattern::ReadThenWrite, Pattern::Fetch, Pattern::ZipfScan] {
        let (summary, workload) = run(&daemon, &l, p, 3_000);
        let flat = replay_flat(&l, &workload);
        assert_eq!(flat.rom_pages_read.is_empty(), p == Pattern::ZipfScan, "{p:?}");
        check(&summary, &flat, true);
    }
    // A trace file: both vCPUs, reads, writes, a fetch, a read-only write, MMIO.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.txt");
    let text = "# vcpu op address size\n0 W 0x40000008 8\n0 R 0x40000008 8\n1 W 0x40200010 4\n1 X 0x40400000 4\n0 W 0x10000100 4\n1 R 0x09000000 4\n0 R 0x10001000 2\n";
    std::fs::write(&path, text).unwrap();
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "2", "--trace"]).arg(&path);
    let summary = run_machine(cmd);
    let workload = sim_machine::workload::parse_trace(text, 2).unwrap();
    let flat = replay_flat(&l, &workload);
    assert_eq!(flat.exits.len(), 2);
    check(&summary, &flat, true);
}

#[test]
fn daemon_logs_json_and_exits_cleanly_on_sigterm() {
    let daemon = Daemon::start(&["--log-format", "json", "--log-filter", "info"]);
    let socket = daemon.socket.clone();
    let log = daemon.log();
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the attach socket is removed on shutdown");
    let first: Value = serde_json::from_str(log.lines().next().expect("a log line")).expect("JSON log line");
    assert_eq!(first["fields"]["message"], "memory-manager starting");
    assert_eq!(first["level"], "INFO");
}

#[test]
fn vcpus_faulting_on_the_same_pages_at_once_leave_memory_and_pins_consistent() {
    // Four vCPUs write the same 64 pages (and 2 MiB blocks) in different
    // orders, so faults on one page race: the core answers the losers
    // "already present" and the daemon must not keep their pins.
    let daemon = Daemon::start(&["--policy", "4k"]);
    let l = layout(4);
    let mut text = String::new();
    for i in 0..4000u64 {
        let vcpu = i % 4;
        let page = (i * (vcpu * 2 + 1)) % 64;
        let gpa = l.ram_gpa + page * 4096 + (i % 64) * 8;
        text.push_str(&format!("{vcpu} W {gpa:#x} 8\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.txt");
    std::fs::write(&path, &text).unwrap();
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "4", "--trace"]).arg(&path);
    let summary = run_machine(cmd);
    let flat = replay_flat(&l, &sim_machine::workload::parse_trace(&text, 4).unwrap());
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest());
    let faults = summary["faults"].as_u64().unwrap();
    assert!(faults >= flat.ram_pages.len() as u64, "{faults} faults for {} pages", flat.ram_pages.len());
    assert_eq!(summary["detach"]["pins_remaining"].as_u64().unwrap(), 0);
    // Every page is mapped once: the daemon released exactly one pin per page.
    assert_eq!(summary["detach"]["pages_released"].as_u64().unwrap(), flat.ram_pages.len() as u64);
}

#[test]
fn daemon_tells_systemd_it_is_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let daemon = Daemon::start_with_env(&[], &[("NOTIFY_SOCKET", path.as_os_str())]);
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means both listeners answer.
    assert!(daemon.socket.exists());
    let grpc = daemon.grpc_addr();
    let addr = grpc.trim_start_matches("http://");
    std::net::TcpStream::connect(addr).expect("gRPC port accepts connections");
    assert!(daemon.terminate().success());
    let n = sock.recv(&mut buf).expect("STOPPING=1 from the daemon");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// The `sim-machine` command for `layout`'s vCPUs running `ops` random
/// accesses each as VM `vm_id`.
fn random_machine(daemon: &Daemon, vm_id: u16, vcpus: u32, ops: usize) -> std::process::Command {
    let mut cmd = machine(daemon);
    cmd.args(["--vm-id", &vm_id.to_string(), "--vcpus", &vcpus.to_string(), "--ops", &ops.to_string()]);
    cmd.args(["--seed", "42", "--pattern", "random"]);
    cmd
}

#[test]
fn sixty_four_vcpus_served_by_two_threads_match_the_flat_replay() {
    let daemon = Daemon::start(&["--policy", "4k", "--service-threads", "2"]);
    let l = layout(64);
    let (summary, workload) = run(&daemon, &l, Pattern::Random, 300);
    let flat = replay_flat(&l, &workload);
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "RAM differs from the flat replay");
    assert_eq!(summary["rom_digest"].as_u64().unwrap(), flat.rom_digest(), "ROM changed");
    assert_eq!(summary["injected"].as_u64().unwrap(), 0);
    assert_eq!(summary["detach"]["pins_remaining"].as_u64().unwrap(), 0, "pins left after teardown");
    // Each page is pinned once however many vCPUs raced for it: the
    // daemon's pins are exactly the core's leaves.
    assert_eq!(summary["detach"]["pages_released"], summary["core_backing_pages"]);
    assert!(summary["core_backing_pages"].as_u64().unwrap() >= flat.ram_pages.len() as u64);
    assert!(daemon.log().contains("service_threads=2"), "{}", daemon.log());
    // 64 vCPUs outnumber this machine's CPUs: their waits never spin.
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 64 {
        assert_eq!(summary["waits"]["spun"].as_u64(), Some(0), "{}", summary["waits"]);
    }
}

#[test]
fn waiting_vcpus_pass_the_cpu_only_when_the_daemon_keeps_its_turns() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: the daemon and the machine need a CPU each");
        return;
    }
    // The machine on the second CPU alone: (passes configured, passes made).
    let passes = |daemon: &Daemon, vcpus: u32| {
        let l = layout(vcpus);
        let flat = replay_flat(&l, &generate(Pattern::Random, &l, 300, 42));
        let summary = on_cpus(1..2, || run_machine(random_machine(daemon, 1, vcpus, 300)));
        check(&summary, &flat, false);
        (summary["wait_passes"].as_u64().unwrap(), summary["waits"]["passed"].as_u64().unwrap())
    };
    let plain = ["--policy", "4k", "--service-nice", "0"];
    let apart = on_cpus(0..1, || Daemon::start(&plain));
    let (configured, _) = passes(&apart, 8);
    assert_eq!(configured, 4, "the daemon on CPU 0 alone, 8 vCPUs on CPU 1: they pass the CPU before sleeping");
    assert_eq!(passes(&apart, 1).0, 0, "the daemon on CPU 0 alone, one vCPU on CPU 1: it spins");
    let sharing = Daemon::start(&plain);
    assert_eq!(passes(&sharing, 8), (0, 0), "an ordinary daemon on the machine's CPU: the vCPUs sleep");
    assert_eq!(passes(&sharing, 1), (0, 0), "an ordinary daemon on the machine's CPU: one vCPU spins");
    // By default the service threads are weighted above the vCPUs' (nice
    // -10), where the daemon may raise them (CAP_SYS_NICE).
    let weighted = Daemon::start(&["--policy", "4k"]);
    let (configured, _) = passes(&weighted, 8);
    if weighted.log().contains("service threads stay at the daemon's priority") {
        assert_eq!(configured, 0, "not weighted after all: the vCPUs sleep");
    } else {
        assert!(service_threads_weighted(weighted.pid() as i32, 0), "service threads at nice -10");
        assert_eq!(configured, 4, "weighted service threads keep their turns: the vCPUs pass");
        // Its serving thread takes the one CPU: even one vCPU passes.
        assert_eq!(passes(&weighted, 1).0, 4, "one vCPU beside the weighted daemon on one CPU passes");
        // A VMM that raises its vCPU threads as high takes those turns
        // again: the weight is relative to the vCPUs'. The machine starts
        // at its spawning thread's nice.
        let raised = std::thread::scope(|s| {
            s.spawn(|| {
                set_thread_nice(this_thread_id(), PASSING_NICE).unwrap();
                passes(&weighted, 8)
            })
            .join()
            .unwrap()
        });
        assert_eq!(raised, (0, 0), "vCPUs at the service threads' nice: they sleep");
    }
}

#[test]
fn eight_vms_attach_and_detach_at_once_while_faults_flow() {
    let daemon = Daemon::start(&["--policy", "4k", "--service-threads", "2"]);
    let l = layout(2);
    let flat = replay_flat(&l, &generate(Pattern::Random, &l, 1_500, 42));
    std::thread::scope(|s| {
        for vm in 1..=8u16 {
            let (daemon, flat) = (&daemon, &flat);
            s.spawn(move || {
                // Three attachments each, so VMs come and go while the
                // others' faults are being served.
                for round in 0..3 {
                    let summary = run_machine(random_machine(daemon, vm, 2, 1_500));
                    let what = format!("VM {vm}, round {round}");
                    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "{what}");
                    assert_eq!(summary["detach"]["pins_remaining"].as_u64().unwrap(), 0, "{what}");
                    assert_eq!(summary["injected"].as_u64().unwrap(), 0, "{what}");
                }
            });
        }
    });
}

#[test]
fn a_vm_faulting_without_pause_does_not_starve_a_quiet_one() {
    use faultline_proto::v1::control_client::ControlClient;
    use faultline_proto::v1::fault_trace_client::FaultTraceClient;
    use faultline_proto::v1::{GetStatsRequest, ListVmsRequest};
    // One service thread: the busy VM's eight vCPUs and the quiet VM's one
    // share it. The busy VM's 4 GiB take far more faults to fill than the
    // quiet VM's whole run (it is killed long before it gets far).
    let daemon = Daemon::start(&["--policy", "4k", "--service-threads", "1"]);
    let mut busy = random_machine(&daemon, 1, 8, 1_000_000)
        .args(["--ram-mib", "4096"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let busy_faults = || {
        rt.block_on(async {
            let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
            let stats = client.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
            let mut control = ControlClient::connect(daemon.grpc_addr()).await.unwrap();
            let vms = control.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms;
            let attached = vms.iter().any(|v| v.vm_id == 1);
            (attached, stats.by_vm.iter().find(|c| c.key == "vm1").map_or(0, |c| c.count))
        })
    };
    while busy_faults().1 < 1_000 {
        assert!(busy.try_wait().unwrap().is_none(), "the busy VM ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The quiet VM runs its whole (small) workload while the busy one keeps
    // faulting: served in turn, it ends while the busy VM is still attached
    // and faulting.
    let l = layout(1);
    let summary = run_machine(random_machine(&daemon, 2, 1, 2_000));
    let (attached, before) = busy_faults();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (_, after) = busy_faults();
    let _ = busy.kill();
    busy.wait().unwrap();
    assert!(attached && after > before, "the quiet VM ended only once the busy one stopped faulting");
    let flat = replay_flat(&l, &generate(Pattern::Random, &l, 2_000, 42));
    check(&summary, &flat, false);
}

#[test]
fn a_machine_held_before_its_run_is_attached_and_faults_only_once_told() {
    use faultline_proto::v1::control_client::ControlClient;
    use faultline_proto::v1::fault_trace_client::FaultTraceClient;
    use faultline_proto::v1::{GetStatsRequest, ListVmsRequest};
    let daemon = Daemon::start(&["--policy", "4k"]);
    let held = HeldMachine::before_run(random_machine(&daemon, 3, 2, 500));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (attached, faults) = rt.block_on(async {
        let mut control = ControlClient::connect(daemon.grpc_addr()).await.unwrap();
        let vms = control.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms;
        let mut trace = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
        let stats = trace.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
        (vms.iter().any(|v| v.vm_id == 3), stats.by_vm.iter().find(|c| c.key == "vm3").map_or(0, |c| c.count))
    });
    assert!(attached, "attached at the hold");
    assert_eq!(faults, 0, "no fault before it is told to run");
    let out = held.release();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["faults"].as_u64().unwrap() > 0, "the workload ran once told");
    let l = layout(2);
    check(&summary, &replay_flat(&l, &generate(Pattern::Random, &l, 500, 42)), false);
}

#[test]
fn memory_populated_at_the_attach_is_the_machines_without_a_host_fault_each_access() {
    // The daemon populates the guest at the attach (written, not only
    // reserved) and the machine maps what holds data before its vCPUs run:
    // its accesses cost it no page faults of the host, which a real
    // machine's memory would not take either (before, about one a fault).
    let daemon = Daemon::start(&["--policy", "4k", "--prefault"]);
    let l = layout(2);
    let mut cmd = random_machine(&daemon, 1, 2, 4000);
    cmd.args(["--ram-page-kib", "4"]);
    let summary = run_machine(cmd);
    check(&summary, &replay_flat(&l, &generate(Pattern::Random, &l, 4000, 42)), false);
    let (faults, host) = (summary["faults"].as_u64().unwrap(), summary["host_page_faults"].as_u64().unwrap());
    assert!(faults > 1000, "{faults} faults");
    assert!(host < faults / 10, "{host} page faults of the host in {faults} guest faults");
}

#[test]
fn a_sparse_one_tib_guest_runs_and_matches_the_replay() {
    // 1 TiB of RAM: past the 40-bit IPA space, so the machine's core uses a
    // 48-bit one (four levels). The machine digests only the data segments
    // of its memfd and the replay keeps only the pages written, so neither
    // reads (or, on shmem, allocates) the holes. (Few accesses: each lands
    // in its own 2 MiB block, and every block takes table pages from the
    // machine's 16 MiB of table memory.)
    let daemon = Daemon::start(&["--policy", "4k"]);
    let l = Layout { nr_vcpus: 2, ram_size: 1 << 40, ram_page_size: 4096, ..Layout::default() };
    let workload = generate(Pattern::Random, &l, 400, 42);
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "2", "--ops", "400", "--seed", "42", "--pattern", "random"]);
    cmd.args(["--ram-mib", "1048576", "--ram-page-kib", "4"]);
    let summary = run_machine(cmd);
    let flat = replay_flat(&l, &workload);
    assert!(flat.ram.len() > 100 && flat.ram.len() <= 800, "{} pages written", flat.ram.len());
    check(&summary, &flat, false);
}
