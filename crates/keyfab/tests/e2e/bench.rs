//! The benchmarks run end to end at tiny sizes: every device goes through (a bench whose
//! devices fail reports an error instead of a rate) and each report carries the figures
//! docs/BENCHMARKS.md compares — the rate beside the raw crypto rate measured in the same
//! run. How fast they are is never asserted here.

use crate::common::{keyfab, ok, s};

fn positive(report: &serde_json::Value, field: &str) -> f64 {
    let v = report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing from {report}"));
    assert!(v > 0.0, "{field} is {v} in {report}");
    v
}

/// `keyfab bench ARGS… --dir TEMP`: its JSON report.
fn bench(args: &[&str]) -> serde_json::Value {
    let temp = tempfile::tempdir().unwrap();
    let dir = s(temp.path());
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--dir", &dir]);
    ok(&all)
}

#[test]
fn bench_provision_reports_each_level_beside_the_raw_rate() {
    let report = bench(&["provision", "--concurrency", "8", "--devices", "200"]);
    let raw = positive(&report, "raw_device_crypto_per_s");
    let levels = report["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 1, "{report}");
    let level = &levels[0];
    assert_eq!(level["concurrency"], 8);
    assert_eq!(level["devices"], 200);
    let rate = positive(level, "devices_per_s");
    let ratio = positive(level, "ratio");
    assert!((ratio - rate / raw).abs() < 1e-9, "{report}");
    assert!(positive(level, "p99_ms") >= positive(level, "p50_ms"));
}

/// By default a level lasts its time, not a number of devices: the report says how many
/// devices that was, and the rate is those devices over the level's time.
#[test]
fn bench_provision_runs_each_level_for_its_time() {
    let report = bench(&["provision", "--concurrency", "8", "--seconds", "0.5"]);
    let level = &report["levels"][0];
    let devices = level["devices"].as_f64().expect("devices");
    assert!(devices > 0.0, "{report}");
    let seconds = positive(level, "seconds");
    assert!(seconds >= 0.5, "the level ended before its time: {report}");
    let rate = positive(level, "devices_per_s");
    assert!((rate - devices / seconds).abs() <= rate * 1e-9, "{report}");
}

#[test]
fn bench_provision_takes_a_time_or_a_device_count_not_both() {
    for args in [
        vec!["bench", "provision", "--devices", "10", "--seconds", "1"],
        vec!["bench", "provision", "--seconds", "0"],
        vec!["bench", "provision", "--seconds", "NaN"],
        vec!["bench", "provision", "--devices", "0"],
    ] {
        let out = keyfab(&args, None);
        assert_eq!(
            (out.code, out.json["error"]["code"].as_str()),
            (2, Some("usage")),
            "{args:?}: {}",
            out.json
        );
    }
}

/// More simulated stations than the site lets one station hold connections or requests:
/// the stations share one enrolled identity, and the run raises those bounds instead of
/// measuring the reconnections and `429 busy` answers past them.
#[test]
fn bench_serve_runs_more_stations_than_one_station_may_have_in_flight() {
    let report = bench(&["serve", "--stations", "160", "--devices", "800"]);
    assert_eq!(report["stations"], 160);
    // Nothing sent twice: no `429 busy`, no connection closed past the site's bound.
    assert_eq!(report["retried"]["busy"], 0, "{report}");
    assert_eq!(report["retried"]["dropped"], 0, "{report}");
    assert_eq!(report["devices"], 800);
    let raw = positive(&report, "raw_device_crypto_per_s");
    let rate = positive(&report, "devices_per_s");
    assert!(
        (positive(&report, "ratio") - rate / raw).abs() < 1e-9,
        "{report}"
    );
    positive(&report, "server_cpu_us_per_device");
    positive(&report, "station_cpu_us_per_device");
    // The reference: bare requests over the same connections, nothing provisioned.
    let alone = &report["http_alone"];
    positive(alone, "requests_per_s");
    positive(alone, "server_cpu_us_per_request");
    positive(alone, "station_cpu_us_per_request");
}

/// The flood benchmark reports both paced runs, their ratio, and what the flooder got;
/// its figures agree with each other (the rates themselves are the machine's).
#[test]
fn bench_serve_with_a_flooding_station_reports_both_runs_and_their_ratio() {
    let report = bench(&[
        "serve",
        "--flood-station",
        "8",
        "--paced-stations",
        "2",
        "--paced-rate",
        "20",
        "--seconds",
        "1",
    ]);
    assert_eq!(report["flooders"], 8, "{report}");
    assert_eq!(report["asked_per_s"], 40.0, "{report}");
    let alone = positive(&report["alone"], "devices_per_s");
    let flooded = positive(&report["flooded"], "devices_per_s");
    positive(&report["alone"], "p99_ms");
    assert!(
        (positive(&report, "ratio") - flooded / alone).abs() < 1e-9,
        "{report}"
    );
    positive(&report["flooder"], "devices_per_s");
    let out = keyfab(
        &["bench", "serve", "--flood-station", "8", "--seconds", "0"],
        None,
    );
    out.assert_error(2, "usage", "--seconds");
}

/// What chip attestation costs, beside the same run without it: in the engine, and on
/// the whole line. Every device goes through both ways.
#[test]
fn bench_chip_attestation_reports_with_beside_without() {
    let report = bench(&[
        "provision",
        "--concurrency",
        "8",
        "--devices",
        "100",
        "--chip-attestation",
    ]);
    let level = &report["levels"][0];
    let without = positive(level, "devices_per_s");
    let attested = &level["chip_attestation"];
    let with = positive(attested, "devices_per_s");
    assert!(
        (positive(attested, "of_without") - with / without).abs() < 1e-9,
        "{report}"
    );

    let report = bench(&[
        "serve",
        "--stations",
        "4",
        "--devices",
        "40",
        "--chip-attestation",
    ]);
    assert_eq!(report["devices_per_mode"], 40, "{report}");
    let raw = positive(&report, "raw_device_crypto_per_s");
    let without = positive(&report["without"], "devices_per_s");
    let with = positive(&report["with"], "devices_per_s");
    assert!(
        (positive(&report["with"], "ratio") - with / raw).abs() < 1e-9,
        "{report}"
    );
    assert!((positive(&report, "with_over_without") - with / without).abs() < 1e-9);
}
