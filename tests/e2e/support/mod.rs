//! The harness: a real nats-server per test, services in process, typed helpers.

pub mod app;
pub mod nats;
pub mod process;
pub mod receiver;
pub mod wait;

pub use app::{System, OFFER_URL};
pub use nats::NatsServer;
pub use receiver::{Receiver, Reply};
pub use wait::eventually;
