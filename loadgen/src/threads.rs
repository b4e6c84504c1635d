//! Where a process's threads spent a measured window: running on a core, or
//! runnable and waiting for one (the kernel's run queue), per group of threads
//! (`/proc/<pid>/task/<tid>/schedstat`).
//!
//! A process's CPU total says how much it used; this says which of its threads
//! used it and which were held back. A fold thread that is slow because it
//! waits for a core behind NATS and the request handlers shows a large
//! `waiting`; one that is slow at its own work shows a large `running`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::procfs::hundredths;

/// One group of a process's threads over a window, in cores (1.0 = one core
/// all along).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadUse {
    /// Time on a core.
    pub running: f64,
    /// Time runnable, waiting in the run queue for a core.
    pub waiting: f64,
}

/// Run and run-queue nanoseconds of each live thread of a process, by thread id,
/// with the thread's group.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(BTreeMap<u32, (String, u64, u64)>);

impl Snapshot {
    /// The threads of `pid` now (empty when the process is gone or the kernel
    /// keeps no schedstat).
    pub fn take(pid: u32) -> Self {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Self::default();
        };
        let threads = tasks
            .flatten()
            .filter_map(|task| {
                let tid: u32 = task.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
                let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
                let (run, wait) = parse_schedstat(&stat)?;
                Some((tid, (group(&comm), run, wait)))
            })
            .collect();
        Self(threads)
    }

    /// Use per group since `before`, over `seconds`. A thread born inside the
    /// window counts from zero; one that ended inside it is not counted.
    pub fn since(&self, before: &Self, seconds: f64) -> BTreeMap<String, ThreadUse> {
        let mut out: BTreeMap<String, ThreadUse> = BTreeMap::new();
        let cores = |ns: u64| ns as f64 / 1e9 / seconds.max(1e-3);
        for (tid, (group, run, wait)) in &self.0 {
            let (run0, wait0) = before
                .0
                .get(tid)
                .map_or((0, 0), |(_, run, wait)| (*run, *wait));
            let used = out.entry(group.clone()).or_default();
            used.running += cores(run.saturating_sub(run0));
            used.waiting += cores(wait.saturating_sub(wait0));
        }
        for used in out.values_mut() {
            used.running = hundredths(used.running);
            used.waiting = hundredths(used.waiting);
        }
        out
    }
}

/// Groups that used less than this many cores (running plus waiting) are left
/// out of [`describe`].
pub const SHOWN_FROM: f64 = 0.02;

/// The groups of one process, busiest first, as `name running (waiting)`
/// joined by ` · `; `None` when none reaches [`SHOWN_FROM`].
pub fn describe(groups: &BTreeMap<String, ThreadUse>) -> Option<String> {
    let mut shown: Vec<_> = groups
        .iter()
        .filter(|(_, u)| u.running + u.waiting >= SHOWN_FROM)
        .collect();
    shown.sort_by(|a, b| b.1.running.total_cmp(&a.1.running));
    let cells: Vec<String> = shown
        .iter()
        .map(|(g, u)| format!("{g} {:.2} ({:.2})", u.running, u.waiting))
        .collect();
    (!cells.is_empty()).then(|| cells.join(" · "))
}

/// `run_ns wait_ns timeslices` of a schedstat line: (run, wait).
fn parse_schedstat(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace().map(str::parse::<u64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

/// A thread's group: its name without a trailing number, so a pool's threads
/// (`sled-io-3`, `tokio-rt-worker`) add up as one.
fn group(comm: &str) -> String {
    let name = comm.trim();
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let base = base.trim_end_matches(['-', '_', ' ']);
    if base.is_empty() { name } else { base }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_gives_run_and_wait() {
        assert_eq!(parse_schedstat("1200 340 7\n"), Some((1200, 340)));
        assert_eq!(parse_schedstat("12"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn a_pool_is_one_group() {
        assert_eq!(group("sled-io-3\n"), "sled-io");
        assert_eq!(group("tokio-rt-worker"), "tokio-rt-worker");
        assert_eq!(group("fold-conversion"), "fold-conversion");
        assert_eq!(group("worker 12"), "worker");
        assert_eq!(group("42"), "42");
    }

    #[test]
    fn use_is_summed_per_group_and_new_threads_count_from_zero() {
        let before = Snapshot(
            [
                (1, ("sled-io".to_owned(), 1_000_000_000, 0)),
                (2, ("fold".to_owned(), 0, 0)),
            ]
            .into_iter()
            .collect(),
        );
        let after = Snapshot(
            [
                (1, ("sled-io".to_owned(), 1_500_000_000, 200_000_000)),
                (3, ("sled-io".to_owned(), 500_000_000, 0)),
                (2, ("fold".to_owned(), 1_000_000_000, 1_000_000_000)),
            ]
            .into_iter()
            .collect(),
        );
        let used = after.since(&before, 2.0);
        assert_eq!(
            used["sled-io"],
            ThreadUse {
                running: 0.5,
                waiting: 0.1
            }
        );
        assert_eq!(
            used["fold"],
            ThreadUse {
                running: 0.5,
                waiting: 0.5
            }
        );
    }

    #[test]
    fn reads_this_process_s_threads() {
        let me = std::process::id();
        let before = Snapshot::take(me);
        let spin = std::thread::Builder::new()
            .name("spinner-1".into())
            .spawn(|| {
                let t = std::time::Instant::now();
                while t.elapsed() < std::time::Duration::from_millis(200) {
                    std::hint::spin_loop();
                }
            })
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let during = Snapshot::take(me);
        spin.join().unwrap();
        let used = during.since(&before, 0.1);
        assert!(
            used.get("spinner").is_some_and(|u| u.running > 0.0),
            "the spinning thread ran: {used:?}"
        );
    }
}
