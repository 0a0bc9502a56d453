//! The `faultline` command against a real daemon.

use std::process::Command;

use faultline_system_tests::{binary, machine, run_machine, Daemon};

fn faultline(daemon: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(binary("faultline")).arg("--server").arg(daemon.grpc_unix_addr()).args(args).output().unwrap();
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
    // Latencies by kind: the random workload's 2 MiB RAM faults allocate
    // their pages; their count adds up with the other kinds to every fault.
    let kinds: Vec<(&str, usize)> = stdout
        .lines()
        .filter(|l| l.starts_with("    ") && l.contains(" p50 ") && l.contains(" p99 "))
        .map(|l| {
            let (kind, rest) = l.trim().split_at(34);
            (kind.trim(), rest.split_whitespace().next().unwrap().parse().unwrap())
        })
        .collect();
    assert!(kinds.iter().any(|(k, _)| *k == "2 MiB mapped, page allocated"), "{stdout}");
    assert_eq!(kinds.iter().map(|(_, n)| n).sum::<usize>(), faults, "{stdout}");
    assert!(stdout.contains("how the vCPUs waited: spun "), "{stdout}");
}

#[test]
fn observe_time_windows_and_dirty_log_commands() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.trace");
    // Pages 0..3 and 8 written, page 20 read; pause while attached.
    std::fs::write(
        &trace,
        "0 W 0x40000000 8\n0 W 0x40001000 8\n0 W 0x40002000 8\n0 W 0x40008000 8\n0 R 0x40014000 8\nPAUSE\n",
    )
    .unwrap();
    let mut child = machine(&daemon)
        .args(["--vm-id", "4", "--dirty-log", "--spin-polls", "0", "--trace"])
        .arg(&trace)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    assert!(stderr.lines().map(Result::unwrap).any(|l| l.contains("paused after phase 0")));

    let (ok, out, err) = faultline(&daemon, &["dirty-log", "4", "0", "--peek"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("vm4 memslot 0: 4 of 57344 pages dirty (peek"), "{out}");
    let (ok, out, err) = faultline(&daemon, &["dirty-log", "4", "0", "-o", "json"]);
    assert!(ok, "{err}");
    let log: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(log["dirty_pages"], 4);
    assert_eq!(log["dirty"], serde_json::json!([["0x40000000", "0x40003000"], ["0x40008000", "0x40009000"]]));
    assert_eq!(log["write_protect_commands"], 2);
    let (ok, out, _) = faultline(&daemon, &["dirty-log", "4", "0"]);
    assert!(ok && out.contains(": 0 of 57344 pages dirty"), "cleared by the fetch: {out}");
    let (ok, _, err) = faultline(&daemon, &["dirty-log", "4", "1"]);
    assert!(!ok && err.contains("no dirty logging"), "{err}");

    // Time windows: the last hour has all five faults, the future none.
    let (ok, out, err) = faultline(&daemon, &["observe", "--since", "1h", "-o", "json"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 5);
    let (ok, out, _) = faultline(&daemon, &["observe", "--since", "2999-01-01T00:00:00Z"]);
    assert!(ok && out.is_empty(), "{out}");
    let (ok, out, _) = faultline(&daemon, &["observe", "--until", "1h"]);
    assert!(ok && out.is_empty(), "nothing is older than an hour: {out}");
    let (ok, _, err) = faultline(&daemon, &["observe", "--since", "1m", "--until", "2h"]);
    assert!(!ok && err.contains("since"), "since after until is refused: {err}");
    let (ok, _, err) = faultline(&daemon, &["observe", "--since", "last tuesday"]);
    assert!(!ok && err.contains("RFC 3339"), "{err}");

    writeln!(child.stdin.take().unwrap()).unwrap();
    assert!(child.wait().unwrap().success());
}
