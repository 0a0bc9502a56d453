//! Fault events: one per fault, recorded by the ring service threads into a
//! bounded history for "last N / first N / since" queries, and broadcast to
//! followers.
//!
//! The fault path never waits for an observer: it only `try_lock`s the
//! history (an observer copying out a batch makes it count the event as lost
//! instead), and the broadcast never blocks (a follower that falls behind is
//! told how many events it lost).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Instant, SystemTime};

use hyp_core::abort::{Access, FaultStatus};
use hyp_core::reject::Reject;
use hyp_core::stage2::MapSize;
use tokio::sync::broadcast;

/// What became of a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new mapping was installed.
    Mapped,
    /// Permissions were relaxed in place.
    Relaxed,
    /// Another vCPU had installed the same mapping.
    AlreadyPresent,
    /// The invalidation sequence went stale; the guest retries.
    RetriedStale,
    /// Emulated by the VMM.
    MmioExit,
    /// Exit without a syndrome.
    NoSyndromeExit,
    /// An abort was injected.
    InjectedAbort,
    /// The core refused the command.
    Rejected(Option<Reject>),
}

/// One fault, as the daemon handled it.
#[derive(Clone, Copy, Debug)]
pub struct FaultEvent {
    /// Wall-clock time of arrival.
    pub time: SystemTime,
    /// Fault id.
    pub fault_id: u64,
    /// VM id.
    pub vm_id: u16,
    /// vCPU.
    pub vcpu: u32,
    /// Faulting IPA.
    pub ipa: u64,
    /// Raw ESR_EL2.
    pub esr: u64,
    /// Decoded status, when the syndrome decoded.
    pub status: Option<FaultStatus>,
    /// Decoded access.
    pub access: Option<Access>,
    /// Memslot index.
    pub memslot: Option<u32>,
    /// Daemon address backing the IPA.
    pub hva: u64,
    /// VMA page size.
    pub vma_page_size: u64,
    /// Mapping size chosen.
    pub mapping_size: Option<MapSize>,
    /// Permission bits granted (R = 1, W = 2, X = 4).
    pub permissions: u32,
    /// Output PA.
    pub pa: u64,
    /// Outcome.
    pub outcome: Outcome,
    /// Policy in force.
    pub policy: &'static str,
    /// ns since arrival at the end of: memslot, VMA, size, pin, permissions.
    pub stages: [u64; 5],
    /// ns since arrival when the command was sent.
    pub sent_ns: u64,
    /// ns since arrival when the outcome was known.
    pub completed_ns: u64,
}

/// Counters and history sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HubStatus {
    /// Events in the history.
    pub num_events: u64,
    /// History capacity.
    pub max_events: u64,
    /// Events recorded since start.
    pub seen_events: u64,
    /// Events dropped because an observer held the history.
    pub lost_events: u64,
    /// Time since start, ns.
    pub uptime_ns: u64,
    /// Events per second over the last minute.
    pub events_per_second: f64,
}

struct History {
    events: VecDeque<FaultEvent>,
    /// Events per second, the last 60 seconds (index = second % 60).
    per_second: [(u64, u64); 60],
}

/// The event history and the live broadcast.
pub struct EventHub {
    capacity: usize,
    history: Mutex<History>,
    live: broadcast::Sender<Arc<FaultEvent>>,
    seen: AtomicU64,
    lost: AtomicU64,
    start: Instant,
}

impl EventHub {
    /// A hub keeping the last `capacity` events; each follower may lag by
    /// `follower_queue` events before it loses some.
    pub fn new(capacity: usize, follower_queue: usize) -> Self {
        let (live, _) = broadcast::channel(follower_queue.max(1));
        Self {
            capacity,
            history: Mutex::new(History { events: VecDeque::with_capacity(capacity), per_second: [(u64::MAX, 0); 60] }),
            live,
            seen: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Records an event; never blocks.
    pub fn record(&self, event: FaultEvent) {
        self.seen.fetch_add(1, Ordering::Relaxed);
        let second = self.start.elapsed().as_secs();
        match self.history.try_lock() {
            Ok(mut h) => h.push(event, self.capacity, second),
            Err(TryLockError::Poisoned(p)) => p.into_inner().push(event, self.capacity, second),
            Err(TryLockError::WouldBlock) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        // No receivers is not an error worth anything here.
        let _ = self.live.send(Arc::new(event));
    }

    /// A copy of the history, oldest first.
    pub fn history(&self) -> Vec<FaultEvent> {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.events.iter().copied().collect()
    }

    /// A receiver of events recorded from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FaultEvent>> {
        self.live.subscribe()
    }

    /// Counters.
    pub fn status(&self) -> HubStatus {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.start.elapsed();
        let second = now.as_secs();
        let window = second.clamp(1, 60);
        let recent: u64 = h.per_second.iter().filter(|(s, _)| *s != u64::MAX && *s + 60 > second).map(|(_, n)| n).sum();
        HubStatus {
            num_events: h.events.len() as u64,
            max_events: self.capacity as u64,
            seen_events: self.seen.load(Ordering::Relaxed),
            lost_events: self.lost.load(Ordering::Relaxed),
            uptime_ns: now.as_nanos() as u64,
            events_per_second: recent as f64 / window as f64,
        }
    }
}

impl History {
    fn push(&mut self, event: FaultEvent, capacity: usize, second: u64) {
        if self.events.len() == capacity {
            self.events.pop_front();
        }
        self.events.push_back(event);
        let slot = &mut self.per_second[(second % 60) as usize];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u64) -> FaultEvent {
        FaultEvent {
            time: SystemTime::now(),
            fault_id: id,
            vm_id: 1,
            vcpu: 0,
            ipa: id << 12,
            esr: 0,
            status: None,
            access: None,
            memslot: None,
            hva: 0,
            vma_page_size: 0,
            mapping_size: None,
            permissions: 0,
            pa: 0,
            outcome: Outcome::Mapped,
            policy: "default",
            stages: [0; 5],
            sent_ns: 0,
            completed_ns: 0,
        }
    }

    #[test]
    fn history_is_bounded_and_a_held_lock_loses_events_instead_of_blocking() {
        let hub = EventHub::new(3, 4);
        for i in 0..5 {
            hub.record(event(i));
        }
        let ids: Vec<u64> = hub.history().iter().map(|e| e.fault_id).collect();
        assert_eq!(ids, [2, 3, 4]);
        let guard = hub.history.lock().unwrap();
        hub.record(event(5));
        drop(guard);
        let s = hub.status();
        assert_eq!((s.num_events, s.max_events, s.seen_events, s.lost_events), (3, 3, 6, 1));
        assert!(s.events_per_second > 0.0);
    }

    #[test]
    fn a_slow_follower_is_told_how_many_it_lost() {
        let hub = EventHub::new(16, 2);
        let mut rx = hub.subscribe();
        for i in 0..5 {
            hub.record(event(i));
        }
        match rx.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(rx.try_recv().unwrap().fault_id, 3);
    }
}
