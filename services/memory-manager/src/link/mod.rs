//! The ring link: serving an attached VM's rings. A thread per vCPU runs
//! its faults through the pipeline and sends the commands; a thread per VM
//! owns the control ring for commands the daemon starts itself (dirty-log
//! re-arming, reclaim).

pub mod control;
pub mod dirty;
pub mod evict;
pub mod vcpu;
pub mod vm;
