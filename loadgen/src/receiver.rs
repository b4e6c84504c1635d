//! A fast stand-in for affiliates' servers: answers every request `200 ok` at
//! once, counts requests, and counts a `delivery_id` seen twice (which must never
//! happen).

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use axum::{extract::State, http::Uri, Router};
use tokio::net::TcpListener;

use crate::error::{io, BenchError};

#[derive(Default)]
struct Seen {
    requests: u64,
    duplicates: u64,
    delivery_ids: HashSet<String>,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    seen: Arc<Mutex<Seen>>,
    pub addr: SocketAddr,
}

/// What the receiver has seen.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub requests: u64,
    /// Requests whose `delivery_id` had been seen before.
    pub duplicates: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

async fn answer(State(seen): State<Arc<Mutex<Seen>>>, uri: Uri) -> &'static str {
    let id = uri.query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("delivery_id="))
            .map(str::to_owned)
    });
    let now = Instant::now();
    let mut s = seen.lock().unwrap_or_else(PoisonError::into_inner);
    s.requests += 1;
    s.first.get_or_insert(now);
    s.last = Some(now);
    if let Some(id) = id {
        if !s.delivery_ids.insert(id) {
            s.duplicates += 1;
        }
    }
    "ok"
}

impl Receiver {
    /// Listens on `listen` and serves until the process ends.
    ///
    /// # Errors
    /// The address is taken.
    pub async fn start(listen: SocketAddr) -> Result<Self, BenchError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(io(format!("binding the receiver on {listen}")))?;
        let addr = listener.local_addr().map_err(io("receiver address"))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let app = Router::new().fallback(answer).with_state(seen.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { seen, addr })
    }

    /// What it has seen so far.
    pub fn counts(&self) -> Counts {
        let s = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        Counts {
            requests: s.requests,
            duplicates: s.duplicates,
            first: s.first,
            last: s.last,
        }
    }
}
