//! Observe's filters on the command line, one flag per `FaultFilter` field,
//! with Hubble's semantics: values of one flag OR, different flags AND, and
//! a flag right after `--not` goes to the denylist instead.

use faultline_proto::v1::{Access, FaultFilter, FaultKind, IpaRange, MappingSize, Outcome};

use crate::{name, ShortName};

/// A filter flag's value that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Not one of the names the flag takes.
    #[error("unknown {what} {value:?} (one of: {names})")]
    UnknownName {
        /// Which flag.
        what: &'static str,
        /// What was given.
        value: String,
        /// What it takes.
        names: String,
    },
    /// Not `START-END` or `START/LEN`, or an empty range.
    #[error("IPA range {0:?}: START-END or START/LEN (0x hex or decimal; LEN may end in K, M or G), END above START")]
    IpaRange(String),
    /// Not a duration.
    #[error("latency {0:?}: a duration such as 100us, 2ms or 1s")]
    Latency(String),
}

/// Every value of `T` (from 1, skipping UNSPECIFIED) with its short name.
fn names<T: ShortName + Into<i32> + Copy>() -> impl Iterator<Item = (i32, String)> {
    (1..).map_while(|v| T::try_from(v).ok()).map(|t| (t.into(), name::<T>(t.into())))
}

fn value_of<T: ShortName + Into<i32> + Copy>(what: &'static str, value: &str) -> Result<i32, FilterError> {
    let wanted = value.to_lowercase().replace('_', "-");
    names::<T>().find(|(_, n)| *n == wanted).map(|(v, _)| v).ok_or_else(|| FilterError::UnknownName {
        what,
        value: value.to_string(),
        names: names::<T>().map(|(_, n)| n).collect::<Vec<_>>().join(", "),
    })
}

/// An outcome by its short name (`mapped`, `mmio-exit`, ...).
pub fn outcome(value: &str) -> Result<i32, FilterError> {
    value_of::<Outcome>("outcome", value)
}

/// A fault kind by its short name (`translation`, `permission`, ...).
pub fn kind(value: &str) -> Result<i32, FilterError> {
    value_of::<FaultKind>("kind", value)
}

/// An access by its short name (`read`, `write`, `execute`).
pub fn access(value: &str) -> Result<i32, FilterError> {
    value_of::<Access>("access", value)
}

/// A mapping size by its short name (`4k`, `2m`, `1g`).
pub fn size(value: &str) -> Result<i32, FilterError> {
    value_of::<MappingSize>("size", value)
}

fn number(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 1 << 10),
        (i, 'm' | 'M') => (&text[..i], 1 << 20),
        (i, 'g' | 'G') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    let n = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok()?,
        None => digits.replace('_', "").parse().ok()?,
    };
    n.checked_mul(unit)
}

/// An IPA range: `START-END` (END exclusive) or `START/LEN`.
pub fn ipa_range(value: &str) -> Result<IpaRange, FilterError> {
    let bad = || FilterError::IpaRange(value.to_string());
    let (start, end) = if let Some((start, end)) = value.split_once('-') {
        (number(start).ok_or_else(bad)?, number(end).ok_or_else(bad)?)
    } else if let Some((start, len)) = value.split_once('/') {
        let start = number(start).ok_or_else(bad)?;
        (start, start.checked_add(number(len).ok_or_else(bad)?).ok_or_else(bad)?)
    } else {
        return Err(bad());
    };
    if end <= start {
        return Err(bad());
    }
    Ok(IpaRange { start, end })
}

/// A latency (humantime: `100us`, `2ms`, `1s`), in ns.
pub fn latency(value: &str) -> Result<u64, FilterError> {
    let d = humantime::parse_duration(value).map_err(|_| FilterError::Latency(value.to_string()))?;
    u64::try_from(d.as_nanos()).map_err(|_| FilterError::Latency(value.to_string()))
}

/// One filter flag's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Flag {
    /// `--vm`.
    Vm(u32),
    /// `--vcpu`.
    Vcpu(u32),
    /// `--memslot`.
    Memslot(u32),
    /// `--ipa`.
    Ipa(IpaRange),
    /// `--kind`.
    Kind(i32),
    /// `--access`.
    Access(i32),
    /// `--outcome`.
    Outcome(i32),
    /// `--size`.
    Size(i32),
    /// `--min-latency`, ns.
    MinLatency(u64),
}

impl Flag {
    fn add_to(self, f: &mut FaultFilter) {
        match self {
            Self::Vm(v) => f.vm_id.push(v),
            Self::Vcpu(v) => f.vcpu.push(v),
            Self::Memslot(v) => f.memslot.push(v),
            Self::Ipa(r) => f.ipa_range.push(r),
            Self::Kind(v) => f.kind.push(v),
            Self::Access(v) => f.access.push(v),
            Self::Outcome(v) => f.outcome.push(v),
            Self::Size(v) => f.mapping_size.push(v),
            // Two minimums: the larger.
            Self::MinLatency(ns) => f.min_latency_ns = f.min_latency_ns.max(ns),
        }
    }
}

/// The allowlist and denylist for `flags`, each with whether `--not` came
/// right before it: one filter of the kept flags, one of the negated (an
/// event is left out if it matches every negated flag kind), none for an
/// empty side.
pub fn lists(flags: impl IntoIterator<Item = (Flag, bool)>) -> (Vec<FaultFilter>, Vec<FaultFilter>) {
    let (mut allow, mut deny) = (FaultFilter::default(), FaultFilter::default());
    for (flag, negated) in flags {
        flag.add_to(if negated { &mut deny } else { &mut allow });
    }
    let keep = |f: FaultFilter| if f == FaultFilter::default() { vec![] } else { vec![f] };
    (keep(allow), keep(deny))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_list_the_choices() {
        assert_eq!(outcome("mmio-exit"), Ok(Outcome::MmioExit as i32));
        assert_eq!(outcome("MMIO_EXIT"), Ok(Outcome::MmioExit as i32));
        assert_eq!(kind("access-flag"), Ok(FaultKind::AccessFlag as i32));
        assert_eq!(access("write"), Ok(Access::Write as i32));
        assert_eq!(size("2m"), Ok(MappingSize::MappingSize2m as i32));
        let e = size("3m").unwrap_err().to_string();
        assert_eq!(e, "unknown size \"3m\" (one of: 4k, 2m, 1g)");
        assert!(outcome("unspecified").is_err(), "the proto default is not a choice");
    }

    #[test]
    fn ipa_ranges_and_latencies_parse() {
        let r = |start, end| Ok(IpaRange { start, end });
        assert_eq!(ipa_range("0x40000000-0x40200000"), r(0x4000_0000, 0x4020_0000));
        assert_eq!(ipa_range("0x40000000/2M"), r(0x4000_0000, 0x4020_0000));
        assert_eq!(ipa_range("4096/4096"), r(4096, 8192));
        for bad in ["0x1000", "0x2000-0x1000", "0x1000/0", "x-y", "0x1000/16Q", "1/0xffffffffffffffff"] {
            assert!(ipa_range(bad).is_err(), "{bad}");
        }
        assert_eq!(latency("100us"), Ok(100_000));
        assert_eq!(latency("2ms"), Ok(2_000_000));
        assert!(latency("fast").is_err());
    }

    #[test]
    fn flags_of_one_kind_or_kinds_and_and_not_moves_one_flag_to_the_denylist() {
        let (allow, deny) = lists([
            (Flag::Vm(1), false),
            (Flag::Vm(2), false),
            (Flag::Access(2), false),
            (Flag::Outcome(5), true),
            (Flag::MinLatency(1000), true),
        ]);
        let want_allow = FaultFilter { vm_id: vec![1, 2], access: vec![2], ..Default::default() };
        let want_deny = FaultFilter { outcome: vec![5], min_latency_ns: 1000, ..Default::default() };
        assert_eq!((allow, deny), (vec![want_allow], vec![want_deny]));
        assert_eq!(lists([]), (vec![], vec![]));
    }
}
