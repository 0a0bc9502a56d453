//! The table of attached VMs. A VM is in it for exactly as long as its
//! [`Registration`] lives: every way out of a connection, a panic included,
//! drops the registration and frees the VM's id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use hyp_core::ownership::VmId;

use crate::link::vm::AttachedVm;

/// The attached VMs, by id.
#[derive(Debug, Default)]
pub struct VmTable {
    vms: Mutex<HashMap<u16, Arc<AttachedVm>>>,
}

impl VmTable {
    fn locked(&self) -> MutexGuard<'_, HashMap<u16, Arc<AttachedVm>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `vm`, or `None` if its id is taken.
    pub fn register(&self, vm: Arc<AttachedVm>) -> Option<Registration<'_>> {
        let id = vm.id();
        let mut vms = self.locked();
        if vms.contains_key(&id.raw()) {
            return None;
        }
        vms.insert(id.raw(), vm);
        Some(Registration { table: self, id })
    }

    /// The VM with id `id`, if attached.
    pub fn get(&self, id: u32) -> Option<Arc<AttachedVm>> {
        u16::try_from(id).ok().and_then(|id| self.locked().get(&id).cloned())
    }

    /// Every attached VM.
    pub fn list(&self) -> Vec<Arc<AttachedVm>> {
        self.locked().values().cloned().collect()
    }

    /// VMs attached.
    pub fn len(&self) -> usize {
        self.locked().len()
    }

    /// True if none is attached.
    pub fn is_empty(&self) -> bool {
        self.locked().is_empty()
    }
}

/// A VM's place in the [`VmTable`]; dropping it removes the VM.
#[derive(Debug)]
#[must_use = "dropping a Registration detaches the VM from the table"]
pub struct Registration<'t> {
    table: &'t VmTable,
    id: VmId,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.table.locked().remove(&self.id.raw());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::layout::VmLayout;
    use crate::memory::pool::PagePool;
    use hyp_core::addr::Pa;

    fn vm(id: u16) -> Arc<AttachedVm> {
        let layout = VmLayout::single_region(VmId::new(id).unwrap(), Pa::new(0x4000_0000), 1 << 20, 4096, &[]).unwrap();
        Arc::new(AttachedVm::new(layout, PagePool::default()))
    }

    #[test]
    fn an_id_is_taken_exactly_while_its_registration_lives() {
        let table = VmTable::default();
        let first = table.register(vm(3)).expect("a free id");
        assert!(table.register(vm(3)).is_none(), "the id is taken");
        assert_eq!((table.len(), table.get(3).map(|v| v.id().raw())), (1, Some(3)));
        // A panic on a connection thread drops its registration too.
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = first;
            panic!("a connection thread panics");
        }));
        assert!(unwound.is_err());
        assert!(table.is_empty() && table.get(3).is_none());
        let again = table.register(vm(3)).expect("free again");
        drop(again);
        assert!(table.list().is_empty());
    }
}
