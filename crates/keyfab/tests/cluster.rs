//! A site whose state lives in a real 3-member etcd cluster: set up with `site init
//! --store etcd://…`, an entitlement imported in commits etcd accepts, devices provisioned
//! while the etcd leader is killed (requests retried with the same request id, as a
//! station does), and HQ verifies the exported log.

mod common;
use common::*;
use keyfab_site::provision::{ProvisionRequest, Provisioner};
use keyfab_store_etcd::cluster::EtcdCluster;
use std::sync::Arc;
use std::time::{Duration, Instant};

const POLICY: &str = r#"product = "cluster"
devices = 400
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"
[[keys]]
name = "identity"
type = "ec-p256"
source = "hq-pool"
certificate = { subject = "CN={device_id},O=Acme", days = 365 }
[[keys]]
name = "session"
type = "aes-256"
source = "derived"
"#;

#[test]
fn a_site_on_etcd_provisions_through_the_loss_of_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(3, &dir.path().join("etcd")).unwrap();
    let root = root(dir.path(), "root");
    let hq = node(dir.path(), &root, "hq", "acme-hq");
    let spec = etcd.store_spec();
    let (site, _) = node_with(
        dir.path(),
        &root,
        "site",
        "shenzhen-1",
        &["--store", &spec],
        |_| Vec::new(),
    );
    assert!(
        site.join("store.json").exists() && !site.join("state.redb").exists(),
        "the site's state is in etcd, not in its home"
    );
    // The same namespace cannot hold a second node made from scratch.
    let again = keyfab(
        &[
            "site",
            "init",
            "--home",
            &s(&dir.path().join("again")),
            "--name",
            "shenzhen-1",
            "--store",
            &spec,
        ],
        None,
    );
    assert_ne!(again.code, 0, "{}", again.json);

    register(dir.path(), &hq, &site);
    let w = World {
        dir,
        root,
        hq,
        site,
    };
    let policy = w.path("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "cluster.kfe");
    // 400 pool keys: more than one etcd transaction holds.
    assert_eq!(import(&w.site, &kfe, None).code, 0);

    let site = Arc::new(Provisioner::start(Arc::new(open_site(&w.site))));
    let devices = 300;
    let killer = {
        let leader = etcd.leader().expect("a leader");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            etcd.kill(leader).unwrap();
            etcd
        })
    };
    let started = Instant::now();
    let mut retries = 0;
    let mut key_ids = std::collections::BTreeSet::new();
    for n in 0..devices {
        let device = format!("C-{n:04}");
        let answer = loop {
            // A station's retry: the same request id, until an answer.
            match site.provision(ProvisionRequest {
                entitlement: id.clone(),
                device_id: device.clone(),
                station: None,
                request_id: format!("r-{device}"),
                csr: None,
                transport_key: None,
            }) {
                Ok(p) => break p,
                Err(e) => {
                    assert_ne!(e.exit_code(), 3, "{device} refused: {e}");
                    retries += 1;
                    assert!(
                        started.elapsed() < Duration::from_secs(120),
                        "{device}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        for k in &answer.keys {
            assert!(
                key_ids.insert(k.key_id.clone()),
                "{device}: key {} given twice",
                k.key_id
            );
        }
    }
    let took = started.elapsed();
    let etcd = killer.join().unwrap();
    eprintln!(
        "{devices} devices in {took:?}, {retries} retried requests, the leader killed at 0.7 s"
    );
    let counters = keyfab_site::provision::counters(site.node(), &id).unwrap();
    assert_eq!(
        counters.total, devices,
        "each device counted once ({retries} retries)"
    );
    drop(site);

    let report = export_import_report(&w, "cluster.kfa");
    assert_eq!(
        report["violations"].as_array().unwrap().len(),
        0,
        "HQ verifies the log kept in etcd: {report}"
    );
    drop(etcd);
}

/// A second node of the same site: a copy of the home (its keys and `store.json`).
fn copy_home(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn two_nodes_share_one_site_and_never_exceed_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(3, &dir.path().join("etcd")).unwrap();
    let root = root(dir.path(), "root");
    let hq = node(dir.path(), &root, "hq", "acme-hq");
    let spec = etcd.store_spec();
    let (site, _) = node_with(
        dir.path(),
        &root,
        "site",
        "shenzhen-1",
        &["--store", &spec],
        |_| Vec::new(),
    );
    register(dir.path(), &hq, &site);
    let second = dir.path().join("shenzhen-1-node2");
    copy_home(&site, &second);
    let w = World {
        dir,
        root,
        hq,
        site,
    };
    let policy = w.path("policy.toml");
    std::fs::write(&policy, POLICY.replace("devices = 400", "devices = 250")).unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "shared.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);

    // Both nodes are asked for the same 300 devices, each with its own request ids, from
    // three threads each: every device is released at most once, and 250 in all.
    let nodes = [
        Arc::new(Provisioner::start(Arc::new(open_site(&w.site)))),
        Arc::new(Provisioner::start(Arc::new(open_site(&second)))),
    ];
    let mut threads = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..3 {
            let (node, id) = (node.clone(), id.clone());
            threads.push(std::thread::spawn(move || {
                let mut results = Vec::new();
                for d in (t..300).step_by(3) {
                    let device = format!("C-{d:04}");
                    let started = Instant::now();
                    let outcome = loop {
                        match node.provision(ProvisionRequest {
                            entitlement: id.clone(),
                            device_id: device.clone(),
                            station: None,
                            request_id: format!("n{n}-{device}"),
                            csr: None,
                            transport_key: None,
                        }) {
                            Ok(p) => break Ok(p.keys[0].key_id.clone()),
                            Err(e) if e.exit_code() == 3 => break Err(e.code()),
                            Err(e) => {
                                // Busy with the other node: the same request again.
                                assert!(started.elapsed() < Duration::from_secs(60), "{e}");
                            }
                        }
                    };
                    results.push((device, outcome));
                }
                results
            }));
        }
    }
    let mut released: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut refused: std::collections::BTreeMap<&str, usize> = Default::default();
    for t in threads {
        for (device, outcome) in t.join().unwrap() {
            match outcome {
                Ok(key) => released.entry(device).or_default().push(key),
                Err(code) => *refused.entry(code).or_insert(0) += 1,
            }
        }
    }
    assert_eq!(released.len(), 250, "the quota, exactly: {refused:?}");
    assert!(
        released.values().all(|keys| keys.len() == 1),
        "no device twice"
    );
    let keys: std::collections::BTreeSet<_> = released.values().flatten().collect();
    assert_eq!(keys.len(), 250, "no pool key twice");
    assert_eq!(
        refused.values().sum::<usize>(),
        600 - 250,
        "every other request refused: {refused:?}"
    );
    assert_eq!(
        keyfab_site::provision::counters(nodes[0].node(), &id)
            .unwrap()
            .total,
        250
    );
    drop(nodes);
    let report = export_import_report(&w, "shared.kfa");
    assert_eq!(
        report["violations"].as_array().unwrap().len(),
        0,
        "one log for both nodes, and HQ agrees with it: {report}"
    );
    drop(etcd);
}
