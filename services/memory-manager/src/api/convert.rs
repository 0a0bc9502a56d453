//! The API's proto conversions, all in one place: fault events, fault
//! classifications, attached VMs, ring occupancy, latency summaries and
//! request timestamps. (Times, accesses and mapping sizes have one wire
//! form for every service: [`faultline_proto::convert`].)

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use faultline_proto::convert::{access, mapping_size, system_time, timestamp};
use faultline_proto::v1 as pb;
use hyp_core::abort::FaultStatus;
use tonic::Status;

use crate::fault::trace::Stage;
use crate::link::pool::ServicePool;
use crate::link::vm::AttachedVm;
use crate::memory::swap::SwapUsage;
use crate::observe::events::{FaultEvent, Outcome};
use crate::observe::stats::{self, Summary};
use crate::observe::workingset::{Aggregation, MonitorSettings};

/// The time a request's timestamp names; INVALID_ARGUMENT if it cannot be one.
pub fn request_time(t: &prost_types::Timestamp) -> Result<SystemTime, Status> {
    system_time(t).ok_or_else(|| Status::invalid_argument("timestamps must be after 1970 with nanos in 0..1e9"))
}

// The proto enums number their values as the statistics index them (one
// classification, in observe/stats.rs); the test below pins the
// correspondence.

/// The wire form of a fault's kind.
pub fn kind_of(status: Option<FaultStatus>) -> pb::FaultKind {
    pb::FaultKind::try_from(stats::kind_index(status) as i32).unwrap_or(pb::FaultKind::Other)
}

/// The wire form of an outcome.
pub fn outcome_of(o: Outcome) -> pb::Outcome {
    pb::Outcome::try_from(stats::outcome_index(o) as i32 + 1).unwrap_or(pb::Outcome::Unspecified)
}

/// The wire form of an event.
pub fn event(e: &FaultEvent) -> pb::FaultEvent {
    pb::FaultEvent {
        time: Some(timestamp(e.time)),
        fault_id: e.fault_id,
        vm_id: e.vm_id as u32,
        vcpu: e.vcpu,
        ipa: e.ipa,
        esr: e.esr,
        kind: kind_of(e.status) as i32,
        level: e.status.and_then(|s| s.level()).map_or(0, i32::from),
        access: access(e.access) as i32,
        memslot: e.memslot,
        hva: e.hva,
        vma_page_size: e.vma_page_size,
        mapping_size: mapping_size(e.mapping_size) as i32,
        permissions: e.permissions,
        pa: e.pa,
        outcome: outcome_of(e.outcome) as i32,
        reject_reason: match e.outcome {
            Outcome::Rejected(r) => r.map_or("unknown", |r| r.name()).to_string(),
            _ => String::new(),
        },
        policy: e.policy.to_string(),
        stages: Some(pb::StageTimes {
            memslot_ns: e.stages.at(Stage::Memslot),
            vma_ns: e.stages.at(Stage::Vma),
            size_ns: e.stages.at(Stage::Size),
            pin_ns: e.stages.at(Stage::Pin),
            permissions_ns: e.stages.at(Stage::Permissions),
            command_sent_ns: e.sent_ns,
            completed_ns: e.completed_ns,
        }),
        latency_ns: e.completed_ns,
        populated: e.populated,
        fault_around: e.fault_around,
    }
}

/// The wire form of an attached VM.
pub fn vm(vm: &AttachedVm) -> pb::Vm {
    let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let swap = swap_usage(vm);
    pb::Vm {
        vm_id: vm.id().raw() as u32,
        vcpus: vm.layout.nr_vcpus,
        memslots: vm
            .layout
            .memslots
            .iter()
            .map(|m| pb::Memslot {
                id: m.id as u32,
                gpa: m.gpa.raw(),
                size: m.size,
                read_only: m.read_only,
                dirty_log: m.dirty_log,
                dirty_pages: vm.mapping.dirty_log(m).count(),
            })
            .collect(),
        pinned_pages: vm.mapping.pins().total(),
        mappings: vm.mapping.mapping_count() as u64,
        faults: count(&vm.counters.faults),
        resident_bytes: vm.mapping.resident(),
        evicted: count(&vm.counters.evicted),
        evicted_bytes: count(&vm.counters.evicted_bytes),
        fault_around_pages: count(&vm.counters.prefaulted),
        backing_bytes: backing_bytes(vm),
        swap_store_bytes: swap.stored,
        swap_store_in_memory: swap.in_memory,
        swap_store_held_bytes: swap.held,
        refaults: vm.layout.refaults(),
        working_set_bytes: vm.working_set.latest().map_or(0, |a| a.working_set_bytes()),
        refault_bytes: vm.layout.refault_bytes(),
        refault_stall_ns: vm.layout.refault_ns(),
        access_flag_faults: vm.access_flag_faults(),
    }
}

/// The wire form of `vm`'s aggregation `seen`.
pub fn working_set(vm: &AttachedVm, seen: &Aggregation) -> pb::WorkingSetAggregation {
    let s = &seen.settings;
    pb::WorkingSetAggregation {
        vm_id: vm.id().raw() as u32,
        index: seen.index,
        time: Some(timestamp(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(seen.time_ns))),
        sample_us: s.sample_us,
        aggregate_ms: s.aggregate_ms,
        samples_per_aggregation: s.samples_per_aggregation(),
        regions: seen
            .regions
            .iter()
            .map(|r| pb::WorkingSetRegion {
                start: r.range.start().raw(),
                end: r.range.end().raw(),
                frequency: r.frequency,
                idle_aggregations: r.idle_aggregations,
                idle_ms: seen.idle(r).as_millis() as u64,
            })
            .collect(),
        working_set_bytes: seen.working_set_bytes(),
        working_set_window_ms: s.working_set_window_ms,
        resident_bytes: vm.mapping.resident(),
        monitor_cpu_ns: vm.counters.monitor_cpu_ns.load(Ordering::Relaxed),
        monitored_bytes: seen.regions.iter().map(|r| r.range.len()).sum(),
        cold_evicted: vm.counters.cold_evicted.load(Ordering::Relaxed),
        refaults: vm.layout.refaults(),
    }
}

/// The wire form of the monitor's settings.
pub fn monitor_settings(s: &MonitorSettings) -> pb::WorkingSetMonitorSettings {
    pb::WorkingSetMonitorSettings {
        enabled: s.enabled,
        sample_us: s.sample_us,
        aggregate_ms: s.aggregate_ms,
        min_regions: s.min_regions,
        max_regions: s.max_regions,
        working_set_window_ms: s.working_set_window_ms,
        cpu_budget_per_gib_bp: s.cpu_budget_per_gib_bp,
    }
}

/// Monitor settings from the wire, checked.
pub fn monitor_settings_from(s: &pb::WorkingSetMonitorSettings) -> Result<MonitorSettings, Status> {
    MonitorSettings {
        enabled: s.enabled,
        sample_us: s.sample_us,
        aggregate_ms: s.aggregate_ms,
        min_regions: s.min_regions,
        max_regions: s.max_regions,
        working_set_window_ms: s.working_set_window_ms,
        cpu_budget_per_gib_bp: s.cpu_budget_per_gib_bp,
    }
    .validated()
    .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// What the swap stores of the VM's memory regions hold and take, summed
/// (in memory if any of them is).
pub fn swap_usage(vm: &AttachedVm) -> SwapUsage {
    vm.layout.regions.iter().filter(|r| !r.device).map(|r| r.swap_store_usage()).fold(SwapUsage::default(), |sum, u| {
        SwapUsage { held: sum.held + u.held, stored: sum.stored + u.stored, in_memory: sum.in_memory || u.in_memory }
    })
}

/// Host memory the VM's backing files take, each file counted once.
pub fn backing_bytes(vm: &AttachedVm) -> u64 {
    let mut files: Vec<(u64, u64)> = vm.layout.regions.iter().filter_map(|r| r.backing_bytes().ok()).collect();
    files.sort_unstable();
    files.dedup_by_key(|(ino, _)| *ino);
    files.iter().map(|(_, bytes)| bytes).sum()
}

/// Ring occupancy of every vCPU of `vms`, by VM and vCPU.
pub fn ring_occupancy(vms: &[Arc<AttachedVm>]) -> Vec<pb::RingOccupancy> {
    let mut out: Vec<pb::RingOccupancy> = vms
        .iter()
        .flat_map(|vm| {
            vm.rings.iter().enumerate().map(|(vcpu, r)| {
                let r = r.read();
                pb::RingOccupancy {
                    vm_id: vm.id().raw() as u32,
                    vcpu: vcpu as u32,
                    capacity: r.capacity,
                    fault_ring: r.faults,
                    fault_ring_high_water: r.faults_high,
                    command_ring: r.commands,
                    command_ring_high_water: r.commands_high,
                    access_flag_faults: r.access_flag_faults,
                }
            })
        })
        .collect();
    out.sort_by_key(|r| (r.vm_id, r.vcpu));
    out
}

/// The service pool's threads and how their waits went.
pub fn service_pool(pool: &ServicePool) -> pb::ServicePool {
    let w = pool.waits();
    pb::ServicePool {
        threads: pool.threads() as u32,
        waits_spun: w.spun,
        waits_slept: w.slept,
        spins_yielded: w.yielded,
        serving_limit: pool.serving_limit() as u32,
    }
}

/// The wire form of a stage's latency summary.
pub fn latency(s: Summary) -> pb::LatencyHistogram {
    pb::LatencyHistogram {
        stage: s.stage.to_string(),
        count: s.count,
        min_ns: s.min,
        p50_ns: s.p50,
        p90_ns: s.p90,
        p99_ns: s.p99,
        p999_ns: s.p999,
        max_ns: s.max,
        mean_ns: s.mean,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyp_core::stage2::MapSize;

    /// The statistics' names and the proto enum names describe the same values.
    #[test]
    fn proto_enums_follow_the_statistics_classification() {
        let short = |name: &str, prefix: &str| name.trim_start_matches(prefix).to_lowercase().replace('_', "-");
        for (i, name) in stats::KINDS.iter().enumerate().skip(1) {
            let proto = pb::FaultKind::try_from(i as i32).unwrap();
            assert_eq!(short(proto.as_str_name(), "FAULT_KIND_"), *name);
        }
        for (i, name) in stats::OUTCOMES.iter().enumerate() {
            let proto = pb::Outcome::try_from(i as i32 + 1).unwrap();
            assert_eq!(short(proto.as_str_name(), "OUTCOME_"), *name);
        }
        for size in [None, Some(MapSize::Page4K), Some(MapSize::Block2M), Some(MapSize::Block1G)] {
            assert_eq!(mapping_size(size) as usize, stats::size_index(size));
        }
        assert_eq!(mapping_size(Some(MapSize::Block2M)), pb::MappingSize::MappingSize2m);
        assert_eq!(mapping_size(None), pb::MappingSize::Unspecified);
        assert_eq!(kind_of(None), pb::FaultKind::Unspecified);
    }
}
