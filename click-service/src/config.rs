//! Configuration, from flags with environment fallbacks (`click-service --help`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// click-service configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "click-service",
    version,
    about = "Records clicks and redirects to offers"
)]
pub struct Config {
    /// Run the service (no subcommand), or an operator command.
    #[command(subcommand)]
    pub command: Option<common::config::Command>,
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Address to serve HTTP on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Once listening, write the address bound (IP:port and a newline) to this
    /// file, replaced whole. With port 0 in LISTEN_ADDR, this is how a
    /// supervisor or a test learns the port the OS chose.
    #[arg(long, env = "ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Directory of the local sled projection (disposable: rebuilt from the log).
    #[arg(long, env = "DATA_DIR", default_value = "data/click-service")]
    pub data_dir: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(
        long = "log",
        env = "RUST_LOG",
        default_value = "click_service=info,common=info,tower_http=warn"
    )]
    pub log_filter: String,
    /// Bearer token of the admin API; empty disables the admin API (401).
    #[arg(long, env = "ADMIN_TOKEN", default_value = "", hide_env_values = true)]
    pub admin_token: String,
    /// Take the visitor's IP from this header (the right-most address, as
    /// appended by our own reverse proxy) for the click's IP and unique-click
    /// counting; empty: the TCP peer. Set it only behind a proxy that sets it.
    #[arg(long, env = "TRUSTED_PROXY_HEADER", default_value = "",
          value_parser = common::config::header_name)]
    pub trusted_proxy_header: String,
    /// Most clicks published as one message: the clicks that arrive while
    /// earlier ones await JetStream's ack go together on
    /// `clicks.v1.recorded_batch`, acked once (a group commit; each redirect
    /// still waits for its click's ack). 1: one message per click on
    /// `clicks.v1.recorded` only, for readers of CLICKS that do not read
    /// batches.
    #[arg(long, env = "CLICK_BATCH_MAX", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub click_batch_max: u16,
    /// Click messages awaiting their ack at once (with CLICK_BATCH_MAX above
    /// 1): fewer make larger batches, more make a click wait less for a slot.
    #[arg(long, env = "CLICK_COMMITS_IN_FLIGHT", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub click_commits_in_flight: u16,
    #[command(flatten)]
    pub ingest: common::config::IngestArgs,
}

impl Config {
    /// A configuration for tests and embedding: loopback port 0, the given NATS and
    /// data dir, admin token `admin`.
    pub fn for_tests(nats_url: &str, data_dir: PathBuf) -> Self {
        Self {
            command: None,
            nats_url: nats_url.to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            addr_file: None,
            data_dir,
            admin_token: "admin".to_owned(),
            trusted_proxy_header: String::new(),
            log_filter: "info".to_owned(),
            click_batch_max: 64,
            click_commits_in_flight: 2,
            ingest: common::config::IngestArgs::for_tests(),
        }
    }

    pub(crate) fn group_commit(&self) -> crate::group_commit::Settings {
        crate::group_commit::Settings {
            max_clicks: usize::from(self.click_batch_max),
            in_flight: usize::from(self.click_commits_in_flight),
            ack_deadline: self.ingest.ack_deadline(),
        }
    }

    pub(crate) fn publish_timeout(&self) -> Duration {
        self.ingest.publish_timeout()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Config;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from([&["click-service"], args].concat())
    }

    #[test]
    fn values_that_would_misbehave_at_run_time_are_refused_at_start() {
        let header = parse(&["--trusted-proxy-header", "X-Forwarded-For"]).unwrap();
        assert_eq!(header.trusted_proxy_header, "x-forwarded-for");
        assert_eq!(parse(&[]).unwrap().trusted_proxy_header, "");
        for bad in [
            &["--trusted-proxy-header", "X-Forwarded-For "][..],
            &["--trusted-proxy-header", "X-Real-IP:"],
            &["--ack-deadline-ms", "0"],
            &["--ack-deadline-ms", "10000"],
            &["--publish-timeout-ms", "0"],
            &["--click-batch-max", "0"],
            &["--click-batch-max", "5000"],
            &["--click-commits-in-flight", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
