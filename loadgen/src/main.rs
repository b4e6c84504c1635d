//! `loadgen`: parses the command line, builds the runtime, runs the command.

use anyhow::Context as _;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = loadgen::Cli::parse();
    loadgen::service::set_stall_limit(cli.stall_limit);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.build().context("building the tokio runtime")?;
    runtime.block_on(loadgen::run(cli.command))?;
    Ok(())
}
