//! The station API end to end: the real `keyfab site serve` over real TLS, real stations
//! (`keyfab station provision`), and raw TLS clients that misbehave.

use crate::common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const STATION_POLICY: &str = r#"product = "line"
devices = 20
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2030-01-01T00:00:00Z"
[stations]
allowed = ["line-1", "line-2"]
[[keys]]
name = "identity"
type = "ec-p256"
source = "site"
certificate = { subject = "CN={device_id},O=Acme", days = 365 }
"#;

/// `keyfab station run`: a simulated line of `devices` chips, `concurrency` at once.
fn line_run(
    url: &str,
    dir: &Path,
    root_crt: &Path,
    id: &str,
    devices: u32,
    concurrency: u32,
    prefix: &str,
) -> serde_json::Value {
    let (devices, concurrency) = (devices.to_string(), concurrency.to_string());
    ok(&[
        "station",
        "run",
        "--url",
        url,
        "--station-dir",
        &s(dir),
        "--root-cert",
        &s(root_crt),
        "--entitlement",
        id,
        "--devices",
        &devices,
        "--concurrency",
        &concurrency,
        "--device-prefix",
        prefix,
    ])
}

fn pem(path: &Path, tag: &str) -> Vec<u8> {
    keyfab_crypto::x509::from_pem(&std::fs::read_to_string(path).unwrap(), tag).unwrap()
}

/// A blocking TLS 1.3 connection that trusts `dir`'s line CA and presents `identity`
/// (a station directory) or no certificate.
fn tls(
    addr: &str,
    trust: &Path,
    identity: Option<&Path>,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pem(
            &trust.join("line-ca.crt"),
            "CERTIFICATE",
        )))
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(dir) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(pem(
                    &dir.join("station.crt"),
                    "CERTIFICATE",
                ))],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pem(
                    &dir.join("station.key"),
                    "PRIVATE KEY",
                ))),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// Sends `request` raw and returns what came back (empty if the server closed).
fn exchange(addr: &str, trust: &Path, identity: Option<&Path>, request: &[u8]) -> String {
    let Ok(mut stream) = tls(addr, trust, identity) else {
        return String::new();
    };
    // A site that refuses a request before reading all of it (413) answers and closes
    // while the request is still being sent: the write fails, the answer may be there.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").into_bytes()
}

fn setup() -> (World, String, PathBuf) {
    setup_with(STATION_POLICY)
}

/// A world whose site holds an entitlement of `policy_text`, with station line-1.
fn setup_with(policy_text: &str) -> (World, String, PathBuf) {
    let w = world();
    let policy = w.path("line.toml");
    std::fs::write(&policy, policy_text).unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "line.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let line1 = w.path("line-1");
    enroll(&w.site, "line-1", &line1);
    (w, id, line1)
}

#[test]
fn stations_provision_over_mutual_tls_and_strangers_get_nothing() {
    let (w, id, line1) = setup();
    // An expired station certificate (enrolled for a day, ten days ago): refused at the
    // handshake, like a stranger's. (Enrolled before the server runs: through it, the
    // server's own clock would date the certificate.)
    let expired = w.path("expired");
    let ten_days_ago = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(240)).to_string();
    let out = keyfab(
        &[
            "site",
            "station",
            "enroll",
            "--home",
            &s(&w.site),
            "--name",
            "line-9",
            "--out",
            &s(&expired),
            "--days",
            "1",
        ],
        Some(&ten_days_ago),
    );
    assert_eq!(out.code, 0, "{}", out.json);
    let server = Server::start_with(&w.site, &["--log-format", "json", "--log-level", "debug"]);
    let url = server.url();

    // A station provisions; a retry with the same request id gets the same answer.
    let first = station_provision(&url, &line1, &id, "D-0001", "r-1");
    assert_eq!(first.code, 0, "{}", first.json);
    let key = &first.json["keys"][0];
    assert!(key["private_key_pem"]
        .as_str()
        .unwrap()
        .contains("PRIVATE KEY"));
    let again = station_provision(&url, &line1, &id, "D-0001", "r-1");
    assert_eq!(again.code, 0, "{}", again.json);
    assert_eq!(again.json["replayed"], true);
    assert_eq!(again.json["audit_sequence"], first.json["audit_sequence"]);
    assert_eq!(again.json["keys"], first.json["keys"]);
    // Another request for the same device is a policy refusal, exit 3.
    let other = station_provision(&url, &line1, &id, "D-0001", "r-2");
    assert_eq!(other.code, 3, "{}", other.json);
    assert_eq!(other.json["error"]["code"], "device_already_provisioned");
    // A URL that is not https://HOST:PORT is a usage error, before any connection.
    for bad in [url.replace("https://", "http://"), format!("{url}/v1")] {
        let out = station_provision(&bad, &line1, &id, "D-0002", "r-3");
        assert_eq!(out.code, 2, "{}", out.json);
        assert_eq!(out.json["error"]["code"], "usage");
    }

    // The station sees what it may use.
    let list = exchange(&server.addr, &line1, Some(&line1), &get("/v1/entitlements"));
    assert!(list.starts_with("HTTP/1.1 200"), "{list}");
    assert!(
        list.contains(&id) && list.contains("\"provisioned\":1"),
        "{list}"
    );
    let metrics = exchange(&server.addr, &line1, Some(&line1), &get("/metrics"));
    assert!(
        metrics.contains("keyfab_provisioned_total 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("keyfab_replayed_total 1\n"), "{metrics}");
    assert!(
        metrics.contains("keyfab_refused_total{code=\"device_already_provisioned\"} 1"),
        "{metrics}"
    );
    // Per station, the binary, the process, where the entitlement stands.
    for line in [
        "keyfab_station_provisioned_total{station=\"line-1\"} 1\n",
        "keyfab_busy_total 0\n",
        "keyfab_audit_records_unexported ",
        "process_start_time_seconds ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_cpu_seconds_total ",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
    let build = format!(
        "keyfab_build_info{{version=\"{}\",commit=\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(metrics.contains(&build), "{metrics}");

    // No certificate: the handshake fails, no handler runs.
    let anonymous = exchange(&server.addr, &line1, None, &get("/v1/entitlements"));
    assert!(!anonymous.contains("HTTP/1.1"), "{anonymous}");
    let metrics = exchange(&server.addr, &line1, Some(&line1), &get("/metrics"));
    assert!(
        !metrics.contains("keyfab_handshakes_refused_total 0\n"),
        "{metrics}"
    );

    // A station of another site (its own line CA) trusting our CA: refused likewise.
    let elsewhere = node(w.dir.path(), &w.root, "site", "penang-2");
    let foreign = w.path("foreign-line");
    enroll(&elsewhere, "line-1", &foreign);
    let mixed = w.path("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for f in ["station.crt", "station.key"] {
        std::fs::copy(foreign.join(f), mixed.join(f)).unwrap();
    }
    std::fs::copy(line1.join("line-ca.crt"), mixed.join("line-ca.crt")).unwrap();
    let stranger = station_provision(&url, &mixed, &id, "D-0002", "r-3");
    // Told why, and not sent again: the same handshake would fail the same way.
    stranger.assert_error(4, "untrusted_signer", "refused this station's certificate");
    let raw = exchange(&server.addr, &line1, Some(&mixed), &get("/v1/entitlements"));
    assert!(!raw.contains("HTTP/1.1"), "{raw}");

    let stale = exchange(
        &server.addr,
        &line1,
        Some(&expired),
        &get("/v1/entitlements"),
    );
    assert!(!stale.contains("HTTP/1.1"), "{stale}");

    // An oversized body: 413, nothing decided.
    let big = format!(
        "POST /v1/provision HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        200_000,
        "x".repeat(200_000)
    );
    let answer = exchange(&server.addr, &line1, Some(&line1), big.as_bytes());
    // A client still sending when the site closes may get the connection reset before
    // it reads the 413 (TCP discards what it had not read): never anything else.
    assert!(
        answer.starts_with("HTTP/1.1 413") || answer.is_empty(),
        "{}",
        &answer[..answer.len().min(200)]
    );

    // A request for something this site does not serve (unknown field): refused.
    let body = format!(
        r#"{{"request_id":"r-9","entitlement":"{id}","device_id":"D-0009","transport_key":"AA"}}"#
    );
    let post = format!(
        "POST /v1/provision HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(&server.addr, &line1, Some(&line1), post.as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("malformed"),
        "{answer}"
    );

    // Structured logs: a JSON object per line; the release and the refused handshake
    // are there, no key material is.
    let logs = server.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    // One request followed from its decision line to its access line: both name its
    // request id, station and entitlement.
    let follows = |target: &str| {
        lines.iter().any(|l| {
            l["target"] == target
                && l["request_id"] == "r-1"
                && l["station"] == "line-1"
                && l["entitlement"] == id.as_str()
        })
    };
    assert!(
        follows("keyfab::provision") && follows("keyfab::access"),
        "{logs}"
    );
    assert!(lines.iter().any(|l| l["target"] == "keyfab::provision"
        && l["message"] == "released"
        && l["device_id"] == "D-0001"));
    assert!(lines.iter().any(|l| l["target"] == "keyfab::access"
        && l["station"] == "line-1"
        && l["status"] == 200));
    assert!(lines.iter().any(|l| l["message"] == "handshake refused"));
    assert!(!logs.contains("PRIVATE KEY"));
    let (code, report) = server.stop();
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["stopped"], true);
    assert!(
        report["refused_connections"].as_u64().unwrap() >= 2,
        "{report}"
    );
    // Every decision is in the log, which still verifies: the import, the line CA, two
    // enrollments, the release, the refusal (the replay and the refused connections add
    // nothing).
    let log = ok(&["site", "audit", "verify", "--home", &s(&w.site)]);
    assert_eq!(log["records"], 6, "{log}");
}

#[test]
fn stations_are_enrolled_and_revoked_while_the_line_runs() {
    let (w, id, line1) = setup();
    // A second site home, to try a second server on the same address.
    let other = w.path("site-copy");
    copy_home(&w.site, &other);
    let server = Server::start_with(&w.site, &["--log-format", "json"]);
    let url = server.url();
    let taken = keyfab(
        &[
            "site",
            "serve",
            "--home",
            &s(&other),
            "--listen",
            &server.addr,
        ],
        None,
    );
    taken.assert_error(1, "invalid_input", "cannot listen on");
    // Enrolled through the running server (it holds the store).
    let line2 = w.path("line-2");
    let enrolled = enroll(&w.site, "line-2", &line2);
    assert_eq!(enrolled["station"], "line-2");
    assert_eq!(station_provision(&url, &line2, &id, "D-0101", "a").code, 0);

    // line-1 keeps a connection open; revoked, its next request on it is refused.
    let mut open = tls(&server.addr, &line1, Some(&line1)).unwrap();
    let keep = b"GET /v1/entitlements HTTP/1.1\r\nHost: localhost\r\n\r\n";
    open.write_all(keep).unwrap();
    let mut buf = [0u8; 4096];
    let n = open.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let revoked = ok(&[
        "site",
        "station",
        "revoke",
        "--home",
        &s(&w.site),
        "--name",
        "line-1",
    ]);
    assert_eq!(revoked["station"], "line-1");
    open.write_all(keep).unwrap();
    let n = open.read(&mut buf).unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("revoked"),
        "{answer}"
    );
    // New requests of line-1: refused; line-2 keeps working.
    let refused = station_provision(&url, &line1, &id, "D-0102", "b");
    assert_eq!(refused.code, 4, "{}", refused.json);
    assert_eq!(refused.json["error"]["code"], "untrusted_signer");
    assert_eq!(station_provision(&url, &line2, &id, "D-0103", "c").code, 0);
    // The access log names the revoked station its refused requests came from.
    let named = server.logs().lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|l| {
            l["target"] == "keyfab::access" && l["status"] == 403 && l["station"] == "line-1"
        })
    });
    assert!(named, "{}", server.logs());
    let list = ok(&["site", "station", "list", "--home", &s(&w.site)]);
    let states: Vec<_> = list["stations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["revoked_at"].is_null(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![("line-1".to_owned(), false), ("line-2".to_owned(), true)]
    );
    // Every other command reaches the serving site's store too; a second server of the
    // same home is told the home is in use, and by what.
    let listed = ok(&["site", "entitlement", "list", "--home", &s(&w.site)]);
    assert_eq!(listed["entitlements"][0]["provisioned"], 2);
    let second = keyfab(
        &[
            "site",
            "serve",
            "--home",
            &s(&w.site),
            "--listen",
            "127.0.0.1:0",
        ],
        None,
    );
    second.assert_error(1, "in_use", "site serve");
    let (code, _) = server.stop();
    assert_eq!(code, 0);
    // Stopped: the CLI works on the store directly again.
    let list = ok(&["site", "station", "list", "--home", &s(&w.site)]);
    assert_eq!(list["stations"].as_array().unwrap().len(), 2);
}

#[test]
fn a_slow_client_is_cut_off_while_stations_keep_working() {
    let (w, id, line1) = setup();
    let server = Server::start(&w.site);
    // Connects and never starts the handshake.
    let mut silent = TcpStream::connect(&server.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Completes the handshake, then trickles a header and stops.
    let mut slow = tls(&server.addr, &line1, Some(&line1)).unwrap();
    slow.write_all(b"GET /v1/entitlements HTTP/1.1\r\nHost: loc")
        .unwrap();
    // Meanwhile the line provisions.
    let started = Instant::now();
    assert_eq!(
        station_provision(&server.url(), &line1, &id, "D-0201", "s").code,
        0
    );
    // Both are closed after their deadline (1 s each here), without an answer.
    let mut buf = [0u8; 64];
    let closed = matches!(silent.read(&mut buf), Ok(0) | Err(_));
    assert!(closed, "silent connection still open");
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let answer = String::from_utf8_lossy(&rest);
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(9));
    let (code, _) = server.stop();
    assert_eq!(code, 0);
}

/// SIGTERM while four stations provision as fast as they can: the server drains and
/// exits 0; every request either got its keys — and then its record is in the log — or
/// failed cleanly with nothing decided. HQ counts exactly the keys the stations got.
#[test]
fn sigterm_under_load_loses_nothing() {
    let w = world();
    let policy = w.path("load.toml");
    std::fs::write(
        &policy,
        STATION_POLICY
            .replace("devices = 20", "devices = 5000")
            .replace("[stations]\nallowed = [\"line-1\", \"line-2\"]\n", ""),
    )
    .unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "load.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let line1 = w.path("line-1");
    enroll(&w.site, "line-1", &line1);
    let server = Server::start(&w.site);
    let url = server.url();
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let results: Vec<Vec<(String, String, Out)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (url, line1, id) = (url.clone(), line1.clone(), id.clone());
                scope.spawn(move || {
                    let mut done = Vec::new();
                    for i in 0.. {
                        let (device, request) = (format!("L{t}-{i:05}"), format!("q-{t}-{i}"));
                        let out = station_provision(&url, &line1, &id, &device, &request);
                        let failed = out.code != 0;
                        done.push((device, request, out));
                        if failed || Instant::now() > stop_at + Duration::from_secs(5) {
                            break;
                        }
                    }
                    done
                })
            })
            .collect();
        std::thread::sleep(stop_at.saturating_duration_since(Instant::now()));
        let (code, report) = server.stop();
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["stopped"], true, "{report}");
        workers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut got = Vec::new();
    for (device, request, out) in results.into_iter().flatten() {
        if out.code == 0 {
            got.push((device, request, out.json["audit_sequence"].clone()));
        } else {
            // Cleanly: a stable code, and no keys.
            assert_eq!(out.json["error"]["code"], "unreachable", "{}", out.json);
            assert!(out.json.get("keys").is_none());
        }
    }
    assert!(got.len() >= 8, "only {} devices before the stop", got.len());
    // Every device that got keys has its record: the same request id gets the same
    // answer from the stopped site's own store, asked as the station that made it.
    for (device, request, seq) in &got {
        let again = provision(
            &w,
            &id,
            device,
            &["--request-id", request, "--station", "line-1"],
            None,
        );
        assert_eq!(again.code, 0, "{}", again.json);
        assert_eq!(&again.json["audit_sequence"], seq, "{device}");
        assert_eq!(again.json["replayed"], true);
    }
    // HQ, from the log alone, counts exactly those releases.
    let report = export_import_report(&w, "load.kfa");
    let line = report["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["entitlement"] == id.as_str())
        .unwrap();
    assert_eq!(line["released"], got.len(), "{line}");
    assert_eq!(report["violations"], serde_json::json!([]));
}

fn station_confirm(url: &str, dir: &Path, id: &str, device: &str, result: &str) -> Out {
    station("confirm", url, dir, id, device, &["--result", result])
}

/// After programming, the station confirms; a failed device's keys are burned. Either
/// way the keys never leave again, and HQ accounts both from the log.
#[test]
fn confirmations_close_a_device_and_hq_counts_them() {
    let (w, id, line1) = setup();
    let server = Server::start(&w.site);
    let url = server.url();
    assert_eq!(station_provision(&url, &line1, &id, "D-0301", "c1").code, 0);
    assert_eq!(station_provision(&url, &line1, &id, "D-0302", "c2").code, 0);

    let done = station_confirm(&url, &line1, &id, "D-0301", "programmed");
    assert_eq!(done.code, 0, "{}", done.json);
    assert_eq!(done.json["repeated"], false);
    let again = station_confirm(&url, &line1, &id, "D-0301", "programmed");
    assert_eq!(again.json["repeated"], true);
    assert_eq!(again.json["audit_sequence"], done.json["audit_sequence"]);
    let contradicting = station_confirm(&url, &line1, &id, "D-0301", "failed");
    assert_eq!(contradicting.code, 1, "{}", contradicting.json);
    assert_eq!(contradicting.json["error"]["code"], "invalid_state");
    let burned = station_confirm(&url, &line1, &id, "D-0302", "failed");
    assert_eq!(burned.code, 0, "{}", burned.json);
    let unknown = station_confirm(&url, &line1, &id, "D-0399", "programmed");
    assert_eq!(
        unknown.json["error"]["code"], "not_found",
        "{}",
        unknown.json
    );

    // The same request ids no longer bring the keys back.
    for (device, request) in [("D-0301", "c1"), ("D-0302", "c2")] {
        let replay = station_provision(&url, &line1, &id, device, request);
        assert_ne!(replay.code, 0, "{}", replay.json);
        assert!(replay.json.get("keys").is_none());
    }
    let (code, _) = server.stop();
    assert_eq!(code, 0);

    let report = export_import_report(&w, "confirm.kfa");
    let line = &report["entitlements"][0];
    assert_eq!(
        (
            line["released"].clone(),
            line["confirmed"].clone(),
            line["burned"].clone()
        ),
        (2.into(), 1.into(), 1.into()),
        "{line}"
    );
    assert_eq!(report["violations"], serde_json::json!([]));
}

/// A simulated line: every chip gets its keys sealed to its own transport key, opens
/// them, checks its certificate up to the root, and confirms. What travels holds no
/// clear key byte, and a retry cannot have the keys re-sealed to another key.
#[test]
fn chips_get_keys_no_station_can_read() {
    let (w, id, line1) = setup();
    let server = Server::start(&w.site);
    let url = server.url();
    let root_crt = w.root.join("root.crt");
    let line = line_run(&url, &line1, &root_crt, &id, 12, 4, "SIM-");
    assert_eq!(line["programmed"], 12, "{line}");
    assert_eq!(line["failed"], 0, "{line}");

    // One device by hand, to look at what the station sees.
    let chip = keyfab_station::device::SimulatedChip::new("D-0401", &keyfab_crypto::rng::SystemRng);
    let body = serde_json::json!({
        "request_id": "t-1", "entitlement": id, "device_id": "D-0401",
        "transport_key": chip.transport_key().unwrap(),
    })
    .to_string();
    let post = |body: &str| {
        format!(
            "POST /v1/provision HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let answer = exchange(&server.addr, &line1, Some(&line1), post(&body).as_bytes());
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json_text = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let bundle: serde_json::Value = serde_json::from_str(json_text).unwrap();
    let root = pem(&root_crt, "CERTIFICATE");
    let now = keyfab_crypto::time::Clock::now(&keyfab_crypto::time::SystemClock);
    let keys = chip.program(&bundle, &root, now).unwrap();
    assert_eq!(keys.len(), 1);
    // No form of the key reaches the station: not the PKCS#8, not the scalar, in bytes,
    // base64 or hex.
    use base64::Engine;
    let der = keys[0].secret.expose();
    let scalar = &der[36..68];
    let b64 = base64::engine::general_purpose::STANDARD;
    for needle in [
        b64.encode(der),
        b64.encode(scalar),
        hex::encode(scalar),
        b64.encode(&scalar[..24]),
    ] {
        assert!(!answer.contains(&needle), "key material in the answer");
    }
    assert!(!answer.as_bytes().windows(scalar.len()).any(|w| w == scalar));
    assert!(!json_text.contains("PRIVATE KEY"));
    // Another chip cannot open it.
    let other =
        keyfab_station::device::SimulatedChip::new("D-0401", &keyfab_crypto::rng::SystemRng);
    assert!(other.program(&bundle, &root, now).is_err());
    // A retry must carry the same transport key: not another, not none.
    let thief =
        keyfab_station::device::SimulatedChip::new("D-0401", &keyfab_crypto::rng::SystemRng);
    let stolen = serde_json::json!({
        "request_id": "t-1", "entitlement": id, "device_id": "D-0401",
        "transport_key": thief.transport_key().unwrap(),
    })
    .to_string();
    let answer = exchange(&server.addr, &line1, Some(&line1), post(&stolen).as_bytes());
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let bare = serde_json::json!({"request_id": "t-1", "entitlement": id, "device_id": "D-0401"})
        .to_string();
    let answer = exchange(&server.addr, &line1, Some(&line1), post(&bare).as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 400") && !answer.contains("PRIVATE KEY"),
        "{answer}"
    );
    // The same chip retrying gets its keys again, sealed anew.
    let answer = exchange(&server.addr, &line1, Some(&line1), post(&body).as_bytes());
    let again: serde_json::Value =
        serde_json::from_str(&answer[answer.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(again["replayed"], true);
    let keys_again = chip.program(&again, &root, now).unwrap();
    assert_eq!(keys_again[0].secret.expose(), der);
    let (code, _) = server.stop();
    assert_eq!(code, 0);
}

/// A runaway station is held to its bounds — requests in flight, open connections —
/// while another station keeps working; a request whose body never finishes frees its
/// slot when it times out.
#[test]
fn one_runaway_station_cannot_starve_the_others() {
    let (w, id, line1) = setup();
    let line2 = w.path("line-2");
    enroll(&w.site, "line-2", &line2);
    let server = Server::start_with(
        &w.site,
        &[
            "--per-station-requests",
            "2",
            "--per-station-connections",
            "4",
            "--request-timeout",
            "2",
        ],
    );
    // line-1 starts two requests and never finishes their bodies.
    let stall = "POST /v1/provision HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"request_id\"";
    let mut held: Vec<_> = (0..2)
        .map(|_| {
            let mut c = tls(&server.addr, &line1, Some(&line1)).unwrap();
            c.write_all(stall.as_bytes()).unwrap();
            c.flush().unwrap();
            c
        })
        .collect();
    // Time for both to reach the server and take their slots, even on a loaded machine.
    std::thread::sleep(Duration::from_millis(800));
    // Its third is turned away at once ...
    let third = exchange(&server.addr, &line1, Some(&line1), &get("/v1/entitlements"));
    assert!(
        third.starts_with("HTTP/1.1 429") && third.contains("busy"),
        "{third}"
    );
    // ... while line-2 provisions.
    let other = station_provision(&server.url(), &line2, &id, "D-0501", "f1");
    assert_eq!(other.code, 0, "{}", other.json);
    // Two more open connections reach line-1's bound of four; a fifth is closed.
    let _idle: Vec<_> = (0..2)
        .map(|_| {
            let mut c = tls(&server.addr, &line1, Some(&line1)).unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 256];
            let n = c.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            c
        })
        .collect();
    let fifth = exchange(&server.addr, &line1, Some(&line1), &get("/healthz"));
    assert!(!fifth.contains("HTTP/1.1"), "{fifth}");
    assert_eq!(
        station_provision(&server.url(), &line2, &id, "D-0502", "f2").code,
        0
    );
    // The stalled requests time out (2 s here) and give their slots back.
    let mut answer = String::new();
    let _ = held[0].read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    drop(held);
    // A line that keeps more requests in flight than its bound still gets every device
    // through: the station sends the refused ones again, and its summary says so.
    let run = line_run(
        &server.url(),
        &line2,
        &w.root.join("root.crt"),
        &id,
        12,
        8,
        "BOUND-",
    );
    assert_eq!(run["programmed"], 12, "{run}");
    assert!(run["retried"]["busy"].as_u64().unwrap_or(0) > 0, "{run}");
    let (code, _) = server.stop();
    assert_eq!(code, 0);
}

#[test]
fn a_site_sealed_by_shares_serves_only_once_the_threshold_is_met() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let root = crate::common::root(&d, "root");
    let hq = crate::common::node(&d, &root, "hq", "acme-hq");
    // The site's keystore is sealed by 3 shares, any 2 of which unseal it, each sealed
    // to its holder's key; bob's key is under a passphrase of his own.
    let bob_pass = s(&d.join("bob.pass"));
    std::fs::write(&bob_pass, "bob's own passphrase").unwrap();
    for (holder, extra) in [
        ("alice", vec![]),
        ("bob", vec!["--passphrase-file", &bob_pass]),
        ("carol", vec![]),
    ] {
        let mut args = vec!["holder", "keygen", "--out"];
        let out = s(&d.join(holder));
        args.push(&out);
        args.extend(extra);
        ok(&args);
    }
    let pubs = ["alice", "bob", "carol"]
        .map(|h| s(&d.join(format!("{h}.pub"))))
        .join(",");
    let kfs: Vec<String> = ["alice", "bob", "carol"]
        .iter()
        .map(|h| s(&d.join(format!("{h}.kfs"))))
        .collect();
    let holder_key = |h: &str| s(&d.join(format!("{h}.key")));
    // Each holder opens their share for the one-shot commands below, into a file here
    // (as `--unseal-share-file <(keyfab holder open-share ...)` would pipe it).
    let share_files: Vec<String> = (1..=3)
        .map(|i| s(&d.join(format!("share-{i}.txt"))))
        .collect();
    let (site, unlock) = crate::common::node_with(
        &d,
        &root,
        "site",
        "shenzhen-1",
        &[
            "--unseal-shares",
            "3",
            "--unseal-threshold",
            "2",
            "--share-recipients",
            &pubs,
            "--shares-out",
            &s(&d),
        ],
        |report| {
            let u = &report["unseal"];
            assert_eq!(
                (
                    u["sealed"].as_array().map(Vec::len),
                    u["threshold"].as_u64()
                ),
                (Some(3), Some(2)),
                "{report}"
            );
            // No share in clear anywhere in what init said.
            assert!(u.get("shares").is_none(), "{report}");
            for (i, h) in ["alice", "bob", "carol"].iter().enumerate() {
                let mut args = vec!["holder", "open-share", "--key"];
                let key = holder_key(h);
                args.extend([key.as_str(), kfs[i].as_str()]);
                if *h == "bob" {
                    args.extend(["--passphrase-file", bob_pass.as_str()]);
                }
                let opened = ok(&args);
                std::fs::write(&share_files[i], opened["share"].as_str().unwrap()).unwrap();
            }
            [
                "--unseal-share-file",
                &share_files[0],
                "--unseal-share-file",
                &share_files[2],
            ]
            .map(String::from)
            .to_vec()
        },
    );
    let unlocked = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(unlock.iter().map(String::as_str));
        ok(&all)
    };
    let (f1, f2, f3) = (&share_files[0], &share_files[1], &share_files[2]);
    let stranger = s(&d.join("stranger.txt"));
    std::fs::write(&stranger, format!("kfs1-01{}", "ab".repeat(32))).unwrap();
    let kfi = s(&d.join("site.kfi"));
    let export = [
        "site",
        "identity",
        "export",
        "--home",
        &s(&site),
        "--out",
        &kfi,
    ];
    // One share is not enough, and a share of no keystore of this site is refused.
    for given in [vec![f2.as_str()], vec![stranger.as_str(), f2.as_str()]] {
        let mut args: Vec<&str> = export.to_vec();
        args.extend(given.iter().flat_map(|f| ["--unseal-share-file", f]));
        let refused = keyfab(&args, None);
        assert_eq!(
            (refused.code, refused.json["error"]["code"].as_str()),
            (1, Some("locked")),
            "{}",
            refused.json
        );
    }
    unlocked(&export);
    ok(&["hq", "site", "add", "--home", &s(&hq), &kfi]);
    let w = World {
        dir,
        root,
        hq,
        site: site.clone(),
    };
    let policy = w.path("line.toml");
    std::fs::write(&policy, STATION_POLICY).unwrap();
    let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "line.kfe");
    unlocked(&[
        "site",
        "entitlement",
        "import",
        "--home",
        &s(&site),
        &s(&kfe),
    ]);
    let line1 = w.path("line-1");
    unlocked(&[
        "site",
        "station",
        "enroll",
        "--home",
        &s(&site),
        "--name",
        "line-1",
        "--out",
        &s(&line1),
    ]);

    // Served with no share: sealed, and it says so.
    let (child, mut stderr) = Server::spawn(&site, &[]);
    let sealed = Server::line(&mut stderr);
    assert_eq!(
        (
            sealed["sealed"].as_bool(),
            sealed["shares"].as_u64(),
            sealed["threshold"].as_u64()
        ),
        (Some(true), Some(0), Some(2)),
        "{sealed}"
    );
    let unseal = |extra: &[&str]| {
        keyfab(
            &[&["site", "unseal", "--home", &s(&site)][..], extra].concat(),
            None,
        )
    };
    // Anything but unsealing is refused while sealed; so is a share not of this site.
    let listed = keyfab(&["site", "station", "list", "--home", &s(&site)], None);
    assert_eq!(listed.json["error"]["code"], "locked", "{}", listed.json);
    let refused = unseal(&["--share-file", &stranger]);
    assert_eq!(refused.json["error"]["code"], "locked", "{}", refused.json);
    // A share sealed to alice, opened with bob's key; a sealed share without a key;
    // one altered byte: refused, and nothing counted.
    let (alice_key, bob_key) = (holder_key("alice"), holder_key("bob"));
    let wrong = unseal(&[
        "--share-file",
        &kfs[0],
        "--holder-key",
        &bob_key,
        "--passphrase-file",
        &bob_pass,
    ]);
    assert_eq!(
        (wrong.code, wrong.json["error"]["code"].as_str()),
        (4, Some("wrong_recipient")),
        "{}",
        wrong.json
    );
    let keyless = unseal(&["--share-file", &kfs[0]]);
    assert_eq!(keyless.code, 2, "{}", keyless.json);
    let mut altered = std::fs::read(&kfs[0]).unwrap();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let altered_file = s(&d.join("altered.kfs"));
    std::fs::write(&altered_file, altered).unwrap();
    let bad = unseal(&["--share-file", &altered_file, "--holder-key", &alice_key]);
    assert_eq!(bad.json["error"]["code"], "malformed", "{}", bad.json);
    assert_eq!(unseal(&["--status"]).json["shares"], 0);
    let bobs_share = [
        "--share-file",
        &kfs[1],
        "--holder-key",
        &bob_key,
        "--passphrase-file",
        &bob_pass,
    ];
    let first = unseal(&bobs_share);
    assert_eq!(
        (
            first.json["unsealed"].as_bool(),
            first.json["shares"].as_u64()
        ),
        (Some(false), Some(1)),
        "{}",
        first.json
    );
    let again = unseal(&bobs_share);
    assert_eq!(
        again.json["error"]["code"], "locked",
        "the same share twice: {}",
        again.json
    );
    assert_eq!(unseal(&["--status"]).json["shares"], 1);
    let second = unseal(&[
        "--share-file",
        &kfs[2],
        "--holder-key",
        &holder_key("carol"),
    ]);
    assert_eq!(second.json["unsealed"], true, "{}", second.json);
    // Unsealed: it listens, and stations get keys.
    let server = Server::attach(child, stderr);
    let out = station_provision(&server.url(), &line1, &id, "TSV2-00000001", "r-1");
    assert_eq!(out.code, 0, "{}", out.json);
    // A served, unsealed node wants no more shares.
    assert_eq!(
        unseal(&["--share-file", f1]).json["error"]["code"],
        "invalid_state"
    );
    let (code, _) = server.stop();
    assert_eq!(code, 0);

    // Started again: sealed, but now (with the serving identity of the last run) every
    // station request is answered `locked`, on the port it will serve on.
    let (child, mut stderr) = Server::spawn(&site, &[]);
    let sealed = Server::line(&mut stderr);
    let addr = sealed["answering_locked_on"].as_str().unwrap().to_owned();
    let url = format!("https://{addr}");
    let locked = station_provision(&url, &line1, &id, "TSV2-00000002", "r-2");
    assert_eq!(locked.json["error"]["code"], "locked", "{}", locked.json);
    assert!(locked.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("0 of 2"));
    unseal(&["--share-file", f1]);
    assert_eq!(unseal(&["--share-file", f3]).json["unsealed"], true);
    let server = Server::attach(child, stderr);
    assert_eq!(server.addr, addr, "serves where it answered locked");
    let out = station_provision(&server.url(), &line1, &id, "TSV2-00000002", "r-2");
    assert_eq!(out.code, 0, "{}", out.json);
    let (code, _) = server.stop();
    assert_eq!(code, 0);
}

/// Shares go to their holders: `init --unseal-shares` shows them in clear only when asked
/// (`--print-shares`); a recipient list that does not match, or a file that is not a
/// holder's key, is refused before anything is written — no home, no share file.
#[test]
fn unseal_shares_are_shown_in_clear_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let home = s(&d.join("site"));
    let init = |extra: &[&str]| {
        let mut args = vec![
            "site",
            "init",
            "--home",
            &home,
            "--name",
            "shenzhen-1",
            "--unseal-shares",
            "2",
            "--unseal-threshold",
            "2",
        ];
        args.extend_from_slice(extra);
        keyfab(&args, None)
    };
    ok(&["holder", "keygen", "--out", &s(&d.join("alice"))]);
    std::fs::write(d.join("junk.pub"), "not a key").unwrap();
    let (alice, junk, out) = (s(&d.join("alice.pub")), s(&d.join("junk.pub")), s(d));
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = files();
    init(&[]).assert_error(2, "usage", "--print-shares");
    init(&["--share-recipients", &alice, "--shares-out", &out]).assert_error(
        2,
        "usage",
        "one holder per share",
    );
    init(&[
        "--share-recipients",
        &format!("{alice},{alice}"),
        "--shares-out",
        &out,
    ])
    .assert_error(2, "usage", "the same holder key twice");
    init(&[
        "--share-recipients",
        &format!("{alice},{junk}"),
        "--shares-out",
        &out,
    ])
    .assert_error(1, "invalid_input", "not a holder's public key");
    assert_eq!(before, files(), "a refused init wrote something");
    let shown = init(&["--print-shares"]);
    assert_eq!(shown.code, 0, "{}", shown.json);
    assert_eq!(shown.json["unseal"]["shares"].as_array().unwrap().len(), 2);
}

/// Canary keys: after 1,000 devices went through a line with chip encryption, a few
/// devices' keys (known to the test through their chips) are searched for — in every
/// form — in the running site's memory (a core dump taken with gcore), its logs, its
/// home, the audit bundle and HQ's home after import. They are nowhere in the clear.
#[test]
fn canary_keys_are_nowhere_in_the_clear_after_use() {
    let policy = STATION_POLICY.replace("devices = 20", "devices = 1010");
    let (w, id, line1) = setup_with(&policy);
    let server = Server::start(&w.site);
    let root_crt = w.root.join("root.crt");
    let line = line_run(&server.url(), &line1, &root_crt, &id, 1000, 8, "LINE-");
    assert_eq!(line["programmed"], 1000, "{line}");
    // The canaries: keys sealed to chips the test holds.
    let root = pem(&root_crt, "CERTIFICATE");
    let mut canaries: Vec<Vec<u8>> = Vec::new();
    for i in 0..5 {
        let device = format!("CANARY-{i}");
        let chip =
            keyfab_station::device::SimulatedChip::new(&device, &keyfab_crypto::rng::SystemRng);
        let body = serde_json::json!({
            "request_id": format!("c-{i}"), "entitlement": id, "device_id": device,
            "transport_key": chip.transport_key().unwrap(),
        })
        .to_string();
        let request = format!(
            "POST /v1/provision HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = exchange(&server.addr, &line1, Some(&line1), request.as_bytes());
        let bundle: serde_json::Value =
            serde_json::from_str(&answer[answer.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        // The chip's clock, read after the site issued the certificate (which starts then).
        let now = keyfab_crypto::time::Clock::now(&keyfab_crypto::time::SystemClock);
        let keys = chip.program(&bundle, &root, now).unwrap();
        let der = keys[0].secret.expose().to_vec();
        canaries.push(der[36..68].to_vec()); // the P-256 scalar inside the PKCS#8
        canaries.push(der);
    }
    // Every form a key could take: raw bytes, base64, hex.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let needles: Vec<Vec<u8>> = canaries
        .iter()
        .flat_map(|k| {
            [
                k.clone(),
                b64.encode(k).into_bytes(),
                hex::encode(k).into_bytes(),
            ]
        })
        .collect();
    // One pass over each haystack for every needle (a core dump is gigabytes).
    let finder = aho_corasick::AhoCorasick::new(&needles).unwrap();
    let hits = |what: &str, haystack: &[u8]| {
        if let Some(m) = finder.find(haystack) {
            let i = m.pattern().as_usize();
            panic!(
                "a canary key (form {} of key {}) is in {what} at offset {}",
                i % 3,
                i / 3,
                m.start()
            );
        }
    };
    // The running site's memory.
    let core = w.path("site.core");
    let pid = server.child.id().to_string();
    let dumped = Command::new("gcore")
        .args(["-o", &s(&core), &pid])
        .output()
        .unwrap();
    assert!(
        dumped.status.success(),
        "gcore: {}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    let core_file = w.path(&format!("site.core.{pid}"));
    if let Some(keep) = std::env::var_os("CANARY_KEEP_CORE") {
        std::fs::copy(&core_file, keep).unwrap();
    }
    hits("the site's memory", &std::fs::read(&core_file).unwrap());
    std::fs::remove_file(&core_file).unwrap();
    hits("the site's logs", server.logs().as_bytes());
    // What a refusal says (a device that has its keys already).
    let refused = station_provision(&server.url(), &line1, &id, "CANARY-0", "c-again");
    assert_ne!(refused.code, 0);
    hits("an error message", refused.json.to_string().as_bytes());
    let (code, _) = server.stop();
    assert_eq!(code, 0);
    // Its home, the audit bundle and HQ after import.
    let report = export_import_report(&w, "canary.kfa");
    hits("HQ's report", report.to_string().as_bytes());
    for home in [&w.site, &w.hq, &w.path("canary.kfa")] {
        let mut stack = vec![home.to_path_buf()];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                hits(&p.display().to_string(), &std::fs::read(&p).unwrap());
            }
        }
    }
}

/// A request id and a confirmation belong to the station that was answered: another
/// station — allowed by the policy or not — sending line-1's request id gets no keys,
/// and cannot burn line-1's device by confirming it `failed`. Each attempt is refused
/// `station_not_allowed` (exit 3) and audited; line-1 still gets its answer on a retry,
/// and HQ counts the attempts as refusals, with no violation.
#[test]
fn another_stations_request_id_or_confirmation_is_refused_and_audited() {
    let (w, id, line1) = setup();
    let (line2, line3) = (w.path("line-2"), w.path("line-3"));
    enroll(&w.site, "line-2", &line2);
    enroll(&w.site, "line-3", &line3);
    // A lot the site provisions itself for line-1: its request ids are the site's own.
    provision_lot(
        &w,
        &id,
        &["LOT-1".to_owned()],
        &w.path("lot.jsonl"),
        &["--station", "line-1"],
    );
    let server = Server::start(&w.site);
    let url = server.url();
    // Not even line-1 has the lot's answer by naming its device, nor by its request id.
    let named = station_provision(&url, &line1, &id, "LOT-1", "LOT-1");
    named.assert_error(3, "device_already_provisioned", "LOT-1");
    let lot_id = keyfab_site::provision::lot_request_id("LOT-1");
    let own = station_provision(&url, &line1, &id, "LOT-1", &lot_id);
    own.assert_error(1, "invalid_input", "the site's own");

    let first = station_provision(&url, &line1, &id, "D-0701", "line1-r1");
    assert_eq!(first.code, 0, "{}", first.json);
    // line-2 is allowed by the policy, line-3 is not: neither gets line-1's answer.
    for other in [&line2, &line3] {
        let stolen = station_provision(&url, other, &id, "D-0701", "line1-r1");
        stolen.assert_error(3, "station_not_allowed", "made by another station");
        assert!(stolen.json.get("keys").is_none(), "{}", stolen.json);
    }
    // Nor can they close or burn line-1's device.
    for (other, result) in [(&line2, "failed"), (&line3, "programmed")] {
        let burn = station_confirm(&url, other, &id, "D-0701", result);
        burn.assert_error(3, "station_not_allowed", "only that station may confirm");
    }
    // line-1's retry is answered as before, and its confirmation lands.
    let again = station_provision(&url, &line1, &id, "D-0701", "line1-r1");
    assert_eq!(again.code, 0, "{}", again.json);
    assert_eq!(again.json["replayed"], true);
    assert_eq!(again.json["keys"], first.json["keys"]);
    let done = station_confirm(&url, &line1, &id, "D-0701", "programmed");
    assert_eq!(done.code, 0, "{}", done.json);
    assert_eq!(done.json["repeated"], false);
    // A refused request's id is line-2's own too: line-1 cannot replay it.
    let refused = station_provision(&url, &line2, &id, "BAD,ID", "line2-r1");
    assert_eq!(refused.code, 3, "{}", refused.json);
    let replay = station_provision(&url, &line1, &id, "BAD,ID", "line2-r1");
    replay.assert_error(3, "station_not_allowed", "made by another station");
    // A device id of 60 kB, within the body cap: refused before any decision, so no
    // record grows beyond what an export carries (checked by the import below).
    let body = format!(
        r#"{{"request_id":"big-1","entitlement":"{id}","device_id":"{}"}}"#,
        "D".repeat(60_000)
    );
    let post = format!(
        "POST /v1/provision HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(&server.addr, &line1, Some(&line1), post.as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("invalid_input"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    let (code, _) = server.stop();
    assert_eq!(code, 0);

    // Every attempt is in the log, and HQ counts them without a violation.
    let report = export_import_report(&w, "mismatch.kfa");
    let line = &report["entitlements"][0];
    assert_eq!(line["refusals"]["station_not_allowed"], 5, "{line}");
    assert_eq!(report["violations"], serde_json::json!([]));
    let log = ok(&["site", "audit", "verify", "--home", &s(&w.site)]);
    // The import, the line CA, three enrollments, the lot's release and line-1's refused
    // request for its device, the release, four refused attempts, the confirmation, the
    // refusal of BAD,ID and line-1's attempt at it, the export: nothing for the oversized
    // request, nor for the request with the site's own id.
    assert_eq!(log["records"], 16, "{log}");
}

/// A key released is a key delivered: an --out that cannot take the keys is refused
/// before the site is asked; one that fails after the release names the request id and
/// the command that gets the same keys again, and that command does.
#[test]
fn a_station_never_loses_keys_between_the_site_and_its_output_file() {
    let (w, id, line1) = setup();
    let server = Server::start(&w.site);
    let url = server.url();
    let existing = w.path("taken.json");
    std::fs::write(&existing, "{}").unwrap();
    let link = w.path("link.json");
    std::os::unix::fs::symlink(w.path("elsewhere.json"), &link).unwrap();
    for out in [existing, link, w.path("no/such/dir/keys.json")] {
        let refused = station(
            "provision",
            &url,
            &line1,
            &id,
            "OUT-1",
            &["--out", &s(&out)],
        );
        refused.assert_error(1, "invalid_input", "nothing was asked of the site");
    }
    // Nothing was released for OUT-1: it is provisioned now, for the first time.
    let first = station(
        "provision",
        &url,
        &line1,
        &id,
        "OUT-1",
        &["--out", &s(&w.path("out-1.json"))],
    );
    assert_eq!(first.code, 0, "{}", first.json);
    assert_eq!(first.json["replayed"], false);

    // The write fails after the release (its temporary file's name is taken by a
    // directory): the error names the request id and the command that fetches it.
    let out = w.path("out-2.json");
    std::fs::create_dir(w.path(".out-2.json.tmp")).unwrap();
    let failed = station(
        "provision",
        &url,
        &line1,
        &id,
        "OUT-2",
        &["--out", &s(&out)],
    );
    assert_eq!(failed.json["error"]["code"], "io", "{}", failed.json);
    let message = failed.json["error"]["message"].as_str().unwrap();
    let (request_id, command) = retry_named(message);
    assert!(
        command.contains(&format!("--request-id {request_id}")),
        "{message}"
    );
    assert!(command.starts_with("keyfab station provision"), "{message}");
    let again = station(
        "provision",
        &url,
        &line1,
        &id,
        "OUT-2",
        &[
            "--request-id",
            &request_id,
            "--out",
            &s(&w.path("out-2b.json")),
        ],
    );
    assert_eq!(again.code, 0, "{}", again.json);
    assert_eq!(again.json["replayed"], true, "the same keys, not new ones");
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.path("out-2b.json")).unwrap()).unwrap();
    assert_eq!(kept["device_id"], "OUT-2");
    assert!(kept["keys"][0]["private_key_pem"].is_string());
}

/// The JSON body of `GET path`, as station `identity` sees it.
fn api_get(addr: &str, identity: &Path, path: &str) -> serde_json::Value {
    let answer = exchange(addr, identity, Some(identity), &get(path));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[test]
fn every_view_tells_where_an_entitlement_stands() {
    let w = world();
    ok(&["approver", "keygen", "--out", &s(&w.path("alice"))]);
    let (_, id, line1) = {
        let policy = w.path("gated.toml");
        std::fs::write(
            &policy,
            "product = \"gated\"\ndevices = 10\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
             [[keys]]\nname = \"seed\"\ntype = \"aes-256\"\nsource = \"hq-pool\"\n\
             [approval]\nthreshold = 1\napprovers = [\"alice.pub\"]\nrequired_for = [\"activate\"]\n",
        )
        .unwrap();
        let (kfe, id) = create_from(&w, "shenzhen-1", &policy, "gated.kfe");
        assert_eq!(import(&w.site, &kfe, None).code, 0);
        let line1 = w.path("line-1");
        enroll(&w.site, "line-1", &line1);
        ((), id, line1)
    };
    let seen = |expect: &str, left: u64| {
        let server = Server::start(&w.site);
        let listed = api_get(&server.addr, &line1, "/v1/entitlements");
        let e = &listed["entitlements"][0];
        assert_eq!(e["state"], expect, "{listed}");
        assert_eq!(e["valid_until"], "2030-01-01T00:00:00Z", "{listed}");
        let metrics = exchange(&server.addr, &line1, Some(&line1), &get("/metrics"));
        let labels = format!("entitlement=\"{id}\",product=\"gated\"");
        assert!(
            metrics.contains(&format!("keyfab_quota_left{{{labels}}} {left}\n")),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!(
                "keyfab_entitlement_status{{{labels},status=\"{expect}\"}} 1\n"
            )),
            "{metrics}"
        );
        drop(server);
        let listed = ok(&["site", "entitlement", "list", "--home", &s(&w.site)]);
        assert_eq!(listed["entitlements"][0]["state"], expect, "{listed}");
    };
    seen("pending_approval", 10);

    // A quorum of one activates it: every view says active.
    let req = w.path("activate.req");
    approval_request(&w, &id, "activate", &req);
    let approval = w.path("alice.approval");
    sign_approval(&w, "alice", &req, &approval);
    ok(&[
        "site",
        "approval",
        "submit",
        "--home",
        &s(&w.site),
        &s(&approval),
    ]);
    seen("active", 10);
    let server = Server::start(&w.site);
    let first = station("provision", &server.url(), &line1, &id, "V-1", &[]);
    assert_eq!(first.code, 0, "{}", first.json);
    drop(server);
    let listed = ok(&["site", "entitlement", "list", "--home", &s(&w.site)]);
    let e = &listed["entitlements"][0];
    assert_eq!(
        (e["provisioned"].as_u64(), e["left"].as_u64()),
        (Some(1), Some(9))
    );
    assert_eq!(
        (e["pool_keys"].as_u64(), e["pool_keys_left"].as_u64()),
        (Some(10), Some(9))
    );

    // Revoked at HQ and at the site: every view says revoked, nothing is left.
    let kfr = w.path("gated.kfr");
    revoke(&w, &id, None, &kfr);
    assert_eq!(import(&w.site, &kfr, None).code, 0);
    seen("revoked", 0);
    let listed = ok(&["site", "entitlement", "list", "--home", &s(&w.site)]);
    let e = &listed["entitlements"][0];
    assert_eq!(e["pool_keys_left"], 0, "{listed}");
    assert_eq!(e["keys"][0]["pool_keys_left"], 0, "{listed}");
    let issued = ok(&["hq", "entitlement", "list", "--home", &s(&w.hq)]);
    let e = &issued["entitlements"][0];
    assert_eq!(e["state"], "revoked", "{issued}");
    assert_eq!(e["valid_from"], "2026-01-01T00:00:00Z", "{issued}");
    let sites = ok(&["hq", "site", "list", "--home", &s(&w.hq)]);
    let site = &sites["sites"][0];
    assert_eq!(
        (
            site["entitlements_issued"].as_u64(),
            site["entitlements_revoked"].as_u64()
        ),
        (Some(1), Some(1)),
        "a revocation is not an entitlement: {sites}"
    );
}

#[test]
fn a_line_rerun_resumes_what_is_left_and_counts_what_is_done() {
    let policy = STATION_POLICY.replace("[stations]", "[limits]\ndaily = 2\n[stations]");
    let (w, id, line1) = setup_with(&policy);
    let root_crt = w.root.join("root.crt");
    let log = w.path("line.jsonl");
    let run = |now: &str| {
        let server = Server::start_at(&w.site, now);
        let out = keyfab(
            &[
                "station",
                "run",
                "--url",
                &server.url(),
                "--station-dir",
                &s(&line1),
                "--root-cert",
                &s(&root_crt),
                "--entitlement",
                &id,
                "--devices",
                "3",
                "--concurrency",
                "1",
                "--device-prefix",
                "DAY-",
                "--device-log",
                &s(&log),
            ],
            Some(now),
        );
        drop(server);
        out
    };
    // Day one: two devices programmed, the third refused for the day. The summary
    // still comes, with the error that says what is left and why.
    let at =
        |hours: i64| (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(hours)).to_string();
    let day1 = run(&at(0));
    assert_eq!(day1.code, 3, "{}", day1.json);
    assert_eq!(
        day1.json["error"]["code"], "daily_limit_exceeded",
        "{}",
        day1.json
    );
    assert_eq!(day1.json["programmed"], 2, "{}", day1.json);
    assert_eq!(
        day1.json["refused"]["daily_limit_exceeded"], 1,
        "{}",
        day1.json
    );
    // Day two, the same command: the third is decided again and programmed; the first
    // two are done already, and are counted so (not refused, not programmed twice).
    let day2 = run(&at(24));
    assert_eq!(day2.code, 0, "{}", day2.json);
    assert_eq!(
        (
            day2.json["programmed"].as_u64(),
            day2.json["already_programmed"].as_u64()
        ),
        (Some(1), Some(2)),
        "{}",
        day2.json
    );
    // The device log: one line per device per run, each naming its request id, which
    // is the same on both runs.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    let of = |device: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["device_id"] == device).collect()
    };
    let third = of("DAY-00000003");
    assert_eq!(third[0]["result"], "refused");
    assert_eq!(third[0]["code"], "daily_limit_exceeded");
    assert_eq!(third[1]["result"], "programmed");
    assert!(third[1]["audit_sequence"].is_u64(), "{third:?}");
    assert!(third[1]["url"]
        .as_str()
        .is_some_and(|u| u.starts_with("https://")));
    assert_eq!(third[0]["request_id"], third[1]["request_id"]);
    let first = of("DAY-00000001");
    assert_eq!(first[1]["result"], "already_programmed");
    assert_eq!(first[0]["request_id"], first[1]["request_id"]);
    hq_finds_no_violations(&w, "resume.kfa");
}

/// A station's certificate renewed while the site serves, without revoking the station:
/// the new files work at once, the current ones until their end; a second renewal stops
/// the first certificate; a revocation stops them all.
#[test]
fn a_station_is_renewed_without_stopping_it() {
    let (w, id, line1) = setup();
    let server = Server::start(&w.site);
    let url = server.url();
    let home = s(&w.site);
    let renew = |out: &Path| {
        let out = s(out);
        let args = [
            "site", "station", "renew", "--home", &home, "--name", "line-1",
        ];
        keyfab(
            &[&args[..], &["--out", &out, "--days", "30"]].concat(),
            None,
        )
    };
    let first = renew(&w.path("line-1-renewed"));
    assert_eq!(first.code, 0, "{}", first.json);
    assert!(first.json["previous_serial"].is_string(), "{}", first.json);
    let renewed = w.path("line-1-renewed");
    for (dir, device) in [(&line1, "D-0001"), (&renewed, "D-0002")] {
        let o = station_provision(&url, dir, &id, device, &format!("r-{device}"));
        assert_eq!(o.code, 0, "{}", o.json);
    }
    // Renewed again: the original certificate is replaced for good.
    assert_eq!(renew(&w.path("line-1-third")).code, 0);
    let o = station_provision(&url, &line1, &id, "D-0003", "r-D-0003");
    o.assert_error(4, "untrusted_signer", "");
    let o = station_provision(&url, &renewed, &id, "D-0003", "r-D-0003");
    assert_eq!(o.code, 0, "{}", o.json);
    ok(&[
        "site",
        "station",
        "revoke",
        "--home",
        &s(&w.site),
        "--name",
        "line-1",
    ]);
    for dir in [renewed, w.path("line-1-third")] {
        let o = station_provision(&url, &dir, &id, "D-0004", "r-D-0004");
        assert_ne!(o.code, 0, "{}", o.json);
    }
    // A revoked station is enrolled again, not renewed.
    let o = renew(&w.path("line-1-fourth"));
    o.assert_error(1, "invalid_state", "enroll it again");
}

/// `site status`: the same screen from a stopped site and a serving one, with what will
/// stop the line soon first.
#[test]
fn site_status_reads_at_a_glance_stopped_or_serving() {
    let (w, id, _line1) = setup();
    let site = s(&w.site);
    let stopped = ok(&["site", "status", "--home", &site]);
    assert_eq!(stopped["entitlements"][0]["id"], id.as_str(), "{stopped}");
    assert_eq!(stopped["entitlements"][0]["state"], "active");
    assert_eq!(stopped["entitlements"][0]["quota"], 20);
    assert_eq!(stopped["stations"][0]["name"], "line-1");
    assert_eq!(
        stopped["warnings"].as_array().unwrap().len(),
        0,
        "{stopped}"
    );
    // A station certificate about to end is a warning.
    enroll_with(&w.site, "line-2", &w.path("line-2"), &["--days", "3"]);
    let server = Server::start(&w.site);
    let o = station_provision(&server.url(), &w.path("line-2"), &id, "D-0001", "r-1");
    assert_eq!(o.code, 0, "{}", o.json);
    let serving = ok(&["site", "status", "--home", &site]);
    assert_eq!(serving["entitlements"][0]["provisioned"], 1, "{serving}");
    assert!(serving["audit"]["unexported"].as_u64().unwrap() > 0);
    let warnings = serving["warnings"].to_string();
    assert!(
        warnings.contains("station line-2") && warnings.contains("site station renew"),
        "{warnings}"
    );
    let text = keyfab_text(&["site", "status", "--home", &site]);
    assert!(
        text.contains("warnings:") && text.contains("1/20 in all"),
        "{text}"
    );
}

/// `site status --json` against a known state: a quota nearly spent and an audit due
/// within a day are warnings, and a serving site tells what each station did.
#[test]
fn site_status_warns_of_a_quota_nearly_spent_and_an_audit_due_tomorrow() {
    let (w, id, line1) = setup_with(
        &(STATION_POLICY.replace("devices = 20\n", "devices = 20\naudit_every_days = 1\n")
            + "[limits]\ndaily = 20\n"),
    );
    let ids: Vec<String> = (0..18).map(|i| format!("L-{i:04}")).collect();
    provision_lot(&w, &id, &ids, &w.path("lot-out"), &["--station", "line-1"]);
    let server = Server::start(&w.site);
    let o = station_provision(&server.url(), &line1, &id, "D-0001", "r-1");
    assert_eq!(o.code, 0, "{}", o.json);
    let status = ok(&["site", "status", "--home", &s(&w.site)]);
    let e = &status["entitlements"][0];
    assert_eq!(
        (&e["state"], &e["provisioned"], &e["quota"], &e["today"]),
        (&"active".into(), &19.into(), &20.into(), &19.into()),
        "{status}"
    );
    let clock = status["clock"].as_i64().unwrap();
    let due = e["audit_due_at"].as_i64().unwrap();
    assert!(due > clock && due - clock <= 86_400, "{status}");
    assert_eq!(status["audit"]["unexported"], status["audit"]["records"]);
    assert!(status["audit"]["last_export"].is_null());
    let warnings: Vec<&str> = status["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "{status}");
    assert!(warnings[0].contains("1 devices of 20 left"), "{warnings:?}");
    assert!(
        warnings[1].contains("pauses") && warnings[1].contains("receipt"),
        "{warnings:?}"
    );
    let station = &status["serving"]["stations"][0];
    assert_eq!(
        (&station["name"], &station["provisioned"]),
        (&"line-1".into(), &1.into()),
        "{status}"
    );
    assert!(
        station["last_seen"].as_i64().unwrap() >= clock - 60,
        "{status}"
    );
    assert!(
        station["devices_per_second"].as_f64().unwrap() > 0.0,
        "{status}"
    );
    // The same state in `/metrics`: every family an SRE watches, and a text promtool
    // accepts when it is installed.
    let confirmed = station_confirm(&server.url(), &line1, &id, "D-0001", "programmed");
    assert_eq!(confirmed.code, 0, "{}", confirmed.json);
    let answer = exchange(&server.addr, &line1, Some(&line1), &get("/metrics"));
    let metrics = answer.split_once("\r\n\r\n").unwrap().1;
    let labels = format!("entitlement=\"{id}\",product=\"line\"");
    for line in [
        format!("keyfab_quota_left{{{labels}}} 1\n"),
        format!("keyfab_daily_left{{{labels}}} 1\n"),
        format!("keyfab_entitlement_status{{{labels},status=\"active\"}} 1\n"),
        format!("keyfab_audit_due_seconds{{{labels}}} "),
        "keyfab_confirmed_total{result=\"programmed\"} 1\n".to_owned(),
        "keyfab_connections_over_bound_total 0\n".to_owned(),
        "keyfab_handshakes_refused_total ".to_owned(),
        "keyfab_station_provisioned_total{station=\"line-1\"} 1\n".to_owned(),
    ] {
        assert!(metrics.contains(&line), "{line}: {metrics}");
    }
    promtool_accepts(metrics);
    // Exported: the status says so (all but the export's own record).
    export(&w, "status.kfa");
    let after = ok(&["site", "status", "--home", &s(&w.site)]);
    let records = after["audit"]["records"].as_u64().unwrap();
    assert_eq!(after["audit"]["last_export"][0], records - 1, "{after}");
    assert_eq!(after["audit"]["unexported"], 1, "{after}");
}

/// `promtool check metrics` (Prometheus's own linter) accepts `text`, when promtool is
/// installed (scripts/test.sh installs it).
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool is not installed: /metrics not linted");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command's text output (no --json).
fn keyfab_text(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .args(args)
        .env("KEYFAB_PASSPHRASE", PASS)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
