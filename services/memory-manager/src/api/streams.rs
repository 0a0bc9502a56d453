//! How many Observe streams the daemon serves at once: each one holds a
//! reader of the history and what its connection has not taken yet, so
//! clients that open streams and never read cannot grow the daemon without
//! bound. Past the maximum, Observe answers RESOURCE_EXHAUSTED.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// The Observe streams open, against their maximum.
#[derive(Debug)]
pub struct StreamLimit {
    max: usize,
    open: Arc<Semaphore>,
    refused: AtomicU64,
}

/// One open stream; it closes when dropped (with the stream it serves).
#[derive(Debug)]
pub struct OpenStream(#[allow(dead_code)] OwnedSemaphorePermit);

impl StreamLimit {
    /// At most `max` streams at once.
    pub fn new(max: usize) -> Self {
        Self { max, open: Arc::new(Semaphore::new(max)), refused: AtomicU64::new(0) }
    }

    /// Opens a stream, or refuses it with RESOURCE_EXHAUSTED at the maximum.
    pub fn open(&self) -> Result<OpenStream, Status> {
        self.open.clone().try_acquire_owned().map(OpenStream).map_err(|_| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Status::resource_exhausted(format!(
                "{} Observe streams are open, the most this daemon serves (max_observe_streams); close one",
                self.max
            ))
        })
    }

    /// Streams open now.
    pub fn in_use(&self) -> usize {
        self.max - self.open.available_permits()
    }

    /// Streams refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_past_the_maximum_are_refused_until_one_closes() {
        let limit = StreamLimit::new(2);
        let (a, _b) = (limit.open().unwrap(), limit.open().unwrap());
        let refused = limit.open().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("2 Observe streams"), "{}", refused.message());
        assert_eq!((limit.in_use(), limit.refused()), (2, 1));
        drop(a);
        assert_eq!(limit.in_use(), 1);
        limit.open().unwrap();
    }
}
