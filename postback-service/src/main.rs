//! The postback-service binary: config, tracing, signals, run.

use anyhow::Context;
use clap::Parser;

/// mimalloc, not glibc's malloc: sled copies a tree node on every update, and
/// glibc's allocator took about 30 % of postback-service's CPU under load (its
/// free lists, `malloc_consolidate`). See BENCHMARKS.md, sixth round.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = postback_service::Config::parse();
    common::telemetry::init(&config.log_filter);
    if let Some(command) = &config.command {
        let jobs = postback_service::startup::fold_jobs();
        return common::rebuild::operate(
            command,
            &config.nats_url,
            "postback-service",
            &config.data_dir,
            jobs,
            &["dispatch"],
        )
        .await
        .context("running the operator command");
    }
    let stop = common::shutdown::cancel_on_signal();
    let addr_file = config.addr_file.clone();
    let app = postback_service::Application::build(config)
        .await
        .context("starting postback-service")?;
    if let Some(path) = &addr_file {
        common::service::write_addr_file(path, app.local_addr())?;
    }
    app.run_until_stopped(stop)
        .await
        .context("running postback-service")
}
