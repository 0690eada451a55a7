//! What a plant's IT installs and runs: the version a binary names, shell completions and
//! manual pages made from the command line itself, and systemd's readiness protocol.

use crate::common::*;
use std::os::unix::net::UnixDatagram;
use std::process::Command;

#[test]
fn the_version_names_the_commit_it_was_built_from() {
    let out = Command::new(env!("CARGO_BIN_EXE_keyfab"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("keyfab {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    // Built from a checkout: that commit (the build reruns when HEAD moves).
    if let Some(head) = head {
        assert!(text.contains(&head), "{text} (HEAD {head})");
    }
}

#[test]
fn completions_and_manual_pages_come_from_the_command_line() {
    for shell in ["bash", "zsh", "fish"] {
        let o = ok(&["completions", shell]);
        let script = o["script"].as_str().unwrap();
        for word in ["provision", "chip-chain", "init-chip-vendor"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let bash = ok(&["completions", "bash"]);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bash["script"].as_str().unwrap()).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(file.path())
        .status()
        .unwrap();
    assert!(syntax.success());
    assert_eq!(keyfab(&["completions", "tcsh"], None).code, 2);

    let dir = tempfile::tempdir().unwrap();
    let out = ok(&["man", "--out", &s(dir.path())]);
    let pages: Vec<&str> = out["pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for page in ["keyfab.1", "keyfab-site-serve.1", "keyfab-site-provision.1"] {
        assert!(pages.contains(&page), "{pages:?}");
    }
    let serve = std::fs::read_to_string(dir.path().join("keyfab-site-serve.1")).unwrap();
    assert!(serve.starts_with(".ie") || serve.contains(".TH"), "{serve}");
    assert!(serve.contains("per\\-station\\-requests"), "{serve}");
}

/// Under systemd (`NOTIFY_SOCKET`), `site serve` says READY=1 once it accepts stations,
/// with its address as the unit's status, and STOPPING=1 when it has stopped.
#[test]
fn site_serve_tells_systemd_when_it_is_ready() {
    let w = world();
    let socket_dir = tempfile::tempdir().unwrap();
    let socket_path = socket_dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&socket_path).unwrap();
    systemd
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let server = Server::start_env(&w.site, &[("NOTIFY_SOCKET", &s(&socket_path))]);
    let mut buf = [0u8; 512];
    let n = systemd.recv(&mut buf).unwrap();
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(ready.contains(&server.addr), "{ready} {}", server.addr);
    let (code, _) = server.stop();
    assert_eq!(code, 0);
    let n = systemd.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}
