//! The attach wire format: any bytes from a machine decode to a message or
//! a clear error, never a panic; what decodes encodes back to the same
//! bytes.
#![no_main]

use faultline_attach::{decode_header, AttachRequest, MsgKind, Reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok((kind, payload)) = decode_header(bytes) else { return };
    match kind {
        MsgKind::Attach => {
            if let Ok(req) = AttachRequest::decode(payload) {
                assert_eq!(req.encode(), bytes, "an attach request does not round-trip");
            }
        }
        MsgKind::Reply => {
            let _ = Reply::decode(payload);
        }
        _ => {}
    }
});
