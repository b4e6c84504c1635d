//! Decisions published but not yet folded back.
//!
//! The decider used to wait after every round until the fold had applied the
//! round's decisions, so that the next round read pending conversions, dedup
//! keys and cap counts that included them. Deciding and folding then took
//! turns, and each stage idled while the other worked. Instead, the decider
//! remembers what its unfolded rounds claimed and reads the projection *plus*
//! these claims, so it can decide the next round while the fold applies the
//! last one:
//!
//! - a conversion it decided is passed over, though its pending row is still
//!   there, and so is a later status report of a conversion with any decision
//!   in flight (it must be decided against the view that decision leaves);
//! - a dedup key an attribution claimed is taken (a set: counting a key both in
//!   the projection and here cannot matter);
//! - cap counts are the exception: a count read from the projection may or may
//!   not include a claim that is being folded at that moment, and counting it
//!   twice would reject a conversion under its cap. So a conversion of an offer
//!   with conversion caps is not decided while an earlier attribution to that
//!   offer is in flight: the round stops there and the decider waits for the
//!   fold, as it always did.
//!
//! A round leaves this record once the fold's applied sequence reaches the
//! round's last decision: by then every effect of it is in the projection.

use std::collections::{HashMap, HashSet, VecDeque};

/// What one round's decisions claimed.
#[derive(Debug, Default)]
pub(super) struct Claims {
    /// Conversions decided (a report or a later status): their pending or
    /// status-queue rows stay until the fold removes them.
    pub(super) conversions: HashSet<String>,
    /// Of those, the ones decided as a report: the report's sequence.
    pub(super) reports: HashMap<String, u64>,
    /// Dedup keys (goal, txid) claimed by attributions.
    pub(super) keys: HashSet<Vec<u8>>,
    /// Offers attributed to.
    pub(super) offers: HashSet<String>,
    /// Cap counts claimed within the round (offers with conversion caps).
    pub(super) caps: HashMap<Vec<u8>, u64>,
    /// The lowest report sequence at which a status decision of the round
    /// opens a conversion again (a word corrected before the conversion's
    /// rejection for its word was folded): its pending row is written there,
    /// behind where the walk of pending conversions may already be.
    pub(super) reopens_at: Option<u64>,
}

impl Claims {
    /// Records that the round opens a conversion again at `seq`
    /// ([`Self::reopens_at`] keeps the lowest).
    pub(super) fn reopen_at(&mut self, seq: u64) {
        self.reopens_at = Some(self.reopens_at.map_or(seq, |at| at.min(seq)));
    }
}

/// The claims of the rounds published and not yet folded back, each entry
/// tagged with the stream sequence of its round's last decision. One map per
/// kind, so a lookup costs the same however many rounds are in flight.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    /// The rounds in flight, oldest first.
    rounds: VecDeque<Round>,
    /// Decisions in flight: the rounds' counts summed.
    decisions: usize,
    conversions: HashMap<String, u64>,
    /// Conversions decided as a report: the report's sequence.
    reports: HashMap<String, u64>,
    keys: HashMap<Vec<u8>, u64>,
    offers: HashMap<String, u64>,
}

/// One round in flight: its last decision's sequence, how many decisions it
/// published, and what it claimed, so that settling it removes its own
/// entries instead of walking every entry in flight (up to
/// `MAX_DECISIONS_IN_FLIGHT`, once per fold group).
#[derive(Debug)]
struct Round {
    top: u64,
    decisions: usize,
    claims: Claims,
}

impl InFlight {
    /// Records a round whose last decision is at stream sequence `top`.
    pub(super) fn push(&mut self, top: u64, decisions: usize, claims: Claims) {
        for k in &claims.conversions {
            self.conversions.insert(k.clone(), top);
        }
        for (k, seq) in &claims.reports {
            self.reports.insert(k.clone(), *seq);
        }
        for k in &claims.keys {
            self.keys.insert(k.clone(), top);
        }
        for k in &claims.offers {
            self.offers.insert(k.clone(), top);
        }
        self.decisions += decisions;
        self.rounds.push_back(Round {
            top,
            decisions,
            claims,
        });
    }

    /// Forgets the rounds the fold has applied (`applied`: its sequence).
    /// Returns the lowest sequence at which they opened a conversion again
    /// ([`Claims::reopens_at`]): the walk of pending conversions must go back
    /// there.
    pub(super) fn settle(&mut self, applied: u64) -> Option<u64> {
        let mut reopened = None;
        while self.rounds.front().is_some_and(|r| r.top <= applied) {
            let Some(round) = self.rounds.pop_front() else {
                break;
            };
            reopened = reopened.into_iter().chain(round.claims.reopens_at).min();
            self.decisions -= round.decisions;
            // An entry a later round claimed again (an offer attributed to in
            // both) stays until that round is applied too.
            for k in &round.claims.conversions {
                forget(&mut self.conversions, k, applied);
                if !self.conversions.contains_key(k) {
                    self.reports.remove(k);
                }
            }
            for k in &round.claims.keys {
                forget(&mut self.keys, k, applied);
            }
            for k in &round.claims.offers {
                forget(&mut self.offers, k, applied);
            }
        }
        reopened
    }

    /// Rounds in flight.
    pub(super) fn rounds(&self) -> usize {
        self.rounds.len()
    }

    /// Decisions in flight.
    pub(super) fn decisions(&self) -> usize {
        self.decisions
    }

    /// The sequence the fold must reach for nothing to be in flight.
    pub(super) fn top(&self) -> Option<u64> {
        self.rounds.back().map(|r| r.top)
    }

    /// The sequence the fold must reach for the oldest round to leave.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.rounds.front().map(|r| r.top)
    }

    /// Whether an unfolded round decided this conversion.
    pub(super) fn decided(&self, conversion_id: &str) -> bool {
        self.conversions.contains_key(conversion_id)
    }

    /// Whether the pending row at `seq` of a conversion an unfolded round
    /// decided is a report of it that came after (it was opened again). The
    /// walk passes it while that decision is in flight; [`Self::walk_back_to`]
    /// sends the walk back to it once the round is folded back.
    pub(super) fn is_later_report(&self, conversion_id: &str, seq: u64) -> bool {
        self.conversions.contains_key(conversion_id)
            && self.reports.get(conversion_id) != Some(&seq)
    }

    /// Makes the round that last decided `conversion_id` send the walk back
    /// to `seq` when it is settled ([`Claims::reopens_at`]).
    pub(super) fn walk_back_to(&mut self, conversion_id: &str, seq: u64) {
        let Some(top) = self.conversions.get(conversion_id).copied() else {
            return;
        };
        if let Some(round) = self.rounds.iter_mut().find(|r| r.top == top) {
            round.claims.reopen_at(seq);
        }
    }

    /// Whether an unfolded attribution claimed this dedup key.
    pub(super) fn key_taken(&self, key: &[u8]) -> bool {
        self.keys.contains_key(key)
    }

    /// Whether an unfolded attribution went to this offer.
    pub(super) fn attributed_to(&self, offer_id: &str) -> bool {
        self.offers.contains_key(offer_id)
    }
}

/// Removes `key` if the round that claimed it last is applied.
fn forget<K, Q>(map: &mut HashMap<K, u64>, key: &Q, applied: u64)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if map.get(key).is_some_and(|top| *top <= applied) {
        map.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(conversion: &str, key: &[u8], offer: &str) -> Claims {
        let mut c = Claims::default();
        c.conversions.insert(conversion.into());
        c.keys.insert(key.to_vec());
        c.offers.insert(offer.into());
        c
    }

    #[test]
    fn rounds_are_remembered_until_the_fold_applies_their_last_decision() {
        let mut f = InFlight::default();
        f.push(10, 1, claims("a", b"d/k1", "o1"));
        f.push(20, 3, claims("b", b"d/k2", "o2"));
        assert!(f.decided("a") && f.decided("b") && !f.decided("c"));
        assert!(f.key_taken(b"d/k1") && f.key_taken(b"d/k2") && !f.key_taken(b"d/k3"));
        assert!(f.attributed_to("o1") && !f.attributed_to("o3"));
        assert_eq!((f.rounds(), f.top(), f.oldest()), (2, Some(20), Some(10)));
        assert_eq!(f.decisions(), 4);

        f.settle(19);
        assert_eq!((f.decisions(), f.oldest()), (3, Some(20)));
        assert!(!f.decided("a"), "round 1 folded back");
        assert!(f.decided("b") && f.key_taken(b"d/k2"), "round 2 not yet");
        f.push(30, 1, claims("c", b"d/k3", "o2"));
        f.settle(20);
        assert!(!f.key_taken(b"d/k2") && f.decided("c"));
        assert!(f.attributed_to("o2"), "claimed again by the round at 30");
        f.settle(30);
        assert!(!f.attributed_to("o2"));
        assert_eq!((f.rounds(), f.top(), f.decisions()), (0, None, 0));
        assert!(!f.key_taken(b"d/k2"));
    }

    #[test]
    fn a_later_report_of_a_conversion_decided_in_flight_is_walked_again_once_folded_back() {
        let mut f = InFlight::default();
        let mut decided = claims("c", b"d/k", "o1");
        decided.reports.insert("c".into(), 5);
        f.push(10, 1, decided);
        assert!(!f.is_later_report("c", 5), "the report decided");
        assert!(!f.is_later_report("other", 7), "nothing in flight");
        assert!(f.is_later_report("c", 8), "opened again at 8");
        f.walk_back_to("c", 8);
        assert_eq!(f.settle(10), Some(8));
        assert!(!f.decided("c") && !f.is_later_report("c", 8));
    }

    #[test]
    fn settling_tells_the_lowest_sequence_its_rounds_opened_a_conversion_again_at() {
        let mut f = InFlight::default();
        let reopening = |at| Claims {
            reopens_at: Some(at),
            ..Claims::default()
        };
        f.push(10, 1, reopening(7));
        f.push(20, 1, Claims::default());
        f.push(30, 1, reopening(3));
        f.push(40, 1, reopening(5));
        assert_eq!(f.settle(9), None, "nothing folded back");
        assert_eq!(f.settle(20), Some(7));
        assert_eq!(f.settle(40), Some(3), "the lowest of the two");
        assert_eq!(f.settle(50), None);
    }
}
