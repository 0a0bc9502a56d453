//! Real EL2: the hyp-core image boots at EL2 under qemu-system-aarch64, its
//! EL1 guest's stage-2 aborts are served by the real daemon binary, and the
//! faults are visible through FaultTrace. Needs `qemu-system-aarch64` and
//! Debian's Rust toolchain (`.ci/run` installs both); the image is built by
//! `scripts/build-el2-image.sh`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use faultline_proto::v1::control_client::ControlClient;
use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::{
    observe_response::ResponseTypes, FaultEvent, GetAccessLogRequest, MappingSize, ObserveRequest, Outcome,
};
use faultline_system_tests::{binary, conformance, Daemon};

/// Builds the EL2 image once per test process; returns its path.
fn image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
            let out = Command::new(root.join("scripts/build-el2-image.sh")).output().expect("running the build script");
            assert!(out.status.success(), "building the EL2 image failed: {}", String::from_utf8_lossy(&out.stderr));
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        })
        .clone()
}

fn faultline_qemu(args: &[&str]) -> (bool, String, String) {
    faultline(&[&["qemu"], args].concat())
}

fn faultline(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("faultline")).args(args).env("RUST_BACKTRACE", "0").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_el2_guest_is_served_by_the_daemon_and_observed() {
    let image = image();
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket.to_str().unwrap().to_string();
    let image_arg = image.to_str().unwrap().to_string();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        faultline_qemu(&["--attach-socket", &socket, "--image", &image_arg, "--timeout", "120"])
    })
    .await
    .unwrap();
    assert!(ok, "faultline qemu failed: {err}\n{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let expected = &report["expected"];
    // The guest's checksum is the host's, for the same pattern.
    assert_eq!(report["checksum"], expected["checksum"]);
    // One fault per 2 MiB block and per 4 KiB page touched, plus the exits.
    assert_eq!(report["faults"], expected["faults"]);
    assert_eq!(report["faults"], 44);
    // The MMIO write to the read-only memslot, carrying the sum so far,
    // and the read outside memslots, which the machine's device answers
    // with the value last written ^ the address ^ its tag (and which the
    // guest added to its checksum).
    let exits = report["exits"].as_array().unwrap();
    assert_eq!(exits.len(), 2, "{exits:?}");
    assert_eq!((&exits[0][0], &exits[0][1], &exits[0][2]), (&0x9000_0040u64.into(), &true.into(), &8.into()));
    assert_eq!((&exits[1][0], &exits[1][1], &exits[1][2]), (&0xa000_0000u64.into(), &false.into(), &8.into()));
    let stored = exits[0][3].as_u64().unwrap();
    assert_ne!(stored, 0, "the write's value reached the machine");
    assert_eq!(exits[1][3], stored ^ 0xa000_0000 ^ faultline_probe::MMIO_READ_TAG);
    assert_eq!(report["exits"], expected["exits"]);
    // Detach: every pin released, every fault served by the daemon.
    assert_eq!(report["detach"][1], 0, "pins remaining");
    assert_eq!(report["detach"][2], report["faults"]);

    // FaultTrace saw every fault, with the syndromes QEMU's CPU produced.
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut stream = client.observe(ObserveRequest::default()).await.unwrap().into_inner();
    let mut events: Vec<FaultEvent> = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        if let Some(ResponseTypes::Fault(e)) = r.response_types {
            events.push(e);
        }
    }
    assert_eq!(events.len(), 44);
    let ec = |e: &FaultEvent| e.esr >> 26;
    assert_eq!(ec(&events[0]), 0x20, "the first fault is the guest's first instruction fetch");
    assert_eq!(events[0].ipa, 0x8000_0000);
    assert!(events[1..].iter().all(|e| ec(e) == 0x24), "the rest are data aborts from EL1");
    let size = |s: MappingSize| events.iter().filter(|e| e.mapping_size == s as i32).count();
    assert_eq!((size(MappingSize::MappingSize2m), size(MappingSize::MappingSize4k)), (9, 33));
    let exits: Vec<u64> = events.iter().filter(|e| e.outcome == Outcome::MmioExit as i32).map(|e| e.ipa).collect();
    assert_eq!(exits, [0x9000_0040, 0xa000_0000]);
    // The write to the mapped read-only page is a permission fault (DFSC
    // 0b0011xx) with a valid syndrome (ISV) and WnR set, as the Arm ARM says.
    let rom_write = events.iter().find(|e| e.ipa == 0x9000_0040 && e.outcome == Outcome::MmioExit as i32).unwrap();
    assert_eq!((rom_write.esr >> 24 & 1, rom_write.esr >> 6 & 1, rom_write.esr & 0x3c), (1, 1, 0x0c));
}

#[test]
fn the_launcher_reports_what_stops_it() {
    let image = image();
    let image_arg = image.to_str().unwrap();
    // No daemon.
    let (ok, _, err) = faultline_qemu(&["--attach-socket", "/nonexistent/attach.sock", "--image", image_arg]);
    assert!(!ok && err.contains("no daemon at /nonexistent/attach.sock"), "{err}");

    let daemon = Daemon::start(&[]);
    let socket = daemon.socket.to_str().unwrap();
    // No QEMU.
    let (ok, _, err) =
        faultline_qemu(&["--attach-socket", socket, "--image", image_arg, "--qemu", "/nonexistent/qemu"]);
    assert!(!ok && err.contains("/nonexistent/qemu not found"), "{err}");
    // No image.
    let (ok, _, err) = faultline_qemu(&["--attach-socket", socket, "--image", "/nonexistent/image"]);
    assert!(!ok && err.contains("build it with scripts/build-el2-image.sh"), "{err}");
    // Not an image QEMU can load (a directory): QEMU exits early and says why.
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) =
        faultline_qemu(&["--attach-socket", socket, "--image", dir.path().to_str().unwrap(), "--timeout", "30"]);
    assert!(!ok && err.contains("QEMU exited") && err.contains("QEMU said"), "{err}");
    // An image that runs but never boots hyp-core (a branch-to-self): the
    // launcher gives up at its timeout.
    let spin = dir.path().join("spin.bin");
    std::fs::write(&spin, 0x1400_0000u32.to_le_bytes()).unwrap();
    let (ok, _, err) =
        faultline_qemu(&["--attach-socket", socket, "--image", spin.to_str().unwrap(), "--timeout", "3"]);
    assert!(!ok && err.contains("timed out after 3s waiting for the EL2 image to say READY"), "{err}");
    // The daemon is still serving and nothing stayed attached.
    assert!(daemon.log().contains("attach socket listening") && !daemon.log().contains("VM attached"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage1_probes_at_el2_are_resolved_as_kvm_resolves_them() {
    let image = image();
    let daemon = Daemon::start(&[]);
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut seen = 0usize;
    let runs =
        conformance::CONFIGS.iter().flat_map(|&config| conformance::rows().into_iter().map(move |row| (config, row)));
    for (config, row) in runs {
        let grpc = daemon.grpc_addr();
        let mut args = vec!["--server", &grpc, "qemu"];
        args.extend(["--attach-socket", daemon.socket.to_str().unwrap(), "--image", image.to_str().unwrap()]);
        args.extend(row.args);
        args.extend(config.args());
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (ok, out, err) =
            tokio::task::spawn_blocking(move || faultline(&args.iter().map(String::as_str).collect::<Vec<_>>()))
                .await
                .unwrap();
        let name = format!("{} {}", row.args.join(" "), config.args().join(" "));
        assert!(ok, "{name}: {err}\n{out}");
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        // This row's events, from the daemon's history.
        let events = conformance::new_events(&mut client, &mut seen).await;
        if conformance::logs_any(&row) {
            // The launcher reads every logged memslot's log before detaching.
            let pages = |slot: &str, flag: &str| -> Option<Vec<u64>> {
                conformance::logs(&row, flag)
                    .then(|| report["dirty"][slot].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect())
            };
            let (data, tables) = (pages("data", "--data"), pages("tables", "--tables"));
            conformance::check_dirty(&row, data.as_deref(), tables.as_deref());
        }
        conformance::check(&row, config, &report, &events);
    }
}

/// `faultline qemu` running the checksum guest against `daemon` with
/// `extra` arguments, stdin and stderr piped.
fn spawn_checksum_guest(daemon: &Daemon, extra: &[&str]) -> std::process::Child {
    Command::new(binary("faultline"))
        .args(["qemu", "--attach-socket", daemon.socket.to_str().unwrap(), "--image", image().to_str().unwrap()])
        .args(["--timeout", "120", "--reattach-deadline-s", "30"])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The report of a finished checksum guest: its checksum is the
/// prediction, every fault was served, and it lived through one stall.
fn check_survived(out: std::process::Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "faultline qemu failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["checksum"], report["expected"]["checksum"], "the checksum is the prediction");
    assert_eq!(report["faults"], 44);
    assert_eq!(report["exits"], report["expected"]["exits"]);
    assert_eq!(report["stalls"]["count"], 1, "{report}");
    assert_eq!(report["detach"][1], 0, "pins remaining");
    report
}

#[test]
fn the_el2_guest_survives_its_daemon_killed_while_it_waits_at_a_fault() {
    use std::io::{BufRead, BufReader, Write};
    // The guest pauses before its 20th fault; the daemon is killed with
    // SIGKILL there and restarted; the launcher re-attaches (the successor
    // rebuilds its records through the control ring, which the paused
    // image serves), then the guest goes on.
    let mut daemon = Daemon::start(&[]);
    let mut child = spawn_checksum_guest(&daemon, &["--pause-at-fault", "20"]);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    loop {
        let line = lines.next().expect("the launcher ended before pausing").unwrap();
        seen.push_str(&line);
        if line.contains("paused before fault 20") {
            break;
        }
    }
    daemon.kill_and_restart(nix::sys::signal::Signal::SIGKILL);
    writeln!(child.stdin.take().unwrap()).unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output().unwrap();
    let out = std::process::Output { stderr: rest.join("\n").into_bytes(), ..out };
    check_survived(out);
    let log = daemon.log();
    assert!(log.contains("re-attached: mapping state rebuilt from the core"), "{log}");
    // 19 faults served before the kill, so at least that many leaves rebuilt.
    let rebuilt = log.lines().find(|l| l.contains("re-attached:")).unwrap();
    let mappings: u64 = rebuilt.split_whitespace().find_map(|w| w.strip_prefix("mappings=")).unwrap().parse().unwrap();
    assert!(mappings >= 19 - 2, "{rebuilt}");
}

#[test]
fn the_el2_guest_survives_a_daemon_that_dies_holding_its_fault() {
    // The daemon aborts right after it popped the guest's 20th fault: the
    // fault is outstanding in the core and nobody will answer it. The
    // launcher re-attaches to the restarted daemon and bumps REPOST; the
    // image posts the fault again, and the successor serves it.
    let spec = std::ffi::OsString::from("fault-popped:20");
    let mut daemon = Daemon::start_with_env(&[], &[(faultline_system_tests::CRASH_AT_ENV, spec.as_os_str())]);
    let child = spawn_checksum_guest(&daemon, &[]);
    daemon.restart_after_exit(faultline_system_tests::CRASH_AT_ENV);
    let out = child.wait_with_output().unwrap();
    check_survived(out);
    let log = daemon.log();
    assert!(log.contains("aborting at fault-popped"), "{log}");
}

#[test]
fn pages_aged_at_el2_take_their_access_flag_faults_at_the_core() {
    aged_pages_read_again_at_el2(&[], 32);
}

/// With `--hardware-access-flag`, QEMU's `-cpu max` (FEAT_HAFDBS) sets the
/// flags of the aged pages as the guest reads them: no access-flag fault,
/// the same 32 young leaves.
#[test]
fn with_hardware_access_flags_at_el2_the_mmu_sets_them_and_nothing_faults() {
    aged_pages_read_again_at_el2(&["--hardware-access-flag"], 0);
}

fn aged_pages_read_again_at_el2(extra: &[&str], af_faults: u64) {
    use std::io::{BufRead, BufReader, Write};
    // The guest pauses before its last fault (44, the read outside every
    // memslot): its 32 pages are mapped and accessed. The daemon ages the
    // page memslot there (GetAccessLog: AGE through the paused image's
    // control ring). The guest then flushes its TLB and reads the 32 pages
    // again: each read is an access-flag fault the EL2 core resolves, none
    // reaches the daemon; or, with hardware updates, no fault at all.
    let daemon = Daemon::start(&[]);
    let args = [&["--pause-at-fault", "44"], extra].concat();
    let mut child = spawn_checksum_guest(&daemon, &args);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the launcher ended before pausing").unwrap();
        if line.contains("paused before fault 44") {
            break;
        }
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let log = runtime.block_on(async {
        let mut control = ControlClient::new(daemon.unix_channel().await);
        control.get_access_log(GetAccessLogRequest { vm_id: 1, memslot: 1 }).await.unwrap().into_inner()
    });
    let pages: Vec<u64> = faultline_proto::dirty_pages(0, &log.bitmap).map(|p| p / 4096).collect();
    assert_eq!(pages, (0..32).collect::<Vec<_>>(), "the 32 pages the guest wrote and read");
    writeln!(child.stdin.take().unwrap()).unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "faultline qemu failed: {}", rest.join("\n"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["checksum"], report["expected"]["checksum"], "the checksum is the prediction");
    assert_eq!(report["faults"], 44, "no access-flag fault reached the daemon");
    assert_eq!(report["hardware_access_flag"], !extra.is_empty(), "{report}");
    assert_eq!(report["access_flag_faults"], af_faults, "{report}");
    // The flags the access log cleared are set again, by the core or by
    // the MMU.
    assert_eq!(report["young_leaves"], 32, "{report}");
    // The EL2 core counted its access-flag faults on its fault ring, where
    // the daemon read them (its detach line; GetVm while attached).
    let log = daemon.log();
    assert!(log.contains(&format!("faults=44 access_flag_faults={af_faults}")), "{log}");
}
