//! The table of attached VMs. An id is taken for exactly as long as its
//! [`Registration`] lives, from the moment a connection reserves it (before
//! it touches anything the id names, such as the VM's state directory)
//! through the attached VM's life: every way out of a connection, a panic
//! included, drops the registration and frees the id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::link::vm::AttachedVm;

/// The attached VMs, by id (`None`: reserved by a connection still
/// attaching it).
#[derive(Debug, Default)]
pub struct VmTable {
    vms: Mutex<HashMap<u16, Option<Arc<AttachedVm>>>>,
    /// VMs taken back from a predecessor since the daemon started.
    reattached: AtomicU64,
    /// VMs handed over to a successor.
    handed_over: AtomicU64,
}

impl VmTable {
    fn locked(&self) -> MutexGuard<'_, HashMap<u16, Option<Arc<AttachedVm>>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes id `id` for a VM about to attach, or `None` if it is taken.
    pub fn reserve(&self, id: u16) -> Option<Registration<'_>> {
        let mut vms = self.locked();
        if vms.contains_key(&id) {
            return None;
        }
        vms.insert(id, None);
        Some(Registration { table: self, id })
    }

    /// The VM with id `id`, if attached.
    pub fn get(&self, id: u32) -> Option<Arc<AttachedVm>> {
        u16::try_from(id).ok().and_then(|id| self.locked().get(&id).cloned().flatten())
    }

    /// Every attached VM.
    pub fn list(&self) -> Vec<Arc<AttachedVm>> {
        self.locked().values().flatten().cloned().collect()
    }

    /// VMs attached.
    pub fn len(&self) -> usize {
        self.locked().values().flatten().count()
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
        self.table.locked().insert(self.id, Some(vm));
    }

    /// The VM is detaching: no longer listed (nor reachable through the
    /// API), its id still reserved until this is dropped.
    pub fn unlist(&self) {
        self.table.locked().insert(self.id, None);
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
        let first = table.reserve(3).expect("a free id");
        assert!(table.reserve(3).is_none(), "the id is taken");
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
        let again = table.reserve(3).expect("free again");
        again.attach(vm(3));
        // Detaching: unlisted, the id still taken.
        again.unlist();
        assert!(table.get(3).is_none() && table.list().is_empty());
        assert!(table.reserve(3).is_none(), "the id is still taken while it detaches");
        drop(again);
        assert!(table.list().is_empty());
        assert!(table.reserve(3).is_some());
    }
}
