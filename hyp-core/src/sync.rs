//! Atomics used by the rings, swappable for `loom`'s model-checked ones
//! (the way tokio's `src/loom/mod.rs` does it): `RUSTFLAGS="--cfg loom"`.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
