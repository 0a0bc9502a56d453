//! Swap stores: where a region's reclaimed pages wait until a fault brings
//! them back. In the daemon's state directory a store outlives the daemon,
//! and a page is written there (and made durable) before it leaves the
//! guest. Two layouts, chosen by `swap_compression`:
//!
//! - [`slots`]: a sparse file holding each page at its offset in the region
//!   (no copy but the page's, no index; a page takes a page);
//! - [`packed`]: lz4-compressed pages appended to a data log, found through
//!   an index of fixed entries by page number; a page takes what it
//!   compresses to, and a page of zeros takes nothing.

pub mod packed;
pub mod slots;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use faultline_attach::shm::MappedRegion;

use packed::PackedStore;
use slots::SlotStore;

/// How reclaimed pages are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SwapCompression {
    /// Each page as it is, at its own offset.
    #[default]
    None,
    /// lz4 (block format), packed in a log.
    Lz4,
}

/// Bytes a store holds and what they cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapUsage {
    /// Guest bytes the store holds (pages reclaimed and not yet back).
    pub held: u64,
    /// Bytes its files take (allocated blocks): memory, if they are on
    /// tmpfs or a memfd; disk otherwise.
    pub stored: u64,
    /// The files are host memory (a memfd, or a state directory on tmpfs):
    /// eviction saves only what compression saves.
    pub in_memory: bool,
}

/// One region's swap store.
#[derive(Debug)]
pub struct SwapStore {
    state: State,
    /// Its files are host memory (a memfd, or a state directory on tmpfs).
    in_memory: bool,
}

#[derive(Debug)]
enum State {
    /// Not read yet ([`SwapStore::deferred`]).
    Deferred(Site),
    Open(Layout),
}

#[derive(Debug)]
enum Layout {
    Slots(SlotStore),
    Packed(PackedStore),
}

/// Where a store is, and how a new one is laid out.
#[derive(Debug)]
struct Site {
    dir: PathBuf,
    index: usize,
    size: u64,
    compression: SwapCompression,
}

impl Site {
    /// The store a predecessor left, in whichever layout it left it (its
    /// pages are there), or a new empty one laid out as `compression` says.
    fn open(&self) -> io::Result<Layout> {
        let Self { ref dir, index, size, compression } = *self;
        let left = |name: &str| dir.join(name).exists();
        Ok(if left(&SlotStore::file_name(index)) {
            Layout::Slots(SlotStore::in_dir(dir, index, size)?)
        } else if left(&PackedStore::index_name(index)) || compression == SwapCompression::Lz4 {
            Layout::Packed(PackedStore::in_dir(dir, index, size)?)
        } else {
            Layout::Slots(SlotStore::in_dir(dir, index, size)?)
        })
    }
}

impl SwapStore {
    /// The store of region `index` (`size` bytes) in the VM's state
    /// directory `dir`, durable, opened now: for a VM that attached afresh
    /// (its directory was emptied).
    pub fn in_dir(dir: &Path, index: usize, size: u64, compression: SwapCompression) -> io::Result<Self> {
        let mut store = Self::deferred(dir, index, size, compression);
        store.open()?;
        Ok(store)
    }

    /// The same store, opened on first use or by [`Self::open`]: for a VM
    /// that comes back. A VM handed over by a running daemon is mapped
    /// while that daemon still drains it, and may still be writing the
    /// store; nothing of the store is read until the VM is this daemon's.
    pub fn deferred(dir: &Path, index: usize, size: u64, compression: SwapCompression) -> Self {
        use nix::sys::statfs::{statfs, TMPFS_MAGIC};
        let in_memory = statfs(dir).is_ok_and(|fs| fs.filesystem_type() == TMPFS_MAGIC);
        let site = Site { dir: dir.to_path_buf(), index, size, compression };
        Self { state: State::Deferred(site), in_memory }
    }

    /// A page-slot store in a memfd: nothing outlives the daemon, and no
    /// host memory is saved; for a region reclaimed without a state
    /// directory (tests).
    pub fn in_memory(index: usize, size: u64) -> io::Result<Self> {
        let layout = Layout::Slots(SlotStore::in_memory(index, size)?);
        Ok(Self { state: State::Open(layout), in_memory: true })
    }

    /// True until the store is read ([`Self::deferred`]): it may hold any
    /// page a predecessor left.
    pub fn is_deferred(&self) -> bool {
        matches!(self.state, State::Deferred(_))
    }

    /// Reads the store if it was deferred (a packed store checks every
    /// index entry, and finishes a compaction a crash cut short).
    pub fn open(&mut self) -> io::Result<()> {
        if let State::Deferred(site) = &self.state {
            self.state = State::Open(site.open()?);
        }
        Ok(())
    }

    /// The store's layout, opened.
    fn opened(&mut self) -> io::Result<&mut Layout> {
        self.open()?;
        match &mut self.state {
            State::Open(layout) => Ok(layout),
            State::Deferred(_) => unreachable!("opened just above"),
        }
    }

    /// Writes `[offset, offset + len)` of `map` (page aligned) to the
    /// store. Not held until [`Self::sync`].
    pub fn put(&mut self, map: &MappedRegion, offset: u64, len: u64) -> io::Result<()> {
        match self.opened()? {
            Layout::Slots(s) => s.put(map, offset, len),
            Layout::Packed(p) => p.put(map, offset, len),
        }
    }

    /// Makes every page put since the last sync held, and durable if the
    /// store is: from here a page may leave the guest.
    pub fn sync(&mut self) -> io::Result<()> {
        match self.opened()? {
            Layout::Slots(s) => s.sync(),
            Layout::Packed(p) => p.sync(),
        }
    }

    /// The ranges of `[lo, hi)` the store holds, in order.
    pub fn held(&mut self, lo: u64, hi: u64) -> io::Result<Vec<(u64, u64)>> {
        match self.opened()? {
            Layout::Slots(s) => s.held(lo, hi),
            Layout::Packed(p) => Ok(p.held(lo, hi)),
        }
    }

    /// Copies what the store holds of `[lo, hi)` into `map` at the same
    /// offsets, then lets go of it; true if it held any. A page whose copy
    /// fails its check is an `InvalidData` error and stays held.
    pub fn take(&mut self, map: &MappedRegion, lo: u64, hi: u64) -> io::Result<bool> {
        match self.opened()? {
            Layout::Slots(s) => s.take(map, lo, hi),
            Layout::Packed(p) => p.take(map, lo, hi),
        }
    }

    /// Lets go of what the store holds of `[lo, hi)` (the backing has it).
    pub fn discard(&mut self, lo: u64, hi: u64) -> io::Result<()> {
        match self.opened()? {
            Layout::Slots(s) => s.discard(lo, hi),
            Layout::Packed(p) => p.discard(lo, hi),
        }
    }

    /// What the store holds and what that costs (nothing read yet, for a
    /// deferred store: nothing).
    pub fn usage(&self) -> io::Result<SwapUsage> {
        let (held, stored) = match &self.state {
            State::Deferred(_) => (0, 0),
            State::Open(Layout::Slots(s)) => {
                let bytes = allocated(s.file())?;
                (bytes, bytes)
            }
            State::Open(Layout::Packed(p)) => (p.held_bytes(), p.allocated()?),
        };
        Ok(SwapUsage { held, stored, in_memory: self.in_memory })
    }
}

/// Bytes `file`'s allocated blocks take.
fn allocated(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

/// A memfd of `size` bytes named `name`, as a file.
fn memfd_file(name: String, size: u64) -> io::Result<File> {
    let file = memfd::MemfdOptions::default().create(name).map_err(io::Error::other)?.into_file();
    file.set_len(size)?;
    Ok(file)
}

/// `fdatasync(file)`.
fn datasync(file: &File) -> io::Result<()> {
    nix::unistd::fdatasync(file).map_err(io::Error::from)
}

/// Punches `[offset, offset + len)` out of `file`, keeping its size.
pub(crate) fn punch(file: &File, offset: u64, len: u64) -> nix::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(file, flags, offset as i64, len as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const PAGE: u64 = 4096;

    fn guest(pages: u64) -> MappedRegion {
        let memfd = memfd::MemfdOptions::default().create("guest").unwrap();
        memfd.as_file().set_len(pages * PAGE).unwrap();
        let map = MappedRegion::map(memfd.as_file().as_fd(), 0, pages * PAGE, PAGE).unwrap();
        for p in 0..pages {
            map.write_from(p * PAGE, &[p as u8 + 1; 64]).unwrap();
        }
        map
    }

    #[test]
    fn a_deferred_store_reads_nothing_until_it_is_opened() {
        for compression in [SwapCompression::None, SwapCompression::Lz4] {
            let dir = tempfile::tempdir().unwrap();
            let map = guest(4);
            // A new daemon maps a handed VM while the old one still drains
            // it: the old one's last reclaim lands after that.
            let mut handed = SwapStore::deferred(dir.path(), 0, 4 * PAGE, compression);
            let mut old = SwapStore::in_dir(dir.path(), 0, 4 * PAGE, compression).unwrap();
            old.put(&map, PAGE, 2 * PAGE).unwrap();
            old.sync().unwrap();
            drop(old);
            assert_eq!(handed.usage().unwrap().held, 0, "{compression:?}: nothing read yet");
            handed.open().unwrap();
            assert_eq!(handed.held(0, 4 * PAGE).unwrap(), [(PAGE, 3 * PAGE)], "{compression:?}");
            assert_eq!(handed.usage().unwrap().held, 2 * PAGE, "{compression:?}");
        }
    }

    #[test]
    fn a_store_that_comes_back_keeps_the_layout_it_was_left_in() {
        let map = guest(2);
        for (left, asked) in
            [(SwapCompression::None, SwapCompression::Lz4), (SwapCompression::Lz4, SwapCompression::None)]
        {
            let dir = tempfile::tempdir().unwrap();
            let mut store = SwapStore::in_dir(dir.path(), 1, 2 * PAGE, left).unwrap();
            store.put(&map, 0, PAGE).unwrap();
            store.sync().unwrap();
            drop(store);
            let mut back = SwapStore::deferred(dir.path(), 1, 2 * PAGE, asked);
            assert_eq!(back.held(0, 2 * PAGE).unwrap(), [(0, PAGE)], "left {left:?}, asked {asked:?}");
            let packed = matches!(back.state, State::Open(Layout::Packed(_)));
            assert_eq!(packed, left == SwapCompression::Lz4);
        }
    }
}
