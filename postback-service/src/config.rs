//! Configuration, from flags with environment fallbacks (`postback-service --help`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// postback-service configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "postback-service",
    version,
    about = "Matches conversions to clicks"
)]
pub struct Config {
    /// Run the service (no subcommand), or an operator command.
    #[command(subcommand)]
    pub command: Option<common::config::Command>,
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Address to serve HTTP on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Once listening, write the address bound (IP:port and a newline) to this
    /// file, replaced whole. With port 0 in LISTEN_ADDR, this is how a
    /// supervisor or a test learns the port the OS chose.
    #[arg(long, env = "ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Directory of the local sled projection (disposable: rebuilt from the log).
    #[arg(long, env = "DATA_DIR", default_value = "data/postback-service")]
    pub data_dir: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(
        long = "log",
        env = "RUST_LOG",
        default_value = "postback_service=info,common=info,tower_http=warn"
    )]
    pub log_filter: String,
    /// Bearer token of the read API (`/api/*`); empty disables it (401).
    #[arg(long, env = "ADMIN_TOKEN", default_value = "", hide_env_values = true)]
    pub admin_token: String,
    #[command(flatten)]
    pub ingest: common::config::IngestArgs,
    /// How long a conversion whose click is not in the projection waits for it
    /// (counted once the click fold is at the end of the log) before it is
    /// rejected `unknown_click`.
    #[arg(long, env = "UNKNOWN_CLICK_GRACE_MS", default_value_t = 600_000)]
    pub unknown_click_grace_ms: u64,
    /// How long the door waits, at most, for a click this service has not
    /// folded yet (its postback security needs the click's offer), and the
    /// read API for a click or conversion not folded yet, NATS's answer of
    /// where the log ends included.
    #[arg(long, env = "DOOR_WAIT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=5000))]
    pub door_wait_ms: u64,
    /// The decider looks at most this many pending conversions (and as many
    /// queued status reports) per round; a walk stopped by it goes on from
    /// there in the next round. Tuning only.
    #[arg(long, env = "DECIDER_SCAN_LIMIT", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub decider_scan_limit: u64,
    /// Most decisions published together in one `conversions.v1.decided_batch`
    /// message (README "Decisions are published in batches"); 1: each alone on
    /// its own subject, as before batches (for a reader of CONVERSIONS that
    /// cannot read batches yet, or while older postback-services run beside).
    #[arg(long, env = "DECISION_BATCH_MAX", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=512))]
    pub decision_batch_max: u64,
    /// Take the advertiser's IP from this header (the right-most address, as
    /// appended by our own reverse proxy) for postback IP allowlists; empty:
    /// the TCP peer. Set it only behind a proxy that sets it.
    #[arg(long, env = "TRUSTED_PROXY_HEADER", default_value = "",
          value_parser = common::config::header_name)]
    pub trusted_proxy_header: String,
    /// The decider and the dispatcher run in one instance per log: the one
    /// holding a lease in NATS (key-value bucket `leases`, key
    /// `postback-service`), renewed every quarter of this. Other instances
    /// stand by and take over when it stops (at once) or crashes (after this
    /// long). The bucket's entries live this long: set when it is created,
    /// raised (never lowered) by an instance configured longer. At least
    /// twice POSTBACK_TIMEOUT_MS, or the service refuses to start: a leader
    /// starts no affiliate postback later than half a lease after its last
    /// renewal, and the ones it started must end before another instance can
    /// take over.
    #[arg(long, env = "LEADER_LEASE_MS", default_value_t = 20_000)]
    pub leader_lease_ms: u64,
    /// Affiliate postbacks: timeout of one attempt, the response body included.
    #[arg(long, env = "POSTBACK_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub postback_timeout_ms: u64,
    /// Affiliate postbacks: delay before the first retry; each later one doubles it.
    #[arg(long, env = "POSTBACK_FIRST_RETRY_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub postback_first_retry_ms: u64,
    /// Affiliate postbacks: attempts in all before giving up.
    #[arg(long, env = "POSTBACK_MAX_ATTEMPTS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub postback_max_attempts: u32,
    /// Affiliate postbacks: no retry later than this after the first attempt.
    #[arg(long, env = "POSTBACK_MAX_AGE_SECS", default_value_t = 86_400)]
    pub postback_max_age_secs: u64,
    /// Affiliate postbacks: attempts in flight at once, overall.
    #[arg(long, env = "POSTBACK_CONCURRENCY", default_value_t = 256)]
    pub postback_concurrency: usize,
    /// Affiliate postbacks: attempts in flight at once to one host.
    #[arg(long, env = "POSTBACK_PER_HOST", default_value_t = 8)]
    pub postback_per_host: usize,
    /// Affiliate postbacks: allow URLs that resolve to loopback, private or
    /// link-local addresses (refused by default: server-side request forgery).
    #[arg(long, env = "POSTBACK_ALLOW_PRIVATE", default_value_t = false)]
    pub postback_allow_private: bool,
    /// Affiliate postbacks: follow up to 5 redirects (each hop checked like the first).
    #[arg(long, env = "POSTBACK_FOLLOW_REDIRECTS", default_value_t = false)]
    pub postback_follow_redirects: bool,
}

/// A configuration the service refuses to run with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "LEADER_LEASE_MS ({lease_ms}) must be at least twice POSTBACK_TIMEOUT_MS ({timeout_ms}): \
         a leader starts no affiliate postback later than half a lease after its last renewal, \
         and one it started must end before another instance can lead and send it again"
    )]
    LeaseShorterThanTwoTimeouts { lease_ms: u128, timeout_ms: u64 },
}

impl Config {
    /// Refuses what cannot run safely.
    ///
    /// # Errors
    /// See [`ConfigError`].
    pub fn check(&self) -> Result<(), ConfigError> {
        let lease_ms = self.leader_lease().as_millis();
        if lease_ms < u128::from(self.postback_timeout_ms) * 2 {
            return Err(ConfigError::LeaseShorterThanTwoTimeouts {
                lease_ms,
                timeout_ms: self.postback_timeout_ms,
            });
        }
        Ok(())
    }

    /// A configuration for tests and embedding: loopback port 0, the given NATS and
    /// data dir, admin token `admin`, a one-second grace, affiliate postbacks to
    /// loopback allowed with a 1 s timeout and retries from 50 ms.
    pub fn for_tests(nats_url: &str, data_dir: PathBuf) -> Self {
        Self {
            command: None,
            nats_url: nats_url.to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            addr_file: None,
            data_dir,
            admin_token: "admin".to_owned(),
            log_filter: "info".to_owned(),
            ingest: common::config::IngestArgs::for_tests(),
            unknown_click_grace_ms: 1000,
            decider_scan_limit: 100_000,
            decision_batch_max: 512,
            // A loaded test machine may take over a second to fold a click.
            door_wait_ms: 3000,
            leader_lease_ms: 2000,
            postback_timeout_ms: 1000,
            postback_first_retry_ms: 50,
            postback_max_attempts: 10,
            postback_max_age_secs: 3600,
            postback_concurrency: 64,
            postback_per_host: 4,
            postback_allow_private: true,
            postback_follow_redirects: false,
            trusted_proxy_header: String::new(),
        }
    }

    pub(crate) fn ack_deadline(&self) -> Duration {
        self.ingest.ack_deadline()
    }

    pub(crate) fn publish_timeout(&self) -> Duration {
        self.ingest.publish_timeout()
    }

    pub(crate) fn leader_lease(&self) -> Duration {
        Duration::from_millis(self.leader_lease_ms.max(100))
    }

    pub(crate) fn grace(&self) -> Duration {
        Duration::from_millis(self.unknown_click_grace_ms)
    }

    /// The dispatcher's part of it.
    pub fn dispatch(&self) -> crate::deliveries::DispatchConfig {
        crate::deliveries::DispatchConfig {
            policy: crate::deliveries::policy::RetryPolicy {
                first_retry: Duration::from_millis(self.postback_first_retry_ms),
                max_attempts: self.postback_max_attempts.max(1),
                max_age: Duration::from_secs(self.postback_max_age_secs),
            },
            timeout: Duration::from_millis(self.postback_timeout_ms),
            concurrency: self.postback_concurrency,
            per_host: self.postback_per_host,
            allow_private: self.postback_allow_private,
            follow_redirects: self.postback_follow_redirects,
            ack_deadline: self.ack_deadline(),
            publish_timeout: self.publish_timeout(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_shorter_than_two_postback_timeouts_is_refused_by_name() {
        let mut config = Config::for_tests("nats://127.0.0.1:1", PathBuf::from("/tmp/unused"));
        config.check().expect("the test configuration runs");
        (config.leader_lease_ms, config.postback_timeout_ms) = (20_000, 10_000);
        config.check().expect("exactly twice runs");
        config.postback_timeout_ms = 10_001;
        let error = config.check().unwrap_err().to_string();
        assert!(
            error.contains("LEADER_LEASE_MS (20000)")
                && error.contains("POSTBACK_TIMEOUT_MS (10001)"),
            "{error}"
        );
    }
}
