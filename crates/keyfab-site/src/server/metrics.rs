//! `GET /metrics`: Prometheus text exposition of what the line did — devices provisioned,
//! refusals by code, request latency, and quota left per entitlement.

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

/// Counters and latencies for `/metrics` (Prometheus text).
#[derive(Default)]
pub struct Metrics {
    provisioned: AtomicU64,
    replayed: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests at or under each bucket's bound (cumulative), then all of them.
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Metrics {
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
        for e in crate::entitlements::list(node)? {
            let standing = crate::entitlements::standing(node, &e)?;
            let labels = format!(
                "entitlement=\"{}\",product=\"{}\"",
                e.id,
                e.policy.product.replace(['"', '\\', '\n'], "_")
            );
            // A revoked or ended entitlement will never provision again: nothing is left.
            let left = match standing.state {
                EntitlementStatus::Revoked | EntitlementStatus::Expired => 0,
                _ => standing.left,
            };
            let _ = writeln!(out, "keyfab_quota_left{{{labels}}} {left}");
            statuses.push((labels, standing.state));
        }
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
        Ok(out)
    }
}
