//! Every committed test vector (`tests/vectors/`, made by `scripts/make-vectors.sh`)
//! through the library's verify functions, each matched to the typed error it must give:
//! the variant of `FormatError` and, for a malformed file, the kind of defect. The
//! binary-level test (keyfab's e2e `vectors`) checks exit codes and error codes; this
//! one checks that one defect gives one error, whatever the CLI makes of it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_crypto::hash::Fingerprint;
use keyfab_crypto::rng::SystemRng;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509;
use keyfab_formats::{audit_bundle, checkpoint, entitlement, identity, revocation};
use keyfab_formats::{FormatError, Malformed};
use keyfab_node::{Node, NodeKind};
use keyfab_testkit::TestClock;
use std::path::{Path, PathBuf};

/// 2026-11-25T00:00:00Z, when the vectors were made.
const VECTOR_TIME: i64 = 1_795_564_800;
const PASSPHRASE: &[u8] = b"keyfab test vectors";

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors")
}

/// A private copy of a committed home (homes must be 0700, their files 0600).
fn open_home(name: &str, kind: NodeKind, dir: &Path) -> Node {
    use std::os::unix::fs::PermissionsExt;
    let home = dir.join(name);
    std::fs::create_dir(&home).expect("home");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for entry in std::fs::read_dir(vectors().join(name)).expect("vector home") {
        let entry = entry.expect("entry");
        let to = home.join(entry.file_name());
        std::fs::copy(entry.path(), &to).expect("copy");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    Node::open(
        &home,
        kind,
        &SecretBytes::new(PASSPHRASE.to_vec()),
        Box::new(SystemRng),
        Box::new(TestClock::at(VECTOR_TIME)),
        &keyfab_node::BuiltInOnly,
    )
    .expect("open vector home")
}

/// What a vector gave: `ok`, or its error's code and (if malformed) kind, as the vector
/// list names them.
fn outcome(result: Result<(), FormatError>) -> (String, String) {
    match result {
        Ok(()) => ("ok".into(), "-".into()),
        Err(e) => {
            let kind = e.malformed_kind().map_or("-", Malformed::as_str);
            (e.code().as_str().to_owned(), kind.to_owned())
        }
    }
}

#[test]
fn every_vector_gives_its_typed_error_in_the_library() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hq = open_home("hq", NodeKind::Hq, dir.path());
    let site = open_home("site", NodeKind::Site, dir.path());
    let root_pem = std::fs::read_to_string(vectors().join("root/root.crt")).expect("root");
    let root = x509::from_pem(&root_pem, "CERTIFICATE").expect("root pem");
    let now = UnixTime(VECTOR_TIME);
    let site_keys: Vec<Fingerprint> = site.recipient_fingerprints().expect("site keys");
    let hq_keys: Vec<Fingerprint> = hq.recipient_fingerprints().expect("hq keys");
    let (site_name, hq_name) = (site.name.clone(), hq.name.clone());

    let expected = std::fs::read_to_string(vectors().join("expected.txt")).expect("list");
    let mut ran = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [file, command, code, kind] = f[..] else {
            panic!("bad line: {line}")
        };
        let path = vectors().join(file);
        let bytes = || std::fs::read(&path).expect("vector");
        let result: Result<(), FormatError> = match command {
            "import" => {
                entitlement::verify_entitlement(&path, &root, now, &site_name, &site_keys).map(drop)
            }
            "site-add" => identity::verify_identity(&bytes(), &root, now).map(drop),
            "hq-audit" => {
                audit_bundle::verify_bundle(&path, &root, now, &hq_name, &hq_keys).map(drop)
            }
            "receipt" => {
                checkpoint::verify_receipt(&bytes(), &root, now, &site_name, &site_keys).map(drop)
            }
            "revoke" => revocation::verify_revocation(&bytes(), &root, now, &site_name, &site_keys)
                .map(drop),
            other => panic!("unknown command {other}"),
        };
        // A replay is refused by the engine, from its state; the file itself verifies.
        let want = match code {
            "replayed" => ("ok".to_owned(), "-".to_owned()),
            code => (code.to_owned(), kind.to_owned()),
        };
        assert_eq!(outcome(result), want, "{file} ({command})");
        ran += 1;
    }
    assert!(ran >= 36, "only {ran} vectors ran");
}
