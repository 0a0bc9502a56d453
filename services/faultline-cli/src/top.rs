//! `faultline top`: a live terminal view of every VM, as kvm_stat and
//! htop show theirs. Per VM, refreshed every second: the fault rate by
//! outcome, p50 and p99 of the fault latency, ring occupancy, resident
//! and working-set bytes, and the policy in force. `v` toggles a per-vCPU
//! breakdown; `q` (or Esc, or Ctrl-C) quits.
//!
//! A VM's fault rate is its fault count's (ListVms); the outcomes and
//! latencies, and the per-vCPU rates, come from the FaultTrace follow
//! stream (the daemon keeps no per-VM histograms), a sample when the
//! stream loses events, which the header then says; the rest from
//! ListVms, GetStats and GetPolicyStatus. The terminal is drawn on a thread of its own, so
//! a slow daemon never freezes the keys.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultline::{human_bytes, outcome_name, percentile_us};
use faultline_proto::v1::control_client::ControlClient;
use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::observe_response::ResponseTypes;
use faultline_proto::v1::policy_control_client::PolicyControlClient;
use faultline_proto::v1::{GetPolicyStatusRequest, GetStatsRequest, ListVmsRequest, ObserveRequest};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Row, Table};
use tonic::transport::Channel;

use crate::refused;

/// How often the figures are refreshed.
const REFRESH: Duration = Duration::from_secs(1);

/// `faultline top`'s arguments.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Start with the per-vCPU breakdown.
    #[arg(long)]
    vcpus: bool,
}

/// Events of one vCPU since the last refresh.
#[derive(Default)]
struct Window {
    outcomes: BTreeMap<String, u64>,
    latencies_ns: Vec<u64>,
}

/// One row: a VM, or one of its vCPUs.
#[derive(Clone, Debug, Default)]
struct Figures {
    rate: f64,
    by_outcome: Vec<(String, f64)>,
    p50_us: f64,
    p99_us: f64,
    fault_ring: u32,
    command_ring: u32,
}

/// One VM's rows.
#[derive(Clone, Debug, Default)]
struct VmRows {
    vcpus: u32,
    resident: u64,
    /// 0: not monitored.
    working_set: u64,
    all: Figures,
    per_vcpu: BTreeMap<u32, Figures>,
}

/// What the screen shows.
#[derive(Clone, Debug, Default)]
struct Screen {
    policy: String,
    updated: Option<Instant>,
    /// By VM id.
    vms: BTreeMap<u32, VmRows>,
    error: Option<String>,
    /// Events the follow stream lost in the last refresh: the outcomes and
    /// latencies shown are a sample of the faults (the rate is exact).
    lost: u64,
    /// The poller failed for good: the UI restores the terminal and ends.
    stop: bool,
}

fn figures(windows: &[&Window], seconds: f64) -> Figures {
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut lat: Vec<u64> = Vec::new();
    for w in windows {
        for (k, n) in &w.outcomes {
            *outcomes.entry(k.clone()).or_default() += n;
        }
        lat.extend(&w.latencies_ns);
    }
    lat.sort_unstable();
    let total: u64 = outcomes.values().sum();
    Figures {
        rate: total as f64 / seconds,
        by_outcome: outcomes.into_iter().map(|(k, n)| (k, n as f64 / seconds)).collect(),
        p50_us: percentile_us(&lat, 50),
        p99_us: percentile_us(&lat, 99),
        ..Default::default()
    }
}

/// Runs the view until the operator quits; connects through `channel`
/// once it knows it has a terminal to draw on.
pub async fn run(
    args: TopArgs,
    channel: impl std::future::Future<Output = anyhow::Result<Channel>>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "top draws on a terminal, and stdin or stdout is not one; \
             for scripts: `faultline vm list -o json`, `faultline stats -o json`, `faultline observe --follow -o json`"
        );
    }
    let channel = channel.await?;
    let screen = Arc::new(Mutex::new(Screen::default()));
    let (quit_tx, mut quit_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let ui = {
        let screen = screen.clone();
        std::thread::Builder::new().name("top-ui".into()).spawn(move || {
            let _ = quit_tx.send(draw_until_quit(&screen, args.vcpus));
        })?
    };
    let mut trace = FaultTraceClient::new(channel.clone());
    let mut control = ControlClient::new(channel.clone());
    let mut policies = PolicyControlClient::new(channel);
    let follow = ObserveRequest { follow: true, ..Default::default() };
    let mut events = trace.observe(follow).await.map_err(refused)?.into_inner();
    let mut windows: BTreeMap<(u32, u32), Window> = BTreeMap::new();
    // Events the stream lost since the last refresh, and each VM's fault
    // count then (its exact rate: the events are a sample when any are lost).
    let mut lost = 0u64;
    let mut faults_then: BTreeMap<u32, u64> = BTreeMap::new();
    let mut tick = tokio::time::interval(REFRESH);
    let mut since = Instant::now();
    let ended = loop {
        tokio::select! {
            quit = &mut quit_rx => break quit.unwrap_or(Ok(())),
            next = events.message() => match next {
                Ok(Some(r)) => {
                    match r.response_types {
                        Some(ResponseTypes::Fault(e)) => {
                            let w = windows.entry((e.vm_id, e.vcpu)).or_default();
                            *w.outcomes.entry(outcome_name(e.outcome)).or_default() += 1;
                            w.latencies_ns.push(e.latency_ns);
                        }
                        Some(ResponseTypes::LostEvents(l)) => lost += l.num_events_lost,
                        _ => {}
                    }
                }
                Ok(None) => break Err(anyhow::anyhow!("the daemon ended the fault stream")),
                Err(e) => break Err(refused(e)),
            },
            _ = tick.tick() => {
                let seconds = since.elapsed().as_secs_f64().max(1e-3);
                since = Instant::now();
                let polled = async {
                    let vms = control.list_vms(ListVmsRequest {}).await?.into_inner().vms;
                    let stats = trace.get_stats(GetStatsRequest {}).await?.into_inner();
                    let policy = policies.get_policy_status(GetPolicyStatusRequest {}).await?.into_inner();
                    Ok::<_, tonic::Status>((vms, stats, policy))
                }
                .await;
                let mut s = screen.lock().unwrap_or_else(|e| e.into_inner());
                match polled {
                    Ok((vms, stats, policy)) => {
                        s.error = None;
                        s.lost = lost;
                        s.policy = policy.active;
                        s.vms.clear();
                        for vm in &vms {
                            let mine: Vec<(&(u32, u32), &Window)> = windows.range((vm.vm_id, 0)..=(vm.vm_id, u32::MAX)).collect();
                            let mut per_vcpu: BTreeMap<u32, Figures> = (0..vm.vcpus).map(|v| (v, Figures::default())).collect();
                            for ((_, vcpu), w) in &mine {
                                per_vcpu.insert(*vcpu, figures(&[w], seconds));
                            }
                            let mut all = figures(&mine.iter().map(|(_, w)| *w).collect::<Vec<_>>(), seconds);
                            if let Some(then) = faults_then.get(&vm.vm_id) {
                                all.rate = vm.faults.saturating_sub(*then) as f64 / seconds;
                            }
                            for r in stats.rings.iter().filter(|r| r.vm_id == vm.vm_id) {
                                all.fault_ring += r.fault_ring;
                                all.command_ring += r.command_ring;
                                let f = per_vcpu.entry(r.vcpu).or_default();
                                (f.fault_ring, f.command_ring) = (r.fault_ring, r.command_ring);
                            }
                            let rows = VmRows {
                                vcpus: vm.vcpus,
                                resident: vm.resident_bytes,
                                working_set: vm.working_set_bytes,
                                all,
                                per_vcpu,
                            };
                            s.vms.insert(vm.vm_id, rows);
                        }
                        faults_then = vms.iter().map(|vm| (vm.vm_id, vm.faults)).collect();
                    }
                    Err(e) => s.error = Some(format!("{:?}: {}", e.code(), e.message())),
                }
                s.updated = Some(Instant::now());
                windows.clear();
                lost = 0;
            }
        }
    };
    // The UI thread restores the terminal before it ends; on an error
    // here, the screen tells it to.
    screen.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
    drop(events);
    let _ = tokio::task::spawn_blocking(move || ui.join()).await;
    ended
}

/// Draws `screen` every 100 ms until `q`, Esc or Ctrl-C (or the poller
/// stops); restores the terminal on the way out.
fn draw_until_quit(screen: &Mutex<Screen>, mut vcpus: bool) -> anyhow::Result<()> {
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> anyhow::Result<()> {
        loop {
            let shown = screen.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if shown.stop {
                return Ok(());
            }
            terminal.draw(|frame| render(frame, &shown, vcpus))?;
            if event::poll(Duration::from_millis(100))? {
                if let Event::Key(k) = event::read()? {
                    if k.kind != KeyEventKind::Press {
                        continue;
                    }
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                        KeyCode::Char('v') => vcpus = !vcpus,
                        _ => {}
                    }
                }
            }
        }
    })();
    ratatui::try_restore()?;
    result
}

fn render(frame: &mut ratatui::Frame, s: &Screen, vcpus: bool) {
    let [head, body, foot] =
        Layout::vertical([Constraint::Length(2), Constraint::Min(3), Constraint::Length(1)]).areas(frame.area());
    let status = match (&s.error, s.updated) {
        (Some(e), _) => format!("daemon: {e}"),
        (None, None) => "waiting for the first refresh...".into(),
        (None, Some(_)) if s.lost > 0 => {
            format!("{} VMs attached   {} events lost: outcomes and latencies sampled", s.vms.len(), s.lost)
        }
        (None, Some(_)) => format!("{} VMs attached", s.vms.len()),
    };
    let title = format!("faultline top   policy: {}   {status}", if s.policy.is_empty() { "-" } else { &s.policy });
    frame.render_widget(Paragraph::new(vec![Line::from(title), Line::from("")]), head);
    let header = ["VM", "VCPU", "FAULTS/S", "BY OUTCOME", "P50", "P99", "RINGS F/C", "RESIDENT", "WORKING SET"];
    let cells = |id: String, vcpu: String, f: &Figures, resident: String, ws: String| {
        let outcomes: Vec<String> = f.by_outcome.iter().map(|(k, r)| format!("{k} {r:.0}")).collect();
        Row::new(vec![
            id,
            vcpu,
            format!("{:.0}", f.rate),
            outcomes.join(" "),
            format!("{:.1}us", f.p50_us),
            format!("{:.1}us", f.p99_us),
            format!("{}/{}", f.fault_ring, f.command_ring),
            resident,
            ws,
        ])
    };
    let mut rows = Vec::new();
    for (id, vm) in &s.vms {
        // Not monitored (see `faultline monitor`): no working set to show.
        let ws = if vm.working_set == 0 { "-".to_string() } else { human_bytes(vm.working_set) };
        rows.push(cells(format!("vm{id}"), format!("{}", vm.vcpus), &vm.all, human_bytes(vm.resident), ws));
        if vcpus {
            for (v, f) in &vm.per_vcpu {
                rows.push(cells(String::new(), format!("vcpu{v}"), f, String::new(), String::new()));
            }
        }
    }
    let widths = [
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Min(24),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(12),
    ];
    let table = Table::new(rows, widths).header(Row::new(header).style(Style::new().add_modifier(Modifier::BOLD)));
    frame.render_widget(table, body);
    let keys = if vcpus { "v: VMs only   q: quit" } else { "v: per-vCPU breakdown   q: quit" };
    frame.render_widget(Paragraph::new(keys), foot);
}
