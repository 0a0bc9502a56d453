//! A drained VM's mapping records as one daemon hands them to the next in a
//! takeover (`docs/attach-protocol.md`): the installed mappings with their
//! install order, the table pool's free pages and the invalidation
//! sequence. With them the new daemon skips asking the core for its leaves
//! and pool pages, the bulk of a takeover's stall.
//!
//! Little-endian u64 fields at fixed offsets: a 48-byte header (magic,
//! sequence, next install order, mapping count, free-range count, zero),
//! then 32 bytes per mapping (IPA, bytes, PA, order) and 16 per free range
//! (PA, bytes). Decoding checks only the encoding; what the records say is
//! checked against the VM's layout by whoever adopts them: they come from
//! another process.
//!
//! A warm takeover hands the records twice: a snapshot while the old daemon
//! still serves the VM, then, drained, a [`HandedDelta`] against it.

use std::io::{Read, Write};

use hyp_core::addr::{Ipa, Pa};

/// "FLHANDV1".
const MAGIC: u64 = u64::from_le_bytes(*b"FLHANDV1");
/// Header bytes.
const HEADER_LEN: usize = 48;
/// Bytes per mapping.
const MAPPING_LEN: usize = 32;
/// Bytes per free range.
const FREE_LEN: usize = 16;
/// "FLHANDD1": a [`HandedDelta`].
const DELTA_MAGIC: u64 = u64::from_le_bytes(*b"FLHANDD1");
/// Bytes per removed IPA (deltas only).
const REMOVED_LEN: usize = 8;

/// One installed mapping as handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandedMapping {
    /// First IPA.
    pub ipa: Ipa,
    /// Bytes.
    pub size: u64,
    /// Output PA.
    pub pa: Pa,
    /// Install order (FIFO/LIFO eviction).
    pub order: u64,
}

/// A VM's mapping records, as the daemon that drained it hands them over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandedRecords {
    /// The core's invalidation sequence last seen.
    pub seq: u64,
    /// The next install order.
    pub next_order: u64,
    /// Installed mappings, in IPA order.
    pub mappings: Vec<HandedMapping>,
    /// Table-pool pages not handed to the core: `(first PA, bytes)`.
    pub free: Vec<(Pa, u64)>,
}

/// Why handed records could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandoverDecodeError {
    /// Not this format (or another version of it).
    #[error("not a mapping-records handover (bad magic)")]
    Magic,
    /// The length does not match the counts in the header.
    #[error("the records are {got} bytes, their header describes {expected:?}")]
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes the counts describe (None: they overflow).
        expected: Option<usize>,
    },
    /// Reading the records failed before their length was reached.
    #[error("reading the records: {0}")]
    Read(std::io::ErrorKind),
}

impl HandedRecords {
    /// Encodes the records.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.mappings.len() * MAPPING_LEN + self.free.len() * FREE_LEN);
        self.encode_to(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Encodes the records into `out` as they are walked: a takeover writes
    /// them straight to the memfd it hands over, not through a copy of the
    /// whole (each copy is memory to fault in while the guests wait).
    pub fn encode_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let parts = Parts { seq: self.seq, next_order: self.next_order, mappings: &self.mappings, free: &self.free };
        parts.write(MAGIC, &[], out)
    }

    /// Decodes records [`HandedRecords::encode`] wrote.
    pub fn decode(mut bytes: &[u8]) -> Result<Self, HandoverDecodeError> {
        let len = bytes.len() as u64;
        Self::decode_from(&mut bytes, len)
    }

    /// Decodes the `len` bytes of records [`HandedRecords::encode_to`]
    /// wrote, read from `input` as they are decoded (no copy of the whole).
    /// Nothing is allocated before the length matches the header's counts.
    pub fn decode_from(input: &mut impl Read, len: u64) -> Result<Self, HandoverDecodeError> {
        let read = Decoded::read(input, len, MAGIC)?;
        if !read.removed.is_empty() {
            // A later version's header.
            return Err(HandoverDecodeError::Magic);
        }
        Ok(Self { seq: read.seq, next_order: read.next_order, mappings: read.mappings, free: read.free })
    }
}

/// What changed in a VM's records between a snapshot, handed over while the
/// old daemon still served the VM, and the records once it was drained
/// ([`faultline_attach::TAKEOVER_WARM`]). The new daemon adopts the
/// snapshot off the guests' stall, then only this.
///
/// Encoded as [`HandedRecords`] are, with the magic `FLHANDD1`, the header's
/// last word the count of removed IPAs, and those IPAs (u64 each) after the
/// free ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandedDelta {
    /// The core's invalidation sequence last seen.
    pub seq: u64,
    /// The next install order.
    pub next_order: u64,
    /// Mappings not in the snapshot, or different there, in IPA order: each
    /// replaces whatever the snapshot has at its IPA.
    pub put: Vec<HandedMapping>,
    /// IPAs of the snapshot's mappings that are gone and not put again, in
    /// IPA order.
    pub removed: Vec<Ipa>,
    /// Table-pool pages not handed to the core (all of them, not a change).
    pub free: Vec<(Pa, u64)>,
}

impl HandedDelta {
    /// What turns `snapshot` into `now` (both in IPA order, as
    /// [`HandedRecords`] are): one walk over the two.
    pub fn between(snapshot: &HandedRecords, now: &HandedRecords) -> Self {
        let mut delta = Self { seq: now.seq, next_order: now.next_order, free: now.free.clone(), ..Self::default() };
        let mut before = snapshot.mappings.iter().peekable();
        for &m in &now.mappings {
            // The snapshot's mappings below this one are gone.
            while let Some(old) = before.next_if(|old| old.ipa.raw() < m.ipa.raw()) {
                delta.removed.push(old.ipa);
            }
            if before.next_if(|old| old.ipa == m.ipa).is_none_or(|old| *old != m) {
                delta.put.push(m);
            }
        }
        delta.removed.extend(before.map(|old| old.ipa));
        delta
    }

    /// How many mappings it puts or removes.
    pub fn changes(&self) -> usize {
        self.put.len() + self.removed.len()
    }

    /// Encodes the delta into `out` as it is walked.
    pub fn encode_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let parts = Parts { seq: self.seq, next_order: self.next_order, mappings: &self.put, free: &self.free };
        parts.write(DELTA_MAGIC, &self.removed, out)
    }

    /// Encodes the delta.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_to(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Decodes the `len` bytes of a delta [`HandedDelta::encode_to`] wrote,
    /// read from `input`.
    pub fn decode_from(input: &mut impl Read, len: u64) -> Result<Self, HandoverDecodeError> {
        let read = Decoded::read(input, len, DELTA_MAGIC)?;
        Ok(Self {
            seq: read.seq,
            next_order: read.next_order,
            put: read.mappings,
            removed: read.removed,
            free: read.free,
        })
    }

    /// Decodes a delta [`HandedDelta::encode`] wrote.
    pub fn decode(mut bytes: &[u8]) -> Result<Self, HandoverDecodeError> {
        let len = bytes.len() as u64;
        Self::decode_from(&mut bytes, len)
    }
}

/// What records and deltas both hold, to write.
struct Parts<'a> {
    seq: u64,
    next_order: u64,
    mappings: &'a [HandedMapping],
    free: &'a [(Pa, u64)],
}

impl Parts<'_> {
    fn write(&self, magic: u64, removed: &[Ipa], out: &mut impl Write) -> std::io::Result<()> {
        let (mappings, free) = (self.mappings.len() as u64, self.free.len() as u64);
        let header = [magic, self.seq, self.next_order, mappings, free, removed.len() as u64];
        let mut put = |v: u64| out.write_all(&v.to_le_bytes());
        header.into_iter().try_for_each(&mut put)?;
        for m in self.mappings {
            [m.ipa.raw(), m.size, m.pa.raw(), m.order].into_iter().try_for_each(&mut put)?;
        }
        for &(pa, bytes) in self.free {
            [pa.raw(), bytes].into_iter().try_for_each(&mut put)?;
        }
        removed.iter().try_for_each(|ipa| put(ipa.raw()))
    }
}

/// What records and deltas both hold, read.
struct Decoded {
    seq: u64,
    next_order: u64,
    mappings: Vec<HandedMapping>,
    free: Vec<(Pa, u64)>,
    removed: Vec<Ipa>,
}

impl Decoded {
    /// Reads `len` bytes written with `magic` from `input`. Nothing is
    /// allocated before the length matches the header's counts.
    fn read(input: &mut impl Read, len: u64, magic: u64) -> Result<Self, HandoverDecodeError> {
        let mut header = [0u8; HEADER_LEN];
        let head = &mut header[..len.min(HEADER_LEN as u64) as usize];
        input.read_exact(head).map_err(|e| HandoverDecodeError::Read(e.kind()))?;
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        if len < 8 || word(0) != magic {
            return Err(HandoverDecodeError::Magic);
        }
        let got = usize::try_from(len).unwrap_or(usize::MAX);
        if got < HEADER_LEN {
            return Err(HandoverDecodeError::Length { got, expected: None });
        }
        let (mappings, free, removed) = (word(24), word(32), word(40));
        let bytes = |count: u64, each: usize| usize::try_from(count).ok().and_then(|c| c.checked_mul(each));
        let expected = bytes(mappings, MAPPING_LEN)
            .zip(bytes(free, FREE_LEN))
            .zip(bytes(removed, REMOVED_LEN))
            .and_then(|((m, f), r)| m.checked_add(f)?.checked_add(r)?.checked_add(HEADER_LEN));
        if expected != Some(got) {
            return Err(HandoverDecodeError::Length { got, expected });
        }
        let mut next = || -> Result<u64, HandoverDecodeError> {
            let mut w = [0u8; 8];
            input.read_exact(&mut w).map_err(|e| HandoverDecodeError::Read(e.kind()))?;
            Ok(u64::from_le_bytes(w))
        };
        let mut out = Self {
            seq: word(8),
            next_order: word(16),
            mappings: Vec::with_capacity(mappings as usize),
            free: Vec::with_capacity(free as usize),
            removed: Vec::with_capacity(removed as usize),
        };
        for _ in 0..mappings {
            let (ipa, size, pa, order) = (next()?, next()?, next()?, next()?);
            out.mappings.push(HandedMapping { ipa: Ipa::new(ipa), size, pa: Pa::new(pa), order });
        }
        for _ in 0..free {
            out.free.push((Pa::new(next()?), next()?));
        }
        for _ in 0..removed {
            out.removed.push(Ipa::new(next()?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> HandedRecords {
        HandedRecords {
            seq: 7,
            next_order: 3,
            mappings: vec![
                HandedMapping { ipa: Ipa::new(0x8000_0000), size: 4096, pa: Pa::new(0x4000_0000), order: 2 },
                HandedMapping { ipa: Ipa::new(0x8020_0000), size: 2 << 20, pa: Pa::new(0x4020_0000), order: 0 },
            ],
            free: vec![(Pa::new(0x1000_0000), 8192)],
        }
    }

    #[test]
    fn records_survive_encoding() {
        let r = records();
        assert_eq!(HandedRecords::decode(&r.encode()), Ok(r));
        assert_eq!(HandedRecords::decode(&HandedRecords::default().encode()), Ok(HandedRecords::default()));
    }

    #[test]
    fn a_cut_or_padded_or_foreign_blob_is_refused() {
        let bytes = records().encode();
        let cut = &bytes[..bytes.len() - 1];
        assert_eq!(
            HandedRecords::decode(cut),
            Err(HandoverDecodeError::Length { got: cut.len(), expected: Some(bytes.len()) })
        );
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0; 16]);
        assert!(matches!(HandedRecords::decode(&padded), Err(HandoverDecodeError::Length { .. })));
        assert_eq!(HandedRecords::decode(&bytes[8..]), Err(HandoverDecodeError::Magic));
        assert_eq!(HandedRecords::decode(&[]), Err(HandoverDecodeError::Magic));
        // Counts that overflow are refused, not allocated.
        let mut huge = bytes[..HEADER_LEN].to_vec();
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(HandedRecords::decode(&huge), Err(HandoverDecodeError::Length { got: HEADER_LEN, expected: None }));
        // A file that ends before the length it reported.
        let short = &mut &bytes[..bytes.len() - 8];
        assert_eq!(
            HandedRecords::decode_from(short, bytes.len() as u64),
            Err(HandoverDecodeError::Read(std::io::ErrorKind::UnexpectedEof))
        );
    }

    fn at(ipa: u64, pa: u64, order: u64) -> HandedMapping {
        HandedMapping { ipa: Ipa::new(ipa), size: 4096, pa: Pa::new(pa), order }
    }

    #[test]
    fn a_delta_is_what_turns_the_snapshot_into_the_drained_records() {
        let snapshot = HandedRecords {
            seq: 3,
            next_order: 4,
            // Kept, evicted, re-installed (a new order), evicted, evicted.
            mappings: vec![at(0x1000, 0xa000, 0), at(0x2000, 0xb000, 1), at(0x3000, 0xc000, 2), at(0x5000, 0xe000, 3)],
            free: vec![(Pa::new(0x10_0000), 8192)],
        };
        let now = HandedRecords {
            seq: 5,
            next_order: 7,
            // Kept, re-installed, new in a hole, new past the end.
            mappings: vec![at(0x1000, 0xa000, 0), at(0x3000, 0xc000, 5), at(0x4000, 0xd000, 4), at(0x9000, 0xf000, 6)],
            free: vec![(Pa::new(0x10_0000), 4096)],
        };
        let delta = HandedDelta::between(&snapshot, &now);
        assert_eq!(delta.put, vec![at(0x3000, 0xc000, 5), at(0x4000, 0xd000, 4), at(0x9000, 0xf000, 6)]);
        assert_eq!(delta.removed, vec![Ipa::new(0x2000), Ipa::new(0x5000)]);
        assert_eq!((delta.seq, delta.next_order, delta.free.clone()), (5, 7, now.free.clone()));
        // Nothing changed: nothing to put or remove.
        let same = HandedDelta::between(&now, &now);
        assert!(same.put.is_empty() && same.removed.is_empty());
        // Everything gone.
        let gone = HandedDelta::between(&snapshot, &HandedRecords::default());
        assert_eq!(gone.removed.len(), 4);
        assert_eq!(HandedDelta::decode(&delta.encode()), Ok(delta));
    }

    #[test]
    fn records_and_deltas_are_not_taken_for_each_other() {
        let delta = HandedDelta { removed: vec![Ipa::new(0x2000)], ..HandedDelta::default() };
        assert_eq!(HandedRecords::decode(&delta.encode()), Err(HandoverDecodeError::Magic));
        assert_eq!(HandedDelta::decode(&records().encode()), Err(HandoverDecodeError::Magic));
        // A delta whose removed IPAs are cut short.
        let bytes = delta.encode();
        assert!(matches!(HandedDelta::decode(&bytes[..bytes.len() - 8]), Err(HandoverDecodeError::Length { .. })));
    }
}
