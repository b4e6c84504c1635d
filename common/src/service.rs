//! What both services do alike at start and stop: open the projection, connect to
//! NATS and create the streams, run folds on a task tracker, serve HTTP until told
//! to stop, then drain in order (requests, folds, sled flush, NATS).

use std::{future::Future, net::SocketAddr, path::Path, time::Duration};

use async_nats::jetstream::Context;
use axum::Router;
use thiserror::Error;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};
use tower_http::{timeout::TimeoutLayer, trace::TraceLayer};

use crate::fold::{self, Fold, FoldSpec, FoldStatus};

/// A service that could not start or serve.
#[derive(Debug, Error)]
pub enum StartupError {
    #[error("opening the projection")]
    Store(#[from] sled::Error),
    #[error(transparent)]
    Nats(#[from] crate::nats::ConnectError),
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up {what}")]
    Component {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("writing the bound address to {}", path.display())]
    AddrFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes `addr` and a newline to `path` (ADDR_FILE), replacing the file whole
/// (a temporary file renamed over it), so whoever waits for it never reads half
/// an address. With port 0 in LISTEN_ADDR this is how a supervisor or a test
/// learns the port the OS chose, with no window in which another process can
/// take it (as picking a free port first and passing it in leaves open).
///
/// # Errors
/// The file could not be written.
pub fn write_addr_file(path: &Path, addr: SocketAddr) -> Result<(), StartupError> {
    let error = |source| StartupError::AddrFile {
        path: path.to_owned(),
        source,
    };
    replace_file(path, &format!("{addr}\n")).map_err(error)?;
    tracing::info!(%addr, path = %path.display(), "bound address written");
    Ok(())
}

/// Writes `contents` to `path` through a temporary file renamed over it, so a
/// reader (or a crash) never sees half of it.
fn replace_file(path: &Path, contents: &str) -> Result<(), std::io::Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// The running parts every service has.
pub struct Base {
    pub client: async_nats::Client,
    pub js: Context,
    pub db: sled::Db,
    /// Flushes `db`; writers that need durability at the same time share one.
    pub durable: crate::store::GroupFlush,
    connections: watch::Receiver<u64>,
    tracker: TaskTracker,
    token: CancellationToken,
    _cancel_on_drop: DropGuard,
    folds: Vec<watch::Receiver<FoldStatus>>,
    data_dir: std::path::PathBuf,
    outbox: Option<crate::outbox::Outbox>,
    fold_nice: i32,
    header_read_timeout: Duration,
    lease: Option<watch::Receiver<crate::lease::LeaseStatus>>,
}

/// How long a start waits for NATS before it goes on without it.
pub const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(2);

/// Ensures the streams at every connection after `seen` (the count of
/// connections at the last time they were ensured), retrying until they are:
/// a start during a NATS outage, and a NATS that came back without its data
/// (no volume, a new server), whose streams would otherwise not exist until
/// the services restart: every click and postback would go to the outbox, and
/// every fold wait, while `/readyz` said ready.
async fn ensure_streams_at_each_connection(
    js: async_nats::jetstream::Context,
    mut connected: watch::Receiver<u64>,
    mut seen: u64,
    token: CancellationToken,
) {
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            changed = connected.wait_for(|n| *n > seen) => match changed {
                Ok(n) => seen = *n,
                Err(_) => return, // the connection's task is gone: stopping
            },
        }
        loop {
            let ensured = tokio::select! {
                () = token.cancelled() => return,
                ensured = crate::nats::ensure_streams(&js) => ensured,
            };
            match ensured {
                Ok(()) => {
                    tracing::info!("connected to NATS; streams ready");
                    break;
                }
                Err(error) => {
                    tracing::error!(error = %crate::fold::error_chain(&error), "streams not ensured; retrying");
                }
            }
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

impl Base {
    /// Opens `data_dir`'s projection, connects to NATS as `name` and ensures
    /// streams. Folds will run at `ingest`'s nice ([`crate::worker`]).
    ///
    /// A NATS that cannot be reached within [`FIRST_CONNECT_WAIT`] does not
    /// stop the start: the service serves from its projection, and takes
    /// clicks and postbacks into its outbox, while the client keeps trying;
    /// the streams are ensured once it connects.
    ///
    /// # Errors
    /// The projection cannot open, the NATS URL is invalid, or NATS, once
    /// reached, refuses a stream (JetStream off, say).
    pub async fn open(
        nats_url: &str,
        name: &str,
        data_dir: &Path,
        ingest: &crate::config::IngestArgs,
    ) -> Result<Self, StartupError> {
        // Each step of the start is logged with its duration: a service that
        // does not come up says which step it is waiting on.
        let started = std::time::Instant::now();
        let db = crate::store::open_db_with_cache(data_dir, ingest.sled_cache_bytes())?;
        tracing::info!(dir = %data_dir.display(), ms = started.elapsed().as_millis(), "projection opened");
        let crate::nats::Connection {
            client,
            js,
            connections,
        } = crate::nats::connect_lazily(nats_url, name).await?;
        let token = CancellationToken::new();
        let base = Self {
            client,
            js,
            connections,
            durable: crate::store::GroupFlush::new((*db).clone()),
            db,
            tracker: TaskTracker::new(),
            _cancel_on_drop: token.clone().drop_guard(),
            token,
            folds: Vec::new(),
            data_dir: data_dir.to_path_buf(),
            outbox: None,
            fold_nice: ingest.fold_nice,
            header_read_timeout: Duration::from_millis(ingest.header_read_timeout_ms),
            lease: None,
        };
        let mut connected = base.connections.clone();
        let first = tokio::time::timeout(FIRST_CONNECT_WAIT, connected.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|seen| seen.is_ok());
        // The connections the streams were ensured at (none yet).
        let mut seen = 0;
        let ensured = if first {
            tracing::info!(
                url = nats_url,
                ms = started.elapsed().as_millis(),
                "connected to NATS"
            );
            let at = *connected.borrow();
            match crate::nats::ensure_streams(&base.js).await {
                Ok(()) => {
                    seen = at;
                    true
                }
                // No answer in time (a loaded server, a connection lost
                // meanwhile) is no refusal: go on as when NATS is away.
                Err(error) if error.is_transient() => {
                    tracing::warn!(error = %crate::fold::error_chain(&error),
                        "streams not ensured yet; retrying in the background");
                    false
                }
                Err(error) => return Err(error.into()),
            }
        } else {
            tracing::warn!(
                url = nats_url,
                "NATS cannot be reached: serving from the projection, clicks and \
                 postbacks go to the outbox; connecting in the background"
            );
            false
        };
        if ensured {
            tracing::info!(ms = started.elapsed().as_millis(), "streams ready");
        }
        let js = base.js.clone();
        base.spawn(|token| ensure_streams_at_each_connection(js, connected, seen, token));
        Ok(base)
    }

    /// Starts folding `spec.stream` into the Tree `tree`; returns the fold's status.
    ///
    /// # Errors
    /// The Tree cannot be opened.
    pub fn spawn_fold<F: Fold>(
        &mut self,
        tree: &str,
        spec: FoldSpec,
        fold: F,
    ) -> Result<watch::Receiver<FoldStatus>, sled::Error> {
        let tree = crate::FoldTree::open(&self.db, tree)?;
        let (tx, rx) = fold::status_channel(spec.stream);
        let source = fold::Source {
            js: self.js.clone(),
            connections: self.connections.clone(),
            durable: self.durable.clone(),
            nice: self.fold_nice,
        };
        let task = fold::run(source, tree, spec, fold, tx, self.token.clone());
        self.tracker.spawn(task);
        self.folds.push(rx.clone());
        Ok(rx)
    }

    /// Runs a background task that must stop when the service stops.
    pub fn spawn<F>(&self, task: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task(self.token.clone()));
    }

    /// Runs `led` only while this process holds the lease `key` (see
    /// [`crate::lease`]), as `<service>-<instance id>`: the instance id is kept
    /// in the data dir, so a restart of this instance is the same holder.
    /// Returns this instance's part in the lease, which `/readyz` shows too.
    ///
    /// # Errors
    /// The instance id cannot be read or written.
    pub fn spawn_led<F, Fut>(
        &mut self,
        service: &str,
        ttl: Duration,
        led: F,
    ) -> Result<watch::Receiver<crate::lease::LeaseStatus>, std::io::Error>
    where
        F: FnMut(CancellationToken, crate::lease::Tenure) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let config = crate::lease::LeaseConfig {
            key: service.to_owned(),
            holder: format!("{service}-{}", self.instance_id()?),
            ttl,
        };
        let (tx, rx) = crate::lease::status_channel(&config);
        let js = self.js.clone();
        self.spawn(|token| crate::lease::run_led(js, config, tx, token, led));
        self.lease = Some(rx.clone());
        Ok(rx)
    }

    /// This instance's id: made once, kept in the data dir's `instance-id`.
    fn instance_id(&self) -> Result<String, std::io::Error> {
        let path = self.data_dir.join("instance-id");
        match std::fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let id = uuid::Uuid::now_v7().simple().to_string();
        replace_file(&path, &format!("{id}\n"))?;
        Ok(id)
    }

    /// Opens the durable outbox under the data dir and starts its drainer.
    ///
    /// # Errors
    /// The outbox database cannot be opened.
    pub fn start_outbox(
        &mut self,
        max_entries: u64,
        drain_timeout: Duration,
    ) -> Result<crate::outbox::Outbox, sled::Error> {
        let outbox = crate::outbox::Outbox::open(&self.data_dir, max_entries)?;
        let drainer = outbox.clone();
        let js = self.js.clone();
        self.spawn(|token| drainer.run_drainer(js, drain_timeout, token));
        self.outbox = Some(outbox.clone());
        Ok(outbox)
    }

    /// Readiness over every fold spawned so far, and the outbox.
    pub fn readiness(&self) -> crate::health::Readiness {
        crate::health::Readiness::new(self.client.clone(), self.folds.clone(), self.outbox.clone())
            .with_lease(self.lease.clone())
    }

    /// Serves `router` (plus health routes) on `listener` until `stop` is cancelled,
    /// then drains: open connections (10 s at most, [`crate::http`]), background
    /// tasks, the sled flush, and the NATS connection.
    ///
    /// # Errors
    /// None today (accept failures are logged and retried); kept for the
    /// callers' sake.
    pub async fn serve(
        self,
        listener: TcpListener,
        router: Router,
        stop: CancellationToken,
    ) -> Result<(), StartupError> {
        let app = router
            .merge(crate::health::routes(self.readiness()))
            .layer(TimeoutLayer::with_status_code(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                Duration::from_secs(10),
            ))
            .layer(axum::middleware::map_response(
                crate::api_error::json_errors,
            ))
            .layer(TraceLayer::new_for_http());
        crate::http::serve(listener, app, stop, self.header_read_timeout).await;
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let db = self.db.clone();
        if let Err(error) = tokio::task::spawn_blocking(move || db.flush())
            .await
            .unwrap_or_else(|e| Err(sled::Error::Io(std::io::Error::other(e.to_string()))))
        {
            tracing::error!(%error, "final projection flush failed");
        }
        if let Some(outbox) = &self.outbox {
            outbox.flush().await;
            let left = outbox.depth();
            if left > 0 {
                tracing::warn!(
                    left,
                    "stopping with events in the outbox; they drain at the next start"
                );
            }
        }
        // Bounded: with NATS away (never reached since the start, say) the
        // drain would wait for a connection that may not come; whatever it
        // held is in the outbox or the log already.
        match tokio::time::timeout(Duration::from_secs(5), self.client.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "draining the NATS connection"),
            Err(_) => tracing::warn!("NATS connection not drained within 5 s; closing"),
        }
        Ok(())
    }
}

/// A built service: bound, connected, folding; not yet serving.
pub struct Server {
    name: &'static str,
    base: Base,
    listener: TcpListener,
    router: Router,
}

impl Server {
    /// Binds `addr` for `router` over `base`.
    ///
    /// # Errors
    /// The address is taken or not ours.
    pub async fn bind(
        name: &'static str,
        base: Base,
        addr: SocketAddr,
        router: Router,
    ) -> Result<Self, StartupError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        Ok(Self {
            name,
            base,
            listener,
            router,
        })
    }

    /// The address HTTP is served on (useful with port 0).
    ///
    /// # Panics
    /// Never in practice: a bound listener has an address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `stop` is cancelled, then drains and flushes (see [`Base::serve`]).
    ///
    /// # Errors
    /// The HTTP server failed.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> Result<(), StartupError> {
        tracing::info!(addr = %self.local_addr(), service = self.name, "listening");
        self.base.serve(self.listener, self.router, stop).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_addr_file_holds_the_address_alone_and_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("click.addr");
        std::fs::write(&path, "127.0.0.1:1\n").unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], 40_123));
        write_addr_file(&path, addr).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "127.0.0.1:40123\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["click.addr"], "no temporary file left behind");
    }

    #[test]
    fn an_unwritable_addr_file_is_an_error_naming_it() {
        let path = Path::new("/nonexistent-dir/click.addr");
        let error = write_addr_file(path, SocketAddr::from(([127, 0, 0, 1], 1))).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent-dir/click.addr"),
            "{error}"
        );
    }
}
