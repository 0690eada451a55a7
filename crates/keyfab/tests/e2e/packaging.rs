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

/// A connection that is not TLS: `site serve` logs the refused handshake (target
/// `keyfab::tls`, info).
fn refused_handshake(server: &Server) {
    use std::io::Write;
    let mut raw = std::net::TcpStream::connect(&server.addr).unwrap();
    let _ = raw.write_all(b"GET / HTTP/1.1\r\n\r\n");
    let _ = std::io::Read::read(&mut raw, &mut [0u8; 64]);
}

/// Whether `server`'s logs get a line with `needle` within a few seconds.
fn logs_show(server: &Server, needle: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if server.logs().contains(needle) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// Logs are filtered per target: `--log-filter`, else `RUST_LOG`; a filter that does not
/// parse is a usage error before anything starts.
#[test]
fn site_serve_filters_its_logs_by_target() {
    let w = world();
    let site = s(&w.site);
    let shown = Server::start(&w.site);
    refused_handshake(&shown);
    assert!(logs_show(&shown, "handshake refused"), "{}", shown.logs());
    drop(shown);
    for (extra, env) in [
        (vec!["--log-filter", "keyfab::tls=off,info"], vec![]),
        (vec![], vec![("RUST_LOG", "keyfab::tls=warn,info")]),
    ] {
        let (child, stderr) = Server::spawn_env(&w.site, &extra, &env);
        let quiet = Server::attach(child, stderr);
        refused_handshake(&quiet);
        assert!(
            !logs_show(&quiet, "handshake refused"),
            "{extra:?} {env:?}: {}",
            quiet.logs()
        );
    }
    for (extra, env) in [
        (vec!["--log-filter", "keyfab=loud"], vec![]),
        (vec![], vec![("RUST_LOG", "keyfab=verbose")]),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyfab"));
        cmd.args([
            "--json",
            "site",
            "serve",
            "--home",
            &site,
            "--listen",
            "127.0.0.1:0",
        ])
        .args(&extra)
        .envs(env.iter().copied())
        .env("KEYFAB_PASSPHRASE", PASS);
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra:?} {env:?}");
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["error"]["code"], "usage", "{answer}");
    }
}

/// `--metrics-listen`: `/metrics` and health on plain HTTP, no client certificate.
#[test]
fn metrics_and_health_on_a_listener_without_client_certificates() {
    let w = world();
    let addr = format!("127.0.0.1:{}", free_port());
    let server = Server::start_with(&w.site, &["--metrics-listen", &addr]);
    let get = |path: &str| http_get(&addr, path);
    let metrics = get("/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("keyfab_build_info{"), "{metrics}");
    assert!(get("/healthz/live").contains("live"));
    let ready = get("/healthz/ready");
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.contains("ready"),
        "{ready}"
    );
    assert!(get("/v1/entitlements").starts_with("HTTP/1.1 404"));
    drop(server);
}

/// `site serve --config FILE`: the file's settings under the command line's flags;
/// `--check-config` shows what would be used; an unknown key or a bad value is refused,
/// named, before anything starts.
#[test]
fn site_serve_takes_a_config_file_under_its_flags() {
    let w = world();
    let config = w.path("serve.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nhostnames = [\"keyfab.line1.factory\"]\nper_station_requests = 7\nmax_connections = 50\nlog_format = \"json\"\nlog_filter = \"keyfab=debug,warn\"\n",
    )
    .unwrap();
    let site = s(&w.site);
    let conf = s(&config);
    let checked = ok(&[
        "site",
        "serve",
        "--home",
        &site,
        "--config",
        &conf,
        "--max-connections",
        "60",
        "--check-config",
    ]);
    let effective = &checked["effective"];
    assert_eq!(effective["per_station_requests"], 7, "{checked}");
    assert_eq!(effective["max_connections"], 60, "the flag wins: {checked}");
    assert_eq!(effective["log_format"], "json");
    assert_eq!(effective["hostnames"][0], "keyfab.line1.factory");
    for (text, key) in [
        ("listn = \"127.0.0.1:1\"\n", "listn"),
        ("listen = \"nowhere\"\n", "listen"),
        ("per_station_requests = 0\n", "per_station_requests"),
        ("log_level = \"loud\"\n", "log_level"),
        ("log_filter = \"keyfab=loud\"\n", "log_filter"),
    ] {
        std::fs::write(&config, text).unwrap();
        let o = keyfab(&["site", "serve", "--home", &site, "--config", &conf], None);
        o.assert_error(1, "invalid_input", key);
    }
    // Served with the file: its monitoring listener is up.
    let port = free_port();
    std::fs::write(&config, format!("metrics_listen = \"127.0.0.1:{port}\"\n")).unwrap();
    let server = Server::start_with(&w.site, &["--config", &conf]);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(server);
}
