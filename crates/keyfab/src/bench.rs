//! `keyfab bench entitlement`: create and import an N-device entitlement, each step in a
//! child process so its peak RSS is its own, against the raw P-256 key generation rate of
//! this machine on all cores, measured in the same run.

use crate::context::Context;
use crate::output::{Failure, Report};
use crate::run;
use keyfab_node::NodeKind;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn raw_keygen_rate(sample: usize) -> Result<f64, Failure> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = sample.div_ceil(threads);
    let start = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| s.spawn(move || keyfab_crypto::devicekey::raw_p256_keygen(per)))
            .collect();
        hs.into_iter().map(|h| h.join().map_err(|_| ())).collect()
    });
    for r in results {
        match r {
            Ok(Ok(())) => {}
            _ => return Err(Failure::new("internal", "raw key generation failed")),
        }
    }
    Ok((per * threads) as f64 / start.elapsed().as_secs_f64())
}

fn child(ctx: &Context, args: &[&str]) -> Result<(serde_json::Value, f64), Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::new("io", e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--json")
        .args(args)
        .env("KEYFAB_REPORT_PEAK_RSS", "1");
    if let Some(p) = &ctx.passphrase_file {
        cmd.arg("--passphrase-file").arg(p);
    }
    let start = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| Failure::new("io", e.to_string()))?;
    let secs = start.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Failure::new("internal", format!("bench child output: {e}")))?;
    if !out.status.success() {
        return Err(Failure::new(
            "internal",
            format!("bench step {args:?} failed: {v}"),
        ));
    }
    Ok((v, secs))
}

pub fn entitlement(_ctx: &Context, devices: u64, dir: Option<&Path>) -> Result<Report, Failure> {
    let temp;
    let base = match dir {
        Some(d) => d.to_owned(),
        None => {
            temp = tempfile::tempdir().map_err(|e| Failure::new("io", e.to_string()))?;
            temp.path().to_owned()
        }
    };
    std::fs::create_dir_all(&base).map_err(|e| Failure::new("io", e.to_string()))?;
    let pass = base.join("bench-passphrase");
    std::fs::write(&pass, "keyfab bench passphrase")
        .map_err(|e| Failure::new("io", e.to_string()))?;
    let ctx = Context {
        passphrase_file: Some(pass),
        json: true,
    };
    let (root, hq, site) = (base.join("root"), base.join("hq"), base.join("site"));
    run::init_root(&ctx, &root, "CN=Bench Root", 3650)?;
    for (home, kind, name, role) in [
        (&hq, NodeKind::Hq, "bench-hq", "hq"),
        (&site, NodeKind::Site, "bench-site", "site"),
    ] {
        run::init_node(&ctx, home, kind, name)?;
        let crt = base.join(format!("{name}.crt"));
        run::issue(&ctx, &root, &home.join("cluster.csr"), role, &crt, 365)?;
        run::install_cert(&ctx, home, kind, &crt, &root.join("root.crt"))?;
    }
    let kfi = base.join("bench.kfi");
    run::identity_export(&ctx, &site, &kfi)?;
    run::site_add(&ctx, &hq, &kfi)?;
    let policy = base.join("policy.toml");
    let text = format!(
        "product = \"bench\"\ndevices = {devices}\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\n"
    );
    std::fs::write(&policy, text).map_err(|e| Failure::new("io", e.to_string()))?;

    let sample = (devices as usize).clamp(20_000, 200_000);
    let raw_rate = raw_keygen_rate(sample)?;
    let kfe = base.join("bench.kfe");
    let s = |p: &Path| p.display().to_string();
    let (created, create_secs) = child(
        &ctx,
        &[
            "hq",
            "entitlement",
            "create",
            "--home",
            &s(&hq),
            "--site",
            "bench-site",
            "--policy",
            &s(&policy),
            "--out",
            &s(&kfe),
        ],
    )?;
    let (imported, import_secs) = child(
        &ctx,
        &[
            "site",
            "entitlement",
            "import",
            "--home",
            &s(&site),
            &s(&kfe),
        ],
    )?;
    let create_rate = devices as f64 / create_secs;
    let import_rate = devices as f64 / import_secs;
    let ratio = create_rate / raw_rate;
    let mib = |v: &serde_json::Value| {
        v["peak_rss_bytes"].as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let text = format!(
        "entitlement benchmark, {devices} devices of hq-pool ec-p256, {cores} cores\n\
         raw P-256 keygen (aws-lc, all cores):  {raw_rate:>12.0} keys/s   (limit)\n\
         hq entitlement create:                 {create_rate:>12.0} devices/s  ratio {ratio:.2}  peak RSS {:.0} MiB  ({create_secs:.2} s)\n\
         site entitlement import:               {import_rate:>12.0} devices/s  ratio {:.2}  peak RSS {:.0} MiB  ({import_secs:.2} s)\n\
         file size: {} bytes ({:.1} bytes/device)",
        mib(&created), import_rate / raw_rate, mib(&imported),
        created["bytes"], created["bytes"].as_f64().unwrap_or(0.0) / devices as f64
    );
    Ok(Report::new(
        text,
        json!({
            "devices": devices, "cores": cores,
            "raw_p256_keygen_per_s": raw_rate,
            "create": {"devices_per_s": create_rate, "seconds": create_secs, "peak_rss_bytes": created["peak_rss_bytes"], "ratio": ratio},
            "import": {"devices_per_s": import_rate, "seconds": import_secs, "peak_rss_bytes": imported["peak_rss_bytes"], "ratio_to_keygen": import_rate / raw_rate},
            "ratio": ratio,
            "file_bytes": created["bytes"],
        }),
    ))
}
