//! Shared-memory mappings of file descriptors (memfds), aligned to a page
//! size, unmapped on drop. The `unsafe` of mmap/munmap/madvise lives here;
//! users see bounds-checked accessors.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};

use hyp_core::ring::{HeaderError, RegionHeader, SharedRegion};
use nix::sys::mman::{self, MapFlags, ProtFlags};

const PAGE_SIZE: u64 = 4096;

/// Why a region could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// mmap failed.
    #[error("mmap of {len} bytes failed: {cause}")]
    Map {
        /// Bytes requested.
        len: u64,
        /// errno.
        cause: nix::Error,
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

/// A ring region's mapping with the header copy validated when it was
/// opened ([`MappedRegion::into_rings`]): the geometry every ring view
/// uses, which the peer cannot change by rewriting the region's header.
#[derive(Debug)]
pub struct RingMapping {
    map: MappedRegion,
    header: RegionHeader,
}

impl RingMapping {
    /// The validated header copy.
    pub fn header(&self) -> &RegionHeader {
        &self.header
    }

    /// The ring region, seen through the validated header copy (nothing is
    /// read from the header in shared memory).
    pub fn region(&self) -> SharedRegion<'_> {
        // SAFETY: the header is the copy `SharedRegion::open` returned for
        // this same mapping (`into_rings`), which stays mapped, readable and
        // writable, for as long as the borrow of `self` the region holds;
        // every user accesses it only atomically (the ring ABI).
        unsafe { SharedRegion::reopen(self.map.base, self.header) }
    }
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
        let hole = unsafe { mman::mmap_anonymous(None, reserve, ProtFlags::PROT_NONE, MapFlags::MAP_PRIVATE) }
            .map_err(|cause| RegionError::Map { len, cause })?;
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
                let _ = unsafe { mman::munmap(NonNull::new(from as *mut c_void).expect("nonzero"), to - from) };
            }
        };
        let end = start + reserve.get();
        match mapped {
            Ok(p) => {
                trim(start, aligned);
                trim(aligned + len as usize, end);
                Ok(Self { base: p.cast(), len: len as usize })
            }
            Err(cause) => {
                trim(start, end);
                Err(RegionError::Map { len, cause })
            }
        }
    }

    /// Maps `offset .. offset + len` of the file into this process's page
    /// tables now (`MADV_POPULATE_WRITE`), so that no access there takes a
    /// page fault. A page of the file not yet allocated, or allocated but
    /// never written (fallocate on shmem), is allocated and zeroed: it holds
    /// data afterwards. Nothing already there changes.
    pub fn populate(&self, offset: u64, len: u64) -> nix::Result<()> {
        let end = offset.checked_add(len).filter(|&end| end <= self.len as u64);
        if end.is_none() || offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(nix::Error::EINVAL);
        }
        let Some(len) = NonZeroUsize::new(len as usize) else { return Ok(()) };
        // SAFETY: `offset` lies inside our own mapping (checked above), so the
        // pointer is in bounds and not null.
        let start = unsafe { self.base.add(offset as usize) };
        // SAFETY: the range lies inside our own mapping; populating changes
        // no byte anyone reads (a hole reads as zeros either way).
        unsafe { mman::madvise(start.cast(), len.get(), mman::MmapAdvise::MADV_POPULATE_WRITE) }
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

    /// The ring region a peer laid out in this mapping (the whole of it),
    /// its header read once and validated.
    pub fn ring_region(&self) -> Result<SharedRegion<'_>, HeaderError> {
        // SAFETY: the mapping is readable and writable for `len` bytes for as
        // long as the borrow of `self` the region holds, and it is shared
        // memory every user accesses only atomically (the ring ABI).
        unsafe { SharedRegion::open(self.base, self.len as u64) }
    }

    /// This mapping as a ring region whose header is read once, now, and
    /// validated; every later view of its rings comes from that copy
    /// ([`RingMapping::region`]), whatever the peer writes there since.
    pub fn into_rings(self) -> Result<RingMapping, HeaderError> {
        let header = *self.ring_region()?.header();
        Ok(RingMapping { map: self, header })
    }

    /// Loads `size` bytes (1, 2, 4 or 8, naturally aligned) at `offset`,
    /// atomically so concurrent writers are tolerated. `None` if out of
    /// range, misaligned or an unsupported size.
    pub fn load(&self, offset: u64, size: u8) -> Option<u64> {
        Some(match size {
            1 => self.cell::<AtomicU8>(offset)?.load(Relaxed) as u64,
            2 => self.cell::<AtomicU16>(offset)?.load(Relaxed) as u64,
            4 => self.cell::<AtomicU32>(offset)?.load(Relaxed) as u64,
            8 => self.cell::<AtomicU64>(offset)?.load(Relaxed),
            _ => return None,
        })
    }

    /// Stores the low `size` bytes of `value` at `offset` (see [`Self::load`]).
    pub fn store(&self, offset: u64, size: u8, value: u64) -> Option<()> {
        match size {
            1 => self.cell::<AtomicU8>(offset)?.store(value as u8, Relaxed),
            2 => self.cell::<AtomicU16>(offset)?.store(value as u16, Relaxed),
            4 => self.cell::<AtomicU32>(offset)?.store(value as u32, Relaxed),
            8 => self.cell::<AtomicU64>(offset)?.store(value, Relaxed),
            _ => return None,
        }
        Some(())
    }

    /// The 64-bit word at `offset`, shared with the peer: `None` if it is
    /// outside the mapping or not 8-byte aligned.
    pub fn word(&self, offset: u64) -> Option<&AtomicU64> {
        self.cell::<AtomicU64>(offset)
    }

    /// The atomic integer at `offset`, if it lies inside the mapping and is
    /// naturally aligned.
    fn cell<T: AtomicInt>(&self, offset: u64) -> Option<&T> {
        let size = std::mem::size_of::<T>() as u64;
        if offset % size != 0 || offset.checked_add(size)? > self.len as u64 {
            return None;
        }
        // SAFETY: offset + size <= len: the pointer stays inside the mapping.
        let ptr = unsafe { self.base.as_ptr().add(offset as usize) }.cast::<T>();
        // SAFETY: the bytes lie inside our mapping, aligned for T (base is
        // page aligned, offset a multiple of T's size, which is its
        // alignment), and T is an atomic integer: valid for any bit pattern
        // and sound to share with concurrent writers.
        Some(unsafe { &*ptr })
    }

    /// Fills `[offset, offset + len)` of the mapping with `len` bytes of
    /// `file` from `file_offset` (pread straight into the mapping: one copy,
    /// as UFFDIO_COPY). A file shorter than that is an `UnexpectedEof`.
    pub fn fill_from(&self, offset: u64, len: u64, file: impl AsFd, file_offset: u64) -> std::io::Result<()> {
        self.transfer(
            offset,
            len,
            |ptr, n, at| {
                // SAFETY: `ptr..ptr + n` lies inside our live mapping (checked by
                // `transfer`); the kernel writes into it and no Rust reference to
                // those bytes exists.
                unsafe { libc::pread(file.as_fd().as_raw_fd(), ptr.cast(), n, at) }
            },
            file_offset,
        )
    }

    /// Writes `[offset, offset + len)` of the mapping to `file` at
    /// `file_offset` (pwrite straight from the mapping).
    pub fn copy_to(&self, offset: u64, len: u64, file: impl AsFd, file_offset: u64) -> std::io::Result<()> {
        self.transfer(
            offset,
            len,
            |ptr, n, at| {
                // SAFETY: `ptr..ptr + n` lies inside our live mapping (checked by
                // `transfer`); the kernel only reads it.
                unsafe { libc::pwrite(file.as_fd().as_raw_fd(), ptr.cast_const().cast(), n, at) }
            },
            file_offset,
        )
    }

    /// Copies `buf.len()` bytes from `offset` of the mapping into `buf`, once:
    /// what the peer writes meanwhile may or may not be seen, and `buf` is
    /// the copy to decide on. `None` if the range is outside the mapping.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        let ptr = self.range(offset, buf.len())?;
        // SAFETY: `ptr..ptr + buf.len()` lies inside our live mapping
        // (`range`), `buf` is our own memory and cannot overlap it (no
        // reference into the mapping is ever handed out); bytes are plain
        // data, so whatever a concurrent writer leaves is a valid value.
        unsafe { std::ptr::copy_nonoverlapping(ptr.cast_const(), buf.as_mut_ptr(), buf.len()) };
        Some(())
    }

    /// Copies `buf` into the mapping at `offset`. `None` if the range is
    /// outside the mapping.
    pub fn write_from(&self, offset: u64, buf: &[u8]) -> Option<()> {
        let ptr = self.range(offset, buf.len())?;
        // SAFETY: as in `read_into`, with the copy going the other way.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), ptr, buf.len()) };
        Some(())
    }

    /// The address of `[offset, offset + len)`, if it lies inside the mapping.
    fn range(&self, offset: u64, len: usize) -> Option<*mut u8> {
        if offset.checked_add(len as u64)? > self.len as u64 {
            return None;
        }
        // SAFETY: offset + len <= self.len: the pointer stays inside the mapping.
        Some(unsafe { self.base.as_ptr().add(offset as usize) })
    }

    /// Runs `io(pointer, bytes, file offset)` (pread or pwrite) over
    /// `[offset, offset + len)` until all of it is done.
    fn transfer(
        &self,
        offset: u64,
        len: u64,
        mut io: impl FnMut(*mut u8, usize, libc::off_t) -> isize,
        file_offset: u64,
    ) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        if offset.checked_add(len).is_none_or(|end| end > self.len as u64) {
            return Err(Error::new(ErrorKind::InvalidInput, "range outside the mapping"));
        }
        let mut done = 0u64;
        while done < len {
            let at = libc::off_t::try_from(file_offset + done).map_err(|_| Error::from(ErrorKind::InvalidInput))?;
            // SAFETY: offset + done < offset + len <= self.len: inside the mapping.
            let ptr = unsafe { self.base.as_ptr().add((offset + done) as usize) };
            match io(ptr, (len - done) as usize, at) {
                0 => return Err(Error::new(ErrorKind::UnexpectedEof, "file ends before the range")),
                n if n > 0 => done += n as u64,
                _ => match Error::last_os_error() {
                    e if e.kind() == ErrorKind::Interrupted => {}
                    e => return Err(e),
                },
            }
        }
        Ok(())
    }

    /// Reads the byte at `offset` (for tests and checks), if in range.
    pub fn read_u8(&self, offset: u64) -> Option<u8> {
        self.load(offset, 1).map(|v| v as u8)
    }
}

/// The data segments of `file` in `[offset, end)`, as `(start, end)` file
/// offsets (SEEK_DATA / SEEK_HOLE, once over the range: a hole is skipped
/// at once, a segment of data costs a walk of its pages on shmem). Holes
/// are neither read nor allocated. A file system that cannot tell holes
/// (hugetlbfs) calls all of it data.
pub fn data_segments(file: impl AsFd, offset: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let fd = file.as_fd();
    let mut out = Vec::new();
    let mut at = offset as i64;
    while at < end as i64 {
        let data = match lseek(fd, at, Whence::SeekData) {
            Ok(d) if d < end as i64 => d,
            Ok(_) | Err(nix::Error::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let data_end = lseek(fd, data, Whence::SeekHole)?.min(end as i64);
        out.push((data as u64, data_end as u64));
        at = data_end;
    }
    Ok(out)
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: we own this mapping; no reference into it outlives self.
        let _ = unsafe { mman::munmap(self.base.cast(), self.len) };
    }
}

/// The atomic integer types [`MappedRegion`] hands out references to.
trait AtomicInt: private::Sealed {}
impl AtomicInt for AtomicU8 {}
impl AtomicInt for AtomicU16 {}
impl AtomicInt for AtomicU32 {}
impl AtomicInt for AtomicU64 {}

mod private {
    pub trait Sealed {}
    impl Sealed for std::sync::atomic::AtomicU8 {}
    impl Sealed for std::sync::atomic::AtomicU16 {}
    impl Sealed for std::sync::atomic::AtomicU32 {}
    impl Sealed for std::sync::atomic::AtomicU64 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use std::os::unix::fs::FileExt;

    fn memfd(len: u64) -> std::fs::File {
        let fd = memfd::MemfdOptions::default().create("shm-test").unwrap().into_file();
        fd.set_len(len).unwrap();
        fd
    }

    /// This thread's page faults so far.
    fn page_faults() -> i64 {
        use nix::sys::resource::{getrusage, UsageWho};
        let usage = getrusage(UsageWho::RUSAGE_THREAD).unwrap();
        usage.minor_page_faults() + usage.major_page_faults()
    }

    #[test]
    fn a_populated_range_holds_data_and_is_read_without_a_page_fault() {
        let pages = 64;
        let file = memfd(pages * PAGE_SIZE);
        file.write_all_at(&[7], 3 * PAGE_SIZE).unwrap();
        let at = |p: u64| (p * PAGE_SIZE) as i64;
        nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), at(8), at(8)).unwrap();
        let map = MappedRegion::map(&file, 0, pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // Fallocated but never written: still a hole to SEEK_DATA.
        assert_eq!(data_segments(&file, 0, pages * PAGE_SIZE).unwrap(), [(3 * PAGE_SIZE, 4 * PAGE_SIZE)]);

        map.populate(0, 32 * PAGE_SIZE).unwrap();
        let before = page_faults();
        let read: u64 = (0..32).map(|p| map.read_u8(p * PAGE_SIZE).unwrap() as u64).sum();
        assert_eq!((read, page_faults() - before), (7, 0), "every populated page read without a fault");
        // The pages now hold data; nothing beyond the range was touched.
        assert_eq!(data_segments(&file, 0, pages * PAGE_SIZE).unwrap(), [(0, 32 * PAGE_SIZE)]);
        let before = page_faults();
        let read: u64 = (32..pages).map(|p| map.read_u8(p * PAGE_SIZE).unwrap() as u64).sum();
        assert_eq!(read, 0);
        assert!(page_faults() > before, "pages outside the range still fault when first read");

        assert_eq!(map.populate(PAGE_SIZE, pages * PAGE_SIZE), Err(nix::Error::EINVAL));
        assert_eq!(map.populate(1, PAGE_SIZE), Err(nix::Error::EINVAL));
        assert_eq!(map.populate(0, 0), Ok(()));
    }

    #[test]
    fn data_segments_skip_holes_and_are_cut_to_the_range() {
        let file = memfd(8 * PAGE_SIZE);
        assert_eq!(data_segments(&file, 0, 8 * PAGE_SIZE).unwrap(), []);
        file.write_all_at(&[1], PAGE_SIZE).unwrap();
        file.write_all_at(&[1; 8192], 3 * PAGE_SIZE).unwrap();
        assert_eq!(
            data_segments(&file, 0, 8 * PAGE_SIZE).unwrap(),
            [(PAGE_SIZE, 2 * PAGE_SIZE), (3 * PAGE_SIZE, 5 * PAGE_SIZE)]
        );
        assert_eq!(data_segments(&file, 2 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap(), [(3 * PAGE_SIZE, 4 * PAGE_SIZE)]);
        assert_eq!(data_segments(&file, 5 * PAGE_SIZE, 8 * PAGE_SIZE).unwrap(), []);
    }

    #[test]
    fn fills_from_and_copies_to_files() {
        let backing = memfd(4 * PAGE_SIZE);
        let map = MappedRegion::map(&backing, 0, 4 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let contents = memfd(8 * PAGE_SIZE);
        contents.write_all_at(&[0xab; 4096], 5 * PAGE_SIZE).unwrap();
        map.fill_from(PAGE_SIZE, PAGE_SIZE, &contents, 5 * PAGE_SIZE).unwrap();
        assert_eq!(
            (map.read_u8(PAGE_SIZE - 1), map.read_u8(PAGE_SIZE), map.read_u8(2 * PAGE_SIZE - 1)),
            (Some(0), Some(0xab), Some(0xab))
        );
        assert_eq!(map.read_u8(2 * PAGE_SIZE), Some(0));

        let out = memfd(0);
        map.copy_to(PAGE_SIZE, 2 * PAGE_SIZE, &out, PAGE_SIZE).unwrap();
        let mut back = [0u8; 2];
        out.read_exact_at(&mut back, 2 * PAGE_SIZE - 1).unwrap();
        assert_eq!(back, [0xab, 0]);
        assert_eq!(out.metadata().unwrap().len(), 3 * PAGE_SIZE);
    }

    #[test]
    fn short_files_and_ranges_outside_are_errors() {
        let backing = memfd(2 * PAGE_SIZE);
        let map = MappedRegion::map(&backing, 0, 2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let short = memfd(PAGE_SIZE + 100);
        let e = map.fill_from(0, 2 * PAGE_SIZE, &short, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
        let e = map.fill_from(PAGE_SIZE, 2 * PAGE_SIZE, &short, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = map.copy_to(u64::MAX, 2, &short, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
}
