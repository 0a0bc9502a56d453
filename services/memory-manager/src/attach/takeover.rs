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
//! VM drained, without records: the new daemon rebuilds it from the core.
//!
//! Warm ([`faultline_attach::TAKEOVER_WARM`]): a snapshot of the records
//! follows HANDOVER_VM while the old daemon still serves the VM; the new
//! daemon adopts it and answers HANDOVER_READY, and only then is the VM
//! drained, its HANDOVER_STATE carrying what changed since the snapshot.
//! The adoption, the bulk of the new daemon's work, is then off the stall.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use faultline_attach::{
    decode_header, encode_message, recv_message, send_message, set_recv_timeout, AttachRequest, MsgKind,
};
use memfd::FileSeal;
use tracing::{info, warn};

use crate::memory::handover::{HandedDelta, HandedRecords, HandoverDecodeError};

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
    /// Each VM's records come first as a snapshot, and the old daemon waits
    /// for HANDOVER_READY before it drains ([`faultline_attach::TAKEOVER_WARM`]).
    warm: bool,
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

/// What the old daemon sends about one VM, as it arrives.
#[derive(Debug)]
enum StateMsg {
    /// Drained, with its records (None: rebuild from the core).
    Records(Option<HandedRecords>),
    /// Still served: a snapshot of its records (None: unreadable).
    Snapshot(Option<HandedRecords>),
    /// Still served, after a snapshot: what changed since the last one
    /// (None: unreadable).
    Changed(Option<HandedDelta>),
    /// Drained after a snapshot: what changed since the last one (None:
    /// rebuild).
    Delta(Option<HandedDelta>),
}

/// A handed VM's state, which follows it.
#[derive(Debug)]
pub struct PendingState {
    vm_id: u16,
    rx: Option<mpsc::Receiver<StateMsg>>,
    /// The takeover connection (a copy), to say a snapshot is adopted.
    ready: Option<OwnedFd>,
}

/// A handed VM's state as it first arrives ([`PendingState::wait`]).
#[derive(Debug)]
pub enum Handed {
    /// Drained: the VM is this daemon's, with its mapping records (None:
    /// rebuild them from the core).
    Drained(Option<HandedRecords>),
    /// Still served by the old daemon: a snapshot of its records (None:
    /// unreadable) to adopt now, then [`PendingDelta::ready`].
    Warm(Option<HandedRecords>, PendingDelta),
}

/// A warm VM's delta, which the old daemon sends once told the snapshot is
/// adopted and the VM drained.
#[derive(Debug)]
pub struct PendingDelta {
    vm_id: u16,
    rx: mpsc::Receiver<StateMsg>,
    conn: OwnedFd,
}

fn broke_before_drained() -> TakeoverError {
    broke("the handover broke off before the VM was drained")
}

impl PendingState {
    /// Waits for the VM's state: drained, or (warm) a snapshot while the old
    /// daemon still serves it. An error means the handover broke off
    /// before: the VM is not this daemon's to serve (its machine re-attaches
    /// once the old daemon lets go of it).
    pub fn wait(self) -> Result<Handed, TakeoverError> {
        // An older daemon hands VMs over drained.
        let Some(rx) = self.rx else { return Ok(Handed::Drained(None)) };
        match rx.recv().map_err(|_| broke_before_drained())? {
            StateMsg::Records(records) => Ok(Handed::Drained(records)),
            StateMsg::Snapshot(snapshot) => {
                let conn = self.ready.ok_or_else(|| broke("a snapshot in a takeover that is not warm"))?;
                Ok(Handed::Warm(snapshot, PendingDelta { vm_id: self.vm_id, rx, conn }))
            }
            StateMsg::Changed(_) | StateMsg::Delta(_) => Err(broke("a delta before its snapshot")),
        }
    }
}

/// What follows a warm VM's snapshot ([`PendingDelta::ready`]).
#[derive(Debug)]
pub enum Change {
    /// The VM is still served: what changed while the last was adopted
    /// (None: unreadable), to adopt before saying ready again.
    Served(Option<HandedDelta>, PendingDelta),
    /// The VM is drained and this daemon's: the last change (None: rebuild
    /// from the core).
    Drained(Option<HandedDelta>),
}

impl PendingDelta {
    /// Tells the old daemon the snapshot (or the last change) is adopted
    /// and waits for what changed since: while it still serves the VM, or
    /// once it drained it.
    pub fn ready(self) -> Result<Change, TakeoverError> {
        let msg = encode_message(MsgKind::HandoverReady, &u32::from(self.vm_id).to_le_bytes());
        send_message(self.conn.as_fd(), &msg, &[]).map_err(broke)?;
        match self.rx.recv().map_err(|_| broke_before_drained())? {
            StateMsg::Changed(delta) => Ok(Change::Served(delta, self)),
            StateMsg::Delta(delta) => Ok(Change::Drained(delta)),
            other => Err(broke(format!("expected the delta of vm{}, got {other:?}", self.vm_id))),
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
    let flags = faultline_attach::TAKEOVER_STATE | faultline_attach::TAKEOVER_WARM;
    let ask = encode_message(MsgKind::Takeover, &flags.to_le_bytes());
    send_message(conn.as_fd(), &ask, &[]).map_err(broke)?;
    let msg = recv_message(conn.as_fd()).map_err(broke)?.ok_or_else(|| broke("the running daemon hung up"))?;
    match decode_header(&msg.bytes).map_err(broke)? {
        (MsgKind::HandoverListener, payload) => {
            let listener = msg.fds.into_iter().next().ok_or_else(|| broke("no listener fd"))?;
            let honoured = u32_at(payload, 0);
            let staged = honoured & faultline_attach::TAKEOVER_STATE != 0;
            let warm = staged && honoured & faultline_attach::TAKEOVER_WARM != 0;
            info!(staged, warm, "took the attach socket over from the running daemon");
            Ok(Takeover { listener, vms: HandedVms { conn, staged, warm } })
        }
        (other, _) => Err(broke(format!("expected the attach socket, got {other:?}"))),
    }
}

impl HandedVms {
    /// Receives every VM, calling `serve` on each as it arrives (its state
    /// follows), until the old daemon says it handed the last one. On an
    /// error, the VMs still waiting for their state are let go.
    pub fn receive(self, mut serve: impl FnMut(HandedVm)) -> Result<u32, TakeoverError> {
        // Each VM handed staged, until its state is final; whether its
        // snapshot came.
        let mut waiting: HashMap<u16, (mpsc::Sender<StateMsg>, bool)> = HashMap::new();
        loop {
            let msg =
                recv_message(self.conn.as_fd()).map_err(broke)?.ok_or_else(|| broke("the running daemon hung up"))?;
            let (kind, payload) = decode_header(&msg.bytes).map_err(broke)?;
            let mut fds = msg.fds.into_iter();
            match kind {
                MsgKind::HandoverVm => {
                    let request = AttachRequest::decode(payload).map_err(broke)?;
                    let conn = fds.next().ok_or_else(|| broke("a VM without its connection"))?;
                    let vm_id = request.vm_id;
                    let state = if self.staged {
                        let (tx, rx) = mpsc::channel();
                        if waiting.insert(vm_id, (tx, false)).is_some() {
                            return Err(broke(format!("vm{vm_id} handed over twice")));
                        }
                        let ready = self.warm.then(|| self.conn.try_clone()).transpose().map_err(broke)?;
                        PendingState { vm_id, rx: Some(rx), ready }
                    } else {
                        PendingState { vm_id, rx: None, ready: None }
                    };
                    serve(HandedVm { conn, request, fds: fds.collect(), state });
                }
                MsgKind::HandoverState => {
                    let vm_id = u32_at(payload, 0);
                    let id = u16::try_from(vm_id)
                        .ok()
                        .filter(|id| waiting.contains_key(id))
                        .ok_or_else(|| broke(format!("state for vm {vm_id}, which is not being handed over")))?;
                    let flags = u32_at(payload, 4);
                    let with_records = flags & STATE_RECORDS != 0;
                    let snapshot_came = waiting[&id].1;
                    let msg = match (flags & STATE_SNAPSHOT != 0, flags & STATE_DELTA != 0) {
                        (true, false) if self.warm && !snapshot_came => {
                            StateMsg::Snapshot(with_records.then(|| read_records(vm_id, fds.next())).flatten())
                        }
                        (true, true) if snapshot_came => {
                            StateMsg::Changed(with_records.then(|| read_delta(vm_id, fds.next())).flatten())
                        }
                        (false, true) if snapshot_came => {
                            StateMsg::Delta(with_records.then(|| read_delta(vm_id, fds.next())).flatten())
                        }
                        (false, false) if !snapshot_came => {
                            StateMsg::Records(with_records.then(|| read_records(vm_id, fds.next())).flatten())
                        }
                        _ => return Err(broke(format!("vm{vm_id}: state flags {flags:#x} out of turn"))),
                    };
                    let tx = match msg {
                        StateMsg::Snapshot(_) | StateMsg::Changed(_) => {
                            let entry = waiting.get_mut(&id).expect("checked");
                            entry.1 = true;
                            entry.0.clone()
                        }
                        _ => waiting.remove(&id).expect("checked").0,
                    };
                    let _ = tx.send(msg);
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
/// HANDOVER_STATE flag: the VM is still served (warm): the memfd holds a
/// snapshot of its records, or with [`STATE_DELTA`] what changed since the
/// last; more follows.
const STATE_SNAPSHOT: u32 = 2;
/// HANDOVER_STATE flag: the memfd (if any) holds what changed since the
/// last snapshot or change (warm); without [`STATE_SNAPSHOT`], the VM is
/// drained.
const STATE_DELTA: u32 = 4;

/// How long the old daemon keeps serving a VM while the new one adopts its
/// snapshot: past this it drains anyway (the new daemon then adopts the
/// snapshot during the stall).
const READY_PATIENCE: Duration = Duration::from_secs(10);

/// Reads what a HANDOVER_STATE's memfd holds, once, with `decode`. What
/// cannot be read is not fatal: the VM is rebuilt from the core.
fn read_memfd<T>(
    vm_id: u32,
    fd: Option<OwnedFd>,
    decode: impl FnOnce(&mut std::io::BufReader<&File>, u64) -> Result<T, HandoverDecodeError>,
) -> Option<T> {
    let read = || -> Result<T, String> {
        let file = File::from(fd.ok_or("no records fd")?);
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len > MAX_RECORDS_BYTES {
            return Err(format!("{len} bytes of records"));
        }
        // Decoded as read: no copy of the whole to fault in.
        let mut reader = std::io::BufReader::with_capacity(RECORDS_BUFFER, &file);
        reader.seek(std::io::SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        decode(&mut reader, len).map_err(|e| e.to_string())
    };
    read().map_err(|e| warn!(vm = vm_id, cause = %e, "handed-over records unusable; rebuilding from the core")).ok()
}

fn read_records(vm_id: u32, fd: Option<OwnedFd>) -> Option<HandedRecords> {
    read_memfd(vm_id, fd, |r, len| HandedRecords::decode_from(r, len))
}

fn read_delta(vm_id: u32, fd: Option<OwnedFd>) -> Option<HandedDelta> {
    read_memfd(vm_id, fd, |r, len| HandedDelta::decode_from(r, len))
}

/// Old daemon side: where connection threads send their VM.
#[derive(Debug)]
pub struct HandoverSink {
    conn: Mutex<OwnedFd>,
    /// Each VM goes as its drain starts, its state once drained
    /// ([`faultline_attach::TAKEOVER_STATE`]).
    staged: bool,
    /// The VMs whose snapshot the new daemon adopted, as its listener
    /// thread hears ([`faultline_attach::TAKEOVER_WARM`]; None: not warm).
    ready: Option<Arc<Readiness>>,
}

/// The HANDOVER_READYs heard on the takeover connection.
#[derive(Debug, Default)]
struct Readiness {
    heard: Mutex<Heard>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Heard {
    vms: HashSet<u16>,
    /// The connection ended: nothing more will be heard.
    closed: bool,
}

impl Readiness {
    /// Reads HANDOVER_READYs from `conn` until it ends.
    fn listen(&self, conn: OwnedFd) {
        loop {
            let heard = match recv_message(conn.as_fd()) {
                Ok(Some(msg)) => match decode_header(&msg.bytes) {
                    Ok((MsgKind::HandoverReady, payload)) => u16::try_from(u32_at(payload, 0)).ok(),
                    _ => {
                        warn!("an unexpected message on the takeover connection; ignored");
                        None
                    }
                },
                // The receive timeout: nothing said for a while.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
                Ok(None) | Err(_) => break,
            };
            if let Some(vm) = heard {
                self.heard.lock().unwrap_or_else(|e| e.into_inner()).vms.insert(vm);
                self.changed.notify_all();
            }
        }
        self.heard.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.changed.notify_all();
    }

    /// Waits up to `patience` for `vm`'s HANDOVER_READY; false if it did
    /// not come (or the connection ended first).
    fn wait(&self, vm: u16, patience: Duration) -> bool {
        let heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let (mut heard, _) = self
            .changed
            .wait_timeout_while(heard, patience, |h| !h.closed && !h.vms.contains(&vm))
            .unwrap_or_else(|e| e.into_inner());
        heard.vms.remove(&vm)
    }
}

impl HandoverSink {
    /// A sink over the new daemon's takeover connection, which asked with
    /// `flags`. Warm, a thread listens there for HANDOVER_READYs (if it
    /// cannot be started, the takeover is not warm).
    pub fn new(conn: OwnedFd, flags: u32) -> Self {
        let staged = flags & faultline_attach::TAKEOVER_STATE != 0;
        let warm = staged && flags & faultline_attach::TAKEOVER_WARM != 0;
        let ready = warm.then(|| Self::listen_for_ready(&conn)).flatten();
        Self { conn: Mutex::new(conn), staged, ready }
    }

    fn listen_for_ready(conn: &OwnedFd) -> Option<Arc<Readiness>> {
        let ready = Arc::new(Readiness::default());
        let (copy, listener) = (conn.try_clone().ok()?, ready.clone());
        let named = std::thread::Builder::new().name("takeover-ready".into());
        named.spawn(move || listener.listen(copy)).inspect_err(|e| warn!(cause = %e, "takeover not warm")).ok()?;
        Some(ready)
    }

    /// Whether each VM's records go first as a snapshot, while it is still
    /// served ([`HandoverSink::snapshot`]).
    pub fn warm(&self) -> bool {
        self.ready.is_some()
    }

    /// Warm: hands over a snapshot of a VM's records (it was just handed
    /// staged and is still served), then waits until the new daemon says it
    /// adopted them, or [`READY_PATIENCE`]; false if it did not say so.
    pub fn snapshot(&self, vm_id: u16, records: &HandedRecords) -> std::io::Result<bool> {
        self.state_while_served(vm_id, STATE_SNAPSHOT, &|w| records.encode_to(w))
    }

    /// Warm: hands over what changed in a VM still served since its last
    /// snapshot or change went, then waits as [`HandoverSink::snapshot`]
    /// does.
    pub fn changed(&self, vm_id: u16, delta: &HandedDelta) -> std::io::Result<bool> {
        self.state_while_served(vm_id, STATE_SNAPSHOT | STATE_DELTA, &|w| delta.encode_to(w))
    }

    /// Warm: a HANDOVER_STATE of a VM still served, then the wait for the
    /// new daemon's READY ([`HandoverSink::snapshot`]).
    fn state_while_served(&self, vm_id: u16, flags: u32, encode: Encode<'_>) -> std::io::Result<bool> {
        let ready = self.ready.as_ref().ok_or_else(|| std::io::Error::other("the takeover is not warm"))?;
        self.send_state(vm_id, flags, Some(encode))?;
        Ok(ready.wait(vm_id, READY_PATIENCE))
    }

    /// Sends a VM's HANDOVER_STATE with `flags`, and with what `encode`
    /// writes in a sealed memfd ([`STATE_RECORDS`]) if there is anything.
    fn send_state(&self, vm_id: u16, flags: u32, encode: Option<Encode<'_>>) -> std::io::Result<()> {
        let memfd = encode.map(sealed_memfd).transpose()?;
        let flags = flags | if memfd.is_some() { STATE_RECORDS } else { 0 };
        let fds: Vec<BorrowedFd<'_>> = memfd.iter().map(|f| f.as_fd()).collect();
        self.send(MsgKind::HandoverState, &state_payload(vm_id, flags), &fds)
    }

    /// Warm: a VM whose snapshot went is drained: hands over what changed
    /// since the last snapshot or change (None: the new daemon rebuilds
    /// from the core).
    pub fn delta(&self, vm_id: u16, delta: Option<&HandedDelta>) -> std::io::Result<()> {
        let encode = delta.map(|d| move |w: &mut Writer<'_>| d.encode_to(w));
        self.send_state(vm_id, STATE_DELTA, encode.as_ref().map(|e| e as Encode<'_>))
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
        let staged = if self.staged { faultline_attach::TAKEOVER_STATE } else { 0 };
        let flags = staged | if self.warm() { faultline_attach::TAKEOVER_WARM } else { 0 };
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
        let encode = records.map(|r| move |w: &mut Writer<'_>| r.encode_to(w));
        self.send_state(vm_id, 0, encode.as_ref().map(|e| e as Encode<'_>))
    }

    /// Ends the handover.
    pub fn done(&self, vms: u32) {
        if let Err(e) = self.send(MsgKind::HandoverDone, &vms.to_le_bytes(), &[]) {
            warn!(cause = %e, "ending the handover failed");
        }
    }
}

impl Drop for HandoverSink {
    /// Ends the connection for both sides, although the listener thread
    /// holds a copy of it: a sink dropped part-way is a handover broken off.
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = nix::sys::socket::shutdown(conn.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

/// A HANDOVER_STATE payload: the VM id and the flags.
fn state_payload(vm_id: u16, flags: u32) -> Vec<u8> {
    [u32::from(vm_id), flags].iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// What records and deltas are written into a memfd through.
type Writer<'f> = std::io::BufWriter<&'f File>;
/// Writes records or a delta.
type Encode<'a> = &'a dyn Fn(&mut Writer<'_>) -> std::io::Result<()>;

/// A sealed memfd holding what `write` writes (records or a delta).
fn sealed_memfd(write: impl FnOnce(&mut Writer<'_>) -> std::io::Result<()>) -> std::io::Result<File> {
    let memfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true)
        .create("faultline-handover")
        .map_err(std::io::Error::other)?;
    // Encoded straight into the memfd (no copy of the whole to fault in),
    // from its start: the receiver reads from there, whatever the offset
    // the description the two share was left at.
    let mut writer = std::io::BufWriter::with_capacity(RECORDS_BUFFER, memfd.as_file());
    write(&mut writer)?;
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

    use std::sync::atomic::{AtomicBool, Ordering};

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

    /// A VM's state that must have come drained.
    fn drained(state: PendingState) -> Option<HandedRecords> {
        match state.wait().unwrap() {
            Handed::Drained(records) => records,
            warm => panic!("{warm:?}"),
        }
    }

    #[test]
    fn a_staged_vm_is_served_once_its_records_follow() {
        let (conn, fd) = (some_fd(), some_fd());
        let (received, mut handed) = handover(Some(faultline_attach::TAKEOVER_STATE), move |sink| {
            assert!(sink.staged() && !sink.warm(), "an old daemon that stages VMs, not warm");
            sink.vm(&conn, &request(7), &[fd]).unwrap();
            // Drained: its state follows.
            sink.state(7, Some(&records())).unwrap();
            sink.done(1);
        });
        assert_eq!(received.unwrap(), 1);
        let vm = handed.pop().unwrap();
        assert_eq!((vm.request.vm_id, vm.fds.len()), (7, 1));
        assert!(vm.conn.as_raw_fd() >= 0);
        assert_eq!(drained(vm.state), Some(records()));
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
        assert_eq!(drained(handed.pop().unwrap().state), None);
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
        assert_eq!(drained(handed.pop().unwrap().state), None);
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

    #[test]
    fn a_warm_vm_is_drained_only_once_the_new_daemon_adopted_its_snapshot() {
        let conn = some_fd();
        let said_ready = Arc::new(AtomicBool::new(false));
        let heard = said_ready.clone();
        let delta = HandedDelta { seq: 4, next_order: 2, removed: vec![Ipa::new(0x4000_0000)], ..Default::default() };
        let sent = delta.clone();
        let dir = tempfile::tempdir().unwrap();
        let (taken, sink) = exchange(dir.path(), None);
        let old = std::thread::spawn(move || {
            assert!(sink.warm(), "this daemon asks for warm takeovers");
            sink.vm(&conn, &request(12), &[]).unwrap();
            // Served meanwhile; drained only once the new daemon said so.
            assert!(sink.snapshot(12, &records()).unwrap(), "the new daemon adopted the snapshot");
            assert!(heard.load(Ordering::SeqCst), "not before it said so");
            assert!(sink.changed(12, &HandedDelta::default()).unwrap(), "the new daemon adopted the change");
            sink.delta(12, Some(&sent)).unwrap();
            sink.done(1);
        });
        let mut adopting = Vec::new();
        let received = taken.vms.receive(|vm| {
            let said_ready = said_ready.clone();
            adopting.push(std::thread::spawn(move || match vm.state.wait().unwrap() {
                Handed::Warm(snapshot, delta) => {
                    assert_eq!(snapshot, Some(records()));
                    said_ready.store(true, Ordering::SeqCst);
                    // A change while still served, then the last.
                    let Change::Served(changed, delta) = delta.ready().unwrap() else { panic!("a change") };
                    assert_eq!(changed, Some(HandedDelta::default()));
                    match delta.ready().unwrap() {
                        Change::Drained(delta) => delta,
                        served => panic!("{served:?}"),
                    }
                }
                drained => panic!("{drained:?}"),
            }))
        });
        old.join().unwrap();
        assert_eq!(received.unwrap(), 1);
        assert_eq!(adopting.pop().unwrap().join().unwrap(), Some(delta));
    }

    #[test]
    fn state_out_of_turn_breaks_the_takeover() {
        // A delta with no snapshot before it.
        let conn = some_fd();
        let (received, _) = handover(None, move |sink| {
            sink.vm(&conn, &request(13), &[]).unwrap();
            sink.delta(13, None).unwrap();
        });
        assert!(received.unwrap_err().to_string().contains("out of turn"));
        // A change while still served, with no snapshot before it.
        let conn = some_fd();
        let (received, _) = handover(None, move |sink| {
            sink.vm(&conn, &request(15), &[]).unwrap();
            // (Sent, not waited on: `changed` would wait for a READY.)
            let payload = state_payload(15, STATE_SNAPSHOT | STATE_DELTA | STATE_RECORDS);
            let memfd = sealed_memfd(|w| HandedDelta::default().encode_to(w)).unwrap();
            sink.send(MsgKind::HandoverState, &payload, &[memfd.as_fd()]).unwrap();
        });
        assert!(received.unwrap_err().to_string().contains("out of turn"));
        // A snapshot when the takeover is not warm.
        let conn = some_fd();
        let (received, _) = handover(Some(faultline_attach::TAKEOVER_STATE), move |sink| {
            sink.vm(&conn, &request(14), &[]).unwrap();
            let payload = state_payload(14, STATE_SNAPSHOT | STATE_RECORDS);
            let memfd = sealed_memfd(|w| records().encode_to(w)).unwrap();
            sink.send(MsgKind::HandoverState, &payload, &[memfd.as_fd()]).unwrap();
        });
        assert!(received.unwrap_err().to_string().contains("out of turn"));
    }

    #[test]
    fn readiness_is_heard_per_vm_and_not_waited_for_once_the_connection_ends() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let ready = Arc::new(Readiness::default());
        let listener = ready.clone();
        let listening = std::thread::spawn(move || listener.listen(OwnedFd::from(ours)));
        let theirs = OwnedFd::from(theirs);
        let say =
            |vm: u32| send_message(theirs.as_fd(), &encode_message(MsgKind::HandoverReady, &vm.to_le_bytes()), &[]);
        say(5).unwrap();
        assert!(ready.wait(5, Duration::from_secs(60)));
        // Heard once: a second wait for it does not find it.
        assert!(!ready.wait(5, Duration::from_millis(20)));
        drop(theirs);
        listening.join().unwrap();
        // Closed: no wait, whatever the patience.
        assert!(!ready.wait(6, Duration::from_secs(3600)));
    }
}
