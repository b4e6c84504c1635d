//! Group commit of clicks: the clicks that arrive while earlier ones await
//! JetStream's ack are published together, as one `ClicksRecorded` message on
//! `clicks.v1.recorded_batch`, acked once for all of them.
//!
//! Every click's redirect still waits for its own click to be durable, acked or
//! spooled to the outbox (the batch is spooled whole, under its own
//! `Nats-Msg-Id`), so no guarantee is weaker than one message per click; what
//! changes is the cost. A message costs NATS, its readers (postback-service's
//! clicks fold) and our client the same whatever it carries, so at a steady
//! load of tens of thousands of clicks a second the per-message work, which
//! was most of NATS's and a good part of the services' CPU, is shared by tens
//! of clicks. Batching needs no timer: at most `in_flight` messages await
//! their ack at once, and what queues meanwhile makes the next message once a
//! slot frees. A click that finds a slot free and nothing queued goes alone,
//! on `clicks.v1.recorded` as before, so a quiet system's log looks as it did.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::Context;
use common::outbox::{Durable, Order, Outbox, OutboxError};
use common::service::Base;
use prost::Message;
use proto::clicks::v1::ClicksRecorded;
use thiserror::Error;
use tokio::{
    sync::{mpsc, oneshot, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

/// Most bytes of clicks in one message (a single larger click goes alone):
/// far below NATS's default max payload (1 MiB). A batch JetStream refuses
/// for good all the same (an operator lowered a limit) is split back into its
/// clicks by the outbox ([`common::outbox`]).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Clicks waiting for a slot; a request that finds it full waits its turn.
const QUEUE: usize = 8192;

/// Why a click was not recorded.
#[derive(Debug, Clone, Error)]
pub enum RecordError {
    /// Neither acked nor spooled.
    #[error(transparent)]
    Outbox(Arc<OutboxError>),
    /// The group commit's task is gone (the service is stopping).
    #[error("the click log is stopping")]
    Stopped,
}

/// How clicks are grouped.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Most clicks in one message; 1: every click is published on its own, as
    /// each request's own publish (no grouping task at all).
    pub max_clicks: usize,
    /// Messages awaiting their ack at once.
    pub in_flight: usize,
    /// How long a message waits for its ack before it is spooled.
    pub ack_deadline: Duration,
}

/// A click on its way to the log.
struct Pending {
    click_id: String,
    payload: Vec<u8>,
    done: oneshot::Sender<Result<Durable, RecordError>>,
}

/// Records clicks in the log. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    js: Context,
    outbox: Outbox,
    settings: Settings,
    /// `None` when every click goes on its own.
    queue: Option<mpsc::Sender<Pending>>,
}

impl GroupCommit {
    /// Starts the grouping task (when `settings.max_clicks` > 1) among
    /// `base`'s tasks. It ends once every clone of the returned handle is
    /// dropped (the HTTP server has drained) or the service stops, after the
    /// messages it sent have their answers, so a stopping service waits for
    /// them before its last outbox flush.
    pub fn start(base: &Base, outbox: Outbox, settings: Settings) -> Self {
        let queue = (settings.max_clicks > 1).then(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let (js, outbox) = (base.js.clone(), outbox.clone());
            base.spawn(move |stop| group(rx, js, outbox, settings, stop));
            tx
        });
        Self {
            js: base.js.clone(),
            outbox,
            settings,
            queue,
        }
    }

    /// Records one click (`payload`, an encoded `ClickRecorded`): returns once
    /// it is durable, in the log or in the outbox.
    ///
    /// # Errors
    /// Not acked and the outbox could not take it, or the service is stopping.
    pub async fn record(&self, click_id: String, payload: Vec<u8>) -> Result<Durable, RecordError> {
        let Some(queue) = &self.queue else {
            let deadline = self.settings.ack_deadline;
            return alone(&self.js, &self.outbox, &click_id, payload, deadline).await;
        };
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            click_id,
            payload,
            done,
        };
        queue
            .send(pending)
            .await
            .map_err(|_| RecordError::Stopped)?;
        answer.await.map_err(|_| RecordError::Stopped)?
    }
}

/// Takes a slot, then every click waiting (up to the limits) as one message.
async fn group(
    mut queue: mpsc::Receiver<Pending>,
    js: Context,
    outbox: Outbox,
    settings: Settings,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.in_flight.max(1)));
    let mut commits = JoinSet::new();
    let mut carry = None;
    loop {
        while commits.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let first = match carry.take() {
            Some(first) => first,
            None => tokio::select! {
                next = queue.recv() => match next {
                    Some(first) => first,
                    None => break,
                },
                // Only once the HTTP server has drained: nobody waits for
                // what is still queued.
                () = stop.cancelled() => break,
            },
        };
        let batch = take_batch(first, &mut queue, settings.max_clicks, &mut carry);
        if batch.is_empty() {
            continue;
        }
        let (js, outbox) = (js.clone(), outbox.clone());
        commits.spawn(async move {
            commit(&js, &outbox, batch, settings.ack_deadline).await;
            drop(slot);
        });
    }
    while commits.join_next().await.is_some() {}
}

/// `first` and the clicks queued behind it, up to `max_clicks` and
/// [`MAX_BATCH_BYTES`]; a click that would pass the bytes is left in `carry`
/// for the next batch. A click whose request has gone (its client left, or
/// the request timed out) is dropped: it was never redirected.
fn take_batch(
    first: Pending,
    queue: &mut mpsc::Receiver<Pending>,
    max_clicks: usize,
    carry: &mut Option<Pending>,
) -> Vec<Pending> {
    let mut bytes = 0;
    let mut batch = Vec::new();
    let mut next = Some(first);
    while let Some(pending) = next.take() {
        if !pending.done.is_closed() {
            if !batch.is_empty() && bytes + pending.payload.len() > MAX_BATCH_BYTES {
                *carry = Some(pending);
                break;
            }
            bytes += pending.payload.len();
            batch.push(pending);
        }
        if batch.len() < max_clicks {
            next = queue.try_recv().ok();
        }
    }
    batch
}

/// The subject, `Nats-Msg-Id` and payload of one message carrying `batch`
/// (a lone click's payload is moved out; a batch's clicks keep theirs, for
/// [`commit`]'s fallback).
fn message(batch: &mut [Pending]) -> (&'static str, String, Vec<u8>) {
    if let [one] = batch {
        let payload = std::mem::take(&mut one.payload);
        return (
            proto::subject::CLICK_RECORDED,
            one.click_id.clone(),
            payload,
        );
    }
    let msg_id = format!("batch/{}", batch[0].click_id);
    let clicks = batch.iter().map(|p| p.payload.clone()).collect();
    let payload = ClicksRecorded { clicks }.encode_to_vec();
    (proto::subject::CLICKS_RECORDED_BATCH, msg_id, payload)
}

/// Records one click as its own message on `clicks.v1.recorded`, under its
/// click id.
async fn alone(
    js: &Context,
    outbox: &Outbox,
    click_id: &str,
    payload: Vec<u8>,
    deadline: Duration,
) -> Result<Durable, RecordError> {
    let subject = proto::subject::CLICK_RECORDED;
    outbox
        .publish_or_spool(js, subject, click_id, payload, deadline, Order::Independent)
        .await
        .map_err(|e| RecordError::Outbox(Arc::new(e)))
}

/// Publishes (or spools) one message and answers each of its clicks. A batch
/// the outbox has no room for (it counts each click) keeps the clicks that
/// fit, and only the rest are refused:
/// - never sent ([`OutboxError::Full`]): tried click by click, each as the
///   message it would have been alone;
/// - sent and not acked in time ([`OutboxError::FullAfterTimeout`]): it may
///   still reach the log, so its clicks must not go again under other
///   `Nats-Msg-Id`s, where each would be in the log twice. The first clicks
///   that fit are spooled as a batch under the batch's own id: JetStream
///   drops it as a duplicate if the batch did land, and records those clicks
///   if it did not ([`keep_what_fits`]).
async fn commit(js: &Context, outbox: &Outbox, mut batch: Vec<Pending>, deadline: Duration) {
    let (subject, msg_id, payload) = message(&mut batch);
    tracing::trace!(clicks = batch.len(), bytes = payload.len(), "click message");
    let durable = outbox
        .publish_or_spool(js, subject, &msg_id, payload, deadline, Order::Independent)
        .await;
    match durable {
        Err(OutboxError::Full(_)) if batch.len() > 1 => {
            for pending in batch {
                let durable = alone(js, outbox, &pending.click_id, pending.payload, deadline).await;
                // A request that went away meanwhile has nobody to answer.
                let _ = pending.done.send(durable);
            }
        }
        Err(error @ OutboxError::FullAfterTimeout(_)) if batch.len() > 1 => {
            keep_what_fits(outbox, batch, &msg_id, error).await;
        }
        durable => answer(batch, durable.map_err(|e| RecordError::Outbox(Arc::new(e)))),
    }
}

/// Spools as many of `batch`'s first clicks as the outbox has room for, as a
/// batch under `msg_id` (the id of the message `batch` was sent as, which
/// they share its first click with), and refuses the rest with `full`.
async fn keep_what_fits(outbox: &Outbox, mut batch: Vec<Pending>, msg_id: &str, full: OutboxError) {
    let full = RecordError::Outbox(Arc::new(full));
    let room = usize::try_from(outbox.room()).unwrap_or(usize::MAX);
    let refused = batch.split_off(room.min(batch.len()));
    answer(refused, Err(full));
    if batch.is_empty() {
        return;
    }
    let clicks = batch.iter().map(|p| p.payload.clone()).collect();
    let payload = ClicksRecorded { clicks }.encode_to_vec();
    let subject = proto::subject::CLICKS_RECORDED_BATCH;
    let kept = outbox
        .spool(subject, msg_id, &payload, Order::Independent)
        .await;
    let durable = kept
        .map(|()| Durable::Outbox)
        .map_err(|e| RecordError::Outbox(Arc::new(e)));
    answer(batch, durable);
}

/// Answers each click of `batch` with `durable`.
fn answer(batch: Vec<Pending>, durable: Result<Durable, RecordError>) {
    for pending in batch {
        // A request that went away meanwhile has nobody to answer.
        let _ = pending.done.send(durable.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: &str) -> Pending {
        Pending {
            click_id: id.to_owned(),
            payload: id.as_bytes().to_vec(),
            done: oneshot::channel().0,
        }
    }

    /// A click of `bytes` bytes whose request waits (the receiver is kept).
    fn waiting(
        id: &str,
        bytes: usize,
    ) -> (Pending, oneshot::Receiver<Result<Durable, RecordError>>) {
        let (done, answer) = oneshot::channel();
        let click = Pending {
            click_id: id.to_owned(),
            payload: vec![0; bytes],
            done,
        };
        (click, answer)
    }

    fn ids(batch: &[Pending]) -> Vec<&str> {
        batch.iter().map(|p| p.click_id.as_str()).collect()
    }

    #[test]
    fn a_batch_takes_what_waits_up_to_its_limits_and_skips_requests_gone() {
        let (tx, mut queue) = mpsc::channel(16);
        let mut answers = Vec::new();
        let mut click = |id: &str, bytes: usize| {
            let (p, answer) = waiting(id, bytes);
            answers.push(answer);
            p
        };
        let first = click("c1", 10);
        tx.try_send(click("c2", 10)).unwrap();
        tx.try_send(pending("gone")).unwrap();
        tx.try_send(click("c3", 10)).unwrap();
        tx.try_send(click("c4", 10)).unwrap();
        let mut carry = None;
        let batch = take_batch(first, &mut queue, 3, &mut carry);
        assert_eq!(
            ids(&batch),
            ["c1", "c2", "c3"],
            "three at most; a request gone is dropped"
        );
        assert!(carry.is_none());

        let first = queue.try_recv().unwrap();
        tx.try_send(click("big", MAX_BATCH_BYTES)).unwrap();
        tx.try_send(click("c5", 10)).unwrap();
        let batch = take_batch(first, &mut queue, 64, &mut carry);
        assert_eq!(ids(&batch), ["c4"], "the bytes' limit holds");
        let first = carry.take().expect("the next batch starts with it");
        let batch = take_batch(first, &mut queue, 64, &mut carry);
        assert_eq!(ids(&batch), ["big"], "a click over the limit goes alone");
        assert_eq!(carry.as_ref().map(|p| p.click_id.as_str()), Some("c5"));

        let batch = take_batch(pending("gone"), &mut queue, 64, &mut carry);
        assert!(batch.is_empty(), "nothing to send");
        drop(answers);
    }

    #[test]
    fn a_lone_click_is_its_own_message_and_several_are_one_batch() {
        let (subject, msg_id, payload) = message(&mut [pending("c1")]);
        assert_eq!(
            (subject, msg_id.as_str(), &payload[..]),
            (proto::subject::CLICK_RECORDED, "c1", &b"c1"[..])
        );

        let (subject, msg_id, payload) = message(&mut [pending("c1"), pending("c2")]);
        assert_eq!(subject, proto::subject::CLICKS_RECORDED_BATCH);
        assert_eq!(msg_id, "batch/c1", "named after its first click");
        let clicks: Vec<Vec<u8>> = ClicksRecorded::each(subject, &payload)
            .unwrap()
            .into_iter()
            .map(|c| c.into_owned())
            .collect();
        assert_eq!(clicks, [b"c1".to_vec(), b"c2".to_vec()], "in order");
    }

    #[tokio::test]
    async fn a_batch_perhaps_in_the_log_keeps_its_first_clicks_that_fit_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 3).unwrap();
        outbox
            .spool("s", "earlier", b"x", Order::Independent)
            .await
            .unwrap();
        let (batch, answers): (Vec<_>, Vec<_>) = ["c1", "c2", "c3", "c4"]
            .into_iter()
            .map(|id| waiting(id, 8))
            .unzip();
        let full = OutboxError::FullAfterTimeout(1);
        keep_what_fits(&outbox, batch, "batch/c1", full).await;
        let mut got = Vec::new();
        for answer in answers {
            got.push(match answer.await.unwrap() {
                Ok(durable) => format!("{durable:?}"),
                Err(error) => error.to_string(),
            });
        }
        assert_eq!(
            got,
            [
                "Outbox",
                "Outbox",
                "no ack in time, and the outbox holds 1 events, its limit",
                "no ack in time, and the outbox holds 1 events, its limit",
            ]
        );
        assert_eq!(outbox.depth(), 3, "two clicks, in one record, fill it");
    }
}
