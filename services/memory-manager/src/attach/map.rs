//! Mapping what a checked request describes: each fd must be what its
//! region says (a memfd sealed against shrinking, large enough; a readable
//! contents file), the ring region must hold the rings it claims, and the
//! guest regions are mapped into the daemon as the VM's layout.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use faultline_attach::shm::{MappedRegion, RingMapping};
use faultline_attach::{
    AttachRequest, DirtyLogLayout, RegionKind, Status, ATTACH_REATTACH, REGION_DEVICE, REGION_WRITABLE,
};
use hyp_core::addr::{Ipa, Pa, PAGE_SIZE};
use memfd::{FileSeal, Memfd};

use super::state::VmState;
use super::validate::{check, refuse, Checked, Refusal};
use crate::link::vm::AttachedVm;
use crate::memory::addr::Hva;
use crate::memory::bitmap::{DirtyLog, PageBitmap};
use crate::memory::layout::VmLayout;
use crate::memory::mapping::private_dirty_logs;
use crate::memory::memslot::{Memslot, Memslots, SlotFlags};
use crate::memory::pool::PagePool;
use crate::memory::pressure::HostMemory;
use crate::memory::region::{ContentsWindow, GuestRegion, RegionSpec};
use crate::memory::swap::SwapCompression;
use crate::memory::vma::Vmas;

/// A validated, mapped VM, ready to serve.
pub struct Attached {
    /// The VM's memory state.
    pub vm: Arc<AttachedVm>,
    /// The ring region mapping (kept alive while the rings are used), with
    /// the header copy validated at attach.
    pub rings: RingMapping,
}

/// Checks `req` ([`check`]), then its fds, and maps what it describes;
/// each guest region that is memory keeps reclaimed pages in its store in
/// `state`.
pub fn map(
    req: &AttachRequest,
    fds: Vec<OwnedFd>,
    state: &VmState,
    compression: SwapCompression,
    host: Arc<HostMemory>,
) -> Result<Attached, Refusal> {
    let Checked { id, fills } = check(req, fds.len())?;
    // Map: fds must be memfds sealed against shrinking (so nothing the daemon
    // maps can vanish under it) and at least as large as described. Contents
    // are only read (a short read fails that fault, not the daemon).
    let mut files: Vec<Option<File>> = fds.into_iter().map(|fd| Some(File::from(fd))).collect();
    let mut guests = Vec::new();
    let mut guest_index = vec![usize::MAX; req.regions.len()];
    let mut rings = None;
    let mut pool = Vec::new();
    let mut contents = Vec::new();
    let mut dirty = None;
    for (i, r) in req.regions.iter().enumerate() {
        if r.kind == RegionKind::TablePool {
            pool.push((Pa::new(r.pa_base), r.size));
            continue;
        }
        let file = files[r.fd_index as usize].take().expect("fd indices checked distinct");
        if r.kind == RegionKind::Contents {
            let len = file.metadata().map_err(|e| refuse(Status::Internal, format!("region {i}: {e}")))?.len();
            if r.fd_offset.checked_add(r.size).is_none_or(|end| end > len) {
                return Err(refuse(
                    Status::Undersized,
                    format!("region {i}: contents file has {len} bytes, {} needed", r.fd_offset + r.size),
                ));
            }
            contents.push((i, file));
            continue;
        }
        let memfd = Memfd::try_from_file(file)
            .map_err(|_| refuse(Status::Malformed, format!("region {i}: the fd is not a memfd")))?;
        let seals = memfd.seals().map_err(|e| refuse(Status::Internal, format!("region {i}: reading seals: {e}")))?;
        if !seals.contains(&FileSeal::SealShrink) {
            return Err(refuse(
                Status::Malformed,
                format!("region {i}: memfd must be sealed against shrinking (F_SEAL_SHRINK)"),
            ));
        }
        let len = memfd.as_file().metadata().map_err(|e| refuse(Status::Internal, e.to_string()))?.len();
        if r.fd_offset.checked_add(r.size).is_none_or(|end| end > len) {
            return Err(refuse(
                Status::Undersized,
                format!("region {i}: memfd has {len} bytes, {} needed", r.fd_offset + r.size),
            ));
        }
        let internal = |e: faultline_attach::shm::RegionError| refuse(Status::Internal, format!("region {i}: {e}"));
        match r.kind {
            RegionKind::Guest => {
                guest_index[i] = guests.len();
                let spec = RegionSpec {
                    index: i,
                    pa_base: Pa::new(r.pa_base),
                    size: r.size,
                    page_size: r.page_size,
                    fd_offset: r.fd_offset,
                    writable: r.flags & REGION_WRITABLE != 0,
                    device: r.flags & REGION_DEVICE != 0,
                };
                let mut guest = GuestRegion::map(memfd, spec).map_err(internal)?;
                if !spec.device {
                    let store = state
                        .swap_store(i, r.size, compression, req.flags & ATTACH_REATTACH != 0)
                        .map_err(|e| refuse(Status::Internal, format!("region {i}: opening its swap store: {e}")))?;
                    guest.set_swap_store(store);
                }
                guests.push(guest);
            }
            RegionKind::Rings => {
                let map =
                    MappedRegion::map(memfd.as_file().as_fd(), r.fd_offset, r.size, PAGE_SIZE).map_err(internal)?;
                rings = Some(map);
            }
            RegionKind::DirtyLog => {
                let map =
                    MappedRegion::map(memfd.as_file().as_fd(), r.fd_offset, r.size, PAGE_SIZE).map_err(internal)?;
                dirty = Some(Arc::new(map));
            }
            RegionKind::TablePool | RegionKind::Contents => unreachable!("handled above"),
        }
    }
    for (i, file) in contents {
        let (c, g) = (&req.regions[i], fills.iter().find(|f| f.0 == i).expect("checked above").1);
        let guest = &mut guests[guest_index[g]];
        let offset = c.pa_base - req.regions[g].pa_base;
        guest.add_contents(ContentsWindow { offset, len: c.size, file, file_offset: c.fd_offset });
    }
    let rings = rings.expect("exactly one ring region checked");
    // The header is read here, once: every ring the VM is served on comes
    // from this copy, whatever the machine writes there later.
    let rings = rings.into_rings().map_err(|e| refuse(Status::Undersized, format!("ring region: {e:?}")))?;
    if rings.header().nr_vcpus != req.nr_vcpus as u32 + 1 {
        return Err(refuse(
            Status::Malformed,
            format!(
                "ring region has {} ring pairs, {} vCPUs + 1 control needed",
                rings.header().nr_vcpus,
                req.nr_vcpus
            ),
        ));
    }
    let vmas = Vmas::default();
    for (gi, g) in guests.iter().enumerate() {
        vmas.insert(g.vma(gi));
    }
    let mut memslots = Memslots::default();
    for (i, m) in req.memslots.iter().enumerate() {
        let gi = guest_index[m.region as usize];
        let hva = Hva::new(guests[gi].base().raw() + m.region_offset);
        let flags = m.flags;
        memslots.insert(Memslot::new(
            i,
            Ipa::new(m.gpa),
            m.size,
            hva,
            gi,
            m.region_offset,
            SlotFlags {
                read_only: flags & faultline_attach::MEMSLOT_READ_ONLY != 0,
                dirty_log: flags & faultline_attach::MEMSLOT_DIRTY_LOG != 0,
            },
        ));
    }
    let layout = VmLayout::new(id, req.nr_vcpus as u32, memslots, vmas, guests);
    let logs = match dirty {
        Some(map) => shared_dirty_logs(req, map)?,
        None => private_dirty_logs(&layout),
    };
    Ok(Attached { vm: Arc::new(AttachedVm::with_dirty_logs(layout, PagePool::new(pool), logs, host)), rings })
}

/// The memslots' dirty logs in the machine's dirty-log region (checked to
/// be large enough), where they outlive the daemon.
fn shared_dirty_logs(req: &AttachRequest, map: Arc<MappedRegion>) -> Result<Vec<DirtyLog>, Refusal> {
    let layout = DirtyLogLayout::of(&req.memslots);
    let too_small = || refuse(Status::Undersized, "the dirty-log region is smaller than its layout");
    layout
        .places
        .iter()
        .zip(&req.memslots)
        .map(|(place, m)| match place {
            None => Ok(DirtyLog::private(0)),
            Some(p) => {
                let pages = m.size.div_ceil(PAGE_SIZE);
                let dirty = PageBitmap::shared(map.clone(), p.dirty, pages).ok_or_else(too_small)?;
                let fetching = PageBitmap::shared(map.clone(), p.fetching, pages).ok_or_else(too_small)?;
                Ok(DirtyLog::new(dirty, fetching))
            }
        })
        .collect()
}
