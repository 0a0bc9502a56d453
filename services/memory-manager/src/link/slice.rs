//! A pool thread's scheduler slice: short while the rings are backed up.
//!
//! With many more vCPU threads than cores, a vCPU woken by its result
//! waits for a core behind whatever holds it, up to a whole slice (EEVDF's
//! base slice: 1.4 ms on a 2-core host). A service thread that keeps its
//! core that long while dozens of vCPUs wait makes the slowest faults wait
//! for it. A thread that asks for a short slice (`sched_attr.sched_runtime`
//! of a SCHED_OTHER thread, Linux 6.12 and later; older kernels ignore it)
//! gets an earlier deadline and gives the core up sooner: the waits are
//! shared out evenly instead of a few vCPUs waiting several slices.
//!
//! Asked for only while a pass finds many rings with work. With as many
//! vCPUs as cores, a short slice only makes the spinning threads preempt
//! each other (2 vCPUs on 2 cores: 218-252k faults/s at the base slice,
//! 143-171k at 100 us), so the thread goes back to the base slice once
//! passes stay shallow.

use std::time::Duration;

/// The shortest slice the kernel grants (it clamps to 0.1-100 ms).
pub const SHORT_SLICE: Duration = Duration::from_micros(100);

/// Shallow passes in a row after which a thread takes the base slice back.
const CALM_PASSES: u32 = 32;

/// One pool thread's slice, switched by how deep its passes find the rings.
#[derive(Debug)]
pub struct SliceSwitch {
    /// Rings with work in one pass from which the slice is short.
    deep: u32,
    short: bool,
    /// Shallow passes since the last deep one.
    calm: u32,
    /// Setting the slice failed once: not tried again.
    failed: bool,
}

impl SliceSwitch {
    /// A thread at the base slice that takes the short one after a pass
    /// that finds at least `deep` rings with work.
    pub fn new(deep: u32) -> Self {
        Self { deep: deep.max(1), short: false, calm: 0, failed: false }
    }

    /// True while the thread runs on the short slice.
    pub fn is_short(&self) -> bool {
        self.short
    }

    /// Whether the slice should be short after a pass that found `busy`
    /// rings with work.
    fn wants_short(&mut self, busy: u32) -> bool {
        if busy >= self.deep {
            self.calm = 0;
            return true;
        }
        self.calm = self.calm.saturating_add(1);
        self.short && self.calm < CALM_PASSES
    }

    /// After a pass that found `busy` rings with work: switches the calling
    /// thread's slice if the depth says so.
    pub fn after_pass(&mut self, busy: u32) {
        let want = self.wants_short(busy);
        if want == self.short || self.failed {
            return;
        }
        match set_current_thread_slice(want.then_some(SHORT_SLICE)) {
            Ok(()) => self.short = want,
            Err(e) => {
                tracing::debug!(cause = %e, "the service thread's slice cannot be set; it keeps the base slice");
                self.failed = true;
            }
        }
    }
}

/// The kernel's `struct sched_attr` (its first version, 48 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Sets the calling thread's slice (`None`: the kernel's base slice),
/// keeping it SCHED_OTHER at its nice value.
pub fn set_current_thread_slice(slice: Option<Duration>) -> std::io::Result<()> {
    let mut attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        nice: current_nice(),
        runtime: slice.map_or(0, |s| s.as_nanos() as u64),
        ..SchedAttr::default()
    };
    // SAFETY: `attr` is a valid sched_attr of the size it states, alive for
    // the call; pid 0 is the calling thread; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &mut attr as *mut SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's nice value.
fn current_nice() -> i32 {
    // SAFETY: getpriority takes plain integers; 0 is the calling thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's slice as the kernel reports it.
    fn current_slice() -> Duration {
        let mut attr = SchedAttr::default();
        let size = std::mem::size_of::<SchedAttr>() as u32;
        // SAFETY: `attr` is writable for `size` bytes and alive for the call;
        // pid 0 is the calling thread; flags 0.
        let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, size, 0) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        Duration::from_nanos(attr.runtime)
    }

    #[test]
    fn the_slice_is_short_from_a_deep_pass_until_passes_stay_shallow() {
        let mut s = SliceSwitch::new(8);
        assert!(!s.wants_short(7), "shallow from the start");
        assert!(s.wants_short(8));
        s.short = true;
        for i in 1..CALM_PASSES {
            assert!(s.wants_short(2), "still short after {i} shallow passes");
        }
        assert!(!s.wants_short(0), "back after {CALM_PASSES}");
        s.short = false;
        assert!(s.wants_short(20), "and short again at the next deep one");
    }

    #[test]
    fn a_thread_switches_its_own_slice_and_back_keeping_its_nice() {
        std::thread::spawn(|| {
            crate::link::background::renice_current_thread(3).unwrap();
            let base = current_slice();
            let mut s = SliceSwitch::new(4);
            s.after_pass(4);
            assert!(s.is_short());
            assert_eq!(current_slice(), SHORT_SLICE, "6.12+: the kernel reports the slice asked for");
            assert_eq!(current_nice(), 3);
            for _ in 0..CALM_PASSES {
                s.after_pass(1);
            }
            assert!(!s.is_short());
            assert_eq!(current_slice(), base);
        })
        .join()
        .unwrap();
    }
}
