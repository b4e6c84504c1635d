//! What the kernel says about a process: CPU time used (so each measurement
//! states where the two cores went) and peak resident memory (`VmHWM`).

use std::{collections::BTreeMap, time::Instant};

use crate::threads::{Snapshot, ThreadUse};

/// Kernel clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on
/// every mainstream Linux architecture).
const CLK_TCK: f64 = 100.0;

/// A process to watch: a name for the report and its pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

/// Parses `name=pid`.
///
/// # Errors
/// Not of that form.
pub fn parse_watched(s: &str) -> Result<Watched, String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=pid"))?;
    let pid = pid
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: the pid is not a number"))?;
    Ok(Watched {
        name: name.trim().to_owned(),
        pid,
    })
}

/// User + system CPU ticks a process used so far (all its threads).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Bytes a process has handed to write calls so far, all its threads (`wchar`
/// of `/proc/<pid>/io`): for a service, mostly sled's log, so over a known
/// number of events it is the projection's write amplification.
pub fn written_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))?
        .trim()
        .parse()
        .ok()
}

/// Memory of a process, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    /// Peak resident set (`VmHWM`).
    pub peak_rss_mib: f64,
    /// Resident set now (`VmRSS`).
    pub rss_mib: f64,
}

/// `VmHWM` and `VmRSS` of a process.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
    };
    Some(Memory {
        peak_rss_mib: kib("VmHWM:")? / 1024.0,
        rss_mib: kib("VmRSS:")? / 1024.0,
    })
}

/// CPU ticks of the whole machine so far, from `/proc/stat`.
#[derive(Clone, Copy)]
struct MachineTicks {
    /// user, nice, system, irq and softirq (not idle, iowait or steal).
    busy: u64,
    /// Time the hypervisor ran something else while this VM wanted a core.
    steal: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_ticks(&stat)
}

fn parse_machine_ticks(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    Some(MachineTicks {
        busy: f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?,
        steal: *f.get(7)?,
    })
}

/// Name of the pseudo-process that stands for every process not watched (the
/// machine's busy time minus the watched processes'): shows when something
/// else was using the cores during a measurement.
pub const OTHER: &str = "other (not ours)";

/// Name of the pseudo-process that stands for the cores the hypervisor gave to
/// other guests while this machine wanted them (`steal` in `/proc/stat`): a
/// slow host shows here, not in any process. Not part of the machine's busy time.
pub const STEAL: &str = "steal (host)";

/// CPU use of the watched processes (and this one) over a measured window.
pub struct CpuWatch {
    started: Instant,
    start: Vec<(String, u32, Option<u64>)>,
    machine: Option<MachineTicks>,
    /// The watched processes' threads at the start.
    threads: Vec<(String, u32, Snapshot)>,
}

/// What [`CpuWatch::stop`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuUse {
    /// Cores used by each process (see [`CpuWatch::stop`]).
    pub cores: BTreeMap<String, f64>,
    /// Per watched process, per group of its threads: running and waiting.
    pub threads: BTreeMap<String, BTreeMap<String, ThreadUse>>,
}

impl CpuWatch {
    /// Starts the window now.
    pub fn start(watched: &[Watched]) -> Self {
        let me = std::process::id();
        let mut start: Vec<_> = watched
            .iter()
            .map(|w| (w.name.clone(), w.pid, cpu_ticks(w.pid)))
            .collect();
        start.push(("loadgen".to_owned(), me, cpu_ticks(me)));
        let threads = watched
            .iter()
            .map(|w| (w.name.clone(), w.pid, Snapshot::take(w.pid)))
            .collect();
        Self {
            started: Instant::now(),
            start,
            machine: machine_ticks(),
            threads,
        }
    }

    /// Cores used by each process since the start (1.0 = one core busy all
    /// along), plus [`OTHER`] and [`STEAL`]; processes that went away are left
    /// out. And where the watched processes' threads went.
    pub fn stop(&self) -> CpuUse {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let threads = self
            .threads
            .iter()
            .map(|(name, pid, before)| (name.clone(), Snapshot::take(*pid).since(before, seconds)))
            .filter(|(_, groups)| !groups.is_empty())
            .collect();
        let cores = |ticks: u64| ticks as f64 / CLK_TCK / seconds;
        let mut out: BTreeMap<String, f64> = self
            .start
            .iter()
            .filter_map(|(name, pid, before)| {
                let used = cpu_ticks(*pid)?.checked_sub((*before)?)?;
                Some((name.clone(), cores(used)))
            })
            .collect();
        if let Some((now, before)) = machine_ticks().zip(self.machine) {
            if let Some(busy) = now.busy.checked_sub(before.busy) {
                let ours: f64 = out.values().sum();
                out.insert(OTHER.to_owned(), (cores(busy) - ours).max(0.0));
            }
            if let Some(steal) = now.steal.checked_sub(before.steal) {
                out.insert(STEAL.to_owned(), cores(steal));
            }
        }
        CpuUse {
            cores: out.into_iter().map(|(k, v)| (k, hundredths(v))).collect(),
            threads,
        }
    }
}

/// `x` rounded to two decimals, as the report prints cores.
pub fn hundredths(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Bytes as MiB, one decimal.
pub fn mib(bytes: u64) -> f64 {
    (bytes as f64 / 1_048_576.0 * 10.0).round() / 10.0
}

/// Bytes under a directory, recursively (0 if it is not there).
pub fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        let m = memory(me).unwrap();
        assert!(m.peak_rss_mib >= m.rss_mib * 0.5 && m.rss_mib > 0.0);
        assert_eq!(
            parse_watched("click=42").unwrap(),
            Watched {
                name: "click".into(),
                pid: 42
            }
        );
        assert!(parse_watched("click").is_err());
    }

    #[test]
    fn machine_ticks_split_busy_from_steal() {
        let stat = "cpu  100 2 30 400 5 6 7 80 0 0\ncpu0 50 1 15 200 2 3 3 40 0 0\n";
        let t = parse_machine_ticks(stat).unwrap();
        assert_eq!((t.busy, t.steal), (100 + 2 + 30 + 6 + 7, 80));
        assert!(parse_machine_ticks("cpu  1 2 3\n").is_none(), "short line");
        assert!(machine_ticks().is_some(), "this machine's /proc/stat");
    }

    #[test]
    fn counts_the_bytes_this_process_writes() {
        let me = std::process::id();
        let before = written_bytes(me).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![7u8; 100_000]).unwrap();
        let after = written_bytes(me).unwrap();
        assert!(after - before >= 100_000, "{before} -> {after}");
    }
}
