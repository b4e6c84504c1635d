//! `loadgen decisions`: how fast reported conversions are folded and decided.
//!
//! Clicks are published first (topping CLICKS up to `--clicks-total`, spread over
//! the offers and affiliates given) and folded by postback-service. Then the
//! conversions are published to `conversions.v1.reported` as a partner would,
//! pipelined, and the clock runs from the first publish until the report API
//! counts every one of them decided, i.e. the decision is in the log *and* folded
//! back into the projection.

use std::time::{Duration, Instant};

use prost::Message;

use crate::{
    cli::DecisionsArgs,
    error::BenchError,
    events,
    http::{bearer, Target},
    nats,
    procfs::CpuWatch,
    results::{self, Measurement},
    service,
};

/// Runs the scenario and appends its measurement.
///
/// # Errors
/// Set-up failed, or the decisions did not all come within `--timeout`.
pub async fn run(args: DecisionsArgs, id: &str) -> Result<(), BenchError> {
    let target = Target::new(&args.system.postback)?;
    let token = bearer(&args.system.admin_token)?;
    let (_client, js) = nats::connect(&args.system.nats_url).await?;
    service::settle(&target, &token, &js, args.timeout).await?;

    // Clicks, not CLICKS messages: a batch carries many.
    let (_, last_click) = nats::stream_state(&js, proto::stream::CLICKS).await?;
    service::wait_applied(&target, proto::stream::CLICKS, last_click, args.timeout).await?;
    let clicks_now = service::clicks(&target, &token).await?;
    let reported_now = service::reported(&js).await?;
    let count = args
        .count
        .max(args.reports_total.saturating_sub(reported_now))
        .max(1);
    let seed = count.max(args.clicks_total.saturating_sub(clicks_now));
    // The conversions go to the first `count` clicks seeded.
    let ids: Vec<String> = (0..count).map(|_| events::click_id()).collect();
    super::seed_clicks(
        &js,
        &target,
        &format!("{id}: seed clicks"),
        seed,
        |i| {
            ids.get(i as usize)
                .cloned()
                .unwrap_or_else(events::click_id)
        },
        &args.offers,
        &args.affiliates,
        args.timeout,
    )
    .await?;

    let baseline = service::decided(&target, &token).await?;
    let run = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    eprintln!("[{id}] publishing {count} ConversionReported for folded clicks");
    let cpu = CpuWatch::start(&args.out.watch);
    let started = Instant::now();
    let publisher = {
        let js = js.clone();
        let label = format!("{id}: report");
        tokio::spawn(async move {
            let now = common::time::now_ms();
            let result = nats::publish_many(&js, &label, count, |i| {
                let e = events::conversion(&ids[i as usize], &format!("{run}-{i}"), now);
                let msg_id = e.conversion_id.clone();
                (
                    proto::subject::CONVERSION_REPORTED,
                    msg_id,
                    e.encode_to_vec().into(),
                )
            })
            .await;
            (result, started.elapsed())
        })
    };
    let mut ticker = crate::ticker::Ticker::from(started);
    let mut last = 0;
    let mut stall = service::Stall::new(service::stall_limit());
    let done = loop {
        let decided = service::decided(&target, &token)
            .await?
            .saturating_sub(baseline);
        if decided >= count {
            break started.elapsed();
        }
        stall.check(decided, &target, id).await?;
        if started.elapsed() > args.timeout {
            return Err(BenchError::Timeout {
                what: format!("{id}: {decided} of {count} decided"),
                after: args.timeout,
            });
        }
        if let Some(at) = ticker.due() {
            eprintln!(
                "[{id}] {:>5.1}s {:>8} decided/s  ({decided} of {count})",
                at.as_secs_f64(),
                decided - last
            );
            last = decided;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu = cpu.stop();
    let (published, publish_time) = publisher
        .await
        .map_err(|e| BenchError::Usage(format!("the publisher failed: {e}")))?;
    published?;
    let mut m = Measurement::new(
        id,
        "Decisions/s: conversions reported on NATS for clicks already folded, until decided and folded back",
        "decisions/s",
    )
    .with_rate(count, done.as_secs_f64())
    .extra("conversions", count)
    .extra("clicks_in_log", clicks_now + seed)
    .extra(
        "reports_published_per_s",
        (count as f64 / publish_time.as_secs_f64().max(1e-3)).round(),
    );
    m.set_cpu(cpu);
    results::append(&args.out.results, &m)
}
