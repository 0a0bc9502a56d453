//! `faultline workingset`, `faultline heatmap` and `faultline monitor`:
//! what the working-set monitor sees of a VM, drawn or not, and its
//! settings.

use std::path::PathBuf;

use anyhow::Context;
use faultline::heatmap::Heatmap;
use faultline::{from_jsonpb, jsonpb, workingset_table, ReportFormat};
use faultline_proto::v1::policy_control_client::PolicyControlClient;
use faultline_proto::v1::working_set_client::WorkingSetClient;
use faultline_proto::v1::{
    GetWorkingSetMonitorRequest, GetWorkingSetRequest, WorkingSetAggregation, WorkingSetMonitorSettings,
};
use tonic::transport::Channel;

use crate::out::outln;
use crate::refused;

/// `faultline workingset`'s arguments.
#[derive(clap::Args, Debug)]
pub struct WorkingSetArgs {
    /// VM id.
    vm: u32,
    /// Print each new aggregation as the monitor takes it, until Ctrl-C.
    #[arg(long, short)]
    follow: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = ReportFormat::Text)]
    output: ReportFormat,
}

/// Prints the VM's latest aggregation, or follows them.
pub async fn show(args: WorkingSetArgs, channel: Channel) -> anyhow::Result<()> {
    let mut client = WorkingSetClient::new(channel);
    let request = GetWorkingSetRequest { vm_id: args.vm };
    let print = |a: &faultline_proto::v1::WorkingSetAggregation| -> anyhow::Result<()> {
        match args.output {
            ReportFormat::Json => outln!("{}", jsonpb("faultline.v1.WorkingSetAggregation", a)?),
            ReportFormat::Text => outln!("{}", workingset_table(a)),
        }
        Ok(())
    };
    if !args.follow {
        let seen = client.get_working_set(request).await.map_err(refused)?.into_inner();
        return print(&seen);
    }
    let mut stream = client.watch_working_set(request).await.map_err(refused)?.into_inner();
    loop {
        tokio::select! {
            next = stream.message() => match next.map_err(refused)? {
                Some(seen) => print(&seen)?,
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `faultline heatmap`'s arguments.
#[derive(clap::Args, Debug)]
pub struct HeatmapArgs {
    /// VM id: follow its aggregations live.
    #[arg(required_unless_present = "from", conflicts_with = "from")]
    vm: Option<u32>,
    /// Draw a recorded stream instead: the lines
    /// `faultline workingset VM --follow -o json` printed.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// Live: aggregations to draw (one column each).
    #[arg(long, default_value_t = 50)]
    aggregations: usize,
    /// The image: PNG, or SVG if the name ends in .svg.
    #[arg(long, short)]
    out: PathBuf,
    /// The IPA range drawn, START-END (hex or decimal); default: the
    /// largest contiguous monitored range (the RAM memslot, usually).
    #[arg(long, value_parser = parse_range)]
    ipa: Option<(u64, u64)>,
    /// Rows (slices of the IPA range).
    #[arg(long, default_value_t = 128)]
    rows: usize,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let num = |v: &str| match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    let (a, b) = s.split_once('-').ok_or("expected START-END")?;
    Ok((num(a).map_err(|e| format!("{a}: {e}"))?, num(b).map_err(|e| format!("{b}: {e}"))?))
}

/// Draws the heatmap of a live VM or a recorded stream.
pub async fn heatmap(
    args: HeatmapArgs,
    channel: impl std::future::Future<Output = anyhow::Result<Channel>>,
) -> anyhow::Result<()> {
    let seen: Vec<WorkingSetAggregation> = match (&args.from, args.vm) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .enumerate()
                .map(|(i, l)| {
                    from_jsonpb("faultline.v1.WorkingSetAggregation", l)
                        .with_context(|| format!("{} line {}: not a working-set aggregation", path.display(), i + 1))
                })
                .collect::<anyhow::Result<_>>()?
        }
        (None, Some(vm)) => {
            let mut client = WorkingSetClient::new(channel.await?);
            let mut stream =
                client.watch_working_set(GetWorkingSetRequest { vm_id: vm }).await.map_err(refused)?.into_inner();
            let mut seen = Vec::with_capacity(args.aggregations);
            while seen.len() < args.aggregations {
                tokio::select! {
                    next = stream.message() => match next.map_err(refused)? {
                        Some(a) => seen.push(a),
                        None => break,
                    },
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            seen
        }
        (None, None) => unreachable!("clap requires a VM or --from"),
    };
    let map = Heatmap::new(&seen, args.ipa, args.rows)?;
    let svg = args.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    let bytes = if svg { map.to_svg().into_bytes() } else { map.to_png() };
    std::fs::write(&args.out, bytes).with_context(|| format!("writing {}", args.out.display()))?;
    let (w, h) = map.plot_size();
    outln!(
        "{}: {} aggregations over {:.1} s, IPA {:#x}-{:#x} in {} rows, brightest = accessed in {:.0}% of samples; \
         plot {w}x{h} at ({}, {})",
        args.out.display(),
        seen.len(),
        map.times_s.last().copied().unwrap_or(0.0),
        map.ipa.0,
        map.ipa.1,
        map.cells.len(),
        map.peak * 100.0,
        faultline::heatmap::LEFT,
        faultline::heatmap::TOP
    );
    Ok(())
}

/// `faultline monitor`'s arguments: what to change (nothing: print).
#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    /// Monitor every VM.
    #[arg(long)]
    enable: bool,
    /// Monitor only VMs whose policy names the working set.
    #[arg(long, conflicts_with = "enable")]
    disable: bool,
    /// Between two samples of a region (us, at least 100).
    #[arg(long)]
    sample_us: Option<u64>,
    /// Between two aggregations (ms).
    #[arg(long)]
    aggregate_ms: Option<u64>,
    /// Fewest regions per VM.
    #[arg(long)]
    min_regions: Option<u32>,
    /// Most regions per VM.
    #[arg(long)]
    max_regions: Option<u32>,
    /// A region accessed within this long is in the working set (ms).
    #[arg(long)]
    window_ms: Option<u64>,
    /// Most CPU a VM's monitor may take per GiB monitored, in basis points
    /// of a core (50: 0.5%); over it the intervals stretch. 0: no bound.
    #[arg(long)]
    cpu_budget_per_gib_bp: Option<u32>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = ReportFormat::Text)]
    output: ReportFormat,
}

impl MonitorArgs {
    fn changes(&self) -> bool {
        self.enable
            || self.disable
            || self.sample_us.is_some()
            || self.aggregate_ms.is_some()
            || self.min_regions.is_some()
            || self.max_regions.is_some()
            || self.window_ms.is_some()
            || self.cpu_budget_per_gib_bp.is_some()
    }
}

/// Prints the monitor's settings, changing them first if asked.
pub async fn monitor(args: MonitorArgs, channel: Channel) -> anyhow::Result<()> {
    let mut client = PolicyControlClient::new(channel);
    let mut s = client.get_working_set_monitor(GetWorkingSetMonitorRequest {}).await.map_err(refused)?.into_inner();
    if args.changes() {
        s = WorkingSetMonitorSettings {
            enabled: (s.enabled || args.enable) && !args.disable,
            sample_us: args.sample_us.unwrap_or(s.sample_us),
            aggregate_ms: args.aggregate_ms.unwrap_or(s.aggregate_ms),
            min_regions: args.min_regions.unwrap_or(s.min_regions),
            max_regions: args.max_regions.unwrap_or(s.max_regions),
            working_set_window_ms: args.window_ms.unwrap_or(s.working_set_window_ms),
            cpu_budget_per_gib_bp: args.cpu_budget_per_gib_bp.unwrap_or(s.cpu_budget_per_gib_bp),
        };
        s = client.set_working_set_monitor(s).await.map_err(refused)?.into_inner();
    }
    match args.output {
        ReportFormat::Json => outln!("{}", jsonpb("faultline.v1.WorkingSetMonitorSettings", &s)?),
        ReportFormat::Text => {
            let scope = if s.enabled { "every VM" } else { "VMs whose policy names the working set" };
            outln!("monitoring:  {scope}");
            outln!("sampling:    every {} us; aggregating every {} ms", s.sample_us, s.aggregate_ms);
            outln!("regions:     {} to {} per VM", s.min_regions, s.max_regions);
            outln!("working set: accessed within {} ms", s.working_set_window_ms);
            match s.cpu_budget_per_gib_bp {
                0 => outln!("cpu budget:  none (the intervals as set)"),
                bp => outln!(
                    "cpu budget:  {:.2}% of a core per GiB monitored (a VM over it is sampled less often)",
                    f64::from(bp) / 100.0
                ),
            }
        }
    }
    Ok(())
}
