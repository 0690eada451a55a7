//! `keyfab bench serve --flood-station N`: what one station flooding the site costs the
//! others. Paced stations ask at a line's pace (one device every so many ms each) while
//! one more enrolled station floods from N connections as fast as it can; the same paced
//! run without the flood, in the same process and against the same site, is the
//! reference. Reported: the paced stations' rate and p99 with and without the flood,
//! their ratio, and the flooder's own rate (what refusing it cost it).

use crate::bench::bench_world;
use crate::output::{Failure, Report};
use crate::run;
use keyfab_node::Code;
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(Code::Internal, e.to_string())
}

/// The paced side of a run: how many devices went through, in what time, how slowly.
struct Paced {
    per_s: f64,
    p99_ms: f64,
    failed: u64,
}

/// What the flood run is asked to do.
pub(crate) struct Flood {
    pub flooders: usize,
    pub paced_stations: usize,
    /// Devices per second each paced station asks for.
    pub paced_rate: u32,
    pub seconds: f64,
}

pub(crate) fn flood(f: &Flood, dir: Option<&Path>) -> Result<Report, Failure> {
    let (_temp, base) = crate::bench::temp_or(dir)?;
    let (ctx, hq, site) = bench_world(&base)?;
    let policy = base.join("flood.toml");
    std::fs::write(
        &policy,
        "product = \"bench\"\ndevices = 100000000\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = { subject = \"CN={device_id},O=Bench\", days = 3650 }\n",
    )
    .map_err(fail)?;
    let kfe = base.join("flood.kfe");
    let created = run::entitlement_create(&ctx, &hq, "bench-site", &policy, &kfe)?;
    let id = created.id;
    run::entitlement_import(&ctx, &site, &kfe)?;
    // Every station enrolled on its own, as on a factory floor: the site's per-station
    // bounds and its fairness see them apart.
    let mut clients = Vec::new();
    for name in (1..=f.paced_stations)
        .map(|i| format!("line-{i}"))
        .chain(["flood".to_owned()])
    {
        let dir = base.join(&name);
        crate::line::station_issue(&ctx, &site, (&name, &dir, 30), false)?;
        clients.push((name, dir));
    }
    let total = (f.flooders + 8 * f.paced_stations + 64).to_string();
    // The site with its default per-station bounds: what a real site runs with.
    let server = crate::line::ServeChild::start(&ctx, &site, &["--max-connections", &total])?;
    let url = server.url.clone();
    let client = |dir: &Path| {
        let station = keyfab_station::StationDir::load(dir).map_err(fail)?;
        keyfab_station::Client::new(&station, std::slice::from_ref(&url)).map_err(fail)
    };
    let (flood_dir, paced_dirs) = match clients.split_last() {
        Some(((_, flood), paced)) => (flood.clone(), paced.to_vec()),
        None => return Err(fail("no stations")),
    };
    let paced: Vec<keyfab_station::Client> = paced_dirs
        .iter()
        .map(|(_, d)| client(d))
        .collect::<Result<_, _>>()?;
    let flooder = client(&flood_dir)?;
    let period = Duration::from_secs_f64(1.0 / f64::from(f.paced_rate.max(1)));
    let run_for = Duration::from_secs_f64(f.seconds);

    // Warm up the connections, then the reference: the paced stations alone.
    let _ = run_paced(&paced, &id, "warm", period, Duration::from_millis(500));
    let alone = run_paced(&paced, &id, "alone", period, run_for);
    // The flood: N threads of one station, one request after another, no pause.
    let stop = AtomicBool::new(false);
    let flooded = AtomicU64::new(0);
    let (flood_elapsed, with) = std::thread::scope(|scope| {
        for t in 0..f.flooders {
            let (flooder, stop, flooded, id) = (&flooder, &stop, &flooded, &id);
            scope.spawn(move || {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let device = format!("F-{t:04}-{k:08}");
                    k += 1;
                    if flooder.provision(&request(id, device)).is_ok() {
                        flooded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        let (started, before) = (Instant::now(), flooded.load(Ordering::Relaxed));
        let with = run_paced(&paced, &id, "flooded", period, run_for);
        let flood_rate =
            (flooded.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        (flood_rate, with)
    });
    server.stop()?;
    let (alone, with) = (alone?, with?);
    if alone.failed + with.failed > 0 {
        return Err(fail(format!(
            "{} paced requests failed",
            alone.failed + with.failed
        )));
    }
    let asked = f.paced_stations as f64 * f64::from(f.paced_rate);
    let ratio = with.per_s / alone.per_s.max(1e-9);
    let p99_ratio = with.p99_ms / alone.p99_ms.max(1e-9);
    let (busy, dropped) = (flooder.retries().busy, flooder.retries().dropped);
    let text = format!(
        "flood benchmark: {} paced stations asking {} devices/s each ({asked:.0}/s in all), one more station flooding from {} connections; site serve in another process with its default per-station bounds\n\
         paced, alone:   {:.0} devices/s  p99 {:.2} ms\n\
         paced, flooded: {:.0} devices/s  p99 {:.2} ms\n\
         ratio {ratio:.2} (goal ≥ 0.90), p99 {p99_ratio:.1}× unflooded (goal ≤ 3×)\n\
         the flooder meanwhile: {flood_elapsed:.0} devices/s; sent again: {busy} answered busy, {dropped} dropped (connections past its bound closed)",
        f.paced_stations,
        f.paced_rate,
        f.flooders,
        alone.per_s,
        alone.p99_ms,
        with.per_s,
        with.p99_ms,
    );
    Ok(Report::new(
        text,
        json!({
            "flooders": f.flooders, "paced_stations": f.paced_stations, "paced_rate": f.paced_rate,
            "asked_per_s": asked,
            "alone": {"devices_per_s": alone.per_s, "p99_ms": alone.p99_ms},
            "flooded": {"devices_per_s": with.per_s, "p99_ms": with.p99_ms},
            "ratio": ratio, "p99_ratio": p99_ratio,
            "flooder": {"devices_per_s": flood_elapsed, "busy": busy, "dropped": dropped},
        }),
    ))
}

fn request(entitlement: &str, device: String) -> keyfab_station::ProvisionRequest {
    keyfab_station::ProvisionRequest {
        request_id: device.clone(),
        entitlement: entitlement.to_owned(),
        device_id: device,
        csr: None,
        transport_key: None,
        chip_certificates: None,
    }
}

/// Each paced station on a thread of its own asks for one device every `period` (on a
/// fixed schedule: a late request goes at once, nothing is skipped) for `run_for`.
fn run_paced(
    paced: &[keyfab_station::Client],
    entitlement: &str,
    phase: &str,
    period: Duration,
    run_for: Duration,
) -> Result<Paced, Failure> {
    let started = Instant::now();
    let results: Vec<_> = std::thread::scope(|scope| {
        let workers: Vec<_> = paced
            .iter()
            .enumerate()
            .map(|(s, client)| {
                scope.spawn(move || {
                    let (mut lat, mut failed) = (Vec::new(), 0u64);
                    for k in 0u32.. {
                        let due = started + period * k;
                        if due.duration_since(started) >= run_for {
                            break;
                        }
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let device = format!("P-{phase}-{s:03}-{k:07}");
                        let t = Instant::now();
                        match client.provision(&request(entitlement, device)) {
                            Ok(_) => lat.push(t.elapsed()),
                            Err(_) => failed += 1,
                        }
                    }
                    (lat, failed)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().ok()).collect()
    });
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let (mut lat, mut failed) = (Vec::new(), 0u64);
    for r in results {
        let (l, f) = r.ok_or_else(|| fail("a paced station's thread panicked"))?;
        lat.extend(l);
        failed += f;
    }
    lat.sort();
    let p99 = lat
        .get(((lat.len() as f64 * 0.99) as usize).min(lat.len().saturating_sub(1)))
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    Ok(Paced {
        per_s: lat.len() as f64 / elapsed,
        p99_ms: p99,
        failed,
    })
}
