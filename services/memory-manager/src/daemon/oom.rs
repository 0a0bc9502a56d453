//! The daemon's standing with the kernel's OOM killer. One daemon serves
//! every guest on the host: if it is killed, every guest's next fault
//! stalls until a successor is back (and a guest whose memory a killed
//! machine held is lost anyway), so it should be among the last processes
//! chosen. systemd's `OOMScoreAdjust=` does the same for the unit; the
//! daemon sets it itself too, for the other ways it is started.

use std::io;

/// Sets this process's `oom_score_adj` (-1000 to 1000); lowering it below
/// what it was needs CAP_SYS_RESOURCE.
pub fn set_oom_score_adj(value: i32) -> io::Result<()> {
    if !(-1000..=1000).contains(&value) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("oom_score_adj {value} is not in -1000..=1000"),
        ));
    }
    std::fs::write("/proc/self/oom_score_adj", value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's `oom_score_adj`.
    fn oom_score_adj() -> io::Result<i32> {
        std::fs::read_to_string("/proc/self/oom_score_adj")?
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("oom_score_adj: {e}")))
    }

    #[test]
    fn a_value_out_of_range_is_refused_and_the_current_one_reads_back() {
        assert_eq!(set_oom_score_adj(1001).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let now = oom_score_adj().unwrap();
        assert!((-1000..=1000).contains(&now));
        // Raising it needs no privilege (and changes only this test process).
        set_oom_score_adj(now.max(500)).unwrap();
        assert_eq!(oom_score_adj().unwrap(), now.max(500));
    }
}
