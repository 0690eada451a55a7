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
        chips: None,
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
    chip: keyfab_policy::Chip::Absent,
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
        raised_daily in proptest::option::of(0u64..6),
        now in 0i64..400_000,
    ) {
        let p = gated(policy(5, Some(2), 100_000, 300_000, "UTC"));
        let state = EntitlementState { revoked, activated, last_acknowledged: acknowledged, total, today, raised_daily };
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

/// `p` with `[chips]`: one root, the device id as the chip's subject serial.
fn with_chips(p: CompiledPolicy, attestation: Attestation, accept_expired: bool) -> CompiledPolicy {
    let mut raw = p.policy;
    raw.chips = Some(Chips {
        attestation,
        roots: vec![serde_bytes::ByteBuf::from(vec![0x30; 8])],
        device_id_from: ChipIdFrom::SubjectSerial,
        accept_expired,
    });
    CompiledPolicy::new(raw).unwrap()
}

/// A chip certificate for `D-1`, valid 100..=300, certifying `spki-sha256:aa`, presented
/// with that key as the transport key.
fn chip_facts() -> ChipFacts {
    ChipFacts {
        key_id: "spki-sha256:aa".into(),
        not_before: 100,
        not_after: 300,
        subject_cn: Some("chip".into()),
        subject_serial: Some("D-1".into()),
        san_uris: vec!["urn:chip:D-1".into()],
        transport_key: Some("spki-sha256:aa".into()),
        csr_key: None,
    }
}

#[test]
fn chip_rules_refuse_each_failure_with_its_code_in_order() {
    let base = policy(10, None, 0, 1_000, "UTC");
    let required = with_chips(base.clone(), Attestation::Required, false);
    let state = EntitlementState {
        activated: true,
        ..EntitlementState::default()
    };
    let decide = |p: &CompiledPolicy, chip: Chip<'_>, now: i64| match p.decide(
        &state,
        &Request { chip, ..REQ },
        now,
    ) {
        Decision::Allow => "allow",
        Decision::Deny(code) => code.code().as_str(),
    };
    let good = chip_facts();
    assert_eq!(decide(&required, Chip::Verified(&good), 150), "allow");
    assert_eq!(decide(&required, Chip::Absent, 150), "chip_untrusted");
    assert_eq!(decide(&required, Chip::Untrusted, 150), "chip_untrusted");
    // Outside the chain's validity: refused, unless the policy accepts it.
    assert_eq!(
        decide(&required, Chip::Verified(&good), 301),
        "chip_untrusted"
    );
    let lenient = with_chips(base.clone(), Attestation::Required, true);
    assert_eq!(decide(&lenient, Chip::Verified(&good), 301), "allow");
    // A transport key the chip does not certify; no key presented at all; a CSR key
    // the chip does not certify; secret keys without a transport key to seal them to.
    for facts in [
        ChipFacts {
            transport_key: Some("spki-sha256:bb".into()),
            ..good.clone()
        },
        ChipFacts {
            transport_key: None,
            ..good.clone()
        },
        ChipFacts {
            csr_key: Some("spki-sha256:bb".into()),
            ..good.clone()
        },
        ChipFacts {
            transport_key: None,
            csr_key: Some("spki-sha256:aa".into()),
            ..good.clone()
        },
    ] {
        assert_eq!(
            decide(&required, Chip::Verified(&facts), 150),
            "chip_key_mismatch",
            "{facts:?}"
        );
    }
    let other_serial = ChipFacts {
        subject_serial: Some("D-2".into()),
        ..good.clone()
    };
    assert_eq!(
        decide(&required, Chip::Verified(&other_serial), 150),
        "chip_binding_mismatch"
    );
    // The chip rules come after the device id's and before the device's earlier keys.
    let request = |device_id, already_provisioned| Request {
        device_id,
        already_provisioned,
        chip: Chip::Absent,
        ..REQ
    };
    assert_eq!(
        required.decide(&state, &request("X-1", false), 150),
        Decision::Deny(DenyCode::DeviceIdRejected)
    );
    assert_eq!(
        required.decide(&state, &request("D-1", true), 150),
        Decision::Deny(DenyCode::ChipUntrusted)
    );
    // Optional: no chain is decided as before; a chain sent must hold.
    let optional = with_chips(base.clone(), Attestation::Optional, false);
    assert_eq!(decide(&optional, Chip::Absent, 150), "allow");
    assert_eq!(decide(&optional, Chip::Untrusted, 150), "chip_untrusted");
    // Off: chains are not looked at. HQ's replay of another refusal assumes they held.
    let off = with_chips(base, Attestation::Off, false);
    assert_eq!(decide(&off, Chip::Untrusted, 150), "allow");
    assert_eq!(decide(&required, Chip::Assumed, 150), "allow");
}

#[test]
fn a_chip_names_the_device_where_device_id_from_says() {
    let state = EntitlementState {
        activated: true,
        ..EntitlementState::default()
    };
    let good = chip_facts();
    for (from, facts, want) in [
        (ChipIdFrom::SubjectCn, good.clone(), false),
        (
            ChipIdFrom::SubjectCn,
            ChipFacts {
                subject_cn: Some("D-1".into()),
                ..good.clone()
            },
            true,
        ),
        (ChipIdFrom::SanUri, good.clone(), true),
        (
            ChipIdFrom::SanUri,
            ChipFacts {
                san_uris: vec!["urn:chip:XD-1".into()],
                ..good.clone()
            },
            false,
        ),
        (
            ChipIdFrom::SanUri,
            ChipFacts {
                san_uris: vec!["D-1".into()],
                ..good.clone()
            },
            true,
        ),
        (
            ChipIdFrom::None,
            ChipFacts {
                subject_serial: None,
                ..good.clone()
            },
            true,
        ),
    ] {
        let mut raw = policy(10, None, 0, 1_000, "UTC").policy;
        raw.chips = Some(Chips {
            attestation: Attestation::Required,
            roots: vec![serde_bytes::ByteBuf::from(vec![0x30; 8])],
            device_id_from: from,
            accept_expired: false,
        });
        let p = CompiledPolicy::new(raw).unwrap();
        let got = p.decide(
            &state,
            &Request {
                chip: Chip::Verified(&facts),
                ..REQ
            },
            150,
        );
        assert_eq!(got == Decision::Allow, want, "{from:?} {facts:?}");
    }
}

#[test]
fn a_chips_section_needs_roots_to_check_against_and_reads_them_from_files() {
    let text = |chips: &str| {
        format!(
            "product = \"p\"\ndevices = 10\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2027-01-01T00:00:00Z\"\n[[keys]]\nname = \"k\"\ntype = \"ec-p256\"\nsource = \"site\"\n[chips]\n{chips}\n"
        )
    };
    let e = PolicyDraft::parse(&text("attestation = \"required\"")).unwrap_err();
    assert_eq!(e.field, "chips.roots");
    let e =
        PolicyDraft::parse(&text("attestation = \"sometimes\"\nroots = [\"v.pem\"]")).unwrap_err();
    assert_eq!(e.field, "chips.attestation");
    let e = PolicyDraft::parse(&text(
        "attestation = \"required\"\nroots = [\"v.pem\"]\ndevice_id_from = \"mac\"",
    ))
    .unwrap_err();
    assert_eq!(e.field, "chips.device_id_from");
    let draft = PolicyDraft::parse(&text(
        "attestation = \"required\"\nroots = [\"v.pem\"]\ndevice_id_from = \"san-uri\"\naccept_expired = true",
    ))
    .unwrap();
    assert_eq!(draft.chip_root_paths(), ["v.pem"]);
    // Not read yet: refused.
    assert_eq!(
        draft.clone().finish(vec![]).unwrap_err().field,
        "chips.roots"
    );
    let policy = draft
        .with_chip_roots(vec![vec![0x30, 0x00]])
        .unwrap()
        .finish(vec![])
        .unwrap();
    let chips = policy.chips.unwrap();
    assert_eq!(chips.roots[0].as_slice(), [0x30, 0x00]);
    assert_eq!(chips.device_id_from, ChipIdFrom::SanUri);
    assert!(chips.accept_expired);
    // Off needs no roots.
    assert!(PolicyDraft::parse(&text("attestation = \"off\"")).is_ok());
}

/// An approved raise lifts the day's share and nothing else: it never lowers the limit,
/// never passes the quota, and gives no limit to a policy without one.
#[test]
fn a_raise_lifts_the_days_share_never_the_quota() {
    let p = policy(10, Some(2), 100, 300, "UTC");
    let at = |total, today, raised_daily| {
        p.decide(
            &EntitlementState {
                activated: true,
                last_acknowledged: 150,
                total,
                today,
                raised_daily,
                ..EntitlementState::default()
            },
            &REQ,
            150,
        )
    };
    assert_eq!(at(2, 2, None), Decision::Deny(DenyCode::DailyLimitExceeded));
    assert_eq!(at(2, 2, Some(5)), Decision::Allow);
    assert_eq!(at(5, 4, Some(5)), Decision::Allow);
    assert_eq!(
        at(5, 5, Some(5)),
        Decision::Deny(DenyCode::DailyLimitExceeded)
    );
    // Lower than the policy's: the policy's stands.
    assert_eq!(at(1, 1, Some(1)), Decision::Allow);
    assert_eq!(p.daily_limit(Some(1)), Some(2));
    assert_eq!(at(10, 0, Some(50)), Decision::Deny(DenyCode::QuotaExceeded));
    let unlimited = policy(10, None, 100, 300, "UTC");
    assert_eq!(unlimited.daily_limit(Some(5)), None);
}
