//! HQ's reconciliation at library level: a site's log, made of the records a case
//! chooses (what a lying site would sign), imported by HQ in this process. One case per
//! kind of violation HQ reports, each expecting exactly its kinds — and a clean log none.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_audit::{AuditedKey, Event};
use keyfab_testkit::forge::{forged_release, write_forged_log};
use keyfab_testkit::{policy, World, DAY, T0};

/// The violation kinds HQ reports for `events` (time, event), in the log's order, after
/// an `entitlement_imported` of `id` at T0.
fn kinds(w: &World, id: &str, events: Vec<(i64, Event)>) -> Vec<String> {
    let mut log = vec![(
        T0,
        Event::EntitlementImported {
            entitlement: id.to_owned(),
            sequence: 1,
            pool_keys: 0,
        },
    )];
    log.extend(events);
    let out = w.dir.path().join(format!("{id}.kfa"));
    write_forged_log(&w.site, log, &format!("bundle-{id}"), &out);
    let imported = keyfab_hq::audit::import(&w.hq, &out, None).expect("imported");
    imported
        .violations
        .into_iter()
        .map(|v| v.kind.to_string())
        .collect()
}

fn release(id: &str, device: &str) -> Event {
    forged_release(id, device)
}

fn release_at_station(id: &str, device: &str, station: &str) -> Event {
    match forged_release(id, device) {
        Event::ProvisionAllowed {
            entitlement,
            request_id,
            device_id,
            pool_index,
            keys,
            ..
        } => Event::ProvisionAllowed {
            entitlement,
            request_id,
            device_id,
            station: Some(station.to_owned()),
            pool_index,
            keys,
        },
        other => other,
    }
}

fn denied(id: &str, device: &str, code: &str) -> Event {
    keyfab_testkit::forge::forged_denial(id, device, code)
}

fn confirmed(id: &str, device: &str, result: &str) -> Event {
    Event::DeviceConfirmed {
        entitlement: id.to_owned(),
        device_id: device.to_owned(),
        station: None,
        result: result.to_owned(),
    }
}

/// A case: its name, the policy's extra TOML and devices, the events after the import
/// (given the entitlement's id), and the violation kinds HQ must report.
type Case = (
    &'static str,
    &'static str,
    u64,
    fn(&str) -> Vec<(i64, Event)>,
    &'static [&'static str],
);

#[test]
fn each_kind_of_violation_is_reported_and_nothing_else() {
    let cases: Vec<Case> = vec![
        (
            "clean",
            "",
            5,
            |id| {
                vec![
                    (T0 + 1, release(id, "D-1")),
                    (T0 + 2, confirmed(id, "D-1", "programmed")),
                    (T0 + 3, denied(id, "D-1", "device_already_provisioned")),
                ]
            },
            &[],
        ),
        (
            "quota",
            "",
            1,
            |id| vec![(T0 + 1, release(id, "D-1")), (T0 + 2, release(id, "D-2"))],
            &["quota_exceeded"],
        ),
        (
            "daily",
            "[limits]\ndaily = 1\n",
            5,
            |id| {
                vec![
                    (T0 + 1, release(id, "D-1")),
                    (T0 + 2, release(id, "D-2")),
                    (T0 + DAY, release(id, "D-3")),
                ]
            },
            &["daily_limit_exceeded"],
        ),
        (
            "twice",
            "",
            5,
            |id| vec![(T0 + 1, release(id, "D-1")), (T0 + 2, release(id, "D-1"))],
            &["device_already_provisioned"],
        ),
        (
            "expired",
            "",
            5,
            |id| vec![(T0 + 400 * DAY, release(id, "D-1"))],
            &["expired"],
        ),
        (
            "stations",
            "[stations]\nallowed = [\"line-1\"]\n",
            5,
            |id| {
                vec![
                    (T0 + 1, release_at_station(id, "D-1", "line-1")),
                    (T0 + 2, release_at_station(id, "D-2", "line-2")),
                ]
            },
            &["station_not_allowed"],
        ),
        (
            "ids",
            "[device_ids]\nid_pattern = \"^D-[0-9]$\"\n",
            5,
            |id| vec![(T0 + 1, release(id, "X-1"))],
            &["device_id_rejected"],
        ),
        (
            "refused-wrongly",
            "",
            5,
            |id| vec![(T0 + 1, denied(id, "D-1", "quota_exceeded"))],
            &["denied_but_allowed"],
        ),
        (
            "unconfirmed",
            "",
            5,
            |id| {
                vec![
                    (T0 + 1, confirmed(id, "D-9", "programmed")),
                    (T0 + 2, release(id, "D-1")),
                    (T0 + 3, confirmed(id, "D-1", "burnt")),
                ]
            },
            &["confirmed_without_release", "malformed_confirmation"],
        ),
        (
            "backwards",
            "",
            5,
            |id| vec![(T0 + 10, release(id, "D-1")), (T0 + 5, release(id, "D-2"))],
            &["timestamp_backwards"],
        ),
        (
            "unknown",
            "",
            5,
            |_| vec![(T0 + 1, release("no-such-entitlement", "D-1"))],
            &["unknown_entitlement"],
        ),
        (
            "revoked",
            "",
            5,
            |id| {
                vec![(
                    T0 + 1,
                    Event::EntitlementRevoked {
                        entitlement: id.to_owned(),
                        sequence: 2,
                        reason: "r".into(),
                        destroyed_pool_keys: 0,
                    },
                )]
            },
            &["revoked_without_revocation"],
        ),
        (
            "clock",
            "",
            5,
            |_| {
                vec![(
                    T0 - DAY,
                    Event::ClockReset {
                        from: T0,
                        to: T0 - DAY,
                        size: 1,
                        root: "00".repeat(32),
                        acknowledged_at: T0,
                    },
                )]
            },
            &["clock_reset_not_issued"],
        ),
    ];
    for (name, extra, devices, events, want) in cases {
        let w = World::new();
        let id = w.entitlement(name, &policy(devices, extra, "site"), &[]);
        let got = kinds(&w, &id, events(&id));
        assert_eq!(got, want, "{name}");
    }
}

/// Pool keys: a slot given twice, a key HQ never put in a slot, a release with no slot.
#[test]
fn pool_slots_are_checked_against_what_hq_put_in_them() {
    let w = World::new();
    let id = w.entitlement("pool", &policy(5, "", "hq-pool"), &[]);
    // The key HQ put in slot 0, as the site releases it.
    let engine = keyfab_site::provision::Provisioner::start(w.site.clone());
    let real = engine
        .provision(keyfab_site::provision::ProvisionRequest::parse(&id, "P-0", "p-0").unwrap())
        .expect("provisioned")
        .keys[0]
        .key_id
        .clone();
    drop(engine);
    let pooled = |device: &str, slot: Option<u64>, key_id: &str| Event::ProvisionAllowed {
        entitlement: id.clone(),
        request_id: format!("r-{device}"),
        device_id: device.to_owned(),
        station: None,
        pool_index: slot,
        keys: vec![AuditedKey {
            name: "identity".into(),
            key_id: key_id.to_owned(),
            cert_serial: None,
            certificate: None,
        }],
    };
    let invented = format!("spki-sha256:{}", "cd".repeat(32));
    let got = kinds(
        &w,
        &id,
        vec![
            (T0 + 1, pooled("P-1", Some(0), &real)),
            (T0 + 2, pooled("P-2", Some(0), &real)),
            (T0 + 3, pooled("P-3", Some(1), &invented)),
            (T0 + 4, pooled("P-4", None, &invented)),
        ],
    );
    assert_eq!(
        got,
        [
            "pool_key_reused",
            "pool_key_not_issued",
            "pool_key_not_issued"
        ]
    );
}
