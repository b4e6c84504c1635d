//! Property: any sequence of events folds to the same projection whether applied
//! at once, in batches, with redeliveries and restarts in between, or staged
//! over the group before while that one is still uncommitted, as the services
//! fold (real sled).

use common::{
    fold::{apply_new, stage_new, Fold},
    store::Sealed,
    LogEntry,
};
use postback_service::{
    clicks::ClicksFold, conversions::ConversionsFold, deliveries::PostbacksFold,
};
use proptest::prelude::*;
use prost::Message;
use proto::clicks::v1::{ClickRecorded, ClicksRecorded};
use proto::conversions::v1::{
    conversion_decision, ConversionAttributed, ConversionDecision, ConversionRejected,
    ConversionReported, ConversionStatusUpdated, ConversionsDecided,
};
use proto::postbacks::v1::{PostbackDelivered, PostbackFailed, PostbackRetryRequested};

const CLICKS: [&str; 3] = [
    "0190a0b4-7c6e-7a2b-9c1d-2e3f4a5b6c70",
    "0190a0b4-7c6e-7a2b-9c1d-2e3f4a5b6c71",
    "0190a0b4-7c6e-7a2b-9c1d-2e3f4a5b6c72",
];

/// One generated decision, as a batch holds it (alone, it is the message of
/// its own subject).
fn decision() -> impl Strategy<Value = ConversionDecision> {
    use conversion_decision::Decision as D;
    let click = 0..CLICKS.len();
    let conv = 0..4usize;
    let id = |c: usize, v: usize| {
        postback_service::postback::conversion_id(CLICKS[c], "", ["", "a", "b", "x"][v])
    };
    prop_oneof![
        (click.clone(), conv.clone(), 0..2u32).prop_map(move |(c, v, st)| D::Attributed(
            ConversionAttributed {
                conversion_id: id(c, v),
                offer_id: "o1".into(),
                affiliate_id: "a1".into(),
                payout_micros: 2_000_000,
                payout_currency: "USD".into(),
                revenue_currency: "USD".into(),
                affiliate_postback_url: "http://aff.test/{click_id}".into(),
                status: st as i32 + 1,
                cap_day: "2026-01-01".into(),
                ..Default::default()
            }
        )),
        (click.clone(), conv.clone(), 1..6i32).prop_map(move |(c, v, reason)| D::Rejected(
            ConversionRejected {
                conversion_id: id(c, v),
                reason,
                ..Default::default()
            }
        )),
        (click, conv, 1..4i32, any::<bool>(), 0..30u64).prop_map(
            move |(c, v, to, changed, seq)| D::StatusUpdated(ConversionStatusUpdated {
                conversion_id: id(c, v),
                from: 2,
                to,
                changed,
                update_seq: seq,
                ..Default::default()
            })
        ),
    ]
    .prop_map(|d| ConversionDecision { decision: Some(d) })
}

/// One generated event: (subject, payload).
fn event() -> impl Strategy<Value = (String, Vec<u8>)> {
    let click = 0..CLICKS.len();
    let txid = prop_oneof![Just(String::new()), "[ab]"];
    let status = prop_oneof![
        Just(String::new()),
        Just("hold".to_owned()),
        Just("sale".to_owned()),
        Just("trash".to_owned())
    ];
    prop_oneof![
        (click.clone(), 0..3i64, "[a-c]{0,2}").prop_map(|(c, t, ip)| (
            "clicks.v1.recorded".to_owned(),
            ClickRecorded {
                click_id: CLICKS[c].into(),
                offer_id: "o1".into(),
                affiliate_id: "a1".into(),
                ip,
                occurred_at_ms: t * 3_600_000 * 12,
                ..Default::default()
            }
            .encode_to_vec()
        )),
        (click, txid, status).prop_map(|(c, txid, status)| (
            "conversions.v1.reported".to_owned(),
            ConversionReported {
                click_id: CLICKS[c].into(),
                txid,
                status,
                ..Default::default()
            }
            .encode_to_vec()
        )),
        decision().prop_map(|d| {
            use conversion_decision::Decision as D;
            match d.decision.expect("always set") {
                D::Attributed(e) => ("conversions.v1.attributed".to_owned(), e.encode_to_vec()),
                D::Rejected(e) => ("conversions.v1.rejected".to_owned(), e.encode_to_vec()),
                D::StatusUpdated(e) => (
                    "conversions.v1.status_updated".to_owned(),
                    e.encode_to_vec(),
                ),
            }
        }),
        prop::collection::vec(decision(), 0..4).prop_map(|decisions| (
            "conversions.v1.decided_batch".to_owned(),
            ConversionsDecided { decisions }.encode_to_vec()
        )),
        (0..3usize, 1..3u32).prop_map(|(d, g)| (
            "postbacks.v1.delivered".to_owned(),
            PostbackDelivered {
                delivery_id: format!("d{d}"),
                generation: g,
                occurred_at_ms: 5,
                ..Default::default()
            }
            .encode_to_vec()
        )),
        (0..3usize, 1..3u32).prop_map(|(d, g)| (
            "postbacks.v1.failed".to_owned(),
            PostbackFailed {
                delivery_id: format!("d{d}"),
                generation: g,
                occurred_at_ms: 6,
                ..Default::default()
            }
            .encode_to_vec()
        )),
        (0..3usize, 2..4u32).prop_map(|(d, g)| (
            "postbacks.v1.retry_requested".to_owned(),
            PostbackRetryRequested {
                delivery_id: format!("d{d}"),
                generation: g,
                occurred_at_ms: 7,
                ..Default::default()
            }
            .encode_to_vec()
        )),
        prop::collection::vec(any::<u8>(), 0..12)
            .prop_map(|garbage| ("conversions.v1.reported".to_owned(), garbage)),
    ]
}

/// The entries of `group` fold `i` takes, in order.
fn of_fold<'g>(group: &[LogEntry<'g>], i: usize) -> Vec<LogEntry<'g>> {
    group
        .iter()
        .copied()
        .filter(|e| fold_for(e.subject) == i)
        .collect()
}

fn fold_of(i: usize) -> Box<dyn Fold> {
    match i {
        0 => Box::new(ClicksFold),
        1 => Box::new(ConversionsFold),
        _ => Box::new(PostbacksFold),
    }
}

/// The fold a subject belongs to.
fn fold_for(subject: &str) -> usize {
    if subject.starts_with("clicks.") {
        0
    } else if subject.starts_with("conversions.") {
        1
    } else {
        2
    }
}

struct Projection {
    _dir: tempfile::TempDir,
    trees: Vec<common::FoldTree>,
    /// Per Tree, the group staged and not committed yet ([`Self::stage`]).
    uncommitted: Vec<Option<Sealed>>,
}

impl Projection {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        let trees = ["clicks", "conversions", "postbacks"]
            .iter()
            .map(|t| common::FoldTree::open(&db, t).unwrap())
            .collect();
        Self {
            _dir: dir,
            trees,
            uncommitted: vec![None, None, None],
        }
    }

    /// Stages one delivered group over the group before, which is committed
    /// only then, as the services' fold loop does while its commit thread
    /// writes the group before; [`Self::finish`] commits the last one.
    fn stage(&mut self, group: &[LogEntry<'_>]) {
        for (i, (tree, uncommitted)) in self.trees.iter().zip(&mut self.uncommitted).enumerate() {
            let before = uncommitted.take();
            let mine = of_fold(group, i);
            let sealed = stage_new(tree, before.as_ref(), &mut fold_of(i), &mine).unwrap();
            if let Some(before) = before {
                before.commit(tree).unwrap();
            }
            *uncommitted = sealed;
        }
    }

    fn finish(&mut self) {
        for (tree, sealed) in self.trees.iter().zip(&mut self.uncommitted) {
            if let Some(sealed) = sealed.take() {
                sealed.commit(tree).unwrap();
            }
        }
    }

    /// Applies one delivered group: each fold takes its stream's entries.
    fn apply(&self, group: &[LogEntry<'_>]) {
        for (i, tree) in self.trees.iter().enumerate() {
            apply_new(tree, &mut fold_of(i), &of_fold(group, i)).unwrap();
        }
    }

    fn rows(&self) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        self.trees
            .iter()
            .map(|t| {
                t.iter()
                    .map(|r| r.unwrap())
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect()
            })
            .collect()
    }
}

/// The groups of a log of `len` entries cut at `cuts`, each starting `replays`
/// entries back (already applied ones delivered again).
fn redeliveries(len: usize, cuts: &[usize], replays: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    for (n, cut) in cuts.iter().cycle().enumerate() {
        if start >= len {
            break;
        }
        let end = (start + cut).min(len);
        let back = replays.get(n % replays.len().max(1)).copied().unwrap_or(0);
        groups.push(start.saturating_sub(back)..end);
        start = end;
    }
    groups
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn folding_is_the_same_at_once_in_batches_and_with_redeliveries(
        events in prop::collection::vec(event(), 1..40),
        cuts in prop::collection::vec(1..8usize, 1..12),
        replays in prop::collection::vec(0..6usize, 0..8),
    ) {
        // Per-stream sequences, as each stream numbers its own messages.
        let mut next = [0u64; 3];
        let log: Vec<(String, Vec<u8>, u64)> = events
            .into_iter()
            .map(|(s, p)| {
                let i = fold_for(&s);
                next[i] += 1;
                (s, p, next[i])
            })
            .collect();
        let entries: Vec<LogEntry<'_>> = log
            .iter()
            .map(|(s, p, seq)| LogEntry { subject: s, payload: p, seq: *seq, log_time_ms: 1_000 })
            .collect();

        let at_once = Projection::new();
        at_once.apply(&entries);

        let batched = Projection::new();
        let mut start = 0;
        for cut in cuts.iter().cycle() {
            if start >= entries.len() { break; }
            let end = (start + cut).min(entries.len());
            batched.apply(&entries[start..end]);
            start = end;
        }

        // Redeliveries: each group re-sends some already applied entries first,
        // as a consumer does after a restart from an older position.
        let redelivered = Projection::new();
        for group in redeliveries(entries.len(), &cuts, &replays) {
            redelivered.apply(&entries[group]);
        }

        // Pipelined: each group staged over the one before, uncommitted, with
        // redeliveries too.
        let mut pipelined = Projection::new();
        for group in redeliveries(entries.len(), &cuts, &replays) {
            pipelined.stage(&entries[group]);
        }
        pipelined.finish();

        prop_assert_eq!(at_once.rows(), batched.rows());
        prop_assert_eq!(at_once.rows(), redelivered.rows());
        prop_assert_eq!(at_once.rows(), pipelined.rows());
    }

    #[test]
    fn clicks_fold_the_same_alone_or_group_committed(
        events in prop::collection::vec(event(), 1..40),
        cuts in prop::collection::vec(1..6usize, 1..12),
    ) {
        let clicks: Vec<Vec<u8>> = events
            .into_iter()
            .filter(|(s, _)| fold_for(s) == 0)
            .map(|(_, p)| p)
            .collect();
        let alone: Vec<(String, Vec<u8>)> = clicks
            .iter()
            .map(|p| (proto::subject::CLICK_RECORDED.to_owned(), p.clone()))
            .collect();
        // The same clicks in the same order, as click-service's group commit
        // may publish them: runs of them in one message each.
        let mut grouped = Vec::new();
        let mut start = 0;
        for cut in cuts.iter().cycle() {
            if start >= clicks.len() { break; }
            let end = (start + cut).min(clicks.len());
            grouped.push(if end - start == 1 {
                (proto::subject::CLICK_RECORDED.to_owned(), clicks[start].clone())
            } else {
                let batch = ClicksRecorded { clicks: clicks[start..end].to_vec() };
                (proto::subject::CLICKS_RECORDED_BATCH.to_owned(), batch.encode_to_vec())
            });
            start = end;
        }
        let fold = |log: &[(String, Vec<u8>)]| {
            let entries: Vec<LogEntry<'_>> = log
                .iter()
                .zip(1..)
                .map(|((s, p), seq)| LogEntry { subject: s, payload: p, seq, log_time_ms: 1_000 })
                .collect();
            let projection = Projection::new();
            projection.apply(&entries);
            let mut rows = projection.rows().swap_remove(0);
            // Only the checkpoint differs: fewer messages, fewer sequences.
            rows.retain(|(k, _)| k != common::store::CHECKPOINT_KEY);
            rows
        };
        prop_assert_eq!(fold(&alone), fold(&grouped));
    }
}
