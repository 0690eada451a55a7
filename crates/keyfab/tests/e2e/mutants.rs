//! The mutation suite: from clean audit bundles, over a thousand mutants — every byte
//! flipped, truncated, extended, spliced; records deleted, reordered, edited, duplicated
//! or spliced from another bundle and re-signed by the site itself (keeping the
//! checkpoint it claimed); re-signed by another registered site; a fork. Every mutant is
//! refused with a code and leaves HQ unchanged; every clean bundle is accepted.

use crate::common::*;
use keyfab_formats::audit_bundle::{open_bundle, verify_bundle, BundleFields};

const POLICY_M: &str = "product = \"p\"\ndevices = 100\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n[[keys]]\nname = \"k\"\ntype = \"aes-256\"\nsource = \"derived\"\n";

fn open_hq(w: &World) -> keyfab_node::Node {
    keyfab_node::Node::open(
        &w.hq,
        keyfab_node::NodeKind::Hq,
        &keyfab_crypto::secret::SecretBytes::new(PASS.as_bytes().to_vec()),
        Box::new(keyfab_crypto::rng::SystemRng),
        Box::new(keyfab_crypto::time::SystemClock),
        &keyfab_backends::Linked,
    )
    .unwrap()
}

/// The header and the decrypted records of a clean bundle, as HQ sees them.
fn read_bundle(
    hq: &keyfab_node::Node,
    path: &std::path::Path,
) -> (keyfab_formats::audit_bundle::BundleHeader, Vec<Vec<u8>>) {
    let service = hq.service().unwrap();
    let recipient = hq.custody.hpke(&service.hpke_handle).unwrap();
    let env = verify_bundle(
        path,
        &hq.root_cert().unwrap(),
        hq.now(),
        &hq.name,
        &[recipient.public_key().unwrap().fingerprint()],
    )
    .unwrap();
    let mut reader = open_bundle(&env, recipient).unwrap();
    let mut records = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        records.push(r);
    }
    (env.header.clone(), records)
}

/// Re-bundles `records` under `header`'s claims, signed by `signer_home`'s site key.
fn rebundle(
    w: &World,
    signer_home: &std::path::Path,
    header: &keyfab_formats::audit_bundle::BundleHeader,
    records: Vec<Vec<u8>>,
    out: &std::path::Path,
) {
    let site = open_site(signer_home);
    let (_, hq_cluster, recipient) = hq_addressing(&site);
    let fields = BundleFields {
        id: header.id.clone(),
        site: header.site.clone(),
        hq: header.hq.clone(),
        hq_cluster,
        recipient,
        from: header.from,
        to: header.to,
        checkpoint_time: header.checkpoint_time,
        consistency: header
            .consistency
            .iter()
            .map(|b| b.as_slice().try_into().unwrap())
            .collect(),
        created_at: keyfab_crypto::time::UnixTime(header.created_at),
    };
    write_signed_bundle(&site, &fields, records, out);
    let _ = w;
}

#[test]
fn a_thousand_mutants_are_refused_and_clean_bundles_accepted() {
    let w = world();
    let other = node(w.dir.path(), &w.root, "site", "penang-2");
    register(w.dir.path(), &w.hq, &other);
    let policy = w.path("m.toml");
    std::fs::write(&policy, POLICY_M).unwrap();
    for home in [&w.site, &other] {
        let name = home.file_name().unwrap().to_string_lossy().into_owned();
        let kfe = w.path(&format!("{name}.kfe"));
        let id = ok(&[
            "hq",
            "entitlement",
            "create",
            "--home",
            &s(&w.hq),
            "--site",
            &name,
            "--policy",
            &s(&policy),
            "--out",
            &s(&kfe),
        ])["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(import(home, &kfe, None).code, 0);
        for i in 0..4 {
            assert_eq!(
                provision_in(home, &id, &format!("{name}-{i}"), &[], None).code,
                0
            );
        }
    }
    let export = |home: &std::path::Path, name: &str| {
        let out = w.path(name);
        ok(&[
            "site",
            "audit",
            "export",
            "--home",
            &s(home),
            "--out",
            &s(&out),
        ]);
        out
    };
    let a1 = export(&w.site, "a1.kfa");
    // A second range: more decisions after the first export.
    let ent = ok(&["site", "entitlement", "list", "--home", &s(&w.site)])["entitlements"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 4..8 {
        keyfab(
            &[
                "site",
                "provision",
                "--home",
                &s(&w.site),
                "--entitlement",
                &ent,
                "--device-id",
                &format!("shenzhen-1-{i}"),
            ],
            None,
        );
    }
    let a2 = export(&w.site, "a2.kfa");
    let p1 = export(&other, "p1.kfa");

    let hq = open_hq(&w);
    let (h1, r1) = read_bundle(&hq, &a1);
    let (h2, r2) = read_bundle(&hq, &a2);
    let (_, rp) = read_bundle(&hq, &p1);
    let import_in_process =
        |hq: &keyfab_node::Node, p: &std::path::Path| keyfab_hq::audit::import(hq, p, None);

    // Clean: a1 then a2 import; keep the state after a1 as the base for a2's mutants.
    let mut mutants: Vec<(String, std::path::PathBuf)> = Vec::new();
    let dir = w.path("mutants");
    std::fs::create_dir_all(&dir).unwrap();
    let mut add = |label: String, bytes: Vec<u8>| {
        let p = dir.join(format!("m{}.kfa", mutants.len()));
        std::fs::write(&p, bytes).unwrap();
        mutants.push((label, p));
    };
    let a2_bytes = std::fs::read(&a2).unwrap();
    // Every byte of the second bundle flipped.
    for i in 0..a2_bytes.len() {
        let mut b = a2_bytes.clone();
        b[i] ^= 0x40;
        add(format!("flip byte {i}"), b);
    }
    // Truncated, extended, spliced with the other site's bundle.
    let p1_bytes = std::fs::read(&p1).unwrap();
    for cut in [1usize, 7, 100, 500, a2_bytes.len() / 2, a2_bytes.len() - 1] {
        add(
            format!("truncate to {cut}"),
            a2_bytes[..cut.min(a2_bytes.len())].to_vec(),
        );
        // Splices inside the signed parts (a cut within the shared prefix would just be
        // the other site's clean bundle).
        if cut > 12 {
            let mut spliced = a2_bytes[..cut.min(a2_bytes.len())].to_vec();
            spliced.extend_from_slice(&p1_bytes[cut.min(p1_bytes.len())..]);
            add(format!("splice at {cut}"), spliced);
        }
    }
    add("trailing byte".into(), [a2_bytes.clone(), vec![0]].concat());
    // Record-level lies, re-signed by the site itself, claiming its real checkpoint.
    let mut lies: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    for i in 0..r2.len() {
        let mut d = r2.clone();
        d.remove(i);
        lies.push((format!("delete record {i}"), d));
        let mut dup = r2.clone();
        dup.insert(i, r2[i].clone());
        lies.push((format!("duplicate record {i}"), dup));
        if i + 1 < r2.len() {
            let mut sw = r2.clone();
            sw.swap(i, i + 1);
            lies.push((format!("swap records {i} and {}", i + 1), sw));
        }
        for at in [5usize, 20, 40] {
            let mut e = r2.clone();
            if at < e[i].len() {
                e[i][at] ^= 1;
                lies.push((format!("edit record {i} byte {at}"), e));
            }
        }
    }
    lies.push((
        "splice in the first range".into(),
        [r1.clone(), r2.clone()].concat(),
    ));
    lies.push((
        "splice in another site's records".into(),
        [r2[..2].to_vec(), rp.clone()].concat(),
    ));
    lies.push(("drop the last records".into(), r2[..r2.len() - 2].to_vec()));
    for (label, records) in lies {
        let p = dir.join(format!("m{}.kfa", mutants.len()));
        rebundle(&w, &w.site, &h2, records, &p);
        mutants.push((label, p));
    }
    // Re-signed with another registered site's key.
    let p = dir.join("other-signer.kfa");
    rebundle(&w, &other, &h2, r2.clone(), &p);
    mutants.push(("re-signed by penang-2".into(), p));

    assert!(mutants.len() >= 1000, "only {} mutants", mutants.len());
    // HQ state: a1 accepted.
    import_in_process(&hq, &a1).unwrap();
    drop(hq);
    let before = snapshot(&w.hq);
    let hq = open_hq(&w);
    let mut codes: std::collections::BTreeMap<String, usize> = Default::default();
    for (label, p) in &mutants {
        match import_in_process(&hq, p) {
            Ok(_) => panic!("mutant accepted: {label}"),
            Err(e) => {
                assert_eq!(e.exit_code(), 4, "{label}: {e}");
                *codes.entry(e.code().as_str().to_owned()).or_default() += 1;
            }
        }
    }
    drop(hq);
    assert_eq!(before, snapshot(&w.hq), "a mutant changed HQ's state");
    eprintln!("{} mutants refused: {codes:?}", mutants.len());
    // The clean second bundle is still accepted afterwards, and a fork is refused.
    let hq = open_hq(&w);
    import_in_process(&hq, &a2).expect("clean bundle refused");
    drop(hq);
    let _ = h1;
}

/// `records` (bytes) followed by `extra` more releases under `entitlement`, chained to
/// them as the site would chain them, and the tree head over all of them.
fn extend_log(
    records: &[Vec<u8>],
    entitlement: &str,
    extra: u64,
) -> (Vec<Vec<u8>>, keyfab_formats::checkpoint::TreeHead) {
    use keyfab_audit::{AuditedKey, Event, Head, Record};
    let mut out = records.to_vec();
    let last = Record::from_bytes(records.last().unwrap()).unwrap();
    let mut head = Head::after(&last).unwrap();
    for i in 0..extra {
        let r = head.next(
            last.time,
            &last.site,
            Event::ProvisionAllowed {
                entitlement: entitlement.to_owned(),
                request_id: format!("bulk-{i}"),
                device_id: format!("BULK-{i:06}"),
                station: None,
                pool_index: None,
                keys: vec![AuditedKey {
                    name: "k".into(),
                    key_id: format!("kcv:{i:06x}"),
                    cert_serial: None,
                    certificate: None,
                }],
            },
        );
        head = Head::after(&r).unwrap();
        out.push(r.to_bytes());
    }
    let mut frontier = keyfab_audit::merkle::Frontier::default();
    for r in &out {
        frontier.push(keyfab_audit::merkle::leaf_hash(r));
    }
    let to = keyfab_formats::checkpoint::TreeHead {
        size: out.len() as u64,
        root: frontier.root(),
    };
    (out, to)
}

/// A bundle too large to reconcile in memory is staged in the store as it is read; when
/// its records turn out not to match the signed checkpoint (only known at the end), or
/// an earlier import died midway, what was staged is taken away again.
#[test]
fn a_large_refused_bundle_leaves_nothing_behind() {
    let w = world();
    let policy = w.path("m.toml");
    std::fs::write(&policy, POLICY_M).unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "m.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let out = export(&w, "a.kfa");
    let hq = open_hq(&w);
    let (header, real) = read_bundle(&hq, &out);
    // Enough records for several chunks (1 MiB each), so that some are staged.
    let (records, to) = extend_log(&real, &id, 12_000);
    assert!(records.iter().map(|r| r.len() + 4).sum::<usize>() > 2 << 20);

    // Claims another checkpoint than its records make: refused at the very end.
    let mut lying = header.clone();
    lying.to = keyfab_formats::checkpoint::TreeHead {
        size: to.size,
        root: [7u8; 32],
    };
    let bad = w.path("bad.kfa");
    rebundle(&w, &w.site, &lying, records.clone(), &bad);
    drop(hq);
    let before = content_snapshot(&w.hq);
    let hq = open_hq(&w);
    let e = keyfab_hq::audit::import(&hq, &bad, None).unwrap_err();
    assert_eq!(e.code().as_str(), "bad_signature", "{e}");
    drop(hq);
    assert_eq!(
        before,
        content_snapshot(&w.hq),
        "the refused bundle left rows behind"
    );

    // What an import that died midway would leave: a staged row beyond the accepted head
    // and the index row of the device it released.
    let ghost = {
        use keyfab_audit::{Event, Head, Record};
        let last = Record::from_bytes(real.last().unwrap()).unwrap();
        Head::after(&last).unwrap().next(
            last.time,
            &last.site,
            Event::ProvisionAllowed {
                entitlement: id.clone(),
                request_id: "ghost".into(),
                device_id: "BULK-000001".into(),
                station: None,
                pool_index: None,
                keys: vec![],
            },
        )
    };
    let hq = open_hq(&w);
    {
        use keyfab_store::{Table, Txn};
        let mut row = Vec::new();
        keyfab_audit::frame_into(&mut row, &ghost.to_bytes());
        let mut key = b"rec/shenzhen-1/".to_vec();
        key.extend_from_slice(&ghost.sequence.to_be_bytes());
        let mut txn = Txn::default();
        txn.put(Table::Audit, &key, &row).put(
            Table::Audit,
            format!("device/{id}/BULK-000001").as_bytes(),
            &ghost.sequence.to_be_bytes(),
        );
        hq.store.commit(txn).unwrap();
    }

    // The honest bundle: accepted, stored once, and BULK-000001 is not a second release.
    let good = w.path("good.kfa");
    let mut honest = header.clone();
    honest.to = to;
    rebundle(&w, &w.site, &honest, records.clone(), &good);
    let imported = keyfab_hq::audit::import(&hq, &good, None).unwrap();
    assert_eq!(imported.records, records.len() as u64);
    assert!(
        imported
            .violations
            .iter()
            .all(|v| v.kind.as_str() == "quota_exceeded"),
        "{:?}",
        imported.violations.first()
    );
    let stored = keyfab_hq::audit::site_records(&hq, "shenzhen-1").unwrap();
    let stored: Vec<Vec<u8>> = stored.iter().map(|r| r.to_bytes()).collect();
    assert_eq!(stored, records, "HQ's copy of the log is not the bundle's");
}
