//! A VM's working-set monitor thread: each sampling interval it reads and
//! clears the access flag of one page per region and clears that of the
//! next sample's page through the core (two single-page AGE commands a
//! region, one batch), each aggregation
//! interval it publishes what the regions saw and runs the policy's cold
//! reclaim on it, and paces the next aggregation to its CPU budget
//! ([`Pace`]). It runs while the settings or the VM's policy want the VM
//! monitored, and starts afresh when they want it again.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, warn};

use super::access;
use super::control::{ControlError, Pending};
use super::evict;
use super::vm::AttachedVm;
use super::winddown::Winddown;
use crate::observe::pace::Pace;
use crate::observe::workingset::{Monitor, SampleRound, SharedSettings};
use crate::policy::host::PolicyHost;

/// How often a VM that is not monitored looks at the settings again.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// Monitors `vm` until `end` stops it.
pub fn run(vm: &AttachedVm, settings: &SharedSettings, policies: &PolicyHost, end: &Winddown) {
    let stop = end.stopping();
    let mut cpu = ThreadCpu::start();
    let mut monitor: Option<Monitor> = None;
    let mut pace = Pace::default();
    let mut failing = false;
    while !stop.load(Ordering::Acquire) {
        let s = settings.get();
        if !(s.enabled || policies.load().policy.needs_working_set(vm.id().raw())) {
            if monitor.take().is_some() {
                debug!(vm = %vm.id(), "working-set monitor stopped");
            }
            pace = Pace::default();
            end.sleep(IDLE_POLL);
            continue;
        }
        let m = monitor.get_or_insert_with(|| {
            debug!(vm = %vm.id(), "working-set monitor started");
            Monitor::new(&vm.layout.guest_memory(), s.min_regions, u64::from(vm.id().raw()) ^ now_ns())
        });
        // As set; `s` is as paced.
        let asked = s;
        let s = pace.apply(&asked);
        let started = Instant::now();
        let mut next = started;
        let mut changed = false;
        for _ in 0..s.samples_per_aggregation() {
            // Sent now, read after the sleep to the next sample: the core
            // answers meanwhile, and the thread wakes once a sample.
            let round = m.sample();
            let checks = round.checks.len();
            let sent = submit(vm, round);
            next += s.sample();
            let now = Instant::now();
            match next.checked_duration_since(now) {
                Some(wait) => {
                    if !end.sleep(wait) {
                        return;
                    }
                }
                // Behind: the next sample is now, not a burst to catch up.
                None => next = now,
            }
            match sent.and_then(|p| accessed(p, checks)) {
                Ok(accessed) => {
                    m.record(&accessed);
                    failing = false;
                }
                Err(e) => {
                    // A core that does not answer now may later; said once.
                    if !failing {
                        warn!(vm = %vm.id(), cause = %e, "working-set sampling failed; retrying");
                    }
                    failing = true;
                    m.record(&[]);
                }
            }
            if stop.load(Ordering::Acquire) {
                return;
            }
            // New settings start a new aggregation now, not after a
            // stretched one runs out, and are paced afresh.
            if settings.get() != asked {
                changed = true;
                break;
            }
        }
        if changed {
            m.restart_aggregation();
            pace = Pace::default();
            continue;
        }
        let seen = m.aggregate(&s, now_ns());
        // Monitoring's CPU is what sampling and aggregating took; cold
        // reclaim's (copies, syncs) is reclaim's, as for budgets.
        let spent = cpu.lap_ns();
        vm.counters.monitor_cpu_ns.fetch_add(spent, Ordering::Relaxed);
        let before = pace.stretch();
        let monitored = seen.regions.iter().map(|r| r.range.len()).sum();
        pace.observe(&asked, Duration::from_nanos(spent), started.elapsed(), monitored);
        if pace.stretch() != before {
            debug!(vm = %vm.id(), stretch = pace.stretch(), sample_us = pace.apply(&asked).sample_us, "working-set monitor paced to its CPU budget");
        }
        if let Some(cold) = policies.load().policy.cold_reclaim(vm.id().raw()) {
            evict::reclaim_cold(vm, &seen, cold.min_idle, stop);
            cpu.lap_ns();
        }
        vm.working_set.publish(seen);
    }
}

/// Sends one round's AGE commands as one batch.
fn submit(vm: &AttachedVm, round: SampleRound) -> Result<Pending, ControlError> {
    vm.control.submit_all(round.checks.into_iter().chain(round.arms).map(|ipa| access::age(ipa, 1)).collect())
}

/// Whether each of a round's `checks` checked pages was accessed.
fn accessed(sent: Pending, checks: usize) -> Result<Vec<bool>, ControlError> {
    sent.results()?.into_iter().take(checks).map(|a| a.map(|r| r.value & 1 != 0)).collect()
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The calling thread's CPU time, in laps.
struct ThreadCpu(Duration);

impl ThreadCpu {
    fn now() -> Duration {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
    }

    fn start() -> Self {
        Self(Self::now())
    }

    /// CPU time since the last lap (or the start), ns.
    fn lap_ns(&mut self) -> u64 {
        let now = Self::now();
        let lap = now.saturating_sub(self.0);
        self.0 = now;
        lap.as_nanos() as u64
    }
}
