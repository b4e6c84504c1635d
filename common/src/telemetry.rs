//! Tracing set-up, once per process.

use tracing_subscriber::EnvFilter;

/// Installs a fmt subscriber with this filter (`EnvFilter` syntax; the binaries
/// take it from `--log`/`RUST_LOG`). A second call in the same process is a
/// no-op, so tests may call it freely.
pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}
