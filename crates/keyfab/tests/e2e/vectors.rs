//! Runs every committed test vector in `tests/vectors/` (made by
//! `scripts/make-vectors.sh`) against copies of the committed HQ and site homes, at the
//! time the vectors were made, and checks each file's expected exit code and error code
//! through the binary. The kind of each malformed vector is checked against the
//! library's typed error by keyfab-testkit's `vectors` test.

use crate::common::*;
use std::path::{Path, PathBuf};

const VECTOR_TIME: &str = "2026-11-25T00:00:00Z";
const VECTOR_PASSPHRASE: &str = "keyfab test vectors";

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors")
}

#[test]
fn every_vector_gives_its_expected_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (hq, site) = (dir.path().join("hq"), dir.path().join("site"));
    copy_home(&vectors().join("hq"), &hq);
    copy_home(&vectors().join("site"), &site);
    // The site right after its export, where HQ's receipt and revocation apply.
    let exported = dir.path().join("site-exported");
    copy_home(&vectors().join("site-exported"), &exported);
    let expected = std::fs::read_to_string(vectors().join("expected.txt")).unwrap();
    let mut ran = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [file, command, code, _kind] = f[..] else {
            panic!("bad line: {line}")
        };
        let path = s(&vectors().join(file));
        let args: Vec<&str> = match command {
            "import" => vec![
                "site",
                "entitlement",
                "import",
                "--home",
                site.to_str().unwrap(),
                &path,
            ],
            "site-add" => vec!["hq", "site", "add", "--home", hq.to_str().unwrap(), &path],
            "hq-audit" => vec![
                "hq",
                "audit",
                "import",
                "--home",
                hq.to_str().unwrap(),
                &path,
            ],
            "receipt" => vec![
                "site",
                "receipt",
                "import",
                "--home",
                exported.to_str().unwrap(),
                &path,
            ],
            "revoke" => vec![
                "site",
                "entitlement",
                "import",
                "--home",
                exported.to_str().unwrap(),
                &path,
            ],
            other => panic!("unknown command {other}"),
        };
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"))
            .arg("--json")
            .args(&args)
            .env("KEYFAB_PASSPHRASE", VECTOR_PASSPHRASE)
            .env("KEYFAB_NOW", VECTOR_TIME)
            .output()
            .unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if code == "ok" {
            assert_eq!(out.status.code(), Some(0), "{file}: {j}");
        } else {
            assert_eq!(out.status.code(), Some(4), "{file}: {j}");
            assert_eq!(j["error"]["code"], code, "{file}: {j}");
        }
        ran += 1;
    }
    assert!(ran >= 36, "only {ran} vectors ran");
}
