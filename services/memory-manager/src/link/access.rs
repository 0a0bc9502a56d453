//! Access logs: which pages of a memslot the guest touched since the last
//! look, read and cleared from the stage-2 access flags through the core
//! (AGE, 64 pages a command), as Linux's idle page tracking reads and
//! clears young bits. A cleared page's next access sets its flag again at
//! the core, with no fault for the daemon (`Vm::handle_abort`).

use hyp_core::addr::{Ipa, PAGE_SIZE};
use hyp_core::ring::abi::{kind, CommandRecord, MAX_AGED_PAGES};

use super::control::{ControlClient, ControlError};
use crate::memory::memslot::Memslot;

/// The AGE command that reads and clears the access flags of `pages`
/// pages from `ipa` (at most [`MAX_AGED_PAGES`]).
pub fn age(ipa: Ipa, pages: u64) -> CommandRecord {
    CommandRecord { kind: kind::AGE, ipa: ipa.raw(), size: pages * PAGE_SIZE, ..Default::default() }
}

/// What a fetch-and-clear of an access log returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLog {
    /// Bit i of word w: page 64 * w + i of the memslot was accessed.
    pub bitmap: Vec<u64>,
    /// AGE commands the core executed.
    pub commands: u64,
}

/// Reads and clears the access flags over `slot`: one AGE per 64 pages,
/// sent as one batch. A refusal or a core that does not answer fails the
/// whole fetch; the flags already cleared then read as idle next time.
pub fn fetch_and_clear(control: &ControlClient, slot: &Memslot) -> Result<AccessLog, ControlError> {
    let pages = slot.pages();
    let cmds: Vec<CommandRecord> = (0..pages)
        .step_by(MAX_AGED_PAGES as usize)
        .map(|page| age(Ipa::new(slot.gpa.raw() + page * PAGE_SIZE), (pages - page).min(MAX_AGED_PAGES)))
        .collect();
    let commands = cmds.len() as u64;
    // One answer per 64 pages: word i of the bitmap is answer i.
    let bitmap = control.execute_all(cmds)?.into_iter().map(|a| a.map(|r| r.value)).collect::<Result<_, _>>()?;
    Ok(AccessLog { bitmap, commands })
}
