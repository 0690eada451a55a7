//! Device certificates as a cloud checks them: chains that verify with standard purpose
//! checks for as long as the certificate lives, and profiles that say what goes in them.

use crate::common::*;
use std::path::Path;

const WINDOW: &str = r#"
product = "thermostat"
valid_from  = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"
"#;

/// 2031-01-01T00:00:00Z: a year after the window closed.
const YEAR_AFTER_WINDOW: &str = "1924992000";
/// 2100-01-01T00:00:00Z.
const YEAR_2100: &str = "4102444800";

fn openssl(args: &[&str]) -> (bool, String) {
    let o = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// A device's CSR made by OpenSSL with a fresh key of `algorithm` (`ec` P-256 or
/// `ed25519`): (CSR, key).
fn device_csr(w: &World, name: &str, algorithm: &str) -> (String, String) {
    let (csr, key) = (
        s(&w.path(&format!("{name}.csr"))),
        s(&w.path(&format!("{name}.key"))),
    );
    let newkey = if algorithm == "ec384" {
        "ec"
    } else {
        algorithm
    };
    let mut args = vec!["req", "-new", "-newkey", newkey];
    match algorithm {
        "ec" => args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]),
        "ec384" => args.extend(["-pkeyopt", "ec_paramgen_curve:P-384"]),
        _ => {}
    }
    args.extend([
        "-nodes",
        "-subj",
        "/CN=ignored",
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    let (ok, out) = openssl(&args);
    assert!(ok, "{out}");
    (csr, key)
}

/// `openssl verify` of `cert` with `chain` against the world's root, for `purpose`, at
/// `attime` (Unix seconds) or now.
fn verify(w: &World, chain: &Path, cert: &Path, purpose: &str, attime: Option<&str>) {
    let root = s(&w.root.join("root.crt"));
    let (chain, cert) = (s(chain), s(cert));
    let mut args = vec!["verify", "-purpose", purpose];
    if let Some(t) = attime {
        args.extend(["-attime", t]);
    }
    args.extend(["-CAfile", &root, "-untrusted", &chain, &cert]);
    let (ok, out) = openssl(&args);
    assert!(ok, "{cert} {purpose} at {attime:?}: {out}");
}

/// Writes each key's certificate (and the chain) of a provisioning answer; returns the
/// chain file and (key name, certificate file).
fn written(
    w: &World,
    answer: &serde_json::Value,
    tag: &str,
) -> (std::path::PathBuf, Vec<(String, std::path::PathBuf)>) {
    let chain = w.path(&format!("{tag}-chain.pem"));
    let pem: String = answer["chain_pem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    std::fs::write(&chain, pem).unwrap();
    let certs = answer["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| {
            let pem = k["certificate_pem"].as_str()?;
            let name = k["name"].as_str().unwrap().to_owned();
            let file = w.path(&format!("{tag}-{name}.crt"));
            std::fs::write(&file, pem).unwrap();
            Some((name, file))
        })
        .collect();
    (chain, certs)
}

#[test]
fn every_key_type_and_source_verifies_as_a_client_for_the_devices_life() {
    let w = world();
    // Every key type from every source that makes it: HQ's pool (not RSA: a pool of RSA
    // keys is refused), the site, and the device's own key through its CSR (one CSR per
    // request, so one device type per entitlement).
    let fixed = "[[keys]]\nname = \"pool-ec\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\ncertificate = { subject = \"CN={device_id},O=Acme\", days = 3650 }\n\
         [[keys]]\nname = \"pool-ed\"\ntype = \"ed25519\"\nsource = \"hq-pool\"\ncertificate = { subject = \"CN={device_id}\", days = \"forever\" }\n\
         [[keys]]\nname = \"pool-p384\"\ntype = \"ec-p384\"\nsource = \"hq-pool\"\ncertificate = { subject = \"CN={device_id}\", days = \"forever\" }\n\
         [[keys]]\nname = \"site-ec\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = { subject = \"CN={device_id}\", days = \"forever\", extended_key_usage = [\"client-auth\", \"server-auth\"], subject_alt_names = [{ dns = \"{device_id}.devices.example.com\" }] }\n\
         [[keys]]\nname = \"site-ed\"\ntype = \"ed25519\"\nsource = \"site\"\ncertificate = { subject = \"CN={device_id}\", days = 3650 }\n\
         [[keys]]\nname = \"site-p384\"\ntype = \"ec-p384\"\nsource = \"site\"\ncertificate = { subject = \"CN={device_id}\", days = \"forever\", extended_key_usage = [\"client-auth\", \"server-auth\"] }\n\
         [[keys]]\nname = \"site-rsa2048\"\ntype = \"rsa-2048\"\nsource = \"site\"\ncertificate = { subject = \"CN={device_id}\", days = \"forever\", key_usage = [\"digital-signature\", \"key-encipherment\"] }\n\
         [[keys]]\nname = \"site-rsa3072\"\ntype = \"rsa-3072\"\nsource = \"site\"\ncertificate = { subject = \"CN={device_id}\", days = 3650 }\n";
    let forever = [
        "pool-ed",
        "pool-p384",
        "site-ec",
        "site-p384",
        "site-rsa2048",
        "own",
    ];
    let server_auth = ["site-ec", "site-p384"];
    for (algorithm, csr_type) in [
        ("ec", "ec-p256"),
        ("ec384", "ec-p384"),
        ("ed25519", "ed25519"),
        ("rsa:2048", "rsa-2048"),
        ("rsa:3072", "rsa-3072"),
    ] {
        let tag = algorithm.replace(':', "-");
        let body = format!(
            "{WINDOW}devices = 3\n{fixed}\
             [[keys]]\nname = \"own\"\ntype = \"{csr_type}\"\nsource = \"device\"\ncertificate = {{ subject = \"CN={{device_id}},OU={{product}}\", days = \"forever\" }}\n"
        );
        let id = imported(&w, &body, &format!("life-{tag}"));
        let (csr, _) = device_csr(&w, &format!("dev-{tag}"), algorithm);
        // `*` would make `*.devices.example.com`: a wildcard identity for every device.
        let o = provision(&w, &id, "*", &["--csr", csr.as_str()], None);
        assert_eq!(o.json["error"]["code"], "device_id_rejected", "{}", o.json);
        let request = format!("r-{tag}");
        let args = ["--csr", csr.as_str(), "--request-id", request.as_str()];
        let answer = provision(&w, &id, "D-1", &args, None);
        assert_eq!(answer.code, 0, "{}", answer.json);
        let (chain, certs) = written(&w, &answer.json, &tag);
        assert_eq!(certs.len(), 9, "{}", answer.json);
        for (name, cert) in &certs {
            verify(&w, &chain, cert, "sslclient", None);
            verify(&w, &chain, cert, "sslclient", Some(YEAR_AFTER_WINDOW));
            if forever.contains(&name.as_str()) {
                verify(&w, &chain, cert, "sslclient", Some(YEAR_2100));
            } else {
                // A ten-year certificate ends ten years after issue, and no later.
                let (ok, out) = openssl(&[
                    "verify",
                    "-attime",
                    YEAR_2100,
                    "-CAfile",
                    &s(&w.root.join("root.crt")),
                    "-untrusted",
                    &s(&chain),
                    &s(cert),
                ]);
                assert!(!ok && out.contains("expired"), "{name}: {out}");
            }
            if server_auth.contains(&name.as_str()) {
                verify(&w, &chain, cert, "sslserver", Some(YEAR_2100));
            }
            // The key in the certificate is the key the device received.
            let (_, text) = openssl(&["x509", "-noout", "-text", "-in", &s(cert)]);
            let expected = match name.as_str() {
                "own" => match csr_type {
                    "ec-p256" => "prime256v1",
                    "ec-p384" => "secp384r1",
                    "ed25519" => "ED25519",
                    "rsa-2048" => "(2048 bit)",
                    _ => "(3072 bit)",
                },
                n if n.ends_with("p384") => "secp384r1",
                n if n.ends_with("-ec") => "prime256v1",
                n if n.ends_with("-ed") => "ED25519",
                "site-rsa2048" => "(2048 bit)",
                _ => "(3072 bit)",
            };
            assert!(text.contains(expected), "{name}: {expected} not in {text}");
        }
        let own = &certs.iter().find(|(n, _)| n == "own").unwrap().1;
        let (_, text) = openssl(&["x509", "-noout", "-enddate", "-subject", "-in", &s(own)]);
        assert!(text.contains("notAfter=Dec 31 23:59:59 9999 GMT"), "{text}");
        assert!(text.contains("OU = thermostat"), "{text}");
        // A retry gets the very same keys, RSA ones included (sealed at the site).
        let again = provision(&w, &id, "D-1", &args, None);
        assert!(
            again.code == 0 && again.json["keys"] == answer.json["keys"],
            "{tag}: the retry got other keys: {}",
            again.json["error"]
        );
    }
    // RSA from HQ's pool is refused by name at create.
    refused_at_create(
        &w,
        "rsa-pool",
        &format!("{WINDOW}devices = 2\n[[keys]]\nname = \"k\"\ntype = \"rsa-2048\"\nsource = \"hq-pool\"\n"),
        "keys[0].type",
    );
}

/// `hq entitlement create` of the policy `body` is refused `invalid_policy` with a
/// message naming `field`, and writes no file.
fn refused_at_create(w: &World, name: &str, body: &str, field: &str) {
    let policy = w.path(&format!("{name}.toml"));
    std::fs::write(&policy, body).unwrap();
    let out = w.path(&format!("{name}.kfe"));
    let o = try_create(w, "shenzhen-1", &policy, &out);
    assert_eq!(o.code, 1, "{name}: {}", o.json);
    assert_eq!(o.json["error"]["code"], "invalid_policy", "{}", o.json);
    let message = o.json["error"]["message"].as_str().unwrap();
    assert!(message.contains(field), "{name}: {field} not in {message}");
    assert!(!out.exists());
}

#[test]
fn profile_fields_appear_as_asked() {
    let w = world();
    let body = format!(
        "{WINDOW}devices = 2\n\
         [[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\n\
         [keys.certificate]\n\
         subject = \"CN={{device_id}},O=Acme,OU={{site}}\"\n\
         days = 730\n\
         extended_key_usage = [\"client-auth\", \"1.3.6.1.4.1.99999.3\"]\n\
         key_usage = [\"digital-signature\", \"key-agreement\"]\n\
         subject_alt_names = [{{ uri = \"urn:acme:{{product}}:{{device_id}}\" }}, {{ email = \"{{device_id}}@devices.example.com\" }}, {{ ip = \"10.0.0.1\" }}]\n\
         crl_distribution_point = \"http://crl.example.com/{{entitlement}}.crl\"\n\
         extensions = [{{ oid = \"1.3.6.1.4.1.99999.1\", utf8 = \"batch-7\" }}, {{ oid = \"1.3.6.1.4.1.99999.2\", der = \"AgEq\" }}]\n"
    );
    let id = imported(&w, &body, "profile");
    // A station's device id cannot reshape a name: an e-mail address with two `@`.
    let o = provision(&w, &id, "x@evil.example", &[], None);
    assert_eq!(o.json["error"]["code"], "device_id_rejected", "{}", o.json);
    let answer = provision(&w, &id, "D-7", &[], None);
    assert_eq!(answer.code, 0, "{}", answer.json);
    let (chain, certs) = written(&w, &answer.json, "profile");
    let cert = &certs[0].1;
    verify(&w, &chain, cert, "sslclient", None);
    let (_, text) = openssl(&["x509", "-noout", "-text", "-in", &s(cert)]);
    for expected in [
        "Subject: CN = D-7, O = Acme, OU = shenzhen-1",
        "Digital Signature, Key Agreement",
        "TLS Web Client Authentication, 1.3.6.1.4.1.99999.3",
        "URI:urn:acme:thermostat:D-7, email:D-7@devices.example.com, IP Address:10.0.0.1",
        &format!("URI:http://crl.example.com/{id}.crl"),
        "1.3.6.1.4.1.99999.1:",
        "batch-7",
        "1.3.6.1.4.1.99999.2:",
    ] {
        assert!(text.contains(expected), "{expected} not in {text}");
    }
    assert!(
        !text.contains("Key Usage: critical\n                Digital Signature, Key Encipherment")
    );
}

#[test]
fn an_impossible_profile_is_refused_at_create_naming_its_field() {
    let w = world();
    let cases = [
        (
            "key_usage = [\"key-encipherment\"]",
            "keys[0].certificate.key_usage",
        ),
        (
            "extended_key_usage = [\"tls-client\"]",
            "keys[0].certificate.extended_key_usage",
        ),
        (
            "subject_alt_names = [{ ip = \"{device_id}\" }]",
            "keys[0].certificate.subject_alt_names[0]",
        ),
        (
            "extensions = [{ oid = \"2.5.29.19\", utf8 = \"x\" }]",
            "keys[0].certificate.extensions[0]",
        ),
        (
            "extensions = [{ oid = \"1.2.3\", der = \"AgE=AgE=\" }]",
            "keys[0].certificate.extensions[0]",
        ),
        (
            "crl_distribution_point = \"ftp://crl\"",
            "keys[0].certificate.crl_distribution_point",
        ),
    ];
    for (i, (field, named)) in cases.iter().enumerate() {
        let body = format!(
            "{WINDOW}devices = 2\n[[keys]]\nname = \"k\"\ntype = \"ec-p256\"\nsource = \"site\"\n[keys.certificate]\nsubject = \"CN={{device_id}}\"\ndays = 30\n{field}\n"
        );
        refused_at_create(&w, &format!("bad-{i}"), &body, named);
    }
    // `days = "always"` is neither a number nor "forever".
    refused_at_create(
        &w,
        "always",
        &format!("{WINDOW}devices = 2\n[[keys]]\nname = \"k\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = {{ subject = \"CN=x\", days = \"always\" }}\n"),
        "days",
    );
}

/// The sealed batch CA key an entitlement's record at the site holds (empty once gone).
fn sealed_batch_key(w: &World, id: &str) -> Vec<u8> {
    let node = open_site(&w.site);
    keyfab_site::entitlements::list(&node)
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
        .unwrap()
        .sealed_batch_ca_key
}

/// Whether any file under `dir` holds `needle`.
fn home_holds(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|entry| {
        let path = entry.unwrap().path();
        if path.is_dir() {
            home_holds(&path, needle)
        } else {
            std::fs::read(&path)
                .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        }
    })
}

fn destroyed(w: &World, id: &str) -> Vec<String> {
    let node = open_site(&w.site);
    keyfab_site::entitlements::audit_records(&node)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            keyfab_audit::Event::BatchKeyDestroyed { entitlement, cause } if entitlement == id => {
                Some(cause)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn the_batch_ca_key_is_destroyed_when_its_entitlement_is_revoked_or_ends() {
    let w = world();
    let body = format!(
        "{WINDOW}devices = 5\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = {{ subject = \"CN={{device_id}}\", days = \"forever\" }}\n"
    );
    // Revoked: the key goes in the revocation's own transaction, audited.
    let revoked = imported(&w, &body, "revoked");
    let first = provision(&w, &revoked, "D-1", &["--request-id", "r-1"], None);
    assert_eq!(first.code, 0, "{}", first.json);
    let sealed = sealed_batch_key(&w, &revoked);
    assert!(sealed.len() > 64 && home_holds(&w.site, &sealed));
    let kfr = w.path("revoked.kfr");
    revoke(&w, &revoked, Some("line closed"), &kfr);
    assert_eq!(import(&w.site, &kfr, None).code, 0);
    assert!(sealed_batch_key(&w, &revoked).is_empty());
    assert_eq!(destroyed(&w, &revoked), ["revoked"]);
    assert!(
        !home_holds(&w.site, &sealed),
        "the sealed batch CA key is still somewhere in the site's home"
    );
    // The device that has its certificate still gets it on a retry; nobody else gets one.
    let again = provision(&w, &revoked, "D-1", &["--request-id", "r-1"], None);
    assert_eq!(again.json["keys"], first.json["keys"], "{}", again.json);
    let o = provision(&w, &revoked, "D-2", &[], None);
    assert_eq!(o.json["error"]["code"], "revoked", "{}", o.json);

    // Ended: the first export after `valid_until` destroys it.
    let ended = imported(&w, &body, "ended");
    assert_eq!(provision(&w, &ended, "D-1", &[], None).code, 0);
    let sealed = sealed_batch_key(&w, &ended);
    ok(&[
        "site",
        "config",
        "--home",
        &s(&w.site),
        "--clock-max-jump",
        "315360000",
    ]);
    let after = "2030-01-02T00:00:00Z";
    let o = keyfab(
        &[
            "site",
            "audit",
            "export",
            "--home",
            &s(&w.site),
            "--out",
            &s(&w.path("after.kfa")),
        ],
        Some(after),
    );
    assert_eq!(o.code, 0, "{}", o.json);
    assert!(sealed_batch_key(&w, &ended).is_empty());
    assert_eq!(destroyed(&w, &ended), ["window_ended"]);
    assert_eq!(destroyed(&w, &revoked), ["revoked"], "destroyed once");
    assert!(!home_holds(&w.site, &sealed));
    let o = provision(&w, &ended, "D-2", &[], Some(after));
    assert_eq!(o.json["error"]["code"], "expired", "{}", o.json);
}

#[test]
fn manifests_list_what_a_cloud_should_register_and_the_ca_to_trust() {
    let w = world();
    let body = format!(
        "{WINDOW}devices = 10\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = {{ subject = \"CN={{device_id}}\", days = \"forever\" }}\n\
         [[keys]]\nname = \"fw\"\ntype = \"aes-256\"\nsource = \"derived\"\n"
    );
    let id = imported(&w, &body, "manifest");
    for device in ["D-3", "D-1", "D-4", "D-2", "A-5"] {
        let o = provision(&w, &id, device, &["--station", "line-1"], None);
        assert_eq!(o.code, 0, "{device}: {}", o.json);
    }
    {
        use keyfab_site::provision::{Programming, Provisioner};
        let site = Provisioner::start(std::sync::Arc::new(open_site(&w.site)));
        for (device, result) in [
            ("D-1", Programming::Programmed),
            ("D-2", Programming::Failed),
        ] {
            site.confirm(
                &id.parse().unwrap(),
                &device.parse().unwrap(),
                result,
                Some("line-1".parse().unwrap()),
            )
            .unwrap();
        }
    }
    let kfa = export(&w, "m.kfa");
    ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&kfa)]);

    // JSON: sorted by device id, with status, station, time and audit record; the
    // burned device only when asked for.
    let written = hq_manifest(
        &w,
        &id,
        "json",
        "m.json",
        &["--ca-out", &s(&w.path("ca.pem"))],
    );
    assert_eq!(
        (
            &written["rows"],
            &written["programmed"],
            &written["unconfirmed"],
            &written["failed"]
        ),
        (&4.into(), &1.into(), &3.into(), &0.into()),
        "{written}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.path("m.json")).unwrap()).unwrap();
    let devices: Vec<(&str, &str)> = m["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap(),
                d["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        devices,
        [
            ("A-5", "unconfirmed"),
            ("D-1", "programmed"),
            ("D-3", "unconfirmed"),
            ("D-4", "unconfirmed")
        ]
    );
    let first = &m["devices"][1];
    assert_eq!(first["station"], "line-1");
    assert!(first["audit_sequence"].as_u64().unwrap() > 0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    let all = hq_manifest(&w, &id, "json", "all.json", &["--include-failed"]);
    assert_eq!(
        (&all["rows"], &all["failed"]),
        (&5.into(), &1.into()),
        "{all}"
    );

    // CSV: one physical line per device, read back by a standard CSV reader; the
    // certificate whole in one field, its SHA-256 in another.
    hq_manifest(&w, &id, "csv", "m.csv", &[]);
    let text = std::fs::read_to_string(w.path("m.csv")).unwrap();
    assert_eq!(text.lines().count(), 5, "a header and one line per device");
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header = reader.headers().unwrap().clone();
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 4);
    assert_eq!(&records[0][column("device_id")], "A-5");
    let chain = w.path("ca.pem");
    for r in &records {
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(&r[column("certificate_der_base64")])
            .unwrap();
        assert_eq!(
            r[column("certificate_sha256")],
            keyfab_crypto::hash::Fingerprint::of(&der).to_hex()
        );
        // The exported CA file (batch CA, HQ's cluster CA, root) verifies each one.
        let cert = w.path("one.crt");
        std::fs::write(&cert, keyfab_crypto::x509::to_pem(&der, "CERTIFICATE")).unwrap();
        let (ok, out) = openssl(&[
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            &s(&chain),
            &s(&cert),
        ]);
        assert!(ok, "{out}");
    }
    let ca_text = std::fs::read_to_string(&chain).unwrap();
    assert_eq!(ca_text.matches("BEGIN CERTIFICATE").count(), 3);
    assert!(ca_text.ends_with(&std::fs::read_to_string(w.root.join("root.crt")).unwrap()));

    // aws-iot: JSON lines with the template's parameters.
    hq_manifest(&w, &id, "aws-iot", "m.jsonl", &[]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(w.path("m.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for line in &lines {
        let keys: Vec<&String> = line.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "CACertificatePem",
                "CertificatePem",
                "SerialNumber",
                "ThingName"
            ]
        );
        assert!(ca_text.starts_with(line["CACertificatePem"].as_str().unwrap()));
    }
    // A key the policy does not certify is refused by name.
    keyfab(
        &[
            "hq",
            "manifest",
            "--home",
            &s(&w.hq),
            "--entitlement",
            &id,
            "--format",
            "csv",
            "--out",
            &s(&w.path("fw.csv")),
            "--key",
            "fw",
        ],
        None,
    )
    .assert_error(1, "invalid_input", "the policy certifies identity");
    assert!(!w.path("fw.csv").exists());
}

/// The DER of the first PEM block of `tag` in `text`.
fn der_of(text: &str, tag: &str) -> Vec<u8> {
    keyfab_crypto::x509::from_pem(text, tag).unwrap()
}

/// A TLS 1.3 server on loopback that trusts only `root` (and checks the leaf against
/// `crl` when given) accepts one client presenting `chain` with `key`: whether the
/// server completed the handshake, and what it said if not.
fn tls_client_auth(
    w: &World,
    root: &[u8],
    crl: Option<&[u8]>,
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
) -> Result<(), String> {
    use rustls::pki_types::{
        CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
    };
    use std::sync::Arc;
    let (srv_crt, srv_key) = (w.path("server.crt"), w.path("server.key"));
    if !srv_crt.exists() {
        let (ok, out) = openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-days",
            "1",
            "-keyout",
            &s(&srv_key),
            "-out",
            &s(&srv_crt),
        ]);
        assert!(ok, "{out}");
    }
    let server_cert = der_of(&std::fs::read_to_string(&srv_crt).unwrap(), "CERTIFICATE");
    let server_key = der_of(&std::fs::read_to_string(&srv_key).unwrap(), "PRIVATE KEY");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(root.to_vec())).unwrap();
    let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    if let Some(crl) = crl {
        verifier = verifier
            .with_crls([CertificateRevocationListDer::from(crl.to_vec())])
            .only_check_end_entity_revocation();
    }
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier.build().unwrap())
        .with_single_cert(
            vec![CertificateDer::from(server_cert.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key)),
        )
        .unwrap();
    let mut client_roots = rustls::RootCertStore::empty();
    client_roots.add(CertificateDer::from(server_cert)).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(client_roots)
        .with_client_auth_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || -> Result<(), String> {
        let (mut tcp, _) = listener.accept().map_err(|e| e.to_string())?;
        let mut conn = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(client_config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    // In TLS 1.3 the client finishes first; the server's verdict on its certificate
    // comes after, so the server's side is what counts.
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).is_err() {
            break;
        }
    }
    let _ = conn.complete_io(&mut tcp);
    server.join().unwrap()
}

#[test]
fn a_revoked_device_is_on_its_batch_cas_crl_and_refused_by_a_server_that_checks_it() {
    let w = world();
    let body = format!(
        "{WINDOW}devices = 5\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = {{ subject = \"CN={{device_id}}\", days = \"forever\", crl_distribution_point = \"http://pki.example.com/{{entitlement}}.crl\" }}\n"
    );
    let id = imported(&w, &body, "crl");
    let mut devices = Vec::new();
    for device in ["D-1", "D-2"] {
        let o = provision(&w, &id, device, &[], None);
        assert_eq!(o.code, 0, "{}", o.json);
        devices.push(o.json);
    }
    // Revocation needs the device in the audit HQ verified.
    keyfab(
        &[
            "hq",
            "device",
            "revoke",
            "--home",
            &s(&w.hq),
            "--entitlement",
            &id,
            "--device-id",
            "D-2",
            "--reason",
            "key-compromise",
        ],
        None,
    )
    .assert_error(1, "not_found", "import the site's export first");
    let kfa = export(&w, "crl.kfa");
    ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&kfa)]);
    let revoke = |device: &str| revoke_device(&w, &id, device, "key-compromise", &[]);
    let first = revoke("D-2");
    assert_eq!(first["revoked"].as_array().unwrap().len(), 1, "{first}");
    let again = revoke("D-2");
    assert_eq!(
        (
            again["revoked"].as_array().unwrap().len(),
            again["already"].as_array().unwrap().len()
        ),
        (0, 1),
        "{again}"
    );
    let crl_file = w.path("batch.crl");
    let made = ok(&[
        "hq",
        "crl",
        "--home",
        &s(&w.hq),
        "--entitlement",
        &id,
        "--out",
        &s(&crl_file),
    ]);
    assert_eq!(
        (&made["number"], &made["entries"]),
        (&1.into(), &1.into()),
        "{made}"
    );
    let second = ok(&[
        "hq",
        "crl",
        "--home",
        &s(&w.hq),
        "--entitlement",
        &id,
        "--out",
        &s(&w.path("2.crl")),
    ]);
    assert_eq!(second["number"], 2, "CRL numbers only go up");

    // OpenSSL: the CRL verifies under the batch CA, and -crl_check uses it.
    let chain_pem: String = devices[0]["chain_pem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let chain = w.path("crl-chain.pem");
    std::fs::write(&chain, &chain_pem).unwrap();
    let batch = w.path("crl-batch.pem");
    std::fs::write(&batch, devices[0]["chain_pem"][0].as_str().unwrap()).unwrap();
    let (ok_crl, out) = openssl(&[
        "crl",
        "-in",
        &s(&crl_file),
        "-CAfile",
        &s(&batch),
        "-noout",
        "-text",
    ]);
    assert!(ok_crl && out.contains("verify OK"), "{out}");
    assert!(
        out.contains("Key Compromise") && out.contains("X509v3 CRL Number"),
        "{out}"
    );
    let root_file = w.root.join("root.crt");
    for (n, device) in devices.iter().enumerate() {
        let cert = w.path(&format!("crl-{n}.crt"));
        std::fs::write(
            &cert,
            device["keys"][0]["certificate_pem"].as_str().unwrap(),
        )
        .unwrap();
        let (valid, out) = openssl(&[
            "verify",
            "-purpose",
            "sslclient",
            "-crl_check",
            "-CRLfile",
            &s(&crl_file),
            "-CAfile",
            &s(&root_file),
            "-untrusted",
            &s(&chain),
            &s(&cert),
        ]);
        if n == 0 {
            assert!(valid, "{out}");
        } else {
            assert!(!valid && out.contains("certificate revoked"), "{out}");
        }
    }

    // A real TLS 1.3 handshake: a server trusting only root.crt accepts D-1 as a client,
    // and with the CRL refuses D-2 (and still accepts D-1).
    let root = der_of(&std::fs::read_to_string(&root_file).unwrap(), "CERTIFICATE");
    let crl = der_of(&std::fs::read_to_string(&crl_file).unwrap(), "X509 CRL");
    let identity = |n: usize| {
        let d = &devices[n];
        let mut chain = vec![der_of(
            d["keys"][0]["certificate_pem"].as_str().unwrap(),
            "CERTIFICATE",
        )];
        for c in d["chain_pem"].as_array().unwrap() {
            chain.push(der_of(c.as_str().unwrap(), "CERTIFICATE"));
        }
        let key = der_of(
            d["keys"][0]["private_key_pem"].as_str().unwrap(),
            "PRIVATE KEY",
        );
        (chain, key)
    };
    let (chain1, key1) = identity(0);
    let (chain2, key2) = identity(1);
    tls_client_auth(&w, &root, None, chain1.clone(), key1.clone()).unwrap();
    tls_client_auth(&w, &root, None, chain2.clone(), key2.clone()).unwrap();
    tls_client_auth(&w, &root, Some(&crl), chain1, key1).unwrap();
    let refused = tls_client_auth(&w, &root, Some(&crl), chain2, key2).unwrap_err();
    assert!(refused.contains("Revoked"), "{refused}");

    // HQ shows it: the manifest's status, the device's provenance.
    let m = hq_manifest(&w, &id, "json", "crl.json", &[]);
    assert_eq!(m["rows"], 2);
    let text = std::fs::read_to_string(w.path("crl.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(manifest["devices"][1]["status"], "revoked");
    let shown = ok(&["hq", "device", "show", "--home", &s(&w.hq), "D-2"]);
    let release = &shown["releases"][0];
    assert_eq!(release["status"], "revoked", "{shown}");
    assert_eq!(release["site"], "shenzhen-1");
    assert_eq!(release["entitlement"], id.as_str());
    assert!(
        release["checkpoint_size"].as_u64().unwrap() >= release["audit_sequence"].as_u64().unwrap()
    );
    assert_eq!(release["keys"][0]["revoked"]["reason"], "key-compromise");
    assert_eq!(
        release["keys"][0]["cert_serial"],
        first["revoked"][0]["serial"]
    );
    keyfab(&["hq", "device", "show", "--home", &s(&w.hq), "NOPE"], None).assert_error(
        1,
        "not_found",
        "in no audit HQ verified",
    );
}

#[test]
fn a_p384_batch_ca_signs_certificates_and_crls_that_verify() {
    let w = world();
    let body = format!(
        "{WINDOW}devices = 3\nbatch_ca_key = \"ec-p384\"\n[[keys]]\nname = \"identity\"\ntype = \"ec-p384\"\nsource = \"site\"\ncertificate = {{ subject = \"CN={{device_id}}\", days = \"forever\" }}\n"
    );
    let id = imported(&w, &body, "p384ca");
    let answer = provision(&w, &id, "D-1", &[], None);
    assert_eq!(answer.code, 0, "{}", answer.json);
    let (chain, certs) = written(&w, &answer.json, "p384ca");
    let cert = &certs[0].1;
    verify(&w, &chain, cert, "sslclient", None);
    verify(&w, &chain, cert, "sslclient", Some(YEAR_2100));
    let (_, text) = openssl(&["x509", "-noout", "-text", "-in", &s(cert)]);
    assert!(text.contains("ecdsa-with-SHA384"), "{text}");
    let batch = w.path("p384-batch.pem");
    std::fs::write(&batch, answer.json["chain_pem"][0].as_str().unwrap()).unwrap();
    let (_, text) = openssl(&["x509", "-noout", "-text", "-in", &s(&batch)]);
    assert!(text.contains("secp384r1"), "{text}");

    let kfa = export(&w, "p384.kfa");
    ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&kfa)]);
    revoke_device(&w, &id, "D-1", "superseded", &[]);
    let crl = w.path("p384.crl");
    ok(&[
        "hq",
        "crl",
        "--home",
        &s(&w.hq),
        "--entitlement",
        &id,
        "--out",
        &s(&crl),
    ]);
    let (ok_crl, out) = openssl(&[
        "crl",
        "-in",
        &s(&crl),
        "-CAfile",
        &s(&batch),
        "-noout",
        "-text",
    ]);
    assert!(
        ok_crl && out.contains("verify OK") && out.contains("ecdsa-with-SHA384"),
        "{out}"
    );
    let (valid, out) = openssl(&[
        "verify",
        "-crl_check",
        "-CRLfile",
        &s(&crl),
        "-CAfile",
        &s(&w.root.join("root.crt")),
        "-untrusted",
        &s(&chain),
        &s(cert),
    ]);
    assert!(!valid && out.contains("certificate revoked"), "{out}");
    // A batch CA key of another type is refused by name.
    refused_at_create(
        &w,
        "bad-ca",
        &body.replace("ec-p384\"\n[[keys]]", "rsa-2048\"\n[[keys]]"),
        "batch_ca_key",
    );
}
