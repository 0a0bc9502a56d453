//! The `faultline` command's formatting: how a fault event reads in compact,
//! JSON and table form.

use faultline_proto::v1::{Access, FaultEvent, FaultKind, MappingSize, Outcome};

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One short line per event.
    Compact,
    /// One JSON object per line.
    Json,
    /// Aligned columns.
    Table,
}

/// The short name of a proto enum value: its protobuf name without the enum
/// prefix, lowercase, dashed (`OUTCOME_MMIO_EXIT` reads `mmio-exit`).
trait ShortName: TryFrom<i32> {
    const PREFIX: &'static str;
    fn proto_name(&self) -> &'static str;
}

macro_rules! short_name {
    ($($t:ty => $prefix:literal),*) => {$(
        impl ShortName for $t {
            const PREFIX: &'static str = $prefix;
            fn proto_name(&self) -> &'static str {
                self.as_str_name()
            }
        }
    )*};
}
short_name!(Access => "ACCESS_", FaultKind => "FAULT_KIND_", MappingSize => "MAPPING_SIZE_", Outcome => "OUTCOME_");

fn name<T: ShortName>(v: i32) -> String {
    match T::try_from(v) {
        Ok(e) => e.proto_name().trim_start_matches(T::PREFIX).to_lowercase().replace('_', "-"),
        Err(_) => v.to_string(),
    }
}

fn perms(p: u32) -> String {
    let c = |bit: u32, ch: char| if p & bit != 0 { ch } else { '-' };
    format!("{}{}{}", c(1, 'r'), c(2, 'w'), c(4, 'x'))
}

/// The event as a JSON object.
pub fn json(e: &FaultEvent) -> serde_json::Value {
    serde_json::json!({
        "time_ns": e.time.map(|t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128),
        "fault_id": e.fault_id,
        "vm_id": e.vm_id,
        "vcpu": e.vcpu,
        "ipa": format!("{:#x}", e.ipa),
        "esr": format!("{:#x}", e.esr),
        "kind": name::<FaultKind>(e.kind),
        "level": e.level,
        "access": name::<Access>(e.access),
        "memslot": e.memslot,
        "hva": format!("{:#x}", e.hva),
        "vma_page_size": e.vma_page_size,
        "mapping_size": name::<MappingSize>(e.mapping_size),
        "permissions": perms(e.permissions),
        "pa": format!("{:#x}", e.pa),
        "outcome": name::<Outcome>(e.outcome),
        "reject_reason": e.reject_reason,
        "policy": e.policy,
        "latency_ns": e.latency_ns,
    })
}

/// The event as one compact line.
pub fn compact(e: &FaultEvent) -> String {
    let size = match MappingSize::try_from(e.mapping_size) {
        Ok(MappingSize::MappingSize4k) => " 4k",
        Ok(MappingSize::MappingSize2m) => " 2m",
        Ok(MappingSize::MappingSize1g) => " 1g",
        _ => "",
    };
    format!(
        "vm{}/vcpu{} #{} {} ipa={:#x} {} L{} -> {}{} {} {:.1}us",
        e.vm_id,
        e.vcpu,
        e.fault_id,
        name::<Access>(e.access),
        e.ipa,
        name::<FaultKind>(e.kind),
        e.level,
        name::<Outcome>(e.outcome),
        size,
        perms(e.permissions),
        e.latency_ns as f64 / 1000.0,
    )
}

/// The header of table output.
pub const TABLE_HEADER: &str =
    "VM  VCPU  FAULT       IPA                 ACCESS   KIND          OUTCOME           SIZE  PERM  LATENCY";

/// The event as a table row.
pub fn row(e: &FaultEvent) -> String {
    format!(
        "{:<3} {:<5} {:<11} {:<19} {:<8} {:<13} {:<17} {:<5} {:<5} {:.1}us",
        e.vm_id,
        e.vcpu,
        e.fault_id,
        format!("{:#x}", e.ipa),
        name::<Access>(e.access),
        name::<FaultKind>(e.kind),
        name::<Outcome>(e.outcome),
        name::<MappingSize>(e.mapping_size),
        perms(e.permissions),
        e.latency_ns as f64 / 1000.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_line_reads_like_the_fault() {
        let e = FaultEvent {
            fault_id: 7,
            vm_id: 1,
            vcpu: 2,
            ipa: 0x4000_1000,
            kind: FaultKind::Translation as i32,
            level: 3,
            access: Access::Write as i32,
            outcome: Outcome::Mapped as i32,
            mapping_size: MappingSize::MappingSize4k as i32,
            permissions: 3,
            latency_ns: 1500,
            ..Default::default()
        };
        assert_eq!(compact(&e), "vm1/vcpu2 #7 write ipa=0x40001000 translation L3 -> mapped 4k rw- 1.5us");
        assert_eq!(json(&e)["outcome"], "mapped");
        assert!(row(&e).contains("0x40001000"));
    }
}
