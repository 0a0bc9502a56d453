//! Admission limits: what a daemon takes on before it refuses a new VM, so
//! a host is not overcommitted by attaching (a 64 GiB guest on a 24 GiB
//! host is refused at attach, not found by the OOM killer later).
//!
//! The per-VM limits (vCPUs, memslots, regions) are checked against the
//! request alone ([`Limits::check_request`]); the host-wide ones (VMs,
//! total guest memory) against what is attached, under the lock that
//! reserves the VM's id ([`crate::attach::registry::VmTable::reserve`]).
//! A VM that comes back (a re-attach after a crash, a takeover) is never
//! refused by a limit: it already runs, and counts toward them.

use faultline_attach::{AttachRequest, RegionKind};
use serde::Deserialize;

/// The daemon's admission limits (`[limits]` in the config file); a limit
/// left out is not enforced.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// VMs attached at once.
    pub max_vms: Option<usize>,
    /// vCPUs of one VM.
    pub max_vcpus_per_vm: Option<u32>,
    /// Memslots of one VM.
    pub max_memslots: Option<usize>,
    /// Regions (descriptors) of one VM.
    pub max_regions: Option<usize>,
    /// Guest memory (the bytes of every guest region) of all VMs together,
    /// in MiB.
    pub max_guest_memory_mib: Option<u64>,
}

/// A limit an attach would pass, with the numbers (the refusal's message).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverLimit {
    /// Too many VMs.
    #[error("limit max_vms = {limit} reached: {attached} VMs attached")]
    Vms {
        /// The limit.
        limit: usize,
        /// VMs attached or attaching.
        attached: usize,
    },
    /// Too many vCPUs.
    #[error("limit max_vcpus_per_vm = {limit}: the VM has {asked} vCPUs")]
    Vcpus {
        /// The limit.
        limit: u32,
        /// The request's vCPUs.
        asked: u32,
    },
    /// Too many memslots.
    #[error("limit max_memslots = {limit}: the VM has {asked} memslots")]
    Memslots {
        /// The limit.
        limit: usize,
        /// The request's memslots.
        asked: usize,
    },
    /// Too many regions.
    #[error("limit max_regions = {limit}: the VM has {asked} regions")]
    Regions {
        /// The limit.
        limit: usize,
        /// The request's regions.
        asked: usize,
    },
    /// Not enough guest memory left.
    #[error(
        "limit max_guest_memory_mib = {limit_mib}: the VM has {asked_mib} MiB of guest memory, {attached_mib} MiB are attached"
    )]
    GuestMemory {
        /// The limit, MiB.
        limit_mib: u64,
        /// The request's guest memory, MiB (rounded up).
        asked_mib: u64,
        /// Guest memory of the VMs attached or attaching, MiB (rounded up).
        attached_mib: u64,
    },
}

/// What a VM claims of the host-wide limits while it is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    /// Bytes of its guest regions.
    pub guest_bytes: u64,
}

impl Claim {
    /// What `req` claims.
    pub fn of(req: &AttachRequest) -> Self {
        let guest_bytes = req.regions.iter().filter(|r| r.kind == RegionKind::Guest).map(|r| r.size).sum();
        Self { guest_bytes }
    }
}

const MIB: u64 = 1 << 20;

impl Limits {
    /// Checks the per-VM limits against `req`.
    pub fn check_request(&self, req: &AttachRequest) -> Result<(), OverLimit> {
        let over = |limit: Option<usize>, asked: usize| limit.filter(|&l| asked > l);
        if let Some(limit) = self.max_vcpus_per_vm.filter(|&l| u32::from(req.nr_vcpus) > l) {
            return Err(OverLimit::Vcpus { limit, asked: u32::from(req.nr_vcpus) });
        }
        if let Some(limit) = over(self.max_memslots, req.memslots.len()) {
            return Err(OverLimit::Memslots { limit, asked: req.memslots.len() });
        }
        if let Some(limit) = over(self.max_regions, req.regions.len()) {
            return Err(OverLimit::Regions { limit, asked: req.regions.len() });
        }
        Ok(())
    }

    /// Checks the host-wide limits for a VM claiming `claim` beside
    /// `attached` VMs (attached or attaching) that claim `claimed`.
    pub fn check_host(&self, claim: Claim, attached: usize, claimed: Claim) -> Result<(), OverLimit> {
        if let Some(limit) = self.max_vms.filter(|&l| attached >= l) {
            return Err(OverLimit::Vms { limit, attached });
        }
        if let Some(limit_mib) = self.max_guest_memory_mib {
            let total = claimed.guest_bytes.saturating_add(claim.guest_bytes);
            if total > limit_mib.saturating_mul(MIB) {
                return Err(OverLimit::GuestMemory {
                    limit_mib,
                    asked_mib: claim.guest_bytes.div_ceil(MIB),
                    attached_mib: claimed.guest_bytes.div_ceil(MIB),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_attach::{MemslotDesc, RegionDesc};

    fn request(vcpus: u16, guest_mib: &[u64]) -> AttachRequest {
        let region = |size| RegionDesc {
            kind: RegionKind::Guest,
            flags: 0,
            pa_base: 0,
            size,
            page_size: 4096,
            fd_index: 0,
            fd_offset: 0,
        };
        AttachRequest {
            vm_id: 1,
            nr_vcpus: vcpus,
            ipa_bits: 40,
            flags: 0,
            regions: guest_mib.iter().map(|&m| region(m * MIB)).collect(),
            memslots: vec![MemslotDesc { gpa: 0, size: 4096, region: 0, flags: 0, region_offset: 0 }],
        }
    }

    #[test]
    fn each_limit_refuses_what_passes_it_and_names_itself() {
        let none = Limits::default();
        let req = request(64, &[1024, 1024]);
        assert_eq!(none.check_request(&req), Ok(()));
        assert_eq!(none.check_host(Claim::of(&req), 1000, Claim { guest_bytes: u64::MAX / 2 }), Ok(()));

        let limits = Limits {
            max_vms: Some(2),
            max_vcpus_per_vm: Some(8),
            max_memslots: Some(1),
            max_regions: Some(2),
            max_guest_memory_mib: Some(3072),
        };
        assert_eq!(limits.check_request(&request(8, &[1, 1])), Ok(()));
        let e = limits.check_request(&request(9, &[1])).unwrap_err();
        assert_eq!(e, OverLimit::Vcpus { limit: 8, asked: 9 });
        assert!(e.to_string().contains("max_vcpus_per_vm = 8"), "{e}");
        let e = limits.check_request(&request(1, &[1, 1, 1])).unwrap_err();
        assert_eq!(e, OverLimit::Regions { limit: 2, asked: 3 });
        let mut two_slots = request(1, &[1]);
        two_slots.memslots.push(two_slots.memslots[0]);
        assert_eq!(limits.check_request(&two_slots), Err(OverLimit::Memslots { limit: 1, asked: 2 }));

        let claim = Claim::of(&req);
        assert_eq!(claim.guest_bytes, 2048 * MIB, "guest regions only");
        assert_eq!(limits.check_host(claim, 1, Claim { guest_bytes: 1024 * MIB }), Ok(()), "exactly at the limit");
        let e = limits.check_host(claim, 1, Claim { guest_bytes: 1024 * MIB + 1 }).unwrap_err();
        assert_eq!(e, OverLimit::GuestMemory { limit_mib: 3072, asked_mib: 2048, attached_mib: 1025 });
        assert!(e.to_string().contains("max_guest_memory_mib = 3072"), "{e}");
        assert_eq!(
            limits.check_host(Claim::default(), 2, Claim::default()),
            Err(OverLimit::Vms { limit: 2, attached: 2 })
        );
    }
}
