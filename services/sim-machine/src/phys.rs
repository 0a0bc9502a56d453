//! The machine's physical memory: PA windows, each a memfd mapping.

use std::os::fd::{AsFd, BorrowedFd};

use faultline_attach::shm::{data_segments, MappedRegion};
use memfd::{FileSeal, HugetlbSize, Memfd, MemfdOptions};

/// The host's base page.
const PAGE: u64 = 4096;

/// One PA window backed by a memfd.
#[derive(Debug)]
pub struct Window {
    /// Name, for errors.
    pub name: &'static str,
    /// First PA.
    pub pa_base: u64,
    /// Bytes.
    pub size: u64,
    /// Backing page size as declared to the daemon.
    pub page_size: u64,
    /// The backing memfd (sealed against shrinking and growing).
    pub memfd: Memfd,
    /// The machine's own mapping.
    pub map: MappedRegion,
    /// True if the memfd is hugetlb-backed.
    pub hugetlb: bool,
}

/// Why memory could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PhysError {
    /// memfd creation or sizing failed.
    #[error("{name}: {cause}")]
    Memfd {
        /// Window.
        name: &'static str,
        /// Cause.
        cause: std::io::Error,
    },
    /// Mapping failed.
    #[error("{name}: {cause}")]
    Map {
        /// Window.
        name: &'static str,
        /// Cause.
        cause: faultline_attach::shm::RegionError,
    },
}

impl Window {
    /// A zeroed window of `size` bytes at `pa_base`. With `page_size` of
    /// 2 MiB and enough free huge pages on the host, the memfd is hugetlb;
    /// otherwise the page size is only declared.
    pub fn create(name: &'static str, pa_base: u64, size: u64, page_size: u64) -> Result<Self, PhysError> {
        let io = |cause| PhysError::Memfd { name, cause };
        let want_huge = page_size == 2 << 20 && free_huge_pages_2m() * (2 << 20) >= size;
        let mut opts = MemfdOptions::default().allow_sealing(true).close_on_exec(true);
        if want_huge {
            opts = opts.hugetlb(Some(HugetlbSize::Huge2MB));
        }
        let memfd = opts.create(name).map_err(|e| io(std::io::Error::other(e)))?;
        memfd.as_file().set_len(size).map_err(io)?;
        memfd.add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow]).map_err(|e| io(std::io::Error::other(e)))?;
        let map = MappedRegion::map(memfd.as_file().as_fd(), 0, size, page_size)
            .map_err(|cause| PhysError::Map { name, cause })?;
        Ok(Self { name, pa_base, size, page_size, memfd, map, hugetlb: want_huge })
    }

    /// The byte ranges of the window that hold data, from the memfd
    /// (SEEK_DATA / SEEK_HOLE, once over the file): holes read as zeros
    /// and are skipped without being touched (reading a shmem hole would
    /// allocate it). A file system that cannot tell gives the whole window.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        data_segments(self.memfd.as_file(), 0, self.size).unwrap_or_else(|_| vec![(0, self.size)])
    }

    /// Maps the window's pages that hold data into this process now, so
    /// that the machine's accesses to them take no page fault of the host:
    /// a real machine's memory has no host page tables to fill in, and a
    /// fault of the simulator's own is not the guest's cost. Holes stay
    /// holes (the daemon fills them), and a window that cannot tell its
    /// holes is left alone rather than allocated whole: hugetlbfs calls
    /// every byte data, and a fault per 2 MiB is not worth it.
    pub fn map_data(&self) -> std::io::Result<u64> {
        if self.hugetlb {
            return Ok(0);
        }
        let page = |at: u64| at / PAGE * PAGE;
        let mut mapped = 0;
        for (from, to) in data_segments(self.memfd.as_file(), 0, self.size)? {
            let (from, to) = (page(from), page(to + PAGE - 1).min(self.size));
            self.map.populate(from, to - from)?;
            mapped += to - from;
        }
        Ok(mapped)
    }

    /// The memfd, to pass to the daemon.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.memfd.as_file().as_fd()
    }

    /// True if `pa .. pa + len` lies in the window.
    pub fn contains(&self, pa: u64, len: u64) -> bool {
        pa >= self.pa_base && pa.checked_add(len).is_some_and(|end| end <= self.pa_base + self.size)
    }
}

fn free_huge_pages_2m() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// All windows of the machine; PA accesses are routed to the right one.
#[derive(Debug, Default)]
pub struct PhysMemory {
    windows: Vec<Window>,
}

impl PhysMemory {
    /// Adds a window.
    pub fn add(&mut self, w: Window) -> usize {
        self.windows.push(w);
        self.windows.len() - 1
    }

    /// Window `i`.
    pub fn window(&self, i: usize) -> &Window {
        &self.windows[i]
    }

    fn find(&self, pa: u64, len: u64) -> Option<&Window> {
        self.windows.iter().find(|w| w.contains(pa, len))
    }

    /// Loads `size` bytes at `pa`.
    pub fn load(&self, pa: u64, size: u8) -> Option<u64> {
        let w = self.find(pa, size as u64)?;
        w.map.load(pa - w.pa_base, size)
    }

    /// The 64-bit word at `pa`, for an atomic read-modify-write (the
    /// walker's hardware access-flag update): `None` outside the windows
    /// or unaligned.
    pub fn word(&self, pa: u64) -> Option<&std::sync::atomic::AtomicU64> {
        let w = self.find(pa, 8)?;
        w.map.word(pa - w.pa_base)
    }

    /// Stores `size` bytes at `pa`.
    pub fn store(&self, pa: u64, size: u8, value: u64) -> Option<()> {
        let w = self.find(pa, size as u64)?;
        w.map.store(pa - w.pa_base, size, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn mapping_the_data_of_a_window_maps_its_data_and_leaves_its_holes() {
        let w = Window::create("test", 0x4000_0000, 1 << 30, PAGE).unwrap();
        w.memfd.as_file().write_all_at(&[5; 3 * PAGE as usize], 100 * PAGE).unwrap();
        w.memfd.as_file().write_all_at(&[6], (1 << 30) - 1).unwrap();
        assert_eq!(w.map_data().unwrap(), 4 * PAGE);
        // Nothing allocated: the same data, the rest still holes.
        assert_eq!(w.data_ranges(), [(100 * PAGE, 103 * PAGE), ((1 << 30) - PAGE, 1 << 30)]);
        assert_eq!(w.map.read_u8(101 * PAGE), Some(5));
        assert_eq!(w.map.read_u8((1 << 30) - 1), Some(6));
    }
}
