//! The HTTP/1.1 client: one raw hyper connection per worker over a tokio
//! `TcpStream`, kept alive across requests (no pool, no redirects followed, no
//! decompression), so the client costs as little CPU as possible.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::{BenchError, BoxError, Context};

/// A browser-like user agent, so recorded clicks have realistic sizes.
pub const USER_AGENT: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0 loadgen/0.1";

/// The requests we send carry no body.
pub type Req = Request<Empty<Bytes>>;

/// Where requests go: the socket address and the `Host` header.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: HeaderValue,
}

impl Target {
    /// A target on `addr` (an IP and port, e.g. `127.0.0.1:8080`).
    ///
    /// # Errors
    /// `addr` is not an IP:port.
    pub fn new(addr: &str) -> Result<Self, BenchError> {
        let parsed: SocketAddr = addr
            .parse()
            .map_err(|_| BenchError::Usage(format!("{addr:?} is not an IP:port")))?;
        let host = HeaderValue::from_str(addr)
            .map_err(|_| BenchError::Usage(format!("{addr:?} is not a valid Host")))?;
        Ok(Self { addr: parsed, host })
    }

    /// The target and the path-and-query of an `http://IP:port/path?query` URL.
    ///
    /// # Errors
    /// Not such a URL.
    pub fn from_url(url: &str) -> Result<(Self, String), BenchError> {
        let uri: Uri = url
            .parse()
            .map_err(|_| BenchError::Usage(format!("{url:?} is not a URL")))?;
        if uri.scheme_str() != Some("http") {
            return Err(BenchError::Usage(format!(
                "{url:?}: only http:// is supported"
            )));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| BenchError::Usage(format!("{url:?} has no host")))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok((Self::new(authority.as_str())?, path))
    }

    /// A GET of `path_and_query`, with an optional bearer token.
    ///
    /// # Errors
    /// The path is not a valid URI path.
    pub fn get(&self, path_and_query: &str, bearer: Option<&HeaderValue>) -> Result<Req, BoxError> {
        let mut builder = Request::get(path_and_query)
            .header(header::HOST, self.host.clone())
            .header(header::USER_AGENT, USER_AGENT);
        if let Some(token) = bearer {
            builder = builder.header(header::AUTHORIZATION, token.clone());
        }
        Ok(builder.body(Empty::new())?)
    }
}

/// `Bearer <token>` as a header value.
///
/// # Errors
/// The token has characters a header cannot carry.
pub fn bearer(token: &str) -> Result<HeaderValue, BenchError> {
    HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| BenchError::Usage("the bearer token is not a valid header value".into()))
}

/// One kept-alive HTTP/1.1 connection.
pub struct Conn {
    sender: SendRequest<Empty<Bytes>>,
}

impl Conn {
    /// Connects (TCP_NODELAY) and does the HTTP/1 handshake.
    ///
    /// # Errors
    /// The connection was refused or the handshake failed.
    pub async fn connect(addr: SocketAddr) -> Result<Self, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes; errors surface
            // on the next request.
            let _ = connection.await;
        });
        Ok(Self { sender })
    }

    /// Sends a request and reads the whole answer; returns its status and body.
    ///
    /// # Errors
    /// The connection failed; it should then be dropped.
    pub async fn send(&mut self, req: Req) -> Result<(StatusCode, Bytes), BoxError> {
        self.sender.ready().await?;
        let response = self.sender.send_request(req).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// How long a set-up or polling request may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One GET on a fresh connection, for set-up and polling (not for load).
///
/// # Errors
/// No connection, or no answer within [`FETCH_TIMEOUT`].
pub async fn fetch(
    target: &Target,
    path: &str,
    bearer: Option<&HeaderValue>,
) -> Result<(StatusCode, Bytes), BenchError> {
    let what = || format!("GET http://{}{path}", target.addr);
    let work = async {
        let mut conn = Conn::connect(target.addr).await.http(what())?;
        let req = target.get(path, bearer).http(what())?;
        conn.send(req).await.http(what())
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| BenchError::Timeout {
            what: what(),
            after: FETCH_TIMEOUT,
        })?
}

/// A GET answered 200 with a JSON body, decoded.
///
/// # Errors
/// No answer, another status, or not the JSON expected.
pub async fn fetch_json<T: serde::de::DeserializeOwned>(
    target: &Target,
    path: &str,
    bearer: Option<&HeaderValue>,
) -> Result<(StatusCode, T), BenchError> {
    let (status, body) = fetch(target, path, bearer).await?;
    let value = serde_json::from_slice(&body).map_err(|e| BenchError::Http {
        what: format!(
            "GET {path} answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
        source: e.into(),
    })?;
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_target_and_path() {
        let (t, p) = Target::from_url("http://127.0.0.1:8080/c/o1?aff=a&sub1=x").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(p, "/c/o1?aff=a&sub1=x");
        assert!(Target::from_url("https://127.0.0.1:1/").is_err());
        assert!(Target::from_url("http://localhost:1/").is_err(), "IP only");
    }
}
