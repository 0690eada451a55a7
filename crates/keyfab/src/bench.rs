//! `keyfab bench` (feature `bench`, on by default): each benchmark measures keyfab and,
//! in the same run, the limit it is compared with. `provision`, `audit` and `entitlement`
//! are here; `serve` in `bench_serve` and `bench_flood`. A build without the feature has
//! none of it, nor the harness it needs (an etcd cluster spawner, token initialization,
//! the HSM-centred baseline).
//!
//! `keyfab bench entitlement`: create and import an N-device entitlement, each step in a
//! child process so its peak RSS is its own, against the raw P-256 key generation rate of
//! this machine on all cores, measured in the same run.

use crate::cli::BenchCommand;
use crate::context::Context;
use crate::output::{Failure, Report};
use crate::run;
use keyfab_node::Code;
use keyfab_node::NodeKind;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Runs the benchmark `command` asks for.
pub(crate) fn dispatch(ctx: &Context, command: BenchCommand) -> Result<Report, Failure> {
    match command {
        BenchCommand::Serve {
            flood_station: Some(flooders),
            paced_stations,
            paced_rate,
            seconds,
            dir,
            ..
        } => {
            if !(seconds.is_finite() && (0.5..=600.0).contains(&seconds)) {
                return Err(Failure::usage("--seconds must be between 0.5 and 600"));
            }
            let flood = crate::bench_flood::Flood {
                flooders,
                paced_stations,
                paced_rate,
                seconds,
            };
            crate::bench_flood::flood(&flood, dir.as_deref())
        }
        BenchCommand::Serve {
            stations,
            devices,
            chip_attestation: true,
            dir,
            ..
        } => crate::bench_serve::serve_attestation(stations, devices, dir.as_deref()),
        BenchCommand::Serve {
            stations,
            devices,
            chip,
            dir,
            ..
        } => crate::bench_serve::serve(stations, devices, chip, dir.as_deref()),
        BenchCommand::Provision {
            concurrency,
            devices,
            seconds,
            dir,
            custody,
            pkcs11_module,
            policy_module,
            store,
            nodes,
            key_source,
            key_type,
            chip_attestation,
            rollback_counter,
            rollback_counter_every,
        } => {
            let token = (custody == "pkcs11").then_some(pkcs11_module.as_path());
            crate::bench::provision(
                ctx,
                concurrency,
                devices.map_or(
                    crate::bench::LevelLength::Seconds(seconds),
                    crate::bench::LevelLength::Devices,
                ),
                dir.as_deref(),
                token,
                policy_module.as_deref(),
                &crate::bench::SiteOption {
                    spec: store,
                    nodes,
                    key_source,
                    key_type,
                    chip_attestation,
                    rollback_counter_every: rollback_counter
                        .map(|_| std::time::Duration::from_secs(rollback_counter_every.max(1))),
                },
            )
        }
        BenchCommand::Audit {
            records,
            random_ids,
            dir,
        } => crate::bench::audit(records, random_ids, dir.as_deref()),
        BenchCommand::Entitlement { devices, dir } => {
            crate::bench::entitlement(ctx, devices, dir.as_deref())
        }
    }
}

fn raw_keygen_rate(sample: usize) -> Result<f64, Failure> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = sample.div_ceil(threads);
    let start = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| s.spawn(move || keyfab_harness::raw::raw_p256_keygen(per)))
            .collect();
        hs.into_iter().map(|h| h.join().map_err(|_| ())).collect()
    });
    for r in results {
        match r {
            Ok(Ok(())) => {}
            _ => return Err(Failure::new(Code::Internal, "raw key generation failed")),
        }
    }
    Ok((per * threads) as f64 / start.elapsed().as_secs_f64())
}

/// Root, HQ and site homes in `base`, the site registered at HQ.
pub(crate) fn bench_world(
    base: &Path,
) -> Result<(Context, std::path::PathBuf, std::path::PathBuf), Failure> {
    bench_world_with(base, None, "embedded", None)
}

const BENCH_PASSPHRASE: &str = "keyfab bench passphrase";

/// [`bench_world`], HQ's and the site's identity keys in fresh tokens of `token_module`
/// when given (their user PIN is the bench passphrase).
fn bench_world_with(
    base: &Path,
    token_module: Option<&Path>,
    site_store: &str,
    rollback_counter: Option<&str>,
) -> Result<(Context, std::path::PathBuf, std::path::PathBuf), Failure> {
    std::fs::create_dir_all(base).map_err(|e| Failure::new(Code::Io, e.to_string()))?;
    let pass = base.join("bench-passphrase");
    std::fs::write(&pass, BENCH_PASSPHRASE).map_err(|e| Failure::new(Code::Io, e.to_string()))?;
    let ctx = Context {
        passphrase_file: Some(pass),
        unseal_share_files: Vec::new(),
        json: true,
    };
    let (root, hq, site) = (base.join("root"), base.join("hq"), base.join("site"));
    run::init_root(
        &ctx,
        &root,
        "CN=Bench Root",
        keyfab_policy::Lifetime::Forever,
    )?;
    for (home, kind, name, role) in [
        (&hq, NodeKind::Hq, "bench-hq", crate::cli::CertRole::Hq),
        (
            &site,
            NodeKind::Site,
            "bench-site",
            crate::cli::CertRole::Site,
        ),
    ] {
        let mut args = crate::cli::InitArgs::with_passphrase(home, name);
        if kind == NodeKind::Site {
            args.store = site_store.to_owned();
            args.rollback_counter = rollback_counter.map(str::to_owned);
        }
        if let Some(module) = token_module {
            let label = bench_token(module, name)?;
            args.custody = format!("pkcs11:module={},token={label}", module.display());
        }
        run::init_node(&ctx, &args, kind)?;
        let crt = base.join(format!("{name}.crt"));
        run::issue(&ctx, &root, &home.join("cluster.csr"), role, &crt, None)?;
        run::install_cert(&ctx, home, kind, &crt, &root.join("root.crt"))?;
    }
    let kfi = base.join("bench.kfi");
    run::identity_export(&ctx, &site, &kfi)?;
    run::site_add(&ctx, &hq, &kfi)?;
    Ok((ctx, hq, site))
}

/// A fresh token for `name`; its label.
fn bench_token(module: &Path, name: &str) -> Result<String, Failure> {
    let mut id = [0u8; 4];
    keyfab_crypto::rng::SecureRng::fill(&keyfab_crypto::rng::SystemRng, &mut id);
    let label = format!("{name}-{}", hex::encode(id));
    keyfab_custody_pkcs11::init_token(module, &label, "bench-so-pin", BENCH_PASSPHRASE)
        .map_err(keyfab_node::Error::from)?;
    Ok(label)
}

/// With no `SOFTHSM2_CONF` in the environment, a SoftHSM2 configuration whose tokens
/// live in `base` (set before any PKCS#11 call of this process).
fn softhsm_environment(base: &Path) -> Result<(), Failure> {
    if std::env::var_os("SOFTHSM2_CONF").is_some() {
        return Ok(());
    }
    let io = |e: std::io::Error| Failure::new(Code::Io, e.to_string());
    let dir = base.join("softhsm");
    std::fs::create_dir_all(dir.join("tokens")).map_err(io)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
    )
    .map_err(io)?;
    std::env::set_var("SOFTHSM2_CONF", conf);
    Ok(())
}

/// The HSM-centred way on all cores for `devices` devices: each device's key pair made
/// in the token, its private key wrapped out, its certificate signed in the token.
fn peer_baseline(module: &Path, label: &str, devices: usize) -> Result<f64, Failure> {
    use keyfab_custody_pkcs11::peer;
    let digest = keyfab_crypto::hash::sha256(&[0x30; 400]);
    peer::on_all_cores(module, label, BENCH_PASSPHRASE, devices, |s, keys, _| {
        peer::peer_device(s, keys, &digest).map(drop)
    })
    .map_err(|e| Failure::new(Code::Internal, format!("the PKCS#11 baseline failed: {e}")))
}

/// ECDSA signatures in the token on all cores.
fn token_sign_rate(module: &Path, label: &str, signatures: usize) -> Result<f64, Failure> {
    use keyfab_custody_pkcs11::peer;
    peer::on_all_cores(module, label, BENCH_PASSPHRASE, signatures, |s, keys, i| {
        peer::sign_in_token(s, keys, &keyfab_crypto::hash::sha256(&i.to_be_bytes())).map(drop)
    })
    .map_err(|e| Failure::new(Code::Internal, format!("PKCS#11 signing failed: {e}")))
}

/// Copies the files (not subdirectories) of `from` into a new directory `to`.
fn copy_files(from: &Path, to: &Path) -> Result<(), Failure> {
    let io = |e: std::io::Error| Failure::new(Code::Io, e.to_string());
    std::fs::create_dir_all(to).map_err(io)?;
    for entry in std::fs::read_dir(from).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry.file_type().map_err(io)?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(io)?;
        }
    }
    Ok(())
}

pub(crate) fn temp_or(
    dir: Option<&Path>,
) -> Result<(Option<tempfile::TempDir>, std::path::PathBuf), Failure> {
    match dir {
        Some(d) => Ok((None, d.to_owned())),
        None => {
            let t = tempfile::tempdir().map_err(|e| Failure::new(Code::Io, e.to_string()))?;
            let p = t.path().to_owned();
            Ok((Some(t), p))
        }
    }
}

/// Devices per core the raw crypto limit is measured over: ~0.9 s of work. Measured over
/// 3,000 (~0.1 s) the limit moved between 62k and 70k devices/s from run to run on the
/// same machine, and so did every ratio printed against it.
pub(crate) const RAW_SAMPLE_PER_CORE: usize = 30_000;

/// Devices per core the raw limit is measured over for `kind`: about a second of work
/// (RSA key generation takes tens of milliseconds a key).
fn raw_sample_per_core(kind: keyfab_crypto::devicekey::DeviceKeyType) -> usize {
    use keyfab_crypto::devicekey::DeviceKeyType;
    match kind {
        DeviceKeyType::EcP384 => 4_000,
        DeviceKeyType::Rsa2048 => 30,
        DeviceKeyType::Rsa3072 => 8,
        _ => RAW_SAMPLE_PER_CORE,
    }
}

pub(crate) fn all_cores<F: Fn(usize) -> Result<(), keyfab_crypto::CryptoError> + Sync>(
    per_thread: usize,
    work: F,
) -> Result<f64, Failure> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    let ok = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads).map(|_| s.spawn(|| work(per_thread))).collect();
        hs.into_iter().all(|h| matches!(h.join(), Ok(Ok(()))))
    });
    if !ok {
        return Err(Failure::new(Code::Internal, "benchmark crypto failed"));
    }
    Ok((per_thread * threads) as f64 / start.elapsed().as_secs_f64())
}

/// `keyfab bench provision`: devices/s and latency through decide-and-record.
pub(crate) fn provision(
    _ctx: &Context,
    concurrency: Option<usize>,
    length: LevelLength,
    dir: Option<&Path>,
    token_module: Option<&Path>,
    policy_module: Option<&Path>,
    store: &SiteOption,
) -> Result<Report, Failure> {
    use keyfab_site::provision::Provisioner;
    use std::sync::Arc;
    let (_temp, base) = temp_or(dir)?;
    if token_module.is_some() {
        softhsm_environment(&base)?;
    }
    // `--store etcd`: three real members on loopback, started for the run.
    let etcd = match store.spec.as_str() {
        "etcd" => Some(
            keyfab_harness::etcd::EtcdCluster::start(3, &base.join("etcd"))
                .map_err(|e| Failure::new(Code::Io, e.to_string()))?,
        ),
        _ => None,
    };
    let site_store = etcd.as_ref().map_or(store.spec.clone(), |c| c.store_spec());
    // `--rollback-counter swtpm`: a TPM simulator on loopback, started for the run.
    let tpm = match store.rollback_counter_every {
        Some(_) => Some(
            keyfab_harness::swtpm::Swtpm::start(&base.join("tpm"))
                .map_err(|e| Failure::new(Code::Io, e.to_string()))?,
        ),
        None => None,
    };
    let counter_spec = tpm.as_ref().map(|t| {
        let port = t.tcti().rsplit('=').next().unwrap_or_default().to_owned();
        format!("tpm:swtpm=127.0.0.1:{port}")
    });
    let (ctx, hq, site) =
        bench_world_with(&base, token_module, &site_store, counter_spec.as_deref())?;
    let levels: Vec<usize> = match concurrency {
        Some(c) => vec![c.max(1)],
        None => vec![1, 8, 64],
    };
    // With tokens, keyfab and the baseline then take turns, PEER_ROUNDS times each.
    let peer_rounds = if token_module.is_some() {
        PEER_ROUNDS
    } else {
        0
    };
    // The limit: raw per-device crypto on all cores.
    let signer = keyfab_crypto::sign::SigningKey::generate(&keyfab_crypto::rng::SystemRng)
        .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    let aead = keyfab_crypto::aead::AeadKey::new(&keyfab_crypto::secret::Secret32::new([7; 32]))
        .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    let key_type = keyfab_crypto::devicekey::DeviceKeyType::parse(&store.key_type)
        .filter(|t| *t != keyfab_crypto::devicekey::DeviceKeyType::Aes256)
        .ok_or_else(|| {
            Failure::usage("--key-type: ec-p256, ec-p384, ed25519, rsa-2048 or rsa-3072")
        })?;
    let raw = all_cores(raw_sample_per_core(key_type), |n| {
        keyfab_harness::raw::raw_device_crypto(key_type, n, &signer, &aead)
    })?;

    // A level runs for its time, or until its devices are done. Timed, each has room
    // for twice what the raw crypto could do meanwhile (no level outruns it), and the
    // entitlement's quota for every level.
    let (devices, deadline) = match length {
        LevelLength::Devices(n) => (n, None),
        LevelLength::Seconds(secs) => (
            ((raw * secs * 2.0) as u64).max(1_000),
            Some(std::time::Duration::from_secs_f64(secs)),
        ),
    };
    let total = devices * (levels.len() + peer_rounds) as u64;
    let last_level = levels.last().copied().unwrap_or(64);
    let text = format!(
        "product = \"bench\"\ndevices = {total}\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\n[[keys]]\nname = \"identity\"\ntype = \"{}\"\nsource = \"{}\"\ncertificate = {{ subject = \"CN={{device_id}},O=Bench\", days = 3650 }}\n",
        store.key_type, store.key_source
    );
    // Each entitlement of the run: the policy `text` written as NAME.toml, created at
    // HQ and imported at the site.
    let entitlement = |name: &str, text: &str| -> Result<String, Failure> {
        let policy = base.join(format!("{name}.toml"));
        std::fs::write(&policy, text).map_err(|e| Failure::new(Code::Io, e.to_string()))?;
        let kfe = base.join(format!("{name}.kfe"));
        let created = run::entitlement_create(&ctx, &hq, "bench-site", &policy, &kfe)?;
        run::entitlement_import(&ctx, &site, &kfe)?;
        Ok(created.id)
    };
    let id = entitlement("provision", &text)?;
    // The same policy with the module, or requiring chip attestation: every level runs
    // without it, then with it.
    let chips_policy =
        "\n[chips]\nattestation = \"required\"\nroots = [\"chip-vendor/vendor-root.crt\"]\n";
    let second = match (policy_module, store.chip_attestation) {
        (None, true) => {
            let pool = ChipPool::certify(&ctx, &base.join("chip-vendor"), BENCH_CHIPS)?;
            let id = entitlement("provision-chips", &format!("{text}{chips_policy}"))?;
            Some((id, Second::Attestation(pool)))
        }
        _ => None,
    };
    let code_id = match policy_module {
        Some(module) => {
            let name = module
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Failure::usage("--policy-module needs a file name"))?;
            std::fs::copy(module, base.join(name)).map_err(|e| io_failure(module, e))?;
            let with_code = format!("{text}\n[code]\nmodule = \"{name}\"\n");
            Some(entitlement("provision-code", &with_code)?)
        }
        None => None,
    };
    let second = match (code_id, store.rollback_counter_every) {
        (Some(id), _) => Some((id, Second::Module)),
        (None, Some(every)) => Some((
            entitlement("provision-counter", &text)?,
            Second::RollbackCounter(every),
        )),
        (None, None) => second,
    };

    // More nodes of the same site: copies of its home (keys and store.json).
    let mut homes = vec![site.clone()];
    for n in 1..store.nodes.max(1) {
        let copy = base.join(format!("site-node-{}", n + 1));
        copy_files(&site, &copy)?;
        homes.push(copy);
    }
    let provisioners: Vec<Arc<Provisioner>> = homes
        .iter()
        .map(|h| {
            Ok(Arc::new(Provisioner::start(Arc::new({
                let node = ctx.open(h, NodeKind::Site)?;
                // With a counter advancing beside the engine, its store is shared
                // with that writer, as `site serve` shares it with commands.
                match store.rollback_counter_every {
                    Some(_) => node.hosting(),
                    None => node,
                }
            }))))
        })
        .collect::<Result<_, Failure>>()?;
    let rounds = || -> u64 {
        provisioners
            .iter()
            .map(|p| p.node().store.commits_sent())
            .sum()
    };
    let mut rows = Vec::new();
    let mut text = format!("provisioning benchmark: {} {} key + device certificate, durable commits\nstore: {} ({} node{})\nraw per-device crypto ({} keygen + cert signature + HKDF + AEAD, all cores): {raw:.0} devices/s (limit)\n", if store.key_source == "hq-pool" { "HQ pool" } else { "site-generated" }, store.key_type, if store.spec == "embedded" { "embedded".to_owned() } else { site_store.clone() }, provisioners.len(), if provisioners.len() == 1 { "" } else { "s" }, store.key_type);
    let mut next = 0u64;
    let mut advances: Vec<Advanced> = Vec::new();
    for c in levels {
        let start_index = next;
        next += devices;
        let rounds_before = rounds();
        let cpu_before = crate::bench_cpu::Snapshot::take();
        // With a module, the two entitlements take turns, A B B A, so the store growing
        // during the run weighs on both alike.
        let half = devices / 2;
        let half_time = deadline.map(|d| d / 2);
        let (plain, coded) = match &second {
            Some((second_id, kind)) => {
                let (chips_a, chips_b) = match kind {
                    Second::Module | Second::RollbackCounter(_) => (None, None),
                    Second::Attestation(pool) => {
                        (Some(pool.attesting(false)), Some(pool.attesting(true)))
                    }
                };
                let (a, b) = (chips_a.as_ref(), chips_b.as_ref());
                let first = Span::new(start_index, half, half_time);
                let later = Span::new(start_index + half, devices - half, half_time);
                // The second runs with the counter advancing beside them, if that is
                // what is compared.
                let advancing = || match kind {
                    Second::RollbackCounter(every) => {
                        Some(Advancer::start(provisioners[0].clone(), *every))
                    }
                    _ => None,
                };
                let a1 = run_level(&provisioners, &id, c, first, ("B", a))?;
                let advancer = advancing();
                let b1 = run_level(&provisioners, second_id, c, first, ("C", b))?;
                let b2 = run_level(&provisioners, second_id, c, later, ("C", b))?;
                if let Some(advancer) = advancer {
                    advances.push(advancer.stop()?);
                }
                let a2 = run_level(&provisioners, &id, c, later, ("B", a))?;
                (a1.merge(a2), Some(b1.merge(b2)))
            }
            None => (
                run_level(
                    &provisioners,
                    &id,
                    c,
                    Span::new(start_index, devices, deadline),
                    ("B", None),
                )?,
                None,
            ),
        };
        // What the level's CPU is divided by: the devices it provisioned.
        let done =
            plain.latencies.len() as u64 + coded.as_ref().map_or(0, |c| c.latencies.len() as u64);
        text.push_str(&format!(
            "concurrency {c:>3}: {:>9.0} devices/s  ratio {:.2}  p50 {:.2} ms  p99 {:.2} ms  ({} devices in {:.1} s)\n",
            plain.rate,
            plain.rate / raw,
            plain.p50,
            plain.p99,
            plain.latencies.len(),
            plain.secs
        ));
        let mut row = json!({"concurrency": c, "devices": plain.latencies.len(), "seconds": plain.secs, "devices_per_s": plain.rate, "ratio": plain.rate / raw, "p50_ms": plain.p50, "p99_ms": plain.p99});
        // Where the CPU went: what to shrink, and how much of the cores sat idle.
        let spent = crate::bench_cpu::Snapshot::take().since(&cpu_before, |name| {
            if name.starts_with("keyfab-committe") {
                "committer"
            } else if name.starts_with("keyfab-crypto") {
                "crypto"
            } else if name.starts_with("keyfab-keygen") {
                "keygen"
            } else {
                "other"
            }
        });
        let per_device = |g: &str| spent.of(g) * 1e6 / done as f64;
        text.push_str(&format!(
            "  CPU per device: committer {:.1} µs, crypto workers {:.1} µs, keys made ahead on idle cores {:.1} µs, callers and the rest {:.1} µs{}\n",
            per_device("committer"),
            per_device("crypto"),
            per_device("keygen"),
            per_device("other"),
            spent
                .busy
                .map(|b| format!("; the machine's cores {:.0} % busy", b * 100.0))
                .unwrap_or_default()
        ));
        row["cpu_us_per_device"] = json!({"committer": per_device("committer"), "crypto_workers": per_device("crypto"), "keys_made_ahead": per_device("keygen"), "other": per_device("other")});
        row["cores_busy"] = json!(spent.busy);
        // On the embedded store the whole path is this process: its CPU per device says
        // what the cores could carry if the commit cycle never left them idle — whether a
        // level is bound by the CPU or by waiting. (On etcd the members' CPU counts too.)
        let cpu_per_device: f64 = spent.by_group.iter().map(|(_, s)| s).sum::<f64>() / done as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        if store.spec == "embedded" && cpu_per_device > 0.0 {
            let bound = cores / cpu_per_device;
            text.push_str(&format!(
                "  with every core busy at these costs: ~{bound:.0} devices/s (ratio {:.2})\n",
                bound / raw
            ));
            row["cpu_bound_devices_per_s"] = json!(bound);
        }
        if etcd.is_some() || store.spec.starts_with("etcd://") {
            let per_device = (rounds() - rounds_before) as f64 / done as f64;
            text.push_str(&format!(
                "  consensus rounds: {:.4} per device (one per {:.0} devices; goal: one per 50 or fewer)\n",
                per_device,
                1.0 / per_device.max(1e-9)
            ));
            row["consensus_rounds_per_device"] = json!(per_device);
        }
        if let (Some(with), Some((_, Second::RollbackCounter(every))), Some(adv)) =
            (&coded, &second, advances.last())
        {
            text.push_str(&format!(
                "  with the TPM counter advancing every {} s: {:>9.0} devices/s  {:.2} of without (goal ≥ 0.9)  p99 {:.2} ms (without: {:.2} ms); {} advances, {:.2} ms each\n",
                every.as_secs(),
                with.rate,
                with.rate / plain.rate,
                with.p99,
                plain.p99,
                adv.count,
                adv.mean_ms()
            ));
            row["rollback_counter"] = json!({"devices_per_s": with.rate, "of_without": with.rate / plain.rate, "p50_ms": with.p50, "p99_ms": with.p99, "advances": adv.count, "advance_ms": adv.mean_ms()});
        } else if let (Some(attested), Some((_, Second::Attestation(_)))) = (&coded, &second) {
            text.push_str(&format!(
                "  with chip attestation required: {:>9.0} devices/s  {:.2} of without  p99 {:.2} ms (without: p99 {:.2} ms; both sealed to chips' transport keys)\n",
                attested.rate,
                attested.rate / plain.rate,
                attested.p99,
                plain.p99
            ));
            row["chip_attestation"] = json!({"devices_per_s": attested.rate, "of_without": attested.rate / plain.rate, "p50_ms": attested.p50, "p99_ms": attested.p99});
        } else if let Some(coded) = coded {
            text.push_str(&format!(
                "  with the policy module: {:>9.0} devices/s  {:.2} of without  p99 {:.2} ms  ({} refused by the module)\n",
                coded.rate,
                coded.rate / plain.rate,
                coded.p99,
                coded.refused
            ));
            row["policy_module"] = json!({"devices_per_s": coded.rate, "of_without": coded.rate / plain.rate, "p50_ms": coded.p50, "p99_ms": coded.p99, "refused_by_module": coded.refused});
        }
        rows.push(row);
    }
    let mut json = json!({"raw_device_crypto_per_s": raw, "key_source": store.key_source, "key_type": store.key_type, "levels": rows});
    if let Some(spec) = &counter_spec {
        let rate = tpm_increment_rate(spec, 500)?;
        text.push_str(&format!(
            "TPM simulator's NV counter increments, one after another, each read back: {rate:.0}/s ({:.2} ms each)\n",
            1000.0 / rate
        ));
        json["tpm_increments_per_s"] = json!(rate);
    }
    if let Some(module) = policy_module {
        let (micros, fuel) = module_cost(module, 20_000)?;
        text.push_str(&format!(
            "policy module {}: {micros:.2} µs per evaluation (fresh instance, state read and written; goal ≤ 10), {fuel} fuel\n",
            module.display()
        ));
        json["policy_module"] =
            json!({"module": module, "us_per_evaluation": micros, "fuel": fuel});
    }
    if let Some(module) = token_module {
        let label = bench_token(module, "bench-peer")?;
        let sign_rate = token_sign_rate(module, &label, 4000)?;
        text.push_str(&format!(
            "identity keys of HQ and site in PKCS#11 tokens ({}): per device keyfab does no token operation (the token unwraps each entitlement's data key once, signs checkpoints and exports)\n\
             raw PKCS#11 ECDSA signatures in the token, all cores: {sign_rate:.0}/s\n\
             HSM-centred baseline (device key pair made in the token, wrapped out, certificate signed in the token) against keyfab at concurrency {last_level}, taking turns:\n",
            module.display()
        ));
        // Both rates move by ±10 % between runs on this machine: alternate them and
        // compare medians, so one slow run of either side does not decide the ratio.
        let mut turns = Vec::new();
        for round in 0..PEER_ROUNDS {
            let peer = peer_baseline(module, &label, 3000)?;
            let k = run_level(
                &provisioners,
                &id,
                last_level,
                Span::new(next, devices, deadline),
                ("K", None),
            )?;
            next += devices;
            text.push_str(&format!(
                "  turn {}: keyfab {:.0} devices/s, baseline {peer:.0} devices/s: {:.1}x\n",
                round + 1,
                k.rate,
                k.rate / peer
            ));
            turns.push((k.rate, peer));
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let keyfab_rate = median(turns.iter().map(|t| t.0).collect());
        let peer = median(turns.iter().map(|t| t.1).collect());
        text.push_str(&format!(
            "keyfab / baseline (medians): {:.1}x ({keyfab_rate:.0} / {peer:.0} devices/s)\n",
            keyfab_rate / peer
        ));
        json["pkcs11"] = json!({
            "module": module,
            "token_operations_per_device": 0,
            "raw_token_ecdsa_per_s": sign_rate,
            "turns": turns.iter().map(|(k, p)| json!({"keyfab_devices_per_s": k, "peer_baseline_devices_per_s": p})).collect::<Vec<_>>(),
            "peer_baseline_devices_per_s": peer,
            "keyfab_devices_per_s": keyfab_rate,
            "keyfab_over_baseline": keyfab_rate / peer,
        });
    }
    Ok(Report::new(text, json))
}

/// How many times keyfab and the PKCS#11 baseline take turns.
const PEER_ROUNDS: usize = 3;

/// Where the benchmarked site keeps its state, and how many nodes share it.
/// How the benchmark's site is set up.
pub(crate) struct SiteOption {
    /// Its store: `embedded`, `etcd` (three members started for the run), or `etcd://…`.
    pub spec: String,
    /// Nodes sharing that store.
    pub nodes: usize,
    /// Where device keys come from: `site` (generated per device) or `hq-pool` (made by
    /// HQ, imported, taken slot by slot).
    pub key_source: String,
    /// The device key's type (`ec-p256`, `ec-p384`, `ed25519`, `rsa-2048`, `rsa-3072`).
    pub key_type: String,
    /// Also run an entitlement that requires chip attestation, in turns with one
    /// without, both with chips' transport keys.
    pub chip_attestation: bool,
    /// Bind the site to a counter in a TPM simulator, and run each level also with it
    /// advancing this often, in turns with runs without.
    pub rollback_counter_every: Option<std::time::Duration>,
}

/// How many simulated chips `bench provision --chip-attestation` certifies: requests
/// take them in turn (the bench policy does not bind a device id to a chip), so the
/// vendor's work before the run stays small whatever the number of devices.
const BENCH_CHIPS: usize = 2048;

/// The chips requests of a level carry: each a transport key and its vendor chain;
/// the chain sent only when `attest`.
#[derive(Clone)]
struct ChipPool {
    chips: std::sync::Arc<Vec<(keyfab_crypto::hpke::HpkePublicKey, Vec<Vec<u8>>)>>,
    attest: bool,
}

impl ChipPool {
    /// `count` chips certified by a new drill vendor in `dir`.
    fn certify(ctx: &Context, dir: &Path, count: usize) -> Result<Self, Failure> {
        let fail = |e: &dyn std::fmt::Display| Failure::new(Code::Internal, e.to_string());
        run::init_chip_vendor(ctx, dir, "CN=Bench Chips Root")?;
        let vendor = keyfab_station::chip_vendor::ChipVendor::open(dir).map_err(|e| fail(&e))?;
        let now = ctx.now()?;
        let chips = (0..count)
            .map(|n| {
                let key =
                    keyfab_crypto::hpke::HpkeSecretKey::generate(&keyfab_crypto::rng::SystemRng)
                        .public_key()
                        .map_err(|e| fail(&e))?;
                let chain = vendor
                    .chain_of(
                        &format!("CHIP-{n}"),
                        key.sec1(),
                        &keyfab_crypto::rng::SystemRng,
                        now,
                    )
                    .map_err(|e| fail(&e))?;
                Ok((key, chain))
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        Ok(Self {
            chips: std::sync::Arc::new(chips),
            attest: false,
        })
    }

    /// The same chips, their chains sent or not.
    fn attesting(&self, attest: bool) -> Self {
        Self {
            chips: self.chips.clone(),
            attest,
        }
    }

    /// Puts chip `i`'s transport key (and chain, when attesting) in `req`.
    fn give(&self, i: u64, req: &mut keyfab_site::provision::ProvisionRequest) {
        let n = self.chips.len().max(1);
        if let Some((key, chain)) = self.chips.get((i % n as u64) as usize) {
            req.transport_key = Some(key.clone());
            req.chip_chain = self.attest.then(|| chain.clone());
        }
    }
}

/// What the second entitlement of each level adds.
enum Second {
    /// A policy module.
    Module,
    /// The same entitlement, with the site's TPM counter advancing this often.
    RollbackCounter(std::time::Duration),
    /// `[chips]` attestation required (both entitlements' requests carry chips).
    Attestation(ChipPool),
}

fn io_failure(path: &Path, e: std::io::Error) -> Failure {
    Failure::new(Code::Io, format!("{}: {e}", path.display()))
}

/// One concurrency level's figures.
struct Level {
    rate: f64,
    p50: f64,
    p99: f64,
    /// Requests the policy module refused (they still went through decide-and-record).
    refused: u64,
    secs: f64,
    /// Sorted, in ms.
    latencies: Vec<f64>,
}

impl Level {
    fn new(mut latencies: Vec<f64>, secs: f64, refused: u64) -> Self {
        latencies.sort_by(|a, b| a.total_cmp(b));
        let pct = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        Self {
            rate: latencies.len() as f64 / secs,
            p50: pct(0.50),
            p99: pct(0.99),
            refused,
            secs,
            latencies,
        }
    }

    /// Two runs of the same entitlement as one.
    fn merge(self, other: Level) -> Level {
        let mut all = self.latencies;
        all.extend(other.latencies);
        Level::new(all, self.secs + other.secs, self.refused + other.refused)
    }
}

/// How long each concurrency level of `bench provision` runs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LevelLength {
    /// This many devices.
    Devices(u64),
    /// This many seconds: callers send no new request after it.
    Seconds(f64),
}

/// The devices one run of a level may use — indices `start..start + devices` — and the
/// time after which no new request is sent.
#[derive(Clone, Copy)]
struct Span {
    start: u64,
    devices: u64,
    deadline: Option<std::time::Duration>,
}

impl Span {
    fn new(start: u64, devices: u64, deadline: Option<std::time::Duration>) -> Self {
        Self {
            start,
            devices,
            deadline,
        }
    }
}

/// Provisions the devices of `span` (all of them, or as many as its time allows) of
/// `entitlement` with `c` requests in flight.
fn run_level(
    provisioners: &[std::sync::Arc<keyfab_site::provision::Provisioner>],
    entitlement: &str,
    c: usize,
    span: Span,
    (prefix, chips): (&str, Option<&ChipPool>),
) -> Result<Level, Failure> {
    use keyfab_site::provision::ProvisionRequest;
    let started = Instant::now();
    // The callers are `c` tasks on one runtime thread, as a served node's connections
    // are: `c` requests in flight without `c` threads to switch between.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    let (start_index, devices) = (span.start, span.devices);
    let in_time = move || span.deadline.is_none_or(|d| started.elapsed() < d);
    let (results, sent): (Vec<(f64, bool)>, u64) = runtime.block_on(async {
        let tasks: Vec<_> = (0..c)
            .map(|t| {
                // Callers spread over the nodes, as stations over their URLs.
                let p = provisioners[t % provisioners.len()].clone();
                let id = entitlement.to_owned();
                let prefix = prefix.to_owned();
                let chips = chips.cloned();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut sent = 0u64;
                    let mut i = start_index + t as u64;
                    while i < start_index + devices && in_time() {
                        sent += 1;
                        let t0 = Instant::now();
                        let r = match ProvisionRequest::parse(
                            &id,
                            format!("{prefix}-{i:09}"),
                            format!("{prefix}-{i}"),
                        ) {
                            Ok(mut req) => {
                                if let Some(chips) = &chips {
                                    chips.give(i, &mut req);
                                }
                                p.provision_async(req).await
                            }
                            Err(e) => Err(e),
                        };
                        let decided = match &r {
                            Ok(_) => Some(false),
                            Err(e) if e.code() == keyfab_node::Code::PolicyDenied => Some(true),
                            Err(_) => None,
                        };
                        if let Some(refused) = decided {
                            lat.push((t0.elapsed().as_secs_f64() * 1000.0, refused));
                        }
                        i += c as u64;
                    }
                    (lat, sent)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut sent = 0;
        for t in tasks {
            let (lat, n) = t.await.unwrap_or_default();
            all.extend(lat);
            sent += n;
        }
        (all, sent)
    });
    let secs = started.elapsed().as_secs_f64();
    if sent == 0 {
        return Err(Failure::usage(
            "the level sent no request: give it more time (--seconds) or devices (--devices)",
        ));
    }
    if results.len() as u64 != sent {
        return Err(Failure::new(
            Code::Internal,
            format!("only {} of {sent} requests were decided", results.len()),
        ));
    }
    let refused = results.iter().filter(|(_, r)| *r).count() as u64;
    let latencies: Vec<f64> = results.into_iter().map(|(l, _)| l).collect();
    Ok(Level::new(latencies, secs, refused))
}

/// µs per evaluation of `module` on one thread, as decide-and-record runs it (a fresh
/// instance, the entitlement's state in and out), and the fuel one evaluation used.
fn module_cost(module: &Path, evaluations: u32) -> Result<(f64, u64), Failure> {
    let bytes = std::fs::read(module).map_err(|e| io_failure(module, e))?;
    let wasm = keyfab_policy_code::module_bytes(module, bytes)
        .map_err(|e| Failure::new(Code::Malformed, e.to_string()))?;
    let loaded = keyfab_policy_code::PolicyModule::load(&wasm)
        .map_err(|e| Failure::new(Code::Malformed, e.to_string()))?;
    let mut state = keyfab_policy_code::ModuleState::default();
    let request = keyfab_policy_code::Request {
        device_id: "B-000000001",
        station: Some("line-1"),
        facts: keyfab_policy_code::Facts {
            now: 1_800_000_000,
            local_day: 20_833,
            local_second: 36_000,
            ..Default::default()
        },
    };
    let mut fuel = 0;
    let started = Instant::now();
    for _ in 0..evaluations {
        fuel = loaded.evaluate(&request, &mut state).fuel_used;
    }
    let micros = started.elapsed().as_secs_f64() * 1e6 / f64::from(evaluations);
    Ok((micros, fuel))
}

fn child(ctx: &Context, args: &[&str]) -> Result<(serde_json::Value, f64), Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::new(Code::Io, e.to_string()))?;
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
        .map_err(|e| Failure::new(Code::Io, e.to_string()))?;
    let secs = start.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Failure::new(Code::Internal, format!("bench child output: {e}")))?;
    if !out.status.success() {
        return Err(Failure::new(
            Code::Internal,
            format!("bench step {args:?} failed: {v}"),
        ));
    }
    Ok((v, secs))
}

pub(crate) fn entitlement(
    _ctx: &Context,
    devices: u64,
    dir: Option<&Path>,
) -> Result<Report, Failure> {
    let (_temp, base) = temp_or(dir)?;
    let (ctx, hq, site) = bench_world(&base)?;
    let policy = base.join("policy.toml");
    let text = format!(
        "product = \"bench\"\ndevices = {devices}\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\n[[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"hq-pool\"\n"
    );
    std::fs::write(&policy, text).map_err(|e| Failure::new(Code::Io, e.to_string()))?;

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

/// `keyfab bench audit`: HQ imports (verifies and reconciles) an N-record bundle.
pub(crate) fn audit(records: u64, random_ids: bool, dir: Option<&Path>) -> Result<Report, Failure> {
    use keyfab_audit::{AuditedKey, Event, Head, Record};
    let (_temp, base) = temp_or(dir)?;
    let (ctx, hq, site) = bench_world(&base)?;
    let n = records.max(2);
    let policy = base.join("audit.toml");
    let text = format!(
        "product = \"bench\"\ndevices = {n}\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\n[[keys]]\nname = \"k\"\ntype = \"ed25519\"\nsource = \"site\"\n"
    );
    std::fs::write(&policy, text).map_err(|e| Failure::new(Code::Io, e.to_string()))?;
    let kfe = base.join("audit.kfe");
    let created = run::entitlement_create(&ctx, &hq, "bench-site", &policy, &kfe)?;
    let id = created.id;
    run::entitlement_import(&ctx, &site, &kfe)?;

    // The site's log: the import, then n-1 releases, all the policy allows.
    let node = ctx.open(&site, NodeKind::Site)?;
    let now = node.now().0;
    let record = |head: &Head, i: u64| -> Record {
        let event = if i == 0 {
            Event::EntitlementImported {
                entitlement: id.clone(),
                sequence: 1,
                pool_keys: 0,
            }
        } else {
            Event::ProvisionAllowed {
                entitlement: id.clone(),
                request_id: format!("r{i}"),
                device_id: if random_ids {
                    keyfab_crypto::hash::sha256(&i.to_be_bytes())[..8]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect()
                } else {
                    format!("B-{i:09}")
                },
                station: None,
                pool_index: None,
                keys: vec![AuditedKey {
                    name: "k".into(),
                    key_id: format!("spki-sha256:{:064x}", i),
                    cert_serial: None,
                    certificate: None,
                }],
            }
        };
        head.next(now, "bench-site", event)
    };
    // Pass 1: the checkpoint (and the raw rate of the SHA-256 chain it needs).
    let mut frontier = keyfab_audit::merkle::Frontier::default();
    let mut head = Head::genesis();
    let mut bytes_total = 0u64;
    let mut hash_secs = 0.0;
    for i in 0..n {
        let r = record(&head, i);
        let bytes = r.to_bytes();
        let t = Instant::now();
        let leaf = keyfab_audit::merkle::leaf_hash(&bytes);
        hash_secs += t.elapsed().as_secs_f64();
        bytes_total += bytes.len() as u64;
        frontier.push(leaf);
        head = Head {
            sequence: r.sequence,
            hash: leaf,
            time: now,
        };
    }
    let sha_rate = n as f64 / hash_secs.max(1e-9);
    let to = keyfab_formats::checkpoint::TreeHead {
        size: n,
        root: frontier.root(),
    };
    let hqr = keyfab_site::entitlements::hq_recipient(&node)?
        .ok_or_else(|| Failure::new(Code::Internal, "no HQ recipient"))?;
    let point = keyfab_crypto::x509::cert_facts(&hqr.hpke_cert)
        .ok()
        .and_then(|f| f.public_point)
        .ok_or_else(|| Failure::new(Code::Internal, "HQ key"))?;
    let fields = keyfab_formats::audit_bundle::BundleFields {
        id: "b".repeat(32),
        site: "bench-site".into(),
        hq: hqr.hq.clone(),
        hq_cluster: keyfab_crypto::hash::Fingerprint::of(&hqr.cluster_cert),
        recipient: keyfab_crypto::hpke::HpkePublicKey::from_sec1(&point)
            .map_err(|e| Failure::new(Code::Internal, e.to_string()))?,
        from: keyfab_formats::checkpoint::TreeHead {
            size: 0,
            root: keyfab_audit::merkle::root(&[]),
        },
        to,
        checkpoint_time: now,
        consistency: Vec::new(),
        created_at: keyfab_crypto::time::UnixTime(now),
    };
    // Pass 2: the same records, streamed into the bundle.
    let mut head = Head::genesis();
    let mut i = 0u64;
    let mut iter = std::iter::from_fn(|| {
        if i >= n {
            return None;
        }
        let r = record(&head, i);
        let bytes = r.to_bytes();
        head = Head {
            sequence: r.sequence,
            hash: keyfab_audit::merkle::leaf_hash(&bytes),
            time: now,
        };
        i += 1;
        Some(Ok(bytes))
    });
    let kfa = base.join("bench.kfa");
    keyfab_site::export::write_bundle_file(&node, &kfa, &fields, &mut iter)
        .map_err(keyfab_node::Error::from)?;
    drop(node);
    if dir.is_some() {
        // A kept directory also keeps HQ as it was before the import, so the import can be
        // run again (under a profiler, say) on a copy.
        copy_files(&hq, &base.join("hq-before-import"))?;
    }

    let s = |p: &Path| p.display().to_string();
    let (imported, secs) = child(
        &ctx,
        &["hq", "audit", "import", "--home", &s(&hq), &s(&kfa)],
    )?;
    let rate = n as f64 / secs;
    let rss = imported["peak_rss_bytes"].as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0);
    let violations = imported["violations"].as_array().map_or(0, Vec::len);
    let text = format!(
        "audit import benchmark: {n} records ({:.0} bytes each), one bundle, {} device ids\n\
         SHA-256 chain alone (one core):     {sha_rate:>12.0} records/s   (limit)\n\
         hq audit import (verify+reconcile): {rate:>12.0} records/s   ratio {:.2}   {secs:.2} s   peak RSS {rss:.0} MiB   violations {violations}",
        bytes_total as f64 / n as f64,
        if random_ids { "random" } else { "serial" },
        rate / sha_rate
    );
    Ok(Report::new(
        text,
        json!({"records": n, "device_ids": if random_ids { "random" } else { "serial" }, "seconds": secs, "records_per_s": rate, "sha256_chain_per_s": sha_rate, "ratio": rate / sha_rate, "peak_rss_bytes": imported["peak_rss_bytes"], "violations": violations}),
    ))
}

/// A thread that advances the site's TPM counter every `every` while a run goes on, as
/// a serving site does (`site serve --rollback-counter-every`).
struct Advancer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<Advanced, keyfab_node::Error>>,
}

/// The advances one run saw, and the time they took.
#[derive(Default)]
struct Advanced {
    count: u64,
    total: std::time::Duration,
}

impl Advanced {
    fn mean_ms(&self) -> f64 {
        self.total.as_secs_f64() * 1000.0 / self.count.max(1) as f64
    }
}

impl Advancer {
    fn start(
        provisioner: std::sync::Arc<keyfab_site::provision::Provisioner>,
        every: std::time::Duration,
    ) -> Advancer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut done = Advanced::default();
            let mut next = Instant::now() + every;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if Instant::now() < next {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                let t0 = Instant::now();
                keyfab_site::rollback_counter::advance(provisioner.node())?;
                done.total += t0.elapsed();
                done.count += 1;
                next = Instant::now() + every;
            }
            Ok(done)
        });
        Advancer { stop, thread }
    }

    fn stop(self) -> Result<Advanced, Failure> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.join() {
            Ok(done) => Ok(done?),
            Err(_) => Err(Failure::new(Code::Internal, "the counter's thread failed")),
        }
    }
}

/// Increments per second of a counter of its own in the TPM at `spec`, one after
/// another: the TPM's NV write rate, the bound on how often a site could advance.
fn tpm_increment_rate(spec: &str, n: u32) -> Result<f64, Failure> {
    let spec: keyfab_tpm::CounterSpec = format!("{spec},index=0x01000bbb")
        .parse()
        .map_err(|e: keyfab_tpm::TpmError| Failure::new(Code::Internal, e.to_string()))?;
    let fail = |e: keyfab_tpm::TpmError| Failure::new(Code::TpmUnavailable, e.to_string());
    let (mut counter, _) = keyfab_tpm::Counter::define(&spec, &[0x5a; 32]).map_err(fail)?;
    let t0 = Instant::now();
    for _ in 0..n {
        counter.increment().map_err(fail)?;
    }
    Ok(f64::from(n) / t0.elapsed().as_secs_f64())
}
