//! `site serve --config FILE`: the serving settings a plant keeps in one file (TOML, the
//! flags' names), under the flags given on the command line; `--check-config` shows what
//! would be used. The file is read whole in bounded memory; an unknown key or a value a
//! flag would refuse is `invalid_input`, naming the key.

use crate::cli::{LogFormat, LogLevel, ServeArgs};
use crate::output::{Failure, Report};
use keyfab_node::Code;
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;

/// Largest configuration file.
const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// The file: every key optional, none unknown.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    listen: Option<String>,
    hostnames: Option<Vec<String>>,
    metrics_listen: Option<String>,
    log_format: Option<String>,
    log_level: Option<String>,
    log_filter: Option<String>,
    max_connections: Option<usize>,
    handshake_timeout: Option<u64>,
    header_timeout: Option<u64>,
    request_timeout: Option<u64>,
    rollback_counter_every: Option<u64>,
    per_station_connections: Option<usize>,
    per_station_requests: Option<usize>,
}

fn refused(path: &Path, key: &str, why: impl std::fmt::Display) -> Failure {
    Failure::new(
        Code::InvalidInput,
        format!("--config {}: `{key}`: {why}", path.display()),
    )
}

fn address(path: &Path, key: &str, text: &str) -> Result<SocketAddr, Failure> {
    text.parse().map_err(|e| {
        refused(
            path,
            key,
            format!("'{text}' is not an address and port ({e})"),
        )
    })
}

fn at_least_one<T: PartialOrd + From<u8> + Copy>(
    path: &Path,
    key: &str,
    v: T,
) -> Result<T, Failure> {
    if v < T::from(1) {
        return Err(refused(path, key, "must be at least 1"));
    }
    Ok(v)
}

/// `a` with the settings of its `--config` file, where the command line did not give
/// them.
pub(crate) fn apply(mut a: ServeArgs) -> Result<ServeArgs, Failure> {
    let Some(path) = a.config.clone() else {
        return Ok(a);
    };
    let text = crate::output::read_input_text(&path, MAX_CONFIG_BYTES)?;
    let file: ServeFile = toml::from_str(&text).map_err(|e| {
        Failure::new(
            Code::InvalidInput,
            format!("--config {}: {}", path.display(), e.message().trim()),
        )
    })?;
    let unset = |flag: &str| !a.explicit.iter().any(|given| given == flag);
    if let (Some(v), true) = (&file.listen, unset("listen")) {
        a.listen = address(&path, "listen", v)?;
    }
    if let (Some(v), true) = (&file.hostnames, unset("hostnames")) {
        a.hostnames = v.clone();
    }
    if let (Some(v), true) = (&file.metrics_listen, unset("metrics_listen")) {
        a.metrics_listen = Some(address(&path, "metrics_listen", v)?);
    }
    if let (Some(v), true) = (&file.log_format, unset("log_format")) {
        a.log_format = match v.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(refused(
                    &path,
                    "log_format",
                    format!("'{other}' is not text or json"),
                ))
            }
        };
    }
    if let (Some(v), true) = (&file.log_level, unset("log_level")) {
        a.log_level = match v.as_str() {
            "warn" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            other => {
                return Err(refused(
                    &path,
                    "log_level",
                    format!("'{other}' is not warn, info or debug"),
                ))
            }
        };
    }
    if let (Some(v), true) = (&file.log_filter, unset("log_filter")) {
        a.log_filter =
            Some(crate::cli::log_filter(v).map_err(|e| refused(&path, "log_filter", e))?);
    }
    let numbers: [(&str, Option<u64>, &mut u64); 4] = [
        (
            "handshake_timeout",
            file.handshake_timeout,
            &mut a.handshake_timeout,
        ),
        ("header_timeout", file.header_timeout, &mut a.header_timeout),
        (
            "request_timeout",
            file.request_timeout,
            &mut a.request_timeout,
        ),
        (
            "rollback_counter_every",
            file.rollback_counter_every,
            &mut a.rollback_counter_every,
        ),
    ];
    for (key, value, field) in numbers {
        if let (Some(v), true) = (value, !a.explicit.iter().any(|g| g == key)) {
            *field = at_least_one(&path, key, v)?;
        }
    }
    let counts: [(&str, Option<usize>, &mut usize); 3] = [
        (
            "max_connections",
            file.max_connections,
            &mut a.max_connections,
        ),
        (
            "per_station_connections",
            file.per_station_connections,
            &mut a.per_station_connections,
        ),
        (
            "per_station_requests",
            file.per_station_requests,
            &mut a.per_station_requests,
        ),
    ];
    for (key, value, field) in counts {
        if let (Some(v), true) = (value, !a.explicit.iter().any(|g| g == key)) {
            *field = at_least_one(&path, key, v)?;
        }
    }
    Ok(a)
}

/// `--check-config`: what `site serve` would use, and where each setting came from.
pub(crate) fn checked(a: &ServeArgs) -> Result<Report, Failure> {
    let effective = json!({
        "home": a.home.home,
        "listen": a.listen.to_string(),
        "hostnames": a.hostnames,
        "metrics_listen": a.metrics_listen.map(|m| m.to_string()),
        "log_format": format!("{:?}", a.log_format).to_lowercase(),
        "log_level": format!("{:?}", a.log_level).to_lowercase(),
        "log_filter": a.log_filter,
        "max_connections": a.max_connections,
        "handshake_timeout": a.handshake_timeout,
        "header_timeout": a.header_timeout,
        "request_timeout": a.request_timeout,
        "rollback_counter_every": a.rollback_counter_every,
        "per_station_connections": a.per_station_connections,
        "per_station_requests": a.per_station_requests,
    });
    let mut text = String::from("configuration OK; site serve would use:\n");
    if let Some(map) = effective.as_object() {
        for (k, v) in map {
            text.push_str(&format!("  {k} = {v}\n"));
        }
    }
    Ok(Report::new(
        text,
        json!({"ok": true, "config": a.config, "effective": effective}),
    ))
}
