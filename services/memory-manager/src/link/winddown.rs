//! How a VM's service threads are told to end: stopped at once (the machine
//! detached or hung up, or the daemon stops), or drained to a fault boundary
//! (a new daemon takes the VM over and must find nothing in flight).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use faultline_attach::doorbell::{sleep_on, wake_word};

/// The end of a VM's service: [`Winddown::stop`] ends every thread at once;
/// [`Winddown::drain`] ends each vCPU's service once none of its commands
/// is in flight, and leaves the control ring served until `stop`.
#[derive(Debug, Default)]
pub struct Winddown {
    drain: AtomicBool,
    stop: AtomicBool,
    /// 1 once stopped: what [`Winddown::sleep`] sleeps on.
    stopped_word: AtomicU32,
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
        self.stopped_word.store(1, Ordering::Release);
        wake_word(&self.stopped_word);
    }

    /// Sleeps `d`, or less if [`Winddown::stop`] is called meanwhile;
    /// false if it was (a thread pacing itself ends at once, not after
    /// its sleep).
    pub fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while self.stopped_word.load(Ordering::Acquire) == 0 {
            let Some(left) = until.checked_duration_since(Instant::now()).filter(|l| !l.is_zero()) else {
                return true;
            };
            sleep_on(&self.stopped_word, 0, left);
        }
        false
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_lasts_its_length_unless_a_stop_ends_it() {
        let end = Winddown::default();
        let t = Instant::now();
        assert!(end.sleep(Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(20));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                end.stop();
            });
            // Ends with the stop, not after an hour.
            assert!(!end.sleep(Duration::from_secs(3600)));
        });
        assert!(!end.sleep(Duration::from_secs(3600)), "once stopped, a sleep ends at once");
    }
}
