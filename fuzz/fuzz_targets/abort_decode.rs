//! `Abort::decode` over any ESR, FAR and HPFAR: never panics, and what it
//! decodes agrees with the registers it came from.
#![no_main]

use hyp_core::abort::{Abort, Access};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|regs: (u64, u64, u64)| {
    let (esr, far, hpfar) = regs;
    let Ok(abort) = Abort::decode(esr, far, hpfar) else { return };
    // Deterministic: the same registers decode the same.
    assert_eq!(Abort::decode(esr, far, hpfar), Ok(abort));
    let ec = esr >> 26 & 0x3f;
    // Only lower-EL data (0x24) and instruction (0x20) aborts decode.
    assert!(ec == 0x24 || ec == 0x20, "EC {ec:#x} decoded");
    assert_eq!(abort.access == Access::Execute, ec == 0x20);
    if let Some(ipa) = abort.reported_ipa() {
        // The page is HPFAR's FIPA (bits 4..=47 hold IPA[55:12]); only
        // the offset in the page can come from FAR.
        assert_eq!(ipa.raw() >> 12, hpfar >> 4 & ((1 << 44) - 1), "IPA page not from HPFAR");
        assert_eq!(ipa.raw() & 0xfff, abort.far.map_or(0, |f| f & 0xfff));
    }
});
