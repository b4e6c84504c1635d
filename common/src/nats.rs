//! NATS JetStream: connecting, creating the streams, publishing events.
//!
//! Every service calls [`ensure_streams`] at start with the same configuration, so
//! start order does not matter. Publishing always sets `Nats-Msg-Id`, so a retry
//! inside the duplicate window is stored once.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, stream, Context};
use bytes::Bytes;
use thiserror::Error;
use tokio::sync::watch;

/// How long the server remembers a `Nats-Msg-Id` to drop a re-publish.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Failure to reach NATS at start.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("connecting to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("creating stream {stream}")]
    Stream {
        stream: &'static str,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
}

impl ConnectError {
    /// No answer in time, or none that could be read (a loaded server, a
    /// connection lost meanwhile): it may pass on a later try. JetStream off
    /// or a refused stream is not transient.
    pub fn is_transient(&self) -> bool {
        use async_nats::jetstream::context::CreateStreamErrorKind as Kind;
        match self {
            Self::Connect { .. } => false,
            Self::Stream { source, .. } => {
                matches!(
                    source.kind(),
                    Kind::TimedOut | Kind::Response | Kind::ResponseParse
                )
            }
        }
    }
}

/// A publish that did not get its JetStream ack.
#[derive(Debug, Error)]
pub enum PublishError {
    #[error("publishing to {subject}")]
    Send {
        subject: String,
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    #[error("no JetStream ack for {subject} within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
}

impl PublishError {
    /// Whether JetStream will never take this message as it is
    /// ([`refused_for_good`]).
    pub fn refused_for_good(&self) -> bool {
        matches!(self, Self::Send { source, .. } if refused_for_good(source))
    }
}

/// Whether JetStream will never take this message as it is: larger than the
/// server's max payload or the stream's max message size. Anything else (no
/// stream yet, a timeout, a full disk) may pass on a later try.
pub fn refused_for_good(error: &jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::{context::PublishErrorKind, ErrorCode};
    match error.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => std::error::Error::source(error)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(|e| {
                [
                    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM,
                    ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM,
                ]
                .contains(&e.error_code())
            }),
        _ => false,
    }
}

/// How long a service waits for its first connection to NATS at start.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A NATS connection that reconnects forever by itself.
#[derive(Clone)]
pub struct Connection {
    pub client: async_nats::Client,
    pub js: Context,
    /// Counts (re)connections. A fold restarts its consumer when it moves: the
    /// server may have restarted and forgotten its ephemeral consumers, which the
    /// client would otherwise notice only after two missed 15 s heartbeats.
    pub connections: watch::Receiver<u64>,
}

/// Connects and returns the client, its JetStream context and a reconnect counter.
///
/// # Errors
/// The URL is invalid or the first connection fails within `connect_timeout`.
pub async fn connect(
    url: &str,
    name: &str,
    connect_timeout: Duration,
) -> Result<Connection, ConnectError> {
    open(url, name, connect_timeout, false).await
}

/// Like [`connect`], but a NATS that cannot be reached is not an error: the
/// client connects in the background, retrying forever, and
/// [`Connection::connections`] moves from 0 once it has. A service started
/// during a NATS outage serves from its projection and its outbox meanwhile.
///
/// # Errors
/// The URL is invalid.
pub async fn connect_lazily(url: &str, name: &str) -> Result<Connection, ConnectError> {
    open(url, name, CONNECT_TIMEOUT, true).await
}

async fn open(
    url: &str,
    name: &str,
    connect_timeout: Duration,
    lazily: bool,
) -> Result<Connection, ConnectError> {
    let (tx, connections) = watch::channel(0u64);
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(connect_timeout)
        .max_reconnects(None)
        .event_callback(move |event| {
            if matches!(event, async_nats::Event::Connected) {
                tx.send_modify(|n| *n += 1);
            }
            async {}
        });
    if lazily {
        options = options.retry_on_initial_connect();
    }
    let client = options
        .connect(url)
        .await
        .map_err(|source| ConnectError::Connect {
            url: url.to_owned(),
            source,
        })?;
    let js = jetstream::new(client.clone());
    Ok(Connection {
        client,
        js,
        connections,
    })
}

/// The streams of the log, as both services create them.
pub fn stream_configs() -> Vec<stream::Config> {
    let stream = |name: &str, subjects: &str, description: &str| stream::Config {
        name: name.to_owned(),
        subjects: vec![subjects.to_owned()],
        description: Some(description.to_owned()),
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        // The log is the record: nothing expires. Operators who want a bound set
        // max_age on CLICKS above their longest attribution window.
        max_age: Duration::ZERO,
        ..Default::default()
    };
    vec![
        stream(proto::stream::CATALOG, "catalog.>", "Offers and affiliates"),
        stream(proto::stream::CLICKS, "clicks.>", "Recorded clicks"),
        stream(
            proto::stream::CONVERSIONS,
            "conversions.>",
            "Reported and decided conversions",
        ),
        stream(
            proto::stream::POSTBACKS,
            "postbacks.>",
            "Affiliate postback deliveries",
        ),
    ]
}

/// Creates every stream that does not exist yet; existing ones are left as they are
/// (an operator may have tuned them, e.g. replicas or max age).
///
/// # Errors
/// JetStream is off or refuses a stream.
pub async fn ensure_streams(js: &Context) -> Result<(), ConnectError> {
    for config in stream_configs() {
        let name = stream_name(&config.name);
        if let Err(source) = js.get_or_create_stream(config).await {
            // Another service created it between this one's look and its
            // create, as services starting together on a new NATS do:
            // nats-server 2.9 may refuse the second create ("subjects overlap
            // with an existing stream") rather than take the identical stream
            // as created. The stream is there: nothing failed.
            if js.get_stream(name).await.is_err() {
                return Err(ConnectError::Stream {
                    stream: name,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Where `stream` ends now: its last sequence, from a stream-info request
/// (`get_stream` asks the server); `None` when NATS did not answer.
pub async fn last_sequence(js: &Context, stream: &str) -> Option<u64> {
    let stream = js.get_stream(stream).await.ok()?;
    Some(stream.cached_info().state.last_sequence)
}

fn stream_name(name: &str) -> &'static str {
    [
        proto::stream::CATALOG,
        proto::stream::CLICKS,
        proto::stream::CONVERSIONS,
        proto::stream::POSTBACKS,
    ]
    .into_iter()
    .find(|s| *s == name)
    .unwrap_or("?")
}

/// Sends one event with `Nats-Msg-Id = msg_id` and returns the ack future without
/// waiting, so callers can pipeline many publishes and await their acks together.
///
/// # Errors
/// The client could not send (disconnected with a full buffer, payload too big).
pub async fn send(
    js: &Context,
    subject: String,
    msg_id: &str,
    payload: Bytes,
) -> Result<PublishAckFuture, PublishError> {
    js.send_publish(
        subject.clone(),
        jetstream::message::PublishMessage::build()
            .message_id(header_safe(msg_id).as_ref())
            .payload(payload),
    )
    .await
    .map_err(|source| PublishError::Send { subject, source })
}

/// `msg_id` as a header value can carry it. async-nats panics on a header value
/// holding a CR or LF; every id we build is checked where it comes in, so this
/// is a second line: such an id is replaced by a UUID v5 of it, still one per
/// id (a retry of it is still dropped), and nothing panics.
fn header_safe(msg_id: &str) -> std::borrow::Cow<'_, str> {
    if msg_id.contains(['\r', '\n']) {
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, msg_id.as_bytes());
        std::borrow::Cow::Owned(format!("msg-id-v5-{id}"))
    } else {
        std::borrow::Cow::Borrowed(msg_id)
    }
}

/// Publishes one event and waits for its JetStream ack; returns the stream sequence.
///
/// # Errors
/// No ack within `timeout`, or the server refused the message. The message may
/// still have been stored: retrying with the same `msg_id` is safe.
pub async fn publish(
    js: &Context,
    subject: String,
    msg_id: &str,
    payload: Bytes,
    timeout: Duration,
) -> Result<u64, PublishError> {
    let work = async {
        let ack = send(js, subject.clone(), msg_id, payload).await?;
        ack.await.map_err(|source| PublishError::Send {
            subject: subject.clone(),
            source,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(ack)) => Ok(ack.sequence),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(PublishError::Timeout { subject, timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_msg_id_with_a_line_break_becomes_a_header_async_nats_accepts() {
        assert_eq!(header_safe("decision-abc"), "decision-abc");
        let (a, b) = (header_safe("decision-a\nb"), header_safe("decision-a\r\nb"));
        assert!(
            a.starts_with("msg-id-v5-") && !a.contains(['\r', '\n']),
            "{a}"
        );
        assert_ne!(a, b, "still one header per id");
        assert_eq!(a, header_safe("decision-a\nb"), "and the same on a retry");
        // async-nats asserts on CR and LF in a header value.
        let raw = std::panic::catch_unwind(|| {
            jetstream::message::PublishMessage::build().message_id("decision-a\nb")
        });
        assert!(raw.is_err(), "async-nats took a line break in a header");
        let _ = jetstream::message::PublishMessage::build().message_id(a.as_ref());
    }
}
