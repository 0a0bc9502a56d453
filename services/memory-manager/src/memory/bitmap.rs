//! A bitmap of 4 KiB pages that threads set and clear without locks: the
//! populated pages of a region, the dirty pages of a memslot.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per 4 KiB page, in 64-bit words (bit i of word w: page 64 w + i).
#[derive(Debug)]
pub struct PageBitmap {
    words: Box<[AtomicU64]>,
}

impl PageBitmap {
    /// An all-clear bitmap of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self { words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Sets the bit of `page`.
    pub fn set(&self, page: u64) {
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    /// True if the bit of `page` is set.
    pub fn is_set(&self, page: u64) -> bool {
        self.words[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Sets the bits of `pages` pages from `first`; true if any was clear.
    pub fn set_range(&self, first: u64, pages: u64) -> bool {
        let mut fresh = false;
        for page in first..first + pages {
            let bit = 1u64 << (page % 64);
            fresh |= self.words[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0;
        }
        fresh
    }

    /// Clears the bits of `pages` pages from `first`.
    pub fn clear_range(&self, first: u64, pages: u64) {
        for page in first..first + pages {
            self.words[(page / 64) as usize].fetch_and(!(1u64 << (page % 64)), Ordering::AcqRel);
        }
    }

    /// True if every bit of `[first, end)` is set.
    pub fn all_set(&self, first: u64, end: u64) -> bool {
        let mut page = first;
        while page < end {
            let bit = page % 64;
            let take = (64 - bit).min(end - page);
            let mask = if take == 64 { u64::MAX } else { ((1u64 << take) - 1) << bit };
            if self.words[(page / 64) as usize].load(Ordering::Acquire) & mask != mask {
                return false;
            }
            page += take;
        }
        true
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }

    /// A copy of the words.
    pub fn words(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.load(Ordering::Relaxed)).collect()
    }

    /// The words, clearing them one by one atomically: a bit set
    /// concurrently lands either in the returned copy or in the bitmap.
    pub fn take(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()
    }

    /// Sets again the bits of words taken by [`PageBitmap::take`].
    pub fn restore(&self, words: &[u64]) {
        for (w, &bits) in self.words.iter().zip(words) {
            w.fetch_or(bits, Ordering::AcqRel);
        }
    }
}

/// Runs of set bits in `words` as `(first page, pages)`, in page order.
pub fn runs(words: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = w as u64 * 64 + bits.trailing_zeros() as u64;
            bits &= bits - 1;
            match runs.last_mut() {
                Some((first, n)) if *first + *n == page => *n += 1,
                _ => runs.push((page, 1)),
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cross_word_boundaries_and_take_clears() {
        let bitmap = PageBitmap::new(200);
        for page in [0u64, 1, 2, 62, 63, 64, 65, 130, 199] {
            bitmap.set(page);
        }
        assert_eq!(bitmap.count(), 9);
        let words = bitmap.take();
        assert_eq!(runs(&words), vec![(0, 3), (62, 4), (130, 1), (199, 1)]);
        assert_eq!(bitmap.count(), 0);
        assert!(bitmap.words().iter().all(|&w| w == 0));
        assert!(runs(&[0, 0]).is_empty());
        assert_eq!(runs(&[u64::MAX, u64::MAX]), vec![(0, 128)]);
        bitmap.restore(&words);
        assert_eq!(bitmap.count(), 9);
    }

    #[test]
    fn ranges_set_report_fresh_bits_and_span_words() {
        let bitmap = PageBitmap::new(2048);
        assert!(!bitmap.all_set(0, 2048));
        assert!(bitmap.set_range(63, 3));
        assert!(bitmap.all_set(63, 66));
        assert!(!bitmap.all_set(62, 64));
        assert!(!bitmap.set_range(64, 1));
        bitmap.clear_range(64, 1);
        assert!(!bitmap.is_set(64) && bitmap.is_set(65));
    }
}
