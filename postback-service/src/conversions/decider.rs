//! The decider task: walks pending conversions in log order, decides each with
//! [`decide`](super::decide()), and publishes the decisions, round after round.
//!
//! It starts only once the conversions fold has reached the end of the log, so
//! every decision already in the log has been applied: replaying the log (a
//! restart, a wiped data dir) never decides a conversion again. After that, the
//! only new decisions are its own (one decider per log). It does not wait for a
//! round to be folded back before deciding the next: it reads the projection
//! together with what its unfolded rounds claimed ([`InFlight`]), and waits only
//! where that cannot be exact (cap counts; see there) or when
//! [`MAX_DECISIONS_IN_FLIGHT`] decisions are unfolded. A round's decisions are
//! published together, in batches ([`super::batch`]); a decision alone carries
//! `Nats-Msg-Id = decision-<conversion_id>-<report sequence>`, a batch an id of
//! its decisions' ids. The fold keeps only the first decision per report, so
//! even a publish whose ack was lost cannot give a conversion two outcomes.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use async_nats::jetstream::Context;
use catalog::Catalog;
use catalog::ConversionStatus;
use common::{lease::Tenure, FoldStatus};
use proto::clicks::v1::ClickRecorded;
use proto::conversions::v1::{ConversionAttributed, ConversionRejected, ConversionStatusUpdated};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    batch::{Limits, Outgoing},
    decide::{decide, decide_status, DecideInput, StatusVerdict, Verdict},
    fold::{cap_key, goal_claim, txid_claim, Conversions, Decision},
    in_flight::{Claims, InFlight},
    view::{status_to_proto, ConversionState, ConversionView},
};
use crate::clicks::Clicks;

/// Most decisions published per round.
const ROUND_LIMIT: usize = 4096;
/// Most decisions published and not yet folded back; past it the decider
/// waits for the fold to apply its oldest round, so a slow fold holds the
/// claims (about 250 bytes a decision) near 32 MB. A fold that has stopped
/// altogether (while still reporting itself caught up) lets the wait time
/// out after 5 s, and each such wait adds at most one round more: the growth
/// is bounded by time, as it was with a limit on rounds.
///
/// A burst of reports folds before any of the decisions published meanwhile,
/// so this is how far ahead of the fold the decider may get in a burst. It
/// counts decisions, not rounds: a round decides what one fold group made
/// pending, often a few hundred conversions, and a limit of 32 rounds stopped
/// the decider a few thousand decisions into a burst of 100k reports. It then
/// decided the rest only once the fold had reached its decisions, on the same
/// cores as the fold applying them, instead of while the fold applied the
/// reports.
const MAX_DECISIONS_IN_FLIGHT: usize = 32 * ROUND_LIMIT;

/// How the decider behaves.
#[derive(Debug, Clone)]
pub struct DeciderConfig {
    /// How long a conversion waits for an unknown click.
    pub grace: Duration,
    /// How long a decision publish waits for its ack.
    pub publish_timeout: Duration,
    /// Most pending conversions, and most queued status reports, looked at
    /// per round.
    pub scan_limit: usize,
    /// Most decisions in one batch message ([`super::batch`]); 1: each alone.
    pub batch_max: usize,
}

/// The projections and fold statuses the decider reads.
#[derive(Clone)]
pub struct DeciderInputs {
    pub conversions: Conversions,
    pub clicks: Clicks,
    pub catalog: Catalog,
    pub conversions_status: watch::Receiver<FoldStatus>,
    pub clicks_status: watch::Receiver<FoldStatus>,
    pub catalog_status: watch::Receiver<FoldStatus>,
}

/// A round whose publish failed: what it has still to send, and what it
/// decided, claimed until the fold has applied it once it is sent.
struct Resend {
    /// The messages not known to be in the log, as they were sent.
    messages: Vec<Outgoing>,
    /// The highest sequence acked before the failure.
    acked_top: Option<u64>,
    claims: Claims,
    decided: usize,
}

impl Resend {
    /// What is left to send after `failed`: its unacked messages, split if
    /// JetStream refused one as too large.
    fn after(mut self, failed: PublishFailed, limits: &mut Limits) -> Self {
        self.acked_top = self.acked_top.max(failed.acked_top);
        self.messages = failed.split_if_too_large(limits);
        self
    }
}

/// Sends `r`'s messages again. `Ok`: they are in the log, and its claims go
/// in flight up to the sequence given (`None`: nothing of it is in the log);
/// `Err`: what is still to send. Nothing is sent while `tenure` does not
/// hold; `r` is kept whole then: a tenure can lapse for a moment while the
/// lease is still this process's (a slow renewal, a short freeze), and the
/// decider goes on. Dropped, its claims were lost, and the next round decided
/// its conversions again (twice in the log, a cap counted twice). A lease
/// really lost cancels the decider.
async fn send_again(
    js: &Context,
    mut r: Resend,
    tenure: &Tenure,
    timeout: Duration,
    limits: &mut Limits,
) -> Result<Option<(u64, usize, Claims)>, Resend> {
    if !tenure.held() {
        return Err(r);
    }
    let messages = std::mem::take(&mut r.messages);
    match publish_messages(js, messages, timeout).await {
        Ok(top) => Ok(top.max(r.acked_top).map(|top| (top, r.decided, r.claims))),
        Err(failed) => {
            tracing::warn!(error = %failed.error, "decisions not yet published; retrying");
            Err(r.after(failed, limits))
        }
    }
}

/// Runs until `token` is cancelled.
pub async fn run_decider(
    js: Context,
    mut inputs: DeciderInputs,
    config: DeciderConfig,
    tenure: Tenure,
    token: CancellationToken,
) {
    let tick = (config.grace / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut waiting = Waiting::default();
    let mut in_flight = InFlight::default();
    // Where the next round resumes its walk of the pending conversions: the
    // rows before it are decided and in flight, or waiting for their click.
    // Once a walk has reached the last pending conversion, the next starts
    // from the start when nothing is in flight, and at least every `tick`
    // while conversions wait (so they are looked at again). A walk stopped
    // short (by the scan limit, behind a flood of conversions waiting for
    // clicks) goes on where it stopped: starting again would look at the same
    // waiting ones forever and never reach those reported after them. The
    // status queue's walk likewise goes on past updates that wait, and starts
    // again once it has seen the whole queue.
    let (mut resume_from, mut walked_all_at) = (0, std::time::Instant::now());
    let (mut pending_ended, mut status_walk) = (true, Walk::default());
    let mut limits = Limits::new(config.batch_max);
    // A failed publish's messages not known to be in the log: sent again as
    // they were, under the same ids, before anything is decided anew
    // (JetStream drops a copy of one that did land; decided again, its
    // conversions could land twice, in batches grouped otherwise). Its
    // claims then go in flight as a round's do, so no round decides its
    // conversions again or counts its attributions twice against a cap while
    // the fold has not applied them (some may be in the log already).
    let mut resend: Option<Resend> = None;
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = common::fold::changed(&mut inputs.conversions_status) => {}
            () = common::fold::changed(&mut inputs.clicks_status) => {}
            () = common::fold::changed(&mut inputs.catalog_status) => {}
            () = tokio::time::sleep(tick) => {}
        }
        if !inputs.conversions_status.borrow().caught_up {
            continue;
        }
        if let Some(r) = resend.take() {
            let timeout = config.publish_timeout;
            match send_again(&js, r, &tenure, timeout, &mut limits).await {
                Ok(Some((top, decided, claims))) => in_flight.push(top, decided, claims),
                Ok(None) => {}
                Err(r) => {
                    resend = Some(r);
                    continue;
                }
            }
        }
        if let Some(at) = in_flight.settle(inputs.conversions_status.borrow().applied_seq) {
            // Conversions opened again behind the walk: it goes back to them.
            (resume_from, pending_ended) = (resume_from.min(at), false);
        }
        let rewalk = !waiting.0.is_empty() && walked_all_at.elapsed() >= tick;
        if pending_ended && (in_flight.rounds() == 0 || rewalk) {
            (resume_from, walked_all_at) = (0, std::time::Instant::now());
        }
        if status_walk.ended {
            status_walk = Walk::default();
        }
        let walk = (&mut waiting, &in_flight, resume_from, &mut status_walk);
        match round(&js, &inputs, &config, &tenure, walk, limits).await {
            Ok(outcome) => {
                resume_from = outcome.resume_from;
                pending_ended = outcome.pending_ended;
                for (id, seq) in &outcome.reopened_behind {
                    in_flight.walk_back_to(id, *seq);
                }
                if let Some(top) = outcome.top {
                    in_flight.push(top, outcome.decided, outcome.claims);
                }
                // A cap count waits for everything in flight; a full window
                // for its oldest round only, so deciding goes on meanwhile.
                let until = if outcome.wait {
                    in_flight.top()
                } else if in_flight.decisions() >= MAX_DECISIONS_IN_FLIGHT {
                    in_flight.oldest()
                } else {
                    None
                };
                if let Some(seq) = until {
                    let mut status = inputs.conversions_status.clone();
                    let timeout = Duration::from_secs(5);
                    if !common::fold::wait_applied(&mut status, seq, timeout).await {
                        tracing::warn!(seq, "decisions not yet folded back; continuing");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "decider round failed; retrying");
                // What it walked past was not published, or not all of it:
                // walk it again, once what was is folded.
                status_walk = Walk::default();
                if let RoundError::Publish {
                    failed,
                    claims,
                    decided,
                } = error
                {
                    let unsent = Resend {
                        messages: Vec::new(),
                        acked_top: None,
                        claims: *claims,
                        decided,
                    };
                    resend = Some(unsent.after(failed, &mut limits));
                }
                // The lease's end (a tenure that ran out) cancels `token`
                // meanwhile: stop at once, not a tick later.
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(tick) => {}
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("projection read")]
    Store(#[from] sled::Error),
    #[error("reading a report back from the log: {0}")]
    ReadBack(String),
    #[error("{failed}")]
    Publish {
        #[source]
        failed: PublishFailed,
        claims: Box<Claims>,
        decided: usize,
    },
    #[error("the lease's tenure ended (was this process frozen?): nothing published")]
    TenureEnded,
}

/// Conversions whose last verdict was to wait for their click: conversion id →
/// (click id, reported at). While the click is still missing and the grace has
/// not run out, the verdict cannot change (it depends on nothing else), so a
/// round passes over them without decoding their views: a flood of postbacks
/// for clicks we never saw costs a key lookup each per round, not a decode.
/// And, per click, those waiting for it by report sequence: once the click
/// is in, they are decided before any later report of the click (their dedup
/// claims come first in log order). The report sequence each was remembered
/// at is the third map (id → sequence), so both updates are a lookup, not a
/// scan of the click's list (anyone may send many reports for one click).
#[derive(Debug, Default)]
struct Waiting(
    HashMap<String, (String, i64)>,
    HashMap<String, std::collections::BTreeMap<u64, String>>,
    HashMap<String, u64>,
);

/// Most conversions [`Waiting`] remembers (about 200 bytes each): past it,
/// the rest waiting for their click are looked at as any pending one, a view
/// decoded each walk. Anyone can send postbacks for click ids nobody saw, and
/// each waits out the grace (10 minutes by default): the memory must not
/// grow with their rate.
const MAX_WAITING: usize = 250_000;

impl Waiting {
    /// Remembers that `conversion_id`, reported at `seq`, waits for its
    /// click, if there is room.
    fn remember(&mut self, conversion_id: &str, since: (String, i64), seq: u64) {
        if self.0.len() >= MAX_WAITING && !self.0.contains_key(conversion_id) {
            return;
        }
        if let Some((click_id, _)) = self.0.get(conversion_id).cloned() {
            self.unlist(conversion_id, &click_id);
        }
        if !since.0.is_empty() {
            let of_click = self.1.entry(since.0.clone()).or_default();
            of_click.insert(seq, conversion_id.to_owned());
            self.2.insert(conversion_id.to_owned(), seq);
        }
        self.0.insert(conversion_id.to_owned(), since);
    }

    /// Forgets `conversion_id` (decided, or not waiting any more).
    fn forget(&mut self, conversion_id: &str) {
        if let Some((click_id, _)) = self.0.remove(conversion_id) {
            self.unlist(conversion_id, &click_id);
        }
    }

    /// Takes `conversion_id` out of `click_id`'s list.
    fn unlist(&mut self, conversion_id: &str, click_id: &str) {
        let Some(seq) = self.2.remove(conversion_id) else {
            return;
        };
        if let Some(of_click) = self.1.get_mut(click_id) {
            of_click.remove(&seq);
            if of_click.is_empty() {
                self.1.remove(click_id);
            }
        }
    }

    /// The earliest conversion remembered waiting for `click_id`, reported
    /// before `seq`: its id.
    fn earlier(&self, click_id: &str, seq: u64) -> Option<String> {
        let of_click = self.1.get(click_id)?;
        of_click.range(..seq).next().map(|(_, id)| id.clone())
    }

    /// Whether `conversion_id` is known to be still waiting at `now`.
    fn still(
        &self,
        conversion_id: &str,
        clicks: &Clicks,
        now: i64,
        grace_ms: i64,
    ) -> Result<bool, sled::Error> {
        let Some((click_id, reported_at_ms)) = self.0.get(conversion_id) else {
            return Ok(false);
        };
        Ok(now - reported_at_ms < grace_ms
            && (click_id.is_empty() || !clicks.contains(click_id)?))
    }
}

/// What a round did.
#[derive(Default)]
struct RoundOutcome {
    /// The highest stream sequence of the decisions published (`None`: none).
    top: Option<u64>,
    /// How many decisions were published.
    decided: usize,
    claims: Claims,
    /// The round stopped at a conversion it may decide only once the rounds in
    /// flight are folded back.
    wait: bool,
    /// The report sequence of the first pending conversion not looked at.
    resume_from: u64,
    /// The pending walk reached the last pending conversion.
    pending_ended: bool,
    /// Later reports of conversions decided in flight, passed: (conversion
    /// id, report sequence).
    reopened_behind: Vec<(String, u64)>,
}

/// A walk of the status queue, over as many rounds as it takes.
#[derive(Debug, Default)]
struct Walk {
    /// The first sequence not looked at.
    next: u64,
    /// It looked at everything (the next walk starts from the start).
    ended: bool,
    /// Conversions with an update this walk looked at: decided, waiting for
    /// the decision in flight or for the conversion's own. Their later
    /// updates wait for the next walk, so a conversion's updates are decided
    /// in log order, one per walk.
    held: HashSet<String>,
}

/// Decides what can be decided now and publishes it.
async fn round(
    js: &Context,
    inputs: &DeciderInputs,
    config: &DeciderConfig,
    tenure: &Tenure,
    (waiting, in_flight, from, walk): (&mut Waiting, &InFlight, u64, &mut Walk),
    limits: Limits,
) -> Result<RoundOutcome, RoundError> {
    if !inputs.catalog_status.borrow().caught_up {
        // `unknown_offer` is final, and an offer folded from an older version
        // has older terms: decide nothing until the catalog has reached the
        // log's end once (a projection rebuilt at start, a slow catalog fold).
        return Ok(RoundOutcome {
            resume_from: from,
            ..RoundOutcome::default()
        });
    }
    let now = common::time::now_ms();
    let clicks = inputs.clicks_status.borrow().clone();
    let catalog = inputs.catalog_status.borrow().clone();
    let grace_ms = config.grace.as_millis() as i64;
    // What this round's decisions claim; with `in_flight`, what is decided and
    // not yet folded back.
    let mut claims = Claims::default();
    let (mut wait, mut resume_from) = (false, from);
    let mut decisions = Vec::new();
    let mut reopened_behind = Vec::new();
    let (mut scanned, mut stopped) = (0, false);
    for row in inputs
        .conversions
        .pending_from(from)
        .take(config.scan_limit)
    {
        if decisions.len() >= ROUND_LIMIT {
            stopped = true;
            break;
        }
        let (seq, id) = row?;
        (resume_from, scanned) = (seq + 1, scanned + 1);
        // Decided and in flight, or in this round: a report opened again
        // (a verified one in place of an unverified one) may be met twice.
        // A later report of one decided in flight (opened again) is decided
        // once that decision is folded back: the walk comes back to it then.
        // A status decision of this round that opens one again does the same
        // (its `reopens_at`, below).
        if in_flight.decided(&id) {
            if in_flight.is_later_report(&id, seq) {
                reopened_behind.push((id, seq));
            }
            continue;
        }
        // Decided in this round: a later report of it (opened again while the
        // round walked) sends the walk back to it once the round is folded.
        if claims.conversions.contains(&id) {
            if claims.reports.get(&id) != Some(&seq) {
                claims.reopen_at(seq);
            }
            continue;
        }
        if waiting.still(&id, &inputs.clicks, now, grace_ms)? {
            continue;
        }
        // A group commits its rows one by one, in key order, so a report can
        // be listed pending (`p/`) a moment before its view (`v/`) is written,
        // or before the view of a conversion opened again is (the view there
        // is still the decided one, of an earlier report). Walked past, it
        // would wait for the next walk from the start, which a steady load (a
        // round always in flight) puts off until a lull: stop here and start
        // the next round at it. A view missing or stale in a group already
        // applied is not coming: pass it.
        let conversion = inputs
            .conversions
            .get(&id)?
            .filter(|c| c.state == ConversionState::Pending && c.reported_seq == seq);
        let Some(conversion) = conversion else {
            if seq > inputs.conversions_status.borrow().applied_seq {
                (resume_from, stopped) = (seq, true);
                break;
            }
            continue;
        };
        let click = match conversion.click_id.as_str() {
            "" => None,
            id => inputs.clicks.get(id)?,
        };
        // An earlier report of this click waited for it, and the walk is
        // past it (or the click came in while this round walked): that one
        // is decided first, as the log has them (under `first_per_goal`, the
        // first of a goal counts, a later one only with its own txid).
        let mut earlier_at = None;
        while let Some(earlier) = click
            .as_ref()
            .and_then(|k| waiting.earlier(&k.click_id, seq))
        {
            // Where it is pending now: its report, or a later one of it
            // (opened again) still before this one.
            let at = inputs
                .conversions
                .get(&earlier)?
                .filter(|c| c.state == ConversionState::Pending && c.reported_seq < seq)
                .map(|c| c.reported_seq);
            match at {
                Some(at)
                    if !in_flight.decided(&earlier) && !claims.conversions.contains(&earlier) =>
                {
                    earlier_at = Some(at);
                    break;
                }
                _ => waiting.forget(&earlier),
            }
        }
        if let Some(at) = earlier_at {
            (resume_from, stopped) = (at, true);
            break;
        }
        let (offer, affiliate) = match &click {
            Some(c) => (
                inputs.catalog.offer(&c.offer_id)?,
                inputs.catalog.affiliate(&c.affiliate_id)?,
            ),
            None => (None, None),
        };
        let capped = offer
            .as_deref()
            .filter(|o| o.caps.daily_conversions > 0 || o.caps.daily_conversions_per_affiliate > 0);
        if capped.is_some_and(|o| in_flight.attributed_to(&o.offer_id)) {
            // Its cap counts are being folded: decide it once they are in.
            (wait, resume_from, stopped) = (true, seq, true);
            break;
        }
        let gk = goal_claim(&conversion.click_id, &conversion.goal);
        let tk = txid_claim(&conversion.click_id, &conversion.goal, &conversion.txid);
        let cap_keys = match (capped, &click) {
            (Some(o), Some(k)) => {
                let day = o.day_of(conversion.converted_at_ms);
                Some((
                    cap_key(&o.offer_id, None, &day),
                    cap_key(&o.offer_id, Some(&k.affiliate_id), &day),
                ))
            }
            _ => None,
        };
        let used = |key: &Vec<u8>| -> Result<u64, sled::Error> {
            Ok(inputs.conversions.count(key)? + claims.caps.get(key).copied().unwrap_or(0))
        };
        let claimed = |key: &Vec<u8>| claims.keys.contains(key) || in_flight.key_taken(key);
        let dedup =
            inputs
                .conversions
                .dedup(&conversion.click_id, &conversion.goal, &conversion.txid)?;
        let cap_used = match &cap_keys {
            Some((offer_key, aff_key)) => (used(offer_key)?, used(aff_key)?),
            None => (0, 0),
        };
        // Unchecked at the door (it did not know the offer yet): the
        // parameters the report kept, if any, are checked now.
        let checked_now = match (&offer, &click) {
            (Some(o), Some(_))
                if unchecked_at_door(&conversion.origin, &conversion.verified_offer_id, o) =>
            {
                kept_params_pass(js, conversion.reported_seq, &conversion.conversion_id, o).await?
            }
            _ => false,
        };
        let input = DecideInput {
            conversion: &conversion,
            checked_now,
            click: click.as_ref(),
            offer: offer.as_deref(),
            affiliate: affiliate.as_deref(),
            goal_taken: dedup.goal_taken || claimed(&gk),
            txid_taken: dedup.txid_taken || claimed(&tk),
            click_wait_over: now - conversion.reported_at_ms >= grace_ms
                && clicks.caught_up
                && (clicks.at_tail
                    || clicks.applied_log_time_ms >= conversion.reported_at_ms + grace_ms),
            catalog_wait_over: catalog.at_tail
                || click
                    .as_ref()
                    .is_some_and(|k| catalog.applied_log_time_ms >= k.occurred_at_ms),
            cap_used,
        };
        let verdict = decide(input);
        if matches!(verdict, Verdict::Wait) {
            let since = (conversion.click_id.clone(), conversion.reported_at_ms);
            waiting.remember(&conversion.conversion_id, since, seq);
        } else {
            waiting.forget(&conversion.conversion_id);
        }
        if let Verdict::Attribute { offer_id, .. } = &verdict {
            claims.offers.insert(offer_id.clone());
            claims.keys.insert(gk);
            claims.keys.insert(tk);
            for key in cap_keys.into_iter().flat_map(|(a, b)| [a, b]) {
                *claims.caps.entry(key).or_default() += 1;
            }
        }
        if let Some(decision) = decision_event(&conversion, click.as_ref(), verdict, now) {
            claims.conversions.insert(conversion.conversion_id.clone());
            claims.reports.insert(conversion.conversion_id.clone(), seq);
            decisions.push(decision);
        }
    }
    let pending_ended = !stopped && scanned < config.scan_limit;
    // Later status reports, in log order; one per conversion per walk.
    let (mut scanned, mut stopped) = (0, false);
    for row in inputs
        .conversions
        .status_queue_from(walk.next)
        .take(config.scan_limit)
    {
        if decisions.len() >= ROUND_LIMIT {
            stopped = true;
            break;
        }
        let (seq, update) = row?;
        (walk.next, scanned) = (seq + 1, scanned + 1);
        // A later status of a conversion with a decision in flight waits for it:
        // it is decided against the view that decision leaves.
        let first = walk.held.insert(update.conversion_id.clone());
        if !first || in_flight.decided(&update.conversion_id) {
            continue;
        }
        let Some(view) = inputs.conversions.get(&update.conversion_id)? else {
            continue;
        };
        let offer = inputs.catalog.offer(&view.offer_id)?;
        let mut update = update;
        // A status report the door could not check (its click was not
        // folded there yet) of an attributed conversion: checked now, as a
        // conversion's first report is (a pending one waits for its
        // decision; a rejected one moves no status).
        if let Some(o) = offer.as_deref().filter(|o| {
            view.state == ConversionState::Attributed
                && unchecked_at_door(&update.origin, &update.verified_offer_id, o)
        }) {
            if kept_params_pass(js, seq, &update.conversion_id, o).await? {
                update.verified_offer_id.clone_from(&o.offer_id);
            }
        }
        if view.rejected_for_its_word(&update.advertiser_status) {
            // Folded, this decision opens the conversion again, pending at `seq`.
            claims.reopen_at(seq);
        }
        let verdict = decide_status(&view, offer.as_deref(), &update);
        let (from, to, changed, detail) = match verdict {
            StatusVerdict::Wait => continue,
            StatusVerdict::Ignore(why) => {
                let current = view.status.unwrap_or(ConversionStatus::Approved);
                (current, current, false, why)
            }
            StatusVerdict::Change { from, to } => (from, to, true, String::new()),
        };
        claims.conversions.insert(view.conversion_id.clone());
        decisions.push(Decision::StatusUpdated(ConversionStatusUpdated {
            event_id: uuid::Uuid::now_v7().to_string(),
            occurred_at_ms: now,
            conversion_id: view.conversion_id.clone(),
            from: status_to_proto(from) as i32,
            to: status_to_proto(to) as i32,
            changed,
            advertiser_status: update.advertiser_status,
            update_seq: seq,
            detail,
        }));
    }
    walk.ended = !stopped && scanned < config.scan_limit;
    // A process frozen past its lease may wake mid-round, while another
    // instance decides the same conversions from a projection that knows more.
    if !decisions.is_empty() && !tenure.held() {
        return Err(RoundError::TenureEnded);
    }
    let messages = super::batch::messages(&decisions, limits);
    let top = match publish_messages(js, messages, config.publish_timeout).await {
        Ok(top) => top,
        Err(failed) => {
            let decided = decisions.len();
            return Err(RoundError::Publish {
                failed,
                claims: Box::new(claims),
                decided,
            });
        }
    };
    if !decisions.is_empty() {
        tracing::debug!(count = decisions.len(), "decisions published");
    }
    Ok(RoundOutcome {
        top,
        decided: decisions.len(),
        claims,
        wait,
        resume_from,
        pending_ended,
        reopened_behind,
    })
}

/// Whether a report is an HTTP one the door did not check against `offer`,
/// which requires postback security: [`kept_params_pass`] checks it now. The
/// door may have checked it against another offer, one its `offer_id`
/// parameter named before its click was known; then it kept the parameters
/// too.
fn unchecked_at_door(origin: &str, verified_offer_id: &str, offer: &catalog::Offer) -> bool {
    origin == "http" && verified_offer_id != offer.offer_id && offer.security.is_required()
}

/// Whether the HTTP report at `seq` (of conversion `conversion_id`), which the
/// door could not check, passes `offer`'s postback security now: the caller's
/// address it recorded, and the parameters it kept (a token, a signature,
/// whose time window is taken as of when the door took the report; a replay
/// is not caught then). A report no longer in the log does not pass.
async fn kept_params_pass(
    js: &Context,
    seq: u64,
    conversion_id: &str,
    offer: &catalog::Offer,
) -> Result<bool, RoundError> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    use prost::Message;
    let read_back = |e: &dyn std::fmt::Display| RoundError::ReadBack(e.to_string());
    let stream = js
        .get_stream(proto::stream::CONVERSIONS)
        .await
        .map_err(|e| read_back(&e))?;
    let message = match stream.get_raw_message(seq).await {
        Ok(message) => message,
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(false),
        Err(e) => return Err(read_back(&e)),
    };
    let Ok(report) = proto::conversions::v1::ConversionReported::decode(message.payload) else {
        return Ok(false);
    };
    // The report's own address: a conversion opened again by a later report
    // keeps the first one's in its view.
    let Ok(ip) = report.ip.parse() else {
        return Ok(false);
    };
    if report.conversion_id != conversion_id {
        return Ok(false);
    }
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(report.unchecked_params.as_bytes())
            .into_owned()
            .collect();
    let replays = crate::security::ReplayGuard::default();
    let at = report.occurred_at_ms;
    Ok(crate::security::check(&offer.security, &pairs, ip, at, &replays).is_ok())
}

/// A publish that failed, with the messages not known to be in the log.
#[derive(Debug, thiserror::Error)]
#[error("publishing decisions: {error}")]
struct PublishFailed {
    #[source]
    error: common::nats::PublishError,
    /// The message that failed and every one after it, as sent.
    unacked: Vec<Outgoing>,
    /// The highest sequence acked before it.
    acked_top: Option<u64>,
}

impl PublishFailed {
    /// The messages to send again: as they were, or, when JetStream refused
    /// the first as too large for good, its decisions split again, and the
    /// others as they were (one may be in the log: sent again under its id,
    /// it is dropped; split too, its decisions would be there twice). The
    /// limits shrink (for good) only when the refused batch was built under
    /// them; one built under larger limits is split under the current ones
    /// first. A decision refused alone cannot be sent at all and leaves the
    /// limits as they are: it is dropped here, and decided again (and refused
    /// again) by the next rounds, as before batches.
    fn split_if_too_large(self, limits: &mut Limits) -> Vec<Outgoing> {
        if !self.error.refused_for_good() {
            return self.unacked;
        }
        let mut unacked = self.unacked.into_iter();
        let Some(refused) = unacked.next() else {
            return Vec::new();
        };
        let decisions = Decision::all_in(refused.subject, &refused.payload);
        if decisions.len() <= 1 {
            tracing::error!(error = %self.error, "a decision is too large for the CONVERSIONS stream");
            return unacked.collect();
        }
        // Built under these limits: they are too large. Built under larger
        // ones (before an earlier refusal): split under these first.
        if refused.payload.len() <= limits.bytes {
            *limits = limits.smaller();
            tracing::warn!(
                bytes = limits.bytes,
                alone = limits.alone(),
                "a decision batch was refused as too large (the stream's max_msg_size or the server's max_payload); smaller batches from now on"
            );
        }
        let mut again = super::batch::messages(&decisions, *limits);
        again.extend(unacked);
        again
    }
}

/// Publishes pipelined: sends all, then collects the acks. Returns the
/// highest stream sequence acked (`None`: nothing to publish).
async fn publish_messages(
    js: &Context,
    mut messages: Vec<Outgoing>,
    timeout: Duration,
) -> Result<Option<u64>, PublishFailed> {
    let mut acks = Vec::with_capacity(messages.len());
    let mut unsent = None;
    for (i, m) in messages.iter().enumerate() {
        let payload = m.payload.clone().into();
        match common::nats::send(js, m.subject.to_owned(), &m.msg_id, payload).await {
            Ok(ack) => acks.push(ack),
            Err(error) => {
                unsent = Some((i, error));
                break;
            }
        }
    }
    let mut top = None;
    for (i, ack) in acks.into_iter().enumerate() {
        let subject = messages[i].subject.to_owned();
        let error = match tokio::time::timeout(timeout, ack).await {
            Ok(Ok(ack)) => {
                top = top.max(Some(ack.sequence));
                continue;
            }
            Ok(Err(source)) => common::nats::PublishError::Send { subject, source },
            Err(_) => common::nats::PublishError::Timeout { subject, timeout },
        };
        let unacked = messages.split_off(i);
        return Err(PublishFailed {
            error,
            unacked,
            acked_top: top,
        });
    }
    match unsent {
        Some((i, error)) => Err(PublishFailed {
            error,
            unacked: messages.split_off(i),
            acked_top: top,
        }),
        None => Ok(top),
    }
}

/// The event of a verdict, or `None` for `Wait`.
pub(crate) fn decision_event(
    c: &ConversionView,
    click: Option<&ClickRecorded>,
    verdict: Verdict,
    now_ms: i64,
) -> Option<Decision> {
    let event_id = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("decision/{}", c.conversion_id).as_bytes(),
    )
    .to_string();
    match verdict {
        Verdict::Wait => None,
        Verdict::Attribute {
            offer_id,
            affiliate_id,
            payout_micros,
            payout_currency,
            revenue_micros,
            revenue_currency,
            postback_url,
            postback_statuses,
            status,
            cap_day,
        } => Some(Decision::Attributed(ConversionAttributed {
            event_id,
            occurred_at_ms: now_ms,
            conversion_id: c.conversion_id.clone(),
            click_id: c.click_id.clone(),
            offer_id,
            affiliate_id,
            goal: c.goal.clone(),
            txid: c.txid.clone(),
            payout_micros,
            payout_currency,
            revenue_micros,
            revenue_currency,
            converted_at_ms: c.converted_at_ms,
            reported_seq: c.reported_seq,
            // The click's macros filled now, while the click is at hand.
            affiliate_postback_url: match click {
                Some(k) => crate::deliveries::macros::fill_click(&postback_url, k),
                None => postback_url,
            },
            status: status_to_proto(status) as i32,
            postback_statuses,
            cap_day,
        })),
        Verdict::Reject { reason, detail } => Some(Decision::Rejected(ConversionRejected {
            event_id,
            occurred_at_ms: now_ms,
            conversion_id: c.conversion_id.clone(),
            click_id: c.click_id.clone(),
            reason: reason.to_proto() as i32,
            detail,
            offer_id: click.map(|k| k.offer_id.clone()).unwrap_or_default(),
            affiliate_id: click.map(|k| k.affiliate_id.clone()).unwrap_or_default(),
            goal: c.goal.clone(),
            txid: c.txid.clone(),
            converted_at_ms: c.converted_at_ms,
            reported_seq: c.reported_seq,
            raw: c.raw_hex.as_deref().map(hex_bytes).unwrap_or_default(),
        })),
    }
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::batch::MOST_PER_BATCH;
    use super::*;

    #[test]
    fn every_conversion_waiting_for_a_click_is_found_by_it_in_log_order() {
        let mut waiting = Waiting::default();
        let since = || ("k".to_owned(), 0);
        waiting.remember("e", since(), 3);
        waiting.remember("w", since(), 5);
        assert_eq!(waiting.earlier("k", 9).as_deref(), Some("e"));
        assert_eq!(waiting.earlier("k", 3), None, "none before it");
        // The earliest decided (its grace ran out): the next is still found.
        waiting.forget("e");
        assert_eq!(waiting.earlier("k", 9).as_deref(), Some("w"));
        // Remembered again at a later report: found there.
        waiting.remember("w", since(), 7);
        assert_eq!(waiting.earlier("k", 6), None);
        waiting.forget("w");
        assert!(
            waiting.1.is_empty() && waiting.2.is_empty(),
            "nothing left for the click"
        );
    }

    #[test]
    fn what_waits_for_its_click_is_remembered_up_to_a_bound() {
        let mut waiting = Waiting::default();
        for i in 0..MAX_WAITING + 10 {
            waiting.remember(&i.to_string(), (String::new(), 0), i as u64);
        }
        assert_eq!(waiting.0.len(), MAX_WAITING);
        // One already remembered is updated, full or not.
        waiting.remember("0", ("k".into(), 5), 0);
        assert_eq!(waiting.0["0"], ("k".to_owned(), 5));
        assert_eq!(waiting.0.len(), MAX_WAITING);
    }

    /// A context on a NATS that never answers (nothing is to be published),
    /// and the decider's settings.
    async fn unconnected() -> (Context, DeciderConfig) {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .unwrap();
        let config = DeciderConfig {
            grace: Duration::from_secs(60),
            publish_timeout: Duration::from_secs(1),
            scan_limit: 100,
            batch_max: MOST_PER_BATCH,
        };
        (async_nats::jetstream::new(client), config)
    }

    fn rejected(i: usize) -> Decision {
        Decision::Rejected(ConversionRejected {
            conversion_id: format!("conv-{i}"),
            reported_seq: i as u64 + 1,
            raw: vec![1; 1000],
            ..Default::default()
        })
    }

    /// A publish whose acks never come keeps every message as it was sent,
    /// to be sent again under the same ids (not decided again and regrouped).
    #[tokio::test]
    async fn a_failed_publish_keeps_its_messages_as_they_were_sent() {
        let (js, config) = unconnected().await;
        let round: Vec<Decision> = (0..600).map(rejected).collect();
        let messages = super::super::batch::messages(&round, Limits::new(MOST_PER_BATCH));
        assert!(messages.len() > 1);
        let failed = publish_messages(&js, messages.clone(), config.publish_timeout)
            .await
            .unwrap_err();
        assert!(matches!(
            failed.error,
            common::nats::PublishError::Timeout { .. }
        ));
        assert_eq!(failed.unacked, messages);
        let mut limits = Limits::new(MOST_PER_BATCH);
        assert_eq!(failed.split_if_too_large(&mut limits), messages);
        assert_eq!(limits, Limits::new(MOST_PER_BATCH), "not refused: as large");
    }

    /// A resend waits, whole, while the tenure does not hold (a lapse for a
    /// moment, the lease still this process's), and is kept whole when its
    /// publish fails again.
    #[tokio::test]
    async fn a_resend_is_kept_whole_until_it_is_in_the_log() {
        let (js, config) = unconnected().await;
        let round: Vec<Decision> = (0..3).map(rejected).collect();
        let mut limits = Limits::new(MOST_PER_BATCH);
        let messages = super::super::batch::messages(&round, limits);
        let mut claims = Claims::default();
        claims.conversions.insert("conv-0".into());
        let resend = Resend {
            messages: messages.clone(),
            acked_top: Some(7),
            claims,
            decided: 3,
        };
        let timeout = config.publish_timeout;
        let lapsed = Tenure::default();
        let Err(kept) = send_again(&js, resend, &lapsed, timeout, &mut limits).await else {
            panic!("sent, or dropped, without the tenure");
        };
        assert_eq!(kept.messages, messages);
        assert_eq!((kept.acked_top, kept.decided), (Some(7), 3));
        assert!(kept.claims.conversions.contains("conv-0"));
        let held = Tenure::until(tokio::time::Instant::now() + Duration::from_secs(60));
        let Err(again) = send_again(&js, kept, &held, timeout, &mut limits).await else {
            panic!("NATS never acks");
        };
        assert_eq!(again.messages, messages, "as they were sent");
        assert!(again.claims.conversions.contains("conv-0"));
    }

    /// A batch refused as too large for good is split again, smaller, down to
    /// every decision alone, and the messages after it are sent again as they
    /// were; a decision refused alone is dropped (decided again).
    #[test]
    fn a_batch_refused_as_too_large_is_sent_again_smaller() {
        use async_nats::jetstream::context::{PublishError, PublishErrorKind};
        let round: Vec<Decision> = (0..100).map(rejected).collect();
        let refused = |unacked: Vec<Outgoing>| PublishFailed {
            error: common::nats::PublishError::Send {
                subject: proto::subject::CONVERSIONS_DECIDED_BATCH.into(),
                source: PublishError::new(PublishErrorKind::MaxPayloadExceeded),
            },
            unacked,
            acked_top: None,
        };
        let mut limits = Limits::new(MOST_PER_BATCH);
        let first = super::super::batch::messages(&round, limits);
        let again = refused(first.clone()).split_if_too_large(&mut limits);
        assert_eq!(limits, Limits::new(MOST_PER_BATCH).smaller());
        assert!(again.len() > first.len());
        let decided = |messages: &[Outgoing]| -> Vec<Decision> {
            messages
                .iter()
                .flat_map(|m| Decision::all_in(m.subject, &m.payload))
                .collect()
        };
        assert_eq!(decided(&again), round, "every decision, in order, once");
        let rest = &again[again.len() - (first.len() - 1)..];
        assert_eq!(rest, &first[1..], "those after it as they were sent");
        let mut next = again;
        while !limits.alone() {
            next = refused(next).split_if_too_large(&mut limits);
            assert_eq!(decided(&next), round);
        }
        assert_eq!(
            next[0].subject,
            proto::subject::CONVERSION_REJECTED,
            "alone"
        );
        let dropped = refused(next.clone()).split_if_too_large(&mut limits);
        assert_eq!(dropped, &next[1..], "refused alone: dropped");

        // A lone decision refused leaves the limits as they are.
        let mut full = Limits::new(MOST_PER_BATCH);
        let lone = super::super::batch::messages(&round[..1], full);
        assert!(refused(lone).split_if_too_large(&mut full).is_empty());
        assert_eq!(full, Limits::new(MOST_PER_BATCH));

        // Batches built under larger limits, refused one after another after
        // a first refusal: each is split under the current limits, which
        // shrink no further (they were not what was refused).
        let big: Vec<Decision> = (0..600).map(rejected).collect();
        let mut limits = Limits::new(MOST_PER_BATCH);
        let built = super::super::batch::messages(&big, limits);
        assert!(built.len() >= 3 && built[1].payload.len() > 64 * 1024);
        let after_first = refused(built.clone()).split_if_too_large(&mut limits);
        let shrunk = Limits::new(MOST_PER_BATCH).smaller();
        assert_eq!(limits, shrunk);
        let second_at = after_first.len() - (built.len() - 1);
        let second = after_first[second_at..].to_vec();
        assert_eq!(second[0], built[1], "the second as it was sent");
        let after_second = refused(second).split_if_too_large(&mut limits);
        assert_eq!(
            limits, shrunk,
            "split under the current limits, not smaller"
        );
        assert!(after_second[0].payload.len() <= shrunk.bytes);
        assert_eq!(decided(&after_second), decided(&built[1..]));
    }

    #[tokio::test]
    async fn a_report_listed_before_its_view_is_written_is_where_the_next_round_starts() {
        for stale in [false, true] {
            listed_before_its_view(stale).await;
        }
    }

    /// A pending row at 5 with no view (`stale`: with the view of an earlier
    /// report of its conversion), walked with the fold at 4 and then at 5.
    async fn listed_before_its_view(stale: bool) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let rows = common::FoldTree::open(&db, "conversions").unwrap();
        let mut staged = common::Staged::new(&rows);
        let conversion = uuid::Uuid::now_v7().to_string();
        super::super::pending::add(&mut staged, 5, &conversion, "").unwrap();
        if stale {
            // The view as decided for an earlier report (rejected for its
            // word), not yet the view opened again at 5.
            let mut view = ConversionView::reported(&Default::default(), 1, 0);
            view.conversion_id.clone_from(&conversion);
            view.state = ConversionState::Rejected;
            staged.put_packed(super::super::fold::view_key(&conversion), &view);
        }
        staged.commit(5).unwrap();
        let status = |applied_seq| {
            let (tx, rx) = common::fold::status_channel("CONVERSIONS");
            tx.send_modify(|s| (s.applied_seq, s.caught_up) = (applied_seq, true));
            rx
        };
        // Never used: nothing is decided.
        let (js, config) = unconnected().await;
        let walk_after = |applied_seq, catalog_caught_up| {
            let catalog_status = match catalog_caught_up {
                true => status(0),
                false => common::fold::status_channel("CATALOG").1,
            };
            let inputs = DeciderInputs {
                conversions: Conversions::new(rows.rows().clone()),
                clicks: Clicks::new(db.open_tree("clicks").unwrap()),
                catalog: Catalog::new(db.open_tree("catalog").unwrap()),
                conversions_status: status(applied_seq),
                clicks_status: status(0),
                catalog_status,
            };
            let (js, config) = (js.clone(), config.clone());
            async move {
                let (mut waiting, in_flight, mut walk) = Default::default();
                let walk = (&mut waiting, &in_flight, 0, &mut walk);
                let tenure = Tenure::default();
                let outcome = round(
                    &js,
                    &inputs,
                    &config,
                    &tenure,
                    walk,
                    Limits::new(MOST_PER_BATCH),
                )
                .await
                .unwrap();
                (outcome.resume_from, outcome.pending_ended)
            }
        };
        assert_eq!(
            walk_after(4, true).await,
            (5, false),
            "its group is being written: the next round starts at it"
        );
        assert_eq!(
            walk_after(5, true).await,
            (6, true),
            "its group is applied and it has no view: passed, no stall"
        );
        assert_eq!(
            walk_after(5, false).await,
            (0, false),
            "the catalog has not reached the log's end: nothing is walked"
        );
    }

    /// Applies one event with `fold` at `seq`, in a group of its own.
    fn fold_one<F: common::fold::Fold>(
        tree: &common::FoldTree,
        mut fold: F,
        subject: &str,
        payload: &[u8],
        seq: u64,
    ) {
        let entry = common::fold::LogEntry {
            subject,
            payload,
            seq,
            log_time_ms: 0,
        };
        common::fold::apply_new(tree, &mut fold, &[entry]).unwrap();
    }

    /// A (no txid) waited for its click; the walk went on past it; the click
    /// came, then B (the same click and goal, a txid). Under `first_per_goal`
    /// A counts and B too: B decided first would make A a duplicate.
    #[tokio::test]
    async fn a_report_that_waited_for_its_click_is_decided_before_a_later_one_of_it() {
        use prost::Message;
        use proto::conversions::v1::{ConversionOrigin, ConversionReported};
        let db = sled::Config::new().temporary(true).open().unwrap();
        let trees = |name| common::FoldTree::open(&db, name).unwrap();
        let (rows, clicks, catalog) = (trees("conversions"), trees("clicks"), trees("catalog"));
        let offer = proto::catalog::v1::OfferUpserted {
            offer_id: "o1".into(),
            url: "https://o.test/".into(),
            ..Default::default()
        };
        let offer_subject = proto::subject::offer("o1");
        fold_one(
            &catalog,
            catalog::CatalogFold,
            &offer_subject,
            &offer.encode_to_vec(),
            1,
        );
        let affiliate = proto::catalog::v1::AffiliateUpserted {
            affiliate_id: "a1".into(),
            ..Default::default()
        };
        let subject = proto::subject::affiliate("a1");
        fold_one(
            &catalog,
            catalog::CatalogFold,
            &subject,
            &affiliate.encode_to_vec(),
            2,
        );
        let click_id = uuid::Uuid::now_v7().to_string();
        let now = common::time::now_ms();
        let report = |txid: &str| ConversionReported {
            click_id: click_id.clone(),
            txid: txid.into(),
            origin: ConversionOrigin::Http as i32,
            occurred_at_ms: now,
            ..Default::default()
        };
        let reported = proto::subject::CONVERSION_REPORTED;
        let fold = || super::super::fold::ConversionsFold;
        fold_one(&rows, fold(), reported, &report("").encode_to_vec(), 3);
        let click = proto::clicks::v1::ClickRecorded {
            event_id: click_id.clone(),
            click_id: click_id.clone(),
            offer_id: "o1".into(),
            affiliate_id: "a1".into(),
            occurred_at_ms: now - 1_000,
            ..Default::default()
        };
        let recorded = proto::subject::CLICK_RECORDED;
        fold_one(
            &clicks,
            crate::clicks::ClicksFold,
            recorded,
            &click.encode_to_vec(),
            1,
        );
        fold_one(&rows, fold(), reported, &report("T").encode_to_vec(), 7);
        let status = |applied_seq| {
            let (tx, rx) = common::fold::status_channel("S");
            tx.send_modify(|s| (s.applied_seq, s.caught_up, s.at_tail) = (applied_seq, true, true));
            rx
        };
        let inputs = DeciderInputs {
            conversions: Conversions::new(rows.rows().clone()),
            clicks: Clicks::new(clicks.rows().clone()),
            catalog: Catalog::new(catalog.rows().clone()),
            conversions_status: status(7),
            clicks_status: status(1),
            catalog_status: status(2),
        };
        // Never used: nothing is published.
        let (js, config) = unconnected().await;
        let mut waiting = Waiting::default();
        let first = crate::postback::conversion_id(&click_id, "", "");
        waiting.remember(&first, (click_id.clone(), now), 3);
        let (in_flight, mut walk) = Default::default();
        let tenure = Tenure::default();
        let walk = (&mut waiting, &in_flight, 4, &mut walk);
        let outcome = round(
            &js,
            &inputs,
            &config,
            &tenure,
            walk,
            Limits::new(MOST_PER_BATCH),
        )
        .await;
        assert!(
            matches!(&outcome, Ok(o) if o.decided == 0 && o.resume_from == 3),
            "{:?}",
            outcome.map(|o| (o.decided, o.resume_from))
        );

        // Decided, and NATS never acks: the failure carries what the round
        // claimed, to go in flight once its messages are sent again (a round
        // meanwhile would decide them again, or count them twice on a cap).
        let (mut waiting, mut walk) = (Waiting::default(), Walk::default());
        let tenure = Tenure::until(tokio::time::Instant::now() + Duration::from_secs(60));
        let walk = (&mut waiting, &in_flight, 0, &mut walk);
        let limits = Limits::new(MOST_PER_BATCH);
        let failed = round(&js, &inputs, &config, &tenure, walk, limits).await;
        let Err(RoundError::Publish {
            failed,
            claims,
            decided,
        }) = failed
        else {
            panic!("a publish failure: {:?}", failed.map(|o| o.decided));
        };
        let second = crate::postback::conversion_id(&click_id, "", "T");
        assert_eq!(decided, 2);
        assert!(claims.conversions.contains(&first) && claims.conversions.contains(&second));
        assert_eq!(failed.acked_top, None);
        assert_eq!(failed.unacked.len(), 1, "one batch of two");
    }

    #[test]
    fn a_waiting_conversion_is_passed_over_until_its_click_or_the_grace_comes() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("clicks").unwrap();
        let clicks = Clicks::new(tree.clone());
        let mut waiting = Waiting::default();
        waiting.0.insert("conv".into(), ("k1".into(), 1_000));
        waiting.0.insert("no-click".into(), (String::new(), 1_000));
        let still = |w: &Waiting, id: &str, now| w.still(id, &clicks, now, 500).unwrap();
        assert!(
            still(&waiting, "conv", 1_499),
            "click missing, grace not over"
        );
        assert!(still(&waiting, "no-click", 1_499));
        assert!(!still(&waiting, "conv", 1_500), "grace over: decide again");
        assert!(!still(&waiting, "unknown", 1_000), "never seen: decide");
        tree.insert(crate::clicks::click_key("k1"), b"x".as_slice())
            .unwrap();
        assert!(!still(&waiting, "conv", 1_001), "its click came: decide");
    }
}
