//! Where the daemon is scheduled relative to this machine's threads.
//!
//! Waiting vCPUs may pass the CPU to each other instead of sleeping
//! ([`crate::wait::vcpu_passes`]) only where threads that stay runnable
//! cannot take the daemon's turns. The scheduler keeps the daemon's time
//! apart in two ways: it runs on CPUs the machine may not use, or it is in
//! a CPU cgroup of its own beside the machine's, so the scheduler shares
//! time between the groups first and the daemon's group keeps its weight
//! however many vCPU threads are runnable. A cgroup that is an ancestor of
//! the other does not: there the other group counts as one more thread.

use std::path::{Path, PathBuf};

/// How the daemon's CPU time is kept apart from this process's threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apart {
    /// It may run only on CPUs this thread may not.
    Cpus,
    /// Its CPU cgroup and this process's are different, neither inside
    /// the other.
    CpuGroups,
}

/// How process `pid`'s CPU time is kept apart from this process's threads,
/// if it is: see [`Apart`]. `None` where it is not, where that cannot be
/// read, and for pid 0 or less (a peer in another pid namespace shows as
/// 0).
pub fn daemon_apart(pid: i32) -> Option<Apart> {
    if pid <= 0 {
        None
    } else if cpus_apart_from(pid) {
        Some(Apart::Cpus)
    } else if cpu_groups_apart(pid) {
        Some(Apart::CpuGroups)
    } else {
        None
    }
}

/// Whether process `pid` may run only on CPUs this thread may not (their
/// affinity masks share none): a daemon on cores set apart from this
/// machine's. `false` where either mask cannot be read.
pub fn cpus_apart_from(pid: i32) -> bool {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    if pid <= 0 {
        return false;
    }
    let (Ok(theirs), Ok(ours)) = (sched_getaffinity(Pid::from_raw(pid)), sched_getaffinity(Pid::from_raw(0))) else {
        return false;
    };
    let both = |cpu| theirs.is_set(cpu).unwrap_or(false) && ours.is_set(cpu).unwrap_or(false);
    !(0..CpuSet::count()).any(both)
}

/// Whether process `pid`'s CPU cgroup and this process's are apart.
fn cpu_groups_apart(pid: i32) -> bool {
    let read = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok();
    let (Some(theirs), Some(ours)) = (read(&pid.to_string()), read("self")) else { return false };
    let (Some(theirs), Some(ours)) = (CpuGroup::of(&theirs), CpuGroup::of(&ours)) else { return false };
    if theirs.unified != ours.unified || !theirs.apart_from(&ours) {
        return false;
    }
    // On the unified hierarchy a cgroup is a group of the CPU scheduler
    // only if its parent enabled the cpu controller for it.
    !ours.unified || {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        unified_mount(&mountinfo).is_some_and(|root| ours.has_cpu_controller(&root) && theirs.has_cpu_controller(&root))
    }
}

/// A process's cgroup in the hierarchy that holds the `cpu` controller.
#[derive(Debug, PartialEq, Eq)]
struct CpuGroup {
    /// On the unified (v2) hierarchy, not a v1 one.
    unified: bool,
    /// Its path from the hierarchy's root, `/` for the root.
    path: String,
}

impl CpuGroup {
    /// The group a `/proc/<pid>/cgroup` text names: the v1 hierarchy with
    /// the `cpu` controller if one is mounted, else the unified one.
    fn of(proc_cgroup: &str) -> Option<Self> {
        let mut unified = None;
        for line in proc_cgroup.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            if controllers.split(',').any(|c| c == "cpu") {
                return Some(Self { unified: false, path: path.to_owned() });
            }
            if id == "0" && controllers.is_empty() {
                unified = Some(Self { unified: true, path: path.to_owned() });
            }
        }
        unified
    }

    /// Neither is the other nor inside it.
    fn apart_from(&self, other: &Self) -> bool {
        !contains(&self.path, &other.path) && !contains(&other.path, &self.path)
    }

    /// Whether the unified hierarchy mounted at `root` has the cpu
    /// controller enabled for this group (its `cgroup.controllers`).
    fn has_cpu_controller(&self, root: &Path) -> bool {
        let file = root.join(self.path.trim_start_matches('/')).join("cgroup.controllers");
        std::fs::read_to_string(file).is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
    }
}

/// Whether cgroup `outer` is `inner` or one of its ancestors.
fn contains(outer: &str, inner: &str) -> bool {
    let outer = outer.trim_end_matches('/');
    inner == outer || inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with('/'))
}

/// Where the unified (v2) cgroup hierarchy is mounted, from a
/// `/proc/self/mountinfo` text.
fn unified_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fstype = fs.split_whitespace().next()?;
        let point = mount.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(point))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(unified: bool, path: &str) -> CpuGroup {
        CpuGroup { unified, path: path.to_owned() }
    }

    #[test]
    fn the_cpu_group_is_the_v1_cpu_hierarchy_when_there_is_one_else_the_unified_one() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/8fa3\n2:cpuacct:/\n1:cpu:/vms/vm1\n0::/\n";
        assert_eq!(CpuGroup::of(hybrid), Some(group(false, "/vms/vm1")));
        let joint = "5:cpu,cpuacct:/system.slice/memory-manager.service\n0::/system.slice/memory-manager.service\n";
        assert_eq!(CpuGroup::of(joint), Some(group(false, "/system.slice/memory-manager.service")));
        let unified = "0::/machine.slice/vm1.scope\n";
        assert_eq!(CpuGroup::of(unified), Some(group(true, "/machine.slice/vm1.scope")));
        assert_eq!(CpuGroup::of("4:cpuacct:/a\n"), None, "cpuacct is not cpu");
        assert_eq!(CpuGroup::of(""), None);
    }

    #[test]
    fn groups_are_apart_only_when_neither_holds_the_other() {
        let daemon = group(true, "/system.slice/memory-manager.service");
        assert!(daemon.apart_from(&group(true, "/machine.slice/vm1.scope")), "siblings' subtrees");
        assert!(group(true, "/vms/a").apart_from(&group(true, "/vms/ab")), "a name's prefix is not a parent");
        assert!(!daemon.apart_from(&group(true, "/")), "the root holds every group");
        assert!(!daemon.apart_from(&group(true, "/system.slice")), "a parent holds its children");
        assert!(!group(true, "/system.slice/").apart_from(&daemon), "a trailing slash names the same parent");
        assert!(!daemon.apart_from(&group(true, "/system.slice/memory-manager.service/vm")), "a child");
        assert!(!daemon.apart_from(&daemon), "the same group");
    }

    #[test]
    fn the_unified_hierarchy_is_found_where_it_is_mounted() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(unified_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let v1_only = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(unified_mount(v1_only), None);
    }

    #[test]
    fn this_process_is_apart_from_neither_itself_nor_an_unknown_peer() {
        let me = std::process::id() as i32;
        assert_eq!(daemon_apart(me), None, "the same CPUs and the same group");
        assert!(!cpu_groups_apart(me));
        assert_eq!(daemon_apart(0), None, "pid 0 (a peer in another pid namespace) is unknown");
        assert_eq!(daemon_apart(i32::MAX), None, "no such process");
    }

    #[test]
    fn a_process_on_other_cpus_is_apart_and_one_sharing_a_cpu_is_not() {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        let mine = sched_getaffinity(Pid::from_raw(0)).unwrap();
        let cpus: Vec<usize> = (0..CpuSet::count()).filter(|&c| mine.is_set(c).unwrap()).collect();
        let [a, b, ..] = cpus[..] else {
            eprintln!("skipped the apart case: this thread may run on one CPU only");
            return;
        };
        let one = |cpu| {
            let mut set = CpuSet::new();
            set.set(cpu).unwrap();
            set
        };
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        sched_setaffinity(pid, &one(b)).unwrap();
        // This thread on CPU a, the other process on CPU b: apart.
        sched_setaffinity(Pid::from_raw(0), &one(a)).unwrap();
        let apart = daemon_apart(pid.as_raw());
        // Both may run on b: not apart.
        sched_setaffinity(Pid::from_raw(0), &mine).unwrap();
        let sharing = daemon_apart(pid.as_raw());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(apart, Some(Apart::Cpus), "CPU {a} against CPU {b}");
        assert_eq!(sharing, None, "both may run on CPU {b}");
    }
}
