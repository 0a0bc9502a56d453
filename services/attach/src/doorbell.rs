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

/// The most doorbells one [`futex_wait_any`] sleeps on (the kernel's
/// FUTEX_WAITV_MAX).
pub const MAX_DOORBELLS: usize = 128;

/// `struct futex_waitv` (linux/futex.h).
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// FUTEX2_SIZE_U32: a 32-bit futex, shared between processes (no
/// FUTEX2_PRIVATE: the words live in memory a machine maps too).
const FUTEX2_SIZE_U32: u32 = 0x02;

/// A doorbell word to sleep on and the value it held when last looked at.
///
/// Only its address is kept: the kernel reads the word (and fails the wait
/// with EFAULT if its memory is gone by then), never this process, so the
/// memory may be unmapped while a wait is being set up.
#[derive(Clone, Copy, Debug)]
pub struct DoorbellWord {
    addr: u64,
    seen: u32,
}

impl DoorbellWord {
    /// `word`, which held `seen`.
    pub fn new(word: &AtomicU32, seen: u32) -> Self {
        Self { addr: word.as_ptr() as u64, seen }
    }
}

/// Sleeps until any of `words` (the first [`MAX_DOORBELLS`]) no longer
/// holds the value it was seen with, or `timeout` passes (futex_waitv,
/// Linux 5.16). True unless the time ran out. Spurious returns are
/// possible; callers re-check what they wait for.
pub fn futex_wait_any(words: &[DoorbellWord], timeout: Duration) -> bool {
    let waiters: Vec<FutexWaitv> = words
        .iter()
        .take(MAX_DOORBELLS)
        .map(|w| FutexWaitv { val: u64::from(w.seen), uaddr: w.addr, flags: FUTEX2_SIZE_U32, reserved: 0 })
        .collect();
    if waiters.is_empty() {
        std::thread::sleep(timeout);
        return false;
    }
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let end_ns = now.tv_nsec as u128 + timeout.subsec_nanos() as u128;
    let deadline = libc::timespec {
        tv_sec: now.tv_sec + timeout.as_secs() as libc::time_t + (end_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (end_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `waiters` is an array of `waiters.len()` futex_waitv structs,
    // valid for the call, and `deadline` outlives it; the kernel checks the
    // addresses in them (EFAULT if unmapped). Woken, EAGAIN (the value
    // changed already), ETIMEDOUT or EINTR: callers re-check the rings.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            waiters.len() as libc::c_uint,
            0u32,
            &deadline as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if rc >= 0 {
        return true;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ETIMEDOUT) => false,
        Some(libc::ENOSYS) => {
            // A kernel before 5.16: sleep for the slice; the rings are
            // looked at when it runs out.
            std::thread::sleep(timeout);
            false
        }
        _ => true,
    }
}

/// Wakes one sleeper on `word`.
pub fn wake_one(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it is valid and aligned.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1, 0usize, 0usize, 0u32);
    }
}

/// Sleeps while `word` holds `seen`, at most `timeout` (spurious returns
/// are possible).
pub fn sleep_on(word: &AtomicU32, seen: u32, timeout: Duration) {
    futex_wait(word, seen, timeout);
}

/// Wakes every sleeper on `word`.
pub fn wake_word(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it is valid and aligned.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32);
    }
}

/// Wakes whoever sleeps on `view`'s doorbell (after setting a stop flag).
pub fn wake(view: &RingView<'_>) {
    wake_word(view.producer_word());
}

/// Publishes `record` and rings the consumer's doorbell if it sleeps.
pub fn push_and_ring(producer: &mut Producer<'_>, record: &Record) -> Result<(), RingError> {
    producer.push(record)?;
    ring(&producer.view());
    Ok(())
}

/// Rings `view`'s doorbell if its consumer sleeps (or is about to): the
/// producer's half of the protocol, for records already published. It may
/// come any time after the pushes it rings for.
pub fn ring(view: &RingView<'_>) {
    if view.consumer_waiting() {
        wake_word(view.producer_word());
    }
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

    #[test]
    fn a_sleeper_on_many_doorbells_is_woken_by_any() {
        let rings: Vec<Arc<OwnedRing>> = (0..3).map(|_| Arc::new(OwnedRing::new())).collect();
        let words: Vec<DoorbellWord> = rings
            .iter()
            .map(|r| DoorbellWord::new(r.view().producer_word(), r.view().producer_word().load(Ordering::Acquire)))
            .collect();
        let third = rings[2].clone();
        let producer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let mut p = Producer::attach(third.view()).unwrap();
            p.push(&Record([1; 8])).unwrap();
            wake(&third.view());
        });
        let t = Instant::now();
        assert!(futex_wait_any(&words, Duration::from_secs(10)), "woken, not timed out");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        producer.join().unwrap();
        // Nothing rings: the time runs out.
        let words: Vec<DoorbellWord> = rings
            .iter()
            .map(|r| DoorbellWord::new(r.view().producer_word(), r.view().producer_word().load(Ordering::Acquire)))
            .collect();
        assert!(!futex_wait_any(&words, Duration::from_millis(20)));
    }
}
