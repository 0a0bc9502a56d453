//! An Observe request off the wire (protobuf bytes), as the daemon
//! validates it: a clear INVALID_ARGUMENT or NOT_FOUND, never a panic; a
//! valid one filters and masks an event without panicking, and a request
//! with no filters at all matches every event.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use arbitrary::Arbitrary;
use faultline_proto::v1::ObserveRequest;
use hyp_core::abort::Abort;
use libfuzzer_sys::fuzz_target;
use memory_manager::api::fault_trace::check_observe;
use memory_manager::observe::events::{FaultEvent, Outcome};
use prost::Message;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    request: &'a [u8],
    vm_id: u8,
    vcpu: u32,
    ipa: u64,
    esr: u64,
    memslot: Option<u32>,
    completed_ns: u64,
    secs: u32,
}

fuzz_target!(|input: Input<'_>| {
    let Ok(request) = ObserveRequest::decode(input.request) else { return };
    let abort = Abort::decode(input.esr, input.ipa, input.ipa >> 12 << 4).ok();
    let event = FaultEvent {
        seq: 1,
        time: UNIX_EPOCH + Duration::from_secs(u64::from(input.secs)),
        fault_id: 1,
        vm_id: u16::from(input.vm_id),
        vcpu: input.vcpu,
        ipa: input.ipa,
        esr: input.esr,
        status: abort.map(|a| a.status),
        access: abort.map(|a| a.access),
        memslot: input.memslot,
        hva: 0,
        vma_page_size: 4096,
        mapping_size: None,
        permissions: 0,
        pa: 0,
        outcome: Outcome::Mapped,
        policy: "default",
        stages: Default::default(),
        sent_ns: 0,
        completed_ns: input.completed_ns,
        populated: false,
        fault_around: 0,
    };
    let unfiltered = request.allowlist.is_empty()
        && request.denylist.is_empty()
        && request.since.is_none()
        && request.until.is_none();
    if let Ok(matched) = check_observe(request, &event) {
        assert!(matched || !unfiltered, "a request without filters dropped an event");
    }
});
