//! CPU time and memory of a process from /proc (Linux): how much server CPU a request
//! costs, which is the fair figure when the load generator saturates first, and RSS
//! idle and under load. No libc: this crate forbids unsafe code.

use std::time::Duration;

/// Clock ticks per second of /proc/<pid>/stat times. 100 on every Linux we run on
/// (USER_HZ); reading it needs sysconf, i.e. unsafe code.
const TICKS_PER_SEC: u64 = 100;

/// A process's accumulated CPU time (user + system, threads that exited included).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuClock(Duration);

impl CpuClock {
    pub fn process(pid: u32) -> CpuClock {
        CpuClock(read_cpu(&format!("/proc/{pid}/stat")).unwrap_or_default())
    }

    pub fn this_process() -> CpuClock {
        CpuClock(read_cpu("/proc/self/stat").unwrap_or_default())
    }

    /// The calling thread alone: `flood`'s attackers run on a thread of their own and
    /// report what they cost the generator's core, apart from the signed client.
    pub fn this_thread() -> CpuClock {
        CpuClock(read_cpu("/proc/thread-self/stat").unwrap_or_default())
    }

    pub fn since(&self, earlier: &CpuClock) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

fn read_cpu(path: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces; fields after its ')' are fixed.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / TICKS_PER_SEC,
    ))
}

fn status_field_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident set size now, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field_kib(pid, "VmRSS:")
}

/// Peak resident set size since the process started, KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_field_kib(pid, "VmHWM:")
}
