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
