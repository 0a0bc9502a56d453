//! The ring ABI: region layout and record formats, version 1.
//!
//! `docs/ring-abi.md` describes every offset here; the `const` assertions at
//! the bottom keep the two in step. All integers are little-endian.
//!
//! ```text
//! region:  [RegionHeader: 64 B][vCPU 0 fault ring][vCPU 0 command ring][vCPU 1 fault ring]...
//! ring:    [producer line: 64 B][consumer line: 64 B][records: entries x 64 B]
//! ```

use core::mem::{offset_of, size_of};

/// `RegionHeader::magic`: "FLTLINE1" read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"FLTLINE1");
/// The ABI version this crate speaks.
pub const ABI_VERSION: u32 = 1;
/// Bytes of one record: one cache line.
pub const RECORD_SIZE: usize = 64;
/// Bytes of the region header.
pub const HEADER_SIZE: usize = 64;
/// Bytes of a ring's control block: producer line + consumer line.
pub const RING_CONTROL_SIZE: usize = 128;
/// Offset of the producer index in a ring.
pub const PRODUCER_INDEX_OFFSET: usize = 0;
/// Offset of the producer's count of access-flag faults the core resolved
/// without a record (fault rings; a statistic for the daemon, next to the
/// producer index on the producer's line).
pub const PRODUCER_YOUNG_OFFSET: usize = 8;
/// Offset of the consumer index in a ring (its own cache line).
pub const CONSUMER_INDEX_OFFSET: usize = 64;
/// Offset of the consumer's "I am going to sleep" word, next to its index.
pub const CONSUMER_WAITING_OFFSET: usize = 68;
/// Smallest ring.
pub const MIN_RING_ENTRIES: u32 = 2;
/// Largest ring.
pub const MAX_RING_ENTRIES: u32 = 4096;
/// Most vCPUs a region describes.
pub const MAX_VCPUS: u32 = 256;

/// The header at offset 0 of a ring region. Written once by the region's
/// creator; a reader copies it once and validates it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct RegionHeader {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// vCPUs, each with a fault ring and a command ring.
    pub nr_vcpus: u32,
    /// Records per ring, a power of two.
    pub ring_entries: u32,
    /// [`RECORD_SIZE`].
    pub record_size: u32,
    /// Bytes per ring: `RING_CONTROL_SIZE + ring_entries * RECORD_SIZE`.
    pub ring_bytes: u32,
    /// Offset of the first ring: [`HEADER_SIZE`].
    pub rings_offset: u32,
    /// Reserved, zero.
    pub reserved: [u64; 4],
}

/// Which of a vCPU's two rings.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RingKind {
    /// Core to daemon: fault records and command results.
    Fault,
    /// Daemon to core: commands.
    Command,
}

impl RegionHeader {
    /// The header for `nr_vcpus` vCPUs with `ring_entries` records per ring.
    pub const fn new(nr_vcpus: u32, ring_entries: u32) -> Self {
        Self {
            magic: MAGIC,
            abi_version: ABI_VERSION,
            nr_vcpus,
            ring_entries,
            record_size: RECORD_SIZE as u32,
            ring_bytes: (RING_CONTROL_SIZE + ring_entries as usize * RECORD_SIZE) as u32,
            rings_offset: HEADER_SIZE as u32,
            reserved: [0; 4],
        }
    }

    /// Total bytes of a region with this header.
    pub const fn region_bytes(&self) -> u64 {
        HEADER_SIZE as u64 + 2 * self.nr_vcpus as u64 * self.ring_bytes as u64
    }

    /// Offset of `vcpu`'s ring of `kind` from the start of the region.
    pub const fn ring_offset(&self, vcpu: u32, kind: RingKind) -> u64 {
        let index = 2 * vcpu as u64
            + match kind {
                RingKind::Fault => 0,
                RingKind::Command => 1,
            };
        HEADER_SIZE as u64 + index * self.ring_bytes as u64
    }

    /// The header as the 8 little-endian words it occupies.
    pub const fn to_words(&self) -> [u64; 8] {
        [
            self.magic,
            self.abi_version as u64 | (self.nr_vcpus as u64) << 32,
            self.ring_entries as u64 | (self.record_size as u64) << 32,
            self.ring_bytes as u64 | (self.rings_offset as u64) << 32,
            self.reserved[0],
            self.reserved[1],
            self.reserved[2],
            self.reserved[3],
        ]
    }

    /// The header from its 8 words.
    pub const fn from_words(w: [u64; 8]) -> Self {
        Self {
            magic: w[0],
            abi_version: w[1] as u32,
            nr_vcpus: (w[1] >> 32) as u32,
            ring_entries: w[2] as u32,
            record_size: (w[2] >> 32) as u32,
            ring_bytes: w[3] as u32,
            rings_offset: (w[3] >> 32) as u32,
            reserved: [w[4], w[5], w[6], w[7]],
        }
    }

    /// Checks every field against this ABI and the region's real length.
    pub const fn validate(&self, region_len: u64) -> Result<(), HeaderError> {
        if self.magic != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if self.abi_version != ABI_VERSION {
            return Err(HeaderError::UnsupportedVersion(self.abi_version));
        }
        if self.nr_vcpus == 0 || self.nr_vcpus > MAX_VCPUS {
            return Err(HeaderError::BadVcpuCount(self.nr_vcpus));
        }
        if !self.ring_entries.is_power_of_two()
            || self.ring_entries < MIN_RING_ENTRIES
            || self.ring_entries > MAX_RING_ENTRIES
        {
            return Err(HeaderError::BadRingEntries(self.ring_entries));
        }
        let expect = Self::new(self.nr_vcpus, self.ring_entries);
        if self.record_size != expect.record_size
            || self.ring_bytes != expect.ring_bytes
            || self.rings_offset != expect.rings_offset
            || self.reserved[0] | self.reserved[1] | self.reserved[2] | self.reserved[3] != 0
        {
            return Err(HeaderError::BadGeometry);
        }
        if self.region_bytes() > region_len {
            return Err(HeaderError::RegionTooSmall { need: self.region_bytes(), have: region_len });
        }
        Ok(())
    }
}

/// Why a region header is refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HeaderError {
    /// The magic number is wrong: not a Faultline ring region.
    BadMagic,
    /// An ABI version this build does not speak.
    UnsupportedVersion(u32),
    /// vCPU count zero or above [`MAX_VCPUS`].
    BadVcpuCount(u32),
    /// Ring size not a power of two in range.
    BadRingEntries(u32),
    /// Record size, ring size, offsets or reserved fields disagree with this ABI.
    BadGeometry,
    /// The region is shorter than the header says.
    RegionTooSmall {
        /// Bytes the header needs.
        need: u64,
        /// Bytes the region has.
        have: u64,
    },
    /// The region's base is not 64-byte aligned.
    Misaligned,
}

/// One 64-byte record as copied out of (or into) a ring slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C, align(64))]
pub struct Record(pub [u64; 8]);

impl Record {
    /// The record kind: low 32 bits of word 0.
    pub const fn kind(&self) -> u32 {
        self.0[0] as u32
    }
}

/// Record kinds.
pub mod kind {
    /// Core to daemon: a stage-2 fault.
    pub const FAULT: u32 = 0x01;
    /// Core to daemon: the result of a command.
    pub const RESULT: u32 = 0x02;
    /// Core to daemon: one installed leaf, reported by [`LEAVES`] before
    /// its result.
    pub const LEAF: u32 = 0x03;
    /// Daemon to core: map (or relax) for an outstanding fault.
    pub const MAP: u32 = 0x10;
    /// Daemon to core: unmap an IPA range.
    pub const UNMAP: u32 = 0x11;
    /// Daemon to core: write-protect an IPA range.
    pub const WRITE_PROTECT: u32 = 0x12;
    /// Daemon to core: complete a fault without mapping.
    pub const COMPLETE: u32 = 0x13;
    /// Daemon to core: hand table pages to the memcache.
    pub const TOPUP: u32 = 0x14;
    /// Daemon to core: map a page no fault is waiting for (fault-around:
    /// pages next to a fault's, before the guest touches them). Validated
    /// as MAP is, except that it answers no fault; where anything is
    /// already mapped it changes nothing.
    pub const PREFAULT: u32 = 0x15;
    /// Daemon to core, control ring only: report the installed leaves of an
    /// IPA range, as [`LEAF`] records before the result (a restarted
    /// daemon rebuilds its records from them).
    pub const LEAVES: u32 = 0x16;
    /// Daemon to core: which pages of a PA range (at most 64) the
    /// hypervisor owns (table pages and the memcache), as a bitmap.
    pub const OWNED: u32 = 0x17;
    /// Daemon to core: test and clear the access flag of the leaves over an
    /// IPA range (at most [`MAX_AGED_PAGES`] pages); which pages were
    /// accessed since the last AGE, as a bitmap.
    pub const AGE: u32 = 0x18;
}

/// The most pages one AGE covers (its bitmap's bits).
pub const MAX_AGED_PAGES: u64 = 64;

/// Leaves a [`kind::LEAVES`] command reports at most (one ring's worth).
pub const MAX_LEAVES_PER_COMMAND: u32 = 4095;

/// Pages an [`kind::OWNED`] command asks about at most (one bitmap word).
pub const MAX_OWNED_PAGES: u64 = 64;

/// Leaf record layout (core to daemon): a run of installed stage-2 leaves,
/// sent in answer to [`kind::LEAVES`] before that command's result: `count`
/// leaves of `size` bytes with the same `flags`, IPA and PA advancing
/// together by `size` (a guest mapped in order is a few records, not one
/// per page).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct LeafRecord {
    /// [`kind::LEAF`].
    pub kind: u32,
    /// Permissions (R=1, W=2, X=4) | [`FLAG_DEVICE`], as a MAP's flags.
    pub flags: u32,
    /// The LEAVES command's `cmd_id`.
    pub cmd_id: u64,
    /// First IPA the leaf maps.
    pub ipa: u64,
    /// Its output PA.
    pub pa: u64,
    /// Bytes of each leaf: 4096, 2 MiB or 1 GiB.
    pub size: u64,
    /// Leaves in the run, at least 1.
    pub count: u64,
    /// Reserved, zero.
    pub reserved: [u64; 2],
}

/// Fault record layout (core to daemon).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct FaultRecord {
    /// [`kind::FAULT`].
    pub kind: u32,
    /// The faulting vCPU.
    pub vcpu: u32,
    /// Fault id, unique per VM, outstanding until completed.
    pub fault_id: u64,
    /// Raw ESR_EL2.
    pub esr: u64,
    /// Raw FAR_EL2.
    pub far: u64,
    /// Raw HPFAR_EL2.
    pub hpfar: u64,
    /// The faulting IPA as the core resolved it (from HPFAR, or by
    /// translating FAR when HPFAR is not valid); [`NO_IPA`] if unresolved.
    pub ipa: u64,
    /// The core's invalidation sequence when the fault was taken.
    pub inval_seq: u64,
    /// Core timestamp in nanoseconds.
    pub timestamp_ns: u64,
}

/// `FaultRecord::ipa` when the core could not resolve the IPA.
pub const NO_IPA: u64 = u64::MAX;

/// Command record layout (daemon to core). Unused fields must be zero.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct CommandRecord {
    /// One of the daemon-to-core [`kind`]s.
    pub kind: u32,
    /// MAP: permissions (R=1, W=2, X=4) | [`FLAG_DEVICE`]. COMPLETE: the action.
    pub flags: u32,
    /// The daemon's id for this command, echoed in the result.
    pub cmd_id: u64,
    /// MAP / COMPLETE: the fault being answered (PREFAULT: zero).
    pub fault_id: u64,
    /// MAP / PREFAULT / UNMAP / WRITE_PROTECT: first IPA.
    pub ipa: u64,
    /// MAP / PREFAULT / TOPUP: first PA.
    pub pa: u64,
    /// Bytes: mapping size, range length, or topped-up pages x 4096.
    pub size: u64,
    /// MAP: the invalidation sequence sampled before pinning.
    pub inval_seq: u64,
    /// Reserved, zero.
    pub reserved: u64,
}

/// MAP flag: device (nGnRE) memory.
pub const FLAG_DEVICE: u32 = 1 << 3;

/// COMPLETE actions.
pub mod action {
    /// Resume the vCPU; it retries the access.
    pub const RETRY: u32 = 0;
    /// Inject a synchronous external abort into the guest.
    pub const INJECT_ABORT: u32 = 1;
    /// Exit to the VMM to emulate the access (MMIO).
    pub const EXIT_TO_VMM: u32 = 2;
}

/// Result record layout (core to daemon): one per command.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct ResultRecord {
    /// [`kind::RESULT`].
    pub kind: u32,
    /// 0 for success, else a reject reason code.
    pub status: u32,
    /// The command's `cmd_id`.
    pub cmd_id: u64,
    /// The command's `fault_id`.
    pub fault_id: u64,
    /// The core's invalidation sequence after the command.
    pub inval_seq: u64,
    /// Command-specific: MAP outcome, leaves changed, memcache pages.
    pub value: u64,
    /// Command-specific detail (pages needed, tables freed, offending PA).
    pub detail: u64,
    /// The command's kind.
    pub command_kind: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// Reserved, zero.
    pub reserved1: u64,
}

impl LeafRecord {
    /// Packs the record into ring words.
    pub const fn encode(&self) -> Record {
        Record([
            self.kind as u64 | (self.flags as u64) << 32,
            self.cmd_id,
            self.ipa,
            self.pa,
            self.size,
            self.count,
            self.reserved[0],
            self.reserved[1],
        ])
    }

    /// Unpacks ring words; validation is the reader's.
    pub const fn decode(r: &Record) -> Self {
        let w = r.0;
        Self {
            kind: w[0] as u32,
            flags: (w[0] >> 32) as u32,
            cmd_id: w[1],
            ipa: w[2],
            pa: w[3],
            size: w[4],
            count: w[5],
            reserved: [w[6], w[7]],
        }
    }
}

impl FaultRecord {
    /// Packs the record into ring words.
    pub const fn encode(&self) -> Record {
        Record([
            self.kind as u64 | (self.vcpu as u64) << 32,
            self.fault_id,
            self.esr,
            self.far,
            self.hpfar,
            self.ipa,
            self.inval_seq,
            self.timestamp_ns,
        ])
    }

    /// Unpacks ring words; the kind is the caller's to check.
    pub const fn decode(r: &Record) -> Self {
        let w = r.0;
        Self {
            kind: w[0] as u32,
            vcpu: (w[0] >> 32) as u32,
            fault_id: w[1],
            esr: w[2],
            far: w[3],
            hpfar: w[4],
            ipa: w[5],
            inval_seq: w[6],
            timestamp_ns: w[7],
        }
    }
}

impl CommandRecord {
    /// Packs the record into ring words.
    pub const fn encode(&self) -> Record {
        Record([
            self.kind as u64 | (self.flags as u64) << 32,
            self.cmd_id,
            self.fault_id,
            self.ipa,
            self.pa,
            self.size,
            self.inval_seq,
            self.reserved,
        ])
    }

    /// Unpacks ring words; validation is the core's.
    pub const fn decode(r: &Record) -> Self {
        let w = r.0;
        Self {
            kind: w[0] as u32,
            flags: (w[0] >> 32) as u32,
            cmd_id: w[1],
            fault_id: w[2],
            ipa: w[3],
            pa: w[4],
            size: w[5],
            inval_seq: w[6],
            reserved: w[7],
        }
    }
}

impl ResultRecord {
    /// Packs the record into ring words.
    pub const fn encode(&self) -> Record {
        Record([
            self.kind as u64 | (self.status as u64) << 32,
            self.cmd_id,
            self.fault_id,
            self.inval_seq,
            self.value,
            self.detail,
            self.command_kind as u64 | (self.reserved0 as u64) << 32,
            self.reserved1,
        ])
    }

    /// Unpacks ring words; the kind is the caller's to check.
    pub const fn decode(r: &Record) -> Self {
        let w = r.0;
        Self {
            kind: w[0] as u32,
            status: (w[0] >> 32) as u32,
            cmd_id: w[1],
            fault_id: w[2],
            inval_seq: w[3],
            value: w[4],
            detail: w[5],
            command_kind: w[6] as u32,
            reserved0: (w[6] >> 32) as u32,
            reserved1: w[7],
        }
    }
}

// ---- The layout in docs/ring-abi.md, checked at compile time. ----
const _: () = {
    assert!(size_of::<Record>() == RECORD_SIZE);
    assert!(size_of::<RegionHeader>() == HEADER_SIZE);
    assert!(offset_of!(RegionHeader, magic) == 0);
    assert!(offset_of!(RegionHeader, abi_version) == 8);
    assert!(offset_of!(RegionHeader, nr_vcpus) == 12);
    assert!(offset_of!(RegionHeader, ring_entries) == 16);
    assert!(offset_of!(RegionHeader, record_size) == 20);
    assert!(offset_of!(RegionHeader, ring_bytes) == 24);
    assert!(offset_of!(RegionHeader, rings_offset) == 28);
    assert!(offset_of!(RegionHeader, reserved) == 32);

    assert!(size_of::<LeafRecord>() == RECORD_SIZE);
    assert!(offset_of!(LeafRecord, kind) == 0);
    assert!(offset_of!(LeafRecord, flags) == 4);
    assert!(offset_of!(LeafRecord, cmd_id) == 8);
    assert!(offset_of!(LeafRecord, ipa) == 16);
    assert!(offset_of!(LeafRecord, pa) == 24);
    assert!(offset_of!(LeafRecord, size) == 32);
    assert!(offset_of!(LeafRecord, count) == 40);
    assert!(offset_of!(LeafRecord, reserved) == 48);

    assert!(size_of::<FaultRecord>() == RECORD_SIZE);
    assert!(offset_of!(FaultRecord, kind) == 0);
    assert!(offset_of!(FaultRecord, vcpu) == 4);
    assert!(offset_of!(FaultRecord, fault_id) == 8);
    assert!(offset_of!(FaultRecord, esr) == 16);
    assert!(offset_of!(FaultRecord, far) == 24);
    assert!(offset_of!(FaultRecord, hpfar) == 32);
    assert!(offset_of!(FaultRecord, ipa) == 40);
    assert!(offset_of!(FaultRecord, inval_seq) == 48);
    assert!(offset_of!(FaultRecord, timestamp_ns) == 56);

    assert!(size_of::<CommandRecord>() == RECORD_SIZE);
    assert!(offset_of!(CommandRecord, kind) == 0);
    assert!(offset_of!(CommandRecord, flags) == 4);
    assert!(offset_of!(CommandRecord, cmd_id) == 8);
    assert!(offset_of!(CommandRecord, fault_id) == 16);
    assert!(offset_of!(CommandRecord, ipa) == 24);
    assert!(offset_of!(CommandRecord, pa) == 32);
    assert!(offset_of!(CommandRecord, size) == 40);
    assert!(offset_of!(CommandRecord, inval_seq) == 48);
    assert!(offset_of!(CommandRecord, reserved) == 56);

    assert!(size_of::<ResultRecord>() == RECORD_SIZE);
    assert!(offset_of!(ResultRecord, kind) == 0);
    assert!(offset_of!(ResultRecord, status) == 4);
    assert!(offset_of!(ResultRecord, cmd_id) == 8);
    assert!(offset_of!(ResultRecord, fault_id) == 16);
    assert!(offset_of!(ResultRecord, inval_seq) == 24);
    assert!(offset_of!(ResultRecord, value) == 32);
    assert!(offset_of!(ResultRecord, detail) == 40);
    assert!(offset_of!(ResultRecord, command_kind) == 48);
    assert!(offset_of!(ResultRecord, reserved0) == 52);
    assert!(offset_of!(ResultRecord, reserved1) == 56);

    assert!(RING_CONTROL_SIZE == 2 * RECORD_SIZE);
    assert!(CONSUMER_INDEX_OFFSET == 64 && CONSUMER_WAITING_OFFSET == 68 && PRODUCER_INDEX_OFFSET == 0);
    assert!(PRODUCER_YOUNG_OFFSET == 8 && PRODUCER_YOUNG_OFFSET % 8 == 0 && PRODUCER_YOUNG_OFFSET + 8 <= 64);
    assert!(MAGIC == 0x3145_4e49_4c54_4c46);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The word packing agrees with the `repr(C)` layout on a little-endian
    /// machine: each field lands at the byte offset the docs give.
    #[test]
    fn encode_places_fields_at_documented_byte_offsets() {
        let f = FaultRecord {
            kind: kind::FAULT,
            vcpu: 3,
            fault_id: 0x1111,
            esr: 0x2222,
            far: 0x3333,
            hpfar: 0x4444,
            ipa: 0x5555,
            inval_seq: 0x6666,
            timestamp_ns: 0x7777,
        };
        let mut bytes = [0u8; 64];
        for (i, w) in f.encode().0.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        assert_eq!((u32_at(0), u32_at(4)), (1, 3));
        assert_eq!((u64_at(8), u64_at(16), u64_at(24), u64_at(32)), (0x1111, 0x2222, 0x3333, 0x4444));
        assert_eq!((u64_at(40), u64_at(48), u64_at(56)), (0x5555, 0x6666, 0x7777));
        assert_eq!(FaultRecord::decode(&f.encode()), f);

        let c = CommandRecord {
            kind: kind::MAP,
            flags: 7,
            cmd_id: 9,
            fault_id: 8,
            ipa: 7,
            pa: 6,
            size: 5,
            inval_seq: 4,
            reserved: 0,
        };
        assert_eq!(c.encode().0[0], 0x7_0000_0010);
        assert_eq!(CommandRecord::decode(&c.encode()), c);
        let r =
            ResultRecord { kind: kind::RESULT, status: 10, command_kind: kind::MAP, value: 2, ..Default::default() };
        assert_eq!(r.encode().0[0], 0xa_0000_0002);
        assert_eq!(r.encode().0[6], 0x10);
        assert_eq!(ResultRecord::decode(&r.encode()), r);
    }

    #[test]
    fn header_validation_rejects_each_bad_field() {
        let good = RegionHeader::new(4, 64);
        let len = good.region_bytes();
        assert_eq!(len, 64 + 8 * (128 + 64 * 64));
        assert_eq!(good.validate(len), Ok(()));
        assert_eq!(RegionHeader::from_words(good.to_words()), good);
        let bad = |f: fn(&mut RegionHeader)| {
            let mut h = good;
            f(&mut h);
            h.validate(len)
        };
        assert_eq!(bad(|h| h.magic ^= 1), Err(HeaderError::BadMagic));
        assert_eq!(bad(|h| h.abi_version = 2), Err(HeaderError::UnsupportedVersion(2)));
        assert_eq!(bad(|h| h.nr_vcpus = 0), Err(HeaderError::BadVcpuCount(0)));
        assert_eq!(bad(|h| h.nr_vcpus = 1000), Err(HeaderError::BadVcpuCount(1000)));
        assert_eq!(bad(|h| h.ring_entries = 48), Err(HeaderError::BadRingEntries(48)));
        assert_eq!(bad(|h| h.ring_bytes += 64), Err(HeaderError::BadGeometry));
        assert_eq!(bad(|h| h.reserved[2] = 1), Err(HeaderError::BadGeometry));
        assert_eq!(good.validate(len - 1), Err(HeaderError::RegionTooSmall { need: len, have: len - 1 }));
        assert_eq!(good.ring_offset(1, RingKind::Command), 64 + 3 * (128 + 64 * 64));
    }
}
