//! Single-producer single-consumer ring over memory shared with an
//! untrusted peer.
//!
//! Indices are free-running `u32` counters, masked on use. Each side keeps
//! its own index privately and only *publishes* it; the peer's index is read
//! once per operation (acquire), range-checked, and never trusted further.
//! Records are copied out of a slot once and the copy is what the caller
//! validates, so a peer rewriting a slot after it was read changes nothing.
//! A peer that breaks the protocol quarantines the ring: every later call
//! fails with the recorded [`Violation`], never undefined behaviour.

use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};

use super::abi::Record;

/// One ring slot: a record's eight words, accessed atomically because the
/// peer reads or writes them concurrently.
pub type Slot = [AtomicU64; 8];

/// A ring's shared memory: the two published indices, the consumer's
/// waiting flag, the producer's access-flag fault count and the slots.
#[derive(Clone, Copy, Debug)]
pub struct RingView<'a> {
    producer: &'a AtomicU32,
    young: &'a AtomicU64,
    consumer: &'a AtomicU32,
    waiting: &'a AtomicU32,
    slots: &'a [Slot],
}

/// How a peer broke the ring protocol.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Violation {
    /// The producer published an index more than a ring ahead of the consumer
    /// or behind it.
    ProducerIndex {
        /// Index read from shared memory.
        published: u32,
        /// The consumer's own index.
        consumer: u32,
    },
    /// The consumer published an index ahead of the producer or more than a
    /// ring behind it.
    ConsumerIndex {
        /// Index read from shared memory.
        published: u32,
        /// The producer's own index.
        producer: u32,
    },
}

/// Why a ring operation did not happen.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RingError {
    /// No free slot: try again after the consumer catches up.
    Full,
    /// The peer broke the protocol; the ring is out of service.
    Quarantined(Violation),
}

impl<'a> RingView<'a> {
    /// A view over shared memory. `slots.len()` must be a power of two.
    pub fn new(
        producer: &'a AtomicU32,
        young: &'a AtomicU64,
        consumer: &'a AtomicU32,
        waiting: &'a AtomicU32,
        slots: &'a [Slot],
    ) -> Option<Self> {
        if !slots.len().is_power_of_two() || slots.len() > u32::MAX as usize / 2 {
            return None;
        }
        Some(Self { producer, young, consumer, waiting, slots })
    }

    /// Access-flag faults the core resolved on this (fault) ring's vCPU
    /// without sending a record, as the producer last published it: a
    /// statistic, which a hostile producer can make say anything, so
    /// nothing but a count shown to people may depend on it.
    pub fn access_flag_faults(&self) -> u64 {
        self.young.load(Ordering::Relaxed)
    }

    /// The published producer index word, for a doorbell that sleeps until
    /// it changes (a futex in processes). Only the producer stores to it.
    pub fn producer_word(&self) -> &'a AtomicU32 {
        self.producer
    }

    /// Whether the consumer has taken every record published so far, as a
    /// third party sees it (a machine waiting for its core to execute what
    /// a dead daemon left; a service pool's last look at a ring before it
    /// sleeps on the doorbell): a hint, neither end's index.
    pub fn is_drained(&self) -> bool {
        self.consumer.load(Ordering::Acquire) == self.producer.load(Ordering::Acquire)
    }

    /// Records the ring holds.
    pub fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }

    fn slot(&self, index: u32) -> &'a Slot {
        &self.slots[(index & (self.capacity() - 1)) as usize]
    }

    /// Producer side of the doorbell protocol, called after a push: true if
    /// the consumer is asleep (or about to be) and must be woken.
    ///
    /// The SeqCst fence pairs with the one in [`Self::set_consumer_waiting`]:
    /// either the producer sees the flag, or the consumer's re-check of the
    /// ring sees the record (a store-buffering pattern that acquire/release
    /// alone does not order; loom finds the lost wake-up without it).
    pub fn consumer_waiting(&self) -> bool {
        fence(Ordering::SeqCst);
        self.waiting.load(Ordering::Relaxed) != 0
    }

    /// Consumer side of the doorbell protocol: set before the final re-check
    /// of the ring that precedes sleeping, cleared on waking.
    pub fn set_consumer_waiting(&self, waiting: bool) {
        self.waiting.store(waiting as u32, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }
}

/// The producing end of a ring.
#[derive(Debug)]
pub struct Producer<'a> {
    ring: RingView<'a>,
    head: u32,
    young: u64,
    quarantined: Option<Violation>,
}

impl<'a> Producer<'a> {
    /// Takes the producing end, resuming from the indices in shared memory
    /// (zero for a new ring, or where a restarted producer left off).
    pub fn attach(ring: RingView<'a>) -> Result<Self, Violation> {
        let head = ring.producer.load(Ordering::Acquire);
        let young = ring.young.load(Ordering::Relaxed);
        let mut p = Self { ring, head, young, quarantined: None };
        p.peer_index()?;
        Ok(p)
    }

    /// Reads and checks the consumer's published index; returns records in flight.
    fn peer_index(&mut self) -> Result<u32, Violation> {
        if let Some(v) = self.quarantined {
            return Err(v);
        }
        let published = self.ring.consumer.load(Ordering::Acquire);
        let used = self.head.wrapping_sub(published);
        if used > self.ring.capacity() {
            let v = Violation::ConsumerIndex { published, producer: self.head };
            self.quarantined = Some(v);
            return Err(v);
        }
        Ok(used)
    }

    /// Publishes one record.
    pub fn push(&mut self, record: &Record) -> Result<(), RingError> {
        let used = self.peer_index().map_err(RingError::Quarantined)?;
        if used == self.ring.capacity() {
            return Err(RingError::Full);
        }
        let slot = self.ring.slot(self.head);
        for (cell, word) in slot.iter().zip(record.0) {
            cell.store(word, Ordering::Relaxed);
        }
        self.head = self.head.wrapping_add(1);
        // Release: the slot's words are visible before the new index.
        self.ring.producer.store(self.head, Ordering::Release);
        Ok(())
    }

    /// Counts an access-flag fault the core resolved without a record, and
    /// publishes the count (a statistic: no ordering with the records).
    pub fn count_access_flag_fault(&mut self) {
        self.young = self.young.wrapping_add(1);
        self.ring.young.store(self.young, Ordering::Relaxed);
    }

    /// Records published and not yet consumed.
    pub fn len(&mut self) -> Result<u32, RingError> {
        self.peer_index().map_err(RingError::Quarantined)
    }

    /// True if nothing is in flight.
    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        Ok(self.len()? == 0)
    }

    /// The violation that quarantined this ring, if any.
    pub fn quarantined(&self) -> Option<Violation> {
        self.quarantined
    }

    /// The shared memory.
    pub fn view(&self) -> RingView<'a> {
        self.ring
    }
}

/// The consuming end of a ring.
#[derive(Debug)]
pub struct Consumer<'a> {
    ring: RingView<'a>,
    tail: u32,
    quarantined: Option<Violation>,
}

impl<'a> Consumer<'a> {
    /// Takes the consuming end, resuming from the indices in shared memory.
    pub fn attach(ring: RingView<'a>) -> Result<Self, Violation> {
        let tail = ring.consumer.load(Ordering::Acquire);
        let mut c = Self { ring, tail, quarantined: None };
        c.peer_index()?;
        Ok(c)
    }

    /// Reads and checks the producer's published index; returns records ready.
    fn peer_index(&mut self) -> Result<u32, Violation> {
        if let Some(v) = self.quarantined {
            return Err(v);
        }
        let published = self.ring.producer.load(Ordering::Acquire);
        let ready = published.wrapping_sub(self.tail);
        if ready > self.ring.capacity() {
            let v = Violation::ProducerIndex { published, consumer: self.tail };
            self.quarantined = Some(v);
            return Err(v);
        }
        Ok(ready)
    }

    /// Copies out the next record, if one is ready.
    pub fn pop(&mut self) -> Result<Option<Record>, RingError> {
        if self.peer_index().map_err(RingError::Quarantined)? == 0 {
            return Ok(None);
        }
        let slot = self.ring.slot(self.tail);
        let mut record = Record::default();
        for (word, cell) in record.0.iter_mut().zip(slot) {
            *word = cell.load(Ordering::Relaxed);
        }
        self.tail = self.tail.wrapping_add(1);
        // Release: our reads of the slot happen before the producer may reuse it.
        self.ring.consumer.store(self.tail, Ordering::Release);
        Ok(Some(record))
    }

    /// Records ready to pop.
    pub fn len(&mut self) -> Result<u32, RingError> {
        self.peer_index().map_err(RingError::Quarantined)
    }

    /// True if nothing is ready.
    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        Ok(self.len()? == 0)
    }

    /// The violation that quarantined this ring, if any.
    pub fn quarantined(&self) -> Option<Violation> {
        self.quarantined
    }

    /// The shared memory.
    pub fn view(&self) -> RingView<'a> {
        self.ring
    }
}

/// A ring in ordinary (heap or static) memory, for tests, loom models and
/// in-process use.
#[derive(Debug)]
pub struct OwnedRing {
    producer: AtomicU32,
    young: AtomicU64,
    consumer: AtomicU32,
    waiting: AtomicU32,
    slots: [Slot; OWNED_RING_ENTRIES],
}

/// Records in an [`OwnedRing`].
pub const OWNED_RING_ENTRIES: usize = 4;

impl Default for OwnedRing {
    fn default() -> Self {
        Self::new()
    }
}

impl OwnedRing {
    /// An empty ring.
    pub fn new() -> Self {
        let slot = || core::array::from_fn(|_| AtomicU64::new(0));
        Self {
            producer: AtomicU32::new(0),
            young: AtomicU64::new(0),
            consumer: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            slots: core::array::from_fn(|_| slot()),
        }
    }

    /// The ring's view.
    pub fn view(&self) -> RingView<'_> {
        RingView {
            producer: &self.producer,
            young: &self.young,
            consumer: &self.consumer,
            waiting: &self.waiting,
            slots: &self.slots,
        }
    }

    /// Overwrites the published producer index, as a hostile peer would.
    pub fn scribble_producer(&self, value: u32) {
        self.producer.store(value, Ordering::Release);
    }

    /// Overwrites the published consumer index, as a hostile peer would.
    pub fn scribble_consumer(&self, value: u32) {
        self.consumer.store(value, Ordering::Release);
    }

    /// Overwrites one word of a slot, as a hostile peer would.
    pub fn scribble_slot(&self, index: usize, word: usize, value: u64) {
        self.slots[index % OWNED_RING_ENTRIES][word % 8].store(value, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn rec(n: u64) -> Record {
        Record([n, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7])
    }

    #[test]
    fn the_access_flag_count_is_published_and_resumed_and_moves_no_index() {
        let ring = OwnedRing::new();
        let mut p = Producer::attach(ring.view()).unwrap();
        let mut c = Consumer::attach(ring.view()).unwrap();
        p.count_access_flag_fault();
        p.count_access_flag_fault();
        assert_eq!(ring.view().access_flag_faults(), 2);
        assert_eq!((c.pop(), p.len()), (Ok(None), Ok(0)), "a count is no record");
        // A producer attached again (a machine's core re-attaching) goes on
        // from the published count.
        let mut again = Producer::attach(ring.view()).unwrap();
        again.count_access_flag_fault();
        assert_eq!(c.view().access_flag_faults(), 3);
    }

    #[test]
    fn records_arrive_in_order_and_full_ring_refuses() {
        let ring = OwnedRing::new();
        let mut p = Producer::attach(ring.view()).unwrap();
        let mut c = Consumer::attach(ring.view()).unwrap();
        for round in 0..3u64 {
            for i in 0..4 {
                p.push(&rec(round * 100 + i)).unwrap();
            }
            assert_eq!(p.push(&rec(999)), Err(RingError::Full));
            for i in 0..4 {
                assert_eq!(c.pop().unwrap(), Some(rec(round * 100 + i)));
            }
            assert_eq!(c.pop().unwrap(), None);
        }
    }

    #[test]
    fn indices_wrap_around_u32() {
        let ring = OwnedRing::new();
        ring.scribble_producer(u32::MAX - 1);
        ring.scribble_consumer(u32::MAX - 1);
        let mut p = Producer::attach(ring.view()).unwrap();
        let mut c = Consumer::attach(ring.view()).unwrap();
        for i in 0..10 {
            p.push(&rec(i)).unwrap();
            assert_eq!(c.pop().unwrap(), Some(rec(i)));
        }
    }

    #[test]
    fn wild_producer_index_quarantines_the_consumer() {
        let ring = OwnedRing::new();
        let mut c = Consumer::attach(ring.view()).unwrap();
        ring.scribble_producer(1000);
        let v = Violation::ProducerIndex { published: 1000, consumer: 0 };
        assert_eq!(c.pop(), Err(RingError::Quarantined(v)));
        // Quarantine sticks even if the peer puts the index back.
        ring.scribble_producer(0);
        assert_eq!(c.pop(), Err(RingError::Quarantined(v)));
        assert_eq!(c.quarantined(), Some(v));
    }

    #[test]
    fn producer_index_behind_consumer_quarantines() {
        let ring = OwnedRing::new();
        let mut p = Producer::attach(ring.view()).unwrap();
        let mut c = Consumer::attach(ring.view()).unwrap();
        p.push(&rec(1)).unwrap();
        c.pop().unwrap();
        ring.scribble_producer(0); // moves backwards: 0 - 1 wraps to u32::MAX
        assert!(matches!(c.pop(), Err(RingError::Quarantined(Violation::ProducerIndex { .. }))));
    }

    #[test]
    fn wild_consumer_index_quarantines_the_producer() {
        let ring = OwnedRing::new();
        let mut p = Producer::attach(ring.view()).unwrap();
        p.push(&rec(1)).unwrap();
        // A consumer claiming to have read records never produced.
        ring.scribble_consumer(7);
        let v = Violation::ConsumerIndex { published: 7, producer: 1 };
        assert_eq!(p.push(&rec(2)), Err(RingError::Quarantined(v)));
        // Attaching to a ring whose indices are already inconsistent fails too.
        assert_eq!(Producer::attach(ring.view()).err(), Some(Violation::ConsumerIndex { published: 7, producer: 1 }));
    }

    #[test]
    fn record_changed_after_being_read_does_not_change_the_copy() {
        let ring = OwnedRing::new();
        let mut p = Producer::attach(ring.view()).unwrap();
        let mut c = Consumer::attach(ring.view()).unwrap();
        p.push(&rec(10)).unwrap();
        let copy = c.pop().unwrap().unwrap();
        for w in 0..8 {
            ring.scribble_slot(0, w, 0xbad);
        }
        assert_eq!(copy, rec(10));
    }

    #[test]
    fn producer_ignores_its_own_published_index_being_rewritten() {
        // The producer keeps its head privately: a peer rewriting the published
        // producer index does not make the producer overwrite unread slots.
        let ring = OwnedRing::new();
        let mut p = Producer::attach(ring.view()).unwrap();
        for i in 0..4 {
            p.push(&rec(i)).unwrap();
        }
        ring.scribble_producer(0);
        assert_eq!(p.push(&rec(9)), Err(RingError::Full));
    }

    #[test]
    fn waiting_flag_round_trips() {
        let ring = OwnedRing::new();
        let v = ring.view();
        assert!(!v.consumer_waiting());
        v.set_consumer_waiting(true);
        assert!(v.consumer_waiting());
    }
}
