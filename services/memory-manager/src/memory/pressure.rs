//! The host's memory pressure, from PSI (`/proc/pressure/memory`), and the
//! reserve of fresh backing the daemon still hands out under it.
//!
//! While `some avg10` (the share of the last 10 s in which some task waited
//! on memory) is at or over the configured limit, faults that need fresh
//! backing draw on a reserve; once it is spent they are refused (the guest
//! that wants more memory gets an abort at that access) until the pressure
//! ends. The daemon chooses what to refuse, rather than the OOM killer
//! choosing what to kill. Backing already populated is never refused; a
//! page coming back from a swap store needs fresh backing like any other.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::{info, warn};

/// `[host_memory]` in the config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HostMemoryConfig {
    /// The PSI file read.
    pub psi_file: PathBuf,
    /// Pressure begins when `some avg10` reaches this percentage (0: the
    /// pressure is not watched).
    pub some_avg10_percent: u32,
    /// Fresh backing still handed out in each episode of pressure (MiB).
    pub reserve_mib: u64,
    /// How often the PSI file is read (ms).
    pub poll_ms: u64,
}

impl Default for HostMemoryConfig {
    fn default() -> Self {
        Self {
            psi_file: PathBuf::from("/proc/pressure/memory"),
            some_avg10_percent: 40,
            reserve_mib: 256,
            poll_ms: 250,
        }
    }
}

/// One reading of a PSI file: the 10-second averages, in percent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Psi {
    /// Share of time some task stalled on memory.
    pub some_avg10: f64,
    /// Share of time every non-idle task stalled on memory (0 where the
    /// file has no `full` line).
    pub full_avg10: f64,
}

/// A PSI file that does not read as one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a PSI file: {0}")]
pub struct PsiError(&'static str);

impl Psi {
    /// Parses `some avg10=.. avg60=.. avg300=.. total=..` (and `full ..`).
    pub fn parse(text: &str) -> Result<Self, PsiError> {
        let avg10 = |kind: &str| -> Result<Option<f64>, PsiError> {
            let Some(line) = text.lines().find(|l| l.split_whitespace().next() == Some(kind)) else {
                return Ok(None);
            };
            let field = line.split_whitespace().find_map(|f| f.strip_prefix("avg10="));
            let value = field.ok_or(PsiError("a line without avg10="))?;
            value
                .parse::<f64>()
                .ok()
                .filter(|v| (0.0..=100.0).contains(v))
                .map(Some)
                .ok_or(PsiError("avg10 is not a percentage"))
        };
        Ok(Self {
            some_avg10: avg10("some")?.ok_or(PsiError("no `some` line"))?,
            full_avg10: avg10("full")?.unwrap_or(0.0),
        })
    }
}

/// Fresh backing refused: the host is under memory pressure and this
/// episode's reserve is spent.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("host memory pressure (PSI some avg10 {some_avg10_percent}%): the reserve of fresh backing is spent")]
pub struct Refused {
    /// `some avg10` when pressure was last read, whole percent.
    pub some_avg10_percent: u32,
}

/// The host's memory pressure as last read, and the reserve left.
#[derive(Debug)]
pub struct HostMemory {
    reserve: i64,
    under: AtomicBool,
    left: AtomicI64,
    /// `some avg10` as last read, in hundredths of a percent.
    some_avg10: AtomicU32,
    refused: AtomicU64,
    episodes: AtomicU64,
}

impl HostMemory {
    /// A host whose pressure is read into it, with `reserve` bytes of fresh
    /// backing per episode.
    pub fn new(reserve: u64) -> Self {
        Self {
            reserve: reserve.min(i64::MAX as u64) as i64,
            under: AtomicBool::new(false),
            left: AtomicI64::new(0),
            some_avg10: AtomicU32::new(0),
            refused: AtomicU64::new(0),
            episodes: AtomicU64::new(0),
        }
    }

    /// A host that is never under pressure (nothing reads PSI into it).
    pub fn unwatched() -> Arc<Self> {
        Arc::new(Self::new(0))
    }

    /// Admits `bytes` of fresh backing, or refuses them under pressure once
    /// the reserve is spent. One load when there is no pressure.
    pub fn admit(&self, bytes: u64) -> Result<(), Refused> {
        if !self.under.load(Ordering::Acquire) {
            return Ok(());
        }
        let bytes = bytes.min(i64::MAX as u64) as i64;
        if self.left.fetch_sub(bytes, Ordering::AcqRel) >= bytes {
            return Ok(());
        }
        // Not taken: give it back, so a smaller request may still fit.
        self.left.fetch_add(bytes, Ordering::AcqRel);
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(Refused { some_avg10_percent: self.some_avg10.load(Ordering::Relaxed) / 100 })
    }

    /// Takes a reading against `limit` (percent): a new episode refills the
    /// reserve. Returns whether the pressure began (`Some(true)`) or ended
    /// (`Some(false)`) with this reading.
    pub fn read(&self, psi: Psi, limit: u32) -> Option<bool> {
        self.some_avg10.store((psi.some_avg10 * 100.0).round() as u32, Ordering::Relaxed);
        let under = psi.some_avg10 >= f64::from(limit);
        if under == self.under.load(Ordering::Acquire) {
            return None;
        }
        if under {
            self.left.store(self.reserve, Ordering::Release);
            self.episodes.fetch_add(1, Ordering::Relaxed);
        }
        self.under.store(under, Ordering::Release);
        Some(under)
    }

    /// Whether the host is under pressure now.
    pub fn under_pressure(&self) -> bool {
        self.under.load(Ordering::Acquire)
    }

    /// `some avg10` as last read, percent.
    pub fn some_avg10(&self) -> f64 {
        f64::from(self.some_avg10.load(Ordering::Relaxed)) / 100.0
    }

    /// Faults refused for fresh backing so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Episodes of pressure so far.
    pub fn episodes(&self) -> u64 {
        self.episodes.load(Ordering::Relaxed)
    }

    /// Bytes of this episode's reserve not yet handed out.
    pub fn reserve_left(&self) -> u64 {
        self.left.load(Ordering::Relaxed).max(0) as u64
    }
}

/// Reads `config.psi_file` into `host` every `poll_ms`, on a thread of its
/// own, for the daemon's life. A host without PSI is not watched (said once).
pub fn watch(host: Arc<HostMemory>, config: &HostMemoryConfig) -> std::io::Result<()> {
    if config.some_avg10_percent == 0 {
        info!("host memory pressure not watched (host_memory.some_avg10_percent = 0)");
        return Ok(());
    }
    let (path, limit) = (config.psi_file.clone(), config.some_avg10_percent);
    let period = Duration::from_millis(config.poll_ms.max(10));
    std::thread::Builder::new().name("psi".into()).spawn(move || {
        let mut complained = false;
        loop {
            match read_psi(&path) {
                Ok(psi) => match host.read(psi, limit) {
                    Some(true) => warn!(
                        psi = %path.display(), some_avg10 = psi.some_avg10, limit,
                        reserve_mib = host.reserve_left() >> 20,
                        "host memory pressure: fresh backing is limited to the reserve; past it, faults that need new memory are refused"
                    ),
                    Some(false) => info!(some_avg10 = psi.some_avg10, refused = host.refused(), "host memory pressure over"),
                    None => {}
                },
                Err(e) if !complained => {
                    warn!(psi = %path.display(), cause = %e, "host memory pressure cannot be read; not watched until it can");
                    complained = true;
                }
                Err(_) => {}
            }
            std::thread::sleep(period);
        }
    })?;
    Ok(())
}

fn read_psi(path: &Path) -> std::io::Result<Psi> {
    let text = std::fs::read_to_string(path)?;
    Psi::parse(&text).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALM: &str =
        "some avg10=0.00 avg60=0.12 avg300=0.05 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=9\n";
    const PRESSED: &str =
        "some avg10=62.50 avg60=20.00 avg300=3.00 total=999\nfull avg10=31.25 avg60=0 avg300=0 total=5\n";

    #[test]
    fn psi_files_parse_and_others_are_refused() {
        assert_eq!(Psi::parse(CALM), Ok(Psi { some_avg10: 0.0, full_avg10: 0.0 }));
        assert_eq!(Psi::parse(PRESSED), Ok(Psi { some_avg10: 62.5, full_avg10: 31.25 }));
        // Older kernels have no `full` line for memory... some do not.
        assert_eq!(Psi::parse("some avg10=1.5 avg60=0 avg300=0 total=1").unwrap().full_avg10, 0.0);
        assert!(Psi::parse("").is_err());
        assert!(Psi::parse("some avg60=1.0").is_err());
        assert!(Psi::parse("some avg10=lots").is_err());
        assert!(Psi::parse("some avg10=250.0").is_err());
    }

    #[test]
    fn under_pressure_the_reserve_is_spent_then_faults_are_refused_until_it_ends() {
        let host = HostMemory::new(3 * 4096);
        assert_eq!(host.admit(1 << 30), Ok(()), "no pressure: anything");
        assert_eq!(host.read(Psi::parse(PRESSED).unwrap(), 40), Some(true));
        assert_eq!(host.read(Psi::parse(PRESSED).unwrap(), 40), None, "the same episode");
        for _ in 0..3 {
            assert_eq!(host.admit(4096), Ok(()));
        }
        assert_eq!(host.admit(4096), Err(Refused { some_avg10_percent: 62 }));
        assert_eq!(host.admit(2 << 20), Err(Refused { some_avg10_percent: 62 }));
        assert_eq!((host.refused(), host.reserve_left()), (2, 0));
        assert_eq!(host.read(Psi::parse(CALM).unwrap(), 40), Some(false));
        assert_eq!(host.admit(2 << 20), Ok(()));
        // A new episode: a new reserve; a request larger than what is left
        // is refused without spending it.
        host.read(Psi::parse(PRESSED).unwrap(), 40);
        assert_eq!(host.episodes(), 2);
        assert!(host.admit(4 * 4096).is_err());
        assert_eq!(host.reserve_left(), 3 * 4096);
        assert_eq!(host.admit(4096), Ok(()));
    }
}
