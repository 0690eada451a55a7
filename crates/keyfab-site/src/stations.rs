//! The stations of the production line: their enrollment under the site's line CA, their
//! revocation, and the check every connection and request passes.
//!
//! Which API for which job:
//! - enroll a station (its key, certificate and the line CA, for its directory):
//!   [`line_ca`] once, then [`enroll`];
//! - a station's certificate nearing its end: [`renew`] (a new key and certificate; the
//!   previous certificate keeps working until its own end, so the station swaps its
//!   files when it suits the line);
//! - stop a station: [`revoke`]; list them: [`list`];
//! - may this presented certificate act as a station now: [`check`];
//! - the certificate and key `keyfab site serve` presents: [`server_identity`].
//!
//! The line CA's key lives in the site's custody (handle `line-ca`), made on first use.
//! Enrollments and revocations are audited as `setting_changed` records
//! (`station.enrolled`, `station.revoked`), so HQ sees which stations existed.

use crate::audit_log::commit_setting;
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::sign::SigningKey;
use keyfab_crypto::time::UnixTime;
use keyfab_crypto::x509::{self, Validity};
use keyfab_node::{check_name, decode, encode, Error, Node, Result};
use keyfab_store::Table;
use serde::{Deserialize, Serialize};

const LINE_CA_HANDLE: &str = "line-ca";
const LINE_CA_CERT: &[u8] = b"line_ca_cert";
const LINE_CA_DAYS: i64 = 3650;
/// A server certificate lives as long as one `site serve` run, at most this long.
const SERVER_DAYS: i64 = 30;

fn station_key(name: &str) -> Vec<u8> {
    format!("station/{name}").into_bytes()
}

/// What the site knows of one station.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationRecord {
    /// The station's name.
    pub name: String,
    /// Hex serial of its current certificate.
    pub serial: String,
    /// When it was enrolled.
    pub enrolled_at: i64,
    /// When its certificate ends.
    pub not_after: i64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
    /// Hex serial of the certificate a renewal replaced: accepted still, until its own
    /// end (the TLS check refuses it after), so the station can swap its files. Revoking
    /// the station stops both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_serial: Option<String>,
}

/// What a newly enrolled station receives. Holds its private key.
pub struct Enrolled {
    /// The station as recorded.
    pub record: StationRecord,
    /// PKCS#8 DER of the station's key.
    pub key: SecretBytes,
    /// Its certificate (DER).
    pub certificate: Vec<u8>,
    /// The line CA's certificate (DER).
    pub line_ca: Vec<u8>,
}

/// The line CA certificate, made (key in custody, audited) if the site has none yet.
pub fn line_ca(node: &mut Node) -> Result<Vec<u8>> {
    if let Some(v) = node.store.get(Table::Meta, LINE_CA_CERT)? {
        return Ok(v.value);
    }
    node.cluster_cert()?; // only an installed site has a line
    let now = node.now();
    if node.custody.signer(LINE_CA_HANDLE).is_err() {
        node.custody
            .generate_signing_key(LINE_CA_HANDLE, node.rng.as_ref())?;
    }
    let cert = x509::line_ca_certificate(
        node.custody.signer(LINE_CA_HANDLE)?,
        &node.name,
        Validity {
            not_before: now,
            not_after: now.plus_days(LINE_CA_DAYS),
        },
        node.rng.as_ref(),
    )?;
    let fingerprint = format!("sha256:{}", keyfab_crypto::hash::Fingerprint::of(&cert));
    commit_setting(node, "line_ca", fingerprint, |txn| {
        txn.require_absent(Table::Meta, LINE_CA_CERT)
            .put(Table::Meta, LINE_CA_CERT, &cert);
        Ok(())
    })?;
    Ok(cert)
}

/// The line CA certificate, if the site has made one.
fn existing_line_ca(node: &Node) -> Result<Vec<u8>> {
    node.store
        .get(Table::Meta, LINE_CA_CERT)?
        .map(|v| v.value)
        .ok_or_else(|| Error::Precondition("the site has no line CA yet".into()))
}

/// Enrolls station `name` for `days`: a key made here, a certificate from the line CA
/// (see [`line_ca`], which makes it), recorded and audited. A name already in use must
/// be revoked first.
pub fn enroll(node: &Node, name: &str, days: i64) -> Result<Enrolled> {
    check_name(name)?;
    let ca = existing_line_ca(node)?;
    let seen = node.store.get(Table::Meta, &station_key(name))?;
    if let Some(v) = &seen {
        let r: StationRecord = decode(&v.value)?;
        if r.revoked_at.is_none() {
            return Err(Error::Precondition(format!(
                "station '{name}' is enrolled; revoke it first to enroll it again"
            )));
        }
    }
    let (key, certificate, serial, not_after) = issue(node, name, days, &ca)?;
    let record = StationRecord {
        name: name.to_owned(),
        serial: serial.clone(),
        enrolled_at: node.now().0,
        not_after,
        revoked_at: None,
        previous_serial: None,
    };
    commit_setting(
        node,
        "station.enrolled",
        format!("{name} serial {serial}"),
        |txn| {
            txn.require_unchanged(Table::Meta, &station_key(name), seen.as_ref())
                .put(Table::Meta, &station_key(name), &encode(&record)?);
            Ok(())
        },
    )?;
    Ok(Enrolled {
        record,
        key: key.to_pkcs8(),
        certificate,
        line_ca: ca,
    })
}

/// A new key for station `name` and its certificate from the line CA, valid from now for
/// `days`: (key, certificate, its serial in hex, its end).
fn issue(
    node: &Node,
    name: &str,
    days: i64,
    ca: &[u8],
) -> Result<(SigningKey, Vec<u8>, String, i64)> {
    if !(1..=3650).contains(&days) {
        return Err(Error::InvalidInput(
            "--days must be between 1 and 3650".into(),
        ));
    }
    let now = node.now();
    let key = SigningKey::generate(node.rng.as_ref())?;
    let not_after = now.plus_days(days);
    let certificate = x509::issue_station_certificate(
        node.custody.signer(LINE_CA_HANDLE)?,
        ca,
        key.verifying_key().sec1(),
        name,
        Validity {
            not_before: now,
            not_after,
        },
        node.rng.as_ref(),
    )?;
    let serial = x509::cert_facts(&certificate)?.serial_hex;
    Ok((key, certificate, serial, not_after.0))
}

/// Renews station `name` before its certificate ends, without revoking it: a new key and
/// certificate for `days`, recorded and audited (`station.renewed`). Its current
/// certificate keeps working until its own end; the one before it, if any, stops. A
/// revoked station is enrolled again instead; a station whose key may have leaked is
/// revoked, not renewed.
pub fn renew(node: &Node, name: &str, days: i64) -> Result<Enrolled> {
    let ca = existing_line_ca(node)?;
    let seen = node
        .store
        .get(Table::Meta, &station_key(name))?
        .ok_or_else(|| Error::NotFound(format!("no station '{name}'")))?;
    let mut record: StationRecord = decode(&seen.value)?;
    if record.revoked_at.is_some() {
        return Err(Error::Precondition(format!(
            "station '{name}' is revoked: enroll it again instead"
        )));
    }
    let (key, certificate, serial, not_after) = issue(node, name, days, &ca)?;
    let value = format!("{name} serial {serial} (was {})", record.serial);
    record.previous_serial = Some(std::mem::replace(&mut record.serial, serial));
    record.not_after = not_after;
    commit_setting(node, "station.renewed", value, |txn| {
        txn.require_unchanged(Table::Meta, &station_key(name), Some(&seen))
            .put(Table::Meta, &station_key(name), &encode(&record)?);
        Ok(())
    })?;
    Ok(Enrolled {
        record,
        key: key.to_pkcs8(),
        certificate,
        line_ca: ca,
    })
}

/// Revokes station `name`: from now on its certificate opens no connection and its
/// requests on open connections are refused.
pub fn revoke(node: &Node, name: &str) -> Result<StationRecord> {
    let seen = node
        .store
        .get(Table::Meta, &station_key(name))?
        .ok_or_else(|| Error::NotFound(format!("no station '{name}'")))?;
    let mut record: StationRecord = decode(&seen.value)?;
    if record.revoked_at.is_some() {
        return Ok(record);
    }
    record.revoked_at = Some(node.now().0);
    let value = format!("{name} serial {}", record.serial);
    commit_setting(node, "station.revoked", value, |txn| {
        txn.require_unchanged(Table::Meta, &station_key(name), Some(&seen))
            .put(Table::Meta, &station_key(name), &encode(&record)?);
        Ok(())
    })?;
    Ok(record)
}

/// Every enrolled station.
pub fn list(node: &Node) -> Result<Vec<StationRecord>> {
    node.store
        .scan(Table::Meta, b"station/", usize::MAX)?
        .into_iter()
        .map(|(_, v)| decode(&v.value))
        .collect()
}

/// The station a presented (already TLS-verified) certificate speaks for, if it may
/// speak now: enrolled under that name with that very certificate, not revoked.
pub fn check(node: &Node, certificate: &[u8]) -> Result<String> {
    let facts = x509::cert_facts(certificate).map_err(|e| {
        Error::Verification(keyfab_formats::FormatError::UntrustedSigner(e.to_string()))
    })?;
    let refused = |why: &str| {
        Error::Verification(keyfab_formats::FormatError::UntrustedSigner(format!(
            "station '{}': {why}",
            facts.common_name
        )))
    };
    let Some(v) = node
        .store
        .get(Table::Meta, &station_key(&facts.common_name))?
    else {
        return Err(refused("not enrolled here"));
    };
    let record: StationRecord = decode(&v.value)?;
    let current = record.serial == facts.serial_hex;
    let renewed_from = record.previous_serial.as_deref() == Some(facts.serial_hex.as_str());
    if !current && !renewed_from {
        return Err(refused("this certificate was replaced"));
    }
    if record.revoked_at.is_some() {
        return Err(refused("revoked"));
    }
    Ok(record.name)
}

/// A fresh serving key and its certificate for `names`, with the line CA certificate
/// (the chain stations check). The key lives in memory for one `site serve` run.
pub fn server_identity(node: &mut Node, names: &[String]) -> Result<ServerIdentity> {
    let ca = line_ca(node)?;
    let now = node.now();
    let key = SigningKey::generate(node.rng.as_ref())?;
    let certificate = x509::issue_server_certificate(
        node.custody.signer(LINE_CA_HANDLE)?,
        &ca,
        key.verifying_key().sec1(),
        &node.name,
        names,
        Validity {
            not_before: UnixTime(now.0 - 300),
            not_after: now.plus_days(SERVER_DAYS),
        },
        node.rng.as_ref(),
    )?;
    Ok(ServerIdentity {
        key: key.to_pkcs8(),
        chain: vec![certificate, ca],
    })
}

/// What `keyfab site serve` presents: its key (PKCS#8 DER) and chain [server, line CA].
pub struct ServerIdentity {
    /// The private key, PKCS#8 DER.
    pub key: SecretBytes,
    /// The chain: [server certificate, line CA].
    pub chain: Vec<Vec<u8>>,
}
