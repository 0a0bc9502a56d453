//! What the API reads and acts on, handed to it by the daemon: the
//! attached VMs, the fault history and the policy host.

use std::sync::Arc;

use crate::attach::registry::VmTable;
use crate::observe::hub::EventHub;
use crate::policy::host::PolicyHost;

/// The daemon's state as the API sees it.
#[derive(Clone)]
pub struct Sources {
    /// The attached VMs.
    pub vms: Arc<VmTable>,
    /// Fault events, their history and statistics.
    pub events: Arc<EventHub>,
    /// The policy in force and the policy services behind it.
    pub policies: Arc<PolicyHost>,
}
