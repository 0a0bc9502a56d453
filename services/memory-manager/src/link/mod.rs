//! The ring link: serving an attached VM's rings. A pool of threads, one
//! per core, serves every vCPU of every VM ([`pool`]): each vCPU's service
//! runs its faults through the pipeline and sends the commands ([`vcpu`]);
//! a thread per VM owns the control ring for commands the daemon starts itself (dirty-log
//! re-arming, reclaim). A VM's service ends at once or, when a new daemon
//! takes it over, drained to a fault boundary ([`winddown`]).

pub mod access;
pub mod background;
pub mod control;
pub mod dirty;
pub mod evict;
pub mod monitor;
pub mod pool;
pub mod rebuild;
pub mod vcpu;
pub mod vm;
pub mod winddown;
pub mod working_set;

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// This daemon instance's 15-bit tag (never 0), in every command id it
/// issues: a result for a predecessor's command, still on a ring when a VM
/// re-attaches, never matches one of ours.
pub fn instance_tag() -> u64 {
    static TAG: OnceLock<u64> = OnceLock::new();
    *TAG.get_or_init(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mixed = (nanos ^ u64::from(std::process::id()) << 32).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (mixed >> 49).max(1)
    })
}
