//! The one error type of the benchmark tool, with the context of what failed.

use std::time::Duration;

use thiserror::Error;

/// Any error source, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a benchmark command failed.
#[derive(Debug, Error)]
pub enum BenchError {
    /// The command line or an input file does not make sense.
    #[error("{0}")]
    Usage(String),
    /// Local files and processes.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Talking to NATS or JetStream.
    #[error("NATS: {what}")]
    Nats {
        what: String,
        #[source]
        source: BoxError,
    },
    /// Talking HTTP to a service under test.
    #[error("HTTP: {what}")]
    Http {
        what: String,
        #[source]
        source: BoxError,
    },
    /// A service did not get where it should within the time allowed.
    #[error("{what}: not done after {after:?}")]
    Timeout { what: String, after: Duration },
    /// A service stopped making progress.
    #[error("{0}")]
    Stalled(String),
    /// A smoke run found something broken (targets aside: smoke numbers
    /// mean nothing, but every scenario must run and be answered).
    #[error("smoke run: {0}")]
    Smoke(String),
    /// Reading or writing results.
    #[error("JSON")]
    Json(#[from] serde_json::Error),
    /// The sled ceiling's storage.
    #[error("sled")]
    Sled(#[from] sled::Error),
}

/// Adds what was being done to an error, turning it into a [`BenchError`].
pub trait Context<T> {
    /// A NATS failure while doing `what`.
    ///
    /// # Errors
    /// The original error, wrapped.
    fn nats(self, what: impl Into<String>) -> Result<T, BenchError>;
    /// An HTTP failure while doing `what`.
    ///
    /// # Errors
    /// The original error, wrapped.
    fn http(self, what: impl Into<String>) -> Result<T, BenchError>;
}

impl<T, E: Into<BoxError>> Context<T> for Result<T, E> {
    fn nats(self, what: impl Into<String>) -> Result<T, BenchError> {
        self.map_err(|e| BenchError::Nats {
            what: what.into(),
            source: e.into(),
        })
    }

    fn http(self, what: impl Into<String>) -> Result<T, BenchError> {
        self.map_err(|e| BenchError::Http {
            what: what.into(),
            source: e.into(),
        })
    }
}

/// Wraps an I/O error with what was being done.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}
