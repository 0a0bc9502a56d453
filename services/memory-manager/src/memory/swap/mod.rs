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
use std::path::Path;

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
    layout: Layout,
    /// Writes are made durable (fdatasync) before a page leaves the guest.
    durable: bool,
    in_memory: bool,
}

#[derive(Debug)]
enum Layout {
    Slots(SlotStore),
    Packed(PackedStore),
}

impl SwapStore {
    /// The store of region `index` (`size` bytes) in the VM's state
    /// directory `dir`, durable: the one a predecessor left, in whichever
    /// layout it left it (its pages are there), or a new empty one laid out
    /// as `compression` says.
    pub fn in_dir(dir: &Path, index: usize, size: u64, compression: SwapCompression) -> io::Result<Self> {
        let left = |name: &str| dir.join(name).exists();
        let layout = if left(&SlotStore::file_name(index)) {
            Layout::Slots(SlotStore::in_dir(dir, index, size)?)
        } else if left(&PackedStore::index_name(index)) || compression == SwapCompression::Lz4 {
            Layout::Packed(PackedStore::in_dir(dir, index, size)?)
        } else {
            Layout::Slots(SlotStore::in_dir(dir, index, size)?)
        };
        let probe = match &layout {
            Layout::Slots(s) => s.file(),
            Layout::Packed(p) => p.index_file(),
        };
        Ok(Self { in_memory: on_tmpfs(probe), layout, durable: true })
    }

    /// A page-slot store in a memfd: nothing outlives the daemon, and no
    /// host memory is saved; for a region reclaimed without a state
    /// directory (tests).
    pub fn in_memory(index: usize, size: u64) -> io::Result<Self> {
        Ok(Self { layout: Layout::Slots(SlotStore::in_memory(index, size)?), durable: false, in_memory: true })
    }

    /// Writes `[offset, offset + len)` of `map` (page aligned) to the
    /// store. Not held until [`Self::sync`].
    pub fn put(&mut self, map: &MappedRegion, offset: u64, len: u64) -> io::Result<()> {
        match &mut self.layout {
            Layout::Slots(s) => s.put(map, offset, len),
            Layout::Packed(p) => p.put(map, offset, len),
        }
    }

    /// Makes every page put since the last sync held, and durable if the
    /// store is: from here a page may leave the guest.
    pub fn sync(&mut self) -> io::Result<()> {
        match &mut self.layout {
            Layout::Slots(s) => s.sync(self.durable),
            Layout::Packed(p) => p.sync(self.durable),
        }
    }

    /// The ranges of `[lo, hi)` the store holds, in order.
    pub fn held(&self, lo: u64, hi: u64) -> io::Result<Vec<(u64, u64)>> {
        match &self.layout {
            Layout::Slots(s) => s.held(lo, hi),
            Layout::Packed(p) => Ok(p.held(lo, hi)),
        }
    }

    /// Copies what the store holds of `[lo, hi)` into `map` at the same
    /// offsets, then lets go of it; true if it held any. A page whose copy
    /// fails its check is an `InvalidData` error and stays held.
    pub fn take(&mut self, map: &MappedRegion, lo: u64, hi: u64) -> io::Result<bool> {
        match &mut self.layout {
            Layout::Slots(s) => s.take(map, lo, hi),
            Layout::Packed(p) => p.take(map, lo, hi, self.durable),
        }
    }

    /// Lets go of what the store holds of `[lo, hi)` (the backing has it).
    pub fn discard(&mut self, lo: u64, hi: u64) -> io::Result<()> {
        match &mut self.layout {
            Layout::Slots(s) => s.discard(lo, hi),
            Layout::Packed(p) => p.discard(lo, hi, self.durable),
        }
    }

    /// What the store holds and what that costs.
    pub fn usage(&self) -> io::Result<SwapUsage> {
        let (held, stored) = match &self.layout {
            Layout::Slots(s) => {
                let bytes = allocated(s.file())?;
                (bytes, bytes)
            }
            Layout::Packed(p) => (p.held_bytes(), p.allocated()?),
        };
        Ok(SwapUsage { held, stored, in_memory: self.in_memory })
    }
}

/// Bytes `file`'s allocated blocks take.
fn allocated(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

/// `file` is on tmpfs: its blocks are host memory.
fn on_tmpfs(file: &File) -> bool {
    use nix::sys::statfs::{fstatfs, TMPFS_MAGIC};
    fstatfs(file).is_ok_and(|fs| fs.filesystem_type() == TMPFS_MAGIC)
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

/// The data segments of `file` in `[offset, end)` (SEEK_DATA / SEEK_HOLE).
pub(crate) fn data_segments(file: &File, offset: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut at = offset as i64;
    while at < end as i64 {
        let data = match lseek(file, at, Whence::SeekData) {
            Ok(d) if d < end as i64 => d,
            Ok(_) | Err(nix::Error::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let data_end = lseek(file, data, Whence::SeekHole)?.min(end as i64);
        out.push((data as u64, data_end as u64));
        at = data_end;
    }
    Ok(out)
}
