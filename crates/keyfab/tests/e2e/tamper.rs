//! Every byte of a small valid entitlement flipped in turn is refused with exit 4, and
//! the site's home is unchanged afterwards. Runs in-process (one unlock, ~4,000 imports).

use crate::common::*;

#[test]
fn every_flipped_byte_is_refused_and_changes_nothing() {
    let w = world();
    let (kfe, _) = create(&w, "shenzhen-1", 1, "small.kfe");
    let bytes = std::fs::read(&kfe).unwrap();
    let before = snapshot(&w.site);
    let node = open_site(&w.site);
    let flipped = w.path("flipped.kfe");
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        std::fs::write(&flipped, &b).unwrap();
        match keyfab_site::entitlements::import(&node, &flipped, None) {
            Ok(_) => panic!("byte {i} flipped was accepted"),
            Err(e) => assert_eq!(e.exit_code(), 4, "byte {i}: {e} ({})", e.code()),
        }
    }
    drop(node);
    assert_eq!(before, snapshot(&w.site));
}

#[test]
fn no_pool_private_key_bytes_in_the_site_home() {
    let w = world();
    let (kfe, _) = create(&w, "shenzhen-1", 300, "scan.kfe");
    ok(&[
        "site",
        "entitlement",
        "import",
        "--home",
        &s(&w.site),
        &s(&kfe),
    ]);
    // Recover the plaintext pool keys the way only the site can: through its custody.
    let node = open_site(&w.site);
    let service = node.service().unwrap();
    let recipient = node.custody.hpke(&service.hpke_handle).unwrap();
    let env = keyfab_formats::entitlement::verify_entitlement(
        &kfe,
        &node.root_cert().unwrap(),
        node.now(),
        "shenzhen-1",
        &[recipient.public_key().unwrap().fingerprint()],
    )
    .unwrap();
    let (_content, mut reader) =
        keyfab_formats::entitlement::open_entitlement(&env, recipient).unwrap();
    let mut secrets = std::collections::HashSet::new();
    while let Some((_, chunk)) = reader.next_chunk().unwrap() {
        for k in chunk.expose().chunks_exact(32) {
            secrets.insert(k[..16].to_vec());
        }
    }
    assert_eq!(secrets.len(), 900);
    // The import is audited, the chain verifies, and the record holds no secret.
    let records = keyfab_site::entitlements::audit_records(&node).unwrap();
    assert_eq!(records.len(), 1);
    keyfab_audit::verify_chain(&keyfab_audit::Head::genesis(), &records).unwrap();
    for r in &records {
        for win in r.to_bytes().windows(16) {
            assert!(!secrets.contains(win), "pool key bytes in an audit record");
        }
    }
    drop(node);
    // Any 16-byte window of any file equal to the first half of a key is a hit.
    let mut stack = vec![w.site.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let data = std::fs::read(&p).unwrap();
            for win in data.windows(16) {
                assert!(
                    !secrets.contains(win),
                    "raw pool key bytes found in {}",
                    p.display()
                );
            }
        }
    }
}
