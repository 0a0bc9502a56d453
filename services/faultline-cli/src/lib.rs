//! The `faultline` command's formatting (how a fault event reads in
//! compact, JSON and table form), and where its sibling binaries are.

pub mod filter;
pub mod heatmap;

use faultline_proto::v1::{
    Access, Decision, FaultEvent, FaultKind, MappingSize, Outcome, PolicyExit, PolicyExitKind, PolicyStatus,
};

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One short line per event, local time first.
    Compact,
    /// One JSON object per line, times in RFC 3339 (UTC), fields that do
    /// not apply left out.
    Json,
    /// The proto's canonical JSON mapping (lowerCamelCase names, enum
    /// names, 64-bit integers as strings), one object per line: for tools
    /// that decode it back into the proto.
    Jsonpb,
    /// Aligned columns sized to the rows, local time first.
    Table,
}

/// Output formats of the commands that print one response (status, stats,
/// vm, policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Lines for people.
    Text,
    /// The response in the proto's canonical JSON mapping, on one line.
    #[value(alias = "jsonpb")]
    Json,
}

/// Output formats of `faultline dirty-log` and `faultline access-log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DirtyLogFormat {
    /// The page ranges, one per line.
    #[value(alias = "compact")]
    Text,
    /// The page ranges as JSON, addresses in hex.
    Json,
    /// The DirtyLog (AccessLog) message in the proto's canonical JSON
    /// mapping (the bitmap in base64).
    Jsonpb,
}

/// The descriptor of message `full_name` (`faultline.v1.FaultEvent`).
fn descriptor(full_name: &str) -> anyhow::Result<prost_reflect::MessageDescriptor> {
    use prost_reflect::DescriptorPool;
    static POOL: std::sync::OnceLock<Result<DescriptorPool, String>> = std::sync::OnceLock::new();
    let pool = POOL
        .get_or_init(|| DescriptorPool::decode(faultline_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the built-in proto descriptors: {e}"))?;
    pool.get_message_by_name(full_name).ok_or_else(|| anyhow::anyhow!("no message {full_name} in faultline.v1"))
}

/// The message `m`, whose proto name is `full_name`
/// (`faultline.v1.FaultEvent`), in the proto's canonical JSON mapping.
pub fn jsonpb<M: prost::Message>(full_name: &str, m: &M) -> anyhow::Result<String> {
    let message = prost_reflect::DynamicMessage::decode(descriptor(full_name)?, m.encode_to_vec().as_slice())?;
    Ok(serde_json::to_string(&message)?)
}

/// A message `full_name` read back from its canonical JSON mapping
/// ([`jsonpb`]'s output).
pub fn from_jsonpb<M: prost::Message + Default>(full_name: &str, json: &str) -> anyhow::Result<M> {
    let mut de = serde_json::Deserializer::from_str(json);
    let message = prost_reflect::DynamicMessage::deserialize(descriptor(full_name)?, &mut de)?;
    de.end()?;
    Ok(message.transcode_to::<M>()?)
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

/// When the event happened, in `tz`, to the microsecond (`Dec 02
/// 17:05:08.123456`), or `-` without a time.
pub fn local_time(e: &FaultEvent, tz: &jiff::tz::TimeZone) -> String {
    match e.time.map(std::time::SystemTime::try_from) {
        Some(Ok(t)) => match jiff::Timestamp::try_from(t) {
            Ok(t) => t.to_zoned_datetime(tz.clone()).strftime("%b %d %H:%M:%S%.6f").to_string(),
            Err(_) => "-".into(),
        },
        _ => "-".into(),
    }
}

/// The event as one compact line, its time in `tz`.
pub fn compact(e: &FaultEvent, tz: &jiff::tz::TimeZone) -> String {
    let size = match MappingSize::try_from(e.mapping_size) {
        Ok(MappingSize::MappingSize4k) => " 4k",
        Ok(MappingSize::MappingSize2m) => " 2m",
        Ok(MappingSize::MappingSize1g) => " 1g",
        _ => "",
    };
    format!(
        "{} vm{}/vcpu{} #{} {} ipa={:#x} {} L{} -> {}{} {} {:.1}us",
        local_time(e, tz),
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

/// The `p`th percentile of `sorted_ns` (ascending nanoseconds), in us; 0
/// for none.
pub fn percentile_us(sorted_ns: &[u64], p: usize) -> f64 {
    match sorted_ns.len() {
        0 => 0.0,
        n => sorted_ns[(n * p / 100).min(n - 1)] as f64 / 1000.0,
    }
}

/// A fault outcome's short name (`OUTCOME_MMIO_EXIT` reads `mmio-exit`).
pub fn outcome_name(outcome: i32) -> String {
    name::<Outcome>(outcome)
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
                (kind.clone(), ns.len(), percentile_us(ns, 50), percentile_us(ns, 99))
            })
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        rows
    }
}

/// Fault events as aligned columns: rows are held until [`Table::flush`],
/// which sizes each column to the widest cell seen so far (columns only
/// grow, so batches of a stream stay aligned with the header when they can).
#[derive(Debug)]
pub struct Table {
    tz: jiff::tz::TimeZone,
    widths: [usize; TABLE_COLUMNS.len()],
    rows: Vec<[String; TABLE_COLUMNS.len()]>,
    header_written: bool,
}

/// The columns of [`Table`], and whether each is right-aligned.
const TABLE_COLUMNS: [(&str, bool); 11] = [
    ("TIME", false),
    ("VM", true),
    ("VCPU", true),
    ("FAULT", true),
    ("IPA", true),
    ("ACCESS", false),
    ("KIND", false),
    ("OUTCOME", false),
    ("SIZE", false),
    ("PERM", false),
    ("LATENCY", true),
];

impl Table {
    /// An empty table whose times read in `tz`.
    pub fn new(tz: jiff::tz::TimeZone) -> Self {
        Self { tz, widths: TABLE_COLUMNS.map(|(h, _)| h.len()), rows: Vec::new(), header_written: false }
    }

    /// Holds `e` as a row until the next flush.
    pub fn push(&mut self, e: &FaultEvent) {
        let size = match MappingSize::try_from(e.mapping_size) {
            Ok(MappingSize::Unspecified) | Err(_) => "-".to_string(),
            Ok(_) => name::<MappingSize>(e.mapping_size),
        };
        let row = [
            local_time(e, &self.tz),
            e.vm_id.to_string(),
            e.vcpu.to_string(),
            e.fault_id.to_string(),
            format!("{:#x}", e.ipa),
            name::<Access>(e.access),
            name::<FaultKind>(e.kind),
            name::<Outcome>(e.outcome),
            size,
            perms(e.permissions),
            format!("{:.1}us", e.latency_ns as f64 / 1000.0),
        ];
        for (w, cell) in self.widths.iter_mut().zip(&row) {
            *w = (*w).max(cell.chars().count());
        }
        self.rows.push(row);
    }

    /// Rows held since the last flush.
    pub fn pending(&self) -> usize {
        self.rows.len()
    }

    /// The rows held, laid out, each line ending in a newline; the header
    /// first on the first flush that has rows.
    pub fn flush(&mut self) -> String {
        let mut out = String::new();
        if self.rows.is_empty() {
            return out;
        }
        if !self.header_written {
            self.header_written = true;
            push_aligned(&mut out, TABLE_COLUMNS.iter().map(|(h, _)| *h), &TABLE_COLUMNS, &self.widths);
        }
        for row in std::mem::take(&mut self.rows) {
            push_aligned(&mut out, row.iter().map(String::as_str), &TABLE_COLUMNS, &self.widths);
        }
        out
    }
}

/// Appends a line of `cells` laid out as `columns` say (each `(header,
/// right-aligned)`) at `widths`, two spaces apart, trailing blanks trimmed.
fn push_aligned<'c>(
    out: &mut String,
    cells: impl IntoIterator<Item = &'c str>,
    columns: &[(&str, bool)],
    widths: &[usize],
) {
    use std::fmt::Write;
    let start = out.len();
    for (i, ((cell, &(_, right)), &w)) in cells.into_iter().zip(columns).zip(widths).enumerate() {
        let sep = if i == 0 { "" } else { "  " };
        let _ = match right {
            true => write!(out, "{sep}{cell:>w$}"),
            false => write!(out, "{sep}{cell:<w$}"),
        };
    }
    out.truncate(start + out[start..].trim_end().len());
    out.push('\n');
}

/// Bytes as people read them: `512 KiB`, `1.5 MiB`, `2.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{} KiB", b >> 10),
    }
}

/// A working-set aggregation for people: a summary line, then each
/// region (IPA range, size, how often sampled accessed, how long idle)
/// with a bar of its frequency, columns sized to the rows.
pub fn workingset_table(a: &faultline_proto::v1::WorkingSetAggregation) -> String {
    let monitored: u64 = a.regions.iter().map(|r| r.end - r.start).sum();
    let mut out = format!(
        "vm{}: {} regions over {}, aggregation #{} ({} samples in {} ms); working set {} (accessed within {} ms), \
         resident {}; monitor CPU {:.2} s; refaults {}, cold-evicted {}\n",
        a.vm_id,
        a.regions.len(),
        human_bytes(monitored),
        a.index,
        a.samples_per_aggregation,
        a.aggregate_ms,
        human_bytes(a.working_set_bytes),
        a.working_set_window_ms,
        human_bytes(a.resident_bytes),
        a.monitor_cpu_ns as f64 / 1e9,
        a.refaults,
        a.cold_evicted,
    );
    let max = a.samples_per_aggregation.max(1);
    let rows: Vec<[String; 6]> = a
        .regions
        .iter()
        .map(|r| {
            let bar = "#".repeat((r.frequency.min(max) * 10).div_ceil(max) as usize);
            let idle = match r.idle_ms {
                ms if ms >= 10_000 => format!("{} s", ms / 1000),
                ms => format!("{ms} ms"),
            };
            [
                format!("{:#x}", r.start),
                format!("{:#x}", r.end),
                human_bytes(r.end - r.start),
                format!("{}/{max}", r.frequency),
                idle,
                bar,
            ]
        })
        .collect();
    const HEAD: [(&str, bool); 6] =
        [("START", true), ("END", true), ("SIZE", true), ("FREQ", true), ("IDLE", true), ("", false)];
    let mut widths = HEAD.map(|(h, _)| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    push_aligned(&mut out, HEAD.map(|(h, _)| h), &HEAD, &widths);
    for row in &rows {
        push_aligned(&mut out, row.iter().map(String::as_str), &HEAD, &widths);
    }
    out.truncate(out.trim_end().len());
    out
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
    fn percentiles_are_nearest_rank_in_us() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!((percentile_us(&ns, 50), percentile_us(&ns, 99), percentile_us(&ns, 100)), (51.0, 100.0, 100.0));
        assert_eq!(percentile_us(&[], 99), 0.0);
        assert_eq!((outcome_name(5), outcome_name(99)), ("mmio-exit".to_string(), "99".to_string()));
    }

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
        let utc = jiff::tz::TimeZone::UTC;
        assert_eq!(compact(&e, &utc), "- vm1/vcpu2 #7 write ipa=0x40001000 translation L3 -> mapped 4k rw- 1.5us");
        assert_eq!(json(&e)["outcome"], "mapped");
        let time = std::time::UNIX_EPOCH + std::time::Duration::new(1_796_000_000, 123_456_789);
        let e = FaultEvent { time: Some(time.into()), ..e };
        // 00:53:20 UTC is 06:23:20 at +05:30.
        let india = jiff::tz::TimeZone::fixed(jiff::tz::Offset::from_seconds(5 * 3600 + 1800).unwrap());
        assert!(compact(&e, &india).starts_with("Nov 30 06:23:20.123456 vm1/vcpu2 #7"), "{}", compact(&e, &india));
    }

    #[test]
    fn table_columns_fit_the_widest_cell_and_only_grow() {
        let e = |fault_id: u64, ipa: u64, latency_ns: u64| FaultEvent {
            fault_id,
            vm_id: 1,
            ipa,
            access: Access::Read as i32,
            kind: FaultKind::Translation as i32,
            outcome: Outcome::Mapped as i32,
            mapping_size: MappingSize::MappingSize4k as i32,
            permissions: 1,
            latency_ns,
            ..Default::default()
        };
        let mut t = Table::new(jiff::tz::TimeZone::UTC);
        assert_eq!(t.flush(), "", "no rows, no header");
        t.push(&e(1, 0x1000, 900));
        t.push(&e(22, 0x4000_0000, 1_234_500));
        let first = t.flush();
        let lines: Vec<&str> = first.lines().collect();
        assert_eq!(lines[0], "TIME  VM  VCPU  FAULT         IPA  ACCESS  KIND         OUTCOME  SIZE  PERM   LATENCY");
        assert_eq!(lines[1], "-      1     0      1      0x1000  read    translation  mapped   4k    r--      0.9us");
        assert_eq!(lines[2], "-      1     0     22  0x40000000  read    translation  mapped   4k    r--   1234.5us");
        // A later batch keeps the widths and adds no header.
        t.push(&e(3, 0x2000, 100));
        assert_eq!(
            t.flush(),
            "-      1     0      3      0x2000  read    translation  mapped   4k    r--      0.1us\n"
        );
    }

    #[test]
    fn jsonpb_is_the_canonical_mapping_and_decodes_back() {
        let time = std::time::UNIX_EPOCH + std::time::Duration::new(1_796_000_000, 123_456_789);
        let e = FaultEvent {
            time: Some(time.into()),
            fault_id: 1 << 40,
            vm_id: 3,
            outcome: Outcome::MmioExit as i32,
            memslot: Some(0),
            ..Default::default()
        };
        let text = jsonpb("faultline.v1.FaultEvent", &e).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["faultId"], "1099511627776", "64-bit integers are strings: {text}");
        assert_eq!(v["outcome"], "OUTCOME_MMIO_EXIT");
        assert_eq!(v["time"], "2026-11-30T00:53:20.123456789Z");
        assert_eq!(v["memslot"], 0, "an optional field set to its default is kept: {text}");
        assert!(v.get("ipa").is_none(), "zero scalars are left out: {text}");
        let pool = prost_reflect::DescriptorPool::decode(faultline_proto::FILE_DESCRIPTOR_SET).unwrap();
        let desc = pool.get_message_by_name("faultline.v1.FaultEvent").unwrap();
        let mut de = serde_json::Deserializer::from_str(&text);
        let back = prost_reflect::DynamicMessage::deserialize(desc, &mut de).unwrap();
        assert_eq!(back.transcode_to::<FaultEvent>().unwrap(), e);
        assert!(jsonpb("faultline.v1.NoSuchThing", &e).is_err());
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

/// Pages of a dirty or access bitmap (64-bit little-endian words, as the
/// daemon sends it) as `[first GPA, end GPA)` ranges.
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
