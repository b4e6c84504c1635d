//! The command line: one subcommand per measurement, the ceiling servers, and
//! the report. `scripts/bench` drives them; each can be run by hand too.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    ceiling::ServeMode,
    procfs::{parse_watched, Watched},
};

/// Load generator and benchmark driver of the postback tracker.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
pub struct Cli {
    /// Worker threads of the runtime (default: one per core).
    #[arg(long, global = true, env = "LOADGEN_THREADS")]
    pub threads: Option<usize>,
    /// A wait on a service gives up after this long without progress.
    #[arg(long, global = true, env = "BENCH_STALL_LIMIT", default_value = "20s", value_parser = parse_duration)]
    pub stall_limit: Duration,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Loads one URL (closed loop, or open loop with --rate / --rate-from).
    Http(HttpArgs),
    /// Runs a ceiling server (`bare`: 302 at once; `ack`: 302 after a JetStream ack).
    Serve(ServeArgs),
    /// Ceiling 3: pipelined JetStream publishes of click-sized events.
    CeilingPublish(CeilingPublishArgs),
    /// Ceiling 4: sled batched inserts of click rows, flushed per batch.
    CeilingSled(CeilingSledArgs),
    /// Ceilings 5 and 6: postback-service's clicks or conversions fold alone,
    /// applying pre-encoded events to sled without NATS.
    FoldAlone(FoldAloneArgs),
    /// Advertiser postbacks over HTTP on seeded clicks; with --e2e (open loop)
    /// also the time from each postback to its decision in the log.
    Postbacks(PostbacksArgs),
    /// Decisions/s: conversions published to NATS for clicks already folded,
    /// timed until all are decided and folded back.
    Decisions(DecisionsArgs),
    /// Affiliate deliveries/s to a fast local receiver this command runs.
    Deliveries(DeliveriesArgs),
    /// Times a postback-service started on an empty data dir until it has
    /// replayed the whole log; states its peak memory and disk use.
    RebuildWait(RebuildArgs),
    /// Records peak and current memory of processes.
    Mem(MemArgs),
    /// Writes BENCHMARKS.md and results.json from a results file.
    Report(ReportArgs),
}

/// Parses `1500ms`, `10s`, `2m` or a bare number of seconds.
///
/// # Errors
/// Not such a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => (&s[..at], &s[at..]),
        None => (s, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 500ms, 10s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Where a measurement is recorded.
#[derive(Debug, Clone, Args)]
pub struct Output {
    /// Id of the measurement in the results file (each command has a default).
    #[arg(long)]
    pub id: Option<String>,
    /// Results file (JSON lines), appended to.
    #[arg(long, env = "BENCH_RESULTS", default_value = "bench/results.jsonl")]
    pub results: PathBuf,
    /// A process whose CPU use over the measured window to report, as
    /// `name=pid` (repeatable).
    #[arg(long = "watch", value_parser = parse_watched)]
    pub watch: Vec<Watched>,
}

impl Output {
    /// The id given, else `default`.
    pub fn id_or(&self, default: &str) -> String {
        self.id.clone().unwrap_or_else(|| default.to_owned())
    }
}

impl Command {
    /// The results file and measurement id of a measuring command (`None` for
    /// the server and the report).
    pub fn measurement(&self) -> Option<(PathBuf, String)> {
        let (out, default) = match self {
            Self::Http(a) => (&a.out, "http"),
            Self::CeilingPublish(a) => (&a.out, "ceiling_publish"),
            Self::CeilingSled(a) => (&a.out, "ceiling_sled"),
            Self::FoldAlone(a) => (&a.out, a.shape.id()),
            Self::Postbacks(a) if a.e2e => (&a.out, "e2e"),
            Self::Postbacks(a) => (&a.out, "postbacks_closed"),
            Self::Decisions(a) => (&a.out, "decisions"),
            Self::Deliveries(a) => (&a.out, "deliveries"),
            Self::RebuildWait(a) => (&a.out, "rebuild"),
            Self::Mem(a) => (&a.out, "memory"),
            Self::Serve(_) | Self::Report(_) => return None,
        };
        Some((out.results.clone(), out.id_or(default)))
    }
}

/// How HTTP load is offered.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Connections (closed loop: all busy; open loop: the pool).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Time before measuring starts (same load, not counted).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Open loop at this many requests per second (default: closed loop).
    #[arg(long, conflicts_with = "rate_from")]
    pub rate: Option<f64>,
    /// Open loop at --rate-factor times the throughput of this earlier
    /// measurement in the results file.
    #[arg(long)]
    pub rate_from: Option<String>,
    /// See --rate-from.
    #[arg(long, default_value_t = 0.5)]
    pub rate_factor: f64,
    /// A request without an answer after this long is an error.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `loadgen http`.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// `http://IP:port/path?query`, sent as is for every request.
    #[arg(long)]
    pub url: String,
    /// Bearer token to send.
    #[arg(long, env = "BENCH_BEARER", hide_env_values = true)]
    pub bearer: Option<String>,
    /// The status a correct answer has.
    #[arg(long, default_value_t = 200)]
    pub expect: u16,
    /// What is measured, in words (for the report).
    #[arg(long, default_value = "HTTP GET")]
    pub title: String,
    /// A service (IP:port) whose folds must be back at the tail of the log
    /// after the load before the command ends, so the next measurement does
    /// not share the machine with this one's backlog; how long that took is
    /// recorded as `folds_settled_s`. Repeatable.
    #[arg(long = "settle")]
    pub settle: Vec<String>,
    /// How long to wait for those folds.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub settle_timeout: Duration,
    /// Send as this many visitors in turn (request `i` from visitor
    /// `i % visitors`, each its own user agent); 0: all as one. A click
    /// service remembers each visitor (unique clicks), and one visitor's
    /// clicks cost it less than real traffic's.
    #[arg(long, default_value_t = 0)]
    pub visitors: u64,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub out: Output,
}

/// `loadgen serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[arg(value_enum)]
    pub mode: ServeMode,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18180")]
    pub listen: SocketAddr,
    /// NATS server (ack mode).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Stops by itself after this long.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub lifetime: Duration,
    /// Ack mode: this many readers (each its own connection and ordered pull
    /// consumer, as a fold has) follow the stream while the server publishes.
    #[arg(long, default_value_t = 0)]
    pub readers: usize,
    /// Readers poll instead of following: every this many milliseconds each
    /// takes what the stream holds past its position (a pull consumer's
    /// no-wait fetch) and sleeps; 0 (the default) follows with an ordered
    /// consumer, as the folds do. For measuring what NATS's live delivery to
    /// a reader costs the publishers' tail.
    #[arg(long, default_value_t = 0)]
    pub reader_poll_ms: u64,
}

/// `loadgen ceiling-publish`.
#[derive(Debug, Clone, Args)]
pub struct CeilingPublishArgs {
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Most acks outstanding.
    #[arg(long, default_value_t = 4096)]
    pub window: usize,
    #[command(flatten)]
    pub out: Output,
}

/// A measurement of sled in a scratch directory, for a set time.
#[derive(Debug, Clone, Args)]
pub struct ScratchRun {
    /// Scratch directory (deleted before and after).
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
}

/// `loadgen ceiling-sled`.
#[derive(Debug, Clone, Args)]
pub struct CeilingSledArgs {
    #[command(flatten)]
    pub run: ScratchRun,
    /// Rows per batch (the folds group up to 1024 events).
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    #[command(flatten)]
    pub out: Output,
}

/// `loadgen fold-alone`.
#[derive(Debug, Clone, Args)]
pub struct FoldAloneArgs {
    /// Which fold.
    #[arg(long, value_enum)]
    pub shape: crate::folds::Shape,
    #[command(flatten)]
    pub run: ScratchRun,
    /// Events per commit. The folds group what one read from NATS brings, up to
    /// 1024: about 900 for clicks at full load (they linger 2 ms), about 127 for
    /// conversions in the decisions scenario.
    #[arg(long, default_value_t = 128)]
    pub group: usize,
    /// Conversions: how many groups of reports are folded between a report and
    /// its attribution. 0 attributes in the next group; the decisions scenario
    /// folds a burst of 100,000 reports before the first decision (--lag 780
    /// at --group 128), so decisions land on views written long before, in a
    /// Tree holding that many pending conversions.
    #[arg(long, default_value_t = 0)]
    pub lag: usize,
    /// sled's page cache, in MiB, as the services' `SLED_CACHE_MB`.
    #[arg(long, env = "SLED_CACHE_MB", default_value_t = 1024)]
    pub cache_mb: u64,
    #[command(flatten)]
    pub out: Output,
}

/// The service and log a scenario works on.
#[derive(Debug, Clone, Args)]
pub struct System {
    /// postback-service's HTTP address, IP:port.
    #[arg(long, env = "POSTBACK_ADDR", default_value = "127.0.0.1:8081")]
    pub postback: String,
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// postback-service's admin token (read API).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
}

/// `loadgen postbacks`.
#[derive(Debug, Clone, Args)]
pub struct PostbacksArgs {
    #[command(flatten)]
    pub system: System,
    /// Clicks published first; postbacks go to them in turn, each with its own txid.
    #[arg(long, default_value_t = 10_000)]
    pub pool: usize,
    #[arg(long, default_value = "bench")]
    pub offer: String,
    #[arg(long, default_value = "bench-aff")]
    pub affiliate: String,
    /// Also measure postback accepted → decision in the log (needs open loop).
    #[arg(long)]
    pub e2e: bool,
    /// How long to wait for the decider to catch up afterwards.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub settle_timeout: Duration,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub out: Output,
}

/// `loadgen decisions`.
#[derive(Debug, Clone, Args)]
pub struct DecisionsArgs {
    #[command(flatten)]
    pub system: System,
    /// Offers the seeded clicks are spread over.
    #[arg(long, value_delimiter = ',', default_value = "bench")]
    pub offers: Vec<String>,
    /// Affiliates the seeded clicks are spread over.
    #[arg(long, value_delimiter = ',', default_value = "bench-aff")]
    pub affiliates: Vec<String>,
    /// Publish clicks until CLICKS holds at least this many.
    #[arg(long, default_value_t = 0)]
    pub clicks_total: u64,
    /// Conversions to decide (at least).
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// Report more, until CONVERSIONS holds at least this many reports.
    #[arg(long, default_value_t = 0)]
    pub reports_total: u64,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub out: Output,
}

/// `loadgen deliveries`.
#[derive(Debug, Clone, Args)]
pub struct DeliveriesArgs {
    #[command(flatten)]
    pub system: System,
    /// Where the receiver listens: the affiliate's postback URL points here.
    #[arg(long, default_value = "127.0.0.1:18199")]
    pub receiver: SocketAddr,
    #[arg(long, default_value = "bench")]
    pub offer: String,
    /// An affiliate whose postback URL is the receiver's.
    #[arg(long, default_value = "bench-pb")]
    pub affiliate: String,
    /// Attributed conversions to deliver.
    #[arg(long, default_value_t = 20_000)]
    pub count: u64,
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub out: Output,
}

/// `loadgen rebuild-wait`.
#[derive(Debug, Clone, Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub system: System,
    /// The postback-service process rebuilding.
    #[arg(long)]
    pub pid: u32,
    /// When it was started, Unix milliseconds.
    #[arg(long)]
    pub since_ms: i64,
    /// Its (initially empty) data dir.
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub out: Output,
}

/// `loadgen mem`.
#[derive(Debug, Clone, Args)]
pub struct MemArgs {
    /// `name=pid` (repeatable).
    #[arg(long = "pid", value_parser = parse_watched, required = true)]
    pub pids: Vec<Watched>,
    /// When this was taken, in words (for the report).
    #[arg(long, default_value = "end of the run")]
    pub when: String,
    #[command(flatten)]
    pub out: Output,
}

/// `loadgen report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// The run's results file.
    #[arg(long, env = "BENCH_RESULTS", default_value = "bench/results.jsonl")]
    pub results: PathBuf,
    /// Markdown report to write.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub markdown: PathBuf,
    /// Machine-readable report to write.
    #[arg(long, default_value = "bench/results.json")]
    pub json: PathBuf,
    /// `full` or `smoke`.
    #[arg(long, default_value = "full")]
    pub mode: String,
    /// Cargo profile of the binaries measured.
    #[arg(long, default_value = "release")]
    pub profile: String,
    /// The nats-server binary (for its version).
    #[arg(long, default_value = "nats-server")]
    pub nats_server: String,
    /// Free text for the report's header (e.g. "the machine was shared").
    #[arg(long, default_value = "")]
    pub note: String,
    /// Load average when the run started (`/proc/loadavg`).
    #[arg(long, default_value = "")]
    pub load_before: String,
    /// Hand-written analysis appended to the Markdown report, if it exists.
    #[arg(long, default_value = "bench/notes.md")]
    pub notes: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
