//! Tier A of rollback detection: a site's state bound to a TPM 2.0 monotonic counter
//! (`site init --rollback-counter`), against a real TPM simulator (`swtpm`) on loopback.

use crate::common::*;
use keyfab_harness::swtpm::Swtpm;

const POLICY_T: &str = "product = \"p\"\ndevices = 200\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
     [[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n";

/// A site bound to a counter in `tpm`, registered at HQ, with an entitlement of
/// POLICY_T imported: the world and the entitlement's id.
fn bound_world(tpm: &Swtpm) -> (World, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = tpm.tcti().rsplit('=').next().unwrap().to_owned();
    let spec = format!("tpm:swtpm=127.0.0.1:{port}");
    let root = root(d, "root");
    let hq = node(d, &root, "hq", "acme-hq");
    let (site, _) = node_with(
        d,
        &root,
        "site",
        "shenzhen-1",
        &["--rollback-counter", &spec],
        |report| {
            let bound = &report["rollback_counter"];
            assert_eq!(
                bound["spec"],
                format!("{spec},index=0x01004b46"),
                "{report}"
            );
            assert!(bound["value"].as_u64().is_some(), "{report}");
            Vec::new()
        },
    );
    register(d, &hq, &site);
    let w = World {
        dir,
        root,
        hq,
        site,
    };
    let policy = w.path("p.toml");
    std::fs::write(&policy, POLICY_T).unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "p.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    (w, id)
}

fn lot(w: &World, id: &str, prefix: &str, n: usize) -> serde_json::Value {
    let ids: Vec<String> = (1..=n).map(|i| format!("{prefix}-{i}")).collect();
    provision_lot(w, id, &ids, &w.path(&format!("{prefix}.jsonl")), &[])
}

/// A TPM simulator with its state in a directory of its own, and a site bound to it
/// (`bound_world`): the directory, the simulator, the world and the entitlement's id.
fn tpm_and_world() -> (tempfile::TempDir, Swtpm, World, String) {
    let tpm_dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&tpm_dir.path().join("state")).unwrap();
    let (w, id) = bound_world(&tpm);
    (tpm_dir, tpm, w, id)
}

/// The site's last audit record's event.
fn last_event(w: &World) -> keyfab_audit::Event {
    let records = keyfab_site::entitlements::audit_records(&open_site(&w.site)).unwrap();
    records.last().unwrap().event.clone()
}

/// A copy of the home, put back after 50 more devices: the first provisioning is refused
/// `rollback_detected` at once — nothing released, the refusal audited — and again after
/// a restart. The counter itself survives a restart of the TPM.
#[test]
fn a_home_put_back_is_refused_at_once() {
    let (_tpm_dir, mut tpm, w, id) = tpm_and_world();
    lot(&w, &id, "A", 10);
    let copy = w.path("copy");
    copy_home(&w.site, &copy);
    // The TPM restarts (its state file keeps the counter): the site goes on.
    tpm.restart().unwrap();
    assert_eq!(lot(&w, &id, "B", 50)["provisioned"], 50);

    copy_home(&copy, &w.site);
    for _ in 0..2 {
        let o = provision(&w, &id, "C-1", &[], None);
        o.assert_error(4, "rollback_detected", "older copy put back");
        assert!(o.json.get("keys").is_none(), "{}", o.json);
    }
    assert!(
        matches!(last_event(&w), keyfab_audit::Event::SiteLatched { ref code, ref reason } if code == "rollback_detected" && reason.contains("TPM")),
        "{:?}",
        last_event(&w)
    );
    // Served, it refuses to start.
    let o = serve_refused(&w.site);
    assert_eq!(o.json["error"]["code"], "rollback_detected", "{}", o.json);
}

/// A TPM that answers lower than the state recorded (its own state put back), or none at
/// all: nothing is released.
#[test]
fn a_tpm_behind_the_state_or_gone_releases_nothing() {
    let tpm_dir = tempfile::tempdir().unwrap();
    let mut tpm = Swtpm::start(&tpm_dir.path().join("state")).unwrap();
    let (w, id) = bound_world(&tpm);
    let older = tpm_dir.path().join("older");
    copy_dir(tpm.state_dir(), &older);
    lot(&w, &id, "A", 5);

    tpm.stop();
    let o = provision(&w, &id, "D-1", &[], None);
    o.assert_error(1, "tpm_unavailable", "no TPM answers");
    let before = snapshot(&w.site);
    assert_eq!(provision(&w, &id, "D-1", &[], None).code, 1);
    assert_eq!(
        before,
        snapshot(&w.site),
        "a refusal for want of the TPM changed the site"
    );

    std::fs::remove_dir_all(tpm.state_dir()).unwrap();
    copy_dir(&older, tpm.state_dir());
    tpm.restart().unwrap();
    provision(&w, &id, "D-1", &[], None).assert_error(
        4,
        "rollback_detected",
        "not the one this state was bound to",
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// HQ reads the counter values the site's log records: an honest site's only go up (no
/// violation); a log whose counter goes back is flagged.
#[test]
fn hq_flags_a_counter_that_goes_back() {
    use keyfab_audit::Event;
    let (tpm_dir, _tpm, w, id) = tpm_and_world();
    lot(&w, &id, "A", 3);
    lot(&w, &id, "B", 3);
    let records = keyfab_site::entitlements::audit_records(&open_site(&w.site)).unwrap();
    let values: Vec<u64> = records
        .iter()
        .filter_map(|r| match r.event {
            Event::RollbackCounterAdvanced { value } => Some(value),
            _ => None,
        })
        .collect();
    assert_eq!(values.len(), 2, "one advance per lot: {values:?}");
    assert_eq!(values[1], values[0] + 1);
    hq_finds_no_violations(&w, "honest.kfa");

    // Another site's log, signed by it, whose counter goes back.
    let sibling = tpm_sibling(&tpm_dir);
    let (other, _) = bound_world(&sibling);
    let now = jiff::Timestamp::now().as_second();
    let events = vec![
        (now, Event::RollbackCounterAdvanced { value: 7 }),
        (now, Event::RollbackCounterAdvanced { value: 8 }),
        (now, Event::RollbackCounterAdvanced { value: 5 }),
    ];
    let violations = hq_violations_in_forged_log(&other, events);
    let kinds: Vec<(&str, u64)> = violations
        .iter()
        .map(|v| (v["kind"].as_str().unwrap(), v["sequence"].as_u64().unwrap()))
        .collect();
    assert_eq!(kinds, [("rollback_counter_regressed", 3)], "{violations:?}");
}

/// A second simulator beside the first (another machine's TPM).
fn tpm_sibling(dir: &tempfile::TempDir) -> Swtpm {
    Swtpm::start(&dir.path().join("sibling")).unwrap()
}

/// A serving site advances its counter when it starts, then at most every
/// `--rollback-counter-every` seconds while keys go out — and not while it is idle.
#[test]
fn a_serving_site_advances_while_keys_go_out_and_not_when_idle() {
    use keyfab_audit::Event;
    let (_tpm_dir, _tpm, w, id) = tpm_and_world();
    let line1 = w.path("line-1");
    enroll(&w.site, "line-1", &line1);
    let advances = || {
        keyfab_site::entitlements::audit_records(&open_site(&w.site))
            .unwrap()
            .iter()
            .filter(|r| matches!(r.event, Event::RollbackCounterAdvanced { .. }))
            .count()
    };
    let server = Server::start_with(&w.site, &["--rollback-counter-every", "1"]);
    let started = std::time::Instant::now();
    for i in 0..6 {
        let device = format!("S-{i}");
        let o = station_provision(&server.url(), &line1, &id, &device, &format!("r-{i}"));
        assert_eq!(o.code, 0, "{}", o.json);
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let busy_secs = started.elapsed().as_secs();
    // Idle for a while: nothing more is written.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (code, _) = server.stop();
    assert_eq!(code, 0);
    let busy = advances();
    // One at the start, then at most one a second while releases went on (and one
    // more for the last of them), never one per device.
    let most = usize::try_from(busy_secs).unwrap() + 2;
    assert!(
        (3..=most).contains(&busy),
        "{busy} advances in {busy_secs} s"
    );
    let server = Server::start_with(&w.site, &["--rollback-counter-every", "1"]);
    std::thread::sleep(std::time::Duration::from_millis(3000));
    server.stop();
    // The start's, and none while idle.
    assert_eq!(advances(), busy + 1);
}

/// A checkpoint advances the counter and carries its value, signed.
#[test]
fn a_checkpoint_carries_the_counter() {
    let (_tpm_dir, _tpm, w, id) = tpm_and_world();
    lot(&w, &id, "A", 2);
    let out = w.path("c.kfc");
    let first = checkpoint(&w.site, &out);
    let second = checkpoint(&w.site, &w.path("d.kfc"));
    let (a, b) = (
        first["rollback_counter"].as_u64().unwrap(),
        second["rollback_counter"].as_u64().unwrap(),
    );
    assert_eq!(b, a + 1, "{first} {second}");
    let bytes = std::fs::read(&out).unwrap();
    let site = open_site(&w.site);
    let c = keyfab_formats::checkpoint::verify_checkpoint(
        &bytes,
        &site.root_cert().unwrap(),
        site.now(),
    )
    .unwrap()
    .into_inner();
    assert_eq!(c.rollback_counter, Some(a));
}

/// A TPM that stops answering while the site serves stops the releases
/// (`tpm_unavailable`, retryable) until it answers again: keeping the TPM away does not
/// widen the window in which a copy of the home goes unnoticed.
#[test]
fn a_serving_site_releases_nothing_while_its_tpm_is_gone() {
    let (_tpm_dir, mut tpm, w, id) = tpm_and_world();
    let line1 = w.path("line-1");
    enroll(&w.site, "line-1", &line1);
    let server = Server::start_with(&w.site, &["--rollback-counter-every", "1"]);
    let ask = |i: usize| {
        station_provision(
            &server.url(),
            &line1,
            &id,
            &format!("G-{i}"),
            &format!("g-{i}"),
        )
    };
    assert_eq!(ask(0).code, 0);
    tpm.stop();
    // Within a few advance intervals the releases stop.
    let refused = (1..40).find_map(|i| {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let o = ask(i);
        (o.code != 0).then_some(o)
    });
    let refused = refused.expect("releases went on without the TPM");
    assert_eq!(
        refused.json["error"]["code"], "tpm_unavailable",
        "{}",
        refused.json
    );
    tpm.restart().unwrap();
    let again = (100..140).find_map(|i| {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let o = ask(i);
        (o.code == 0).then_some(o)
    });
    assert!(
        again.is_some(),
        "releases did not resume once the TPM answered"
    );
    let (code, _) = server.stop();
    assert_eq!(code, 0);
}

/// `meta/tpm_counter` as FORMATS.md §9 lays it out, for editing it as someone with the
/// disk could.
#[derive(serde::Serialize, serde::Deserialize)]
struct CounterRow {
    spec: String,
    auth: serde_bytes::ByteBuf,
    value: u64,
    pending: bool,
}

/// Sets the state's counter value one ahead of the TPM's, marked pending or not.
fn one_ahead(w: &World, pending: bool) {
    use keyfab_store::{Table, Txn};
    let node = open_site(&w.site);
    let stored = node
        .store
        .get(Table::Meta, b"tpm_counter")
        .unwrap()
        .unwrap();
    let mut row: CounterRow = keyfab_node::decode(&stored.value).unwrap();
    row.value += 1;
    row.pending = pending;
    let mut txn = Txn::default();
    txn.put(
        Table::Meta,
        b"tpm_counter",
        &keyfab_node::encode(&row).unwrap(),
    );
    assert!(node.store.commit(txn).unwrap().is_committed());
}

/// An advance that stopped between its two steps (the state recorded the next value,
/// the TPM had not stepped) is completed at the next check; the same gap without the
/// mark an advance leaves is a TPM behind the state.
#[test]
fn an_interrupted_advance_is_completed_and_only_that() {
    let (_tpm_dir, _tpm, w, id) = tpm_and_world();
    lot(&w, &id, "A", 2);
    one_ahead(&w, true);
    assert_eq!(provision(&w, &id, "E-1", &[], None).code, 0);
    // Completed: the TPM stepped, the next check passes as well.
    assert_eq!(provision(&w, &id, "E-2", &[], None).code, 0);
    one_ahead(&w, false);
    provision(&w, &id, "E-3", &[], None).assert_error(4, "rollback_detected", "is not the one");
}
