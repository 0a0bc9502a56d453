//! A bitmap of 4 KiB pages that threads set and clear without locks: the
//! populated pages of a region, the dirty pages of a memslot. Its words are
//! the daemon's own, or lie in memory the machine shares (a dirty log that
//! must outlive the daemon).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use faultline_attach::shm::MappedRegion;

/// Where a bitmap's words are.
#[derive(Debug)]
enum Words {
    /// The daemon's own memory.
    Owned(Box<[AtomicU64]>),
    /// `len` words at `offset` of a mapping shared with the machine.
    Shared { map: Arc<MappedRegion>, offset: u64, len: usize },
}

/// One bit per 4 KiB page, in 64-bit words (bit i of word w: page 64 w + i).
#[derive(Debug)]
pub struct PageBitmap {
    words: Words,
}

impl PageBitmap {
    /// An all-clear bitmap of `pages` pages in the daemon's memory.
    pub fn new(pages: u64) -> Self {
        Self { words: Words::Owned((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()) }
    }

    /// A bitmap of `pages` pages whose words lie at `offset` of `map`
    /// (memory the machine owns; its bits are whatever it holds). `None`
    /// if they do not fit or are not 8-byte aligned.
    pub fn shared(map: Arc<MappedRegion>, offset: u64, pages: u64) -> Option<Self> {
        let len = pages.div_ceil(64);
        let end = offset.checked_add(len.checked_mul(8)?)?;
        if offset % 8 != 0 || end > map.len() {
            return None;
        }
        Some(Self { words: Words::Shared { map, offset, len: len as usize } })
    }

    fn len(&self) -> usize {
        match &self.words {
            Words::Owned(w) => w.len(),
            Words::Shared { len, .. } => *len,
        }
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        match &self.words {
            Words::Owned(w) => &w[i],
            Words::Shared { map, offset, len } => {
                assert!(i < *len, "word {i} of a {len}-word bitmap");
                map.word(offset + i as u64 * 8).expect("checked to fit when the bitmap was made")
            }
        }
    }

    fn each(&self) -> impl Iterator<Item = &AtomicU64> {
        (0..self.len()).map(|i| self.word(i))
    }

    /// Sets the bit of `page`.
    pub fn set(&self, page: u64) {
        self.word((page / 64) as usize).fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    /// True if the bit of `page` is set.
    pub fn is_set(&self, page: u64) -> bool {
        self.word((page / 64) as usize).load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Sets the bits of `pages` pages from `first`; true if any was clear.
    pub fn set_range(&self, first: u64, pages: u64) -> bool {
        let mut fresh = false;
        for page in first..first + pages {
            let bit = 1u64 << (page % 64);
            fresh |= self.word((page / 64) as usize).fetch_or(bit, Ordering::AcqRel) & bit == 0;
        }
        fresh
    }

    /// Clears the bits of `pages` pages from `first`.
    pub fn clear_range(&self, first: u64, pages: u64) {
        for page in first..first + pages {
            self.word((page / 64) as usize).fetch_and(!(1u64 << (page % 64)), Ordering::AcqRel);
        }
    }

    /// True if every bit of `[first, end)` is set.
    pub fn all_set(&self, first: u64, end: u64) -> bool {
        let mut page = first;
        while page < end {
            let bit = page % 64;
            let take = (64 - bit).min(end - page);
            let mask = if take == 64 { u64::MAX } else { ((1u64 << take) - 1) << bit };
            if self.word((page / 64) as usize).load(Ordering::Acquire) & mask != mask {
                return false;
            }
            page += take;
        }
        true
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.each().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }

    /// A copy of the words.
    pub fn words(&self) -> Vec<u64> {
        self.each().map(|w| w.load(Ordering::Relaxed)).collect()
    }

    /// The words, clearing them one by one atomically: a bit set
    /// concurrently lands either in the returned copy or in the bitmap.
    pub fn take(&self) -> Vec<u64> {
        self.each().map(|w| w.swap(0, Ordering::AcqRel)).collect()
    }

    /// Sets again the bits of words taken by [`PageBitmap::take`].
    pub fn restore(&self, words: &[u64]) {
        for (w, &bits) in self.each().zip(words) {
            w.fetch_or(bits, Ordering::AcqRel);
        }
    }
}

/// A memslot's dirty log: the pages written since the last fetch, and the
/// pages of a fetch that started and has not finished. A fetch moves the
/// first into the second and clears them from the second only once it has
/// delivered them, so a daemon that dies mid-fetch loses no page: the next
/// fetch reports them (in the machine's memory, the log outlives the
/// daemon).
#[derive(Debug)]
pub struct DirtyLog {
    dirty: PageBitmap,
    fetching: PageBitmap,
}

impl DirtyLog {
    /// A log over two bitmaps of the same size.
    pub fn new(dirty: PageBitmap, fetching: PageBitmap) -> Self {
        Self { dirty, fetching }
    }

    /// A log of `pages` pages in the daemon's memory.
    pub fn private(pages: u64) -> Self {
        Self::new(PageBitmap::new(pages), PageBitmap::new(pages))
    }

    /// Marks `page` written.
    pub fn mark(&self, page: u64) {
        self.dirty.set(page);
    }

    /// True if `page` is in the log (written, or in an unfinished fetch).
    pub fn is_set(&self, page: u64) -> bool {
        self.dirty.is_set(page) || self.fetching.is_set(page)
    }

    /// The pages the next fetch reports, without clearing them.
    pub fn peek(&self) -> Vec<u64> {
        self.dirty
            .each()
            .zip(self.fetching.each())
            .map(|(d, f)| d.load(Ordering::Acquire) | f.load(Ordering::Acquire))
            .collect()
    }

    /// Pages the next fetch reports.
    pub fn count(&self) -> u64 {
        self.peek().iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Starts a fetch: moves the written pages into the fetch in progress
    /// (set there before cleared here: a page is in one bitmap or both at
    /// every moment) and returns all of the fetch's pages.
    pub fn stage(&self) -> Vec<u64> {
        self.dirty
            .each()
            .zip(self.fetching.each())
            .map(|(d, f)| {
                let bits = d.load(Ordering::Acquire);
                let staged = f.fetch_or(bits, Ordering::AcqRel) | bits;
                d.fetch_and(!bits, Ordering::AcqRel);
                staged
            })
            .collect()
    }

    /// Finishes a fetch that delivered `words`: they leave the log.
    pub fn settle(&self, words: &[u64]) {
        for (f, &bits) in self.fetching.each().zip(words) {
            f.fetch_and(!bits, Ordering::AcqRel);
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
    fn a_fetch_holds_its_pages_until_it_is_settled() {
        let log = DirtyLog::private(128);
        log.mark(3);
        log.mark(70);
        let first = log.stage();
        assert_eq!(runs(&first), vec![(3, 1), (70, 1)]);
        // A write during the fetch is the next fetch's.
        log.mark(5);
        // The fetch never finished (its daemon died): the next one reports
        // its pages again, with the new write.
        let again = log.stage();
        assert_eq!(runs(&again), vec![(3, 1), (5, 1), (70, 1)]);
        assert_eq!(log.count(), 3);
        log.settle(&again);
        assert_eq!(log.count(), 0);
        assert!(log.stage().iter().all(|&w| w == 0));
    }

    #[test]
    fn shared_bitmaps_live_in_the_machines_memory() {
        let memfd = memfd::MemfdOptions::default().create("dirty").unwrap();
        memfd.as_file().set_len(4096).unwrap();
        let map = Arc::new(MappedRegion::map(std::os::fd::AsFd::as_fd(memfd.as_file()), 0, 4096, 4096).unwrap());
        let log = DirtyLog::new(
            PageBitmap::shared(map.clone(), 0, 100).unwrap(),
            PageBitmap::shared(map.clone(), 16, 100).unwrap(),
        );
        log.mark(65);
        assert_eq!(map.load(8, 8), Some(2), "bit 1 of the second word, in the shared memory");
        // A new daemon over the same memory sees it.
        let again =
            DirtyLog::new(PageBitmap::shared(map.clone(), 0, 100).unwrap(), PageBitmap::shared(map, 16, 100).unwrap());
        assert!(again.is_set(65));
        let map = Arc::new(MappedRegion::map(std::os::fd::AsFd::as_fd(memfd.as_file()), 0, 4096, 4096).unwrap());
        assert!(PageBitmap::shared(map.clone(), 4090, 100).is_none(), "past the end");
        assert!(PageBitmap::shared(map, 4, 100).is_none(), "unaligned");
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
