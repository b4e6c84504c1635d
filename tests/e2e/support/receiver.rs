//! A scripted HTTP receiver on loopback, standing in for an affiliate's server.
//!
//! It runs on a thread and runtime of its own: a test's runtime has one thread,
//! which a blocking call in the test (stopping a process, restarting NATS)
//! holds, and a receiver on it would not answer meanwhile, so the service's
//! attempt would time out and be sent again.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{StatusCode, Uri},
    response::IntoResponse,
    Router,
};

/// What the receiver answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16, &'static str),
    /// Answer nothing for this long, then 200.
    Hang(Duration),
    /// Answer this status and the first bytes of a body at once, then stall
    /// the rest for this long.
    StallBody(u16, Duration),
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub uri: String,
    pub at: Instant,
    /// The `X-Delivery-Attempt` header: `<generation>.<attempt>`.
    pub attempt: String,
}

#[derive(Default)]
struct Script {
    next: VecDeque<Reply>,
    then: Option<Reply>,
    seen: Vec<Seen>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    /// Dropped (or sent) to stop the server.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn answer(
    State(script): State<Arc<Mutex<Script>>>,
    uri: Uri,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let attempt = headers
        .get("x-delivery-attempt")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let reply = {
        let mut s = script.lock().unwrap();
        s.seen.push(Seen {
            uri: uri.to_string(),
            at: Instant::now(),
            attempt,
        });
        s.next
            .pop_front()
            .or_else(|| s.then.clone())
            .unwrap_or(Reply::Status(200, "ok"))
    };
    match reply {
        Reply::Status(code, body) => (StatusCode::from_u16(code).unwrap(), body).into_response(),
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, "late").into_response()
        }
        Reply::StallBody(code, d) => {
            let chunks = futures::stream::unfold(0, move |n| async move {
                match n {
                    0 => Some((Ok::<_, std::io::Error>("recorded".as_bytes()), 1)),
                    1 => {
                        tokio::time::sleep(d).await;
                        Some((Ok(" late".as_bytes()), 2))
                    }
                    _ => None,
                }
            });
            (
                StatusCode::from_u16(code).unwrap(),
                axum::body::Body::from_stream(chunks),
            )
                .into_response()
        }
    }
}

impl Receiver {
    /// Answers `first` in order, then `then` forever.
    pub async fn start(first: Vec<Reply>, then: Reply) -> Self {
        let script = Arc::new(Mutex::new(Script {
            next: first.into(),
            then: Some(then),
            seen: Vec::new(),
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(answer).with_state(script.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    served = std::future::IntoFuture::into_future(axum::serve(listener, app)) => served.unwrap(),
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            script,
            stop: Some(stop),
        }
    }

    /// A postback URL template on this receiver.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// What it has seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.script.lock().unwrap().seen.clone()
    }

    /// Changes the answer from now on.
    pub fn answer_from_now(&self, reply: Reply) {
        let mut s = self.script.lock().unwrap();
        s.next.clear();
        s.then = Some(reply);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
