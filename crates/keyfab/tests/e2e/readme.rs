//! README.md's journey, run as written: every `sh` block of its "The journey, command by
//! command" section, in order, in an empty directory, with this build's `keyfab` on the
//! `PATH`. The README cannot drift from what keyfab does without this failing.

use std::path::Path;
use std::process::Command;

/// The `sh` blocks of the README section that starts with `heading`, in order.
fn shell_blocks(readme: &str, heading: &str) -> Vec<String> {
    let start = readme.find(heading).expect("the section is in README.md");
    let rest = &readme[start + heading.len()..];
    let section = rest.find("\n## ").map_or(rest, |end| &rest[..end]);
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if line.trim_end() == "```sh" {
            let block: Vec<&str> = lines
                .by_ref()
                .take_while(|l| l.trim_end() != "```")
                .collect();
            blocks.push(block.join("\n"));
        }
    }
    blocks
}

#[test]
fn the_journey_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let blocks = shell_blocks(&readme, "## The journey, command by command");
    assert!(blocks.len() >= 4, "{blocks:?}");
    let script = format!("set -euo pipefail\n{}\n", blocks.join("\n"));
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_keyfab")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-x", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("KEYFAB_HOME")
        .env_remove("KEYFAB_NOW")
        .env_remove("KEYFAB_PASSPHRASE")
        .env_remove("KEYFAB_UNSEAL_SHARES")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the README's journey failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // What the journey claims, checked: every device it provisioned is in HQ's manifest,
    // HQ found nothing wrong in the log, and the entitlement ends revoked.
    let manifest = std::fs::read_to_string(dir.path().join("devices.csv")).unwrap();
    let devices = manifest
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("TSV2-"))
        .count();
    assert_eq!(devices, 1 + 3 + 1 + 100, "{manifest}");
    // The line's chips proved themselves: their certificates are in the manifest.
    let mut reader = csv::Reader::from_reader(manifest.as_bytes());
    let chip = reader
        .headers()
        .unwrap()
        .iter()
        .position(|h| h == "chip_certificate_sha256")
        .unwrap();
    let attested = reader
        .records()
        .filter(|r| r.as_ref().unwrap()[chip].len() == 64)
        .count();
    assert_eq!(attested, 100, "{manifest}");
    let report = Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .args(["--json", "hq", "report", "--home", "hq", "--format", "json"])
        .current_dir(dir.path())
        .env("KEYFAB_PASSPHRASE", "use a real secret")
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["violations"], serde_json::json!([]), "{report}");
    assert_eq!(report["entitlements"][0]["state"], "revoked", "{report}");
    assert_eq!(report["entitlements"][0]["confirmed"], 101, "{report}");
}

/// Every stable code the binary can print is listed in README.md's code section.
#[test]
fn every_code_is_in_the_readme() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let start = readme.find("## Exit codes and error codes").unwrap();
    let rest = &readme[start + 1..];
    let section = rest.find("\n## ").map_or(rest, |end| &rest[..end]);
    let missing: Vec<&str> = keyfab_node::Code::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|c| !section.contains(&format!("`{c}`")))
        .collect();
    assert!(missing.is_empty(), "not in README.md: {missing:?}");
}
