//! Read-your-writes for the API: a row the projection does not hold yet may
//! already be in the log (a click redirected, a postback acked, a partner's
//! report published a moment ago) and only not folded. Before a handler says
//! "unknown", it waits, briefly, for the fold to reach the log's end as it is
//! now, and reads again.

use std::time::Duration;

use async_nats::jetstream::Context;
use common::fold::FoldStatus;
use tokio::sync::watch;

/// Waits until the fold reporting to `status` has applied everything `stream`
/// held when asked. False when that did not happen within `wait`, NATS's
/// answer of where the log ends included (NATS down: at once or at `wait`).
pub(super) async fn caught_up(
    js: &Context,
    stream: &str,
    status: &watch::Receiver<FoldStatus>,
    wait: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    // `get_stream` asks the server for the stream's info, as of now.
    let last = match tokio::time::timeout_at(deadline, js.get_stream(stream)).await {
        Ok(Ok(stream)) => stream.cached_info().state.last_sequence,
        Ok(Err(_)) | Err(_) => return false,
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    common::fold::wait_applied(&mut status.clone(), last, left).await
}
