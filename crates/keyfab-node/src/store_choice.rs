//! Where a node's state lives: the embedded store in its home (default), or an etcd
//! cluster that several stateless nodes of one site share. The choice is made at `init`
//! and kept in `HOME/store.json` (endpoints and namespace; no secret); a second node of
//! the same site is a copy of the home (keystore and `store.json`), docs/OPERATIONS.md.

use crate::{Error, Result, STATE_FILE};
use keyfab_store::{EmbeddedStore, Store};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file that says the home's state is in etcd.
pub const STORE_FILE: &str = "store.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreChoice {
    /// `HOME/state.redb`.
    Embedded,
    /// An etcd v3 cluster, this node's keys under `namespace`.
    Etcd {
        endpoints: Vec<String>,
        namespace: String,
    },
}

impl StoreChoice {
    /// `embedded`, or `etcd://HOST:PORT[,HOST:PORT…][/NAMESPACE]` (namespace
    /// `keyfab/<name>` when not given).
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
        })
    }

    /// The choice recorded in `home` (embedded when there is no record).
    pub fn load(home: &Path) -> Result<Self> {
        match std::fs::read(home.join(STORE_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::InvalidState(format!("{STORE_FILE}: {e}"))),
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
            .map_err(|e| Error::InvalidState(format!("{STORE_FILE}: {e}")))?;
        std::fs::write(home.join(STORE_FILE), text)?;
        Ok(())
    }

    /// Opens the store this choice names.
    pub fn open(&self, home: &Path) -> Result<Box<dyn Store>> {
        Ok(match self {
            StoreChoice::Embedded => Box::new(EmbeddedStore::open(&home.join(STATE_FILE))?),
            StoreChoice::Etcd {
                endpoints,
                namespace,
            } => Box::new(keyfab_store_etcd::EtcdStore::connect(endpoints, namespace)?),
        })
    }

    /// How the choice reads in messages: `embedded`, or the etcd endpoints and namespace.
    pub fn describe(&self) -> String {
        match self {
            StoreChoice::Embedded => "embedded".into(),
            StoreChoice::Etcd {
                endpoints,
                namespace,
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
                namespace: "keyfab/shenzhen-1".into()
            }
        );
        assert_eq!(
            StoreChoice::parse("etcd://h:1/acme/sz", "s").unwrap(),
            StoreChoice::Etcd {
                endpoints: vec!["http://h:1".into()],
                namespace: "acme/sz".into()
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
    }
}
