//! sim-machine's trace parser: any text (the first byte picks the vCPU
//! count) parses or fails with a line number, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sim_machine::workload::parse_trace;

fuzz_target!(|input: &[u8]| {
    let Some((&vcpus, text)) = input.split_first() else { return };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let lines = text.lines().count();
    if let Err(e) = parse_trace(text, u32::from(vcpus % 8) + 1) {
        assert!(e.line >= 1 && e.line <= lines.max(1), "error names line {} of {lines}", e.line);
    }
});
