//! Raises of the daily limit a quorum approved (`raise-limit`).
//!
//! A raise lets `daily` devices through on each policy day from `from_day` to `to_day`
//! instead of the policy's `limits.daily`. It never lowers the limit and never touches
//! the quota (`devices`), which only HQ sets: a day's share can grow, the total cannot.
//! The site and HQ's replay both read the raises in force through [`raised_on`], so they
//! decide alike.

use crate::{CompiledPolicy, PolicyError};
use serde::{Deserialize, Serialize};

/// The most policy days one raise may cover: a longer change of pace is a new
/// entitlement, which HQ issues.
pub const MAX_RAISE_DAYS: i64 = 31;

/// A raise of the daily limit over a run of policy days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raise {
    /// The daily limit on those days.
    pub daily: u64,
    /// The first policy day it covers, `YYYY-MM-DD` in the policy's time zone.
    pub from_day: String,
    /// The last policy day it covers (inclusive).
    pub to_day: String,
}

impl Raise {
    /// Whether it covers `day` (`YYYY-MM-DD`, as [`CompiledPolicy::day_of`] names days).
    pub fn covers(&self, day: &str) -> bool {
        // Four-digit years: the names sort as the days do.
        self.from_day.as_str() <= day && day <= self.to_day.as_str()
    }

    /// Whether `policy` can carry this raise: it has a daily limit, the raise is above
    /// it and within the quota, and its days are real dates, in order, at most
    /// [`MAX_RAISE_DAYS`] of them, inside the entitlement's window.
    pub fn check(&self, policy: &CompiledPolicy) -> Result<(), PolicyError> {
        let p = &policy.policy;
        let Some(daily) = p.daily_limit else {
            return Err(PolicyError::new(
                "raise.daily",
                "the policy has no daily limit to raise",
            ));
        };
        if self.daily <= daily {
            return Err(PolicyError::new(
                "raise.daily",
                format!(
                    "{} is not above the policy's daily limit of {daily}",
                    self.daily
                ),
            ));
        }
        if self.daily > p.devices {
            return Err(PolicyError::new(
                "raise.daily",
                format!(
                    "{} is more than the entitlement's quota of {} devices, which only HQ can change",
                    self.daily, p.devices
                ),
            ));
        }
        let from = civil_day("raise.from_day", &self.from_day)?;
        let to = civil_day("raise.to_day", &self.to_day)?;
        if to < from {
            return Err(PolicyError::new(
                "raise.to_day",
                format!("{} is before {}", self.to_day, self.from_day),
            ));
        }
        let days = from
            .until(to)
            .map_or(i64::MAX, |span| i64::from(span.get_days()))
            .saturating_add(1);
        if days > MAX_RAISE_DAYS {
            return Err(PolicyError::new(
                "raise.to_day",
                format!("{days} days: a raise covers at most {MAX_RAISE_DAYS}"),
            ));
        }
        let first = policy.day_of(p.valid_from);
        let last = policy.day_of(p.valid_until.saturating_sub(1));
        if self.to_day < first || self.from_day > last {
            return Err(PolicyError::new(
                "raise.from_day",
                format!(
                    "{}..{} is outside the entitlement's window ({first}..{last})",
                    self.from_day, self.to_day
                ),
            ));
        }
        Ok(())
    }
}

/// A policy day written `YYYY-MM-DD`, exactly as day names are written.
fn civil_day(field: &str, day: &str) -> Result<jiff::civil::Date, PolicyError> {
    day.parse::<jiff::civil::Date>()
        .ok()
        .filter(|d| d.to_string() == day)
        .ok_or_else(|| PolicyError::new(field, format!("'{day}' is not a date YYYY-MM-DD")))
}

/// The daily limit `daily` (the policy's; none: no limit) on a day whose raise in force
/// is `raised`: the raise where it is higher. A raise never lowers a limit, and gives
/// none to a policy without one.
pub fn lifted(daily: Option<u64>, raised: Option<u64>) -> Option<u64> {
    daily.map(|d| raised.map_or(d, |r| r.max(d)))
}

/// The highest raised limit in force on `day` among `raises` (none: no raise covers it).
pub fn raised_on(raises: &[Raise], day: &str) -> Option<u64> {
    raises
        .iter()
        .filter(|r| r.covers(day))
        .map(|r| r.daily)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CompiledPolicy {
        let draft = crate::PolicyDraft::parse(
            r#"
product = "p"
devices = 100
valid_from = "2026-12-01T00:00:00Z"
valid_until = "2027-01-01T00:00:00Z"
[limits]
daily = 10
[[keys]]
name = "k"
type = "aes-256"
source = "site"
"#,
        )
        .unwrap();
        CompiledPolicy::new(draft.finish(vec![]).unwrap()).unwrap()
    }

    fn raise(daily: u64, from: &str, to: &str) -> Raise {
        Raise {
            daily,
            from_day: from.into(),
            to_day: to.into(),
        }
    }

    #[test]
    fn a_raise_is_checked_against_the_policy_it_raises() {
        let p = policy();
        assert!(raise(20, "2026-12-08", "2026-12-08").check(&p).is_ok());
        assert!(raise(100, "2026-12-01", "2026-12-31").check(&p).is_ok());
        let refused = |r: Raise| r.check(&p).unwrap_err().field;
        assert_eq!(
            refused(raise(10, "2026-12-08", "2026-12-08")),
            "raise.daily"
        );
        assert_eq!(
            refused(raise(101, "2026-12-08", "2026-12-08")),
            "raise.daily"
        );
        assert_eq!(
            refused(raise(20, "2026-12-8", "2026-12-08")),
            "raise.from_day"
        );
        assert_eq!(
            refused(raise(20, "2026-02-30", "2026-12-08")),
            "raise.from_day"
        );
        assert_eq!(
            refused(raise(20, "2026-12-09", "2026-12-08")),
            "raise.to_day"
        );
        assert_eq!(
            refused(raise(20, "2026-12-01", "2027-01-01")),
            "raise.to_day"
        );
        assert_eq!(
            refused(raise(20, "2027-01-01", "2027-01-02")),
            "raise.from_day"
        );
        assert_eq!(
            refused(raise(20, "2026-11-29", "2026-11-30")),
            "raise.from_day"
        );
        let mut unlimited = p.policy.clone();
        unlimited.daily_limit = None;
        let unlimited = CompiledPolicy::new(unlimited).unwrap();
        assert_eq!(
            raise(20, "2026-12-08", "2026-12-08")
                .check(&unlimited)
                .unwrap_err()
                .field,
            "raise.daily"
        );
    }

    #[test]
    fn the_highest_raise_covering_a_day_is_in_force() {
        let raises = [
            raise(20, "2026-12-08", "2026-12-10"),
            raise(30, "2026-12-10", "2026-12-10"),
        ];
        assert_eq!(raised_on(&raises, "2026-12-07"), None);
        assert_eq!(raised_on(&raises, "2026-12-08"), Some(20));
        assert_eq!(raised_on(&raises, "2026-12-10"), Some(30));
        assert_eq!(raised_on(&raises, "2026-12-11"), None);
    }
}
