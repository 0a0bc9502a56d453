//! Address newtypes: one per address space, never interchangeable.
//!
//! Stage 2 translates an [`Ipa`] (guest physical) to a [`Pa`] (host physical).
//! Arithmetic is explicit and checked; `raw()` yields the number. The
//! daemon's own virtual addresses (HVA) live in the host crates.

/// log2 of the 4 KiB translation granule.
pub const PAGE_SHIFT: u32 = 12;
/// Size of the 4 KiB translation granule in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Defines an address newtype with the same API as [`Ipa`] and [`Pa`]; the
/// host crates use it for their own address spaces (the daemon's HVA).
#[macro_export]
macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw address.
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw address.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + bytes`, or `None` on overflow.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// `self - other` in bytes, or `None` if `other > self`.
            pub const fn checked_offset_from(self, other: Self) -> Option<u64> {
                self.0.checked_sub(other.0)
            }

            /// True if the address is a multiple of `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }

            /// The address rounded down to a multiple of `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }

            /// Page frame number (address >> 12).
            pub const fn pfn(self) -> u64 {
                self.0 >> $crate::addr::PAGE_SHIFT
            }
        }

        impl ::core::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address_type!(
    /// Intermediate physical address: guest physical, the input of stage 2.
    Ipa,
    "Ipa"
);
address_type!(
    /// Host physical address: the output of stage 2.
    Pa,
    "Pa"
);

/// A half-open range `[start, start + len)` in one address space, never empty
/// and never wrapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Range<A> {
    start: A,
    len: u64,
}

macro_rules! range_impl {
    ($name:ident) => {
        impl Range<$name> {
            /// A range of `len` bytes at `start`; `None` if empty or wrapping.
            pub const fn new(start: $name, len: u64) -> Option<Self> {
                if len == 0 || start.raw().checked_add(len).is_none() {
                    return None;
                }
                Some(Self { start, len })
            }

            /// First address.
            pub const fn start(&self) -> $name {
                self.start
            }

            /// Length in bytes.
            pub const fn len(&self) -> u64 {
                self.len
            }

            /// Always false: ranges are never empty.
            pub const fn is_empty(&self) -> bool {
                false
            }

            /// One past the last address (never overflows by construction).
            pub const fn end(&self) -> $name {
                $name::new(self.start.raw() + self.len)
            }

            /// True if `addr` lies in the range.
            pub const fn contains(&self, addr: $name) -> bool {
                addr.raw() >= self.start.raw() && addr.raw() - self.start.raw() < self.len
            }

            /// True if the two ranges share at least one byte.
            pub const fn overlaps(&self, other: &Self) -> bool {
                self.start.raw() < other.end().raw() && other.start.raw() < self.end().raw()
            }
        }
    };
}
range_impl!(Ipa);
range_impl!(Pa);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_add_overflow_is_none() {
        assert_eq!(Ipa::new(u64::MAX).checked_add(1), None);
        assert_eq!(Pa::new(0x1000).checked_add(0x1000), Some(Pa::new(0x2000)));
    }

    #[test]
    fn alignment_helpers() {
        assert!(Ipa::new(0x20_0000).is_aligned(0x20_0000));
        assert!(!Ipa::new(0x20_1000).is_aligned(0x20_0000));
        assert_eq!(Pa::new(0x20_1234).align_down(PAGE_SIZE), Pa::new(0x20_1000));
        assert_eq!(Pa::new(0x20_1234).pfn(), 0x201);
    }

    #[test]
    fn ranges_reject_empty_and_wrapping() {
        assert!(Range::<Ipa>::new(Ipa::new(0), 0).is_none());
        assert!(Range::<Ipa>::new(Ipa::new(u64::MAX), 2).is_none());
        let r = Range::<Ipa>::new(Ipa::new(0x1000), 0x2000).unwrap();
        assert!(r.contains(Ipa::new(0x2fff)));
        assert!(!r.contains(Ipa::new(0x3000)));
        assert!(!r.contains(Ipa::new(0xfff)));
        let s = Range::<Ipa>::new(Ipa::new(0x2fff), 1).unwrap();
        assert!(r.overlaps(&s));
        let t = Range::<Ipa>::new(Ipa::new(0x3000), 1).unwrap();
        assert!(!r.overlaps(&t));
    }
}
