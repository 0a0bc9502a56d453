//! `policy-adaptive`: 4 KiB mappings whose fault-around window follows the
//! workload. It follows the daemon's FaultTrace and, per VM, measures how
//! many recent faults continue a forward stream (the next fault lands just
//! past what the last one mapped): a streaming VM gets a wider window, a
//! random one none. Every change is a new rule set.

use std::collections::HashMap;

use clap::Parser;
use faultline_policies::{description, everywhere, serve, Common, PolicyServer};
use faultline_proto::v1 as pb;
use faultline_proto::v1::fault_trace_client::FaultTraceClient;

#[derive(Parser)]
#[command(about = "Faultline memory policy: fault-around that adapts to the fault stream")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// The daemon's gRPC address (FaultTrace).
    #[arg(long, default_value = "http://127.0.0.1:50151")]
    daemon: String,
    /// Faults per decision.
    #[arg(long, default_value_t = 64)]
    sample: usize,
}

/// Largest window it widens to.
const MAX_WINDOW: u32 = 64;

/// One VM's recent faults.
#[derive(Default)]
struct Stream {
    /// Last fault's page per vCPU.
    last: HashMap<u32, u64>,
    window: u32,
    sequential: usize,
    seen: usize,
}

impl Stream {
    /// Notes a fault at `page` on `vcpu`; returns the new window when a
    /// sample is complete and it changes.
    fn note(&mut self, vcpu: u32, page: u64, sample: usize) -> Option<u32> {
        if let Some(prev) = self.last.insert(vcpu, page) {
            // Forward, and no further than twice what the last fault mapped.
            let reach = 2 * (self.window as u64 + 1);
            self.sequential += (page > prev && page - prev <= reach) as usize;
            self.seen += 1;
        }
        if self.seen < sample {
            return None;
        }
        let ratio = self.sequential as f64 / self.seen as f64;
        (self.sequential, self.seen) = (0, 0);
        let next = if ratio >= 0.75 {
            (self.window * 2).clamp(8, MAX_WINDOW)
        } else if ratio < 0.25 {
            0
        } else {
            self.window
        };
        (next != self.window).then(|| {
            self.window = next;
            next
        })
    }
}

fn rules(windows: &HashMap<u32, u32>) -> Vec<pb::Rule> {
    let mut rules: Vec<pb::Rule> =
        windows.iter().map(|(&vm_id, &w)| pb::Rule { vm_id, fault_around_pages: Some(w), ..everywhere() }).collect();
    rules.sort_by_key(|r| r.vm_id);
    rules.push(pb::Rule {
        max_mapping_size: pb::MappingSize::MappingSize4k as i32,
        fault_around_pages: Some(0),
        ..everywhere()
    });
    rules
}

async fn follow(server: PolicyServer, daemon: String, sample: usize, budgets: Vec<pb::ResidentBudget>) {
    let mut streams: HashMap<u32, Stream> = HashMap::new();
    let mut windows: HashMap<u32, u32> = HashMap::new();
    loop {
        let mut client = match FaultTraceClient::connect(daemon.clone()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%daemon, cause = %e, "cannot reach the daemon's FaultTrace; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        let allow = pb::FaultFilter {
            outcome: vec![pb::Outcome::Mapped as i32],
            kind: vec![pb::FaultKind::Translation as i32],
            ..Default::default()
        };
        let req = pb::ObserveRequest { follow: true, allowlist: vec![allow], ..Default::default() };
        let mut events = match client.observe(req).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(cause = %e, "Observe failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Ok(Some(msg)) = events.message().await {
            let Some(pb::observe_response::ResponseTypes::Fault(e)) = msg.response_types else { continue };
            let stream = streams.entry(e.vm_id).or_default();
            if let Some(w) = stream.note(e.vcpu, e.ipa >> 12, sample) {
                windows.insert(e.vm_id, w);
                let generation = server.publish(rules(&windows), budgets.clone());
                tracing::info!(vm = e.vm_id, window = w, generation, "fault-around window changed");
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    faultline_exit_status::exit_status(env!("CARGO_BIN_NAME"), run().await)
}

async fn run() -> anyhow::Result<()> {
    faultline_policies::init_logging();
    let args = Args::parse();
    if args.common.consult {
        anyhow::bail!("the adaptive policy decides from its rules only (--consult is not supported)");
    }
    let decisions = args.common.decisions(&[pb::Decision::MappingSize, pb::Decision::FaultAround]);
    let server = PolicyServer::new(
        description("adaptive", &decisions),
        rules(&HashMap::new()),
        args.common.budget.clone(),
        None,
        std::time::Duration::ZERO,
    );
    tokio::spawn(follow(server.clone(), args.daemon.clone(), args.sample.max(8), args.common.budget.clone()));
    serve(server, &args.common).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_stream_widens_the_window_and_random_faults_close_it() {
        let mut s = Stream::default();
        let mut changes = vec![];
        let mut page = 0;
        for _ in 0..200 {
            page += s.window as u64 + 1;
            changes.extend(s.note(0, page, 16));
        }
        assert_eq!(changes[..4], [8, 16, 32, 64]);
        let mut x = 12345u64;
        for _ in 0..32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            changes.extend(s.note(0, x >> 40, 16));
        }
        assert_eq!(changes.last(), Some(&0));
    }
}
