//! What an entitlement's figures say will stop a line soon: the warnings the site's and
//! HQ's status screens both show (`site status`, `hq status`), from the same thresholds.

use crate::{rfc3339, EntitlementStatus};

/// Under this share of its quota left (percent), an entitlement is a warning.
pub const QUOTA_WARN_PERCENT: u64 = 10;
/// A window ending within this many days is a warning.
pub const WINDOW_WARN_DAYS: i64 = 7;
/// An entitlement pausing for want of an audit within this many days is a warning.
pub const AUDIT_WARN_DAYS: i64 = 3;

/// An entitlement's figures, as a status screen has them.
#[derive(Debug, Clone, Copy)]
pub struct Glance<'a> {
    /// What the next decision does.
    pub state: EntitlementStatus,
    /// Devices released.
    pub released: u64,
    /// The quota.
    pub quota: u64,
    /// The daily limit, if any.
    pub daily_limit: Option<u64>,
    /// The window's end.
    pub valid_until: i64,
    /// When it pauses for want of HQ's receipt (none: no audit asked for).
    pub audit_due_at: Option<i64>,
    /// What to do about an audit coming due, for the reader of this screen.
    pub audit_remedy: &'a str,
}

/// Days from `now` to `at`, rounded down.
pub fn days_until(now: i64, at: i64) -> i64 {
    at.saturating_sub(now).div_euclid(86_400)
}

impl Glance<'_> {
    /// What will stop the line soon, at `now`, most urgent first; each to be prefixed
    /// with the entitlement's name.
    pub fn warnings(&self, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        match self.state {
            EntitlementStatus::Active => {}
            EntitlementStatus::DailyLimitReached => out.push(format!(
                "today's {} devices are done; the next day of its time zone resumes it",
                self.daily_limit.unwrap_or(0)
            )),
            state => out.push(state.to_string()),
        }
        if matches!(
            self.state,
            EntitlementStatus::Revoked | EntitlementStatus::Expired
        ) {
            return out;
        }
        let left = self.quota.saturating_sub(self.released);
        if left > 0 && left.saturating_mul(100) < self.quota.saturating_mul(QUOTA_WARN_PERCENT) {
            out.push(format!("{left} devices of {} left", self.quota));
        }
        let window = days_until(now, self.valid_until);
        if (0..WINDOW_WARN_DAYS).contains(&window) {
            out.push(format!(
                "its window ends {} (in {window} days)",
                rfc3339(self.valid_until)
            ));
        }
        if let Some(due) = self.audit_due_at {
            if due > now && days_until(now, due) < AUDIT_WARN_DAYS {
                out.push(format!(
                    "pauses {} unless {}",
                    rfc3339(due),
                    self.audit_remedy
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_nearly_spent_and_an_audit_due_tomorrow_are_warnings() {
        let now = 1_800_000_000;
        let g = Glance {
            state: EntitlementStatus::Active,
            released: 19,
            quota: 20,
            daily_limit: None,
            valid_until: now + 30 * 86_400,
            audit_due_at: Some(now + 3_600),
            audit_remedy: "the receipt comes",
        };
        let w = g.warnings(now);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(w[0], "1 devices of 20 left");
        assert!(w[1].starts_with("pauses ") && w[1].ends_with("unless the receipt comes"));
        let revoked = Glance {
            state: EntitlementStatus::Revoked,
            ..g
        };
        assert_eq!(revoked.warnings(now), ["revoked"]);
    }
}
