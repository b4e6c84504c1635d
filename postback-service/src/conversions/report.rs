//! Report counters per offer and per affiliate, folded from decisions and
//! status updates.

use std::collections::BTreeMap;

use catalog::ConversionStatus;
use serde::{Deserialize, Serialize};

use super::view::Reason;

/// Money of one conversion: (currency, micros) for payout and revenue.
#[derive(Debug, Clone, Copy)]
pub struct Money<'a> {
    pub payout: (&'a str, i64),
    pub revenue: (&'a str, i64),
}

/// The decided-conversion figures of one group (an offer or an affiliate).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRow {
    /// Conversions ever attributed, whatever their status now.
    pub attributed: u64,
    /// Conversions we rejected.
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<Reason, u64>,
    /// Attributed conversions by their current status.
    #[serde(default)]
    pub by_status: BTreeMap<ConversionStatus, u64>,
    /// Micros per currency of approved conversions: amounts in different
    /// currencies are never added up. `i128`: an event's amount may be up to
    /// 10^18 micros ([`common::money::MAX_MICROS`]), so ten of them pass
    /// `i64::MAX`. postcard writes both as the same zigzag varint, so rows
    /// written with `i64` read back unchanged.
    pub payout: BTreeMap<String, i128>,
    pub revenue: BTreeMap<String, i128>,
}

impl ReportRow {
    /// The row after one attribution with status `status`.
    pub fn attributed(mut self, status: ConversionStatus, money: Money<'_>) -> Self {
        self.attributed += 1;
        *self.by_status.entry(status).or_default() += 1;
        if status == ConversionStatus::Approved {
            self.add(money, 1);
        }
        self
    }

    /// The row after an attributed conversion moved from `from` to `to`.
    pub fn moved(mut self, from: ConversionStatus, to: ConversionStatus, money: Money<'_>) -> Self {
        if let Some(n) = self.by_status.get_mut(&from) {
            *n = n.saturating_sub(1);
        }
        *self.by_status.entry(to).or_default() += 1;
        if from == ConversionStatus::Approved {
            self.add(money, -1);
        }
        if to == ConversionStatus::Approved {
            self.add(money, 1);
        }
        self
    }

    /// The row after one rejection.
    pub fn rejected(mut self, reason: Reason) -> Self {
        self.rejected += 1;
        *self.rejected_by_reason.entry(reason).or_default() += 1;
        self
    }

    /// The row without one rejection for `reason` (a conversion opened again).
    pub fn unrejected(mut self, reason: Reason) -> Self {
        self.rejected = self.rejected.saturating_sub(1);
        if let Some(n) = self.rejected_by_reason.get_mut(&reason) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.rejected_by_reason.remove(&reason);
            }
        }
        self
    }

    fn add(&mut self, money: Money<'_>, sign: i128) {
        for (sums, (currency, micros)) in [
            (&mut self.payout, money.payout),
            (&mut self.revenue, money.revenue),
        ] {
            let sum = sums.entry(currency.to_owned()).or_default();
            *sum = sum.saturating_add(sign * i128::from(micros));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConversionStatus::{Approved, Pending, Rejected};

    fn usd(p: i64, r: i64) -> Money<'static> {
        Money {
            payout: ("USD", p),
            revenue: ("USD", r),
        }
    }

    #[test]
    fn sums_approved_per_currency_and_counts_reasons() {
        let row = ReportRow::default()
            .attributed(Approved, usd(2, 5))
            .attributed(
                Approved,
                Money {
                    payout: ("USD", 2),
                    revenue: ("EUR", 7),
                },
            )
            .attributed(Pending, usd(100, 100))
            .rejected(Reason::Duplicate)
            .rejected(Reason::Duplicate);
        assert_eq!(row.attributed, 3);
        assert_eq!(row.payout["USD"], 4, "pending payout is not counted yet");
        assert_eq!((row.revenue["USD"], row.revenue["EUR"]), (5, 7));
        assert_eq!((row.by_status[&Approved], row.by_status[&Pending]), (2, 1));
        assert_eq!(
            (row.rejected, row.rejected_by_reason[&Reason::Duplicate]),
            (2, 2)
        );
    }

    #[test]
    fn totals_past_i64_add_up_and_rows_written_with_i64_read_back() {
        let max = usd(common::money::MAX_MICROS, common::money::MAX_MICROS);
        let row = (0..20).fold(ReportRow::default(), |r, _| r.attributed(Approved, max));
        let twenty = 20 * i128::from(common::money::MAX_MICROS);
        assert_eq!((row.payout["USD"], row.revenue["USD"]), (twenty, twenty));
        assert_eq!(
            common::money::format_micros(row.revenue["USD"]),
            "20000000000000.00"
        );

        // The row as the fold wrote it before the totals were widened.
        #[derive(Serialize)]
        struct Before {
            attributed: u64,
            rejected: u64,
            rejected_by_reason: BTreeMap<Reason, u64>,
            by_status: BTreeMap<ConversionStatus, u64>,
            payout: BTreeMap<String, i64>,
            revenue: BTreeMap<String, i64>,
        }
        let before = Before {
            attributed: 2,
            rejected: 1,
            rejected_by_reason: [(Reason::Duplicate, 1)].into(),
            by_status: [(Approved, 2)].into(),
            payout: [("USD".to_owned(), -7), ("EUR".to_owned(), i64::MAX)].into(),
            revenue: [("USD".to_owned(), 9)].into(),
        };
        let read: ReportRow = common::store::unpack(&common::store::pack(&before)).unwrap();
        assert_eq!(read.attributed, 2);
        assert_eq!(read.rejected_by_reason[&Reason::Duplicate], 1);
        assert_eq!(read.by_status[&Approved], 2);
        assert_eq!(
            (read.payout["USD"], read.payout["EUR"], read.revenue["USD"]),
            (-7, i128::from(i64::MAX), 9)
        );
    }

    #[test]
    fn a_rejection_taken_back_leaves_no_trace() {
        let row = ReportRow::default()
            .rejected(Reason::Duplicate)
            .rejected(Reason::Unauthenticated);
        let back = row.unrejected(Reason::Unauthenticated);
        assert_eq!(back, ReportRow::default().rejected(Reason::Duplicate));
        assert_eq!(
            ReportRow::default().unrejected(Reason::Duplicate),
            ReportRow::default(),
            "never below zero"
        );
    }

    #[test]
    fn status_moves_shift_money() {
        let row = ReportRow::default().attributed(Pending, usd(3, 9));
        let approved = row.moved(Pending, Approved, usd(3, 9));
        assert_eq!(
            (approved.payout["USD"], approved.by_status[&Approved]),
            (3, 1)
        );
        let reversed = approved.moved(Approved, Rejected, usd(3, 9));
        assert_eq!(reversed.payout["USD"], 0);
        assert_eq!(
            (reversed.by_status[&Approved], reversed.by_status[&Rejected]),
            (0, 1)
        );
        assert_eq!(reversed.attributed, 1);
    }
}
