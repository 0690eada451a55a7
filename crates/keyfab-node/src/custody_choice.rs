//! Where a node's identity keys live: the sealed software keystore (default) or a PKCS#11
//! token. The choice is made at `init` and kept in `HOME/custody.json` (no secret in it);
//! the secret that unlocks the home — the keystore passphrase or the token's user PIN —
//! comes from the same place either way.

use crate::backends::{Backends, TokenTarget, TokenUse};
use crate::{Error, Result};
use keyfab_crypto::secret::SecretBytes;
use keyfab_custody::{Custody, SoftwareKeystore};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file that says the home's keys are in a token.
pub const CUSTODY_FILE: &str = "custody.json";
const DEFAULT_SESSIONS: usize = 4;

/// Where a home's identity keys live, as `init --custody` chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CustodyChoice {
    /// `HOME/keystore.kfs`, sealed by a passphrase or unseal shares.
    Software,
    /// A PKCS#11 token found by its label.
    Pkcs11 {
        /// The PKCS#11 module (a shared library).
        module: PathBuf,
        /// The token's label.
        token: String,
        /// At most this many sessions open at once.
        max_sessions: usize,
    },
}

impl CustodyChoice {
    /// `software`, or `pkcs11:module=PATH,token=LABEL[,sessions=N]`.
    pub fn parse(spec: &str) -> Result<Self> {
        if spec == "software" {
            return Ok(CustodyChoice::Software);
        }
        let Some(rest) = spec.strip_prefix("pkcs11:") else {
            return Err(Error::InvalidInput(format!(
                "--custody '{spec}': expected software or pkcs11:module=PATH,token=LABEL[,sessions=N]"
            )));
        };
        let (mut module, mut token, mut sessions) = (None, None, DEFAULT_SESSIONS);
        for part in rest.split(',') {
            match part.split_once('=') {
                Some(("module", v)) if !v.is_empty() => module = Some(PathBuf::from(v)),
                Some(("token", v)) if !v.is_empty() => token = Some(v.to_owned()),
                Some(("sessions", v)) => {
                    sessions = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=256).contains(n))
                        .ok_or_else(|| {
                            Error::InvalidInput(format!(
                                "--custody: sessions '{v}' must be 1 to 256"
                            ))
                        })?
                }
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "--custody: '{part}' is not module=PATH, token=LABEL or sessions=N"
                    )))
                }
            }
        }
        match (module, token) {
            (Some(module), Some(token)) => Ok(CustodyChoice::Pkcs11 {
                module,
                token,
                max_sessions: sessions,
            }),
            _ => Err(Error::InvalidInput(
                "--custody pkcs11: needs module=PATH and token=LABEL".into(),
            )),
        }
    }

    /// The choice recorded in `home` (software when there is no record).
    pub fn load(home: &Path) -> Result<Self> {
        match std::fs::read(home.join(CUSTODY_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::Corrupt(format!("{CUSTODY_FILE}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CustodyChoice::Software),
            Err(e) => Err(e.into()),
        }
    }

    fn token(&self) -> Option<TokenTarget<'_>> {
        match self {
            CustodyChoice::Software => None,
            CustodyChoice::Pkcs11 {
                module,
                token,
                max_sessions,
            } => Some(TokenTarget {
                module,
                token,
                max_sessions: *max_sessions,
            }),
        }
    }

    /// Starts custody for a new home (and records the choice there).
    pub(crate) fn create(
        &self,
        home: &Path,
        keystore: &Path,
        secret: &SecretBytes,
        rng: &dyn keyfab_crypto::rng::SecureRng,
        backends: &dyn Backends,
    ) -> Result<Box<dyn Custody>> {
        Ok(match self.token() {
            None => Box::new(SoftwareKeystore::create(keystore, secret, rng)?),
            Some(token) => {
                let custody = backends.token_custody(token, secret, TokenUse::Create)?;
                let json =
                    serde_json::to_vec_pretty(self).map_err(|e| Error::Bug(e.to_string()))?;
                crate::home::write_private_file(&home.join(CUSTODY_FILE), &json)?;
                custody
            }
        })
    }

    /// Opens the custody of an existing home.
    pub(crate) fn open(
        &self,
        keystore: &Path,
        secret: &SecretBytes,
        backends: &dyn Backends,
    ) -> Result<Box<dyn Custody>> {
        Ok(match self.token() {
            None => Box::new(SoftwareKeystore::unlock(keystore, secret)?),
            Some(token) => backends.token_custody(token, secret, TokenUse::Open)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        assert_eq!(
            CustodyChoice::parse("software").unwrap(),
            CustodyChoice::Software
        );
        assert_eq!(
            CustodyChoice::parse("pkcs11:module=/m.so,token=hq,sessions=2").unwrap(),
            CustodyChoice::Pkcs11 {
                module: "/m.so".into(),
                token: "hq".into(),
                max_sessions: 2
            }
        );
        for bad in [
            "hsm",
            "pkcs11:module=/m.so",
            "pkcs11:token=x,colour=red",
            "pkcs11:module=/m.so,token=x,sessions=0",
        ] {
            assert!(
                matches!(CustodyChoice::parse(bad), Err(Error::InvalidInput(_))),
                "{bad}"
            );
        }
    }
}
