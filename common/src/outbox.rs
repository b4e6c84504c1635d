//! The durable local outbox: when JetStream does not acknowledge an event in
//! time, the event is spooled to a sled database of its own (flushed before the
//! caller answers its client) and a drainer publishes it later, in order, with
//! the same `Nats-Msg-Id`, so nothing is lost and nothing doubled.
//!
//! It lives in `DATA_DIR/outbox`, apart from the disposable projection in
//! `DATA_DIR/projection`: deleting the projection to rebuild it never deletes
//! events not yet in the log.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use async_nats::jetstream::Context;
use bytes::Bytes;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::nats::PublishError;

/// An outbox that could not take an event.
#[derive(Debug, Error)]
pub enum OutboxError {
    #[error("the outbox holds {0} events, its limit")]
    Full(u64),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Each event stands alone (a click): while some wait in the outbox, new
    /// ones are still published directly as long as JetStream acknowledges.
    /// A stall of a few tens of milliseconds under load then spools only the
    /// events caught in it, instead of sending every later event through the
    /// slower spool until the outbox is empty, which at a steady load it
    /// rarely becomes.
    Independent,
    /// A later event may depend on an earlier one (a conversion's status
    /// reports): while any wait in the outbox, new ones queue behind them.
    Keep,
}

/// Where [`Outbox::publish_or_spool`] sends an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Publish,
    Spool,
}

/// Publish directly when nothing waits; otherwise only events that stand
/// alone, and only while JetStream acknowledges (so an outage does not cost
/// every request the ack deadline before it is spooled).
fn route(order: Order, depth: u64, acking: bool) -> Route {
    match (order, depth, acking) {
        (_, 0, _) | (Order::Independent, _, true) => Route::Publish,
        _ => Route::Spool,
    }
}

/// What `/readyz` shows of the outbox.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxStatus {
    pub depth: u64,
    pub oldest_age_ms: Option<i64>,
    pub max_entries: u64,
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
    /// Spools that happen at once (an outage under load) share flushes.
    durable: crate::store::GroupFlush,
    depth: AtomicU64,
    /// The last publish, direct or by the drainer, was acknowledged.
    acking: AtomicBool,
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
        let depth = tree.len() as u64;
        if depth > 0 {
            tracing::warn!(
                depth,
                "outbox holds events from before the restart; draining them"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                durable: crate::store::GroupFlush::new(tree.clone()),
                db,
                tree,
                depth: AtomicU64::new(depth),
                acking: AtomicBool::new(true),
                max_entries,
                wake: Notify::new(),
            }),
        })
    }

    /// Events waiting.
    pub fn depth(&self) -> u64 {
        self.inner.depth.load(Ordering::Relaxed)
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
    ) -> Result<(), OutboxError> {
        let inner = &self.inner;
        let depth = self.depth();
        if depth >= inner.max_entries {
            return Err(OutboxError::Full(depth));
        }
        let key = inner.db.generate_id()?.to_be_bytes();
        let record = Record {
            subject: subject.to_owned(),
            msg_id: msg_id.to_owned(),
            enqueued_at_ms: crate::time::now_ms(),
            payload: payload.to_vec(),
        };
        inner.tree.insert(key, record.encode())?;
        inner.depth.fetch_add(1, Ordering::Relaxed);
        inner.durable.flush().await?;
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
        order: Order,
    ) -> Result<Durable, OutboxError> {
        let acking = &self.inner.acking;
        if route(order, self.depth(), acking.load(Ordering::Relaxed)) == Route::Publish {
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
        self.spool(subject, msg_id, &payload).await?;
        Ok(Durable::Outbox)
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
                    let _ = self.inner.tree.remove(&k);
                    None
                }
            })
            .collect()
    }

    /// Publishes waiting events in order, pipelined; removes each once acked.
    /// Returns how many were published.
    async fn drain_once(&self, js: &Context, timeout: Duration) -> Result<usize, PublishError> {
        let batch = self.first(256);
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
                Err(e) => {
                    if acks.is_empty() {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        let mut done = 0;
        for (key, record, ack) in acks {
            match tokio::time::timeout(timeout, ack).await {
                Ok(Ok(_)) => {
                    if self.inner.tree.remove(key).ok().flatten().is_some() {
                        self.inner.depth.fetch_sub(1, Ordering::Relaxed);
                    }
                    done += 1;
                }
                Ok(Err(source)) => {
                    return Err(PublishError::Send {
                        subject: record.subject.clone(),
                        source,
                    })
                }
                Err(_) => {
                    return Err(PublishError::Timeout {
                        subject: record.subject.clone(),
                        timeout,
                    })
                }
            }
        }
        let _ = crate::store::flush(&self.inner.tree).await;
        Ok(done)
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

    #[test]
    fn only_independent_events_pass_waiting_ones_and_only_while_nats_acks() {
        for order in [Order::Independent, Order::Keep] {
            assert_eq!(route(order, 0, true), Route::Publish, "nothing waits");
            assert_eq!(
                route(order, 0, false),
                Route::Publish,
                "nothing waits: try NATS again"
            );
            assert_eq!(route(order, 3, false), Route::Spool, "an outage");
        }
        assert_eq!(route(Order::Independent, 3, true), Route::Publish);
        assert_eq!(
            route(Order::Keep, 3, true),
            Route::Spool,
            "a status report stays behind the report it follows"
        );
    }

    #[tokio::test]
    async fn spooled_events_survive_reopening_in_order_and_the_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), 2).unwrap();
            outbox.spool("s", "m1", b"one").await.unwrap();
            outbox.spool("s", "m2", b"two").await.unwrap();
            assert!(matches!(
                outbox.spool("s", "m3", b"three").await,
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
    }
}
