//! The operator's rebuild: fold the log into a fresh projection beside the live
//! one (the service must be stopped), showing progress, then swap it in; and a
//! checksum of projection state, so two rebuilds (or a rebuild and a running
//! projection) can be compared.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::fold::{self, Fold, FoldSpec, Source};

/// One fold of a service: its Tree, its stream, the fold itself.
pub struct FoldJob {
    pub tree: &'static str,
    pub spec: FoldSpec,
    pub fold: Box<dyn Fold>,
    /// `None`: the checksum always covers this Tree. Otherwise it covers it
    /// only when this says so of the projection: click-service folds its
    /// click-caps Tree only while the catalog has a capped offer
    /// ([`FoldSpec::gate`]), and a rebuild folds it always.
    pub checksummed: Option<Checksummed>,
}

/// Whether a gated Tree counts in its projection's checksum ([`FoldJob::checksummed`]).
pub type Checksummed = fn(&sled::Db) -> Result<bool, sled::Error>;

fn checksum_parts(jobs: &[FoldJob]) -> Vec<(&'static str, Option<Checksummed>)> {
    jobs.iter().map(|j| (j.tree, j.checksummed)).collect()
}

impl Fold for Box<dyn Fold> {
    fn apply(
        &mut self,
        staged: &mut crate::Staged<'_>,
        entry: &crate::LogEntry<'_>,
    ) -> Result<(), sled::Error> {
        (**self).apply(staged, entry)
    }

    fn format(&self) -> u32 {
        (**self).format()
    }
}

/// A rebuild that did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("the projection is in use: stop the service first")]
    InUse(#[source] sled::Error),
    #[error("projection storage")]
    Store(#[from] sled::Error),
    #[error(transparent)]
    Nats(#[from] crate::nats::ConnectError),
    #[error("reading the log")]
    Log(#[from] async_nats::jetstream::context::GetStreamError),
    #[error("reading the log")]
    Info(#[from] async_nats::jetstream::stream::InfoError),
    #[error("moving directories")]
    Io(#[from] std::io::Error),
}

/// SHA-256 over every row (tree name, key, value) of the Trees of `jobs` that
/// it covers ([`FoldJob::checksummed`]), in order: equal projections have
/// equal checksums. A group commit a crash cut short is finished first
/// ([`crate::store::recover`]), as the service would on start, so what
/// decides the coverage reads finished Trees too.
///
/// # Errors
/// sled read or write failure.
pub fn checksum(
    db: &sled::Db,
    jobs: &[(&str, Option<Checksummed>)],
) -> Result<String, sled::Error> {
    for (name, _) in jobs {
        crate::store::recover(&crate::FoldTree::open(db, name)?)?;
    }
    let mut names = Vec::with_capacity(jobs.len());
    for (name, counts) in jobs {
        if counts.map_or(Ok(true), |counts| counts(db))? {
            names.push(*name);
        }
    }
    names.sort_unstable();
    let mut hash = Sha256::new();
    for name in names {
        let tree = db.open_tree(name)?;
        hash.update((name.len() as u64).to_be_bytes());
        hash.update(name.as_bytes());
        for row in tree.iter() {
            let (k, v) = row?;
            // The checkpoint's sequence only: the log time beside it is the
            // log's, and one written before it was recorded has none.
            let v = if k == crate::store::CHECKPOINT_KEY {
                &v[..v.len().min(8)]
            } else {
                &v[..]
            };
            hash.update((k.len() as u64).to_be_bytes());
            hash.update(&k);
            hash.update((v.len() as u64).to_be_bytes());
            hash.update(v);
        }
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs an operator command for a service whose folds are `jobs`, carrying
/// over the Trees in `keep` on a rebuild.
///
/// # Errors
/// See [`RebuildError`].
pub async fn operate(
    command: &crate::config::Command,
    nats_url: &str,
    service: &str,
    data_dir: &Path,
    jobs: Vec<FoldJob>,
    keep: &[&str],
) -> Result<(), RebuildError> {
    match command {
        crate::config::Command::Rebuild => {
            rebuild(
                nats_url,
                &format!("{service}-rebuild"),
                data_dir,
                jobs,
                keep,
            )
            .await?;
        }
        crate::config::Command::Checksum => {
            print_checksum(data_dir, &checksum_parts(&jobs))?;
        }
    }
    Ok(())
}

/// `InUse` for an open refused by the lock (the service runs); any other
/// failure is the files'.
fn in_use_or_broken(error: sled::Error) -> RebuildError {
    if crate::store::is_lock_error(&error) {
        RebuildError::InUse(error)
    } else {
        RebuildError::Store(error)
    }
}

/// Prints the checksum of the projection under `data_dir` (service stopped).
///
/// # Errors
/// The projection is in use or unreadable.
pub fn print_checksum(
    data_dir: &Path,
    jobs: &[(&str, Option<Checksummed>)],
) -> Result<String, RebuildError> {
    let db = sled::open(data_dir.join("projection")).map_err(in_use_or_broken)?;
    let sum = checksum(&db, jobs)?;
    println!("projection checksum {sum}");
    Ok(sum)
}

/// Folds the whole log into a fresh projection, printing progress (events
/// done, events/s, time left), carries over the Trees named in `keep` (local
/// state that is not a projection, such as a retry schedule), swaps it in
/// (the old one is kept as `projection.old-<ms>`), and returns its checksum.
///
/// # Errors
/// The live projection is in use, NATS cannot be reached, storage fails.
pub async fn rebuild(
    nats_url: &str,
    name: &str,
    data_dir: &Path,
    jobs: Vec<FoldJob>,
    keep: &[&str],
) -> Result<String, RebuildError> {
    let live_path = data_dir.join("projection");
    let live = if live_path.exists() {
        match sled::open(&live_path) {
            Ok(live) => Some(live),
            Err(error) if crate::store::is_lock_error(&error) => {
                return Err(RebuildError::InUse(error))
            }
            // Not the files' fault (no permission, a full disk, no file
            // descriptors): rebuilding would lose what it keeps apart.
            Err(error) if crate::store::is_environmental(&error) => {
                return Err(RebuildError::Store(error))
            }
            // Broken: what it kept apart from the log (`keep`) is lost; the
            // rest is the log's, folded afresh. It is kept aside as ever.
            Err(error) => {
                eprintln!("the projection does not open ({error}); rebuilding without what it kept apart from the log ({})", keep.join(", "));
                None
            }
        }
    } else {
        None
    };
    let stamp = crate::time::now_ms();
    let fresh_path: PathBuf = data_dir.join(format!("projection.rebuild-{stamp}"));
    let fresh = sled::open(&fresh_path)?;
    let conn = crate::nats::connect(nats_url, name, Duration::from_secs(10)).await?;
    crate::nats::ensure_streams(&conn.js).await?;

    // Per stream, the sequences it holds now: (before the first, the last).
    // A stream whose oldest events expired starts after 1, and one whose every
    // event expired holds none.
    let mut total = 0u64;
    let mut targets = Vec::new();
    for job in &jobs {
        let state = conn
            .js
            .get_stream(job.spec.stream)
            .await?
            .info()
            .await?
            .state
            .clone();
        let before = state
            .first_sequence
            .saturating_sub(1)
            .min(state.last_sequence);
        total += state.last_sequence - before;
        targets.push((before, state.last_sequence));
    }
    let parts = checksum_parts(&jobs);
    let token = CancellationToken::new();
    let mut statuses = Vec::new();
    let mut tasks = Vec::new();
    let durable = crate::store::GroupFlush::new((*fresh).clone());
    for job in jobs {
        let (tx, rx) = fold::status_channel(job.spec.stream);
        let source = Source {
            js: conn.js.clone(),
            connections: conn.connections.clone(),
            durable: durable.clone(),
            // Nothing else runs: the folds may have the whole machine.
            nice: 0,
        };
        let tree = crate::FoldTree::open(&fresh, job.tree)?;
        tasks.push(tokio::spawn(fold::run(
            source,
            tree,
            job.spec,
            job.fold,
            tx,
            token.clone(),
        )));
        statuses.push(rx);
    }
    let started = Instant::now();
    loop {
        let done: u64 = statuses
            .iter()
            .zip(&targets)
            .map(|(s, &(before, last))| s.borrow().applied_seq.clamp(before, last) - before)
            .sum();
        let all = statuses.iter().all(|s| s.borrow().caught_up);
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let left = if rate > 0.0 {
            (total.saturating_sub(done)) as f64 / rate
        } else {
            f64::INFINITY
        };
        eprint!("\rrebuilding: {done}/{total} events, {rate:.0} events/s, {left:.0} s left   ");
        let _ = std::io::stderr().flush();
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!();
    token.cancel();
    for t in tasks {
        let _ = t.await;
    }
    if let Some(live) = &live {
        for name in keep {
            let from = live.open_tree(name)?;
            let to = fresh.open_tree(name)?;
            for row in from.iter() {
                let (k, v) = row?;
                to.insert(k, v)?;
            }
        }
    }
    let sum = checksum(&fresh, &parts)?;
    fresh.flush()?;
    drop(fresh);
    drop(live);
    if live_path.exists() {
        std::fs::rename(&live_path, data_dir.join(format!("projection.old-{stamp}")))?;
    }
    std::fs::rename(&fresh_path, &live_path)?;
    let secs = started.elapsed().as_secs_f64();
    println!("rebuilt {total} events in {secs:.1} s; projection checksum {sum}");
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broken_projection_is_not_said_to_be_in_use_and_does_not_stop_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("projection");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("conf"), b"garbage that is not a sled config").unwrap();
        std::fs::write(path.join("db"), vec![0xFFu8; 4096]).unwrap();
        let err = print_checksum(dir.path(), &[]).unwrap_err();
        assert!(matches!(err, RebuildError::Store(_)), "{err}");
        // The rebuild goes on past it, to NATS (nothing listens there).
        let err = rebuild("nats://127.0.0.1:1", "t", dir.path(), Vec::new(), &["kept"])
            .await
            .unwrap_err();
        assert!(!matches!(err, RebuildError::InUse(_)), "{err}");

        // One a running service holds is in use.
        let held = tempfile::tempdir().unwrap();
        let _db = sled::open(held.path().join("projection")).unwrap();
        let err = print_checksum(held.path(), &[]).unwrap_err();
        assert!(matches!(err, RebuildError::InUse(_)), "{err}");
    }

    #[test]
    fn a_checkpoint_written_before_its_log_time_was_sums_as_one_with_it() {
        let sum = |checkpoint: &[u8]| {
            let db = sled::Config::new().temporary(true).open().unwrap();
            let tree = db.open_tree("t").unwrap();
            tree.insert(b"row", b"x").unwrap();
            tree.insert(crate::store::CHECKPOINT_KEY, checkpoint)
                .unwrap();
            checksum(&db, &[("t", None)]).unwrap()
        };
        let old = 7u64.to_be_bytes();
        let new = [&old[..], &1_000i64.to_be_bytes()].concat();
        assert_eq!(sum(&old), sum(&new));
        assert_ne!(sum(&old), sum(&8u64.to_be_bytes()), "the sequence counts");
    }
}
