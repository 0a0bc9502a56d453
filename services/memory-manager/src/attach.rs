//! The attach server: accepts machines on a Unix SOCK_SEQPACKET socket,
//! validates each VM description, maps its memory, serves its rings while
//! the connection lives, and tears everything down when it ends.
//!
//! A bad description gets an error reply and a closed connection; it never
//! disturbs other VMs, each of which lives on its own connection thread.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline_attach::doorbell::WaitPolicy;
use faultline_attach::{
    decode_header, recv_message, send_message, AttachRequest, MsgKind, RegionDesc, RegionKind, Reply, Status,
    WireError, NO_FD, REGION_DEVICE, REGION_WRITABLE,
};
use hyp_core::addr::{Ipa, Pa, PAGE_SIZE};
use hyp_core::ownership::VmId;
use hyp_core::ring::{Consumer, Producer, RingKind, SharedRegion};
use memfd::{FileSeal, Memfd};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{error, info, info_span, warn};

use crate::addr::Hva;
use crate::control::ControlLoop;
use crate::daemon::Daemon;
use crate::memslot::{Memslot, Memslots, SlotFlags};
use crate::region::{ContentsWindow, GuestRegion, RegionSpec};
use crate::service::VcpuService;
use crate::vm::{PagePool, VmMemory};
use crate::vma::Vmas;
use faultline_attach::shm::MappedRegion;

/// A refused attach: the status and reason sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Status code.
    pub status: Status,
    /// Reason.
    pub message: String,
}

fn refuse(status: Status, message: impl Into<String>) -> Refusal {
    Refusal { status, message: message.into() }
}

impl From<WireError> for Refusal {
    fn from(e: WireError) -> Self {
        refuse(e.status(), e.to_string())
    }
}

/// A validated, mapped VM, ready to serve.
pub struct Attached {
    /// The VM's memory state.
    pub vm: Arc<VmMemory>,
    /// The ring region mapping (kept alive while the rings are used).
    pub rings: MappedRegion,
}

const PAGE_SIZES: [u64; 3] = [4096, 2 << 20, 1 << 30];

/// Checks a request against its fds and maps what it describes.
pub fn validate(req: &AttachRequest, fds: Vec<OwnedFd>) -> Result<Attached, Refusal> {
    let id = VmId::new(req.vm_id)
        .filter(|id| id.raw() <= 255)
        .ok_or_else(|| refuse(Status::Malformed, format!("vm id {} is not in 1..=255", req.vm_id)))?;
    if req.nr_vcpus == 0 || req.nr_vcpus > 255 {
        return Err(refuse(Status::Malformed, format!("{} vCPUs is not in 1..=255", req.nr_vcpus)));
    }
    if !(32..=48).contains(&req.ipa_bits) {
        return Err(refuse(Status::Malformed, format!("IPA size {} is not in 32..=48 bits", req.ipa_bits)));
    }
    // File descriptors: each region with an fd names a distinct one, all used.
    let mut used = HashSet::new();
    for (i, r) in req.regions.iter().enumerate() {
        let wants_fd = r.kind != RegionKind::TablePool;
        match (wants_fd, r.fd_index) {
            (false, NO_FD) => {}
            (false, _) => return Err(refuse(Status::Malformed, format!("region {i}: a table pool has no fd"))),
            (true, NO_FD) => return Err(refuse(Status::Malformed, format!("region {i}: needs an fd"))),
            (true, idx) if idx as usize >= fds.len() => {
                return Err(refuse(Status::Truncated, format!("region {i}: fd {idx} missing ({} received)", fds.len())))
            }
            (true, idx) if !used.insert(idx) => {
                return Err(refuse(Status::Malformed, format!("region {i}: fd {idx} used twice")))
            }
            _ => {}
        }
        if r.size == 0
            || !PAGE_SIZES.contains(&r.page_size)
            || r.size % r.page_size != 0
            || r.pa_base % r.page_size != 0
            || r.fd_offset % PAGE_SIZE != 0
        {
            return Err(refuse(
                Status::Malformed,
                format!("region {i}: size, page size, PA base or offset not aligned"),
            ));
        }
        if r.pa_base.checked_add(r.size).is_none_or(|end| end > 1 << 48) {
            return Err(refuse(Status::Malformed, format!("region {i}: PA window beyond 48 bits")));
        }
    }
    if used.len() != fds.len() {
        return Err(refuse(Status::Malformed, format!("{} fds received, {} described", fds.len(), used.len())));
    }
    for (i, a) in req.regions.iter().enumerate() {
        for (j, b) in req.regions.iter().enumerate().skip(i + 1) {
            // Contents lie over the guest region they fill, and only there.
            let fills = |c: &RegionDesc, g: &RegionDesc| c.kind == RegionKind::Contents && g.kind == RegionKind::Guest;
            if a.pa_base < b.pa_base + b.size && b.pa_base < a.pa_base + a.size && !fills(a, b) && !fills(b, a) {
                return Err(refuse(Status::Overlapping, format!("regions {i} and {j} overlap in PA")));
            }
        }
    }
    // Each contents region fills part of one guest region that is memory.
    let mut fills = Vec::new();
    for (i, c) in req.regions.iter().enumerate().filter(|(_, r)| r.kind == RegionKind::Contents) {
        if c.flags != 0 {
            return Err(refuse(Status::Malformed, format!("region {i}: contents take no flags")));
        }
        let inside = |g: &RegionDesc| g.pa_base <= c.pa_base && c.pa_base + c.size <= g.pa_base + g.size;
        let guest = req.regions.iter().position(|g| g.kind == RegionKind::Guest && inside(g));
        match guest {
            Some(g) if req.regions[g].flags & REGION_DEVICE == 0 => fills.push((i, g)),
            Some(g) => return Err(refuse(Status::Malformed, format!("region {i}: fills device region {g}"))),
            None => return Err(refuse(Status::Malformed, format!("region {i}: contents outside every guest region"))),
        }
    }
    let ring_regions: Vec<usize> =
        (0..req.regions.len()).filter(|&i| req.regions[i].kind == RegionKind::Rings).collect();
    if ring_regions.len() != 1 {
        return Err(refuse(
            Status::Malformed,
            format!("{} ring regions described, exactly one needed", ring_regions.len()),
        ));
    }
    // Memslots: inside a guest region, inside the IPA space, not overlapping.
    let ipa_top = 1u64 << req.ipa_bits;
    for (i, m) in req.memslots.iter().enumerate() {
        let region = req.regions.get(m.region as usize).filter(|r| r.kind == RegionKind::Guest);
        let region = region.ok_or_else(|| {
            refuse(Status::Malformed, format!("memslot {i}: region {} is not guest memory", m.region))
        })?;
        if m.size == 0 || m.gpa % PAGE_SIZE != 0 || m.size % PAGE_SIZE != 0 || m.region_offset % PAGE_SIZE != 0 {
            return Err(refuse(Status::Malformed, format!("memslot {i}: not page aligned")));
        }
        if m.gpa.checked_add(m.size).is_none_or(|end| end > ipa_top) {
            return Err(refuse(Status::Malformed, format!("memslot {i}: beyond the {}-bit IPA space", req.ipa_bits)));
        }
        if m.region_offset.checked_add(m.size).is_none_or(|end| end > region.size) {
            return Err(refuse(Status::Undersized, format!("memslot {i}: runs past the end of region {}", m.region)));
        }
        for (j, n) in req.memslots.iter().enumerate().take(i) {
            if m.gpa < n.gpa + n.size && n.gpa < m.gpa + m.size {
                return Err(refuse(Status::Overlapping, format!("memslots {j} and {i} overlap")));
            }
        }
    }
    // Map: fds must be memfds sealed against shrinking (so nothing the daemon
    // maps can vanish under it) and at least as large as described. Contents
    // are only read (a short read fails that fault, not the daemon).
    let mut files: Vec<Option<File>> = fds.into_iter().map(|fd| Some(File::from(fd))).collect();
    let mut guests = Vec::new();
    let mut guest_index = vec![usize::MAX; req.regions.len()];
    let mut rings = None;
    let mut pool = Vec::new();
    let mut contents = Vec::new();
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
                guests.push(GuestRegion::map(memfd, spec).map_err(internal)?);
            }
            RegionKind::Rings => {
                let map =
                    MappedRegion::map(memfd.as_file().as_fd(), r.fd_offset, r.size, PAGE_SIZE).map_err(internal)?;
                rings = Some(map);
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
    {
        let base = rings.base();
        // SAFETY: `rings` maps `rings.len()` bytes for as long as `Attached`
        // lives; the region is only opened here to validate it.
        let region = unsafe { SharedRegion::open(base, rings.len()) }
            .map_err(|e| refuse(Status::Undersized, format!("ring region: {e:?}")))?;
        if region.header().nr_vcpus != req.nr_vcpus as u32 + 1 {
            return Err(refuse(
                Status::Malformed,
                format!(
                    "ring region has {} ring pairs, {} vCPUs + 1 control needed",
                    region.header().nr_vcpus,
                    req.nr_vcpus
                ),
            ));
        }
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
    let vm = VmMemory::new(id, req.nr_vcpus as u32, memslots, vmas, guests, PagePool::new(pool));
    Ok(Attached { vm: Arc::new(vm), rings })
}

/// How long a ring thread of a polled machine sleeps between polls.
const POLLED_SLEEP_SLICE: Duration = Duration::from_micros(50);

/// Serves one machine connection from attach to detach.
pub fn serve_connection(daemon: &Daemon, conn: OwnedFd) {
    let reply = |status, message: String, values| {
        let r = Reply { status, message, values };
        if let Err(e) = send_message(conn.as_fd(), &r.encode(), &[]) {
            warn!(cause = %e, "sending reply failed");
        }
    };
    let attached = match receive_attach(&conn) {
        Ok((req, fds)) => validate(&req, fds).map(|a| (req, a)),
        Err(r) => Err(r),
    };
    let (req, attached) = match attached {
        Ok(a) => a,
        Err(refusal) => {
            warn!(status = ?refusal.status, reason = %refusal.message, "attach refused");
            reply(refusal.status, refusal.message, [0; 3]);
            return;
        }
    };
    let vm = attached.vm.clone();
    let span = info_span!("vm", id = %vm.id);
    let _enter = span.enter();
    if daemon.config().prefault {
        if let Err(e) = vm.prefault() {
            reply(Status::Internal, format!("prefaulting guest memory failed: {e}"), [0; 3]);
            return;
        }
    }
    let inbox = vm.control.open();
    if !daemon.register(vm.clone()) {
        reply(Status::AlreadyAttached, format!("{} is already attached", vm.id), [0; 3]);
        return;
    }
    info!(vcpus = req.nr_vcpus, memslots = req.memslots.len(), regions = req.regions.len(), "VM attached");
    reply(Status::Ok, "attached".into(), [0; 3]);

    let stop = AtomicBool::new(false);
    let base = attached.rings.base();
    // SAFETY: `attached.rings` outlives the scope below, which holds every
    // ring reference; validate() already opened it successfully.
    let region = unsafe { SharedRegion::open(base, attached.rings.len()) }.expect("validated at attach");
    let policy = &**daemon.policies();
    // A polled machine never rings doorbells: sleep in short slices.
    let sleep_slice =
        if req.flags & faultline_attach::ATTACH_POLLED != 0 { POLLED_SLEEP_SLICE } else { Duration::from_millis(500) };
    let wait = WaitPolicy { spin_polls: daemon.config().spin_polls, sleep_slice };
    let detach_requested = std::thread::scope(|s| {
        for vcpu in 0..req.nr_vcpus as u32 {
            let faults = region.ring(vcpu, RingKind::Fault).expect("in range");
            let commands = region.ring(vcpu, RingKind::Command).expect("in range");
            let (vm, stop, policy) = (&*vm, &stop, policy);
            let named = std::thread::Builder::new().name(format!("vm{}-vcpu{vcpu}", vm.id.raw()));
            let spawned = named.spawn_scoped(s, move || {
                let (Ok(faults), Ok(commands)) = (Consumer::attach(faults), Producer::attach(commands)) else {
                    warn!(vcpu, "ring indices inconsistent at attach; vCPU not served");
                    return;
                };
                if let Err(e) = VcpuService::new(vm, policy, daemon.events(), vcpu, faults, commands).run(wait, stop) {
                    warn!(vcpu, cause = ?e, "ring quarantined; vCPU no longer served");
                }
            });
            if let Err(e) = spawned {
                warn!(vcpu, cause = %e, "cannot start the vCPU's service thread; vCPU not served");
            }
        }
        {
            let control = req.nr_vcpus as u32;
            let results = region.ring(control, RingKind::Fault).expect("validated: nr_vcpus + 1 pairs");
            let commands = region.ring(control, RingKind::Command).expect("validated: nr_vcpus + 1 pairs");
            let (vm, stop) = (&*vm, &stop);
            let named = std::thread::Builder::new().name(format!("vm{}-control", vm.id.raw()));
            let spawned = named.spawn_scoped(s, move || {
                let (Ok(commands), Ok(results)) = (Producer::attach(commands), Consumer::attach(results)) else {
                    warn!("control ring indices inconsistent at attach; control commands unavailable");
                    return;
                };
                let looped =
                    ControlLoop::new(inbox, commands, results).run(wait, stop, |res| vm.note_seq(res.inval_seq));
                if let Err(e) = looped {
                    warn!(cause = ?e, "control ring quarantined; control commands unavailable");
                }
                vm.control.close();
            });
            if let Err(e) = spawned {
                warn!(cause = %e, "cannot start the control thread; control commands unavailable");
            }
        }
        let detach = wait_for_detach(&conn, daemon);
        stop.store(true, Ordering::Release);
        vm.control.close();
        for vcpu in 0..=req.nr_vcpus as u32 {
            if let Some(view) = region.ring(vcpu, RingKind::Fault) {
                faultline_attach::doorbell::wake(&view);
            }
        }
        detach
    });
    // Reclaimed pages go back into the machine's memory before it hears
    // the VM is detached.
    if let Err(e) = vm.restore_reclaimed() {
        error!(cause = %e, "restoring reclaimed pages at detach failed; the machine's memory misses them");
    }
    let released = vm.release_all();
    let remaining = vm.pins.total();
    let faults = vm.stats.faults.load(Ordering::Relaxed);
    daemon.unregister(vm.id);
    info!(pages_released = released, pins_remaining = remaining, faults, "VM detached");
    if detach_requested {
        reply(Status::Ok, "detached".into(), [released, remaining, faults]);
    }
}

fn receive_attach(conn: &OwnedFd) -> Result<(AttachRequest, Vec<OwnedFd>), Refusal> {
    set_recv_timeout(conn, Duration::from_secs(5));
    let msg = recv_message(conn.as_fd())
        .map_err(|e| refuse(Status::Truncated, format!("receiving the attach request: {e}")))?
        .ok_or_else(|| refuse(Status::Truncated, "connection closed before an attach request"))?;
    if msg.truncated {
        return Err(refuse(Status::Truncated, "attach request or its fds were cut short"));
    }
    let (kind, payload) = decode_header(&msg.bytes)?;
    if kind != MsgKind::Attach {
        return Err(refuse(Status::Malformed, format!("expected an attach request, got {kind:?}")));
    }
    Ok((AttachRequest::decode(payload)?, msg.fds))
}

fn set_recv_timeout(conn: &OwnedFd, t: Duration) {
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as i64, t.subsec_micros() as i64);
    let _ = nix::sys::socket::setsockopt(conn, nix::sys::socket::sockopt::ReceiveTimeout, &tv);
}

/// Waits until the machine detaches or hangs up, or the daemon stops.
/// Returns true for an explicit detach (which gets a reply).
fn wait_for_detach(conn: &OwnedFd, daemon: &Daemon) -> bool {
    loop {
        if daemon.stopping() {
            return false;
        }
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(_) => return false,
        }
        match recv_message(conn.as_fd()) {
            Ok(Some(msg)) => match decode_header(&msg.bytes) {
                Ok((MsgKind::Detach, _)) => return true,
                other => warn!(fd = conn.as_raw_fd(), ?other, "unexpected message while attached; ignored"),
            },
            Ok(None) | Err(_) => return false,
        }
    }
}

/// The accept loop; returns when the daemon stops.
pub fn serve(daemon: Arc<Daemon>, path: &Path) -> std::io::Result<()> {
    let listener = faultline_attach::listen(path)?;
    info!(socket = %path.display(), "attach socket listening");
    std::thread::scope(|s| {
        while !daemon.stopping() {
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(0) | Err(nix::Error::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(std::io::Error::from(e)),
            }
            match faultline_attach::accept(listener.as_fd()) {
                Ok(conn) => {
                    let d = &*daemon;
                    s.spawn(move || serve_connection(d, conn));
                }
                Err(e) => warn!(cause = %e, "accept failed"),
            }
        }
        Ok(())
    })?;
    let _ = std::fs::remove_file(path);
    Ok(())
}
