//! The benchmark suite of the postback tracker (issue 6): a load generator and
//! the drivers of every scenario `scripts/bench` runs, measured in the same run
//! as the ceilings they are read against.
//!
//! - [`load`]: the closed-loop and open-loop HTTP engines (open loop counts
//!   latency from each request's due time, so coordinated omission is not hidden),
//!   over raw hyper connections ([`http`]), recording into HDR histograms
//!   ([`stats`]);
//! - [`ceiling`]: the four ceilings (bare axum 302, 302 after a JetStream ack,
//!   pipelined JetStream publishes, sled batched inserts);
//! - [`folds`]: ceilings 5 and 6, postback-service's clicks and conversions
//!   folds alone (no NATS), the stage that bounds decisions and the rebuild;
//! - [`scenarios`]: postbacks, decisions, deliveries, rebuild; [`receiver`] is
//!   the fast affiliate endpoint deliveries go to;
//! - [`results`] and [`report`]: one JSON line per measurement, then
//!   `BENCHMARKS.md` and `results.json` with targets, pass/miss and machine facts;
//! - [`procfs`]: CPU and peak memory of the processes under test.

pub mod ceiling;
pub mod cli;
pub mod error;
pub mod events;
pub mod folds;
pub mod http;
pub mod load;
pub mod nats;
pub mod procfs;
pub mod receiver;
pub mod report;
pub mod results;
pub mod scenarios;
pub mod service;
pub mod stats;
pub mod threads;
pub mod ticker;

pub use cli::{Cli, Command};
pub use error::BenchError;

/// Runs one command to its end. A measuring command that fails still leaves a
/// record of its failure in the results file, so the report shows it.
///
/// # Errors
/// Whatever the command reports; see [`BenchError`].
pub async fn run(command: Command) -> Result<(), BenchError> {
    let measurement = command.measurement();
    let id = measurement
        .as_ref()
        .map_or_else(String::new, |(_, id)| id.clone());
    let result = dispatch(command, &id).await;
    if let (Err(error), Some((path, id))) = (&result, measurement) {
        let why = common::fold::error_chain(error);
        let _ = results::append(&path, &results::Measurement::failure(&id, why));
    }
    result
}

async fn dispatch(command: Command, id: &str) -> Result<(), BenchError> {
    match command {
        Command::Http(args) => scenarios::http_load::run(args, id).await,
        Command::Serve(args) => {
            ceiling::serve(
                args.mode,
                args.listen,
                &args.nats_url,
                args.lifetime,
                args.readers,
                std::time::Duration::from_millis(args.reader_poll_ms),
            )
            .await
        }
        Command::CeilingPublish(args) => {
            let mut m = ceiling::publish(
                &args.nats_url,
                args.warmup,
                args.duration,
                args.window,
                &args.out.watch,
            )
            .await?;
            m.id = id.to_owned();
            results::append(&args.out.results, &m)
        }
        Command::CeilingSled(args) => {
            let mut m = ceiling::sled(
                &args.run.dir,
                args.run.warmup,
                args.run.duration,
                args.batch,
                &args.out.watch,
            )
            .await?;
            m.id = id.to_owned();
            results::append(&args.out.results, &m)
        }
        Command::FoldAlone(args) => {
            let plan = folds::Plan {
                shape: args.shape,
                run: args.run,
                group: args.group,
                lag: args.lag,
                cache_bytes: args.cache_mb.max(1).saturating_mul(1024 * 1024),
            };
            let mut m = folds::run(plan, &args.out.watch).await?;
            m.id = id.to_owned();
            results::append(&args.out.results, &m)
        }
        Command::Postbacks(args) => scenarios::postbacks::run(args, id).await,
        Command::Decisions(args) => scenarios::decisions::run(args, id).await,
        Command::Deliveries(args) => scenarios::deliveries::run(args, id).await,
        Command::RebuildWait(args) => scenarios::rebuild::run(args, id).await,
        Command::Mem(args) => {
            let mut m = results::Measurement::new(id, &args.when, "");
            for w in &args.pids {
                if let Some(mem) = procfs::memory(w.pid) {
                    m.extra.insert(w.name.clone(), serde_json::to_value(mem)?);
                }
            }
            results::append(&args.out.results, &m)
        }
        Command::Report(args) => report::run(&args),
    }
}
