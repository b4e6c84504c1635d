//! Plumbing both services share, and no domain logic: NATS connection, streams and
//! publishing ([`nats`]), the checkpointed fold loop over sled ([`fold`], [`store`]),
//! money and currency parsing ([`money`]), URL macro templates ([`template`]),
//! health endpoints ([`health`]), telemetry and shutdown.

pub mod api_error;
pub mod auth;
pub mod client_ip;
pub mod config;
pub mod fold;
pub mod health;
pub mod http;
pub mod lease;
pub mod money;
pub mod nats;
pub mod outbox;
pub mod params;
pub mod rebuild;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod time;
pub mod worker;

pub use api_error::ApiError;
pub use fold::{FoldStatus, LogEntry};
pub use store::{FoldTree, Staged};
