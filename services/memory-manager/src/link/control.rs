//! The control ring pair: commands the daemon starts itself rather than in
//! answer to a fault (write-protect to re-arm dirty logging, unmap for
//! reclaim, the leaf and ownership reports a re-attach rebuilds from). One
//! thread per VM owns the pair; callers hand it commands over a channel
//! through a [`ControlClient`] and block until the core's result arrives or
//! a deadline passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

use faultline_attach::doorbell::{push_and_ring, WaitPolicy};
use faultline_attach::wait::{WaitCounts, Waiter};
use hyp_core::addr::Ipa;
use hyp_core::reject::Reject;
use hyp_core::ring::abi::{kind, CommandRecord, LeafRecord, ResultRecord};
use hyp_core::ring::{Consumer, Producer, RingError};
use tracing::warn;

/// How long a caller waits for the core to answer a control command.
pub const CONTROL_DEADLINE: Duration = Duration::from_secs(5);

/// Why a control command did not complete.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The VM's control thread is not running (detached, or not yet attached).
    #[error("the VM's control channel is closed")]
    Closed,
    /// Commands are already waiting for a core that has stopped answering.
    #[error("control commands are queued behind one the core has not answered")]
    Busy,
    /// The core did not answer within the deadline.
    #[error("the core did not answer within {0:?}")]
    Timeout(Duration),
    /// The core refused the command.
    #[error("the core refused the command: {reason:?} (code {code}, detail {detail:#x})")]
    Refused {
        /// Reject code.
        code: u32,
        /// Decoded reason, if known.
        reason: Option<Reject>,
        /// The result's detail word.
        detail: u64,
    },
}

/// What the core sent back for a command: its result, and the leaf
/// records before it (LEAVES only).
#[derive(Debug)]
struct Answer {
    result: ResultRecord,
    leaves: Vec<LeafRecord>,
}

impl Answer {
    /// Nothing yet (a result record of kind 0 is not a result).
    fn pending() -> Self {
        Self { result: ResultRecord::default(), leaves: Vec::new() }
    }
}

struct Request {
    cmds: Vec<CommandRecord>,
    reply: SyncSender<Vec<Answer>>,
}

/// Commands of one batch in flight at most (half a small ring): the core
/// answers while more are sent, and its results never fill their ring.
const WINDOW: u32 = 16;

/// The handle callers use; cheap to share.
#[derive(Debug, Default)]
pub struct ControlClient {
    tx: Mutex<Option<SyncSender<Request>>>,
}

impl ControlClient {
    /// Opens the channel: returns the receiving end for [`ControlLoop`].
    /// A second call replaces the first channel.
    pub fn open(&self) -> ControlInbox {
        let (tx, rx) = mpsc::sync_channel(16);
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        ControlInbox(rx)
    }

    /// Closes the channel: later calls fail with [`ControlError::Closed`].
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Write-protects `[ipa, ipa + len)` in stage 2; returns the core's result.
    pub fn write_protect(&self, ipa: Ipa, len: u64) -> Result<ResultRecord, ControlError> {
        self.execute(CommandRecord { kind: kind::WRITE_PROTECT, ipa: ipa.raw(), size: len, ..Default::default() })
    }

    /// The leaves installed in `[ipa, ipa + len)` from the first the core
    /// reports on: as many as fit the result ring, and the result, whose
    /// `detail` says where to ask next. The leaves are the core's word:
    /// the caller checks them.
    pub fn leaves(&self, ipa: Ipa, len: u64) -> Result<(Vec<LeafRecord>, ResultRecord), ControlError> {
        let cmd = CommandRecord { kind: kind::LEAVES, ipa: ipa.raw(), size: len, ..Default::default() };
        self.ask(cmd).map(|a| (a.leaves, a.result))
    }

    /// Sends `cmd` (its `cmd_id` is assigned by the loop) and waits for the
    /// result, at most [`CONTROL_DEADLINE`].
    pub fn execute(&self, cmd: CommandRecord) -> Result<ResultRecord, ControlError> {
        self.ask(cmd).map(|a| a.result)
    }

    /// Sends `cmds` as one batch, several in flight at once, and waits for
    /// all their results (at most [`CONTROL_DEADLINE`] in all): one result
    /// or refusal per command, in order.
    pub fn execute_all(
        &self,
        cmds: Vec<CommandRecord>,
    ) -> Result<Vec<Result<ResultRecord, ControlError>>, ControlError> {
        Ok(self.ask_all(cmds)?.into_iter().map(|a| refused(a.result)).collect())
    }

    fn ask(&self, cmd: CommandRecord) -> Result<Answer, ControlError> {
        let answer = self.ask_all(vec![cmd])?.pop().ok_or(ControlError::Closed)?;
        refused(answer.result)?;
        Ok(answer)
    }

    /// Sends `cmds` as one batch, as [`Self::execute_all`] does, without
    /// waiting: the caller collects the results later ([`Pending::results`])
    /// and may sleep meanwhile instead of waking twice.
    pub fn submit_all(&self, cmds: Vec<CommandRecord>) -> Result<Pending, ControlError> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(ControlError::Closed)?;
        let (reply, answer) = mpsc::sync_channel(1);
        // Never block: a core that stopped answering must not hold callers.
        tx.try_send(Request { cmds, reply }).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => ControlError::Busy,
            mpsc::TrySendError::Disconnected(_) => ControlError::Closed,
        })?;
        Ok(Pending(answer))
    }

    fn ask_all(&self, cmds: Vec<CommandRecord>) -> Result<Vec<Answer>, ControlError> {
        self.submit_all(cmds)?.answers()
    }
}

/// A batch sent by [`ControlClient::submit_all`], its results to come.
#[derive(Debug)]
#[must_use = "the batch runs anyway; its results are only read through this"]
pub struct Pending(Receiver<Vec<Answer>>);

impl Pending {
    /// Waits for the batch's results, at most [`CONTROL_DEADLINE`] from
    /// now: one result or refusal per command, in order.
    pub fn results(self) -> Result<Vec<Result<ResultRecord, ControlError>>, ControlError> {
        Ok(self.answers()?.into_iter().map(|a| refused(a.result)).collect())
    }

    fn answers(self) -> Result<Vec<Answer>, ControlError> {
        self.0.recv_timeout(CONTROL_DEADLINE).map_err(|e| match e {
            RecvTimeoutError::Timeout => ControlError::Timeout(CONTROL_DEADLINE),
            RecvTimeoutError::Disconnected => ControlError::Closed,
        })
    }
}

/// A result, or the refusal it carries.
fn refused(res: ResultRecord) -> Result<ResultRecord, ControlError> {
    if res.status != 0 {
        return Err(ControlError::Refused {
            code: res.status,
            reason: Reject::from_code(res.status),
            detail: res.detail,
        });
    }
    Ok(res)
}

/// The receiving end of a [`ControlClient`].
#[derive(Debug)]
pub struct ControlInbox(Receiver<Request>);

/// Serves the control ring pair: one command in flight at a time.
pub struct ControlLoop<'r> {
    inbox: ControlInbox,
    commands: Producer<'r>,
    results: Consumer<'r>,
    next_cmd: u64,
}

impl<'r> ControlLoop<'r> {
    /// A loop producing `commands` and consuming `results` (the control
    /// pair's command ring and fault ring).
    pub fn new(inbox: ControlInbox, commands: Producer<'r>, results: Consumer<'r>) -> Self {
        // Control command ids have the top bit set, never a vCPU's, and this
        // daemon's tag, never a predecessor's.
        Self { inbox, commands, results, next_cmd: 1 << 63 | super::instance_tag() << 48 }
    }

    /// Runs until `stop` is set or the peer breaks the ring protocol. Each
    /// result is passed to `settled` before the caller hears of it. Results
    /// are waited for as the vCPUs' faults are ([`Waiter`]): a spin only
    /// while spinning pays off and no other thread wants the CPU (a monitor
    /// sampling every 5 ms, or a reclaim's batches, must not spin against
    /// the vCPUs on a full host).
    pub fn run(
        mut self,
        wait: WaitPolicy,
        stop: &AtomicBool,
        mut settled: impl FnMut(&ResultRecord),
    ) -> Result<(), RingError> {
        let counts = WaitCounts::default();
        let mut waiter = Waiter::new(wait, &counts);
        while !stop.load(Ordering::Acquire) {
            let Request { mut cmds, reply } = match self.inbox.0.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let first = self.next_cmd + 1;
            for cmd in &mut cmds {
                self.next_cmd += 1;
                cmd.cmd_id = self.next_cmd;
            }
            let window = WINDOW.min(self.commands.view().capacity() / 2).max(1) as usize;
            let mut answers: Vec<Option<Answer>> = cmds.iter().map(|_| None).collect();
            let (mut sent, mut answered) = (0, 0);
            while answered < cmds.len() {
                while sent < cmds.len() && sent - answered < window {
                    match push_and_ring(&mut self.commands, &cmds[sent].encode()) {
                        Ok(()) => sent += 1,
                        Err(RingError::Full) => break,
                        Err(e) => return Err(e),
                    }
                }
                let Some(record) = waiter.pop(&mut self.results, stop)? else { return Ok(()) };
                // Results of commands whose callers gave up are skipped, and
                // so are leaves that are not this batch's.
                let index = |id: u64| id.checked_sub(first).map(|i| i as usize).filter(|&i| i < sent);
                match record.kind() {
                    kind::LEAF => {
                        let leaf = LeafRecord::decode(&record);
                        if let Some(i) = index(leaf.cmd_id) {
                            answers[i].get_or_insert_with(Answer::pending).leaves.push(leaf);
                        }
                    }
                    kind::RESULT => {
                        let res = ResultRecord::decode(&record);
                        settled(&res);
                        if let Some(i) = index(res.cmd_id) {
                            let answer = answers[i].get_or_insert_with(Answer::pending);
                            if answer.result.kind != kind::RESULT {
                                answer.result = res;
                                answered += 1;
                            }
                        }
                    }
                    other => warn!(kind = other, "unexpected record on the control result ring"),
                }
            }
            // The caller may have timed out: nothing to tell then.
            let _ = reply.send(answers.into_iter().map(|a| a.unwrap_or_else(Answer::pending)).collect());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyp_core::ring::OwnedRing;

    #[test]
    fn commands_go_out_results_come_back_to_their_caller() {
        let (cmd_ring, res_ring) = (OwnedRing::new(), OwnedRing::new());
        let client = ControlClient::default();
        assert_eq!(client.write_protect(Ipa::new(0x4000_0000), 4096), Err(ControlError::Closed));
        let inbox = client.open();
        let stop = AtomicBool::new(false);
        let wait = WaitPolicy { spin_polls: 100, sleep_slice: Duration::from_millis(10) };
        let mut settled = Vec::new();
        std::thread::scope(|s| {
            let looped = s.spawn(|| {
                let (p, c) = (Producer::attach(cmd_ring.view()).unwrap(), Consumer::attach(res_ring.view()).unwrap());
                ControlLoop::new(inbox, p, c).run(wait, &stop, |r| settled.push(r.cmd_id))
            });
            // A core: answers each command, first with a stray result the
            // loop must skip, and refuses the second command.
            let core = s.spawn(|| {
                let mut cmds = Consumer::attach(cmd_ring.view()).unwrap();
                let mut results = Producer::attach(res_ring.view()).unwrap();
                for n in 0..2 {
                    let cmd = loop {
                        if let Some(r) = cmds.pop().unwrap() {
                            break CommandRecord::decode(&r);
                        }
                        std::thread::yield_now();
                    };
                    assert_eq!((cmd.kind, cmd.size), (kind::WRITE_PROTECT, 4096));
                    let stray = ResultRecord { kind: kind::RESULT, cmd_id: 7, ..Default::default() };
                    push_and_ring(&mut results, &stray.encode()).unwrap();
                    let res = ResultRecord {
                        kind: kind::RESULT,
                        cmd_id: cmd.cmd_id,
                        status: if n == 0 { 0 } else { Reject::BadRange.code() },
                        inval_seq: 10 + n,
                        value: 1,
                        ..Default::default()
                    };
                    push_and_ring(&mut results, &res.encode()).unwrap();
                }
            });
            let ok = client.write_protect(Ipa::new(0x4000_0000), 4096).unwrap();
            assert_eq!((ok.inval_seq, ok.value), (10, 1));
            let refused = client.write_protect(Ipa::new(0x4000_0000), 4096).unwrap_err();
            assert!(matches!(refused, ControlError::Refused { reason: Some(Reject::BadRange), .. }), "{refused:?}");
            core.join().unwrap();
            stop.store(true, Ordering::Release);
            looped.join().unwrap().unwrap();
        });
        // Every result, strays included, was settled (sequence numbers noted).
        assert_eq!(settled.len(), 4);
        assert!(
            settled.iter().filter(|&&id| id == 7).count() == 2 && settled.iter().all(|&id| id == 7 || id >> 63 == 1)
        );
    }
}
