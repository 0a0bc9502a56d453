//! Dirty logs: fetch-and-clear of a memslot's log, in KVM_GET_DIRTY_LOG's
//! order, re-arming logging through the core. A fetch holds its pages in
//! the log until it has delivered them (see [`DirtyLog`]), so a failed or
//! interrupted fetch (a daemon killed in the middle) loses none.

use hyp_core::addr::{Ipa, PAGE_SIZE};

use super::control::{ControlClient, ControlError};
use crate::fault::failpoint::crash_point;
use crate::memory::bitmap::{runs, DirtyLog};
use crate::memory::mapping::MappingState;
use crate::memory::memslot::Memslot;

/// Dirty runs beyond which one write-protect covers the whole dirty span.
const MAX_WRITE_PROTECT_RUNS: usize = 64;

/// What a fetch-and-clear of a dirty log returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The bitmap (64-bit words) as it was when cleared.
    pub bitmap: Vec<u64>,
    /// WRITE_PROTECT commands the core executed.
    pub write_protects: u64,
}

/// Fetch-and-clear of `slot`'s dirty log: the written pages move into the
/// fetch first, then are write-protected through the core, so a write
/// after that either is in the returned bitmap's page (copied by the
/// caller afterwards) or faults and is logged again; only then does the
/// fetch leave the log. If the core refuses or does not answer, or the
/// daemon dies before the end, the pages stay and the next fetch reports
/// them.
pub fn fetch_and_clear(
    mapping: &MappingState,
    control: &ControlClient,
    slot: &Memslot,
) -> Result<Fetched, ControlError> {
    let log: &DirtyLog = mapping.dirty_log(slot);
    let bitmap = log.stage();
    let mut dirty = runs(&bitmap);
    if dirty.len() > MAX_WRITE_PROTECT_RUNS {
        let (first, _) = dirty[0];
        let (last, n) = dirty[dirty.len() - 1];
        dirty = vec![(first, last + n - first)];
    }
    let mut write_protects = 0;
    for (page, pages) in dirty {
        let ipa = Ipa::new(slot.gpa.raw() + page * PAGE_SIZE);
        match control.write_protect(ipa, pages * PAGE_SIZE) {
            Ok(res) => {
                mapping.note_seq(res.inval_seq);
                write_protects += 1;
            }
            Err(e) => return Err(e),
        }
    }
    crash_point("dirty-fetch");
    log.settle(&bitmap);
    Ok(Fetched { bitmap, write_protects })
}
