//! What fills and reclaims claim of one guest region, so that a fill takes
//! the region's fill lock only where it must.
//!
//! A reclaim holds the fill lock from write-protect to punch, through the
//! core's round trips, the copies to the swap store and its fdatasync:
//! milliseconds. A fill needs that lock only for pages a reclaim is taking
//! (it must not fill them meanwhile), pages the store may hold (it must
//! copy them back) and pages filled from a contents file (it must not copy
//! over the guest's writes). Every other fill, a fresh page's, claims its
//! range here instead, and a reclaim waits for the fills of its ranges
//! before it starts: a scan's first touches run beside a reclaim.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Region offsets `[lo, hi)`.
pub type Span = (u64, u64);

fn overlap(a: Span, b: Span) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Disjoint spans, merged where they touch.
#[derive(Debug, Default)]
struct SpanSet {
    /// Start to end.
    spans: BTreeMap<u64, u64>,
}

impl SpanSet {
    fn overlaps(&self, (lo, hi): Span) -> bool {
        self.spans.range(..hi).next_back().is_some_and(|(_, &end)| end > lo)
    }

    fn insert(&mut self, (mut lo, mut hi): Span) {
        if lo >= hi {
            return;
        }
        // Every span that overlaps or touches [lo, hi) merges into it.
        let touching: Vec<Span> =
            self.spans.range(..=hi).rev().take_while(|(_, &end)| end >= lo).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            self.spans.remove(&s);
            (lo, hi) = (lo.min(s), hi.max(e));
        }
        self.spans.insert(lo, hi);
    }

    fn remove(&mut self, (lo, hi): Span) {
        let cut: Vec<Span> =
            self.spans.range(..hi).rev().take_while(|(_, &end)| end > lo).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in cut {
            self.spans.remove(&s);
            if s < lo {
                self.spans.insert(s, lo);
            }
            if e > hi {
                self.spans.insert(hi, e);
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Fills in flight without the fill lock (a multiset).
    filling: Vec<Span>,
    /// The reclaim in flight's ranges.
    reclaiming: Vec<Span>,
    /// What the swap store may hold: every range a reclaim took, until a
    /// fill or the reclaim gives it back. A superset is safe (such fills
    /// take the lock); a page missing from it would be filled as fresh.
    stored: SpanSet,
}

/// One region's claims.
#[derive(Debug, Default)]
pub struct Claims {
    state: Mutex<State>,
    changed: Condvar,
}

/// How a fill goes on.
#[derive(Debug)]
pub enum FillPath<'c> {
    /// Without the fill lock: no reclaim takes the range and the store
    /// holds none of it. The range is claimed until this drops.
    Unlocked(FillClaim<'c>),
    /// Under the fill lock.
    Locked,
}

/// A fill's claim on its range; dropping it lets a reclaim of the range go.
#[derive(Debug)]
#[must_use = "the range is claimed only while this lives"]
pub struct FillClaim<'c> {
    claims: &'c Claims,
    span: Span,
}

/// A reclaim's claim on its ranges; dropping it lets fills of them go.
#[derive(Debug)]
#[must_use = "the ranges are claimed only while this lives"]
pub struct ReclaimClaim<'c> {
    claims: &'c Claims,
}

impl Claims {
    fn locked(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'g>(&self, guard: MutexGuard<'g, State>) -> MutexGuard<'g, State> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// Claims for a store that may hold anything of a region of `size`
    /// bytes (one a predecessor left, not read yet).
    pub fn all_stored(size: u64) -> Self {
        let claims = Self::default();
        claims.locked().stored.insert((0, size));
        claims
    }

    /// Waits until no reclaim takes any of `span`, then says how the fill
    /// of it goes on: without the fill lock if `unlocked_allowed` (it
    /// copies nothing from a contents file) and the store holds none of it.
    pub fn for_fill(&self, span: Span, unlocked_allowed: bool) -> FillPath<'_> {
        let mut state = self.locked();
        while state.reclaiming.iter().any(|&r| overlap(r, span)) {
            state = self.wait(state);
        }
        if !unlocked_allowed || state.stored.overlaps(span) {
            return FillPath::Locked;
        }
        state.filling.push(span);
        FillPath::Unlocked(FillClaim { claims: self, span })
    }

    /// Waits until no fill without the lock is in flight in `ranges`, then
    /// claims them for a reclaim (held by the fill lock's holder): fills
    /// of them wait until the claim drops, and they count as stored.
    pub fn for_reclaim(&self, ranges: &[Span]) -> ReclaimClaim<'_> {
        let mut state = self.locked();
        while state.filling.iter().any(|&f| ranges.iter().any(|&r| overlap(f, r))) {
            state = self.wait(state);
        }
        state.reclaiming = ranges.to_vec();
        for &r in ranges {
            state.stored.insert(r);
        }
        ReclaimClaim { claims: self }
    }

    /// The store holds nothing of `span` any more.
    pub fn unstored(&self, span: Span) {
        self.locked().stored.remove(span);
    }

    /// The store holds exactly `spans` (read from it after a restart).
    pub fn stored_exactly(&self, spans: &[Span]) {
        let mut state = self.locked();
        state.stored = SpanSet::default();
        for &s in spans {
            state.stored.insert(s);
        }
    }
}

impl Drop for FillClaim<'_> {
    fn drop(&mut self) {
        let mut state = self.claims.locked();
        if let Some(i) = state.filling.iter().position(|&f| f == self.span) {
            state.filling.swap_remove(i);
        }
        drop(state);
        self.claims.changed.notify_all();
    }
}

impl Drop for ReclaimClaim<'_> {
    fn drop(&mut self) {
        self.claims.locked().reclaiming.clear();
        self.claims.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn spans_merge_split_and_answer_overlaps() {
        let mut set = SpanSet::default();
        set.insert((0x2000, 0x3000));
        set.insert((0x5000, 0x6000));
        set.insert((0x3000, 0x4000)); // touches the first: merged
        assert_eq!(set.spans.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(), [(0x2000, 0x4000), (0x5000, 0x6000)]);
        assert!(set.overlaps((0x3fff, 0x5000)) && set.overlaps((0x5fff, 0x9000)));
        assert!(!set.overlaps((0x4000, 0x5000)) && !set.overlaps((0, 0x2000)) && !set.overlaps((0x6000, 0x7000)));
        set.insert((0x1000, 0x7000)); // covers both
        assert_eq!(set.spans.len(), 1);
        set.remove((0x3000, 0x4000));
        assert_eq!(set.spans.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(), [(0x1000, 0x3000), (0x4000, 0x7000)]);
        set.remove((0, 0x10000));
        assert!(set.spans.is_empty());
    }

    #[test]
    fn a_fresh_fill_goes_unlocked_and_a_stored_or_copied_one_locked() {
        let claims = Claims::default();
        assert!(matches!(claims.for_fill((0, 0x1000), true), FillPath::Unlocked(_)));
        assert!(matches!(claims.for_fill((0, 0x1000), false), FillPath::Locked), "a contents copy");
        drop(claims.for_reclaim(&[(0x4000, 0x6000)]));
        assert!(matches!(claims.for_fill((0x5000, 0x6000), true), FillPath::Locked), "the store may hold it");
        assert!(matches!(claims.for_fill((0x6000, 0x7000), true), FillPath::Unlocked(_)));
        claims.unstored((0x5000, 0x6000));
        assert!(matches!(claims.for_fill((0x5000, 0x6000), true), FillPath::Unlocked(_)), "given back");
        assert!(matches!(Claims::all_stored(1 << 20).for_fill((0, 0x1000), true), FillPath::Locked));
        claims.stored_exactly(&[]);
        assert!(matches!(claims.for_fill((0x4000, 0x5000), true), FillPath::Unlocked(_)));
    }

    #[test]
    fn a_fill_waits_out_a_reclaim_of_its_range_and_a_reclaim_waits_out_its_fills() {
        let claims = Claims::default();
        let (done, reclaimed) = (AtomicBool::new(false), AtomicBool::new(false));
        std::thread::scope(|s| {
            let reclaim = claims.for_reclaim(&[(0x1000, 0x2000)]);
            // Another range: at once, beside the reclaim.
            assert!(matches!(claims.for_fill((0x3000, 0x4000), true), FillPath::Unlocked(_)));
            let waiter = s.spawn(|| {
                let path = claims.for_fill((0x1000, 0x2000), true);
                assert!(done.load(Ordering::SeqCst), "filled while the reclaim ran");
                matches!(path, FillPath::Locked)
            });
            std::thread::sleep(Duration::from_millis(50));
            done.store(true, Ordering::SeqCst);
            drop(reclaim);
            assert!(waiter.join().unwrap(), "reclaimed since: the store holds it");

            let fill = claims.for_fill((0x8000, 0x9000), true);
            let reclaimer = s.spawn(|| {
                let _claim = claims.for_reclaim(&[(0x8000, 0xa000)]);
                reclaimed.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!reclaimed.load(Ordering::SeqCst), "a reclaim started under a fill in flight");
            drop(fill);
            reclaimer.join().unwrap();
            assert!(reclaimed.load(Ordering::SeqCst));
        });
    }
}
