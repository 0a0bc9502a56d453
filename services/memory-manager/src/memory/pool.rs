//! The machine's table pool: pages the daemon may hand to the core as
//! memcache pages (TOPUP), taken from the front of each window.

use hyp_core::addr::{Pa, PAGE_SIZE};

/// Table pages not yet handed to the core.
#[derive(Debug, Default)]
pub struct PagePool {
    free: Vec<(Pa, u64)>,
}

impl PagePool {
    /// A pool over PA windows `(base, bytes)`.
    pub fn new(windows: Vec<(Pa, u64)>) -> Self {
        Self { free: windows }
    }

    /// The free windows `(base, bytes)`.
    pub fn windows(&self) -> &[(Pa, u64)] {
        &self.free
    }

    /// Takes up to `pages` contiguous pages: `(first, count)`.
    pub fn take(&mut self, pages: u64) -> Option<(Pa, u64)> {
        let (base, bytes) = self.free.last_mut()?;
        let n = pages.min(*bytes / PAGE_SIZE);
        let first = *base;
        *base = Pa::new(base.raw() + n * PAGE_SIZE);
        *bytes -= n * PAGE_SIZE;
        if *bytes == 0 {
            self.free.pop();
        }
        Some((first, n))
    }
}
