//! Helpers for whole-system tests: build and start the real binaries.

pub mod conformance;
pub mod uffd;

use std::io::{BufRead, BufReader, Lines, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The workspace's target directory for this build profile (where cargo
/// puts the binaries next to this test's `deps/`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

/// Path of a workspace binary, built first (once per test process).
pub fn binary(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let dir = bin_dir();
        let profile_release = dir.file_name().is_some_and(|n| n == "release");
        let target_dir = dir.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "memory-manager",
            "-p",
            "sim-machine",
            "-p",
            "faultline",
            "-p",
            "qemu-machine",
            "-p",
            "faultline-policies",
            "--bins",
            "--target-dir",
        ])
        .arg(&target_dir);
        // Cargo describes the test's own package to the test process
        // (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...). Passed on, that reads
        // as a changed environment to build scripts that watch it (ring's),
        // and every first build after `cargo test` rebuilt the TLS stack
        // and all above it (11 s here) for nothing.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(describes_the_test_package) {
                cmd.env_remove(key);
            }
        }
        if profile_release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the daemon, machines and policy binaries failed");
    });
    bin_dir().join(name)
}

/// Whether `var` is one of what Cargo sets to describe the package being
/// built or tested (not the user's own Cargo settings).
fn describes_the_test_package(var: &str) -> bool {
    const PREFIXES: [&str; 4] = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_"];
    PREFIXES.iter().any(|p| var.starts_with(p)) || matches!(var, "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR")
}

/// The environment variable that arms a daemon's crash point (the
/// daemon's `fault::failpoint::CRASH_AT_ENV`): `name` or `name:N`.
pub const CRASH_AT_ENV: &str = "FAULTLINE_CRASH_AT";

/// The environment variable that makes the daemon panic once at a named
/// point (the daemon's `fault::failpoint::PANIC_AT_ENV`): `name` or `name:N`.
pub const PANIC_AT_ENV: &str = "FAULTLINE_PANIC_AT";

/// What a daemon logs once its gRPC API listens (its address follows).
const GRPC_LISTENING: &str = "gRPC listening addr=";

/// A running daemon, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Child,
    /// Its attach socket.
    pub socket: PathBuf,
    args: Vec<String>,
    env: Vec<(String, std::ffi::OsString)>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `memory-manager` with `args` and waits for its socket.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("attach.sock");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, std::ffi::OsString)> =
            env.iter().map(|(k, v)| (k.to_string(), v.to_os_string())).collect();
        let child = Self::spawn(dir.path(), &socket, &args, &env);
        let d = Self { child, socket, args, env, _dir: dir };
        d.wait_for_socket();
        d
    }

    fn spawn(dir: &Path, socket: &Path, args: &[String], env: &[(String, std::ffi::OsString)]) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daemon.log")).expect("log file");
        let mut cmd = Command::new(binary("memory-manager"));
        cmd.arg("--attach-socket").arg(socket);
        // Ephemeral ports, so tests can run side by side.
        if !args.iter().any(|a| a == "--grpc-listen") {
            cmd.args(["--grpc-listen", "127.0.0.1:0"]);
        }
        if !args.iter().any(|a| a == "--metrics-listen") {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        if !args.iter().any(|a| a == "--state-dir") {
            cmd.arg("--state-dir").arg(dir.join("state"));
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.args(args).stdout(Stdio::null()).stderr(log).spawn().expect("starting memory-manager")
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            assert!(Instant::now() < deadline, "daemon did not create its socket");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the daemon with `signal`, reaps it, and starts a new one with
    /// the same arguments, socket and state directory (a supervisor's
    /// restart). Returns when the new one listens.
    pub fn kill_and_restart(&mut self, signal: Signal) {
        let starts = self.api_starts();
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        self.child = Self::spawn(self._dir.path(), &self.socket, &self.args, &self.env);
        self.wait_for_socket();
        self.wait_for_api(starts, "the restarted daemon");
    }

    /// How many daemons of this fixture have listened on their API so far.
    fn api_starts(&self) -> usize {
        self.log().matches(GRPC_LISTENING).count()
    }

    /// Waits until one more daemon than `starts` listens on its API
    /// ([`Daemon::grpc_addr`] then names the new one's port).
    fn wait_for_api(&self, starts: usize, who: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.api_starts() == starts {
            assert!(Instant::now() < deadline, "{who} never listened: {}", self.log());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Starts a new daemon that takes every VM over from this one (`--takeover`)
    /// and waits until the old one has handed everything over and exited.
    pub fn take_over(&mut self) {
        let starts = self.api_starts();
        // The default: next to the attach socket.
        let takeover = self.socket.with_file_name("takeover.sock");
        let mut args = self.args.clone();
        args.extend(["--takeover".to_string(), takeover.display().to_string()]);
        let new = Self::spawn(self._dir.path(), &self.socket, &args, &self.env);
        let status = self.child.wait().expect("waiting for the old daemon");
        assert!(status.success(), "the old daemon did not hand over cleanly: {status:?}\n{}", self.log());
        self.child = new;
        self.wait_for_api(starts, "the new daemon");
    }

    /// Waits for the daemon to end by itself (a crash point aborted it),
    /// then starts a new one as [`Daemon::kill_and_restart`] does, without
    /// the environment variable `unset`.
    pub fn restart_after_exit(&mut self, unset: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.child.try_wait().expect("polling the daemon").is_none() {
            assert!(Instant::now() < deadline, "the daemon never reached its crash point: {}", self.log());
            std::thread::sleep(Duration::from_millis(5));
        }
        self.env.retain(|(k, _)| k != unset);
        self.kill_and_restart(Signal::SIGKILL);
    }

    /// The daemon's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self._dir.path().join("state")
    }

    /// The gRPC address the daemon logged once it was listening.
    pub fn grpc_addr(&self) -> String {
        format!("http://{}", self.logged_addr(GRPC_LISTENING))
    }

    /// The daemon's gRPC Unix socket (its default, next to the attach
    /// socket): it serves every call, those that change the daemon included.
    pub fn grpc_socket(&self) -> PathBuf {
        self.socket.with_file_name("grpc.sock")
    }

    /// [`Daemon::grpc_socket`] as a client address (`unix:PATH`), once the
    /// daemon serves it.
    pub fn grpc_unix_addr(&self) -> String {
        self.logged_addr(GRPC_LISTENING);
        format!("unix:{}", self.grpc_socket().display())
    }

    /// Faults this daemon instance has recorded (ServerStatus's
    /// `seen_events`), over a fresh connection.
    pub async fn seen_events(&self) -> u64 {
        use faultline_proto::v1::fault_trace_client::FaultTraceClient;
        let mut c = FaultTraceClient::connect(self.grpc_addr()).await.expect("connecting to FaultTrace");
        let status = c.server_status(faultline_proto::v1::ServerStatusRequest {}).await.expect("ServerStatus");
        status.into_inner().seen_events
    }

    /// A channel to the daemon's gRPC Unix socket: every call, mutating
    /// ones included (plain TCP serves observation only).
    pub async fn unix_channel(&self) -> tonic::transport::Channel {
        // The socket is bound before the TCP listener logs its address.
        self.logged_addr(GRPC_LISTENING);
        let address = faultline_proto::client::Address::Unix(self.grpc_socket());
        faultline_proto::client::connect(&address, &Default::default())
            .await
            .expect("connecting to the gRPC Unix socket")
    }

    /// The `host:port` of the Prometheus endpoint the daemon logged.
    pub fn metrics_addr(&self) -> String {
        self.logged_addr("metrics listening addr=")
    }

    fn logged_addr(&self, marker: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            // The latest: a restarted daemon listens on new ports.
            if let Some(line) = log.lines().rev().find(|l| l.contains(marker)) {
                let addr = line.split(marker).nth(1).expect("addr field").split_whitespace().next().unwrap();
                return addr.trim_matches('"').to_string();
            }
            assert!(Instant::now() < deadline, "daemon never logged {marker:?}: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where every daemon started in this fixture logs (appended).
    pub fn log_path(&self) -> PathBuf {
        self._dir.path().join("daemon.log")
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        self.child.wait().expect("waiting for the daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        // A daemon that cannot stop (the failure a test found) must not
        // hang the test run: killed after a grace period.
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running policy service (one of `services/policies`' binaries),
/// killed on drop.
pub struct PolicyProcess {
    child: Child,
    /// Where it serves MemoryPolicy (`http://127.0.0.1:PORT`).
    pub endpoint: String,
}

impl PolicyProcess {
    /// Starts `bin` (e.g. `policy-sequential`) on an ephemeral port with
    /// `args`, and waits for the address it prints.
    pub fn start(bin: &str, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(binary(bin))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).expect("reading the policy's address");
        let endpoint =
            line.trim().strip_prefix("LISTENING ").unwrap_or_else(|| panic!("{bin} said {line:?}")).to_string();
        Self { child, endpoint }
    }

    /// Process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signalling the policy");
    }
}

impl Drop for PolicyProcess {
    fn drop(&mut self) {
        let _ = kill(self.pid(), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `sim-machine` read up to a hold: with `--hold-before-detach`
/// ([`HeldMachine::start`]) its workload is done and the VM still
/// attached, so what the daemon holds of it can be read until
/// [`HeldMachine::release`]; with `--hold-before-run`
/// ([`HeldMachine::before_run`]) the VM is attached and its workload not
/// yet started.
pub struct HeldMachine {
    child: Child,
    /// What the machine said on stderr before the hold.
    pub said: String,
}

impl HeldMachine {
    /// Runs `machine` (a [`machine`] command with its arguments) with
    /// `--hold-before-detach` until it holds; panics if it ends first.
    pub fn start(machine: Command) -> Self {
        Self::held(machine, "--hold-before-detach", "holding before detach")
    }

    /// Runs `machine` with `--hold-before-run` until it holds, attached;
    /// panics if it ends first.
    pub fn before_run(machine: Command) -> Self {
        Self::held(machine, "--hold-before-run", "holding before the run")
    }

    fn held(mut machine: Command, flag: &str, hold: &str) -> Self {
        let mut child = machine
            .arg(flag)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting sim-machine");
        let mut said = String::new();
        for line in BufReader::new(child.stderr.take().expect("stderr")).lines() {
            let line = line.expect("reading the machine's stderr");
            if line.contains(hold) {
                return Self { child, said };
            }
            said += &line;
            said.push('\n');
        }
        let out = child.wait_with_output().expect("waiting for the machine");
        panic!("the machine ended before holding ({}): {said}", out.status);
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets it go on to its end (held before its run: the workload, then
    /// the detach) and exit; its output.
    pub fn release(mut self) -> Output {
        writeln!(self.child.stdin.take().expect("stdin")).expect("telling the machine");
        self.child.wait_with_output().expect("waiting for the machine")
    }
}

/// The `sim-machine` command for `daemon`, ready for more arguments.
pub fn machine(daemon: &Daemon) -> Command {
    let mut cmd = Command::new(binary("sim-machine"));
    cmd.arg("--attach-socket").arg(&daemon.socket);
    cmd
}

/// Runs `cmd` (a `sim-machine` command with `--latencies`) and returns each
/// fault's round trip as the vCPU saw it, ns; panics with its stderr if it
/// fails.
pub fn fault_latencies(mut cmd: Command) -> Vec<u64> {
    let out = cmd.arg("--latencies").output().expect("running sim-machine");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sim-machine prints JSON");
    v["latencies_ns"].as_array().expect("latencies_ns").iter().map(|x| x.as_u64().expect("ns")).collect()
}

/// Runs a machine to completion; panics with its stderr if it fails.
pub fn run_machine(mut cmd: Command) -> serde_json::Value {
    let Output { status, stdout, stderr } = cmd.output().expect("running sim-machine");
    assert!(status.success(), "sim-machine failed: {}", String::from_utf8_lossy(&stderr));
    serde_json::from_slice(&stdout).expect("sim-machine prints JSON")
}

/// A `sim-machine` replaying a trace with pauses (`PAUSE` lines), its
/// stdin, stdout and stderr piped: a line on `stdin` lets it go on after a
/// pause, and `lines`, its stderr, says when it paused.
pub struct TracedMachine {
    /// The process (its stdout holds the summary at the end).
    pub child: Child,
    /// A line lets it go on after a pause; closing it lets it run to the end.
    pub stdin: ChildStdin,
    /// Its stderr.
    pub lines: Lines<BufReader<ChildStderr>>,
}

impl TracedMachine {
    /// `sim-machine` attached to `daemon` with `args`, replaying `trace`.
    pub fn spawn(daemon: &Daemon, args: &[&str], trace: &Path) -> Self {
        let mut child = machine(daemon)
            .args(args)
            .arg("--trace")
            .arg(trace)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting sim-machine");
        let stdin = child.stdin.take().expect("piped stdin");
        let lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        Self { child, stdin, lines }
    }

    /// Waits until it says it paused after phase `phase`.
    pub fn wait_paused(&mut self, phase: usize) {
        wait_paused(&mut self.lines, phase);
    }

    /// Lets it go on after a pause.
    pub fn resume(&mut self) {
        writeln!(self.stdin).expect("writing to the machine's stdin");
    }
}

/// Reads a `sim-machine`'s stderr until it says it paused after phase
/// `phase` (a `PAUSE` line of its trace); panics if it ends first.
pub fn wait_paused(lines: &mut impl Iterator<Item = std::io::Result<String>>, phase: usize) {
    let mut said = String::new();
    for line in lines.by_ref() {
        let line = line.expect("reading the machine's stderr");
        if line.contains(&format!("paused after phase {phase}")) {
            return;
        }
        said.push_str(&line);
        said.push('\n');
    }
    panic!("machine ended before pausing after phase {phase}; it said:\n{said}");
}

/// `GET /metrics` from the daemon's endpoint at `addr` over a plain TCP
/// connection: the OpenMetrics text.
pub fn scrape_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    body.to_string()
}

/// Samples of an exposition text: `name{labels}` -> value.
pub fn metric_samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// A `/proc/<pid>/status` memory figure (`VmRSS`, `RssAnon`, ...), KiB;
/// 0 if the process is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `f` with the calling thread held to `cpus`, so that the processes
/// it starts inherit them; the thread's own CPUs come back after. `cpus`
/// are positions among the CPUs the thread may run on (0: the first of
/// them), so a bench held to CPUs 2-3 splits those.
pub fn on_cpus<T>(cpus: std::ops::Range<usize>, f: impl FnOnce() -> T) -> T {
    let before = thread_cpus();
    let allowed = cpus_in(&before);
    let mut held = CpuSet::new();
    for i in cpus {
        let cpu = *allowed.get(i).unwrap_or_else(|| panic!("CPU #{i}: this thread may run on {allowed:?} only"));
        held.set(cpu).expect("a CPU of the thread's own set");
    }
    set_thread_cpus(&held);
    let result = f();
    set_thread_cpus(&before);
    result
}

/// The CPUs the calling thread may run on.
fn thread_cpus() -> CpuSet {
    sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity")
}

/// The CPUs in `set`, lowest first.
fn cpus_in(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect()
}

/// Holds the calling thread to `set`.
fn set_thread_cpus(set: &CpuSet) {
    sched_setaffinity(Pid::from_raw(0), set).expect("sched_setaffinity");
}

#[cfg(test)]
mod tests {
    use super::{cpus_in, describes_the_test_package, on_cpus, thread_cpus};

    #[test]
    fn the_builds_of_the_binaries_drop_the_test_package_and_keep_the_users_cargo_settings() {
        for var in ["CARGO_PKG_NAME", "CARGO_MANIFEST_DIR", "CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE"] {
            assert!(describes_the_test_package(var), "{var}");
        }
        for var in ["CARGO", "CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_BUILD_JOBS", "CARGO_INCREMENTAL", "PATH"] {
            assert!(!describes_the_test_package(var), "{var}");
        }
    }

    #[test]
    fn a_thread_held_to_one_cpu_runs_on_its_first_and_gets_its_cpus_back() {
        let before = cpus_in(&thread_cpus());
        let held = cpus_in(&on_cpus(0..1, thread_cpus));
        assert_eq!(held, [before[0]], "the first CPU it may run on, alone");
        assert_eq!(cpus_in(&thread_cpus()), before, "its CPUs back");
    }
}
