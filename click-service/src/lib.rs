//! click-service: records clicks and redirects users to the advertiser; also the
//! admin API of the catalog (offers and affiliates).
//!
//! Shape: [`config::Config`] → [`startup::Application::build`] →
//! [`startup::Application::run_until_stopped`]. Routes live in [`routes`], one per
//! file; the click's own logic (event and macros) in [`click`], input checks of the
//! admin API in [`catalog_input`].

pub mod caps;
pub mod catalog_input;
pub mod click;
pub mod config;
pub mod group_commit;
pub mod routes;
pub mod startup;

pub use config::Config;
pub use startup::Application;
