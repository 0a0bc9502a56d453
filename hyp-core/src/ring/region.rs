//! A ring region in memory shared with a peer (another process, or EL2 and
//! the host). This is the only place the ring code turns raw memory into
//! references.

use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::sync::{AtomicU32, AtomicU64, Ordering};

use super::abi::{
    HeaderError, RegionHeader, RingKind, CONSUMER_INDEX_OFFSET, CONSUMER_WAITING_OFFSET, HEADER_SIZE,
    PRODUCER_INDEX_OFFSET, PRODUCER_YOUNG_OFFSET, RECORD_SIZE, RING_CONTROL_SIZE,
};
use super::spsc::{RingView, Slot};

/// A validated ring region: header checked, every ring in bounds.
#[derive(Debug)]
pub struct SharedRegion<'a> {
    base: NonNull<u8>,
    header: RegionHeader,
    _memory: PhantomData<&'a [AtomicU64]>,
}

// SAFETY: the region is only accessed through atomics; the raw pointer is a
// description of memory that `create`/`open`'s caller guaranteed lives for 'a.
unsafe impl Send for SharedRegion<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedRegion<'_> {}

impl<'a> SharedRegion<'a> {
    /// Lays out a new region: writes the header and zeroes every ring's
    /// control block.
    ///
    /// # Safety
    ///
    /// `base .. base + len` must be writable memory, valid for `'a`, that
    /// the peer accesses only atomically (or not at all yet).
    pub unsafe fn create(base: NonNull<u8>, len: u64, nr_vcpus: u32, ring_entries: u32) -> Result<Self, HeaderError> {
        let header = RegionHeader::new(nr_vcpus, ring_entries);
        check_alignment(base)?;
        header.validate(len)?;
        let region = Self { base, header, _memory: PhantomData };
        for vcpu in 0..nr_vcpus {
            for kind in [RingKind::Fault, RingKind::Command] {
                let off = header.ring_offset(vcpu, kind);
                for word in 0..RING_CONTROL_SIZE as u64 / 8 {
                    region.word(off + word * 8).store(0, Ordering::Relaxed);
                }
            }
        }
        for (i, w) in header.to_words().iter().enumerate() {
            region.word(i as u64 * 8).store(*w, Ordering::Release);
        }
        Ok(region)
    }

    /// Opens a region a peer laid out: copies the header once, validates it
    /// against `len`, and from then on uses only the copy.
    ///
    /// # Safety
    ///
    /// `base .. base + len` must be readable and writable memory, valid for
    /// `'a`, that the peer accesses only atomically.
    pub unsafe fn open(base: NonNull<u8>, len: u64) -> Result<Self, HeaderError> {
        check_alignment(base)?;
        if len < HEADER_SIZE as u64 {
            return Err(HeaderError::RegionTooSmall { need: HEADER_SIZE as u64, have: len });
        }
        let probe = Self { base, header: RegionHeader::default(), _memory: PhantomData };
        let mut words = [0u64; 8];
        for (i, w) in words.iter_mut().enumerate() {
            *w = probe.word(i as u64 * 8).load(Ordering::Acquire);
        }
        let header = RegionHeader::from_words(words);
        header.validate(len)?;
        Ok(Self { base, header, _memory: PhantomData })
    }

    /// The region [`SharedRegion::open`] opened at `base`, seen again
    /// through `header`, the copy it validated: nothing is read from the
    /// region, so a peer that rewrote its header since is not believed.
    ///
    /// # Safety
    ///
    /// As for [`SharedRegion::open`]; and `header` must be the header a
    /// [`SharedRegion::open`] of this same memory (`base`, the same length)
    /// returned.
    pub unsafe fn reopen(base: NonNull<u8>, header: RegionHeader) -> Self {
        Self { base, header, _memory: PhantomData }
    }

    /// The validated header copy.
    pub fn header(&self) -> &RegionHeader {
        &self.header
    }

    /// Whether the core has taken every command on every ring pair's
    /// command ring (the control pair's included), as a third party sees it:
    /// what a machine waits for before it re-attaches to a new daemon.
    pub fn commands_drained(&self) -> bool {
        (0..self.header.nr_vcpus).all(|pair| self.ring(pair, RingKind::Command).is_none_or(|r| r.is_drained()))
    }

    /// The view of `vcpu`'s ring of `kind`, or `None` if `vcpu` is out of range.
    pub fn ring(&self, vcpu: u32, kind: RingKind) -> Option<RingView<'a>> {
        if vcpu >= self.header.nr_vcpus {
            return None;
        }
        let off = self.header.ring_offset(vcpu, kind);
        let slots_ptr = self.at(off + RING_CONTROL_SIZE as u64).cast::<Slot>();
        let entries = self.header.ring_entries as usize;
        // SAFETY: `validate` checked that every ring, control block and
        // `entries` slots of RECORD_SIZE bytes, lies inside the region, which
        // the constructor's caller promised is valid for 'a and only accessed
        // atomically; slots are 64-byte aligned because the base is and all
        // offsets are multiples of 64; Slot has no invalid bit patterns.
        let slots: &'a [Slot] = unsafe { core::slice::from_raw_parts(slots_ptr.as_ptr(), entries) };
        RingView::new(
            self.word32(off + PRODUCER_INDEX_OFFSET as u64),
            self.word(off + PRODUCER_YOUNG_OFFSET as u64),
            self.word32(off + CONSUMER_INDEX_OFFSET as u64),
            self.word32(off + CONSUMER_WAITING_OFFSET as u64),
            slots,
        )
    }

    fn at(&self, offset: u64) -> NonNull<u8> {
        debug_assert!(offset < self.header.region_bytes().max(HEADER_SIZE as u64));
        // SAFETY: every caller passes an offset inside the validated region
        // (or inside the header during `open`, after the length check).
        unsafe { self.base.add(offset as usize) }
    }

    fn word(&self, offset: u64) -> &'a AtomicU64 {
        // SAFETY: `at` yields a pointer inside the region; offsets are
        // multiples of 8 on a 64-byte aligned base; the memory is valid for
        // 'a and only accessed atomically (constructor contract).
        unsafe { self.at(offset).cast::<AtomicU64>().as_ref() }
    }

    fn word32(&self, offset: u64) -> &'a AtomicU32 {
        // SAFETY: as in `word`, with 4-byte alignment.
        unsafe { self.at(offset).cast::<AtomicU32>().as_ref() }
    }
}

fn check_alignment(base: NonNull<u8>) -> Result<(), HeaderError> {
    if base.as_ptr() as usize % RECORD_SIZE != 0 {
        return Err(HeaderError::Misaligned);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::super::abi::{kind, FaultRecord, MAGIC};
    use super::super::spsc::{Consumer, Producer};
    use super::*;

    #[repr(C, align(64))]
    struct Line([u64; 8]);

    fn buffer(bytes: usize) -> Vec<Line> {
        (0..bytes.div_ceil(64)).map(|_| Line([0; 8])).collect()
    }

    #[test]
    fn creator_and_opener_share_rings_through_raw_memory() {
        let mut buf = buffer(64 + 4 * (128 + 16 * 64));
        let len = (buf.len() * 64) as u64;
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `buf` outlives both regions and is only used through them.
        let core_side = unsafe { SharedRegion::create(base, len, 2, 16) }.unwrap();
        // SAFETY: as above.
        let daemon_side = unsafe { SharedRegion::open(base, len) }.unwrap();
        assert_eq!(daemon_side.header(), core_side.header());
        let mut p = Producer::attach(core_side.ring(1, RingKind::Fault).unwrap()).unwrap();
        let mut c = Consumer::attach(daemon_side.ring(1, RingKind::Fault).unwrap()).unwrap();
        let f = FaultRecord {
            kind: kind::FAULT,
            vcpu: 1,
            fault_id: 5,
            esr: 1,
            far: 2,
            hpfar: 3,
            ipa: 4,
            inval_seq: 0,
            timestamp_ns: 9,
        };
        p.push(&f.encode()).unwrap();
        assert_eq!(FaultRecord::decode(&c.pop().unwrap().unwrap()), f);
        assert!(daemon_side.ring(2, RingKind::Fault).is_none());
        assert_eq!(buf[0].0[0], MAGIC);
    }

    #[test]
    fn open_rejects_truncated_and_foreign_regions() {
        let mut buf = buffer(64 + 2 * (128 + 2 * 64));
        let len = (buf.len() * 64) as u64;
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `buf` outlives every region made from it below.
        let blank = unsafe { SharedRegion::open(base, len) };
        assert_eq!(blank.err(), Some(HeaderError::BadMagic));
        // SAFETY: as above.
        let created = unsafe { SharedRegion::create(base, len, 1, 2) };
        assert!(created.is_ok());
        // SAFETY: as above.
        let truncated = unsafe { SharedRegion::open(base, len - 64) };
        assert!(matches!(truncated, Err(HeaderError::RegionTooSmall { .. })));
        // SAFETY: as above.
        let tiny = unsafe { SharedRegion::open(base, 8) };
        assert_eq!(tiny.err(), Some(HeaderError::RegionTooSmall { need: 64, have: 8 }));
        let odd = NonNull::new(base.as_ptr().wrapping_add(8)).unwrap();
        // SAFETY: as above (the call fails before touching memory).
        let misaligned = unsafe { SharedRegion::open(odd, len - 64) };
        assert_eq!(misaligned.err(), Some(HeaderError::Misaligned));
    }
}
