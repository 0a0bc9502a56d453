//! Host fixtures for tests and benchmarks (feature `testing`, always on in
//! this crate's own unit tests): table memory in an aligned heap buffer,
//! TLBs that do nothing or record what they were asked, and a whole core
//! ([`HostCore`]) in one process. One copy, used by every in-process
//! harness: hyp-core's own tests and benches, the daemon's bug-class
//! tests and the fault round-trip benchmark.

extern crate std;

use std::boxed::Box;
use std::vec;
use std::vec::Vec;

use core::ptr::NonNull;

use crate::addr::{Ipa, Pa, PAGE_SIZE};
use crate::ownership::{Owner, PageOwnership, VmId};
use crate::ring::abi::{kind, CommandRecord};
use crate::stage2::Descriptor;
use crate::stage2::{Geometry, LinearMap, Memcache, Table, TableMemory, TlbMaintenance, MEMCACHE_CAPACITY};
use crate::vm::{Executed, Outstanding, Vm};

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// `pages` pages of heap memory posing as physical memory at `pa_start`.
pub struct HostMemory {
    _pages: Box<[Page]>,
    map: LinearMap,
}

impl HostMemory {
    /// Zeroed memory for `pages` table pages from `pa_start`.
    pub fn new(pa_start: Pa, pages: usize) -> Self {
        let mut buf: Box<[Page]> = (0..pages).map(|_| Page([0; 4096])).collect();
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("a boxed slice is never null");
        // SAFETY: `buf` is pages * 4 KiB, 4 KiB aligned, lives as long as the
        // map (both are fields of `Self`, and the box never moves its heap
        // allocation), and is only accessed through the map's atomics.
        let map = unsafe { LinearMap::new(pa_start, pages as u64 * PAGE_SIZE, base) };
        Self { _pages: buf, map }
    }

    /// The linear map over the memory.
    pub fn map(&self) -> &LinearMap {
        &self.map
    }

    /// A memcache holding `count` pages from page `first` on.
    pub fn memcache_from(&self, first: usize, count: usize) -> Memcache {
        let mut m = Memcache::new();
        for i in first..first + count {
            m.push(Pa::new(self.map.pa_start().raw() + i as u64 * PAGE_SIZE)).expect("count fits the memcache");
        }
        m
    }
}

// SAFETY: delegates to the LinearMap, whose memory `self` owns.
unsafe impl TableMemory for HostMemory {
    fn table(&self, pa: Pa) -> Option<&Table> {
        TableMemory::table(&self.map, pa)
    }
}

/// A TLB with nothing to invalidate (no CPU walks these tables).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTlb;

impl TlbMaintenance for NoTlb {
    fn invalidate_ipa(&mut self, _vmid: u8, _ipa: Ipa, _level: u8) {}
    fn sync(&mut self, _vmid: u8) {}
}

/// A TLB that records invalidations and syncs.
#[derive(Default, Debug)]
pub struct RecordingTlb {
    /// `(VMID, IPA, level)` of each invalidation, in order.
    pub invalidated: Vec<(u8, Ipa, u8)>,
    /// Syncs issued.
    pub syncs: usize,
}

impl TlbMaintenance for RecordingTlb {
    fn invalidate_ipa(&mut self, vmid: u8, ipa: Ipa, level: u8) {
        self.invalidated.push((vmid, ipa, level));
    }
    fn sync(&mut self, _vmid: u8) {
        self.syncs += 1;
    }
}

/// The core of one VM in this process, as the simulated machine hosts it
/// but without a machine: heap table memory, page ownership, and a
/// memcache topped up from the table pages after the root.
pub struct HostCore {
    /// The VM.
    pub vm: Vm<HostMemory>,
    /// Page ownership from the table memory to the end of guest memory.
    /// Its storage is leaked: a fixture lives for its test.
    pub owners: PageOwnership<'static>,
}

impl HostCore {
    /// VM `id` with `nr_vcpus` vCPUs and KVM's default geometry, over
    /// `table_pages` pages of table memory at `tables_pa`, with
    /// `[ram_pa, ram_pa + ram_len)` (above the tables) donated to it and as
    /// many table pages as the memcache holds handed over by TOPUP.
    pub fn new(id: VmId, nr_vcpus: u32, tables_pa: Pa, table_pages: usize, ram_pa: Pa, ram_len: u64) -> Self {
        let geometry = Geometry::kvm_default();
        let mem = HostMemory::new(tables_pa, table_pages);
        let tracked = ram_pa.checked_offset_from(tables_pa).expect("guest memory lies above the tables") + ram_len;
        let storage: &'static mut [u16] = Box::leak(vec![0u16; (tracked / PAGE_SIZE) as usize].into_boxed_slice());
        let mut owners = PageOwnership::new(tables_pa, storage);
        owners.transfer(ram_pa, ram_len, Owner::Host, Owner::Vm(id)).expect("guest memory is tracked and the host's");
        let mut vm = Vm::new(id, geometry, tables_pa, nr_vcpus, mem, &mut owners).expect("a valid VM");
        let root_pages = (geometry.root_size() / PAGE_SIZE) as usize;
        let pages = (table_pages - root_pages).min(MEMCACHE_CAPACITY) as u64;
        let topup = CommandRecord {
            kind: kind::TOPUP,
            pa: tables_pa.raw() + geometry.root_size(),
            size: pages * PAGE_SIZE,
            ..Default::default()
        };
        let executed = vm.execute(0, &topup.encode(), &mut owners, &mut NoTlb);
        assert_eq!(executed.result.status, 0, "topping up the memcache: {executed:?}");
        Self { vm, owners }
    }

    /// Executes `cmd` as if it arrived on `vcpu`'s command ring.
    pub fn execute(&mut self, vcpu: u32, cmd: &CommandRecord) -> Executed {
        self.vm.execute(vcpu, &cmd.encode(), &mut self.owners, &mut NoTlb)
    }
}

/// Everything a command can change in one VM's core, to compare before and
/// after: a refused command must change none of it.
#[derive(Debug, PartialEq)]
pub struct CoreSnapshot {
    /// Every leaf: IPA, level, raw descriptor, in IPA order.
    pub leaves: Vec<(u64, u8, u64)>,
    /// Table pages below the root.
    pub table_pages: u64,
    /// Pages in the memcache.
    pub memcache: usize,
    /// The invalidation sequence.
    pub inval_seq: u64,
    /// Each vCPU's outstanding fault.
    pub outstanding: Vec<Option<Outstanding>>,
    /// Pages the hypervisor owns.
    pub hyp_pages: usize,
    /// Pages the VM owns.
    pub vm_pages: usize,
}

impl CoreSnapshot {
    /// The state of `vm`, whose pages `owners` tracks.
    pub fn of<M: TableMemory>(vm: &Vm<M>, owners: &PageOwnership<'_>) -> Self {
        let mut leaves = Vec::new();
        vm.stage2()
            .for_each_leaf(&mut |ipa, level, d: Descriptor| leaves.push((ipa.raw(), level, d.raw())))
            .expect("the VM's own tables walk");
        Self {
            leaves,
            table_pages: vm.stage2().table_pages().expect("the VM's own tables walk"),
            memcache: vm.memcache_len(),
            inval_seq: vm.inval_seq(),
            outstanding: (0..vm.nr_vcpus()).map(|v| vm.outstanding(v)).collect(),
            hyp_pages: owners.count(Owner::Hyp),
            vm_pages: owners.count(Owner::Vm(vm.id())),
        }
    }
}
