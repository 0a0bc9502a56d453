//! qemu-machine: boots hyp-core at EL2 under `qemu-system-aarch64` and
//! serves its guest from a running memory-manager daemon (`faultline qemu`
//! runs this binary). The machine beside `sim-machine`: same attach
//! protocol, same board layout (`faultline-board`), same probe vocabulary
//! (`faultline-probe`).
//!
//! The guest's RAM is a sealed memfd that QEMU maps as its whole RAM
//! (`memory-backend-file` on `/proc/<pid>/fd/<n>`, `share=on`); the same fd
//! goes to the daemon at attach, described as PA windows: the ring region,
//! the stage-2 table pool, and the three memslots' backing. The EL2 image's
//! own memory is not donated. The image says READY on the UART once its
//! rings exist; the launcher then attaches (flag POLLED: code in QEMU cannot
//! wake a futex), writes GO into the image's mailbox and reads the UART until
//! the guest powers off.
//!
//! The daemon may die or be replaced meanwhile: the launcher keeps the VM's
//! connection in a [`Session`], re-attaches to the daemon's successor and
//! then bumps the mailbox's REPOST word, so a vCPU waiting in a fault posts
//! it again. `--pause-at-fault N` stops the guest before its Nth fault
//! until a line arrives on stdin (to replace the daemon at a known point).

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faultline_attach::session::{Session, Stalls};
use faultline_attach::shm::MappedRegion;
use faultline_attach::{
    AttachRequest, MemslotDesc, RegionDesc, RegionKind, ATTACH_POLLED, MEMSLOT_READ_ONLY, NO_FD, REGION_WRITABLE,
};
use serde::Serialize;
// The probe's vocabulary and tables: both machines take the same
// arguments and write the same tables.
pub use faultline_probe::{
    data_contents, punch_to_contents, stage1_tables, Backing, Holes, IpaBits, MmioDevice, MmioDone, ProbeAccess,
    SlotSetup,
};

// The board layout, the EL2 image's own; the image's READY line is still
// checked against it (a stale image binary).
use faultline_board::*;

/// The guest's value for a word at `ipa`.
const MAGIC: u64 = 0x5bd1_e995_5bd1_e995;

/// The read-only memslot's contents: word at offset `o` is `ROM_TAG | o`.
const ROM_TAG: u64 = 0x524f_4d00_0000_0000;

/// The accesses the guest makes, as the host predicts them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prediction {
    /// The checksum the guest must report.
    pub checksum: u64,
    /// Stage-2 faults: one per 2 MiB block, one per 4 KiB page, plus exits.
    pub faults: u64,
    /// Exits with their data ([`MmioDone`]).
    pub exits: Vec<MmioDone>,
}

/// What the guest program in the image does, computed on the host.
pub fn predict() -> Prediction {
    let mut checksum = 0u64;
    let mut faults = 1; // the first instruction fetch maps block 0 (code)
    for k in 1..=8u64 {
        let a = BLOCKS_IPA + k * (2 << 20) + 0x10000;
        for addr in [a, a + 0x1e_0000] {
            checksum = checksum.wrapping_add(addr ^ MAGIC);
        }
        faults += 1;
    }
    for p in 0..32u64 {
        let addr = PAGES_IPA + p * 4096 + 8;
        checksum = checksum.wrapping_add(addr ^ MAGIC);
        faults += 1;
    }
    // The read-only memslot: one fault maps it for the read; the write of
    // the sum so far exits, and the device keeps it.
    checksum = checksum.wrapping_add(ROM_TAG | 0x40);
    faults += 2;
    let mut device = MmioDevice::default();
    let stored = device.access(ROM_IPA + 0x40, true, checksum);
    // Outside every memslot: an exit the device answers.
    let read = device.access(OUTSIDE_IPA, false, 0);
    faults += 1;
    let exits = vec![(ROM_IPA + 0x40, true, 8, stored), (OUTSIDE_IPA, false, 8, read)];
    checksum = checksum.wrapping_add(read);
    // The 32 pages read again: mapped already, no fault for the daemon.
    for p in 0..32u64 {
        checksum = checksum.wrapping_add((PAGES_IPA + p * 4096 + 8) ^ MAGIC);
    }
    Prediction { checksum, faults, exits }
}

/// The stage-1 probe: the guest turns its MMU on with page tables in their
/// own memslot (written by the launcher) and makes one access.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stage1Probe {
    /// The access.
    pub access: ProbeAccess,
    /// The data memslot (the probed page's).
    pub data: SlotSetup,
    /// The leaf entry of the probed page has its access flag clear, so the
    /// walker (TCR_EL1.HA) writes the page-table page.
    pub af_clear: bool,
    /// The page-table memslot.
    pub tables: SlotSetup,
    /// Memslots whose backing is punched (filled from the launcher's copy).
    pub holes: Holes,
    /// Page size of the data and page-table memslots' backing.
    pub backing: Backing,
    /// The guest's IPA space (the image reads it from the mailbox at boot).
    pub ipa_bits: IpaBits,
}

/// Which guest the image runs.
#[derive(Clone, Copy, Debug)]
pub enum Scenario {
    /// The checksum guest ([`predict`]).
    Checksum,
    /// The stage-1 probe.
    Stage1(Stage1Probe),
}

/// Options of `faultline qemu`.
#[derive(Debug, Clone)]
pub struct QemuArgs {
    /// Which guest runs.
    pub scenario: Scenario,
    /// The daemon's attach socket.
    pub attach_socket: PathBuf,
    /// The EL2 image (ELF).
    pub image: PathBuf,
    /// The QEMU binary.
    pub qemu: String,
    /// How long the whole run may take.
    pub timeout: Duration,
    /// The daemon's gRPC address, to read logged memslots' dirty bitmaps
    /// before detaching (the stage-1 probe with a dirty-log memslot).
    pub grpc: faultline_proto::client::Address,
    /// How long a daemon that went away is waited for.
    pub reattach_deadline: Duration,
    /// Pause the guest before this fault (1 is the first) until a line
    /// arrives on stdin.
    pub pause_at_fault: Option<u32>,
    /// Let the image's core have the MMU set stage-2 access flags itself
    /// (FEAT_HAFDBS, `VTCR_EL2.HA`) if the CPU has it.
    pub hardware_access_flag: bool,
}

/// Dirty pages (IPAs) of the probe's logged memslots, read before detach.
#[derive(Debug, Default, Serialize)]
pub struct DirtyPages {
    /// The data memslot's.
    pub data: Vec<u64>,
    /// The page-table memslot's.
    pub tables: Vec<u64>,
}

/// Memslot ids in the attach request.
const DATA_SLOT: u32 = 1;
const TABLES_SLOT: u32 = 3;

/// The dirty pages of memslot `slot` (at `gpa`), read without clearing.
fn dirty_pages(grpc: &faultline_proto::client::Address, slot: u32, gpa: u64) -> anyhow::Result<Vec<u64>> {
    use faultline_proto::v1::control_client::ControlClient;
    use faultline_proto::v1::GetDirtyLogRequest;
    let log = tokio::runtime::Handle::current().block_on(async {
        let channel = faultline_proto::client::connect(grpc, &Default::default()).await?;
        let mut client = ControlClient::new(channel);
        let req = GetDirtyLogRequest { vm_id: 1, memslot: slot, peek: true };
        anyhow::Ok(client.get_dirty_log(req).await?.into_inner())
    })?;
    Ok(faultline_proto::dirty_pages(gpa, &log.bitmap).collect())
}

/// The run's outcome.
#[derive(Debug, Serialize)]
pub struct QemuReport {
    /// The guest's checksum (the probe: the value it read or wrote); none
    /// when the guest was stopped by an injected abort.
    pub checksum: Option<u64>,
    /// What the host predicted (the checksum guest).
    pub expected: Option<Prediction>,
    /// The stage-1 probe that ran, if it was that guest.
    pub stage1_probe: Option<Stage1Probe>,
    /// The address of an abort the daemon asked to inject (the run ends there).
    pub injected: Option<u64>,
    /// An exit without a valid syndrome `(IPA, write)`: nothing to emulate
    /// with, so the vCPU stops (KVM_RUN fails with ENOSYS).
    pub no_syndrome_exit: Option<(u64, bool)>,
    /// Dirty pages of the logged memslots (stage-1 probe), read before detach.
    pub dirty: Option<DirtyPages>,
    /// Faults the EL2 core served.
    pub faults: u64,
    /// Access-flag faults the EL2 core resolved itself (pages aged with
    /// AGE, accessed again), never sent to the daemon.
    pub access_flag_faults: u64,
    /// The image let the MMU set access flags (asked for, and the CPU has
    /// FEAT_HAFDBS).
    pub hardware_access_flag: bool,
    /// Leaves of the page memslot with the access flag set at power-off.
    pub young_leaves: u64,
    /// MMIO exits the launcher emulated, with their data ([`MmioDone`]).
    pub exits: Vec<MmioDone>,
    /// From starting QEMU to the guest's result, ms.
    pub boot_to_result_ms: u64,
    /// The stage-1 probe: the probed page's stage-1 leaf descriptor after
    /// the run (its access flag is the selftest's guest_check_pte_af).
    pub leaf: Option<u64>,
    /// The daemon's detach report: pages released, pins remaining, faults served.
    pub detach: [u64; 3],
    /// Times the daemon went away until a successor took the VM back.
    pub stalls: Stalls,
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hex_field(line: &str, key: &str) -> Option<u64> {
    let v = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
    let v = v.split('+').next()?;
    u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
}

fn dec_field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))?.parse().ok()
}

/// The ring-region and table layout on the image's READY line must be the
/// launcher's.
/// The image must also have built the IPA space asked for (an image that
/// predates the mailbox's IPA_BITS word builds 40 bits whatever it says).
fn check_ready(line: &str, ipa_bits: IpaBits) -> anyhow::Result<()> {
    let want = format!(
        "rings={RINGS_PA:#x}+{RINGS_BYTES:#x} tables={TABLES_PA:#x}+{TABLES_BYTES:#x} root={ROOT_RESERVE:#x} mailbox={MAILBOX_PA:#x}"
    );
    if !line.contains(&want) {
        bail!("the EL2 image's layout is not the launcher's: image says {line:?}, launcher expects {want:?}");
    }
    if dec_field(line, "ipa_bits=") != Some(u64::from(ipa_bits.bits())) {
        bail!("the EL2 image built another IPA space than {} bits: {line:?}", ipa_bits.bits());
    }
    Ok(())
}

/// The IPA space of the scenario's guest (the checksum guest's is 40 bits).
fn ipa_bits(scenario: Scenario) -> IpaBits {
    match scenario {
        Scenario::Stage1(p) => p.ipa_bits,
        Scenario::Checksum => IpaBits::Bits40,
    }
}

/// Boots the image, serves its guest from the daemon, returns the report.
pub fn run(args: &QemuArgs) -> anyhow::Result<QemuReport> {
    if !args.image.exists() {
        bail!("EL2 image {} not found: build it with scripts/build-el2-image.sh", args.image.display());
    }
    // The daemon first: fail before starting anything if it is not there.
    if !args.attach_socket.exists() {
        bail!("no daemon at {} (is memory-manager running?)", args.attach_socket.display());
    }

    let memfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("faultline-qemu-ram")
        .context("creating the guest RAM memfd")?;
    memfd.as_file().set_len(RAM_BYTES)?;
    memfd.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])?;
    let ram = MappedRegion::map(memfd.as_file().as_fd(), 0, RAM_BYTES, 4096).context("mapping guest RAM")?;
    for off in (0..ROM_BYTES).step_by(8) {
        ram.store(ROM_PA - RAM_PA + off, 8, ROM_TAG | off).expect("in range");
    }
    // Read by the image at boot, before it builds the VM's stage 2.
    mailbox_store(&ram, mailbox::IPA_BITS, ipa_bits(args.scenario).bits());
    mailbox_store(&ram, mailbox::HW_ACCESS_FLAG, args.hardware_access_flag as u32);
    if let Scenario::Stage1(probe) = args.scenario {
        for (ipa, desc) in stage1_tables(probe.af_clear) {
            ram.store(PT_PA - RAM_PA + (ipa - PT_IPA), 8, desc).expect("in range");
        }
        for (ipa, size, value) in data_contents(probe.access, probe.holes) {
            ram.store(PAGES_PA - RAM_PA + (ipa - PAGES_IPA), size, value).expect("in range");
        }
    }
    // Punched memslots: their pages move to contents files the daemon fills
    // holes from (each a contents region over the slot's window).
    let mut contents = Vec::new();
    if let Scenario::Stage1(probe) = args.scenario {
        for (punch, pa, bytes) in [(probe.holes.data(), PAGES_PA, PAGES_BYTES), (probe.holes.tables(), PT_PA, PT_BYTES)]
        {
            if punch {
                contents.push((pa, bytes, punch_to_contents(&memfd, pa - RAM_PA, bytes)?));
            }
        }
    }

    let mem_path = format!("/proc/{}/fd/{}", std::process::id(), memfd.as_file().as_raw_fd());
    let started = Instant::now();
    let child = Command::new(&args.qemu)
        .args(["-M", "virt,virtualization=on,memory-backend=ram", "-cpu", "max", "-m", "256M", "-nographic"])
        .args(["-monitor", "none", "-serial", "stdio", "-no-reboot", "-object"])
        .arg(format!("memory-backend-file,id=ram,size=256M,mem-path={mem_path},share=on"))
        .arg("-kernel")
        .arg(&args.image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("{} not found (Debian: apt-get install qemu-system-arm)", args.qemu)
            }
            _ => anyhow::anyhow!("starting {}: {e}", args.qemu),
        })?;
    let mut qemu = Qemu(child);
    let stdout = qemu.0.stdout.take().context("QEMU stdout")?;
    let stderr = qemu.0.stderr.take().context("QEMU stderr")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let guest_ram = GuestRam { memfd, ram, contents };
    let served = serve(args, &guest_ram, &mut qemu, &lines, started);
    if let Err(e) = served {
        // QEMU's own messages say why it stopped, when it did.
        let _ = qemu.0.kill();
        let _ = qemu.0.wait();
        let stderr = errors.join().unwrap_or_default();
        let stderr = stderr.trim();
        return Err(if stderr.is_empty() { e } else { e.context(format!("QEMU said: {stderr}")) });
    }
    served
}

/// The guest's RAM: the memfd QEMU maps, the launcher's mapping of it, and
/// the contents files of punched memslots `(PA, bytes, file)`.
struct GuestRam {
    memfd: memfd::Memfd,
    ram: MappedRegion,
    contents: Vec<(u64, u64, std::fs::File)>,
}

/// Stores a 32-bit mailbox word.
fn mailbox_store(ram: &MappedRegion, offset: u64, value: u32) {
    ram.store(MAILBOX_PA - RAM_PA + offset, 4, value.into()).expect("the mailbox is in RAM");
}

/// The next UART line, waiting until `deadline`; `gone` ends the wait early
/// (the VM's daemon is gone for good).
fn next_line(
    lines: &mpsc::Receiver<String>,
    what: &str,
    qemu: &mut Qemu,
    deadline: Instant,
    timeout: Duration,
    gone: &dyn Fn() -> bool,
) -> anyhow::Result<String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(l) => return Ok(l),
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                bail!("timed out after {timeout:?} waiting for {what}")
            }
            Err(mpsc::RecvTimeoutError::Timeout) if gone() => bail!("the daemon is gone while waiting for {what}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = qemu.0.wait()?;
                bail!("QEMU exited ({status}) before {what}")
            }
        }
    }
}

/// Waits for READY, attaches, says GO, reads the UART until power-off.
fn serve(
    args: &QemuArgs,
    GuestRam { memfd, ram, contents }: &GuestRam,
    qemu: &mut Qemu,
    lines: &mpsc::Receiver<String>,
    started: Instant,
) -> anyhow::Result<QemuReport> {
    let deadline = started + args.timeout;

    let ready = loop {
        let line = next_line(lines, "the EL2 image to say READY", qemu, deadline, args.timeout, &|| false)
            .context("the EL2 image did not boot")?;
        if line.contains("FAULTLINE-EL2 READY") {
            break line;
        }
        if line.contains("FAULTLINE-EL2 ERROR") || line.contains("FAULTLINE-EL2 PANIC") {
            bail!("the EL2 image failed while booting: {line}");
        }
    };
    check_ready(&ready, ipa_bits(args.scenario))?;
    let hardware_access_flag = dec_field(&ready, "hw_af=") == Some(1);
    if args.hardware_access_flag && !hardware_access_flag {
        eprintln!("qemu-machine: the CPU has no FEAT_HAFDBS: aged pages take access-flag faults at the core");
    }

    let (tables, data, backing) = match args.scenario {
        Scenario::Stage1(p) => (p.tables, p.data, p.backing),
        Scenario::Checksum => (SlotSetup::Plain, SlotSetup::Plain, Backing::Pages4k),
    };
    let page = backing.page_size();
    let mut request = AttachRequest {
        vm_id: 1,
        nr_vcpus: 1,
        ipa_bits: ipa_bits(args.scenario).bits() as u8,
        flags: ATTACH_POLLED,
        regions: vec![
            guest_region(0, BLOCKS_PA, BLOCKS_BYTES, 2 << 20, REGION_WRITABLE),
            guest_region(1, PAGES_PA, PAGES_BYTES, page, REGION_WRITABLE),
            guest_region(2, ROM_PA, ROM_BYTES, 4096, 0),
            guest_region(3, PT_PA, PT_BYTES, page, REGION_WRITABLE),
            RegionDesc {
                kind: RegionKind::Rings,
                flags: 0,
                pa_base: RINGS_PA,
                size: RINGS_BYTES,
                page_size: 4096,
                fd_index: 4,
                fd_offset: RINGS_PA - RAM_PA,
            },
            RegionDesc {
                kind: RegionKind::TablePool,
                flags: 0,
                pa_base: TABLES_PA + ROOT_RESERVE,
                size: TABLES_BYTES - ROOT_RESERVE,
                page_size: 4096,
                fd_index: NO_FD,
                fd_offset: 0,
            },
        ],
        memslots: vec![
            MemslotDesc { gpa: BLOCKS_IPA, size: BLOCKS_BYTES, region: 0, flags: 0, region_offset: 0 },
            MemslotDesc { gpa: PAGES_IPA, size: PAGES_BYTES, region: 1, flags: data.flags(), region_offset: 0 },
            MemslotDesc { gpa: ROM_IPA, size: ROM_BYTES, region: 2, flags: MEMSLOT_READ_ONLY, region_offset: 0 },
            MemslotDesc { gpa: PT_IPA, size: PT_BYTES, region: 3, flags: tables.flags(), region_offset: 0 },
        ],
    };
    // One fd per region (the protocol gives each region its own): the same
    // memfd five times, each a window at its own offset.
    let fd = memfd.as_file().as_fd();
    let mut fds = vec![fd, fd, fd, fd, fd];
    for (pa_base, size, file) in contents {
        request.regions.push(RegionDesc::contents(*pa_base, *size, fds.len() as u32));
        fds.push(file.as_fd());
    }
    let session = Session::attach(&args.attach_socket, request, fds, args.reattach_deadline)
        .with_context(|| format!("attaching to the daemon at {}", args.attach_socket.display()))?;
    // The launcher's view of the rings, to see that the image executed what
    // a dead daemon left before re-attaching.
    let rings = MappedRegion::map(memfd.as_file().as_fd(), RINGS_PA - RAM_PA, RINGS_BYTES, 4096)
        .context("mapping the ring region")?;
    let region = rings.ring_region().map_err(|e| anyhow::anyhow!("the image's ring region: {e:?}"))?;
    let (scenario, access, flags) = match args.scenario {
        Scenario::Checksum => (mailbox::SCENARIO_CHECKSUM, 0, 0),
        Scenario::Stage1(p) => {
            let punched = if p.holes.data() { mailbox::PROBE_DATA_PUNCHED } else { 0 };
            (mailbox::SCENARIO_STAGE1_PROBE, p.access.mailbox_code(), punched)
        }
    };
    mailbox_store(ram, mailbox::PROBE_FLAGS, flags);
    mailbox_store(ram, mailbox::SCENARIO, scenario);
    mailbox_store(ram, mailbox::PROBE_ACCESS, access);
    mailbox_store(ram, mailbox::PAUSE_AT_FAULT, args.pause_at_fault.unwrap_or(0));
    mailbox_store(ram, mailbox::GO, mailbox::GO_VALUE);

    let stop = AtomicBool::new(false);
    let (ran, supervised) = std::thread::scope(|s| {
        let supervisor = s.spawn(|| {
            // Re-attached: one more REPOST, and a vCPU waiting in a fault
            // posts it again.
            session.supervise(
                &stop,
                || region.commands_drained(),
                || {
                    let reposts = ram.load(MAILBOX_PA - RAM_PA + mailbox::REPOST, 4).expect("the mailbox is in RAM");
                    mailbox_store(ram, mailbox::REPOST, (reposts as u32).wrapping_add(1));
                },
            )
        });
        let gone = || supervisor.is_finished();
        let ran =
            run_guest(ram, qemu, started, |what, qemu| next_line(lines, what, qemu, deadline, args.timeout, &gone));
        stop.store(true, Ordering::Release);
        (ran, supervisor.join().unwrap_or(Ok(())))
    });
    supervised.context("the VM's daemon")?;
    let Ran { checksum, exits, result_at, injected, no_syndrome, faults, access_flag_faults, young_leaves } = ran?;
    let status = qemu.0.wait()?;
    if !status.success() {
        bail!("QEMU exited with {status}");
    }
    // Still attached: read the dirty bitmaps the run left.
    let dirty = if data.logged() || tables.logged() {
        let read = |setup: SlotSetup, slot, gpa| {
            if !setup.logged() {
                return Ok(Vec::new());
            }
            dirty_pages(&args.grpc, slot, gpa).with_context(|| format!("reading memslot {slot}'s dirty log"))
        };
        Some(DirtyPages { data: read(data, DATA_SLOT, PAGES_IPA)?, tables: read(tables, TABLES_SLOT, PT_IPA)? })
    } else {
        None
    };
    let leaf = match args.scenario {
        Scenario::Stage1(p) => {
            let (leaf, _) = stage1_tables(p.af_clear)[3];
            Some(ram.load(PT_PA - RAM_PA + (leaf - PT_IPA), 8).context("leaf")?)
        }
        Scenario::Checksum => None,
    };
    let detach = session.detach().context("detaching")?;
    if checksum.is_none() && injected.is_none() && no_syndrome.is_none() {
        bail!("the guest never reported its result");
    }
    Ok(QemuReport {
        checksum,
        expected: matches!(args.scenario, Scenario::Checksum).then(predict),
        stage1_probe: match args.scenario {
            Scenario::Stage1(p) => Some(p),
            Scenario::Checksum => None,
        },
        injected,
        no_syndrome_exit: no_syndrome,
        dirty,
        faults,
        access_flag_faults,
        hardware_access_flag,
        young_leaves,
        exits,
        boot_to_result_ms: result_at.unwrap_or_default().as_millis() as u64,
        leaf,
        detach: detach.values,
        stalls: session.stalls(),
    })
}

/// What the guest did, from the UART.
struct Ran {
    checksum: Option<u64>,
    exits: Vec<MmioDone>,
    result_at: Option<Duration>,
    injected: Option<u64>,
    no_syndrome: Option<(u64, bool)>,
    faults: u64,
    access_flag_faults: u64,
    young_leaves: u64,
}

/// Reads the UART until the guest powers off (or stops), pausing where the
/// image says PAUSED until a line arrives on stdin.
fn run_guest(
    ram: &MappedRegion,
    qemu: &mut Qemu,
    started: Instant,
    mut next_line: impl FnMut(&str, &mut Qemu) -> anyhow::Result<String>,
) -> anyhow::Result<Ran> {
    let (mut checksum, mut exits, mut result_at, mut injected, mut no_syndrome) = (None, Vec::new(), None, None, None);
    let mut device = MmioDevice::default();
    let (mut access_flag_faults, mut young_leaves) = (0, 0);
    let faults = loop {
        let line = next_line("the guest to power off", qemu)?;
        if line.contains("FAULTLINE-EL2 PAUSED") {
            let at = dec_field(&line, "fault=").context("PAUSED line without fault")?;
            eprintln!("qemu-machine: paused before fault {at}");
            let _ = std::io::stdin().read_line(&mut String::new());
            mailbox_store(ram, mailbox::RESUME, mailbox::RESUME_VALUE);
        } else if line.contains("FAULTLINE-EL2 EXIT") {
            exits.push(emulate_exit(ram, &mut device, &line)?);
        } else if line.contains("FAULTLINE-EL2 RESULT") {
            checksum = hex_field(&line, "checksum=");
            result_at = Some(started.elapsed());
        } else if line.contains("FAULTLINE-EL2 POWEROFF") {
            access_flag_faults = dec_field(&line, "young=").context("POWEROFF line without young")?;
            young_leaves = dec_field(&line, "young_leaves=").context("POWEROFF line without young_leaves")?;
            break dec_field(&line, "faults=").context("POWEROFF line without faults")?;
        } else if line.contains("FAULTLINE-EL2 NOSYNDROME") {
            let ipa = hex_field(&line, "ipa=").context("NOSYNDROME line without ipa")?;
            no_syndrome = Some((ipa, dec_field(&line, "write=") == Some(1)));
            break dec_field(&line, "faults=").context("NOSYNDROME line without faults")?;
        } else if line.contains("FAULTLINE-EL2 INJECT") {
            injected = hex_field(&line, "far=");
            break dec_field(&line, "faults=").context("INJECT line without faults")?;
        } else if line.contains("FAULTLINE-EL2 ERROR") || line.contains("FAULTLINE-EL2 PANIC") {
            bail!("the EL2 image failed: {line}");
        }
    };
    Ok(Ran { checksum, exits, result_at, injected, no_syndrome, faults, access_flag_faults, young_leaves })
}

/// The VMM's half of an MMIO exit the image announced with `line`: reads
/// its record from the mailbox (once), lets the device take the store or
/// answer the load (its value into the record's data word), then answers
/// the image with the exit's number.
fn emulate_exit(ram: &MappedRegion, device: &mut MmioDevice, line: &str) -> anyhow::Result<MmioDone> {
    let seq = dec_field(line, "seq=").context("EXIT line without seq")?;
    let said_ipa = hex_field(line, "ipa=").context("EXIT line without ipa")?;
    let at = MAILBOX_PA - RAM_PA + mailbox::MMIO_EXIT;
    let words = [0, 1, 2].map(|i| ram.load(at + 8 * i, 8).expect("the mailbox is in RAM"));
    let exit = hyp_core::mmio::MmioExit::decode(words);
    if exit.ipa != said_ipa || ![1, 2, 4, 8].contains(&exit.len) || exit.is_write > 1 {
        bail!("the image's MMIO exit record {exit:?} does not match its EXIT line: {line}");
    }
    let write = exit.is_write == 1;
    let data = device.access(exit.ipa, write, exit.data);
    if !write {
        ram.store(at + 8, 8, data).expect("the mailbox is in RAM");
    }
    mailbox_store(ram, mailbox::MMIO_DONE, seq as u32);
    Ok((exit.ipa, write, exit.len, data))
}

fn guest_region(fd_index: u32, pa: u64, size: u64, page_size: u64, flags: u32) -> RegionDesc {
    RegionDesc { kind: RegionKind::Guest, flags, pa_base: pa, size, page_size, fd_index, fd_offset: pa - RAM_PA }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prediction_counts_blocks_pages_and_exits() {
        let p = predict();
        assert_eq!(p.faults, 1 + 8 + 32 + 2 + 1);
        assert_eq!(p.exits.len(), 2);
        assert_ne!(p.checksum, 0);
    }

    #[test]
    fn ready_lines_are_parsed_and_checked() {
        let line = "FAULTLINE-EL2 READY rings=0x40210000+0x10000 tables=0x40400000+0x400000 root=0x10000 mailbox=0x40200000 vttbr=0x1 ipa_bits=40";
        assert!(check_ready(line, IpaBits::Bits40).is_ok());
        assert!(check_ready(&line.replace("0x40210000", "0x40220000"), IpaBits::Bits40).is_err());
        assert!(check_ready(line, IpaBits::Bits48).is_err(), "the image built 40 bits");
        assert_eq!(hex_field("EXIT ipa=0x90000040 write=1", "ipa="), Some(0x9000_0040));
        assert_eq!(dec_field("EXIT ipa=0x90000040 write=1", "write="), Some(1));
    }
}
