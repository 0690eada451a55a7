//! A device simulator: the chip end of end-to-end key delivery. It holds a transport key
//! that never leaves it, opens the package the site sealed to it, checks each device
//! certificate up to the root and against the key it opened — what a real chip's
//! provisioning firmware does before it burns keys into fuses.

use crate::{Result, StationError};
use base64::Engine;
use keyfab_crypto::hpke::HpkeSecretKey;
use keyfab_crypto::rng::SecureRng;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509;
use serde_json::Value;

/// One key as the chip holds it after programming.
pub struct ChipKey {
    /// The key's name in the policy.
    pub name: String,
    /// PKCS#8 DER, or the raw bytes of a symmetric key.
    pub secret: SecretBytes,
}

/// A chip as the station programs it: its device id, its transport key, and the keys
/// and certificates it received (the simulator of a line's secure element).
pub struct SimulatedChip {
    device_id: String,
    transport: HpkeSecretKey,
    /// The certificate chain its vendor gave it for its transport key (DER, leaf
    /// first); empty for a chip without one.
    certificates: Vec<Vec<u8>>,
}

fn bad(what: impl Into<String>) -> StationError {
    StationError::BadAnswer(what.into())
}

fn b64(v: &Value, field: &str) -> Result<Vec<u8>> {
    let text = v[field]
        .as_str()
        .ok_or_else(|| bad(format!("no {field}")))?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| bad(format!("{field}: {e}")))
}

impl SimulatedChip {
    /// A chip for `device_id` with a fresh transport key.
    pub fn new(device_id: &str, rng: &dyn SecureRng) -> Self {
        Self {
            device_id: device_id.to_owned(),
            transport: HpkeSecretKey::generate(rng),
            certificates: Vec::new(),
        }
    }

    /// A chip for `device_id` whose transport key is the P-256 scalar `scalar` (32
    /// bytes, big-endian, below the group order).
    pub fn with_transport_key(device_id: &str, scalar: &[u8]) -> Result<Self> {
        Ok(Self {
            device_id: device_id.to_owned(),
            transport: HpkeSecretKey::from_bytes(scalar).map_err(|e| bad(e.to_string()))?,
            certificates: Vec::new(),
        })
    }

    /// This chip, holding the certificate chain its vendor gave it (DER, leaf first).
    pub fn with_certificates(mut self, chain: Vec<Vec<u8>>) -> Self {
        self.certificates = chain;
        self
    }

    /// The chip's certificate chain as the station API takes it (base64 DER, leaf
    /// first); `None` for a chip without one. All a station can send: the chip gives it.
    pub fn certificates_base64(&self) -> Option<Vec<String>> {
        (!self.certificates.is_empty()).then(|| {
            self.certificates
                .iter()
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
                .collect()
        })
    }

    /// The transport key's public point (SEC1 uncompressed).
    pub fn transport_point(&self) -> Result<Vec<u8>> {
        Ok(self
            .transport
            .public_key()
            .map_err(|e| bad(e.to_string()))?
            .sec1()
            .to_vec())
    }

    /// The chip's device id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The transport key as the station API takes it: SEC1 uncompressed, base64.
    pub fn transport_key(&self) -> Result<String> {
        let public = self
            .transport
            .public_key()
            .map_err(|e| bad(e.to_string()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(public.sec1()))
    }

    /// Opens `bundle` (the answer to a provisioning request made with this chip's
    /// transport key) and checks it: it is for this device; every key opens; every
    /// device certificate chains to `root_cert` at `now` and certifies the key opened.
    pub fn program(&self, bundle: &Value, root_cert: &[u8], now: UnixTime) -> Result<Vec<ChipKey>> {
        if bundle["device_id"] != self.device_id.as_str() {
            return Err(bad("the package is for another device"));
        }
        let site = bundle["site"].as_str().ok_or_else(|| bad("no site"))?;
        let entitlement = bundle["entitlement"]
            .as_str()
            .ok_or_else(|| bad("no entitlement"))?;
        let enc = b64(bundle, "chip_enc_base64")?;
        let keys = bundle["keys"].as_array().ok_or_else(|| bad("no keys"))?;
        let mut sealed = Vec::new();
        for k in keys {
            if k.get("private_key_pem").is_some() || k.get("secret_base64").is_some() {
                return Err(bad(
                    "key material in clear: it should be sealed to the chip",
                ));
            }
            if k.get("sealed_private_base64").is_some() {
                let name = k["name"].as_str().ok_or_else(|| bad("key without name"))?;
                sealed.push((name.to_owned(), b64(k, "sealed_private_base64")?));
            }
        }
        let refs: Vec<(&str, &[u8])> = sealed
            .iter()
            .map(|(n, c)| (n.as_str(), c.as_slice()))
            .collect();
        let binding = keyfab_formats::chip::Binding {
            site,
            entitlement,
            device_id: &self.device_id,
        };
        let opened = keyfab_formats::chip::open_keys(&self.transport, &binding, &enc, &refs)
            .map_err(|e| bad(e.to_string()))?;
        let chain: Vec<Vec<u8>> = bundle["chain_pem"]
            .as_array()
            .ok_or_else(|| bad("no chain"))?
            .iter()
            .map(|c| {
                x509::from_pem(c.as_str().unwrap_or_default(), "CERTIFICATE")
                    .map_err(|e| bad(e.to_string()))
            })
            .collect::<Result<_>>()?;
        let mut out = Vec::new();
        let mut opened = opened.into_iter();
        for k in keys {
            let name = k["name"].as_str().unwrap_or_default().to_owned();
            let secret = if k.get("sealed_private_base64").is_some() {
                opened.next()
            } else {
                None
            };
            if let Some(pem) = k["certificate_pem"].as_str() {
                let cert = x509::from_pem(pem, "CERTIFICATE").map_err(|e| bad(e.to_string()))?;
                let facts = x509::verify_device_certificate(root_cert, &chain, &cert, now)
                    .map_err(|e| bad(format!("certificate of key '{name}': {e}")))?;
                if !facts.common_name.contains(&self.device_id) {
                    return Err(bad(format!(
                        "certificate of key '{name}' names another device"
                    )));
                }
                // The key received must be the one the certificate certifies.
                if let Some(secret) = &secret {
                    let spki = keyfab_crypto::devicekey::spki_of_pkcs8(secret.expose())
                        .map_err(|e| bad(format!("key '{name}': {e}")))?;
                    let certified = x509::cert_spki(&cert).map_err(|e| bad(e.to_string()))?;
                    if spki != certified {
                        return Err(bad(format!(
                            "certificate of key '{name}' is for another key"
                        )));
                    }
                }
            }
            if let Some(secret) = secret {
                out.push(ChipKey { name, secret });
            }
        }
        Ok(out)
    }
}
