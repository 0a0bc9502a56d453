//! KVM's page_fault_test matrix on the simulated machine: every row of
//! `faultline_system_tests::conformance::rows()` run by `sim-machine
//! --stage1-probe` (the guest's stage 1 walked in software) against the real
//! daemon. The same rows run at real EL2 under QEMU in tests/tests/el2_qemu.rs;
//! both must meet the row's expectations, so they agree with each other.

use std::process::Command;

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_system_tests::{binary, conformance, Daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_fault_test_matrix_on_the_simulated_machine() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut seen = 0usize;
    for row in conformance::rows() {
        let socket = daemon.socket.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(binary("sim-machine")).arg("--attach-socket").arg(socket).args(row.args).output().unwrap()
        })
        .await
        .unwrap();
        let name = row.args.join(" ");
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let events = conformance::new_events(&mut client, &mut seen).await;
        conformance::check(&row, &report, &events);
    }
}
