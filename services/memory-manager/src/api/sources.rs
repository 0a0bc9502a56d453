//! What the API reads and acts on, handed to it by the daemon: the
//! attached VMs, the fault history, the policy host and the service pool.

use crate::memory::pressure::HostMemory;
use std::sync::Arc;

use super::streams::StreamLimit;
use crate::attach::registry::VmTable;
use crate::link::pool::ServicePool;
use crate::observe::hub::EventHub;
use crate::observe::workingset::SharedSettings;
use crate::policy::host::PolicyHost;

/// How this daemon came to run: what ServerStatus says about restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// The predecessor died without stopping (its marker was still in the
    /// state directory).
    pub recovered_after_crash: bool,
    /// The VMs were handed over by a running predecessor.
    pub took_over: bool,
}

/// The daemon's state as the API sees it.
#[derive(Clone)]
pub struct Sources {
    /// How this daemon came to run.
    pub lifecycle: Lifecycle,
    /// The attached VMs.
    pub vms: Arc<VmTable>,
    /// Fault events, their history and statistics.
    pub events: Arc<EventHub>,
    /// The policy in force and the policy services behind it.
    pub policies: Arc<PolicyHost>,
    /// The threads serving every VM's fault rings.
    pub pool: Arc<ServicePool>,
    /// The Observe streams open, against their maximum.
    pub streams: Arc<StreamLimit>,
    /// The host's memory pressure and the reserve left.
    pub host: Arc<HostMemory>,
    /// The working-set monitor's settings.
    pub monitor: Arc<SharedSettings>,
}
