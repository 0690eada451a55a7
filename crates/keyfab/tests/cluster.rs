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
