//! The decide-and-record step at library level: an HQ and a site in this process, the
//! site's state in an embedded store in a temporary directory, a clock the test moves.
//! One case per refusal code the step gives, then replays, confirmations and the latch —
//! each checked for what it answers *and* for what it leaves: the audit record it adds,
//! the counters it moves (or not).
//!
//! These pin the step's behaviour so that its code can be reorganised under them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_audit::Event;
use keyfab_crypto::rng::SystemRng;
use keyfab_crypto::sign::SigningKey;
use keyfab_node::{Error, Node, NodeKind, StoreChoice};
use keyfab_site::provision::{Counters, Programming, ProvisionRequest, Provisioned, Provisioner};
use keyfab_testkit::{pass, DAY, T0};
use std::sync::Arc;

/// A testkit world and the site's provisioning engine.
struct World {
    kit: keyfab_testkit::World,
    engine: Provisioner,
}

fn world() -> World {
    World::of(keyfab_testkit::World::new())
}

/// A policy of `devices` devices valid for 2026, with `extra` TOML after its header and
/// one site-made P-256 key.
fn policy(devices: u64, extra: &str) -> String {
    keyfab_testkit::policy(devices, extra, "site")
}

impl World {
    fn of(kit: keyfab_testkit::World) -> Self {
        World {
            engine: Provisioner::start(kit.site.clone()),
            kit,
        }
    }

    fn site(&self) -> &Node {
        self.engine.node()
    }

    fn set_clock(&self, t: i64) {
        self.kit.clock.set(t);
    }

    fn entitlement(&self, name: &str, policy_text: &str, files: &[(&str, &[u8])]) -> String {
        self.kit.entitlement(name, policy_text, files)
    }

    fn provision(&self, id: &str, device: &str, request: &str) -> keyfab_node::Result<Provisioned> {
        self.engine
            .provision(ProvisionRequest::parse(id, device, request).unwrap())
    }

    fn provision_at_station(
        &self,
        id: &str,
        device: &str,
        request: &str,
        station: &str,
    ) -> keyfab_node::Result<Provisioned> {
        let mut req = ProvisionRequest::parse(id, device, request).unwrap();
        req.station = Some(station.parse().unwrap());
        self.engine.provision(req)
    }

    fn counters(&self, id: &str) -> Counters {
        keyfab_site::provision::counters(self.site(), id).unwrap()
    }

    fn events(&self) -> Vec<Event> {
        keyfab_site::entitlements::audit_records(self.site())
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .collect()
    }
}

/// The stable code of an answer that must be a refusal.
fn code_of(answer: keyfab_node::Result<Provisioned>) -> String {
    match answer {
        Ok(p) => panic!("{} was given keys", p.device_id),
        Err(e) => e.code().as_str().to_owned(),
    }
}

/// `device` refused with `code` under `id`: the answer, one `provision_denied` record
/// with that code and nothing else, no counter moved, and the same answer to a retry
/// with the same request id — from the record (nothing added) for a final refusal,
/// decided again (one more record) for one that may pass with time or state.
fn refused(w: &World, id: &str, device: &str, code: &str) {
    let (before, counted) = (w.events().len(), w.counters(id));
    let request = format!("refused-{device}");
    assert_eq!(code_of(w.provision(id, device, &request)), code, "{device}");
    let events = w.events();
    assert_eq!(events.len(), before + 1, "{device}: one record");
    match events.last() {
        Some(Event::ProvisionDenied {
            code: recorded,
            device_id,
            ..
        }) => assert_eq!((recorded.as_str(), device_id.as_str()), (code, device)),
        other => panic!("{device}: recorded {other:?}"),
    }
    let after = w.counters(id);
    assert_eq!(
        (after.total, after.next_pool),
        (counted.total, counted.next_pool)
    );
    assert_eq!(code_of(w.provision(id, device, &request)), code, "retried");
    let passes = matches!(
        code,
        "quota_exceeded"
            | "daily_limit_exceeded"
            | "not_yet_valid"
            | "expired"
            | "approval_required"
            | "audit_overdue"
    );
    assert_eq!(
        w.events().len(),
        before + 1 + usize::from(passes),
        "{device}: a retry adds a record only when it is decided again"
    );
}

/// Allowed: keys given, one `provision_allowed` record, one device counted.
fn allowed(w: &World, id: &str, device: &str) -> Provisioned {
    let (before, counted) = (w.events().len(), w.counters(id).total);
    let p = w
        .provision(id, device, &format!("allowed-{device}"))
        .unwrap();
    assert!(!p.replayed && !p.keys.is_empty());
    assert!(matches!(
        w.events()[before..],
        [Event::ProvisionAllowed { .. }]
    ));
    assert_eq!(w.counters(id).total, counted + 1);
    p
}

/// What a case does before its refused request, on its entitlement.
type Setup = dyn Fn(&World, &str);

#[test]
fn every_refusal_code_of_the_policy_is_recorded_and_moves_no_counter() {
    let w = world();
    let cases: Vec<(&str, &str, Box<Setup>)> = vec![
        (
            "quota_exceeded",
            "",
            Box::new(|w: &World, id: &str| {
                for n in 0..3 {
                    allowed(w, id, &format!("Q-{n}"));
                }
            }),
        ),
        (
            "daily_limit_exceeded",
            "[limits]\ndaily = 1\n",
            Box::new(|w: &World, id: &str| {
                allowed(w, id, "L-0");
            }),
        ),
        (
            "device_already_provisioned",
            "",
            Box::new(|w: &World, id: &str| {
                allowed(w, id, "SAME");
            }),
        ),
        (
            "device_id_rejected",
            "[device_ids]\nid_pattern = \"^OK-[0-9]+$\"\n",
            Box::new(|_: &World, _: &str| {}),
        ),
        (
            "station_not_allowed",
            "[stations]\nallowed = [\"line-1\"]\n",
            Box::new(|_: &World, _: &str| {}),
        ),
    ];
    for (code, extra, before) in cases {
        let id = w.entitlement(code, &policy(3, extra), &[]);
        before(&w, &id);
        let device = match code {
            "device_already_provisioned" => "SAME",
            "device_id_rejected" => "NOT-OK",
            _ => "X-1",
        };
        refused(&w, &id, device, code);
    }
    // The day's limit is the day's: tomorrow the same entitlement allows again.
    let daily = w.entitlement("daily-2", &policy(3, "[limits]\ndaily = 1\n"), &[]);
    allowed(&w, &daily, "D-0");
    refused(&w, &daily, "D-1", "daily_limit_exceeded");
    w.set_clock(T0 + DAY);
    allowed(&w, &daily, "D-2");
}

#[test]
fn the_window_the_audit_freshness_and_revocation_refuse_with_their_codes() {
    let w = world();
    // Valid from a day on: refused now, allowed once the day has come.
    let later = w.entitlement(
        "later",
        &policy(3, "").replace("2026-01-01T00:00:00Z", "2026-06-02T00:00:00Z"),
        &[],
    );
    refused(&w, &later, "W-1", "not_yet_valid");
    // Valid until two days on: expired after.
    let short = w.entitlement(
        "short",
        &policy(3, "").replace("2027-01-01T00:00:00Z", "2026-06-03T00:00:00Z"),
        &[],
    );
    let fresh = w.entitlement("fresh", &policy(3, "audit_every_days = 1"), &[]);
    allowed(&w, &fresh, "A-0");
    w.set_clock(T0 + 2 * DAY);
    allowed(&w, &later, "W-1b");
    refused(&w, &fresh, "A-1", "audit_overdue");
    w.set_clock(T0 + 3 * DAY);
    refused(&w, &short, "S-1", "expired");

    let revoked = w.entitlement("revoked", &policy(3, ""), &[]);
    allowed(&w, &revoked, "R-0");
    let kfr = w.kit.dir.path().join("revoked.kfr");
    keyfab_hq::revoke::revoke(&w.kit.hq, &revoked, "line closed", &kfr).unwrap();
    keyfab_site::revocation::import_revocation(w.site(), &std::fs::read(&kfr).unwrap()).unwrap();
    refused(&w, &revoked, "R-1", "revoked");
}

/// An entitlement `name` of 3 devices that a quorum of one approver must activate: its
/// id, and that approver's key.
fn gated_entitlement(w: &World, name: &str) -> (String, SigningKey) {
    let approver = SigningKey::generate(&SystemRng).unwrap();
    let id = w.entitlement(
        name,
        &policy(
            3,
            "[approval]\nthreshold = 1\napprovers = [\"a.pub\"]\nrequired_for = [\"activate\"]\n",
        ),
        &[("a.pub", approver.verifying_key().to_pem().as_bytes())],
    );
    (id, approver)
}

/// `approver` approves activating entitlement `id`, and the site takes the approval.
fn activate(w: &World, id: &str, approver: &SigningKey) {
    let request =
        keyfab_site::approvals::request(w.site(), id, &keyfab_site::approvals::Ask::Activate, 3600)
            .unwrap();
    let approval = keyfab_formats::approval::sign_approval(approver, &request).unwrap();
    keyfab_site::approvals::submit(w.site(), &[approval]).unwrap();
}

#[test]
fn activation_by_quorum_and_policy_modules_decide_in_the_same_step() {
    let w = world();
    let (gated, approver) = gated_entitlement(&w, "gated");
    refused(&w, &gated, "G-1", "approval_required");
    activate(&w, &gated, &approver);
    allowed(&w, &gated, "G-2");

    // A module that allows the first device of the day and refuses the rest, with its
    // reason; one that traps (fail closed).
    let one_a_day = br#"(module
  (import "keyfab" "input" (func $input (param i32) (result i64)))
  (import "keyfab" "deny_reason" (func $deny_reason (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "one a day")
  (func (export "decide") (result i32)
    (if (i64.ge_u (call $input (i32.const 4)) (i64.const 1))
      (then (drop (call $deny_reason (i32.const 0) (i32.const 9))) (return (i32.const 1))))
    (i32.const 0)))"#;
    let traps = br#"(module (memory (export "memory") 1) (func (export "decide") (result i32) unreachable))"#;
    for (name, module, first, code, reason) in [
        (
            "one-a-day",
            &one_a_day[..],
            true,
            "policy_denied",
            "one a day",
        ),
        ("traps", &traps[..], false, "policy_error", ""),
    ] {
        let id = w.entitlement(
            name,
            &policy(3, "[code]\nmodule = \"rules.wat\"\n"),
            &[("rules.wat", module)],
        );
        if first {
            allowed(&w, &id, &format!("{name}-0"));
        }
        let before = w.events().len();
        let answer = w.provision(&id, &format!("{name}-1"), "m-1");
        assert_eq!(code_of(answer), code);
        match &w.events()[before..] {
            [Event::ProvisionDeniedByCode {
                code: recorded,
                reason: why,
                ..
            }] => {
                assert_eq!(recorded, code);
                assert!(why.contains(reason), "{why}");
            }
            other => panic!("{name}: recorded {other:?}"),
        }
    }
}

#[test]
fn an_unknown_entitlement_and_a_clock_out_of_bounds_are_refused_before_any_decision() {
    let w = world();
    let id = w.entitlement("open", &policy(10, ""), &[]);
    allowed(&w, &id, "C-0");
    let before = w.events().len();
    assert_eq!(
        code_of(w.provision("no-such", "C-1", "c-1")),
        "unknown_entitlement"
    );
    assert_eq!(w.events().len(), before, "nothing to record against");

    // Behind the trusted time by more than the tolerance: the whole batch refused, the
    // refusal recorded at the trusted time, which does not move.
    w.set_clock(T0 - 3600);
    assert_eq!(code_of(w.provision(&id, "C-1", "c-1")), "clock_rollback");
    // Ahead by more than the allowed jump (a week): not adopted.
    w.set_clock(T0 + 30 * DAY);
    assert_eq!(code_of(w.provision(&id, "C-1", "c-1")), "clock_ahead");
    let records = keyfab_site::entitlements::audit_records(w.site()).unwrap();
    let new: Vec<_> = records[before..]
        .iter()
        .map(|r| (&r.event, r.time))
        .collect();
    assert!(
        matches!(
            new[..],
            [(Event::ClockRollback { .. }, t1), (Event::ClockAhead { .. }, t2)] if t1 == T0 && t2 == T0
        ),
        "{new:?}"
    );
    assert_eq!(w.counters(&id).total, 1);
    // Back within bounds: decided as usual.
    w.set_clock(T0 + 60);
    allowed(&w, &id, "C-1");
}

#[test]
fn a_retry_is_answered_from_the_record_and_only_to_the_station_that_made_it() {
    let w = world();
    let id = w.entitlement("retry", &policy(10, ""), &[]);
    let first = w.provision_at_station(&id, "P-1", "r-1", "line-1").unwrap();
    let (records, counted) = (w.events().len(), w.counters(&id).total);
    let again = w.provision_at_station(&id, "P-1", "r-1", "line-1").unwrap();
    assert!(again.replayed);
    assert_eq!(again.audit_sequence, first.audit_sequence);
    let ids = |p: &Provisioned| p.keys.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&first));
    assert_eq!(
        (w.events().len(), w.counters(&id).total),
        (records, counted)
    );

    // Another station, or none, with the same request id: refused, audited, nothing
    // stored for the request (its owner's retry still works).
    for station in [Some("line-2"), None] {
        let mut req = ProvisionRequest::parse(&id, "P-1", "r-1").unwrap();
        req.station = station.map(|s| s.parse().unwrap());
        assert_eq!(code_of(w.engine.provision(req)), "station_not_allowed");
    }
    let events = w.events();
    assert!(matches!(
        events[records..],
        [Event::StationMismatch { .. }, Event::StationMismatch { .. }]
    ));
    assert!(
        w.provision_at_station(&id, "P-1", "r-1", "line-1")
            .unwrap()
            .replayed
    );
    // A new request id for the device: already provisioned.
    assert_eq!(
        code_of(w.provision_at_station(&id, "P-1", "r-2", "line-1")),
        "device_already_provisioned"
    );
    assert_eq!(w.counters(&id).total, counted);
    // A refusal belongs to its station too: answered again to it, to no other.
    assert_eq!(
        code_of(w.provision_at_station(&id, "P-1", "r-2", "line-1")),
        "device_already_provisioned"
    );
    assert_eq!(
        code_of(w.provision_at_station(&id, "P-1", "r-2", "line-2")),
        "station_not_allowed"
    );
    assert_eq!(w.counters(&id).total, counted);
}

#[test]
fn confirmations_close_a_device_once_and_only_from_its_station() {
    let w = world();
    let id = w.entitlement("confirm", &policy(10, ""), &[]);
    w.provision_at_station(&id, "K-1", "k-1", "line-1").unwrap();
    let confirm = |device: &str, result, station: &str| {
        w.engine.confirm(
            &id.parse().unwrap(),
            &device.parse().unwrap(),
            result,
            Some(station.parse().unwrap()),
        )
    };
    let before = w.events().len();
    let done = confirm("K-1", Programming::Programmed, "line-1").unwrap();
    assert!(!done.repeated);
    let again = confirm("K-1", Programming::Programmed, "line-1").unwrap();
    assert!(again.repeated && again.audit_sequence == done.audit_sequence);
    let code = |r: keyfab_node::Result<keyfab_site::provision::Confirmed>| match r {
        Ok(c) => panic!("confirmed: {c:?}"),
        Err(e) => e.code().as_str().to_owned(),
    };
    assert_eq!(
        code(confirm("K-1", Programming::Failed, "line-1")),
        "invalid_state"
    );
    assert_eq!(
        code(confirm("K-1", Programming::Failed, "line-2")),
        "station_not_allowed"
    );
    assert_eq!(
        code(confirm("K-9", Programming::Programmed, "line-1")),
        "not_found"
    );
    let events = w.events();
    assert!(
        matches!(
            events[before..],
            [Event::DeviceConfirmed { .. }, Event::StationMismatch { .. }]
        ),
        "{:?}",
        &events[before..]
    );
}

#[test]
fn a_site_that_stopped_itself_releases_nothing_not_even_a_retry() {
    let w = world();
    let id = w.entitlement("latched", &policy(10, ""), &[]);
    allowed(&w, &id, "Z-0");
    keyfab_site::latch::latch(
        w.site(),
        keyfab_site::latch::Cause::RollbackDetected,
        "a test",
    )
    .unwrap();
    let before = (w.events().len(), w.counters(&id).total);
    for (device, request) in [("Z-0", "allowed-Z-0"), ("Z-1", "z-1")] {
        let e = w.provision(&id, device, request).unwrap_err();
        assert!(matches!(e, Error::RollbackDetected(_)), "{e}");
    }
    assert_eq!((w.events().len(), w.counters(&id).total), before);
}

/// On a shared store a node decides against its reservation: a block of the quota and
/// the pool slots with it. One node takes what it needs; a second node, started on the
/// same state, gets the rest once the first idles and gives its unused grant back; the
/// quota holds exactly, no pool slot is taken twice, and the refusal past the quota is
/// `quota_exceeded` on either node.
#[test]
fn nodes_decide_against_reservations_and_the_quota_holds_exactly_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = keyfab_harness::etcd::EtcdCluster::start(1, &dir.path().join("etcd")).unwrap();
    let store = StoreChoice::parse(&etcd.store_spec(), "shenzhen-1").unwrap();
    let w = World::of(keyfab_testkit::World::on(
        dir,
        &store,
        &keyfab_backends::Linked,
    ));
    let id = w.entitlement(
        "pooled",
        "product = \"p\"\ndevices = 4\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2027-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\n",
        &[],
    );
    let first = w.provision(&id, "N-0", "n-0").unwrap();
    // The first node holds a block: the ledger counts all of it as granted.
    let held = keyfab_site::provision::reservations(w.site(), &id).unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!((held[0].granted, held[0].used), (4, 1), "{held:?}");

    // A second node: the same state, its own engine and chain.
    let second_home = w.kit.dir.path().join("second");
    keyfab_node::home::create_private_dir(&second_home).unwrap();
    for f in std::fs::read_dir(w.kit.site_home()).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, second_home.join(f.file_name().unwrap())).unwrap();
        }
    }
    let second = Provisioner::start(Arc::new(
        Node::open(
            &second_home,
            NodeKind::Site,
            &pass(),
            Box::new(SystemRng),
            Box::new(w.kit.clock.clone()),
            &keyfab_backends::Linked,
        )
        .unwrap(),
    ));
    // Waits while the first node holds the rest, and gets it once that one idles.
    let mut keys = vec![first.keys[0].key_id.clone()];
    for n in 1..4 {
        let p = second
            .provision(ProvisionRequest::parse(&id, format!("N-{n}"), format!("n-{n}")).unwrap())
            .unwrap();
        keys.push(p.keys[0].key_id.clone());
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 4, "no pool key twice");
    assert_eq!(code_of(w.provision(&id, "N-4", "n-4")), "quota_exceeded");
    assert_eq!(
        code_of(second.provision(ProvisionRequest::parse(&id, "N-5", "n-5").unwrap())),
        "quota_exceeded"
    );
    let counted = w.counters(&id);
    assert_eq!((counted.total, counted.next_pool), (4, 4));
    drop(second);
}

/// A retry replays only what cannot change: a refusal that passes with time or state
/// (`daily_limit_exceeded`, `not_yet_valid`) is decided again when the same request id
/// comes back after it passed — and released then, once, then replayed; a permanent one
/// (`device_id_rejected`) is answered from its record, adding nothing. HQ, replaying the
/// whole log, finds nothing wrong with either.
#[test]
fn a_retry_decides_again_what_passes_and_replays_what_cannot_change() {
    let w = world();
    let daily = w.entitlement(
        "daily-retry",
        &policy(
            5,
            "[limits]\ndaily = 1\n[device_ids]\nid_pattern = \"^D-[0-9]+$\"\n",
        ),
        &[],
    );
    allowed(&w, &daily, "D-0");
    assert_eq!(
        code_of(w.provision(&daily, "D-1", "r-d1")),
        "daily_limit_exceeded"
    );
    // Still today: the refusal stands (decided again, refused again).
    assert_eq!(
        code_of(w.provision(&daily, "D-1", "r-d1")),
        "daily_limit_exceeded"
    );
    let later = w.entitlement(
        "later-retry",
        &policy(3, "").replace("2026-01-01T00:00:00Z", "2026-06-02T00:00:00Z"),
        &[],
    );
    assert_eq!(code_of(w.provision(&later, "W-1", "r-w1")), "not_yet_valid");

    // A permanent refusal: the same answer from its record, nothing recorded.
    assert_eq!(
        code_of(w.provision(&daily, "BAD", "r-bad")),
        "device_id_rejected"
    );
    let records = w.events().len();
    assert_eq!(
        code_of(w.provision(&daily, "BAD", "r-bad")),
        "device_id_rejected"
    );
    assert_eq!(w.events().len(), records, "a permanent refusal is replayed");

    // The next day both pass: the same request ids get keys, once.
    w.set_clock(T0 + DAY);
    let counted = w.counters(&daily).total;
    let released = w.provision(&daily, "D-1", "r-d1").unwrap();
    assert!(!released.replayed, "decided again, not replayed");
    assert_eq!(w.counters(&daily).total, counted + 1);
    let again = w.provision(&daily, "D-1", "r-d1").unwrap();
    assert!(again.replayed);
    assert_eq!(again.audit_sequence, released.audit_sequence);
    let ids = |p: &Provisioned| p.keys.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&released));
    assert!(!w.provision(&later, "W-1", "r-w1").unwrap().replayed);

    // HQ replays the whole log, refusals and second decisions alike: nothing wrong.
    let kfa = w.kit.dir.path().join("retries.kfa");
    keyfab_site::export::export(w.site(), &kfa, false, None).unwrap();
    let imported = keyfab_hq::audit::import(&w.kit.hq, &kfa, None).unwrap();
    assert!(imported.violations.is_empty(), "{:?}", imported.violations);
}

/// The other refusals that pass with state or time, retried with the same request id:
/// `approval_required` passes once the quorum approved, `audit_overdue` once HQ's receipt
/// is imported — each then gets keys, once —; `expired` and `quota_exceeded` are decided
/// again (and refused again here), recorded a second time rather than replayed.
/// HQ's replay of the log agrees with every one of these decisions.
#[test]
fn approval_receipt_and_window_refusals_are_decided_again_on_a_retry() {
    let w = world();
    let (gated, approver) = gated_entitlement(&w, "gated-retry");
    assert_eq!(
        code_of(w.provision(&gated, "G-1", "r-g1")),
        "approval_required"
    );
    activate(&w, &gated, &approver);
    let released = w.provision(&gated, "G-1", "r-g1").unwrap();
    assert!(!released.replayed, "decided again once approved");
    assert!(w.provision(&gated, "G-1", "r-g1").unwrap().replayed);

    let audited = w.entitlement("audited-retry", &policy(3, "audit_every_days = 1\n"), &[]);
    let ending = w.entitlement(
        "ending-retry",
        &policy(3, "").replace("2027-01-01T00:00:00Z", "2026-06-02T00:00:00Z"),
        &[],
    );
    w.set_clock(T0 + 2 * DAY);
    assert_eq!(
        code_of(w.provision(&audited, "A-1", "r-a1")),
        "audit_overdue"
    );
    assert_eq!(code_of(w.provision(&ending, "E-1", "r-e1")), "expired");
    let records = w.events().len();
    assert_eq!(code_of(w.provision(&ending, "E-1", "r-e1")), "expired");
    assert_eq!(
        w.events().len(),
        records + 1,
        "decided again, recorded again"
    );
    // The quota, likewise: decided again on a retry (a quota given back would pass it).
    let small = w.entitlement("small-retry", &policy(1, ""), &[]);
    w.provision(&small, "Q-1", "r-q1").unwrap();
    assert_eq!(
        code_of(w.provision(&small, "Q-2", "r-q2")),
        "quota_exceeded"
    );
    let records = w.events().len();
    assert_eq!(
        code_of(w.provision(&small, "Q-2", "r-q2")),
        "quota_exceeded"
    );
    assert_eq!(
        w.events().len(),
        records + 1,
        "decided again, recorded again"
    );

    // HQ acknowledges the audit: the same request id gets keys now.
    let kfa = w.kit.dir.path().join("overdue.kfa");
    keyfab_site::export::export(w.site(), &kfa, false, None).unwrap();
    let imported = keyfab_hq::audit::import(&w.kit.hq, &kfa, None).unwrap();
    assert!(imported.violations.is_empty(), "{:?}", imported.violations);
    let head = imported.head.unwrap();
    let receipt =
        keyfab_hq::receipts::acknowledge(&w.kit.hq, &imported.site, head, imported.checkpoint_time)
            .unwrap();
    keyfab_site::checkpoints::import_receipt(w.site(), &receipt).unwrap();
    let released = w.provision(&audited, "A-1", "r-a1").unwrap();
    assert!(!released.replayed, "decided again once acknowledged");

    // HQ replays the rest of the log: nothing wrong.
    let kfa = w.kit.dir.path().join("after.kfa");
    keyfab_site::export::export(w.site(), &kfa, false, None).unwrap();
    let imported = keyfab_hq::audit::import(&w.kit.hq, &kfa, None).unwrap();
    assert!(imported.violations.is_empty(), "{:?}", imported.violations);
}
