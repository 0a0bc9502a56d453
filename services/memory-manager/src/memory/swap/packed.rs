//! The packed layout: each reclaimed 4 KiB page compressed with lz4 (kept
//! as it is if that does not make it smaller, and not kept at all if it is
//! zeros), appended to a data log, and found through an index of 16-byte
//! entries by page number.
//!
//! Files, in a VM's state directory:
//! - `region<i>.index`: entry `n` at byte `16 n` describes region page `n`
//!   (all zeros: not held); sparse, and a block whose 256 entries are all
//!   cleared is punched out again;
//! - `region<i>.log0` and `region<i>.log1`: the data. Pages are appended to
//!   the current log. A log nothing points into any more is emptied; once
//!   more than half of a log of 1 MiB or more is dead (its pages came
//!   back), compaction copies the live pages to the other log, points their
//!   entries there and empties the old one.
//!
//! Crash consistency, with writes in this order:
//! - a reclaim appends the data, makes the log durable, writes the entries
//!   and makes the index durable, all before the page leaves the guest
//!   (data without an entry is dead bytes, never read);
//! - a fault back writes the page into the guest before it clears the
//!   entry (both hold it, with the same bytes, until then);
//! - compaction makes the copies durable before any entry points at them,
//!   and the index durable before it empties the old log. An entry points
//!   to one log or the other, and a crash between leaves both in use: the
//!   next open moves the other log's pages into the current one.
//!
//! Every entry is checked when the store is opened (its form, its log, and
//! that its bytes lie inside the log), and every page against its checksum
//! when it comes back; a page that fails is an error, never zeros.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use faultline_attach::shm::{data_segments, MappedRegion};

use super::datasync;

/// Bytes of a page as the store keeps it.
const PAGE: u64 = 4096;
/// Bytes of an index entry.
const ENTRY: u64 = 16;
/// A log is compacted once it has this many bytes, more than half dead.
const COMPACT_FROM: u64 = 1 << 20;
/// Index entries in a 4 KiB block of the index.
const ENTRIES_PER_BLOCK: u64 = PAGE / ENTRY;
/// Pages moved per batch of reads and one write while compacting.
const MOVE_PAGES: usize = 1024;

/// How a page is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// All zeros: no data.
    Zero = 1,
    /// lz4 block format.
    Lz4 = 2,
    /// As it is (it does not compress).
    Raw = 3,
}

/// Where a page is and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    form: Form,
    /// Which log (0 or 1).
    log: usize,
    /// First byte in the log.
    offset: u64,
    /// Bytes in the log.
    len: u64,
    /// [`checksum`] of the page.
    check: u32,
}

impl Entry {
    /// Little-endian: offset (8), length (2), form (1), log (1), checksum (4).
    fn encode(&self) -> [u8; ENTRY as usize] {
        let mut b = [0u8; ENTRY as usize];
        b[..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..10].copy_from_slice(&(self.len as u16).to_le_bytes());
        b[10] = self.form as u8;
        b[11] = self.log as u8;
        b[12..].copy_from_slice(&self.check.to_le_bytes());
        b
    }

    /// The entry in `b`, `None` for an empty one; an entry that cannot be
    /// one this store wrote is an error naming why.
    fn decode(b: &[u8]) -> Result<Option<Self>, &'static str> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let offset = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let len = u16::from_le_bytes([b[8], b[9]]) as u64;
        let form = match b[10] {
            1 => Form::Zero,
            2 => Form::Lz4,
            3 => Form::Raw,
            _ => return Err("unknown form"),
        };
        let log = match b[11] {
            0 | 1 => b[11] as usize,
            _ => return Err("unknown log"),
        };
        let fits = match form {
            Form::Zero => len == 0 && offset == 0,
            Form::Raw => len == PAGE,
            Form::Lz4 => len > 0 && len < PAGE,
        };
        if !fits {
            return Err("length does not fit its form");
        }
        let check = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        Ok(Some(Self { form, log, offset, len, check }))
    }

    /// Where its bytes end in its log (saturated: an entry read back from
    /// a damaged index may hold any offset).
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// A checksum of a page: FNV-1a over its 64-bit words, folded to 32 bits.
/// It catches torn and stray writes to the store, not an adversary.
fn checksum(page: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in page.chunks_exact(8) {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32
}

/// Bytes read from a log, and the pages (with their entries) they hold,
/// back to back.
type Run<'a> = (Vec<u8>, &'a [(u64, Entry)]);

/// A region's packed store.
#[derive(Debug)]
pub struct PackedStore {
    index: File,
    logs: [File; 2],
    /// The log pages are appended to.
    current: usize,
    /// Each log's length.
    tails: [u64; 2],
    /// Bytes of each log that entries point at.
    live: [u64; 2],
    /// The index, by page number.
    entries: BTreeMap<u64, Entry>,
    /// Entries of pages put and not yet synced.
    pending: Vec<(u64, Entry)>,
}

impl PackedStore {
    /// The index's name in a VM's state directory.
    pub fn index_name(index: usize) -> String {
        format!("region{index}.index")
    }

    /// The store in `dir`: created empty, or the one a predecessor left,
    /// every entry checked (an entry that cannot be right is an
    /// `InvalidData` error: the pages it stands for would be lost).
    pub fn in_dir(dir: &Path, index: usize, size: u64) -> io::Result<Self> {
        let open =
            |name: String| OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join(name));
        let index_file = open(Self::index_name(index))?;
        let logs = [open(format!("region{index}.log0"))?, open(format!("region{index}.log1"))?];
        let mut store = Self::load(index_file, logs, size)?;
        store.finish_compaction()?;
        Ok(store)
    }

    /// Reads and checks the index; the index is sized for a region of `size`.
    fn load(index: File, logs: [File; 2], size: u64) -> io::Result<Self> {
        let index_len = size / PAGE * ENTRY;
        if index.metadata()?.len() != index_len {
            index.set_len(index_len)?;
        }
        let tails = [logs[0].metadata()?.len(), logs[1].metadata()?.len()];
        let mut entries = BTreeMap::new();
        let mut live = [0u64; 2];
        for (lo, hi) in data_segments(&index, 0, index_len)? {
            let mut bytes = vec![0u8; (hi - lo) as usize];
            index.read_exact_at(&mut bytes, lo)?;
            for (i, b) in bytes.chunks_exact(ENTRY as usize).enumerate() {
                let page = lo / ENTRY + i as u64;
                let bad = |why: &str| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("index entry of page {page:#x}: {why}"))
                };
                let Some(e) = Entry::decode(b).map_err(bad)? else { continue };
                if e.end() > tails[e.log] {
                    return Err(bad("its bytes lie past the end of its log"));
                }
                live[e.log] += e.len;
                entries.insert(page, e);
            }
        }
        let current = usize::from(live[1] > live[0]);
        Ok(Self { index, logs, current, tails, live, entries, pending: Vec::new() })
    }

    /// Files' allocated bytes.
    pub fn allocated(&self) -> io::Result<u64> {
        let mut total = super::allocated(&self.index)?;
        for log in &self.logs {
            total += super::allocated(log)?;
        }
        Ok(total)
    }

    /// Guest bytes held.
    pub fn held_bytes(&self) -> u64 {
        self.entries.len() as u64 * PAGE
    }

    /// Packs the pages of `[offset, offset + len)` and appends them to the
    /// current log; their entries wait for [`Self::sync`]. On an error,
    /// nothing put since the last sync is kept.
    pub fn put(&mut self, map: &MappedRegion, offset: u64, len: u64) -> io::Result<()> {
        let result = self.append(map, offset, len);
        if result.is_err() {
            self.pending.clear();
        }
        result
    }

    fn append(&mut self, map: &MappedRegion, offset: u64, len: u64) -> io::Result<()> {
        let log = self.current;
        let mut page = [0u8; PAGE as usize];
        let mut packed = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE as usize)];
        let mut out = Vec::new();
        for p in offset / PAGE..(offset + len).div_ceil(PAGE) {
            map.read_into(p * PAGE, &mut page)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range outside the region"))?;
            let check = checksum(&page);
            let at = self.tails[log] + out.len() as u64;
            let entry = |form, len| Entry { form, log, offset: at, len, check };
            let e = if page.iter().all(|&b| b == 0) {
                Entry { offset: 0, ..entry(Form::Zero, 0) }
            } else {
                match lz4_flex::block::compress_into(&page, &mut packed).map_err(io::Error::other)? {
                    n if (n as u64) < PAGE => {
                        out.extend_from_slice(&packed[..n]);
                        entry(Form::Lz4, n as u64)
                    }
                    _ => {
                        out.extend_from_slice(&page);
                        entry(Form::Raw, PAGE)
                    }
                }
            };
            self.pending.push((p, e));
        }
        self.logs[log].write_all_at(&out, self.tails[log])?;
        self.tails[log] += out.len() as u64;
        Ok(())
    }

    /// Holds the pages put since the last sync: their data made durable,
    /// then their entries written, then the index made durable.
    pub fn sync(&mut self) -> io::Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(());
        }
        datasync(&self.logs[self.current])?;
        pending.sort_unstable_by_key(|&(p, _)| p);
        self.write_entries(pending.iter().map(|&(p, e)| (p, Some(e))))?;
        datasync(&self.index)?;
        for (p, e) in pending {
            self.live[e.log] += e.len;
            if let Some(old) = self.entries.insert(p, e) {
                self.live[old.log] -= old.len;
            }
        }
        Ok(())
    }

    /// Writes entries (`None`: cleared) for pages in ascending order, a
    /// run of consecutive pages per write.
    fn write_entries(&self, entries: impl Iterator<Item = (u64, Option<Entry>)>) -> io::Result<()> {
        let mut run: Vec<u8> = Vec::new();
        let mut first = 0;
        let mut next = None;
        for (p, e) in entries {
            if next != Some(p) {
                if !run.is_empty() {
                    self.index.write_all_at(&run, first * ENTRY)?;
                }
                run.clear();
                first = p;
            }
            run.extend_from_slice(&e.map_or([0; ENTRY as usize], |e| e.encode()));
            next = Some(p + 1);
        }
        if !run.is_empty() {
            self.index.write_all_at(&run, first * ENTRY)?;
        }
        Ok(())
    }

    /// The entries of the pages `[lo, hi)` touches, in page order.
    fn entries_in(&self, lo: u64, hi: u64) -> Vec<(u64, Entry)> {
        self.entries.range(lo / PAGE..hi.div_ceil(PAGE)).map(|(&p, &e)| (p, e)).collect()
    }

    /// The held ranges of `[lo, hi)`.
    pub fn held(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (p, _) in self.entries_in(lo, hi) {
            let (from, to) = ((p * PAGE).max(lo), ((p + 1) * PAGE).min(hi));
            match out.last_mut() {
                Some(last) if last.1 == from => last.1 = to,
                _ => out.push((from, to)),
            }
        }
        out
    }

    /// Unpacks the held pages of `[lo, hi)` into `map`, then clears their
    /// entries; true if it held any.
    pub fn take(&mut self, map: &MappedRegion, lo: u64, hi: u64) -> io::Result<bool> {
        let pages: Vec<(u64, Entry)> =
            self.entries.range(lo / PAGE..hi.div_ceil(PAGE)).map(|(&p, &e)| (p, e)).collect();
        if pages.is_empty() {
            return Ok(false);
        }
        let mut page = [0u8; PAGE as usize];
        for (data, run) in self.read_runs(&pages)? {
            let mut at = 0;
            for &(p, e) in run {
                self.unpack(&e, &data[at..at + e.len as usize], &mut page).map_err(|why| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("swapped page at {:#x}: {why}", p * PAGE))
                })?;
                at += e.len as usize;
                map.write_from(p * PAGE, &page)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "page outside the region"))?;
            }
        }
        self.forget(&pages)?;
        Ok(true)
    }

    /// Clears the entries of `[lo, hi)`.
    pub fn discard(&mut self, lo: u64, hi: u64) -> io::Result<()> {
        let pages: Vec<(u64, Entry)> =
            self.entries.range(lo / PAGE..hi.div_ceil(PAGE)).map(|(&p, &e)| (p, e)).collect();
        self.forget(&pages)
    }

    /// Reads the data of `pages` (ascending), one read per run of pages
    /// whose bytes follow each other in one log.
    fn read_runs<'a>(&self, pages: &'a [(u64, Entry)]) -> io::Result<Vec<Run<'a>>> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < pages.len() {
            let first = pages[start].1;
            let mut end = start + 1;
            while end < pages.len() && pages[end].1.log == first.log && pages[end].1.offset == pages[end - 1].1.end() {
                end += 1;
            }
            let mut data = vec![0u8; (pages[end - 1].1.end() - first.offset) as usize];
            self.logs[first.log].read_exact_at(&mut data, first.offset)?;
            out.push((data, &pages[start..end]));
            start = end;
        }
        Ok(out)
    }

    /// The page `e` stands for, from its bytes `data`, checked.
    fn unpack(&self, e: &Entry, data: &[u8], page: &mut [u8; PAGE as usize]) -> Result<(), String> {
        match e.form {
            Form::Zero => page.fill(0),
            Form::Raw => page.copy_from_slice(data),
            Form::Lz4 => match lz4_flex::block::decompress_into(data, page) {
                Ok(n) if n as u64 == PAGE => {}
                Ok(n) => return Err(format!("unpacks to {n} bytes")),
                Err(e) => return Err(format!("does not unpack: {e}")),
            },
        }
        if checksum(page) != e.check {
            return Err("fails its checksum".into());
        }
        Ok(())
    }

    /// Clears the entries of `pages` (ascending) and gives back the index
    /// blocks left empty, then empties or compacts the log if it is time.
    fn forget(&mut self, pages: &[(u64, Entry)]) -> io::Result<()> {
        self.write_entries(pages.iter().map(|&(p, _)| (p, None)))?;
        for (p, e) in pages {
            self.entries.remove(p);
            self.live[e.log] -= e.len;
        }
        let mut blocks: Vec<u64> = pages.iter().map(|&(p, _)| p / ENTRIES_PER_BLOCK).collect();
        blocks.dedup();
        for b in blocks {
            let first = b * ENTRIES_PER_BLOCK;
            if self.entries.range(first..first + ENTRIES_PER_BLOCK).next().is_none() {
                super::punch(&self.index, first * ENTRY, PAGE)?;
            }
        }
        let (from, to) = (self.current, 1 - self.current);
        if self.live[from] == 0 && self.tails[from] > 0 {
            // Nothing points into it (zero pages have no data): no copy.
            self.logs[from].set_len(0)?;
            self.tails[from] = 0;
        } else if self.tails[from] >= COMPACT_FROM && self.live[from] * 2 < self.tails[from] && self.live[to] == 0 {
            self.logs[to].set_len(0)?;
            self.tails[to] = 0;
            self.move_pages(from, to)?;
            self.current = to;
        }
        Ok(())
    }

    /// After a crash during compaction both logs are in use: moves the
    /// pages of the other log into the current one. Then empties a log
    /// nothing points into (dead bytes of a reclaim that never synced).
    fn finish_compaction(&mut self) -> io::Result<()> {
        let other = 1 - self.current;
        if self.live[other] > 0 {
            self.move_pages(other, self.current)?;
        }
        for log in [other, self.current] {
            if self.live[log] == 0 && self.tails[log] > 0 {
                self.logs[log].set_len(0)?;
                self.tails[log] = 0;
            }
        }
        Ok(())
    }

    /// Copies the data of every page in log `from` to the end of log `to`,
    /// makes it durable, points the entries there, makes the index durable,
    /// and empties `from`.
    fn move_pages(&mut self, from: usize, to: usize) -> io::Result<()> {
        let moving: Vec<(u64, Entry)> =
            self.entries.iter().filter(|(_, e)| e.log == from && e.len > 0).map(|(&p, &e)| (p, e)).collect();
        let mut moved = Vec::with_capacity(moving.len());
        for chunk in moving.chunks(MOVE_PAGES) {
            let mut out = Vec::new();
            for (data, run) in self.read_runs(chunk)? {
                let mut at = 0;
                for &(p, e) in run {
                    let offset = self.tails[to] + out.len() as u64;
                    out.extend_from_slice(&data[at..at + e.len as usize]);
                    at += e.len as usize;
                    moved.push((p, Entry { log: to, offset, ..e }));
                }
            }
            self.logs[to].write_all_at(&out, self.tails[to])?;
            self.tails[to] += out.len() as u64;
        }
        datasync(&self.logs[to])?;
        // Zero pages have no data; they move by their entry alone.
        moved.extend(
            self.entries
                .iter()
                .filter(|(_, e)| e.log == from && e.len == 0)
                .map(|(&p, &e)| (p, Entry { log: to, ..e })),
        );
        moved.sort_unstable_by_key(|&(p, _)| p);
        self.write_entries(moved.iter().map(|&(p, e)| (p, Some(e))))?;
        datasync(&self.index)?;
        for (p, e) in moved {
            self.entries.insert(p, e);
        }
        self.live[to] += self.live[from];
        self.live[from] = 0;
        self.logs[from].set_len(0)?;
        self.tails[from] = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A mapped memfd of `pages` pages: page `p` holds a pattern that
    /// compresses (`p % 3 == 0`), noise (`p % 3 == 1`) or zeros.
    fn guest(pages: u64) -> MappedRegion {
        let memfd = memfd::MemfdOptions::default().create("guest").unwrap();
        memfd.as_file().set_len(pages * PAGE).unwrap();
        let map = MappedRegion::map(memfd.as_file().as_fd(), 0, pages * PAGE, PAGE).unwrap();
        for p in 0..pages {
            map.write_from(p * PAGE, &contents(p)).unwrap();
        }
        map
    }

    fn contents(p: u64) -> Vec<u8> {
        let mut rng = crate::memory::test_rng::XorShift::new(p.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        (0..PAGE)
            .map(|i| match p % 3 {
                0 => (i / 64 + p) as u8,
                1 => rng.next_u64() as u8,
                _ => 0,
            })
            .collect()
    }

    fn page(map: &MappedRegion, p: u64) -> Vec<u8> {
        let mut b = vec![0u8; PAGE as usize];
        map.read_into(p * PAGE, &mut b).unwrap();
        b
    }

    fn wipe(map: &MappedRegion, lo: u64, hi: u64) {
        for p in lo..hi {
            map.write_from(p * PAGE, &[0xee; PAGE as usize]).unwrap();
        }
    }

    #[test]
    fn pages_come_back_as_they_went_and_take_less_room() {
        let dir = tempfile::tempdir().unwrap();
        let map = guest(96);
        let mut store = PackedStore::in_dir(dir.path(), 0, 96 * PAGE).unwrap();
        store.put(&map, 0, 96 * PAGE).unwrap();
        assert_eq!(store.held(0, 96 * PAGE), [], "not held before the sync");
        store.sync().unwrap();
        assert_eq!(store.held(0, 96 * PAGE), [(0, 96 * PAGE)]);
        assert_eq!(store.held(PAGE + 100, 3 * PAGE), [(PAGE + 100, 3 * PAGE)]);
        // 32 pages of noise take a page each, 32 of a pattern a few hundred
        // bytes each, and 32 of zeros nothing.
        let logged = store.tails[0];
        assert!((32 * PAGE..36 * PAGE).contains(&logged), "{logged} bytes logged");
        assert_eq!(store.held_bytes(), 96 * PAGE);
        wipe(&map, 0, 96);
        assert!(store.take(&map, 10 * PAGE, 20 * PAGE).unwrap());
        assert!(!store.take(&map, 10 * PAGE, 20 * PAGE).unwrap(), "let go of");
        for p in 0..96 {
            let want = if (10..20).contains(&p) { contents(p) } else { vec![0xee; PAGE as usize] };
            assert!(page(&map, p) == want, "page {p}");
        }
        assert_eq!(store.held(0, 96 * PAGE), [(0, 10 * PAGE), (20 * PAGE, 96 * PAGE)]);
        store.discard(0, 10 * PAGE).unwrap();
        assert_eq!(store.held_bytes(), 76 * PAGE);
        // All back: the files take nothing any more.
        assert!(store.allocated().unwrap() > 0);
        store.take(&map, 0, 96 * PAGE).unwrap();
        assert_eq!((store.held_bytes(), store.allocated().unwrap()), (0, 0));
    }

    #[test]
    fn a_store_opened_again_holds_what_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let map = guest(30);
        {
            let mut store = PackedStore::in_dir(dir.path(), 2, 30 * PAGE).unwrap();
            store.put(&map, 4 * PAGE, 8 * PAGE).unwrap();
            store.sync().unwrap();
            // Put and never synced: dead bytes, not held.
            store.put(&map, 20 * PAGE, 2 * PAGE).unwrap();
        }
        wipe(&map, 0, 30);
        let mut store = PackedStore::in_dir(dir.path(), 2, 30 * PAGE).unwrap();
        assert_eq!(store.held(0, 30 * PAGE), [(4 * PAGE, 12 * PAGE)]);
        assert!(store.take(&map, 0, 30 * PAGE).unwrap());
        for p in 4..12 {
            assert!(page(&map, p) == contents(p), "page {p}");
        }
        assert_eq!(page(&map, 20), vec![0xee; PAGE as usize]);
    }

    #[test]
    fn a_damaged_page_is_an_error_and_stays_held() {
        let dir = tempfile::tempdir().unwrap();
        let map = guest(6);
        let mut store = PackedStore::in_dir(dir.path(), 0, 6 * PAGE).unwrap();
        store.put(&map, 0, 6 * PAGE).unwrap();
        store.sync().unwrap();
        assert_eq!((store.entries[&2].form, store.entries[&2].len), (Form::Zero, 0));
        // Page 1 is noise, kept raw: a flipped byte fails the checksum.
        let raw = store.entries[&1];
        assert_eq!(raw.form, Form::Raw);
        store.logs[0].write_all_at(&[0x5a], raw.offset + 7).unwrap();
        wipe(&map, 0, 6);
        let err = store.take(&map, PAGE, 2 * PAGE).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("0x1000") && err.to_string().contains("checksum"), "{err}");
        assert_eq!(store.held(PAGE, 2 * PAGE), [(PAGE, 2 * PAGE)]);
        // Page 0 compresses: cut short, it does not unpack.
        let lz = store.entries[&0];
        assert_eq!(lz.form, Form::Lz4);
        store.logs[0].write_all_at(&vec![0xff; lz.len as usize], lz.offset).unwrap();
        assert_eq!(store.take(&map, 0, PAGE).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn an_index_entry_that_cannot_be_right_refuses_the_store() {
        let map = guest(4);
        let cases: [(usize, &[u8], &str); 4] = [
            (10, &[9], "unknown form"),
            (11, &[2], "unknown log"),
            (7, &[0x7f], "past the end of its log"),
            // An offset whose end overflows.
            (0, &[0xff; 8], "past the end of its log"),
        ];
        for (byte, value, why) in cases {
            let dir = tempfile::tempdir().unwrap();
            let mut store = PackedStore::in_dir(dir.path(), 0, 4 * PAGE).unwrap();
            store.put(&map, 0, 4 * PAGE).unwrap();
            store.sync().unwrap();
            drop(store);
            let index = OpenOptions::new().write(true).open(dir.path().join("region0.index")).unwrap();
            index.write_all_at(value, ENTRY + byte as u64).unwrap();
            let err = PackedStore::in_dir(dir.path(), 0, 4 * PAGE).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("page 0x1") && err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn compaction_moves_the_live_pages_and_frees_the_dead() {
        let dir = tempfile::tempdir().unwrap();
        let pages = 1200;
        let map = guest(pages);
        let mut store = PackedStore::in_dir(dir.path(), 0, pages * PAGE).unwrap();
        store.put(&map, 0, pages * PAGE).unwrap();
        store.sync().unwrap();
        let before = store.tails[0];
        assert!(before >= COMPACT_FROM);
        wipe(&map, 0, pages);
        // Take back all but every 10th page: the log is mostly dead.
        for p in (0..pages).filter(|p| p % 10 != 0) {
            store.take(&map, p * PAGE, (p + 1) * PAGE).unwrap();
        }
        assert_eq!(store.current, 1, "compacted into the other log");
        assert_eq!(store.tails[0], 0);
        assert!(store.tails[1] < before / 2, "{} of {before} bytes left", store.tails[1]);
        drop(store);
        wipe(&map, 0, pages);
        let mut store = PackedStore::in_dir(dir.path(), 0, pages * PAGE).unwrap();
        assert_eq!(store.held_bytes(), pages / 10 * PAGE);
        store.take(&map, 0, pages * PAGE).unwrap();
        for p in (0..pages).step_by(10) {
            assert!(page(&map, p) == contents(p), "page {p}");
        }
    }

    #[test]
    fn a_compaction_cut_short_is_finished_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let map = guest(12);
        let mut store = PackedStore::in_dir(dir.path(), 0, 12 * PAGE).unwrap();
        store.put(&map, 0, 12 * PAGE).unwrap();
        store.sync().unwrap();
        // The crash left the odd pages' entries pointing at a copy in log 1.
        let len = store.tails[0];
        let mut data = vec![0u8; len as usize];
        store.logs[0].read_exact_at(&mut data, 0).unwrap();
        store.logs[1].write_all_at(&data, 0).unwrap();
        for (&p, e) in store.entries.iter().filter(|(p, _)| *p % 2 == 1) {
            store.index.write_all_at(&Entry { log: 1, ..*e }.encode(), p * ENTRY).unwrap();
        }
        drop(store);
        wipe(&map, 0, 12);
        let mut store = PackedStore::in_dir(dir.path(), 0, 12 * PAGE).unwrap();
        assert_eq!((store.live[1], store.tails[1]), (0, 0), "log 1 moved and emptied");
        assert!(store.entries.values().all(|e| e.log == store.current));
        store.take(&map, 0, 12 * PAGE).unwrap();
        for p in 0..12 {
            assert!(page(&map, p) == contents(p), "page {p}");
        }
    }
}
