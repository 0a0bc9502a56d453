//! `faultline demo`: the daemon and a simulated machine, started side by
//! side from the binaries next to this one, with faults streamed while the
//! guest runs and a summary at the end.

use crate::out::outln;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faultline::{compact, sibling, LatencyByKind};
use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::observe_response::ResponseTypes;
use faultline_proto::v1::{GetStatsRequest, ObserveRequest};

/// What the demo runs.
pub struct DemoArgs {
    /// vCPUs.
    pub vcpus: u32,
    /// Accesses per vCPU.
    pub ops: u64,
    /// Workload pattern.
    pub pattern: String,
    /// Events printed per second at most (the rest are counted).
    pub max_lines_per_second: u32,
}

struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        // SIGTERM for a clean stop.
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// Kills the machine (by pid: its `Child` is being waited on elsewhere) if
/// the demo ends first, a closed stdout or an error: it would otherwise
/// wait out its re-attach deadline for the daemon the demo stopped.
struct Unfinished(Option<nix::unistd::Pid>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as u32
}

/// The demo's vCPUs unless asked: 2, or 1 where that leaves no core for
/// the daemon's service thread.
pub fn default_vcpus() -> u32 {
    vcpus_for(cores())
}

fn vcpus_for(cores: u32) -> u32 {
    cores.saturating_sub(1).clamp(1, 2)
}

/// The daemon's service threads for a demo of `vcpus` vCPUs on `cores`:
/// the cores the vCPUs leave, at least one. The daemon's own default (a
/// thread per core) is for a host of many VMs; beside one small VM,
/// threads waiting for its faults on the cores its vCPUs need would turn
/// every wait into a sleep, and the demo would show a crowded host's
/// latency rather than a fault's.
fn service_threads_for(vcpus: u32, cores: u32) -> u32 {
    cores.saturating_sub(vcpus).max(1)
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("faultline-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("attach.sock");
    let threads = service_threads_for(args.vcpus, cores());
    let mut daemon = Command::new(sibling("memory-manager")?)
        .arg("--attach-socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--grpc-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-filter", "info"])
        .args(["--service-threads", &threads.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .context("starting memory-manager")?;
    let stderr = daemon.stderr.take().context("daemon stderr")?;
    let daemon = Reaper(daemon);
    // The daemon logs its gRPC address once listening.
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().context("the daemon exited before listening")??;
        // The TCP listener's line (the Unix socket's says path=).
        if let Some(rest) = line.split("gRPC listening addr=").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap_or(""));
        }
    };
    // Keep draining the daemon's log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    outln!(
        "faultline demo: daemon at {addr}, service threads: {threads}, vCPUs: {}, accesses per vCPU: {}, pattern {}",
        args.vcpus,
        args.ops,
        args.pattern
    );
    let mut client = FaultTraceClient::connect(addr.clone()).await?;
    let mut stream = client.observe(ObserveRequest { follow: true, ..Default::default() }).await?.into_inner();
    let machine = Command::new(sibling("sim-machine")?)
        .arg("--attach-socket")
        .arg(&socket)
        .args(["--vcpus", &args.vcpus.to_string(), "--ops", &args.ops.to_string(), "--pattern", &args.pattern])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting sim-machine")?;
    let mut unfinished = Unfinished(Some(nix::unistd::Pid::from_raw(machine.id() as i32)));
    let machine = tokio::task::spawn_blocking(move || machine.wait_with_output());
    tokio::pin!(machine);
    let (mut shown, mut seen, mut window_start, mut window_shown) = (0u64, 0u64, Instant::now(), 0u32);
    let mut by_kind = LatencyByKind::default();
    let tz = jiff::tz::TimeZone::system();
    let mut last_progress = Instant::now();
    let output = loop {
        tokio::select! {
            done = &mut machine => {
                // Reaped: its pid is no longer its own.
                unfinished.0 = None;
                break done??;
            }
            msg = stream.message() => match msg? {
                Some(r) => if let Some(ResponseTypes::Fault(e)) = r.response_types {
                    seen += 1;
                    by_kind.add(&e);
                    if window_start.elapsed() >= Duration::from_secs(1) {
                        (window_start, window_shown) = (Instant::now(), 0);
                    }
                    if window_shown < args.max_lines_per_second {
                        outln!("{}", compact(&e, &tz));
                        shown += 1;
                        window_shown += 1;
                    } else if last_progress.elapsed() >= Duration::from_secs(1) {
                        outln!("... {seen} faults so far ({} not shown)", seen - shown);
                        last_progress = Instant::now();
                    }
                },
                None => bail!("the daemon ended the event stream"),
            },
        }
    };
    if !output.status.success() {
        bail!("sim-machine failed");
    }
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).context("machine summary")?;
    let stats = client.get_stats(GetStatsRequest {}).await?.into_inner();
    outln!();
    outln!(
        "summary: {} faults ({} shown), {} accesses in {} ms",
        summary["faults"],
        shown,
        summary["accesses"],
        summary["run_ms"]
    );
    let nonzero = |v: &[faultline_proto::v1::Count]| {
        v.iter().filter(|c| c.count > 0).map(|c| format!("{}={}", c.key, c.count)).collect::<Vec<_>>().join(" ")
    };
    outln!("  by outcome: {}", nonzero(&stats.by_outcome));
    outln!("  by size:    {}", nonzero(&stats.by_mapping_size));
    if let Some(h) = stats.latency.iter().find(|h| h.stage == "end_to_end") {
        outln!(
            "  daemon latency: p50 {:.2} us, p99 {:.2} us, max {:.2} us",
            h.p50_ns as f64 / 1000.0,
            h.p99_ns as f64 / 1000.0,
            h.max_ns as f64 / 1000.0
        );
    }
    outln!("  daemon latency by kind (a fault that allocates its page pays the kernel for it):");
    for (kind, count, p50, p99) in by_kind.summary() {
        outln!("    {kind:<34} {count:>6}   p50 {p50:>9.2} us   p99 {p99:>9.2} us");
    }
    outln!(
        "  round trip seen by the vCPUs: p50 {:.2} us, p99 {:.2} us",
        summary["fault_p50_ns"].as_f64().unwrap_or(0.0) / 1000.0,
        summary["fault_p99_ns"].as_f64().unwrap_or(0.0) / 1000.0
    );
    let waits = &summary["waits"];
    outln!(
        "  how the vCPUs waited: spun {}, slept {}, gave up spinning {} times (when threads outnumber the {} cores)",
        waits["spun"],
        waits["slept"],
        waits["yielded"],
        cores()
    );
    if waits["passed"].as_u64().is_some_and(|n| n > 0) {
        outln!(
            "  let the other vCPUs run and found the answer on coming back: {} times (the daemon on other cores)",
            waits["passed"]
        );
    }
    outln!("  pins left after detach: {}", summary["detach"]["pins_remaining"]);
    // Close the connection before stopping the daemon: its graceful shutdown
    // waits for clients, and this thread blocks while reaping it.
    drop(stream);
    drop(client);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vcpus_and_service_threads_fit_the_cores_where_they_can() {
        for (cores, vcpus, threads) in [(1, 1, 1), (2, 1, 1), (3, 2, 1), (4, 2, 2), (16, 2, 14)] {
            assert_eq!((vcpus_for(cores), service_threads_for(vcpus_for(cores), cores)), (vcpus, threads), "{cores}");
        }
        // Asked for more vCPUs than cores: one service thread.
        assert_eq!(service_threads_for(8, 2), 1);
    }
}
