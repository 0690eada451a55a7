//! `keyfab bench serve`: devices/s and latency through the whole production-line path —
//! `keyfab site serve` in its own process, stations over mutual TLS with keep-alive, each
//! device's keys sealed to its chip, opened and checked by the chip, and confirmed —
//! against the raw per-device crypto of this machine, measured in the same run.

use crate::bench::{all_cores, bench_world, temp_or, RAW_SAMPLE_PER_CORE};
use crate::bench_cpu::cpu_seconds;
use crate::output::{Failure, Report};
use crate::run;
use keyfab_crypto::x509;
use keyfab_node::Code;
use serde_json::json;
use std::path::Path;

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(Code::Internal, e.to_string())
}

/// The bench policy: `devices` devices, a site-made ec-p256 key with a certificate each,
/// and `extra` TOML (a `[chips]` table).
fn bench_policy(devices: u64, extra: &str) -> String {
    format!(
        "product = \"bench\"\ndevices = {devices}\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = {{ subject = \"CN={{device_id}},O=Bench\", days = 3650 }}\n{extra}"
    )
}

/// Creates the entitlement of `text` at HQ and imports it at the site: its id.
fn entitlement(
    ctx: &crate::context::Context,
    (hq, site): (&Path, &Path),
    base: &Path,
    name: &str,
    text: &str,
) -> Result<String, Failure> {
    let policy = base.join(format!("{name}.toml"));
    std::fs::write(&policy, text).map_err(fail)?;
    let kfe = base.join(format!("{name}.kfe"));
    let created = run::entitlement_create(ctx, hq, "bench-site", &policy, &kfe)?;
    run::entitlement_import(ctx, site, &kfe)?;
    Ok(created.id)
}

/// The limit: raw per-device crypto (keygen, certificate signature, HKDF, AEAD) on all
/// cores, devices/s.
fn raw_limit() -> Result<f64, Failure> {
    let signer =
        keyfab_crypto::sign::SigningKey::generate(&keyfab_crypto::rng::SystemRng).map_err(fail)?;
    let aead = keyfab_crypto::aead::AeadKey::new(&keyfab_crypto::secret::Secret32::new([7; 32]))
        .map_err(fail)?;
    all_cores(RAW_SAMPLE_PER_CORE, |n| {
        keyfab_harness::raw::raw_device_crypto(
            keyfab_crypto::devicekey::DeviceKeyType::EcP256,
            n,
            &signer,
            &aead,
        )
    })
}

/// The site in a process of its own. The simulated stations share one enrolled
/// identity, so the site's per-station bounds (fairness between real stations) are
/// raised to fit them all: the run measures the path, not the bounds. A connection
/// pool opens a new connection when an idle one is not back yet, so a station may hold
/// more connections than requests.
fn start_site(
    ctx: &crate::context::Context,
    site: &Path,
    stations: usize,
) -> Result<crate::line::ServeChild, Failure> {
    let requests = stations.max(64).to_string();
    let connections = (4 * stations).max(64);
    let (connections, total) = (connections.to_string(), connections.max(1024).to_string());
    crate::line::ServeChild::start(
        ctx,
        site,
        &[
            "--per-station-requests",
            &requests,
            "--per-station-connections",
            &connections,
            "--max-connections",
            &total,
        ],
    )
}

/// Latencies sorted, and their quantile `q` in milliseconds.
struct Latencies(Vec<std::time::Duration>);

impl Latencies {
    fn of(mut lat: Vec<std::time::Duration>) -> Self {
        lat.sort();
        Self(lat)
    }

    fn ms(&self, q: f64) -> f64 {
        let lat = &self.0;
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

/// A served site and what its stations need: the site in its own process, an enrolled
/// station's files, the root devices check against, and the raw crypto rate measured
/// before the site started.
struct Served {
    server: crate::line::ServeChild,
    url: String,
    station: keyfab_station::StationDir,
    root: Vec<u8>,
    raw: f64,
}

impl Served {
    /// Enrolls a station at `site`, measures the raw rate, then starts the site for
    /// `stations` stations.
    fn start(
        ctx: &crate::context::Context,
        site: &Path,
        base: &Path,
        stations: usize,
    ) -> Result<Self, Failure> {
        let station_dir = base.join("station");
        crate::line::station_issue(ctx, site, ("bench-line", &station_dir, 30), false)?;
        let root = std::fs::read_to_string(base.join("root").join("root.crt")).map_err(fail)?;
        let root = x509::from_pem(&root, "CERTIFICATE").map_err(fail)?;
        let raw = raw_limit()?;
        let server = start_site(ctx, site, stations)?;
        let url = server.url.clone();
        let station = keyfab_station::StationDir::load(&station_dir).map_err(fail)?;
        Ok(Self {
            server,
            url,
            station,
            root,
            raw,
        })
    }

    /// A client of the site as the enrolled station.
    fn client(&self) -> Result<keyfab_station::Client, Failure> {
        keyfab_station::Client::new(&self.station, std::slice::from_ref(&self.url)).map_err(fail)
    }
}

pub(crate) fn serve(
    stations: usize,
    devices: u64,
    chip: bool,
    dir: Option<&Path>,
) -> Result<Report, Failure> {
    let (_temp, base) = temp_or(dir)?;
    let (ctx, hq, site) = bench_world(&base)?;
    let id = entitlement(
        &ctx,
        (&hq, &site),
        &base,
        "serve",
        &bench_policy(devices, ""),
    )?;
    let served = Served::start(&ctx, &site, &base, stations)?;
    let (server, root, raw) = (&served.server, &served.root, served.raw);
    // CPU spent so far — this process's setup and raw crypto rate, the server's start
    // (unlocking its home) — is neither side's per-device cost.
    let server_stat = format!("/proc/{}/stat", server.pid());
    let server_start_cpu = cpu_seconds(&server_stat);
    let setup_cpu = cpu_seconds("/proc/self/stat");
    let client = served.client()?;
    let (latencies, elapsed, errors) = if chip {
        let ids: Vec<String> = (1..=devices).map(|i| format!("B-{i:09}")).collect();
        let r = keyfab_station::run_line(&client, &id, ids, stations, root, &|_, _| {});
        let errors = devices - r.programmed;
        (r.latencies, r.elapsed, errors)
    } else {
        provision_only(&client, &id, stations, devices)?
    };
    let server_cpu = cpu_seconds(&server_stat) - server_start_cpu;
    let client_cpu = cpu_seconds("/proc/self/stat") - setup_cpu;
    let alone = http_alone(&client, stations, &server_stat)?;
    served.server.stop()?;

    let lat = Latencies::of(latencies);
    let rate = lat.0.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    if errors > 0 {
        return Err(fail(format!(
            "{errors} of {devices} devices did not go through"
        )));
    }
    let what = if chip {
        "each: provision (site ec-p256 key + certificate, sealed to the chip), open and check on the simulated chip, confirm"
    } else {
        "each: one provisioning request (site ec-p256 key + certificate) and its answer"
    };
    let retries = client.retries();
    let per_device = |cpu: f64| cpu * 1e6 / devices.max(1) as f64;
    let text = format!(
        "serve benchmark: {stations} stations over mutual TLS (keep-alive) in this process, site serve in another, {devices} devices, {what}\n\
         raw per-device crypto (keygen + cert signature + HKDF + AEAD, all cores): {raw:.0} devices/s (limit)\n\
         full path: {rate:.0} devices/s  ratio {:.2}  p50 {:.2} ms  p99 {:.2} ms\n\
         CPU per device: site serve {:.0} µs, stations {:.0} µs; requests sent again: {} busy, {} dropped\n\
         for reference, HTTP alone (GET /healthz, the same stations and connections, nothing provisioned): {:.0} requests/s, CPU per request: site serve {:.0} µs, stations {:.0} µs",
        rate / raw,
        lat.ms(0.50),
        lat.ms(0.99),
        per_device(server_cpu),
        per_device(client_cpu),
        retries.busy,
        retries.dropped,
        alone.per_s,
        alone.server_cpu_us,
        alone.station_cpu_us,
    );
    Ok(Report::new(
        text,
        json!({"stations": stations, "devices": devices, "chip": chip, "raw_device_crypto_per_s": raw, "devices_per_s": rate, "ratio": rate / raw, "p50_ms": lat.ms(0.50), "p99_ms": lat.ms(0.99), "server_cpu_us_per_device": per_device(server_cpu), "station_cpu_us_per_device": per_device(client_cpu), "retried": retries, "http_alone": {"requests_per_s": alone.per_s, "server_cpu_us_per_request": alone.server_cpu_us, "station_cpu_us_per_request": alone.station_cpu_us}}),
    ))
}

/// Rounds of each mode in `bench serve --chip-attestation`, alternating, so that a
/// change in the machine's speed during the run falls on both.
const ATTESTATION_ROUNDS: u64 = 2;

/// One mode's figures over its rounds.
struct ModeRun {
    latencies: Vec<std::time::Duration>,
    elapsed: std::time::Duration,
    programmed: u64,
}

impl ModeRun {
    fn rate(&self) -> f64 {
        self.programmed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `bench serve --chip-attestation`: the whole line path (the chip's keys sealed to it,
/// opened, checked, confirmed) for two entitlements alike but for `[chips] attestation =
/// "required"` — each request of the second carries its chip's vendor certificate, which
/// the site verifies and records — in alternating rounds on the same site, against the
/// raw per-device crypto of this machine.
pub(crate) fn serve_attestation(
    stations: usize,
    devices: u64,
    dir: Option<&Path>,
) -> Result<Report, Failure> {
    let (_temp, base) = temp_or(dir)?;
    let (ctx, hq, site) = bench_world(&base)?;
    let vendor_dir = base.join("chip-vendor");
    run::init_chip_vendor(&ctx, &vendor_dir, "CN=Bench Chips Root")?;
    let chips = "\n[chips]\nattestation = \"required\"\nroots = [\"chip-vendor/vendor-root.crt\"]\ndevice_id_from = \"subject-serial\"\n";
    let homes = (hq.as_path(), site.as_path());
    let plain = entitlement(&ctx, homes, &base, "plain", &bench_policy(devices, ""))?;
    let attested = entitlement(
        &ctx,
        homes,
        &base,
        "attested",
        &bench_policy(devices, chips),
    )?;
    let served = Served::start(&ctx, &site, &base, stations)?;
    let (root, raw) = (&served.root, served.raw);
    let plain_client = served.client()?;
    let vendor = keyfab_station::chip_vendor::ChipVendor::open(&vendor_dir).map_err(fail)?;
    let attested_client = served.client()?.with_chip_vendor(vendor);
    let per_round = (devices / ATTESTATION_ROUNDS).max(1);
    let ids = |round: u64| -> Vec<String> {
        (round * per_round + 1..=(round + 1) * per_round)
            .map(|i| format!("B-{i:09}"))
            .collect()
    };
    // Chips come certified from their vendor's factory: certified before the clock starts.
    let factory = std::time::Instant::now();
    for round in 0..ATTESTATION_ROUNDS {
        for device in ids(round) {
            attested_client
                .line_chip(&attested, &device)
                .map_err(fail)?;
        }
    }
    let factory = factory.elapsed();
    let mut runs = [
        ModeRun {
            latencies: Vec::new(),
            elapsed: std::time::Duration::ZERO,
            programmed: 0,
        },
        ModeRun {
            latencies: Vec::new(),
            elapsed: std::time::Duration::ZERO,
            programmed: 0,
        },
    ];
    for round in 0..ATTESTATION_ROUNDS {
        for (mode, (client, id)) in [(&plain_client, &plain), (&attested_client, &attested)]
            .into_iter()
            .enumerate()
        {
            let r = keyfab_station::run_line(client, id, ids(round), stations, root, &|_, _| {});
            let run = &mut runs[mode];
            run.latencies.extend(r.latencies);
            run.elapsed += r.elapsed;
            run.programmed += r.programmed;
        }
    }
    served.server.stop()?;
    let asked = per_round * ATTESTATION_ROUNDS;
    if let Some(short) = runs.iter().find(|r| r.programmed < asked) {
        return Err(fail(format!(
            "{} of {asked} devices did not go through",
            asked - short.programmed
        )));
    }
    let [without, with] = runs;
    let (rate0, rate1) = (without.rate(), with.rate());
    let (lat0, lat1) = (
        Latencies::of(without.latencies),
        Latencies::of(with.latencies),
    );
    let cost = 1.0 - rate1 / rate0.max(1e-9);
    let text = format!(
        "chip attestation benchmark: {stations} stations over mutual TLS (keep-alive) in this process, site serve in another; per mode {asked} devices in {ATTESTATION_ROUNDS} alternating rounds, each: provision (site ec-p256 key + certificate, sealed to the chip), open and check on the simulated chip, confirm\n\
         raw per-device crypto (keygen + cert signature + HKDF + AEAD, all cores): {raw:.0} devices/s (limit)\n\
         without attestation: {rate0:.0} devices/s  ratio {:.2}  p50 {:.2} ms  p99 {:.2} ms\n\
         with attestation (each request's chip certificate verified to the vendor root, its key matched, chip_attested recorded): {rate1:.0} devices/s  ratio {:.2}  p50 {:.2} ms  p99 {:.2} ms\n\
         attestation costs {:.1}% of throughput (goal: at most 25%); with/without {:.2}\n\
         (the chips were certified by the vendor before the clock started: {:.1} s for {asked} chips)",
        rate0 / raw,
        lat0.ms(0.50),
        lat0.ms(0.99),
        rate1 / raw,
        lat1.ms(0.50),
        lat1.ms(0.99),
        cost * 100.0,
        rate1 / rate0.max(1e-9),
        factory.as_secs_f64(),
    );
    Ok(Report::new(
        text,
        json!({"stations": stations, "devices_per_mode": asked, "rounds": ATTESTATION_ROUNDS, "raw_device_crypto_per_s": raw,
            "without": {"devices_per_s": rate0, "ratio": rate0 / raw, "p50_ms": lat0.ms(0.50), "p99_ms": lat0.ms(0.99)},
            "with": {"devices_per_s": rate1, "ratio": rate1 / raw, "p50_ms": lat1.ms(0.50), "p99_ms": lat1.ms(0.99)},
            "attestation_cost": cost, "with_over_without": rate1 / rate0.max(1e-9)}),
    ))
}

/// How long the HTTP-alone reference runs.
const HTTP_ALONE: std::time::Duration = std::time::Duration::from_secs(2);

/// The HTTP-alone reference: rate and CPU per request on each side.
struct HttpAlone {
    per_s: f64,
    server_cpu_us: f64,
    station_cpu_us: f64,
}

/// `stations` stations asking `GET /healthz` one after another for [`HTTP_ALONE`], on
/// the connections the run left open: what mutual TLS, HTTP and the two processes' wake-ups
/// cost per request on this machine, with no provisioning behind them — the share of the
/// full path no work on the site's engine can remove.
fn http_alone(
    client: &keyfab_station::Client,
    stations: usize,
    server_stat: &str,
) -> Result<HttpAlone, Failure> {
    let (server_before, self_before) = (cpu_seconds(server_stat), cpu_seconds("/proc/self/stat"));
    let started = std::time::Instant::now();
    let counts = on_stations(stations, |_| {
        let mut n = 0u64;
        while started.elapsed() < HTTP_ALONE {
            client.healthz()?;
            n += 1;
        }
        Ok::<_, keyfab_station::StationError>(n)
    });
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let mut requests = 0u64;
    for c in counts {
        requests += c
            .ok_or_else(|| fail("a station thread panicked"))?
            .map_err(fail)?;
    }
    let per_request = |cpu: f64| cpu * 1e6 / requests.max(1) as f64;
    Ok(HttpAlone {
        per_s: requests as f64 / elapsed,
        server_cpu_us: per_request(cpu_seconds(server_stat) - server_before),
        station_cpu_us: per_request(cpu_seconds("/proc/self/stat") - self_before),
    })
}

/// `stations` stations, each a thread asking for its share of `devices` one after
/// another: per-request latencies, the elapsed time, and how many failed.
fn provision_only(
    client: &keyfab_station::Client,
    entitlement: &str,
    stations: usize,
    devices: u64,
) -> Result<(Vec<std::time::Duration>, std::time::Duration, u64), Failure> {
    let stations = stations.max(1) as u64;
    let started = std::time::Instant::now();
    let (mut lat, mut errors) = (Vec::new(), 0u64);
    for station in on_stations(stations as usize, |s| {
        let mut lat = Vec::new();
        let mut errors = 0u64;
        let mut i = s;
        while i < devices {
            let device = format!("B-{:09}", i + 1);
            let req = keyfab_station::ProvisionRequest {
                request_id: device.clone(),
                entitlement: entitlement.to_owned(),
                device_id: device,
                csr: None,
                transport_key: None,
                chip_certificates: None,
            };
            let t = std::time::Instant::now();
            match client.provision(&req) {
                Ok(_) => lat.push(t.elapsed()),
                Err(_) => errors += 1,
            }
            i += stations;
        }
        (lat, errors)
    }) {
        match station {
            Some((l, e)) => {
                lat.extend(l);
                errors += e;
            }
            None => errors += 1,
        }
    }
    Ok((lat, started.elapsed(), errors))
}

/// Runs `station(s)` for each of `stations` stations, each on a thread of its own, and
/// returns what each returned (`None`: its thread panicked).
fn on_stations<T: Send>(stations: usize, station: impl Fn(u64) -> T + Sync) -> Vec<Option<T>> {
    std::thread::scope(|scope| {
        let station = &station;
        let workers: Vec<_> = (0..stations.max(1) as u64)
            .map(|s| scope.spawn(move || station(s)))
            .collect();
        workers.into_iter().map(|w| w.join().ok()).collect()
    })
}
