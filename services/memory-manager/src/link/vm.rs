//! One attached VM as the ring link serves it: its three kinds of state
//! (the fixed layout, the rebuildable mapping state, the counters), the
//! occupancy of its rings and the client of its control ring. Each part is
//! handed on alone: the pipeline gets only a [`VmView`] of the first two.

use std::sync::{Arc, Mutex};

use hyp_core::addr::Ipa;
use hyp_core::ownership::VmId;

use super::control::ControlClient;
use super::working_set::WorkingSet;
use crate::fault::context::VmView;
use crate::memory::bitmap::DirtyLog;
use crate::memory::layout::VmLayout;
use crate::memory::mapping::{private_dirty_logs, Installed, MappingState};
use crate::memory::pool::PagePool;
use crate::memory::pressure::HostMemory;
use crate::observe::counters::VmCounters;
use crate::observe::rings::RingOccupancy;

/// One attached VM.
#[derive(Debug)]
pub struct AttachedVm {
    /// What is fixed since attach.
    pub layout: VmLayout,
    /// What changes with every fault (a cache of the core's tables).
    pub mapping: MappingState,
    /// What is counted.
    pub counters: VmCounters,
    /// Ring occupancy per vCPU.
    pub rings: Vec<RingOccupancy>,
    /// What the working-set monitor last saw.
    pub working_set: WorkingSet,
    /// Commands the daemon starts itself, over the control ring pair.
    pub control: ControlClient,
    /// The host's memory pressure, which fresh backing is admitted under.
    pub host: Arc<HostMemory>,
    /// Held by the one thread reclaiming for the VM's budget: two would
    /// pick the same victims (a page one punched, the other would copy over
    /// its good copy in the store).
    pub reclaiming: Mutex<()>,
}

impl AttachedVm {
    /// A VM with `layout` and nothing mapped, with `pool` for its core
    /// and dirty logs in the daemon's memory, on a host whose memory
    /// pressure is not watched.
    pub fn new(layout: VmLayout, pool: PagePool) -> Self {
        let dirty = private_dirty_logs(&layout);
        Self::with_dirty_logs(layout, pool, dirty, HostMemory::unwatched())
    }

    /// [`AttachedVm::new`] with the given dirty logs (one per memslot id),
    /// on `host`.
    pub fn with_dirty_logs(layout: VmLayout, pool: PagePool, dirty: Vec<DirtyLog>, host: Arc<HostMemory>) -> Self {
        let mapping = MappingState::with_dirty_logs(&layout, pool, dirty);
        let rings = (0..layout.nr_vcpus).map(|_| RingOccupancy::default()).collect();
        Self {
            layout,
            mapping,
            counters: VmCounters::default(),
            rings,
            working_set: WorkingSet::default(),
            control: ControlClient::default(),
            host,
            reclaiming: Mutex::new(()),
        }
    }

    /// The VM id.
    pub fn id(&self) -> VmId {
        self.layout.id
    }

    /// Access-flag faults the VM's core resolved without a record, as its
    /// fault rings last said (a statistic; see [`RingOccupancy`]).
    pub fn access_flag_faults(&self) -> u64 {
        self.rings.iter().map(|r| r.read().access_flag_faults).fold(0, u64::wrapping_add)
    }

    /// What the pipeline reads.
    pub fn view(&self) -> VmView<'_> {
        VmView { layout: &self.layout, mapping: &self.mapping, host: &self.host }
    }

    /// Counts and records a mapping the core installed
    /// ([`MappingState::record_installed`]).
    pub fn record_installed(&self, ipa: Ipa, installed: Installed) -> bool {
        self.counters.mapped(installed.size);
        self.mapping.record_installed(ipa, installed)
    }
}
