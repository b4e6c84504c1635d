//! Serving HTTP: the router on hyper's HTTP/1.1 connections, as `axum::serve`
//! does, with two bounds it does not have. A client must send each request
//! head within the header read timeout (it also closes a keep-alive connection
//! idle that long), so connections left half-open by a slow or hostile client
//! or a dead peer cannot pile up on the public click endpoint, nor hold up a
//! stop forever. And a stop waits for the connections still open at most
//! [`STOP_DRAIN`], then closes them.

use std::{net::SocketAddr, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::Service;

/// How long a stop waits for open connections to finish their requests:
/// as long as a request may take (the services' request timeout).
pub const STOP_DRAIN: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `stop` is cancelled, then lets the
/// open connections finish (at most [`STOP_DRAIN`]). Handlers see the
/// client's address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    header_read_timeout: Duration,
) {
    let mut make = router.into_make_service_with_connect_info::<SocketAddr>();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    // The connections' tasks: aborted if the drain runs out (in a process
    // that goes on, tests say, they would hold the service's state).
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, remote) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
        };
        let Ok(service) = make.call(remote).await;
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %remote, "connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(STOP_DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            after = ?STOP_DRAIN,
            left = connections.len(),
            "connections still open at the stop; closing them"
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}

/// A failed accept: the peer gave up (go on), or the process is out of file
/// descriptors or memory (wait a little for some to be freed, as a busy loop
/// would only make it worse).
async fn accept_failed(error: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::error!(%error, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
