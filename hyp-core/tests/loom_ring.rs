//! Model-checks the ring's memory ordering with loom.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p hyp-core --test loom_ring --release`.
//! Without acquire/release on the indices, loom finds an execution in which
//! the consumer reads a slot before the producer's words are visible, and
//! the content check below fails.
#![cfg(loom)]

use hyp_core::ring::{Consumer, OwnedRing, Producer, Record, RingError};
use loom::sync::Arc;
use loom::thread;

fn record(n: u64) -> Record {
    Record([n, !n, n * 3, n ^ 0x55, n + 9, n << 4, n | 1 << 40, n.wrapping_mul(7)])
}

/// Producer pushes more records than the ring holds, so slots are reused
/// while the consumer reads: every record arrives whole and in order.
#[test]
fn records_are_never_torn_or_reordered() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(|| {
        const N: u64 = 5; // > OWNED_RING_ENTRIES (4): forces slot reuse
        let ring = Arc::new(OwnedRing::new());
        let producer_ring = ring.clone();
        let producer = thread::spawn(move || {
            let mut p = Producer::attach(producer_ring.view()).unwrap();
            let mut n = 0;
            while n < N {
                match p.push(&record(n)) {
                    Ok(()) => n += 1,
                    Err(RingError::Full) => thread::yield_now(),
                    Err(e) => panic!("{e:?}"),
                }
            }
        });
        let mut c = Consumer::attach(ring.view()).unwrap();
        let mut expect = 0;
        while expect < N {
            match c.pop().unwrap() {
                Some(r) => {
                    assert_eq!(r, record(expect));
                    expect += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
    });
}

/// The doorbell hint: a consumer that sets `waiting` and then re-checks the
/// ring cannot miss a record pushed by a producer that checks `waiting`
/// after pushing (the flag and indices are SeqCst/Release-Acquire paired).
#[test]
fn sleeping_consumer_is_never_missed() {
    loom::model(|| {
        let ring = Arc::new(OwnedRing::new());
        let r2 = ring.clone();
        let producer = thread::spawn(move || {
            let mut p = Producer::attach(r2.view()).unwrap();
            p.push(&record(1)).unwrap();
            // Returns whether the producer would ring the doorbell.
            r2.view().consumer_waiting()
        });
        let mut c = Consumer::attach(ring.view()).unwrap();
        ring.view().set_consumer_waiting(true);
        let saw_record = c.pop().unwrap().is_some();
        let rang = producer.join().unwrap();
        // Either the consumer saw the record before sleeping, or the producer rings.
        assert!(saw_record || rang, "record pushed, consumer asleep, no doorbell");
    });
}

/// The daemon's service pool sleeps on many rings at once: its watching
/// thread sets every ring's waiting flag, then looks at every ring again
/// (from the published indices, as a third party) before it sleeps on all
/// their doorbells. A record pushed on any ring is either seen by that
/// look or rung by its producer.
#[test]
fn a_pool_sleeping_on_two_rings_misses_neither() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let rings = [Arc::new(OwnedRing::new()), Arc::new(OwnedRing::new())];
        let producers: Vec<_> = rings
            .iter()
            .map(|ring| {
                let ring = ring.clone();
                thread::spawn(move || {
                    let mut p = Producer::attach(ring.view()).unwrap();
                    p.push(&record(1)).unwrap();
                    ring.view().consumer_waiting()
                })
            })
            .collect();
        for ring in &rings {
            ring.view().set_consumer_waiting(true);
        }
        let saw: Vec<bool> = rings.iter().map(|ring| !ring.view().is_drained()).collect();
        let rang: Vec<bool> = producers.into_iter().map(|p| p.join().unwrap()).collect();
        for i in 0..2 {
            assert!(saw[i] || rang[i], "ring {i}: record pushed, pool asleep, no doorbell");
        }
    });
}

/// The pool's watcher leaves a ring another pool thread is serving (holds
/// its lock) to that thread, rather than pass over it again and again: it
/// notes the ring, then (a SeqCst fence) tries its lock. The holder lets
/// the lock go, then (a fence) looks for the note, and serves the ring
/// again if it is set. A record pushed while the ring was held is served:
/// its producer rang, or the watcher saw it and found the lock free, or
/// the holder popped it (before letting go, or after the note).
#[test]
fn a_ring_left_to_the_thread_serving_it_is_served() {
    use loom::sync::atomic::{fence, AtomicBool, Ordering};
    use loom::sync::Mutex;
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let ring = Arc::new(OwnedRing::new());
        let lock = Arc::new(Mutex::new(()));
        let note = Arc::new(AtomicBool::new(false));
        let producer = {
            let ring = ring.clone();
            thread::spawn(move || {
                Producer::attach(ring.view()).unwrap().push(&record(1)).unwrap();
                ring.view().consumer_waiting()
            })
        };
        let holder = {
            let (ring, lock, note) = (ring.clone(), lock.clone(), note.clone());
            thread::spawn(move || {
                let mut c = Consumer::attach(ring.view()).unwrap();
                let held = lock.lock().unwrap();
                let mut got = c.pop().unwrap().is_some();
                drop(held);
                fence(Ordering::SeqCst);
                if note.load(Ordering::Acquire) && note.swap(false, Ordering::AcqRel) {
                    got |= c.pop().unwrap().is_some();
                }
                got
            })
        };
        // The watcher, about to sleep.
        ring.view().set_consumer_waiting(true);
        let saw = !ring.view().is_drained();
        let mut free = false;
        if saw {
            note.store(true, Ordering::Release);
            fence(Ordering::SeqCst);
            free = lock.try_lock().is_ok();
        }
        let (rang, got) = (producer.join().unwrap(), holder.join().unwrap());
        assert!(rang || (saw && free) || got, "record pushed, its ring held, the pool asleep");
    });
}

/// A daemon that dies may have popped a fault it never answered (`took`),
/// or died before it did. Its successor attaches from the indices in shared
/// memory while the vCPU may still be pushing; once it has re-attached, the
/// vCPU posts its outstanding fault again (`Vm::repost`). The successor
/// sees the fault whole, and at most once more as a duplicate it drops by
/// its id.
fn dead_consumer_then_successor(took: bool) {
    use loom::sync::atomic::{AtomicBool, Ordering};
    loom::model(move || {
        let ring = Arc::new(OwnedRing::new());
        let reattached = Arc::new(AtomicBool::new(false));
        let (r2, flag) = (ring.clone(), reattached.clone());
        let vcpu = thread::spawn(move || {
            let mut p = Producer::attach(r2.view()).unwrap();
            p.push(&record(1)).unwrap();
            while !flag.load(Ordering::Acquire) {
                thread::yield_now();
            }
            // The same record, the same fault id.
            p.push(&record(1)).unwrap();
        });
        {
            let mut dead = Consumer::attach(ring.view()).unwrap();
            while took && dead.pop().unwrap().is_none() {
                thread::yield_now();
            }
        }
        let mut successor = Consumer::attach(ring.view()).unwrap();
        reattached.store(true, Ordering::Release);
        let mut seen = 0;
        while seen == 0 {
            match successor.pop().unwrap() {
                Some(r) => {
                    assert_eq!(r, record(1), "the fault arrives whole");
                    seen += 1;
                }
                None => thread::yield_now(),
            }
        }
        vcpu.join().unwrap();
        // Anything left is the same fault again: a duplicate, by its id.
        while let Some(r) = successor.pop().unwrap() {
            assert_eq!(r, record(1));
            seen += 1;
        }
        assert_eq!(seen, if took { 1 } else { 2 }, "posted twice; the dead daemon took one copy or none");
    });
}

#[test]
fn a_fault_the_dead_consumer_took_reaches_its_successor() {
    dead_consumer_then_successor(true);
}

#[test]
fn a_fault_the_dead_consumer_never_took_reaches_its_successor_once_after_dedup() {
    dead_consumer_then_successor(false);
}
