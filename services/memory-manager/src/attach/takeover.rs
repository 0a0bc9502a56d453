//! Takeover: a running daemon hands its attach socket and every attached VM
//! (the machine's connection, its description and its fds) to a new daemon
//! binary, which serves each VM as it arrives, over the same connection, as
//! a re-attach. Machines never reconnect; a faulting vCPU sees a stall.
//! Envoy's hot restart passes listening sockets the same way, over a Unix
//! socket between the two processes.
//!
//! The exchange, on the old daemon's takeover socket (`attach-protocol.md`):
//! TAKEOVER (new to old; flags, [`faultline_attach::TAKEOVER_STATE`]);
//! HANDOVER_LISTENER with the attach socket's fd (and the flags honoured);
//! per VM, staged: HANDOVER_VM as its drain starts (the attach request's
//! payload; fds: the connection, then the request's fds), so the new daemon
//! maps it while the old one drains, then HANDOVER_STATE once drained, with
//! its mapping records in a sealed memfd, so the new daemon need not ask the
//! core for them; HANDOVER_DONE with the count. An older daemon hands each
//! VM drained, without records: the new one rebuilds it from the core.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use faultline_attach::{
    decode_header, encode_message, recv_message, send_message, set_recv_timeout, AttachRequest, MsgKind,
};
use memfd::FileSeal;
use tracing::{info, warn};

use crate::memory::handover::HandedRecords;

/// How long the new daemon waits for each message of the handover.
const HANDOVER_PATIENCE: Duration = Duration::from_secs(30);
/// Largest records accepted (32 bytes a mapping: 16M mappings).
const MAX_RECORDS_BYTES: u64 = 512 << 20;
/// The buffer records are written and read through.
const RECORDS_BUFFER: usize = 64 << 10;

/// What the running daemon hands over: its attach socket, then its VMs.
#[derive(Debug)]
pub struct Takeover {
    /// The attach socket's listening fd.
    pub listener: OwnedFd,
    /// The VMs, to be served as they arrive.
    pub vms: HandedVms,
}

/// The VMs of a takeover, as the old daemon hands them ([`HandedVms::receive`]).
#[derive(Debug)]
pub struct HandedVms {
    conn: OwnedFd,
    /// The old daemon hands each VM as it starts draining it, then its
    /// state ([`faultline_attach::TAKEOVER_STATE`]); an older one hands it
    /// drained, without state.
    staged: bool,
}

/// One VM handed over.
#[derive(Debug)]
pub struct HandedVm {
    /// The machine's connection.
    pub conn: OwnedFd,
    /// The description it attached with.
    pub request: AttachRequest,
    /// The request's fds.
    pub fds: Vec<OwnedFd>,
    /// When the VM is the new daemon's to serve, and with what.
    pub state: PendingState,
}

/// A handed VM's state, which follows it once the old daemon drained it.
#[derive(Debug)]
pub struct PendingState(Option<mpsc::Receiver<Option<HandedRecords>>>);

impl PendingState {
    /// Waits until the old daemon has drained the VM: its mapping records,
    /// or None to rebuild them from the core. An error means the handover
    /// broke off before: the VM is not this daemon's to serve (its machine
    /// re-attaches once the old daemon lets go of it).
    pub fn wait(self) -> Result<Option<HandedRecords>, TakeoverError> {
        match self.0 {
            // An older daemon hands VMs over drained.
            None => Ok(None),
            Some(rx) => rx.recv().map_err(|_| broke("the handover broke off before the VM was drained")),
        }
    }
}

/// Why a takeover failed (nothing was handed over, or the old daemon died
/// mid-way: its VMs re-attach on their own).
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The old daemon's takeover socket did not answer.
    #[error("the running daemon's takeover socket {0}: {1}")]
    Connect(String, std::io::Error),
    /// The exchange broke off or carried something else.
    #[error("the takeover broke off: {0}")]
    Protocol(String),
}

fn broke(what: impl ToString) -> TakeoverError {
    TakeoverError::Protocol(what.to_string())
}

/// The u32 at byte `at` of a payload (0 if it ends before: an older
/// daemon's).
fn u32_at(payload: &[u8], at: usize) -> u32 {
    payload.get(at..at + 4).map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

/// New daemon side: asks the daemon at `path` for everything and receives
/// its attach socket.
pub fn take_over(path: &Path) -> Result<Takeover, TakeoverError> {
    let conn = faultline_attach::connect(path).map_err(|e| TakeoverError::Connect(path.display().to_string(), e))?;
    // The old daemon drains each VM (a reclaim under way finishes, a result
    // is waited for at most a second): a daemon that says nothing for this
    // long is not handing over.
    let _ = set_recv_timeout(conn.as_fd(), HANDOVER_PATIENCE);
    let ask = encode_message(MsgKind::Takeover, &faultline_attach::TAKEOVER_STATE.to_le_bytes());
    send_message(conn.as_fd(), &ask, &[]).map_err(broke)?;
    let msg = recv_message(conn.as_fd()).map_err(broke)?.ok_or_else(|| broke("the running daemon hung up"))?;
    match decode_header(&msg.bytes).map_err(broke)? {
        (MsgKind::HandoverListener, payload) => {
            let listener = msg.fds.into_iter().next().ok_or_else(|| broke("no listener fd"))?;
            let staged = u32_at(payload, 0) & faultline_attach::TAKEOVER_STATE != 0;
            info!(staged, "took the attach socket over from the running daemon");
            Ok(Takeover { listener, vms: HandedVms { conn, staged } })
        }
        (other, _) => Err(broke(format!("expected the attach socket, got {other:?}"))),
    }
}

impl HandedVms {
    /// Receives every VM, calling `serve` on each as it arrives (its state
    /// follows), until the old daemon says it handed the last one. On an
    /// error, the VMs still waiting for their state are let go.
    pub fn receive(self, mut serve: impl FnMut(HandedVm)) -> Result<u32, TakeoverError> {
        let mut waiting: HashMap<u16, mpsc::Sender<Option<HandedRecords>>> = HashMap::new();
        loop {
            let msg =
                recv_message(self.conn.as_fd()).map_err(broke)?.ok_or_else(|| broke("the running daemon hung up"))?;
            let (kind, payload) = decode_header(&msg.bytes).map_err(broke)?;
            let mut fds = msg.fds.into_iter();
            match kind {
                MsgKind::HandoverVm => {
                    let request = AttachRequest::decode(payload).map_err(broke)?;
                    let conn = fds.next().ok_or_else(|| broke("a VM without its connection"))?;
                    let state = if self.staged {
                        let (tx, rx) = mpsc::channel();
                        if waiting.insert(request.vm_id, tx).is_some() {
                            return Err(broke(format!("vm{} handed over twice", request.vm_id)));
                        }
                        PendingState(Some(rx))
                    } else {
                        PendingState(None)
                    };
                    serve(HandedVm { conn, request, fds: fds.collect(), state });
                }
                MsgKind::HandoverState => {
                    let vm_id = u32_at(payload, 0);
                    let tx = u16::try_from(vm_id)
                        .ok()
                        .and_then(|id| waiting.remove(&id))
                        .ok_or_else(|| broke(format!("state for vm {vm_id}, which is not being handed over")))?;
                    let attached = u32_at(payload, 4) == STATE_RECORDS;
                    let records = attached.then(|| read_records(vm_id, fds.next())).flatten();
                    let _ = tx.send(records);
                }
                MsgKind::HandoverDone => {
                    if !waiting.is_empty() {
                        return Err(broke(format!("done with {} VMs still draining", waiting.len())));
                    }
                    let vms = u32_at(payload, 0);
                    info!(vms, "the running daemon handed every VM over");
                    return Ok(vms);
                }
                other => return Err(broke(format!("unexpected {other:?}"))),
            }
        }
    }
}

/// HANDOVER_STATE flag (second u32): a memfd with the VM's mapping records
/// comes with it; without it, the new daemon rebuilds them from the core.
const STATE_RECORDS: u32 = 1;

/// Reads a VM's records once from the memfd HANDOVER_STATE carried. Records
/// that cannot be read are not fatal: the VM is rebuilt from the core.
fn read_records(vm_id: u32, fd: Option<OwnedFd>) -> Option<HandedRecords> {
    let read = || -> Result<HandedRecords, String> {
        let file = File::from(fd.ok_or("no records fd")?);
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len > MAX_RECORDS_BYTES {
            return Err(format!("{len} bytes of records"));
        }
        // Decoded as read: no copy of the whole to fault in.
        let mut reader = std::io::BufReader::with_capacity(RECORDS_BUFFER, &file);
        reader.seek(std::io::SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        HandedRecords::decode_from(&mut reader, len).map_err(|e| e.to_string())
    };
    read().map_err(|e| warn!(vm = vm_id, cause = %e, "handed-over records unusable; rebuilding from the core")).ok()
}

/// Old daemon side: where connection threads send their VM.
#[derive(Debug)]
pub struct HandoverSink {
    conn: Mutex<OwnedFd>,
    /// Each VM goes as its drain starts, its state once drained
    /// ([`faultline_attach::TAKEOVER_STATE`]).
    staged: bool,
}

impl HandoverSink {
    /// A sink over the new daemon's takeover connection, which asked with
    /// `flags`.
    pub fn new(conn: OwnedFd, flags: u32) -> Self {
        Self { conn: Mutex::new(conn), staged: flags & faultline_attach::TAKEOVER_STATE != 0 }
    }

    fn send(&self, kind: MsgKind, payload: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        send_message(conn.as_fd(), &encode_message(kind, payload), fds)
    }

    /// Whether each VM is handed as its drain starts, then its state.
    pub fn staged(&self) -> bool {
        self.staged
    }

    /// Hands over the attach socket (and says whether VMs come staged).
    pub fn listener(&self, listener: BorrowedFd<'_>) -> std::io::Result<()> {
        let flags = if self.staged { faultline_attach::TAKEOVER_STATE } else { 0 };
        self.send(MsgKind::HandoverListener, &flags.to_le_bytes(), &[listener])
    }

    /// Hands over one VM: staged, as its drain starts (its state must
    /// follow, [`HandoverSink::state`]); otherwise once drained.
    pub fn vm(&self, conn: &OwnedFd, request: &AttachRequest, fds: &[OwnedFd]) -> std::io::Result<()> {
        let payload = &request.encode()[faultline_attach::HEADER_LEN..];
        let all: Vec<BorrowedFd<'_>> = std::iter::once(conn.as_fd()).chain(fds.iter().map(|f| f.as_fd())).collect();
        self.send(MsgKind::HandoverVm, payload, &all)
    }

    /// A staged VM is drained: hands over its mapping records (None: the
    /// new daemon rebuilds them from the core).
    pub fn state(&self, vm_id: u16, records: Option<&HandedRecords>) -> std::io::Result<()> {
        let memfd = records.map(records_memfd).transpose()?;
        let mut payload = (vm_id as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(&(if memfd.is_some() { STATE_RECORDS } else { 0 }).to_le_bytes());
        let fds: Vec<BorrowedFd<'_>> = memfd.iter().map(|f| f.as_fd()).collect();
        self.send(MsgKind::HandoverState, &payload, &fds)
    }

    /// Ends the handover.
    pub fn done(&self, vms: u32) {
        if let Err(e) = self.send(MsgKind::HandoverDone, &vms.to_le_bytes(), &[]) {
            warn!(cause = %e, "ending the handover failed");
        }
    }
}

/// A sealed memfd holding `records`.
fn records_memfd(records: &HandedRecords) -> std::io::Result<File> {
    let memfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true)
        .create("faultline-handover")
        .map_err(std::io::Error::other)?;
    // Encoded straight into the memfd (no copy of the whole to fault in),
    // from its start: the receiver reads from there, whatever the offset
    // the description the two share was left at.
    let mut writer = std::io::BufWriter::with_capacity(RECORDS_BUFFER, memfd.as_file());
    records.encode_to(&mut writer)?;
    writer.flush()?;
    drop(writer);
    let seals = [FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealWrite, FileSeal::SealSeal];
    memfd.add_seals(&seals).map_err(std::io::Error::other)?;
    Ok(memfd.into_file())
}

/// The flags of a TAKEOVER on `conn` (a takeover socket connection), if it
/// is one.
pub fn asks_for_takeover(conn: &OwnedFd) -> Option<u32> {
    let _ = set_recv_timeout(conn.as_fd(), Duration::from_secs(5));
    let msg = recv_message(conn.as_fd()).ok().flatten()?;
    match decode_header(&msg.bytes).ok()? {
        (MsgKind::Takeover, payload) => Some(u32_at(payload, 0)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use faultline_attach::MemslotDesc;
    use hyp_core::addr::{Ipa, Pa};

    use super::*;
    use crate::memory::handover::HandedMapping;

    fn request(vm_id: u16) -> AttachRequest {
        AttachRequest {
            vm_id,
            nr_vcpus: 1,
            ipa_bits: 40,
            flags: 0,
            regions: Vec::new(),
            memslots: vec![MemslotDesc { gpa: 0x4000_0000, size: 4096, region: 0, flags: 0, region_offset: 0 }],
        }
    }

    fn records() -> HandedRecords {
        let m = HandedMapping { ipa: Ipa::new(0x4000_0000), size: 4096, pa: Pa::new(0x8000_0000), order: 0 };
        HandedRecords { seq: 3, next_order: 1, mappings: vec![m], free: vec![(Pa::new(0x1000_0000), 4096)] }
    }

    /// An old daemon (a sink) answering a new one (`take_over`) over a real
    /// takeover socket in `dir`; `flags` is what the old one honours
    /// (`None`: it honours what it is asked). Returns the new side and the
    /// old side's sink.
    fn exchange(dir: &Path, honour: Option<u32>) -> (Takeover, HandoverSink) {
        let path = dir.join("takeover.sock");
        let listener = faultline_attach::listen(&path).unwrap();
        let attach = faultline_attach::listen(&dir.join("attach.sock")).unwrap();
        let old = std::thread::spawn(move || {
            let conn = faultline_attach::accept(listener.as_fd()).unwrap();
            let asked = asks_for_takeover(&conn).expect("a TAKEOVER");
            let sink = HandoverSink::new(conn, honour.unwrap_or(asked));
            sink.listener(attach.as_fd()).unwrap();
            sink
        });
        let taken = take_over(&path).unwrap();
        (taken, old.join().unwrap())
    }

    /// One fd to stand for each of a VM's descriptors.
    fn some_fd() -> OwnedFd {
        File::open("/dev/null").unwrap().into()
    }

    /// A takeover in which the old daemon (honouring `honour`, or what it
    /// is asked) does `old` with its sink: what the new daemon's receive
    /// returned, and the VMs it was handed.
    fn handover(
        honour: Option<u32>,
        old: impl FnOnce(HandoverSink) + Send + 'static,
    ) -> (Result<u32, TakeoverError>, Vec<HandedVm>) {
        let dir = tempfile::tempdir().unwrap();
        let (taken, sink) = exchange(dir.path(), honour);
        let old = std::thread::spawn(move || old(sink));
        let mut handed = Vec::new();
        let received = taken.vms.receive(|vm| handed.push(vm));
        old.join().unwrap();
        (received, handed)
    }

    #[test]
    fn a_staged_vm_is_served_once_its_records_follow() {
        let (conn, fd) = (some_fd(), some_fd());
        let (received, mut handed) = handover(None, move |sink| {
            assert!(sink.staged(), "this daemon asks for staged VMs");
            sink.vm(&conn, &request(7), &[fd]).unwrap();
            // Drained: its state follows.
            sink.state(7, Some(&records())).unwrap();
            sink.done(1);
        });
        assert_eq!(received.unwrap(), 1);
        let vm = handed.pop().unwrap();
        assert_eq!((vm.request.vm_id, vm.fds.len()), (7, 1));
        assert!(vm.conn.as_raw_fd() >= 0);
        assert_eq!(vm.state.wait().unwrap(), Some(records()));
    }

    #[test]
    fn an_older_daemon_hands_vms_drained_and_without_records() {
        // It ignores TAKEOVER's flags: no staging, no records.
        let conn = some_fd();
        let (received, mut handed) = handover(Some(0), move |sink| {
            assert!(!sink.staged());
            sink.vm(&conn, &request(8), &[]).unwrap();
            sink.done(1);
        });
        received.unwrap();
        // Served at once, rebuilt from the core.
        assert_eq!(handed.pop().unwrap().state.wait().unwrap(), None);
    }

    #[test]
    fn records_that_cannot_be_read_mean_a_rebuild_not_a_failure() {
        let conn = some_fd();
        let (received, mut handed) = handover(None, move |sink| {
            sink.vm(&conn, &request(9), &[]).unwrap();
            // Says records come, sends a file that holds none.
            let mut payload = 9u32.to_le_bytes().to_vec();
            payload.extend_from_slice(&STATE_RECORDS.to_le_bytes());
            sink.send(MsgKind::HandoverState, &payload, &[some_fd().as_fd()]).unwrap();
            sink.done(1);
        });
        received.unwrap();
        assert_eq!(handed.pop().unwrap().state.wait().unwrap(), None);
    }

    #[test]
    fn a_handover_that_breaks_off_before_the_drain_lets_the_vm_go() {
        let conn = some_fd();
        let (received, mut handed) = handover(None, move |sink| {
            sink.vm(&conn, &request(10), &[]).unwrap();
            // The old daemon dies while draining.
            drop(sink);
        });
        let err = received.unwrap_err();
        assert!(err.to_string().contains("hung up"), "{err}");
        let err = handed.pop().unwrap().state.wait().unwrap_err();
        assert!(err.to_string().contains("before the VM was drained"), "{err}");
    }

    #[test]
    fn state_for_a_vm_not_being_handed_over_breaks_the_takeover() {
        let (received, handed) = handover(None, |sink| sink.state(11, Some(&records())).unwrap());
        let err = received.unwrap_err();
        assert!(err.to_string().contains("not being handed over"), "{err}");
        assert!(handed.is_empty());
    }
}
