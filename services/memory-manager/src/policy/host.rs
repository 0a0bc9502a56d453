//! Which memory policy is in force, and the policy services behind it.
//!
//! The fault path loads the current policy with one atomic read (arc-swap)
//! and uses it for the whole fault, so a swap is atomic per fault: a fault
//! is decided wholly by the old policy or wholly by the new one, and none
//! waits for a swap. A remote policy is a session on the host's own runtime
//! (at the fault path's priority, not the API's): connect, check its
//! description, take its first rule set, swap it in, then watch it. The
//! watchdog drops it for the built-in default when its rules stream ends,
//! a heartbeat misses its deadline, consults are late too often, or a rule
//! set is malformed; each drop is an exit record (why, when, which), a
//! counter and an event for FaultTrace followers, as sched_ext records why
//! a scheduler left.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use faultline_proto::v1 as pb;
use faultline_proto::v1::memory_policy_client::MemoryPolicyClient;
use tokio::sync::{broadcast, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use faultline_proto::convert::timestamp;

use super::builtin::intern;
use super::remote::{Consulter, RemotePolicy};
use super::rules::{Rules, RulesError};
use super::stats::PolicyStats;
use crate::fault::choices::Policy;

/// How the daemon watches policy services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyTiming {
    /// Connecting, Describe, the first rule set, each heartbeat: answered
    /// within this or the policy is refused (or dropped).
    pub deadline: Duration,
    /// How often a policy in force is sent a heartbeat (Describe).
    pub heartbeat: Duration,
    /// How long a fault waits for a Consult answer.
    pub consult_deadline: Duration,
    /// Late consults in a row that drop the policy.
    pub late_strikes: u32,
    /// Reconnect to a dropped policy once it is healthy again.
    pub reconnect: bool,
}

impl Default for PolicyTiming {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(100),
            heartbeat: Duration::from_millis(100),
            consult_deadline: Duration::from_millis(2),
            late_strikes: 3,
            reconnect: false,
        }
    }
}

/// The policy in force, as the fault path sees it.
pub struct InForce {
    /// The policy.
    pub policy: Box<dyn Policy>,
    /// Its session (0 for the built-in policy).
    pub session: u64,
}

/// Why a UsePolicy was refused.
#[derive(Debug, thiserror::Error)]
pub enum UseError {
    /// The endpoint is not a URI the daemon can connect to.
    #[error("bad endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// What was asked for.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The policy could not be reached or did not answer in time.
    #[error("policy at {endpoint} unavailable: {reason}")]
    Unavailable {
        /// Where.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// Its first rule set was refused.
    #[error("policy at {endpoint} sent malformed rules: {cause}")]
    Malformed {
        /// Where.
        endpoint: String,
        /// Why.
        cause: RulesError,
    },
    /// The daemon is shutting down, or the request was superseded.
    #[error("cancelled")]
    Cancelled,
}

/// A policy service in force: what Status reports about it.
#[derive(Clone, Debug)]
struct Session {
    id: u64,
    endpoint: String,
    description: pb::PolicyDescription,
    generation: u64,
    rules: u32,
    budgets: u32,
    reconnect: bool,
    cancel: CancellationToken,
}

#[derive(Default)]
struct HostState {
    next_session: u64,
    /// The remote policy in force, if not the built-in one.
    active: Option<Session>,
    /// Every live session (in force, or reconnecting): cancelled on a swap.
    live: Vec<(u64, String, CancellationToken)>,
    since: Option<SystemTime>,
    exits: VecDeque<pb::PolicyExit>,
    known: Vec<pb::PolicyEntry>,
}

/// Exit records kept for status.
const EXITS_KEPT: usize = 64;

/// The policy in force and its sessions.
pub struct PolicyHost {
    current: ArcSwap<InForce>,
    builtin: Arc<InForce>,
    timing: PolicyTiming,
    rt: tokio::runtime::Handle,
    state: Mutex<HostState>,
    stats: Arc<PolicyStats>,
    exits_tx: broadcast::Sender<pb::PolicyExit>,
    state_file: Option<std::path::PathBuf>,
    _runtime: RuntimeThread,
}

/// The host's own runtime, on a thread at the caller's priority; stopped
/// and joined on drop (outside any async context).
struct RuntimeThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PolicyHost {
    /// A host with `builtin` in force, starting its runtime thread (call it
    /// from a thread at the fault path's priority). The policy asked for is
    /// kept in `state_file` (if any) for the daemon after this one.
    pub fn new(
        builtin: Box<dyn Policy>,
        timing: PolicyTiming,
        state_file: Option<std::path::PathBuf>,
    ) -> std::io::Result<Self> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("policy".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = handle_tx.send(Err(e));
                    return;
                }
            };
            let _ = handle_tx.send(Ok(rt.handle().clone()));
            rt.block_on(async {
                let _ = stop_rx.await;
            });
        })?;
        let rt = handle_rx.recv().map_err(std::io::Error::other)??;
        let builtin = Arc::new(InForce { policy: builtin, session: 0 });
        let mut state = HostState { next_session: 1, since: Some(SystemTime::now()), ..Default::default() };
        state.known.push(pb::PolicyEntry {
            name: builtin.policy.name().into(),
            endpoint: String::new(),
            version: env!("CARGO_PKG_VERSION").into(),
            active: false,
        });
        Ok(Self {
            current: ArcSwap::new(builtin.clone()),
            builtin,
            timing,
            rt,
            state: Mutex::new(state),
            stats: Arc::default(),
            exits_tx: broadcast::channel(64).0,
            state_file,
            _runtime: RuntimeThread { stop: Some(stop_tx), thread: Some(thread) },
        })
    }

    /// The policy in force (one atomic load; hold it for the whole fault).
    pub fn load(&self) -> arc_swap::Guard<Arc<InForce>> {
        self.current.load()
    }

    /// The counters.
    pub fn stats(&self) -> &PolicyStats {
        &self.stats
    }

    /// Exit records as they happen.
    pub fn subscribe_exits(&self) -> broadcast::Receiver<pb::PolicyExit> {
        self.exits_tx.subscribe()
    }

    /// The watchdog's timing.
    pub fn timing(&self) -> PolicyTiming {
        self.timing
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects to the policy at `endpoint`, checks it and swaps it in.
    /// On any error the policy in force stays.
    pub async fn use_policy(
        self: &Arc<Self>,
        endpoint: &str,
        reconnect: Option<bool>,
    ) -> Result<pb::PolicyStatus, UseError> {
        let endpoint_uri = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| UseError::BadEndpoint { endpoint: endpoint.into(), reason: e.to_string() })?;
        if !matches!(endpoint_uri.uri().scheme_str(), Some("http")) || endpoint_uri.uri().host().is_none() {
            return Err(UseError::BadEndpoint {
                endpoint: endpoint.into(),
                reason: "expected http://host:port".into(),
            });
        }
        let reconnect = reconnect.unwrap_or(self.timing.reconnect);
        let (id, cancel) = {
            let mut st = self.state();
            let id = st.next_session;
            st.next_session += 1;
            let cancel = CancellationToken::new();
            st.live.push((id, endpoint.to_string(), cancel.clone()));
            (id, cancel)
        };
        let (first_tx, first_rx) = oneshot::channel();
        let host = self.clone();
        let endpoint_string = endpoint.to_string();
        let endpoint = endpoint.to_string();
        self.rt.spawn(async move {
            host.session(id, endpoint_uri, endpoint, reconnect, cancel, first_tx).await;
        });
        first_rx.await.unwrap_or(Err(UseError::Cancelled))?;
        self.remember(Some((&endpoint_string, reconnect)));
        Ok(self.status())
    }

    /// Keeps the policy asked for (or the built-in one) in the state file,
    /// for a daemon that starts after this one.
    fn remember(&self, chosen: Option<(&str, bool)>) {
        let Some(path) = &self.state_file else { return };
        let written = match chosen {
            Some((endpoint, reconnect)) => {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, format!("{endpoint}\n{reconnect}\n")).and_then(|()| std::fs::rename(&tmp, path))
            }
            None => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = written {
            warn!(cause = %e, path = %path.display(), "cannot record the policy in force");
        }
    }

    /// Puts back in force the policy a previous daemon had (its state
    /// file), as it was asked for, in the background.
    pub fn resume(self: &Arc<Self>) {
        let Some(path) = &self.state_file else { return };
        let Ok(text) = std::fs::read_to_string(path) else { return };
        let mut lines = text.lines();
        let (Some(endpoint), Some(reconnect)) = (lines.next(), lines.next().and_then(|r| r.parse().ok())) else {
            warn!(path = %path.display(), "the recorded policy is unreadable; the built-in one stays");
            return;
        };
        let (host, endpoint) = (self.clone(), endpoint.to_string());
        self.rt.spawn(async move {
            match host.use_policy(&endpoint, Some(reconnect)).await {
                Ok(_) => info!(%endpoint, "the previous daemon's policy is back in force"),
                Err(e) => warn!(%endpoint, cause = %e, "the previous daemon's policy did not come back"),
            }
        });
    }

    /// Back to the built-in policy; every session ends.
    pub fn use_default(&self) -> pb::PolicyStatus {
        let mut st = self.state();
        for (_, _, cancel) in st.live.drain(..) {
            cancel.cancel();
        }
        if let Some(old) = st.active.take() {
            let exit =
                self.exit_record(&old, pb::PolicyExitKind::Replaced, "UseDefault".into(), self.builtin.policy.name());
            self.push_exit(&mut st, exit);
            self.current.store(self.builtin.clone());
            st.since = Some(SystemTime::now());
        }
        drop(st);
        self.remember(None);
        self.status()
    }

    /// What is in force, the exits so far and the counters.
    pub fn status(&self) -> pb::PolicyStatus {
        let st = self.state();
        let current = self.current.load();
        let s = &self.stats;
        let mut status = pb::PolicyStatus {
            active: current.policy.name().into(),
            reconnect: self.timing.reconnect,
            since: st.since.map(timestamp),
            exits: st.exits.iter().cloned().collect(),
            consults: s.consults.load(Ordering::Relaxed),
            consults_late: s.consults_late.load(Ordering::Relaxed),
            clamped: s.clamped.load(Ordering::Relaxed),
            fallbacks: s.fallbacks_total(),
            ..Default::default()
        };
        if let Some(a) = st.active.as_ref().filter(|a| a.id == current.session) {
            status.endpoint = a.endpoint.clone();
            status.version = a.description.version.clone();
            status.decisions = a.description.decisions.clone();
            (status.rules_generation, status.rules, status.budgets) = (a.generation, a.rules, a.budgets);
            status.reconnect = a.reconnect;
        }
        let active = st.active.as_ref().map(|a| a.id);
        if let Some((_, endpoint, _)) = st.live.iter().find(|(id, _, _)| Some(*id) != active) {
            status.reconnecting_endpoint = endpoint.clone();
        }
        status
    }

    /// The built-in policy and every endpoint used.
    pub fn list(&self) -> Vec<pb::PolicyEntry> {
        let st = self.state();
        let current = self.current.load();
        let active_endpoint = st.active.as_ref().filter(|a| a.id == current.session).map(|a| a.endpoint.as_str());
        st.known
            .iter()
            .map(|e| pb::PolicyEntry {
                active: match active_endpoint {
                    Some(ep) => e.endpoint == ep,
                    None => e.endpoint.is_empty(),
                },
                ..e.clone()
            })
            .collect()
    }

    fn exit_record(&self, s: &Session, kind: pb::PolicyExitKind, reason: String, successor: &str) -> pb::PolicyExit {
        pb::PolicyExit {
            time: Some(timestamp(SystemTime::now())),
            policy: s.description.name.clone(),
            endpoint: s.endpoint.clone(),
            kind: kind as i32,
            reason,
            successor: successor.into(),
        }
    }

    fn push_exit(&self, st: &mut HostState, exit: pb::PolicyExit) {
        if st.exits.len() == EXITS_KEPT {
            st.exits.pop_back();
        }
        st.exits.push_front(exit.clone());
        let _ = self.exits_tx.send(exit);
    }

    /// Puts session `s`'s policy in force, unless the session was cancelled
    /// meanwhile. A remote policy it replaces gets a REPLACED exit.
    fn install(&self, s: &Session, policy: RemotePolicy) -> bool {
        let mut st = self.state();
        if s.cancel.is_cancelled() {
            return false;
        }
        let name = policy.name;
        match st.active.take() {
            Some(old) if old.id != s.id => {
                old.cancel.cancel();
                st.live.retain(|(id, _, _)| *id != old.id);
                let exit =
                    self.exit_record(&old, pb::PolicyExitKind::Replaced, format!("UsePolicy {}", s.endpoint), name);
                self.push_exit(&mut st, exit);
                st.since = Some(SystemTime::now());
            }
            None => st.since = Some(SystemTime::now()),
            Some(_) => {}
        }
        // Sessions asked for before this one and not in force yet end too.
        for (_, _, cancel) in st.live.iter().filter(|(id, _, _)| *id < s.id) {
            cancel.cancel();
        }
        st.live.retain(|(id, _, _)| *id >= s.id);
        if let Some(e) = st.known.iter_mut().find(|e| e.endpoint == s.endpoint) {
            (e.name, e.version) = (s.description.name.clone(), s.description.version.clone());
        } else {
            st.known.push(pb::PolicyEntry {
                name: s.description.name.clone(),
                endpoint: s.endpoint.clone(),
                version: s.description.version.clone(),
                active: false,
            });
        }
        st.active = Some(s.clone());
        self.current.store(Arc::new(InForce { policy: Box::new(policy), session: s.id }));
        true
    }

    /// Drops session `id`'s policy for the built-in one, if it is in force.
    fn fall_back(&self, id: u64, kind: pb::PolicyExitKind, reason: String) {
        let mut st = self.state();
        let Some(old) = st.active.take_if(|a| a.id == id) else { return };
        self.stats.fallbacks[kind as usize].fetch_add(1, Ordering::Relaxed);
        warn!(policy = %old.description.name, endpoint = %old.endpoint, ?kind, %reason, "policy dropped; built-in policy in force");
        let exit = self.exit_record(&old, kind, reason, self.builtin.policy.name());
        self.push_exit(&mut st, exit);
        self.current.store(self.builtin.clone());
        st.since = Some(SystemTime::now());
    }

    fn end_session(&self, id: u64) {
        self.state().live.retain(|(s, _, _)| *s != id);
    }

    /// One policy service, from connecting until it is dropped for good.
    async fn session(
        self: Arc<Self>,
        id: u64,
        uri: Endpoint,
        endpoint: String,
        reconnect: bool,
        cancel: CancellationToken,
        first: oneshot::Sender<Result<(), UseError>>,
    ) {
        let mut first = Some(first);
        loop {
            let connected = tokio::select! {
                _ = cancel.cancelled() => Err(UseError::Cancelled),
                c = self.connect(id, &uri, &endpoint, reconnect, &cancel) => c,
            };
            let running = match connected {
                Ok(r) => r,
                Err(e) => {
                    if let Some(first) = first.take() {
                        self.end_session(id);
                        let _ = first.send(Err(e));
                        return;
                    }
                    if cancel.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(self.timing.heartbeat).await;
                    continue;
                }
            };
            if let Some(first) = first.take() {
                let _ = first.send(Ok(()));
            }
            info!(policy = %running.session.description.name, %endpoint, "policy in force");
            let (kind, reason) = self.watch(running).await;
            if kind == pb::PolicyExitKind::Replaced {
                return;
            }
            self.fall_back(id, kind, reason);
            if !reconnect || cancel.is_cancelled() {
                self.end_session(id);
                return;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.timing.heartbeat) => {}
            }
        }
    }

    /// Connects, describes, takes the first rule set and installs it.
    async fn connect(
        &self,
        id: u64,
        uri: &Endpoint,
        endpoint: &str,
        reconnect: bool,
        cancel: &CancellationToken,
    ) -> Result<Running, UseError> {
        let deadline = self.timing.deadline;
        let unavailable = |reason: String| UseError::Unavailable { endpoint: endpoint.into(), reason };
        let channel = uri
            .clone()
            .connect_timeout(deadline)
            .connect()
            .await
            .map_err(|e| unavailable(format!("connecting: {e}")))?;
        let mut client = MemoryPolicyClient::new(channel);
        let description = tokio::time::timeout(deadline, client.describe(pb::DescribeRequest {}))
            .await
            .map_err(|_| unavailable(format!("Describe not answered within {deadline:?}")))?
            .map_err(|s| unavailable(format!("Describe: {}", s.message())))?
            .into_inner();
        if description.name.is_empty() || description.name == self.builtin.policy.name() {
            return Err(unavailable(format!(
                "the policy's name {:?} is empty or the built-in one's",
                description.name
            )));
        }
        let request = pb::WatchRulesRequest { daemon_version: env!("CARGO_PKG_VERSION").into() };
        let mut stream = tokio::time::timeout(deadline, client.watch_rules(request))
            .await
            .map_err(|_| unavailable(format!("WatchRules not answered within {deadline:?}")))?
            .map_err(|s| unavailable(format!("WatchRules: {}", s.message())))?
            .into_inner();
        let set = tokio::time::timeout(deadline, stream.message())
            .await
            .map_err(|_| unavailable(format!("no rule set within {deadline:?}")))?
            .map_err(|s| unavailable(format!("rules stream: {}", s.message())))?
            .ok_or_else(|| unavailable("rules stream ended before the first set".into()))?;
        let rules = Rules::try_from(&set).map_err(|cause| UseError::Malformed { endpoint: endpoint.into(), cause })?;
        let consult = Arc::new(Consulter {
            client: client.clone(),
            rt: self.rt.clone(),
            deadline: self.timing.consult_deadline,
            strikes: self.timing.late_strikes.max(1),
            late_in_row: AtomicU32::new(0),
            trip: Notify::new(),
            stats: self.stats.clone(),
        });
        let session = Session {
            id,
            endpoint: endpoint.into(),
            generation: rules.generation,
            rules: rules.rules.len() as u32,
            budgets: rules.budgets.len() as u32,
            reconnect,
            description,
            cancel: cancel.clone(),
        };
        let policy = self.remote(&session, rules, &consult);
        if !self.install(&session, policy) {
            return Err(UseError::Cancelled);
        }
        Ok(Running { session, client, stream, consult })
    }

    fn remote(&self, s: &Session, rules: Rules, consult: &Arc<Consulter>) -> RemotePolicy {
        let consults = s.description.decisions.contains(&(pb::Decision::Consult as i32));
        RemotePolicy {
            name: intern(&s.description.name),
            rules,
            consult: consults.then(|| consult.clone()),
            stats: self.stats.clone(),
        }
    }

    /// Applies rule updates and watches the policy until it must go.
    async fn watch(&self, mut r: Running) -> (pb::PolicyExitKind, String) {
        use pb::PolicyExitKind as Kind;
        let mut heartbeat = tokio::time::interval(self.timing.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = self.timing.deadline;
        loop {
            tokio::select! {
                _ = r.session.cancel.cancelled() => return (Kind::Replaced, String::new()),
                msg = r.stream.message() => match msg {
                    Ok(Some(set)) => match Rules::try_from(&set) {
                        Ok(rules) => {
                            (r.session.generation, r.session.rules, r.session.budgets) =
                                (rules.generation, rules.rules.len() as u32, rules.budgets.len() as u32);
                            let policy = self.remote(&r.session, rules, &r.consult);
                            if !self.install(&r.session, policy) {
                                return (Kind::Replaced, String::new());
                            }
                        }
                        Err(e) => return (Kind::MalformedRules, format!("rule set {}: {e}", set.generation)),
                    },
                    Ok(None) => return (Kind::Disconnected, "the rules stream ended".into()),
                    Err(s) => return (Kind::Disconnected, format!("rules stream: {} ({:?})", s.message(), s.code())),
                },
                _ = heartbeat.tick() => {
                    match tokio::time::timeout(deadline, r.client.describe(pb::DescribeRequest {})).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(s)) => return (Kind::Disconnected, format!("heartbeat: {} ({:?})", s.message(), s.code())),
                        Err(_) => return (Kind::Hung, format!("heartbeat not answered within {deadline:?}")),
                    }
                }
                _ = r.consult.trip.notified() => {
                    let n = r.consult.strikes;
                    return (Kind::Late, format!("{n} consults in a row missed their {:?} deadline", r.consult.deadline));
                }
            }
        }
    }
}

/// A connected policy service.
struct Running {
    session: Session,
    client: MemoryPolicyClient<Channel>,
    stream: tonic::Streaming<pb::RuleSet>,
    consult: Arc<Consulter>,
}
