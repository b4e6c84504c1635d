//! postback-service: takes advertisers' postbacks (and partners' NATS events),
//! matches each conversion to its click, decides once whether it counts, and
//! serves the read API.
//!
//! - [`postback`]: parsing the advertiser's parameters, the stable conversion id;
//! - [`clicks`]: the CLICKS fold;
//! - [`conversions`]: the CONVERSIONS fold, the pure [`conversions::decide()`], the
//!   decider task, and report counters;
//! - [`routes`]: HTTP, one file per route.

pub mod clicks;
pub mod config;
pub mod conversions;
pub mod deliveries;
pub mod leader;
pub mod postback;
pub mod routes;
pub mod security;
pub mod startup;

pub use config::{Config, ConfigError};
pub use startup::Application;
