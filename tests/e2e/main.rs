//! End-to-end tests: one binary, each test with its own nats-server, ports and
//! temp dirs, both services in process, real HTTP over loopback.

// Test support is a private module tree; `pub` there is for readability.
#![allow(unreachable_pub)]

mod admin;
mod bad_input;
mod click_flow;
mod compose;
mod conversions;
mod deliveries;
mod faults;
mod leader;
mod outage;
mod rebuild;
mod retention;
mod rules;
mod support;
