//! A lease on a role that must run once per log, however many processes of a
//! service run: postback-service's decider and dispatcher. Two of them would
//! each send every affiliate postback, which is what an overlap of old and new
//! instances in a rolling deploy, or a second replica started by mistake, did.
//!
//! The lease is one key in a JetStream key-value bucket ([`BUCKET`]) whose
//! entries expire `ttl` after they were written (the bucket's max age). The
//! holder rewrites its entry every `ttl / 4`, each time expecting the revision
//! it wrote last, so a write of anyone else's makes its next renewal fail. A
//! holder that cannot renew for `ttl / 2` (NATS unreachable, say) stops its
//! work then, half a `ttl` before the entry can expire and another process
//! can take it. A holder that stops releases the lease (deletes its entry), so
//! a standby takes over at once; one that crashed is replaced once its entry
//! expires, by a standby or by its own restart alike (an entry under one's own
//! name may be a twin's, a copied data dir's, still leading).
//!
//! While it holds the lease, a process runs its led work ([`run_led`]); while
//! it does not, it waits as a standby and serves everything else.
//!
//! A process frozen for longer than the lease (a stopped VM, a long pause of
//! the whole process) wakes with every timer overdue and runs them in any
//! order: its led work could act before the renewal that would tell it the
//! lease is gone. So the led work also gets a [`Tenure`], which says by this
//! process's own clock whether it still holds the lease, and checks it right
//! before anything a successor could also do (an affiliate postback, a round
//! of decisions).

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use async_nats::jetstream::{self, kv, Context};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The key-value bucket of the leases.
pub const BUCKET: &str = "leases";

/// What the lease is, and who asks for it.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The role's key in [`BUCKET`], e.g. `postback-service`.
    pub key: String,
    /// This process's name for itself: stable across its restarts (one per
    /// data dir), distinct from every other process's.
    pub holder: String,
    /// How long an entry lives without renewal, at least: the bucket is
    /// created with it, and an existing bucket's shorter max age is raised to
    /// it (a longer one stays).
    pub ttl: Duration,
}

/// What this process does about the lease (`/readyz` shows it in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Has not asked for the lease yet.
    Starting,
    /// Waits for the lease while another process holds it (or NATS is away).
    Standby,
    /// Holds the lease and runs the led work.
    Leader,
}

/// This process's part, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseStatus {
    /// The role's key.
    pub key: String,
    pub role: Role,
    /// This process's holder name.
    pub holder: String,
    /// Who held the lease when this process last looked (empty: nobody).
    pub leader: String,
}

/// Whether this process still holds the lease, by its own clocks: until half
/// the lease's ttl after it last asked NATS to write its entry (a write the
/// server made later expires later). The lease task stops the led work at the
/// same moment, unless the process was frozen past it; then this says so
/// before any overdue timer acts. Cheap to clone and to ask.
///
/// Both clocks must agree: the monotonic one (immune to the wall clock being
/// set back) and the wall clock, which keeps counting while the host is
/// suspended, where the monotonic clock stops (a suspended VM or laptop wakes
/// believing no time passed). The wall deadline is taken when the tenure is
/// set, a renewal's round trip after the write was asked, so at most a
/// quarter ttl later: still inside the lease.
#[derive(Debug, Clone, Default)]
pub struct Tenure(Arc<Mutex<Option<Deadline>>>);

/// The end of a tenure on both clocks.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    monotonic: tokio::time::Instant,
    wall: std::time::SystemTime,
}

impl Deadline {
    fn at(monotonic: tokio::time::Instant) -> Self {
        let left = monotonic.saturating_duration_since(tokio::time::Instant::now());
        Self {
            monotonic,
            wall: std::time::SystemTime::now() + left,
        }
    }

    fn before(self, monotonic: tokio::time::Instant, wall: std::time::SystemTime) -> bool {
        monotonic < self.monotonic && wall < self.wall
    }
}

impl Tenure {
    /// True until the tenure's end.
    pub fn held(&self) -> bool {
        let until = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        until.is_some_and(|d| d.before(tokio::time::Instant::now(), std::time::SystemTime::now()))
    }

    /// A tenure held until `until` ([`run_led`] makes one per term; a test
    /// of led work without a lease too).
    pub fn until(until: tokio::time::Instant) -> Self {
        Self(Arc::new(Mutex::new(Some(Deadline::at(until)))))
    }

    fn extend(&self, until: tokio::time::Instant) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Deadline::at(until));
    }

    fn end(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// A new status channel for `config`, `starting`.
pub fn status_channel(
    config: &LeaseConfig,
) -> (watch::Sender<LeaseStatus>, watch::Receiver<LeaseStatus>) {
    watch::channel(LeaseStatus {
        key: config.key.clone(),
        role: Role::Starting,
        holder: config.holder.clone(),
        leader: String::new(),
    })
}

/// Runs `led` whenever this process holds the lease, until `token` is
/// cancelled: acquires it (waiting as a standby while another process holds
/// it), starts `led` with a child token and the term's [`Tenure`], renews the
/// lease, and ends the tenure, cancels the child and waits for `led` to end
/// when the lease is lost or `token` is cancelled. On cancellation it then
/// releases the lease. Should `led` end by itself (a panic), the lease is
/// released too, and asked for again a ttl later: a holder with nothing led
/// would stop the led work everywhere.
pub async fn run_led<F, Fut>(
    js: Context,
    config: LeaseConfig,
    status: watch::Sender<LeaseStatus>,
    token: CancellationToken,
    mut led: F,
) where
    F: FnMut(CancellationToken, Tenure) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let Some((store, ttl, written)) = acquire(&js, &config, &status, &token).await else {
            return;
        };
        let tenure = Tenure::until(written.asked + ttl / 2);
        status.send_modify(|s| {
            s.role = Role::Leader;
            s.leader = config.holder.clone();
        });
        tracing::info!(
            key = config.key,
            holder = config.holder,
            "holding the lease: leading"
        );
        let child = token.child_token();
        let mut work = tokio::spawn(led(child.clone(), tenure.clone()));
        let term = (&store, &config, ttl, &tenure, &token);
        let held = hold(term, written.revision, &mut work).await;
        tenure.end();
        child.cancel();
        if !matches!(held, Held::WorkEnded(_)) {
            if let Err(error) = work.await {
                tracing::error!(%error, "the led work panicked");
            }
        }
        // Who leads now is known once `acquire` has looked; not this process.
        status.send_modify(|s| {
            s.role = Role::Standby;
            s.leader.clear();
        });
        match held {
            Held::Cancelled(revision) => {
                release(&store, &config, revision).await;
                return;
            }
            Held::WorkEnded(revision) => {
                // Holding the lease with nothing led would stop the work of
                // every instance: give it up, and ask again only after a ttl,
                // so a standby can take it first.
                release(&store, &config, revision).await;
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(ttl) => {}
                }
            }
            Held::Lost(why) => {
                tracing::warn!(
                    key = config.key,
                    why,
                    "lease lost: led work stopped; standing by"
                );
            }
        }
    }
}

/// Deletes our own entry, at `revision`: a lease taken over meanwhile stays.
async fn release(store: &kv::Store, config: &LeaseConfig, revision: u64) {
    if let Err(error) = store
        .delete_expect_revision(&config.key, Some(revision))
        .await
    {
        tracing::warn!(%error, key = config.key, "lease not released; it expires");
    }
}

/// How holding the lease ended.
enum Held {
    /// The token was cancelled; the revision last written, to release.
    Cancelled(u64),
    /// The led work ended (returned or panicked) with the token not
    /// cancelled; the revision last written, to release.
    WorkEnded(u64),
    /// Another process wrote the entry, or renewal failed for half the ttl.
    Lost(&'static str),
}

/// The bucket, created with `ttl` if it does not exist yet ([`create_bucket`]),
/// and how long its entries live.
///
/// An existing bucket whose entries live shorter than `ttl` is raised to it:
/// the service checks its configured lease against the longest affiliate
/// postback, and a bucket created by an older configuration must not undo
/// that. A longer one stays: a holder that assumed a shorter lease only
/// renews more often than it needs to, while a lease shortened under a
/// holder could expire before that holder stops.
async fn bucket(js: &Context, ttl: Duration) -> Result<(kv::Store, Duration), async_nats::Error> {
    let store = match js.get_key_value(BUCKET).await {
        Ok(store) => store,
        Err(_) => create_bucket(js, ttl).await?,
    };
    // No max age at all (a bucket made by hand without a TTL) is the shortest
    // there is: its entries never expire, so a crashed holder's would stay.
    let current = store.status().await?.max_age();
    if current.is_zero() || current < ttl {
        raise_ttl(js, ttl).await?;
        Ok((store, ttl))
    } else {
        Ok((store, current))
    }
}

/// Creates the bucket with entries that live `ttl`; or opens it, when another
/// process created it meanwhile. Created as the stream a key-value bucket is
/// (what async-nats's `create_key_value` would make), because that call first
/// asks for the account's info, whose answer from nats-server 2.9 async-nats
/// 0.51 cannot read.
///
/// # Errors
/// JetStream refused the stream, or the bucket cannot be opened.
pub async fn create_bucket(js: &Context, ttl: Duration) -> Result<kv::Store, async_nats::Error> {
    let created = js
        .create_stream(jetstream::stream::Config {
            name: format!("KV_{BUCKET}"),
            description: Some("Leases of roles that run once per log".to_owned()),
            subjects: vec![format!("$KV.{BUCKET}.>")],
            max_messages_per_subject: 1,
            max_age: ttl,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        })
        .await;
    match js.get_key_value(BUCKET).await {
        Ok(store) => Ok(store),
        Err(error) => Err(match created {
            Err(created) => created.into(),
            Ok(_) => error.into(),
        }),
    }
}

/// Raises the bucket's max age to `ttl`.
async fn raise_ttl(js: &Context, ttl: Duration) -> Result<(), async_nats::Error> {
    let mut stream = js.get_stream(format!("KV_{BUCKET}")).await?;
    let mut config = stream.info().await?.config.clone();
    tracing::info!(from = ?config.max_age, to = ?ttl, "raising the lease bucket's max age");
    config.max_age = ttl;
    js.update_stream(config).await?;
    Ok(())
}

/// A write of this process's entry.
#[derive(Debug, Clone, Copy)]
struct Written {
    revision: u64,
    /// When this process asked for it: the server wrote it later, so the
    /// entry expires a ttl after this at the earliest.
    asked: tokio::time::Instant,
}

/// Waits until this process holds the lease: (the bucket, its ttl, the
/// write). `None`: `token` was cancelled first.
async fn acquire(
    js: &Context,
    config: &LeaseConfig,
    status: &watch::Sender<LeaseStatus>,
    token: &CancellationToken,
) -> Option<(kv::Store, Duration, Written)> {
    let mut retry = config.ttl / 4;
    // While another holds it: its entry, watched, so a release is taken at
    // once rather than at the next ask (a quarter ttl later).
    let mut releases = None;
    loop {
        let asked = tokio::time::Instant::now();
        match try_acquire(js, config).await {
            Ok(Attempt::Acquired(store, ttl, revision)) => {
                return Some((*store, ttl, Written { revision, asked }))
            }
            Ok(Attempt::HeldBy(leader, ttl)) => {
                retry = (ttl / 4).max(Duration::from_millis(10));
                if status.borrow().leader != leader || status.borrow().role != Role::Standby {
                    tracing::info!(key = config.key, leader, "the lease is held: standing by");
                }
                status.send_modify(|s| {
                    s.role = Role::Standby;
                    s.leader = leader;
                });
                if releases.is_none() {
                    releases = watch_releases(js, config).await;
                    if releases.is_some() {
                        // The watch sees changes from now on: a release made
                        // since the entry was read is found by asking again.
                        continue;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, key = config.key, "lease: NATS did not answer; retrying");
                status.send_modify(|s| s.role = Role::Standby);
            }
        }
        tokio::select! {
            () = token.cancelled() => return None,
            () = tokio::time::sleep(retry) => {}
            () = released(&mut releases) => {}
        }
    }
}

/// A watch of the lease's entry, for [`released`]; `None` when NATS did not
/// answer (the standby then asks every quarter ttl only).
async fn watch_releases(js: &Context, config: &LeaseConfig) -> Option<kv::Watch> {
    let (store, _) = bucket(js, config.ttl).await.ok()?;
    store.watch(&config.key).await.ok()
}

/// Returns once the watched entry is deleted (its holder released it); never
/// without a watch. A watch that fails is dropped, and this returns so the
/// lease is asked for at once.
async fn released(watch: &mut Option<kv::Watch>) {
    use futures::StreamExt;
    let Some(entries) = watch else {
        return std::future::pending().await;
    };
    while let Some(entry) = entries.next().await {
        match entry {
            Ok(entry) if entry.operation == kv::Operation::Put => {}
            Ok(_) => return,
            Err(_) => break,
        }
    }
    *watch = None;
}

enum Attempt {
    Acquired(Box<kv::Store>, Duration, u64),
    /// Someone else holds it: their name, and the bucket's ttl.
    HeldBy(String, Duration),
}

async fn try_acquire(js: &Context, config: &LeaseConfig) -> Result<Attempt, async_nats::Error> {
    let (store, ttl) = bucket(js, config.ttl).await?;
    let holder = bytes::Bytes::from(config.holder.clone().into_bytes());
    match store.create(&config.key, holder.clone()).await {
        Ok(revision) => return Ok(Attempt::Acquired(Box::new(store), ttl, revision)),
        Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(error) => return Err(error.into()),
    }
    let Some(entry) = store.entry(&config.key).await? else {
        // Expired or released between the two calls: try again soon.
        return Ok(Attempt::HeldBy(String::new(), ttl));
    };
    let leader = String::from_utf8_lossy(&entry.value).into_owned();
    let live = entry.operation == kv::Operation::Put;
    // An entry under our own name is not taken back: it may be a twin's (a
    // data dir copied with its instance-id) still leading, its attempts in
    // flight up to a postback timeout past its tenure; a crashed process of
    // ours is replaced once its entry expires, like anyone's.
    Ok(Attempt::HeldBy(
        if live { leader } else { String::new() },
        ttl,
    ))
}

/// Renews the lease every `ttl / 4`, extending `tenure` with each renewal,
/// until it is lost (another process wrote it, or `tenure` ran out: half the
/// ttl without a renewal) or `token` is cancelled.
async fn hold(
    (store, config, ttl, tenure, token): (
        &kv::Store,
        &LeaseConfig,
        Duration,
        &Tenure,
        &CancellationToken,
    ),
    mut revision: u64,
    work: &mut tokio::task::JoinHandle<()>,
) -> Held {
    let every = (ttl / 4).max(Duration::from_millis(10));
    let holder = bytes::Bytes::from(config.holder.clone().into_bytes());
    loop {
        tokio::select! {
            () = token.cancelled() => return Held::Cancelled(revision),
            ended = &mut *work => {
                match ended {
                    Err(error) => tracing::error!(
                        %error, key = config.key, "the led work panicked; giving up the lease"
                    ),
                    Ok(()) => tracing::error!(
                        key = config.key, "the led work ended on its own; giving up the lease"
                    ),
                }
                return Held::WorkEnded(revision);
            }
            () = tokio::time::sleep(every) => {}
        }
        let asked = tokio::time::Instant::now();
        let update = store.update(&config.key, holder.clone(), revision);
        match tokio::time::timeout(every, update).await {
            Ok(Ok(next)) => {
                revision = next;
                tenure.extend(asked + ttl / 2);
            }
            Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                return Held::Lost("another process wrote the lease");
            }
            Ok(Err(error)) => tracing::warn!(%error, key = config.key, "lease not renewed"),
            Err(_) => tracing::warn!(key = config.key, "lease renewal timed out"),
        }
        if !tenure.held() {
            return Held::Lost("not renewed for half its ttl");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn a_tenure_is_held_until_its_end_and_not_once_ended() {
        let tenure = Tenure::until(Instant::now() + Duration::from_secs(60));
        let seen_elsewhere = tenure.clone();
        assert!(seen_elsewhere.held());
        tenure.end();
        assert!(!seen_elsewhere.held(), "ended for every clone");
        tenure.extend(Instant::now() + Duration::from_secs(60));
        assert!(seen_elsewhere.held(), "a renewal extends it again");
        let past = Instant::now()
            .checked_sub(Duration::from_millis(1))
            .unwrap();
        tenure.extend(past);
        assert!(!seen_elsewhere.held(), "past its end, by the clock alone");
        assert!(!Tenure::default().held(), "none without a lease");
    }

    #[test]
    fn a_tenure_ends_by_either_clock() {
        let deadline = Deadline::at(Instant::now() + Duration::from_secs(60));
        let (mono, wall) = (Instant::now(), std::time::SystemTime::now());
        assert!(deadline.before(mono, wall));
        let hour = Duration::from_secs(3600);
        assert!(
            !deadline.before(mono, wall + hour),
            "suspended an hour: the monotonic clock stood still, the wall clock did not"
        );
        assert!(
            !deadline.before(mono + hour, wall - hour),
            "the wall clock set back: the monotonic clock still ends it"
        );
    }
}
