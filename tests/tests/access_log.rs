//! Access logs (issue 17's first part): the daemon reads and clears the
//! stage-2 access flags of a memslot through the core (AGE), and a guest
//! access to a page whose flag was cleared is resolved at the core, with no
//! fault for the daemon. Real daemon, real machine, real gRPC client.

use faultline_proto::v1::control_client::ControlClient;
use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::{GetAccessLogRequest, GetStatsRequest, GetVmRequest};
use faultline_system_tests::{Daemon, TracedMachine};
use sim_machine::layout::Layout;
use sim_machine::workload::{parse_trace, replay_flat};

const RAM: u64 = 0x4000_0000;

/// The pages (by index in the RAM memslot) an access log names.
async fn accessed(daemon: &Daemon, vm: u32) -> Vec<u64> {
    let mut control = ControlClient::new(daemon.unix_channel().await);
    let log = control.get_access_log(GetAccessLogRequest { vm_id: vm, memslot: 0 }).await.unwrap().into_inner();
    assert_eq!((log.gpa, log.pages), (RAM, 224 << 8), "the RAM memslot");
    assert_eq!(log.age_commands, (224 << 8) / 64, "one AGE per 64 pages");
    let pages: Vec<u64> = faultline_proto::dirty_pages(0, &log.bitmap).map(|p| p / 4096).collect();
    assert_eq!(log.accessed_pages, pages.len() as u64);
    pages
}

/// Waits until GetVm and GetStats both say `vm`'s core resolved
/// `expected` access-flag faults (the daemon reads the core's count every
/// 20 ms; 30 s at most: a hang guard); returns GetStats' count per vCPU.
async fn access_flag_faults_reach(daemon: &Daemon, vm: u32, expected: u64) -> Vec<u64> {
    let mut control = ControlClient::new(daemon.unix_channel().await);
    let mut trace = FaultTraceClient::new(daemon.unix_channel().await);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let of_vm = control.get_vm(GetVmRequest { vm_id: vm }).await.unwrap().into_inner().access_flag_faults;
        let stats = trace.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
        let per_vcpu: Vec<u64> = stats.rings.iter().filter(|r| r.vm_id == vm).map(|r| r.access_flag_faults).collect();
        if of_vm == expected && stats.access_flag_faults_at_core == expected {
            return per_vcpu;
        }
        assert!(std::time::Instant::now() < deadline, "GetVm {of_vm}, GetStats {stats:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accessed_pages_are_logged_and_reaccesses_stay_at_the_core() {
    accessed_pages_are_logged(AccessFlags::Fault).await;
}

/// With FEAT_HAFDBS (the machine's MMU sets the flags, `VTCR_EL2.HA`) the
/// log is the same and the core takes no access-flag fault at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hardware_access_flags_the_walker_sets_them_and_nothing_faults() {
    accessed_pages_are_logged(AccessFlags::Hardware).await;
}

/// Who sets an aged page's access flag when the guest touches it again.
#[derive(Clone, Copy, PartialEq)]
enum AccessFlags {
    /// The core, on an access-flag fault.
    Fault,
    /// The machine's MMU (`sim-machine --hardware-access-flag`).
    Hardware,
}

async fn accessed_pages_are_logged(flags: AccessFlags) {
    let daemon = Daemon::start(&["--spin-polls", "0", "--policy", "4k"]);
    // Phase 0 writes pages 0..10; phase 1 reads pages 0..5 and writes page
    // 7; phase 2 is empty: the machine waits, attached, before it ends.
    let mut trace_text = String::new();
    for p in 0..10u64 {
        trace_text += &format!("0 W {:#x} 8\n", RAM + p * 4096 + 8 * p);
    }
    trace_text += "PAUSE\n";
    for p in 0..5u64 {
        trace_text += &format!("0 R {:#x} 8\n", RAM + p * 4096);
    }
    trace_text += &format!("0 W {:#x} 8\nPAUSE\n", RAM + 7 * 4096 + 16);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("access.trace");
    std::fs::write(&trace, &trace_text).unwrap();
    let mut args = vec!["--vm-id", "6", "--vcpus", "1", "--ram-page-kib", "4", "--spin-polls", "0"];
    if flags == AccessFlags::Hardware {
        args.push("--hardware-access-flag");
    }
    let mut m = TracedMachine::spawn(&daemon, &args, &trace);
    // Six accesses to pages whose flags the log cleared: each an
    // access-flag fault at the core, or none with hardware updates.
    let af_faults = if flags == AccessFlags::Hardware { 0 } else { 6 };

    m.wait_paused(0);
    // Mapped by their faults, with the access flag set: all ten, as the
    // CLI shows them.
    let cli = std::process::Command::new(faultline_system_tests::binary("faultline"))
        .args(["--server", &daemon.grpc_unix_addr(), "access-log", "6", "0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert_eq!(
        text,
        "vm6 memslot 0: 10 of 57344 pages accessed since the last fetch (flags cleared)\n  0x40000000-0x4000a000 (10 pages)\n"
    );
    assert_eq!(accessed(&daemon, 6).await, Vec::<u64>::new(), "read and cleared");
    let faults_before = daemon.seen_events().await;
    m.resume();
    m.wait_paused(1);
    // The six accesses set the flags again (the core on a fault, or the
    // MMU), and the daemon saw no fault, only the core's count of its
    // access-flag faults, per VM and vCPU, in the CLI and in /metrics.
    assert_eq!(daemon.seen_events().await, faults_before, "no fault reached the daemon");
    assert_eq!(access_flag_faults_reach(&daemon, 6, af_faults).await, [af_faults], "one vCPU took them all");
    let shown = std::process::Command::new(faultline_system_tests::binary("faultline"))
        .args(["--server", &daemon.grpc_unix_addr(), "vm", "show", "6"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    let line = format!("access-flag faults resolved at the core (no record): {af_faults}\n");
    assert_eq!(shown.contains(&line), af_faults > 0, "{shown}");
    let metrics = faultline_system_tests::scrape_metrics(&daemon.metrics_addr());
    let metric = format!("faultline_vm_access_flag_faults_total{{vm=\"6\"}} {af_faults}\n");
    assert!(metrics.contains(&metric), "{metrics}");
    assert_eq!(accessed(&daemon, 6).await, [0, 1, 2, 3, 4, 7]);
    // Plain TCP may not clear the flags.
    let mut tcp = ControlClient::connect(daemon.grpc_addr()).await.unwrap();
    let denied = tcp.get_access_log(GetAccessLogRequest { vm_id: 6, memslot: 0 }).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let mut unix = ControlClient::new(daemon.unix_channel().await);
    let missing = unix.get_access_log(GetAccessLogRequest { vm_id: 6, memslot: 9 }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");

    m.resume();
    let out = m.child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((summary["faults"].as_u64(), summary["access_flag_faults"].as_u64()), (Some(10), Some(af_faults)));
    assert_eq!(summary["hardware_access_flag"], flags == AccessFlags::Hardware);
    let layout = Layout { nr_vcpus: 1, ram_page_size: 4096, ..Layout::default() };
    let flat = replay_flat(&layout, &parse_trace(&trace_text, 1).unwrap());
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest(), "guest RAM intact");
}
