//! Scheduling priority of the daemon's threads: the fault path (attach,
//! connection, vCPU service and control threads) runs at normal priority;
//! the API threads (the async runtime serving gRPC and metrics) run below
//! it, so observers never take a core from a thread a vCPU is waiting on.

use serde::Deserialize;

/// How the API threads are scheduled relative to the fault path.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ApiPriority {
    /// The same as the fault path.
    Normal,
    /// Nice 19: a small share of a contended core, still answered under load.
    #[default]
    Low,
    /// SCHED_IDLE: only cores nothing else wants; under a spinning workload
    /// the API may wait until the workload pauses.
    Idle,
}

/// Applies `priority` to the calling thread.
pub fn apply_to_current_thread(priority: ApiPriority) -> std::io::Result<()> {
    match priority {
        ApiPriority::Normal => Ok(()),
        ApiPriority::Low => crate::link::background::renice_current_thread(19),
        ApiPriority::Idle => {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: `param` is a valid sched_param that outlives the call;
            // pid 0 is the calling thread.
            let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_and_idle_apply_to_the_calling_thread_only() {
        let nice = || faultline_attach::priority::this_thread_nice().expect("this thread's nice");
        let before = nice();
        std::thread::spawn(move || {
            apply_to_current_thread(ApiPriority::Low).unwrap();
            assert_eq!(nice(), 19);
            apply_to_current_thread(ApiPriority::Idle).unwrap();
            // SAFETY: plain integer argument; 0 is this thread.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
        assert_eq!(nice(), before, "the spawning thread keeps its priority");
    }
}
