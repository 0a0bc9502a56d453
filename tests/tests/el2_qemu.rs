//! Real EL2: the hyp-core image boots at EL2 under qemu-system-aarch64, its
//! EL1 guest's stage-2 aborts are served by the real daemon binary, and the
//! faults are visible through FaultTrace. Needs `qemu-system-aarch64` and
//! Debian's Rust toolchain (`.ci/run` installs both); the image is built by
//! `scripts/build-el2-image.sh`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::{observe_response::ResponseTypes, FaultEvent, MappingSize, ObserveRequest, Outcome};
use faultline_system_tests::{binary, Daemon};

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
    // The MMIO write to the read-only memslot and the read outside memslots.
    assert_eq!(report["exits"], serde_json::json!([[0x9000_0040u64, true], [0xa000_0000u64, false]]));
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
    assert!(!ok && err.contains("connecting to the daemon at /nonexistent/attach.sock"), "{err}");

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

/// What a probe row ends with.
#[derive(Debug, Clone, Copy)]
enum End {
    /// The guest reported this value (read, written, or PAR_EL1 for AT).
    Value(u64),
    /// An MMIO exit (valid syndrome) at this IPA, completed at EL2; then the value.
    Mmio(u64, u64),
    /// An exit without a valid syndrome at this IPA: the vCPU stops, as
    /// KVM_RUN fails with ENOSYS.
    NoSyndrome(u64),
    /// An abort injected into the guest (the walk needed to write a read-only table).
    Injected,
}

/// One row of the stage-1 probe: the guest turns its MMU on with its page
/// tables in their own memslot and makes one access (a first slice of
/// KVM's page_fault_test matrix, issue 6, at real EL2).
struct ProbeRow {
    args: &'static [&'static str],
    /// Stage-2 faults: code block, the table pages walked, the data page,
    /// plus an access-flag update when the walker had to write a read-only
    /// table, or a read then a write (CAS).
    faults: u64,
    end: End,
    /// Relaxations (an access-flag update on a logged table page).
    relaxed: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage1_probes_at_el2_are_resolved_as_kvm_resolves_them() {
    const PROBE: u64 = 0x8400_0008;
    /// PAR_EL1 of AT S1E1R on the probe: PA 0x8400_0000, inner shareable
    /// (SH 0b11 at [8:7]), attributes 0xff (write-back) at [63:56].
    const PAR: u64 = 0xff00_0000_8400_0b80;
    use End::*;
    let rows = [
        // Every access, plain memslots.
        ProbeRow { args: &["--stage1-probe", "read64"], faults: 5, end: Value(0), relaxed: 0 },
        ProbeRow { args: &["--stage1-probe", "write64"], faults: 5, end: Value(PROBE), relaxed: 0 },
        ProbeRow { args: &["--stage1-probe", "cas"], faults: 5, end: Value(0), relaxed: 0 },
        ProbeRow { args: &["--stage1-probe", "ld-preidx"], faults: 5, end: Value(0), relaxed: 0 },
        ProbeRow { args: &["--stage1-probe", "st-preidx"], faults: 5, end: Value(PROBE), relaxed: 0 },
        ProbeRow { args: &["--stage1-probe", "dc-zva"], faults: 5, end: Value(0), relaxed: 0 },
        // AT walks stage 1 only: the table pages fault, the data page does not.
        ProbeRow { args: &["--stage1-probe", "at"], faults: 4, end: Value(PAR), relaxed: 0 },
        ProbeRow { args: &["--stage1-probe", "exec"], faults: 5, end: Value(0xe7ec), relaxed: 0 },
        // A read-only data memslot: reads, AT and fetches are mapped; a
        // write with a syndrome exits to the VMM; accesses without one (CAS,
        // pre-index store, DC ZVA) stop the vCPU.
        ProbeRow { args: &["--stage1-probe", "read64", "--data", "read-only"], faults: 5, end: Value(0), relaxed: 0 },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--data", "read-only"],
            faults: 5,
            end: Mmio(PROBE, PROBE),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--data", "read-only"],
            faults: 6,
            end: NoSyndrome(PROBE),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "ld-preidx", "--data", "read-only"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx", "--data", "read-only"],
            faults: 5,
            end: NoSyndrome(PROBE),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--data", "read-only"],
            faults: 5,
            end: NoSyndrome(PROBE & !63),
            relaxed: 0,
        },
        ProbeRow { args: &["--stage1-probe", "at", "--data", "read-only"], faults: 4, end: Value(PAR), relaxed: 0 },
        ProbeRow {
            args: &["--stage1-probe", "exec", "--data", "read-only"],
            faults: 5,
            end: Value(0xe7ec),
            relaxed: 0,
        },
        // Logged tables, access flag clear: the walk maps the table page
        // read-only; the hardware AF update is a permission fault on the
        // walk, a write: relaxed in place (and the table page dirtied).
        ProbeRow {
            args: &["--stage1-probe", "write64", "--af-clear", "--tables", "dirty-log"],
            faults: 6,
            end: Value(PROBE),
            relaxed: 1,
        },
        // Dirty logging on the data and table memslots (the selftest's
        // dirty_log rows): pages are mapped read-only first, so writes and
        // the walker's AF updates fault once more and set their bits.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "read64", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(0),
            relaxed: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Value(PROBE),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(PROBE),
            relaxed: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(0),
            relaxed: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Value(PROBE),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "exec", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(0xe7ec),
            relaxed: 1,
        },
        // Read-only and logged data, logged tables (the selftest's
        // ro_memslot_and_dlog rows): nothing can dirty the data page.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--af-clear", "--data", "read-only-dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(0),
            relaxed: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--data", "read-only-dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Mmio(PROBE, PROBE),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--data", "read-only-dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: NoSyndrome(PROBE),
            relaxed: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--af-clear", "--data", "read-only-dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: NoSyndrome(PROBE & !63),
            relaxed: 1,
        },
        // Tables in a read-only memslot: walks read them, so it works
        // (KVM since 6.2: only a permission fault on a walk is a write) ...
        ProbeRow { args: &["--stage1-probe", "read64", "--tables", "read-only"], faults: 5, end: Value(0), relaxed: 0 },
        // ... until the walker must write one: injected into the guest.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--af-clear", "--tables", "read-only"],
            faults: 5,
            end: Injected,
            relaxed: 0,
        },
    ];
    let image = image();
    let daemon = Daemon::start(&[]);
    let mut client = FaultTraceClient::connect(daemon.grpc_addr()).await.unwrap();
    let mut seen = 0usize;
    for row in rows {
        let grpc = daemon.grpc_addr();
        let mut args = vec!["--server", &grpc, "qemu"];
        args.extend(["--attach-socket", daemon.socket.to_str().unwrap(), "--image", image.to_str().unwrap()]);
        args.extend(row.args);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (ok, out, err) =
            tokio::task::spawn_blocking(move || faultline(&args.iter().map(String::as_str).collect::<Vec<_>>()))
                .await
                .unwrap();
        let name = row.args.join(" ");
        assert!(ok, "{name}: {err}\n{out}");
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["faults"], row.faults, "{name}");
        assert_eq!(report["detach"][1], 0, "{name}: pins remaining");
        let (value, exits, no_syndrome, injected) = match row.end {
            Value(v) => (Some(v), vec![], None, false),
            Mmio(v, ipa) => (Some(v), vec![serde_json::json!([ipa, true])], None, false),
            NoSyndrome(ipa) => (None, vec![], Some(serde_json::json!([ipa, true])), false),
            Injected => (None, vec![], None, true),
        };
        assert_eq!(report["checksum"].as_u64(), value, "{name}");
        assert_eq!(report["exits"].as_array().unwrap(), &exits, "{name}");
        assert_eq!(report["no_syndrome_exit"], no_syndrome.unwrap_or(serde_json::Value::Null), "{name}");
        assert_eq!(!report["injected"].is_null(), injected, "{name}");

        // This row's events, from the daemon's history.
        let mut stream = client.observe(ObserveRequest::default()).await.unwrap().into_inner();
        let mut events: Vec<FaultEvent> = Vec::new();
        while let Some(r) = stream.message().await.unwrap() {
            if let Some(ResponseTypes::Fault(e)) = r.response_types {
                events.push(e);
            }
        }
        let events = events.split_off(seen);
        seen += events.len();
        assert_eq!(events.len() as u64, row.faults, "{name}");
        let s1ptw = |e: &FaultEvent| e.esr >> 7 & 1 == 1;
        // The table pages each faulted on a walk (S1PTW set by QEMU's CPU).
        let walked: Vec<u64> = events.iter().filter(|e| s1ptw(e) && e.kind == 1).map(|e| e.ipa & !0xfff).collect();
        assert_eq!(walked, [0x8800_0000, 0x8800_1000, 0x8800_2000], "{name}");
        // Table pages are never mapped executable, whatever walked them.
        assert!(events.iter().filter(|e| s1ptw(e)).all(|e| e.permissions & 4 == 0), "{name}");
        let relaxed = events.iter().filter(|e| e.outcome == Outcome::Relaxed as i32).count() as u64;
        assert_eq!(relaxed, row.relaxed, "{name}");
        if row.args.contains(&"--af-clear") && row.relaxed > 0 {
            let update = events.iter().find(|e| e.outcome == Outcome::Relaxed as i32 && s1ptw(e)).unwrap();
            // HPFAR gives the table page; the low bits are the VA's (as KVM composes it).
            assert_eq!(update.ipa & !0xfff, 0x8800_2000, "{name}: the walker's AF write to the L3 table");
        }
        // Dirty logging on both memslots: the data page is dirty iff the
        // access writes it; the table page iff the walker set its AF.
        let logged = |a: &&&str| a.ends_with("dirty-log");
        if row.args.iter().filter(logged).count() == 2 {
            let read_only = row.args.contains(&"read-only-dirty-log");
            let writes = !read_only && ["write64", "cas", "st-preidx", "dc-zva"].iter().any(|a| row.args.contains(a));
            let data: Vec<u64> = if writes { vec![0x8400_0000] } else { vec![] };
            let tables: Vec<u64> = if row.args.contains(&"--af-clear") { vec![0x8800_2000] } else { vec![] };
            assert_eq!(report["dirty"]["data"], serde_json::json!(data), "{name}");
            assert_eq!(report["dirty"]["tables"], serde_json::json!(tables), "{name}");
        }
        let last = events.last().unwrap();
        match row.end {
            Injected => assert!(s1ptw(last) && last.outcome == Outcome::InjectedAbort as i32, "{name}"),
            NoSyndrome(_) => assert_eq!(last.outcome, Outcome::NoSyndromeExit as i32, "{name}"),
            Mmio(..) => assert_eq!(last.outcome, Outcome::MmioExit as i32, "{name}"),
            // The access itself was resolved: mapped, or relaxed after a read (CAS).
            Value(_) => {
                assert!([Outcome::Mapped, Outcome::Relaxed].iter().any(|o| last.outcome == *o as i32), "{name}")
            }
        }
    }
}
