//! Attach validation as pure checks: a request's description must be
//! consistent in itself (ids, sizes, alignment, overlaps, which region is
//! what) before any fd it names is looked at.

use std::collections::HashSet;

use faultline_attach::{
    AttachRequest, DirtyLogLayout, RegionDesc, RegionKind, Status, WireError, NO_FD, REGION_DEVICE,
};
use hyp_core::addr::PAGE_SIZE;
use hyp_core::ownership::VmId;

/// A refused attach: the status and reason sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Status code.
    pub status: Status,
    /// Reason.
    pub message: String,
}

/// A refusal with `status` and `message`.
pub fn refuse(status: Status, message: impl Into<String>) -> Refusal {
    Refusal { status, message: message.into() }
}

impl From<WireError> for Refusal {
    fn from(e: WireError) -> Self {
        refuse(e.status(), e.to_string())
    }
}

const PAGE_SIZES: [u64; 3] = [4096, 2 << 20, 1 << 30];

/// A request whose description is consistent: what mapping it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The VM id.
    pub id: VmId,
    /// `(contents region, guest region it fills)`, by request index.
    pub fills: Vec<(usize, usize)>,
}

/// Checks a request's description, given the number of fds that came with
/// it: pure, no fd is looked at (that is [`super::map`]'s job).
pub fn check(req: &AttachRequest, fds: usize) -> Result<Checked, Refusal> {
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
            (true, idx) if idx as usize >= fds => {
                return Err(refuse(Status::Truncated, format!("region {i}: fd {idx} missing ({fds} received)")))
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
    if used.len() != fds {
        return Err(refuse(Status::Malformed, format!("{fds} fds received, {} described", used.len())));
    }
    // A dirty-log region has no PA window: it is the machine's memory for
    // the logs, laid out by `DirtyLogLayout`.
    let windows = |r: &&RegionDesc| r.kind != RegionKind::DirtyLog;
    for (i, a) in req.regions.iter().enumerate().filter(|(_, r)| windows(r)) {
        for (j, b) in req.regions.iter().enumerate().skip(i + 1).filter(|(_, r)| windows(r)) {
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
    let dirty: Vec<(usize, &RegionDesc)> =
        req.regions.iter().enumerate().filter(|(_, r)| r.kind == RegionKind::DirtyLog).collect();
    if dirty.len() > 1 {
        return Err(refuse(Status::Malformed, format!("{} dirty-log regions described, one at most", dirty.len())));
    }
    if let Some(&(i, d)) = dirty.first() {
        if d.flags != 0 || d.pa_base != 0 || d.page_size != PAGE_SIZE {
            return Err(refuse(Status::Malformed, format!("region {i}: a dirty log takes no flags, PA or page size")));
        }
        let needed = DirtyLogLayout::of(&req.memslots).bytes;
        if d.size < needed {
            return Err(refuse(
                Status::Undersized,
                format!("region {i}: the dirty logs need {needed} bytes, {} described", d.size),
            ));
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
    Ok(Checked { id, fills })
}
