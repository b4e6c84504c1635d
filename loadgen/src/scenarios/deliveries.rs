//! `loadgen deliveries`: affiliate postbacks delivered per second to a fast local
//! receiver (run by this command, answering 200 at once).
//!
//! Clicks for the receiver's affiliate are published and folded, then one
//! conversion per click is reported on NATS. Each is attributed, and the
//! dispatcher sends one affiliate postback per attribution. Two rates:
//!
//! - `deliveries` (the scenario's row): the dispatcher's own rate, counted from
//!   the moment the log holds every decision (the conversions are decided, as
//!   the decisions row's clicks are folded) to the moment it holds every
//!   `postbacks.v1.delivered`, over the deliveries still to make then;
//! - `deliveries_pipeline`: from the first request the receiver sees to the last
//!   delivery, which also pays for folding and deciding the reports still being
//!   decided meanwhile (the decisions row measures that part on its own).
//!
//! The receiver also checks that no delivery came twice.

use std::time::{Duration, Instant};

use prost::Message;

use crate::{
    cli::DeliveriesArgs,
    error::BenchError,
    events,
    http::{bearer, Target},
    nats,
    procfs::CpuWatch,
    receiver::Receiver,
    results::{self, Measurement},
    service,
};

async fn delivered(js: &async_nats::jetstream::Context) -> Result<(u64, u64), BenchError> {
    let counts = nats::subject_counts(js, proto::stream::POSTBACKS, "postbacks.v1.*").await?;
    let of = |s: &str| counts.get(s).copied().unwrap_or(0);
    Ok((
        of(proto::subject::POSTBACK_DELIVERED),
        of(proto::subject::POSTBACK_FAILED),
    ))
}

/// Runs the scenario and appends its measurement.
///
/// # Errors
/// Set-up failed, or not every delivery was recorded within `--timeout`.
pub async fn run(args: DeliveriesArgs, id: &str) -> Result<(), BenchError> {
    let target = Target::new(&args.system.postback)?;
    let token = bearer(&args.system.admin_token)?;
    let (_client, js) = nats::connect(&args.system.nats_url).await?;
    let receiver = Receiver::start(args.receiver).await?;
    service::settle(&target, &token, &js, args.timeout).await?;

    let count = args.count.max(1);
    let ids: Vec<String> = (0..count).map(|_| events::click_id()).collect();
    super::seed_clicks(
        &js,
        &target,
        &format!("{id}: seed clicks"),
        count,
        |i| ids[i as usize].clone(),
        std::slice::from_ref(&args.offer),
        std::slice::from_ref(&args.affiliate),
        args.timeout,
    )
    .await?;
    let (base_delivered, base_failed) = delivered(&js).await?;
    let base_decided = service::decided(&target, &token).await?;
    let base_requests = receiver.counts().requests;

    let run = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let cpu = CpuWatch::start(&args.out.watch);
    let started = Instant::now();
    let now = common::time::now_ms();
    nats::publish_many(&js, &format!("{id}: report"), count, |i| {
        let e = events::conversion(&ids[i as usize], &format!("{run}-{i}"), now);
        let msg_id = e.conversion_id.clone();
        (
            proto::subject::CONVERSION_REPORTED,
            msg_id,
            e.encode_to_vec().into(),
        )
    })
    .await?;
    let mut ticker = crate::ticker::Ticker::from(started);
    let mut last = 0;
    let mut stall = service::Stall::new(service::stall_limit());
    // When every decision was in the log and folded (the report API counts
    // decisions, which go to the log in batches), and how many deliveries had
    // been recorded then.
    let mut all_decided: Option<(Instant, u64)> = None;
    let (done, failed) = loop {
        let (d, f) = delivered(&js).await?;
        let (d, f) = (d - base_delivered, f - base_failed);
        if all_decided.is_none() && service::decided(&target, &token).await? - base_decided >= count
        {
            all_decided = Some((Instant::now(), d));
        }
        if d + f >= count {
            break (Instant::now(), f);
        }
        let what = format!("{id}: {d} of {count} delivered, {f} failed");
        stall.check(d + f, &target, &what).await?;
        if started.elapsed() > args.timeout {
            return Err(BenchError::Timeout {
                what: format!("{id}: {d} of {count} delivered, {f} failed"),
                after: args.timeout,
            });
        }
        if let Some(at) = ticker.due() {
            eprintln!(
                "[{id}] {:>5.1}s {:>8} delivered/s  ({d} of {count}, {f} failed, receiver saw {})",
                at.as_secs_f64(),
                d - last,
                receiver.counts().requests - base_requests
            );
            last = d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu = cpu.stop();
    let seen = receiver.counts();
    let first = seen.first.unwrap_or(started).max(started);
    let landed = count - failed;
    let mut pipeline = Measurement::new(
        &format!("{id}_pipeline"),
        "Affiliate postbacks delivered/s while their reports are still being folded and decided (first request → last delivery recorded)",
        "deliveries/s",
    )
    .with_rate(landed, done.duration_since(first).as_secs_f64())
    .extra(
        "from_first_report_per_s",
        (landed as f64 / done.duration_since(started).as_secs_f64()).round(),
    );
    pipeline.errors = failed;
    // Every delivery needs its decision in the log first, so `all_decided` is
    // set by the time every delivery is recorded. If the dispatcher kept up with
    // the decisions, too few deliveries are left to time it alone: the pipeline's
    // rate (a lower bound of the dispatcher's) is the row's then.
    let (decided_at, recorded_then, window) = match all_decided {
        Some((at, then)) if landed.saturating_sub(then) >= count / 10 => {
            (at, then, "every decision in the log")
        }
        _ => (
            first,
            0,
            "first request (the dispatcher kept up with the decisions)",
        ),
    };
    let mut m = Measurement::new(
        id,
        "Affiliate postbacks delivered/s to a fast local receiver, conversions decided (every decision in the log → last delivery recorded)",
        "deliveries/s",
    )
    .with_rate(
        landed.saturating_sub(recorded_then),
        done.duration_since(decided_at).as_secs_f64(),
    )
    .extra("timed_from", window)
    .extra("recorded_before_timing", recorded_then)
    .extra("receiver_requests", seen.requests - base_requests)
    .extra("duplicate_deliveries", seen.duplicates);
    m.errors = failed;
    m.set_cpu(cpu);
    results::append(&args.out.results, &pipeline)?;
    results::append(&args.out.results, &m)
}
