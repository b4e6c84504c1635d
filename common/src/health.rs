//! `GET /healthz` (the process answers) and `GET /readyz` (connected to NATS and
//! every projection has caught up with the log since start).

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use crate::fold::FoldStatus;

/// What readiness looks at.
#[derive(Clone)]
pub struct Readiness {
    client: async_nats::Client,
    folds: Vec<watch::Receiver<FoldStatus>>,
    outbox: Option<crate::outbox::Outbox>,
    lease: Option<watch::Receiver<crate::lease::LeaseStatus>>,
}

#[derive(Serialize)]
struct ReadyReport {
    ready: bool,
    nats: &'static str,
    projections: Vec<FoldStatus>,
    /// Events accepted while JetStream did not ack, waiting to be published.
    outbox: Option<crate::outbox::OutboxStatus>,
    /// Whether this instance leads the work that runs once per log, or stands
    /// by (either is ready: a standby serves HTTP all the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<crate::lease::LeaseStatus>,
}

impl Readiness {
    /// Readiness of a service with this NATS client and these folds.
    pub fn new(
        client: async_nats::Client,
        folds: Vec<watch::Receiver<FoldStatus>>,
        outbox: Option<crate::outbox::Outbox>,
    ) -> Self {
        Self {
            client,
            folds,
            outbox,
            lease: None,
        }
    }

    /// The same, also showing this instance's part in a lease.
    #[must_use]
    pub fn with_lease(mut self, lease: Option<watch::Receiver<crate::lease::LeaseStatus>>) -> Self {
        self.lease = lease;
        self
    }

    fn report(&self) -> ReadyReport {
        let nats = match self.client.connection_state() {
            async_nats::connection::State::Connected => "connected",
            async_nats::connection::State::Disconnected => "disconnected",
            async_nats::connection::State::Pending => "connecting",
        };
        let projections: Vec<FoldStatus> = self.folds.iter().map(|f| f.borrow().clone()).collect();
        let ready = nats == "connected" && projections.iter().all(|p| p.caught_up);
        let outbox = self.outbox.as_ref().map(crate::outbox::Outbox::status);
        let lease = self.lease.as_ref().map(|l| l.borrow().clone());
        ReadyReport {
            ready,
            nats,
            projections,
            outbox,
            lease,
        }
    }

    /// True when `/readyz` would answer 200.
    pub fn is_ready(&self) -> bool {
        self.report().ready
    }
}

/// The two health routes.
pub fn routes(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    let report = readiness.report();
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report))
}
