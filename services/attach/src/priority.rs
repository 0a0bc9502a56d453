//! The weight of the daemon's service threads against the vCPU threads.
//!
//! The daemon raises its service threads' priority (a nice value below 0,
//! a weight in the fair scheduler several threads' worth), and a machine
//! reads it to decide whether its waiting vCPUs may pass the CPU to each
//! other instead of sleeping ([`crate::wait::vcpu_waits`]): vCPU threads
//! that stay runnable take their own weight's turns, not a weighted
//! thread's. The weight is relative: the service threads must sit
//! [`PASSING_MARGIN`] nice steps below the vCPU threads, whatever nice the
//! VMM runs those at.

/// The name the daemon gives its service threads (`fault-service-N`).
pub const SERVICE_THREAD: &str = "fault-service";

/// How many nice steps below the vCPU threads the service threads keep
/// their turns against vCPUs that pass the CPU (each step is a weight
/// about 1.25 times the last, so a margin is the same ratio at any nice).
/// Measured on 2 cores (64 vCPUs in one VM or 8 x 8 passing, vCPUs at nice
/// 0; docs/performance.md): with no margin the service thread was held off
/// a time slice at a time (p99 1.2-2.6 ms), with 10 (weight 9548 against
/// 1024) 128-243 us.
pub const PASSING_MARGIN: i32 = 10;

/// The daemon's default service thread nice: [`PASSING_MARGIN`] below an
/// ordinary thread's 0.
pub const PASSING_NICE: i32 = -PASSING_MARGIN;

/// Sets thread `tid`'s nice value (Linux: `PRIO_PROCESS` with a thread id
/// names that thread alone). Lowering it needs CAP_SYS_NICE.
pub fn set_thread_nice(tid: i32, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's id, for [`set_thread_nice`].
pub fn this_thread_id() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// The calling thread's nice value, which the threads it creates (and
/// processes it forks) start with.
pub fn this_thread_nice() -> Option<i32> {
    nice_of(std::process::id() as i32, this_thread_id())
}

/// Whether process `pid` has service threads and every one of them runs
/// [`PASSING_MARGIN`] nice steps or more below `vcpu_nice`, the vCPU
/// threads' nice. `false` where its threads cannot be read, and for pid 0
/// or less (a peer in another pid namespace shows as 0).
pub fn service_threads_weighted(pid: i32, vcpu_nice: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    let service: Vec<i32> = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter_map(|stat| name_and_nice(&stat).filter(|(name, _)| name.starts_with(SERVICE_THREAD)).map(|(_, n)| n))
        .collect();
    !service.is_empty() && service.iter().all(|&nice| nice <= vcpu_nice - PASSING_MARGIN)
}

/// The nice value of thread `tid` of process `pid`, if it can be read.
pub fn nice_of(pid: i32, tid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    name_and_nice(&stat).map(|(_, nice)| nice)
}

/// A thread's name and nice value from its `/proc/<pid>/task/<tid>/stat`
/// line. The name sits in parentheses and may hold spaces and ')': the
/// fields after it start at the last ')'.
fn name_and_nice(stat: &str) -> Option<(&str, i32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    // After the name: state (field 3) ... nice (field 19).
    let nice = stat.get(close + 1..)?.split_whitespace().nth(16)?.parse().ok()?;
    Some((name, nice))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threads_name_and_nice_are_read_past_any_parenthesis_in_its_name() {
        let stat = "4242 (fault-service-0) S 1 4240 4240 0 -1 4194368 10 0 0 0 5 7 0 0 10 -10 3 0 100 0 0";
        assert_eq!(name_and_nice(stat), Some(("fault-service-0", -10)));
        let odd = "7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        assert_eq!(name_and_nice(odd), Some(("a) b (c)", 0)));
        assert_eq!(name_and_nice("7 (short) R 1"), None);
        assert_eq!(name_and_nice(""), None);
    }

    #[test]
    fn a_process_is_weighted_only_when_all_its_service_threads_sit_a_margin_below_the_vcpus() {
        let me = std::process::id() as i32;
        assert!(!service_threads_weighted(0, 0), "pid 0 (another pid namespace) is unknown");
        assert!(!service_threads_weighted(i32::MAX, 0), "no such process");
        // Service threads of this test process: one raised, then one not.
        let raised = std::thread::Builder::new()
            .name(format!("{SERVICE_THREAD}-t0"))
            .spawn(move || -> std::io::Result<[bool; 4]> {
                set_thread_nice(this_thread_id(), PASSING_NICE)?;
                assert_eq!(this_thread_nice(), Some(PASSING_NICE));
                // Against vCPUs at 0, at 5 and at -1 (a VMM that raised them).
                let one = [0, 5, -1].map(|vcpu_nice| service_threads_weighted(me, vcpu_nice));
                let plain = std::thread::Builder::new()
                    .name(format!("{SERVICE_THREAD}-t1"))
                    .spawn(move || {
                        // A new thread inherits its creator's nice: put it back.
                        set_thread_nice(this_thread_id(), 0).unwrap();
                        service_threads_weighted(me, 0)
                    })
                    .unwrap()
                    .join()
                    .unwrap();
                Ok([one[0], one[1], one[2], plain])
            })
            .unwrap()
            .join()
            .unwrap();
        match raised {
            Ok([over_0, over_5, over_raised, plain]) => {
                assert!(over_0, "its one service thread at nice {PASSING_NICE}, the vCPUs at 0");
                assert!(over_5, "vCPUs at nice 5: a wider margin");
                assert!(!over_raised, "vCPUs at nice -1: less than the margin");
                assert!(!plain, "a second service thread at nice 0");
            }
            Err(e) if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: raising a thread's priority needs CAP_SYS_NICE ({e})");
            }
            Err(e) => panic!("setpriority: {e}"),
        }
    }
}
