//! `loadgen postbacks`: advertiser postbacks over HTTP.
//!
//! A pool of clicks is published first (and folded), so every postback names a
//! real click; request `i` reports click `i mod pool` with its own txid, so every
//! request is a new conversion and must be made durable (no "already in the log"
//! shortcut). Afterwards it waits until the decider has decided them all.
//!
//! With `--e2e` (open loop), it then reads the decisions from the CONVERSIONS
//! stream and measures, per conversion, from the time its postback was *due* to
//! the time JetStream stored its decision.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, UNIX_EPOCH},
};

use async_nats::jetstream::{consumer, Context};
use futures::StreamExt;
use http::{HeaderValue, StatusCode};
use postback_service::conversions::Decision;

use crate::{
    cli::PostbacksArgs,
    error::{BenchError, BoxError, Context as _},
    events,
    http::{bearer, fetch_json, Req, Target},
    load::{self, LoadOutcome, Mode, Plan},
    nats,
    results::{self, Measurement},
    service,
    stats::{histogram, Latency},
};

struct Postbacks {
    target: Target,
    clicks: Arc<Vec<String>>,
    run: String,
}

impl Postbacks {
    fn click(&self, i: u64) -> &str {
        &self.clicks[(i % self.clicks.len() as u64) as usize]
    }

    fn txid(&self, i: u64) -> String {
        format!("{}-{i}", self.run)
    }

    fn path(&self, i: u64) -> String {
        format!(
            "/postback?click_id={}&txid={}&amount=12.50",
            self.click(i),
            self.txid(i)
        )
    }

    fn conversion_id(&self, i: u64) -> String {
        postback_service::postback::conversion_id(self.click(i), "", &self.txid(i))
    }
}

impl Plan for Postbacks {
    fn request(&self, i: u64) -> Result<Req, BoxError> {
        self.target.get(&self.path(i), None)
    }

    fn expected(&self) -> StatusCode {
        StatusCode::OK
    }
}

#[derive(serde::Deserialize)]
struct Accepted {
    conversion_id: String,
}

/// Runs the scenario and appends its measurements.
///
/// # Errors
/// Set-up failed (NATS, the pool, the service), or the decisions did not come.
pub async fn run(args: PostbacksArgs, id: &str) -> Result<(), BenchError> {
    let target = Target::new(&args.system.postback)?;
    let token = bearer(&args.system.admin_token)?;
    let (_client, js) = nats::connect(&args.system.nats_url).await?;
    let mode = super::mode(&args.load, &args.out.results)?;
    if args.e2e && mode == Mode::Closed {
        return Err(BenchError::Usage(
            "--e2e needs --rate or --rate-from".into(),
        ));
    }
    service::settle(&target, &token, &js, args.settle_timeout).await?;

    let clicks: Arc<Vec<String>> =
        Arc::new((0..args.pool.max(1)).map(|_| events::click_id()).collect());
    let pool = clicks.clone();
    super::seed_clicks(
        &js,
        &target,
        &format!("{id}: seed clicks"),
        pool.len() as u64,
        |i| pool[i as usize].clone(),
        std::slice::from_ref(&args.offer),
        std::slice::from_ref(&args.affiliate),
        args.settle_timeout,
    )
    .await?;
    let plan = Postbacks {
        target: target.clone(),
        clicks,
        run: uuid::Uuid::now_v7().simple().to_string()[20..].to_owned(),
    };
    check_conversion_ids(&plan).await?;
    let first_seq = nats::stream_state(&js, proto::stream::CONVERSIONS).await?.1 + 1;

    let mut config = super::load_config(id, target.clone(), mode, &args.load, &args.out.watch);
    config.keep_ok = args.e2e;
    let plan = Arc::new(plan);
    let outcome = load::run(config, SharedPlan(plan.clone())).await;
    let settled = service::settle(&target, &token, &js, args.settle_timeout).await?;

    let http_title = if args.e2e {
        "Advertiser postbacks, open loop (HTTP accept latency)"
    } else {
        "Advertiser postbacks accepted/s (HTTP, durable), closed loop"
    };
    let http_id = if args.e2e {
        format!("{id}_http")
    } else {
        id.to_owned()
    };
    let m = super::measurement(&http_id, http_title, &outcome, mode, args.load.connections)
        .extra("click_pool", args.pool as u64)
        .extra("decider_backlog_drained_s", round1(settled.as_secs_f64()));
    results::append(&args.out.results, &m)?;

    if let Mode::Open { rate } = mode {
        if args.e2e {
            let m = decision_latency(&js, &plan, &outcome, rate, first_seq, id).await?;
            results::append(&args.out.results, &m)?;
        }
    }
    Ok(())
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The plan behind an `Arc`, so the scenario keeps it after the load.
struct SharedPlan(Arc<Postbacks>);

impl Plan for SharedPlan {
    fn request(&self, i: u64) -> Result<Req, BoxError> {
        self.0.request(i)
    }

    fn expected(&self) -> StatusCode {
        self.0.expected()
    }
}

/// One postback by hand: the service must name the conversion as we compute it,
/// or the end-to-end matching below would find nothing.
async fn check_conversion_ids(plan: &Postbacks) -> Result<(), BenchError> {
    let i = u64::MAX;
    let (status, answer) =
        fetch_json::<Accepted>(&plan.target, &plan.path(i), None::<&HeaderValue>).await?;
    if status != StatusCode::OK || answer.conversion_id != plan.conversion_id(i) {
        return Err(BenchError::Usage(format!(
            "postback-service answered {status} with conversion id {}; expected {}",
            answer.conversion_id,
            plan.conversion_id(i)
        )));
    }
    Ok(())
}

/// Reads the decisions stored since `first_seq` and measures, for each measured
/// postback answered 200, due time → decision stored.
async fn decision_latency(
    js: &Context,
    plan: &Postbacks,
    outcome: &LoadOutcome,
    rate: f64,
    first_seq: u64,
    id: &str,
) -> Result<Measurement, BenchError> {
    let start_ns = outcome
        .start_wall
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let mut due: HashMap<String, i128> = outcome
        .ok_requests
        .iter()
        .filter(|&&i| i >= outcome.first_measured)
        .map(|&i| {
            let at = start_ns + (i as f64 / rate * 1e9) as i128;
            (plan.conversion_id(i), at)
        })
        .collect();
    let expected = due.len() as u64;
    let stream = js
        .get_stream(proto::stream::CONVERSIONS)
        .await
        .nats("stream CONVERSIONS")?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: first_seq,
            },
            ..Default::default()
        })
        .await
        .nats("reading CONVERSIONS")?;
    let mut messages = consumer.messages().await.nats("reading CONVERSIONS")?;
    let mut h = histogram();
    let until = Instant::now() + Duration::from_secs(60);
    while !due.is_empty() && Instant::now() < until {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let Ok(Some(Ok(msg))) = next else { break };
        // Alone or in a batch (`conversions.v1.decided_batch`): each
        // decision is stored when its message is.
        let Ok(info) = msg.info() else { continue };
        let stored_ns = info.published.unix_timestamp_nanos();
        for decision in Decision::all_in(&msg.subject, &msg.payload) {
            if decision.reported_seq().is_none() {
                continue; // a status decision
            }
            let Some(at) = due.remove(decision.conversion_id()) else {
                continue;
            };
            let us = ((stored_ns - at) / 1000).max(1);
            crate::stats::record(&mut h, Duration::from_micros(us as u64));
        }
    }
    let mut m = Measurement::new(
        id,
        "End to end: postback due → decision event stored in the log, open loop",
        "decisions/s",
    )
    .with_rate(h.len(), outcome.seconds)
    .extra("loop", "open")
    .extra("offered_rate", rate)
    .extra("postbacks_accepted", outcome.ok)
    .extra("postback_errors", outcome.errors);
    m.latency = Latency::of(&h);
    // The latencies are of the postbacks that were accepted: one that was not
    // (no answer, another status) is a failure of the row too, or a service
    // dropping postbacks would pass on its survivors' latency.
    let undecided = expected - h.len();
    m.errors = undecided + outcome.errors;
    m.unexpected.clone_from(&outcome.unexpected);
    m.set_cpu(outcome.cpu.clone());
    if undecided > 0 {
        eprintln!("[{id}] {undecided} accepted postbacks without a decision found");
    }
    if outcome.errors > 0 || !outcome.unexpected.is_empty() {
        eprintln!(
            "[{id}] postbacks not accepted: {} without an answer, {:?} by status",
            outcome.errors, outcome.unexpected
        );
    }
    Ok(m)
}
