//! The visitor window of the clicks Tree: each visitor's last click time, which
//! decides whether a click is unique.
//!
//! A visitor is the fingerprint of (IP, user agent, offer, affiliate): the
//! first [`FINGERPRINT_BYTES`] of their SHA-256. Rows: `f/<first 2 bytes of
//! the fingerprint>`, one per bucket of visitors; the value lists the bucket's
//! visitors, each as the other 8 bytes of its fingerprint and its last click
//! time (event time, ms, 8 bytes BE), 16 bytes an entry, least recently seen
//! first. When a bucket is rewritten, the entries last seen more than
//! [`RETAIN_MS`] before the log time of the click being folded are dropped:
//! log time, not event time, so no click's claimed time can empty a bucket,
//! and a replay drops the same entries at the same place.
//!
//! A row per visitor (format 2 and before) made nearly every click insert a
//! new key, and sled splits a leaf every few inserts: that row was about half
//! of the clicks fold's cost measured alone. After 65,536 visitors every
//! bucket exists, so a click rewrites a row instead. A bucket holds the
//! visitors of about two days divided by 65,536: 30 entries (480 bytes) at a
//! million distinct visitors a day.

use common::Staged;
use proto::clicks::v1::ClickRecorded;

use super::UNIQUE_WINDOW_MS;

/// How long a visitor's entry outlives its last click (log time). Twice the
/// unique window, so a click that reaches the log up to a day after it
/// happened is still judged against every earlier click of its visitor.
pub const RETAIN_MS: i64 = 2 * UNIQUE_WINDOW_MS;

/// Bytes of a visitor's fingerprint kept: 2 name its bucket, 8 are in its entry.
/// 80 bits: that two of a million visitors share one has a chance of about 4 in
/// 10^13.
pub const FINGERPRINT_BYTES: usize = 10;

/// Bytes of the fingerprint naming the bucket.
const BUCKET_BYTES: usize = 2;

/// Bytes of an entry: the rest of the fingerprint, then the last click time.
const ENTRY_BYTES: usize = FINGERPRINT_BYTES - BUCKET_BYTES + 8;

/// A visitor's fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visitor([u8; FINGERPRINT_BYTES]);

impl Visitor {
    /// The visitor who made `click`.
    pub fn of(click: &ClickRecorded) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::new()
            .chain_update(click.ip.as_bytes())
            .chain_update([0x1f])
            .chain_update(click.user_agent.as_bytes())
            .chain_update([0x1f])
            .chain_update(click.offer_id.as_bytes())
            .chain_update([0x1f])
            .chain_update(click.affiliate_id.as_bytes())
            .finalize();
        let mut fingerprint = [0; FINGERPRINT_BYTES];
        fingerprint.copy_from_slice(&digest[..FINGERPRINT_BYTES]);
        Self(fingerprint)
    }

    fn bucket_key(&self) -> Vec<u8> {
        [&b"f/"[..], &self.0[..BUCKET_BYTES]].concat()
    }

    fn tail(&self) -> &[u8] {
        &self.0[BUCKET_BYTES..]
    }
}

/// Stages a click of `visitor` at `at_ms` (event time), folded at
/// `log_time_ms`, and returns the visitor's last click time before it (none:
/// not seen within [`RETAIN_MS`]). The visitor's time becomes the later of the
/// two; negative times count as 0.
///
/// # Errors
/// sled read failure.
pub fn visit(
    staged: &mut Staged<'_>,
    visitor: &Visitor,
    at_ms: i64,
    log_time_ms: i64,
) -> Result<Option<i64>, sled::Error> {
    let key = visitor.bucket_key();
    let row = staged.get(&key)?.unwrap_or_default();
    let horizon = log_time_ms.saturating_sub(RETAIN_MS);
    let mut last = None;
    let mut kept = Vec::with_capacity(row.len() + ENTRY_BYTES);
    for entry in row.chunks_exact(ENTRY_BYTES) {
        let (tail, time) = entry.split_at(ENTRY_BYTES - 8);
        let time = i64::from_be_bytes(time.try_into().unwrap_or_default());
        if tail == visitor.tail() {
            last = Some(time);
        } else if time >= horizon {
            kept.extend_from_slice(entry);
        }
    }
    let latest = last.unwrap_or(0).max(at_ms).max(0);
    kept.extend_from_slice(visitor.tail());
    kept.extend_from_slice(&latest.to_be_bytes());
    staged.insert(key, kept);
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visitor(ip: &str) -> Visitor {
        Visitor::of(&ClickRecorded {
            ip: ip.into(),
            user_agent: "ua".into(),
            offer_id: "o1".into(),
            affiliate_id: "a1".into(),
            ..Default::default()
        })
    }

    /// Two visitors sharing one bucket, as 65,536 buckets make common.
    fn neighbours() -> (Visitor, Visitor) {
        let first = visitor("10.0.0.0");
        let second = (1..)
            .map(|i| visitor(&format!("10.0.{}.{}", i / 256, i % 256)))
            .find(|v| v.bucket_key() == first.bucket_key())
            .unwrap();
        (first, second)
    }

    fn with_tree(f: impl FnOnce(&common::FoldTree)) {
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        f(&common::FoldTree::open(&db, "clicks").unwrap());
    }

    #[test]
    fn a_visitor_is_remembered_at_their_latest_click() {
        with_tree(|tree| {
            let mut staged = Staged::new(tree);
            let (a, b) = neighbours();
            assert_eq!(visit(&mut staged, &a, 100, 0).unwrap(), None);
            assert_eq!(visit(&mut staged, &b, 150, 0).unwrap(), None);
            assert_eq!(visit(&mut staged, &a, 200, 0).unwrap(), Some(100));
            // A late click does not move the visitor's time back.
            assert_eq!(visit(&mut staged, &a, 50, 0).unwrap(), Some(200));
            staged.commit(4).unwrap();
            let mut staged = Staged::new(tree);
            assert_eq!(visit(&mut staged, &a, 300, 0).unwrap(), Some(200));
            assert_eq!(visit(&mut staged, &b, 300, 0).unwrap(), Some(150));
            let row = staged.get(&a.bucket_key()).unwrap().unwrap();
            assert_eq!(row.len(), 2 * ENTRY_BYTES, "one entry per visitor");
        });
    }

    #[test]
    fn entries_past_the_retention_leave_when_their_bucket_is_rewritten() {
        with_tree(|tree| {
            let mut staged = Staged::new(tree);
            let (a, b) = neighbours();
            visit(&mut staged, &a, 1_000, 1_000).unwrap();
            visit(&mut staged, &b, 2_000, 2_000).unwrap();
            // At log time 1,000 + RETAIN_MS, a's entry is not yet past it.
            visit(&mut staged, &b, 3_000, 1_000 + RETAIN_MS).unwrap();
            assert_eq!(staged.get(&a.bucket_key()).unwrap().unwrap().len(), 32);
            // One millisecond later it is, and b's rewrite drops it.
            visit(&mut staged, &b, 4_000, 1_001 + RETAIN_MS).unwrap();
            assert_eq!(staged.get(&a.bucket_key()).unwrap().unwrap().len(), 16);
            assert_eq!(
                visit(&mut staged, &a, 5_000, 1_001 + RETAIN_MS).unwrap(),
                None
            );
        });
    }

    #[test]
    fn a_visitor_past_the_retention_still_finds_their_own_entry() {
        with_tree(|tree| {
            let mut staged = Staged::new(tree);
            let a = visitor("10.0.0.1");
            visit(&mut staged, &a, 1_000, 1_000).unwrap();
            let later = 1_000 + 3 * UNIQUE_WINDOW_MS;
            assert_eq!(visit(&mut staged, &a, later, later).unwrap(), Some(1_000));
        });
    }

    #[test]
    fn negative_times_count_as_zero() {
        with_tree(|tree| {
            let mut staged = Staged::new(tree);
            let a = visitor("10.0.0.2");
            visit(&mut staged, &a, -5, 0).unwrap();
            assert_eq!(visit(&mut staged, &a, 10, 0).unwrap(), Some(0));
        });
    }
}
