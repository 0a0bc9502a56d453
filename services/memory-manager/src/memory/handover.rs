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
        let header = [MAGIC, self.seq, self.next_order, self.mappings.len() as u64, self.free.len() as u64, 0];
        let mut put = |v: u64| out.write_all(&v.to_le_bytes());
        header.into_iter().try_for_each(&mut put)?;
        for m in &self.mappings {
            [m.ipa.raw(), m.size, m.pa.raw(), m.order].into_iter().try_for_each(&mut put)?;
        }
        for &(pa, bytes) in &self.free {
            [pa.raw(), bytes].into_iter().try_for_each(&mut put)?;
        }
        Ok(())
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
        let mut header = [0u8; HEADER_LEN];
        let head = &mut header[..len.min(HEADER_LEN as u64) as usize];
        input.read_exact(head).map_err(|e| HandoverDecodeError::Read(e.kind()))?;
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        if len < 8 || word(0) != MAGIC {
            return Err(HandoverDecodeError::Magic);
        }
        let got = usize::try_from(len).unwrap_or(usize::MAX);
        if got < HEADER_LEN {
            return Err(HandoverDecodeError::Length { got, expected: None });
        }
        if word(40) != 0 {
            // A later version's header.
            return Err(HandoverDecodeError::Magic);
        }
        let (mappings, free) = (word(24), word(32));
        let expected = usize::try_from(mappings)
            .ok()
            .and_then(|m| m.checked_mul(MAPPING_LEN))
            .zip(usize::try_from(free).ok().and_then(|f| f.checked_mul(FREE_LEN)))
            .and_then(|(m, f)| m.checked_add(f)?.checked_add(HEADER_LEN));
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
        };
        for _ in 0..mappings {
            let (ipa, size, pa, order) = (next()?, next()?, next()?, next()?);
            out.mappings.push(HandedMapping { ipa: Ipa::new(ipa), size, pa: Pa::new(pa), order });
        }
        for _ in 0..free {
            out.free.push((Pa::new(next()?), next()?));
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
}
