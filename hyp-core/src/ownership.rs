//! Page ownership: who owns each 4 KiB page of physical memory, as pKVM
//! tracks it. A page is the host's, the hypervisor's (table pages, the
//! memcache), or exactly one VM's; a map is only allowed over pages the VM
//! owns, so no page can be mapped into two VMs.

use core::fmt;

use crate::addr::{Pa, PAGE_SIZE};

/// A VM identifier, 1 to 0xfffe.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct VmId(u16);

impl VmId {
    /// A VM id, or `None` for 0 and 0xffff (reserved for host and hypervisor).
    pub const fn new(id: u16) -> Option<Self> {
        match id {
            HOST | HYP => None,
            id => Some(Self(id)),
        }
    }

    /// The raw id.
    pub const fn raw(self) -> u16 {
        self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm{}", self.0)
    }
}

const HOST: u16 = 0;
const HYP: u16 = u16::MAX;

/// The owner of a page.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Owner {
    /// The host: not given to anyone.
    Host,
    /// The hypervisor core: table pages and memcache.
    Hyp,
    /// A guest.
    Vm(VmId),
}

impl Owner {
    const fn encode(self) -> u16 {
        match self {
            Self::Host => HOST,
            Self::Hyp => HYP,
            Self::Vm(id) => id.0,
        }
    }

    const fn decode(raw: u16) -> Self {
        match raw {
            HOST => Self::Host,
            HYP => Self::Hyp,
            id => Self::Vm(VmId(id)),
        }
    }
}

/// Why an ownership check or transfer failed. Nothing was changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OwnershipError {
    /// The range is not page aligned, empty, or wraps.
    BadRange,
    /// Part of the range lies outside the tracked physical memory.
    Untracked {
        /// First untracked page.
        pa: Pa,
    },
    /// A page has another owner than required.
    WrongOwner {
        /// The page.
        pa: Pa,
        /// Its actual owner.
        owner: Owner,
    },
}

/// Owners of the pages of one physical window, in caller-provided storage
/// (one `u16` per page; a static array at EL2).
pub struct PageOwnership<'a> {
    base: Pa,
    owners: &'a mut [u16],
}

impl fmt::Debug for PageOwnership<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageOwnership").field("base", &self.base).field("pages", &self.owners.len()).finish()
    }
}

impl<'a> PageOwnership<'a> {
    /// Tracks `storage.len()` pages from `base`, all owned by the host.
    pub fn new(base: Pa, storage: &'a mut [u16]) -> Self {
        storage.fill(HOST);
        Self { base: base.align_down(PAGE_SIZE), owners: storage }
    }

    /// The owner of the page holding `pa`, or `None` if untracked.
    pub fn owner(&self, pa: Pa) -> Option<Owner> {
        let index = pa.checked_offset_from(self.base)? / PAGE_SIZE;
        self.owners.get(index as usize).map(|&raw| Owner::decode(raw))
    }

    /// Checks that every page of `[pa, pa + len)` is owned by `owner`.
    pub fn check(&self, pa: Pa, len: u64, owner: Owner) -> Result<(), OwnershipError> {
        let (first, count) = self.span(pa, len)?;
        let want = owner.encode();
        match self.owners[first..first + count].iter().position(|&o| o != want) {
            None => Ok(()),
            Some(i) => Err(OwnershipError::WrongOwner {
                pa: Pa::new(pa.raw() + i as u64 * PAGE_SIZE),
                owner: Owner::decode(self.owners[first + i]),
            }),
        }
    }

    /// Moves every page of `[pa, pa + len)` from `from` to `to`, all or nothing.
    pub fn transfer(&mut self, pa: Pa, len: u64, from: Owner, to: Owner) -> Result<(), OwnershipError> {
        self.check(pa, len, from)?;
        let (first, count) = self.span(pa, len)?;
        self.owners[first..first + count].fill(to.encode());
        Ok(())
    }

    /// Pages owned by `owner`.
    pub fn count(&self, owner: Owner) -> usize {
        let want = owner.encode();
        self.owners.iter().filter(|&&o| o == want).count()
    }

    fn span(&self, pa: Pa, len: u64) -> Result<(usize, usize), OwnershipError> {
        if len == 0 || !pa.is_aligned(PAGE_SIZE) || len % PAGE_SIZE != 0 || pa.checked_add(len).is_none() {
            return Err(OwnershipError::BadRange);
        }
        let untracked = |pa| OwnershipError::Untracked { pa };
        let first = pa.checked_offset_from(self.base).ok_or(untracked(pa))? / PAGE_SIZE;
        let count = len / PAGE_SIZE;
        let tracked = self.owners.len() as u64;
        if first >= tracked {
            return Err(untracked(pa));
        }
        if first + count > tracked {
            return Err(untracked(Pa::new(self.base.raw() + tracked * PAGE_SIZE)));
        }
        Ok((first as usize, count as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn donation_is_exclusive_and_all_or_nothing() {
        let mut storage = [7u16; 16];
        let mut own = PageOwnership::new(Pa::new(0x10_0000), &mut storage);
        let vm1 = Owner::Vm(VmId::new(1).unwrap());
        let vm2 = Owner::Vm(VmId::new(2).unwrap());
        own.transfer(Pa::new(0x10_0000), 0x4000, Owner::Host, vm1).unwrap();
        // A range that overlaps vm1's pages cannot go to vm2, and nothing moves.
        let err = own.transfer(Pa::new(0x10_3000), 0x2000, Owner::Host, vm2);
        assert_eq!(err, Err(OwnershipError::WrongOwner { pa: Pa::new(0x10_3000), owner: vm1 }));
        assert_eq!(own.owner(Pa::new(0x10_4000)), Some(Owner::Host));
        assert_eq!(own.count(vm1), 4);
        assert_eq!(own.check(Pa::new(0x10_0000), 0x4000, vm1), Ok(()));
        assert_eq!(own.owner(Pa::new(0x20_0000)), None);
        assert_eq!(
            own.check(Pa::new(0x10_f000), 0x2000, Owner::Host),
            Err(OwnershipError::Untracked { pa: Pa::new(0x11_0000) })
        );
        assert_eq!(own.check(Pa::new(0x10_0800), 0x1000, Owner::Host), Err(OwnershipError::BadRange));
        assert_eq!(VmId::new(0), None);
        assert_eq!(VmId::new(0xffff), None);
    }
}
