//! Process-level inputs: passphrase, clock, randomness.

use crate::output::Failure;
use keyfab_crypto::rng::{SecureRng, SystemRng};
use keyfab_crypto::secret::SecretBytes;
use keyfab_crypto::time::{Clock, FixedClock, SystemClock, UnixTime};
use keyfab_custody::unseal::{UnsealConfig, Unsealer};
use keyfab_node::Code;
use keyfab_node::{Node, NodeKind};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

pub(crate) struct Context {
    pub passphrase_file: Option<PathBuf>,
    /// `--unseal-share-file`, for a home sealed by shares.
    pub unseal_share_files: Vec<PathBuf>,
    /// `--json`: machine output only, no progress.
    pub json: bool,
}

impl Context {
    /// The passphrase from `--passphrase-file` or `KEYFAB_PASSPHRASE`.
    pub(crate) fn passphrase(&self) -> Result<SecretBytes, Failure> {
        if let Some(path) = &self.passphrase_file {
            let mut bytes = keyfab_formats::read_capped(path, keyfab_formats::MAX_SMALL_INPUT)
                .map_err(|e| {
                    Failure::new(
                        Code::Locked,
                        format!("--passphrase-file {}: {e}", path.display()),
                    )
                })?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            return Ok(SecretBytes::new(bytes));
        }
        match std::env::var_os("KEYFAB_PASSPHRASE") {
            Some(p) if !p.is_empty() => Ok(SecretBytes::new(p.into_encoded_bytes())),
            _ => Err(Failure::new(
                Code::Locked,
                "no passphrase: set KEYFAB_PASSPHRASE or pass --passphrase-file FILE",
            )),
        }
    }

    /// What unlocks the keystore in `home`: the passphrase or, for a home sealed by
    /// shares, the unseal key recovered from the shares given (`--unseal-share-file`,
    /// `KEYFAB_UNSEAL_SHARES`).
    pub(crate) fn unlock_secret(&self, home: &Path) -> Result<SecretBytes, Failure> {
        match self.unsealer(home)? {
            None => self.passphrase(),
            Some(u) => Ok(u.passphrase().map_err(keyfab_node::Error::from)?),
        }
    }

    /// For a home sealed by shares: the shares given so far, checked. `None` for a home
    /// sealed by a passphrase.
    pub(crate) fn unsealer(&self, home: &Path) -> Result<Option<Unsealer>, Failure> {
        let Some(config) = UnsealConfig::load(home).map_err(keyfab_node::Error::from)? else {
            return Ok(None);
        };
        let mut unsealer = Unsealer::new(config);
        let mut shares: Vec<Zeroizing<String>> = Vec::new();
        for path in &self.unseal_share_files {
            // Read once: the file may be a pipe (`<(keyfab holder open-share ...)`).
            let unreadable = |e: String| {
                Failure::new(
                    Code::Locked,
                    format!("--unseal-share-file {}: {e}", path.display()),
                )
            };
            let bytes = Zeroizing::new(
                keyfab_formats::read_capped(path, keyfab_formats::MAX_SMALL_INPUT)
                    .map_err(|e| unreadable(e.to_string()))?,
            );
            if keyfab_formats::prefix::kind_of(&bytes)
                == Some(keyfab_formats::prefix::Kind::SealedShare)
            {
                return Err(Failure::usage(format!(
                    "--unseal-share-file {}: a share sealed to its holder; give it opened: --unseal-share-file <(keyfab holder open-share --key KEY {})",
                    path.display(),
                    path.display()
                )));
            }
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| unreadable("not UTF-8 text".into()))?
                .to_owned();
            shares.push(Zeroizing::new(text));
        }
        if let Some(list) = std::env::var_os("KEYFAB_UNSEAL_SHARES") {
            let list = Zeroizing::new(list.into_encoded_bytes());
            for line in String::from_utf8_lossy(&list).lines() {
                shares.push(Zeroizing::new(line.to_owned()));
            }
        }
        for share in shares.iter().filter(|s| !s.trim().is_empty()) {
            unsealer.submit(share).map_err(keyfab_node::Error::from)?;
        }
        Ok(Some(unsealer))
    }

    pub(crate) fn rng(&self) -> Box<dyn SecureRng> {
        Box::new(SystemRng)
    }

    /// The system clock, or `KEYFAB_NOW` (RFC 3339) for drills and tests.
    pub(crate) fn clock(&self) -> Result<Box<dyn Clock>, Failure> {
        match std::env::var("KEYFAB_NOW") {
            Ok(s) if !s.is_empty() => {
                let t: jiff::Timestamp = s.parse().map_err(|e| {
                    Failure::new(Code::InvalidInput, format!("KEYFAB_NOW '{s}': {e}"))
                })?;
                Ok(Box::new(FixedClock(UnixTime(t.as_second()))))
            }
            _ => Ok(Box::new(SystemClock)),
        }
    }

    pub(crate) fn now(&self) -> Result<UnixTime, Failure> {
        Ok(self.clock()?.now())
    }

    /// Opens the home; while a `site serve` holds it, through `HOME/serve.sock`.
    pub(crate) fn open(&self, home: &Path, kind: NodeKind) -> Result<Node, Failure> {
        Ok(Node::open(
            home,
            kind,
            &self.unlock_secret(home)?,
            self.rng(),
            self.clock()?,
            &keyfab_backends::Linked,
        )?)
    }

    /// Opens the home to serve it (`site serve`): its own store, lent to the site's
    /// commands from now on ([`Node::hosting`]).
    pub(crate) fn open_to_serve(&self, home: &Path, secret: &SecretBytes) -> Result<Node, Failure> {
        Ok(Node::open_to_serve(
            home,
            NodeKind::Site,
            secret,
            self.rng(),
            self.clock()?,
            &keyfab_backends::Linked,
        )?
        .hosting())
    }
}

pub(crate) use keyfab_node::rfc3339;

/// Peak resident set size of this process, from /proc (bench reports it per step).
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
