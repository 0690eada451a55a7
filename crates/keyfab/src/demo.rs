//! `keyfab demo`: the whole journey (README, "The journey") with real processes, in a temporary
//! directory, saying what happens at each step: root, HQ, site, an entitlement with a
//! 2-of-3 quorum and its approvals, `site serve`, two stations provisioning concurrently
//! with keys sealed to each chip, a device burned after failed programming, one refused
//! over the daily limit, then export, HQ import and reconciliation, and the report.

use crate::context::Context;
use crate::output::{Failure, Report};
use crate::run;
use keyfab_crypto::x509;
use keyfab_node::Code;
use keyfab_node::NodeKind;
use keyfab_policy::Lifetime;
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
certificate = { subject = "CN={device_id},O=Acme", days = "forever" }

[[keys]]
name = "firmware"
type = "aes-256"
source = "derived"

[approval]
threshold = 2
approvers = ["alice.pub", "bob.pub", "carol.pub"]
required_for = ["activate"]

# Every chip proves itself with the certificate its vendor gave its key: keys are
# sealed only to a key a listed vendor certified, for the device the certificate names.
[chips]
attestation = "required"
roots = ["chip-vendor/vendor-root.crt"]
device_id_from = "subject-serial"
"#;

/// The demo's daily limit: small, so the demo can show a refusal over it.
const DEMO_DAILY: u64 = 5;

pub(crate) fn policy_text(devices: u64) -> String {
    DEMO_POLICY
        .replace("{devices}", &devices.max(DEMO_DAILY + 1).to_string())
        .replace("{daily}", &DEMO_DAILY.to_string())
}

pub(crate) fn run(ctx: &Context, dir: Option<&Path>, devices: u64) -> Result<Report, Failure> {
    let temp;
    let base = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Failure::new(Code::Io, e.to_string()))?;
            // The demo makes a root, an HQ and a site of its own: in a directory that
            // already has some (an earlier demo), its first step would fail.
            let used = std::fs::read_dir(d)
                .map_err(|e| Failure::new(Code::Io, e.to_string()))?
                .next()
                .is_some();
            if used {
                return Err(Failure::new(
                    Code::InvalidInput,
                    format!(
                        "--dir {}: not empty; the demo needs a new or empty directory (or none: a temporary one)",
                        d.display()
                    ),
                ));
            }
            d.to_owned()
        }
        None => {
            temp = tempfile::tempdir().map_err(|e| Failure::new(Code::Io, e.to_string()))?;
            temp.path().to_owned()
        }
    };
    let ctx = if ctx.passphrase().is_ok() {
        Context {
            passphrase_file: ctx.passphrase_file.clone(),
            unseal_share_files: ctx.unseal_share_files.clone(),
            json: ctx.json,
        }
    } else {
        let p = base.join("demo-passphrase");
        std::fs::write(&p, "keyfab demo passphrase - not for production\n")
            .map_err(|e| Failure::new(Code::Io, e.to_string()))?;
        Context {
            passphrase_file: Some(p),
            unseal_share_files: Vec::new(),
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
        run::init_root(&ctx, &root, "CN=Acme Root CA,O=Acme", Lifetime::Forever)?,
    );
    let root_cert = root.join("root.crt");
    step(
        "2. HQ cluster",
        "HQ creates its state and a CSR for its cluster certificate.",
        run::init_node(
            &ctx,
            &crate::cli::InitArgs::with_passphrase(&hq, "acme-hq"),
            NodeKind::Hq,
        )?,
    );
    step(
        "3. root signs HQ",
        "The root issues a cluster CA whose role is hq, for ever.",
        run::issue(
            &ctx,
            &root,
            &hq.join("cluster.csr"),
            crate::cli::CertRole::Hq,
            &base.join("hq.crt"),
            None,
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
        run::init_node(
            &ctx,
            &crate::cli::InitArgs::with_passphrase(&site, "shenzhen-1"),
            NodeKind::Site,
        )?,
    );
    step(
        "6. root signs the site",
        "A site certificate can never act as HQ.",
        run::issue(
            &ctx,
            &root,
            &site.join("cluster.csr"),
            crate::cli::CertRole::Site,
            &base.join("site.crt"),
            None,
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
    for who in ["alice", "bob", "carol"] {
        run::approver_keygen(&ctx, &base.join(who), false)?;
    }
    let vendor_dir = base.join("chip-vendor");
    let vendor = run::init_chip_vendor(
        &ctx,
        &vendor_dir,
        "CN=Drill Chips Root,O=Drill Semiconductors",
    )?;
    step(
        "10. three approvers make their keys; the chip vendor publishes its root",
        "alice, bob and carol each keep a private key; HQ lists their public keys in the policy. The chips' vendor certifies each chip's key at its factory (a drill vendor here): the policy lists its root and requires every chip to prove itself against it.",
        Report::new(
            format!("alice.key/.pub, bob.key/.pub, carol.key/.pub; {}", vendor.text.trim_end()),
            json!({"approvers": ["alice", "bob", "carol"], "chip_vendor": vendor.json}),
        ),
    );
    let policy = base.join("policy.toml");
    std::fs::write(&policy, policy_text(devices))
        .map_err(|e| Failure::new(Code::Io, e.to_string()))?;
    let kfe = base.join("thermostat.kfe");
    step(
        "11. HQ issues an entitlement",
        "Keys generated at HQ, encrypted to the site's key, signed by HQ; the policy needs 2 of 3 approvers before any device.",
        Report::of(&run::entitlement_create(&ctx, &hq, "shenzhen-1", &policy, &kfe)?)?,
    );
    let imported = run::entitlement_import(&ctx, &site, &kfe)?;
    let id = imported.entitlement().to_owned();
    step("12. site imports it", "Size, signature, chain and role, recipient, replay: checked before anything is decrypted or stored. It waits for its quorum.",
        Report::of(&imported)?);
    let replay = run::entitlement_import(&ctx, &site, &kfe);
    let replay_text = match &replay {
        Err(f) => format!("refused as expected: error[{}] {}", f.code, f.message),
        Ok(_) => "UNEXPECTED: the replay was accepted".into(),
    };
    step(
        "13. the same file again",
        "A replayed entitlement is refused and changes nothing.",
        Report::new(
            replay_text,
            json!({"refused": replay.is_err(), "code": replay.as_ref().err().map(|f| f.code.as_str())}),
        ),
    );
    if replay.is_ok() {
        return Err(Failure::new(
            Code::Internal,
            "the demo's replay check was not refused",
        ));
    }
    let req = base.join("activate.req");
    step(
        "14. site asks for approval",
        "A request bound to this site, the entitlement, the action, a nonce and an expiry, with what the approvers approve (product, quota, window, stations), signed by the site.",
        run::approval_request(
            &ctx,
            &site,
            &id,
            keyfab_site::approvals::Ask::Activate,
            &req,
            72,
        )?,
    );
    let mut approvals = Vec::new();
    for (n, who) in ["alice", "bob"].iter().enumerate() {
        let out = base.join(format!("{who}.approval"));
        step(
            &format!("15.{} {who} signs", n + 1),
            "Offline, with a personal key the signed policy lists, after checking the site's signature up to the root and reading what the request approves (--yes: the demo has read it).",
            run::approver_sign(
                &ctx,
                &base.join(format!("{who}.key")),
                (&root_cert, &req),
                &out,
                true,
            )?,
        );
        approvals.push(out);
    }
    step(
        "16. site submits the approvals",
        "Two distinct listed keys meet the threshold: the entitlement is activated (audited).",
        run::approval_submit(&ctx, &site, &approvals)?,
    );
    let lines = [base.join("line-1"), base.join("line-2")];
    for (n, dir) in lines.iter().enumerate() {
        step(
            &format!("17.{} site enrolls station line-{}", n + 1, n + 1),
            "A key and a certificate from the site's own line CA, for the station's directory.",
            crate::line::station_issue(&ctx, &site, (&format!("line-{}", n + 1), dir, 30), false)?,
        );
    }
    let server = crate::line::ServeChild::start(&ctx, &site, &[])?;
    step(
        "18. site serve starts",
        "The station API in a process of its own, over mutual TLS 1.3: only this site's stations get past the handshake.",
        Report::new(
            format!("listening on {}", server.url),
            json!({"url": server.url}),
        ),
    );
    let root_der = x509::from_pem(
        &std::fs::read_to_string(&root_cert).map_err(|e| Failure::new(Code::Io, e.to_string()))?,
        "CERTIFICATE",
    )
    .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    let internal = |e: keyfab_station::StationError| Failure::new(Code::Internal, e.to_string());
    let clients = lines
        .iter()
        .map(|dir| {
            let vendor = keyfab_station::chip_vendor::ChipVendor::open(&vendor_dir)?;
            keyfab_station::StationDir::load(dir)
                .and_then(|d| keyfab_station::Client::new(&d, std::slice::from_ref(&server.url)))
                .map(|c| c.with_chip_vendor(vendor))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(internal)?;
    // Two lines at once, two devices each, every chip with its own transport key.
    let reports: Vec<keyfab_station::LineReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(n, client)| {
                let (id, root) = (id.clone(), root_der.clone());
                let devices = vec![
                    format!("TSV2-{:08}", 2 * n + 1),
                    format!("TSV2-{:08}", 2 * n + 2),
                ];
                scope.spawn(move || {
                    keyfab_station::run_line(client, &id, devices, 2, &root, &|_, _| {})
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let programmed: u64 = reports.iter().map(|r| r.programmed).sum();
    step(
        "19. two stations provision at once",
        "line-1 and line-2, two devices each. Each chip sends the certificate its vendor gave its transport key; the site checks it against the policy's vendor root, then seals the device's keys to that key (HPKE, bound to the device id): the stations carry only ciphertext. Each chip opens its keys, checks its certificate up to the root, and the station confirms it programmed.",
        Report::new(
            format!(
                "{programmed} devices programmed (line-1: {}, line-2: {})",
                reports.first().map_or(0, |r| r.programmed),
                reports.get(1).map_or(0, |r| r.programmed)
            ),
            json!({"programmed": programmed}),
        ),
    );
    if programmed != 4 {
        return Err(Failure::new(
            Code::Internal,
            "the demo's stations did not program 4 devices",
        ));
    }
    step(
        "20. a compromised station substitutes its own key",
        "line-2 forwards TSV2-00000007's genuine certificate chain with a transport key it made itself, to open the keys on its own: the chip's certificate does not certify that key, so the site refuses (audited) and no key leaves.",
        substituted(&clients[1], &id)?,
    );
    // A fifth device whose programming fails: its keys are burned.
    let chip = clients[0]
        .line_chip(&id, "TSV2-00000005")
        .map_err(internal)?;
    let failed = (|| {
        let req = keyfab_station::ProvisionRequest {
            request_id: "demo-5".into(),
            entitlement: id.clone(),
            device_id: "TSV2-00000005".into(),
            csr: None,
            transport_key: chip.transport_key().ok(),
            chip_certificates: chip.certificates_base64(),
        };
        clients[0].provision(&req)?;
        let confirmed = clients[0].confirm(&id, "TSV2-00000005", "failed")?;
        let again = clients[0].provision(&req);
        Ok::<_, keyfab_station::StationError>((confirmed, again.is_err()))
    })()
    .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    step(
        "21. a device fails programming",
        "line-1 reports TSV2-00000005 failed: the failure is audited and its keys are burned. A retry of the same request gets nothing.",
        Report::new(
            format!(
                "confirmed failed (audit record {}); retry refused: {}",
                failed.0["audit_sequence"], failed.1
            ),
            json!({"confirmed": failed.0, "retry_refused": failed.1}),
        ),
    );
    let sixth = clients[1]
        .line_chip(&id, "TSV2-00000006")
        .map_err(internal)?;
    let over = clients[1].provision(&keyfab_station::ProvisionRequest {
        request_id: "demo-6".into(),
        entitlement: id.clone(),
        device_id: "TSV2-00000006".into(),
        csr: None,
        transport_key: sixth.transport_key().ok(),
        chip_certificates: sixth.certificates_base64(),
    });
    let code = match &over {
        Err(keyfab_station::StationError::Refused { code, .. }) => code.clone(),
        _ => String::new(),
    };
    step(
        "22. one device too many today",
        "Five devices today is the policy's daily limit: the sixth is refused with its code, and the refusal is audited too.",
        Report::new(
            format!("refused as expected: {code}"),
            json!({"refused": over.is_err(), "code": code}),
        ),
    );
    if code != "daily_limit_exceeded" {
        return Err(Failure::new(
            Code::Internal,
            "the demo's daily limit was not enforced",
        ));
    }
    let stopped = server.stop()?;
    step(
        "23. site serve stops",
        "SIGTERM: no new connections; requests in flight finish; nothing is lost.",
        Report::new(
            format!("stopped after {} connections", stopped["connections"]),
            stopped,
        ),
    );
    step(
        "24. site verifies its audit log",
        "Every import, approval, enrollment, decision and confirmation, hash-chained; the Merkle root is what HQ will check.",
        run::audit_verify(&ctx, &site)?,
    );
    let kfa = base.join("shenzhen-1.kfa");
    step(
        "25. site exports its audit for HQ",
        "Records since the last export, the signed checkpoint and a consistency proof; encrypted to HQ, signed by the site.",
        run::audit_export(&ctx, &site, &kfa, false)?,
    );
    let kfk = base.join("shenzhen-1.kfk");
    step(
        "26. HQ imports and reconciles it",
        "Verified, checked for gaps and forks, every decision re-run through the same policy code; HQ signs a receipt.",
        run::audit_import(&ctx, &hq, &kfa, Some(&kfk))?,
    );
    step(
        "27. site imports HQ's receipt",
        "The acknowledged checkpoint: a later restore of an older copy of the site is detected.",
        run::receipt_import(&ctx, &site, &kfk)?,
    );
    step(
        "28. HQ's report",
        "Per site and entitlement: today against the daily limit, total against the quota, programmed and burned, refusals, violations.",
        run::hq_report(&ctx, &hq, crate::cli::ReportFormat::Text, None)?,
    );
    step(
        "29. the same report as HTML",
        "One self-contained file with charts (devices per day against the limit, quota, refusals), for a browser, offline.",
        run::hq_report(
            &ctx,
            &hq,
            crate::cli::ReportFormat::Html,
            Some(&base.join("report.html")),
        )?,
    );
    step(
        "30. a cloud registers the devices",
        "HQ's manifest lists the devices to register (the burned one is left out) and the batch CA to trust; a cloud checks each certificate as a TLS server checks a client: clientAuth, chain to the root, now and in 2100 (its certificates never expire).",
        cloud_check(&ctx, &hq, &id, (&root_der, &root_cert), &base)?,
    );
    step(
        "31. HQ revokes a device",
        "TSV2-00000004 is reported stolen: HQ revokes its certificate (recorded at HQ) and signs a CRL with the batch CA key it keeps.",
        run::device_revoke(
            &ctx,
            &hq,
            (&id, "TSV2-00000004"),
            keyfab_crypto::x509::CrlReason::KeyCompromise,
            false,
        )?,
    );
    let crl = base.join("batch.crl");
    step(
        "32. the CRL",
        "RFC 5280 CRL v2 of the entitlement's batch CA, published where the profile's CRL URL points.",
        run::hq_crl(&ctx, &hq, &id, &crl, 7)?,
    );
    step(
        "33. the cloud checks the CRL",
        "The same TLS client check with the CRL: the stolen device is refused, the others still pass.",
        crl_check(&ctx, &hq, &id, (&root_der, &root_cert), &crl)?,
    );
    text.push_str(if dir.is_some() {
        "Files are kept in the directory above.\n"
    } else {
        "The temporary directory is removed now.\n"
    });
    Ok(Report::new(text, json!({"dir": base, "steps": steps})))
}

/// Step 20: a station sends a genuine chip's chain with a transport key of its own.
fn substituted(client: &keyfab_station::Client, id: &str) -> Result<Report, Failure> {
    use base64::Engine;
    let device = "TSV2-00000007";
    let genuine = client
        .line_chip(id, device)
        .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    let own = keyfab_crypto::hpke::HpkeSecretKey::generate(&keyfab_crypto::rng::SystemRng);
    let own_public = own
        .public_key()
        .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    let answer = client.provision(&keyfab_station::ProvisionRequest {
        request_id: "demo-7".into(),
        entitlement: id.to_owned(),
        device_id: device.into(),
        csr: None,
        transport_key: Some(base64::engine::general_purpose::STANDARD.encode(own_public.sec1())),
        chip_certificates: genuine.certificates_base64(),
    });
    let (code, message) = match &answer {
        Err(keyfab_station::StationError::Refused { code, message, .. }) => {
            (code.clone(), message.clone())
        }
        _ => (String::new(), String::new()),
    };
    if code != "chip_key_mismatch" {
        return Err(Failure::new(
            Code::Internal,
            "the demo's substituted transport key was not refused",
        ));
    }
    Ok(Report::new(
        format!("refused as expected: {code}: {message}"),
        json!({"refused": true, "code": code}),
    ))
}

/// Step 30: the manifest, and each device certificate in it verified for TLS client
/// authentication against the root, now and on 2100-01-01.
fn cloud_check(
    ctx: &Context,
    hq: &Path,
    id: &str,
    (root, root_file): (&[u8], &Path),
    base: &Path,
) -> Result<Report, Failure> {
    const YEAR_2100: i64 = 4_102_444_800;
    let (out, ca_out) = (base.join("devices.csv"), base.join("batch-ca.pem"));
    run::hq_manifest(
        ctx,
        hq,
        &run::ManifestArgs {
            entitlement: id,
            format: crate::cli::ManifestFormat::Csv,
            out: &out,
            include_failed: false,
            key: None,
            ca_out: Some(&ca_out),
        },
    )?;
    let node = ctx.open(hq, NodeKind::Hq)?;
    let (issued, rows) = keyfab_hq::report::manifest(&node, id, false)?;
    let chain = keyfab_hq::report::ca_chain(&node, &issued)?;
    let intermediates = &chain[..2];
    let mut verified = Vec::new();
    for row in &rows {
        for at in [ctx.now()?, keyfab_crypto::time::UnixTime(YEAR_2100)] {
            x509::verify_client_certificate(root, intermediates, &row.certificate_der, at, None)
                .map_err(|e| {
                    Failure::new(
                        Code::Internal,
                        format!(
                            "device {}: its certificate does not verify: {e}",
                            row.device_id
                        ),
                    )
                })?;
        }
        // Each certificate as a file too, for checking by hand with any tool.
        let file = base.join(format!("{}.crt", row.device_id));
        std::fs::write(&file, x509::to_pem(&row.certificate_der, "CERTIFICATE"))
            .map_err(|e| Failure::new(Code::Io, format!("{}: {e}", file.display())))?;
        verified.push(row.device_id.clone());
    }
    Ok(Report::new(
        format!(
            "{} devices in {} (batch CA and chain in {}); each verifies as a TLS client now and in 2100: {}\nby hand: openssl verify -purpose sslclient -CAfile {} -untrusted {} {}",
            rows.len(),
            out.display(),
            ca_out.display(),
            verified.join(", "),
            root_file.display(),
            ca_out.display(),
            base.join("TSV2-00000001.crt").display()
        ),
        json!({"manifest": out, "ca": ca_out, "verified": verified}),
    ))
}

/// Step 33: each device of the manifest checked against the CRL as a TLS server would.
fn crl_check(
    ctx: &Context,
    hq: &Path,
    id: &str,
    (root, root_file): (&[u8], &Path),
    crl_file: &Path,
) -> Result<Report, Failure> {
    let crl = x509::from_pem(
        &std::fs::read_to_string(crl_file).map_err(|e| Failure::new(Code::Io, e.to_string()))?,
        "X509 CRL",
    )
    .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    let node = ctx.open(hq, NodeKind::Hq)?;
    let (issued, rows) = keyfab_hq::report::manifest(&node, id, false)?;
    let chain = keyfab_hq::report::ca_chain(&node, &issued)?;
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for row in &rows {
        match x509::verify_client_certificate(
            root,
            &chain[..2],
            &row.certificate_der,
            ctx.now()?,
            Some(&crl),
        ) {
            Ok(()) => accepted.push(row.device_id.clone()),
            Err(_) => refused.push(row.device_id.clone()),
        }
    }
    if refused != ["TSV2-00000004"] {
        return Err(Failure::new(
            Code::Internal,
            format!("the demo's CRL check refused {refused:?}, not the revoked device"),
        ));
    }
    Ok(Report::new(
        format!(
            "refused: {}; accepted: {}\nby hand (it ends in \"certificate revoked\"): openssl verify -purpose sslclient -crl_check -CRLfile {} -CAfile {} -untrusted {} {}",
            refused.join(", "),
            accepted.join(", "),
            crl_file.display(),
            root_file.display(),
            crl_file.with_file_name("batch-ca.pem").display(),
            crl_file.with_file_name("TSV2-00000004.crt").display()
        ),
        json!({"refused": refused, "accepted": accepted}),
    ))
}
