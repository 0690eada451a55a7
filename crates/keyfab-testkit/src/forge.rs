//! Audit bundles as a lying site would make them: records of its choosing, chained and
//! signed with the site's own key, addressed to its HQ — what HQ's import must catch.

use std::path::Path;

/// Where `site` addresses its audit bundles: HQ's name, cluster fingerprint and HPKE key.
pub fn hq_addressing(
    site: &keyfab_node::Node,
) -> (
    String,
    keyfab_crypto::hash::Fingerprint,
    keyfab_crypto::hpke::HpkePublicKey,
) {
    let hq = keyfab_site::entitlements::hq_recipient(site)
        .unwrap()
        .unwrap();
    let point = keyfab_crypto::x509::cert_facts(&hq.hpke_cert)
        .unwrap()
        .public_point
        .unwrap();
    (
        hq.hq.clone(),
        keyfab_crypto::hash::Fingerprint::of(&hq.cluster_cert),
        keyfab_crypto::hpke::HpkePublicKey::from_sec1(&point).unwrap(),
    )
}

/// Writes `records` as a bundle of `fields` to `out`, signed with `site`'s own key: what
/// a site that lies would do.
pub fn write_signed_bundle(
    site: &keyfab_node::Node,
    fields: &keyfab_formats::audit_bundle::BundleFields,
    records: Vec<Vec<u8>>,
    out: &Path,
) {
    let mut file = std::fs::File::create(out).unwrap();
    keyfab_formats::audit_bundle::write_bundle(
        keyfab_formats::Output {
            file: &mut file,
            spool: &mut std::io::Cursor::new(Vec::new()),
        },
        fields,
        &mut records.into_iter().map(Ok),
        site.service_signer().unwrap(),
        site.service_chain().unwrap(),
        &keyfab_crypto::rng::SystemRng,
    )
    .unwrap();
}

/// What a site that lies would export: `events` chained from the first record, signed
/// with `site`'s own key as its first bundle, written to `out`.
pub fn write_forged_log(
    site: &keyfab_node::Node,
    events: Vec<(i64, keyfab_audit::Event)>,
    bundle_id: &str,
    out: &Path,
) {
    let chained = events.into_iter().map(|(t, e)| (None, t, e)).collect();
    write_forged_chains(site, chained, bundle_id, out);
}

/// [`write_forged_log`] with each record in the node chain named beside it (`None`: the
/// site chain), each chain numbered and linked on its own, merged in the order given.
pub fn write_forged_chains(
    site: &keyfab_node::Node,
    events: Vec<(Option<&str>, i64, keyfab_audit::Event)>,
    bundle_id: &str,
    out: &Path,
) {
    use keyfab_audit::{Head, Record};
    let mut heads: std::collections::HashMap<Option<&str>, Head> = Default::default();
    let records = events
        .into_iter()
        .map(|(chain, t, e)| {
            let head = heads.entry(chain).or_insert_with(Head::genesis);
            let mut r: Record = head.next(t, &site.name, e);
            r.chain = chain.map(str::to_owned);
            *head = Head::after(&r).unwrap();
            r
        })
        .collect();
    write_forged_records(site, records, bundle_id, out);
}

/// `records` as they are, signed with `site`'s own key as its first bundle.
pub fn write_forged_records(
    site: &keyfab_node::Node,
    records: Vec<keyfab_audit::Record>,
    bundle_id: &str,
    out: &Path,
) {
    let now = records.iter().map(|r| r.time).max().unwrap_or(0);
    let records: Vec<Vec<u8>> = records.iter().map(|r| r.to_bytes()).collect();
    let leaves: Vec<_> = records
        .iter()
        .map(|b| keyfab_audit::merkle::leaf_hash(b))
        .collect();
    let (hq, hq_cluster, recipient) = hq_addressing(site);
    let fields = keyfab_formats::audit_bundle::BundleFields {
        id: bundle_id.to_owned(),
        site: site.name.clone(),
        hq,
        hq_cluster,
        recipient,
        from: keyfab_formats::checkpoint::TreeHead {
            size: 0,
            root: keyfab_audit::merkle::root(&[]),
        },
        to: keyfab_formats::checkpoint::TreeHead {
            size: leaves.len() as u64,
            root: keyfab_audit::merkle::root(&leaves),
        },
        checkpoint_time: now,
        consistency: vec![],
        created_at: keyfab_crypto::time::UnixTime(now),
    };
    write_signed_bundle(site, &fields, records, out);
}

/// A release of `device` under `entitlement` as a lying site would record it: one key,
/// with an invented public-key id.
pub fn forged_release(entitlement: &str, device: &str) -> keyfab_audit::Event {
    keyfab_audit::Event::ProvisionAllowed {
        entitlement: entitlement.to_owned(),
        request_id: format!("r-{device}"),
        device_id: device.into(),
        station: None,
        pool_index: None,
        keys: vec![keyfab_audit::AuditedKey {
            name: "k".into(),
            key_id: format!("spki-sha256:{}", "ab".repeat(32)),
            cert_serial: None,
            certificate: None,
        }],
    }
}

/// A refusal of `device` under `entitlement` with `code`, as a site records it.
pub fn forged_denial(entitlement: &str, device: &str, code: &str) -> keyfab_audit::Event {
    keyfab_audit::Event::ProvisionDenied {
        entitlement: entitlement.to_owned(),
        request_id: format!("d-{device}"),
        device_id: device.to_owned(),
        station: None,
        code: code.to_owned(),
    }
}
