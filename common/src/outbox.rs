//! The durable local outbox: when JetStream does not acknowledge an event in
//! time, the event is spooled to a sled database of its own (flushed before the
//! caller answers its client) and a drainer publishes it later, in order, with
//! the same `Nats-Msg-Id`, so nothing is lost and nothing doubled.
//!
//! It lives in `DATA_DIR/outbox`, apart from the disposable projection in
//! `DATA_DIR/projection`: deleting the projection to rebuild it never deletes
//! events not yet in the log.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_nats::jetstream::Context;
use bytes::Bytes;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::nats::{refused_for_good, PublishError};

/// An outbox that could not take an event.
#[derive(Debug, Error)]
pub enum OutboxError {
    #[error("the outbox holds {0} events, its limit")]
    Full(u64),
    /// JetStream did not acknowledge in time and the outbox is full: the
    /// event may still reach the log (its ack came late), so it must not be
    /// sent again in another message.
    #[error("no ack in time, and the outbox holds {0} events, its limit")]
    FullAfterTimeout(u64),
    #[error("outbox storage")]
    Store(#[from] sled::Error),
}

/// Where an accepted event is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durable {
    /// Acknowledged by JetStream, at this stream sequence.
    Log(u64),
    /// Flushed to the local outbox; the drainer will publish it.
    Outbox,
}

/// Whether events sent through the outbox must reach the log in the order
/// they were accepted.
///
/// While events wait in the outbox, a new event that need not follow them is
/// still published directly as long as JetStream acknowledges: a stall of a
/// few tens of milliseconds under load then spools only the events caught in
/// it, instead of sending every later event through the slower spool until
/// the outbox is empty, which at a steady load it rarely becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order<'k> {
    /// Each event stands alone (a click).
    Independent,
    /// Events with the same key (a conversion id) reach the log in the order
    /// they were accepted: a status report never overtakes the report of the
    /// same conversion that waits in the outbox. Other keys pass.
    PerKey(&'k str),
    /// Every event queues behind every waiting one.
    Keep,
}

/// Where [`Outbox::publish_or_spool`] sends an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Publish,
    Spool,
}

/// What waits in the outbox, as far as ordering goes.
#[derive(Debug, Default)]
struct Waiting {
    /// Events every later one must follow: spooled with [`Order::Keep`], or
    /// by a version that did not record their order.
    barriers: u64,
    /// Events spooled with [`Order::PerKey`], per key.
    by_key: HashMap<Vec<u8>, u64>,
}

/// How a spooled event's order is kept in its outbox key, after the 8-byte
/// id that orders the outbox: nothing (a barrier), `i` (independent) or `k`
/// and the key.
fn order_suffix(order: Order<'_>) -> Vec<u8> {
    match order {
        Order::Keep => Vec::new(),
        Order::Independent => b"i".to_vec(),
        Order::PerKey(key) => [b"k", key.as_bytes()].concat(),
    }
}

impl Waiting {
    /// Counts (`add`) or forgets the event stored under `outbox_key`.
    fn count(&mut self, outbox_key: &[u8], add: bool) {
        let change = |n: &mut u64| *n = if add { *n + 1 } else { n.saturating_sub(1) };
        match outbox_key.get(8..) {
            None | Some([]) => change(&mut self.barriers),
            Some([b'k', key @ ..]) => {
                let n = self.by_key.entry(key.to_vec()).or_default();
                change(n);
                if *n == 0 {
                    self.by_key.remove(key);
                }
            }
            Some(_) => {}
        }
    }

    /// Whether an event with this order may be published before the waiting ones.
    fn may_pass(&self, order: Order<'_>) -> bool {
        match order {
            Order::Independent => true,
            Order::PerKey(key) => self.barriers == 0 && !self.by_key.contains_key(key.as_bytes()),
            Order::Keep => false,
        }
    }
}

/// How many of the first waiting events (their outbox `keys`, in order) one
/// drain round sends before it awaits any ack: up to the first that must
/// follow an earlier one of the round (the same conversion's, or any after a
/// [`Order::Keep`] event, which itself goes only first). Events in flight
/// together reach the log in the order sent unless the connection drops with
/// the first written and lost while the next, still in the client's buffer,
/// goes out on the new one: a status report must never be in flight with the
/// report it follows.
fn pipelined<'k>(keys: impl IntoIterator<Item = &'k [u8]>) -> usize {
    let mut keyed = std::collections::HashSet::new();
    let (mut barrier, mut n) = (false, 0);
    for key in keys {
        match key.get(8..) {
            None | Some([]) if n > 0 => break,
            None | Some([]) => barrier = true,
            Some([b'k', k @ ..]) if barrier || !keyed.insert(k) => break,
            Some(_) => {}
        }
        n += 1;
    }
    n
}

/// Publish directly when nothing waits; otherwise only an event that need not
/// follow the waiting ones, and only while JetStream acknowledges (so an
/// outage does not cost every request the ack deadline before it is spooled).
fn route(order: Order<'_>, depth: u64, acking: bool, waiting: &Waiting) -> Route {
    if depth == 0 || (acking && waiting.may_pass(order)) {
        Route::Publish
    } else {
        Route::Spool
    }
}

type JsPublishError = async_nats::jetstream::context::PublishError;

/// The events a message carries, as the outbox counts them
/// ([`OutboxStatus::depth`], `OUTBOX_MAX_ENTRIES`): each click of a
/// `clicks.v1.recorded_batch`, else one.
fn events(subject: &str, payload: &[u8]) -> u64 {
    proto::clicks::v1::ClicksRecorded::each(subject, payload).map_or(1, |c| c.len().max(1) as u64)
}

/// The clicks of a spooled `clicks.v1.recorded_batch`, each as the event it
/// would have been alone (`clicks.v1.recorded`, its click id as `Nats-Msg-Id`);
/// `None` for any other event, or a batch that does not decode.
fn clicks_of(record: &Record) -> Option<Vec<Record>> {
    use prost::Message;
    use proto::clicks::v1::{ClickRecorded, ClicksRecorded};
    if record.subject != proto::subject::CLICKS_RECORDED_BATCH {
        return None;
    }
    let clicks = ClicksRecorded::each(&record.subject, &record.payload).ok()?;
    let records = clicks.into_iter().enumerate().map(|(i, payload)| {
        let msg_id = ClickRecorded::decode(&payload[..])
            .ok()
            .map(|c| c.click_id)
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("{}/{i}", record.msg_id));
        Record {
            subject: proto::subject::CLICK_RECORDED.to_owned(),
            msg_id,
            enqueued_at_ms: record.enqueued_at_ms,
            payload: payload.into_owned(),
        }
    });
    Some(records.collect())
}

/// What `/readyz` shows of the outbox.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxStatus {
    /// Events waiting, each click of a batch counted.
    pub depth: u64,
    pub oldest_age_ms: Option<i64>,
    pub max_entries: u64,
    /// Events JetStream refused for good (larger than a stream or the server
    /// allows), set aside so they do not hold up the rest; kept, and put back
    /// in line at the next start (after the limit was raised, say).
    pub refused: u64,
}

/// A spooled event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    subject: String,
    msg_id: String,
    enqueued_at_ms: i64,
    payload: Vec<u8>,
}

impl Record {
    /// How many events a stored record counts for ([`events`]); one if it
    /// does not decode.
    fn events_in(stored: &[u8]) -> u64 {
        Self::decode(stored).map_or(1, |r| events(&r.subject, &r.payload))
    }

    fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(16 + self.subject.len() + self.msg_id.len() + self.payload.len());
        for s in [&self.subject, &self.msg_id] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.enqueued_at_ms.to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut rest = bytes;
        let mut text = || -> Option<String> {
            let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let s = String::from_utf8(rest.get(4..4 + len)?.to_vec()).ok()?;
            rest = &rest[4 + len..];
            Some(s)
        };
        let subject = text()?;
        let msg_id = text()?;
        let enqueued_at_ms = i64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        Some(Self {
            subject,
            msg_id,
            enqueued_at_ms,
            payload: rest[8..].to_vec(),
        })
    }
}

/// The outbox. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    /// Events set aside: JetStream refused them for good.
    refused: sled::Tree,
    /// Spools that happen at once (an outage under load) share flushes.
    durable: crate::store::GroupFlush,
    depth: AtomicU64,
    /// The last publish, direct or by the drainer, was acknowledged.
    acking: AtomicBool,
    waiting: Mutex<Waiting>,
    max_entries: u64,
    wake: Notify,
}

impl Outbox {
    /// Opens (or creates) the outbox under `dir`.
    ///
    /// # Errors
    /// The database cannot be opened. Unlike the projection it is never moved
    /// aside: it may hold events that exist nowhere else.
    pub fn open(dir: &Path, max_entries: u64) -> Result<Self, sled::Error> {
        std::fs::create_dir_all(dir)?;
        let db = crate::store::open_waiting(&sled::Config::new().path(dir.join("outbox")))?;
        let tree = db.open_tree("events")?;
        // Refused events go back in line, in their places: whatever refused
        // them may have been raised since.
        let refused = db.open_tree("refused")?;
        for row in refused.iter() {
            let (key, value) = row?;
            tree.insert(&key, value)?;
            refused.remove(&key)?;
        }
        db.flush()?;
        let (mut depth, mut waiting) = (0, Waiting::default());
        for row in tree.iter() {
            let (key, value) = row?;
            waiting.count(&key, true);
            depth += Record::events_in(&value);
        }
        if depth > 0 {
            tracing::warn!(
                depth,
                "outbox holds events from before the restart; draining them"
            );
        }
        let outbox = Self {
            inner: Arc::new(Inner {
                durable: crate::store::GroupFlush::new(tree.clone()),
                db,
                tree,
                refused,
                depth: AtomicU64::new(depth),
                acking: AtomicBool::new(true),
                waiting: Mutex::new(waiting),
                max_entries,
                wake: Notify::new(),
            }),
        };
        // A split a crash cut short is finished before anything is sent.
        for row in outbox.inner.tree.iter() {
            let (key, value) = row?;
            if let Some(record) = Record::decode(&value) {
                outbox.finish_split(&key, &record);
            }
        }
        Ok(outbox)
    }

    /// Finishes the split of the batch of clicks at `key` if one began (a
    /// storage error, or a crash, cut it short: some of its clicks are stored
    /// right after it): sent as it is, the batch would put those clicks in
    /// the log a second time, now that JetStream might take it (its limit
    /// raised). Whether there was such a split.
    fn finish_split(&self, key: &[u8], record: &Record) -> bool {
        let begun = record.subject == proto::subject::CLICKS_RECORDED_BATCH
            && self.inner.tree.scan_prefix(key).keys().nth(1).is_some();
        begun && self.split_batch(key, record)
    }

    /// Events waiting.
    pub fn depth(&self) -> u64 {
        self.inner.depth.load(Ordering::Relaxed)
    }

    /// Events it could take now.
    pub fn room(&self) -> u64 {
        self.inner.max_entries.saturating_sub(self.depth())
    }

    /// Depth, age of the oldest event, limit.
    pub fn status(&self) -> OutboxStatus {
        let now = crate::time::now_ms();
        let oldest = self
            .inner
            .tree
            .first()
            .ok()
            .flatten()
            .and_then(|(_, v)| Record::decode(&v))
            .map(|r| now - r.enqueued_at_ms);
        OutboxStatus {
            depth: self.depth(),
            oldest_age_ms: oldest,
            max_entries: self.inner.max_entries,
            refused: self.inner.refused.len() as u64,
        }
    }

    /// Spools one event and flushes it to disk.
    ///
    /// # Errors
    /// The outbox is full, or storage failed.
    pub async fn spool(
        &self,
        subject: &str,
        msg_id: &str,
        payload: &[u8],
        order: Order<'_>,
    ) -> Result<(), OutboxError> {
        let inner = &self.inner;
        let depth = self.depth();
        let events = events(subject, payload);
        if depth + events > inner.max_entries {
            return Err(OutboxError::Full(depth));
        }
        let key = [
            &inner.db.generate_id()?.to_be_bytes()[..],
            &order_suffix(order),
        ]
        .concat();
        let record = Record {
            subject: subject.to_owned(),
            msg_id: msg_id.to_owned(),
            enqueued_at_ms: crate::time::now_ms(),
            payload: payload.to_vec(),
        };
        // Counted before it is stored, so a request that follows this one's
        // answer sees it waiting, and a drainer that takes it at once never
        // counts below zero.
        self.waiting().count(&key, true);
        inner.depth.fetch_add(events, Ordering::Relaxed);
        if let Err(error) = inner.tree.insert(&key, record.encode()) {
            self.waiting().count(&key, false);
            inner.depth.fetch_sub(events, Ordering::Relaxed);
            return Err(error.into());
        }
        if let Err(error) = inner.durable.flush().await {
            // Not durable, so answered as not recorded: it must not be
            // published later either, or a retry would record it twice.
            self.take(&key);
            return Err(error.into());
        }
        inner.wake.notify_one();
        Ok(())
    }

    /// Publishes and waits for the ack up to `deadline`; if it does not come,
    /// spools instead. Events already waiting send a new one to the spool
    /// first as `order` says ([`Order`]). The caller may answer success for
    /// either [`Durable`] outcome.
    ///
    /// # Errors
    /// Not acknowledged and the outbox could not take it either.
    pub async fn publish_or_spool(
        &self,
        js: &Context,
        subject: &str,
        msg_id: &str,
        payload: Vec<u8>,
        deadline: Duration,
        order: Order<'_>,
    ) -> Result<Durable, OutboxError> {
        let acking = &self.inner.acking;
        let depth = self.depth();
        // The common case, an empty outbox, takes no lock.
        let publish = depth == 0
            || route(
                order,
                depth,
                acking.load(Ordering::Relaxed),
                &self.waiting(),
            ) == Route::Publish;
        if publish {
            let published = crate::nats::publish(
                js,
                subject.to_owned(),
                msg_id,
                Bytes::from(payload.clone()),
                deadline,
            )
            .await;
            match published {
                Ok(seq) => {
                    acking.store(true, Ordering::Relaxed);
                    return Ok(Durable::Log(seq));
                }
                Err(error) => {
                    acking.store(false, Ordering::Relaxed);
                    tracing::warn!(%error, subject, "no ack in time; spooling to the outbox")
                }
            }
        }
        match self.spool(subject, msg_id, &payload, order).await {
            Ok(()) => Ok(Durable::Outbox),
            Err(OutboxError::Full(depth)) if publish => Err(OutboxError::FullAfterTimeout(depth)),
            Err(error) => Err(error),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.inner
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Removes a spooled event; whether it was still there.
    fn take(&self, key: &[u8]) -> bool {
        let Some(value) = self.inner.tree.remove(key).ok().flatten() else {
            return false;
        };
        let events = Record::events_in(&value);
        self.inner.depth.fetch_sub(events, Ordering::Relaxed);
        self.waiting().count(key, false);
        true
    }

    /// Replaces a spooled batch of clicks by its clicks, each as the event it
    /// would have been alone: JetStream refused the batch for good (larger
    /// than a limit an operator lowered), and it never was in the log, so none
    /// of its clicks is. The clicks are stored under the batch's key followed
    /// by their index (they sort right after it, and are independent), before
    /// the batch is removed (no sled batch: see `common::store`): a split that
    /// failed half way, or that a crash cut short, is done again over the same
    /// keys, so no click is stored twice. Whether it was such a batch.
    fn split_batch(&self, key: &[u8], record: &Record) -> bool {
        let Some(clicks) = clicks_of(record).filter(|c| c.len() > 1) else {
            return false;
        };
        let inner = &self.inner;
        for (index, click) in (0u32..).zip(&clicks) {
            let click_key = [key, &index.to_be_bytes()[..]].concat();
            match inner.tree.insert(&click_key, click.encode()) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    self.waiting().count(&click_key, true);
                    inner.depth.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    // The batch stays in line, and is split again.
                    tracing::error!(%error, "cannot split the refused batch of clicks");
                    return true;
                }
            }
        }
        tracing::warn!(
            msg_id = record.msg_id,
            clicks = clicks.len(),
            bytes = record.payload.len(),
            "JetStream refuses this batch of clicks for good; its clicks go back in line one by one"
        );
        self.take(key);
        true
    }

    /// Moves a spooled event JetStream refused for good out of the line, so
    /// the events behind it drain; it is kept (see [`OutboxStatus::refused`]).
    /// A batch of clicks is split into its clicks instead.
    fn set_aside(&self, key: &[u8], record: &Record, error: &JsPublishError) {
        if self.split_batch(key, record) {
            return;
        }
        tracing::error!(
            %error,
            subject = record.subject,
            msg_id = record.msg_id,
            bytes = record.payload.len(),
            "JetStream refuses this spooled event for good; set aside (kept in the \
             outbox's `refused` tree, put back in line at the next start)"
        );
        if let Err(error) = self.inner.refused.insert(key, record.encode()) {
            tracing::error!(%error, "cannot set the refused event aside; it stays in line");
            return;
        }
        self.take(key);
    }

    fn first(&self, n: usize) -> Vec<(sled::IVec, Record)> {
        self.inner
            .tree
            .iter()
            .take(n)
            .filter_map(Result::ok)
            .filter_map(|(k, v)| match Record::decode(&v) {
                Some(r) => Some((k, r)),
                None => {
                    tracing::error!("undecodable outbox entry dropped");
                    self.take(&k);
                    None
                }
            })
            .collect()
    }

    /// Publishes waiting events in order, pipelined; removes each once acked.
    /// Returns how many were published.
    async fn drain_once(&self, js: &Context, timeout: Duration) -> Result<usize, PublishError> {
        let mut batch = self.first(256);
        if batch
            .iter()
            .any(|(key, record)| self.finish_split(key, record))
        {
            return Ok(0); // its clicks are in line now: read the line again
        }
        batch.truncate(pipelined(batch.iter().map(|(key, _)| key.as_ref())));
        let mut acks = Vec::with_capacity(batch.len());
        for (key, record) in &batch {
            let ack = crate::nats::send(
                js,
                record.subject.clone(),
                &record.msg_id,
                record.payload.clone().into(),
            )
            .await;
            match ack {
                Ok(ack) => acks.push((key, record, ack)),
                Err(PublishError::Send { source, .. }) if refused_for_good(&source) => {
                    self.set_aside(key, record, &source);
                }
                Err(e) => {
                    if acks.is_empty() {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        // Every ack is collected, within one deadline for the round: the
        // events of a round have distinct keys, so one that failed holds none
        // of the others back, and an event stored but left in line would be
        // sent again and again behind a head that keeps failing, and stored
        // twice once NATS's duplicate window (2 minutes) has passed.
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut done, mut failed) = (0, None);
        for (key, record, ack) in acks {
            match tokio::time::timeout_at(deadline, ack).await {
                Ok(Ok(_)) => {
                    self.take(key);
                    done += 1;
                }
                Ok(Err(source)) if refused_for_good(&source) => {
                    self.set_aside(key, record, &source);
                }
                Ok(Err(source)) => {
                    failed = failed.or(Some(PublishError::Send {
                        subject: record.subject.clone(),
                        source,
                    }));
                }
                Err(_) => {
                    failed = failed.or(Some(PublishError::Timeout {
                        subject: record.subject.clone(),
                        timeout,
                    }));
                }
            }
        }
        let _ = crate::store::flush(&self.inner.tree).await;
        match failed {
            Some(error) => Err(error),
            None => Ok(done),
        }
    }

    /// Drains until `token` is cancelled, backing off while NATS does not ack.
    pub async fn run_drainer(self, js: Context, timeout: Duration, token: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.depth() == 0 {
                tokio::select! {
                    () = token.cancelled() => return,
                    () = self.inner.wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let drained = self.drain_once(&js, timeout).await;
            self.inner.acking.store(drained.is_ok(), Ordering::Relaxed);
            match drained {
                Ok(n) => {
                    backoff = Duration::from_millis(50);
                    if n > 0 {
                        tracing::info!(published = n, left = self.depth(), "outbox drained");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, depth = self.depth(), ?backoff, "outbox cannot drain yet");
                    tokio::select! {
                        () = token.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            if token.is_cancelled() {
                return;
            }
        }
    }

    /// Flushes the outbox (at shutdown).
    pub async fn flush(&self) {
        if let Err(error) = crate::store::flush(&self.inner.tree).await {
            tracing::error!(%error, "outbox flush failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = Record {
            subject: "a.b".into(),
            msg_id: "id-1".into(),
            enqueued_at_ms: -5,
            payload: vec![0, 1, 255],
        };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode(&[0, 0, 0, 9, b'x']), None);
    }

    fn waiting(keys: &[&[u8]]) -> Waiting {
        let mut w = Waiting::default();
        for k in keys {
            w.count(k, true);
        }
        w
    }

    #[test]
    fn events_pass_waiting_ones_they_need_not_follow_and_only_while_nats_acks() {
        let conv_a: &[u8] = b"\0\0\0\0\0\0\0\x01kA";
        let click: &[u8] = b"\0\0\0\0\0\0\0\x02i";
        let w = waiting(&[conv_a, click]);
        let orders = [Order::Independent, Order::PerKey("B"), Order::Keep];
        for order in orders {
            let empty = Waiting::default();
            assert_eq!(route(order, 0, true, &empty), Route::Publish, "none waits");
            assert_eq!(
                route(order, 0, false, &empty),
                Route::Publish,
                "none waits: try NATS again"
            );
            assert_eq!(route(order, 2, false, &w), Route::Spool, "an outage");
        }
        assert_eq!(route(Order::Independent, 2, true, &w), Route::Publish);
        assert_eq!(
            route(Order::PerKey("B"), 2, true, &w),
            Route::Publish,
            "another conversion passes"
        );
        assert_eq!(
            route(Order::PerKey("A"), 2, true, &w),
            Route::Spool,
            "a status report stays behind the report it follows"
        );
        assert_eq!(route(Order::Keep, 2, true, &w), Route::Spool);
        let legacy: &[u8] = b"\0\0\0\0\0\0\0\x03";
        assert_eq!(
            route(Order::PerKey("B"), 3, true, &waiting(&[legacy])),
            Route::Spool,
            "an event of unknown order (a Keep, or an older version's) holds every keyed one"
        );
        let mut w = w;
        w.count(conv_a, false);
        assert_eq!(route(Order::PerKey("A"), 1, true, &w), Route::Publish);
        assert!(w.by_key.is_empty(), "forgotten keys leave nothing behind");
    }

    #[test]
    fn a_drain_round_never_has_two_events_of_one_conversion_in_flight() {
        let key = |seq: u8, order: Order<'_>| {
            [&[0, 0, 0, 0, 0, 0, 0, seq][..], &order_suffix(order)].concat()
        };
        let (a, b) = (Order::PerKey("A"), Order::PerKey("B"));
        let round = |orders: &[Order<'_>]| {
            let keys: Vec<Vec<u8>> = (1..).zip(orders).map(|(i, o)| key(i, *o)).collect();
            pipelined(keys.iter().map(Vec::as_slice))
        };
        let i = Order::Independent;
        assert_eq!(
            round(&[a, i, a, b]),
            2,
            "the second of A waits for the first's ack"
        );
        assert_eq!(round(&[a, b, i, i]), 4);
        assert_eq!(
            round(&[Order::Keep, i, a]),
            2,
            "keyed events wait for a barrier's ack"
        );
        assert_eq!(
            round(&[i, Order::Keep, i]),
            1,
            "a barrier goes first or not at all"
        );
        assert_eq!(round(&[]), 0);
    }

    #[tokio::test]
    async fn spooled_events_survive_reopening_in_order_and_the_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), 2).unwrap();
            outbox
                .spool("s", "m1", b"one", Order::PerKey("c1"))
                .await
                .unwrap();
            outbox
                .spool("s", "m2", b"two", Order::Independent)
                .await
                .unwrap();
            assert!(matches!(
                outbox.spool("s", "m3", b"three", Order::Keep).await,
                Err(OutboxError::Full(2))
            ));
            assert_eq!(outbox.status().depth, 2);
        }
        let reopened = Outbox::open(dir.path(), 2).unwrap();
        assert_eq!(reopened.depth(), 2);

        let ids: Vec<String> = reopened
            .first(10)
            .into_iter()
            .map(|(_, r)| r.msg_id)
            .collect();
        assert_eq!(ids, ["m1", "m2"]);
        assert!(reopened.status().oldest_age_ms.is_some());
        assert!(
            !reopened.waiting().may_pass(Order::PerKey("c1")),
            "the order of what waits survives the restart"
        );
        assert!(reopened.waiting().may_pass(Order::PerKey("c2")));
        let keys: Vec<_> = reopened.first(10).into_iter().map(|(k, _)| k).collect();
        assert!(reopened.take(&keys[0]));
        assert!(reopened.waiting().may_pass(Order::PerKey("c1")));
        assert_eq!(reopened.depth(), 1);
    }

    #[tokio::test]
    async fn a_refused_batch_of_clicks_goes_back_in_line_as_its_clicks() {
        use prost::Message;
        use proto::clicks::v1::{ClickRecorded, ClicksRecorded};
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 10).unwrap();
        let click = |id: &str| {
            ClickRecorded {
                click_id: id.into(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let batch = ClicksRecorded {
            clicks: vec![click("c1"), click("c2")],
        }
        .encode_to_vec();
        let many = proto::subject::CLICKS_RECORDED_BATCH;
        outbox
            .spool(many, "batch/c1", &batch, Order::Independent)
            .await
            .unwrap();
        assert_eq!(outbox.depth(), 2, "each click counts");
        outbox
            .spool("s", "m2", b"two", Order::PerKey("k"))
            .await
            .unwrap();
        // Two encoded batches back to back are one batch of their clicks.
        let four = [batch.clone(), batch.clone()].concat();
        let small = Outbox::open(&dir.path().join("small"), 3).unwrap();
        assert!(
            matches!(
                small.spool(many, "b", &four, Order::Independent).await,
                Err(OutboxError::Full(0))
            ),
            "a batch of 4 clicks overfills a limit of 3"
        );
        let (key, record) = outbox.first(1).remove(0);
        let too_big = JsPublishError::new(
            async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded,
        );
        outbox.set_aside(&key, &record, &too_big);
        let one = proto::subject::CLICK_RECORDED.to_owned();
        let expected = [
            (one.clone(), "c1".to_owned(), click("c1")),
            (one, "c2".to_owned(), click("c2")),
            ("s".to_owned(), "m2".to_owned(), b"two".to_vec()),
        ];
        let left = || -> Vec<(String, String, Vec<u8>)> {
            outbox
                .first(10)
                .into_iter()
                .map(|(_, r)| (r.subject, r.msg_id, r.payload))
                .collect()
        };
        assert_eq!(
            left(),
            expected,
            "each click alone, under its click id, in the batch's place, nothing set aside"
        );
        let status = outbox.status();
        assert_eq!((status.depth, status.refused), (3, 0));

        // A crash after the clicks were stored, before the batch was removed:
        // the batch is refused and split again, over the same keys.
        outbox.inner.tree.insert(&key, record.encode()).unwrap();
        outbox.inner.depth.fetch_add(2, Ordering::Relaxed);
        outbox.set_aside(&key, &record, &too_big);
        assert_eq!(left(), expected, "no click twice");
        assert_eq!(outbox.depth(), 3);
        assert!(!outbox.waiting().may_pass(Order::PerKey("k")));
        outbox.flush().await; // as the drain does after each round
        drop(outbox);
        assert_eq!(Outbox::open(dir.path(), 10).unwrap().depth(), 3);

        // A split cut short (one click stored, the batch still there), then a
        // restart: the split is finished before anything is sent, so a batch
        // JetStream would take by then never goes with its clicks.
        {
            let outbox = Outbox::open(dir.path(), 10).unwrap();
            let second = [&key[..], &1u32.to_be_bytes()[..]].concat();
            outbox.inner.tree.remove(second).unwrap();
            outbox.inner.tree.insert(&key, record.encode()).unwrap();
            outbox.inner.tree.flush().unwrap();
        }
        let reopened = Outbox::open(dir.path(), 10).unwrap();
        let left: Vec<_> = reopened
            .first(10)
            .into_iter()
            .map(|(_, r)| (r.subject, r.msg_id, r.payload))
            .collect();
        assert_eq!(left, expected, "each click once, the batch gone");
        assert_eq!(reopened.depth(), 3);
    }

    #[tokio::test]
    async fn a_refused_event_is_set_aside_kept_and_back_in_line_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), 10).unwrap();
            for id in ["m1", "m2"] {
                outbox
                    .spool("s", id, id.as_bytes(), Order::Independent)
                    .await
                    .unwrap();
            }
            let (key, record) = outbox.first(1).remove(0);
            let too_big = JsPublishError::new(
                async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded,
            );
            assert!(refused_for_good(&too_big));
            outbox.set_aside(&key, &record, &too_big);
            let status = outbox.status();
            assert_eq!((status.depth, status.refused), (1, 1));
            let left: Vec<String> = outbox
                .first(10)
                .into_iter()
                .map(|(_, r)| r.msg_id)
                .collect();
            assert_eq!(left, ["m2"], "the one behind it is next");
            assert!(!refused_for_good(&JsPublishError::new(
                async_nats::jetstream::context::PublishErrorKind::TimedOut
            )));
        }
        let reopened = Outbox::open(dir.path(), 10).unwrap();
        let status = reopened.status();
        assert_eq!((status.depth, status.refused), (2, 0));
        let ids: Vec<String> = reopened
            .first(10)
            .into_iter()
            .map(|(_, r)| r.msg_id)
            .collect();
        assert_eq!(ids, ["m1", "m2"], "in its place again");
    }
}
