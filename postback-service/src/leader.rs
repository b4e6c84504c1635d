//! What runs once per log, in the one instance holding the lease
//! ([`common::lease`]): the decider and the affiliate postback dispatcher.
//! Every other instance is a standby: it folds, serves the API and accepts
//! postbacks, and takes over when the leader stops or its lease expires.

use std::time::Duration;

use async_nats::jetstream::Context;
use common::{lease::Tenure, FoldStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    conversions::{self, DeciderConfig, DeciderInputs},
    deliveries::{self, Dispatcher},
};

/// The lease's key.
pub const LEASE_KEY: &str = "postback-service";

/// The led work and what it needs; cloned for each term of leadership.
#[derive(Clone)]
pub struct Led {
    /// The decider's own connection ([`crate::startup`]).
    pub js: Context,
    pub decider_inputs: DeciderInputs,
    pub decider: DeciderConfig,
    pub dispatcher: Dispatcher,
    pub postbacks_status: watch::Receiver<FoldStatus>,
}

impl Led {
    /// One term: first folds everything the log holds now of CONVERSIONS and
    /// POSTBACKS, so whatever the previous leader decided and delivered is
    /// known here before this instance decides or sends anything; then runs
    /// the decider and the dispatcher until `token` is cancelled. Both check
    /// `tenure` before they act (a round of decisions, an affiliate
    /// postback), in case this process was frozen past its lease.
    pub async fn run(self, token: CancellationToken, tenure: Tenure) {
        let folds = [
            (
                proto::stream::CONVERSIONS,
                self.decider_inputs.conversions_status.clone(),
            ),
            (proto::stream::POSTBACKS, self.postbacks_status.clone()),
        ];
        for (stream, status) in folds {
            tokio::select! {
                () = token.cancelled() => return,
                () = common::fold::caught_up_with(&self.js, stream, status, PATIENCE, WHY) => {}
            }
        }
        let conversions_status = self.decider_inputs.conversions_status.clone();
        let decider = conversions::run_decider(
            self.js.clone(),
            self.decider_inputs,
            self.decider,
            tenure.clone(),
            token.clone(),
        );
        let dispatcher =
            deliveries::run_dispatcher(self.dispatcher, conversions_status, tenure, token.clone());
        run_both(decider, dispatcher, token).await;
    }
}

/// Runs `a` and `b` as tasks of their own until both end. Whichever ends
/// first (a panic, say) ends the term: `token` is cancelled and the other is
/// awaited to its end, so the dispatcher finishes its attempts in flight and
/// publishes the outcomes it holds before the lease can be released (a
/// standby taking over would send those deliveries again). A panic is raised
/// again then, once both have ended.
async fn run_both<A, B>(a: A, b: B, token: CancellationToken)
where
    A: std::future::Future<Output = ()> + Send + 'static,
    B: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut a, mut b) = (tokio::spawn(a), tokio::spawn(b));
    let (first, other) = tokio::select! {
        ended = &mut a => (ended, b),
        ended = &mut b => (ended, a),
    };
    token.cancel();
    let second = other.await;
    for ended in [first, second] {
        if let Err(join) = ended {
            if join.is_panic() {
                std::panic::resume_unwind(join.into_panic());
            }
        }
    }
}

/// How long a new leader waits for a fold that applies nothing.
const PATIENCE: Duration = Duration::from_secs(30);
/// What waits, for the logs of [`common::fold::caught_up_with`].
const WHY: &str = "taking the lease";

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    use super::*;

    #[tokio::test]
    async fn a_panic_of_one_stops_the_other_and_is_raised_once_the_other_has_ended() {
        let token = CancellationToken::new();
        let drained = Arc::new(AtomicBool::new(false));
        let dispatcher = {
            let (token, drained) = (token.clone(), drained.clone());
            async move {
                token.cancelled().await;
                // Its attempts in flight, its outcomes kept for a late ack.
                tokio::time::sleep(Duration::from_millis(100)).await;
                drained.store(true, Ordering::SeqCst);
            }
        };
        let decider = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("a bug in the decider");
        };
        let term = tokio::spawn(run_both(decider, dispatcher, token.clone())).await;
        assert!(term.is_err_and(|e| e.is_panic()), "the panic is raised");
        assert!(token.is_cancelled());
        assert!(
            drained.load(Ordering::SeqCst),
            "after the dispatcher has ended"
        );
    }
}
