//! A daemon replaced under a running guest, in one run:
//!
//! - the restart stall: SIGKILL, the supervisor (this bench) starts a new
//!   daemon at once, over 50 kills of a 1 GiB guest with about 10k 4 KiB
//!   mappings, at 1 and 4 vCPUs;
//! - the rebuild, per installed mapping, at 10k and 1M mappings (the
//!   successor's own count and time, from its log);
//! - the takeover stall: from the old daemon starting the handover (its
//!   drain), over 50 takeovers, at 1 and 4 vCPUs.
//!
//! Each stall three ways ([`Stall`]): the longest any vCPU waited on one
//! fault in the phase run across it (the machine's summary); to the new
//! daemon's first map command sent (the core installs it and resumes the
//! vCPU); to that map's result read by the daemon. An idle guest's
//! takeover is held against the same phase run just before it with no
//! takeover: on 2 cores shared by 4 vCPUs, a phase's longest fault wait
//! is the scheduler's tail as much as the takeover's.
//!
//! `cargo bench -p faultline-system-tests --bench restart` (about 20
//! minutes; `RESTART_BENCH_KILLS=5` for a quick look)

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use faultline_proto::v1::fault_trace_client::FaultTraceClient;
use faultline_proto::v1::{observe_response::ResponseTypes, ObserveRequest};
use faultline_system_tests::{binary, Daemon, TracedMachine};
use nix::sys::signal::Signal;

const PAGE: u64 = 4096;
const RAM_GPA: u64 = 0x4000_0000;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A trace: `mapped` pages written once (split over the vCPUs), then
/// `phases` phases of `per_phase` writes per vCPU to random pages of
/// `ram_pages` (nearly every one a fault on a page not yet mapped), each
/// phase between pauses.
fn trace(vcpus: u64, mapped: u64, ram_pages: u64, rounds: u64, per_round: &[u64]) -> tempfile::NamedTempFile {
    let writes: u64 = per_round.iter().sum();
    let mut text = String::with_capacity((mapped + rounds * vcpus * writes) as usize * 24);
    for p in 0..mapped {
        text.push_str(&format!("{} W {:#x} 8\n", p % vcpus, RAM_GPA + p * PAGE));
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for &per_phase in (0..rounds).flat_map(|_| per_round) {
        text.push_str("PAUSE\n");
        for i in 0..vcpus * per_phase {
            text.push_str(&format!("{} W {:#x} 8\n", i % vcpus, RAM_GPA + rng.next() % ram_pages * PAGE));
        }
    }
    // Paused after the last phase too: the machine stays attached until
    // `Machine::finish`.
    text.push_str("PAUSE\n");
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

/// Starts the machine on `trace` and waits until its first phase (the
/// mapped pages) is done; it then waits for a line on stdin.
fn start_machine(daemon: &Daemon, vcpus: u64, ram_mib: u64, trace: &tempfile::NamedTempFile) -> Machine {
    let (vcpus, ram_mib) = (vcpus.to_string(), ram_mib.to_string());
    let args = ["--vcpus", &vcpus, "--ram-mib", &ram_mib, "--ram-page-kib", "4", "--reattach-deadline-s", "60"];
    let mut machine = TracedMachine::spawn(daemon, &args, trace.path());
    machine.wait_paused(0);
    Machine { machine, phase: 0 }
}

/// A running machine, paused after phase `phase`.
struct Machine {
    machine: TracedMachine,
    phase: usize,
}

impl Machine {
    /// Lets the machine go on past its pause.
    fn resume(&mut self) {
        self.machine.resume();
    }

    /// Waits until the phase after the last pause is done.
    fn wait_paused(&mut self) {
        self.phase += 1;
        self.machine.wait_paused(self.phase);
    }

    /// Lets it run to the end and detach; panics if the run failed.
    /// Returns the longest fault wait of each phase after the first (the
    /// ones run across a restart or takeover), as the guest saw it, and
    /// that fault (posted when, where).
    fn finish(self) -> (Vec<Duration>, Vec<serde_json::Value>) {
        let TracedMachine { child, stdin, lines } = self.machine;
        drop(stdin);
        std::thread::spawn(move || lines.for_each(drop));
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "machine failed");
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the machine's summary");
        let longest = summary["phase_longest_fault_ns"].as_array().expect("phase_longest_fault_ns");
        let slowest = summary["phase_slowest_fault"].as_array().expect("phase_slowest_fault");
        (
            longest.iter().skip(1).map(|ns| Duration::from_nanos(ns.as_u64().expect("ns"))).collect(),
            slowest.iter().skip(1).cloned().collect(),
        )
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The first fault the daemon in place served: when its map command went
/// to the core (the core installs it and resumes the vCPU at once) and when
/// the daemon read its result (results that resume a vCPU are read lazily,
/// up to a millisecond later, with the vCPU already running).
struct Served {
    sent: SystemTime,
    completed: SystemTime,
    /// The events looked at.
    events: Events,
}

/// Fault events: vCPU, IPA, arrived, map sent, result read.
type Events = Vec<(u32, u64, SystemTime, SystemTime, SystemTime)>;

impl Served {
    /// The stall from `t`, the guest's side of it to be filled in.
    fn after(&self, t: SystemTime) -> Stall {
        let since = |x: SystemTime| x.duration_since(t).unwrap_or_default();
        Stall {
            guest: Duration::ZERO,
            sent: since(self.sent),
            read: since(self.completed),
            served_on: None,
            unstalled: None,
        }
    }
}

/// One stall, three ways: the longest any vCPU waited on one fault in the
/// phase run across it (the guest's view, from the machine); from the kill
/// or the drain's start to the new daemon's first map sent; and to that
/// map's result read.
#[derive(Clone, Copy)]
struct Stall {
    guest: Duration,
    sent: Duration,
    read: Duration,
    /// A takeover of a guest that keeps faulting: its longest fault wait
    /// while the old daemon served on and the new one adopted the records.
    served_on: Option<Duration>,
    /// The longest fault wait of the same phase run just before, with no
    /// stall: one daemon serving throughout. On a host whose cores the
    /// vCPUs share, a phase's longest wait is the scheduler's tail as much
    /// as the stall's; this is that tail alone.
    unstalled: Option<Duration>,
}

/// The phases of one stall's round in the trace.
#[derive(Clone, Copy, PartialEq)]
enum Round {
    /// One phase, run across the stall.
    Stall,
    /// The same phase twice: once with no stall (the control), then once
    /// across it.
    ControlThenStall,
    /// A phase while the old daemon serves on and the new one adopts the
    /// records' snapshot, then one across the drain (each reported apart).
    ServedOnThenStall,
}

impl Round {
    fn phases(self) -> usize {
        if self == Round::Stall {
            1
        } else {
            2
        }
    }
}

/// Fills in the guest's side of each stall, phase by phase: its longest
/// wait in the phase run across it, and in the phase before it where the
/// round has one. Returns, for each stall, the slowest fault of the phase
/// across it (the machine's `phase_slowest_fault`).
fn with_guest(
    stalls: &mut [Stall],
    longest: Vec<Duration>,
    slowest: Vec<serde_json::Value>,
    round: Round,
) -> Vec<serde_json::Value> {
    let n = round.phases();
    // The last phase runs after the last stall, to the end.
    assert!(longest.len() >= stalls.len() * n && slowest.len() == longest.len(), "{n} phases per stall");
    let mut faults = Vec::with_capacity(stalls.len());
    for ((s, waits), slow) in stalls.iter_mut().zip(longest.chunks(n)).zip(slowest.chunks(n)) {
        // The round's last phase is the one across the stall.
        s.guest = waits[n - 1];
        s.served_on = (round == Round::ServedOnThenStall).then_some(waits[0]);
        s.unstalled = (round == Round::ControlThenStall).then_some(waits[0]);
        faults.push(slow[n - 1].clone());
    }
    faults
}

/// The first fault the daemon in place served: the earliest map sent and
/// the earliest result read among its first events (events are recorded as
/// faults complete, not in the order they were served).
fn first_served(rt: &tokio::runtime::Runtime, daemon: &Daemon) -> Served {
    const LOOK_AT: u64 = 8;
    let started = Instant::now();
    loop {
        let first = rt.block_on(async {
            let mut c = FaultTraceClient::connect(daemon.grpc_addr()).await.ok()?;
            let req = ObserveRequest { number: LOOK_AT, first: true, ..Default::default() };
            let mut stream = c.observe(req).await.ok()?.into_inner();
            let mut served: Option<Served> = None;
            let mut events = Vec::new();
            // Every phase faults more than LOOK_AT times; a short wait
            // bounds a phase that does not.
            while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                if let Some(ResponseTypes::Fault(e)) = r.response_types {
                    let t = e.time?;
                    let arrived = UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32);
                    let sent = arrived + Duration::from_nanos(e.stages.map_or(e.latency_ns, |s| s.command_sent_ns));
                    let completed = arrived + Duration::from_nanos(e.latency_ns);
                    events.push((e.vcpu, e.ipa, arrived, sent, completed));
                    served = Some(match served {
                        None => Served { sent, completed, events: Vec::new() },
                        Some(s) => Served { sent: s.sent.min(sent), completed: s.completed.min(completed), ..s },
                    });
                }
            }
            served.map(|s| Served { events, ..s })
        });
        if let Some(t) = first {
            return t;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the new daemon served no fault");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The time of a log line (`2026-12-02T01:02:56.261508Z ...`, UTC).
fn log_time(line: &str) -> SystemTime {
    let stamp = line.split_whitespace().next().expect("a timestamp");
    let num = |r: std::ops::Range<usize>| -> i64 { stamp[r].parse().expect("a timestamp field") };
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
    let frac = stamp[20..stamp.len() - 1].to_string();
    let nanos: u64 = format!("{frac:0<9}").parse().expect("fraction");
    UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_nanos(nanos)
}

/// `(mappings, elapsed_us)` of every rebuild in the log.
fn rebuilds(log: &str) -> Vec<(u64, u64)> {
    let field = |l: &str, key: &str| -> u64 {
        l.split_whitespace().find_map(|w| w.strip_prefix(key)).expect("field").parse().expect("number")
    };
    log.lines()
        .filter(|l| l.contains("re-attached: mapping state rebuilt"))
        .map(|l| (field(l, "mappings="), field(l, "elapsed_us=")))
        .collect()
}

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

fn stats_ms(mut d: Vec<Duration>) -> Stats {
    d.sort_unstable();
    let n = d.len();
    let ms = |x: Duration| x.as_secs_f64() * 1e3;
    Stats { p50: ms(d[n / 2]), p99: ms(d[(n * 99 / 100).min(n - 1)]), max: ms(d[n - 1]), n }
}

/// A stall's three rows ([`Stall`]).
fn rows(what: &str, stalls: &[Stall]) {
    row(&format!("{what}: longest fault wait in the guest"), &stats_ms(stalls.iter().map(|s| s.guest).collect()));
    row(&format!("{what}: to the first map sent"), &stats_ms(stalls.iter().map(|s| s.sent).collect()));
    row(&format!("{what}: to its result read"), &stats_ms(stalls.iter().map(|s| s.read).collect()));
    let served_on: Vec<Duration> = stalls.iter().filter_map(|s| s.served_on).collect();
    if !served_on.is_empty() {
        row(&format!("{what}: longest fault wait while the old daemon served on"), &stats_ms(served_on));
    }
    let unstalled: Vec<Duration> = stalls.iter().filter_map(|s| s.unstalled).collect();
    if !unstalled.is_empty() {
        row(&format!("{what}: the same phase with no takeover, longest fault wait"), &stats_ms(unstalled));
    }
}

fn row(what: &str, s: &Stats) {
    println!("| {what} | {:.2} | {:.2} | {:.2} | {} |", s.p50, s.p99, s.max, s.n);
}

/// Pages mapped before the kills and takeovers.
const MAPPED: u64 = 10_000;
/// Random writes per vCPU after each kill or takeover.
const PER_PHASE: u64 = 20;

/// Log lines that mark a restart's steps, in order.
const STEPS: [(&str, &str); 4] = [
    ("daemon started", "memory-manager starting"),
    ("attach socket listening", "attach socket listening"),
    ("VM re-attached", "VM attached"),
    ("records rebuilt", "re-attached: mapping state rebuilt"),
];

/// A restart: the stall and when each of [`STEPS`] happened, after the
/// kill.
struct Restart {
    stall: Stall,
    steps: [Duration; 4],
}

/// Kills the daemon `kills` times under a 1 GiB guest with ~10k mappings:
/// each time with the guest paused, then resumed at once, so its next
/// fault waits from the kill to the successor.
fn restart_stalls(rt: &tokio::runtime::Runtime, vcpus: u64, kills: usize) -> (Vec<Restart>, Vec<(u64, u64)>) {
    let mut daemon = Daemon::start(&["--policy", "4k", "--log-filter", "info"]);
    let file = trace(vcpus, MAPPED, (1 << 30) / PAGE, kills as u64, &[PER_PHASE]);
    let mut m = start_machine(&daemon, vcpus, 1024, &file);
    let (mut restarts, mut served_at) = (Vec::new(), Vec::new());
    for _ in 0..kills {
        let logged = daemon.log().len();
        let killed = SystemTime::now();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.pid() as i32), Signal::SIGKILL);
        m.resume();
        daemon.kill_and_restart(Signal::SIGKILL);
        let served = first_served(rt, &daemon);
        let stall = served.after(killed);
        served_at.push((killed, served.events));
        let log = daemon.log();
        let after = |mark: &str| {
            let line = log[logged..].lines().find(|l| l.contains(mark)).expect("a restart step");
            log_time(line).duration_since(killed).unwrap_or_default()
        };
        restarts.push(Restart { stall, steps: STEPS.map(|(_, mark)| after(mark)) });
        m.wait_paused();
    }
    let mut stalls: Vec<Stall> = restarts.iter().map(|r| r.stall).collect();
    let (guest, slowest) = m.finish();
    let slowest = with_guest(&mut stalls, guest, slowest, Round::Stall);
    print_slow(&format!("restart ({vcpus} vCPUs)"), &stalls, &served_at, &slowest);
    keep_log(&daemon, &format!("restart-{vcpus}"));
    restarts.iter_mut().zip(stalls).for_each(|(r, s)| r.stall = s);
    (restarts, rebuilds(&daemon.log()))
}

/// Random writes per vCPU while the new daemon adopts the records'
/// snapshot, in a takeover of a guest that keeps faulting.
const BUSY_PHASE: u64 = 200;

/// Hands the guest over `takeovers` times: each time the guest, paused, is
/// resumed as the old daemon stops serving (its drain starts), so its next
/// fault waits for the new daemon. `busy`: before that, it also faults
/// while the old daemon serves on and the new one adopts the records'
/// snapshot (resumed as the snapshot goes), so what the old daemon hands
/// over after the drain is a change of a few hundred mappings, not none.
fn takeover_stalls(rt: &tokio::runtime::Runtime, vcpus: u64, takeovers: usize, busy: bool) -> Vec<Stall> {
    let mut daemon = Daemon::start(&["--policy", "4k", "--log-filter", "info"]);
    // Idle, each takeover's phase follows the same phase with no takeover
    // (the control); busy, the phase while the old daemon serves on.
    let (round, per_round): (Round, &[u64]) = if busy {
        (Round::ServedOnThenStall, &[BUSY_PHASE, PER_PHASE])
    } else {
        (Round::ControlThenStall, &[PER_PHASE, PER_PHASE])
    };
    let file = trace(vcpus, MAPPED, (1 << 30) / PAGE, takeovers as u64, per_round);
    let mut m = start_machine(&daemon, vcpus, 1024, &file);
    let (mut stalls, mut served_at, mut samples) = (Vec::new(), Vec::new(), Vec::new());
    // When the old daemon stops serving: its vCPU services start draining.
    const MARK: &str = "draining the VM's vCPU services for the handover";
    // When the old daemon hands the snapshot over and serves on.
    const SNAPSHOT: &str = "handing a snapshot of the records over";
    // Watching the new daemon's threads reads /proc hundreds of times a
    // millisecond, on the cores the stall is measured on: only when asked.
    let watch_threads = ["RESTART_BENCH_THREADS", "RESTART_BENCH_STACKS"].iter().any(|v| std::env::var_os(v).is_some());
    for _ in 0..takeovers {
        if round == Round::ControlThenStall {
            // The control: the same phase, served by the daemon in place.
            m.resume();
            m.wait_paused();
        }
        let log = daemon.log_path();
        let seen = std::fs::metadata(&log).map_or(0, |m| m.len());
        std::thread::scope(|s| {
            let resumer = s.spawn(|| {
                let started = Instant::now();
                let wait_for = |mark: &str| {
                    while !appended(&log, seen).contains(mark) && started.elapsed() < Duration::from_secs(30) {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                };
                if busy {
                    wait_for(SNAPSHOT);
                    m.resume();
                    m.wait_paused();
                }
                wait_for(MARK);
                m.resume();
                if watch_threads {
                    sample_threads(Duration::from_millis(300))
                } else {
                    Vec::new()
                }
            });
            daemon.take_over();
            samples.push(resumer.join().unwrap());
        });
        let log = daemon.log();
        let began = log_time(log.lines().rfind(|l| l.contains(MARK)).expect("a handover"));
        let served = first_served(rt, &daemon);
        stalls.push(served.after(began));
        served_at.push((began, served.events));
        m.wait_paused();
    }
    let (guest, slowest) = m.finish();
    let slowest = with_guest(&mut stalls, guest, slowest, round);
    print_slow(&format!("takeover ({vcpus} vCPUs)"), &stalls, &served_at, &slowest);
    // The new daemon's threads, for the stalls over 20 ms.
    for (i, (stall, (began, changes))) in stalls.iter().zip(served_at.iter().map(|s| s.0).zip(&samples)).enumerate() {
        if stall.guest < Duration::from_millis(20) {
            continue;
        }
        println!("takeover {i}: the new daemon's threads, from the drain's start");
        for c in changes {
            let at = c.at.duration_since(began).map_or(-1.0, |d| d.as_secs_f64() * 1e3);
            println!("  {at:8.2} ms {} {} [{}] {} {}", c.thread, c.state, c.schedstat, c.wchan, c.stack);
        }
    }
    keep_log(&daemon, &format!("takeover-{vcpus}{}", if busy { "-busy" } else { "" }));
    stalls
}

/// What was appended to the file at `path` after its first `from` bytes
/// (read from there: the whole log is not read again at each look).
fn appended(path: &Path, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(from)).and_then(|_| f.read_to_string(&mut out));
    }
    out
}

/// A change in one thread's state, as `/proc` showed it.
struct ThreadChange {
    at: SystemTime,
    thread: String,
    state: String,
    wchan: String,
    /// The kernel stack's top frames, for a thread asleep.
    stack: String,
    /// `schedstat`: ns on a CPU, ns runnable waiting for one, timeslices
    /// (a thread runnable for long: running, or starved?).
    schedstat: String,
}

/// Samples, every 0.5 ms for `span`, the threads of the newest
/// memory-manager started with `--takeover` (the new daemon): each
/// thread's state and wait channel, kept when they change.
fn sample_threads(span: Duration) -> Vec<ThreadChange> {
    let newest = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("memory-manager") && cmd.contains("--takeover")
        })
        .max();
    let Some(pid) = newest else { return Vec::new() };
    let started = Instant::now();
    let mut last = std::collections::HashMap::new();
    let mut runnable_since = std::collections::HashMap::new();
    // gdb stops the daemon while it reads the stacks, which lengthens the
    // very stall it looks at: only when asked (RESTART_BENCH_STACKS=1).
    let mut stacks_taken = std::env::var_os("RESTART_BENCH_STACKS").is_none();
    let mut out = Vec::new();
    while started.elapsed() < span {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
        for t in tasks {
            let dir = t.path();
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default().trim().to_string();
            let comm = read("comm");
            if !(comm.starts_with("fault-service") || comm.starts_with("vm")) {
                continue;
            }
            let stat = read("stat");
            let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).unwrap_or("?");
            let key = format!("{comm}/{}", t.file_name().to_string_lossy());
            let now = (state.to_string(), read("wchan"));
            if now.0 == "R" && comm.starts_with("fault-service") {
                let since = *runnable_since.entry(key.clone()).or_insert_with(Instant::now);
                if !stacks_taken && since.elapsed() > Duration::from_millis(15) {
                    // Runnable this long and no fault served: where is it?
                    stacks_taken = true;
                    out.push(ThreadChange {
                        at: SystemTime::now(),
                        thread: key.clone(),
                        state: "stacks".into(),
                        wchan: String::new(),
                        stack: user_stacks(pid),
                        schedstat: read("schedstat"),
                    });
                }
            } else {
                runnable_since.remove(&key);
            }
            if last.get(&key) != Some(&now) {
                let stack = if now.0 == "R" {
                    String::new()
                } else {
                    read("stack")
                        .lines()
                        .take(4)
                        .map(|l| l.split_whitespace().last().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join(" < ")
                };
                out.push(ThreadChange {
                    at: SystemTime::now(),
                    thread: key.clone(),
                    state: now.0.clone(),
                    wchan: now.1.clone(),
                    stack,
                    schedstat: read("schedstat"),
                });
                last.insert(key, now);
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    out
}

/// Every thread's user-space stack in `pid` (gdb, if installed).
fn user_stacks(pid: u32) -> String {
    let out = std::process::Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "thread apply all bt 30"])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with('#') || l.starts_with("Thread"))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("gdb: {e}"),
    }
}

/// Keeps the daemons' log as `$RESTART_BENCH_LOG.<what>`, if asked to.
fn keep_log(daemon: &Daemon, what: &str) {
    if let Ok(path) = std::env::var("RESTART_BENCH_LOG") {
        std::fs::write(format!("{path}.{what}"), daemon.log()).unwrap();
    }
}

/// Where the time went in each stall over 5 ms: the guest's slowest fault
/// of the phase (posted, and on the fault ring, after the stall began) and
/// the first faults the new daemon served (arrived, map sent, result read).
fn print_slow(what: &str, stalls: &[Stall], served_at: &[(SystemTime, Events)], slowest: &[serde_json::Value]) {
    let ms = |t: SystemTime, from: SystemTime| match t.duration_since(from) {
        Ok(d) => format!("{:.2}", d.as_secs_f64() * 1e3),
        Err(e) => format!("-{:.2}", e.duration().as_secs_f64() * 1e3),
    };
    for (i, ((began, events), (stall, f))) in served_at.iter().zip(stalls.iter().zip(slowest)).enumerate() {
        if stall.guest < Duration::from_millis(5) {
            continue;
        }
        let at = |field: &str| UNIX_EPOCH + Duration::from_nanos(f[field].as_u64().unwrap_or(0));
        println!(
            "{what} {i}: guest waited {:.2} ms on vCPU {} GPA {:#x}, posted at {} ms, on the ring at {} ms",
            stall.guest.as_secs_f64() * 1e3,
            f["vcpu"],
            f["gpa"].as_u64().unwrap_or(0),
            ms(at("posted_unix_ns"), *began),
            ms(at("pushed_unix_ns"), *began)
        );
        for (vcpu, ipa, arrived, sent, read) in events {
            println!(
                "  vCPU {vcpu} IPA {ipa:#x}: arrived {} sent {} read {} ms",
                ms(*arrived, *began),
                ms(*sent, *began),
                ms(*read, *began)
            );
        }
    }
}

/// Rebuild time per mapping for a guest with `pages` 4 KiB mappings.
fn rebuild_per_mapping(pages: u64, restarts: usize) -> Vec<(u64, u64)> {
    let mut daemon = Daemon::start(&["--policy", "4k", "--log-filter", "info"]);
    let ram_mib = (pages * PAGE).div_ceil(2 << 20) * 2 + 2;
    let file = trace(1, pages, pages, 1, &[0]);
    let m = start_machine(&daemon, 1, ram_mib, &file);
    for _ in 0..restarts {
        let before = rebuilds(&daemon.log()).len();
        daemon.kill_and_restart(Signal::SIGKILL);
        let started = Instant::now();
        while rebuilds(&daemon.log()).len() == before {
            assert!(started.elapsed() < Duration::from_secs(300), "no rebuild");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let _ = m.finish();
    rebuilds(&daemon.log())
}

fn main() {
    let _ = binary("memory-manager");
    let rt = runtime();
    // Fewer for a quick look: RESTART_BENCH_KILLS=5 (the 1M-mapping rebuild
    // is then skipped); RESTART_BENCH_ONLY=restart|takeover|rebuild for one
    // part; RESTART_BENCH_VCPUS=4 for one vCPU count; RESTART_BENCH_LOG=path
    // keeps the takeover daemons' log (path.takeover-<vCPUs>);
    // RESTART_BENCH_THREADS=1 prints the new daemon's thread states in each
    // takeover stall over 20 ms (sampled from /proc, which takes CPU from
    // the stall); RESTART_BENCH_STACKS=1 adds gdb's stacks of a new daemon
    // whose service thread runs 15 ms without serving (gdb stops it
    // meanwhile).
    let kills: usize = std::env::var("RESTART_BENCH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let only = std::env::var("RESTART_BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only == name;
    let vcpu_counts: Vec<u64> = match std::env::var("RESTART_BENCH_VCPUS") {
        Ok(v) => v.split(',').map(|n| n.parse().expect("RESTART_BENCH_VCPUS: numbers")).collect(),
        Err(_) => vec![1, 4],
    };
    println!("| stall | p50 ms | p99 ms | max ms | n |");
    println!("| --- | --- | --- | --- | --- |");
    let mut rebuilt_10k = Vec::new();
    let mut steps = Vec::new();
    for &vcpus in vcpu_counts.iter().filter(|_| part("restart")) {
        let (restarts, rebuilt) = restart_stalls(&rt, vcpus, kills);
        let what = format!("restart (SIGKILL), 1 GiB guest, ~10k mappings, {vcpus} vCPU");
        rows(&what, &restarts.iter().map(|r| r.stall).collect::<Vec<_>>());
        rebuilt_10k.extend(rebuilt);
        steps.extend(restarts);
    }
    for &vcpus in vcpu_counts.iter().filter(|_| part("takeover")) {
        let stalls = takeover_stalls(&rt, vcpus, kills, false);
        rows(&format!("takeover, 1 GiB guest, ~10k mappings, {vcpus} vCPU"), &stalls);
        let stalls = takeover_stalls(&rt, vcpus, kills, true);
        rows(&format!("takeover, 1 GiB guest, ~10k mappings, {vcpus} vCPU faulting throughout"), &stalls);
    }
    if !steps.is_empty() {
        println!();
        println!("| restart step, after the kill | p50 ms | p99 ms | max ms | n |");
        println!("| --- | --- | --- | --- | --- |");
        for (i, (name, _)) in STEPS.iter().enumerate() {
            row(name, &stats_ms(steps.iter().map(|r| r.steps[i]).collect()));
        }
        row("first map sent", &stats_ms(steps.iter().map(|r| r.stall.sent).collect()));
        row("its result read", &stats_ms(steps.iter().map(|r| r.stall.read).collect()));
    }
    println!();
    println!("| rebuild | mappings (mean) | p50 us/mapping | p99 us/mapping | total ms (mean) | n |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let per = |r: &[(u64, u64)], what: &str| {
        if r.is_empty() {
            return;
        }
        let mut us: Vec<f64> = r.iter().map(|(m, e)| *e as f64 / (*m).max(1) as f64).collect();
        us.sort_by(f64::total_cmp);
        let n = us.len();
        let mean_m = r.iter().map(|x| x.0).sum::<u64>() / n as u64;
        let mean_ms = r.iter().map(|x| x.1).sum::<u64>() as f64 / n as f64 / 1e3;
        println!(
            "| {what} | {mean_m} | {:.3} | {:.3} | {mean_ms:.1} | {n} |",
            us[n / 2],
            us[(n * 99 / 100).min(n - 1)]
        );
    };
    per(&rebuilt_10k, "during the restart runs (~10k)");
    if part("rebuild") {
        per(&rebuild_per_mapping(10_000, 10), "10k mappings, idle guest");
        if kills >= 50 {
            per(&rebuild_per_mapping(1_000_000, 3), "1M mappings, idle guest");
        }
    }
}
