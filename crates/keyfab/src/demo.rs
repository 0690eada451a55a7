//! `keyfab demo`: root → HQ → site → registration → entitlement → import → list, in a
//! temporary directory, saying what happens at each step.

use crate::context::Context;
use crate::output::{Failure, Report};
use crate::run;
use keyfab_node::NodeKind;
use serde_json::json;
use std::path::Path;

const DEMO_POLICY: &str = r#"# The demo entitlement: HQ allows the site to provision {devices} thermostats.
product = "thermostat-v2"
devices = {devices}
valid_from  = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"
audit_every_days = 14

[limits]
daily = {daily}
timezone = "Asia/Shanghai"

[device_ids]
id_pattern = "^TSV2-[0-9]{8}$"

[stations]
allowed = ["line-1", "line-2"]

[[keys]]
name = "identity"
type = "ec-p256"
source = "hq-pool"
certificate = { subject = "CN={device_id},O=Acme", days = 3650 }

[[keys]]
name = "firmware"
type = "aes-256"
source = "derived"
"#;

/// The demo's daily limit: small, so the demo can show a refusal over it.
const DEMO_DAILY: u64 = 3;

const GATED_POLICY: &str = r#"# A second entitlement that needs two of three approvers before any device.
product = "thermostat-v2-pilot"
devices = 10
valid_from  = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"

[[keys]]
name = "identity"
type = "ec-p256"
source = "site"
certificate = { subject = "CN={device_id},O=Acme,OU=pilot", days = 365 }

[approval]
threshold = 2
approvers = ["alice.pub", "bob.pub", "carol.pub"]
required_for = ["activate"]
"#;

pub fn policy_text(devices: u64) -> String {
    DEMO_POLICY
        .replace("{devices}", &devices.to_string())
        .replace("{daily}", &DEMO_DAILY.min(devices).to_string())
}

pub fn run(ctx: &Context, dir: Option<&Path>, devices: u64) -> Result<Report, Failure> {
    let temp;
    let base = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Failure::new("io", e.to_string()))?;
            d.to_owned()
        }
        None => {
            temp = tempfile::tempdir().map_err(|e| Failure::new("io", e.to_string()))?;
            temp.path().to_owned()
        }
    };
    let ctx = if ctx.passphrase().is_ok() {
        Context {
            passphrase_file: ctx.passphrase_file.clone(),
            json: ctx.json,
        }
    } else {
        let p = base.join("demo-passphrase");
        std::fs::write(&p, "keyfab demo passphrase - not for production\n")
            .map_err(|e| Failure::new("io", e.to_string()))?;
        Context {
            passphrase_file: Some(p),
            json: ctx.json,
        }
    };
    let (root, hq, site) = (base.join("root"), base.join("hq"), base.join("site"));
    let mut steps = Vec::new();
    let mut text = format!("keyfab demo in {}\n\n", base.display());
    let mut step = |title: &str, why: &str, r: Report| {
        text.push_str(&format!(
            "== {title}\n   {why}\n   {}\n\n",
            r.text.trim_end().replace('\n', "\n   ")
        ));
        steps.push(json!({"step": title, "result": r.json}));
    };

    step(
        "1. root CA",
        "The manufacturer's offline root: every key anyone relies on chains to it.",
        run::init_root(&ctx, &root, "CN=Acme Root CA,O=Acme", 7300)?,
    );
    let root_cert = root.join("root.crt");
    step(
        "2. HQ cluster",
        "HQ creates its state and a CSR for its cluster certificate.",
        run::init_node(&ctx, &hq, NodeKind::Hq, "acme-hq")?,
    );
    step(
        "3. root signs HQ",
        "The root issues a cluster CA whose role is hq, for ever.",
        run::issue(
            &ctx,
            &root,
            &hq.join("cluster.csr"),
            "hq",
            &base.join("hq.crt"),
            1825,
        )?,
    );
    step(
        "4. HQ installs it",
        "HQ checks the certificate against the root and issues its own service keys.",
        run::install_cert(&ctx, &hq, NodeKind::Hq, &base.join("hq.crt"), &root_cert)?,
    );
    step(
        "5. site cluster",
        "The factory site does the same with role site.",
        run::init_node(&ctx, &site, NodeKind::Site, "shenzhen-1")?,
    );
    step(
        "6. root signs the site",
        "A site certificate can never act as HQ.",
        run::issue(
            &ctx,
            &root,
            &site.join("cluster.csr"),
            "site",
            &base.join("site.crt"),
            1825,
        )?,
    );
    step(
        "7. site installs it",
        "The site now has a signing key and an HPKE encryption key.",
        run::install_cert(
            &ctx,
            &site,
            NodeKind::Site,
            &base.join("site.crt"),
            &root_cert,
        )?,
    );
    let kfi = base.join("shenzhen-1.kfi");
    step(
        "8. site identity",
        "The site signs its identity file; it travels to HQ as a file.",
        run::identity_export(&ctx, &site, &kfi)?,
    );
    step(
        "9. HQ registers the site",
        "HQ accepts it only because it chains to HQ's own root with role site.",
        run::site_add(&ctx, &hq, &kfi)?,
    );
    let policy = base.join("policy.toml");
    std::fs::write(&policy, policy_text(devices)).map_err(|e| Failure::new("io", e.to_string()))?;
    let kfe = base.join("thermostat.kfe");
    step(
        "10. HQ issues an entitlement",
        "Keys generated at HQ, encrypted to the site's key, signed by HQ.",
        run::entitlement_create(&ctx, &hq, "shenzhen-1", &policy, &kfe)?,
    );
    let imported = run::entitlement_import(&ctx, &site, &kfe)?;
    let id = imported.json["id"].as_str().unwrap_or_default().to_owned();
    step("11. site imports it", "Size, signature, chain and role, recipient, replay: checked before anything is decrypted or stored.",
        imported);
    let replay = run::entitlement_import(&ctx, &site, &kfe);
    let replay_text = match &replay {
        Err(f) => format!("refused as expected: error[{}] {}", f.code, f.message),
        Ok(_) => "UNEXPECTED: the replay was accepted".into(),
    };
    step(
        "12. the same file again",
        "A replayed entitlement is refused and changes nothing.",
        Report::new(
            replay_text,
            json!({"refused": replay.is_err(), "code": replay.as_ref().err().map(|f| f.code)}),
        ),
    );
    step(
        "13. site lists its entitlements",
        "The policy and key counts the site will enforce.",
        run::entitlement_list(&ctx, &site)?,
    );
    if replay.is_ok() {
        return Err(Failure::new(
            "internal",
            "the demo's replay check was not refused",
        ));
    }
    let provision = |device: &str, out: Option<std::path::PathBuf>| {
        run::provision(
            &ctx,
            &crate::cli::ProvisionArgs {
                home: crate::cli::Home { home: site.clone() },
                entitlement: id.clone(),
                device_id: Some(device.to_owned()),
                device_ids: None,
                station: Some("line-1".into()),
                request_id: None,
                csr: None,
                out,
            },
        )
    };
    let daily = DEMO_DAILY.min(devices);
    for n in 1..=daily {
        let device = format!("TSV2-{n:08}");
        let out = base.join(format!("{device}.json"));
        step(
            &format!("14.{n} provision {device}"),
            "Decided under the policy and recorded durably before its keys are released (to a 0600 file).",
            provision(&device, Some(out))?,
        );
    }
    let over = format!("TSV2-{:08}", daily + 1);
    let refused = provision(&over, None);
    let refused_text = match &refused {
        Err(f) => format!("refused as expected: error[{}] {}", f.code, f.message),
        Ok(_) => "UNEXPECTED: allowed over the daily limit".into(),
    };
    step(
        &format!("15. provision {over}"),
        "The daily limit is reached: refused with its code, and the refusal is audited too.",
        Report::new(
            refused_text,
            json!({"refused": refused.is_err(), "code": refused.as_ref().err().map(|f| f.code)}),
        ),
    );
    if refused.is_ok() {
        return Err(Failure::new(
            "internal",
            "the demo's daily limit was not enforced",
        ));
    }

    // An approval round on a second entitlement.
    for who in ["alice", "bob", "carol"] {
        run::approver_keygen(&ctx, &base.join(who))?;
    }
    let gated_policy = base.join("pilot.toml");
    std::fs::write(&gated_policy, GATED_POLICY).map_err(|e| Failure::new("io", e.to_string()))?;
    let gated_kfe = base.join("pilot.kfe");
    let created = run::entitlement_create(&ctx, &hq, "shenzhen-1", &gated_policy, &gated_kfe)?;
    let gated = created.json["id"].as_str().unwrap_or_default().to_owned();
    step(
        "16. HQ issues a pilot entitlement",
        "Its policy needs 2 of 3 listed approvers (alice, bob, carol) before any device.",
        created,
    );
    step(
        "17. site imports it",
        "It stays pending until the quorum approves.",
        run::entitlement_import(&ctx, &site, &gated_kfe)?,
    );
    let req = base.join("activate.req");
    step(
        "18. site asks for approval",
        "A request bound to this site, the entitlement, the action, a nonce and an expiry.",
        run::approval_request(&ctx, &site, &gated, "activate", &req, 72)?,
    );
    let mut approvals = Vec::new();
    for who in ["alice", "bob"] {
        let out = base.join(format!("{who}.approval"));
        step(
            &format!("19. {who} signs"),
            "Offline, with a personal key the signed policy lists.",
            run::approver_sign(&base.join(format!("{who}.key")), &req, &out)?,
        );
        approvals.push(out);
    }
    step(
        "20. site submits the approvals",
        "Two distinct listed keys meet the threshold: the entitlement is activated (audited).",
        run::approval_submit(&ctx, &site, &approvals)?,
    );
    let pilot = run::provision(
        &ctx,
        &crate::cli::ProvisionArgs {
            home: crate::cli::Home { home: site.clone() },
            entitlement: gated.clone(),
            device_id: Some("PILOT-0001".into()),
            device_ids: None,
            station: None,
            request_id: None,
            csr: None,
            out: Some(base.join("PILOT-0001.json")),
        },
    )?;
    step(
        "21. provision a pilot device",
        "Activated, the pilot entitlement now provisions: a key generated at the site, with its certificate.",
        pilot,
    );
    step(
        "22. site verifies its audit log",
        "Every import, decision and approval, hash-chained; the Merkle root is what HQ will check.",
        run::audit_verify(&ctx, &site)?,
    );
    let kfa = base.join("shenzhen-1.kfa");
    step(
        "23. site exports its audit for HQ",
        "Records since the last export, the signed checkpoint and a consistency proof; encrypted to HQ, signed by the site.",
        run::audit_export(&ctx, &site, &kfa, false)?,
    );
    let kfk = base.join("shenzhen-1.kfk");
    step(
        "24. HQ imports and reconciles it",
        "Verified, checked for gaps and forks, every decision re-run through the same policy code; HQ signs a receipt.",
        run::audit_import(&ctx, &hq, &kfa, Some(&kfk))?,
    );
    step(
        "25. site imports HQ's receipt",
        "The acknowledged checkpoint: a later restore of an older copy of the site is detected.",
        run::receipt_import(&ctx, &site, &kfk)?,
    );
    step(
        "26. HQ's report",
        "Per site and entitlement: today against the daily limit, total against the quota, refusals, violations.",
        run::hq_report(&ctx, &hq, "text", Some(&base.join("report.txt")))?,
    );
    step(
        "27. the same report as HTML",
        "One self-contained file with charts (devices per day against the limit, quota, refusals), for a browser, offline.",
        run::hq_report(&ctx, &hq, "html", Some(&base.join("report.html")))?,
    );
    text.push_str(if dir.is_some() {
        "Files are kept in the directory above.\n"
    } else {
        "The temporary directory is removed now.\n"
    });
    Ok(Report::new(text, json!({"dir": base, "steps": steps})))
}
