//! KVM's page_fault_test matrix (issue 6) as one table, run on both
//! machines: the simulated machine in `cargo test` (tests/tests/conformance.rs)
//! and the EL2 image under QEMU in `.ci/run` (tests/tests/el2_qemu.rs). Each
//! row is a stage-1 probe: the guest turns its MMU on with its page tables
//! in their own memslot and makes one access; both machines take the same
//! arguments and print the same report.

use faultline_proto::v1::{FaultEvent, Outcome};

/// What a probe row ends with.
#[derive(Debug, Clone, Copy)]
pub enum End {
    /// The guest reported this value, computed from memory after its access
    /// (see `faultline_board::PROBE_MAGIC`), or PAR_EL1 for AT.
    Value(u64),
    /// A write64 exit (valid syndrome) at this IPA, its data the value
    /// stored, emulated by the machine; then the value the guest read back
    /// from memory.
    Mmio(u64, u64),
    /// The MMIO probe: a store to the machine's device (an exit carrying
    /// the value stored), then a load it answers (an exit), whose value the
    /// guest reports.
    Device(u64),
    /// An exit without a valid syndrome at this IPA: the vCPU stops, as
    /// KVM_RUN fails with ENOSYS.
    NoSyndrome(u64),
    /// An abort injected into the guest (the walk needed to write a read-only table).
    Injected,
}

/// One row: the guest turns its MMU on with its page tables in their own
/// memslot and makes one access.
pub struct ProbeRow {
    /// The probe's arguments, the same for `sim-machine` and `faultline qemu`.
    pub args: &'static [&'static str],
    /// Stage-2 faults: code block, the table pages walked, the data page,
    /// plus an access-flag update when the walker had to write a read-only
    /// table, or a read then a write (CAS).
    pub faults: u64,
    /// How the guest ends.
    pub end: End,
    /// Relaxations (an access-flag update on a logged table page).
    pub relaxed: u64,
    /// Faults that found a hole in the backing and filled it: the
    /// selftest's userfaultfd faults. The data page is a never-written hole
    /// unless the machine wrote it (the exec probe's code, DC ZVA's block,
    /// or contents to be punched); punched table pages are three (root, level 2, level 3: the
    /// selftest's guest keeps one table page in its PT memslot, so it
    /// counts one).
    pub populated: u64,
}

/// The matrix.
pub fn rows() -> Vec<ProbeRow> {
    const PROBE: u64 = 0x8400_0008;
    /// PAR_EL1 of AT S1E1R on the probe: PA 0x8400_0000, inner shareable
    /// (SH 0b11 at [8:7]), attributes 0xff (write-back) at [63:56].
    const PAR: u64 = 0xff00_0000_8400_0b80;
    /// What the probed word holds when the data memslot is punched.
    const PUNCHED: u64 = faultline_probe::PROBE_CONTENTS;
    /// What the write probes store at the probe (and read back).
    const WRITTEN: u64 = PROBE ^ faultline_board::PROBE_MAGIC;
    /// What the exec probe's code returns.
    const EXEC: u64 = faultline_board::PROBE_EXEC_IMM as u64;
    /// What the MMIO probe's load returns: the device answers a read with
    /// the last value written ^ the address ^ its tag.
    const DEVICE: u64 = WRITTEN ^ faultline_board::PROBE_MMIO_IPA ^ faultline_probe::MMIO_READ_TAG;
    use End::*;
    vec![
        // Every access, plain memslots.
        ProbeRow { args: &["--stage1-probe", "read64"], faults: 5, end: Value(0), relaxed: 0, populated: 1 },
        ProbeRow { args: &["--stage1-probe", "write64"], faults: 5, end: Value(WRITTEN), relaxed: 0, populated: 1 },
        ProbeRow { args: &["--stage1-probe", "cas"], faults: 5, end: Value(WRITTEN), relaxed: 0, populated: 1 },
        ProbeRow { args: &["--stage1-probe", "ld-preidx"], faults: 5, end: Value(PROBE), relaxed: 0, populated: 1 },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx"],
            faults: 5,
            end: Value(WRITTEN ^ PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow { args: &["--stage1-probe", "dc-zva"], faults: 5, end: Value(0), relaxed: 0, populated: 0 },
        // AT walks stage 1 only: the table pages fault, the data page does not.
        ProbeRow { args: &["--stage1-probe", "at"], faults: 4, end: Value(PAR), relaxed: 0, populated: 0 },
        ProbeRow { args: &["--stage1-probe", "exec"], faults: 5, end: Value(EXEC), relaxed: 0, populated: 0 },
        // The access flag clear in the leaf (the selftest's first rows,
        // with_af): the walker sets it through the writable table page.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--af-clear"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "ld-preidx", "--af-clear"],
            faults: 5,
            end: Value(PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--af-clear"],
            faults: 5,
            end: Value(WRITTEN),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--af-clear"],
            faults: 5,
            end: Value(WRITTEN),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx", "--af-clear"],
            faults: 5,
            end: Value(WRITTEN ^ PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--af-clear"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "exec", "--af-clear"],
            faults: 5,
            end: Value(EXEC),
            relaxed: 0,
            populated: 0,
        },
        // A read-only data memslot: reads, AT and fetches are mapped; a
        // write with a syndrome exits to the VMM; accesses without one (CAS,
        // pre-index store, DC ZVA) stop the vCPU.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--data", "read-only", "--tables", "read-only"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--data", "read-only", "--tables", "read-only"],
            faults: 6,
            end: Mmio(0, PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--data", "read-only", "--tables", "read-only"],
            faults: 6,
            end: NoSyndrome(PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "ld-preidx", "--data", "read-only", "--tables", "read-only"],
            faults: 5,
            end: Value(PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx", "--data", "read-only", "--tables", "read-only"],
            faults: 5,
            end: NoSyndrome(PROBE),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--data", "read-only", "--tables", "read-only"],
            faults: 5,
            end: NoSyndrome(PROBE & !63),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "at", "--data", "read-only", "--tables", "read-only"],
            faults: 4,
            end: Value(PAR),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "exec", "--data", "read-only", "--tables", "read-only"],
            faults: 5,
            end: Value(EXEC),
            relaxed: 0,
            populated: 0,
        },
        // Logged tables, access flag clear: the walk maps the table page
        // read-only; the hardware AF update is a permission fault on the
        // walk, a write: relaxed in place (and the table page dirtied).
        ProbeRow {
            args: &["--stage1-probe", "write64", "--af-clear", "--tables", "dirty-log"],
            faults: 6,
            end: Value(WRITTEN),
            relaxed: 1,
            populated: 1,
        },
        // Dirty logging on the data and table memslots (the selftest's
        // dirty_log rows): pages are mapped read-only first, so writes and
        // the walker's AF updates fault once more and set their bits.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "read64", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(0),
            relaxed: 1,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Value(WRITTEN),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(WRITTEN),
            relaxed: 1,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(WRITTEN),
            relaxed: 1,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Value(WRITTEN ^ PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "exec", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(EXEC),
            relaxed: 1,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "ld-preidx", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(PROBE),
            relaxed: 1,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "at", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 4,
            end: Value(PAR),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 7,
            end: Value(WRITTEN),
            relaxed: 2,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(0),
            relaxed: 1,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 6,
            end: Value(WRITTEN ^ PROBE),
            relaxed: 1,
            populated: 1,
        },
        // Read-only and logged data and tables (the selftest's
        // TEST_RO_MEMSLOT_AND_DIRTY_LOG): as read-only alone, and nothing
        // is dirtied.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--data", "read-only-dirty-log", "--tables", "read-only-dirty-log"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "ld-preidx", "--data", "read-only-dirty-log", "--tables", "read-only-dirty-log"],
            faults: 5,
            end: Value(PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "at", "--data", "read-only-dirty-log", "--tables", "read-only-dirty-log"],
            faults: 4,
            end: Value(PAR),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "exec", "--data", "read-only-dirty-log", "--tables", "read-only-dirty-log"],
            faults: 5,
            end: Value(EXEC),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--data", "read-only-dirty-log", "--tables", "read-only-dirty-log"],
            faults: 6,
            end: Mmio(0, PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--data", "read-only-dirty-log", "--tables", "read-only-dirty-log"],
            faults: 5,
            end: NoSyndrome(PROBE & !63),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--data", "read-only-dirty-log", "--tables", "read-only-dirty-log"],
            faults: 6,
            end: NoSyndrome(PROBE),
            relaxed: 0,
            populated: 1,
        },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx", "--data", "read-only-dirty-log", "--tables", "read-only-dirty-log"],
            faults: 5,
            end: NoSyndrome(PROBE),
            relaxed: 0,
            populated: 0,
        },
        // Tables in a read-only memslot: walks read them, so it works
        // (KVM since 6.2: only a permission fault on a walk is a write) ...
        ProbeRow {
            args: &["--stage1-probe", "read64", "--tables", "read-only"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
            populated: 1,
        },
        // ... until the walker must write one: injected into the guest.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--af-clear", "--tables", "read-only"],
            faults: 5,
            end: Injected,
            relaxed: 0,
            populated: 0,
        },
        // Data and table memslots punched (the selftest's TEST_UFFD): every
        // page the access reaches is filled from the machine's copy: the
        // three table pages always (the walk), the data page when the
        // access maps it (not AT). Reads see the punched contents.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--holes", "both"],
            faults: 5,
            end: Value(PUNCHED),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "read64", "--af-clear", "--holes", "both"],
            faults: 5,
            end: Value(PUNCHED),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--af-clear", "--holes", "both"],
            faults: 5,
            end: Value(WRITTEN),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "at", "--holes", "both"],
            faults: 4,
            end: Value(PAR),
            relaxed: 0,
            populated: 3,
        },
        ProbeRow {
            args: &["--stage1-probe", "ld-preidx", "--af-clear", "--holes", "both"],
            faults: 5,
            end: Value(PUNCHED ^ PROBE),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--af-clear", "--holes", "both"],
            faults: 5,
            end: Value(WRITTEN),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--af-clear", "--holes", "both"],
            faults: 5,
            end: Value(0),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx", "--af-clear", "--holes", "both"],
            faults: 5,
            end: Value(WRITTEN ^ PROBE),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "exec", "--af-clear", "--holes", "both"],
            faults: 5,
            end: Value(EXEC),
            relaxed: 0,
            populated: 4,
        },
        // Punched and logged (TEST_UFFD_AND_DIRTY_LOG): filled as above,
        // dirtied as the dirty-log rows.
        ProbeRow {
            args: &[
                "--stage1-probe",
                "read64",
                "--af-clear",
                "--data",
                "dirty-log",
                "--tables",
                "dirty-log",
                "--holes",
                "both",
            ],
            faults: 6,
            end: Value(PUNCHED),
            relaxed: 1,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "read64", "--data", "dirty-log", "--tables", "dirty-log", "--holes", "both"],
            faults: 5,
            end: Value(PUNCHED),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &[
                "--stage1-probe",
                "ld-preidx",
                "--af-clear",
                "--data",
                "dirty-log",
                "--tables",
                "dirty-log",
                "--holes",
                "both",
            ],
            faults: 6,
            end: Value(PUNCHED ^ PROBE),
            relaxed: 1,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "at", "--data", "dirty-log", "--tables", "dirty-log", "--holes", "both"],
            faults: 4,
            end: Value(PAR),
            relaxed: 0,
            populated: 3,
        },
        ProbeRow {
            args: &[
                "--stage1-probe",
                "exec",
                "--af-clear",
                "--data",
                "dirty-log",
                "--tables",
                "dirty-log",
                "--holes",
                "both",
            ],
            faults: 6,
            end: Value(EXEC),
            relaxed: 1,
            populated: 4,
        },
        ProbeRow {
            args: &[
                "--stage1-probe",
                "write64",
                "--af-clear",
                "--data",
                "dirty-log",
                "--tables",
                "dirty-log",
                "--holes",
                "both",
            ],
            faults: 6,
            end: Value(WRITTEN),
            relaxed: 1,
            populated: 4,
        },
        ProbeRow {
            args: &[
                "--stage1-probe",
                "cas",
                "--af-clear",
                "--data",
                "dirty-log",
                "--tables",
                "dirty-log",
                "--holes",
                "both",
            ],
            faults: 7,
            end: Value(WRITTEN),
            relaxed: 2,
            populated: 4,
        },
        ProbeRow {
            args: &[
                "--stage1-probe",
                "dc-zva",
                "--af-clear",
                "--data",
                "dirty-log",
                "--tables",
                "dirty-log",
                "--holes",
                "both",
            ],
            faults: 6,
            end: Value(0),
            relaxed: 1,
            populated: 4,
        },
        ProbeRow {
            args: &[
                "--stage1-probe",
                "st-preidx",
                "--af-clear",
                "--data",
                "dirty-log",
                "--tables",
                "dirty-log",
                "--holes",
                "both",
            ],
            faults: 6,
            end: Value(WRITTEN ^ PROBE),
            relaxed: 1,
            populated: 4,
        },
        // AT with AF clear: whether the walk sets AF is IMPDEF (the selftest
        // skips it without logging); QEMU's does, and so does the model.
        ProbeRow {
            args: &[
                "--stage1-probe",
                "at",
                "--af-clear",
                "--data",
                "dirty-log",
                "--tables",
                "dirty-log",
                "--holes",
                "both",
            ],
            faults: 5,
            end: Value(PAR),
            relaxed: 1,
            populated: 3,
        },
        // Punched and read-only (TEST_RO_MEMSLOT_AND_UFFD,
        // _NO_SYNDROME_AND_UFFD): as read-only alone; the data page is
        // filled only when an access maps it (reads, fetches, CAS's read).
        // The selftest counts one more for write64 because its MMIO handler
        // writes the page from the host; these machines complete the exit
        // without touching it.
        ProbeRow {
            args: &["--stage1-probe", "read64", "--data", "read-only", "--tables", "read-only", "--holes", "both"],
            faults: 5,
            end: Value(PUNCHED),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "ld-preidx", "--data", "read-only", "--tables", "read-only", "--holes", "both"],
            faults: 5,
            end: Value(PUNCHED ^ PROBE),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "at", "--data", "read-only", "--tables", "read-only", "--holes", "both"],
            faults: 4,
            end: Value(PAR),
            relaxed: 0,
            populated: 3,
        },
        ProbeRow {
            args: &["--stage1-probe", "exec", "--data", "read-only", "--tables", "read-only", "--holes", "both"],
            faults: 5,
            end: Value(EXEC),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "write64", "--data", "read-only", "--tables", "read-only", "--holes", "both"],
            faults: 6,
            end: Mmio(PUNCHED, PROBE),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "cas", "--data", "read-only", "--tables", "read-only", "--holes", "both"],
            faults: 6,
            end: NoSyndrome(PROBE),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "dc-zva", "--data", "read-only", "--tables", "read-only", "--holes", "both"],
            faults: 5,
            end: NoSyndrome(PROBE & !63),
            relaxed: 0,
            populated: 3,
        },
        ProbeRow {
            args: &["--stage1-probe", "st-preidx", "--data", "read-only", "--tables", "read-only", "--holes", "both"],
            faults: 5,
            end: NoSyndrome(PROBE),
            relaxed: 0,
            populated: 3,
        },
        // MMIO both ways: the store's value reaches the machine, the load
        // returns the machine's answer. The walk stops at the level-2
        // block, so the probed page's leaf keeps its access flag as
        // written, clear or set.
        ProbeRow { args: &["--stage1-probe", "mmio"], faults: 5, end: Device(DEVICE), relaxed: 0, populated: 0 },
        ProbeRow {
            args: &["--stage1-probe", "mmio", "--af-clear", "--data", "dirty-log", "--tables", "dirty-log"],
            faults: 5,
            end: Device(DEVICE),
            relaxed: 0,
            populated: 0,
        },
        ProbeRow {
            args: &["--stage1-probe", "mmio", "--data", "read-only", "--tables", "read-only", "--holes", "both"],
            faults: 5,
            end: Device(DEVICE),
            relaxed: 0,
            populated: 2,
        },
        // One memslot punched at a time.
        ProbeRow {
            args: &["--stage1-probe", "write64", "--holes", "tables"],
            faults: 5,
            end: Value(WRITTEN),
            relaxed: 0,
            populated: 4,
        },
        ProbeRow {
            args: &["--stage1-probe", "exec", "--holes", "data"],
            faults: 5,
            end: Value(EXEC),
            relaxed: 0,
            populated: 1,
        },
    ]
}

/// A configuration the matrix runs in (the selftest's backing types and
/// guest modes): the page size of the data and page-table memslots'
/// backing, and the IPA space.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// `4k` or `2m`.
    pub backing: &'static str,
    /// `40` or `48`.
    pub ipa_bits: &'static str,
}

/// Every configuration: 4 KiB and 2 MiB pages, 40- and 48-bit IPA.
pub const CONFIGS: [Config; 4] = [
    Config { backing: "4k", ipa_bits: "40" },
    Config { backing: "2m", ipa_bits: "40" },
    Config { backing: "4k", ipa_bits: "48" },
    Config { backing: "2m", ipa_bits: "48" },
];

impl Config {
    /// The machines' arguments for it.
    pub fn args(&self) -> [&'static str; 4] {
        ["--backing", self.backing, "--ipa-bits", self.ipa_bits]
    }

    /// Whether the daemon maps memslot `flag` (`--data` or `--tables`) of
    /// `row` with 2 MiB blocks: 2 MiB pages, unless the slot is logged
    /// (dirty logging forces 4 KiB, as in KVM; a read-only slot is mapped
    /// at block size).
    pub fn blocks(&self, row: &ProbeRow, flag: &str) -> bool {
        self.backing == "2m" && !logs(row, flag)
    }
}

/// Checks one row's report (the machine's JSON) and the daemon's events for
/// it (oldest first) against the row, in configuration `config`. The rows'
/// counts are for 4 KiB pages; with 2 MiB blocks for the page tables, the
/// first table page's fault maps all three (the selftest's THP and hugetlb
/// runs count one), so the later table pages neither fault nor fill, and a
/// block always fills what the machine left a hole.
pub fn check(row: &ProbeRow, config: Config, report: &serde_json::Value, events: &[FaultEvent]) {
    use End::*;
    let name = format!("{} (backing {}, {}-bit IPA)", row.args.join(" "), config.backing, config.ipa_bits);
    let has = |a: &str| row.args.contains(&a);
    // The MMIO page is a level-2 block: its walk never reaches the probed
    // page's level-3 table.
    let walks_leaf = !has("mmio");
    let table_pages: &[u64] =
        if walks_leaf { &[0x8800_0000, 0x8800_1000, 0x8800_2000] } else { &[0x8800_0000, 0x8800_1000] };
    let tables_in_block = config.blocks(row, "--tables");
    let tables: &[u64] = if tables_in_block { &table_pages[..1] } else { table_pages };
    let table_faults_saved = (table_pages.len() - tables.len()) as u64;
    let holes = |slot: &str| row.args.windows(2).any(|w| w[0] == "--holes" && (w[1] == slot || w[1] == "both"));
    let faults = row.faults - table_faults_saved;
    assert_eq!(report["faults"], faults, "{name}");
    assert_eq!(report["detach"][1], 0, "{name}: pins remaining");
    const WRITTEN: u64 = 0x8400_0008 ^ faultline_board::PROBE_MAGIC;
    const MMIO: u64 = faultline_board::PROBE_MMIO_IPA;
    let (value, exits, no_syndrome, injected) = match row.end {
        Value(v) => (Some(v), vec![], None, false),
        // The exit carries the 8 bytes stored.
        Mmio(v, ipa) => (Some(v), vec![serde_json::json!([ipa, true, 8, WRITTEN])], None, false),
        Device(v) => (
            Some(v),
            vec![serde_json::json!([MMIO, true, 8, WRITTEN]), serde_json::json!([MMIO, false, 8, v])],
            None,
            false,
        ),
        NoSyndrome(ipa) => (None, vec![], Some(serde_json::json!([ipa, true])), false),
        Injected => (None, vec![], None, true),
    };
    assert_eq!(report["checksum"].as_u64(), value, "{name}");
    assert_eq!(report["exits"].as_array().unwrap(), &exits, "{name}");
    assert_eq!(report["no_syndrome_exit"], no_syndrome.unwrap_or(serde_json::Value::Null), "{name}");
    assert_eq!(!report["injected"].is_null(), injected, "{name}");
    // The leaf after the run (guest_check_pte_af): as the machine wrote it
    // (normal memory, a page, the probed page's address), its access flag
    // set unless it was written clear and the walker could not set it.
    let af = !has("--af-clear") || (walks_leaf && !injected);
    // (A punched table page the walk never reached is still a hole, unless
    // a block filled it with the rest.)
    let leaf = match holes("tables") && !walks_leaf && !tables_in_block {
        true => 0,
        false => 0x8400_0000 | 3 << 8 | 3 | u64::from(af) << 10,
    };
    assert_eq!(report["leaf"], leaf, "{name}: the probed page's leaf (access flag {af})");

    assert_eq!(events.len() as u64, faults, "{name}");
    // The first fault, the code's first fetch, finds the stage-2 root
    // empty: level 1 of two concatenated roots at 40 bits, level 0 at 48.
    let root_level = if config.ipa_bits == "48" { 0 } else { 1 };
    assert_eq!((events[0].kind, events[0].level), (1, root_level), "{name}: the first fault's level");
    let s1ptw = |e: &FaultEvent| e.esr >> 7 & 1 == 1;
    // The table pages each faulted on a walk (S1PTW set by the CPU).
    let walked: Vec<u64> = events.iter().filter(|e| s1ptw(e) && e.kind == 1).map(|e| e.ipa & !0xfff).collect();
    assert_eq!(walked, tables, "{name}");
    // Each memslot's pages are mapped at the size the configuration allows.
    use faultline_proto::v1::MappingSize;
    let size = |block: bool| if block { MappingSize::MappingSize2m } else { MappingSize::MappingSize4k } as i32;
    for e in events.iter().filter(|e| e.outcome == Outcome::Mapped as i32) {
        let want = match e.ipa {
            0x8400_0000..0x8420_0000 => size(config.blocks(row, "--data")),
            0x8800_0000..0x8820_0000 => size(tables_in_block),
            _ => continue,
        };
        assert_eq!(e.mapping_size, want, "{name}: mapping of {:#x}", e.ipa);
    }
    // Table pages are never mapped executable, whatever walked them.
    assert!(events.iter().filter(|e| s1ptw(e)).all(|e| e.permissions & 4 == 0), "{name}");
    let relaxed = events.iter().filter(|e| e.outcome == Outcome::Relaxed as i32).count() as u64;
    assert_eq!(relaxed, row.relaxed, "{name}");
    if row.args.contains(&"--af-clear") && row.relaxed > 0 {
        let update = events.iter().find(|e| e.outcome == Outcome::Relaxed as i32 && s1ptw(e)).unwrap();
        // HPFAR gives the table page; the low bits are the VA's (as KVM composes it).
        assert_eq!(update.ipa & !0xfff, 0x8800_2000, "{name}: the walker's AF write to the L3 table");
    }
    // Holes filled (the selftest's userfaultfd faults): each page once, by
    // the first fault that maps it. The data page is a hole unless the
    // machine wrote it unpunched (the exec probe's code, DC ZVA's block);
    // table pages are holes only when punched. A 2 MiB block always finds
    // holes: the machines write a few words of it at most.
    let maps_data = match row.end {
        Value(_) => !has("at"),
        NoSyndrome(_) => has("cas"),
        // The guest reads the word back after the exit.
        Mmio(..) => true,
        Device(_) | Injected => false,
    };
    // The machine writes the exec probe's code and DC ZVA's block.
    let data_hole = holes("data") || !(has("exec") || has("dc-zva"));
    let data_filled = maps_data && (data_hole || config.blocks(row, "--data"));
    let tables_filled = match (tables_in_block, holes("tables")) {
        (true, _) => 1,
        (false, true) => tables.len(),
        (false, false) => 0,
    };
    if config.backing == "4k" {
        assert_eq!(data_filled as u64 + tables_filled as u64, row.populated, "{name}: the row's holes filled");
    }
    let populated = |lo: u64, hi: u64| events.iter().filter(|e| e.populated && (lo..hi).contains(&e.ipa)).count();
    // (The code block is the machine's business: the simulator never writes it.)
    let in_slots = populated(0x8400_0000, 0x8480_0000) + populated(0x8800_0000, 0x8820_0000);
    assert_eq!(in_slots, data_filled as usize + tables_filled, "{name}: holes filled in the data and table memslots");
    assert_eq!(populated(0x8800_0000, 0x8820_0000), tables_filled, "{name}: table pages filled");
    assert_eq!(populated(0x8400_0000, 0x8400_1000), data_filled as usize, "{name}: data page filled");
    let last = events.last().unwrap();
    match row.end {
        Injected => assert!(s1ptw(last) && last.outcome == Outcome::InjectedAbort as i32, "{name}"),
        NoSyndrome(_) => assert_eq!(last.outcome, Outcome::NoSyndromeExit as i32, "{name}"),
        // Both accesses exit.
        Device(_) => {
            let exits = &events[events.len() - 2..];
            assert!(exits.iter().all(|e| e.outcome == Outcome::MmioExit as i32 && e.ipa == MMIO), "{name}");
        }
        // The write exits; the read back maps the page.
        Mmio(..) => {
            let exit = &events[events.len() - 2];
            assert_eq!((exit.outcome, last.outcome), (Outcome::MmioExit as i32, Outcome::Mapped as i32), "{name}");
        }
        // The access itself was resolved: mapped, or relaxed after a read (CAS).
        Value(_) => {
            assert!([Outcome::Mapped, Outcome::Relaxed].iter().any(|o| last.outcome == *o as i32), "{name}")
        }
    }
}

/// The setup the row gives memslot `flag` (`--data` or `--tables`).
fn setup<'a>(row: &'a ProbeRow, flag: &str) -> &'a str {
    row.args.windows(2).find(|w| w[0] == flag).map_or("plain", |w| w[1])
}

/// Whether the row logs memslot `flag` (`--data` or `--tables`).
pub fn logs(row: &ProbeRow, flag: &str) -> bool {
    setup(row, flag).ends_with("dirty-log")
}

/// Dirty logging, for each memslot the row logs (`None`: not logged), the
/// dirty pages' IPAs: the data page is dirty iff the access writes it and
/// the memslot is writable; the last-level table page iff the walker set
/// its access flag and that memslot is writable.
pub fn check_dirty(row: &ProbeRow, data: Option<&[u64]>, tables: Option<&[u64]>) {
    let name = row.args.join(" ");
    assert_eq!((data.is_some(), tables.is_some()), (logs(row, "--data"), logs(row, "--tables")), "{name}");
    let has = |a: &str| row.args.contains(&a);
    let writable = |flag: &str| !setup(row, flag).starts_with("read-only");
    let writes = writable("--data") && ["write64", "cas", "st-preidx", "dc-zva"].iter().any(|a| has(a));
    let want_data: &[u64] = if writes { &[0x8400_0000] } else { &[] };
    // (The MMIO probe's walk ends at a level-2 block: no leaf to update.)
    let sets_af = has("--af-clear") && !has("mmio");
    let want_tables: &[u64] = if sets_af && writable("--tables") { &[0x8800_2000] } else { &[] };
    let want = (data.map(|_| want_data), tables.map(|_| want_tables));
    assert_eq!((data, tables), want, "{name}: dirty pages (data, tables)");
}

/// True if the row logs either memslot (so [`check_dirty`] applies).
pub fn logs_any(row: &ProbeRow) -> bool {
    logs(row, "--data") || logs(row, "--tables")
}

/// The events the daemon recorded since the last call (`seen` counts them).
pub async fn new_events(
    client: &mut faultline_proto::v1::fault_trace_client::FaultTraceClient<tonic::transport::Channel>,
    seen: &mut usize,
) -> Vec<FaultEvent> {
    use faultline_proto::v1::{observe_response::ResponseTypes, ObserveRequest};
    let mut stream = client.observe(ObserveRequest::default()).await.unwrap().into_inner();
    let mut events: Vec<FaultEvent> = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        if let Some(ResponseTypes::Fault(e)) = r.response_types {
            events.push(e);
        }
    }
    let events = events.split_off(*seen);
    *seen += events.len();
    events
}
