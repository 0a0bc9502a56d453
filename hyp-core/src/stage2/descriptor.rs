//! Stage-2 translation table descriptors, VMSAv8-64, 4 KiB granule.
//!
//! Bit positions are from the Arm ARM (DDI 0487) D8.3 "Translation table
//! descriptor formats" and D8.5.5 "Stage 2 memory type and Cacheability
//! attributes when FEAT_S2FWB is disabled".

use core::fmt;

use crate::addr::Pa;

const VALID: u64 = 1 << 0;
/// Table descriptor at levels 0-2, page descriptor at level 3.
const TABLE_OR_PAGE: u64 = 1 << 1;
const MEMATTR_SHIFT: u32 = 2;
const MEMATTR_MASK: u64 = 0b1111 << MEMATTR_SHIFT;
/// MemAttr[3:0] = 0b1111: Normal, Outer Write-Back, Inner Write-Back.
const MEMATTR_NORMAL_WB: u64 = 0b1111 << MEMATTR_SHIFT;
/// MemAttr[3:0] = 0b0001: Device-nGnRE.
const MEMATTR_DEVICE_NGNRE: u64 = 0b0001 << MEMATTR_SHIFT;
/// S2AP[0]: stage-2 read access.
const S2AP_R: u64 = 1 << 6;
/// S2AP[1]: stage-2 write access.
const S2AP_W: u64 = 1 << 7;
/// SH[1:0] = 0b11: Inner Shareable.
const SH_INNER: u64 = 0b11 << 8;
/// Access flag.
const AF: u64 = 1 << 10;
/// XN[1] (bit 54): execute-never at EL1 and EL0 (XN[1:0] = 0b10).
const XN: u64 = 1 << 54;
/// Output address bits [47:12].
const OA_MASK: u64 = 0x0000_ffff_ffff_f000;

/// Stage-2 access permissions of a leaf: a set of read, write, execute.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    /// No access.
    pub const NONE: Self = Self(0);
    /// Read.
    pub const R: Self = Self(1);
    /// Write.
    pub const W: Self = Self(2);
    /// Execute.
    pub const X: Self = Self(4);
    /// Read and write.
    pub const RW: Self = Self(3);
    /// Read and execute.
    pub const RX: Self = Self(5);
    /// Read, write and execute.
    pub const RWX: Self = Self(7);

    /// From the ABI bits (R = 1, W = 2, X = 4); `None` if other bits are set.
    pub const fn from_bits(bits: u32) -> Option<Self> {
        if bits & !7 != 0 {
            None
        } else {
            Some(Self(bits as u8))
        }
    }

    /// The ABI bits (R = 1, W = 2, X = 4).
    pub const fn bits(self) -> u32 {
        self.0 as u32
    }

    /// True if every permission in `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// `self` without the permissions in `other`.
    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// True if read is allowed.
    pub const fn read(self) -> bool {
        self.contains(Self::R)
    }

    /// True if write is allowed.
    pub const fn write(self) -> bool {
        self.contains(Self::W)
    }

    /// True if execute is allowed.
    pub const fn exec(self) -> bool {
        self.contains(Self::X)
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |set: bool, ch: char| if set { ch } else { '-' };
        write!(f, "{}{}{}", c(self.read(), 'r'), c(self.write(), 'w'), c(self.exec(), 'x'))
    }
}

/// Stage-2 memory type of a leaf.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MemType {
    /// Normal memory, inner and outer write-back.
    Normal,
    /// Device-nGnRE (never executable).
    Device,
}

/// What a leaf maps: permissions and memory type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LeafAttrs {
    /// Access permissions.
    pub perms: Perms,
    /// Memory type.
    pub mem: MemType,
}

/// A raw 64-bit stage-2 descriptor.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Descriptor(u64);

/// What a descriptor is, given the level it was read at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DescriptorKind {
    /// Bit 0 clear: faults.
    Invalid,
    /// Points to a next-level table (levels 0-2).
    Table(Pa),
    /// Maps a block (levels 1-2) or page (level 3).
    Leaf(Pa),
    /// An encoding that is reserved at this level (block at level 0, or
    /// bit 1 clear at level 3); the core never writes one.
    Reserved,
}

impl Descriptor {
    /// The invalid descriptor.
    pub const INVALID: Self = Self(0);

    /// Wraps raw bits read from a table.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw bits.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// A table descriptor pointing at the next-level table at `table`.
    pub const fn table(table: Pa) -> Self {
        Self((table.raw() & OA_MASK) | TABLE_OR_PAGE | VALID)
    }

    /// A block (level 1-2) or page (level 3) descriptor with AF set.
    pub const fn leaf(level: u8, output: Pa, attrs: LeafAttrs) -> Self {
        let mut raw = (output.raw() & OA_MASK) | VALID | AF | SH_INNER;
        if level == 3 {
            raw |= TABLE_OR_PAGE;
        }
        raw |= match attrs.mem {
            MemType::Normal => MEMATTR_NORMAL_WB,
            MemType::Device => MEMATTR_DEVICE_NGNRE,
        };
        if attrs.perms.read() {
            raw |= S2AP_R;
        }
        if attrs.perms.write() {
            raw |= S2AP_W;
        }
        // Device memory is never executable, whatever the caller asked.
        if !attrs.perms.exec() || matches!(attrs.mem, MemType::Device) {
            raw |= XN;
        }
        Self(raw)
    }

    /// True if bit 0 is set.
    pub const fn is_valid(self) -> bool {
        self.0 & VALID != 0
    }

    /// Classifies the descriptor as read at `level`.
    pub const fn kind(self, level: u8) -> DescriptorKind {
        if !self.is_valid() {
            return DescriptorKind::Invalid;
        }
        let oa = Pa::new(self.0 & OA_MASK);
        let bit1 = self.0 & TABLE_OR_PAGE != 0;
        match (level, bit1) {
            (0..=2, true) => DescriptorKind::Table(oa),
            (1 | 2, false) => DescriptorKind::Leaf(oa),
            (3, true) => DescriptorKind::Leaf(oa),
            _ => DescriptorKind::Reserved,
        }
    }

    /// Output address bits of a leaf or table.
    pub const fn output(self) -> Pa {
        Pa::new(self.0 & OA_MASK)
    }

    /// Stage-2 permissions of a leaf (S2AP and XN).
    pub const fn perms(self) -> Perms {
        let mut p = Perms::NONE;
        if self.0 & S2AP_R != 0 {
            p = p.union(Perms::R);
        }
        if self.0 & S2AP_W != 0 {
            p = p.union(Perms::W);
        }
        if self.0 & XN == 0 {
            p = p.union(Perms::X);
        }
        p
    }

    /// Memory type of a leaf (MemAttr); any encoding other than Normal
    /// write-back is reported as device.
    pub const fn mem_type(self) -> MemType {
        if self.0 & MEMATTR_MASK == MEMATTR_NORMAL_WB {
            MemType::Normal
        } else {
            MemType::Device
        }
    }

    /// Leaf attributes.
    pub const fn attrs(self) -> LeafAttrs {
        LeafAttrs { perms: self.perms(), mem: self.mem_type() }
    }

    /// Access flag.
    pub const fn access_flag(self) -> bool {
        self.0 & AF != 0
    }

    /// The same leaf with its access flag set (`young`) or clear.
    pub const fn with_access_flag(self, young: bool) -> Self {
        match young {
            true => Self(self.0 | AF),
            false => Self(self.0 & !AF),
        }
    }

    /// The same leaf with its permissions replaced by `perms` (XN follows
    /// `perms.exec()`).
    pub const fn with_perms(self, perms: Perms) -> Self {
        let mut raw = self.0 & !(S2AP_R | S2AP_W | XN);
        if perms.read() {
            raw |= S2AP_R;
        }
        if perms.write() {
            raw |= S2AP_W;
        }
        if !perms.exec() {
            raw |= XN;
        }
        Self(raw)
    }
}

impl fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Descriptor({:#018x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_rw_page_matches_hand_encoding() {
        // PA 0x4000_1000, page (bits 1:0 = 0b11), MemAttr 0b1111 (bits 5:2 = 0x3c),
        // S2AP = 0b11 (0xc0), SH = 0b11 (0x300), AF (0x400), XN (bit 54).
        let d = Descriptor::leaf(3, Pa::new(0x4000_1000), LeafAttrs { perms: Perms::RW, mem: MemType::Normal });
        assert_eq!(d.raw(), 0x0040_0000_4000_17ff);
        assert_eq!(d.kind(3), DescriptorKind::Leaf(Pa::new(0x4000_1000)));
    }

    #[test]
    fn device_block_is_never_executable_and_matches_hand_encoding() {
        // Level 2 block: bits 1:0 = 0b01, MemAttr 0b0001 (0x4), S2AP R (0x40), SH, AF, XN.
        let d = Descriptor::leaf(2, Pa::new(0x0900_0000), LeafAttrs { perms: Perms::RX, mem: MemType::Device });
        assert_eq!(d.raw(), 0x0040_0000_0900_0745);
        assert_eq!(d.kind(2), DescriptorKind::Leaf(Pa::new(0x0900_0000)));
        assert_eq!(d.mem_type(), MemType::Device);
    }

    #[test]
    fn executable_leaf_has_xn_clear() {
        let d = Descriptor::leaf(1, Pa::new(0x4000_0000), LeafAttrs { perms: Perms::RX, mem: MemType::Normal });
        assert_eq!(d.raw() & (1 << 54), 0);
        assert_eq!(d.perms(), Perms::RX);
        assert_eq!(d.with_perms(Perms::R).perms(), Perms::R);
    }

    #[test]
    fn table_descriptor_and_reserved_encodings() {
        let t = Descriptor::table(Pa::new(0x8_1234_5000));
        assert_eq!(t.raw(), 0x8_1234_5003);
        assert_eq!(t.kind(0), DescriptorKind::Table(Pa::new(0x8_1234_5000)));
        // Bits 1:0 = 0b01 at level 0 is reserved with a 4 KiB granule; 0b01 at level 3 too.
        assert_eq!(Descriptor::from_raw(0x1).kind(0), DescriptorKind::Reserved);
        assert_eq!(Descriptor::from_raw(0x1).kind(3), DescriptorKind::Reserved);
        assert_eq!(Descriptor::from_raw(0x2).kind(2), DescriptorKind::Invalid);
    }

    #[test]
    fn perms_bits_reject_unknown() {
        assert_eq!(Perms::from_bits(5), Some(Perms::RX));
        assert_eq!(Perms::from_bits(8), None);
    }
}
