//! The page-slot layout: one sparse file the size of the region, each
//! reclaimed page at its own offset. A held range is a data segment of the
//! file (SEEK_DATA), and letting go of it is a punch.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use faultline_attach::shm::{data_segments, MappedRegion};

use super::{datasync, memfd_file, punch};

/// A region's page-slot file.
#[derive(Debug)]
pub struct SlotStore {
    file: File,
    /// Writes are made durable (fdatasync) before a page leaves the guest:
    /// a file in a state directory, not a memfd.
    durable: bool,
}

impl SlotStore {
    /// The file's name in a VM's state directory.
    pub fn file_name(index: usize) -> String {
        format!("region{index}.swap")
    }

    /// The file in `dir`: created empty, or the one a predecessor left.
    pub fn in_dir(dir: &Path, index: usize, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(Self::file_name(index)))?;
        if file.metadata()?.len() != size {
            file.set_len(size)?;
        }
        Ok(Self { file, durable: true })
    }

    /// A memfd of the region's size.
    pub fn in_memory(index: usize, size: u64) -> io::Result<Self> {
        Ok(Self { file: memfd_file(format!("faultline-swap-{index}"), size)?, durable: false })
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes the range to its slots (pwrite straight from the mapping).
    pub fn put(&mut self, map: &MappedRegion, offset: u64, len: u64) -> io::Result<()> {
        map.copy_to(offset, len, &self.file, offset)
    }

    /// Makes the writes durable (a memfd has nothing to sync to).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.durable {
            datasync(&self.file)?;
        }
        Ok(())
    }

    /// The data segments in `[lo, hi)`.
    pub fn held(&self, lo: u64, hi: u64) -> io::Result<Vec<(u64, u64)>> {
        data_segments(&self.file, lo, hi)
    }

    /// Copies the held parts of `[lo, hi)` back and punches them.
    pub fn take(&mut self, map: &MappedRegion, lo: u64, hi: u64) -> io::Result<bool> {
        let held = self.held(lo, hi)?;
        for &(from, to) in &held {
            map.fill_from(from, to - from, &self.file, from)?;
            punch(&self.file, from, to - from)?;
        }
        Ok(!held.is_empty())
    }

    /// Punches `[lo, hi)`.
    pub fn discard(&mut self, lo: u64, hi: u64) -> io::Result<()> {
        Ok(punch(&self.file, lo, hi - lo)?)
    }
}
