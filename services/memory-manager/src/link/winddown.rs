//! How a VM's service threads are told to end: stopped at once (the machine
//! detached or hung up, or the daemon stops), or drained to a fault boundary
//! (a new daemon takes the VM over and must find nothing in flight).

use std::sync::atomic::{AtomicBool, Ordering};

/// The end of a VM's service: [`Winddown::stop`] ends every thread at once;
/// [`Winddown::drain`] ends each vCPU's service once none of its commands
/// is in flight, and leaves the control ring served until `stop`.
#[derive(Debug, Default)]
pub struct Winddown {
    drain: AtomicBool,
    stop: AtomicBool,
}

impl Winddown {
    /// Ends each vCPU's service at its next fault boundary.
    pub fn drain(&self) {
        self.drain.store(true, Ordering::Release);
    }

    /// Ends every service thread now (and drains).
    pub fn stop(&self) {
        self.drain();
        self.stop.store(true, Ordering::Release);
    }

    /// Set by [`Winddown::drain`] and [`Winddown::stop`]: a vCPU service
    /// waits for new faults only while this is clear.
    pub fn draining(&self) -> &AtomicBool {
        &self.drain
    }

    /// Set by [`Winddown::stop`]: nothing waits for the machine any more.
    pub fn stopping(&self) -> &AtomicBool {
        &self.stop
    }

    /// Whether [`Winddown::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}
