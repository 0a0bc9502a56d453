//! Why the core refused a command: one enum with a stable ABI code per
//! reason, carried in `ResultRecord::status`.

use crate::stage2::TableError;

/// A rejected command's reason. The discriminant is the ABI code.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum Reject {
    /// Unknown kind, unknown flag bits, or a nonzero reserved/unused field.
    Malformed = 1,
    /// The fault id is not outstanding on this vCPU.
    UnknownFault = 2,
    /// The faulting IPA is not inside the range the map covers.
    FaultOutsideRange = 3,
    /// The size is not 4 KiB, 2 MiB or 1 GiB.
    BadSize = 4,
    /// IPA or PA not aligned to the size.
    Misaligned = 5,
    /// The IPA range lies outside the VM's IPA space.
    IpaOutOfRange = 6,
    /// The PA range lies outside the physical address space.
    PaOutOfRange = 7,
    /// Some page of the PA range is not owned by this VM (or, for a
    /// top-up, not by the host).
    NotOwned = 8,
    /// An illegal permission combination (none, write or exec without read,
    /// executable device memory), or one that does not grant the faulting access.
    BadPermissions = 9,
    /// The invalidation sequence is not current; the fault was completed
    /// with a retry.
    StaleSequence = 10,
    /// The memcache cannot cover the worst case; top it up.
    MemcacheLow = 11,
    /// A different mapping is in the way; unmap it first.
    Overlap = 12,
    /// The range cuts through a block.
    PartialBlock = 13,
    /// Nothing maps the IPA.
    NotMapped = 14,
    /// The memcache has no room for the pages.
    MemcacheFull = 15,
    /// Unknown completion action.
    BadAction = 16,
    /// The tables are corrupt (a bug or memory corruption, never a normal outcome).
    TablesCorrupt = 17,
    /// The range is empty, wraps, or is not page aligned.
    BadRange = 18,
    /// A top-up page lies outside the core's table memory.
    NotTableMemory = 19,
    /// The size cannot be a leaf in this VM's geometry.
    SizeUnsupported = 20,
}

impl Reject {
    /// Every reason, in code order.
    pub const ALL: [Self; 20] = [
        Self::Malformed,
        Self::UnknownFault,
        Self::FaultOutsideRange,
        Self::BadSize,
        Self::Misaligned,
        Self::IpaOutOfRange,
        Self::PaOutOfRange,
        Self::NotOwned,
        Self::BadPermissions,
        Self::StaleSequence,
        Self::MemcacheLow,
        Self::Overlap,
        Self::PartialBlock,
        Self::NotMapped,
        Self::MemcacheFull,
        Self::BadAction,
        Self::TablesCorrupt,
        Self::BadRange,
        Self::NotTableMemory,
        Self::SizeUnsupported,
    ];

    /// The ABI code.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The reason for an ABI code.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.code() == code)
    }

    /// A short name for logs and traces.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownFault => "unknown-fault",
            Self::FaultOutsideRange => "fault-outside-range",
            Self::BadSize => "bad-size",
            Self::Misaligned => "misaligned",
            Self::IpaOutOfRange => "ipa-out-of-range",
            Self::PaOutOfRange => "pa-out-of-range",
            Self::NotOwned => "not-owned",
            Self::BadPermissions => "bad-permissions",
            Self::StaleSequence => "stale-sequence",
            Self::MemcacheLow => "memcache-low",
            Self::Overlap => "overlap",
            Self::PartialBlock => "partial-block",
            Self::NotMapped => "not-mapped",
            Self::MemcacheFull => "memcache-full",
            Self::BadAction => "bad-action",
            Self::TablesCorrupt => "tables-corrupt",
            Self::BadRange => "bad-range",
            Self::NotTableMemory => "not-table-memory",
            Self::SizeUnsupported => "size-unsupported",
        }
    }
}

impl From<TableError> for Reject {
    fn from(e: TableError) -> Self {
        match e {
            TableError::Misaligned => Self::Misaligned,
            TableError::IpaOutOfRange => Self::IpaOutOfRange,
            TableError::PaOutOfRange => Self::PaOutOfRange,
            TableError::SizeUnsupported => Self::SizeUnsupported,
            TableError::MemcacheLow { .. } => Self::MemcacheLow,
            TableError::Overlap { .. } => Self::Overlap,
            TableError::PartialBlock { .. } => Self::PartialBlock,
            TableError::NotMapped => Self::NotMapped,
            TableError::BadRoot | TableError::Corrupt => Self::TablesCorrupt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_round_trip() {
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(r.code(), i as u32 + 1);
            assert_eq!(Reject::from_code(r.code()), Some(*r));
        }
        assert_eq!(Reject::StaleSequence.code(), 10);
        assert_eq!(Reject::from_code(0), None);
        assert_eq!(Reject::from_code(21), None);
    }
}
