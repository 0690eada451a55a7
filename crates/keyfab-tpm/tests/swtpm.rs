//! The counter against a real TPM 2.0 simulator (`swtpm`) on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_harness::swtpm::Swtpm;
use keyfab_tpm::{Counter, CounterSpec, TpmError};

fn spec(tpm: &Swtpm, index: &str) -> CounterSpec {
    let port = tpm.tcti().rsplit('=').next().unwrap().to_owned();
    format!("tpm:swtpm=127.0.0.1:{port},index={index}")
        .parse()
        .unwrap()
}

/// Defined once, with the site's authorization: it steps up by one, survives a restart
/// of the TPM (its state file), is refused to another authorization and to a second
/// definition, and an older copy of the TPM's state answers lower.
#[test]
fn a_counter_steps_up_survives_a_restart_and_answers_only_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let mut tpm = Swtpm::start(&dir.path().join("tpm")).unwrap();
    let spec = spec(&tpm, "0x01000020");
    let auth = [7u8; 32];
    let (mut counter, first) = Counter::define(&spec, &auth).unwrap();
    assert_eq!(counter.read().unwrap(), first);
    assert!(matches!(
        Counter::define(&spec, &auth),
        Err(TpmError::AlreadyDefined(0x0100_0020))
    ));
    // A copy of the TPM's state as it is now: an "older TPM" later.
    let older = dir.path().join("older");
    copy_dir(tpm.state_dir(), &older);
    for step in 1..=5 {
        assert_eq!(counter.increment().unwrap(), first + step);
    }
    drop(counter);

    tpm.restart().unwrap();
    let mut counter = Counter::open(&spec, &auth).unwrap();
    assert_eq!(
        counter.read().unwrap(),
        first + 5,
        "the value survives a restart"
    );
    assert!(matches!(
        Counter::open(&spec, &[8u8; 32]),
        Err(TpmError::AuthRefused)
    ));
    // Refused authorizations do not lock the TPM out: ours still works.
    for _ in 0..5 {
        let _ = Counter::open(&spec, &[9u8; 32]);
    }
    assert_eq!(counter.increment().unwrap(), first + 6);
    let elsewhere = spec.to_string().replace("0x01000020", "0x01000021");
    assert!(matches!(
        Counter::open(&elsewhere.parse().unwrap(), &auth),
        Err(TpmError::Undefined(0x0100_0021))
    ));
    drop(counter);

    // The TPM started on the older copy of its state answers the older value.
    tpm.stop();
    std::fs::remove_dir_all(tpm.state_dir()).unwrap();
    copy_dir(&older, tpm.state_dir());
    tpm.restart().unwrap();
    let mut counter = Counter::open(&spec, &auth).unwrap();
    assert_eq!(counter.read().unwrap(), first);

    // No TPM there at all.
    tpm.stop();
    assert!(matches!(
        Counter::open(&spec, &auth),
        Err(TpmError::Unreachable(..))
    ));
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
