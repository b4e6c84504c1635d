//! How a round's decisions go on the wire: in few messages, not one each.
//!
//! Each message costs NATS a store, an ack, a dedup entry and a delivery to
//! every reader, and costs us a header parsed and a reply subject read, whatever
//! its size; the decisions of a burst of reports cost about as much again as
//! the reports. A round's decisions therefore go out as [`ConversionsDecided`]
//! batches on `conversions.v1.decided_batch`, in the round's order, each acked
//! once for all. A round of one decision (the usual case below a few hundred
//! reports a second) publishes it alone on its own subject, as before batches;
//! so does a decision too large to share a message (a rejection carrying a
//! large malformed report's bytes). A decision is in one message only.
//!
//! A batch JetStream refuses as too large (an operator lowered the stream's
//! `max_msg_size` or the server's `max_payload`) is split again under a limit
//! a quarter of the last, down to every decision alone ([`Limits::smaller`]).

use prost::encoding::{encode_key, encode_varint, WireType};

use super::fold::Decision;

/// Most decisions in one batch (`DECISION_BATCH_MAX`'s default and bound; the
/// fold numbers a batch's decisions in 16 bits).
pub const MOST_PER_BATCH: usize = 512;
/// Most bytes of decisions in one batch, far below NATS's default 1 MiB.
const MOST_BYTES: usize = 256 * 1024;
/// Below this a batch is not worth its refusal: every decision goes alone.
const LEAST_BYTES: usize = 4 * 1024;
/// A decision this large goes alone.
const ALONE_FROM: usize = 64 * 1024;
/// The most a batch adds to a decision's bytes: two keys and two lengths.
const ENTRY_OVERHEAD: usize = 12;

/// How much one batch may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most decisions (clamped to 1 to [`MOST_PER_BATCH`]; 1: each alone).
    pub most: usize,
    /// Most bytes.
    pub bytes: usize,
}

impl Limits {
    /// At most `most` decisions and 256 KiB.
    pub fn new(most: usize) -> Self {
        Self {
            most: most.clamp(1, MOST_PER_BATCH),
            bytes: MOST_BYTES,
        }
    }

    /// Each decision alone.
    pub fn alone(self) -> bool {
        self.most == 1
    }

    /// The limits after JetStream refused a batch as too large: a quarter of
    /// the bytes, and below 4 KiB every decision alone.
    pub fn smaller(self) -> Self {
        let bytes = self.bytes / 4;
        if bytes < LEAST_BYTES {
            Self { most: 1, bytes }
        } else {
            Self { bytes, ..self }
        }
    }
}

/// One message to publish: subject, `Nats-Msg-Id`, payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub subject: &'static str,
    pub msg_id: String,
    pub payload: Vec<u8>,
}

/// The messages that carry `decisions`, in order, batched within `limits`.
pub fn messages(decisions: &[Decision], limits: Limits) -> Vec<Outgoing> {
    let most = limits.most.clamp(1, MOST_PER_BATCH);
    let mut out = Vec::new();
    let mut group: Vec<(&Decision, Vec<u8>)> = Vec::new();
    let mut bytes = 0;
    for d in decisions {
        let encoded = d.encode();
        let size = encoded.len() + ENTRY_OVERHEAD;
        if size >= ALONE_FROM {
            flush(&mut out, &mut group);
            out.push(alone(d, encoded));
            bytes = 0;
            continue;
        }
        if group.len() == most || bytes + size > limits.bytes {
            flush(&mut out, &mut group);
            bytes = 0;
        }
        group.push((d, encoded));
        bytes += size;
    }
    flush(&mut out, &mut group);
    out
}

fn alone(d: &Decision, encoded: Vec<u8>) -> Outgoing {
    Outgoing {
        subject: d.subject(),
        msg_id: d.msg_id(),
        payload: encoded,
    }
}

/// The field of `ConversionDecision`'s oneof that holds `d`.
fn field_of(d: &Decision) -> u32 {
    match d {
        Decision::Attributed(_) => 1,
        Decision::Rejected(_) => 2,
        Decision::StatusUpdated(_) => 3,
    }
}

/// Appends `bytes` as length-delimited field `field`.
fn put_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Sends `group` alone or as one `ConversionsDecided`, whose bytes are written
/// from each decision's own encoding (`decisions = 1`, each entry its
/// decision in the oneof's field).
fn flush(out: &mut Vec<Outgoing>, group: &mut Vec<(&Decision, Vec<u8>)>) {
    if group.len() < 2 {
        out.extend(group.drain(..).map(|(d, encoded)| alone(d, encoded)));
        return;
    }
    let ids: Vec<String> = group.iter().map(|(d, _)| d.msg_id()).collect();
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, ids.join("\n").as_bytes());
    let size = group.iter().map(|(_, e)| e.len() + ENTRY_OVERHEAD).sum();
    let (mut payload, mut entry) = (Vec::with_capacity(size), Vec::new());
    for (d, encoded) in group.drain(..) {
        entry.clear();
        put_field(&mut entry, field_of(d), &encoded);
        put_field(&mut payload, 1, &entry);
    }
    out.push(Outgoing {
        subject: proto::subject::CONVERSIONS_DECIDED_BATCH,
        msg_id: format!("decisions/{id}"),
        payload,
    });
}

#[cfg(test)]
mod tests {
    use proto::conversions::v1::{ConversionAttributed, ConversionRejected};

    use super::*;

    fn attributed(i: usize) -> Decision {
        Decision::Attributed(ConversionAttributed {
            conversion_id: format!("conv-{i}"),
            reported_seq: i as u64 + 1,
            ..Default::default()
        })
    }

    fn rejected_with(i: usize, raw: usize) -> Decision {
        Decision::Rejected(ConversionRejected {
            conversion_id: format!("conv-{i}"),
            reported_seq: i as u64 + 1,
            raw: vec![7; raw],
            ..Default::default()
        })
    }

    /// Every decision of `messages`, in order, as the fold reads them.
    fn read_back(messages: &[Outgoing]) -> Vec<Decision> {
        messages
            .iter()
            .flat_map(|m| Decision::all_in(m.subject, &m.payload))
            .collect()
    }

    #[test]
    fn a_lone_decision_keeps_its_own_subject_and_id() {
        let one = attributed(0);
        assert_eq!(
            messages(std::slice::from_ref(&one), Limits::new(512)),
            [alone(&one, one.encode())]
        );
        assert_eq!(
            alone(&one, Vec::new()).subject,
            proto::subject::CONVERSION_ATTRIBUTED
        );
        assert!(messages(&[], Limits::new(512)).is_empty());
    }

    #[test]
    fn a_most_of_one_publishes_each_alone_as_before_batches() {
        let round: Vec<Decision> = (0..3).map(attributed).collect();
        let out = messages(&round, Limits::new(1));
        let each: Vec<Outgoing> = round.iter().map(|d| alone(d, d.encode())).collect();
        assert_eq!(out, each);
        assert_eq!(messages(&round, Limits::new(0)), out, "0 reads as 1");
    }

    #[test]
    fn a_round_goes_in_batches_in_its_order_each_decision_once() {
        let round: Vec<Decision> = (0..1200).map(attributed).collect();
        let out = messages(&round, Limits::new(512));
        let sizes: Vec<usize> = out
            .iter()
            .map(|m| Decision::all_in(m.subject, &m.payload).len())
            .collect();
        assert_eq!(sizes, [512, 512, 176]);
        assert!(out
            .iter()
            .all(|m| m.subject == proto::subject::CONVERSIONS_DECIDED_BATCH));
        assert_eq!(read_back(&out), round);
    }

    #[test]
    fn a_large_decision_goes_alone_between_batches_in_order() {
        let round = vec![
            attributed(0),
            attributed(1),
            rejected_with(2, ALONE_FROM),
            attributed(3),
            rejected_with(4, 100_000),
        ];
        let out = messages(&round, Limits::new(512));
        let subjects: Vec<&str> = out.iter().map(|m| m.subject).collect();
        assert_eq!(
            subjects,
            [
                proto::subject::CONVERSIONS_DECIDED_BATCH,
                proto::subject::CONVERSION_REJECTED,
                proto::subject::CONVERSION_ATTRIBUTED,
                proto::subject::CONVERSION_REJECTED,
            ]
        );
        assert_eq!(read_back(&out), round);
    }

    #[test]
    fn a_batch_is_the_bytes_prost_writes_for_it() {
        use proto::conversions::v1::{
            conversion_decision::Decision as D, ConversionDecision, ConversionStatusUpdated,
            ConversionsDecided,
        };
        let status = ConversionStatusUpdated {
            conversion_id: "conv-9".into(),
            update_seq: 9,
            ..Default::default()
        };
        let round = vec![
            attributed(0),
            rejected_with(1, 300),
            Decision::StatusUpdated(status),
        ];
        let entry = |d: &Decision| ConversionDecision {
            decision: Some(match d.clone() {
                Decision::Attributed(e) => D::Attributed(e),
                Decision::Rejected(e) => D::Rejected(e),
                Decision::StatusUpdated(e) => D::StatusUpdated(e),
            }),
        };
        let expected = ConversionsDecided {
            decisions: round.iter().map(entry).collect(),
        };
        let out = messages(&round, Limits::new(512));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload, prost::Message::encode_to_vec(&expected));
    }

    #[test]
    fn a_batch_refused_as_too_large_is_split_smaller_down_to_each_alone() {
        let mut limits = Limits::new(512);
        let mut bytes = vec![limits.bytes];
        while !limits.alone() {
            limits = limits.smaller();
            bytes.push(limits.bytes);
        }
        assert_eq!(bytes, [262_144, 65_536, 16_384, 4_096, 1_024]);
        let round: Vec<Decision> = (0..40).map(|i| rejected_with(i, 1_000)).collect();
        let under_16k = messages(&round, Limits::new(512).smaller().smaller());
        assert!(under_16k.len() >= 3);
        assert!(under_16k.iter().all(|m| m.payload.len() <= 16_384));
        assert_eq!(read_back(&under_16k), round);
        let each: Vec<Outgoing> = round.iter().map(|d| alone(d, d.encode())).collect();
        assert_eq!(messages(&round, limits), each);
    }

    #[test]
    fn a_batch_stays_under_its_byte_bound() {
        let round: Vec<Decision> = (0..40).map(|i| rejected_with(i, 30_000)).collect();
        let out = messages(&round, Limits::new(512));
        assert!(out.len() > 1);
        assert!(out.iter().all(|m| m.payload.len() <= MOST_BYTES));
        assert_eq!(read_back(&out), round);
    }

    #[test]
    fn the_same_batch_has_the_same_id_and_another_batch_another() {
        let round: Vec<Decision> = (0..3).map(attributed).collect();
        let again = messages(&round, Limits::new(512));
        assert_eq!(messages(&round, Limits::new(512)), again);
        let other: Vec<Decision> = (1..4).map(attributed).collect();
        assert_ne!(
            messages(&other, Limits::new(512))[0].msg_id,
            again[0].msg_id
        );
    }
}
