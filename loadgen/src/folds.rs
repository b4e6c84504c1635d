//! Ceilings 5 and 6: postback-service's own folds alone, without NATS.
//!
//! The decisions and rebuild scenarios are bounded by one fold each (its staging
//! and commit threads)
//! (see BENCHMARKS.md). These two measurements run that stage on its own: the
//! real [`ClicksFold`] and [`ConversionsFold`] applying events that were
//! encoded beforehand to a real sled Tree, in groups, through the same
//! `common::fold::stage_new` and commit the services use; for the conversions
//! fold, each group staged on one thread over the group before while another
//! thread commits that one, as the service does (`FoldSpec::pipelined`). A
//! scenario's ratio to them is what everything around the fold costs (NATS, the
//! decider, the other folds sharing the cores); the fold's own cost against
//! sled's is in the notes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use std::sync::{mpsc, Arc};

use common::{fold::stage_new, store::Sealed, LogEntry};
use postback_service::{
    clicks::ClicksFold,
    conversions::{batch, ConversionsFold, Decision},
};
use prost::Message;
use proto::conversions::v1::{ConversionAttributed, ConversionStatus};

use crate::{
    cli::ScratchRun,
    error::BenchError,
    events,
    procfs::{self, CpuWatch, Watched},
    results::Measurement,
};

/// Which fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// ClickRecorded events, each from its own visitor, spread over 10 offers
    /// and 50 affiliates.
    Clicks,
    /// Per conversion a ConversionReported, then (in the next group) its
    /// ConversionAttributed, in batches as the decider publishes them.
    Conversions,
}

impl Shape {
    /// Default measurement id.
    pub fn id(self) -> &'static str {
        match self {
            Self::Clicks => "fold_clicks",
            Self::Conversions => "fold_conversions",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::Clicks => "clicks/s",
            Self::Conversions => "conversions/s",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Clicks => "Ceiling 5: postback-service's clicks fold alone (no NATS, one thread, as in the service): ClickRecorded events from distinct visitors applied to sled",
            Self::Conversions => "Ceiling 6: postback-service's conversions fold alone (no NATS, no decider; a staging and a commit thread, as in the service): a ConversionReported, then its ConversionAttributed, in batches as the decider publishes them",
        }
    }

    /// Whether the service commits this fold's groups on a second thread
    /// (`FoldSpec::pipelined`): the conversions fold does, the clicks fold not.
    fn pipelined(self) -> bool {
        self == Self::Conversions
    }

    /// Stages `entries` with this shape's fold over `base`, the group before.
    fn stage(
        self,
        tree: &common::FoldTree,
        base: Option<&Sealed>,
        entries: &[LogEntry<'_>],
    ) -> Result<Option<Sealed>, sled::Error> {
        match self {
            Self::Clicks => stage_new(tree, base, &mut ClicksFold, entries),
            Self::Conversions => stage_new(tree, base, &mut ConversionsFold, entries),
        }
    }
}

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct Plan {
    pub shape: Shape,
    pub run: ScratchRun,
    /// Events per commit.
    pub group: usize,
    /// Conversions: groups of reports folded between a report and its
    /// attribution (0: the next group).
    pub lag: usize,
    /// sled's page cache.
    pub cache_bytes: u64,
}

/// One group's events, encoded before the clock runs: (subject, payload).
type Encoded = Vec<(&'static str, Vec<u8>)>;

/// Makes the groups of a shape, numbering the log as it goes.
struct Source {
    shape: Shape,
    group: usize,
    seq: u64,
    now_ms: i64,
    run: String,
    /// Groups of reports folded between a report and its attribution.
    lag: usize,
    /// Groups of conversions reported and not yet attributed, oldest first:
    /// (the report's sequence, the report).
    reported: VecDeque<Vec<(u64, proto::conversions::v1::ConversionReported)>>,
}

impl Source {
    fn new(shape: Shape, group: usize, lag: usize) -> Self {
        Self {
            shape,
            group: group.max(1),
            lag,
            seq: 0,
            now_ms: common::time::now_ms(),
            run: uuid::Uuid::now_v7().simple().to_string()[20..].to_owned(),
            reported: VecDeque::new(),
        }
    }

    /// The next group, and how many clicks or conversions it completes.
    fn next(&mut self) -> (Encoded, u64) {
        match self.shape {
            Shape::Clicks => {
                let events = (0..self.group)
                    .map(|_| {
                        self.seq += 1;
                        let n = self.seq;
                        let id = events::click_id();
                        let mut click = events::click(
                            &id,
                            &format!("offer-{}", n % 10),
                            &format!("aff-{}", n % 50),
                            self.now_ms,
                        );
                        click.ip = events::visitor_ip(&id);
                        (proto::subject::CLICK_RECORDED, click.encode_to_vec())
                    })
                    .collect();
                (events, self.group as u64)
            }
            Shape::Conversions if self.reported.len() <= self.lag => {
                let mut reported = Vec::with_capacity(self.group);
                let events = (0..self.group)
                    .map(|_| {
                        self.seq += 1;
                        let report = events::conversion(
                            &events::click_id(),
                            &format!("{}-{}", self.run, self.seq),
                            self.now_ms,
                        );
                        let bytes = report.encode_to_vec();
                        reported.push((self.seq, report));
                        (proto::subject::CONVERSION_REPORTED, bytes)
                    })
                    .collect();
                self.reported.push_back(reported);
                (events, 0)
            }
            // The decisions of a group of reports go as the decider publishes
            // a round's: in batches.
            Shape::Conversions => {
                let reported = self.reported.pop_front().unwrap_or_default();
                let done = reported.len() as u64;
                let decisions: Vec<Decision> = reported
                    .into_iter()
                    .zip(self.seq..)
                    .map(|((reported_seq, r), n)| {
                        Decision::Attributed(attribution(&r, reported_seq, n, self.now_ms))
                    })
                    .collect();
                let events: Encoded =
                    batch::messages(&decisions, batch::Limits::new(batch::MOST_PER_BATCH))
                        .into_iter()
                        .map(|m| (m.subject, m.payload))
                        .collect();
                self.seq += events.len() as u64;
                (events, done)
            }
        }
    }
}

/// One group, encoded, with its first sequence and what it completes.
struct Next {
    group: Encoded,
    first_seq: u64,
    completes: u64,
}

impl Source {
    /// Makes the next group (outside the clock).
    fn encoded(&mut self) -> Next {
        let first_seq = self.seq + 1;
        let (group, completes) = self.next();
        Next {
            group,
            first_seq,
            completes,
        }
    }
}

impl Next {
    fn entries(&self, log_time_ms: i64) -> Vec<LogEntry<'_>> {
        self.group
            .iter()
            .zip(self.first_seq..)
            .map(|((subject, payload), seq)| LogEntry {
                subject,
                payload,
                seq,
                log_time_ms,
            })
            .collect()
    }
}

/// The decision the decider publishes for an attributed report of the
/// benchmark's catalog (no caps, no affiliate postback).
fn attribution(
    r: &proto::conversions::v1::ConversionReported,
    reported_seq: u64,
    n: u64,
    now_ms: i64,
) -> ConversionAttributed {
    ConversionAttributed {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at_ms: now_ms,
        conversion_id: r.conversion_id.clone(),
        click_id: r.click_id.clone(),
        offer_id: format!("offer-{}", n % 10),
        affiliate_id: format!("aff-{}", n % 50),
        goal: r.goal.clone(),
        txid: r.txid.clone(),
        payout_micros: 2_500_000,
        payout_currency: "USD".into(),
        revenue_micros: 12_500_000,
        revenue_currency: "USD".into(),
        converted_at_ms: now_ms,
        reported_seq,
        status: ConversionStatus::Approved as i32,
        ..Default::default()
    }
}

/// Runs the fold of `plan.shape` for `warmup + duration` and measures the
/// applying (encoding the events is outside the clock).
///
/// # Errors
/// sled failed.
pub async fn run(plan: Plan, watched: &[Watched]) -> Result<Measurement, BenchError> {
    let watched = watched.to_vec();
    tokio::task::spawn_blocking(move || measure(&plan, &watched))
        .await
        .map_err(|e| BenchError::Usage(format!("the fold thread failed: {e}")))?
}

fn measure(plan: &Plan, watched: &[Watched]) -> Result<Measurement, BenchError> {
    let dir = &plan.run.dir;
    let _ = std::fs::remove_dir_all(dir);
    let db = common::store::open_db_with_cache(dir, plan.cache_bytes)?;
    let tree = common::FoldTree::open(&db, "fold")?;
    let mut source = Source::new(plan.shape, plan.group, plan.lag);
    let (label, unit) = (plan.shape.id(), plan.shape.unit());
    let started = Instant::now();
    let measure_from = started + plan.run.warmup;
    let deadline = measure_from + plan.run.duration;
    let (mut done, mut events, mut applying) = (0u64, 0u64, Duration::ZERO);
    let mut measuring: Option<CpuWatch> = None;
    let written = || procfs::written_bytes(std::process::id()).unwrap_or(0);
    let mut written_before = 0;
    let mut ticker = crate::ticker::Ticker::from(started);
    let mut last = 0;
    std::thread::scope(|threads| -> Result<(), sled::Error> {
        // The commit thread: commits each group sent, in order, and answers.
        let (commits, queue) = mpsc::channel::<Arc<Sealed>>();
        let (answers, answered) = mpsc::channel();
        let committer = &tree;
        threads.spawn(move || {
            for sealed in queue {
                if answers.send(sealed.commit(committer)).is_err() {
                    break;
                }
            }
        });
        let gone = || sled::Error::ReportableBug("the commit thread stopped".into());
        let mut committing: Option<Arc<Sealed>> = None;
        let mut next = source.encoded();
        while Instant::now() < deadline {
            if measuring.is_none() && Instant::now() >= measure_from {
                (done, events, applying, last) = (0, 0, Duration::ZERO, 0);
                measuring = Some(CpuWatch::start(watched));
                written_before = written();
            }
            // Timed: staging this group over the one being committed, and
            // waiting for that commit to end.
            let t0 = Instant::now();
            let entries = next.entries(source.now_ms);
            let sealed = plan.shape.stage(&tree, committing.as_deref(), &entries)?;
            if committing.take().is_some() {
                answered.recv().map_err(|_| gone())??;
            }
            applying += t0.elapsed();
            done += next.completes;
            events += entries.len() as u64;
            drop(entries);
            // Not timed, and no commit runs meanwhile: encoding the next group.
            next = source.encoded();
            let t0 = Instant::now();
            match sealed {
                Some(sealed) if plan.shape.pipelined() => {
                    let sealed = Arc::new(sealed);
                    commits.send(Arc::clone(&sealed)).map_err(|_| gone())?;
                    committing = Some(sealed);
                }
                Some(sealed) => sealed.commit(&tree)?,
                None => {}
            }
            applying += t0.elapsed();
            if let Some(at) = ticker.due() {
                eprintln!(
                    "[{label}] {:>5.1}s {:>8} done in the last second (encoding included)",
                    at.as_secs_f64(),
                    done - last
                );
                last = done;
            }
        }
        // The last commit is part of the run.
        let t0 = Instant::now();
        if committing.is_some() {
            answered.recv().map_err(|_| gone())??;
        }
        applying += t0.elapsed();
        Ok(())
    })?;
    let cpu = measuring.map(|w| w.stop()).unwrap_or_default();
    let written_per_event = written().saturating_sub(written_before) / events.max(1);
    let mut m = Measurement::new(label, plan.shape.title(), unit)
        .with_rate(done, applying.as_secs_f64())
        .extra("group", plan.group as u64)
        .extra("events", events)
        .extra(
            "events_per_s",
            (events as f64 / applying.as_secs_f64().max(1e-6)).round(),
        )
        .extra("disk_mib", procfs::mib(procfs::dir_size(dir)))
        .extra("written_bytes_per_event", written_per_event);
    m.set_cpu(cpu);
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_alternate_reports_and_their_attributions() {
        let mut s = Source::new(Shape::Conversions, 3, 0);
        let (reports, done) = s.next();
        assert_eq!(done, 0);
        assert!(reports
            .iter()
            .all(|(subject, _)| *subject == proto::subject::CONVERSION_REPORTED));
        let (decisions, done) = s.next();
        assert_eq!(done, 3);
        assert_eq!(decisions.len(), 1, "the three in one batch");
        assert_eq!(
            reported_seqs(&decisions),
            [1, 2, 3],
            "each names its report"
        );
        assert_eq!(s.seq, 4);
    }

    #[test]
    fn with_a_lag_attributions_come_that_many_report_groups_later() {
        let mut s = Source::new(Shape::Conversions, 2, 2);
        let groups: Vec<(Encoded, u64)> = (0..6).map(|_| s.next()).collect();
        let completes: Vec<u64> = groups.iter().map(|(_, n)| *n).collect();
        assert_eq!(
            completes,
            [0, 0, 0, 2, 0, 2],
            "three groups of reports first"
        );
        assert_eq!(
            reported_seqs(&groups[3].0),
            [1, 2],
            "the oldest reports first"
        );
    }

    /// The reports the decisions of `group` name, in order.
    fn reported_seqs(group: &Encoded) -> Vec<u64> {
        group
            .iter()
            .flat_map(|(subject, b)| Decision::all_in(subject, b))
            .filter_map(|d| d.reported_seq())
            .collect()
    }

    /// Folds the source's next group: (what it completes, its events).
    fn step(source: &mut Source, tree: &common::FoldTree) -> (u64, usize) {
        let next = source.encoded();
        let entries = next.entries(source.now_ms);
        if let Some(sealed) = source.shape.stage(tree, None, &entries).unwrap() {
            sealed.commit(tree).unwrap();
        }
        (next.completes, entries.len())
    }

    #[test]
    fn the_folds_record_every_event_they_are_given() {
        use postback_service::{clicks::Clicks, conversions::Conversions};
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        let clicks = common::FoldTree::open(&db, "clicks").unwrap();
        let mut source = Source::new(Shape::Clicks, 20, 0);
        assert_eq!(step(&mut source, &clicks), (20, 20));
        let clicks = Clicks::new(clicks.rows().clone());
        assert_eq!(clicks.count('o', "offer-0").unwrap().clicks, 2);
        let unique: u64 = clicks
            .counts('a')
            .unwrap()
            .iter()
            .map(|(_, n)| n.unique)
            .sum();
        assert_eq!(unique, 20, "each click from its own visitor");

        let tree = common::FoldTree::open(&db, "conversions").unwrap();
        let mut source = Source::new(Shape::Conversions, 16, 0);
        for _ in 0..4 {
            step(&mut source, &tree);
        }
        let conversions = Conversions::new(tree.rows().clone());
        assert_eq!(conversions.pending_ids().count(), 0, "every report decided");
        let attributed: u64 = conversions
            .reports('o')
            .unwrap()
            .iter()
            .map(|(_, row)| row.attributed)
            .sum();
        assert_eq!(attributed, 32);
    }

    #[test]
    fn a_measurement_counts_whole_conversions() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan {
            shape: Shape::Conversions,
            run: ScratchRun {
                dir: dir.path().join("fold"),
                warmup: Duration::ZERO,
                duration: Duration::from_millis(200),
            },
            group: 16,
            lag: 0,
            cache_bytes: common::store::DEFAULT_CACHE_BYTES,
        };
        let m = measure(&plan, &[]).unwrap();
        assert!(m.count >= 16 && m.count.is_multiple_of(16), "{m:?}");
        assert!(m.throughput > 0.0);
        assert!(!plan.run.dir.exists(), "scratch removed");
    }
}
