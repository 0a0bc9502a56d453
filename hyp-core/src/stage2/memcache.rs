//! The memcache: table pages the host has handed to the core ahead of time.
//!
//! The core never allocates. A map first checks that the memcache holds the
//! worst-case number of table pages it could need, so it never fails half
//! way; pages of tables emptied by an unmap come back here.

use crate::addr::Pa;

/// Maximum number of pages one memcache holds.
pub const MEMCACHE_CAPACITY: usize = 512;

/// A fixed-capacity stack of free, zeroing-pending table pages.
#[derive(Debug)]
pub struct Memcache {
    pages: [Pa; MEMCACHE_CAPACITY],
    len: usize,
}

impl Default for Memcache {
    fn default() -> Self {
        Self::new()
    }
}

impl Memcache {
    /// An empty memcache.
    pub const fn new() -> Self {
        Self { pages: [Pa::new(0); MEMCACHE_CAPACITY], len: 0 }
    }

    /// Pages held.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// True if no page is held.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Free slots.
    pub const fn room(&self) -> usize {
        MEMCACHE_CAPACITY - self.len
    }

    /// Adds a page; gives it back if the memcache is full.
    pub fn push(&mut self, page: Pa) -> Result<(), Pa> {
        if self.len == MEMCACHE_CAPACITY {
            return Err(page);
        }
        self.pages[self.len] = page;
        self.len += 1;
        Ok(())
    }

    /// Takes a page, if any.
    pub fn pop(&mut self) -> Option<Pa> {
        self.len = self.len.checked_sub(1)?;
        Some(self.pages[self.len])
    }

    /// True if `page` is held.
    pub fn contains(&self, page: Pa) -> bool {
        self.pages[..self.len].contains(&page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_pop_is_lifo_and_full_gives_page_back() {
        let mut m = Memcache::new();
        assert_eq!(m.pop(), None);
        for i in 0..MEMCACHE_CAPACITY as u64 {
            m.push(Pa::new(i << 12)).unwrap();
        }
        assert_eq!(m.push(Pa::new(0xdead_0000)), Err(Pa::new(0xdead_0000)));
        assert_eq!(m.pop(), Some(Pa::new((MEMCACHE_CAPACITY as u64 - 1) << 12)));
        assert_eq!(m.len(), MEMCACHE_CAPACITY - 1);
        assert!(m.contains(Pa::new(0)));
    }
}
