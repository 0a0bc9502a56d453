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
