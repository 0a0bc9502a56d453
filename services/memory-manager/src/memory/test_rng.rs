//! A small deterministic generator for tests (xorshift64): random enough
//! to mix operations, the same sequence every run.

/// An xorshift64 generator.
pub(crate) struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (made odd: zero is a fixed point).
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next value.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// The next value below `n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
