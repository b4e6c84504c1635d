//! The ceilings: what this machine can do at most for each step of a click,
//! measured in the same run so our numbers are read against them, not against
//! a number from another machine.
//!
//! 1. [`serve`] `bare`: an axum handler answering 302, nothing else;
//! 2. [`serve`] `ack`: the same handler awaiting the JetStream ack (with
//!    `Nats-Msg-Id`) of an event the size of a `ClickRecorded`, on a stream
//!    configured like `CLICKS`; with `readers`, that many ordered consumers
//!    follow the stream meanwhile, as the two services' clicks folds do;
//! 3. [`publish`]: pipelined JetStream publishes of that event, no HTTP;
//! 4. [`sled`]: sled batched inserts of projection-sized rows, not flushed per
//!    batch, as the folds commit their groups (sled writes its log in the
//!    background every 500 ms; the folds flush only when they stop).

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::Context;
use axum::{
    extract::{Path as UrlPath, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prost::Message;

use crate::{
    error::{io, BenchError},
    events,
    nats::{self, Pipeline, BENCH_SUBJECT},
    procfs::{CpuWatch, Watched},
    results::Measurement,
    stats::{histogram, record, Latency},
};

/// Which ceiling server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeMode {
    /// 302 at once.
    Bare,
    /// 302 after the JetStream ack of a click-sized event.
    Ack,
}

#[derive(Clone)]
struct AckState {
    js: Context,
}

async fn bare(UrlPath(offer_id): UrlPath<String>) -> Response {
    let click_id = events::click_id();
    redirect(&format!(
        "https://shop.example/land?cid={click_id}&o={offer_id}"
    ))
}

async fn ack(State(state): State<Arc<AckState>>, UrlPath(offer_id): UrlPath<String>) -> Response {
    let click_id = events::click_id();
    let event = events::click(&click_id, &offer_id, "bench-aff", common::time::now_ms());
    let published = common::nats::publish(
        &state.js,
        BENCH_SUBJECT.to_owned(),
        &click_id,
        event.encode_to_vec().into(),
        Duration::from_secs(2),
    )
    .await;
    match published {
        Ok(_) => redirect(&event.redirect_url),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

fn redirect(location: &str) -> Response {
    match HeaderValue::try_from(location) {
        Ok(location) => (
            StatusCode::FOUND,
            [
                (header::LOCATION, location),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serves `GET /c/{offer_id}` as a ceiling until SIGTERM/ctrl-c or `lifetime`.
///
/// # Errors
/// The address is taken, or (ack) NATS is not there.
pub async fn serve(
    mode: ServeMode,
    listen: SocketAddr,
    nats_url: &str,
    lifetime: Duration,
    readers: usize,
    reader_poll: Duration,
) -> Result<(), BenchError> {
    let router = match mode {
        ServeMode::Bare => Router::new().route("/c/{offer_id}", get(bare)),
        ServeMode::Ack => {
            let (_client, js) = nats::connect(nats_url).await?;
            nats::reset_bench_stream(&js).await?;
            // Each reader on its own connection, as each service's fold has.
            for reader in 0..readers {
                let (_client, js) = nats::connect(nats_url).await?;
                if reader_poll.is_zero() {
                    nats::follow_bench_stream(&js, reader).await?;
                } else {
                    nats::poll_bench_stream(&js, reader, reader_poll).await?;
                }
            }
            Router::new()
                .route("/c/{offer_id}", get(ack))
                .with_state(Arc::new(AckState { js }))
        }
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(io(format!("binding {listen}")))?;
    eprintln!("[serve {mode:?}] listening on {listen}");
    let stop = async move {
        tokio::select! {
            () = common::shutdown::signal() => {}
            () = tokio::time::sleep(lifetime) => {}
        }
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
        .map_err(io("serving"))
}

/// Ceiling 3: pipelined publishes of click-sized events with `Nats-Msg-Id` to a
/// fresh `BENCH` stream, for `warmup + duration`.
///
/// # Errors
/// NATS is not there or refuses the stream.
pub async fn publish(
    nats_url: &str,
    warmup: Duration,
    duration: Duration,
    window: usize,
    watched: &[Watched],
) -> Result<Measurement, BenchError> {
    let (_client, js) = nats::connect(nats_url).await?;
    nats::reset_bench_stream(&js).await?;
    let label = "ceiling-publish";
    let mut pipeline = Pipeline::new(window);
    let started = Instant::now();
    let measure_from = started + warmup;
    let deadline = measure_from + duration;
    let mut measured_at: Option<(Instant, u64, u64, CpuWatch)> = None;
    let mut ticker = crate::ticker::Ticker::from(started);
    let mut last = 0;
    while Instant::now() < deadline {
        if measured_at.is_none() && Instant::now() >= measure_from {
            pipeline.ack_latency.reset();
            measured_at = Some((
                Instant::now(),
                pipeline.acked,
                pipeline.errors,
                CpuWatch::start(watched),
            ));
        }
        // A batch between clock checks keeps the loop cheap.
        for _ in 0..64 {
            let click_id = events::click_id();
            let event = events::click(&click_id, "bench", "bench-aff", common::time::now_ms());
            pipeline
                .send(&js, BENCH_SUBJECT, &click_id, event.encode_to_vec().into())
                .await?;
        }
        if let Some(at) = ticker.due() {
            eprintln!(
                "[{label}] {:>5.1}s {:>8} acked/s  errors {}",
                at.as_secs_f64(),
                pipeline.acked - last,
                pipeline.errors
            );
            last = pipeline.acked;
        }
    }
    let (from, acked_before, errors_before, cpu) = match measured_at {
        Some(m) => m,
        None => (
            Instant::now(),
            pipeline.acked,
            pipeline.errors,
            CpuWatch::start(watched),
        ),
    };
    // Acks of the window's publishes that arrive just after it still count:
    // they were sent inside it.
    pipeline.finish().await;
    let seconds = from.elapsed().as_secs_f64();
    let mut m = Measurement::new(
        "ceiling_publish",
        "Ceiling 3: pipelined JetStream publishes of a ClickRecorded-sized event (Nats-Msg-Id, stream like CLICKS), no HTTP",
        "msg/s",
    )
    .with_rate(pipeline.acked - acked_before, seconds)
    .extra("window", window as u64)
    .extra("payload_bytes", click_payload_len() as u64);
    m.errors = pipeline.errors - errors_before;
    m.latency = Latency::of(&pipeline.ack_latency);
    m.set_cpu(cpu.stop());
    Ok(m)
}

fn click_payload_len() -> usize {
    events::click(&events::click_id(), "bench", "bench-aff", 1).encoded_len()
}

/// Ceiling 4: sled batches of `batch` click rows (key `c/<uuid>`, the event
/// bytes as value) plus two counter rows and the checkpoint, each batch
/// applied, as the clicks fold writes them (no flush per group), for
/// `warmup + duration`.
///
/// # Errors
/// sled failed.
pub async fn sled(
    dir: &Path,
    warmup: Duration,
    duration: Duration,
    batch: usize,
    watched: &[Watched],
) -> Result<Measurement, BenchError> {
    let _ = std::fs::remove_dir_all(dir);
    let db = common::store::open_db(dir)?;
    let tree = db.open_tree("clicks")?;
    let label = "ceiling-sled";
    let started = Instant::now();
    let measure_from = started + warmup;
    let deadline = measure_from + duration;
    let mut rows: u64 = 0;
    let mut batches = histogram();
    let mut measured_at: Option<(Instant, u64, CpuWatch)> = None;
    let mut ticker = crate::ticker::Ticker::from(started);
    let mut last = 0;
    let now_ms = common::time::now_ms();
    while Instant::now() < deadline {
        if measured_at.is_none() && Instant::now() >= measure_from {
            batches.reset();
            measured_at = Some((Instant::now(), rows, CpuWatch::start(watched)));
        }
        let t0 = Instant::now();
        let mut b = sled::Batch::default();
        for _ in 0..batch {
            let click_id = events::click_id();
            let event = events::click(&click_id, "bench", "bench-aff", now_ms);
            b.insert(
                postback_service::clicks::click_key(&click_id),
                postback_service::clicks::click_row(&event.encode_to_vec(), true),
            );
        }
        rows += batch as u64;
        b.insert(&b"n/o/bench"[..], rows.to_be_bytes().to_vec());
        b.insert(&b"n/a/bench-aff"[..], rows.to_be_bytes().to_vec());
        b.insert(common::store::CHECKPOINT_KEY, rows.to_be_bytes().to_vec());
        tree.apply_batch(b)?;
        record(&mut batches, t0.elapsed());
        if let Some(at) = ticker.due() {
            eprintln!(
                "[{label}] {:>5.1}s {:>8} rows/s",
                at.as_secs_f64(),
                rows - last
            );
            last = rows;
        }
    }
    let (from, rows_before, cpu) =
        measured_at.unwrap_or_else(|| (Instant::now(), rows, CpuWatch::start(watched)));
    let seconds = from.elapsed().as_secs_f64();
    let mut m = Measurement::new(
        "ceiling_sled",
        "Ceiling 4: sled batched inserts of click rows (+ counters, checkpoint), flushed in the background as the folds are",
        "rows/s",
    )
    .with_rate(rows - rows_before, seconds)
    .extra("batch", batch as u64)
    .extra("row_bytes", click_payload_len() as u64);
    m.latency = Latency::of(&batches);
    m.set_cpu(cpu.stop());
    m.extra
        .insert("latency_is".to_owned(), "per batch (apply)".into());
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    Ok(m)
}
