//! Writing a Faultline memory policy in Rust.
//!
//! A policy is a process serving the `faultline.v1.MemoryPolicy` gRPC
//! service: [`PolicyServer`] serves it from a description and the rule sets
//! you [`publish`](PolicyServer::publish) (each replaces the last; the daemon
//! applies them on its fast path), plus an optional per-fault consult
//! function. [`Common`] holds the flags every policy binary here takes, and
//! [`serve`] binds, prints the address on stdout and serves until SIGTERM.
//! `docs/policies.md` explains the contract; the three binaries are
//! examples (largest, sequential-4k, adaptive), and `policy-cold` does
//! proactive reclaim from the working set ([`cold`]).

pub mod cold;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faultline_proto::v1 as pb;
use faultline_proto::v1::memory_policy_server::{MemoryPolicy, MemoryPolicyServer};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// A per-fault decision function for Consult.
pub type ConsultFn = dyn Fn(&pb::ConsultRequest) -> pb::ConsultResponse + Send + Sync;

/// Flags every policy binary takes.
#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// Address to serve MemoryPolicy on (port 0: any free port; the address
    /// is printed as `LISTENING http://ADDR`).
    #[arg(long, default_value = "127.0.0.1:50160")]
    pub listen: SocketAddr,
    /// Ask the daemon to consult the policy on every fault its rules cover,
    /// instead of deciding from the rules alone.
    #[arg(long)]
    pub consult: bool,
    /// Answer each Consult this many milliseconds late (to exercise the
    /// daemon's deadline and watchdog).
    #[arg(long, default_value_t = 0)]
    pub consult_delay_ms: u64,
    /// This many milliseconds after starting, publish a malformed rule set
    /// (to exercise the daemon's refusal).
    #[arg(long)]
    pub malformed_after_ms: Option<u64>,
    /// A resident budget for a VM: VM:MIB[:fifo|lifo|lowest-ipa|highest-ipa|coldest].
    #[arg(long, value_parser = parse_budget)]
    pub budget: Vec<pb::ResidentBudget>,
}

impl Common {
    /// The decisions of a policy that makes `own`, plus Consult and
    /// ResidentBudget when these flags ask for them.
    pub fn decisions(&self, own: &[pb::Decision]) -> Vec<pb::Decision> {
        let mut d = own.to_vec();
        if self.consult {
            d.push(pb::Decision::Consult);
        }
        if !self.budget.is_empty() {
            d.push(pb::Decision::ResidentBudget);
        }
        d
    }
}

/// Parses `VM:MIB[:ORDER]`.
pub fn parse_budget(s: &str) -> Result<pb::ResidentBudget, String> {
    let mut parts = s.split(':');
    let vm_id = parts.next().and_then(|v| v.parse().ok()).ok_or("expected VM:MIB[:ORDER]")?;
    let mib: u64 = parts.next().and_then(|v| v.parse().ok()).ok_or("expected VM:MIB[:ORDER]")?;
    let order = match parts.next().unwrap_or("fifo") {
        "fifo" => pb::EvictionOrder::Fifo,
        "lifo" => pb::EvictionOrder::Lifo,
        "lowest-ipa" => pb::EvictionOrder::LowestIpa,
        "highest-ipa" => pb::EvictionOrder::HighestIpa,
        "coldest" => pb::EvictionOrder::Coldest,
        other => return Err(format!("unknown eviction order {other:?}")),
    };
    Ok(pb::ResidentBudget { vm_id, max_resident_bytes: mib << 20, order: order as i32 })
}

/// A MemoryPolicy server: a description, the current rule set, and
/// optionally a consult function.
#[derive(Clone)]
pub struct PolicyServer {
    inner: Arc<Inner>,
}

struct Inner {
    description: pb::PolicyDescription,
    rules: watch::Sender<pb::RuleSet>,
    generation: AtomicU64,
    consult: Option<Box<ConsultFn>>,
    consult_delay: Duration,
}

impl PolicyServer {
    /// A server for `description` whose first rule set is `rules` and
    /// `budgets`; answers Consult with `consult` (if given) after
    /// `consult_delay`.
    pub fn new(
        description: pb::PolicyDescription,
        rules: Vec<pb::Rule>,
        budgets: Vec<pb::ResidentBudget>,
        consult: Option<Box<ConsultFn>>,
        consult_delay: Duration,
    ) -> Self {
        let first = pb::RuleSet { generation: 1, rules, budgets, ..Default::default() };
        let inner = Inner {
            description,
            rules: watch::channel(first).0,
            generation: AtomicU64::new(1),
            consult,
            consult_delay,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Publishes a new rule set (replacing the last) to every daemon
    /// watching; returns its generation.
    pub fn publish(&self, rules: Vec<pb::Rule>, budgets: Vec<pb::ResidentBudget>) -> u64 {
        self.publish_set(pb::RuleSet { rules, budgets, ..Default::default() })
    }

    /// Publishes `set` (its generation replaced by the next one), cold
    /// reclaims and all; returns its generation.
    pub fn publish_set(&self, set: pb::RuleSet) -> u64 {
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.inner.rules.send_replace(pb::RuleSet { generation, ..set });
        generation
    }

    /// The rule set in force.
    pub fn current(&self) -> pb::RuleSet {
        self.inner.rules.borrow().clone()
    }

    /// The tonic service.
    pub fn into_service(self) -> MemoryPolicyServer<Self> {
        MemoryPolicyServer::new(self)
    }
}

type RuleStream = Pin<Box<dyn Stream<Item = Result<pb::RuleSet, Status>> + Send>>;

#[tonic::async_trait]
impl MemoryPolicy for PolicyServer {
    type WatchRulesStream = RuleStream;

    async fn describe(&self, _: Request<pb::DescribeRequest>) -> Result<Response<pb::PolicyDescription>, Status> {
        Ok(Response::new(self.inner.description.clone()))
    }

    async fn watch_rules(&self, _: Request<pb::WatchRulesRequest>) -> Result<Response<RuleStream>, Status> {
        let stream = tokio_stream::wrappers::WatchStream::new(self.inner.rules.subscribe());
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(stream, Ok))))
    }

    async fn consult(&self, request: Request<pb::ConsultRequest>) -> Result<Response<pb::ConsultResponse>, Status> {
        let Some(consult) = &self.inner.consult else {
            return Err(Status::unimplemented("this policy decides from its rules only"));
        };
        if !self.inner.consult_delay.is_zero() {
            tokio::time::sleep(self.inner.consult_delay).await;
        }
        Ok(Response::new(consult(request.get_ref())))
    }
}

/// The decisions a policy makes, for its description.
pub fn description(name: &str, decisions: &[pb::Decision]) -> pb::PolicyDescription {
    pb::PolicyDescription {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        decisions: decisions.iter().map(|d| *d as i32).collect(),
    }
}

/// A rule for every VM, memslot and IPA.
pub fn everywhere() -> pb::Rule {
    pb::Rule::default()
}

/// Sets up logging to stderr (RUST_LOG, default info).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// Serves `server` on `common.listen` until SIGTERM or SIGINT; prints
/// `LISTENING http://ADDR` once bound. With `--malformed-after-ms`, publishes
/// a malformed rule set then.
pub async fn serve(server: PolicyServer, common: &Common) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(common.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {} (--listen): {e}", common.listen))?;
    let addr = listener.local_addr()?;
    // A fault-around window the daemon's limit refuses.
    let malformed = |server: &PolicyServer| {
        let bad = pb::Rule { fault_around_pages: Some(1000), ..everywhere() };
        server.publish(vec![bad], vec![]);
    };
    match common.malformed_after_ms {
        Some(0) => malformed(&server),
        Some(ms) => {
            let server = server.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                malformed(&server);
            });
        }
        None => {}
    }
    println!("LISTENING http://{addr}");
    tracing::info!(%addr, policy = %server.inner.description.name, "serving MemoryPolicy");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(server.into_service())
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_with_their_order() {
        let b = parse_budget("3:64:lowest-ipa").unwrap();
        assert_eq!((b.vm_id, b.max_resident_bytes, b.order), (3, 64 << 20, pb::EvictionOrder::LowestIpa as i32));
        assert_eq!(parse_budget("1:8").unwrap().order, pb::EvictionOrder::Fifo as i32);
        assert!(parse_budget("1").is_err());
        assert!(parse_budget("1:8:random").is_err());
    }

    #[test]
    fn published_sets_replace_the_last_with_a_new_generation() {
        let server = PolicyServer::new(description("t", &[]), vec![everywhere()], vec![], None, Duration::ZERO);
        assert_eq!(server.current().generation, 1);
        let g = server.publish(vec![], vec![]);
        assert_eq!((g, server.current().generation, server.current().rules.len()), (2, 2, 0));
    }
}
