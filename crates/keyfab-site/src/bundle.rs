//! The device bundle: a provisioned device's key material and certificates as JSON, the
//! shape `keyfab site provision --json` prints and `POST /v1/provision` answers. It
//! holds secrets: it goes to the device (or its station) and nowhere else.

use crate::provision::Provisioned;
use keyfab_crypto::x509;
use serde_json::{json, Value};
use zeroize::{Zeroize, Zeroizing};

/// The bundle of `p`. Private keys are PEM (PKCS#8), secrets base64.
pub fn device_bundle(p: &Provisioned) -> serde_json::Value {
    use base64::Engine;
    let keys: Vec<_> = p
        .keys
        .iter()
        .map(|k| {
            let mut o = json!({
                "name": k.name,
                "type": k.key_type.as_str(),
                "source": k.source.as_str(),
                "key_id": k.key_id,
            });
            if let Some(private) = &k.private {
                if k.key_type.is_asymmetric() {
                    o["private_key_pem"] = json!(x509::to_pem(private.expose(), "PRIVATE KEY"));
                } else {
                    o["secret_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(private.expose()));
                }
            }
            if let Some(sealed) = &k.sealed {
                o["sealed_private_base64"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(sealed));
            }
            if let Some(cert) = &k.certificate {
                o["certificate_pem"] = json!(x509::to_pem(cert, "CERTIFICATE"));
            }
            o
        })
        .collect();
    let mut bundle = json!({
        "site": p.site,
        "entitlement": p.entitlement,
        "device_id": p.device_id,
        "request_id": p.request_id,
        "audit_sequence": p.audit_sequence,
        "replayed": p.replayed,
        "keys": keys,
        "chain_pem": p.chain.iter().map(|c| x509::to_pem(c, "CERTIFICATE")).collect::<Vec<_>>(),
    });
    if let Some(enc) = &p.chip_enc {
        // FORMATS.md §10: the chip opens the keys' `sealed_private_base64`, in order.
        bundle["chip_enc_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(enc));
    }
    bundle
}

/// The bundle of `p` serialized, in a buffer that is zeroized when dropped; the private
/// keys' text in the JSON tree it was made from is zeroized here. For a long-running
/// server: the answer's key material does not stay behind in freed memory.
pub fn device_bundle_bytes(p: &Provisioned) -> Zeroizing<Vec<u8>> {
    let mut bundle = device_bundle(p);
    let mut bytes = Zeroizing::new(Vec::with_capacity(8192));
    // Writing a `Value` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *bytes, &bundle);
    scrub_secrets(&mut bundle);
    bytes
}

/// Zeroizes the private keys and secrets of a bundle in place.
fn scrub_secrets(bundle: &mut Value) {
    let Some(keys) = bundle.get_mut("keys").and_then(Value::as_array_mut) else {
        return;
    };
    for key in keys {
        for field in ["private_key_pem", "secret_base64"] {
            if let Some(Value::String(s)) = key.get_mut(field) {
                s.zeroize();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_clears_private_keys_and_secrets_only() {
        let mut v = json!({"device_id": "D-1", "keys": [
            {"name": "identity", "private_key_pem": "-----BEGIN PRIVATE KEY-----", "certificate_pem": "cert"},
            {"name": "session", "secret_base64": "c2VjcmV0"},
        ]});
        scrub_secrets(&mut v);
        assert_eq!(
            v,
            json!({"device_id": "D-1", "keys": [
                {"name": "identity", "private_key_pem": "", "certificate_pem": "cert"},
                {"name": "session", "secret_base64": ""},
            ]})
        );
    }
}
