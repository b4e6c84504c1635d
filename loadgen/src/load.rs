//! The two load engines.
//!
//! - **Closed loop** ([`Mode::Closed`]): N connections, each sends its next
//!   request as soon as the previous answer is in, for a fixed time. Measures peak
//!   throughput; its latencies are service times under saturation.
//! - **Open loop** ([`Mode::Open`]): requests are due at a fixed rate, request `i`
//!   at `start + i / rate`, whatever happened to earlier ones. A pool of
//!   connections takes due requests from one queue; latency is counted from the
//!   *due* time, not from when a connection got round to sending it, so a stall
//!   shows up in every request it delayed (no coordinated omission).
//!
//! Both run a warm-up first (not counted), print a progress line per second, and
//! stop by themselves: closed loop at the deadline, open loop after the last due
//! request plus a bounded drain.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant, SystemTime},
};

use hdrhistogram::Histogram;
use http::StatusCode;
use tokio::sync::mpsc;

use crate::{
    http::{Conn, Req, Target},
    procfs::{CpuUse, CpuWatch, Watched},
    stats::{histogram, Progress, Recorder},
};

/// What to send: request `i` of a run (numbered from 0, unique across workers).
pub trait Plan: Send + Sync + 'static {
    /// The request numbered `i`.
    ///
    /// # Errors
    /// The request cannot be built (counted as an error of that request).
    fn request(&self, i: u64) -> Result<Req, crate::error::BoxError>;
    /// The status a correct answer has.
    fn expected(&self) -> StatusCode;
}

/// How the load is offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// As fast as `connections` connections allow.
    Closed,
    /// This many requests per second, on a pool of `connections` connections.
    Open { rate: f64 },
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Shown in the progress lines.
    pub label: String,
    pub target: Target,
    pub mode: Mode,
    pub connections: usize,
    /// Measured time, after the warm-up.
    pub warmup: Duration,
    pub duration: Duration,
    /// Per request; a request without an answer by then is an error.
    pub timeout: Duration,
    /// Keep the numbers of the requests answered as expected (for matching
    /// answers with later events).
    pub keep_ok: bool,
    /// Processes whose CPU use over the measured window is reported.
    pub watched: Vec<Watched>,
}

/// What a load run measured.
#[derive(Debug)]
pub struct LoadOutcome {
    /// Requests answered as expected in the measured window.
    pub ok: u64,
    /// Requests without an answer (connection errors, timeouts, never sent in
    /// time), measured window only.
    pub errors: u64,
    /// Answers with another status than expected, by status.
    pub unexpected: BTreeMap<u16, u64>,
    /// Length of the measured window.
    pub seconds: f64,
    pub histogram: Histogram<u64>,
    /// Open loop: when request 0 was due, wall clock.
    pub start_wall: SystemTime,
    /// The first request number of the measured window.
    pub first_measured: u64,
    /// Requests issued in all (warm-up included).
    pub issued: u64,
    /// With `keep_ok`: the numbers of the requests answered as expected.
    pub ok_requests: Vec<u64>,
    /// Where the CPU went in the measured window.
    pub cpu: CpuUse,
}

impl LoadOutcome {
    /// Measured requests answered as expected per second.
    pub fn throughput(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }
}

struct Shared<P> {
    plan: P,
    target: Target,
    rec: Recorder,
    timeout: Duration,
    ok_requests: Option<Mutex<Vec<u64>>>,
}

impl<P: Plan> Shared<P> {
    /// Sends request `i` on `conn` (connecting first if needed) and records it.
    async fn one(
        &self,
        worker: usize,
        conn: &mut Option<Conn>,
        i: u64,
        since: Instant,
        measured: bool,
    ) {
        if conn.is_none() {
            match tokio::time::timeout(self.timeout, Conn::connect(self.target.addr)).await {
                Ok(Ok(c)) => *conn = Some(c),
                _ => {
                    self.rec.error(measured);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    return;
                }
            }
        }
        let Some(c) = conn.as_mut() else { return };
        let Ok(req) = self.plan.request(i) else {
            self.rec.error(measured);
            return;
        };
        let result = tokio::time::timeout(self.timeout, c.send(req)).await;
        match result {
            Ok(Ok((status, _))) if status == self.plan.expected() => {
                self.rec.success(worker, since.elapsed(), measured);
                if measured {
                    if let Some(kept) = &self.ok_requests {
                        kept.lock().unwrap_or_else(PoisonError::into_inner).push(i);
                    }
                }
            }
            Ok(Ok((status, _))) => self.rec.unexpected(status.as_u16(), measured),
            Ok(Err(_)) | Err(_) => {
                self.rec.error(measured);
                *conn = None;
            }
        }
    }
}

/// Runs one load and returns what it measured. Stops by itself.
pub async fn run<P: Plan>(config: LoadConfig, plan: P) -> LoadOutcome {
    let shared = Arc::new(Shared {
        plan,
        target: config.target.clone(),
        rec: Recorder::new(config.connections),
        timeout: config.timeout,
        ok_requests: config.keep_ok.then(|| Mutex::new(Vec::new())),
    });
    match config.mode {
        Mode::Closed => closed(&config, shared).await,
        Mode::Open { rate } => open(&config, shared, rate).await,
    }
}

async fn closed<P: Plan>(config: &LoadConfig, shared: Arc<Shared<P>>) -> LoadOutcome {
    let started = Instant::now();
    let measure_from = started + config.warmup;
    let deadline = measure_from + config.duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::with_capacity(config.connections);
    for worker in 0..config.connections {
        let shared = shared.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut conn = None;
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let measured = shared.rec.is_measuring();
                shared
                    .one(worker, &mut conn, i, Instant::now(), measured)
                    .await;
            }
        }));
    }
    let mut total = histogram();
    let mut progress = Progress::new(&config.label);
    let mut measured_from = None;
    let mut cpu = None;
    let mut tick = tokio::time::interval_at(
        (started + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    loop {
        let wake = if measured_from.is_none() {
            measure_from.min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            _ = tick.tick() => {
                let interval = shared.rec.drain();
                let _ = total.add(&interval);
                let phase = if measured_from.is_some() { "measure" } else { "warm-up" };
                progress.line(started.elapsed(), phase, &shared.rec, &interval, "");
            }
            () = tokio::time::sleep_until(wake.into()) => {
                if measured_from.is_none() {
                    shared.rec.set_measuring(true);
                    measured_from = Some(Instant::now());
                    cpu = Some(CpuWatch::start(&config.watched));
                } else {
                    break;
                }
            }
        }
    }
    shared.rec.set_measuring(false);
    let seconds = measured_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let cpu = cpu.map(|c| c.stop()).unwrap_or_default();
    // Workers stop at the deadline; an answer still in flight is not counted.
    let stop_by = Instant::now() + config.timeout;
    for w in &mut workers {
        let _ = tokio::time::timeout_at(stop_by.into(), w).await;
    }
    for w in &workers {
        w.abort();
    }
    let _ = total.add(shared.rec.drain());
    outcome(
        &shared,
        total,
        seconds,
        SystemTime::now(),
        (0, next.load(Ordering::Relaxed)),
        cpu,
    )
}

/// A request due at `due`.
struct Job {
    i: u64,
    due: Instant,
}

async fn open<P: Plan>(config: &LoadConfig, shared: Arc<Shared<P>>, rate: f64) -> LoadOutcome {
    let rate = rate.max(0.001);
    let first_measured = (config.warmup.as_secs_f64() * rate).ceil() as u64;
    let total_requests = first_measured + (config.duration.as_secs_f64() * rate).round() as u64;
    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let completed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::with_capacity(config.connections);
    for worker in 0..config.connections {
        let shared = shared.clone();
        let rx = rx.clone();
        let completed = completed.clone();
        workers.push(tokio::spawn(async move {
            // Connect before the first request is due.
            let mut conn = Conn::connect(shared.target.addr).await.ok();
            loop {
                let job = { rx.lock().await.recv().await };
                let Some(job) = job else { break };
                shared
                    .one(worker, &mut conn, job.i, job.due, job.i >= first_measured)
                    .await;
                completed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Let the pool connect, then start the clock.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let start_wall = SystemTime::now();
    let period = Duration::from_secs_f64(1.0 / rate);
    let measure_from = start + config.warmup;
    let mut progress = Progress::new(&config.label);
    let mut total = histogram();
    let mut ticker = crate::ticker::Ticker::from(start);
    let mut measuring = false;
    let mut cpu = None;
    for i in 0..total_requests {
        let due = start + period.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
        if !measuring && i >= first_measured {
            measuring = true;
            shared.rec.set_measuring(true);
            cpu = Some(CpuWatch::start(&config.watched));
        }
        if let Some(at) = ticker.due() {
            let interval = shared.rec.drain();
            let _ = total.add(&interval);
            let backlog = i.saturating_sub(completed.load(Ordering::Relaxed));
            let phase = if due >= measure_from {
                "measure"
            } else {
                "warm-up"
            };
            let extra = format!("  backlog {backlog}");
            progress.line(at, phase, &shared.rec, &interval, &extra);
        }
        // Unbounded on purpose: a slow server must not slow the schedule down.
        let _ = tx.send(Job { i, due });
    }
    drop(tx);
    let cpu = cpu.map(|c| c.stop()).unwrap_or_default();
    let schedule_end = start + period.mul_f64(total_requests as f64);
    let seconds = schedule_end
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    // Drain: what is still queued or in flight gets at most one more timeout;
    // then whatever is left is abandoned.
    let drain_until = Instant::now() + config.timeout + Duration::from_secs(1);
    for w in &mut workers {
        if tokio::time::timeout_at(drain_until.into(), w)
            .await
            .is_err()
        {
            break;
        }
    }
    for w in &workers {
        w.abort();
    }
    let answered = shared.rec.ok()
        + shared.rec.errors()
        + shared.rec.unexpected_counts().values().sum::<u64>();
    let unanswered = (total_requests - first_measured.min(total_requests)).saturating_sub(answered);
    for _ in 0..unanswered {
        shared.rec.error(true);
    }
    if unanswered > 0 {
        eprintln!(
            "[{}] {unanswered} requests not answered by the end of the drain: counted as errors",
            config.label
        );
    }
    let interval = shared.rec.drain();
    let _ = total.add(&interval);
    progress.line(start.elapsed(), "drained", &shared.rec, &interval, "");
    outcome(
        &shared,
        total,
        seconds,
        start_wall,
        (first_measured, total_requests),
        cpu,
    )
}

fn outcome<P>(
    shared: &Shared<P>,
    histogram: Histogram<u64>,
    seconds: f64,
    start_wall: SystemTime,
    (first_measured, issued): (u64, u64),
    cpu: CpuUse,
) -> LoadOutcome {
    let mut ok_requests = shared
        .ok_requests
        .as_ref()
        .map(|m| std::mem::take(&mut *m.lock().unwrap_or_else(PoisonError::into_inner)))
        .unwrap_or_default();
    ok_requests.sort_unstable();
    LoadOutcome {
        ok: shared.rec.ok(),
        errors: shared.rec.errors(),
        unexpected: shared.rec.unexpected_counts(),
        seconds,
        histogram,
        start_wall,
        first_measured,
        issued,
        ok_requests,
        cpu,
    }
}
