//! `GET /metrics`: Prometheus text exposition of what the line did — devices provisioned
//! (in all and per station), refusals by code, confirmations by result, request latency,
//! `busy` answers and refused connections — of where each entitlement stands (quota and
//! today's share left, status, seconds until its audit is overdue), of the audit records
//! not exported yet, and of the process itself (`keyfab_build_info`, CPU, memory, open
//! files, start time).

use crate::provision::Provisioned;
use keyfab_node::{Node, Result};
use keyfab_policy::EntitlementStatus;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// What a binary says of itself in `keyfab_build_info`.
#[derive(Debug, Clone, Default)]
pub struct BuildInfo {
    /// The version (`0.1.0`).
    pub version: String,
    /// The commit it was built from.
    pub commit: String,
}

/// Counters and latencies for `/metrics` (Prometheus text).
#[derive(Default)]
pub struct Metrics {
    build: BuildInfo,
    /// When the server started (Unix seconds).
    started: u64,
    provisioned: AtomicU64,
    replayed: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Devices given keys, per station: bounded by the stations the site enrolled.
    per_station: Mutex<BTreeMap<String, u64>>,
    /// What `site status` shows of each station: when it was last seen, its recent rate.
    seen: Mutex<BTreeMap<String, Seen>>,
    /// When this process's counting began: what recent rates are measured against.
    epoch: Epoch,
    confirmed: Mutex<BTreeMap<&'static str, u64>>,
    busy: AtomicU64,
    handshakes_refused: AtomicU64,
    connections_over_bound: AtomicU64,
    /// Requests at or under each bucket's bound (cumulative), then all of them.
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// How far back a station's rate looks.
const RATE_WINDOW_SECS: u64 = 60;

/// A station as the running server saw it.
#[derive(Default)]
struct Seen {
    /// Its last request (Unix seconds, the site's clock).
    last_seen: Option<i64>,
    /// Devices given keys per second of [`Epoch`], for the last [`RATE_WINDOW_SECS`].
    recent: std::collections::VecDeque<(u64, u64)>,
}

impl Seen {
    fn forget_before(&mut self, second: u64) {
        while self.recent.front().is_some_and(|(s, _)| *s < second) {
            self.recent.pop_front();
        }
    }
}

/// The instant counting began (monotonic: rates do not jump with the wall clock).
struct Epoch(std::time::Instant);

impl Default for Epoch {
    fn default() -> Self {
        Self(std::time::Instant::now())
    }
}

/// Escapes a label value (Prometheus text format: backslash, quote, newline).
fn label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// The metrics of a server of `build` starting now.
    pub fn new(build: BuildInfo) -> Self {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            build,
            started,
            ..Self::default()
        }
    }

    /// Counts a device given keys (not a retry's answer) for `station`.
    pub fn station_provisioned(&self, station: &str) {
        *self
            .per_station
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(station.to_owned())
            .or_insert(0) += 1;
        let second = self.epoch.0.elapsed().as_secs();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let s = seen.entry(station.to_owned()).or_default();
        match s.recent.back_mut() {
            Some((at, n)) if *at == second => *n += 1,
            _ => s.recent.push_back((second, 1)),
        }
        s.forget_before(second.saturating_sub(RATE_WINDOW_SECS - 1));
    }

    /// Notes a request of `station` (an enrolled one: its certificate was checked) at
    /// `now` (Unix seconds).
    pub fn station_seen(&self, station: &str, now: i64) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(station) {
            Some(s) => s.last_seen = Some(now),
            None => {
                seen.insert(
                    station.to_owned(),
                    Seen {
                        last_seen: Some(now),
                        ..Seen::default()
                    },
                );
            }
        }
    }

    /// Each station this server has seen: its open connections (from `limits`), its
    /// last request, the devices it was given keys for, and its rate over the last
    /// minute (or since the server started, if that is less).
    pub fn activity(&self, limits: &super::fairness::StationLimits) -> crate::status::Serving {
        let elapsed = self.epoch.0.elapsed().as_secs();
        let window = elapsed.clamp(1, RATE_WINDOW_SECS);
        let from = (elapsed + 1).saturating_sub(window);
        let connections = limits.open_connections();
        let provisioned = self
            .per_station
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: std::collections::BTreeSet<&String> = seen.keys().collect();
        names.extend(connections.keys());
        let names: Vec<String> = names.into_iter().cloned().collect();
        let stations = names
            .into_iter()
            .map(|name| {
                let s = seen.entry(name.clone()).or_default();
                s.forget_before(from);
                let recent: u64 = s.recent.iter().map(|(_, n)| n).sum();
                crate::status::StationActivity {
                    connections: connections.get(&name).copied().unwrap_or(0),
                    last_seen: s.last_seen,
                    provisioned: provisioned.get(&name).copied().unwrap_or(0),
                    devices_per_second: recent as f64 / window as f64,
                    name,
                }
            })
            .collect();
        crate::status::Serving {
            since: i64::try_from(self.started).unwrap_or(i64::MAX),
            stations,
        }
    }

    /// Counts a confirmation recorded with `result`.
    pub fn confirmed(&self, result: &'static str) {
        *self
            .confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(result)
            .or_insert(0) += 1;
    }

    /// Counts a request answered `busy` (429): its station at its bound.
    pub fn busy(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection whose TLS handshake was refused or timed out.
    pub fn handshake_refused(&self) {
        self.handshakes_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection closed at once: all connections were in use.
    pub fn connection_over_bound(&self) {
        self.connections_over_bound.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one answer and how long it took.
    pub fn observe(&self, outcome: &keyfab_node::Result<Provisioned>, took: Duration) {
        match outcome {
            Ok(p) if p.replayed => {
                self.replayed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                self.provisioned.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                *self
                    .refused
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(e.code().as_str())
                    .or_insert(0) += 1;
            }
        }
        let secs = took.as_secs_f64();
        for (bound, n) in BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text.
    pub fn render(&self, node: &Node) -> Result<String> {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP keyfab_provisioned_total Devices given keys by this server.\n# TYPE keyfab_provisioned_total counter\nkeyfab_provisioned_total {}",
            self.provisioned.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP keyfab_replayed_total Retried requests answered again from their record (no new keys).\n# TYPE keyfab_replayed_total counter\nkeyfab_replayed_total {}",
            self.replayed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP keyfab_refused_total Provisioning requests refused, by code.\n# TYPE keyfab_refused_total counter"
        );
        for (code, n) in self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "keyfab_refused_total{{code=\"{code}\"}} {n}");
        }
        counter_family(
            &mut out,
            "keyfab_station_provisioned_total",
            "Devices given keys by this server, per station.",
            "station",
            self.per_station
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.as_str(), *v)),
        );
        counter_family(
            &mut out,
            "keyfab_confirmed_total",
            "Confirmations recorded, by result (failed: keys burned).",
            "result",
            self.confirmed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (*k, *v)),
        );
        for (name, help, n) in [
            (
                "keyfab_busy_total",
                "Requests answered 429 busy: the station had its bound of requests in flight.",
                &self.busy,
            ),
            (
                "keyfab_handshakes_refused_total",
                "Connections whose TLS handshake was refused (no or a foreign certificate) or timed out.",
                &self.handshakes_refused,
            ),
            (
                "keyfab_connections_over_bound_total",
                "Connections closed at once: every connection slot was in use.",
                &self.connections_over_bound,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP keyfab_provision_seconds Time to answer a provisioning request.\n# TYPE keyfab_provision_seconds histogram"
        );
        for (bound, n) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "keyfab_provision_seconds_bucket{{le=\"{bound}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "keyfab_provision_seconds_bucket{{le=\"+Inf\"}} {count}\nkeyfab_provision_seconds_sum {}\nkeyfab_provision_seconds_count {count}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP keyfab_quota_left Devices an entitlement may still provision (0 once revoked or expired).\n# TYPE keyfab_quota_left gauge"
        );
        let mut statuses = Vec::new();
        let mut daily = Vec::new();
        let mut audit_due = Vec::new();
        let now = node.now().0;
        for e in crate::entitlements::list(node)? {
            let standing = crate::entitlements::standing(node, &e)?;
            let labels = format!(
                "entitlement=\"{}\",product=\"{}\"",
                e.id,
                label(&e.policy.product)
            );
            // A revoked or ended entitlement will never provision again: nothing is left.
            let left = match standing.state {
                EntitlementStatus::Revoked | EntitlementStatus::Expired => 0,
                _ => standing.left,
            };
            let _ = writeln!(out, "keyfab_quota_left{{{labels}}} {left}");
            if let Some(today) = standing.left_today {
                daily.push((labels.clone(), today));
            }
            if let Some(due) = standing.audit_due_at {
                audit_due.push((labels.clone(), due.saturating_sub(now)));
            }
            statuses.push((labels, standing.state));
        }
        let _ = writeln!(
            out,
            "# HELP keyfab_daily_left Devices today's share (the policy's daily limit) still allows.\n# TYPE keyfab_daily_left gauge"
        );
        for (labels, n) in daily {
            let _ = writeln!(out, "keyfab_daily_left{{{labels}}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP keyfab_audit_due_seconds Seconds until the entitlement pauses for want of HQ's receipt (audit_overdue); negative once it has.\n# TYPE keyfab_audit_due_seconds gauge"
        );
        for (labels, secs) in audit_due {
            let _ = writeln!(out, "keyfab_audit_due_seconds{{{labels}}} {secs}");
        }
        let _ = writeln!(
            out,
            "# HELP keyfab_audit_records_unexported Audit records HQ has not been sent yet (site audit export).\n# TYPE keyfab_audit_records_unexported gauge\nkeyfab_audit_records_unexported {}",
            crate::export::records_unexported(node)?
        );
        let _ = writeln!(
            out,
            "# HELP keyfab_entitlement_status 1 for an entitlement's status (see the station API's EntitlementStatus), 0 for the others.\n# TYPE keyfab_entitlement_status gauge"
        );
        for (labels, status) in statuses {
            for each in EntitlementStatus::ALL {
                let _ = writeln!(
                    out,
                    "keyfab_entitlement_status{{{labels},status=\"{each}\"}} {}",
                    u8::from(each == status)
                );
            }
        }
        self.render_process(&mut out);
        Ok(out)
    }

    /// `keyfab_build_info` and the process's own figures, with Prometheus's usual names.
    fn render_process(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP keyfab_build_info The version and commit of the running binary.\n# TYPE keyfab_build_info gauge\nkeyfab_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            label(&self.build.version),
            label(&self.build.commit)
        );
        let _ = writeln!(
            out,
            "# HELP process_start_time_seconds When the server started (Unix seconds).\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}",
            self.started
        );
        let process = ProcessFigures::read();
        if let Some(cpu) = process.cpu_seconds {
            let _ = writeln!(
                out,
                "# HELP process_cpu_seconds_total CPU time the process used, user and system.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}"
            );
        }
        if let Some(rss) = process.resident_bytes {
            let _ = writeln!(
                out,
                "# HELP process_resident_memory_bytes Resident memory.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
            );
        }
        if let Some(fds) = process.open_fds {
            let _ = writeln!(
                out,
                "# HELP process_open_fds Open file descriptors (connections, the store, logs).\n# TYPE process_open_fds gauge\nprocess_open_fds {fds}"
            );
        }
    }
}

/// One counter family with one label.
fn counter_family<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label_name: &str,
    values: impl Iterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, n) in values {
        let _ = writeln!(out, "{name}{{{label_name}=\"{}\"}} {n}", label(value));
    }
}

/// The process's figures from /proc (Linux); each `None` where it cannot be read.
struct ProcessFigures {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    open_fds: Option<usize>,
}

/// Clock ticks per second of /proc's times (USER_HZ: 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;
/// Bytes of a page (/proc/self/statm counts pages: 4 KiB on Linux's usual platforms).
const PAGE_BYTES: u64 = 4096;

impl ProcessFigures {
    fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // The fields after the command name, which is in parentheses and may hold spaces.
        let after_name = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(") "))
            .map(|(_, rest)| rest.split_whitespace().collect::<Vec<_>>());
        // utime and stime are fields 14 and 15, the 12th and 13th after the name.
        let cpu_seconds = after_name.and_then(|f| {
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / TICKS_PER_SECOND)
        });
        let resident_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * PAGE_BYTES);
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count());
        Self {
            cpu_seconds,
            resident_bytes,
            open_fds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_process_figures_read() {
        let m = Metrics::new(BuildInfo {
            version: "1.0 \"beta\"\nx\\".into(),
            commit: "abc".into(),
        });
        let mut out = String::new();
        m.render_process(&mut out);
        assert!(
            out.contains(
                "keyfab_build_info{version=\"1.0 \\\"beta\\\"\\nx\\\\\",commit=\"abc\"} 1"
            ),
            "{out}"
        );
        let p = ProcessFigures::read();
        assert!(p.cpu_seconds.is_some() && p.resident_bytes.unwrap_or(0) > 0);
        assert!(p.open_fds.unwrap_or(0) >= 3);
    }
}
