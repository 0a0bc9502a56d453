//! What the pipeline learns about a fault as it runs, for the fault's
//! event: the decoded abort, where the IPA led, and when each stage ended.

use hyp_core::abort::Abort;

use super::clock;

/// The pipeline's stages, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The memslot holding the IPA.
    Memslot,
    /// The VMA snapshot.
    Vma,
    /// The mapping size (correctness, then the policy).
    Size,
    /// Pinning and filling the backing.
    Pin,
    /// The permissions.
    Permissions,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 5] = [Stage::Memslot, Stage::Vma, Stage::Size, Stage::Pin, Stage::Permissions];

    /// Its name in statistics and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Memslot => "memslot",
            Stage::Vma => "vma",
            Stage::Size => "size",
            Stage::Pin => "pin",
            Stage::Permissions => "permissions",
        }
    }
}

/// Nanoseconds since a fault's arrival at the end of each stage (0: the
/// fault did not reach it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTimes([u64; Stage::ALL.len()]);

impl StageTimes {
    /// When `stage` ended.
    pub fn at(&self, stage: Stage) -> u64 {
        self.0[stage as usize]
    }

    /// Records that `stage` ended `ns` after arrival.
    pub fn set(&mut self, stage: Stage, ns: u64) {
        self.0[stage as usize] = ns;
    }

    /// `(stage, ns)` in pipeline order.
    pub fn iter(&self) -> impl Iterator<Item = (Stage, u64)> + '_ {
        Stage::ALL.iter().map(|&s| (s, self.at(s)))
    }
}

/// What the pipeline learned about a fault, for its trace event.
#[derive(Clone, Copy, Debug)]
pub struct Trace {
    /// Raw clock reading at the fault's arrival.
    pub start: u64,
    /// The decoded abort, when it decoded.
    pub abort: Option<Abort>,
    /// Memslot index, when the IPA is in one.
    pub memslot: Option<u32>,
    /// Daemon address backing the IPA.
    pub hva: u64,
    /// Backing page size of the VMA.
    pub vma_page_size: u64,
    /// When each stage ended.
    pub stages: StageTimes,
    /// The backing had a hole the pin stage filled (KVM: the page was
    /// faulted in; page_fault_test counts these as userfaultfd faults).
    pub populated: bool,
    /// The policy in force for the fault (set by the caller).
    pub policy: &'static str,
}

impl Trace {
    /// A trace starting now (the fault's arrival).
    pub fn start() -> Self {
        Self {
            start: clock::raw(),
            abort: None,
            memslot: None,
            hva: 0,
            vma_page_size: 0,
            stages: StageTimes::default(),
            populated: false,
            policy: "",
        }
    }

    /// Nanoseconds since the start.
    pub fn elapsed_ns(&self) -> u64 {
        clock::nanos_between(self.start, clock::raw())
    }

    /// Records that `stage` ended now.
    pub fn mark(&mut self, stage: Stage) {
        let now = self.elapsed_ns();
        self.stages.set(stage, now);
    }
}
