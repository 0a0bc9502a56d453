//! The stage-1 probe's vocabulary, one copy for both machines: the
//! accesses the probe guest makes (KVM page_fault_test's), how its two
//! memslots are set up, which of them are punched, what the machine writes
//! before the guest runs, and the guest's stage-1 tables. `sim-machine
//! --stage1-probe` and `qemu-machine --stage1-probe` take the same
//! arguments through these types, so their reports compare row by row.

use std::os::fd::AsFd;

use anyhow::Context;
use faultline_attach::{MEMSLOT_DIRTY_LOG, MEMSLOT_READ_ONLY};
use faultline_board::{BLOCKS_IPA, PROBE_EXEC_CODE, PROBE_IPA, PROBE_MMIO_IPA, PT_IPA};
use serde::Serialize;

/// The probe's access (page_fault_test's guest accesses), in the order of
/// the image's mailbox codes (hyp-core/image/src/guest.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeAccess {
    /// LDR, 64 bits.
    Read64,
    /// STR, 64 bits.
    Write64,
    /// CAS: a read, then a write, neither with a valid syndrome.
    Cas,
    /// LDR with pre-index writeback (no valid syndrome).
    LdPreidx,
    /// STR with pre-index writeback (no valid syndrome).
    StPreidx,
    /// DC ZVA: a 64-byte write without a valid syndrome.
    DcZva,
    /// AT S1E1R: the stage-1 walk only.
    At,
    /// An instruction fetch from the probed word.
    Exec,
    /// A store to the MMIO page, then a load from it: two exits, data out
    /// and data in.
    Mmio,
}

impl ProbeAccess {
    /// The code the EL2 image's probe guest takes in x0.
    pub fn mailbox_code(self) -> u32 {
        self as u32
    }
}

/// How a memslot is set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotSetup {
    /// Writable, not logged.
    #[default]
    Plain,
    /// Read-only.
    ReadOnly,
    /// Dirty logging.
    DirtyLog,
    /// Read-only and dirty logging.
    ReadOnlyDirtyLog,
}

impl SlotSetup {
    /// The attach protocol's `MEMSLOT_*` flags.
    pub fn flags(self) -> u32 {
        match self {
            Self::Plain => 0,
            Self::ReadOnly => MEMSLOT_READ_ONLY,
            Self::DirtyLog => MEMSLOT_DIRTY_LOG,
            Self::ReadOnlyDirtyLog => MEMSLOT_READ_ONLY | MEMSLOT_DIRTY_LOG,
        }
    }

    /// Dirty logging is on.
    pub fn logged(self) -> bool {
        matches!(self, Self::DirtyLog | Self::ReadOnlyDirtyLog)
    }
}

/// The page size of the data and page-table memslots' backing (the
/// selftest's backing types): 4 KiB pages (anonymous, shmem), or 2 MiB
/// pages (THP, hugetlb), which the daemon maps with blocks where it may.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Backing {
    /// 4 KiB pages.
    #[default]
    #[value(name = "4k")]
    #[serde(rename = "4k")]
    Pages4k,
    /// 2 MiB pages.
    #[value(name = "2m")]
    #[serde(rename = "2m")]
    Pages2m,
}

impl Backing {
    /// Bytes per page.
    pub fn page_size(self) -> u64 {
        match self {
            Self::Pages4k => 4 << 10,
            Self::Pages2m => 2 << 20,
        }
    }
}

/// The guest's IPA space (the selftest's guest modes): KVM's default 40
/// bits (stage 2 starts at level 1, two concatenated root tables), or 48
/// bits (stage 2 starts at level 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum IpaBits {
    /// 40 bits.
    #[default]
    #[value(name = "40")]
    #[serde(rename = "40")]
    Bits40,
    /// 48 bits.
    #[value(name = "48")]
    #[serde(rename = "48")]
    Bits48,
}

impl IpaBits {
    /// The number of bits.
    pub fn bits(self) -> u32 {
        match self {
            Self::Bits40 => 40,
            Self::Bits48 => 48,
        }
    }
}

/// Which memslots' backing is punched before the guest runs (the
/// selftest's CMD_HOLE_DATA / CMD_HOLE_PT with userfaultfd handlers): the
/// machine moves the slot's contents to a file it hands the daemon as a
/// contents region and punches the guest memory, so the daemon must fill
/// each page from the file when it faults it in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Holes {
    /// Nothing punched.
    #[default]
    None,
    /// The data memslot.
    Data,
    /// The page-table memslot.
    Tables,
    /// Both.
    Both,
}

impl Holes {
    /// The data memslot is punched.
    pub fn data(self) -> bool {
        matches!(self, Self::Data | Self::Both)
    }

    /// The page-table memslot is punched.
    pub fn tables(self) -> bool {
        matches!(self, Self::Tables | Self::Both)
    }
}

/// What the probed word holds before the guest runs when the data memslot
/// is punched (as the selftest's data page holds its test data): a read
/// returning it shows the daemon filled the hole from the machine's file,
/// not with zeros.
pub const PROBE_CONTENTS: u64 = 0xc0_47e4_7500;

/// What the machine writes into the data memslot before the guest runs, as
/// `(IPA, bytes, value)` stores:
/// - exec: the code at the probed word ([`PROBE_EXEC_CODE`]);
/// - DC ZVA: the probed 64-byte block's eight words, none zero
///   (`PROBE_CONTENTS + i`), so that only zeroing reads back as zero;
/// - CAS: nothing: it expects 0, which a hole and its copy hold (as the
///   selftest's contents hold the CAS's expected old value);
/// - otherwise [`PROBE_CONTENTS`] at the probed word if the slot is to be
///   punched, else nothing (a never-written hole, zero-filled when faulted
///   in).
pub fn data_contents(access: ProbeAccess, holes: Holes) -> Vec<(u64, u8, u64)> {
    match access {
        ProbeAccess::Exec => {
            PROBE_EXEC_CODE.iter().enumerate().map(|(i, &w)| (PROBE_IPA + 4 * i as u64, 4, u64::from(w))).collect()
        }
        ProbeAccess::DcZva => (0..8).map(|i| ((PROBE_IPA & !63) + 8 * i, 8, PROBE_CONTENTS + i)).collect(),
        ProbeAccess::Cas => Vec::new(),
        _ if holes.data() => vec![(PROBE_IPA, 8, PROBE_CONTENTS)],
        _ => Vec::new(),
    }
}

/// Moves `[offset, offset + len)` of `memfd` into a new memfd (at offset 0)
/// and punches it out of `memfd`: the slot's pages become holes whose
/// contents the daemon must copy back from the returned file.
pub fn punch_to_contents(memfd: &memfd::Memfd, offset: u64, len: u64) -> anyhow::Result<std::fs::File> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::unix::fs::FileExt;
    let contents = memfd::MemfdOptions::default().create("faultline-contents")?.into_file();
    contents.set_len(len)?;
    let mut buf = vec![0u8; len as usize];
    memfd.as_file().read_exact_at(&mut buf, offset)?;
    contents.write_all_at(&buf, 0)?;
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(memfd.as_file().as_fd(), punch, offset as i64, len as i64).context("punching the slot's backing")?;
    Ok(contents)
}

/// An MMIO exit as the machines report it: `(IPA, write, bytes, data)`,
/// the data being the value the guest stored or the one the device
/// answered its load with.
pub type MmioDone = (u64, bool, u32, u64);

/// What an MMIO read returns besides the last value written (see
/// [`MmioDevice`]).
pub const MMIO_READ_TAG: u64 = 0x6d6d_696f_0000_0000;

/// The device both machines emulate behind every MMIO exit, the VMM's side
/// of it: one register that keeps the last value written to it, and
/// answers a read at `ipa` with `last ^ ipa ^ MMIO_READ_TAG` (zero before
/// any write). A value the guest reads back so shows both that the machine
/// supplied it and that the store before it reached the machine.
#[derive(Debug, Default)]
pub struct MmioDevice {
    last_written: u64,
}

impl MmioDevice {
    /// An MMIO exit at `ipa`: a write of `data`, or a read, whose value
    /// this returns (a write returns what it stored).
    pub fn access(&mut self, ipa: u64, is_write: bool, data: u64) -> u64 {
        match is_write {
            true => {
                self.last_written = data;
                data
            }
            false => self.last_written ^ ipa ^ MMIO_READ_TAG,
        }
    }
}

// One level-1 entry (one level-2 table) covers the code, the probed page
// and the MMIO page.
const _: () = assert!(PROBE_IPA >> 30 == BLOCKS_IPA >> 30 && PROBE_MMIO_IPA >> 30 == BLOCKS_IPA >> 30);
// The MMIO block is the level-2 table's last entry (its last 8 bytes).
const _: () = assert!((PROBE_MMIO_IPA >> 21) & 511 == 511);

/// The guest's stage-1 tables as `(IPA, descriptor)`: identity for the
/// code's 2 MiB block, the probed page (the leaf, index 3) and the MMIO
/// page's 2 MiB block, at the page-table memslot's IPAs. Both machines
/// write these before the guest runs (`faultline qemu` for the EL2 image).
pub fn stage1_tables(af_clear: bool) -> [(u64, u64); 5] {
    let (l1, l2, l3) = (PT_IPA, PT_IPA + 0x1000, PT_IPA + 0x2000);
    let page = PROBE_IPA & !0xfff;
    let (normal, af) = (3 << 8, 1 << 10);
    [
        (l1 + 8 * ((BLOCKS_IPA >> 30) & 511), l2 | 3),
        (l2 + 8 * ((BLOCKS_IPA >> 21) & 511), BLOCKS_IPA | normal | af | 1),
        (l2 + 8 * ((page >> 21) & 511), l3 | 3),
        (l3 + 8 * ((page >> 12) & 511), page | normal | if af_clear { 0 } else { af } | 3),
        (l2 + 8 * ((PROBE_MMIO_IPA >> 21) & 511), PROBE_MMIO_IPA | normal | af | 1),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_codes_are_the_images_mailbox_codes() {
        assert_eq!(ProbeAccess::Exec.mailbox_code(), faultline_board::mailbox::PROBE_ACCESS_EXEC);
        assert_eq!(ProbeAccess::Read64.mailbox_code(), 0);
        assert_eq!(ProbeAccess::Write64.mailbox_code(), 1);
    }
}
