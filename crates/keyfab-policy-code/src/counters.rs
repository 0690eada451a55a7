//! What a policy module needs beyond the built-in counters, kept the same way by the
//! site (with the entitlement's counters, committed with each decision) and by HQ (in
//! its replica, rebuilt from the audit log) — one piece of code, so the two cannot drift.

use crate::{source_bits, Evaluation, Facts, ModuleState, PolicyModule, Request};
use keyfab_policy::{CompiledPolicy, KeySource};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Per-station and failure counters, and the module's own state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeCounters {
    /// Devices allowed per station, over the entitlement's life.
    #[serde(default)]
    pub station_total: BTreeMap<String, u64>,
    /// The local day `station_today` counts (`YYYY-MM-DD`).
    #[serde(default)]
    pub station_day: String,
    /// Devices per station on `station_day`.
    #[serde(default)]
    pub station_today: BTreeMap<String, u64>,
    /// The local day `failed_today` counts.
    #[serde(default)]
    pub failed_day: String,
    /// Devices reported `failed` on `failed_day`.
    #[serde(default)]
    pub failed_today: u64,
    /// What the module keeps between decisions.
    #[serde(default)]
    pub state: ModuleState,
}

/// The built-in counters of the decision, as the caller read them.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    /// Devices released under the entitlement.
    pub total: u64,
    /// Devices released today (policy time zone).
    pub today: u64,
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl CodeCounters {
    /// A device was allowed on `day` through `station`.
    pub fn record_allowed(&mut self, day: &str, station: Option<&str>) {
        let Some(station) = station else { return };
        *self.station_total.entry(station.to_owned()).or_insert(0) += 1;
        if self.station_day != day {
            self.station_day = day.to_owned();
            self.station_today.clear();
        }
        *self.station_today.entry(station.to_owned()).or_insert(0) += 1;
    }

    /// A station reported a device `failed` on `day`.
    pub fn record_failed(&mut self, day: &str) {
        if self.failed_day != day {
            self.failed_day = day.to_owned();
            self.failed_today = 0;
        }
        self.failed_today += 1;
    }

    /// The module's inputs for one request at `now`, on local `day`.
    pub fn facts(
        &self,
        policy: &CompiledPolicy,
        now: i64,
        day: &str,
        counted: Counted,
        station: Option<&str>,
    ) -> Facts {
        let p = &policy.policy;
        let (local_day, local_second) = policy.local_clock(now);
        let key_sources = p.keys.iter().fold(0, |bits, k| {
            bits | match k.source {
                KeySource::HqPool => source_bits::HQ_POOL,
                KeySource::Site => source_bits::SITE,
                KeySource::Device => source_bits::DEVICE,
                KeySource::Derived => source_bits::DERIVED,
            }
        });
        let station_count =
            |m: &BTreeMap<String, u64>| station.and_then(|s| m.get(s)).copied().map_or(0, signed);
        Facts {
            now,
            local_day,
            local_second,
            total: signed(counted.total),
            today: signed(counted.today),
            station_total: station_count(&self.station_total),
            station_today: if self.station_day == day {
                station_count(&self.station_today)
            } else {
                0
            },
            failed_today: if self.failed_day == day {
                signed(self.failed_today)
            } else {
                0
            },
            key_sources,
            quota: signed(p.devices),
            daily_limit: p.daily_limit.map_or(0, signed),
        }
    }

    /// Runs `module` for a request the built-in rules allowed; the module's state
    /// changes land in `self.state` (dropped if it failed).
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(
        &mut self,
        module: &PolicyModule,
        policy: &CompiledPolicy,
        now: i64,
        day: &str,
        counted: Counted,
        device_id: &str,
        station: Option<&str>,
    ) -> Evaluation {
        let facts = self.facts(policy, now, day, counted, station);
        module.evaluate(
            &Request {
                device_id,
                station,
                facts,
            },
            &mut self.state,
        )
    }
}
