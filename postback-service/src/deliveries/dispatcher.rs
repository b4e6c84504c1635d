//! The dispatcher: walks the queue of attributed conversions owed a postback,
//! keeps each delivery's retry schedule in sled, runs attempts with bounded
//! concurrency overall and per host, and records every outcome in the log.
//!
//! It starts only once the CONVERSIONS and POSTBACKS folds have reached the end
//! of the log, so it knows every recorded outcome before it sends anything: a
//! restart or a rebuilt projection never sends a delivery the log records as
//! delivered. Later outcomes are its own: a schedule is dropped only after its
//! outcome is acknowledged, and the queue cursor never walks back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream::Context;
use common::{lease::Tenure, FoldStatus};
use prost::Message;
use proto::postbacks::v1::{PostbackDelivered, PostbackFailed, PostbackRetryRequested};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    attempt::{self, AttemptResult},
    macros,
    outcome::{OutcomeState, Outcomes},
    policy::{seed, Class, RetryPolicy},
    ready::{Ready, MAX_WAITING_PER_HOST},
    schedule::{Schedule, ScheduleStore, Target, Unpublished},
    status_delivery_id,
};
use crate::{
    clicks::Clicks,
    conversions::{Conversions, QueueEntry},
};

/// How deliveries are made.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub policy: RetryPolicy,
    /// Per attempt, the response body included.
    pub timeout: Duration,
    /// Attempts in flight at once, overall.
    pub concurrency: usize,
    /// Attempts in flight at once to one host.
    pub per_host: usize,
    /// Allow targets on loopback, private and link-local addresses.
    pub allow_private: bool,
    pub follow_redirects: bool,
    /// How long an outcome publish waits for its ack before the outcome is
    /// stored in the schedule (flushed) while the wait goes on.
    pub ack_deadline: Duration,
    /// How long an outcome publish waits for its ack in all.
    pub publish_timeout: Duration,
}

/// Why a manual retry was refused.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("unknown delivery")]
    NotFound,
    #[error("the delivery is {0}, not failed")]
    NotFailed(&'static str),
    /// A later status of the same conversion was delivered to the affiliate:
    /// this one told now would arrive after it (an approval after its
    /// reversal), and an affiliate that applies them in arrival order would
    /// undo it.
    #[error(
        "a later status of this conversion ({0}) was delivered; this one would arrive after it"
    )]
    Superseded(&'static str),
    /// A later status of the same conversion is still being delivered (its
    /// attempt may be in flight, or its success held for a late ack): this
    /// one sent now could reach the affiliate after it.
    #[error(
        "a later status of this conversion ({0}) is still being delivered; this one could \
         arrive after it; ask again once that one is recorded"
    )]
    LaterPending(&'static str),
    #[error(transparent)]
    Publish(#[from] common::nats::PublishError),
    #[error("schedule storage")]
    Store(#[from] sled::Error),
    #[error("the service is stopping")]
    Stopping,
}

/// A handle on the dispatcher, shared by its task and the API.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    js: Context,
    conversions: Conversions,
    clicks: Clicks,
    outcomes: Outcomes,
    schedules: ScheduleStore,
    client: reqwest::Client,
    config: DispatchConfig,
    postbacks_status: watch::Receiver<FoldStatus>,
    /// Due deliveries by host, and the started ones. Its lock is held over
    /// each scan of the due index and each finish (see [`Ready`]).
    ready: Mutex<Ready>,
    /// This run of the dispatcher (random): whose attempt reservations are whose.
    run: u64,
    global: Arc<Semaphore>,
    host_limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    wake: Notify,
    /// A retry request's publish failed: it may be in the log without its
    /// schedule, which the next full scan recovers.
    recover: std::sync::atomic::AtomicBool,
}

/// Most due deliveries held in memory; more wait in the index.
const MAX_READY: usize = 100_000;
// Room for the backlogs of more hosts than can hang on the attempt slots at
// once (256 / 8 = 32 at the defaults), each with its started ones (twice its
// slots): while fewer hang, a due delivery of any other host is still read.
const _: () = assert!(48 * (MAX_WAITING_PER_HOST + 2 * 8) <= MAX_READY);
/// How often the whole due index is read again (see [`Ready::rescan`]).
const FULL_SCAN_EVERY: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The projections a dispatcher reads and the store it writes.
pub struct DispatchStores {
    pub conversions: Conversions,
    pub clicks: Clicks,
    pub outcomes: Outcomes,
    pub schedules: ScheduleStore,
    pub postbacks_status: watch::Receiver<FoldStatus>,
}

impl Dispatcher {
    /// A dispatcher over these stores.
    ///
    /// # Errors
    /// The HTTP client could not be built.
    pub fn new(
        js: Context,
        stores: DispatchStores,
        config: DispatchConfig,
    ) -> Result<Self, reqwest::Error> {
        let client = attempt::client(config.allow_private, config.follow_redirects)?;
        Ok(Self {
            inner: Arc::new(Inner {
                js,
                conversions: stores.conversions,
                clicks: stores.clicks,
                outcomes: stores.outcomes,
                schedules: stores.schedules,
                client,
                global: Arc::new(Semaphore::new(config.concurrency.max(1))),
                config,
                postbacks_status: stores.postbacks_status,
                ready: Mutex::new(Ready::default()),
                run: uuid::Uuid::now_v7().as_u64_pair().1 | 1,
                host_limits: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                recover: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The outcomes projection.
    pub fn outcomes(&self) -> &Outcomes {
        &self.inner.outcomes
    }

    /// The schedule store.
    pub fn schedules(&self) -> &ScheduleStore {
        &self.inner.schedules
    }

    /// Sends a failed delivery again: logs `PostbackRetryRequested`, then schedules
    /// a new generation of attempts.
    ///
    /// # Errors
    /// Unknown, not failed, or the log did not acknowledge.
    pub async fn request_retry(&self, id: &str) -> Result<u32, RetryError> {
        let inner = &self.inner;
        let Some(outcome) = inner.outcomes.get(id)? else {
            return Err(match inner.schedules.get(id)? {
                Some(_) => RetryError::NotFailed("pending"),
                None => RetryError::NotFound,
            });
        };
        match outcome.state {
            OutcomeState::Failed => {}
            OutcomeState::Delivered => return Err(RetryError::NotFailed("delivered")),
            OutcomeState::RetryRequested => return Err(RetryError::NotFailed("pending")),
        }
        // Failed in the log, but its schedule is still here: the attempt that
        // failed is still being recorded (its ack came late), and that will
        // remove or rewrite the schedule under this id, the new generation's
        // with it. Asked again a moment later, it is retried.
        if inner.schedules.get(id)?.is_some() {
            return Err(RetryError::NotFailed("pending"));
        }
        let told = super::status_of_delivery(id, &outcome.conversion_id, &outcome.affiliate_id);
        let later = told.map_or(&[][..], |told| super::before_and_after(told).1);
        for &status in later {
            let later_id =
                super::status_delivery_id(&outcome.conversion_id, &outcome.affiliate_id, status);
            let delivered = inner.outcomes.get(&later_id)?;
            if delivered.is_some_and(|o| o.state == OutcomeState::Delivered) {
                return Err(RetryError::Superseded(status.name()));
            }
            if inner.schedules.get(&later_id)?.is_some() {
                return Err(RetryError::LaterPending(status.name()));
            }
        }
        // The rest runs to its end even if the request is dropped (its client
        // gone, the request timeout): a retry once in the log must get its
        // schedule, or it shows `pending` and is never sent.
        let this = self.clone();
        let id = id.to_owned();
        match tokio::spawn(async move { this.schedule_retry(&id, outcome).await }).await {
            Ok(done) => done,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => Err(RetryError::Stopping),
        }
    }

    /// Logs the next generation of a failed delivery and schedules it.
    async fn schedule_retry(
        &self,
        id: &str,
        outcome: super::outcome::Outcome,
    ) -> Result<u32, RetryError> {
        let inner = &self.inner;
        let generation = outcome.generation + 1;
        let event = PostbackRetryRequested {
            event_id: uuid::Uuid::now_v7().to_string(),
            occurred_at_ms: common::time::now_ms(),
            delivery_id: id.to_owned(),
            generation,
        };
        let seq = common::nats::publish(
            &inner.js,
            proto::subject::POSTBACK_RETRY_REQUESTED.to_owned(),
            &format!("retry-{id}-{generation}"),
            event.encode_to_vec().into(),
            inner.config.publish_timeout,
        )
        .await
        .inspect_err(|_| {
            // Not acked in time is not "not stored".
            inner
                .recover
                .store(true, std::sync::atomic::Ordering::Relaxed);
        })?;
        let mut status = inner.postbacks_status.clone();
        common::fold::wait_applied(&mut status, seq, Duration::from_secs(5)).await;
        let schedule = Schedule::again(outcome, generation).reserved_for(inner.run);
        // The retry is in the log: a schedule that cannot be written now is
        // made again from it by the next rescan.
        inner.schedules.put(&schedule).await.inspect_err(|_| {
            inner
                .recover
                .store(true, std::sync::atomic::Ordering::Relaxed);
        })?;
        inner.wake.notify_one();
        Ok(generation)
    }

    /// Turns queued attributions into schedules, from the cursor on, up to
    /// `applied` (the conversions fold's applied sequence): a queue entry of a
    /// group still being committed may be visible before the view it names is
    /// updated, and the cursor must not pass it.
    async fn enqueue_new(&self, applied: u64) -> Result<(), sled::Error> {
        let inner = &self.inner;
        let log = inner.conversions.log()?;
        let log = log.as_deref();
        loop {
            let cursor = inner.schedules.cursor(log)?;
            let upto = crate::conversions::queue_end(applied);
            let batch = inner.conversions.delivery_queue(cursor, upto, 512)?;
            let Some(&(last, _)) = batch.last() else {
                return Ok(());
            };
            let mut new = Vec::new();
            for (_, entry) in batch {
                if let Some(s) = self.schedule_for(&entry)? {
                    new.push(s);
                }
            }
            inner.schedules.enqueue(&new, last, log).await?;
            if let Some(due) = new.iter().map(|s| s.next_at_ms).min() {
                lock(&inner.ready).rewind_to(due);
            }
        }
    }

    /// A new schedule for a queued postback, unless the log already records its
    /// outcome or a schedule exists.
    fn schedule_for(&self, entry: &QueueEntry) -> Result<Option<Schedule>, sled::Error> {
        let inner = &self.inner;
        let Some(view) = inner.conversions.get(&entry.conversion_id)? else {
            return Ok(None);
        };
        if view.postback_url.is_empty() {
            return Ok(None);
        }
        let id = status_delivery_id(&view.conversion_id, &view.affiliate_id, entry.status);
        let generation = match inner.outcomes.get(&id)? {
            Some(o) if o.state == OutcomeState::RetryRequested => o.generation,
            Some(_) => return Ok(None),
            None => 1,
        };
        if inner.schedules.get(&id)?.is_some() {
            return Ok(None);
        }
        let click = inner.clicks.get(&view.click_id)?;
        let target = Target {
            url: macros::fill(&view.postback_url, &view, click.as_ref(), &id, entry.status),
            status: entry.status.name().to_owned(),
            delivery_id: id,
            conversion_id: view.conversion_id,
            affiliate_id: view.affiliate_id,
            offer_id: view.offer_id,
            click_id: view.click_id,
        };
        Ok(Some(
            Schedule::fresh(target, generation).reserved_for(inner.run),
        ))
    }

    /// Schedules for retry-requested outcomes that lost theirs (a stop between
    /// the request and its schedule). A schedule goes once its outcome is
    /// acked, before the POSTBACKS fold applies it, so a retry found without
    /// one may have been delivered a moment ago: the fold must first reach
    /// the log's end as NATS tells it after the listing, and the outcome is
    /// read again then; made from the stale request, the schedule sent the
    /// delivery again after its success. NATS silent, it waits; a fold that
    /// applies nothing for a minute short of that end (the log's last events
    /// deleted before it applied them) is not waited for, rather than leave a
    /// retry unsent for good ([`common::fold::caught_up_with`]). Runs beside
    /// the rounds, which go on meanwhile.
    async fn recover_retries(&self) -> Result<(), sled::Error> {
        let inner = &self.inner;
        // Its retry requested, and no schedule for it, or one of an older
        // generation (see `run_attempt`).
        let lost = |id: &str| -> Result<Option<super::outcome::Outcome>, sled::Error> {
            let Some(outcome) = inner.outcomes.get(id)? else {
                return Ok(None);
            };
            let scheduled = inner.schedules.get(id)?;
            Ok((outcome.state == OutcomeState::RetryRequested
                && scheduled.is_none_or(|s| s.generation < outcome.generation))
            .then_some(outcome))
        };
        let mut candidates = Vec::new();
        for listed in inner.outcomes.newest_first() {
            let listed = listed?;
            if listed.state == OutcomeState::RetryRequested && lost(&listed.delivery_id)?.is_some()
            {
                candidates.push(listed.delivery_id);
            }
        }
        if candidates.is_empty() {
            return Ok(());
        }
        let status = inner.postbacks_status.clone();
        let (stream, patience) = (proto::stream::POSTBACKS, Duration::from_secs(60));
        common::fold::caught_up_with(&inner.js, stream, status, patience, "recovering retries")
            .await;
        for id in candidates {
            if let Some(outcome) = lost(&id)? {
                let generation = outcome.generation;
                let schedule = Schedule::again(outcome, generation).reserved_for(inner.run);
                inner.schedules.put(&schedule).await?;
            }
        }
        inner.wake.notify_one();
        Ok(())
    }

    /// Reads newly due schedules into the per-host queues, then starts what
    /// the hosts' limits allow (see [`Ready`]).
    fn start_due(
        &self,
        tracker: &TaskTracker,
        token: &CancellationToken,
        tenure: &Tenure,
    ) -> Result<(), sled::Error> {
        let inner = &self.inner;
        let now = common::time::now_ms();
        let host_most = inner.config.per_host.max(1).saturating_mul(2);
        let startable = {
            let mut ready = lock(&inner.ready);
            let room = MAX_READY.saturating_sub(ready.len());
            if room > 0 {
                let mut read = 0;
                let mut last = now;
                for due in inner
                    .schedules
                    .due_between(ready.scan_from(), now)
                    .take(room)
                {
                    let due = due?;
                    ready.offer(&due.delivery_id, &due.host, due.at_ms);
                    (read, last) = (read + 1, due.at_ms);
                }
                ready.scanned(if read == room { last } else { now });
            }
            ready.take_startable(host_most)
        };
        let mut startable = startable.into_iter();
        while let Some((id, host)) = startable.next() {
            // The index may be stale: re-read the schedule now that we hold it.
            let schedule = match inner.schedules.get(&id) {
                Ok(Some(s)) if s.next_at_ms <= now => s,
                Ok(later) => {
                    self.finish(&id, &host, later.map(|s| s.next_at_ms));
                    continue;
                }
                Err(error) => {
                    // Hand back every one taken, or the rest would count as
                    // started (their host's slots too) until a restart.
                    for (id, host) in std::iter::once((id, host)).chain(startable) {
                        self.finish(&id, &host, Some(i64::MIN));
                    }
                    return Err(error);
                }
            };
            let this = self.clone();
            let (token, tenure) = (token.clone(), tenure.clone());
            tracker.spawn(async move {
                let attempt = this.run_attempt(schedule, &host, &token, &tenure);
                let still_due_at = match attempt.await {
                    Ok(left) => left,
                    Err(error) => {
                        tracing::error!(%error, delivery_id = %id, "delivery bookkeeping failed; will retry");
                        Some(i64::MIN)
                    }
                };
                this.finish(&id, &host, still_due_at);
                this.inner.wake.notify_one();
            });
        }
        Ok(())
    }

    fn finish(&self, id: &str, host: &str, still_due_at: Option<i64>) {
        lock(&self.inner.ready).finish(id, host, still_due_at);
    }

    /// The concurrency limit of one host.
    fn host_limit(&self, host: &str) -> Arc<Semaphore> {
        let mut limits = lock(&self.inner.host_limits);
        Arc::clone(
            limits
                .entry(host.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.inner.config.per_host.max(1)))),
        )
    }

    /// Runs one attempt (or finishes a schedule that needs none); returns when
    /// the stored schedule is due next (`None`: it is finished and removed).
    async fn run_attempt(
        &self,
        mut s: Schedule,
        host: &str,
        token: &CancellationToken,
        tenure: &Tenure,
    ) -> Result<Option<i64>, sled::Error> {
        let inner = &self.inner;
        if let Some(record) = s.unpublished.clone() {
            return self.record(s, record).await;
        }
        if self.recorded(&s)? {
            // A schedule whose removal did not reach the disk before a crash:
            // the log already has its outcome, so it is finished, not sent.
            return inner.schedules.remove(&s.delivery_id).map(|()| None);
        }
        // A schedule of an older generation than a retry the log has
        // requested since (left by an earlier term of this instance): never
        // sent as it is; the retry runs as its own generation.
        let newer = inner.outcomes.get(&s.delivery_id)?;
        if let Some(o) = newer.filter(|o| o.generation > s.generation) {
            let generation = o.generation;
            let again = Schedule::again(o, generation).reserved_for(inner.run);
            inner.schedules.put(&again).await?;
            return Ok(Some(again.next_at_ms));
        }
        // The affiliate hears a conversion's statuses in the order they
        // happened: a reversal waits while the approval is still being tried.
        if let Some(earlier) = self.earlier_status_due(&s)? {
            s.next_at_ms = earlier.max(common::time::now_ms()) + STATUS_ORDER_WAIT_MS;
            inner.schedules.put(&s).await?;
            return Ok(Some(s.next_at_ms));
        }
        // Wait for a slot, unless stopping: the schedule then stays as it is.
        let host = self.host_limit(host);
        let permits = async {
            let host = host.acquire_owned().await.ok()?;
            let global = inner.global.clone().acquire_owned().await.ok()?;
            Some((host, global))
        };
        let _permits = tokio::select! {
            () = token.cancelled() => return Ok(Some(s.next_at_ms)),
            p = permits => match p { Some(p) => p, None => return Ok(Some(s.next_at_ms)) },
        };
        let started = common::time::now_ms();
        if s.first_attempt_ms == 0 {
            s.first_attempt_ms = started;
        }
        // The attempt's number is durable before the request goes out, so after
        // a crash mid-attempt the next one goes out under a new number, never the
        // same twice. Usually it was set aside when the delivery was queued or
        // its retry scheduled, in a write that was flushed anyway.
        if !s.take_attempt(inner.run) {
            inner.schedules.put(&s).await?;
        }
        let tag = attempt::AttemptTag {
            delivery_id: &s.delivery_id,
            generation: s.generation,
            attempt: s.attempts,
        };
        // Last thing before the request: a process frozen past its lease
        // wakes with this attempt overdue while another instance may lead and
        // send it. The schedule stays for whoever leads.
        if !tenure.held() {
            tracing::warn!(delivery_id = %s.delivery_id, "the lease's tenure ended: not sent");
            return Ok(Some(s.next_at_ms));
        }
        let result = attempt::send(
            &inner.client,
            &s.url,
            tag,
            inner.config.timeout,
            inner.config.allow_private,
        )
        .await;
        let now = common::time::now_ms();
        s.last_status = u32::from(result.status.unwrap_or(0));
        s.last_error.clone_from(&result.error);
        s.last_body = String::from_utf8_lossy(&result.body).into_owned();
        match result.class {
            Class::Delivered => {
                tracing::debug!(delivery_id = %s.delivery_id, attempts = s.attempts, "postback delivered");
                let record = delivered_event(&s, &result, now);
                self.record(s, record).await
            }
            Class::Retry => {
                match inner.config.policy.next_attempt_ms(
                    s.attempts,
                    s.first_attempt_ms,
                    now,
                    seed(&s.delivery_id),
                ) {
                    Some(next) => {
                        tracing::info!(delivery_id = %s.delivery_id, attempts = s.attempts, error = %result.error,
                            retry_in_ms = next - now, "postback attempt failed; retrying");
                        s.next_at_ms = next;
                        s.reserve_next(inner.run);
                        inner.schedules.put(&s).await.map(|()| Some(next))
                    }
                    None => {
                        let record = failed_event(&s, &result, now, "retries exhausted: ");
                        self.record(s, record).await
                    }
                }
            }
            Class::Permanent => {
                tracing::warn!(delivery_id = %s.delivery_id, error = %result.error, "postback refused; giving up");
                let record = failed_event(&s, &result, now, "");
                self.record(s, record).await
            }
        }
    }

    /// When a delivery of an earlier status of the same conversion to the same
    /// affiliate (pending before approved before rejected), still scheduled,
    /// is due next: `None` when there is none.
    fn earlier_status_due(&self, s: &Schedule) -> Result<Option<i64>, sled::Error> {
        let told = catalog::ConversionStatus::parse(&s.status);
        let earlier = told.map_or(&[][..], |told| super::before_and_after(told).0);
        let mut due = None;
        for &status in earlier {
            let id = super::status_delivery_id(&s.conversion_id, &s.affiliate_id, status);
            if id == s.delivery_id {
                continue;
            }
            if let Some(e) = self.inner.schedules.get(&id)? {
                due = Some(due.map_or(e.next_at_ms, |d: i64| d.max(e.next_at_ms)));
            }
        }
        Ok(due)
    }

    /// Drops the schedules whose outcome the log already records: left by an
    /// earlier term of this instance (leadership moved away and back, say a
    /// deploy and its rollback) for deliveries another leader finished. Kept,
    /// such a schedule would hold a later status of its conversion back
    /// ([`Self::earlier_status_due`]) and answer a hand retry 409 `pending`
    /// until it came due, up to the longest backoff.
    /// One holding an outcome not yet published stays: published, a success
    /// it holds wins over the log's failure of the same generation (another
    /// leader's attempt, refused as a duplicate by the affiliate who had it).
    fn drop_recorded(&self) -> Result<(), sled::Error> {
        for s in self.inner.schedules.all()? {
            if s.unpublished.is_none() && self.recorded(&s)? {
                self.inner.schedules.remove(&s.delivery_id)?;
            }
        }
        Ok(())
    }

    /// Whether the log records an outcome of this schedule's generation. (The
    /// dispatcher starts only once the POSTBACKS fold has reached the end of the
    /// log, so every outcome published before a restart is known.)
    fn recorded(&self, s: &Schedule) -> Result<bool, sled::Error> {
        Ok(self.inner.outcomes.get(&s.delivery_id)?.is_some_and(|o| {
            o.generation >= s.generation && o.state != OutcomeState::RetryRequested
        }))
    }

    /// Publishes the outcome and drops the schedule once the log has it. When
    /// no ack comes within the ack deadline (the same one clicks and postbacks
    /// have), the outcome is first stored in the schedule (flushed), so from
    /// then on a stop can only lead to publishing it again, never to another
    /// request; then the ack is awaited up to the publish timeout, and if it
    /// still does not come only the publish is tried again later. A schedule
    /// that already holds its outcome goes straight to publishing.
    async fn record(
        &self,
        mut s: Schedule,
        record: Unpublished,
    ) -> Result<Option<i64>, sled::Error> {
        let inner = &self.inner;
        let stored = s.unpublished.is_some();
        let publish = common::nats::send(
            &inner.js,
            record.subject.clone(),
            &record.msg_id,
            record.payload.clone().into(),
        );
        let published = async {
            let ack = std::future::IntoFuture::into_future(publish.await?);
            tokio::pin!(ack);
            let early = if stored {
                None
            } else {
                match tokio::time::timeout(inner.config.ack_deadline, &mut ack).await {
                    Ok(acked) => Some(acked),
                    Err(_) => {
                        s.unpublished = Some(record.clone());
                        inner.schedules.put(&s).await.map_err(Recording::Store)?;
                        None
                    }
                }
            };
            let acked = match early {
                Some(acked) => acked,
                None => {
                    let timeout = inner.config.publish_timeout;
                    tokio::time::timeout(timeout, ack).await.map_err(|_| {
                        common::nats::PublishError::Timeout {
                            subject: record.subject.clone(),
                            timeout,
                        }
                    })?
                }
            };
            acked.map_err(|source| {
                Recording::Publish(common::nats::PublishError::Send {
                    subject: record.subject.clone(),
                    source,
                })
            })
        }
        .await;
        match published {
            Ok(_) => inner.schedules.remove(&s.delivery_id).map(|()| None),
            Err(Recording::Store(error)) => Err(error),
            Err(Recording::Publish(error)) => self.publish_later(s, record, &error).await,
        }
    }

    /// Publishes, once each, the outcomes kept in schedules because their ack
    /// came late, at the end of a term (a stop, the lease lost): the next
    /// leader may be another instance, which folds POSTBACKS before it sends
    /// anything but cannot see this instance's schedules, and would send such
    /// a delivery again. What still does not land stays stored, for this
    /// instance's next term.
    async fn publish_stored(&self) {
        let stored = match self.inner.schedules.all() {
            Ok(all) => all,
            Err(error) => {
                tracing::error!(%error, "schedules unreadable: outcomes not yet in the log stay unpublished");
                return;
            }
        };
        let publishes = stored.into_iter().filter_map(|s| {
            let record = s.unpublished.clone()?;
            Some(self.record(s, record))
        });
        let results = futures::future::join_all(publishes).await;
        let (count, left) = (
            results.len(),
            results.iter().filter(|r| !matches!(r, Ok(None))).count(),
        );
        if count > 0 {
            tracing::info!(
                count,
                left,
                "term ended: outcomes not yet in the log published"
            );
        }
    }

    /// Keeps the outcome in the schedule and tries its publish again in a second.
    async fn publish_later(
        &self,
        mut s: Schedule,
        record: Unpublished,
        error: &common::nats::PublishError,
    ) -> Result<Option<i64>, sled::Error> {
        tracing::warn!(%error, delivery_id = %s.delivery_id, "outcome not yet in the log; will publish again");
        s.unpublished = Some(record);
        s.next_at_ms = common::time::now_ms() + 1000;
        self.inner
            .schedules
            .put(&s)
            .await
            .map(|()| Some(s.next_at_ms))
    }
}

/// Why recording an outcome stopped short.
#[derive(Debug, thiserror::Error)]
enum Recording {
    #[error(transparent)]
    Publish(#[from] common::nats::PublishError),
    #[error("schedule storage")]
    Store(sled::Error),
}

fn delivered_event(s: &Schedule, r: &AttemptResult, now: i64) -> Unpublished {
    let e = PostbackDelivered {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at_ms: now,
        delivery_id: s.delivery_id.clone(),
        conversion_id: s.conversion_id.clone(),
        url: s.url.clone(),
        attempts: s.attempts,
        status_code: u32::from(r.status.unwrap_or(0)),
        latency_ms: r.latency_ms,
        affiliate_id: s.affiliate_id.clone(),
        offer_id: s.offer_id.clone(),
        click_id: s.click_id.clone(),
        generation: s.generation,
        error: r.error.clone(),
    };
    Unpublished {
        subject: proto::subject::POSTBACK_DELIVERED.to_owned(),
        // Not the failure's: a late failure of this generation (a leader that
        // lost its lease publishing what it had) must not keep a success out
        // of the log as its duplicate.
        msg_id: format!("postback-delivered-{}-{}", s.delivery_id, s.generation),
        payload: e.encode_to_vec(),
    }
}

fn failed_event(s: &Schedule, r: &AttemptResult, now: i64, prefix: &str) -> Unpublished {
    let e = PostbackFailed {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at_ms: now,
        delivery_id: s.delivery_id.clone(),
        conversion_id: s.conversion_id.clone(),
        url: s.url.clone(),
        attempts: s.attempts,
        status_code: u32::from(r.status.unwrap_or(0)),
        error: format!("{prefix}{}", r.error),
        body: r.body.clone(),
        affiliate_id: s.affiliate_id.clone(),
        offer_id: s.offer_id.clone(),
        click_id: s.click_id.clone(),
        generation: s.generation,
    };
    Unpublished {
        subject: proto::subject::POSTBACK_FAILED.to_owned(),
        msg_id: format!("postback-failed-{}-{}", s.delivery_id, s.generation),
        payload: e.encode_to_vec(),
    }
}

/// How long after an earlier status's next attempt a later status of the same
/// conversion is looked at again.
const STATUS_ORDER_WAIT_MS: i64 = 1000;

/// Runs the dispatcher until `token` is cancelled, then lets attempts in flight
/// finish (each is bounded by the attempt and publish timeouts) and publishes
/// the outcomes still held. A panic of its rounds ends the term the same way
/// before it is raised again: the attempts they started run on, and whoever
/// leads next would send again what they delivered unless it is in the log.
pub async fn run_dispatcher(
    dispatcher: Dispatcher,
    conversions_status: watch::Receiver<FoldStatus>,
    tenure: Tenure,
    token: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let rounds = rounds(&dispatcher, &tracker, conversions_status, &tenure, &token);
    let end = async {
        tracker.close();
        tracker.wait().await;
        dispatcher.publish_stored().await;
        let run = dispatcher.inner.run;
        if let Err(error) = dispatcher.inner.schedules.release_reservations(run).await {
            tracing::warn!(%error, "attempt reservations not released; the next run skips those numbers");
        }
    };
    then_always(rounds, end).await;
}

/// Runs `work`, then `end` whether `work` returned or panicked; a panic is
/// raised again once `end` is over.
async fn then_always(
    work: impl std::future::Future<Output = ()>,
    end: impl std::future::Future<Output = ()>,
) {
    use futures::FutureExt;
    let ended = std::panic::AssertUnwindSafe(work).catch_unwind().await;
    end.await;
    if let Err(panic) = ended {
        std::panic::resume_unwind(panic);
    }
}

/// The dispatcher's rounds, until `token` is cancelled.
async fn rounds(
    dispatcher: &Dispatcher,
    tracker: &TaskTracker,
    mut conversions_status: watch::Receiver<FoldStatus>,
    tenure: &Tenure,
    token: &CancellationToken,
) {
    let config = &dispatcher.inner.config;
    let tick = (config.policy.first_retry / 4)
        .clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut postbacks_status = dispatcher.inner.postbacks_status.clone();
    let mut recovered = false;
    // Retries to find without their schedules: at the term's start, and after
    // a retry request whose ack did not come in time; looked for beside the
    // rounds, one look at a time.
    let mut recovering = false;
    let mut recovery: Option<tokio::task::JoinHandle<Result<(), sled::Error>>> = None;
    let mut rescan_at = tokio::time::Instant::now() + FULL_SCAN_EVERY;
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            () = dispatcher.inner.wake.notified() => {}
            () = common::fold::changed(&mut conversions_status) => {}
            () = common::fold::changed(&mut postbacks_status) => {}
            () = tokio::time::sleep(tick) => {}
        }
        let folded = conversions_status.borrow().caught_up && postbacks_status.borrow().caught_up;
        // Not while frozen past the lease: its attempts would only be put back.
        if !(folded && tenure.held()) {
            continue;
        }
        let result = async {
            if !recovered {
                dispatcher.drop_recorded()?;
                dispatcher.inner.schedules.reindex()?;
                (recovered, recovering) = (true, true);
            }
            let applied = conversions_status.borrow().applied_seq;
            dispatcher.enqueue_new(applied).await?;
            if tokio::time::Instant::now() >= rescan_at {
                rescan_at += FULL_SCAN_EVERY;
                lock(&dispatcher.inner.ready).rescan();
                // A retry request whose ack did not come in time may be in
                // the log without its schedule: found here within a minute.
                let recover = &dispatcher.inner.recover;
                recovering |= recover.swap(false, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(done) = recovery.take_if(|r| r.is_finished()) {
                match done.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "looking for retries without their schedule; again");
                        recovering = true;
                    }
                    Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                    Err(_) => {}
                }
            }
            if recovering && recovery.is_none() {
                recovering = false;
                let (dispatcher, token) = (dispatcher.clone(), token.clone());
                recovery = Some(tracker.spawn(async move {
                    tokio::select! {
                        () = token.cancelled() => Ok(()),
                        done = dispatcher.recover_retries() => done,
                    }
                }));
            }
            dispatcher.start_due(tracker, token, tenure)
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, "dispatcher round failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::ConversionStatus::{Approved, Rejected};

    #[tokio::test]
    async fn the_end_of_a_term_runs_after_rounds_that_panicked_and_the_panic_is_raised_then() {
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let end = {
            let ended = ended.clone();
            async move {
                // Attempts in flight finishing, outcomes held published.
                tokio::time::sleep(Duration::from_millis(50)).await;
                ended.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        };
        let rounds = async { panic!("a bug in a round") };
        let term = tokio::spawn(then_always(rounds, end)).await;
        assert!(term.is_err_and(|e| e.is_panic()), "raised again");
        assert!(ended.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// A dispatcher over a database of its own, whose NATS is never reached
    /// (the retries below are refused before anything is published), and the
    /// outcomes Tree, to plant outcomes in.
    async fn dispatcher() -> (Dispatcher, sled::Tree) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = |name: &str| db.open_tree(name).unwrap();
        let config = crate::Config::for_tests("127.0.0.1:1", std::env::temp_dir());
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .unwrap();
        let stores = DispatchStores {
            conversions: Conversions::new(tree("conversions")),
            clicks: Clicks::new(tree("clicks")),
            outcomes: Outcomes::new(tree("postbacks")),
            schedules: ScheduleStore::new(
                tree("dispatch"),
                common::store::GroupFlush::new((*db).clone()),
            ),
            postbacks_status: common::fold::status_channel("POSTBACKS").1,
        };
        let js = async_nats::jetstream::new(client);
        let dispatcher = Dispatcher::new(js, stores, config.dispatch()).unwrap();
        (dispatcher, tree("postbacks"))
    }

    /// An outcome of the delivery of `status` of conversion `conv` to `aff`.
    fn outcome(status: catalog::ConversionStatus, state: OutcomeState) -> super::super::Outcome {
        let id = super::super::status_delivery_id("conv", "aff", status);
        super::super::Outcome {
            state,
            ..super::super::Outcome::failed_for_test(id, "conv", "aff")
        }
    }

    fn plant(outcomes: &sled::Tree, o: &super::super::Outcome) {
        let key = super::super::outcome::outcome_key(&o.delivery_id);
        outcomes.insert(key, common::store::pack(o)).unwrap();
    }

    #[tokio::test]
    async fn a_hand_retry_waits_while_the_failure_is_still_being_recorded() {
        let (dispatcher, outcomes) = dispatcher().await;
        let failed = outcome(Approved, OutcomeState::Failed);
        plant(&outcomes, &failed);
        // Its attempt's task has not yet removed the schedule (a late ack).
        let id = failed.delivery_id.clone();
        let schedule = Schedule::again(failed, 1);
        dispatcher.schedules().put(&schedule).await.unwrap();
        assert!(matches!(
            dispatcher.request_retry(&id).await,
            Err(RetryError::NotFailed("pending"))
        ));
    }

    #[tokio::test]
    async fn an_approval_is_not_told_again_after_its_reversal_was() {
        let (dispatcher, outcomes) = dispatcher().await;
        let approval = outcome(Approved, OutcomeState::Failed);
        plant(&outcomes, &approval);
        plant(&outcomes, &outcome(Rejected, OutcomeState::Delivered));
        assert!(matches!(
            dispatcher.request_retry(&approval.delivery_id).await,
            Err(RetryError::Superseded("rejected"))
        ));
    }

    #[tokio::test]
    async fn an_approval_is_not_told_again_while_its_reversal_is_being_told() {
        let (dispatcher, outcomes) = dispatcher().await;
        let approval = outcome(Approved, OutcomeState::Failed);
        plant(&outcomes, &approval);
        // The reversal's attempt is in flight, or its success waits for its
        // ack: nothing in the log says it was delivered yet.
        let reversal = outcome(Rejected, OutcomeState::Failed);
        let schedule = Schedule::again(reversal, 1);
        dispatcher.schedules().put(&schedule).await.unwrap();
        assert!(matches!(
            dispatcher.request_retry(&approval.delivery_id).await,
            Err(RetryError::LaterPending("rejected"))
        ));
    }
}
