//! Guest regions: the machine's memory as the daemon maps it, each a
//! shared mapping aligned to its page size (so HVA and PA agree modulo the
//! block sizes it can back).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use faultline_attach::shm::{MappedRegion, RegionError};
use hyp_core::addr::{Pa, PAGE_SIZE};
use memfd::Memfd;
use nix::fcntl::{fallocate, FallocateFlags};

use super::addr::Hva;
use super::claims::{Claims, FillPath};
use super::swap::{punch, SwapStore, SwapUsage};
use super::vma::Vma;

/// A PA window that belongs to the VM (guest memory) as the daemon knows it.
#[derive(Debug)]
pub struct GuestRegion {
    /// Index in the attach request.
    pub index: usize,
    /// First PA of the window.
    pub pa_base: Pa,
    /// Bytes.
    pub size: u64,
    /// Backing page size (4 KiB, 2 MiB, 1 GiB).
    pub page_size: u64,
    /// The guest may write it.
    pub writable: bool,
    /// Device memory.
    pub device: bool,
    /// The daemon's mapping.
    pub map: MappedRegion,
    /// The backing memfd.
    pub memfd: Memfd,
    /// Offset of the window in the memfd.
    pub fd_offset: u64,
    /// Where holes get their contents from, if not zeros.
    contents: Vec<ContentsWindow>,
    /// Serialises reclaims, and the fills that copy pages in (from the
    /// swap store or a contents file), so a page is filled once (a second
    /// fault finds data, never copies over the guest's writes) and never
    /// filled while it is being reclaimed. Holds the swap store (made in
    /// memory on the first reclaim if none was given).
    fill_lock: Mutex<Option<SwapStore>>,
    /// What fills and the reclaim in flight claim: a fresh page's fill
    /// claims its range here and skips the fill lock.
    claims: Claims,
    /// Fills that brought reclaimed pages back from the swap store, and
    /// the bytes those fills covered.
    refaults: AtomicU64,
    refault_bytes: AtomicU64,
    /// Time those fills took (ns): what the vCPUs stalled on reclaim.
    refault_ns: AtomicU64,
}

/// The steps of a reclaim that need the core, run by [`GuestRegion::reclaim`]
/// in their crash-consistent order under the region's fill lock; each
/// takes the indices of the ranges it is for and says, per range, whether
/// it happened.
pub trait ReclaimSteps {
    /// Write-protects the ranges in stage 2 (a page cannot change while it
    /// is copied); false leaves a range alone.
    fn protect(&mut self, ranges: &[usize]) -> Vec<bool>;
    /// The protected ranges are in the store, durable.
    fn stored(&mut self);
    /// Unmaps the ranges from stage 2; false keeps a range (mapped
    /// read-only until a write fault relaxes it).
    fn unmap(&mut self, ranges: &[usize]) -> Vec<bool>;
}

/// What a store held when a VM came back ([`GuestRegion::recover_store`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Bytes only the store holds: reclaimed pages, kept.
    pub kept: u64,
    /// Bytes the backing holds too (a reclaim interrupted before its
    /// punch, or a restore before its own): dropped from the store.
    pub dropped: u64,
}

/// Part of a guest region whose holes are filled from a file (the attach
/// protocol's contents region): a userfaultfd handler's or a lazy snapshot
/// restore's pages.
#[derive(Debug)]
pub struct ContentsWindow {
    /// First byte of the window in the guest region.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// The file holding the pages.
    pub file: File,
    /// Where the window's first byte is in the file.
    pub file_offset: u64,
}

/// Why a hole could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The range is not inside the region.
    #[error("range {offset:#x}+{len:#x} is outside the region")]
    OutOfRange {
        /// First byte.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Finding holes or allocating the backing failed.
    #[error("backing: {0}")]
    Backing(#[from] nix::Error),
    /// Reading the contents file failed (or it ended early).
    #[error("contents at region offset {offset:#x}: {cause}")]
    Contents {
        /// First byte of the copy that failed.
        offset: u64,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// Creating the swap store, or copying pages to or from it, failed.
    #[error("swap store at region offset {offset:#x}: {cause}")]
    Swap {
        /// First byte of the copy that failed.
        offset: u64,
        /// The I/O error.
        cause: std::io::Error,
    },
}

/// Where a guest region sits and what it is, before it is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Index in the attach request.
    pub index: usize,
    /// First PA of the window.
    pub pa_base: Pa,
    /// Bytes.
    pub size: u64,
    /// Backing page size.
    pub page_size: u64,
    /// Offset of the window in the memfd.
    pub fd_offset: u64,
    /// The guest may write it.
    pub writable: bool,
    /// Device memory.
    pub device: bool,
}

impl GuestRegion {
    /// Maps `spec`'s window of `memfd` at an address aligned to its page size.
    pub fn map(memfd: Memfd, spec: RegionSpec) -> Result<Self, RegionError> {
        let map = MappedRegion::map(memfd.as_file().as_fd(), spec.fd_offset, spec.size, spec.page_size)?;
        let RegionSpec { index, pa_base, size, page_size, fd_offset, writable, device } = spec;
        let (contents, fill_lock, claims) = (Vec::new(), Mutex::new(None), Claims::default());
        let (refaults, refault_bytes, refault_ns) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        Ok(Self {
            index,
            pa_base,
            size,
            page_size,
            writable,
            device,
            map,
            memfd,
            fd_offset,
            contents,
            fill_lock,
            claims,
            refaults,
            refault_bytes,
            refault_ns,
        })
    }

    /// Keeps reclaimed pages in `store` from now on. One not read yet (a
    /// predecessor's) may hold any page until [`Self::recover_store`]
    /// reads it: every fill copies from it until then.
    pub fn set_swap_store(&mut self, store: SwapStore) {
        if store.is_deferred() {
            self.claims = Claims::all_stored(self.size);
        }
        *self.fill_lock.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    /// What the swap store holds and costs (no store yet: nothing, and one
    /// would be made in memory).
    pub fn swap_store_usage(&self) -> SwapUsage {
        let store = self.fill_lock.lock().unwrap_or_else(|e| e.into_inner());
        let none = SwapUsage { in_memory: true, ..SwapUsage::default() };
        store.as_ref().map_or(none, |s| s.usage().unwrap_or(none))
    }

    /// Fills holes in `window` from its file from now on.
    pub fn add_contents(&mut self, window: ContentsWindow) {
        self.contents.push(window);
    }

    /// The VMA this region is, as region number `region` of its VM.
    pub fn vma(&self, region: usize) -> Vma {
        Vma {
            start: self.base(),
            len: self.size,
            region,
            page_size: self.page_size,
            writable: self.writable,
            device: self.device,
        }
    }

    /// The daemon address of the region's first byte.
    pub fn base(&self) -> Hva {
        Hva::new(self.map.base().as_ptr() as u64)
    }

    /// Faults in the backing of `[offset, offset + len)` (KVM's
    /// get_user_pages faulting a page in); says whether it had a hole.
    /// Holes inside a contents window are copied from its file; the rest
    /// are allocated zeroed. Pages that hold data are left as they are.
    ///
    /// fallocate on the memfd allocates pages without mapping them into the
    /// daemon: 2.4 us for a fresh 4 KiB page here, against 3.9 us for
    /// touching it through the mapping and 5.4 us for MADV_POPULATE_WRITE.
    /// On shmem a page allocated by fallocate but never written still reads
    /// as a hole, so the answer is only meaningful the first time.
    ///
    /// A fresh page's fill (nothing to copy in, nothing of it in the swap
    /// store) runs beside a reclaim of other pages; any other waits for it.
    pub fn fill(&self, offset: u64, len: u64) -> Result<bool, FillError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(FillError::OutOfRange { offset, len });
        }
        let end = offset + len;
        let copies = self.contents.iter().any(|w| w.offset < end && offset < w.offset + w.len);
        let started = std::time::Instant::now();
        if let FillPath::Unlocked(_claim) = self.claims.for_fill((offset, end), !copies) {
            let found_holes = !self.holes(offset, end)?.is_empty();
            let start = (self.fd_offset + offset) as i64;
            fallocate(self.memfd.as_file().as_fd(), FallocateFlags::empty(), start, len as i64)?;
            return Ok(found_holes);
        }
        let mut filling = self.fill_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut holes = self.holes(offset, end)?;
        let found_holes = !holes.is_empty();
        // Reclaimed pages first: back from the swap store, which lets go of them.
        if let (Some(swap), false) = (filling.as_mut(), holes.is_empty()) {
            if self.restore_from_swap(swap, &holes)? {
                self.refaults.fetch_add(1, Ordering::Relaxed);
                self.refault_bytes.fetch_add(len, Ordering::Relaxed);
                self.refault_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                holes = self.holes(offset, end)?;
            }
        }
        if !copies {
            drop(filling);
        }
        if copies {
            for &(lo, hi) in &holes {
                for w in &self.contents {
                    let (from, to) = (lo.max(w.offset), hi.min(w.offset + w.len));
                    if from < to {
                        let at = w.file_offset + (from - w.offset);
                        self.map
                            .fill_from(from, to - from, &w.file, at)
                            .map_err(|cause| FillError::Contents { offset: from, cause })?;
                    }
                }
            }
        }
        let start = (self.fd_offset + offset) as i64;
        fallocate(self.memfd.as_file().as_fd(), FallocateFlags::empty(), start, len as i64)?;
        Ok(found_holes)
    }

    /// Fills that brought reclaimed pages back from the swap store (a
    /// fault on an evicted page: a refault).
    pub fn refaults(&self) -> u64 {
        self.refaults.load(Ordering::Relaxed)
    }

    /// The bytes those fills covered.
    pub fn refault_bytes(&self) -> u64 {
        self.refault_bytes.load(Ordering::Relaxed)
    }

    /// The time those fills took, waiting for the fill lock included (ns).
    pub fn refault_ns(&self) -> u64 {
        self.refault_ns.load(Ordering::Relaxed)
    }

    /// Copies the parts of `holes` the swap store holds back into the
    /// region and lets go of them in the store; true if it copied any.
    fn restore_from_swap(&self, swap: &mut SwapStore, holes: &[(u64, u64)]) -> Result<bool, FillError> {
        let mut copied = false;
        for &(lo, hi) in holes {
            copied |= swap.take(&self.map, lo, hi).map_err(|cause| FillError::Swap { offset: lo, cause })?;
            self.claims.unstored((lo, hi));
        }
        Ok(copied)
    }

    /// Copies every page in the swap store back into the region.
    pub fn restore_all(&self) -> Result<(), FillError> {
        let mut store = self.fill_lock.lock().unwrap_or_else(|e| e.into_inner());
        match store.as_mut() {
            Some(swap) => self.restore_from_swap(swap, &[(0, self.size)]).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Makes the store agree with the backing after a daemon died: a page
    /// the backing holds too is the backing's (the store copy was written
    /// before a reclaim that never punched, or after a restore that never
    /// let go of the store's) and leaves the store; a page only the store
    /// holds stays there until a fault or the detach brings it back.
    /// It opens a deferred store: the VM is this daemon's from now on.
    pub fn recover_store(&self) -> Result<Recovered, FillError> {
        let mut store = self.fill_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(swap) = store.as_mut() else { return Ok(Recovered::default()) };
        let swap_err = |offset| move |cause| FillError::Swap { offset, cause };
        swap.open().map_err(swap_err(0))?;
        let mut done = Recovered::default();
        let mut kept = Vec::new();
        for (lo, hi) in swap.held(0, self.size).map_err(swap_err(0))? {
            let mut at = lo;
            for (hole, hole_end) in self.holes(lo, hi)? {
                if at < hole {
                    swap.discard(at, hole).map_err(swap_err(at))?;
                    done.dropped += hole - at;
                }
                done.kept += hole_end - hole;
                kept.push((hole, hole_end));
                at = hole_end;
            }
            if at < hi {
                swap.discard(at, hi).map_err(swap_err(at))?;
                done.dropped += hi - at;
            }
        }
        self.claims.stored_exactly(&kept);
        Ok(done)
    }

    /// Reclaims `ranges` (`(offset, bytes)` of the region) so they cost no
    /// memory until a fault fills them back, in the order that survives a
    /// crash at any point: each range is write-protected through the core
    /// (it cannot change from then on), copied to the store; the store is
    /// made durable once; then each range is unmapped through the core and
    /// punched out of the backing. At every moment a page is whole in the
    /// backing, or in the store, or in both with the same bytes. It all runs
    /// under the fill lock and a claim on the ranges: no fault fills them
    /// meanwhile (a fresh page's fill elsewhere goes on). Returns which
    /// ranges were reclaimed.
    pub fn reclaim(&self, ranges: &[(u64, u64)], steps: &mut impl ReclaimSteps) -> Result<Vec<bool>, FillError> {
        if let Some(&(offset, len)) =
            ranges.iter().find(|&&(offset, len)| offset.checked_add(len).is_none_or(|end| end > self.size))
        {
            return Err(FillError::OutOfRange { offset, len });
        }
        let mut store = self.fill_lock.lock().unwrap_or_else(|e| e.into_inner());
        let swap = match &mut *store {
            Some(swap) => swap,
            None => {
                let swap = SwapStore::in_memory(self.index, self.size)
                    .map_err(|cause| FillError::Swap { offset: 0, cause })?;
                store.insert(swap)
            }
        };
        let spans: Vec<(u64, u64)> = ranges.iter().map(|&(offset, len)| (offset, offset + len)).collect();
        let _claim = self.claims.for_reclaim(&spans);
        let all: Vec<usize> = (0..ranges.len()).collect();
        let protected: Vec<usize> =
            all.iter().copied().zip(steps.protect(&all)).filter(|&(_, p)| p).map(|(i, _)| i).collect();
        for &i in &protected {
            let (offset, len) = ranges[i];
            swap.put(&self.map, offset, len).map_err(|cause| FillError::Swap { offset, cause })?;
        }
        swap.sync().map_err(|cause| FillError::Swap { offset: 0, cause })?;
        steps.stored();
        let mut reclaimed = vec![false; ranges.len()];
        for (&i, unmapped) in protected.iter().zip(steps.unmap(&protected)) {
            let (offset, len) = ranges[i];
            if unmapped {
                punch(self.memfd.as_file(), self.fd_offset + offset, len)?;
                reclaimed[i] = true;
            } else {
                // Still mapped: the backing is the page's; the copy goes.
                swap.discard(offset, offset + len).map_err(|cause| FillError::Swap { offset, cause })?;
            }
        }
        // Not protected (never copied) or still mapped (copy discarded).
        for (&span, _) in spans.iter().zip(&reclaimed).filter(|(_, &done)| !done) {
            self.claims.unstored(span);
        }
        Ok(reclaimed)
    }

    /// The holes in `[offset, end)` of the region, as region offsets
    /// (SEEK_DATA on the memfd, page by page where there is data).
    ///
    /// Never SEEK_HOLE: on shmem it walks every page from the offset to the
    /// first hole after it, which in a backing the machine filled (a ROM, a
    /// restored snapshot) is the rest of the file: 200-450 us for each 4 KiB
    /// fault on a 32 MiB read-only slot. SEEK_DATA from a page that holds
    /// data answers at once, and from a hole it skips the empty range, so
    /// the cost is bounded by the range asked about.
    fn holes(&self, offset: u64, end: u64) -> nix::Result<Vec<(u64, u64)>> {
        use nix::unistd::{lseek, Whence};
        let fd = self.memfd.as_file().as_fd();
        let base = self.fd_offset as i64;
        let (mut at, end) = (base + offset as i64, base + end as i64);
        let mut holes: Vec<(u64, u64)> = Vec::new();
        while at < end {
            let data = match lseek(fd, at, Whence::SeekData) {
                Ok(d) => d.min(end),
                // No data from here to the end of the file: all hole.
                Err(nix::Error::ENXIO) => end,
                Err(e) => return Err(e),
            };
            if data > at {
                holes.push(((at - base) as u64, (data - base) as u64));
                at = data;
            } else {
                // `at` holds data: on to the next page.
                at += PAGE_SIZE as i64;
            }
        }
        Ok(holes)
    }

    /// The ranges of the region that hold data now, as region offsets
    /// (SEEK_DATA / SEEK_HOLE over the memfd, once: a hole is skipped at
    /// once, a range of data costs a walk of its pages), or `None` where
    /// the backing cannot tell ([`tells_holes`]). Holes may be filled
    /// meanwhile; data stays data until the daemon punches it.
    pub fn data_ranges(&self) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        let file = self.memfd.as_file();
        if !tells_holes(file)? {
            return Ok(None);
        }
        let base = self.fd_offset;
        let segments = faultline_attach::shm::data_segments(file, base, base + self.size)?;
        Ok(Some(segments.into_iter().map(|(lo, hi)| (lo - base, hi - base)).collect()))
    }

    /// Bytes of the backing file the guest's pages take (its allocated
    /// blocks: the host memory a shmem backing uses), and its inode, to
    /// count a file shared by several regions once.
    pub fn backing_bytes(&self) -> std::io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.memfd.as_file().metadata()?;
        Ok((m.ino(), m.blocks() * 512))
    }

    /// The PA of byte `offset` of the region.
    pub fn pa_at(&self, offset: u64) -> Option<Pa> {
        (offset < self.size).then(|| Pa::new(self.pa_base.raw() + offset))
    }
}

/// Whether `file`'s file system tells holes from data. hugetlbfs does not:
/// its generic llseek calls every byte of the file data, allocated or not
/// (a hugetlb memfd backs a guest on 2 MiB pages when the host has them).
pub fn tells_holes(file: &File) -> std::io::Result<bool> {
    use nix::sys::statfs::{fstatfs, HUGETLBFS_MAGIC};
    Ok(fstatfs(file)?.filesystem_type() != HUGETLBFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyp_core::addr::Pa;

    #[test]
    fn a_hugetlb_file_cannot_tell_its_holes_and_shmem_can() {
        use memfd::{HugetlbSize, MemfdOptions};
        // Made without a huge page on the host: nothing is allocated, and
        // SEEK_DATA still calls all of it data.
        let huge = MemfdOptions::default().hugetlb(Some(HugetlbSize::Huge2MB)).create("huge").unwrap();
        huge.as_file().set_len(4 << 20).unwrap();
        assert_eq!(faultline_attach::shm::data_segments(huge.as_file(), 0, 4 << 20).unwrap(), [(0, 4 << 20)]);
        assert!(!tells_holes(huge.as_file()).unwrap());
        let shmem = MemfdOptions::default().create("shmem").unwrap();
        shmem.as_file().set_len(4 << 20).unwrap();
        assert!(tells_holes(shmem.as_file()).unwrap());
    }

    fn region(size: u64) -> GuestRegion {
        let memfd = memfd::MemfdOptions::default().create("holes").unwrap();
        memfd.as_file().set_len(2 * size).unwrap();
        let spec = RegionSpec {
            index: 0,
            pa_base: Pa::new(0x4000_0000),
            size,
            page_size: 4096,
            fd_offset: size,
            writable: true,
            device: false,
        };
        GuestRegion::map(memfd, spec).unwrap()
    }

    #[test]
    fn holes_are_found_until_written() {
        let region = region(2 << 20);
        assert_eq!(region.holes(0, 0x8000).unwrap(), [(0, 0x8000)], "a fresh file is all holes");
        // Written through the mapping: data.
        region.map.store(0x5000, 8, 7).unwrap();
        assert_eq!(region.holes(0x5000, 0x6000).unwrap(), []);
        assert_eq!(region.holes(0x1000, 0x8000).unwrap(), [(0x1000, 0x5000), (0x6000, 0x8000)]);
        // Data pages in a row, data to the end of the range, data after it.
        region.map.store(0x6000, 8, 7).unwrap();
        region.map.store(0x9000, 8, 7).unwrap();
        assert_eq!(region.holes(0x1000, 0x8000).unwrap(), [(0x1000, 0x5000), (0x7000, 0x8000)]);
        assert_eq!(region.holes(0x5000, 0x7000).unwrap(), []);
        assert_eq!(region.holes(0x6000, 0xa000).unwrap(), [(0x7000, 0x9000)]);
        assert!(region.fill(0x4000, 0x2000).unwrap(), "the page before it was a hole");
        assert!(!region.fill(0x5000, 0x1000).unwrap());
        assert_eq!(region.map.load(0x5000, 8), Some(7), "data is left alone");
        assert!(matches!(region.fill(2 << 20, 4096), Err(FillError::OutOfRange { .. })));
    }

    #[test]
    fn data_ranges_are_region_offsets_within_the_window() {
        use std::os::unix::fs::FileExt;
        let region = region(1 << 20);
        assert_eq!(region.data_ranges().unwrap(), Some(vec![]));
        // Before the window (the memfd's first 1 MiB is not this region's)
        // and in it, at its first page, in a run, and at its last page.
        let file = region.memfd.as_file();
        file.write_all_at(&[1; 4096], 0x3000).unwrap();
        region.map.store(0, 8, 7).unwrap();
        region.map.store(0x8000, 8, 7).unwrap();
        region.map.store(0x9000, 8, 7).unwrap();
        region.map.store((1 << 20) - 8, 8, 7).unwrap();
        let data = vec![(0, 0x1000), (0x8000, 0xa000), ((1 << 20) - 0x1000, 1 << 20)];
        assert_eq!(region.data_ranges().unwrap(), Some(data));
    }

    #[test]
    fn holes_in_a_contents_window_are_copied_from_its_file_once() {
        let mut region = region(1 << 20);
        let file = memfd::MemfdOptions::default().create("contents").unwrap().into_file();
        file.set_len(0x10000).unwrap();
        use std::os::unix::fs::FileExt;
        for page in 0..16u64 {
            file.write_all_at(&(0xc0de_0000 + page).to_le_bytes(), page * 4096).unwrap();
        }
        // Region pages 2..6 come from file pages 8..12.
        region.add_contents(ContentsWindow { offset: 0x2000, len: 0x4000, file, file_offset: 0x8000 });
        region.map.store(0x3000, 8, 7).unwrap();
        assert!(region.fill(0, 0x8000).unwrap());
        let words: Vec<u64> = (0..8).map(|p| region.map.load(p * 4096, 8).unwrap()).collect();
        assert_eq!(words, [0, 0, 0xc0de_0008, 7, 0xc0de_000a, 0xc0de_000b, 0, 0]);
        // The guest writes a filled page; a second fill copies nothing over it.
        region.map.store(0x4000, 8, 9).unwrap();
        assert!(!region.fill(0x4000, 0x1000).unwrap());
        assert_eq!(region.map.load(0x4000, 8), Some(9));
    }

    #[test]
    fn a_short_contents_file_fails_the_fill_with_its_offset() {
        let mut region = region(1 << 20);
        let file = memfd::MemfdOptions::default().create("short").unwrap().into_file();
        file.set_len(0x1800).unwrap();
        region.add_contents(ContentsWindow { offset: 0, len: 0x2000, file, file_offset: 0 });
        match region.fill(0, 0x2000) {
            Err(FillError::Contents { offset: 0, cause }) => {
                assert_eq!(cause.kind(), std::io::ErrorKind::UnexpectedEof)
            }
            other => panic!("{other:?}"),
        }
    }
}
