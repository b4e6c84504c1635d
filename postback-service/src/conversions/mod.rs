//! Conversions: the view of each, the fold of the CONVERSIONS stream, the pure
//! decision, the decider task that publishes decisions, and report counters.

pub mod batch;
mod decide;
mod decider;
mod fold;
mod in_flight;
mod pending;
mod report;
mod view;

pub use decide::{decide, decide_status, is_duplicate, DecideInput, StatusVerdict, Verdict};
pub use decider::{run_decider, DeciderConfig, DeciderInputs};
pub use fold::{
    queue_end, queue_position, Conversions, ConversionsFold, Decision, QueueEntry, StatusUpdate,
};
pub use report::ReportRow;
pub use view::{ConversionState, ConversionView, Reason, StatusChange};
