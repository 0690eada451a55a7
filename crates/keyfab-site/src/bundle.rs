//! The device bundle: a provisioned device's key material and certificates as JSON, the
//! shape `keyfab site provision --json` prints and `POST /v1/provision` answers. It
//! holds secrets: it goes to the device (or its station) and nowhere else.

use crate::provision::{IssuedKey, Provisioned};
use base64::Engine;
use keyfab_crypto::x509;
use serde::{Serialize, Serializer};
use serde_json::Value;
use zeroize::Zeroizing;

/// A device's bundle, borrowed from its [`Provisioned`] and written out without an
/// intermediate JSON tree (the server answers one per device). Fields are in the sorted
/// order of the tree it replaces, so the bytes are the same.
#[derive(Serialize)]
struct Bundle<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_chain: Option<&'a str>,
    audit_sequence: u64,
    chain_pem: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    chip_enc_base64: Option<String>,
    device_id: &'a str,
    entitlement: &'a str,
    keys: Vec<BundleKey<'a>>,
    replayed: bool,
    request_id: &'a str,
    site: &'a str,
}

#[derive(Serialize)]
struct BundleKey<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate_pem: Option<String>,
    key_id: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key_pem: Option<SecretText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sealed_private_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_base64: Option<SecretText>,
    source: &'static str,
    #[serde(rename = "type")]
    key_type: &'static str,
}

/// Text of a private key or secret: zeroized when dropped.
struct SecretText(Zeroizing<String>);

impl Serialize for SecretText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl<'a> BundleKey<'a> {
    /// Private keys are PEM (PKCS#8), secrets base64.
    fn of(k: &'a IssuedKey) -> Self {
        let (mut private_key_pem, mut secret_base64) = (None, None);
        if let Some(private) = &k.private {
            if k.key_type.is_asymmetric() {
                private_key_pem = Some(SecretText(x509::to_pem_secret(
                    private.expose(),
                    "PRIVATE KEY",
                )));
            } else {
                secret_base64 = Some(SecretText(Zeroizing::new(base64(private.expose()))));
            }
        }
        BundleKey {
            certificate_pem: k
                .certificate
                .as_ref()
                .map(|c| x509::to_pem(c, "CERTIFICATE")),
            key_id: &k.key_id,
            name: &k.name,
            private_key_pem,
            sealed_private_base64: k.sealed.as_deref().map(base64),
            secret_base64,
            source: k.source.as_str(),
            key_type: k.key_type.as_str(),
        }
    }
}

impl<'a> Bundle<'a> {
    fn of(p: &'a Provisioned) -> Self {
        Bundle {
            audit_chain: p.audit_chain.as_deref(),
            audit_sequence: p.audit_sequence,
            chain_pem: &p.chain.pem,
            // FORMATS.md §10: the chip opens the keys' `sealed_private_base64`, in order.
            chip_enc_base64: p.chip_enc.as_deref().map(base64),
            device_id: &p.device_id,
            entitlement: &p.entitlement,
            keys: p.keys.iter().map(BundleKey::of).collect(),
            replayed: p.replayed,
            request_id: &p.request_id,
            site: &p.site,
        }
    }
}

/// The bundle of `p`. Private keys are PEM (PKCS#8), secrets base64.
pub fn device_bundle(p: &Provisioned) -> Value {
    // Serializing these plain fields into a tree cannot fail.
    serde_json::to_value(Bundle::of(p)).unwrap_or(Value::Null)
}

/// The bundle of `p` serialized, in a buffer that is zeroized when dropped; the private
/// keys' text it was written from is zeroized too. For a long-running server: the
/// answer's key material does not stay behind in freed memory.
pub fn device_bundle_bytes(p: &Provisioned) -> Zeroizing<Vec<u8>> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(8192));
    // Writing these plain fields into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *bytes, &Bundle::of(p));
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::IssuerChain;
    use keyfab_crypto::secret::SecretBytes;
    use keyfab_policy::{KeySource, KeyType};
    use std::sync::Arc;

    fn provisioned() -> Provisioned {
        let key = |name: &str, key_type, source, private: &[u8]| IssuedKey {
            name: name.into(),
            key_type,
            source,
            key_id: format!("id-of-{name}"),
            private: Some(SecretBytes::new(private.to_vec())),
            sealed: None,
            certificate: None,
        };
        let mut identity = key("identity", KeyType::EcP256, KeySource::Site, &[1, 2, 3]);
        identity.certificate = Some(vec![4, 5, 6]);
        let mut sealed = key("sealed", KeyType::EcP256, KeySource::HqPool, &[]);
        sealed.private = None;
        sealed.sealed = Some(vec![7, 8]);
        Provisioned {
            entitlement: "E".into(),
            device_id: "D-1".into(),
            request_id: "R-1".into(),
            audit_sequence: 42,
            audit_chain: None,
            replayed: false,
            keys: vec![
                identity,
                key("session", KeyType::Aes256, KeySource::Derived, &[9; 32]),
                sealed,
            ],
            chain: Arc::new(IssuerChain {
                der: vec![vec![1], vec![2]],
                pem: vec!["batch".into(), "cluster".into()],
            }),
            chip_enc: Some(vec![0xee; 4]),
            site: "S".into(),
        }
    }

    /// The bytes a station gets are the tree the CLI prints, keys in sorted order.
    #[test]
    fn the_answer_bytes_are_the_printed_bundle() {
        let p = provisioned();
        let tree = device_bundle(&p);
        let bytes = device_bundle_bytes(&p);
        assert_eq!(*bytes, serde_json::to_vec(&tree).unwrap());
        let keys = tree["keys"].as_array().unwrap();
        assert!(keys[0]["private_key_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(keys[0]["certificate_pem"].is_string());
        assert!(keys[0].get("secret_base64").is_none());
        assert_eq!(keys[1]["secret_base64"], base64(&[9; 32]));
        assert_eq!(keys[1]["type"], "aes-256");
        assert_eq!(keys[2]["sealed_private_base64"], base64(&[7, 8]));
        assert!(keys[2].get("private_key_pem").is_none());
        assert_eq!(tree["chain_pem"], serde_json::json!(["batch", "cluster"]));
        assert_eq!(tree["chip_enc_base64"], base64(&[0xee; 4]));
        assert_eq!(tree["audit_sequence"], 42);
    }
}
