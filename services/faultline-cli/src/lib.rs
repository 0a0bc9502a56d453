//! The `faultline` command's formatting (how a fault event reads in
//! compact, JSON and table form), and where its sibling binaries are.

pub mod filter;

use faultline_proto::v1::{
    Access, Decision, FaultEvent, FaultKind, MappingSize, Outcome, PolicyExit, PolicyExitKind, PolicyStatus,
};

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
pub(crate) trait ShortName: TryFrom<i32> {
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
short_name!(
    Access => "ACCESS_",
    FaultKind => "FAULT_KIND_",
    MappingSize => "MAPPING_SIZE_",
    Outcome => "OUTCOME_",
    Decision => "DECISION_",
    PolicyExitKind => "POLICY_EXIT_KIND_"
);

pub(crate) fn name<T: ShortName>(v: i32) -> String {
    match T::try_from(v) {
        Ok(e) => e.proto_name().trim_start_matches(T::PREFIX).to_lowercase().replace('_', "-"),
        Err(_) => v.to_string(),
    }
}

fn perms(p: u32) -> String {
    let c = |bit: u32, ch: char| if p & bit != 0 { ch } else { '-' };
    format!("{}{}{}", c(1, 'r'), c(2, 'w'), c(4, 'x'))
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    match (*t).map(std::time::SystemTime::try_from) {
        Some(Ok(t)) => humantime::format_rfc3339_millis(t).to_string(),
        _ => "-".into(),
    }
}

/// A policy leaving, on one line: when, which, why, what took over.
pub fn policy_exit(x: &PolicyExit) -> String {
    format!(
        "{} policy {} ({}) left: {}: {}; {} in force",
        time(&x.time),
        x.policy,
        x.endpoint,
        name::<PolicyExitKind>(x.kind),
        x.reason,
        x.successor
    )
}

/// `faultline policy status`: the policy in force, its rules, the counters
/// and the exits, newest first.
pub fn policy_status(s: &PolicyStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let at = if s.endpoint.is_empty() { "built-in".to_string() } else { s.endpoint.clone() };
    let _ = writeln!(out, "policy: {} {} ({at}) since {}", s.active, s.version, time(&s.since));
    if !s.endpoint.is_empty() {
        let decisions: Vec<String> = s.decisions.iter().map(|d| name::<Decision>(*d)).collect();
        let _ = writeln!(out, "decides: {}", decisions.join(", "));
        let _ = writeln!(out, "rules: generation {}, {} rules, {} budgets", s.rules_generation, s.rules, s.budgets);
    }
    if !s.reconnecting_endpoint.is_empty() {
        let _ = writeln!(out, "reconnecting to: {}", s.reconnecting_endpoint);
    }
    let _ = writeln!(
        out,
        "consults: {} ({} late), clamped: {}, fallbacks: {}, reconnect: {}",
        s.consults, s.consults_late, s.clamped, s.fallbacks, s.reconnect
    );
    for x in &s.exits {
        let _ = writeln!(out, "  {}", policy_exit(x));
    }
    out
}

/// The event as a JSON object: `time` in RFC 3339 with nanoseconds (UTC),
/// and fields that do not apply left out rather than given the proto's
/// defaults (an exit has no mapping size, PA or permissions; a fault
/// outside every memslot has no memslot or HVA).
pub fn json(e: &FaultEvent) -> serde_json::Value {
    use serde_json::{json, Value};
    let mut o = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        o.insert(k.to_string(), v);
    };
    if let Some(Ok(t)) = e.time.map(std::time::SystemTime::try_from) {
        put("time", json!(humantime::format_rfc3339_nanos(t).to_string()));
    }
    put("fault_id", json!(e.fault_id));
    put("vm_id", json!(e.vm_id));
    put("vcpu", json!(e.vcpu));
    put("ipa", json!(format!("{:#x}", e.ipa)));
    put("esr", json!(format!("{:#x}", e.esr)));
    if FaultKind::try_from(e.kind).is_ok_and(|k| k != FaultKind::Unspecified) {
        put("kind", json!(name::<FaultKind>(e.kind)));
        put("level", json!(e.level));
    }
    if Access::try_from(e.access).is_ok_and(|a| a != Access::Unspecified) {
        put("access", json!(name::<Access>(e.access)));
    }
    if let Some(slot) = e.memslot {
        put("memslot", json!(slot));
        put("hva", json!(format!("{:#x}", e.hva)));
        put("vma_page_size", json!(e.vma_page_size));
    }
    if MappingSize::try_from(e.mapping_size).is_ok_and(|m| m != MappingSize::Unspecified) {
        put("mapping_size", json!(name::<MappingSize>(e.mapping_size)));
        put("permissions", json!(perms(e.permissions)));
        put("pa", json!(format!("{:#x}", e.pa)));
    }
    put("outcome", json!(name::<Outcome>(e.outcome)));
    if !e.reject_reason.is_empty() {
        put("reject_reason", json!(e.reject_reason));
    }
    if !e.policy.is_empty() {
        put("policy", json!(e.policy));
    }
    put("latency_ns", json!(e.latency_ns));
    Value::Object(o)
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

/// Which kind of fault an event is, for latencies that are only comparable
/// within a kind: a mapping of a size whose backing held data already, one
/// whose page the daemon had to allocate, an exit to the VMM, or another
/// outcome.
pub fn fault_kind_label(e: &FaultEvent) -> String {
    let size = match MappingSize::try_from(e.mapping_size) {
        Ok(MappingSize::MappingSize4k) => "4 KiB",
        Ok(MappingSize::MappingSize2m) => "2 MiB",
        Ok(MappingSize::MappingSize1g) => "1 GiB",
        _ => "",
    };
    match Outcome::try_from(e.outcome) {
        Ok(Outcome::Mapped) if e.populated => format!("{size} mapped, page allocated"),
        Ok(Outcome::Mapped) => format!("{size} mapped, data already there"),
        _ => name::<Outcome>(e.outcome),
    }
}

/// Daemon latencies collected by [`fault_kind_label`].
#[derive(Debug, Default)]
pub struct LatencyByKind(std::collections::BTreeMap<String, Vec<u64>>);

impl LatencyByKind {
    /// Adds `e`'s latency under its kind.
    pub fn add(&mut self, e: &FaultEvent) {
        self.0.entry(fault_kind_label(e)).or_default().push(e.latency_ns);
    }

    /// Each kind with its count, p50 and p99 in us, most frequent first.
    pub fn summary(&mut self) -> Vec<(String, usize, f64, f64)> {
        let mut rows: Vec<_> = self
            .0
            .iter_mut()
            .map(|(kind, ns)| {
                ns.sort_unstable();
                let at = |p: usize| ns[(ns.len() * p / 100).min(ns.len() - 1)] as f64 / 1000.0;
                (kind.clone(), ns.len(), at(50), at(99))
            })
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        rows
    }
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

/// The workspace binary `name` next to this one (`faultline demo` starts
/// the daemon and sim-machine, `faultline qemu` runs qemu-machine).
pub fn sibling(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().ok_or_else(|| anyhow::anyhow!("no directory holds {}", exe.display()))?.join(name);
    if !path.exists() {
        anyhow::bail!(
            "{} not found next to faultline: build the workspace first (cargo build --release)",
            path.display()
        );
    }
    Ok(path)
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

    #[test]
    fn json_times_are_rfc3339_and_what_does_not_apply_is_left_out() {
        let time = std::time::UNIX_EPOCH + std::time::Duration::new(1_796_000_000, 123_456_789);
        let exit = FaultEvent {
            time: Some(time.into()),
            kind: FaultKind::Permission as i32,
            access: Access::Write as i32,
            memslot: Some(1),
            outcome: Outcome::MmioExit as i32,
            ..Default::default()
        };
        let j = json(&exit);
        assert_eq!(j["time"], "2026-11-30T00:53:20.123456789Z");
        assert_eq!(humantime::parse_rfc3339(j["time"].as_str().unwrap()).unwrap(), time);
        for absent in ["mapping_size", "pa", "permissions", "reject_reason", "time_ns"] {
            assert!(j.get(absent).is_none(), "{absent}: {j}");
        }
        assert_eq!((&j["memslot"], &j["kind"], &j["outcome"]), (&1.into(), &"permission".into(), &"mmio-exit".into()));
        let outside = json(&FaultEvent { outcome: Outcome::InjectedAbort as i32, ..Default::default() });
        assert!(!outside.to_string().contains("unspecified"), "{outside}");
        assert!(outside.get("memslot").is_none() && outside.get("hva").is_none(), "{outside}");
    }

    #[test]
    fn latencies_are_kept_apart_by_kind() {
        let event = |outcome: Outcome, size: MappingSize, populated: bool, latency_ns: u64| FaultEvent {
            outcome: outcome as i32,
            mapping_size: size as i32,
            populated,
            latency_ns,
            ..Default::default()
        };
        let mut by = LatencyByKind::default();
        for ns in [1_000, 2_000, 3_000] {
            by.add(&event(Outcome::Mapped, MappingSize::MappingSize4k, false, ns));
        }
        by.add(&event(Outcome::Mapped, MappingSize::MappingSize2m, true, 700_000));
        by.add(&event(Outcome::MmioExit, MappingSize::Unspecified, false, 100));
        let rows = by.summary();
        assert_eq!(rows[0], ("4 KiB mapped, data already there".to_string(), 3, 2.0, 3.0));
        assert!(rows.contains(&("2 MiB mapped, page allocated".to_string(), 1, 700.0, 700.0)), "{rows:?}");
        assert!(rows.contains(&("mmio-exit".to_string(), 1, 0.1, 0.1)), "{rows:?}");
    }
}

/// Why a `--since`/`--until` value was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is neither an RFC 3339 time (2026-11-27T10:00:00Z) nor a duration ago (30s, 5m, 2h)")]
pub struct TimeError {
    /// The value given.
    pub value: String,
}

/// A time given as RFC 3339 or as a duration before `now` (as Hubble's
/// `--since 5m`).
pub fn parse_time(value: &str, now: std::time::SystemTime) -> Result<std::time::SystemTime, TimeError> {
    let err = || TimeError { value: value.to_string() };
    if let Ok(t) = humantime::parse_rfc3339_weak(value) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(value).map_err(|_| err())?;
    now.checked_sub(ago).ok_or_else(err)
}

/// Dirty pages of a bitmap (64-bit little-endian words, as the daemon sends
/// it) as `[first GPA, end GPA)` ranges.
pub fn dirty_ranges(gpa: u64, bitmap: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for page in faultline_proto::dirty_pages(gpa, bitmap) {
        match out.last_mut() {
            Some((_, end)) if *end == page => *end += 4096,
            _ => out.push((page, page + 4096)),
        }
    }
    out
}

#[cfg(test)]
mod time_tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_time("5m", now), Ok(now - Duration::from_secs(300)));
        assert_eq!(parse_time("1h 30s", now), Ok(now - Duration::from_secs(3630)));
        assert_eq!(parse_time("1970-01-01T00:01:40Z", now), Ok(UNIX_EPOCH + Duration::from_secs(100)));
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("99999999999999999999999h", now).is_err(), "overflows a duration");
    }

    #[test]
    fn dirty_ranges_merge_adjacent_pages() {
        let bitmap = [0b1000_0111u8, 0b0000_0001, 0, 0x80];
        assert_eq!(
            dirty_ranges(0x4000_0000, &bitmap),
            [(0x4000_0000, 0x4000_3000), (0x4000_7000, 0x4000_9000), (0x4001_f000, 0x4002_0000)]
        );
    }
}
