//! Work beside the fault path that must not take a core from it: a thread
//! reniced above the fault path's threads (a lower priority). A nice value
//! cannot be lowered again without `CAP_SYS_NICE`, so such work gets a
//! thread of its own, which ends with it.

use faultline_attach::priority::{set_thread_nice, this_thread_id};

/// Nice value of background work: about a tenth of a contended core
/// against a fault-path thread (CFS weights 110 and 1024).
pub const BACKGROUND_NICE: i32 = 10;

/// Sets the calling thread's nice value (on Linux nice values are per
/// thread; raising it needs no privilege).
pub fn renice_current_thread(nice: i32) -> std::io::Result<()> {
    set_thread_nice(this_thread_id(), nice)
}

/// Runs `work` on a thread of its own at [`BACKGROUND_NICE`] and returns
/// what it returns; on the calling thread if no thread can be started.
pub fn run_in_background<R: Send>(name: String, work: impl FnOnce() -> R + Send) -> R {
    // Shared with the thread, so it is still here if the thread is not.
    let work = std::sync::Mutex::new(Some(work));
    let take = || work.lock().unwrap_or_else(|e| e.into_inner()).take().expect("run once");
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new().name(name).spawn_scoped(s, || {
            if let Err(e) = renice_current_thread(BACKGROUND_NICE) {
                tracing::debug!(cause = %e, "background work at normal priority");
            }
            take()()
        });
        match spawned {
            Ok(t) => t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => take()(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> i32 {
        faultline_attach::priority::this_thread_nice().expect("this thread's nice")
    }

    #[test]
    fn background_work_runs_reniced_on_its_own_thread_and_the_caller_keeps_its_priority() {
        let before = nice();
        let (ran_at, thread) = run_in_background("bg-test".into(), || (nice(), std::thread::current().id()));
        // (A caller already niced past it stays there without privilege.)
        assert!(ran_at >= BACKGROUND_NICE, "ran at nice {ran_at}");
        assert_ne!(thread, std::thread::current().id());
        assert_eq!(nice(), before, "the caller keeps its priority");
    }
}
