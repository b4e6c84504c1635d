//! Building and running click-service.

use std::net::SocketAddr;
use std::sync::Arc;

use common::{
    fold::FoldSpec,
    rebuild::FoldJob,
    service::{Base, Server, StartupError},
};
use tokio_util::sync::CancellationToken;

use crate::{routes, Config};

/// The folds of click-service, for the operator's rebuild.
pub fn fold_jobs() -> Vec<FoldJob> {
    vec![
        FoldJob {
            tree: "catalog",
            spec: catalog_spec(),
            fold: Box::new(catalog::CatalogFold),
            checksummed: None,
        },
        FoldJob {
            tree: "clicks",
            // A rebuild folds every click, capped offers or not.
            spec: clicks_spec(None),
            fold: Box::new(crate::caps::ClickCapsFold),
            checksummed: Some(crate::caps::catalog_has_click_caps),
        },
    ]
}

fn catalog_spec() -> FoldSpec {
    FoldSpec {
        stream: proto::stream::CATALOG,
        consumer: "click-service-catalog".to_owned(),
        filter_subject: String::new(),
        linger: std::time::Duration::ZERO,
        background: true,
        pipelined: false,
        gate: None,
    }
}

/// `gate`: see [`crate::caps::open_on_first_cap`].
fn clicks_spec(gate: Option<tokio::sync::watch::Receiver<bool>>) -> FoldSpec {
    FoldSpec {
        stream: proto::stream::CLICKS,
        consumer: "click-service-clicks".to_owned(),
        filter_subject: String::new(),
        linger: common::fold::CLICKS_LINGER,
        // A click on a capped offer waits for this fold to count it.
        background: false,
        pipelined: false,
        gate,
    }
}

/// A built click-service: bound, connected, folding; not yet serving.
pub struct Application(Server);

impl Application {
    /// Opens the projection, connects to NATS, ensures the streams, starts the
    /// catalog fold and binds the listener.
    ///
    /// # Errors
    /// See [`StartupError`].
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let mut base = Base::open(
            &config.nats_url,
            "click-service",
            &config.data_dir,
            &config.ingest,
        )
        .await?;
        let catalog_status = base.spawn_fold("catalog", catalog_spec(), catalog::CatalogFold)?;
        let catalog = catalog::Catalog::new(base.db.open_tree("catalog")?);
        let (open_caps, caps_gate) = tokio::sync::watch::channel(false);
        let clicks_status = base.spawn_fold(
            "clicks",
            clicks_spec(Some(caps_gate)),
            crate::caps::ClickCapsFold,
        )?;
        let (reads, status) = (catalog.clone(), catalog_status.clone());
        base.spawn(move |token| crate::caps::open_on_first_cap(reads, status, open_caps, token));
        let outbox =
            base.start_outbox(config.ingest.outbox_max_entries, config.publish_timeout())?;
        let state = routes::AppState {
            click_counts: crate::caps::ClickCounts::new(base.db.open_tree("clicks")?),
            clicks_status,
            js: base.js.clone(),
            catalog,
            catalog_status,
            admin_token: Arc::from(config.admin_token.as_str()),
            trusted_proxy_header: Arc::from(
                config.trusted_proxy_header.to_ascii_lowercase().as_str(),
            ),
            publish_timeout: config.publish_timeout(),
            clicks: crate::group_commit::GroupCommit::start(&base, outbox, config.group_commit()),
        };
        let server =
            Server::bind("click-service", base, config.listen, routes::router(state)).await?;
        Ok(Self(server))
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
