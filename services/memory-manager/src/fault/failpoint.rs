//! Failures a test can inject into the pipeline after the pin is taken, to
//! show no early return leaks it. Production passes [`NoFailures`], whose
//! check is a constant that compiles to nothing.

/// A place after pinning where a test may fail a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failpoint {
    /// Right after the pin is taken (populating the pages).
    Populate,
    /// Computing permissions.
    Permissions,
    /// Building the command.
    Command,
}

/// Which failpoints fail.
pub trait Failpoints {
    /// True if the pipeline must fail at `point`.
    fn fails_at(&self, point: Failpoint) -> bool;

    /// `Err(point)` if the pipeline must fail at `point` (a
    /// [`super::error::PipelineError::Injected`] by `?`).
    #[inline(always)]
    fn check(&self, point: Failpoint) -> Result<(), Failpoint> {
        if self.fails_at(point) {
            return Err(point);
        }
        Ok(())
    }
}

/// No failure anywhere: production.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFailures;

impl Failpoints for NoFailures {
    #[inline(always)]
    fn fails_at(&self, _point: Failpoint) -> bool {
        false
    }
}

/// Fails at one point (tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailAt(pub Failpoint);

impl Failpoints for FailAt {
    fn fails_at(&self, point: Failpoint) -> bool {
        self.0 == point
    }
}

/// The environment variable that arms a crash point: `NAME`, or `NAME:N`
/// to crash the N-th time the point is reached.
pub const CRASH_AT_ENV: &str = "FAULTLINE_CRASH_AT";

/// The environment variable that arms a panic point, as [`CRASH_AT_ENV`]
/// arms a crash point.
pub const PANIC_AT_ENV: &str = "FAULTLINE_PANIC_AT";

/// An armed point: the name in an environment variable, and which reach
/// of it fires.
struct Armed {
    spec: std::sync::OnceLock<Option<(String, u64)>>,
    reached: std::sync::atomic::AtomicU64,
}

impl Armed {
    const fn new() -> Self {
        Self { spec: std::sync::OnceLock::new(), reached: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Whether reaching `point` now fires what `env` armed.
    fn fires(&self, env: &str, point: &str) -> bool {
        let armed = self.spec.get_or_init(|| {
            let spec = std::env::var(env).ok()?;
            let (name, nth) = spec.split_once(':').unwrap_or((spec.as_str(), "1"));
            Some((name.to_string(), nth.parse().unwrap_or(1)))
        });
        armed.as_ref().is_some_and(|(name, nth)| {
            name == point && self.reached.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == *nth
        })
    }
}

/// Aborts the process at `point` if [`CRASH_AT_ENV`] names it: tests of a
/// daemon killed at a precise moment (between two steps that must survive
/// a crash in either order). Unarmed, it costs one atomic load.
pub fn crash_point(point: &'static str) {
    static ARMED: Armed = Armed::new();
    if ARMED.fires(CRASH_AT_ENV, point) {
        eprintln!("{CRASH_AT_ENV}: aborting at {point}");
        std::process::abort();
    }
}

/// Panics (once) at `point` if [`PANIC_AT_ENV`] names it: tests that a
/// panic in one VM's service is contained to that VM.
pub fn panic_point(point: &'static str) {
    static ARMED: Armed = Armed::new();
    if ARMED.fires(PANIC_AT_ENV, point) {
        panic!("{PANIC_AT_ENV}: panicking at {point}");
    }
}
