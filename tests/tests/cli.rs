//! The `faultline` command against a real daemon.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::observe_response::ResponseTypes;
use faultline_proto::v1::{Access, FaultFilter, FaultKind, IpaRange, MappingSize, ObserveRequest, Outcome};
use faultline_system_tests::{binary, machine, run_machine, Daemon, TracedMachine};
use sim_machine::layout::Layout;
use sim_machine::workload::{generate, Pattern};

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

    // JSON for tools: RFC 3339 times, and nothing that does not apply.
    let (ok, out, err) = faultline(&daemon, &["observe", "--all", "-o", "json"]);
    assert!(ok && out.lines().count() as u64 == faults, "{err}");
    assert!(!out.contains("unspecified") && !out.contains("time_ns"), "{out}");
    let events: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for e in &events {
        let time = e["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.len() == "2026-12-02T15:00:00.123456789Z".len(), "{time}");
        assert_eq!(e.get("mapping_size").is_some(), e["outcome"] == "mapped", "{e}");
    }
    let (ok, out, _) = faultline(&daemon, &["observe", "--all", "--outcome", "mmio-exit"]);
    assert!(ok);
    assert_eq!(out.lines().count(), exits);
    assert!(out.lines().all(|l| l.contains("-> mmio-exit")), "{out}");
    let (ok, out, _) = faultline(&daemon, &["observe", "--all", "--not", "--outcome", "mmio-exit", "-o", "table"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1 + faults as usize - exits, "header plus every mapped fault");

    let (ok, out, _) = faultline(&daemon, &["status"]);
    assert!(ok && out.contains(&format!("events seen:      {faults}")), "{out}");
    let (ok, out, _) = faultline(&daemon, &["stats"]);
    assert!(ok && out.contains("end_to_end") && out.contains("policy: default"), "{out}");
    assert!(
        out.contains("by outcome: mapped=") && out.contains("by vm: no VM attached"),
        "the machine detached: {out}"
    );
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
    let faults = stdout.lines().filter(|l| l.contains(" vm1/vcpu0 #")).count();
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

/// Runs `faultline ARGS` with its stdout a pipe this test closes after the
/// first line, as `| head -1` does; the exit status and stderr.
fn first_line_then_close(daemon: &Daemon, args: &[&str]) -> (String, std::process::ExitStatus, String) {
    let mut child = Command::new(binary("faultline"))
        .arg("--server")
        .arg(daemon.grpc_unix_addr())
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    // The reader is dropped: the pipe's read end is closed.
    let out = child.wait_with_output().unwrap();
    (first, out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_closed_stdout_ends_observe_quietly_with_status_0() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    // Far more output than a pipe holds (64 KiB): the CLI is still writing
    // when the reader goes.
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "1", "--pattern", "random", "--ram-page-kib", "4", "--ops", "20000"]);
    let faults = run_machine(cmd)["faults"].as_u64().unwrap();
    assert!(faults > 2000, "only {faults} faults");
    let (first, status, stderr) = first_line_then_close(&daemon, &["observe", "--all"]);
    assert!(first.contains(" vm1/vcpu0 #"), "{first}");
    assert!(status.success() && stderr.is_empty(), "{status:?}: {stderr}");
    let (_, status, stderr) = first_line_then_close(&daemon, &["observe", "--all", "-o", "json"]);
    assert!(status.success() && stderr.is_empty(), "{status:?}: {stderr}");

    // Following a live machine: the next event after the reader went ends
    // the command, and with it the stream.
    let mut cmd = machine(&daemon);
    cmd.args(["--vm-id", "2", "--vcpus", "1", "--pattern", "random", "--ram-page-kib", "4", "--ops", "400000"]);
    let mut live = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // (Observe refuses a VM that is neither attached nor in the history.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !faultline(&daemon, &["vm", "list"]).1.contains("vm2:") {
        assert!(std::time::Instant::now() < deadline, "vm2 never attached");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (first, status, stderr) = first_line_then_close(&daemon, &["observe", "--follow", "--vm", "2"]);
    assert!(first.contains(" vm2/vcpu0 #"), "{first:?} {status:?} {stderr}");
    assert!(status.success() && stderr.is_empty(), "{status:?}: {stderr}");
    let _ = live.kill();
    let _ = live.wait();
    // The daemon drops the stream once it sees the connection close, which
    // may be a moment after the CLI exited: waited for, not raced.
    wait_for_streams(&daemon, 0);
}

/// The fault ids Observe returns with `allow` and `deny`, from everything
/// in the buffer.
async fn api_ids(daemon: &Daemon, allow: Vec<FaultFilter>, deny: Vec<FaultFilter>) -> BTreeSet<(u64, u64, u64)> {
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let req = ObserveRequest { allowlist: allow, denylist: deny, ..Default::default() };
    let mut stream = client.observe(req).await.unwrap().into_inner();
    let mut ids = BTreeSet::new();
    while let Some(r) = stream.message().await.unwrap() {
        if let Some(ResponseTypes::Fault(e)) = r.response_types {
            ids.insert((u64::from(e.vm_id), u64::from(e.vcpu), e.fault_id));
        }
    }
    ids
}

/// The same as `faultline observe --all -o json ARGS`.
fn cli_ids(daemon: &Daemon, args: &[&str]) -> BTreeSet<(u64, u64, u64)> {
    let (ok, out, err) = faultline(daemon, &[&["observe", "--all", "-o", "json"], args].concat());
    assert!(ok, "{args:?}: {err}");
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|e| (e["vm_id"].as_u64().unwrap(), e["vcpu"].as_u64().unwrap(), e["fault_id"].as_u64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_filter_flag_selects_what_the_api_filter_selects_and_not_inverts_it() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    // Two VMs: reads and writes, 4 KiB and 2 MiB mappings, MMIO exits on
    // the read-only slot, translation faults, and permission faults (writes
    // after reads in VM 1, whose RAM is dirty-logged).
    for (vm, page_kib, logged) in [("1", "4", true), ("2", "2048", false)] {
        let mut cmd = machine(&daemon);
        cmd.args(["--vm-id", vm, "--vcpus", "2", "--pattern", "read-then-write", "--ops", "3000"]);
        cmd.args(["--ram-page-kib", page_kib]);
        if logged {
            cmd.arg("--dirty-log");
        }
        run_machine(cmd);
    }
    let all = api_ids(&daemon, vec![], vec![]).await;
    assert!(all.len() > 100, "{}", all.len());
    let cases: Vec<(Vec<&str>, FaultFilter)> = vec![
        (vec!["--vm", "2"], FaultFilter { vm_id: vec![2], ..Default::default() }),
        (vec!["--vcpu", "1"], FaultFilter { vcpu: vec![1], ..Default::default() }),
        (vec!["--memslot", "1"], FaultFilter { memslot: vec![1], ..Default::default() }),
        (
            vec!["--ipa", "0x40000000/2M", "--ipa", "0x41000000-0x42000000"],
            FaultFilter {
                ipa_range: vec![
                    IpaRange { start: 0x4000_0000, end: 0x4020_0000 },
                    IpaRange { start: 0x4100_0000, end: 0x4200_0000 },
                ],
                ..Default::default()
            },
        ),
        (vec!["--kind", "permission"], FaultFilter { kind: vec![FaultKind::Permission as i32], ..Default::default() }),
        (vec!["--access", "write"], FaultFilter { access: vec![Access::Write as i32], ..Default::default() }),
        (vec!["--outcome", "mmio-exit"], FaultFilter { outcome: vec![Outcome::MmioExit as i32], ..Default::default() }),
        (
            vec!["--size", "2m"],
            FaultFilter { mapping_size: vec![MappingSize::MappingSize2m as i32], ..Default::default() },
        ),
        (vec!["--min-latency", "20us"], FaultFilter { min_latency_ns: 20_000, ..Default::default() }),
        // Kinds AND, values OR.
        (
            vec!["--vm", "1", "--access", "read", "--access", "write"],
            FaultFilter {
                vm_id: vec![1],
                access: vec![Access::Read as i32, Access::Write as i32],
                ..Default::default()
            },
        ),
    ];
    for (args, filter) in cases {
        let kept = cli_ids(&daemon, &args);
        assert_eq!(kept, api_ids(&daemon, vec![filter.clone()], vec![]).await, "{args:?}");
        assert!(!kept.is_empty() && kept.len() < all.len(), "{args:?} selects {} of {}", kept.len(), all.len());
        // `--not` before every flag: the denylist, the rest of the events.
        let negated: Vec<&str> = args.chunks(2).flat_map(|f| ["--not", f[0], f[1]]).collect();
        let left = cli_ids(&daemon, &negated);
        assert_eq!(left, api_ids(&daemon, vec![], vec![filter]).await, "{negated:?}");
        assert!(left.is_disjoint(&kept), "{negated:?}: an event on both sides");
        assert_eq!(left.len() + kept.len(), all.len(), "{negated:?}: the two sides cover everything");
    }
    // --not covers one flag: vm 1's events that are not writes.
    let mixed = cli_ids(&daemon, &["--vm", "1", "--not", "--access", "write"]);
    let want = api_ids(
        &daemon,
        vec![FaultFilter { vm_id: vec![1], ..Default::default() }],
        vec![FaultFilter { access: vec![Access::Write as i32], ..Default::default() }],
    )
    .await;
    assert_eq!(mixed, want);
    let (ok, _, err) = faultline(&daemon, &["observe", "--all", "--vm", "1", "--not"]);
    assert!(!ok && err.contains("--not must come right before a filter flag"), "{err}");
    let (ok, _, err) = faultline(&daemon, &["observe", "--ipa", "0x2000-0x1000"]);
    assert!(!ok && err.contains("START-END or START/LEN"), "{err}");
}

#[test]
fn completions_for_three_shells_and_man_pages_are_generated_and_installed() {
    let run = |args: &[&str]| {
        let out = Command::new(binary("faultline")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    // bash loads the script, and its function completes a subcommand.
    let script = dir.path().join("faultline.bash");
    std::fs::write(&script, run(&["completions", "bash"])).unwrap();
    let complete = format!(
        "source {} && complete -p faultline && COMP_WORDS=(faultline obs) COMP_CWORD=1 COMP_LINE='faultline obs' \
         COMP_POINT=13 && _faultline faultline obs faultline && echo \"offered: ${{COMPREPLY[*]}}\"",
        script.display()
    );
    let out = Command::new("bash").arg("-c").arg(&complete).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("-F _faultline faultline"), "{text}");
    assert!(text.contains("offered: observe"), "{text}");
    assert!(run(&["completions", "zsh"]).starts_with("#compdef faultline"));
    let fish = run(&["completions", "fish"]);
    assert!(fish.contains("complete -c faultline") && fish.contains("observe"), "{fish}");

    // The man page, rendered as man renders it.
    let page = dir.path().join("faultline.1");
    std::fs::write(&page, run(&["man"])).unwrap();
    let out = Command::new("man").arg("-l").arg(&page).env("MANPAGER", "cat").env("MANWIDTH", "100").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("NAME") && text.contains("faultline"), "{text}");
    assert!(text.contains("observe") && text.contains("--server"), "{text}");

    // The install script, into a staging root.
    let root = dir.path().join("root");
    let out = Command::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install-cli.sh"))
        .arg(binary("faultline"))
        .env("DESTDIR", &root)
        .env("PREFIX", "/usr")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for file in [
        "bash-completion/completions/faultline",
        "zsh/site-functions/_faultline",
        "fish/vendor_completions.d/faultline.fish",
        "man/man1/faultline.1",
        "man/man1/faultline-observe.1",
    ] {
        let path = root.join("usr/share").join(file);
        assert!(std::fs::metadata(&path).is_ok_and(|m| m.len() > 0), "{} missing or empty", path.display());
    }
}

/// A machine attached as `vm` (2 vCPUs, its RAM 4 KiB-paged and
/// dirty-logged) that runs a random workload's first half and pauses,
/// attached, until [`PausedMachine::resume`] lets it run the second half
/// (the same pages again: after a dirty-log fetch, permission faults),
/// and then holds, still attached; killed on drop.
struct PausedMachine {
    machine: TracedMachine,
    _trace_dir: tempfile::TempDir,
}

impl PausedMachine {
    fn start(daemon: &Daemon, vm: u32) -> Self {
        let layout = Layout { nr_vcpus: 2, ..Layout::default() };
        let half = generate(Pattern::Random, &layout, 2_000, u64::from(vm));
        let mut workload = generate(Pattern::Random, &layout, 4_000, u64::from(vm));
        for (whole, half) in workload.per_vcpu.iter_mut().zip(&half.per_vcpu) {
            *whole = [half.as_slice(), half.as_slice()].concat();
        }
        workload.pauses = vec![half.per_vcpu.iter().map(Vec::len).collect()];
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("halves.trace");
        std::fs::write(&trace, workload.to_trace()).unwrap();
        let vm_id = vm.to_string();
        let args = ["--vm-id", &vm_id, "--vcpus", "2", "--ram-page-kib", "4", "--dirty-log", "--spin-polls", "0"];
        let args = [&args[..], &["--hold-before-detach"]].concat();
        let mut m = TracedMachine::spawn(daemon, &args, &trace);
        m.wait_paused(0);
        Self { machine: m, _trace_dir: dir }
    }

    fn resume(&mut self) {
        self.machine.resume();
    }
}

impl Drop for PausedMachine {
    fn drop(&mut self) {
        let _ = self.machine.child.kill();
        let _ = self.machine.child.wait();
    }
}

#[test]
fn outputs_for_people_and_for_tools() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let mut cmd = machine(&daemon);
    cmd.args(["--vcpus", "2", "--pattern", "random", "--ram-page-kib", "4", "--ops", "3000"]);
    let faults = run_machine(cmd)["faults"].as_u64().unwrap();
    let _live = PausedMachine::start(&daemon, 2);

    // Compact lines begin with the local time (TZ, here five and a half
    // hours east of UTC), the JSON with UTC: the same event read both ways.
    let out = Command::new(binary("faultline"))
        .args(["--server", &daemon.grpc_unix_addr(), "observe", "--first", "1", "--vm", "1"])
        .env("TZ", "IST-5:30")
        .output()
        .unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    let (_, json, _) = faultline(&daemon, &["observe", "--first", "1", "--vm", "1", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let utc: prost_types::Timestamp = json["time"].as_str().unwrap().parse().unwrap();
    let of_day = (utc.seconds + 5 * 3600 + 1800).rem_euclid(86_400);
    let ist = format!("{:02}:{:02}:{:02}.{:06}", of_day / 3600, of_day / 60 % 60, of_day % 60, utc.nanos / 1000);
    assert!(line.contains(&format!(" {ist} vm1/vcpu")), "{line} vs {ist} ({})", json["time"]);

    // jsonpb: the proto's JSON mapping, for every event, field for field
    // the same event as -o json.
    let (ok, pb, err) = faultline(&daemon, &["observe", "--all", "--vm", "1", "-o", "jsonpb"]);
    let (_, js, _) = faultline(&daemon, &["observe", "--all", "--vm", "1", "-o", "json"]);
    assert!(ok, "{err}");
    assert_eq!(pb.lines().count() as u64, faults);
    for (pb, js) in pb.lines().zip(js.lines()) {
        let (pb, js): (serde_json::Value, serde_json::Value) =
            (serde_json::from_str(pb).unwrap(), serde_json::from_str(js).unwrap());
        assert_eq!(pb["faultId"].as_str().unwrap(), js["fault_id"].to_string(), "{pb}");
        let time = |v: &serde_json::Value| v["time"].as_str().unwrap().parse::<prost_types::Timestamp>().unwrap();
        assert_eq!(time(&pb), time(&js));
        assert_eq!(format!("{:#x}", pb["ipa"].as_str().unwrap().parse::<u64>().unwrap()), js["ipa"]);
        let outcome = pb["outcome"].as_str().unwrap().trim_start_matches("OUTCOME_").to_lowercase().replace('_', "-");
        assert_eq!(outcome, js["outcome"], "{pb}");
    }

    // A table's columns line up: every row's IPA column ends where the
    // header's does, whatever the widths of its cells.
    let (ok, table, _) = faultline(&daemon, &["observe", "--all", "--vm", "1", "-o", "table"]);
    assert!(ok);
    let header = table.lines().next().unwrap();
    let ipa_end = header.find("IPA").unwrap() + 3;
    for row in table.lines().skip(1) {
        let cell_end = row[..ipa_end].rfind(' ').unwrap() + 1;
        assert!(row[cell_end..ipa_end].starts_with("0x"), "{header}\n{row}");
        assert_eq!(row.as_bytes()[ipa_end], b' ', "{header}\n{row}");
    }
    assert!(table.lines().any(|l| l.contains(" mapped ")), "{table}");

    // Every report in the proto's JSON mapping, naming the VMs and counts.
    let report = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = faultline(&daemon, args);
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    let status = report(&["status", "-o", "json"]);
    assert_eq!(status["attachedVms"], 1, "{status}");
    let stats = report(&["stats", "-o", "jsonpb"]);
    assert!(stats["latency"].as_array().unwrap().iter().any(|h| h["stage"] == "end_to_end"), "{stats}");
    let vms = report(&["vm", "list", "-o", "json"]);
    assert_eq!(vms["vms"][0]["vmId"], 2, "{vms}");
    let vm = report(&["vm", "show", "2", "-o", "json"]);
    assert_eq!(vm["memslots"].as_array().unwrap().len(), 2, "{vm}");
    assert_eq!(report(&["policy", "status", "-o", "json"])["active"], "default");
    assert_eq!(report(&["policy", "list", "-o", "json"])["policies"][0]["name"], "default");
    let log = report(&["dirty-log", "2", "0", "--peek", "-o", "jsonpb"]);
    assert_eq!((&log["vmId"], &log["memslot"]), (&2.into(), &serde_json::Value::Null), "{log}");
    assert!(log["bitmap"].as_str().is_some_and(|b| !b.is_empty()), "base64 bitmap: {log}");
}

/// A tmux server of its own (`tmux -L`) with one 160x40 pane running an
/// interactive bash, as a person's terminal would; killed on drop.
struct Terminal {
    socket: String,
}

impl Terminal {
    fn start(env: &[(&str, &str)]) -> Self {
        let socket = format!("faultline-test-{}-{}", std::process::id(), rand_suffix());
        let t = Self { socket };
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let shell = format!("env {} PS1='$ ' bash --norc --noprofile -i", env.join(" "));
        t.tmux(&["new-session", "-d", "-x", "160", "-y", "40", &shell]);
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("tmux installed");
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `line` and Enter.
    fn type_line(&self, line: &str) {
        self.tmux(&["send-keys", "-l", line]);
        self.tmux(&["send-keys", "Enter"]);
    }

    /// Asserts the shell has its prompt back after a command that exited
    /// with `status`, with the line discipline as it was (canonical,
    /// echoing, signals on) and no panic or error on the screen.
    fn assert_shell_back(&self, status: i32) {
        self.type_line("echo \"status=$?\"; stty -a | tr ' ;' '\\n\\n' | grep -xE -- '-?(icanon|echo|isig)' | tr '\\n' ' '; echo; echo \"sum=$((6*7))\"");
        let screen = self.screen_when(|s| s.contains("sum=42"));
        assert!(screen.contains(&format!("status={status}")), "{screen}");
        assert!(screen.contains("icanon echo isig") || screen.contains("isig icanon echo"), "{screen}");
        assert!(!screen.contains("panicked") && !screen.contains("faultline:"), "{screen}");
    }

    /// The screen once `ready` holds for it (30 s at most: a hang guard).
    fn screen_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let screen = self.tmux(&["capture-pane", "-p", "-J", "-S", "-200"]);
            if ready(&screen) {
                return screen;
            }
            assert!(std::time::Instant::now() < deadline, "the screen never got there:\n{screen}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-L").arg(&self.socket).arg("kill-server").output();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos().into()
}

#[test]
fn observe_follow_in_a_terminal_ends_on_ctrl_c_and_leaves_it_sane() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let mut live = PausedMachine::start(&daemon, 3);
    let term = Terminal::start(&[("FAULTLINE_SERVER", &daemon.grpc_unix_addr()), ("RUST_BACKTRACE", "1")]);
    term.type_line(&format!("{} observe --follow --vm 3", binary("faultline").display()));
    // Following from now: the machine's second half streams in.
    wait_for_streams(&daemon, 1);
    live.resume();
    term.screen_when(|s| s.matches(" vm3/vcpu").count() >= 5);
    term.tmux(&["send-keys", "C-c"]);
    // The shell has its prompt back, the status is SIGINT's, and the line
    // discipline is as it was: canonical, echoing.
    term.assert_shell_back(130);
    // The stream was closed with it.
    wait_for_streams(&daemon, 0);
}

#[test]
fn top_in_a_terminal_shows_the_vm_toggles_its_vcpus_and_quits_on_q() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    // Without a terminal: a clear error, before it connects.
    let (drawn, _, err) = faultline(&daemon, &["top"]);
    assert!(!drawn && err.contains("top draws on a terminal") && err.contains("-o json"), "{err}");
    let mut live = PausedMachine::start(&daemon, 4);
    let term = Terminal::start(&[("FAULTLINE_SERVER", &daemon.grpc_unix_addr()), ("RUST_BACKTRACE", "1")]);
    term.type_line(&format!("{} top", binary("faultline").display()));
    // Refreshed once: the VM, its memory, the policy.
    term.screen_when(|s| s.contains("policy: default") && s.contains("RESIDENT") && vm_row(s, "vm4").is_some());
    // Faults stream in once top follows them (write-protected by a dirty
    // log fetch, the second half's writes are relaxed): the VM's row shows
    // their rate by outcome for the second they came in.
    wait_for_streams(&daemon, 1);
    let (fetched, _, err) = faultline(&daemon, &["dirty-log", "4", "0"]);
    assert!(fetched, "{err}");
    live.resume();
    let screen = term.screen_when(|s| vm_row(s, "vm4").is_some_and(|row| row.contains("relaxed")));
    let row = vm_row(&screen, "vm4").unwrap();
    let rate: f64 = row.split_whitespace().nth(2).and_then(|r| r.parse().ok()).unwrap_or_default();
    assert!(rate > 0.0 && row.contains("us") && row.contains("MiB"), "{row}");
    // v: a row per vCPU; again: gone.
    term.tmux(&["send-keys", "v"]);
    term.screen_when(|s| s.contains("vcpu0") && s.contains("vcpu1") && s.contains("v: VMs only"));
    term.tmux(&["send-keys", "v"]);
    term.screen_when(|s| !s.contains("vcpu0") && s.contains("v: per-vCPU breakdown"));
    // q: the shell is back, top exited 0, and the terminal is sane. What
    // is typed while top still reads the terminal is top's (keys read with
    // the q are dropped, as in any full-screen program), so the check is
    // typed once top has left its screen, which it does after raw mode.
    term.tmux(&["send-keys", "q"]);
    term.screen_when(|s| !s.contains("RESIDENT"));
    term.assert_shell_back(0);
    wait_for_streams(&daemon, 0);
}

/// The line of `screen` that starts with `vm` (a VM's row in `top`).
fn vm_row<'s>(screen: &'s str, vm: &str) -> Option<&'s str> {
    screen.lines().find(|l| l.trim_start().starts_with(&format!("{vm} ")))
}

/// Waits until `daemon` has `open` Observe streams open (30 s at most: a
/// hang guard).
fn wait_for_streams(daemon: &Daemon, open: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let metrics = faultline_system_tests::scrape_metrics(&daemon.metrics_addr());
        let streams = faultline_system_tests::metric_samples(&metrics)["faultline_observe_streams"];
        if streams == f64::from(open) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{streams} Observe streams open, not {open}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// README's "Operators' cheat sheet": each command in its block, run as
/// written (bash, pipefail, `faultline` on PATH) against a live daemon
/// serving a machine, exits 0, prints something and no error.
#[test]
fn the_readme_cheat_sheet_runs_against_a_live_daemon() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme.split("## Operators' cheat sheet").nth(1).expect("the cheat sheet section");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("its sh block");
    let commands: Vec<&str> = block.lines().filter(|l| l.starts_with("faultline ")).collect();
    assert!(commands.len() >= 10, "{commands:?}");
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let mut live = PausedMachine::start(&daemon, 1);
    let path = format!("{}:{}", binary("faultline").parent().unwrap().display(), std::env::var("PATH").unwrap());
    let mut resumed = false;
    for command in commands {
        let child = Command::new("bash")
            .args(["-o", "pipefail", "-c", command])
            .env("PATH", &path)
            .env("FAULTLINE_SERVER", daemon.grpc_unix_addr())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if command.contains("--follow") {
            // Live events for it: the machine's second half, once the
            // stream is open.
            assert!(!resumed, "one --follow command: the machine resumes once");
            wait_for_streams(&daemon, 1);
            live.resume();
            resumed = true;
        }
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stderr.is_empty(), "{command}: {:?}\n{stderr}", out.status);
        assert!(!stdout.trim().is_empty(), "{command}: printed nothing");
    }
}

/// Each binary's error, whatever RUST_BACKTRACE says, is one line: its
/// name, what failed and why, each cause once.
#[test]
fn every_binary_reports_an_error_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    for (bin, args, says) in [
        ("faultline", vec!["--server", &format!("unix:{missing}"), "status"], "cannot reach the daemon at unix:"),
        ("sim-machine", vec!["--attach-socket", missing], "connecting to the daemon: No such file or directory"),
        ("sim-machine", vec!["--ops", "10000000000", "--vcpus", "2"], "use fewer --ops"),
        ("qemu-machine", vec!["--attach-socket", missing], "no daemon at"),
        ("memory-manager", vec!["--config", missing], "loading configuration: cannot read"),
        ("policy-largest", vec!["--listen", "192.0.2.1:1"], "listening on 192.0.2.1:1 (--listen): "),
    ] {
        let out = Command::new(binary(bin)).args(&args).env("RUST_BACKTRACE", "full").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} {args:?}");
        assert_eq!(stderr.lines().count(), 1, "{bin} {args:?}:\n{stderr}");
        assert!(stderr.starts_with(&format!("{bin}: ")) && stderr.contains(says), "{bin} {args:?}: {stderr}");
        // No cause told twice ("...: No such file (os error 2): No such file (os error 2)").
        let causes: Vec<&str> = stderr.trim_end().split(": ").collect();
        let mut unique = causes.clone();
        unique.dedup();
        assert_eq!(causes, unique, "{bin} {args:?}: {stderr}");
    }
}
