//! The measurements `scripts/bench` runs, one module each, plus what they share:
//! turning a load run into a [`Measurement`] and choosing closed or open loop.

pub mod decisions;
pub mod deliveries;
pub mod http_load;
pub mod postbacks;
pub mod rebuild;

use std::path::Path;

use crate::{
    cli::LoadArgs,
    error::BenchError,
    http::Target,
    load::{LoadConfig, LoadOutcome, Mode},
    procfs::Watched,
    results::{self, Measurement},
    stats::Latency,
};

/// Closed loop, or open loop at `--rate`, or at `--rate-factor` times an earlier
/// measurement's throughput.
///
/// # Errors
/// `--rate-from` names a measurement the results file does not have.
pub fn mode(load: &LoadArgs, results_file: &Path) -> Result<Mode, BenchError> {
    if let Some(rate) = load.rate {
        return Ok(Mode::Open { rate });
    }
    let Some(from) = &load.rate_from else {
        return Ok(Mode::Closed);
    };
    let all = results::load(results_file)?;
    let m = results::find(&all, from).ok_or_else(|| {
        BenchError::Usage(format!(
            "--rate-from {from}: no such measurement in {}",
            results_file.display()
        ))
    })?;
    if let Some(why) = &m.failed {
        return Err(BenchError::Usage(format!(
            "--rate-from {from}: that measurement failed ({why})"
        )));
    }
    Ok(Mode::Open {
        rate: (m.throughput * load.rate_factor).max(1.0),
    })
}

/// The engine configuration of a load.
pub fn load_config(
    label: &str,
    target: Target,
    mode: Mode,
    load: &LoadArgs,
    watched: &[Watched],
) -> LoadConfig {
    LoadConfig {
        label: label.to_owned(),
        target,
        mode,
        connections: load.connections.max(1),
        warmup: load.warmup,
        duration: load.duration,
        timeout: load.timeout,
        keep_ok: false,
        watched: watched.to_vec(),
    }
}

/// A measurement from a load run.
pub fn measurement(
    id: &str,
    title: &str,
    outcome: &LoadOutcome,
    mode: Mode,
    connections: usize,
) -> Measurement {
    let mut m = Measurement::new(id, title, "req/s").with_rate(outcome.ok, outcome.seconds);
    m.latency = Latency::of(&outcome.histogram);
    m.errors = outcome.errors;
    m.unexpected = outcome.unexpected.clone();
    m.set_cpu(outcome.cpu.clone());
    let m = m.extra("connections", connections as u64);
    match mode {
        Mode::Closed => m.extra("loop", "closed"),
        Mode::Open { rate } => m
            .extra("loop", "open")
            .extra("offered_rate", (rate * 10.0).round() / 10.0),
    }
}

/// Publishes `count` clicks with ids `id(i)`, spread over `offers` × `affiliates`,
/// then waits until postback-service's clicks fold has applied them all.
///
/// # Errors
/// A publish failed, or the fold did not catch up within `timeout`.
#[allow(clippy::too_many_arguments)]
pub async fn seed_clicks(
    js: &async_nats::jetstream::Context,
    postback: &Target,
    label: &str,
    count: u64,
    mut id: impl FnMut(u64) -> String,
    offers: &[String],
    affiliates: &[String],
    timeout: std::time::Duration,
) -> Result<(), BenchError> {
    use prost::Message;
    if count == 0 {
        return Ok(());
    }
    if offers.is_empty() || affiliates.is_empty() {
        return Err(BenchError::Usage(
            "clicks need at least one offer and one affiliate".into(),
        ));
    }
    let now = common::time::now_ms();
    let last = crate::nats::publish_many(js, label, count, |i| {
        let click_id = id(i);
        let offer = &offers[i as usize % offers.len()];
        let affiliate = &affiliates[(i as usize / offers.len()) % affiliates.len()];
        let mut click = crate::events::click(&click_id, offer, affiliate, now);
        click.ip = crate::events::visitor_ip(&click_id);
        let payload = click.encode_to_vec();
        (proto::subject::CLICK_RECORDED, click_id, payload.into())
    })
    .await?;
    let started = std::time::Instant::now();
    crate::service::wait_applied(postback, proto::stream::CLICKS, last, timeout).await?;
    eprintln!(
        "[{label}] folded by postback-service {:.1}s after the last publish",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
