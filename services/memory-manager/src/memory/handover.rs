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
}

impl HandedRecords {
    /// Encodes the records.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.mappings.len() * MAPPING_LEN + self.free.len() * FREE_LEN);
        let header = [MAGIC, self.seq, self.next_order, self.mappings.len() as u64, self.free.len() as u64, 0];
        let mut put = |v: u64| out.extend_from_slice(&v.to_le_bytes());
        header.into_iter().for_each(&mut put);
        for m in &self.mappings {
            [m.ipa.raw(), m.size, m.pa.raw(), m.order].into_iter().for_each(&mut put);
        }
        for &(pa, bytes) in &self.free {
            [pa.raw(), bytes].into_iter().for_each(&mut put);
        }
        out
    }

    /// Decodes records [`HandedRecords::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, HandoverDecodeError> {
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if bytes.len() < 8 || word(0) != MAGIC {
            return Err(HandoverDecodeError::Magic);
        }
        if bytes.len() < HEADER_LEN {
            return Err(HandoverDecodeError::Length { got: bytes.len(), expected: None });
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
        if expected != Some(bytes.len()) {
            return Err(HandoverDecodeError::Length { got: bytes.len(), expected });
        }
        let at_mappings = HEADER_LEN;
        let at_free = at_mappings + mappings as usize * MAPPING_LEN;
        Ok(Self {
            seq: word(8),
            next_order: word(16),
            mappings: (0..mappings as usize)
                .map(|i| at_mappings + i * MAPPING_LEN)
                .map(|at| HandedMapping {
                    ipa: Ipa::new(word(at)),
                    size: word(at + 8),
                    pa: Pa::new(word(at + 16)),
                    order: word(at + 24),
                })
                .collect(),
            free: (0..free as usize)
                .map(|i| at_free + i * FREE_LEN)
                .map(|at| (Pa::new(word(at)), word(at + 8)))
                .collect(),
        })
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
    }
}
