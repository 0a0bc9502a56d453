//! KVM's page_fault_test matrix on the simulated machine: every row of
//! `faultline_system_tests::conformance::rows()`, in every configuration
//! (`conformance::CONFIGS`: 4 KiB and 2 MiB backing, 40- and 48-bit IPA),
//! run by `sim-machine
//! --stage1-probe` (the guest's stage 1 walked in software) against the real
//! daemon. The same rows run at real EL2 under QEMU in tests/tests/el2_qemu.rs;
//! both must meet the row's expectations, so they agree with each other.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use faultline_proto::v1::control_client::ControlClient;
use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::GetDirtyLogRequest;
use faultline_system_tests::{binary, conformance, Daemon};

/// Memslot ids of `sim-machine --stage1-probe`: code, data, tables.
const DATA_SLOT: u32 = 1;
const TABLES_SLOT: u32 = 2;

async fn dirty_pages(control: &mut ControlClient<tonic::transport::Channel>, memslot: u32) -> Vec<u64> {
    let log = control.get_dirty_log(GetDirtyLogRequest { vm_id: 1, memslot, peek: true }).await.unwrap().into_inner();
    faultline_proto::dirty_pages(log.gpa, &log.bitmap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_fault_test_matrix_on_the_simulated_machine() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut control = ControlClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut seen = 0usize;
    let runs =
        conformance::CONFIGS.iter().flat_map(|&config| conformance::rows().into_iter().map(move |row| (config, row)));
    for (config, row) in runs {
        let name = format!("{} {}", row.args.join(" "), config.args().join(" "));
        let mut child = Command::new(binary("sim-machine"))
            .arg("--attach-socket")
            .arg(&daemon.socket)
            .args(row.args)
            .args(config.args())
            .arg("--pause-before-detach")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Still attached once it says so: read the dirty logs, then let it go.
        let stderr = child.stderr.take().unwrap();
        let (paused, stderr) = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let mut seen_lines = Vec::new();
            for line in lines.by_ref() {
                let line = line.unwrap();
                if line.contains("paused before detach") {
                    return (true, seen_lines);
                }
                seen_lines.push(line);
            }
            (false, seen_lines)
        })
        .await
        .unwrap();
        assert!(paused, "{name}: the machine ended before pausing: {stderr:?}");
        if conformance::logs_any(&row) {
            let data = match conformance::logs(&row, "--data") {
                true => Some(dirty_pages(&mut control, DATA_SLOT).await),
                false => None,
            };
            let tables = match conformance::logs(&row, "--tables") {
                true => Some(dirty_pages(&mut control, TABLES_SLOT).await),
                false => None,
            };
            conformance::check_dirty(&row, data.as_deref(), tables.as_deref());
        }
        writeln!(child.stdin.take().unwrap()).unwrap();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
        assert!(out.status.success(), "{name}: the machine failed");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let events = conformance::new_events(&mut client, &mut seen).await;
        conformance::check(&row, config, &report, &events);
    }
}
