//! A TPM 2.0 monotonic counter (an NV index of type `TPM_NT_COUNTER`) that a site binds
//! its state to: the TPM's value only ever goes up, so a store that recorded a lower
//! value than the TPM holds is a restored copy.
//!
//! The index is defined with an authorization value only the site's keystore holds
//! (`TPMA_NV_AUTHWRITE`, `TPMA_NV_AUTHREAD`): nobody else increments it (which would make
//! the site refuse to start) or reads it through this API. It is defined `TPMA_NV_NO_DA`:
//! a wrong value is refused without counting towards the TPM's dictionary-attack
//! lockout, which must not be a way to stop the TPM answering for every other use. A
//! 32-byte random value leaves nothing to guess.
//!
//! The TPM is reached through the TCG TSS (`tpm2-tss`): a device node (`/dev/tpmrm0`,
//! through the kernel's resource manager) or a simulator's socket (`swtpm`).
//!
//! Which API for which job:
//! - where the counter is: [`CounterSpec`] (`tpm:device=/dev/tpmrm0`,
//!   `tpm:swtpm=127.0.0.1:2321`, each with an optional `,index=0x01xxxxxx`);
//! - a new counter: [`Counter::define`]; one defined before: [`Counter::open`];
//! - its value: [`Counter::read`]; one step up, durably: [`Counter::increment`].
#![forbid(unsafe_code)]

use std::str::FromStr;
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::NvIndexType;
use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Auth, NvPublicBuilder};
use tss_esapi::{Context, TctiNameConf};
use zeroize::Zeroizing;

/// The index a site's counter takes unless its spec names another: in the range TCG
/// leaves to the TPM's owner (0x01000000-0x013FFFFF), "KF" in its low bytes.
pub const DEFAULT_INDEX: u32 = 0x0100_4b46;
const OWNER_RANGE: std::ops::RangeInclusive<u32> = 0x0100_0000..=0x013f_ffff;

/// What went wrong with the counter.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The spec does not say where a TPM is.
    #[error("rollback counter '{0}': {1}")]
    Spec(String, String),
    /// No TPM answers where the spec says.
    #[error("no TPM answers at {0}: {1}")]
    Unreachable(String, String),
    /// The index is not defined in this TPM.
    #[error("TPM NV index {0:#010x} is not defined (another TPM, or one cleared)")]
    Undefined(u32),
    /// The index is defined already (by another site, or a counter of this one).
    #[error("TPM NV index {0:#010x} is defined already: choose another with ,index=0x01xxxxxx")]
    AlreadyDefined(u32),
    /// The index is not a counter this code defined.
    #[error("TPM NV index {0:#010x} is not a keyfab counter (its attributes differ)")]
    NotACounter(u32),
    /// The TPM refused the authorization value.
    #[error("the TPM refused the counter's authorization (not this site's counter)")]
    AuthRefused,
    /// Anything else the TPM or the TSS said.
    #[error("TPM: {0}")]
    Tpm(String),
}

/// Where the counter is: the TPM, and the NV index in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSpec {
    tcti: String,
    index: u32,
}

impl CounterSpec {
    /// The NV index.
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl FromStr for CounterSpec {
    type Err = TpmError;

    /// `tpm:device=PATH[,index=0xHEX]` or `tpm:swtpm=HOST:PORT[,index=0xHEX]`.
    fn from_str(text: &str) -> Result<Self, TpmError> {
        let bad = |why: &str| TpmError::Spec(text.to_owned(), why.to_owned());
        let rest = text
            .strip_prefix("tpm:")
            .ok_or_else(|| bad("expected tpm:device=PATH or tpm:swtpm=HOST:PORT"))?;
        let (mut tcti, mut index) = (None, DEFAULT_INDEX);
        for part in rest.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad("each part is key=value"))?;
            let plain = !value.is_empty()
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/._-:".contains(&b));
            if !plain {
                return Err(bad("a value with characters a path or address never has"));
            }
            match (key, tcti.is_some()) {
                ("device", false) => tcti = Some(format!("device:{value}")),
                ("swtpm", false) => {
                    let (host, port) = value
                        .rsplit_once(':')
                        .ok_or_else(|| bad("swtpm=HOST:PORT"))?;
                    let port: u16 = port.parse().map_err(|_| bad("a port 1-65534"))?;
                    if port == 0 || port == u16::MAX || host.is_empty() {
                        return Err(bad(
                            "swtpm=HOST:PORT, port 1-65534 (PORT+1 is its control port)",
                        ));
                    }
                    tcti = Some(format!("swtpm:host={host},port={port}"));
                }
                ("device" | "swtpm", true) => return Err(bad("one TPM only")),
                ("index", _) => {
                    index = value
                        .strip_prefix("0x")
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .filter(|i| OWNER_RANGE.contains(i))
                        .ok_or_else(|| bad("index=0x01000000 to 0x013fffff (the owner's range)"))?;
                }
                _ => return Err(bad("unknown key: device, swtpm or index")),
            }
        }
        let tcti = tcti.ok_or_else(|| bad("name the TPM: device=PATH or swtpm=HOST:PORT"))?;
        Ok(CounterSpec { tcti, index })
    }
}

impl std::fmt::Display for CounterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tpm = match self.tcti.split_once(':') {
            Some(("device", path)) => format!("device={path}"),
            _ => {
                let host_port = self
                    .tcti
                    .trim_start_matches("swtpm:host=")
                    .replacen(",port=", ":", 1);
                format!("swtpm={host_port}")
            }
        };
        write!(f, "tpm:{tpm},index={:#010x}", self.index)
    }
}

/// A counter in a TPM, reached and authorized.
pub struct Counter {
    context: Context,
    handle: NvIndexHandle,
    index: u32,
}

impl Counter {
    /// Defines the counter at `spec` with the authorization value `auth`, and takes its
    /// first step (a counter has no value before it): the counter, and that value — the
    /// highest any counter of this TPM ever had, so never below one this TPM gave before.
    pub fn define(spec: &CounterSpec, auth: &[u8; 32]) -> Result<(Counter, u64), TpmError> {
        let mut context = connect(spec)?;
        let nv_index = NvIndexTpmHandle::new(spec.index).map_err(tpm)?;
        let attributes = NvIndexAttributesBuilder::new()
            .with_nv_index_type(NvIndexType::Counter)
            .with_auth_write(true)
            .with_auth_read(true)
            .with_no_da(true)
            .build()
            .map_err(tpm)?;
        let public = NvPublicBuilder::new()
            .with_nv_index(nv_index)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attributes)
            .with_data_area_size(8)
            .build()
            .map_err(tpm)?;
        let handle = context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_define_space(Provision::Owner, Some(auth_of(auth)?), public)
            })
            .map_err(|e| match kind(&e) {
                Some(Tss2ResponseCodeKind::NvDefined) => TpmError::AlreadyDefined(spec.index),
                _ => tpm(e),
            })?;
        let mut counter = Counter {
            context,
            handle,
            index: spec.index,
        };
        counter.authorize(auth)?;
        let first = counter.increment()?;
        Ok((counter, first))
    }

    /// The counter defined at `spec` before, authorized with `auth`: refused if the
    /// index is not there, is not such a counter, or does not take `auth`.
    pub fn open(spec: &CounterSpec, auth: &[u8; 32]) -> Result<Counter, TpmError> {
        let mut context = connect(spec)?;
        let nv_index = NvIndexTpmHandle::new(spec.index).map_err(tpm)?;
        let object = context
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(nv_index)))
            .map_err(|e| match kind(&e) {
                Some(Tss2ResponseCodeKind::Handle) => TpmError::Undefined(spec.index),
                _ => tpm(e),
            })?;
        let handle = NvIndexHandle::from(object);
        let (public, _) = context
            .execute_without_session(|ctx| ctx.nv_read_public(handle))
            .map_err(tpm)?;
        let a = public.attributes();
        let ours = a.index_type().ok() == Some(NvIndexType::Counter)
            && a.auth_write()
            && a.auth_read()
            && public.data_size() == 8;
        if !ours {
            return Err(TpmError::NotACounter(spec.index));
        }
        let mut counter = Counter {
            context,
            handle,
            index: spec.index,
        };
        counter.authorize(auth)?;
        // Proves the authorization before anyone relies on the counter.
        counter.read()?;
        Ok(counter)
    }

    /// The NV index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The counter's value.
    pub fn read(&mut self) -> Result<u64, TpmError> {
        let handle = self.handle;
        let data = self
            .context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_read(NvAuth::NvIndex(handle), handle, 8, 0)
            })
            .map_err(refused_or_tpm)?;
        let bytes: [u8; 8] = data
            .value()
            .try_into()
            .map_err(|_| TpmError::Tpm("a counter read that is not 8 bytes".into()))?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// Steps the counter up by one — in the TPM's NV memory, durably, before it answers —
    /// and reads the value back.
    pub fn increment(&mut self) -> Result<u64, TpmError> {
        let handle = self.handle;
        self.context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_increment(NvAuth::NvIndex(handle), handle)
            })
            .map_err(refused_or_tpm)?;
        self.read()
    }

    fn authorize(&mut self, auth: &[u8; 32]) -> Result<(), TpmError> {
        let value = auth_of(auth).map_err(tpm)?;
        self.context
            .tr_set_auth(self.handle.into(), value)
            .map_err(tpm)
    }
}

fn connect(spec: &CounterSpec) -> Result<Context, TpmError> {
    let unreachable = |e: String| TpmError::Unreachable(spec.tcti.clone(), e);
    let conf = TctiNameConf::from_str(&spec.tcti).map_err(|e| unreachable(e.to_string()))?;
    Context::new(conf).map_err(|e| unreachable(e.to_string()))
}

fn auth_of(value: &[u8; 32]) -> tss_esapi::Result<Auth> {
    let copy = Zeroizing::new(value.to_vec());
    Auth::try_from(copy.to_vec())
}

fn kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

fn refused_or_tpm(e: tss_esapi::Error) -> TpmError {
    match kind(&e) {
        Some(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth) => {
            TpmError::AuthRefused
        }
        _ => tpm(e),
    }
}

fn tpm(e: tss_esapi::Error) -> TpmError {
    TpmError::Tpm(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_one_tpm_and_an_owner_index() {
        let s: CounterSpec = "tpm:swtpm=127.0.0.1:2321".parse().unwrap();
        assert_eq!(s.index(), DEFAULT_INDEX);
        assert_eq!(s.to_string(), "tpm:swtpm=127.0.0.1:2321,index=0x01004b46");
        let d: CounterSpec = "tpm:device=/dev/tpmrm0,index=0x01000010".parse().unwrap();
        assert_eq!(d.to_string(), "tpm:device=/dev/tpmrm0,index=0x01000010");
        assert_eq!(d.to_string().parse::<CounterSpec>().unwrap(), d);
        for bad in [
            "swtpm=127.0.0.1:2321",
            "tpm:",
            "tpm:swtpm=127.0.0.1",
            "tpm:swtpm=127.0.0.1:65535",
            "tpm:swtpm=h:1,device=/dev/tpm0",
            "tpm:device=/dev/tpmrm0,index=0x01800000",
            "tpm:device=/dev/tpmrm0,index=12",
            "tpm:device=/dev/tpm rm0",
            "tpm:device=/dev/tpmrm0,host=x",
            "tpm:device=/dev/tpmrm0,swtpm=a:1",
        ] {
            assert!(bad.parse::<CounterSpec>().is_err(), "{bad}");
        }
    }
}
