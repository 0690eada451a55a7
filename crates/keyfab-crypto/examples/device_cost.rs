//! Prints the single-thread cost of each step of provisioning one device, so changes to
//! the hot path can be measured: `cargo run --release -p keyfab-crypto --example device_cost`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a measurement run by hand: a failure stops it"
)]
use keyfab_crypto::devicekey::{generate_expanded, DeviceKeyType};
use keyfab_crypto::rng::SystemRng;
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Validity};
use std::time::Instant;

fn time<T>(what: &str, n: u32, mut f: impl FnMut() -> T) {
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(f());
    }
    println!(
        "{what:<40} {:>8.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );
}

fn main() {
    let rng = SystemRng;
    let ca = SigningKey::generate(&rng).unwrap();
    let v = Validity {
        not_before: UnixTime(1_800_000_000),
        not_after: UnixTime(1_900_000_000),
    };
    let ca_cert = x509::root_certificate(&ca, "CN=batch", v, &rng).unwrap();
    let (_, e) = generate_expanded(DeviceKeyType::EcP256, &rng).unwrap();
    let public = e.public.unwrap();
    let n = 2000;
    time("P-256 keygen + PKCS#8 + fingerprint", n, || {
        generate_expanded(DeviceKeyType::EcP256, &rng).unwrap()
    });
    time("P-384 keygen (aws-lc)", n, || {
        aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        )
        .unwrap()
    });
    time("P-384 key expanded from a seed", n, || {
        generate_expanded(DeviceKeyType::EcP384, &rng).unwrap()
    });
    time("P-384 key made and expanded (site)", n, || {
        keyfab_crypto::devicekey::generate_for_site(DeviceKeyType::EcP384, &rng).unwrap()
    });
    time("ECDSA P-256 sign (320 bytes)", n, || {
        ca.sign(&[7u8; 320]).unwrap()
    });
    time(
        "scrub the stack (32 KiB)",
        n * 10,
        keyfab_crypto::secret::scrub_stack,
    );
    let issuer = x509::DeviceIssuer::new(
        x509::BatchKey::from_pkcs8(ca.to_pkcs8().expose()).unwrap(),
        &ca_cert,
    )
    .unwrap();
    let profile = x509::DeviceProfile::with_subject("CN={device_id},O=Acme").unwrap();
    time("device certificate (DeviceIssuer)", n, || {
        issuer
            .issue(&profile, "D-1", &public, x509::random_serial(&rng), v)
            .unwrap()
    });
}
