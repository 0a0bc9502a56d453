//! `faultline workingset` and `faultline monitor`: what the working-set
//! monitor sees of a VM, and its settings.

use faultline::{jsonpb, workingset_table, ReportFormat};
use faultline_proto::v1::policy_control_client::PolicyControlClient;
use faultline_proto::v1::working_set_client::WorkingSetClient;
use faultline_proto::v1::{GetWorkingSetMonitorRequest, GetWorkingSetRequest, WorkingSetMonitorSettings};
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
        }
    }
    Ok(())
}
