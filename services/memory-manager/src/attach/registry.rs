//! The table of attached VMs. An id is taken for exactly as long as its
//! [`Registration`] lives, from the moment a connection reserves it (before
//! it touches anything the id names, such as the VM's state directory)
//! through the attached VM's life: every way out of a connection, a panic
//! included, drops the registration and frees the id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::admission::{Claim, Limits, OverLimit};
use crate::link::vm::AttachedVm;

/// One id's entry: the VM (`None`: reserved by a connection still
/// attaching it, or detaching it) and what it claims of the limits.
#[derive(Debug)]
struct Entry {
    vm: Option<Arc<AttachedVm>>,
    claim: Claim,
}

/// Why an id could not be reserved.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// The id is taken.
    #[error("the VM id is already attached")]
    Taken,
    /// The VM would pass an admission limit.
    #[error(transparent)]
    OverLimit(#[from] OverLimit),
}

/// The attached VMs, by id.
#[derive(Debug, Default)]
pub struct VmTable {
    vms: Mutex<HashMap<u16, Entry>>,
    /// VMs taken back from a predecessor since the daemon started.
    reattached: AtomicU64,
    /// VMs handed over to a successor.
    handed_over: AtomicU64,
}

impl VmTable {
    fn locked(&self) -> MutexGuard<'_, HashMap<u16, Entry>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes id `id` for a VM about to attach that claims `claim`, checked
    /// against the host-wide `limits` (none for a VM that comes back: it
    /// runs already) beside every VM attached or attaching.
    pub fn reserve(&self, id: u16, claim: Claim, limits: Option<&Limits>) -> Result<Registration<'_>, ReserveError> {
        let mut vms = self.locked();
        if vms.contains_key(&id) {
            return Err(ReserveError::Taken);
        }
        if let Some(limits) = limits {
            let claimed = Claim { guest_bytes: vms.values().map(|e| e.claim.guest_bytes).sum() };
            limits.check_host(claim, vms.len(), claimed)?;
        }
        vms.insert(id, Entry { vm: None, claim });
        Ok(Registration { table: self, id })
    }

    /// The VM with id `id`, if attached.
    pub fn get(&self, id: u32) -> Option<Arc<AttachedVm>> {
        u16::try_from(id).ok().and_then(|id| self.locked().get(&id).and_then(|e| e.vm.clone()))
    }

    /// Every attached VM.
    pub fn list(&self) -> Vec<Arc<AttachedVm>> {
        self.locked().values().filter_map(|e| e.vm.clone()).collect()
    }

    /// VMs attached.
    pub fn len(&self) -> usize {
        self.locked().values().filter(|e| e.vm.is_some()).count()
    }

    /// True if none is attached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts a VM taken back from a predecessor.
    pub fn note_reattached(&self) {
        self.reattached.fetch_add(1, Ordering::Relaxed);
    }

    /// VMs taken back from a predecessor since the daemon started.
    pub fn reattached(&self) -> u64 {
        self.reattached.load(Ordering::Relaxed)
    }

    /// Counts a VM handed over to a successor.
    pub fn note_handed_over(&self) {
        self.handed_over.fetch_add(1, Ordering::Relaxed);
    }

    /// VMs handed over to a successor.
    pub fn handed_over(&self) -> u32 {
        self.handed_over.load(Ordering::Relaxed) as u32
    }
}

/// A VM id's place in the [`VmTable`]; dropping it frees the id.
#[derive(Debug)]
#[must_use = "dropping a Registration frees the VM's id"]
pub struct Registration<'t> {
    table: &'t VmTable,
    id: u16,
}

impl Registration<'_> {
    /// The VM attached under the reserved id (listed from now on).
    pub fn attach(&self, vm: Arc<AttachedVm>) {
        if let Some(entry) = self.table.locked().get_mut(&self.id) {
            entry.vm = Some(vm);
        }
    }

    /// The VM is detaching: no longer listed (nor reachable through the
    /// API), its id still reserved until this is dropped.
    pub fn unlist(&self) {
        if let Some(entry) = self.table.locked().get_mut(&self.id) {
            entry.vm = None;
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.table.locked().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::layout::VmLayout;
    use crate::memory::pool::PagePool;
    use hyp_core::addr::Pa;
    use hyp_core::ownership::VmId;

    fn vm(id: u16) -> Arc<AttachedVm> {
        let layout = VmLayout::single_region(VmId::new(id).unwrap(), Pa::new(0x4000_0000), 1 << 20, 4096, &[]).unwrap();
        Arc::new(AttachedVm::new(layout, PagePool::default()))
    }

    #[test]
    fn an_id_is_taken_exactly_while_its_registration_lives() {
        let table = VmTable::default();
        let reserve = |id| table.reserve(id, Claim::default(), None);
        let first = reserve(3).expect("a free id");
        assert_eq!(reserve(3).err(), Some(ReserveError::Taken), "the id is taken");
        assert!(table.get(3).is_none() && table.is_empty(), "reserved, not yet listed");
        first.attach(vm(3));
        assert_eq!((table.len(), table.get(3).map(|v| v.id().raw())), (1, Some(3)));
        // A panic on a connection thread drops its registration too.
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = first;
            panic!("a connection thread panics");
        }));
        assert!(unwound.is_err());
        assert!(table.is_empty() && table.get(3).is_none());
        let again = reserve(3).expect("free again");
        again.attach(vm(3));
        // Detaching: unlisted, the id still taken.
        again.unlist();
        assert!(table.get(3).is_none() && table.list().is_empty());
        assert!(reserve(3).is_err(), "the id is still taken while it detaches");
        drop(again);
        assert!(table.list().is_empty());
        assert!(reserve(3).is_ok());
    }

    #[test]
    fn host_wide_limits_count_every_vm_attached_or_attaching_until_it_lets_go() {
        let table = VmTable::default();
        let limits = Limits { max_vms: Some(2), max_guest_memory_mib: Some(100), ..Limits::default() };
        let mib = |m: u64| Claim { guest_bytes: m << 20 };
        let first = table.reserve(1, mib(60), Some(&limits)).unwrap();
        // Reserved, not yet listed: it counts.
        let e = table.reserve(2, mib(41), Some(&limits)).unwrap_err();
        assert!(matches!(e, ReserveError::OverLimit(OverLimit::GuestMemory { attached_mib: 60, .. })), "{e}");
        let second = table.reserve(2, mib(40), Some(&limits)).unwrap();
        let e = table.reserve(3, mib(0), Some(&limits)).unwrap_err();
        assert_eq!(e, ReserveError::OverLimit(OverLimit::Vms { limit: 2, attached: 2 }));
        // A VM that comes back is not refused; it counts from then on.
        let back = table.reserve(4, mib(50), None).unwrap();
        drop((first, second));
        assert!(table.reserve(5, mib(51), Some(&limits)).is_err(), "the returned VM's 50 MiB count");
        drop(back);
        assert!(table.reserve(5, mib(100), Some(&limits)).is_ok());
    }
}
