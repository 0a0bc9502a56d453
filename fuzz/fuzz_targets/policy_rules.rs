//! A policy's rule set off the wire (protobuf bytes, as UsePolicy and a
//! policy service send it): refused with a reason, or accepted and then
//! asked about any fault without panicking; an accepted set keeps every
//! budget it was given.
#![no_main]

use arbitrary::Arbitrary;
use faultline_proto::v1::RuleSet;
use hyp_core::abort::Access;
use hyp_core::stage2::MapSize;
use libfuzzer_sys::fuzz_target;
use memory_manager::fault::choices::FaultContext;
use memory_manager::policy::rules::Rules;
use prost::Message;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    rules: &'a [u8],
    vm_id: u8,
    ipa: u64,
    memslot: u8,
    access: u8,
    allowed: u8,
    may_write: bool,
    may_exec: bool,
}

fuzz_target!(|input: Input<'_>| {
    let Ok(set) = RuleSet::decode(input.rules) else { return };
    let Ok(rules) = Rules::try_from(&set) else { return };
    let allowed = [MapSize::Page4K, MapSize::Block2M, MapSize::Block1G][input.allowed as usize % 3];
    let ctx = FaultContext {
        vm_id: u16::from(input.vm_id),
        vcpu: 0,
        fault_id: 1,
        ipa: input.ipa,
        memslot: usize::from(input.memslot),
        access: [Access::Read, Access::Write, Access::Execute][input.access as usize % 3],
        allowed,
        may_write: input.may_write,
        may_exec: input.may_exec,
    };
    let matched = rules.decide(&ctx);
    assert!(matched.clamped <= 3, "more clamps than decisions");
    for b in &set.budgets {
        let budget = rules.budget(b.vm_id as u16).expect("an accepted budget is kept");
        assert_eq!(budget.max_resident, b.max_resident_bytes);
    }
});
