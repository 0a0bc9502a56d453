//! Workloads: built-in access patterns and trace replay, plus the flat
//! replay that says what guest memory must hold afterwards.
//!
//! Each vCPU works in its own share of RAM (every n-th 2 MiB chunk) so that
//! no two vCPUs fault on the same page or block, which makes the number of
//! faults exact. Every written value is a function of its address, so the
//! final memory does not depend on how vCPUs interleave.
//!
//! Trace format (text, one access per line, `#` starts a comment):
//! `VCPU OP ADDRESS SIZE`, with OP one of `R` (read), `W` (write), `X`
//! (instruction fetch), ADDRESS a guest physical address (decimal or 0x hex)
//! and SIZE 1, 2, 4 or 8 (4 for fetches). Example: `0 W 0x40001000 8`.
//! A line `PAUSE` ends a phase: every vCPU finishes the accesses before it,
//! then the machine waits (still attached) for a line on its stdin, so a
//! test or an operator can inspect the VM between phases.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::layout::{rom_byte, Layout, MMIO_GPA, ROM_GPA};

const CHUNK: u64 = 2 << 20;

/// A built-in access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Forward through the vCPU's share, 1 KiB apart, writes and reads alternating.
    Sequential,
    /// Uniformly random 8-byte accesses, half writes.
    Random,
    /// Writes 2 MiB + 12 KiB apart, wrapping.
    Strided,
    /// Each page read, then written.
    ReadThenWrite,
    /// Zipf(1.0) over pages: a hot few, a long cold tail.
    Zipf,
    /// A working set beside a streaming scan: Zipf(1.0) over the first
    /// quarter of the vCPU's share, and one pass of writes through the
    /// rest (a file read once, memory filled at boot), one write per page,
    /// spread evenly over the run. Recency says the scan is hot; frequency
    /// says it is not. No accesses to the read-only slot.
    ZipfScan,
    /// Instruction fetches, 256 bytes apart.
    Fetch,
}

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum OpKind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

/// One guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// What it does.
    pub kind: OpKind,
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u8,
}

/// Accesses per vCPU, in program order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Workload {
    /// `per_vcpu[v]` is vCPU v's program.
    pub per_vcpu: Vec<Vec<Op>>,
    /// Pause points: `pauses[k][v]` is where phase k ends in `per_vcpu[v]`.
    pub pauses: Vec<Vec<usize>>,
}

impl Workload {
    /// vCPU `v`'s accesses in phase `k` (phases: one per pause, plus the rest).
    pub fn phase(&self, k: usize, v: usize) -> &[Op] {
        let start = if k == 0 { 0 } else { self.pauses[k - 1][v] };
        let end = self.pauses.get(k).map_or(self.per_vcpu[v].len(), |p| p[v]);
        &self.per_vcpu[v][start..end]
    }

    /// Phases: one more than the pauses.
    pub fn phases(&self) -> usize {
        self.pauses.len() + 1
    }

    /// The workload as a trace ([`parse_trace`] reads it back): each
    /// phase's accesses vCPU by vCPU, a `PAUSE` line between phases.
    pub fn to_trace(&self) -> String {
        use std::fmt::Write;
        let mut text = String::new();
        for k in 0..self.phases() {
            if k > 0 {
                text.push_str("PAUSE\n");
            }
            for v in 0..self.per_vcpu.len() {
                for op in self.phase(k, v) {
                    let kind = match op.kind {
                        OpKind::Read => 'R',
                        OpKind::Write => 'W',
                        OpKind::Fetch => 'X',
                    };
                    let _ = writeln!(text, "{v} {kind} {:#x} {}", op.gpa, op.size);
                }
            }
        }
        text
    }
}

/// The value a write of `size` bytes stores at `gpa`.
pub fn value_for(gpa: u64, size: u8) -> u64 {
    let v = (gpa ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    if size == 8 {
        v
    } else {
        v & ((1u64 << (size as u32 * 8)) - 1)
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The most memory [`generate`] may take for a workload: it is generated
/// before the guest runs, [`Op`] by [`Op`].
pub const MAX_GENERATED_BYTES: u64 = 8 << 30;

/// A workload too large to generate up front.
#[derive(Debug, thiserror::Error)]
#[error(
    "{ops} accesses per vCPU x {vcpus} vCPUs would take {} MiB to generate before the guest runs, more than {} MiB: \
     use fewer --ops",
    .bytes >> 20,
    MAX_GENERATED_BYTES >> 20
)]
pub struct TooLarge {
    ops: u64,
    vcpus: u64,
    bytes: u64,
}

/// Whether `ops` accesses per vCPU on `vcpus` vCPUs fit in
/// [`MAX_GENERATED_BYTES`].
pub fn check_size(ops: u64, vcpus: u64) -> Result<(), TooLarge> {
    let per_vcpu = ops.saturating_add(ops / 32 + 1);
    let bytes = per_vcpu.saturating_mul(vcpus).saturating_mul(std::mem::size_of::<Op>() as u64);
    match bytes <= MAX_GENERATED_BYTES {
        true => Ok(()),
        false => Err(TooLarge { ops, vcpus, bytes }),
    }
}

/// Generates `ops` accesses per vCPU of `pattern` over `layout`'s RAM, with
/// reads and writes of the read-only slot and one MMIO read mixed in.
pub fn generate(pattern: Pattern, layout: &Layout, ops: usize, seed: u64) -> Workload {
    let n = layout.nr_vcpus as u64;
    let per_vcpu = (0..n).map(|v| generate_vcpu(pattern, layout, ops, seed, v, n)).collect();
    Workload { per_vcpu, pauses: Vec::new() }
}

fn generate_vcpu(pattern: Pattern, layout: &Layout, ops: usize, seed: u64, v: u64, n: u64) -> Vec<Op> {
    let chunks: Vec<u64> = (0..layout.ram_size / CHUNK).filter(|c| c % n == v).collect();
    let space = chunks.len() as u64 * CHUNK;
    let at = |vaddr: u64| layout.ram_gpa + chunks[(vaddr / CHUNK) as usize] * CHUNK + vaddr % CHUNK;
    let mut rng = Rng(seed.wrapping_mul(2 * v + 1) | 1);
    let pages = space / 4096;
    // ZipfScan: the working set's pages, and how many accesses apart the
    // scan's writes are.
    let hot_pages = if pattern == Pattern::ZipfScan { (pages / 4).max(1) } else { pages };
    let scan_every = (ops as u64 / (pages - hot_pages).max(1)).max(2);
    let zipf_cdf: Vec<f64> = if matches!(pattern, Pattern::Zipf | Pattern::ZipfScan) {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=hot_pages)
            .map(|r| {
                acc += 1.0 / r as f64;
                acc
            })
            .collect();
        cdf.iter_mut().for_each(|c| *c /= acc);
        cdf
    } else {
        Vec::new()
    };
    let rom_pages = layout.rom_size / 4096;
    let mut out = Vec::with_capacity(ops + ops / 32 + 1);
    for i in 0..ops as u64 {
        let (kind, vaddr, size) = match pattern {
            Pattern::Sequential => (if i % 2 == 0 { OpKind::Write } else { OpKind::Read }, (i * 1024) % space, 8),
            Pattern::Random => {
                let kind = if rng.next() % 2 == 0 { OpKind::Write } else { OpKind::Read };
                (kind, (rng.next() % space) & !7, 8)
            }
            Pattern::Strided => (OpKind::Write, (i * (CHUNK + 12 * 4096)) % space, 8),
            Pattern::ReadThenWrite => {
                let page = i / 2;
                let kind = if i % 2 == 0 { OpKind::Read } else { OpKind::Write };
                (kind, (page * 4096 + (page * 64) % 4096) % space, 4)
            }
            Pattern::ZipfScan if i % scan_every == 0 && hot_pages + i / scan_every < pages => {
                let page = hot_pages + i / scan_every;
                (OpKind::Write, page * 4096 + (page % 512) * 8, 8)
            }
            Pattern::Zipf | Pattern::ZipfScan => {
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                let page = zipf_cdf.partition_point(|&c| c < u).min(hot_pages as usize - 1) as u64;
                let kind = if rng.next() % 2 == 0 { OpKind::Write } else { OpKind::Read };
                (kind, page * 4096 + (rng.next() % 512) * 8, 8)
            }
            Pattern::Fetch => (OpKind::Fetch, (i * 256) % space, 4),
        };
        out.push(Op { kind, gpa: at(vaddr), size });
        // The read-only slot: reads map it, writes exit to the VMM (not in
        // ZipfScan, whose memory is its working set and its scan only).
        if i % 64 == 63 && pattern != Pattern::ZipfScan {
            let k = i / 64;
            let page = (k * n + v) % rom_pages;
            let kind = if i % 256 == 255 { OpKind::Write } else { OpKind::Read };
            out.push(Op { kind, gpa: ROM_GPA + page * 4096 + (k * 8) % 4096, size: 4 });
        }
    }
    // One read outside every memslot: an MMIO exit.
    out.push(Op { kind: OpKind::Read, gpa: MMIO_GPA + v * 8, size: 4 });
    out
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("trace line {line}: {reason}")]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Parses a trace for `nr_vcpus` vCPUs.
pub fn parse_trace(text: &str, nr_vcpus: u32) -> Result<Workload, TraceError> {
    let mut per_vcpu = vec![Vec::new(); nr_vcpus as usize];
    let mut pauses = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason: String| TraceError { line: i + 1, reason };
        if line.eq_ignore_ascii_case("pause") {
            pauses.push(per_vcpu.iter().map(Vec::len).collect());
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 4 {
            return Err(err(format!("expected `VCPU OP ADDRESS SIZE`, got {} fields", f.len())));
        }
        let vcpu: usize = f[0].parse().map_err(|_| err(format!("bad vCPU {:?}", f[0])))?;
        if vcpu >= per_vcpu.len() {
            return Err(err(format!("vCPU {vcpu} but the machine has {nr_vcpus}")));
        }
        let kind = match f[1] {
            "R" | "r" => OpKind::Read,
            "W" | "w" => OpKind::Write,
            "X" | "x" => OpKind::Fetch,
            other => return Err(err(format!("bad operation {other:?} (R, W or X)"))),
        };
        let gpa = match f[2].strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => f[2].parse(),
        }
        .map_err(|_| err(format!("bad address {:?}", f[2])))?;
        let size: u8 = f[3].parse().map_err(|_| err(format!("bad size {:?}", f[3])))?;
        if !matches!(size, 1 | 2 | 4 | 8) || gpa % size as u64 != 0 {
            return Err(err(format!("size {size} must be 1, 2, 4 or 8 and divide the address")));
        }
        per_vcpu[vcpu].push(Op { kind, gpa, size });
    }
    Ok(Workload { per_vcpu, pauses })
}

/// Guest memory after a workload, as the pages it wrote (the rest is
/// zero), and what it predicts.
#[derive(Debug)]
pub struct FlatReplay {
    /// RAM pages the workload wrote, by byte offset of the page: only what
    /// it touched, so the replay of a sparse terabyte guest stays small.
    pub ram: BTreeMap<u64, Box<[u8; 4096]>>,
    /// ROM bytes.
    pub rom: Vec<u8>,
    /// Exits expected: (vCPU, GPA, size, write), in program order per vCPU.
    pub exits: Vec<(u32, u64, u8, bool)>,
    /// RAM 4 KiB pages touched.
    pub ram_pages: BTreeSet<u64>,
    /// RAM 2 MiB blocks touched.
    pub ram_blocks: BTreeSet<u64>,
    /// ROM 4 KiB pages read.
    pub rom_pages_read: BTreeSet<u64>,
}

impl FlatReplay {
    /// The digest of RAM ([`digest_words`]), as the machine reports it.
    pub fn ram_digest(&self) -> u64 {
        digest_words(self.ram.iter().flat_map(|(&page, bytes)| {
            bytes
                .chunks_exact(8)
                .enumerate()
                .map(move |(i, c)| (page + i as u64 * 8, u64::from_le_bytes(c.try_into().expect("8 bytes"))))
        }))
    }

    /// The digest of ROM.
    pub fn rom_digest(&self) -> u64 {
        digest_bytes(&self.rom)
    }

    /// Faults a run must take if every RAM fault maps `ram_granule` bytes.
    pub fn expected_faults(&self, ram_blocks: bool) -> u64 {
        let ram = if ram_blocks { self.ram_blocks.len() } else { self.ram_pages.len() };
        (ram + self.rom_pages_read.len() + self.exits.len()) as u64
    }
}

/// Replays `workload` on plain memory (RAM: the pages it writes).
pub fn replay_flat(layout: &Layout, workload: &Workload) -> FlatReplay {
    let rom: Vec<u8> = (0..layout.rom_size).map(rom_byte).collect();
    let mut r = FlatReplay {
        ram: BTreeMap::new(),
        rom,
        exits: Vec::new(),
        ram_pages: BTreeSet::new(),
        ram_blocks: BTreeSet::new(),
        rom_pages_read: BTreeSet::new(),
    };
    for (v, ops) in workload.per_vcpu.iter().enumerate() {
        for op in ops {
            let len = op.size as u64;
            if layout.in_ram(op.gpa, len) {
                r.ram_pages.insert(op.gpa >> 12);
                r.ram_blocks.insert(op.gpa >> 21);
                if op.kind == OpKind::Write {
                    let off = op.gpa - layout.ram_gpa;
                    let page = r.ram.entry(off & !0xfff).or_insert_with(|| Box::new([0; 4096]));
                    let at = (off & 0xfff) as usize;
                    page[at..at + op.size as usize]
                        .copy_from_slice(&value_for(op.gpa, op.size).to_le_bytes()[..op.size as usize]);
                }
            } else if layout.in_rom(op.gpa, len) && op.kind != OpKind::Write {
                r.rom_pages_read.insert(op.gpa >> 12);
            } else {
                r.exits.push((v as u32, op.gpa, op.size, op.kind == OpKind::Write));
            }
        }
    }
    r
}

/// A digest of memory given as its little-endian u64 words and their byte
/// offsets. Zero words are skipped, so memory that is mostly holes is
/// digested by visiting only its data, and gives the digest of the same
/// bytes read whole.
pub fn digest_words(words: impl Iterator<Item = (u64, u64)>) -> u64 {
    words.filter(|&(_, word)| word != 0).fold(0xcbf2_9ce4_8422_2325u64, |h, (offset, word)| {
        (h ^ word ^ offset.rotate_left(29)).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(7)
    })
}

/// The digest of a flat byte array (its length a multiple of 8).
pub fn digest_bytes(bytes: &[u8]) -> u64 {
    digest_words(
        bytes
            .chunks_exact(8)
            .enumerate()
            .map(|(i, c)| (i as u64 * 8, u64::from_le_bytes(c.try_into().expect("8 bytes")))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_too_large_to_generate_is_refused_with_the_reason() {
        assert!(check_size(100_000, 64).is_ok());
        let err = check_size(10_000_000_000, 2).unwrap_err().to_string();
        assert!(err.starts_with("10000000000 accesses per vCPU x 2 vCPUs would take 314"), "{err}");
        assert!(err.ends_with("more than 8192 MiB: use fewer --ops"), "{err}");
        assert!(check_size(u64::MAX, u64::MAX).is_err(), "no overflow");
    }

    #[test]
    fn trace_parses_and_reports_bad_lines() {
        let w = parse_trace("# header\n0 W 0x40001000 8\n1 r 1073741824 4 # comment\n\n", 2).unwrap();
        assert_eq!(w.per_vcpu[0], vec![Op { kind: OpKind::Write, gpa: 0x4000_1000, size: 8 }]);
        assert_eq!(w.per_vcpu[1], vec![Op { kind: OpKind::Read, gpa: 0x4000_0000, size: 4 }]);
        assert_eq!(parse_trace("0 Q 0x0 8", 1).unwrap_err().line, 1);
        let w = parse_trace("0 W 0x1000 8\n1 W 0x2000 8\nPAUSE\n0 R 0x1000 8\npause\n", 2).unwrap();
        assert_eq!(w.phases(), 3);
        assert_eq!((w.phase(0, 0).len(), w.phase(0, 1).len()), (1, 1));
        assert_eq!((w.phase(1, 0).len(), w.phase(1, 1).len()), (1, 0));
        assert_eq!((w.phase(2, 0).len(), w.phase(2, 1).len()), (0, 0));
        assert!(parse_trace("\n2 R 0x0 8", 2).unwrap_err().reason.contains("vCPU 2"));
        assert!(parse_trace("0 R 0x3 8", 1).is_err());
    }

    #[test]
    fn a_workload_written_as_a_trace_reads_back_the_same() {
        let layout = Layout { nr_vcpus: 2, ..Layout::default() };
        let mut w = generate(Pattern::Random, &layout, 500, 3);
        w.per_vcpu[0].push(Op { kind: OpKind::Fetch, gpa: 0x4000_0100, size: 4 });
        w.pauses = vec![vec![100, 200], vec![501, 200]];
        assert_eq!(parse_trace(&w.to_trace(), 2).unwrap(), w);
    }

    #[test]
    fn zipf_scan_writes_each_cold_page_once_and_keeps_the_rest_in_the_first_quarter() {
        let layout = Layout { ram_size: 64 << 20, ..Layout::default() };
        let w = generate(Pattern::ZipfScan, &layout, 200_000, 5);
        let ram: Vec<u64> =
            w.per_vcpu[0].iter().filter(|o| layout.in_ram(o.gpa, 1)).map(|o| (o.gpa - layout.ram_gpa) >> 12).collect();
        let (hot, scan): (Vec<u64>, Vec<u64>) = ram.iter().partition(|&&p| p < 4096);
        let mut scanned = scan.clone();
        scanned.dedup();
        assert_eq!((scan.len(), scanned.len()), (12_288, 12_288), "each of the other 48 MiB written once, in order");
        assert!(scan.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(hot.len() + scan.len(), 200_000, "RAM only, but for the one MMIO read at the end");
        assert!(
            hot.iter().filter(|&&p| p < 16).count() * 4 > hot.len(),
            "zipf: the first 16 pages take a quarter or more"
        );
    }

    #[test]
    fn vcpus_never_share_a_2mib_chunk() {
        let layout = Layout { nr_vcpus: 4, ..Layout::default() };
        for p in [
            Pattern::Sequential,
            Pattern::Random,
            Pattern::Strided,
            Pattern::ReadThenWrite,
            Pattern::Zipf,
            Pattern::ZipfScan,
            Pattern::Fetch,
        ] {
            let w = generate(p, &layout, 2000, 7);
            let mut owner = std::collections::HashMap::new();
            for (v, ops) in w.per_vcpu.iter().enumerate() {
                for op in ops.iter().filter(|o| layout.in_ram(o.gpa, 1)) {
                    assert_eq!(*owner.entry(op.gpa >> 21).or_insert(v), v, "{p:?}");
                }
            }
        }
    }

    #[test]
    fn the_replay_keeps_only_written_pages_and_digests_like_the_whole_memory() {
        let layout = Layout { ram_size: 1 << 30, ..Layout::default() };
        let w = parse_trace("0 W 0x40001008 8\n0 W 0x7ff00000 4\n0 R 0x40200000 8\n0 W 0x40001008 8\n", 1).unwrap();
        let flat = replay_flat(&layout, &w);
        assert_eq!(flat.ram.keys().copied().collect::<Vec<_>>(), [0x1000, 0x3ff0_0000], "written pages only");
        // The same bytes as one flat array give the same digest.
        let mut whole = vec![0u8; layout.ram_size as usize];
        for (&page, bytes) in &flat.ram {
            whole[page as usize..page as usize + 4096].copy_from_slice(&bytes[..]);
        }
        assert_eq!(flat.ram_digest(), digest_bytes(&whole));
        // Zero words are skipped; where the data is still counts.
        let moved = digest_words([(8, 5), (16, 0)].into_iter());
        assert_eq!(moved, digest_words([(8, 5)].into_iter()));
        assert_ne!(moved, digest_words([(16, 5)].into_iter()));
    }
}
