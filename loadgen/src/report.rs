//! `loadgen report`: the scenarios and their targets, judged against a run's
//! results, written as `BENCHMARKS.md` (for people) and `results.json` (for
//! tools), with the facts of the machine they were measured on.

use std::{collections::BTreeSet, fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    cli::ReportArgs,
    error::{io, BenchError},
    results::{self, Measurement},
};

/// What a scenario must reach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Goal {
    /// At least this throughput.
    Throughput { min: f64 },
    /// At least this throughput and this fraction of the ceiling's.
    ThroughputAndRatio { min: f64, ratio: f64 },
    /// Latency percentiles at most these (milliseconds).
    Latency { p99_ms: f64, p999_ms: Option<f64> },
}

impl Goal {
    fn text(self) -> String {
        match self {
            Self::Throughput { min } => format!("≥ {}/s", thousands(min)),
            Self::ThroughputAndRatio { min, ratio } => format!(
                "≥ {}/s and ≥ {:.0} % of the ceiling",
                thousands(min),
                ratio * 100.0
            ),
            Self::Latency { p99_ms, p999_ms } => match p999_ms {
                Some(p999) => format!("p99 ≤ {p99_ms} ms, p99.9 ≤ {p999} ms"),
                None => format!("p99 ≤ {p99_ms} ms"),
            },
        }
    }
}

/// One row of the results table.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// The measurement judged.
    pub id: &'static str,
    pub title: &'static str,
    /// The ceiling it is read against, if one applies.
    pub ceiling: Option<&'static str>,
    pub goal: Goal,
}

/// The scenarios of issue 6, in the order `scripts/bench` runs them.
pub const SCENARIOS: [Scenario; 8] = [
    Scenario {
        id: "clicks_closed",
        title: "Click redirects/s, ack before 302, closed loop",
        ceiling: Some("ceiling_ack"),
        goal: Goal::ThroughputAndRatio {
            min: 20_000.0,
            ratio: 0.8,
        },
    },
    Scenario {
        id: "clicks_open",
        title: "Click redirect latency, open loop at 50 % of that peak",
        ceiling: Some("ceiling_ack_open"),
        goal: Goal::Latency {
            p99_ms: 10.0,
            p999_ms: Some(25.0),
        },
    },
    Scenario {
        id: "postbacks_closed",
        title: "Advertiser postbacks accepted/s (HTTP, durable), closed loop",
        ceiling: Some("ceiling_ack"),
        goal: Goal::Throughput { min: 15_000.0 },
    },
    Scenario {
        id: "decisions",
        title: "Decisions/s: reported conversions folded and decided, clicks already in the projection",
        ceiling: Some("fold_conversions"),
        goal: Goal::Throughput { min: 20_000.0 },
    },
    Scenario {
        id: "e2e",
        title: "End to end: postback due → decision event in the log, open loop at 2,000/s",
        ceiling: None,
        goal: Goal::Latency {
            p99_ms: 50.0,
            p999_ms: None,
        },
    },
    Scenario {
        id: "rebuild",
        title: "Rebuild: the log (1M clicks + 200k conversions in a full run) replayed into an empty projection",
        ceiling: Some("ceiling_sled"),
        goal: Goal::Throughput { min: 50_000.0 },
    },
    Scenario {
        id: "report_query",
        title: "Report query (group_by=affiliate) over that data",
        ceiling: None,
        goal: Goal::Latency {
            p99_ms: 100.0,
            p999_ms: None,
        },
    },
    Scenario {
        id: "deliveries",
        title: "Affiliate deliveries/s to a fast local receiver, conversions already decided",
        ceiling: None,
        goal: Goal::Throughput { min: 5_000.0 },
    },
];

/// The ceilings, for their own table.
pub const CEILINGS: [(&str, &str); 8] = [
    ("ceiling_axum", "1. bare axum handler answering 302 (closed loop)"),
    (
        "ceiling_ack",
        "2. the same handler awaiting a JetStream ack (Nats-Msg-Id, ClickRecorded-sized event), closed loop",
    ),
    (
        "ceiling_ack_open",
        "2'. ceiling 2 in open loop at the rate of the click latency scenario",
    ),
    (
        "ceiling_ack_open_readers",
        "2''. ceiling 2' while a reader follows the stream (an ordered pull consumer on its own connection), as postback-service's clicks fold follows CLICKS (click-service reads it only for click caps; the bench catalog has none)",
    ),
    (
        "ceiling_publish",
        "3. pipelined JetStream publishes of that event, no HTTP",
    ),
    (
        "ceiling_sled",
        "4. sled batched inserts of click rows, 1024-row batches, flushed in the background as the folds are",
    ),
    (
        "fold_clicks",
        "5. our clicks fold alone: ClickRecorded events from distinct visitors applied to sled, no NATS, one thread, groups of 1024",
    ),
    (
        "fold_conversions",
        "6. our conversions fold alone: a ConversionReported then its ConversionAttributed per conversion, no NATS, no decider, a staging and a commit thread as in the service, groups of 128",
    ),
];

/// How a scenario did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Miss,
    NotRun,
}

/// A scenario judged.
#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    pub id: &'static str,
    pub title: &'static str,
    pub goal: Goal,
    pub target: String,
    pub throughput: Option<f64>,
    pub unit: Option<String>,
    pub latency: Option<crate::stats::Latency>,
    pub ceiling_id: Option<&'static str>,
    pub ceiling_throughput: Option<f64>,
    /// Throughput ÷ ceiling throughput, or p99 ÷ ceiling p99 for latency goals.
    pub ratio: Option<f64>,
    pub verdict: Verdict,
    /// Why it missed, in words.
    pub why: String,
}

/// Judges one scenario against the measurements of a run.
pub fn judge(s: &Scenario, all: &[Measurement]) -> Judged {
    let m = results::find(all, s.id);
    let ceiling = s.ceiling.and_then(|c| results::find(all, c));
    let mut j = Judged {
        id: s.id,
        title: s.title,
        goal: s.goal,
        target: s.goal.text(),
        throughput: m.map(|m| m.throughput),
        unit: m.map(|m| m.unit.clone()),
        latency: m.and_then(|m| m.latency),
        ceiling_id: s.ceiling,
        ceiling_throughput: ceiling.map(|c| c.throughput),
        ratio: None,
        verdict: Verdict::NotRun,
        why: String::new(),
    };
    let Some(m) = m else {
        j.why = "not measured in this run".to_owned();
        return j;
    };
    if let Some(why) = &m.failed {
        j.verdict = Verdict::Miss;
        j.why = format!("failed: {why}");
        j.throughput = None;
        return j;
    }
    let mut misses = Vec::new();
    match s.goal {
        Goal::Throughput { min } | Goal::ThroughputAndRatio { min, .. } => {
            if let Some(c) = ceiling.filter(|c| c.throughput > 0.0) {
                j.ratio = Some(m.throughput / c.throughput);
            }
            if m.throughput < min {
                misses.push(format!(
                    "{} < {}/s",
                    thousands(m.throughput),
                    thousands(min)
                ));
            }
            if let Goal::ThroughputAndRatio { ratio, .. } = s.goal {
                match j.ratio {
                    Some(r) if r < ratio => misses.push(format!(
                        "{:.0} % of the ceiling < {:.0} %",
                        r * 100.0,
                        ratio * 100.0
                    )),
                    Some(_) => {}
                    None => misses.push("ceiling not measured".to_owned()),
                }
            }
        }
        Goal::Latency { p99_ms, p999_ms } => {
            j.ratio = ceiling
                .and_then(|c| c.latency)
                .zip(m.latency)
                .filter(|(c, _)| c.p99_ms > 0.0)
                .map(|(c, l)| l.p99_ms / c.p99_ms);
            match m.latency {
                None => misses.push("no latency recorded".to_owned()),
                Some(l) => {
                    if l.p99_ms > p99_ms {
                        misses.push(format!("p99 {:.1} ms > {p99_ms} ms", l.p99_ms));
                    }
                    if let Some(p999) = p999_ms.filter(|p| l.p999_ms > *p) {
                        misses.push(format!("p99.9 {:.1} ms > {p999} ms", l.p999_ms));
                    }
                }
            }
        }
    }
    let other: u64 = m.unexpected.values().sum();
    if m.errors > 0 || other > 0 {
        misses.push(format!("{} errors, {other} unexpected statuses", m.errors));
    }
    j.verdict = if misses.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Miss
    };
    j.why = misses.join("; ");
    j
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Facts about the machine a run was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub rustc: String,
    pub nats_server: String,
    pub load_average_before: String,
    pub load_average_after: String,
}

fn first_line_with(text: &str, prefixes: &[&str]) -> Option<String> {
    text.lines().find_map(|l| {
        prefixes
            .iter()
            .any(|p| l.starts_with(p))
            .then(|| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
            .flatten()
    })
}

fn command_line(program: &str, arg: &str) -> String {
    std::process::Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text).trim().to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Reads the machine's facts.
pub fn machine(nats_server: &str, load_before: &str) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let mem_kib: f64 = first_line_with(&meminfo, &["MemTotal"])
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0.0);
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model: first_line_with(
            &read("/proc/cpuinfo"),
            &["model name", "Model", "cpu model"],
        )
        .unwrap_or_else(|| "unknown".to_owned()),
        memory_gib: (mem_kib / 1_048_576.0 * 10.0).round() / 10.0,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        rustc: command_line("rustc", "--version"),
        nats_server: command_line(nats_server, "--version"),
        load_average_before: load_before.trim().to_owned(),
        load_average_after: read("/proc/loadavg").trim().to_owned(),
    }
}

#[derive(Serialize)]
struct JsonReport<'a> {
    generated_at: String,
    mode: &'a str,
    profile: &'a str,
    note: &'a str,
    machine: &'a Machine,
    scenarios: &'a [Judged],
    measurements: &'a [Measurement],
}

fn latency_cell(l: Option<crate::stats::Latency>) -> String {
    l.map_or_else(
        || "—".to_owned(),
        |l| format!("{:.2} / {:.2} / {:.2}", l.p50_ms, l.p99_ms, l.p999_ms),
    )
}

fn rate_cell(m: Option<&Measurement>) -> String {
    match m {
        None => "—".to_owned(),
        Some(m) if m.failed.is_some() => "failed".to_owned(),
        Some(m) => match backlog(m) {
            Some((done, drain, rate)) => format!(
                "{} {} (all {done} {drain:.1} s after the window: {} {done}/s)",
                thousands(m.throughput),
                m.unit,
                thousands(rate)
            ),
            None => format!("{} {}", thousands(m.throughput), m.unit),
        },
    }
}

/// For a measurement of accepted work that left a backlog behind (the
/// decider's, or the folds'): what was left undone, how long it took after
/// the window, and what was accepted *and* done per second counting that time.
/// An HTTP rate alone rewards a back end that falls behind; this figure does
/// not.
fn backlog(m: &Measurement) -> Option<(&'static str, f64, f64)> {
    [
        ("decider_backlog_drained_s", "decided"),
        ("folds_settled_s", "folded"),
    ]
    .into_iter()
    .find_map(|(key, done)| {
        let drain = m.extra.get(key)?.as_f64()?;
        (drain >= 0.5 && m.seconds > 0.0)
            .then(|| (done, drain, m.count as f64 / (m.seconds + drain)))
    })
}

/// The Markdown report.
pub fn markdown(
    args: &ReportArgs,
    generated_at: &str,
    machine: &Machine,
    judged: &[Judged],
    all: &[Measurement],
    notes: Option<&str>,
) -> String {
    let mut md = String::new();
    let passed = judged.iter().filter(|j| j.verdict == Verdict::Pass).count();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `scripts/bench` on {generated_at}: **{} run**, {} binaries. \
         {passed} of {} scenarios met their target.",
        args.mode,
        args.profile,
        judged.len()
    );
    if args.mode != "full" {
        let _ = writeln!(
            md,
            "\n> **Smoke run**: every scenario ran for about a second on tiny data, to prove \
             the suite works. These numbers do not judge the system; `scripts/bench` (full) does."
        );
    }
    if !args.note.is_empty() {
        let _ = writeln!(md, "\n> {}", args.note);
    }
    let _ = writeln!(
        md,
        "\n## Scenarios\n\nThroughput counts operations completed as expected in the measured \
         window; latencies are milliseconds. The ceiling is measured in the same run on the same \
         machine; ratio is throughput ÷ ceiling (for latency rows: p99 ÷ the ceiling's p99 at the \
         same rate).\n"
    );
    let _ = writeln!(
        md,
        "| scenario | throughput | p50 / p99 / p99.9 ms | ceiling | ratio | target | result |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for j in judged {
        let m = results::find(all, j.id);
        let ceiling = j.ceiling_id.and_then(|c| results::find(all, c));
        let ceiling_cell = match (j.ceiling_id, ceiling) {
            (Some(id), Some(c)) => format!("{} ({})", rate_cell(Some(c)), ceiling_name(id)),
            (Some(id), None) => format!("not measured ({})", ceiling_name(id)),
            (None, _) => "—".to_owned(),
        };
        let ratio = match (j.ratio, j.goal) {
            (None, _) => "—".to_owned(),
            (Some(r), Goal::Latency { .. }) => format!("{r:.1}× p99"),
            (Some(r), _) => format!("{:.0} %", r * 100.0),
        };
        let result = match j.verdict {
            Verdict::Pass => "**pass**".to_owned(),
            Verdict::Miss => format!("**miss**: {}", j.why),
            Verdict::NotRun => "not run".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {ceiling_cell} | {ratio} | {} | {result} |",
            j.title,
            rate_cell(m),
            latency_cell(m.and_then(|m| m.latency)),
            j.target
        );
    }

    let _ = writeln!(md, "\n## Ceilings\n");
    let _ = writeln!(md, "| ceiling | throughput | p50 / p99 / p99.9 ms |");
    let _ = writeln!(md, "|---|---|---|");
    for (id, name) in CEILINGS {
        let m = results::find(all, id);
        let _ = writeln!(
            md,
            "| {name} | {} | {} |",
            rate_cell(m),
            latency_cell(m.and_then(|m| m.latency))
        );
    }
    let _ = writeln!(
        md,
        "\nCeiling 3's latency is each pipelined publish's time in the 4,096-deep window \
         (sent → its ack taken, in order), not the server's ack time; ceiling 4's is per \
         batch (apply; sled writes its log in the background, as for the folds). Ceilings 5 and 6 are not the hardware's but our own folds, \
         measured alone: one fold (a staging and a commit thread) bounds the decisions and \
         the rebuild, so a ratio \
         to them is what everything around the fold costs (NATS, the decider, the other \
         folds and processes on the same cores)."
    );

    cpu_table(&mut md, all);
    thread_table(&mut md, all);
    memory_section(&mut md, all);
    every_measurement(&mut md, all);

    let _ = writeln!(md, "\n## Machine\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| cores (nproc) | {} |", machine.nproc);
    let _ = writeln!(md, "| CPU | {} |", machine.cpu_model);
    let _ = writeln!(md, "| memory | {} GiB |", machine.memory_gib);
    let _ = writeln!(md, "| kernel | {} |", machine.kernel);
    let _ = writeln!(md, "| rustc | {} |", machine.rustc);
    let _ = writeln!(md, "| nats-server | {} |", machine.nats_server);
    let _ = writeln!(
        md,
        "| load average before / after the run | {} / {} |",
        or_dash(&machine.load_average_before),
        or_dash(&machine.load_average_after)
    );
    let _ = writeln!(
        md,
        "\nEverything (load generator, NATS, both services, the ceilings) ran on these cores \
         at once, over loopback."
    );
    if let Some(notes) = notes {
        let _ = writeln!(md, "\n{}", notes.trim_end());
    }
    md
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "—"
    } else {
        s
    }
}

fn ceiling_name(id: &str) -> &'static str {
    match id {
        "ceiling_axum" => "ceiling 1",
        "ceiling_ack" => "ceiling 2",
        "ceiling_ack_open" => "ceiling 2, open loop",
        "ceiling_ack_open_readers" => "ceiling 2, open loop, a reader",
        "ceiling_publish" => "ceiling 3",
        "ceiling_sled" => "ceiling 4",
        "fold_clicks" => "ceiling 5",
        "fold_conversions" => "ceiling 6",
        _ => "ceiling",
    }
}

fn cpu_table(md: &mut String, all: &[Measurement]) {
    let set: BTreeSet<&str> = all
        .iter()
        .flat_map(|m| m.cpu.keys().map(String::as_str))
        .collect();
    // Ours in name order, then everyone else's.
    use crate::procfs::{OTHER, STEAL};
    let mut names: Vec<&str> = set
        .iter()
        .copied()
        .filter(|n| *n != OTHER && *n != STEAL)
        .collect();
    if set.contains(OTHER) {
        names.push(OTHER);
    }
    if names.is_empty() {
        return;
    }
    let steal = set.contains(STEAL);
    let _ = writeln!(
        md,
        "\n## Where the CPU went\n\nCores used by each process during each measured window \
         (1.00 = one core busy throughout; the machine has {} in all). `{OTHER}` is the machine's \
         busy time minus ours: other work on the machine during the measurement.{}\n",
        std::thread::available_parallelism().map_or(0, usize::from),
        if steal {
            format!(
                " `{STEAL}` is the time the hypervisor gave this machine's cores to other \
                 guests while it wanted them (`steal` in /proc/stat): a slow host, not in \
                 the busy sum."
            )
        } else {
            String::new()
        }
    );
    // Steal comes after the busy sum, which it is not part of.
    let after: &[&str] = if steal { &[STEAL] } else { &[] };
    let _ = write!(md, "| measurement |");
    for n in &names {
        let _ = write!(md, " {n} |");
    }
    let _ = write!(md, " machine busy |");
    for n in after {
        let _ = write!(md, " {n} |");
    }
    let _ = writeln!(
        md,
        "\n|---|{}",
        "---|".repeat(names.len() + 1 + after.len())
    );
    let cell = |c: Option<&f64>| c.map_or_else(|| " |".to_owned(), |c| format!(" {c:.2} |"));
    for m in all.iter().filter(|m| !m.cpu.is_empty()) {
        let _ = write!(md, "| {} |", m.id);
        for n in &names {
            let _ = write!(md, "{}", cell(m.cpu.get(*n)));
        }
        let busy: f64 = m
            .cpu
            .iter()
            .filter(|(n, _)| n.as_str() != STEAL)
            .map(|(_, c)| c)
            .sum();
        let _ = write!(md, " {busy:.2} |");
        for n in after {
            let _ = write!(md, "{}", cell(m.cpu.get(*n)));
        }
        let _ = writeln!(md);
    }
}

/// Where each watched process's threads went: per group of threads, cores
/// running and, in parentheses, cores runnable but waiting for one.
fn thread_table(md: &mut String, all: &[Measurement]) {
    use crate::threads::{describe, SHOWN_FROM};
    let rows: Vec<(&str, &str, String)> = all
        .iter()
        .flat_map(|m| {
            m.threads.iter().filter_map(|(process, groups)| {
                Some((m.id.as_str(), process.as_str(), describe(groups)?))
            })
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Where the threads went\n\nFor each watched process, each group of its threads \
         (a pool's numbered threads count as one) during each measured window: cores running, \
         and in parentheses cores it was runnable but waiting for a core in the kernel's run \
         queue (`/proc/<pid>/task/<tid>/schedstat`). A thread that waits more than it runs is \
         held back by the others on these cores, not by its own work. Groups under \
         {SHOWN_FROM} cores are left out, and so are threads that ended inside the window.\n"
    );
    let _ = writeln!(md, "| measurement | process | threads: running (waiting) |");
    let _ = writeln!(md, "|---|---|---|");
    for (id, process, cell) in rows {
        let _ = writeln!(md, "| {id} | {process} | {cell} |");
    }
}

fn memory_section(md: &mut String, all: &[Measurement]) {
    let _ = writeln!(md, "\n## Memory and disk\n");
    let mut any = false;
    for m in all.iter().filter(|m| m.id.starts_with("memory")) {
        for (name, v) in &m.extra {
            let peak = v.get("peak_rss_mib").and_then(serde_json::Value::as_f64);
            let now = v.get("rss_mib").and_then(serde_json::Value::as_f64);
            if let (Some(peak), Some(now)) = (peak, now) {
                if !any {
                    let _ = writeln!(md, "| process | when | peak RSS (VmHWM) | RSS then |");
                    let _ = writeln!(md, "|---|---|---|---|");
                    any = true;
                }
                let _ = writeln!(
                    md,
                    "| {name} | {} | {peak:.1} MiB | {now:.1} MiB |",
                    m.title
                );
            }
        }
    }
    if let Some(r) = results::find(all, "rebuild") {
        let get = |k: &str| {
            r.extra
                .get(k)
                .map_or_else(|| "?".to_owned(), ToString::to_string)
        };
        let _ = writeln!(
            md,
            "\nRebuild: {} clicks and {} reported conversions ({} events in all streams) \
             replayed in {:.1} s; the rebuilding postback-service peaked at {} MiB resident; \
             its projection takes {} MiB on disk, {} MiB per million clicks (sled's files \
             as they are right after the rebuild, log segments included).",
            get("clicks"),
            get("conversions_reported"),
            get("events"),
            r.seconds,
            get("peak_rss_mib"),
            get("disk_mib"),
            get("disk_mib_per_million_clicks"),
        );
    } else if !any {
        let _ = writeln!(md, "Not measured in this run.");
    }
}

fn every_measurement(md: &mut String, all: &[Measurement]) {
    let _ = writeln!(md, "\n## Every measurement\n");
    let _ = writeln!(
        md,
        "| id | what | count | seconds | throughput | p50 / p90 / p99 / p99.9 / max ms | errors | other statuses | details |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for m in all.iter().filter(|m| !m.id.starts_with("memory")) {
        if let Some(why) = &m.failed {
            let _ = writeln!(md, "| {} | **failed**: {why} | | | | | | | |", m.id);
            continue;
        }
        let latency = m.latency.map_or_else(
            || "—".to_owned(),
            |l| {
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2} / {:.1}",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
                )
            },
        );
        let other = if m.unexpected.is_empty() {
            "0".to_owned()
        } else {
            m.unexpected
                .iter()
                .map(|(s, n)| format!("{n}×{s}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let details = m
            .extra
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {} {} | {latency} | {} | {other} | {details} |",
            m.id,
            m.title,
            m.count,
            m.seconds,
            thousands(m.throughput),
            m.unit,
            m.errors
        );
    }
}

/// Writes both reports.
///
/// # Errors
/// The results cannot be read or the reports cannot be written.
pub fn run(args: &ReportArgs) -> Result<(), BenchError> {
    let all = results::load(&args.results)?;
    let judged: Vec<Judged> = SCENARIOS.iter().map(|s| judge(s, &all)).collect();
    let machine = machine(&args.nats_server, &args.load_before);
    let generated_at = common::time::rfc3339(common::time::now_ms());
    let notes = std::fs::read_to_string(&args.notes).ok();
    let md = markdown(
        args,
        &generated_at,
        &machine,
        &judged,
        &all,
        notes.as_deref(),
    );
    write(&args.markdown, md.as_bytes())?;
    let json = JsonReport {
        generated_at,
        mode: &args.mode,
        profile: &args.profile,
        note: &args.note,
        machine: &machine,
        scenarios: &judged,
        measurements: &all,
    };
    let mut bytes = serde_json::to_vec_pretty(&json)?;
    bytes.push(b'\n');
    write(&args.json, &bytes)?;
    for j in &judged {
        let verdict = match j.verdict {
            Verdict::Pass => "pass".to_owned(),
            Verdict::Miss => format!("MISS ({})", j.why),
            Verdict::NotRun => "not run".to_owned(),
        };
        println!("{:<18} {verdict}", j.id);
    }
    println!(
        "wrote {} and {}",
        args.markdown.display(),
        args.json.display()
    );
    if args.mode == "smoke" {
        let broken = smoke_problems(&all);
        if !broken.is_empty() {
            return Err(BenchError::Smoke(broken.join("; ")));
        }
    }
    Ok(())
}

/// What a smoke run (CI) must not have, targets aside: a scenario that
/// completed nothing, and any operation that got no answer or an answer other
/// than the one expected (a click-service answering 503 to every click, a
/// postback-service refusing every postback). A scenario that failed or did
/// not run is scripts/bench's to judge (`BENCH_ALLOW_FAIL`).
fn smoke_problems(all: &[Measurement]) -> Vec<String> {
    all.iter()
        .filter(|m| !m.id.starts_with("memory_") && m.failed.is_none())
        .filter_map(|m| {
            let other: u64 = m.unexpected.values().sum();
            let why = if m.count == 0 {
                "nothing completed".to_owned()
            } else if m.errors > 0 || other > 0 {
                format!("{} errors, {other} unexpected statuses", m.errors)
            } else {
                return None;
            };
            Some(format!("{}: {why}", m.id))
        })
        .collect()
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), BenchError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    std::fs::write(path, bytes).map_err(io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Latency;

    fn throughput(id: &str, t: f64) -> Measurement {
        Measurement::new(id, id, "req/s").with_rate((t * 10.0) as u64, 10.0)
    }

    fn latency(id: &str, p99: f64, p999: f64) -> Measurement {
        let mut m = throughput(id, 100.0);
        m.latency = Some(Latency {
            p50_ms: 1.0,
            p90_ms: 2.0,
            p99_ms: p99,
            p999_ms: p999,
            max_ms: p999,
            mean_ms: 1.0,
            samples: 1000,
        });
        m
    }

    #[test]
    fn the_cpu_table_shows_steal_beside_the_busy_sum_not_in_it() {
        let mut m = throughput("clicks_closed", 1.0);
        m.cpu = [
            ("click", 0.5),
            (crate::procfs::OTHER, 0.25),
            (crate::procfs::STEAL, 0.4),
        ]
        .into_iter()
        .map(|(n, c)| (n.to_owned(), c))
        .collect();
        let mut md = String::new();
        cpu_table(&mut md, &[m]);
        assert!(
            md.contains("| measurement | click | other (not ours) | machine busy | steal (host) |"),
            "{md}"
        );
        assert!(
            md.contains("| clicks_closed | 0.50 | 0.25 | 0.75 | 0.40 |"),
            "{md}"
        );

        let mut no_steal = throughput("clicks_closed", 1.0);
        no_steal.cpu = [("click".to_owned(), 0.5)].into_iter().collect();
        let mut md = String::new();
        cpu_table(&mut md, &[no_steal]);
        assert!(md.contains("| clicks_closed | 0.50 | 0.50 |\n"), "{md}");
    }

    #[test]
    fn the_thread_table_lists_groups_by_running_time_and_leaves_out_idle_ones() {
        use crate::threads::ThreadUse;
        let mut m = throughput("decisions", 1.0);
        let groups = [
            ("tokio-rt-worker", 0.3, 0.05),
            ("fold-conversion", 0.55, 0.25),
            ("fold-catalog", 0.0, 0.01),
        ]
        .into_iter()
        .map(|(g, running, waiting)| (g.to_owned(), ThreadUse { running, waiting }))
        .collect();
        m.threads.insert("postback".to_owned(), groups);
        let mut md = String::new();
        thread_table(&mut md, &[m, throughput("clicks_closed", 1.0)]);
        assert!(
            md.contains(
                "| decisions | postback | fold-conversion 0.55 (0.25) · tokio-rt-worker 0.30 (0.05) |\n"
            ),
            "{md}"
        );
        assert!(
            !md.contains("fold-catalog") && !md.contains("clicks_closed"),
            "{md}"
        );

        let mut md = String::new();
        thread_table(&mut md, &[throughput("clicks_closed", 1.0)]);
        assert!(md.is_empty(), "no threads recorded, no section: {md}");
    }

    #[test]
    fn throughput_and_ratio_both_count() {
        let clicks = &SCENARIOS[0];
        let pass = judge(
            clicks,
            &[
                throughput("clicks_closed", 21_000.0),
                throughput("ceiling_ack", 25_000.0),
            ],
        );
        assert_eq!(pass.verdict, Verdict::Pass, "{}", pass.why);
        assert!((pass.ratio.unwrap() - 0.84).abs() < 1e-9);
        let low_ratio = judge(
            clicks,
            &[
                throughput("clicks_closed", 21_000.0),
                throughput("ceiling_ack", 30_000.0),
            ],
        );
        assert_eq!(low_ratio.verdict, Verdict::Miss);
        assert!(low_ratio.why.contains("70 %"), "{}", low_ratio.why);
        let no_ceiling = judge(clicks, &[throughput("clicks_closed", 21_000.0)]);
        assert_eq!(no_ceiling.verdict, Verdict::Miss);
        assert_eq!(judge(clicks, &[]).verdict, Verdict::NotRun);
    }

    #[test]
    fn latency_goals_and_errors() {
        let open = &SCENARIOS[1];
        assert_eq!(
            judge(open, &[latency("clicks_open", 9.0, 20.0)]).verdict,
            Verdict::Pass
        );
        let slow_tail = judge(open, &[latency("clicks_open", 9.0, 30.0)]);
        assert_eq!(slow_tail.verdict, Verdict::Miss);
        assert!(slow_tail.why.contains("p99.9"));
        let mut errors = latency("clicks_open", 1.0, 2.0);
        errors.errors = 3;
        assert_eq!(judge(open, &[errors]).verdict, Verdict::Miss);
    }

    #[test]
    fn a_backlog_left_for_the_decider_is_counted_beside_the_rate() {
        let kept_up =
            throughput("postbacks_closed", 20_000.0).extra("decider_backlog_drained_s", 0.1);
        assert_eq!(rate_cell(Some(&kept_up)), "20,000 req/s");
        let behind =
            throughput("postbacks_closed", 20_000.0).extra("decider_backlog_drained_s", 2.5);
        assert_eq!(
            rate_cell(Some(&behind)),
            "20,000 req/s (all decided 2.5 s after the window: 16,000 decided/s)"
        );
    }

    #[test]
    fn a_backlog_left_for_the_folds_is_counted_beside_the_rate() {
        let behind = throughput("clicks_closed", 30_000.0).extra("folds_settled_s", 5.0);
        assert_eq!(
            rate_cell(Some(&behind)),
            "30,000 req/s (all folded 5.0 s after the window: 20,000 folded/s)"
        );
    }

    #[test]
    fn a_smoke_run_fails_on_what_is_broken_not_on_missed_targets() {
        let mut all: Vec<Measurement> = SCENARIOS
            .iter()
            .map(|s| latency(s.id, 999.0, 999.0))
            .chain([Measurement::new("memory_end", "memory", "")])
            .collect();
        let judged: Vec<Judged> = SCENARIOS.iter().map(|s| judge(s, &all)).collect();
        assert!(judged.iter().any(|j| j.verdict == Verdict::Miss));
        assert_eq!(smoke_problems(&all), Vec::<String>::new());

        all[0].unexpected.insert(503, 10);
        all[1].count = 0;
        // Failed: scripts/bench judges it, with BENCH_ALLOW_FAIL.
        all[2].count = 0;
        all[2].failed = Some("stalled".to_owned());
        let problems = smoke_problems(&all);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("10 unexpected"), "{problems:?}");
        assert!(problems[1].contains("nothing completed"), "{problems:?}");
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(0.2), "0");
        assert_eq!(thousands(-1000.0), "-1,000");
    }
}
