//! One measurement's result, appended as a JSON line to the run's results file;
//! `loadgen report` reads them all back (the last line of an id wins).

use std::{collections::BTreeMap, io::Write, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    error::{io, BenchError},
    procfs::CpuUse,
    stats::Latency,
    threads::ThreadUse,
};

/// What one measurement found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Stable id, e.g. `clicks_closed`, `ceiling_ack`.
    pub id: String,
    /// What was measured, in words.
    pub title: String,
    /// Unit of `throughput`, e.g. `req/s`.
    pub unit: String,
    /// Operations completed as expected in the measured window.
    pub count: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// `count / seconds`.
    pub throughput: f64,
    pub latency: Option<Latency>,
    /// Operations that got no answer.
    pub errors: u64,
    /// Answers with another status than expected, by status.
    pub unexpected: BTreeMap<u16, u64>,
    /// Cores each process used during the window (1.0 = one core all along).
    pub cpu: BTreeMap<String, f64>,
    /// Per watched process, per group of its threads: cores running and cores
    /// waiting for one during the window.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub threads: BTreeMap<String, BTreeMap<String, ThreadUse>>,
    /// Scenario-specific figures (rate offered, memory, disk, ...).
    pub extra: BTreeMap<String, serde_json::Value>,
    /// Set when the measurement could not be completed: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl Measurement {
    /// A measurement with its id, title and unit.
    pub fn new(id: &str, title: &str, unit: &str) -> Self {
        Self {
            id: id.to_owned(),
            title: title.to_owned(),
            unit: unit.to_owned(),
            ..Self::default()
        }
    }

    /// Sets count, window and throughput.
    pub fn with_rate(mut self, count: u64, seconds: f64) -> Self {
        self.count = count;
        self.seconds = seconds;
        self.throughput = if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        };
        self
    }

    /// Adds a scenario-specific figure.
    pub fn extra(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// Sets where the CPU went during the window.
    pub fn set_cpu(&mut self, cpu: CpuUse) {
        self.cpu = cpu.cores;
        self.threads = cpu.threads;
    }

    /// A measurement that could not be completed.
    pub fn failure(id: &str, why: String) -> Self {
        Self {
            id: id.to_owned(),
            title: "failed".to_owned(),
            failed: Some(why),
            ..Self::default()
        }
    }

    /// One line for humans.
    pub fn summary(&self) -> String {
        if let Some(why) = &self.failed {
            return format!("{}: FAILED: {why}", self.id);
        }
        if self.unit.is_empty() {
            return format!(
                "{}: {}",
                self.id,
                serde_json::Value::Object(self.extra.clone().into_iter().collect())
            );
        }
        let latency = self.latency.map_or_else(String::new, |l| {
            format!(
                "  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms",
                l.p50_ms, l.p99_ms, l.p999_ms
            )
        });
        let other: u64 = self.unexpected.values().sum();
        format!(
            "{}: {:.0} {} ({} in {:.1}s){latency}  errors {}  other statuses {other}",
            self.id, self.throughput, self.unit, self.count, self.seconds, self.errors
        )
    }
}

/// Appends `m` to the results file (JSON lines) and prints its summary on stdout.
///
/// # Errors
/// The file cannot be written.
pub fn append(path: &Path, m: &Measurement) -> Result<(), BenchError> {
    println!("{}", m.summary());
    for (process, groups) in &m.threads {
        if let Some(threads) = crate::threads::describe(groups) {
            println!(
                "{}: {process} threads, cores running (waiting): {threads}",
                m.id
            );
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    let mut line = serde_json::to_vec(m)?;
    line.push(b'\n');
    file.write_all(&line)
        .map_err(io(format!("writing {}", path.display())))
}

/// Every measurement in a results file, the last of each id winning, in the
/// order ids first appeared.
///
/// # Errors
/// The file cannot be read or a line is not a measurement.
pub fn load(path: &Path) -> Result<Vec<Measurement>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
    let mut out: Vec<Measurement> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let m: Measurement = serde_json::from_str(line)?;
        match out.iter_mut().find(|o| o.id == m.id) {
            Some(slot) => *slot = m,
            None => out.push(m),
        }
    }
    Ok(out)
}

/// The measurement with this id.
pub fn find<'a>(all: &'a [Measurement], id: &str) -> Option<&'a Measurement> {
    all.iter().find(|m| m.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_the_last_of_an_id_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r/results.jsonl");
        append(
            &path,
            &Measurement::new("a", "A", "req/s").with_rate(10, 2.0),
        )
        .unwrap();
        append(&path, &Measurement::new("b", "B", "req/s")).unwrap();
        append(
            &path,
            &Measurement::new("a", "A", "req/s").with_rate(30, 2.0),
        )
        .unwrap();
        let all = load(&path).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].id, "a");
        assert!((find(&all, "a").unwrap().throughput - 15.0).abs() < 1e-9);
    }
}
