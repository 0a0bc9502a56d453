//! Waits on the fault path that may take a while (a policy consult, a
//! reclaim), said aloud: the thread running a fault tells whoever runs it
//! (the service pool, `link::pool`), which lets another thread serve the
//! other rings meanwhile. On a thread with no [`Blocker`] (a connection's
//! own thread, a test) nothing is told.

use std::cell::RefCell;

/// Told when its thread is about to block and when it is done.
pub trait Blocker {
    /// Before the wait.
    fn enter(&self);
    /// After it, also when it unwinds.
    fn leave(&self);
}

thread_local! {
    static BLOCKER: RefCell<Option<Box<dyn Blocker>>> = const { RefCell::new(None) };
}

/// Makes `blocker` the one this thread tells, for as long as it runs.
pub fn set_blocker(blocker: Box<dyn Blocker>) {
    BLOCKER.with(|b| *b.borrow_mut() = Some(blocker));
}

/// Runs `f`, which may block for a while, telling this thread's blocker
/// (if any) before and after.
pub fn block_in_place<R>(f: impl FnOnce() -> R) -> R {
    let told = BLOCKER.with(|b| b.borrow().as_ref().map(|b| b.enter()).is_some());
    let _left = told.then_some(Left);
    f()
}

/// Tells this thread's blocker that the wait is over when it drops.
struct Left;

impl Drop for Left {
    fn drop(&mut self) {
        BLOCKER.with(|b| {
            if let Some(b) = b.borrow().as_ref() {
                b.leave();
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use super::Blocker;

    /// A blocker that logs what it is told.
    #[derive(Clone, Default)]
    pub struct Logged(pub Arc<Mutex<Vec<&'static str>>>);

    impl Blocker for Logged {
        fn enter(&self) {
            self.0.lock().unwrap().push("enter");
        }
        fn leave(&self) {
            self.0.lock().unwrap().push("leave");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Logged;
    use super::*;

    #[test]
    fn a_wait_is_told_before_and_after_even_when_it_unwinds_and_not_without_a_blocker() {
        assert_eq!(block_in_place(|| 7), 7, "no blocker: just runs");
        let log = Logged::default();
        set_blocker(Box::new(log.clone()));
        assert_eq!(block_in_place(|| log.0.lock().unwrap().clone()), ["enter"], "told before the wait");
        assert_eq!(*log.0.lock().unwrap(), ["enter", "leave"]);
        let unwound =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block_in_place(|| panic!("the wait failed"))));
        assert!(unwound.is_err());
        assert_eq!(*log.0.lock().unwrap(), ["enter", "leave", "enter", "leave"]);
    }
}
