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
//! their ack at once, and what arrives meanwhile makes the next batch. A click
//! that finds a slot free goes alone, on `clicks.v1.recorded` as before, so a
//! quiet system's log looks as it did.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::Context;
use common::outbox::{Durable, Order, Outbox, OutboxError};
use prost::Message;
use proto::clicks::v1::ClicksRecorded;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// A batch stops growing past this many bytes of clicks, far below NATS's
/// default max payload (1 MiB) even with one more large click on top.
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
    /// Starts the grouping task (when `settings.max_clicks` > 1). It ends
    /// once every clone of the returned handle is dropped, after the clicks
    /// already handed to it.
    pub fn start(js: Context, outbox: Outbox, settings: Settings) -> Self {
        let queue = (settings.max_clicks > 1).then(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(group(rx, js.clone(), outbox.clone(), settings));
            tx
        });
        Self {
            js,
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
            return self
                .outbox
                .publish_or_spool(
                    &self.js,
                    proto::subject::CLICK_RECORDED,
                    &click_id,
                    payload,
                    self.settings.ack_deadline,
                    Order::Independent,
                )
                .await
                .map_err(|e| RecordError::Outbox(Arc::new(e)));
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
) {
    let slots = Arc::new(Semaphore::new(settings.in_flight.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut bytes = first.payload.len();
        let mut batch = vec![first];
        while batch.len() < settings.max_clicks && bytes < MAX_BATCH_BYTES {
            let Ok(next) = queue.try_recv() else {
                break;
            };
            bytes += next.payload.len();
            batch.push(next);
        }
        let (js, outbox) = (js.clone(), outbox.clone());
        tokio::spawn(async move {
            commit(&js, &outbox, batch, settings.ack_deadline).await;
            drop(slot);
        });
    }
}

/// The subject, `Nats-Msg-Id` and payload of one message carrying `batch`.
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
    let clicks = batch
        .iter_mut()
        .map(|p| std::mem::take(&mut p.payload))
        .collect();
    let payload = ClicksRecorded { clicks }.encode_to_vec();
    (proto::subject::CLICKS_RECORDED_BATCH, msg_id, payload)
}

/// Publishes (or spools) one message and answers each of its clicks.
async fn commit(js: &Context, outbox: &Outbox, mut batch: Vec<Pending>, deadline: Duration) {
    let (subject, msg_id, payload) = message(&mut batch);
    tracing::trace!(clicks = batch.len(), bytes = payload.len(), "click message");
    let durable = outbox
        .publish_or_spool(js, subject, &msg_id, payload, deadline, Order::Independent)
        .await
        .map_err(|e| RecordError::Outbox(Arc::new(e)));
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
}
