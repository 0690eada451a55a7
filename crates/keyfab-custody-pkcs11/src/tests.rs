//! Against a real SoftHSM2 token, initialized by the tests themselves.

use super::*;
use keyfab_crypto::rng::SystemRng;
use std::sync::OnceLock;

pub(crate) const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const SO_PIN: &str = "so-pin-1234";
const USER_PIN: &str = "user-pin-5678";

/// One SoftHSM token directory per test process (SoftHSM reads its configuration once),
/// and a fresh token per test.
fn token(name: &str) -> TokenConfig {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        std::env::set_var("SOFTHSM2_CONF", &conf);
        dir
    });
    let _ = dir;
    init_token(SOFTHSM_MODULE.as_ref(), name, SO_PIN, USER_PIN).unwrap();
    TokenConfig {
        module: SOFTHSM_MODULE.into(),
        token_label: name.to_owned(),
        pin: SecretBytes::new(USER_PIN.as_bytes().to_vec()),
        max_sessions: 2,
    }
}

#[test]
fn identity_keys_are_made_inside_the_token_and_cannot_be_read_out() {
    let config = token("keys-stay-in");
    let mut custody = Pkcs11Custody::create(&config).unwrap();
    custody
        .generate_signing_key("service-sign", &SystemRng)
        .unwrap();
    custody
        .generate_hpke_key("service-hpke", &SystemRng)
        .unwrap();
    for handle in ["service-sign", "service-hpke", WRAP_HANDLE] {
        let flags = custody.private_key_flags(handle).unwrap();
        assert_eq!(
            flags,
            KeyFlags {
                sensitive: true,
                extractable: false,
                never_extractable: true,
                always_sensitive: true,
            },
            "{handle}"
        );
    }
    custody.export_is_refused("service-sign").unwrap();
    custody.export_is_refused("service-hpke").unwrap();
    assert!(matches!(
        custody.generate_signing_key("service-sign", &SystemRng),
        Err(CustodyError::KeyExists(_))
    ));
    // The same token cannot be taken over a second time.
    assert!(matches!(
        Pkcs11Custody::create(&config),
        Err(CustodyError::AlreadyExists(_))
    ));
}

#[test]
fn signatures_verify_hpke_opens_and_data_keys_round_trip_across_reopen() {
    let config = token("round-trips");
    let mut custody = Pkcs11Custody::create(&config).unwrap();
    let public = custody.generate_signing_key("sign", &SystemRng).unwrap();
    let hpke_public = custody.generate_hpke_key("hpke", &SystemRng).unwrap();
    let signature = custody
        .signer("sign")
        .unwrap()
        .sign(b"a checkpoint")
        .unwrap();
    public.verify(b"a checkpoint", &signature).unwrap();
    assert!(public.verify(b"another", &signature).is_err());

    let rng = keyfab_crypto::rng::SeededRng::new(5);
    let (enc, mut sealer) = keyfab_crypto::hpke::seal_context(&hpke_public, b"info", &rng).unwrap();
    let c0 = sealer.seal(b"chunk zero", b"0").unwrap();
    let c1 = sealer.seal(b"chunk one", b"1").unwrap();
    let mut opener = custody
        .hpke("hpke")
        .unwrap()
        .open_context(&enc, b"info")
        .unwrap();
    assert_eq!(opener.open(&c0, b"0").unwrap().expose(), b"chunk zero");
    assert_eq!(opener.open(&c1, b"1").unwrap().expose(), b"chunk one");
    let mut wrong_info = custody
        .hpke("hpke")
        .unwrap()
        .open_context(&enc, b"other")
        .unwrap();
    assert!(wrong_info.open(&c0, b"0").is_err());

    let dek = Secret32::random(&SystemRng);
    let wrapped = custody
        .wrap_data_key(&dek, b"entitlement e1", &SystemRng)
        .unwrap();
    assert!(matches!(
        custody.unwrap_data_key(&wrapped, b"entitlement e2"),
        Err(CustodyError::Locked)
    ));
    drop(custody);

    // Another run: the same keys, found by label.
    let custody = Pkcs11Custody::open(&config).unwrap();
    assert_eq!(
        custody.signer("sign").unwrap().verifying_key().sec1(),
        public.sec1()
    );
    assert_eq!(
        custody.hpke("hpke").unwrap().public_key().unwrap().sec1(),
        hpke_public.sec1()
    );
    let back = custody
        .unwrap_data_key(&wrapped, b"entitlement e1")
        .unwrap();
    assert_eq!(back.expose(), dek.expose());
    // A wrong PIN opens nothing (once no session of this process is logged in: the
    // token's login is per process).
    drop(custody);
    let missing = TokenConfig {
        token_label: "no-such-token".into(),
        module: config.module.clone(),
        pin: SecretBytes::new(config.pin.expose().to_vec()),
        max_sessions: config.max_sessions,
    };
    let bad = TokenConfig {
        pin: SecretBytes::new(b"wrong".to_vec()),
        ..config
    };
    let refused = Pkcs11Custody::open(&bad).err().unwrap();
    assert!(matches!(refused, CustodyError::PinRefused), "{refused}");
    assert!(refused.to_string().contains("refused the login"));
    // A token that does not exist: named, with the command that makes one.
    let refused = Pkcs11Custody::open(&missing).err().unwrap();
    assert!(matches!(refused, CustodyError::NoToken(_)), "{refused}");
    assert!(refused.to_string().contains("softhsm2-util --init-token"));
}

/// The token's ECDH, then DHKEM on the host, give RFC 9180 A.3.1's shared secret.
#[test]
fn the_tokens_ecdh_gives_the_rfc9180_shared_secret() {
    let config = token("rfc9180");
    let custody = Pkcs11Custody::create(&config).unwrap();
    let h = |s: &str| {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let sk_rm = h("f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2");
    let pk_rm = h("04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0");
    let enc = h("04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4");
    let dh = custody
        .pool
        .with(|s| {
            // The vector's private key, imported as a session key only for this check.
            let key = s
                .create_object(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::EcParams(P256_PARAMS.to_vec()),
                    Attribute::Value(sk_rm.clone()),
                    Attribute::Derive(true),
                    Attribute::Token(false),
                ])
                .map_err(|e| token_err("import", e))?;
            ecdh(s, key, &enc)
        })
        .unwrap();
    let shared = keyfab_crypto::hpke::dhkem_shared_secret(&dh, &enc, &pk_rm).unwrap();
    let hex: String = shared.expose().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "c0d26aeab536609a572b07695d933b589dcf363ff9d93c93adea537aeabb8cb8"
    );
}

#[test]
fn a_small_session_pool_serves_many_threads() {
    let config = token("pool");
    let mut custody = Pkcs11Custody::create(&config).unwrap();
    let public = custody.generate_signing_key("sign", &SystemRng).unwrap();
    let custody = Arc::new(custody);
    std::thread::scope(|scope| {
        for t in 0..8u8 {
            let (custody, public) = (custody.clone(), public.clone());
            scope.spawn(move || {
                for i in 0..10u8 {
                    let msg = [t, i];
                    let sig = custody.signer("sign").unwrap().sign(&msg).unwrap();
                    public.verify(&msg, &sig).unwrap();
                }
            });
        }
    });
    assert!(custody.pool.idle.lock().unwrap().open <= 2);
}

#[test]
fn the_hsm_centred_baseline_does_its_three_steps_in_the_token() {
    let config = token("peer");
    let session = user_session(&config.module, &config.token_label, USER_PIN).unwrap();
    let keys = peer::peer_keys(&session).unwrap();
    let (wrapped, signature) = peer::peer_device(&session, &keys, &[7u8; 32]).unwrap();
    assert!(wrapped.len() > 32, "a wrapped PKCS#8 key");
    assert_eq!(signature.len(), 64);
}

/// SoftHSM adds a slot inside `C_GetSlotList` without a lock; threads that found a token
/// at once right after another was initialized used to abort the whole process.
#[test]
fn threads_connecting_at_once_after_a_token_was_initialized_do_not_crash_the_module() {
    for round in 0..50 {
        let config = token(&format!("connect-race-{round}"));
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    user_session(&config.module, &config.token_label, USER_PIN).unwrap();
                });
            }
        });
    }
}
