//! The pending index of the conversions Tree: the reported conversions not yet
//! decided, in log order, which the decider walks.
//!
//! Rows: `p/<bucket, 8 bytes BE>`, where a report at stream sequence `seq` is in
//! bucket `seq / BUCKET_SEQS`; the value lists that bucket's pending
//! conversions in log order, each as its report's sequence (8 bytes BE), its
//! id and its click id (empty for none), both as [`push_id`] writes them. A
//! bucket left empty is removed. The click id lets the click API find a click's
//! pending conversions (a decided one is found through its `d/` or `k/` row).
//!
//! One row per conversion (format 4 and before) made every report insert a new
//! key and every decision remove one: sled splits a leaf every few inserts and
//! merges it again as the removals empty it, and that churn was a third of the
//! conversions fold's cost measured alone (29.9k-32.1k conversions/s without
//! these rows against 21.6k-25.2k with them). A group of the fold now rewrites
//! a bucket row or two instead of writing one row per event.

use common::Staged;

use super::fold::{id_len, push_id, read_id};

/// Stream sequences per bucket: a bucket holds at most this many reports,
/// about 45 bytes each (two UUID ids).
const BUCKET_SEQS: u64 = 128;

/// The row of the bucket holding `seq`.
fn bucket_key(seq: u64) -> Vec<u8> {
    [&b"p/"[..], &(seq / BUCKET_SEQS).to_be_bytes()].concat()
}

/// One entry of a bucket row: its report sequence and where its parts are.
struct Span {
    seq: u64,
    /// The whole entry.
    all: std::ops::Range<usize>,
    /// The encoded conversion id.
    id: std::ops::Range<usize>,
    /// The encoded click id.
    click: std::ops::Range<usize>,
}

/// The entries of a bucket row, in order.
fn spans(row: &[u8]) -> Vec<Span> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(seq) = row.get(at..at + 8) {
        let seq = u64::from_be_bytes(seq.try_into().unwrap_or_default());
        let id = at + 8..at + 8 + row.get(at + 8..).and_then(id_len).unwrap_or(0);
        let click = id.end..id.end + row.get(id.end..).and_then(id_len).unwrap_or(0);
        if id.is_empty() || click.is_empty() {
            break; // a torn tail cannot come from us; what precedes it stands
        }
        let end = click.end;
        out.push(Span {
            seq,
            all: at..end,
            id,
            click,
        });
        at = end;
    }
    out
}

/// Stages `conversion_id` of `click_id`, reported at `seq`, as pending.
///
/// # Errors
/// sled read failure.
pub(crate) fn add(
    staged: &mut Staged<'_>,
    seq: u64,
    conversion_id: &str,
    click_id: &str,
) -> Result<(), sled::Error> {
    let key = bucket_key(seq);
    let row = staged.get(&key)?.unwrap_or_default();
    let spans = spans(&row);
    if spans.iter().any(|s| s.seq == seq) {
        return Ok(());
    }
    // Reports are folded in log order, so the new entry is almost always last.
    let at = spans
        .iter()
        .find(|s| s.seq > seq)
        .map_or(row.len(), |s| s.all.start);
    let mut entry = seq.to_be_bytes().to_vec();
    push_id(&mut entry, conversion_id);
    push_id(&mut entry, click_id);
    let mut new = Vec::with_capacity(row.len() + entry.len());
    new.extend_from_slice(&row[..at]);
    new.extend_from_slice(&entry);
    new.extend_from_slice(&row[at..]);
    staged.insert(key, new);
    Ok(())
}

/// Stages the end of the wait of the conversion reported at `seq`.
///
/// # Errors
/// sled read failure.
pub(crate) fn remove(staged: &mut Staged<'_>, seq: u64) -> Result<(), sled::Error> {
    let key = bucket_key(seq);
    let Some(row) = staged.get(&key)? else {
        return Ok(());
    };
    let Some(Span { all, .. }) = spans(&row).into_iter().find(|s| s.seq == seq) else {
        return Ok(());
    };
    if all.len() == row.len() {
        staged.remove(key);
    } else {
        staged.insert(key, [&row[..all.start], &row[all.end..]].concat());
    }
    Ok(())
}

/// The pending conversions reported at `from` or later, in log order: (the
/// report's sequence, the conversion id), lazily, a bucket at a time.
pub(crate) fn from(
    tree: &sled::Tree,
    from: u64,
) -> impl Iterator<Item = Result<(u64, String), sled::Error>> + '_ {
    tree.range(bucket_key(from)..)
        .take_while(|row| row.as_ref().map_or(true, |(k, _)| k.starts_with(b"p/")))
        .flat_map(move |row| match row {
            Ok((_, value)) => spans(&value)
                .into_iter()
                .filter(|s| s.seq >= from)
                .filter_map(|s| Some(Ok((s.seq, read_id(&value[s.id])?.0))))
                .collect::<Vec<_>>(),
            Err(error) => vec![Err(error)],
        })
}

/// The pending conversions of `click_id`: their ids, as [`push_id`] writes
/// them. Walks every bucket: for the click API, not for a hot path.
///
/// # Errors
/// sled read failure.
pub(crate) fn of_click(tree: &sled::Tree, click_id: &str) -> Result<Vec<Vec<u8>>, sled::Error> {
    let mut click = Vec::new();
    push_id(&mut click, click_id);
    let mut out = Vec::new();
    for row in tree.scan_prefix(b"p/") {
        let (_, value) = row?;
        for s in spans(&value) {
            if value[s.click] == click[..] {
                out.push(value[s.id].to_vec());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0190a0b4-7c6e-7a2b-9c1d-2e3f4a5b6c7d";
    const B: &str = "partner-conversion-7";

    fn tree() -> (tempfile::TempDir, common::FoldTree) {
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        let tree = common::FoldTree::open(&db, "c").unwrap();
        (dir, tree)
    }

    fn all(tree: &sled::Tree, start: u64) -> Vec<(u64, String)> {
        from(tree, start).collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn pending_conversions_are_listed_in_log_order_across_buckets() {
        let (_dir, tree) = tree();
        let mut staged = Staged::new(&tree);
        for seq in [3, 130, 5, 127, 128, 1_000] {
            add(&mut staged, seq, &format!("{B}-{seq}"), A).unwrap();
        }
        add(&mut staged, 7, A, "").unwrap();
        staged.commit(1_000).unwrap();
        let seqs: Vec<u64> = all(&tree, 0).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [3, 5, 7, 127, 128, 130, 1_000]);
        assert_eq!(all(&tree, 0)[2], (7, A.to_owned()), "a UUID id round-trips");
        assert_eq!(
            all(&tree, 0)[5],
            (130, format!("{B}-130")),
            "any other id too"
        );
        let later: Vec<u64> = all(&tree, 6).iter().map(|(s, _)| *s).collect();
        assert_eq!(
            later,
            [7, 127, 128, 130, 1_000],
            "from the middle of a bucket"
        );
        assert!(all(&tree, 1_001).is_empty());
    }

    #[test]
    fn a_decided_conversion_leaves_and_an_empty_bucket_goes() {
        let (_dir, tree) = tree();
        let mut staged = Staged::new(&tree);
        add(&mut staged, 10, A, B).unwrap();
        add(&mut staged, 11, B, A).unwrap();
        add(&mut staged, 11, B, A).unwrap();
        add(&mut staged, 300, B, A).unwrap();
        staged.commit(300).unwrap();
        assert_eq!(all(&tree, 0).len(), 3, "a replayed report is listed once");

        let mut staged = Staged::new(&tree);
        remove(&mut staged, 10).unwrap();
        remove(&mut staged, 12).unwrap();
        remove(&mut staged, 999).unwrap();
        remove(&mut staged, 300).unwrap();
        staged.commit(301).unwrap();
        assert_eq!(all(&tree, 0), [(11, B.to_owned())]);
        assert!(
            tree.get(bucket_key(300)).unwrap().is_none(),
            "empty bucket removed"
        );

        let mut staged = Staged::new(&tree);
        remove(&mut staged, 11).unwrap();
        staged.commit(302).unwrap();
        assert!(all(&tree, 0).is_empty());
        assert!(tree.scan_prefix(b"p/").next().is_none());
    }

    #[test]
    fn a_clicks_pending_conversions_are_found_by_its_id() {
        let (_dir, tree) = tree();
        let mut staged = Staged::new(&tree);
        add(&mut staged, 1, "c1", A).unwrap();
        add(&mut staged, 2, "c2", B).unwrap();
        add(&mut staged, 200, "c3", A).unwrap();
        add(&mut staged, 201, "c4", "").unwrap();
        staged.commit(201).unwrap();
        let ids = |click: &str| -> Vec<String> {
            of_click(&tree, click)
                .unwrap()
                .iter()
                .map(|id| read_id(id).unwrap().0)
                .collect()
        };
        assert_eq!(ids(A), ["c1", "c3"]);
        assert_eq!(ids(B), ["c2"]);
        assert!(ids("0190a0b4-7c6e-7a2b-9c1d-000000000000").is_empty());
    }
}
