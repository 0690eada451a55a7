//! Every site command against a serving site: while `site serve` holds the home and
//! stations keep provisioning, the site's commands reach its store through
//! `HOME/serve.sock` — with the same arguments, output and exit codes as when it is
//! stopped — and nothing a station asked for is lost or answered twice.

use crate::common::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// An entitlement for product `product` at the world's site, created at HQ: its file
/// and id.
fn entitlement(w: &World, product: &str) -> (std::path::PathBuf, String) {
    let policy = w.path(&format!("{product}.toml"));
    std::fs::write(
        &policy,
        SITE_KEYS.replace("\"busy\"", &format!("\"{product}\"")),
    )
    .unwrap();
    create_from(w, "shenzhen-1", &policy, &format!("{product}.kfe"))
}

/// One station request as a worker saw it.
struct Asked {
    device: String,
    request: String,
    started: Instant,
    out: Out,
}

/// Station `dir` provisions devices of entitlement `id` one after another until `stop`.
fn keep_provisioning(url: &str, dir: &Path, id: &str, tag: &str, stop: &AtomicBool) -> Vec<Asked> {
    let mut asked = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (device, request) = (format!("{tag}-{i:05}"), format!("{tag}-q{i}"));
        let started = Instant::now();
        let out = station_provision(url, dir, id, &device, &request);
        asked.push(Asked {
            device,
            request,
            started,
            out,
        });
    }
    asked
}

/// Sets the flag when dropped: workers stop even if the test fails mid-way.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A command run against the serving site and the same against the stopped one give the
/// same exit code and output (`--json`).
fn same_served_and_stopped(served: &[(Vec<String>, Out)]) {
    for (args, before) in served {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let after = keyfab(&args, None);
        assert_eq!(
            (before.code, &before.json),
            (after.code, &after.json),
            "{args:?}"
        );
    }
}

#[test]
fn every_site_command_reaches_a_serving_site_and_the_line_loses_nothing() {
    let w = world();
    let site = s(&w.site);
    let (kept_kfe, kept) = entitlement(&w, "kept");
    let (revoked_kfe, revoked) = entitlement(&w, "revoked");
    assert_eq!(import(&w.site, &kept_kfe, None).code, 0);
    assert_eq!(import(&w.site, &revoked_kfe, None).code, 0);
    let (line1, line2) = (w.path("line-1"), w.path("line-2"));
    enroll(&w.site, "line-1", &line1);
    enroll(&w.site, "line-2", &line2);
    let line3 = w.path("line-3");
    enroll(&w.site, "line-3", &line3);
    let server = Server::start(&w.site);
    let url = server.url();
    let stop = AtomicBool::new(false);

    let (kept_asked, revoked_asked, revoked_at, cli_devices, programmed) = std::thread::scope(
        |scope| {
            // A simulated line at full speed throughout, besides the two stations that
            // each ask one device at a time.
            let simulated = scope.spawn(|| {
                ok(&[
                    "station",
                    "run",
                    "--url",
                    &url,
                    "--station-dir",
                    &s(&line3),
                    "--root-cert",
                    &s(&w.root.join("root.crt")),
                    "--entitlement",
                    &kept,
                    "--devices",
                    "4000",
                    "--concurrency",
                    "8",
                    "--device-prefix",
                    "SIM-",
                ])
            });
            let on_kept = scope.spawn(|| keep_provisioning(&url, &line1, &kept, "K", &stop));
            let on_revoked = scope.spawn(|| keep_provisioning(&url, &line2, &revoked, "R", &stop));
            let _stop_anyway = StopOnDrop(&stop);
            std::thread::sleep(Duration::from_millis(1500));

            // A new entitlement, imported while serving, serves at once.
            let (new_kfe, new_id) = entitlement(&w, "new");
            let imported = ok(&[
                "site",
                "entitlement",
                "import",
                "--home",
                &site,
                &s(&new_kfe),
            ]);
            assert_eq!(imported["id"], new_id.as_str(), "{imported}");
            let o = station_provision(&url, &line1, &new_id, "N-00001", "n-1");
            assert_eq!(o.code, 0, "{}", o.json);
            // The same file again: refused as when stopped.
            let again = keyfab(
                &[
                    "site",
                    "entitlement",
                    "import",
                    "--home",
                    &site,
                    &s(&new_kfe),
                ],
                None,
            );
            again.assert_error(4, "replayed", "already imported");
            let listed = ok(&["site", "entitlement", "list", "--home", &site]);
            assert_eq!(
                listed["entitlements"].as_array().unwrap().len(),
                3,
                "{listed}"
            );

            // An entitlement that needs an approver's signature: requested, signed and
            // submitted while the line runs, it serves from then on.
            ok(&["approver", "keygen", "--out", &s(&w.path("alice"))]);
            let gated_policy = w.path("gated.toml");
            std::fs::write(
            &gated_policy,
            SITE_KEYS.replace("\"busy\"", "\"gated\"")
                + "[approval]\nthreshold = 1\napprovers = [\"alice.pub\"]\nrequired_for = [\"activate\"]\n",
        )
        .unwrap();
            let (gated_kfe, gated) = create_from(&w, "shenzhen-1", &gated_policy, "gated.kfe");
            ok(&[
                "site",
                "entitlement",
                "import",
                "--home",
                &site,
                &s(&gated_kfe),
            ]);
            let o = station_provision(&url, &line1, &gated, "G-00001", "g-1");
            o.assert_error(3, "approval_required", "");
            let req = w.path("activate.req");
            approval_request(&w, &gated, "activate", &req);
            let signed = w.path("alice.approval");
            sign_approval(&w, "alice", &req, &signed);
            let submitted = ok(&["site", "approval", "submit", "--home", &site, &s(&signed)]);
            assert_eq!(submitted["results"][0]["activated"], true, "{submitted}");
            let o = station_provision(&url, &line1, &gated, "G-00002", "g-2");
            assert_eq!(o.code, 0, "{}", o.json);

            // The site's own CLI provisions too, through the same store.
            let cli = provision(&w, &kept, "C-00001", &["--request-id", "c-1"], None);
            assert_eq!(cli.code, 0, "{}", cli.json);

            // A revocation: from its commit on, that entitlement's requests are refused.
            let kfr = w.path("revoked.kfr");
            revoke(&w, &revoked, Some("line closed"), &kfr);
            let applied = ok(&["site", "entitlement", "import", "--home", &site, &s(&kfr)]);
            let revoked_at = Instant::now();
            assert!(applied.to_string().contains(revoked.as_str()), "{applied}");
            std::thread::sleep(Duration::from_millis(1000));

            // Audit export, HQ's import and receipt, all while the line runs.
            let kfa = w.path("served.kfa");
            ok(&[
                "site",
                "audit",
                "export",
                "--home",
                &site,
                "--out",
                &s(&kfa),
            ]);
            let kfk = w.path("served.kfk");
            let hq = hq_import_with_receipt(&w, &kfa, &kfk);
            assert_eq!(hq["violations"], serde_json::json!([]), "{hq}");
            ok(&["site", "receipt", "import", "--home", &site, &s(&kfk)]);
            ok(&["site", "rotate-keys", "--home", &site]);
            ok(&[
                "site",
                "config",
                "--home",
                &site,
                "--clock-tolerance",
                "120",
            ]);
            ok(&["site", "audit", "verify", "--home", &site]);
            ok(&[
                "site",
                "audit",
                "checkpoint",
                "--home",
                &site,
                "--out",
                &s(&w.path("c.kcp")),
            ]);
            let status = ok(&["site", "status", "--home", &site]);
            let seen: Vec<&str> = status["serving"]["stations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|st| st["name"].as_str().unwrap())
                .collect();
            assert_eq!(seen, ["line-1", "line-2", "line-3"], "{status}");
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, Ordering::Relaxed);
            let line = simulated.join().unwrap();
            assert_eq!(line["failed"], 0, "{line}");
            (
                on_kept.join().unwrap(),
                on_revoked.join().unwrap(),
                revoked_at,
                ["C-00001"],
                line["programmed"].as_u64().unwrap(),
            )
        },
    );

    // Served and stopped answer the same.
    let commands: Vec<Vec<String>> = [
        vec!["site", "entitlement", "list"],
        vec!["site", "station", "list"],
        vec!["site", "audit", "verify"],
        vec!["site", "entitlement", "import", &s(&revoked_kfe)],
    ]
    .into_iter()
    .map(|mut a| {
        a.splice(3..3, ["--home", site.as_str()]);
        a.into_iter().map(str::to_owned).collect()
    })
    .collect();
    let served: Vec<(Vec<String>, Out)> = commands
        .into_iter()
        .map(|args| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = keyfab(&refs, None);
            (args, out)
        })
        .collect();
    assert_eq!(served[3].1.code, 4, "{}", served[3].1.json);
    let (code, _) = server.stop();
    assert_eq!(code, 0);
    same_served_and_stopped(&served);

    // The kept entitlement's line went on throughout: every request got keys, and each
    // is still answered the same (nothing lost, nothing decided twice).
    assert!(kept_asked.len() >= 10, "only {} requests", kept_asked.len());
    for a in &kept_asked {
        assert_eq!(a.out.code, 0, "{}: {}", a.device, a.out.json);
    }
    // The revoked one: keys before the revocation, `revoked` for every request made after.
    let mut revoked_released = 0;
    for a in &revoked_asked {
        if a.started > revoked_at {
            a.out.assert_error(3, "revoked", "");
        } else if a.out.code == 0 {
            revoked_released += 1;
        }
    }
    assert!(revoked_released > 0);
    for a in kept_asked
        .iter()
        .chain(revoked_asked.iter().filter(|a| a.out.code == 0))
    {
        let id = if a.device.starts_with('K') {
            &kept
        } else {
            &revoked
        };
        let again = provision(
            &w,
            id,
            &a.device,
            &[
                "--request-id",
                &a.request,
                "--station",
                if a.device.starts_with('K') {
                    "line-1"
                } else {
                    "line-2"
                },
            ],
            None,
        );
        assert_eq!(again.code, 0, "{}", again.json);
        assert_eq!(again.json["replayed"], true, "{}", again.json);
        assert_eq!(
            again.json["audit_sequence"], a.out.json["audit_sequence"],
            "{}",
            a.device
        );
    }
    // HQ counts exactly what the stations and the CLI got, and finds nothing wrong.
    let report = hq_finds_no_violations(&w, "after.kfa");
    let released = |id: &str| {
        report["entitlements"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["entitlement"] == id)
            .map(|e| e["released"].as_u64().unwrap())
    };
    assert_eq!(
        released(&kept),
        Some((kept_asked.len() + cli_devices.len()) as u64 + programmed)
    );
    assert_eq!(released(&revoked), Some(revoked_released));
}
