//! Shared-memory mappings of file descriptors (memfds), aligned to a page
//! size, unmapped on drop. The `unsafe` of mmap/munmap/madvise lives here;
//! users see bounds-checked accessors.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use nix::sys::mman::{self, MapFlags, MmapAdvise, ProtFlags};

const PAGE_SIZE: u64 = 4096;

/// Why a region could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// mmap failed.
    #[error("mmap of {len} bytes failed: {source}")]
    Map {
        /// Bytes requested.
        len: u64,
        /// errno.
        source: nix::Error,
    },
    /// The length or alignment cannot be mapped.
    #[error("region of {len} bytes with alignment {align} cannot be mapped")]
    BadGeometry {
        /// Bytes.
        len: u64,
        /// Alignment.
        align: u64,
    },
}

/// A shared mapping of part of a file, aligned to `align`; unmapped on drop.
#[derive(Debug)]
pub struct MappedRegion {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access from this crate goes
// through atomics or madvise, which are safe to issue from any thread.
unsafe impl Send for MappedRegion {}
// SAFETY: as above.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Maps `len` bytes of `fd` from `offset`, read-write and shared, at an
    /// address aligned to `align` (a power of two).
    pub fn map(fd: impl AsFd, offset: u64, len: u64, align: u64) -> Result<Self, RegionError> {
        let bad = || RegionError::BadGeometry { len, align };
        if !align.is_power_of_two() || len == 0 || len % PAGE_SIZE != 0 {
            return Err(bad());
        }
        let len_us = NonZeroUsize::new(len as usize).ok_or_else(bad)?;
        let reserve = NonZeroUsize::new((len + align) as usize).ok_or_else(bad)?;
        // SAFETY: an anonymous PROT_NONE reservation touches no existing memory.
        let hole = unsafe {
            mman::mmap_anonymous(None, reserve, ProtFlags::PROT_NONE, MapFlags::MAP_PRIVATE)
        }
        .map_err(|source| RegionError::Map { len, source })?;
        let start = hole.as_ptr() as usize;
        let aligned = (start + align as usize - 1) & !(align as usize - 1);
        // SAFETY: [aligned, aligned + len) lies inside the reservation we own,
        // so MAP_FIXED replaces only our own PROT_NONE pages.
        let mapped = unsafe {
            mman::mmap(
                NonZeroUsize::new(aligned),
                len_us,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                fd,
                offset as i64,
            )
        };
        let trim = |from: usize, to: usize| {
            if to > from {
                // SAFETY: [from, to) is slack of our own reservation.
                let _ = unsafe {
                    mman::munmap(
                        NonNull::new(from as *mut c_void).expect("nonzero"),
                        to - from,
                    )
                };
            }
        };
        let end = start + reserve.get();
        match mapped {
            Ok(p) => {
                trim(start, aligned);
                trim(aligned + len as usize, end);
                Ok(Self {
                    base: p.cast(),
                    len: len as usize,
                })
            }
            Err(source) => {
                trim(start, end);
                Err(RegionError::Map { len, source })
            }
        }
    }

    /// The first address of the mapping.
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// True if nothing is mapped (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Faults in `[offset, offset + len)` for writing (MADV_POPULATE_WRITE),
    /// as KVM's get_user_pages does for a fresh page.
    pub fn populate(&self, offset: u64, len: u64) -> nix::Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.len as u64)
        {
            return Err(nix::Error::EINVAL);
        }
        // SAFETY: the range lies inside our mapping (checked above);
        // populating does not change its contents.
        let ptr = unsafe { self.base.add(offset as usize) };
        // SAFETY: madvise on a range of our own mapping.
        unsafe { mman::madvise(ptr.cast(), len as usize, MmapAdvise::MADV_POPULATE_WRITE) }
    }

    /// Reads the byte at `offset` (for tests and checks), if in range.
    pub fn read_u8(&self, offset: u64) -> Option<u8> {
        if offset >= self.len as u64 {
            return None;
        }
        // SAFETY: `offset` is inside the mapping (checked above).
        let ptr = unsafe { self.base.as_ptr().add(offset as usize) };
        // SAFETY: a mapped byte read as an atomic tolerates concurrent writers.
        let cell = unsafe { &*(ptr as *const std::sync::atomic::AtomicU8) };
        Some(cell.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: we own this mapping; no reference into it outlives self.
        let _ = unsafe { mman::munmap(self.base.cast(), self.len) };
    }
}
