//! The production-line commands: `site station …`, `site serve`, `station …`.

use crate::context::Context;
use crate::logsink::LogSink;
use crate::output::{after_release, io_fail, read_input_text, Failure, Outcome, Report};
use keyfab_crypto::x509;
use keyfab_node::Code;
use keyfab_node::NodeKind;
use keyfab_site::server::admin::{self, AdminAnswer, AdminRequest};
use serde_json::json;
use std::path::Path;

use keyfab_node::rfc3339;

/// Writes a new file with `mode`, refusing to overwrite.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// `site station enroll` (`renew` false) or `site station renew` (`renew` true): the
/// station's new key, certificate and line CA into `out`, a new or empty directory.
pub(crate) fn station_issue(
    ctx: &Context,
    home: &Path,
    (name, out, days): (&str, &Path, i64),
    renew: bool,
) -> Result<Report, Failure> {
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        return Err(Failure::new(
            Code::InvalidState,
            format!("{} exists and is not empty", out.display()),
        ));
    }
    let mut node = ctx.open(home, NodeKind::Site)?;
    let issued = if renew {
        keyfab_site::stations::renew(&node, name, days)?
    } else {
        keyfab_site::stations::line_ca(&mut node)?;
        keyfab_site::stations::enroll(&node, name, days)?
    };
    std::fs::create_dir_all(out).map_err(|err| io_fail(out, err))?;
    let key_pem = zeroize::Zeroizing::new(x509::to_pem(issued.key.expose(), "PRIVATE KEY"));
    let written = [
        (keyfab_station::KEY_FILE, key_pem.to_string(), 0o600),
        (
            keyfab_station::CERT_FILE,
            x509::to_pem(&issued.certificate, "CERTIFICATE"),
            0o644,
        ),
        (
            keyfab_station::LINE_CA_FILE,
            x509::to_pem(&issued.line_ca, "CERTIFICATE"),
            0o644,
        ),
    ];
    for (file, text, mode) in written {
        let text = zeroize::Zeroizing::new(text);
        let path = out.join(file);
        write_new(&path, text.as_bytes(), mode).map_err(|err| io_fail(&path, err))?;
    }
    let r = &issued.record;
    Report::of(&StationEnrolled {
        station: r.name.clone(),
        serial: r.serial.clone(),
        not_after: rfc3339(r.not_after),
        dir: out.to_owned(),
        previous_serial: r.previous_serial.clone(),
    })
}

/// `site station enroll`: a station's key, certificate and line CA, written.
#[derive(serde::Serialize)]
struct StationEnrolled {
    station: String,
    serial: String,
    not_after: String,
    dir: std::path::PathBuf,
    /// After a renewal: the certificate that still works until its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_serial: Option<String>,
}

impl Outcome for StationEnrolled {
    fn text(&self) -> String {
        let renewed = self
            .previous_serial
            .as_ref()
            .map(|p| format!("; certificate {p} keeps working until its end: install the new files on the station"))
            .unwrap_or_default();
        format!(
            "station {} {} (certificate serial {}, valid until {}{renewed})\n  {}: key (keep it on the station only), certificate, line CA",
            self.station,
            if self.previous_serial.is_some() { "renewed" } else { "enrolled" },
            self.serial,
            self.not_after,
            self.dir.display()
        )
    }
}

pub(crate) fn station_revoke(ctx: &Context, home: &Path, name: &str) -> Result<Report, Failure> {
    let r = keyfab_site::stations::revoke(&ctx.open(home, NodeKind::Site)?, name)?;
    Report::of(&StationRevoked {
        station: r.name,
        serial: r.serial,
        revoked_at: r.revoked_at.map(rfc3339),
    })
}

/// `site station revoke`: a station refused from now on.
#[derive(serde::Serialize)]
struct StationRevoked {
    station: String,
    serial: String,
    revoked_at: Option<String>,
}

impl Outcome for StationRevoked {
    fn text(&self) -> String {
        format!(
            "station {} revoked (certificate serial {})",
            self.station, self.serial
        )
    }
}

pub(crate) fn station_list(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let list = keyfab_site::stations::list(&ctx.open(home, NodeKind::Site)?)?;
    Report::of(&StationList {
        stations: list
            .into_iter()
            .map(|r| StationRow {
                name: r.name,
                serial: r.serial,
                enrolled_at: rfc3339(r.enrolled_at),
                not_after: rfc3339(r.not_after),
                revoked_at: r.revoked_at.map(rfc3339),
            })
            .collect(),
    })
}

/// `site station list`: every station enrolled, revoked ones too.
#[derive(serde::Serialize)]
struct StationList {
    stations: Vec<StationRow>,
}

#[derive(serde::Serialize)]
struct StationRow {
    name: String,
    serial: String,
    enrolled_at: String,
    not_after: String,
    revoked_at: Option<String>,
}

impl Outcome for StationList {
    fn text(&self) -> String {
        if self.stations.is_empty() {
            return "no stations enrolled yet (keyfab site station enroll)\n".into();
        }
        self.stations
            .iter()
            .map(|r| {
                format!(
                    "{:<20} {:<10} serial {}  until {}\n",
                    r.name,
                    if r.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "enrolled"
                    },
                    r.serial,
                    r.not_after
                )
            })
            .collect()
    }
}

pub(crate) fn serve(
    ctx: &Context,
    a: &crate::cli::ServeArgs,
    json_out: bool,
) -> Result<Report, Failure> {
    install_logs(a)?;
    let home = &a.home.home;
    let mut listen = a.listen;
    let node = match ctx.unsealer(home)? {
        // Sealed by shares and not enough given: wait for them on HOME/serve.sock.
        Some(unsealer) if !unsealer.progress().unsealed => {
            // Stations get `locked` meanwhile if an earlier run left its serving identity.
            let locked_on = keyfab_site::server::sealed::load_serving_identity(home)?
                .map(|identity| (listen, identity));
            let (secret, bound) = keyfab_site::server::admin::wait_for_shares(
                home,
                unsealer,
                locked_on,
                |p, addr| {
                    use std::io::Write;
                    let line = if json_out {
                        json!({"sealed": true, "shares": p.accepted, "threshold": p.threshold, "answering_locked_on": addr.map(|a| a.to_string())}).to_string()
                    } else {
                        format!(
                            "sealed: {} of {} unseal shares given; waiting for `keyfab site unseal --home {}`{}",
                            p.accepted,
                            p.threshold,
                            home.display(),
                            addr.map(|a| format!("; stations on {a} are answered locked"))
                                .unwrap_or_default()
                        )
                    };
                    let _ = writeln!(LogSink::default(), "{line}");
                    crate::sd_notify::notify(&format!(
                        "STATUS=sealed: {} of {} unseal shares given",
                        p.accepted, p.threshold
                    ));
                },
            )?;
            // Serve where stations were answered `locked` (the same port, even for port 0).
            if let Some(addr) = bound {
                listen = addr;
            }
            ctx.open_to_serve(home, &secret)?
        }
        _ => {
            let (node, answered_on) = open_when_the_store_answers(ctx, home, listen, json_out)?;
            // Serve where stations were answered `unavailable` (the same port, even for
            // port 0).
            if let Some(addr) = answered_on {
                listen = addr;
            }
            node
        }
    };
    // A site that stopped itself, or whose audit chain no longer verifies, does not
    // start serving (the latter latches it).
    keyfab_site::latch::check_on_start(&node)?;
    // A copy of the home taken before this start is behind the TPM from now on.
    keyfab_site::rollback_counter::advance(&node)?;
    // The names stations use, and always `localhost` and the listen address (unless it
    // is every address): a name given for the factory network does not lock out a
    // station on the site's own machine.
    let mut names = a.hostnames.clone();
    let mut local = vec!["localhost".to_owned()];
    if !listen.ip().is_unspecified() {
        local.push(listen.ip().to_string());
    }
    for name in local {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut config = keyfab_site::server::ServeConfig::new(listen, names.clone());
    config.metrics_listen = a.metrics_listen;
    config.build = keyfab_site::server::metrics::BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        commit: env!("KEYFAB_COMMIT").to_owned(),
    };
    config.max_connections = a.max_connections.max(1);
    config.handshake_timeout = std::time::Duration::from_secs(a.handshake_timeout.max(1));
    config.header_timeout = std::time::Duration::from_secs(a.header_timeout.max(1));
    config.request_timeout = std::time::Duration::from_secs(a.request_timeout.max(1));
    config.rollback_counter_every = std::time::Duration::from_secs(a.rollback_counter_every.max(1));
    config.per_station = keyfab_site::server::fairness::Bounds {
        connections: a.per_station_connections.max(1),
        requests: a.per_station_requests.max(1),
    };
    let site = node.name.clone();
    let summary = keyfab_site::server::serve(node, config, move |addr| {
        // A log line on stderr as soon as connections are accepted (stdout keeps the one
        // report printed at the end).
        use std::io::Write;
        let line = if json_out {
            json!({"listening": addr.to_string(), "site": site, "names": names}).to_string()
        } else {
            format!(
                "site {site} serving the station API on https://{addr} (names: {})",
                names.join(", ")
            )
        };
        let _ = writeln!(LogSink::default(), "{line}");
        crate::sd_notify::notify(&format!(
            "READY=1\nSTATUS=site {site} serving the station API on {addr}"
        ));
    });
    crate::sd_notify::notify("STOPPING=1");
    // The last requests' lines, then the report.
    crate::logsink::drain();
    let summary = summary?;
    Report::of(&ServeStopped {
        stopped: true,
        connections: summary.connections,
        refused_connections: summary.refused_connections,
    })
}

/// `site serve`, once stopped: what it served.
#[derive(serde::Serialize)]
struct ServeStopped {
    stopped: bool,
    connections: u64,
    refused_connections: u64,
}

impl Outcome for ServeStopped {
    fn text(&self) -> String {
        format!(
            "stopped: {} connections, {} refused before any request",
            self.connections, self.refused_connections
        )
    }
}

/// Structured logs on stderr: one line per request, handshake refusals, errors with their
/// detail (the stations get only a code and a short message).
/// Longest wait between two tries of a state store that does not answer.
const STORE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens the site's home for `site serve`, waiting for its state store: a site started
/// while its etcd cluster has no quorum — all of a plant's machines coming back after a
/// power cut, in any order — tries again 1, 2, 4 … up to 30 s apart, saying so on
/// stderr (and to systemd), until the store answers or a signal stops it. Meanwhile,
/// with the serving identity an earlier run kept, stations on `listen` are answered
/// `unavailable` (503): the address they were answered on is returned. Any other
/// failure ends the command as before.
fn open_when_the_store_answers(
    ctx: &Context,
    home: &Path,
    listen: std::net::SocketAddr,
    json_out: bool,
) -> Result<(keyfab_node::Node, Option<std::net::SocketAddr>), Failure> {
    let mut wait = std::time::Duration::from_secs(1);
    let secret = ctx.unlock_secret(home)?;
    let mut answering: Option<keyfab_site::server::sealed::AnsweringMeanwhile> = None;
    loop {
        match ctx.open_to_serve(home, &secret) {
            Err(f) if f.code == Code::Unavailable => {
                if answering.is_none() {
                    answering = keyfab_site::server::sealed::answer_unavailable_meanwhile(
                        home,
                        listen,
                        format!("the site's state store does not answer yet: {}", f.message),
                    )?;
                }
                use std::io::Write;
                let on = answering.as_ref().map(|a| a.addr);
                let line = if json_out {
                    json!({"waiting_for_store": f.message, "retry_in_s": wait.as_secs(), "answering_unavailable_on": on.map(|a| a.to_string())})
                        .to_string()
                } else {
                    format!(
                        "the site's state store does not answer ({}); trying again in {} s{}",
                        f.message,
                        wait.as_secs(),
                        on.map(|a| format!("; stations on {a} are answered unavailable"))
                            .unwrap_or_default()
                    )
                };
                let _ = writeln!(LogSink::default(), "{line}");
                crate::sd_notify::notify("STATUS=waiting for the state store (etcd quorum)");
                std::thread::sleep(wait);
                wait = (wait * 2).min(STORE_RETRY_MAX);
            }
            other => {
                // The port is let go before `site serve` binds it.
                let on = answering.as_ref().map(|a| a.addr);
                drop(answering);
                return other.map(|node| (node, on));
            }
        }
    }
}

/// Logs on stderr: `--log-filter`, else `RUST_LOG`, else keyfab's targets at
/// `--log-level` and every other at info at most — the TLS, HTTP and gRPC libraries'
/// debug output (most of it frame traces) is asked for by name, never by default.
fn install_logs(a: &crate::cli::ServeArgs) -> Result<(), Failure> {
    use crate::cli::{LogFormat, LogLevel};
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    let spec = match &a.log_filter {
        Some(spec) => Some(spec.clone()),
        None => std::env::var("RUST_LOG")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                crate::cli::log_filter(&v).map_err(|e| Failure::usage(format!("RUST_LOG: {e}")))
            })
            .transpose()?,
    };
    let targets = match spec {
        Some(spec) => spec
            .parse::<Targets>()
            .map_err(|e| Failure::usage(format!("--log-filter: {e}")))?,
        None => {
            let own = match a.log_level {
                LogLevel::Warn => LevelFilter::WARN,
                LogLevel::Info => LevelFilter::INFO,
                LogLevel::Debug => LevelFilter::DEBUG,
            };
            Targets::new()
                .with_default(own.min(LevelFilter::INFO))
                .with_target("keyfab", own)
        }
    };
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(LogSink::default)
        .with_target(true);
    let registry = tracing_subscriber::registry().with(targets);
    let installed = if a.log_format == LogFormat::Json {
        tracing::subscriber::set_global_default(registry.with(logs.json().flatten_event(true)))
    } else {
        tracing::subscriber::set_global_default(registry.with(logs.with_ansi(false)))
    };
    drop(installed);
    Ok(())
}

/// `keyfab site unseal`: one share to the sealed `site serve` in `home`.
pub(crate) fn unseal(
    ctx: &crate::context::Context,
    home: &Path,
    (share_file, holder_key): (Option<&Path>, Option<&Path>),
    status: bool,
) -> Result<Report, Failure> {
    use keyfab_site::server::admin::{self, AdminAnswer, AdminRequest, ShareText};
    let req = if status {
        AdminRequest::UnsealStatus
    } else {
        let text = match share_file {
            Some(p) => share_from_file(ctx, p, holder_key)?,
            None => {
                use std::io::{BufRead, IsTerminal, Write};
                if std::io::stdin().is_terminal() {
                    eprint!("unseal share: ");
                    let _ = std::io::stderr().flush();
                }
                use std::io::Read;
                let mut line = String::new();
                let cap = keyfab_formats::MAX_SMALL_INPUT;
                std::io::stdin()
                    .lock()
                    .take(cap as u64 + 1)
                    .read_line(&mut line)
                    .map_err(|e| Failure::new(Code::Io, format!("standard input: {e}")))?;
                if line.len() > cap {
                    return Err(Failure::from(keyfab_node::Error::from(
                        keyfab_formats::FormatError::malformed(
                            keyfab_formats::Malformed::TooLarge,
                            format!("standard input: a share line longer than {cap} bytes"),
                        ),
                    )));
                }
                zeroize::Zeroizing::new(line)
            }
        };
        AdminRequest::Unseal {
            share: ShareText(text.trim().to_owned()),
        }
    };
    let answer = admin::request(home, req).ok_or_else(|| {
        Failure::new(
            Code::InvalidState,
            format!(
                "no sealed `site serve` is running in {}; one-shot commands take --unseal-share-file",
                home.display()
            ),
        )
    })??;
    let AdminAnswer::Unseal(p) = answer else {
        return Err(Failure::new(
            Code::Internal,
            "site serve answered something else",
        ));
    };
    Report::of(&UnsealProgress {
        unsealed: p.unsealed,
        shares: p.accepted,
        threshold: p.threshold,
    })
}

/// `site unseal`: how far unsealing a running `site serve` is.
#[derive(serde::Serialize)]
struct UnsealProgress {
    unsealed: bool,
    shares: u8,
    threshold: u8,
}

impl Outcome for UnsealProgress {
    fn text(&self) -> String {
        if self.unsealed {
            format!(
                "unsealed: {} of {} shares; the site now serves stations",
                self.shares, self.threshold
            )
        } else {
            format!(
                "still sealed: {} of {} shares given",
                self.shares, self.threshold
            )
        }
    }
}

/// A refusal the site sent back, with its code (and so its exit code). A code this
/// keyfab does not know (a newer site's) is kept in the message.
fn refusal(code: &str, message: &str) -> Failure {
    match Code::parse(code) {
        Some(known) => Failure::new(known, message),
        None => Failure::new(
            Code::Internal,
            format!("the site refused with a code this keyfab does not know ({code}): {message}"),
        ),
    }
}

/// The client of `a`'s site, as `a`'s station, with `a`'s retry budget.
fn station_client(
    ctx: &Context,
    a: &crate::cli::StationArgs,
) -> Result<keyfab_station::Client, Failure> {
    let station = keyfab_station::StationDir::load(&a.station_dir).map_err(station_failure)?;
    let clock = std::sync::Arc::from(ctx.clock()?);
    Ok(keyfab_station::Client::with_clock(&station, &a.url, clock)
        .map_err(station_failure)?
        .with_attempts(a.attempts))
}

fn station_failure(e: keyfab_station::StationError) -> Failure {
    match e {
        keyfab_station::StationError::Refused { code, message, .. } => refusal(&code, &message),
        keyfab_station::StationError::Unreachable(m) => Failure::new(Code::Unreachable, m),
        keyfab_station::StationError::Untrusted(m) => Failure::new(Code::UntrustedSigner, m),
        keyfab_station::StationError::BadUrl(m) => Failure::usage(format!("--url: {m}")),
        other => Failure::new(Code::InvalidInput, other.to_string()),
    }
}

/// What `station provision` asks for one device.
pub(crate) struct StationAsk<'a> {
    pub(crate) entitlement: &'a str,
    pub(crate) device_id: &'a str,
    pub(crate) request_id: Option<&'a str>,
    pub(crate) csr: Option<&'a Path>,
    pub(crate) chip: &'a crate::cli::ChipArgs,
}

pub(crate) fn station_provision(
    ctx: &Context,
    a: &crate::cli::StationArgs,
    ask: StationAsk<'_>,
    out: Option<&Path>,
) -> Result<Report, Failure> {
    use base64::Engine;
    let StationAsk {
        entitlement,
        device_id,
        request_id,
        csr: csr_path,
        chip,
    } = ask;
    // An output that cannot be written is refused before any key is released.
    if let Some(out) = out {
        keyfab_node::out_file::check_new(out, "nothing was asked of the site")?;
    }
    let client = station_client(ctx, a)?;
    let csr = csr_path
        .map(|p| read_input_text(p, keyfab_formats::MAX_SMALL_INPUT))
        .transpose()?;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let transport_key = chip
        .transport_key
        .as_deref()
        .map(crate::output::read_transport_key)
        .transpose()?
        .map(|k| b64(k.sec1()));
    let chip_certificates = chip
        .chip_chain
        .as_deref()
        .map(crate::output::read_chip_chain)
        .transpose()?
        .map(|chain| chain.iter().map(|c| b64(c)).collect());
    let request_id = request_id.map_or_else(
        || {
            let mut b = [0u8; 16];
            ctx.rng().fill(&mut b);
            hex::encode(b)
        },
        str::to_owned,
    );
    let again = |out: Option<&Path>| {
        let file = |flag: &str, p: Option<&Path>| {
            p.map_or_else(String::new, |p| format!(" {flag} {}", p.display()))
        };
        format!(
            "keyfab station provision --url {} --station-dir {} --entitlement {entitlement} --device-id {device_id} --request-id {request_id}{}{}{}{}",
            a.url.join(","),
            a.station_dir.display(),
            file("--csr", csr_path),
            file("--transport-key", chip.transport_key.as_deref()),
            file("--chip-chain", chip.chip_chain.as_deref()),
            out.map_or_else(String::new, |_| " --out OTHER-FILE".into())
        )
    };
    let req = keyfab_station::ProvisionRequest {
        request_id: request_id.clone(),
        entitlement: entitlement.to_owned(),
        device_id: device_id.to_owned(),
        csr,
        transport_key,
        chip_certificates,
    };
    let bundle = client.provision(&req).map_err(|e| {
        // Unanswered (the site may have released the keys): the request id gets them.
        let answered = matches!(&e, keyfab_station::StationError::Refused { code, .. }
            if code != Code::Unavailable.as_str());
        let f = station_failure(e);
        if answered {
            f
        } else {
            after_release(f, &request_id, &again(out))
        }
    })?;
    if let Some(out) = out {
        keyfab_node::out_file::write_new(out, format!("{bundle:#}\n").as_bytes())
            .map_err(|e| after_release(io_fail(out, e), &request_id, &again(Some(out))))?;
    }
    let text = format!(
        "device {} provisioned under {} (audit record {}{})\n{}",
        device_id,
        entitlement,
        bundle["audit_sequence"],
        if bundle["replayed"] == true {
            ", a retry of an earlier request"
        } else {
            ""
        },
        match out {
            Some(out) => format!("key material written to {} (mode 0600)", out.display()),
            None => "key material not shown: use --out FILE or --json".into(),
        }
    );
    Ok(Report::new(text, bundle))
}

pub(crate) fn station_confirm(
    ctx: &Context,
    a: &crate::cli::StationArgs,
    entitlement: &str,
    device_id: &str,
    result: crate::cli::Programming,
) -> Result<Report, Failure> {
    let result = result.as_str();
    let client = station_client(ctx, a)?;
    let answer = client
        .confirm(entitlement, device_id, result)
        .map_err(station_failure)?;
    Ok(Report::new(
        format!(
            "device {device_id} confirmed {result} (audit record {}{})",
            answer["audit_sequence"],
            if answer["repeated"] == true {
                ", as before"
            } else {
                ""
            }
        ),
        answer,
    ))
}

pub(crate) struct LineArgs<'a> {
    pub station: &'a crate::cli::StationArgs,
    pub device_log: Option<&'a Path>,
    pub root_cert: &'a Path,
    pub entitlement: &'a str,
    pub devices: u64,
    pub concurrency: usize,
    pub prefix: &'a str,
    pub first: u64,
    pub chip_vendor: Option<&'a Path>,
}

pub(crate) fn station_run(ctx: &Context, a: &LineArgs<'_>) -> Result<Report, Failure> {
    let mut client = station_client(ctx, a.station)?;
    if let Some(dir) = a.chip_vendor {
        let vendor = keyfab_station::chip_vendor::ChipVendor::open(dir).map_err(station_failure)?;
        client = client.with_chip_vendor(vendor);
    }
    let root_text = read_input_text(a.root_cert, keyfab_formats::MAX_SMALL_INPUT)?;
    let root = x509::from_pem(&root_text, "CERTIFICATE")
        .map_err(|e| Failure::new(Code::InvalidInput, format!("--root-cert: {e}")))?;
    let log = a.device_log.map(DeviceLog::open).transpose()?;
    let devices: Vec<String> = (a.first..a.first.saturating_add(a.devices))
        .map(|i| format!("{}{i:08}", a.prefix))
        .collect();
    let progress = crate::output::Progress::new("programming", "devices", !ctx.json);
    let total = a.devices;
    let report = keyfab_station::run_line(
        &client,
        a.entitlement,
        devices,
        a.concurrency,
        &root,
        &|line, n| {
            if let Some(log) = &log {
                log.write(line);
            }
            if let Some(p) = progress.reporter() {
                p(n, total);
            }
        },
    );
    let summary = LineSummary::of(&report, client.retries());
    // The line ran whatever the device log did: a log that failed is an error that
    // still carries what the line did.
    if let Some(Err(failed)) = log.map(DeviceLog::close) {
        return Err(failed.with_summary(Report::of(&summary)?));
    }
    let not_done: std::collections::BTreeMap<String, u64> = summary
        .refused
        .iter()
        .map(|(c, n)| (c.clone(), *n))
        .chain(
            (summary.unreachable > 0)
                .then(|| (Code::Unreachable.as_str().to_owned(), summary.unreachable)),
        )
        .collect();
    partial_result(&summary, a.devices, &not_done)
}

/// The exit rule of commands that do many devices (`station run`, `site provision
/// --device-ids`): done when every device is (now or in an earlier run); otherwise the
/// summary still goes out, with the code most of the devices not done got — a refusal's
/// (exit 3), or `unreachable` — so scripts see both what happened and that it is not
/// finished.
pub(crate) fn partial_result(
    summary: &impl Outcome,
    devices: u64,
    not_done: &std::collections::BTreeMap<String, u64>,
) -> Result<Report, Failure> {
    let report = Report::of(summary)?;
    let left: u64 = not_done.values().sum();
    let Some((code, _)) = not_done.iter().max_by_key(|(_, n)| **n) else {
        return Ok(report);
    };
    let code = Code::parse(code).unwrap_or(Code::Internal);
    let counts: Vec<String> = not_done.iter().map(|(c, n)| format!("{c} {n}")).collect();
    Err(Failure::new(
        code,
        format!(
            "{left} of {devices} devices not done ({}); run the same command again to resume once that passes",
            counts.join(", ")
        ),
    )
    .with_summary(report))
}

/// `station run --device-log`: one JSON line per device, appended as each is done.
struct DeviceLog {
    path: std::path::PathBuf,
    file: std::sync::Mutex<(std::fs::File, Option<std::io::Error>)>,
}

impl DeviceLog {
    fn open(path: &Path) -> Result<Self, Failure> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_fail(path, e))?;
        Ok(Self {
            path: path.to_owned(),
            file: std::sync::Mutex::new((file, None)),
        })
    }

    /// Appends `line`; the first error is kept for [`DeviceLog::close`] (the line goes
    /// on: the site's audit log holds every decision whatever this file says).
    fn write(&self, line: &keyfab_station::DeviceLine) {
        use std::io::Write;
        let mut text = serde_json::to_string(line).unwrap_or_default();
        text.push('\n');
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (file, error) = &mut *guard;
        if error.is_none() {
            if let Err(e) = file.write_all(text.as_bytes()) {
                *error = Some(e);
            }
        }
    }

    fn close(self) -> Result<(), Failure> {
        let (file, error) = self.file.into_inner().unwrap_or_else(|p| p.into_inner());
        match error {
            Some(e) => Err(io_fail(&self.path, e)),
            None => file.sync_all().map_err(|e| io_fail(&self.path, e)),
        }
    }
}

/// `station run`: what the line did.
#[derive(serde::Serialize)]
struct LineSummary {
    programmed: u64,
    already_programmed: u64,
    failed: u64,
    already_failed: u64,
    failures: std::collections::BTreeMap<String, u64>,
    refused: std::collections::BTreeMap<String, u64>,
    unreachable: u64,
    unreachable_reasons: std::collections::BTreeMap<String, u64>,
    retried: keyfab_station::Retries,
    seconds: f64,
    devices_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl LineSummary {
    fn of(report: &keyfab_station::LineReport, retried: keyfab_station::Retries) -> Self {
        let mut lat = report.latencies.clone();
        lat.sort();
        let pct = |q: f64| {
            lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        let seconds = report.elapsed.as_secs_f64().max(1e-9);
        Self {
            programmed: report.programmed,
            already_programmed: report.already_programmed,
            failed: report.failed,
            already_failed: report.already_failed,
            failures: report.failures.clone(),
            refused: report.refused.clone(),
            unreachable: report.unreachable,
            unreachable_reasons: report.unreachable_reasons.clone(),
            retried,
            seconds,
            devices_per_s: report.programmed as f64 / seconds,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
        }
    }
}

impl Outcome for LineSummary {
    fn text(&self) -> String {
        let refused: Vec<String> = self
            .refused
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        let mut text = format!(
            "{} devices programmed, {} failed (keys burned), {} refused{}, {} unreachable",
            self.programmed,
            self.failed,
            self.refused.values().sum::<u64>(),
            if refused.is_empty() {
                String::new()
            } else {
                format!(" ({})", refused.join(", "))
            },
            self.unreachable,
        );
        if self.already_programmed + self.already_failed > 0 {
            text.push_str(&format!(
                "; done by an earlier run: {} programmed, {} failed",
                self.already_programmed, self.already_failed
            ));
        }
        text.push_str(&format!(
            "\n{:.0} devices/s over {:.2} s, p50 {:.1} ms, p99 {:.1} ms",
            self.devices_per_s, self.seconds, self.p50_ms, self.p99_ms
        ));
        for (why, n) in &self.failures {
            text.push_str(&format!("\n  failed {n}: {why}"));
        }
        for (why, n) in &self.unreachable_reasons {
            text.push_str(&format!("\n  unreachable {n}: {why}"));
        }
        if self.retried.busy > 0 {
            text.push_str(&format!(
                "\n  {} requests answered busy and sent again: more in flight than the site allows one station (lower --concurrency, or raise the site's --per-station-requests)",
                self.retried.busy
            ));
        }
        if self.retried.dropped > 0 {
            text.push_str(&format!(
                "\n  {} requests sent again after their connection failed or closed (the site's --per-station-connections, a node down, or the network)",
                self.retried.dropped
            ));
        }
        text
    }
}

/// `keyfab site serve` in a child process, for `demo` and `bench serve`: started on a
/// free loopback port, its logs drained; stopped with SIGTERM (killed if dropped).
pub(crate) struct ServeChild {
    child: std::process::Child,
    pub url: String,
}

impl ServeChild {
    pub(crate) fn start(ctx: &Context, home: &Path, extra: &[&str]) -> Result<Self, Failure> {
        use std::io::Read;
        let fail =
            |e: &dyn std::fmt::Display| Failure::new(Code::Internal, format!("site serve: {e}"));
        let exe = std::env::current_exe().map_err(|e| fail(&e))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args([
            "--json",
            "site",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--home",
        ])
        .arg(home)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        if let Some(p) = &ctx.passphrase_file {
            cmd.arg("--passphrase-file").arg(p);
        }
        let mut child = ServeChild {
            child: cmd.spawn().map_err(|e| fail(&e))?,
            url: String::new(),
        };
        let mut stderr = child
            .child
            .stderr
            .take()
            .ok_or_else(|| fail(&"no stderr"))?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stderr.read(&mut byte).map_err(|e| fail(&e))? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        // The rest of its stderr is its logs: read and dropped, so the pipe never fills.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        let listening: serde_json::Value =
            serde_json::from_slice(&line).map_err(|_| fail(&String::from_utf8_lossy(&line)))?;
        let addr = listening["listening"]
            .as_str()
            .ok_or_else(|| fail(&String::from_utf8_lossy(&line)))?;
        child.url = format!("https://{addr}");
        Ok(child)
    }

    /// The child's process id (the serve benchmark reads its CPU time).
    #[cfg(feature = "bench")]
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then its one report (stdout).
    pub(crate) fn stop(mut self) -> Result<serde_json::Value, Failure> {
        use std::io::Read;
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        let status = self
            .child
            .wait()
            .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
        if !status.success() {
            return Err(Failure::new(
                Code::Internal,
                format!("site serve ended with {status}: {out}"),
            ));
        }
        serde_json::from_str(out.trim()).map_err(|e| Failure::new(Code::Internal, e.to_string()))
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `site status`: from the serving site through its socket, or from the home.
pub(crate) fn site_status(ctx: &Context, home: &Path) -> Result<Report, Failure> {
    let status = match admin::request(home, AdminRequest::Status) {
        Some(Ok(AdminAnswer::Status(status))) => *status,
        Some(Ok(_)) => {
            return Err(Failure::new(
                Code::Internal,
                "site serve answered something else",
            ))
        }
        // A serving site still waiting for its unseal shares.
        Some(Err(e)) if e.code() == Code::Locked => {
            return Ok(Report::new(
                format!(
                    "site in {}: sealed, serving nothing: {e}\n  each holder: keyfab site unseal --home {}",
                    home.display(),
                    home.display()
                ),
                json!({"sealed": true, "message": e.to_string()}),
            ))
        }
        Some(Err(e)) => return Err(e.into()),
        None => keyfab_site::status::site_status(&ctx.open(home, NodeKind::Site)?)?,
    };
    let json =
        serde_json::to_value(&status).map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    Ok(Report::new(status_text(&status), json))
}

/// The status screen.
fn status_text(s: &keyfab_site::status::SiteStatus) -> String {
    let mut out = format!(
        "site {}: {}\n",
        s.site,
        match (&s.stopped, &s.serving) {
            (Some(_), _) => "STOPPED (releases no key)",
            (None, Some(_)) => "unsealed, serving",
            (None, None) => "unsealed, not serving",
        }
    );
    out.push_str(&format!(
        "  clock {}, trusted time {}\n",
        rfc3339(s.clock),
        s.trusted_time
            .map_or_else(|| "none yet".to_owned(), rfc3339)
    ));
    if s.warnings.is_empty() {
        out.push_str("  nothing will stop the line soon\n");
    } else {
        out.push_str("warnings:\n");
        for w in &s.warnings {
            out.push_str(&format!("  ! {w}\n"));
        }
    }
    out.push_str("entitlements:\n");
    if s.entitlements.is_empty() {
        out.push_str("  none imported\n");
    }
    for e in &s.entitlements {
        let today = match e.daily_limit {
            Some(limit) => format!("{}/{limit} today", e.today),
            None => format!("{} today", e.today),
        };
        let audit = e
            .audit_due_at
            .map(|d| format!(", audit due {}", rfc3339(d)))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {} {} ({}): {today}, {}/{} in all, window ends {}{audit}, chips {}\n",
            e.id,
            e.state,
            e.product,
            e.provisioned,
            e.quota,
            rfc3339(e.valid_until),
            e.attestation
        ));
    }
    let acknowledged = s
        .audit
        .acknowledged
        .map(|(size, at)| format!("HQ acknowledged {size} at {}", rfc3339(at)))
        .unwrap_or_else(|| "HQ acknowledged none yet".to_owned());
    let exported = s
        .audit
        .last_export
        .map(|(size, at)| format!("last export up to {size} at {}", rfc3339(at)))
        .unwrap_or_else(|| "no export yet".to_owned());
    out.push_str(&format!(
        "audit: {} records, {} not exported; {exported}; {acknowledged}\n",
        s.audit.records, s.audit.unexported
    ));
    out.push_str("stations:\n");
    if s.stations.is_empty() {
        out.push_str("  none enrolled\n");
    }
    for st in &s.stations {
        let state = match st.revoked_at {
            Some(at) => format!("revoked {}", rfc3339(at)),
            None => format!("certificate until {}", rfc3339(st.not_after)),
        };
        let live = s
            .serving
            .as_ref()
            .and_then(|serving| serving.stations.iter().find(|a| a.name == st.name))
            .map(|a| {
                format!(
                    "; {} connections, last seen {}, {} devices ({:.1}/s over the last minute)",
                    a.connections,
                    a.last_seen.map_or_else(|| "never".to_owned(), rfc3339),
                    a.provisioned,
                    a.devices_per_second
                )
            })
            .unwrap_or_default();
        out.push_str(&format!("  {}: {state}{live}\n", st.name));
    }
    if let Some(serving) = &s.serving {
        out.push_str(&format!("serving since {}\n", rfc3339(serving.since)));
    }
    out.trim_end().to_owned()
}

/// The share in `path`: sealed to a holder (opened with `holder_key`), or in clear.
fn share_from_file(
    ctx: &crate::context::Context,
    path: &Path,
    holder_key: Option<&Path>,
) -> Result<zeroize::Zeroizing<String>, Failure> {
    let bytes = zeroize::Zeroizing::new(crate::output::read_input(
        path,
        keyfab_formats::MAX_SMALL_INPUT,
    )?);
    let sealed =
        keyfab_formats::prefix::kind_of(&bytes) == Some(keyfab_formats::prefix::Kind::SealedShare);
    match (sealed, holder_key) {
        (true, Some(key)) => crate::run::open_sealed_share(ctx, key, &bytes),
        (true, None) => Err(Failure::usage(format!(
            "{} is a share sealed to its holder: add --holder-key with the holder's key",
            path.display()
        ))),
        (false, Some(_)) => Err(Failure::usage(format!(
            "{} is not a sealed share (.kfs): --holder-key is for sealed shares",
            path.display()
        ))),
        (false, None) => Ok(zeroize::Zeroizing::new(
            String::from_utf8_lossy(&bytes).into_owned(),
        )),
    }
}
