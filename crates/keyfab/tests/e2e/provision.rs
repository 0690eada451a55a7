//! Provisioning through the real engine and binary: limits under concurrency, every
//! refusal code this stage can produce, idempotent retries, key sources and their
//! certificates, and no released private key left in clear in the site's home.

use crate::common::*;
use keyfab_site::provision::{ProvisionRequest, Provisioner};
use std::collections::HashSet;
use std::sync::Arc;

fn policy_file(w: &World, name: &str, body: &str) -> std::path::PathBuf {
    let p = w.path(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn entitlement(w: &World, name: &str, body: &str) -> String {
    let policy = policy_file(w, &format!("{name}.toml"), body);
    let (out, id) = create_from(w, "shenzhen-1", &policy, &format!("{name}.kfe"));
    assert_eq!(import(&w.site, &out, None).code, 0);
    id
}

/// `callers` threads provisioning at once, caller `t` sending `requests(t)` one after
/// another: every outcome, caller by caller.
fn from_threads(
    provisioner: &Arc<Provisioner>,
    callers: usize,
    requests: impl Fn(usize) -> Vec<ProvisionRequest> + Sync,
) -> Vec<keyfab_node::Result<keyfab_site::provision::Provisioned>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..callers)
            .map(|t| {
                let (p, requests) = (provisioner.clone(), &requests);
                scope.spawn(move || {
                    requests(t)
                        .into_iter()
                        .map(|r| p.provision(r))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

const HEADER: &str = r#"
product = "p"
valid_from  = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"
"#;

#[test]
fn sixty_four_threads_never_exceed_the_daily_limit() {
    let w = world();
    let id = entitlement(&w, "conc", &format!("{HEADER}devices = 1000\n[limits]\ndaily = 100\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\ncertificate = {{ subject = \"CN={{device_id}}\", days = 30 }}\n"));
    let provisioner = Arc::new(Provisioner::start(Arc::new(open_site(&w.site))));
    let results = from_threads(&provisioner, 64, |t| {
        (0..1000)
            .filter(|i| i % 64 == t)
            .map(|i| ProvisionRequest::parse(&id, format!("D-{i:05}"), format!("r-{i}")).unwrap())
            .collect()
    });
    let allowed: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let denied: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(allowed.len(), 100);
    assert_eq!(denied.len(), 900);
    assert!(
        denied
            .iter()
            .all(|e| e.code().as_str() == "daily_limit_exceeded"),
        "{:?}",
        denied.first()
    );
    // No pool key went to two devices.
    let keys: HashSet<_> = allowed.iter().map(|p| p.keys[0].key_id.clone()).collect();
    assert_eq!(keys.len(), 100);
    // One request at a time, each decision is its own commit and its own audit row:
    // the log now spans more rows than one page of the store scan, so reading it back
    // below also checks that the paged reader neither drops nor repeats a row.
    for i in 0..100 {
        let denied = provisioner.provision(
            ProvisionRequest::parse(&id, format!("E-{i:05}"), format!("e-{i}")).unwrap(),
        );
        assert!(denied.is_err());
    }
    // Counters agree with the audit log, and the log verifies.
    let node = provisioner.node();
    let counters = keyfab_site::provision::counters(node, &id).unwrap();
    let records = keyfab_site::entitlements::audit_records(node).unwrap();
    keyfab_audit::verify_chain(&keyfab_audit::Head::genesis(), &records).unwrap();
    let allowed_records = records
        .iter()
        .filter(|r| matches!(r.event, keyfab_audit::Event::ProvisionAllowed { .. }))
        .count();
    let denied_records = records
        .iter()
        .filter(|r| matches!(r.event, keyfab_audit::Event::ProvisionDenied { .. }))
        .count();
    assert_eq!(counters.total, 100);
    assert_eq!(counters.next_pool, 100);
    assert_eq!(allowed_records, 100);
    assert_eq!(denied_records, 1000);
    assert_eq!(counters.days.values().sum::<u64>(), 100);
}

fn refused(o: &Out, code: &str) {
    assert_eq!(o.code, 3, "{}", o.json);
    assert_eq!(o.json["error"]["code"], code, "{}", o.json);
}

#[test]
fn every_refusal_code_of_this_stage() {
    let w = world();
    let id = entitlement(&w, "codes", &format!("{HEADER}devices = 3\naudit_every_days = 3650\n[limits]\ndaily = 2\n[device_ids]\nid_pattern = \"^D-[0-9]+$\"\n[stations]\nallowed = [\"line-1\"]\n[[keys]]\nname = \"k\"\ntype = \"ed25519\"\nsource = \"site\"\n"));
    let line1: &[&str] = &["--station", "line-1"];
    refused(
        &provision(&w, &id, "X-1", line1, None),
        "device_id_rejected",
    );
    refused(
        &provision(&w, &id, "D-1", &["--station", "line-9"], None),
        "station_not_allowed",
    );
    refused(&provision(&w, &id, "D-1", &[], None), "station_not_allowed");
    let future = entitlement(
        &w,
        "future",
        &format!(
            "{}devices = 3\n[[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n",
            HEADER.replace("2026-01-01", "2029-06-01")
        ),
    );
    refused(&provision(&w, &future, "D-1", &[], None), "not_yet_valid");
    assert_eq!(provision(&w, &id, "D-1", line1, None).code, 0);
    refused(
        &provision(&w, &id, "D-1", line1, None),
        "device_already_provisioned",
    );
    assert_eq!(provision(&w, &id, "D-2", line1, None).code, 0);
    refused(
        &provision(&w, &id, "D-3", line1, None),
        "daily_limit_exceeded",
    );
    // The next day in the zone (UTC): one more fits, then the quota is spent.
    let tomorrow = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(24))
        .unwrap()
        .to_string();
    assert_eq!(provision(&w, &id, "D-3", line1, Some(&tomorrow)).code, 0);
    refused(
        &provision(&w, &id, "D-4", line1, Some(&tomorrow)),
        "quota_exceeded",
    );
    // Within the configured tolerance a clock a little behind is accepted; beyond it,
    // provisioning stops, and that is audited.
    let hour_behind = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(23))
        .unwrap()
        .to_string();
    refused(
        &provision(&w, &id, "D-4", line1, Some(&hour_behind)),
        "clock_rollback",
    );
    let o = keyfab(
        &[
            "site",
            "config",
            "--home",
            &s(&w.site),
            "--clock-tolerance",
            "7200",
        ],
        None,
    );
    assert_eq!(o.json["clock_tolerance"], 7200, "{}", o.json);
    assert_eq!(
        keyfab(
            &[
                "site",
                "config",
                "--home",
                &s(&w.site),
                "--clock-tolerance=-1"
            ],
            None
        )
        .code,
        1
    );
    let usage = keyfab(
        &[
            "site",
            "config",
            "--home",
            &s(&w.site),
            "--clock-tolerance",
            "-1",
        ],
        None,
    );
    assert_eq!(
        (usage.code, usage.json["error"]["code"].as_str()),
        (2, Some("usage")),
        "{}",
        usage.json
    );
    refused(
        &provision(&w, &id, "D-4", line1, Some(&hour_behind)),
        "quota_exceeded",
    );
    ok(&[
        "site",
        "config",
        "--home",
        &s(&w.site),
        "--clock-tolerance",
        "300",
    ]);
    let o = provision(&w, &id, "D-4", line1, Some("2026-11-20T00:00:00Z"));
    refused(&o, "clock_rollback");
    let records = keyfab_site::entitlements::audit_records(&open_site(&w.site)).unwrap();
    assert!(
        matches!(
            records.last().unwrap().event,
            keyfab_audit::Event::ClockRollback { .. }
        ),
        "the rollback is audited"
    );
    keyfab_audit::verify_chain(&keyfab_audit::Head::genesis(), &records).unwrap();
    refused(
        &provision(&w, "0123456789abcdef0123456789abcdef", "D-1", line1, None),
        "unknown_entitlement",
    );

    // A drill to the end of the window: the clock moves years ahead, which the site
    // adopts only once it is told to (a week by default).
    refused(
        &provision(&w, &id, "D-5", line1, Some("2031-01-01T00:00:00Z")),
        "clock_ahead",
    );
    ok(&[
        "site",
        "config",
        "--home",
        &s(&w.site),
        "--clock-max-jump",
        "315360000",
    ]);
    let expiring = entitlement(&w, "exp", &format!("{HEADER}devices = 3\n[[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n"));
    refused(
        &provision(&w, &expiring, "D-1", &[], Some("2031-01-01T00:00:00Z")),
        "expired",
    );

    let overdue = entitlement(&w, "overdue", &format!("{HEADER}devices = 3\naudit_every_days = 1\n[[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n"));
    refused(
        &provision(&w, &overdue, "D-1", &[], Some("2032-01-01T00:00:00Z")),
        "audit_overdue",
    );

    let approver = w.path("alice");
    ok(&["approver", "keygen", "--out", &s(&approver)]);
    let gated = entitlement(&w, "gated", &format!("{HEADER}devices = 3\n[[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n[approval]\nthreshold = 1\napprovers = [\"alice.pub\"]\nrequired_for = [\"activate\"]\n"));
    refused(
        &provision(&w, &gated, "D-1", &[], Some("2032-01-01T00:00:00Z")),
        "approval_required",
    );
}

#[test]
fn retries_are_idempotent_and_every_source_certifies() {
    let w = world();
    let body = format!(
        "{HEADER}devices = 5\n\
         [[keys]]\nname = \"pool\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\ncertificate = {{ subject = \"CN={{device_id}},O=Acme\", days = 365 }}\n\
         [[keys]]\nname = \"site\"\ntype = \"ed25519\"\nsource = \"site\"\ncertificate = {{ subject = \"CN={{device_id}},OU=site\", days = 365 }}\n\
         [[keys]]\nname = \"own\"\ntype = \"ec-p256\"\nsource = \"device\"\ncertificate = {{ subject = \"CN={{device_id}},OU=device\", days = 365 }}\n\
         [[keys]]\nname = \"fw\"\ntype = \"aes-256\"\nsource = \"derived\"\n"
    );
    let id = entitlement(&w, "sources", &body);
    let csr = w.path("dev.csr");
    let key = w.path("dev.key");
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=ignored",
            "-keyout",
            &s(&key),
            "-out",
            &s(&csr),
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let args = ["--request-id", "req-1", "--csr", csr.to_str().unwrap()];
    let first = provision(&w, &id, "DEV-1", &args, None);
    assert_eq!(first.code, 0, "{}", first.json);
    let again = provision(&w, &id, "DEV-1", &args, None);
    assert_eq!(again.code, 0, "{}", again.json);
    assert_eq!(again.json["replayed"], true);
    assert_eq!(
        first.json["keys"], again.json["keys"],
        "a retry must return the same keys"
    );
    assert_eq!(first.json["audit_sequence"], again.json["audit_sequence"]);
    // Request ids belong to their device: the same id for another device is a new
    // request of that device, never the first device's keys.
    let other = provision(&w, &id, "DEV-2", &args, None);
    assert_eq!(other.code, 0, "{}", other.json);
    assert_ne!(
        other.json["keys"][0]["key_id"],
        first.json["keys"][0]["key_id"]
    );

    // Every certificate verifies against the root with the returned chain.
    let chain = w.path("chain.pem");
    std::fs::write(
        &chain,
        first.json["chain_pem"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect::<String>(),
    )
    .unwrap();
    let mut serials = HashSet::new();
    for k in first.json["keys"].as_array().unwrap() {
        let name = k["name"].as_str().unwrap();
        match name {
            "fw" => {
                assert!(k["secret_base64"].is_string());
                assert!(k["key_id"].as_str().unwrap().starts_with("kcv:"));
                continue;
            }
            "own" => assert!(
                k.get("private_key_pem").is_none(),
                "a device key never leaves the device"
            ),
            _ => assert!(k["private_key_pem"].is_string()),
        }
        let cert = w.path(&format!("{name}.crt"));
        std::fs::write(&cert, k["certificate_pem"].as_str().unwrap()).unwrap();
        let v = std::process::Command::new("openssl")
            .args([
                "verify",
                "-CAfile",
                &s(&w.root.join("root.crt")),
                "-untrusted",
                &s(&chain),
                &s(&cert),
            ])
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        let text = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-serial", "-in", &s(&cert)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout).into_owned();
        assert!(text.contains("CN = DEV-1"), "{text}");
        serials.insert(
            text.lines()
                .find(|l| l.starts_with("serial="))
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(serials.len(), 3, "serials must be unique");

    // A CSR whose signature does not verify (no proof of possession) is refused.
    let pem = std::fs::read_to_string(&csr).unwrap();
    let der = keyfab_crypto::x509::from_pem(&pem, "CERTIFICATE REQUEST").unwrap();
    let mut bad = der.clone();
    let n = bad.len();
    bad[n - 5] ^= 1;
    let bad_csr = w.path("bad.csr");
    std::fs::write(&bad_csr, &bad).unwrap();
    let o = provision(
        &w,
        &id,
        "DEV-3",
        &["--csr", bad_csr.to_str().unwrap()],
        None,
    );
    assert_eq!(o.code, 1, "{}", o.json);
    assert_eq!(o.json["error"]["code"], "invalid_input");
}

/// The 32 bytes after the first OCTET STRING of length 32 in a PKCS#8: the private
/// scalar (P-256) or seed (Ed25519).
fn private_scalar(pkcs8: &[u8]) -> Vec<u8> {
    let at = pkcs8.windows(2).position(|w| w == [0x04, 0x20]).unwrap() + 2;
    pkcs8[at..at + 32].to_vec()
}

#[test]
fn released_private_keys_are_not_in_the_site_home() {
    let w = world();
    let id = entitlement(&w, "scan", &format!("{HEADER}devices = 40\n[[keys]]\nname = \"a\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\n[[keys]]\nname = \"b\"\ntype = \"ed25519\"\nsource = \"site\"\n[[keys]]\nname = \"c\"\ntype = \"aes-256\"\nsource = \"derived\"\n"));
    let provisioner = Provisioner::start(Arc::new(open_site(&w.site)));
    let mut secrets = HashSet::new();
    for i in 0..40 {
        let p = provisioner
            .provision(ProvisionRequest::parse(&id, format!("S-{i}"), format!("s-{i}")).unwrap())
            .unwrap();
        for k in &p.keys {
            let raw = k.private.as_ref().unwrap().expose().to_vec();
            let secret = if k.key_type.is_asymmetric() {
                private_scalar(&raw)
            } else {
                raw
            };
            secrets.insert(secret[..16].to_vec());
        }
    }
    drop(provisioner);
    assert_eq!(secrets.len(), 120);
    let mut stack = vec![w.site.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            for win in std::fs::read(&p).unwrap().windows(16) {
                assert!(
                    !secrets.contains(win),
                    "released key bytes found in {}",
                    p.display()
                );
            }
        }
    }
}

/// Pool keys are made ahead of the decisions, each for the slot its request is expected
/// to take; refusals between them shift the slots. Whatever the mix, every device gets
/// exactly the keys HQ put in the slot its decision took (HQ checks each against its
/// pool), and no slot twice.
#[test]
fn pool_keys_made_ahead_go_to_the_slot_each_decision_takes() {
    let w = world();
    let id = entitlement(&w, "ahead", &format!("{HEADER}devices = 1000\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\ncertificate = {{ subject = \"CN={{device_id}}\", days = 30 }}\n[[keys]]\nname = \"signing\"\ntype = \"ed25519\"\nsource = \"hq-pool\"\n"));
    let provisioner = Arc::new(Provisioner::start(Arc::new(open_site(&w.site))));
    // 32 callers; every third request names a device another caller asks for too, under
    // its own request id, so refusals (already provisioned) fall between allowed
    // requests inside the batches.
    let results = from_threads(&provisioner, 32, |t| {
        (0..30)
            .map(|i| {
                let device = if i % 3 == 0 {
                    format!("S-{:03}", (t + 1) % 32 * 30 + i + 1)
                } else {
                    format!("S-{:03}", t * 30 + i)
                };
                ProvisionRequest::parse(&id, &device, format!("t{t}-{i}")).unwrap()
            })
            .collect()
    });
    let allowed: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let refused = results.iter().filter_map(|r| r.as_ref().err());
    assert!(refused
        .clone()
        .all(|e| e.code().as_str() == "device_already_provisioned"));
    assert_eq!(allowed.len() + refused.count(), 32 * 30);
    assert_eq!(allowed.len(), 32 * 20, "each device once");
    let keys: HashSet<_> = allowed
        .iter()
        .flat_map(|p| p.keys.iter().map(|k| k.key_id.clone()))
        .collect();
    assert_eq!(keys.len(), 2 * allowed.len(), "no key twice");
    drop(provisioner);
    hq_finds_no_violations(&w, "ahead.kfa");
}

/// `site provision --out`: a file that cannot take the keys is refused before any key
/// is released; a write that fails after the release names the request id and the
/// command that gets the same keys; a lot run again writes no device twice, and a
/// last line cut short by a kill is written again whole.
#[test]
fn a_key_released_at_the_site_is_a_key_delivered() {
    let w = world();
    let id = imported(
        &w,
        "product = \"p\"\ndevices = 100\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\n",
        "delivered",
    );
    let existing = w.path("taken.json");
    std::fs::write(&existing, "{}").unwrap();
    for out in [existing, w.path("no/such/dir/keys.json")] {
        provision(&w, &id, "S-1", &["--out", &s(&out)], None).assert_error(
            1,
            "invalid_input",
            "nothing was asked of the site",
        );
    }
    let first = provision(&w, &id, "S-1", &["--out", &s(&w.path("s-1.json"))], None);
    assert_eq!(
        (first.code, &first.json["replayed"]),
        (0, &serde_json::json!(false)),
        "{}",
        first.json
    );

    std::fs::create_dir(w.path(".s-2.json.tmp")).unwrap();
    let failed = provision(&w, &id, "S-2", &["--out", &s(&w.path("s-2.json"))], None);
    assert_eq!(failed.json["error"]["code"], "io", "{}", failed.json);
    let message = failed.json["error"]["message"].as_str().unwrap();
    let (request_id, _) = retry_named(message);
    assert!(
        message.contains(&format!("keyfab site provision --home {} --entitlement {id} --device-id S-2 --request-id {request_id}", s(&w.site))),
        "{message}"
    );
    let again = provision(
        &w,
        &id,
        "S-2",
        &[
            "--request-id",
            &request_id,
            "--out",
            &s(&w.path("s-2b.json")),
        ],
        None,
    );
    assert_eq!(again.code, 0, "{}", again.json);
    assert_eq!(again.json["replayed"], true);

    // A lot, run again: every device once in the file.
    let ids: Vec<String> = (0..5).map(|n| format!("L-{n}")).collect();
    let out = w.path("lot.jsonl");
    provision_lot(&w, &id, &ids, &out, &[]);
    let lines = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().lines().count();
    assert_eq!(lines(&out), 5);
    let again = provision_lot(&w, &id, &ids, &out, &[]);
    assert_eq!(
        (again["provisioned"].as_u64(), again["resumed"].as_u64()),
        (Some(0), Some(5)),
        "{again}"
    );
    assert_eq!(lines(&out), 5, "a rerun wrote devices twice");
    // Killed while writing its last line: the rerun cuts the partial line off and
    // writes that device whole.
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&out, &text[..text.len() - 40]).unwrap();
    provision_lot(&w, &id, &ids, &out, &[]);
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 5, "{text}");
    for line in text.lines() {
        let device: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(device["device_id"].as_str().unwrap().starts_with("L-"));
    }
    // A file that is not a lot's output is not appended to.
    let other = w.path("notes.txt");
    std::fs::write(&other, "my notes\n").unwrap();
    let list = w.path("lot.txt");
    let args = lot_args(&w.site, &id, &list, &other);
    keyfab(&args.iter().map(String::as_str).collect::<Vec<_>>(), None).assert_error(
        1,
        "invalid_input",
        "is not a device's keys",
    );
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "my notes\n");
}

/// A lot with refusals says which devices were refused and why, and does not exit 0;
/// once the refusal passes, the same lot resumes and ends 0.
#[test]
fn a_lot_names_its_refused_devices_and_exits_by_the_partial_rule() {
    let w = world();
    let id = imported(
        &w,
        "product = \"p\"\ndevices = 3\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         device_ids = { id_pattern = \"^L-[0-9]+$\" }\n\
         [[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\n",
        "partial",
    );
    let list = w.path("lot.txt");
    let out = w.path("lot.jsonl");
    let args = lot_args(&w.site, &id, &list, &out);
    // A line that is no device id at all: the whole list is refused, nothing done.
    std::fs::write(&list, "L-1\nL-2\nbad id\n").unwrap();
    let before = snapshot(&w.site);
    keyfab(&args.iter().map(String::as_str).collect::<Vec<_>>(), None).assert_error(
        1,
        "invalid_input",
        "line 3",
    );
    assert_eq!(before, snapshot(&w.site));
    assert!(!out.exists());
    std::fs::write(&list, "L-1\nL-2\nX-9\nL-3\nL-4\n").unwrap();
    let lot = keyfab(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert_eq!(lot.code, 3, "{}", lot.json);
    assert_eq!(lot.json["provisioned"], 3, "{}", lot.json);
    let refused: Vec<(&str, &str)> = lot.json["refused_devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap(),
                d["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [("X-9", "device_id_rejected"), ("L-4", "quota_exceeded")],
        "{}",
        lot.json
    );
    assert!(lot.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2 of 5 devices not done"));
    // Text output: the summary names each refused device, then the error.
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .args(&args)
        .env("KEYFAB_PASSPHRASE", PASS)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("L-4 quota_exceeded"), "{stdout}");
    assert!(String::from_utf8_lossy(&text.stderr).contains("error[quota_exceeded]"));
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
    // Only the devices that got keys: the same lot of those is done, exit 0.
    std::fs::write(&list, "L-1\nL-2\nL-3\n").unwrap();
    let done = keyfab(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert_eq!(
        (done.code, done.json["resumed"].as_u64()),
        (0, Some(3)),
        "{}",
        done.json
    );
}
