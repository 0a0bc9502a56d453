//! A VM's layout: what is fixed when it attaches and never changes while it
//! is attached: its id and vCPUs, its memslots, the VMAs and the guest
//! regions the daemon mapped. A daemon that restarts finds all of it again
//! in the machine's attach request.

use hyp_core::addr::{Ipa, Pa, Range};
use hyp_core::ownership::VmId;

use super::memslot::{Memslot, Memslots, SlotFlags};
use super::region::{FillError, GuestRegion, RegionSpec};
use super::vma::Vmas;

/// Where a guest address lives in the VM's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backing {
    /// Guest region index.
    pub region: usize,
    /// Offset in the region.
    pub offset: u64,
    /// Its PA.
    pub pa: Pa,
}

impl Backing {
    /// Where `ipa` (in `slot`) lives, `slot`'s region being `region_size`
    /// bytes at PA `region_pa`.
    pub fn of(slot: &Memslot, ipa: Ipa, region_pa: Pa, region_size: u64) -> Option<Self> {
        let offset = slot.region_offset.checked_add(ipa.raw().checked_sub(slot.gpa.raw())?)?;
        (offset < region_size).then(|| Self { region: slot.region, offset, pa: Pa::new(region_pa.raw() + offset) })
    }
}

/// The fixed part of one VM.
#[derive(Debug)]
pub struct VmLayout {
    /// VM id.
    pub id: VmId,
    /// vCPUs.
    pub nr_vcpus: u32,
    /// Memslots.
    pub memslots: Memslots,
    /// VMAs over the guest regions.
    pub vmas: Vmas,
    /// Guest regions (index = `Vma::region` = `Memslot::region`).
    pub regions: Vec<GuestRegion>,
}

impl VmLayout {
    /// A layout from pieces validated at attach.
    pub fn new(id: VmId, nr_vcpus: u32, memslots: Memslots, vmas: Vmas, regions: Vec<GuestRegion>) -> Self {
        Self { id, nr_vcpus, memslots, vmas, regions }
    }

    /// A VM whose memory is one writable memfd region of `size` bytes at PA
    /// `pa_base`, with memslots `(GPA, bytes, offset in the region, flags)`
    /// over it: the smallest real VM, for tests and benchmarks.
    pub fn single_region(
        id: VmId,
        pa_base: Pa,
        size: u64,
        page_size: u64,
        slots: &[(u64, u64, u64, SlotFlags)],
    ) -> std::io::Result<Self> {
        let memfd = memfd::MemfdOptions::default().create("guest-ram").map_err(std::io::Error::other)?;
        memfd.as_file().set_len(size)?;
        let spec = RegionSpec { index: 0, pa_base, size, page_size, fd_offset: 0, writable: true, device: false };
        let region = GuestRegion::map(memfd, spec).map_err(std::io::Error::other)?;
        let vmas = Vmas::default();
        vmas.insert(region.vma(0));
        let mut memslots = Memslots::default();
        for (i, &(gpa, len, offset, flags)) in slots.iter().enumerate() {
            let hva =
                region.base().checked_add(offset).ok_or_else(|| std::io::Error::other("memslot offset overflows"))?;
            memslots.insert(Memslot::new(i, Ipa::new(gpa), len, hva, 0, offset, flags));
        }
        Ok(Self::new(id, 1, memslots, vmas, vec![region]))
    }

    /// Where `ipa` (in `slot`) lives: its region, the offset in it, its PA.
    pub fn backing(&self, slot: &Memslot, ipa: Ipa) -> Option<Backing> {
        let region = self.regions.get(slot.region)?;
        Backing::of(slot, ipa, region.pa_base, region.size)
    }

    /// Faults that brought evicted pages back, over every region.
    pub fn refaults(&self) -> u64 {
        self.regions.iter().map(GuestRegion::refaults).sum()
    }

    /// The bytes those faults brought back (their mappings' sizes).
    pub fn refault_bytes(&self) -> u64 {
        self.regions.iter().map(GuestRegion::refault_bytes).sum()
    }

    /// The time those faults spent bringing pages back (ns).
    pub fn refault_ns(&self) -> u64 {
        self.regions.iter().map(GuestRegion::refault_ns).sum()
    }

    /// Guest memory a working-set monitor samples: each memslot backed by
    /// memory (not device memory), by IPA.
    pub fn guest_memory(&self) -> Vec<Range<Ipa>> {
        let mut ranges: Vec<Range<Ipa>> = self
            .memslots
            .iter()
            .filter(|s| self.regions.get(s.region).is_some_and(|r| !r.device))
            .filter_map(|s| Range::<Ipa>::new(s.gpa, s.size))
            .collect();
        ranges.sort_by_key(|r| r.start());
        ranges
    }

    /// Puts every reclaimed page back into guest memory (the VM is
    /// detaching: the machine gets its memory whole).
    pub fn restore_reclaimed(&self) -> Result<(), FillError> {
        for r in &self.regions {
            r.restore_all()?;
        }
        Ok(())
    }
}
