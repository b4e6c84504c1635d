//! The checkpointed fold loop: reads one stream in order and folds it into one sled
//! Tree, storing the stream sequence in the same commit as the rows
//! ([`Staged::commit`]).
//!
//! The loop reads through an *ordered* pull consumer started at `checkpoint + 1`.
//! The checkpoint in sled, not the server, is the truth of how far the projection
//! got, so a wiped data dir replays from the start and a restart resumes where the
//! last flushed commit ended. The ordered consumer detects gaps (a lost delivery, a
//! server restart, missed heartbeats) and recreates itself from the last sequence
//! seen, so the fold never skips a message and never needs an ack. Replays of
//! already-applied sequences are skipped, so folding is idempotent.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use async_nats::jetstream::{consumer, Context};
use futures::StreamExt;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    store::{self, FoldTree, Sealed, Staged},
    worker::{Worker, WorkerError},
};

/// Most messages folded into one commit.
const MAX_GROUP: usize = 1024;
/// A [`FoldSpec::linger`] for high-volume streams off the critical path.
pub const CLICKS_LINGER: Duration = Duration::from_millis(2);

/// One message of the log, as a fold sees it.
#[derive(Debug, Clone, Copy)]
pub struct LogEntry<'a> {
    pub subject: &'a str,
    pub payload: &'a [u8],
    /// Stream sequence.
    pub seq: u64,
    /// When JetStream stored the message (Unix ms): the fallback event time for
    /// partner events that carry none.
    pub log_time_ms: i64,
}

/// Folds log entries into the rows of one Tree.
pub trait Fold: Send + 'static {
    /// Applies one entry. It must not fail on bad input: a message that does not
    /// decode is recorded as such (or skipped with a log line), never an error.
    ///
    /// # Errors
    /// Only storage failures, after which the whole group is retried.
    fn apply(&mut self, staged: &mut Staged<'_>, entry: &LogEntry<'_>) -> Result<(), sled::Error>;

    /// Version of the rows this fold writes. A Tree written in another format
    /// (by an older version of the service) is cleared and folded again from the
    /// log when the fold starts: the projection is disposable, and reading rows
    /// of a format the code no longer writes could miss facts (a dedup row of
    /// the old shape, say). Raise it whenever the rows change shape.
    fn format(&self) -> u32 {
        store::FIRST_FORMAT
    }
}

/// Where a fold is, for readiness checks and for waiting on one's own writes.
#[derive(Debug, Clone, Serialize)]
pub struct FoldStatus {
    pub stream: &'static str,
    /// Last stream sequence applied (written with its checkpoint; flushed in the background).
    pub applied_seq: u64,
    /// The fold has reached the end of the log at least once since start.
    pub caught_up: bool,
    /// The last delivered message left nothing pending: the fold is at the tail now.
    pub at_tail: bool,
    /// When JetStream stored the last applied message (Unix ms; 0: none yet):
    /// everything stored before it has been applied too.
    pub applied_log_time_ms: i64,
    /// The fold waits for its [`FoldSpec::gate`] and reads nothing from the
    /// log: nobody needs its rows yet (click-service's caps fold before the
    /// first capped offer).
    pub paused: bool,
}

/// Which stream a fold reads and how its consumer is named.
#[derive(Debug, Clone)]
pub struct FoldSpec {
    pub stream: &'static str,
    /// Consumer name, `<service>-<stream-lower>`, visible in `nats consumer ls`.
    pub consumer: String,
    /// Empty: the whole stream.
    pub filter_subject: String,
    /// How long to wait for more messages after the first of a group. A high
    /// volume stream read off the critical path (clicks) gains: one group of
    /// many events costs far less than many groups of one (each is a commit, a
    /// checkpoint, a status wake-up). Zero where latency matters (conversions).
    pub linger: Duration,
    /// No request waits on this fold in the common case: once caught up it
    /// yields the cores to the request handlers ([`crate::worker`];
    /// [`Source::nice`]). False for a fold that requests wait on (click-service's
    /// click caps: a click on a capped offer waits for its own event).
    pub background: bool,
    /// Stage each group over the one before while that one is committed, on
    /// a second thread (`commit-<stream>`; see [`Workers`]): for a fold that
    /// a busy pipeline waits on (conversions: the decisions). A fold off that
    /// path (clicks, with their linger; the catalog) stages and commits on
    /// its one thread: measured, a second thread for the clicks fold did not
    /// pay for the cores it took from the click handlers (p99 at 20k clicks/s
    /// 16.3 to 39.7 ms against 14.1 to 23.0).
    pub pipelined: bool,
    /// `None`: the fold starts at once. Otherwise it starts once this turns
    /// true, and until then reports itself caught up at its checkpoint and
    /// [`FoldStatus::paused`], and NATS delivers it nothing: click-service
    /// folds CLICKS for its click caps only once the catalog has a capped
    /// offer, then from its checkpoint, so every click of the day counts.
    pub gate: Option<watch::Receiver<bool>>,
}

/// A fold that stopped on its own.
#[derive(Debug, Error)]
pub enum FoldError {
    #[error("projection storage")]
    Store(#[from] sled::Error),
    #[error("reading stream info")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
    #[error("reading stream info")]
    Info(#[from] async_nats::jetstream::stream::InfoError),
    #[error("creating consumer")]
    Consumer(#[from] async_nats::jetstream::stream::ConsumerError),
    #[error("consuming")]
    Messages(#[from] async_nats::jetstream::consumer::StreamError),
    #[error("the message stream ended")]
    Ended,
    #[error("reconnected to NATS")]
    Reconnected,
    #[error("the stream was created again")]
    LogReplaced,
    #[error("the consumer delivered only events already applied")]
    Replaying,
    #[error("reading an event back")]
    ReadBack(#[from] async_nats::jetstream::stream::RawMessageError),
}

/// Whether every message of a delivered chunk is one the fold has applied
/// (at or before `applied`): a consumer replaying the log, not one message
/// delivered twice among new ones. A consumer delivers in log order, so the
/// last one tells.
fn replays_only(delivered: &[async_nats::jetstream::Message], applied: u64) -> bool {
    delivered
        .last()
        .is_some_and(|m| m.info().is_ok_and(|i| i.stream_sequence <= applied))
}

/// How often a running fold asks whether its stream is still the one it
/// folds: a stream deleted and created again while the connection stays up
/// does not end the consumer (async-nats's ordered consumer quietly starts
/// again where it was, past the new stream's first events).
const LOG_CHECK: Duration = Duration::from_secs(5);

/// A channel pair for a fold's status.
pub fn status_channel(
    stream: &'static str,
) -> (watch::Sender<FoldStatus>, watch::Receiver<FoldStatus>) {
    watch::channel(FoldStatus {
        stream,
        applied_seq: 0,
        caught_up: false,
        at_tail: false,
        applied_log_time_ms: 0,
        paused: false,
    })
}

/// Where a fold reads from.
#[derive(Clone)]
pub struct Source {
    pub js: Context,
    /// The connection counter of [`crate::nats::Connection`].
    pub connections: watch::Receiver<u64>,
    /// The database's shared flusher: folds that commit at the same time share
    /// one flush.
    pub durable: store::GroupFlush,
    /// Added to the nice value of a background fold's thread once it has
    /// caught up ([`FoldSpec::background`], [`crate::worker`]).
    pub nice: i32,
}

/// Runs the fold until `token` is cancelled, restarting its consumer with backoff
/// after any failure and at once after a reconnection. Never returns an error: a
/// fold must not die.
pub async fn run<F: Fold>(
    mut source: Source,
    tree: FoldTree,
    spec: FoldSpec,
    fold: F,
    status: watch::Sender<FoldStatus>,
    token: CancellationToken,
) {
    let fold = Arc::new(Mutex::new(fold));
    let status = Arc::new(status);
    let stream = spec.stream.to_lowercase();
    let nice = if spec.background { source.nice } else { 0 };
    // Linux keeps 15 bytes of a thread's name: `fold-conversion`, `commit-conversi`.
    let Some(fold_thread) = spawn_worker(&format!("fold-{stream}"), nice, &token).await else {
        return;
    };
    let commit_thread = match spec.pipelined {
        true => match spawn_worker(&format!("commit-{stream}"), nice, &token).await {
            Some(worker) => Some(worker),
            None => return,
        },
        false => None,
    };
    let workers = Workers {
        fold: fold_thread,
        commit: commit_thread,
    };
    if let Some(gate) = spec.gate.clone() {
        if !wait_for_gate(gate, &tree, &status, &token).await {
            return;
        }
    }
    let mut backoff = Duration::from_millis(50);
    while !token.is_cancelled() {
        source.connections.mark_unchanged();
        match run_consumer(&mut source, &tree, &spec, &fold, &workers, &status, &token).await {
            Ok(()) => break,
            Err(FoldError::Reconnected) => {
                tracing::info!(
                    stream = spec.stream,
                    "reconnected to NATS; resuming from the checkpoint"
                );
                backoff = Duration::from_millis(50);
            }
            // Logged where it was found; the next consumer starts over, or
            // from the checkpoint.
            Err(FoldError::LogReplaced | FoldError::Replaying) => {
                backoff = Duration::from_millis(50);
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), stream = spec.stream, ?backoff,
                    "fold interrupted; resuming from its checkpoint");
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    if let Err(error) = source.durable.flush().await {
        tracing::error!(%error, stream = spec.stream, "final projection flush failed");
    }
}

/// Starts a fold's thread, retrying every second while the OS refuses;
/// `None` if the service stops first.
async fn spawn_worker(name: &str, nice: i32, token: &CancellationToken) -> Option<Worker> {
    loop {
        match Worker::spawn(name, nice) {
            Ok(worker) => return Some(worker),
            Err(error) => {
                tracing::error!(%error, name, "fold thread cannot start; retrying");
                tokio::select! {
                    () = token.cancelled() => return None,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Waits for a fold's gate to open ([`FoldSpec::gate`]): true once open, false
/// when the service stops first.
async fn wait_for_gate(
    mut gate: watch::Receiver<bool>,
    tree: &FoldTree,
    status: &watch::Sender<FoldStatus>,
    token: &CancellationToken,
) -> bool {
    if *gate.borrow_and_update() {
        return true;
    }
    let applied = store::checkpoint(tree).unwrap_or(0);
    status.send_modify(|s| {
        s.applied_seq = applied;
        (s.caught_up, s.at_tail, s.paused) = (true, true, true);
    });
    let opened = tokio::select! {
        () = token.cancelled() => false,
        open = gate.wait_for(|open| *open) => open.is_ok(),
    };
    if !opened {
        // A gate whose sender is gone never opens: stay paused until the stop.
        token.cancelled().await;
        return false;
    }
    status.send_modify(|s| s.paused = false);
    tracing::info!(
        stream = status.borrow().stream,
        "fold gate opened; folding from the checkpoint"
    );
    true
}

/// An error and its sources, joined with `: `, for one log line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Resolves when the status changes; never, once its fold has gone (so a
/// `select!` over it does not spin).
pub async fn changed(rx: &mut watch::Receiver<FoldStatus>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run_consumer<F: Fold>(
    source: &mut Source,
    tree: &FoldTree,
    spec: &FoldSpec,
    fold: &Arc<Mutex<F>>,
    workers: &Workers,
    status: &Arc<watch::Sender<FoldStatus>>,
    token: &CancellationToken,
) -> Result<(), FoldError> {
    store::recover(tree)?;
    let format = fold.lock().unwrap_or_else(PoisonError::into_inner).format();
    if store::format(tree)? != format {
        tracing::warn!(
            stream = spec.stream,
            format,
            "projection rows are of another format; folding the log again"
        );
        start_over(tree, format, source, status).await?;
    }
    let mut applied = store::checkpoint(tree)?;
    let mut stream = source.js.get_stream(spec.stream).await?;
    let info = stream.info().await?;
    let last = info.state.last_sequence;
    let log = store::log_identity(info.created.unix_timestamp_nanos());
    // The stream is not the log this projection was folded from: it holds
    // another event at the checkpoint (a stream created again, or restored
    // from a backup and written to since), or it ends before the checkpoint,
    // or its creation time changed and that event cannot be read to tell
    // (nats-server 2.9 gives an edited stream another creation time once it
    // restarts: then the event applied last is still there, and it is kept).
    let created_again = store::log_of(tree)?.is_some_and(|known| known != log[..]);
    let at = at_checkpoint(&stream, tree, applied).await?;
    if another_log(applied, last, &at, created_again) {
        tracing::warn!(
            stream = spec.stream,
            checkpoint = applied,
            last,
            "the stream was created again since this projection was folded; \
             folding the new log from its start"
        );
        start_over(tree, format, source, status).await?;
        applied = 0;
    } else if created_again {
        tracing::warn!(
            stream = spec.stream,
            checkpoint = applied,
            "the stream's creation time changed, but it still holds the last event \
             this projection applied (a stream edited, then NATS restarted): kept"
        );
        tree.insert(store::LOG_KEY, log.as_slice())?;
        source.durable.flush().await?;
    }
    if store::log_of(tree)?.is_none() {
        tree.insert(store::LOG_KEY, log.as_slice())?;
        source.durable.flush().await?;
    }
    let deliver_policy = if applied == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: applied + 1,
        }
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            // Unique per attempt: the previous attempt's consumer lingers on the
            // server until its inactivity threshold, and a name cannot be reused
            // with another start sequence.
            name: Some(format!("{}-{}", spec.consumer, attempt_suffix())),
            filter_subject: spec.filter_subject.clone(),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    // Nothing left to deliver after the checkpoint: at the tail, even when the
    // log's last sequence is further on. That happens when the events after
    // the checkpoint are gone from the stream (a max age or message limit an
    // operator set, every click older than it): waiting for them to be
    // delivered would keep the fold, its service's readiness and the decider
    // waiting forever.
    let nothing_pending = consumer.cached_info().num_pending == 0;
    let mut messages = consumer.messages().await?.ready_chunks(MAX_GROUP);
    let started = std::time::Instant::now();
    status.send_modify(|s| {
        s.applied_seq = applied;
        // Both ways: a consumer started again (a reconnect, an error) may
        // find a backlog where the last one was at the tail, and "at the tail"
        // lets the decider reject a conversion whose click is in it.
        s.at_tail = applied >= last || nothing_pending;
        s.caught_up |= s.at_tail;
    });
    if applied < last && nothing_pending {
        tracing::info!(
            stream = spec.stream,
            checkpoint = applied,
            last,
            "the log's events after the checkpoint are gone (expired or deleted); at the tail"
        );
    }
    if status.borrow().caught_up {
        workers.lower_priority();
    }
    let mut committing = None;
    let pipe = Pipe {
        tree,
        spec,
        fold,
        workers,
        status,
        token,
        started,
    };
    let folded = pipe
        .fold_groups(&mut messages, source, &mut committing, applied, &log)
        .await;
    // However the loop ended, the group being committed lands first: the next
    // consumer starts from the checkpoint it writes, and the last flush at a
    // stop must cover it.
    let landed = match committing {
        Some(group) => pipe.landed(group.done.await),
        None => Ok(()),
    };
    if let (Err(_), Err(error)) = (&folded, &landed) {
        // Only the first error is returned: the commit's is not lost.
        tracing::error!(error = %error_chain(error), stream = spec.stream,
            "the last group's commit failed too");
    }
    folded.and(landed)
}

/// The threads of a fold. A pipelined one ([`FoldSpec::pipelined`]) has
/// two: one stages groups (reads the projection, runs the fold), the other
/// commits them. A group is staged over the one before it
/// ([`Staged::over`]) while that one is still being committed, so on a
/// machine with a core to spare a busy fold takes about the longer of the two
/// steps per group instead of their sum (the commit is about half of the
/// conversions fold's time: sled's inserts). Commits still go one at a time,
/// in log order, and a group's status (its applied sequence) is published
/// once its commit is in, as before. Otherwise one thread does both, a group
/// after the other.
pub(crate) struct Workers {
    fold: Worker,
    commit: Option<Worker>,
}

impl Workers {
    fn lower_priority(&self) {
        self.fold.lower_priority();
        if let Some(commit) = &self.commit {
            commit.lower_priority();
        }
    }
}

/// A group handed to the commit thread.
struct Committing {
    /// What the next group is staged over until this one is in the Tree.
    sealed: Arc<Sealed>,
    /// Resolves once it is committed and its status published: the sequence
    /// it reached when that was the tail for the first time.
    done:
        futures::future::BoxFuture<'static, Result<Result<Option<u64>, sled::Error>, WorkerError>>,
}

/// Resolves when the group being committed is in (never while none is).
async fn committed(
    committing: &mut Option<Committing>,
) -> Result<Result<Option<u64>, sled::Error>, WorkerError> {
    match committing {
        Some(group) => {
            let done = (&mut group.done).await;
            *committing = None;
            done
        }
        None => std::future::pending().await,
    }
}

/// What one consumer of a fold works with.
struct Pipe<'p, F> {
    tree: &'p FoldTree,
    spec: &'p FoldSpec,
    fold: &'p Arc<Mutex<F>>,
    workers: &'p Workers,
    status: &'p Arc<watch::Sender<FoldStatus>>,
    token: &'p CancellationToken,
    started: std::time::Instant,
}

impl<F: Fold> Pipe<'_, F> {
    async fn fold_groups(
        &self,
        messages: &mut (impl futures::Stream<
            Item = Vec<Result<async_nats::jetstream::Message, consumer::pull::OrderedError>>,
        > + Unpin),
        source: &mut Source,
        committing: &mut Option<Committing>,
        mut applied: u64,
        log: &[u8],
    ) -> Result<(), FoldError> {
        let spec = self.spec;
        let mut log_check = tokio::time::interval(LOG_CHECK);
        log_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The stream's identity being asked for, beside the fold's work (a
        // slow JetStream API must not hold the fold up).
        let mut asking: Option<futures::future::BoxFuture<'static, Option<bool>>> = None;
        loop {
            let waiting = std::time::Instant::now();
            let mut chunk = tokio::select! {
                () = self.token.cancelled() => return Ok(()),
                _ = source.connections.changed() => return Err(FoldError::Reconnected),
                _ = log_check.tick(), if asking.is_none() => {
                    let (js, name) = (source.js.clone(), spec.stream);
                    // Every event up to `applied` was in the stream before the
                    // ask: an answer that ends before it is of another log.
                    let (asked_at, log_now) = (applied, log.to_vec());
                    asking = Some(Box::pin(async move {
                        let stream = tokio::time::timeout(LOG_CHECK, js.get_stream(name)).await;
                        let stream = stream.ok()?.ok()?;
                        Some(log_changed(stream.cached_info(), &log_now, asked_at))
                    }));
                    continue;
                }
                changed = async { asking.as_mut().expect("guarded").await }, if asking.is_some() => {
                    asking = None;
                    // Gone or unreadable (`None`): the consumer says so, or the
                    // stream comes back and the next check tells. Changed: the
                    // consumer starts again, and its start tells a stream
                    // created again (or restored from a backup) from one
                    // whose creation time only changed.
                    if changed == Some(true) {
                        tracing::warn!(stream = spec.stream,
                            "the stream's creation time or end changed while folding; \
                             checking it from the checkpoint");
                        return Err(FoldError::LogReplaced);
                    }
                    continue;
                }
                done = committed(committing) => {
                    self.landed(done)?;
                    continue;
                }
                chunk = messages.next() => chunk.ok_or(FoldError::Ended)?,
            };
            let linger = tokio::time::Instant::now() + spec.linger;
            while chunk.len() < MAX_GROUP && !spec.linger.is_zero() {
                match tokio::time::timeout_at(linger, messages.next()).await {
                    Ok(Some(more)) => chunk.extend(more),
                    Ok(None) | Err(_) => break,
                }
            }
            let mut delivered = Vec::with_capacity(chunk.len());
            for item in chunk {
                match item {
                    Ok(msg) => delivered.push(msg),
                    Err(error) => {
                        tracing::warn!(error = %error, stream = spec.stream, "consumer hiccup")
                    }
                }
            }
            // The client made its consumer again by itself (the server's was
            // gone: deleted, or a stream leader moved) before anything was
            // delivered to it: it starts from the stream's first event, and
            // skipping the whole log would hold the fold up meanwhile.
            if replays_only(&delivered, applied) {
                tracing::warn!(
                    stream = spec.stream,
                    applied,
                    "the consumer delivers what is applied; starting one from the checkpoint"
                );
                return Err(FoldError::Replaying);
            }
            let (events, staging) = (delivered.len(), std::time::Instant::now());
            let waited = staging - waiting;
            let base = committing.as_ref().map(|c| Arc::clone(&c.sealed));
            let Some((group, sealed)) = self.stage(delivered, applied, base).await? else {
                continue;
            };
            // RUST_LOG=common::fold=debug: where a fold's time goes, group by
            // group (waited: from the last group's end until this one was
            // gathered, linger included; staged: applying it over the group
            // before, queueing for the thread included).
            tracing::debug!(
                stream = spec.stream,
                events,
                waited_us = waited.as_micros() as u64,
                staged_us = staging.elapsed().as_micros() as u64,
                pending = group.pending_after,
                "group staged"
            );
            // One commit at a time, in log order: the group before lands first.
            if let Some(before) = committing.take() {
                self.landed(before.done.await)?;
            }
            applied = group.top;
            match sealed {
                Some(sealed) if self.workers.commit.is_some() => {
                    *committing = Some(self.commit(sealed, group));
                }
                Some(sealed) => self.landed(self.commit(sealed, group).done.await)?,
                // Nothing new to write (replays): only the status moves.
                None => self.landed(Ok(Ok(publish(self.status, &group))))?,
            }
        }
    }

    /// Stages the new messages of a delivered chunk over `base` (the group
    /// being committed, if any) on the fold's thread, retrying storage
    /// failures until they pass or the token is cancelled. `None`: nothing
    /// usable was delivered; no [`Sealed`]: nothing new to write.
    async fn stage(
        &self,
        delivered: Vec<async_nats::jetstream::Message>,
        applied: u64,
        base: Option<Arc<Sealed>>,
    ) -> Result<Option<(Applied, Option<Sealed>)>, FoldError> {
        let (tree, fold, token) = (self.tree.clone(), Arc::clone(self.fold), self.token.clone());
        let work = move || -> Result<Option<(Applied, Option<Sealed>)>, sled::Error> {
            let Some(group) = Group::of(&delivered, applied) else {
                return Ok(None);
            };
            let reached = Applied {
                top: group.top,
                pending_after: group.pending_after,
                last_log_time_ms: group.entries.last().map(|e| e.log_time_ms),
            };
            if group.top == applied {
                return Ok(Some((reached, None)));
            }
            let mut fold = fold.lock().unwrap_or_else(PoisonError::into_inner);
            let sealed = retrying(
                &token,
                "projection read failed; retrying the group",
                || stage_new(&tree, base.as_deref(), &mut *fold, &group.entries),
                || Ok(()),
            )?;
            Ok(Some((reached, sealed)))
        };
        match self.workers.fold.run(work).await {
            Ok(result) => Ok(result?),
            Err(error) => Err(thread_failed(&error)),
        }
    }

    /// Starts committing `sealed` on the commit thread, which publishes the
    /// group's status once it is in. Retries storage failures (finishing the
    /// half-written commit first) until they pass or the token is cancelled.
    ///
    /// The group is not flushed here: the projection is disposable, and state
    /// and checkpoint share one commit, so after a crash sled recovers some
    /// earlier checkpoint together with exactly its state and the fold
    /// replays from there. sled flushes in the background (every 500 ms),
    /// writers that promise durability (the dispatcher's schedule, the
    /// outbox) flush the whole database when they need to, and the fold
    /// flushes when it stops. An fsync per group was most of the CPU the folds
    /// spent under load.
    fn commit(&self, sealed: Sealed, group: Applied) -> Committing {
        let sealed = Arc::new(sealed);
        let (tree, token) = (self.tree.clone(), self.token.clone());
        let (status, job_sealed) = (Arc::clone(self.status), Arc::clone(&sealed));
        let (stream, queued) = (self.spec.stream, std::time::Instant::now());
        let job = move || -> Result<Option<u64>, sled::Error> {
            let committing = std::time::Instant::now();
            retrying(
                &token,
                "projection write failed; retrying the group",
                || job_sealed.commit(&tree),
                || mend(&tree),
            )?;
            // RUST_LOG=common::fold=debug, with "group staged".
            tracing::debug!(
                stream,
                seq = group.top,
                queued_us = (committing - queued).as_micros() as u64,
                committed_us = committing.elapsed().as_micros() as u64,
                "group committed"
            );
            Ok(publish(&status, &group))
        };
        Committing {
            sealed,
            done: Box::pin(
                self.workers
                    .commit
                    .as_ref()
                    .unwrap_or(&self.workers.fold)
                    .start(job),
            ),
        }
    }

    /// Takes in a commit's outcome: its failure, or the tail reached.
    fn landed(
        &self,
        done: Result<Result<Option<u64>, sled::Error>, WorkerError>,
    ) -> Result<(), FoldError> {
        let first_tail = done.map_err(|error| thread_failed(&error))??;
        if let Some(applied_seq) = first_tail {
            self.workers.lower_priority();
            tracing::info!(
                stream = self.spec.stream,
                applied_seq,
                caught_up_after = ?self.started.elapsed(),
                "fold caught up with the log"
            );
        }
        Ok(())
    }
}

/// `work`, tried again after a storage failure (up to 5 times, waiting 100 ms
/// more each time, `mend` first) until it passes or `token` is cancelled.
fn retrying<T>(
    token: &CancellationToken,
    what: &str,
    mut work: impl FnMut() -> Result<T, sled::Error>,
    mut mend: impl FnMut() -> Result<(), sled::Error>,
) -> Result<T, sled::Error> {
    let mut attempt = 0u32;
    loop {
        match work() {
            Err(error) if attempt < 5 && !token.is_cancelled() => {
                attempt += 1;
                tracing::error!(%error, attempt, "{what}");
                std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
                mend()?;
            }
            done => return done,
        }
    }
}

/// Before a failed commit is tried again: finishes it if it stopped half-way.
/// A Tree [`store::recover`] had to clear is not written to: the group would
/// land on an empty Tree with its checkpoint, as if everything before it were
/// there. The error ends the consumer, and its restart folds the log again
/// from its start ([`store::CLEARED_FORMAT`]).
fn mend(tree: &FoldTree) -> Result<(), sled::Error> {
    match store::recover(tree)? {
        store::Recovery::Cleared => Err(sled::Error::Io(std::io::Error::other(
            "the projection was cleared (undecodable redo record); folding the log again",
        ))),
        store::Recovery::Nothing | store::Recovery::Finished => Ok(()),
    }
}

/// Publishes the status a group reached; `Some(its sequence)` when that is
/// the tail, reached for the first time since the start.
fn publish(status: &watch::Sender<FoldStatus>, group: &Applied) -> Option<u64> {
    let mut first_tail = false;
    status.send_modify(|s| {
        s.applied_seq = group.top;
        s.at_tail = group.pending_after == 0;
        first_tail = s.at_tail && !s.caught_up;
        s.caught_up |= s.at_tail;
        if let Some(at) = group.last_log_time_ms {
            s.applied_log_time_ms = at;
        }
    });
    first_tail.then_some(group.top)
}

fn thread_failed(error: &WorkerError) -> FoldError {
    FoldError::Store(sled::Error::Io(std::io::Error::other(format!(
        "fold task failed: {error}"
    ))))
}

/// Empties `tree` to fold the log again from its start. The status says so
/// at once: a fold that started over after a reconnection (a stream created
/// again under a running service) is no longer caught up, and what waits for
/// `caught_up` (the decider, the dispatcher, the door) must not act on a
/// half-rebuilt projection as if it were whole. It says so before anything
/// is cleared: a clear whose flush fails is retried with the format row
/// already matching, so this is not called again for it.
async fn start_over(
    tree: &FoldTree,
    format: u32,
    source: &Source,
    status: &watch::Sender<FoldStatus>,
) -> Result<(), FoldError> {
    status.send_modify(|s| {
        s.applied_seq = 0;
        s.caught_up = false;
        s.at_tail = false;
        s.applied_log_time_ms = 0;
    });
    store::start_format(tree, format)?;
    source.durable.flush().await?;
    Ok(())
}

/// A short random suffix (the random tail of a UUID v7).
fn attempt_suffix() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    id[id.len() - 10..].to_owned()
}

/// The new messages of one delivered chunk.
struct Group<'m> {
    entries: Vec<LogEntry<'m>>,
    top: u64,
    pending_after: u64,
}

impl<'m> Group<'m> {
    fn of(delivered: &'m [async_nats::jetstream::Message], applied: u64) -> Option<Self> {
        let mut entries = Vec::with_capacity(delivered.len());
        let mut top = applied;
        let mut pending_after = 0;
        for msg in delivered {
            let info = match msg.info() {
                Ok(info) => info,
                Err(error) => {
                    tracing::warn!(%error, "message without JetStream metadata; skipped");
                    continue;
                }
            };
            pending_after = info.pending;
            if info.stream_sequence <= top {
                continue; // a replay of what is already applied
            }
            top = info.stream_sequence;
            entries.push(LogEntry {
                subject: msg.subject.as_str(),
                payload: &msg.payload,
                seq: info.stream_sequence,
                log_time_ms: (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
            });
        }
        (top > applied || !delivered.is_empty()).then_some(Self {
            entries,
            top,
            pending_after,
        })
    }
}

/// What applying one delivered chunk reached.
struct Applied {
    top: u64,
    pending_after: u64,
    last_log_time_ms: Option<i64>,
}

/// Applies the entries the Tree has not applied yet (sequence above its
/// checkpoint; replays are skipped) in one commit with the new checkpoint,
/// and returns that checkpoint. Entries come in log order. Does not flush.
///
/// # Errors
/// Storage failure; nothing of the group is then written.
pub fn apply_new<F: Fold>(
    tree: &FoldTree,
    fold: &mut F,
    entries: &[LogEntry<'_>],
) -> Result<u64, sled::Error> {
    match stage_new(tree, None, fold, entries)? {
        Some(sealed) => {
            sealed.commit(tree)?;
            Ok(sealed.checkpoint())
        }
        None => store::checkpoint(tree),
    }
}

/// The running check: whether the stream `info` describes may not be the log
/// `log` names any more, asked once the fold had applied `asked_at` (every
/// event up to it was in the stream before the ask, so a stream that ends
/// before it is another one, a backup restored, say, whose creation time is
/// the old one's).
fn log_changed(info: &async_nats::jetstream::stream::Info, log: &[u8], asked_at: u64) -> bool {
    let identity = store::log_identity(info.created.unix_timestamp_nanos());
    ends_elsewhere(&identity, info.state.last_sequence, log, asked_at)
}

/// [`log_changed`] of a stream of identity `identity` that ends at `last`.
fn ends_elsewhere(identity: &[u8], last: u64, log: &[u8], asked_at: u64) -> bool {
    identity != log || last < asked_at
}

/// What a stream holds at a fold's checkpoint.
#[derive(Debug, PartialEq, Eq)]
enum AtCheckpoint {
    /// The event the fold applied there: its log time is the one recorded.
    Applied,
    /// Another event: the stream is another log.
    Other,
    /// Cannot tell: nothing applied, no time recorded (a checkpoint written
    /// before it was), or no event there any more (expired, purged, deleted).
    Unknown,
}

/// Whether a stream is another log than the one a projection with
/// checkpoint `applied` was folded from: it ends before that checkpoint
/// (created again, or restored from a backup), or holds another event there,
/// or its creation time changed (`created_again`) and the event there cannot
/// be read to tell.
fn another_log(applied: u64, last: u64, at: &AtCheckpoint, created_again: bool) -> bool {
    applied > last
        || match at {
            AtCheckpoint::Applied => false,
            AtCheckpoint::Other => true,
            AtCheckpoint::Unknown => created_again,
        }
}

/// What `stream` holds at the checkpoint `applied` of `tree`.
///
/// # Errors
/// NATS did not answer (the fold retries, neither keeping nor clearing).
async fn at_checkpoint(
    stream: &async_nats::jetstream::stream::Stream,
    tree: &sled::Tree,
    applied: u64,
) -> Result<AtCheckpoint, FoldError> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let Some(time) = store::checkpoint_time(tree)?.filter(|_| applied > 0) else {
        return Ok(AtCheckpoint::Unknown);
    };
    match stream.get_raw_message(applied).await {
        Ok(message) if (message.time.unix_timestamp_nanos() / 1_000_000) as i64 == time => {
            Ok(AtCheckpoint::Applied)
        }
        Ok(_) => Ok(AtCheckpoint::Other),
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(AtCheckpoint::Unknown),
        Err(e) => Err(FoldError::ReadBack(e)),
    }
}

/// Stages the entries not applied yet (as [`apply_new`]) over `base`, the
/// group before, not yet committed perhaps; `None` when none is new.
///
/// # Errors
/// Storage failure (a read).
pub fn stage_new<F: Fold>(
    tree: &FoldTree,
    base: Option<&Sealed>,
    fold: &mut F,
    entries: &[LogEntry<'_>],
) -> Result<Option<Sealed>, sled::Error> {
    let mut staged = Staged::over(tree, base);
    let checkpoint = staged.checkpoint()?;
    let (mut top, mut top_time) = (checkpoint, None);
    for entry in entries {
        if entry.seq <= top {
            continue;
        }
        fold.apply(&mut staged, entry)?;
        (top, top_time) = (entry.seq, Some(entry.log_time_ms));
    }
    Ok((top > checkpoint).then(|| staged.seal_at(top, top_time)))
}

/// Waits until the fold behind `status` has applied the stream's last
/// sequence as it is now (`why`: what waits, for the logs). Gives up with a
/// warning after `patience` in which the fold applied nothing: a fold whose
/// next events expired from the stream (or were deleted) never applies that
/// sequence. A fold still working through a backlog is waited for however
/// long it takes, and the end is asked for once: a log growing faster than
/// the fold applies it (a burst) is no reason to wait forever. Until NATS
/// says where the log ends it waits on: not knowing is no reason to go on
/// (a JetStream hiccup used to use the patience up in about a second).
pub async fn caught_up_with(
    js: &Context,
    stream: &str,
    mut status: watch::Receiver<FoldStatus>,
    patience: Duration,
    why: &str,
) {
    let (mut waits, mut end) = (0, None);
    while waits < 6 {
        if end.is_none() {
            end = crate::nats::last_sequence(js, stream).await;
        }
        let Some(last) = end else {
            tracing::debug!(stream, why, "asking again where the log ends");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let before = status.borrow().applied_seq;
        if wait_applied(&mut status, last, patience / 6).await {
            return;
        }
        let applied = status.borrow().applied_seq;
        waits = if applied > before { 0 } else { waits + 1 };
        tracing::info!(
            stream,
            why,
            last,
            applied,
            "waiting for the fold to reach the log's end"
        );
    }
    tracing::warn!(stream, why, "going on without the fold at the log's end");
}

/// Waits until the fold behind `status` has applied where the log ends as
/// `last` answers it (`None`: NATS did not say), both within `wait`: whether
/// it got there in time.
pub async fn reaches_end(
    last: impl std::future::Future<Output = Option<u64>>,
    status: &watch::Receiver<FoldStatus>,
    wait: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let Ok(Some(last)) = tokio::time::timeout_at(deadline, last).await else {
        return false;
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    wait_applied(&mut status.clone(), last, left).await
}

/// Waits until the fold has applied `seq` (true) or `timeout` passes (false).
pub async fn wait_applied(
    status: &mut watch::Receiver<FoldStatus>,
    seq: u64,
    timeout: Duration,
) -> bool {
    tokio::time::timeout(timeout, status.wait_for(|s| s.applied_seq >= seq))
        .await
        .is_ok_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_chunk_of_only_applied_events_is_a_replay() {
        // Never connected: the messages only need a context.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let msg = |seq: u64| async_nats::jetstream::Message {
            message: async_nats::Message {
                subject: "s".into(),
                reply: Some(format!("$JS.ACK.S.c.1.{seq}.{seq}.0.0").into()),
                payload: bytes::Bytes::new(),
                headers: None,
                status: None,
                description: None,
                length: 0,
            },
            context: js.clone(),
        };
        assert!(replays_only(&[msg(1), msg(2)], 5), "a log delivered again");
        assert!(replays_only(&[msg(5)], 5));
        assert!(!replays_only(&[msg(5), msg(6)], 5), "one new among them");
        assert!(!replays_only(&[msg(6)], 5));
        assert!(!replays_only(&[], 5));
    }

    #[test]
    fn a_stream_is_another_log_by_its_events_first_then_its_creation_time() {
        use AtCheckpoint::{Applied, Other, Unknown};
        assert!(!another_log(5, 9, &Applied, true), "edited, then restarted");
        assert!(
            another_log(5, 9, &Other, false),
            "restored, then written to"
        );
        assert!(
            another_log(5, 3, &Unknown, false),
            "ends before the checkpoint"
        );
        assert!(
            another_log(5, 9, &Unknown, true),
            "cannot tell, created again"
        );
        assert!(!another_log(5, 9, &Unknown, false));
        assert!(!another_log(0, 0, &Unknown, false), "nothing applied");
    }

    #[test]
    fn a_running_fold_sees_a_stream_that_ends_before_what_it_applied() {
        let log = store::log_identity(1_000);
        assert!(!ends_elsewhere(&log, 10, &log, 10));
        assert!(
            ends_elsewhere(&store::log_identity(2_000), 10, &log, 10),
            "created again"
        );
        assert!(
            ends_elsewhere(&log, 7, &log, 10),
            "a backup restored under the fold"
        );
        assert!(!ends_elsewhere(&log, 7, &log, 7));
    }

    #[test]
    fn a_retried_commit_does_not_write_onto_a_tree_recover_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let db = store::open_db(dir.path()).unwrap();
        let tree = FoldTree::open(&db, "t").unwrap();
        let mut staged = Staged::new(&tree);
        staged.insert("a", "1");
        staged.seal(7).commit(&tree).unwrap();
        assert!(mend(&tree).is_ok(), "nothing to finish");

        Staged::plant_undecodable_redo(&tree).unwrap();
        let token = CancellationToken::new();
        let mut staged = Staged::new(&tree);
        staged.insert("b", "2");
        let sealed = staged.seal(8);
        let mut tries = 0;
        let outcome = retrying(
            &token,
            "test",
            || {
                tries += 1;
                match tries {
                    1 => Err(sled::Error::Io(std::io::Error::other("disk hiccup"))),
                    _ => sealed.commit(&tree),
                }
            },
            || mend(&tree),
        );
        assert!(outcome.is_err(), "the retry stopped");
        assert_eq!(tries, 1, "and never committed");
        assert_eq!(store::checkpoint(&tree).unwrap(), 0);
        assert!(tree.get("b").unwrap().is_none());
        assert_eq!(store::format(&tree).unwrap(), store::CLEARED_FORMAT);
    }
}
