//! Message encoding. Little-endian, fixed-size records, no padding games:
//! each field is written and read at an explicit offset.

use thiserror::Error;

/// "FLTA" as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FLTA");
/// Protocol version spoken by this crate.
pub const VERSION: u16 = 1;
/// Bytes of the common header.
pub const HEADER_LEN: usize = 16;
/// Bytes of the attach payload's fixed part.
pub const ATTACH_FIXED_LEN: usize = 16;
/// Bytes of one region record.
pub const REGION_LEN: usize = 48;
/// Bytes of one memslot record.
pub const MEMSLOT_LEN: usize = 40;
/// Most regions in one request.
pub const MAX_REGIONS: usize = 64;
/// Most memslots in one request.
pub const MAX_MEMSLOTS: usize = 256;
/// Largest message: header + fixed part + the maximum tables.
pub const MAX_MESSAGE_LEN: usize =
    HEADER_LEN + ATTACH_FIXED_LEN + MAX_REGIONS * REGION_LEN + MAX_MEMSLOTS * MEMSLOT_LEN;
/// `RegionDesc::fd_index` of a region that has no file descriptor.
pub const NO_FD: u32 = u32::MAX;

/// Message kinds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u16)]
pub enum MsgKind {
    /// Machine to daemon: attach a VM.
    Attach = 1,
    /// Daemon to machine: the answer to an attach or detach.
    Reply = 2,
    /// Machine to daemon: detach the VM and report.
    Detach = 3,
    /// Daemon to daemon (takeover socket): hand me everything.
    Takeover = 4,
    /// Old daemon to new: the attach socket's listening fd.
    HandoverListener = 5,
    /// Old daemon to new: one attached VM: its attach request's payload,
    /// with fds the machine's connection, then the request's fds.
    HandoverVm = 6,
    /// Old daemon to new: nothing more (payload: VMs handed over, u32).
    HandoverDone = 7,
    /// Old daemon to new, once a VM handed over staged
    /// ([`TAKEOVER_STATE`]) is drained: the VM is the new daemon's (payload:
    /// the VM id, u32; flags, u32, 1 = a sealed memfd with its mapping
    /// records comes with it, else the new daemon rebuilds them).
    HandoverState = 8,
    /// New daemon to old, with [`TAKEOVER_WARM`]: a VM's snapshot of
    /// records is adopted; the old daemon may drain it (payload: the VM id,
    /// u32).
    HandoverReady = 9,
}

/// TAKEOVER flag (payload: u32 flags; HANDOVER_LISTENER echoes the flags
/// the old daemon honours): VMs are handed staged, each one's
/// [`MsgKind::HandoverVm`] as its drain starts (the new daemon maps it
/// meanwhile) and its [`MsgKind::HandoverState`] once drained, with the
/// mapping records. An older daemon ignores the payload and hands VMs
/// drained, without records.
pub const TAKEOVER_STATE: u32 = 1;

/// TAKEOVER flag, with [`TAKEOVER_STATE`]: each VM's records come twice.
/// A snapshot follows its [`MsgKind::HandoverVm`] while the old daemon
/// still serves it; the new daemon adopts it and answers
/// [`MsgKind::HandoverReady`]; only then does the old daemon drain the VM,
/// and its [`MsgKind::HandoverState`] carries what changed since the
/// snapshot. The adoption is off the guests' stall.
pub const TAKEOVER_WARM: u32 = 2;

impl MsgKind {
    fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Attach),
            2 => Some(Self::Reply),
            3 => Some(Self::Detach),
            4 => Some(Self::Takeover),
            5 => Some(Self::HandoverListener),
            6 => Some(Self::HandoverVm),
            7 => Some(Self::HandoverDone),
            8 => Some(Self::HandoverState),
            9 => Some(Self::HandoverReady),
            _ => None,
        }
    }
}

/// What a region is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum RegionKind {
    /// Guest memory the daemon maps and serves (a VMA).
    Guest = 1,
    /// The ring region (hyp-core ring ABI).
    Rings = 2,
    /// Physical pages the daemon may hand to the core as table pages (no fd:
    /// the daemon never maps them).
    TablePool = 3,
    /// Contents for holes in a guest region's window (pa_base, size): when
    /// the daemon faults in a page whose backing is a hole, it copies the
    /// page from this descriptor instead of zero-filling it, as a
    /// userfaultfd handler or a lazy snapshot restore would. Any readable
    /// file; the daemon only reads it.
    Contents = 4,
    /// The dirty logs of the memslots that log (see [`DirtyLogLayout`]), in
    /// memory the machine owns, so they outlive the daemon. No PA window:
    /// `pa_base` 0, `page_size` 4096.
    DirtyLog = 5,
}

/// Region flag: guest memory the guest may write.
pub const REGION_WRITABLE: u32 = 1;
/// Region flag: device memory (non-cacheable, never executable).
pub const REGION_DEVICE: u32 = 2;
/// Memslot flag: read-only (writes exit to the VMM).
pub const MEMSLOT_READ_ONLY: u32 = 1;
/// Memslot flag: dirty logging (4 KiB mappings, write faults marked).
pub const MEMSLOT_DIRTY_LOG: u32 = 2;
/// Attach flag: the machine kept its rings and regions and re-attaches to a
/// restarted daemon.
pub const ATTACH_REATTACH: u32 = 1;
/// The machine cannot wake a futex (a core in another OS, or in an
/// emulator's RAM): the daemon polls its rings with short sleeps instead of
/// waiting for doorbells.
pub const ATTACH_POLLED: u32 = 2;

/// One memory region: a PA window, backed by an fd (or not, for the table pool).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RegionDesc {
    /// What it is.
    pub kind: RegionKind,
    /// `REGION_*` flags.
    pub flags: u32,
    /// First PA of the window.
    pub pa_base: u64,
    /// Bytes.
    pub size: u64,
    /// Backing page size: 4 KiB, 2 MiB or 1 GiB (hugetlb, or declared).
    pub page_size: u64,
    /// Index into the message's fds, or [`NO_FD`].
    pub fd_index: u32,
    /// Offset of the window in the fd.
    pub fd_offset: u64,
}

impl RegionDesc {
    /// A dirty-log region of `size` bytes, sent as fd `fd_index`.
    pub fn dirty_log(size: u64, fd_index: u32) -> Self {
        Self { kind: RegionKind::DirtyLog, flags: 0, pa_base: 0, size, page_size: 4096, fd_index, fd_offset: 0 }
    }

    /// A contents region: the pages of guest PA window `[pa_base, pa_base +
    /// size)` are at offset 0 of descriptor `fd_index`.
    pub fn contents(pa_base: u64, size: u64, fd_index: u32) -> Self {
        Self { kind: RegionKind::Contents, flags: 0, pa_base, size, page_size: 4096, fd_index, fd_offset: 0 }
    }
}

/// One memslot: a GPA range backed by part of a guest region.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemslotDesc {
    /// First guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Index of the backing region in the request.
    pub region: u32,
    /// `MEMSLOT_*` flags.
    pub flags: u32,
    /// Offset of the slot's first byte in the region.
    pub region_offset: u64,
}

/// Attach a VM.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AttachRequest {
    /// VM id (1..=255).
    pub vm_id: u16,
    /// vCPUs. The ring region has `nr_vcpus + 1` ring pairs: the last is the
    /// control channel for commands not tied to a fault.
    pub nr_vcpus: u16,
    /// IPA size of the VM's stage 2.
    pub ipa_bits: u8,
    /// `ATTACH_*` flags.
    pub flags: u32,
    /// Regions.
    pub regions: Vec<RegionDesc>,
    /// Memslots.
    pub memslots: Vec<MemslotDesc>,
}

/// Reply status codes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u16)]
pub enum Status {
    /// Accepted.
    Ok = 0,
    /// Not a valid message (magic, kind, lengths, field values).
    Malformed = 1,
    /// The message or its fds were cut short.
    Truncated = 2,
    /// A protocol version the daemon does not speak.
    WrongVersion = 3,
    /// Memslots or region windows overlap.
    Overlapping = 4,
    /// A region's fd is smaller than described, a memslot runs past its
    /// region, or the ring region is too small for its header.
    Undersized = 5,
    /// The VM id is already attached.
    AlreadyAttached = 6,
    /// The daemon failed for its own reasons (map failed, ...).
    Internal = 7,
    /// A re-attach that does not match the VM as it was attached: another
    /// description, or a core whose state the description cannot explain.
    Mismatch = 8,
    /// Attaching the VM would pass one of the daemon's admission limits
    /// (VMs, vCPUs, memslots, regions, guest memory); the message names it.
    OverLimit = 9,
    /// The peer's credentials (SO_PEERCRED) may not attach.
    Forbidden = 10,
}

impl Status {
    /// The status for a wire code.
    pub fn from_u16(v: u16) -> Option<Self> {
        [
            Self::Ok,
            Self::Malformed,
            Self::Truncated,
            Self::WrongVersion,
            Self::Overlapping,
            Self::Undersized,
            Self::AlreadyAttached,
            Self::Internal,
            Self::Mismatch,
            Self::OverLimit,
            Self::Forbidden,
        ]
        .into_iter()
        .find(|s| *s as u16 == v)
    }
}

/// The daemon's answer. For a detach, `values` are (pins released, pins
/// still held, faults served).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Reply {
    /// Outcome.
    pub status: Status,
    /// Human-readable reason.
    pub message: String,
    /// Kind-specific numbers.
    pub values: [u64; 3],
}

/// Why a message could not be decoded.
#[derive(Clone, PartialEq, Eq, Debug, Error)]
pub enum WireError {
    /// The bytes end before the message does.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// Wrong magic, kind or field value.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Another protocol version.
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    WrongVersion(u16),
}

impl WireError {
    /// The reply status for this error.
    pub fn status(&self) -> Status {
        match self {
            Self::Truncated(_) => Status::Truncated,
            Self::Malformed(_) => Status::Malformed,
            Self::WrongVersion(_) => Status::WrongVersion,
        }
    }
}

/// Little-endian writer.
struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

/// Little-endian reader that reports truncation.
struct In<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

fn header(kind: MsgKind, payload_len: usize) -> Out {
    let mut o = Out(Vec::with_capacity(HEADER_LEN + payload_len));
    o.u32(MAGIC);
    o.u16(VERSION);
    o.u16(kind as u16);
    o.u32(payload_len as u32);
    o.u32(0);
    o
}

/// Reads and checks the common header; returns the kind and the payload.
pub fn decode_header(bytes: &[u8]) -> Result<(MsgKind, &[u8]), WireError> {
    let mut r = In { bytes, what: "header" };
    let magic = r.u32()?;
    if magic != MAGIC {
        return Err(WireError::Malformed(format!("bad magic {magic:#010x}")));
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(WireError::WrongVersion(version));
    }
    let kind = r.u16()?;
    let kind = MsgKind::from_u16(kind).ok_or_else(|| WireError::Malformed(format!("unknown message kind {kind}")))?;
    let len = r.u32()? as usize;
    if r.u32()? != 0 {
        return Err(WireError::Malformed("reserved header word is not zero".into()));
    }
    if r.bytes.len() < len {
        return Err(WireError::Truncated("payload shorter than the header says"));
    }
    if r.bytes.len() > len {
        return Err(WireError::Malformed("trailing bytes after the payload".into()));
    }
    Ok((kind, r.bytes))
}

impl AttachRequest {
    /// Encodes the request (fds travel separately).
    pub fn encode(&self) -> Vec<u8> {
        let len = ATTACH_FIXED_LEN + self.regions.len() * REGION_LEN + self.memslots.len() * MEMSLOT_LEN;
        let mut o = header(MsgKind::Attach, len);
        o.u16(self.vm_id);
        o.u16(self.nr_vcpus);
        o.u8(self.ipa_bits);
        o.0.extend_from_slice(&[0; 3]);
        o.u32(self.flags);
        o.u16(self.regions.len() as u16);
        o.u16(self.memslots.len() as u16);
        for r in &self.regions {
            o.u32(r.kind as u32);
            o.u32(r.flags);
            o.u64(r.pa_base);
            o.u64(r.size);
            o.u64(r.page_size);
            o.u32(r.fd_index);
            o.u32(0);
            o.u64(r.fd_offset);
        }
        for m in &self.memslots {
            o.u64(m.gpa);
            o.u64(m.size);
            o.u32(m.region);
            o.u32(m.flags);
            o.u64(m.region_offset);
            o.u64(0);
        }
        o.0
    }

    /// Decodes an attach payload (after [`decode_header`]). Checks encoding
    /// only; the daemon checks meaning (overlaps, sizes) against the fds.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut r = In { bytes: payload, what: "attach request" };
        let vm_id = r.u16()?;
        let nr_vcpus = r.u16()?;
        let ipa_bits = r.u8()?;
        if r.take(3)? != [0, 0, 0] {
            return Err(WireError::Malformed("reserved bytes are not zero".into()));
        }
        let flags = r.u32()?;
        if flags & !(ATTACH_REATTACH | ATTACH_POLLED) != 0 {
            return Err(WireError::Malformed(format!("unknown attach flags {flags:#x}")));
        }
        let nr_regions = r.u16()? as usize;
        let nr_memslots = r.u16()? as usize;
        if nr_regions > MAX_REGIONS || nr_memslots > MAX_MEMSLOTS {
            return Err(WireError::Malformed(format!(
                "{nr_regions} regions / {nr_memslots} memslots exceed the limits"
            )));
        }
        let mut regions = Vec::with_capacity(nr_regions);
        for _ in 0..nr_regions {
            let kind = match r.u32()? {
                1 => RegionKind::Guest,
                2 => RegionKind::Rings,
                3 => RegionKind::TablePool,
                4 => RegionKind::Contents,
                5 => RegionKind::DirtyLog,
                k => return Err(WireError::Malformed(format!("unknown region kind {k}"))),
            };
            let flags = r.u32()?;
            if flags & !(REGION_WRITABLE | REGION_DEVICE) != 0 {
                return Err(WireError::Malformed(format!("unknown region flags {flags:#x}")));
            }
            let (pa_base, size, page_size, fd_index) = (r.u64()?, r.u64()?, r.u64()?, r.u32()?);
            if r.u32()? != 0 {
                return Err(WireError::Malformed("reserved region word is not zero".into()));
            }
            let fd_offset = r.u64()?;
            regions.push(RegionDesc { kind, flags, pa_base, size, page_size, fd_index, fd_offset });
        }
        let mut memslots = Vec::with_capacity(nr_memslots);
        for _ in 0..nr_memslots {
            let (gpa, size, region, flags, region_offset) = (r.u64()?, r.u64()?, r.u32()?, r.u32()?, r.u64()?);
            if flags & !(MEMSLOT_READ_ONLY | MEMSLOT_DIRTY_LOG) != 0 {
                return Err(WireError::Malformed(format!("unknown memslot flags {flags:#x}")));
            }
            if r.u64()? != 0 {
                return Err(WireError::Malformed("reserved memslot word is not zero".into()));
            }
            memslots.push(MemslotDesc { gpa, size, region, flags, region_offset });
        }
        if !r.bytes.is_empty() {
            return Err(WireError::Malformed("bytes after the memslot table".into()));
        }
        Ok(Self { vm_id, nr_vcpus, ipa_bits, flags, regions, memslots })
    }
}

impl Reply {
    /// Encodes the reply.
    pub fn encode(&self) -> Vec<u8> {
        let msg = self.message.as_bytes();
        let msg = &msg[..msg.len().min(1024)];
        let mut o = header(MsgKind::Reply, 4 + 24 + msg.len());
        o.u16(self.status as u16);
        o.u16(msg.len() as u16);
        for v in self.values {
            o.u64(v);
        }
        o.0.extend_from_slice(msg);
        o.0
    }

    /// Decodes a reply payload.
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let mut r = In { bytes: payload, what: "reply" };
        let code = r.u16()?;
        let status = Status::from_u16(code).ok_or_else(|| WireError::Malformed(format!("unknown status {code}")))?;
        let len = r.u16()? as usize;
        let values = [r.u64()?, r.u64()?, r.u64()?];
        let message = String::from_utf8_lossy(r.take(len)?).into_owned();
        Ok(Self { status, message, values })
    }
}

/// Encodes a detach request.
pub fn encode_detach() -> Vec<u8> {
    header(MsgKind::Detach, 0).0
}

/// Encodes a message of `kind` with `payload` (the daemon-to-daemon
/// takeover messages).
pub fn encode_message(kind: MsgKind, payload: &[u8]) -> Vec<u8> {
    let mut o = header(kind, payload.len());
    o.0.extend_from_slice(payload);
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_logs_lie_back_to_back_for_the_memslots_that_log() {
        let l = DirtyLogLayout::new([(64 * 4096, true), (1 << 30, false), (65 * 4096, true)]);
        let first = DirtyLogPlace { dirty: 0, fetching: 8, words: 1 };
        let third = DirtyLogPlace { dirty: 16, fetching: 32, words: 2 };
        assert_eq!(l.places, vec![Some(first), None, Some(third)]);
        assert_eq!(l.bytes, 4096);
        assert_eq!(DirtyLogLayout::new([(1 << 30, false)]).bytes, 4096, "one page even when empty");
        assert_eq!(DirtyLogLayout::new([(1 << 30, true)]).bytes, 64 << 10, "two 32 KiB bitmaps of 262144 pages");
    }

    fn sample() -> AttachRequest {
        AttachRequest {
            vm_id: 3,
            nr_vcpus: 4,
            ipa_bits: 40,
            flags: 0,
            regions: vec![RegionDesc {
                kind: RegionKind::Guest,
                flags: REGION_WRITABLE,
                pa_base: 0x4000_0000,
                size: 1 << 28,
                page_size: 2 << 20,
                fd_index: 0,
                fd_offset: 0,
            }],
            memslots: vec![MemslotDesc {
                gpa: 0,
                size: 1 << 28,
                region: 0,
                flags: MEMSLOT_DIRTY_LOG,
                region_offset: 0,
            }],
        }
    }

    #[test]
    fn attach_round_trips_and_lengths_match_the_doc() {
        let bytes = sample().encode();
        assert_eq!(bytes.len(), HEADER_LEN + ATTACH_FIXED_LEN + REGION_LEN + MEMSLOT_LEN);
        assert_eq!(&bytes[0..4], b"FLTA");
        let (kind, payload) = decode_header(&bytes).unwrap();
        assert_eq!(kind, MsgKind::Attach);
        assert_eq!(AttachRequest::decode(payload).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            let err = decode_header(&bytes[..cut]).and_then(|(_, p)| AttachRequest::decode(p).map(|_| ()));
            assert!(matches!(err, Err(WireError::Truncated(_))), "cut at {cut}: {err:?}");
        }
    }

    #[test]
    fn wrong_version_magic_and_flags_are_refused() {
        let mut bytes = sample().encode();
        bytes[4] = 2;
        assert_eq!(decode_header(&bytes).unwrap_err(), WireError::WrongVersion(2));
        let mut bytes = sample().encode();
        bytes[0] = b'X';
        assert!(matches!(decode_header(&bytes), Err(WireError::Malformed(_))));
        let mut req = sample();
        req.memslots[0].flags = 0x80;
        let bytes = req.encode();
        let (_, p) = decode_header(&bytes).unwrap();
        assert!(matches!(AttachRequest::decode(p), Err(WireError::Malformed(_))));
    }

    #[test]
    fn reply_round_trips() {
        let r = Reply { status: Status::Overlapping, message: "memslots 0 and 1 overlap".into(), values: [1, 2, 3] };
        let bytes = r.encode();
        let (kind, p) = decode_header(&bytes).unwrap();
        assert_eq!(kind, MsgKind::Reply);
        assert_eq!(Reply::decode(p).unwrap(), r);
    }
}

/// Where one memslot's dirty log lies in the dirty-log region: two bitmaps
/// of one bit per 4 KiB page, in little-endian 64-bit words: the pages
/// written since the last fetch, then the pages of a fetch the daemon
/// started and has not finished (they are reported again until one does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyLogPlace {
    /// Offset of the written-pages bitmap.
    pub dirty: u64,
    /// Offset of the fetch-in-progress bitmap.
    pub fetching: u64,
    /// 64-bit words in each.
    pub words: u64,
}

/// The dirty-log region's layout: the memslots that log, in their order,
/// each with its two bitmaps back to back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyLogLayout {
    /// For each memslot (in the request's order), where its log lies, if
    /// it logs.
    pub places: Vec<Option<DirtyLogPlace>>,
    /// Bytes the region needs (a whole number of pages).
    pub bytes: u64,
}

impl DirtyLogLayout {
    /// The layout for memslots of `(bytes, logged)`, in the request's order.
    pub fn new(memslots: impl IntoIterator<Item = (u64, bool)>) -> Self {
        let mut at = 0;
        let places = memslots
            .into_iter()
            .map(|(bytes, logged)| {
                logged.then(|| {
                    let words = bytes.div_ceil(4096).div_ceil(64);
                    let place = DirtyLogPlace { dirty: at, fetching: at + words * 8, words };
                    at += 2 * words * 8;
                    place
                })
            })
            .collect();
        Self { places, bytes: at.next_multiple_of(4096).max(4096) }
    }

    /// The layout for `memslots` as described.
    pub fn of(memslots: &[MemslotDesc]) -> Self {
        Self::new(memslots.iter().map(|m| (m.size, m.flags & MEMSLOT_DIRTY_LOG != 0)))
    }
}
