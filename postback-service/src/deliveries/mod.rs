//! Affiliate postbacks: every attributed conversion whose decision names a postback
//! URL is told to the affiliate's server, retried until it lands, never twice.
//!
//! - [`policy`]: which answers count, when to retry (pure);
//! - [`macros`]: filling the URL template (pure);
//! - [`target`]: the server-side request forgery guard;
//! - [`attempt`]: one HTTP request;
//! - [`outcome`]: the POSTBACKS fold (delivered, failed, retry requested);
//! - [`schedule`]: the local retry schedule in sled;
//! - [`ready`]: due deliveries queued per host, in memory;
//! - [`dispatcher`]: the task that walks the queue and runs attempts.

pub mod attempt;
pub mod dispatcher;
pub mod macros;
pub mod outcome;
pub mod policy;
pub mod ready;
pub mod schedule;
pub mod target;

pub use dispatcher::{run_dispatcher, DispatchConfig, Dispatcher};
pub use outcome::{Outcome, OutcomeState, Outcomes, PostbacksFold};
pub use schedule::{Schedule, ScheduleStore};

/// The id of the delivery of one conversion to one affiliate: stable, so the
/// receiver can deduplicate on `{delivery_id}`.
pub fn delivery_id(conversion_id: &str, affiliate_id: &str) -> String {
    const NS: uuid::Uuid = uuid::Uuid::from_u128(0x2b7e_1516_28ae_d2a6_abf7_1588_09cf_4f3c);
    uuid::Uuid::new_v5(
        &NS,
        format!("{conversion_id}\u{1f}{affiliate_id}").as_bytes(),
    )
    .to_string()
}

/// Statuses in the order a conversion can be told them: a later one's
/// delivery waits for an earlier one's.
pub static STATUS_ORDER: [catalog::ConversionStatus; 3] = [
    catalog::ConversionStatus::Pending,
    catalog::ConversionStatus::Approved,
    catalog::ConversionStatus::Rejected,
];

/// The statuses told before `status`, and those told after it
/// ([`STATUS_ORDER`]).
pub fn before_and_after(
    status: catalog::ConversionStatus,
) -> (
    &'static [catalog::ConversionStatus],
    &'static [catalog::ConversionStatus],
) {
    let at = STATUS_ORDER.iter().position(|s| *s == status).unwrap_or(0);
    (&STATUS_ORDER[..at], &STATUS_ORDER[at + 1..])
}

/// The status `delivery_id` tells of `conversion_id` to `affiliate_id`
/// ([`status_delivery_id`] backwards); `None` for an id of no status.
pub fn status_of_delivery(
    delivery_id: &str,
    conversion_id: &str,
    affiliate_id: &str,
) -> Option<catalog::ConversionStatus> {
    STATUS_ORDER
        .iter()
        .copied()
        .find(|&status| status_delivery_id(conversion_id, affiliate_id, status) == delivery_id)
}

/// The id of the delivery of one status event of a conversion to one affiliate:
/// the approval keeps [`delivery_id`]; other statuses get their own stable id.
pub fn status_delivery_id(
    conversion_id: &str,
    affiliate_id: &str,
    status: catalog::ConversionStatus,
) -> String {
    match status {
        catalog::ConversionStatus::Approved => delivery_id(conversion_id, affiliate_id),
        other => delivery_id(conversion_id, &format!("{affiliate_id}/{}", other.name())),
    }
}
