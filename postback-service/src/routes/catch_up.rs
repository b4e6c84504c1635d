//! Read-your-writes for the API: a row the projection does not hold yet may
//! already be in the log (a click redirected, a postback acked, a partner's
//! report published a moment ago) and only not folded. Before a handler says
//! "unknown", it waits, briefly, for the fold to reach the log's end as it is
//! now, and reads again.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_nats::jetstream::Context;
use common::fold::FoldStatus;
use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use tokio::sync::watch;

use super::AppState;

/// How often, at most, one process asks NATS where a stream ends: the asks
/// of the requests that arrive within one slot are one request, sent at the
/// slot's end, so after each of them. A flood of postbacks for click ids
/// nobody saw (anyone can send them) costs NATS a thousand stream-info
/// requests a second per stream, not one per postback; each such read waits
/// a millisecond more.
const ASK_EVERY: Duration = Duration::from_millis(1);

/// The shared asks for where each stream ends ([`ASK_EVERY`]).
#[derive(Default)]
pub struct LogEnds {
    asks: Mutex<HashMap<&'static str, (Instant, Answer)>>,
}

/// A stream's last sequence as NATS answers it, once, to every read that
/// shares the ask.
type Answer = Shared<BoxFuture<'static, Option<u64>>>;

impl LogEnds {
    /// `stream`'s last sequence, from a stream-info request NATS answered
    /// after this call began; `None` when NATS did not answer.
    async fn last_sequence(&self, js: &Context, stream: &'static str) -> Option<u64> {
        let js = js.clone();
        self.shared(stream, move || {
            async move { common::nats::last_sequence(&js, stream).await }.boxed()
        })
        .await
    }

    /// The answer of `ask` sent at the end of the current slot for `stream`
    /// (after this call began), shared with every call in that slot.
    async fn shared(
        &self,
        stream: &'static str,
        ask: impl FnOnce() -> BoxFuture<'static, Option<u64>>,
    ) -> Option<u64> {
        let answer = {
            let mut asks = self
                .asks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match asks.get(stream) {
                // Not sent yet: it goes after this call began.
                Some((at, answer)) if *at > Instant::now() => answer.clone(),
                _ => {
                    let at = Instant::now() + ASK_EVERY;
                    let sent = ask();
                    let answer = async move {
                        tokio::time::sleep_until(at.into()).await;
                        sent.await
                    }
                    .boxed()
                    .shared();
                    asks.insert(stream, (at, answer.clone()));
                    answer
                }
            }
        };
        answer.await
    }
}

/// Waits until the fold reporting to `status` has applied everything `stream`
/// held when asked. False when that did not happen within `wait`, NATS's
/// answer of where the log ends included (NATS down: at once or at `wait`).
pub(super) async fn caught_up(
    state: &AppState,
    stream: &'static str,
    status: &watch::Receiver<FoldStatus>,
    wait: Duration,
) -> bool {
    let asked = state.log_ends.last_sequence(&state.js, stream);
    common::fold::reaches_end(asked, status, wait).await
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };

    use futures::FutureExt;

    use super::{LogEnds, ASK_EVERY};

    #[tokio::test]
    async fn reads_arriving_together_share_one_ask_and_later_ones_ask_again() {
        let ends = LogEnds::default();
        let sent = Arc::new(AtomicU64::new(0));
        let ask = || {
            let sent = Arc::clone(&sent);
            move || async move { Some(sent.fetch_add(1, Ordering::SeqCst) + 1) }.boxed()
        };
        let together = futures::future::join_all((0..100).map(|_| ends.shared("S", ask())));
        let answers = together.await;
        // One ask, or a few if this thread was held up past a slot meanwhile.
        let asks = sent.load(Ordering::SeqCst);
        assert!((1..=3).contains(&asks), "{asks} asks for a hundred reads");
        assert!(answers.iter().all(|a| a.is_some_and(|n| n <= asks)));
        // Past the slot: a read begun now needs an answer given after it.
        tokio::time::sleep(ASK_EVERY * 2).await;
        assert_eq!(ends.shared("S", ask()).await, Some(asks + 1));
        // Another stream has asks of its own.
        assert_eq!(ends.shared("T", ask()).await, Some(asks + 2));
    }
}
