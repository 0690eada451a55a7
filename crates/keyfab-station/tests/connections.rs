//! The station client against a TLS server on loopback that closes connections when a
//! real site would: a kept connection closed while idle is not a failed request, and a
//! connection that dies mid-answer is retried with the same request; a site whose
//! certificate does not verify is refused at once, with why, and not asked again.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_crypto::rng::SystemRng;
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::{Clock, SystemClock};
use keyfab_crypto::x509::{self, Validity};
use keyfab_station::{Client, ProvisionRequest, StationDir};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

/// What the server does with each connection it accepts, in order.
#[derive(Clone, Copy)]
enum Then {
    /// Answers one request, then closes the connection (as a site closes one left idle).
    AnswerAndClose,
    /// Reads the request, sends half an answer, closes.
    CutMidAnswer,
    /// Answers every request until the client closes.
    AnswerAll,
}

struct Line {
    _dir: tempfile::TempDir,
    station: StationDir,
    server: Arc<rustls::ServerConfig>,
}

/// The certificate the server shows.
#[derive(PartialEq)]
enum Shown {
    /// Issued by the station's line CA, valid now.
    Good,
    /// Issued by the line CA of another site.
    OfAnotherSite,
    /// Issued by the line CA, valid only from tomorrow (the site's clock is ahead).
    FromTomorrow,
}

/// A line CA, a station enrolled under it (written as `site station enroll` does) and the
/// server's certificate for 127.0.0.1.
fn line() -> Line {
    line_showing(Shown::Good)
}

fn line_showing(shown: Shown) -> Line {
    let rng = SystemRng;
    let now = SystemClock.now();
    let validity = Validity {
        not_before: now.plus_days(-1),
        not_after: now.plus_days(1),
    };
    let ca_key = SigningKey::generate(&rng).unwrap();
    let ca = x509::line_ca_certificate(&ca_key, "test-site", validity, &rng).unwrap();
    let station_key = SigningKey::generate(&rng).unwrap();
    let station = x509::issue_station_certificate(
        &ca_key,
        &ca,
        station_key.verifying_key().sec1(),
        "line-1",
        validity,
        &rng,
    )
    .unwrap();
    let (issuer_key, issuer) = if shown == Shown::OfAnotherSite {
        let key = SigningKey::generate(&rng).unwrap();
        let other = x509::line_ca_certificate(&key, "other-site", validity, &rng).unwrap();
        (key, other)
    } else {
        (ca_key, ca.clone())
    };
    let server_validity = if shown == Shown::FromTomorrow {
        Validity {
            not_before: now.plus_days(1),
            not_after: now.plus_days(2),
        }
    } else {
        validity
    };
    let server_key = SigningKey::generate(&rng).unwrap();
    let server = x509::issue_server_certificate(
        &issuer_key,
        &issuer,
        server_key.verifying_key().sec1(),
        "test-site",
        &["127.0.0.1".into()],
        server_validity,
        &rng,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, der: &[u8], tag: &str| {
        std::fs::write(dir.path().join(name), x509::to_pem(der, tag)).unwrap();
    };
    write(
        keyfab_station::KEY_FILE,
        station_key.to_pkcs8().expose(),
        "PRIVATE KEY",
    );
    write(keyfab_station::CERT_FILE, &station, "CERTIFICATE");
    write(keyfab_station::LINE_CA_FILE, &ca, "CERTIFICATE");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server), CertificateDer::from(issuer)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                server_key.to_pkcs8().expose().to_vec(),
            )),
        )
        .unwrap();
    Line {
        station: StationDir::load(dir.path()).unwrap(),
        _dir: dir,
        server: Arc::new(server),
    }
}

/// Reads one request (head and content-length body); false at the end of the stream.
fn read_request(conn: &mut impl Read) -> bool {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => bytes.push(byte[0]),
            _ => return false,
        }
    }
    let head = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |n| n.trim().parse::<usize>().unwrap());
    let mut body = vec![0; length];
    conn.read_exact(&mut body).is_ok()
}

const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

/// Serves one connection per entry of `plan`; returns the requests each one read.
fn serve(line: &Line, plan: Vec<Then>) -> (String, std::thread::JoinHandle<Vec<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let config = line.server.clone();
    let server = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for then in plan {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut n = 0;
            while read_request(&mut tls) {
                n += 1;
                match then {
                    Then::AnswerAndClose | Then::AnswerAll => tls.write_all(ANSWER).unwrap(),
                    Then::CutMidAnswer => tls.write_all(&ANSWER[..20]).unwrap(),
                }
                tls.flush().unwrap();
                if !matches!(then, Then::AnswerAll) {
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                    break;
                }
            }
            requests.push(n);
        }
        requests
    });
    (url, server)
}

fn request(device: &str) -> ProvisionRequest {
    ProvisionRequest {
        request_id: device.into(),
        entitlement: "E".into(),
        device_id: device.into(),
        csr: None,
        transport_key: None,
        chip_certificates: None,
    }
}

#[test]
fn a_kept_connection_the_site_closed_costs_no_retry() {
    let line = line();
    let (url, server) = serve(&line, vec![Then::AnswerAndClose, Then::AnswerAll]);
    let client = Client::new(&line.station, &[url]).unwrap();
    assert_eq!(client.provision(&request("D-1")).unwrap()["ok"], true);
    // The first connection was kept, and the server closed it meanwhile: the request
    // goes on a new connection at once, and it is not a request sent again.
    assert_eq!(client.provision(&request("D-2")).unwrap()["ok"], true);
    assert_eq!(client.provision(&request("D-3")).unwrap()["ok"], true);
    assert_eq!(client.retries().dropped, 0);
    drop(client);
    assert_eq!(server.join().unwrap(), vec![1, 2]);
}

#[test]
fn an_answer_cut_short_is_asked_again_with_the_same_request() {
    let line = line();
    let (url, server) = serve(&line, vec![Then::CutMidAnswer, Then::AnswerAll]);
    let client = Client::new(&line.station, &[url]).unwrap();
    assert_eq!(client.provision(&request("D-1")).unwrap()["ok"], true);
    assert_eq!(client.retries().dropped, 1);
    drop(client);
    assert_eq!(server.join().unwrap(), vec![1, 1]);
}

#[test]
fn a_site_certificate_that_does_not_verify_is_refused_at_once_with_why() {
    for (shown, why) in [
        (Shown::OfAnotherSite, "UnknownIssuer"),
        (Shown::FromTomorrow, "compare this machine's clock"),
    ] {
        let line = line_showing(shown);
        let (url, server) = serve(&line, vec![Then::AnswerAll]);
        let client = Client::new(&line.station, &[url]).unwrap();
        match client.provision(&request("D-1")) {
            Err(keyfab_station::StationError::Untrusted(m)) => {
                assert!(
                    m.contains("the site's certificate is not accepted") && m.contains(why),
                    "{m}"
                );
            }
            other => panic!("expected a certificate refusal, got {other:?}"),
        }
        // One handshake, not sent again.
        assert_eq!(client.retries().dropped, 0);
        drop(client);
        assert_eq!(server.join().unwrap(), vec![0]);
    }
}
