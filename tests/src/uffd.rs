//! The userfaultfd ABI from linux/userfaultfd.h, for the benches that
//! compare Faultline with userfaultfd serving the same pages. (The
//! userfaultfd crate's -sys half runs bindgen at build time and needs
//! libclang; these few ioctls are all the comparisons use.)

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct Register {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct Msg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

/// A userfaultfd over `[start, start + len)` in MISSING mode.
fn register(start: u64, len: u64, nonblocking: bool) -> OwnedFd {
    let flags = libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
    // SAFETY: the syscall takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = Api { api: UFFD_API, features: 0, ioctls: 0 };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: UFFDIO_API reads and writes an Api struct we own.
    let r = unsafe { libc::ioctl(raw, UFFDIO_API, &mut api) };
    assert_eq!(r, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    let mut reg = Register { start, len, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
    // SAFETY: UFFDIO_REGISTER reads and writes a Register struct we own; the range is our mapping.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), UFFDIO_REGISTER, &mut reg) };
    assert_eq!(r, 0, "UFFDIO_REGISTER: {}", std::io::Error::last_os_error());
    fd
}

/// Reads one fault; `None` if nothing is pending (non-blocking fd).
fn read_fault(fd: RawFd) -> Option<u64> {
    let mut msg = Msg { event: 0, _reserved: [0; 7], flags: 0, address: 0, _feat: 0 };
    // SAFETY: reads at most size_of::<Msg>() bytes into a Msg we own.
    let n = unsafe { libc::read(fd, (&mut msg as *mut Msg).cast(), std::mem::size_of::<Msg>()) };
    (n == std::mem::size_of::<Msg>() as isize && msg.event == UFFD_EVENT_PAGEFAULT).then_some(msg.address)
}

/// Copies `src` (4 KiB) into the faulting page at `dst` and wakes the faulter.
fn copy(fd: RawFd, dst: u64, src: *const u8) {
    let mut c = Copy { dst: dst & !0xfff, src: src as u64, len: 4096, mode: 0, copy: 0 };
    // SAFETY: UFFDIO_COPY reads a 4 KiB source we own into a registered page.
    let r = unsafe { libc::ioctl(fd, UFFDIO_COPY, &mut c) };
    assert!(r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST));
}

/// The page userfaultfd copies in (UFFDIO_COPY wants a page-aligned source).
#[repr(C, align(4096))]
pub struct Page(pub [u8; 4096]);

/// `pages` fresh 4 KiB pages of a memfd, mapped and registered with
/// userfaultfd (MISSING), plus one page more whose fault ends the handler.
pub struct Arena {
    /// The pages, as the faulting threads see them.
    pub map: faultline_attach::shm::MappedRegion,
    fd: OwnedFd,
    sentinel: u64,
    pages: u64,
    _memfd: memfd::Memfd,
}

impl Arena {
    /// The arena; `nonblocking`: the handler spins on read() instead of
    /// sleeping in it.
    pub fn new(pages: u64, nonblocking: bool) -> Self {
        use std::os::fd::AsFd;
        let len = (pages + 1) * 4096;
        let memfd = memfd::MemfdOptions::default().create("uffd").expect("memfd");
        memfd.as_file().set_len(len).expect("sizing the memfd");
        let map = faultline_attach::shm::MappedRegion::map(memfd.as_file().as_fd(), 0, len, 4096).expect("mapping");
        let base = map.base().as_ptr() as u64;
        let fd = register(base, len, nonblocking);
        Self { map, fd, sentinel: base + pages * 4096, pages, _memfd: memfd }
    }

    /// The handler: answers every fault with a copy of `src` until the
    /// sentinel page faults.
    pub fn serve(&self, src: &Page) {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        loop {
            match read_fault(raw) {
                Some(addr) => {
                    copy(raw, addr, src.0.as_ptr());
                    if addr >= self.sentinel {
                        return;
                    }
                }
                None => std::hint::spin_loop(),
            }
        }
    }

    /// Touches the sentinel page: the handler returns.
    pub fn end(&self) {
        self.map.store(self.pages * 4096, 8, 1).expect("the sentinel page");
    }
}
