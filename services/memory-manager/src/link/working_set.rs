//! What a VM's working-set monitor last saw ([`WorkingSet`]), published
//! by its monitor thread (`link::monitor`) for the API and the policies.

use std::sync::Arc;

use crate::observe::workingset::Aggregation;

/// What a VM's monitor last saw, for the API and the policies to read.
#[derive(Debug)]
pub struct WorkingSet {
    latest: tokio::sync::watch::Sender<Option<Arc<Aggregation>>>,
}

impl Default for WorkingSet {
    fn default() -> Self {
        Self { latest: tokio::sync::watch::Sender::new(None) }
    }
}

impl WorkingSet {
    /// Publishes an aggregation; followers see it.
    pub fn publish(&self, aggregation: Aggregation) {
        self.latest.send_replace(Some(Arc::new(aggregation)));
    }

    /// The latest aggregation, if the monitor has run.
    pub fn latest(&self) -> Option<Arc<Aggregation>> {
        self.latest.borrow().clone()
    }

    /// Follows the aggregations as they are published.
    pub fn follow(&self) -> tokio::sync::watch::Receiver<Option<Arc<Aggregation>>> {
        self.latest.subscribe()
    }
}
