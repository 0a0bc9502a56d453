//! Keeps `docs/ring-abi.md` true: its tables are parsed and compared with
//! the layout the code (and its const assertions) defines.

use std::mem::{offset_of, size_of_val};

use hyp_core::mmio::MmioExit;
use hyp_core::reject::Reject;
use hyp_core::ring::abi::{self, kind, CommandRecord, FaultRecord, LeafRecord, RegionHeader, ResultRecord};

/// The rows of the first table after `heading`, as trimmed cells.
fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != heading).skip(1);
    let rows: Vec<Vec<String>> = lines
        .by_ref()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    assert!(rows.len() > 2, "no table under {heading}");
    rows[2..].to_vec()
}

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ring-abi.md")).unwrap()
}

/// `(field, offset, size)` of each field, computed by the compiler.
macro_rules! layout {
    ($t:ty, $value:expr, [$($f:ident),*]) => {{
        let v: $t = $value;
        vec![$((stringify!($f).to_string(), offset_of!($t, $f), size_of_val(&v.$f))),*]
    }};
}

fn check(heading: &str, code: Vec<(String, usize, usize)>) {
    let doc: Vec<(String, usize, usize)> = table(&doc(), heading)
        .into_iter()
        .map(|r| (r[2].clone(), r[0].parse().unwrap(), r[1].parse().unwrap()))
        .collect();
    assert_eq!(doc, code, "{heading} in docs/ring-abi.md disagrees with the code");
}

#[test]
fn record_layouts_in_the_doc_match_the_code() {
    check(
        "### RegionHeader",
        layout!(
            RegionHeader,
            RegionHeader::default(),
            [magic, abi_version, nr_vcpus, ring_entries, record_size, ring_bytes, rings_offset, reserved]
        ),
    );
    let f =
        FaultRecord { kind: 0, vcpu: 0, fault_id: 0, esr: 0, far: 0, hpfar: 0, ipa: 0, inval_seq: 0, timestamp_ns: 0 };
    check(
        "### FaultRecord",
        layout!(FaultRecord, f, [kind, vcpu, fault_id, esr, far, hpfar, ipa, inval_seq, timestamp_ns]),
    );
    check(
        "### CommandRecord",
        layout!(
            CommandRecord,
            CommandRecord::default(),
            [kind, flags, cmd_id, fault_id, ipa, pa, size, inval_seq, reserved]
        ),
    );
    check("### MmioExit", layout!(MmioExit, MmioExit::default(), [ipa, data, len, is_write]));
    check(
        "### LeafRecord",
        layout!(LeafRecord, LeafRecord::default(), [kind, flags, cmd_id, ipa, pa, size, count, reserved]),
    );
    check(
        "### ResultRecord",
        layout!(
            ResultRecord,
            ResultRecord::default(),
            [kind, status, cmd_id, fault_id, inval_seq, value, detail, command_kind, reserved0, reserved1]
        ),
    );
}

#[test]
fn ring_control_offsets_and_kinds_match() {
    let d = doc();
    let ring: Vec<(usize, String)> =
        table(&d, "## Ring").into_iter().map(|r| (r[0].parse().unwrap(), r[1].clone())).collect();
    assert_eq!(ring[0].0, abi::PRODUCER_INDEX_OFFSET);
    assert_eq!(ring[1].0, abi::PRODUCER_YOUNG_OFFSET);
    assert_eq!(ring[2].0, abi::CONSUMER_INDEX_OFFSET);
    assert_eq!(ring[3].0, abi::CONSUMER_WAITING_OFFSET);
    assert_eq!(ring[4].0, abi::RING_CONTROL_SIZE);
    let kinds: Vec<(String, u32)> = table(&d, "## Records")
        .into_iter()
        .map(|r| (r[0].clone(), u32::from_str_radix(r[1].trim_start_matches("0x"), 16).unwrap()))
        .collect();
    let code = [
        ("FAULT", kind::FAULT),
        ("RESULT", kind::RESULT),
        ("LEAF", kind::LEAF),
        ("MAP", kind::MAP),
        ("UNMAP", kind::UNMAP),
        ("WRITE_PROTECT", kind::WRITE_PROTECT),
        ("COMPLETE", kind::COMPLETE),
        ("TOPUP", kind::TOPUP),
        ("PREFAULT", kind::PREFAULT),
        ("LEAVES", kind::LEAVES),
        ("OWNED", kind::OWNED),
        ("AGE", kind::AGE),
    ];
    assert_eq!(kinds, code.map(|(n, k)| (n.to_string(), k)).to_vec());
    assert!(d.contains(&format!("`{:#x}`", abi::MAGIC)));
}

#[test]
fn reject_codes_match() {
    let rows: Vec<(u32, String)> =
        table(&doc(), "### Reject codes").into_iter().map(|r| (r[0].parse().unwrap(), r[1].clone())).collect();
    let code: Vec<(u32, String)> = Reject::ALL.iter().map(|r| (r.code(), r.name().to_string())).collect();
    assert_eq!(rows, code);
}
