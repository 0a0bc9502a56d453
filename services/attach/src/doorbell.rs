//! Ring doorbells between processes: spin on the ring for a while, then
//! sleep on a futex over the ring's producer index word (the region is a
//! shared mapping, so the futex is not process-private).
//!
//! The protocol is the one hyp-core's loom model checks: the consumer sets
//! the waiting flag (with a full fence) and re-checks before sleeping; the
//! producer publishes, fences, and wakes only if the flag is set.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use hyp_core::ring::{Consumer, Producer, Record, RingError, RingView};

/// How a waiter waits.
#[derive(Clone, Copy, Debug)]
pub struct WaitPolicy {
    /// Polls of the ring before sleeping (0: sleep at once).
    pub spin_polls: u32,
    /// Longest single sleep, so stop flags are noticed.
    pub sleep_slice: Duration,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self { spin_polls: 20_000, sleep_slice: Duration::from_millis(50) }
    }
}

/// Sleeps while `*word == expected`, at most `timeout`.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: FUTEX_WAIT reads the u32 at `word`, which is a valid, aligned
    // AtomicU32 for the duration of the call; `ts` outlives the call. The
    // result (woken, EAGAIN, ETIMEDOUT, EINTR) needs no handling: callers
    // re-check the ring.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

/// Wakes every sleeper on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it is valid and aligned.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32);
    }
}

/// Wakes whoever sleeps on `view`'s doorbell (after setting a stop flag).
pub fn wake(view: &RingView<'_>) {
    futex_wake(view.producer_word());
}

/// Publishes `record` and rings the consumer's doorbell if it sleeps.
pub fn push_and_ring(producer: &mut Producer<'_>, record: &Record) -> Result<(), RingError> {
    producer.push(record)?;
    let view = producer.view();
    if view.consumer_waiting() {
        futex_wake(view.producer_word());
    }
    Ok(())
}

/// Pops the next record, spinning and then sleeping until one arrives or
/// `stop` is set (then `Ok(None)`).
pub fn wait_pop(
    consumer: &mut Consumer<'_>,
    policy: WaitPolicy,
    stop: &AtomicBool,
) -> Result<Option<Record>, RingError> {
    for _ in 0..policy.spin_polls {
        if let Some(r) = consumer.pop()? {
            return Ok(Some(r));
        }
        spin_loop();
    }
    sleep_pop(consumer, policy.sleep_slice, stop)
}

/// Sleeps on `consumer`'s doorbell until a record arrives or `stop` is set
/// (then `Ok(None)`), without spinning first.
pub fn sleep_pop(consumer: &mut Consumer<'_>, slice: Duration, stop: &AtomicBool) -> Result<Option<Record>, RingError> {
    let view = consumer.view();
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(None);
        }
        view.set_consumer_waiting(true);
        let seen = view.producer_word().load(Ordering::Acquire);
        if let Some(r) = consumer.pop()? {
            view.set_consumer_waiting(false);
            return Ok(Some(r));
        }
        futex_wait(view.producer_word(), seen, slice);
        view.set_consumer_waiting(false);
        if let Some(r) = consumer.pop()? {
            return Ok(Some(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyp_core::ring::OwnedRing;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn sleeping_consumer_is_woken_by_push() {
        let ring = Arc::new(OwnedRing::new());
        let stop = AtomicBool::new(false);
        let r2 = ring.clone();
        let producer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let mut p = Producer::attach(r2.view()).unwrap();
            push_and_ring(&mut p, &Record([7; 8])).unwrap();
        });
        let mut c = Consumer::attach(ring.view()).unwrap();
        let policy = WaitPolicy { spin_polls: 0, sleep_slice: Duration::from_secs(10) };
        let t = Instant::now();
        let got = wait_pop(&mut c, policy, &stop).unwrap();
        assert_eq!(got, Some(Record([7; 8])));
        // Woken by the futex, not by the 10 s slice running out.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        producer.join().unwrap();
    }

    #[test]
    fn stop_flag_ends_the_wait() {
        let ring = OwnedRing::new();
        let stop = AtomicBool::new(true);
        let mut c = Consumer::attach(ring.view()).unwrap();
        let policy = WaitPolicy { spin_polls: 10, sleep_slice: Duration::from_millis(5) };
        assert_eq!(wait_pop(&mut c, policy, &stop).unwrap(), None);
    }
}
