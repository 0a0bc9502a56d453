//! Fault events: one per fault, recorded by the ring service threads into a
//! bounded history for "last N / first N / since" queries, and broadcast to
//! followers.
//!
//! The fault path never waits for an observer. The history is a ring of
//! slots, each behind its own lock: a writer claims the next slot with an
//! atomic counter and only `try_lock`s it (an observer copying that one slot
//! right then makes it count the event as lost instead); observers lock one
//! slot at a time. The broadcast never blocks either (a follower that falls
//! behind is told how many events it lost).

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
    /// Position in the daemon's event sequence (set when recorded).
    pub seq: u64,
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

/// The event history and the live broadcast.
pub struct EventHub {
    /// Cumulative statistics of every event recorded.
    pub stats: crate::stats::FaultStats,
    slots: Box<[Mutex<Option<FaultEvent>>]>,
    /// Per-second event counts over the last minute: (second, count).
    per_second: [(AtomicU64, AtomicU64); 60],
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
            stats: crate::stats::FaultStats::default(),
            slots: (0..capacity.max(1)).map(|_| Mutex::new(None)).collect(),
            per_second: std::array::from_fn(|_| (AtomicU64::new(u64::MAX), AtomicU64::new(0))),
            live,
            seen: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Records an event; never blocks.
    pub fn record(&self, mut event: FaultEvent) {
        event.seq = self.seen.fetch_add(1, Ordering::Relaxed);
        self.stats.record(&event);
        let slot = &self.slots[(event.seq % self.slots.len() as u64) as usize];
        match slot.try_lock() {
            Ok(mut s) => *s = Some(event),
            Err(TryLockError::Poisoned(p)) => *p.into_inner() = Some(event),
            Err(TryLockError::WouldBlock) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        let second = self.start.elapsed().as_secs();
        let (stamp, count) = &self.per_second[(second % 60) as usize];
        if stamp.swap(second, Ordering::Relaxed) != second {
            count.store(0, Ordering::Relaxed);
        }
        count.fetch_add(1, Ordering::Relaxed);
        if self.live.receiver_count() > 0 {
            // A receiver may leave before this send: nothing to do then.
            let _ = self.live.send(Arc::new(event));
        }
    }

    /// A copy of the history, oldest first.
    pub fn history(&self) -> Vec<FaultEvent> {
        let end = self.seen.load(Ordering::Acquire);
        let start = end.saturating_sub(self.slots.len() as u64);
        let mut out = Vec::with_capacity((end - start) as usize);
        for seq in start..end {
            let slot = self.slots[(seq % self.slots.len() as u64) as usize].lock().unwrap_or_else(|e| e.into_inner());
            // A slot may hold an older event (its writer lost the slot) or a
            // newer one (overwritten since `end` was read): skip both.
            if let Some(e) = slot.as_ref().filter(|e| e.seq == seq) {
                out.push(*e);
            }
        }
        out
    }

    /// A receiver of events recorded from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FaultEvent>> {
        self.live.subscribe()
    }

    /// Counters.
    pub fn status(&self) -> HubStatus {
        let now = self.start.elapsed();
        let second = now.as_secs();
        let recent: u64 = self
            .per_second
            .iter()
            .filter(|(s, _)| {
                let s = s.load(Ordering::Relaxed);
                s != u64::MAX && s + 60 > second
            })
            .map(|(_, n)| n.load(Ordering::Relaxed))
            .sum();
        let seen = self.seen.load(Ordering::Relaxed);
        let lost = self.lost.load(Ordering::Relaxed);
        HubStatus {
            num_events: seen.saturating_sub(lost).min(self.slots.len() as u64),
            max_events: self.slots.len() as u64,
            seen_events: seen,
            lost_events: lost,
            uptime_ns: now.as_nanos() as u64,
            events_per_second: recent as f64 / second.clamp(1, 60) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u64) -> FaultEvent {
        FaultEvent {
            seq: 0,
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
        // An observer holding the slot the next event goes to.
        let guard = hub.slots[5 % 3].lock().unwrap();
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
