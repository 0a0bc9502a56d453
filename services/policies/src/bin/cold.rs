//! `policy-cold`: proactive reclaim. Memory the daemon's working-set
//! monitor has seen idle for `--idle-ms` is reclaimed through the swap
//! store even under budget (a cold-reclaim rule per VM), and the idle
//! threshold backs off while reclaiming costs the guest more than its
//! bounds allow: refaults over a fraction of the working set per minute,
//! or stall on refaults over a share of vCPU time
//! (`faultline_policies::cold`). First-touch faults are not reclaim's
//! cost and do not count, as PSI does not count them.
//! It reads what it steers by from the daemon's API (`--daemon`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use faultline_policies::cold::{ColdBounds, ColdController, Interval, Step};
use faultline_policies::{description, serve, Common, PolicyServer};
use faultline_proto::client::{Address, ClientTls};
use faultline_proto::v1 as pb;
use faultline_proto::v1::control_client::ControlClient;
use tracing::{info, warn};

#[derive(Parser)]
#[command(about = "Faultline memory policy: proactive reclaim of idle memory, backing off on refaults and stall")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// The daemon's gRPC API (unix:PATH, http://HOST:PORT), where each
    /// VM's working set, refaults and fault stall are read.
    #[arg(long)]
    daemon: Address,
    /// A VM to reclaim for (repeat); none: every attached VM.
    #[arg(long = "vm")]
    vms: Vec<u32>,
    /// Memory idle this long is reclaimed (ms). Google's far memory calls
    /// a page cold after 120 s.
    #[arg(long, default_value_t = 120_000)]
    idle_ms: u64,
    /// The longest idle time backing off may reach (ms).
    #[arg(long, default_value_t = 1_200_000)]
    max_idle_ms: u64,
    /// Refaulted bytes per minute, at most this fraction of the working set.
    #[arg(long, default_value_t = 0.002)]
    refault_fraction: f64,
    /// Fault stall, at most this fraction of vCPU time.
    #[arg(long, default_value_t = 0.03)]
    stall_fraction: f64,
    /// How often the bounds are checked (ms).
    #[arg(long, default_value_t = 1_000)]
    interval_ms: u64,
}

/// What the last interval ended with, per VM.
struct Seen {
    at: Instant,
    refault_bytes: u64,
    stall_ns: u64,
    controller: ColdController,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    faultline_exit_status::exit_status(env!("CARGO_BIN_NAME"), run().await)
}

async fn run() -> anyhow::Result<()> {
    faultline_policies::init_logging();
    let args = Args::parse();
    let bounds = ColdBounds {
        min_idle: Duration::from_millis(args.idle_ms),
        max_idle: Duration::from_millis(args.max_idle_ms.max(args.idle_ms)),
        refault_fraction_per_min: args.refault_fraction,
        stall_fraction: args.stall_fraction,
    };
    let decisions = args.common.decisions(&[pb::Decision::ColdReclaim]);
    let first = |vm_id| pb::ColdReclaim { vm_id, min_idle_ms: args.idle_ms };
    let server =
        PolicyServer::new(description("cold", &decisions), vec![], args.common.budget.clone(), None, Duration::ZERO);
    server.publish_set(pb::RuleSet {
        budgets: args.common.budget.clone(),
        cold_reclaims: args.vms.iter().map(|&v| first(v)).collect(),
        ..Default::default()
    });
    let common = args.common.clone();
    let steering = tokio::spawn(steer(server.clone(), bounds, args));
    let served = serve(server, &common).await;
    steering.abort();
    served
}

/// Every interval: reads each VM's refaults, stall and working set, moves
/// its threshold, and publishes the rule set when a threshold changed.
async fn steer(server: PolicyServer, bounds: ColdBounds, args: Args) {
    let (daemon, only) = (&args.daemon, &args.vms);
    let mut seen: BTreeMap<u32, Seen> = BTreeMap::new();
    let mut client: Option<ControlClient<tonic::transport::Channel>> = None;
    let mut published: BTreeMap<u32, Duration> = only.iter().map(|&v| (v, bounds.min_idle)).collect();
    let mut failing = false;
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms.max(10)));
    loop {
        tick.tick().await;
        if client.is_none() {
            client = faultline_proto::client::connect(daemon, &ClientTls::default()).await.ok().map(ControlClient::new);
        }
        let Some(c) = client.as_mut() else { continue };
        let vms = match c.list_vms(pb::ListVmsRequest {}).await {
            Ok(r) => {
                failing = false;
                r.into_inner().vms
            }
            Err(e) => {
                if !failing {
                    warn!(daemon = %daemon, cause = %e.message(), "reading the daemon's VMs failed; retrying");
                }
                (failing, client) = (true, None);
                continue;
            }
        };
        let now = Instant::now();
        let mut thresholds = BTreeMap::new();
        for vm in vms.iter().filter(|v| only.is_empty() || only.contains(&v.vm_id)) {
            let s = seen.entry(vm.vm_id).or_insert_with(|| Seen {
                at: now,
                refault_bytes: vm.refault_bytes,
                stall_ns: vm.refault_stall_ns,
                controller: ColdController::new(bounds),
            });
            let interval = Interval {
                elapsed: now - s.at,
                refault_bytes: vm.refault_bytes.saturating_sub(s.refault_bytes),
                working_set: vm.working_set_bytes,
                stall: Duration::from_nanos(vm.refault_stall_ns.saturating_sub(s.stall_ns)),
                vcpus: vm.vcpus,
            };
            if !interval.elapsed.is_zero() {
                let (refaults, stall) = s.controller.pressure(&interval);
                let step = s.controller.update(&interval);
                if step != Step::Held {
                    info!(
                        vm = vm.vm_id,
                        ?step,
                        threshold_ms = s.controller.threshold().as_millis() as u64,
                        refaults_of_bound = refaults,
                        stall_of_bound = stall,
                        "idle threshold moved"
                    );
                }
            }
            (s.at, s.refault_bytes, s.stall_ns) = (now, vm.refault_bytes, vm.refault_stall_ns);
            thresholds.insert(vm.vm_id, s.controller.threshold());
        }
        seen.retain(|id, _| thresholds.contains_key(id));
        if thresholds != published {
            let cold_reclaims = thresholds
                .iter()
                .map(|(&vm_id, t)| pb::ColdReclaim { vm_id, min_idle_ms: t.as_millis() as u64 })
                .collect();
            let generation = server.publish_set(pb::RuleSet {
                budgets: args.common.budget.clone(),
                cold_reclaims,
                ..Default::default()
            });
            info!(generation, ?thresholds, "cold reclaim rules published");
            published = thresholds;
        }
    }
}
