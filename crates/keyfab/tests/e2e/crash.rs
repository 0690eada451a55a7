//! Crash safety: the real `keyfab` process is killed with SIGKILL at random moments while
//! provisioning, 100 times. After each restart: the audit chain verifies, every key that
//! reached the client has its audit record, no key went to two devices, and the counters
//! agree with the log.

use crate::common::*;
use std::collections::{HashMap, HashSet};
use std::io::BufRead;

/// A small deterministic generator, so a failing run can be replayed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

fn key_ids(line: &serde_json::Value) -> Vec<String> {
    line["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_reuses_nothing() {
    let w = world();
    let policy = w.path("crash.toml");
    std::fs::write(
        &policy,
        "product = \"p\"\ndevices = 100000\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"pool\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\ncertificate = { subject = \"CN={device_id}\", days = 30 }\n\
         [[keys]]\nname = \"site\"\ntype = \"ed25519\"\nsource = \"site\"\n\
         [[keys]]\nname = \"fw\"\ntype = \"aes-256\"\nsource = \"derived\"\n",
    )
    .unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "crash.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);

    let mut rng = Lcg(0x6b65_7966_6162);
    let mut released: HashMap<String, Vec<String>> = HashMap::new();
    let mut previous: Vec<String> = Vec::new();
    for round in 0..100 {
        // New devices, plus a few of the last round's again (a resumed lot).
        let mut ids: Vec<String> = previous.iter().take(3).cloned().collect();
        ids.extend((0..40).map(|k| format!("C-{round:03}-{k:02}")));
        let list = w.path("lot.txt");
        std::fs::write(&list, ids.join("\n")).unwrap();
        let out = w.path(&format!("lot-{round}.jsonl"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"))
            .args(lot_args(&w.site, &id, &list, &out))
            .env("KEYFAB_PASSPHRASE", PASS)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(40 + rng.next(300)));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();

        // What reached the client: every complete line.
        if let Ok(f) = std::fs::File::open(&out) {
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let device = v["device_id"].as_str().unwrap().to_owned();
                let keys = key_ids(&v);
                if let Some(earlier) = released.insert(device.clone(), keys.clone()) {
                    assert_eq!(
                        earlier, keys,
                        "round {round}: {device} got different keys on a retry"
                    );
                }
            }
        }
        previous = ids[3..].to_vec();

        // Restart: the state must be whole.
        let node = open_site(&w.site);
        let records = keyfab_site::entitlements::audit_records(&node).unwrap();
        keyfab_audit::verify_chain(&keyfab_audit::Head::genesis(), &records)
            .unwrap_or_else(|e| panic!("round {round}: audit chain: {e}"));
        let mut audited: HashMap<String, Vec<String>> = HashMap::new();
        let mut all_keys = HashSet::new();
        let mut pool_slots = HashSet::new();
        for r in &records {
            if let keyfab_audit::Event::ProvisionAllowed {
                device_id,
                keys,
                pool_index,
                ..
            } = &r.event
            {
                let ids: Vec<String> = keys.iter().map(|k| k.key_id.clone()).collect();
                // Public-key fingerprints identify keys; a KCV (3 bytes) is only a check
                // value and may repeat by chance across devices' derived keys, which are
                // distinct by construction (HKDF of the device id).
                for k in ids.iter().filter(|k| k.starts_with("spki-sha256:")) {
                    assert!(
                        all_keys.insert(k.clone()),
                        "round {round}: key {k} went to two devices"
                    );
                }
                assert!(
                    pool_slots.insert(pool_index.unwrap()),
                    "round {round}: pool slot reused"
                );
                assert!(
                    audited.insert(device_id.clone(), ids).is_none(),
                    "round {round}: {device_id} allowed twice"
                );
            }
        }
        for (device, keys) in &released {
            assert_eq!(
                audited.get(device),
                Some(keys),
                "round {round}: {device} reached the client without its audit record"
            );
        }
        let c = keyfab_site::provision::counters(&node, &id).unwrap();
        assert_eq!(
            c.total as usize,
            audited.len(),
            "round {round}: counters disagree with the log"
        );
        assert_eq!(
            c.next_pool as usize,
            audited.len(),
            "round {round}: pool index disagrees with the log"
        );
    }
    assert!(
        released.len() > 100,
        "the kills came too early to test anything: {} devices",
        released.len()
    );
}

/// `site audit export` killed with SIGKILL at random moments, 20 times: after each, the
/// same command again writes a bundle HQ imports — never a gap, never a fork — and at
/// the end HQ holds every release exactly once.
#[test]
fn sigkill_during_export_never_leaves_hq_a_gap() {
    let w = world();
    let id = imported(
        &w,
        "product = \"p\"\ndevices = 100000\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"fw\"\ntype = \"aes-256\"\nsource = \"derived\"\n",
        "export-crash",
    );
    let mut rng = Lcg(0x6578_706f_7274);
    let (mut provisioned, mut killed) = (0u64, 0u32);
    let mut typical_ms = 400;
    for round in 0..20 {
        let ids: Vec<String> = (0..150).map(|k| format!("X-{round:02}-{k:03}")).collect();
        provision_lot(&w, &id, &ids, &w.path(&format!("lot-{round}.jsonl")), &[]);
        provisioned += 150;
        let out = w.path(&format!("round-{round}.kfa"));
        let args = [
            "site",
            "audit",
            "export",
            "--home",
            &s(&w.site),
            "--out",
            &s(&out),
        ];
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"))
            .args(args)
            .env("KEYFAB_PASSPHRASE", PASS)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed at a random moment within about how long an export takes here (with
        // identity keys in a token it takes longer): most land mid-way.
        let started = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(rng.next(typical_ms)));
        let _ = child.kill(); // SIGKILL, unless it finished first
        let status = child.wait().unwrap();
        if status.success() {
            // It finished within the pause: it takes no longer than that.
            typical_ms = typical_ms.min(started.elapsed().as_millis() as u64).max(20);
        } else {
            killed += 1;
            if out.exists() {
                // Killed once its file was in place: the file is whole (it is renamed
                // into place complete), and the same command refuses to overwrite it.
                keyfab(&args, None).assert_error(1, "invalid_input", "take it to HQ");
            } else {
                // The same command again, as an operator would; a whole export's time.
                let whole = std::time::Instant::now();
                let again = keyfab(&args, None);
                assert_eq!(again.code, 0, "round {round}: {}", again.json);
                typical_ms = (whole.elapsed().as_millis() as u64 * 3 / 2).max(20);
            }
        }
        let imported = keyfab(
            &["hq", "audit", "import", "--home", &s(&w.hq), &s(&out)],
            None,
        );
        // A bundle written again after an export cut short between its file and its
        // end is one HQ may have imported already: `replayed`, never a gap or a fork.
        if imported.code != 0 {
            imported.assert_error(4, "replayed", "already imported");
        }
    }
    assert!(
        killed >= 8,
        "only {killed} of 20 exports were killed mid-way"
    );
    // What is left since the last round's export, and the totals.
    let last = export(&w, "last.kfa");
    ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&last)]);
    let report = ok(&["hq", "report", "--home", &s(&w.hq)]);
    assert_eq!(report["violations"], serde_json::json!([]));
    assert_eq!(
        report["entitlements"][0]["released"], provisioned,
        "{report}"
    );
}
