//! The edges a hostile or hurried user reaches: request ids of another station, ids of
//! any size, exports that fail half-way, files of any size, homes other users can read,
//! a modified keystore, a reader that goes away. Each test names what it pins.

use crate::common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// An entitlement of 100 devices without a daily limit, imported at `w`'s site: its id.
fn open_entitlement(w: &World) -> String {
    imported(
        w,
        "product = \"p\"\ndevices = 100\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2030-01-01T00:00:00Z\"\n\
         [[keys]]\nname = \"identity\"\ntype = \"ec-p256\"\nsource = \"site\"\ncertificate = { subject = \"CN={device_id}\", days = 30 }\n",
        "open",
    )
}

/// Records in the site's log, as `site audit verify` counts them.
fn records(site: &Path) -> u64 {
    ok(&["site", "audit", "verify", "--home", &s(site)])["records"]
        .as_u64()
        .unwrap()
}

/// `site provision --request-id` is scoped like a station's: the local "station" is the
/// `--station` name (none when absent). A retry from another name gets no keys.
#[test]
fn a_local_request_id_is_answered_only_to_the_station_that_made_it() {
    let w = world();
    let (kfe, id) = create(&w, "shenzhen-1", 10, "e.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let first = provision(
        &w,
        &id,
        "L-1",
        &["--station", "line-1", "--request-id", "r-1"],
        None,
    );
    assert_eq!(first.code, 0, "{}", first.json);
    let before = records(&w.site);
    for other in [&["--station", "line-2"][..], &[]] {
        let mut args = vec!["--request-id", "r-1"];
        args.extend_from_slice(other);
        let stolen = provision(&w, &id, "L-1", &args, None);
        stolen.assert_error(3, "station_not_allowed", "made by another station");
        assert!(stolen.json.get("keys").is_none(), "{}", stolen.json);
    }
    // Both attempts are audited; the owner's retry still gets its answer.
    assert_eq!(records(&w.site), before + 2);
    let again = provision(
        &w,
        &id,
        "L-1",
        &["--station", "line-1", "--request-id", "r-1"],
        None,
    );
    assert_eq!(again.code, 0, "{}", again.json);
    assert_eq!(again.json["replayed"], true);
    assert_eq!(again.json["keys"], first.json["keys"]);
}

/// An id of 65 kB (or with a space, or not ASCII) is refused `invalid_input` before any
/// decision: no record, nothing consumed — and so nothing the export cannot carry.
#[test]
fn ids_of_any_size_are_refused_before_any_decision_and_the_export_still_reaches_hq() {
    let w = world();
    let (kfe, id) = create(&w, "shenzhen-1", 10, "e.kfe");
    assert_eq!(import(&w.site, &kfe, None).code, 0);
    let before = records(&w.site);
    let huge = "D".repeat(65_000);
    for (device, request) in [
        (huge.as_str(), "r-1"),
        ("with space", "r-2"),
        ("DÉVICE", "r-3"),
        ("D-1", "r 4"),
        ("D-1", &*"r".repeat(129)),
    ] {
        let out = provision(&w, &id, device, &["--request-id", request], None);
        out.assert_error(1, "invalid_input", "printable ASCII");
        assert!(out.json["error"]["message"].as_str().unwrap().len() < 300);
    }
    let out = provision(&w, &id, "D-1", &["--station", &"s".repeat(65)], None);
    out.assert_error(1, "invalid_input", "name");
    assert_eq!(records(&w.site), before, "a refused id left a record");
    assert_eq!(provision(&w, &id, "D-1", &[], None).code, 0);
    hq_finds_no_violations(&w, "after.kfa");
}

/// An export whose file cannot be written moves nothing: a missing directory is refused
/// before anything is recorded; a write that fails after the export was recorded is
/// written again — same bundle id, same records — by the same command once it can be.
/// HQ imports every later export without a gap.
#[test]
fn an_export_that_fails_moves_nothing_and_the_same_command_again_reaches_hq() {
    let w = world();
    let id = open_entitlement(&w);
    assert_eq!(provision(&w, &id, "E-1", &[], None).code, 0);
    let export_to = |out: &Path| try_export(&w.site, out);
    let before = records(&w.site);
    let missing = w.path("no-such-dir").join("a.kfa");
    export_to(&missing).assert_error(1, "invalid_input", "does not exist");
    assert_eq!(records(&w.site), before, "a refused export was recorded");

    // The write itself fails (its temporary file's name is taken by a directory).
    let out = w.path("a.kfa");
    let blocker = w.path(".a.kfa.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let failed = export_to(&out);
    failed.assert_error(1, "io", "run the same command again");
    assert!(!out.exists());
    std::fs::remove_dir(&blocker).unwrap();
    // More happens meanwhile; the same command writes the unfinished export's records.
    assert_eq!(provision(&w, &id, "E-2", &[], None).code, 0);
    let again = export_to(&out);
    assert_eq!(again.code, 0, "{}", again.json);
    assert_eq!(again.json["written_again"], true, "{}", again.json);
    assert_eq!(again.json["to"], before, "{}", again.json);
    ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&out)]);
    // The next export moves on from there, and HQ takes it: no gap.
    let next = export(&w, "b.kfa");
    ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&next)]);
    let report = ok(&["hq", "report", "--home", &s(&w.hq)]);
    assert_eq!(report["violations"], serde_json::json!([]));
    assert_eq!(report["entitlements"][0]["released"], 2, "{report}");
}

/// Inputs are read in bounded memory: a file far beyond its format's cap, and an endless
/// device, are refused `malformed` (exit 4) after at most cap + 1 bytes.
#[test]
fn files_of_any_size_are_refused_in_bounded_memory() {
    let w = world();
    let big = w.path("big");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(10 << 30).unwrap(); // 10 GiB, sparse
    let home = |h: &Path| s(h);
    for input in [s(&big), "/dev/zero".to_owned()] {
        let cases: Vec<Vec<String>> = vec![
            vec![
                "hq".into(),
                "site".into(),
                "add".into(),
                "--home".into(),
                home(&w.hq),
                input.clone(),
            ],
            vec![
                "site".into(),
                "receipt".into(),
                "import".into(),
                "--home".into(),
                home(&w.site),
                input.clone(),
            ],
            vec![
                "site".into(),
                "approval".into(),
                "submit".into(),
                "--home".into(),
                home(&w.site),
                input.clone(),
            ],
        ];
        for args in cases {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = keyfab(&args, None);
            out.assert_error(4, "malformed", "size cap");
        }
    }
}

/// A home and its files are private to their user whatever the umask; a home others can
/// enter is refused, with the command that closes it.
#[test]
fn homes_are_private_and_an_open_one_is_refused() {
    let w = world();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for home in [&w.site, &w.hq, &w.root] {
        assert_eq!(mode(home), 0o700, "{}", home.display());
        for f in std::fs::read_dir(home).unwrap() {
            let f = f.unwrap().path();
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }
    std::fs::set_permissions(&w.site, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = keyfab(
        &["site", "entitlement", "list", "--home", &s(&w.site)],
        None,
    );
    out.assert_error(1, "insecure_home", "chmod -R go=");
    std::fs::set_permissions(&w.site, std::fs::Permissions::from_mode(0o700)).unwrap();
    ok(&["site", "entitlement", "list", "--home", &s(&w.site)]);
}

/// A keystore whose Argon2 parameters were changed is `locked` (FORMATS.md §9), as a
/// wrong passphrase is; a policy that is not UTF-8 is an `invalid_policy`.
#[test]
fn a_modified_keystore_is_locked_and_a_binary_policy_is_invalid() {
    let w = world();
    // The root CA's keystore: software in every run (a site's identity keys may be in
    // a token, with no keystore file).
    let keystore = w.root.join(keyfab_node::KEYSTORE_FILE);
    let mut bytes = std::fs::read(&keystore).unwrap();
    bytes[5..9].copy_from_slice(&1u32.to_be_bytes()); // Argon2 memory: 1 KiB
    std::fs::write(&keystore, &bytes).unwrap();
    let csr = s(&w.site.join(keyfab_node::CSR_FILE));
    let out = keyfab(
        &[
            "pki",
            "issue",
            "--home",
            &s(&w.root),
            "--csr",
            &csr,
            "--role",
            "site",
            "--out",
            &s(&w.path("again.crt")),
        ],
        None,
    );
    out.assert_error(1, "locked", "modified");

    let policy = w.path("binary.toml");
    std::fs::write(&policy, b"product = \"\xff\xfe\"\n").unwrap();
    let out = try_create(&w, "shenzhen-1", &policy, &w.path("x.kfe"));
    out.assert_error(1, "invalid_policy", "not UTF-8");
}

/// A reader that goes away (`keyfab … --json | head -c 10`) ends the process quietly:
/// no panic, no backtrace, the command's own exit code.
#[test]
fn a_closed_standard_output_ends_the_process_quietly() {
    let w = world();
    for _ in 0..3 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyfab"))
            .args([
                "--json",
                "site",
                "entitlement",
                "list",
                "--home",
                &s(&w.site),
            ])
            .env("KEYFAB_PASSPHRASE", PASS)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader goes away before anything is written
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    }
}

/// One command run with the clock years ahead (`KEYFAB_NOW`, or a clock set wrong) —
/// refused or not — does not move the site's trusted time there: it is refused
/// `clock_ahead` and audited at the trusted time, and the site goes on with the right
/// clock. A clock setting can still be changed, and a smaller bound refuses smaller jumps.
#[test]
fn a_clock_years_ahead_is_refused_and_does_not_stop_the_site() {
    let w = world();
    let id = open_entitlement(&w);
    assert_eq!(provision(&w, &id, "T-1", &[], None).code, 0);
    let before = records(&w.site);
    let ahead = Some("2099-01-01T00:00:00Z");
    for device in ["T-2", "BAD,ID"] {
        provision(&w, &id, device, &[], ahead).assert_error(
            3,
            "clock_ahead",
            "the clock says 2099-01-01T00:00:00Z",
        );
    }
    let home = s(&w.site);
    let out = s(&w.path("ahead.kfa"));
    keyfab(
        &["site", "audit", "export", "--home", &home, "--out", &out],
        ahead,
    )
    .assert_error(3, "clock_ahead", "--clock-max-jump");
    let set = keyfab(
        &[
            "site",
            "config",
            "--home",
            &home,
            "--clock-tolerance",
            "600",
        ],
        ahead,
    );
    assert_eq!(set.code, 0, "{}", set.json);
    // Three refusals and the setting, each recorded; the trusted time did not move.
    assert_eq!(records(&w.site), before + 4);
    assert_eq!(provision(&w, &id, "T-3", &[], None).code, 0);

    ok(&["site", "config", "--home", &home, "--clock-max-jump", "60"]);
    let in_ten_minutes = (jiff::Timestamp::now() + jiff::SignedDuration::from_mins(10)).to_string();
    provision(&w, &id, "T-4", &[], Some(&in_ten_minutes)).assert_error(
        3,
        "clock_ahead",
        "more than 60 s past",
    );
    let report = hq_finds_no_violations(&w, "clock.kfa");
    assert_eq!(report["entitlements"][0]["released"], 2, "{report}");
}

/// A trusted time that followed a clock gone ahead (the jump was allowed) makes every
/// later decision `clock_rollback`; HQ's signed reset brings it back to HQ's time —
/// once, only while no device received keys since the export HQ saw, and HQ accepts in
/// the site's log only the resets it issued.
#[test]
fn a_trusted_time_gone_ahead_comes_back_by_a_reset_hq_signs_and_only_that_way() {
    let w = world();
    let id = open_entitlement(&w);
    let home = s(&w.site);
    ok(&[
        "site",
        "config",
        "--home",
        &home,
        "--clock-max-jump",
        "100000000",
    ]);
    let ahead = Some("2029-06-01T00:00:00Z");
    assert_eq!(provision(&w, &id, "T-1", &[], ahead).code, 0);
    provision(&w, &id, "T-2", &[], None).assert_error(3, "clock_rollback", "2029-06-01");
    let seen = export(&w, "ahead.kfa");
    ok(&["hq", "audit", "import", "--home", &s(&w.hq), &s(&seen)]);
    // An HQ that never issues the reset, to see how it takes a log that carries one.
    let other_hq = w.path("other-hq");
    copy_home(&w.hq, &other_hq);

    let reset = w.path("reset.kfk");
    let reset_clock = |out: &Path, now: Option<&str>| {
        keyfab(
            &[
                "hq",
                "site",
                "reset-clock",
                "--home",
                &s(&w.hq),
                "--site",
                "shenzhen-1",
                "--out",
                &s(out),
            ],
            now,
        )
    };
    let issued = reset_clock(&reset, None);
    assert_eq!(issued.code, 0, "{}", issued.json);
    reset_clock(&reset, None).assert_error(1, "invalid_input", "exists");
    // Refused meanwhile: recorded, no key released — the reset still applies.
    provision(&w, &id, "T-2", &[], None).assert_error(3, "clock_rollback", "2029-06-01");
    let import_reset = |file: &Path| {
        keyfab(
            &["site", "receipt", "import", "--home", &home, &s(file)],
            None,
        )
    };
    let imported = import_reset(&reset);
    assert_eq!(imported.code, 0, "{}", imported.json);
    assert_eq!(
        imported.json["clock_reset"]["from"], "2029-06-01T00:00:00Z",
        "{}",
        imported.json
    );
    assert_eq!(provision(&w, &id, "T-2", &[], None).code, 0);
    import_reset(&reset).assert_error(4, "replayed", "not newer");
    // A reset issued now acknowledges the same export, and T-2 received keys since.
    // (Issued a minute on: within the same second it would be refused as not newer.)
    let late = w.path("late.kfk");
    let a_minute_on = (jiff::Timestamp::now() + jiff::SignedDuration::from_mins(1)).to_string();
    assert_eq!(reset_clock(&late, Some(&a_minute_on)).code, 0);
    import_reset(&late).assert_error(4, "replayed", "received keys after");
    // HQ keeps what it issued.
    let sites = ok(&["hq", "site", "list", "--home", &s(&w.hq)]);
    assert_eq!(
        sites["sites"][0]["clock_resets"].as_array().unwrap().len(),
        2,
        "{sites}"
    );
    ok(&["site", "audit", "verify", "--home", &home]);

    let report = hq_finds_no_violations(&w, "after.kfa");
    assert_eq!(report["entitlements"][0]["released"], 2, "{report}");
    let after = w.path("after.kfa");
    let elsewhere = ok(&["hq", "audit", "import", "--home", &s(&other_hq), &s(&after)]);
    let kinds: Vec<_> = elsewhere["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["clock_reset_not_issued"], "{elsewhere}");
}
