//! What Linux says about a process: CPU seconds from `/proc/<pid>/stat`
//! (user + system), resident memory now and at its peak from
//! `/proc/<pid>/status` (`VmRSS`, `VmHWM`). The server runs as a child
//! process of the benchmark precisely so these figures are its own.

use std::path::PathBuf;

/// Clock ticks per second of `/proc/<pid>/stat` times. `sysconf(_SC_CLK_TCK)`
/// is 100 on every Linux this runs on; asking `getconf` keeps the code free
/// of `unsafe` and still follows an unusual kernel.
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    /// User + system CPU time so far.
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    /// Peak resident memory over the process's life.
    pub peak_rss_bytes: u64,
}

/// Why a process cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unexpected format of {path}")]
    Format { path: PathBuf },
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn sample(pid: u32, ticks_per_second: f64) -> Result<ProcessSample, ProcError> {
    let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
    let stat = std::fs::read_to_string(&stat_path).map_err(|source| ProcError::Read {
        path: stat_path.clone(),
        source,
    })?;
    let ticks = cpu_ticks(&stat).ok_or(ProcError::Format { path: stat_path })?;
    let status_path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&status_path).map_err(|source| ProcError::Read {
        path: status_path.clone(),
        source,
    })?;
    let kib = |key| {
        status_kib(&status, key).ok_or(ProcError::Format {
            path: status_path.clone(),
        })
    };
    Ok(ProcessSample {
        cpu_seconds: ticks as f64 / ticks_per_second,
        rss_bytes: kib("VmRSS:")? * 1024,
        peak_rss_bytes: kib("VmHWM:")? * 1024,
    })
}

/// utime + stime (fields 14 and 15) of a `stat` line. The command name
/// (field 2) is in parentheses and may hold spaces, so fields are counted
/// from the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    // After the name, field 3 (state) is the first; utime is field 14.
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// The value in KiB of a `Key:   123 kB` line.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces() {
        let stat =
            "1234 (otter server) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_values() {
        let status = "Name:\totter-server\nVmHWM:\t  20480 kB\nVmRSS:\t  10240 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let sample = sample(std::process::id(), clock_ticks_per_second()).unwrap();
        assert!(sample.rss_bytes > 0 && sample.peak_rss_bytes >= sample.rss_bytes);
    }
}
