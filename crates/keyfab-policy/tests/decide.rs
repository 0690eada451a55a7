//! Policy arithmetic: windows, quotas, daily limits and calendar days across time zones
//! and DST changes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_policy::*;
use proptest::prelude::*;

fn policy(devices: u64, daily: Option<u64>, from: i64, until: i64, tz: &str) -> CompiledPolicy {
    CompiledPolicy::new(Policy {
        product: "p".into(),
        devices,
        valid_from: from,
        valid_until: until,
        audit_every_days: None,
        daily_limit: daily,
        timezone: tz.into(),
        device_id_pattern: Some("^D-[0-9]+$".into()),
        allowed_stations: Some(vec!["line-1".into()]),
        keys: vec![KeySpec {
            name: "k".into(),
            key_type: KeyType::EcP256,
            source: KeySource::Site,
            certificate: None,
        }],
        batch_ca_key: Default::default(),
        approval: None,
        code: None,
    })
    .unwrap()
}

/// `p`, with an audit due every day and a quorum of one for `activate`.
fn gated(p: CompiledPolicy) -> CompiledPolicy {
    let mut raw = p.policy;
    raw.audit_every_days = Some(1);
    raw.approval = Some(Approval {
        threshold: 1,
        approver_keys: vec!["k".into()],
        required_for: vec![Action::Activate],
    });
    CompiledPolicy::new(raw).unwrap()
}

const REQ: Request<'static> = Request {
    device_id: "D-1",
    station: Some("line-1"),
    already_provisioned: false,
};

const ZONES: [&str; 7] = [
    "UTC",
    "Asia/Shanghai",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/St_Johns",
];

proptest! {
    #[test]
    fn window_is_half_open(from in 0i64..4_000_000_000, len in 1i64..1_000_000_000, now in 0i64..6_000_000_000) {
        let p = policy(10, None, from, from + len, "UTC");
        let d = p.decide(&EntitlementState::default(), &REQ, now);
        let expected = if now < from {
            Decision::Deny(DenyCode::NotYetValid)
        } else if now >= from + len {
            Decision::Deny(DenyCode::Expired)
        } else {
            Decision::Allow
        };
        prop_assert_eq!(d, expected);
    }

    #[test]
    fn quota_and_daily_limit_are_never_exceeded(devices in 1u64..10_000, daily in 1u64..10_000, total in 0u64..20_000, today in 0u64..20_000) {
        prop_assume!(daily <= devices);
        let p = policy(devices, Some(daily), 0, i64::MAX / 2, "UTC");
        let state = EntitlementState { total, today, ..Default::default() };
        let d = p.decide(&state, &REQ, 1000);
        if total >= devices {
            prop_assert_eq!(d, Decision::Deny(DenyCode::QuotaExceeded));
        } else if today >= daily {
            prop_assert_eq!(d, Decision::Deny(DenyCode::DailyLimitExceeded));
        } else {
            prop_assert_eq!(d, Decision::Allow);
        }
    }

    #[test]
    fn a_day_is_the_zones_civil_day(t in 0i64..4_102_444_800, zone in 0usize..ZONES.len()) {
        let p = policy(1, None, 0, i64::MAX / 2, ZONES[zone]);
        let tz = jiff::tz::TimeZone::get(ZONES[zone]).unwrap();
        let day: jiff::civil::Date = p.day_of(t).parse().unwrap();
        let start = day.to_zoned(tz.clone()).unwrap().start_of_day().unwrap().timestamp().as_second();
        let next = day.tomorrow().unwrap().to_zoned(tz).unwrap().start_of_day().unwrap().timestamp().as_second();
        prop_assert!(start <= t && t < next, "{} not in [{start}, {next})", t);
        // Monotone: a later instant never falls on an earlier day.
        prop_assert!(p.day_of(t + 1) >= p.day_of(t));
        // A day lasts 23 to 25 hours (Lord Howe moves by 30 minutes).
        prop_assert!((23 * 3600..=25 * 3600).contains(&(next - start)));
        // The span names the same day and covers exactly it.
        let span = p.day_span(t);
        prop_assert_eq!((span.day.clone(), span.start, span.end), (p.day_of(t), start, next));
        prop_assert_eq!(p.day_of(span.end - 1), span.day.clone());
        prop_assert!(p.day_of(span.end) != span.day && p.day_of(span.start - 1) != span.day);
    }
}

#[test]
fn dst_days_in_new_york_2026() {
    let p = policy(1, None, 0, i64::MAX / 2, "America/New_York");
    let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_second();
    // 8 March 2026: clocks spring forward, the day lasts 23 hours (05:00Z to 04:00Z).
    assert_eq!(p.day_of(at("2026-03-08T04:59:59Z")), "2026-03-07");
    assert_eq!(p.day_of(at("2026-03-08T05:00:00Z")), "2026-03-08");
    assert_eq!(p.day_of(at("2026-03-09T03:59:59Z")), "2026-03-08");
    assert_eq!(p.day_of(at("2026-03-09T04:00:00Z")), "2026-03-09");
    // 1 November 2026: clocks fall back, the day lasts 25 hours (04:00Z to 05:00Z).
    assert_eq!(p.day_of(at("2026-11-01T04:00:00Z")), "2026-11-01");
    assert_eq!(p.day_of(at("2026-11-02T04:59:59Z")), "2026-11-01");
    assert_eq!(p.day_of(at("2026-11-02T05:00:00Z")), "2026-11-02");
}

#[test]
fn shanghai_day_starts_at_16_utc() {
    let p = policy(1, None, 0, i64::MAX / 2, "Asia/Shanghai");
    let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_second();
    assert_eq!(p.day_of(at("2026-11-24T15:59:59Z")), "2026-11-24");
    assert_eq!(p.day_of(at("2026-11-24T16:00:00Z")), "2026-11-25");
}

#[test]
fn rule_order_gives_the_first_failing_code() {
    let p = gated(policy(5, Some(1), 100, 200, "UTC"));
    let fresh = EntitlementState {
        activated: true,
        last_acknowledged: 150,
        ..Default::default()
    };
    let deny = |s: EntitlementState, r: Request<'_>, now| match p.decide(&s, &r, now) {
        Decision::Deny(c) => c.code().as_str(),
        Decision::Allow => "allow",
    };
    assert_eq!(
        deny(
            EntitlementState {
                revoked: true,
                ..fresh
            },
            REQ,
            150
        ),
        "revoked"
    );
    assert_eq!(
        deny(
            EntitlementState {
                activated: false,
                ..fresh
            },
            REQ,
            150
        ),
        "approval_required"
    );
    assert_eq!(
        deny(
            EntitlementState {
                last_acknowledged: 150 - 86_401,
                ..fresh
            },
            REQ,
            150
        ),
        "audit_overdue"
    );
    assert_eq!(deny(fresh, REQ, 99), "not_yet_valid");
    assert_eq!(deny(fresh, REQ, 200), "expired");
    assert_eq!(
        deny(
            fresh,
            Request {
                station: Some("line-9"),
                ..REQ
            },
            150
        ),
        "station_not_allowed"
    );
    assert_eq!(
        deny(
            fresh,
            Request {
                station: None,
                ..REQ
            },
            150
        ),
        "station_not_allowed"
    );
    assert_eq!(
        deny(
            fresh,
            Request {
                device_id: "X-1",
                ..REQ
            },
            150
        ),
        "device_id_rejected"
    );
    assert_eq!(
        deny(
            fresh,
            Request {
                device_id: "D-1/../x",
                ..REQ
            },
            150
        ),
        "device_id_rejected"
    );
    assert_eq!(
        deny(
            fresh,
            Request {
                already_provisioned: true,
                ..REQ
            },
            150
        ),
        "device_already_provisioned"
    );
    assert_eq!(
        deny(EntitlementState { total: 5, ..fresh }, REQ, 150),
        "quota_exceeded"
    );
    assert_eq!(
        deny(EntitlementState { today: 1, ..fresh }, REQ, 150),
        "daily_limit_exceeded"
    );
    assert_eq!(deny(fresh, REQ, 150), "allow");
}

#[test]
fn the_local_clock_a_policy_module_reads_follows_the_zone() {
    // 01:30 UTC on the day Berlin moves to summer time is 03:30 there.
    let berlin = policy(10, None, 0, i64::MAX, "Europe/Berlin");
    assert_eq!(
        berlin.local_clock(1_774_747_800),
        (20_541, 3 * 3600 + 30 * 60)
    );
    // 23:30 UTC on 2026-11-24 is already 07:30 on the 25th in Shanghai.
    let shanghai = policy(10, None, 0, i64::MAX, "Asia/Shanghai");
    assert_eq!(
        shanghai.local_clock(1_795_563_000),
        (20_782, 7 * 3600 + 30 * 60)
    );
    // Before 1970 the day number is negative, the second still in 0..86_400.
    let utc = policy(10, None, i64::MIN, i64::MAX, "UTC");
    assert_eq!(utc.local_clock(-1), (-1, 86_399));
}

#[test]
fn a_code_section_names_its_module_and_needs_it_read() {
    let draft = keyfab_policy::PolicyDraft::parse(
        "product = \"p\"\ndevices = 5\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2027-01-01T00:00:00Z\"\n[[keys]]\nname = \"k\"\ntype = \"ed25519\"\nsource = \"site\"\n[code]\nmodule = \"rules.wasm\"\n",
    )
    .unwrap();
    assert_eq!(draft.code_path(), Some("rules.wasm"));
    let e = draft.clone().finish(vec![]).unwrap_err();
    assert_eq!(e.field, "code.module");
    let code = keyfab_policy::PolicyCode {
        name: "rules.wasm".into(),
        sha256: "ab".repeat(32),
        module: vec![0, 97, 115, 109],
    };
    assert_eq!(
        draft.with_code(code.clone()).finish(vec![]).unwrap().code,
        Some(code)
    );
    let unknown = keyfab_policy::PolicyDraft::parse(
        "product = \"p\"\ndevices = 5\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2027-01-01T00:00:00Z\"\n[[keys]]\nname = \"k\"\ntype = \"ed25519\"\nsource = \"site\"\n[code]\nmodule = \"rules.wasm\"\nfuel = 5\n",
    )
    .unwrap_err();
    assert!(unknown.to_string().contains("fuel"), "{unknown}");
}

proptest! {
    /// The status every view shows is what the next decision does for an acceptable
    /// device: active exactly when it allows, and otherwise named by its refusal.
    #[test]
    fn the_status_says_what_the_next_decision_does(
        revoked in any::<bool>(),
        activated in any::<bool>(),
        acknowledged in 0i64..400_000,
        total in 0u64..8,
        today in 0u64..4,
        now in 0i64..400_000,
    ) {
        let p = gated(policy(5, Some(2), 100_000, 300_000, "UTC"));
        let state = EntitlementState { revoked, activated, last_acknowledged: acknowledged, total, today };
        let status = p.status(&state, now);
        let expected = match p.decide(&state, &REQ, now) {
            Decision::Allow => "active",
            Decision::Deny(DenyCode::AuditOverdue) => "paused",
            Decision::Deny(DenyCode::ApprovalRequired) => "pending_approval",
            Decision::Deny(DenyCode::QuotaExceeded) => "exhausted",
            Decision::Deny(DenyCode::DailyLimitExceeded) => "daily_limit_reached",
            Decision::Deny(other) => other.code().as_str(),
        };
        prop_assert_eq!(status.as_str(), expected);
        prop_assert_eq!(serde_json::to_value(status).unwrap(), serde_json::json!(expected));
    }
}
