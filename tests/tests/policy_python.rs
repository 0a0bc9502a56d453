//! The Python policy example (docs/examples/policy.py) runs: its stubs are
//! generated from proto/ with protoc and grpc_python_plugin (installed by
//! .ci/run), it is swapped in over gRPC, and it decides a real workload's
//! faults: 4 KiB mappings with its fault-around window.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::observe_response::ResponseTypes;
use faultline_proto::v1::policy_control_client::PolicyControlClient;
use faultline_proto::v1::{MappingSize, ObserveRequest, Outcome, UsePolicyRequest};
use faultline_system_tests::{machine, run_machine, Daemon};

/// Kills the child on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_policy_example_decides_a_workload() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let stubs = tempfile::tempdir().unwrap();
    let protoc = Command::new("protoc")
        .current_dir(root)
        .args(["-I", "proto"])
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_out={}", stubs.path().display()))
        .args(["--plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin"])
        .args(["faultline/v1/faultline.proto", "faultline/v1/policy.proto"])
        .status()
        .expect("protoc (Debian: protobuf-compiler, protobuf-compiler-grpc; .ci/run installs them)");
    assert!(protoc.success(), "generating the Python stubs failed");
    let mut child = Command::new("/usr/bin/python3")
        .arg(root.join("docs/examples/policy.py"))
        .args(["--listen", "127.0.0.1:0", "--window", "7"])
        .env("PYTHONPATH", stubs.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 (Debian: python3-grpcio, python3-protobuf)");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _policy = Killed(child);
    let endpoint = line.trim().strip_prefix("LISTENING ").unwrap_or_else(|| panic!("policy said {line:?}")).to_string();

    let daemon = Daemon::start(&["--spin-polls", "0", "--policy-deadline-ms", "2000"]);
    let mut control = PolicyControlClient::new(daemon.unix_channel().await);
    let status = control.use_policy(UsePolicyRequest { endpoint, reconnect: None }).await.unwrap().into_inner();
    assert_eq!((status.active.as_str(), status.rules), ("python-window", 1));

    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "1", "--ram-mib", "64", "--pattern", "sequential", "--ops", "20000", "--spin-polls", "0"]);
    let summary = run_machine(cmd);
    assert_eq!(summary["detach"]["pins_remaining"], 0);

    let mut trace = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut stream = trace.observe(ObserveRequest::default()).await.unwrap().into_inner();
    let mut mapped = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        if let Some(ResponseTypes::Fault(e)) = r.response_types {
            if e.outcome == Outcome::Mapped as i32 {
                mapped.push(e);
            }
        }
    }
    assert!(mapped.len() > 100);
    assert!(mapped.iter().all(|e| e.policy == "python-window"));
    assert!(mapped.iter().all(|e| e.mapping_size == MappingSize::MappingSize4k as i32));
    assert!(mapped.iter().any(|e| e.fault_around == 7), "the window maps neighbours");
    assert!(mapped.iter().all(|e| e.fault_around <= 7));
}
