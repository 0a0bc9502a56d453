//! Prometheus `/metrics` over HTTP, in the OpenMetrics text format.
//!
//! Nothing is counted twice: a [`prometheus_client`] collector reads the
//! same counters, histograms and VM table that `FaultTrace.GetStats` and
//! `ServerStatus` read, at scrape time, so the two always agree.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::convert::{backing_bytes, ring_occupancy, service_pool, swap_usage};
use super::sources::Sources;
use crate::link::vm::AttachedVm;
use crate::observe::stats::STAGES;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS_S: [f64; 14] =
    [250e-9, 500e-9, 1e-6, 2.5e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 1e-3, 10e-3, 100e-3, 1.0];

/// Reads the daemon's statistics at each scrape.
struct FaultCollector(Sources);

impl std::fmt::Debug for FaultCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultCollector")
    }
}

/// A latency histogram already bucketed: `(upper bound s, count in bucket)`.
#[derive(Debug)]
struct Bucketed {
    sum_s: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for Bucketed {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum_s, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A family of one counter per value of `label`.
fn counter_family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(String, u64)],
) -> Result<(), std::fmt::Error> {
    let descriptor = (name, help, None, MetricType::Counter);
    labelled(encoder, descriptor, label, values, ConstCounter::new)
}

/// A family of one gauge of bytes per value of `label`.
fn bytes_family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(String, u64)],
) -> Result<(), std::fmt::Error> {
    let descriptor = (name, help, Some(&Unit::Bytes), MetricType::Gauge);
    labelled(encoder, descriptor, label, values, |n| ConstGauge::new(n as i64))
}

/// A family described by `(name, help, unit, type)` with one `metric(n)`
/// per `(value of label, n)`.
fn labelled<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    (name, help, unit, kind): (&str, &str, Option<&Unit>, MetricType),
    label: &str,
    values: &[(String, u64)],
    metric: impl Fn(u64) -> M,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, kind)?;
    for (value, n) in values {
        let labels = [(label, value.as_str())];
        metric(*n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl Collector for FaultCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let sources = &self.0;
        let stats = &sources.events.stats;
        let named = |v: Vec<(&str, u64)>| v.into_iter().map(|(k, n)| (k.to_string(), n)).collect::<Vec<_>>();
        let [by_kind, by_outcome, by_size] = stats.counters();
        counter_family(&mut encoder, "faultline_faults", "Faults by outcome.", "outcome", &named(by_outcome))?;
        counter_family(
            &mut encoder,
            "faultline_faults_by_kind",
            "Faults by architectural kind.",
            "kind",
            &named(by_kind),
        )?;
        counter_family(
            &mut encoder,
            "faultline_faults_by_mapping_size",
            "Faults by the stage-2 mapping size chosen (none: no mapping).",
            "size",
            &named(by_size),
        )?;
        let vms = sources.vms.list();
        let by_vm: Vec<(String, u64)> = vms
            .iter()
            .map(|vm| (vm.id().raw().to_string(), vm.counters.faults.load(std::sync::atomic::Ordering::Relaxed)))
            .collect();
        counter_family(&mut encoder, "faultline_vm_faults", "Fault records received, by attached VM.", "vm", &by_vm)?;
        self.encode_vm_memory(&mut encoder, &vms)?;
        self.encode_working_sets(&mut encoder, &vms)?;
        gauge(&mut encoder, "faultline_observe_streams", "Observe streams open.", sources.streams.in_use() as i64)?;
        counter(
            &mut encoder,
            "faultline_observe_streams_refused",
            "Observe streams refused at max_observe_streams.",
            sources.streams.refused(),
        )?;
        self.encode_host_memory(&mut encoder)?;

        let mut latency = encoder.encode_descriptor(
            "faultline_fault_latency",
            "Fault latency by pipeline stage and end to end (HDR histogram, re-bucketed).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (stage, h) in STAGES.iter().zip(stats.histograms()) {
            let mut below = 0;
            let mut buckets = Vec::with_capacity(BUCKETS_S.len() + 1);
            for le in BUCKETS_S {
                let cumulative = h.count_between(0, (le * 1e9) as u64);
                buckets.push((le, cumulative - below));
                below = cumulative;
            }
            buckets.push((f64::MAX, h.len() - below));
            let m = Bucketed { sum_s: h.mean() * h.len() as f64 / 1e9, count: h.len(), buckets };
            let labels = [("stage", *stage)];
            m.encode(latency.encode_family(&labels)?)?;
        }

        let hub = sources.events.status();
        counter(&mut encoder, "faultline_events_seen", "Fault events recorded.", hub.seen_events)?;
        counter(
            &mut encoder,
            "faultline_events_lost",
            "Fault events the history lost because an observer held their slot.",
            hub.lost_events,
        )?;
        counter(
            &mut encoder,
            "faultline_histogram_samples_skipped",
            "Latency samples not recorded because a reader held the histograms.",
            stats.skipped(),
        )?;
        gauge(&mut encoder, "faultline_events_buffered", "Fault events in the history.", hub.num_events as i64)?;
        let pinned: u64 = vms.iter().map(|vm| vm.mapping.pins().total()).sum();
        gauge(&mut encoder, "faultline_pinned_pages", "Backing pages pinned by installed mappings.", pinned as i64)?;
        gauge(&mut encoder, "faultline_attached_vms", "VMs attached.", vms.len() as i64)?;
        let mut occupancy = encoder.encode_descriptor(
            "faultline_ring_occupancy",
            "Records waiting in a vCPU ring as the daemon last saw them.",
            None,
            MetricType::Gauge,
        )?;
        for r in ring_occupancy(&vms) {
            let (vm, vcpu) = (r.vm_id.to_string(), r.vcpu.to_string());
            for (ring, n) in [("fault", r.fault_ring), ("command", r.command_ring)] {
                let labels = [("vm", vm.as_str()), ("vcpu", vcpu.as_str()), ("ring", ring)];
                ConstGauge::new(n as i64).encode(occupancy.encode_family(&labels)?)?;
            }
        }
        let pool = service_pool(&sources.pool);
        gauge(
            &mut encoder,
            "faultline_service_threads",
            "Threads serving every VM's fault rings.",
            pool.threads as i64,
        )?;
        gauge(
            &mut encoder,
            "faultline_serving_threads",
            "The most service threads that serve for load at once; the rest stand by for a service that waits.",
            pool.serving_limit as i64,
        )?;
        let mut waits = encoder.encode_descriptor(
            "faultline_fault_waits",
            "Service threads' waits for faults, by how they ended: spun (work arrived while spinning), \
             slept (on the doorbells), yielded (a spin given up because other threads wanted the CPUs).",
            None,
            MetricType::Counter,
        )?;
        for (how, n) in [("spun", pool.waits_spun), ("slept", pool.waits_slept), ("yielded", pool.spins_yielded)] {
            ConstCounter::new(n).encode(waits.encode_family(&[("how", how)])?)?;
        }
        self.encode_policy(&mut encoder)
    }
}

impl FaultCollector {
    /// Each VM's memory as the host sees it: what its stage-2 mappings
    /// hold, what its backing files take, and what its swap stores hold
    /// and take (the same figures as GetVm, without the rest of it).
    fn encode_vm_memory(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        vms: &[Arc<AttachedVm>],
    ) -> Result<(), std::fmt::Error> {
        const FAMILIES: [(&str, &str); 4] = [
            ("faultline_vm_resident", "Guest memory mapped at stage 2 (what a resident budget caps)."),
            ("faultline_vm_backing", "Host memory the VM's backing files take (allocated blocks)."),
            ("faultline_vm_swap_store", "Bytes the VM's swap store files take (allocated blocks)."),
            ("faultline_vm_swap_held", "Guest bytes the VM's swap stores hold (evicted pages)."),
        ];
        let mut values: [Vec<(String, u64)>; 4] = Default::default();
        for vm in vms {
            let (id, swap) = (vm.id().raw().to_string(), swap_usage(vm));
            let figures = [vm.mapping.resident(), backing_bytes(vm), swap.stored, swap.held];
            for (family, n) in values.iter_mut().zip(figures) {
                family.push((id.clone(), n));
            }
        }
        for ((name, help), values) in FAMILIES.into_iter().zip(values) {
            bytes_family(encoder, name, help, "vm", &values)?;
        }
        Ok(())
    }

    /// What each monitored VM's working-set monitor last saw: the
    /// working set, idle bytes by age, its CPU time; and every VM's
    /// refaults, access-flag faults and cold reclaims.
    fn encode_working_sets(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        vms: &[Arc<AttachedVm>],
    ) -> Result<(), std::fmt::Error> {
        use crate::observe::workingset::IDLE_BUCKETS_S;
        use std::sync::atomic::Ordering::Relaxed;
        let seen: Vec<_> =
            vms.iter().filter_map(|vm| Some((vm.id().raw().to_string(), vm.working_set.latest()?))).collect();
        let working: Vec<(String, u64)> = seen.iter().map(|(id, a)| (id.clone(), a.working_set_bytes())).collect();
        bytes_family(
            encoder,
            "faultline_vm_working_set",
            "Guest memory the working-set monitor saw accessed within its window (monitored VMs).",
            "vm",
            &working,
        )?;
        let mut idle = encoder.encode_descriptor(
            "faultline_vm_idle",
            "Guest memory by how long the working-set monitor has seen it idle: under `idle_le` seconds and at \
             least the bucket before (monitored VMs).",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        for (id, a) in &seen {
            for (bound, bytes) in IDLE_BUCKETS_S.iter().zip(a.idle_bytes_by_bucket()) {
                let le = if *bound == u64::MAX { "+Inf".to_string() } else { bound.to_string() };
                let labels = [("vm", id.as_str()), ("idle_le", le.as_str())];
                ConstGauge::new(bytes as i64).encode(idle.encode_family(&labels)?)?;
            }
        }
        let per_vm = |f: &dyn Fn(&AttachedVm) -> u64| -> Vec<(String, u64)> {
            vms.iter().map(|vm| (vm.id().raw().to_string(), f(vm))).collect()
        };
        counter_family(
            encoder,
            "faultline_vm_refaults",
            "Faults that brought evicted pages back from the swap store.",
            "vm",
            &per_vm(&|vm| vm.layout.refaults()),
        )?;
        counter_family(
            encoder,
            "faultline_vm_access_flag_faults",
            "Access-flag faults the core resolved itself (aged pages touched again; no fault record).",
            "vm",
            &per_vm(&|vm| vm.access_flag_faults()),
        )?;
        counter_family(
            encoder,
            "faultline_vm_cold_evicted",
            "Mappings reclaimed by cold reclaim.",
            "vm",
            &per_vm(&|vm| vm.counters.cold_evicted.load(Relaxed)),
        )?;
        counter_family(
            encoder,
            "faultline_vm_monitor_cpu_ns",
            "CPU time of the VM's working-set monitor thread, nanoseconds.",
            "vm",
            &per_vm(&|vm| vm.counters.monitor_cpu_ns.load(Relaxed)),
        )
    }

    /// The policy in force and its watchdog's counters.
    fn encode_host_memory(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let host = &self.0.host;
        let pressure =
            "1 while the host is under memory pressure (PSI some avg10 at or over host_memory.some_avg10_percent).";
        gauge(encoder, "faultline_host_memory_pressure", pressure, i64::from(host.under_pressure()))?;
        let psi = encoder.encode_descriptor(
            "faultline_host_memory_psi_some_avg10",
            "PSI memory some avg10 as last read, percent.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(host.some_avg10()).encode(psi)?;
        counter(
            encoder,
            "faultline_host_memory_pressure_episodes",
            "Episodes of host memory pressure.",
            host.episodes(),
        )?;
        counter(
            encoder,
            "faultline_host_memory_refused_faults",
            "Faults refused fresh backing under host memory pressure, past the reserve.",
            host.refused(),
        )?;
        let left = encoder.encode_descriptor(
            "faultline_host_memory_reserve_left",
            "Fresh backing still handed out in this episode of pressure.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        ConstGauge::new(host.reserve_left() as i64).encode(left)
    }

    fn encode_policy(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use faultline_proto::v1::PolicyExitKind;
        let host = &self.0.policies;
        let stats = host.stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let mut info = encoder.encode_descriptor(
            "faultline_policy_active",
            "The memory policy in force (1 for its name).",
            None,
            MetricType::Gauge,
        )?;
        let name = host.load().policy.name();
        ConstGauge::new(1).encode(info.encode_family(&[("policy", name)])?)?;
        let fallbacks: Vec<(String, u64)> = (1..stats.fallbacks.len() as i32)
            .filter_map(|k| PolicyExitKind::try_from(k).ok())
            .filter(|k| *k != PolicyExitKind::Replaced)
            .map(|k| {
                let label = k.as_str_name().trim_start_matches("POLICY_EXIT_KIND_").to_lowercase();
                (label, load(&stats.fallbacks[k as usize]))
            })
            .collect();
        counter_family(
            encoder,
            "faultline_policy_fallbacks",
            "Policies dropped for the built-in one, by why.",
            "reason",
            &fallbacks,
        )?;
        counter(encoder, "faultline_policy_consults", "Consult calls to a policy.", load(&stats.consults))?;
        counter(
            encoder,
            "faultline_policy_consults_late",
            "Consults not answered within the deadline (the rules decided).",
            load(&stats.consults_late),
        )?;
        counter(encoder, "faultline_policy_clamped", "Policy decisions correctness overrode.", load(&stats.clamped))?;
        let prefaulted: u64 = self.0.vms.list().iter().map(|vm| load(&vm.counters.prefaulted)).sum();
        counter(encoder, "faultline_fault_around_pages", "Pages mapped by fault-around (attached VMs).", prefaulted)
    }
}

/// The registry the endpoint encodes.
pub fn registry(sources: Sources) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(FaultCollector(sources)));
    registry
}

/// The exposition text for `registry`.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Serves `GET /metrics` on `addr` until `shutdown` is cancelled; sends the
/// bound address to `bound` once listening.
pub async fn serve(
    sources: Sources,
    addr: SocketAddr,
    shutdown: CancellationToken,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> anyhow::Result<()> {
    let patient = sources.lifecycle.took_over;
    let registry = Arc::new(registry(sources));
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                match render(&registry) {
                    Ok(text) => (
                        axum::http::StatusCode::OK,
                        [(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        text,
                    ),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("encoding metrics failed: {e}"),
                    ),
                }
            }
        }),
    );
    let listener = super::server::bind(addr, "metrics", patient).await?;
    let local = listener.local_addr()?;
    info!(addr = %local, "metrics listening");
    let _ = bound.send(local);
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}
