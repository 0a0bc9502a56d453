//! The event history: fault events recorded by the ring service threads into a
//! bounded history that serves "last N / first N / since" queries and
//! followers alike.
//!
//! The fault path never waits for an observer, and never wakes one: it only
//! writes the history. The history is a ring of slots, each behind its own
//! lock: a writer claims the next slot with an atomic counter and only
//! `try_lock`s it; observers lock one slot at a time, and only a slot
//! already written with the event they want (each slot says which it
//! holds), so a follower waiting at the head of the history never holds
//! the slot its next event is being written to. A writer finds its slot
//! busy only when an observer is copying the event the slot held a whole
//! history earlier, and counts its event as lost.
//! Each follower keeps its own position in the history ([`Reader`]) and
//! copies events only as fast as it sends them, so a slow follower costs
//! nothing but what it reads; events overwritten before it reads them are
//! counted and reported to it as lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::time::Instant;

use super::events::FaultEvent;
use super::stats::FaultStats;

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

/// Events a [`Reader`] copies per call at most.
pub const BATCH: usize = 256;

/// What a [`Reader`] got from one read.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Events in sequence order.
    pub events: Vec<FaultEvent>,
    /// Events the history lost before this read could copy them.
    pub lost: u64,
}

/// How long a claimed slot may stay unwritten before a reader counts its
/// event as lost (its writer found the slot busy and dropped it). A writer
/// preempted between claiming and writing is far quicker than this.
pub const STALL_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// A follower's own position in the history.
#[derive(Debug)]
pub struct Reader {
    /// The next sequence number to read.
    next: u64,
    /// Since when `next` has been claimed but not written.
    stalled_since: Option<Instant>,
    grace: std::time::Duration,
}

impl Reader {
    /// Waiting for a claimed slot to be written: read again shortly,
    /// whether or not more events come.
    pub fn stalled(&self) -> bool {
        self.stalled_since.is_some()
    }

    /// The same reader, waiting `grace` for an unwritten slot.
    pub fn with_grace(self, grace: std::time::Duration) -> Self {
        Self { grace, ..self }
    }

    /// The next sequence number this reader will return.
    pub fn position(&self) -> u64 {
        self.next
    }
}

/// Slots per lazily made part of the history.
const SLOTS_PER_PART: usize = 1024;

/// One slot of the history.
#[derive(Default)]
struct Slot {
    /// The sequence number of the event written to it, plus one (0: none
    /// yet); set after the event, so a reader looks at it before locking.
    written: AtomicU64,
    event: Mutex<Option<FaultEvent>>,
}

/// The history's slots, made a part at a time when an event first needs
/// one (or by [`EventHub::prefill`] off the fault path): a daemon that
/// starts does not wait for 64k empty slots (~17 MB) to be written, which
/// would lengthen every restart's stall.
struct Slots {
    len: usize,
    parts: Box<[OnceLock<Box<[Slot]>>]>,
}

impl Slots {
    fn new(len: usize) -> Self {
        let len = len.max(1);
        Self { len, parts: (0..len.div_ceil(SLOTS_PER_PART)).map(|_| OnceLock::new()).collect() }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn part(&self, index: usize) -> &[Slot] {
        self.parts[index].get_or_init(|| {
            let n = SLOTS_PER_PART.min(self.len - index * SLOTS_PER_PART);
            (0..n).map(|_| Slot::default()).collect()
        })
    }

    /// The slot of event `seq`, made if need be (writers).
    fn slot(&self, seq: u64) -> &Slot {
        let i = (seq % self.len as u64) as usize;
        &self.part(i / SLOTS_PER_PART)[i % SLOTS_PER_PART]
    }

    /// The event in `seq`'s slot (`seq`'s, or a later one's that
    /// overwrote it), or `None` while `seq` is not written yet (readers).
    /// An unwritten slot is not locked: its writer must find it free.
    fn event(&self, seq: u64) -> Option<FaultEvent> {
        let i = (seq % self.len as u64) as usize;
        let slot = &self.parts[i / SLOTS_PER_PART].get()?[i % SLOTS_PER_PART];
        if slot.written.load(Ordering::Acquire) <= seq {
            return None;
        }
        *slot.event.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The event history.
pub struct EventHub {
    /// Cumulative statistics of every event recorded.
    pub stats: FaultStats,
    slots: Slots,
    /// Per-second event counts over the last minute: (second, count).
    per_second: [(AtomicU64, AtomicU64); 60],
    seen: AtomicU64,
    lost: AtomicU64,
    start: Instant,
}

impl EventHub {
    /// A hub keeping the last `capacity` events (followers may fall that far
    /// behind before they lose some).
    pub fn new(capacity: usize) -> Self {
        Self {
            stats: FaultStats::default(),
            slots: Slots::new(capacity),
            per_second: std::array::from_fn(|_| (AtomicU64::new(u64::MAX), AtomicU64::new(0))),
            seen: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Makes every slot of the history now, so no event pays for it later
    /// (call off the fault path, once the daemon serves).
    pub fn prefill(&self) {
        for part in 0..self.slots.parts.len() {
            self.slots.part(part);
        }
    }

    /// Records an event; never blocks.
    pub fn record(&self, mut event: FaultEvent) {
        event.seq = self.seen.fetch_add(1, Ordering::Relaxed);
        // The slot first: readers wait for a claimed slot to be written.
        let slot = self.slots.slot(event.seq);
        let held = match slot.event.try_lock() {
            Ok(held) => Some(held),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(mut s) = held {
            *s = Some(event);
            slot.written.store(event.seq + 1, Ordering::Release);
        } else {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.record(&event);
        let second = self.start.elapsed().as_secs();
        let (stamp, count) = &self.per_second[(second % 60) as usize];
        if stamp.swap(second, Ordering::Relaxed) != second {
            count.store(0, Ordering::Relaxed);
        }
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// A reader positioned after every event recorded so far.
    pub fn reader(&self) -> Reader {
        self.reader_at(self.seen.load(Ordering::Acquire))
    }

    /// A reader positioned at sequence number `next`.
    pub fn reader_at(&self, next: u64) -> Reader {
        Reader { next, stalled_since: None, grace: STALL_GRACE }
    }

    /// Copies up to [`BATCH`] events from `reader`'s position and advances
    /// it. Events already overwritten, or dropped by a writer that found
    /// their slot busy, are counted in [`Chunk::lost`].
    pub fn read(&self, reader: &mut Reader) -> Chunk {
        let end = self.seen.load(Ordering::Acquire);
        let cap = self.slots.len() as u64;
        let oldest = end.saturating_sub(cap);
        let mut chunk = Chunk { events: Vec::new(), lost: oldest.saturating_sub(reader.next) };
        reader.next = reader.next.max(oldest);
        while reader.next < end && chunk.events.len() < BATCH {
            let seq = reader.next;
            match self.slots.event(seq) {
                Some(e) if e.seq == seq => chunk.events.push(e),
                // Overwritten since `end` was read.
                Some(e) if e.seq > seq => chunk.lost += 1,
                // Claimed, not yet written: wait, then call it lost (its
                // writer found the slot busy and dropped it).
                _ => match reader.stalled_since {
                    None => {
                        reader.stalled_since = Some(Instant::now());
                        break;
                    }
                    Some(t) if t.elapsed() < reader.grace => break,
                    Some(_) => chunk.lost += 1,
                },
            }
            reader.stalled_since = None;
            reader.next += 1;
        }
        chunk
    }

    /// A copy of the history, oldest first.
    pub fn history(&self) -> Vec<FaultEvent> {
        let end = self.seen.load(Ordering::Acquire);
        let start = end.saturating_sub(self.slots.len() as u64);
        let mut out = Vec::with_capacity((end - start) as usize);
        for seq in start..end {
            // A slot may hold an older event (its writer lost the slot) or a
            // newer one (overwritten since `end` was read): skip both.
            if let Some(e) = self.slots.event(seq).filter(|e| e.seq == seq) {
                out.push(e);
            }
        }
        out
    }

    /// Events recorded so far (the next event's sequence number).
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
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
    use crate::observe::events::Outcome;
    use std::time::SystemTime;

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
            stages: Default::default(),
            sent_ns: 0,
            completed_ns: 0,
            populated: false,
            fault_around: 0,
        }
    }

    #[test]
    fn history_is_bounded_and_a_held_lock_loses_events_instead_of_blocking() {
        let hub = EventHub::new(3);
        for i in 0..5 {
            hub.record(event(i));
        }
        let ids: Vec<u64> = hub.history().iter().map(|e| e.fault_id).collect();
        assert_eq!(ids, [2, 3, 4]);
        // An observer copying the event the next one's slot held before.
        let guard = hub.slots.slot(5).event.lock().unwrap();
        hub.record(event(5));
        drop(guard);
        let s = hub.status();
        assert_eq!((s.num_events, s.max_events, s.seen_events, s.lost_events), (3, 3, 6, 1));
        assert!(s.events_per_second > 0.0);
    }

    fn ids(chunk: &Chunk) -> Vec<u64> {
        chunk.events.iter().map(|e| e.fault_id).collect()
    }

    #[test]
    fn readers_copy_at_their_own_pace_and_count_what_they_missed() {
        let hub = EventHub::new(4);
        hub.record(event(100));
        // A reader starts after what exists.
        let mut fast = hub.reader().with_grace(std::time::Duration::ZERO);
        let mut slow = hub.reader();
        assert_eq!(fast.position(), 1);
        hub.record(event(0));
        hub.record(event(1));
        let c = hub.read(&mut fast);
        assert_eq!((ids(&c), c.lost), (vec![0, 1], 0));
        for i in 2..10 {
            hub.record(event(i));
        }
        let c = hub.read(&mut slow);
        assert_eq!((ids(&c), c.lost), (vec![6, 7, 8, 9], 6), "10 behind a 4-event history");
        let c = hub.read(&mut fast);
        assert_eq!((ids(&c), c.lost), (vec![6, 7, 8, 9], 4));
        // A writer that finds its slot held drops the event: a read waits
        // for it (here: one read), the next reports it lost and goes on.
        let guard = hub.slots.slot(11).event.lock().unwrap();
        hub.record(event(10));
        drop(guard);
        hub.record(event(11));
        let c = hub.read(&mut fast);
        assert_eq!((ids(&c), c.lost), (vec![], 0));
        let c = hub.read(&mut fast);
        assert_eq!((ids(&c), c.lost), (vec![11], 1));
        assert_eq!(fast.position(), 13);
    }

    #[test]
    fn a_read_copies_at_most_one_batch() {
        let hub = EventHub::new(4 * BATCH);
        let mut r = hub.reader_at(0);
        for i in 0..(BATCH + 3) as u64 {
            hub.record(event(i));
        }
        assert_eq!(hub.read(&mut r).events.len(), BATCH);
        assert_eq!(ids(&hub.read(&mut r)), [BATCH as u64, BATCH as u64 + 1, BATCH as u64 + 2]);
        assert!(hub.read(&mut r).events.is_empty());
    }

    #[test]
    fn a_follower_waiting_at_the_head_never_holds_the_slot_being_written() {
        use std::sync::atomic::AtomicBool;
        let hub = EventHub::new(8);
        hub.prefill();
        hub.record(event(0));
        // A writer has claimed the next event's slot and not written it yet.
        let claimed = hub.seen.fetch_add(1, Ordering::Relaxed);
        let (done, reads) = (AtomicBool::new(false), AtomicU64::new(0));
        let busy = std::thread::scope(|s| {
            s.spawn(|| {
                // A follower at the head, reading again and again.
                let mut r = hub.reader_at(claimed);
                while !done.load(Ordering::Relaxed) {
                    assert!(hub.read(&mut r).events.is_empty());
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
            // The writer's view: its try_lock must never find the slot
            // busy, however the follower's reads fall (tried until the
            // follower has read many times, however it is scheduled).
            let slot = hub.slots.slot(claimed);
            let mut busy = 0;
            let mut tries = 0;
            while tries < 100_000 || reads.load(Ordering::Relaxed) < 100_000 {
                busy += usize::from(slot.event.try_lock().is_err());
                tries += 1;
            }
            done.store(true, Ordering::Relaxed);
            busy
        });
        assert_eq!(busy, 0, "the follower locked the slot its next event was being written to");
    }
}
