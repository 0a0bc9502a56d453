//! `faultline observe`: which events (buffer, follow, time window, filters)
//! and how they print.

use clap::ArgMatches;
use faultline::filter::{self, Flag};
use faultline::{compact, json, jsonpb, parse_time, Format, Table};
use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::observe_response::ResponseTypes;
use faultline_proto::v1::{IpaRange, ObserveRequest};
use tonic::transport::Channel;

use crate::out::{out, outln};
use crate::refused;

/// `faultline observe`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ObserveArgs {
    /// The last N events from the buffer.
    #[arg(long, conflicts_with_all = ["first", "all"])]
    last: Option<u64>,
    /// The first N events in the buffer.
    #[arg(long, conflicts_with_all = ["all", "follow"])]
    first: Option<u64>,
    /// Everything in the buffer.
    #[arg(long)]
    all: bool,
    /// Keep streaming new events.
    #[arg(long, short)]
    follow: bool,
    /// Only events at or after this time: RFC 3339 or a duration ago (5m).
    #[arg(long)]
    since: Option<String>,
    /// Only events at or before this time: RFC 3339 or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// Only these VMs.
    #[arg(long, help_heading = FILTERS)]
    vm: Vec<u32>,
    /// Only these vCPUs.
    #[arg(long, help_heading = FILTERS)]
    vcpu: Vec<u32>,
    /// Only these memslots.
    #[arg(long, help_heading = FILTERS)]
    memslot: Vec<u32>,
    /// Only these IPAs: START-END (END exclusive) or START/LEN, e.g.
    /// 0x40000000/2M.
    #[arg(long, value_parser = filter::ipa_range, help_heading = FILTERS)]
    ipa: Vec<IpaRange>,
    /// Only these fault kinds: translation, access-flag, permission,
    /// address-size, external, other.
    #[arg(long, value_parser = filter::kind, help_heading = FILTERS)]
    kind: Vec<i32>,
    /// Only these accesses: read, write, execute.
    #[arg(long, value_parser = filter::access, help_heading = FILTERS)]
    access: Vec<i32>,
    /// Only these outcomes: mapped, relaxed, already-present,
    /// retried-stale, mmio-exit, no-syndrome-exit, injected-abort, rejected,
    /// refused-host-pressure.
    #[arg(long, value_parser = filter::outcome, help_heading = FILTERS)]
    outcome: Vec<i32>,
    /// Only these mapping sizes: 4k, 2m, 1g.
    #[arg(long, value_parser = filter::size, help_heading = FILTERS)]
    size: Vec<i32>,
    /// Only events at least this slow, end to end: 100us, 2ms, ...
    #[arg(long, value_parser = filter::latency, help_heading = FILTERS)]
    min_latency: Vec<u64>,
    /// Leave out the events the next filter flag names, instead of keeping
    /// only them (Hubble's --not: `--not --outcome mapped`). Values of one
    /// flag OR; different flags AND, kept and left out alike.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true", help_heading = FILTERS)]
    not: Vec<bool>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Compact)]
    output: Format,
}

const FILTERS: &str = "Filters";

/// The filter flags, by argument id.
const FILTER_IDS: [&str; 9] = ["vm", "vcpu", "memslot", "ipa", "kind", "access", "outcome", "size", "min_latency"];

/// For each filter flag's values, in order of [`FILTER_IDS`] then of the
/// command line, whether `--not` came right before the flag.
pub fn negations(m: &ArgMatches) -> anyhow::Result<Vec<Vec<bool>>> {
    // One index per --not (a flag that takes no value, appended each time).
    let nots: Vec<usize> = m.indices_of("not").map(Iterator::collect).unwrap_or_default();
    // A value's index is its flag's plus one (`--kind x` and `--kind=x`
    // alike), so a --not right before the flag is two before the value.
    let negated: Vec<Vec<bool>> = FILTER_IDS
        .iter()
        .map(|id| {
            let values = m.indices_of(id).into_iter().flatten();
            values.map(|i| i.checked_sub(2).is_some_and(|n| nots.contains(&n))).collect()
        })
        .collect();
    let used = negated.iter().flatten().filter(|&&n| n).count();
    if used != nots.len() {
        anyhow::bail!("--not must come right before a filter flag (--not --outcome mapped)");
    }
    Ok(negated)
}

impl ObserveArgs {
    /// Every filter flag given, with whether it was negated.
    fn flags(&self, negated: &[Vec<bool>]) -> Vec<(Flag, bool)> {
        let values: [Vec<Flag>; 9] = [
            self.vm.iter().map(|&v| Flag::Vm(v)).collect(),
            self.vcpu.iter().map(|&v| Flag::Vcpu(v)).collect(),
            self.memslot.iter().map(|&v| Flag::Memslot(v)).collect(),
            self.ipa.iter().map(|&r| Flag::Ipa(r)).collect(),
            self.kind.iter().map(|&v| Flag::Kind(v)).collect(),
            self.access.iter().map(|&v| Flag::Access(v)).collect(),
            self.outcome.iter().map(|&v| Flag::Outcome(v)).collect(),
            self.size.iter().map(|&v| Flag::Size(v)).collect(),
            self.min_latency.iter().map(|&v| Flag::MinLatency(v)).collect(),
        ];
        values.into_iter().zip(negated).flat_map(|(vs, ns)| vs.into_iter().zip(ns.iter().copied())).collect()
    }
}

/// How a run of `observe` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The stream ended: the buffer was read, or the daemon went away.
    StreamDone,
    /// Ctrl-C (SIGINT): the rows held were printed and the stream dropped;
    /// the command exits 130, as a process ended by SIGINT reads to a shell.
    Interrupted,
}

/// Runs `observe` with `args` (`negated`: [`negations`]) over `channel`.
pub async fn run(args: ObserveArgs, negated: &[Vec<bool>], channel: Channel) -> anyhow::Result<Ended> {
    let now = std::time::SystemTime::now();
    let stamp = |v: &Option<String>| -> anyhow::Result<Option<prost_types::Timestamp>> {
        v.as_ref().map(|v| parse_time(v, now).map(prost_types::Timestamp::from)).transpose().map_err(Into::into)
    };
    let (since, until) = (stamp(&args.since)?, stamp(&args.until)?);
    let (allowlist, denylist) = filter::lists(args.flags(negated));
    let (number, first) = match (args.last, args.first, args.all, args.follow) {
        (Some(n), _, _, _) => (n, false),
        (_, Some(n), _, _) => (n, true),
        (_, _, true, _) | (_, _, false, true) => (0, false),
        _ => (20, false),
    };
    // A time window alone means everything in it.
    let windowed = (since.is_some() || until.is_some()) && args.last.is_none() && args.first.is_none();
    let number = if windowed { 0 } else { number };
    let req =
        ObserveRequest { number, first, follow: args.follow, since, until, allowlist, denylist, ..Default::default() };
    let mut client = FaultTraceClient::new(channel);
    let mut stream = client.observe(req).await.map_err(refused)?.into_inner();
    let tz = jiff::tz::TimeZone::system();
    let mut table = Table::new(tz.clone());
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    // A closed stdout returns from here, which drops the stream.
    let ended = loop {
        // A table is laid out per batch: what arrived together, sized to
        // fit, once the stream pauses (or after 1000 rows when it does not).
        let pause = match (args.output, table.pending()) {
            (Format::Table, 1000..) => std::time::Duration::ZERO,
            (Format::Table, 1..) => std::time::Duration::from_millis(100),
            _ => std::time::Duration::MAX,
        };
        let next = tokio::select! {
            next = stream.message() => next,
            _ = tokio::time::sleep(pause), if pause != std::time::Duration::MAX => {
                out!("{}", table.flush());
                continue;
            }
            _ = &mut interrupt => break Ended::Interrupted,
        };
        let Some(r) = next.map_err(refused)? else { break Ended::StreamDone };
        match r.response_types {
            Some(ResponseTypes::Fault(e)) => match args.output {
                Format::Compact => outln!("{}", compact(&e, &tz)),
                Format::Json => outln!("{}", json(&e)),
                Format::Jsonpb => outln!("{}", jsonpb("faultline.v1.FaultEvent", &e)?),
                Format::Table => table.push(&e),
            },
            Some(ResponseTypes::LostEvents(l)) => eprintln!("lost {} events", l.num_events_lost),
            Some(ResponseTypes::PolicyExit(x)) => eprintln!("{}", faultline::policy_exit(&x)),
            None => {}
        }
    };
    out!("{}", table.flush());
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        Observe(ObserveArgs),
    }

    fn negated(args: &[&str]) -> anyhow::Result<Vec<Vec<bool>>> {
        let m = Cli::command().try_get_matches_from([&["faultline", "observe"], args].concat())?;
        let _ = Cli::from_arg_matches(&m)?;
        negations(m.subcommand_matches("observe").unwrap())
    }

    #[test]
    fn not_negates_the_flag_right_after_it_only() {
        let n = negated(&["--not", "--ipa", "0x1000-0x2000", "--vm", "1", "--not", "--ipa=0x3000/4K", "--vm", "2"])
            .unwrap();
        assert_eq!(n[0], [false, false], "--vm");
        assert_eq!(n[3], [true, true], "--ipa");
        assert!(n.iter().enumerate().all(|(i, v)| i == 0 || i == 3 || v.is_empty()));
        assert!(negated(&["--vm", "1"]).unwrap().iter().flatten().all(|n| !n));
        assert!(negated(&["--vm", "1", "--not"]).is_err());
        assert!(negated(&["--not", "--all"]).is_err());
    }
}
