//! NATS for the benchmarks: connecting, the scratch `BENCH` stream the ceilings
//! write to (configured like `CLICKS`), pipelined publishing, and counting what a
//! stream holds.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, context::PublishAckFuture, Context};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;

use crate::{
    error::{BenchError, Context as _},
    stats::{histogram, record},
};

/// The ceilings' stream: same storage, limits and duplicate window as `CLICKS`,
/// so a ceiling publish costs the server what a click publish costs.
pub const BENCH_STREAM: &str = "BENCH";
/// The subject the ceilings publish to.
pub const BENCH_SUBJECT: &str = "bench.v1.clicks";

/// Connects to NATS and returns the client and its JetStream context.
///
/// # Errors
/// No server at `url`.
pub async fn connect(url: &str) -> Result<(async_nats::Client, Context), BenchError> {
    let client = async_nats::ConnectOptions::new()
        .name("loadgen")
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .nats(format!("connecting to {url}"))?;
    let js = jetstream::new(client.clone());
    Ok((client, js))
}

/// Deletes and recreates `BENCH`, so each ceiling starts on an empty stream.
///
/// # Errors
/// JetStream refused.
pub async fn reset_bench_stream(js: &Context) -> Result<(), BenchError> {
    let mut config = common::nats::stream_configs()
        .into_iter()
        .find(|c| c.name == proto::stream::CLICKS)
        .ok_or_else(|| BenchError::Usage("no CLICKS stream configuration".into()))?;
    config.name = BENCH_STREAM.to_owned();
    config.subjects = vec!["bench.>".to_owned()];
    config.description = Some("loadgen ceilings (scratch)".to_owned());
    let _ = js.delete_stream(BENCH_STREAM).await;
    js.create_stream(config)
        .await
        .nats("creating the BENCH stream")?;
    Ok(())
}

/// Follows `BENCH` from its start with an ordered pull consumer, as a fold
/// follows its stream, and discards what it reads; `reader` tells several apart.
///
/// # Errors
/// JetStream refused the consumer.
pub async fn follow_bench_stream(js: &Context, reader: usize) -> Result<(), BenchError> {
    let stream = js.get_stream(BENCH_STREAM).await.nats("the BENCH stream")?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            name: Some(format!("bench-reader-{reader}")),
            ..Default::default()
        })
        .await
        .nats("a BENCH reader")?;
    let messages = consumer
        .messages()
        .await
        .nats("a BENCH reader's messages")?;
    tokio::spawn(messages.for_each(|_| async {}));
    Ok(())
}

/// Reads `BENCH` from its start by polling: every `every`, a no-wait fetch
/// of what the stream holds past the reader's position (a pull consumer that
/// needs no acks), discarded; `reader` tells several apart.
///
/// # Errors
/// JetStream refused the consumer.
pub async fn poll_bench_stream(
    js: &Context,
    reader: usize,
    every: Duration,
) -> Result<(), BenchError> {
    let stream = js.get_stream(BENCH_STREAM).await.nats("the BENCH stream")?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            name: Some(format!("bench-poller-{reader}")),
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .nats("a BENCH poller")?;
    tokio::spawn(async move {
        loop {
            if let Ok(mut batch) = consumer.fetch().max_messages(100_000).messages().await {
                while let Some(Ok(_)) = batch.next().await {}
            }
            tokio::time::sleep(every).await;
        }
    });
    Ok(())
}

/// Messages and last sequence of a stream.
///
/// # Errors
/// No such stream.
pub async fn stream_state(js: &Context, stream: &str) -> Result<(u64, u64), BenchError> {
    let mut s = js
        .get_stream(stream)
        .await
        .nats(format!("stream {stream}"))?;
    let info = s.info().await.nats(format!("stream {stream} info"))?;
    Ok((info.state.messages, info.state.last_sequence))
}

/// Message count per subject of a stream, for the subjects matching `filter`.
///
/// # Errors
/// No such stream.
pub async fn subject_counts(
    js: &Context,
    stream: &str,
    filter: &str,
) -> Result<BTreeMap<String, u64>, BenchError> {
    let s = js
        .get_stream(stream)
        .await
        .nats(format!("stream {stream}"))?;
    let counts = s
        .info_with_subjects(filter)
        .await
        .nats(format!("stream {stream} subjects"))?;
    let counts: Vec<(String, usize)> = counts
        .try_collect()
        .await
        .nats(format!("stream {stream} subjects"))?;
    Ok(counts.into_iter().map(|(s, n)| (s, n as u64)).collect())
}

/// Publishes with many acks outstanding: each send waits only when `window`
/// acks are pending, for the oldest one.
pub struct Pipeline {
    window: usize,
    pending: VecDeque<(Instant, PublishAckFuture)>,
    /// Acked publishes.
    pub acked: u64,
    /// Publishes that were sent but not acked (or refused).
    pub errors: u64,
    /// Highest stream sequence acked.
    pub last_seq: u64,
    /// Send-to-ack latency of each acked publish (µs).
    pub ack_latency: Histogram<u64>,
}

impl Pipeline {
    /// At most `window` acks outstanding.
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            pending: VecDeque::new(),
            acked: 0,
            errors: 0,
            last_seq: 0,
            ack_latency: histogram(),
        }
    }

    /// Sends one message with `Nats-Msg-Id`; waits for the oldest ack first when
    /// the window is full.
    ///
    /// # Errors
    /// The client could not send at all (not a missing ack: that is counted).
    pub async fn send(
        &mut self,
        js: &Context,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<(), BenchError> {
        while self.pending.len() >= self.window {
            self.settle_one().await;
        }
        let sent = Instant::now();
        let ack = common::nats::send(js, subject.to_owned(), msg_id, payload)
            .await
            .nats(format!("publishing to {subject}"))?;
        self.pending.push_back((sent, ack));
        Ok(())
    }

    async fn settle_one(&mut self) {
        let Some((sent, ack)) = self.pending.pop_front() else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(10), ack).await {
            Ok(Ok(ack)) => {
                self.acked += 1;
                self.last_seq = self.last_seq.max(ack.sequence);
                record(&mut self.ack_latency, sent.elapsed());
            }
            _ => self.errors += 1,
        }
    }

    /// Waits for every outstanding ack.
    pub async fn finish(&mut self) {
        while !self.pending.is_empty() {
            self.settle_one().await;
        }
    }
}

/// Publishes `count` messages made by `make(i) -> (subject, msg_id, payload)`,
/// pipelined, with a progress line per second; returns the highest sequence.
///
/// # Errors
/// A send failed, or some publishes were not acked.
pub async fn publish_many(
    js: &Context,
    label: &str,
    count: u64,
    mut make: impl FnMut(u64) -> (&'static str, String, Bytes),
) -> Result<u64, BenchError> {
    let mut pipeline = Pipeline::new(4096);
    let started = Instant::now();
    let mut ticker = crate::ticker::Ticker::from(started);
    let mut last = 0;
    for i in 0..count {
        let (subject, msg_id, payload) = make(i);
        pipeline.send(js, subject, &msg_id, payload).await?;
        if let Some(at) = ticker.due() {
            eprintln!(
                "[{label}] {:>5.1}s {:>8} published/s  ({} of {count})",
                at.as_secs_f64(),
                pipeline.acked - last,
                pipeline.acked
            );
            last = pipeline.acked;
        }
    }
    pipeline.finish().await;
    if pipeline.errors > 0 {
        return Err(BenchError::Usage(format!(
            "{label}: {} of {count} publishes were not acknowledged",
            pipeline.errors
        )));
    }
    eprintln!(
        "[{label}] {count} published in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(pipeline.last_seq)
}
