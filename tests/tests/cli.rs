//! The `faultline` command against a real daemon.

use std::process::Command;

use faultline_system_tests::{binary, machine, run_machine, Daemon};

fn faultline(daemon: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("faultline")).arg("--server").arg(daemon.grpc_addr()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn observe_status_stats_and_vm_commands_show_the_run() {
    let daemon = Daemon::start(&[]);
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "1", "--pattern", "sequential", "--ops", "2000"]);
    let summary = run_machine(cmd);
    let faults = summary["faults"].as_u64().unwrap();
    let exits = summary["exits"].as_array().unwrap().len();

    let (ok, out, err) = faultline(&daemon, &["observe", "--last", "3", "-o", "json"]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|e| e["vm_id"] == 1 && e["esr"].as_str().unwrap().starts_with("0x")));

    let (ok, out, _) = faultline(&daemon, &["observe", "--all", "--outcome", "mmio-exit"]);
    assert!(ok);
    assert_eq!(out.lines().count(), exits);
    assert!(out.lines().all(|l| l.contains("-> mmio-exit")), "{out}");
    let (ok, out, _) = faultline(&daemon, &["observe", "--all", "--outcome", "mmio-exit", "--not", "-o", "table"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1 + faults as usize - exits, "header plus every mapped fault");

    let (ok, out, _) = faultline(&daemon, &["status"]);
    assert!(ok && out.contains(&format!("events seen:      {faults}")), "{out}");
    let (ok, out, _) = faultline(&daemon, &["stats"]);
    assert!(ok && out.contains("end_to_end") && out.contains("policy: default"), "{out}");
    let (ok, out, _) = faultline(&daemon, &["vm", "list"]);
    assert!(ok && out.is_empty(), "the machine detached: {out}");
    let (ok, _, err) = faultline(&daemon, &["vm", "show", "3"]);
    assert!(!ok && err.contains("not attached"), "{err}");
    let (ok, _, err) = faultline(&daemon, &["observe", "--outcome", "sideways"]);
    assert!(!ok && err.contains("unknown outcome"), "{err}");
}

#[test]
fn demo_runs_daemon_and_machine_and_summarizes() {
    let out = Command::new(binary("faultline"))
        .args(["demo", "--vcpus", "1", "--ops", "3000", "--pattern", "random", "--lines-per-second", "100000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let faults = stdout.lines().filter(|l| l.starts_with("vm1/vcpu0 #")).count();
    assert!(faults > 100, "faults streamed while the guest ran: {stdout}");
    let summary = stdout.lines().find(|l| l.starts_with("summary:")).expect("summary line");
    assert!(summary.starts_with(&format!("summary: {faults} faults")), "every fault was shown: {summary}");
    assert!(stdout.contains("by outcome: mapped="), "{stdout}");
    assert!(stdout.contains("pins left after detach: 0"), "{stdout}");
}
