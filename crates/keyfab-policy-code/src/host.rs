//! The host API: the only functions a policy module may import (docs/POLICY-CODE.md).
//!
//! Every function checks its arguments and traps on misuse (a pointer outside memory, a
//! key or value too long, an unknown input id): a module that breaks the API fails
//! closed with `policy_error`, never reads or writes past what it was given.

use crate::{Facts, ModuleState, HOST_MODULE, MAX_MEMORY_BYTES, MAX_REASON_BYTES, MEMORY_EXPORT};
use wasmi::{Caller, Engine, Error, Extern, Linker, StoreLimits, StoreLimitsBuilder};

/// The host functions, by import name.
pub(crate) const FUNCTIONS: [&str; 7] = [
    "input",
    "device_id",
    "station",
    "state_get",
    "state_set",
    "state_remove",
    "deny_reason",
];

/// What one evaluation's instance may reach.
pub(crate) struct Host {
    pub(crate) limits: StoreLimits,
    pub(crate) device_id: String,
    pub(crate) station: Option<String>,
    pub(crate) facts: Facts,
    pub(crate) state: ModuleState,
    pub(crate) reason: Option<String>,
}

impl Host {
    pub(crate) fn new(
        device_id: &str,
        station: Option<&str>,
        facts: Facts,
        state: ModuleState,
    ) -> Self {
        Self {
            limits: StoreLimitsBuilder::new()
                .memory_size(MAX_MEMORY_BYTES)
                .memories(1)
                .tables(1)
                .table_elements(4_096)
                .instances(1)
                // A module that asks for more memory fails closed instead of carrying on
                // with -1, so "allocates without bound" is always a policy_error.
                .trap_on_grow_failure(true)
                .build(),
            device_id: device_id.to_owned(),
            station: station.map(str::to_owned),
            facts,
            state,
            reason: None,
        }
    }
}

fn api_error(function: &str, message: impl std::fmt::Display) -> Error {
    Error::new(format!("keyfab.{function}: {message}"))
}

fn memory(caller: &Caller<'_, Host>, function: &str) -> Result<wasmi::Memory, Error> {
    caller
        .get_export(MEMORY_EXPORT)
        .and_then(Extern::into_memory)
        .ok_or_else(|| api_error(function, "the module exports no memory"))
}

fn range(function: &str, ptr: i32, len: i32, limit: usize) -> Result<(usize, usize), Error> {
    let (Ok(ptr), Ok(len)) = (usize::try_from(ptr), usize::try_from(len)) else {
        return Err(api_error(function, "negative pointer or length"));
    };
    if len > limit {
        return Err(api_error(function, format!("{len} bytes; at most {limit}")));
    }
    Ok((ptr, len))
}

/// Reads `len` bytes at `ptr` of the module's memory.
fn read(
    caller: &Caller<'_, Host>,
    function: &str,
    ptr: i32,
    len: i32,
    limit: usize,
) -> Result<Vec<u8>, Error> {
    let (ptr, len) = range(function, ptr, len, limit)?;
    let mut buf = vec![0; len];
    memory(caller, function)?
        .read(caller, ptr, &mut buf)
        .map_err(|e| api_error(function, e))?;
    Ok(buf)
}

/// Copies as much of `value` as fits in `cap` bytes at `ptr`; returns its whole length,
/// so a module can call again with a larger buffer.
fn copy_out(
    caller: &mut Caller<'_, Host>,
    function: &str,
    value: &[u8],
    ptr: i32,
    cap: i32,
) -> Result<i32, Error> {
    let (ptr, cap) = range(function, ptr, cap, MAX_MEMORY_BYTES)?;
    let n = value.len().min(cap);
    memory(caller, function)?
        .write(&mut *caller, ptr, &value[..n])
        .map_err(|e| api_error(function, e))?;
    i32::try_from(value.len()).map_err(|_| api_error(function, "value too long"))
}

fn text(bytes: Vec<u8>, function: &str) -> Result<String, Error> {
    String::from_utf8(bytes).map_err(|_| api_error(function, "not UTF-8"))
}

pub(crate) fn linker(engine: &Engine) -> Linker<Host> {
    let mut linker = Linker::new(engine);
    let defined = define(&mut linker);
    debug_assert!(defined.is_ok(), "host API names are distinct");
    linker
}

fn define(linker: &mut Linker<Host>) -> Result<(), wasmi::errors::LinkerError> {
    linker.func_wrap(
        HOST_MODULE,
        "input",
        |caller: Caller<'_, Host>, id: i32| -> Result<i64, Error> {
            caller
                .data()
                .facts
                .get(id)
                .ok_or_else(|| api_error("input", format!("unknown input id {id}")))
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "device_id",
        |mut caller: Caller<'_, Host>, ptr: i32, cap: i32| -> Result<i32, Error> {
            let id = caller.data().device_id.clone();
            copy_out(&mut caller, "device_id", id.as_bytes(), ptr, cap)
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "station",
        |mut caller: Caller<'_, Host>, ptr: i32, cap: i32| -> Result<i32, Error> {
            match caller.data().station.clone() {
                Some(s) => copy_out(&mut caller, "station", s.as_bytes(), ptr, cap),
                None => Ok(-1),
            }
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "state_get",
        |mut caller: Caller<'_, Host>,
         key_ptr: i32,
         key_len: i32,
         ptr: i32,
         cap: i32|
         -> Result<i32, Error> {
            let key = read(&caller, "state_get", key_ptr, key_len, 4096)?;
            let key = text(key, "state_get")?;
            match caller.data().state.get(&key).map(<[u8]>::to_vec) {
                Some(v) => copy_out(&mut caller, "state_get", &v, ptr, cap),
                None => Ok(-1),
            }
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "state_set",
        |mut caller: Caller<'_, Host>,
         key_ptr: i32,
         key_len: i32,
         ptr: i32,
         len: i32|
         -> Result<i32, Error> {
            let key = text(
                read(&caller, "state_set", key_ptr, key_len, 4096)?,
                "state_set",
            )?;
            let value = read(&caller, "state_set", ptr, len, 4096)?;
            caller
                .data_mut()
                .state
                .write(&key, Some(&value))
                .map_err(|e| api_error("state_set", e))?;
            Ok(0)
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "state_remove",
        |mut caller: Caller<'_, Host>, key_ptr: i32, key_len: i32| -> Result<i32, Error> {
            let key = read(&caller, "state_remove", key_ptr, key_len, 4096)?;
            let key = text(key, "state_remove")?;
            caller
                .data_mut()
                .state
                .write(&key, None)
                .map_err(|e| api_error("state_remove", e))?;
            Ok(0)
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "deny_reason",
        |mut caller: Caller<'_, Host>, ptr: i32, len: i32| -> Result<i32, Error> {
            let reason = text(
                read(&caller, "deny_reason", ptr, len, MAX_REASON_BYTES)?,
                "deny_reason",
            )?;
            if reason.chars().any(char::is_control) {
                return Err(api_error("deny_reason", "control characters in the reason"));
            }
            caller.data_mut().reason = Some(reason);
            Ok(0)
        },
    )?;
    Ok(())
}
