//! Adaptive waiting for a ring: spin while spinning pays off, sleep on the
//! doorbell otherwise, and stop spinning when other threads want the CPUs;
//! vCPUs whose daemon runs elsewhere let each other run before they sleep.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyp_core::ring::{Consumer, Record, RingError};

use crate::doorbell::{sleep_pop, WaitPolicy};

/// What a [`Waiter`]'s waits came to (relaxed counters: a statistic).
#[derive(Debug, Default)]
pub struct WaitCounts {
    spun: AtomicU64,
    slept: AtomicU64,
    yielded: AtomicU64,
    passed: AtomicU64,
}

/// A [`WaitCounts`] reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WaitSplit {
    /// Waits a record ended while spinning.
    pub spun: u64,
    /// Waits that went to sleep on the doorbell.
    pub slept: u64,
    /// Spins given up because other threads wanted the CPUs: a spin cut
    /// short by an involuntary switch, or a wake-up that then had to wait
    /// for a CPU.
    pub yielded: u64,
    /// Waits that passed the CPU to other threads (`sched_yield`) and
    /// found the record on coming back, without sleeping.
    pub passed: u64,
}

impl WaitCounts {
    /// The current reading.
    pub fn read(&self) -> WaitSplit {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WaitSplit { spun: l(&self.spun), slept: l(&self.slept), yielded: l(&self.yielded), passed: l(&self.passed) }
    }

    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::ops::AddAssign for WaitSplit {
    fn add_assign(&mut self, o: Self) {
        self.spun += o.spun;
        self.slept += o.slept;
        self.yielded += o.yielded;
        self.passed += o.passed;
    }
}

/// Polls between two looks at whether another thread wants the CPU.
const CONTENTION_CHECK_POLLS: u32 = 512;
/// The window a growing spin starts from, in polls.
const GROW_START_POLLS: u32 = 256;
/// Waits without spinning after a spin was cut short, at first; doubled at
/// each cut in a row, up to [`MAX_COOLDOWN_WAITS`].
const MIN_COOLDOWN_WAITS: u32 = 8;
/// The most waits without spinning after a spin was cut short.
const MAX_COOLDOWN_WAITS: u32 = 4096;
/// Cuts further apart than this are not "in a row": the cooldown starts
/// again from [`MIN_COOLDOWN_WAITS`] (one preemption by a passing thread
/// must not stop a waiter with a core to itself from spinning for long).
const COOLDOWN_MEMORY: Duration = Duration::from_millis(50);

/// A wait after which this thread's time waiting for a CPU grew by more
/// than this found the host oversubscribed: it stops spinning for a cooldown.
const OVERSUBSCRIBED_RUN_DELAY: Duration = Duration::from_micros(50);

/// Time this thread spent runnable but waiting for a CPU, so far
/// (`/proc/thread-self/schedstat`'s run_delay); `None` where the kernel
/// does not report it.
pub fn run_delay() -> Option<Duration> {
    thread_local! {
        static SCHEDSTAT: Option<std::fs::File> = std::fs::File::open("/proc/thread-self/schedstat").ok();
    }
    SCHEDSTAT.with(|file| {
        read_proc(file.as_ref(), |text| Some(Duration::from_nanos(text.split_whitespace().nth(1)?.parse().ok()?)))
    })
}

/// Reads a one-line `/proc` file kept open, from its start (the kernel
/// makes it again at each read), and parses it.
fn read_proc<T>(file: Option<&std::fs::File>, parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 128];
    let n = file?.read_at(&mut buf, 0).ok()?;
    parse(std::str::from_utf8(&buf[..n]).ok()?)
}

/// Whether more threads are runnable on the host than this process has
/// CPUs (`/proc/loadavg`'s running count, the reader included, against
/// the CPUs online or, if fewer, those its affinity and cgroup quota
/// allow, as read once); `false` where the kernel does not say.
///
/// A wake-up that waited for a CPU means contention only when this holds:
/// in a virtual machine, a CPU that went idle halts, and waking a thread
/// on it waits for the hypervisor to run that vCPU again (a halt exit).
/// That wait shows in `run_delay` too, and it is what spinning avoids. A
/// process held to fewer CPUs than the host has compares the host's
/// running count with its own share, which errs towards crowded: a quota
/// spun away throttles the whole process.
pub fn host_crowded() -> bool {
    thread_local! {
        static LOADAVG: Option<std::fs::File> = std::fs::File::open("/proc/loadavg").ok();
    }
    let cpus = process_cpus();
    LOADAVG.with(|file| read_proc(file.as_ref(), runnable_in_loadavg)).is_some_and(|running| running > cpus)
}

/// The CPUs this process has (see [`cpus_of`]), as read once.
fn process_cpus() -> u32 {
    static CPUS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| cpus_of(online_cpus(), std::thread::available_parallelism().ok().map(|n| n.get())))
}

/// The CPUs online (sysconf).
fn online_cpus() -> i64 {
    // SAFETY: sysconf reads a system constant and has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }
}

/// Whether this process may run on fewer CPUs than are online (an
/// affinity mask or a cgroup quota): its cores were set apart from the
/// rest of the host's threads.
pub fn held_to_fewer_cpus() -> bool {
    process_cpus() < cpus_of(online_cpus(), None)
}

/// Where the daemon that answers a machine's vCPUs runs against their
/// CPUs, as it stood at the attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonPlace {
    /// On none of the machine's CPUs ([`cpus_apart_from`]).
    Apart,
    /// On the machine's CPUs, every service thread weighted above the
    /// vCPU threads ([`crate::priority::service_threads_weighted`]): it
    /// keeps its turns, and while faults flow its serving thread takes a
    /// CPU's worth of them.
    Weighted,
    /// On the machine's CPUs at the vCPUs' own weight, or unknown.
    Sharing,
}

impl DaemonPlace {
    /// Where daemon `pid` (`None`: unknown) runs against the calling
    /// thread's CPUs, weighed against the calling thread's nice (the vCPU
    /// threads it starts inherit both).
    pub fn of(pid: Option<i32>) -> Self {
        use crate::priority::{service_threads_weighted, this_thread_nice};
        let Some(pid) = pid else { return Self::Sharing };
        if cpus_apart_from(pid) {
            Self::Apart
        } else if this_thread_nice().is_some_and(|nice| service_threads_weighted(pid, nice)) {
            Self::Weighted
        } else {
            Self::Sharing
        }
    }
}

/// How a machine's vCPU threads wait for their answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuWaits {
    /// The longest spin on the answer ring ([`WaitPolicy::spin_polls`]).
    pub spin_polls: u32,
    /// Times a waiter passes the CPU to the others before it sleeps
    /// ([`Waiter::passing`]).
    pub passes: u32,
}

/// Times a waiting vCPU passes the CPU to the others before sleeping.
const VCPU_PASSES: u32 = 4;

/// How the waiters of a machine's `vcpus` vCPU threads wait, spinning up
/// to `spin_polls` where they may, against the daemon at `daemon`.
///
/// **Spin only while each vCPU has a CPU.** vCPUs that outnumber the CPUs
/// left to them crowd those CPUs by themselves: a spin only keeps a CPU
/// from another vCPU, as KVM's halt polling stops when other tasks wait
/// for the CPU. The CPUs left to them are this process's, less one where
/// a weighted daemon shares them (its serving thread takes that one's
/// worth while faults flow, and a vCPU spinning beside it was held off:
/// 2 vCPUs on 2 cores spinning ran 62-382k faults/s, passing 328-392k
/// with p99 7-10 us against 25-46). An ordinary daemon beside them is not
/// counted: there the vCPUs could only sleep instead, and 2 vCPUs
/// sleeping ran 59-75k against 127-172k spinning. The adaptive window
/// ([`Waiter`]) still handles the load nobody can know beforehand. Earlier
/// on 2 cores, never spinning against spinning: 16 vCPUs 176-203k
/// against 133-166k, 64 156-198k against 132-182k.
///
/// **Pass the CPU before sleeping when the daemon keeps its turns**
/// ([`DaemonPlace::Apart`] or [`DaemonPlace::Weighted`]) and the vCPUs may
/// not spin. A waiting vCPU that lets the others run finds its answer on
/// its return, and neither the daemon (a futex wake, a few microseconds in
/// a VM) nor the vCPU (a sleep) pays for a wake-up. Beside an ordinary
/// daemon, vCPUs that stay runnable would take its turns: measured on 2
/// cores, 64 vCPUs passing ran twice the faults a second but the daemon's
/// thread was held off for a time slice at a time (p99 2-4 ms instead of
/// 0.6-0.8), so there they sleep.
pub fn vcpu_waits(spin_polls: u32, vcpus: u32, daemon: DaemonPlace) -> VcpuWaits {
    waits_for(spin_polls, vcpus, process_cpus(), daemon)
}

/// [`vcpu_waits`] for a process with `cpus` CPUs.
fn waits_for(spin_polls: u32, vcpus: u32, cpus: u32, daemon: DaemonPlace) -> VcpuWaits {
    let left = match daemon {
        DaemonPlace::Weighted => cpus.saturating_sub(1),
        DaemonPlace::Apart | DaemonPlace::Sharing => cpus,
    };
    let crowded = vcpus > left;
    VcpuWaits {
        spin_polls: if crowded { 0 } else { spin_polls },
        passes: if crowded && daemon != DaemonPlace::Sharing { VCPU_PASSES } else { 0 },
    }
}

/// Whether process `pid` may run only on CPUs this thread may not (their
/// affinity masks share none): a daemon on cores set apart from this
/// machine's. `false` where either mask cannot be read, and for pid 0 (a
/// peer in another pid namespace shows as 0).
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

/// The CPUs a process has: those `online` (sysconf; at least 1, and 1 if
/// unknown), or fewer if its affinity and quota `allowed` fewer.
fn cpus_of(online: i64, allowed: Option<usize>) -> u32 {
    let online = u32::try_from(online).unwrap_or(1).max(1);
    allowed.map_or(online, |a| online.min(u32::try_from(a).unwrap_or(u32::MAX)).max(1))
}

/// The running count in a `/proc/loadavg` line (`0.50 0.40 0.30 3/456 789`: 3).
fn runnable_in_loadavg(text: &str) -> Option<u32> {
    text.split_whitespace().nth(3)?.split_once('/')?.0.parse().ok()
}

/// This thread's involuntary context switches so far: a rise while it spun
/// means another runnable thread wanted its CPU.
pub fn involuntary_switches() -> u64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0, |usage| usage.involuntary_context_switches() as u64)
}

/// Where a [`Waiter`] looks for other threads wanting the CPUs.
#[derive(Clone, Copy, Debug)]
pub struct Probes {
    /// This thread's involuntary context switches so far.
    pub switches: fn() -> u64,
    /// This thread's time spent runnable, waiting for a CPU, so far.
    pub run_delay: fn() -> Option<Duration>,
    /// Whether the host has more runnable threads than CPUs right now.
    pub crowded: fn() -> bool,
}

impl Probes {
    /// The host's own counters: [`involuntary_switches`], [`run_delay`],
    /// [`host_crowded`].
    pub const HOST: Probes = Probes { switches: involuntary_switches, run_delay, crowded: host_crowded };
}

/// A waiter that spins only while spinning pays off.
///
/// The spin window adapts as the haltpoll cpuidle governor's does: a sleep
/// that a longer spin would have caught (woken within the longest window)
/// doubles the window, a sleep longer than that halves it. And it stops
/// spinning at once when another thread wants its CPU, as KVM's halt
/// polling does (`single_task_running()`), seen from user space as an
/// involuntary context switch during the spin, or as a wake-up that then
/// waited for a CPU ([`run_delay`]) while the host had more runnable
/// threads than CPUs ([`host_crowded`]); it then sleeps for a cooldown of
/// waits that doubles while that keeps happening. So spinners that
/// outnumber the cores stop stealing them from the threads they wait for,
/// and a waiter with a core to itself spins as before.
#[derive(Debug)]
pub struct Waiter<'c> {
    policy: WaitPolicy,
    window: u32,
    cooldown: u32,
    cooldown_len: u32,
    /// Nanoseconds one poll takes, as last measured over a whole window.
    poll_ns: f64,
    counts: &'c WaitCounts,
    probes: Probes,
    /// Times a wait passes the CPU to other threads before it sleeps.
    passes: u32,
    /// [`run_delay`] after the last sleep.
    delayed: Option<Duration>,
    /// When spinning was last given up.
    last_cut: Option<std::time::Instant>,
}

impl<'c> Waiter<'c> {
    /// A waiter spinning at most `policy.spin_polls` polls, counting into `counts`.
    pub fn new(policy: WaitPolicy, counts: &'c WaitCounts) -> Self {
        Self::with_probes(policy, counts, Probes::HOST)
    }

    /// [`Waiter::new`] looking at other [`Probes`] (tests).
    pub fn with_probes(policy: WaitPolicy, counts: &'c WaitCounts, probes: Probes) -> Self {
        Self {
            policy,
            window: policy.spin_polls.min(GROW_START_POLLS),
            cooldown: 0,
            cooldown_len: MIN_COOLDOWN_WAITS,
            poll_ns: 5.0,
            counts,
            probes,
            passes: 0,
            delayed: None,
            last_cut: None,
        }
    }

    /// Before sleeping, passes the CPU to other threads (`sched_yield`) up
    /// to `passes` times, polling after each: for waiters that outnumber
    /// their CPUs while whoever answers keeps its turns (see
    /// [`vcpu_waits`]), a record that arrives while the others run is
    /// taken without a wake-up on either side.
    pub fn passing(mut self, passes: u32) -> Self {
        self.passes = passes;
        self
    }

    /// Changes the longest spin to `polls` (a waiter whose polls grow
    /// dearer, such as a pass over more rings, spins fewer of them).
    pub fn set_spin_limit(&mut self, polls: u32) {
        self.policy.spin_polls = polls;
        self.window = self.window.min(polls);
    }

    /// The current spin window, in polls.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Pops the next record: spins for the current window (unless cooling
    /// down), then sleeps on the doorbell until one arrives or `stop` is set
    /// (then `Ok(None)`).
    pub fn pop(&mut self, consumer: &mut Consumer<'_>, stop: &AtomicBool) -> Result<Option<Record>, RingError> {
        let slice = self.policy.sleep_slice;
        self.wait(consumer, |c| c.pop(), |c| sleep_pop(c, slice, stop))
    }

    /// Waits for what `poll` finds in `on`: polls once, then for the
    /// current spin window (unless cooling down), then after each pass of
    /// the CPU (see [`Waiter::passing`]), then calls `sleep`, which blocks
    /// until something arrives (`Some`) or the wait is called off (`None`).
    pub fn wait<S: ?Sized, T, E>(
        &mut self,
        on: &mut S,
        mut poll: impl FnMut(&mut S) -> Result<Option<T>, E>,
        sleep: impl FnOnce(&mut S) -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E> {
        if let Some(r) = poll(on)? {
            return Ok(Some(r));
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
        } else if self.window > 0 {
            match self.spin(on, &mut poll)? {
                Spin::Got(r) => {
                    WaitCounts::add(&self.counts.spun);
                    return Ok(Some(r));
                }
                Spin::CutShort => {
                    WaitCounts::add(&self.counts.yielded);
                    self.cool_down();
                }
                Spin::Empty => {}
            }
        }
        for _ in 0..self.passes {
            std::thread::yield_now();
            if let Some(r) = poll(on)? {
                WaitCounts::add(&self.counts.passed);
                return Ok(Some(r));
            }
        }
        WaitCounts::add(&self.counts.slept);
        let slept = std::time::Instant::now();
        let got = sleep(on)?;
        if got.is_some() && self.policy.spin_polls > 0 {
            // Woken, and then kept waiting for a CPU while the host has
            // more runnable threads than CPUs: spinning would take one. (A
            // wait with CPUs to spare was an idle CPU waking up, which
            // spinning avoids: see [`host_crowded`].)
            let delayed = (self.probes.run_delay)();
            let waited = match (self.delayed, delayed) {
                (Some(before), Some(now)) => now.saturating_sub(before),
                _ => Duration::ZERO,
            };
            self.delayed = delayed;
            if waited > OVERSUBSCRIBED_RUN_DELAY && (self.probes.crowded)() {
                WaitCounts::add(&self.counts.yielded);
                self.cool_down();
            } else {
                self.adapt(slept.elapsed());
            }
        }
        Ok(got)
    }

    /// Stops spinning for a cooldown of waits, longer each time in a row.
    fn cool_down(&mut self) {
        let now = std::time::Instant::now();
        if self.last_cut.is_some_and(|t| now.duration_since(t) > COOLDOWN_MEMORY) {
            self.cooldown_len = MIN_COOLDOWN_WAITS;
        }
        self.last_cut = Some(now);
        self.window = 0;
        self.cooldown = self.cooldown_len;
        self.cooldown_len = (self.cooldown_len * 2).min(MAX_COOLDOWN_WAITS);
    }

    fn spin<S: ?Sized, T, E>(
        &mut self,
        on: &mut S,
        poll: &mut impl FnMut(&mut S) -> Result<Option<T>, E>,
    ) -> Result<Spin<T>, E> {
        let start = std::time::Instant::now();
        let mut switches = (self.probes.switches)();
        for i in 1..=self.window {
            if let Some(r) = poll(on)? {
                // A spin that pays off: the cuts in a row are over.
                self.cooldown_len = (self.cooldown_len / 2).max(MIN_COOLDOWN_WAITS);
                return Ok(Spin::Got(r));
            }
            if i % CONTENTION_CHECK_POLLS == 0 || i == self.window {
                let now = (self.probes.switches)();
                if now != switches {
                    return Ok(Spin::CutShort);
                }
                switches = now;
            }
            spin_loop();
        }
        self.poll_ns = start.elapsed().as_nanos() as f64 / f64::from(self.window.max(1));
        Ok(Spin::Empty)
    }

    /// haltpoll's rule, after a sleep of `slept` that ended with a record.
    fn adapt(&mut self, slept: Duration) {
        let longest = Duration::from_nanos((self.poll_ns * f64::from(self.policy.spin_polls)) as u64);
        if slept <= longest {
            if self.cooldown == 0 && self.window < self.policy.spin_polls {
                self.window = (self.window * 2).max(GROW_START_POLLS).min(self.policy.spin_polls);
            }
        } else {
            self.window /= 2;
        }
    }
}

enum Spin<T> {
    Got(T),
    Empty,
    CutShort,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::push_and_ring;
    use hyp_core::ring::{OwnedRing, Producer};
    use std::sync::Arc;

    static SWITCHES: AtomicU64 = AtomicU64::new(0);

    /// Another thread took the CPU at every look.
    fn always_preempted() -> u64 {
        SWITCHES.fetch_add(1, Ordering::Relaxed)
    }

    fn never_preempted() -> u64 {
        0
    }

    fn no_delay() -> Option<Duration> {
        Some(Duration::ZERO)
    }

    static DELAY_MS: AtomicU64 = AtomicU64::new(0);

    /// Every wake-up then waits 1 ms for a CPU.
    fn slow_wake_ups() -> Option<Duration> {
        Some(Duration::from_millis(DELAY_MS.fetch_add(1, Ordering::Relaxed)))
    }

    const QUIET: Probes = Probes { switches: never_preempted, run_delay: no_delay, crowded: || false };

    /// Sleeps three times on `w`, each woken 5 ms later by another thread,
    /// after three records that were there before the wait.
    fn three_sleeps(w: &mut Waiter<'_>) {
        let ring = Arc::new(OwnedRing::new());
        let stop = AtomicBool::new(false);
        w.window = 0; // sleep at once
        let mut p = Producer::attach(ring.view()).unwrap();
        let mut c = Consumer::attach(ring.view()).unwrap();
        for round in 0..3 {
            push_and_ring(&mut p, &Record([round; 8])).unwrap();
            assert_eq!(w.pop(&mut c, &stop).unwrap(), Some(Record([round; 8])));
        }
        // The record was there before the wait: no wait at all, no verdict.
        assert_eq!(w.counts.read(), WaitSplit::default());
        for round in 3..6u64 {
            let r2 = ring.clone();
            let producer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                let mut p = Producer::attach(r2.view()).unwrap();
                push_and_ring(&mut p, &Record([round; 8])).unwrap();
            });
            assert_eq!(w.pop(&mut c, &stop).unwrap(), Some(Record([round; 8])));
            producer.join().unwrap();
        }
    }

    #[test]
    fn a_wake_up_that_waits_for_a_cpu_on_a_crowded_host_stops_the_spinning() {
        let counts = WaitCounts::default();
        let policy = WaitPolicy { spin_polls: 2_000, sleep_slice: Duration::from_secs(10) };
        let probes = Probes { run_delay: slow_wake_ups, crowded: || true, ..QUIET };
        let mut w = Waiter::with_probes(policy, &counts, probes);
        three_sleeps(&mut w);
        // The first sleep only takes the first reading; each later one saw
        // 1 ms of waiting for a CPU and stopped the spinning.
        assert_eq!(counts.read(), WaitSplit { spun: 0, slept: 3, yielded: 2, passed: 0 });
        assert_eq!(w.window(), 0);
        assert!(w.cooldown > 0);
    }

    #[test]
    fn a_wake_up_that_waits_for_an_idle_cpu_does_not_stop_the_spinning() {
        // Under a hypervisor an idle CPU halts, and waking a thread on it
        // waits for that vCPU to run again: not contention.
        let counts = WaitCounts::default();
        let policy = WaitPolicy { spin_polls: 2_000, sleep_slice: Duration::from_secs(10) };
        let probes = Probes { run_delay: slow_wake_ups, ..QUIET };
        let mut w = Waiter::with_probes(policy, &counts, probes);
        three_sleeps(&mut w);
        assert_eq!(counts.read(), WaitSplit { spun: 0, slept: 3, yielded: 0, passed: 0 });
        assert_eq!(w.cooldown, 0, "cooling down with CPUs to spare");
        // So a sleep that a spin would have caught opens the window again.
        w.adapt(Duration::from_nanos(1));
        assert!(w.window() > 0);
    }

    #[test]
    fn a_process_has_the_cpus_online_or_fewer_if_held_to_fewer() {
        assert_eq!(cpus_of(2, Some(2)), 2);
        assert_eq!(cpus_of(64, Some(2)), 2, "a cgroup quota or an affinity of 2");
        assert_eq!(cpus_of(2, Some(8)), 2, "never more than are online");
        assert_eq!(cpus_of(4, None), 4);
        assert_eq!(cpus_of(-1, None), 1, "sysconf failed");
    }

    #[test]
    fn vcpus_spin_only_while_each_has_a_cpu_left_to_it() {
        use DaemonPlace::*;
        let spin = |vcpus, cpus, daemon| waits_for(20_000, vcpus, cpus, daemon).spin_polls;
        for daemon in [Apart, Sharing] {
            assert_eq!(spin(1, 2, daemon), 20_000, "{daemon:?}");
            assert_eq!(spin(2, 2, daemon), 20_000, "{daemon:?}: one vCPU a CPU spins");
            assert_eq!(spin(3, 2, daemon), 0, "{daemon:?}");
            assert_eq!(spin(64, 2, daemon), 0, "{daemon:?}");
        }
        assert_eq!(spin(1, 2, Weighted), 20_000);
        assert_eq!(spin(2, 2, Weighted), 0, "the weighted daemon's serving thread takes a CPU");
        assert_eq!(spin(1, 1, Weighted), 0);
        assert_eq!(waits_for(0, 1, 2, Apart).spin_polls, 0, "a policy that never spins");
        assert_eq!(vcpu_waits(7, 1, Sharing).spin_polls, 7, "one vCPU spins on any host");
        assert_eq!(vcpu_waits(7, process_cpus() + 1, Sharing).spin_polls, 0);
    }

    #[test]
    fn the_loadavg_line_gives_the_running_count() {
        assert_eq!(runnable_in_loadavg("0.82 1.34 1.65 3/84 1246\n"), Some(3));
        assert_eq!(runnable_in_loadavg("0.82 1.34 1.65"), None);
        assert_eq!(runnable_in_loadavg("0.82 1.34 1.65 x/84 1246"), None);
        // The host's own line parses, and counts at least its reader.
        let line = std::fs::read_to_string("/proc/loadavg").unwrap();
        assert!(runnable_in_loadavg(&line).unwrap() >= 1, "{line}");
    }

    #[test]
    fn a_spin_cut_short_by_another_thread_sleeps_for_a_cooldown() {
        let ring = OwnedRing::new();
        let stop = AtomicBool::new(true);
        let mut c = Consumer::attach(ring.view()).unwrap();
        let counts = WaitCounts::default();
        let policy = WaitPolicy { spin_polls: 20_000, sleep_slice: Duration::from_millis(5) };
        let mut w = Waiter::with_probes(policy, &counts, Probes { switches: always_preempted, ..QUIET });
        assert!(w.window() > 0, "spins at first");
        assert_eq!(w.pop(&mut c, &stop).unwrap(), None);
        assert_eq!(counts.read(), WaitSplit { spun: 0, slept: 1, yielded: 1, passed: 0 });
        assert_eq!(w.window(), 0);
        // The cooldown: the next waits do not even look at the switch count.
        let looks = SWITCHES.load(Ordering::Relaxed);
        for _ in 0..MIN_COOLDOWN_WAITS {
            w.pop(&mut c, &stop).unwrap();
        }
        assert_eq!(SWITCHES.load(Ordering::Relaxed), looks, "spun during the cooldown");
        assert_eq!(
            counts.read(),
            WaitSplit { spun: 0, slept: 1 + u64::from(MIN_COOLDOWN_WAITS), yielded: 1, passed: 0 }
        );
        // Cut short again as soon as it may spin: the next cooldown is longer.
        w.adapt(Duration::from_nanos(1));
        assert!(w.window() > 0);
        w.pop(&mut c, &stop).unwrap();
        assert_eq!(counts.read().yielded, 2);
        assert_eq!(w.cooldown, 2 * MIN_COOLDOWN_WAITS);
    }

    #[test]
    fn the_window_grows_on_short_sleeps_and_shrinks_on_long_ones() {
        let counts = WaitCounts::default();
        let policy = WaitPolicy { spin_polls: 2_000, sleep_slice: Duration::from_millis(5) };
        let mut w = Waiter::with_probes(policy, &counts, QUIET);
        w.poll_ns = 10.0; // the longest window: 20 us
        let start = w.window();
        w.adapt(Duration::from_micros(5));
        assert_eq!(w.window(), start * 2, "a longer spin would have caught it");
        for _ in 0..10 {
            w.adapt(Duration::from_micros(5));
        }
        assert_eq!(w.window(), 2_000, "capped at the policy's spin");
        w.adapt(Duration::from_micros(100));
        assert_eq!(w.window(), 1_000, "no spin would have caught it");
        // A policy that never spins never starts to.
        let mut never = Waiter::with_probes(WaitPolicy { spin_polls: 0, ..policy }, &counts, QUIET);
        never.adapt(Duration::from_nanos(1));
        assert_eq!(never.window(), 0);
    }

    #[test]
    fn a_record_that_arrives_while_spinning_is_counted_as_spun() {
        let ring = Arc::new(OwnedRing::new());
        let stop = AtomicBool::new(false);
        let counts = WaitCounts::default();
        let policy = WaitPolicy { spin_polls: u32::MAX, sleep_slice: Duration::from_secs(10) };
        let mut w = Waiter::with_probes(policy, &counts, QUIET);
        w.window = u32::MAX;
        let r2 = ring.clone();
        let producer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let mut p = Producer::attach(r2.view()).unwrap();
            push_and_ring(&mut p, &Record([3; 8])).unwrap();
        });
        let mut c = Consumer::attach(ring.view()).unwrap();
        assert_eq!(w.pop(&mut c, &stop).unwrap(), Some(Record([3; 8])));
        assert_eq!(counts.read(), WaitSplit { spun: 1, slept: 0, yielded: 0, passed: 0 });
        producer.join().unwrap();
    }

    #[test]
    fn a_waiter_that_passes_the_cpu_takes_what_arrived_meanwhile_without_sleeping() {
        let counts = WaitCounts::default();
        let policy = WaitPolicy { spin_polls: 0, sleep_slice: Duration::from_secs(10) };
        let mut w = Waiter::with_probes(policy, &counts, QUIET).passing(3);
        // Polls: the first look, then one after each pass; the record is
        // there at the third look (after two passes).
        let mut looks = 0;
        let got = w.wait(
            &mut looks,
            |n: &mut u32| -> Result<Option<u32>, ()> {
                *n += 1;
                Ok((*n == 3).then_some(7))
            },
            |_| panic!("slept though the record came while passing"),
        );
        assert_eq!((got, looks), (Ok(Some(7)), 3));
        assert_eq!(counts.read(), WaitSplit { passed: 1, ..WaitSplit::default() });
        // Nothing by the last pass: it sleeps.
        let mut looks = 0;
        let got = w.wait(
            &mut looks,
            |n: &mut u32| -> Result<Option<u32>, ()> {
                *n += 1;
                Ok(None)
            },
            |_| Ok(Some(9)),
        );
        assert_eq!((got, looks), (Ok(Some(9)), 4), "a look at first and after each of 3 passes");
        assert_eq!(counts.read(), WaitSplit { passed: 1, slept: 1, ..WaitSplit::default() });
    }

    #[test]
    fn vcpus_pass_the_cpu_only_when_they_may_not_spin_and_the_daemon_keeps_its_turns() {
        use DaemonPlace::*;
        let passes = |vcpus, cpus, daemon| waits_for(20_000, vcpus, cpus, daemon).passes;
        assert_eq!(passes(64, 2, Apart), VCPU_PASSES);
        assert_eq!(passes(64, 2, Weighted), VCPU_PASSES);
        assert_eq!(passes(2, 2, Apart), 0, "a CPU each: they spin");
        assert_eq!(passes(2, 2, Weighted), VCPU_PASSES, "one CPU is the daemon's");
        assert_eq!(passes(1, 2, Weighted), 0, "the one left: it spins");
        assert_eq!(passes(64, 2, Sharing), 0, "an ordinary daemon beside them: they would take its turns");
        assert_eq!(passes(2, 2, Sharing), 0);
    }

    #[test]
    fn a_daemon_is_placed_from_its_cpus_then_its_weight() {
        assert_eq!(DaemonPlace::of(None), DaemonPlace::Sharing, "unknown");
        assert_eq!(DaemonPlace::of(Some(0)), DaemonPlace::Sharing, "another pid namespace");
        // This process has no service threads and shares its own CPUs.
        assert_eq!(DaemonPlace::of(Some(std::process::id() as i32)), DaemonPlace::Sharing);
    }

    #[test]
    fn a_process_on_other_cpus_is_apart_and_one_sharing_a_cpu_is_not() {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        assert!(!cpus_apart_from(std::process::id() as i32), "this process shares its own CPUs");
        assert!(!cpus_apart_from(0), "pid 0 (a peer in another pid namespace) is unknown");
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
        let apart = cpus_apart_from(pid.as_raw());
        // Both may run on b: not apart.
        sched_setaffinity(Pid::from_raw(0), &mine).unwrap();
        let sharing = cpus_apart_from(pid.as_raw());
        let _ = child.kill();
        let _ = child.wait();
        assert!(apart, "CPU {a} against CPU {b}");
        assert!(!sharing, "both may run on CPU {b}");
    }
}
