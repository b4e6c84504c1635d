//! `loadgen`: parses the command line, builds the runtime, runs the command.

use anyhow::Context as _;
use clap::Parser;

/// The services' allocator, so that the ceilings measured in this process
/// (sled, the folds alone, the axum handlers) use the same one. mimalloc, not
/// glibc's malloc: sled copies a tree node on every update, and
/// glibc's allocator took about 30 % of postback-service's CPU under load (its
/// free lists, `malloc_consolidate`). See BENCHMARKS.md, sixth round.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
