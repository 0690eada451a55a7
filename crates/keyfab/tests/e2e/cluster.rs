//! A site whose state lives in a real 3-member etcd cluster: set up with `site init
//! --store etcd://…`, an entitlement imported in commits etcd accepts, devices provisioned
//! while the etcd leader is killed (requests retried with the same request id, as a
//! station does), and HQ verifies the exported log.

use crate::common::*;
use keyfab_harness::etcd::EtcdCluster;
use keyfab_site::provision::{ProvisionRequest, Provisioner};
use std::path::{Path, PathBuf};
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

/// Root, HQ, and site `shenzhen-1` with its state in `etcd` (`extra` init arguments),
/// registered at HQ.
fn etcd_world(dir: tempfile::TempDir, spec: &str, extra: &[&str]) -> World {
    let root = root(dir.path(), "root");
    let hq = node(dir.path(), &root, "hq", "acme-hq");
    let mut init = vec!["--store", spec];
    init.extend_from_slice(extra);
    let (site, _) = node_with(dir.path(), &root, "site", "shenzhen-1", &init, |_| {
        Vec::new()
    });
    register(dir.path(), &hq, &site);
    World {
        dir,
        root,
        hq,
        site,
    }
}

/// Three etcd members on loopback and a world whose site keeps its state in them.
fn etcd_site() -> (EtcdCluster, World) {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(3, &dir.path().join("etcd")).unwrap();
    let w = etcd_world(dir, &etcd.store_spec(), &[]);
    (etcd, w)
}

/// Two provisioning engines of the site: one on its home, one on the copy at `second`.
fn two_nodes(w: &World, second: &Path) -> [Arc<Provisioner>; 2] {
    [
        Arc::new(Provisioner::start(Arc::new(open_site(&w.site)))),
        Arc::new(Provisioner::start(Arc::new(open_site(second)))),
    ]
}

/// Provisions on both nodes at once, from three threads each: thread `t` of node `n`
/// asks for the (device, request id) pairs `jobs(n, t)`, each retried with its request
/// id (as a station does) until the policy answers. Per device: the first key id
/// released, or the refusal code.
fn on_two_nodes(
    nodes: &[Arc<Provisioner>; 2],
    id: &str,
    jobs: impl Fn(usize, usize) -> Vec<(String, String)>,
) -> Vec<(String, Result<String, String>)> {
    let mut threads = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..3 {
            let (node, id, jobs) = (node.clone(), id.to_owned(), jobs(n, t));
            threads.push(std::thread::spawn(move || {
                let mut results = Vec::new();
                for (device, request) in jobs {
                    let started = Instant::now();
                    let outcome = loop {
                        match node.provision(
                            ProvisionRequest::parse(&id, &device, request.clone()).unwrap(),
                        ) {
                            Ok(p) => break Ok(p.keys[0].key_id.clone()),
                            Err(e) if e.exit_code() == 3 => {
                                break Err(e.code().as_str().to_owned())
                            }
                            // Busy with the other node: the same request again.
                            Err(e) => assert!(started.elapsed() < Duration::from_secs(60), "{e}"),
                        }
                    };
                    results.push((device, outcome));
                }
                results
            }));
        }
    }
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

#[test]
fn a_site_on_etcd_provisions_through_the_loss_of_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(3, &dir.path().join("etcd")).unwrap();
    let spec = etcd.store_spec();
    let w = etcd_world(dir, &spec, &[]);
    assert!(
        w.site.join("store.json").exists() && !w.site.join("state.redb").exists(),
        "the site's state is in etcd, not in its home"
    );
    // The same namespace cannot hold a second node made from scratch.
    let again = keyfab(
        &[
            "site",
            "init",
            "--home",
            &s(&w.path("again")),
            "--name",
            "shenzhen-1",
            "--store",
            &spec,
        ],
        None,
    );
    assert_ne!(again.code, 0, "{}", again.json);
    assert!(!w.path("again").exists(), "a refused init leaves nothing");

    // 400 pool keys: more than one etcd transaction holds.
    let id = imported(&w, POLICY, "cluster");

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
            match site
                .provision(ProvisionRequest::parse(&id, &device, format!("r-{device}")).unwrap())
            {
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
        // The pool key is what a lost commit could hand out twice. (The derived AES
        // key is named by a 3-byte check value, which 300 distinct keys share now and
        // then: about 1 run in 370.)
        let pool_key = &answer.keys[0];
        assert_eq!(pool_key.name, "identity");
        assert!(
            key_ids.insert(pool_key.key_id.clone()),
            "{device}: pool key {} given twice",
            pool_key.key_id
        );
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
    // Answers on etcd are as final as anywhere: a retry gets the same keys, another
    // request for the device is refused, and that refusal is what its retry gets too.
    let again = |request_id: &str| {
        site.provision(ProvisionRequest::parse(&id, "C-0007", request_id).unwrap())
    };
    let replayed = again("r-C-0007").unwrap();
    assert!(replayed.replayed);
    assert!(key_ids.contains(&replayed.keys[0].key_id));
    for _ in 0..2 {
        let Err(e) = again("another") else {
            panic!("a device provisioned twice")
        };
        assert_eq!(e.code().as_str(), "device_already_provisioned");
    }
    assert_eq!(
        keyfab_site::provision::counters(site.node(), &id)
            .unwrap()
            .total,
        devices
    );
    drop(site);

    // HQ verifies the log kept in etcd.
    hq_finds_no_violations(&w, "cluster.kfa");
    drop(etcd);
}

/// A second node of the same site: a copy of the home (its keys and `store.json`).
#[test]
fn two_nodes_share_one_site_and_never_exceed_or_duplicate() {
    let (etcd, w) = etcd_site();
    let second = w.path("shenzhen-1-node2");
    copy_home(&w.site, &second);
    let id = imported(
        &w,
        &POLICY.replace("devices = 400", "devices = 250"),
        "shared",
    );

    // Both nodes are asked for the same 300 devices, each with its own request ids, from
    // three threads each: every device is released at most once, and 250 in all.
    let nodes = two_nodes(&w, &second);
    let results = on_two_nodes(&nodes, &id, |n, t| {
        (t..300)
            .step_by(3)
            .map(|d| {
                let device = format!("C-{d:04}");
                let request = format!("n{n}-{device}");
                (device, request)
            })
            .collect()
    });
    let mut released: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut refused: std::collections::BTreeMap<&str, usize> = Default::default();
    for (device, outcome) in &results {
        match outcome {
            Ok(key) => released
                .entry(device.clone())
                .or_default()
                .push(key.clone()),
            Err(code) => *refused.entry(code.as_str()).or_insert(0) += 1,
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
    // One log for both nodes, and HQ agrees with it: each node's decisions in a chain of
    // its own, so neither waited on the other's log head.
    hq_finds_no_violations(&w, "shared.kfa");
    let hq = keyfab_node::Node::open(
        &w.hq,
        keyfab_node::NodeKind::Hq,
        &keyfab_crypto::secret::SecretBytes::new(PASS.as_bytes().to_vec()),
        Box::new(keyfab_crypto::rng::SystemRng),
        Box::new(keyfab_crypto::time::SystemClock),
        &keyfab_backends::Linked,
    )
    .unwrap();
    let chains: std::collections::BTreeSet<_> = keyfab_hq::audit::site_records(&hq, "shenzhen-1")
        .unwrap()
        .into_iter()
        .filter(|r| {
            matches!(
                r.event,
                keyfab_audit::Event::ProvisionAllowed { .. }
                    | keyfab_audit::Event::ProvisionDenied { .. }
            )
        })
        .map(|r| r.chain)
        .collect();
    assert_eq!(chains.len(), 2, "{chains:?}");
    assert!(!chains.contains(&None));
    drop(hq);
    // The site verifies the same merged log chain by chain, as HQ does (a CLI provision
    // adds the site chain's decisions to the two node chains')...
    assert_eq!(provision(&w, &id, "C-9999", &[], None).code, 3);
    let verified = ok(&["site", "audit", "verify", "--home", &s(&w.site)]);
    assert!(verified["chains"].as_u64().unwrap() >= 3, "{verified}");
    // ... and an edited record in a node chain breaks it.
    edit_audit_record(&w.site, b"c/");
    let broken = keyfab(&["site", "audit", "verify", "--home", &s(&w.site)], None);
    broken.assert_error(4, "log_broken", "the audit chain is broken");
    drop(etcd);
}

/// `count` stations of the site, enrolled: their directories.
fn enroll_stations(w: &World, count: u32) -> Vec<PathBuf> {
    (0..count)
        .map(|i| {
            let d = w.path(&format!("line-{i}"));
            enroll(&w.site, &format!("line-{i}"), &d);
            d
        })
        .collect()
}

/// `keyfab station run` for station `dir` against every node, as a child process.
fn start_line(
    urls: &str,
    dir: &Path,
    root_crt: &Path,
    id: &str,
    devices: u32,
    prefix: &str,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .args(["--json", "station", "run", "--url", urls, "--station-dir"])
        .arg(dir)
        .arg("--root-cert")
        .arg(root_crt)
        .args(["--entitlement", id, "--devices", &devices.to_string()])
        .args(["--concurrency", "1", "--device-prefix", prefix])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn stations_keep_provisioning_while_the_etcd_leader_and_a_node_die() {
    stations_through_failures(true);
}

#[test]
fn stations_keep_provisioning_while_an_etcd_follower_and_a_node_die() {
    stations_through_failures(false);
}

/// 32 stations × 500 devices against two keyfab nodes over three etcd members; one
/// member (the leader, or a follower) is killed at a fifth of the quota, one node at half.
fn stations_through_failures(kill_leader: bool) {
    const STATIONS: u32 = 32;
    const PER_STATION: u32 = 500;
    let (mut etcd, w) = etcd_site();
    let stations = enroll_stations(&w, STATIONS);
    // The second node and an observer: copies of the home, made after the keys exist.
    let (second, observer) = (w.path("node-2"), w.path("observer"));
    copy_home(&w.site, &second);
    copy_home(&w.site, &observer);
    // A quota below what the stations ask for: no overrun, whatever dies.
    let quota = STATIONS * PER_STATION - 100;
    let policy = w.path("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "product = \"line\"\ndevices = {quota}\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = {{ subject = \"CN={{device_id}},O=Acme\", days = 365 }}\n"
        ),
    )
    .unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "line.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);

    let first = Server::start(&w.site);
    let second_node = Server::start(&second);
    let urls = format!("{},{}", first.url(), second_node.url());
    let root_crt = w.root.join("root.crt");
    let lines: Vec<_> = stations
        .iter()
        .enumerate()
        .map(|(i, d)| start_line(&urls, d, &root_crt, &id, PER_STATION, &format!("S{i:02}-")))
        .collect();

    // While they run: the etcd leader dies at a fifth of the quota, the first keyfab node
    // (SIGKILL) at half of it.
    let watch = open_site(&observer);
    let progress = || keyfab_site::provision::counters(&watch, &id).map_or(0, |c| c.total);
    let started = Instant::now();
    let leader = etcd.leader().expect("a leader");
    let victim = if kill_leader {
        leader
    } else {
        (0..3).find(|m| *m != leader).unwrap()
    };
    while progress() < u64::from(quota / 5) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no progress: {}\n{}",
            first.logs(),
            second_node.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    etcd.kill(victim).unwrap();
    while progress() < u64::from(quota / 2) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no progress after member {victim} died"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut first = first;
    first.child.kill().unwrap();
    let reports: Vec<serde_json::Value> = lines
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            serde_json::from_slice(&out.stdout).unwrap_or_default()
        })
        .collect();
    let took = started.elapsed();
    let sum = |k: &str| {
        reports
            .iter()
            .map(|r| r[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let refused: u64 = reports
        .iter()
        .flat_map(|r| r["refused"].as_object().cloned().unwrap_or_default())
        .map(|(code, n)| {
            assert_eq!(code, "quota_exceeded", "{n} refused with {code}");
            n.as_u64().unwrap_or(0)
        })
        .sum();
    let (programmed, failed, unreachable) = (sum("programmed"), sum("failed"), sum("unreachable"));
    let asked = u64::from(STATIONS * PER_STATION);
    eprintln!(
        "{asked} asked in {took:?} (killed: etcd {}, node 1): {programmed} programmed, {failed} failed, {refused} over the quota, {unreachable} unreachable",
        if kill_leader { "leader" } else { "follower" }
    );
    // Every request answered: released, or refused for the quota — at least 99.5 %.
    assert!(
        (programmed + refused) * 1000 >= asked * 995,
        "{programmed} + {refused} of {asked}: {reports:?}"
    );
    assert_eq!(failed, 0, "{reports:?}");
    let counters = keyfab_site::provision::counters(&watch, &id).unwrap();
    assert!(
        counters.total <= u64::from(quota),
        "no overrun: {}",
        counters.total
    );
    assert!(
        programmed <= counters.total,
        "no key released without its record"
    );
    drop(second_node);
    drop(watch);

    // One log for the site, whichever node wrote it; every release in it, once.
    let report = hq_finds_no_violations(&w, "line.kfa");
    let audited = report["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["entitlement"] == id.as_str())
        .map_or(0, |e| e["released"].as_u64().unwrap_or(0));
    assert_eq!(audited, counters.total, "{report}");
    drop(etcd);
}

#[test]
fn without_a_quorum_requests_fail_closed_fast_and_provisioning_resumes_by_itself() {
    let (mut etcd, w) = etcd_site();
    let id = imported(&w, POLICY, "quorum");
    let site = Provisioner::start(Arc::new(open_site(&w.site)));
    let request =
        |n: u32| ProvisionRequest::parse(&id, format!("Q-{n}"), format!("q-{n}")).unwrap();
    assert!(site.provision(request(0)).is_ok());

    etcd.kill(0).unwrap();
    etcd.kill(1).unwrap();
    for n in 1..=3 {
        let started = Instant::now();
        let Err(e) = site.provision(request(n)) else {
            panic!("no quorum, no keys");
        };
        assert_eq!(e.code().as_str(), "unavailable", "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "failed closed in {:?}",
            started.elapsed()
        );
    }
    etcd.restart(0).unwrap();
    etcd.restart(1).unwrap();
    // The same node, untouched, provisions again once the members are back; the requests
    // that failed are answered when retried (whatever etcd did with them meanwhile).
    let started = Instant::now();
    for n in 1..=4 {
        loop {
            match site.provision(request(n)) {
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(e.code().as_str(), "unavailable", "{e}");
                    assert!(started.elapsed() < Duration::from_secs(60), "{e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    assert_eq!(
        keyfab_site::provision::counters(site.node(), &id)
            .unwrap()
            .total,
        5
    );
    drop(site);
    hq_finds_no_violations(&w, "quorum.kfa");
    drop(etcd);
}

#[test]
fn a_node_paused_mid_run_spends_nothing_it_no_longer_holds() {
    let (etcd, w) = etcd_site();
    let stations = enroll_stations(&w, 4);
    let (second, observer) = (w.path("node-2"), w.path("observer"));
    copy_home(&w.site, &second);
    copy_home(&w.site, &observer);
    let id = imported(
        &w,
        &POLICY.replace("devices = 400", "devices = 300"),
        "paused",
    );

    let first = Server::start(&w.site);
    let second_node = Server::start(&second);
    let urls = format!("{},{}", first.url(), second_node.url());
    let root_crt = w.root.join("root.crt");
    let lines: Vec<_> = stations
        .iter()
        .enumerate()
        .map(|(i, d)| start_line(&urls, d, &root_crt, &id, 100, &format!("P{i}-")))
        .collect();
    let watch = open_site(&observer);
    let progress = || keyfab_site::provision::counters(&watch, &id).map_or(0, |c| c.total);
    let started = Instant::now();
    while progress() < 60 {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first node stops mid-batch, state read, decisions half made and a block of
    // the quota reserved; the other goes on to the end of the quota, which it reaches
    // only by taking that block back once it has gone unused for the reservation's life
    // (`RESERVATION_LIFE_SECS`); then the first wakes up with what it had read and
    // reserved, and can spend none of it.
    let pid = first.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    while progress() < 300 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the other node stalled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    // Every station got a decision for every device — keys or a refusal for the quota —
    // or a retryable 503 it sent again: never `invalid_state`, nothing left unanswered.
    let mut programmed = 0;
    for line in lines {
        let out = line.wait_with_output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        // A line some of whose devices were over the quota ends with that code (the
        // partial-result rule); never with another.
        assert!(
            report["error"].is_null() || report["error"]["code"] == "quota_exceeded",
            "{report}"
        );
        for (code, _) in report["refused"].as_object().unwrap() {
            assert_eq!(code, "quota_exceeded", "{report}");
        }
        assert_eq!(report["unreachable"], 0, "{report}");
        assert_eq!(report["failed"], 0, "{report}");
        programmed += report["programmed"].as_u64().unwrap();
    }
    assert_eq!(programmed, 300, "every device of the quota programmed");
    let counters = keyfab_site::provision::counters(&watch, &id).unwrap();
    assert_eq!(counters.total, 300, "the quota, and not one more");
    drop((first, second_node, watch));
    // Every confirmation landed: HQ counts each programmed device confirmed.
    let report = hq_finds_no_violations(&w, "paused.kfa");
    assert_eq!(report["entitlements"][0]["confirmed"], 300, "{report}");
    drop(etcd);
}

#[test]
fn a_site_reaches_etcd_over_tls_with_its_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tls = keyfab_harness::etcd::ClusterTls::generate(&dir.path().join("tls")).unwrap();
    let (ca, cert, key) = (s(&tls.ca), s(&tls.client_cert), s(&tls.client_key));
    let etcd = EtcdCluster::start_with(3, &dir.path().join("etcd"), Some(tls)).unwrap();
    let spec = etcd.store_spec();
    assert!(spec.starts_with("etcds://"));
    // TLS without the CA is a usage error; a member that requires a client certificate
    // turns away a site that has none.
    let home = s(&dir.path().join("nope"));
    let o = keyfab(
        &[
            "site", "init", "--home", &home, "--name", "nope", "--store", &spec,
        ],
        None,
    );
    assert_eq!(o.json["error"]["code"], "invalid_input", "{}", o.json);
    let o = keyfab(
        &[
            "site",
            "init",
            "--home",
            &home,
            "--name",
            "nope",
            "--store",
            &spec,
            "--etcd-ca",
            &ca,
        ],
        None,
    );
    assert_ne!(o.code, 0, "{}", o.json);
    assert!(
        !dir.path().join("nope").exists(),
        "a refused init leaves nothing"
    );
    let tls_init = [
        "--etcd-ca",
        ca.as_str(),
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
    ];
    let w = etcd_world(dir, &spec, &tls_init);
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.site.join("store.json")).unwrap()).unwrap();
    assert!(stored["endpoints"][0]
        .as_str()
        .unwrap()
        .starts_with("https://"));
    assert!(
        stored["tls"]["key"]
            .as_str()
            .unwrap()
            .ends_with("client.key"),
        "{stored}"
    );
    let id = imported(&w, POLICY, "tls");
    let o = provision(&w, &id, "T-0001", &[], None);
    assert_eq!(o.code, 0, "{}", o.json);
    hq_finds_no_violations(&w, "tls.kfa");
    drop(etcd);
}

/// A cluster node decides a batch of new requests without reading them, its commit
/// guarded on each device's key range being empty. A refused request lives in that range,
/// so its retry is caught by the guard and read: a refusal that passes with time (the
/// daily limit) is decided again — refused again the same day, released the next day,
/// once, then replayed — and the device is counted once.
#[test]
fn a_refusal_retried_on_etcd_is_decided_again_once_it_passes() {
    let (etcd, w) = etcd_site();
    let policy = POLICY
        .replace("devices = 400", "devices = 10")
        .replace("source = \"hq-pool\"", "source = \"site\"")
        + "\n[limits]\ndaily = 1\n";
    let id = imported(&w, &policy, "daily");
    let today = jiff::Timestamp::now().as_second();
    let clock = TestClock::at(today);
    let site = Provisioner::start(Arc::new(site_with_clock(&w.site, &clock)));
    let ask = |device: &str, request: &str| {
        site.provision(ProvisionRequest::parse(&id, device, request).unwrap())
    };
    let first = ask("D-1", "r-1").expect("the day's one device");
    let refused = ask("D-2", "r-2").expect_err("over the daily limit");
    assert_eq!(refused.code().as_str(), "daily_limit_exceeded");

    let same_day = ask("D-2", "r-2").expect_err("still over today's limit");
    assert_eq!(same_day.code().as_str(), "daily_limit_exceeded");

    clock.set(today + 86_400);
    let released = ask("D-2", "r-2").expect("the retry, decided again on a new day");
    assert!(!released.replayed);
    let replayed = ask("D-2", "r-2").expect("and then answered from its record");
    assert!(replayed.replayed && replayed.audit_sequence == released.audit_sequence);
    let retried = ask("D-1", "r-1").expect("a retry of an allowed request");
    assert!(retried.replayed && retried.audit_sequence == first.audit_sequence);
    let other = ask("D-2", "r-3").expect_err("another request for a device that has keys");
    assert_eq!(other.code().as_str(), "device_already_provisioned");
    let counters = keyfab_site::provision::counters(site.node(), &id).unwrap();
    assert_eq!(counters.total, 2);
    drop(site);
    drop(etcd);
}

/// Two nodes kept busy at once: each commit of one changes the log head the other's
/// next commit is guarded on, so most commits meet a conflict. Every request must still
/// be decided on its first call — a conflict is the nodes' business, not the caller's.
#[test]
fn two_busy_nodes_decide_every_request_on_its_first_call() {
    let (etcd, w) = etcd_site();
    let second = w.path("shenzhen-1-node2");
    copy_home(&w.site, &second);
    let id = imported(&w, SITE_KEYS, "busy");
    let nodes = [
        Arc::new(Provisioner::start(Arc::new(open_site(&w.site)))),
        Arc::new(Provisioner::start(Arc::new(open_site(&second)))),
    ];
    const CALLERS: usize = 128;
    const PER_CALLER: usize = 12;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let failures: Vec<String> = runtime.block_on(async {
        let tasks: Vec<_> = (0..CALLERS)
            .map(|c| {
                let (node, id) = (nodes[c % 2].clone(), id.clone());
                tokio::spawn(async move {
                    let mut failed = Vec::new();
                    for i in 0..PER_CALLER {
                        let device = format!("B-{c:03}-{i:02}");
                        let request =
                            ProvisionRequest::parse(&id, &device, format!("r-{device}")).unwrap();
                        if let Err(e) = node.provision_async(request).await {
                            failed.push(format!("{device}: {e}"));
                        }
                    }
                    failed
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        CALLERS * PER_CALLER,
        failures.first()
    );
    assert_eq!(
        keyfab_site::provision::counters(nodes[0].node(), &id)
            .unwrap()
            .total,
        (CALLERS * PER_CALLER) as u64
    );
    drop(nodes);
    hq_finds_no_violations(&w, "busy.kfa");
    drop(etcd);
}

/// The entitlement's counters as stored: on a cluster they count every device granted
/// to a node, used or not.
fn stored_ledger(node: &keyfab_node::Node, id: &str) -> keyfab_site::provision::Counters {
    let v = node
        .store
        .get(keyfab_store::Table::Counters, id.as_bytes())
        .unwrap()
        .unwrap();
    keyfab_node::decode(&v.value).unwrap()
}

#[test]
fn two_nodes_share_a_daily_limit_exactly_and_hq_replays_every_refusal() {
    let (etcd, w) = etcd_site();
    let second = w.path("node-2");
    copy_home(&w.site, &second);
    let id = imported(
        &w,
        &POLICY.replace(
            "[[keys]]\nname = \"identity\"",
            "[limits]\ndaily = 100\n[[keys]]\nname = \"identity\"",
        ),
        "daily",
    );
    // 300 distinct devices, half through each node, from three threads each.
    let nodes = two_nodes(&w, &second);
    let results = on_two_nodes(&nodes, &id, |n, t| {
        (n * 3 + t..300)
            .step_by(6)
            .map(|d| (format!("L-{d:04}"), format!("L-{d:04}")))
            .collect()
    });
    let mut tally: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, outcome) in &results {
        let what = match outcome {
            Ok(_) => "allowed",
            Err(code) => code.as_str(),
        };
        *tally.entry(what).or_insert(0) += 1;
    }
    assert_eq!(
        tally.get("allowed"),
        Some(&100),
        "the day's limit, exactly: {tally:?}"
    );
    assert_eq!(tally.get("daily_limit_exceeded"), Some(&200), "{tally:?}");
    let counters = keyfab_site::provision::counters(nodes[0].node(), &id).unwrap();
    assert_eq!(counters.total, 100);
    drop(nodes);
    // Every grant went back when the nodes stopped; the ledger is what was allowed.
    let watch = open_site(&w.site);
    assert_eq!(stored_ledger(&watch, &id).total, 100);
    drop(watch);
    // Each refusal was made when no node held any of the day's quota unused: HQ, which
    // replays the merged log with one set of counters, refuses each one too.
    hq_finds_no_violations(&w, "daily.kfa");
    drop(etcd);
}

#[test]
fn a_node_gives_back_the_quota_it_does_not_use() {
    let (etcd, w) = etcd_site();
    let id = imported(&w, POLICY, "giveback");
    let site = Arc::new(open_site(&w.site));
    let node = Provisioner::start(site.clone());
    let provision = |from: usize, to: usize| {
        for d in from..to {
            let device = format!("G-{d}");
            node.provision(ProvisionRequest::parse(&id, &device, device.clone()).unwrap())
                .unwrap();
        }
    };
    provision(0, 10);
    // What the node holds unused is in the stored ledger, not in what it reports.
    assert_eq!(
        keyfab_site::provision::counters(&site, &id).unwrap().total,
        10
    );
    // Idle, it gives its grant back.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(stored_ledger(&site, &id).total, 10);
    assert!(keyfab_site::provision::reservations(&site, &id)
        .unwrap()
        .iter()
        .all(|r| r.granted == r.used));
    // Stopping, too; and the slots given back are handed out again, none twice.
    provision(10, 20);
    drop(node);
    let ledger = stored_ledger(&site, &id);
    assert_eq!(ledger.total, 20);
    assert!(ledger.next_pool > 20, "blocks were granted: {ledger:?}");
    let node = Provisioner::start(site.clone());
    for d in 20..30 {
        let device = format!("G-{d}");
        node.provision(ProvisionRequest::parse(&id, &device, device.clone()).unwrap())
            .unwrap();
    }
    drop(node);
    assert_eq!(
        keyfab_site::provision::counters(&site, &id).unwrap().total,
        30
    );
    drop(site);
    let listed = ok(&["site", "entitlement", "list", "--home", &s(&w.site)]);
    let e = &listed["entitlements"][0];
    assert_eq!(
        (e["provisioned"].as_u64(), e["reserved_by_nodes"].as_u64()),
        (Some(30), Some(0))
    );
    hq_finds_no_violations(&w, "giveback.kfa");
    drop(etcd);
}

#[test]
fn a_revocation_ends_the_reservations_of_busy_nodes() {
    let (etcd, w) = etcd_site();
    let id = imported(&w, POLICY, "busy");
    let node = Arc::new(Provisioner::start(Arc::new(open_site(&w.site))));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (node, id, stop) = (node.clone(), id.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut allowed = 0u64;
            for d in 0.. {
                let device = format!("B-{d:04}");
                match node.provision(ProvisionRequest::parse(&id, &device, device.clone()).unwrap())
                {
                    Ok(_) => allowed += 1,
                    Err(e) if e.code().as_str() == "revoked" => return allowed,
                    Err(e) => panic!("{e}"),
                }
                assert!(
                    !stop.load(std::sync::atomic::Ordering::Relaxed),
                    "never revoked"
                );
            }
            allowed
        })
    };
    let watch = open_site(&w.site);
    let started = Instant::now();
    while keyfab_site::provision::counters(&watch, &id).unwrap().total < 20 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let kfr = w.path("busy.kfr");
    revoke(&w, &id, Some("recall"), &kfr);
    let o = import(&w.site, &kfr, None);
    assert_eq!(o.code, 0, "{}", o.json);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let allowed = worker.join().unwrap();
    drop(node);
    // Every pool slot is either in a device or destroyed: none held back, none twice.
    let destroyed = o.json["destroyed_pool_keys"].as_u64().unwrap();
    assert_eq!(
        allowed + destroyed,
        400,
        "{allowed} allowed, {destroyed} destroyed"
    );
    assert!(keyfab_site::provision::reservations(&watch, &id)
        .unwrap()
        .is_empty());
    drop(watch);
    // Nothing was allowed after the revocation in the merged log.
    hq_finds_no_violations(&w, "busy.kfa");
    drop(etcd);
}

#[test]
fn quota_held_by_a_node_that_only_refuses_goes_to_one_that_needs_it() {
    let (etcd, w) = etcd_site();
    let second = w.path("node-2");
    copy_home(&w.site, &second);
    let id = imported(
        &w,
        &SITE_KEYS.replace("devices = 5000", "devices = 100"),
        "wanted",
    );
    let (a, b) = (
        Arc::new(Provisioner::start(Arc::new(open_site(&w.site)))),
        Provisioner::start(Arc::new(open_site(&second))),
    );
    // Node A takes a block for one device, then stays busy refusing repeats of it: it
    // commits all the time, but allows nothing from its block.
    a.provision(ProvisionRequest::parse(&id, "A-0", "a-0").unwrap())
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let repeats = {
        let (a, id, stop) = (a.clone(), id.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let e = a
                    .provision(ProvisionRequest::parse(&id, "A-0", format!("again-{n}")).unwrap())
                    .unwrap_err();
                assert_eq!(e.code().as_str(), "device_already_provisioned");
            }
        })
    };
    // Node B needs the rest of the quota, most of which node A holds: once A's block has
    // gone unused for the reservation's life, B takes it back (each request waits at
    // most that long, well within the committer's patience).
    for d in 0..99 {
        let device = format!("B-{d}");
        b.provision(ProvisionRequest::parse(&id, &device, device.clone()).unwrap())
            .unwrap_or_else(|e| panic!("{device}: {e}"));
    }
    let refused = b
        .provision(ProvisionRequest::parse(&id, "B-x", "b-x").unwrap())
        .unwrap_err();
    assert_eq!(refused.code().as_str(), "quota_exceeded");
    // Node A's reservation was taken back, not spent by A.
    let held = keyfab_site::provision::reservations(b.node(), &id).unwrap();
    assert!(held.iter().all(|r| r.used != 1), "{held:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    repeats.join().unwrap();
    drop((a, b));
    hq_finds_no_violations(&w, "wanted.kfa");
    drop(etcd);
}

/// A station whose site has lost its etcd quorum is told `unavailable` (not
/// `unreachable`: the site answered), with what each URL said, after the retries it was
/// given; the same request id gets the keys once the quorum is back.
#[test]
fn a_station_is_told_unavailable_per_url_while_the_quorum_is_lost() {
    let (mut etcd, w) = etcd_site();
    let id = imported(&w, SITE_KEYS, "quorum-station");
    let line = enroll_stations(&w, 1).remove(0);
    let server = Server::start(&w.site);
    // A second URL where nothing listens: its error is named too.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let urls = format!("{},{nowhere}", server.url());
    let provision = |attempts: &str| {
        keyfab(
            &[
                "station",
                "provision",
                "--url",
                &urls,
                "--station-dir",
                &s(&line),
                "--attempts",
                attempts,
                "--entitlement",
                &id,
                "--device-id",
                "UQ-1",
                "--request-id",
                "uq-1",
            ],
            None,
        )
    };
    etcd.kill(0).unwrap();
    etcd.kill(1).unwrap();
    let lost = provision("4");
    assert_eq!(lost.code, 1, "{}", lost.json);
    assert_eq!(lost.json["error"]["code"], "unavailable", "{}", lost.json);
    let says = lost.json["error"]["message"].as_str().unwrap();
    assert!(says.contains("after 4 attempts"), "{says}");
    assert!(
        says.contains(&format!("{}: unavailable", server.url())),
        "{says}"
    );
    assert!(says.contains(&format!("{nowhere}: ")), "{says}");
    etcd.restart(0).unwrap();
    etcd.restart(1).unwrap();
    let back = provision("60");
    assert_eq!(back.code, 0, "{}", back.json);
    assert_eq!(back.json["request_id"], "uq-1");
    drop(server);
    drop(etcd);
}

/// A site started while its etcd cluster has no quorum — a whole plant coming back after
/// a power cut — waits for it, saying so, and serves once the members are back.
#[test]
fn site_serve_started_without_a_quorum_waits_for_it() {
    let (mut etcd, w) = etcd_site();
    let line1 = w.path("line-1");
    enroll(&w.site, "line-1", &line1);
    // One run served: the node keeps its serving identity for the next start.
    let (code, _) = Server::start(&w.site).stop();
    assert_eq!(code, 0);
    etcd.kill(0).unwrap();
    etcd.kill(1).unwrap();
    let monitor = format!("127.0.0.1:{}", free_port());
    let (child, mut stderr) = Server::spawn(&w.site, &["--metrics-listen", &monitor]);
    let waiting = Server::line(&mut stderr);
    assert!(
        waiting["waiting_for_store"].is_string() && waiting["retry_in_s"] == 1,
        "{waiting}"
    );
    // Stations are answered meanwhile, and told why.
    let on = waiting["answering_unavailable_on"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = station_provision(&format!("https://{on}"), &line1, "e", "D-1", "r-1");
    refused.assert_error(1, "unavailable", "state store");
    let again = Server::line(&mut stderr);
    assert_eq!(again["retry_in_s"], 2, "{again}");
    etcd.restart(0).unwrap();
    etcd.restart(1).unwrap();
    // Serving once the quorum is back, where stations were answered: attach waits for
    // its `listening` line.
    let server = Server::attach(child, stderr);
    assert_eq!(server.addr, on);
    let ready = || http_get(&monitor, "/healthz/ready");
    assert!(ready().starts_with("HTTP/1.1 200"));
    // Ready says when the store stops answering, and again when it is back.
    etcd.kill(0).unwrap();
    etcd.kill(1).unwrap();
    let not_ready = ready();
    assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
    etcd.restart(0).unwrap();
    etcd.restart(1).unwrap();
    let started = Instant::now();
    while !ready().starts_with("HTTP/1.1 200") {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, _) = server.stop();
    assert_eq!(code, 0);
    drop(etcd);
}
