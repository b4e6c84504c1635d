//! The CONVERSIONS fold and reads of its Tree.
//!
//! Rows (one Tree, so each group commits atomically with its checkpoint):
//! Ids in keys are [`push_id`]-encoded: a UUID as its 16 bytes, any other id
//! length-prefixed, so each is self-delimiting and a UUID costs 17 bytes, not 36.
//!
//! - `v/<conversion_id>`: the [`ConversionView`], packed ([`common::store::pack`]:
//!   its fields in order, no names; the API answers it as JSON);
//! - `p/<bucket, 8 bytes BE>`: the pending conversions, in log order, a row per
//!   128 stream sequences, which the decider walks ([`super::pending`]);
//! - `d/<click_id><goal length, 2 bytes BE><goal><txid length, 2 bytes BE><txid><conversion_id>`:
//!   the dedup row of each attributed conversion; the rows of one (click,
//!   goal), and of one (click, goal, txid), share a prefix, so a goal or a
//!   txid is taken when any row has it ([`Conversions::dedup`]), and those of
//!   one click list its attributed conversions;
//! - `k/<click_id><conversion_id>`: the rejected conversions of each click
//!   (its pending ones are in `p/`, its attributed ones in `d/`;
//!   [`Conversions::of_click`]);
//! - `q/<seq, 8 bytes BE>`: [`QueueEntry`]s, the affiliate postbacks owed by
//!   attributions and status moves, in log order, which the dispatcher walks;
//! - `u/<report seq, 8 bytes BE>`: later status reports of known conversions,
//!   waiting for the decider;
//! - `cap/o/<offer>/<day>`, `cap/a/<offer>/<affiliate>/<day>`: attributions per cap day;
//! - `r/o/<offer_id>`, `r/a/<affiliate_id>`: [`ReportRow`]s.

use catalog::{terms::affiliate_wants, ConversionStatus};
use common::{fold::Fold, LogEntry, Staged};
use prost::Message;
use proto::conversions::v1::{
    conversion_decision, ConversionAttributed, ConversionDecision, ConversionRejected,
    ConversionReported, ConversionStatusUpdated, ConversionsDecided,
};

use super::report::{Money, ReportRow};
use super::view::{ConversionState, ConversionView, Reason};
use crate::postback::{conversion_id_problem, normalize_reported};

/// Tag of an id [`push_id`] wrote as a UUID's 16 bytes.
const ID_UUID: u8 = 0;
/// Tag of an id [`push_id`] wrote as its length (2 bytes BE) and bytes.
const ID_RAW: u8 = 1;

/// Appends `id` to a key, self-delimiting: a UUID in its canonical form (as we
/// make click and conversion ids) as a tag and its 16 bytes, any other id as a
/// tag, its length and its bytes. Keys are most of a conversion's row bytes,
/// and sled's cost per write follows the bytes of the leaf it copies.
pub(crate) fn push_id(key: &mut Vec<u8>, id: &str) {
    let mut canonical = [0u8; uuid::fmt::Hyphenated::LENGTH];
    match uuid::Uuid::try_parse(id) {
        Ok(uuid) if uuid.hyphenated().encode_lower(&mut canonical).as_bytes() == id.as_bytes() => {
            key.push(ID_UUID);
            key.extend_from_slice(uuid.as_bytes());
        }
        _ => {
            let len = u16::try_from(id.len()).unwrap_or(u16::MAX);
            key.push(ID_RAW);
            key.extend_from_slice(&len.to_be_bytes());
            key.extend_from_slice(&id.as_bytes()[..usize::from(len)]);
        }
    }
}

/// The length of the id [`push_id`] wrote at the start of `bytes`.
pub(crate) fn id_len(bytes: &[u8]) -> Option<usize> {
    let len = match *bytes.first()? {
        ID_UUID => 17,
        ID_RAW => 3 + usize::from(u16::from_be_bytes(bytes.get(1..3)?.try_into().ok()?)),
        _ => return None,
    };
    (bytes.len() >= len).then_some(len)
}

/// The id [`push_id`] wrote at the start of `bytes`, and the bytes after it.
pub(crate) fn read_id(bytes: &[u8]) -> Option<(String, &[u8])> {
    let (id, rest) = bytes.split_at(id_len(bytes)?);
    let id = match id[0] {
        ID_UUID => uuid::Uuid::from_slice(&id[1..])
            .ok()?
            .hyphenated()
            .to_string(),
        _ => String::from_utf8_lossy(&id[3..]).into_owned(),
    };
    Some((id, rest))
}

/// `prefix` followed by the encoded `id`.
fn id_key(prefix: &[u8], id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 17);
    key.extend_from_slice(prefix);
    push_id(&mut key, id);
    key
}

pub(crate) fn view_key(conversion_id: &str) -> Vec<u8> {
    id_key(b"v/", conversion_id)
}

fn by_click_prefix(click_id: &str) -> Vec<u8> {
    id_key(b"k/", click_id)
}

/// The rows' format ([`Fold::format`]).
/// - 12: the delivery queue is keyed by queue position ([`queue_position`]:
///   the decision's stream sequence and its index in a batch), so decisions
///   published together in one message (`conversions.v1.decided_batch`) each
///   have a queue row.
/// - 10: the same rows, folded otherwise: a conversion rejected `malformed`
///   for its status word alone is opened again by a report of it with
///   another word (the advertiser's corrected retry), as one rejected
///   `unauthenticated` is by a verified report; so is one whose corrected
///   word came before that decision, when its queued update is decided. A
///   partner's report opens an unverified HTTP one as a verified report
///   does; a malformed report gets an id of its own bytes, never its sale's
///   derived id.
/// - 9: the same rows, folded otherwise: a status decision folds once (a copy
///   published again finds its queued update gone), leaves a conversion
///   reopened since as it is, and a partner's report repeating the word last
///   decided is queued for the status rules (an unverified HTTP report may
///   have told that word, and moved nothing).
/// - 8: the same rows, folded otherwise: a verified report takes the place of
///   an unverified one still pending, a status word reported before the
///   decision no longer replaces the report's, and the view's word is the one
///   last decided. A projection of format 7 could hold what format 8 never
///   folds, so it is folded again.
/// - 11: a partner's corrected report under the id its malformed one took
///   opens that conversion again; a corrected status word is dated by the
///   conversion's first report; a correction that came before the rejection
///   is decided with its own amount and currency; a report that does not
///   decode takes an id from its bytes, not its log position, so the same
///   bytes again are one malformed conversion.
/// - 7: report rows (`r/`) are packed, not JSON: each decision decodes and
///   encodes two of them.
/// - 6: a click's conversions are listed by their pending, dedup or rejected
///   rows; the `k/` row is written for rejected conversions only, with their
///   decision, so a report adds one key fewer. Dedup rows end with the txid's
///   length, the txid and the conversion id, a row per attributed conversion.
/// - 5: pending conversions are listed a bucket row per 128 stream sequences,
///   not a row each ([`super::pending`]).
/// - 4: ids in keys and in pending and dedup rows are encoded ([`push_id`]);
///   the fold alone wrote 2.7 KB per event instead of 3.5 KB and used about a
///   fifth less CPU per conversion.
/// - 3: views are packed, not JSON (a third of the bytes; the fold alone went
///   from about 19k to 26k-31k conversions/s).
/// - 2: one dedup row per attribution (format 1 wrote two, one per goal and
///   one per txid, in another shape).
///
/// Packed rows are not self-describing: any change to [`ConversionView`]'s or
/// [`ReportRow`]'s fields (or to the types inside them) needs a new format,
/// which `tests::a_packed_view_keeps_its_shape` and
/// `tests::a_packed_report_row_keeps_its_shape` enforce.
const FORMAT: u32 = 12;

/// Prefix of the dedup rows of (click, goal): the goal's length first, so no
/// goal's prefix is another goal's.
fn dedup_goal_prefix(click_id: &str, goal: &str) -> Vec<u8> {
    let len = u16::try_from(goal.len()).unwrap_or(u16::MAX).to_be_bytes();
    let mut key = id_key(b"d/", click_id);
    key.extend_from_slice(&len);
    key.extend_from_slice(goal.as_bytes());
    key
}

/// Prefix of the dedup rows of (click, goal, txid): the txid's length first,
/// so no txid's prefix is another txid's.
fn dedup_txid_prefix(click_id: &str, goal: &str, txid: &str) -> Vec<u8> {
    with_txid(dedup_goal_prefix(click_id, goal), txid)
}

/// A (click, goal) prefix ([`dedup_goal_prefix`]) extended by `txid`.
fn with_txid(mut goal_prefix: Vec<u8>, txid: &str) -> Vec<u8> {
    let len = u16::try_from(txid.len()).unwrap_or(u16::MAX).to_be_bytes();
    goal_prefix.extend_from_slice(&len);
    goal_prefix.extend_from_slice(txid.as_bytes());
    goal_prefix
}

/// The dedup row of an attributed conversion: its (click, goal, txid), then
/// its id, so each attributed conversion has a row of its own (under the
/// `all` policy several share a txid) and a click's rows list them.
fn dedup_key(click_id: &str, goal: &str, txid: &str, conversion_id: &str) -> Vec<u8> {
    let mut key = dedup_txid_prefix(click_id, goal, txid);
    push_id(&mut key, conversion_id);
    key
}

/// The conversion id at the end of a dedup row's key, after its click's
/// prefix (`prefix_len` bytes).
fn dedup_row_id(key: &[u8], prefix_len: usize) -> Option<&[u8]> {
    let skip = |at: usize| -> Option<usize> {
        let len = u16::from_be_bytes(key.get(at..at + 2)?.try_into().ok()?);
        Some(at + 2 + usize::from(len))
    };
    key.get(skip(skip(prefix_len)?)?..)
}

/// What an attribution claims until it is folded, in the decider's memory:
/// (click, goal) is taken.
pub(crate) fn goal_claim(click_id: &str, goal: &str) -> Vec<u8> {
    [b"g".as_slice(), &dedup_goal_prefix(click_id, goal)].concat()
}

/// What an attribution claims until it is folded: (click, goal, txid) is taken.
pub(crate) fn txid_claim(click_id: &str, goal: &str, txid: &str) -> Vec<u8> {
    [b"t".as_slice(), &dedup_txid_prefix(click_id, goal, txid)].concat()
}

/// Attributed conversions owed an affiliate postback, in log order (the
/// dispatcher's queue; it keeps its own cursor and never deletes rows here),
/// by [`queue_position`].
pub(crate) fn delivery_queue_key(position: u64) -> Vec<u8> {
    [&b"q/"[..], &position.to_be_bytes()].concat()
}

/// Bits of a queue position that number a decision within its message.
const INDEX_BITS: u32 = 16;

/// Where the decision at `index` of the message at stream sequence `seq` is
/// in the delivery queue: log order, then batch order (a lone decision is at
/// index 0). Stream sequences stay below 2^48.
pub fn queue_position(seq: u64, index: u16) -> u64 {
    (seq << INDEX_BITS) | u64::from(index)
}

/// The last queue position of the message at stream sequence `seq`: a fold
/// that has applied `seq` has queued everything up to it.
pub fn queue_end(seq: u64) -> u64 {
    queue_position(seq, u16::MAX)
}

/// Queue of later status reports waiting for the decider, in log order.
pub(crate) fn status_queue_key(seq: u64) -> Vec<u8> {
    [&b"u/"[..], &seq.to_be_bytes()].concat()
}

/// Attributions counted on one cap day, per offer or per (offer, affiliate).
pub(crate) fn cap_key(offer_id: &str, affiliate_id: Option<&str>, day: &str) -> Vec<u8> {
    match affiliate_id {
        None => format!("cap/o/{offer_id}/{day}").into_bytes(),
        Some(a) => format!("cap/a/{offer_id}/{a}/{day}").into_bytes(),
    }
}

/// An affiliate postback owed: which conversion, for which status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueEntry {
    pub conversion_id: String,
    pub status: ConversionStatus,
}

/// A later report of a known conversion with a new status word.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatusUpdate {
    pub conversion_id: String,
    pub advertiser_status: String,
    /// Where this report came from, `http` or `nats` (empty: queued before
    /// it was recorded).
    #[serde(default)]
    pub origin: String,
    /// The offer whose postback security this HTTP report passed at the door
    /// (empty: none).
    #[serde(default)]
    pub verified_offer_id: String,
    /// The report's amount and currency: a report that comes to correct the
    /// word its conversion was rejected for is decided with them, as it is
    /// when it comes after that rejection.
    #[serde(default)]
    pub amount_micros: Option<i64>,
    #[serde(default)]
    pub currency: String,
}

pub(crate) fn report_key(kind: char, id: &str) -> Vec<u8> {
    format!("r/{kind}/{id}").into_bytes()
}

/// A decision event: the outcome of a report, or of a later status report.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Attributed(ConversionAttributed),
    Rejected(ConversionRejected),
    StatusUpdated(ConversionStatusUpdated),
}

impl Decision {
    /// The conversion decided.
    pub fn conversion_id(&self) -> &str {
        match self {
            Self::Attributed(e) => &e.conversion_id,
            Self::Rejected(e) => &e.conversion_id,
            Self::StatusUpdated(e) => &e.conversion_id,
        }
    }

    /// The `Nats-Msg-Id`: one decision per report (a conversion opened again
    /// has a second report, whose decision must not be dropped as a retry of
    /// the first's).
    pub fn msg_id(&self) -> String {
        match self {
            Self::StatusUpdated(e) => format!("status-{}-{}", e.conversion_id, e.update_seq),
            Self::Attributed(e) => format!("decision-{}-{}", e.conversion_id, e.reported_seq),
            Self::Rejected(e) => format!("decision-{}-{}", e.conversion_id, e.reported_seq),
        }
    }

    /// The stream sequence of the report a first decision answers.
    pub fn reported_seq(&self) -> Option<u64> {
        match self {
            Self::Attributed(e) => Some(e.reported_seq),
            Self::Rejected(e) => Some(e.reported_seq),
            Self::StatusUpdated(_) => None,
        }
    }

    /// The subject it is published to.
    pub fn subject(&self) -> &'static str {
        match self {
            Self::Attributed(_) => proto::subject::CONVERSION_ATTRIBUTED,
            Self::Rejected(_) => proto::subject::CONVERSION_REJECTED,
            Self::StatusUpdated(_) => proto::subject::CONVERSION_STATUS_UPDATED,
        }
    }

    /// Its protobuf bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Attributed(e) => e.encode_to_vec(),
            Self::Rejected(e) => e.encode_to_vec(),
            Self::StatusUpdated(e) => e.encode_to_vec(),
        }
    }

    /// The decision a lone message of `subject` carries (`None`: not a
    /// decision's subject, or bytes that do not decode).
    pub fn decode(subject: &str, payload: &[u8]) -> Option<Self> {
        match subject {
            proto::subject::CONVERSION_ATTRIBUTED => ConversionAttributed::decode(payload)
                .ok()
                .map(Self::Attributed),
            proto::subject::CONVERSION_REJECTED => {
                ConversionRejected::decode(payload).ok().map(Self::Rejected)
            }
            proto::subject::CONVERSION_STATUS_UPDATED => ConversionStatusUpdated::decode(payload)
                .ok()
                .map(Self::StatusUpdated),
            _ => None,
        }
    }

    /// Every decision a message of `subject` carries, alone or batched, in
    /// order (empty: none, or bytes that do not decode).
    pub fn all_in(subject: &str, payload: &[u8]) -> Vec<Self> {
        if subject != proto::subject::CONVERSIONS_DECIDED_BATCH {
            return Self::decode(subject, payload).into_iter().collect();
        }
        ConversionsDecided::decode(payload).map_or_else(
            |_| Vec::new(),
            |batch| {
                batch
                    .decisions
                    .into_iter()
                    .filter_map(Self::from_proto)
                    .collect()
            },
        )
    }

    /// The decision a batch entry holds (`None`: an empty entry).
    pub fn from_proto(entry: ConversionDecision) -> Option<Self> {
        use conversion_decision::Decision as D;
        Some(match entry.decision? {
            D::Attributed(e) => Self::Attributed(e),
            D::Rejected(e) => Self::Rejected(e),
            D::StatusUpdated(e) => Self::StatusUpdated(e),
        })
    }
}

/// The dedup questions of one conversion, as the projection answers them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dedup {
    /// A conversion of the same click and goal is attributed.
    pub goal_taken: bool,
    /// A conversion of the same click, goal and txid is attributed.
    pub txid_taken: bool,
}

/// Folds reports and decisions into conversion views, indexes and reports.
#[derive(Debug, Default)]
pub struct ConversionsFold;

impl Fold for ConversionsFold {
    fn format(&self) -> u32 {
        FORMAT
    }

    fn apply(&mut self, staged: &mut Staged<'_>, entry: &LogEntry<'_>) -> Result<(), sled::Error> {
        match entry.subject {
            proto::subject::CONVERSION_REPORTED => apply_reported(staged, entry),
            proto::subject::CONVERSIONS_DECIDED_BATCH => {
                let Ok(batch) = ConversionsDecided::decode(entry.payload) else {
                    return skip(entry);
                };
                for (index, decision) in batch.decisions.into_iter().enumerate() {
                    let (Ok(index), Some(decision)) =
                        (u16::try_from(index), Decision::from_proto(decision))
                    else {
                        tracing::warn!(seq = entry.seq, index, "batched decision skipped");
                        continue;
                    };
                    apply_any(staged, &decision, queue_position(entry.seq, index))?;
                }
                Ok(())
            }
            subject => match Decision::decode(subject, entry.payload) {
                Some(decision) => apply_any(staged, &decision, queue_position(entry.seq, 0)),
                None => skip(entry),
            },
        }
    }
}

/// Folds one decision, queued (if it owes a postback) at `position`.
fn apply_any(
    staged: &mut Staged<'_>,
    decision: &Decision,
    position: u64,
) -> Result<(), sled::Error> {
    match decision {
        Decision::StatusUpdated(e) => apply_status_updated(staged, e, position),
        _ => apply_decision(staged, decision, position),
    }
}

fn skip(entry: &LogEntry<'_>) -> Result<(), sled::Error> {
    tracing::warn!(
        subject = entry.subject,
        seq = entry.seq,
        "unexpected conversion event skipped"
    );
    Ok(())
}

/// A report whose click id is in canonical form, as `normalize_reported` gives
/// a valid report's and the click API asks by: for the reports decided
/// malformed (a partner's upper-case id beside a bad currency), off the path
/// of the valid ones, which are parsed once.
fn canonical_click(e: &ConversionReported) -> ConversionReported {
    let mut e = e.clone();
    if let Ok(click) = uuid::Uuid::try_parse(&e.click_id) {
        e.click_id = click.to_string();
    }
    e
}

fn apply_reported(staged: &mut Staged<'_>, entry: &LogEntry<'_>) -> Result<(), sled::Error> {
    let reported = ConversionReported::decode(entry.payload);
    let malformed = |id, partial: Option<&ConversionReported>, why| {
        ConversionView::malformed(
            id,
            partial,
            why,
            entry.payload,
            entry.seq,
            entry.log_time_ms,
        )
    };
    let mut view = match &reported {
        Ok(e) => match normalize_reported(e.clone(), entry.log_time_ms) {
            Ok(e) => ConversionView::reported(&e, entry.seq, entry.log_time_ms),
            Err(why) => {
                let e = canonical_click(e);
                // Never the id derived from its click, goal and txid: that
                // belongs to the well-formed report of the same sale, which
                // would otherwise find it taken (a retry of it answered as
                // known, or decided malformed as a conflict).
                let id = if !e.conversion_id.is_empty()
                    && conversion_id_problem(&e.conversion_id).is_none()
                {
                    e.conversion_id.clone()
                } else {
                    bytes_id(entry.payload)
                };
                malformed(id, Some(&e), why)
            }
        },
        Err(error) => malformed(
            bytes_id(entry.payload),
            None,
            format!("undecodable ConversionReported: {error}"),
        ),
    };
    let key = view_key(&view.conversion_id);
    if let Some(known) = staged.get_packed::<ConversionView>(&key)? {
        match ReReport::of(&known, &view) {
            // The same conversion reported again: a retry (nothing to do), or
            // a new status word, which waits for the decider in the status
            // queue.
            ReReport::Same if known.reopens_with(&view) => {
                // A corrected word names the sale its first report dated (the
                // door dates an HTTP report as it takes it, the log a partner's
                // that names no time): decided at that time, as a correction
                // that came before the decision is (`reopened_as`), not as
                // late as the correction.
                if known.rejected_for_its_word(&view.advertiser_status) {
                    view.converted_at_ms = known.converted_at_ms;
                }
                reopen(staged, &known)?;
            }
            // A partner's corrected report under the id its broken one took.
            ReReport::Corrected => reopen(staged, &known)?,
            ReReport::Same => {
                // A new status word waits for the decider in the status queue;
                // so does a verified or a partner's (trusted) report: its word
                // may be one an unverified report already told, which moved
                // nothing on a secured offer.
                // The view keeps the word last decided: an undecided
                // conversion is decided with its report's, and a later one
                // goes through the status rules once it is, never in place of
                // the first (see `apply_status_updated`).
                if view.advertiser_status != known.advertiser_status
                    || !view.verified_offer_id.is_empty()
                    || view.origin != "http"
                {
                    let update = StatusUpdate {
                        conversion_id: known.conversion_id.clone(),
                        advertiser_status: view.advertiser_status.clone(),
                        origin: view.origin.clone(),
                        verified_offer_id: view.verified_offer_id.clone(),
                        amount_micros: view.amount_micros,
                        currency: view.currency.clone(),
                    };
                    staged.put_json(status_queue_key(entry.seq), &update);
                }
                return Ok(());
            }
            ReReport::Retry => return Ok(()),
            // Another report under a taken id: it cannot touch the conversion
            // that id names, nor be dropped unseen. It is decided `malformed`
            // under an id of its own, saying why.
            ReReport::Conflict(why) => {
                let id = conflict_id(entry.payload);
                if staged.contains(&view_key(&id))? {
                    return Ok(()); // the same bytes again
                }
                view = malformed(
                    id,
                    reported.as_ref().ok().map(canonical_click).as_ref(),
                    why,
                );
            }
        }
    }
    super::pending::add(staged, entry.seq, &view.conversion_id, &view.click_id)?;
    staged.put_packed(view_key(&view.conversion_id), &view);
    Ok(())
}

/// A report of a conversion id already in the projection.
#[derive(Debug, PartialEq, Eq)]
enum ReReport {
    /// The same conversion (click, goal and txid), perhaps with a new status.
    Same,
    /// The same malformed bytes again (re-published past the duplicate window).
    Retry,
    /// A well-formed report of the click, goal and txid a malformed one under
    /// this id named (a partner's corrected report, under its own
    /// `conversion_id`): decided afresh, as this report.
    Corrected,
    /// Anything else, and why it is refused.
    Conflict(String),
}

impl ReReport {
    fn of(known: &ConversionView, new: &ConversionView) -> Self {
        let id = &known.conversion_id;
        match (&known.malformed, &new.malformed) {
            (None, None)
                if (&known.click_id, &known.goal, &known.txid)
                    == (&new.click_id, &new.goal, &new.txid) =>
            {
                Self::Same
            }
            (None, None) => Self::Conflict(format!(
                "conversion_id {id:?} already names a conversion of another click, goal or txid"
            )),
            (Some(_), Some(_)) if known.raw_hex == new.raw_hex => Self::Retry,
            (Some(_), None)
                if (&known.click_id, &known.goal, &known.txid)
                    == (&new.click_id, &new.goal, &new.txid) =>
            {
                Self::Corrected
            }
            (_, Some(why)) => Self::Conflict(format!(
                "{why} (and its conversion_id {id:?} already names an earlier report)"
            )),
            (Some(_), None) => Self::Conflict(format!(
                "conversion {id:?} was already reported malformed; a corrected report needs \
                 another conversion_id or txid"
            )),
        }
    }
}

/// The id of a report refused because its conversion id was taken: one per
/// payload, so the same bytes re-published (past the duplicate window) are
/// found again and not decided twice.
fn conflict_id(payload: &[u8]) -> String {
    let name = [&b"conflicting-report/"[..], payload].concat();
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &name).to_string()
}

/// The id of a malformed report that names no usable conversion id of its
/// own: stable per bytes, so the same bytes published again are found again.
fn bytes_id(payload: &[u8]) -> String {
    let name = [&b"malformed-report-bytes/"[..], payload].concat();
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &name).to_string()
}

fn apply_decision(
    staged: &mut Staged<'_>,
    decision: &Decision,
    position: u64,
) -> Result<(), sled::Error> {
    let key = view_key(decision.conversion_id());
    let Some(view) = staged.get_packed::<ConversionView>(&key)? else {
        tracing::warn!(
            conversion_id = decision.conversion_id(),
            "decision for an unknown conversion skipped"
        );
        return Ok(());
    };
    if view.state != ConversionState::Pending {
        return Ok(());
    }
    // A decision of an earlier report of a conversion opened again (a late
    // re-publish of its rejection) is not this report's.
    if decision
        .reported_seq()
        .is_some_and(|s| s != 0 && s != view.reported_seq)
    {
        return Ok(());
    }
    let reported_seq = view.reported_seq;
    let view = match decision {
        Decision::Attributed(e) => {
            staged.insert(
                dedup_key(&view.click_id, &view.goal, &view.txid, &e.conversion_id),
                Vec::new(),
            );
            let view = view.attributed(e);
            let status = view.status.unwrap_or(ConversionStatus::Approved);
            queue_delivery(staged, &view, None, status, position);
            if !view.cap_day.is_empty() {
                staged.add_u64(cap_key(&view.offer_id, None, &view.cap_day), 1)?;
                staged.add_u64(
                    cap_key(&view.offer_id, Some(&view.affiliate_id), &view.cap_day),
                    1,
                )?;
            }
            update_reports(staged, &view, |row| row.attributed(status, money(&view)))?;
            view
        }
        Decision::Rejected(e) => {
            if !view.click_id.is_empty() {
                let mut k = by_click_prefix(&view.click_id);
                push_id(&mut k, &view.conversion_id);
                staged.insert(k, Vec::new());
            }
            let view = view.rejected(e);
            let reason = view.reason.unwrap_or(Reason::Malformed);
            update_reports(staged, &view, |row| row.rejected(reason))?;
            view
        }
        Decision::StatusUpdated(_) => return Ok(()),
    };
    super::pending::remove(staged, reported_seq)?;
    staged.put_packed(key, &view);
    Ok(())
}

fn money(view: &ConversionView) -> Money<'_> {
    Money {
        payout: (view.payout_currency.as_str(), view.payout_micros),
        revenue: (view.revenue_currency.as_str(), view.revenue_micros),
    }
}

/// Queues an affiliate postback for a status event if the attribution fixed a
/// postback URL and the affiliate asked to be told of it.
fn queue_delivery(
    staged: &mut Staged<'_>,
    view: &ConversionView,
    from: Option<ConversionStatus>,
    to: ConversionStatus,
    position: u64,
) {
    if !view.postback_url.is_empty() && affiliate_wants(&view.postback_statuses, from, to) {
        let entry = QueueEntry {
            conversion_id: view.conversion_id.clone(),
            status: to,
        };
        staged.put_json(delivery_queue_key(position), &entry);
    }
}

fn apply_status_updated(
    staged: &mut Staged<'_>,
    e: &ConversionStatusUpdated,
    position: u64,
) -> Result<(), sled::Error> {
    // Decided once: the same decision published again (past JetStream's
    // duplicate window) finds its update gone, and moves nothing twice.
    let queued = status_queue_key(e.update_seq);
    let Some(update) = staged.get_json::<StatusUpdate>(&queued)? else {
        return Ok(());
    };
    staged.remove(queued);
    let key = view_key(&e.conversion_id);
    let Some(mut view) = staged.get_packed::<ConversionView>(&key)? else {
        return Ok(());
    };
    // Pending again since (a verified report reopened it): it is decided with
    // that report's word, not one decided against what it was.
    if view.state == ConversionState::Pending {
        return Ok(());
    }
    // Its first word rejected it, and this one came before that decision (it
    // waited for it in the queue): the advertiser's correction is decided as
    // the conversion's report, as it is when it comes after.
    if view.rejected_for_its_word(&e.advertiser_status) {
        unreject(staged, &view)?;
        let view = view.reopened_as(&update, e.update_seq);
        super::pending::add(staged, e.update_seq, &view.conversion_id, &view.click_id)?;
        staged.put_packed(key, &view);
        return Ok(());
    }
    // The word last decided, whether it moved the conversion or not.
    let new_word = view.advertiser_status != e.advertiser_status;
    if new_word {
        view.advertiser_status.clone_from(&e.advertiser_status);
    }
    let (Some(from), ConversionState::Attributed) = (view.status, view.state) else {
        if new_word {
            staged.put_packed(key, &view);
        }
        return Ok(());
    };
    let view = view.status_updated(e);
    let to = view.status.unwrap_or(from);
    if to != from {
        queue_delivery(staged, &view, Some(from), to, position);
        update_reports(staged, &view, |row| row.moved(from, to, money(&view)))?;
    }
    if to != from || new_word {
        staged.put_packed(key, &view);
    }
    Ok(())
}

/// Makes way for a report that opens `known` again: its pending row goes, or
/// its rejection leaves the reports (they count outcomes). Decisions of the
/// earlier report no longer apply (see `apply_decision`).
fn reopen(staged: &mut Staged<'_>, known: &ConversionView) -> Result<(), sled::Error> {
    if known.state == ConversionState::Pending {
        super::pending::remove(staged, known.reported_seq)
    } else {
        unreject(staged, known)
    }
}

/// Takes a rejected conversion's rejection out of the reports, as it is
/// opened again to be decided afresh.
fn unreject(staged: &mut Staged<'_>, view: &ConversionView) -> Result<(), sled::Error> {
    let reason = view.reason.unwrap_or(Reason::Malformed);
    update_reports(staged, view, |row| row.unrejected(reason))
}

fn update_reports(
    staged: &mut Staged<'_>,
    view: &ConversionView,
    change: impl Fn(ReportRow) -> ReportRow,
) -> Result<(), sled::Error> {
    for (kind, id) in [('o', &view.offer_id), ('a', &view.affiliate_id)] {
        let key = report_key(kind, id);
        let row = staged.get_packed::<ReportRow>(&key)?.unwrap_or_default();
        staged.put_packed(key, &change(row));
    }
    Ok(())
}

/// Read access to the conversions Tree.
#[derive(Clone, Debug)]
pub struct Conversions {
    tree: sled::Tree,
}

impl Conversions {
    /// Reads the Tree [`ConversionsFold`] writes.
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// The log these rows were folded from ([`common::store::log_of`]).
    ///
    /// # Errors
    /// sled read failure.
    pub fn log(&self) -> Result<Option<sled::IVec>, sled::Error> {
        common::store::log_of(&self.tree)
    }

    /// One conversion.
    ///
    /// # Errors
    /// sled read failure.
    pub fn get(&self, conversion_id: &str) -> Result<Option<ConversionView>, sled::Error> {
        common::store::get_packed(&self.tree, &view_key(conversion_id))
    }

    /// The conversions of one click, in the order of their encoded ids (UUID
    /// ids by value, then any others): the attributed ones from their dedup
    /// rows, the rejected ones from their `k/` rows, the pending ones from the
    /// pending index. A commit writes a decision's row before it removes the
    /// pending entry (keys in order: `d/`, `k/`, then `p/`), so a conversion
    /// being decided meanwhile is found at least once, and listed once.
    ///
    /// # Errors
    /// sled read failure.
    pub fn of_click(&self, click_id: &str) -> Result<Vec<ConversionView>, sled::Error> {
        let mut ids = std::collections::BTreeSet::new();
        let attributed = id_key(b"d/", click_id);
        for row in self.tree.scan_prefix(&attributed) {
            let (key, _) = row?;
            ids.extend(dedup_row_id(&key, attributed.len()).map(<[u8]>::to_vec));
        }
        let prefix = by_click_prefix(click_id);
        for row in self.tree.scan_prefix(&prefix) {
            ids.insert(row?.0[prefix.len()..].to_vec());
        }
        ids.extend(super::pending::of_click(&self.tree, click_id)?);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((id, _)) = read_id(&id) {
                out.extend(self.get(&id)?);
            }
        }
        Ok(out)
    }

    /// Ids of the pending conversions in log order, lazily.
    pub fn pending_ids(&self) -> impl Iterator<Item = Result<String, sled::Error>> + '_ {
        self.pending_from(0).map(|row| row.map(|(_, id)| id))
    }

    /// Pending conversions reported at stream sequence `from` or later, in log
    /// order, lazily: (the report's sequence, the conversion id).
    pub fn pending_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<(u64, String), sled::Error>> + '_ {
        super::pending::from(&self.tree, from)
    }

    /// Pending conversions in log order, read lazily.
    #[cfg(test)]
    pub fn pending(&self) -> impl Iterator<Item = Result<ConversionView, sled::Error>> + '_ {
        self.pending_ids()
            .filter_map(|id| id.and_then(|id| self.get(&id)).transpose())
    }

    /// Conversions owed an affiliate postback, queued after `after` and up to
    /// `upto` (queue positions, [`queue_position`]), in queue order, at most
    /// `limit`: (queue position, entry).
    ///
    /// # Errors
    /// sled read failure.
    pub fn delivery_queue(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, QueueEntry)>, sled::Error> {
        let mut out = Vec::new();
        let start = delivery_queue_key(after.saturating_add(1));
        for row in self
            .tree
            .range(start..delivery_queue_key(upto.saturating_add(1)))
            .take(limit)
        {
            let (k, v) = row?;
            let seq = common::store::decode_u64(&k[2..]);
            if let Ok(entry) = serde_json::from_slice(&v) {
                out.push((seq, entry));
            }
        }
        Ok(out)
    }

    /// Later status reports waiting for the decider, in log order, read
    /// lazily: (report sequence, update).
    pub fn status_queue(
        &self,
    ) -> impl Iterator<Item = Result<(u64, StatusUpdate), sled::Error>> + '_ {
        self.status_queue_from(0)
    }

    /// The status queue from the update reported at `seq` on.
    pub fn status_queue_from(
        &self,
        seq: u64,
    ) -> impl Iterator<Item = Result<(u64, StatusUpdate), sled::Error>> + '_ {
        let end = b"u0".to_vec(); // '0' follows '/'
        self.tree
            .range(status_queue_key(seq)..end)
            .filter_map(|row| match row {
                Ok((k, v)) => serde_json::from_slice(&v)
                    .ok()
                    .map(|update| Ok((common::store::decode_u64(&k[2..]), update))),
                Err(e) => Some(Err(e)),
            })
    }

    /// A counter row (such as a [`cap_key`]); 0 when absent.
    ///
    /// # Errors
    /// sled read failure.
    pub fn count(&self, key: &[u8]) -> Result<u64, sled::Error> {
        Ok(self
            .tree
            .get(key)?
            .map_or(0, |v| common::store::decode_u64(&v)))
    }

    /// Whether a conversion of (click, goal) is attributed, and one of (click,
    /// goal, txid): the two dedup questions, from one index.
    ///
    /// A scan of sled copies the whole leaf it starts in, several times a
    /// point read's cost, so this starts one scan: at the (click, goal)'s first
    /// row. None: neither is taken (a click's first conversion of the goal, the
    /// common case); the first row is of this txid: both are. Only when the
    /// goal is taken by another txid does a second scan look for this one.
    ///
    /// # Errors
    /// sled read failure.
    pub fn dedup(&self, click_id: &str, goal: &str, txid: &str) -> Result<Dedup, sled::Error> {
        let first = |prefix: &[u8]| -> Result<Option<sled::IVec>, sled::Error> {
            self.tree.scan_prefix(prefix).keys().next().transpose()
        };
        let goal_prefix = dedup_goal_prefix(click_id, goal);
        let Some(key) = first(&goal_prefix)? else {
            return Ok(Dedup::default());
        };
        let txid_prefix = with_txid(goal_prefix, txid);
        let txid_taken = key.starts_with(&txid_prefix) || first(&txid_prefix)?.is_some();
        Ok(Dedup {
            goal_taken: true,
            txid_taken,
        })
    }

    /// Every report row of one kind (`'o'` offer, `'a'` affiliate), by id.
    ///
    /// # Errors
    /// sled read failure.
    pub fn reports(&self, kind: char) -> Result<Vec<(String, ReportRow)>, sled::Error> {
        let prefix = format!("r/{kind}/");
        let mut out = Vec::new();
        for row in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, v) = row?;
            if let Some(r) = common::store::unpack(&v) {
                out.push((String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), r));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postback::conversion_id;
    use proto::conversions::v1::{ConversionOrigin, RejectReason};

    const CLICK: &str = "0190a0b4-7c6e-7a2b-9c1d-2e3f4a5b6c7d";
    const OTHER_CLICK: &str = "0190a0b4-7c6e-7a2b-9c1d-2e3f4a5b6c7e";

    struct Harness {
        _dir: tempfile::TempDir,
        tree: common::FoldTree,
        seq: u64,
    }

    impl Harness {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let db = common::store::open_db(dir.path()).unwrap();
            let tree = common::FoldTree::open(&db, "c").unwrap();
            Self {
                _dir: dir,
                tree,
                seq: 0,
            }
        }

        /// Applies one event in its own group, as the fold loop would.
        fn apply(&mut self, subject: &str, payload: Vec<u8>) {
            self.seq += 1;
            let mut staged = Staged::new(&self.tree);
            let entry = LogEntry {
                subject,
                payload: &payload,
                seq: self.seq,
                log_time_ms: 1000,
            };
            ConversionsFold.apply(&mut staged, &entry).unwrap();
            staged.commit(self.seq).unwrap();
        }

        fn report(&mut self, txid: &str) -> String {
            let e = ConversionReported {
                click_id: CLICK.into(),
                txid: txid.into(),
                ..Default::default()
            };
            self.apply(proto::subject::CONVERSION_REPORTED, e.encode_to_vec());
            conversion_id(CLICK, "", txid)
        }

        fn attribute(&mut self, id: &str, payout: i64) {
            let e = ConversionAttributed {
                conversion_id: id.into(),
                offer_id: "o1".into(),
                affiliate_id: "a1".into(),
                payout_micros: payout,
                payout_currency: "USD".into(),
                revenue_currency: "USD".into(),
                ..Default::default()
            };
            self.apply(proto::subject::CONVERSION_ATTRIBUTED, e.encode_to_vec());
        }

        fn reads(&self) -> Conversions {
            Conversions::new(self.tree.rows().clone())
        }
    }

    /// Three reports, then two attributions owing postbacks and a rejection,
    /// folded alone (`batched` false) or as one batch message.
    fn decided_together(batched: bool) -> (Harness, Vec<String>, Vec<Decision>) {
        let mut h = Harness::new();
        let ids: Vec<String> = ["T1", "T2", "T3"].iter().map(|t| h.report(t)).collect();
        let attributed = |id: &String, seq: u64| {
            Decision::Attributed(ConversionAttributed {
                conversion_id: id.clone(),
                offer_id: "o1".into(),
                affiliate_id: "a1".into(),
                payout_micros: 2_000_000,
                payout_currency: "USD".into(),
                revenue_currency: "USD".into(),
                reported_seq: seq,
                affiliate_postback_url: "http://aff.example/pb".into(),
                ..Default::default()
            })
        };
        let decisions = vec![
            attributed(&ids[0], 1),
            Decision::Rejected(ConversionRejected {
                conversion_id: ids[1].clone(),
                reason: RejectReason::Duplicate as i32,
                offer_id: "o1".into(),
                affiliate_id: "a1".into(),
                reported_seq: 2,
                ..Default::default()
            }),
            attributed(&ids[2], 3),
        ];
        if batched {
            let messages =
                super::super::batch::messages(&decisions, super::super::batch::Limits::new(512));
            assert_eq!(messages.len(), 1);
            h.apply(messages[0].subject, messages[0].payload.clone());
        } else {
            for d in &decisions {
                h.apply(d.subject(), d.encode());
            }
        }
        (h, ids, decisions)
    }

    #[test]
    fn a_batch_of_decisions_folds_as_its_decisions_alone_do() {
        let (alone, ids, _) = decided_together(false);
        let (batch, _, _) = decided_together(true);
        let (alone, batch) = (alone.reads(), batch.reads());
        for id in &ids {
            assert_eq!(alone.get(id).unwrap(), batch.get(id).unwrap(), "{id}");
        }
        assert_eq!(alone.reports('o').unwrap(), batch.reports('o').unwrap());
        assert_eq!(alone.reports('a').unwrap(), batch.reports('a').unwrap());
        assert!(batch.pending().next().is_none());
        let queued = |reads: &Conversions| -> Vec<String> {
            let all = reads.delivery_queue(0, u64::MAX, 10).unwrap();
            all.into_iter().map(|(_, e)| e.conversion_id).collect()
        };
        assert_eq!(queued(&batch), [ids[0].clone(), ids[2].clone()]);
        assert_eq!(queued(&alone), queued(&batch));
    }

    #[test]
    fn each_decision_of_a_batch_has_its_own_queue_position() {
        let (h, ids, _) = decided_together(true);
        let reads = h.reads();
        let batch_seq = 4;
        let all = reads.delivery_queue(0, queue_end(batch_seq), 10).unwrap();
        let positions: Vec<u64> = all.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            positions,
            [queue_position(batch_seq, 0), queue_position(batch_seq, 2)]
        );
        // A cursor inside the batch resumes after it, and a fold not yet
        // past the batch has queued nothing of it.
        let rest = reads
            .delivery_queue(positions[0], queue_end(batch_seq), 10)
            .unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1.conversion_id, ids[2]);
        assert!(reads
            .delivery_queue(0, queue_end(batch_seq - 1), 10)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_batch_folds_each_decision_once_and_skips_what_does_not_decode() {
        let (mut h, ids, decisions) = decided_together(true);
        let before = h.reads().reports('o').unwrap();
        // The same batch again (published past the duplicate window), then
        // bytes that are no batch: nothing moves, nothing stops.
        let again =
            super::super::batch::messages(&decisions, super::super::batch::Limits::new(512));
        h.apply(again[0].subject, again[0].payload.clone());
        h.apply(
            proto::subject::CONVERSIONS_DECIDED_BATCH,
            vec![0xff, 0xff, 0xff],
        );
        let reads = h.reads();
        assert_eq!(reads.reports('o').unwrap(), before);
        assert_eq!(reads.delivery_queue(0, u64::MAX, 10).unwrap().len(), 2);
        let state = |id: &String| reads.get(id).unwrap().unwrap().state;
        assert_eq!(state(&ids[1]), ConversionState::Rejected);
        assert_eq!(common::store::checkpoint(h.tree.rows()).unwrap(), 6);
    }

    #[test]
    fn a_report_is_pending_then_its_first_decision_sticks() {
        let mut h = Harness::new();
        let id = h.report("T1");
        assert_eq!(h.reads().pending().count(), 1);
        h.attribute(&id, 2_000_000);
        let rejected = ConversionRejected {
            conversion_id: id.clone(),
            reason: RejectReason::Duplicate as i32,
            ..Default::default()
        };
        h.apply(
            proto::subject::CONVERSION_REJECTED,
            rejected.encode_to_vec(),
        );
        h.attribute(&id, 9_000_000);

        let reads = h.reads();
        let view = reads.get(&id).unwrap().unwrap();
        assert_eq!(
            (view.state, view.payout_micros),
            (ConversionState::Attributed, 2_000_000)
        );
        assert!(reads.pending().next().is_none());
        let taken = |goal: &str, txid: &str| dedup_of(&reads, goal, txid);
        assert_eq!(taken("", "T1"), (true, true));
        assert_eq!(taken("", "T2"), (true, false));
        assert_eq!(taken("", ""), (true, false));
        assert_eq!(taken("sale", "T1"), (false, false));
        assert_eq!(
            reads.dedup(OTHER_CLICK, "", "T1").unwrap(),
            Dedup::default()
        );
        let (_, row) = &reads.reports('o').unwrap()[0];
        assert_eq!(
            (row.attributed, row.rejected, row.payout["USD"]),
            (1, 0, 2_000_000)
        );
        // A txid after the goal's first row is found by the second scan.
        let later = h.report("T3");
        h.attribute(&later, 1_000_000);
        let taken = |goal: &str, txid: &str| dedup_of(&h.reads(), goal, txid);
        assert_eq!(taken("", "T3"), (true, true));
        assert_eq!(taken("", "T2"), (true, false));
        assert_eq!(taken("", "T1"), (true, true));
    }

    /// The dedup questions of (CLICK, goal, txid): (goal taken, txid taken).
    fn dedup_of(reads: &Conversions, goal: &str, txid: &str) -> (bool, bool) {
        let d = reads.dedup(CLICK, goal, txid).unwrap();
        (d.goal_taken, d.txid_taken)
    }

    #[test]
    fn ids_in_keys_read_back_and_delimit_themselves() {
        let ids = [
            CLICK,
            OTHER_CLICK,
            "0190A0B4-7C6E-7A2B-9C1D-2E3F4A5B6C7D", // not canonical: kept as it is
            "0190a0b47c6e7a2b9c1d2e3f4a5b6c7d",
            "partner-order-17",
            "",
        ];
        for id in ids {
            let mut key = Vec::new();
            push_id(&mut key, id);
            key.extend_from_slice(b"rest");
            assert_eq!(read_id(&key), Some((id.to_owned(), &b"rest"[..])), "{id:?}");
            for other in ids.iter().filter(|o| **o != id) {
                let mut prefix = Vec::new();
                push_id(&mut prefix, other);
                assert!(!key.starts_with(&prefix), "{id:?} under {other:?}");
            }
        }
        assert_eq!(view_key(CLICK).len(), 2 + 17, "a UUID takes 17 bytes");
        assert_eq!(read_id(&[7, 1, 2]), None, "unknown tag");
        assert_eq!(read_id(&[ID_UUID, 1, 2]), None, "cut short");
    }

    #[test]
    fn no_goal_s_dedup_rows_share_another_goal_s_prefix() {
        let rows = [("a", "b"), ("ab", ""), ("a\u{1f}b", ""), ("a", "\u{1f}b")];
        for (goal, txid) in rows {
            for (other, _) in rows.iter().filter(|(g, _)| *g != goal) {
                assert!(
                    !dedup_key(CLICK, goal, txid, "c")
                        .starts_with(&dedup_goal_prefix(CLICK, other)),
                    "{goal:?}/{txid:?} under {other:?}"
                );
            }
        }
        assert_ne!(goal_claim(CLICK, "a"), txid_claim(CLICK, "a", ""));
        for (txid, other) in [("T", "T1"), ("", "T")] {
            assert!(
                !dedup_key(CLICK, "g", other, "c")
                    .starts_with(&dedup_txid_prefix(CLICK, "g", txid)),
                "{other:?} under {txid:?}"
            );
        }
        let key = dedup_key(CLICK, "goal", "txid", CLICK);
        let prefix = id_key(b"d/", CLICK).len();
        assert_eq!(dedup_row_id(&key, prefix), Some(&id_key(b"", CLICK)[..]));
    }

    #[test]
    fn a_second_report_of_the_same_conversion_changes_nothing() {
        let mut h = Harness::new();
        let id = h.report("");
        h.attribute(&id, 1);
        let before = h.reads().get(&id).unwrap();
        h.report("");
        assert_eq!(h.reads().get(&id).unwrap(), before);
        assert!(h.reads().pending().next().is_none(), "not pending again");
        assert_eq!(h.reads().of_click(CLICK).unwrap().len(), 1);
    }

    #[test]
    fn a_taken_id_reported_again_as_something_else_is_decided_malformed_on_its_own() {
        let mut h = Harness::new();
        let partner = |click: &str, amount: i64| ConversionReported {
            conversion_id: "partner-7".into(),
            click_id: click.into(),
            amount_micros: Some(amount),
            status: "chargeback".into(),
            ..Default::default()
        };
        let first = ConversionReported {
            status: String::new(),
            ..partner(CLICK, 5)
        };
        h.apply(proto::subject::CONVERSION_REPORTED, first.encode_to_vec());
        h.attribute("partner-7", 1);
        let before = h.reads().get("partner-7").unwrap().unwrap();

        // Another click's report under the same id: not a status change of
        // this one.
        let other = partner(OTHER_CLICK, 5).encode_to_vec();
        h.apply(proto::subject::CONVERSION_REPORTED, other.clone());
        // A broken report under the id, then the same bytes again.
        let broken = partner(CLICK, -1).encode_to_vec();
        h.apply(proto::subject::CONVERSION_REPORTED, broken.clone());
        h.apply(proto::subject::CONVERSION_REPORTED, broken.clone());

        assert_eq!(h.reads().get("partner-7").unwrap().unwrap(), before);
        assert!(
            h.reads().status_queue().next().is_none(),
            "no status change"
        );
        let pending: Vec<_> = h.reads().pending().collect::<Result<_, _>>().unwrap();
        let whys: Vec<&str> = pending
            .iter()
            .map(|v| v.malformed.as_deref().unwrap())
            .collect();
        assert_eq!(whys.len(), 2, "each conflict once, its retry not: {whys:?}");
        assert!(whys[0].contains("another click, goal or txid"), "{whys:?}");
        assert!(whys[1].starts_with("negative amount"), "{whys:?}");
        assert_eq!(pending[0].conversion_id, conflict_id(&other));
        assert_eq!(pending[0].raw_hex, Some(hex(&other)));
        assert_eq!(pending[1].raw_hex, Some(hex(&broken)));

        // A broken first report with no id of its own, then its corrected
        // form: the broken one never takes the id derived from its click,
        // goal and txid, so the correction is the conversion.
        let mut h = Harness::new();
        let bad = ConversionReported {
            click_id: CLICK.into(),
            amount_micros: Some(-1),
            ..Default::default()
        };
        h.apply(proto::subject::CONVERSION_REPORTED, bad.encode_to_vec());
        let id = h.report("");
        let pending: Vec<_> = h.reads().pending().collect::<Result<_, _>>().unwrap();
        assert_eq!(pending.len(), 2, "{pending:?}");
        assert!(pending[0].malformed.is_some());
        assert_ne!(pending[0].conversion_id, id);
        assert_eq!(
            (
                pending[1].conversion_id.as_str(),
                pending[1].malformed.as_deref()
            ),
            (id.as_str(), None),
            "the correction is well formed, under its own id"
        );
    }

    #[test]
    fn a_partners_corrected_report_under_the_id_its_broken_one_took_is_the_conversion() {
        for decided_first in [true, false] {
            let mut h = Harness::new();
            let order = |amount: i64| ConversionReported {
                conversion_id: "ORD-1".into(),
                click_id: CLICK.into(),
                txid: "T1".into(),
                amount_micros: Some(amount),
                ..Default::default()
            };
            h.apply(
                proto::subject::CONVERSION_REPORTED,
                order(-5).encode_to_vec(),
            );
            let broken = h.reads().get("ORD-1").unwrap().unwrap();
            assert!(broken.malformed.is_some(), "{broken:?}");
            if decided_first {
                let rejected = ConversionRejected {
                    conversion_id: "ORD-1".into(),
                    reason: RejectReason::Malformed as i32,
                    reported_seq: broken.reported_seq,
                    ..Default::default()
                };
                h.apply(
                    proto::subject::CONVERSION_REJECTED,
                    rejected.encode_to_vec(),
                );
            }
            h.apply(
                proto::subject::CONVERSION_REPORTED,
                order(5).encode_to_vec(),
            );
            let reads = h.reads();
            let view = reads.get("ORD-1").unwrap().unwrap();
            assert_eq!(
                (view.state, view.malformed.as_deref(), view.amount_micros),
                (ConversionState::Pending, None, Some(5)),
                "decided first: {decided_first}"
            );
            let pending: Vec<_> = reads.pending().collect::<Result<_, _>>().unwrap();
            assert_eq!(pending.len(), 1, "only the correction: {pending:?}");
            assert_eq!(pending[0].reported_seq, view.reported_seq);
            for (_, row) in reads.reports('o').unwrap() {
                assert_eq!(row, ReportRow::default(), "no rejection counted");
            }
            // A late re-publish of the broken report's rejection does not
            // decide the correction.
            let late = ConversionRejected {
                conversion_id: "ORD-1".into(),
                reason: RejectReason::Malformed as i32,
                reported_seq: broken.reported_seq,
                ..Default::default()
            };
            h.apply(proto::subject::CONVERSION_REJECTED, late.encode_to_vec());
            assert_eq!(
                h.reads().get("ORD-1").unwrap().unwrap().state,
                ConversionState::Pending
            );
        }
    }

    #[test]
    fn a_status_report_queues_where_it_came_from_and_what_it_passed() {
        let mut h = Harness::new();
        let report = http_report;
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("", "o1").encode_to_vec(),
        );
        let id = conversion_id(CLICK, "", "");
        h.attribute(&id, 1);
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("chargeback", "").encode_to_vec(),
        );
        let queued: Vec<_> = h.reads().status_queue().map(|r| r.unwrap().1).collect();
        assert_eq!(
            queued,
            [StatusUpdate {
                conversion_id: id,
                advertiser_status: "chargeback".into(),
                origin: "http".into(),
                verified_offer_id: String::new(),
                amount_micros: None,
                currency: String::new(),
            }]
        );
        // A row queued before these fields existed still reads.
        let old: StatusUpdate =
            serde_json::from_str(r#"{"conversion_id":"c","advertiser_status":"x"}"#).unwrap();
        assert_eq!(old.origin, "");
    }

    #[test]
    fn a_verified_report_opens_an_unauthenticated_rejection_again() {
        let mut h = Harness::new();
        let report = |verified| http_report("", verified);
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("").encode_to_vec(),
        );
        let id = conversion_id(CLICK, "", "");
        h.apply(proto::subject::CONVERSION_REJECTED, unauthenticated(&id, 1));
        // Another unverified report changes nothing; a verified one reopens.
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("").encode_to_vec(),
        );
        assert_eq!(
            h.reads().get(&id).unwrap().unwrap().state,
            ConversionState::Rejected
        );
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("o1").encode_to_vec(),
        );
        let reopened = h.reads().get(&id).unwrap().unwrap();
        assert_eq!(
            (
                reopened.state,
                reopened.reported_seq,
                reopened.verified_offer_id.as_str()
            ),
            (ConversionState::Pending, 4, "o1")
        );
        assert_eq!(h.reads().pending_ids().count(), 1);
        // The first report's rejection, re-published late, is not this one's.
        h.apply(proto::subject::CONVERSION_REJECTED, unauthenticated(&id, 1));
        assert_eq!(
            h.reads().get(&id).unwrap().unwrap().state,
            ConversionState::Pending
        );
        let attributed = ConversionAttributed {
            conversion_id: id.clone(),
            offer_id: "o1".into(),
            reported_seq: 4,
            ..Default::default()
        };
        h.apply(
            proto::subject::CONVERSION_ATTRIBUTED,
            attributed.encode_to_vec(),
        );
        assert_eq!(
            h.reads().get(&id).unwrap().unwrap().state,
            ConversionState::Attributed
        );
        assert_eq!(h.reads().pending_ids().count(), 0);
        let rows = h.reads().reports('o').unwrap();
        let row = &rows.iter().find(|(id, _)| id == "o1").unwrap().1;
        assert_eq!(
            (row.attributed, row.rejected, row.rejected_by_reason.len()),
            (1, 0, 0),
            "counted once, as attributed: {rows:?}"
        );
    }

    #[test]
    fn a_report_with_another_word_opens_a_rejection_for_its_word_again() {
        let mut h = Harness::new();
        // Each report dated as the door took it: the correction an hour later.
        let report = |word, at| {
            ConversionReported {
                occurred_at_ms: at,
                ..http_report(word, "")
            }
            .encode_to_vec()
        };
        let (first, hour_later) = (5_000, 5_000 + 3_600_000);
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("aproved", first),
        );
        let id = conversion_id(CLICK, "", "");
        let for_its_word = rejected_as(RejectReason::Malformed, &id, 1);
        h.apply(proto::subject::CONVERSION_REJECTED, for_its_word);
        // The same word again changes nothing; the corrected one reopens.
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("aproved", hour_later),
        );
        assert_eq!(
            h.reads().get(&id).unwrap().unwrap().state,
            ConversionState::Rejected
        );
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("approved", hour_later),
        );
        let reopened = h.reads().get(&id).unwrap().unwrap();
        assert_eq!(
            (
                reopened.state,
                reopened.reported_seq,
                reopened.advertiser_status.as_str(),
                reopened.converted_at_ms
            ),
            (ConversionState::Pending, 4, "approved", first),
            "the sale as first reported, as a correction before the decision is"
        );
        assert_eq!(h.reads().pending_ids().count(), 1);
        assert!(
            h.reads().status_queue().next().is_none(),
            "not a status change"
        );
        assert_eq!(
            rejections_of_o1(&h),
            (0, 0),
            "its rejection no longer counted"
        );
    }

    #[test]
    fn a_partners_corrected_word_is_dated_as_its_first_report_too() {
        let mut h = Harness::new();
        let report = |word: &str, at| {
            ConversionReported {
                click_id: CLICK.into(),
                origin: ConversionOrigin::Nats as i32,
                status: word.into(),
                occurred_at_ms: at,
                ..Default::default()
            }
            .encode_to_vec()
        };
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("aproved", 5_000),
        );
        let id = conversion_id(CLICK, "", "");
        let for_its_word = rejected_as(RejectReason::Malformed, &id, 1);
        h.apply(proto::subject::CONVERSION_REJECTED, for_its_word);
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("approved", 2 * 86_400_000),
        );
        let reopened = h.reads().get(&id).unwrap().unwrap();
        assert_eq!(
            (reopened.state, reopened.converted_at_ms),
            (ConversionState::Pending, 5_000)
        );
    }

    #[test]
    fn a_word_corrected_before_the_decision_reopens_a_rejection_for_its_word() {
        let mut h = Harness::new();
        let report = |word, amount_micros| {
            ConversionReported {
                amount_micros,
                currency: "EUR".into(),
                ..http_report(word, "")
            }
            .encode_to_vec()
        };
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("aproved", Some(10)),
        );
        // The correction (its amount corrected too) waits for the first
        // report's decision.
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("approved", Some(49_900_000)),
        );
        let id = conversion_id(CLICK, "", "");
        let for_its_word = rejected_as(RejectReason::Malformed, &id, 1);
        h.apply(proto::subject::CONVERSION_REJECTED, for_its_word.clone());
        // The decider ignores the queued word (the conversion is rejected);
        // folded, that decision opens the conversion again as its report.
        h.apply(
            proto::subject::CONVERSION_STATUS_UPDATED,
            status_decision(&id, 2, "approved", None),
        );
        let reopened = h.reads().get(&id).unwrap().unwrap();
        assert_eq!(
            (
                reopened.state,
                reopened.reported_seq,
                reopened.advertiser_status.as_str(),
                reopened.origin.as_str()
            ),
            (ConversionState::Pending, 2, "approved", "http")
        );
        assert_eq!(
            (reopened.amount_micros, reopened.currency.as_str()),
            (Some(49_900_000), "EUR"),
            "decided with the correction's amount, as when it comes after"
        );
        assert_eq!(h.reads().pending_ids().count(), 1);
        assert_eq!(
            rejections_of_o1(&h),
            (0, 0),
            "its rejection no longer counted"
        );
        // The first report's rejection, published again late, is not this one's.
        h.apply(proto::subject::CONVERSION_REJECTED, for_its_word);
        assert_eq!(
            h.reads().get(&id).unwrap().unwrap().state,
            ConversionState::Pending
        );
    }

    #[test]
    fn a_partner_s_report_opens_an_unauthenticated_rejection_again() {
        let mut h = Harness::new();
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            http_report("", "").encode_to_vec(),
        );
        let id = conversion_id(CLICK, "", "");
        h.apply(proto::subject::CONVERSION_REJECTED, unauthenticated(&id, 1));
        let partner = ConversionReported {
            click_id: CLICK.into(),
            origin: ConversionOrigin::Nats as i32,
            ..Default::default()
        };
        h.apply(proto::subject::CONVERSION_REPORTED, partner.encode_to_vec());
        let reopened = h.reads().get(&id).unwrap().unwrap();
        assert_eq!(
            (
                reopened.state,
                reopened.reported_seq,
                reopened.origin.as_str()
            ),
            (ConversionState::Pending, 3, "nats")
        );
        assert_eq!(rejections_of_o1(&h), (0, 0));
    }

    #[test]
    fn a_verified_report_takes_the_place_of_an_unverified_one_still_pending() {
        let mut h = Harness::new();
        let report = |verified| http_report("", verified);
        let id = conversion_id(CLICK, "", "");
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("").encode_to_vec(),
        );
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("o1").encode_to_vec(),
        );
        let view = h.reads().get(&id).unwrap().unwrap();
        assert_eq!(
            (
                view.state,
                view.reported_seq,
                view.verified_offer_id.as_str()
            ),
            (ConversionState::Pending, 2, "o1")
        );
        let pending: Vec<u64> = h.reads().pending_from(0).map(|r| r.unwrap().0).collect();
        assert_eq!(pending, [2], "waiting once, as the verified report");
        // A decision of the unverified report, published before, is not this
        // one's.
        h.apply(proto::subject::CONVERSION_REJECTED, unauthenticated(&id, 1));
        assert_eq!(
            h.reads().get(&id).unwrap().unwrap().state,
            ConversionState::Pending
        );
        // A verified report is not replaced by another.
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            report("o1").encode_to_vec(),
        );
        assert_eq!(h.reads().get(&id).unwrap().unwrap().reported_seq, 2);
    }

    #[test]
    fn a_later_word_of_an_undecided_conversion_waits_for_its_decision() {
        let mut h = Harness::new();
        let id = h.report("");
        // Reported again with a misspelt word before it is decided: decided
        // with its report's word, the later one queued for the status rules.
        let again = ConversionReported {
            click_id: CLICK.into(),
            status: "aproved".into(),
            ..Default::default()
        };
        h.apply(proto::subject::CONVERSION_REPORTED, again.encode_to_vec());
        let view = h.reads().get(&id).unwrap().unwrap();
        assert_eq!(view.advertiser_status, "");
        let queued: Vec<String> = h
            .reads()
            .status_queue()
            .map(|r| r.unwrap().1.advertiser_status)
            .collect();
        assert_eq!(queued, ["aproved"]);
        // Once decided, the word decided last is the view's, moved or not.
        h.attribute(&id, 1);
        let ignored = ConversionStatusUpdated {
            conversion_id: id.clone(),
            advertiser_status: "aproved".into(),
            update_seq: 2,
            changed: false,
            ..Default::default()
        };
        h.apply(
            proto::subject::CONVERSION_STATUS_UPDATED,
            ignored.encode_to_vec(),
        );
        assert_eq!(
            h.reads().get(&id).unwrap().unwrap().advertiser_status,
            "aproved"
        );
        assert!(h.reads().status_queue().next().is_none());
    }

    /// The `unauthenticated` rejection of conversion `id` as reported at
    /// `reported_seq`.
    fn unauthenticated(id: &str, reported_seq: u64) -> Vec<u8> {
        rejected_as(RejectReason::Unauthenticated, id, reported_seq)
    }

    /// A rejection of conversion `id` as reported at `reported_seq`, on o1.
    fn rejected_as(reason: RejectReason, id: &str, reported_seq: u64) -> Vec<u8> {
        ConversionRejected {
            conversion_id: id.into(),
            offer_id: "o1".into(),
            reason: reason as i32,
            reported_seq,
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Offer o1's report row: rejections, and the reasons they are counted under.
    fn rejections_of_o1(h: &Harness) -> (u64, usize) {
        let rows = h.reads().reports('o').unwrap();
        let row = &rows.iter().find(|(id, _)| id == "o1").unwrap().1;
        (row.rejected, row.rejected_by_reason.len())
    }

    /// A status decision of the update queued at `update_seq`.
    fn status_decision(
        id: &str,
        update_seq: u64,
        word: &str,
        move_to: Option<(ConversionStatus, ConversionStatus)>,
    ) -> Vec<u8> {
        let (from, to) =
            move_to.unwrap_or((ConversionStatus::Approved, ConversionStatus::Approved));
        ConversionStatusUpdated {
            conversion_id: id.into(),
            advertiser_status: word.into(),
            update_seq,
            changed: move_to.is_some(),
            from: super::super::view::status_to_proto(from) as i32,
            to: super::super::view::status_to_proto(to) as i32,
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn a_status_decision_published_again_late_moves_nothing_twice() {
        use ConversionStatus::{Approved, Rejected};
        let mut h = Harness::new();
        let id = h.report(""); // 1
        h.attribute(&id, 1_000_000); // 2
        let again = |h: &mut Harness, word: &str| {
            let e = ConversionReported {
                click_id: CLICK.into(),
                status: word.into(),
                ..Default::default()
            };
            h.apply(proto::subject::CONVERSION_REPORTED, e.encode_to_vec());
        };
        again(&mut h, "chargeback"); // 3
        let reversal = status_decision(&id, 3, "chargeback", Some((Approved, Rejected)));
        h.apply(proto::subject::CONVERSION_STATUS_UPDATED, reversal.clone()); // 4
        again(&mut h, "approved"); // 5
        let approval = status_decision(&id, 5, "approved", Some((Rejected, Approved)));
        h.apply(proto::subject::CONVERSION_STATUS_UPDATED, approval); // 6
        assert_eq!(h.reads().get(&id).unwrap().unwrap().status, Some(Approved));
        // The reversal's decision again, past JetStream's duplicate window.
        h.apply(proto::subject::CONVERSION_STATUS_UPDATED, reversal);
        let view = h.reads().get(&id).unwrap().unwrap();
        assert_eq!(
            (view.status, view.status_history.len()),
            (Some(Approved), 2),
            "{view:?}"
        );
    }

    #[test]
    fn a_status_decision_leaves_a_conversion_reopened_since_as_it_is() {
        let mut h = Harness::new();
        let id = conversion_id(CLICK, "", "");
        let report = |status, verified| http_report(status, verified).encode_to_vec();
        h.apply(proto::subject::CONVERSION_REPORTED, report("", "")); // 1
        h.apply(proto::subject::CONVERSION_REPORTED, report("xyz", "")); // 2: queued
        h.apply(proto::subject::CONVERSION_REJECTED, unauthenticated(&id, 1)); // 3
        h.apply(proto::subject::CONVERSION_REPORTED, report("", "o1")); // 4: reopens
                                                                        // The queued word, decided (ignored) against the rejection, folds late.
        h.apply(
            proto::subject::CONVERSION_STATUS_UPDATED,
            status_decision(&id, 2, "xyz", None),
        );
        let view = h.reads().get(&id).unwrap().unwrap();
        assert_eq!(
            (
                view.state,
                view.advertiser_status.as_str(),
                view.reported_seq
            ),
            (ConversionState::Pending, "", 4),
            "decided as the verified report, with its word"
        );
    }

    #[test]
    fn a_partner_s_report_of_the_word_last_decided_still_goes_to_the_status_rules() {
        let mut h = Harness::new();
        let id = h.report(""); // 1, a partner's
        h.attribute(&id, 1); // 2
        h.apply(
            proto::subject::CONVERSION_REPORTED,
            http_report("chargeback", "").encode_to_vec(),
        ); // 3
           // Ignored: unverified, on a secured offer; the word is the last decided.
        h.apply(
            proto::subject::CONVERSION_STATUS_UPDATED,
            status_decision(&id, 3, "chargeback", None),
        );
        assert!(h.reads().status_queue().next().is_none());
        let partner = ConversionReported {
            click_id: CLICK.into(),
            status: "chargeback".into(),
            origin: ConversionOrigin::Nats as i32,
            ..Default::default()
        };
        h.apply(proto::subject::CONVERSION_REPORTED, partner.encode_to_vec()); // 5
        let queued: Vec<(u64, String)> = h
            .reads()
            .status_queue()
            .map(|r| r.map(|(seq, u)| (seq, u.origin)).unwrap())
            .collect();
        assert_eq!(queued, [(5, "nats".to_owned())]);
    }

    #[test]
    fn a_malformed_report_is_listed_under_its_click_in_canonical_form() {
        let mut h = Harness::new();
        let upper = ConversionReported {
            click_id: CLICK.to_uppercase(),
            currency: "ZZZ".into(),
            ..Default::default()
        };
        h.apply(proto::subject::CONVERSION_REPORTED, upper.encode_to_vec());
        let listed = h.reads().of_click(CLICK).unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0].malformed.is_some());
        assert_eq!(listed[0].click_id, CLICK);
    }

    /// An HTTP report of `CLICK` with this status word, verified at the door
    /// for `verified` (empty: not verified).
    fn http_report(status: &str, verified: &str) -> ConversionReported {
        ConversionReported {
            click_id: CLICK.into(),
            origin: ConversionOrigin::Http as i32,
            status: status.into(),
            verified_offer_id: verified.into(),
            ..Default::default()
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_click_lists_its_pending_attributed_and_rejected_conversions_once_each() {
        let mut h = Harness::new();
        let attributed = h.report("A");
        let rejected = h.report("R");
        let pending = h.report("P");
        h.attribute(&attributed, 1);
        let reject = ConversionRejected {
            conversion_id: rejected.clone(),
            reason: RejectReason::Expired as i32,
            ..Default::default()
        };
        h.apply(proto::subject::CONVERSION_REJECTED, reject.encode_to_vec());
        let other = ConversionReported {
            click_id: OTHER_CLICK.into(),
            txid: "O".into(),
            ..Default::default()
        };
        h.apply(proto::subject::CONVERSION_REPORTED, other.encode_to_vec());
        // Two attributed conversions of one (click, goal, txid), as the `all`
        // dedup policy allows: a dedup row each.
        let twins: Vec<String> = (1..=2)
            .map(|n| format!("0190a0b4-7c6e-7a2b-9c1d-00000000000{n}"))
            .collect();
        for id in &twins {
            let twin = ConversionReported {
                conversion_id: id.clone(),
                click_id: CLICK.into(),
                ..Default::default()
            };
            h.apply(proto::subject::CONVERSION_REPORTED, twin.encode_to_vec());
            h.attribute(id, 1);
        }

        let listed: Vec<(String, ConversionState)> = h
            .reads()
            .of_click(CLICK)
            .unwrap()
            .into_iter()
            .map(|v| (v.conversion_id, v.state))
            .collect();
        let mut expected = vec![
            (attributed, ConversionState::Attributed),
            (rejected, ConversionState::Rejected),
            (pending, ConversionState::Pending),
        ];
        expected.extend(
            twins
                .into_iter()
                .map(|id| (id, ConversionState::Attributed)),
        );
        expected.sort_by_key(|(id, _)| uuid::Uuid::parse_str(id).unwrap());
        assert_eq!(listed, expected, "in id order, the other click's apart");
        assert_eq!(h.reads().of_click(OTHER_CLICK).unwrap().len(), 1);
    }

    #[test]
    fn garbage_becomes_a_pending_malformed_conversion() {
        let mut h = Harness::new();
        h.apply(proto::subject::CONVERSION_REPORTED, vec![0xff, 0x01]);
        // The same bytes again (a plain NATS publish retried, no message
        // id): the same malformed conversion, decided once.
        h.apply(proto::subject::CONVERSION_REPORTED, vec![0xff, 0x01]);
        let pending: Vec<_> = h.reads().pending().collect::<Result<_, _>>().unwrap();
        assert_eq!(pending.len(), 1);
        assert!(pending[0]
            .malformed
            .as_deref()
            .unwrap()
            .contains("undecodable"));
        assert_eq!(pending[0].raw_hex.as_deref(), Some("ff01"));
    }

    /// A view with every field set, so that a change to any of them shows in
    /// its packed bytes.
    fn every_field_set() -> ConversionView {
        use super::super::view::StatusChange;
        ConversionView {
            conversion_id: "cv".into(),
            click_id: "ck".into(),
            goal: "g".into(),
            txid: "t".into(),
            amount_micros: Some(7),
            currency: "EUR".into(),
            origin: "http".into(),
            ip: "ip".into(),
            converted_at_ms: 1,
            reported_at_ms: 2,
            reported_seq: 3,
            malformed: Some("m".into()),
            raw_hex: Some("ff".into()),
            state: ConversionState::Attributed,
            reason: Some(Reason::CapReached),
            detail: "d".into(),
            offer_id: "o".into(),
            affiliate_id: "a".into(),
            payout_micros: 4,
            payout_currency: "USD".into(),
            revenue_micros: 5,
            revenue_currency: "GBP".into(),
            decided_at_ms: Some(6),
            postback_url: "u".into(),
            postback_statuses: vec!["approved".into()],
            status: Some(ConversionStatus::Rejected),
            advertiser_status: "s".into(),
            verified_offer_id: "v".into(),
            cap_day: "c".into(),
            status_history: vec![StatusChange {
                from: ConversionStatus::Pending,
                to: ConversionStatus::Approved,
                advertiser_status: "x".into(),
                at_ms: 8,
            }],
        }
    }

    /// Views are stored packed, which is not self-describing: rows written by
    /// an older shape would misread. If this fails because `ConversionView`
    /// (or a type in it) changed, bump [`FORMAT`] (the Tree is then folded
    /// again from the log on upgrade) and update the bytes here.
    #[test]
    fn a_packed_view_keeps_its_shape() {
        let view = every_field_set();
        let packed = common::store::pack(&view);
        let hex: String = packed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            (FORMAT, hex.as_str()),
            (12, PACKED_VIEW),
            "see this test's doc"
        );
        assert_eq!(common::store::unpack::<ConversionView>(&packed), Some(view));
    }

    /// A report row with every field set, packed, pinned like the view
    /// ([`FORMAT`]'s doc).
    #[test]
    fn a_packed_report_row_keeps_its_shape() {
        let money = |payout: (&'static str, i64), revenue| Money { payout, revenue };
        let row = ReportRow::default()
            .attributed(
                ConversionStatus::Approved,
                money(("USD", 2_500_000), ("EUR", 7)),
            )
            .attributed(ConversionStatus::Pending, money(("USD", 1), ("USD", 1)))
            .rejected(Reason::Duplicate)
            .rejected(Reason::Malformed);
        let packed = common::store::pack(&row);
        let hex: String = packed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            (FORMAT, hex.as_str()),
            (12, PACKED_REPORT_ROW),
            "see FORMAT's doc"
        );
        assert_eq!(common::store::unpack::<ReportRow>(&packed), Some(row));
    }

    const PACKED_REPORT_ROW: &str = "0202020201040102000101010103555344c096b10201034555520e";

    const PACKED_VIEW: &str = "02637602636b01670174010e03455552046874747002697002040301016d010266660101070164016f016108035553440a03474250010c01750108617070726f7665640102017301760163010001017810";

    #[test]
    fn a_view_packs_to_less_than_half_its_json() {
        let mut h = Harness::new();
        let id = h.report("ORDER-1");
        h.attribute(&id, 2_500_000);
        let view = Conversions::new(h.tree.rows().clone())
            .get(&id)
            .unwrap()
            .unwrap();
        let (packed, json) = (
            common::store::pack(&view).len(),
            serde_json::to_vec(&view).unwrap().len(),
        );
        assert!(packed * 2 < json, "packed {packed} bytes, JSON {json}");
        assert_eq!(
            h.tree.get(view_key(&id)).unwrap().unwrap().len(),
            packed,
            "stored packed"
        );
    }
}
