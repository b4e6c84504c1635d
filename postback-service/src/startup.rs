//! Building and running postback-service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{
    fold::FoldSpec,
    rebuild::FoldJob,
    service::{Base, Server, StartupError},
};
use tokio_util::sync::CancellationToken;

use crate::{
    clicks::{Clicks, ClicksFold},
    conversions::{Conversions, ConversionsFold, DeciderConfig, DeciderInputs},
    deliveries::{dispatcher::DispatchStores, Dispatcher, Outcomes, PostbacksFold, ScheduleStore},
    leader::{Led, LEASE_KEY},
    routes, Config,
};

/// The folds of postback-service, for the operator's rebuild.
pub fn fold_jobs() -> Vec<FoldJob> {
    vec![
        FoldJob {
            tree: "catalog",
            spec: spec(proto::stream::CATALOG),
            fold: Box::new(catalog::CatalogFold),
            checksummed: None,
        },
        FoldJob {
            tree: "clicks",
            spec: spec(proto::stream::CLICKS),
            fold: Box::new(ClicksFold),
            checksummed: None,
        },
        FoldJob {
            tree: "conversions",
            spec: spec(proto::stream::CONVERSIONS),
            fold: Box::new(ConversionsFold),
            checksummed: None,
        },
        FoldJob {
            tree: "postbacks",
            spec: spec(proto::stream::POSTBACKS),
            fold: Box::new(PostbacksFold),
            checksummed: None,
        },
    ]
}

/// A built postback-service: bound, connected, folding and deciding; not yet serving.
pub struct Application(Server);

fn spec(stream: &'static str) -> FoldSpec {
    FoldSpec {
        stream,
        consumer: format!("postback-service-{}", stream.to_ascii_lowercase()),
        filter_subject: String::new(),
        // Clicks come in volume and wait for nobody (a postback whose click is
        // not folded yet waits for it at the door); conversions are on the path
        // from postback to decision.
        linger: if stream == proto::stream::CLICKS {
            common::fold::CLICKS_LINGER
        } else {
            Duration::ZERO
        },
        // No HTTP answer waits on these folds but the door's, briefly, for a
        // click not folded yet.
        background: true,
        // The decisions wait on the conversions fold, the dispatcher's
        // retries on the postbacks fold.
        pipelined: stream == proto::stream::CONVERSIONS || stream == proto::stream::POSTBACKS,
        gate: None,
    }
}

impl Application {
    /// Opens the projection, connects to NATS, ensures the streams, starts the
    /// CATALOG, CLICKS, CONVERSIONS and POSTBACKS folds, the decider and the
    /// postback dispatcher, binds the listener.
    ///
    /// # Errors
    /// See [`StartupError`].
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        config.check().map_err(|e| StartupError::Component {
            what: "the configuration",
            source: e.into(),
        })?;
        let mut base = Base::open(
            &config.nats_url,
            "postback-service",
            &config.data_dir,
            &config.ingest,
        )
        .await?;
        let catalog_status = base.spawn_fold(
            "catalog",
            spec(proto::stream::CATALOG),
            catalog::CatalogFold,
        )?;
        let clicks_status = base.spawn_fold("clicks", spec(proto::stream::CLICKS), ClicksFold)?;
        let conversions_status = base.spawn_fold(
            "conversions",
            spec(proto::stream::CONVERSIONS),
            ConversionsFold,
        )?;
        let postbacks_status =
            base.spawn_fold("postbacks", spec(proto::stream::POSTBACKS), PostbacksFold)?;
        let postbacks_status_for_api = postbacks_status.clone();
        let clicks = Clicks::new(base.db.open_tree("clicks")?);
        let conversions = Conversions::new(base.db.open_tree("conversions")?);

        let inputs = DeciderInputs {
            conversions: conversions.clone(),
            clicks: clicks.clone(),
            catalog: catalog::Catalog::new(base.db.open_tree("catalog")?),
            conversions_status: conversions_status.clone(),
            clicks_status: clicks_status.clone(),
            catalog_status,
        };
        let decider = DeciderConfig {
            grace: config.grace(),
            publish_timeout: config.publish_timeout(),
            scan_limit: usize::try_from(config.decider_scan_limit).unwrap_or(usize::MAX),
            batch_max: usize::try_from(config.decision_batch_max).unwrap_or(1),
        };

        let stores = DispatchStores {
            conversions: conversions.clone(),
            clicks: clicks.clone(),
            outcomes: Outcomes::new(base.db.open_tree("postbacks")?),
            schedules: ScheduleStore::new(base.db.open_tree("dispatch")?, base.durable.clone()),
            postbacks_status: postbacks_status.clone(),
        };
        let dispatcher =
            Dispatcher::new(base.js.clone(), stores, config.dispatch()).map_err(|e| {
                StartupError::Component {
                    what: "the postback HTTP client",
                    source: e.into(),
                }
            })?;
        // Once per log: in the instance holding the lease, the others stand by.
        // The decider publishes on a connection of its own: its publishes and
        // their acks do not queue behind the folds' deliveries on one socket,
        // and the two connections' tasks run on both cores (+6 % decisions/s,
        // bench/notes.md, seventeenth round).
        let decider_nats =
            common::nats::connect_lazily(&config.nats_url, "postback-service-decider").await?;
        let led = Led {
            js: decider_nats.js,
            decider_inputs: inputs,
            decider,
            dispatcher: dispatcher.clone(),
            postbacks_status,
        };
        let lease = base
            .spawn_led(LEASE_KEY, config.leader_lease(), move |token, tenure| {
                led.clone().run(token, tenure)
            })
            .map_err(|e| StartupError::Component {
                what: "the instance id in the data dir",
                source: e.into(),
            })?;

        let state = routes::AppState {
            js: base.js.clone(),
            conversions,
            clicks,
            clicks_status,
            conversions_status,
            postbacks_status: postbacks_status_for_api,
            door_wait: Duration::from_millis(config.door_wait_ms),
            dispatcher,
            catalog: catalog::Catalog::new(base.db.open_tree("catalog")?),
            refusals: Arc::default(),
            replays: Arc::default(),
            trusted_proxy_header: Arc::from(
                config.trusted_proxy_header.to_ascii_lowercase().as_str(),
            ),
            admin_token: Arc::from(config.admin_token.as_str()),
            publish_timeout: config.publish_timeout(),
            outbox: base
                .start_outbox(config.ingest.outbox_max_entries, config.publish_timeout())?,
            ack_deadline: config.ack_deadline(),
            lease,
            log_ends: Arc::default(),
        };
        let router = routes::router(state);
        Ok(Self(
            Server::bind("postback-service", base, config.listen, router).await?,
        ))
    }

    /// The address HTTP is served on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Serves until `stop` is cancelled, then drains and flushes.
    ///
    /// # Errors
    /// The HTTP server failed.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> Result<(), StartupError> {
        self.0.run_until_stopped(stop).await
    }
}
