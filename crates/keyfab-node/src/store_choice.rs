//! Where a node's state lives: the embedded store in its home (default), or an etcd
//! cluster that several stateless nodes of one site share. The choice is made at `init`
//! and kept in `HOME/store.json` (endpoints and namespace; no secret); a second node of
//! the same site is a copy of the home (keystore and `store.json`), docs/OPERATIONS.md.

use crate::backends::Backends;
use crate::{Error, Result, STATE_FILE};
use keyfab_store::{EmbeddedStore, Store};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file that says the home's state is in etcd.
pub const STORE_FILE: &str = "store.json";

/// Where a home's state lives, as `init --store` chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreChoice {
    /// `HOME/state.redb`.
    Embedded,
    /// An etcd v3 cluster, this node's keys under `namespace`.
    Etcd {
        /// The members' client URLs (`http://` or `https://`).
        endpoints: Vec<String>,
        /// The prefix of every key of this site.
        namespace: String,
        /// TLS to the members (`etcds://`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<EtcdTlsFiles>,
    },
}

/// The files of TLS to etcd: the members' CA, and this node's client certificate and key
/// when the members require one. Absolute paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsFiles {
    /// The CA that issued the members' certificates (PEM).
    pub ca: PathBuf,
    /// This node's client certificate (PEM), when the members require one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl StoreChoice {
    /// `embedded`, or `etcd://HOST:PORT[,HOST:PORT…][/NAMESPACE]` (namespace
    /// `keyfab/<name>` when not given); `etcds://…` for TLS, whose files `tls` names.
    pub fn parse_with(spec: &str, name: &str, tls: Option<EtcdTlsFiles>) -> Result<Self> {
        let secure = spec.starts_with("etcds://");
        let plain = spec.replacen("etcds://", "etcd://", 1);
        match (Self::parse(&plain, name)?, tls) {
            (StoreChoice::Etcd { endpoints, namespace, .. }, Some(files)) if secure => {
                let absolute = |p: &Path| {
                    std::fs::canonicalize(p).map_err(|e| {
                        Error::InvalidInput(format!("--etcd-*: {}: {e}", p.display()))
                    })
                };
                if files.cert.is_some() != files.key.is_some() {
                    return Err(Error::InvalidInput(
                        "--etcd-cert and --etcd-key go together".into(),
                    ));
                }
                Ok(StoreChoice::Etcd {
                    endpoints: endpoints
                        .into_iter()
                        .map(|e| e.replacen("http://", "https://", 1))
                        .collect(),
                    namespace,
                    tls: Some(EtcdTlsFiles {
                        ca: absolute(&files.ca)?,
                        cert: files.cert.as_deref().map(absolute).transpose()?,
                        key: files.key.as_deref().map(absolute).transpose()?,
                    }),
                })
            }
            (_, None) if secure => Err(Error::InvalidInput(
                "--store etcds://... needs --etcd-ca (and --etcd-cert, --etcd-key if the members ask for a client certificate)".into(),
            )),
            (_, Some(_)) => Err(Error::InvalidInput(
                "--etcd-ca, --etcd-cert and --etcd-key go with --store etcds://...".into(),
            )),
            (choice, None) => Ok(choice),
        }
    }

    /// [`StoreChoice::parse_with`] without TLS.
    pub fn parse(spec: &str, name: &str) -> Result<Self> {
        if spec == "embedded" {
            return Ok(StoreChoice::Embedded);
        }
        let usage = || {
            Error::InvalidInput(format!(
                "--store '{spec}': expected embedded or etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]"
            ))
        };
        let rest = spec.strip_prefix("etcd://").ok_or_else(usage)?;
        let (hosts, namespace) = match rest.split_once('/') {
            Some((h, ns)) if !ns.is_empty() => (h, ns.to_owned()),
            Some((h, _)) => (h, format!("keyfab/{name}")),
            None => (rest, format!("keyfab/{name}")),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(|h| {
                let (host, port) = h.rsplit_once(':').ok_or_else(usage)?;
                let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
                if host.is_empty() || !port_ok {
                    return Err(usage());
                }
                Ok(format!("http://{h}"))
            })
            .collect::<Result<_>>()?;
        let namespace_ok = namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if endpoints.is_empty() || !namespace_ok {
            return Err(usage());
        }
        Ok(StoreChoice::Etcd {
            endpoints,
            namespace,
            tls: None,
        })
    }

    /// The choice recorded in `home` (embedded when there is no record).
    pub fn load(home: &Path) -> Result<Self> {
        match std::fs::read(home.join(STORE_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::Corrupt(format!("{STORE_FILE}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreChoice::Embedded),
            Err(e) => Err(e.into()),
        }
    }

    /// Records the choice in `home` (nothing to record for the embedded store).
    pub fn save(&self, home: &Path) -> Result<()> {
        if *self == StoreChoice::Embedded {
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Bug(format!("{STORE_FILE}: {e}")))?;
        crate::home::write_private_file(&home.join(STORE_FILE), &text)?;
        Ok(())
    }

    /// Opens the store this choice names, through `backends` when it is not the
    /// embedded one.
    pub fn open(&self, home: &Path, backends: &dyn Backends) -> Result<Box<dyn Store>> {
        Ok(match self {
            StoreChoice::Embedded => Box::new(EmbeddedStore::open(&home.join(STATE_FILE))?),
            StoreChoice::Etcd {
                endpoints,
                namespace,
                tls,
            } => backends.connect_etcd(endpoints, namespace, tls.as_ref())?,
        })
    }

    /// How the choice reads in messages: `embedded`, or the etcd endpoints and namespace.
    pub fn describe(&self) -> String {
        match self {
            StoreChoice::Embedded => "embedded".into(),
            StoreChoice::Etcd {
                endpoints,
                namespace,
                ..
            } => format!("etcd {} (namespace {namespace})", endpoints.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_are_refused() {
        assert_eq!(
            StoreChoice::parse("embedded", "s").unwrap(),
            StoreChoice::Embedded
        );
        assert_eq!(
            StoreChoice::parse("etcd://127.0.0.1:2379,h2:2379", "shenzhen-1").unwrap(),
            StoreChoice::Etcd {
                endpoints: vec!["http://127.0.0.1:2379".into(), "http://h2:2379".into()],
                namespace: "keyfab/shenzhen-1".into(),
                tls: None,
            }
        );
        assert_eq!(
            StoreChoice::parse("etcd://h:1/acme/sz", "s").unwrap(),
            StoreChoice::Etcd {
                endpoints: vec!["http://h:1".into()],
                namespace: "acme/sz".into(),
                tls: None,
            }
        );
        for bad in [
            "etcd",
            "etcd://",
            "etcd://h",
            "etcd://h:0",
            "etcd://:1",
            "redis://h:1",
            "etcd://h:1/a b",
        ] {
            assert!(StoreChoice::parse(bad, "s").is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "x").unwrap();
        let files = EtcdTlsFiles {
            ca: ca.clone(),
            cert: None,
            key: None,
        };
        match StoreChoice::parse_with("etcds://h:1", "s", Some(files.clone())).unwrap() {
            StoreChoice::Etcd { endpoints, tls, .. } => {
                assert_eq!(endpoints, vec!["https://h:1".to_owned()]);
                assert!(tls.is_some_and(|t| t.ca.is_absolute()));
            }
            other => panic!("{other:?}"),
        }
        assert!(StoreChoice::parse_with("etcds://h:1", "s", None).is_err());
        assert!(StoreChoice::parse_with("etcd://h:1", "s", Some(files)).is_err());
        let half = EtcdTlsFiles {
            ca,
            cert: Some(dir.path().join("c")),
            key: None,
        };
        assert!(StoreChoice::parse_with("etcds://h:1", "s", Some(half)).is_err());
    }
}
