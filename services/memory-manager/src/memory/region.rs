//! Guest regions: the machine's memory as the daemon maps it, each a
//! shared mapping aligned to its page size (so HVA and PA agree modulo the
//! block sizes it can back).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Mutex;

use faultline_attach::shm::{MappedRegion, RegionError};
use hyp_core::addr::Pa;
use memfd::Memfd;
use nix::fcntl::{fallocate, FallocateFlags};

use super::addr::Hva;
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
    /// Serialises filling holes and reclaiming pages, so a page is filled
    /// once (a second fault finds data, never copies over the guest's
    /// writes) and never filled while it is being reclaimed. Holds the swap
    /// store: where reclaimed pages wait, at their offset in the region,
    /// until a fault brings them back (created on the first reclaim).
    fill_lock: Mutex<Option<File>>,
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

/// Punches `[offset, offset + len)` out of `file`, keeping its size.
fn punch(file: &impl AsFd, offset: u64, len: u64) -> nix::Result<()> {
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(file.as_fd(), flags, offset as i64, len as i64)
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
        let (contents, fill_lock) = (Vec::new(), Mutex::new(None));
        Ok(Self { index, pa_base, size, page_size, writable, device, map, memfd, fd_offset, contents, fill_lock })
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
    pub fn fill(&self, offset: u64, len: u64) -> Result<bool, FillError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(FillError::OutOfRange { offset, len });
        }
        let end = offset + len;
        let copies = self.contents.iter().any(|w| w.offset < end && offset < w.offset + w.len);
        let mut filling = self.fill_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut holes = self.holes(offset, end)?;
        let found_holes = !holes.is_empty();
        // Reclaimed pages first: back from the swap store, which lets go of them.
        if let (Some(swap), false) = (filling.as_mut(), holes.is_empty()) {
            if self.restore_from_swap(swap, &holes)? {
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

    /// Copies the parts of `holes` the swap store holds back into the
    /// region and punches them out of the store; true if it copied any.
    fn restore_from_swap(&self, swap: &File, holes: &[(u64, u64)]) -> Result<bool, FillError> {
        use nix::unistd::{lseek, Whence};
        let mut copied = false;
        for &(lo, hi) in holes {
            let mut at = lo as i64;
            while at < hi as i64 {
                let data = match lseek(swap.as_fd(), at, Whence::SeekData) {
                    Ok(d) if d < hi as i64 => d,
                    Ok(_) | Err(nix::Error::ENXIO) => break,
                    Err(e) => return Err(e.into()),
                };
                let data_end = lseek(swap.as_fd(), data, Whence::SeekHole)?.min(hi as i64);
                let (from, len) = (data as u64, (data_end - data) as u64);
                self.map.fill_from(from, len, swap, from).map_err(|cause| FillError::Swap { offset: from, cause })?;
                punch(swap, from, len)?;
                copied = true;
                at = data_end;
            }
        }
        Ok(copied)
    }

    /// Copies every page in the swap store back into the region.
    pub fn restore_all(&self) -> Result<(), FillError> {
        let store = self.fill_lock.lock().unwrap_or_else(|e| e.into_inner());
        match store.as_ref() {
            Some(swap) => self.restore_from_swap(swap, &[(0, self.size)]).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Reclaims `[offset, offset + len)`: copies it to the swap store and
    /// punches it out of the backing, so it costs no memory until a fault
    /// fills it back. The caller has unmapped it from stage 2 and cleared
    /// its populated bits: `unmap` runs under the region's fill lock (no
    /// fault can fill the range meanwhile) and says whether it succeeded;
    /// if not, nothing is copied or punched.
    pub fn reclaim(&self, offset: u64, len: u64, unmap: impl FnOnce() -> bool) -> Result<bool, FillError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(FillError::OutOfRange { offset, len });
        }
        let mut store = self.fill_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !unmap() {
            return Ok(false);
        }
        let swap = match &mut *store {
            Some(swap) => swap,
            None => {
                let swap = memfd::MemfdOptions::default()
                    .create(format!("faultline-swap-{}", self.index))
                    .map_err(|e| FillError::Swap { offset, cause: std::io::Error::other(e) })?
                    .into_file();
                swap.set_len(self.size).map_err(|cause| FillError::Swap { offset, cause })?;
                store.insert(swap)
            }
        };
        self.map.copy_to(offset, len, &*swap, offset).map_err(|cause| FillError::Swap { offset, cause })?;
        punch(self.memfd.as_file(), self.fd_offset + offset, len)?;
        Ok(true)
    }

    /// The holes in `[offset, end)` of the region, as region offsets
    /// (SEEK_HOLE / SEEK_DATA on the memfd).
    fn holes(&self, offset: u64, end: u64) -> nix::Result<Vec<(u64, u64)>> {
        use nix::unistd::{lseek, Whence};
        let fd = self.memfd.as_file().as_fd();
        let base = self.fd_offset;
        let (mut at, end) = ((base + offset) as i64, (base + end) as i64);
        let mut holes = Vec::new();
        while at < end {
            let hole = match lseek(fd, at, Whence::SeekHole) {
                Ok(h) => h,
                // Past the end of the file: all hole.
                Err(nix::Error::ENXIO) => at,
                Err(e) => return Err(e),
            };
            if hole >= end {
                break;
            }
            let data = match lseek(fd, hole, Whence::SeekData) {
                Ok(d) => d.min(end),
                Err(nix::Error::ENXIO) => end,
                Err(e) => return Err(e),
            };
            holes.push(((hole - base as i64) as u64, (data - base as i64) as u64));
            at = data;
        }
        Ok(holes)
    }

    /// The PA of byte `offset` of the region.
    pub fn pa_at(&self, offset: u64) -> Option<Pa> {
        (offset < self.size).then(|| Pa::new(self.pa_base.raw() + offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyp_core::addr::Pa;

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
        assert!(region.fill(0x4000, 0x2000).unwrap(), "the page before it was a hole");
        assert!(!region.fill(0x5000, 0x1000).unwrap());
        assert_eq!(region.map.load(0x5000, 8), Some(7), "data is left alone");
        assert!(matches!(region.fill(2 << 20, 4096), Err(FillError::OutOfRange { .. })));
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
