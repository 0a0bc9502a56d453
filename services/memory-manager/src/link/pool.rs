//! The service pool: a few threads, as many as the daemon has cores, serve
//! the fault rings of every vCPU of every VM.
//!
//! Each pass visits every ring once, round robin from a point that moves on
//! at every pass, and serves at most [`BATCH`] records of each: a VM whose
//! vCPUs fault without pause cannot starve another. A vCPU's service is run
//! by one thread at a time (its lock), so its records keep their order.
//! When a pass finds nothing, one thread watches the rings as any ring
//! waiter does ([`Waiter`]): it spins (more passes) while that pays off and
//! then sleeps on every ring's doorbell at once (futex_waitv), with each
//! ring's waiting flag set first, exactly as one consumer does in the
//! protocol the loom model checks. The other idle threads park until a
//! pass finds more than one ring with work and calls one of them, while
//! fewer than a limit serve (the rest stand by for services that block:
//! [`ServicePool::start`]). So at most one pool thread spins, and a
//! doorbell wakes one thread. A service about to block (a reclaim, a
//! policy consult) says so ([`blocking::block_in_place`]): its thread gives
//! up the watch and calls a parked thread to take its place.
//!
//! A service pushes its answers without ringing their doorbell; the pool
//! rings it once it has let the service go ([`RingService::answers`]). A
//! vCPU woken while its service is still held faults again into the same
//! batch and is served at once, up to [`BATCH`] times ahead of the rings
//! the pass has not reached; or, having taken the serving thread's CPU, it
//! waits on a ring no other thread may serve until that thread's next
//! slice. So the answers come back in the order the pass served them.
//!
//! A VM's services are lent to the pool for the length of a closure
//! ([`ServicePool::serve`], the shape of `std::thread::scope`): when it
//! returns (or unwinds), no pool thread can reach them any more.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use faultline_attach::doorbell::{self, futex_wait_any, sleep_on, wake_one, wake_word, DoorbellWord, WaitPolicy};
use faultline_attach::priority::{set_thread_nice, this_thread_id, SERVICE_THREAD};
use faultline_attach::wait::{WaitCounts, WaitSplit, Waiter};
use hyp_core::ring::{RingError, RingView};
use tracing::{error, warn};

use crate::fault::blocking::{self, Blocker};

/// What one [`RingService::serve`] call came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// This many records were served; there may be more.
    Worked(u32),
    /// Nothing on the ring.
    Idle,
    /// The service is over (drained or stopped), with this many commands
    /// still in flight.
    Finished {
        /// Commands whose results were not read.
        in_flight: usize,
    },
}

/// What the pool serves: one vCPU's rings ([`super::vcpu::VcpuService`]).
pub trait RingService: Send {
    /// Serves at most `budget` records.
    fn serve(&mut self, budget: u32) -> Result<Served, RingError>;
    /// The ring whose doorbell rings when there is something to serve.
    fn doorbell(&self) -> RingView<'_>;
    /// The ring its answers go on, if any. A service pushes onto it without
    /// ringing its doorbell ([`RingService::serve`]'s caller rings it
    /// once it has let the service go).
    fn answers(&self) -> Option<RingView<'_>>;
    /// Commands sent whose results have not been read.
    fn in_flight(&self) -> usize;
    /// Ends the service: its next [`RingService::serve`] settles what is
    /// on its ring and finishes, however much the ring still holds. The
    /// pool calls it when [`ServicePool::serve`]'s body unwinds, before it
    /// takes the services back (they would otherwise serve on for as long
    /// as their vCPUs fault).
    fn stop(&self);
}

/// Records served from one ring before the pass moves on to the next.
pub const BATCH: u32 = 16;

/// Longest sleep while results are due: a machine need not ring the
/// doorbell for a result that resumes its vCPU (nobody waits on it), so
/// such results are read with the next record or after this long.
const RESULTS_DUE_SLICE: Duration = Duration::from_millis(1);

/// What one pass over one ring costs, in bare ring polls (a lock and a
/// try-lock more).
const PASS_COST_IN_POLLS: u32 = 8;

/// A service lent to the pool, with its lifetime erased: valid while its
/// [`ServicePool::serve`] call runs, which removes it from the pool (and
/// waits for the thread serving it, if any) before returning.
struct Lent(NonNull<dyn RingService + 'static>);

// SAFETY: a RingService is Send; the pointer is only dereferenced under the
// member's lock, by one thread at a time.
unsafe impl Send for Lent {}

/// One vCPU in the pool.
struct Member {
    service: Mutex<Lent>,
    /// The fault ring, for its doorbell (erased like the service, and only
    /// touched while the member is listed).
    doorbell: RingView<'static>,
    /// The answer ring, rung after each batch (erased and touched like
    /// `doorbell`).
    answers: Option<RingView<'static>>,
    /// Longest sleep while this ring may need serving (short for a machine
    /// that polls rather than rings).
    slice: Duration,
    finished: AtomicBool,
    /// Its service panicked (and is finished).
    panicked: AtomicBool,
    /// The watcher found records on this ring while another thread served
    /// it, and left them to that thread ([`sleep`]): it looks again after
    /// letting the ring go ([`pass`]).
    recheck: AtomicBool,
    /// Commands in flight: after each batch, a hint that results are due
    /// (a machine need not ring for a result that resumes the vCPU); once
    /// finished, the count at the end.
    in_flight: AtomicUsize,
}

impl Member {
    fn finish(&self, in_flight: usize) {
        self.in_flight.store(in_flight, Ordering::Relaxed);
        self.finished.store(true, Ordering::Release);
    }

    fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

/// What the pool threads share.
struct Shared {
    members: RwLock<Vec<Arc<Member>>>,
    /// Bumped (and woken) when the members change, the pool stops or a
    /// parked thread is called to help, so a sleeping thread looks again.
    changed: AtomicU32,
    /// Which thread (index + 1; 0: none) watches the rings (spins, then
    /// sleeps on their doorbells); the other idle threads park.
    watching: AtomicUsize,
    /// Threads parked until called.
    parked: AtomicUsize,
    /// Threads waiting in a service that blocks
    /// ([`blocking::block_in_place`]).
    blocked: AtomicUsize,
    /// Threads in the pool.
    threads: usize,
    /// Most threads that serve at once for load; the others stand by for
    /// the services that block.
    serving_limit: usize,
    stopping: AtomicBool,
    policy: WaitPolicy,
    waits: WaitCounts,
}

/// The pool of service threads.
pub struct ServicePool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// The threads' ids (to weigh them).
    thread_ids: Vec<i32>,
    /// Why weighing them failed, if it did.
    weighting: Option<std::io::Error>,
}

/// The VM's services while they are lent to the pool.
pub struct Membership {
    members: Vec<Arc<Member>>,
}

impl Membership {
    /// Whether every service is finished (drained or stopped).
    pub fn finished(&self) -> bool {
        self.members.iter().all(|m| m.is_finished())
    }

    /// Whether a service panicked: its vCPU is no longer served, and the
    /// VM must be let go (its machine re-attaches and is served afresh).
    pub fn panicked(&self) -> bool {
        self.members.iter().any(|m| m.panicked.load(Ordering::Acquire))
    }

    /// Commands in flight when the finished services finished.
    pub fn in_flight(&self) -> usize {
        self.members.iter().filter(|m| m.is_finished()).map(|m| m.in_flight.load(Ordering::Relaxed)).sum()
    }
}

impl ServicePool {
    /// Starts `threads` service threads (at least one), of which at most
    /// `serving` (at least one) serve at once for load, the rest standing
    /// by for services that block: the watching one spins at most about
    /// `policy.spin_polls` ring polls, and idle ones sleep at most
    /// `policy.sleep_slice` when no doorbell rings.
    pub fn start(threads: usize, serving: usize, policy: WaitPolicy) -> std::io::Result<Self> {
        Self::start_weighted(threads, serving, policy, 0)
    }

    /// [`Self::start`], each service thread at nice value `nice` (below 0:
    /// more of the CPU than a vCPU thread, see
    /// [`faultline_attach::priority`]). Where the daemon may not raise
    /// their priority (no CAP_SYS_NICE) they run at its own, and
    /// [`Self::weighting`] says why.
    pub fn start_weighted(threads: usize, serving: usize, policy: WaitPolicy, nice: i32) -> std::io::Result<Self> {
        let mut pool = Self::start_with(threads, serving, policy)?;
        if nice != 0 {
            pool.weighting = pool.thread_ids.iter().try_for_each(|&tid| set_thread_nice(tid, nice)).err();
        }
        Ok(pool)
    }

    /// Why the service threads could not be weighted, if they could not.
    pub fn weighting(&self) -> Option<&std::io::Error> {
        self.weighting.as_ref()
    }

    fn start_with(threads: usize, serving: usize, policy: WaitPolicy) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            members: RwLock::new(Vec::new()),
            changed: AtomicU32::new(0),
            watching: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            blocked: AtomicUsize::new(0),
            threads,
            serving_limit: serving.clamp(1, threads),
            stopping: AtomicBool::new(false),
            policy,
            waits: WaitCounts::default(),
        });
        let count = threads;
        let (ids, id_of) = std::sync::mpsc::channel();
        let threads = (0..threads)
            .map(|i| {
                let shared = shared.clone();
                let ids = ids.clone();
                std::thread::Builder::new().name(format!("{SERVICE_THREAD}-{i}")).spawn(move || {
                    let _ = ids.send(this_thread_id());
                    drop(ids);
                    work(&shared, i)
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(ids);
        let thread_ids = id_of.iter().take(count).collect();
        Ok(Self { shared, threads, thread_ids, weighting: None })
    }

    /// Service threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Most service threads that serve at once for load.
    pub fn serving_limit(&self) -> usize {
        self.shared.serving_limit
    }

    /// How the pool's waits for work went.
    pub fn waits(&self) -> WaitSplit {
        self.shared.waits.read()
    }

    /// Serves `services` (their fault rings sleeping at most `slice`) while
    /// `body` runs, then takes them back: removes them from the pool, then
    /// runs each unfinished one once more on this thread (a stopped service
    /// settles the results on its ring; `body` stops them, or, if it
    /// unwinds, the pool does). Returns what `body` returned and
    /// each service's commands still in flight.
    pub fn serve<'s, S: RingService + 's, R>(
        &self,
        services: Vec<S>,
        slice: Duration,
        body: impl FnOnce(&Membership) -> R,
    ) -> (R, Vec<usize>) {
        let members: Vec<Arc<Member>> = services
            .into_iter()
            .map(|service| {
                let boxed: Box<dyn RingService + 's> = Box::new(service);
                let lent: *mut (dyn RingService + 's) = Box::into_raw(boxed);
                // SAFETY: `lent` came from the Box just above; the rings
                // its methods return are the service's own, valid while it is.
                let service = unsafe { &*lent };
                let (doorbell, answers) = (service.doorbell(), service.answers());
                // SAFETY: only the lifetime changes. The `Lease` below
                // removes the member from the pool, and waits for the
                // thread serving it, before this call returns or unwinds,
                // so no pool thread uses the service or its doorbell after
                // the borrows they carry end.
                let erased = unsafe {
                    std::mem::transmute::<*mut (dyn RingService + 's), *mut (dyn RingService + 'static)>(lent)
                };
                Arc::new(Member {
                    service: Mutex::new(Lent(NonNull::new(erased).expect("from a Box"))),
                    // SAFETY: as above: the doorbell is the service's ring.
                    doorbell: unsafe { std::mem::transmute::<RingView<'_>, RingView<'static>>(doorbell) },
                    // SAFETY: as above: the answer ring is the service's ring.
                    answers: answers.map(|a| unsafe { std::mem::transmute::<RingView<'_>, RingView<'static>>(a) }),
                    slice,
                    finished: AtomicBool::new(false),
                    panicked: AtomicBool::new(false),
                    recheck: AtomicBool::new(false),
                    in_flight: AtomicUsize::new(0),
                })
            })
            .collect();
        let lease = Lease { shared: &self.shared, members: members.clone() };
        {
            let mut listed = self.shared.members.write().unwrap_or_else(|e| e.into_inner());
            listed.extend(members.iter().cloned());
        }
        self.shared.wake_all();
        let membership = Membership { members };
        let r = body(&membership);
        (r, lease.end())
    }
}

impl Drop for ServicePool {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.wake_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The members of one [`ServicePool::serve`] call; taking them back is its
/// drop, so an unwinding `body` takes them back too.
struct Lease<'p> {
    shared: &'p Shared,
    members: Vec<Arc<Member>>,
}

impl Lease<'_> {
    /// Takes the services back; each one's commands still in flight.
    fn end(mut self) -> Vec<usize> {
        self.take_back()
    }

    fn take_back(&mut self) -> Vec<usize> {
        // Returning, the body ended its services; unwinding, it did not.
        let unwinding = std::thread::panicking();
        {
            let mut listed = self.shared.members.write().unwrap_or_else(|e| e.into_inner());
            listed.retain(|m| !self.members.iter().any(|mine| Arc::ptr_eq(m, mine)));
        }
        // Unlisted: a pool thread that was serving one still holds its
        // lock, and no thread finds it again.
        self.members
            .drain(..)
            .map(|m| {
                let lent = m.service.lock().unwrap_or_else(|e| e.into_inner());
                // SAFETY: the pointer came from `Box::into_raw` in `serve`,
                // and nothing else can reach it now (unlisted, its lock held).
                let mut service = unsafe { Box::from_raw(lent.0.as_ptr()) };
                if m.is_finished() {
                    return m.in_flight.load(Ordering::Relaxed);
                }
                if unwinding {
                    service.stop();
                }
                let in_flight = loop {
                    match service.serve(u32::MAX) {
                        Ok(Served::Worked(_)) => continue,
                        Ok(Served::Finished { in_flight }) => break in_flight,
                        Ok(Served::Idle) | Err(_) => break service.in_flight(),
                    }
                };
                if let Some(answers) = service.answers() {
                    doorbell::ring(&answers);
                }
                in_flight
            })
            .collect()
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.members.is_empty() {
            self.take_back();
        }
    }
}

impl Shared {
    fn wake_all(&self) {
        self.changed.fetch_add(1, Ordering::Release);
        wake_word(&self.changed);
    }

    /// Threads neither parked nor blocked in a service.
    fn serving(&self, parked: usize) -> usize {
        self.threads.saturating_sub(parked + self.blocked.load(Ordering::Acquire))
    }

    /// Calls one parked thread to help, if any is parked and fewer than
    /// the limit serve.
    fn call_helper(&self) {
        let parked = self.parked.load(Ordering::Acquire);
        if parked > 0 && self.serving(parked) < self.serving_limit {
            self.changed.fetch_add(1, Ordering::Release);
            wake_one(&self.changed);
        }
    }

    /// Parks this thread, which has work, if more than the limit serve (it
    /// came back from a service that blocked, or a slice woke it while
    /// parked), until called, at most a sleep slice. The count of parked
    /// threads is claimed first, so threads stepping down at once never
    /// leave fewer than the limit serving.
    fn step_down(&self) {
        let seen = self.changed.load(Ordering::Acquire);
        let mut parked = self.parked.load(Ordering::Acquire);
        loop {
            if self.serving(parked) <= self.serving_limit {
                return;
            }
            match self.parked.compare_exchange(parked, parked + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => parked = now,
            }
        }
        sleep_on(&self.changed, seen, self.policy.sleep_slice);
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }

    /// Parks until called (or the members change), at most a sleep slice.
    fn park(&self) {
        self.parked.fetch_add(1, Ordering::AcqRel);
        let seen = self.changed.load(Ordering::Acquire);
        // The watcher may have given up its watch since this thread looked:
        // parked, nobody would watch.
        if self.watching.load(Ordering::Acquire) == 0 {
            self.parked.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        sleep_on(&self.changed, seen, self.policy.sleep_slice);
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One pool thread: passes while there is work; when there is none, either
/// watches the rings (the one thread that may spin, then sleeps on their
/// doorbells) or, if another thread watches, parks until called. So at
/// most one pool thread spins, and a doorbell wakes one thread.
fn work(shared: &Arc<Shared>, index: usize) {
    blocking::set_blocker(Box::new(PoolThread { shared: shared.clone(), index }));
    let mut waiter = Waiter::new(shared.policy, &shared.waits);
    let mut cursor = index;
    let me = index + 1;
    while !shared.stopping.load(Ordering::Acquire) {
        if pass(shared, &mut cursor).is_some() {
            shared.step_down();
            continue;
        }
        if shared.watching.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire).is_err() {
            shared.park();
            continue;
        }
        // A pass costs about a bare ring poll per ring, and a few more:
        // the longest spin stays about as long whatever the rings.
        let rings = shared.members.read().unwrap_or_else(|e| e.into_inner()).len().max(1);
        waiter.set_spin_limit(shared.policy.spin_polls / (PASS_COST_IN_POLLS * rings as u32));
        let _ = waiter.wait(&mut cursor, |cursor| Ok::<_, ()>(pass(shared, cursor)), |_| Ok(sleep(shared)));
        // Still ours unless a blocking service gave it up meanwhile.
        let _ = shared.watching.compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// A pool thread, as its services' waits tell it
/// ([`blocking::block_in_place`]): one about to block (a reclaim waiting on
/// the control ring and the disk, a policy consult) gives up the watch if
/// it holds it, counts itself blocked, and calls a parked thread to take
/// its place, so that the pool goes on serving the other rings meanwhile.
struct PoolThread {
    shared: Arc<Shared>,
    index: usize,
}

impl Blocker for PoolThread {
    fn enter(&self) {
        let shared = &self.shared;
        let _ = shared.watching.compare_exchange(self.index + 1, 0, Ordering::AcqRel, Ordering::Acquire);
        shared.blocked.fetch_add(1, Ordering::AcqRel);
        shared.call_helper();
    }

    fn leave(&self) {
        self.shared.blocked.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves a batch from every ring, from the one after where the last pass
/// started; `Some(records)` if any were served, or if a ring this pass
/// served has records the watcher left to it.
fn pass(shared: &Shared, cursor: &mut usize) -> Option<u32> {
    let members = shared.members.read().unwrap_or_else(|e| e.into_inner());
    let n = members.len();
    if n == 0 {
        return None;
    }
    let start = *cursor % n;
    *cursor = cursor.wrapping_add(1);
    let (mut served, mut busy_rings, mut left_to_us) = (0, 0, false);
    for k in 0..n {
        let m = &members[(start + k) % n];
        if m.is_finished() {
            continue;
        }
        // Another thread serves it: its records are in hand.
        let Ok(lent) = m.service.try_lock() else { continue };
        if m.is_finished() {
            continue;
        }
        // SAFETY: listed members' services are valid (see `Lent`), and the
        // lock makes this thread the only one using it.
        let service = unsafe { &mut *lent.0.as_ptr() };
        let outcome = catch_unwind(AssertUnwindSafe(|| service.serve(BATCH)));
        // Whatever else came of it, a call that found records may have
        // answered some.
        let answered = !matches!(outcome, Ok(Ok(Served::Idle)));
        match outcome {
            Ok(Ok(Served::Worked(k))) => {
                m.in_flight.store(service.in_flight(), Ordering::Relaxed);
                served += k;
                busy_rings += 1;
                if busy_rings == 2 {
                    // More than one ring had work: more than one thread's.
                    shared.call_helper();
                }
            }
            Ok(Ok(Served::Idle)) => {}
            Ok(Ok(Served::Finished { in_flight })) => m.finish(in_flight),
            Ok(Err(e)) => {
                warn!(cause = ?e, "ring quarantined; vCPU no longer served");
                m.finish(service.in_flight());
            }
            Err(_) => {
                error!("a vCPU service panicked; vCPU no longer served");
                m.panicked.store(true, Ordering::Release);
                m.finish(0);
            }
        }
        drop(lent);
        if let Some(answers) = m.answers.as_ref().filter(|_| answered) {
            doorbell::ring(answers);
        }
        // Let go, then look for the watcher's note (the other half of the
        // fence in `sleep`): either it saw the ring free, or this thread
        // sees its note and passes again.
        // (A load first: the swap, a locked instruction, only when set.)
        fence(Ordering::SeqCst);
        left_to_us |= m.recheck.load(Ordering::Acquire) && m.recheck.swap(false, Ordering::AcqRel);
    }
    (served > 0 || left_to_us).then_some(served)
}

/// Sleeps on every listed ring's doorbell and the pool's own word until one
/// rings or the shortest slice passes; `Some(0)` if woken by a doorbell.
fn sleep(shared: &Shared) -> Option<u32> {
    let changed = shared.changed.load(Ordering::Acquire);
    let mut words = vec![DoorbellWord::new(&shared.changed, changed)];
    let mut slice = shared.policy.sleep_slice;
    {
        let members = shared.members.read().unwrap_or_else(|e| e.into_inner());
        let open = || members.iter().filter(|m| !m.is_finished());
        for m in open() {
            m.doorbell.set_consumer_waiting(true);
            let word = m.doorbell.producer_word();
            words.push(DoorbellWord::new(word, word.load(Ordering::Acquire)));
            slice = slice.min(m.slice);
            if m.in_flight.load(Ordering::Relaxed) > 0 {
                // Results due may come without a doorbell.
                slice = slice.min(RESULTS_DUE_SLICE);
            }
        }
        // The re-check after the flags: a record pushed before a flag was
        // seen is found here, one pushed after it rings the doorbell. A
        // ring another thread is serving is left to it (passing over it
        // again and again would only burn a CPU while, say, its service
        // waits on a reclaim): the note is set before its lock is looked
        // at, and its holder looks for the note after letting it go.
        let waiting = open().filter(|m| !m.doorbell.is_drained()).any(|m| {
            m.recheck.store(true, Ordering::Release);
            fence(Ordering::SeqCst);
            m.service.try_lock().is_ok()
        });
        if waiting {
            open().for_each(|m| m.doorbell.set_consumer_waiting(false));
            return Some(0);
        }
    }
    // More rings than one futex_waitv takes: the rest are seen when the
    // slice runs out, so keep it short.
    if words.len() > faultline_attach::doorbell::MAX_DOORBELLS {
        slice = slice.min(Duration::from_millis(1));
    }
    let woken = futex_wait_any(&words, slice);
    let members = shared.members.read().unwrap_or_else(|e| e.into_inner());
    members.iter().filter(|m| !m.is_finished()).for_each(|m| m.doorbell.set_consumer_waiting(false));
    woken.then_some(0)
}

/// What tests of ring services share.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::{Duration, Instant};

    /// The calling thread's id.
    pub fn thread_id() -> i32 {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }

    /// Waits until thread `tid` of this process sleeps (state `S`): a
    /// consumer that reached its futex, not one still re-checking its ring.
    pub fn wait_asleep(tid: i32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
            // The state follows the name, which is in parentheses.
            if stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('S')) {
                return;
            }
            assert!(Instant::now() < deadline, "thread {tid} never slept");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::blocking::block_in_place;
    use faultline_attach::doorbell::{push_and_ring, sleep_pop};
    use hyp_core::ring::abi::Record;
    use hyp_core::ring::{Consumer, OwnedRing, Producer};
    use std::time::Instant;

    /// A service that logs which records it served, in the order served;
    /// with `awaiting`, it has a command in flight until a record whose
    /// first word is not 0 arrives (its result).
    struct Logging<'r> {
        id: u64,
        ring: Consumer<'r>,
        log: &'r Mutex<Vec<(u64, u64)>>,
        done: &'r AtomicBool,
        awaiting: bool,
    }

    impl RingService for Logging<'_> {
        fn serve(&mut self, budget: u32) -> Result<Served, RingError> {
            if self.done.load(Ordering::Acquire) {
                return Ok(Served::Finished { in_flight: 0 });
            }
            let mut n = 0;
            while n < budget {
                let Some(r) = self.ring.pop()? else { break };
                self.log.lock().unwrap().push((self.id, r.0[0]));
                self.awaiting &= r.0[0] == 0;
                n += 1;
            }
            Ok(if n > 0 { Served::Worked(n) } else { Served::Idle })
        }

        fn doorbell(&self) -> RingView<'_> {
            self.ring.view()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            None
        }

        fn in_flight(&self) -> usize {
            usize::from(self.awaiting)
        }

        fn stop(&self) {
            self.done.store(true, Ordering::Release);
        }
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn policy(spin_polls: u32) -> WaitPolicy {
        WaitPolicy { spin_polls, sleep_slice: Duration::from_millis(500) }
    }

    /// Services of different kinds in one VM.
    impl<T: RingService + ?Sized> RingService for Box<T> {
        fn serve(&mut self, budget: u32) -> Result<Served, RingError> {
            (**self).serve(budget)
        }

        fn doorbell(&self) -> RingView<'_> {
            (**self).doorbell()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            (**self).answers()
        }

        fn in_flight(&self) -> usize {
            (**self).in_flight()
        }

        fn stop(&self) {
            (**self).stop()
        }
    }

    /// A service that always has work: every call serves its whole budget.
    struct Endless<'r> {
        ring: &'r OwnedRing,
        log: &'r Mutex<Vec<(u64, u64)>>,
        done: &'r AtomicBool,
        served: u64,
    }

    impl RingService for Endless<'_> {
        fn serve(&mut self, budget: u32) -> Result<Served, RingError> {
            if self.done.load(Ordering::Acquire) {
                return Ok(Served::Finished { in_flight: 0 });
            }
            let mut log = self.log.lock().unwrap();
            for _ in 0..budget {
                log.push((1, self.served));
                self.served += 1;
            }
            Ok(Served::Worked(budget))
        }

        fn doorbell(&self) -> RingView<'_> {
            self.ring.view()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            None
        }

        fn in_flight(&self) -> usize {
            0
        }

        fn stop(&self) {
            self.done.store(true, Ordering::Release);
        }
    }

    #[test]
    fn a_busy_ring_does_not_starve_a_quiet_one() {
        let (busy, quiet) = (OwnedRing::new(), OwnedRing::new());
        Producer::attach(quiet.view()).unwrap().push(&Record([7; 8])).unwrap();
        let (log, done) = (Mutex::new(Vec::new()), AtomicBool::new(false));
        let endless: Box<dyn RingService + '_> = Box::new(Endless { ring: &busy, log: &log, done: &done, served: 0 });
        let one: Box<dyn RingService + '_> = Box::new(Logging {
            id: 2,
            ring: Consumer::attach(quiet.view()).unwrap(),
            log: &log,
            done: &done,
            awaiting: false,
        });
        let pool = ServicePool::start(1, 1, policy(0)).unwrap();
        // The busy ring comes first: the one thread starts its first pass there.
        pool.serve(vec![endless, one], Duration::from_millis(500), |_| {
            wait_until("the quiet ring served", || log.lock().unwrap().iter().any(|&(id, _)| id == 2));
            done.store(true, Ordering::Release);
        });
        let log = log.into_inner().unwrap();
        let quiet_at = log.iter().position(|&(id, _)| id == 2).unwrap();
        // Served right after the busy ring's first batch.
        assert_eq!(quiet_at, BATCH as usize, "{:?}", &log[..quiet_at.min(40)]);
    }

    #[test]
    fn many_rings_on_two_threads_are_served_in_order_and_a_doorbell_wakes_the_pool() {
        const RINGS: u64 = 24;
        const RECORDS: u64 = 200;
        let rings: Vec<OwnedRing> = (0..RINGS).map(|_| OwnedRing::new()).collect();
        let (log, done) = (Mutex::new(Vec::new()), AtomicBool::new(false));
        let services: Vec<Logging<'_>> = rings
            .iter()
            .enumerate()
            .map(|(i, r)| Logging {
                id: i as u64,
                ring: Consumer::attach(r.view()).unwrap(),
                log: &log,
                done: &done,
                awaiting: false,
            })
            .collect();
        // No spinning, and slices far longer than this test: every record
        // after the first pass is found through a doorbell.
        let pool =
            ServicePool::start(2, 2, WaitPolicy { spin_polls: 0, sleep_slice: Duration::from_secs(120) }).unwrap();
        let (_, in_flight) = pool.serve(services, Duration::from_secs(60), |served| {
            std::thread::scope(|s| {
                for ring in &rings {
                    s.spawn(|| {
                        let mut p = Producer::attach(ring.view()).unwrap();
                        let deadline = Instant::now() + Duration::from_secs(30);
                        for i in 0..RECORDS {
                            while push_and_ring(&mut p, &Record([i; 8])).is_err() {
                                assert!(Instant::now() < deadline, "the ring stayed full: nobody served it");
                                std::thread::sleep(Duration::from_micros(100));
                            }
                            if i % 50 == 0 {
                                // Let the pool go to sleep now and then.
                                std::thread::sleep(Duration::from_millis(2));
                            }
                        }
                    });
                }
            });
            wait_until("every record served", || log.lock().unwrap().len() as u64 == RINGS * RECORDS);
            assert!(!served.finished());
            done.store(true, Ordering::Release);
        });
        assert_eq!(in_flight, vec![0; RINGS as usize]);
        let log = log.into_inner().unwrap();
        for id in 0..RINGS {
            let got: Vec<u64> = log.iter().filter(|(i, _)| *i == id).map(|&(_, r)| r).collect();
            assert_eq!(got, (0..RECORDS).collect::<Vec<_>>(), "ring {id}");
        }
        assert!(pool.waits().slept >= 1, "{:?}", pool.waits());
    }

    #[test]
    fn services_are_given_back_even_when_the_body_panics() {
        let ring = OwnedRing::new();
        let (log, done, done_after) = (Mutex::new(Vec::new()), AtomicBool::new(false), AtomicBool::new(false));
        let pool = ServicePool::start(1, 1, policy(100)).unwrap();
        let unwound = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let service = Logging {
                id: 0,
                ring: Consumer::attach(ring.view()).unwrap(),
                log: &log,
                done: &done,
                awaiting: false,
            };
            pool.serve(vec![service], Duration::from_millis(5), |_| panic!("the connection's body failed"));
        }));
        assert!(unwound.is_err());
        assert!(pool.shared.members.read().unwrap().is_empty(), "unlisted while unwinding");
        assert!(done.load(Ordering::Acquire), "stopped before it was taken back");
        // The pool goes on serving others.
        Producer::attach(ring.view()).unwrap().push(&Record([1; 8])).unwrap();
        let service = Logging {
            id: 1,
            ring: Consumer::attach(ring.view()).unwrap(),
            log: &log,
            done: &done_after,
            awaiting: false,
        };
        pool.serve(vec![service], Duration::from_millis(5), |_| {
            wait_until("served after the panic", || !log.lock().unwrap().is_empty());
        });
        assert_eq!(*log.lock().unwrap(), [(1, 1)]);
    }

    #[test]
    fn a_busy_service_is_stopped_not_served_on_when_the_body_panics() {
        // A vCPU that keeps faulting while its connection unwinds: taken
        // back unstopped, its service would be served on the unwinding
        // thread for as long as it faults (the VM never let go). Stopped,
        // it finishes at the first call there.
        let ring = OwnedRing::new();
        let (log, done, unwinding_calls) = (Mutex::new(Vec::new()), AtomicBool::new(false), AtomicU32::new(0));
        let pool = ServicePool::start(1, 1, policy(100)).unwrap();
        let unwound = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let endless = Endless { ring: &ring, log: &log, done: &done, served: 0 };
            let service = Bounded { inner: endless, owner: std::thread::current().id(), calls: &unwinding_calls };
            pool.serve(vec![service], Duration::from_millis(5), |_| {
                wait_until("served", || !log.lock().unwrap().is_empty());
                panic!("the connection's body failed");
            });
        }));
        assert!(unwound.is_err());
        assert!(done.load(Ordering::Acquire), "stopped");
        assert_eq!(unwinding_calls.load(Ordering::Relaxed), 1, "served on while unwinding");
    }

    /// [`Endless`], a batch at most a call, counting the calls made on its
    /// `owner` thread (the pool's are not), and finishing after 256 of
    /// them (a broken stop must fail the test, not hang it).
    struct Bounded<'r> {
        inner: Endless<'r>,
        owner: std::thread::ThreadId,
        calls: &'r AtomicU32,
    }

    impl RingService for Bounded<'_> {
        fn serve(&mut self, budget: u32) -> Result<Served, RingError> {
            if std::thread::current().id() == self.owner && self.calls.fetch_add(1, Ordering::Relaxed) >= 256 {
                return Ok(Served::Finished { in_flight: 0 });
            }
            // Taking a service back asks for u32::MAX records.
            self.inner.serve(budget.min(BATCH))
        }

        fn doorbell(&self) -> RingView<'_> {
            self.inner.doorbell()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            None
        }

        fn in_flight(&self) -> usize {
            0
        }

        fn stop(&self) {
            self.inner.stop()
        }
    }

    #[test]
    fn a_result_due_is_read_without_a_doorbell() {
        let ring = OwnedRing::new();
        let (log, done) = (Mutex::new(Vec::new()), AtomicBool::new(false));
        let mut p = Producer::attach(ring.view()).unwrap();
        let service =
            Logging { id: 0, ring: Consumer::attach(ring.view()).unwrap(), log: &log, done: &done, awaiting: true };
        // Slices far longer than the test: only "results due" can wake it.
        let pool =
            ServicePool::start(1, 1, WaitPolicy { spin_polls: 0, sleep_slice: Duration::from_secs(120) }).unwrap();
        pool.serve(vec![service], Duration::from_secs(120), |_| {
            // The command goes out with a rung record (the fault)...
            push_and_ring(&mut p, &Record([0; 8])).unwrap();
            wait_until("the fault served", || log.lock().unwrap().len() == 1);
            std::thread::sleep(Duration::from_millis(20));
            // ...and its result comes back without one.
            p.push(&Record([1; 8])).unwrap();
            wait_until("the result read within the results-due slice", || log.lock().unwrap().len() == 2);
            done.store(true, Ordering::Release);
        });
    }

    /// A service whose first record makes it block (a reclaim, say) until
    /// `release` is set.
    struct Blocking<'r> {
        ring: Consumer<'r>,
        release: &'r AtomicBool,
        done: &'r AtomicBool,
    }

    impl RingService for Blocking<'_> {
        fn serve(&mut self, _budget: u32) -> Result<Served, RingError> {
            if self.done.load(Ordering::Acquire) {
                return Ok(Served::Finished { in_flight: 0 });
            }
            if self.ring.pop()?.is_none() {
                return Ok(Served::Idle);
            }
            block_in_place(|| {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !self.release.load(Ordering::Acquire) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            Ok(Served::Worked(1))
        }

        fn doorbell(&self) -> RingView<'_> {
            self.ring.view()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            None
        }

        fn in_flight(&self) -> usize {
            0
        }

        fn stop(&self) {
            self.done.store(true, Ordering::Release);
        }
    }

    #[test]
    fn a_service_that_blocks_has_a_standby_thread_serve_the_other_rings() {
        let (slow, other) = (OwnedRing::new(), OwnedRing::new());
        let (log, done, release) = (Mutex::new(Vec::new()), AtomicBool::new(false), AtomicBool::new(false));
        let blocking: Box<dyn RingService + '_> =
            Box::new(Blocking { ring: Consumer::attach(slow.view()).unwrap(), release: &release, done: &done });
        let logging: Box<dyn RingService + '_> = Box::new(Logging {
            id: 1,
            ring: Consumer::attach(other.view()).unwrap(),
            log: &log,
            done: &done,
            awaiting: false,
        });
        // Slices far longer than the test: a parked thread only helps when
        // called. One thread serves for load; the other stands by.
        let pool =
            ServicePool::start(2, 1, WaitPolicy { spin_polls: 0, sleep_slice: Duration::from_secs(120) }).unwrap();
        pool.serve(vec![blocking, logging], Duration::from_secs(120), |_| {
            // Both threads idle: one watches, one parks.
            std::thread::sleep(Duration::from_millis(50));
            push_and_ring(&mut Producer::attach(slow.view()).unwrap(), &Record([1; 8])).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            // The thread serving `slow` is blocked; the other ring's
            // record is served all the same.
            push_and_ring(&mut Producer::attach(other.view()).unwrap(), &Record([2; 8])).unwrap();
            let served = Instant::now() + Duration::from_secs(20);
            while log.lock().unwrap().is_empty() && Instant::now() < served {
                std::thread::sleep(Duration::from_millis(1));
            }
            release.store(true, Ordering::Release);
            assert_eq!(*log.lock().unwrap(), [(1, 2)], "served while the other ring's service blocked");
            done.store(true, Ordering::Release);
        });
    }

    /// A service with nothing to serve that counts the looks it was given.
    struct Counting<'r> {
        ring: &'r OwnedRing,
        looks: &'r AtomicUsize,
        done: &'r AtomicBool,
    }

    impl RingService for Counting<'_> {
        fn serve(&mut self, _budget: u32) -> Result<Served, RingError> {
            self.looks.fetch_add(1, Ordering::Relaxed);
            Ok(if self.done.load(Ordering::Acquire) { Served::Finished { in_flight: 0 } } else { Served::Idle })
        }

        fn doorbell(&self) -> RingView<'_> {
            self.ring.view()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            None
        }

        fn in_flight(&self) -> usize {
            0
        }

        fn stop(&self) {
            self.done.store(true, Ordering::Release);
        }
    }

    /// A service that takes what is on its ring and then, while `closed`
    /// is set, blocks (as one waiting on a reclaim), holding its ring.
    struct Gate<'r> {
        ring: Consumer<'r>,
        closed: &'r AtomicBool,
        blocked: &'r AtomicBool,
        popped: &'r AtomicUsize,
        done: &'r AtomicBool,
    }

    impl RingService for Gate<'_> {
        fn serve(&mut self, budget: u32) -> Result<Served, RingError> {
            if self.done.load(Ordering::Acquire) {
                return Ok(Served::Finished { in_flight: 0 });
            }
            let mut n = 0;
            while n < budget && self.ring.pop()?.is_some() {
                n += 1;
                self.popped.fetch_add(1, Ordering::AcqRel);
            }
            if self.closed.load(Ordering::Acquire) {
                self.blocked.store(true, Ordering::Release);
                block_in_place(|| {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while self.closed.load(Ordering::Acquire) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                });
            }
            Ok(if n > 0 { Served::Worked(n) } else { Served::Idle })
        }

        fn doorbell(&self) -> RingView<'_> {
            self.ring.view()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            None
        }

        fn in_flight(&self) -> usize {
            0
        }

        fn stop(&self) {
            self.done.store(true, Ordering::Release);
        }
    }

    #[test]
    fn records_on_a_ring_whose_service_blocks_are_left_to_it_and_the_watcher_sleeps() {
        let (slow, quiet) = (OwnedRing::new(), OwnedRing::new());
        let (done, closed, blocked) = (AtomicBool::new(false), AtomicBool::new(true), AtomicBool::new(false));
        let (popped, looks) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let gate: Box<dyn RingService + '_> = Box::new(Gate {
            ring: Consumer::attach(slow.view()).unwrap(),
            closed: &closed,
            blocked: &blocked,
            popped: &popped,
            done: &done,
        });
        let counting: Box<dyn RingService + '_> = Box::new(Counting { ring: &quiet, looks: &looks, done: &done });
        // No spinning, and slices far longer than the test: a record left
        // behind would wait for a slice, past the test's deadline.
        let pool =
            ServicePool::start(2, 2, WaitPolicy { spin_polls: 0, sleep_slice: Duration::from_secs(120) }).unwrap();
        pool.serve(vec![gate, counting], Duration::from_secs(120), |_| {
            // Its service blocks with the ring empty; then its vCPU posts.
            wait_until("the service blocked", || blocked.load(Ordering::Acquire));
            push_and_ring(&mut Producer::attach(slow.view()).unwrap(), &Record([1; 8])).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let before = looks.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
            let passes = looks.load(Ordering::Relaxed) - before;
            // Passing over the held ring again and again: about 100,000.
            assert!(passes < 50, "the watcher passed {passes} times in 50 ms instead of sleeping");
            // It lets the ring go having served nothing: only the watcher's
            // note sends it back for the record.
            closed.store(false, Ordering::Release);
            wait_until("the record left to the blocked service served once it let go", || {
                popped.load(Ordering::Acquire) == 1
            });
            done.store(true, Ordering::Release);
        });
    }

    /// A vCPU's service that answers each record on its answer ring without
    /// ringing, once its vCPU (thread `vcpu`) sleeps, then works on for a
    /// while (the rest of a batch), logging how many records each call
    /// served.
    struct Answering<'r> {
        faults: Consumer<'r>,
        answers: Producer<'r>,
        vcpu: &'r std::sync::atomic::AtomicI32,
        calls: &'r Mutex<Vec<u32>>,
    }

    impl RingService for Answering<'_> {
        fn serve(&mut self, budget: u32) -> Result<Served, RingError> {
            let mut n = 0;
            while n < budget {
                let Some(r) = self.faults.pop()? else { break };
                testing::wait_asleep(self.vcpu.load(Ordering::Acquire));
                self.answers.push(&r)?;
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            if n == 0 {
                return Ok(Served::Idle);
            }
            self.calls.lock().unwrap().push(n);
            Ok(Served::Worked(n))
        }
        fn doorbell(&self) -> RingView<'_> {
            self.faults.view()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            Some(self.answers.view())
        }
        fn in_flight(&self) -> usize {
            0
        }
        fn stop(&self) {}
    }

    #[test]
    fn an_answer_rings_once_the_pool_lets_its_service_go_so_the_next_fault_waits_for_the_next_batch() {
        const FAULTS: u64 = 4;
        let (faults, answers) = (OwnedRing::new(), OwnedRing::new());
        let (calls, vcpu) = (Mutex::new(Vec::new()), std::sync::atomic::AtomicI32::new(0));
        let service = Answering {
            faults: Consumer::attach(faults.view()).unwrap(),
            answers: Producer::attach(answers.view()).unwrap(),
            vcpu: &vcpu,
            calls: &calls,
        };
        // No spinning, and slices far longer than the test.
        let slices = WaitPolicy { spin_polls: 0, sleep_slice: Duration::from_secs(120) };
        let pool = ServicePool::start(1, 1, slices).unwrap();
        pool.serve(vec![service], Duration::from_secs(120), |_| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::scope(|s| {
                // The vCPU: faults, sleeps on its answer ring (longer than
                // the wait below, so only a doorbell wakes it in time),
                // faults again the moment it is woken.
                s.spawn(|| {
                    vcpu.store(testing::thread_id(), Ordering::Release);
                    let (mut p, mut c) =
                        (Producer::attach(faults.view()).unwrap(), Consumer::attach(answers.view()).unwrap());
                    let never = AtomicBool::new(false);
                    for i in 0..FAULTS {
                        push_and_ring(&mut p, &Record([i; 8])).unwrap();
                        let answer = sleep_pop(&mut c, Duration::from_secs(30), &never).unwrap();
                        if tx.send(answer.map(|r| r.0[0])).is_err() {
                            return;
                        }
                    }
                });
                for i in 0..FAULTS {
                    let answer = rx.recv_timeout(Duration::from_secs(20));
                    assert_eq!(answer, Ok(Some(i)), "answer {i}: its doorbell never rang");
                }
            });
        });
        // Woken inside the call, the vCPU would fault again while the call
        // still worked (20 ms a record), and be served in the same batch.
        let calls = calls.into_inner().unwrap();
        assert_eq!(calls, vec![1; FAULTS as usize], "records served per call");
    }

    /// A service that takes a millisecond a record and logs which thread
    /// served it.
    struct Slow<'r> {
        ring: Consumer<'r>,
        threads: &'r Mutex<Vec<String>>,
    }

    impl RingService for Slow<'_> {
        fn serve(&mut self, budget: u32) -> Result<Served, RingError> {
            let mut n = 0;
            while n < budget {
                let Some(_) = self.ring.pop()? else { break };
                std::thread::sleep(Duration::from_millis(1));
                self.threads.lock().unwrap().push(std::thread::current().name().unwrap_or_default().to_owned());
                n += 1;
            }
            Ok(if n > 0 { Served::Worked(n) } else { Served::Idle })
        }
        fn doorbell(&self) -> RingView<'_> {
            self.ring.view()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            None
        }
        fn in_flight(&self) -> usize {
            0
        }
        fn stop(&self) {}
    }

    #[test]
    fn no_more_threads_than_the_serving_limit_serve_for_load() {
        // A full ring each (an owned ring holds 4).
        const RINGS: usize = 8;
        const RECORDS: usize = 4 * RINGS;
        let rings: [OwnedRing; RINGS] = std::array::from_fn(|_| OwnedRing::new());
        let threads = Mutex::new(Vec::new());
        let services = rings
            .iter()
            .map(|r| Slow { ring: Consumer::attach(r.view()).unwrap(), threads: &threads })
            .collect::<Vec<_>>();
        // Three threads, one serving for load; slices far longer than the
        // test, so a parked thread serves only when called.
        let pool =
            ServicePool::start(3, 1, WaitPolicy { spin_polls: 0, sleep_slice: Duration::from_secs(120) }).unwrap();
        assert_eq!(pool.serving_limit(), 1);
        pool.serve(services, Duration::from_secs(120), |_| {
            // All three idle: one watches, two park (and stay parked: a
            // thread woken by the members' change counts as parked until
            // it runs).
            let two_parked = || pool.shared.parked.load(Ordering::Acquire) == 2;
            wait_until("two threads parked", two_parked);
            std::thread::sleep(Duration::from_millis(50));
            wait_until("two threads still parked", two_parked);
            for ring in &rings {
                let mut p = Producer::attach(ring.view()).unwrap();
                for i in 0..RECORDS / rings.len() {
                    push_and_ring(&mut p, &Record([i as u64; 8])).unwrap();
                }
            }
            wait_until("every record served", || threads.lock().unwrap().len() >= RECORDS);
        });
        let mut names = threads.into_inner().unwrap();
        names.sort();
        names.dedup();
        // Every pass found work on several rings: with no limit, it would
        // call the parked threads to help.
        assert_eq!(names.len(), 1, "threads that served: {names:?}");
    }

    /// A service that always has one more record, and counts them.
    struct Unending<'r> {
        ring: &'r OwnedRing,
        served: &'r AtomicUsize,
        done: &'r AtomicBool,
    }

    impl RingService for Unending<'_> {
        fn serve(&mut self, _budget: u32) -> Result<Served, RingError> {
            if self.done.load(Ordering::Acquire) {
                return Ok(Served::Finished { in_flight: 0 });
            }
            std::thread::sleep(Duration::from_micros(100));
            self.served.fetch_add(1, Ordering::Relaxed);
            Ok(Served::Worked(1))
        }
        fn doorbell(&self) -> RingView<'_> {
            self.ring.view()
        }
        fn answers(&self) -> Option<RingView<'_>> {
            None
        }
        fn in_flight(&self) -> usize {
            0
        }
        fn stop(&self) {
            self.done.store(true, Ordering::Release);
        }
    }

    #[test]
    fn a_thread_beyond_the_serving_limit_steps_down_though_there_is_work() {
        let rings = [OwnedRing::new(), OwnedRing::new()];
        let (served, done) = (AtomicUsize::new(0), AtomicBool::new(false));
        let services = rings.iter().map(|ring| Unending { ring, served: &served, done: &done }).collect::<Vec<_>>();
        // Both threads start serving, and both rings always have work: only
        // stepping down parks one. Slices far longer than the test.
        let pool =
            ServicePool::start(2, 1, WaitPolicy { spin_polls: 0, sleep_slice: Duration::from_secs(120) }).unwrap();
        pool.serve(services, Duration::from_secs(120), |_| {
            wait_until("one thread stepped down", || pool.shared.parked.load(Ordering::Acquire) == 1);
            let before = served.load(Ordering::Relaxed);
            wait_until("the other serves on", || served.load(Ordering::Relaxed) > before + 10);
            assert_eq!(pool.shared.parked.load(Ordering::Acquire), 1);
            done.store(true, Ordering::Release);
        });
    }

    #[test]
    fn weighted_service_threads_run_at_the_nice_value_asked_for_or_say_why_not() {
        let pool = ServicePool::start_weighted(2, 1, policy(0), -5).unwrap();
        let me = std::process::id() as i32;
        let nice: Vec<Option<i32>> =
            pool.thread_ids.iter().map(|&tid| faultline_attach::priority::nice_of(me, tid)).collect();
        match pool.weighting() {
            None => assert_eq!(nice, [Some(-5), Some(-5)]),
            Some(e) => {
                assert!(matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)), "{e}");
                eprintln!("not weighted here: {e}");
            }
        }
        let plain = ServicePool::start(1, 1, policy(0)).unwrap();
        assert!(plain.weighting().is_none());
        assert_eq!(faultline_attach::priority::nice_of(me, plain.thread_ids[0]), Some(0));
    }
}
