//! A policy's rules as the daemon applies them on the fast path: checked
//! once when they arrive (a malformed set is refused whole, with the
//! reason), then matched per fault without allocating.

use faultline_proto::convert::map_size;
use faultline_proto::v1 as pb;
use hyp_core::stage2::MapSize;

use crate::fault::choices::{Budget, ColdReclaim, Decisions, EvictionOrder, FaultContext, MAX_FAULT_AROUND};

/// Most rules in a set.
pub const MAX_RULES: usize = 4096;
/// Smallest resident budget.
pub const MIN_BUDGET: u64 = 2 << 20;
/// Shortest idle time cold reclaim may be given (ms).
pub const MIN_COLD_IDLE_MS: u64 = 100;

/// One rule: which faults, and the decisions it sets for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The VM, or every VM.
    pub vm_id: Option<u16>,
    /// The memslot, or every memslot.
    pub memslot: Option<u32>,
    /// First IPA covered.
    pub ipa_start: u64,
    /// First IPA not covered.
    pub ipa_end: u64,
    /// Largest mapping.
    pub max_size: Option<MapSize>,
    /// Pages after the faulting one to map with it.
    pub fault_around: Option<u32>,
    /// Map writable on read faults.
    pub writable_on_read: Option<bool>,
    /// Map executable on data faults.
    pub eager_exec: Option<bool>,
    /// Ask the policy per fault.
    pub consult: bool,
}

impl Rule {
    fn covers(&self, ctx: &FaultContext) -> bool {
        self.vm_id.is_none_or(|v| v == ctx.vm_id)
            && self.memslot.is_none_or(|m| m as usize == ctx.memslot)
            && (self.ipa_start..self.ipa_end).contains(&ctx.ipa)
    }
}

/// A checked rule set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// The policy's generation number for the set.
    pub generation: u64,
    /// In order: the first rule that sets a decision wins.
    pub rules: Vec<Rule>,
    /// Resident budgets by VM.
    pub budgets: Vec<(u16, Budget)>,
    /// Proactive reclaim by VM.
    pub cold_reclaims: Vec<(u16, ColdReclaim)>,
}

/// Why a rule set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    /// More rules than [`MAX_RULES`].
    #[error("{0} rules; at most {MAX_RULES}")]
    TooMany(usize),
    /// A VM id that cannot exist.
    #[error("rule {rule}: vm_id {vm_id} is not in 0..=255")]
    BadVm {
        /// Index of the rule.
        rule: usize,
        /// The id.
        vm_id: u32,
    },
    /// An empty or inverted IPA range.
    #[error("rule {rule}: IPA range {start:#x}..{end:#x} is empty")]
    EmptyRange {
        /// Index of the rule.
        rule: usize,
        /// ipa_start.
        start: u64,
        /// ipa_end.
        end: u64,
    },
    /// An unknown mapping size.
    #[error("rule {rule}: unknown mapping size {value}")]
    BadSize {
        /// Index of the rule.
        rule: usize,
        /// The enum value.
        value: i32,
    },
    /// A fault-around window over [`MAX_FAULT_AROUND`].
    #[error("rule {rule}: fault-around of {pages} pages; at most {MAX_FAULT_AROUND}")]
    FaultAroundTooLarge {
        /// Index of the rule.
        rule: usize,
        /// Pages asked for.
        pages: u32,
    },
    /// A rule that decides nothing.
    #[error("rule {rule}: sets no decision")]
    Empty {
        /// Index of the rule.
        rule: usize,
    },
    /// A budget for a VM that cannot exist, or for every VM.
    #[error("budget {index}: vm_id {vm_id} is not in 1..=255")]
    BudgetVm {
        /// Index of the budget.
        index: usize,
        /// The id.
        vm_id: u32,
    },
    /// A budget below [`MIN_BUDGET`].
    #[error("budget {index}: {bytes} bytes; at least {MIN_BUDGET}")]
    BudgetTooSmall {
        /// Index of the budget.
        index: usize,
        /// Bytes asked for.
        bytes: u64,
    },
    /// An unknown or unset eviction order.
    #[error("budget {index}: unknown eviction order {value}")]
    BadOrder {
        /// Index of the budget.
        index: usize,
        /// The enum value.
        value: i32,
    },
    /// Two budgets for one VM.
    #[error("budget {index}: a second budget for VM {vm_id}")]
    DuplicateBudget {
        /// Index of the budget.
        index: usize,
        /// The VM.
        vm_id: u16,
    },
    /// A cold reclaim for a VM that cannot exist, or for every VM.
    #[error("cold reclaim {index}: vm_id {vm_id} is not in 1..=255")]
    ColdVm {
        /// Index of the cold reclaim.
        index: usize,
        /// The id.
        vm_id: u32,
    },
    /// A cold reclaim idle time below [`MIN_COLD_IDLE_MS`].
    #[error("cold reclaim {index}: min_idle_ms {ms}; at least {MIN_COLD_IDLE_MS}")]
    ColdTooSoon {
        /// Index of the cold reclaim.
        index: usize,
        /// The idle time asked for.
        ms: u64,
    },
    /// Two cold reclaims for one VM.
    #[error("cold reclaim {index}: a second one for VM {vm_id}")]
    DuplicateCold {
        /// Index of the cold reclaim.
        index: usize,
        /// The VM.
        vm_id: u16,
    },
}

impl TryFrom<&pb::RuleSet> for Rules {
    type Error = RulesError;

    fn try_from(set: &pb::RuleSet) -> Result<Self, RulesError> {
        if set.rules.len() > MAX_RULES {
            return Err(RulesError::TooMany(set.rules.len()));
        }
        let mut rules = Vec::with_capacity(set.rules.len());
        for (i, r) in set.rules.iter().enumerate() {
            let vm_id = match r.vm_id {
                0 => None,
                v @ 1..=255 => Some(v as u16),
                v => return Err(RulesError::BadVm { rule: i, vm_id: v }),
            };
            let ipa_end = if r.ipa_end == 0 { u64::MAX } else { r.ipa_end };
            if r.ipa_start >= ipa_end {
                return Err(RulesError::EmptyRange { rule: i, start: r.ipa_start, end: r.ipa_end });
            }
            let max_size = map_size(r.max_mapping_size).map_err(|value| RulesError::BadSize { rule: i, value })?;
            if let Some(pages) = r.fault_around_pages.filter(|&p| p > MAX_FAULT_AROUND) {
                return Err(RulesError::FaultAroundTooLarge { rule: i, pages });
            }
            let rule = Rule {
                vm_id,
                memslot: r.memslot,
                ipa_start: r.ipa_start,
                ipa_end,
                max_size,
                fault_around: r.fault_around_pages,
                writable_on_read: r.writable_on_read,
                eager_exec: r.eager_exec,
                consult: r.consult,
            };
            let decides = rule.max_size.is_some()
                || rule.fault_around.is_some()
                || rule.writable_on_read.is_some()
                || rule.eager_exec.is_some()
                || rule.consult;
            if !decides {
                return Err(RulesError::Empty { rule: i });
            }
            rules.push(rule);
        }
        let mut budgets: Vec<(u16, Budget)> = Vec::new();
        for (i, b) in set.budgets.iter().enumerate() {
            let vm_id = match b.vm_id {
                v @ 1..=255 => v as u16,
                v => return Err(RulesError::BudgetVm { index: i, vm_id: v }),
            };
            if b.max_resident_bytes < MIN_BUDGET {
                return Err(RulesError::BudgetTooSmall { index: i, bytes: b.max_resident_bytes });
            }
            let order = match pb::EvictionOrder::try_from(b.order) {
                Ok(pb::EvictionOrder::Fifo) => EvictionOrder::Fifo,
                Ok(pb::EvictionOrder::Lifo) => EvictionOrder::Lifo,
                Ok(pb::EvictionOrder::LowestIpa) => EvictionOrder::LowestIpa,
                Ok(pb::EvictionOrder::HighestIpa) => EvictionOrder::HighestIpa,
                Ok(pb::EvictionOrder::Coldest) => EvictionOrder::Coldest,
                Ok(pb::EvictionOrder::Unspecified) | Err(_) => {
                    return Err(RulesError::BadOrder { index: i, value: b.order })
                }
            };
            if budgets.iter().any(|(v, _)| *v == vm_id) {
                return Err(RulesError::DuplicateBudget { index: i, vm_id });
            }
            budgets.push((vm_id, Budget { max_resident: b.max_resident_bytes, order }));
        }
        let mut cold_reclaims: Vec<(u16, ColdReclaim)> = Vec::new();
        for (i, c) in set.cold_reclaims.iter().enumerate() {
            let vm_id = match c.vm_id {
                v @ 1..=255 => v as u16,
                v => return Err(RulesError::ColdVm { index: i, vm_id: v }),
            };
            if c.min_idle_ms < MIN_COLD_IDLE_MS {
                return Err(RulesError::ColdTooSoon { index: i, ms: c.min_idle_ms });
            }
            if cold_reclaims.iter().any(|(v, _)| *v == vm_id) {
                return Err(RulesError::DuplicateCold { index: i, vm_id });
            }
            let min_idle = std::time::Duration::from_millis(c.min_idle_ms);
            cold_reclaims.push((vm_id, ColdReclaim { min_idle }));
        }
        Ok(Self { generation: set.generation, rules, budgets, cold_reclaims })
    }
}

/// The rules' answer for one fault, and whether to consult the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matched {
    /// Decisions from the rules, the default filling the rest.
    pub decisions: Decisions,
    /// A covering rule asks for a per-fault consult.
    pub consult: bool,
    /// Decisions the rules set that correctness will override.
    pub clamped: u64,
}

impl Rules {
    /// For each decision, the first covering rule that sets it, else KVM's
    /// default.
    pub fn decide(&self, ctx: &FaultContext) -> Matched {
        let mut d = Decisions::kvm(ctx);
        let (mut size, mut around, mut wor, mut exec, mut consult) = (None, None, None, None, false);
        for r in self.rules.iter().filter(|r| r.covers(ctx)) {
            size = size.or(r.max_size);
            around = around.or(r.fault_around);
            wor = wor.or(r.writable_on_read);
            exec = exec.or(r.eager_exec);
            consult |= r.consult;
            if size.is_some() && around.is_some() && wor.is_some() && exec.is_some() && consult {
                break;
            }
        }
        if let Some(s) = size {
            d.max_size = s;
        }
        d.fault_around = around.unwrap_or(d.fault_around);
        d.writable_on_read = wor.unwrap_or(d.writable_on_read);
        d.eager_exec = exec.unwrap_or(d.eager_exec);
        Matched { decisions: d, consult, clamped: clamps(size, wor, exec, ctx) }
    }

    /// VM `vm_id`'s budget.
    pub fn budget(&self, vm_id: u16) -> Option<Budget> {
        self.budgets.iter().find(|(v, _)| *v == vm_id).map(|(_, b)| *b)
    }

    /// VM `vm_id`'s proactive reclaim.
    pub fn cold_reclaim(&self, vm_id: u16) -> Option<ColdReclaim> {
        self.cold_reclaims.iter().find(|(v, _)| *v == vm_id).map(|(_, c)| *c)
    }
}

/// How many of these decisions a policy set that correctness will
/// override for `ctx`: a size above what is allowed, writes where none may
/// be, exec on device memory.
pub fn clamps(
    size: Option<MapSize>,
    writable_on_read: Option<bool>,
    eager_exec: Option<bool>,
    ctx: &FaultContext,
) -> u64 {
    size.is_some_and(|s| s > ctx.allowed) as u64
        + (writable_on_read == Some(true) && !ctx.may_write) as u64
        + (eager_exec == Some(true) && !ctx.may_exec) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyp_core::abort::Access;

    fn ctx(vm_id: u16, memslot: usize, ipa: u64) -> FaultContext {
        FaultContext {
            vm_id,
            vcpu: 0,
            fault_id: 1,
            ipa,
            memslot,
            access: Access::Read,
            allowed: MapSize::Block2M,
            may_write: true,
            may_exec: true,
        }
    }

    fn rule(vm_id: u32, start: u64, end: u64) -> pb::Rule {
        pb::Rule { vm_id, ipa_start: start, ipa_end: end, ..Default::default() }
    }

    #[test]
    fn the_first_covering_rule_that_sets_a_decision_wins() {
        let set = pb::RuleSet {
            generation: 3,
            rules: vec![
                pb::Rule { fault_around_pages: Some(8), ..rule(1, 0x1000, 0x2000) },
                pb::Rule { max_mapping_size: pb::MappingSize::MappingSize4k as i32, ..rule(1, 0, 0) },
                pb::Rule {
                    max_mapping_size: pb::MappingSize::MappingSize2m as i32,
                    writable_on_read: Some(false),
                    ..rule(0, 0, 0)
                },
            ],
            ..Default::default()
        };
        let rules = Rules::try_from(&set).unwrap();
        let m = rules.decide(&ctx(1, 0, 0x1800));
        assert_eq!((m.decisions.max_size, m.decisions.fault_around), (MapSize::Page4K, 8));
        assert!(!m.decisions.writable_on_read && !m.consult);
        // Outside the first rule's range; another VM only gets the last rule.
        assert_eq!(rules.decide(&ctx(1, 0, 0x2000)).decisions.fault_around, 0);
        let other = rules.decide(&ctx(2, 0, 0x1800)).decisions;
        assert_eq!((other.max_size, other.fault_around, other.writable_on_read), (MapSize::Block2M, 0, false));
    }

    #[test]
    fn no_rules_is_kvms_default() {
        let c = ctx(1, 0, 0);
        assert_eq!(Rules::default().decide(&c).decisions, Decisions::kvm(&c));
    }

    #[test]
    fn malformed_sets_are_refused_with_the_reason() {
        let bad = |rules: Vec<pb::Rule>, budgets: Vec<pb::ResidentBudget>| {
            Rules::try_from(&pb::RuleSet { generation: 1, rules, budgets, ..Default::default() }).unwrap_err()
        };
        let around = |n| pb::Rule { fault_around_pages: Some(n), ..rule(0, 0, 0) };
        assert_eq!(bad(vec![around(1), around(65)], vec![]), RulesError::FaultAroundTooLarge { rule: 1, pages: 65 });
        assert_eq!(bad(vec![pb::Rule { vm_id: 300, ..around(1) }], vec![]), RulesError::BadVm { rule: 0, vm_id: 300 });
        assert!(matches!(
            bad(vec![pb::Rule { ipa_start: 5, ipa_end: 5, ..around(1) }], vec![]),
            RulesError::EmptyRange { .. }
        ));
        assert_eq!(
            bad(vec![pb::Rule { max_mapping_size: 9, ..rule(0, 0, 0) }], vec![]),
            RulesError::BadSize { rule: 0, value: 9 }
        );
        assert_eq!(bad(vec![rule(0, 0, 0)], vec![]), RulesError::Empty { rule: 0 });
        assert!(matches!(bad(vec![around(1); MAX_RULES + 1], vec![]), RulesError::TooMany(_)));
        let budget = |vm_id, bytes, order: pb::EvictionOrder| pb::ResidentBudget {
            vm_id,
            max_resident_bytes: bytes,
            order: order as i32,
        };
        let fifo = pb::EvictionOrder::Fifo;
        assert!(matches!(bad(vec![], vec![budget(0, 4 << 20, fifo)]), RulesError::BudgetVm { .. }));
        assert!(matches!(bad(vec![], vec![budget(1, 4096, fifo)]), RulesError::BudgetTooSmall { .. }));
        assert!(matches!(
            bad(vec![], vec![budget(1, 4 << 20, pb::EvictionOrder::Unspecified)]),
            RulesError::BadOrder { .. }
        ));
        let two = vec![budget(1, 4 << 20, fifo), budget(1, 8 << 20, fifo)];
        assert_eq!(bad(vec![], two), RulesError::DuplicateBudget { index: 1, vm_id: 1 });
        let ok = Rules::try_from(&pb::RuleSet { budgets: vec![budget(3, 4 << 20, fifo)], ..Default::default() });
        assert_eq!(ok.unwrap().budget(3), Some(Budget { max_resident: 4 << 20, order: EvictionOrder::Fifo }));
    }

    #[test]
    fn cold_reclaims_are_checked_and_name_the_working_set() {
        let cold = |vm_id, min_idle_ms| pb::ColdReclaim { vm_id, min_idle_ms };
        let with = |cold_reclaims| Rules::try_from(&pb::RuleSet { cold_reclaims, ..Default::default() });
        assert_eq!(with(vec![cold(0, 1000)]), Err(RulesError::ColdVm { index: 0, vm_id: 0 }));
        assert_eq!(with(vec![cold(2, 1000), cold(2, 99)]), Err(RulesError::ColdTooSoon { index: 1, ms: 99 }));
        assert_eq!(with(vec![cold(2, 1000), cold(2, 500)]), Err(RulesError::DuplicateCold { index: 1, vm_id: 2 }));
        let rules = with(vec![cold(2, 1500)]).unwrap();
        assert_eq!(rules.cold_reclaim(2), Some(ColdReclaim { min_idle: std::time::Duration::from_millis(1500) }));
        assert_eq!(rules.cold_reclaim(3), None);
        // Coldest-first orders by the monitor too.
        let coldest =
            pb::ResidentBudget { vm_id: 4, max_resident_bytes: 4 << 20, order: pb::EvictionOrder::Coldest as i32 };
        let rules = Rules::try_from(&pb::RuleSet { budgets: vec![coldest], ..Default::default() }).unwrap();
        assert_eq!(rules.budget(4).map(|b| b.order), Some(EvictionOrder::Coldest));
    }

    #[test]
    fn clamps_count_what_correctness_overrides() {
        let mut c = ctx(1, 0, 0);
        (c.allowed, c.may_write, c.may_exec) = (MapSize::Page4K, false, false);
        assert_eq!(clamps(Some(MapSize::Block1G), Some(true), Some(true), &c), 3);
        assert_eq!(clamps(Some(MapSize::Page4K), Some(false), None, &c), 0);
        // Only what the policy set counts: the default's write-on-read does not.
        let set = pb::RuleSet {
            generation: 1,
            rules: vec![pb::Rule { fault_around_pages: Some(4), ..rule(0, 0, 0) }],
            ..Default::default()
        };
        assert_eq!(Rules::try_from(&set).unwrap().decide(&c).clamped, 0);
    }
}
