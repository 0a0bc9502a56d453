//! `qemu-machine`: boot hyp-core at EL2 under qemu-system-aarch64, serve its
//! guest from a running daemon, print a JSON report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use qemu_machine::{Backing, Holes, IpaBits, ProbeAccess, QemuArgs, Scenario, SlotSetup, Stage1Probe};

/// Boot hyp-core at EL2 under qemu-system-aarch64 and serve its guest from
/// the running daemon; prints a JSON report.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The daemon's attach socket.
    #[arg(long, default_value = "/run/faultline/attach.sock")]
    attach_socket: PathBuf,
    /// The daemon's gRPC address, unix:PATH or http://HOST:PORT (dirty logs
    /// are read there before detach).
    #[arg(long, default_value = faultline_proto::client::DEFAULT_TCP)]
    grpc: faultline_proto::client::Address,
    /// The EL2 image (default: the one scripts/build-el2-image.sh builds
    /// next to this binary's target directory).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-aarch64")]
    qemu: String,
    /// Seconds the whole run may take.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Run the stage-1 probe instead of the checksum guest: the guest's
    /// MMU on, tables in their own memslot, one access.
    #[arg(long, value_enum)]
    stage1_probe: Option<ProbeAccess>,
    /// Stage-1 probe: the probed page's entry has its access flag clear.
    #[arg(long, requires = "stage1_probe")]
    af_clear: bool,
    /// Stage-1 probe: how the page-table memslot is set up.
    #[arg(long, value_enum, default_value_t = SlotSetup::Plain, requires = "stage1_probe")]
    tables: SlotSetup,
    /// Stage-1 probe: how the data memslot (the probed page's) is set up.
    #[arg(long, value_enum, default_value_t = SlotSetup::Plain, requires = "stage1_probe")]
    data: SlotSetup,
    /// Stage-1 probe: punch these memslots' backing before the guest
    /// runs (the daemon fills each page from the launcher's copy).
    #[arg(long, value_enum, default_value_t = Holes::None, requires = "stage1_probe")]
    holes: Holes,
    /// Stage-1 probe: page size of the data and page-table memslots' backing.
    #[arg(long, value_enum, default_value_t = Backing::Pages4k, requires = "stage1_probe")]
    backing: Backing,
    /// Stage-1 probe: the guest's IPA space, in bits.
    #[arg(long, value_enum, default_value_t = IpaBits::Bits40, requires = "stage1_probe")]
    ipa_bits: IpaBits,
    /// Seconds to wait for a daemon that went away to come back (its
    /// successor takes the VM back) before giving up.
    #[arg(long, default_value_t = 60)]
    reattach_deadline_s: u64,
    /// Pause the guest before its Nth stage-2 fault until a line arrives on
    /// stdin (to replace the daemon at a known point).
    #[arg(long)]
    pause_at_fault: Option<u32>,
    /// Let the MMU set stage-2 access flags itself (FEAT_HAFDBS,
    /// VTCR_EL2.HA) if the CPU has it: pages the daemon aged take no
    /// access-flag faults.
    #[arg(long)]
    hardware_access_flag: bool,
}

fn main() -> std::process::ExitCode {
    faultline_exit_status::exit_status(env!("CARGO_BIN_NAME"), run())
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    let scenario = match a.stage1_probe {
        Some(access) => Scenario::Stage1(Stage1Probe {
            access,
            data: a.data,
            af_clear: a.af_clear,
            tables: a.tables,
            holes: a.holes,
            backing: a.backing,
            ipa_bits: a.ipa_bits,
        }),
        None => Scenario::Checksum,
    };
    let image = match a.image {
        Some(i) => i,
        None => {
            let exe = std::env::current_exe()?;
            let target = exe.parent().and_then(|p| p.parent()).context("target directory")?;
            target.join("el2-image/aarch64-unknown-none/release/faultline-el2-image")
        }
    };
    let args = QemuArgs {
        grpc: a.grpc,
        scenario,
        attach_socket: a.attach_socket,
        image,
        qemu: a.qemu,
        timeout: Duration::from_secs(a.timeout),
        reattach_deadline: Duration::from_secs(a.reattach_deadline_s),
        pause_at_fault: a.pause_at_fault,
        hardware_access_flag: a.hardware_access_flag,
    };
    // The dirty-log reads are gRPC calls made from the launcher's thread.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let _entered = runtime.enter();
    let report = qemu_machine::run(&args)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(expected) = &report.expected {
        if report.checksum != Some(expected.checksum) {
            anyhow::bail!("the guest's checksum {:?} is not the host's {:#x}", report.checksum, expected.checksum);
        }
    }
    Ok(())
}
