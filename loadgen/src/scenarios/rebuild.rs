//! `loadgen rebuild-wait`: a postback-service was just started on an empty data
//! dir; time it until `/readyz` is 200 and every fold has applied its stream's
//! last sequence, and state its peak memory and the projection's size on disk.

use std::time::{Duration, Instant};

use crate::{
    cli::RebuildArgs,
    error::BenchError,
    http::{bearer, Target},
    nats,
    procfs::{self, CpuWatch},
    results::{self, Measurement},
    service,
};

const STREAMS: [&str; 4] = [
    proto::stream::CATALOG,
    proto::stream::CLICKS,
    proto::stream::CONVERSIONS,
    proto::stream::POSTBACKS,
];

/// Waits for the rebuild and appends its measurement.
///
/// # Errors
/// Not rebuilt within `--timeout`, or the process went away.
pub async fn run(args: RebuildArgs, id: &str) -> Result<(), BenchError> {
    let target = Target::new(&args.system.postback)?;
    let (_client, js) = nats::connect(&args.system.nats_url).await?;
    let mut goal = Vec::new();
    let mut events = 0;
    // A CLICKS message may carry many clicks (`clicks.v1.recorded_batch`),
    // and a CONVERSIONS message many decisions (`conversions.v1.decided_batch`):
    // they are counted once the rebuilt projection has them, and every click,
    // report and decision is an event, as a lone one's message is.
    let (mut click_messages, mut conversion_messages) = (0, 0);
    for stream in STREAMS {
        let (messages, last) = nats::stream_state(&js, stream).await?;
        goal.push((stream, last));
        events += messages;
        if stream == proto::stream::CLICKS {
            click_messages = messages;
        }
        if stream == proto::stream::CONVERSIONS {
            conversion_messages = messages;
        }
    }
    let reported = service::reported(&js).await?;
    let cpu = CpuWatch::start(&args.out.watch);
    let started = Instant::now();
    let mut ticker = crate::ticker::Ticker::from(started);
    let mut last_applied = 0;
    let mut stall = service::Stall::new(service::stall_limit());
    loop {
        if procfs::memory(args.pid).is_none() {
            return Err(BenchError::Usage(format!(
                "postback-service (pid {}) exited during the rebuild",
                args.pid
            )));
        }
        let mut applied = 0;
        if let Ok(ready) = service::readyz(&target).await {
            applied = STREAMS.iter().map(|s| ready.applied(s)).sum();
            let done = goal.iter().all(|(s, last)| ready.applied(s) >= *last);
            if ready.ready && done {
                break;
            }
            if let Some(at) = ticker.due() {
                eprintln!(
                    "[{id}] {:>5.1}s {:>8} events/s  ({applied} of {events} applied)",
                    at.as_secs_f64(),
                    applied - last_applied
                );
                last_applied = applied;
            }
        }
        stall
            .check(
                applied,
                &target,
                &format!("{id}: {applied} of {events} applied"),
            )
            .await?;
        if started.elapsed() > args.timeout {
            return Err(BenchError::Timeout {
                what: format!("{id}: rebuilding the projection"),
                after: args.timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ms = (common::time::now_ms() - args.since_ms).max(1);
    let cpu = cpu.stop();
    let token = bearer(&args.system.admin_token)?;
    let clicks = service::clicks(&target, &token).await?;
    // Status decisions (none in the benchmark) are not counted.
    let decided = service::decided(&target, &token).await?;
    let events = events - click_messages + clicks - conversion_messages + reported + decided;
    let memory = procfs::memory(args.pid);
    // Since the process started on its empty data dir: the whole rebuild.
    let written = procfs::written_bytes(args.pid);
    let disk = procfs::dir_size(&args.data_dir);
    let mib = crate::procfs::mib;
    let per_million = if clicks > 0 {
        disk as f64 / (clicks as f64 / 1e6)
    } else {
        0.0
    };
    let mut m = Measurement::new(
        id,
        "Rebuild: the whole log replayed into an empty projection (process start → ready, every fold at the tail)",
        "events/s",
    )
    .with_rate(events, ms as f64 / 1000.0)
    .extra("clicks", clicks)
    .extra("conversions_reported", reported)
    .extra("events", events)
    .extra("disk_mib", mib(disk))
    .extra("disk_mib_per_million_clicks", mib(per_million as u64));
    if let Some(bytes) = written {
        m = m
            .extra("written_mib", mib(bytes))
            .extra("written_bytes_per_event", bytes / events.max(1));
    }
    if let Some(mem) = memory {
        m = m
            .extra("peak_rss_mib", (mem.peak_rss_mib * 10.0).round() / 10.0)
            .extra("rss_mib_after", (mem.rss_mib * 10.0).round() / 10.0);
    }
    m.set_cpu(cpu);
    results::append(&args.out.results, &m)
}
