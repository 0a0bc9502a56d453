//! A dense array of atomic counters or words over a guest region, made a
//! chunk at a time when first written: a 1 TiB guest whose workload
//! touches a few pages costs the daemon a few chunks and the chunk table
//! (16 bytes a chunk), not a word per page of the guest.

use std::sync::OnceLock;

/// `len` elements in chunks of `N`; a chunk not made reads as all
/// `T::default()`.
#[derive(Debug)]
pub struct Chunked<T, const N: usize> {
    /// Each chunk's elements once made (a thin pointer: the table is 16
    /// bytes a chunk, where a slice's would be 24).
    chunks: Box<[OnceLock<Box<[T; N]>>]>,
    len: usize,
}

impl<T: Default, const N: usize> Chunked<T, N> {
    /// `len` elements, no chunk made.
    pub fn new(len: usize) -> Self {
        Self { chunks: (0..len.div_ceil(N)).map(|_| OnceLock::new()).collect(), len }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element `i` if its chunk was made (`None`: it holds the default).
    /// Panics past the end.
    pub fn get(&self, i: usize) -> Option<&T> {
        assert!(i < self.len, "element {i} of {}", self.len);
        self.chunks[i / N].get().map(|c| &c[i % N])
    }

    /// Element `i`, its chunk made (as defaults) if it was not. Panics past
    /// the end.
    pub fn get_or_make(&self, i: usize) -> &T {
        assert!(i < self.len, "element {i} of {}", self.len);
        let chunk = self.chunks[i / N].get_or_init(|| {
            // Made on the heap: a chunk may be larger than a stack. The last
            // is made whole too; what lies past the end is never read.
            let elements: Box<[T]> = (0..N).map(|_| T::default()).collect();
            elements.try_into().unwrap_or_else(|_| unreachable!("N elements"))
        });
        &chunk[i % N]
    }

    /// The elements of the chunks made, in order (the rest hold the
    /// default).
    pub fn made(&self) -> impl Iterator<Item = &T> {
        let len = self.len;
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(k, c)| Some((k, c.get()?)))
            .flat_map(move |(k, c)| c[..N.min(len - k * N)].iter())
    }

    /// Chunks made so far.
    pub fn chunks_made(&self) -> usize {
        self.chunks.iter().filter(|c| c.get().is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn chunks_are_made_where_written_and_read_as_defaults_elsewhere() {
        let a: Chunked<AtomicU32, 4> = Chunked::new(10);
        assert_eq!((a.len(), a.chunks_made()), (10, 0));
        assert!(a.get(9).is_none());
        a.get_or_make(9).store(7, Ordering::Relaxed);
        // The last chunk is short: elements 8 and 9.
        assert_eq!(a.chunks_made(), 1);
        assert_eq!(a.made().count(), 2);
        assert_eq!(a.get(9).map(|v| v.load(Ordering::Relaxed)), Some(7));
        assert_eq!(a.get(8).map(|v| v.load(Ordering::Relaxed)), Some(0));
        assert!(a.get(3).is_none());
        a.get_or_make(0).fetch_add(1, Ordering::Relaxed);
        assert_eq!(a.made().map(|v| v.load(Ordering::Relaxed)).sum::<u32>(), 8);
        assert!(std::panic::catch_unwind(|| a.get(10)).is_err(), "past the end");
    }

    #[test]
    fn the_chunk_table_costs_16_bytes_a_chunk() {
        let a: Chunked<AtomicU32, 2048> = Chunked::new(1 << 20);
        assert_eq!(std::mem::size_of_val(&*a.chunks), 512 * 16);
    }
}
