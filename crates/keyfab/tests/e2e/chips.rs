//! Chip attestation end to end: the real `keyfab site serve` over mutual TLS, real
//! stations (`keyfab station provision`, `keyfab station run`), chips certified by a
//! drill vendor (`keyfab pki init-chip-vendor`) — and a compromised station that sends
//! a key of its own making, its own CSR, or chains that do not hold.

use crate::common::*;
use base64::Engine;
use keyfab_crypto::hpke::HpkeSecretKey;
use keyfab_crypto::rng::SystemRng;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509;
use keyfab_station::chip_vendor::ChipVendor;
use std::path::{Path, PathBuf};

/// A policy of 20 devices for 2026–2029 with the `[[keys]]` of `keys`, every chip
/// required to prove itself against `vendor/`'s root and to name its device.
fn chips_policy(keys: &str) -> String {
    format!(
        r#"product = "line"
devices = 20
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"
{keys}
[chips]
attestation = "required"
roots = ["vendor/vendor-root.crt"]
device_id_from = "subject-serial"
"#
    )
}

/// A world with a drill chip vendor in `vendor/` and an entitlement (imported as `name`)
/// of [`chips_policy`] with `keys`: (world, vendor directory, entitlement id).
fn chips_world(keys: &str, name: &str) -> (World, PathBuf, String) {
    let w = world();
    let vendor = w.path("vendor");
    ok(&["pki", "init-chip-vendor", "--dir", &s(&vendor)]);
    let id = imported(&w, &chips_policy(keys), name);
    (w, vendor, id)
}

const POOL_KEYS: &str = r#"[[keys]]
name = "identity"
type = "ec-p256"
source = "hq-pool"
certificate = { subject = "CN={device_id},O=Acme", days = 365 }
[[keys]]
name = "firmware"
type = "aes-256"
source = "hq-pool"
"#;

const CSR_KEYS: &str = r#"[[keys]]
name = "identity"
type = "ec-p256"
source = "device"
certificate = { subject = "CN={device_id},O=Acme", days = 365 }
"#;

fn openssl(args: &[&str]) {
    let o = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn now() -> UnixTime {
    UnixTime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    )
}

/// Writes a chain (PEM) to `name` in the world: its path.
fn chain_file(w: &World, name: &str, chain: &[Vec<u8>]) -> PathBuf {
    let path = w.path(name);
    let pem: String = chain
        .iter()
        .map(|c| x509::to_pem(c, "CERTIFICATE"))
        .collect();
    std::fs::write(&path, pem).unwrap();
    path
}

/// A chip as its vendor made it: its transport key, the key's PEM file, and its chain's
/// file, certified for `serial`.
fn genuine_chip(
    w: &World,
    vendor: &Path,
    serial: &str,
    name: &str,
) -> (HpkeSecretKey, PathBuf, PathBuf) {
    let key = HpkeSecretKey::generate(&SystemRng);
    let public = key.public_key().unwrap();
    let chain = ChipVendor::open(vendor)
        .unwrap()
        .chain_of(serial, public.sec1(), &SystemRng, now())
        .unwrap();
    let pub_file = w.path(&format!("{name}.pub"));
    std::fs::write(&pub_file, x509::to_pem(&public.spki_der(), "PUBLIC KEY")).unwrap();
    (
        key,
        pub_file,
        chain_file(w, &format!("{name}-chain.pem"), &chain),
    )
}

/// A P-256 key a compromised station made itself with OpenSSL: (private key file,
/// public key file).
fn station_key(w: &World, name: &str) -> (PathBuf, PathBuf) {
    let (key, public) = (
        w.path(&format!("{name}.key")),
        w.path(&format!("{name}.pub")),
    );
    openssl(&[
        "ecparam",
        "-genkey",
        "-name",
        "prime256v1",
        "-noout",
        "-out",
        &s(&key),
    ]);
    openssl(&["ec", "-in", &s(&key), "-pubout", "-out", &s(&public)]);
    (key, public)
}

fn ask(url: &str, dir: &Path, id: &str, device: &str, request: &str, extra: &[&str]) -> Out {
    let mut args = vec!["--request-id", request];
    args.extend_from_slice(extra);
    station("provision", url, dir, id, device, &args)
}

/// Every way a secret could show in an answer: raw bytes as text, hex, base64, and the
/// PEM of a PKCS#8 key.
fn encodings(secret: &[u8]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        b64.encode(secret),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
        String::from_utf8_lossy(secret).into_owned(),
    ];
    if secret.len() > 40 {
        // A PEM body is base64 in lines of 64: each line on its own.
        let pem = x509::to_pem(secret, "PRIVATE KEY");
        out.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned),
        );
    }
    out.retain(|e| e.len() >= 16);
    out
}

#[test]
fn a_station_that_substitutes_its_own_transport_key_gets_nothing() {
    let (w, vendor, id) = chips_world(POOL_KEYS, "chips");
    let line = w.path("line-1");
    enroll(&w.site, "line-1", &line);
    let server = Server::start(&w.site);
    let url = server.url();

    // The genuine chip of D-0001, and the station's own key.
    let (chip, chip_pub, chip_chain) = genuine_chip(&w, &vendor, "D-0001", "d1");
    let (evil_key, evil_pub) = station_key(&w, "evil");
    let chain_arg = s(&chip_chain);
    let evil_arg = s(&evil_pub);
    let refused_out = w.path("refused.json");
    // Its own key with a chain the station made itself.
    let self_made = w.path("self-made.pem");
    let subject = "/CN=D-0001/serialNumber=D-0001";
    let key_arg = s(&evil_key);
    openssl(&[
        "req",
        "-x509",
        "-key",
        &key_arg,
        "-subj",
        subject,
        "-out",
        &s(&self_made),
    ]);
    let (out_arg, self_made_arg) = (s(&refused_out), s(&self_made));
    let cases: [(&[&str], &str, &str); 4] = [
        // Its own transport key with the chip's chain: the keys would open for it.
        (
            &[
                "--transport-key",
                &evil_arg,
                "--chip-chain",
                &chain_arg,
                "--out",
                &out_arg,
            ],
            "chip_key_mismatch",
            "the chip certificate certifies",
        ),
        // Its own key, no chain.
        (
            &["--transport-key", &evil_arg],
            "chip_untrusted",
            "the policy requires one",
        ),
        // Its own key, certified by itself (OpenSSL makes it a CA: refused as the leaf).
        (
            &["--transport-key", &evil_arg, "--chip-chain", &self_made_arg],
            "chip_untrusted",
            "not trusted",
        ),
        // No transport key at all: the keys would leave in clear.
        (
            &["--chip-chain", &chain_arg],
            "chip_key_mismatch",
            "transport key none",
        ),
    ];
    let mut refusals = Vec::new();
    for (n, (args, code, says)) in cases.into_iter().enumerate() {
        let o = ask(&url, &line, &id, "D-0001", &format!("evil-{n}"), args);
        o.assert_error(3, code, says);
        refusals.push(o.json.to_string());
    }
    assert!(!refused_out.exists(), "nothing is written for a refusal");

    // The genuine chip gets the pool slot none of those took: its keys, sealed to it.
    let args = ["--transport-key", &s(&chip_pub), "--chip-chain", &chain_arg];
    let good = ask(&url, &line, &id, "D-0001", "good-1", &args);
    assert_eq!(good.code, 0, "{}", good.json);
    assert!(good.json["audit_sequence"].as_u64().is_some());
    let b64 = base64::engine::general_purpose::STANDARD;
    let enc = b64
        .decode(good.json["chip_enc_base64"].as_str().unwrap())
        .unwrap();
    let sealed: Vec<(String, Vec<u8>)> = good.json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert!(k.get("private_key_pem").is_none() && k.get("secret_base64").is_none());
            let ct = k["sealed_private_base64"].as_str().unwrap();
            (
                k["name"].as_str().unwrap().to_owned(),
                b64.decode(ct).unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = sealed
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    let binding = keyfab_formats::chip::Binding {
        site: "shenzhen-1",
        entitlement: &id,
        device_id: "D-0001",
    };
    let opened = keyfab_formats::chip::open_keys(&chip, &binding, &enc, &refs).unwrap();
    assert_eq!(opened.len(), 2);
    // What the refused requests were answered holds none of those keys, in any encoding.
    for secret in &opened {
        for encoding in encodings(secret.expose()) {
            for refusal in &refusals {
                assert!(!refusal.contains(&encoding), "{refusal}");
            }
        }
    }
    for refusal in &refusals {
        for field in [
            "private_key_pem",
            "secret_base64",
            "sealed_private_base64",
            "chip_enc",
        ] {
            assert!(!refusal.contains(field), "{refusal}");
        }
    }

    // A retry must come from the same chip: the same transport key and chain.
    let retry = |args: &[&str]| ask(&url, &line, &id, "D-0001", "good-1", args);
    let again = retry(&args);
    assert_eq!(again.code, 0, "{}", again.json);
    assert_eq!(again.json["replayed"], true);
    let (_, _, other_chain) = genuine_chip(&w, &vendor, "D-0001", "d1-other");
    let (pub_arg, other_arg) = (s(&chip_pub), s(&other_chain));
    retry(&["--transport-key", &pub_arg, "--chip-chain", &other_arg]).assert_error(
        1,
        "invalid_input",
        "same chip certificate chain",
    );
    let o = retry(&["--transport-key", &pub_arg]);
    assert_eq!(o.code, 1, "{}", o.json);
    let o = retry(&["--transport-key", &evil_arg, "--chip-chain", &chain_arg]);
    assert_ne!(o.code, 0, "{}", o.json);

    // Each chain that does not hold, refused with its code: a chip certified as another
    // device, a chip of another vendor, a broken signature, the vendor's CA as the chip,
    // bytes that are no certificate.
    let (_, d2_pub, named_d9) = genuine_chip(&w, &vendor, "D-0009", "d2-as-d9");
    let other_vendor = w.path("other-vendor");
    ok(&[
        "pki",
        "init-chip-vendor",
        "--dir",
        &s(&other_vendor),
        "--subject",
        "CN=Other",
    ]);
    let (_, d3_pub, foreign) = genuine_chip(&w, &other_vendor, "D-0003", "d3");
    let (_, d4_pub, d4_chain) = genuine_chip(&w, &vendor, "D-0004", "d4");
    let mut der = x509::chip::read_chip_chain(&std::fs::read(&d4_chain).unwrap()).unwrap();
    let n = der[0].len();
    der[0][n - 3] ^= 1;
    let broken = chain_file(&w, "broken.pem", &der);
    let garbage = w.path("garbage.pem");
    let garbage_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    std::fs::write(&garbage, garbage_pem).unwrap();
    let vendor_root = vendor.join("vendor-root.crt");
    let cases = [
        (
            "D-0002",
            &d2_pub,
            &named_d9,
            "chip_binding_mismatch",
            "device_id_from",
        ),
        ("D-0003", &d3_pub, &foreign, "chip_untrusted", "not trusted"),
        ("D-0004", &d4_pub, &broken, "chip_untrusted", "not trusted"),
        (
            "D-0004",
            &d4_pub,
            &vendor_root,
            "chip_untrusted",
            "CaUsedAsEndEntity",
        ),
        ("D-0004", &d4_pub, &garbage, "chip_untrusted", "malformed"),
    ];
    for (n, (device, key, chain, code, says)) in cases.into_iter().enumerate() {
        let request = format!("bad-chain-{n}");
        let args = ["--transport-key", &s(key), "--chip-chain", &s(chain)];
        ask(&url, &line, &id, device, &request, &args).assert_error(3, code, says);
    }

    // A line of chips certified by the vendor programs every device; without the
    // vendor's chains, the same line is refused.
    let root_cert = s(&w.root.join("root.crt"));
    let line_dir = s(&line);
    let line_run = |extra: &[&str]| {
        let mut args = vec![
            "station",
            "run",
            "--url",
            &url,
            "--station-dir",
            &line_dir,
            "--root-cert",
            &root_cert,
            "--entitlement",
            &id,
            "--device-prefix",
            "SIM-",
        ];
        args.extend_from_slice(extra);
        keyfab(&args, None)
    };
    let report = line_run(&[
        "--devices",
        "4",
        "--concurrency",
        "2",
        "--chip-vendor",
        &s(&vendor),
    ]);
    assert_eq!(report.json["programmed"], 4, "{}", report.json);
    let o = line_run(&["--devices", "2", "--first", "100"]);
    assert_eq!(o.code, 3, "{}", o.json);
    assert_eq!(o.json["refused"]["chip_untrusted"], 2, "{}", o.json);
    drop(server);

    // HQ verifies every chain again and finds the log as the policy wants it.
    let report = hq_finds_no_violations(&w, "chips");
    let text = report.to_string();
    assert!(
        text.contains("chip_key_mismatch") && text.contains("chip_untrusted"),
        "{text}"
    );
    // The manifest names the chip each device certificate went to.
    let manifest = w.path("manifest.csv");
    ok(&[
        "hq",
        "manifest",
        "--home",
        &s(&w.hq),
        "--entitlement",
        &id,
        "--format",
        "csv",
        "--out",
        &s(&manifest),
    ]);
    let csv_text = std::fs::read_to_string(&manifest).unwrap();
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header = reader.headers().unwrap().clone();
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 5, "{csv_text}");
    let leaf = &x509::chip::read_chip_chain(&std::fs::read(&chip_chain).unwrap()).unwrap()[0];
    assert_eq!(&rows[0][column("device_id")], "D-0001");
    assert_eq!(
        &rows[0][column("chip_certificate_sha256")],
        keyfab_crypto::hash::Fingerprint::of(leaf).to_hex()
    );
    assert!(rows
        .iter()
        .all(|r| r[column("chip_certificate_sha256")].len() == 64));
    let shown = ok(&["hq", "device", "show", "--home", &s(&w.hq), "D-0001"]);
    assert_eq!(
        shown["releases"][0]["chip"]["certificate_sha256"],
        keyfab_crypto::hash::Fingerprint::of(leaf).to_hex()
    );
}

#[test]
fn a_station_that_substitutes_its_own_csr_is_refused() {
    let (w, vendor, id) = chips_world(CSR_KEYS, "csr-chips");
    // The chip's own key, certified by its vendor, and a CSR of it.
    let (chip_key, chip_pub) = station_key(&w, "chip");
    let point = match x509::device_public_key(
        &x509::from_pem(&std::fs::read_to_string(&chip_pub).unwrap(), "PUBLIC KEY").unwrap(),
    )
    .unwrap()
    {
        x509::DevicePublicKey::P256(p) => p,
        other => panic!("{other:?}"),
    };
    let chain = ChipVendor::open(&vendor)
        .unwrap()
        .chain_of("D-0001", &point, &SystemRng, now())
        .unwrap();
    let chain = chain_file(&w, "chip-chain.pem", &chain);
    let csr_of = |key: &Path, name: &str| {
        let csr = w.path(name);
        openssl(&[
            "req",
            "-new",
            "-key",
            &s(key),
            "-subj",
            "/CN=ignored",
            "-out",
            &s(&csr),
        ]);
        csr
    };
    let genuine_csr = csr_of(&chip_key, "chip.csr");
    let (evil_key, _) = station_key(&w, "evil");
    let evil_csr = csr_of(&evil_key, "evil.csr");
    let line = w.path("line-1");
    enroll(&w.site, "line-1", &line);
    let server = Server::start(&w.site);
    let url = server.url();
    let (evil_arg, chain_arg) = (s(&evil_csr), s(&chain));
    // The station's own CSR with the genuine chip's chain: no certificate for its key.
    let o = ask(
        &url,
        &line,
        &id,
        "D-0001",
        "evil-1",
        &["--csr", &evil_arg, "--chip-chain", &chain_arg],
    );
    o.assert_error(3, "chip_key_mismatch", "CSR key");
    assert!(!o.json.to_string().contains("CERTIFICATE"), "{}", o.json);
    let o = ask(&url, &line, &id, "D-0001", "evil-2", &["--csr", &evil_arg]);
    o.assert_error(3, "chip_untrusted", "");
    let good = ask(
        &url,
        &line,
        &id,
        "D-0001",
        "good-1",
        &["--csr", &s(&genuine_csr), "--chip-chain", &chain_arg],
    );
    assert_eq!(good.code, 0, "{}", good.json);
    let cert = good.json["keys"][0]["certificate_pem"].as_str().unwrap();
    let certified = x509::cert_spki(&x509::from_pem(cert, "CERTIFICATE").unwrap()).unwrap();
    assert_eq!(
        x509::device_public_key(&certified).unwrap(),
        x509::DevicePublicKey::P256(point)
    );
    drop(server);
    // A chip chain with a lot is refused before anything is asked.
    let list = w.path("lot.txt");
    std::fs::write(&list, "D-0002\n").unwrap();
    let o = keyfab(
        &[
            "site",
            "provision",
            "--home",
            &s(&w.site),
            "--entitlement",
            &id,
            "--device-ids",
            &s(&list),
            "--out",
            &s(&w.path("lot.jsonl")),
            "--chip-chain",
            &s(&chain),
        ],
        None,
    );
    o.assert_error(1, "invalid_input", "--device-id");
    hq_finds_no_violations(&w, "csr-chips");
}
