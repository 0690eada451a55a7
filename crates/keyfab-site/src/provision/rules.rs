//! The decision proper, pure: the clock against the trusted time, and the policy — its
//! built-in rules, then its module — on an entitlement's state. No store, no log: what
//! these say, the batch records.

use super::*;

/// What the clock check found when the batch may not be decided (the trusted time
/// stays where it is).
#[derive(Clone, Copy)]
pub(super) enum ClockOff {
    /// Behind the trusted time by more than the tolerance.
    Behind { observed: i64, trusted: i64 },
    /// Ahead of the trusted time by more than the site adopts.
    Ahead {
        observed: i64,
        trusted: i64,
        max_jump: i64,
    },
}

impl ClockOff {
    /// The trusted time, which the refusal is recorded at.
    pub(super) fn trusted(self) -> i64 {
        match self {
            ClockOff::Behind { trusted, .. } | ClockOff::Ahead { trusted, .. } => trusted,
        }
    }

    pub(super) fn event(self) -> Event {
        match self {
            ClockOff::Behind { observed, trusted } => Event::ClockRollback {
                observed,
                high_water: trusted,
            },
            ClockOff::Ahead {
                observed, trusted, ..
            } => Event::ClockAhead {
                observed,
                high_water: trusted,
            },
        }
    }

    /// What each request of the batch is answered.
    pub(super) fn refusal(self) -> Error {
        match self {
            ClockOff::Behind { observed, trusted } => Error::ClockRollback {
                observed,
                high_water: trusted,
            },
            ClockOff::Ahead {
                observed,
                trusted,
                max_jump,
            } => Error::ClockAhead {
                observed,
                trusted,
                max_jump,
            },
        }
    }
}

/// Step 3, the clock (pure): the time a batch is decided at — the clock, or the trusted
/// time if later — or why the batch is refused whole: a clock behind the trusted time by
/// more than `tolerance`, or ahead of it by more than `max_jump`.
pub(super) fn check_clock(
    observed: i64,
    trusted: i64,
    tolerance: i64,
    max_jump: i64,
) -> std::result::Result<i64, ClockOff> {
    if observed < trusted.saturating_sub(tolerance) {
        return Err(ClockOff::Behind { observed, trusted });
    }
    if trusted != i64::MIN && observed > trusted.saturating_add(max_jump) {
        return Err(ClockOff::Ahead {
            observed,
            trusted,
            max_jump,
        });
    }
    Ok(observed.max(trusted))
}

/// The decision a policy module's verdict makes, and its reason when it refused.
pub(super) fn code_decision(verdict: Verdict) -> (Decision, Option<String>) {
    match verdict {
        Verdict::Allow => (Decision::Allow, None),
        Verdict::Deny { reason } => (Decision::Deny(DenyCode::PolicyDenied), Some(reason)),
        Verdict::Error { reason } => (Decision::Deny(DenyCode::PolicyError), Some(reason)),
    }
}

/// Step 6, the decision proper (pure): the built-in rules on the entitlement's state as
/// `c` has it (less what this node `held` in reservation and has not used), then the
/// policy module's word, which it says in this same step. Returns the decision and, when
/// a module or the chip rules refused, the reason.
#[allow(clippy::too_many_arguments)]
pub(super) fn decide_policy(
    ctx: &EntitlementContext,
    req: &ProvisionRequest,
    chip: &ChipSeen,
    c: &mut Counters,
    held: u64,
    already: bool,
    day: &str,
    now: i64,
    acknowledged_at: i64,
) -> (Decision, Option<String>) {
    let state = EntitlementState {
        revoked: c.revoked,
        activated: c.activated
            || !ctx
                .policy
                .policy
                .requires_approval(keyfab_policy::Action::Activate),
        last_acknowledged: ctx.record.created_at.max(acknowledged_at),
        total: c.total.saturating_sub(held),
        today: c.days.get(day).copied().unwrap_or(0).saturating_sub(held),
        raised_daily: c.raised_on(day),
    };
    let built_in = ctx.policy.decide(
        &state,
        &keyfab_policy::Request {
            device_id: &req.device_id,
            station: req.station.as_deref(),
            already_provisioned: already,
            chip: chip.as_request(),
        },
        now,
    );
    if let Decision::Deny(code) = built_in {
        if let Some(reason) = chip.reason(code, now) {
            return (built_in, Some(reason));
        }
    }
    match (built_in, &ctx.code) {
        (Decision::Allow, Some(module)) => {
            let counted = Counted {
                total: c.total,
                today: state.today,
            };
            // Run here, on the committer: the instance's memory is allocated and freed
            // on one thread, so the allocator reuses it warm. Instantiated on the crypto
            // workers and freed here, it cost 12-17% of throughput (pages purged and
            // faulted in again); here, none measurable (BENCHMARKS.md).
            let evaluation = c.code.evaluate(
                module,
                &ctx.policy,
                now,
                day,
                counted,
                &req.device_id,
                req.station.as_deref(),
            );
            code_decision(evaluation.verdict)
        }
        (other, _) => (other, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The time a batch is decided at, or the code of its refusal and the time that is
    /// recorded at.
    type Judged = std::result::Result<i64, (&'static str, i64)>;

    /// Each side of each bound: (clock, trusted time) → what it is judged.
    #[test]
    fn the_clock_is_judged_against_the_trusted_time_and_both_bounds() {
        let (tolerance, max_jump) = (300, 7 * 86_400);
        let t = 1_780_272_000;
        let cases: [(i64, i64, Judged); 7] = [
            (t, t, Ok(t)),
            (t + 10, t, Ok(t + 10)),
            // Behind within the tolerance: decided at the trusted time.
            (t - 300, t, Ok(t)),
            (t - 301, t, Err(("clock_rollback", t))),
            (t + max_jump, t, Ok(t + max_jump)),
            (t + max_jump + 1, t, Err(("clock_ahead", t))),
            // No trusted time yet: any clock is taken.
            (t + 10 * max_jump, i64::MIN, Ok(t + 10 * max_jump)),
        ];
        for (observed, trusted, want) in cases {
            let got = check_clock(observed, trusted, tolerance, max_jump)
                .map_err(|off| (off.refusal().code().as_str(), off.trusted()));
            assert_eq!(got, want, "clock {observed}, trusted {trusted}");
        }
        let off = check_clock(t + max_jump + 1, t, tolerance, max_jump).unwrap_err();
        assert!(matches!(off.event(), Event::ClockAhead { high_water, .. } if high_water == t));
    }
}
