//! A bitmap of 4 KiB pages that threads set and clear without locks: the
//! populated pages of a region, the dirty pages of a memslot. Its words are
//! the daemon's own, made a chunk at a time as bits are first set in them
//! (a 1 TiB guest whose workload touches a few pages costs a few chunks,
//! not 32 MiB), or lie in memory the machine shares (a dirty log that must
//! outlive the daemon).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use faultline_attach::shm::MappedRegion;

use super::chunked::Chunked;

/// Words per chunk of an owned bitmap: 4 KiB of words, 128 MiB of guest.
const CHUNK_WORDS: usize = 512;

/// Where a bitmap's words are.
#[derive(Debug)]
enum Words {
    /// The daemon's own memory, in chunks of [`CHUNK_WORDS`] made when a
    /// bit is first set in them (one not made is all clear).
    Owned(Chunked<AtomicU64, CHUNK_WORDS>),
    /// `len` words at `offset` of a mapping shared with the machine.
    Shared { map: Arc<MappedRegion>, offset: u64, len: usize },
}

/// One bit per 4 KiB page, in 64-bit words (bit i of word w: page 64 w + i).
#[derive(Debug)]
pub struct PageBitmap {
    words: Words,
}

impl PageBitmap {
    /// An all-clear bitmap of `pages` pages in the daemon's memory (no
    /// chunk made yet).
    pub fn new(pages: u64) -> Self {
        Self { words: Words::Owned(Chunked::new(pages.div_ceil(64) as usize)) }
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

    /// Word `i`, its chunk made if it was not.
    fn word(&self, i: usize) -> &AtomicU64 {
        match &self.words {
            Words::Owned(w) => w.get_or_make(i),
            Words::Shared { map, offset, len } => {
                assert!(i < *len, "word {i} of a {len}-word bitmap");
                map.word(offset + i as u64 * 8).expect("checked to fit when the bitmap was made")
            }
        }
    }

    /// Word `i` if it can hold a set bit (`None`: an owned chunk not made,
    /// all clear), without making it.
    fn existing(&self, i: usize) -> Option<&AtomicU64> {
        match &self.words {
            Words::Owned(w) => w.get(i),
            Words::Shared { .. } => Some(self.word(i)),
        }
    }

    /// The bits of word `i`.
    fn load(&self, i: usize) -> u64 {
        self.existing(i).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Owned chunks made so far (0 for a shared bitmap).
    pub fn chunks_made(&self) -> usize {
        match &self.words {
            Words::Owned(w) => w.chunks_made(),
            Words::Shared { .. } => 0,
        }
    }

    /// Sets the bit of `page`.
    pub fn set(&self, page: u64) {
        self.word((page / 64) as usize).fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    /// True if the bit of `page` is set.
    pub fn is_set(&self, page: u64) -> bool {
        self.load((page / 64) as usize) & (1 << (page % 64)) != 0
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
            if let Some(w) = self.existing((page / 64) as usize) {
                w.fetch_and(!(1u64 << (page % 64)), Ordering::AcqRel);
            }
        }
    }

    /// True if every bit of `[first, end)` is set.
    pub fn all_set(&self, first: u64, end: u64) -> bool {
        let mut page = first;
        while page < end {
            let bit = page % 64;
            let take = (64 - bit).min(end - page);
            let mask = if take == 64 { u64::MAX } else { ((1u64 << take) - 1) << bit };
            if self.load((page / 64) as usize) & mask != mask {
                return false;
            }
            page += take;
        }
        true
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        (0..self.len()).map(|i| self.load(i).count_ones() as u64).sum()
    }

    /// A copy of the words.
    pub fn words(&self) -> Vec<u64> {
        (0..self.len()).map(|i| self.load(i)).collect()
    }

    /// The words, clearing them one by one atomically: a bit set
    /// concurrently lands either in the returned copy or in the bitmap.
    pub fn take(&self) -> Vec<u64> {
        (0..self.len()).map(|i| self.existing(i).map_or(0, |w| w.swap(0, Ordering::AcqRel))).collect()
    }

    /// Sets again the bits of words taken by [`PageBitmap::take`].
    pub fn restore(&self, words: &[u64]) {
        for (i, &bits) in words.iter().enumerate().take(self.len()).filter(|(_, &b)| b != 0) {
            self.word(i).fetch_or(bits, Ordering::AcqRel);
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
        (0..self.dirty.len()).map(|i| self.dirty.load(i) | self.fetching.load(i)).collect()
    }

    /// Pages the next fetch reports.
    pub fn count(&self) -> u64 {
        self.peek().iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Starts a fetch: moves the written pages into the fetch in progress
    /// (set there before cleared here: a page is in one bitmap or both at
    /// every moment) and returns all of the fetch's pages.
    pub fn stage(&self) -> Vec<u64> {
        (0..self.dirty.len())
            .map(|i| match self.dirty.load(i) {
                0 => self.fetching.load(i),
                bits => {
                    let staged = self.fetching.word(i).fetch_or(bits, Ordering::AcqRel) | bits;
                    self.dirty.word(i).fetch_and(!bits, Ordering::AcqRel);
                    staged
                }
            })
            .collect()
    }

    /// Finishes a fetch that delivered `words`: they leave the log.
    pub fn settle(&self, words: &[u64]) {
        for (i, &bits) in words.iter().enumerate().filter(|(_, &b)| b != 0) {
            if let Some(f) = self.fetching.existing(i) {
                f.fetch_and(!bits, Ordering::AcqRel);
            }
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
    fn an_owned_bitmap_makes_a_chunk_only_where_a_bit_is_set() {
        // 1 TiB of 4 KiB pages: 8192 chunks, none made.
        let bitmap = PageBitmap::new(1 << 28);
        assert_eq!(bitmap.chunks_made(), 0);
        // Reads, clears and range tests of clear memory make nothing.
        assert!(!bitmap.is_set(12345) && !bitmap.all_set(0, 1 << 20));
        bitmap.clear_range(1 << 27, 64);
        assert_eq!(bitmap.count(), 0);
        assert_eq!(bitmap.chunks_made(), 0);
        // Two pages far apart: two chunks; a range over a chunk boundary
        // (page 32768 starts the second chunk): one more.
        bitmap.set(7);
        bitmap.set((1 << 28) - 1);
        assert_eq!(bitmap.chunks_made(), 2);
        assert!(bitmap.set_range(32766, 4));
        assert_eq!(bitmap.chunks_made(), 3);
        assert!(bitmap.is_set(7) && bitmap.is_set((1 << 28) - 1) && bitmap.all_set(32766, 32770));
        assert_eq!(bitmap.count(), 6);
        // A bitmap whose last chunk is short.
        let short = PageBitmap::new(64 * 512 + 65);
        short.set(64 * 512 + 64);
        assert!(short.is_set(64 * 512 + 64));
        assert_eq!(runs(&short.take()), vec![(64 * 512 + 64, 1)]);
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
