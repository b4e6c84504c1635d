//! Watching a service under test through its own endpoints: `/readyz` (each
//! projection's applied sequence) and the report API.

use std::time::{Duration, Instant};

use http::{HeaderValue, StatusCode};
use serde::Deserialize;

use crate::{
    error::BenchError,
    http::{fetch, fetch_json, Target},
};

/// How long a wait may go without progress before it gives up, unless
/// [`set_stall_limit`] says otherwise.
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(20);

static STALL_LIMIT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Sets the stall limit of every wait in this process (first call wins).
pub fn set_stall_limit(limit: Duration) {
    let _ = STALL_LIMIT.set(limit);
}

/// The stall limit in force.
pub fn stall_limit() -> Duration {
    STALL_LIMIT.get().copied().unwrap_or(DEFAULT_STALL_LIMIT)
}

/// Gives up on a wait whose progress counter has not moved for a while, saying
/// whether the service still answers at all.
pub struct Stall {
    last: Option<u64>,
    since: Instant,
    limit: Duration,
}

impl Stall {
    /// A stall detector that allows `limit` without progress.
    pub fn new(limit: Duration) -> Self {
        Self {
            last: None,
            since: Instant::now(),
            limit,
        }
    }

    /// Ok while `progress` keeps moving.
    ///
    /// # Errors
    /// No movement for the limit; the message says whether `target` still
    /// answers `/healthz`.
    pub async fn check(
        &mut self,
        progress: u64,
        target: &Target,
        what: &str,
    ) -> Result<(), BenchError> {
        if self.last != Some(progress) {
            self.last = Some(progress);
            self.since = Instant::now();
            return Ok(());
        }
        if self.since.elapsed() < self.limit {
            return Ok(());
        }
        let alive =
            matches!(fetch(target, "/healthz", None).await, Ok((s, _)) if s == StatusCode::OK);
        Err(BenchError::Stalled(format!(
            "{what}: no progress for {:?}; the service at {} {}",
            self.limit,
            target.addr,
            if alive {
                "still answers /healthz"
            } else {
                "no longer answers /healthz (wedged)"
            }
        )))
    }
}

/// The `/readyz` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Ready {
    pub ready: bool,
    pub projections: Vec<Projection>,
}

/// One fold's status in `/readyz`.
#[derive(Debug, Clone, Deserialize)]
pub struct Projection {
    pub stream: String,
    pub applied_seq: u64,
    pub caught_up: bool,
    /// Nothing was pending after the last message the fold was delivered.
    #[serde(default)]
    pub at_tail: bool,
}

impl Ready {
    /// The applied sequence of the fold of `stream` (0 if there is none).
    pub fn applied(&self, stream: &str) -> u64 {
        self.projections
            .iter()
            .find(|p| p.stream == stream)
            .map_or(0, |p| p.applied_seq)
    }
}

/// Reads `/readyz` (200 or 503, both with the report).
///
/// # Errors
/// No answer, or not the readiness report.
pub async fn readyz(target: &Target) -> Result<Ready, BenchError> {
    let (_, ready) = fetch_json::<Ready>(target, "/readyz", None).await?;
    Ok(ready)
}

/// Waits until the fold of `stream` has applied `seq`.
///
/// # Errors
/// No progress for the stall limit, or not within `timeout`.
pub async fn wait_applied(
    target: &Target,
    stream: &str,
    seq: u64,
    timeout: Duration,
) -> Result<(), BenchError> {
    let doing = format!("folding {stream}");
    let goal = format!("{stream} fold to reach sequence {seq}");
    wait_readyz(target, timeout, &doing, goal, |ready| {
        let applied = ready.map_or(0, |r| r.applied(stream));
        (applied >= seq, applied)
    })
    .await
}

/// Waits until every fold of the service at `target` is at the tail of its
/// stream.
///
/// # Errors
/// No progress for the stall limit, or not within `timeout`.
pub async fn wait_at_tail(target: &Target, timeout: Duration) -> Result<(), BenchError> {
    let goal = format!("the folds of {} to reach the tail", target.addr);
    wait_readyz(target, timeout, "folding the backlog", goal, |ready| {
        ready.map_or((false, 0), |r| {
            let applied = r.projections.iter().map(|p| p.applied_seq).sum();
            (r.projections.iter().all(|p| p.at_tail), applied)
        })
    })
    .await
}

/// Polls `/readyz` every 20 ms until `check` says done (`check` also returns
/// the progress the stall check watches; `None`: no answer this time).
async fn wait_readyz(
    target: &Target,
    timeout: Duration,
    doing: &str,
    goal: String,
    check: impl Fn(Option<&Ready>) -> (bool, u64),
) -> Result<(), BenchError> {
    let until = Instant::now() + timeout;
    let mut stall = Stall::new(stall_limit());
    loop {
        let ready = readyz(target).await.ok();
        let (done, progress) = check(ready.as_ref());
        if done {
            return Ok(());
        }
        stall.check(progress, target, doing).await?;
        if Instant::now() > until {
            return Err(BenchError::Timeout {
                what: goal,
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Deserialize)]
struct Report {
    rows: Vec<ReportRow>,
}

#[derive(Debug, Deserialize)]
struct ReportRow {
    clicks: u64,
    attributed: u64,
    rejected: u64,
}

/// The per-offer report, summed over the offers.
async fn report_totals(target: &Target, bearer: &HeaderValue) -> Result<ReportRow, BenchError> {
    let (status, report) =
        fetch_json::<Report>(target, "/api/reports?group_by=offer", Some(bearer)).await?;
    if status != StatusCode::OK {
        return Err(BenchError::Usage(format!(
            "GET /api/reports answered {status}"
        )));
    }
    Ok(report.rows.iter().fold(
        ReportRow {
            clicks: 0,
            attributed: 0,
            rejected: 0,
        },
        |sum, r| ReportRow {
            clicks: sum.clicks + r.clicks,
            attributed: sum.attributed + r.attributed,
            rejected: sum.rejected + r.rejected,
        },
    ))
}

/// Conversions decided so far (attributed + rejected), from the report API.
///
/// # Errors
/// No answer, or not a report.
pub async fn decided(target: &Target, bearer: &HeaderValue) -> Result<u64, BenchError> {
    let totals = report_totals(target, bearer).await?;
    Ok(totals.attributed + totals.rejected)
}

/// Clicks in postback-service's projection, from the report API: a click
/// counts once whether it came alone or in a batch (`clicks.v1.recorded_batch`),
/// so this, not the CLICKS stream's message count, is how many clicks the log
/// holds once the fold is at its end.
///
/// # Errors
/// No answer, or not a report.
pub async fn clicks(target: &Target, bearer: &HeaderValue) -> Result<u64, BenchError> {
    Ok(report_totals(target, bearer).await?.clicks)
}

/// Conversions reported in the log so far (`conversions.v1.reported`).
///
/// # Errors
/// NATS did not answer.
pub async fn reported(js: &async_nats::jetstream::Context) -> Result<u64, BenchError> {
    let counts = crate::nats::subject_counts(
        js,
        proto::stream::CONVERSIONS,
        proto::subject::CONVERSION_REPORTED,
    )
    .await?;
    Ok(counts.values().sum())
}

/// Waits until every conversion reported in the log is decided and folded back
/// (the decider has no backlog); returns how long that took.
///
/// # Errors
/// Still pending after `timeout`.
pub async fn settle(
    target: &Target,
    bearer: &HeaderValue,
    js: &async_nats::jetstream::Context,
    timeout: Duration,
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let mut ticker = crate::ticker::Ticker::from(started);
    let mut stall = Stall::new(stall_limit());
    loop {
        let reported = reported(js).await?;
        let decided = decided(target, bearer).await?;
        if decided >= reported {
            return Ok(started.elapsed());
        }
        stall
            .check(decided, target, "deciding pending conversions")
            .await?;
        if started.elapsed() > timeout {
            return Err(BenchError::Timeout {
                what: format!("deciding the {} pending conversions", reported - decided),
                after: timeout,
            });
        }
        if let Some(at) = ticker.due() {
            eprintln!(
                "[settle] {:>5.1}s {} conversions still pending",
                at.as_secs_f64(),
                reported - decided
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
