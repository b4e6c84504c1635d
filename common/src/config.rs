//! Flags both services take alike (flattened into each service's `Config`), and
//! the operator subcommands.

use std::time::Duration;

/// How events are made durable (the JetStream ack deadline and the outbox),
/// and the other flags both services share: the projection's cache, the
/// folds' priority, HTTP's header read timeout.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// How long a click or postback waits for its JetStream ack before it is
    /// spooled to the durable local outbox instead (and answered all the same):
    /// 1 to 5000, well inside the 10 s a request may take.
    #[arg(long, env = "ACK_DEADLINE_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=5000))]
    pub ack_deadline_ms: u64,
    /// Events the outbox may hold before new clicks/postbacks get 503.
    #[arg(long, env = "OUTBOX_MAX_ENTRIES", default_value_t = 1_000_000)]
    pub outbox_max_entries: u64,
    /// How long internal publishes (catalog changes, decisions, delivery outcomes,
    /// the outbox drain) wait for their JetStream ack.
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub publish_timeout_ms: u64,
    /// Memory sled may use to cache the projection, in MiB (most of the
    /// service's resident memory once the projection is large).
    #[arg(long, env = "SLED_CACHE_MB", default_value_t = 1024)]
    pub sled_cache_mb: u64,
    /// How much lower than the request handlers' the folds' CPU priority is
    /// once they have caught up with the log: added to the nice value of each
    /// fold's thread (0 to 19; 0: the same). Under a burst of requests the
    /// folds fall behind and catch up after, instead of taking cores from
    /// redirects and postbacks.
    #[arg(long, env = "FOLD_NICE", default_value_t = 10,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub fold_nice: i32,
    /// How long a client may take to send a request head, in ms; also how
    /// long a keep-alive connection may sit idle. A connection past it is
    /// closed, so half-open connections (a slow or hostile client, a dead
    /// peer) neither pile up nor hold up a stop.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub header_read_timeout_ms: u64,
}

/// A `--trusted-proxy-header` value: empty, or a valid HTTP header name (in
/// lower case, as looked up). A name that is not one would match no header,
/// and every caller would silently be the proxy.
///
/// # Errors
/// The value is not a header name.
pub fn header_name(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Ok(String::new());
    }
    axum::http::HeaderName::from_bytes(value.as_bytes())
        .map(|name| name.as_str().to_owned())
        .map_err(|_| format!("{value:?} is not an HTTP header name"))
}

impl IngestArgs {
    /// Values for tests: a 250 ms ack deadline, 100,000 outbox entries, 2 s.
    pub fn for_tests() -> Self {
        Self {
            ack_deadline_ms: 250,
            outbox_max_entries: 100_000,
            publish_timeout_ms: 2000,
            sled_cache_mb: 64,
            fold_nice: 10,
            header_read_timeout_ms: 30_000,
        }
    }

    /// The projection cache, in bytes.
    pub fn sled_cache_bytes(&self) -> u64 {
        self.sled_cache_mb.max(1).saturating_mul(1024 * 1024)
    }

    /// The ack deadline.
    pub fn ack_deadline(&self) -> Duration {
        Duration::from_millis(self.ack_deadline_ms)
    }

    /// The publish timeout.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

/// Operator commands; the service must be stopped (its projection is locked).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Rebuild the projection from the log, showing progress, swap it in (the
    /// old one is kept beside it) and print its checksum.
    Rebuild,
    /// Print the checksum of the projection, to compare two rebuilds.
    Checksum,
}
